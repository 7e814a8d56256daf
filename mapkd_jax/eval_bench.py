"""Evaluation throughput at a config's size: forward + vectorization + vector AP, samples/s.

  python -m mapkd_jax.eval_bench --config configs/tcs.py:student            # reference 200x400
  python -m mapkd_jax.eval_bench --config configs/tcs.py:student,tiny --samples 8 --workers 2

Prints one JSON line. The forward pass is the config's stage model, jitted, random weights, on
a random batch of --batch rows (bench.random_batch); its outputs are not vectorized (random
weights give noise everywhere). Vectorization and AP run on label-like head outputs with noise
(`noisy_outputs`: lines drawn at the label thickness, logits +-2 plus Gaussian noise of
--noise, one embedding per line plus noise, direction logits along each segment), the same
work per sample as a trained model's maps with that much clutter. For a trained model's own
predictions, run `evaluate`: its log and eval/timing.json give samples/s over the loop and
after the first batch, and the host work left after the last forward (README shows figures).

Both evaluation paths are measured in the same run, on the same samples:
  before: what `evaluate` did before the eval/ package: polylines by the centreline trace
    (ordering 'trace' whatever config.eval.ordering says), DBSCAN with sklearn's default
    neighbour search ('auto', brute force here), the centreline's disks by sklearn's k-d
    tree (vectorize disk_search='kdtree'), vectorization in the --workers pool, the
    forward waited for before the next one is dispatched, vector AP computed at the end in
    the main process (by today's eval/ap.py: its speed-ups reach both paths);
  after: `eval.scoring.Scorer` as `evaluate` runs it (polylines by config.eval.ordering:
    'reference' = eval/ordering.py on the direction logits, 'trace' = eval/trace.py with
    DiskLookup; DBSCAN by config.eval.dbscan_algorithm, 'cover' by default: eval/cluster.py;
    AND each sample's AP record in the pool, bounded queue), the next forward dispatched
    before the current batch is handed to the pool, AP combined from the records.
Both use config.eval's post-processing (mask, standardization, score); with ordering
'reference' the two paths' vectors differ (same_vectors_before_after is then false, and map /
map_before are the two orderings' mAP).

Fields (seconds per sample unless named otherwise): ordering / ordering_before (the paths'
orderings), forward_s (one --batch forward / batch), vectorize_s / vectorize_before_s
(inline, after / before), cluster_s / cluster_before_s / cluster_ball_tree_s (inline, DBSCAN
alone: vectorize.cluster_embeddings of every class's argmax pixels with
config.eval.dbscan_algorithm / 'auto' / 'ball_tree', the search of the previous default),
ap_s (inline, whole split at the end), host_before_s (pool vectorization + serial AP, wall)
and host_after_s (Scorer pool, wall), host_speedup = host_before_s / host_after_s,
inline_speedup = (vectorize_before_s + ap_s) / (vectorize_s + ap_s) (the same work without
the pool, whose processes compete with everything else on a loaded machine);
end_to_end_before_s / end_to_end_after_s (both loops with the forward, wall) and
end_to_end_speedup; samples_per_s_before / samples_per_s_after = their inverses. The pooled
loops exclude the pool's start, and 'after' the making of the Scorer's shared-memory blocks
(Scorer.start(steady=True)): a split of thousands of samples pays both once, so the figures
are its steady state (with 8 samples and fresh blocks, faulting in 18 MB a sample took the
main process ~11 ms a sample on 2 cores, a quarter of the pooled work). The loops and the inline timings alternate --repeats times (medians), so load drift
on a shared machine hits both paths.
"""
import concurrent.futures
import functools
import json
import multiprocessing
import os
import time

import cv2
import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mapkd_jax import bench
from mapkd_jax import evaluate as eval_lib
from mapkd_jax import models as models_lib
from mapkd_jax.data import schema
from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import protocols
from mapkd_jax.eval import scoring
from mapkd_jax.eval import vectorize


