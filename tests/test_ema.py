"""EMA of the weights (config.train.ema_decay): the update against a numpy loop, training unchanged
by it, the checkpoint's params item holding the EMA, and exact resume with EMA on."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import stage_checkpoints
from configs import tcs
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import step as step_lib
from mapkd_jax.train import trainer

STEPS = 3
DECAY = 0.6


def _numpy_ema(history, decay):
  """(1 - d) sum_i d^(t-i) p_i / (1 - d^t), summed term by term in float64."""
  t = len(history)
  total = sum((1 - decay) * decay**(t - i) * np.asarray(p, np.float64)
              for i, p in enumerate(history, start=1))
  return total / (1 - decay**t)


@pytest.mark.parametrize('decay', [0.5, 0.999])
def test_ema_update_matches_numpy_loop(decay):
  rng = np.random.default_rng(0)
  history = [{'a': rng.normal(size=(3, 4)).astype(np.float32),
              'b': {'c': rng.normal(size=(5,)).astype(np.float32)}} for _ in range(6)]
  ema = jax.tree.map(jnp.zeros_like, history[0])
  update = jax.jit(step_lib.ema_update, static_argnums=(3,))
  for t, params in enumerate(history, start=1):
    ema = update(ema, params, jnp.int32(t), decay)
    want = jax.tree.map(lambda *ps: _numpy_ema(ps, decay), *history[:t])
    jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=2e-5, atol=1e-6),
                 ema, want)
  # Step 1 is the params exactly, whatever the accumulator held.
  first = update(jax.tree.map(lambda x: x + 7.0, history[0]), history[0], jnp.int32(1), decay)
  jax.tree.map(np.testing.assert_array_equal, first, history[0])


def _config(shards, **train):
  config = tcs.get_config('student,nokd,tiny')
  config.data.shards = shards
  config.train.update({'steps': STEPS, 'checkpoint_every': 1, 'eval_every': 100,
                       'eval_batches': 1, 'keep_checkpoints': STEPS, **train})
  return config


def _item(stage_dir, item, step):
  mngr = ocp.CheckpointManager(os.path.join(stage_dir, 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  restored = mngr.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.StandardRestore() if item != 'meta' else ocp.args.JsonRestore()}))
  return jax.tree.map(np.asarray, restored[item]) if item != 'meta' else restored[item]


@pytest.fixture(scope='module')
def runs(tiny_shards, tmp_path_factory):
  """Stage dirs of a plain run and an EMA run (3 steps, a checkpoint every step), and of the
  EMA run resumed from its step-2 checkpoint."""
  plain = str(tmp_path_factory.mktemp('plain'))
  ema = str(tmp_path_factory.mktemp('ema'))
  trainer.train_and_evaluate(_config(tiny_shards), plain)
  trainer.train_and_evaluate(_config(tiny_shards, ema_decay=DECAY), ema)
  resumed = str(tmp_path_factory.mktemp('resumed'))
  shutil.copytree(ema, resumed, dirs_exist_ok=True)
  for manager in ('checkpoints', 'best'):
    shutil.rmtree(os.path.join(resumed, 'student_nokd', manager, str(STEPS)), ignore_errors=True)
  trainer.train_and_evaluate(_config(tiny_shards, ema_decay=DECAY), resumed)
  return {k: os.path.join(v, 'student_nokd') for k, v in
          (('plain', plain), ('ema', ema), ('resumed', resumed))}


def test_ema_leaves_training_unchanged_and_params_item_is_the_ema(runs):
  # Off: the checkpoint items are those of a run without EMA (no live copy).
  assert 'live_model' not in _item(runs['plain'], 'opt_state', STEPS)
  assert _item(runs['plain'], 'meta', STEPS)['ema_decay'] == 0.0
  assert _item(runs['ema'], 'meta', STEPS)['ema_decay'] == DECAY
  # On: the live weights follow the plain run bit for bit (EMA only reads them).
  history = [stage_checkpoints.params_item(runs['plain'], s)[1] for s in range(1, STEPS + 1)]
  live = _item(runs['ema'], 'opt_state', STEPS)['live_model']
  jax.tree.map(np.testing.assert_array_equal, live, history[-1]['params'])
  # The params item (what evaluate, export and a later stage read) is the EMA of those weights,
  # paired with the live BatchNorm statistics.
  _, ema_item = stage_checkpoints.params_item(runs['ema'], STEPS)
  want = jax.tree.map(lambda *ps: _numpy_ema(ps, DECAY), *[h['params'] for h in history])
  jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6),
               ema_item['params'], want)
  jax.tree.map(np.testing.assert_array_equal, ema_item['batch_stats'],
               history[-1]['batch_stats'])
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                         ema_item['params'], history[-1]['params']))
  assert any(differs), 'the params item holds the live weights, not their EMA'


def test_resume_with_ema_is_bit_identical(runs):
  for item in ('params', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, _item(runs['resumed'], item, STEPS),
                 _item(runs['ema'], item, STEPS))


def test_resume_with_other_ema_decay_is_refused(runs, tiny_shards):
  workdir = os.path.dirname(runs['resumed'])
  with pytest.raises(ckpt_lib.ModelMismatchError, match=rf'ema_decay={DECAY}, this run has 0.0'):
    trainer.train_and_evaluate(_config(tiny_shards, steps=STEPS + 1), workdir)


def test_bad_ema_decay_fails_at_start(tiny_shards, tmp_path):
  with pytest.raises(ValueError, match=r'config.train.ema_decay=1.0'):
    trainer.train_and_evaluate(_config(tiny_shards, ema_decay=1.0), str(tmp_path))
