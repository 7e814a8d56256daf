"""Raster head outputs of ONE sample -> scored polylines in ego-frame metres.

Per class (1..K-1 of the semantic channels), following HDMapNet's postprocess/ (vectorize.py,
cluster.py; P-MapNet and MapKD use the same) where config.eval says so (the default):
  1. Line pixels: pixels whose argmax over the semantic logits is that class; then
     (`reference_mask`) closed with cv2.MORPH_CLOSE and a `close_kernel_px` MORPH_ELLIPSE
     kernel (1 iteration; closing ADDS pixels, and those are clustered too), and every
     8-connected component of the closed mask with area <= `min_area_px` removed (the
     reference walks all connectedComponentsWithStats rows, label 0 = the background included;
     zeroing the background's pixels changes nothing, so only foreground components matter).
     The reference's sizes are 5 px and 100 px at 0.15 m; `postprocess_px` converts them to
     this canvas like the label width (config.eval.close_kernel_ref / min_area_ref).
     close_kernel_px 0 and min_area_px 0 turn both off (the argmax mask as it is: the
     behaviour before issue 15).
  2. Instances: DBSCAN on the pixels' instance embeddings (eps, min_samples from config.eval);
     noise is dropped. With `standardize` (the reference, default) the embeddings are first
     standardized per feature over that class's pixels by sklearn's StandardScaler (the
     reference's own call: same mean, scale and zero-variance rule), so eps is in units of
     each feature's standard deviation; standardize=False clusters the raw embeddings. The labels are scikit-learn's DBSCAN's; config.eval.dbscan_algorithm
     picks how they are computed: 'cover' (default, eval/cluster.py) from counts and a cover
     of the embeddings by small balls, without listing neighbour pairs (the 16-d embeddings
     of one line are all within eps of each other, so sklearn listed about N^2 / lines pairs
     and that was half of vectorization), or sklearn's own neighbour searches ('ball_tree',
     'brute', ...). All decide a pair by its squared distance against eps^2; they can differ
     only on pairs at a distance within float rounding of eps (brute force uses
     |a|^2 + |b|^2 - 2ab, the trees and 'cover' the direct difference). Above
     `max_cluster_pixels` pixels (0 / None: never, the reference and the default), DBSCAN runs on an evenly strided subset (min_samples scaled
     by the subset fraction, so the density criterion is unchanged) and every other pixel
     takes the label of its nearest subset pixel in embedding space if that one is within
     eps, else it is noise (with 'cover', pixels whose candidate nearest pixels all carry one
     label take it without the search: eval/cluster.py nearest_labels, the same labels).
  3. Order: a cluster's pixels are linked when closer than `link_radius_px` (a pixel graph);
     the backbone of its largest connected piece is the shortest path between the two ends of
     its geodesic diameter (double Dijkstra sweep), each backbone pixel moved to the mean of
     the cluster pixels within a line width, across the line (the centreline of the thick
     line), and half a line width is trimmed off each end (the labels' disk overshoot). Pixels
     the backbone covers are removed and the rest is traced again, so branches, the second
     half of closed rings and separate pieces become polylines of their own; pieces of fewer
     than `dbscan_min_samples` pixels are noise. The pixels within a line width of a point
     are found by row intervals of a lookup image (`DiskLookup`: exact, the k-d tree search
     it replaced was about a fifth of vectorization at the reference size).
     The direction head is NOT used: it is trained on a two-direction (sign-free) target
     (losses/task.py direction_loss), so it gives an axis, not an orientation, and the
     geodesic backbone already follows the line; polylines therefore run from the end found
     first (the geodesic end farthest from the cluster's first pixel in row-major order).
  3'. ordering='reference' (config.eval.ordering; the default stays the trace above): HDMapNet's
     own ordering, `reference_order`: the class probability (softmax, zero outside the class's
     instances) thinned by its NMS mask (max / average pools), each instance's surviving
     pixels sorted along its longer pixel range, chained by sort_points_by_dist and walked by
     connect_by_direction along the direction head's top-2 bins (7 px steps) from a start
     drawn by random.Random(ordering_seed) (the reference: random.randint, unseeded). The
     polyline is the visited integer pixels, not simplified (as the reference), one per
     instance; an instance with no NMS pixel, or one point, gives none. It keeps the
     reference's quirks: the second walk can step past the far end back over the first
     walk's pixels (tests/test_postprocess.py).
  4. Pixel (column j, row i) -> metres: x = x_min + (j + 0.5) * x_step,
     y = y_min + (i + 0.5) * y_step (the raster convention of data/schema.py); then shapely
     `simplify(simplify_tolerance)` in metres.
  5. Score ('softmax', the reference, default): the mean over the INSTANCE's pixels (its DBSCAN
     cluster on the closed mask) of the softmax over the semantic channels' probability of the
     class; every polyline traced from one instance carries its instance's score (the
     reference makes one polyline per instance). 'sigmoid' (before issue 15): the mean over
     the traced piece's pixels of sigmoid(semantic logit of the class), the per-channel BCE
     view of the semantic head.
"""
import random

