"""The demo report: seed statistics, gain, ordering checks and the picture grid, on fake results."""
import json
import os

import numpy as np
import pytest

from configs import tcs
from mapkd_jax import demo
from mapkd_jax import report


def _metrics(miou, map_):
  return {'iou': {'divider': miou, 'ped_crossing': miou, 'boundary': miou}, 'miou': miou,
          'map': map_, 'iou_by_range': {'0-15m': {'miou': miou + 0.1},
                                        '15-30m': {'miou': miou - 0.1}}}


def _fake_results(tmp_path, config):
  results = {}
  values = {'teacher': (0.7, 0.5), 'coach': (0.6, 0.4), 'student/seed0': (0.5, 0.3),
            'student/seed1': (0.52, 0.33), 'student_nokd/seed0': (0.45, 0.31),
            'student_nokd/seed1': (0.49, 0.29), 'ablation/no_tgpd': (0.48, 0.3),
            'ablation/no_msrd': (0.47, 0.3), 'ablation/no_coach': (0.5, 0.3)}
  rng = np.random.default_rng(0)
  for label, (miou, map_) in values.items():
    stage_dir = os.path.join(tmp_path, label.replace('/', '_'))
    os.makedirs(os.path.join(stage_dir, 'eval'))
    np.savez(os.path.join(stage_dir, 'eval', 'semantic.npz'), tokens=np.array(['b', 'a', 'c']),
             pred=rng.integers(0, 4, (3, 50, 100)).astype(np.uint8),
             gt=rng.integers(0, 4, (3, 50, 100)).astype(np.uint8))
    results[label] = {'metrics': _metrics(miou, map_), 'root': str(tmp_path),
                      'stage_dir': label.replace('/', '_'), 'seed': 0}
  return results


def _speed(teacher, coach, student):
  records = {n: {'name': n, 'params': p, 'frames_per_s': f}
             for n, p, f in (('teacher', 10, teacher), ('coach', 8, coach), ('student', 2, student))}
  return {'records': records, 'ratios': {'student_over_teacher_fps': student / teacher},
          'device_kind': 'cpu'}


def test_gain_over_seeds_and_checks(tmp_path):
  config = tcs.get_config('demo')
  results = _fake_results(tmp_path, config)
  summary = report.build(config, results, _speed(1.0, 2.0, 4.0))
  np.testing.assert_allclose(summary['gain']['miou']['per_seed'], [0.05, 0.03], atol=1e-12)
  np.testing.assert_allclose(summary['gain']['miou']['mean'], 0.04)
  np.testing.assert_allclose(summary['gain']['miou']['std'], np.std([0.05, 0.03], ddof=1))
  np.testing.assert_allclose(summary['gain']['map']['per_seed'], [-0.01, 0.04], atol=1e-12)
  student = next(r for r in summary['rows'] if r['model'] == 'student')
  np.testing.assert_allclose(student['miou'], 0.51)
  assert summary['checks'] == {
      'teacher_best': True, 'coach_between_teacher_and_student': True,
      'student_above_baseline_miou': True, 'student_above_baseline_map': True,
      'student_3x_teacher_fps': True, 'student_1.5x_coach_fps': True}
  slow = report.build(config, results, _speed(1.0, 2.0, 2.5))
  assert not slow['checks']['student_3x_teacher_fps']
  assert not slow['checks']['student_1.5x_coach_fps']


def test_report_files(tmp_path):
  config = tcs.get_config('demo')
  results = _fake_results(tmp_path, config)
  summary = report.build(config, results, _speed(1.0, 2.0, 4.0))
  report.write(str(tmp_path), summary, results, config)
  text = open(os.path.join(tmp_path, 'report.md')).read()
  assert '| student_nokd | C |' in text and 'no_tgpd' in text
  assert 'Adam lr 0.002 (step schedule over each run)' in text
  with open(os.path.join(tmp_path, 'report.json')) as f:
    assert json.load(f)['gain']['miou']['per_seed'][0] > 0
  assert os.path.getsize(os.path.join(tmp_path, 'report.png')) > 1000


def test_demo_plan_order_and_resume_keys(tmp_path):
  config = tcs.get_config('demo')
  runs = demo.plan(config, str(tmp_path))
  labels = [label for label, *_ in runs]
  assert labels[:3] == ['hd_pretrain', 'teacher', 'coach']
  assert labels[3:7] == ['student/seed0', 'student_nokd/seed0', 'student/seed1',
                         'student_nokd/seed1']
  assert labels[7:] == ['ablation/no_tgpd', 'ablation/no_msrd', 'ablation/no_coach']
  by_label = {label: cfg for label, _, cfg, _ in runs}
  assert by_label['ablation/no_tgpd'].kd.tgpd_teacher_weight == 0.0
  assert by_label['ablation/no_tgpd'].kd.msrd_teacher_weight > 0.0
  assert by_label['student_nokd/seed1'].nokd and by_label['student_nokd/seed1'].seed == 1
  assert by_label['teacher'].train.steps == config.demo.steps['teacher']
  assert by_label['student/seed1'].frozen.teacher == os.path.join(str(tmp_path), 'teacher',
                                                                  'checkpoints')


def test_optional_ablation_drops_only_the_tgpd_feature_term(tmp_path):
  config = tcs.get_config('demo')
  config.demo.ablations = ('no_tgpd_feature',)
  (label, _, run, _), = [r for r in demo.plan(config, str(tmp_path)) if r[0].startswith('abl')]
  assert label == 'ablation/no_tgpd_feature'
  assert run.kd.tgpd_feature_weight == 0.0
  assert run.kd.tgpd_attention_weight == config.kd.tgpd_attention_weight > 0.0
  assert run.kd.tgpd_teacher_weight == config.kd.tgpd_teacher_weight > 0.0


def test_unquoted_ablation_tuple_names_the_flag_and_the_fix(tmp_path):
  config = tcs.get_config('demo')
  # What config_flags makes of "--config.demo.ablations=(no_tgpd,no_coach)": one name.
  config.demo.ablations = ('(no_tgpd,no_coach)',)
  with pytest.raises(ValueError, match=r"unknown '\(no_tgpd,no_coach\)'.*quote each name"):
    demo.plan(config, str(tmp_path))
