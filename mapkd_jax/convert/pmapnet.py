"""P-MapNet / MapKD PyTorch checkpoints -> a stage checkpoint of this project.

  python -m mapkd_jax.convert pmapnet --input student.pt --config configs/tcs.py:student \
      --workdir ROOT

writes ROOT/<stage>/checkpoints/0, read like a trained stage's checkpoint by
`mapkd_jax.evaluate` / `mapkd_jax.export` (`--checkpoint latest` or `0`: a converted
checkpoint has no validation metric, so no `best/`) and, for teacher / coach, by a later
stage's `frozen.teacher` / `frozen.coach`. Its `meta` records the source file; its optimizer
state is a fresh one, so `launch.py` on the same workdir fine-tunes from the converted weights.

Name mapping (reference module -> our parameters; `reference` = MapKD `PMapNet_sdmap_S`):
  camencode.*            -> camera/<image encoder>   (convert/efficientnet.py)
  view_fusion.*          -> camera/<view MLP>        (convert/hdmapnet_camera.py)
  feature_expand.conv{k}/bn{k}  -> expand_{k-1}/conv, bn
  conv_bev.{2i}          -> neck/down_i/conv (last: + conv_bev.{2i+1} -> neck/down_i/bn)
  conv_up.{2i}           -> neck/up_i/conv  (teacher / coach; transposed_conv_kernel flips it)
  bevencode.conv1, bn1   -> decoder/stem/conv, bn
  bevencode.layer{l}.{j}.conv{k}/bn{k}/downsample.{0,1} -> decoder/layer{l}_{j}/conv{k}|downsample
  bevencode.up1{,_embedded,_direction}.conv.{0,1,3,4}   -> decoder/up_{semantic,embedding,
                                                           direction}/conv1, conv2
  bevencode.up2{,...}.{1,2,4}                           -> decoder/head_{...}/conv1, out
Ignored by name in a student checkpoint: input_proj, conv_osm, conv_up (built by the reference
student but never called by its forward) and every BatchNorm's num_batches_tracked.

Teacher (`reference` = P-MapNet `PMapNet_HD` with lidar=True, the `model9.pt` names): the
camera as above, conv_bev / conv_up / bevencode as above, and
  pp.*                   -> lidar/*       (convert/pointpillars.py)
  input_proj, conv_osm, sdmap_crossattn -> sd_prior/*   (convert/sd_attention.py)
  mae_head.*             -> hd_prior/*    (convert/vit.py; timm's cls_token, patch_embed and
                                           head ignored by name: never called)
hd_pretrain: a bare MapVisionTransformer state dict, or a teacher file whose mae_head.* is
taken (its other tensors listed as ignored) -> hd_prior/* of the MAE model.
Coach (MapKD `PMapNet_mae_head_C`, sim_lidar=True): the teacher's names with the LiftSplat
as `pp`:
  pp.camencode.{trunk,up1,depthnet} -> lss/ImageEncoder_0/EfficientNetB0_0 (fusion 512 + 1x1)
  expand_to_128          -> lss/Conv_0
  pp.dx, pp.bx, pp.nx, pp.frustum  -> ignored after checking them against the config
  pp.reduce_to_3, pp.bevencode     -> ignored: built by LiftSplat, never called by the coach
  mae_head.*             -> hd_prior/* (ignored when config.model.hd.coach_refine is off)
"""
import argparse
import json
import os
import time

import numpy as np

from mapkd_jax.convert import common
from mapkd_jax.models.bev_decoder import HEADS

SEP = common.SEP
# Reference head module suffixes, in our HEADS order (semantic, embedding, direction).
_REFERENCE_HEADS = dict(zip(HEADS, ('', '_embedded', '_direction')))
# Built by the reference student (PMapNet_sdmap_S.__init__) but unused by its forward.
STUDENT_UNUSED = {
    'input_proj.': 'student: 1x1 projection for the SD cross-attention, which the student '
                   'does not run',
    'conv_osm.': 'student: SD-prior encoder, unused (no SD input at inference)',
    'conv_up.': 'student: transposed convs after the SD cross-attention, unused',
}
# The HD-prior MAE model's ViT inside a P-MapNet teacher file: everything else is not part of
# the hd_pretrain model.
HD_FROM_TEACHER = 'teacher tensor outside mae_head: not part of the hd_pretrain model'