import cv2
import numpy as np
import shapely
from scipy import sparse
from scipy import spatial
from scipy.sparse import csgraph
from sklearn import cluster as sk_cluster
from sklearn import preprocessing as sk_preprocessing

from mapkd_jax.data import dataset_info
from mapkd_jax.eval import cluster as cluster_lib

# DBSCAN searches of cluster_embeddings: this project's exact one (eval/cluster.py, no
# neighbour lists) and sklearn's neighbour searches (same labels, listing every pair).
DBSCAN_ALGORITHMS = ('cover', 'ball_tree', 'kd_tree', 'brute', 'auto')
# Instance scores (module docstring, step 5).
SCORES = ('softmax', 'sigmoid')


def cluster_embeddings(embedding, *, eps, min_samples, max_pixels, algorithm='cover'):
  """DBSCAN labels of [N, E] embeddings (-1 = noise), subsampled above `max_pixels` (0/None: never).

  `algorithm`: 'cover' (eval/cluster.py: sklearn's labels without listing neighbour pairs) or
  one of sklearn DBSCAN's neighbour searches ('ball_tree', 'kd_tree', 'brute', 'auto').
  """
  if algorithm not in DBSCAN_ALGORITHMS:
    raise ValueError(f'DBSCAN algorithm {algorithm!r} (config.eval.dbscan_algorithm) is not '
                     f'one of {DBSCAN_ALGORITHMS}')
  num = len(embedding)
  if num == 0:
    return np.zeros(0, np.int64)
  if max_pixels is not None and max_pixels < 0:
    raise ValueError(f'max_cluster_pixels (config.eval) must be >= 0 or None (0/None = cluster '
                     f'all pixels), got {max_pixels!r}')
  stride = int(np.ceil(num / max_pixels)) if max_pixels and num > max_pixels else 1
  subset = np.arange(0, num, stride)
  sub_min = max(1, int(round(min_samples / stride)))
  if algorithm == 'cover':
    sub_labels = cluster_lib.dbscan(embedding[subset], eps=eps, min_samples=sub_min)
  else:
    sub_labels = sk_cluster.DBSCAN(eps=eps, min_samples=sub_min,
                                   algorithm=algorithm).fit_predict(embedding[subset])
  if stride == 1:
    return sub_labels.astype(np.int64)
  # Subset pixels keep their own label (their nearest subset pixel is themselves); the others
  # take their nearest subset pixel's. A k-d tree in float64 instead of a brute-force search:
  # on reference-size maps this search was the largest cost of vectorization (profile in
  # eval_bench.py); both are exact nearest neighbours (only exact distance ties may resolve to
  # another subset pixel, of the same cluster unless two clusters are exactly equidistant).
  labels = np.full(num, -1, np.int64)
  labels[subset] = sub_labels
  rest = np.ones(num, bool)
  rest[subset] = False
  subset_x = embedding[subset].astype(np.float64)
  rest_x = embedding[rest].astype(np.float64)

  def nearest_search(queries):
    # leafsize 64, unbalanced: the same exact search, about 1.5x faster on these 16-d
    # embeddings than scipy's defaults (measured on eval_bench samples, identical results).
    dist, nearest = spatial.cKDTree(subset_x, leafsize=64, balanced_tree=False).query(
        rest_x[queries], k=1)
    return np.where(dist <= eps, sub_labels[nearest], -1)

  if algorithm == 'cover':
    # Most pixels' candidate nearest subset pixels all carry one label: that label, without
    # the search (eval/cluster.py nearest_labels); the others searched as below.
    labels[rest] = cluster_lib.nearest_labels(subset_x, sub_labels, rest_x, eps=eps,
                                              fallback=nearest_search)
  else:
    labels[rest] = nearest_search(np.arange(len(rest_x)))
  return labels


def standardize_features(features):
  """[N, E] -> [N, E]: sklearn StandardScaler's fit_transform, the reference's exact call.

  Per feature over the N rows: (x - mean) / std, a zero-variance feature divided by 1 (sklearn's
  rule). float32 in, float32 out, as the reference's float32 torch embeddings.
  """
  return sk_preprocessing.StandardScaler().fit_transform(features)


