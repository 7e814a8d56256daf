"""The whole teacher against the PyTorch reference, through the `convert pmapnet` path.

torch: tests/torch_ref_teacher.Teacher (P-MapNet PMapNet_HD with LiDAR, assembled from the
block references), random weights and BatchNorm statistics, batch 1, eval mode, at a small
config that keeps every block and name of the reference (EfficientNet-B0 camera encoder and
HDMapNet view transform, PointPillars with 2-3-3 blocks and a 2-conv head, 3 stride-2 neck
convs, 2 SD attention layers, ViT with patch 8) on a 40 x 80 canvas with small widths; the
reference size would cost minutes of CPU (the ViT-B alone is 86 M parameters).
Its state dict is saved with torch.save, converted by `pmapnet.convert_file` into
ROOT/teacher/checkpoints/0 and restored the ways `evaluate` (restore_params) and a coach's
`frozen.teacher` (stages.restore_frozen) read it. Bound: max|diff| <= 1e-4 x max|reference|
for the final and pre-refinement heads and bev_small.
"""
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch_ref_bev  # noqa: E402
import torch_ref_teacher as ref  # noqa: E402
import torch_ref_vit  # noqa: E402
from configs import tcs  # noqa: E402
from mapkd_jax import checkpoint as ckpt_lib  # noqa: E402
from mapkd_jax import sharding, stages  # noqa: E402
from mapkd_jax import train_step as step_lib  # noqa: E402
from mapkd_jax.convert import pmapnet  # noqa: E402
from mapkd_jax.models.teacher import Teacher  # noqa: E402
from test_parity_camera import nuscenes_rig  # noqa: E402
from test_parity_lidar import _points  # noqa: E402
from test_parity_student import REL_TOL, _report  # noqa: E402  (one bound, one report)


pytestmark = pytest.mark.slow   # a whole model: torch forward, conversion, compile
HEADS = ('semantic', 'embedding', 'direction')


def small_teacher_config(stage='teacher'):
  """teacher,tiny with the reference's structure: EfficientNet-B0 + HDMapNet view transform,
  3 neck convs (bev_small and the SD tokens on the same 5 x 10 grid), reference PointPillars
  depth, ViT patch 8; 40 x 80 canvas."""
  config = tcs.get_config(f'{stage},tiny')
  config.data.bev_x, config.data.bev_y = (-30.0, 30.0, 0.75), (-15.0, 15.0, 0.75)
  config.data.max_points = 2048
  config.data.image_size = (64, 192)   # multiples of 32, as the reference's 128 x 352
  config.model.camera.update(image_encoder='efficientnet_b0', channels=16, fusion_channels=0,
                             view_transform='hdmapnet')
  config.model.lidar.update(pointnet_channels=16, block_channels=(16, 24, 32),
                            block_layers=(2, 3, 3), block_strides=(1, 2, 2),
                            head_channels=(32, 24), out_channels=32, padding='reference')
  config.model.neck.update(channels=48, num_layers=3)
  config.model.sd.update(encoder_channels=(8, 16, 16), d_model=16, num_heads=2, num_layers=2,
                         ffn_dim=32, dropout=0.1)
  config.model.hd.update(patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=4,
                         dropout=0.0)
  return config


