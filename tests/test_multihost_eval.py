"""`evaluate` on two jax.distributed processes (4 CPU devices each) == on one process.

The val split is cut to 7 samples so the two shares are uneven (4 and 3). The model is a
randomly initialized tiny student saved as a checkpoint (no training: the test is about the
split and the merge, not about the weights); its noisy maps still give predicted vectors, so
the AP records and IoU counts of both processes carry weight in the merged result.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import two_processes

from configs import tcs
from mapkd_jax import evaluate as eval_lib
from mapkd_jax import models as models_lib
from mapkd_jax.eval import gather as gather_lib
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import stages

ARG = 'student,nokd,tiny'
STEP = 1


def _odd_val_split(tiny_shards, dest):
  """A copy of the tiny shards whose val split lost the last record of its last file."""
  shutil.copytree(tiny_shards, dest, ignore=shutil.ignore_patterns('_progress'))
  info_path = os.path.join(dest, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  last = os.path.join(dest, info['splits']['val']['files'][-1])
  records = [r.numpy() for r in tf.data.TFRecordDataset(last)]
  with tf.io.TFRecordWriter(last) as writer:
    for record in records[:-1]:
      writer.write(record)
  for key in ('num_samples', 'num_examples'):
    info['splits']['val'][key] -= 1
  with open(info_path, 'w') as f:
    json.dump(info, f)
  return info['splits']['val']['num_samples']


def _save_random_student(config, workdir):
  model = models_lib.build(config.stage, config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  rngs = {'params': jax.random.key(3), 'dropout': jax.random.key(0), 'mask': jax.random.key(0)}
  variables = jax.jit(lambda: model.init(rngs, dummy, train=False))()
  latest, best = ckpt_lib.managers(os.path.join(workdir, stages.stage_dir_name(config)),
                                   max_to_keep=1)
  ckpt_lib.save(latest, STEP, variables=variables, opt_state={'aux': jnp.zeros(3)},
                data_position={'epoch': 0, 'batch': STEP},
                meta={'stage': config.stage, 'nokd': config.nokd, 'step': STEP,
                      'config': json.loads(config.to_json_best_effort())})
  latest.wait_until_finished()
  latest.close()
  best.close()


def test_two_processes_write_the_one_process_metrics(tiny_shards, tmp_path):
  shards = str(tmp_path / 'shards')
  num_val = _odd_val_split(tiny_shards, shards)
  assert num_val % 2 == 1
  config = tcs.get_config(ARG)
  config.data.shards = shards
  single, multi = str(tmp_path / 'one_process'), str(tmp_path / 'two_processes')
  _save_random_student(config, single)
  shutil.copytree(single, multi)

  argv = lambda i, port: [  # noqa: E731
      '-m', 'mapkd_jax.evaluate', f'--config=configs/tcs.py:{ARG}', f'--workdir={multi}',
      f'--config.data.shards={shards}', '--checkpoint=latest', '--num_images=1',
      '--num_processes=2', f'--process_id={i}', f'--coordinator_address=localhost:{port}',
      f'--heartbeat_timeout_s={two_processes.HEARTBEAT_TIMEOUT_S}']
  # The one-process reference runs here (8 devices) while the two processes run.
  outputs, reference = two_processes.run(
      argv, timeout_s=600,
      while_running=lambda: eval_lib.evaluate(config, single, checkpoint='latest', num_images=1),
      before_retry=lambda: shutil.rmtree(os.path.join(multi, 'student_nokd', 'eval'),
                                         ignore_errors=True))

  eval_dir = lambda root: os.path.join(root, 'student_nokd', 'eval')  # noqa: E731
  read = lambda root, name: json.load(open(os.path.join(eval_dir(root), name)))  # noqa: E731
  one, two = read(single, 'metrics.json'), read(multi, 'metrics.json')
  assert one['num_samples'] == two['num_samples'] == num_val
  assert sum(one['num_pred_vectors'].values()) > 0, 'the random model should predict vectors'
  assert not np.isnan(reference['miou'])
  one.pop('checkpoint_dir')
  two.pop('checkpoint_dir')
  assert two == one     # every IoU, AP, count and protocol field, exactly
  for name in ('predictions.json', 'gt.json'):
    assert read(multi, name) == read(single, name), name
  npz_one = np.load(os.path.join(eval_dir(single), 'semantic.npz'))
  npz_two = np.load(os.path.join(eval_dir(multi), 'semantic.npz'))
  for key in ('tokens', 'pred', 'gt'):
    np.testing.assert_array_equal(npz_two[key], npz_one[key])
  assert not os.path.exists(os.path.join(eval_dir(multi), 'parts'))
  # Only process 0 printed the metrics.
  assert '"miou"' in outputs[0] and '"miou"' not in outputs[1]


def test_bad_process_flags_are_refused():
  with pytest.raises(ValueError, match='process_index=3'):
    eval_lib.share_size(8, 3, 2)


def _part(index):
  token = f't{index}'
  return ({'indices': [index], 'tokens': [token], 'records': {token: {}},
           'predictions': {token: []}, 'gt': {token: []}, 'counts': {'all': [[index, 1], [2, 3]]}},
          {'pred': np.full((1, 2, 3), index, np.uint8), 'gt': np.zeros((1, 2, 3), np.uint8)})


def test_gather_times_out_naming_the_missing_processes(tmp_path):
  """Process 0 of 4 with the parts of 0 and 2 only: fails after the timeout naming 1 and 3."""
  run_dir = str(tmp_path / 'parts' / 'run')
  gather_lib.write_part(run_dir, 2, *_part(2))
  now = [0.0]
  sleeps = []

  def sleep(seconds):   # a fake clock: the test takes no wall time
    sleeps.append(seconds)
    now[0] += seconds

  with pytest.raises(TimeoutError) as error:
    gather_lib.write_part(run_dir, 0, *_part(0))
    gather_lib.wait_for_parts(run_dir, 4, timeout_s=30.0, poll_s=5.0, clock=lambda: now[0],
                              sleep=sleep)
  message = str(error.value)
  assert 'process(es) [1, 3] of 4' in message and 'gather_timeout_s' in message
  for k in (1, 3):
    assert os.path.join(run_dir, f'process_{k:05d}.json') in message
    assert os.path.join(run_dir, f'process_{k:05d}.npz') in message
  assert 'process_00002' not in message and 'process_00000' not in message
  assert now[0] == 30.0 and sleeps == [5.0] * 6      # waited the whole timeout, then failed
  with pytest.raises(ValueError, match='gather_timeout_s must be > 0'):
    gather_lib.wait_for_parts(run_dir, 4, timeout_s=0)


def test_gather_returns_late_parts_in_process_order(tmp_path):
  """A part written while process 0 waits is picked up; the merge follows the indices."""
  run_dir = str(tmp_path / 'parts' / 'run')
  gather_lib.write_part(run_dir, 1, *_part(1))

  def sleep(seconds):   # process 2's part arrives during the first wait
    del seconds
    gather_lib.write_part(run_dir, 2, *_part(2))

  gather_lib.write_part(run_dir, 0, *_part(0))
  gather_lib.wait_for_parts(run_dir, 3, timeout_s=10.0, sleep=sleep)
  parts, maps = gather_lib.read_parts(run_dir, 3)
  assert not os.path.exists(os.path.dirname(run_dir))   # parts/ removed once read
  merged, merged_maps = gather_lib.merge_parts(parts, maps)
  assert merged['tokens'] == ['t0', 't1', 't2']
  assert merged['counts']['all'] == [[3, 3], [6, 9]]
  np.testing.assert_array_equal(merged_maps['pred'][:, 0, 0], [0, 1, 2])
