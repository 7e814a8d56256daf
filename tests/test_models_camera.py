"""Camera branch, lift-splat, BEV neck/decoder and Student: numpy-loop oracles and shapes."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tcs
from mapkd_jax import models
from mapkd_jax.data import schema
from mapkd_jax.models import camera, image_encoder, lss
from mapkd_jax.models import summary as model_summary
from mapkd_jax.models.bev_decoder import BEVDecoder, BEVNeck


def _yaw_camera(yaw, height, pitch=0.0):
  """camera -> ego rotation of a camera looking along ego heading `yaw`, pitched down."""
  # Camera axes (x right, y down, z forward) expressed in the ego frame.
  forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch),
                      -math.sin(pitch)])
  right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
  down = np.cross(forward, right)
  rotation = np.stack([right, down, forward], axis=1)
  translation = np.array([0.5 * math.cos(yaw), 0.5 * math.sin(yaw), height])
  return rotation.astype(np.float32), translation.astype(np.float32)


def _rig(batch, cams, image_hw, seed):
  """Random but plausible intrinsics/extrinsics: cameras spread in yaw, slightly pitched."""
  rng = np.random.default_rng(seed)
  intr = np.zeros((batch, cams, 3, 3), np.float32)
  rot = np.zeros((batch, cams, 3, 3), np.float32)
  trans = np.zeros((batch, cams, 3), np.float32)
  for b in range(batch):
    for n in range(cams):
      focal = rng.uniform(0.4, 1.0) * image_hw[1]
      intr[b, n] = [[focal, 0, image_hw[1] / 2 + rng.uniform(-2, 2)],
                    [0, focal, image_hw[0] / 2 + rng.uniform(-2, 2)], [0, 0, 1]]
      yaw = 2 * math.pi * n / cams + rng.uniform(-0.3, 0.3)
      rot[b, n], trans[b, n] = _yaw_camera(yaw, rng.uniform(1.2, 1.8), rng.uniform(0.0, 0.2))
  return intr, rot, trans


def _ipm_ref(patches, intr, rot, trans, *, bev_x, bev_y, stride, image_hw, forward_range,
             lateral_range, ground_height):
  """Per-cell, per-camera loop: bilinear sample if seen, max over the cameras that see it."""
  batch, cams, ph, pw, channels = patches.shape
  height, width = schema.bev_shape(bev_x, bev_y)
  h, w = height // stride, width // stride
  out = np.zeros((batch, h, w, channels), np.float64)
  df = (forward_range[1] - forward_range[0]) / ph
  dl = (lateral_range[1] - lateral_range[0]) / pw
  for b in range(batch):
    for i in range(h):
      for j in range(w):
        point = np.array([bev_x[0] + (j + 0.5) * bev_x[2] * stride,
                          bev_y[0] + (i + 0.5) * bev_y[2] * stride, ground_height])
        best = None
        for n in range(cams):
          p_cam = rot[b, n].T.astype(np.float64) @ (point - trans[b, n])
          if p_cam[2] <= 1e-3:
            continue
          u, v, _ = intr[b, n].astype(np.float64) @ p_cam / p_cam[2]
          if not (0 <= u < image_hw[1] and 0 <= v < image_hw[0]):
            continue
          r = (p_cam[2] - forward_range[0]) / df - 0.5
          c = (p_cam[0] - lateral_range[0]) / dl - 0.5
          if not (-0.5 <= r <= ph - 0.5 and -0.5 <= c <= pw - 0.5):
            continue
          r, c = min(max(r, 0.0), ph - 1.0), min(max(c, 0.0), pw - 1.0)
          r0, c0 = int(math.floor(r)), int(math.floor(c))
          r1, c1 = min(r0 + 1, ph - 1), min(c0 + 1, pw - 1)
          fr, fc = r - r0, c - c0
          patch = patches[b, n]
          value = ((1 - fr) * (1 - fc) * patch[r0, c0] + (1 - fr) * fc * patch[r0, c1]
                   + fr * (1 - fc) * patch[r1, c0] + fr * fc * patch[r1, c1])
          best = value if best is None else np.maximum(best, value)
        if best is not None:
          out[b, i, j] = best
  return out


def _hdmapnet_ipm_ref(patches, rot, trans, canvas_hw):
  """HDMapNet IPM per grid point and camera: clip-then-weight bilinear, max incl. unseen zeros."""
  batch, cams, ph, pw, channels = patches.shape
  res = pw * 3 // 4
  h, w = canvas_hw[0] // 2, canvas_hw[1] // 2
  out = np.zeros((batch, h, w, channels))
  for b in range(batch):
    for i in range(h):
      for j in range(w):
        point = np.array([-res + j * 2 * res / (w - 1), -res / 2 + i * res / (h - 1), 0.0])
        values = []
        for n in range(cams):
          p_cam = rot[b, n].T.astype(np.float64) @ (point - trans[b, n])
          x, y = p_cam[2] - pw / 8, p_cam[0] + ph / 2     # patch column, row
          x0, y0 = math.floor(x), math.floor(y)
          x0c, x1c = min(max(x0, 0), pw - 1), min(max(x0 + 1, 0), pw - 1)
          y0c, y1c = min(max(y0, 0), ph - 1), min(max(y0 + 1, 0), ph - 1)
          patch = patches[b, n].astype(np.float64)
          values.append((x1c - x) * (y1c - y) * patch[y0c, x0c]
                        + (x1c - x) * (y - y0c) * patch[y1c, x0c]
                        + (x - x0c) * (y1c - y) * patch[y0c, x1c]
                        + (x - x0c) * (y - y0c) * patch[y1c, x1c])
        out[b, i, j] = np.max(values, axis=0)
  return out


@pytest.mark.parametrize('batch,canvas_hw,channels', [
    (1, (20, 40), 1),    # patch 4 x 8: most points outside
    (2, (50, 100), 3),   # the tiny config's canvas: patch 10 x 20, IPM 25 x 50
])
def test_hdmapnet_ipm_matches_loop(batch, canvas_hw, channels):
  patch_hw = camera.view_patch_shape(canvas_hw, 5)
  rng = np.random.default_rng(batch)
  patches = rng.normal(size=(batch, 6, *patch_hw, channels)).astype(np.float32)   # signed
  _, rot, trans = _rig(batch, 6, (16, 40), seed=batch)
  x_bound, y_bound, grid_hw = camera.hdmapnet_ipm_bounds(canvas_hw, patch_hw)
  assert grid_hw == (canvas_hw[0] // 2, canvas_hw[1] // 2)
  got = jax.jit(camera.hdmapnet_ipm)(patches, rot, trans,
                                     camera.hdmapnet_plane_grid(x_bound, y_bound, grid_hw))
  want = _hdmapnet_ipm_ref(patches, rot, trans, canvas_hw)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  assert np.count_nonzero(want) > 0 and np.count_nonzero(want == 0) > 0


def test_hdmapnet_ipm_bounds_reference_sizes():
  # HDMapNet.__init__ at the 200 x 400 canvas: bv_size 40 x 80, res_x 60, IPM 100 x 200.
  x_bound, y_bound, grid_hw = camera.hdmapnet_ipm_bounds((200, 400), (40, 80))
  assert x_bound == (-60, 60, 0.6) and y_bound == (-30.0, 30.0, 0.6) and grid_hw == (100, 200)
  assert camera.view_patch_shape((200, 400), 5) == (40, 80)
  with pytest.raises(ValueError, match='IPM grid'):
    camera.hdmapnet_ipm_bounds((51, 100), (10, 20))   # odd canvas: x2 upsampling misses it
  with pytest.raises(ValueError, match='patch_divisor'):
    camera.view_patch_shape((8, 16), 5)


@pytest.mark.parametrize('batch,cams,patch_hw,channels,stride,reach_margin', [
    (1, 1, (4, 6), 1, 2, 2.0),
    (2, 3, (5, 8), 3, 1, 2.0),
    (1, 6, (6, 6), 2, 2, -8.0),   # patch much smaller than the canvas: many unseen cells
])
def test_ipm_sample_matches_loop(batch, cams, patch_hw, channels, stride, reach_margin):
  bev_x, bev_y, image_hw = (-12.0, 12.0, 1.5), (-6.0, 6.0, 1.5), (16, 40)
  rng = np.random.default_rng(batch * 10 + cams)
  patches = rng.normal(size=(batch, cams, *patch_hw, channels)).astype(np.float32)
  # Make negative values common so "max over cameras" differs from "0 if unseen".
  patches -= 1.0
  intr, rot, trans = _rig(batch, cams, image_hw, seed=cams)
  forward_range, lateral_range = camera.patch_extent(bev_x, bev_y, reach_margin)
  kwargs = dict(image_hw=image_hw, forward_range=forward_range, lateral_range=lateral_range,
                ground_height=0.0)
  got = jax.jit(camera.ipm_sample, static_argnames=tuple(kwargs))(
      patches, intr, rot, trans, camera.bev_cell_centers(bev_x, bev_y, stride), **kwargs)
  want = _ipm_ref(patches, intr, rot, trans, bev_x=bev_x, bev_y=bev_y, stride=stride, **kwargs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  assert np.count_nonzero(want) > 0   # the rig really sees part of the canvas


def test_ipm_cameras_facing_up_see_nothing():
  image_hw = (16, 40)
  intr, rot, trans = _rig(1, 2, image_hw, seed=0)
  rot = np.stack([_yaw_camera(0.0, 1.5, pitch=-math.pi / 2)[0]] * 2)[None]   # looking at the sky
  patches = np.full((1, 2, 4, 4, 2), -3.0, np.float32)
  cells = camera.bev_cell_centers((-6.0, 6.0, 1.0), (-3.0, 3.0, 1.0), 1)
  out = camera.ipm_sample(patches, intr, rot, trans, cells, image_hw=image_hw,
                          forward_range=(0.0, 10.0), lateral_range=(-10.0, 10.0),
                          ground_height=0.0)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_ipm_stride_must_divide_canvas():
  with pytest.raises(ValueError, match='ipm_stride'):
    camera.bev_cell_centers((-30.0, 30.0, 0.6), (-15.0, 15.0, 0.6), 4)


def _frustum_ref(intr, rot, trans, depths, feature_hw, image_hw):
  batch, cams = intr.shape[:2]
  fh, fw = feature_hw
  out = np.zeros((batch, cams, len(depths), fh, fw, 3))
  for b in range(batch):
    for n in range(cams):
      k_inv = np.linalg.inv(intr[b, n].astype(np.float64))
      for d, depth in enumerate(depths):
        for i in range(fh):
          for j in range(fw):
            pixel = np.array([j * (image_hw[1] - 1) / max(fw - 1, 1),
                              i * (image_hw[0] - 1) / max(fh - 1, 1), 1.0])
            out[b, n, d, i, j] = rot[b, n] @ (depth * (k_inv @ pixel)) + trans[b, n]
  return out


@pytest.mark.parametrize('batch,cams,feature_hw', [(1, 1, (1, 1)), (2, 3, (2, 5))])
def test_frustum_points_match_loop(batch, cams, feature_hw):
  image_hw = (32, 80)
  intr, rot, trans = _rig(batch, cams, image_hw, seed=1)
  depths = lss.depth_values((4.0, 45.0, 10.0))
  got = lss.frustum_points(intr, rot, trans, depths, feature_hw=feature_hw, image_hw=image_hw)
  want = _frustum_ref(intr, rot, trans, depths, feature_hw, image_hw)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)


def test_depth_values_reference_bins():
  depths = lss.depth_values((4.0, 45.0, 1.0))
  assert depths.shape == (41,) and depths[0] == 4.0 and depths[-1] == 44.0
  with pytest.raises(ValueError, match='depth_bins'):
    lss.depth_values((4.0, 4.0, 1.0))


def _splat_ref(features, points, bev_x, bev_y, z_range):
  height, width = schema.bev_shape(bev_x, bev_y)
  batch, channels = features.shape[0], features.shape[-1]
  feats = features.reshape(batch, -1, channels)
  pts = points.reshape(batch, -1, 3)
  out = np.zeros((batch, height, width, channels), np.float64)
  for b in range(batch):
    for p in range(pts.shape[1]):
      x, y, z = pts[b, p]
      # int() truncates toward zero, as the reference's .long().
      col, row = int((x - bev_x[0]) / bev_x[2]), int((y - bev_y[0]) / bev_y[2])
      level = int((z - z_range[0]) / (z_range[1] - z_range[0]))
      if 0 <= col < width and 0 <= row < height and level == 0:
        out[b, row, col] += feats[b, p]
  return out


@pytest.mark.parametrize('batch,points_shape,channels', [
    (1, (1,), 1), (2, (3, 7), 4), (3, (50,), 2)])
def test_splat_matches_loop(batch, points_shape, channels):
  bev_x, bev_y, z_range = (-3.0, 3.0, 0.5), (-2.0, 2.0, 0.5), (-1.0, 1.0)
  rng = np.random.default_rng(len(points_shape) + batch)
  features = rng.normal(size=(batch, *points_shape, channels)).astype(np.float32)
  # About half the points fall outside the canvas or the z range.
  points = rng.uniform([-4.5, -3.0, -1.5], [4.5, 3.0, 1.5],
                       size=(batch, *points_shape, 3)).astype(np.float32)
  got = jax.jit(lss.splat, static_argnames=('bev_x', 'bev_y', 'z_range'))(
      features, points, bev_x=bev_x, bev_y=bev_y, z_range=z_range)
  want = _splat_ref(features, points, bev_x, bev_y, z_range)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_splat_drops_every_out_of_range_point():
  bev_x, bev_y = (-1.0, 1.0, 1.0), (-1.0, 1.0, 1.0)
  points = np.array([[[1.0, 0.0, 0.0], [0.0, -2.01, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, -3.01],
                      [-2.5, 0.5, 0.0]]], np.float32)
  out = lss.splat(np.ones((1, 5, 2), np.float32), points, bev_x=bev_x, bev_y=bev_y,
                  z_range=(-1.0, 1.0))
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_splat_truncates_toward_zero_like_the_reference():
  # Less than one cell below x_min / y_min -> cell 0; z down to 2 z_min - z_max is kept.
  points = np.array([[[-1.5, -1.9, 0.0], [0.5, 0.5, -2.9]]], np.float32)
  out = lss.splat(np.ones((1, 2, 1), np.float32), points, bev_x=(-1.0, 1.0, 1.0),
                  bev_y=(-1.0, 1.0, 1.0), z_range=(-1.0, 1.0))
  np.testing.assert_array_equal(np.asarray(out)[0, ..., 0], [[1.0, 0.0], [0.0, 1.0]])


# ---- Modules at the tiny config ----


@pytest.fixture(scope='module')
def tiny_config():
  return ml_collections.FrozenConfigDict(tcs.get_config('student,tiny'))


def _batch(config, batch_size, seed=0):
  spec = schema.batch_spec(config.data, batch_size)
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  cams = len(config.data.cameras)
  batch['intrinsics'], batch['cam_rotation'], batch['cam_translation'] = _rig(
      batch_size, cams, config.data.image_size, seed)
  batch['images'] = rng.normal(size=spec['images'][0]).astype(np.float32)
  batch['lidar_points'] = rng.normal(size=spec['lidar_points'][0]).astype(np.float32)
  batch['lidar_mask'][:] = True
  batch['sd_prior'] = np.sign(rng.normal(size=spec['sd_prior'][0])).astype(np.float32)
  return batch


def _init_and_grad(module, inputs):
  """Initialises `module`, then one jitted train-mode forward + grad of a scalar of the output."""
  # 'rbg' keys: threefry-based init compiles ~4x slower on CPU, which dominates this file.
  key = jax.random.key(0, impl='rbg')
  variables = jax.jit(lambda x: module.init(key, x, train=False))(inputs)

  @jax.jit
  def loss_and_grad(params, x):
    def loss_fn(p):
      out, _ = module.apply({'params': p, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
      total = sum(jnp.mean(jnp.square(leaf)) for leaf in jax.tree.leaves(out))
      return total, out
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (_, out), grads = loss_and_grad(variables['params'], inputs)
  return variables, out, grads, loss_and_grad


def _assert_grads_finite_nonzero(grads):
  """Every gradient finite; every top-level submodule gets a non-zero gradient."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
  for name, subtree in grads.items():
    assert sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(subtree)) > 0, name


