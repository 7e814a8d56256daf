"""Benchmarks: bench.time_jitted's statistics and donation threading; train_bench's record."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapkd_jax import bench


def test_time_jitted_threads_donated_state_and_counts_every_call():
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  timing = bench.time_jitted(step, (jnp.zeros(3),), iters=4, warmup=2,
                             next_args=lambda args, out: (out,))
  # 2 warmup + 4 timed calls, each fed the previous output (the donated input is gone).
  np.testing.assert_array_equal(np.asarray(timing.output), np.full(3, 6.0))
  assert len(timing.times_s) == 4


def test_time_jitted_statistics_match_numpy_on_known_sleeps():
  sleeps = iter([0.0, 0.0, 0.01, 0.03, 0.02, 0.05, 0.04])   # first two are warmup

  def fn():
    time.sleep(next(sleeps))
    return jnp.ones(())

  timing = bench.time_jitted(fn, (), iters=5, warmup=2)
  times = np.asarray(timing.times_s)
  # Each timed call took at least its sleep and not much more (no call left out or doubled).
  np.testing.assert_array_less([0.01, 0.03, 0.02, 0.05, 0.04], times + 1e-4)
  assert np.all(times < np.array([0.01, 0.03, 0.02, 0.05, 0.04]) + 0.5)
  assert timing.median_s == pytest.approx(np.median(times))
  q25, q75 = np.percentile(times, [25, 75])
  assert timing.spread_s == pytest.approx(q75 - q25)
  assert timing.min_s == times.min() and timing.max_s == times.max()
  assert 0.03 <= timing.median_s < 0.03 + 0.5


def test_time_jitted_rejects_bad_counts():
  with pytest.raises(ValueError, match='--iters'):
    bench.time_jitted(lambda: 0, (), iters=0, warmup=0)
  with pytest.raises(ValueError, match='--warmup'):
    bench.time_jitted(lambda: 0, (), iters=1, warmup=-1)
