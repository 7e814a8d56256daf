"""Reference HD-prior weights (P-MapNet `MapVisionTransformer`, the teacher's `mae_head`) ->
models/prior.HDPrior.

Reference names (after `source_prefix`, 'mae_head.' in a P-MapNet / MapKD teacher or coach)
-> our parameters under `target_prefix` ('hd_prior/'):

  map_patch_embed.proj.{weight,bias}        -> patch_embed                 (k = stride = p conv)
  pos_embed [1, N + 1, D]                   -> pos_embed [N + 1, D]         (whole table; the
                                                                            forward adds [:-1])
  blocks.{i}.norm1 / norm2                  -> block_i/norm1 / norm2
  blocks.{i}.attn.qkv.{weight,bias} [3D, D] -> block_i/attn/{query,key,value} [D, heads, hd]
  blocks.{i}.attn.proj                      -> block_i/attn/out [heads, hd, D]
  blocks.{i}.mlp.fc1 / fc2                  -> block_i/fc1 / fc2
  norm                                      -> norm
  conv_up.0 / conv_up.1 (ConvTranspose2d)   -> up_0/conv / up_1/conv        (kernel flipped)
  conv_up.3.conv / conv_up.3.bn             -> proj/conv / proj/bn          (conv_up.2: Upsample)
  bev_head.*                                -> decoder/*   (HDMapNet BevEncode: see pmapnet.py)
Ignored, by name: cls_token, patch_embed.proj.* and head.* (timm's class token, own patch
embedding and classifier, all built by timm's VisionTransformer.__init__ but never called by
MapVisionTransformer.forward, which uses map_patch_embed and the BEV decoder instead).

timm's qkv Linear packs q, k, v as rows [3, heads, head_dim] (reshape(B, N, 3, heads, hd)),
the same layout as torch's MultiheadAttention in_proj.
"""
import numpy as np

from mapkd_jax.convert.common import SEP, Conversion

VIT_UNUSED = {
    'cls_token': "timm's class token: MapVisionTransformer.forward_features never adds it",
    'patch_embed.': "timm's own patch embedding: the forward uses map_patch_embed instead",
    'head.': "timm's classifier head: the forward returns the BEV decoder's maps instead",
}


def _layer_norm(conv, target, source):
  conv.put(f'params{SEP}{target}{SEP}scale', f'{source}.weight')
  conv.put(f'params{SEP}{target}{SEP}bias', f'{source}.bias')


def convert_packed_attention(conv: Conversion, target: str, qkv: str, proj: str):
  """A packed qkv Linear `qkv` [3D, D] and output Linear `proj` -> Flax
  MultiHeadDotProductAttention at module path `target` (under params, no trailing '/')."""
  kernel = conv.target.get(f'params{SEP}{target}{SEP}query{SEP}kernel')
  if kernel is None:
    raise ValueError(f'{conv.origin}: no attention module at target {target!r}')
  d, heads, head_dim = kernel.shape
  for i, name in enumerate(('query', 'key', 'value')):
    rows = slice(i * d, (i + 1) * d)
    conv.put(f'params{SEP}{target}{SEP}{name}{SEP}kernel', f'{qkv}.weight',
             lambda w, rows=rows: np.transpose(w[rows]).reshape(d, heads, head_dim))
    # One source tensor feeds three targets: `put` allows each name once.
    conv.used.pop(f'{qkv}.weight')
    conv.put(f'params{SEP}{target}{SEP}{name}{SEP}bias', f'{qkv}.bias',
             lambda b, rows=rows: b[rows].reshape(heads, head_dim))
    conv.used.pop(f'{qkv}.bias')
  conv.used[f'{qkv}.weight'] = f'params{SEP}{target}{SEP}{{query,key,value}}/kernel'
  conv.used[f'{qkv}.bias'] = f'params{SEP}{target}{SEP}{{query,key,value}}/bias'
  conv.put(f'params{SEP}{target}{SEP}out{SEP}kernel', f'{proj}.weight',
           lambda w: np.transpose(w).reshape(heads, head_dim, d))
  conv.put(f'params{SEP}{target}{SEP}out{SEP}bias', f'{proj}.bias')


def convert_hd_prior(conv: Conversion, layer_blocks: int, target_prefix: str = 'hd_prior/',
                     source_prefix: str = 'mae_head.'):
  """Maps a reference MapVisionTransformer's tensors into an HDPrior subtree.

  Args:
    conv: the Conversion (its target must hold the HDPrior variables).
    layer_blocks: config.model.decoder.blocks_per_layer (the BEV decoder's ResNet blocks).
    target_prefix: module path of the HDPrior, ending in '/'.
    source_prefix: the reference's prefix ('mae_head.' in teachers, '' for a bare ViT).
  The depth is read from the target; another size fails on a missing name or a shape.
  """
  from mapkd_jax.convert import pmapnet
  t, s = target_prefix, source_prefix
  if f'params{SEP}{t}pos_embed' not in conv.target:
    raise ValueError(f'{conv.origin}: no HDPrior under target {t!r} (expected {t}pos_embed)')
  conv.conv(f'{t}patch_embed', f'{s}map_patch_embed.proj', bias=True)
  conv.put(f'params{SEP}{t}pos_embed', f'{s}pos_embed', _pos_table)
  depth = 0
  while f'params{SEP}{t}block_{depth}{SEP}norm1{SEP}scale' in conv.target:
    depth += 1
  for i in range(depth):
    target, source = f'{t}block_{i}', f'{s}blocks.{i}'
    _layer_norm(conv, f'{target}{SEP}norm1', f'{source}.norm1')
    convert_packed_attention(conv, f'{target}{SEP}attn', f'{source}.attn.qkv',
                             f'{source}.attn.proj')
    _layer_norm(conv, f'{target}{SEP}norm2', f'{source}.norm2')
    conv.linear(f'{target}{SEP}fc1', f'{source}.mlp.fc1', bias=True)
    conv.linear(f'{target}{SEP}fc2', f'{source}.mlp.fc2', bias=True)
  _layer_norm(conv, f'{t}norm', f'{s}norm')
  for i in range(2):
    conv.put(f'params{SEP}{t}up_{i}{SEP}conv{SEP}kernel', f'{s}conv_up.{i}.weight',
             pmapnet.transposed_conv_kernel)
    conv.put(f'params{SEP}{t}up_{i}{SEP}conv{SEP}bias', f'{s}conv_up.{i}.bias')
  conv.conv(f'{t}proj{SEP}conv', f'{s}conv_up.3.conv', bias=False)
  conv.batch_norm(f'{t}proj{SEP}bn', f'{s}conv_up.3.bn')
  pmapnet.convert_decoder(conv, layer_blocks, target=f'{t}decoder', source=f'{s}bev_head')
  for name, reason in VIT_UNUSED.items():
    conv.ignore_prefix(f'{s}{name}', reason, required=True)


def _pos_table(x: np.ndarray) -> np.ndarray:
  if x.ndim != 3 or x.shape[0] != 1:
    raise ValueError(f'pos_embed must be [1, N + 1, D], got shape {x.shape}')
  return x[0]
