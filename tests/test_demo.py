"""The main job end to end at `demo,tiny`: every run, both report files, numbers read back, and
the TCS chain it trained (every stage's checkpoint, the frozen inputs left untouched).

One demo run serves every test here (module fixture; the module runs on one xdist worker,
pyproject's --dist loadscope): it trains each stage of the chain once, which is the costliest
thing the suite does.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import stage_checkpoints
from configs import tcs
from mapkd_jax import demo
from mapkd_jax.train import checkpoint as ckpt_lib


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory, tiny_shards):
  config = tcs.get_config('demo,tiny')
  # demo,tiny's data section is the tiny one: the session's tiny shards serve (no second world).
  assert config.data.to_dict() == {**tcs.get_config('student,tiny').data.to_dict(), 'shards': ''}
  config.data.shards = tiny_shards
  root = str(tmp_path_factory.mktemp('demo'))
  return config, root, demo.run(config, root)


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


def test_demo_tiny_runs_the_chain_and_reports_what_was_evaluated(demo_run):
  config, root, summary = demo_run

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
    per_seed = [_metrics(root, f'seed{s}', 'ablation', name, 'student')['miou'] for s in seeds]
    assert row['miou'] == pytest.approx(np.mean(per_seed))
    assert row['vs_student_miou']['per_seed'] == pytest.approx(
        [a - s for a, s in zip(per_seed, student)])
  assert len(report['pictures']) == config.demo.grid_samples

  text = open(os.path.join(root, 'report.md')).read()
  for label in ('| teacher |', '| coach |', '| student |', '| student_nokd |',
                *config.demo.ablations):
    assert label in text, label
  assert summary['gain'] == report['gain']

  # Rerun: every run is finished, so nothing trains again and the report keeps its numbers.
  steps_before = _checkpoint_steps(root)
  assert len(steps_before) == 3 + (2 + len(config.demo.ablations)) * len(seeds)
  again = demo.run(config, root)
  assert _checkpoint_steps(root) == steps_before
  assert again['gain'] == summary['gain']


def _mtimes(directory):
  return [os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(directory) for f in files]


def test_chain_stages_checkpoints_and_frozen_inputs(demo_run):
  """Every stage of the chain the demo trained: its checkpoint, config and logs; the teacher's
  HD module started from hd_pretrain; frozen models were only read by later stages."""
  config, root, _ = demo_run
  steps = config.demo.steps
  stage_dirs = {'hd_pretrain': os.path.join(root, 'hd_pretrain'),
                'teacher': os.path.join(root, 'teacher'), 'coach': os.path.join(root, 'coach'),
                'student': os.path.join(root, 'seed0', 'student'),
                'student_nokd': os.path.join(root, 'seed0', 'student_nokd')}
  for stage, stage_dir in stage_dirs.items():
    step, variables = stage_checkpoints.params_item(stage_dir)
    assert step == steps[stage.split('_')[0] if stage != 'hd_pretrain' else stage], stage
    assert set(variables) == {'params', 'batch_stats'}, stage
    assert os.path.exists(os.path.join(stage_dir, 'config.json'))
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(stage_dir)), stage
  # The teacher's HD module started from hd_pretrain: Adam moves a parameter by at most about
  # 3.2 lr a step ((1 - b1) / sqrt(1 - b2)), far less than the spread of a fresh random init.
  _, mae = stage_checkpoints.params_item(stage_dirs['hd_pretrain'])
  _, teacher = stage_checkpoints.params_item(stage_dirs['teacher'])
  drift = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), mae['params']['hd_prior'],
                       teacher['params']['hd_prior'])
  assert max(jax.tree.leaves(drift)) < 3.2 * config.optim.learning_rate * steps['teacher']
  # Frozen inputs are read, never written: nothing under teacher/ is newer than coach/'s files.
  assert max(_mtimes(stage_dirs['teacher'])) < min(_mtimes(stage_dirs['coach']))
  assert max(_mtimes(stage_dirs['coach'])) < min(_mtimes(stage_dirs['student']))
  # best/ keeps the best step by validation mIoU, and the metric is in its meta item.
  _, meta = ckpt_lib.read_meta(os.path.join(stage_dirs['student'], 'best'))
  assert np.isfinite(meta['metrics']['eval/miou'])
  # TGPD projectors are trained state of the distilling stage, kept out of its params item.
  mngr = ocp.CheckpointManager(os.path.join(stage_dirs['student'], 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  extra = mngr.restore(mngr.latest_step(),
                       args=ocp.args.Composite(opt_state=ocp.args.StandardRestore()))
  assert set(extra['opt_state']['aux']) == {'tgpd_teacher', 'tgpd_coach'}


def test_read_metrics_turns_null_back_into_nan(tmp_path):
  from mapkd_jax import evaluate
  path = tmp_path / 'metrics.json'
  path.write_text(json.dumps(evaluate._json_safe(
      {'miou': 0.25, 'iou': {'divider': float('nan'), 'boundary': 0.5}, 'per': [float('nan')]})))
  metrics = evaluate.read_metrics(str(path))
  assert metrics['miou'] == 0.25 and metrics['iou']['boundary'] == 0.5
  assert np.isnan(metrics['iou']['divider']) and np.isnan(metrics['per'][0])
