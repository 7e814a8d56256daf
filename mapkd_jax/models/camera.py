"""HDMapNet-style camera branch: image encoder -> per-camera view MLP -> IPM -> ego BEV.

Each camera's 1/16 feature map is flattened over space; a per-camera MLP maps it to a BEV
patch in that camera's ground frame (rows: forward = camera z, cols: lateral = camera x,
both in metres). Inverse perspective mapping then looks up, for every ego BEV cell on the
ground plane, the camera-frame position of that cell (extrinsics from the batch) and samples
the patch bilinearly; cells outside the patch or outside the camera's image (intrinsics from
the batch) are -inf before the max over cameras and 0 where no camera sees them.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mapkd_jax.data import schema
from mapkd_jax.models import image_encoder, precision

# Points closer than this to the camera plane (metres) count as behind the camera.
_MIN_DEPTH = 1e-3


def bev_cell_centers(bev_x, bev_y, stride):
  """Ego (x, y) of the cell centres of the canvas subsampled by `stride`.

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
  """Camera-frame ground extent of the view-MLP patch, covering the whole canvas.

  Returns:
    ((forward_min, forward_max), (lateral_min, lateral_max)) metres: forward from 0 to the
    canvas corner distance plus `margin` (cameras sit off the ego origin), lateral +-same.
  """
  reach = math.hypot(max(abs(bev_x[0]), abs(bev_x[1])), max(abs(bev_y[0]), abs(bev_y[1])))
  reach += margin
  return (0.0, reach), (-reach, reach)


def ipm_sample(patches, intrinsics, cam_rotation, cam_translation, cell_xy, *, image_hw,
               forward_range, lateral_range, ground_height):
  """Samples camera-frame BEV patches at ego ground cells and merges cameras by max.

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
  batch, cams, patch_h, patch_w, channels = patches.shape
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
  flat = patches.reshape(batch, cams, patch_h * patch_w, channels)

  def gather(r, c):
    index = (r * patch_w + c).reshape(batch, cams, h * w, 1)
    return jnp.take_along_axis(flat, index, axis=2).reshape(batch, cams, h, w, channels)

  sample = ((1 - wr) * (1 - wc) * gather(row0, col0) + (1 - wr) * wc * gather(row0, col1)
            + wr * (1 - wc) * gather(row1, col0) + wr * wc * gather(row1, col1))
  sample = jnp.where(valid[..., None], sample, -jnp.inf)
  merged = jnp.max(sample, axis=1)
  merged = jnp.where(jnp.any(valid, axis=1)[..., None], merged, 0.0)
  return merged.astype(patches.dtype)


class ViewMLP(nn.Module):
  """Per-camera MLP over the flattened perspective map, shared across channels (HDMapNet).

  Attributes:
    patch_cells: Ph * Pw, cells of the output BEV patch.
    num_layers: Linear+ReLU layers (2 in HDMapNet).
    dtype: compute dtype (precision.compute_dtype); the kernels are stored float32.
  """
  patch_cells: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    """features: [B, N, F, C] (F = h*w) -> [B, N, patch_cells, C]."""
    cams = features.shape[1]
    x = features
    for layer in range(self.num_layers):
      fan_in = x.shape[2]
      kernel = self.param(f'kernel_{layer}', nn.initializers.lecun_normal(batch_axis=(0,)),
                          (cams, fan_in, self.patch_cells))
      bias = self.param(f'bias_{layer}', nn.initializers.zeros, (cams, self.patch_cells))
      x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
      x = nn.relu(jnp.einsum('bnfc,nfo->bnoc', x, kernel) + bias[None, :, :, None])
    return x


class CameraBEV(nn.Module):
  """Camera branch: six images -> ego BEV features on the canvas.

  Reads config.model.camera (image_encoder, channels, fusion_channels, resnet_widths,
  patch_shape, patch_margin, view_mlp_layers, ipm_stride, ground_height) and config.data
  (bev_x, bev_y).

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch: images [B, N, H, W, 3], intrinsics, cam_rotation, cam_translation.

    Returns:
      [B, Hb, Wb, camera.channels] with (Hb, Wb) = schema.bev_shape(bev_x, bev_y).
    """
    cfg, data = self.config.model.camera, self.config.data
    dtype = precision.compute_dtype(self.config)
    images = batch['images']
    b, n, height, width, _ = images.shape
    features = image_encoder.encoder_from_section(cfg, cfg.channels, dtype)(
        images.reshape(b * n, height, width, 3), train=train)
    _, fh, fw, channels = features.shape
    patch_h, patch_w = cfg.patch_shape
    patches = ViewMLP(patch_h * patch_w, cfg.view_mlp_layers, dtype=dtype)(
        features.reshape(b, n, fh * fw, channels))
    patches = patches.reshape(b, n, patch_h, patch_w, channels)
    forward_range, lateral_range = patch_extent(data.bev_x, data.bev_y, cfg.patch_margin)
    bev = ipm_sample(patches, batch['intrinsics'], batch['cam_rotation'],
                     batch['cam_translation'],
                     bev_cell_centers(data.bev_x, data.bev_y, cfg.ipm_stride),
                     image_hw=(height, width), forward_range=forward_range,
                     lateral_range=lateral_range, ground_height=cfg.ground_height)
    canvas = schema.bev_shape(data.bev_x, data.bev_y)
    return jax.image.resize(bev, (b, *canvas, channels), 'bilinear')
