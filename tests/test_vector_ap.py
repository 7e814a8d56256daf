"""Vector AP: Chamfer distance vs a loop, matching and AP against hand-computed cases."""
import json

import numpy as np
import pytest

from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import chamfer
from mapkd_jax.eval import cli
from mapkd_jax.eval import files
from mapkd_jax.eval import matching
from mapkd_jax.eval import pmapnet

CLASSES = ('divider', 'ped_crossing', 'boundary')


def _walk_ref(points, stations):
  """The points at the arc lengths `stations(total length)`, found by walking the segments one
  by one (the loop reference of both resampling rules)."""
  points = [np.asarray(p, float) for p in points]
  seg = [np.linalg.norm(b - a) for a, b in zip(points[:-1], points[1:])]
  out = []
  for s in stations(sum(seg)):
    for i, length in enumerate(seg):
      if s <= length or i == len(seg) - 1:
        t = 0.0 if length == 0 else min(s / length, 1.0)
        out.append(points[i] + t * (points[i + 1] - points[i]))
        break
      s -= length
  return np.asarray(out)


def _resample_ref(points, step):
  """A point every `step` of arc length (the last interval shortened to end on the end)."""
  points = [np.asarray(p, float) for p in points]
  if sum(np.linalg.norm(b - a) for a, b in zip(points[:-1], points[1:])) == 0:
    return np.asarray(points[:1])   # a point, not a line: itself

  def stations(total):
    num = int(np.ceil(total / step))
    return [total * k / num for k in range(num + 1)]
  return _walk_ref(points, stations)


def _chamfer_ref(a, b, step):
  return _chamfer_points_ref(_resample_ref(a, step), _resample_ref(b, step))


def _chamfer_points_ref(a, b):
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
  got = chamfer.chamfer_matrix(preds, gts, sample_step=step)
  want = np.array([[_chamfer_ref(p, g, step) for g in gts] for p in preds]).reshape(num_pred,
                                                                                    num_gt)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_chamfer_of_parallel_lines_is_their_offset():
  a = np.array([[0.0, 0.0], [10.0, 0.0]])
  got = chamfer.chamfer_matrix([a], [a + [0.0, 0.7], a], sample_step=0.1)
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
  assert matching.average_precision(tp, num_gt) == pytest.approx(_ap_ref(tp, num_gt))


def _line(y, x0=0.0, x1=10.0):
  return [[x0, y], [x1, y]]


