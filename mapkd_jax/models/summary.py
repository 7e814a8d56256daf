"""Parameter counts and forward FLOPs of the registered models, one JSON line each.

  python -m mapkd_jax.models.summary --config configs/tcs.py:student
  python -m mapkd_jax.models.summary --config configs/tcs.py:student,tiny --models student

FLOPs are XLA's cost analysis of the compiled eval-mode forward pass at batch 1 on the
default backend; parameters are counted from abstract shapes (nothing is initialised).
`hlo_block_counts` splits a compiled function's HLO instructions by model block (the Flax
module scopes in each op's metadata), for compile-time breakdowns (train_bench --hlo_blocks).
"""
import json
import re

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


_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?%\S+\s*=\s')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WRAPPER = re.compile(r'^(?:[A-Za-z_]\w*\()+|\)+$')   # jvp( / transpose(jvp( ... ))
UNATTRIBUTED = '(no op_name)'
OTHER = '(outside model modules: optimizer update, losses, norms)'
CALLED = '(reduce / scatter bodies)'


def block_of(op_name, depth=2):
  """The model block an HLO op_name belongs to: its first `depth` scopes after the jit.

  'jit(train_step)/transpose(jvp(Student))/camera/conv' -> 'Student/camera': the jit scope is
  dropped, transformation wrappers (jvp, transpose, vmap, ...) are unwrapped, and Flax module
  scopes (which start with an upper-case class name) are kept. An op outside any module (loss,
  optimizer: the path holds no upper-case scope) maps to OTHER, and the one-op bodies of
  reductions and scatters (op_name without a scope) to CALLED.
  """
  if '/' not in op_name:   # the body of a reduce / scatter / sort: named by its primitive only
    return CALLED
  parts = [_WRAPPER.sub('', part) for part in op_name.split(';')[0].split('/')[1:]]
  parts = [part for part in parts if part]
  for start, part in enumerate(parts[:-1]):   # the last part is the primitive itself
    if part[:1].isupper():
      return '/'.join(parts[start:start + depth][:len(parts) - 1 - start])
  return OTHER


def count_blocks(hlo_text, depth=2):
  """{block: instruction count} over every computation of an HLO module's text.

  Fused and called computations are included, so an optimized module's fusions count every
  instruction they hold; instructions without metadata go to UNATTRIBUTED.
  """
  counts = {}
  for line in hlo_text.splitlines():
    if not _INSTRUCTION.match(line):
      continue
    name = _OP_NAME.search(line)
    block = block_of(name.group(1), depth) if name else UNATTRIBUTED
    counts[block] = counts.get(block, 0) + 1
  return counts


_WHILE = re.compile(r'\swhile\(')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def while_trip_counts(hlo_text):
  """Trip counts of the while loops of an optimized HLO module's text (None where unknown).

  XLA's cost analysis counts a while body once whatever its trip count (measured: the grad of a
  12-step lax.scan of 64x64 matmuls reports 1/12 of the unrolled loop's FLOPs), so FLOPs of a
  step with nn.scan layers are a lower bound; these counts say by how much to worry.
  """
  counts = []
  for line in hlo_text.splitlines():
    if _INSTRUCTION.match(line) and _WHILE.search(line):
      trip = _TRIP_COUNT.search(line)
      counts.append(int(trip.group(1)) if trip else None)
  return counts


def _sub_jaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr or a tuple of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_matmul_flops(jaxpr):
  """FLOPs of the dot_general and conv_general_dilated equations of a jaxpr, loops included.

  Model FLOPs in the MFU sense (2 per multiply-add of matmuls and convolutions; elementwise
  work is not counted). Unlike XLA's cost analysis, a scan's body counts `length` times;
  a cond counts its costliest branch; a while loop (unknown trip count) counts its body once.
  Trace the function that runs, e.g. `jax.jit(step).trace(*args).jaxpr`: a training step's
  jaxpr already holds its backward pass.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)   # a ClosedJaxpr's inner jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))
    elif name == 'conv_general_dilated':
      # Each output element sums over the kernel's input-feature and spatial extent. The
      # kernel's input features are already divided by feature_group_count, and the weight
      # gradient (a conv whose "kernel" is the output cotangent, its in-feature dim the batch;
      # batch_group_count for depthwise kernels) follows the same rule.
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec   # (out feature, in feature, *spatial)
      total += 2 * int(np.prod(out)) * int(np.prod([rhs[d] for d in rhs_spec[1:]]))
    else:
      inner = [jaxpr_matmul_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
      if name == 'cond':
        total += max(inner, default=0)
      elif name == 'scan':
        total += eqn.params['length'] * sum(inner)
      else:
        total += sum(inner)
  return total


def hlo_block_counts(lowered, compiled, depth=2):
  """HLO instruction counts per model block before and after XLA's optimizations.

  Args:
    lowered, compiled: a jitted function's `.lower(...)` and its `.compile()`.
  Returns:
    {'unoptimized': {block: n}, 'optimized': {block: n}, 'unoptimized_total': n,
     'optimized_total': n}, blocks sorted by unoptimized count, largest first.
  """
  before = count_blocks(lowered.compiler_ir('hlo').as_hlo_module().to_string(), depth)
  after = count_blocks(compiled.as_text(), depth)
  order = sorted(set(before) | set(after), key=lambda b: (-before.get(b, 0), b))
  return {'unoptimized': {b: before.get(b, 0) for b in order},
          'optimized': {b: after.get(b, 0) for b in order},
          'unoptimized_total': sum(before.values()), 'optimized_total': sum(after.values())}


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
