"""Per-camera image encoders returning the 1/16 feature map the view transforms need.

`ImageEncoder(kind=...)` dispatches on `config.model.camera.image_encoder` (or
`config.model.lss.image_encoder`):
  'efficientnet_b0': EfficientNet-B0 (randomly initialised; no weights are downloaded, but
    `python -m mapkd_jax.convert efficientnet` converts efficientnet_pytorch / HDMapNet weights),
    with the HDMapNet-style fusion of the 1/32 map (upsampled) into the 1/16 map.
  'resnet_small': a few residual stages, for tiny CPU configs.
Both map images [B', H, W, 3] to [B', ceil(H/16), ceil(W/16), out_channels].

EfficientNet-B0 computes the same function as efficientnet_pytorch 0.7.1
(`EfficientNet.from_name('efficientnet-b0')`) driven as HDMapNet's `CamEncode.get_eff_depth`
drives it (tests/test_parity_efficientnet.py): TF-SAME padding, BatchNorm eps 1e-3 / torch
momentum 0.01, swish, squeeze-excitation on the pooled map, drop-connect on the residual
blocks in training only. The 1/16 (`reduction_4`, 112 ch) and 1/32 (`reduction_5`, 320 ch)
endpoints are fused by HDMapNet's `Up`: bilinear x2 with align_corners=True, concat
[skip, upsampled], two conv3x3-BN-ReLU without bias. Two heads, as in the reference:
  fusion_channels == 0: HDMapNet / P-MapNet / MapKD camera `CamEncode(C)`: Up(432, C) is the
    output (no 1x1 conv).
  fusion_channels > 0:  lift-splat `CamEncode(D, C)` / MapKD `CamEncode_L`: Up(432, 512), then a
    1x1 conv with bias (`depthnet`) to out_channels.
Known differences, none at the reference size in eval mode: efficientnet_pytorch pads with
TF-SAME amounts precomputed for a 224 x 224 image, equal to TF-SAME (ours) only when H and W are
multiples of 32 (128 x 352 is). BatchNorm is models/batch_norm.py's: torch's running update
(unbiased batch variance), which nn.BatchNorm does not have.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.models import batch_norm as torch_bn
from mapkd_jax.models.depthwise import PADDINGS, DepthwiseConv, pointwise_conv
from mapkd_jax.models.resample import resize_bilinear_align_corners

# EfficientNet-B0 stage table (Tan & Le 2019): the definition of the architecture, not a knob.
# (expand_ratio, out_channels, repeats, first_stride, kernel_size)
EFFICIENTNET_B0_STAGES = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),   # last stage at 1/16: the 'reduction_4' endpoint
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),   # 1/32: the 'reduction_5' endpoint
)
EFFICIENTNET_B0_STEM = 32
EFFICIENTNET_SE_RATIO = 0.25
ENCODER_KINDS = ('efficientnet_b0', 'resnet_small')


# BatchNorm of efficientnet_pytorch (batch_norm_epsilon 1e-3, batch_norm_momentum 0.99 in TF
# terms = torch momentum 0.01). Flax's momentum is the weight of the OLD running value, i.e.
# 1 - torch momentum. torch's default BatchNorm2d (eps 1e-5, momentum 0.1) is TORCH_BN.
EFFICIENTNET_BN = dict(bn_eps=1e-3, bn_momentum=0.99)
TORCH_BN = dict(bn_eps=1e-5, bn_momentum=0.9)


def _batch_norm(train, dtype, eps=1e-5, momentum=0.99):
  return torch_bn.BatchNorm(use_running_average=not train, epsilon=eps, momentum=momentum,
                           dtype=dtype)


def remat_block(module_cls, enabled: bool, static_argnums=(2,)):
  """`module_cls`, or its `nn.remat` (activations recomputed in the backward) when `enabled`.

  A rematted block keeps only its inputs for the backward and recomputes the rest, at the cost
  of one more forward of the block. Measured on XLA:CPU at the reference size, batch 8, this
  did not lower the compiled step's peak (student 21.1 -> 21.5 GiB, teacher with the ViT's
  hd.remat 48.2 -> 48.6): the peak sits in the backward of the 200 x 400 decoder heads, where a
  head's recomputed activations are as large as what remat saves, plus XLA:CPU's transposed
  copies for convolution kernel gradients. The switches stay for backends whose scheduler
  and convolutions differ (TPU, GPU: unmeasured). `static_argnums` counts `self` as 0 and
  must cover `train` (Python control flow) and any other non-array argument, which is why the
  blocks take `train` positionally. Flax names a lifted class 'Checkpoint<Name>', so callers
  give rematted blocks their explicit names (the same names as without remat, which the
  converters and parity tests read).
  """
  return nn.remat(module_cls, static_argnums=static_argnums) if enabled else module_cls


def conv_padding(padding: str, kernel: int):
  """Flax padding for a square kernel: 'SAME' (TF-SAME) or 'TORCH' (symmetric kernel // 2).

  TF-SAME (what efficientnet_pytorch's static/dynamic same-padding convs do) pads
  max((ceil(n/s) - 1) s + k - n, 0) in total, the extra pixel at the end; torch
  `Conv2d(padding=k // 2)` pads k // 2 on both sides. They agree at stride 1 (odd k) and
  differ at stride 2 on even inputs (e.g. 3x3: SAME pads (0, 1), TORCH (1, 1)).
  """
  if padding == 'SAME':
    return 'SAME'
  if padding == 'TORCH':
    return ((kernel // 2, kernel // 2),) * 2
  raise ValueError(f'conv padding must be one of {PADDINGS}, got {padding!r}')


class ConvBNAct(nn.Module):
  """Conv (no bias) -> BatchNorm -> activation (identity when `act` is None).

  Attributes:
    padding: 'SAME' (TF-SAME) or 'TORCH' (symmetric kernel // 2); see `conv_padding`.
    bn_eps, bn_momentum: BatchNorm epsilon and Flax momentum (= 1 - torch momentum).
  """
  features: int
  kernel: int = 3
  stride: int = 1
  groups: int = 1
  act: str | None = 'relu'   # 'relu', 'swish' or None
  padding: str = 'SAME'
  bn_eps: float = 1e-5
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32   # compute dtype (precision.compute_dtype); params stay float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.groups > 1 and self.groups == self.features == x.shape[-1]:
      # Depthwise (EfficientNet's MBConv): same parameter and name as the nn.Conv below.
      x = DepthwiseConv(self.kernel, self.stride, self.padding, dtype=self.dtype,
                        name='Conv_0')(x)
    else:
      # Inference runs a 1x1 conv as a matmul (depthwise.pointwise_conv, same parameters,
      # faster on XLA:CPU); training keeps nn.Conv's convolution (train step unchanged).
      pointwise = not train and self.kernel == 1 and self.stride == 1 and self.groups == 1
      x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                  padding=conv_padding(self.padding, self.kernel),
                  feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                  conv_general_dilated=pointwise_conv if pointwise else None)(x)
    x = _batch_norm(train, self.dtype, self.bn_eps, self.bn_momentum)(x)
    if self.act == 'relu':
      x = nn.relu(x)
    elif self.act == 'swish':
      x = nn.swish(x)
    return x


class MBConv(nn.Module):
  """Inverted residual block with squeeze-excitation (efficientnet_pytorch `MBConvBlock`).

  expand 1x1 (when expand_ratio != 1) -> depthwise kxk -> SE (pool, 1x1 reduce with bias,
  swish, 1x1 expand with bias, sigmoid gate) -> project 1x1 (no activation) -> drop-connect and
  identity skip when stride 1 and channels unchanged.

  Attributes:
    drop_connect_rate: probability of dropping the residual branch per sample, in training
      only (reference: 0.2 * block_index / 16); needs the 'dropout' rng when > 0.
  """
  features: int
  expand_ratio: int
  kernel: int
  stride: int
  drop_connect_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), features].

    `train` may be positional (static under remat_block)."""
    in_features = x.shape[-1]
    hidden = in_features * self.expand_ratio
    y = x
    if self.expand_ratio != 1:
      y = ConvBNAct(hidden, kernel=1, act='swish', **EFFICIENTNET_BN, dtype=self.dtype)(
          y, train=train)
    y = ConvBNAct(hidden, kernel=self.kernel, stride=self.stride, groups=hidden,
                  act='swish', **EFFICIENTNET_BN, dtype=self.dtype)(y, train=train)
    squeezed = max(1, int(in_features * EFFICIENTNET_SE_RATIO))
    scale = jnp.mean(y, axis=(1, 2), keepdims=True)
    scale = nn.swish(nn.Conv(squeezed, (1, 1), dtype=self.dtype)(scale))
    y = y * nn.sigmoid(nn.Conv(hidden, (1, 1), dtype=self.dtype)(scale))
    y = ConvBNAct(self.features, kernel=1, act=None, **EFFICIENTNET_BN, dtype=self.dtype)(
        y, train=train)
    if self.stride == 1 and in_features == self.features:
      if train and self.drop_connect_rate > 0:
        # Per-sample stochastic depth, as efficientnet_pytorch's drop_connect: keep the branch
        # with probability 1 - rate and rescale it by 1 / (1 - rate).
        keep = 1.0 - self.drop_connect_rate
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0], 1, 1, 1))
        y = y * (mask.astype(y.dtype) / keep)
      y = y + x
    return y


