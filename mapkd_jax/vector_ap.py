"""Vector AP of predicted map polylines, under three named protocols.

'maptr' (the default; MapTR's released vector evaluation, DESIGN.md section 4):
  * Every GT polyline is resampled to `num_points` (100) points evenly spaced along its length
    (shapely `interpolate` at linspace(0, length, 100)); so is every prediction, except one
    that already has exactly 100 vertices, which MapTR keeps as it is. Predictions with fewer
    than 2 vertices are dropped (not scored at all).
  * Gate: a prediction/GT pair whose `buffer_m` (2 m) flat-cap, mitre-join buffers do not
    intersect is never matched (its Chamfer distance counts as infinite).
  * Chamfer distance CD = (mean over prediction points of the distance to the nearest GT point
    + mean over GT points of the distance to the nearest prediction point) / 2, in metres.
  * Matching, per sample, class and threshold: predictions in descending score; each takes its
    closest GT over ALL the sample's GTs of the class (first on ties); TP if CD <= threshold
    and that GT is still free (it is then taken), else FP (even when another free GT is within
    the threshold).
  * TP/FP flags of the whole split sorted by descending score (stable here: ties keep sample
    order, then list order; MapTR's np.argsort is unstable, so its order of exact ties is
    unspecified); AP = all-point area under the monotone precision-recall curve (mmdet 'area');
    a class without GT has AP NaN and is left out; mAP = mean over classes and thresholds.

'legacy' (what this project computed before MapTR's rules were adopted; kept for comparison):
  resampling every `sample_step` metres, no buffer gate, CD < threshold (strict), each
  prediction takes the closest still-free GT with CD < threshold. Otherwise as 'maptr'.

'pmapnet' (P-MapNet's released evaluation, tools/evaluate_json.py + tools/evaluation/AP.py,
  which produced the paper's mAP column): see `evaluate_pmapnet`; its DEFECTS are reproduced
  on purpose and listed in `PMAPNET_DEFECTS`, so a number can be put beside the paper's.

CLI: python -m mapkd_jax.vector_ap --pred predictions.json --gt gt.json \
         [--protocol maptr|legacy|pmapnet] [--thresholds 0.5,1.0,1.5]
"""
import argparse
import json

import cv2
import numpy as np
import shapely
from scipy import spatial

from mapkd_jax.data import schema

PROTOCOLS = ('maptr', 'legacy', 'pmapnet')

PROTOCOL = {   # the default ('maptr'), as metrics.json states it
    'name': 'maptr',
    'chamfer': '(mean nearest distance pred->GT + GT->pred) / 2 in metres, both polylines '
               'resampled to 100 points evenly spaced along their length',
    'gate': 'pairs whose 2 m flat-cap buffers do not intersect are never matched',
    'threshold_test': 'CD <= threshold',
    'sort_order': 'descending score over the whole dataset',
    'matching_scope': 'dataset-level TP/FP accumulation; per sample each prediction (descending '
                      'score) takes its closest GT overall: TP if within the threshold and '
                      'still free, else FP',
    'interpolation': 'all-point (VOC2010+ / mmdet area) under the monotone precision-recall curve',
    'empty_class': 'AP NaN when a class has no GT; excluded from mAP',
}

LEGACY_PROTOCOL = {
    'name': 'legacy',
    'chamfer': '(mean nearest distance pred->GT + GT->pred) / 2 in metres, polylines resampled '
               'every sample_step metres',
    'gate': 'none',
    'threshold_test': 'CD < threshold',
    'sort_order': 'descending score over the whole dataset',
    'matching_scope': 'dataset-level; each prediction takes the closest still-free GT within '
                      'the threshold',
    'interpolation': PROTOCOL['interpolation'],
    'empty_class': PROTOCOL['empty_class'],
}

PMAPNET_DEFECTS = (
    'confidence sorted ASCENDING: the least confident prediction is ranked first',
    'AP computed per sample and class, then averaged over the samples where the class has a '
    'prediction or a GT (a sample with predictions but no GT scores 0), not over the dataset',
    'polylines rasterized to instance masks (coordinates truncated to int pixels, cv2 thickness '
    '5) and distances taken between pixels: row * x_step and column * y_step (axes swapped; '
    'metres only when the grid is isotropic)',
    'Chamfer distance one-directional (mean over prediction pixels of the nearest GT pixel), '
    'clipped at the threshold; CD < threshold (strict)',
    'a pair needs instance-pixel IoU >= 0.1; a minimum-CD pair that fails the IoU gate still '
    'removes both from matching (both count unmatched)',
    'greedy matching by globally smallest CD within the sample, not by confidence',
    'AP = mean over recalls 0.1, 0.2, ..., 1.0 of the smoothed precision at the first point '
    'reaching that recall (10-point, no recall-0 point)',
    'instance ids share one uint8 mask per class: a later line overwrites an earlier one where '
    'they overlap, ids saturate at 255, and a line the BEV box cuts into pieces gets one id per '
    'piece but one confidence, shifting the confidences of the lines after it',
)

