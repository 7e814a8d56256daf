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

HD prior (P-MapNet `model/utils/map_mae_head.py` MapVisionTransformer, `mae_head` of the
teacher): a timm ViT over patches of the 4-channel semantic map, pretrained as a masked
autoencoder on ground-truth rasters (`HDMapMAE`) and then used to refine the teacher's semantic
logits; its tokens are decoded as the reference decodes them (two transposed convs, a resize,
a 1x1 conv + BatchNorm and a full BEV decoder). convert/vit.py maps the reference's tensors.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.models import precision
from mapkd_jax.models import lidar
from mapkd_jax.models.bev_decoder import BEVDecoder, ConvBN, resize_half_pixel
from mapkd_jax.models.image_encoder import remat_block


# torch nn.LayerNorm's default epsilon (Flax's is 1e-6); DETR's normalization epsilon.
TORCH_LN_EPS = 1e-5
# timm's ViT LayerNorm epsilon (partial(nn.LayerNorm, eps=1e-6)), P-MapNet's HD prior.
TIMM_LN_EPS = 1e-6
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
  def __call__(self, bev, sd, bev_pos, sd_pos, train: bool):
    """`train` is positional so that nn.remat can take it as static (SDPriorFusion.remat)."""
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
    remat: recompute each decoder layer in the backward (config.model.sd.remat): its
      attention maps over the BEV tokens are the layer's largest activations.
  """
  encoder_channels: Sequence[int]
  d_model: int
  num_heads: int
  num_layers: int
  ffn_dim: int
  dropout: float
  pos_temperature: float
  dtype: Any = jnp.float32
  remat: bool = False

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
    layer_cls = remat_block(SDCrossAttentionLayer, self.remat, static_argnums=(5,))
    for i in range(self.num_layers):   # explicit names: the same under remat (convert/)
      bev = layer_cls(self.num_heads, self.ffn_dim, self.dropout, dtype=self.dtype,
                      name=f'SDCrossAttentionLayer_{i}')(bev, sd, bev_pos, sd_pos, train)
    bev = nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype)(bev)
    return bev.reshape(batch, height, width, self.d_model)


class ViTBlock(nn.Module):
  """timm ViT `Block`: x + attn(norm1 x); x + mlp(norm2 x). x: [B, N, D].

  As timm builds it for P-MapNet's `vit_base_patch8`: LayerNorm eps 1e-6 (timm's; also Flax's
  default), qkv with bias split into `num_heads` contiguous blocks of D / heads features
  (Flax's DenseGeneral [D, heads, head_dim] layout; convert/vit.py splits timm's packed qkv),
  scale head_dim ** -0.5, exact (erf) GELU as torch nn.GELU, no LayerScale, no drop path.
  Submodules norm1, attn, norm2, fc1, fc2 mirror timm's names.
  """
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: Any = jnp.float32   # compute dtype; attention softmax and norm statistics in float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=TIMM_LN_EPS, dtype=self.dtype, name='norm1')(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout,
                                        deterministic=not train, dtype=self.dtype,
                                        attention_fn=attention_float32_softmax,
                                        name='attn')(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=TIMM_LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = nn.gelu(nn.Dense(width * self.mlp_ratio, dtype=self.dtype, name='fc1')(y),
                approximate=False)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(width, dtype=self.dtype, name='fc2')(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class _ScannedViTBlock(nn.Module):
  """ViTBlock with the scan carry signature (x, _) -> (x, None); `train` is an attribute
  because nn.scan passes only positional carries and scanned inputs."""
  num_heads: int
  mlp_ratio: int
  dropout: float
  train: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    return ViTBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
                    name='block')(x, train=self.train), None


def vit_blocks(depth, *, num_heads, mlp_ratio, dropout, train, remat, dtype, name):
  """`depth` identical ViT blocks as one nn.scan (MaxText practice): one block is traced and
  compiled once instead of `depth` times; parameters are stacked on a leading [depth] axis
  (params/<name>/block/..., convert/vit.py stacks the reference's blocks.{i}). With `remat`
  each block's activations are recomputed in the backward pass instead of stored (less
  memory, about one more forward of FLOPs). Call as `blocks(x, None)` -> (x, None)."""
  block = _ScannedViTBlock
  if remat:
    block = nn.remat(block, prevent_cse=False)   # inside a scan CSE cannot merge iterations
  stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                    'dropout': True},
                  length=depth)
  return stack(num_heads, mlp_ratio, dropout, train, dtype=dtype, name=name)


class ConvTranspose4x4(nn.Module):
  """torch ConvTranspose2d(kernel 4, stride 2, padding 1) with bias and no activation:
  [B, H, W, Cin] -> [B, 2H, 2W, features]. Kernel stored [kh, kw, Cin, Cout] for the forward
  correlation of the dilated input (torch's weight flipped: convert/pmapnet.py
  transposed_conv_kernel), padded kernel - 1 - padding = 2 on each side, as the neck's."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.ConvTranspose(self.features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                            dtype=self.dtype, name='conv')(x)


