"""Vectorization: rasters with known lines -> polylines within a pixel, ordered along the line."""
import cv2
import numpy as np
import pytest

from configs import tcs
from mapkd_jax.eval import trace
from mapkd_jax.eval import vectorize

BEV_X, BEV_Y = (-30.0, 30.0, 0.6), (-15.0, 15.0, 0.6)   # 100 x 50 canvas, 0.6 m pixels
CLASSES = ('divider', 'ped_crossing', 'boundary')
# The hand-made tests below are about ordering lines (tracing); they run without the reference's
# mask post-processing, standardization and softmax score (the pre-issue-15 settings), which
# tests/test_postprocess.py checks against a transcription of the reference.
KWARGS = dict(bev_x=BEV_X, bev_y=BEV_Y, class_names=CLASSES, eps=1.5, min_samples=5,
              max_cluster_pixels=4000, link_radius_px=1.5, line_width_px=5,
              simplify_tolerance=0.2, close_kernel_px=0, min_area_px=0, standardize=False,
              score='sigmoid')


def _canvas(embedding_dim=4):
  height, width = 50, 100
  semantic = np.full((height, width, 4), -4.0, np.float32)
  semantic[..., 0] = 0.0   # lines below have class logits > 0: argmax picks them
  return semantic, np.zeros((height, width, embedding_dim), np.float32)


def _pixel_centre_ref(col, row):
  """Loop-free but independent statement of the schema convention for one pixel."""
  return BEV_X[0] + BEV_X[2] / 2 + col * BEV_X[2], BEV_Y[0] + BEV_Y[2] / 2 + row * BEV_Y[2]