def transposed_conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch ConvTranspose2d weight [I, O, kh, kw] -> our ConvTranspose kernel [kh, kw, I, O].

  torch's transposed conv correlates the stride-dilated input with the spatially flipped
  kernel; flax's ConvTranspose (transpose_kernel=False) correlates with the kernel as stored,
  so the flip happens here.
  """
  if weight.ndim != 4:
    raise ValueError(f'transposed conv weight must be 4-d [I, O, kh, kw], got {weight.shape}')
  return np.transpose(weight[:, :, ::-1, ::-1], (2, 3, 0, 1))


def _conv_bn(conv, target, conv_source, bn_source=None, *, bias=None):
  """Our ConvBN at `target` (submodules conv, bn) from a torch conv and optional BN."""
  conv.conv(f'{target}{SEP}conv', conv_source, bias=bias)
  if bn_source is not None:
    conv.batch_norm(f'{target}{SEP}bn', bn_source)


def convert_neck_down(conv, num_layers, target='neck', source='conv_bev'):
  """Reference conv_bev (Sequential: conv, ReLU, ..., conv, BN, ReLU) -> neck/down_i."""
  for i in range(num_layers):
    last = i == num_layers - 1
    _conv_bn(conv, f'{target}{SEP}down_{i}', f'{source}.{2 * i}',
             f'{source}.{2 * i + 1}' if last else None, bias=not last)


def convert_neck_up(conv, num_layers, target='neck', source='conv_up'):
  """Reference conv_up (ConvTranspose2d k4 s2 p1 ..., BN on the last) -> neck/up_i."""
  for i in range(num_layers):
    last = i == num_layers - 1
    name, path = f'{source}.{2 * i}', f'params{SEP}{target}{SEP}up_{i}{SEP}conv'
    conv.put(f'{path}{SEP}kernel', f'{name}.weight', transposed_conv_kernel)
    if not last:
      conv.put(f'{path}{SEP}bias', f'{name}.bias')
    elif f'{name}.bias' in conv.source:
      raise ValueError(f'{conv.origin}: {name}.bias present but the last up conv has no bias')
    if last:
      conv.batch_norm(f'{target}{SEP}up_{i}{SEP}bn', f'{source}.{2 * i + 1}')


def convert_decoder(conv, layer_blocks, target='decoder', source='bevencode'):
  """HDMapNet/P-MapNet BevEncode -> our BEVDecoder.

  Args:
    conv: a common.Conversion.
    layer_blocks: blocks per ResNet layer (config.model.decoder.blocks_per_layer; 2 = ResNet-18).
  """
  _conv_bn(conv, f'{target}{SEP}stem', f'{source}.conv1', f'{source}.bn1', bias=False)
  for layer in (1, 2, 3):
    for block in range(layer_blocks):
      src, dst = f'{source}.layer{layer}.{block}', f'{target}{SEP}layer{layer}_{block}'
      for k in (1, 2):
        _conv_bn(conv, f'{dst}{SEP}conv{k}', f'{src}.conv{k}', f'{src}.bn{k}', bias=False)
      if f'{src}.downsample.0.weight' in conv.source:
        _conv_bn(conv, f'{dst}{SEP}downsample', f'{src}.downsample.0', f'{src}.downsample.1',
                 bias=False)
  for head, suffix in _REFERENCE_HEADS.items():
    up, up2 = f'{source}.up1{suffix}.conv', f'{source}.up2{suffix}'
    _conv_bn(conv, f'{target}{SEP}up_{head}{SEP}conv1', f'{up}.0', f'{up}.1', bias=False)
    _conv_bn(conv, f'{target}{SEP}up_{head}{SEP}conv2', f'{up}.3', f'{up}.4', bias=False)
    _conv_bn(conv, f'{target}{SEP}head_{head}{SEP}conv1', f'{up2}.1', f'{up2}.2', bias=False)
    conv.conv(f'{target}{SEP}head_{head}{SEP}out', f'{up2}.4', bias=True)


def convert_feature_expansion(conv, num_convs, target='', source='feature_expand'):
  """MapKD FeatureExpansionModule (conv{k} with bias, bn{k}) -> expand_{k-1}."""
  if num_convs != 2:
    raise ValueError(f'config.model.student.expand_channels has {num_convs} entries; the '
                     'reference FeatureExpansionModule has exactly 2 convs (64 -> 96 -> 192)')
  for k in (1, 2):
    _conv_bn(conv, f'{target}expand_{k - 1}', f'{source}.conv{k}', f'{source}.bn{k}', bias=True)


def _convert_camera(conv, config):
  """camencode.* -> the camera's EfficientNetB0 (convert/efficientnet.py) and view_fusion.* ->
  camera/view_fusion (convert/hdmapnet_camera.py)."""
  if config.model.camera.image_encoder != 'efficientnet_b0':
    raise ValueError(f'{conv.origin}: the reference camera encoder is EfficientNet-B0; '
                     f'config.model.camera.image_encoder is '
                     f'{config.model.camera.image_encoder!r}')
  from mapkd_jax.convert import efficientnet, hdmapnet_camera
  efficientnet.map_camencode(conv, _encoder_path(conv, 'camera'), 'camencode.', depthnet=False)
  hdmapnet_camera.convert_view_fusion(conv, f'camera{SEP}view_fusion', 'view_fusion.')


def _encoder_path(conv, module):
  """Module path of the one EfficientNetB0 under params/<module>/ (e.g. 'camera/...')."""
  prefix = f'params{SEP}{module}{SEP}'
  encoders = sorted({p[len('params' + SEP):p.index('EfficientNetB0_0') + len('EfficientNetB0_0')]
                     for p in conv.target
                     if p.startswith(prefix) and 'EfficientNetB0_0' in p})
  if len(encoders) != 1:
    raise ValueError(f'{conv.origin}: expected one EfficientNetB0 under {prefix}, found '
                     f'{encoders or "none"}')
  return encoders[0]


def student_tail_conversion(conv, config):
  """Everything of the student after the camera branch, plus the reference's unused blocks."""
  convert_feature_expansion(conv, len(config.model.student.expand_channels))
  convert_neck_down(conv, config.model.neck.num_layers)
  convert_decoder(conv, config.model.decoder.blocks_per_layer)
  for prefix, reason in STUDENT_UNUSED.items():
    conv.ignore_prefix(prefix, reason)


