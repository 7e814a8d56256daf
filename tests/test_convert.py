"""Converter bookkeeping and errors (mapkd_jax.convert), the CLI round trip, and
config.init.image_encoder (stages.apply_init) loading the converted item into every
EfficientNet-B0 of a stage's model."""
import functools
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
efficientnet_pytorch = pytest.importorskip('efficientnet_pytorch')

from configs import tcs  # noqa: E402
from mapkd_jax import models  # noqa: E402
from mapkd_jax.convert import common  # noqa: E402
from mapkd_jax.convert import efficientnet as convert_eff  # noqa: E402
from mapkd_jax.train import stages  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def effnet_state():
  """A random efficientnet_pytorch efficientnet-b0 state dict (torch tensors)."""
  torch.manual_seed(0)
  return efficientnet_pytorch.EfficientNet.from_name('efficientnet-b0').state_dict()


@pytest.fixture(scope='module')
def effnet_file(effnet_state, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('torch') / 'effnet.pth')
  torch.save(effnet_state, path)
  return path


def _numpy(state):
  return {k: v.numpy() for k, v in state.items()}


def test_load_unreadable_and_missing_files_name_the_file(tmp_path):
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a torch file')
  with pytest.raises(ValueError, match='junk.pth: torch.load cannot read it'):
    common.load_torch_state_dict(str(junk))
  with pytest.raises(ValueError, match='absent.pth: no such file'):
    common.load_torch_state_dict(str(tmp_path / 'absent.pth'))
  not_a_state_dict = tmp_path / 'list.pth'
  torch.save([torch.zeros(2)], str(not_a_state_dict))
  with pytest.raises(ValueError, match='list.pth: not a PyTorch state dict'):
    common.load_torch_state_dict(str(not_a_state_dict))


def test_load_unwraps_checkpoint_dict_and_dataparallel_prefix(tmp_path):
  weights = {'module.a.weight': torch.ones(2, 3), 'module.a.bias': torch.zeros(2)}
  for key in ('state_dict', 'model'):
    path = str(tmp_path / f'{key}.pth')
    torch.save({key: weights, 'epoch': 3}, path)
    state = common.load_torch_state_dict(path)
    assert sorted(state) == ['a.bias', 'a.weight']
    np.testing.assert_array_equal(state['a.weight'], np.ones((2, 3), np.float32))


def test_layout_helpers_against_loops():
  """conv_kernel (incl. depthwise) and linear_kernel against explicit index loops."""
  w = np.random.RandomState(0).randn(6, 2, 3, 5).astype(np.float32)   # grouped: I/groups = 2
  k = common.conv_kernel(w)
  assert k.shape == (3, 5, 2, 6)
  for o, i, y, x in [(0, 0, 0, 0), (5, 1, 2, 4), (3, 0, 1, 2)]:
    assert k[y, x, i, o] == w[o, i, y, x]
  lin = np.arange(12.0).reshape(3, 4)
  assert common.linear_kernel(lin).shape == (4, 3) and common.linear_kernel(lin)[2, 1] == lin[1, 2]


def _small_target():
  return {'params': {'Conv_0': {'kernel': jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                                'bias': jax.ShapeDtypeStruct((4,), jnp.float32)}}}


def test_conversion_unused_source_fails_unless_ignored():
  source = {'c.weight': np.ones((4, 2, 3, 3), np.float32), 'c.bias': np.ones(4, np.float32),
            'extra.weight': np.ones(3, np.float32)}
  conv = common.Conversion(source, _small_target(), origin='x.pth')
  conv.conv('Conv_0', 'c', bias=True)
  with pytest.raises(ValueError, match=r'x.pth: 1 source tensors neither converted nor ignored: '
                                       r'extra.weight'):
    conv.finish()
  conv.ignore('extra.weight', 'not part of the model')
  variables = conv.finish()
  assert variables['params']['Conv_0']['kernel'].shape == (3, 3, 2, 4)
  assert conv.report()['ignored'] == {'extra.weight': 'not part of the model'}


def test_conversion_unfilled_target_fails():
  conv = common.Conversion({'c.weight': np.ones((4, 2, 3, 3), np.float32)}, _small_target())
  conv.conv('Conv_0', 'c')
  with pytest.raises(ValueError, match='1 target leaves not filled: params/Conv_0/bias'):
    conv.finish()


