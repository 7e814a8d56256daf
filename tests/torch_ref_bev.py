"""PyTorch side of the BEV parity tests: the reference BEV decoder and student tail, written here.

Written from the facts of the public reference (HDMapNet `model/base.py` BevEncode/Up as used
by P-MapNet and MapKD, MapKD `model/pmapnet_sdmap_S.py` PMapNet_sdmap_S), with the same
module names, so `state_dict()` has the checkpoint's names:

  bevencode.conv1 / bn1 / layer1-3 (torchvision resnet18 layers) / up1, up1_embedded,
    up1_direction (Up: conv.0 conv, conv.1 bn, conv.3 conv, conv.4 bn) / up2, up2_embedded,
    up2_direction (.1 conv, .2 bn, .4 conv with bias)
  feature_expand.conv1 / bn1 / conv2 / bn2 (3x3 convs with bias)
  conv_bev.0 / .2 (4x4 stride-2 convs with bias), .4 (no bias), .5 bn
  built but never called by the student's forward: input_proj, conv_osm, conv_up
  whole student (`Student`): + camencode.* (A's torch_ref_efficientnet.CamEncodeRef) and
    view_fusion.* (B2's torch_ref_camera.ViewTransformation), IPM and x2 upsampler

Only tests import this file (torch is a test / converter dependency).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18


class Up(nn.Module):
  """HDMapNet Up: x1 upsampled (align_corners=True), cat [x2, x1], two conv-BN-ReLU."""

  def __init__(self, in_channels, out_channels, scale_factor=2):
    super().__init__()
    self.up = nn.Upsample(scale_factor=scale_factor, mode='bilinear', align_corners=True)
    self.conv = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

  def forward(self, x1, x2):
    return self.conv(torch.cat([x2, self.up(x1)], dim=1))


def _up2(in_channels, hidden, out_channels):
  return nn.Sequential(
      nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
      nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
      nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
      nn.Conv2d(hidden, out_channels, 1, padding=0))


class BevEncode(nn.Module):
  """ResNet-18 stem + layers 1-3 (torchvision modules), per-head Up and up2 (P-MapNet/MapKD).

  The defaults are the reference's sizes (torchvision resnet18's layers); other sizes build
  the same structure from torchvision BasicBlocks (same names: layerK.J.conv1/bn1/conv2/bn2/
  downsample.0/1) for small-config tests.
  """

  def __init__(self, in_channels, out_channels=4, embedded_dim=16, direction_dim=37,
               stem=64, layers=(64, 128, 256), blocks=2, up=256, head=128):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
    if (stem, tuple(layers), blocks) == (64, (64, 128, 256), 2):
      trunk = resnet18(weights=None, zero_init_residual=True)
      self.bn1, self.relu = trunk.bn1, trunk.relu
      self.layer1, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3
    else:
      from torchvision.models.resnet import BasicBlock
      self.bn1, self.relu = nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
      width = stem
      for k, (channels, stride) in enumerate(zip(layers, (1, 2, 2)), start=1):
        mods = []
        for j in range(blocks):
          s = stride if j == 0 else 1
          down = None
          if s != 1 or width != channels:
            down = nn.Sequential(nn.Conv2d(width, channels, 1, stride=s, bias=False),
                                 nn.BatchNorm2d(channels))
          mods.append(BasicBlock(width, channels, stride=s, downsample=down))
          width = channels
        setattr(self, f'layer{k}', nn.Sequential(*mods))
    skip = layers[0] + layers[2]
    self.up1 = Up(skip, up, scale_factor=4)
    self.up2 = _up2(up, head, out_channels)
    self.up1_embedded = Up(skip, up, scale_factor=4)
    self.up2_embedded = _up2(up, head, embedded_dim)
    self.up1_direction = Up(skip, up, scale_factor=4)
    self.up2_direction = _up2(up, head, direction_dim)

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    x1 = self.layer1(x)
    x2 = self.layer3(self.layer2(x1))
    return (self.up2(self.up1(x2, x1)), self.up2_embedded(self.up1_embedded(x2, x1)),
            self.up2_direction(self.up1_direction(x2, x1)))


def bev_encode_kwargs(config):
  """BevEncode sizes of a config's model.decoder and data (classes, direction bins)."""
  d = config.model.decoder
  return dict(out_channels=len(config.data.classes) + 1, embedded_dim=d.embedding_dim,
              direction_dim=config.data.direction_bins + 1, stem=d.stem_channels,
              layers=tuple(d.layer_channels), blocks=d.blocks_per_layer, up=d.up_channels,
              head=d.head_channels)


