"""HDMapNet camera branch: image encoder -> per-camera view MLP -> IPM -> ego BEV.

Default (`config.model.camera.view_transform = 'hdmapnet'`) computes HDMapNet's
`ViewTransformation` + `IPM(extrinsic=True)` + `nn.Upsample(x2, align_corners=True)` (HDMapNet
model/hdmapnet.py, model/homography.py; P-MapNet and MapKD copy them unchanged) given the same
weights; `convert/hdmapnet_camera.py` maps the reference's `view_fusion.*` tensors onto
`ViewTransform`. Every size is derived from the config the way the reference derives it from
its data_conf (canvas Hb x Wb = final_H x final_W):

  view MLP, one per camera: [h*w] -> Linear -> ReLU -> Linear -> ReLU -> [Ph*Pw], applied to
    each channel's flattened 1/16 map; patch (Ph, Pw) = (Hb, Wb) // patch_divisor (5):
    40 x 80 at the reference canvas 200 x 400.
  IPM: res = Pw * 3 // 4 (60); a plane grid of `linspace` points, x over [-res, res] (w = Wb/2
    columns), y over [-res/2, res/2] (h = Hb/2 rows), z = 0, in "IPM units" (not the canvas's
    metres: 0.5 m at the reference canvas). Each point goes to the camera frame with the
    extrinsics only, p_cam = R^T (p - t), t in metres used as IPM units (the reference's
    scale mix-up, kept: the MLP learns around it); intrinsics are not used. The patch is read
    orthographically: column = p_cam.z - Pw / 8 (depth), row = p_cam.x + Ph / 2 (right), i.e.
    patch column c holds depth c + Pw/8 and row r lateral offset r - Ph/2, in IPM units.
  sampling: bilinear, hard zero outside 0 <= column < Pw - 1, 0 <= row < Ph - 1 (what the
    reference's clip-then-weight sampler computes; behind-camera points have negative depth
    and fall outside); cameras merged by a max that includes those zeros.
  upsample: x2 bilinear with align_corners=True -> [Hb, Wb].

`view_transform = 'metric'` is this project's earlier design, kept as an option: the patch
spans metric camera-frame ground (rows forward, columns lateral, reach = canvas corner +
patch_margin), cells are the canvas subsampled by ipm_stride, points are projected with the
intrinsics and a cell counts only where some camera's image sees it; then a half-pixel
bilinear resize to the canvas.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mapkd_jax.data import schema
from mapkd_jax.models import image_encoder, precision, resample

VIEW_TRANSFORMS = ('hdmapnet', 'metric')

# HDMapNet's IPM geometry (HDMapNet.__init__ and homography.perspective), fixed functions of
# the patch and canvas sizes in the reference, so not config knobs: res = Pw * 3 // 4; the grid
# spans x in [-res, res] with step 4 res / Wb and y in [-res/2, res/2] with step 2 res / Hb;
# the patch column is depth - Pw / 8 and the row is lateral + Ph / 2; the IPM canvas is
# upsampled by 2 to the BEV canvas.
_IPM_RES_NUM, _IPM_RES_DEN = 3, 4
_IPM_DEPTH_OFFSET_DIV = 8
_IPM_LATERAL_OFFSET_DIV = 2
_IPM_UPSAMPLE = 2

# 'metric': points closer than this to the camera plane (metres) count as behind the camera.
_MIN_DEPTH = 1e-3


def view_patch_shape(canvas_hw, divisor):
  """(Ph, Pw) of the view-MLP patch: the reference's bv_size = (final_H // 5, final_W // 5)."""
  patch = (canvas_hw[0] // divisor, canvas_hw[1] // divisor)
  if min(patch) < 2:
    raise ValueError(f'config.model.camera.patch_divisor={divisor} leaves a {patch} view patch '
                     f'for the {tuple(canvas_hw)} canvas (config.data.bev_x / bev_y); need >= 2')
  return patch


def hdmapnet_ipm_bounds(canvas_hw, patch_hw):
  """The reference's ipm_xbound / ipm_ybound and the IPM canvas they give.

  Args:
    canvas_hw: (Hb, Wb) BEV canvas (final_H, final_W).
    patch_hw: (Ph, Pw) view-MLP patch (bv_size).

  Returns:
    (x_bound, y_bound, (h, w)): (min, max, step) in IPM units, computed with the reference's
    float arithmetic, and the grid size int((max - min) / step) as the reference truncates it.
  """
  final_h, final_w = canvas_hw
  res = patch_hw[1] * _IPM_RES_NUM // _IPM_RES_DEN
  x_bound = (-res, res, 4 * res / final_w)
  y_bound = (-res / 2, res / 2, 2 * res / final_h)
  grid_hw = (int((y_bound[1] - y_bound[0]) / y_bound[2]),
             int((x_bound[1] - x_bound[0]) / x_bound[2]))
  if res <= 0 or (grid_hw[0] * _IPM_UPSAMPLE, grid_hw[1] * _IPM_UPSAMPLE) != tuple(canvas_hw):
    # The reference would emit a BEV map of another size than its labels here.
    raise ValueError(f'HDMapNet IPM: the {tuple(canvas_hw)} canvas (config.data.bev_x / bev_y) '
                     f'with a {tuple(patch_hw)} view patch (config.model.camera.patch_divisor) '
                     f'gives a {grid_hw} IPM grid, not half the canvas')
  return x_bound, y_bound, grid_hw


def hdmapnet_plane_grid(x_bound, y_bound, grid_hw):
  """The reference's `plane_grid` at z = 0: ego (x, y) of the IPM grid points.

  Returns:
    [h, w, 2] float32 (x, y): row i has y = linspace(y_min, y_max, h)[i], column j has
    x = linspace(x_min, x_max, w)[j] (end points included, unlike the canvas's cell centres).
  """
  xs = np.linspace(x_bound[0], x_bound[1], grid_hw[1])
  ys = np.linspace(y_bound[0], y_bound[1], grid_hw[0])
  grid_x, grid_y = np.meshgrid(xs, ys)
  return np.stack([grid_x, grid_y], axis=-1).astype(np.float32)


def _gather_bilinear(patches, row0, col0, row1, col1):
  """[B, N, Ph, Pw, C] at integer corners [B, N, h, w] -> four [B, N, h, w, C] samples."""
  batch, cams, _, patch_w, channels = patches.shape
  h, w = row0.shape[2:]
  flat = patches.reshape(batch, cams, -1, channels)

  def gather(r, c):
    index = (r * patch_w + c).reshape(batch, cams, h * w, 1)
    return jnp.take_along_axis(flat, index, axis=2).reshape(batch, cams, h, w, channels)

  return gather(row0, col0), gather(row0, col1), gather(row1, col0), gather(row1, col1)


def hdmapnet_ipm(patches, cam_rotation, cam_translation, plane_xy):
  """HDMapNet `IPM(extrinsic=True)`: samples each camera's patch at the plane grid, max-merges.

  Args:
    patches: [B, N, Ph, Pw, C] view-MLP patches; column = depth - Pw/8, row = camera x + Ph/2.
    cam_rotation: [B, N, 3, 3] camera -> ego rotation (camera x right, y down, z forward).
    cam_translation: [B, N, 3] camera -> ego translation.
    plane_xy: [h, w, 2] ego (x, y) of the grid points (hdmapnet_plane_grid), z = 0.

  Returns:
    [B, h, w, C] in patches.dtype: per grid point, the max over cameras of the bilinear sample,
    each camera contributing 0 where the point falls outside its patch (including every point
    behind it). Coordinates and weights are float32 whatever patches.dtype.
  """
  _, _, patch_h, patch_w, _ = patches.shape
  h, w = plane_xy.shape[:2]
  plane = jnp.concatenate([jnp.asarray(plane_xy, jnp.float32), jnp.zeros((h, w, 1))], -1)
  rotation = jnp.asarray(cam_rotation, jnp.float32)
  # Ego -> camera as the reference's RT = [R^T | -R^T t]: p_cam = R^T p - R^T t.
  offset = jnp.einsum('bnji,bnj->bni', rotation, jnp.asarray(cam_translation, jnp.float32))
  p_cam = (jnp.einsum('bnji,hwj->bnhwi', rotation, plane)
           - offset[:, :, None, None, :])                              # [B, N, h, w, 3]
  col = p_cam[..., 2] - patch_w / _IPM_DEPTH_OFFSET_DIV
  row = p_cam[..., 0] + patch_h / _IPM_LATERAL_OFFSET_DIV
  # The reference clips both corners into the patch and weights by the clipped corners; outside
  # [0, P - 1) both corners clip to the same index and the weights cancel, giving 0 (its float
  # result differs from 0 by rounding only). Computed here as an explicit mask.
  valid = (col >= 0) & (col < patch_w - 1) & (row >= 0) & (row < patch_h - 1)
  col = jnp.clip(col, 0.0, patch_w - 1.0)
  row = jnp.clip(row, 0.0, patch_h - 1.0)
  col0 = jnp.minimum(jnp.floor(col), patch_w - 2.0)
  row0 = jnp.minimum(jnp.floor(row), patch_h - 2.0)
  wc = (col - col0)[..., None]
  wr = (row - row0)[..., None]
  col0, row0 = col0.astype(jnp.int32), row0.astype(jnp.int32)
  s00, s01, s10, s11 = _gather_bilinear(patches, row0, col0, row0 + 1, col0 + 1)
  sample = ((1 - wr) * (1 - wc) * s00 + (1 - wr) * wc * s01 + wr * (1 - wc) * s10
            + wr * wc * s11)
  sample = jnp.where(valid[..., None], sample, 0.0)
  return jnp.max(sample, axis=1).astype(patches.dtype)


def bev_cell_centers(bev_x, bev_y, stride):
  """'metric': ego (x, y) of the cell centres of the canvas subsampled by `stride`.

  Args:
    bev_x, bev_y: (min, max, step) metres (config.data.bev_x / bev_y).
    stride: integer subsampling of the canvas; must divide its height and width.

  Returns:
    [H/stride, W/stride, 2] float32 (x, y); row i is y, column j is x (schema convention).
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  if height % stride or width % stride:
    raise ValueError(f'config.model.camera.ipm_stride={stride} must divide the BEV canvas '
                     f'{height}x{width} (config.data.bev_x / bev_y)')
  xs = bev_x[0] + (np.arange(width // stride) + 0.5) * bev_x[2] * stride
  ys = bev_y[0] + (np.arange(height // stride) + 0.5) * bev_y[2] * stride
  grid_x, grid_y = np.meshgrid(xs, ys)
  return np.stack([grid_x, grid_y], axis=-1).astype(np.float32)


def patch_extent(bev_x, bev_y, margin):
  """'metric': camera-frame ground extent of the view-MLP patch, covering the whole canvas.

  Returns:
    ((forward_min, forward_max), (lateral_min, lateral_max)) metres: forward from 0 to the
    canvas corner distance plus `margin` (cameras sit off the ego origin), lateral +-same.
  """
  reach = math.hypot(max(abs(bev_x[0]), abs(bev_x[1])), max(abs(bev_y[0]), abs(bev_y[1])))
  reach += margin
  return (0.0, reach), (-reach, reach)


def ipm_sample(patches, intrinsics, cam_rotation, cam_translation, cell_xy, *, image_hw,
               forward_range, lateral_range, ground_height):
  """'metric': samples camera-frame BEV patches at ego ground cells, max over seeing cameras.

  Args:
    patches: [B, N, Ph, Pw, C] per-camera patches; row r covers forward distance
      forward_min + (r + 0.5) * (forward_max - forward_min) / Ph, column c lateral
      (camera x, right) lateral_min + (c + 0.5) * (lateral_max - lateral_min) / Pw.
    intrinsics: [B, N, 3, 3] pixel intrinsics of the network input image.
    cam_rotation: [B, N, 3, 3] camera -> ego rotation.
    cam_translation: [B, N, 3] camera -> ego translation.
    cell_xy: [h, w, 2] ego (x, y) of the cells to fill.
    image_hw: (H, W) of the image the intrinsics refer to; cells projecting outside are unseen.
    forward_range, lateral_range: (min, max) metres of the patch.
    ground_height: ego z of the ground plane, metres.

  Returns:
    [B, h, w, C] in patches.dtype: per cell, the max over cameras that see it of the bilinear
    sample; 0 if none. Coordinates and interpolation weights are float32 whatever that dtype.
  """
  _, _, patch_h, patch_w, _ = patches.shape
  h, w = cell_xy.shape[:2]
  cell_xy = jnp.asarray(cell_xy, jnp.float32)
  ground = jnp.concatenate([cell_xy, jnp.full((h, w, 1), ground_height, jnp.float32)], -1)
  # Ego -> camera: p_cam = R^T (p_ego - t).
  rel = ground[None, None] - cam_translation[:, :, None, None, :]          # [B, N, h, w, 3]
  p_cam = jnp.einsum('bnji,bnhwj->bnhwi', cam_rotation, rel)
  depth = p_cam[..., 2]
  pix = jnp.einsum('bnij,bnhwj->bnhwi', intrinsics, p_cam)
  safe_depth = jnp.where(depth > _MIN_DEPTH, depth, 1.0)
  u, v = pix[..., 0] / safe_depth, pix[..., 1] / safe_depth
  in_image = (depth > _MIN_DEPTH) & (u >= 0) & (u < image_hw[1]) & (v >= 0) & (v < image_hw[0])

  row = (depth - forward_range[0]) / ((forward_range[1] - forward_range[0]) / patch_h) - 0.5
  col = (p_cam[..., 0] - lateral_range[0]) / ((lateral_range[1] - lateral_range[0]) / patch_w)
  col = col - 0.5
  in_patch = (row >= -0.5) & (row <= patch_h - 0.5) & (col >= -0.5) & (col <= patch_w - 0.5)
  valid = in_image & in_patch

  row = jnp.clip(row, 0.0, patch_h - 1.0)
  col = jnp.clip(col, 0.0, patch_w - 1.0)
  row0 = jnp.floor(row).astype(jnp.int32)
  col0 = jnp.floor(col).astype(jnp.int32)
  row1 = jnp.minimum(row0 + 1, patch_h - 1)
  col1 = jnp.minimum(col0 + 1, patch_w - 1)
  wr = (row - row0)[..., None]
  wc = (col - col0)[..., None]
  s00, s01, s10, s11 = _gather_bilinear(patches, row0, col0, row1, col1)
  sample = ((1 - wr) * (1 - wc) * s00 + (1 - wr) * wc * s01 + wr * (1 - wc) * s10
            + wr * wc * s11)
  sample = jnp.where(valid[..., None], sample, -jnp.inf)
  merged = jnp.max(sample, axis=1)
  merged = jnp.where(jnp.any(valid, axis=1)[..., None], merged, 0.0)
  return merged.astype(patches.dtype)


def _torch_uniform(fan_in):
  """torch nn.Linear's default init of weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


class ViewMLP(nn.Module):
  """One camera's MLP over its flattened perspective map, shared across channels.

  HDMapNet `ViewTransformation.hw_mat[i]`: Linear(h*w, Ph*Pw) -> ReLU, then
  (num_layers - 1) x (Linear(Ph*Pw, Ph*Pw) -> ReLU), with torch's default init. Layer l is
  'fc_<l>' (reference Sequential index 2 l).

  Attributes:
    patch_cells: Ph * Pw, cells of the output BEV patch.
    num_layers: Linear+ReLU layers (2 in HDMapNet).
    dtype: compute dtype (precision.compute_dtype); the kernels are stored float32.
  """
  patch_cells: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, C, F] (F = h*w, row-major) -> [B, C, patch_cells]."""
    for layer in range(self.num_layers):
      init = _torch_uniform(x.shape[-1])
      x = nn.relu(nn.Dense(self.patch_cells, dtype=self.dtype, kernel_init=init, bias_init=init,
                           name=f'fc_{layer}')(x))
    return x


class ViewTransform(nn.Module):
  """Per-camera 1/16 feature maps -> ego BEV on the canvas (view MLP, IPM, upsampling).

  Reads config.model.camera (view_transform, patch_divisor, view_mlp_layers; for 'metric' also
  patch_margin, ipm_stride, ground_height) and config.data (bev_x, bev_y).

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, features, batch, image_hw):
    """features: [B, N, h, w, C]; batch: cam_rotation, cam_translation ('metric': intrinsics).

    Args:
      image_hw: (H, W) of the network input ('metric' masks cells outside the image); a
        tuple, static under remat (CameraBEV).

    Returns:
      [B, Hb, Wb, C] in features.dtype, (Hb, Wb) = schema.bev_shape(bev_x, bev_y).
    """
    cfg, data = self.config.model.camera, self.config.data
    if cfg.view_transform not in VIEW_TRANSFORMS:
      raise ValueError(f'config.model.camera.view_transform={cfg.view_transform!r}; '
                       f'known: {VIEW_TRANSFORMS}')
    b, n, fh, fw, channels = features.shape
    canvas = schema.bev_shape(data.bev_x, data.bev_y)
    patch_h, patch_w = view_patch_shape(canvas, cfg.patch_divisor)
    # [B, N, C, h*w] as in the reference: each MLP runs over the row-major h*w axis.
    flat = features.reshape(b, n, fh * fw, channels).transpose(0, 1, 3, 2)
    patches = jnp.stack([
        ViewMLP(patch_h * patch_w, cfg.view_mlp_layers, dtype=features.dtype,
                name=f'hw_mat_{cam}')(flat[:, cam]) for cam in range(n)], axis=1)
    patches = patches.reshape(b, n, channels, patch_h, patch_w).transpose(0, 1, 3, 4, 2)
    if cfg.view_transform == 'hdmapnet':
      x_bound, y_bound, grid_hw = hdmapnet_ipm_bounds(canvas, (patch_h, patch_w))
      bev = hdmapnet_ipm(patches, batch['cam_rotation'], batch['cam_translation'],
                         hdmapnet_plane_grid(x_bound, y_bound, grid_hw))
      return resample.resize_bilinear_align_corners(bev, canvas)
    forward_range, lateral_range = patch_extent(data.bev_x, data.bev_y, cfg.patch_margin)
    bev = ipm_sample(patches, batch['intrinsics'], batch['cam_rotation'],
                     batch['cam_translation'],
                     bev_cell_centers(data.bev_x, data.bev_y, cfg.ipm_stride),
                     image_hw=image_hw, forward_range=forward_range,
                     lateral_range=lateral_range, ground_height=cfg.ground_height)
    return jax.image.resize(bev, (b, *canvas, channels), 'bilinear')


