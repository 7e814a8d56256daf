"""Camera view transform and lift-splat geometry vs the PyTorch reference
(tests/torch_ref_camera.py) at reference size.

Same weights (converted by convert/hdmapnet_camera.py), same 1/16 feature maps, a nuScenes-like
ring of six cameras in the real order: max|diff| <= 1e-4 * max|reference| in float32.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from configs import tcs  # noqa: E402
from mapkd_jax.convert import common, hdmapnet_camera  # noqa: E402
from mapkd_jax.data import schema  # noqa: E402
from mapkd_jax.models import camera, lss, resample  # noqa: E402
import torch_ref_camera  # noqa: E402

RTOL = 1e-4   # of max|reference output|

# Approximate nuScenes calibration (ego frame: x forward, y left), in config CAMERAS order:
# (x, y, z) metres and yaw degrees of the optical axis; small pitch / roll added per camera.
NUSCENES_RIG = (
    ('CAM_FRONT_LEFT', (1.52, 0.49, 1.51), 55.0),
    ('CAM_FRONT', (1.70, 0.02, 1.51), 0.0),
    ('CAM_FRONT_RIGHT', (1.55, -0.49, 1.50), -55.0),
    ('CAM_BACK_LEFT', (1.04, 0.48, 1.59), 110.0),
    ('CAM_BACK', (0.03, 0.00, 1.58), 180.0),
    ('CAM_BACK_RIGHT', (1.01, -0.48, 1.56), -110.0),
)


def _camera_to_ego(yaw, pitch=0.0, roll=0.0):
  """Rotation camera (x right, y down, z forward) -> ego, optical axis at `yaw`, tilted down."""
  forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch),
                      -math.sin(pitch)])
  right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
  down = np.cross(forward, right)
  # Roll about the optical axis.
  right, down = (math.cos(roll) * right + math.sin(roll) * down,
                 -math.sin(roll) * right + math.cos(roll) * down)
  return np.stack([right, down, forward], axis=1)


def nuscenes_rig(batch, image_hw, seed=0):
  """intrinsics [B, 6, 3, 3], rotation [B, 6, 3, 3], translation [B, 6, 3], float32."""
  rng = np.random.default_rng(seed)
  cams = len(NUSCENES_RIG)
  intr = np.zeros((batch, cams, 3, 3))
  rot = np.zeros((batch, cams, 3, 3))
  trans = np.zeros((batch, cams, 3))
  scale = image_hw[1] / 1600.0   # 1600 x 900 -> network input
  for b in range(batch):
    for n, (_, xyz, yaw) in enumerate(NUSCENES_RIG):
      intr[b, n] = [[1266.4 * scale, 0, 816.3 * scale], [0, 1266.4 * scale, 491.5 * scale],
                    [0, 0, 1]]
      pitch, roll = np.radians(rng.uniform(-1.0, 1.0, size=2))
      rot[b, n] = _camera_to_ego(math.radians(yaw + rng.uniform(-1, 1)), pitch, roll)
      trans[b, n] = np.asarray(xyz) + rng.uniform(-0.02, 0.02, size=3)
  return intr.astype(np.float32), rot.astype(np.float32), trans.astype(np.float32)


def _seen_by(rot, trans, canvas_hw, patch_hw):
  """[B, N, h, w] bool: the IPM grid point falls inside camera n's patch; and p_cam.z < 0."""
  x_bound, y_bound, grid_hw = camera.hdmapnet_ipm_bounds(canvas_hw, patch_hw)
  plane = camera.hdmapnet_plane_grid(x_bound, y_bound, grid_hw).astype(np.float64)
  ground = np.concatenate([plane, np.zeros((*grid_hw, 1))], -1)
  p_cam = np.einsum('bnji,bnhwj->bnhwi', rot, ground[None, None] - trans[:, :, None, None])
  col = p_cam[..., 2] - patch_hw[1] / 8
  row = p_cam[..., 0] + patch_hw[0] / 2
  seen = (col >= 0) & (col < patch_hw[1] - 1) & (row >= 0) & (row < patch_hw[0] - 1)
  return seen, p_cam[..., 2] < 0


