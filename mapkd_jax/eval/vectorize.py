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
     reference's own call: same mean, scale and zero-variance rule), so eps is in units of each
     feature's standard deviation; standardize=False clusters the raw embeddings. The labels are
     scikit-learn's DBSCAN's; config.eval.dbscan_algorithm picks how they are computed: 'cover'
     (default, eval/cluster.py) from counts and a cover of the embeddings by small balls,
     without listing neighbour pairs (the 16-d embeddings of one line are all within eps of each
     other, so sklearn listed about N^2 / lines pairs and that was half of vectorization), or
     sklearn's own neighbour searches ('ball_tree', 'brute', ...). All decide a pair by its
     squared distance against eps^2; they can differ only on pairs at a distance within float
     rounding of eps (brute force uses |a|^2 + |b|^2 - 2ab, the trees and 'cover' the direct
     difference). Above `max_cluster_pixels` pixels (0 / None: never, the reference and the
     default), DBSCAN runs on an evenly strided subset (min_samples scaled by the subset
     fraction, so the density criterion is unchanged) and every other pixel takes the label of
     its nearest subset pixel in embedding space if that one is within eps, else it is noise
     (with 'cover', pixels whose candidate nearest pixels all carry one label take it without
     the search: eval/cluster.py nearest_labels, the same labels).
  3. Order, ordering='trace' (eval/trace.py; config.eval's default before session 8): a
     cluster's pixels are linked when closer than `link_radius_px` (a pixel graph); the backbone
     of its largest connected piece is the shortest path between the two ends of its geodesic
     diameter (double Dijkstra sweep), each backbone pixel moved to the mean of the cluster
     pixels within a line width, across the line (the centreline of the thick line), and half a
     line width is trimmed off each end (the labels' disk overshoot). Pixels the backbone covers
     are removed and the rest is traced again, so branches, the second half of closed rings and
     separate pieces become polylines of their own; pieces of fewer than `dbscan_min_samples`
     pixels are noise. The pixels within a line width of a point are found by row intervals of a
     lookup image (trace.DiskLookup: exact, the k-d tree search it replaced was about a fifth of
     vectorization at the reference size). The trace does NOT use the direction head: it is
     trained on a two-direction (sign-free) target (losses/task.py direction_loss), so it gives
     an axis, not an orientation, and the geodesic backbone already follows the line; polylines
     therefore run from the end found first (the geodesic end farthest from the cluster's first
     pixel in row-major order).
  3'. ordering='reference' (config.eval.ordering's default; eval/ordering.py): HDMapNet's own
     ordering, ordering.reference_order: the class probability (softmax, zero outside the
     class's instances) thinned by its NMS mask (max / average pools), each instance's surviving
     pixels sorted along its longer pixel range, chained by sort_points_by_dist and walked by
     connect_by_direction along the direction head's top-2 bins (7 px steps) from a start drawn
     by random.Random(ordering_seed) (the reference: random.randint, unseeded). The polyline is
     the visited integer pixels, not simplified (as the reference), one per instance; an
     instance with no NMS pixel, or one point, gives none. It keeps the reference's quirks: the
     second walk can step past the far end back over the first walk's pixels
     (tests/test_postprocess.py).
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
import cv2
import numpy as np
import shapely
from scipy import spatial
from sklearn import cluster as sk_cluster
from sklearn import preprocessing as sk_preprocessing

from mapkd_jax.data import dataset_info
from mapkd_jax.eval import cluster as cluster_lib
from mapkd_jax.eval import ordering as ordering_lib
from mapkd_jax.eval import trace as trace_lib

# DBSCAN searches of cluster_embeddings: this project's exact one (eval/cluster.py, no
# neighbour lists) and sklearn's neighbour searches (same labels, listing every pair).
DBSCAN_ALGORITHMS = ('cover', 'ball_tree', 'kd_tree', 'brute', 'auto')
# Instance scores (module docstring, step 5).
SCORES = ('softmax', 'sigmoid')
# Polyline orderings (module docstring, steps 3 and 3').
ORDERINGS = ('trace', 'reference')
# The softmax of the instance score is the reference ordering's class probability too.
softmax_probability = ordering_lib.softmax_probability


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

  Finite float32 / float64 input takes `_standard_scaler`, sklearn's own arithmetic without its
  input checks and estimator set-up (two thirds of the call's ~1 ms on one class's pixels);
  anything else goes to sklearn.
  """
  features = np.asarray(features)
  if features.ndim == 2 and len(features) and features.dtype in (np.float32, np.float64) and \
      np.isfinite(features).all():
    return _standard_scaler(features)
  return sk_preprocessing.StandardScaler().fit_transform(features)


def _standard_scaler(x):
  """StandardScaler().fit_transform(x) of finite float32 / float64 [N >= 1, E], op for op.

  scikit-learn 1.9's fit (preprocessing/_data.py partial_fit -> utils/extmath.py
  _incremental_mean_and_var from a zero mean, variance and count; _is_constant_feature;
  _handle_zeros_in_scale) and transform, the same numpy operations on the same dtypes in the
  same order, so the same bits (tests/test_eval_speed_ops.py compares them with sklearn on
  ordinary, constant, single-row and large-offset features).
  """
  num = x.shape[0]
  last_count = np.zeros(x.shape[1], np.float64)      # n_samples_seen_ (int64 0) as float64
  last_sum = 0.0 * last_count                         # last_mean (0.0) * last_sample_count
  new_sum = np.sum(x, axis=0, dtype=np.float64)
  new_count = num - np.zeros(x.shape[1], np.float64)  # n - the NaN count (0 here)
  count = last_count + new_count
  mean = (last_sum + new_sum) / count
  temp = x - new_sum / new_count                      # float64
  correction = np.sum(temp, axis=0)
  temp **= 2
  unnormalized = np.sum(temp, axis=0)
  unnormalized -= correction ** 2 / new_count
  var = unnormalized / count                          # the zero-count branch: last terms dropped
  seen = count[0]                                     # all features saw all rows
  eps = np.finfo(np.float64).eps
  constant = var <= seen * eps * var + (seen * mean * eps) ** 2
  scale = np.sqrt(var)
  scale[constant] = 1.0
  out = x.copy()
  out -= mean.astype(x.dtype)
  out /= scale.astype(x.dtype)
  return out


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
    disk_search: centreline disk search (eval/trace.py), 'lookup' (default) or 'kdtree' (the
      one it replaced, for eval_bench's 'before' path; same vectors).
    close_kernel_px, min_area_px: `reference_mask` on THIS canvas (`postprocess_px` converts
      config.eval's reference pixels; the defaults are the reference's own, at 0.15 m);
      0 = off.
    standardize: StandardScaler before DBSCAN (the reference) or raw embeddings.
    score: 'softmax' (the reference) or 'sigmoid' (module docstring, step 5).
    ordering: 'trace' (the centreline trace; this function's default, not config.eval's) or
      'reference' (HDMapNet's NMS, sort and direction walk: eval/ordering.py; needs
      `direction`; points are the integer pixels the walk visits, not simplified, as the
      reference's).
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
    for centre, members in trace_lib.trace_polylines(coords, link_radius=link_radius_px,
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
  # One softmax for the NMS and (score 'softmax') the instance scores.
  softmax = softmax_probability(semantic_logits)
  found = instances(semantic_logits, embedding, softmax=softmax, **instance_kwargs)
  vectors = []
  for k, points, score in ordering_lib.order_class_instances(found, softmax, direction,
                                                             seed=seed):
    # The reference keeps a one-point "polyline"; no line distance is defined on it.
    if len(points) >= 2:
      vectors.append({'cls': class_names[k - 1],
                      'pts': pixels_to_metres(points, bev_x, bev_y), 'score': score})
  return vectors


def instances(semantic_logits, embedding, *, eps, min_samples, max_cluster_pixels,
              dbscan_algorithm, close_kernel_px, min_area_px, standardize, score, softmax=None):
  """Instances of every class (module docstring, steps 1, 2 and 5's instance score).

  Args: as `vectorize_sample` (semantic_logits [H, W, K] float32, embedding [H, W, E]);
    softmax: optional [H, W, K] `softmax_probability(semantic_logits)`, if the caller has it.

  Returns:
    [(class channel k >= 1, pixels [N, 2] int (column, row) in row-major order,
      the class probability of each pixel [N] float32 (softmax or sigmoid, per `score`),
      instance score: float64 mean of those)], classes in channel order, instances in
      DBSCAN label order.
  """
  classes = np.argmax(semantic_logits, axis=-1)
  if score == 'softmax':
    prob = softmax_probability(semantic_logits) if softmax is None else softmax
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
