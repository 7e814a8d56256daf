"""The jitted TCS train step: 8 fake devices == 1 device, its compiled data-parallel structure,
frozen inputs untouched, shardings."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layout_equivalence

from configs import tcs
from mapkd_jax import losses
from mapkd_jax import models as models_lib
from mapkd_jax.train import sharding
from mapkd_jax.train import stages
from mapkd_jax.train import step as step_lib


def _random_batch(config, batch_size, seed):
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in stages.batch_spec(config, batch_size).items():
    if name == 'semantic':
      batch[name] = rng.integers(0, 4, shape).astype(dtype)
    elif name == 'instance':
      batch[name] = rng.integers(0, 6, shape).astype(dtype)
    elif name in ('direction', 'direction_backward'):
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


def _setup(mesh, optim=None):
  """A distilling student stage whose frozen 'teacher' is another (randomly initialized) student.

  The step is generic over models; the real teacher is exercised by the end-to-end tests.
  `optim` updates config.optim (e.g. plain SGD for the device-layout comparisons).
  """
  config = tcs.get_config('student,tiny')
  config.optim.update(optim or {})
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


# Plain SGD at lr 1 without clipping: the update of one step is minus the gradient, exactly.
SGD = dict(name='sgd', learning_rate=1.0, grad_clip=1e9)


@pytest.fixture(scope='module')
def sgd_steps():
  """{devices: _setup(...)} with SGD, on 8 devices and on 1 (compiled once for the module)."""
  return {8: _setup(sharding.make_mesh(), optim=SGD),
          1: _setup(sharding.make_mesh(jax.devices()[:1]), optim=SGD)}


@pytest.fixture(scope='module')
def adam8():
  """The reference optimizer's step on 8 devices."""
  return _setup(sharding.make_mesh())


def _step_one(setup, host_batch):
  """(gradient and batch-stat change of one step, its metrics, the global batch): state kept."""
  _, state, frozen, step = setup
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  before = jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  batch = sharding.host_batch_to_global(host_batch, mesh)
  new, metrics = step(jax.tree.map(lambda x: x.copy(), state), frozen, batch, jax.random.key(3))
  after = {'params': new.params, 'batch_stats': new.batch_stats}
  delta = jax.tree.map(lambda b, a: b - np.asarray(a), before, after)
  return delta, jax.device_get(metrics), batch


def test_eight_devices_equal_one_device(sgd_steps):
  """Step-1 loss and gradients (and BatchNorm statistics) of 8 devices == 1 device, to float32
  rounding (layout_equivalence); a wrong batch split and a missing all-reduce are caught."""
  assert jax.device_count() == 8, 'tests/conftest.py should give 8 fake CPU devices'
  config, state8, frozen8, _ = sgd_steps[8]
  host = _random_batch(config, config.train.batch_size, 10)
  frozen_before = jax.tree.map(np.asarray, frozen8)
  grad8, metrics8, batch8 = _step_one(sgd_steps[8], host)
  grad1, metrics1, _ = _step_one(sgd_steps[1], host)
  for key in ('loss/total', 'loss/task', 'loss/msrd_teacher', 'loss/tgpd_teacher'):
    np.testing.assert_allclose(metrics8[key], metrics1[key],
                               rtol=layout_equivalence.LOSS_RTOL, err_msg=key)
  layout_equivalence.assert_same_gradients(grad8, grad1)

  # Host 1 reading host 0's rows (a wrong split of the global batch) is caught ...
  wrong_split = {k: np.concatenate([v[:4], v[:4]]) for k, v in host.items()}
  grad_wrong, _, _ = _step_one(sgd_steps[8], wrong_split)
  with pytest.raises(AssertionError, match='differ'):
    layout_equivalence.assert_same_gradients(grad_wrong, grad1)
  # ... and so is a missing all-reduce: device 0 alone would use its own row's gradient and
  # BatchNorm statistics, which is what one device computes on 8 copies of that row.
  device0_alone = {k: np.repeat(v[:1], len(v), axis=0) for k, v in host.items()}
  grad_local, _, _ = _step_one(sgd_steps[1], device0_alone)
  with pytest.raises(AssertionError, match='differ'):
    layout_equivalence.assert_same_gradients(grad_local, grad1)

  assert batch8['images'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert jax.tree.leaves(state8.params)[0].sharding.spec == jax.sharding.PartitionSpec()
  # Frozen variables are read-only inputs: unchanged and still usable (never donated).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen8,
               frozen_before)


def _collectives(hlo_text):
  """{op kind: [result element counts]} of the cross-device collectives in compiled HLO."""
  found = {}
  for match in re.finditer(r'=\s*(\S.*?)\s+(all-reduce|all-gather|all-to-all|collective-permute|'
                           r'reduce-scatter|collective-broadcast)(?:-start)?\(', hlo_text):
    sizes = [int(np.prod([int(d) for d in dims.split(',') if d]))
             for dims in re.findall(r'\w+\[([0-9,]*)\]', match.group(1))]
    found.setdefault(match.group(2), []).extend(sizes)
  return found


def test_data_parallel_structure_of_compiled_step(adam8):
  """The compiled 8-device step communicates what data parallelism must and nothing else.

  Only all-reduces (gradients, BatchNorm statistics, metrics), of about one parameter count of
  elements in all; no all-gather / all-to-all / permute of parameters or activations; the train
  state is donated (every state buffer aliased to an output) and the frozen model is not.
  """
  config, state, frozen, step = adam8
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  batch = sharding.host_batch_to_global(_random_batch(config, config.train.batch_size, 4), mesh)
  compiled = step.lower(state, frozen, batch, jax.random.key(3)).compile()
  text = compiled.as_text()
  found = _collectives(text)
  assert set(found) == {'all-reduce'}, {k: len(v) for k, v in found.items()}
  trained = (sum(x.size for x in jax.tree.leaves(state.params['model']))
             + sum(x.size for x in jax.tree.leaves(state.params['aux'])))
  stats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
  reduced = sum(found['all-reduce'])
  # Each gradient once (the fixed TGPD teacher-side projection has none), BatchNorm means and
  # variances (2 per statistic, mean and mean of squares), a few scalar metrics.
  model_params = sum(x.size for x in jax.tree.leaves(state.params['model']))
  assert model_params <= reduced <= trained + 2 * stats + 64, (model_params, reduced, trained)

  header = text[:text.index('\n')]
  aliased = {int(m) for m in re.findall(r'\{[0-9, ]*\}: \((\d+),', header)}
  n_state, n_frozen = len(jax.tree.leaves(state)), len(jax.tree.leaves(frozen))
  assert aliased == set(range(n_state)), (sorted(aliased), n_state)
  assert not aliased & set(range(n_state, n_state + n_frozen)), 'frozen variables donated'
  memory = compiled.memory_analysis()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert memory.alias_size_in_bytes >= state_bytes - 64, (memory, state_bytes)


def test_loss_decreases_and_tgpd_projector_learns(adam8):
  config, state, frozen, step = adam8
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  proj_before = np.asarray(state.params['aux']['tgpd_teacher']['student_proj']['kernel'])
  teacher_proj = np.asarray(state.params['aux']['tgpd_teacher']['teacher_proj'])
  batch = sharding.host_batch_to_global(_random_batch(config, config.train.batch_size, 5), mesh)
  state = jax.tree.map(lambda x: x.copy(), state)   # the fixture's state stays undonated
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
