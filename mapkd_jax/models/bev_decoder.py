"""BEV neck (stride-2 convs to `bev_small` and transposed convs back) and the BEV decoder.

Both compute the reference's function (P-MapNet / MapKD `conv_bev`, `conv_up` and HDMapNet's
`BevEncode` as used by P-MapNet and MapKD) given the same weights; `mapkd_jax/convert/pmapnet.py`
maps their state dicts onto these parameters. Submodules mirror the reference's structure
(one ConvBN per torch conv [+ BN] pair, one ResBlock per torchvision BasicBlock), so the
mapping reads as a table.

BEVNeck.down (reference `conv_bev`): num_layers x (4x4 stride-2 conv, padding 1); all but the
  last with a bias and ReLU, the last without bias, then BN and ReLU -> `bev_small`. On an odd
  size (never in the reference, whose canvas is a multiple of 8) one extra trailing row is
  padded so that bev_small is ceil(canvas / 2**num_layers), as config_lib's TGPD check assumes;
  torch would floor.
BEVNeck.up (reference `conv_up`): the same with 4x4 stride-2 transposed convs (exactly x2),
  then a bilinear resize to the canvas when the canvas is not a multiple of 2**num_layers.
BEVDecoder (reference `BevEncode`): ResNet-18 stem (7x7 stride 2, no max-pool) and layers 1-3;
  per head its own `Up` (layer-3 output upsampled with align_corners=True to layer 1's size,
  concat [layer1, up], two 3x3 conv-BN-ReLU) and `up2` (x2 align_corners=True upsample, 3x3
  conv-BN-ReLU, 1x1 conv with bias). Heads: semantic, embedding, direction.

Torch conventions kept: symmetric padding (flax 'SAME' pads a stride-2 conv on even input
(0, 1), torch pads (1, 1): a one-pixel shift), BatchNorm eps 1e-5 and running-average
momentum 0.1 (flax momentum 0.9), biases exactly where the reference has them.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.models import batch_norm as torch_bn
from mapkd_jax.models import precision
from mapkd_jax.models.depthwise import pointwise_conv
from mapkd_jax.models.image_encoder import TORCH_BN
from mapkd_jax.models.image_encoder import remat_block
from mapkd_jax.models.resample import resize_bilinear
from mapkd_jax.models.resample import resize_bilinear_align_corners as resize_align_corners

# torch.nn.BatchNorm2d defaults (the reference never changes them): eps 1e-5, torch momentum
# 0.1 = flax momentum 0.9 (torch weighs the new batch statistic, flax the running value).
BN_EPSILON = TORCH_BN['bn_eps']
BN_MOMENTUM = TORCH_BN['bn_momentum']
HEADS = ('semantic', 'embedding', 'direction')


def batch_norm(train, dtype, name=None):
  """BatchNorm with torch's defaults (see BN_EPSILON, BN_MOMENTUM).

  Same outputs and running statistics as torch in both modes (models/batch_norm.py: torch
  mixes the unbiased batch variance into the running one, nn.BatchNorm the biased one).
  """
  return torch_bn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=dtype, name=name)


def resize_half_pixel(x, out_hw):
  """Bilinear resize with align_corners=False (torch `F.interpolate(..., 'bilinear')`).

  Half-pixel centres, negative source coordinates clamped to 0 (torch's rule), computed by
  resample.resize_bilinear: two static-index gathers per axis forward, dense matmuls
  backward. This used to be `jax.image.resize`, the same function for upsampling (its
  renormalised edge weights equal torch's clamp), whose dense weight matmuls cost n_in
  multiply-adds per output: the student's 25x50x192 -> 200x400 resize took 85 ms on 2 loaded
  XLA:CPU cores, torch 41 ms. Outputs differ from it in the last bits only (float32 weights
  computed as torch computes them). Downsampling is refused: torch does not antialias, and
  nothing in the reference downsamples here.

  Args:
    x: [B, H, W, C]; out_hw: (H', W') with H' >= H and W' >= W.
  """
  if out_hw[0] < x.shape[1] or out_hw[1] < x.shape[2]:
    raise ValueError(f'resize_half_pixel upsamples only: {x.shape[1:3]} -> {tuple(out_hw)}')
  return resize_bilinear(x, out_hw, align_corners=False)


class ConvBN(nn.Module):
  """Conv2d with torch's symmetric padding, optional BatchNorm, optional ReLU.

  Submodules 'conv' and (with `norm`) 'bn', so a torch (conv, bn) pair maps onto one ConvBN.

  Attributes:
    features: output channels.
    kernel: square kernel size.
    stride: square stride.
    padding: torch `padding` (both sides of each spatial axis).
    use_bias: conv bias (torch `bias=`).
    norm: BatchNorm after the conv.
    relu: ReLU at the end.
    ceil_pad: pad one extra trailing row/column on an odd input axis, so a stride-2 conv
      returns ceil(in / 2) where torch returns floor; no effect on even inputs, which is all
      the reference sees.
    dtype: compute dtype (precision.compute_dtype); params stay float32.
  """
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = False
  norm: bool = True
  relu: bool = True
  ceil_pad: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """x: [B, H, W, Cin] -> [B, H', W', features], H' = (H + 2 padding - kernel) // stride + 1."""
    pads = []
    for size in x.shape[1:3]:
      extra = int(self.ceil_pad and self.stride > 1 and size % 2 == 1)
      pads.append((self.padding, self.padding + extra))
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=pads,
                use_bias=self.use_bias, dtype=self.dtype, name='conv')(x)
    if self.norm:
      x = batch_norm(train, self.dtype, name='bn')(x)
    return nn.relu(x) if self.relu else x


class ConvTransposeBN(nn.Module):
  """torch ConvTranspose2d(kernel 4, stride 2, padding 1) (output exactly 2x), optional BN, ReLU.

  The kernel is stored [kh, kw, Cin, Cout] for the forward convolution of the dilated input,
  i.e. torch's weight [Cin, Cout, kh, kw] flipped spatially (convert/pmapnet.py does it).

  Attributes:
    features: output channels.
    use_bias, norm: as ConvBN (submodules 'conv' and 'bn'). ReLU always follows.
    dtype: compute dtype.
  """
  features: int
  use_bias: bool = True
  norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """x: [B, H, W, Cin] -> [B, 2H, 2W, features]."""
    # torch's transposed conv = a conv over the input dilated by the stride, padded by
    # kernel - 1 - padding = 2 on each side: (2H - 1) + 4 - 4 + 1 = 2H outputs.
    x = nn.ConvTranspose(self.features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                         use_bias=self.use_bias, dtype=self.dtype, name='conv')(x)
    if self.norm:
      x = batch_norm(train, self.dtype, name='bn')(x)
    return nn.relu(x)


class BEVNeck(nn.Module):
  """Reads config.model.neck (channels, num_layers).

  Use `neck.down(x, train=...)` and `neck.up(x, canvas_hw, train=...)` from a parent's
  compact method (the teacher puts SD fusion between them; the student uses only `down`);
  `__call__` runs both and returns (bev_small, bev). Parameters: down_0 .. down_{L-1}
  (reference conv_bev.0/2/4 with bn conv_bev.5), up_0 .. up_{L-1} (conv_up.0/2/4, bn
  conv_up.5). With config.model.neck.remat each layer is recomputed in the backward
  (image_encoder.remat_block; same names and function).

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  def setup(self):
    cfg = self.config.model.neck
    dtype = precision.compute_dtype(self.config)
    remat = bool(cfg.get('remat', False))   # absent in configs saved before the key existed
    last = cfg.num_layers - 1
    self.down_layers = [
        remat_block(ConvBN, remat)(
            cfg.channels, kernel=4, stride=2, padding=1, use_bias=i != last, norm=i == last,
            ceil_pad=True, dtype=dtype, name=f'down_{i}')
        for i in range(cfg.num_layers)]
    self.up_layers = [
        remat_block(ConvTransposeBN, remat)(cfg.channels, use_bias=i != last, norm=i == last,
                                            dtype=dtype, name=f'up_{i}')
        for i in range(cfg.num_layers)]

  def down(self, x, *, train: bool):
    """x: [B, Hb, Wb, Cin] -> bev_small [B, ceil(Hb/2^L), ceil(Wb/2^L), neck.channels]."""
    for layer in self.down_layers:
      x = layer(x, train)
    return x

  def up(self, x, canvas_hw, *, train: bool):
    """x: [B, h, w, C] -> [B, canvas_hw[0], canvas_hw[1], neck.channels]."""
    for layer in self.up_layers:
      x = layer(x, train)
    if x.shape[1:3] != tuple(canvas_hw):
      # Only for canvases that are not a multiple of 2**num_layers (never the reference's).
      x = jax.image.resize(x, (x.shape[0], *canvas_hw, x.shape[-1]), 'bilinear')
    return x

  def __call__(self, x, *, train: bool):
    """x: [B, Hb, Wb, Cin] -> (bev_small [B, h, w, C], bev [B, Hb, Wb, C])."""
    small = self.down(x, train=train)
    return small, self.up(small, x.shape[1:3], train=train)


class ResBlock(nn.Module):
  """torchvision ResNet BasicBlock: conv1-bn1-relu, conv2-bn2, + shortcut, relu.

  Submodules conv1, conv2 (ConvBN) and, when stride or width change, downsample (1x1 conv +
  BN), as torchvision's `layerK.J.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}`.
  """
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), features]."""
    y = ConvBN(self.features, 3, self.stride, 1, dtype=self.dtype, name='conv1')(x, train=train)
    y = ConvBN(self.features, 3, 1, 1, relu=False, dtype=self.dtype, name='conv2')(y, train=train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = ConvBN(self.features, 1, self.stride, 0, relu=False, dtype=self.dtype,
                 name='downsample')(x, train=train)
    return nn.relu(x + y)


class UpFuse(nn.Module):
  """HDMapNet `Up`: `deep` resized (align_corners=True) to `skip`'s size, concat [skip, deep],
  two 3x3 conv-BN-ReLU (no bias). Submodules conv1, conv2 (reference conv.0/1 and conv.3/4)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, deep, skip, train: bool):
    """deep: [B, h, w, Cd], skip: [B, H, W, Cs] -> [B, H, W, features]."""
    # The reference upsamples by scale_factor=4, which is skip's size at a 200 x 400 canvas;
    # resizing to skip's size keeps other canvases working and is the same map there.
    x = jnp.concatenate([skip, resize_align_corners(deep, skip.shape[1:3])], axis=-1)
    x = ConvBN(self.features, 3, 1, 1, dtype=self.dtype, name='conv1')(x, train=train)
    return ConvBN(self.features, 3, 1, 1, dtype=self.dtype, name='conv2')(x, train=train)


class Head(nn.Module):
  """HDMapNet `up2`: resize (align_corners=True) to `out_hw`, 3x3 conv-BN-ReLU (no bias), 1x1
  conv with bias to `features`. Submodules conv1 (reference .1/.2) and out (reference .4)."""
  hidden: int
  features: int
  dtype: Any = jnp.float32   # compute dtype (precision.compute_dtype)

  @nn.compact
  def __call__(self, x, out_hw, train: bool):
    """x: [B, h, w, C] -> [B, out_hw[0], out_hw[1], features] (logits)."""
    x = resize_align_corners(x, out_hw)
    x = ConvBN(self.hidden, 3, 1, 1, dtype=self.dtype, name='conv1')(x, train=train)
    # Inference computes the 1x1 conv as a matmul (pointwise_conv: faster on XLA:CPU, same
    # parameters); training keeps nn.Conv's own convolution, so the train step is unchanged.
    return nn.Conv(self.features, (1, 1), dtype=self.dtype,
                   conv_general_dilated=None if train else pointwise_conv, name='out')(x)


class BEVDecoder(nn.Module):
  """ResNet-18-style BEV decoder with semantic / embedding / direction heads (HDMapNet BevEncode).

  Reads config.model.decoder (stem_channels, layer_channels, blocks_per_layer, up_channels,
  head_channels, embedding_dim, remat) and config.data (classes, direction_bins). Parameters:
  stem (reference conv1 + bn1), layer{1,2,3}_{j} (ResBlock), up_{head} (reference up1,
  up1_embedded, up1_direction) and head_{head} (up2, up2_embedded, up2_direction). With
  decoder.remat the stem, each ResBlock, Up and head is recomputed in the backward
  (image_encoder.remat_block; same names and function): the heads' 200 x 400 activations are
  most of the decoder's memory at the reference size.

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, bev, *, train: bool):
    """bev: [B, Hb, Wb, C] -> dict of logits on the same canvas.

    Returns:
      semantic [B, Hb, Wb, len(classes) + 1], embedding [B, Hb, Wb, embedding_dim],
      direction [B, Hb, Wb, direction_bins + 1].
    """
    cfg, data = self.config.model.decoder, self.config.data
    dtype = precision.compute_dtype(self.config)
    canvas = bev.shape[1:3]
    remat = bool(cfg.get('remat', False))   # absent in configs saved before the key existed
    # Stem: 7x7 stride-2 conv as in ResNet-18, no max-pool (HDMapNet's BevEncode).
    x = remat_block(ConvBN, remat)(cfg.stem_channels, 7, 2, 3, dtype=dtype, name='stem')(
        bev, train)
    skip = None
    for i, width in enumerate(cfg.layer_channels):
      for block in range(cfg.blocks_per_layer):
        stride = 2 if (i > 0 and block == 0) else 1
        x = remat_block(ResBlock, remat)(width, stride=stride, dtype=dtype,
                                         name=f'layer{i + 1}_{block}')(x, train)
      if i == 0:
        skip = x   # layer-1 output at 1/2 resolution
    out_sizes = {'semantic': len(data.classes) + 1, 'embedding': cfg.embedding_dim,
                 'direction': data.direction_bins + 1}
    outputs = {}
    for name in HEADS:
      # Each head has its own Up block (P-MapNet / MapKD; HDMapNet's original direction head
      # reused the embedding's, leaving its own unused). The three Ups read the same input
      # (XLA computes its resize and concat once), but their first convs are NOT run as one
      # 320 -> 3x256 conv: on XLA:CPU that measured no faster than three (658 vs 626 ms, 2
      # loaded cores, session 9), and folding eval BatchNorm into the conv gained nothing.
      y = remat_block(UpFuse, remat, static_argnums=(3,))(
          cfg.up_channels, dtype=dtype, name=f'up_{name}')(x, skip, train)
      # out_hw (a tuple) is static like train.
      outputs[name] = remat_block(Head, remat, static_argnums=(2, 3))(
          cfg.head_channels, out_sizes[name], dtype=dtype, name=f'head_{name}')(
              y, canvas, train)
    return outputs
