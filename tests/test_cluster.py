"""eval/cluster.py: exact DBSCAN without neighbour lists == sklearn's DBSCAN, labels and ids."""
import numpy as np
import pytest
from sklearn import cluster as sk_cluster

from mapkd_jax.eval import cluster


def _sq_dist_loop(a, b):
  """Squared distance of two points, summed feature by feature in Python floats (float64)."""
  total = 0.0
  for u, v in zip(a, b):
    diff = float(u) - float(v)
    total += diff * diff
  return total


def _dbscan_loop(x, eps, min_samples):
  """A plain transcription of sklearn's DBSCAN: neighbour lists, core counts, then its walk.

  sklearn's dbscan_inner: for each unlabelled core point in index order, a depth-first walk
  labels everything reachable through core points; a non-core point keeps the first label.
  """
  x = np.asarray(x, np.float64)
  num = len(x)
  hoods = [[j for j in range(num) if _sq_dist_loop(x[i], x[j]) <= eps * eps]
           for i in range(num)]
  core = [len(h) >= min_samples for h in hoods]
  labels = [-1] * num
  label = 0
  for start in range(num):
    if labels[start] != -1 or not core[start]:
      continue
    stack = [start]
    while stack:
      i = stack.pop()
      if labels[i] != -1:
        continue
      labels[i] = label
      if core[i]:
        stack.extend(j for j in hoods[i] if labels[j] == -1)
    label += 1
  return np.asarray(labels)


def _sklearn(x, eps, min_samples, algorithm='ball_tree'):
  return sk_cluster.DBSCAN(eps=eps, min_samples=min_samples,
                           algorithm=algorithm).fit_predict(x)


def _blobs(rng, *, count, per_blob, dim, spread, noise_points, scale=4.0):
  """Embedding-like points: tight 16-d blobs (whose outer shells leave the core balls) + noise."""
  centres = rng.normal(scale=scale, size=(count, dim))
  points = [c + rng.normal(scale=spread, size=(per_blob, dim)) for c in centres]
  points.append(rng.normal(scale=2 * scale, size=(noise_points, dim)))
  points = np.concatenate(points).astype(np.float32)
  return points[rng.permutation(len(points))]


# dbscan's three ways to the same labels (speed knobs): the cover's group bounds with a pair
# test per group, the same with unsure counts tested as one block, and every pair tested
# (chosen when the cover has many groups). Each test taking `paths` runs on all three.
_PATHS = {'groups': dict(_DENSE_GROUPS=0, _CALL_COST=0),
          'groups_block': dict(_DENSE_GROUPS=0, _CALL_COST=10 ** 12),
          'dense': dict(_DENSE_GROUPS=10 ** 9, _DENSE_BLOCK=1000)}   # blocks of a few rows


@pytest.fixture(params=['auto'] + sorted(_PATHS))
def paths(request, monkeypatch):
  for name, value in _PATHS.get(request.param, {}).items():
    monkeypatch.setattr(cluster, name, value)
  return request.param


def test_squared_distances_exact_matches_a_loop():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(7, 16)), rng.normal(size=(5, 16))
  got = cluster.squared_distances_exact(a, b)
  want = [[_sq_dist_loop(p, q) for q in b] for p in a]
  np.testing.assert_array_equal(got, want)   # same order of operations: same bits


def test_within_eps_is_the_exact_test_including_pairs_at_eps():
  rng = np.random.default_rng(1)
  a = rng.integers(-24, 24, size=(40, 16)) / 8.0     # dyadic: the offsets below stay exact
  b = rng.normal(size=(30, 16))
  # Pairs exactly at eps and one float64 step beyond it, which the product cannot decide.
  b[:10] = a[:10] + np.eye(16)[:10] * 1.5
  a[10:20, :10][np.eye(10, dtype=bool)] = 0.0
  b[10:20] = a[10:20] + np.eye(16)[:10] * np.nextafter(1.5, 2.0)
  eps2 = 1.5 * 1.5
  centre = np.concatenate([a, b]).mean(axis=0)
  got = cluster.within_eps(a, b, a - centre, b - centre, eps2)
  want = np.array([[_sq_dist_loop(p, q) <= eps2 for q in b] for p in a])
  np.testing.assert_array_equal(got, want)
  assert want[:10, :10].diagonal().all() and not want[10:20, 10:20].diagonal().any()


@pytest.mark.parametrize('dim,eps,min_samples,seed', [
    (2, 0.08, 4, 0), (2, 0.15, 6, 1), (3, 0.2, 3, 2), (16, 1.5, 5, 3), (16, 2.6, 8, 4),
    (16, 1.0, 1, 5)])
