"""Exact DBSCAN without neighbour lists: sklearn's labels from a cover of the points by balls.

sklearn's DBSCAN lists every eps-neighbour of every point (radius_neighbors) and then walks the
lists. The vectorizer's inputs are the worst case for that: the 16-d instance embeddings of one
map line lie within eps of each other, so a class of N pixels makes about N^2 / lines pairs
(README: 43.7M pairs for 65.6k points on 6 reference-size samples), and listing and walking
them was half of vectorization. DBSCAN needs far less than the lists:

  core point     at least `min_samples` points (itself included) within eps: a COUNT;
  clusters       connected components of core points linked within eps: any spanning forest;
  border point   a non-core point within eps of a core point joins the cluster that sklearn's
                 depth-first walk reaches first. sklearn starts a walk at each still unlabelled
                 core point in index order and labels clusters 0, 1, ... in that order, so
                 cluster ids follow the smallest core index of each cluster, and a border point
                 reachable from several clusters takes the smallest id among them.

`dbscan` computes exactly these from a cover of the points by balls ("groups"): greedily, each
group is the not yet covered points within eps/2 (less a margin) of a centre, so every group is
a clique of eps-neighbours. For each point and group, the distance to the group's centre and the
group's radius bound all the point's distances to the members (triangle inequality): all
within eps, all beyond eps, or undecided. Only the undecided point-group pairs are tested pair
by pair. Counts then come from group sizes, cluster links from groups (each group's core
points are one clique), and border labels from the clusters of the groups in reach.

Exactness. A pair is within eps when its squared distance, summed feature by feature in float64
as sklearn's ball and k-d trees compute it, is <= eps * eps. Bulk distances come from one
matrix product (|a|^2 + |b|^2 - 2 a.b, on centred data); every pair whose product distance is
within a generous rounding band of eps^2 is recomputed by that feature-by-feature sum, and
group bounds are only used with a margin far above float64 rounding. So the neighbour relation
is the trees' leaf test for every pair; sklearn's own searches disagree with each other (brute
force by the product formula, trees through node bounds) only on pairs within float rounding
of eps, and so can this. Labels are sklearn's, cluster ids included (not only up to a
permutation); tests/test_cluster.py checks them against sklearn and a loop transcription of
sklearn's walk.
"""
import numpy as np
import threadpoolctl
from scipy import sparse
from scipy.sparse import csgraph

# Relative width of the band around eps^2 where a product-formula distance is recomputed, and
# of the margin kept by group bounds: float64 rounding of these 16-d sums is ~1e-15 relative,
# so nothing near either can be decided wrongly, while real pairs almost never fall in it.
_BAND = 1e-9

# Pair tests worth one within_eps call's fixed cost (choosing one block test over a call per
# group; a speed knob only).
_CALL_COST = 20000

# A cover with more than N / _DENSE_GROUPS groups takes the all-pairs path (speed only), in
# blocks of rows of at most _DENSE_BLOCK pairs (~32 MB of float64 distances).
_DENSE_GROUPS = 4
_DENSE_BLOCK = 1 << 22

_THREADPOOLS = []   # one threadpoolctl controller, made on first use (finding the libraries ~1 ms)


def _one_blas_thread():
  """Context: numpy's BLAS on one thread.

  The products here are [N, E] x [E, G] with E = 16 and G of tens: a second BLAS thread gains
  nothing, and on a loaded machine or beside the evaluation's worker processes its hand-offs
  made them 5-10x slower (measured on 2 loaded cores: DBSCAN calls 6x slower with two threads).
  """
  if not _THREADPOOLS:
    _THREADPOOLS.append(threadpoolctl.ThreadpoolController())
  return _THREADPOOLS[0].limit(limits=1, user_api='blas')


