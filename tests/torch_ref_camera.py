"""PyTorch side of the camera parity tests: HDMapNet's view transform, written here.

Written from the facts of the public reference (HDMapNet model/hdmapnet.py `ViewTransformation`,
`HDMapNet.__init__` sizes and `get_Ks_RTs_and_post_RTs`, model/homography.py `IPM` with
extrinsic=True, `plane_grid`, `perspective`, `bilinear_sampler`; P-MapNet and MapKD copy them
unchanged), with the reference's module names, so `state_dict()` has the checkpoint's names
(`hw_mat.<i>.0` / `.2`, under `view_fusion.` in the full models). Arithmetic follows the
reference step by step: 4x4 ego->camera matrices, the clip-then-weight bilinear sampler and
the max over cameras of the warped maps, so its float behaviour is the reference's.

Lift-splat (the coach's simulated LiDAR; MapKD model/lift_splat.py from lift-splat-shoot):
`create_frustum`, `get_geometry` (post_rots/post_trans undo the resize, then the original
intrinsics) and `voxel_pooling` (`.long()` indices, the cumsum trick), with gen_dx_bx's
dx / bx / nx.

Only tests import this file (torch is a test / converter dependency).
"""
import torch
import torch.nn.functional as F
from torch import nn


def hdmapnet_sizes(image_hw, canvas_hw, downsample=16):
  """(fv_size, bv_size, ipm_xbound, ipm_ybound) as HDMapNet.__init__ computes them."""
  final_h, final_w = canvas_hw
  fv_size = (image_hw[0] // downsample, image_hw[1] // downsample)
  bv_size = (final_h // 5, final_w // 5)
  res_x = bv_size[1] * 3 // 4
  return (fv_size, bv_size, [-res_x, res_x, 4 * res_x / final_w],
          [-res_x / 2, res_x / 2, 2 * res_x / final_h])


class ViewTransformation(nn.Module):
  """Per camera: Linear(fv_dim, bv_dim), ReLU, Linear(bv_dim, bv_dim), ReLU over h*w."""

  def __init__(self, fv_size, bv_size, n_views=6):
    super().__init__()
    self.bv_size = tuple(bv_size)
    fv_dim, bv_dim = fv_size[0] * fv_size[1], bv_size[0] * bv_size[1]
    self.hw_mat = nn.ModuleList([
        nn.Sequential(nn.Linear(fv_dim, bv_dim), nn.ReLU(), nn.Linear(bv_dim, bv_dim), nn.ReLU())
        for _ in range(n_views)])

  def forward(self, feat):
    """feat [B, N, C, h, w] -> [B, N, C, Ph, Pw]."""
    b, n, c = feat.shape[:3]
    flat = feat.reshape(b, n, c, -1)
    return torch.stack([self.hw_mat[i](flat[:, i]).reshape(b, c, *self.bv_size)
                        for i in range(n)], dim=1)


def plane_points(xbound, ybound):
  """[4, h*w] homogeneous ground points (x, y, 0, 1); row-major over (y rows, x columns)."""
  num_x = int((xbound[1] - xbound[0]) / xbound[2])
  num_y = int((ybound[1] - ybound[0]) / ybound[2])
  xs = torch.linspace(xbound[0], xbound[1], num_x)
  ys = torch.linspace(ybound[0], ybound[1], num_y)
  grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
  x, y = grid_x.flatten(), grid_y.flatten()
  return torch.stack([x, y, torch.zeros_like(x), torch.ones_like(x)]), (num_y, num_x)


def ego_to_camera(rots, trans):
  """[B, N, 4, 4] = [[R^T, 0], [0, 1]] @ [[I, -t], [0, 1]] (K is the identity: no intrinsics)."""
  b, n = rots.shape[:2]
  rs = torch.eye(4).repeat(b, n, 1, 1)
  rs[:, :, :3, :3] = rots.transpose(-1, -2)
  ts = torch.eye(4).repeat(b, n, 1, 1)
  ts[:, :, :3, 3] = -trans
  return rs @ ts


def bilinear_sample(images, coords):
  """images [M, H, W, C], coords [M, h, w, 2] (x = column, y = row) -> [M, h, w, C].

  Corners are floor / floor + 1, each clipped into the image, and weighted by the clipped
  corners, as the reference does (so points outside come out as 0 up to rounding).
  """
  m, height, width, channels = images.shape
  x, y = coords[..., :1], coords[..., 1:]
  x0, y0 = torch.floor(x), torch.floor(y)
  x1, y1 = x0 + 1, y0 + 1
  x0, x1 = x0.clip(0, width - 1), x1.clip(0, width - 1)
  y0, y1 = y0.clip(0, height - 1), y1.clip(0, height - 1)
  wx0, wx1, wy0, wy1 = x1 - x, x - x0, y1 - y, y - y0
  flat = images.reshape(m, -1, channels)

  def corner(xc, yc):
    index = (xc + yc * width).reshape(m, -1, 1).repeat(1, 1, channels).long()
    return torch.gather(flat, 1, index).reshape(m, *coords.shape[1:3], channels)

  return (wx0 * wy0 * corner(x0, y0) + wx0 * wy1 * corner(x0, y1)
          + wx1 * wy0 * corner(x1, y0) + wx1 * wy1 * corner(x1, y1))


def ipm(patches, rots, trans, xbound, ybound):
  """IPM(extrinsic=True): patches [B, N, C, Ph, Pw] -> max over cameras [B, C, h, w]."""
  b, n, c, ph, pw = patches.shape
  points, (h, w) = plane_points(xbound, ybound)
  cam = ego_to_camera(rots, trans).reshape(b * n, 4, 4) @ points         # [B*N, 4, h*w]
  # extrinsic=True: column = camera z - Pw / 8, row = camera x + Ph / 2 (offset = (Ph, Pw)).
  coords = torch.stack([cam[:, 2] - pw / 8, cam[:, 0] + ph / 2], dim=1)
  coords = coords.reshape(b * n, 2, h, w).permute(0, 2, 3, 1)
  images = patches.permute(0, 1, 3, 4, 2).reshape(b * n, ph, pw, c)
  warped = bilinear_sample(images, coords).reshape(b, n, h, w, c)
  return warped.max(dim=1).values.permute(0, 3, 1, 2)


class CameraView(nn.Module):
  """HDMapNet camera branch after the encoder: view_fusion -> ipm -> up_sampler."""

  def __init__(self, image_hw, canvas_hw, n_views=6):
    super().__init__()
    fv_size, bv_size, self.xbound, self.ybound = hdmapnet_sizes(image_hw, canvas_hw)
    self.view_fusion = ViewTransformation(fv_size, bv_size, n_views)

  def forward(self, feat, rots, trans):
    """feat [B, N, C, h, w], rots/trans camera -> ego -> [B, C, Hb, Wb]."""
    topdown = ipm(self.view_fusion(feat), rots, trans, self.xbound, self.ybound)
    return upsample(topdown)


def upsample(topdown):
  """nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)."""
  return F.interpolate(topdown, scale_factor=2, mode='bilinear', align_corners=True)


def gen_dx_bx(xbound, ybound, zbound):
  """Cell size, first cell centre and cell count per axis (torch LongTensor truncates)."""
  rows = (xbound, ybound, zbound)
  dx = torch.Tensor([row[2] for row in rows])
  bx = torch.Tensor([row[0] + row[2] / 2.0 for row in rows])
  nx = torch.LongTensor([int((row[1] - row[0]) / row[2]) for row in rows])
  return dx, bx, nx


def lss_frustum(image_hw, feature_hw, dbound):
  """create_frustum: [D, fh, fw, 3] of (u, v, depth); u, v by linspace over the image."""
  (im_h, im_w), (fh, fw) = image_hw, feature_hw
  ds = torch.arange(*dbound, dtype=torch.float).view(-1, 1, 1).expand(-1, fh, fw)
  depth_bins = ds.shape[0]
  xs = torch.linspace(0, im_w - 1, fw, dtype=torch.float).view(1, 1, fw).expand(
      depth_bins, fh, fw)
  ys = torch.linspace(0, im_h - 1, fh, dtype=torch.float).view(1, fh, 1).expand(
      depth_bins, fh, fw)
  return torch.stack((xs, ys, ds), -1)


def lss_geometry(frustum, rots, trans, intrins, post_rots, post_trans):
  """get_geometry: [B, N, D, fh, fw, 3] ego points (original-image intrinsics + post_*)."""
  b, n, _ = trans.shape
  points = frustum - post_trans.view(b, n, 1, 1, 1, 3)
  points = torch.inverse(post_rots).view(b, n, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1))
  points = torch.cat((points[..., :2, :] * points[..., 2:3, :], points[..., 2:3, :]), 5)
  combine = rots.matmul(torch.inverse(intrins))
  points = combine.view(b, n, 1, 1, 1, 3, 3).matmul(points).squeeze(-1)
  return points + trans.view(b, n, 1, 1, 1, 3)


def voxel_pooling(geom, x, xbound, ybound, zbound):
  """geom [B, N, D, fh, fw, 3], x [..., C] -> [B, C * nz, nx, ny] (x index, then y)."""
  dx, bx, nx = gen_dx_bx(xbound, ybound, zbound)
  b, c = x.shape[0], x.shape[-1]
  total = x[..., 0].numel()
  x = x.reshape(total, c)
  index = ((geom - (bx - dx / 2.0)) / dx).long().view(total, 3)
  batch_ix = torch.cat([torch.full([total // b, 1], i, dtype=torch.long) for i in range(b)])
  index = torch.cat((index, batch_ix), 1)
  kept = ((index[:, 0] >= 0) & (index[:, 0] < nx[0]) & (index[:, 1] >= 0)
          & (index[:, 1] < nx[1]) & (index[:, 2] >= 0) & (index[:, 2] < nx[2]))
  x, index = x[kept], index[kept]
  ranks = (index[:, 0] * (nx[1] * nx[2] * b) + index[:, 1] * (nx[2] * b)
           + index[:, 2] * b + index[:, 3])
  order = ranks.argsort()
  x, index, ranks = x[order], index[order], ranks[order]
  # The cumsum trick: per-voxel sums as differences of a running sum at each voxel's end.
  x = x.cumsum(0)
  last = torch.ones(x.shape[0], dtype=torch.bool)
  last[:-1] = ranks[1:] != ranks[:-1]
  x, index = x[last], index[last]
  x = torch.cat((x[:1], x[1:] - x[:-1]))
  final = torch.zeros((b, c, int(nx[2]), int(nx[0]), int(nx[1])))
  final[index[:, 3], :, index[:, 2], index[:, 0], index[:, 1]] = x
  return torch.cat(final.unbind(dim=2), 1)
