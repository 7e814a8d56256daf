"""Block remat (config.model.{camera,lss,neck,decoder,lidar,hd,sd}.remat, hd.remat_upsample): the same variables,
loss, gradients and BatchNorm statistics as without it, and a remat per block in the jaxpr."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tcs
from mapkd_jax import bench
from mapkd_jax import models as models_lib
from mapkd_jax.models import bev_decoder
from mapkd_jax.models import image_encoder
from mapkd_jax.models import lss as lss_lib
from mapkd_jax.models import prior as prior_lib
from mapkd_jax.train import step as step_lib

REMAT_SECTIONS = ('camera', 'lss', 'neck', 'decoder', 'lidar', 'hd', 'sd')


def _config(stage, remat):
  config = tcs.get_config(f'{stage},tiny')
  for section in REMAT_SECTIONS:
    config.model[section].remat = remat
  config.model.hd.remat_upsample = remat
  return config


def _batch(config, batch_size=2):
  batch = bench.random_batch(config, batch_size, seed=0)
  rng = np.random.default_rng(1)
  # Labels with foreground, so every task-loss term has a gradient.
  batch['semantic'] = rng.integers(0, 4, batch['semantic'].shape).astype(batch['semantic'].dtype)
  batch['instance'] = rng.integers(0, 4, batch['instance'].shape).astype(batch['instance'].dtype)
  return batch


def _remat_count(jaxpr):
  """remat (checkpoint) equations anywhere in a closed jaxpr, nested jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ('checkpoint', 'remat', 'remat2')
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _remat_count(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _remat_count(sub)
  return count


def _assert_trees_close(got, want, tol=1e-6):
  """Leaf by leaf, |got - want| <= tol * max|want| of the leaf (remat changes XLA's fusions,
  so float sums may be reassociated: measured differences ~2e-7 of a gradient leaf's scale)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = np.max(np.abs(w)) if w.size else 0.0
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale,
                               err_msg=jax.tree_util.keystr(path))


def _variables(stage, remat):
  """Abstract variables of a tiny model, and the model, its config and a batch."""
  config = _config(stage, remat)
  model = models_lib.build(stage, config)
  batch = _batch(config)
  rngs = {k: jax.random.key(0) for k in ('params', 'dropout', 'mask')}
  variables = jax.eval_shape(functools.partial(model.init, train=False), rngs, batch)
  return variables, (model, config, batch)


def _remats_in_gradient(variables, model, config, batch):
  """remat equations in the jaxpr of the stage's training gradient (traced, not compiled:
  compiling whole tiny teachers costs minutes on 2 loaded cores)."""
  params = {'model': variables['params'], 'aux': {}}
  loss_fn = functools.partial(step_lib.stage_loss, model=model, tgpd=None, config=config)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  jaxpr = jax.make_jaxpr(grad_fn)(params, variables['batch_stats'], {}, batch,
                                  jax.random.key(3))
  return _remat_count(jaxpr.jaxpr)


def _expected_remats(stage, config):
  """Rematted blocks of a tiny model: encoder blocks + view transform, pillar convs or the LSS
  encoder's blocks, neck layers (down only in the student), two decoders (stem, ResBlocks, Ups,
  heads; the HD prior has its own) and the ViT's one scanned block."""
  model, lidar = config.model, config.model.lidar
  decoder = (1 + len(model.decoder.layer_channels) * model.decoder.blocks_per_layer
             + 2 * len(bev_decoder.HEADS))
  count = len(model.camera.resnet_widths) - 1 + 1 + model.neck.num_layers
  if stage == 'student':
    return count + decoder
  # + the HD prior's decoder, its scanned ViT block and up-projection, the SD layers.
  count += model.neck.num_layers + 2 * decoder + 1 + 1 + model.sd.num_layers
  if stage == 'teacher':
    return count + sum(lidar.block_layers) + len(lidar.block_channels) + len(lidar.head_channels)
  return count + len(model.lss.resnet_widths) - 1