def noisy_outputs(rng, config, *, num_lines=12, noise=0.5, line_px=None, direction=False):
  """Label-like head outputs of one sample and their GT vectors.

  Args:
    rng: numpy Generator.
    config: full config (data.bev_x/bev_y, classes, direction_bins; model embedding width).
    num_lines: random 4-vertex polylines, random class.
    noise: std of the Gaussian noise added to every logit (and 0.3 x to embeddings).
    line_px: drawn thickness; default the canvas' equivalent of 5 px at 0.15 m.
    direction: also return direction-head logits (for config.eval.ordering='reference'): on
      each segment's pixels the two bins along the segment (both ways, as the labels'
      two-direction target; angles in (column, row) pixel space, as the reference's walk
      steps) at +2, channel 0 ('none') at -2, elsewhere channel 0 at +2; plus noise. Drawn
      after everything else, so the other outputs are the same with or without it.

  Returns:
    (semantic logits [H, W, K+1] float32, embedding [H, W, E] float32,
     GT vectors [{'cls', 'pts' [N, 2] metres}]), and direction logits [H, W, D+1] float32
    last when `direction`.
  """
  data = config.data
  height, width = schema.bev_shape(data.bev_x, data.bev_y)
  classes = tuple(data.classes)
  if line_px is None:
    line_px = max(1, int(round(5 * 0.15 / data.bev_x[2])))
  embed_dim = int(config.model.decoder.embedding_dim)
  semantic = np.zeros((height, width, len(classes) + 1), np.float32)
  semantic[..., 0] = 2.0
  embedding = np.zeros((height, width, embed_dim), np.float32)
  gt = []
  lines_px = []
  for _ in range(num_lines):
    cls = int(rng.integers(1, len(classes) + 1))
    pix = (np.cumsum(rng.normal(size=(4, 2)) * [width / 5, height / 5], axis=0)
           + [width / 2, height / 2])
    mask = np.zeros((height, width), np.uint8)
    cv2.polylines(mask, [pix.astype(np.int32).reshape(-1, 1, 2)], False, 1, thickness=line_px)
    drawn = mask > 0
    semantic[drawn, 0] = -2.0
    semantic[drawn, cls] = 2.0
    embedding[drawn] = rng.normal(size=embed_dim) * 3.0
    metres = np.stack([data.bev_x[0] + (pix[:, 0] + 0.5) * data.bev_x[2],
                       data.bev_y[0] + (pix[:, 1] + 0.5) * data.bev_y[2]], axis=1)
    gt.append({'cls': classes[cls - 1], 'pts': metres})
    lines_px.append(pix.astype(np.int32))
  semantic += rng.normal(scale=noise, size=semantic.shape).astype(np.float32)
  embedding += rng.normal(scale=0.3 * noise, size=embedding.shape).astype(np.float32)
  if not direction:
    return semantic, embedding, gt
  bins = int(data.direction_bins)
  logits = np.zeros((height, width, bins + 1), np.float32)
  logits[..., 0] = 2.0
  for pix in lines_px:
    for a, b in zip(pix[:-1], pix[1:]):
      mask = np.zeros((height, width), np.uint8)
      cv2.line(mask, tuple(map(int, a)), tuple(map(int, b)), 1, thickness=line_px)
      drawn = mask > 0
      angle = np.rad2deg(np.arctan2(float(b[1] - a[1]), float(b[0] - a[0])))
      logits[drawn] = 0.0
      logits[drawn, 0] = -2.0
      for way in (angle, angle + 180.0):
        # The labels' binning (data_prep/labels.py): nearest bin centre, round half up.
        logits[drawn, 1 + int(np.floor(np.mod(way, 360.0) * bins / 360.0 + 0.5)) % bins] = 2.0
  logits += rng.normal(scale=noise, size=logits.shape).astype(np.float32)
  return semantic, embedding, gt, logits


def vectorize_kwargs(config):
  """vectorize_sample's keyword arguments from a config, as `evaluate` passes them."""
  return vectorize.config_kwargs(config)


