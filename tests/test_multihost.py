"""Two jax.distributed processes on localhost CPU (4 devices each) == one process (8 devices).

Each process reads its own half of the shard files; the one-process reference therefore reads
the same two halves and concatenates them into its global batch, exactly as the mesh does.
One plain-SGD step (lr 1, no clipping) makes the checkpointed parameters the initial ones minus
the gradient, so the two runs' gradients are compared at float32 precision
(layout_equivalence), not Adam-amplified parameter noise. Their forward agrees to one ulp; their
gradients differ by a few ReLU inputs that rounding puts on the other side of zero (2.3e-3 of the
gradient's norm in the first camera conv kernel, measured; layout_equivalence says how).
"""
import os
import shutil

import jax
import numpy as np

import layout_equivalence
import stage_checkpoints
import two_processes

from configs import tcs
from mapkd_jax.data import pipeline
from mapkd_jax.train import checkpoint
from mapkd_jax.train import sharding
from mapkd_jax.train import step as step_lib
from mapkd_jax.train import trainer

STEPS = 1
SGD_FLAGS = ('--config.optim.name=sgd', '--config.optim.learning_rate=1.0',
             '--config.optim.grad_clip=1e9')


class _TwoHostBatches:
  """The global batch a 2-process run sees: host 0's rows, then host 1's."""

  def __init__(self, iterators):
    self._iterators = iterators

  @property
  def position(self):
    return self._iterators[0].position

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_two_processes_match_one(tiny_shards, tmp_path, monkeypatch):
  arg = 'student,nokd,tiny'
  multi = str(tmp_path / 'two_processes')
  argv = lambda i, port: [  # noqa: E731
      'launch.py', f'--config=configs/tcs.py:{arg}', f'--workdir={multi}',
      f'--config.data.shards={tiny_shards}', f'--config.train.steps={STEPS}',
      f'--config.train.checkpoint_every={STEPS}', f'--config.train.eval_every={STEPS}',
      '--config.train.log_every=1', *SGD_FLAGS, '--num_processes=2', f'--process_id={i}',
      f'--coordinator_address=localhost:{port}',
      f'--heartbeat_timeout_s={two_processes.HEARTBEAT_TIMEOUT_S}']
  two_processes.run(argv, timeout_s=900,
                    before_retry=lambda: shutil.rmtree(multi, ignore_errors=True))

  original_iterate = pipeline.iterate

  def two_host_iterate(shards_dir, split, data_config, *, batch_size, **kwargs):
    if split != 'train':
      return original_iterate(shards_dir, split, data_config, batch_size=batch_size, **kwargs)
    return _TwoHostBatches([original_iterate(shards_dir, split, data_config,
                                             batch_size=batch_size // 2, process_index=i,
                                             process_count=2, **kwargs) for i in range(2)])

  monkeypatch.setattr(pipeline, 'iterate', two_host_iterate)
  config = tcs.get_config(arg)
  config.data.shards = tiny_shards
  config.train.update(steps=STEPS, checkpoint_every=STEPS, eval_every=STEPS, log_every=1)
  config.optim.update(name='sgd', learning_rate=1.0, grad_clip=1e9)
  single = str(tmp_path / 'one_process')
  trainer.train_and_evaluate(config, single)

  step_single, params_single = stage_checkpoints.params_item(os.path.join(single, 'student_nokd'))
  # The 2-process checkpoint names devices of another topology: restore into this one's.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          params_single)
  step_multi, params_multi = checkpoint.restore_params(
      os.path.join(multi, 'student_nokd', 'checkpoints'), abstract)
  params_multi = jax.tree.map(np.asarray, params_multi)
  assert step_multi == step_single == STEPS
  loss_multi = stage_checkpoints.logged(os.path.join(multi, 'student_nokd'), 'loss/total')
  loss_single = stage_checkpoints.logged(os.path.join(single, 'student_nokd'), 'loss/total')
  assert sorted(loss_multi) == sorted(loss_single) == [1]
  np.testing.assert_allclose(loss_multi[1], loss_single[1], rtol=layout_equivalence.LOSS_RTOL)

  # Both runs started from the state every run of this config starts from.
  state0, _, _, _ = trainer.initial_state(config, step_lib.make_models(config),
                                          step_lib.make_tgpd(config),
                                          step_lib.make_optimizer(config), sharding.make_mesh())
  start = jax.tree.map(np.asarray, {'params': state0.params['model'],
                                    'batch_stats': state0.batch_stats})
  change = lambda after: jax.tree.map(lambda a, b: a - b, start, after)  # noqa: E731
  layout_equivalence.assert_same_gradients(change(params_multi), change(params_single))

