"""Per-sample matching of predictions to GT ('maptr' and 'legacy' rules) and all-point AP."""
import numpy as np

from mapkd_jax.eval import chamfer


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


def match_sample(cd, scores, *, threshold, rule):
  """TP flags of one sample's predictions of one class at one threshold.

  Args:
    cd: [P, G] Chamfer distances (inf = never matched).
    scores: [P] prediction scores.
    threshold: metres.
    rule: 'maptr' (closest GT overall, CD <= threshold, FP if it is taken) or 'legacy'
      (closest still-free GT with CD < threshold).

  Returns:
    [P] int64 flags, in the input order of the predictions.
  """
  num_pred, num_gt = cd.shape
  tp = np.zeros(num_pred, np.int64)
  if num_gt == 0:
    return tp
  taken = np.zeros(num_gt, bool)
  for i in np.argsort(-np.asarray(scores, np.float64), kind='stable'):
    if rule == 'maptr':
      best = int(np.argmin(cd[i]))
      if cd[i, best] <= threshold and not taken[best]:
        taken[best] = True
        tp[i] = 1
    else:
      free = (~taken) & (cd[i] < threshold)
      if free.any():
        best = np.flatnonzero(free)[np.argmin(cd[i][free])]
        taken[best] = True
        tp[i] = 1
  return tp


def sample_distances(preds, gts, *, protocol, sample_step=0.15, num_points=100, buffer_m=2.0):
  """(kept prediction indices, scores [P], Chamfer matrix [P, G]) of one sample and class.

  Args:
    preds: [(points [N, 2], score), ...]; gts: [points [N, 2], ...].
  """
  if protocol == 'maptr':
    keep = [k for k, (p, _) in enumerate(preds) if len(p) >= 2]
    pred_pts = [chamfer.maptr_points(preds[k][0], num_points, is_prediction=True) for k in keep]
    gt_pts = [chamfer.maptr_points(g, num_points, is_prediction=False) for g in gts]
    cd = chamfer.maptr_chamfer_matrix(pred_pts, gt_pts, num_points=num_points, buffer_m=buffer_m)
  else:
    keep = list(range(len(preds)))
    cd = chamfer.chamfer_matrix([p for p, _ in preds], list(gts), sample_step=sample_step)
  scores = np.array([preds[k][1] for k in keep], np.float64)
  return np.asarray(keep, np.int64), scores, cd
