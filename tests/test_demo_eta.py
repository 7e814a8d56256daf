"""The demo's ETA: per-stage step costs, scaled by how this machine compares (demo.eta_s)."""
import pytest

from configs import tcs
from mapkd_jax import demo


def _costs(config, root='/nonexistent/demo', *, done=()):
  runs = demo.plan(config, root)
  return runs, [demo.run_cost_s(run_config, config.demo, train=label not in done,
                                evaluate=evaluate and label not in done)
                for label, _, run_config, evaluate in runs]


def test_each_run_costs_its_steps_at_its_stages_rate_plus_evaluation():
  config = tcs.get_config('study')
  runs, costs = _costs(config)
  step_cost, steps, eval_s = config.demo.step_cost_s, config.demo.steps, config.demo.eval_cost_s
  by_label = dict(zip([label for label, *_ in runs], costs))
  assert by_label['hd_pretrain'] == pytest.approx(steps['hd_pretrain'] * step_cost['hd_pretrain'])
  assert by_label['teacher'] == pytest.approx(steps['teacher'] * step_cost['teacher'] + eval_s)
  assert by_label['student_nokd/seed3'] == pytest.approx(
      steps['student'] * step_cost['student_nokd'] + eval_s)
  # An ablation is a distilled student.
  assert by_label['ablation/no_coach/seed4'] == by_label['student/seed4']
  # The teacher's run costs several students' (the old ETA counted steps: 300 vs 250).
  assert by_label['teacher'] > 3 * by_label['student/seed0']


def test_eta_sums_what_is_left_and_scales_by_measured_over_estimated():
  config = tcs.get_config('demo')
  _, costs = _costs(config)
  final = config.demo.final_cost_s
  at_start = demo.eta_s(costs, 0, spent_s=0.0, spent_estimate_s=0.0, final_cost_s=final)
  assert at_start == pytest.approx(sum(costs) + final)
  # The demo's estimate at the start is within its 26 min target on the machine it was measured on.
  assert 15 * 60 < at_start < 26 * 60
  # After the first two runs took twice their estimate, the rest is expected to as well.
  later = demo.eta_s(costs, 2, spent_s=2 * (costs[0] + costs[1]),
                     spent_estimate_s=costs[0] + costs[1], final_cost_s=final)
  assert later == pytest.approx(2 * (sum(costs[2:]) + final))


def test_finished_runs_cost_nothing_and_a_missing_stage_cost_is_named():
  config = tcs.get_config('demo')
  _, costs = _costs(config, done={'hd_pretrain', 'teacher'})
  assert costs[0] == costs[1] == 0.0 and costs[2] > 0
  del config.demo.step_cost_s['coach']
  with pytest.raises(KeyError, match="step_cost_s has no 'coach'"):
    _costs(config)
