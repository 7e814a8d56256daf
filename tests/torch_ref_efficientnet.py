"""PyTorch side of the EfficientNet-B0 / CamEncode parity tests (torch is a test-only import).

`CamEncodeRef` reproduces the reference computation (HDMapNet model/base.py `Up` + `CamEncode`,
and the lift-splat variant with a 1x1 `depthnet`), written here on top of efficientnet_pytorch
0.7.1's `EfficientNet.from_name('efficientnet-b0')`: random weights, never `from_pretrained`
(no download). Endpoints are collected the way HDMapNet's `get_eff_depth` does: a block's input
is recorded as `reduction_k` whenever the block shrinks the height, and the last block's output
is the final endpoint.
"""
import numpy as np
import torch
from efficientnet_pytorch import EfficientNet
from torch import nn
from torch.nn import functional as F


class UpRef(nn.Module):
  """HDMapNet `Up`: bilinear x2 (align_corners=True), concat [skip, up], 2 x conv3x3-BN-ReLU."""

  def __init__(self, in_channels, out_channels):
    super().__init__()
    self.conv = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU())

  def forward(self, deep, skip):
    deep = F.interpolate(deep, scale_factor=2, mode='bilinear', align_corners=True)
    return self.conv(torch.cat([skip, deep], dim=1))


class CamEncodeRef(nn.Module):
  """`trunk` + `up1` (+ `depthnet` when depthnet_channels): the reference state-dict names."""

  def __init__(self, up_channels, depthnet_channels=None):
    super().__init__()
    self.trunk = EfficientNet.from_name('efficientnet-b0')
    self.up1 = UpRef(320 + 112, up_channels)
    if depthnet_channels:
      self.depthnet = nn.Conv2d(up_channels, depthnet_channels, 1)
    else:
      self.depthnet = None

  def endpoints(self, x, drop_connect=True):
    """{'reduction_1'..'reduction_5'}, as get_eff_depth collects them (NCHW)."""
    trunk = self.trunk
    x = trunk._swish(trunk._bn0(trunk._conv_stem(x)))
    out, prev = {}, x
    for idx, block in enumerate(trunk._blocks):
      rate = trunk._global_params.drop_connect_rate if drop_connect else 0.0
      if rate:
        rate *= float(idx) / len(trunk._blocks)
      x = block(x, drop_connect_rate=rate)
      if prev.size(2) > x.size(2):
        out[f'reduction_{len(out) + 1}'] = prev
      prev = x
    out[f'reduction_{len(out) + 1}'] = x
    return out

  def forward(self, x, drop_connect=True):
    ends = self.endpoints(x, drop_connect)
    y = self.up1(ends['reduction_5'], ends['reduction_4'])
    if self.depthnet is not None:
      y = self.depthnet(y)
    return y, ends


def randomize_(module, seed):
  """Random weights AND BatchNorm statistics/affine, so that a wrong mapping cannot pass.

  Conv/linear weights stay at their (random) init; BatchNorm running stats and affine
  parameters, which are 0/1 at init and would hide a swapped mean/var or scale/bias, are
  drawn at random (var in [0.5, 1.5], scale in [0.5, 1.5]).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=gen))
        m.bias.copy_(0.2 * torch.randn(n, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
  return module


def make(up_channels=64, depthnet_channels=None, seed=0):
  torch.manual_seed(seed)
  return randomize_(CamEncodeRef(up_channels, depthnet_channels), seed)


def state_dict_numpy(module, prefix=''):
  return {prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw_to_nhwc(t):
  return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))