def make_forward(config, *, batch_size, seed=0):
  """(jitted eval forward, variables, random batch) of the config's stage model."""
  model = models_lib.build(config.stage, config)
  batch = jax.device_put(bench.random_batch(config, batch_size, seed=seed))
  rngs = {name: jax.random.key(seed) for name in ('params', 'dropout', 'mask')}
  variables = jax.jit(lambda b: model.init(rngs, b, train=False))(batch)
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False))
  return forward, variables, batch


def time_forward(config, *, batch_size, iters, seed=0):
  """Median seconds per sample of the stage model's jitted eval forward (random weights)."""
  forward, variables, batch = make_forward(config, batch_size=batch_size, seed=seed)
  timing = bench.time_jitted(forward, (variables, batch), iters=iters, warmup=1)
  return timing.median_s / batch_size


def _scored_ap(records, config, protocol):
  return ap_lib.combine_records(records, class_names=tuple(config.data.classes),
                                thresholds=tuple(config.eval.chamfer_thresholds),
                                protocol=protocol)


def _before_loop(inputs, pool, vec_kwargs, ap_kwargs, config, protocol, step):
  """The pre-eval/-package evaluation loop; `step()` runs one forward to completion."""
  fn = functools.partial(vectorize.vectorize_sample, **vec_kwargs)
  futures = []
  for k, (semantic, embedding, *_) in enumerate(inputs):
    if step is not None and k % step[1] == 0:
      step[0]()
    futures.append(pool.submit(fn, semantic, embedding) if pool else fn(semantic, embedding))
  vectors = [f.result() if pool else f for f in futures]
  preds = {f's{k:05d}': v for k, v in enumerate(vectors)}
  gts = {f's{k:05d}': inp[2] for k, inp in enumerate(inputs)}
  return ap_lib.evaluate_vectors(preds, gts, **ap_kwargs), vectors


def _after_loop(inputs, scorer, config, protocol, dispatch):
  """`evaluate`'s loop: the next forward is dispatched before this batch goes to the pool."""
  pending = dispatch[0]() if dispatch is not None else None
  for k, (semantic, embedding, gt, direction) in enumerate(inputs):
    if dispatch is not None and k % dispatch[1] == 0 and k:
      jax.block_until_ready(pending)
      pending = dispatch[0]()
    scorer.submit(f's{k:05d}', semantic, embedding, gt, direction=direction)
  if pending is not None:
    jax.block_until_ready(pending)
  scored = scorer.results()
  return _scored_ap({t: r for t, (_, r) in scored.items()}, config, protocol), \
      [scored[f's{k:05d}'][0] for k in range(len(inputs))]


