"""Device mesh and shardings: the one place that decides how arrays are laid out.

Data parallel over a 1-D mesh with axis 'data': batches are split along their leading axis
across every device of every host, parameters and optimizer state are replicated. One code
path serves 1 device, many devices and many hosts.
"""
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None):
  """1-D ('data',) mesh over `devices` (default: all devices of all processes).

  AxisType.Auto is explicit because newer JAX defaults to Explicit axes, under which
  ordinary data-parallel code (replicated params times sharded batch) does not compile.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) axis split over 'data'; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(mesh, abstract_state):
  """Shardings for a (possibly abstract) state pytree: replicated everywhere for now."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def check_batch_size(global_batch_size, mesh, flag='config.train.batch_size'):
  """Fails early, naming the flag, when the batch does not split evenly over devices."""
  if global_batch_size % mesh.size:
    raise ValueError(f'{flag}={global_batch_size} is not divisible by the {mesh.size} devices '
                     f'of the mesh; use a multiple of {mesh.size}.')


def host_batch_to_global(host_batch, mesh):
  """Turns this process's slice of a batch (dict of numpy) into global sharded jax.Arrays.

  Every process passes its own rows (global batch / process count); non-numeric entries
  (e.g. sample tokens) stay on the host and are dropped here.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in host_batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in 'biuf'}
