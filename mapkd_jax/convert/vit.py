"""Reference HD-prior weights (P-MapNet `MapVisionTransformer`, the teacher's `mae_head`) ->
models/prior.HDPrior.

Reference names (after `source_prefix`, 'mae_head.' in a P-MapNet / MapKD teacher or coach)
-> our parameters under `target_prefix` ('hd_prior/'):

  map_patch_embed.proj.{weight,bias}        -> patch_embed                 (k = stride = p conv)
  pos_embed [1, N + 1, D]                   -> pos_embed [N + 1, D]         (whole table; the
                                                                            forward adds [:-1])
  blocks.{i}.norm1 / norm2                  -> blocks/block/norm1 / norm2 [i]
  blocks.{i}.attn.qkv.{weight,bias} [3D, D] -> blocks/block/attn/{query,key,value}
                                               [i] = [D, heads, hd]
  blocks.{i}.attn.proj                      -> blocks/block/attn/out [i] = [heads, hd, D]
  blocks.{i}.mlp.fc1 / fc2                  -> blocks/block/fc1 / fc2 [i]
  (the blocks are one nn.scan: each parameter stacks the depth blocks on a leading axis)
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


def convert_packed_attention(conv: Conversion, target: str, qkv: list, proj: list):
  """Packed qkv Linears `qkv` [3D, D] and output Linears `proj` (one name per scanned layer)
  -> a Flax MultiHeadDotProductAttention at module path `target` (under params, no trailing
  '/') whose parameters carry a leading [layers] axis (nn.scan)."""
  kernel = conv.target.get(f'params{SEP}{target}{SEP}query{SEP}kernel')
  if kernel is None:
    raise ValueError(f'{conv.origin}: no attention module at target {target!r}')
  _, d, heads, head_dim = kernel.shape
  for i, name in enumerate(('query', 'key', 'value')):
    rows = slice(i * d, (i + 1) * d)
    for suffix, fn in (
        ('kernel', lambda w, rows=rows: np.transpose(w[rows]).reshape(d, heads, head_dim)),
        ('bias', lambda b, rows=rows: b[rows].reshape(heads, head_dim))):
      sources = [f'{q}.{"weight" if suffix == "kernel" else "bias"}' for q in qkv]
      conv.put_stacked(f'params{SEP}{target}{SEP}{name}{SEP}{suffix}', sources, fn)
      # One source tensor feeds three targets: `put_stacked` allows each name once.
      for source in sources:
        conv.used.pop(source)
  for layer, q in enumerate(qkv):
    for part in ('weight', 'bias'):
      conv.used[f'{q}.{part}'] = (f'params{SEP}{target}{SEP}{{query,key,value}}/'
                                  f'{"kernel" if part == "weight" else "bias"}[{layer}]')
  conv.put_stacked(f'params{SEP}{target}{SEP}out{SEP}kernel', [f'{p}.weight' for p in proj],
                   lambda w: np.transpose(w).reshape(heads, head_dim, d))
  conv.put_stacked(f'params{SEP}{target}{SEP}out{SEP}bias', [f'{p}.bias' for p in proj])


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
  # The blocks are one nn.scan: every parameter is the [depth]-stack of blocks.{i}'s.
  block = f'{t}blocks{SEP}block'
  scale = conv.target.get(f'params{SEP}{block}{SEP}norm1{SEP}scale')
  if scale is None:
    raise ValueError(f'{conv.origin}: no scanned ViT blocks under target {block!r}')
  blocks = [f'{s}blocks.{i}' for i in range(scale.shape[0])]
  if f'{s}blocks.{len(blocks)}.norm1.weight' in conv.source:
    raise ValueError(f'{conv.origin}: {s}blocks.{len(blocks)}.* present but '
                     f'config.model.hd.depth is {len(blocks)}')

  def stacked(target, part, transform=lambda x: x):
    conv.put_stacked(f'params{SEP}{block}{SEP}{target}', [f'{b}.{part}' for b in blocks],
                     transform)

  for norm in ('norm1', 'norm2'):
    stacked(f'{norm}{SEP}scale', f'{norm}.weight')
    stacked(f'{norm}{SEP}bias', f'{norm}.bias')
  convert_packed_attention(conv, f'{block}{SEP}attn', [f'{b}.attn.qkv' for b in blocks],
                           [f'{b}.attn.proj' for b in blocks])
  for fc in ('fc1', 'fc2'):
    stacked(f'{fc}{SEP}kernel', f'mlp.{fc}.weight', np.transpose)
    stacked(f'{fc}{SEP}bias', f'mlp.{fc}.bias')
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
