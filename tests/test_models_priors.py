"""PointPillars, SD-prior cross-attention, HD-prior ViT/MAE, and the teacher/coach compositions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from configs import tcs
from mapkd_jax import models
from mapkd_jax.data import schema
from mapkd_jax.models import lidar, prior

BEV_X = (-3.0, 3.0, 0.5)   # 12 columns
BEV_Y = (-2.0, 2.0, 0.5)   # 8 rows
Z_RANGE = (-1.0, 1.0)


def _cell(x, low, step):
  """torch `.int()` of (x - low) / step in float32: truncation toward zero."""
  return int(np.float32(np.float32(x) - np.float32(low)) / np.float32(step))


def _pillar_loop(points, mask, values, padding):
  """Loop over points: the pillar each point is given and per-pillar means of `values`.

  'reference': invalid points (masked, or a cell outside the grid) go to pillar (0, 0) and
  count there; 'masked': they are dropped. Returns (pillar [B, P, 2] (row, col) or -1,
  valid [B, P], mean [B, H, W, C], valid-point count [B, H, W]).
  """
  height, width = schema.bev_shape(BEV_X, BEV_Y)
  batch, num_points, channels = values.shape
  total = np.zeros((batch, height, width, channels))
  counted = np.zeros((batch, height, width))
  count = np.zeros((batch, height, width))
  pillar = np.full((batch, num_points, 2), -1)
  valid = np.zeros((batch, num_points), bool)
  for b in range(batch):
    for n in range(num_points):
      x, y, z = points[b, n, :3]
      col, row = _cell(x, BEV_X[0], BEV_X[2]), _cell(y, BEV_Y[0], BEV_Y[2])
      zc = _cell(z, Z_RANGE[0], Z_RANGE[1] - Z_RANGE[0])
      valid[b, n] = mask[b, n] and 0 <= col < width and 0 <= row < height and zc == 0
      if valid[b, n]:
        pillar[b, n] = row, col
        count[b, row, col] += 1
      elif padding == 'reference':
        pillar[b, n] = 0, 0
      else:
        continue
      r, c = pillar[b, n]
      total[b, r, c] += values[b, n]
      counted[b, r, c] += 1
  return pillar, valid, total / np.maximum(counted, 1)[..., None], count


def _random_points(seed, batch, num_points, masked_fraction):
  rng = np.random.default_rng(seed)
  # Range a bit beyond the canvas and z range so some points fall outside, some within one
  # cell below the minima (truncated into cell 0).
  xyz = rng.uniform([-3.9, -2.9, -3.5], [3.5, 2.5, 1.3], (batch, num_points, 3))
  points = np.concatenate([xyz, rng.uniform(0, 1, (batch, num_points, 2))], -1)
  mask = rng.uniform(size=(batch, num_points)) >= masked_fraction
  points = np.where(mask[..., None], points, 0.5).astype(np.float32)
  return points, mask


@pytest.mark.parametrize('padding', ['reference', 'masked'])
@pytest.mark.parametrize('batch,num_points,masked_fraction', [
    (1, 1, 0.0), (2, 50, 0.3), (3, 200, 0.0), (2, 40, 1.0)])
def test_scatter_mean_matches_loop(batch, num_points, masked_fraction, padding):
  points, mask = _random_points(batch * 7 + num_points, batch, num_points, masked_fraction)
  values = np.random.default_rng(1).normal(size=(batch, num_points, 4)).astype(np.float32)
  index, valid, _ = lidar.pillar_indices(jnp.asarray(points[..., :3]), jnp.asarray(mask),
                                         bev_x=BEV_X, bev_y=BEV_Y, z_range=Z_RANGE,
                                         padding=padding)
  height, width = schema.bev_shape(BEV_X, BEV_Y)
  counted = jnp.ones_like(valid) if padding == 'reference' else valid
  got = lidar.scatter_mean(jnp.asarray(values) * valid[..., None], index, counted,
                           height * width)
  values = values * np.asarray(valid)[..., None]
  pillar, want_valid, want, _ = _pillar_loop(points, mask, values, padding)
  np.testing.assert_array_equal(np.asarray(valid), want_valid)
  got = np.asarray(got).reshape(want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  occupied = np.zeros(want.shape[:3], bool)
  for b, n in zip(*np.nonzero(pillar[..., 0] >= 0)):
    occupied[b, pillar[b, n, 0], pillar[b, n, 1]] = True
  assert np.all(got[~occupied] == 0)  # empty pillars zero


@pytest.mark.parametrize('padding', ['reference', 'masked'])
def test_point_features_match_loop(padding):
  points, mask = _random_points(3, 2, 120, 0.2)
  feats, _, valid = lidar.point_features(jnp.asarray(points), jnp.asarray(mask),
                                         bev_x=BEV_X, bev_y=BEV_Y, z_range=Z_RANGE,
                                         padding=padding)
  feats, valid = np.asarray(feats), np.asarray(valid)
  # Centroids: 'reference' averages every point given the pillar, 'masked' valid points only.
  pillar, _, mean_xyz, count = _pillar_loop(points, mask, points[..., :3], padding)
  for b in range(points.shape[0]):
    for n in range(points.shape[1]):
      if padding == 'masked' and not valid[b, n]:
        np.testing.assert_array_equal(feats[b, n], 0.0)
        continue
      row, col = pillar[b, n]
      x, y, z = points[b, n, :3]
      # Cell centre from the point's own (possibly out-of-grid) truncated cell.
      centre = np.array([BEV_X[0] + (_cell(x, BEV_X[0], BEV_X[2]) + .5) * BEV_X[2],
                         BEV_Y[0] + (_cell(y, BEV_Y[0], BEV_Y[2]) + .5) * BEV_Y[2],
                         Z_RANGE[0] + (_cell(z, Z_RANGE[0], Z_RANGE[1] - Z_RANGE[0]) + .5)
                         * (Z_RANGE[1] - Z_RANGE[0])])
      want = np.concatenate([points[b, n], [count[b, row, col]],
                             points[b, n, :3] - mean_xyz[b, row, col], mean_xyz[b, row, col],
                             points[b, n, :3] - centre])
      np.testing.assert_allclose(feats[b, n], want, rtol=1e-5, atol=1e-5)


def test_pointpillars_padding_modes():
  """'masked' ignores whatever padded points hold (train-mode statistics included);
  'reference' ignores them in eval mode while pillar 0 holds no valid point, and its
  train-mode BatchNorm statistics see them."""
  points, mask = _random_points(5, 2, 300, 0.3)
  points[..., :2] = np.where(mask[..., None], np.maximum(points[..., :2], -1.0), 0.5)
  garbage = np.where(mask[..., None], points, 123.0).astype(np.float32)
  outs = {}
  for padding in ('reference', 'masked'):
    model = lidar.PointPillars(bev_x=BEV_X, bev_y=BEV_Y, z_range=Z_RANGE, pointnet_channels=4,
                               block_channels=(4, 4, 4), block_layers=(1, 1, 1),
                               block_strides=(1, 2, 2), head_channels=(4,), out_channels=3,
                               padding=padding)
    variables = model.init(jax.random.key(0), points, mask, train=False)
    for train in ((True,) if padding == 'masked' else (False, True)):
      for name, p in (('clean', points), ('garbage', garbage)):
        out = model.apply(variables, p, mask, train=train, mutable=['batch_stats'])[0]
        outs[padding, train, name] = np.asarray(out)
  np.testing.assert_allclose(outs['masked', True, 'garbage'], outs['masked', True, 'clean'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs['reference', False, 'garbage'],
                             outs['reference', False, 'clean'], rtol=1e-5, atol=1e-5)
  assert np.abs(outs['reference', True, 'garbage'] - outs['reference', True, 'clean']).max() > 1e-3
  with pytest.raises(ValueError, match='config.model.lidar.padding'):
    lidar.pillar_indices(jnp.zeros((1, 1, 3)), jnp.ones((1, 1), bool), bev_x=BEV_X, bev_y=BEV_Y,
                         z_range=Z_RANGE, padding='drop')


def _sine_ref(height, width, num_feats, temperature):
  out = np.zeros((height, width, 2 * num_feats))
  for i in range(height):
    for j in range(width):
      for axis, coord in enumerate([(i + 1) / height * 2 * math.pi,
                                    (j + 1) / width * 2 * math.pi]):
        for k in range(num_feats):
          angle = coord / temperature ** (2 * (k // 2) / num_feats)
          out[i, j, axis * num_feats + k] = math.sin(angle) if k % 2 == 0 else math.cos(angle)
  return out


@pytest.mark.parametrize('height,width,num_feats,temperature', [
    (1, 1, 2, 10000.0), (3, 5, 8, 10000.0), (4, 2, 6, 20.0)])
def test_sine_position_encoding_matches_loop(height, width, num_feats, temperature):
  got = prior.sine_position_encoding(height, width, num_feats=num_feats, temperature=temperature)
  np.testing.assert_allclose(got, _sine_ref(height, width, num_feats, temperature), atol=1e-5)


def test_sine_position_encoding_rejects_odd_feats():
  with pytest.raises(ValueError, match='num_feats'):
    prior.sine_position_encoding(2, 2, num_feats=3, temperature=10.0)


@pytest.mark.parametrize('grid_h,grid_w,ratio', [(5, 10, 0.5), (3, 3, 0.0), (4, 6, 1.0),
                                                 (5, 7, 0.3)])
def test_random_patch_mask_ratio(grid_h, grid_w, ratio):
  mask = np.asarray(prior.random_patch_mask(jax.random.PRNGKey(1), 4, grid_h, grid_w,
                                            mask_ratio=ratio))
  assert mask.shape == (4, grid_h, grid_w)
  np.testing.assert_array_equal(mask.reshape(4, -1).sum(1), round(ratio * grid_h * grid_w))
  if 0 < ratio < 1:  # samples draw different patches
    assert not all(np.array_equal(mask[0], m) for m in mask[1:])


def test_random_patch_mask_rejects_bad_ratio():
  with pytest.raises(ValueError, match='mask_ratio'):
    prior.random_patch_mask(jax.random.PRNGKey(0), 1, 2, 2, mask_ratio=1.5)


def _sd_fusion():
  return prior.SDPriorFusion(encoder_channels=(4, 8, 8), d_model=8, num_heads=2, num_layers=2,
                             ffn_dim=16, dropout=0.1, pos_temperature=10000.0)


def test_sd_fusion_shape_and_depends_on_sd():
  model = _sd_fusion()
  rng = np.random.default_rng(0)
  bev_small = rng.normal(size=(2, 3, 6, 12)).astype(np.float32)
  sd_a = np.sign(rng.normal(size=(2, 24, 48, 1))).astype(np.float32)
  sd_b = -sd_a
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.PRNGKey(0), bev_small, sd_a, train=False)
  apply = jax.jit(model.apply, static_argnames='train')
  out_a = apply(variables, bev_small, sd_a, train=False)
  out_b = apply(variables, bev_small, sd_b, train=False)
  assert out_a.shape == (2, 3, 6, 8)
  assert np.abs(np.asarray(out_a - out_b)).max() > 1e-4
  # Per-sample: changing sample 1's SD map leaves sample 0 alone.
  sd_c = sd_a.copy()
  sd_c[1] = -sd_c[1]
  out_c = apply(variables, bev_small, sd_c, train=False)
  np.testing.assert_allclose(out_c[0], out_a[0], atol=1e-5)


def test_sd_fusion_rejects_mismatched_width():
  model = prior.SDPriorFusion(encoder_channels=(4, 8, 6), d_model=8, num_heads=2, num_layers=1,
                              ffn_dim=16, dropout=0.0, pos_temperature=10000.0)
  with pytest.raises(ValueError, match='config.model.sd'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 6, 4)), jnp.zeros((1, 24, 48, 1)),
               train=False)


def test_hd_prior_rejects_bad_patch():
  config = tcs.get_config('teacher,tiny')
  config.model.hd.update(patch_size=4, width=16, depth=1, num_heads=2, mlp_ratio=2)
  model = prior.HDPrior(ml_collections.FrozenConfigDict(config))
  shapes = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
                          jnp.ones((2, 16, 24, 4)))
  assert {k: v.shape for k, v in shapes.items()} == {
      'semantic': (2, 16, 24, 4), 'embedding': (2, 16, 24, 16), 'direction': (2, 16, 24, 37)}
  with pytest.raises(ValueError, match='patch_size'):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jnp.ones((1, 18, 24, 4)))


@pytest.fixture(scope='module')
def tiny_config():
  return ml_collections.FrozenConfigDict(tcs.get_config('teacher,tiny'))


def _yaw_rig(batch, cams, image_hw):
  """Cameras at 1.5 m looking out horizontally, spread evenly in yaw (camera -> ego)."""
  intrinsics = np.zeros((batch, cams, 3, 3), np.float32)
  rotation = np.zeros((batch, cams, 3, 3), np.float32)
  translation = np.zeros((batch, cams, 3), np.float32)
  # Camera axes (x right, y down, z forward) expressed in the ego frame for yaw 0.
  base = np.array([[0., 0., 1.], [-1., 0., 0.], [0., -1., 0.]])
  for n in range(cams):
    yaw = 2 * math.pi * n / cams
    yaw_rot = np.array([[math.cos(yaw), -math.sin(yaw), 0.], [math.sin(yaw), math.cos(yaw), 0.],
                        [0., 0., 1.]])
    focal = 0.7 * image_hw[1]
    intrinsics[:, n] = [[focal, 0, image_hw[1] / 2], [0, focal, image_hw[0] / 2], [0, 0, 1]]
    rotation[:, n] = yaw_rot @ base
    translation[:, n] = [0.0, 0.0, 1.5]
  return intrinsics, rotation, translation


def _batch(config, batch_size, seed=0):
  spec = schema.batch_spec(config.data, batch_size)
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  batch['intrinsics'], batch['cam_rotation'], batch['cam_translation'] = _yaw_rig(
      batch_size, len(config.data.cameras), config.data.image_size)
  batch['images'] = rng.normal(size=spec['images'][0]).astype(np.float32)
  num_points = config.data.max_points
  xyz = rng.uniform([-35, -18, -2], [35, 18, 2], (batch_size, num_points, 3))
  batch['lidar_points'] = np.concatenate(
      [xyz, rng.uniform(0, 1, (batch_size, num_points, 2))], -1).astype(np.float32)
  batch['lidar_mask'] = rng.uniform(size=(batch_size, num_points)) < 0.8
  batch['lidar_points'] *= batch['lidar_mask'][..., None]
  batch['sd_prior'] = np.sign(rng.normal(size=spec['sd_prior'][0])).astype(np.float32)
  batch['semantic'] = rng.integers(0, 4, spec['semantic'][0]).astype(np.int32)
  return batch


def _init_and_grad(module, batch, trained=None):
  """Jitted init, then one jitted train-mode forward + grad of a scalar of every output.

  trained: top-level param names to differentiate (default all); the rest are held fixed,
  which keeps backward passes of blocks tested elsewhere out of the compile.
  """
  # 'rbg' keys: threefry-based init compiles several times slower on CPU.
  key = jax.random.key(0, impl='rbg')
  rngs = {'params': key, 'mask': jax.random.key(1, impl='rbg')}
  variables = jax.jit(lambda x: module.init(rngs, x, train=False))(batch)
  trained = set(variables['params']) if trained is None else set(trained)
  fixed = {k: v for k, v in variables['params'].items() if k not in trained}

  @jax.jit
  def loss_and_grad(params, x):
    def loss_fn(p):
      out, _ = module.apply({'params': {**fixed, **p}, 'batch_stats': variables['batch_stats']},
                            x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(2, impl='rbg'),
                                  'mask': jax.random.key(3, impl='rbg')})
      total = sum(jnp.mean(jnp.square(leaf)) for leaf in jax.tree.leaves(out))
      return total, out
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  params = {k: v for k, v in variables['params'].items() if k in trained}
  (_, out), grads = loss_and_grad(params, batch)
  return variables, out, grads, lambda x: loss_and_grad(params, x)


def _assert_grads_finite_nonzero(grads):
  """Every gradient finite; every top-level submodule gets a non-zero gradient."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
  for name, subtree in grads.items():
    assert sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(subtree)) > 0, name


