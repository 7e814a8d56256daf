"""Parameter counts and forward FLOPs of the registered models, one JSON line each.

  python -m mapkd_jax.models.summary --config configs/tcs.py:student
  python -m mapkd_jax.models.summary --config configs/tcs.py:student,tiny --models student

FLOPs are XLA's cost analysis of the compiled eval-mode forward pass at batch 1 on the
default backend; parameters are counted from abstract shapes (nothing is initialised).
"""
import json

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from mapkd_jax import models
from mapkd_jax.data import schema

_RNG_STREAMS = ('dropout', 'mask')   # rng collection names the registered models draw from


def define_flags():
  """CLI flags; defined only when run as a program, so importing this module defines none."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/tcs.py:student.', lock_config=True)
  flags.DEFINE_list('models', None, 'Models to summarise (default: every registered '
                    f'model, currently {sorted(models.MODELS)}).')
  flags.DEFINE_integer('batch_size', 1, 'Batch size of the analysed forward pass.')


def summarize(name, config, batch_size):
  """Returns {'name', 'params', 'flops', 'batch_size'} for one registered model.

  Raises:
    ValueError: from models.build when `name` is not registered.
  """
  model = models.build(name, config)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in schema.batch_spec(config.data, batch_size).items()}
  variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)
  params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params'])))
  # Eval mode needs no randomness for most models, but the MAE draws its patch mask from the
  # 'mask' stream even then; unused streams are ignored.
  rngs = {stream: jax.random.key(0) for stream in _RNG_STREAMS}
  compiled = jax.jit(lambda v, b: model.apply(v, b, train=False, rngs=rngs)).lower(
      variables, batch).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX returned one dict per computation
    cost = cost[0]
  return {'name': name, 'params': params, 'flops': float(cost.get('flops', float('nan'))),
          'batch_size': batch_size}


def main(argv):
  del argv
  f = flags.FLAGS
  config = ml_collections.FrozenConfigDict(f.config)
  for name in f.models or sorted(models.MODELS):
    print(json.dumps(summarize(name, config, f.batch_size)), flush=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
