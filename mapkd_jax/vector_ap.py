"""Vector AP of predicted map polylines: Chamfer matching over the whole dataset.

Protocol (DESIGN.md section 4; the HDMapNet evaluation bugs are deliberately not reproduced):
  * Chamfer distance: both polylines are resampled every `sample_step` metres of arc length
    (endpoints kept); CD = (mean over A of the distance to the nearest point of B + mean over
    B of the distance to the nearest point of A) / 2, in metres.
  * Per class and threshold, predictions of ALL samples are sorted by DESCENDING score
    (ties keep input order: samples in sorted token order, then list order). Each prediction
    is matched, within its own sample, to the closest still-unmatched GT of its class whose
    CD < threshold (strict); each GT is matched at most once. TP/FP counts are accumulated
    over the whole dataset (no per-sample averaging).
  * Precision is made monotone (p(r) = max precision at recall >= r), then AP = all-point
    area under that curve (VOC2010+): sum over TPs of (recall step) x (interpolated precision).
  * A class with no GT in the dataset has AP NaN and is left out of mAP; mAP = mean over
    classes and thresholds.

CLI: python -m mapkd_jax.vector_ap --pred predictions.json --gt gt.json [--thresholds 0.5,1.0,1.5]
"""
import argparse
import json

import numpy as np

from mapkd_jax.data import schema

PROTOCOL = {
    'chamfer': 'symmetric mean of nearest-point distances of polylines resampled every '
               'sample_step metres',
    'sort_order': 'descending score over the whole dataset',
    'matching_scope': 'dataset-level TP/FP accumulation; greedy by score, each GT at most once, '
                      'closest unmatched GT of the same sample with CD < threshold',
    'interpolation': 'all-point (VOC2010+) area under the monotone precision-recall curve',
    'empty_class': 'AP NaN when a class has no GT; excluded from mAP',
}


