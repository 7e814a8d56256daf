"""Training runs: exact resume after kill -9 or a damaged checkpoint, config/dependency errors.

The whole TCS chain (every stage trained in turn) is tested by tests/test_demo.py, on the chain
the demo trains.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import test_checkpoint
import stage_checkpoints
from configs import tcs
from mapkd_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg, shards, **train):
  config = tcs.get_config(arg)
  config.data.shards = shards
  config.train.update({'steps': 2, 'checkpoint_every': 2, 'eval_every': 2, **train})
  return config


def test_resume_after_kill_is_bit_identical(tiny_shards, tmp_path):
  """kill -9 after the step-2 checkpoint, rerun: same params as an uninterrupted 6-step run.

  Bit-identical on purpose: the killed and the resumed process run the same compiled program on
  the same machine and device count, so every step is the same sequence of float operations.
  """
  arg = 'student,nokd,tiny'
  overrides = dict(steps=6, checkpoint_every=1, eval_every=100)
  reference = str(tmp_path / 'reference')
  trainer.train_and_evaluate(_config(arg, tiny_shards, **overrides), reference)
  # Progress a user can watch: rate, samples/s (global batch) and the stage's ETA at every log.
  rates = stage_checkpoints.logged(os.path.join(reference, 'student_nokd'), 'train/steps_per_s')
  samples = stage_checkpoints.logged(os.path.join(reference, 'student_nokd'),
                                     'train/samples_per_s')
  eta = stage_checkpoints.logged(os.path.join(reference, 'student_nokd'), 'train/eta_min')
  assert sorted(rates) == sorted(samples) == sorted(eta) == list(range(1, 7))
  batch = _config(arg, tiny_shards).train.batch_size
  for step in rates:
    assert rates[step] > 0
    assert samples[step] == pytest.approx(rates[step] * batch, rel=1e-5)
    assert eta[step] == pytest.approx((6 - step) / rates[step] / 60, rel=1e-5)

  killed = str(tmp_path / 'killed')
  cmd = [sys.executable, 'launch.py', f'--config=configs/tcs.py:{arg}', f'--workdir={killed}',
         f'--config.data.shards={tiny_shards}', '--config.train.steps=6',
         '--config.train.checkpoint_every=1', '--config.train.eval_every=100']
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  step_two = os.path.join(killed, 'student_nokd', 'checkpoints', '2')
  deadline = time.time() + 600
  # Polled finely: four more steps, their saves and the final evaluation must not fit between
  # two polls on a fast machine (the kill must land mid-run).
  while not os.path.isdir(step_two) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(step_two), 'the run ended before writing its step-2 checkpoint'
  assert not os.path.isdir(os.path.join(killed, 'student_nokd', 'checkpoints', '6')), \
      'the run finished before it was killed: nothing was resumed'

  trainer.train_and_evaluate(_config(arg, tiny_shards, **overrides), killed)
  step_ref, params_ref = stage_checkpoints.params_item(os.path.join(reference, 'student_nokd'))
  step_res, params_res = stage_checkpoints.params_item(os.path.join(killed, 'student_nokd'))
  assert step_ref == step_res == 6
  jax.tree.map(np.testing.assert_array_equal, params_res, params_ref)

  # A damaged latest checkpoint (array files cut short, as a full disk leaves them): the rerun
  # reports it, sets it aside, resumes from step 5 and ends with the same parameters.
  stage_dir = os.path.join(killed, 'student_nokd')
  test_checkpoint._truncate_array_files(os.path.join(stage_dir, 'checkpoints', '6'))
  trainer.train_and_evaluate(_config(arg, tiny_shards, **overrides), killed)
  aside = os.listdir(os.path.join(stage_dir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('6.'), aside
  step_res, params_res = stage_checkpoints.params_item(stage_dir)
  assert step_res == 6
  jax.tree.map(np.testing.assert_array_equal, params_res, params_ref)


def test_missing_dependency_names_directory_and_command(tiny_shards, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'teacher.*configs/tcs.py:teacher,tiny'):
    trainer.train_and_evaluate(_config('coach,tiny', tiny_shards), str(tmp_path))


@pytest.mark.parametrize('key,value,match', [
    ('train.steps', 0, r'config.train.steps=0'),
    ('kd.msrd_variant', 'l2', r'config.kd.msrd_variant'),
    ('optim.schedule', 'linear', r'config.optim.schedule'),
    ('kd.tgpd_patch_size', (7, 7), r'config.kd.tgpd_patch_size'),
    ('data.bev_x', (-30.0, 30.0, 0.7), r'config.data.bev_x'),
])
def test_bad_config_values_fail_at_start(tiny_shards, tmp_path, key, value, match):
  config = _config('student,nokd,tiny', tiny_shards)
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_bad_config_args():
  with pytest.raises(ValueError, match="unknown stage 'techer'"):
    tcs.get_config('techer')
  with pytest.raises(ValueError, match="unknown arg 'tinyy'"):
    tcs.get_config('student,tinyy')
  with pytest.raises(ValueError, match="arg 'bev'"):
    tcs.get_config('student,bev=10x10')


def test_batch_not_divisible_by_devices(tiny_shards, tmp_path):
  config = _config('student,nokd,tiny', tiny_shards)
  config.train.batch_size = 6
  with pytest.raises(ValueError, match='config.train.batch_size=6'):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_non_finite_update_stops_and_keeps_last_good_checkpoint(tiny_shards, tmp_path):
  root = str(tmp_path)
  trainer.train_and_evaluate(_config('student,nokd,tiny', tiny_shards), root)   # steps 1-2
  config = _config('student,nokd,tiny', tiny_shards, steps=4, checkpoint_every=1,
                   log_every=100, eval_every=100)
  config.optim.learning_rate = 1e30   # the resumed run's first update overflows
  with pytest.raises(FloatingPointError, match=r'non-finite .*l2_params.* steps 3 and 3'):
    trainer.train_and_evaluate(config, root)
  step, variables = stage_checkpoints.params_item(os.path.join(root, 'student_nokd'))
  assert step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
