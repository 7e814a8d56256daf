"""Vector AP: Chamfer distance vs a loop, matching and AP against hand-computed cases."""
import json

import numpy as np
import pytest

from mapkd_jax import vector_ap

CLASSES = ('divider', 'ped_crossing', 'boundary')


def _resample_ref(points, step):
  """Walks the polyline point by point, emitting a point every `step` of arc length."""
  points = [np.asarray(p, float) for p in points]
  seg = [np.linalg.norm(b - a) for a, b in zip(points[:-1], points[1:])]
  total = sum(seg)
  if total == 0:
    return np.asarray(points[:1])
  num = int(np.ceil(total / step))
  out = []
  for k in range(num + 1):
    s = total * k / num
    for i, length in enumerate(seg):
      if s <= length or i == len(seg) - 1:
        t = 0.0 if length == 0 else min(s / length, 1.0)
        out.append(points[i] + t * (points[i + 1] - points[i]))
        break
      s -= length
  return np.asarray(out)


def _chamfer_ref(a, b, step):
  a, b = _resample_ref(a, step), _resample_ref(b, step)
  a_to_b = np.mean([min(np.linalg.norm(p - q) for q in b) for p in a])
  b_to_a = np.mean([min(np.linalg.norm(p - q) for q in a) for p in b])
  return 0.5 * (a_to_b + b_to_a)


def _random_polylines(rng, count):
  return [np.cumsum(rng.normal(size=(rng.integers(1, 6), 2)) * 2.0, axis=0) + rng.normal(size=2)
          for _ in range(count)]


@pytest.mark.parametrize('num_pred,num_gt,step', [(1, 1, 0.5), (3, 4, 0.3), (5, 2, 1.0),
                                                  (0, 3, 0.5), (2, 0, 0.5)])
def test_chamfer_matrix_matches_loop(num_pred, num_gt, step):
  rng = np.random.default_rng(num_pred * 10 + num_gt)
  preds, gts = _random_polylines(rng, num_pred), _random_polylines(rng, num_gt)
  got = vector_ap.chamfer_matrix(preds, gts, sample_step=step)
  want = np.array([[_chamfer_ref(p, g, step) for g in gts] for p in preds]).reshape(num_pred,
                                                                                    num_gt)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_chamfer_of_parallel_lines_is_their_offset():
  a = np.array([[0.0, 0.0], [10.0, 0.0]])
  got = vector_ap.chamfer_matrix([a], [a + [0.0, 0.7], a], sample_step=0.1)
  np.testing.assert_allclose(got, [[0.7, 0.0]], atol=1e-9)


def _ap_ref(tp, num_gt):
  """Textbook all-point AP: for each recall level, the best precision at that or higher recall."""
  precisions, recalls, hits = [], [], 0
  for i, t in enumerate(tp):
    hits += t
    precisions.append(hits / (i + 1))
    recalls.append(hits / num_gt)
  ap, last_recall = 0.0, 0.0
  for i in range(len(tp)):
    if recalls[i] > last_recall:
      ap += (recalls[i] - last_recall) * max(precisions[i:])
      last_recall = recalls[i]
  return ap


@pytest.mark.parametrize('seed', range(6))
def test_average_precision_matches_reference(seed):
  rng = np.random.default_rng(seed)
  tp = rng.integers(0, 2, size=rng.integers(1, 30))
  num_gt = int(tp.sum() + rng.integers(0, 4)) or 1
  assert vector_ap.average_precision(tp, num_gt) == pytest.approx(_ap_ref(tp, num_gt))


def _line(y, x0=0.0, x1=10.0):
  return [[x0, y], [x1, y]]


def _evaluate(preds, gts, thresholds=(0.5, 1.0, 1.5)):
  return vector_ap.evaluate_vectors(preds, gts, class_names=CLASSES, thresholds=thresholds,
                                    sample_step=0.25)


def _gt_world():
  return {'s1': [{'cls': 'divider', 'pts': _line(0.0)}, {'cls': 'divider', 'pts': _line(5.0)},
                 {'cls': 'boundary', 'pts': _line(-8.0)}],
          's2': [{'cls': 'divider', 'pts': _line(3.0)},
                 {'cls': 'ped_crossing', 'pts': [[2.0, 1.0], [2.0, 4.0]]}]}


def test_ground_truth_as_predictions_gives_ap_one():
  gts = _gt_world()
  preds = {t: [{**v, 'score': 0.5 + 0.1 * i} for i, v in enumerate(items)]
           for t, items in gts.items()}
  result = _evaluate(preds, gts)
  for name in CLASSES:
    assert result['ap'][name] == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}
  assert result['map'] == 1.0


def test_no_predictions_gives_ap_zero():
  result = _evaluate({'s1': [], 's2': []}, _gt_world())
  assert all(v == 0.0 for ap in result['ap'].values() for v in ap.values())
  assert result['map'] == 0.0


def test_class_without_ground_truth_is_nan_and_left_out_of_map():
  gts = {'s1': [{'cls': 'divider', 'pts': _line(0.0)}]}
  preds = {'s1': [{'cls': 'divider', 'pts': _line(0.0), 'score': 0.9},
                  {'cls': 'boundary', 'pts': _line(3.0), 'score': 0.9}]}
  result = _evaluate(preds, gts)
  assert np.isnan(result['ap']['boundary']['1.0'])
  assert result['map'] == 1.0