class CameraBEV(nn.Module):
  """Camera branch: six images -> ego BEV features on the canvas.

  Reads config.model.camera (image_encoder, channels, fusion_channels, resnet_widths, remat and
  the ViewTransform keys) and config.data (bev_x, bev_y). Submodules: the image encoder
  (reference `camencode`) and 'view_fusion' (reference `view_fusion` + `ipm` + `up_sampler`).
  With camera.remat the encoder's blocks and the view transform are recomputed in the backward
  (image_encoder.remat_block; same parameter names and function): the IPM's per-camera
  [B, N, Hb/2, Wb/2, C] bilinear samples are then not kept for the backward.

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch: images [B, N, H, W, 3], cam_rotation, cam_translation (+ intrinsics: 'metric').

    Returns:
      [B, Hb, Wb, camera.channels] with (Hb, Wb) = schema.bev_shape(bev_x, bev_y).
    """
    cfg = self.config.model.camera
    dtype = precision.compute_dtype(self.config)
    images = batch['images']
    b, n, height, width, _ = images.shape
    features = image_encoder.encoder_from_section(cfg, cfg.channels, dtype)(
        images.reshape(b * n, height, width, 3), train=train)
    features = features.reshape(b, n, *features.shape[1:])
    # Only the geometry enters the (possibly rematted) view transform, not the whole batch.
    geometry = {k: batch[k] for k in ('cam_rotation', 'cam_translation', 'intrinsics')
                if k in batch}
    view_cls = image_encoder.remat_block(ViewTransform, bool(cfg.get('remat', False)),
                                         static_argnums=(3,))
    return view_cls(self.config, name='view_fusion')(features, geometry, (height, width))
