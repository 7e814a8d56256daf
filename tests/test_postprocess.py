"""Vectorizer instances = HDMapNet postprocess/ (vectorize.py + cluster.py), transcribed here.

`_reference_instances` restates the reference's steps one by one with cv2 and sklearn, as its
code runs them (argmax one-hot, x255 uint8, MORPH_CLOSE with a 5x5 MORPH_ELLIPSE kernel, every
connectedComponentsWithStats row with area <= 100 zeroed, background row included,
np.where(== 255) pixels, StandardScaler + sklearn DBSCAN(eps=1.5, min_samples=50), an exception
skips the class, confidence = mean softmax probability over each instance's pixels). The
vectorizer's `instances` must give the same pixel sets, in the same order, and the same
confidences.
"""
import cv2
import numpy as np
import pytest
from sklearn.cluster import DBSCAN
from sklearn.preprocessing import StandardScaler

from configs import tcs
from mapkd_jax.eval import ordering
from mapkd_jax.eval import vectorize

REF = dict(eps=1.5, min_samples=50, max_cluster_pixels=0, dbscan_algorithm='cover',
           close_kernel_px=5, min_area_px=100, standardize=True, score='softmax')


def _reference_instances(semantic, embedding, *, eps=1.5, min_samples=50, kernel=5,
                         min_area=100):
  """[(class, sorted (col, row) pixel list, confidence)] by the reference's steps."""
  exp = np.exp(semantic - semantic.max(-1, keepdims=True))
  softmax = exp / exp.sum(-1, keepdims=True)
  winner = np.argmax(semantic, axis=-1)
  out = []
  for i in range(1, semantic.shape[-1]):
    binary = np.array((winner == i) * 255, dtype=np.uint8)
    element = cv2.getStructuringElement(shape=cv2.MORPH_ELLIPSE, ksize=(kernel, kernel))
    closed = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, element, iterations=1)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8,
                                                           ltype=cv2.CV_32S)
    for index, stat in enumerate(stats):
      if stat[4] <= min_area:
        closed[np.where(labels == index)] = 0
    idx = np.where(closed == 255)
    feats = embedding[idx]
    coord = np.vstack((idx[1], idx[0])).transpose()
    try:
      features = StandardScaler().fit_transform(feats)
      db_labels = DBSCAN(eps=eps, min_samples=min_samples).fit(features).labels_
    except ValueError:
      continue   # the reference returns (None, None): no instance of this class
    mask = np.zeros(closed.shape, np.int64)
    for label in np.unique(db_labels).tolist():
      if label == -1:
        continue
      c = coord[db_labels == label]
      mask[c[:, 1], c[:, 0]] = label + 1
    prob = softmax[..., i].copy()
    prob[mask == 0] = 0
    for j in range(1, int(mask.max()) + 1):
      rows, cols = np.where(mask == j)
      out.append((i, sorted(zip(cols.tolist(), rows.tolist())), float(prob[mask == j].mean())))
  return out


def _assert_same(semantic, embedding, kernel=5):
  got = vectorize.instances(semantic, embedding, **{**REF, 'close_kernel_px': kernel})
  want = _reference_instances(semantic, embedding, kernel=kernel)
  assert [(k, sorted(map(tuple, c.tolist()))) for k, c, _, _ in got] == \
      [(k, pixels) for k, pixels, _ in want]
  np.testing.assert_allclose([s for *_, s in got], [s for *_, s in want], rtol=1e-6)
  return got


def _blank(height, width, dim=4):
  semantic = np.zeros((height, width, 4), np.float32)
  semantic[..., 0] = 2.0
  return semantic, np.zeros((height, width, dim), np.float32)


