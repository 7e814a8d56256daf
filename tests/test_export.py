"""Student export: artifact reloaded in a fresh process matches the live model; errors; bench smoke."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import stage_checkpoints
from configs import tcs
from mapkd_jax import bench
from mapkd_jax import export
from mapkd_jax import models as models_lib
from mapkd_jax.data import schema
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import stages

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 7

# What a user runs: plain jax + numpy (the README loader snippet), then the package helper.
_FRESH_PROCESS = r'''
import json, sys
import numpy as np
from jax import export as jax_export
out_dir, io_dir = sys.argv[1], sys.argv[2]
with open(f'{out_dir}/student.jax_exported', 'rb') as f:
  exported = jax_export.deserialize(bytearray(f.read()))
with open(f'{out_dir}/student.json') as f:
  meta = json.load(f)
inputs = np.load(f'{io_dir}/inputs.npz')
outputs = exported.call(*[inputs[spec['name']] for spec in meta['inputs']])
for name, value in outputs.items():
  np.save(f'{io_dir}/raw_{name}.npy', np.asarray(value))

from mapkd_jax import export
fn, _ = export.load_exported(out_dir)
outputs = fn(*[inputs[spec['name']][:1] for spec in meta['inputs']])
for name, value in outputs.items():
  np.save(f'{io_dir}/helper_{name}.npy', np.asarray(value))
'''


def _save_student(config, workdir, seed):
  """Saves a student's variables the way the trainer does; returns (model, variables)."""
  model = models_lib.build('student', config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  # Numpy-filled weights of the student's shapes: what is tested is the export of whatever the
  # checkpoint holds, and a jitted init would be one more whole-model compile.
  variables = stage_checkpoints.random_variables(model, dummy, seed)
  latest, best = ckpt_lib.managers(os.path.join(workdir, 'student'), max_to_keep=2)
  ckpt_lib.save(latest, STEP, variables=variables, opt_state={'aux': jnp.zeros(3)},
                data_position={'epoch': 0, 'batch_in_epoch': STEP, 'seed': 0},
                meta={'stage': 'student', 'step': STEP})
  latest.wait_until_finished()
  latest.close()
  best.close()
  return model, variables


@pytest.fixture(scope='module')
def exported_student(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  config = tcs.get_config('student,tiny')
  workdir, out_dir = str(root / 'run'), str(root / 'exported')
  model, variables = _save_student(config, workdir, seed=3)
  metadata = export.export_student(config, workdir, out_dir, checkpoint='latest', batch=0,
                                   config_name='configs/tcs.py:student,tiny',
                                   platforms=('cpu', 'cuda'))
  return dict(config=config, workdir=workdir, out_dir=out_dir, model=model,
              variables=variables, metadata=metadata, root=root)


def test_fresh_process_matches_live_model(exported_student):
  e = exported_student
  batch = bench.random_batch(e['config'], 2, seed=1)
  io_dir = e['root'] / 'io'
  io_dir.mkdir()
  np.savez(io_dir / 'inputs.npz', **{k: batch[k] for k in export.INPUT_NAMES})
  live = jax.jit(lambda v, b: e['model'].apply(v, b, train=False))(e['variables'], batch)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  subprocess.run([sys.executable, '-c', _FRESH_PROCESS, e['out_dir'], str(io_dir)], check=True,
                 cwd=REPO_ROOT, env=env, timeout=300)
  for name in export.OUTPUT_NAMES:
    raw = np.load(io_dir / f'raw_{name}.npy')
    helper = np.load(io_dir / f'helper_{name}.npy')
    assert raw.shape == live[name].shape and helper.shape == (1, *live[name].shape[1:])
    np.testing.assert_allclose(raw, live[name], atol=1e-5)
    np.testing.assert_allclose(helper, live[name][:1], atol=1e-5)   # symbolic batch: B = 1 too


def test_metadata_describes_camera_only_interface(exported_student):
  e = exported_student
  meta, config = e['metadata'], e['config']
  with open(os.path.join(e['out_dir'], export.METADATA)) as f:
    assert json.load(f) == json.loads(json.dumps(meta))
  assert [i['name'] for i in meta['inputs']] == list(export.INPUT_NAMES)
  spec = schema.batch_spec(config.data, 1)
  for item in meta['inputs']:
    assert item['shape'] == ['B', *spec[item['name']][0][1:]]
  assert not {'lidar_points', 'lidar_mask', 'sd_prior'} & {i['name'] for i in meta['inputs']}
  bev_h, bev_w = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  assert meta['bev']['shape_hw'] == [bev_h, bev_w]
  assert {o['name']: o['shape'] for o in meta['outputs']} == {
      'semantic': ['B', bev_h, bev_w, len(config.data.classes) + 1],
      'embedding': ['B', bev_h, bev_w, config.model.decoder.embedding_dim],
      'direction': ['B', bev_h, bev_w, config.data.direction_bins + 1]}
  assert meta['camera_order'] == list(config.data.cameras)
  assert meta['image_normalization']['mean'] == list(schema.IMAGENET_MEAN)
  assert meta['checkpoint']['step'] == STEP
  assert meta['platforms'] == ['cpu', 'cuda']
  assert meta['batch'].startswith('symbolic')
  n_params = sum(x.size for x in jax.tree.leaves(e['variables']['params']))
  assert meta['parameters'] == n_params


def test_missing_checkpoint_names_directory_and_command(tmp_path):
  config = tcs.get_config('student,tiny')
  with pytest.raises(FileNotFoundError) as info:
    export.export_student(config, str(tmp_path), str(tmp_path / 'out'), checkpoint='best')
  message = str(info.value)
  assert os.path.join(str(tmp_path), 'student', 'best') in message
  assert f'python launch.py --config configs/tcs.py:student,tiny --workdir {tmp_path}' in message


def test_checkpoint_of_another_config_is_refused(exported_student, tmp_path):
  config = tcs.get_config('student,tiny')
  config.model.student.expand_channels = (24, 40)   # the saved student has (24, 32)
  with pytest.raises(ValueError, match='checkpoint') as info:
    export.export_student(config, exported_student['workdir'], str(tmp_path), checkpoint='latest')
  assert os.path.join(exported_student['workdir'], 'student', 'checkpoints') in str(info.value)
  assert not os.path.exists(tmp_path / export.ARTIFACT)


@pytest.mark.parametrize('arg, flag', [('teacher,tiny', '--config'), ('student,tiny', '--checkpoint')])
def test_bad_arguments_name_the_flag(arg, flag, tmp_path):
  with pytest.raises(ValueError, match=flag):
    export.export_student(tcs.get_config(arg), str(tmp_path), str(tmp_path / 'out'),
                          checkpoint='newest')


def test_load_exported_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=export.ARTIFACT):
    export.load_exported(str(tmp_path))


def _rig_ref(yaw, height, radius):
  """One camera's rotation (camera -> ego) and translation, built axis by axis."""
  forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
  right = np.cross(forward, [0.0, 0.0, 1.0])   # right-handed: right = forward x up
  down = np.array([0.0, 0.0, -1.0])
  rotation = np.zeros((3, 3))
  for axis, column in enumerate((right, down, forward)):
    rotation[:, axis] = column
  return rotation, radius * forward + [0.0, 0.0, height]


@pytest.mark.parametrize('num_cams, batch_size', [(6, 2), (1, 1), (4, 3)])
def test_camera_rig_matches_loop(num_cams, batch_size):
  intr, rot, trans = bench.camera_rig(num_cams, batch_size, (64, 176), rng=np.random.default_rng(0),
                                      mount_height=1.5, mount_radius=0.8)
  for b in range(batch_size):
    for c in range(num_cams):
      yaw = np.arctan2(rot[b, c, 1, 2], rot[b, c, 0, 2])   # recovered from the forward axis
      assert abs(np.rad2deg(np.angle(np.exp(1j * (yaw - 2 * np.pi * c / num_cams))))) <= 2.0
      rot_ref, trans_ref = _rig_ref(yaw, 1.5, 0.8)
      np.testing.assert_allclose(rot[b, c], rot_ref, atol=1e-6)
      np.testing.assert_allclose(trans[b, c], trans_ref, atol=1e-6)
      assert np.isclose(np.linalg.det(rot[b, c]), 1.0, atol=1e-5)
      assert intr[b, c, 0, 2] == 88 and intr[b, c, 1, 2] == 32


def test_speed_ratios_and_model_names():
  records = [{'name': 'teacher', 'frames_per_s': 2.0}, {'name': 'student', 'frames_per_s': 7.0},
             {'name': 'coach', 'frames_per_s': 3.5}]
  assert bench.speed_ratios(records) == {'student_over_teacher_fps': 3.5,
                                         'student_over_coach_fps': 2.0}
  assert bench.speed_ratios(records[:1]) == {}
  config = tcs.get_config('student,tiny')
  assert bench.model_names(['all'], config) == list(bench.ALL_MODELS)
  config.model.hd.coach_refine = False
  assert 'coach_norefine' not in bench.model_names(['all'], config)
  with pytest.raises(ValueError, match='--models'):
    bench.model_names(['student', 'pupil'], config)


def test_variant_does_not_leak_into_later_models():
  config = ml_collections.FrozenConfigDict(tcs.get_config('student,tiny'))
  names = ['coach_norefine', 'coach', 'coach_norefine', 'teacher']
  refine = [bench.variant(name, config)[1].model.hd.coach_refine for name in names]
  assert refine == [False, True, False, True]
  assert [bench.variant(n, config)[0] for n in names] == ['coach', 'coach', 'coach', 'teacher']
  assert config.model.hd.coach_refine


def test_bench_smoke_json_lines():
  lines = []
  bench.run(tcs.get_config('student,tiny'), ['student'], batch_size=1, iters=2, warmup=1, seed=0,
            config_name='tiny', emit=lines.append)
  records = [json.loads(line) for line in lines]
  assert [r['name'] for r in records] == ['student', 'ratios']
  student = records[0]
  assert student['iters'] == 2 and student['batch'] == 1 and student['params'] > 0
  assert student['flops'] > 0 and student['frames_per_s'] > 0
  assert student['latency_ms_p90'] >= student['latency_ms_median'] > 0


def test_checkpoint_location_and_fixed_batch_specs(tmp_path):
  config = tcs.get_config('student,tiny,nokd')
  assert export.checkpoint_location(config, str(tmp_path), '12') == (
      os.path.join(str(tmp_path), 'student_nokd', 'checkpoints'), 12)
  assert export.checkpoint_location(config, str(tmp_path), 'best')[0].endswith(
      os.path.join('student_nokd', 'best'))
  assert 'configs/tcs.py:student,nokd,tiny' in export.train_command(config, str(tmp_path))
  specs = export.input_specs(config, 3)
  spec = schema.batch_spec(config.data, 3)
  assert {k: (v.shape, v.dtype) for k, v in specs.items()} == {
      k: (spec[k][0], np.dtype(spec[k][1])) for k in export.INPUT_NAMES}
