"""Test setup: 8 fake CPU devices, set before jax or tensorflow is imported.

`import tensorflow` imports jax too, so XLA_FLAGS must be set here, at collection time.
"""
import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run, shared by the xdist workers (same test run
# id) and the launch.py subprocesses they start: the suite compiles the same tiny train and eval
# steps in many tests, and a cache hit replaces a multi-second XLA compile by a file read. A new
# directory per run, so nothing is carried between runs; only compiles over a second are kept.
_RUN_ID = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'{os.getpid()}'
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'mapkd_jax_test_cache_{_RUN_ID}'))

# torch's PyPI wheel (the [torch] extra) brings triton, whose bundled LLVM segfaults when it is
# loaded into a process that already holds TensorFlow's (measured: `import tensorflow; import
# torchvision` crashes, the other order works); torchvision loads it through torch._dynamo.
# Loading it first (0.2 s) keeps every test process safe whichever module imports what first.
try:
  import triton  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:   # no [torch] extra, or a torch build without triton: nothing to protect
  pass

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope='session')
def tiny_shards(tmp_path_factory):
  """Shards of the tiny synthetic world (created once per test process), for configs' data.shards."""
  from configs import tcs
  from mapkd_jax import stages
  root = str(tmp_path_factory.mktemp('tiny_world'))
  return stages.ensure_data(tcs.get_config('student,tiny'), root)