def test_hand_made_masks_close_filter_and_cluster_like_the_reference():
  semantic, embedding = _blank(60, 120)
  rng = np.random.default_rng(0)
  # A divider with one-pixel gaps every 6 columns (closing fills them, and the gaps' pixels get
  # their own softmax probability in the confidence), a second divider with another embedding.
  semantic[10:15, 5:110, 1] = 3.0
  semantic[10:15, 20:110:6, 1] = 0.0
  embedding[10:15, 5:110] = rng.normal(0.0, 0.05, (5, 105, 4))
  semantic[30:35, 5:110, 1] = 1.0 + rng.uniform(0, 2, (5, 105))
  embedding[30:35, 5:110] = rng.normal(0.0, 0.05, (5, 105, 4)) + [4.0, 0, 0, 0]
  # Boundary: a 10x10 blob (area 100 <= 100: removed), a 10x11 blob (110: kept but below the
  # DBSCAN density? 110 >= 50: an instance) and a line along the image edge (closing there).
  semantic[45:55, 5:15, 3] = 4.0
  semantic[45:55, 30:41, 3] = 4.0
  semantic[57:60, 50:120, 3] = 4.0
  semantic[58, 60:62, 3] = 0.0
  embedding[57:60, 50:120, 1] = 3.0
  got = _assert_same(semantic, embedding)
  assert [k for k, *_ in got] == [1, 1, 3, 3]
  # Closing filled the gaps' three middle rows (the ellipse's corners leave the edge rows:
  # 495 closed pixels from 450), the 100-pixel blob is gone.
  divider = {tuple(p) for p in got[0][1].tolist()}
  assert (20, 12) in divider and (20, 10) not in divider and len(divider) > 450
  assert all(not (5 <= c < 15 and 45 <= r < 55) for _, pix, _, _ in got for c, r in pix)


def test_background_component_with_small_area_is_kept_like_the_reference():
  # Class 1 covers all but a 6x6 hole: the background component (label 0) has area 36 <= 100;
  # the reference "removes" it (zeroes pixels already zero), the foreground stays.
  semantic, embedding = _blank(30, 40)
  semantic[..., 1] = 5.0
  semantic[10:16, 10:16, 1] = 0.0
  got = _assert_same(semantic, embedding, kernel=1)   # a 1x1 kernel: closing changes nothing
  assert len(got) == 1 and len(got[0][1]) == 30 * 40 - 36
  got = _assert_same(semantic, embedding)
  assert len(got) == 1 and len(got[0][1]) > 30 * 40 - 36   # closing shrinks the hole


@pytest.mark.parametrize('seed,noise', [(0, 0.8), (1, 1.0)])
def test_random_noisy_maps_give_the_reference_instances(seed, noise):
  rng = np.random.default_rng(seed)
  height, width = 100, 200
  semantic = rng.normal(0.0, noise, (height, width, 4)).astype(np.float32)
  semantic[..., 0] += 1.5
  embedding = rng.normal(0.0, 0.3, (height, width, 8)).astype(np.float32)
  for n in range(6):   # thick random lines of random classes with an embedding code each
    line = np.zeros((height, width), np.uint8)
    pts = rng.integers([0, 0], [width, height], (3, 2)).astype(np.int32)
    cv2.polylines(line, [pts], False, 1, thickness=int(rng.integers(3, 8)))
    cls = int(rng.integers(1, 4))
    semantic[line > 0, cls] += 3.0
    embedding[line > 0] += rng.normal(0.0, 3.0, 8)
  got = _assert_same(semantic, embedding)
  assert len(got) >= 3
  # The inputs exercise both mask steps: closing adds pixels, the area filter removes some
  # (each > 900 pixels of some class on these seeds).
  argmax = np.argmax(semantic, axis=-1) == 1
  closed = vectorize.reference_mask(argmax, close_kernel_px=5, min_area_px=0)
  kept = vectorize.reference_mask(argmax, close_kernel_px=5, min_area_px=100)
  assert (closed & ~argmax).sum() > 900 and (closed & ~kept).sum() > 900


def test_raw_embeddings_and_sigmoid_remain_reachable():
  semantic, embedding = _blank(20, 80)
  semantic[5:10, 5:75, 2] = 3.0
  embedding[5:10, 5:75, 0] = np.linspace(0, 0.1, 70)
  old = dict(REF, close_kernel_px=0, min_area_px=0, standardize=False, score='sigmoid')
  (k, pixels, prob, score), = vectorize.instances(semantic, embedding, **old)
  assert k == 2 and len(pixels) == 350
  np.testing.assert_allclose(score, 1 / (1 + np.exp(-3.0)), rtol=1e-6)
  (_, _, _, ref_score), = vectorize.instances(semantic, embedding, **REF)
  np.testing.assert_allclose(ref_score, np.exp(3.0) / (np.exp(3.0) + np.exp(2.0) + 2),
                             rtol=1e-6)


