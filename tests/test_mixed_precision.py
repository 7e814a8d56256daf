"""config.mixed_precision: bf16 compute, f32 params / geometry / outputs, close to the f32 forward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tcs
from mapkd_jax import losses
from mapkd_jax import models as models_lib
from mapkd_jax.models import precision
from mapkd_jax.train import stages
from mapkd_jax.train import step as step_lib

# model name -> (config arg, output key holding the semantic logits)
CASES = {
    'student': ('student,tiny', 'semantic'),
    'teacher': ('teacher,tiny', 'semantic'),
    'coach': ('coach,tiny', 'semantic'),
    'hd_mae': ('hd_pretrain,tiny', 'reconstruction'),
}
# bf16 keeps 8 mantissa bits (~4e-3 relative per op); a few dozen layers stay well under this.
RELATIVE_TOLERANCE = 5e-2


def _config(arg, mixed_precision):
  config = tcs.get_config(arg)
  config.mixed_precision = mixed_precision
  config.data.cameras = config.data.cameras[:2]   # front-left and front: CPU time
  return config


def _batch(config, batch_size, seed=0):
  """Random schema batch with a plausible forward-looking pinhole rig on every camera."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in stages.batch_spec(config, batch_size).items():
    if name in ('semantic', 'instance', 'direction', 'direction_backward'):
      batch[name] = rng.integers(0, 4, shape).astype(dtype)
    elif name == 'lidar_mask':
      batch[name] = rng.random(shape) < 0.7
    else:
      batch[name] = rng.normal(size=shape).astype(dtype)
  height, width = config.data.image_size
  cams = len(config.data.cameras)
  yaws = 2 * np.pi * np.arange(cams) / cams
  # camera (x right, y down, z forward) -> ego (x forward, y left, z up), turned by yaw.
  base = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float32)
  turn = np.stack([np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
                   for a in yaws]).astype(np.float32)
  batch['cam_rotation'] = np.broadcast_to(turn @ base, (batch_size, cams, 3, 3)).copy()
  batch['cam_translation'] = np.broadcast_to(np.array([1.0, 0.0, 1.5], np.float32),
                                             (batch_size, cams, 3)).copy()
  batch['intrinsics'] = np.broadcast_to(np.array(
      [[width / 2, 0, width / 2], [0, width / 2, height / 2], [0, 0, 1]], np.float32),
      (batch_size, cams, 3, 3)).copy()
  batch['lidar_points'][..., :2] *= 20.0   # spread over the canvas
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _rngs():
  key = jax.random.key(0, impl='rbg')   # rbg init compiles faster than threefry on CPU
  return {'params': key, 'dropout': key, 'mask': key}


@functools.cache
def _case(name):
  """(f32 model, bf16 model, f32-initialised variables, batch) of one registered model."""
  arg, _ = CASES[name]
  model_f32 = models_lib.build(name, _config(arg, False))
  model_bf16 = models_lib.build(name, _config(arg, True))
  batch = _batch(_config(arg, False), 1)
  variables = jax.jit(lambda b: model_f32.init(_rngs(), b, train=False))(batch)
  return model_f32, model_bf16, variables, batch


def _floating_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_compute_dtype_and_output_cast():
  assert precision.compute_dtype(_config('student,tiny', False)) == jnp.float32
  assert precision.compute_dtype(_config('student,tiny', True)) == jnp.bfloat16
  assert tcs.get_config('student').mixed_precision is False   # default unchanged
  out = precision.outputs_to_float32({'a': jnp.ones(3, jnp.bfloat16), 'b': jnp.ones(2, jnp.int32),
                                      'c': {'d': jnp.full(2, 1.5, jnp.float32)}})
  assert out['a'].dtype == jnp.float32 and out['b'].dtype == jnp.int32
  np.testing.assert_array_equal(out['c']['d'], [1.5, 1.5])


@pytest.mark.parametrize('name', sorted(CASES))
def test_bf16_forward_close_to_f32_with_f32_params_and_outputs(name):
  model_f32, model_bf16, variables, batch = _case(name)
  # Params created by the bf16 model are float32 and laid out exactly as the f32 model's.
  shapes_bf16 = jax.eval_shape(lambda b: model_bf16.init(_rngs(), b, train=False), batch)
  assert jax.tree.structure(shapes_bf16) == jax.tree.structure(variables)
  for got, want in zip(jax.tree.leaves(shapes_bf16), jax.tree.leaves(variables)):
    assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32

  forward = lambda model: jax.jit(lambda v, b: model.apply(v, b, train=False, rngs=_rngs()))
  out_f32 = forward(model_f32)(variables, batch)
  out_bf16 = forward(model_bf16)(variables, batch)
  assert sorted(out_bf16) == sorted(out_f32)
  for key in out_bf16:
    assert out_bf16[key].dtype == out_f32[key].dtype, key
    assert out_bf16[key].dtype in (jnp.float32, jnp.int32), key
  logits_key = CASES[name][1]
  ref, got = np.asarray(out_f32[logits_key]), np.asarray(out_bf16[logits_key])
  assert np.all(np.isfinite(got))
  scale = np.max(np.abs(ref))
  assert scale > 0
  relative = np.max(np.abs(got - ref)) / scale
  assert relative < RELATIVE_TOLERANCE, f'{name}: max |bf16 - f32| / max |f32| = {relative:.3g}'
  assert relative > 0, 'the bf16 model computed exactly the f32 numbers: no bf16 at all?'


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (jit, custom_vjp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)   # ClosedJaxpr -> Jaxpr
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)


