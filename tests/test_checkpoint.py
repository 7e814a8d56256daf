"""Checkpoint reading: a damaged latest step is reported and skipped, another model is refused.

Small trees, no model: what is tested is checkpoint.py's choice of step and its messages.
"""
import logging as py_logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapkd_jax.train import checkpoint as ckpt_lib


def _variables(scale):
  return {'params': {'conv': {'kernel': jnp.full((3, 4), scale, jnp.float32)},
                     'head': {'bias': jnp.full((5,), scale, jnp.float32)}},
          'batch_stats': {}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _truncate_array_files(step_dir):
  """What an interrupted copy or a full disk leaves: array files cut to half their size."""
  cut = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.sep + 'd' + os.sep in path and os.path.getsize(path) > 1:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
        cut += 1
  assert cut, f'no array files found under {step_dir}'


@pytest.fixture
def two_steps(tmp_path):
  """A stage directory with checkpoint steps 1 and 2 (params = step everywhere)."""
  latest, best = ckpt_lib.managers(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ckpt_lib.save(latest, step, variables=_variables(float(step)), opt_state={'tx': jnp.ones(2)},
                  data_position={'epoch': 0, 'batch': step}, meta={'step': step})
  latest.wait_until_finished()
  latest.close()
  best.close()
  return os.path.join(str(tmp_path), 'checkpoints')


def test_latest_intact_is_restored(two_steps):
  step, variables = ckpt_lib.restore_params(two_steps, _abstract(_variables(0.0)))
  assert step == 2
  np.testing.assert_array_equal(variables['params']['conv']['kernel'], 2.0)


def test_damaged_latest_falls_back_to_previous_and_names_it(two_steps, caplog):
  _truncate_array_files(os.path.join(two_steps, '2'))
  with caplog.at_level(py_logging.ERROR):
    step, variables = ckpt_lib.restore_params(two_steps, _abstract(_variables(0.0)))
  assert step == 1
  np.testing.assert_array_equal(variables['params']['head']['bias'], 1.0)
  assert any('step 2' in r.getMessage() and 'unreadable' in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_damaged_explicit_step_fails_naming_it(two_steps):
  _truncate_array_files(os.path.join(two_steps, '2'))
  with pytest.raises(ValueError, match=r'step 2 is unreadable'):
    ckpt_lib.restore_params(two_steps, _abstract(_variables(0.0)), step=2)


def test_every_step_damaged_fails_naming_each(two_steps):
  for step in ('1', '2'):
    _truncate_array_files(os.path.join(two_steps, step))
  with pytest.raises(ValueError, match=r'no readable checkpoint step.*step 2.*step 1'):
    ckpt_lib.restore_params(two_steps, _abstract(_variables(0.0)))


def test_another_model_is_refused_not_skipped(two_steps):
  """A readable checkpoint of another model is an error naming the paths, never a fallback."""
  other = {'params': {'conv': {'kernel': jax.ShapeDtypeStruct((3, 5), jnp.float32)},
                      'head': {'bias': jax.ShapeDtypeStruct((5,), jnp.float32)}},
           'batch_stats': {}}
  with pytest.raises(ckpt_lib.ModelMismatchError, match=r"\['conv'\]\['kernel'\].*\(3, 4\).*\(3, 5\)"):
    ckpt_lib.restore_params(two_steps, other)
  renamed = {'params': {'encoder': {'kernel': jax.ShapeDtypeStruct((3, 4), jnp.float32)}},
             'batch_stats': {}}
  with pytest.raises(ckpt_lib.ModelMismatchError, match=r"missing.*encoder.*unexpected.*conv"):
    ckpt_lib.restore_params(two_steps, renamed)


def test_latest_and_best_barriers_have_their_own_keys(tmp_path):
  """Both managers save the same step at once; in a multi-process run Orbax's barriers are named
  after the step directory, so the two need distinct prefixes (checkpoint._options)."""
  latest, best = ckpt_lib.managers(str(tmp_path), max_to_keep=1)
  options = [m._options for m in (latest, best)]  # pylint: disable=protected-access
  prefixes = [o.multiprocessing_options.barrier_sync_key_prefix for o in options]
  latest.close()
  best.close()
  assert all(prefixes) and prefixes[0] != prefixes[1], prefixes
