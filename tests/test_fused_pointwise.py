"""depthwise.pointwise_conv (a 1x1 conv as a matmul) and the heads' inference path using it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapkd_jax.models import bev_decoder
from mapkd_jax.models import depthwise


def _loop_reference(x, kernel, bias):
  """out[b, h, w, o] = sum_c x[b, h, w, c] kernel[0, 0, c, o] + bias[o], float64 loops."""
  b, h, w, _ = x.shape
  out = np.zeros((b, h, w, kernel.shape[-1]))
  for i in range(b):
    for r in range(h):
      for c in range(w):
        for o in range(kernel.shape[-1]):
          out[i, r, c, o] = np.dot(x[i, r, c].astype(np.float64),
                                   kernel[0, 0, :, o].astype(np.float64)) + bias[o]
  return out


def test_pointwise_conv_matches_a_loop_and_nn_conv():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
  plain = nn.Conv(4, (1, 1))
  variables = plain.init(jax.random.key(0), x)
  fast = nn.Conv(4, (1, 1), conv_general_dilated=depthwise.pointwise_conv)
  # Same parameters by construction: the hook changes only how the conv is computed.
  fast_variables = fast.init(jax.random.key(0), x)
  assert jax.tree.structure(fast_variables) == jax.tree.structure(variables)
  assert jax.tree.all(jax.tree.map(np.array_equal, fast_variables, variables))
  params = variables['params']
  params = {'kernel': params['kernel'],
            'bias': jnp.asarray(rng.standard_normal(4).astype(np.float32))}
  got = np.asarray(jax.jit(fast.apply)({'params': params}, x))
  ref = _loop_reference(x, np.asarray(params['kernel']), np.asarray(params['bias']))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, np.asarray(plain.apply({'params': params}, x)), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('kwargs, match', [
    (dict(window_strides=(2, 2), padding='VALID'), 'stride 1'),
    (dict(window_strides=(1, 1), padding=((1, 1), (0, 0))), 'stride 1'),
    (dict(window_strides=(1, 1), padding='VALID', feature_group_count=2), 'groups'),
    (dict(window_strides=(1, 1), padding='VALID', rhs_dilation=(2, 2)), 'dilation'),
    (dict(window_strides=(1, 1), padding='VALID', dimension_numbers=('NCHW', 'OIHW', 'NCHW')),
     'NHWC')])
def test_pointwise_conv_refuses_other_convolutions(kwargs, match):
  x, kernel = jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 1, 4, 4))
  with pytest.raises(ValueError, match=match):
    depthwise.pointwise_conv(x, kernel, **kwargs)


def test_pointwise_conv_refuses_a_3x3_kernel():
  with pytest.raises(ValueError, match=r'\[1, 1, Cin, Cout\]'):
    depthwise.pointwise_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), (1, 1),
                               'SAME')


def test_head_uses_the_matmul_in_inference_only():
  """Eval: the 1x1 output conv is a dot_general (one conv left, the 3x3); train: nn.Conv's."""
  head = bev_decoder.Head(hidden=6, features=3)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 6, 5)), jnp.float32)
  variables = head.init(jax.random.key(0), x, (8, 12), False)
  assert jax.tree.structure(variables) == jax.tree.structure(
      head.init(jax.random.key(0), x, (8, 12), True))
  eval_jaxpr = str(jax.make_jaxpr(lambda v: head.apply(v, x, (8, 12), False))(variables))
  train_jaxpr = str(jax.make_jaxpr(lambda v: head.apply(v, x, (8, 12), True,
                                                        mutable=['batch_stats']))(variables))
  assert eval_jaxpr.count('conv_general_dilated') == 1 and 'dot_general' in eval_jaxpr
  assert train_jaxpr.count('conv_general_dilated') == 2


@pytest.mark.parametrize('kernel, stride, eval_convs', [(1, 1, 0), (1, 2, 1), (3, 1, 1)])
def test_conv_bn_act_uses_the_matmul_for_1x1_inference_only(kernel, stride, eval_convs):
  """image_encoder.ConvBNAct: eval 1x1 stride-1 convs are a dot_general with the same output;
  train and other convs keep nn.Conv's convolution."""
  from mapkd_jax.models import image_encoder   # pylint: disable=g-import-not-at-top
  layer = image_encoder.ConvBNAct(6, kernel=kernel, stride=stride, act='swish')
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 7, 4)), jnp.float32)
  variables = layer.init(jax.random.key(0), x, train=False)
  eval_jaxpr = str(jax.make_jaxpr(lambda v: layer.apply(v, x, train=False))(variables))
  train_jaxpr = str(jax.make_jaxpr(lambda v: layer.apply(v, x, train=True,
                                                         mutable=['batch_stats']))(variables))
  assert eval_jaxpr.count('conv_general_dilated') == eval_convs
  assert ('dot_general' in eval_jaxpr) == (eval_convs == 0)
  assert train_jaxpr.count('conv_general_dilated') == 1
  if eval_convs == 0:
    kernel_ = np.asarray(variables['params']['Conv_0']['kernel'])
    conv = _loop_reference(np.asarray(x), kernel_, np.zeros(6))
    bn = variables['batch_stats']['BatchNorm_0']
    scale = variables['params']['BatchNorm_0']['scale'] / np.sqrt(bn['var'] + 1e-5)
    pre = (conv - bn['mean']) * scale + variables['params']['BatchNorm_0']['bias']
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x, train=False)),
                               pre / (1 + np.exp(-pre)), rtol=1e-5, atol=1e-5)
