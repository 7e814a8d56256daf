"""efficientnet_pytorch / HDMapNet CamEncode weights -> `image_encoder.EfficientNetB0` variables.

Source layouts (efficientnet_pytorch 0.7.1 names; from the public reference code):
  bare trunk (`EfficientNet.from_name/from_pretrained('efficientnet-b0').state_dict()`, e.g.
    the ImageNet file HDMapNet starts from):
      _conv_stem, _bn0, _blocks.{0..15}.{_expand_conv, _bn0 (not in block 0), _depthwise_conv,
      _bn1, _se_reduce, _se_expand, _project_conv, _bn2}; the classifier head _conv_head, _bn1,
      _fc is ignored (HDMapNet stops at the blocks).
  CamEncode (HDMapNet model/base.py, P-MapNet model/utils/base.py, MapKD model/base.py):
      {prefix}trunk.<bare trunk names>, {prefix}up1.conv.{0,1,3,4} (conv3x3, BN, conv3x3, BN of
      `Up`), and for the lift-splat variant {prefix}depthnet (1x1 conv 512 -> D + C, with bias).

Prefixes in the reference models (for whole-model converters such as convert/pmapnet.py):
  HDMapNet, P-MapNet (PMapNet_SD, ...), MapKD teacher/student camera branch:
      'camencode.'  -> CamEncode(64): Up(320+112, 64), no depthnet  (fusion_channels = 0)
  MapKD coach (model/pmapnet_sdmap_C.py) simulated LiDAR (`self.pp = LiftSplat(...)`):
      'pp.camencode.' -> CamEncode_L(41, 64): Up_L(320+112, 512) + depthnet 512 -> 105
      (fusion_channels = 512; depth bins first, then the 64 context channels, as models/lss.py)
  (a DataParallel 'module.' prefix is stripped on load by common.load_torch_state_dict.)

Targets: the `EfficientNetB0` module's subtree; in this project's models it sits at
  .../ImageEncoder_0/EfficientNetB0_0 (camera: model/camera/..., coach LSS: model/lss/...).
Our module names are Flax's automatic ones: stem ConvBNAct_0, blocks MBConv_{0..15} (inside,
ConvBNAct_{0,1,2} = expand, depthwise, project, or {0,1} = depthwise, project when
expand_ratio == 1; Conv_0 / Conv_1 = SE reduce / expand), FuseUp_0 (ConvBNAct_0, ConvBNAct_1),
and Conv_0 = depthnet when fusion_channels > 0.

Numerical parity (tests/test_parity_efficientnet.py) holds when every stride-2 conv sees an even
size, i.e. H and W multiples of 32 (128 x 352 in the reference): efficientnet_pytorch pads with
static TF-SAME amounts computed for a 224 x 224 image, which equal TF-SAME exactly then.
"""
import functools
import time

import jax
import jax.numpy as jnp
from flax import traverse_util

from mapkd_jax.convert import common
from mapkd_jax.models import image_encoder

NUM_BLOCKS = sum(stage[2] for stage in image_encoder.EFFICIENTNET_B0_STAGES)
HEAD_NAMES = ('_conv_head.', '_bn1.', '_fc.')   # classifier head of the bare trunk
TRUNK_MODULES = ('ConvBNAct_0',) + tuple(f'MBConv_{i}' for i in range(NUM_BLOCKS))
_SHAPE_PROBE_HW = (64, 64)   # any image size > 16 gives the same parameter shapes


def _block_expand_ratios():
  ratios = []
  for expand, _, repeats, _, _ in image_encoder.EFFICIENTNET_B0_STAGES:
    ratios += [expand] * repeats
  return ratios


def _bn_names(prefix):
  return [f'{prefix}.{n}' for n in ('weight', 'bias', 'running_mean', 'running_var')]