def test_reference_sizes_convert_like_the_label_width():
  config = tcs.get_config('student')
  assert vectorize.postprocess_px(config.data, 5, 100) == (5, 100)
  for step, want in ((0.3, (3, 25)), (0.6, (1, 6)), (0.075, (10, 400))):
    data = dict(config.data, bev_x=(-30.0, 30.0, step), bev_y=(-15.0, 15.0, step))
    assert vectorize.postprocess_px(data, 5, 100) == want
  assert vectorize.postprocess_px(config.data, 0, 0) == (0, 0)
  kwargs = vectorize.config_kwargs(tcs.get_config('student,tiny'))
  assert (kwargs['close_kernel_px'], kwargs['min_area_px']) == (1, 6)
  assert kwargs['max_cluster_pixels'] == 0 and kwargs['standardize'] and \
      kwargs['score'] == 'softmax'


def test_bad_input_is_named():
  semantic, embedding = _blank(20, 30)
  kwargs = vectorize.config_kwargs(tcs.get_config('student,tiny'))
  kwargs['direction'] = np.zeros((20, 30, 37), np.float32)   # the default ordering reads it
  with pytest.raises(ValueError, match='embedding shape'):
    vectorize.vectorize_sample(semantic, embedding[:10], **kwargs)
  bad = semantic.copy()
  bad[3, 3, 1] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    vectorize.vectorize_sample(bad, embedding, **kwargs)
  with pytest.raises(ValueError, match='config.eval.score'):
    vectorize.vectorize_sample(semantic, embedding, **{**kwargs, 'score': 'mean'})
  with pytest.raises(ValueError, match='close_kernel_px'):
    vectorize.vectorize_sample(semantic, embedding, **{**kwargs, 'close_kernel_px': -1})
  with pytest.raises(ValueError, match='config.eval.min_area_ref'):
    vectorize.postprocess_px(tcs.get_config('student').data, 5, 2.5)
  with pytest.raises(ValueError, match='max_cluster_pixels'):
    vectorize.cluster_embeddings(np.zeros((3, 2)), eps=1.0, min_samples=1, max_pixels=-1)


# ---- ordering='reference': HDMapNet postprocess/vectorize.py's loop + connect.py, transcribed
# with torch tensors where the reference has them (its direction mask is a torch tensor).


def _torch_top2(direction_logits):
  import torch  # pylint: disable=g-import-not-at-top
  prob = torch.softmax(torch.from_numpy(direction_logits), -1)
  first = torch.argmax(prob, -1, keepdim=True)
  spread = torch.zeros_like(prob)
  for shift in (0, -1, -2, 1, 2):
    spread.scatter_(-1, torch.clamp(first + shift, 0, prob.shape[-1] - 1), 1)
  prob[spread.bool()] = 0
  return torch.stack([first[..., 0], torch.argmax(prob, -1)], -1) - 1


def _torch_nms(prob):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  p = torch.from_numpy(prob)[None]
  nms1 = ((nn.MaxPool2d((1, 5), padding=(0, 2), stride=1)(p)[0] - p[0]) < 0.0001).numpy()
  avg1 = nn.AvgPool2d((9, 5), padding=(4, 2), stride=1)(p)[0].numpy()
  nms2 = ((nn.MaxPool2d((5, 1), padding=(2, 0), stride=1)(p)[0] - p[0]) < 0.0001).numpy()
  avg2 = nn.AvgPool2d((5, 9), padding=(2, 4), stride=1)(p)[0].numpy()
  vertical = avg1 > avg2
  return (vertical & nms1) | (~vertical & nms2)


def _ref_sort(coords):
  coords = coords.astype(float)
  n = len(coords)
  dist = np.sqrt(((np.repeat(coords[:, None], n, 1) - coords) ** 2).sum(-1))
  full = dist.copy()
  points, taken = [coords[0]], [0]
  dist[:, 0] = np.inf
  for i in range(n - 1):
    metric = dist[taken[-1]]
    idx = np.argmin(metric) % n
    if metric[idx] > 3 and min(full[idx][taken]) < 5:
      dist[:, idx] = np.inf
      continue
    if metric[idx] > 10 and i > n * 0.9:
      break
    points.append(coords[idx])
    taken.append(idx)
    dist[:, idx] = np.inf
  return np.stack(points, 0)


