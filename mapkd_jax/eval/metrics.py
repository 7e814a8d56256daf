"""Semantic IoU over a whole split: per-class intersections and unions summed over samples."""
import jax.numpy as jnp
import numpy as np


def predicted_classes(semantic_logits):
  """[B, H, W, 4] logits -> [B, H, W] int32 class map (0 background) by argmax."""
  return jnp.argmax(semantic_logits, axis=-1).astype(jnp.int32)


def iou_counts(pred, gt, *, num_classes, valid=None):
  """Per-class intersection and union pixel counts of class maps.

  Args:
    pred, gt: [B, H, W] int class maps (0 = background).
    num_classes: number of classes including background.
    valid: optional [B] bool; rows that are False (padding of a last partial batch) count
      nothing.

  Returns:
    (intersection, union): [num_classes] int32 each, summed over the batch; index 0 is
    background (reported but not part of mIoU).
  """
  classes = jnp.arange(num_classes)
  pred_1h = pred[..., None] == classes
  gt_1h = gt[..., None] == classes
  if valid is not None:
    keep = jnp.reshape(valid, (-1,) + (1,) * (pred.ndim - 1) + (1,))
    pred_1h, gt_1h = pred_1h & keep, gt_1h & keep
  axes = tuple(range(pred.ndim))
  inter = jnp.sum(pred_1h & gt_1h, axis=axes, dtype=jnp.int32)
  union = jnp.sum(pred_1h | gt_1h, axis=axes, dtype=jnp.int32)
  return inter, union


def iou_from_counts(intersection, union, class_names):
  """{'iou': {name: IoU}, 'miou': mean over the named (non-background) classes}.

  A class absent from both prediction and ground truth over the whole split has IoU NaN and
  is left out of the mean (there is nothing to score).
  """
  intersection = np.asarray(intersection, np.float64)
  union = np.asarray(union, np.float64)
  ious = {}
  for k, name in enumerate(class_names, start=1):
    ious[name] = float(intersection[k] / union[k]) if union[k] > 0 else float('nan')
  scored = [v for v in ious.values() if not np.isnan(v)]
  return {'iou': ious, 'miou': float(np.mean(scored)) if scored else float('nan')}
