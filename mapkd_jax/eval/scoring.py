"""Host side of an evaluation: each sample's vectors and AP record, inline or in a process pool.

Imports no jax and no TensorFlow, so the 'spawn' pool workers, which unpickle their task
from this module, hold no accelerator or tf.data state through it (spawn still re-imports
the parent's main module, e.g. mapkd_jax.evaluate, in each worker).

A pooled sample's head outputs reach its worker through a shared-memory block (one copy in
the main process, none in the worker) rather than pickled through the pool's pipe: at the
reference size they are 18 MB with the direction logits (57 float32 channels of 200 x 400),
and the pipe took 35-50 ms a sample on the loaded 2-core machine, more than vectorizing it
(eval_bench). Where /dev/shm lacks the room, or for dtypes other than numpy's own, the arrays
are pickled as before.
"""
import collections
import concurrent.futures
import functools
import multiprocessing
from multiprocessing import shared_memory
import os
import shutil

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


# Room left free in /dev/shm beside a block (bytes), and the block's array alignment.
_SHM_MARGIN = 256 << 20
_SHM_ALIGN = 64


def _share(arrays):
  """(shared-memory block, layout) holding copies of `arrays` (None entries stay None), or
  None when they do not fit in /dev/shm with room to spare or have non-numpy dtypes.

  layout: per array (byte offset, shape, dtype) or None.
  """
  if any(a is not None and a.dtype.kind not in 'biuf' for a in arrays):
    return None
  offsets, size = [], 0
  for a in arrays:
    offsets.append(size)
    if a is not None:
      size += -(-a.nbytes // _SHM_ALIGN) * _SHM_ALIGN
  if not os.path.isdir('/dev/shm') or shutil.disk_usage('/dev/shm').free < size + _SHM_MARGIN:
    return None
  block = shared_memory.SharedMemory(create=True, size=max(size, 1))
  layout = []
  for a, offset in zip(arrays, offsets):
    if a is None:
      layout.append(None)
      continue
    np.ndarray(a.shape, a.dtype, buffer=block.buf, offset=offset)[...] = a
    layout.append((offset, a.shape, a.dtype))
  return block, layout


def _run_shared(name, layout, gt_vectors, *, fn):
  """`fn(semantic, embedding, gt_vectors, direction)` on arrays in shared-memory block `name`
  (a pool worker's task; the results are new arrays, not views of the block)."""
  block = shared_memory.SharedMemory(name=name)
  try:
    arrays = [None if spec is None else
              np.ndarray(spec[1], spec[2], buffer=block.buf, offset=spec[0])
              for spec in layout]
    return fn(arrays[0], arrays[1], gt_vectors, arrays[2])
  finally:
    arrays = None
    try:
      block.close()
    except BufferError:   # views still held by an exception's traceback: freed with it
      pass


def _release(block):
  block.close()
  block.unlink()


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
    self._blocks = {}    # token -> shared-memory block of a pooled sample not yet collected

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
      self._collect(self._pending.popleft())
    arrays = [np.ascontiguousarray(semantic), np.ascontiguousarray(embedding),
              None if direction is None else np.ascontiguousarray(direction)]
    shared = _share(arrays)
    if shared is None:
      self._results[token] = self._pool.submit(self._fn, arrays[0], arrays[1], gt_vectors,
                                               arrays[2])
    else:
      block, layout = shared
      self._blocks[token] = block
      self._results[token] = self._pool.submit(_run_shared, block.name, layout, gt_vectors,
                                               fn=self._fn)
    self._pending.append(token)

  def _collect(self, token):
    """Waits for a pooled sample's result and frees its shared-memory block."""
    try:
      self._results[token] = self._results[token].result()
    finally:
      block = self._blocks.pop(token, None)
      if block is not None:
        _release(block)

  def results(self):
    """{token: (vectors, AP record)} (just vectors without ap_kwargs), waiting for the pool."""
    for token, result in list(self._results.items()):
      if isinstance(result, concurrent.futures.Future):
        self._collect(token)
    self._pending.clear()
    return dict(self._results)

  def close(self):
    """Shuts the pool down (waits for its workers to exit)."""
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None
    for block in self._blocks.values():   # samples never collected (an error ended the loop)
      _release(block)
    self._blocks.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
