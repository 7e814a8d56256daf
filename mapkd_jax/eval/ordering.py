"""HDMapNet's own polyline ordering (ordering='reference'), step by step.

vectorize.py's step 3' (its docstring), after HDMapNet postprocess/vectorize.py and connect.py:
the direction head's top-2 bins (`top2_directions`), the class probability thinned by the NMS
mask of max / average pools (`reference_nms_mask`), each instance's surviving pixels sorted
along its longer pixel range and chained greedily (`sort_points_by_dist`), then walked along the
direction bins from a seeded start (`connect_by_direction`); `order_class_instances` runs that
for every instance of a sample in the reference's loop order.
"""
import functools
import random

import numpy as np


def softmax_probability(semantic_logits):
  """[..., K] logits -> [..., K] softmax over K (the reference's segmentation.softmax).

  The value of max - shift - exp - sum - divide over the last axis. For K < 8 channels (the
  semantic head's 4) the max and the sum are taken channel by channel: numpy's reductions over
  a short last axis cost 3 ms (max) and 1 ms (sum) at 200 x 400 x 4, several times the exp,
  and numpy adds fewer than 8 elements one after the other from the first (its pairwise sum
  starts blocks of 8 only from n = 8), the order of the loop below, so the bits are the same
  (tests/test_eval_speed_ops.py checks them against the plain formula, `_softmax_plain`). The
  exp runs on a contiguous array of the same shape either way.
  """
  logits = np.asarray(semantic_logits)
  channels = logits.shape[-1] if logits.ndim else 0
  if not 1 <= channels < 8 or logits.dtype.kind != 'f':
    return _softmax_plain(logits)
  logits = np.ascontiguousarray(logits)
  top = logits[..., 0].copy()
  for k in range(1, channels):
    np.maximum(top, logits[..., k], out=top)
  exp = np.exp(logits - top[..., None])
  total = exp[..., 0].copy()
  for k in range(1, channels):
    total += exp[..., k]
  exp /= total[..., None]
  return exp


def _softmax_plain(logits):
  """`softmax_probability` by whole-axis reductions (any K; the formula it must match)."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)



def top2_directions(direction_logits):
  """[..., D + 1] direction logits -> [..., 2] int64: the reference's two direction bins.

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


