"""The main job end to end at `demo,tiny`: every run, both report files, numbers read back."""
import json
import os

import numpy as np
import pytest

from configs import tcs
from mapkd_jax import demo


def _metrics(root, *parts):
  with open(os.path.join(root, *parts, 'eval', 'metrics.json')) as f:
    return json.load(f)


def _checkpoint_steps(root):
  """{checkpoint dir: sorted step folders} of every run under root."""
  found = {}
  for dirpath, dirnames, _ in os.walk(root):
    if os.path.basename(dirpath) == 'checkpoints':
      found[dirpath] = sorted(d for d in dirnames if d.isdigit())
  return found


def test_demo_tiny_runs_the_chain_and_reports_what_was_evaluated(tmp_path):
  config = tcs.get_config('demo,tiny')
  root = str(tmp_path)
  summary = demo.run(config, root)

  for name in ('report.md', 'report.json', 'report.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  with open(os.path.join(root, 'report.json')) as f:
    report = json.load(f)
  rows = {row['model']: row for row in report['rows']}
  assert set(rows) == {'teacher', 'coach', 'student', 'student_nokd'}

  # Every number comes from the runs' own evaluation outputs (metrics.json).
  seeds = list(config.demo.seeds)
  for model in ('teacher', 'coach'):
    metrics = _metrics(root, model)
    assert rows[model]['miou'] == pytest.approx(metrics['miou'])
    assert rows[model]['iou_divider'] == pytest.approx(metrics['iou']['divider'])
  student = [_metrics(root, f'seed{s}', 'student')['miou'] for s in seeds]
  baseline = [_metrics(root, f'seed{s}', 'student_nokd')['miou'] for s in seeds]
  assert rows['student']['miou'] == pytest.approx(np.mean(student))
  assert rows['student_nokd']['miou'] == pytest.approx(np.mean(baseline))
  assert report['gain']['miou']['per_seed'] == pytest.approx(
      [s - b for s, b in zip(student, baseline)])
  ablations = {a['name']: a for a in report['ablations']}
  assert set(ablations) == set(config.demo.ablations)
  for name, row in ablations.items():
    assert row['miou'] == pytest.approx(_metrics(root, 'ablation', name, 'student')['miou'])

  text = open(os.path.join(root, 'report.md')).read()
  for label in ('| teacher |', '| coach |', '| student |', '| student_nokd |',
                *config.demo.ablations):
    assert label in text, label
  assert summary['gain'] == report['gain']

  # Rerun: every run is finished, so nothing trains again and the report keeps its numbers.
  steps_before = _checkpoint_steps(root)
  assert len(steps_before) == 3 + 2 * len(seeds) + len(config.demo.ablations)
  again = demo.run(config, root)
  assert _checkpoint_steps(root) == steps_before
  assert again['gain'] == summary['gain']


def test_read_metrics_turns_null_back_into_nan(tmp_path):
  from mapkd_jax import evaluate
  path = tmp_path / 'metrics.json'
  path.write_text(json.dumps(evaluate._json_safe(
      {'miou': 0.25, 'iou': {'divider': float('nan'), 'boundary': 0.5}, 'per': [float('nan')]})))
  metrics = evaluate.read_metrics(str(path))
  assert metrics['miou'] == 0.25 and metrics['iou']['boundary'] == 0.5
  assert np.isnan(metrics['iou']['divider']) and np.isnan(metrics['per'][0])
