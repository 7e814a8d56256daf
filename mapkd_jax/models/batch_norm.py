"""BatchNorm as torch.nn.BatchNorm2d computes it, with Flax's variable layout.

The reference's every BatchNorm is torch's. In training, torch normalises by the biased batch
variance but mixes the UNBIASED one into its running variance (x n / (n - 1), n = the elements
per channel of the batch); Flax's nn.BatchNorm mixes the biased one, so its running variances,
and so every eval-mode output of a model trained here, drift from the reference's (by up to
~5e-4 of the running variance at the 1/32 EfficientNet maps of the reference size, more at
small batches or maps). This module is the reference's rule; everything else is nn.BatchNorm's:
the same `params` (scale, bias) and `batch_stats` (mean, var) names and shapes under the same
automatic name `BatchNorm_<i>`, so checkpoints, the weight converter and the parity tests see
the same trees. Batch statistics under jit with a `data`-sharded batch are the global ones
(XLA all-reduces the sums), as in nn.BatchNorm without axis_name.
"""
import math
from typing import Any

import flax.linen as nn
from jax import lax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """x: [..., C] -> [..., C], statistics over every axis but the last.

  Attributes:
    use_running_average: eval mode (running statistics, nothing updated).
    momentum: Flax's convention, the weight of the OLD running value (= 1 - torch momentum).
    epsilon: added to the variance before the square root.
    dtype: compute dtype of the output; statistics are float32 (or wider) like nn.BatchNorm's.
  """
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, mask=None):
    """mask: None, or bool broadcastable to x: the statistics and the unbiased count use only
    the True positions (nn.BatchNorm's `mask`; lidar.py's 'masked' padding)."""
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # nn.BatchNorm's statistics, op for op: float32 (or wider), "fast variance"
      # E[x^2] - E[x]^2 clipped at 0 (rounding can take it below).
      stats = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
      where = None if mask is None else jnp.asarray(mask, bool)
      mean = stats.mean(reduce_axes, where=where)
      var = jnp.maximum(0.0, lax.square(stats).mean(reduce_axes, where=where) - lax.square(mean))
      if not self.is_initializing():
        if where is None:
          count = math.prod(x.shape[axis] for axis in reduce_axes)
        else:
          count = jnp.broadcast_to(where, x.shape).sum(reduce_axes).astype(jnp.float32)
        # torch's running update: the unbiased batch variance. A one-element batch (torch
        # divides by zero there) keeps the biased one.
        unbiased = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), var)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    # nn.BatchNorm's normalisation, op for op (eval outputs are bit-equal to it).
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    y = x - mean
    mul = lax.rsqrt(var + self.epsilon) * scale
    y = y * mul + bias
    return jnp.asarray(y, self.dtype or jnp.result_type(x, scale, bias))