def reference_nms_at(prob, rows, cols):
  """`reference_nms_mask(prob)[rows, cols]`, computed at those pixels only.

  The same windows, the same float32 sums in the same (row-major window) order and the same
  comparisons, gathered per pixel instead of shifted over the whole map: the walk reads the
  mask only at its instance's pixels.

  Args:
    prob: [H, W] float32 (0 outside the class's instances).
    rows, cols: [M] int pixel coordinates.

  Returns:
    [M] bool.
  """
  prob = np.asarray(prob, np.float32)
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  pad = 4     # the largest half window (9 x 5 and 5 x 9)
  width = prob.shape[1] + 2 * pad
  at = (rows + pad) * width + cols + pad
  zero_padded = np.pad(prob, pad).ravel()
  low_padded = np.pad(prob, pad, constant_values=-np.inf).ravel()

  def window_sum(win_rows, win_cols):
    total = np.zeros(len(at), np.float32)
    for dy in range(win_rows):
      for dx in range(win_cols):
        total += zero_padded[at + (dy - win_rows // 2) * width + dx - win_cols // 2]
    return total

  def window_max(win_rows, win_cols):
    out = np.full(len(at), -np.inf, np.float32)
    for dy in range(win_rows):
      for dx in range(win_cols):
        out = np.maximum(out, low_padded[at + (dy - win_rows // 2) * width + dx - win_cols // 2])
    return out

  here = prob[rows, cols]
  nms_rows = (window_max(1, 5) - here) < np.float32(1e-4)
  nms_cols = (window_max(5, 1) - here) < np.float32(1e-4)
  vertical = (window_sum(9, 5) / np.float32(45)) > (window_sum(5, 9) / np.float32(45))
  return (vertical & nms_rows) | (~vertical & nms_cols)


def sort_points_by_dist(coords):
  """[N, 2] points -> [M, 2] float64: the reference's greedy nearest-neighbour chain.

  From the first point, repeatedly the nearest unused point (the lowest index among equally
  near ones, as np.argmin); a candidate farther than 3 px that lies within 5 px of a point
  already taken is discarded, and after 90% of the steps a jump above 10 px ends the chain
  (HDMapNet postprocess/connect.py sort_points_by_dist; its direction term is multiplied by 0
  there and left out here). Distinct integer points (the pixels `reference_order` passes) take
  `_sort_pixels_by_dist`, the same chain without the N x N matrix; other input the plain loop.
  """
  coords = np.asarray(coords, np.float64)
  pixels = coords.astype(np.int64)
  if len(coords) and np.array_equal(pixels, coords):
    order = _sort_pixels_by_dist(pixels)
    if order is not None:
      return coords[order]
  return coords[_sort_points_by_dist_dense(coords)]


def _sort_points_by_dist_dense(coords):
  """`sort_points_by_dist`'s chain as indices, by the reference's own loop over a matrix."""
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
  return order


# Pixel offsets within 3 px, grouped by squared length, nearest group first: a point's nearest
# unused pixel, when it is this close, is found by lookups instead of a scan of all points.
_NEAR_GROUPS = tuple(
    tuple((dc, dr) for dc in range(-3, 4) for dr in range(-3, 4) if dc * dc + dr * dr == d2)
    for d2 in (1, 2, 4, 5, 8, 9))
# The same offsets in that order as ([dc...], [dr...]) [1, 28] and their squared lengths.
_NEAR_DELTAS = np.array([offset for group in _NEAR_GROUPS for offset in group], np.int64).T[:, None]
_NEAR_D2 = (_NEAR_DELTAS[0] ** 2 + _NEAR_DELTAS[1] ** 2)
# Offsets closer than 5 px (squared length < 25): a candidate this close to a taken point is
# discarded by the chain's rule.
_WITHIN_5 = np.array([(dc, dr) for dc in range(-4, 5) for dr in range(-4, 5)
                      if dc * dc + dr * dr < 25], np.int64)


def _sort_pixels_by_dist(pixels):
  """`sort_points_by_dist`'s chain as indices for [N, 2] int64 pixels; None if one repeats.

  The same decisions as the dense loop. Distances between integer points are square roots of
  integer squared distances, equal exactly when those are equal, so the rules compare squared
  distances (3 px -> 9, 5 -> 25, 10 -> 100). A step whose nearest unused pixel is within 3 px
  (most steps: the chain runs along a thin line) finds it as the first unused entry of the
  point's list of neighbours within 3 px (the offsets of `_NEAR_GROUPS`), sorted nearest first
  and lowest index first among equally near ones (argmin's order); within 3 px no rule
  applies. Otherwise the unused points are ranked by (squared distance, index), argmin's
  order: while the chain stands still the loop takes them in that order and discards each
  that lies within 5 px of a taken point (a set that does not change while it discards;
  every point closer than 5 px to the current one is, without a lookup), so one ranking serves the whole run of discards up to the first point that is taken (or ends
  the chain: a jump above 10 px after 90% of the loop's steps, each discard a step). A point
  leaves the candidates when taken or discarded (the dense loop's column of inf); once none
  are left every remaining step of the loop is a no-op, so the chain ends.
  """
  num = len(pixels)
  # Pixels on a grid with a 4-pixel margin: [column, row] -> index (-1: none), and taken points
  # for the 5-px rule's lookups.
  origin = pixels.min(axis=0) - 4
  local = pixels - origin
  shape = tuple(local.max(axis=0) + 5)
  flat = local[:, 0] * shape[1] + local[:, 1]
  index_grid = np.full(shape[0] * shape[1], -1, np.int64)
  index_grid[flat] = np.arange(num)
  if np.count_nonzero(index_grid >= 0) != num:
    return None     # repeated pixels: the caller's plain loop
  # Each point's neighbours within 3 px, nearest first and the lowest index first among equally
  # near ones (argmin's order), as lists: the inner loop takes the first unused one.
  near = index_grid[flat[:, None] + _NEAR_DELTAS[0] * shape[1] + _NEAR_DELTAS[1]]   # [N, 28]
  # Sorted as one int64 key (point, squared distance <= 9, neighbour), the neighbour its
  # remainder: sorting values costs less than a lexsort and gathers.
  stride = num + 1
  valid = near >= 0
  key = np.sort(((np.arange(num)[:, None] * 10 + _NEAR_D2) * stride + near)[valid])
  near = (key % stride).tolist()
  bounds = np.cumsum(np.count_nonzero(valid, axis=1)).tolist()
  candidates = [near[lo:hi] for lo, hi in zip([0] + bounds, bounds)]
  taken_grid = np.zeros(shape, bool)
  alive_list = [True] * num   # unused points, for the inner loop; `alive` the same in numpy
  alive_list[0] = False
  alive = np.ones(num, bool)
  alive[0] = False
  order = [0]
  synced = 0          # order[:synced] are marked in taken_grid
  here = 0
  remaining = num - 1
  step = 0    # the dense loop's i: its iterations so far
  while step < num - 1 and remaining:
    nxt = -1
    for k in candidates[here]:
      if alive_list[k]:
        nxt = k
        break
    if nxt < 0:   # nearest unused point farther than 3 px: rank them, discard, take
      ranked = np.flatnonzero(alive)
      offset = pixels[ranked] - pixels[here]
      d2 = offset[:, 0] * offset[:, 0] + offset[:, 1] * offset[:, 1]
      # argmin's order: by squared distance, then index (ranked ascends: a stable sort).
      by_distance = np.argsort(d2, kind='stable')
      ranked, d2 = ranked[by_distance], d2[by_distance]
      # The first candidate not within 5 px of a taken point, looked for in growing chunks
      # (usually the first one or a few). Those closer than 5 px to `here` (d2 < 25) are
      # within 5 px of a taken point without a lookup.
      discards = len(ranked)
      lo = int(np.searchsorted(d2, 25))
      size = 8
      while lo < len(ranked):
        if synced < len(order):
          new = order[synced:]
          taken_grid[local[new, 0], local[new, 1]] = True
          synced = len(order)
        chunk = ranked[lo:lo + size]
        close = (taken_grid[local[chunk, 0][:, None] + _WITHIN_5[:, 0],
                            local[chunk, 1][:, None] + _WITHIN_5[:, 1]]).any(axis=1)
        if not close.all():
          discards = lo + int(np.argmin(close))
          break
        lo, size = lo + size, 4 * size
      discards = min(discards, num - 1 - step)   # the loop's step budget (never binding)
      dropped = ranked[:discards]
      alive[dropped] = False
      for k in dropped.tolist():
        alive_list[k] = False
      remaining -= discards
      step += discards
      if discards == len(ranked) or step >= num - 1:
        break
      nxt = int(ranked[discards])
      if d2[discards] > 100 and step > num * 0.9:
        break
    alive[nxt] = False
    alive_list[nxt] = False
    remaining -= 1
    step += 1
    order.append(nxt)
    here = nxt
  return order


@functools.lru_cache(maxsize=4096)
def _step_offset(direction, step, per_deg):
  """(dx, dy) float64 of a `step` px move along bin `direction`: float32 angle and offset, as
  the reference's torch tensors (the same scalar numpy expression for every call)."""
  rad = np.deg2rad(np.float32(per_deg) * np.float32(direction))
  offset = np.float32(step) * np.array([np.cos(rad), np.sin(rad)], np.float32)
  return float(offset[0]), float(offset[1])


@functools.lru_cache(maxsize=65536)
def _back_slot(dx, dy, bin0, bin1, per_deg):
  """Which of a point's two bins (0 / 1) points back along the step (dx, dy) that reached it:
  the one closest to the reverse angle (float32 gaps, wrapped at 360; the first on a tie)."""
  inverse = (180.0 + np.rad2deg(np.arctan2(float(dy), float(dx)))) % 360
  back = np.float32(per_deg) * np.array([bin0, bin1]).astype(np.float32)
  gap = np.abs(back - np.float32(inverse))
  gap = np.minimum(gap, np.float32(360) - gap)
  return int(np.argmin(gap))


def _connect_one_way(coords, directions, chain, taken, step, per_deg):
  """Extends `chain` (list of (col, row) int tuples) from its last point along the bins.

  HDMapNet connect.py connect_by_step: each point offers its two direction bins once; the
  target is `step` px along the bin's angle; candidates within step - 1 of the current point
  are dropped for good (for this call), the candidate nearest the target is taken unless it
  is more than 50 px away, and the bin of the new point that points back (closest to the
  reverse angle) is marked used.

  `coords`: [N, 2] int64 candidates; `directions`: {(col, row): (bin0, bin1)} of every
  candidate; `taken`: set of (col, row, slot) used bins, shared by both walks. The distances
  are the reference's norms written out (sqrt(dx * dx + dy * dy) in float64, what
  np.linalg.norm computes on two coordinates); the drop test on integer offsets compares
  squared distances when step is an integer (exact).
  """
  cols, rows = coords[:, 0].copy(), coords[:, 1].copy()
  whole_step = float(step).is_integer() and step >= 1
  near2 = (step - 1) ** 2
  while True:
    col, row = chain[-1]
    bins = directions[(col, row)]
    if (col, row, 0) not in taken:
      direction = bins[0]
      taken.add((col, row, 0))
    elif (col, row, 1) not in taken:
      direction = bins[1]
      taken.add((col, row, 1))
    else:
      break
    if direction == -1:
      continue
    # The same values as the expressions in the docstring, computed in place (this loop runs
    # ~400 times a sample on arrays of ~100 points: numpy's per-call cost is most of it).
    dc, dr = cols - col, rows - row
    dc *= dc
    dr *= dr
    dc += dr
    far = dc > near2 if whole_step else np.sqrt(dc.astype(np.float64)) > step - 1
    if not far.all():
      cols, rows = cols[far], rows[far]
      if len(cols) == 0:
        break
    ox, oy = _step_offset(int(direction), step, per_deg)
    ex, ey = cols - (float(col) + ox), rows - (float(row) + oy)
    ex *= ex
    ey *= ey
    ex += ey
    dist = np.sqrt(ex, out=ex)
    best = int(dist.argmin())
    if dist[best] > 50:
      continue
    ncol, nrow = int(cols[best]), int(rows[best])
    chain.append((ncol, nrow))
    slot = _back_slot(ncol - col, nrow - row, *directions[(ncol, nrow)], per_deg)
    taken.add((ncol, nrow, slot))


def connect_by_direction(coords, directions, *, start, step=7, per_deg=10.0):
  """[N, 2] int (col, row) points -> [M, 2] int32: the reference's direction walk.

  From coords[start] (the reference draws it with random.randint), walks one way, reverses the
  chain and walks the other way (HDMapNet connect.py connect_by_direction).

  Args:
    coords: [N, 2] int (col, row) points.
    directions: [H, W, 2] bins from `top2_directions` (read at the points only).
    start: index of the first point.
    step, per_deg: step length in px, degrees per direction bin.
  """
  coords = np.asarray(coords, np.int32).astype(np.int64)
  cols, rows = coords[:, 0], coords[:, 1]
  point_bins = dict(zip(zip(cols.tolist(), rows.tolist()),
                        map(tuple, directions[rows, cols].tolist())))
  taken = set()
  chain = [tuple(coords[start].tolist())]
  _connect_one_way(coords, point_bins, chain, taken, step, per_deg)
  chain.reverse()
  _connect_one_way(coords, point_bins, chain, taken, step, per_deg)
  return np.asarray(chain, np.int32).reshape(-1, 2)


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
  per_deg = 360.0 / (direction.shape[-1] - 1)
  # The walk reads the bins only at the instances' NMS pixels: computed there alone (per
  # pixel the same softmax and argmaxes as over the whole map, tests/test_postprocess.py).
  bins = np.zeros(direction.shape[:2] + (2,), np.int64)
  start_rng = random.Random(seed)
  out = []
  for k in sorted({k for k, *_ in found}):
    of_class = [(coords, score) for kk, coords, _, score in found if kk == k]
    member = np.zeros(softmax.shape[:2], bool)
    for coords, _ in of_class:
      member[coords[:, 1], coords[:, 0]] = True
    # The mask is read at the instances' pixels only: computed there (`reference_nms_at`).
    rows, cols = np.nonzero(member)
    keep = reference_nms_at(np.where(member, softmax[..., k], np.float32(0)), rows, cols)
    rows, cols = rows[keep], cols[keep]
    nms = np.zeros(member.shape, bool)
    nms[rows, cols] = True
    bins[rows, cols] = top2_directions(direction[rows, cols])
    for coords, score in of_class:
      points = reference_order(coords, nms, bins, start_rng=start_rng, per_deg=per_deg)
      if points is not None:
        out.append((k, points, score))
  return out
