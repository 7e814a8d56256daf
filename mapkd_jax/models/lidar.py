"""PointPillars LiDAR encoder (teacher): padded points -> [B, Hb, Wb, C] on the BEV canvas.

Follows HDMapNet `model/pointpillar.py` + `model/voxel.py` (reused by P-MapNet and MapKD):
15 per-point features (raw 5, pillar point count, offset to the pillar's point mean, the point
mean itself, offset to the pillar centre), a 1-layer PointNet (dense + BN + ReLU, 64 ch),
scatter-MEAN into pillars (`torch_scatter.scatter_mean` there, not max), three strided conv
blocks, upsample + concatenate, and a conv head to `out_channels`.

Departures, both fixes: the reference sends padded points to pillar 0 and still counts them
in its mean; here they go to a dump segment that is dropped. Its BatchNorm statistics include
padded points; here they come from valid points only (BatchNorm `mask`). The pillar grid is the
BEV canvas itself, so rows follow y and columns x (schema.py raster convention) and no
transpose is needed.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.data import schema
from mapkd_jax.models import precision


def pillar_indices(xyz, mask, *, bev_x, bev_y, z_range):
  """Flat pillar index of each point on the BEV canvas.

  Args:
    xyz: [B, P, 3] ego-frame metres.
    mask: [B, P] bool, False for padding.
    bev_x, bev_y: (min, max, step) metres; the canvas is `schema.bev_shape(bev_x, bev_y)`.
    z_range: (min, max) metres; points outside are dropped.

  Returns:
    index: [B, P] int32 in [0, Hb * Wb]; row * Wb + col for kept points, Hb * Wb (the dump
      segment) for padded or out-of-range points.
    valid: [B, P] bool, the kept points.
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  col = jnp.floor((xyz[..., 0] - bev_x[0]) / bev_x[2]).astype(jnp.int32)
  row = jnp.floor((xyz[..., 1] - bev_y[0]) / bev_y[2]).astype(jnp.int32)
  valid = (mask & (col >= 0) & (col < width) & (row >= 0) & (row < height)
           & (xyz[..., 2] >= z_range[0]) & (xyz[..., 2] < z_range[1]))
  index = jnp.where(valid, row * width + col, height * width)
  return index, valid


def _segment_sum(values, index, num_segments):
  """Per-sample segment sum: [B, P, ...] values, [B, P] index -> [B, num_segments, ...]."""
  return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_segments))(values, index)


def scatter_mean(values, index, valid, num_pillars):
  """Mean of the valid points' values per pillar; empty pillars are zero.

  Args:
    values: [B, P, C].
    index: [B, P] int in [0, num_pillars]; num_pillars is the dump segment.
    valid: [B, P] bool; invalid points contribute nothing.
    num_pillars: number of real pillars (Hb * Wb).

  Returns:
    [B, num_pillars, C] in values.dtype; sums and counts are accumulated in float32.
  """
  weight = valid.astype(jnp.float32)
  total = _segment_sum(values.astype(jnp.float32) * weight[..., None], index, num_pillars + 1)
  count = _segment_sum(weight, index, num_pillars + 1)
  return (total / jnp.maximum(count, 1.0)[..., None])[:, :num_pillars].astype(values.dtype)