@pytest.mark.parametrize('stage', ['teacher', 'coach', 'student'])
def test_remat_flags_keep_variable_tree_and_reach_every_block(stage):
  tree_off, _ = _variables(stage, False)
  tree_on, setup = _variables(stage, True)
  # Same names, shapes and dtypes: checkpoints, converters and parity tests see no change.
  assert (flax.traverse_util.flatten_dict(jax.tree.map(lambda x: (x.shape, x.dtype), tree_on))
          == flax.traverse_util.flatten_dict(jax.tree.map(lambda x: (x.shape, x.dtype),
                                                          tree_off)))
  if stage == 'teacher':   # the others' blocks are the teacher's but LSS's (next test)
    assert _remats_in_gradient(tree_on, *setup) == _expected_remats(stage, setup[1])


def test_lss_remat_flag_reaches_its_encoder_blocks():
  config = _config('coach', True)
  batch = _batch(config, batch_size=1)
  lss = lss_lib.LiftSplat(config)
  variables = jax.eval_shape(functools.partial(lss.init, train=False), jax.random.key(0), batch)
  jaxpr = jax.make_jaxpr(lambda v, b: lss.apply(v, b, train=True, mutable=['batch_stats']))(
      variables, batch)
  assert _remat_count(jaxpr.jaxpr) == len(config.model.lss.resnet_widths) - 1


class _Blocks(nn.Module):
  """Rematted block kinds with state in one small model, so the test compiles once per
  setting: neck + decoder at the tiny size (BatchNorm statistics, static head sizes) and an
  MBConv with drop-connect (the 'dropout' rng) beside a FuseUp (static train after two arrays).
  The camera, pillar and LSS wiring is checked by tracing above; compiling those too would
  cost minutes on 2 loaded cores."""
  config: object

  @nn.compact
  def __call__(self, bev, images, *, train):
    remat = self.config.model.decoder.remat
    small, up = bev_decoder.BEVNeck(self.config, name='neck')(bev, train=train)
    block = image_encoder.remat_block(image_encoder.MBConv, remat)(
        8, 6, 3, 1, drop_connect_rate=0.5, name='MBConv_0')(images, train)
    fused = image_encoder.remat_block(image_encoder.FuseUp, remat, static_argnums=(3,))(
        8, name='FuseUp_0')(block[:, ::2, ::2], block, train)
    return {'small': small, 'fused': fused,
            'decoder': bev_decoder.BEVDecoder(self.config, name='decoder')(up, train=train)}


def test_remat_blocks_same_loss_statistics_and_gradients():
  configs = {remat: _config('teacher', remat) for remat in (False, True)}
  for config in configs.values():   # fewest ops that still hold every decoder block kind
    config.model.decoder.update(layer_channels=(8, 8), up_channels=8, head_channels=8)
  args = (jax.random.normal(jax.random.key(0), (2, 16, 32, 8)),
          jax.random.normal(jax.random.key(5), (4, 8, 8, 8)))
  # One init (the trees are equal: test above); both settings start from these variables.
  variables = jax.jit(functools.partial(_Blocks(configs[False]).init, train=False))(
      jax.random.key(1), *args)
  results = {}
  for remat, config in configs.items():
    model = _Blocks(config)

    def loss_fn(params, model=model):
      out, upd = model.apply({**variables, 'params': params}, *args, train=True,
                             mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
      return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(out)), upd

    results[remat] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  (loss_on, stats_on), grads_on = results[True]
  (loss_off, stats_off), grads_off = results[False]
  assert np.isfinite(loss_off) and loss_off > 0
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  _assert_trees_close(stats_on, stats_off)   # BatchNorm statistics
  # Drop-connect masks come from the 'dropout' rng: a different mask under remat would show
  # here as a different MBConv gradient, not only a different loss.
  _assert_trees_close(grads_on, grads_off)


