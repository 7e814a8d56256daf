"""The align-corners matmul resize's gradient: float32-accurate and independent of the batch size.

Written while root-causing test_multihost's 2-process vs 1-process gradient difference (see
tests/layout_equivalence.py): the suspects were the resize's two interpolation matmuls
(resample.resize_bilinear_align_corners) lowered to other algorithms or precisions at
another per-device batch, or a resize gradient that cancels. Neither holds: these tests pin
the resize's VJP to a float64 numpy loop (measured <= 1.2e-7 of its max), and a batch's
gradient to its rows' one by one. The forward is checked against numpy and torch in
test_parity_efficientnet; the difference itself comes from ReLU kinks (layout_equivalence).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapkd_jax.models import resample

# float32 with 2 x 2 taps of weights in [0, 1] per output, each input receiving a handful of
# them: a few eps32 of the largest |gradient|.
GRADIENT_ATOL_OF_MAX = 1e-6


def _resize_vjp_loop(dy, in_hw):
  """float64 numpy loop: d(sum(resize(x) * dy)) / dx for align_corners=True bilinear.

  Each output pixel (i, j) samples input row i (H - 1) / (Ho - 1) and column j (W - 1) /
  (Wo - 1) (0 for a one-pixel output axis) and scatters dy[i, j] back to its four taps with
  their bilinear weights, the two taps adding up where they coincide at the last row/column.
  The source position is rounded to float32 as torch computes it (area_pixel_compute_scale):
  at position ~25 that moves a weight by ~2e-6, more than the arithmetic's own error.
  """
  batch, out_h, out_w, channels = dy.shape
  h, w = in_hw
  dx = np.zeros((batch, h, w, channels), np.float64)

  def taps(i, n_in, n_out):
    s = float(np.float32(i) * np.float32((n_in - 1) / (n_out - 1))) if n_out > 1 else 0.0
    lo = min(int(np.floor(s)), n_in - 1)
    return ((lo, 1.0 - (s - lo)), (min(lo + 1, n_in - 1), s - lo))

  for i in range(out_h):
    for j in range(out_w):
      for row, wy in taps(i, h, out_h):
        for col, wx in taps(j, w, out_w):
          dx[:, row, col] += wy * wx * dy[:, i, j].astype(np.float64)
  return dx


@pytest.mark.parametrize('in_hw,out_hw', [((25, 50), (50, 100)),   # the tiny decoder's Up
                                          ((5, 3), (9, 7)), ((6, 8), (1, 5)), ((7, 4), (3, 4))])
def test_resize_gradient_matches_float64_loop(in_hw, out_hw):
  """VJP of the float32 matmul resize == a float64 numpy scatter loop, to float32 rounding."""
  rng = np.random.RandomState(5)
  x = rng.randn(3, *in_hw, 4).astype(np.float32)
  dy = rng.randn(3, *out_hw, 4).astype(np.float32)
  _, vjp = jax.vjp(lambda v: resample.resize_bilinear_align_corners(v, out_hw),
                   jnp.asarray(x))
  got = np.asarray(vjp(jnp.asarray(dy))[0], np.float64)
  want = _resize_vjp_loop(dy, in_hw)
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= GRADIENT_ATOL_OF_MAX, f'{in_hw}->{out_hw}: VJP off by {err:.3g} of its max'


def test_resize_batch_does_not_change_per_row_gradient():
  """A batch of 8 and its rows one at a time give the same forward and VJP (to float32
  rounding; bit-identical on XLA:CPU when written): the matmuls are not lowered to a less
  accurate algorithm at another batch."""
  rng = np.random.RandomState(6)
  x = jnp.asarray(rng.randn(8, 25, 50, 16).astype(np.float32))
  dy = jnp.asarray(rng.randn(8, 50, 100, 16).astype(np.float32))

  @jax.jit
  def forward_and_vjp(x, dy):
    y, vjp = jax.vjp(lambda v: resample.resize_bilinear_align_corners(v, (50, 100)), x)
    return y, vjp(dy)[0]

  y_batch, dx_batch = forward_and_vjp(x, dy)
  rows = [forward_and_vjp(x[i:i + 1], dy[i:i + 1]) for i in range(8)]
  y_rows = np.concatenate([np.asarray(r[0]) for r in rows])
  dx_rows = np.concatenate([np.asarray(r[1]) for r in rows])
  for name, batch, one_by_one in (('forward', y_batch, y_rows), ('vjp', dx_batch, dx_rows)):
    err = np.abs(np.asarray(batch) - one_by_one).max() / np.abs(one_by_one).max()
    assert err <= GRADIENT_ATOL_OF_MAX, f'{name}: batch 8 vs rows differ by {err:.3g}'
