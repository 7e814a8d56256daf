"""Frozen-output cache (mapkd_jax/train/frozen_cache.py): every cached row is the live frozen forward of its sample
(after an interrupted and resumed build), the student's distillation losses and gradients from the
cache agree with the live ones, the trainer reads it, and stale or missing caches are refused.

The frozen teacher and coach are tiny models with numpy-filled random weights, saved as checkpoints
(what is tested is the cache, not their training or initialisation).
"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stage_checkpoints
from configs import tcs
from mapkd_jax.data import pipeline
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import frozen_cache
from mapkd_jax.train import sharding
from mapkd_jax.train import stages
from mapkd_jax.train import step as step_lib
from mapkd_jax.train import trainer

FROZEN = ('teacher', 'coach')


def _config(shards, **kd):
  config = tcs.get_config('student,tiny')
  config.data.shards = shards
  config.train.update(steps=1, checkpoint_every=1, eval_every=100, eval_batches=1)
  config.kd.update(kd)
  return config


def _save_frozen(config, root, name, step, variables):
  latest, best = ckpt_lib.managers(os.path.join(root, name), max_to_keep=3)
  ckpt_lib.save(latest, step, variables=variables, opt_state={'aux': jnp.zeros(1)},
                data_position={'epoch': 0, 'batch': 0},
                meta={'stage': name, 'step': step, 'ema_decay': 0.0,
                      'config': {'seed': 0, 'stage': name}})
  latest.wait_until_finished()
  latest.close()
  best.close()


class _Interrupt(Exception):
  pass


@pytest.fixture(scope='module')
def world(tiny_shards, tmp_path_factory):
  """Frozen checkpoints + caches built through an interrupted first build; live outputs of every
  train sample by token."""
  root = str(tmp_path_factory.mktemp('cache'))
  config = _config(tiny_shards)
  mesh = sharding.make_mesh()
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  models = step_lib.make_models(config)
  for index, name in enumerate(FROZEN):
    # Numpy-filled weights of the model's shapes (no init compile: what is tested is the cache).
    variables = stage_checkpoints.random_variables(models[name], dummy, seed=index + 1)
    _save_frozen(config, root, name, 1, variables)

  def interrupt(done):
    raise _Interrupt(done)

  with pytest.raises(_Interrupt):   # killed after its first batch
    frozen_cache.build(config, root, 'teacher', tiny_shards, after_batch=interrupt)
  with pytest.raises(FileNotFoundError, match=r'interrupted build.*python -m mapkd_jax.cache_'):
    frozen_cache.check(config, root, 'teacher', tiny_shards)
  dirs = frozen_cache.ensure(config, root)   # resumes the teacher's, builds the coach's

  # The live forward of every train sample, as the trainer runs it (train_step.frozen_forward),
  # in shuffled batches: rows are found by token, not by position.
  frozen = stages.restore_frozen(config, root, models, dummy, mesh)
  live = {}
  batch_size = config.train.batch_size
  for name in FROZEN:
    forward = jax.jit(functools.partial(frozen_cache.frozen_outputs, name=name,
                                        model=models[name]),
                      in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    for host in pipeline.iterate(tiny_shards, 'train', config.data, batch_size=batch_size,
                                 seed=1, shuffle=True, num_epochs=1, drop_remainder=False,
                                 with_tokens=True):
      tokens = list(host.pop('sample_token'))
      out = jax.device_get(forward(frozen[name], sharding.host_batch_to_global(
          trainer.pad_batch(host, batch_size), mesh)))
      for row, token in enumerate(tokens):
        live.setdefault(token, {})[name] = {k: out[k][row] for k in frozen_cache.KEYS}
  return dict(root=root, config=config, dirs=dirs, live=live, models=models, frozen=frozen,
              mesh=mesh, shards=tiny_shards)


def test_every_cached_row_is_the_live_forward_of_its_sample(world):
  cache = frozen_cache.open_for_training(world['config'], world['root'], world['shards'])
  tokens = sorted(world['live'])
  rows = cache.host_rows(tokens)
  for name in FROZEN:
    assert world['dirs'][name] == os.path.join(world['root'], name, 'frozen_cache')
    for key in frozen_cache.KEYS:
      cached = rows[name][key].astype(np.float32)
      want = np.stack([world['live'][t][name][key] for t in tokens]).astype(np.float32)
      # bfloat16 storage: 8 significant bits, a relative rounding error of at most 2^-9.
      np.testing.assert_allclose(cached, want, rtol=2.0**-8, atol=1e-6,
                                 err_msg=f'{name} {key}')
      assert np.abs(cached - want).max() > 0   # really bfloat16 (else the test proves nothing)


def test_cached_and_live_distillation_losses_and_gradients_agree(world):
  config, mesh = world['config'], world['mesh']
  models = world['models']
  state, _, _, _ = trainer.initial_state(config, models, step_lib.make_tgpd(config),
                                         step_lib.make_optimizer(config), mesh)
  host = next(pipeline.iterate(world['shards'], 'train', config.data,
                               batch_size=config.train.batch_size, seed=0, shuffle=True,
                               with_tokens=True))
  tokens = list(host.pop('sample_token'))
  batch = sharding.host_batch_to_global(host, mesh)
  cache = frozen_cache.open_for_training(config, world['root'], world['shards'])
  cached = jax.tree.map(lambda x: jnp.asarray(x.astype(np.float32)), cache.host_rows(tokens))
  live = {n: {k: jnp.asarray(np.stack([world['live'][t][n][k] for t in tokens]))
              for k in frozen_cache.KEYS} for n in FROZEN}
  loss_fn = jax.jit(jax.value_and_grad(
      lambda p, fo: step_lib.stage_loss(p, state.batch_stats, fo, batch, jax.random.key(0),
                                        model=models['student'], tgpd=step_lib.make_tgpd(config),
                                        config=config)[0]))
  loss_live, grads_live = jax.device_get(loss_fn(state.params, live))
  loss_cached, grads_cached = jax.device_get(loss_fn(state.params, cached))
  # Measured on the tiny stage (bfloat16 cache): see the module's README figures.
  rel_loss = abs(loss_cached - loss_live) / abs(loss_live)
  flat_live = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_live)])
  flat_cached = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_cached)])
  rel_grad = np.linalg.norm(flat_cached - flat_live) / np.linalg.norm(flat_live)
  print(f'bfloat16 cache: loss {loss_live:.6f} live vs {loss_cached:.6f} cached (rel '
        f'{rel_loss:.2e}); gradient rel L2 {rel_grad:.2e}')
  assert rel_loss < 1e-3 and rel_grad < 1e-2, (rel_loss, rel_grad)


def test_trainer_reads_the_cache(world, tmp_path):
  config = _config(world['shards'], cached_frozen=True)
  config.frozen.teacher = os.path.join(world['root'], 'teacher', 'checkpoints')
  config.frozen.coach = os.path.join(world['root'], 'coach', 'checkpoints')
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics['miou'])
  assert os.path.isdir(os.path.join(str(tmp_path), 'student', 'checkpoints', '1'))


def test_missing_and_stale_caches_are_refused_naming_both_sides(world, tmp_path):
  config, root = world['config'], world['root']
  other = _config(world['shards'], frozen_cache_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError,
                     match=r'holds no complete teacher output cache.*python -m mapkd_jax.cache_'
                           r'frozen --config configs/tcs.py:student,tiny'):
    frozen_cache.open_for_training(other, root, world['shards'])

  # Another shard set (a copy with another dataset_info.json).
  shards = str(tmp_path / 'shards')
  shutil.copytree(world['shards'], shards)
  with open(os.path.join(shards, 'dataset_info.json'), 'a') as f:
    f.write('\n')
  with pytest.raises(frozen_cache.StaleCacheError,
                     match=rf'shards_dir: cache has .{world["shards"]}., this run needs .{shards}.'
                           r'.*shards_fingerprint'):
    frozen_cache.open_for_training(config, root, shards)

  # Another checkpoint step of the teacher (same weights, written again at step 2).
  _save_frozen(config, root, 'teacher', 2, jax.device_get(world['frozen']['teacher']))
  try:
    with pytest.raises(frozen_cache.StaleCacheError,
                       match=r'checkpoint_step: cache has 1, this run needs 2'):
      frozen_cache.open_for_training(config, root, world['shards'])
  finally:
    shutil.rmtree(os.path.join(root, 'teacher', 'checkpoints', '2'))