def run(config, *, samples, workers, noise, protocol='maptr', forward_iters=3, forward=True,
        batch=1, repeats=1, seed=0):
  """The bench record (module docstring)."""
  if samples < 1:
    raise ValueError(f'--samples must be >= 1, got {samples}')
  if repeats < 1:
    raise ValueError(f'--repeats must be >= 1, got {repeats}')
  if batch < 1:
    raise ValueError(f'--batch must be >= 1, got {batch}')
  workers = eval_lib.resolve_workers(workers)
  rng = np.random.default_rng(seed)
  inputs = [noisy_outputs(rng, config, noise=noise, direction=True) for _ in range(samples)]
  after_kwargs = vectorize.config_kwargs(config)
  # The original path: the centreline trace whatever config.eval.ordering says (the reference
  # ordering came after it), sklearn's DBSCAN search, the k-d tree disks.
  before_kwargs = {**after_kwargs, 'dbscan_algorithm': 'auto', 'disk_search': 'kdtree',
                   'ordering': 'trace'}
  ap_kwargs = eval_lib.config_ap_kwargs(config, protocol)

  class_pixels = [_class_embeddings(s, e, after_kwargs['min_samples']) for s, e, *_ in inputs]
  cluster_kwargs = dict(eps=after_kwargs['eps'], min_samples=after_kwargs['min_samples'],
                        max_pixels=after_kwargs['max_cluster_pixels'])
  inline = {'after': [], 'before': [], 'cluster': [], 'cluster_before': [],
            'cluster_ball_tree': []}
  labels = {}
  for _ in range(repeats):   # alternated, medians kept (see the loops below)
    start = time.perf_counter()
    vectors = [vectorize.vectorize_sample(s, e, direction=d, **after_kwargs)
               for s, e, _, d in inputs]
    inline['after'].append((time.perf_counter() - start) / samples)
    start = time.perf_counter()
    before_vectors = [vectorize.vectorize_sample(s, e, **before_kwargs) for s, e, *_ in inputs]
    inline['before'].append((time.perf_counter() - start) / samples)
    for name, algorithm in (('cluster', after_kwargs['dbscan_algorithm']),
                            ('cluster_before', before_kwargs['dbscan_algorithm']),
                            ('cluster_ball_tree', 'ball_tree')):
      start = time.perf_counter()
      labels[name] = [vectorize.cluster_embeddings(x, algorithm=algorithm, **cluster_kwargs)
                      for sample in class_pixels for x in sample]
      inline[name].append((time.perf_counter() - start) / samples)
  for name in ('cluster_before', 'cluster_ball_tree'):   # DBSCAN searches change speed only
    np.testing.assert_equal(labels[name], labels['cluster'])
  vectorize_s = float(np.median(inline['after']))
  vectorize_before_s = float(np.median(inline['before']))
  preds = {f's{k:05d}': v for k, v in enumerate(vectors)}
  gts = {f's{k:05d}': inp[2] for k, inp in enumerate(inputs)}
  start = time.perf_counter()
  result = ap_lib.evaluate_vectors(preds, gts, **ap_kwargs)
  ap_s = (time.perf_counter() - start) / samples

  fwd = None
  forward_s = 0.0
  if forward:
    forward_fn, variables, batch_arrays = make_forward(config, batch_size=batch, seed=seed)
    forward_s = bench.time_jitted(forward_fn, (variables, batch_arrays), iters=forward_iters,
                                  warmup=1).median_s / batch
    fwd = functools.partial(forward_fn, variables, batch_arrays)

  figures = {}
  for name, fwd_step in [('host', None)] + ([('end_to_end', fwd)] if fwd else []):
    # Before and after alternate `repeats` times and the medians are kept: on a shared
    # machine the load drifts within a run, and alternating spreads the drift over both.
    times = {'before': [], 'after': []}
    for _ in range(repeats):
      pool = None
      if workers > 1:   # started and its workers' imports done before the clock starts
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context('spawn'))
        warm = functools.partial(vectorize.vectorize_sample, **before_kwargs)
        for f in [pool.submit(warm, *inputs[0][:2]) for _ in range(workers)]:
          f.result()
      try:
        step = None if fwd_step is None else (
            lambda f=fwd_step: jax.block_until_ready(f()), batch)
        start = time.perf_counter()
        before, got_before = _before_loop(inputs, pool, before_kwargs, ap_kwargs, config,
                                          protocol, step)
        times['before'].append((time.perf_counter() - start) / samples)
      finally:
        if pool is not None:
          pool.shutdown()
      with scoring.Scorer(workers, after_kwargs, ap_kwargs) as scorer:
        # Untimed: the pool's start and its shared-memory blocks' creation, which a split
        # of thousands of samples pays once (its first max_pending + 1 samples' blocks are
        # new, the rest reuse them); with 8 samples they would be most of the timed work.
        scorer.start(inputs[0], steady=True)
        start = time.perf_counter()
        after, got_after = _after_loop(inputs, scorer, config, protocol,
                                       None if fwd_step is None else (fwd_step, batch))
        times['after'].append((time.perf_counter() - start) / samples)
      # Each path gives its inline vectors and AP: the pool and the overlap change speed only.
      np.testing.assert_equal(got_after, vectors)
      np.testing.assert_equal(got_before, before_vectors)
      np.testing.assert_equal(after, result)
    figures[f'{name}_before_s'] = float(np.median(times['before']))
    figures[f'{name}_after_s'] = float(np.median(times['after']))
    figures[f'{name}_map_before'] = before['map']
  height, width = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  record = {
      'stage': config.stage, 'canvas': [height, width], 'samples': samples, 'workers': workers,
      'batch': batch, 'repeats': repeats, 'noise': noise, 'protocol': protocol,
      'ordering': after_kwargs['ordering'], 'ordering_before': before_kwargs['ordering'],
      'backend': jax.default_backend(),
      'cpu_count': os.cpu_count(),
      'foreground_px_per_sample': float(np.mean([(s.argmax(-1) > 0).sum()
                                                 for s, *_ in inputs])),
      'vectors_per_sample': float(np.mean([len(v) for v in vectors])),
      'same_vectors_before_after': bool(_same(vectors, before_vectors)),
      'map': result['map'], 'map_before': figures['host_map_before'],
      'forward_s': round(forward_s, 4), 'vectorize_s': round(vectorize_s, 4),
      'vectorize_before_s': round(vectorize_before_s, 4), 'ap_s': round(ap_s, 4),
      'cluster_s': round(float(np.median(inline['cluster'])), 4),
      'cluster_before_s': round(float(np.median(inline['cluster_before'])), 4),
      'cluster_ball_tree_s': round(float(np.median(inline['cluster_ball_tree'])), 4),
      'inline_speedup': round((vectorize_before_s + ap_s) / (vectorize_s + ap_s), 3),
      'host_before_s': round(figures['host_before_s'], 4),
      'host_after_s': round(figures['host_after_s'], 4),
      'host_speedup': round(figures['host_before_s'] / figures['host_after_s'], 3),
  }
  if 'end_to_end_before_s' in figures:
    record.update(
        end_to_end_before_s=round(figures['end_to_end_before_s'], 4),
        end_to_end_after_s=round(figures['end_to_end_after_s'], 4),
        end_to_end_speedup=round(figures['end_to_end_before_s'] / figures['end_to_end_after_s'],
                                 3),
        samples_per_s_before=round(1.0 / figures['end_to_end_before_s'], 3),
        samples_per_s_after=round(1.0 / figures['end_to_end_after_s'], 3))
  else:
    record.update(samples_per_s_before=round(1.0 / figures['host_before_s'], 3),
                  samples_per_s_after=round(1.0 / figures['host_after_s'], 3))
  return record


