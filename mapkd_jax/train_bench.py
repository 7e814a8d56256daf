"""Training speed of each TCS stage: one JSON line per stage (steps/s, samples/s, memory).

  python -m mapkd_jax.train_bench --config configs/tcs.py:student,tiny
  python -m mapkd_jax.train_bench --config configs/tcs.py:student --stages student --batch_per_device 1

Times the real jitted `train_step` (frozen teacher/coach forwards included for coach and
student) on random variables and a random batch, sharded over all local devices exactly as
the trainer does; no data pipeline, so compare samples/s with `python -m mapkd_jax.data.bench`
to see whether training would be input-bound. `peak_rss_gb` is the process's peak resident
memory so far: run one stage per process to read a stage's own peak.
"""
import functools
import json
import resource
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mapkd_jax import bench
from mapkd_jax import sharding
from mapkd_jax import train_step as step_lib

STAGES = ('hd_pretrain', 'teacher', 'coach', 'student', 'student_nokd')


def stage_config(config, stage):
  """A copy of `config` for one stage (student_nokd = the baseline)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.stage, config.nokd = ('student', True) if stage == 'student_nokd' else (stage, False)
  return config


def bench_stage(config, *, batch_per_device, iters, warmup, seed=0):
  """Times `iters` train steps of `config.stage`; returns a JSON-ready record."""
  mesh = sharding.make_mesh()
  batch_size = batch_per_device * mesh.size
  models = step_lib.make_models(config)
  names = tuple(models)
  tgpd = step_lib.make_tgpd(config)
  tx = step_lib.make_optimizer(config)
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  host = bench.random_batch(config, batch_size, seed=seed)
  init_batch = {k: v[:1] for k, v in host.items()}
  init = functools.partial(step_lib.init_state, batch=init_batch, models=models, tgpd=tgpd,
                           tx=tx, config=config)
  state_sh = sharding.state_shardings(mesh, jax.eval_shape(init, jax.random.key(seed)))
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(seed))
  rngs = {k: jax.random.key(seed) for k in ('params', 'dropout', 'mask')}
  frozen = {name: jax.jit(lambda b, m=models[name]: m.init(rngs, b, train=False),
                          out_shardings=repl)(init_batch) for name in names[1:]}
  step = jax.jit(functools.partial(step_lib.train_step, models=models, tgpd=tgpd, tx=tx,
                                   config=config),
                 in_shardings=(state_sh, jax.tree.map(lambda _: repl, frozen), batch_sh, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))
  batch = sharding.host_batch_to_global(host, mesh)
  rng = jax.random.key(seed)
  start = time.perf_counter()
  step = step.lower(state, frozen, batch, rng).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = step(state, frozen, batch, rng)
  jax.block_until_ready(state)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  return {'stage': config.stage + ('_nokd' if config.nokd else ''), 'batch': batch_size,
          'devices': mesh.size, 'device_kind': jax.devices()[0].device_kind,
          'compile_s': round(compile_s, 2), 'step_s_median': round(median, 4),
          'steps_per_s': round(1 / median, 3), 'samples_per_s': round(batch_size / median, 2),
          'loss': float(metrics['loss/total']),
          'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def define_flags():
  """CLI flags; defined only when run as a program."""
  config_flags.DEFINE_config_file('config', None, 'Config giving the sizes, e.g. '
                                  'configs/tcs.py:student,tiny (its stage token is ignored).',
                                  lock_config=True)
  flags.DEFINE_list('stages', list(STAGES), f'Stages to time, from {list(STAGES)}.')
  flags.DEFINE_integer('batch_per_device', 1, 'Per-device batch of the timed steps.')
  flags.DEFINE_integer('iters', 5, 'Timed steps per stage (median over these).')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')


def main(argv):
  del argv
  f = flags.FLAGS
  for stage in f.stages:
    if stage not in STAGES:
      raise ValueError(f'--stages: unknown stage {stage!r}; known: {list(STAGES)}')
    record = bench_stage(stage_config(f.config, stage), batch_per_device=f.batch_per_device,
                         iters=f.iters, warmup=f.warmup)
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
