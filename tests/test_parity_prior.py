"""Reference parity of the HD-prior ViT refinement (torch side: torch_ref_vit.MapViT on timm).

At the reference token grid: 200 x 400 canvas, patch 8 -> 25 x 50 = 1250 tokens, a 1251-row
position table of which the forward adds rows 0..1249 (P-MapNet's pos_embed[:, :-1]); the
widths are small (ViT 48 wide, 2 blocks, 4 heads; the BEV decoder at the tiny config's widths)
because this test is about the function, not the reference's 86 M parameters. Random torch
weights, position table and BatchNorm statistics, converted with mapkd_jax/convert/vit.py.
Bound max|diff| <= 1e-4 x max|reference|; eval mode and train mode (batch statistics).
"""
import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch_ref_bev  # noqa: E402
import torch_ref_vit as ref  # noqa: E402
from configs import tcs  # noqa: E402
from mapkd_jax.convert import common, vit  # noqa: E402
from mapkd_jax.models import prior  # noqa: E402

REL_TOL = 1e-4
CANVAS = (200, 400)


def _config():
  config = tcs.get_config('teacher,tiny')
  config.data.bev_x, config.data.bev_y = tcs.BEV_RANGES['60x30']
  config.model.hd.update(patch_size=8, width=48, depth=2, num_heads=4, mlp_ratio=4,
                         dropout=0.0)
  return ml_collections.FrozenConfigDict(config)


def torch_hd_prior(config, seed):
  hd = config.model.hd
  model = ref.MapViT(tuple(CANVAS), hd.patch_size, hd.width, hd.depth, hd.num_heads,
                     hd.mlp_ratio, bev_kwargs=torch_ref_bev.bev_encode_kwargs(config))
  torch_ref_bev.randomize_(model, seed)
  ref.layer_norms_random_(model, seed + 1)
  with torch.no_grad():   # an O(1) table, so a wrong slice of it cannot pass
    model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape,
                                            generator=torch.Generator().manual_seed(seed)))
  return model


@pytest.fixture(scope='module')
def converted():
  config = _config()
  torch_model = torch_hd_prior(config, 7)
  model = prior.HDPrior(config)
  x = np.random.default_rng(0).normal(size=(2, *CANVAS, 4)).astype(np.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  source = {f'mae_head.{k}': v.detach().numpy().copy()
            for k, v in torch_model.state_dict().items()}
  conv = common.Conversion(source, {c: {'hd_prior': t} for c, t in abstract.items()})
  vit.convert_hd_prior(conv, config.model.decoder.blocks_per_layer)
  variables = {c: t['hd_prior'] for c, t in conv.finish().items()}
  return config, torch_model, model, variables, x, source, conv.report()


@pytest.mark.parametrize('train', [False, True])
def test_hd_prior_matches_reference(converted, train):
  _, torch_model, model, variables, x = converted[:5]
  torch_model.train(train)
  with torch.no_grad():
    want = [t.permute(0, 2, 3, 1).numpy()
            for t in torch_model(torch.from_numpy(x).permute(0, 3, 1, 2))]
  got, _ = jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=['batch_stats']))(
      variables, x)
  for name, w in zip(('semantic', 'embedding', 'direction'), want):
    g = np.asarray(got[name])
    assert g.shape == w.shape, (name, g.shape, w.shape)
    err, scale = float(np.max(np.abs(g - w))), float(np.max(np.abs(w)))
    print(f'HD prior {name} {"train" if train else "eval"}: max|diff| {err:.3g}, '
          f'max|ref| {scale:.3g}, relative {err / scale:.3g}')
    assert scale > 0 and err <= REL_TOL * scale, (name, err, scale)


def test_hd_prior_conversion_lists_timm_unused(converted):
  """timm's cls_token / patch_embed / head are ignored by name; everything else is mapped."""
  report = converted[-1]
  assert set(report['ignored']) - {n for n in report['ignored']
                                   if n.endswith('num_batches_tracked')} == {
      'mae_head.cls_token', 'mae_head.patch_embed.proj.weight',
      'mae_head.patch_embed.proj.bias', 'mae_head.head.weight', 'mae_head.head.bias'}
  assert report['mapped']['mae_head.pos_embed'] == 'params/hd_prior/pos_embed'


def test_hd_pretrain_conversion_bare_and_from_teacher(converted):
  """hd_pretrain converts a bare MapVisionTransformer and a teacher's mae_head.* (its other
  tensors ignored by name) into the MAE model's hd_prior, equal to the HDPrior conversion."""
  from mapkd_jax import models
  from mapkd_jax.train import stages
  from mapkd_jax.convert import pmapnet
  config, _, _, variables, _, source = converted[:6]
  mae_config = ml_collections.ConfigDict(config.to_dict())
  mae_config.stage = 'hd_pretrain'
  mae_config = ml_collections.FrozenConfigDict(mae_config)
  mae = models.build('hd_mae', mae_config)
  dummy = {k: np.zeros(s, d) for k, (s, d) in stages.batch_spec(mae_config, 1).items()}
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(0)}
  abstract = jax.eval_shape(lambda: mae.init(rngs, dummy, train=False))
  # The converted snapshot (the train-mode parity test moves the torch BN statistics).
  bare = {k[len('mae_head.'):]: v for k, v in source.items()}
  teacher = {**{f'mae_head.{k}': v for k, v in bare.items()},
             'bevencode.conv1.weight': np.zeros((1,), np.float32)}
  for source, extra in ((bare, set()), (teacher, {'bevencode.conv1.weight'})):
    got, report = pmapnet.convert_state_dict(source, mae_config, abstract, origin='mae.pt')
    jax.tree.map(np.testing.assert_array_equal, got, {c: {'hd_prior': t}
                                                      for c, t in variables.items()})
    assert extra <= set(report['ignored'])
    assert report['ignored'].get('bevencode.conv1.weight', pmapnet.HD_FROM_TEACHER) == (
        pmapnet.HD_FROM_TEACHER)


def test_hd_prior_conversion_refuses_another_depth_or_width(converted):
  """A reference with more blocks than config.model.hd.depth, or another width, is refused
  naming the tensor."""
  config, _, _, _, x, source = converted[:6]

  def convert(**hd):
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.hd.update(**hd)
    model = prior.HDPrior(ml_collections.FrozenConfigDict(other))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    conv = common.Conversion(source, {c: {'hd_prior': t} for c, t in abstract.items()})
    vit.convert_hd_prior(conv, config.model.decoder.blocks_per_layer)

  with pytest.raises(ValueError, match=r'mae_head\.blocks\.1\.\* present but '
                                       r'config\.model\.hd\.depth is 1'):
    convert(depth=1)
  with pytest.raises(ValueError, match=r'shape mismatch: source mae_head\.map_patch_embed'):
    convert(width=32, num_heads=4)
