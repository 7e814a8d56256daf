r"""Export of the trained student as a self-contained `jax.export` artifact (+ JSON metadata).

  python -m mapkd_jax.export --config configs/tcs.py:student --workdir runs/tcs --out exported/
  python -m mapkd_jax.export --config configs/tcs.py:student,tiny --workdir runs/tiny \
      --out exported/ --checkpoint latest --batch 1

Writes OUT/student.jax_exported (`jax.export.Exported.serialize()`) and OUT/student.json. The
exported function takes the cameras and their calibration only (no LiDAR, SD or HD input):
  fn(images, intrinsics, cam_rotation, cam_translation) -> {'semantic', 'embedding', 'direction'}
The model variables are baked in as constants: one file that needs nothing but jax to run
(no Flax, Orbax or this package), and params can never be paired with the wrong graph. The
price is one artifact per checkpoint; re-exporting takes seconds. Only the checkpoint's
`params` item is restored; the TGPD projectors (training-only, in `opt_state`) are not part
of it. By default (`--batch 0`) the batch dimension is symbolic ('b': any size at call time);
`--batch N` fixes it to N.
"""
import json
import os

from absl import app
from absl import flags
import jax
from jax import export as jax_export
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from mapkd_jax import models as models_lib
from mapkd_jax.data import schema
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import stages

ARTIFACT = 'student.jax_exported'
METADATA = 'student.json'
INPUT_NAMES = ('images', 'intrinsics', 'cam_rotation', 'cam_translation')
OUTPUT_NAMES = ('semantic', 'embedding', 'direction')
_INPUT_MEANING = {
    'images': 'RGB camera images resized to image_size, (rgb_uint8 / 255 - mean) / std '
              '(see image_normalization), cameras in camera_order',
    'intrinsics': '3x3 pinhole intrinsics in pixels of the resized network input',
    'cam_rotation': '3x3 rotation camera -> ego (camera frame: x right, y down, z forward)',
    'cam_translation': 'camera position in the ego frame, metres',
}


def checkpoint_location(config, workdir, which):
  """(checkpoint dir, step or None for its latest) for --checkpoint best|latest|STEP.

  Raises:
    ValueError: naming --checkpoint when `which` is none of the accepted forms.
  """
  stage_dir = os.path.join(workdir, stages.stage_dir_name(config))
  if which == 'best':
    return os.path.join(stage_dir, 'best'), None
  if which == 'latest':
    return os.path.join(stage_dir, 'checkpoints'), None
  if not which.isdigit():
    raise ValueError(f"--checkpoint wants 'best', 'latest' or a step number, got {which!r}")
  return os.path.join(stage_dir, 'checkpoints'), int(which)


def train_command(config, workdir):
  """The launch.py command that trains (and so creates the checkpoints of) this student."""
  mods = ['nokd'] if config.nokd else []
  if config.data.bev_name == 'tiny':
    mods.append('tiny')
  elif config.data.bev_name != '60x30':
    mods.append(f'bev={config.data.bev_name}')
  arg = ','.join(['student'] + mods)
  return f'python launch.py --config configs/tcs.py:{arg} --workdir {workdir}'


def input_specs(config, batch):
  """name -> jax.ShapeDtypeStruct of the exported inputs; batch None = symbolic 'b'."""
  spec = stages.batch_spec(config, 1)
  if batch is None:
    (b,) = jax_export.symbolic_shape('b')
  else:
    b = batch
  return {name: jax.ShapeDtypeStruct((b, *spec[name][0][1:]), spec[name][1])
          for name in INPUT_NAMES}


def inference_fn(model, variables):
  """The exported function: camera inputs -> semantic/embedding/direction, eval mode.

  Args:
    model: the Student module.
    variables: {'params', 'batch_stats'}; closed over, so they become constants.

  Returns:
    fn(images [B, C, H, W, 3], intrinsics [B, C, 3, 3], cam_rotation [B, C, 3, 3],
    cam_translation [B, C, 3]) -> {'semantic' [B, Hb, Wb, 4], 'embedding' [B, Hb, Wb, E],
    'direction' [B, Hb, Wb, 37]}, logits / raw embeddings.
  """
  def fn(images, intrinsics, cam_rotation, cam_translation):
    batch = {'images': images, 'intrinsics': intrinsics, 'cam_rotation': cam_rotation,
             'cam_translation': cam_translation}
    out = model.apply(variables, batch, train=False)
    return {name: out[name] for name in OUTPUT_NAMES}
  return fn


def _abstract_student(model, config):
  dummy = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), dummy)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes)


def export_student(config, workdir, out_dir, *, checkpoint='best', batch=0, config_name='',
                   platforms=None):
  """Restores the student's `params` item and writes the artifact and its metadata.

  Args:
    config: a student-stage config.
    workdir: the experiment root (launch.py --workdir).
    out_dir: where ARTIFACT and METADATA are written (created if missing).
    checkpoint: 'best', 'latest' or a step number (string) of ROOT/<stage>/checkpoints.
    batch: fixed batch size, or 0 for a symbolic batch dimension.
    config_name: the --config string, recorded in the metadata.
    platforms: lowering platforms (e.g. ('cpu', 'cuda')); None = the default backend.

  Returns:
    The metadata dict written to METADATA.

  Raises:
    ValueError: config not of the student stage, bad --checkpoint/--batch, or a checkpoint
      that does not match this config's model.
    FileNotFoundError: no checkpoint; the message names the directory and the train command.
  """
  if config.stage != 'student':
    raise ValueError(f'--config: export wants the student stage, got {config.stage!r}')
  if batch < 0:
    raise ValueError(f'--batch must be >= 0 (0 = symbolic), got {batch}')
  if not isinstance(config, ml_collections.FrozenConfigDict):
    config = ml_collections.FrozenConfigDict(config)
  model = models_lib.build('student', config)
  ckpt_dir, step = checkpoint_location(config, workdir, str(checkpoint))
  step, variables = ckpt_lib.restore_params(
      ckpt_dir, _abstract_student(model, config), step=step, what='student to export',
      hint=f'train it first: {train_command(config, workdir)}')
  variables = jax.device_get(variables)

  specs = input_specs(config, batch or None)
  fn = jax.jit(inference_fn(model, variables))
  exported = jax_export.export(fn, platforms=platforms)(*(specs[n] for n in INPUT_NAMES))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ARTIFACT), 'wb') as f:
    f.write(exported.serialize())
  metadata = _metadata(config, exported, specs, step=step, ckpt_dir=ckpt_dir,
                       config_name=config_name, variables=variables)
  with open(os.path.join(out_dir, METADATA), 'w') as f:
    json.dump(metadata, f, indent=2)
  return metadata


