"""The main job: the whole Teacher-Coach-Student chain on one machine, measured and reported.

  python launch.py --config configs/tcs.py:demo --workdir runs/demo

  python launch.py --config configs/tcs.py:study --workdir runs/study

Runs, in order and resumably (a finished run is not redone): data creation, hd_pretrain,
teacher, coach, then for every seed the distilled student, the student baseline (nokd) and
the ablations of config.demo.ablations (one distillation term or the coach switched off; none
in the default demo, three in `study`), evaluates every model, times teacher/coach/student,
and writes ROOT/report.md, ROOT/report.json and ROOT/report.png. Every comparison between
students is paired within a seed (report.py).

Layout: ROOT/data, ROOT/{hd_pretrain,teacher,coach} (the chain, first seed), ROOT/seed<k>/
{student,student_nokd}, ROOT/seed<k>/ablation/<name>/student.
"""
import copy
import os
import time

import jax
import ml_collections
from absl import logging

from mapkd_jax import bench
from mapkd_jax import evaluate as eval_lib
from mapkd_jax import report
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import frozen_cache
from mapkd_jax.train import stages
from mapkd_jax.train import trainer

# name -> kd overrides of an ablation of the distilled student.
ABLATIONS = {
    'no_tgpd': {'tgpd_teacher_weight': 0.0, 'tgpd_coach_weight': 0.0},
    'no_msrd': {'msrd_teacher_weight': 0.0, 'msrd_coach_weight': 0.0},
    'no_coach': {'msrd_coach_weight': 0.0, 'tgpd_coach_weight': 0.0},
    # TGPD keeps its attention (relation) term but drops the feature MSE to the frozen BEV.
    'no_tgpd_feature': {'tgpd_feature_weight': 0.0},
}


def _run_config(config, workdir, *, stage, seed, nokd=False, kd=None):
  """The config of one run of the chain, derived from the demo config."""
  run = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  run.stage, run.nokd, run.seed = stage, nokd, seed
  run.data.shards = stages.shards_dir(config, workdir)
  run.train.steps = config.demo.steps[stage]
  run.optim.decay_steps = config.demo.steps[stage]
  run.frozen.teacher = os.path.join(workdir, 'teacher', 'checkpoints')
  run.frozen.coach = os.path.join(workdir, 'coach', 'checkpoints')
  run.init.hd_prior = os.path.join(workdir, 'hd_pretrain', 'checkpoints')
  run.kd.update(kd or {})
  # The frozen teacher's and coach's outputs depend only on the sample: computed once per
  # sample (frozen_cache.ensure, before the run) instead of at every distilling step.
  run.kd.cached_frozen = bool(config.demo.cached_frozen)
  return run


def check_ablations(config):
  for name in config.demo.ablations:
    if name not in ABLATIONS:
      # An unquoted tuple on the command line arrives as one name: '(no_tgpd,no_coach)'.
      raise ValueError(f'config.demo.ablations: unknown {name!r}; known: {sorted(ABLATIONS)}; '
                       f'on the command line quote each name: '
                       f'"--config.demo.ablations=(\'no_tgpd\',\'no_coach\')"')


def plan(config, workdir):
  """[(label, run_root, run_config, evaluate?)] in execution order.

  Seed by seed: a study stopped half-way has whole seeds (student, baseline and every
  ablation), which pair; a seed with only some of its runs would not.
  """
  check_ablations(config)
  runs = [(stage, workdir, _run_config(config, workdir, stage=stage, seed=config.demo.seeds[0]),
           stage != 'hd_pretrain') for stage in ('hd_pretrain', 'teacher', 'coach')]
  for seed in config.demo.seeds:
    root = os.path.join(workdir, f'seed{seed}')
    runs.append((f'student/seed{seed}', root, _run_config(config, workdir, stage='student',
                                                          seed=seed), True))
    runs.append((f'student_nokd/seed{seed}', root, _run_config(
        config, workdir, stage='student', seed=seed, nokd=True), True))
    for name in config.demo.ablations:
      runs.append((f'ablation/{name}/seed{seed}', os.path.join(root, 'ablation', name),
                   _run_config(config, workdir, stage='student', seed=seed,
                               kd=ABLATIONS[name]), True))
  return runs