# Names a MapKD student checkpoint must have: the first, readable check of a wrong file.
EXPECTED_STUDENT_NAMES = ('feature_expand.conv1.weight', 'conv_bev.0.weight',
                          'bevencode.conv1.weight', 'bevencode.up1_direction.conv.0.weight',
                          'camencode.trunk._conv_stem.weight', 'view_fusion.hw_mat.0.0.weight')
# ... and a P-MapNet teacher (PMapNet_HD with lidar=True, `model9.pt`).
EXPECTED_TEACHER_NAMES = ('pp.pn.pointnet.0.weight', 'input_proj.weight', 'conv_osm.0.weight',
                          'sdmap_crossattn.norm.weight', 'conv_bev.0.weight',
                          'conv_up.0.weight', 'bevencode.conv1.weight',
                          'mae_head.pos_embed', 'mae_head.map_patch_embed.proj.weight',
                          'mae_head.bev_head.conv1.weight',
                          'camencode.trunk._conv_stem.weight', 'view_fusion.hw_mat.0.0.weight')
# ... and a MapKD coach (PMapNet_mae_head_C, sim_lidar=True: the LiftSplat is its `pp`).
EXPECTED_COACH_NAMES = ('pp.camencode.depthnet.weight', 'pp.camencode.up1.conv.0.weight',
                        'pp.frustum', 'expand_to_128.weight', 'input_proj.weight',
                        'conv_osm.0.weight', 'sdmap_crossattn.norm.weight', 'conv_bev.0.weight',
                        'conv_up.0.weight', 'bevencode.conv1.weight', 'mae_head.pos_embed',
                        'pp.camencode.trunk._conv_stem.weight', 'camencode.trunk._conv_stem.weight',
                        'view_fusion.hw_mat.0.0.weight')
# Tensors of the coach's LiftSplat that its forward never uses.
LSS_UNUSED = {
    'pp.reduce_to_3.': "coach: LiftSplat's 1x1 conv to 3 channels, never called",
    'pp.bevencode.': "coach: LiftSplat's own BEV decoder, never called (the coach's forward "
                     'returns the splatted BEV)',
}
# ... and a bare MapVisionTransformer (the HD-prior MAE's own file).
EXPECTED_VIT_NAMES = ('pos_embed', 'map_patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
                      'norm.weight', 'conv_up.0.weight', 'conv_up.3.bn.running_var',
                      'bev_head.conv1.weight')
