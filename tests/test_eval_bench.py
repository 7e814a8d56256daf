"""eval_bench: the noisy direction logits and the record with config.eval.ordering."""
import numpy as np

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