def _ref_walk(coords, mask, points, taken, step, per_deg):
  import math  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  while True:
    here = tuple(np.flip(points[-1]))
    if not taken[here][0]:
      direction = mask[here][0]
      taken[here][0] = True
    elif not taken[here][1]:
      direction = mask[here][1]
      taken[here][1] = True
    else:
      break
    if direction == -1:
      continue
    deg = per_deg * direction
    to_target = step * np.array([np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))])
    last = points[-1].copy()
    coords = coords[np.linalg.norm(coords - last, axis=-1) > step - 1]
    if len(coords) == 0:
      break
    target = np.array([last[0] + to_target[0], last[1] + to_target[1]])
    metric = np.linalg.norm(coords - target, axis=-1)
    idx = np.argmin(metric)
    if metric[idx] > 50:
      continue
    points.append(coords[idx].copy())
    to_next = coords[idx] - last
    inverse = (180 + np.rad2deg(math.atan2(to_next[1], to_next[0]))) % 360
    back = per_deg * mask[tuple(np.flip(points[-1]))]
    tmp = torch.abs(back - inverse)
    tmp = torch.min(tmp, 360 - tmp)
    taken[tuple(np.flip(points[-1]))][int(np.argmin(tmp.numpy()))] = True


def _reference_polylines(semantic, embedding, direction_logits, seed):
  """[(class, [M, 2] int (col, row) points, confidence)] by the reference's vectorize loop."""
  import random  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  exp = np.exp(semantic - semantic.max(-1, keepdims=True))
  softmax = (exp / exp.sum(-1, keepdims=True)).astype(np.float32)
  mask_dir = _torch_top2(direction_logits)
  per_deg = 360 / (direction_logits.shape[-1] - 1)
  rng = random.Random(seed)
  out = []
  found = _reference_instances(semantic, embedding)
  for i in range(1, semantic.shape[-1]):
    mine = [(pixels, conf) for k, pixels, conf in found if k == i]
    inst = np.zeros(semantic.shape[:2], np.int64)
    for j, (pixels, _) in enumerate(mine, start=1):
      cols, rows = np.asarray(pixels).T
      inst[rows, cols] = j
    prob = softmax[..., i].copy()
    prob[inst == 0] = 0
    nms = _torch_nms(prob)
    for j, (_, conf) in enumerate(mine, start=1):
      full = np.stack(np.where(inst == j)[::-1], 1)
      idx = np.where(nms & (inst == j))
      if len(idx[0]) == 0:
        continue
      lane = np.vstack((idx[1], idx[0])).transpose()
      key = 0 if np.ptp(full[:, 0]) > np.ptp(full[:, 1]) else 1
      lane = np.stack(sorted(lane, key=lambda x, key=key: x[key]))
      lane = _ref_sort(lane).astype('int32')
      points = [lane[rng.randint(0, lane.shape[0] - 1)].copy()]
      taken = np.zeros(tuple(mask_dir.shape), dtype=bool)
      _ref_walk(lane, mask_dir, points, taken, 7, per_deg)
      points.reverse()
      _ref_walk(lane, mask_dir, points, taken, 7, per_deg)
      out.append((i, np.stack(points, 0), conf))
  return out


def test_top2_directions_and_nms_mask_match_torch():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (30, 50, 37)).astype(np.float32)
  logits[:5, :5] = 0.0    # all channels tied: the first wins, as torch's argmax
  np.testing.assert_array_equal(ordering.top2_directions(logits), _torch_top2(logits).numpy())
  prob = rng.uniform(0, 1, (40, 60)).astype(np.float32)
  prob[prob < 0.5] = 0
  prob[10:20, 10:40] = 0.75    # flat areas: ties of the max and of the two averages
  want = _torch_nms(prob)
  np.testing.assert_array_equal(ordering.reference_nms_mask(prob), want)
  # At given pixels only (what the walk reads): every pixel, then a subset with the borders.
  rows, cols = np.nonzero(np.ones_like(want))
  np.testing.assert_array_equal(ordering.reference_nms_at(prob, rows, cols), want.ravel())
  rows = np.r_[0, 39, 0, 39, rng.integers(0, 40, 30)]
  cols = np.r_[0, 59, 59, 0, rng.integers(0, 60, 30)]
  np.testing.assert_array_equal(ordering.reference_nms_at(prob, rows, cols), want[rows, cols])


