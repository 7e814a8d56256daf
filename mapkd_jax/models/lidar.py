"""PointPillars LiDAR encoder (teacher): padded points -> [B, Hb, Wb, C] on the BEV canvas.

The reference function of HDMapNet `model/pointpillar.py` (`PointPillarEncoder`) and
`model/voxel.py` (`points_to_voxels`), which P-MapNet and MapKD reuse as `self.pp`:

- Cells: coord = int((v - min) / step) per axis, truncated toward zero like torch `.int()`,
  so a point up to one cell below a minimum still lands in cell 0. One z cell of height
  z_max - z_min (reference zbound [-10, 10, 20]): z is kept on (2 z_min - z_max, z_max).
  A point is invalid when its mask is False or a coord is < 0 or >= the grid size.
- 15 per-point features, in this order: raw 5 (x, y, z, intensity, dt); the number of VALID
  points in the point's pillar; xyz - pillar centroid; the pillar centroid; xyz - cell centre
  ((coord + 0.5) * step + min, z included).
- PointNet: 1x1 Conv1d 15 -> 64 without bias (a Dense here), BatchNorm1d, ReLU, times the
  validity mask. Scatter-MEAN (`torch_scatter.scatter_mean`) into pillars.
- Three PillarBlocks of 3x3 conv (no bias) + BN + ReLU: (64, 2 layers, stride 1),
  (128, 3, 2), (256, 3, 2), torch padding 1 on every side (not Flax 'SAME', which pads
  stride-2 convs only at the end); up1 conv-BN-ReLU on block 1; up2 / up3 bilinear x2 / x4
  upsampling with align_corners=True, then conv-BN-ReLU; concat (448); conv_out: 3x3 448->256,
  3x3 256->128 (BN, ReLU each), 1x1 -> out_channels with bias. BatchNorm: torch defaults.
- Layout: the reference grids pillars as [x, y] (`view(B, C, nx, ny)`) and transposes its
  output to [y, x]; convolution commutes with that transpose when each kernel is transposed
  too (convert/pointpillars.py does it), so here the grid is the BEV canvas itself: rows
  follow y, columns x (schema.py raster convention).

`padding='reference'` (default) also reproduces what the reference does with invalid points
(padding and points outside the grid): they are given pillar 0 (the cell at x_min, y_min);
their xyz enter pillar 0's centroid, they count in pillar 0's scatter-mean denominator (their
features are zero there), and their features enter the PointNet BatchNorm's batch statistics
in training. `padding='masked'` is the fix: invalid points go to a dropped dump segment and
BatchNorm statistics come from valid points only. With real LiDAR pillar 0 is a far corner
and usually empty, so eval outputs of the two differ little; training statistics differ
whenever many points fall outside the canvas.

Canvases not divisible by 4 (tiny configs) resize blocks 2 and 3 to the canvas size
(align_corners=True) instead of x2 / x4, which equals x2 / x4 whenever that is defined.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.data import schema
from mapkd_jax.models import batch_norm as torch_bn
from mapkd_jax.models import precision
from mapkd_jax.models.image_encoder import TORCH_BN
from mapkd_jax.models.image_encoder import remat_block
from mapkd_jax.models.resample import resize_bilinear_align_corners

PADDINGS = ('reference', 'masked')
TORCH_PAD = ((1, 1), (1, 1))   # torch Conv2d(padding=1), also for stride 2


def _check_padding(padding):
  if padding not in PADDINGS:
    raise ValueError(f'config.model.lidar.padding: {padding!r} is not one of {PADDINGS}')


def pillar_indices(xyz, mask, *, bev_x, bev_y, z_range, padding='reference'):
  """Pillar cell of each point on the BEV canvas, as the reference computes it.

  Args:
    xyz: [B, P, 3] ego-frame metres, float32.
    mask: [B, P] bool, False for padding.
    bev_x, bev_y: (min, max, step) metres; the canvas is `schema.bev_shape(bev_x, bev_y)`.
    z_range: (min, max) metres, one z cell.
    padding: 'reference' (invalid points -> pillar 0) or 'masked' (-> dump segment Hb * Wb).

  Returns:
    index: [B, P] int32, row * Wb + col for valid points.
    valid: [B, P] bool.
    coords: [B, P, 3] int32 (col, row, z cell), truncated toward zero, NOT cleared for
      invalid points (the reference's cell centres use them as they are).
  """
  _check_padding(padding)
  height, width = schema.bev_shape(bev_x, bev_y)
  lows = jnp.asarray([bev_x[0], bev_y[0], z_range[0]], jnp.float32)
  steps = jnp.asarray([bev_x[2], bev_y[2], z_range[1] - z_range[0]], jnp.float32)
  # float32 subtract then divide, cast truncating toward zero: torch's `.int()` bit for bit.
  coords = ((xyz.astype(jnp.float32) - lows) / steps).astype(jnp.int32)
  sizes = jnp.asarray([width, height, 1], jnp.int32)
  valid = mask & jnp.all((coords >= 0) & (coords < sizes), axis=-1)
  dump = 0 if padding == 'reference' else height * width
  index = jnp.where(valid, coords[..., 1] * width + coords[..., 0], dump)
  return index, valid, coords


def _segment_sum(values, index, num_segments):
  """Per-sample segment sum: [B, P, ...] values, [B, P] index -> [B, num_segments, ...]."""
  return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_segments))(values, index)


def scatter_mean(values, index, counted, num_pillars):
  """Per pillar: sum of `counted` points' values / number of counted points; empty -> zero.

  Args:
    values: [B, P, C].
    index: [B, P] int in [0, num_pillars]; num_pillars is a dump segment, dropped.
    counted: [B, P] bool; uncounted points add neither value nor count.
    num_pillars: number of real pillars (Hb * Wb).

  Returns:
    [B, num_pillars, C] in values.dtype; sums and counts are accumulated in float32.
    (`torch_scatter.scatter_mean` over all points with `counted` all True.)
  """
  weight = counted.astype(jnp.float32)
  total = _segment_sum(values.astype(jnp.float32) * weight[..., None], index, num_pillars + 1)
  count = _segment_sum(weight, index, num_pillars + 1)
  return (total / jnp.maximum(count, 1.0)[..., None])[:, :num_pillars].astype(values.dtype)


def _gather(per_pillar, index):
  """[B, N, ...] per-pillar values gathered at [B, P] indices (index N: zeros)."""
  pad = jnp.zeros_like(per_pillar[:, :1])
  table = jnp.concatenate([per_pillar, pad], axis=1)
  index = index.reshape(index.shape + (1,) * (table.ndim - 2))
  return jnp.take_along_axis(table, index, axis=1)


def point_features(points, mask, *, bev_x, bev_y, z_range, padding='reference'):
  """The 15 per-point PointPillars features and the pillar assignment.

  Args:
    points: [B, P, 5] (x, y, z, intensity, dt), ego frame.
    mask: [B, P] bool.
    bev_x, bev_y, z_range, padding: as in `pillar_indices`.

  Returns:
    features: [B, P, 15] float32 = raw 5, valid-point count of the pillar, xyz - pillar
      centroid, pillar centroid, xyz - cell centre. 'reference': computed for every point
      (invalid points with pillar 0's count and centroid, the centroid averaging ALL points
      given the pillar); 'masked': centroids of valid points, zero rows for invalid points.
    index, valid: as returned by `pillar_indices`.
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  num_pillars = height * width
  points = points.astype(jnp.float32)
  xyz = points[..., :3]
  index, valid, coords = pillar_indices(xyz, mask, bev_x=bev_x, bev_y=bev_y, z_range=z_range,
                                        padding=padding)
  counted = jnp.ones_like(valid) if padding == 'reference' else valid
  count = _segment_sum(valid.astype(jnp.float32), index, num_pillars + 1)[:, :num_pillars]
  centroid = _gather(scatter_mean(xyz, index, counted, num_pillars), index)
  lows = jnp.asarray([bev_x[0], bev_y[0], z_range[0]], jnp.float32)
  steps = jnp.asarray([bev_x[2], bev_y[2], z_range[1] - z_range[0]], jnp.float32)
  centre = (0.5 + coords.astype(jnp.float32)) * steps + lows
  features = jnp.concatenate(
      [points, _gather(count, index)[..., None], xyz - centroid, centroid, xyz - centre],
      axis=-1)
  if padding == 'masked':
    features = features * valid[..., None]
  return features, index, valid


def batch_norm(train, dtype, name=None):
  """BatchNorm with torch's defaults (eps 1e-5, torch momentum 0.1 = Flax 0.9)."""
  return torch_bn.BatchNorm(use_running_average=not train, momentum=TORCH_BN['bn_momentum'],
                           epsilon=TORCH_BN['bn_eps'], dtype=dtype, name=name)


class PillarConv(nn.Module):
  """torch Conv2d(3, stride, padding=1, bias=False) + BatchNorm2d + ReLU. [B, H, W, C] ->
  [B, ceil(H / stride), ceil(W / stride), features]. Submodules 'conv', 'bn'."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), strides=self.stride, padding=TORCH_PAD, use_bias=False,
                dtype=self.dtype, name='conv')(x)
    return nn.relu(batch_norm(train, self.dtype, name='bn')(x))


class PointPillars(nn.Module):
  """LiDAR points -> BEV features.

  Submodule names (convert/pointpillars.py maps the reference's onto them):
    pointnet (Dense), pointnet_bn; block{k}_{l} (PillarConv, block k = 1.., layer l = 0..);
    up{k} (PillarConv after the upsampling); out_{j} (PillarConv, head_channels); out (1x1).

  Attributes:
    bev_x, bev_y: (min, max, step) metres of the canvas (= the pillar grid).
    z_range: (min, max) metres: the one z cell.
    pointnet_channels: PointNet width (64).
    block_channels, block_layers, block_strides: the strided pillar conv blocks
      (reference (64, 128, 256), (2, 3, 3), (1, 2, 2)).
    head_channels: 3x3 convs after the concatenation (reference (256, 128)).
    out_channels: output channels (128), a 1x1 conv with bias.
    padding: 'reference' or 'masked' (module docstring).
    dtype: compute dtype of the feature layers; point geometry, pillar indices and the
      scatter sums stay float32 / int32.
    remat: recompute each PillarConv in the backward (image_encoder.remat_block; same names
      and function). The per-point PointNet is not rematted.
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
  padding: str = 'reference'
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, points, mask, *, train: bool):
    """points: [B, P, 5], mask: [B, P] bool -> [B, Hb, Wb, out_channels]."""
    if not (len(self.block_channels) == len(self.block_layers) == len(self.block_strides)):
      raise ValueError('config.model.lidar: block_channels, block_layers and block_strides '
                       'must have equal lengths')
    if points.ndim != 3 or points.shape[-1] != 5 or mask.shape != points.shape[:2]:
      raise ValueError(f'PointPillars: lidar_points must be [B, P, 5] and lidar_mask [B, P], '
                       f'got {points.shape} and {mask.shape}')
    height, width = schema.bev_shape(self.bev_x, self.bev_y)
    features, index, valid = point_features(points, mask, bev_x=self.bev_x, bev_y=self.bev_y,
                                            z_range=self.z_range, padding=self.padding)
    x = nn.Dense(self.pointnet_channels, use_bias=False, dtype=self.dtype,
                 name='pointnet')(features)
    bn = batch_norm(train, self.dtype, name='pointnet_bn')
    # 'reference': statistics over every point, padding included, as torch's BatchNorm1d sees
    # them; 'masked': valid points only.
    x = bn(x) if self.padding == 'reference' else bn(x, mask=valid[..., None])
    x = nn.relu(x) * valid[..., None].astype(x.dtype)
    counted = jnp.ones_like(valid) if self.padding == 'reference' else valid
    x = scatter_mean(x, index, counted, height * width)
    x = x.reshape(points.shape[0], height, width, self.pointnet_channels)
    pillar_conv = remat_block(PillarConv, self.remat)
    branches = []
    for k, (channels, layers, stride) in enumerate(
        zip(self.block_channels, self.block_layers, self.block_strides), start=1):
      for layer in range(layers):
        x = pillar_conv(channels, stride=stride if layer == 0 else 1, dtype=self.dtype,
                        name=f'block{k}_{layer}')(x, train)
      up = x if x.shape[1:3] == (height, width) else resize_bilinear_align_corners(
          x, (height, width))
      branches.append(pillar_conv(channels, dtype=self.dtype, name=f'up{k}')(up, train))
    x = jnp.concatenate(branches, axis=-1)
    for j, channels in enumerate(self.head_channels):
      x = pillar_conv(channels, dtype=self.dtype, name=f'out_{j}')(x, train)
    return nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name='out')(x)


def from_config(config, name=None):
  """PointPillars for a full config (config.data BEV ranges, config.model.lidar); `name` names
  the submodule."""
  cfg = config.model.lidar
  return PointPillars(
      bev_x=tuple(config.data.bev_x), bev_y=tuple(config.data.bev_y),
      z_range=tuple(cfg.z_range), pointnet_channels=cfg.pointnet_channels,
      block_channels=tuple(cfg.block_channels), block_layers=tuple(cfg.block_layers),
      block_strides=tuple(cfg.block_strides), head_channels=tuple(cfg.head_channels),
      out_channels=cfg.out_channels, padding=cfg.get('padding', 'reference'),
      dtype=precision.compute_dtype(config), remat=bool(cfg.get('remat', False)), name=name)
