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
from mapkd_jax import vectorize

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