def _bins_along(direction, mask, angle_deg, *, bins=36):
  """Direction logits on `mask` pointing both ways along `angle_deg` (+- 180)."""
  for a in (angle_deg, angle_deg + 180):
    direction[mask, 1 + int(round(a / (360 / bins))) % bins] = 6.0


def _compare_reference_ordering(semantic, embedding, direction, seed=0):
  got = vectorize.vectorize_sample(
      semantic, embedding, bev_x=(0.0, semantic.shape[1] * 0.15, 0.15),
      bev_y=(0.0, semantic.shape[0] * 0.15, 0.15), class_names=('a', 'b', 'c'), eps=1.5,
      min_samples=50, max_cluster_pixels=0, link_radius_px=1.5, line_width_px=7,
      simplify_tolerance=0.2, ordering='reference', direction=direction, ordering_seed=seed)
  want = _reference_polylines(semantic, embedding, direction, seed)
  want = [w for w in want if len(w[1]) >= 2]
  assert [v['cls'] for v in got] == ['abc'[k - 1] for k, _, _ in want]
  for v, (_, points, conf) in zip(got, want):
    np.testing.assert_allclose(v['pts'], (points + 0.5) * 0.15, rtol=0, atol=1e-9)
    np.testing.assert_allclose(v['score'], conf, rtol=1e-6)
  return got


def test_reference_ordering_on_hand_made_lines():
  semantic, embedding = _blank(60, 120)
  direction = np.zeros((60, 120, 37), np.float32)
  direction[..., 0] = 3.0
  semantic[10:15, 5:110, 1] = 3.0
  _bins_along(direction, semantic[..., 1] > 0, 0)
  rows, cols = np.mgrid[:60, :120]
  diagonal = np.abs((rows - 20) - 0.6 * (cols - 20)) <= 2.5
  diagonal &= (cols > 20) & (cols < 90)
  semantic[diagonal, 3] = 3.0
  embedding[diagonal, 1] = 2.0
  _bins_along(direction, diagonal, np.rad2deg(np.arctan2(0.6, 1.0)))
  got = _compare_reference_ordering(semantic, embedding, direction)
  assert len(got) == 2
  # The walk covers the divider end to end on its own pixels, in 7-px (1.05 m) steps where it
  # runs straight. It is not monotone: the second walk (from the start, the other way) steps
  # past the far end back onto pixels the first walk visited, as connect.py does (its
  # candidates are filtered only by the current walk's points).
  points = got[0]['pts'] / 0.15 - 0.5
  assert points[:, 1].min() >= 10 and points[:, 1].max() <= 14
  assert points[:, 0].min() <= 12 and points[:, 0].max() >= 103
  steps = np.hypot(*np.diff(points, axis=0).T)
  assert np.median(steps) == pytest.approx(7.0, abs=0.5)


@pytest.mark.parametrize('seed', [0, 1])
def test_reference_ordering_on_noisy_maps(seed):
  rng = np.random.default_rng(10 + seed)
  height, width = 80, 160
  semantic = rng.normal(0.0, 0.6, (height, width, 4)).astype(np.float32)
  semantic[..., 0] += 1.5
  embedding = rng.normal(0.0, 0.3, (height, width, 8)).astype(np.float32)
  direction = rng.normal(0.0, 1.0, (height, width, 37)).astype(np.float32)
  for _ in range(5):
    line = np.zeros((height, width), np.uint8)
    a, b = rng.integers([0, 0], [width, height], (2, 2))
    cv2.line(line, tuple(map(int, a)), tuple(map(int, b)), 1, thickness=5)
    semantic[line > 0, int(rng.integers(1, 4))] += 3.0
    embedding[line > 0] += rng.normal(0.0, 3.0, 8)
    _bins_along(direction, line > 0, np.rad2deg(np.arctan2(*(b - a)[::-1])))
  got = _compare_reference_ordering(semantic, embedding, direction, seed=seed)
  assert len(got) >= 3