def run_cost_s(run_config, demo_config, *, train, evaluate):
  """Estimated seconds of one run of the plan on the 2-core CPU the costs were measured on.

  steps x config.demo.step_cost_s[kind] (kind: the stage, 'student_nokd' for the baseline;
  ablations are distilled students) when it still has to train, plus config.demo.eval_cost_s
  when it still has to be evaluated. Training steps of different stages differ by 5x (teacher
  vs student), so counting steps alone put the ETA off by 4x (issue 14).
  """
  kind = 'student_nokd' if run_config.stage == 'student' and run_config.nokd else run_config.stage
  costs = demo_config.step_cost_s
  if kind not in costs:
    raise KeyError(f'config.demo.step_cost_s has no {kind!r} (has {sorted(costs)})')
  return (run_config.train.steps * costs[kind] if train else 0.0) + (
      demo_config.eval_cost_s if evaluate else 0.0)


def eta_s(costs, index, *, spent_s, spent_estimate_s, final_cost_s):
  """Seconds left when run `index` of the plan starts.

  costs: estimated seconds of every run (run_cost_s), in plan order.
  spent_s, spent_estimate_s: measured and estimated seconds of the runs this invocation has
    done; their ratio scales the rest to this machine (1 before the first run ends).
  final_cost_s: the speed benchmark and the report after the last run.
  """
  scale = spent_s / spent_estimate_s if spent_estimate_s > 0 else 1.0
  return scale * (float(sum(costs[index:])) + final_cost_s)


def _finished(run_root, run_config):
  ckpt_dir = os.path.join(run_root, stages.stage_dir_name(run_config), 'checkpoints')
  try:
    step, _ = ckpt_lib.read_meta(ckpt_dir)
  except FileNotFoundError:
    return False
  return step >= run_config.train.steps


def _evaluated(run_root, run_config):
  """metrics.json of the run's final step, or None when it is missing or of an earlier step."""
  path = os.path.join(run_root, stages.stage_dir_name(run_config), 'eval', 'metrics.json')
  if not os.path.exists(path):
    return None
  metrics = eval_lib.read_metrics(path)   # null (a class absent from val) back to NaN
  return metrics if metrics['checkpoint_step'] >= run_config.train.steps else None


def run(config, workdir):
  """Runs the demo chain under `workdir` and writes the report; returns the report dict."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  stages.ensure_data(config, workdir)
  runs = plan(config, workdir)
  results, started = {}, time.time()
  # Work still to do per run (a resumed demo skips finished runs) at measured per-stage costs.
  costs = [run_cost_s(run_config, config.demo, train=not _finished(run_root, run_config),
                      evaluate=evaluate and _evaluated(run_root, run_config) is None)
           for _, run_root, run_config, evaluate in runs]
  spent_s = spent_estimate_s = 0.0
  estimate_at_start = eta_s(costs, 0, spent_s=0.0, spent_estimate_s=0.0,
                            final_cost_s=config.demo.final_cost_s)
  for index, (label, run_root, run_config, evaluate) in enumerate(runs):
    run_started = time.time()
    eta = eta_s(costs, index, spent_s=spent_s, spent_estimate_s=spent_estimate_s,
                final_cost_s=config.demo.final_cost_s)
    logging.info('[demo %d/%d] %s (elapsed %.1f min, ETA %.1f min)', index + 1, len(runs), label,
                 (run_started - started) / 60, eta / 60)
    if not _finished(run_root, run_config):
      if run_config.kd.cached_frozen:
        frozen_cache.ensure(run_config, run_root)   # a no-op once built and up to date
      trainer.train_and_evaluate(run_config, run_root)
    if evaluate:
      metrics = _evaluated(run_root, run_config)
      if metrics is None:
        metrics = eval_lib.evaluate(run_config, run_root, checkpoint='latest',
                                    num_images=config.demo.eval_images)
      results[label] = {'metrics': metrics, 'root': run_root, 'stage_dir':
                        stages.stage_dir_name(run_config), 'seed': run_config.seed}
    if costs[index] > 0:
      spent_s += time.time() - run_started
      spent_estimate_s += costs[index]
  speed = _speed(config)
  summary = report.write(workdir, report.build(config, results, speed), results, config)
  logging.info('Demo done in %.1f min (estimated %.1f at the start): %s',
               (time.time() - started) / 60, estimate_at_start / 60,
               os.path.join(workdir, 'report.md'))
  return summary


def _speed(config):
  """Frames/s of teacher, coach and student on this machine (same run, so ratios compare)."""
  records, ratios = bench.run(config, ['teacher', 'coach', 'student'], batch_size=1,
                              iters=config.demo.bench_iters, warmup=config.demo.bench_warmup,
                              seed=0, config_name='demo', emit=logging.info)
  return {'records': {r['name']: r for r in records}, 'ratios': ratios,
          'device_kind': jax.devices()[0].device_kind}