_CAMERA_PREFIXES = ('camencode.', 'view_fusion.')


def teacher_tail_conversion(conv, config):
  """Everything of the teacher after the camera branch (PMapNet_HD module names):
  pp.* -> lidar/, input_proj / conv_osm / sdmap_crossattn -> sd_prior/, conv_bev / conv_up ->
  neck/, bevencode -> decoder/, mae_head -> hd_prior/."""
  from mapkd_jax.convert import pointpillars
  pointpillars.convert_pointpillars(conv, f'lidar{SEP}', 'pp.')
  _prior_tail_conversion(conv, config, refine=True)


def coach_tail_conversion(conv, config):
  """Everything of the coach after the camera branch (MapKD PMapNet_mae_head_C names):
  pp.camencode (CamEncode_L: trunk, up1, depthnet) -> lss/<EfficientNetB0>, expand_to_128 ->
  lss/Conv_0; pp.dx / bx / nx / frustum (geometry constants, checked against the config and
  recomputed), pp.reduce_to_3 and pp.bevencode (never called) ignored by name; then the
  teacher's SD fusion, neck, decoder and (coach_refine) mae_head."""
  from mapkd_jax.convert import efficientnet
  efficientnet.map_camencode(conv, _encoder_path(conv, 'lss'), 'pp.camencode.', depthnet=True)
  conv.conv(f'lss{SEP}Conv_0', 'expand_to_128', bias=True)
  check_lss_constants(conv, config)
  for prefix, reason in LSS_UNUSED.items():
    conv.ignore_prefix(prefix, reason)
  _prior_tail_conversion(conv, config, refine=config.model.hd.coach_refine)


def check_lss_constants(conv, config):
  """The LiftSplat's stored grid (dx, bx, nx) and frustum must be the config's geometry
  (this project recomputes them); they are then listed as ignored."""
  from mapkd_jax.models import lss
  data, cfg = config.data, config.model.lss
  z_step = cfg.z_range[1] - cfg.z_range[0]
  rows = (data.bev_x, data.bev_y, (*cfg.z_range, z_step))
  want = {'pp.dx': [r[2] for r in rows], 'pp.bx': [r[0] + r[2] / 2.0 for r in rows],
          'pp.nx': [int((r[1] - r[0]) / r[2]) for r in rows]}
  for name, values in want.items():
    got = conv.source.get(name)
    if got is None or got.shape != (3,) or not np.allclose(got, values, rtol=1e-5, atol=1e-5):
      raise ValueError(f'{conv.origin}: {name} = {None if got is None else got.tolist()} '
                       f'but config.data bev_x / bev_y and config.model.lss.z_range give '
                       f'{values}')
    conv.ignore(name, 'LiftSplat grid constant; recomputed from config.data / model.lss')
  frustum = conv.source.get('pp.frustum')
  depths = lss.depth_values(cfg.depth_bins)
  if (frustum is None or frustum.ndim != 4 or frustum.shape[0] != depths.shape[0]
      or not np.allclose(frustum[:, 0, 0, 2], depths)):
    raise ValueError(f'{conv.origin}: pp.frustum '
                     f'{None if frustum is None else tuple(frustum.shape)} does not have the '
                     f'depth bins of config.model.lss.depth_bins={tuple(cfg.depth_bins)} '
                     f'({depths.shape[0]} bins from {depths[0]} m)')
  conv.ignore('pp.frustum', 'LiftSplat frustum constant; recomputed from the image size and '
                            'config.model.lss.depth_bins')


def _prior_tail_conversion(conv, config, *, refine):
  """SD fusion, neck, decoder and (refine) the HD prior: the part teacher and coach share."""
  from mapkd_jax.convert import sd_attention, vit
  sd_attention.convert_sd_attention(conv, f'sd_prior{SEP}', '')
  convert_neck_down(conv, config.model.neck.num_layers)
  convert_neck_up(conv, config.model.neck.num_layers)
  convert_decoder(conv, config.model.decoder.blocks_per_layer)
  if refine:
    vit.convert_hd_prior(conv, config.model.decoder.blocks_per_layer, f'hd_prior{SEP}',
                         'mae_head.')
  else:
    conv.ignore_prefix('mae_head.', 'config.model.hd.coach_refine is off: this coach has no '
                                    'HD refinement')


