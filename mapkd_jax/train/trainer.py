"""Training loop of one TCS stage: data, init/restore, jitted steps, logging, eval, checkpoints.

Resume order: this stage's latest checkpoint -> scratch (plus `init.hd_prior` for the teacher's
and coach's HD module). Frozen teacher/coach params are restored params-only from their stage
directories and passed to every step as a separate, never-donated argument; with
config.kd.cached_frozen their outputs are read from the cache of `python -m
mapkd_jax.cache_frozen` instead and passed as batch inputs.

EMA (config.train.ema_decay > 0): the checkpoint's `params` item holds the EMA weights (with
the live BatchNorm statistics), so evaluation, export and a later stage's frozen model read
the EMA with no change; the live weights go into the `opt_state` item (key 'live_model'),
which only resuming reads. Meta records ema_decay; resuming with another value is refused.
"""
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from jax.experimental import multihost_utils

from mapkd_jax.data import dataset_info as info_lib
from mapkd_jax.data import pipeline
from mapkd_jax.eval import metrics as metrics_lib
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import config_lib
from mapkd_jax.train import sharding
from mapkd_jax.train import stages
from mapkd_jax.train import step as step_lib


def _log_start(config, mesh, stage_dir):
  logging.info('Stage %s: process %d/%d, %d local / %d global devices (%s), mesh %s, workdir %s',
               stages.stage_dir_name(config), jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind,
               dict(mesh.shape), stage_dir)


