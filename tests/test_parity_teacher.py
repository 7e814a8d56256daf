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
import copy
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
from mapkd_jax.convert import pmapnet  # noqa: E402
from mapkd_jax.models.teacher import Teacher  # noqa: E402
from mapkd_jax.train import checkpoint as ckpt_lib  # noqa: E402
from mapkd_jax.train import sharding, stages  # noqa: E402
from mapkd_jax.train import step as step_lib  # noqa: E402
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


def make_inputs(config, canvas, batch=1):
  """Random images, the nuScenes rig, LiDAR points (zero-padded) and an SD raster; numpy."""
  image_hw = tuple(config.data.image_size)
  rng = np.random.default_rng(5)
  images = rng.normal(size=(batch, 6, *image_hw, 3)).astype(np.float32)
  intr, rot, trans = nuscenes_rig(batch, image_hw)
  points, mask = _points(2, batch, config.data.max_points, config.data.bev_x, config.data.bev_y)
  points = points * mask[..., None]   # the schema's zero padding
  sd = np.sign(rng.normal(size=(batch, *canvas, 1))).astype(np.float32)
  return dict(images=images, intrinsics=intr, cam_rotation=rot, cam_translation=trans,
              lidar_points=points, lidar_mask=mask, sd_prior=sd)


def torch_forward(torch_model, inputs):
  """The torch model on `inputs` (in its current mode) -> {name: NHWC numpy}."""
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  with torch.no_grad():
    out = torch_model(t['images'].permute(0, 1, 4, 2, 3).contiguous(), t['cam_rotation'],
                      t['cam_translation'], t['intrinsics'], t['lidar_points'],
                      t['lidar_mask'], t['sd_prior'].permute(0, 3, 1, 2))
  return {k: np.transpose(v.numpy(), (0, 2, 3, 1)) for k, v in out.items()}


def random_reference(make_torch_model):
  """make_torch_model() with random weights, BatchNorm statistics and LayerNorm scales."""
  torch_model = make_torch_model()
  torch_ref_bev.randomize_(torch_model, 11)
  torch_ref_vit.layer_norms_random_(torch_model, 12)
  if hasattr(torch_model, 'restore_constants_'):   # the coach's geometry Parameters
    torch_model.restore_constants_()
  return torch_model


def convert_state_dict(state_dict, config, root, name):
  """torch.save(state_dict) -> pmapnet.convert_file into root -> (summary, ckpt dir)."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, f'{config.stage}.pt')
  torch.save(state_dict, path)
  start = time.time()
  summary = pmapnet.convert_file(path, config, str(root), config_name=name)
  print(f'convert_file ({name}): {time.time() - start:.2f} s')
  return summary, os.path.join(root, config.stage, 'checkpoints')


def restore(config, model, ckpt_dir, batch=1):
  """(variables as `evaluate` restores them, dummy batch, mesh)."""
  mesh = sharding.make_mesh()
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, batch).items()}
  _, variables = ckpt_lib.restore_params(ckpt_dir, stages.abstract_variables(model, dummy, mesh))
  return variables, dummy, mesh


def whole_model_run(config, make_torch_model, model, root, prepare_torch=None):
  """Reference outputs, conversion through convert_file and our restored model's outputs, in
  eval mode at batch 1.

  Args:
    config: the stage's (frozen) config; make_torch_model: () -> its torch reference (built
    here and deleted once converted, so a reference-size model does not stay in memory);
    model: our model of the stage; root: workdir for the conversion; prepare_torch:
    optional (torch model, numpy inputs) -> None called before the torch forward.
  Returns:
    (torch outputs NHWC, our outputs, convert summary, ckpt dir, variables, dummy, mesh).
  """
  torch_model = random_reference(make_torch_model).eval()
  inputs = make_inputs(config, torch_model.canvas)
  if prepare_torch is not None:
    prepare_torch(torch_model, inputs)
  start = time.time()
  theirs = torch_forward(torch_model, inputs)
  print(f'torch forward ({config.stage}): {time.time() - start:.2f} s')
  state_dict = torch_model.state_dict()
  del torch_model
  summary, ckpt_dir = convert_state_dict(state_dict, config, root, f'{config.stage}')
  del state_dict
  variables, dummy, mesh = restore(config, model, ckpt_dir)
  batch = dict(dummy, **{k: jnp.asarray(v) for k, v in inputs.items()})
  start = time.time()
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False)).lower(variables, batch).compile()
  compiled = time.time()
  ours = jax.tree.map(np.asarray, forward(variables, batch))
  print(f'jax ({config.stage}): compile {compiled - start:.2f} s, forward '
        f'{time.time() - compiled:.2f} s')
  return theirs, ours, summary, ckpt_dir, variables, dummy, mesh


def no_stochastic_config(config):
  """A (mutable) config with dropout and drop-connect 0, frozen (train-mode parity: both are
  random, and they are the only random parts of either forward)."""
  config.model.camera.drop_connect_rate = 0.0
  config.model.lss.drop_connect_rate = 0.0
  config.model.sd.dropout = 0.0
  config.model.hd.dropout = 0.0
  return ml_collections.FrozenConfigDict(config)


def no_drop_connect_(torch_model):
  """efficientnet_pytorch's drop-connect off in every EfficientNet of the torch model."""
  count = 0
  for m in torch_model.modules():
    if hasattr(m, '_global_params') and hasattr(m, '_blocks'):
      m._global_params = m._global_params._replace(drop_connect_rate=0.0)
      m._dropout.p = 0.0   # the classifier's, never reached by the endpoints: for the check
      count += 1
  assert count, 'no EfficientNet found'
  for m in torch_model.modules():   # and no dropout left anywhere (timm, SD attention)
    assert not (isinstance(m, torch.nn.Dropout) and m.p), m
    assert not (isinstance(m, torch.nn.MultiheadAttention) and m.dropout), m
  return torch_model


