"""EfficientNet-B0 / HDMapNet CamEncode parity with the PyTorch reference (efficientnet_pytorch).

The torch side (tests/torch_ref_efficientnet.py) has random weights and random BatchNorm
statistics/affine; it is converted with mapkd_jax.convert.efficientnet and both run on the same
image. Bound: max|jax - torch| <= 1e-4 * max|torch| per compared tensor (float32 on CPU; the
16 MBConv blocks, both endpoints and the CamEncode output each checked).
Measured here (128 x 352, batch 1, eval mode): reduction_4 2.4e-7 abs (1.6e-7 rel),
reduction_5 1.9e-7 (1.8e-7 rel), CamEncode output 3.6e-7 (2.9e-7 rel); worst block 4e-7 rel.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('efficientnet_pytorch')

import torch_ref_efficientnet as ref  # noqa: E402  (after the importorskip above)
from torch.nn import functional as F  # noqa: E402

from mapkd_jax.convert import efficientnet as convert_eff  # noqa: E402
from mapkd_jax.models import image_encoder, resample  # noqa: E402

REL_BOUND = 1e-4
REFERENCE_HW = (128, 352)   # HDMapNet / P-MapNet / MapKD final_dim


def _assert_close(name, got, want, bound=REL_BOUND):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  scale = float(np.abs(want).max())
  diff = float(np.abs(got - want).max())
  assert diff <= bound * scale, f'{name}: max|diff| {diff:.3g} > {bound} * max|ref| {scale:.3g}'
  return diff, diff / scale


def _torch_blocks(model, x, *, drop_connect):
  """Outputs of every trunk block (NHWC numpy), via forward hooks."""
  outs = []
  hooks = [b.register_forward_hook(lambda m, i, o: outs.append(ref.nchw_to_nhwc(o)))
           for b in model.trunk._blocks]
  try:
    y, ends = model(x, drop_connect=drop_connect)
  finally:
    for h in hooks:
      h.remove()
  return y, ends, outs


def _jax_apply(variables, images, *, out_channels, fusion_channels, train):
  """(output, endpoints, [16 block outputs], updated batch_stats or None)."""
  model = image_encoder.EfficientNetB0(out_channels, fusion_channels)
  capture = lambda mdl, method: isinstance(mdl, image_encoder.MBConv) and method == '__call__'
  mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
  # Jitted: one XLA compile of the whole net is ~4x faster on CPU than eager op-by-op.
  apply = jax.jit(functools.partial(model.apply, train=train, return_endpoints=True,
                                    capture_intermediates=capture, mutable=mutable))
  (out, ends), state = apply(variables, images)
  blocks = [state['intermediates'][f'MBConv_{i}']['__call__'][0]
            for i in range(convert_eff.NUM_BLOCKS)]
  return out, ends, blocks, state.get('batch_stats')


@pytest.fixture(scope='module')
def camencode():
  """HDMapNet camera CamEncode(64) (no depthnet), its converted variables and an image."""
  torch.set_num_threads(2)
  model = ref.make(up_channels=64, seed=0)
  variables, report = convert_eff.convert_state_dict(ref.state_dict_numpy(model, 'camencode.'),
                                                      prefix='camencode.')
  assert report['layout'] == 'camencode' and report['out_channels'] == 64
  image = np.random.RandomState(0).randn(1, 3, *REFERENCE_HW).astype(np.float32)
  return model, variables, image


def test_camencode_eval_parity_reference_size(camencode):
  """Eval mode at 128 x 352: every block, both endpoints, the CamEncode output."""
  model, variables, image = camencode
  model.eval()
  with torch.no_grad():
    y, ends, blocks = _torch_blocks(model, torch.from_numpy(image), drop_connect=True)
  out, jends, jblocks, _ = _jax_apply(variables, jnp.asarray(image.transpose(0, 2, 3, 1)),
                                      out_channels=64, fusion_channels=0, train=False)
  for i, (got, want) in enumerate(zip(jblocks, blocks)):
    _assert_close(f'block {i}', got, want)
  _assert_close('reduction_4', jends['reduction_4'], ref.nchw_to_nhwc(ends['reduction_4']))
  _assert_close('reduction_5', jends['reduction_5'], ref.nchw_to_nhwc(ends['reduction_5']))
  assert jends['reduction_4'].shape == (1, 8, 22, 112)
  assert jends['reduction_5'].shape == (1, 4, 11, 320)
  _assert_close('camencode', out, ref.nchw_to_nhwc(y))
  # The bound can fail: HDMapNet's Up with half-pixel (align_corners=False) upsampling instead
  # changes the fused features far beyond it.
  half_pixel = jax.image.resize(jends['reduction_5'], (1, 8, 22, 320), 'bilinear')
  aligned = resample.resize_bilinear_align_corners(jends['reduction_5'], (8, 22))
  assert float(jnp.abs(half_pixel - aligned).max()) > 100 * REL_BOUND * float(
      jnp.abs(aligned).max())


def test_lift_splat_camencode_train_mode(camencode):
  """The lift-splat CamEncode (Up to 512 + 1x1 depthnet 512 -> D + C = 41 + 64, MapKD
  `pp.camencode`) at 128 x 352 in TRAIN mode, on the camera fixture's trunk weights (its own
  Up / depthnet random): BatchNorm normalizes with batch statistics and updates the running
  means and variances like torch (efficientnet momentum 0.01, Up's torch-default 0.1; the
  unbiased batch variance, models/batch_norm.py). The torch blocks run with drop_connect_rate 0
  (drop-connect is stochastic; HDMapNet passes 0.2 * idx / 16)."""
  camera_model, _, image = camencode
  model = ref.make(up_channels=512, depthnet_channels=41 + 64, seed=1)
  model.trunk.load_state_dict(camera_model.trunk.state_dict())
  variables, report = convert_eff.convert_state_dict(
      ref.state_dict_numpy(model, 'pp.camencode.'), prefix='pp.camencode.')
  assert (report['layout'], report['out_channels'], report['fusion_channels']) == (
      'camencode_depthnet', 105, 512)
  model.train()
  with torch.no_grad():
    y, _, blocks = _torch_blocks(model, torch.from_numpy(image), drop_connect=False)
  out, _, jblocks, stats = _jax_apply(variables, jnp.asarray(image.transpose(0, 2, 3, 1)),
                                      out_channels=105, fusion_channels=512, train=True)
  for i in (0, 7, 15):
    _assert_close(f'train block {i}', jblocks[i], blocks[i])
  _assert_close('train lift-splat camencode', out, ref.nchw_to_nhwc(y))
  # Running means after one step: the stem, a block's depthwise BN and an Up BN.
  pairs = [(('ConvBNAct_0', 'BatchNorm_0'), model.trunk._bn0),
           (('MBConv_5', 'ConvBNAct_1', 'BatchNorm_0'), model.trunk._blocks[5]._bn1),
           (('FuseUp_0', 'ConvBNAct_1', 'BatchNorm_0'), model.up1.conv[4])]
  for path, bn in pairs:
    got = stats
    for key in path:
      got = got[key]
    _assert_close('/'.join(path) + ' mean', got['mean'], bn.running_mean.numpy())
    _assert_close('/'.join(path) + ' var', got['var'], bn.running_var.numpy())


def _resize_loop(x, out_h, out_w):
  """Plain-loop align_corners=True bilinear resize of [B, H, W, C]."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c), np.float64)
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = min(int(np.floor(sy)), h - 1)
    y1, fy = min(y0 + 1, h - 1), sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = min(int(np.floor(sx)), w - 1)
      x1, fx = min(x0 + 1, w - 1), sx - x0
      out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                      + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
  return out


