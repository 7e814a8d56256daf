"""AP per class and threshold, and mAP, of predicted polylines under a named protocol.

The protocols are described in protocols.py; Chamfer distances in chamfer.py, the per-sample
matching in matching.py, P-MapNet's evaluation in pmapnet.py.

Every protocol's AP is a function of per-sample accumulators: `sample_record` scores ONE
sample (its predictions' scores and TP flags per class and threshold, its GT and prediction
counts; for 'pmapnet' its per-sample AP), and `combine_records` turns {token: record} into AP.
The combination visits the samples in sorted token order, so records computed anywhere (a
worker pool, other processes or hosts) and merged give exactly the one-process result.
Records hold only lists, floats, ints and None: JSON round-trips them exactly.
"""
import numpy as np

from mapkd_jax.eval import matching
from mapkd_jax.eval import pmapnet
from mapkd_jax.eval import protocols


def _of_class(vectors, name, *, with_score):
  if with_score:
    return [(np.asarray(v['pts'], np.float64).reshape(-1, 2), float(v['score']))
            for v in vectors if v['cls'] == name]
  return [np.asarray(v['pts'], np.float64).reshape(-1, 2) for v in vectors if v['cls'] == name]


def sample_record(pred_vectors, gt_vectors, *, class_names, thresholds, protocol='maptr',
                  sample_step=0.15, num_points=100, buffer_m=2.0, bev_x=None, bev_y=None,
                  pmapnet_thickness=5, pmapnet_iou_gate=0.1):
  """One sample's AP accumulators under `protocol`.

  Args:
    pred_vectors: [{'cls': name, 'pts': [[x, y], ...], 'score': float}, ...].
    gt_vectors: [{'cls': name, 'pts': [[x, y], ...]}, ...].
    Others: as `evaluate_vectors`.

  Returns:
    'maptr' / 'legacy': {class: {'scores': [P] floats (kept predictions, list order),
    'tp': [T][P] 0/1 flags, 'num_gt': int, 'num_pred': int}};
    'pmapnet': `pmapnet.sample_record`.
  """
  protocols.check_protocol(protocol)
  if protocol == 'pmapnet':
    if bev_x is None or bev_y is None:
      raise ValueError("vector AP protocol 'pmapnet' rasterizes polylines: give bev_x and bev_y")
    return pmapnet.sample_record(pred_vectors, gt_vectors, class_names=class_names,
                                 thresholds=thresholds, bev_x=bev_x, bev_y=bev_y,
                                 thickness=pmapnet_thickness, iou_gate=pmapnet_iou_gate)
  record = {}
  for name in class_names:
    gts = _of_class(gt_vectors, name, with_score=False)
    keep, scores, cd = matching.sample_distances(
        _of_class(pred_vectors, name, with_score=True), gts, protocol=protocol,
        sample_step=sample_step, num_points=num_points, buffer_m=buffer_m)
    record[name] = {
        'scores': [float(s) for s in scores],
        'tp': [matching.match_sample(cd, scores, threshold=threshold, rule=protocol).tolist()
               for threshold in thresholds],
        'num_gt': len(gts), 'num_pred': len(keep)}
  return record


def combine_records(records, *, class_names, thresholds, protocol='maptr'):
  """AP per class and threshold, and mAP, from {token: `sample_record`} (`evaluate_vectors`)."""
  protocols.check_protocol(protocol)
  if protocol == 'pmapnet':
    return pmapnet.combine_records(records, class_names=class_names, thresholds=thresholds)
  tokens = sorted(records)
  ap, num_gt_out, num_pred_out, scored = {}, {}, {}, []
  for name in class_names:
    per_sample = [records[t][name] for t in tokens]
    all_scores = np.asarray([s for r in per_sample for s in r['scores']], np.float64)
    # Stable: exact ties keep sample order (sorted tokens), then list order.
    order = np.argsort(-all_scores, kind='stable')
    num_gt = sum(r['num_gt'] for r in per_sample)
    ap[name] = {}
    for t, threshold in enumerate(thresholds):
      tp = np.asarray([f for r in per_sample for f in r['tp'][t]], np.int64)[order]
      ap[name][str(float(threshold))] = matching.average_precision(tp, num_gt)
      if num_gt:
        scored.append(ap[name][str(float(threshold))])
    num_gt_out[name] = num_gt
    num_pred_out[name] = int(sum(r['num_pred'] for r in per_sample))
  return {'ap': ap, 'map': float(np.mean(scored)) if scored else float('nan'),
          'num_gt': num_gt_out, 'num_pred': num_pred_out, 'protocol': protocol}


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
    protocol: 'maptr' (default), 'legacy' or 'pmapnet' (protocols.py).
    sample_step: 'legacy' resampling spacing in metres.
    num_points, buffer_m: 'maptr' points per polyline and gate buffer (metres).
    bev_x, bev_y, pmapnet_thickness, pmapnet_iou_gate: 'pmapnet' only (pmapnet.py).

  Returns:
    {'ap': {class: {str(threshold): AP}}, 'map': float, 'num_gt': {class: n},
     'num_pred': {class: n}, 'protocol': name}.
  """
  protocols.check_protocol(protocol)
  if protocol == 'pmapnet' and (bev_x is None or bev_y is None):
    raise ValueError("vector AP protocol 'pmapnet' rasterizes polylines: give bev_x and bev_y")
  kwargs = dict(class_names=class_names, thresholds=thresholds, protocol=protocol,
                sample_step=sample_step, num_points=num_points, buffer_m=buffer_m, bev_x=bev_x,
                bev_y=bev_y, pmapnet_thickness=pmapnet_thickness,
                pmapnet_iou_gate=pmapnet_iou_gate)
  records = {t: sample_record(predictions[t], ground_truth.get(t, []), **kwargs)
             for t in predictions}
  return combine_records(records, class_names=class_names, thresholds=thresholds,
                         protocol=protocol)
