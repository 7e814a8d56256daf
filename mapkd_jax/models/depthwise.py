"""Depthwise convolution computed fast on XLA:CPU, with the grouped convolution's gradient.

EfficientNet-B0's depthwise convs (models/image_encoder.py) as nn.Conv(feature_group_count=C)
are a slow generic path on XLA:CPU (the 12 depthwise shapes of the B0 encoder on 6 cameras at
128 x 352: ~500 ms as convolutions, ~17 ms as shifted sums, 2 loaded cores; the whole encoder
582 -> 73 ms). `depthwise_conv` computes the same function as k*k shifted, strided windows
times per-channel weights on the CPU, and as the grouped convolution elsewhere (GPU/TPU
convolution libraries handle depthwise convs well; the shifted form is unmeasured there).

Also `pointwise_conv`: a 1x1 convolution as a matmul over channels, nn.Conv's
`conv_general_dilated` hook for the inference path (XLA:CPU runs a 1x1 conv slower than the dot).
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PADDINGS = ('SAME', 'TORCH')


def explicit_padding(padding: str, kernel: int, stride: int, in_hw):
  """((top, bottom), (left, right)) of conv_padding's rule for an input of size in_hw.

  'SAME' as lax computes it: total max((ceil(n/s) - 1) s + k - n, 0), the extra pixel at the
  end; 'TORCH': k // 2 on both sides.
  """
  if padding == 'TORCH':
    return ((kernel // 2, kernel // 2),) * 2
  if padding != 'SAME':
    raise ValueError(f'conv padding must be one of {PADDINGS}, got {padding!r}')
  pads = []
  for n in in_hw:
    total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def _depthwise_lax(x, kernel, stride, pads):
  """The grouped lax convolution (feature_group_count = C), as nn.Conv computes it."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=x.shape[-1])


def _depthwise_shifted(x, kernel, stride, pads):
  """sum over taps (i, j) of the strided window of padded x starting at (i, j) times w[i, j].

  Accumulated in float32 (or wider) whatever x.dtype, like a convolution's accumulator.
  """
  k = kernel.shape[0]
  _, height, width, _ = x.shape
  out_h = (height + sum(pads[0]) - k) // stride + 1
  out_w = (width + sum(pads[1]) - k) // stride + 1
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  padded = jnp.pad(x.astype(acc_dtype), ((0, 0), pads[0], pads[1], (0, 0)))
  weights = kernel.astype(acc_dtype)
  out = None
  for i in range(k):
    for j in range(k):
      window = padded[:, i:i + stride * (out_h - 1) + 1:stride,
                      j:j + stride * (out_w - 1) + 1:stride, :]
      term = window * weights[i, j, 0]
      out = term if out is None else out + term
  return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, kernel, stride, pads):
  """Depthwise kxk convolution: x [B, H, W, C], kernel [k, k, 1, C] -> [B, H', W', C].

  The function of lax.conv_general_dilated with feature_group_count = C (nn.Conv's depthwise
  conv), computed in the forward on the CPU as k*k shifted, strided windows times their
  per-channel weights, summed (_depthwise_shifted): XLA fuses that into one loop, where XLA:CPU's
  grouped convolution is a slow generic path (EfficientNet-B0's depthwise convs at the
  reference size, 6 cameras: ~500 ms as convolutions, ~17 ms as shifted sums, on 2 loaded
  cores). On other backends the forward is the grouped convolution itself. The sum runs over
  taps in row-major order, so the last bits differ from a convolution's. The backward
  (custom VJP) is the grouped convolution's own, so training gradients and their cost on
  other backends are what nn.Conv gave.

  Args:
    x: [B, H, W, C].
    kernel: [k, k, 1, C] (nn.Conv's depthwise kernel layout).
    stride: int, both axes.
    pads: ((top, bottom), (left, right)) static (explicit_padding).
  """
  return _depthwise_forward(x, kernel, stride, pads)


def _depthwise_forward(x, kernel, stride, pads):
  # Decided at trace time by the backend the computation is staged for (jax.default_backend):
  # the shifted sums only where they were measured to win.
  if jax.default_backend() == 'cpu':
    return _depthwise_shifted(x, kernel, stride, pads)
  return _depthwise_lax(x, kernel, stride, pads)


def _depthwise_fwd(x, kernel, stride, pads):
  return _depthwise_forward(x, kernel, stride, pads), (x, kernel)


def _depthwise_bwd(stride, pads, residuals, g):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda a, b: _depthwise_lax(a, b, stride, pads), x, kernel)
  return vjp(g)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """nn.Conv(features=C, feature_group_count=C, use_bias=False) computed by depthwise_conv.

  Same parameter ('kernel' [k, k, 1, C], nn.Conv's default lecun_normal init, float32) so it
  replaces that nn.Conv under the same name with the same tree and initial values.

  Attributes:
    kernel_size: k.
    stride: int.
    padding: 'SAME' or 'TORCH' (conv_padding).
    dtype: compute dtype; inputs and kernel are cast to it like nn.Conv's.
  """
  kernel_size: int
  stride: int = 1
  padding: str = 'SAME'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H', W', C]."""
    channels = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    pads = explicit_padding(self.padding, self.kernel_size, self.stride, x.shape[1:3])
    return depthwise_conv(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype),
                          self.stride, pads)


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
  """A 1x1 convolution as one matmul over channels: nn.Conv's `conv_general_dilated` hook.

  Same signature and result as lax.conv_general_dilated for what it accepts: a [1, 1, Cin,
  Cout] kernel (HWIO), NHWC input and output, stride 1, no padding or dilation, one group,
  i.e. out[b, h, w, o] = sum_c lhs[b, h, w, c] rhs[0, 0, c, o] (summed in another order than
  the conv's: last bits differ). Why: XLA:CPU's convolution runs a 1x1 conv ~3x slower than
  the same contraction as a dot (a head's 128 -> 37 output conv at 200 x 400, one core: 27 vs
  9 ms, session 9). Passing it as `nn.Conv(..., conv_general_dilated=pointwise_conv)` keeps
  nn.Conv's parameters (names, shapes, initialisers, dtype promotion) by construction.

  Args:
    lhs: [B, H, W, Cin]; rhs: [1, 1, Cin, Cout]; the rest as lax.conv_general_dilated.
  Returns:
    [B, H, W, Cout].
  Raises:
    ValueError: naming the argument that makes it not such a 1x1 convolution.
  """
  dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                    dimension_numbers or ('NHWC', 'HWIO', 'NHWC'))
  if dims != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC')):
    raise ValueError(f'pointwise_conv: dimension_numbers must be NHWC/HWIO/NHWC, got {dims}')
  if lhs.ndim != 4 or rhs.shape[:2] != (1, 1):
    raise ValueError(f'pointwise_conv: needs [B, H, W, C] input and a [1, 1, Cin, Cout] '
                     f'kernel, got {lhs.shape} and {rhs.shape}')
  zero_pad = padding in ('SAME', 'VALID') or all(tuple(p) == (0, 0) for p in padding)
  if tuple(window_strides) != (1, 1) or not zero_pad or feature_group_count != 1 or any(
      d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
    raise ValueError(
        f'pointwise_conv: stride 1, no padding, dilation or groups only; got strides '
        f'{window_strides}, padding {padding}, dilations {lhs_dilation} / {rhs_dilation}, '
        f'groups {feature_group_count}')
  return jax.lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