def test_random_points_match_sklearn_and_the_loop(dim, eps, min_samples, seed, paths):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(160, dim)) * (1.0 if dim < 16 else 2.0)
  want = _dbscan_loop(x, eps, min_samples)
  np.testing.assert_array_equal(_sklearn(x, eps, min_samples), want)   # the loop is sklearn
  np.testing.assert_array_equal(cluster.dbscan(x, eps=eps, min_samples=min_samples), want)
  assert (want >= 0).any() or min_samples > 1


@pytest.mark.parametrize('seed,count,per_blob,spread,scale', [
    (0, 6, 300, 0.15, 4.0), (1, 6, 300, 0.2, 4.0),
    # Looser blobs: shells whose points link clusters and take border labels pair by pair
    # (found by removing those code paths: these inputs then fail).
    (2, 5, 80, 0.4, 4.0), (5, 5, 80, 0.3, 4.0), (6, 5, 150, 0.4, 1.0)])
def test_clustered_embeddings_match_sklearn(seed, count, per_blob, spread, scale):
  """Blobs as the instance embeddings make them: labels and ids equal to both sklearn searches."""
  rng = np.random.default_rng(seed)
  x = _blobs(rng, count=count, per_blob=per_blob, dim=16, spread=spread,
             noise_points=60 if per_blob == 300 else 30, scale=scale)
  for min_samples in (4, 10, 25, 120):
    want = _sklearn(x, 1.5, min_samples)
    np.testing.assert_array_equal(_sklearn(x, 1.5, min_samples, 'brute'), want)
    got = cluster.dbscan(x, eps=1.5, min_samples=min_samples)
    np.testing.assert_array_equal(got, want)
  assert len(np.unique(_sklearn(x, 1.5, 10)[_sklearn(x, 1.5, 10) >= 0])) >= 3


def test_blobs_missed_by_the_cover_sample_are_clusters(paths):
  """Small dense blobs none of whose points is in the cover's strided sample: their points are
  groups of their own, linked through their groups' hubs (a pair at min_samples 2 only so)."""
  rng = np.random.default_rng(8)
  big = _blobs(rng, count=4, per_blob=800, dim=16, spread=0.15, noise_points=0)
  small = rng.normal(size=16) * 8 + rng.normal(scale=0.1, size=(10, 16))
  pair = rng.normal(size=16) * 8 + rng.normal(scale=0.1, size=(2, 16))
  x = np.concatenate([big[:1], small, pair, big[1:]]).astype(np.float32)
  assert -(-len(x) // 256) > 12    # the sample x[::stride] holds none of rows 1..12
  for min_samples, clusters_of_pair in ((2, 1), (5, 0)):
    want = _sklearn(x, 1.5, min_samples)
    got = cluster.dbscan(x, eps=1.5, min_samples=min_samples)
    np.testing.assert_array_equal(got, want)
    assert len(set(want[1:11])) == 1 and want[1] >= 0
    assert len(set(want[11:13]) - {-1}) == clusters_of_pair


def test_clustered_embeddings_with_border_points_match_the_loop(paths):
  # Loose blobs of a few points: many border points and blobs that touch, every group kind
  # of the cover (core balls, shells, lone points), checked against the loop transcription.
  rng = np.random.default_rng(7)
  x = _blobs(rng, count=5, per_blob=40, dim=16, spread=0.3, noise_points=30, scale=1.0)
  for min_samples in (4, 12, 30):
    want = _dbscan_loop(x, 1.5, min_samples)
    got = cluster.dbscan(x, eps=1.5, min_samples=min_samples)
    np.testing.assert_array_equal(got, want)
  assert (want == -1).any() and want.max() >= 1


@pytest.mark.parametrize('b_first', [False, True])
def test_border_point_of_two_clusters_takes_the_earlier_cluster(b_first, paths):
  """sklearn's rule: a border point reachable from two clusters takes the smaller id, i.e. the
  cluster whose smallest core index comes first, not the nearer one."""
  cluster_a = [0.0, 0.05, 0.1, 0.3]        # 0.3 is 0.9 from the border point
  cluster_b = [2.15, 2.2, 2.3, 2.4]        # 2.15 is 0.95 from it
  border = [1.2]                           # 3 points within eps = 1 (itself included): not core
  parts = [cluster_b, cluster_a] if b_first else [cluster_a, cluster_b]
  x = np.asarray(parts[0] + border + parts[1])[:, None]
  got = cluster.dbscan(x, eps=1.0, min_samples=4)
  np.testing.assert_array_equal(got, _sklearn(x, 1.0, 4))
  np.testing.assert_array_equal(got, [0, 0, 0, 0, 0, 1, 1, 1, 1])   # border joins parts[0]


def test_lattice_ties_at_eps_match_sklearn(paths):
  """Points exactly eps apart are neighbours (<=), also where eps^2 itself rounds."""
  rng = np.random.default_rng(3)
  grid = np.stack(np.meshgrid(np.arange(14.0), np.arange(14.0)), -1).reshape(-1, 2)
  x = grid[rng.permutation(len(grid))[:120]]
  for eps, min_samples in ((1.0, 3), (np.sqrt(2.0), 4), (2.0, 6)):
    want = _dbscan_loop(x, eps, min_samples)
    np.testing.assert_array_equal(_sklearn(x, eps, min_samples), want)
    np.testing.assert_array_equal(cluster.dbscan(x, eps=eps, min_samples=min_samples), want)


def test_edge_cases(paths):
  assert cluster.dbscan(np.zeros((0, 16)), eps=1.5, min_samples=5).shape == (0,)
  np.testing.assert_array_equal(cluster.dbscan(np.ones((1, 3)), eps=1.0, min_samples=1), [0])
  np.testing.assert_array_equal(cluster.dbscan(np.ones((1, 3)), eps=1.0, min_samples=2), [-1])
  same = np.ones((10, 16), np.float32)
  np.testing.assert_array_equal(cluster.dbscan(same, eps=0.1, min_samples=10), [0] * 10)
  np.testing.assert_array_equal(cluster.dbscan(same, eps=0.1, min_samples=11), [-1] * 10)
  x = np.random.default_rng(0).normal(size=(50, 16)) * 10
  np.testing.assert_array_equal(cluster.dbscan(x, eps=1.5, min_samples=1), np.arange(50))


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match=r'\[N, E\]'):
    cluster.dbscan(np.zeros(5), eps=1.0, min_samples=2)
  with pytest.raises(ValueError, match='eps'):
    cluster.dbscan(np.zeros((5, 2)), eps=0.0, min_samples=2)


