"""'pmapnet': P-MapNet's released vector AP (tools/evaluate_json.py + tools/evaluation/AP.py).

Its defects (protocols.PMAPNET_DEFECTS) are reproduced on purpose, so that a number can be
put beside the paper's mAP column; the default protocol is 'maptr' (protocols.py).
"""
import cv2
import numpy as np
import shapely
from scipy import spatial


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


def sample_record(pred_vectors, gt_vectors, *, class_names, thresholds, bev_x, bev_y,
                  thickness=5, iou_gate=0.1):
  """One sample's share of P-MapNet's AP: {class: {'ap': [T] or None, 'num_gt', 'num_pred'}}.

  'ap' is None where the sample has neither a predicted nor a GT instance of the class (the
  sample then does not count in that class' mean).
  """
  thresholds = tuple(float(t) for t in thresholds)
  sampled_recalls = np.linspace(0.1, 1.0, 10).astype(np.float32)
  pred_masks, pred_conf = pmapnet_rasterize(pred_vectors, class_names=class_names,
                                            bev_x=bev_x, bev_y=bev_y, thickness=thickness)
  gt_masks, _ = pmapnet_rasterize(gt_vectors, class_names=class_names, bev_x=bev_x, bev_y=bev_y,
                                  thickness=thickness)
  record = {}
  for c, name in enumerate(class_names):
    pred_inst = _instances(pred_masks[c], bev_x[2], bev_y[2])
    gt_inst = _instances(gt_masks[c], bev_x[2], bev_y[2])
    ap = None
    if pred_inst or gt_inst:
      ap = pmapnet_sample_ap(pred_inst, pred_conf, gt_inst, thresholds, iou_gate=iou_gate,
                             sampled_recalls=sampled_recalls).tolist()
    record[name] = {'ap': ap, 'num_gt': len(gt_inst), 'num_pred': len(pred_inst)}
  return record


def combine_records(records, *, class_names, thresholds):
  """P-MapNet's AP from {token: `sample_record`}, same return value as `ap.evaluate_vectors`.

  AP[class][threshold] = mean over the samples where the class has a predicted or a GT
  instance of that sample's AP; NaN where no sample has either. Sums run over the samples
  in sorted token order, so any split of the records gives the same floating-point result.
  """
  thresholds = tuple(float(t) for t in thresholds)
  sums = np.zeros((len(class_names), len(thresholds)))
  counts = np.zeros(len(class_names))
  num_gt = {name: 0 for name in class_names}
  num_pred = {name: 0 for name in class_names}
  for token in sorted(records):
    for c, name in enumerate(class_names):
      rec = records[token][name]
      num_gt[name] += rec['num_gt']
      num_pred[name] += rec['num_pred']
      if rec['ap'] is not None:
        sums[c] += np.asarray(rec['ap'], np.float64)
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