def squared_distances_exact(a, b):
  """[|a|, |b|] squared distances summed feature by feature in float64 (the trees' rdist).

  Same operations in the same order as sklearn's euclidean rdist loop
  (d += (x1[j] - x2[j])^2 for j = 0..E-1), so the same bits.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  out = np.zeros((len(a), len(b)))
  for k in range(a.shape[1]):
    diff = a[:, k, None] - b[None, :, k]
    out += diff * diff
  return out


def _pairwise_squared_exact(a, b):
  """[M] squared distances of row pairs a[m], b[m], feature by feature (as above)."""
  out = np.zeros(len(a))
  for k in range(a.shape[1]):
    diff = a[:, k] - b[:, k]
    out += diff * diff
  return out


def _product_squared_distances(a, b):
  """([|a|, |b|] |a_i|^2 + |b_j|^2 - 2 a_i.b_j, |a_i|^2, |b_j|^2): squared distances by one
  matrix product, in place (rounded: callers widen their tests by a band)."""
  sq_a = np.einsum('ij,ij->i', a, a)
  sq_b = np.einsum('ij,ij->i', b, b)
  d2 = a @ b.T
  d2 *= -2.0
  d2 += sq_a[:, None]
  d2 += sq_b[None, :]
  return d2, sq_a, sq_b


def within_eps(x_a, x_b, c_a, c_b, eps2):
  """[|a|, |b|] bool: pairs whose exact squared distance (above) is <= eps2.

  x_*: the points in float64; c_*: the same points centred (x - mean), for the product.
  """
  d2, sq_a, sq_b = _product_squared_distances(c_a, c_b)
  # One band for the block: the product's rounding is far below _BAND * (|a|^2 + |b|^2).
  band = _BAND * (sq_a.max(initial=0.0) + sq_b.max(initial=0.0) + eps2)
  inside = d2 <= eps2 - band
  unsure = d2 <= eps2 + band
  if np.count_nonzero(unsure) != np.count_nonzero(inside):
    rows, cols = np.nonzero(unsure & ~inside)
    inside[rows, cols] = _pairwise_squared_exact(x_a[rows], x_b[cols]) <= eps2
  return inside


def _greedy_centres(points, eps, radius2):
  """Centres of a greedy cover of `points` [M, E] by balls of squared radius `radius2`.

  Each step takes the first uncovered point, centres on the mean of the uncovered points within
  eps of it (the middle of its blob, which covers more of it than the point itself would), and
  covers the points within the radius of that centre; if the point itself is not among them,
  the centre is the point.
  """
  centres = []
  todo = points
  while len(todo):
    seed = todo[0]
    d2_seed = np.sum((todo - seed) ** 2, axis=1)
    centre = todo[d2_seed <= eps * eps].mean(axis=0)
    take = np.sum((todo - centre) ** 2, axis=1) <= radius2
    if not take[0]:
      centre, take = seed, d2_seed <= radius2
    centres.append(centre)
    todo = todo[~take]
  return np.asarray(centres).reshape(-1, points.shape[1])


def cover(centred, eps, margin, sample_size=256):
  """Groups of points around a few centres, each with a radius that bounds its members.

  Centres come from a greedy cover of an evenly strided sample of `sample_size` points (so its
  cost does not grow with N). Every point goes to its nearest centre, at distance t:
    t <= eps / 2 - margin   the centre's core ball: a CLIQUE (any two members within eps);
    t <= eps                the centre's shell (the thin outer layer of a 16-d blob): a group
                            whose radius bounds distances but whose members are not a clique;
    farther                 a group of its own (centre = the point, radius 0).
  Any grouping gives the same labels; this one only sets the speed.

  Args:
    centred: [N, E] float64 points.
    eps: DBSCAN radius.
    margin: absolute safety margin kept below eps / 2.
    sample_size: points the centres are chosen from.

  Returns:
    (group of each point [N] int64, centres [G, E], radii [G] (max member distance to the
     centre, computed directly), clique [G] bool).
  """
  num = len(centred)
  radius = eps / 2 - margin
  stride = max(1, -(-num // sample_size))
  centres = _greedy_centres(centred[::stride], eps, radius * radius)
  count = len(centres)
  nearest = np.argmin(_product_squared_distances(centred, centres)[0], axis=1)
  # The product formula only chose the centre; distances that bound are measured directly.
  dist = np.sqrt(np.sum((centred - centres[nearest]) ** 2, axis=1))
  key = np.where(dist <= radius, nearest,
                 np.where(dist <= eps, count + nearest, 2 * count + np.arange(num)))
  keys, group = np.unique(key, return_inverse=True)
  group = group.reshape(-1)
  alone = keys >= 2 * count
  own_point = np.clip(keys - 2 * count, 0, num - 1)
  group_centres = np.where(alone[:, None], centred[own_point], centres[keys % count])
  radii = np.zeros(len(keys))
  np.maximum.at(radii, group, np.where(key >= 2 * count, 0.0, dist))
  return group, group_centres, radii, keys < count


def dbscan(x, *, eps, min_samples):
  """sklearn.cluster.DBSCAN(eps, min_samples).fit_predict(x), without neighbour lists (below)."""
  with _one_blas_thread():
    return _dbscan(x, eps=eps, min_samples=min_samples)


def _dbscan(x, *, eps, min_samples):
  """sklearn.cluster.DBSCAN(eps, min_samples).fit_predict(x), without neighbour lists.

  Args:
    x: [N, E] points (any float dtype; compared in float64 like sklearn's trees).
    eps: neighbourhood radius (inclusive).
    min_samples: points within eps (the point included) that make a core point.

  Returns:
    [N] int64 labels: clusters 0, 1, ... numbered as sklearn does, -1 = noise.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'dbscan: want [N, E] points, got shape {x.shape}')
  eps = float(eps)
  if not eps > 0:
    raise ValueError(f'dbscan: eps must be > 0, got {eps}')
  num = len(x)
  if num == 0:
    return np.zeros(0, np.int64)
  eps2 = eps * eps
  # Bounds are worked out on centred points: a rounded mean shifts all points alike, and each
  # x - mean is off by at most 2^-53 of itself, far below the margin.
  centred = x - x.mean(axis=0)
  margin = _BAND * (eps + float(np.abs(centred).max()) + 1.0)
  group, centres, radii, clique = cover(centred, eps, margin)
  num_groups = len(radii)
  if num_groups * _DENSE_GROUPS > num:
    # Points mostly far apart (a class of noise pixels: most are groups of their own): the
    # group bounds decide little, and one test of every pair costs less than [N, groups]
    # bounds plus a call per group.
    return _dbscan_dense(x, centred, eps2, min_samples)
  sizes = np.bincount(group, minlength=num_groups)
  order = np.argsort(group, kind='stable')
  members = np.split(order, np.cumsum(sizes)[:-1])

  # The distance to a group's centre bounds the distances to all its members: all within eps
  # ('whole'), all beyond, or undecided (tested member by member where the answer matters).
  d2, sq_x, sq_c = _product_squared_distances(centred, centres)
  slack = _BAND * (sq_x.max() + sq_c.max() + eps2)
  whole = np.sqrt(d2 + slack) + radii <= eps - margin                   # [N, groups]
  undecided = ~whole & (np.sqrt(np.maximum(d2 - slack, 0.0)) - radii <= eps + margin)
  del d2
  # Counts matter only against min_samples: a point whose whole groups hold min_samples points
  # is core, one whose whole and undecided groups together hold fewer is not, and only the
  # rest are counted pair by pair. (Float products: BLAS, and exact for counts below 2^53.)
  size_f = sizes.astype(np.float64)
  counts = whole.astype(np.float64) @ size_f
  unsure = np.flatnonzero((counts < min_samples) &
                          (counts + undecided.astype(np.float64) @ size_f >= min_samples))
  if len(unsure):
    unsure_groups = undecided[unsure]                        # [unsure, groups]
    groups_in = np.flatnonzero(unsure_groups.any(axis=0))
    pairs = int(unsure_groups[:, groups_in].sum(axis=0) @ sizes[groups_in])
    cols = np.concatenate([members[g] for g in groups_in])
    # One test of the whole [unsure, members] block where it is not much larger than the
    # pairs needed (many small groups: noise points are groups of their own, and a call per
    # group cost more than the block), else group by group.
    if len(unsure) * len(cols) <= 2 * pairs + _CALL_COST * len(groups_in):
      inside = within_eps(x[unsure], x[cols], centred[unsure], centred[cols], eps2)
      inside &= unsure_groups[:, group[cols]]
      counts[unsure] += np.count_nonzero(inside, axis=1)
    else:
      for g in groups_in:
        rows = unsure[unsure_groups[:, g]]
        inside = within_eps(x[rows], x[members[g]], centred[rows], centred[members[g]], eps2)
        counts[rows] += np.count_nonzero(inside, axis=1)
  core = counts >= min_samples
  labels = np.full(num, -1, np.int64)
  if not core.any():
    return labels

  # Nodes of the cluster graph: a clique group is one node (its core points are linked to each
  # other), every point of another group a node of its own, and each non-clique group has a
  # hub node: a core point within eps of ALL of a group's members is linked to its hub, and
  # the hub to the group's core points, the same connectivity as the pairs (the core point
  # links them all) without listing them.
  num_cliques = int(clique.sum())
  group_node = np.where(clique, np.cumsum(clique) - 1, 0)     # clique groups' nodes
  loose = np.flatnonzero(~clique[group])                      # points of non-clique groups
  node = group_node[group]
  node[loose] = num_cliques + np.arange(len(loose))
  hub = np.full(num_groups, -1, np.int64)
  hub[~clique] = num_cliques + len(loose) + np.arange(num_groups - num_cliques)
  num_nodes = num_cliques + len(loose) + num_groups - num_cliques
  has_core = np.bincount(group[core], minlength=num_groups) > 0
  core_members = [m[core[m]] for m in members]

  core_rows = np.flatnonzero(core)
  whole_core = whole[core_rows] & has_core[None, :]           # [cores, groups]
  rows, cols = np.nonzero(whole_core)
  edges = [(node[core_rows[rows]], np.where(clique[cols], group_node[cols], hub[cols]))]
  # Hubs in use, linked to their groups' core points. Usually also linked otherwise (a lone
  # point is within eps of its own one-point group, so of its own hub), but not always: a
  # shell point needs not be within eps of its whole shell.
  hubbed = ~clique & whole_core.any(axis=0)
  for g in np.flatnonzero(hubbed):
    edges.append((np.full(len(core_members[g]), hub[g]), node[core_members[g]]))
  # Pair tests for links: a core point and an undecided group's core points. A link between
  # nodes already connected through the links above changes nothing, so those pairs are not
  # tested (most of them: neighbouring groups of one blob are joined by points within eps of
  # a whole group).
  tested_groups = np.flatnonzero(undecided.any(axis=0) & has_core)
  component = _components(edges, num_nodes)
  for g in tested_groups:
    rows = np.flatnonzero(undecided[:, g] & core)
    targets = core_members[g]
    if clique[g]:
      rows = rows[component[node[rows]] != component[group_node[g]]]
      if not len(rows):
        continue
      inside = within_eps(x[rows], x[targets], centred[rows], centred[targets], eps2)
      edges.append((node[rows[inside.any(axis=1)]], group_node[[g]]))
    elif len(rows):
      # Rows already in the one component of all the group's core points: nothing to link.
      reached = np.unique(component[node[targets]])
      if len(reached) == 1:
        rows = rows[component[node[rows]] != reached[0]]
        if not len(rows):
          continue
      inside = within_eps(x[rows], x[targets], centred[rows], centred[targets], eps2)
      # Rows of one clique node reach the same nodes: one edge per (node, member) is enough.
      row_nodes = node[rows]
      by_node = np.argsort(row_nodes, kind='stable')
      starts = np.flatnonzero(np.diff(row_nodes[by_node], prepend=-1))
      a, b = np.nonzero(np.logical_or.reduceat(inside[by_node], starts, axis=0))
      edges.append((row_nodes[by_node][starts][a], node[targets[b]]))
  component = _components(edges, num_nodes)

  # sklearn's ids: clusters in the order of their smallest core index.
  # core_rows ascend, so a component's first appearance among them is its smallest core index.
  labels[core_rows] = _first_index_rank(component[node[core_rows]])

  # Border points: the smallest cluster id among the core points within eps. A point within
  # eps of a whole group reaches all its core points: the group's smallest id.
  group_min = np.full(num_groups, num, np.int64)
  np.minimum.at(group_min, group[core_rows], labels[core_rows])
  border_rows = np.flatnonzero(~core)
  best = np.full(num, num, np.int64)
  best[border_rows] = np.where(whole[border_rows], group_min[None, :], num).min(
      axis=1, initial=num)
  for g in tested_groups:
    # A group whose smallest id is not below a point's best so far cannot lower it: untested.
    rows = np.flatnonzero(undecided[:, g] & ~core & (best > group_min[g]))
    if not len(rows):
      continue
    targets = core_members[g]
    inside = within_eps(x[rows], x[targets], centred[rows], centred[targets], eps2)
    if clique[g]:
      np.minimum.at(best, rows[inside.any(axis=1)], group_min[g])
    else:
      a, b = np.nonzero(inside)
      np.minimum.at(best, rows[a], labels[targets[b]])
  found = ~core & (best < num)
  labels[found] = best[found]
  return labels