def _expected_shapes(config, batch_size, refine):
  canvas = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  heads = {'semantic': 4, 'embedding': config.model.decoder.embedding_dim, 'direction': 37}
  shapes = {k: (batch_size, *canvas, c) for k, c in heads.items()}
  if refine:
    shapes.update({f'{k}_pre': (batch_size, *canvas, c) for k, c in heads.items()})
  layers = config.model.neck.num_layers
  shapes['bev_small'] = (batch_size, -(-canvas[0] // 2**layers), -(-canvas[1] // 2**layers),
                         config.model.neck.channels)
  return shapes


def _abstract_params(module, batch):
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(1)}
  return jax.eval_shape(lambda x: module.init(rngs, x, train=False), batch)['params']


def test_teacher_forward_grads_and_hd_transfer(tiny_config):
  batch = _batch(tiny_config, 2)
  model = models.build('teacher', tiny_config)
  # Gradients of this file's blocks only; camera, neck and decoder grads: test_models_camera.
  variables, out, grads, loss_and_grad = _init_and_grad(model, batch,
                                                        trained=('lidar', 'sd_prior', 'hd_prior'))
  assert set(variables['params']) == {'camera', 'lidar', 'neck', 'sd_prior', 'decoder',
                                      'hd_prior'}
  assert {k: v.shape for k, v in out.items()} == _expected_shapes(tiny_config, 2, refine=True)
  (_, out_flipped), _ = loss_and_grad(dict(batch, sd_prior=-batch['sd_prior']))
  assert np.abs(np.asarray(out_flipped['semantic'] - out['semantic'])).max() > 1e-6
  # What padded LiDAR points may change: test_pointpillars_padding_modes.
  _assert_grads_finite_nonzero(grads)
  # params['hd_prior'] of the hd_pretrain model drops into the teacher unchanged.
  mae_params = _abstract_params(models.build('hd_mae', tiny_config), batch)
  same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                      mae_params['hd_prior'], variables['params']['hd_prior'])
  assert jax.tree.structure(same) == jax.tree.structure(variables['params']['hd_prior'])
  assert all(jax.tree.leaves(same))
  assert set(mae_params) == {'hd_prior'}


