"""Model registry: stage name -> top-level Linen module; `build(name, config)`.

Teacher, Coach and HDMapMAE are written in teacher.py / coach.py / prior.py by another
engineer; they join MODELS once those modules exist.
"""
import ml_collections

from mapkd_jax.models.student import Student

MODELS = {'student': Student}


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
