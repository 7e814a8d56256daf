"""Reference parity of the SD-prior fusion (torch side: torch_ref_sd.py), at reference size:
bev_small 192 x 25 x 50, SD raster 200 x 400 -> 64 x 25 x 50 tokens, d 64, 8 heads, 2 layers.

Random torch weights and BatchNorm statistics, converted with mapkd_jax/convert/sd_attention.py;
bound max|diff| <= 1e-4 x max|reference|. Eval mode with the reference's dropout 0.1 (inactive)
and train mode with dropout 0 (BatchNorm batch statistics; dropout masks cannot match).
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch_ref_bev  # noqa: E402
import torch_ref_sd as ref  # noqa: E402
from mapkd_jax.convert import common, sd_attention  # noqa: E402
from mapkd_jax.models import prior  # noqa: E402

REL_TOL = 1e-4


def _ours(dropout):
  return prior.SDPriorFusion(encoder_channels=(32, 64, 64), d_model=64, num_heads=8,
                             num_layers=2, ffn_dim=192, dropout=dropout, pos_temperature=10000.0)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  bev = rng.normal(size=(2, 25, 50, 192)).astype(np.float32)
  sd = np.sign(rng.normal(size=(2, 200, 400, 1))).astype(np.float32)
  return bev, sd


def _convert(torch_model, model, bev, sd):
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), bev, sd, train=False))
  source = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  conv = common.Conversion(source, {c: {'sd_prior': t} for c, t in abstract.items()})
  sd_attention.convert_sd_attention(conv, 'sd_prior/')
  return {c: t['sd_prior'] for c, t in conv.finish().items()}


@pytest.mark.parametrize('train', [False, True])
def test_sd_fusion_matches_reference(inputs, train):
  bev, sd = inputs
  dropout = 0.0 if train else 0.1
  torch_model = torch_ref_bev.randomize_(ref.SDFusion(dropout=dropout), 3)
  # randomize_ draws LayerNorm weights like biases (N(0, 0.1)); give them BN-like scales so
  # the output does not shrink towards the last LayerNorm's bias.
  gen = torch.Generator().manual_seed(4)
  with torch.no_grad():
    for module in torch_model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
  model = _ours(dropout)
  variables = _convert(torch_model, model, bev, sd)
  torch_model.train(train)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(bev).permute(0, 3, 1, 2),
                       torch.from_numpy(sd).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got, _ = model.apply(variables, bev, sd, train=train, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(0)})
  err = float(np.max(np.abs(np.asarray(got) - want)))
  scale = float(np.max(np.abs(want)))
  print(f'SD fusion {"train" if train else "eval"}: max|diff| {err:.3g}, max|ref| {scale:.3g}, '
        f'relative {err / scale:.3g}')
  assert scale > 0 and err <= REL_TOL * scale


def test_attention_layout_matches_torch_mha():
  """One torch MultiheadAttention vs the converted Flax attention on random tokens."""
  mha = torch.nn.MultiheadAttention(16, 4)
  torch_ref_bev.randomize_(mha, 1)
  import flax.linen as nn
  ours = nn.MultiHeadDotProductAttention(num_heads=4)
  rng = np.random.default_rng(1)
  q, kv = (rng.normal(size=(2, n, 16)).astype(np.float32) for n in (5, 7))
  abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), q, kv, kv))
  source = {f'a.{k}': v.detach().numpy().copy() for k, v in mha.state_dict().items()}
  conv = common.Conversion(source, {c: {'m': t} for c, t in abstract.items()})
  sd_attention.convert_attention(conv, 'm', 'a')
  variables = {c: t['m'] for c, t in conv.finish().items()}
  got = ours.apply(variables, q, kv, kv)
  with torch.no_grad():
    want = mha(*(torch.from_numpy(x).transpose(0, 1) for x in (q, kv, kv)))[0].transpose(0, 1)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)
