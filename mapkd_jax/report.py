"""The demo report: a table like the paper's (DESIGN.md section 5), the distillation gain over
seeds, the ablations, speed, and a picture grid of predictions on the same val samples."""
import json
import os

import numpy as np
from scipy import stats

from mapkd_jax import visualize

INPUTS = {'teacher': 'C+L+SD+HD', 'coach': 'C+simL+SD+HD', 'student': 'C', 'student_nokd': 'C'}

ONE_SEED = 'one seed: no interval, no conclusion'
NOT_RESOLVED = 'not resolved (CI includes 0)'
NOT_FINITE = 'no conclusion (a per-seed value is not finite)'


def summarize_seeds(values, confidence=0.95):
  """Paired per-seed differences -> mean, spread, t confidence interval and a verdict.

  values: [n] one number per seed, each already paired within its seed (e.g. the distilled
  student's mIoU minus the baseline's mIoU of the SAME seed), so seed-to-seed variation shared
  by both runs cancels before the spread is taken. The interval is mean +/- t * sd / sqrt(n)
  with t the (1 + confidence) / 2 quantile of Student's t with n - 1 degrees of freedom: the
  seeds are few, so the normal quantile (1.96) would claim a far narrower interval than the
  data support (n = 2: t = 12.71). One seed has no spread, hence no interval and no verdict.

  Returns a JSON-ready dict (lists, floats, None; no tuples, so it equals its JSON round trip).
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f'summarize_seeds: expected one value per seed, got shape {values.shape}')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'config.demo.confidence must lie in (0, 1), got {confidence!r}')
  n = int(values.size)
  out = {'per_seed': [float(v) for v in values], 'n': n, 'mean': float(values.mean()),
         'std': None, 'se': None, 'confidence': float(confidence), 't': None, 'ci': None,
         'resolved': False}
  if n == 1:
    return dict(out, verdict=ONE_SEED)
  if not np.all(np.isfinite(values)):
    return dict(out, verdict=NOT_FINITE)
  std = float(values.std(ddof=1))   # sample sd: n - 1, matching the t's degrees of freedom
  se = std / np.sqrt(n)
  t = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1))
  low, high = out['mean'] - t * se, out['mean'] + t * se
  out.update(std=std, se=float(se), t=t, ci=[float(low), float(high)])
  if low > 0.0:
    return dict(out, resolved=True, verdict='resolved above seed noise (gain > 0)')
  if high < 0.0:
    return dict(out, resolved=True, verdict='resolved above seed noise (gain < 0)')
  return dict(out, verdict=NOT_RESOLVED)


def _row(name, metrics_list, classes, speed):
  """Mean over seeds of one model's metrics (a list of metrics.json dicts)."""
  def mean(get):
    return float(np.mean([get(m) for m in metrics_list]))
  row = {'model': name, 'inputs': INPUTS[name], 'seeds': len(metrics_list)}
  for c in classes:
    row[f'iou_{c}'] = mean(lambda m, c=c: m['iou'][c])
  row['miou'] = mean(lambda m: m['miou'])
  row['map'] = mean(lambda m: m['map'])
  for band in metrics_list[0]['iou_by_range']:
    row[f'miou_{band}'] = mean(lambda m, b=band: m['iou_by_range'][b]['miou'])
  record = speed['records'].get('student' if name.startswith('student') else name)
  row['params'] = record['params'] if record else None
  row['frames_per_s'] = record['frames_per_s'] if record else None
  return row


