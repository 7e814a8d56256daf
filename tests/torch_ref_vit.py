"""PyTorch side of the HD-prior parity test: P-MapNet's MapVisionTransformer, written here.

Written from the facts of the public reference (P-MapNet `model/utils/map_mae_head.py`,
`vit_base_patch8`): a timm VisionTransformer (img_size = the canvas, in_chans 4, qkv_bias) whose
forward is replaced: `map_patch_embed.proj` (k = stride = patch conv) -> + pos_embed[:, :-1]
-> pos_drop -> blocks -> norm -> [B, D, h, w] -> conv_up (ConvTranspose2d k4 s2 p1 twice, no
activation; bilinear Upsample to the canvas, align_corners=False; 1x1 conv (no bias) + BN, no
ReLU) -> bev_head (HDMapNet BevEncode on D channels). timm's cls_token, patch_embed and head
exist in the state dict but are never called. Only tests import this file.
"""
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from torch_ref_bev import BevEncode


class ConvBN(nn.Module):
  """P-MapNet's ConvBNReLU(k=1, padding 0, has_relu=False): names conv, bn."""

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 1, bias=False)
    self.bn = nn.BatchNorm2d(channels)

  def forward(self, x):
    return self.bn(self.conv(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, in_chans, dim):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x)


class MapViT(VisionTransformer):
  """canvas (H, W), patch, ViT sizes and BevEncode kwargs -> the reference HD prior."""

  def __init__(self, canvas, patch_size, embed_dim, depth, num_heads, mlp_ratio=4,
               in_chans=4, bev_kwargs=None):
    super().__init__(img_size=canvas, patch_size=patch_size, in_chans=in_chans,
                     embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                     mlp_ratio=mlp_ratio, qkv_bias=True)
    self.bev_head = BevEncode(embed_dim, **(bev_kwargs or {}))
    self.conv_up = nn.Sequential(
        nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1),
        nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1),
        nn.Upsample(size=tuple(canvas), mode='bilinear', align_corners=False),
        ConvBN(embed_dim))
    self.map_patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)

  def forward(self, x):
    b = x.shape[0]
    x = self.map_patch_embed(x)
    _, dim, h, w = x.shape
    x = x.flatten(2).transpose(1, 2) + self.pos_embed[:, :-1]
    x = self.pos_drop(x)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x).permute(0, 2, 1).reshape(b, dim, h, w)
    return self.bev_head(self.conv_up(x))


def layer_norms_random_(module, seed):
  """LayerNorm weights drawn around 1 (randomize_ draws them like biases, N(0, 0.1))."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.LayerNorm):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
  return module