class FuseUp(nn.Module):
  """HDMapNet's `Up`: upsample `deep` to `skip`'s size (bilinear, align_corners=True), concat
  [skip, deep], two conv3x3 (no bias) -BN-ReLU with torch-default BatchNorm.

  The reference upsamples by scale_factor=2 (camera `Up`) or to skip's size (MapKD `Up_L`);
  with align_corners=True both sample the same positions whenever 2 x deep == skip, so
  resizing to skip's size is the same function and also defined for odd sizes.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, deep, skip, train: bool):
    """deep: [B, h, w, Cd], skip: [B, H, W, Cs] -> [B, H, W, features]."""
    deep = resize_bilinear_align_corners(deep, skip.shape[1:3])
    x = jnp.concatenate([skip, deep], axis=-1)
    x = ConvBNAct(self.features, **TORCH_BN, dtype=self.dtype)(x, train=train)
    return ConvBNAct(self.features, **TORCH_BN, dtype=self.dtype)(x, train=train)


class EfficientNetB0(nn.Module):
  """EfficientNet-B0 trunk; 1/32 features fused into 1/16 (HDMapNet `CamEncode`).

  Attributes:
    out_channels: channels of the returned map.
    fusion_channels: 0 = HDMapNet camera CamEncode (the fusion `Up` outputs out_channels
      directly); > 0 = lift-splat CamEncode (`Up` to fusion_channels, 512 in the reference,
      then a 1x1 conv with bias, `depthnet`, to out_channels).
    drop_connect_rate: efficientnet_pytorch's global drop_connect_rate (0.2 for B0); block i
      of 16 uses rate * i / 16, in training only.
    dtype: compute dtype (precision.compute_dtype).
    remat: recompute each MBConv block and the fusion `Up` in the backward (remat_block);
      same parameters, names and function.
  """
  out_channels: int
  fusion_channels: int
  drop_connect_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool, return_endpoints: bool = False):
    """images: [B', H, W, 3] -> [B', ceil(H/16), ceil(W/16), out_channels].

    With return_endpoints, returns (output, {'reduction_4': [B', H/16, W/16, 112],
    'reduction_5': [B', H/32, W/32, 320]}) (for parity tests).
    """
    if images.shape[1] <= 16:
      # HDMapNet finds its endpoints where the height shrinks; at H <= 16 the 1/16 -> 1/32
      # stride leaves height 1 unchanged and the reference has no 'reduction_5'.
      raise ValueError(f'efficientnet_b0 needs image height > 16 (reference endpoints), got '
                       f'{images.shape[1]}')
    x = ConvBNAct(EFFICIENTNET_B0_STEM, stride=2, act='swish', **EFFICIENTNET_BN,
                  dtype=self.dtype)(images, train=train)
    num_blocks = sum(stage[2] for stage in EFFICIENTNET_B0_STAGES)
    block_cls = remat_block(MBConv, self.remat)
    fuse_cls = remat_block(FuseUp, self.remat, static_argnums=(3,))
    endpoints, index = [], 0
    for expand, features, repeats, stride, kernel in EFFICIENTNET_B0_STAGES:
      for i in range(repeats):
        # Explicit names = Flax's automatic ones (MBConv_<index>), which convert/efficientnet.py
        # reads; a rematted class would otherwise be auto-named CheckpointMBConv_<index>.
        x = block_cls(features, expand, kernel, stride if i == 0 else 1,
                      drop_connect_rate=self.drop_connect_rate * index / num_blocks,
                      dtype=self.dtype, name=f'MBConv_{index}')(x, train)
        index += 1
      endpoints.append(x)
    reduction_4, reduction_5 = endpoints[4], endpoints[-1]
    if self.fusion_channels:
      x = fuse_cls(self.fusion_channels, dtype=self.dtype, name='FuseUp_0')(
          reduction_5, reduction_4, train)
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)
    else:
      x = fuse_cls(self.out_channels, dtype=self.dtype, name='FuseUp_0')(
          reduction_5, reduction_4, train)
    if return_endpoints:
      return x, {'reduction_4': reduction_4, 'reduction_5': reduction_5}
    return x


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs) with a projected shortcut when shapes change.

  Attributes:
    padding: 'SAME' or 'TORCH' (torchvision's resnet pads k // 2: use 'TORCH' for parity).
    bn_eps, bn_momentum: BatchNorm epsilon and Flax momentum (torchvision: TORCH_BN).
  """
  features: int
  stride: int = 1
  padding: str = 'SAME'
  bn_eps: float = 1e-5
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    """x: [B, H, W, Cin] -> [B, H/stride, W/stride, features]."""
    common = dict(padding=self.padding, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                  dtype=self.dtype)
    y = ConvBNAct(self.features, stride=self.stride, **common)(x, train=train)
    y = ConvBNAct(self.features, act=None, **common)(y, train=train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = ConvBNAct(self.features, kernel=1, stride=self.stride, act=None, **common)(
          x, train=train)
    return nn.relu(x + y)


class ResNetSmall(nn.Module):
  """Stem (stride 2) and three stride-2 basic blocks -> 1/16, then a 1x1 conv.

  Attributes:
    out_channels: channels of the returned map.
    widths: four widths: the stem and the three stages.
    dtype: compute dtype (precision.compute_dtype).
    remat: recompute each basic block in the backward (remat_block).
  """
  out_channels: int
  widths: Sequence[int]
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images: [B', H, W, 3] -> [B', H/16, W/16, out_channels]."""
    if len(self.widths) != 4:
      raise ValueError(f'resnet_widths must have 4 entries (stem + 3 stages), got {self.widths}')
    x = ConvBNAct(self.widths[0], stride=2, dtype=self.dtype)(images, train=train)
    block_cls = remat_block(BasicBlock, self.remat)
    for index, width in enumerate(self.widths[1:]):
      x = block_cls(width, stride=2, dtype=self.dtype, name=f'BasicBlock_{index}')(x, train)
    return nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)


class ImageEncoder(nn.Module):
  """Dispatches on `kind` (config key `image_encoder` of the camera / lss sections).

  Attributes:
    kind: one of ENCODER_KINDS.
    out_channels: channels of the returned 1/16 map.
    fusion_channels: EfficientNet head (config `fusion_channels`): 0 = HDMapNet camera
      CamEncode, > 0 = lift-splat CamEncode with a 1x1 conv (see EfficientNetB0).
    resnet_widths: ResNetSmall widths (config `resnet_widths`).
    dtype: compute dtype (precision.compute_dtype).
  """
  kind: str
  out_channels: int
  fusion_channels: int
  resnet_widths: Sequence[int]
  drop_connect_rate: float = 0.0   # EfficientNet stochastic depth (config `drop_connect_rate`)
  dtype: Any = jnp.float32
  remat: bool = False   # recompute each block in the backward (config `remat`)

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images: [B', H, W, 3] -> [B', ceil(H/16), ceil(W/16), out_channels]."""
    if self.kind == 'efficientnet_b0':
      return EfficientNetB0(self.out_channels, self.fusion_channels,
                            drop_connect_rate=self.drop_connect_rate, dtype=self.dtype,
                            remat=self.remat)(images, train=train)
    if self.kind == 'resnet_small':
      return ResNetSmall(self.out_channels, tuple(self.resnet_widths), dtype=self.dtype,
                         remat=self.remat)(images, train=train)
    raise ValueError(f'config image_encoder: unknown {self.kind!r}; known: {list(ENCODER_KINDS)}')


def encoder_from_section(section, out_channels, dtype=jnp.float32):
  """ImageEncoder for a config section with image_encoder / fusion_channels / resnet_widths /
  drop_connect_rate / remat (absent in configs saved before it existed: False)."""
  return ImageEncoder(kind=section.image_encoder, out_channels=out_channels,
                      fusion_channels=section.fusion_channels,
                      resnet_widths=tuple(section.resnet_widths),
                      drop_connect_rate=section.drop_connect_rate, dtype=dtype,
                      remat=bool(section.get('remat', False)))