def trunk_names(prefix: str = '') -> list[str]:
  """The trunk tensor names the converter needs (without num_batches_tracked or the head)."""
  names = [f'{prefix}_conv_stem.weight'] + _bn_names(f'{prefix}_bn0')
  for i, expand in enumerate(_block_expand_ratios()):
    b = f'{prefix}_blocks.{i}.'
    if expand != 1:
      names += [f'{b}_expand_conv.weight'] + _bn_names(f'{b}_bn0')
    names += [f'{b}_depthwise_conv.weight'] + _bn_names(f'{b}_bn1')
    names += [f'{b}_se_reduce.weight', f'{b}_se_reduce.bias',
              f'{b}_se_expand.weight', f'{b}_se_expand.bias']
    names += [f'{b}_project_conv.weight'] + _bn_names(f'{b}_bn2')
  return names


def camencode_names(prefix: str, *, depthnet: bool) -> list[str]:
  """Tensor names of an HDMapNet CamEncode (depthnet=False) or lift-splat CamEncode (True)."""
  names = trunk_names(f'{prefix}trunk.')
  for conv, bn in ((0, 1), (3, 4)):
    names += [f'{prefix}up1.conv.{conv}.weight'] + _bn_names(f'{prefix}up1.conv.{bn}')
  if depthnet:
    names += [f'{prefix}depthnet.weight', f'{prefix}depthnet.bias']
  return names


def map_trunk(conv: common.Conversion, target: str, source_prefix: str = ''):
  """Maps an efficientnet_pytorch trunk under `source_prefix` onto EfficientNetB0 at `target`.

  Args:
    conv: the Conversion being filled.
    target: module path of the EfficientNetB0 inside conv's target tree, no collection
      (e.g. 'model/camera/ImageEncoder_0/EfficientNetB0_0'; '' for the module itself).
    source_prefix: e.g. '' (bare file), 'camencode.trunk.', 'pp.camencode.trunk.'.
  The classifier head (_conv_head, _bn1, _fc) under the prefix is marked ignored.
  """
  t = f'{target}/' if target else ''
  s = source_prefix
  conv.conv(f'{t}ConvBNAct_0/Conv_0', f'{s}_conv_stem', bias=False)
  conv.batch_norm(f'{t}ConvBNAct_0/BatchNorm_0', f'{s}_bn0')
  for i, expand in enumerate(_block_expand_ratios()):
    block, src = f'{t}MBConv_{i}', f'{s}_blocks.{i}.'
    layers = [('_depthwise_conv', '_bn1'), ('_project_conv', '_bn2')]
    if expand != 1:
      layers.insert(0, ('_expand_conv', '_bn0'))
    for j, (conv_name, bn_name) in enumerate(layers):
      conv.conv(f'{block}/ConvBNAct_{j}/Conv_0', src + conv_name, bias=False)
      conv.batch_norm(f'{block}/ConvBNAct_{j}/BatchNorm_0', src + bn_name)
    conv.conv(f'{block}/Conv_0', src + '_se_reduce', bias=True)
    conv.conv(f'{block}/Conv_1', src + '_se_expand', bias=True)
  for head in HEAD_NAMES:
    conv.ignore_prefix(s + head, 'efficientnet classifier head; HDMapNet uses only the blocks')


def map_camencode(conv: common.Conversion, target: str, source_prefix: str, *, depthnet: bool):
  """Maps a CamEncode (trunk + up1 [+ depthnet]) under `source_prefix` onto EfficientNetB0.

  depthnet=False: HDMapNet camera CamEncode -> EfficientNetB0(fusion_channels=0);
  depthnet=True: lift-splat CamEncode -> EfficientNetB0(fusion_channels=512).
  """
  t = f'{target}/' if target else ''
  map_trunk(conv, target, f'{source_prefix}trunk.')
  for j, (c, bn) in enumerate(((0, 1), (3, 4))):
    conv.conv(f'{t}FuseUp_0/ConvBNAct_{j}/Conv_0', f'{source_prefix}up1.conv.{c}', bias=False)
    conv.batch_norm(f'{t}FuseUp_0/ConvBNAct_{j}/BatchNorm_0', f'{source_prefix}up1.conv.{bn}')
  if depthnet:
    conv.conv(f'{t}Conv_0', f'{source_prefix}depthnet', bias=True)