def convert_state_dict(state_dict, config, abstract_variables, *, origin='state dict',
                       camera=True):
  """A reference state dict -> (our variables {'params', 'batch_stats'}, conversion report).

  Args:
    state_dict: {name: np.ndarray} (common.load_torch_state_dict).
    config: the stage's config: 'student' (MapKD PMapNet_sdmap_S), 'teacher' (P-MapNet
      PMapNet_HD with LiDAR) or 'hd_pretrain' (a bare MapVisionTransformer, or a teacher file
      whose `mae_head.*` is taken and the rest listed as ignored).
    abstract_variables: the stage model's variables tree (shapes), e.g. from jax.eval_shape.
    origin: the file name, for errors.
    camera: convert the camera branch (False: the rest only, for tests of the rest).
  Raises:
    ValueError naming missing and unexpected tensors for a state dict of another model, and naming both sides of any shape mismatch.
  """
  stage = config.stage
  check_source(state_dict, config, origin=origin, camera=camera)
  if stage == 'hd_pretrain':
    return _convert_hd_pretrain(state_dict, config, abstract_variables, origin)
  target = abstract_variables if camera else _without_camera(abstract_variables)
  conv = common.Conversion(state_dict, target, origin=origin)
  if camera:
    _convert_camera(conv, config)
  else:
    for prefix in _CAMERA_PREFIXES:
      conv.ignore_prefix(prefix, 'camera branch not converted (camera=False)')
  {'student': student_tail_conversion, 'teacher': teacher_tail_conversion,
   'coach': coach_tail_conversion}[stage](conv, config)
  return conv.finish(), conv.report()


def check_source(state_dict, config, *, origin='state dict', camera=True):
  """Fails fast (before any model is built) on a state dict of another model, listing the
  first missing and unexpected names."""
  stage = config.stage
  if stage == 'hd_pretrain':
    prefix = 'mae_head.' if 'mae_head.pos_embed' in state_dict else ''
    names, what = ([prefix + n for n in EXPECTED_VIT_NAMES],
                   'P-MapNet HD prior (MapVisionTransformer, bare or as mae_head.)')
  elif stage in ('student', 'teacher', 'coach'):
    expected, what = {
        'student': (EXPECTED_STUDENT_NAMES, 'MapKD student (PMapNet_sdmap_S)'),
        'teacher': (EXPECTED_TEACHER_NAMES, 'P-MapNet teacher (PMapNet_HD, lidar=True)'),
        'coach': (EXPECTED_COACH_NAMES, 'MapKD coach (PMapNet_mae_head_C)')}[stage]
    names = [n for n in expected if camera or not n.startswith(_CAMERA_PREFIXES)]
  else:
    raise ValueError(f'convert pmapnet: unknown stage {stage!r}')
  common.check_names(state_dict, names, what=what, origin=origin)


def _convert_hd_pretrain(state_dict, config, abstract_variables, origin):
  """MapVisionTransformer tensors (bare, or `mae_head.*` of a teacher) -> HDMapMAE's hd_prior."""
  from mapkd_jax.convert import vit
  prefix = 'mae_head.' if 'mae_head.pos_embed' in state_dict else ''
  conv = common.Conversion(state_dict, abstract_variables, origin=origin)
  vit.convert_hd_prior(conv, config.model.decoder.blocks_per_layer, f'hd_prior{SEP}', prefix)
  if prefix:
    for name in state_dict:
      if not name.startswith(prefix):
        conv.ignore(name, HD_FROM_TEACHER)
  return conv.finish(), conv.report()


def _without_camera(variables):
  return {col: {k: v for k, v in tree.items() if k != 'camera'}
          for col, tree in variables.items()}


def _fresh_train_extra(config, variables, bev_small):
  """{'tx': optimizer state, 'aux': TGPD projectors} as a fresh run of `config` starts them.

  Mirrors train_step.init_state (same rng split as trainer.initial_state, projectors initialised
  on bev_small's shape) without running the model, so the converted checkpoint resumes like a
  trained one: `launch.py` on this workdir fine-tunes from the converted weights.

  Args:
    variables: the converted {'params', 'batch_stats'}.
    bev_small: the model's bev_small output (a jax.ShapeDtypeStruct is enough).
  """
  import jax
  import jax.numpy as jnp
  from mapkd_jax.train import step as step_lib
  aux = {}
  if step_lib.frozen_names(config):   # only distilling stages have TGPD projectors
    tgpd = step_lib.make_tgpd(config)
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    small = jnp.zeros(bev_small.shape, bev_small.dtype)
    init_tgpd = jax.jit(tgpd.init)   # compiled once for both projectors; same values as eager
    aux = {f'tgpd_{name}': init_tgpd(jax.random.fold_in(init_rng, index + 1), small,
                                      small)['params']
           for index, name in enumerate(step_lib.frozen_names(config))}
  params = {'model': variables['params'], 'aux': aux}
  # One compiled call: tx.init op by op over ~80 M parameters takes seconds.
  return {'tx': jax.jit(step_lib.make_optimizer(config).init)(params), 'aux': aux}