def build(config, results, speed):
  """Report dict from {label: {'metrics', 'seed', ...}} and bench records."""
  classes = tuple(config.data.classes)
  seeds = list(config.demo.seeds)
  by_model = {
      'teacher': [results['teacher']['metrics']], 'coach': [results['coach']['metrics']],
      'student': [results[f'student/seed{s}']['metrics'] for s in seeds],
      'student_nokd': [results[f'student_nokd/seed{s}']['metrics'] for s in seeds]}
  rows = [_row(name, metrics, classes, speed) for name, metrics in by_model.items()]
  # Paired within each seed: a seed that is good for the baseline is usually good for the
  # distilled student too, and that shared part is not evidence for distillation.
  gain = {}
  for key in ('miou', 'map'):
    paired = [results[f'student/seed{s}']['metrics'][key] -
              results[f'student_nokd/seed{s}']['metrics'][key] for s in seeds]
    gain[key] = summarize_seeds(paired, confidence=config.demo.confidence)
    gain[key]['seeds'] = seeds
  # Each ablation ran on every seed: paired with the same seed's distilled student (what the
  # switched-off term contributes) and baseline (what the rest still gains).
  ablations = []
  for name in config.demo.ablations:
    runs = [results[f'ablation/{name}/seed{s}']['metrics'] for s in seeds]
    entry = {'name': name, 'seeds': seeds,
             'miou': float(np.mean([m['miou'] for m in runs])),
             'map': float(np.mean([m['map'] for m in runs]))}
    for other, label in (('student', 'vs_student'), ('student_nokd', 'vs_nokd')):
      for key in ('miou', 'map'):
        paired = [m[key] - results[f'{other}/seed{s}']['metrics'][key]
                  for m, s in zip(runs, seeds)]
        entry[f'{label}_{key}'] = summarize_seeds(paired, confidence=config.demo.confidence)
    ablations.append(entry)
  miou = {r['model']: r['miou'] for r in rows}
  fps = speed['records']
  checks = {
      'teacher_best': miou['teacher'] >= max(miou.values()),
      'coach_between_teacher_and_student': miou['teacher'] >= miou['coach'] >= miou['student'],
      # Above the baseline only when the seed interval excludes 0, not when the mean is > 0.
      'student_above_baseline_miou': gain['miou']['resolved'] and gain['miou']['mean'] > 0,
      'student_above_baseline_map': gain['map']['resolved'] and gain['map']['mean'] > 0,
      'student_3x_teacher_fps': fps['student']['frames_per_s'] >= 3 * fps['teacher']['frames_per_s'],
      'student_1.5x_coach_fps': fps['student']['frames_per_s'] >= 1.5 * fps['coach']['frames_per_s'],
  }
  return {'title': 'MapKD ' + config.stage + ' report', 'rows': rows, 'gain': gain,
          'ablations': ablations, 'speed': speed, 'checks': checks, 'seeds': seeds, 'steps': dict(config.demo.steps), 'bev_x': list(config.data.bev_x),
          'optim': {'learning_rate': config.optim.learning_rate,
                    'schedule': config.optim.schedule, 'batch_size': config.train.batch_size},
          'bev_y': list(config.data.bev_y), 'classes': list(classes)}


def _fmt(value, scale=100.0, signed=False):
  if value is None or not np.isfinite(value):
    return '-'
  return f'{scale * value:+.2f}' if signed else f'{scale * value:.2f}'


def _gain_lines(gain):
  """The paired-gain table and one verdict line per metric (gains in percentage points)."""
  first = next(iter(gain.values()))
  level = f"{100 * first['confidence']:g}%"
  lines = ['', '## Distillation gain (student - student_nokd, paired per seed)', '',
           f"Per seed: distilled minus baseline of the same seed; seeds {first['seeds']}. "
           f"sd: sample standard deviation (n - 1); se = sd / sqrt(n); {level} CI = mean +/- "
           f"t * se with t the Student-t quantile at n - 1 degrees of freedom.", '',
           f'| metric | per-seed gain | n | mean | sd | se | t | {level} CI | verdict |',
           '|---|---|---|---|---|---|---|---|---|']
  names = {'miou': 'mIoU', 'map': 'mAP'}
  for key, g in gain.items():
    per_seed = ', '.join(f'{_fmt(v, signed=True)}' for v in g['per_seed'])
    t = '-' if g['t'] is None else f"{g['t']:.3f}"
    ci = ('-' if g['ci'] is None else
          f"[{_fmt(g['ci'][0], signed=True)}, {_fmt(g['ci'][1], signed=True)}]")
    lines.append(f"| {names.get(key, key)} | {per_seed} | {g['n']} | "
                 f"{_fmt(g['mean'], signed=True)} | {_fmt(g['std'])} | {_fmt(g['se'])} | {t} | "
                 f"{ci} | {g['verdict']} |")
  lines.append('')
  lines += [f"- {names.get(key, key)} gain: {g['verdict']}." for key, g in gain.items()]
  return lines


