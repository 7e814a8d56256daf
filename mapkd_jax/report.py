"""The demo report: a table like the paper's (DESIGN.md section 5), the distillation gain over
seeds, the ablations, speed, and a picture grid of predictions on the same val samples."""
import json
import os

import numpy as np

from mapkd_jax import visualize

INPUTS = {'teacher': 'C+L+SD+HD', 'coach': 'C+simL+SD+HD', 'student': 'C', 'student_nokd': 'C'}


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
  from mapkd_jax.demo import summarize_seeds  # the demo owns the seed statistics
  classes = tuple(config.data.classes)
  seeds = list(config.demo.seeds)
  by_model = {
      'teacher': [results['teacher']['metrics']], 'coach': [results['coach']['metrics']],
      'student': [results[f'student/seed{s}']['metrics'] for s in seeds],
      'student_nokd': [results[f'student_nokd/seed{s}']['metrics'] for s in seeds]}
  rows = [_row(name, metrics, classes, speed) for name, metrics in by_model.items()]
  gain = {key: summarize_seeds([s[key] - b[key] for s, b in zip(by_model['student'],
                                                                 by_model['student_nokd'])])
          for key in ('miou', 'map')}
  ablations = []
  for name in config.demo.ablations:
    metrics = results[f'ablation/{name}']['metrics']
    ablations.append({'name': name, 'miou': metrics['miou'], 'map': metrics['map'],
                      'vs_student_miou': metrics['miou'] - by_model['student'][0]['miou'],
                      'vs_nokd_miou': metrics['miou'] - by_model['student_nokd'][0]['miou']})
  miou = {r['model']: r['miou'] for r in rows}
  fps = speed['records']
  checks = {
      'teacher_best': miou['teacher'] >= max(miou.values()),
      'coach_between_teacher_and_student': miou['teacher'] >= miou['coach'] >= miou['student'],
      'student_above_baseline_miou': gain['miou']['mean'] > 0,
      'student_above_baseline_map': gain['map']['mean'] > 0,
      'student_3x_teacher_fps': fps['student']['frames_per_s'] >= 3 * fps['teacher']['frames_per_s'],
      'student_1.5x_coach_fps': fps['student']['frames_per_s'] >= 1.5 * fps['coach']['frames_per_s'],
  }
  return {'rows': rows, 'gain': gain, 'ablations': ablations, 'speed': speed, 'checks': checks,
          'seeds': seeds, 'steps': dict(config.demo.steps), 'bev_x': list(config.data.bev_x),
          'optim': {'learning_rate': config.optim.learning_rate,
                    'schedule': config.optim.schedule, 'batch_size': config.train.batch_size},
          'bev_y': list(config.data.bev_y), 'classes': list(classes)}


def _fmt(value, scale=100.0):
  return '-' if value is None or not np.isfinite(value) else f'{scale * value:.2f}'


def markdown(summary):
  classes = summary['classes']
  bands = [k[len('miou_'):] for k in summary['rows'][0] if k.startswith('miou_')]
  head = (['model', 'inputs'] + classes + ['mIoU', 'mAP'] + [f'mIoU {b}' for b in bands] +
          ['params', 'frames/s'])
  lines = ['# MapKD demo report', '',
           f"BEV x {summary['bev_x']}, y {summary['bev_y']}; steps {summary['steps']} at batch "
           f"{summary['optim']['batch_size']}, Adam lr {summary['optim']['learning_rate']:g} "
           f"({summary['optim']['schedule']} schedule over each run); "
           f"seeds {summary['seeds']} (student rows: mean over seeds). IoU and AP in %. "
           f"Speed on {summary['speed']['device_kind']}, batch 1.", '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in summary['rows']:
    cells = ([r['model'], r['inputs']] + [_fmt(r[f'iou_{c}']) for c in classes] +
             [_fmt(r['miou']), _fmt(r['map'])] + [_fmt(r[f'miou_{b}']) for b in bands] +
             [f"{r['params']:,}" if r['params'] else '-',
              f"{r['frames_per_s']:.2f}" if r['frames_per_s'] else '-'])
    lines.append('| ' + ' | '.join(cells) + ' |')
  g = summary['gain']
  lines += ['', '## Distillation gain (student - student_nokd, per seed)', '',
            f"- mIoU: {_fmt(g['miou']['mean'])} +/- {_fmt(g['miou']['std'])} "
            f"(per seed {[_fmt(v) for v in g['miou']['per_seed']]})",
            f"- mAP: {_fmt(g['map']['mean'])} +/- {_fmt(g['map']['std'])} "
            f"(per seed {[_fmt(v) for v in g['map']['per_seed']]})", '',
            '## Ablations (seed 0)', '', '| run | mIoU | mAP | vs student mIoU | vs baseline mIoU |',
            '|---|---|---|---|---|']
  for a in summary['ablations']:
    lines.append(f"| {a['name']} | {_fmt(a['miou'])} | {_fmt(a['map'])} | "
                 f"{_fmt(a['vs_student_miou'])} | {_fmt(a['vs_nokd_miou'])} |")
  lines += ['', '## Speed ratios (same run, same device)', '']
  lines += [f'- {k}: {v:.2f}' for k, v in summary['speed']['ratios'].items()]
  lines += ['', '## What the method predicts, checked', '']
  lines += [f"- {k}: {'yes' if v else 'NO'}" for k, v in summary['checks'].items()]
  lines += ['', 'Pictures: report.png (columns: ground truth, teacher, coach, student, baseline).']
  return '\n'.join(lines) + '\n'


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
  """report.json, report.md and report.png under `workdir`."""
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=float)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown(summary))
  seed = config.demo.seeds[0]
  sources = {'teacher': results['teacher'], 'coach': results['coach'],
             'student': results[f'student/seed{seed}'],
             'baseline': results[f'student_nokd/seed{seed}']}
  arrays = {name: np.load(os.path.join(r['root'], r['stage_dir'], 'eval', 'semantic.npz'))
            for name, r in sources.items()}
  tokens = list(arrays['teacher']['tokens'])
  index = {name: {t: i for i, t in enumerate(a['tokens'])} for name, a in arrays.items()}
  chosen = tokens[:config.demo.grid_samples]
  panels = {'ground truth': [arrays['teacher']['gt'][index['teacher'][t]] for t in chosen]}
  for name, a in arrays.items():
    panels[name] = [a['pred'][index[name][t]] for t in chosen]
  grid = picture_grid(panels, len(chosen), bev_x=tuple(config.data.bev_x),
                      bev_y=tuple(config.data.bev_y), scale=config.demo.grid_scale)
  visualize.save_png(os.path.join(workdir, 'report.png'), grid)