def _report(name, got, want):
  diff = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  print(f'{name}: max|diff| {diff:.3g}, max|ref| {scale:.3g}, relative {diff / scale:.3g}')
  assert scale > 0
  assert diff <= RTOL * scale, (name, diff, scale)


@pytest.fixture(scope='module')
def reference_config():
  return ml_collections.FrozenConfigDict(tcs.get_config('student'))


def test_view_transform_matches_reference(reference_config):
  """Full ViewTransform (MLPs, IPM, x2 upsample), batch 1, reference size, random weights."""
  config = reference_config
  data = config.data
  image_hw = tuple(data.image_size)
  canvas = schema.bev_shape(data.bev_x, data.bev_y)
  assert image_hw == (128, 352) and canvas == (200, 400)
  channels = config.model.camera.channels
  torch.manual_seed(0)
  ref = torch_ref_camera.CameraView(image_hw, canvas).eval()
  intr, rot, trans = nuscenes_rig(1, image_hw)
  feat = torch.randn(1, 6, channels, 8, 22)
  with torch.no_grad():
    want = ref(feat, torch.from_numpy(rot), torch.from_numpy(trans)).permute(0, 2, 3, 1).numpy()
  assert want.shape == (1, *canvas, channels)

  module = camera.ViewTransform(config)
  features = jnp.asarray(feat.permute(0, 1, 3, 4, 2).numpy())          # [B, N, h, w, C]
  batch = {'intrinsics': intr, 'cam_rotation': rot, 'cam_translation': trans}
  abstract = jax.eval_shape(
      lambda f: module.init(jax.random.key(0), f, batch, image_hw=image_hw), features)
  source = {k: v.numpy() for k, v in ref.view_fusion.state_dict().items()}
  conv = common.Conversion(source, abstract, origin='torch_ref_camera.ViewTransformation')
  hdmapnet_camera.convert_view_fusion(conv, '', '')
  variables = conv.finish()
  del source, ref
  got = jax.jit(lambda v, f, b: module.apply(v, f, b, image_hw=image_hw))(
      variables, features, batch)
  _report('ViewTransform 200x400', np.asarray(got), want)

  # The rig exercises both edge cases: grid points no camera sees (the blind zone around the
  # ego and beyond the patches' reach) and, for every camera, points behind it.
  seen, behind = _seen_by(rot.astype(np.float64), trans.astype(np.float64), canvas, (40, 80))
  assert 0 < np.count_nonzero(~seen.any(axis=1)) < seen[0, 0].size
  assert np.all(behind.any(axis=(2, 3))) and not np.any(seen & behind)


def test_ipm_signed_patches_odd_rig_matches_reference():
  """IPM + upsample alone, signed patches (the max takes unseen cameras' zeros), batch 2, with
  a camera looking at the sky (every point behind or outside), one rolled 90 degrees and one
  moved 3 m sideways."""
  canvas, patch_hw, channels = (200, 400), (40, 80), 8
  _, rot, trans = nuscenes_rig(2, (128, 352), seed=1)
  rot[1, 1] = _camera_to_ego(0.0, pitch=-math.pi / 2)   # CAM_FRONT looks straight up
  rot[0, 3] = _camera_to_ego(math.radians(110), roll=math.pi / 2)
  trans[0, 5, 1] -= 3.0
  rng = np.random.default_rng(0)
  patches = rng.normal(size=(2, 6, *patch_hw, channels)).astype(np.float32)
  x_bound, y_bound, grid_hw = camera.hdmapnet_ipm_bounds(canvas, patch_hw)

  with torch.no_grad():
    topdown = torch_ref_camera.ipm(torch.from_numpy(patches).permute(0, 1, 4, 2, 3),
                                   torch.from_numpy(rot), torch.from_numpy(trans),
                                   list(x_bound), list(y_bound))
    want_ipm = topdown.permute(0, 2, 3, 1).numpy()
    want = torch_ref_camera.upsample(topdown).permute(0, 2, 3, 1).numpy()

  @jax.jit
  def ours(p, r, t):
    ipm = camera.hdmapnet_ipm(p, r, t, camera.hdmapnet_plane_grid(x_bound, y_bound, grid_hw))
    return ipm, resample.resize_bilinear_align_corners(ipm, canvas)

  got_ipm, got = ours(patches, rot, trans)
  _report('IPM 100x200 signed', np.asarray(got_ipm), want_ipm)
  _report('IPM+upsample 200x400 signed', np.asarray(got), want)
  seen, _ = _seen_by(rot.astype(np.float64), trans.astype(np.float64), canvas, patch_hw)
  assert not seen[1, 1].any()               # the sky camera contributes nothing
  unseen = ~seen.any(axis=1)
  assert unseen.any()
  np.testing.assert_array_equal(np.asarray(got_ipm)[unseen], 0.0)
  # Where every seeing camera samples a negative value, the max is the unseen cameras' 0.
  assert np.count_nonzero(np.asarray(got_ipm) == 0.0) > np.count_nonzero(unseen) * channels


