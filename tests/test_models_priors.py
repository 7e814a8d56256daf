"""PointPillars, SD-prior cross-attention, HD-prior ViT/MAE, and the teacher/coach compositions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tcs
from mapkd_jax.data import schema
from mapkd_jax.models import lidar, prior

BEV_X = (-3.0, 3.0, 0.5)   # 12 columns
BEV_Y = (-2.0, 2.0, 0.5)   # 8 rows
Z_RANGE = (-1.0, 1.0)


def _pillar_mean_ref(points, mask, values):
  """Loop over points: mean of `values` per (row, col) pillar; masked/outside points ignored."""
  height, width = schema.bev_shape(BEV_X, BEV_Y)
  batch, num_points, channels = values.shape
  total = np.zeros((batch, height, width, channels))
  count = np.zeros((batch, height, width))
  for b in range(batch):
    for n in range(num_points):
      x, y, z = points[b, n, :3]
      col = int(math.floor((x - BEV_X[0]) / BEV_X[2]))
      row = int(math.floor((y - BEV_Y[0]) / BEV_Y[2]))
      if (mask[b, n] and 0 <= col < width and 0 <= row < height
          and Z_RANGE[0] <= z < Z_RANGE[1]):
        total[b, row, col] += values[b, n]
        count[b, row, col] += 1
  return total / np.maximum(count, 1)[..., None], count


def _random_points(seed, batch, num_points, masked_fraction):
  rng = np.random.default_rng(seed)
  # Range a bit beyond the canvas and z range so some points fall outside.
  xyz = rng.uniform([-3.5, -2.5, -1.3], [3.5, 2.5, 1.3], (batch, num_points, 3))
  points = np.concatenate([xyz, rng.uniform(0, 1, (batch, num_points, 2))], -1)
  mask = rng.uniform(size=(batch, num_points)) >= masked_fraction
  points = np.where(mask[..., None], points, 0.0).astype(np.float32)
  return points, mask


@pytest.mark.parametrize('batch,num_points,masked_fraction', [
    (1, 1, 0.0), (2, 50, 0.3), (3, 200, 0.0), (2, 40, 1.0)])
def test_scatter_mean_matches_loop(batch, num_points, masked_fraction):
  points, mask = _random_points(batch * 7 + num_points, batch, num_points, masked_fraction)
  values = np.random.default_rng(1).normal(size=(batch, num_points, 4)).astype(np.float32)
  index, valid = lidar.pillar_indices(jnp.asarray(points[..., :3]), jnp.asarray(mask),
                                      bev_x=BEV_X, bev_y=BEV_Y, z_range=Z_RANGE)
  height, width = schema.bev_shape(BEV_X, BEV_Y)
  got = lidar.scatter_mean(jnp.asarray(values), index, valid, height * width)
  want, count = _pillar_mean_ref(points, mask, values)
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got).reshape(want.shape)[count == 0] == 0)  # empty pillars zero


def test_point_features_match_loop():
  points, mask = _random_points(3, 2, 120, 0.2)
  feats, _, valid = lidar.point_features(jnp.asarray(points), jnp.asarray(mask),
                                         bev_x=BEV_X, bev_y=BEV_Y, z_range=Z_RANGE)
  feats, valid = np.asarray(feats), np.asarray(valid)
  mean_xyz, count = _pillar_mean_ref(points, mask, points[..., :3])
  for b in range(points.shape[0]):
    for n in range(points.shape[1]):
      if not valid[b, n]:
        np.testing.assert_array_equal(feats[b, n], 0.0)
        continue
      x, y, z = points[b, n, :3]
      col = int(math.floor((x - BEV_X[0]) / BEV_X[2]))
      row = int(math.floor((y - BEV_Y[0]) / BEV_Y[2]))
      centre = np.array([BEV_X[0] + (col + .5) * BEV_X[2], BEV_Y[0] + (row + .5) * BEV_Y[2],
                         0.5 * sum(Z_RANGE)])
      want = np.concatenate([points[b, n], [count[b, row, col]],
                             points[b, n, :3] - mean_xyz[b, row, col], mean_xyz[b, row, col],
                             points[b, n, :3] - centre])
      np.testing.assert_allclose(feats[b, n], want, rtol=1e-5, atol=1e-5)


def test_pointpillars_shape_and_ignores_masked_points():
  model = lidar.PointPillars(bev_x=BEV_X, bev_y=BEV_Y, z_range=Z_RANGE, pointnet_channels=8,
                             block_channels=(8, 16, 16), block_layers=(1, 1, 1),
                             block_strides=(1, 2, 2), head_channels=(16,), out_channels=12)
  points, mask = _random_points(0, 2, 64, 0.3)
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.PRNGKey(0), points, mask, train=False)
  apply = jax.jit(model.apply, static_argnames='train')
  out = apply(variables, points, mask, train=False)
  assert out.shape == (2, 8, 12, 12)
  garbage = np.where(mask[..., None], points, 123.0).astype(np.float32)
  np.testing.assert_allclose(apply(variables, garbage, mask, train=False), out,
                             rtol=1e-5, atol=1e-5)


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
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  out_a = apply(variables, bev_small, sd_a, train=False)
  out_b = apply(variables, bev_small, sd_b, train=False)
  assert out_a.shape == (2, 3, 6, 8)
  assert np.abs(np.asarray(out_a - out_b)).max() > 1e-4
  # Per-sample: changing sample 1's SD map leaves sample 0 alone.
  sd_c = sd_a.copy()
  sd_c[1] = -sd_c[1]
  out_c = apply(variables, bev_small, sd_c, train=False)
  np.testing.assert_allclose(out_c[0], out_a[0], atol=1e-5)
  # Dropout is active in training only.
  out_t1 = apply(variables, bev_small, sd_a, train=True, mutable=('batch_stats',),
                 rngs={'dropout': jax.random.PRNGKey(1)})[0]
  out_t2 = apply(variables, bev_small, sd_a, train=True, mutable=('batch_stats',),
                 rngs={'dropout': jax.random.PRNGKey(2)})[0]
  assert np.abs(np.asarray(out_t1 - out_t2)).max() > 1e-4


def test_sd_fusion_rejects_mismatched_width():
  model = prior.SDPriorFusion(encoder_channels=(4, 8, 6), d_model=8, num_heads=2, num_layers=1,
                              ffn_dim=16, dropout=0.0, pos_temperature=10000.0)
  with pytest.raises(ValueError, match='config.model.sd'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 6, 4)), jnp.zeros((1, 24, 48, 1)),
               train=False)


HD_KWARGS = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_ratio=2, dropout=0.0,
                 decoder_channels=8, num_classes=4, embedding_dim=5, direction_classes=37)


def test_hd_prior_shapes_and_rejects_bad_patch():
  model = prior.HDPrior(**HD_KWARGS)
  x = jnp.ones((2, 8, 12, 4))
  variables = jax.jit(model.init, static_argnames='train')(jax.random.PRNGKey(0), x, train=False)
  out = jax.jit(model.apply, static_argnames='train')(variables, x, train=False)
  assert {k: v.shape for k, v in out.items()} == {
      'semantic': (2, 8, 12, 4), 'embedding': (2, 8, 12, 5), 'direction': (2, 8, 12, 37)}
  with pytest.raises(ValueError, match='patch_size'):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 9, 12, 4)), train=False)


def test_hd_mae_mask_and_target():
  model = prior.HDMapMAE(hd_prior_kwargs=HD_KWARGS, mask_ratio=0.5)
  semantic = np.random.default_rng(0).integers(0, 4, (2, 8, 12)).astype(np.int32)
  rngs = {'params': jax.random.PRNGKey(0), 'mask': jax.random.PRNGKey(1)}
  variables = jax.jit(model.init, static_argnames='train')(
      rngs, {'semantic': semantic}, train=False)
  out = jax.jit(model.apply, static_argnames='train')(
      variables, {'semantic': semantic}, train=False, rngs={'mask': jax.random.PRNGKey(2)})
  mask = np.asarray(out['mask'])
  assert out['reconstruction'].shape == (2, 8, 12, 4) and mask.shape == (2, 8, 12)
  np.testing.assert_array_equal(np.asarray(out['target']).argmax(-1), semantic)
  patches = mask.reshape(2, 2, 4, 3, 4).transpose(0, 1, 3, 2, 4).reshape(2, 6, 16)
  assert np.all((patches.min(-1) == patches.max(-1)))           # patch-aligned
  np.testing.assert_array_equal(patches[..., 0].sum(1), 3)      # 0.5 of 6 patches
