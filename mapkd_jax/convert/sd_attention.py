"""Reference SD-prior fusion weights (P-MapNet `pmapnet_sd.py`) -> models/prior.SDPriorFusion.

Reference names (attributes of the P-MapNet / MapKD teacher and coach) -> our modules under
`target_prefix`:

  input_proj.{weight,bias}                      -> input_proj                (1x1 conv)
  conv_osm.{0,2,4}.weight (+ .bias on 0, 2)     -> SDPriorEncoder_0/Conv_{0,1,2}
  conv_osm.5.*                                  -> SDPriorEncoder_0/BatchNorm_0
  sdmap_crossattn.layers.{l}.self_attn.*        -> SDCrossAttentionLayer_{l}/self_attn
  sdmap_crossattn.layers.{l}.multihead_attn.*   -> SDCrossAttentionLayer_{l}/cross_attn
  sdmap_crossattn.layers.{l}.linear{1,2}        -> SDCrossAttentionLayer_{l}/Dense_{0,1}
  sdmap_crossattn.layers.{l}.norm{1,2,3}        -> SDCrossAttentionLayer_{l}/LayerNorm_{0,1,2}
  sdmap_crossattn.norm                          -> LayerNorm_0

torch nn.MultiheadAttention packs q, k, v in `in_proj_weight` [3 d, d] (rows q, then k, then
v; y = x W^T + b) and splits heads as contiguous blocks of d / heads features; Flax's
DenseGeneral kernels are [d, heads, head_dim] (query/key/value) and [heads, head_dim, d] (out).
"""
import numpy as np

from mapkd_jax.convert.common import SEP, Conversion


def _count(conv, prefix):
  i = 0
  while any(p.startswith(f'params{SEP}{prefix}{i}{SEP}') for p in conv.target):
    i += 1
  return i


def convert_attention(conv: Conversion, target: str, source: str):
  """torch nn.MultiheadAttention `source` -> Flax MultiHeadDotProductAttention `target`
  (module path under params, no trailing '/')."""
  kernel = conv.target.get(f'params{SEP}{target}{SEP}query{SEP}kernel')
  if kernel is None:
    raise ValueError(f'{conv.origin}: no attention module at target {target!r}')
  d, heads, head_dim = kernel.shape
  for i, name in enumerate(('query', 'key', 'value')):
    rows = slice(i * d, (i + 1) * d)
    conv.put(f'params{SEP}{target}{SEP}{name}{SEP}kernel', f'{source}.in_proj_weight',
             lambda w, rows=rows: np.transpose(w[rows]).reshape(d, heads, head_dim))
    # One source tensor feeds three targets: `put` allows each name once, so the slices of
    # the packed tensors are bookkept under their own names.
    conv.used.pop(f'{source}.in_proj_weight')
    conv.put(f'params{SEP}{target}{SEP}{name}{SEP}bias', f'{source}.in_proj_bias',
             lambda b, rows=rows: b[rows].reshape(heads, head_dim))
    conv.used.pop(f'{source}.in_proj_bias')
  conv.used[f'{source}.in_proj_weight'] = f'params{SEP}{target}{SEP}{{query,key,value}}/kernel'
  conv.used[f'{source}.in_proj_bias'] = f'params{SEP}{target}{SEP}{{query,key,value}}/bias'
  conv.put(f'params{SEP}{target}{SEP}out{SEP}kernel', f'{source}.out_proj.weight',
           lambda w: np.transpose(w).reshape(heads, head_dim, d))
  conv.put(f'params{SEP}{target}{SEP}out{SEP}bias', f'{source}.out_proj.bias')


def convert_sd_attention(conv: Conversion, target_prefix: str, source_prefix: str = ''):
  """Maps the reference's SD fusion tensors into an SDPriorFusion subtree.

  Args:
    conv: the Conversion (target must hold the SDPriorFusion variables).
    target_prefix: module path of the SDPriorFusion, ending in '/' (e.g. 'sd_prior/').
    source_prefix: prefix before `input_proj.` / `conv_osm.` / `sdmap_crossattn.` ('' in
      P-MapNet / MapKD teachers, whose attributes sit at the top level).
  Layer counts are read from the target; another size fails on a missing name or a shape.
  """
  t, s = target_prefix, source_prefix
  if f'params{SEP}{t}input_proj{SEP}kernel' not in conv.target:
    raise ValueError(f'{conv.origin}: no SDPriorFusion under target {t!r} (expected '
                     f'{t}input_proj/kernel)')
  conv.conv(f'{t}input_proj', f'{s}input_proj', bias=True)
  n = _count(conv, f'{t}SDPriorEncoder_0{SEP}Conv_')
  for i in range(n):
    conv.conv(f'{t}SDPriorEncoder_0{SEP}Conv_{i}', f'{s}conv_osm.{2 * i}', bias=i < n - 1)
  conv.batch_norm(f'{t}SDPriorEncoder_0{SEP}BatchNorm_0', f'{s}conv_osm.{2 * n - 1}')
  a = f'{s}sdmap_crossattn.'
  for layer in range(_count(conv, f'{t}SDCrossAttentionLayer_')):
    target, source = f'{t}SDCrossAttentionLayer_{layer}', f'{a}layers.{layer}'
    convert_attention(conv, f'{target}{SEP}self_attn', f'{source}.self_attn')
    convert_attention(conv, f'{target}{SEP}cross_attn', f'{source}.multihead_attn')
    conv.linear(f'{target}{SEP}Dense_0', f'{source}.linear1', bias=True)
    conv.linear(f'{target}{SEP}Dense_1', f'{source}.linear2', bias=True)
    for j in range(3):
      _layer_norm(conv, f'{target}{SEP}LayerNorm_{j}', f'{source}.norm{j + 1}')
  _layer_norm(conv, f'{t}LayerNorm_0', f'{a}norm')


def _layer_norm(conv, target, source):
  conv.put(f'params{SEP}{target}{SEP}scale', f'{source}.weight')
  conv.put(f'params{SEP}{target}{SEP}bias', f'{source}.bias')

