"""Shard builder CLI killed with SIGKILL mid-build, then rerun: finished shards are kept as they are
and the result equals an uninterrupted build (data_prep/build_shards.py)."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import build_shards
from data_prep import synthetic_world

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = 'v1.0-synthetic'
NUM_SHARDS = 3   # per split; 2 scenes x 6 samples -> train and val, 3 shards of 2 samples each
TIMEOUT_S = 120


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('resume') / 'world')
  return synthetic_world.generate_world(
      root, scenes=2, samples_per_scene=6, seed=1, workers=1, image_size=(36, 64), ground_res=0.2,
      ground_margin=30.0, lidar=dict(beams=16, azimuth_steps=200, max_range=50.0))


def _command(world, out):
  return [sys.executable, '-m', 'data_prep.build_shards', '--dataroot', world, '--version', VERSION,
          '--out', out, '--bev', '60x30', '--image-size', '32x88', '--num-shards', str(NUM_SHARDS),
          '--workers', '1']


def _run(world, out):
  subprocess.run(_command(world, out), cwd=REPO_ROOT, check=True, timeout=TIMEOUT_S,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finished_records(out):
  return sorted(glob.glob(os.path.join(out, build_shards.PROGRESS_DIR, '*.tfrecord.json')))


def _kill_after_first_shard(world, out):
  """Starts the CLI, SIGKILLs it once a shard's progress record exists; returns those shards."""
  process = subprocess.Popen(_command(world, out), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while not _finished_records(out):
      if process.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f'build exited ({process.returncode}) or timed out before any shard finished')
      time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  return [os.path.basename(p)[:-len('.json')] for p in _finished_records(out)]


def test_rerun_after_sigkill_keeps_finished_shards_and_matches_clean_build(world, tmp_path):
  clean, killed = str(tmp_path / 'clean'), str(tmp_path / 'killed')
  _run(world, clean)
  clean_files = sorted(f for f in os.listdir(clean) if f.endswith('.tfrecord'))
  assert len(clean_files) == 2 * NUM_SHARDS

  done = _kill_after_first_shard(world, killed)
  assert not os.path.exists(os.path.join(killed, build_shards.INFO_FILENAME)), (
      'the build finished before the kill; the test did not interrupt it')
  assert 1 <= len(done) < len(clean_files)
  before = {f: os.stat(os.path.join(killed, f)) for f in done}

  _run(world, killed)
  for f, stat in before.items():
    after = os.stat(os.path.join(killed, f))
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), f
  assert sorted(f for f in os.listdir(killed) if f.endswith('.tfrecord')) == clean_files
  assert not [f for f in os.listdir(killed) if f.endswith('.tmp')]
  for f in clean_files + [build_shards.INFO_FILENAME]:
    with open(os.path.join(clean, f), 'rb') as a, open(os.path.join(killed, f), 'rb') as b:
      assert a.read() == b.read(), f