def test_coach_ignores_lidar_and_has_two_variants(tiny_config):
  """Forward only: the coach's gradients add nothing the teacher and LiftSplat tests miss."""
  batch = _batch(tiny_config, 1)
  model = models.build('coach', tiny_config)
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False))(batch)
  assert set(variables['params']) == {'camera', 'lss', 'neck', 'sd_prior', 'decoder', 'hd_prior'}
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  out = apply(batch)
  assert {k: v.shape for k, v in out.items()} == _expected_shapes(tiny_config, 1, refine=True)
  assert all(np.all(np.isfinite(v)) for v in out.values())
  other = dict(batch, lidar_points=batch['lidar_points'] * 3.0 + 1.0,
               lidar_mask=~batch['lidar_mask'])
  out_other = apply(other)
  for key in out:
    np.testing.assert_array_equal(out_other[key], out[key])
  # Without the HD refinement: no hd_prior params, no *_pre outputs.
  config = ml_collections.ConfigDict(tiny_config)
  config.model.hd.coach_refine = False
  plain = models.build('coach', config)
  params = _abstract_params(plain, batch)
  assert 'hd_prior' not in params
  shapes = jax.eval_shape(
      lambda v, x: plain.apply(v, x, train=False),
      {'params': params, 'batch_stats': jax.eval_shape(
          lambda x: plain.init(jax.random.key(0), x, train=False), batch)['batch_stats']},
      batch)
  assert {k: v.shape for k, v in shapes.items()} == _expected_shapes(tiny_config, 1,
                                                                      refine=False)