def test_efficientnet_remat_keeps_reference_names():
  """MBConv_<i> / FuseUp_0 (convert/efficientnet.py's names), not CheckpointMBConv_<i>."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  trees = [jax.eval_shape(functools.partial(
      image_encoder.EfficientNetB0(8, 16, remat=remat).init, train=False),
      jax.random.key(0), images) for remat in (False, True)]
  assert jax.tree.map(lambda x: x.shape, trees[0]) == jax.tree.map(lambda x: x.shape, trees[1])
  assert {f'MBConv_{i}' for i in range(16)} | {'FuseUp_0', 'ConvBNAct_0', 'Conv_0'} == set(
      trees[1]['params'])


def _value_and_grad(module, variables, args, *, rngs):
  """(loss, updated batch_stats), gradients of sum(out^2) over every output, train mode."""
  def loss_fn(params):
    out, upd = module.apply({**variables, 'params': params}, *args, train=True,
                            mutable=['batch_stats'], rngs=rngs)
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(out)), upd
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


def test_sd_layer_remat_same_loss_and_gradients_with_dropout():
  """sd.remat: the same cross-attention layers' names, loss and gradients, dropout on (the
  'dropout' rng must give the same masks in the recomputed forward)."""
  def fusion(remat):
    return prior_lib.SDPriorFusion(encoder_channels=(8, 16), d_model=16, num_heads=2,
                                   num_layers=2, ffn_dim=24, dropout=0.1,
                                   pos_temperature=10000.0, remat=remat)
  args = (jax.random.normal(jax.random.key(0), (2, 4, 8, 5)),
          jax.random.normal(jax.random.key(1), (2, 16, 32, 1)))
  variables = fusion(False).init(jax.random.key(2), *args, train=False)
  trees = [jax.tree.map(lambda x: x.shape, fusion(r).init(jax.random.key(2), *args,
                                                          train=False)) for r in (False, True)]
  assert trees[0] == trees[1] and 'SDCrossAttentionLayer_1' in trees[1]['params']
  rngs = {'dropout': jax.random.key(3)}
  (loss_off, _), grads_off = _value_and_grad(fusion(False), variables, args, rngs=rngs)
  (loss_on, _), grads_on = _value_and_grad(fusion(True), variables, args, rngs=rngs)
  assert np.isfinite(loss_off) and loss_off > 0
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  # Against the largest gradient entry, not each leaf's own: the attention key biases have an
  # analytically zero gradient (softmax is shift-invariant), so their leaves are pure rounding.
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_off))
  for got, want in zip(jax.tree.leaves(grads_on), jax.tree.leaves(grads_off)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
  jaxpr = jax.make_jaxpr(lambda p: fusion(True).apply({**variables, 'params': p}, *args,
                                                      train=True, rngs=rngs,
                                                      mutable=['batch_stats']))(
      variables['params'])
  assert _remat_count(jaxpr.jaxpr) == 2


def test_hd_upsample_remat_same_names_loss_statistics_and_gradients():
  """hd.remat_upsample: up_0 / up_1 / proj keep their names; loss, BatchNorm statistics and
  gradients as without it."""
  configs = {}
  for remat in (False, True):
    config = tcs.get_config('teacher,tiny')
    config.model.hd.update(depth=1, width=16, num_heads=2, remat_upsample=remat)
    config.model.decoder.update(layer_channels=(8, 8), up_channels=8, head_channels=8)
    configs[remat] = config
  semantic = jax.random.normal(jax.random.key(0), (2,) + tuple(
      bench.random_batch(configs[False], 1, seed=0)['semantic'].shape[1:]) + (4,))
  variables = prior_lib.HDPrior(configs[False]).init(jax.random.key(1), semantic, train=False)
  shapes_on = jax.tree.map(lambda x: x.shape, jax.eval_shape(
      lambda: prior_lib.HDPrior(configs[True]).init(jax.random.key(1), semantic, train=False)))
  assert shapes_on == jax.tree.map(lambda x: x.shape, variables)
  assert {'up_0', 'up_1', 'proj'} <= set(variables['params'])
  results = {r: _value_and_grad(prior_lib.HDPrior(c), variables, (semantic,), rngs={})
             for r, c in configs.items()}
  (loss_on, stats_on), grads_on = results[True]
  (loss_off, stats_off), grads_off = results[False]
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  _assert_trees_close(stats_on, stats_off)
  _assert_trees_close(grads_on, grads_off)