def train_and_evaluate(config, workdir):
  """Trains `config.stage` under `workdir/<stage>` and returns its final eval metrics."""
  config_lib.validate(config)
  _validate_ema_and_cache(config)
  stages.check_dependencies(config, workdir)
  stage_dir = os.path.join(workdir, stages.stage_dir_name(config))
  os.makedirs(stage_dir, exist_ok=True)
  mesh = sharding.make_mesh()
  _log_start(config, mesh, stage_dir)
  sharding.check_batch_size(config.train.batch_size, mesh)
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(stage_dir, just_logging=jax.process_index() > 0)

  shards_dir = stages.ensure_data(config, workdir)
  info = info_lib.load_dataset_info(shards_dir)
  info_lib.check_dataset_info(info, config.data, shards_dir)
  host_batch = config.train.batch_size // jax.process_count()
  if info['splits']['train']['num_samples'] < config.train.batch_size:
    raise ValueError(f'{shards_dir}: train split has {info["splits"]["train"]["num_samples"]} '
                     f'samples, fewer than config.train.batch_size={config.train.batch_size}')

  models = step_lib.make_models(config)
  tgpd = step_lib.make_tgpd(config)
  tx = step_lib.make_optimizer(config)
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  state, state_sh, train_rng, dummy = initial_state(config, models, tgpd, tx, mesh)
  logging.info('Parameters of %s:\n%s', step_lib.model_name(config),
               parameter_overview.get_parameter_overview(state.params['model']))

  latest_mngr, best_mngr = ckpt_lib.managers(stage_dir, max_to_keep=config.train.keep_checkpoints)
  start_step, data_position = 0, None
  restore_items = functools.partial(ckpt_lib.restore_train, latest_mngr,
                                    abstract_variables=_abstract(_variables_of(state), repl),
                                    abstract_opt_state=_abstract(_train_extra_of(state), repl))

  def restore(step):
    _check_resume_ema(latest_mngr, step, config)
    return restore_items(step)

  step_found, restored, unreadable = ckpt_lib.restore_newest_readable(
      latest_mngr, restore, what=f'resuming {config.stage}')
  if unreadable:
    # Their step numbers will be written again: move the damaged steps out of the manager's
    # directory (kept, not deleted, for inspection) and reopen the managers.
    ckpt_lib.set_aside(latest_mngr, unreadable, os.path.join(stage_dir, 'unreadable_checkpoints'))
    latest_mngr.close()
    best_mngr.close()
    latest_mngr, best_mngr = ckpt_lib.managers(stage_dir,
                                               max_to_keep=config.train.keep_checkpoints)
  if step_found is not None:
    start_step = step_found
    variables, train_extra, data_position, _ = restored
    ema_on = state.ema is not None
    state = state.replace(step=jnp.asarray(start_step, jnp.int32),
                          opt_state=train_extra['tx'],
                          params={'model': train_extra['live_model'] if ema_on
                                           else variables['params'],
                                  'aux': train_extra['aux']},
                          batch_stats=variables['batch_stats'],
                          ema=variables['params'] if ema_on else None)
    logging.info('Resumed %s from %s step %d (data position %s)', config.stage,
                 latest_mngr.directory, start_step, data_position)
  else:
    state = stages.apply_init(state, config, workdir, mesh)
  cache = None
  if step_lib.cached_frozen(config):
    from mapkd_jax.train import frozen_cache  # pylint: disable=g-import-not-at-top
    cache = frozen_cache.open_for_training(config, workdir, shards_dir)
    frozen_sh = cache.shardings(batch_sh)
  else:
    frozen = stages.restore_frozen(config, workdir, models, dummy, mesh)
    frozen_sh = jax.tree.map(lambda _: repl, frozen)

  train_fn = jax.jit(
      functools.partial(step_lib.train_step, models=models, tgpd=tgpd, tx=tx, config=config),
      in_shardings=(state_sh, frozen_sh, batch_sh, repl),
      out_shardings=(state_sh, repl), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=models[step_lib.model_name(config)],
                                      num_classes=len(config.data.classes) + 1),
                    in_shardings=(repl, batch_sh), out_shardings=repl)

  def evaluate(state):
    return run_eval(eval_fn, _variables_of(state), shards_dir, config, mesh)

  # Tokens only when they key the cache (the same batches either way: tokens are decoded
  # beside the other features, the order does not depend on them).
  batches = pipeline.iterate(shards_dir, 'train', config.data, batch_size=host_batch,
                             seed=config.seed, shuffle=True, position=data_position,
                             with_tokens=cache is not None)
  eval_metrics = {}
  t_last, step_last = time.time(), start_step
  for step in range(start_step + 1, config.train.steps + 1):
    host = next(batches)
    if cache is not None:
      frozen = cache.global_batch(host.pop('sample_token'), mesh)
    batch = sharding.host_batch_to_global(host, mesh)
    state, step_metrics = train_fn(state, frozen, batch, train_rng)

    is_last = step == config.train.steps
    save_now = step % config.train.checkpoint_every == 0 or is_last
    if save_now or step % config.train.log_every == 0:
      # Non-finite params make every later loss non-finite too: checking the current step's
      # metrics before a save guarantees no checkpoint ever holds NaN/Inf parameters.
      step_metrics = jax.device_get(step_metrics)
      _check_finite(step_metrics, step_last, step)
    if step % config.train.log_every == 0 or is_last:
      now = time.time()
      steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
      step_metrics['train/steps_per_s'] = steps_per_s
      step_metrics['train/samples_per_s'] = steps_per_s * config.train.batch_size
      step_metrics['train/eta_min'] = (config.train.steps - step) / max(steps_per_s, 1e-9) / 60
      writer.write_scalars(step, step_metrics)
      t_last, step_last = now, step
    if step % config.train.eval_every == 0 or is_last:
      eval_metrics = evaluate(state)
      writer.write_scalars(step, _flat_eval(eval_metrics))
    if save_now:
      _save(latest_mngr, best_mngr, step, state, config, batches.position, eval_metrics)
  if not eval_metrics:
    eval_metrics = evaluate(state)
  latest_mngr.wait_until_finished()
  best_mngr.wait_until_finished()
  writer.flush()
  logging.info('Stage %s done: %s', config.stage, json.dumps(_flat_eval(eval_metrics)))
  return eval_metrics


def initial_state(config, models, tgpd, tx, mesh):
  """The stage's freshly initialised TrainState, as every run of `config` starts it.

  Returns:
    (state, state shardings, rng of the training steps, dummy batch of one).
  """
  # Shapes only matter for init (no batch axis in any parameter): a batch of one.
  dummy = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in stages.batch_spec(config, 1).items()}
  init_state = functools.partial(step_lib.init_state, batch=dummy, models=models, tgpd=tgpd,
                                 tx=tx, config=config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state_sh = sharding.state_shardings(mesh, jax.eval_shape(init_state, init_rng))
  state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
  return state, state_sh, train_rng, dummy


def _variables_of(state):
  """The model's variables: what `params` checkpoints hold, evaluation and export read and the
  next stage restores; the EMA weights when EMA is on (with the live batch_stats)."""
  params = state.params['model'] if state.ema is None else state.ema
  return {'params': params, 'batch_stats': state.batch_stats}


def _train_extra_of(state):
  """What resuming needs beyond the model: optimizer state, the TGPD projectors and, when the
  params item holds the EMA, the live weights."""
  extra = {'tx': state.opt_state, 'aux': state.params['aux']}
  if state.ema is not None:
    extra['live_model'] = state.params['model']
  return extra


def _validate_ema_and_cache(config):
  decay = step_lib.ema_decay(config)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'config.train.ema_decay={decay} must be in [0, 1) (0 = no EMA)')
  if config.kd.get('cached_frozen', False):
    dtype = config.kd.get('frozen_cache_dtype', 'bfloat16')
    if dtype not in ('bfloat16', 'float32'):
      raise ValueError(f"config.kd.frozen_cache_dtype={dtype!r} must be 'bfloat16' or "
                       "'float32'")


