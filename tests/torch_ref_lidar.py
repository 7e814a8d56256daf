"""Torch reference of the teacher's PointPillars (HDMapNet `PointPillarEncoder`, P-MapNet `pp.`).

Written here from the reference's documented behaviour (see mapkd_jax/models/lidar.py for the
facts): the [x, y] pillar grid with the output transposed to [y, x], invalid points sent to
pillar 0, truncating `.int()` cells, scatter-mean via `scatter_add_` (torch_scatter is not a
dependency). Module names equal the reference's, so its state dict names are the real ones.
"""
import numpy as np
import torch
from torch import nn


def _scatter_sum(values, index, size):
  """values [B, P, ...], index [B, P] -> [B, size, ...] sums."""
  out = values.new_zeros((values.shape[0], size) + values.shape[2:])
  idx = index.view(index.shape + (1,) * (values.ndim - 2)).expand_as(values)
  return out.scatter_add_(1, idx, values)


def _scatter_mean(values, index, size):
  """torch_scatter.scatter_mean along dim 1: empty segments 0 (count clamped to 1)."""
  total = _scatter_sum(values, index, size)
  count = _scatter_sum(torch.ones_like(index, dtype=values.dtype), index, size).clamp(min=1)
  return total / count.view(count.shape + (1,) * (values.ndim - 2))


def points_to_voxels(xyz, mask, xbound, ybound, zbound):
  """The reference's voxel bookkeeping. xyz [B, P, 3], mask [B, P] float."""
  batch, num_points, _ = xyz.shape
  grid = np.array([(b[1] - b[0]) / b[2] for b in (xbound, ybound, zbound)]).astype('int32')
  size = torch.tensor([xbound[2], ybound[2], zbound[2]], dtype=torch.float32)
  offset = torch.tensor([xbound[0], ybound[0], zbound[0]], dtype=torch.float32)
  coords = ((xyz - offset) / size).int()
  grid_t = torch.from_numpy(grid).int()
  padding = (mask < 1.0) | torch.any((coords >= grid_t) | (coords < 0), dim=-1)
  # x-major flat index: (cx * ny + cy) * nz + cz
  flat = (coords[..., 0] * int(grid[1]) + coords[..., 1]) * int(grid[2]) + coords[..., 2]
  index = torch.where(padding, torch.zeros_like(flat), flat).long()
  num_voxels = int(np.prod(grid))
  centres = (0.5 + coords.float()) * size + offset
  keep = 1.0 - padding.float()
  per_voxel = _scatter_sum(keep, index, num_voxels)
  count = torch.gather(per_voxel, 1, index)
  centroids = _scatter_mean(xyz, index, num_voxels)
  point_centroids = torch.gather(centroids, 1, index.unsqueeze(-1).repeat(1, 1, 3))
  return dict(index=index, count=count, centroids=point_centroids, centres=centres,
              mask=keep, num_voxels=num_voxels, grid=grid)


def _cbr(cin, cout, stride=1):
  return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
          nn.ReLU(inplace=True)]


class PillarBlock(nn.Module):
  def __init__(self, cin, cout, num_layers, stride):
    super().__init__()
    layers = []
    for i in range(num_layers):
      layers += _cbr(cin if i == 0 else cout, cout, stride if i == 0 else 1)
    self.layers = nn.Sequential(*layers)

  def forward(self, x):
    return self.layers(x)


class PointNet(nn.Module):
  def __init__(self, cin=15, cout=64):
    super().__init__()
    self.pointnet = nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout),
                                  nn.ReLU(inplace=True))

  def forward(self, feats, mask):
    return self.pointnet(feats.permute(0, 2, 1)) * mask.unsqueeze(1)


class PointPillarEncoder(nn.Module):
  """[B, P, 5] points, [B, P] mask -> [B, C, ny, nx] (the reference's transposed output)."""

  def __init__(self, out_channels, xbound, ybound, zbound, pointnet=64,
               blocks=(64, 128, 256), head=(256, 128)):
    """Reference widths by default; smaller `pointnet` / `blocks` / `head` keep every layer and
    name (tests run the 200 x 400 grid at reduced width)."""
    super().__init__()
    self.bounds = (xbound, ybound, zbound)
    c1, c2, c3 = blocks
    self.pn = PointNet(15, pointnet)
    self.block1 = PillarBlock(pointnet, c1, 2, 1)
    self.block2 = PillarBlock(c1, c2, 3, 2)
    self.block3 = PillarBlock(c2, c3, 3, 2)
    self.up1 = nn.Sequential(*_cbr(c1, c1))
    self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
                             *_cbr(c2, c2))
    self.up3 = nn.Sequential(nn.Upsample(scale_factor=4, mode='bilinear', align_corners=True),
                             *_cbr(c3, c3))
    self.conv_out = nn.Sequential(*_cbr(c1 + c2 + c3, head[0]), *_cbr(head[0], head[1]),
                                  nn.Conv2d(head[1], out_channels, 1))

  def features(self, points, mask):
    """[B, P, 15] point features, voxel dict."""
    xyz = points[..., :3]
    vox = points_to_voxels(xyz, mask, *self.bounds)
    feats = torch.cat([points, vox['count'].unsqueeze(-1), xyz - vox['centroids'],
                       vox['centroids'], xyz - vox['centres']], dim=-1)
    return feats, vox

  def forward(self, points, mask):
    feats, vox = self.features(points, mask)
    feats = self.pn(feats, vox['mask'])                      # [B, 64, P]
    pillars = _scatter_mean(feats.permute(0, 2, 1), vox['index'], vox['num_voxels'])
    x = pillars.permute(0, 2, 1).reshape(points.shape[0], -1, int(vox['grid'][0]),
                                         int(vox['grid'][1]))
    x1 = self.block1(x)
    x2 = self.block2(x1)
    x3 = self.block3(x2)
    x = torch.cat([self.up1(x1), self.up2(x2), self.up3(x3)], dim=1)
    return self.conv_out(x).transpose(3, 2)
