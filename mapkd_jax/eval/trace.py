"""Centreline trace: a cluster's pixels -> ordered centreline polylines (ordering='trace').

vectorize.py's step 3 (its docstring). A cluster's pixels are linked when closer than a link
radius (`pixel_graph`); the backbone of its largest connected piece is the shortest path between
the two ends of its geodesic diameter (`_backbone`, a double Dijkstra sweep), each backbone
pixel moved across the line to the mean of the cluster pixels within a line width
(`_centreline`), and half a line width trimmed off each end (`trim_ends`). The pixels within a
line width of a point come from `DiskLookup` (row intervals of a lookup image, exact) or, as the
path eval_bench times as 'before', sklearn's k-d tree (`KDTreeDisks`, same sets).
"""
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph


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
  """Orders a cluster's pixels into centreline polylines (vectorize.py docstring, step 3).

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
