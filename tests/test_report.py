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


def _fake_results(tmp_path, config, students=None):
  """students: optional {seed: ((student miou, map), (baseline miou, map))}."""
  results = {}
  values = {'teacher': (0.7, 0.5), 'coach': (0.6, 0.4), 'student/seed0': (0.5, 0.3),
            'student/seed1': (0.52, 0.33), 'student_nokd/seed0': (0.45, 0.31),
            'student_nokd/seed1': (0.49, 0.29),
            'ablation/no_tgpd/seed0': (0.48, 0.3), 'ablation/no_tgpd/seed1': (0.47, 0.34),
            'ablation/no_msrd/seed0': (0.47, 0.3), 'ablation/no_msrd/seed1': (0.5, 0.3),
            'ablation/no_coach/seed0': (0.5, 0.3), 'ablation/no_coach/seed1': (0.52, 0.3)}
  if students is not None:
    values = {k: v for k, v in values.items() if not k.startswith('student')}
    for seed, (student, baseline) in students.items():
      values[f'student/seed{seed}'], values[f'student_nokd/seed{seed}'] = student, baseline
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


def _two_seed_study():
  config = tcs.get_config('study')
  config.demo.seeds = (0, 1)
  return config


def test_gain_over_seeds_and_checks(tmp_path):
  config = _two_seed_study()
  results = _fake_results(tmp_path, config)
  summary = report.build(config, results, _speed(1.0, 2.0, 4.0))
  np.testing.assert_allclose(summary['gain']['miou']['per_seed'], [0.05, 0.03], atol=1e-12)
  np.testing.assert_allclose(summary['gain']['miou']['mean'], 0.04)
  np.testing.assert_allclose(summary['gain']['miou']['std'], np.std([0.05, 0.03], ddof=1))
  np.testing.assert_allclose(summary['gain']['map']['per_seed'], [-0.01, 0.04], atol=1e-12)
  # Two seeds: se = 0.01, t(0.975, 1) = 12.706 -> CI 0.04 +/- 0.127 includes 0.
  np.testing.assert_allclose(summary['gain']['miou']['se'], 0.01, rtol=1e-9)
  np.testing.assert_allclose(summary['gain']['miou']['t'], 12.706, atol=1e-3)
  np.testing.assert_allclose(summary['gain']['miou']['ci'], [-0.08706, 0.16706], atol=1e-5)
  assert summary['gain']['miou']['verdict'] == report.NOT_RESOLVED
  assert summary['gain']['miou']['seeds'] == [0, 1]
  student = next(r for r in summary['rows'] if r['model'] == 'student')
  np.testing.assert_allclose(student['miou'], 0.51)
  # Both seeds gain mIoU, but not above seed noise: the check says no.
  assert summary['checks'] == {
      'teacher_best': True, 'coach_between_teacher_and_student': True,
      'student_above_baseline_miou': False, 'student_above_baseline_map': False,
      'student_3x_teacher_fps': True, 'student_1.5x_coach_fps': True}
  slow = report.build(config, results, _speed(1.0, 2.0, 2.5))
  assert not slow['checks']['student_3x_teacher_fps']
  assert not slow['checks']['student_1.5x_coach_fps']


def test_report_files(tmp_path):
  config = _two_seed_study()
  results = _fake_results(tmp_path, config)
  summary = report.build(config, results, _speed(1.0, 2.0, 4.0))
  report.write(str(tmp_path), summary, results, config)
  text = open(os.path.join(tmp_path, 'report.md')).read()
  assert '| student_nokd | C |' in text and 'no_tgpd' in text
  assert 'Adam lr 0.002 (step schedule over each run)' in text
  with open(os.path.join(tmp_path, 'report.json')) as f:
    written = json.load(f)
  assert written['gain']['miou']['per_seed'][0] > 0
  assert written['gain'] == summary['gain']      # what test_demo compares after a rerun
  # no_tgpd: seed 0 0.48 - 0.50, seed 1 0.47 - 0.52 -> -0.02, -0.05 vs the student; against the
  # baselines (0.45, 0.49): +0.03, -0.02. t(0.975, 1) = 12.706.
  no_tgpd = written['ablations'][0]
  assert no_tgpd['name'] == 'no_tgpd' and no_tgpd['seeds'] == [0, 1]
  np.testing.assert_allclose(no_tgpd['miou'], 0.475)
  np.testing.assert_allclose(no_tgpd['vs_student_miou']['per_seed'], [-0.02, -0.05], atol=1e-12)
  np.testing.assert_allclose(no_tgpd['vs_nokd_miou']['per_seed'], [0.03, -0.02], atol=1e-12)
  np.testing.assert_allclose(no_tgpd['vs_student_map']['per_seed'], [0.0, 0.01], atol=1e-12)
  np.testing.assert_allclose(no_tgpd['vs_student_miou']['ci'],
                             [-0.035 - 12.706 * 0.015, -0.035 + 12.706 * 0.015], atol=1e-4)
  assert no_tgpd['vs_student_miou']['verdict'] == report.NOT_RESOLVED
  assert '| mIoU | +5.00, +3.00 | 2 | +4.00 | 1.41 | 1.00 | 12.706 | [-8.71, +16.71] | ' \
         'not resolved (CI includes 0) |' in text
  assert '- mIoU gain: not resolved (CI includes 0).' in text
  assert '- mAP gain: not resolved (CI includes 0).' in text
  assert '# MapKD study report' in text
  assert '## Ablations (paired per seed)' in text
  assert ('| no_tgpd | 47.50 | 32.00 | -3.50 [-22.56, +15.56] | not resolved (CI includes 0) | '
          '+0.50 [-31.27, +32.27] | not resolved (CI includes 0) |' in text)
  assert '- student_above_baseline_miou: NO: not resolved (CI includes 0)' in text
  assert os.path.getsize(os.path.join(tmp_path, 'report.png')) > 1000


