"""Comparing parameters trained on different device layouts with Adam.

Reductions over another device count add floats in another order: gradients differ in the last
bits. Adam's first steps move every parameter by about +-lr whatever its gradient's size, so a
parameter whose gradient is ~0 (often a BatchNorm bias) can step the other way: it then differs
by up to 2 * lr * steps, and the rest drifts by a few percent of lr (atol 1e-4 = 0.2 lr at the
default lr 5e-4). A wrong batch or a sharding bug flips the update sign of a large share of all
parameters, each by ~2 lr: every element within Adam's bound, and all but 2% within atol.
"""
import jax
import numpy as np


def assert_adam_close(actual, desired, *, learning_rate, steps, atol=1e-4, max_flipped=0.02):
  bound = 2 * learning_rate * steps * 1.01
  far, total = 0, 0
  for (path, a), (_, d) in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                               jax.tree_util.tree_flatten_with_path(desired)[0]):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(d, np.float64))
    assert diff.max() <= bound, (f'{jax.tree_util.keystr(path)}: max diff {diff.max()} > '
                                 f'Adam bound {bound}')
    far += int(np.sum(diff > atol))
    total += diff.size
  assert far <= max_flipped * total, f'{far} of {total} parameters differ by > {atol}'
