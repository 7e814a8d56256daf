"""Stage chaining of one TCS experiment: where each stage lives, what it needs, data creation.

`--workdir ROOT` holds one experiment: ROOT/data/ (world + shards, created on first use),
ROOT/hd_pretrain, ROOT/teacher, ROOT/coach, ROOT/student, ROOT/student_nokd.
"""
import os

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

from mapkd_jax.data import schema
from mapkd_jax.train import checkpoint as ckpt_lib

# What each stage restores: (config key, stage it comes from).
INIT_DEPS = {'teacher': ('init.hd_prior', 'hd_pretrain'), 'coach': ('init.hd_prior', 'hd_pretrain')}


def stage_dir_name(config):
  return 'student_nokd' if config.nokd else config.stage


def _modifiers(config):
  mods = [] if config.data.bev_name in ('60x30', 'tiny') else [f'bev={config.data.bev_name}']
  if config.data.bev_name == 'tiny':
    mods.append('tiny')
  return ''.join(',' + m for m in mods)


def _command(stage, config, workdir):
  return f'python launch.py --config configs/tcs.py:{stage}{_modifiers(config)} --workdir {workdir}'


def dependency_dir(config, workdir, key, stage):
  """Checkpoint dir named by config `key` ('frozen.teacher', ...), default ROOT/<stage>."""
  section, name = key.split('.')
  override = config[section][name]
  return override or os.path.join(workdir, stage, 'checkpoints')


def check_dependencies(config, workdir):
  """Fails at start, naming the directory and the command that creates it, if an earlier
  stage this one restores (frozen teacher/coach, pretrained HD prior) has no checkpoint."""
  from mapkd_jax.train import step as step_lib  # avoid a cycle at import time
  deps = [(f'frozen.{name}', name) for name in step_lib.frozen_names(config)]
  if config.stage == 'teacher' or (config.stage == 'coach' and config.model.hd.coach_refine):
    deps.append(INIT_DEPS[config.stage])
  for key, stage in deps:
    ckpt_dir = dependency_dir(config, workdir, key, stage)
    try:
      ckpt_lib.read_meta(ckpt_dir)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'stage {stage_dir_name(config)} needs {stage} ({key}), but {ckpt_dir} has no finished '
          f'checkpoint; create it with: {_command(stage, config, workdir)} '
          f'(or point --config.{key} at one)') from e


def shards_dir(config, workdir):
  return config.data.shards or os.path.join(workdir, 'data', f'shards-{config.data.bev_name}')


def ensure_data(config, workdir):
  """Returns the shard dir, creating the synthetic world and/or the shards if missing."""
  out = shards_dir(config, workdir)
  if os.path.exists(os.path.join(out, 'dataset_info.json')):
    return out
  if config.data.shards:
    raise FileNotFoundError(f'config.data.shards={config.data.shards!r} has no dataset_info.json; '
                            'build it with python -m data_prep.build_shards or unset the key')
  if jax.process_index() == 0:
    _create_data(config, workdir, out)
  multihost_utils.sync_global_devices('mapkd_jax.train.stages.ensure_data')
  return out


def _create_data(config, workdir, out):
  from data_prep import build_shards, synthetic_world  # data prep is only needed here
  root = config.data.root
  if not root:
    root = os.path.join(workdir, 'data', 'world')
    syn = config.data.synthetic
    logging.info('Synthetic world at %s (%d scenes x %d samples, seed %d; kept if complete)',
                 root, syn.scenes, syn.samples_per_scene, syn.seed)
    synthetic_world.generate_world(
        root, scenes=syn.scenes, samples_per_scene=syn.samples_per_scene, seed=syn.seed,
        version=config.data.version, workers=config.data.prep_workers,
        image_size=tuple(syn.image_size), sweeps=syn.sweeps, val_fraction=syn.val_fraction)
  logging.info('No shards at %s: building them from %s (%s)', out, root, config.data.version)
  data = config.data
  build_shards.build_shards(
      root, data.version, out, bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y),
      image_size=tuple(data.image_size), num_shards=data.num_shards, workers=data.prep_workers,
      cameras=tuple(data.cameras), label_thickness_ref=data.label_thickness_ref,
      sd_thickness_ref=data.sd_thickness_ref, thickness_ref_step=data.thickness_ref_step,
      direction_bins=data.direction_bins, lidar_sweeps=data.lidar_sweeps,
      lidar_min_range=data.lidar_min_range, jpeg_quality=data.jpeg_quality,
      boundary_clip_margin=data.boundary_clip_margin, sd_road_classes=tuple(data.sd_road_classes))


