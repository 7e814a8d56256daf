"""Orbax checkpoints of one stage: `params` alone restores a model; the rest resumes training.

Layout of `ROOT/<stage>/checkpoints/`: an Orbax CheckpointManager directory whose steps hold
  params     the trained model's variables {'params', 'batch_stats'}: enough to evaluate,
             export, or freeze it for the next stage;
  opt_state  {'tx': optax state, 'aux': other trained params, e.g. TGPD projectors (which
             are training-only and so never reach export or a later stage)};
  data       the input position {'epoch', 'batch'} (pipeline.BatchIterator.position), for
             bit-identical resume;
  meta       {'stage', 'step', 'config', 'metrics'}.
`ROOT/<stage>/best/` is a second manager keeping only the best step by validation mIoU (the
metric is also written into `meta`, since a manager reopened without the same `best_fn`
silently treats the latest step as best).
"""
import os

import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('params', 'opt_state', 'data', 'meta')
BEST_METRIC = 'eval/miou'


def _options(max_to_keep, best):
  kwargs = dict(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
  if best:
    kwargs.update(best_fn=lambda metrics: float(metrics[BEST_METRIC]), best_mode='max',
                  keep_checkpoints_without_metrics=False)
  return ocp.CheckpointManagerOptions(**kwargs)


def managers(stage_dir, *, max_to_keep):
  """(latest, best) CheckpointManagers under `stage_dir`."""
  latest = ocp.CheckpointManager(os.path.join(os.path.abspath(stage_dir), 'checkpoints'),
                                 options=_options(max_to_keep, best=False), item_names=ITEMS)
  best = ocp.CheckpointManager(os.path.join(os.path.abspath(stage_dir), 'best'),
                               options=_options(1, best=True), item_names=ITEMS)
  return latest, best


def save(manager, step, *, variables, opt_state, data_position, meta, metrics=None):
  """Saves all items of one step (asynchronously; call `manager.wait_until_finished()`)."""
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(variables),
      opt_state=ocp.args.StandardSave(opt_state),
      data=ocp.args.JsonSave(data_position),
      meta=ocp.args.JsonSave(meta)), metrics=metrics)


def restore_train(manager, step, *, abstract_variables, abstract_opt_state):
  """Restores everything needed to resume training at `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_variables),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return restored['params'], restored['opt_state'], restored['data'], restored['meta']


def _check_directory(ckpt_dir, what, hint):
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{what}: no checkpoint directory {ckpt_dir}; {hint}')


def read_meta(ckpt_dir, step=None):
  """The `meta` item of a step (default latest) of a checkpoint directory."""
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{ckpt_dir}: no such checkpoint directory')
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{ckpt_dir}: holds no finished checkpoint step')
  return step, mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore_params(ckpt_dir, abstract_variables, *, step=None, what='checkpoint', hint=''):
  """Restores only the `params` item (model variables) of `ckpt_dir`, e.g. a frozen teacher.

  Args:
    ckpt_dir: an Orbax manager directory (`ROOT/<stage>/checkpoints` or `.../best`).
    abstract_variables: pytree of jax.ShapeDtypeStruct (with shardings) to restore into;
      a checkpoint whose tree or shapes differ raises a ValueError naming the directory.
    step: a step number, or None for the latest.
    what, hint: used in error messages (which dependency, and the command that creates it).

  Returns:
    (step, variables).
  """
  _check_directory(ckpt_dir, what, hint)
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{what}: {ckpt_dir} holds no finished checkpoint; {hint}')
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_variables)))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{what}: checkpoint {ckpt_dir} step {step} does not match the model of '
                     f'this config (different model sizes or stage?): {e}') from e
  _check_shapes(restored['params'], abstract_variables, ckpt_dir)
  logging.info('Restored %s params from %s step %d', what, ckpt_dir, step)
  return step, restored['params']


def _check_shapes(restored, abstract, ckpt_dir):
  flat_r = jax.tree_util.tree_flatten_with_path(restored)[0]
  flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
  if len(flat_r) != len(flat_a):
    raise ValueError(f'{ckpt_dir}: checkpoint has {len(flat_r)} arrays, model wants {len(flat_a)}')
  for (path, r), (_, a) in zip(flat_r, flat_a):
    if r.shape != a.shape:
      raise ValueError(f'{ckpt_dir}: {jax.tree_util.keystr(path)} has shape {r.shape} in the '
                       f'checkpoint but {a.shape} in the model of this config')
