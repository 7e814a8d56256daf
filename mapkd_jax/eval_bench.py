"""Evaluation throughput at a config's size: forward + vectorization + vector AP, samples/s.

  python -m mapkd_jax.eval_bench --config configs/tcs.py:student            # reference 200x400
  python -m mapkd_jax.eval_bench --config configs/tcs.py:student,tiny --samples 8 --workers 2

Prints one JSON line. The forward pass is the config's stage model, jitted, random weights, on
a random batch (bench.random_batch); its outputs are not vectorized (random weights give
noise everywhere). Vectorization and AP run on label-like head outputs with noise
(`noisy_outputs`: lines drawn at the label thickness, logits +-2 plus Gaussian noise of
--noise, one embedding per line plus noise), the same work per sample as a trained model's
maps with that much clutter. For a trained model's own predictions, time `evaluate` (its log
gives samples/s; README shows figures).

Fields: forward_s (per sample), vectorize_s (per sample, inline), vectorize_pool_s (wall per
sample through a pool of --workers spawn processes, pool start excluded), ap_s (per sample,
protocol --protocol), samples_per_s_serial = 1 / (forward + vectorize + ap) (one process, no
overlap), samples_per_s_pipelined = 1 / max(forward, vectorize_pool + ap) (what `evaluate`
approaches when vectorization overlaps the forward).
"""
import concurrent.futures
import functools
import json
import multiprocessing
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
from mapkd_jax import vectorize
from mapkd_jax.data import schema
from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import protocols


def noisy_outputs(rng, config, *, num_lines=12, noise=0.5, line_px=None):
  """Label-like head outputs of one sample and their GT vectors.

  Args:
    rng: numpy Generator.
    config: full config (data.bev_x/bev_y, classes; model embedding width).
    num_lines: random 4-vertex polylines, random class.
    noise: std of the Gaussian noise added to every logit (and 0.3 x to embeddings).
    line_px: drawn thickness; default the canvas' equivalent of 5 px at 0.15 m.

  Returns:
    (semantic logits [H, W, K+1] float32, embedding [H, W, E] float32,
     GT vectors [{'cls', 'pts' [N, 2] metres}]).
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
  semantic += rng.normal(scale=noise, size=semantic.shape).astype(np.float32)
  embedding += rng.normal(scale=0.3 * noise, size=embedding.shape).astype(np.float32)
  return semantic, embedding, gt


def vectorize_kwargs(config):
  """vectorize_sample's keyword arguments from a config, as `evaluate` passes them."""
  data = config.data
  return dict(bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y), class_names=tuple(data.classes),
              eps=config.eval.dbscan_eps, min_samples=config.eval.dbscan_min_samples,
              max_cluster_pixels=config.eval.max_cluster_pixels,
              link_radius_px=config.eval.link_radius_px,
              line_width_px=vectorize.label_line_width_px(data),
              simplify_tolerance=config.eval.simplify_tolerance)


def time_forward(config, *, batch_size, iters, seed=0):
  """Median seconds per sample of the stage model's jitted eval forward (random weights)."""
  model = models_lib.build(config.stage, config)
  batch = jax.device_put(bench.random_batch(config, batch_size, seed=seed))
  rngs = {name: jax.random.key(seed) for name in ('params', 'dropout', 'mask')}
  variables = jax.jit(lambda b: model.init(rngs, b, train=False))(batch)
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False))
  jax.block_until_ready(forward(variables, batch))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, batch))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) / batch_size


def run(config, *, samples, workers, noise, protocol='maptr', forward_iters=3, forward=True,
        seed=0):
  """The bench record (module docstring)."""
  if samples < 1:
    raise ValueError(f'--samples must be >= 1, got {samples}')
  workers = eval_lib.resolve_workers(workers)
  rng = np.random.default_rng(seed)
  inputs = [noisy_outputs(rng, config, noise=noise) for _ in range(samples)]
  kwargs = vectorize_kwargs(config)
  start = time.perf_counter()
  vectors = [vectorize.vectorize_sample(s, e, **kwargs) for s, e, _ in inputs]
  vectorize_s = (time.perf_counter() - start) / samples
  pool_s = vectorize_s
  if workers > 1:
    fn = functools.partial(vectorize.vectorize_sample, **kwargs)
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      list(pool.map(fn, *zip(*[(s, e) for s, e, _ in inputs[:workers]])))   # start the pool
      start = time.perf_counter()
      pooled = list(pool.map(fn, [s for s, _, _ in inputs], [e for _, e, _ in inputs]))
      pool_s = (time.perf_counter() - start) / samples
    np.testing.assert_equal(pooled, vectors)
  preds = {f's{k}': [{**v, 'pts': v['pts']} for v in vec] for k, vec in enumerate(vectors)}
  gts = {f's{k}': inp[2] for k, inp in enumerate(inputs)}
  start = time.perf_counter()
  result = ap_lib.evaluate_vectors(
      preds, gts, class_names=tuple(config.data.classes),
      thresholds=tuple(config.eval.chamfer_thresholds), protocol=protocol,
      sample_step=config.eval.sample_step, num_points=config.eval.maptr_num_points,
      buffer_m=config.eval.maptr_buffer_m, bev_x=tuple(config.data.bev_x),
      bev_y=tuple(config.data.bev_y), pmapnet_thickness=config.eval.pmapnet_thickness,
      pmapnet_iou_gate=config.eval.pmapnet_iou_gate)
  ap_s = (time.perf_counter() - start) / samples
  forward_s = time_forward(config, batch_size=1, iters=forward_iters) if forward else 0.0
  height, width = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  return {
      'stage': config.stage, 'canvas': [height, width], 'samples': samples, 'workers': workers,
      'noise': noise, 'protocol': protocol, 'backend': jax.default_backend(),
      'foreground_px_per_sample': float(np.mean([(s.argmax(-1) > 0).sum() for s, _, _ in inputs])),
      'vectors_per_sample': float(np.mean([len(v) for v in vectors])),
      'map': result['map'],
      'forward_s': round(forward_s, 4), 'vectorize_s': round(vectorize_s, 4),
      'vectorize_pool_s': round(pool_s, 4), 'ap_s': round(ap_s, 4),
      'samples_per_s_serial': round(1.0 / (forward_s + vectorize_s + ap_s), 3),
      'samples_per_s_pipelined': round(1.0 / max(forward_s, pool_s + ap_s), 3),
  }


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'configs/tcs.py:<stage>[,mods]',
                                  lock_config=True)
  flags.DEFINE_integer('samples', 8, 'noisy samples vectorized and scored')
  flags.DEFINE_integer('workers', None, 'vectorization processes; default config.eval.workers '
                       '(0 = CPU count)')
  flags.DEFINE_float('noise', 0.5, 'std of the logit noise of the label-like maps')
  flags.DEFINE_enum('protocol', 'maptr', list(protocols.PROTOCOLS), 'vector AP protocol')
  flags.DEFINE_bool('forward', True, 'time the forward pass too')


def main(argv):
  del argv
  f = flags.FLAGS
  workers = f.config.eval.workers if f.workers is None else f.workers
  print(json.dumps(run(f.config, samples=f.samples, workers=workers, noise=f.noise,
                       protocol=f.protocol, forward=f.forward)), flush=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