def biased_update_effect(torch_model, counts, old):
  """How far nn.BatchNorm's running variances would be from torch's after this forward.

  torch (and models/batch_norm.py) mixes the unbiased batch variance (x n / (n - 1)) into
  running_var; nn.BatchNorm mixed the biased one: with m = torch momentum, torch's new =
  (1 - m) old + m v_u and nn.BatchNorm's = new - (new - (1 - m) old) / n, n = the elements per
  channel the BatchNorm saw (counts[name]). Returns the largest relative difference: what the
  comparison of running variances would catch if the models went back to nn.BatchNorm.
  """
  largest = 0.0
  with torch.no_grad():
    for name, m in torch_model.named_modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and name in counts:
        new = m.running_var.clone()
        biased = new - (new - (1 - m.momentum) * old[name].to(new.dtype)) / counts[name]
        largest = max(largest, float(((new - biased).abs() / new.abs()).max()))
  return largest


def torch_forward_float64(torch_model, inputs):
  """torch_model in float64 (modified in place) on `inputs` -> {name: NHWC numpy float64}."""
  previous = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)   # tensors the forward creates (the coach's eye)
  try:
    return torch_forward(torch_model.double(), {
        k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in inputs.items()})
  finally:
    torch.set_default_dtype(previous)


def train_mode_run(config, make_torch_model, model, root, batch=2):
  """One forward in train mode (BatchNorm batch statistics) of the torch reference and of our
  model restored from its converted weights; dropout and drop-connect 0 in both.

  The torch reference runs twice from the same weights: in float32 (its own rounding error)
  and in float64 (the function): in train mode every BatchNorm renormalises by its batch
  statistics, and at this size float32 rounding alone moves torch's final heads by ~1e-3 of
  their range (measured: torch float32 vs float64), so the outputs are held to the float64
  reference, within a multiple of torch's own float32 error (compare_train_outputs).

  Returns:
    (torch float32 outputs NHWC, torch float64 outputs NHWC, our outputs, the float64 torch's
    running statistics after the forward as our batch_stats tree (converted), our updated
    batch_stats, largest relative difference nn.BatchNorm's biased update would make,
    biased_update_effect).
  """
  torch_model = no_drop_connect_(random_reference(make_torch_model)).train()
  inputs = make_inputs(config, torch_model.canvas, batch)
  _, ckpt_before = convert_state_dict(torch_model.state_dict(), config,
                                      os.path.join(root, 'before'), f'{config.stage} before')
  initial = copy.deepcopy(torch_model.state_dict())
  theirs32 = torch_forward(torch_model, inputs)
  torch_model.load_state_dict(initial)   # the float32 forward updated the running statistics
  del initial
  bns = {name: m for name, m in torch_model.named_modules()
         if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
  old = {name: m.running_var.clone().double() for name, m in bns.items()}
  counts = {}

  def hook(name):
    def count(m, args, out):
      assert name not in counts, f'{name} called twice in one forward'
      counts[name] = args[0].numel() // args[0].shape[1]
    return count
  handles = [m.register_forward_hook(hook(name)) for name, m in bns.items()]
  theirs64 = torch_forward_float64(torch_model, inputs)
  for h in handles:
    h.remove()
  # The reference builds some BatchNorms it never calls (EfficientNet's _bn1 after the unused
  # conv head, the coach's pp.bevencode): their statistics stay, in torch and here.
  assert counts and all(not n.startswith(('camencode.up1', 'bevencode.')) for n in
                        set(bns) - set(counts)), sorted(set(bns) - set(counts))
  unbiased_effect = biased_update_effect(torch_model, counts, old)
  _, ckpt_after = convert_state_dict(
      {k: v.float() if v.is_floating_point() else v for k, v in torch_model.state_dict().items()},
      config, os.path.join(root, 'after'), f'{config.stage} after')
  del torch_model
  variables, dummy, _ = restore(config, model, ckpt_before, batch)
  expected, _, _ = restore(config, model, ckpt_after, batch)
  jbatch = dict(dummy, **{k: jnp.asarray(v) for k, v in inputs.items()})
  start = time.time()
  ours, state = jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=['batch_stats']))(
      variables, jbatch)
  jax.block_until_ready(state)
  print(f'jax jit + forward, train mode ({config.stage}): {time.time() - start:.2f} s')
  return (theirs32, theirs64, jax.tree.map(np.asarray, ours), expected['batch_stats'],
          state['batch_stats'], unbiased_effect)