def test_reference_ordering_needs_direction():
  semantic, embedding = _blank(20, 30)
  kwargs = dict(vectorize.config_kwargs(tcs.get_config('student,tiny')), ordering='reference')
  with pytest.raises(ValueError, match='direction head'):
    vectorize.vectorize_sample(semantic, embedding, **kwargs)
  with pytest.raises(ValueError, match='direction logits shape'):
    vectorize.vectorize_sample(semantic, embedding, **kwargs,
                               direction=np.zeros((20, 31, 37), np.float32))
  with pytest.raises(ValueError, match='config.eval.ordering'):
    vectorize.vectorize_sample(semantic, embedding, **{**kwargs, 'ordering': 'greedy'})


def _pixel_sets(rng):
  """Pixel sets that exercise sort_points_by_dist's rules: thin and thick noisy lines,
  parallel lines (discards within 5 px of the chain), scattered points (jumps above 10 px,
  also after 90% of the steps), points on a lattice (equal distances, argmin's first index)."""
  sets = []
  for _ in range(4):
    mask = np.zeros((60, 90), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
      a, b = rng.integers([0, 0], [90, 60], (2, 2))
      cv2.line(mask, tuple(map(int, a)), tuple(map(int, b)), 1, int(rng.integers(1, 4)))
    mask[rng.integers(0, 60, 25), rng.integers(0, 90, 25)] = 1
    mask &= rng.uniform(size=mask.shape) < 0.8    # holes: steps above 1 px
    rows, cols = np.nonzero(mask)
    sets.append(np.stack([cols, rows], 1)[rng.permutation(len(rows))])
  lattice = np.stack(np.meshgrid(np.arange(0, 40, 4), np.arange(0, 12, 6)), -1).reshape(-1, 2)
  sets.append(lattice)
  line = np.stack([np.arange(40), np.zeros(40, int)], 1)
  sets.append(np.concatenate([line, [[49, 0], [60, 0], [80, 5]]]))  # late jumps: 10 px goes on,
  # 11 px ends the chain
  sets.append(np.concatenate([line, line[::3] + [0, 4]]))     # a parallel row 4 px away
  sets.append(np.array([[5, 5]]))
  return sets


@pytest.mark.parametrize('seed', [0, 1])
def test_sort_points_by_dist_matches_the_reference_loop(seed):
  for pixels in _pixel_sets(np.random.default_rng(seed)):
    want = _ref_sort(pixels)
    np.testing.assert_array_equal(ordering.sort_points_by_dist(pixels), want)
    # Non-integer points take the plain loop.
    np.testing.assert_array_equal(ordering.sort_points_by_dist(pixels + 0.25), want + 0.25)


@pytest.mark.parametrize('seed', [0, 1])
def test_connect_by_direction_matches_the_reference_walk(seed):
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for pixels in _pixel_sets(rng)[:-1]:
    lane = _ref_sort(pixels).astype(np.int32)
    height, width = lane[:, 1].max() + 1, lane[:, 0].max() + 1
    # Bins along the line with noise, some 'none' (-1), both of a pixel's bins sometimes equal.
    bins = rng.integers(-1, 36, (height, width, 2))
    bins[rng.uniform(size=(height, width)) < 0.5] = [0, 18]
    for start in {0, len(lane) - 1, int(rng.integers(0, len(lane)))}:
      got = ordering.connect_by_direction(lane, bins, start=start)
      points, taken = [lane[start].copy()], np.zeros((height, width, 2), bool)
      mask = torch.from_numpy(bins)
      _ref_walk(lane, mask, points, taken, 7, 10.0)
      points.reverse()
      _ref_walk(lane, mask, points, taken, 7, 10.0)
      np.testing.assert_array_equal(got, np.stack(points, 0))


def test_top2_directions_at_pixels_equal_the_whole_map():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (20, 30, 37)).astype(np.float32)
  logits[:3, :3] = 0.0                       # ties
  logits[5, 5, [3, 9]] = 20.0                # equal peaks
  rows, cols = rng.integers(0, 20, 50), rng.integers(0, 30, 50)
  np.testing.assert_array_equal(ordering.top2_directions(logits[rows, cols]),
                                ordering.top2_directions(logits)[rows, cols])
