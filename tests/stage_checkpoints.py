"""Reading a trained stage's checkpoint and logs in tests, independent of the model's shapes."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def params_item(stage_dir, step=None):
  """(step, the `params` item as numpy) of `stage_dir/checkpoints`, latest step by default."""
  mngr = ocp.CheckpointManager(os.path.join(stage_dir, 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, restored['params'])


def random_variables(model, dummy, seed):
  """Variables of `model` with the shapes of `model.init`, filled by numpy (no XLA compile).

  For tests that need *some* weights of a model (a frozen model to cache, a student to export)
  but not its initialisation: a jitted `model.init` is a whole-model XLA compile (threefry for
  every parameter; tens of seconds on 2 cores, more than the model's forward). Kernels are
  normal with std 1/sqrt(fan_in) (fan_in: all axes but the last), like flax's lecun_normal, so
  activations stay finite; biases and positional embeddings small normal; BatchNorm / LayerNorm
  scales and running variances 1, running means 0.

  Args:
    model: a flax module whose `init(rngs, batch, train=False)` gives the variables.
    dummy: a batch of the model's inputs (only shapes are read).
    seed: numpy seed of the values.

  Returns:
    {'params': ..., 'batch_stats': ...} of jax arrays (float32), on the default device.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  keys = {name: jax.random.key(0) for name in ('params', 'dropout', 'mask')}
  shapes = jax.eval_shape(lambda: model.init(keys, dummy, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name in ('scale', 'var'):
      value = np.ones(shape)
    elif name == 'mean':
      value = np.zeros(shape)
    elif name == 'kernel':
      value = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    else:   # bias, pos_embed and anything else
      value = 0.02 * rng.normal(size=shape)
    return jnp.asarray(value.astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(fill, shapes)


def logged(stage_dir, tag):
  """{step: value} of a scalar in a stage's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for name in os.listdir(stage_dir):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(stage_dir, name)):
        for value in event.summary.value:
          if value.tag == tag:
            values[event.step] = float(tf.make_ndarray(value.tensor))
  return values