PMAPNET_PROTOCOL = {
    'name': 'pmapnet',
    'source': "P-MapNet's released evaluation (tools/evaluate_json.py, tools/evaluation/AP.py)",
    'purpose': "side-by-side comparison with the paper's mAP column only; its defects are "
               'reproduced on purpose',
    'defects': list(PMAPNET_DEFECTS),
}


def protocol_description(protocol):
  """The dict metrics.json states for `protocol`."""
  return {'maptr': PROTOCOL, 'legacy': LEGACY_PROTOCOL, 'pmapnet': PMAPNET_PROTOCOL}[
      check_protocol(protocol)]


def check_protocol(protocol):
  if protocol not in PROTOCOLS:
    raise ValueError(f'vector AP protocol {protocol!r} is unknown; known: {list(PROTOCOLS)} '
                     '(config.eval.ap_protocol / --protocol)')
  return protocol


# ---------------------------------------------------------------------------------------------
# Resampling and Chamfer distances.


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


def resample_fixed(points, num_points):
  """`num_points` points evenly spaced along a polyline's length (MapTR's resampling).

  Args:
    points: [N, 2] float, N >= 1.

  Returns:
    [num_points, 2] float64 (all equal to the first vertex for a zero-length polyline).
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  if len(points) == 0:
    raise ValueError('resample_fixed: empty polyline')
  seg = np.hypot(*np.diff(points, axis=0).T)
  arc = np.concatenate([[0.0], np.cumsum(seg)])
  if arc[-1] <= 0:
    return np.repeat(points[:1], num_points, axis=0)
  stations = np.linspace(0.0, arc[-1], num_points)
  # Repeated vertices (zero-length segments) would make `arc` non-increasing for np.interp.
  keep = np.concatenate([[True], seg > 0])
  return np.stack([np.interp(stations, arc[keep], points[keep, 0]),
                   np.interp(stations, arc[keep], points[keep, 1])], axis=1)


def _chamfer_pair(a, b):
  dist = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
  return 0.5 * (dist.min(axis=1).mean() + dist.min(axis=0).mean())


def chamfer_matrix(preds, gts, *, sample_step):
  """'legacy' Chamfer distances between every predicted and every GT polyline.

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


def maptr_points(polyline, num_points, *, is_prediction):
  """A polyline as MapTR scores it: [num_points, 2], or [N, 2] as given for a prediction that
  already has exactly `num_points` vertices (MapTR skips resampling it)."""
  polyline = np.asarray(polyline, np.float64).reshape(-1, 2)
  if is_prediction and len(polyline) == num_points:
    return polyline
  return resample_fixed(polyline, num_points)


def maptr_chamfer_matrix(preds, gts, *, num_points, buffer_m):
  """MapTR's gated Chamfer distances between every predicted and every GT polyline.

  Args:
    preds, gts: lists of polylines [N_i, 2] in metres, already as `maptr_points` returns them.
    num_points: points per polyline (all inputs have this many).
    buffer_m: buffer distance of the gate (flat caps, mitre joins); None = no gate.

  Returns:
    [len(preds), len(gts)] float64, inf where the gate separates the pair.
  """
  out = np.full((len(preds), len(gts)), np.inf)
  if not preds or not gts:
    return out
  if buffer_m is None:
    pairs = np.stack(np.meshgrid(np.arange(len(gts)), np.arange(len(preds)), indexing='ij'))
    gt_index, pred_index = pairs[0].ravel(), pairs[1].ravel()
  else:
    pred_buf = shapely.buffer(shapely.linestrings(np.stack(preds)), buffer_m, cap_style='flat',
                              join_style='mitre')
    gt_buf = shapely.buffer(shapely.linestrings(np.stack(gts)), buffer_m, cap_style='flat',
                            join_style='mitre')
    # STRtree query: [2, K] (index into gt_buf, index into the tree = pred_buf).
    gt_index, pred_index = shapely.STRtree(pred_buf).query(gt_buf, predicate='intersects')
  if len(gt_index) == 0:
    return out
  pred_pts, gt_pts = np.stack(preds)[pred_index], np.stack(gts)[gt_index]    # [K, P, 2]
  # Chunks of pairs: [chunk, P, P] distances stay a few MB.
  for lo in range(0, len(pred_pts), 256):
    a, b = pred_pts[lo:lo + 256], gt_pts[lo:lo + 256]
    dist = np.linalg.norm(a[:, :, None, :] - b[:, None, :, :], axis=-1)
    cd = 0.5 * (dist.min(axis=2).mean(axis=1) + dist.min(axis=1).mean(axis=1))
    out[pred_index[lo:lo + 256], gt_index[lo:lo + 256]] = cd
  return out