@pytest.mark.parametrize('in_hw,out_hw', [((4, 11), (8, 22)), ((5, 3), (9, 7)),
                                          ((6, 8), (1, 5)), ((1, 4), (3, 4))])
def test_resize_bilinear_align_corners(in_hw, out_hw):
  """Against a numpy loop and torch F.interpolate(mode='bilinear', align_corners=True)."""
  x = np.random.RandomState(2).randn(2, *in_hw, 3).astype(np.float32)
  got = np.asarray(resample.resize_bilinear_align_corners(jnp.asarray(x), out_hw))
  np.testing.assert_allclose(got, _resize_loop(x, *out_hw), rtol=0, atol=1e-5)
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_hw, mode='bilinear',
                       align_corners=True)
  np.testing.assert_allclose(got, ref.nchw_to_nhwc(want), rtol=0, atol=1e-5)


def test_drop_connect_training_only():
  """Drop-connect: in training each sample's residual branch is dropped (output = input) or
  kept and scaled by 1 / keep; at eval it is off. A numpy reference per sample."""
  block = image_encoder.MBConv(8, expand_ratio=2, kernel=3, stride=1, drop_connect_rate=0.5)
  no_drop = image_encoder.MBConv(8, expand_ratio=2, kernel=3, stride=1)
  x = jnp.asarray(np.random.RandomState(3).randn(32, 4, 4, 8).astype(np.float32))

  @jax.jit   # one small compile per call instead of one per eager op
  def run(x):
    variables = block.init(jax.random.key(0), x, train=False)
    branch = no_drop.apply(variables, x, train=True, mutable=['batch_stats'])[0] - x
    y = block.apply(variables, x, train=True, mutable=['batch_stats'],
                    rngs={'dropout': jax.random.key(1)})[0]
    return y, branch, block.apply(variables, x, train=False), no_drop.apply(variables, x,
                                                                             train=False)

  y, branch, eval_out, eval_no_drop = (np.asarray(a) for a in run(x))
  dropped = np.all(np.isclose(y, np.asarray(x), atol=1e-6), axis=(1, 2, 3))
  kept = np.all(np.isclose(y, np.asarray(x) + branch / 0.5, atol=1e-5), axis=(1, 2, 3))
  assert np.all(dropped ^ kept)             # every sample is one or the other
  assert 4 <= dropped.sum() <= 28           # p = 0.5 over 32 samples
  np.testing.assert_allclose(eval_out, eval_no_drop, atol=1e-6)


def test_efficientnet_rejects_short_images():
  model = image_encoder.EfficientNetB0(8, 0)
  with pytest.raises(ValueError, match='height > 16'):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jnp.zeros((1, 16, 64, 3)))