def _evaluate(preds, gts, thresholds=(0.5, 1.0, 1.5)):
  return ap_lib.evaluate_vectors(preds, gts, class_names=CLASSES, thresholds=thresholds,
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
  result = cli.main(['--pred', str(pred_path), '--gt', str(gt_path)])
  assert result['map'] == 1.0
  assert '"map": 1.0' in capsys.readouterr().out
  preds['s2'][0]['cls'] = 'lane_marking'
  pred_path.write_text(json.dumps(preds))
  with pytest.raises(ValueError, match=r"predictions.json: sample 's2' .*'lane_marking'"):
    cli.main(['--pred', str(pred_path), '--gt', str(gt_path)])
  with pytest.raises(FileNotFoundError, match='missing.json'):
    cli.main(['--pred', str(tmp_path / 'missing.json'), '--gt', str(gt_path)])


# --- MapTR's rules (the default protocol) against the previous ('legacy') ones -----------------


def _resample_fixed_ref(points, num):
  """`num` stations evenly spaced along the arc."""
  return _walk_ref(points, lambda total: [total * k / (num - 1) for k in range(num)])


@pytest.mark.parametrize('seed', range(3))
def test_maptr_chamfer_matches_loop_without_and_with_gate(seed):
  rng = np.random.default_rng(100 + seed)
  # Segments of 2+ vertices, some far apart so that the 2 m gate separates them.
  preds = [np.cumsum(rng.normal(size=(rng.integers(2, 5), 2)), axis=0) + rng.normal(size=2) * 6
           for _ in range(4)]
  gts = [np.cumsum(rng.normal(size=(rng.integers(2, 5), 2)), axis=0) + rng.normal(size=2) * 6
         for _ in range(3)]
  num = 20
  a = [chamfer.resample_fixed(p, num) for p in preds]
  b = [chamfer.resample_fixed(g, num) for g in gts]
  for got, ref in zip(a + b, preds + gts):
    np.testing.assert_allclose(got, _resample_fixed_ref(ref, num), atol=1e-9)
  want = np.array([[_chamfer_points_ref(_resample_fixed_ref(p, num), _resample_fixed_ref(g, num))
                    for g in gts] for p in preds])
  np.testing.assert_allclose(chamfer.maptr_chamfer_matrix(a, b, num_points=num, buffer_m=None),
                             want, rtol=1e-9)
  gated = chamfer.maptr_chamfer_matrix(a, b, num_points=num, buffer_m=2.0)
  import shapely
  for i, p in enumerate(a):
    for j, g in enumerate(b):
      apart = not shapely.LineString(p).buffer(2.0, cap_style='flat', join_style='mitre') \
          .intersects(shapely.LineString(g).buffer(2.0, cap_style='flat', join_style='mitre'))
      assert gated[i, j] == (np.inf if apart else pytest.approx(want[i, j]))


def _one_class_ap(preds, gts, protocol):
  return ap_lib.evaluate_vectors({'s': preds}, {'s': gts}, class_names=CLASSES,
                                    thresholds=(0.5, 1.0, 1.5), protocol=protocol,
                                    sample_step=0.15)['ap']['divider']


def _div(pts, score=None):
  return {'cls': 'divider', 'pts': pts, **({} if score is None else {'score': score})}


def test_a_resampling_to_100_points_changes_ap():
  # GT (0,0)-(198,0): 100 points every 2 m at x = 0, 2, ..., 198. The prediction is the same
  # line shifted 0.8 m along x: 100 points at 0.8, 2.8, ..., 198.8. Every point's nearest
  # point of the other line is 0.8 m away (0.8 < 2 - 0.8), so MapTR's CD = 0.8 exactly:
  # FP at 0.5 m (AP 0), TP at 1.0 and 1.5 m (AP 1). Resampled every 0.15 m instead, interior
  # points are at most 0.075 m from the other line and only the 0.8 m overhangs at the ends
  # are far: CD ~ 0.05, a TP at every threshold (AP 1, 1, 1).
  gts, preds = [_div([[0.0, 0.0], [198.0, 0.0]])], [_div([[0.8, 0.0], [198.8, 0.0]], 0.9)]
  a = chamfer.resample_fixed(preds[0]['pts'], 100)
  b = chamfer.resample_fixed(gts[0]['pts'], 100)
  assert chamfer.maptr_chamfer_matrix([a], [b], num_points=100, buffer_m=2.0)[0, 0] == \
      pytest.approx(0.8, abs=1e-9)
  assert chamfer.chamfer_matrix([np.asarray(preds[0]['pts'])], [np.asarray(gts[0]['pts'])],
                                  sample_step=0.15)[0, 0] < 0.1
  assert _one_class_ap(preds, gts, 'maptr') == {'0.5': 0.0, '1.0': 1.0, '1.5': 1.0}
  assert _one_class_ap(preds, gts, 'legacy') == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}


def test_b_flat_cap_buffer_gate_changes_ap():
  # GT (0,0)-(0.1,0), prediction (0.2,0)-(0.3,0): end to end, 0.1 m apart. With 100 points
  # each, pred->GT distances run 0.1 .. 0.2 (mean 0.15) and GT->pred 0.2 .. 0.1 (mean 0.15):
  # CD = 0.15, within every threshold. But flat caps stop the 2 m buffers at the line ends
  # (x in [0, 0.1] and [0.2, 0.3]): they do not intersect, so MapTR never matches the pair
  # (FP: AP 0 at every threshold); without the gate (legacy) it is a TP (AP 1).
  gts, preds = [_div([[0.0, 0.0], [0.1, 0.0]])], [_div([[0.2, 0.0], [0.3, 0.0]], 0.9)]
  a = chamfer.resample_fixed(preds[0]['pts'], 100)
  b = chamfer.resample_fixed(gts[0]['pts'], 100)
  assert chamfer.maptr_chamfer_matrix([a], [b], num_points=100, buffer_m=None)[0, 0] == \
      pytest.approx(0.15)
  assert chamfer.maptr_chamfer_matrix([a], [b], num_points=100, buffer_m=2.0)[0, 0] == np.inf
  assert _one_class_ap(preds, gts, 'maptr') == {'0.5': 0.0, '1.0': 0.0, '1.5': 0.0}
  assert _one_class_ap(preds, gts, 'legacy') == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}


def test_c_threshold_is_inclusive():
  # Prediction 0.5 m beside a 10 m GT, same x stations: every nearest distance is exactly 0.5,
  # CD = 0.5. MapTR counts CD <= 0.5 as a TP (AP 1 at 0.5 m); a strict CD < 0.5 does not
  # (legacy: AP 0 at 0.5 m, 1 at 1.0 and 1.5 m).
  gts, preds = [_div([[0.0, 0.0], [10.0, 0.0]])], [_div([[0.0, 0.5], [10.0, 0.5]], 0.9)]
  assert _one_class_ap(preds, gts, 'maptr') == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}
  assert _one_class_ap(preds, gts, 'legacy') == {'0.5': 0.0, '1.0': 1.0, '1.5': 1.0}