def test_high_score_false_positive_costs_exact_amount():
  # Two GT dividers found exactly (scores 0.8, 0.7) plus a far false positive at 0.9.
  # Ranked: FP, TP, TP -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1; monotone precision
  # 2/3 at both recall steps -> AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3 (it was 1 without the FP).
  gts = {'s': [{'cls': 'divider', 'pts': _line(0.0)}, {'cls': 'divider', 'pts': _line(5.0)}]}
  preds = {'s': [{'cls': 'divider', 'pts': _line(0.0), 'score': 0.8},
                 {'cls': 'divider', 'pts': _line(5.0), 'score': 0.7},
                 {'cls': 'divider', 'pts': _line(20.0), 'score': 0.9}]}
  result = _evaluate(preds, gts)
  for value in result['ap']['divider'].values():
    assert value == pytest.approx(2.0 / 3.0)
  # A low-score false positive (ranked last) costs nothing.
  preds['s'][2]['score'] = 0.1
  assert _evaluate(preds, gts)['ap']['divider']['0.5'] == pytest.approx(1.0)


def test_descending_order_is_used_not_ascending():
  # One GT; a TP at 0.9 and an FP at 0.1. Descending: TP first -> AP 1. Ascending (the
  # HDMapNet bug) would rank the FP first -> precision 0, 1/2 -> AP 1/2.
  gts = {'s': [{'cls': 'divider', 'pts': _line(0.0)}]}
  preds = {'s': [{'cls': 'divider', 'pts': _line(0.0), 'score': 0.9},
                 {'cls': 'divider', 'pts': _line(30.0), 'score': 0.1}]}
  assert _evaluate(preds, gts)['ap']['divider']['1.0'] == pytest.approx(1.0)
  flipped = {'s': [{**v, 'score': 1.0 - v['score']} for v in preds['s']]}
  assert _evaluate(flipped, gts)['ap']['divider']['1.0'] == pytest.approx(0.5)


def test_dataset_level_not_per_sample_average():
  # Sample A: TP at 0.9. Sample B: FP at 0.95, TP at 0.2. Whole dataset ranks FP, TP, TP:
  # precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> AP 2/3. Averaging per sample would give
  # (1 + 1/2) / 2 = 3/4.
  gts = {'a': [{'cls': 'divider', 'pts': _line(0.0)}], 'b': [{'cls': 'divider', 'pts': _line(0.0)}]}
  preds = {'a': [{'cls': 'divider', 'pts': _line(0.0), 'score': 0.9}],
           'b': [{'cls': 'divider', 'pts': _line(40.0), 'score': 0.95},
                 {'cls': 'divider', 'pts': _line(0.0), 'score': 0.2}]}
  assert _evaluate(preds, gts)['ap']['divider']['1.0'] == pytest.approx(2.0 / 3.0)


def test_each_gt_matched_once_and_thresholds_apply():
  # Two predictions on one GT: the second is a duplicate (FP). A prediction 0.75 m off is a
  # TP at 1.0 and 1.5 m but not at 0.5 m.
  gts = {'s': [{'cls': 'divider', 'pts': _line(0.0)}, {'cls': 'divider', 'pts': _line(10.0)}]}
  preds = {'s': [{'cls': 'divider', 'pts': _line(0.0), 'score': 0.9},
                 {'cls': 'divider', 'pts': _line(0.1), 'score': 0.8},
                 {'cls': 'divider', 'pts': _line(10.75), 'score': 0.7}]}
  ap = _evaluate(preds, gts)['ap']['divider']
  # 0.5 m: TP, FP, FP -> AP = 1/2 * 1. 1.0 m: TP, FP, TP -> 1/2 * 1 + 1/2 * 2/3.
  assert ap['0.5'] == pytest.approx(0.5)
  assert ap['1.0'] == pytest.approx(0.5 + 1.0 / 3.0)
  assert ap['1.5'] == pytest.approx(0.5 + 1.0 / 3.0)


def test_cli_recomputes_ap_and_rejects_unknown_class(tmp_path, capsys):
  gts = _gt_world()
  preds = {t: [{**v, 'score': 0.9} for v in items] for t, items in gts.items()}
  pred_path, gt_path = tmp_path / 'predictions.json', tmp_path / 'gt.json'
  pred_path.write_text(json.dumps(preds))
  gt_path.write_text(json.dumps(gts))
  result = vector_ap.main(['--pred', str(pred_path), '--gt', str(gt_path)])
  assert result['map'] == 1.0
  assert '"map": 1.0' in capsys.readouterr().out
  preds['s2'][0]['cls'] = 'lane_marking'
  pred_path.write_text(json.dumps(preds))
  with pytest.raises(ValueError, match=r"predictions.json: sample 's2' .*'lane_marking'"):
    vector_ap.main(['--pred', str(pred_path), '--gt', str(gt_path)])
  with pytest.raises(FileNotFoundError, match='missing.json'):
    vector_ap.main(['--pred', str(tmp_path / 'missing.json'), '--gt', str(gt_path)])
