"""eval_bench: the noisy direction logits and the record with config.eval.ordering."""
import numpy as np
import pytest

from configs import tcs
from mapkd_jax import eval_bench
from mapkd_jax.eval import ordering


def test_noisy_direction_logits_follow_each_segment_both_ways():
  config = tcs.get_config('student,tiny')
  plain = eval_bench.noisy_outputs(np.random.default_rng(0), config, num_lines=2, noise=0.0)
  semantic, embedding, gt, direction = eval_bench.noisy_outputs(
      np.random.default_rng(0), config, num_lines=2, noise=0.0, direction=True)
  # Drawn after everything else: the other outputs are those without direction logits.
  np.testing.assert_array_equal(semantic, plain[0])
  np.testing.assert_array_equal(embedding, plain[1])
  assert direction.shape == (50, 100, 37)
  bins = ordering.top2_directions(direction)
  line = semantic.argmax(-1) > 0
  # A direction on exactly the drawn pixels, 'none' elsewhere; the two bins point both ways.
  np.testing.assert_array_equal(bins[..., 0] >= 0, line)
  assert np.all((bins[line, 1] - bins[line, 0]) % 36 == 18)
  # A horizontal and a vertical line: bins 0 / 18 and 9 / 27 ((column, row) pixel angles).
  for vertices, want in (([[10, 25], [30, 25], [50, 25], [70, 25]], [0, 18]),
                         ([[50, 5], [50, 15], [50, 25], [50, 45]], [9, 27])):
    semantic, _, _, direction = eval_bench.noisy_outputs(
        _DrawsVertices(vertices, width=100, height=50), config, num_lines=1, noise=0.0,
        direction=True)
    line = semantic.argmax(-1) > 0
    assert line.sum() > 40
    np.testing.assert_array_equal(np.sort(ordering.top2_directions(direction)[line], axis=1),
                                  np.broadcast_to(want, (line.sum(), 2)))


class _DrawsVertices:
  """Stands in for noisy_outputs' numpy Generator: its one polyline has the given vertices
  (pixels of a width x height canvas), class 1, zero embeddings and noise."""

  def __init__(self, vertices, *, width, height):
    offsets = np.asarray(vertices, np.float64) - [width / 2, height / 2]
    self._steps = np.diff(offsets, axis=0, prepend=0) / [width / 5, height / 5]

  def integers(self, low, high=None):
    del high
    return low

  def normal(self, loc=0.0, scale=1.0, size=None):
    del loc, scale
    return self._steps if size == (4, 2) else np.zeros(size)


def test_record_times_the_configured_ordering_against_the_trace():
  config = tcs.get_config('student,tiny')
  config.eval.ordering = 'reference'
  record = eval_bench.run(config, samples=2, workers=1, noise=0.5, forward=False)
  # The run asserts that the Scorer path gives the inline vectors (with the direction logits)
  # and the inline AP; 'before' stays the original path, the centreline trace.
  assert record['ordering'] == 'reference' and record['ordering_before'] == 'trace'
  for key in ('vectorize_s', 'vectorize_before_s', 'ap_s', 'host_before_s', 'host_after_s',
              'host_speedup', 'samples_per_s_before', 'samples_per_s_after'):
    assert record[key] > 0, key
  assert record['vectors_per_sample'] > 0


def test_pooled_scorer_reads_shared_memory_and_gives_the_inline_results(monkeypatch):
  """The Scorer's pool gets each sample through a shared-memory block (or pickled, where
  _share declines): the same vectors and AP records as inline; a collected sample's block
  is reused by a later one, and every block is freed when the Scorer closes. The pool is
  started as eval_bench does (Scorer.start(steady=True): the blocks made, no results left)."""
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top
  from mapkd_jax.eval import vectorize  # pylint: disable=g-import-not-at-top
  from mapkd_jax.eval import scoring  # pylint: disable=g-import-not-at-top
  config = tcs.get_config('student,tiny')
  config.eval.ordering = 'reference'
  rng = np.random.default_rng(1)
  samples = [eval_bench.noisy_outputs(rng, config, num_lines=8, noise=0.3, direction=True)
             for _ in range(3)]
  kwargs = vectorize.config_kwargs(config)
  ap_kwargs = dict(class_names=tuple(config.data.classes), thresholds=(0.5, 1.0, 1.5))
  names = []
  original_share = scoring._share

  def share(arrays, free=None):
    # The 2nd sample after start's two pickled; the others shared.
    shared = original_share(arrays, free) if len(names) != 3 else None
    names.append(None if shared is None else shared[0].name)
    return shared

  monkeypatch.setattr(scoring, '_share', share)
  samples = samples + samples[:1]      # a 4th sample, submitted after the 1st is collected
  results = []
  for workers in (1, 2):
    with scoring.Scorer(workers, kwargs, ap_kwargs, max_pending=1) as scorer:
      scorer.start(samples[0], steady=True)
      assert not scorer._results and not scorer._pending
      for k, (semantic, embedding, gt, direction) in enumerate(samples):
        scorer.submit(f's{k}', semantic, embedding, gt, direction=direction)
      results.append(scorer.results())
      assert not scorer._blocks
      if workers == 2:   # collected blocks are kept for reuse until the Scorer closes
        shared_memory.SharedMemory(name=names[0]).close()
  np.testing.assert_equal(results[1], results[0])
  np.testing.assert_equal(results[0]['s3'], results[0]['s0'])
  assert sum(len(vectors) for vectors, _ in results[0].values()) > 0
  # One block (max_pending 1), made by start, carried every shared sample: start's two, the
  # 1st, 3rd and 4th sample.
  assert names == [names[0]] * 3 + [None] + [names[0]] * 2 and names[0] is not None
  assert sorted(results[1]) == ['s0', 's1', 's2', 's3']
  with pytest.raises(FileNotFoundError):   # unlinked when the Scorer closed
    shared_memory.SharedMemory(name=names[0])

