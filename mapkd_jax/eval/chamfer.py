"""Polyline resampling and Chamfer-distance matrices of the 'maptr' and 'legacy' protocols.

'maptr': every polyline resampled to `num_points` points evenly spaced along its length (a
prediction that already has exactly that many vertices kept as it is), pairs whose flat-cap
buffers do not intersect never matched (inf). 'legacy': resampled every `sample_step` metres,
no gate. CD = (mean nearest distance pred->GT + GT->pred) / 2 in metres (protocols.py).
"""
import numpy as np
import shapely


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
  # Chunks of pairs: [chunk, P, P] distances stay a few MB. The nearest distances are the
  # square roots of the smallest squared distances: sqrt is monotone, so that is the minimum
  # of np.linalg.norm's values bit for bit (it computes dx * dx + dy * dy too), at one sqrt
  # per point instead of one per pair of points.
  for lo in range(0, len(pred_pts), 256):
    a, b = pred_pts[lo:lo + 256], gt_pts[lo:lo + 256]
    dx = a[:, :, None, 0] - b[:, None, :, 0]
    dy = a[:, :, None, 1] - b[:, None, :, 1]
    sq = dx * dx + dy * dy
    cd = 0.5 * (np.sqrt(sq.min(axis=2)).mean(axis=1) + np.sqrt(sq.min(axis=1)).mean(axis=1))
    out[pred_index[lo:lo + 256], gt_index[lo:lo + 256]] = cd
  return out