TRAIN_ERROR_FACTOR = 3.0


def compare_train_outputs(what, ours, theirs32, theirs64):
  """Every head, pre-refinement head and bev_small of a train-mode forward against the float64
  reference: max|ours - ref64| <= max(REL_TOL x max|ref64|, TRAIN_ERROR_FACTOR x
  max|torch float32 - ref64|): no further from the function than a few times torch's own
  float32 rounding (a wrong batch statistic or epsilon moves the outputs by O(1); the
  momentum is checked on the running statistics, compare_batch_stats)."""
  for name in ('bev_small',) + tuple(f'{h}{s}' for h in HEADS for s in ('_pre', '')):
    ref64 = theirs64[name]
    ours_err = float(np.max(np.abs(ours[name] - ref64)))
    torch_err = float(np.max(np.abs(theirs32[name] - ref64)))
    scale = float(np.max(np.abs(ref64)))
    print(f'{what} {name}: max|ours - torch64| {ours_err:.3g}, max|torch32 - torch64| '
          f'{torch_err:.3g}, max|ref| {scale:.3g}, relative {ours_err / scale:.3g} (torch '
          f'float32: {torch_err / scale:.3g})')
    assert scale > 0 and ours_err <= max(REL_TOL * scale, TRAIN_ERROR_FACTOR * torch_err), (
        name, ours_err, torch_err, scale)


def compare_batch_stats(what, ours, expected):
  """Every running mean / variance leaf within the bound; prints the worst leaf."""
  flat_ours = dict(jax.tree_util.tree_leaves_with_path(ours))
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert flat_ours.keys() == flat_expected.keys()
  worst = (0.0, None, 0.0, 0.0)
  for path, ref_leaf in flat_expected.items():
    got, ref_leaf = np.asarray(flat_ours[path]), np.asarray(ref_leaf)
    diff, scale = float(np.max(np.abs(got - ref_leaf))), float(np.max(np.abs(ref_leaf)))
    assert diff <= REL_TOL * scale, (jax.tree_util.keystr(path), diff, scale)
    worst = max(worst, (diff / scale, jax.tree_util.keystr(path), diff, scale))
  print(f'{what} batch_stats: {len(flat_expected)} leaves; worst {worst[1]}: max|diff| '
        f'{worst[2]:.3g}, max|ref| {worst[3]:.3g}, relative {worst[0]:.3g}')


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
      config, lambda: ref.Teacher(config), Teacher(config), tmp_path_factory.mktemp('converted'))
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


@pytest.fixture(scope='module')
def teacher_train_run(tmp_path_factory):
  config = no_stochastic_config(small_teacher_config())
  return train_mode_run(config, lambda: ref.Teacher(config), Teacher(config),
                        str(tmp_path_factory.mktemp('train')))


def assert_train_mode_parity(what, run):
  """train_mode_run's result: outputs and every updated running statistic against torch."""
  theirs32, theirs64, ours, expected_stats, our_stats, unbiased_effect = run
  compare_train_outputs(what, ours, theirs32, theirs64)
  compare_batch_stats(what, our_stats, expected_stats)
  print(f"{what}: nn.BatchNorm's biased running_var would differ from torch's by "
        f"up to {unbiased_effect:.3g} relative (models/batch_norm.py has torch's update)")


def test_teacher_train_mode_matches_reference(teacher_train_run):
  """Batch 2, train mode (batch statistics normalise, running statistics update), dropout and
  drop-connect 0 in both: the outputs and every updated running mean / variance."""
  assert_train_mode_parity('teacher train mode', teacher_train_run)
