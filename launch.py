"""Trains one stage of a MapKD Teacher-Coach-Student experiment (or the whole chain).

  python launch.py --config configs/tcs.py:teacher --workdir runs/tcs
  python launch.py --config configs/tcs.py:student,tiny --workdir runs/tiny --config.train.steps=50
  python launch.py --config configs/tcs.py:demo --workdir runs/demo     # the whole chain + report
  python launch.py --config configs/tcs.py:study --workdir runs/study   # + ablations, 5 paired seeds

Each stage writes WORKDIR/<stage>/ (checkpoints/, best/, TensorBoard events, config.json) and
reads the earlier stages it depends on from the same WORKDIR. Rerunning a command resumes it.
"""
import logging as std_logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and arg, e.g. configs/tcs.py:student,tiny; override any '
    'value with --config.<key>=<value> (e.g. --config.train.steps=100).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Root directory of one TCS experiment: data/, and one subdirectory per '
    'stage (hd_pretrain, teacher, coach, student, student_nokd).')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() with the cluster auto-detected '
    '(TPU pod slice, SLURM, ...). Implied by --num_processes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for an explicit multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes of an explicit run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index in an explicit run.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_s', 100, 'Multi-process runs: seconds without a heartbeat after which '
    "jax.distributed's coordinator declares a process dead and aborts every process (JAX's "
    'default is 100). Raise it where a process can stall: oversubscribed CPUs, swapping hosts.')
_COMPILE_CACHE = flags.DEFINE_string(
    'compilation_cache', 'auto', "Persistent XLA compilation cache directory: 'auto' = "
    "WORKDIR/jax_cache (reruns, resumes and the demo's repeated runs skip recompiling), '' = off.")
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record):
  """Orbax logs every file rename at INFO; keep its warnings, drop the chatter."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax  # after flags: XLA_FLAGS and the like may be set by the caller
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # tf.data only; the accelerators belong to JAX
  if _NUM_PROCESSES.value is not None or _MULTIHOST.value:
    # CPU-only processes need a collectives backend to form one mesh (no-op on GPU/TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if _NUM_PROCESSES.value is not None:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  cache = _COMPILE_CACHE.value
  if cache:
    cache = os.path.join(_WORKDIR.value, 'jax_cache') if cache == 'auto' else cache
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  config = _CONFIG.value
  logging.info('Stage %s, workdir %s', config.stage, _WORKDIR.value)
  if config.stage in ('demo', 'study'):
    from mapkd_jax import demo
    demo.run(config, _WORKDIR.value)
  else:
    from mapkd_jax.train import trainer
    trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
