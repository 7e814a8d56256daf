"""Map priors of the teacher and coach: SD-map cross-attention and the HD-map ViT refinement.

SD prior (P-MapNet `model/utils/sdmap_cross_attn.py`, `pmapnet_sd.py`): the SD raster goes
through three stride-2 convs to tokens; BEV tokens (`bev_small` after a 1x1 projection to d)
run DETR-style post-norm decoder layers: self-attention, cross-attention to the SD tokens, FFN,
each with dropout, residual and LayerNorm, then a final LayerNorm. A 2-D sine positional
encoding is added to queries and keys. Each token grid gets its own normalized encoding, so a
SD grid of a slightly different size (conv rounding) still lines up in space with the BEV grid
(at equal sizes, which the reference asserts, the two encodings are the reference's one `pos`).
Numbers as the reference's torch modules have them: LayerNorm eps 1e-5, BatchNorm eps 1e-5 and
torch momentum 0.1, DETR's normalization y / (h + 1e-6). convert/sd_attention.py maps the
reference's `input_proj.`, `conv_osm.` and `sdmap_crossattn.` tensors onto these modules.

HD prior (P-MapNet `model/utils/map_mae_head.py`): a ViT over patches of the 4-channel semantic
map, pretrained as a masked autoencoder on ground-truth rasters (`HDMapMAE`) and then used to
refine the teacher's semantic logits. Departure: the reference decodes ViT tokens with two
transposed convs, a resize and a full ResNet BEV decoder; here each token is linearly expanded
to its patch's pixels (MAE's patch decoder) and refined by one conv before the three heads.
The module is always a submodule named `hd_prior`, so `params['hd_prior']` moves unchanged
from the hd_pretrain checkpoint into the teacher and coach.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.models import precision
from mapkd_jax.models import lidar
from mapkd_jax.models.lidar import ConvBNReLU


# torch nn.LayerNorm's default epsilon (Flax's is 1e-6); DETR's normalization epsilon.
TORCH_LN_EPS = 1e-5
DETR_POS_EPS = 1e-6


def sine_position_encoding(height, width, *, num_feats, temperature, scale=2 * math.pi):
  """DETR 2-D sine encoding of a normalized token grid (P-MapNet PositionEmbeddingSine,
  normalize=True, no padding mask).

  Row i has y = (i + 1) / (height + 1e-6) * scale, column j has x = (j + 1) / (width + 1e-6)
  * scale (DETR's epsilon). Channel
  2m (2m + 1) of each half is sin (cos) of the coordinate / temperature ** (2m / num_feats).

  Args:
    height, width: token grid size.
    num_feats: channels per axis (even); the output has 2 * num_feats (y half, then x half).
    temperature: wavelength base.
    scale: coordinate range after normalization.

  Returns:
    [height, width, 2 * num_feats] float32.
  """
  if num_feats % 2:
    raise ValueError(f'sine_position_encoding: num_feats must be even, got {num_feats}')
  y = (jnp.arange(height, dtype=jnp.float32) + 1) / jnp.float32(height + DETR_POS_EPS) * scale
  x = (jnp.arange(width, dtype=jnp.float32) + 1) / jnp.float32(width + DETR_POS_EPS) * scale
  exponent = 2 * (jnp.arange(num_feats) // 2) / num_feats
  inv_freq = 1.0 / (temperature ** exponent)
  is_sin = jnp.arange(num_feats) % 2 == 0

  def encode(coord):
    angle = coord[:, None] * inv_freq[None, :]
    return jnp.where(is_sin, jnp.sin(angle), jnp.cos(angle))

  pos_y = jnp.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
  pos_x = jnp.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def attention_float32_softmax(query, key, value, *, dropout_rng=None, dropout_rate=0.0,
                              broadcast_dropout=True, deterministic=False, dtype=None,
                              precision=None):
  """`nn.dot_product_attention` with the softmax in float32 and both matmuls in value.dtype.

  Flax's own `force_fp32_for_softmax` keeps the weights float32, which would promote the
  weights @ values matmul to float32 under bfloat16 compute; here they are cast back first.
  q, k, v: [B, L, heads, head_dim] -> [B, Lq, heads, head_dim].
  """
  weights = nn.dot_product_attention_weights(
      query, key, broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
      dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype, precision=precision,
      force_fp32_for_softmax=True)
  return jnp.einsum('...hqk,...khd->...qhd', weights.astype(value.dtype), value,
                    precision=precision)


class SDPriorEncoder(nn.Module):
  """SD raster [B, Hb, Wb, 1] -> tokens [B, ~Hb/8, ~Wb/8, channels[-1]] (three k4 s2 convs)."""
  channels: Sequence[int]
  dtype: Any = jnp.float32   # compute dtype (precision.compute_dtype); params stay float32

  @nn.compact
  def __call__(self, sd, *, train: bool):
    x = sd
    for i, channels in enumerate(self.channels):
      last = i == len(self.channels) - 1
      # k4 s2 pad 1 as in the reference: each conv halves the grid (floor).
      x = nn.Conv(channels, (4, 4), strides=2, padding=((1, 1), (1, 1)), use_bias=not last,
                  dtype=self.dtype)(x)
      if last:
        x = lidar.batch_norm(train, self.dtype)(x)   # torch BatchNorm2d defaults
      x = nn.relu(x)
    return x


class SDCrossAttentionLayer(nn.Module):
  """One post-norm DETR decoder layer: BEV self-attn, BEV->SD cross-attn, FFN.

  bev: [B, N, d], sd: [B, M, d], bev_pos: [N, d], sd_pos: [M, d] -> [B, N, d].
  """
  num_heads: int
  ffn_dim: int
  dropout: float
  dtype: Any = jnp.float32   # compute dtype; attention softmax and norm statistics in float32

  @nn.compact
  def __call__(self, bev, sd, bev_pos, sd_pos, *, train: bool):
    d_model = bev.shape[-1]

    def attention(name):
      return nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train,
          dtype=self.dtype, attention_fn=attention_float32_softmax, name=name)

    def drop(x):
      return nn.Dropout(self.dropout, deterministic=not train)(x)

    def norm():
      return nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype)

    q = bev + bev_pos
    bev = norm()(bev + drop(attention('self_attn')(q, q, bev)))
    update = attention('cross_attn')(bev + bev_pos, sd + sd_pos, sd)
    bev = norm()(bev + drop(update))
    hidden = drop(nn.relu(nn.Dense(self.ffn_dim, dtype=self.dtype)(bev)))
    return norm()(bev + drop(nn.Dense(d_model, dtype=self.dtype)(hidden)))


class SDPriorFusion(nn.Module):
  """`bev_small` attends to the SD prior.

  Attributes:
    encoder_channels: SD conv widths; the last must equal d_model.
    d_model, num_heads, num_layers, ffn_dim, dropout: decoder layers (reference 64, 8, 2, 192,
      0.1).
    pos_temperature: sine encoding wavelength base (10000).
    dtype: compute dtype (precision.compute_dtype).
  """
  encoder_channels: Sequence[int]
  d_model: int
  num_heads: int
  num_layers: int
  ffn_dim: int
  dropout: float
  pos_temperature: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bev_small, sd_prior, *, train: bool):
    """bev_small: [B, h, w, C], sd_prior: [B, Hb, Wb, 1] -> [B, h, w, d_model]."""
    if self.encoder_channels[-1] != self.d_model:
      raise ValueError(f'config.model.sd: encoder_channels[-1]={self.encoder_channels[-1]} '
                       f'must equal d_model={self.d_model}')
    batch, height, width, _ = bev_small.shape
    bev = nn.Conv(self.d_model, (1, 1), dtype=self.dtype, name='input_proj')(bev_small)
    sd = SDPriorEncoder(self.encoder_channels, dtype=self.dtype)(sd_prior, train=train)
    sd_h, sd_w = sd.shape[1:3]
    # Computed in float32, added in the compute dtype (a float32 term would promote the tokens).
    encode = lambda h, w: sine_position_encoding(
        h, w, num_feats=self.d_model // 2, temperature=self.pos_temperature).reshape(
            h * w, -1).astype(self.dtype)
    bev_pos, sd_pos = encode(height, width), encode(sd_h, sd_w)
    bev = bev.reshape(batch, height * width, self.d_model)
    sd = sd.reshape(batch, sd_h * sd_w, self.d_model)
    for _ in range(self.num_layers):
      bev = SDCrossAttentionLayer(self.num_heads, self.ffn_dim, self.dropout, dtype=self.dtype)(
          bev, sd, bev_pos, sd_pos, train=train)
    bev = nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype)(bev)
    return bev.reshape(batch, height, width, self.d_model)


class ViTBlock(nn.Module):
  """Pre-norm transformer block (timm ViT): x + MHA(LN x); x + MLP(LN x). x: [B, N, D]."""
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: Any = jnp.float32   # compute dtype; attention softmax and norm statistics in float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout,
                                        deterministic=not train, dtype=self.dtype,
                                        attention_fn=attention_float32_softmax)(y, y)
    x = x + y
    y = nn.gelu(nn.Dense(width * self.mlp_ratio, dtype=self.dtype)(
        nn.LayerNorm(dtype=self.dtype)(x)))
    y = nn.Dropout(self.dropout, deterministic=not train)(
        nn.Dense(width, dtype=self.dtype)(y))
    return x + y


class HDPrior(nn.Module):
  """ViT refinement of a semantic map.

  Attributes:
    patch_size, width, depth, num_heads, mlp_ratio, dropout: the ViT (reference ViT-B/8).
    decoder_channels: per-pixel features after expanding tokens back to patches.
    num_classes: semantic channels (background + classes).
    embedding_dim: instance embedding channels.
    direction_classes: direction channels (bins + none).
    dtype: compute dtype (precision.compute_dtype).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: int
  dropout: float
  decoder_channels: int
  num_classes: int
  embedding_dim: int
  direction_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, semantic, *, train: bool):
    """semantic: [B, Hb, Wb, num_classes] -> {'semantic', 'embedding', 'direction'} maps."""
    batch, height, width, _ = semantic.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'config.model.hd.patch_size={p} must divide the BEV canvas '
                       f'{height}x{width}')
    grid_h, grid_w = height // p, width // p
    x = nn.Conv(self.width, (p, p), strides=p, padding='VALID', dtype=self.dtype,
                name='patch_embed')(semantic)
    x = x.reshape(batch, grid_h * grid_w, self.width)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (grid_h * grid_w, self.width))
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos.astype(self.dtype))
    for _ in range(self.depth):
      x = ViTBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype)(
          x, train=train)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    x = nn.Dense(p * p * self.decoder_channels, dtype=self.dtype, name='patch_decoder')(x)
    x = x.reshape(batch, grid_h, grid_w, p, p, self.decoder_channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, self.decoder_channels)
    x = ConvBNReLU(self.decoder_channels, dtype=self.dtype)(x, train=train)
    head = lambda features, name: nn.Conv(features, (1, 1), dtype=self.dtype, name=name)(x)
    return {
        'semantic': head(self.num_classes, 'semantic_head'),
        'embedding': head(self.embedding_dim, 'embedding_head'),
        'direction': head(self.direction_classes, 'direction_head'),
    }


