"""The whole coach against the PyTorch reference, through the `convert pmapnet` path.

torch: tests/torch_ref_coach.Coach (MapKD PMapNet_mae_head_C: the teacher with a LiftSplat
`pp` and `expand_to_128`), at test_parity_teacher's small reference-structured config with
the reference's lift-splat encoder (EfficientNet-B0, up1 to 512, depthnet to 41 + C) and depth
bins 4..45 m; random weights and BatchNorm statistics, batch 1, eval mode. The torch side gets
the input images' intrinsics with identity post_rots (the same rays as the reference's original
intrinsics + post_rots, test_parity_camera). Bound: max|diff| <= 1e-4 x max|reference|.
"""
import ml_collections
import pytest

torch = pytest.importorskip('torch')

import torch_ref_coach as ref  # noqa: E402
from mapkd_jax.models.coach import Coach  # noqa: E402
from test_parity_teacher import compare_outputs, small_teacher_config  # noqa: E402
from test_parity_teacher import assert_train_mode_parity  # noqa: E402
from test_parity_teacher import no_stochastic_config  # noqa: E402
from test_parity_teacher import train_mode_run, whole_model_run  # noqa: E402

pytestmark = pytest.mark.slow   # a whole model: torch forward, conversion, compile


def small_coach_config():
  config = small_teacher_config('coach')
  config.model.lss.update(image_encoder='efficientnet_b0', fusion_channels=512,
                          depth_bins=(4.0, 45.0, 1.0), context_channels=16,
                          z_range=(-10.0, 10.0), out_channels=config.model.lidar.out_channels)
  return config


@pytest.fixture(scope='module')
def coach_run(tmp_path_factory):
  config = ml_collections.FrozenConfigDict(small_coach_config())
  return whole_model_run(config, lambda: ref.Coach(config), Coach(config),
                         tmp_path_factory.mktemp('converted'))


def test_coach_matches_reference(coach_run):
  theirs, ours = coach_run[:2]
  compare_outputs('coach', ours, theirs)


def test_coach_conversion_lists_unused_lss_tensors(coach_run):
  ignored = coach_run[2]['ignored']
  for name in ('pp.dx', 'pp.bx', 'pp.nx', 'pp.frustum', 'pp.reduce_to_3.weight',
               'pp.bevencode.conv1.weight', 'mae_head.cls_token'):
    assert name in ignored, name
  assert not any(n.startswith(('pp.camencode.up1', 'pp.camencode.depthnet', 'expand_to_128',
                               'bevencode.', 'conv_bev.', 'sdmap_crossattn.'))
                 and not n.endswith('num_batches_tracked') for n in ignored)


@pytest.fixture(scope='module')
def coach_train_run(tmp_path_factory):
  config = no_stochastic_config(small_coach_config())
  return train_mode_run(config, lambda: ref.Coach(config), Coach(config),
                        str(tmp_path_factory.mktemp('train')))


def test_coach_train_mode_matches_reference(coach_train_run):
  """Batch 2, train mode (batch statistics normalise, running statistics update), dropout and
  drop-connect 0 in both: the outputs and every updated running mean / variance."""
  assert_train_mode_parity('coach train mode', coach_train_run)
