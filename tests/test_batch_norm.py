"""models/batch_norm.BatchNorm: torch.nn.BatchNorm2d's running update, nn.BatchNorm's layout and
outputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mapkd_jax.models.batch_norm import BatchNorm


def _variables(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
  return jax.tree.map(lambda a: a + jax.random.uniform(next(keys), a.shape), variables)


@pytest.mark.parametrize('shape', [(2, 5, 7, 6), (1, 1, 3, 4), (1, 1, 1, 3)])
def test_running_statistics_are_torch_batchnorm2ds(shape):
  x = jax.random.normal(jax.random.PRNGKey(2), shape) * 3.0 + 1.0
  ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = _variables(ours, x)
  y, state = ours.apply(variables, x, mutable=['batch_stats'])

  count = int(np.prod(shape[:-1]))
  if count > 1:   # torch refuses a one-element batch in training; ours keeps the biased variance
    bn = torch.nn.BatchNorm2d(shape[-1], eps=1e-5, momentum=0.1).train()
    with torch.no_grad():
      bn.weight.copy_(torch.from_numpy(np.asarray(variables['params']['scale'])))
      bn.bias.copy_(torch.from_numpy(np.asarray(variables['params']['bias'])))
      bn.running_mean.copy_(torch.from_numpy(np.asarray(variables['batch_stats']['mean'])))
      bn.running_var.copy_(torch.from_numpy(np.asarray(variables['batch_stats']['var'])))
      expected = bn(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state['batch_stats']['var'], bn.running_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state['batch_stats']['mean'], bn.running_mean.numpy(), rtol=1e-6,
                               atol=1e-7)
  # A plain float64 loop over channels: torch's rule, momentum 0.1 of the new value.
  xs = np.asarray(x, np.float64).reshape(-1, shape[-1])
  for c in range(shape[-1]):
    batch_var = xs[:, c].var(ddof=1) if count > 1 else xs[:, c].var()
    want = 0.9 * float(variables['batch_stats']['var'][c]) + 0.1 * batch_var
    assert abs(float(state['batch_stats']['var'][c]) - want) <= 1e-6 * want


@pytest.mark.parametrize('dtype', [None, jnp.bfloat16])
@pytest.mark.parametrize('train', [False, True])
def test_same_variables_and_outputs_as_flax_batchnorm(dtype, train):
  """Only the running variance's update differs from nn.BatchNorm: same trees (checkpoints and
  the converter), outputs bit for bit in both modes, the same running mean."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 6, 5)) * 2.0 - 0.5
  ours = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype)
  flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype)
  variables = _variables(flax_bn, x)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)
  y_ours, state_ours = ours.apply(variables, x, mutable=['batch_stats'])
  y_flax, state_flax = flax_bn.apply(variables, x, mutable=['batch_stats'])
  assert y_ours.dtype == y_flax.dtype
  np.testing.assert_array_equal(np.asarray(y_ours, np.float32), np.asarray(y_flax, np.float32))
  np.testing.assert_array_equal(state_ours['batch_stats']['mean'], state_flax['batch_stats']['mean'])
  ratio = ((state_ours['batch_stats']['var'] - 0.9 * variables['batch_stats']['var'])
           / (state_flax['batch_stats']['var'] - 0.9 * variables['batch_stats']['var']))
  n = 2 * 4 * 6
  np.testing.assert_allclose(ratio, n / (n - 1) if train else 1.0, rtol=1e-5)


def test_mask_gives_the_masked_statistics_and_flax_outputs():
  """lidar.py's 'masked' padding: statistics and the unbiased count over the True positions."""
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, 5)) * 2.0 + 0.3
  mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (2, 9, 1))
  ours = BatchNorm(use_running_average=False, momentum=0.9)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
  variables = _variables(flax_bn, x)
  y_ours, state = ours.apply(variables, x, mask=mask, mutable=['batch_stats'])
  y_flax, _ = flax_bn.apply(variables, x, mask=mask, mutable=['batch_stats'])
  np.testing.assert_array_equal(y_ours, y_flax)
  kept = np.asarray(x, np.float64)[np.broadcast_to(np.asarray(mask), x.shape)].reshape(-1, 5)
  want = 0.9 * np.asarray(variables['batch_stats']['var']) + 0.1 * kept.var(0, ddof=1)
  np.testing.assert_allclose(state['batch_stats']['var'], want, rtol=1e-5)
