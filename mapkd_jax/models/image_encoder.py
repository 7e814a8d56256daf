"""Per-camera image encoders returning the 1/16 feature map the view transforms need.

`ImageEncoder(kind=...)` dispatches on `config.model.camera.image_encoder` (or
`config.model.lss.image_encoder`):
  'efficientnet_b0': EfficientNet-B0 (randomly initialised; no weights are downloaded), with
    the HDMapNet-style fusion of the 1/32 map (upsampled) into the 1/16 map.
  'resnet_small': a few residual stages, for tiny CPU configs.
Both map images [B', H, W, 3] to [B', ceil(H/16), ceil(W/16), out_channels].
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def _batch_norm(train, dtype):
  return nn.BatchNorm(use_running_average=not train, dtype=dtype)


class ConvBNAct(nn.Module):
  """Conv (SAME padding) -> BatchNorm -> activation (identity when `act` is None)."""
  features: int
  kernel: int = 3
  stride: int = 1
  groups: int = 1
  act: str | None = 'relu'   # 'relu', 'swish' or None
  dtype: Any = jnp.float32   # compute dtype (precision.compute_dtype); params stay float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding='SAME',
                feature_group_count=self.groups, use_bias=False, dtype=self.dtype)(x)
    x = _batch_norm(train, self.dtype)(x)
    if self.act == 'relu':
      x = nn.relu(x)
    elif self.act == 'swish':
      x = nn.swish(x)
    return x


class MBConv(nn.Module):
  """Inverted residual block with squeeze-excitation (EfficientNet)."""
  features: int
  expand_ratio: int
  kernel: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    in_features = x.shape[-1]
    hidden = in_features * self.expand_ratio
    y = x
    if self.expand_ratio != 1:
      y = ConvBNAct(hidden, kernel=1, act='swish', dtype=self.dtype)(y, train=train)
    y = ConvBNAct(hidden, kernel=self.kernel, stride=self.stride, groups=hidden,
                  act='swish', dtype=self.dtype)(y, train=train)
    squeezed = max(1, int(in_features * EFFICIENTNET_SE_RATIO))
    scale = jnp.mean(y, axis=(1, 2), keepdims=True)
    scale = nn.swish(nn.Conv(squeezed, (1, 1), dtype=self.dtype)(scale))
    y = y * nn.sigmoid(nn.Conv(hidden, (1, 1), dtype=self.dtype)(scale))
    y = ConvBNAct(self.features, kernel=1, act=None, dtype=self.dtype)(y, train=train)
    if self.stride == 1 and in_features == self.features:
      y = y + x
    return y


class FuseUp(nn.Module):
  """Upsamples `deep` to `skip`'s size, concatenates, two conv-BN-ReLU (HDMapNet's `Up`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, deep, skip, *, train: bool):
    deep = jax.image.resize(deep, skip.shape[:3] + deep.shape[3:], 'bilinear')
    x = jnp.concatenate([skip, deep], axis=-1)
    x = ConvBNAct(self.features, dtype=self.dtype)(x, train=train)
    return ConvBNAct(self.features, dtype=self.dtype)(x, train=train)


class EfficientNetB0(nn.Module):
  """EfficientNet-B0 trunk; 1/32 features fused into 1/16, then a 1x1 conv.

  Attributes:
    out_channels: channels of the returned map.
    fusion_channels: width of the 1/16 + 1/32 fusion convs (512 in HDMapNet).
    dtype: compute dtype (precision.compute_dtype).
  """
  out_channels: int
  fusion_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images: [B', H, W, 3] -> [B', H/16, W/16, out_channels]."""
    x = ConvBNAct(EFFICIENTNET_B0_STEM, stride=2, act='swish', dtype=self.dtype)(
        images, train=train)
    endpoints = []
    for expand, features, repeats, stride, kernel in EFFICIENTNET_B0_STAGES:
      for i in range(repeats):
        x = MBConv(features, expand, kernel, stride if i == 0 else 1, dtype=self.dtype)(
            x, train=train)
      endpoints.append(x)
    x = FuseUp(self.fusion_channels, dtype=self.dtype)(endpoints[-1], endpoints[4], train=train)
    return nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs) with a projected shortcut when shapes change."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = ConvBNAct(self.features, stride=self.stride, dtype=self.dtype)(x, train=train)
    y = ConvBNAct(self.features, act=None, dtype=self.dtype)(y, train=train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = ConvBNAct(self.features, kernel=1, stride=self.stride, act=None, dtype=self.dtype)(
          x, train=train)
    return nn.relu(x + y)


class ResNetSmall(nn.Module):
  """Stem (stride 2) and three stride-2 basic blocks -> 1/16, then a 1x1 conv.

  Attributes:
    out_channels: channels of the returned map.
    widths: four widths: the stem and the three stages.
    dtype: compute dtype (precision.compute_dtype).
  """
  out_channels: int
  widths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images: [B', H, W, 3] -> [B', H/16, W/16, out_channels]."""
    if len(self.widths) != 4:
      raise ValueError(f'resnet_widths must have 4 entries (stem + 3 stages), got {self.widths}')
    x = ConvBNAct(self.widths[0], stride=2, dtype=self.dtype)(images, train=train)
    for width in self.widths[1:]:
      x = BasicBlock(width, stride=2, dtype=self.dtype)(x, train=train)
    return nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)


class ImageEncoder(nn.Module):
  """Dispatches on `kind` (config key `image_encoder` of the camera / lss sections).

  Attributes:
    kind: one of ENCODER_KINDS.
    out_channels: channels of the returned 1/16 map.
    fusion_channels: EfficientNet fusion width (config `fusion_channels`).
    resnet_widths: ResNetSmall widths (config `resnet_widths`).
    dtype: compute dtype (precision.compute_dtype).
  """
  kind: str
  out_channels: int
  fusion_channels: int
  resnet_widths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images: [B', H, W, 3] -> [B', ceil(H/16), ceil(W/16), out_channels]."""
    if self.kind == 'efficientnet_b0':
      return EfficientNetB0(self.out_channels, self.fusion_channels, dtype=self.dtype)(
          images, train=train)
    if self.kind == 'resnet_small':
      return ResNetSmall(self.out_channels, tuple(self.resnet_widths), dtype=self.dtype)(
          images, train=train)
    raise ValueError(f'config image_encoder: unknown {self.kind!r}; known: {list(ENCODER_KINDS)}')


def encoder_from_section(section, out_channels, dtype=jnp.float32):
  """ImageEncoder for a config section with image_encoder/fusion_channels/resnet_widths."""
  return ImageEncoder(kind=section.image_encoder, out_channels=out_channels,
                      fusion_channels=section.fusion_channels,
                      resnet_widths=tuple(section.resnet_widths), dtype=dtype)