def _dbscan_dense(x, centred, eps2, min_samples):
  """`_dbscan`'s labels from every pair's test (within_eps), a block of rows at a time.

  Quadratic like the group path on such input (it had [N, groups ~ N] bounds at once), but in
  blocks of at most _DENSE_BLOCK pairs, so memory stays bounded for a large noisy class.

  Args: x [N, E] float64 points, centred [N, E] the same centred, eps2 = eps^2, min_samples.
  Returns: [N] int64 labels.
  """
  num = len(x)
  block = int(max(1, min(1024, _DENSE_BLOCK // num)))
  blocks = [(lo, min(lo + block, num)) for lo in range(0, num, block)]
  counts = np.zeros(num, np.int64)
  for lo, hi in blocks:
    counts[lo:hi] = np.count_nonzero(within_eps(x[lo:hi], x, centred[lo:hi], centred, eps2),
                                     axis=1)
  core = counts >= min_samples
  labels = np.full(num, -1, np.int64)
  core_rows = np.flatnonzero(core)
  if not len(core_rows):
    return labels
  # Clusters: connected components of the core points' links; sklearn's ids in the order of
  # their smallest core index (core_rows ascend: the order of first appearance).
  xc, cc = x[core_rows], centred[core_rows]
  src, dst = [], []
  for lo in range(0, len(core_rows), block):
    a, b = np.nonzero(within_eps(xc[lo:lo + block], xc, cc[lo:lo + block], cc, eps2))
    src.append(a + lo)
    dst.append(b)
  component = _components(list(zip(src, dst)), len(core_rows))
  labels[core_rows] = _first_index_rank(component)
  # Border points: the smallest cluster id among the core points within eps.
  border_rows = np.flatnonzero(~core)
  for lo in range(0, len(border_rows), block):
    rows = border_rows[lo:lo + block]
    inside = within_eps(x[rows], xc, centred[rows], cc, eps2)
    best = np.where(inside, labels[core_rows][None, :], num).min(axis=1, initial=num)
    labels[rows[best < num]] = best[best < num]
  return labels


def _first_index_rank(component):
  """[M] component ids -> [M] ids renumbered 0, 1, ... in order of first appearance."""
  _, first, inverse = np.unique(component, return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int64)
  rank[np.argsort(first, kind='stable')] = np.arange(len(first))
  return rank[inverse.reshape(-1)]


def _components(edges, num_nodes):
  """[num_nodes] connected-component id of each node of the undirected graph `edges`
  ([(src, dst)] index arrays, either side broadcast against the other)."""
  src = np.concatenate([np.broadcast_to(a, np.broadcast_shapes(np.shape(a), np.shape(b)))
                        for a, b in edges])
  dst = np.concatenate([np.broadcast_to(b, np.broadcast_shapes(np.shape(a), np.shape(b)))
                        for a, b in edges])
  links = sparse.coo_matrix((np.ones(len(src), np.int8), (src, dst)),
                            shape=(num_nodes, num_nodes)).tocsr()
  return csgraph.connected_components(links, directed=False)[1]


def nearest_labels(points, labels, queries, *, eps, fallback):
  """Label of each query's nearest point if that one is within eps, else -1, by group bounds.

  The subsampled DBSCAN of vectorize.cluster_embeddings gives every other pixel the label of
  its nearest subset pixel. Which one is nearest matters only where the candidates disagree:
  with `points` covered by groups (`cover`), a query's nearest point lies in the groups whose
  lower distance bound is within the smallest upper bound, so where all of those groups'
  points carry one label and that upper bound is within eps (less a margin), that label is
  the answer whichever point is nearest. The other queries go to `fallback`.

  Args:
    points: [M, E] points (float64 compared).
    labels: [M] int labels of the points.
    queries: [Q, E] points to label.
    eps: radius within which the nearest point's label is taken.
    fallback: fn(query indices [K]) -> [K] labels, the exact search for undecided queries.

  Returns:
    [Q] int64 labels.
  """
  points = np.asarray(points, np.float64)
  queries = np.asarray(queries, np.float64)
  labels = np.asarray(labels, np.int64)
  out = np.full(len(queries), -1, np.int64)
  if not len(queries) or not len(points):
    return out
  with _one_blas_thread():
    mean = points.mean(axis=0)
    centred, centred_q = points - mean, queries - mean
    margin = _BAND * (eps + float(np.abs(centred).max()) + float(np.abs(centred_q).max()) + 1.0)
    group, centres, radii, _ = cover(centred, eps, margin)
    low = np.full(len(radii), np.iinfo(np.int64).max)
    high = np.full(len(radii), np.iinfo(np.int64).min)
    np.minimum.at(low, group, labels)
    np.maximum.at(high, group, labels)
    d2, sq_q, sq_c = _product_squared_distances(centred_q, centres)
    slack = _BAND * (sq_q.max() + sq_c.max() + eps * eps)
    reach = (np.sqrt(d2 + slack) + radii).min(axis=1)                   # nearest is within
    candidate = np.sqrt(np.maximum(d2 - slack, 0.0)) - radii <= (reach + margin)[:, None]
    low_q = np.where(candidate, low[None, :], np.iinfo(np.int64).max).min(axis=1)
    high_q = np.where(candidate, high[None, :], np.iinfo(np.int64).min).max(axis=1)
  decided = (low_q == high_q) & (reach <= eps - margin)
  out[decided] = low_q[decided]
  rest = np.flatnonzero(~decided)
  if len(rest):
    out[rest] = fallback(rest)
  return out