def test_demo_plan_order_and_resume_keys(tmp_path):
  config = tcs.get_config('demo')
  labels = [label for label, *_ in demo.plan(config, str(tmp_path))]
  # The 30-minute demo: three paired seeds, no ablations.
  assert labels == ['hd_pretrain', 'teacher', 'coach', 'student/seed0', 'student_nokd/seed0',
                    'student/seed1', 'student_nokd/seed1', 'student/seed2', 'student_nokd/seed2']
  config = _two_seed_study()
  runs = demo.plan(config, str(tmp_path))
  labels = [label for label, *_ in runs]
  assert labels[:3] == ['hd_pretrain', 'teacher', 'coach']
  # Seed by seed, so a study stopped half-way holds whole pairs.
  assert labels[3:8] == ['student/seed0', 'student_nokd/seed0', 'ablation/no_tgpd/seed0',
                         'ablation/no_msrd/seed0', 'ablation/no_coach/seed0']
  assert labels[8:] == ['student/seed1', 'student_nokd/seed1', 'ablation/no_tgpd/seed1',
                        'ablation/no_msrd/seed1', 'ablation/no_coach/seed1']
  by_label = {label: cfg for label, _, cfg, _ in runs}
  roots = {label: root for label, root, _, _ in runs}
  assert roots['ablation/no_msrd/seed1'] == os.path.join(str(tmp_path), 'seed1', 'ablation',
                                                         'no_msrd')
  assert by_label['ablation/no_tgpd/seed1'].seed == 1
  assert by_label['ablation/no_tgpd/seed0'].kd.tgpd_teacher_weight == 0.0
  assert by_label['ablation/no_tgpd/seed0'].kd.msrd_teacher_weight > 0.0
  assert by_label['student_nokd/seed1'].nokd and by_label['student_nokd/seed1'].seed == 1
  assert by_label['teacher'].train.steps == config.demo.steps['teacher']
  assert by_label['student/seed1'].frozen.teacher == os.path.join(str(tmp_path), 'teacher',
                                                                  'checkpoints')


def test_optional_ablation_drops_only_the_tgpd_feature_term(tmp_path):
  config = tcs.get_config('demo')
  config.demo.ablations = ('no_tgpd_feature',)
  (label, _, run, _), *_ = [r for r in demo.plan(config, str(tmp_path)) if r[0].startswith('abl')]
  assert label == 'ablation/no_tgpd_feature/seed0'
  assert run.kd.tgpd_feature_weight == 0.0
  assert run.kd.tgpd_attention_weight == config.kd.tgpd_attention_weight > 0.0
  assert run.kd.tgpd_teacher_weight == config.kd.tgpd_teacher_weight > 0.0


def test_unquoted_ablation_tuple_names_the_flag_and_the_fix(tmp_path):
  config = tcs.get_config('demo')
  # What config_flags makes of "--config.demo.ablations=(no_tgpd,no_coach)": one name.
  config.demo.ablations = ('(no_tgpd,no_coach)',)
  with pytest.raises(ValueError, match=r"unknown '\(no_tgpd,no_coach\)'.*quote each name"):
    demo.plan(config, str(tmp_path))


# Two-sided 95% Student-t quantiles t(0.975, df) from a printed table (3 decimals).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}


def test_seed_statistics_by_hand():
  g = report.summarize_seeds([1.0, 2.0, 3.0])
  assert g['n'] == 3 and g['mean'] == 2.0 and g['std'] == 1.0
  np.testing.assert_allclose(g['se'], 0.57735, atol=1e-5)
  np.testing.assert_allclose(g['t'], 4.303, atol=1e-3)
  np.testing.assert_allclose(g['ci'], [-0.484, 4.484], atol=1e-3)
  assert not g['resolved'] and g['verdict'] == 'not resolved (CI includes 0)'
  # 90%: t(0.95, 2) = 2.920 -> 2 +/- 1.686, still includes 0.
  np.testing.assert_allclose(report.summarize_seeds([1.0, 2.0, 3.0], 0.90)['t'], 2.920,
                             atol=1e-3)


def test_t_quantile_uses_n_minus_1_degrees_of_freedom():
  for df, t in T_975.items():
    values = np.arange(df + 1, dtype=np.float64)   # n = df + 1 seeds
    np.testing.assert_allclose(report.summarize_seeds(values)['t'], t, atol=1e-3, err_msg=df)