# ---------------------------------------------------------------------------------------------
# Matching and AP ('maptr' and 'legacy').


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
    pred_pts = [maptr_points(preds[k][0], num_points, is_prediction=True) for k in keep]
    gt_pts = [maptr_points(g, num_points, is_prediction=False) for g in gts]
    cd = maptr_chamfer_matrix(pred_pts, gt_pts, num_points=num_points, buffer_m=buffer_m)
  else:
    keep = list(range(len(preds)))
    cd = chamfer_matrix([p for p, _ in preds], list(gts), sample_step=sample_step)
  scores = np.array([preds[k][1] for k in keep], np.float64)
  return np.asarray(keep, np.int64), scores, cd


def _by_class(predictions, ground_truth, name):
  preds = {t: [(np.asarray(v['pts'], np.float64).reshape(-1, 2), float(v['score']))
               for v in items if v['cls'] == name] for t, items in predictions.items()}
  gts = {t: [np.asarray(v['pts'], np.float64).reshape(-1, 2)
             for v in ground_truth.get(t, []) if v['cls'] == name] for t in predictions}
  return preds, gts


def evaluate_vectors(predictions, ground_truth, *, class_names, thresholds, protocol='maptr',
                     sample_step=0.15, num_points=100, buffer_m=2.0, bev_x=None, bev_y=None,
                     pmapnet_thickness=5, pmapnet_iou_gate=0.1):
  """AP per class and threshold, and mAP, under `protocol`.

  Args:
    predictions: {token: [{'cls': name, 'pts': [[x, y], ...], 'score': float}, ...]}; the
      samples scored are its keys.
    ground_truth: {token: [{'cls': name, 'pts': [[x, y], ...]}, ...]}.
    class_names: the classes scored.
    thresholds: Chamfer thresholds in metres.
    protocol: 'maptr' (default), 'legacy' or 'pmapnet' (module docstring).
    sample_step: 'legacy' resampling spacing in metres.
    num_points, buffer_m: 'maptr' points per polyline and gate buffer (metres).
    bev_x, bev_y, pmapnet_thickness, pmapnet_iou_gate: 'pmapnet' only (`evaluate_pmapnet`).

  Returns:
    {'ap': {class: {str(threshold): AP}}, 'map': float, 'num_gt': {class: n},
     'num_pred': {class: n}, 'protocol': name}.
  """
  check_protocol(protocol)
  if protocol == 'pmapnet':
    if bev_x is None or bev_y is None:
      raise ValueError("vector AP protocol 'pmapnet' rasterizes polylines: give bev_x and bev_y")
    return evaluate_pmapnet(predictions, ground_truth, class_names=class_names,
                            thresholds=thresholds, bev_x=bev_x, bev_y=bev_y,
                            thickness=pmapnet_thickness, iou_gate=pmapnet_iou_gate)
  ap, num_gt_out, num_pred_out, scored = {}, {}, {}, []
  for name in class_names:
    preds, gts = _by_class(predictions, ground_truth, name)
    per_sample = [sample_distances(preds[t], gts[t], protocol=protocol, sample_step=sample_step,
                                   num_points=num_points, buffer_m=buffer_m)
                  for t in sorted(preds)]
    all_scores = np.concatenate([s for _, s, _ in per_sample]) if per_sample else np.zeros(0)
    # Stable: exact ties keep sample order (sorted tokens), then list order.
    order = np.argsort(-all_scores, kind='stable')
    num_gt = sum(len(v) for v in gts.values())
    ap[name] = {}
    for threshold in thresholds:
      flags = [match_sample(cd, s, threshold=threshold, rule=protocol)
               for _, s, cd in per_sample]
      tp = np.concatenate(flags)[order] if flags else np.zeros(0, np.int64)
      ap[name][str(float(threshold))] = average_precision(tp, num_gt)
      if num_gt:
        scored.append(ap[name][str(float(threshold))])
    num_gt_out[name] = num_gt
    num_pred_out[name] = int(sum(len(k) for k, _, _ in per_sample))
  return {'ap': ap, 'map': float(np.mean(scored)) if scored else float('nan'),
          'num_gt': num_gt_out, 'num_pred': num_pred_out, 'protocol': protocol}


