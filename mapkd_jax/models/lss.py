"""Lift-splat (LSS) simulated LiDAR for the coach.

Lift: an own image encoder predicts, per 1/16 feature cell, a softmax over depth bins and a
context vector; their outer product places context at each depth along the pixel's ray.
Splat: the frustum points (intrinsics/extrinsics from the batch) are summed into the ego
BEV canvas with `jax.ops.segment_sum` over flat cell indices; points outside the canvas or
the z range go to one extra dump segment (static shapes, no boolean indexing). A 1x1 conv
then maps the context channels to the LiDAR channel count so LSS takes the LiDAR's slot.

Geometry as the reference (MapKD model/lift_splat.py, from lift-splat-shoot: `create_frustum`,
`get_geometry`, `voxel_pooling`) computes it, so converted weights see the same BEV: feature
cell (i, j) looks through image pixel (linspace(0, W - 1, fw)[j], linspace(0, H - 1, fh)[i]),
and voxel indices are truncated toward zero (torch `.long()`), not floored.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mapkd_jax.data import schema
from mapkd_jax.models import image_encoder, precision


def depth_values(depth_bins):
  """Bin depths for (min, max, step) metres: min, min + step, ... (< max); 41 for (4, 45, 1)."""
  count = int(round((depth_bins[1] - depth_bins[0]) / depth_bins[2]))
  if count < 1:
    raise ValueError(f'config.model.lss.depth_bins={depth_bins} gives no depth bins')
  return (depth_bins[0] + np.arange(count) * depth_bins[2]).astype(np.float32)


def frustum_points(intrinsics, cam_rotation, cam_translation, depths, *, feature_hw, image_hw):
  """Ego-frame 3D points of every (depth bin, feature cell) of every camera.

  The feature cell (i, j) of an [fh, fw] map looks along the ray through image pixel
  u = j * (W - 1) / (fw - 1), v = i * (H - 1) / (fh - 1): the reference frustum's
  `linspace(0, W - 1, fw)`, corner pixels at the corner cells (0 when fw or fh is 1).
  The reference undoes its resize (post_rots) and then applies the original intrinsics; with
  intrinsics of the resized image, as here, that is the same ray.

  Args:
    intrinsics: [B, N, 3, 3] of the network input image.
    cam_rotation: [B, N, 3, 3] camera -> ego; cam_translation: [B, N, 3].
    depths: [D] metres along the camera z axis.
    feature_hw: (fh, fw) of the feature map; image_hw: (H, W) of the image.

  Returns:
    [B, N, D, fh, fw, 3] ego (x, y, z).
  """
  fh, fw = feature_hw
  us = np.linspace(0.0, image_hw[1] - 1, fw)
  vs = np.linspace(0.0, image_hw[0] - 1, fh)
  grid_u, grid_v = np.meshgrid(us, vs)
  pixels = np.stack([grid_u, grid_v, np.ones_like(grid_u)], -1).astype(np.float32)  # [fh, fw, 3]
  rays = jnp.einsum('bnij,hwj->bnhwi', jnp.linalg.inv(intrinsics), pixels)       # z = 1
  points_cam = jnp.asarray(depths)[None, None, :, None, None, None] * rays[:, :, None]
  points_ego = jnp.einsum('bnij,bndhwj->bndhwi', cam_rotation, points_cam)
  return points_ego + cam_translation[:, :, None, None, None, :]


def splat(features, points, *, bev_x, bev_y, z_range):
  """Sums point features into the BEV canvas; out-of-range points are dropped.

  Args:
    features: [B, ..., C] one feature vector per point.
    points: [B, ..., 3] ego (x, y, z) of each point (same middle shape as features).
    bev_x, bev_y: (min, max, step) metres of the canvas.
    z_range: (min, max) metres: the reference's single z bin, zbound = (min, max, max - min).

  Returns:
    [B, Hb, Wb, C] in features.dtype: cell (i, j) holds the sum over points with
    trunc((y - y_min) / ry) = i, trunc((x - x_min) / rx) = j and trunc((z - z_min) /
    (z_max - z_min)) = 0. Truncation toward zero is the reference's `.long()`: points less
    than one cell below a minimum land in cell 0, so z is kept on (2 z_min - z_max, z_max).
    The sum is accumulated in float32 (many points per cell would lose precision in
    bfloat16).
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  batch, channels = features.shape[0], features.shape[-1]
  features = features.reshape(batch, -1, channels)
  points = points.reshape(batch, -1, 3)
  col = jnp.trunc((points[..., 0] - bev_x[0]) / bev_x[2]).astype(jnp.int32)
  row = jnp.trunc((points[..., 1] - bev_y[0]) / bev_y[2]).astype(jnp.int32)
  level = jnp.trunc((points[..., 2] - z_range[0]) / (z_range[1] - z_range[0]))
  inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (level == 0)
  cells = height * width
  flat = jnp.arange(batch, dtype=jnp.int32)[:, None] * cells + row * width + col
  dump = batch * cells   # one extra segment collects every dropped point
  flat = jnp.where(inside, flat, dump)
  summed = jax.ops.segment_sum(features.reshape(-1, channels).astype(jnp.float32),
                               flat.reshape(-1), num_segments=dump + 1)
  return summed[:dump].reshape(batch, height, width, channels).astype(features.dtype)


class LiftSplat(nn.Module):
  """Images -> simulated-LiDAR BEV features [B, Hb, Wb, lss.out_channels].

  Reads config.model.lss (image_encoder, fusion_channels, resnet_widths, depth_bins,
  context_channels, z_range, out_channels; remat: the encoder's blocks recomputed in the
  backward, image_encoder.remat_block) and config.data (bev_x, bev_y).

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch: images [B, N, H, W, 3], intrinsics, cam_rotation, cam_translation.

    Returns:
      [B, Hb, Wb, lss.out_channels].
    """
    cfg, data = self.config.model.lss, self.config.data
    dtype = precision.compute_dtype(self.config)
    images = batch['images']
    b, n, height, width, _ = images.shape
    depths = depth_values(cfg.depth_bins)
    num_depths = depths.shape[0]
    x = image_encoder.encoder_from_section(cfg, num_depths + cfg.context_channels, dtype)(
        images.reshape(b * n, height, width, 3), train=train)
    _, fh, fw, _ = x.shape
    x = x.reshape(b, n, fh, fw, -1)
    # Softmax in float32 (bfloat16 rounds small bin probabilities away), then the compute dtype.
    depth_prob = jax.nn.softmax(x[..., :num_depths].astype(jnp.float32), axis=-1).astype(dtype)
    context = x[..., num_depths:]
    # [B, N, D, fh, fw, C]: context placed at every depth, weighted by its probability.
    lifted = jnp.einsum('bnhwd,bnhwc->bndhwc', depth_prob, context)
    points = frustum_points(batch['intrinsics'], batch['cam_rotation'],
                            batch['cam_translation'], depths, feature_hw=(fh, fw),
                            image_hw=(height, width))
    bev = splat(lifted, points, bev_x=data.bev_x, bev_y=data.bev_y, z_range=cfg.z_range)
    return nn.Conv(cfg.out_channels, (1, 1), dtype=dtype)(bev)