def _class_embeddings(semantic, embedding, min_samples):
  """[per class with at least min_samples argmax pixels: [N, E] embeddings], as vectorize
  clusters them."""
  classes = np.argmax(semantic, axis=-1)
  out = []
  for k in range(1, semantic.shape[-1]):
    rows, cols = np.nonzero(classes == k)
    if len(rows) >= min_samples:
      out.append(np.asarray(embedding)[rows, cols])
  return out


def _same(a, b):
  try:
    np.testing.assert_equal(a, b)
    return True
  except AssertionError:
    return False


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'configs/tcs.py:<stage>[,mods]',
                                  lock_config=True)
  flags.DEFINE_integer('samples', 8, 'noisy samples vectorized and scored')
  flags.DEFINE_integer('workers', None, 'vectorization processes; default config.eval.workers '
                       '(0 = CPU count)')
  flags.DEFINE_float('noise', 0.5, 'std of the logit noise of the label-like maps')
  flags.DEFINE_enum('protocol', 'maptr', list(protocols.PROTOCOLS), 'vector AP protocol')
  flags.DEFINE_bool('forward', True, 'time the forward pass too (and the loops with it)')
  flags.DEFINE_integer('batch', 1, 'rows of the forward batch')
  flags.DEFINE_integer('repeats', 1, 'alternations of the before and after loops (medians)')


def main(argv):
  del argv
  f = flags.FLAGS
  workers = f.config.eval.workers if f.workers is None else f.workers
  print(json.dumps(run(f.config, samples=f.samples, workers=workers, noise=f.noise,
                       protocol=f.protocol, forward=f.forward, batch=f.batch,
                       repeats=f.repeats)), flush=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
