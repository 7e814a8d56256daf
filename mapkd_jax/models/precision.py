"""Compute dtype of the models: `config.mixed_precision` -> bfloat16 compute, float32 params.

Top-level models read the config once and pass the dtype down as a module field (`dtype`);
every conv, dense layer, attention and norm computes in it while `param_dtype` stays float32
(Flax's default), and norm statistics are reduced in float32 (Flax's
`force_float32_reductions`). Geometry (sampling coordinates, frustum points, pillar indices)
never takes this dtype. Outputs leave the top-level module as float32, so losses, metrics and
evaluation see float32 whatever the setting.
"""
import jax
import jax.numpy as jnp


def compute_dtype(config):
  """jnp.bfloat16 if config.mixed_precision else jnp.float32."""
  return jnp.bfloat16 if config.mixed_precision else jnp.float32


def outputs_to_float32(outputs):
  """Casts every floating leaf of a model's output dict to float32 (others unchanged)."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, outputs)
