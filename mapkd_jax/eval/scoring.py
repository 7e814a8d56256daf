"""Host side of an evaluation: each sample's vectors and AP record, inline or in a process pool.

Imports no jax and no TensorFlow, so the 'spawn' pool workers, which unpickle their task
from this module, hold no accelerator or tf.data state through it (spawn still re-imports
the parent's main module, e.g. mapkd_jax.evaluate, in each worker).

A pooled sample's head outputs reach its worker through a shared-memory block (one copy in
the main process, none in the worker) rather than pickled through the pool's pipe: at the
reference size they are 18 MB with the direction logits (57 float32 channels of 200 x 400),
and the pipe took 35-50 ms a sample on the loaded 2-core machine, more than vectorizing it
(eval_bench). Where /dev/shm lacks the room, or for dtypes other than numpy's own, the arrays
are pickled as before. Blocks are reused from sample to sample (freed when the Scorer closes)
and stay attached in the workers: a fresh block's pages cost more to fault in than the copy.
"""
import collections
import concurrent.futures
import functools
import multiprocessing
from multiprocessing import shared_memory
import os
import shutil

import numpy as np

from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import vectorize


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


def _layout(arrays):
  """(byte offset of each array in a block, block size): aligned, None entries take none."""
  offsets, size = [], 0
  for a in arrays:
    offsets.append(size)
    if a is not None:
      size += -(-a.nbytes // _SHM_ALIGN) * _SHM_ALIGN
  return offsets, size


def _fill(block, arrays, offsets):
  """Copies `arrays` into `block` at `offsets`; returns their layout (below)."""
  layout = []
  for a, offset in zip(arrays, offsets):
    if a is None:
      layout.append(None)
      continue
    np.ndarray(a.shape, a.dtype, buffer=block.buf, offset=offset)[...] = a
    layout.append((offset, a.shape, a.dtype))
  return layout


def _share(arrays, free=None):
  """(shared-memory block, layout) holding copies of `arrays` (None entries stay None), or
  None when they have non-numpy dtypes or need a new block that does not fit in /dev/shm
  with room to spare.

  free: optional list of blocks no longer in use; the first one large enough is taken from
    it (and reused) before a new one is made.
  layout: per array (byte offset, shape, dtype) or None.
  """
  if any(a is not None and a.dtype.kind not in 'biuf' for a in arrays):
    return None
  offsets, size = _layout(arrays)
  for i, block in enumerate(free or ()):
    if block.size >= size:
      del free[i]
      return block, _fill(block, arrays, offsets)
  if not os.path.isdir('/dev/shm') or shutil.disk_usage('/dev/shm').free < size + _SHM_MARGIN:
    return None
  block = shared_memory.SharedMemory(create=True, size=max(size, 1))
  return block, _fill(block, arrays, offsets)


# In a pool worker: the blocks it has read, by name, kept open. The Scorer reuses its blocks,
# so their pages stay mapped here too (attaching and first touching 18 MB cost the worker
# ~3 ms a sample). At most _ATTACHED_MAX are kept; older ones are closed.
_ATTACHED = collections.OrderedDict()
_ATTACHED_MAX = 64


def _attach(name):
  block = _ATTACHED.pop(name, None)
  if block is None:
    block = shared_memory.SharedMemory(name=name)
  _ATTACHED[name] = block
  while len(_ATTACHED) > _ATTACHED_MAX:
    _, old = _ATTACHED.popitem(last=False)
    try:
      old.close()
    except BufferError:   # still viewed (an exception's traceback): freed with it
      pass
  return block


def _run_shared(name, layout, gt_vectors, *, fn):
  """`fn(semantic, embedding, gt_vectors, direction)` on arrays in shared-memory block `name`
  (a pool worker's task; the results are new arrays, not views of the block)."""
  block = _attach(name)
  arrays = [None if spec is None else
            np.ndarray(spec[1], spec[2], buffer=block.buf, offset=spec[0])
            for spec in layout]
  return fn(arrays[0], arrays[1], gt_vectors, arrays[2])


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
    # Blocks of collected samples, reused by the next ones: a new block's 18 MB of fresh pages
    # cost the main process ~11 ms a sample to fault in and fill (measured on 2 loaded cores),
    # a used one's ~1-2 ms to fill. At most max_pending + 1 blocks exist at once.
    self._free = []

  def start(self, sample=None, steady=False):
    """Starts the pool's workers and their imports now (otherwise the first samples pay it).

    Args:
      sample: optional (semantic, embedding, gt_vectors[, direction]) each worker scores
        once, untimed (libraries' first-call setup, e.g. sklearn's thread pools), for
        benchmarks.
      steady: also pass `sample` through the shared-memory path max_pending + 1 times (results
        dropped), so that every block a long evaluation cycles through exists and is paged
        in: the state after its first samples, for benchmarks of the steady state.
    """
    if self._pool is None:
      return
    if sample is None:
      list(self._pool.map(worker_ready, range(self._workers)))
      return
    futures = [self._pool.submit(self._fn, *sample) for _ in range(self._workers)]
    for f in futures:
      f.result()
    if steady:
      warm = [('Scorer.start', k) for k in range(self._max_pending + 1)]
      for token in warm:
        self.submit(token, *sample)
      for token in warm:
        if isinstance(self._results[token], concurrent.futures.Future):
          self._collect(token)
        del self._results[token]
      self._pending = collections.deque(t for t in self._pending if t not in warm)

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
    shared = _share(arrays, self._free)
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
        self._free.append(block)

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
    # Reused blocks and those of samples never collected (an error ended the loop).
    for block in list(self._blocks.values()) + self._free:
      _release(block)
    self._blocks.clear()
    self._free.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
