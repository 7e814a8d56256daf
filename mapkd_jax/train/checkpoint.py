"""Orbax checkpoints of one stage: `params` alone restores a model; the rest resumes training.

Layout of `ROOT/<stage>/checkpoints/`: an Orbax CheckpointManager directory whose steps hold
  params     the trained model's variables {'params', 'batch_stats'}: enough to evaluate,
             export, or freeze it for the next stage; with config.train.ema_decay > 0 the
             EMA of the weights (and the live batch_stats);
  opt_state  {'tx': optax state, 'aux': other trained params, e.g. TGPD projectors (which
             are training-only and so never reach export or a later stage), and with EMA
             'live_model': the live weights, which only resuming reads};
  data       the input position {'epoch', 'batch'} (pipeline.BatchIterator.position), for
             bit-identical resume;
  meta       {'stage', 'step', 'ema_decay', 'config', 'metrics'}.
`ROOT/<stage>/best/` is a second manager keeping only the best step by validation mIoU (the
metric is also written into `meta`, since a manager reopened without the same `best_fn`
silently treats the latest step as best).
"""
import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('params', 'opt_state', 'data', 'meta')


class ModelMismatchError(ValueError):
  """A readable checkpoint of another model (tree or shapes differ): never skipped over."""
BEST_METRIC = 'eval/miou'


def _options(max_to_keep, best):
  # Distinct barrier-key prefixes: both managers save step N at once, and Orbax names its
  # multi-process barriers after the step directory ('async_write_complete.N'), so without a
  # prefix the latest and best saves of a step waited on the same key. In CI that failed
  # process 0's commit of best/1 and left process 1 in the barrier until jax.distributed's
  # shutdown timeout aborted both (tests/test_multihost.py, session 8).
  kwargs = dict(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix='best' if best else 'latest'))
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


def restore_meta(manager, step):
  """The `meta` item of `step` of an open manager (a dict)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore_newest_readable(manager, restore_step, *, what):
  """Restores the newest step `restore_step(step)` can read, newest first.

  A step whose files are damaged (truncated array files, a corrupt JSON item: TensorStore and
  JSON errors) is reported by its directory and skipped, so an interrupted or damaged latest
  save costs only the steps since the previous one.

  Args:
    manager: an Orbax CheckpointManager.
    restore_step: step -> restored items; raises on unreadable files.
    what: used in messages (which stage or checkpoint).

  Returns:
    (step, restored, unreadable) with `unreadable` the skipped steps, newest first; step is
    None when the manager holds no step.

  Raises:
    ValueError: every step is unreadable (naming each step and its error).
  """
  unreadable, errors = [], []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, restore_step(step), unreadable
    except ModelMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises several types)
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      logging.error('%s: checkpoint step %d in %s is unreadable (%s: %s); trying the previous '
                    'step', what, step, manager.directory, type(e).__name__, first_line)
      unreadable.append(step)
      errors.append(f'step {step}: {type(e).__name__}: {first_line}')
  if unreadable:
    raise ValueError(f'{what}: no readable checkpoint step in {manager.directory}: '
                     + '; '.join(errors))
  return None, None, unreadable


def set_aside(manager, steps, dest_dir):
  """Moves the directories of `steps` out of `manager`'s directory into `dest_dir`.

  Process 0 moves (one shared filesystem); every process waits for it. Reopen the managers
  afterwards: they cache the step list.
  """
  if jax.process_index() == 0:
    os.makedirs(dest_dir, exist_ok=True)
    for step in steps:
      source = os.path.join(str(manager.directory), str(step))
      target = os.path.join(dest_dir, f'{step}.{int(time.time())}')
      os.replace(source, target)
      logging.warning('Moved unreadable checkpoint step %d to %s', step, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('checkpoint.set_aside')


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
  if mngr.latest_step() is None:
    raise FileNotFoundError(f'{what}: {ckpt_dir} holds no finished checkpoint; {hint}')

  def restore(s):
    # The stored tree is checked against the model first (from the step's metadata), so a
    # checkpoint of another model is reported as such rather than as an unreadable step.
    _check_tree(mngr, s, abstract_variables, ckpt_dir, what)
    return mngr.restore(s, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_variables)))

  if step is None:   # the newest readable step (a damaged latest save is reported and skipped)
    step, restored, _ = restore_newest_readable(mngr, restore, what=f'{what} ({ckpt_dir})')
  else:              # an explicit step is read as asked, or fails naming it
    try:
      restored = restore(step)
    except ModelMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{what}: checkpoint {ckpt_dir} step {step} is unreadable: '
                       f'{type(e).__name__}: {e}') from e
  _check_shapes(restored['params'], abstract_variables, ckpt_dir)
  logging.info('Restored %s params from %s step %d', what, ckpt_dir, step)
  return step, restored['params']


def _check_tree(mngr, step, abstract, ckpt_dir, what):
  """The checkpoint's params tree (from its metadata) has the model's paths and shapes."""
  try:
    stored = ocp.StandardCheckpointer().metadata(
        os.path.join(str(mngr.directory), str(step), 'params')).item_metadata
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: left to the restore)
    return
  stored_flat = {jax.tree_util.keystr(p): tuple(getattr(m, 'shape', ()))
                 for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
  if not stored_flat:   # metadata unreadable or empty: the restore reports the step
    return
  wanted = {jax.tree_util.keystr(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  missing = sorted(set(wanted) - set(stored_flat))
  unexpected = sorted(set(stored_flat) - set(wanted))
  if missing or unexpected:
    raise ModelMismatchError(f'{what}: checkpoint {ckpt_dir} step {step} does not match the model of '
                     f'this config (different model sizes or stage?): missing {missing[:5]}, '
                     f'unexpected {unexpected[:5]}')
  for key, shape in wanted.items():
    if stored_flat[key] != shape:
      raise ModelMismatchError(f'{ckpt_dir}: {key} has shape {stored_flat[key]} in the checkpoint but '
                       f'{shape} in the model of this config')


def _check_shapes(restored, abstract, ckpt_dir):
  flat_r = jax.tree_util.tree_flatten_with_path(restored)[0]
  flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
  if len(flat_r) != len(flat_a):
    raise ValueError(f'{ckpt_dir}: checkpoint has {len(flat_r)} arrays, model wants {len(flat_a)}')
  for (path, r), (_, a) in zip(flat_r, flat_a):
    if r.shape != a.shape:
      raise ValueError(f'{ckpt_dir}: {jax.tree_util.keystr(path)} has shape {r.shape} in the '
                       f'checkpoint but {a.shape} in the model of this config')
