"""HDMapNet's own polyline ordering (ordering='reference'), step by step.

vectorize.py's step 3' (its docstring), after HDMapNet postprocess/vectorize.py and connect.py:
the direction head's top-2 bins (`top2_directions`), the class probability thinned by the NMS
mask of max / average pools (`reference_nms_mask`), each instance's surviving pixels sorted
along its longer pixel range and chained greedily (`sort_points_by_dist`), then walked along the
direction bins from a seeded start (`connect_by_direction`); `order_class_instances` runs that
for every instance of a sample in the reference's loop order.
"""
import random

import numpy as np


def softmax_probability(semantic_logits):
  """[H, W, K] logits -> [H, W, K] float32 softmax over K (the reference's segmentation.softmax)."""
  shifted = semantic_logits - semantic_logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)



def top2_directions(direction_logits):
  """[H, W, D + 1] direction logits -> [H, W, 2] int64: the reference's two direction bins.

  HDMapNet postprocess/vectorize.py get_pred_top2_direction: softmax over the channels, the
  best channel, then the best channel after zeroing the best and its two neighbours on each
  side (clamped at the ends, not wrapped); both minus 1, so the 'none' channel 0 gives -1 and
  channel b gives bin b - 1 (an angle of (b - 1) * 360 / D degrees).
  """
  logits = np.asarray(direction_logits, np.float32)
  prob = softmax_probability(logits)
  first = np.argmax(prob, axis=-1)
  channels = prob.shape[-1]
  second_prob = prob.copy()
  for offset in (-2, -1, 0, 1, 2):
    np.put_along_axis(second_prob, np.clip(first + offset, 0, channels - 1)[..., None], 0.0,
                      axis=-1)
  second = np.argmax(second_prob, axis=-1)
  return np.stack([first, second], axis=-1).astype(np.int64) - 1


def _window_sum_f32(image, rows, cols):
  """[H, W] float32 sums over (rows x cols) windows, zero padded, accumulated in float32 in
  row-major window order (torch's CPU avg_pool2d order, so ties resolve as there)."""
  pr, pc = rows // 2, cols // 2
  padded = np.pad(image, ((pr, pr), (pc, pc)))
  height, width = image.shape
  total = np.zeros_like(image)
  for dy in range(rows):
    for dx in range(cols):
      total += padded[dy:dy + height, dx:dx + width]
  return total


def _window_max(image, rows, cols):
  """[H, W] max over (rows x cols) windows, padded with -inf (torch max_pool2d)."""
  pr, pc = rows // 2, cols // 2
  padded = np.pad(image, ((pr, pr), (pc, pc)), constant_values=-np.inf)
  height, width = image.shape
  out = np.full_like(image, -np.inf)
  for dy in range(rows):
    for dx in range(cols):
      out = np.maximum(out, padded[dy:dy + height, dx:dx + width])
  return out


def reference_nms_mask(prob):
  """[H, W] float32 class probability (0 outside the class's instances) -> [H, W] bool.

  HDMapNet's NMS: where a 9x5 (rows x cols) window average beats the 5x9 one the line runs
  vertically and a pixel is kept if it is the max of its 1x5 row window (within 1e-4), else
  of its 5x1 column window. Averages include the zero padding (torch's count_include_pad).
  """
  prob = np.asarray(prob, np.float32)
  nms_rows = (_window_max(prob, 1, 5) - prob) < np.float32(1e-4)
  nms_cols = (_window_max(prob, 5, 1) - prob) < np.float32(1e-4)
  vertical = (_window_sum_f32(prob, 9, 5) / np.float32(45)) > \
      (_window_sum_f32(prob, 5, 9) / np.float32(45))
  return (vertical & nms_rows) | (~vertical & nms_cols)


def sort_points_by_dist(coords):
  """[N, 2] points -> [M, 2] float64: the reference's greedy nearest-neighbour chain.

  From the first point, repeatedly the nearest unused point; a candidate farther than 3 px
  that lies within 5 px of a point already taken is discarded, and after 90% of the steps a
  jump above 10 px ends the chain (HDMapNet postprocess/connect.py sort_points_by_dist; its
  direction term is multiplied by 0 there and left out here).
  """
  coords = np.asarray(coords, np.float64)
  num = len(coords)
  diff = coords[:, None, :] - coords[None, :, :]
  full = np.sqrt((diff ** 2).sum(-1))
  dist = full.copy()
  order = [0]
  dist[:, 0] = np.inf
  for i in range(num - 1):
    row = dist[order[-1]]
    nxt = int(np.argmin(row))
    if row[nxt] > 3 and full[nxt, order].min() < 5:
      dist[:, nxt] = np.inf
      continue
    if row[nxt] > 10 and i > num * 0.9:
      break
    order.append(nxt)
    dist[:, nxt] = np.inf
  return coords[order]