def _op_dtypes(model, variables, batch):
  """{primitive name: [(input dtypes, contracting sizes)]} of the traced eval forward."""
  closed = jax.make_jaxpr(lambda v, b: model.apply(v, b, train=False, rngs=_rngs()))(
      variables, batch)
  found = {'conv_general_dilated': [], 'dot_general': [], 'scatter-add': []}
  for eqn in _equations(closed.jaxpr):
    if eqn.primitive.name in found:
      dtypes = tuple(str(var.aval.dtype) for var in eqn.invars)
      contracting = ()
      if eqn.primitive.name == 'dot_general':
        lhs_axes = eqn.params['dimension_numbers'][0][0]
        contracting = tuple(eqn.invars[0].aval.shape[a] for a in lhs_axes)
      found[eqn.primitive.name].append((dtypes, contracting))
  return found


@pytest.mark.parametrize('name', sorted(CASES))
def test_bf16_matmuls_and_f32_geometry_in_the_jaxpr(name):
  model_f32, model_bf16, variables, batch = _case(name)
  ops = _op_dtypes(model_bf16, variables, batch)
  assert ops['conv_general_dilated'], name
  for dtypes, _ in ops['conv_general_dilated']:
    assert set(dtypes) == {'bfloat16'}, dtypes
  # Every model has dense matmuls in bf16 (view MLP, attention, ViT, PointNet).
  assert any(set(d) == {'bfloat16'} for d, _ in ops['dot_general']), ops['dot_general']
  # float32 matmuls only where geometry meets geometry: rotations / intrinsics on xyz (size 3).
  for dtypes, contracting in ops['dot_general']:
    if set(dtypes) != {'bfloat16'}:
      assert set(dtypes) == {'float32'} and contracting == (3,), (dtypes, contracting)
  # Scatter sums (pillar means, lift-splat) accumulate in float32 with int32 indices.
  for dtypes, _ in ops['scatter-add']:
    assert 'bfloat16' not in dtypes, dtypes
  # Control: with mixed_precision=False nothing runs in bf16.
  ops_f32 = _op_dtypes(model_f32, variables, batch)
  assert all('bfloat16' not in d for op in ops_f32.values() for d, _ in op)


def test_jitted_train_step_with_mixed_precision():
  config = _config('student,tiny', True)
  config.kd.msrd_coach_weight = 0.0
  config.kd.tgpd_coach_weight = 0.0
  student = models_lib.build('student', config)
  models = {'student': student, 'teacher': student}   # the step is generic over frozen models
  tgpd = losses.TGPDProjector(patch_size=tuple(config.kd.tgpd_patch_size),
                              embed_dim=config.kd.tgpd_embed_dim,
                              dtype=precision.compute_dtype(config))
  tx = step_lib.make_optimizer(config)
  batch = _batch(config, 2, seed=1)
  state = jax.jit(functools.partial(step_lib.init_state, batch=batch, models=models, tgpd=tgpd,
                                    tx=tx, config=config))(jax.random.key(0, impl='rbg'))
  # The frozen 'teacher' is the initial student itself (no second init to compile).
  frozen = {'teacher': {'params': state.params['model'], 'batch_stats': state.batch_stats}}
  assert all(x.dtype == jnp.float32 for x in _floating_leaves((state.params, state.batch_stats)))

  # Gradients (abstractly: no second compile) are float32 like the params.
  frozen_out = step_lib.frozen_forward(frozen, batch, models=models)
  grad_fn = jax.grad(functools.partial(step_lib.stage_loss, model=student, tgpd=tgpd,
                                       config=config), has_aux=True)
  grads, _ = jax.eval_shape(grad_fn, state.params, state.batch_stats, frozen_out, batch,
                            jax.random.key(0))
  assert jax.tree.structure(grads) == jax.tree.structure(state.params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))

  step = jax.jit(functools.partial(step_lib.train_step, models=models, tgpd=tgpd, tx=tx,
                                   config=config))
  params_before = jax.tree.map(np.asarray, state.params)
  new_state, logs = step(state, frozen, batch, jax.random.key(2))
  for key in ('loss/total', 'loss/task', 'loss/msrd_teacher', 'loss/tgpd_teacher',
              'train/l2_grads'):
    assert logs[key].dtype == jnp.float32 and np.isfinite(logs[key]), (key, logs[key])
  assert logs['train/l2_grads'] > 0
  leaves = _floating_leaves((new_state.params, new_state.batch_stats))
  assert all(x.dtype == jnp.float32 and np.all(np.isfinite(x)) for x in leaves)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params_before,
                         jax.tree.map(np.asarray, new_state.params))
  assert any(jax.tree.leaves(changed['model']))