def test_d_closest_gt_overall_not_closest_free():
  # GTs A at y=0 and B at y=0.8 (x 0..10). p1 (score 0.9) lies on A (CD 0): TP. p2 (0.8) at
  # y=0.1: CD 0.1 to A, 0.7 to B. MapTR gives p2 its closest GT overall, A, already taken:
  # FP at every threshold -> TP, FP with 2 GTs: precision 1 at recall 1/2 -> AP 0.5.
  # Closest-free (legacy) gives p2 B when 0.7 is within the threshold: at 1.0 and 1.5 m
  # TP, TP -> AP 1; at 0.5 m B is out of reach -> AP 0.5 as well.
  gts = [_div([[0.0, 0.0], [10.0, 0.0]]), _div([[0.0, 0.8], [10.0, 0.8]])]
  preds = [_div([[0.0, 0.0], [10.0, 0.0]], 0.9), _div([[0.0, 0.1], [10.0, 0.1]], 0.8)]
  assert _one_class_ap(preds, gts, 'maptr') == pytest.approx({'0.5': 0.5, '1.0': 0.5, '1.5': 0.5})
  assert _one_class_ap(preds, gts, 'legacy') == pytest.approx({'0.5': 0.5, '1.0': 1.0,
                                                               '1.5': 1.0})


def test_maptr_drops_single_point_predictions_and_keeps_100_vertex_ones():
  gts = [_div([[0.0, 0.0], [10.0, 0.0]])]
  # A one-vertex prediction is not scored at all (not even as an FP).
  result = ap_lib.evaluate_vectors({'s': [_div([[0.0, 0.0]], 0.99), _div(gts[0]['pts'], 0.5)]},
                                      {'s': gts}, class_names=CLASSES, thresholds=(0.5,))
  assert result['ap']['divider']['0.5'] == 1.0 and result['num_pred']['divider'] == 1
  # A 100-vertex prediction is used as given: all vertices bunched at x=0 except the last.
  bunched = np.concatenate([np.zeros((99, 2)), [[10.0, 0.0]]])
  assert chamfer.maptr_points(bunched, 100, is_prediction=True) is not None
  np.testing.assert_array_equal(chamfer.maptr_points(bunched, 100, is_prediction=True), bunched)
  np.testing.assert_allclose(chamfer.maptr_points(bunched, 100, is_prediction=False)[:, 0],
                             np.linspace(0, 10, 100))


# --- P-MapNet's released protocol (defects on purpose) -----------------------------------------

# A 20 x 10 grid of 1 m pixels; thickness 1 draws one-pixel lines, so instances are easy to
# count by hand. The row of y = 2.5 is row 2; x = 2.5 .. 15.5 covers columns 2 .. 15.
PM_X, PM_Y = (0.0, 20.0, 1.0), (0.0, 10.0, 1.0)


def _pmapnet(preds, gts):
  return ap_lib.evaluate_vectors(preds, gts, class_names=CLASSES, thresholds=(0.5, 1.0, 1.5),
                                    protocol='pmapnet', bev_x=PM_X, bev_y=PM_Y,
                                    pmapnet_thickness=1)


def _maptr(preds, gts):
  return ap_lib.evaluate_vectors(preds, gts, class_names=CLASSES, thresholds=(0.5, 1.0, 1.5))


LINE = [[2.5, 2.5], [15.5, 2.5]]


def test_pmapnet_rasterizes_like_the_reference():
  masks, conf = pmapnet.pmapnet_rasterize(
      [_div(LINE, 0.7), {'cls': 'boundary', 'pts': [[2.9, 7.9], [2.9, 9.9], [30.0, 9.9]],
                         'score': 0.4}],
      class_names=CLASSES, bev_x=PM_X, bev_y=PM_Y, thickness=1)
  assert masks.shape == (3, 10, 20) and masks.dtype == np.uint8
  want = np.zeros((10, 20), np.uint8)
  want[2, 2:16] = 1
  np.testing.assert_array_equal(masks[0], want)
  # Clipped at x = 20 (the box), truncated: column 2 rows 7..9, then row 9 columns 2..19 (the
  # clip point x=20 maps to column 20, off the canvas); id 2 continues the count over classes.
  want = np.zeros((10, 20), np.uint8)
  want[7:10, 2] = 2
  want[9, 2:20] = 2
  np.testing.assert_array_equal(masks[2], want)
  assert conf == [-1, 0.7, 0.4]


def test_pmapnet_sorts_confidence_ascending():
  # One GT; an exact copy (0.9) and a far FP (0.1, 5 rows away: CD 5, IoU 0). Ascending order
  # ranks the FP first: precision 0 then 1/2 at recall 0 then 1; smoothed 1/2 at every
  # sampled recall 0.1..1.0 -> AP 0.5. MapTR (descending): TP first -> AP 1.
  gts = {'s': [_div(LINE)]}
  preds = {'s': [_div(LINE, 0.9), _div([[2.5, 7.5], [15.5, 7.5]], 0.1)]}
  assert _pmapnet(preds, gts)['ap']['divider'] == pytest.approx({'0.5': 0.5, '1.0': 0.5,
                                                                 '1.5': 0.5})
  assert _maptr(preds, gts)['ap']['divider'] == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}


