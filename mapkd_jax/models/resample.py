"""Bilinear resizes with torch's arithmetic: two-tap gathers forward, dense matmuls backward.

torch `F.interpolate(mode='bilinear')` with align_corners True (HDMapNet's `Up`, `nn.Upsample`)
or False (the student's upsample to the canvas, P-MapNet's prior), in NHWC.
"""
import jax
import jax.numpy as jnp
import numpy as np


def bilinear_taps(n_in, n_out, align_corners):
  """One axis of torch's bilinear resize: (lo, hi, w_lo, w_hi) of every output position (numpy).

  Output i samples input position s, computed in float32 as torch's upsample_bilinear2d does
  (area_pixel_compute_scale / area_pixel_compute_source_index):
    align_corners=True:  s = i * ((n_in - 1) / (n_out - 1))  (0 when n_out == 1);
    align_corners=False: s = max((i + 0.5) * (n_in / n_out) - 0.5, 0).
  lo = min(floor(s), n_in - 1), hi = min(lo + 1, n_in - 1); weights 1 - f at lo and f at hi,
  f = s - lo (torch's h0lambda / h1lambda).

  Returns:
    lo, hi: [n_out] int32; w_lo, w_hi: [n_out] float32.
  """
  index = np.arange(n_out, dtype=np.float32)
  if align_corners:
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    src = index * scale
  else:
    src = np.maximum((index + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5),
                     np.float32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo.astype(np.int32), hi.astype(np.int32), np.float32(1) - frac, frac


def bilinear_matrix(n_in, n_out, align_corners):
  """[n_out, n_in] float32 dense form of bilinear_taps (the two weights add where lo == hi)."""
  lo, hi, w_lo, w_hi = bilinear_taps(n_in, n_out, align_corners)
  matrix = np.zeros((n_out, n_in), np.float32)
  np.add.at(matrix, (np.arange(n_out), lo), w_lo)
  np.add.at(matrix, (np.arange(n_out), hi), w_hi)
  return matrix


def align_corners_matrix(n_in, n_out):
  """[n_out, n_in] float32 bilinear weights with align_corners=True (numpy, static)."""
  return bilinear_matrix(n_in, n_out, align_corners=True)


def _resize_axis_taps(x, n_out, axis, align_corners):
  """x resized along `axis` by two static-index gathers: w_lo * x[lo] + w_hi * x[hi]."""
  lo, hi, w_lo, w_hi = bilinear_taps(x.shape[axis], n_out, align_corners)
  shape = [1] * x.ndim
  shape[axis] = n_out
  return (jnp.take(x, lo, axis=axis) * jnp.asarray(w_lo.reshape(shape), x.dtype)
          + jnp.take(x, hi, axis=axis) * jnp.asarray(w_hi.reshape(shape), x.dtype))


def _resize_forward(x, out_hw, align_corners):
  """[B, H, W, C] -> [B, H_out, W_out, C]: rows first, then columns (an axis of equal size,
  an identity at either convention, is left alone)."""
  if out_hw[0] != x.shape[1]:
    x = _resize_axis_taps(x, out_hw[0], 1, align_corners)
  if out_hw[1] != x.shape[2]:
    x = _resize_axis_taps(x, out_hw[1], 2, align_corners)
  return x


def _resize_transpose(dy, in_hw, align_corners):
  """The resize's adjoint: dy [B, H_out, W_out, C] -> [B, H, W, C] by dense matmuls with the
  transposed weight matrices (bilinear_matrix), columns first, at HIGHEST precision."""
  batch, out_h, out_w, channels = dy.shape
  if out_w != in_hw[1]:
    cols = jnp.asarray(bilinear_matrix(in_hw[1], out_w, align_corners), dy.dtype)
    dy = jnp.einsum('vw,bovc->bowc', cols, dy, precision=jax.lax.Precision.HIGHEST)
  if out_h != in_hw[0]:
    rows = jnp.broadcast_to(jnp.asarray(bilinear_matrix(in_hw[0], out_h, align_corners),
                                        dy.dtype), (batch, out_h, in_hw[0]))
    dy = jnp.einsum('boh,box->bhx', rows, dy.reshape(batch, out_h, in_hw[1] * channels),
                    precision=jax.lax.Precision.HIGHEST).reshape(batch, *in_hw, channels)
  return dy


def _resize_bilinear_fwd(x, out_hw, align_corners):
  return _resize_forward(x, out_hw, align_corners), x.shape[1:3]


def _resize_bilinear_bwd(out_hw, align_corners, in_hw, dy):
  del out_hw
  return (_resize_transpose(dy, in_hw, align_corners),)


_resize_bilinear = jax.custom_vjp(_resize_forward, nondiff_argnums=(1, 2))
_resize_bilinear.defvjp(_resize_bilinear_fwd, _resize_bilinear_bwd)


def resize_bilinear(x, out_hw, *, align_corners):
  """torch `F.interpolate(x, size=out_hw, mode='bilinear', align_corners=...)`, NHWC.

  Forward: per axis, two gathers at static indices and their float32 weights (bilinear_taps),
  w_lo * x[lo] + w_hi * x[hi], the arithmetic of torch's CPU kernel. Backward (custom VJP):
  dense matmuls with the transposed two-tap weight matrices, not the gathers' scatter-add.

  Why this split: the forward used to be two dense matmuls with the weight matrices, which
  cost n_in multiply-adds per output where two are non-zero (a 100x200x256 -> 200x400 resize:
  10 GFLOP, 204 ms on 2 loaded XLA:CPU cores, vs 42 ms for the gathers); the dense backward
  is kept because gathers' autodiff backward (a scatter-add) and its transposed copies cost
  training memory (measured earlier at the reference size, batch 8, on XLA:CPU, gathers both
  ways vs matmuls both ways: one BEV decoder's training temp 12.4 vs 9.4 GiB); with this split
  the student's train step (nokd, batch 8, XLA:CPU, with the depthwise_conv below) compiles to
  the same peak as with matmuls both ways, 19.5 GiB (memory_analysis). The forward's
  last bits may differ from the matmul form's (an output is the same two products, summed
  without the zero terms).

  Args:
    x: [B, H, W, C].
    out_hw: (H_out, W_out), a static tuple.
    align_corners: torch's flag (see bilinear_taps for the source positions).
  Returns:
    [B, H_out, W_out, C] in x.dtype.
  """
  if x.ndim != 4:
    raise ValueError(f'bilinear resize expects [B, H, W, C], got {x.shape}')
  return _resize_bilinear(x, tuple(int(n) for n in out_hw), bool(align_corners))


def resize_bilinear_align_corners(x, out_hw):
  """Bilinear resize with align_corners=True (torch `F.interpolate` / `nn.Upsample`).

  Output pixel i samples input position i (n_in - 1) / (n_out - 1) (0 when n_out == 1), so the
  corner pixels of input and output coincide. jax.image.resize uses half-pixel centres
  (align_corners=False) and gives a different function; HDMapNet's `Up` uses this one.
  Computed by resize_bilinear (gathers forward, dense matmuls backward).

  Args:
    x: [B, H, W, C].
    out_hw: (H_out, W_out).
  Returns:
    [B, H_out, W_out, C] in x.dtype.
  """
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear_align_corners expects [B, H, W, C], got {x.shape}')
  return resize_bilinear(x, out_hw, align_corners=True)