def _draw_disk_line(semantic, embedding, points, *, cls, logit, code, width=5):
  """Marks every pixel within width/2 of the segment chain `points` ((col, row) pixels)."""
  height, width_px = semantic.shape[:2]
  rows, cols = np.mgrid[:height, :width_px]
  grid = np.stack([cols, rows], axis=-1).astype(float)
  mask = np.zeros((height, width_px), bool)
  for a, b in zip(points[:-1], points[1:]):
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = np.clip(((grid - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    mask |= np.linalg.norm(grid - (a + t[..., None] * (b - a)), axis=-1) <= width / 2
  semantic[mask, cls] = logit
  embedding[mask, 0] = code
  return mask


def _distance_to_polyline(points, line):
  out = []
  for p in points:
    best = np.inf
    for a, b in zip(line[:-1], line[1:]):
      t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
      best = min(best, np.linalg.norm(p - (a + t * (b - a))))
    out.append(best)
  return np.asarray(out)


def test_pixels_to_metres_matches_schema_convention():
  pix = np.array([[0, 0], [99, 49], [12.0, 7.0]])
  got = vectorize.pixels_to_metres(pix, BEV_X, BEV_Y)
  want = np.array([_pixel_centre_ref(c, r) for c, r in pix])
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize('rows', [(10, 30), (12, 20)])
def test_two_parallel_lines_with_distinct_embeddings(rows):
  semantic, embedding = _canvas()
  for row, code in zip(rows, (0.0, 5.0)):
    _draw_disk_line(semantic, embedding, [(5, row), (90, row)], cls=1, logit=2.0, code=code)
  vectors = vectorize.vectorize_sample(semantic, embedding, **KWARGS)
  assert len(vectors) == 2
  assert all(v['cls'] == 'divider' for v in vectors)
  ys = sorted(np.mean(v['pts'][:, 1]) for v in vectors)
  for v, row in zip(sorted(vectors, key=lambda v: np.mean(v['pts'][:, 1])), rows):
    _, y_true = _pixel_centre_ref(0, row)
    x_start, _ = _pixel_centre_ref(5, row)
    x_end, _ = _pixel_centre_ref(90, row)
    np.testing.assert_array_less(np.abs(v['pts'][:, 1] - y_true), BEV_Y[2])
    # Ordered along the line: x strictly monotone, ends within a pixel of the drawn ends.
    dx = np.diff(v['pts'][:, 0])
    assert np.all(dx > 0) or np.all(dx < 0)
    np.testing.assert_allclose(sorted([v['pts'][0, 0], v['pts'][-1, 0]]), [x_start, x_end],
                               atol=BEV_X[2])
    assert v['score'] == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-5)
  assert ys[0] < ys[1]


def test_same_embedding_far_apart_lines_split_into_pieces():
  semantic, embedding = _canvas()
  _draw_disk_line(semantic, embedding, [(5, 10), (40, 10)], cls=3, logit=1.0, code=0.0)
  _draw_disk_line(semantic, embedding, [(60, 40), (95, 40)], cls=3, logit=1.0, code=0.0)
  vectors = vectorize.vectorize_sample(semantic, embedding, **KWARGS)
  assert [v['cls'] for v in vectors] == ['boundary', 'boundary']


def test_curved_line_follows_the_curve_in_order():
  semantic, embedding = _canvas()
  angles = np.linspace(0, np.pi / 2, 40)
  arc = np.stack([20 + 40 * np.cos(angles), 5 + 40 * np.sin(angles)], axis=1)  # (col, row)
  _draw_disk_line(semantic, embedding, arc, cls=2, logit=1.5, code=1.0)
  vectors = vectorize.vectorize_sample(semantic, embedding, **KWARGS)
  assert len(vectors) == 1 and vectors[0]['cls'] == 'ped_crossing'
  truth = vectorize.pixels_to_metres(arc, BEV_X, BEV_Y)
  pts = vectors[0]['pts']
  assert np.max(_distance_to_polyline(pts, truth)) < BEV_X[2]
  # Order: the angle about the arc centre changes monotonically along the polyline.
  centre = vectorize.pixels_to_metres(np.array([[20.0, 5.0]]), BEV_X, BEV_Y)[0]
  theta = np.arctan2(pts[:, 1] - centre[1], pts[:, 0] - centre[0])
  assert np.all(np.diff(theta) > 0) or np.all(np.diff(theta) < 0)


def test_empty_and_tiny_blobs_give_no_vectors():
  semantic, embedding = _canvas()
  assert vectorize.vectorize_sample(semantic, embedding, **KWARGS) == []
  semantic[20:22, 30:31, 1] = 5.0   # 2 pixels < min_samples
  assert vectorize.vectorize_sample(semantic, embedding, **KWARGS) == []


def test_subsampled_clustering_matches_full_on_separated_clusters():
  rng = np.random.default_rng(0)
  emb = np.concatenate([rng.normal(0, 0.1, (300, 3)), rng.normal(5, 0.1, (300, 3))])
  full = vectorize.cluster_embeddings(emb, eps=1.0, min_samples=10, max_pixels=10000)
  sub = vectorize.cluster_embeddings(emb, eps=1.0, min_samples=10, max_pixels=100)
  # Same partition (labels may be renumbered).
  assert len(set(zip(full, sub))) == 2 and set(full) == {0, 1}


def test_wrong_channel_count_is_rejected():
  semantic, embedding = _canvas()
  with pytest.raises(ValueError, match='channels'):
    vectorize.vectorize_sample(semantic[..., :3], embedding, **KWARGS)


def _pixel_graph_ref(pixels, radius):
  dense = np.zeros((len(pixels), len(pixels)))
  for i, a in enumerate(pixels):
    for j, b in enumerate(pixels):
      d = np.hypot(*(np.asarray(a, float) - b))
      if i != j and d <= radius:
        dense[i, j] = d
  return dense


@pytest.mark.parametrize('radius,count,seed', [(1.5, 40, 0), (1.0, 25, 1), (2.3, 60, 2),
                                               (1.5, 1, 3)])
def test_pixel_graph_matches_pair_loop(radius, count, seed):
  rng = np.random.default_rng(seed)
  flat = rng.choice(12 * 9, size=count, replace=False)
  pixels = np.stack([flat % 12, flat // 12], axis=1) - 3   # negative coordinates too
  got = trace.pixel_graph(pixels, radius).toarray()
  np.testing.assert_allclose(got, _pixel_graph_ref(pixels, radius), atol=1e-12)


def test_trim_ends_removes_arc_length_at_both_ends():
  line = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 6.0]])
  got = trace.trim_ends(line, 1.0)
  np.testing.assert_allclose(got, [[1.0, 0.0], [4.0, 0.0], [4.0, 5.0]])
  short = np.array([[0.0, 0.0], [1.5, 0.0]])
  np.testing.assert_allclose(trace.trim_ends(short, 1.0), short)


def test_subsampled_clustering_assigns_nearest_subset_label_like_a_loop():
  # Above max_pixels DBSCAN runs on every stride-th pixel; each other pixel takes the label of
  # its nearest subset pixel (brute-force loop here) when that one is within eps, else noise.
  from sklearn import cluster as sk_cluster
  rng = np.random.default_rng(3)
  centres = rng.normal(scale=6.0, size=(3, 4))
  emb = np.concatenate([c + rng.normal(scale=0.4, size=(70, 4)) for c in centres] +
                       [rng.normal(scale=8.0, size=(20, 4))]).astype(np.float32)
  emb = emb[rng.permutation(len(emb))]
  got = vectorize.cluster_embeddings(emb, eps=1.5, min_samples=10, max_pixels=60)
  stride = int(np.ceil(len(emb) / 60))
  subset = np.arange(0, len(emb), stride)
  sub_labels = sk_cluster.DBSCAN(eps=1.5, min_samples=round(10 / stride)).fit_predict(emb[subset])
  want = []
  for k, e in enumerate(emb):
    if k % stride == 0:
      want.append(sub_labels[k // stride])
      continue
    dists = [np.sqrt(np.sum((e.astype(float) - emb[s].astype(float)) ** 2)) for s in subset]
    best = int(np.argmin(dists))
    want.append(sub_labels[best] if dists[best] <= 1.5 else -1)
  np.testing.assert_array_equal(got, want)
  assert len(set(got.tolist()) - {-1}) == 3


def test_covered_width_matches_cv2():
  # Rows a horizontal and a slanted cv2 polyline cover across, per thickness.
  for thickness in range(1, 10):
    for end in ((70, 20), (70, 30)):
      canvas = np.zeros((40, 80), np.uint8)
      cv2.polylines(canvas, [np.array([(10, 10 if end[1] == 30 else 20), end], np.int32)],
                    False, 1, thickness=thickness)
      assert canvas[:, 40].sum() == vectorize.covered_width_px(thickness), (thickness, end)
  with pytest.raises(ValueError, match='thickness'):
    vectorize.covered_width_px(0)


def test_label_line_width_follows_label_thickness():
  data = tcs.get_config().data
  assert vectorize.label_line_width_px(data) == 7    # thickness 5 at 0.15 m covers 7 px
  data.bev_x, data.bev_y = (-30.0, 30.0, 0.6), (-15.0, 15.0, 0.6)
  assert vectorize.label_line_width_px(data) == 1    # thickness 1: a 1-px line


@pytest.mark.parametrize('seed', [0, 1])
def test_dbscan_searches_give_the_brute_force_labels(seed):
  # config.eval.dbscan_algorithm ('cover', the default, or sklearn's 'ball_tree') must only
  # change speed: sklearn's brute-force labels on clustered 16-d embeddings with noise, full
  # and subsampled (and so the same rest-to-subset assignment).
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=4.0, size=(5, 16))
  emb = np.concatenate([c + rng.normal(scale=0.4, size=(300, 16)) for c in centres]
                       + [rng.normal(scale=6.0, size=(100, 16))]).astype(np.float32)
  emb = emb[rng.permutation(len(emb))]
  for max_pixels in (10000, 700):
    want = vectorize.cluster_embeddings(emb, eps=1.5, min_samples=20, max_pixels=max_pixels,
                                        algorithm='brute')
    for algorithm in ('cover', 'ball_tree'):
      got = vectorize.cluster_embeddings(emb, eps=1.5, min_samples=20, max_pixels=max_pixels,
                                         algorithm=algorithm)
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        vectorize.cluster_embeddings(emb, eps=1.5, min_samples=20, max_pixels=max_pixels), want)
    assert len(np.unique(want[want >= 0])) == 5 and (want == -1).any()
  with pytest.raises(ValueError, match='algorithm'):   # a named error, not sklearn's
    vectorize.cluster_embeddings(emb, eps=1.5, min_samples=20, max_pixels=10000,
                                 algorithm='no_such_search')


def test_cover_dbscan_gives_the_sklearn_vectors_on_noisy_maps():
  """The default DBSCAN changes speed only: the vectors of sklearn's ball tree, bit for bit."""
  from mapkd_jax import eval_bench  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  total = 0
  # Tiny maps, and one reference-size map (200 x 400: subsampled DBSCAN, 16-d blobs' shells).
  for size, noise, lines in (('student,tiny', 0.3, 8), ('student,tiny', 0.6, 8),
                             ('student,tiny', 0.6, 8), ('student', 0.5, 6)):
    config = tcs.get_config(size)
    kwargs = vectorize.config_kwargs(config)
    assert kwargs['dbscan_algorithm'] == 'cover'
    semantic, embedding, _, direction = eval_bench.noisy_outputs(
        rng, config, num_lines=lines, noise=noise, direction=True)
    got = vectorize.vectorize_sample(semantic, embedding, direction=direction, **kwargs)
    want = vectorize.vectorize_sample(semantic, embedding, direction=direction,
                                      **{**kwargs, 'dbscan_algorithm': 'ball_tree'})
    np.testing.assert_equal(got, want)
    total += len(got)
  assert total >= 8


def _disk_ref(piece, points, reach):
  """Per point: the pixels with (point - pixel)^2 summed x then y <= reach^2, by loops."""
  sets = []
  for p in points:
    inside = []
    for k, q in enumerate(piece):
      dx, dy = float(p[0]) - float(q[0]), float(p[1]) - float(q[1])
      if dx * dx + dy * dy <= reach * reach:
        inside.append(k)
    sets.append(inside)
  return sets


@pytest.mark.parametrize('reach,seed', [(7.0, 0), (3.5, 1), (2.3, 2), (5.0, 3), (1.0, 4)])
def test_disk_lookup_matches_point_pixel_loop(reach, seed):
  rng = np.random.default_rng(seed)
  mask = np.zeros((30, 40), np.uint8)   # a thick curved line and scattered pixels
  cv2.polylines(mask, [np.asarray([[2, 25], [15, 10], [38, 14]], np.int32).reshape(-1, 1, 2)],
                False, 1, thickness=5)
  mask[rng.integers(0, 30, 40), rng.integers(0, 40, 40)] = 1
  rows, cols = np.nonzero(mask)
  piece = np.stack([cols, rows], axis=1).astype(np.float64) - [7, 3]   # negative coords too
  points = np.concatenate([
      piece[rng.choice(len(piece), 30)],                        # on pixels: exact-distance ties
      piece[rng.choice(len(piece), 30)] + rng.uniform(-3, 3, (30, 2)),
      rng.uniform(-20, 45, (30, 2)),                            # anywhere, also far outside
      [[-100.0, -100.0], [10.5, 2.5], [0.25, -0.75]]])
  disks = trace.DiskLookup(piece, reach)
  want_sets = _disk_ref(piece, points, reach)
  with np.errstate(invalid='ignore'):
    want_means = np.stack([piece[s].mean(axis=0) if s else [np.nan, np.nan]
                           for s in want_sets])
  assert any(not s for s in want_sets) and sum(map(len, want_sets)) > 100
  np.testing.assert_array_equal(disks.means(points), want_means)   # bit for bit, NaN if empty
  np.testing.assert_array_equal(disks.members(points), sorted(set().union(*want_sets)))
  for k in range(0, len(points), 7):   # single points too
    np.testing.assert_array_equal(disks.members(points[k:k + 1]), want_sets[k])
  # The k-d tree the lookup replaced found the same sets on these points.
  from sklearn import neighbors  # pylint: disable=g-import-not-at-top
  tree_sets = neighbors.KDTree(piece).query_radius(points, r=reach)
  assert [sorted(s.tolist()) for s in tree_sets] == want_sets


def test_disk_lookup_gives_the_kdtree_vectors_on_noisy_maps():
  """The default disk search changes speed only: the k-d tree path's vectors, bit for bit."""
  from mapkd_jax import eval_bench  # pylint: disable=g-import-not-at-top
  config = tcs.get_config('student,tiny')
  kwargs = {**vectorize.config_kwargs(config), 'ordering': 'trace'}   # the disks are the trace's
  rng = np.random.default_rng(5)
  total = 0
  for noise in (0.3, 0.6):
    for _ in range(3):
      semantic, embedding, _ = eval_bench.noisy_outputs(rng, config, num_lines=8, noise=noise)
      got = vectorize.vectorize_sample(semantic, embedding, **kwargs)
      want = vectorize.vectorize_sample(semantic, embedding, **kwargs, disk_search='kdtree')
      np.testing.assert_equal(got, want)
      total += len(got)
  # 5 vectors with the reference post-processing (issue 15; 6 samples): on 0.6 m pixels the
  # 50-pixel DBSCAN density keeps few instances.
  assert total >= 4
