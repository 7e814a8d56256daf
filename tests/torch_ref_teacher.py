"""PyTorch side of the whole-teacher parity test: P-MapNet's PMapNet_HD (lidar=True), assembled
here from the other torch references with the reference's attribute names, so `state_dict()`
has a `model9.pt`'s names:

  camencode.* (torch_ref_efficientnet.CamEncodeRef), view_fusion.* (torch_ref_camera),
  pp.* (torch_ref_lidar.PointPillarEncoder), input_proj / conv_osm / sdmap_crossattn
  (torch_ref_sd), conv_bev / conv_up (torch_ref_bev), bevencode (torch_ref_bev.BevEncode),
  mae_head (torch_ref_vit.MapViT).

Forward as PMapNet_HD.forward (facts from P-MapNet `model/pmapnet_hd.py`): camera features ->
view_fusion -> IPM -> x2 upsample (align_corners=True); cat [camera, pp(lidar)]; conv_bev ->
bev_small; cross-attention of input_proj(bev_small) to conv_osm(osm) with the sine position
of bev_small's grid; conv_up; bevencode; mae_head(semantic logits). Only tests import this.
"""
import torch
from torch import nn

import torch_ref_bev
import torch_ref_camera
import torch_ref_efficientnet
import torch_ref_lidar
import torch_ref_sd
import torch_ref_vit


class Teacher(nn.Module):
  """Sizes from a (small) config of this project; the structure is the reference's."""

  def __init__(self, config):
    super().__init__()
    data, m = config.data, config.model
    image_hw = tuple(data.image_size)
    self.canvas = (round((data.bev_y[1] - data.bev_y[0]) / data.bev_y[2]),
                   round((data.bev_x[1] - data.bev_x[0]) / data.bev_x[2]))
    cam, lid = m.camera.channels, m.lidar.out_channels
    self.camencode = torch_ref_efficientnet.CamEncodeRef(cam)
    fv_size, bv_size, self.xbound, self.ybound = torch_ref_camera.hdmapnet_sizes(
        image_hw, self.canvas)
    self.view_fusion = torch_ref_camera.ViewTransformation(fv_size, bv_size, len(data.cameras))
    zbound = [*m.lidar.z_range, m.lidar.z_range[1] - m.lidar.z_range[0]]
    self.pp = torch_ref_lidar.PointPillarEncoder(
        lid, list(data.bev_x), list(data.bev_y), zbound, pointnet=m.lidar.pointnet_channels,
        blocks=tuple(m.lidar.block_channels), head=tuple(m.lidar.head_channels))
    sd = torch_ref_sd.SDFusion(in_channels=m.neck.channels, d=m.sd.d_model,
                               heads=m.sd.num_heads, layers=m.sd.num_layers, ffn=m.sd.ffn_dim,
                               dropout=m.sd.dropout, osm_channels=tuple(m.sd.encoder_channels))
    self.d = m.sd.d_model
    self.input_proj, self.conv_osm, self.sdmap_crossattn = (
        sd.input_proj, sd.conv_osm, sd.sdmap_crossattn)
    self.conv_bev = torch_ref_bev.conv_down(m.neck.channels, cam + lid)
    self.conv_up = torch_ref_bev.conv_up(m.sd.d_model, m.neck.channels)
    bev_kwargs = torch_ref_bev.bev_encode_kwargs(config)
    self.bevencode = torch_ref_bev.BevEncode(m.neck.channels, **bev_kwargs)
    hd = m.hd
    self.mae_head = torch_ref_vit.MapViT(self.canvas, hd.patch_size, hd.width, hd.depth,
                                         hd.num_heads, hd.mlp_ratio, bev_kwargs=bev_kwargs)

  def range_branch(self, images, rots, trans, intrins, points, mask):
    """The LiDAR slot: PointPillars here, lift-splat in the coach."""
    return self.pp(points, mask)

  def forward(self, images, rots, trans, intrins, points, mask, osm):
    """images [B, N, 3, H, W], rots / trans camera -> ego, intrins [B, N, 3, 3] of the input
    images, points [B, P, 5], mask [B, P], osm [B, 1, Hb, Wb] -> dict of NCHW maps (final
    heads, *_pre heads, bev_small)."""
    b, n = images.shape[:2]
    feats, _ = self.camencode(images.flatten(0, 1))
    feats = feats.reshape(b, n, *feats.shape[1:])
    topdown = torch_ref_camera.upsample(torch_ref_camera.ipm(
        self.view_fusion(feats), rots, trans, self.xbound, self.ybound))
    x = torch.cat([topdown, self.range_branch(images, rots, trans, intrins, points, mask)],
                  dim=1)
    bev_small = self.conv_bev(x)
    sd = self.conv_osm(osm)
    assert sd.shape[2:] == bev_small.shape[2:]
    h, w = bev_small.shape[2:]
    pos = torch_ref_sd.sine_pos(h, w, self.d // 2).repeat(b, 1, 1, 1)
    bev = self.conv_up(self.sdmap_crossattn(self.input_proj(bev_small), sd, pos))
    pre = self.bevencode(bev)
    out = self.mae_head(pre[0])
    names = ('semantic', 'embedding', 'direction')
    return {**dict(zip(names, out)), **{f'{k}_pre': v for k, v in zip(names, pre)},
            'bev_small': bev_small}
