"""resample.resize_bilinear (two-tap gathers forward, dense matmuls backward), both conventions.

The forward is checked against a plain float32 loop that follows torch's CPU kernel step by
step and against torch itself; the custom VJP against a float64 scatter loop; and the whole
thing against the dense-matrix form it replaced (the same function up to the last bits).
align_corners=True's VJP is pinned further in tests/test_resize_gradient.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapkd_jax.models import resample


def _source(i, n_in, n_out, align_corners):
  """torch's source index of output i, in float32 arithmetic, and its two taps."""
  i = np.float32(i)
  if align_corners:
    s = i * np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
  else:
    s = max((i + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5), np.float32(0))
  lo = min(int(np.floor(s)), n_in - 1)
  f = np.float32(s) - np.float32(lo)
  return lo, min(lo + 1, n_in - 1), np.float32(1) - f, f


def _resize_loop(x, out_hw, align_corners):
  """[B, H, W, C] float32 -> [B, Ho, Wo, C]: rows then columns, two taps each (torch's order)."""
  b, h, w, c = x.shape
  rows = np.zeros((b, out_hw[0], w, c), np.float32)
  for i in range(out_hw[0]):
    lo, hi, w0, w1 = _source(i, h, out_hw[0], align_corners) if out_hw[0] != h else (i, i, 1, 0)
    rows[:, i] = w0 * x[:, lo] + w1 * x[:, hi]
  out = np.zeros((b, *out_hw, c), np.float32)
  for j in range(out_hw[1]):
    lo, hi, w0, w1 = _source(j, w, out_hw[1], align_corners) if out_hw[1] != w else (j, j, 1, 0)
    out[:, :, j] = w0 * rows[:, :, lo] + w1 * rows[:, :, hi]
  return out


def _vjp_loop(dy, in_hw, align_corners):
  """float64: every output's cotangent scattered to its 2 x 2 taps with their weights."""
  b, out_h, out_w, c = dy.shape
  dx = np.zeros((b, *in_hw, c), np.float64)
  for i in range(out_h):
    ri = _source(i, in_hw[0], out_h, align_corners) if out_h != in_hw[0] else (i, i, 1, 0)
    for j in range(out_w):
      cj = _source(j, in_hw[1], out_w, align_corners) if out_w != in_hw[1] else (j, j, 1, 0)
      for row, wr in ((ri[0], ri[2]), (ri[1], ri[3])):
        for col, wc in ((cj[0], cj[2]), (cj[1], cj[3])):
          dx[:, row, col] += float(wr) * float(wc) * dy[:, i, j]
  return dx


CASES = [((5, 7), (40, 24)), ((4, 11), (8, 22)), ((3, 3), (3, 9)), ((25, 50), (200, 400))]


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('in_hw,out_hw', CASES)
def test_forward_matches_loop_and_torch(in_hw, out_hw, align_corners):
  channels = 2 if in_hw == (25, 50) else 3   # the student's bev_small -> canvas, fewer channels
  x = np.random.default_rng(0).normal(size=(2, *in_hw, channels)).astype(np.float32)
  got = np.asarray(jax.jit(lambda v: resample.resize_bilinear(
      v, out_hw, align_corners=align_corners))(jnp.asarray(x)))
  # Same two products per output as the loop: equal up to an FMA's rounding.
  np.testing.assert_allclose(got, _resize_loop(x, out_hw, align_corners), rtol=0, atol=2e-6)
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_hw, mode='bilinear',
                       align_corners=align_corners).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  # The dense-matrix form the forward replaced (kept as the backward's weights).
  rows = resample.bilinear_matrix(in_hw[0], out_hw[0], align_corners)
  cols = resample.bilinear_matrix(in_hw[1], out_hw[1], align_corners)
  if out_hw[0] == in_hw[0]:
    rows = np.eye(in_hw[0], dtype=np.float32)
  if out_hw[1] == in_hw[1]:
    cols = np.eye(in_hw[1], dtype=np.float32)
  dense = np.einsum('oh,vw,bhwc->bovc', rows.astype(np.float64), cols.astype(np.float64), x)
  np.testing.assert_allclose(got, dense, rtol=0, atol=2e-6)


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('in_hw,out_hw', CASES[:3])
def test_vjp_matches_scatter_loop(in_hw, out_hw, align_corners):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, *in_hw, 3)).astype(np.float32))
  dy = rng.normal(size=(2, *out_hw, 3)).astype(np.float32)
  _, vjp = jax.vjp(lambda v: resample.resize_bilinear(v, out_hw,
                                                           align_corners=align_corners), x)
  (dx,) = vjp(jnp.asarray(dy))
  want = _vjp_loop(dy.astype(np.float64), in_hw, align_corners)
  np.testing.assert_allclose(np.asarray(dx), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_taps_and_errors():
  """Half-pixel sources clamp at 0 (first outputs take input 0 whole); the last tap clamps."""
  lo, hi, w_lo, w_hi = resample.bilinear_taps(2, 8, align_corners=False)
  # s = (i + 0.5) / 4 - 0.5: -0.375, -0.125 (clamped to 0), 0.125, ..., 1.375 (hi clamped).
  np.testing.assert_array_equal(lo, [0, 0, 0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(hi, [1, 1, 1, 1, 1, 1, 1, 1])
  np.testing.assert_allclose(w_hi, [0, 0, .125, .375, .625, .875, .125, .375])
  np.testing.assert_allclose(w_lo + w_hi, 1.0)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    resample.resize_bilinear(jnp.zeros((3, 4, 5)), (6, 8), align_corners=True)
