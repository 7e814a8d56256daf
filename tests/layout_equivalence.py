"""What data parallelism must get exactly right across device layouts, at float32 precision.

A run on 8 devices (or 2 processes) and a run on 1 device see the same global batch and the same
parameters, so the step-1 loss and the step-1 gradients are the same numbers summed in another
order: per-device partial sums, then a cross-device all-reduce, and other conv algorithms for
another per-device batch. Only float32 rounding differs, but the gradient amplifies it where
rounding moves a ReLU input across zero (below).

Why these bounds (and not one on parameters after Adam steps): Adam turns last-bit differences of
near-zero gradients into full +-lr steps, so any threshold on Adam-updated parameters is a bet on
the CPU, its thread count and XLA's reduction order. Gradients carry the rounding error itself:
  - the loss is a mean of n = B*H*W per-pixel terms; reordering a float32 sum of n terms of one
    sign moves it by about sqrt(n) * eps32 relative (eps32 = 1.19e-7; n = 8 * 50 * 100 at the
    tiny size gives 2.4e-5): LOSS_RTOL. Measured: 2 processes vs 1, 7.5e-8 (one ulp).
  - the gradient of a ReLU network is not a continuous function of its inputs: a ReLU input (or
    an IPM camera-max pair) that rounding leaves within ~1e-6 of its kink lands on either side
    in two equivalent float32 runs, and the flipped pixel's whole upstream gradient moves from
    one branch to the other (0 <-> g, through every layer below it). A handful of flips among
    ~1e7 ReLU inputs moved single leaves by up to 2.3e-3 of the whole gradient's norm, ~1000x
    the arithmetic's own error (below). This, not rounding, sets the gradient bounds.

How that was established (2026-11-30, tiny student `student,nokd,tiny`, test_multihost's
step-1 batch, 2-core CPU; the scripts are not in the repository). A float64 reference of the
same step (x64, every float32 of the model and losses read as float64) against float32 runs,
relative L2 of the whole gradient / largest leaf, both / the gradient's norm:
    1 process x 8 devices (test_multihost's reference)   3.4e-5 / 1.3e-5
    1 device, batch 8                                     9.5e-4 / 4.7e-4
    2 processes x 4 devices (launch.py, gloo)             4.3e-3 / 2.3e-3 (first camera conv)
The forward of all three agrees to rounding (loss 7.5e-8, BatchNorm statistics ~1e-7): only the
gradient differs. Sides of ReLU kinks, f32 forward vs f64: 4 of 1.0e7 ReLU inputs flip for 1
device, 4 for 8 devices (no argmax of the IPM camera max changes). The same step with the kinks
smoothed (ReLU -> softplus, camera max -> logsumexp, nothing else changed) gives 2.1e-6 to
2.7e-6 / <= 1.6e-6 for all three against its float64 reference: the float32 arithmetic,
including the matmul resize of commit 888d777 (tests/test_resize_gradient.py), is accurate.
The "2 processes differ" of 888d777 was a kink flip: ONE process reproduces it exactly, with
8 devices and the batch's rows reversed (a permutation: the same sum in another order) -> 4.3e-3
/ 2.3e-3 from the rows in order, and 1.1e-4 from the 2-process run. Over 7 one-process runs
(1, 2, 4, 8 devices; 1 and 8 devices with the rows reversed; f64) and the 2-process run, the
28 pairs differ by up to 4.3e-3 / 2.3e-3. Before 888d777 (gather resize, b2b23e5) the
2-process run differed by 6.7e-4 / 3.1e-4, in the same leaf: the matmul's other rounding put
other inputs near a kink.
A wrong batch split (host 1 reading host 0's rows; test_train_step) moves the gradient by 0.26
(0.1 in one leaf).
The bounds sit ~4.5x above the largest kink noise seen and >= 10x below a wrong split; tighter
ones (2e-3 per leaf, as before 888d777) bet on how many kinks a CPU's rounding happens to flip.
"""
import jax
import numpy as np

LOSS_RTOL = 2.4e-5          # sqrt(8 * 50 * 100) * eps32
# Relative L2 norm of the whole gradient (ReLU-kink noise: up to 4.3e-3 measured; wrong split 0.26).
GRADIENT_RTOL = 2e-2
# Any one leaf's difference / the whole gradient's norm (kink noise: up to 2.3e-3 measured, in
# the first camera conv kernel; wrong split 0.1). History: 2e-3 until 888d777, then 5e-3 with the
# cause open; 1e-2 since the cause (ReLU kinks, module docstring) was found.
LEAF_OF_TOTAL_RTOL = 1e-2


def assert_same_gradients(actual, desired):
  """`actual` and `desired` (pytrees of gradients or SGD updates) agree to float32 rounding.

  Raises:
    AssertionError: naming the global relative difference, or the leaf that differs.
  """
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_d = jax.tree_util.tree_flatten_with_path(desired)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_d], 'different trees'
  diffs = [(path, np.asarray(a, np.float64) - np.asarray(d, np.float64))
           for (path, a), (_, d) in zip(flat_a, flat_d)]
  total = np.sqrt(sum(np.sum(np.asarray(d, np.float64) ** 2) for _, d in flat_d))
  assert total > 0, 'the desired gradient is zero: nothing is compared'
  relative = np.sqrt(sum(np.sum(diff ** 2) for _, diff in diffs)) / total
  assert relative <= GRADIENT_RTOL, (
      f'gradients differ by {relative:.3g} of their norm (float32 ReLU-kink noise: <= 4.3e-3 '
      f'measured; bound {GRADIENT_RTOL})')
  for path, diff in diffs:
    leaf = np.linalg.norm(diff) / total
    assert leaf <= LEAF_OF_TOTAL_RTOL, (
        f'{jax.tree_util.keystr(path)} differs by {leaf:.3g} of the whole gradient norm '
        f'(bound {LEAF_OF_TOTAL_RTOL})')
