"""Host side of an evaluation: each sample's vectors and AP record, inline or in a process pool.

Imports no jax and no TensorFlow, so the 'spawn' pool workers, which unpickle their task
from this module, hold no accelerator or tf.data state through it (spawn still re-imports
the parent's main module, e.g. mapkd_jax.evaluate, in each worker).
"""
import collections
import concurrent.futures
import functools
import multiprocessing

import numpy as np

from mapkd_jax import vectorize
from mapkd_jax.eval import ap as ap_lib


def _score_sample(semantic, embedding, gt_vectors, direction=None, *, vec_kwargs, ap_kwargs):
  """(predicted vectors, AP record) of one sample: what a pool worker computes."""
  vectors = vectorize.vectorize_sample(semantic, embedding, direction=direction, **vec_kwargs)
  record = ap_lib.sample_record(vectors, gt_vectors, **ap_kwargs)
  return vectors, record


def worker_ready(_):
  """A no-op task: running it in a spawn pool starts the workers and imports this module."""
  return True


def _vectorize_only(semantic, embedding, gt_vectors, direction=None, *, vec_kwargs):
  del gt_vectors
  return vectorize.vectorize_sample(semantic, embedding, direction=direction, **vec_kwargs)


class Scorer:
  """Vectorizes and AP-scores samples inline (1 worker) or in a process pool, by sample token.

  The pool overlaps the host work (vectorization, Chamfer distances, matching: about all of a
  sample's host time) with the device forward of the next batches. At most `max_pending`
  samples wait in the pool (each holds its head outputs, [H, W, K + 1 + E] float32, 6 MB at
  the reference size): `submit` then waits for the oldest, so memory stays bounded whatever
  the split size. The pool uses 'spawn' processes: forking a process that holds JAX's threads
  can deadlock.
  """

  def __init__(self, workers, vec_kwargs, ap_kwargs=None, max_pending=None):
    if ap_kwargs is None:
      self._fn = functools.partial(_vectorize_only, vec_kwargs=vec_kwargs)
    else:
      self._fn = functools.partial(_score_sample, vec_kwargs=vec_kwargs, ap_kwargs=ap_kwargs)
    self._pool = None
    self._workers = workers
    if workers > 1:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          max_workers=workers, mp_context=multiprocessing.get_context('spawn'))
    self._max_pending = max_pending or 4 * workers
    self._pending = collections.deque()
    self._results = {}

  def start(self, sample=None):
    """Starts the pool's workers and their imports now (otherwise the first samples pay it).

    Args:
      sample: optional (semantic, embedding, gt_vectors) each worker scores once, untimed
        (libraries' first-call setup, e.g. sklearn's thread pools), for benchmarks.
    """
    if self._pool is None:
      return
    if sample is None:
      list(self._pool.map(worker_ready, range(self._workers)))
    else:
      futures = [self._pool.submit(self._fn, *sample) for _ in range(self._workers)]
      for f in futures:
        f.result()

  def submit(self, token, semantic, embedding, gt_vectors=(), direction=None):
    """direction: [H, W, D + 1] direction logits, needed by config.eval.ordering='reference'."""
    gt_vectors = list(gt_vectors)
    if self._pool is None:
      self._results[token] = self._fn(semantic, embedding, gt_vectors, direction)
      return
    while len(self._pending) >= self._max_pending:
      oldest = self._pending.popleft()
      self._results[oldest] = self._results[oldest].result()
    self._results[token] = self._pool.submit(
        self._fn, np.ascontiguousarray(semantic), np.ascontiguousarray(embedding), gt_vectors,
        None if direction is None else np.ascontiguousarray(direction))
    self._pending.append(token)

  def results(self):
    """{token: (vectors, AP record)} (just vectors without ap_kwargs), waiting for the pool."""
    self._results = {t: (r.result() if isinstance(r, concurrent.futures.Future) else r)
                     for t, r in self._results.items()}
    self._pending.clear()
    return dict(self._results)

  def close(self):
    """Shuts the pool down (waits for its workers to exit)."""
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
