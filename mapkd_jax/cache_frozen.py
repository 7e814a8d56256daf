"""python -m mapkd_jax.cache_frozen --config configs/tcs.py:<stage> --workdir ROOT

Builds (or checks, and rebuilds when stale) the frozen teacher's and coach's output caches of a
distilling stage; training with --config.kd.cached_frozen=True then reads them. The cache itself
(layout, staleness, resume) is mapkd_jax/train/frozen_cache.py; the demo builds it by itself.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from mapkd_jax.train import frozen_cache

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The distilling stage, e.g. configs/tcs.py:student (its frozen models '
    'are cached); --config.<key>=<value> overrides as in launch.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The stage\'s --workdir (launch.py).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')   # tf.data only; the accelerator is JAX's
  for name, directory in frozen_cache.ensure(_CONFIG.value, _WORKDIR.value).items():
    print(f'{name}: {directory}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