def _check_resume_ema(manager, step, config):
  """A checkpoint written with another ema_decay has other items: refuse it, naming both."""
  meta = ckpt_lib.restore_meta(manager, step)
  found, wanted = float(meta.get('ema_decay', 0.0)), step_lib.ema_decay(config)
  if found != wanted:
    raise ckpt_lib.ModelMismatchError(
        f'{manager.directory} step {step} was trained with config.train.ema_decay={found}, this '
        f'run has {wanted}: resume with --config.train.ema_decay={found}, or start in another '
        'workdir')


def _abstract(tree, sharding_):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def _check_finite(step_metrics, first, last):
  bad = [k for k, v in step_metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise FloatingPointError(f'non-finite {sorted(bad)} between steps {first + 1} and {last}; '
                             'the last good checkpoint is kept; lower config.optim.learning_rate')


def _flat_eval(eval_metrics):
  flat = {'eval/miou': eval_metrics.get('miou', float('nan'))}
  for name, value in eval_metrics.get('iou', {}).items():
    flat[f'eval/iou_{name}'] = value
  return flat


def _save(latest_mngr, best_mngr, step, state, config, data_position, eval_metrics):
  meta = {'stage': config.stage, 'nokd': config.nokd, 'step': step,
          'ema_decay': step_lib.ema_decay(config),
          'config': json.loads(config.to_json_best_effort()), 'metrics': _flat_eval(eval_metrics)}
  kwargs = dict(variables=_variables_of(state), opt_state=_train_extra_of(state),
                data_position=data_position, meta=meta)
  ckpt_lib.save(latest_mngr, step, **kwargs)
  if eval_metrics and math.isfinite(eval_metrics['miou']):
    ckpt_lib.save(best_mngr, step, metrics=_flat_eval(eval_metrics), **kwargs)


def run_eval(eval_fn, variables, shards_dir, config, mesh):
  """Validation mIoU over the val split (or its first `train.eval_batches` batches)."""
  num_classes = len(config.data.classes) + 1
  inter = np.zeros(num_classes, np.int64)
  union = np.zeros(num_classes, np.int64)
  host_batch = config.train.batch_size // jax.process_count()
  batches = pipeline.iterate(shards_dir, 'val', config.data, batch_size=host_batch,
                             seed=config.seed, shuffle=False, num_epochs=1, drop_remainder=False)
  for i, host in enumerate(synced_batches(batches, stages.batch_spec(config, host_batch))):
    if config.train.eval_batches and i >= config.train.eval_batches:
      break
    counts = jax.device_get(eval_fn(variables, sharding.host_batch_to_global(
        pad_batch(host, host_batch), mesh)))
    inter += counts['intersection']
    union += counts['union']
  return metrics_lib.iou_from_counts(inter, union, config.data.classes)


def synced_batches(batches, spec):
  """Host batches until every process has run out; exhausted hosts feed empty batches.

  Hosts read different files, so their split sizes may differ; every jitted call is a
  collective over all devices, so all hosts must make the same number of calls.
  """
  while True:
    host = next(batches, None)
    has_data = np.asarray(host is not None)
    if jax.process_count() > 1:
      has_data = multihost_utils.process_allgather(has_data)
    if not np.any(has_data):
      return
    yield host if host is not None else {
        k: np.zeros((0,) + tuple(shape[1:]), dtype) for k, (shape, dtype) in spec.items()}


def pad_batch(host, batch_size):
  """Pads a partial (or empty) last batch to `batch_size` rows, with a `valid` mask.

  Every device needs an equal share of the batch; the padded rows are masked out of metrics.
  """
  rows = len(host['semantic'])

  def fill(v):  # repeat a real row where there is one: zero calibration is not invertible
    filler = np.repeat(v[:1], batch_size - rows, 0) if rows else np.zeros(
        (batch_size,) + v.shape[1:], v.dtype)
    return np.concatenate([v, filler])

  padded = {k: fill(v) for k, v in host.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in 'biuf'}
  padded['valid'] = np.arange(batch_size) < rows
  return padded