class FeatureExpansion(nn.Module):
  """MapKD FeatureExpansionModule: 3x3 conv (bias) BN ReLU, in -> bev/2 -> bev channels."""

  def __init__(self, in_channels, bev_channels):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, bev_channels // 2, 3, stride=1, padding=1)
    self.bn1 = nn.BatchNorm2d(bev_channels // 2)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(bev_channels // 2, bev_channels, 3, stride=1, padding=1)
    self.bn2 = nn.BatchNorm2d(bev_channels)
    self.relu2 = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def conv_down(channels, in_channels=None):
  """conv_bev: two 4x4 stride-2 convs (bias) + ReLU, a third without bias + BN + ReLU."""
  in_channels = in_channels or channels
  return nn.Sequential(
      nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.ReLU(),
      nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.ReLU(),
      nn.Conv2d(channels, channels, 4, stride=2, padding=1, bias=False),
      nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def conv_up(in_channels, channels):
  """conv_up: the transposed twin of conv_down (teacher; built but unused by the student)."""
  return nn.Sequential(
      nn.ConvTranspose2d(in_channels, channels, 4, stride=2, padding=1), nn.ReLU(),
      nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.ReLU(),
      nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False),
      nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class StudentTail(nn.Module):
  """PMapNet_sdmap_S after the camera branch: topdown [B, 64, H, W] -> heads and bev_small.

  Holds the modules the reference student constructs but never calls (input_proj, conv_osm,
  conv_up), so its state dict has every name a MapKD student checkpoint has outside the
  camera branch; the converter must list them as ignored.
  """

  def __init__(self, cam_channels=64, bev_channels=192, hidden=64, canvas=(200, 400)):
    super().__init__()
    self.canvas = canvas
    self.input_proj = nn.Conv2d(bev_channels, hidden, kernel_size=1)
    self.feature_expand = FeatureExpansion(cam_channels, bev_channels)
    self.conv_osm = nn.Sequential(
        nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, hidden, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU())
    self.conv_bev = conv_down(bev_channels)
    self.conv_up = conv_up(hidden, bev_channels)
    self.bevencode = BevEncode(bev_channels)

  def forward(self, topdown):
    bev_small = self.conv_bev(self.feature_expand(topdown))
    x = F.interpolate(bev_small, size=self.canvas, mode='bilinear', align_corners=False)
    semantic, embedding, direction = self.bevencode(x)
    return {'semantic': semantic, 'embedding': embedding, 'direction': direction,
            'bev_small': bev_small}


class Student(StudentTail):
  """The whole MapKD student (PMapNet_sdmap_S): CamEncode -> view_fusion -> IPM -> x2 upsample
  (align_corners=True) -> the tail. Built from the other parity tests' torch references."""

  def __init__(self, image_hw=(128, 352), canvas=(200, 400), cam_channels=64, n_views=6):
    super().__init__(cam_channels=cam_channels, canvas=canvas)
    import torch_ref_camera
    import torch_ref_efficientnet
    self.camencode = torch_ref_efficientnet.CamEncodeRef(cam_channels)
    fv_size, bv_size, self.xbound, self.ybound = torch_ref_camera.hdmapnet_sizes(image_hw, canvas)
    self.view_fusion = torch_ref_camera.ViewTransformation(fv_size, bv_size, n_views)

  def forward(self, images, rots, trans):
    """images [B, N, 3, H, W], rots / trans camera -> ego -> heads and bev_small (NCHW)."""
    import torch_ref_camera
    b, n = images.shape[:2]
    feats, _ = self.camencode(images.flatten(0, 1))
    feats = feats.reshape(b, n, *feats.shape[1:])
    topdown = torch_ref_camera.ipm(self.view_fusion(feats), rots, trans, self.xbound,
                                   self.ybound)
    return super().forward(torch_ref_camera.upsample(topdown))


def randomize_(module, seed):
  """Random weights AND BatchNorm running statistics, so eval-mode parity can fail on BN.

  Conv/linear weights keep torch's fan-in scale (activations stay O(1) through depth); BN
  scale in [0.5, 1.5], bias and running mean N(0, 0.2), running var in [0.5, 2].
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if name.endswith('running_var'):
        tensor.copy_(0.5 + 1.5 * torch.rand(tensor.shape, generator=gen))
      elif name.endswith('running_mean'):
        tensor.copy_(0.2 * torch.randn(tensor.shape, generator=gen))
      elif tensor.ndim == 1 and _is_bn_param(module, name):
        if name.endswith('weight'):
          tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
        else:
          tensor.copy_(0.2 * torch.randn(tensor.shape, generator=gen))
      elif tensor.ndim >= 2:
        fan_in = tensor[0].numel() if not _is_transposed(module, name) else (
            tensor.shape[0] * tensor[0, 0].numel())
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      else:   # conv / linear bias
        tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
  return module


def _owner(module, name):
  return module.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else module


def _is_bn_param(module, name):
  return isinstance(_owner(module, name), nn.modules.batchnorm._BatchNorm)


def _is_transposed(module, name):
  return isinstance(_owner(module, name), nn.ConvTranspose2d)
