"""Reference parity of the teacher's PointPillars (torch side: torch_ref_lidar.py).

Random torch weights and BatchNorm running statistics, converted with
mapkd_jax/convert/pointpillars.py under the reference's names (`pp.` prefix); bound
max|diff| <= 1e-4 x max|reference| per block, eval and train mode (batch statistics).
Inputs exercise the reference's quirks: padded points with garbage values, points outside the
grid, points just below the minima (cell 0 by truncation), real points in pillar 0.

Sizes: the reference point count (81920) and grid (200 x 400) at quarter width (a 200 x 400
forward at full width costs ~10 s per framework on two cores), and the full reference widths
on a 40 x 80 grid.
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch_ref_bev  # noqa: E402
import torch_ref_lidar as ref  # noqa: E402
from mapkd_jax.convert import common, pointpillars  # noqa: E402
from mapkd_jax.models import lidar  # noqa: E402

REL_TOL = 1e-4
ZBOUND = (-10.0, 10.0, 20.0)   # HDMapNet / P-MapNet data_conf zbound
REFERENCE_WIDTHS = dict(pointnet=64, blocks=(64, 128, 256), head=(256, 128))
QUARTER_WIDTHS = dict(pointnet=16, blocks=(16, 32, 64), head=(64, 32))
BLOCKS = ('block1', 'block2', 'block3', 'up1', 'up2', 'up3')


def _points(seed, batch, num_points, bev_x, bev_y, real_fraction=0.7):
  """[B, P, 5] float32 points and [B, P] bool mask with every case the reference treats
  specially."""
  rng = np.random.default_rng(seed)
  lo = np.array([bev_x[0] - 2, bev_y[0] - 1, -13.0])
  hi = np.array([bev_x[1] + 2, bev_y[1] + 1, 12.0])
  xyz = rng.uniform(lo, hi, (batch, num_points, 3))
  # Some within one cell below the minima (truncation puts them in cell 0), some in pillar 0.
  n = num_points // 50
  xyz[:, :n, 0] = bev_x[0] - rng.uniform(0, bev_x[2], (batch, n))
  xyz[:, n:2 * n, 1] = bev_y[0] - rng.uniform(0, bev_y[2], (batch, n))
  xyz[:, 2 * n:3 * n, :2] = np.array([bev_x[0], bev_y[0]]) + rng.uniform(
      0, 1, (batch, n, 2)) * np.array([bev_x[2], bev_y[2]])
  xyz[:, :3 * n, 2] = rng.uniform(-5, 5, (batch, 3 * n))
  points = np.concatenate([xyz, rng.uniform(0, 1, (batch, num_points, 2))], -1)
  mask = rng.uniform(size=(batch, num_points)) < real_fraction
  mask[:, :3 * n] = True
  return points.astype(np.float32), mask


def _ours(bev_x, bev_y, widths, out_channels=128):
  return lidar.PointPillars(
      bev_x=bev_x, bev_y=bev_y, z_range=ZBOUND[:2], pointnet_channels=widths['pointnet'],
      block_channels=widths['blocks'], block_layers=(2, 3, 3), block_strides=(1, 2, 2),
      head_channels=widths['head'], out_channels=out_channels)


def _convert(torch_model, model, points, mask):
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), points, mask, train=False))
  source = {f'pp.{k}': v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  conv = common.Conversion(source, {c: {'lidar': t} for c, t in abstract.items()})
  pointpillars.convert_pointpillars(conv, 'lidar/', 'pp.')
  return {c: t['lidar'] for c, t in conv.finish().items()}


def _torch_blocks(torch_model, points, mask, train):
  """Reference output [B, Y, X, C] and each block's output in our [B, Y, X, C] layout."""
  got = {}
  hooks = [getattr(torch_model, name).register_forward_hook(
      lambda m, i, o, name=name: got.__setitem__(name, o.detach().permute(0, 3, 2, 1).numpy()))
      for name in BLOCKS]
  hooks.append(torch_model.pn.register_forward_hook(
      lambda m, i, o: got.__setitem__('pointnet', o.detach().permute(0, 2, 1).numpy())))
  torch_model.train(train)
  with torch.no_grad():
    out = torch_model(torch.from_numpy(points), torch.from_numpy(mask.astype(np.float32)))
  for h in hooks:
    h.remove()
  got['output'] = out.permute(0, 2, 3, 1).numpy()
  return got