def random_patch_mask(rng, batch, grid_h, grid_w, *, mask_ratio):
  """Exactly round(mask_ratio * grid_h * grid_w) random patches per sample (MAE shuffle).

  Returns:
    [batch, grid_h, grid_w] bool, True = masked patch.
  """
  if not 0.0 <= mask_ratio <= 1.0:
    raise ValueError(f'config.model.hd.mask_ratio must be in [0, 1], got {mask_ratio}')
  num_patches = grid_h * grid_w
  num_masked = int(round(mask_ratio * num_patches))
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1), axis=1)
  return (rank < num_masked).reshape(batch, grid_h, grid_w)


class HDMapMAE(nn.Module):
  """hd_pretrain model: reconstruct one-hot ground-truth rasters from randomly masked ones.

  Reads config.model.hd (ViT sizes, mask_ratio), config.model.decoder.embedding_dim and
  config.data. Needs the 'mask' rng stream, also in evaluation (the masking is the task).

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch['semantic']: [B, Hb, Wb] int -> {'reconstruction': [B, Hb, Wb, K] logits,
    'mask': [B, Hb, Wb] float (1 = masked pixel), 'target': [B, Hb, Wb, K] one-hot}."""
    hd_prior = HDPrior(**hd_prior_kwargs(self.config), name='hd_prior')
    target = jax.nn.one_hot(batch['semantic'], hd_prior.num_classes, dtype=jnp.float32)
    b, height, width = batch['semantic'].shape
    p = hd_prior.patch_size
    if height % p or width % p:
      raise ValueError(f'config.model.hd.patch_size={p} must divide the BEV canvas '
                       f'{height}x{width}')
    patch_mask = random_patch_mask(self.make_rng('mask'), b, height // p, width // p,
                                   mask_ratio=self.config.model.hd.mask_ratio)
    mask = jnp.repeat(jnp.repeat(patch_mask, p, axis=1), p, axis=2).astype(jnp.float32)
    # Masked patches read as "no information" (all-zero one-hot), not as background.
    out = hd_prior(target * (1.0 - mask[..., None]), train=train)
    return precision.outputs_to_float32(
        {'reconstruction': out['semantic'], 'mask': mask, 'target': target})


def hd_prior_kwargs(config):
  """HDPrior fields for a full config (config.model.hd, class/bin counts from config.data,
  compute dtype from config.mixed_precision)."""
  cfg = config.model.hd
  return dict(
      patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, decoder_channels=cfg.decoder_channels,
      num_classes=len(config.data.classes) + 1,
      embedding_dim=config.model.decoder.embedding_dim,
      direction_classes=config.data.direction_bins + 1,
      dtype=precision.compute_dtype(config))


def sd_fusion_from_config(config, name=None):
  """SDPriorFusion for a full config (config.model.sd); `name` names the submodule."""
  cfg = config.model.sd
  return SDPriorFusion(
      encoder_channels=tuple(cfg.encoder_channels), d_model=cfg.d_model,
      num_heads=cfg.num_heads, num_layers=cfg.num_layers, ffn_dim=cfg.ffn_dim,
      dropout=cfg.dropout, pos_temperature=cfg.pos_temperature,
      dtype=precision.compute_dtype(config), name=name)