def whole_model_run(config, torch_model, model, root):
  """Reference outputs, conversion through convert_file and our restored model's outputs.

  Args:
    config: the stage's (frozen) config; torch_model: its torch reference (random weights);
    model: our model of the stage; root: workdir for the conversion.
  Returns:
    (torch outputs NHWC, our outputs, convert summary, ckpt dir, variables, dummy, mesh).
  """
  torch_ref_bev.randomize_(torch_model, 11)
  torch_ref_vit.layer_norms_random_(torch_model, 12)
  if hasattr(torch_model, 'restore_constants_'):   # the coach's geometry Parameters
    torch_model.restore_constants_()
  torch_model.eval()
  image_hw = tuple(config.data.image_size)
  rng = np.random.default_rng(5)
  images = rng.normal(size=(1, 6, *image_hw, 3)).astype(np.float32)
  intr, rot, trans = nuscenes_rig(1, image_hw)
  points, mask = _points(2, 1, config.data.max_points, config.data.bev_x, config.data.bev_y)
  points = points * mask[..., None]   # the schema's zero padding
  canvas = torch_model.canvas
  sd = np.sign(rng.normal(size=(1, *canvas, 1))).astype(np.float32)
  with torch.no_grad():
    out = torch_model(torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(),
                      torch.from_numpy(rot), torch.from_numpy(trans), torch.from_numpy(intr),
                      torch.from_numpy(points), torch.from_numpy(mask),
                      torch.from_numpy(sd).permute(0, 3, 1, 2))
  theirs = {k: np.transpose(v.numpy(), (0, 2, 3, 1)) for k, v in out.items()}

  path = os.path.join(root, f'{config.stage}.pt')
  torch.save(torch_model.state_dict(), path)
  start = time.time()
  summary = pmapnet.convert_file(path, config, str(root), config_name=f'small {config.stage}')
  print(f'convert_file ({config.stage}): {time.time() - start:.2f} s')

  mesh = sharding.make_mesh()
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  ckpt_dir = os.path.join(root, config.stage, 'checkpoints')
  _, variables = ckpt_lib.restore_params(ckpt_dir, stages.abstract_variables(model, dummy, mesh))
  batch = dict(dummy, images=jnp.asarray(images), intrinsics=jnp.asarray(intr),
               cam_rotation=jnp.asarray(rot), cam_translation=jnp.asarray(trans),
               lidar_points=jnp.asarray(points), lidar_mask=jnp.asarray(mask),
               sd_prior=jnp.asarray(sd))
  ours = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
  return theirs, ours, summary, ckpt_dir, variables, dummy, mesh


def compare_outputs(what, ours, theirs):
  _report(f'{what} bev_small', ours['bev_small'], theirs['bev_small'])
  for name in HEADS:
    _report(f'{what} {name}_pre', ours[f'{name}_pre'], theirs[f'{name}_pre'])
    _report(f'{what} {name}', ours[name], theirs[name])


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
  """(torch outputs NHWC, our outputs, convert summary, ckpt dir, config, variables, dummy,
  mesh)."""
  config = ml_collections.FrozenConfigDict(small_teacher_config())
  theirs, ours, summary, ckpt_dir, variables, dummy, mesh = whole_model_run(
      config, ref.Teacher(config), Teacher(config), tmp_path_factory.mktemp('converted'))
  return theirs, ours, summary, ckpt_dir, config, variables, dummy, mesh


def test_teacher_matches_reference(teacher_run):
  theirs, ours = teacher_run[:2]
  compare_outputs('teacher', ours, theirs)


def test_converted_teacher_is_frozen_teacher_and_lists_ignored(teacher_run):
  """A coach stage restores it as frozen.teacher; only timm's unused tensors, the EfficientNet
  classifier and BatchNorm counters are ignored."""
  _, _, summary, ckpt_dir, config, variables, dummy, mesh = teacher_run
  step, meta = ckpt_lib.read_meta(ckpt_dir)
  assert step == 0 and meta['stage'] == 'teacher' and meta['converted_from'] == summary['source']
  coach = tcs.get_config('coach,tiny')
  coach.data, coach.model = small_teacher_config().data, small_teacher_config().model
  coach.frozen.teacher = ckpt_dir
  coach = ml_collections.FrozenConfigDict(coach)
  assert step_lib.frozen_names(coach) == ('teacher',)
  frozen = stages.restore_frozen(coach, '', step_lib.make_models(coach), dummy, mesh)
  jax.tree.map(np.testing.assert_array_equal, frozen['teacher'], variables)
  ignored = {n for n in summary['ignored'] if not n.endswith('num_batches_tracked')
             and not n.startswith(('camencode.trunk._conv_head.', 'camencode.trunk._bn1.'))}
  assert ignored == {'mae_head.cls_token', 'mae_head.patch_embed.proj.weight',
                     'mae_head.patch_embed.proj.bias', 'mae_head.head.weight',
                     'mae_head.head.bias', 'camencode.trunk._fc.weight',
                     'camencode.trunk._fc.bias'}, ignored
