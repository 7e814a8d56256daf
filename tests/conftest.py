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
# id): the suite compiles the same tiny train and eval steps in many tests, and a cache hit
# replaces a multi-second XLA compile by a file read. A new directory per run, so nothing is
# carried between runs; only compiles over a second are kept. launch.py subprocesses do not use
# it: launch.py's --compilation_cache=auto sets their own WORKDIR/jax_cache (and a child pointed
# here was measured no faster: cross-process hits are issue 14's open warm-compile question).
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
  from mapkd_jax.train import stages
  root = str(tmp_path_factory.mktemp('tiny_world'))
  return stages.ensure_data(tcs.get_config('student,tiny'), root)


# Modules whose fixtures or tests cost minutes on 2 cores (a trained chain, subprocess runs,
# reference-size models), most expensive first. Under `-n 2 --dist loadscope` each module runs
# whole on one worker, and pyproject's --no-loadscope-reorder keeps this order: the longest
# modules start first and the many small ones fill in behind them on both workers. (xdist's
# default reorder, most tests first, put these few-test modules last, where the longest of them
# set the end of the run while the other worker sat idle.)
_EXPENSIVE_MODULES_FIRST = (
    'test_demo.py',                    # the demo,tiny chain: every stage, both seeds, the report
    'test_parity_reference_size.py',   # reference-size torch and JAX models
    'test_trainer.py',                 # kill -9 / damaged-checkpoint resume (a subprocess)
    'test_multihost.py',               # two launch.py processes + the one-process reference
    'test_parity_student.py',
    'test_parity_teacher.py',
    'test_parity_coach.py',
    'test_ema.py',
    'test_cache_frozen.py',
    'test_multihost_eval.py',
    'test_evaluate.py',
    'test_export.py',
)


def pytest_collection_modifyitems(config, items):
  """Runs the modules of _EXPENSIVE_MODULES_FIRST first, in that order; the rest keep theirs."""
  del config
  rank = {name: i for i, name in enumerate(_EXPENSIVE_MODULES_FIRST)}
  order = {id(item): (rank.get(item.path.name, len(rank)), index)
           for index, item in enumerate(items)}
  items.sort(key=lambda item: order[id(item)])
