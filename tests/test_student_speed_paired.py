"""bench.paired_ratio and the per-round JAX / torch ratio on bench.run's ratio line."""
import json
import time

import ml_collections
import numpy as np
import pytest

from mapkd_jax import bench


def test_paired_ratio_matches_a_loop():
  rng = np.random.default_rng(0)
  num, den = rng.uniform(0.5, 2.0, 7), rng.uniform(0.5, 2.0, 7)
  per_round = []
  for a, b in zip(num, den):
    per_round.append(a / b)
  per_round.sort()
  got = bench.paired_ratio(num, den)
  assert got == {'median': round(per_round[3], 3), 'min': round(per_round[0], 3),
                 'max': round(per_round[-1], 3)}
  # Not the ratio of the medians: a slow round of one side is paired with its partner.
  assert bench.paired_ratio([1.0, 1.0, 10.0], [1.0, 10.0, 10.0])['median'] == 1.0


@pytest.mark.parametrize('num, den, match', [
    ([1.0, 2.0], [1.0], 'equally long'), ([], [], 'equally long'),
    ([1.0], [0.0], 'non-positive')])
def test_paired_ratio_rejects_bad_timings(num, den, match):
  with pytest.raises(ValueError, match=match):
    bench.paired_ratio(num, den)


def test_run_reports_the_per_round_ratio(monkeypatch):
  """run() with torch_student: fake JAX and torch calls of known speed, alternating."""
  pytest.importorskip('torch')
  config = ml_collections.ConfigDict({'model': {'camera': {
      'image_encoder': 'efficientnet_b0', 'view_transform': 'hdmapnet'}}})

  def sleeper(seconds):
    def fn(*args):
      del args
      time.sleep(seconds)
      return np.zeros(())
    return fn

  monkeypatch.setattr(bench, 'prepare_model', lambda name, config, **kw: (
      sleeper(0.01), (), {'name': name, 'params': 1, 'flops': 1.0, 'compile_s': 0.0}))
  monkeypatch.setattr(bench, '_torch_student_forward', lambda *a, **kw: sleeper(0.03))
  lines = []
  records, ratios = bench.run(config, ['student'], batch_size=1, iters=3, warmup=1, seed=0,
                              emit=lines.append, torch_student=True)
  torch_record = [r for r in records if r['name'] == 'torch_student'][0]
  per_round = torch_record['other_over_torch_fps_per_round']
  for stat in ('median', 'min', 'max'):
    assert ratios[f'student_over_torch_student_fps_per_round_{stat}'] == per_round[stat]
    assert json.loads(lines[-1])[f'student_over_torch_student_fps_per_round_{stat}'] == (
        per_round[stat])
  assert 1.5 < per_round['min'] <= per_round['median'] <= per_round['max'] < 4.5   # ~3