def _connect_one_way(coords, directions, chain, taken, step, per_deg):
  """Extends `chain` (list of int32 (col, row)) from its last point along the direction bins.

  HDMapNet connect.py connect_by_step: each point offers its two direction bins once; the
  target is `step` px along the bin's angle; candidates within step - 1 of the current point
  are dropped for good (for this call), the candidate nearest the target is taken unless it
  is more than 50 px away, and the bin of the new point that points back (closest to the
  reverse angle) is marked used.
  """
  while True:
    col, row = chain[-1]
    if not taken[row, col, 0]:
      direction = directions[row, col, 0]
      taken[row, col, 0] = True
    elif not taken[row, col, 1]:
      direction = directions[row, col, 1]
      taken[row, col, 1] = True
    else:
      break
    if direction == -1:
      continue
    # float32 angle and offset as the reference's torch tensors; the target in float64.
    rad = np.deg2rad(np.float32(per_deg) * np.float32(direction))
    offset = np.float32(step) * np.array([np.cos(rad), np.sin(rad)], np.float32)
    last = np.array(chain[-1])
    coords = coords[np.linalg.norm(coords - last, axis=-1) > step - 1]
    if len(coords) == 0:
      break
    target = last.astype(np.float64) + offset.astype(np.float64)
    dist = np.linalg.norm(coords - target, axis=-1)
    best = int(np.argmin(dist))
    if dist[best] > 50:
      continue
    chain.append(coords[best].copy())
    to_next = coords[best] - last
    inverse = (180.0 + np.rad2deg(np.arctan2(float(to_next[1]), float(to_next[0])))) % 360
    ncol, nrow = chain[-1]
    back = np.float32(per_deg) * directions[nrow, ncol].astype(np.float32)
    gap = np.abs(back - np.float32(inverse))
    gap = np.minimum(gap, np.float32(360) - gap)
    taken[nrow, ncol, int(np.argmin(gap))] = True


def connect_by_direction(coords, directions, *, start, step=7, per_deg=10.0):
  """[N, 2] int32 (col, row) points -> [M, 2] int32: the reference's direction walk.

  From coords[start] (the reference draws it with random.randint), walks one way, reverses the
  chain and walks the other way (HDMapNet connect.py connect_by_direction). `directions`:
  [H, W, 2] bins from `top2_directions`.
  """
  coords = np.asarray(coords, np.int32)
  taken = np.zeros(directions.shape, bool)
  chain = [coords[start].copy()]
  _connect_one_way(coords, directions, chain, taken, step, per_deg)
  chain.reverse()
  _connect_one_way(coords, directions, chain, taken, step, per_deg)
  return np.stack(chain, 0)


def reference_order(coords, nms, directions, *, start_rng, step=7, per_deg=10.0):
  """One instance's polyline by the reference's ordering (vectorize.py docstring, step 3').

  Args:
    coords: [N, 2] int (col, row) of the instance's pixels, row-major order.
    nms: [H, W] bool `reference_nms_mask` of its class.
    directions: [H, W, 2] `top2_directions`.
    start_rng: random.Random drawing the walk's start (the reference's random.randint).

  Returns:
    [M, 2] int32 (col, row) points, or None when no pixel survives the NMS.
  """
  coords = np.asarray(coords)
  keep = nms[coords[:, 1], coords[:, 0]]
  points = coords[keep]
  if len(points) == 0:
    return None
  col_range = np.ptp(coords[:, 0])
  row_range = np.ptp(coords[:, 1])
  axis = 0 if col_range > row_range else 1
  points = points[np.argsort(points[:, axis], kind='stable')]
  points = sort_points_by_dist(points).astype(np.int32)
  start = start_rng.randint(0, len(points) - 1)
  return connect_by_direction(points, directions, start=start, step=step, per_deg=per_deg)


def order_class_instances(found, softmax, direction, *, seed):
  """Every instance's polyline by the reference's ordering, in its loop order.

  HDMapNet postprocess/vectorize.py: per class, the NMS mask of the class probability with
  every pixel outside the class's instances zeroed (the reference zeroes it in place before its
  pools), then each instance ordered by `reference_order`, the walk starts drawn from one
  random.Random(seed) across the whole sample (the reference: random.randint, unseeded).

  Args:
    found: [(class channel k, pixels [N, 2] int (col, row) row-major, class probability [N],
      instance score)], classes ascending (vectorize.instances).
    softmax: [H, W, K] float32 softmax of the semantic logits.
    direction: [H, W, D + 1] float32 direction-head logits (channel 0 = none).
    seed: the walk starts' seed (config.eval.ordering_seed).

  Returns:
    [(k, [M, 2] int32 (col, row) points, instance score)]; an instance with no NMS pixel gives
    none (M may be 1: the reference keeps a one-point polyline).
  """
  bins = top2_directions(direction)
  per_deg = 360.0 / (direction.shape[-1] - 1)
  start_rng = random.Random(seed)
  out = []
  for k in sorted({k for k, *_ in found}):
    of_class = [(coords, score) for kk, coords, _, score in found if kk == k]
    member = np.zeros(softmax.shape[:2], bool)
    for coords, _ in of_class:
      member[coords[:, 1], coords[:, 0]] = True
    nms = reference_nms_mask(np.where(member, softmax[..., k], np.float32(0)))
    for coords, score in of_class:
      points = reference_order(coords, nms, bins, start_rng=start_rng, per_deg=per_deg)
      if points is not None:
        out.append((k, points, score))
  return out