def test_wrong_shape_names_source_and_target(effnet_state):
  state = _numpy(effnet_state)
  state['_blocks.3._se_reduce.weight'] = np.zeros((7, 144, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    convert_eff.convert_state_dict(state, origin='bad.pth')
  msg = str(e.value)
  assert 'bad.pth' in msg and '_blocks.3._se_reduce.weight (7, 144, 1, 1)' in msg
  assert 'params/MBConv_3/Conv_0/kernel (1, 1, 144, 6)' in msg


def test_other_model_lists_missing_and_unexpected():
  import torchvision
  state = _numpy(torchvision.models.resnet18().state_dict())
  with pytest.raises(ValueError) as e:
    convert_eff.convert_state_dict(state, origin='resnet18.pth')
  msg = str(e.value)
  assert 'resnet18.pth: not a efficientnet-b0' in msg
  assert 'missing: _blocks.0._bn1.bias' in msg and 'names not expected: bn1.bias' in msg


def test_unused_tensor_in_efficientnet_file_fails(effnet_state):
  state = {**_numpy(effnet_state), '_blocks.3.extra': np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match='neither converted nor ignored: _blocks.3.extra'):
    convert_eff.convert_state_dict(state)


def test_whole_model_without_prefix_suggests_it(effnet_state):
  state = {f'camencode.trunk.{k}': v for k, v in _numpy(effnet_state).items()}
  with pytest.raises(ValueError, match=r"under prefixes \['camencode.'\]"):
    convert_eff.convert_state_dict(state)


@pytest.fixture(scope='module')
def converted_dir(effnet_file, tmp_path_factory):
  """The CLI, run as a user runs it, on a torch.save'd random efficientnet-b0."""
  out = str(tmp_path_factory.mktemp('converted') / 'effnet')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-m', 'mapkd_jax.convert', 'efficientnet',
                           '--input', effnet_file, '--out', out], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert '"layout": "trunk"' in result.stdout
  return out


@flax.struct.dataclass
class _State:   # what apply_init reads and replaces of trainer's TrainState
  params: dict
  batch_stats: dict


def _zero_state(config):
  """A state with zero variables of the stage's model (cheap: no real init)."""
  model = models.build(config.stage, config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  # device_put of numpy zeros: no per-shape compile as jnp.zeros would trigger.
  variables = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), shapes)
  return _State(params={'model': variables['params']}, batch_stats=variables['batch_stats'])


def _effnet_config(stage, init_dir):
  config = tcs.get_config(f'{stage},tiny')   # 64 x 176 images: EfficientNet-B0 needs H > 16
  config.model.camera.image_encoder = 'efficientnet_b0'
  config.model.lss.image_encoder = 'efficientnet_b0'
  config.model.hd.coach_refine = False       # no HD prior: only the encoder init runs
  config.init.image_encoder = init_dir
  return config


def test_cli_item_loads_into_every_encoder(converted_dir, effnet_state, caplog):
  """--config.init.image_encoder=DIR: the coach's camera AND lift-splat encoders get the
  trunk; their fusion / depthnet layers stay at init, and the log says which is which."""
  config = _effnet_config('coach', converted_dir)
  with caplog.at_level('INFO'):
    state = stages.apply_init(_zero_state(config), config, workdir='', mesh=None)
  for branch, left in (('camera', "['FuseUp_0']"), ('lss', "['Conv_0', 'FuseUp_0']")):
    assert (f'-> {branch}/ImageEncoder_0/EfficientNetB0_0: loaded [\'trunk (stem + 16 MBConv '
            f"blocks)']; left at init: {left}") in caplog.text
  stem = effnet_state['_conv_stem.weight'].numpy().transpose(2, 3, 1, 0)
  var = effnet_state['_blocks.15._bn2.running_var'].numpy()
  for branch in ('camera', 'lss'):
    enc = state.params['model'][branch]['ImageEncoder_0']['EfficientNetB0_0']
    np.testing.assert_array_equal(enc['ConvBNAct_0']['Conv_0']['kernel'], stem)
    stats = state.batch_stats[branch]['ImageEncoder_0']['EfficientNetB0_0']
    np.testing.assert_array_equal(stats['MBConv_15']['ConvBNAct_2']['BatchNorm_0']['var'], var)
    assert not np.any(enc['FuseUp_0']['ConvBNAct_0']['Conv_0']['kernel'])   # left at init


def test_init_errors_name_the_key(converted_dir, tmp_path):
  with pytest.raises(ValueError, match=r'config.init.image_encoder=.*no converted item'):
    config = _effnet_config('student', str(tmp_path / 'absent'))
    stages.apply_init(_zero_state(config), config, workdir='', mesh=None)
  tiny = tcs.get_config('student,tiny')      # resnet_small encoders
  tiny.init.image_encoder = converted_dir
  with pytest.raises(ValueError, match=r"config.init.image_encoder=.*no EfficientNet-B0 .*"
                                       r"config.model.camera.image_encoder"):
    stages.apply_init(_zero_state(tiny), tiny, workdir='', mesh=None)


def test_init_tree_or_shape_mismatch_names_the_leaf(tmp_path):
  """Items of another encoder head cannot go into the student's camera encoder (tiny: Up
  straight to 16 ch): the error names the key and the offending leaf."""
  config = _effnet_config('student', '')
  state = _zero_state(config)
  for name, (out, fusion), pattern in [
      ('camera64', (64, 0), r"FuseUp_0/\S+ has shape \((3, 3, \d+, )?64,?\), the model's "
                            r"params/camera/ImageEncoder_0/EfficientNetB0_0/FuseUp_0/\S+ "
                            r"\((3, 3, \d+, )?16,?\)"),
      ('lss', (105, 512), r'params/Conv_0/(bias|kernel) of the item has no counterpart')]:
    shapes = convert_eff.abstract_encoder_variables(out, fusion)
    item = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    convert_eff.save(item, {'layout': name}, str(tmp_path / name))
    config.init.image_encoder = str(tmp_path / name)
    with pytest.raises(ValueError, match=r'config.init.image_encoder=.*' + pattern):
      stages.apply_init(state, config, workdir='', mesh=None)