def test_lift_splat_geometry_and_pooling_match_reference(reference_config):
  """Frustum points from resized-image intrinsics vs the reference's original intrinsics +
  post_rots; splat vs voxel_pooling (cumsum trick) on the same points; then end to end."""
  data, cfg = reference_config.data, reference_config.model.lss
  image_hw = tuple(data.image_size)
  feature_hw = (image_hw[0] // 16, image_hw[1] // 16)
  dbound = list(cfg.depth_bins)
  zbound = [cfg.z_range[0], cfg.z_range[1], cfg.z_range[1] - cfg.z_range[0]]
  intr, rot, trans = nuscenes_rig(1, image_hw, seed=2)
  # The reference feeds 1600 x 900 intrinsics and the resize as post_rots (HDMapNet
  # img_transform); ours are the resized image's intrinsics, post_rot @ K.
  post_rot = np.diag([image_hw[1] / 1600.0, image_hw[0] / 900.0, 1.0]).astype(np.float32)
  intr_orig = np.linalg.inv(post_rot) @ intr
  t = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in
       dict(rot=rot, trans=trans, intr=intr_orig,
            post_rot=np.broadcast_to(post_rot, intr.shape)).items()}
  with torch.no_grad():
    frustum = torch_ref_camera.lss_frustum(image_hw, feature_hw, dbound)
    geom = torch_ref_camera.lss_geometry(frustum, t['rot'], t['trans'], t['intr'],
                                         t['post_rot'], torch.zeros(1, 6, 3))
  depths = lss.depth_values(cfg.depth_bins)
  points = jax.jit(lss.frustum_points, static_argnames=('feature_hw', 'image_hw'))(
      intr, rot, trans, depths, feature_hw=feature_hw, image_hw=image_hw)
  _report('LSS frustum points', np.asarray(points), geom.numpy())

  torch.manual_seed(1)
  depth_prob = torch.softmax(torch.randn(1, 6, len(depths), *feature_hw, 1), dim=2)
  lifted = depth_prob * torch.rand(1, 6, 1, *feature_hw, cfg.context_channels)
  with torch.no_grad():
    want = torch_ref_camera.voxel_pooling(geom, lifted, list(data.bev_x), list(data.bev_y),
                                          zbound)
  want = want.permute(0, 3, 2, 1).numpy()     # [B, C, X, Y] -> [B, Y, X, C]
  splat = jax.jit(lss.splat, static_argnames=('bev_x', 'bev_y', 'z_range'))
  kwargs = dict(bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y), z_range=tuple(cfg.z_range))
  got = np.asarray(splat(lifted.numpy(), geom.numpy(), **kwargs))
  _report('LSS splat (reference points)', got, want)

  # End to end the two float paths to the points may put a point on the other side of a cell
  # border (cells are 0.15 m; the points agree to ~1e-5 m): count such points, then compare.
  def cells(p):
    return np.trunc((p[..., :2] - [data.bev_x[0], data.bev_y[0]])
                    / [data.bev_x[2], data.bev_y[2]])
  moved = np.count_nonzero(np.any(cells(np.asarray(points)) != cells(geom.numpy()), axis=-1))
  print(f'LSS end to end: {moved} of {geom[..., 0].numel()} points in another cell')
  assert moved <= 1e-4 * geom[..., 0].numel()
  if moved == 0:
    _report('LSS splat end to end', np.asarray(splat(lifted.numpy(), points, **kwargs)), want)