def _shape_list(shape):
  return [d if isinstance(d, int) else 'B' for d in shape]


def _metadata(config, exported, specs, *, step, ckpt_dir, config_name, variables):
  data = config.data
  bev_h, bev_w = schema.bev_shape(data.bev_x, data.bev_y)
  out_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  outputs = [{'name': name, 'shape': _shape_list(out_avals[name].shape),
              'dtype': str(out_avals[name].dtype)} for name in OUTPUT_NAMES]
  meanings = {
      'semantic': f'logits per BEV cell of {["background", *data.classes]} (argmax = class)',
      'embedding': 'instance embedding per BEV cell (cluster line pixels into polylines)',
      'direction': f'logits of {data.direction_bins} direction bins of '
                   f'{360 // data.direction_bins} degrees, index 0 = no line',
  }
  for out in outputs:
    out['meaning'] = meanings[out['name']]
  batch_dim = specs['images'].shape[0]
  return {
      'artifact': ARTIFACT,
      'format': 'jax.export.Exported.serialize(); load with jax.export.deserialize',
      'jax_version': jax.__version__,
      'platforms': list(exported.platforms),
      'config_name': config_name,
      'config': json.loads(config.to_json_best_effort()),
      'checkpoint': {'dir': os.path.abspath(ckpt_dir), 'step': int(step)},
      'parameters': int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params']))),
      'params_baked_in': True,
      'batch': batch_dim if isinstance(batch_dim, int) else 'symbolic (any B >= 1)',
      'call': f'fn({", ".join(INPUT_NAMES)}) -> dict of outputs',
      'inputs': [{'name': n, 'shape': _shape_list(specs[n].shape), 'dtype': str(specs[n].dtype),
                  'meaning': _INPUT_MEANING[n]} for n in INPUT_NAMES],
      'camera_order': list(data.cameras),
      'image_size_hw': list(data.image_size),
      'image_normalization': {'mean': list(schema.IMAGENET_MEAN), 'std': list(schema.IMAGENET_STD),
                              'formula': '(rgb_uint8 / 255 - mean) / std, RGB channel order'},
      'outputs': outputs,
      'bev': {'frame': 'ego: x forward, y left, metres',
              'x_range': list(data.bev_x[:2]), 'y_range': list(data.bev_y[:2]),
              'resolution_xy': [data.bev_x[2], data.bev_y[2]], 'shape_hw': [bev_h, bev_w],
              'raster_convention': 'row i is y = y_min + (i + 0.5) * ry, column j is '
                                   'x = x_min + (j + 0.5) * rx'},
  }


def load_exported(directory):
  """(fn, metadata) of an exported student; fn(images, intrinsics, cam_rotation, cam_translation).

  Raises:
    FileNotFoundError: naming the missing file.
  """
  paths = [os.path.join(directory, name) for name in (ARTIFACT, METADATA)]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: missing; create it with python -m mapkd_jax.export')
  with open(paths[0], 'rb') as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  with open(paths[1]) as f:
    metadata = json.load(f)

  def fn(images, intrinsics, cam_rotation, cam_translation):
    args = [jnp.asarray(x, jnp.float32) for x in (images, intrinsics, cam_rotation,
                                                   cam_translation)]
    return exported.call(*args)
  return fn, metadata


def define_flags():
  """Defines the CLI flags; only when run as a script, so importing this module next to
  another absl script cannot raise DuplicateFlagError."""
  config_flags.DEFINE_config_file(
      'config', None, 'Student config, e.g. configs/tcs.py:student or configs/tcs.py:student,tiny.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Experiment root that holds student/checkpoints (the '
                      '--workdir given to launch.py).')
  flags.DEFINE_string('out', None, f'Output directory for {ARTIFACT} and {METADATA}.')
  flags.DEFINE_string('checkpoint', 'best', "'best' (ROOT/<stage>/best), 'latest' "
                      '(ROOT/<stage>/checkpoints) or a step number of the latter.')
  flags.DEFINE_integer('batch', 0, 'Batch size baked into the artifact; 0 = symbolic batch '
                       "dimension 'b' (any batch size at call time).")
  flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms the artifact is lowered for '
                    '(lowering needs no such device here).')


def main(argv):
  del argv
  f = flags.FLAGS
  metadata = export_student(f.config, f.workdir, f.out, checkpoint=f.checkpoint, batch=f.batch,
                            config_name=f['config'].config_filename, platforms=tuple(f.platforms))
  print(json.dumps({'out': os.path.abspath(f.out), 'step': metadata['checkpoint']['step'],
                    'batch': metadata['batch'], 'platforms': metadata['platforms']}))


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config', 'workdir', 'out'])
  app.run(main)