def reference_mask(class_mask, *, close_kernel_px, min_area_px):
  """The reference's pixel mask of one class (module docstring, step 1).

  Args:
    class_mask: [H, W] bool, the pixels whose semantic argmax is the class.
    close_kernel_px: MORPH_ELLIPSE kernel size of the closing; 0 = no closing.
    min_area_px: 8-connected components of the closed mask with area <= this are removed;
      0 = none (every component has area >= 1).

  Returns:
    [H, W] bool.
  """
  class_mask = np.asarray(class_mask)
  if class_mask.ndim != 2:
    raise ValueError(f'reference_mask: want an [H, W] mask, got shape {class_mask.shape}')
  for name, value in (('close_kernel_px', close_kernel_px), ('min_area_px', min_area_px)):
    if int(value) != value or value < 0:
      raise ValueError(f'{name} must be an integer >= 0 (0 = off), got {value!r}')
  image = class_mask.astype(np.uint8) * np.uint8(255)
  if close_kernel_px > 0:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(close_kernel_px),) * 2)
    image = cv2.morphologyEx(image, cv2.MORPH_CLOSE, kernel, iterations=1)
  if min_area_px > 0:
    _, labels, stats, _ = cv2.connectedComponentsWithStats(image, connectivity=8,
                                                           ltype=cv2.CV_32S)
    # All rows, the background's (label 0) included, as the reference: zeroing the
    # background's pixels is a no-op whatever its area.
    small = stats[:, cv2.CC_STAT_AREA] <= min_area_px
    image[small[labels]] = 0
  return image > 0


def postprocess_px(data_config, close_kernel_ref, min_area_ref):
  """(close_kernel_px, min_area_px) on a `config.data` canvas from reference pixels.

  The reference's sizes are pixels at config.data.thickness_ref_step (0.15 m). The kernel is a
  length: converted exactly as the label thickness (dataset_info.thickness_px:
  max(1, floor(k * ref_step / step + 0.5)), step = sqrt(rx * ry)), so 5 at 0.15 m stays 5,
  is 3 at 0.3 m and 1 (a 1x1 kernel: closing changes nothing) at 0.6 m. The area is an area:
  floor(a * ref_step^2 / (rx * ry) + 0.5), the same round-half-up, so 100 px = 2.25 m^2 is 100 at
  0.15 m, 25 at 0.3 m and 6 at 0.6 m (6.25 rounded). 0 stays 0 (off).
  """
  for name, value in (('close_kernel_ref', close_kernel_ref), ('min_area_ref', min_area_ref)):
    if int(value) != value or value < 0:
      raise ValueError(f'config.eval.{name} must be an integer >= 0 (0 = off), got {value!r}')
  if 'thickness_ref_step' not in data_config:
    raise ValueError("config.data has no 'thickness_ref_step' (configs/tcs.py defines it)")
  ref_step = float(data_config['thickness_ref_step'])
  bev_x, bev_y = tuple(data_config['bev_x']), tuple(data_config['bev_y'])
  kernel = (dataset_info.thickness_px(int(close_kernel_ref), ref_step, bev_x, bev_y)
            if close_kernel_ref else 0)
  area = 0
  if min_area_ref:
    # + 1e-9: 6.25 or x.5 computed from decimal steps must not round down by float error.
    area = int(np.floor(min_area_ref * ref_step * ref_step / (float(bev_x[2]) * float(bev_y[2]))
                        + 0.5 + 1e-9))
  return kernel, area


def _backbone(coords, graph):
  """Ordered pixel indices of the geodesic diameter of a connected pixel graph."""
  dist = csgraph.dijkstra(graph, indices=0)
  start = int(np.argmax(np.where(np.isfinite(dist), dist, -1)))
  dist, parent = csgraph.dijkstra(graph, indices=start, return_predecessors=True)
  node = int(np.argmax(np.where(np.isfinite(dist), dist, -1)))
  path = [node]
  while parent[node] >= 0:
    node = int(parent[node])
    path.append(node)
  return np.asarray(path[::-1])


