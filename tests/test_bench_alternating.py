"""bench.time_alternating: rounds of one call per callable, warmup untimed, per-name statistics."""
import time

import numpy as np
import pytest

from mapkd_jax import bench


def test_alternating_rounds_order_and_statistics():
  log = []

  def make(name, seconds):
    def fn(x):
      log.append(name)
      time.sleep(seconds)
      return x + 1
    return fn

  timings = bench.time_alternating({'a': (make('a', 0.002), (1,)), 'b': (make('b', 0.02), (2,))},
                                   iters=3, warmup=1)
  assert log == ['a', 'b'] * 4            # warmup round first, then alternating timed rounds
  assert set(timings) == {'a', 'b'}
  assert len(timings['a'].times_s) == len(timings['b'].times_s) == 3
  assert timings['a'].output == 2 and timings['b'].output == 3
  for name, seconds in (('a', 0.002), ('b', 0.02)):
    times = np.asarray(timings[name].times_s)
    assert timings[name].median_s == pytest.approx(np.median(times))
    assert times.min() >= seconds
  assert timings['b'].median_s > timings['a'].median_s


def test_alternating_rejects_bad_counts():
  with pytest.raises(ValueError, match='--iters'):
    bench.time_alternating({'a': (lambda: 0, ())}, iters=0, warmup=0)