def detect_layout(state_dict, prefix: str = '', origin: str = 'state dict'):
  """('trunk' | 'camencode' | 'camencode_depthnet', out_channels, fusion_channels).

  A bare trunk has {prefix}_conv_stem.weight; a CamEncode has {prefix}trunk._conv_stem.weight
  and {prefix}up1.conv.0.weight. Channel counts come from the tensors themselves.
  Raises ValueError listing missing/unexpected names when neither layout is present.
  """
  if f'{prefix}_conv_stem.weight' in state_dict:
    return 'trunk', 0, 0
  camencode = f'{prefix}trunk._conv_stem.weight', f'{prefix}up1.conv.0.weight'
  if all(name in state_dict for name in camencode):
    up_out = state_dict[f'{prefix}up1.conv.0.weight'].shape[0]
    if f'{prefix}depthnet.weight' in state_dict:
      return 'camencode_depthnet', state_dict[f'{prefix}depthnet.weight'].shape[0], up_out
    return 'camencode', up_out, 0
  stems = [k[:-len('trunk._conv_stem.weight')] for k in state_dict
           if k.endswith('trunk._conv_stem.weight')]
  hint = f' (CamEncode found under prefixes {stems}: pass one as the prefix)' if stems else ''
  common.check_names(state_dict, trunk_names(prefix), what='efficientnet-b0 (or CamEncode '
                     f"under prefix {prefix + 'trunk.'!r}){hint}", origin=origin)
  raise AssertionError('unreachable: check_names raises')


def abstract_encoder_variables(out_channels: int, fusion_channels: int):
  """Shapes of EfficientNetB0(out_channels, fusion_channels)'s {'params', 'batch_stats'}."""
  model = image_encoder.EfficientNetB0(out_channels=max(out_channels, 1),
                                       fusion_channels=fusion_channels)
  images = jnp.zeros((1, *_SHAPE_PROBE_HW, 3))
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def trunk_only(variables):
  """The trunk part (stem + 16 blocks) of an EfficientNetB0 variables tree."""
  return {col: {k: v for k, v in tree.items() if k in TRUNK_MODULES}
          for col, tree in variables.items()}


def convert_state_dict(state_dict, *, prefix: str = '', origin: str = 'state dict'):
  """Converts a bare efficientnet-b0 or a CamEncode state dict (under `prefix`).

  Returns:
    (variables, report): variables = {'params', 'batch_stats'} of an EfficientNetB0 module
    (only the trunk for a bare file: FuseUp/depthnet are not in it); report = the
    Conversion's mapped/ignored lists plus 'layout', 'out_channels', 'fusion_channels'.
  Raises:
    ValueError for another model's state dict (missing/unexpected names), a wrong shape
    (both names and shapes), or tensors under the prefix neither mapped nor ignored.
  Tensors outside `prefix` (the rest of a whole model) are reported as ignored.
  """
  layout, out_channels, fusion_channels = detect_layout(state_dict, prefix, origin)
  abstract = abstract_encoder_variables(out_channels, fusion_channels)
  if layout == 'trunk':
    abstract = trunk_only(abstract)
    expected = trunk_names(prefix)
  else:
    expected = camencode_names(prefix, depthnet=layout == 'camencode_depthnet')
  common.check_names(state_dict, expected, what=f'{layout} (prefix {prefix!r})', origin=origin)
  conv = common.Conversion(state_dict, abstract, origin=origin)
  if prefix:
    outside = [k for k in state_dict if not k.startswith(prefix)]
    for name in outside:
      conv.ignore(name, f'outside prefix {prefix!r}')
  if layout == 'trunk':
    map_trunk(conv, '', prefix)
  else:
    map_camencode(conv, '', prefix, depthnet=layout == 'camencode_depthnet')
  variables = conv.finish()
  report = conv.report()
  report.update(layout=layout, prefix=prefix, out_channels=out_channels,
                fusion_channels=fusion_channels)
  return variables, report