def test_seed_statistics_against_a_loop():
  values = [0.013, -0.021, 0.034, 0.008, 0.019]
  n = len(values)
  mean = sum(values) / n
  sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
  g = report.summarize_seeds(values)
  np.testing.assert_allclose([g['mean'], g['std'], g['se']], [mean, sd, sd / n ** 0.5],
                             rtol=1e-12)
  np.testing.assert_allclose(g['ci'], [mean - 2.776 * sd / n ** 0.5,
                                       mean + 2.776 * sd / n ** 0.5], atol=1e-4)


def test_resolved_only_when_the_interval_excludes_zero():
  # mean 1.05, sd 0.1291, se 0.06455, t(0.975, 3) = 3.182 -> CI [0.845, 1.255].
  up = report.summarize_seeds([1.0, 1.2, 0.9, 1.1])
  np.testing.assert_allclose(up['ci'], [0.8446, 1.2554], atol=1e-4)
  assert up['resolved'] and up['verdict'] == 'resolved above seed noise (gain > 0)'
  down = report.summarize_seeds([-1.0, -1.2, -0.9, -1.1])
  assert down['resolved'] and down['verdict'] == 'resolved above seed noise (gain < 0)'
  # Same mean, wider spread: not resolved.
  wide = report.summarize_seeds([1.05 - 1.0, 1.05 + 1.0])
  assert not wide['resolved'] and wide['verdict'] == report.NOT_RESOLVED


def test_one_seed_and_bad_input():
  g = report.summarize_seeds([0.5])
  assert g['verdict'] == 'one seed: no interval, no conclusion'
  assert g['ci'] is None and g['std'] is None and g['t'] is None and not g['resolved']
  assert report.summarize_seeds([0.1, float('nan')])['verdict'] == report.NOT_FINITE
  with pytest.raises(ValueError, match='one value per seed'):
    report.summarize_seeds([])
  with pytest.raises(ValueError, match='config.demo.confidence'):
    report.summarize_seeds([1.0, 2.0], confidence=95)


def test_checks_follow_the_interval(tmp_path):
  config = tcs.get_config('demo')
  speed = _speed(1.0, 2.0, 4.0)
  # Three seeds where the student loses by ~3 points every time: resolved, negative.
  config.demo.seeds = (0, 1, 2)
  losing = {s: ((0.40 + d, 0.30), (0.43 + 1.2 * d, 0.30 - d))
            for s, d in enumerate((0.0, 0.01, -0.002))}
  summary = report.build(config, _fake_results(tmp_path / 'lose', config, losing), speed)
  assert summary['gain']['miou']['verdict'] == 'resolved above seed noise (gain < 0)'
  assert not summary['checks']['student_above_baseline_miou']
  assert summary['gain']['map']['verdict'] == report.NOT_RESOLVED
  # Three seeds that all gain ~5 points: resolved, positive, and the check says yes.
  winning = {s: ((0.50 + d, 0.3), (0.45 + 1.1 * d, 0.3)) for s, d in enumerate((0.0, 0.01, 0.02))}
  summary = report.build(config, _fake_results(tmp_path / 'win', config, winning), speed)
  assert summary['gain']['miou']['resolved'] and summary['checks']['student_above_baseline_miou']
  # One seed: no interval, no check passes, the report says so.
  config.demo.seeds = (0,)
  one = {0: ((0.6, 0.4), (0.4, 0.2))}
  summary = report.build(config, _fake_results(tmp_path / 'one', config, one), speed)
  assert summary['gain']['miou']['verdict'] == report.ONE_SEED
  assert not summary['checks']['student_above_baseline_miou']
  assert '- mIoU gain: one seed: no interval, no conclusion.' in report.markdown(summary)


def _lines(h, w, rows=(), cols=(), crossing=None):
  """A [h, w] class map with horizontal dividers on `rows`, vertical boundaries on `cols`."""
  gt = np.zeros((h, w), np.uint8)
  for r in rows:
    gt[r] = 1
  for c in cols:
    gt[:, c] = 3
  if crossing is not None:
    gt[crossing] = 2
  return gt


def test_pictures_show_crossings_and_junctions_not_the_first_straight_roads():
  straight = _lines(20, 40, rows=(5, 14))
  junction = _lines(20, 40, rows=(5, 14), cols=(20, 30))          # a cross street: 20 rows
  zebra = _lines(20, 40, rows=(5, 14), crossing=np.s_[6:13, 30:33])
  gt = np.stack([straight] * 12 + [junction] + [straight] * 12 + [zebra] + [straight] * 5)
  classes = ('divider', 'ped_crossing', 'boundary')
  assert report.choose_samples(gt, 2, classes, min_gap=5) == [25, 12]
  # A third pick alternates back to crossings: none left, so the first sample far enough from
  # both (ties keep split order).
  assert report.choose_samples(gt, 3, classes, min_gap=5) == [25, 12, 0]
  # Too few samples for the gap: still distinct indices.
  picks = report.choose_samples(gt[:3], 3, classes, min_gap=10)
  assert sorted(picks) == [0, 1, 2]
