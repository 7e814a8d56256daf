"""Torch reference of P-MapNet's SD-prior fusion (`input_proj`, `conv_osm`, `sdmap_crossattn`,
`PositionEmbeddingSine(d / 2, normalize=True)`), written here from the reference's documented
behaviour (see mapkd_jax/models/prior.py). Module names equal the reference's."""
import math

import torch
from torch import nn


def sine_pos(h, w, num_feats, temperature=10000.0):
  """DETR PositionEmbeddingSine with normalize=True and no padding: [1, 2 num_feats, h, w]."""
  ones = torch.ones(1, h, w)
  y = ones.cumsum(1)
  x = ones.cumsum(2)
  y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
  x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
  dim_t = torch.arange(num_feats, dtype=torch.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
  px, py = x[..., None] / dim_t, y[..., None] / dim_t
  px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
  py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
  return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class Layer(nn.Module):
  """Post-norm decoder layer: self-attn (q = k = bev + pos), cross-attn (k = sd + pos), FFN."""

  def __init__(self, d, heads, ffn, dropout):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
    self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout)
    self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
    self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
    self.dropout, self.dropout1, self.dropout2, self.dropout3 = (
        nn.Dropout(dropout) for _ in range(4))

  def forward(self, bev, sd, pos):
    q = bev + pos
    bev = self.norm1(bev + self.dropout1(self.self_attn(q, q, value=bev)[0]))
    bev = self.norm2(bev + self.dropout2(
        self.multihead_attn(query=bev + pos, key=sd + pos, value=sd)[0]))
    ffn = self.linear2(self.dropout(torch.relu(self.linear1(bev))))
    return self.norm3(bev + self.dropout3(ffn))


class SDMapCrossAttn(nn.Module):
  def __init__(self, d, heads, layers, ffn, dropout):
    super().__init__()
    self.norm = nn.LayerNorm(d)
    self.layers = nn.ModuleList([Layer(d, heads, ffn, dropout) for _ in range(layers)])

  def forward(self, bev, sd, pos):
    """[B, d, h, w] each -> [B, d, h, w]; tokens are sequence-first as in torch's MHA."""
    b, c, h, w = bev.shape
    bev, sd, pos = (t.flatten(2).permute(2, 0, 1) for t in (bev, sd, pos))
    for layer in self.layers:
      bev = layer(bev, sd, pos)
    return self.norm(bev).view(h, w, b, c).permute(2, 3, 0, 1)


class SDFusion(nn.Module):
  """bev_small [B, C, h, w], osm [B, 1, H, W] -> [B, d, h, w]."""

  def __init__(self, in_channels=192, d=64, heads=8, layers=2, ffn=192, dropout=0.1,
               osm_channels=(32, 64, 64)):
    super().__init__()
    self.d = d
    self.input_proj = nn.Conv2d(in_channels, d, kernel_size=1)
    c1, c2, c3 = osm_channels
    self.conv_osm = nn.Sequential(
        nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c3, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c3),
        nn.ReLU(inplace=True))
    self.sdmap_crossattn = SDMapCrossAttn(d, heads, layers, ffn, dropout)

  def forward(self, bev_small, osm):
    sd = self.conv_osm(osm)
    assert sd.shape[2:] == bev_small.shape[2:]
    h, w = bev_small.shape[2:]
    pos = sine_pos(h, w, self.d // 2).repeat(bev_small.shape[0], 1, 1, 1)
    return self.sdmap_crossattn(self.input_proj(bev_small), sd, pos)