def convert_file(path, config, workdir, *, config_name='', allow_pickle=False):
  """Reads `path`, converts it for `config`'s stage and saves ROOT/<stage>/checkpoints/0.

  Returns:
    A summary dict (also written, with the full name mapping, to ROOT/<stage>/convert.json):
    source file, stage, step, checkpoint directory, tensors mapped, tensors ignored and why,
    seconds.
  """
  import jax
  import jax.numpy as jnp
  from mapkd_jax.train import checkpoint as ckpt_lib
  from mapkd_jax.train import stages
  from mapkd_jax.train import step as step_lib

  start = time.time()
  state_dict = common.load_torch_state_dict(path, allow_pickle=allow_pickle)
  check_source(state_dict, config, origin=path)   # before building any model: fail fast
  stage_dir = os.path.join(workdir, stages.stage_dir_name(config))
  ckpt_dir = os.path.join(stage_dir, 'checkpoints')
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f'{ckpt_dir}: already holds checkpoints; convert into an empty workdir')
  model = step_lib.make_models(config)[step_lib.model_name(config)]
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(0), 'mask': jax.random.key(0)}
  outputs, abstract = jax.eval_shape(
      lambda: model.init_with_output(rngs, dummy, train=False))
  variables, report = convert_state_dict(state_dict, config, abstract, origin=path)
  # Saved from one device: readers restore onto their own (replicated) shardings, and saving
  # arrays replicated over a mesh made orbax slice every array per replica (on the tests'
  # 8 CPU devices that took 69 of a small teacher's 83 s).
  device = jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  train_extra = jax.device_put(
      _fresh_train_extra(config, variables, outputs.get('bev_small')), device)
  # Only now (the conversion succeeded) create the stage's checkpoint directories.
  latest, _ = ckpt_lib.managers(stage_dir, max_to_keep=config.train.keep_checkpoints)
  meta = {'stage': config.stage, 'nokd': config.nokd, 'step': 0,
          'config': json.loads(config.to_json_best_effort()), 'metrics': {},
          'converted_from': os.path.abspath(path), 'converter': 'mapkd_jax.convert pmapnet',
          'config_name': config_name}
  ckpt_lib.save(latest, 0, variables=variables, opt_state=train_extra,
                data_position={'epoch': 0, 'batch': 0}, meta=meta)
  latest.wait_until_finished()
  summary = {'source': os.path.abspath(path), 'stage': config.stage, 'step': 0,
             'checkpoint_dir': str(latest.directory), 'mapped': len(report['mapped']),
             'ignored': report['ignored'], 'seconds': round(time.time() - start, 2)}
  with open(os.path.join(stage_dir, 'convert.json'), 'w') as f:
    json.dump({**summary, 'mapping': report['mapped']}, f, indent=2)
  return summary


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument('--input', required=True, help='P-MapNet / MapKD torch checkpoint (.pt)')
  parser.add_argument('--config', required=True,
                      help='configs/tcs.py:<stage>[,modifiers]: the stage to convert into')
  parser.add_argument('--workdir', required=True, help='ROOT; writes ROOT/<stage>/checkpoints/0')
  parser.add_argument('--allow_pickle', action='store_true',
                      help='unpickle arbitrary objects in the file (trusted files only)')


def run(args):
  """Entry point for `python -m mapkd_jax.convert pmapnet` (args from add_arguments)."""
  from mapkd_jax.train import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(args.config)
  summary = convert_file(args.input, config, args.workdir, config_name=args.config,
                         allow_pickle=args.allow_pickle)
  reasons = {}
  for reason in summary['ignored'].values():
    reasons[reason] = reasons.get(reason, 0) + 1
  # Per-tensor lists are in ROOT/<stage>/convert.json; stdout gets counts per reason.
  print(json.dumps({**summary, 'ignored': reasons}, indent=2))
  return summary