def _interval(g):
  """'+1.23 [-0.50, +2.96]' (percentage points) of a summarize_seeds dict."""
  if g['ci'] is None:
    return f"{_fmt(g['mean'], signed=True)} (n={g['n']})"
  return (f"{_fmt(g['mean'], signed=True)} [{_fmt(g['ci'][0], signed=True)}, "
          f"{_fmt(g['ci'][1], signed=True)}]")


def _ablation_lines(ablations):
  """One row per ablation: its means and its paired differences with their intervals."""
  first = ablations[0]['vs_student_miou']
  level = f"{100 * first['confidence']:g}%"
  lines = ['', '## Ablations (paired per seed)', '',
           f"Each ablation ran on seeds {ablations[0]['seeds']}; differences are taken within a "
           f"seed against that seed's distilled student and baseline: mean [{level} t interval], "
           "percentage points.", '',
           '| run | mIoU | mAP | vs student mIoU | verdict | vs baseline mIoU | verdict | '
           'vs student mAP | vs baseline mAP |', '|---|---|---|---|---|---|---|---|---|']
  for a in ablations:
    lines.append(
        f"| {a['name']} | {_fmt(a['miou'])} | {_fmt(a['map'])} | "
        f"{_interval(a['vs_student_miou'])} | {a['vs_student_miou']['verdict']} | "
        f"{_interval(a['vs_nokd_miou'])} | {a['vs_nokd_miou']['verdict']} | "
        f"{_interval(a['vs_student_map'])} | {_interval(a['vs_nokd_map'])} |")
  return lines