@pytest.mark.parametrize('kind', image_encoder.ENCODER_KINDS)
def test_image_encoder_shapes(kind):
  encoder = image_encoder.ImageEncoder(kind=kind, out_channels=5, fusion_channels=8,
                                       resnet_widths=(4, 4, 8, 8))
  images = jnp.zeros((2, 32, 80, 3))
  shapes = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x,
                                                             train=False)[0], images)
  assert shapes.shape == (2, 2, 5, 5)


def test_image_encoder_unknown_kind():
  encoder = image_encoder.ImageEncoder(kind='vgg', out_channels=5, fusion_channels=8,
                                       resnet_widths=(4, 4, 8, 8))
  with pytest.raises(ValueError, match='image_encoder'):
    encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_camera_bev_and_lift_splat(tiny_config):
  """CameraBEV shapes (its gradients are checked through the Student); LiftSplat in full."""
  batch = _batch(tiny_config, 1)
  canvas = schema.bev_shape(tiny_config.data.bev_x, tiny_config.data.bev_y)
  camera_bev = camera.CameraBEV(tiny_config)
  out = jax.eval_shape(
      lambda x: camera_bev.init_with_output(jax.random.key(0), x, train=False)[0], batch)
  assert out.shape == (1, *canvas, tiny_config.model.camera.channels)
  _, out, grads, _ = _init_and_grad(lss.LiftSplat(tiny_config), batch)
  assert out.shape == (1, *canvas, tiny_config.model.lss.out_channels)
  assert np.all(np.isfinite(out)) and np.any(out != 0)
  _assert_grads_finite_nonzero(grads)


