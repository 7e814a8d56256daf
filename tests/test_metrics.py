"""mIoU counting vs a per-pixel Python loop."""
import numpy as np
import pytest

from mapkd_jax.eval import metrics


def _iou_counts_ref(pred, gt, num_classes):
  inter = np.zeros(num_classes, np.int64)
  union = np.zeros(num_classes, np.int64)
  for p, g in zip(pred.reshape(-1), gt.reshape(-1)):
    for c in range(num_classes):
      inter[c] += (p == c) and (g == c)
      union[c] += (p == c) or (g == c)
  return inter, union


@pytest.mark.parametrize('shape', [(1, 3, 4), (2, 5, 7)])
def test_iou_counts_match_loop(shape):
  rng = np.random.default_rng(0)
  pred = rng.integers(0, 4, shape)
  gt = rng.integers(0, 4, shape)
  inter, union = metrics.iou_counts(pred, gt, num_classes=4)
  inter_ref, union_ref = _iou_counts_ref(pred, gt, 4)
  np.testing.assert_array_equal(inter, inter_ref)
  np.testing.assert_array_equal(union, union_ref)


def test_perfect_prediction_gives_one_and_absent_class_is_skipped():
  gt = np.zeros((1, 4, 4), np.int32)
  gt[0, 1] = 1
  gt[0, 3] = 3
  inter, union = metrics.iou_counts(gt, gt, num_classes=4)
  out = metrics.iou_from_counts(inter, union, ('divider', 'ped_crossing', 'boundary'))
  assert out['iou']['divider'] == 1.0 and out['iou']['boundary'] == 1.0
  assert np.isnan(out['iou']['ped_crossing'])
  assert out['miou'] == 1.0


def test_argmax_classes():
  logits = np.zeros((1, 1, 2, 4), np.float32)
  logits[0, 0, 0, 2] = 1.0
  logits[0, 0, 1, 0] = 1.0
  np.testing.assert_array_equal(metrics.predicted_classes(logits), [[[2, 0]]])


def test_invalid_rows_count_nothing():
  rng = np.random.default_rng(1)
  pred = rng.integers(0, 4, (3, 4, 5))
  gt = rng.integers(0, 4, (3, 4, 5))
  inter, union = metrics.iou_counts(pred, gt, num_classes=4, valid=np.array([True, False, True]))
  inter_ref, union_ref = _iou_counts_ref(pred[[0, 2]], gt[[0, 2]], 4)
  np.testing.assert_array_equal(inter, inter_ref)
  np.testing.assert_array_equal(union, union_ref)