def convert_file(path: str, *, prefix: str = '', allow_pickle: bool = False):
  """load_torch_state_dict + convert_state_dict; the report also holds the conversion time."""
  start = time.perf_counter()
  state_dict = common.load_torch_state_dict(path, allow_pickle=allow_pickle)
  variables, report = convert_state_dict(state_dict, prefix=prefix, origin=path)
  report['seconds'] = round(time.perf_counter() - start, 3)
  report['num_tensors'] = len(traverse_util.flatten_dict(variables))
  return variables, report


# -- CLI: python -m mapkd_jax.convert efficientnet --------------------------------------------
ITEM = 'variables'          # DIR/variables: the Orbax item (StandardCheckpointer)
REPORT = 'conversion.json'  # DIR/conversion.json: what was mapped / ignored, layout, timing


def save(variables, report, out_dir):
  """Writes DIR/variables (Orbax, {'params', 'batch_stats'}) and DIR/conversion.json."""
  import json
  import os

  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  item = os.path.join(out_dir, ITEM)
  if os.path.exists(item):
    raise ValueError(f'--out {out_dir}: {item} exists; choose a new directory')
  os.makedirs(out_dir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(item, variables)
  checkpointer.wait_until_finished()
  with open(os.path.join(out_dir, REPORT), 'w') as f:
    json.dump(report, f, indent=2)
  return item


def add_arguments(parser):
  parser.add_argument('--input', required=True,
                      help='torch file: a bare efficientnet_pytorch efficientnet-b0 state dict '
                           '(e.g. the ImageNet efficientnet-b0-355c32eb.pth), or a whole model '
                           'holding a CamEncode under --prefix')
  parser.add_argument('--out', required=True,
                      help=f'output directory: writes OUT/{ITEM} (Orbax item) and OUT/{REPORT}; '
                           'pass OUT as --config.init.image_encoder')
  parser.add_argument('--prefix', default='',
                      help="name prefix of a CamEncode inside a bigger state dict, e.g. "
                           "'camencode.' (HDMapNet / P-MapNet / MapKD camera branch) or "
                           "'pp.camencode.' (MapKD coach lift-splat); '' = bare trunk file; "
                           "'camencode.trunk.' = only the trunk of a CamEncode (an item that "
                           "loads into every encoder, whatever its head)")
  parser.add_argument('--allow_pickle', action='store_true',
                      help='unpickle arbitrary objects in the file (trusted files only)')


def run(args):
  """Entry point of `python -m mapkd_jax.convert efficientnet` (args from add_arguments)."""
  import json
  variables, report = convert_file(args.input, prefix=args.prefix,
                                   allow_pickle=args.allow_pickle)
  item = save(variables, report, args.out)
  summary = {k: report[k] for k in ('origin', 'layout', 'prefix', 'out_channels',
                                    'fusion_channels', 'seconds', 'num_tensors')}
  summary.update(item=item, mapped=len(report['mapped']), ignored=len(report['ignored']))
  print(json.dumps(summary, indent=2))
  return summary


# -- loading a converted item into a model (config.init.image_encoder; no torch needed) --------
ENCODER_MODULE = 'EfficientNetB0_0'
INIT_KEY = 'config.init.image_encoder'


def encoder_paths(params) -> list[tuple]:
  """Paths (tuples of keys) of every EfficientNetB0 subtree in a params tree, sorted."""
  found = set()
  for path in traverse_util.flatten_dict(params):
    if ENCODER_MODULE in path:
      found.add(path[:path.index(ENCODER_MODULE) + 1])
  return sorted(found)


def read_item(out_dir: str):
  """The {'params', 'batch_stats'} written by `save` (numpy arrays); errors name INIT_KEY."""
  import os

  import orbax.checkpoint as ocp
  item = os.path.join(os.path.abspath(out_dir), ITEM)
  if not os.path.isdir(item):
    raise ValueError(f'{INIT_KEY}={out_dir!r}: no converted item {item} (write one with '
                     f'`python -m mapkd_jax.convert efficientnet --input FILE.pth --out DIR`)')
  try:
    variables = ocp.StandardCheckpointer().restore(item)
  except Exception as e:  # orbax raises many types for a broken / foreign directory
    raise ValueError(f'{INIT_KEY}={out_dir!r}: cannot read the Orbax item {item}: {e}') from e
  if not isinstance(variables, dict) or 'params' not in variables:
    raise ValueError(f"{INIT_KEY}={out_dir!r}: {item} has no 'params' (not written by "
                     'mapkd_jax.convert efficientnet?)')
  return variables


def _describe(modules):
  """Module names for logs: the whole trunk as one entry, the rest in order."""
  modules = set(modules)
  names = ['trunk (stem + 16 MBConv blocks)'] if set(TRUNK_MODULES) <= modules else [
      m for m in TRUNK_MODULES if m in modules]
  return names + sorted(modules - set(TRUNK_MODULES))


def overlay(params, batch_stats, item, *, source: str = '?'):
  """Puts `item` (an EfficientNetB0 variables tree) into every EfficientNetB0 of a model.

  Args:
    params, batch_stats: the model's variable collections (nested dicts of jax arrays).
    item: {'params': ..., 'batch_stats': ...} relative to the EfficientNetB0 module (all of it,
      or only the trunk for a converted bare efficientnet file).
    source: the item's directory, for messages.
  Returns:
    (params, batch_stats, log) with each loaded leaf placed like the leaf it replaces (same
    dtype and sharding); log = {encoder path: {'loaded': [modules], 'left_at_init': [modules]}}.
  Raises:
    ValueError naming INIT_KEY and the path when the model has no EfficientNet-B0, or a leaf of
    the item is missing from an encoder or has another shape there.
  """
  import jax
  import numpy as np
  encoders = encoder_paths(params)
  if not encoders:
    raise ValueError(f"{INIT_KEY}={source!r}: this model has no EfficientNet-B0 (set "
                     "config.model.camera.image_encoder / config.model.lss.image_encoder to "
                     "'efficientnet_b0', or leave init.image_encoder empty)")
  trees = {'params': params, 'batch_stats': batch_stats}
  flat = {col: traverse_util.flatten_dict(tree) for col, tree in trees.items()}
  log = {}
  for enc in encoders:
    loaded, present = set(), set()
    for col in trees:
      for path in flat[col]:
        if path[:len(enc)] == enc:
          present.add(path[len(enc)])
      for rel, value in traverse_util.flatten_dict(item.get(col, {})).items():
        path = enc + rel
        where = '/'.join((col,) + path)
        if path not in flat[col]:
          raise ValueError(f'{INIT_KEY}={source!r}: {col}/{"/".join(rel)} of the item has no '
                           f'counterpart {where} in the model (different encoder head? convert '
                           'the bare trunk instead)')
        old = flat[col][path]
        if tuple(np.shape(value)) != tuple(old.shape):
          raise ValueError(f'{INIT_KEY}={source!r}: {col}/{"/".join(rel)} has shape '
                           f'{tuple(np.shape(value))}, the model\'s {where} {tuple(old.shape)}')
        flat[col][path] = jax.device_put(np.asarray(value, old.dtype), old.sharding)
        loaded.add(rel[0])
    log['/'.join(enc)] = {'loaded': _describe(loaded), 'left_at_init': _describe(present - loaded)}
  return (traverse_util.unflatten_dict(flat['params']),
          traverse_util.unflatten_dict(flat['batch_stats']), log)