def point_features(points, mask, *, bev_x, bev_y, z_range):
  """The 15 per-point PointPillars features and the pillar assignment.

  Args:
    points: [B, P, 5] (x, y, z, intensity, dt), ego frame.
    mask: [B, P] bool.
    bev_x, bev_y, z_range: as in `pillar_indices`.

  Returns:
    features: [B, P, 15] = raw 5, pillar point count, xyz - pillar point mean, pillar point
      mean, xyz - pillar centre; zero for invalid points.
    index, valid: as returned by `pillar_indices`.
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  num_pillars = height * width
  xyz = points[..., :3]
  index, valid = pillar_indices(xyz, mask, bev_x=bev_x, bev_y=bev_y, z_range=z_range)
  weight = valid.astype(points.dtype)
  count = _segment_sum(weight, index, num_pillars + 1)
  mean_xyz = scatter_mean(xyz, index, valid, num_pillars)
  # Re-append a dump row so invalid points can gather with their (out-of-canvas) index.
  mean_xyz = jnp.concatenate([mean_xyz, jnp.zeros_like(mean_xyz[:, :1])], axis=1)
  point_count = jnp.take_along_axis(count, index, axis=1)[..., None]
  point_mean = jnp.take_along_axis(mean_xyz, index[..., None], axis=1)
  col = jnp.floor((xyz[..., 0] - bev_x[0]) / bev_x[2])
  row = jnp.floor((xyz[..., 1] - bev_y[0]) / bev_y[2])
  centre = jnp.stack([bev_x[0] + (col + 0.5) * bev_x[2],
                      bev_y[0] + (row + 0.5) * bev_y[2],
                      jnp.full_like(col, 0.5 * (z_range[0] + z_range[1]))], axis=-1)
  features = jnp.concatenate(
      [points, point_count, xyz - point_mean, point_mean, xyz - centre], axis=-1)
  return features * weight[..., None], index, valid


class ConvBNReLU(nn.Module):
  """3x3 (or `kernel`) conv without bias, BatchNorm, ReLU. x: [B, H, W, C]."""
  features: int
  stride: int = 1
  kernel: int = 3
  dtype: Any = jnp.float32   # compute dtype (precision.compute_dtype); params stay float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                padding='SAME', use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    return nn.relu(x)


class PointPillars(nn.Module):
  """LiDAR points -> BEV features.

  Attributes:
    bev_x, bev_y: (min, max, step) metres of the canvas (= the pillar grid).
    z_range: (min, max) metres of kept point heights.
    pointnet_channels: PointNet width (64).
    block_channels, block_layers, block_strides: the strided pillar conv blocks
      (reference (64, 128, 256), (2, 3, 3), (1, 2, 2)).
    head_channels: 3x3 convs after the concatenation (reference (256, 128)).
    out_channels: output channels (128), a 1x1 conv.
    dtype: compute dtype of the feature layers; point geometry and pillar indices stay
      float32 / int32.
  """
  bev_x: Sequence[float]
  bev_y: Sequence[float]
  z_range: Sequence[float]
  pointnet_channels: int
  block_channels: Sequence[int]
  block_layers: Sequence[int]
  block_strides: Sequence[int]
  head_channels: Sequence[int]
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, points, mask, *, train: bool):
    """points: [B, P, 5], mask: [B, P] bool -> [B, Hb, Wb, out_channels]."""
    if not (len(self.block_channels) == len(self.block_layers) == len(self.block_strides)):
      raise ValueError('config.model.lidar: block_channels, block_layers and block_strides '
                       'must have equal lengths')
    height, width = schema.bev_shape(self.bev_x, self.bev_y)
    features, index, valid = point_features(points, mask, bev_x=self.bev_x, bev_y=self.bev_y,
                                            z_range=self.z_range)
    x = nn.Dense(self.pointnet_channels, use_bias=False, dtype=self.dtype)(features)
    # Statistics from valid points only; padding would otherwise pull them towards zero.
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x, mask=valid[..., None])
    x = nn.relu(x) * valid[..., None]
    pillars = scatter_mean(x, index, valid, height * width)
    x = pillars.reshape(points.shape[0], height, width, self.pointnet_channels)
    branches = []
    for channels, layers, stride in zip(self.block_channels, self.block_layers,
                                        self.block_strides):
      for layer in range(layers):
        x = ConvBNReLU(channels, stride=stride if layer == 0 else 1, dtype=self.dtype)(
            x, train=train)
      # Resize to the canvas (not a fixed x2/x4) so canvases not divisible by 4 work.
      up = x
      if x.shape[1:3] != (height, width):
        up = jax.image.resize(x, (x.shape[0], height, width, channels), method='bilinear')
      branches.append(ConvBNReLU(channels, dtype=self.dtype)(up, train=train))
    x = jnp.concatenate(branches, axis=-1)
    for channels in self.head_channels:
      x = ConvBNReLU(channels, dtype=self.dtype)(x, train=train)
    return nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)


def from_config(config, name=None):
  """PointPillars for a full config (config.data BEV ranges, config.model.lidar); `name` names
  the submodule."""
  cfg = config.model.lidar
  return PointPillars(
      bev_x=tuple(config.data.bev_x), bev_y=tuple(config.data.bev_y),
      z_range=tuple(cfg.z_range), pointnet_channels=cfg.pointnet_channels,
      block_channels=tuple(cfg.block_channels), block_layers=tuple(cfg.block_layers),
      block_strides=tuple(cfg.block_strides), head_channels=tuple(cfg.head_channels),
      out_channels=cfg.out_channels, dtype=precision.compute_dtype(config), name=name)