# ---------------------------------------------------------------------------------------------
# 'pmapnet': P-MapNet's released evaluation, defects included on purpose (PMAPNET_DEFECTS).


def pmapnet_rasterize(vectors, *, class_names, bev_x, bev_y, thickness):
  """Instance masks of one sample's polylines, drawn as P-MapNet's evaluation draws them.

  Each polyline is clipped to the BEV box, moved to pixel units ((x - x_min) * W / (x_max -
  x_min), likewise y), truncated to int32 and drawn with cv2.polylines(thickness) on one
  uint8 mask per class, with an id counted from 1 over all classes in class order (a later
  line overwrites an earlier one; cv2 saturates ids above 255). A confidence is recorded per
  clipped line, but an id per drawn piece (the reference's misalignment, kept).

  Args:
    vectors: [{'cls', 'pts', optional 'score'}, ...] (the score defaults to 1, as there).

  Returns:
    (masks [C, H, W] uint8, confidences: list indexed by id, entry 0 = -1).
  """
  height = int(round((bev_y[1] - bev_y[0]) / bev_y[2]))
  width = int(round((bev_x[1] - bev_x[0]) / bev_x[2]))
  box = shapely.box(bev_x[0], bev_y[0], bev_x[1], bev_y[1])
  confidences, masks, next_id = [-1], [], 1
  for name in class_names:
    mask = np.zeros((height, width), np.uint8)
    for v in vectors:
      if v['cls'] != name or len(v['pts']) < 2:
        continue
      clipped = shapely.LineString(np.asarray(v['pts'], np.float64)).intersection(box)
      if clipped.is_empty:
        continue
      confidences.append(float(v.get('score', 1.0)))
      pieces = list(clipped.geoms) if hasattr(clipped, 'geoms') else [clipped]
      for piece in pieces:
        if piece.geom_type != 'LineString':   # a Point touching the box: nothing to draw
          continue
        xy = np.asarray(piece.coords, np.float64)
        # The reference's arithmetic (shift, then scale by canvas / patch size), so that
        # truncation lands on the same pixel at exact boundaries.
        pixels = np.stack([(xy[:, 0] - bev_x[0]) * (width / (bev_x[1] - bev_x[0])),
                           (xy[:, 1] - bev_y[0]) * (height / (bev_y[1] - bev_y[0]))],
                          axis=1).astype(np.int32)
        if len(pixels) < 2:
          continue
        cv2.polylines(mask, [pixels.reshape(-1, 1, 2)], False, color=next_id,
                      thickness=thickness)
        next_id += 1
    masks.append(mask)
  return np.stack(masks), confidences


def _instances(mask, scale_x, scale_y):
  """{id: ([N, 2] scaled (row * scale_x, col * scale_y) points, [N] flat pixel indices)}."""
  out = {}
  for idx in np.unique(mask):
    if idx == 0:
      continue
    rows, cols = np.nonzero(mask == idx)
    out[int(idx)] = (np.stack([rows * scale_x, cols * scale_y], axis=1).astype(np.float32),
                     rows * mask.shape[1] + cols)
  return out