def test_pmapnet_averages_per_sample():
  # Sample a: GT and its exact copy (AP 1). Sample b: no GT, one prediction: scored AP 0 and
  # counted. Per-sample mean 0.5; over the dataset (MapTR) the FP ranks after the TP: AP 1.
  gts = {'a': [_div(LINE)], 'b': []}
  preds = {'a': [_div(LINE, 0.9)], 'b': [_div([[2.5, 7.5], [15.5, 7.5]], 0.5)]}
  assert _pmapnet(preds, gts)['ap']['divider'] == pytest.approx({'0.5': 0.5, '1.0': 0.5,
                                                                 '1.5': 0.5})
  assert _maptr(preds, gts)['ap']['divider'] == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}
  # A sample where the class has neither prediction nor GT is not counted.
  gts['c'], preds['c'] = [], []
  assert _pmapnet(preds, gts)['ap']['divider']['1.0'] == pytest.approx(0.5)


def test_pmapnet_iou_gate_and_one_directional_chamfer():
  # Prediction one row below the GT: every prediction pixel is 1 m from the GT (CD 1.0 < 1.5)
  # but the one-pixel lines do not overlap (IoU 0 < 0.1): never matched -> AP 0. MapTR: CD 1.0
  # -> TP at 1.0 and 1.5 m.
  gts = {'s': [_div(LINE)]}
  below = {'s': [_div([[2.5, 3.5], [15.5, 3.5]], 0.9)]}
  assert _pmapnet(below, gts)['ap']['divider'] == {'0.5': 0.0, '1.0': 0.0, '1.5': 0.0}
  assert _maptr(below, gts)['ap']['divider'] == {'0.5': 0.0, '1.0': 1.0, '1.5': 1.0}
  # A 4-pixel piece on top of the 14-pixel GT: one-directional CD (prediction -> GT) is 0 and
  # IoU 4/14 >= 0.1 -> TP, AP 1. MapTR's symmetric CD: GT->pred distances are 0 over 3 of the
  # 13 m and average 5 m over the other 10 -> about 3.85 / 2 = 1.92 > 1.5 -> AP 0.
  piece = {'s': [_div([[2.5, 2.5], [5.5, 2.5]], 0.9)]}
  assert _pmapnet(piece, gts)['ap']['divider'] == {'0.5': 1.0, '1.0': 1.0, '1.5': 1.0}
  assert _maptr(piece, gts)['ap']['divider'] == {'0.5': 0.0, '1.0': 0.0, '1.5': 0.0}


def test_cli_protocols_and_mismatched_setup(tmp_path, capsys):
  gts = {'s': [_div(LINE)]}
  preds = {'s': [_div(LINE, 0.9), _div([[2.5, 7.5], [15.5, 7.5]], 0.1)]}
  pred_path, gt_path = tmp_path / 'predictions.json', tmp_path / 'gt.json'
  pred_path.write_text(json.dumps(files.vector_file(preds, bev_x=PM_X, bev_y=PM_Y,
                                                        class_names=CLASSES)))
  gt_path.write_text(json.dumps(files.vector_file(gts, bev_x=PM_X, bev_y=PM_Y,
                                                      class_names=CLASSES)))
  assert cli.main(['--pred', str(pred_path), '--gt', str(gt_path)])['map'] == 1.0
  pm = cli.main(['--pred', str(pred_path), '--gt', str(gt_path), '--protocol', 'pmapnet'])
  assert pm['protocol'] == 'pmapnet' and '"defects"' in capsys.readouterr().out
  other = tmp_path / 'gt_120.json'
  other.write_text(json.dumps(files.vector_file(gts, bev_x=(0.0, 40.0, 2.0), bev_y=PM_Y,
                                                    class_names=CLASSES)))
  with pytest.raises(ValueError, match=r'predictions\.json has bev_x=.*gt_120\.json has bev_x'):
    cli.main(['--pred', str(pred_path), '--gt', str(other)])
  other.write_text(json.dumps(files.vector_file(gts, bev_x=PM_X, bev_y=PM_Y,
                                                    class_names=('divider', 'boundary'))))
  with pytest.raises(ValueError, match=r'predictions\.json has classes=.*gt_120\.json has class'):
    cli.main(['--pred', str(pred_path), '--gt', str(other)])
  with pytest.raises(ValueError, match="protocol 'hdmapnet' is unknown"):
    ap_lib.evaluate_vectors(preds, gts, class_names=CLASSES, thresholds=(1.0,),
                               protocol='hdmapnet')