def resample_polyline(points, step):
  """Points every `step` metres along a polyline (first and last vertex included).

  Args:
    points: [N, 2] float, N >= 1.
    step: spacing in metres (> 0).

  Returns:
    [M, 2] float64; a degenerate (zero-length) polyline gives its first point.
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  if len(points) == 0:
    raise ValueError('resample_polyline: empty polyline')
  seg = np.hypot(*np.diff(points, axis=0).T)
  arc = np.concatenate([[0.0], np.cumsum(seg)])
  if arc[-1] <= 0:
    return points[:1]
  num = int(np.ceil(arc[-1] / step))
  stations = np.linspace(0.0, arc[-1], num + 1)
  return np.stack([np.interp(stations, arc, points[:, 0]),
                   np.interp(stations, arc, points[:, 1])], axis=1)


def chamfer_matrix(preds, gts, *, sample_step):
  """Chamfer distances between every predicted and every GT polyline.

  Args:
    preds, gts: lists of [N_i, 2] polylines in metres.
    sample_step: resampling spacing in metres.

  Returns:
    [len(preds), len(gts)] float64.
  """
  out = np.zeros((len(preds), len(gts)))
  if not preds or not gts:
    return out
  gt_pts = [resample_polyline(g, sample_step) for g in gts]
  all_gt = np.concatenate(gt_pts)
  counts = np.array([len(g) for g in gt_pts])
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  # One prediction at a time against all GT points at once: vectorized over GTs, while memory
  # stays [points of one prediction, GT points] (whole-sample matrices get large at 0.15 m).
  for i, pred in enumerate(preds):
    pred_pts = resample_polyline(pred, sample_step)
    dist = np.linalg.norm(pred_pts[:, None, :] - all_gt[None, :, :], axis=-1)
    pred_to_gt = np.minimum.reduceat(dist, starts, axis=1).mean(axis=0)
    gt_to_pred = np.add.reduceat(dist.min(axis=0), starts) / counts
    out[i] = 0.5 * (pred_to_gt + gt_to_pred)
  return out


def average_precision(tp, num_gt):
  """All-point AP of a score-sorted list of TP (1) / FP (0) flags with `num_gt` GT.

  Returns:
    float AP in [0, 1]; NaN if num_gt == 0.
  """
  if num_gt == 0:
    return float('nan')
  tp = np.asarray(tp, np.float64)
  if len(tp) == 0:
    return 0.0
  tp_cum = np.cumsum(tp)
  precision = tp_cum / np.arange(1, len(tp) + 1)
  recall = tp_cum / num_gt
  monotone = np.maximum.accumulate(precision[::-1])[::-1]
  recall_step = np.diff(np.concatenate([[0.0], recall]))
  return float(np.sum(recall_step * monotone))


def match_class(preds, gts, *, threshold, sample_step, chamfer=None):
  """Dataset-level greedy matching of one class at one threshold.

  Args:
    preds: {token: [(points [N, 2], score), ...]}.
    gts: {token: [points [N, 2], ...]}.
    threshold: Chamfer threshold in metres (a match needs CD < threshold).
    sample_step: resampling spacing in metres.
    chamfer: optional {token: [P, G] matrix} cache (from `chamfer_matrix`).

  Returns:
    (tp flags in descending score order [num_preds] int, num_gt).
  """
  entries = []  # (score, order, token, index)
  for token in sorted(preds):
    for index, (_, score) in enumerate(preds[token]):
      entries.append((float(score), len(entries), token, index))
  # Descending score; the running order breaks ties deterministically (input order).
  entries.sort(key=lambda e: (-e[0], e[1]))
  matched = {token: np.zeros(len(gts.get(token, [])), bool) for token in preds}
  tp = np.zeros(len(entries), np.int64)
  for rank, (_, _, token, index) in enumerate(entries):
    sample_gts = gts.get(token, [])
    if not sample_gts:
      continue
    if chamfer is not None and token in chamfer:
      row = chamfer[token][index]
    else:
      row = chamfer_matrix([preds[token][index][0]], sample_gts, sample_step=sample_step)[0]
    free = (~matched[token]) & (row < threshold)
    if free.any():
      best = np.flatnonzero(free)[np.argmin(row[free])]
      matched[token][best] = True
      tp[rank] = 1
  num_gt = sum(len(v) for v in gts.values())
  return tp, num_gt


def evaluate_vectors(predictions, ground_truth, *, class_names, thresholds, sample_step):
  """AP per class and threshold, and mAP.

  Args:
    predictions: {token: [{'cls': name, 'pts': [[x, y], ...], 'score': float}, ...]}.
    ground_truth: {token: [{'cls': name, 'pts': [[x, y], ...]}, ...]}.
    class_names: the classes scored.
    thresholds: Chamfer thresholds in metres.
    sample_step: resampling spacing in metres.

  Returns:
    {'ap': {class: {str(threshold): AP}}, 'map': float, 'num_gt': {class: n},
     'num_pred': {class: n}}.
  """
  ap, num_gt_out, num_pred_out, scored = {}, {}, {}, []
  for name in class_names:
    preds = {t: [(np.asarray(v['pts'], np.float64), float(v['score']))
                 for v in items if v['cls'] == name] for t, items in predictions.items()}
    gts = {t: [np.asarray(v['pts'], np.float64) for v in items if v['cls'] == name]
           for t, items in ground_truth.items()}
    cache = {t: chamfer_matrix([p for p, _ in preds[t]], gts.get(t, []), sample_step=sample_step)
             for t in preds}
    ap[name] = {}
    for threshold in thresholds:
      tp, num_gt = match_class(preds, gts, threshold=threshold, sample_step=sample_step,
                               chamfer=cache)
      ap[name][str(float(threshold))] = average_precision(tp, num_gt)
      if num_gt:
        scored.append(ap[name][str(float(threshold))])
    num_gt_out[name] = sum(len(v) for v in gts.values())
    num_pred_out[name] = sum(len(v) for v in preds.values())
  return {'ap': ap, 'map': float(np.mean(scored)) if scored else float('nan'),
          'num_gt': num_gt_out, 'num_pred': num_pred_out}


def load_vectors(path, *, class_names, with_score):
  """Reads and checks a predictions/gt JSON file.

  Raises:
    FileNotFoundError: naming the file.
    ValueError: naming the file, sample and offending class or field.
  """
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: no such vector file') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path}: want {{sample_token: [vectors]}}, got {type(data).__name__}')
  for token, items in data.items():
    for k, item in enumerate(items):
      if item.get('cls') not in class_names:
        raise ValueError(f'{path}: sample {token!r} vector {k} has unknown class '
                         f'{item.get("cls")!r}; known: {list(class_names)}')
      pts = np.asarray(item.get('pts', []), np.float64)
      if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise ValueError(f'{path}: sample {token!r} vector {k}: pts must be a non-empty '
                         f'[[x, y], ...] list, got shape {pts.shape}')
      if with_score and 'score' not in item:
        raise ValueError(f'{path}: sample {token!r} vector {k} has no score')
  return data


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pred', required=True, help='predictions.json written by evaluate')
  parser.add_argument('--gt', required=True, help='gt.json written by evaluate')
  parser.add_argument('--thresholds', default='0.5,1.0,1.5', help='Chamfer thresholds, metres')
  parser.add_argument('--sample_step', type=float, default=0.15,
                      help='resampling step in metres (config.eval.sample_step)')
  args = parser.parse_args(argv)
  thresholds = tuple(float(t) for t in args.thresholds.split(','))
  preds = load_vectors(args.pred, class_names=schema.CLASSES, with_score=True)
  gts = load_vectors(args.gt, class_names=schema.CLASSES, with_score=False)
  missing = sorted(set(preds) - set(gts))
  if missing:
    raise ValueError(f'{args.pred}: samples {missing[:3]} have no entry in {args.gt}')
  result = evaluate_vectors(preds, gts, class_names=schema.CLASSES, thresholds=thresholds,
                            sample_step=args.sample_step)
  print(json.dumps({**result, 'protocol': PROTOCOL}, indent=2))
  return result


if __name__ == '__main__':
  main()