def test_hd_mae_mask_target_and_grads(tiny_config):
  batch = _batch(tiny_config, 2)
  model = models.build('hd_mae', tiny_config)
  _, out, grads, _ = _init_and_grad(model, batch)
  _assert_grads_finite_nonzero(grads)
  canvas = schema.bev_shape(tiny_config.data.bev_x, tiny_config.data.bev_y)
  p = tiny_config.model.hd.patch_size
  mask = np.asarray(out['mask'])
  assert out['reconstruction'].shape == (2, *canvas, 4) and mask.shape == (2, *canvas)
  np.testing.assert_array_equal(np.asarray(out['target']).argmax(-1), batch['semantic'])
  grid_h, grid_w = canvas[0] // p, canvas[1] // p
  patches = mask.reshape(2, grid_h, p, grid_w, p).transpose(0, 1, 3, 2, 4).reshape(
      2, grid_h * grid_w, p * p)
  assert np.all(patches.min(-1) == patches.max(-1))              # patch-aligned
  np.testing.assert_array_equal(patches[..., 0].sum(1),
                                round(tiny_config.model.hd.mask_ratio * grid_h * grid_w))


def test_vit_blocks_remat_same_function_and_gradients():
  """config.model.hd.remat recomputes the scanned ViT blocks in the backward pass: same
  outputs and gradients (float32 reordering only), same parameter tree, stacked over depth."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  results = []
  for remat in (False, True):
    blocks = prior.vit_blocks(2, num_heads=2, mlp_ratio=2, dropout=0.0, train=True,
                              remat=remat, dtype=jnp.float32, name=None)
    params = blocks.init(jax.random.key(0), x, None)['params']
    loss = lambda p, blocks=blocks: jnp.mean(blocks.apply({'params': p}, x, None)[0] ** 2)
    results.append((params, jax.grad(loss)(params)))
    # The rematerialized block shows up as a checkpoint (remat) primitive in the gradient.
    assert ('remat' in str(jax.make_jaxpr(jax.grad(loss))(params))) == remat
  (p0, g0), (p1, g1) = results
  assert p0['block']['fc1']['kernel'].shape == (2, 16, 32)
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