class DiskLookup:
  """Pixels of a piece within a radius of arbitrary points: exact, by row intervals.

  The piece's pixels are integer (column, row) coordinates. In each image row the pixels
  within `reach` of a point form one interval of columns (the distance grows monotonically
  away from the point, also in floating point), so a point's disk is at most
  2 ceil(reach) + 2 row intervals, and per-row prefix sums of the occupancy and of the
  column coordinate give each interval's pixel count and coordinate sum in O(1): no
  neighbour lists, vectorized over the points. It replaces a k-d tree's query_radius (and
  sklearn's input checks per call, which cost more than the search on these small pieces;
  eval_bench profile). Same test as sklearn's tree, written out at each interval end:
  (point - pixel)^2 summed x then y, <= reach * reach. The sets can differ from the tree's
  only for a pixel whose squared distance is within float rounding of reach^2 and which
  the tree took through a node bound (sqrt(bound) <= reach): not seen on any sample.
  """

  def __init__(self, piece, reach):
    """piece: [N, 2] float64 integer-valued (column, row) pixels, distinct; reach: radius."""
    self.piece = np.asarray(piece, np.float64)
    self.reach = float(reach)
    self._r2 = self.reach * self.reach
    pixels = self.piece.astype(np.int64)
    self._origin = pixels.min(axis=0)
    local = pixels - self._origin
    width, height = local.max(axis=0) + 1
    self._lookup = np.full((height, width), -1, np.int64)    # [row, column] -> pixel index
    self._lookup[local[:, 1], local[:, 0]] = np.arange(len(pixels))
    occupied = self._lookup >= 0
    # [H, W + 1] prefix sums along each row: pixels and their (global) column coordinates.
    zero = np.zeros((height, 1), np.int64)
    self._count = np.concatenate([zero, np.cumsum(occupied, axis=1)], axis=1)
    columns = (np.arange(width, dtype=np.int64) + self._origin[0]) * occupied
    self._col_sum = np.concatenate([zero, np.cumsum(columns, axis=1)], axis=1)
    span = int(np.ceil(self.reach))
    self._row_offsets = np.arange(-span, span + 2)

  def intervals(self, points):
    """Per point and window row: (row [M, R], first column, last column, valid [M, R]).

    Local (lookup) coordinates; an empty interval has first > last or valid False.
    """
    px, py = points[:, :1], points[:, 1:]
    rows = np.floor(py) + self._row_offsets     # [M, R] global rows, integer-valued floats
    dy = py - rows
    dy2 = dy * dy
    half = np.sqrt(np.maximum(self._r2 - dy2, 0.0))
    first = np.ceil(px - half)
    last = np.floor(px + half)
    # sqrt and the rounding of px -/+ half may land one column off the exact test
    # (dx * dx + dy * dy <= reach^2, as the tree computes it): fix each end by one step,
    # outwards if the next column passes, inwards if this one fails.
    def inside(col):
      dx = px - col
      return dx * dx + dy2 <= self._r2
    first -= inside(first - 1.0)
    first += ~inside(first)
    last += inside(last + 1.0)
    last -= ~inside(last)
    height, width = self._lookup.shape
    rows = rows.astype(np.int64) - self._origin[1]
    first = np.clip(first.astype(np.int64) - self._origin[0], 0, width)
    last = np.minimum(last.astype(np.int64) - self._origin[0], width - 1)
    valid = (rows >= 0) & (rows < height) & (dy2 <= self._r2) & (first <= last)
    return np.clip(rows, 0, height - 1), first, last, valid

  def means(self, points):
    """[M, 2] mean of the pixels within `reach` of each point (NaN where there is none).

    Pixel coordinates are integers, so the sums are exact (int64): the same bits as a
    per-point mean of the same set in float64.
    """
    rows, first, last, valid = self.intervals(points)
    last1 = np.where(valid, last + 1, first)
    count = np.where(valid, self._count[rows, last1] - self._count[rows, first], 0)
    col_sum = np.where(valid, self._col_sum[rows, last1] - self._col_sum[rows, first], 0)
    sizes = count.sum(axis=1)
    sums = np.stack([col_sum.sum(axis=1),
                     (count * (rows + self._origin[1])).sum(axis=1)], axis=1)
    with np.errstate(invalid='ignore', divide='ignore'):
      return sums.astype(np.float64) / sizes[:, None]   # 0 / 0 = NaN: mean of an empty set

  def members(self, points):
    """Sorted indices of the pixels within `reach` of any of the points."""
    rows, first, last, valid = self.intervals(points)
    height, width = self._lookup.shape
    edges = np.zeros((height, width + 1), np.int64)   # +1 at an interval's start, -1 past it
    np.add.at(edges, (rows[valid], first[valid]), 1)
    np.add.at(edges, (rows[valid], last[valid] + 1), -1)
    covered = np.cumsum(edges[:, :width], axis=1) > 0
    return np.sort(self._lookup[covered & (self._lookup >= 0)])