def pmapnet_sample_ap(pred_inst, pred_conf, gt_inst, thresholds, *, iou_gate,
                      sampled_recalls):
  """P-MapNet's AP of one sample and class at each threshold ([T] float).

  Args:
    pred_inst, gt_inst: `_instances` dicts (ids in ascending order).
    pred_conf: confidences indexed by prediction id (-1 beyond the list).
  """
  pred_ids, gt_ids = sorted(pred_inst), sorted(gt_inst)
  num_pred, num_gt = len(pred_ids), len(gt_ids)
  cd_raw = np.zeros((num_pred, num_gt))
  iou = np.zeros((num_pred, num_gt))
  for j, g in enumerate(gt_ids):
    tree = spatial.cKDTree(gt_inst[g][0])
    for i, p in enumerate(pred_ids):
      # One-directional: prediction pixels to their nearest GT pixel.
      cd_raw[i, j] = tree.query(pred_inst[p][0])[0].astype(np.float32).mean()
      inter = len(np.intersect1d(pred_inst[p][1], gt_inst[g][1]))
      union = len(pred_inst[p][1]) + len(gt_inst[g][1]) - inter
      iou[i, j] = inter / (union + 1e-7)
  conf = {p: (pred_conf[p] if p < len(pred_conf) else -1.0) for p in pred_ids}
  out = np.zeros(len(thresholds))
  for t, threshold in enumerate(thresholds):
    cd = np.minimum(cd_raw, threshold)
    matched, pred_taken, gt_taken = [], np.zeros(num_pred, bool), np.zeros(num_gt, bool)
    if num_pred and num_gt:
      while True:
        i, j = np.unravel_index(np.argmin(cd), cd.shape)   # first minimum, row-major
        if cd[i, j] >= threshold:
          break
        if iou[i, j] >= iou_gate:
          matched.append((conf[pred_ids[i]], True, cd[i, j]))
          pred_taken[i] = gt_taken[j] = True
        cd[i, :] = threshold
        cd[:, j] = threshold
    # (confidence, has a label, CD); GT-only entries (confidence 0) are skipped when counting.
    entries = matched + [(conf[pred_ids[i]], False, threshold)
                         for i in range(num_pred) if not pred_taken[i]]
    entries += [(0.0, None, threshold) for j in range(num_gt) if not gt_taken[j]]
    entries.sort(key=lambda e: e[0])   # ASCENDING confidence (defect), stable
    flags = [1 if (label and dist < threshold) else 0 for _, label, dist in entries
             if label is not None]
    tp = np.cumsum(flags).astype(np.float32)
    precision = tp / np.arange(1, len(tp) + 1, dtype=np.float32)
    with np.errstate(divide='ignore', invalid='ignore'):
      recall = tp / np.float32(num_gt)    # NaN without GT: no recall level is reached
    smooth = np.maximum.accumulate(precision[::-1])[::-1] if len(tp) else precision
    total = 0.0
    for r in sampled_recalls:
      reached = np.flatnonzero(recall >= r)
      if len(reached):
        total += float(smooth[reached[0]])
    out[t] = total / len(sampled_recalls)
  return out


def evaluate_pmapnet(predictions, ground_truth, *, class_names, thresholds, bev_x, bev_y,
                     thickness=5, iou_gate=0.1):
  """P-MapNet's released vector AP (PMAPNET_DEFECTS), same return value as `evaluate_vectors`.

  AP[class][threshold] = mean over the samples where the class has a predicted or a GT
  instance of that sample's AP; NaN where no sample has either.
  """
  thresholds = tuple(float(t) for t in thresholds)
  sampled_recalls = np.linspace(0.1, 1.0, 10).astype(np.float32)
  sums = np.zeros((len(class_names), len(thresholds)))
  counts = np.zeros(len(class_names))
  num_gt = {name: 0 for name in class_names}
  num_pred = {name: 0 for name in class_names}
  for token in sorted(predictions):
    pred_masks, pred_conf = pmapnet_rasterize(predictions[token], class_names=class_names,
                                              bev_x=bev_x, bev_y=bev_y, thickness=thickness)
    gt_masks, _ = pmapnet_rasterize(ground_truth.get(token, []), class_names=class_names,
                                    bev_x=bev_x, bev_y=bev_y, thickness=thickness)
    for c, name in enumerate(class_names):
      pred_inst = _instances(pred_masks[c], bev_x[2], bev_y[2])
      gt_inst = _instances(gt_masks[c], bev_x[2], bev_y[2])
      num_gt[name] += len(gt_inst)
      num_pred[name] += len(pred_inst)
      if not pred_inst and not gt_inst:
        continue
      sums[c] += pmapnet_sample_ap(pred_inst, pred_conf, gt_inst, thresholds,
                                   iou_gate=iou_gate, sampled_recalls=sampled_recalls)
      counts[c] += 1
  ap, scored = {}, []
  for c, name in enumerate(class_names):
    ap[name] = {}
    for t, threshold in enumerate(thresholds):
      value = float(sums[c, t] / counts[c]) if counts[c] else float('nan')
      ap[name][str(threshold)] = value
      if counts[c]:
        scored.append(value)
  return {'ap': ap, 'map': float(np.mean(scored)) if scored else float('nan'),
          'num_gt': num_gt, 'num_pred': num_pred, 'protocol': 'pmapnet'}


