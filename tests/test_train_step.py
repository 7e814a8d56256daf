"""The jitted TCS train step: 8 fake devices == 1 device, frozen inputs untouched, shardings."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adam_close

from configs import tcs
from mapkd_jax import losses
from mapkd_jax import models as models_lib
from mapkd_jax import sharding
from mapkd_jax import stages
from mapkd_jax import train_step as step_lib


def _random_batch(config, batch_size, seed):
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in stages.batch_spec(config, batch_size).items():
    if name == 'semantic':
      batch[name] = rng.integers(0, 4, shape).astype(dtype)
    elif name == 'instance':
      batch[name] = rng.integers(0, 6, shape).astype(dtype)
    elif name == 'direction':
      batch[name] = rng.integers(0, 37, shape).astype(dtype)
    elif name == 'lidar_mask':
      batch[name] = rng.random(shape) < 0.7
    else:
      batch[name] = rng.normal(size=shape).astype(dtype)
  # Plausible cameras: identity intrinsics would see nothing; copy a pinhole onto each camera.
  height, width = config.data.image_size
  batch['intrinsics'] = np.broadcast_to(np.array(
      [[width / 2, 0, width / 2], [0, width / 2, height / 2], [0, 0, 1]], np.float32),
      batch['intrinsics'].shape).copy()
  batch['cam_rotation'] = np.broadcast_to(np.array(
      [[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float32), batch['cam_rotation'].shape).copy()
  batch['cam_translation'] = np.broadcast_to(np.array([1.0, 0.0, 1.5], np.float32),
                                             batch['cam_translation'].shape).copy()
  return batch


def _setup(mesh):
  """A distilling student stage whose frozen 'teacher' is another (randomly initialized) student.

  The step is generic over models; the real teacher is exercised by the end-to-end tests.
  """
  config = tcs.get_config('student,tiny')
  config.kd.msrd_coach_weight = 0.0
  config.kd.tgpd_coach_weight = 0.0
  student = models_lib.build('student', config)
  models = {'student': student, 'teacher': student}
  tgpd = losses.TGPDProjector(patch_size=tuple(config.kd.tgpd_patch_size),
                              embed_dim=config.kd.tgpd_embed_dim)
  tx = step_lib.make_optimizer(config)
  init_batch = {k: jnp.asarray(v) for k, v in _random_batch(config, 1, 0).items()}
  init = functools.partial(step_lib.init_state, batch=init_batch, models=models, tgpd=tgpd, tx=tx,
                           config=config)
  repl = sharding.replicated(mesh)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(mesh, abstract)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  teacher_vars = jax.jit(lambda r: student.init({'params': r}, init_batch, train=False),
                         out_shardings=repl)(jax.random.key(1))
  frozen = {'teacher': teacher_vars}
  step = jax.jit(functools.partial(step_lib.train_step, models=models, tgpd=tgpd, tx=tx,
                                   config=config),
                 in_shardings=(state_sh, jax.tree.map(lambda _: repl, frozen),
                               sharding.batch_sharding(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))
  return config, state, frozen, step


def _run(mesh, steps=2):
  config, state, frozen, step = _setup(mesh)
  frozen_before = jax.tree.map(np.asarray, frozen)
  history = []
  for i in range(steps):
    batch = sharding.host_batch_to_global(_random_batch(config, config.train.batch_size, 10 + i),
                                          mesh)
    state, metrics = step(state, frozen, batch, jax.random.key(3))
    history.append(jax.device_get(metrics))
  return state, history, batch, frozen, frozen_before, config


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8, 'tests/conftest.py should give 8 fake CPU devices'
  state8, hist8, batch8, frozen8, before8, config8 = _run(sharding.make_mesh())
  state1, hist1, _, _, _, _ = _run(sharding.make_mesh(jax.devices()[:1]))
  for m8, m1 in zip(hist8, hist1):
    for key in ('loss/total', 'loss/task', 'loss/msrd_teacher', 'loss/tgpd_teacher'):
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-4, err_msg=key)
  # Cross-device reductions change the float summation order only (see adam_close).
  adam_close.assert_adam_close(state8.params, state1.params,
                               learning_rate=config8.optim.learning_rate, steps=2)
  assert batch8['images'].sharding.spec == jax.sharding.PartitionSpec('data')
  leaf = jax.tree.leaves(state8.params)[0]
  assert leaf.sharding.spec == jax.sharding.PartitionSpec()
  assert int(state8.step) == 2
  # Frozen variables are read-only inputs: unchanged and still usable (never donated).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen8, before8)


def test_loss_decreases_and_tgpd_projector_learns():
  mesh = sharding.make_mesh()
  config, state, frozen, step = _setup(mesh)
  proj_before = np.asarray(state.params['aux']['tgpd_teacher']['student_proj']['kernel'])
  teacher_proj = np.asarray(state.params['aux']['tgpd_teacher']['teacher_proj'])
  batch = sharding.host_batch_to_global(_random_batch(config, config.train.batch_size, 5), mesh)
  losses_seen = []
  for _ in range(4):
    state, metrics = step(state, frozen, batch, jax.random.key(3))
    losses_seen.append(float(metrics['loss/total']))
  assert losses_seen[-1] < losses_seen[0], losses_seen
  assert np.all(np.isfinite(losses_seen))
  proj_after = np.asarray(state.params['aux']['tgpd_teacher']['student_proj']['kernel'])
  assert not np.allclose(proj_before, proj_after), 'student-side TGPD projection is not trained'
  np.testing.assert_array_equal(
      teacher_proj, np.asarray(state.params['aux']['tgpd_teacher']['teacher_proj']))


@pytest.mark.parametrize('stage,expected', [('teacher', ()), ('coach', ('teacher',)),
                                            ('student', ('teacher', 'coach')),
                                            ('hd_pretrain', ())])
def test_frozen_names(stage, expected):
  assert step_lib.frozen_names(tcs.get_config(f'{stage},tiny')) == expected


def test_nokd_student_has_no_frozen_models():
  assert step_lib.frozen_names(tcs.get_config('student,nokd,tiny')) == ()


def test_kd_weights_per_stage():
  """The coach reads its own recipe (kd.coach_*), the student kd.{msrd,tgpd}_*; zero = left out."""
  coach = tcs.get_config('coach,tiny')
  coach.kd.update(coach_msrd_teacher_weight=0.3, coach_tgpd_teacher_weight=0.2,
                  msrd_teacher_weight=9.0, tgpd_teacher_weight=9.0)
  assert step_lib.kd_weights(coach) == {'teacher': (0.3, 0.2)}
  coach.kd.update(coach_msrd_teacher_weight=0.0, coach_tgpd_teacher_weight=0.0)
  assert step_lib.frozen_names(coach) == ()
  student = tcs.get_config('student,tiny')
  student.kd.update(msrd_teacher_weight=0.7, tgpd_teacher_weight=0.0, msrd_coach_weight=0.0,
                    tgpd_coach_weight=0.0, coach_msrd_teacher_weight=9.0)
  assert step_lib.kd_weights(student) == {'teacher': (0.7, 0.0)}


@pytest.mark.parametrize('schedule', ['step', 'cosine'])
def test_learning_rate_schedule_matches_closed_form(schedule):
  """The schedule against the formulas written out per step (reference: step decay)."""
  config = tcs.get_config('student,tiny')
  config.optim.update(schedule=schedule, learning_rate=2e-3, decay_steps=10, decay_factor=0.1,
                      cosine_final_fraction=0.05)
  lr = step_lib.learning_rate_schedule(config.optim)
  for step in range(25):
    if schedule == 'step':
      expected = 2e-3 * 0.1 ** (step // 10)
    else:
      t = min(step, 10) / 10
      expected = 2e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * t)))
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-5, err_msg=f'step {step}')
