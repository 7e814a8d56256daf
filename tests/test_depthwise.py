"""depthwise.depthwise_conv (shifted sums forward, the grouped convolution's VJP backward)
and DepthwiseConv (a drop-in for nn.Conv(feature_group_count=C): same tree and init)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapkd_jax.models import depthwise, image_encoder


def _depthwise_loop(x, kernel, stride, pads):
  """float64 loop: out[b, i, j, c] = sum_{u, v} xpad[b, i s + u, j s + v, c] w[u, v, 0, c]."""
  k = kernel.shape[0]
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  out_h = (xp.shape[1] - k) // stride + 1
  out_w = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      window = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum('buvc,uvc->bc', window, kernel[:, :, 0].astype(np.float64))
  return out


# (H, W, k, stride, padding): EfficientNet's strides and kernels, odd and even sizes, TF-SAME's
# asymmetric padding (even input, stride 2) and torch's symmetric one.
CASES = [(8, 12, 3, 1, 'SAME'), (8, 12, 3, 2, 'SAME'), (7, 9, 5, 2, 'SAME'),
         (6, 6, 5, 1, 'SAME'), (8, 10, 3, 2, 'TORCH')]


@pytest.mark.parametrize('height,width,k,stride,padding', CASES)
def test_forward_matches_loop_and_lax(height, width, k, stride, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, height, width, 5)).astype(np.float32)
  kernel = rng.normal(size=(k, k, 1, 5)).astype(np.float32)
  pads = depthwise.explicit_padding(padding, k, stride, (height, width))
  got = np.asarray(jax.jit(depthwise.depthwise_conv, static_argnums=(2, 3))(
      jnp.asarray(x), jnp.asarray(kernel), stride, pads))
  np.testing.assert_allclose(got, _depthwise_loop(x, kernel, stride, pads), rtol=0, atol=1e-5)
  # nn.Conv's padding rule gives the same shape and values (its 'SAME' = explicit_padding).
  conv = nn.Conv(5, (k, k), strides=stride, feature_group_count=5, use_bias=False,
                 padding=image_encoder.conv_padding(padding, k))
  want = conv.apply({'params': {'kernel': jnp.asarray(kernel)}}, jnp.asarray(x))
  np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5)


def test_vjp_is_the_grouped_convolutions():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 7, 9, 4)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(5, 5, 1, 4)).astype(np.float32))
  pads = depthwise.explicit_padding('SAME', 5, 2, (7, 9))
  g = jnp.asarray(rng.normal(size=(2, 4, 5, 4)).astype(np.float32))
  _, vjp = jax.vjp(lambda a, b: depthwise.depthwise_conv(a, b, 2, pads), x, kernel)
  dx, dk = vjp(g)
  # float64 reference: the adjoint of the loop, by finite structure (one-hot probes summed).
  want_dk = np.zeros((5, 5, 1, 4))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  dxp = np.zeros_like(xp)
  for i in range(4):
    for j in range(5):
      window = xp[:, 2 * i:2 * i + 5, 2 * j:2 * j + 5, :]
      want_dk[:, :, 0] += np.einsum('buvc,bc->uvc', window, np.asarray(g[:, i, j], np.float64))
      dxp[:, 2 * i:2 * i + 5, 2 * j:2 * j + 5, :] += np.einsum(
          'uvc,bc->buvc', np.asarray(kernel[:, :, 0], np.float64), np.asarray(g[:, i, j]))
  want_dx = dxp[:, pads[0][0]:pads[0][0] + 7, pads[1][0]:pads[1][0] + 9]
  np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=0, atol=1e-5)


def test_conv_bn_act_depthwise_keeps_tree_and_init():
  """ConvBNAct(groups=C) now uses DepthwiseConv: same variable tree and initial values as an
  nn.Conv(feature_group_count=C) named Conv_0 (what checkpoints and the converter hold)."""

  class Old(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(6, (3, 3), strides=2, feature_group_count=6, use_bias=False,
                     padding='SAME')(x)

  x = jnp.ones((1, 8, 8, 6))
  block = image_encoder.ConvBNAct(6, kernel=3, stride=2, groups=6, act=None)
  new_vars = block.init(jax.random.key(0), x, train=False)
  assert set(new_vars['params']) == {'Conv_0', 'BatchNorm_0'}
  # Both kernels sit at path ('Conv_0',) under their root module: same rng, same values.
  old_kernel = Old().init(jax.random.key(0), x)['params']['Conv_0']['kernel']
  new_kernel = new_vars['params']['Conv_0']['kernel']
  assert new_kernel.shape == old_kernel.shape == (3, 3, 1, 6)
  np.testing.assert_array_equal(np.asarray(new_kernel), np.asarray(old_kernel))


def test_forward_is_the_shifted_sum_on_cpu_and_the_grouped_convolution_elsewhere(monkeypatch):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 8, 10, 3)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 3)).astype(np.float32))
  pads = depthwise.explicit_padding('SAME', 3, 2, (8, 10))
  shifted = np.asarray(depthwise._depthwise_shifted(x, kernel, 2, pads))
  grouped = np.asarray(depthwise._depthwise_lax(x, kernel, 2, pads))
  np.testing.assert_array_equal(np.asarray(depthwise.depthwise_conv(x, kernel, 2, pads)), shifted)
  # Traced as if for a GPU: the forward is the grouped convolution, bit for bit.
  monkeypatch.setattr(depthwise.jax, 'default_backend', lambda: 'gpu')
  np.testing.assert_array_equal(np.asarray(depthwise.depthwise_conv(x, kernel, 2, pads)), grouped)