@pytest.mark.parametrize('view_transform', camera.VIEW_TRANSFORMS)
def test_view_transforms_use_intrinsics_or_not(tiny_config, view_transform):
  """Both view transforms fill the canvas; 'hdmapnet' ignores the intrinsics, 'metric' not."""
  config = ml_collections.ConfigDict(tiny_config)
  config.model.camera.view_transform = view_transform
  config = ml_collections.FrozenConfigDict(config)
  batch = _batch(config, 1)
  image_hw = config.data.image_size
  features = np.random.default_rng(0).normal(
      size=(1, 6, image_hw[0] // 16, image_hw[1] // 16, 3)).astype(np.float32)
  module = camera.ViewTransform(config)
  variables = jax.jit(lambda b: module.init(jax.random.key(0, impl='rbg'), features, b,
                                             image_hw=image_hw))(batch)
  apply = jax.jit(lambda b: module.apply(variables, features, b, image_hw=image_hw))
  out = np.asarray(apply(batch))
  canvas = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  assert out.shape == (1, *canvas, 3) and np.any(out != 0)
  zoomed = np.asarray(apply(dict(batch, intrinsics=batch['intrinsics'] * [[[2], [2], [1]]])))
  assert np.array_equal(out, zoomed) == (view_transform == 'hdmapnet')


def test_camera_bev_unknown_view_transform(tiny_config):
  config = ml_collections.ConfigDict(tiny_config)
  config.model.camera.view_transform = 'lss'
  camera_bev = camera.CameraBEV(ml_collections.FrozenConfigDict(config))
  with pytest.raises(ValueError, match='view_transform'):
    jax.eval_shape(lambda b: camera_bev.init(jax.random.key(0), b, train=False),
                   _batch(config, 1))


def test_neck_and_decoder_shapes(tiny_config):
  canvas = schema.bev_shape(tiny_config.data.bev_x, tiny_config.data.bev_y)
  bev = jnp.ones((2, *canvas, 7))
  neck = BEVNeck(tiny_config)
  small, full = jax.eval_shape(
      lambda x: neck.init_with_output(jax.random.key(0), x, train=False)[0], bev)
  layers = tiny_config.model.neck.num_layers
  assert small.shape == (2, -(-canvas[0] // 2**layers), -(-canvas[1] // 2**layers),
                         tiny_config.model.neck.channels)
  assert full.shape == (2, *canvas, tiny_config.model.neck.channels)
  decoder = BEVDecoder(tiny_config)
  out = jax.eval_shape(
      lambda x: decoder.init_with_output(jax.random.key(0), x, train=False)[0], bev)
  assert out['semantic'].shape == (2, *canvas, 4)
  assert out['embedding'].shape == (2, *canvas, tiny_config.model.decoder.embedding_dim)
  assert out['direction'].shape == (2, *canvas, 37)


def test_neck_up_on_non_multiple_canvas(tiny_config):
  config = ml_collections.ConfigDict(tiny_config)
  config.model.neck.num_layers = 3   # 50 x 100 is not a multiple of 8
  neck = BEVNeck(ml_collections.FrozenConfigDict(config))
  small, full = jax.eval_shape(
      lambda x: neck.init_with_output(jax.random.key(0), x, train=False)[0],
      jnp.ones((1, 50, 100, 3)))
  assert small.shape[1:3] == (7, 13) and full.shape[1:3] == (50, 100)


def test_student_outputs_grads_and_no_lidar_or_sd(tiny_config):
  student = models.build('student', tiny_config)
  batch = _batch(tiny_config, 2)
  variables, out, grads, loss_and_grad = _init_and_grad(student, batch)
  canvas = schema.bev_shape(tiny_config.data.bev_x, tiny_config.data.bev_y)
  assert out['semantic'].shape == (2, *canvas, 4)
  assert out['embedding'].shape == (2, *canvas, tiny_config.model.decoder.embedding_dim)
  assert out['direction'].shape == (2, *canvas, tiny_config.data.direction_bins + 1)
  assert out['bev_small'].shape == (2, canvas[0] // 2, canvas[1] // 2,
                                    tiny_config.model.neck.channels)
  assert set(variables) == {'params', 'batch_stats'}
  # The summary tool counts from abstract shapes; it must agree with the real init.
  summary = model_summary.summarize('student', tiny_config, batch_size=1)
  assert summary['params'] == sum(x.size for x in jax.tree.leaves(variables['params']))
  assert summary['flops'] > 0 and math.isfinite(summary['flops'])
  _assert_grads_finite_nonzero(grads)
  # Changing LiDAR, SD prior and labels must not change anything the student computes.
  other = dict(batch, lidar_points=batch['lidar_points'] * 7 + 3, lidar_mask=~batch['lidar_mask'],
               sd_prior=-batch['sd_prior'], semantic=batch['semantic'] + 1)
  (_, out_other), grads_other = loss_and_grad(variables['params'], other)
  jax.tree.map(np.testing.assert_array_equal, (out, grads), (out_other, grads_other))
  # ... while the images do matter.
  (_, out_images), _ = loss_and_grad(variables['params'], dict(batch, images=-batch['images']))
  assert not np.allclose(out['semantic'], out_images['semantic'])


def test_build_unknown_model(tiny_config):
  with pytest.raises(ValueError, match='unknown model'):
    models.build('nope', tiny_config)


def test_student_reference_size_shapes():
  """Reference config (60x30 at 0.15 m, 128x352 images, EfficientNet-B0): shapes only."""
  config = ml_collections.FrozenConfigDict(tcs.get_config('student'))
  student = models.build('student', config)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in schema.batch_spec(config.data, 1).items()}
  out = jax.eval_shape(
      lambda b: student.init_with_output(jax.random.key(0), b, train=False)[0], batch)
  assert out['bev_small'].shape == (1, 25, 50, 192)
  for name, channels in [('semantic', 4), ('embedding', 16), ('direction', 37)]:
    assert out[name].shape == (1, 200, 400, channels), name

