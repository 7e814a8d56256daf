"""The whole student against the PyTorch reference, through the `convert pmapnet` path.

torch: tests/torch_ref_bev.Student (A's CamEncodeRef, B2's ViewTransformation + IPM, the
BEV tail), random weights and BatchNorm statistics, reference size (6 x 128 x 352 images,
200 x 400 canvas), batch 1, eval mode; its state dict is saved with torch.save, converted by
`pmapnet.convert_file` into ROOT/student/checkpoints/0, restored the way evaluate / export /
a later stage's frozen models restore it, and run. Bound: max|diff| <= 1e-4 x max|reference|
for every head, bev_small and the camera BEV.
"""
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch_ref_bev as ref  # noqa: E402
from configs import tcs  # noqa: E402
from mapkd_jax.convert import pmapnet  # noqa: E402
from mapkd_jax.models.student import Student  # noqa: E402
from mapkd_jax.train import checkpoint as ckpt_lib  # noqa: E402
from mapkd_jax.train import sharding, stages  # noqa: E402
from test_parity_camera import nuscenes_rig  # noqa: E402

REL_TOL = 1e-4


def _report(name, ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  diff, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs)))
  print(f'{name}: max|diff| {diff:.3g}, max|ref| {scale:.3g}, relative {diff / scale:.3g}')
  assert scale > 0 and diff <= REL_TOL * scale, (name, diff, scale)


pytestmark = pytest.mark.slow   # ~75 s of CPU: two reference-size forwards and a conversion


@pytest.fixture(scope='module')
def student_run(tmp_path_factory):
  """(torch outputs NHWC, our outputs, our camera BEV, convert summary, ckpt dir)."""
  config = ml_collections.FrozenConfigDict(tcs.get_config('student'))
  image_hw = tuple(config.data.image_size)
  torch_model = ref.randomize_(ref.Student(image_hw=image_hw), 5).eval()
  rng = np.random.default_rng(3)
  images = rng.normal(size=(1, 6, *image_hw, 3)).astype(np.float32)
  intr, rot, trans = nuscenes_rig(1, image_hw)
  captured = {}
  torch_model.feature_expand.register_forward_hook(
      lambda m, inputs, out: captured.update(topdown=inputs[0]))
  with torch.no_grad():
    out = torch_model(torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(),
                      torch.from_numpy(rot), torch.from_numpy(trans))
  theirs = {k: np.transpose(v.numpy(), (0, 2, 3, 1)) for k, v in {**out, **captured}.items()}

  root = tmp_path_factory.mktemp('converted')
  path = os.path.join(root, 'student.pt')
  torch.save(torch_model.state_dict(), path)
  del torch_model, out, captured
  start = time.time()
  summary = pmapnet.convert_file(path, config, str(root), config_name='configs/tcs.py:student')
  print(f'convert_file: {time.time() - start:.2f} s')

  model = Student(config)
  mesh = sharding.make_mesh()
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  ckpt_dir = os.path.join(root, 'student', 'checkpoints')
  _, variables = ckpt_lib.restore_params(ckpt_dir, stages.abstract_variables(model, dummy, mesh))
  batch = dict(dummy, images=jnp.asarray(images), intrinsics=jnp.asarray(intr),
               cam_rotation=jnp.asarray(rot), cam_translation=jnp.asarray(trans))
  # One forward; the camera branch's output captured on the way (its own jit would compile
  # the camera twice).
  ours, state = jax.jit(lambda v, b: model.apply(
      v, b, train=False, capture_intermediates=lambda m, method: m.name == 'camera'))(
          variables, batch)
  camera_bev = state['intermediates']['camera']['__call__'][0]
  return theirs, ours, camera_bev, summary, ckpt_dir


def test_student_matches_reference(student_run):
  theirs, ours, camera_bev, _, _ = student_run
  _report('camera BEV (topdown)', camera_bev, theirs['topdown'])
  for name in ('bev_small', 'semantic', 'embedding', 'direction'):
    _report(f'student {name}', ours[name], theirs[name])


def test_converted_checkpoint_is_a_stage_checkpoint(student_run):
  """meta names the source; unused reference blocks are listed as ignored, by name."""
  _, _, _, summary, ckpt_dir = student_run
  step, meta = ckpt_lib.read_meta(ckpt_dir)
  assert step == 0 and meta['stage'] == 'student'
  assert meta['converted_from'] == summary['source'] and summary['source'].endswith('student.pt')
  ignored = summary['ignored']
  for prefix in ('input_proj.', 'conv_osm.', 'conv_up.', 'camencode.trunk._fc.'):
    assert any(name.startswith(prefix) for name in ignored), prefix
  assert not any(name.startswith(('bevencode.', 'feature_expand.', 'conv_bev.', 'view_fusion.'))
                 and not name.endswith('num_batches_tracked') for name in ignored)
  # A second conversion into the same workdir is refused, naming the directory.
  with pytest.raises(ValueError, match='already holds checkpoints'):
    pmapnet.convert_file(summary['source'], ml_collections.FrozenConfigDict(
        tcs.get_config('student')), os.path.dirname(os.path.dirname(ckpt_dir)))