def batch_spec(config, batch_size):
  return {k: (shape, jnp.dtype(dtype))
          for k, (shape, dtype) in schema.batch_spec(config.data, batch_size).items()}


def abstract_variables(model, dummy_batch, mesh):
  """Replicated ShapeDtypeStructs of a model's variables: the target of a params restore."""
  from mapkd_jax.train import sharding  # local: only this function needs shardings
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(0), 'mask': jax.random.key(0)}
  shapes = jax.eval_shape(lambda: model.init(rngs, dummy_batch, train=False))
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), shapes)


def restore_frozen(config, workdir, models, dummy_batch, mesh):
  """{'teacher': variables, 'coach': variables} restored params-only for this stage."""
  from mapkd_jax.train import step as step_lib  # avoid a cycle at import time
  frozen = {}
  for name in step_lib.frozen_names(config):
    ckpt_dir = dependency_dir(config, workdir, f'frozen.{name}', name)
    _, frozen[name] = ckpt_lib.restore_params(
        ckpt_dir, abstract_variables(models[name], dummy_batch, mesh),
        what=f'frozen {name} for stage {config.stage}',
        hint=f'train it first: {_command(name, config, workdir)} (or set --config.frozen.{name})')
  return frozen


def apply_init(state, config, workdir, mesh):
  """Fresh state + pretrained parts: converted EfficientNet-B0 weights (init.image_encoder,
  every stage) and the HD-prior module from hd_pretrain (teacher, coach)."""
  if config.init.image_encoder:
    state = _init_image_encoders(state, config)
  if config.stage not in INIT_DEPS or 'hd_prior' not in state.params['model']:
    return state
  key, stage = INIT_DEPS[config.stage]
  ckpt_dir = dependency_dir(config, workdir, key, stage)
  from mapkd_jax import models as models_lib
  mae = models_lib.build('hd_mae', config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in batch_spec(config, 1).items()}
  _, mae_vars = ckpt_lib.restore_params(
      ckpt_dir, abstract_variables(mae, dummy, mesh), what=f'HD prior for stage {config.stage}',
      hint=f'pretrain it first: {_command(stage, config, workdir)} (or set --config.{key})')
  params = {**state.params['model'], 'hd_prior': mae_vars['params']['hd_prior']}
  batch_stats = dict(state.batch_stats)
  if 'hd_prior' in mae_vars.get('batch_stats', {}):  # its BatchNorm statistics come along
    batch_stats['hd_prior'] = mae_vars['batch_stats']['hd_prior']
  logging.info('Initialized %s.hd_prior (params and batch stats) from %s', config.stage, ckpt_dir)
  return state.replace(params={**state.params, 'model': params}, batch_stats=batch_stats)


def _init_image_encoders(state, config):
  """Every EfficientNet-B0 of the model <- the item `python -m mapkd_jax.convert efficientnet`
  wrote (ImageNet trunk or a reference CamEncode); the rest of each encoder stays at init."""
  from mapkd_jax.convert import efficientnet as convert_eff  # no torch: loading needs orbax only
  item = convert_eff.read_item(config.init.image_encoder)
  params, batch_stats, log = convert_eff.overlay(
      state.params['model'], state.batch_stats, item, source=config.init.image_encoder)
  for path, entry in log.items():
    logging.info('init.image_encoder %s -> %s: loaded %s; left at init: %s',
                 config.init.image_encoder, path, entry['loaded'] or 'nothing',
                 entry['left_at_init'] or 'nothing')
  return state.replace(params={**state.params, 'model': params}, batch_stats=batch_stats)