class KDTreeDisks:
  """`DiskLookup`'s interface over sklearn's KDTree.query_radius: the search it replaced.

  Kept as the reference path (`disk_search='kdtree'`) that eval_bench times as 'before' and
  tests compare against.
  """

  def __init__(self, piece, reach):
    from sklearn import neighbors  # pylint: disable=g-import-not-at-top
    self.piece = np.asarray(piece, np.float64)
    self.reach = float(reach)
    self._tree = neighbors.KDTree(self.piece)

  def means(self, points):
    groups = self._tree.query_radius(points, r=self.reach)
    sizes = np.fromiter((len(g) for g in groups), np.int64, len(groups))
    flat = self.piece[np.concatenate(groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    with np.errstate(invalid='ignore', divide='ignore'):
      means = np.add.reduceat(flat, np.minimum(starts, max(len(flat) - 1, 0)), axis=0) \
          / sizes[:, None]
    means[sizes == 0] = np.nan
    return means

  def members(self, points):
    return np.unique(np.concatenate(self._tree.query_radius(points, r=self.reach)))


DISK_SEARCHES = {'lookup': DiskLookup, 'kdtree': KDTreeDisks}


def _centreline(piece, path_points, *, half_width, disk_search='lookup'):
  """Moves backbone points onto the centre of the thick line, across the line only.

  A geodesic diameter runs corner to corner and hugs the edges of a thick line. Each backbone
  point is moved, along the normal of the backbone, to the mean of the pixels within a full
  line width (mean shift, three times: from an edge one step only gets part way); moving
  along the normal too would pull the line ends inward.

  Returns:
    (centre points [M, 2], indices of the piece pixels within a line width of the backbone).
  """
  disks = DISK_SEARCHES[disk_search](piece, 2 * half_width)
  # Tangents from isotropic disk means (centred across the line even where the backbone
  # hugs an edge), over two line widths: long enough that the corner hook at each end of the
  # diameter does not tilt them, short enough to follow curves.
  rough = disks.means(disks.means(path_points))
  span = max(1, int(np.ceil(4 * half_width)))
  index = np.arange(len(rough))
  tangent = rough[np.minimum(index + span, len(rough) - 1)] - rough[np.maximum(index - span, 0)]
  tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
  normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
  centre = path_points.copy()
  for _ in range(3):
    offset = np.sum((disks.means(centre) - centre) * normal, axis=1, keepdims=True)
    centre = centre + normal * offset
  return centre, disks.members(centre)


def pixel_graph(pixels, radius):
  """Sparse graph linking integer pixels closer than or at `radius`, weighted by distance.

  Built from a lookup image and the fixed set of neighbour offsets, which on a pixel grid is
  exact and far cheaper than a generic radius search.

  Args:
    pixels: [N, 2] integer (column, row) coordinates, all distinct.
    radius: link distance in pixels.

  Returns:
    [N, N] scipy CSR matrix (symmetric).
  """
  pixels = np.asarray(pixels, np.int64)
  reach = int(np.floor(radius))
  offsets = [(dc, dr) for dc in range(-reach, reach + 1) for dr in range(-reach, reach + 1)
             if 0 < np.hypot(dc, dr) <= radius]
  origin = pixels.min(axis=0) - reach
  local = pixels - origin
  lookup = np.full(tuple(local.max(axis=0) + reach + 1), -1, np.int64)
  lookup[local[:, 0], local[:, 1]] = np.arange(len(pixels))
  src, dst, weight = [], [], []
  for dc, dr in offsets:
    neighbour = lookup[local[:, 0] + dc, local[:, 1] + dr]
    linked = neighbour >= 0
    src.append(np.flatnonzero(linked))
    dst.append(neighbour[linked])
    weight.append(np.full(linked.sum(), np.hypot(dc, dr)))
  src, dst, weight = (np.concatenate(a) if a else np.zeros(0) for a in (src, dst, weight))
  return sparse.csr_matrix((weight, (src, dst)), shape=(len(pixels), len(pixels)))


def trim_ends(points, length):
  """Shortens a polyline by `length` of arc at each end (kept whole if not 2x longer)."""
  seg = np.hypot(*np.diff(points, axis=0).T)
  arc = np.concatenate([[0.0], np.cumsum(seg)])
  if arc[-1] <= 2 * length:
    return points
  stations = np.concatenate([[length], arc[(arc > length) & (arc < arc[-1] - length)],
                             [arc[-1] - length]])
  return np.stack([np.interp(stations, arc, points[:, 0]),
                   np.interp(stations, arc, points[:, 1])], axis=1)


def trace_polylines(coords, *, link_radius, half_width, min_pixels, disk_search='lookup'):
  """Orders a cluster's pixels into centreline polylines (module docstring, step 3).

  Args:
    coords: [N, 2] integer (column, row) pixel coordinates of one cluster, distinct.
    link_radius: pixels closer than this are neighbours.
    half_width: pixels within this of a backbone pixel are its cross-section.
    min_pixels: smaller pieces are dropped.
    disk_search: 'lookup' (`DiskLookup`) or 'kdtree' (the k-d tree it replaced, same sets).

  Returns:
    List of (points [M, 2] (column, row) float64 ordered along the line, member indices
    into coords).
  """
  coords = np.asarray(coords)
  full_graph = pixel_graph(coords, link_radius)
  coords = coords.astype(np.float64)
  remaining = np.arange(len(coords))
  graph = full_graph
  out = []
  while len(remaining) >= max(min_pixels, 2):
    sub = coords[remaining]
    _, comp = csgraph.connected_components(graph, directed=False)
    largest = np.flatnonzero(comp == np.argmax(np.bincount(comp)))
    if len(largest) < max(min_pixels, 2):
      break
    piece = sub[largest]
    # Slicing a canonical CSR matrix by all its (sorted) indices gives it back unchanged:
    # skip the copy when the piece is the whole remaining graph (the common case).
    piece_graph = graph if len(largest) == len(remaining) else graph[largest][:, largest]
    path = _backbone(piece, piece_graph)
    centre, members = _centreline(piece, piece[path], half_width=half_width,
                                  disk_search=disk_search)
    if len(path) >= 2:
      # Labels are dilated by a disk, so the thick line overshoots each end of the true
      # polyline by half a line width: take that back.
      out.append((trim_ends(centre, half_width), remaining[largest[members]]))
    # Drop what this backbone explains; what is left (branches, the rest of a ring) or the
    # other pieces are traced next.
    keep = np.ones(len(remaining), bool)
    keep[largest[members]] = False
    remaining = remaining[keep]
    if len(remaining) >= max(min_pixels, 2):
      graph = full_graph[remaining][:, remaining]
  return out


# Polyline orderings of vectorize_sample (module docstring, step 3).
ORDERINGS = ('trace', 'reference')


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
  """One instance's polyline by the reference's ordering (module docstring, step 3).

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


def pixels_to_metres(points, bev_x, bev_y):
  """[N, 2] (column, row) pixel coordinates -> [N, 2] (x, y) ego metres (pixel centres)."""
  points = np.asarray(points, np.float64)
  return np.stack([bev_x[0] + (points[:, 0] + 0.5) * bev_x[2],
                   bev_y[0] + (points[:, 1] + 0.5) * bev_y[2]], axis=1)


def covered_width_px(thickness):
  """Pixels across a line that cv2.polylines covers at cv2 `thickness` (round caps).

  Measured on cv2: thickness 1 -> 1 px, an odd t >= 3 -> t + 2, an even t -> t + 1.
  """
  thickness = int(thickness)
  if thickness < 1:
    raise ValueError(f'cv2 thickness must be >= 1, got {thickness}')
  if thickness == 1:
    return 1
  return thickness + 2 if thickness % 2 else thickness + 1


def label_line_width_px(data_config):
  """The vectorizer's `line_width_px` for a `config.data`: the covered width of its labels.

  The labels are drawn with cv2 thickness dataset_info.label_width_spec(...)['label_thickness_px']
  (the reference's thickness converted to this canvas), which covers `covered_width_px` pixels
  across; the centreline search and end trim use half of that.
  """
  return covered_width_px(dataset_info.label_width_spec(data_config)['label_thickness_px'])


def config_kwargs(config):
  """`vectorize_sample`'s keyword arguments from a full config (config.data, config.eval)."""
  data, ev = config.data, config.eval
  close_kernel_px, min_area_px = postprocess_px(data, ev.close_kernel_ref, ev.min_area_ref)
  return dict(bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y), class_names=tuple(data.classes),
              eps=ev.dbscan_eps, min_samples=ev.dbscan_min_samples,
              max_cluster_pixels=ev.max_cluster_pixels, link_radius_px=ev.link_radius_px,
              line_width_px=label_line_width_px(data), simplify_tolerance=ev.simplify_tolerance,
              dbscan_algorithm=ev.dbscan_algorithm, close_kernel_px=close_kernel_px,
              min_area_px=min_area_px, standardize=bool(ev.standardize), score=ev.score,
              ordering=ev.ordering, ordering_seed=ev.ordering_seed)


def softmax_probability(semantic_logits):
  """[H, W, K] logits -> [H, W, K] float32 softmax over K (the reference's segmentation.softmax)."""
  shifted = semantic_logits - semantic_logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def vectorize_sample(semantic_logits, embedding, *, bev_x, bev_y, class_names, eps, min_samples,
                     max_cluster_pixels, link_radius_px, line_width_px, simplify_tolerance,
                     dbscan_algorithm='cover', disk_search='lookup', close_kernel_px=5,
                     min_area_px=100, standardize=True, score='softmax', ordering='trace',
                     direction=None, ordering_seed=0):
  """Polylines of one sample from its head outputs.

  Args:
    semantic_logits: [H, W, K] logits, channel 0 background, 1..K-1 = class_names.
    embedding: [H, W, E] instance embeddings.
    bev_x, bev_y: (min, max, step) metres of the canvas.
    class_names: names of channels 1..K-1.
    eps, min_samples, max_cluster_pixels, dbscan_algorithm: DBSCAN (config.eval.dbscan_eps,
      ...); max_cluster_pixels 0 / None clusters all pixels.
    link_radius_px: pixel-graph neighbour radius (config.eval.link_radius_px).
    line_width_px: pixels across a label line on this canvas (`label_line_width_px(config.data)`:
      the covered width of the cv2-drawn labels); half of it is the centreline search radius
      and the trim at each end.
    simplify_tolerance: metres (config.eval.simplify_tolerance).
    disk_search: centreline disk search, 'lookup' (default) or 'kdtree' (the one it replaced,
      for eval_bench's 'before' path; same vectors).
    close_kernel_px, min_area_px: `reference_mask` on THIS canvas (`postprocess_px` converts
      config.eval's reference pixels; the defaults are the reference's own, at 0.15 m);
      0 = off.
    standardize: StandardScaler before DBSCAN (the reference) or raw embeddings.
    score: 'softmax' (the reference) or 'sigmoid' (module docstring, step 5).
    ordering: 'trace' (the centreline trace, default) or 'reference' (HDMapNet's NMS, sort and
      direction walk: `reference_order`; needs `direction`; points are the integer pixels the
      walk visits, not simplified, as the reference's).
    direction: [H, W, D + 1] direction-head logits (channel 0 = none), for 'reference'.
    ordering_seed: seeds the walk starts the reference draws with random.randint.

  Returns:
    [{'cls': name, 'pts': [M, 2] float64 (x, y) metres, 'score': float}, ...]; the semantic
    argmax map is not returned (callers compute it once for IoU).
  """
  semantic_logits = np.asarray(semantic_logits, np.float32)
  embedding = np.asarray(embedding)
  if semantic_logits.ndim != 3 or semantic_logits.shape[-1] != len(class_names) + 1:
    raise ValueError(f'vectorize_sample: semantic logits have shape {semantic_logits.shape}, '
                     f'want [H, W, {len(class_names) + 1}]: {len(class_names) + 1} channels (background + '
                     f'{list(class_names)})')
  if embedding.ndim != 3 or embedding.shape[:2] != semantic_logits.shape[:2]:
    raise ValueError(f'vectorize_sample: embedding shape {embedding.shape} is not [H, W, E] '
                     f'on the semantic logits\' [H, W] = {semantic_logits.shape[:2]}')
  if score not in SCORES:
    raise ValueError(f'score {score!r} (config.eval.score) is not one of {SCORES}')
  if not np.all(np.isfinite(semantic_logits)) or not np.all(np.isfinite(embedding)):
    raise ValueError('vectorize_sample: the semantic logits or the embedding hold NaN or inf')
  if ordering not in ORDERINGS:
    raise ValueError(f'ordering {ordering!r} (config.eval.ordering) is not one of {ORDERINGS}')
  if ordering == 'reference':
    return _reference_vectors(
        semantic_logits, embedding, direction, bev_x=bev_x, bev_y=bev_y,
        class_names=class_names, eps=eps, min_samples=min_samples,
        max_cluster_pixels=max_cluster_pixels, dbscan_algorithm=dbscan_algorithm,
        close_kernel_px=close_kernel_px, min_area_px=min_area_px, standardize=standardize,
        score=score, seed=ordering_seed)
  vectors = []
  for k, coords, class_prob, instance_score in instances(
      semantic_logits, embedding, eps=eps, min_samples=min_samples,
      max_cluster_pixels=max_cluster_pixels, dbscan_algorithm=dbscan_algorithm,
      close_kernel_px=close_kernel_px, min_area_px=min_area_px, standardize=standardize,
      score=score):
    for centre, members in trace_polylines(coords, link_radius=link_radius_px,
                                           half_width=line_width_px / 2,
                                           min_pixels=min_samples,
                                           disk_search=disk_search):
      line = shapely.LineString(pixels_to_metres(centre, bev_x, bev_y))
      simple = np.asarray(line.simplify(simplify_tolerance).coords, np.float64)
      piece_score = (instance_score if score == 'softmax'
                     else float(class_prob[members].mean()))
      vectors.append({'cls': class_names[k - 1], 'pts': simple, 'score': piece_score})
  return vectors


def _reference_vectors(semantic_logits, embedding, direction, *, bev_x, bev_y, class_names,
                       seed, **instance_kwargs):
  """vectorize_sample with ordering='reference' (HDMapNet postprocess/vectorize.py's loop)."""
  if direction is None:
    raise ValueError("ordering 'reference' (config.eval.ordering) needs the direction head's "
                     'logits: vectorize_sample(..., direction=[H, W, D + 1])')
  direction = np.asarray(direction, np.float32)
  if direction.ndim != 3 or direction.shape[:2] != semantic_logits.shape[:2] or \
      direction.shape[-1] < 2:
    raise ValueError(f'vectorize_sample: direction logits shape {direction.shape} is not '
                     f'[H, W, D + 1] on the semantic logits\' [H, W] = '
                     f'{semantic_logits.shape[:2]}')
  if not np.all(np.isfinite(direction)):
    raise ValueError('vectorize_sample: the direction logits hold NaN or inf')
  bins = top2_directions(direction)
  per_deg = 360.0 / (direction.shape[-1] - 1)
  softmax = softmax_probability(semantic_logits)
  found = instances(semantic_logits, embedding, **instance_kwargs)
  start_rng = random.Random(seed)
  vectors = []
  for k in sorted({k for k, *_ in found}):
    of_class = [(coords, score) for kk, coords, _, score in found if kk == k]
    # The NMS runs on the class probability with every pixel outside the class's instances
    # zeroed (the reference zeroes it in place before its pools).
    member = np.zeros(semantic_logits.shape[:2], bool)
    for coords, _ in of_class:
      member[coords[:, 1], coords[:, 0]] = True
    nms = reference_nms_mask(np.where(member, softmax[..., k], np.float32(0)))
    for coords, score in of_class:
      points = reference_order(coords, nms, bins, start_rng=start_rng, per_deg=per_deg)
      # The reference keeps a one-point "polyline"; no line distance is defined on it.
      if points is None or len(points) < 2:
        continue
      vectors.append({'cls': class_names[k - 1],
                      'pts': pixels_to_metres(points, bev_x, bev_y), 'score': score})
  return vectors


def instances(semantic_logits, embedding, *, eps, min_samples, max_cluster_pixels,
              dbscan_algorithm, close_kernel_px, min_area_px, standardize, score):
  """Instances of every class (module docstring, steps 1, 2 and 5's instance score).

  Args: as `vectorize_sample` (semantic_logits [H, W, K] float32, embedding [H, W, E]).

  Returns:
    [(class channel k >= 1, pixels [N, 2] int (column, row) in row-major order,
      the class probability of each pixel [N] float32 (softmax or sigmoid, per `score`),
      instance score: float64 mean of those)], classes in channel order, instances in
      DBSCAN label order.
  """
  classes = np.argmax(semantic_logits, axis=-1)
  if score == 'softmax':
    prob = softmax_probability(semantic_logits)
  else:
    prob = 1.0 / (1.0 + np.exp(-semantic_logits))
  out = []
  for k in range(1, semantic_logits.shape[-1]):
    mask = reference_mask(classes == k, close_kernel_px=close_kernel_px,
                          min_area_px=min_area_px)
    rows, cols = np.nonzero(mask)   # row-major, the reference's np.where order
    if len(rows) < min_samples:
      continue    # DBSCAN would find only noise (the reference: no instance)
    features = embedding[rows, cols]
    if standardize:
      features = standardize_features(features)
    labels = cluster_embeddings(features, eps=eps, min_samples=min_samples,
                                max_pixels=max_cluster_pixels, algorithm=dbscan_algorithm)
    class_prob = prob[rows, cols, k]
    coords = np.stack([cols, rows], axis=1)
    for label in np.unique(labels[labels >= 0]):
      idx = np.flatnonzero(labels == label)
      # The reference's confidence is torch's float32 mean over the instance's pixels; here
      # float64 (they differ in the last float32 bits only).
      out.append((k, coords[idx], class_prob[idx],
                  float(class_prob[idx].astype(np.float64).mean())))
  return out