def markdown(summary):
  classes = summary['classes']
  bands = [k[len('miou_'):] for k in summary['rows'][0] if k.startswith('miou_')]
  head = (['model', 'inputs'] + classes + ['mIoU', 'mAP'] + [f'mIoU {b}' for b in bands] +
          ['params', 'frames/s'])
  lines = [f"# {summary['title']}", '',
           f"BEV x {summary['bev_x']}, y {summary['bev_y']}; steps {summary['steps']} at batch "
           f"{summary['optim']['batch_size']}, Adam lr {summary['optim']['learning_rate']:g} "
           f"({summary['optim']['schedule']} schedule over each run); "
           f"seeds {summary['seeds']} (student rows: mean over seeds; teacher and coach: one "
           f"run each, seed {summary['seeds'][0]}). IoU and AP in %. "
           f"Speed on {summary['speed']['device_kind']}, batch 1.", '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in summary['rows']:
    cells = ([r['model'], r['inputs']] + [_fmt(r[f'iou_{c}']) for c in classes] +
             [_fmt(r['miou']), _fmt(r['map'])] + [_fmt(r[f'miou_{b}']) for b in bands] +
             [f"{r['params']:,}" if r['params'] else '-',
              f"{r['frames_per_s']:.2f}" if r['frames_per_s'] else '-'])
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += _gain_lines(summary['gain'])
  if summary['ablations']:
    lines += _ablation_lines(summary['ablations'])
  lines += ['', '## Speed ratios (same run, same device)', '']
  lines += [f'- {k}: {v:.2f}' for k, v in summary['speed']['ratios'].items()]
  lines += ['', '## What the method predicts, checked', '',
            'Student vs baseline: yes only when the seed interval above excludes 0. Teacher and '
            'coach are one run each, so the orderings involving them are not tested against '
            'seed noise.', '']
  for k, v in summary['checks'].items():
    metric = k[len('student_above_baseline_'):] if k.startswith('student_above_baseline_') else None
    why = f": {summary['gain'][metric]['verdict']}" if metric in summary['gain'] else ''
    lines.append(f"- {k}: {'yes' if v else 'NO'}{why}")
  pictures = ', '.join(summary.get('pictures', []))
  lines += ['', 'Pictures: report.png (columns: ground truth, teacher, coach, student, baseline; '
            'rows: the val samples with the most crossing pixels and the widest line spread, '
            f'in turn: {pictures}).']
  return '\n'.join(lines) + '\n'


def choose_samples(gt, num, class_names, *, min_gap):
  """Indices of `num` val samples worth looking at: crossings, junctions and curves.

  The first samples of a val split are the first seconds of one scene, usually a straight road,
  which shows nothing a straight-road model could get wrong. Two scores, taken in turn:
  pedestrian-crossing pixels, and the number of BEV rows that hold a divider or boundary pixel
  (a straight road along the ego's x axis fills a few rows; a junction's cross street or a
  curve fills many). Samples closer than `min_gap` in split order (neighbouring keyframes of a
  scene look alike) to a chosen one are skipped while others remain.

  Args:
    gt: [N, H, W] ground-truth class maps (0 = background, i + 1 = class_names[i]).
    num: samples wanted (at most N).
    class_names: names of the classes, e.g. ('divider', 'ped_crossing', 'boundary').
    min_gap: smallest index distance between two chosen samples, while possible.
  Returns:
    list of `num` distinct indices, in the order chosen.
  """
  gt = np.asarray(gt)
  names = list(class_names)
  lines = [names.index(c) + 1 for c in ('divider', 'boundary') if c in names]
  crossing = (np.sum(gt == names.index('ped_crossing') + 1, axis=(1, 2))
              if 'ped_crossing' in names else np.zeros(len(gt)))
  spread = np.isin(gt, lines).any(axis=2).sum(axis=1)
  orders = [np.argsort(-crossing, kind='stable'), np.argsort(-spread, kind='stable')]
  chosen = []
  for turn in range(min(num, len(gt))):
    order = orders[turn % 2]
    far = [int(i) for i in order if i not in chosen and
           all(abs(int(i) - j) >= min_gap for j in chosen)]
    chosen.append(far[0] if far else next(int(i) for i in order if i not in chosen))
  return chosen


def picture_grid(panels_by_model, num_samples, *, bev_x, bev_y, scale):
  """Rows of BEV class maps: one row per sample, one column per model (already aligned)."""
  rows = []
  for i in range(num_samples):
    cells = [visualize.bev_panel(panels[i], [], bev_x=bev_x, bev_y=bev_y, class_names=(),
                                 scale=scale, title=name)
             for name, panels in panels_by_model.items()]
    separator = np.full((cells[0].shape[0], 4, 3), 255, np.uint8)
    rows.append(np.concatenate(sum([[c, separator] for c in cells], [])[:-1], axis=1))
  gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
  return np.concatenate(sum([[r, gap] for r in rows], [])[:-1], axis=0)


def write(workdir, summary, results, config):
  """report.json, report.md and report.png under `workdir`; returns the summary as written
  (with 'pictures': the val tokens report.png shows)."""
  seed = config.demo.seeds[0]
  sources = {'teacher': results['teacher'], 'coach': results['coach'],
             'student': results[f'student/seed{seed}'],
             'baseline': results[f'student_nokd/seed{seed}']}
  arrays = {name: np.load(os.path.join(r['root'], r['stage_dir'], 'eval', 'semantic.npz'))
            for name, r in sources.items()}
  tokens = list(arrays['teacher']['tokens'])
  index = {name: {t: i for i, t in enumerate(a['tokens'])} for name, a in arrays.items()}
  picks = choose_samples(arrays['teacher']['gt'], config.demo.grid_samples,
                         config.data.classes, min_gap=config.demo.grid_min_gap)
  chosen = [tokens[i] for i in picks]
  panels = {'ground truth': [arrays['teacher']['gt'][index['teacher'][t]] for t in chosen]}
  for name, a in arrays.items():
    panels[name] = [a['pred'][index[name][t]] for t in chosen]
  grid = picture_grid(panels, len(chosen), bev_x=tuple(config.data.bev_x),
                      bev_y=tuple(config.data.bev_y), scale=config.demo.grid_scale)
  visualize.save_png(os.path.join(workdir, 'report.png'), grid)
  summary = dict(summary, pictures=[str(t) for t in chosen])
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=float)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown(summary))
  return summary
