"""BEV neck (stride-2 convs to `bev_small` and transposed convs back) and the BEV decoder.

BEVNeck.down: num_layers x (3x3 stride-2 conv, BN, ReLU) -> `bev_small` (TGPD aligns it).
BEVNeck.up: num_layers x (3x3 stride-2 transposed conv, BN, ReLU), then a bilinear resize
to the requested canvas when the canvas is not a multiple of 2**num_layers.
BEVDecoder: ResNet-18-style trunk (stem + layers 1-3) with the HDMapNet upsampling and three
heads: semantic (classes + background), instance embedding, direction (bins + none).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.models import precision
from mapkd_jax.models.image_encoder import BasicBlock, ConvBNAct


class BEVNeck(nn.Module):
  """Reads config.model.neck (channels, num_layers).

  Use `neck.down(x, train=...)` and `neck.up(x, canvas_hw, train=...)` from a parent's
  compact method (the teacher puts SD fusion between them; the student uses only `down`);
  `__call__` runs both and returns (bev_small, bev).

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  def setup(self):
    cfg = self.config.model.neck
    dtype = precision.compute_dtype(self.config)
    self.down_layers = [ConvBNAct(cfg.channels, stride=2, dtype=dtype)
                        for _ in range(cfg.num_layers)]
    self.up_convs = [nn.ConvTranspose(cfg.channels, (3, 3), strides=(2, 2), padding='SAME',
                                      use_bias=False, dtype=dtype)
                     for _ in range(cfg.num_layers)]
    self.up_norms = [nn.BatchNorm(dtype=dtype) for _ in range(cfg.num_layers)]

  def down(self, x, *, train: bool):
    """x: [B, Hb, Wb, Cin] -> bev_small [B, ceil(Hb/2^L), ceil(Wb/2^L), neck.channels]."""
    for layer in self.down_layers:
      x = layer(x, train=train)
    return x

  def up(self, x, canvas_hw, *, train: bool):
    """x: [B, h, w, C] -> [B, canvas_hw[0], canvas_hw[1], neck.channels]."""
    for conv, norm in zip(self.up_convs, self.up_norms):
      x = nn.relu(norm(conv(x), use_running_average=not train))
    if x.shape[1:3] != tuple(canvas_hw):
      x = jax.image.resize(x, (x.shape[0], *canvas_hw, x.shape[-1]), 'bilinear')
    return x

  def __call__(self, x, *, train: bool):
    """x: [B, Hb, Wb, Cin] -> (bev_small [B, h, w, C], bev [B, Hb, Wb, C])."""
    small = self.down(x, train=train)
    return small, self.up(small, x.shape[1:3], train=train)


class Head(nn.Module):
  """HDMapNet `up2`: bilinear x2 (to `out_hw`), 3x3 conv-BN-ReLU, 1x1 conv to `features`."""
  hidden: int
  features: int
  dtype: Any = jnp.float32   # compute dtype (precision.compute_dtype)

  @nn.compact
  def __call__(self, x, out_hw, *, train: bool):
    x = jax.image.resize(x, (x.shape[0], *out_hw, x.shape[-1]), 'bilinear')
    x = ConvBNAct(self.hidden, dtype=self.dtype)(x, train=train)
    return nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)


class BEVDecoder(nn.Module):
  """ResNet-18-style BEV decoder with semantic / embedding / direction heads.

  Reads config.model.decoder (stem_channels, layer_channels, blocks_per_layer, up_channels,
  head_channels, embedding_dim) and config.data (classes, direction_bins).

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
    # Stem: 7x7 stride-2 conv as in ResNet-18 (no max-pool, as in HDMapNet's BevEncode).
    x = nn.Conv(cfg.stem_channels, (7, 7), strides=2, padding='SAME', use_bias=False,
                dtype=dtype)(bev)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=dtype)(x))
    skip = None
    for i, width in enumerate(cfg.layer_channels):
      for block in range(cfg.blocks_per_layer):
        stride = 2 if (i > 0 and block == 0) else 1
        x = BasicBlock(width, stride=stride, dtype=dtype)(x, train=train)
      if i == 0:
        skip = x   # layer-1 output at 1/2 resolution
    x = jax.image.resize(x, (x.shape[0], *skip.shape[1:3], x.shape[-1]), 'bilinear')
    x = jnp.concatenate([skip, x], axis=-1)
    x = ConvBNAct(cfg.up_channels, dtype=dtype)(x, train=train)
    x = ConvBNAct(cfg.up_channels, dtype=dtype)(x, train=train)
    out_sizes = {'semantic': len(data.classes) + 1, 'embedding': cfg.embedding_dim,
                 'direction': data.direction_bins + 1}
    return {name: Head(cfg.head_channels, size, dtype=dtype, name=f'{name}_head')(
        x, canvas, train=train)
            for name, size in out_sizes.items()}