# ---------------------------------------------------------------------------------------------
# Files.


def vector_file(results, *, bev_x, bev_y, class_names):
  """The predictions.json / gt.json payload: {'meta': {...}, 'results': {token: [...]}}.

  The meta (BEV range and class list) lets `load_vectors` refuse files of another setup.
  """
  return {'meta': {'bev_x': [float(v) for v in bev_x], 'bev_y': [float(v) for v in bev_y],
                   'classes': list(class_names)},
          'results': results}


def load_vectors(path, *, class_names, with_score):
  """Reads and checks a predictions/gt JSON file.

  Accepts {'meta': {'bev_x', 'bev_y', 'classes'}, 'results': {token: [vectors]}} (what
  `evaluate` writes) or a bare {token: [vectors]} (no meta to check).

  Returns:
    (results {token: [vectors]}, meta dict or None).

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
  meta = None
  if 'results' in data and isinstance(data.get('meta'), dict):
    meta, data = data['meta'], data['results']
    class_names = tuple(meta.get('classes', class_names))
  for token, items in data.items():
    if not isinstance(items, list):
      raise ValueError(f'{path}: sample {token!r}: want a list of vectors, got '
                       f'{type(items).__name__}')
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
  return data, meta


def check_same_setup(pred_path, pred_meta, gt_path, gt_meta):
  """Raises ValueError naming both files when their BEV range or class list differ."""
  if pred_meta is None or gt_meta is None:
    return
  for key in ('bev_x', 'bev_y', 'classes'):
    if pred_meta.get(key) != gt_meta.get(key):
      raise ValueError(f'{pred_path} has {key}={pred_meta.get(key)} but {gt_path} has '
                       f'{key}={gt_meta.get(key)}: predictions and ground truth of different '
                       'BEV ranges or class lists cannot be scored together')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pred', required=True, help='predictions.json written by evaluate')
  parser.add_argument('--gt', required=True, help='gt.json written by evaluate')
  parser.add_argument('--protocol', default='maptr', choices=PROTOCOLS,
                      help="'maptr' (default), 'legacy' or 'pmapnet' (module docstring)")
  parser.add_argument('--thresholds', default='0.5,1.0,1.5', help='Chamfer thresholds, metres')
  parser.add_argument('--sample_step', type=float, default=0.15,
                      help="'legacy' resampling step in metres (config.eval.sample_step)")
  parser.add_argument('--bev_x', default=None,
                      help="'pmapnet': min,max,step metres; default: the files' meta")
  parser.add_argument('--bev_y', default=None, help="'pmapnet': as --bev_x")
  args = parser.parse_args(argv)
  thresholds = tuple(float(t) for t in args.thresholds.split(','))
  preds, pred_meta = load_vectors(args.pred, class_names=schema.CLASSES, with_score=True)
  gts, gt_meta = load_vectors(args.gt, class_names=schema.CLASSES, with_score=False)
  check_same_setup(args.pred, pred_meta, args.gt, gt_meta)
  missing = sorted(set(preds) - set(gts))
  if missing:
    raise ValueError(f'{args.pred}: samples {missing[:3]} have no entry in {args.gt}')
  meta = pred_meta or gt_meta or {}
  classes = tuple(meta.get('classes', schema.CLASSES))
  bev_x = tuple(float(v) for v in args.bev_x.split(',')) if args.bev_x else meta.get('bev_x')
  bev_y = tuple(float(v) for v in args.bev_y.split(',')) if args.bev_y else meta.get('bev_y')
  if args.protocol == 'pmapnet' and (bev_x is None or bev_y is None):
    raise ValueError(f"{args.pred}: no meta with the BEV range; --protocol pmapnet needs "
                     '--bev_x and --bev_y')
  result = evaluate_vectors(preds, gts, class_names=classes, thresholds=thresholds,
                            protocol=args.protocol, sample_step=args.sample_step,
                            bev_x=bev_x, bev_y=bev_y)
  print(json.dumps({**result, 'protocol': protocol_description(args.protocol)}, indent=2))
  return result


if __name__ == '__main__':
  main()
