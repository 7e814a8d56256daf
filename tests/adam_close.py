"""Comparing parameters trained on different device layouts with Adam.

Reductions over another device count add floats in another order: gradients differ in the last
bits. Adam's first steps move every parameter by about +-lr whatever its gradient's size, so a
parameter whose gradient is ~0 can step the other way: it then differs by up to 2 * lr * steps
while everything else agrees to float precision. The check says exactly that.
"""
import jax
import numpy as np


def assert_adam_close(actual, desired, *, learning_rate, steps, atol=1e-5, max_flipped=0.02):
  """Each leaf: >= (1 - max_flipped) of elements within atol, all within 2 * lr * steps."""
  bound = 2 * learning_rate * steps * 1.01
  for (path, a), (_, d) in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                               jax.tree_util.tree_flatten_with_path(desired)[0]):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(d, np.float64))
    name = jax.tree_util.keystr(path)
    assert diff.max() <= bound, f'{name}: max diff {diff.max()} > Adam bound {bound}'
    flipped = float(np.mean(diff > atol))
    assert flipped <= max_flipped, f'{name}: {flipped:.1%} of elements differ by > {atol}'
