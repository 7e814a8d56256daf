"""Model registry: stage name -> top-level Linen module; `build(name, config)`.

'hd_mae' is the hd_pretrain stage's model (prior.HDMapMAE).
"""
import ml_collections

from mapkd_jax.models.coach import Coach
from mapkd_jax.models.prior import HDMapMAE
from mapkd_jax.models.student import Student
from mapkd_jax.models.teacher import Teacher

MODELS = {'student': Student, 'teacher': Teacher, 'coach': Coach, 'hd_mae': HDMapMAE}


def build(name, config):
  """Returns the model `name` built from the full config (frozen so modules are hashable).

  Raises:
    ValueError: naming the model when `name` is not registered.
  """
  if name not in MODELS:
    raise ValueError(f'models.build: unknown model {name!r}; known: {sorted(MODELS)}')
  if not isinstance(config, ml_collections.FrozenConfigDict):
    config = ml_collections.FrozenConfigDict(config)
  return MODELS[name](config=config)