def test_cover_groups_bound_their_members():
  """The speed-up's invariants: radii bound the members, core balls are cliques."""
  rng = np.random.default_rng(4)
  x = _blobs(rng, count=4, per_blob=200, dim=16, spread=0.2, noise_points=20).astype(np.float64)
  centred = x - x.mean(axis=0)
  eps = 1.5
  group, centres, radii, clique = cluster.cover(centred, eps, 1e-9)
  assert clique.sum() >= 4 and (~clique).any() and len(radii) < len(x) / 4
  for g in range(len(radii)):
    members = centred[group == g]
    assert len(members)
    dist = np.sqrt(cluster.squared_distances_exact(members, centres[g:g + 1]))
    assert dist.max() <= radii[g] + 1e-12
    if clique[g]:
      assert radii[g] <= eps / 2
      assert cluster.squared_distances_exact(members, members).max() <= eps * eps


def _nearest_labels_loop(points, labels, queries, eps):
  """Per query: the label of the nearest point by a full distance scan, -1 beyond eps."""
  out = []
  for q in queries:
    d2 = [_sq_dist_loop(q, p) for p in points]
    best = int(np.argmin(d2))
    out.append(labels[best] if np.sqrt(d2[best]) <= eps else -1)
  return np.asarray(out)


@pytest.mark.parametrize('mixed', [False, True])
def test_nearest_labels_match_a_full_scan(mixed):
  """Labels decided by group bounds and those left to the fallback are the full scan's."""
  rng = np.random.default_rng(10)
  x = _blobs(rng, count=4, per_blob=150, dim=16, spread=0.15, noise_points=20).astype(
      np.float64)
  points, queries = x[::2], x[1::2]
  labels = cluster.dbscan(points, eps=1.5, min_samples=10)
  if mixed:   # neighbours disagree everywhere: (nearly) all queries need the exact search
    labels = rng.integers(0, 3, size=len(points))
  searched = []

  def fallback(rows):
    searched.append(len(rows))
    return _nearest_labels_loop(points, labels, queries[rows], 1.5)

  got = cluster.nearest_labels(points, labels, queries, eps=1.5, fallback=fallback)
  np.testing.assert_array_equal(got, _nearest_labels_loop(points, labels, queries, 1.5))
  if mixed:
    assert sum(searched) > 0.9 * len(queries)
  else:   # most decided by the bounds; the scattered noise points still searched
    assert 0 < sum(searched) < 0.2 * len(queries)
