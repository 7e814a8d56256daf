"""PyTorch side of the whole-coach parity test: MapKD's PMapNet_mae_head_C (sim_lidar=True),
assembled here from the other torch references with the reference's attribute names.

Facts from MapKD `model/pmapnet_mae_head_C.py`, `model/lift_splat.py`, `model/base.py`: the
teacher's modules (torch_ref_teacher.Teacher) with the PointPillars replaced by a LiftSplat
under the same attribute `pp`: dx / bx / nx / frustum stored as (frozen) Parameters,
`camencode` = CamEncode_L (EfficientNet-B0 trunk, up1 to 512 channels, 1x1 `depthnet` to
D + C; softmax over the first D channels times the next C), `reduce_to_3` and `bevencode`
built but never called; its forward returns the voxel-pooled [B, C, X, Y] map, which the coach
maps with `expand_to_128` (1x1 conv with bias) and transposes to [B, C, Y, X] before the
concat with the camera BEV. Only tests import this file.
"""
import torch
from torch import nn

import torch_ref_bev
import torch_ref_camera
import torch_ref_efficientnet
from torch_ref_teacher import Teacher


class LiftSplat(nn.Module):
  def __init__(self, config):
    super().__init__()
    data, cfg = config.data, config.model.lss
    self.image_hw = tuple(data.image_size)
    self.feature_hw = (self.image_hw[0] // 16, self.image_hw[1] // 16)
    z = [cfg.z_range[0], cfg.z_range[1], cfg.z_range[1] - cfg.z_range[0]]
    self.bounds = (list(data.bev_x), list(data.bev_y), z)
    dx, bx, nx = torch_ref_camera.gen_dx_bx(*self.bounds)
    self.dx = nn.Parameter(dx, requires_grad=False)
    self.bx = nn.Parameter(bx, requires_grad=False)
    self.nx = nn.Parameter(nx, requires_grad=False)
    self.frustum = nn.Parameter(torch_ref_camera.lss_frustum(
        self.image_hw, self.feature_hw, list(cfg.depth_bins)), requires_grad=False)
    self.depth_bins = self.frustum.shape[0]
    self.depth_bounds = tuple(cfg.depth_bins)
    self.context = cfg.context_channels
    # Tests may set [B, N, D, fh, fw, 3] ego points used instead of get_geometry's: at 0.15 m
    # cells two float32 paths to the same points put a few of them across a cell border.
    self.geometry_override = None
    self.reduce_to_3 = nn.Conv2d(self.context, 3, kernel_size=1)
    self.camencode = torch_ref_efficientnet.CamEncodeRef(
        cfg.fusion_channels, depthnet_channels=self.depth_bins + self.context)
    self.bevencode = torch_ref_bev.BevEncode(self.context, cfg.out_channels, stem=16,
                                             layers=(16, 24, 32), blocks=1, up=32, head=16)

  def constants(self):
    """{name: value} of the geometry Parameters (dx, bx, nx, frustum)."""
    dx, bx, nx = torch_ref_camera.gen_dx_bx(*self.bounds)
    return dict(dx=dx, bx=bx, nx=nx, frustum=torch_ref_camera.lss_frustum(
        self.image_hw, self.feature_hw, list(self.depth_bounds)))

  def forward(self, images, rots, trans, intrins, post_rots, post_trans):
    b, n = images.shape[:2]
    x, _ = self.camencode(images.flatten(0, 1))
    depth = x[:, :self.depth_bins].softmax(dim=1)
    x = depth.unsqueeze(1) * x[:, self.depth_bins:self.depth_bins + self.context].unsqueeze(2)
    x = x.view(b, n, self.context, self.depth_bins, *self.feature_hw).permute(0, 1, 3, 4, 5, 2)
    geom = torch_ref_camera.lss_geometry(self.frustum, rots, trans, intrins, post_rots,
                                         post_trans)
    if self.geometry_override is not None:   # a test's points in place of the above's
      assert self.geometry_override.shape == geom.shape, (self.geometry_override.shape,
                                                          geom.shape)
      geom = self.geometry_override.to(geom.dtype)
    return torch_ref_camera.voxel_pooling(geom, x, *self.bounds)


class Coach(Teacher):
  """The teacher's modules with `pp` = LiftSplat and `expand_to_128`."""

  def __init__(self, config):
    super().__init__(config)
    self.pp = LiftSplat(config)
    self.expand_to_128 = nn.Conv2d(config.model.lss.context_channels,
                                   config.model.lss.out_channels, kernel_size=1)

  def restore_constants_(self):
    """Puts back the LiftSplat's geometry after a randomize_ of every tensor."""
    with torch.no_grad():
      for name, value in self.pp.constants().items():
        getattr(self.pp, name).copy_(value)
    return self

  def range_branch(self, images, rots, trans, intrins, points=None, mask=None):
    eye = torch.eye(3).expand(*rots.shape[:2], 3, 3)
    sim = self.pp(images, rots, trans, intrins, eye, torch.zeros_like(trans))
    return self.expand_to_128(sim).permute(0, 1, 3, 2)