def _our_blocks(model, variables, points, mask, train):
  out, state = model.apply(variables, points, mask, train=train, capture_intermediates=True,
                           mutable=['intermediates', 'batch_stats'])
  inter = state['intermediates']
  last = {'block1': 'block1_1', 'block2': 'block2_2', 'block3': 'block3_2'}
  got = {name: np.asarray(inter[last.get(name, name)]['__call__'][0]) for name in BLOCKS}
  # PointNet output after ReLU and the mask, as the reference's `pn` returns it.
  _, valid, _ = lidar.pillar_indices(points[..., :3], mask, bev_x=model.bev_x,
                                     bev_y=model.bev_y, z_range=model.z_range)
  got['pointnet'] = np.maximum(np.asarray(inter['pointnet_bn']['__call__'][0]), 0) * np.asarray(
      valid)[..., None]
  got['output'] = np.asarray(out)
  return got, state['batch_stats']


def _compare(ours, theirs, what):
  figures = {}
  for name in ('pointnet',) + BLOCKS + ('output',):
    a, b = ours[name], theirs[name]
    assert a.shape == b.shape, (what, name, a.shape, b.shape)
    scale = float(np.max(np.abs(b)))
    err = float(np.max(np.abs(a - b)))
    figures[name] = (err, err / scale)
    print(f'{what} {name}: max|diff| {err:.3g}, max|ref| {scale:.3g}, relative '
          f'{err / scale:.3g}')   # the figures, with pytest -s
    assert scale > 0 and err <= REL_TOL * scale, f'{what} {name}: {err:.3g} > 1e-4 x {scale:.3g}'
  return figures


def _run_parity(bev_x, bev_y, widths, batch, num_points, seed):
  xb, yb = list(bev_x), list(bev_y)
  torch_model = torch_ref_bev.randomize_(
      ref.PointPillarEncoder(128, xb, yb, list(ZBOUND), **widths), seed)
  model = _ours(bev_x, bev_y, widths)
  points, mask = _points(seed, batch, num_points, bev_x, bev_y)
  variables = _convert(torch_model, model, points, mask)
  for train in (False, True):
    theirs = _torch_blocks(torch_model, points, mask, train)
    ours, stats = _our_blocks(model, variables, points, mask, train)
    _compare(ours, theirs, f'B={batch} {"train" if train else "eval"}')
    if train:   # running means moved by batch statistics over ALL points, padding included
      for target, source in (('pointnet_bn', torch_model.pn.pointnet[1]),
                             ('block1_0', torch_model.block1.layers[1])):
        mean = stats[target]['mean'] if target == 'pointnet_bn' else stats[target]['bn']['mean']
        want = source.running_mean.numpy()
        np.testing.assert_allclose(np.asarray(mean), want, atol=1e-4 * np.abs(want).max())
      # The torch module's running statistics changed; later modes use a fresh copy.


@pytest.mark.parametrize('batch', [1, 2])
def test_reference_grid_and_points_quarter_width(batch):
  """81920 points (30 % padding) on the 200 x 400 grid of the 60 x 30 m range."""
  _run_parity((-30.0, 30.0, 0.15), (-15.0, 15.0, 0.15), QUARTER_WIDTHS, batch, 81920, batch)


def test_reference_widths_small_grid():
  """Full reference widths (64 / 64-128-256 / 256-128 -> 128) on a 40 x 80 grid."""
  _run_parity((-30.0, 30.0, 0.75), (-15.0, 15.0, 0.75), REFERENCE_WIDTHS, 2, 8192, 7)


def test_convert_refuses_other_sizes():
  bev = ((-3.0, 3.0, 0.75), (-1.5, 1.5, 0.75))
  torch_model = ref.PointPillarEncoder(128, *map(list, bev), list(ZBOUND), **QUARTER_WIDTHS)
  model = _ours(*bev, REFERENCE_WIDTHS)
  points, mask = _points(0, 1, 64, *bev)
  with pytest.raises(ValueError, match='shape mismatch'):
    _convert(torch_model, model, points, mask)
  with pytest.raises(ValueError, match='no PointPillars'):
    conv = common.Conversion({}, {'params': {}})
    pointpillars.convert_pointpillars(conv, 'lidar/')