class HDPrior(nn.Module):
  """ViT refinement of a semantic map: P-MapNet's `MapVisionTransformer` (`mae_head`).

  Reads config.model.hd (patch_size, width, depth, num_heads, mlp_ratio, dropout, remat),
  config.model.decoder (its BEV decoder `bev_head`), config.data (canvas, classes, bins).

  semantic [B, Hb, Wb, K] -> patch conv (`map_patch_embed.proj`, kernel = stride = p)
  -> tokens [B, (Hb/p) (Wb/p), D] + pos_embed[:-1] -> `depth` ViT blocks (one nn.scan,
  `vit_blocks`) -> LayerNorm (`norm`)
  -> [B, Hb/p, Wb/p, D] -> two ConvTranspose2d k4 s2 p1 with bias and no activation in between
  (`conv_up.0`, `conv_up.1`) -> bilinear resize to the canvas with align_corners=False
  (`conv_up.2`) -> 1x1 conv (no bias) + BatchNorm, no ReLU (`conv_up.3`) -> a BEVDecoder
  (`bev_head`, HDMapNet's BevEncode on D input channels) -> semantic / embedding / direction.

  Position embedding: the reference's table is timm's, sized for the image plus a class token
  ([1 + N, D], class token first), but the forward adds `pos_embed[:, :-1]` to the N patch
  tokens: patch i gets row i, i.e. the class token's row goes to the first patch and the last
  row is never used. That is the function the released weights were trained with, so it is
  kept: `pos_embed` here is the whole [N + 1, D] table and the first N rows are added. Dropout
  (pos_drop, attention, MLP) is config.model.hd.dropout, 0 in the reference.
  The module is always a submodule named `hd_prior`, so `params['hd_prior']` moves unchanged
  from the hd_pretrain checkpoint into the teacher and coach.

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, semantic, *, train: bool):
    """semantic: [B, Hb, Wb, num_classes] -> {'semantic', 'embedding', 'direction'} maps
    [B, Hb, Wb, *] (logits, compute dtype)."""
    cfg = self.config.model.hd
    dtype = precision.compute_dtype(self.config)
    batch, height, width, _ = semantic.shape
    p = cfg.patch_size
    if height % p or width % p:
      raise ValueError(f'config.model.hd.patch_size={p} must divide the BEV canvas '
                       f'{height}x{width}')
    grid_h, grid_w = height // p, width // p
    x = nn.Conv(cfg.width, (p, p), strides=p, padding='VALID', dtype=dtype,
                name='patch_embed')(semantic)
    x = x.reshape(batch, grid_h * grid_w, cfg.width)
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (grid_h * grid_w + 1, cfg.width))
    x = nn.Dropout(cfg.dropout, deterministic=not train)(x + pos[:-1].astype(dtype))
    x, _ = vit_blocks(cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                      dropout=cfg.dropout, train=train, remat=cfg.remat, dtype=dtype,
                      name='blocks')(x, None)
    x = nn.LayerNorm(epsilon=TIMM_LN_EPS, dtype=dtype, name='norm')(x)
    x = x.reshape(batch, grid_h, grid_w, cfg.width)

    def up_projection(module, tokens, train):
      """[B, grid_h, grid_w, D] -> [B, Hb, Wb, D]: two 4x transposed convs, resize, 1x1 ConvBN.
      Its [B, Hb, Wb, D] tensors (200 x 400 x 768 at the reference size) are the prior's
      largest; with hd.remat_upsample only the token grid is kept for the backward."""
      # parent=module: the enclosing HDPrior's (lifted) scope, so the names are up_0, up_1,
      # proj with or without remat (convert/pmapnet.py reads them).
      y = ConvTranspose4x4(cfg.width, dtype=dtype, name='up_0', parent=module)(tokens)
      y = ConvTranspose4x4(cfg.width, dtype=dtype, name='up_1', parent=module)(y)
      y = resize_half_pixel(y, (height, width))
      return ConvBN(cfg.width, 1, relu=False, dtype=dtype, name='proj', parent=module)(
          y, train=train)

    if cfg.remat_upsample:
      up_projection = nn.remat(up_projection, static_argnums=(2,))
    x = up_projection(self, x, train)
    return BEVDecoder(self.config, name='decoder')(x, train=train)


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
    hd_prior = HDPrior(self.config, name='hd_prior')
    num_classes = len(self.config.data.classes) + 1
    target = jax.nn.one_hot(batch['semantic'], num_classes, dtype=jnp.float32)
    b, height, width = batch['semantic'].shape
    p = self.config.model.hd.patch_size
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


def sd_fusion_from_config(config, name=None):
  """SDPriorFusion for a full config (config.model.sd); `name` names the submodule."""
  cfg = config.model.sd
  return SDPriorFusion(
      encoder_channels=tuple(cfg.encoder_channels), d_model=cfg.d_model,
      num_heads=cfg.num_heads, num_layers=cfg.num_layers, ffn_dim=cfg.ffn_dim,
      dropout=cfg.dropout, pos_temperature=cfg.pos_temperature,
      dtype=precision.compute_dtype(config), remat=cfg.remat, name=name)
