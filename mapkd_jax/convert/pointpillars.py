"""Reference PointPillars weights (HDMapNet `PointPillarEncoder`) -> models/lidar.PointPillars.

In P-MapNet / MapKD teachers the encoder is the attribute `pp` (`self.pp =
PointPillarEncoder(128, xbound, ybound, zbound)`), so its tensors are named `pp.<name>`:

  pp.pn.pointnet.0.weight [64, 15, 1]         -> pointnet/kernel [15, 64]   (1x1 Conv1d = Dense)
  pp.pn.pointnet.1.*                          -> pointnet_bn
  pp.block{k}.layers.{3 l}.weight              -> block{k}_{l}/conv          (k = 1..3)
  pp.block{k}.layers.{3 l + 1}.*               -> block{k}_{l}/bn
  pp.up1.{0,1}, pp.up2.{1,2}, pp.up3.{1,2}     -> up{k}/conv, up{k}/bn       (up2/up3: index 0
                                                                            is the Upsample)
  pp.conv_out.{3 j}, pp.conv_out.{3 j + 1}     -> out_{j}/conv, out_{j}/bn
  pp.conv_out.{3 J}.{weight,bias}              -> out                       (the 1x1, J = #head)

Every 2-d conv kernel is transposed in its two spatial axes: the reference convolves an
[x, y] pillar grid and transposes its output to [y, x]; ours convolves the [y, x] canvas
directly, which is the same function with kernel[ky, kx] = reference[kx, ky].
"""
import numpy as np

from mapkd_jax.convert.common import SEP, Conversion


def pillar_conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, kx, ky] on the [x, y] grid -> Flax kernel [ky, kx, I, O]."""
  if weight.ndim != 4:
    raise ValueError(f'conv weight must be 4-d [O, I, kh, kw], got shape {weight.shape}')
  return np.transpose(weight, (3, 2, 1, 0))


def pointnet_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv1d(kernel_size=1) weight [O, I, 1] -> Flax Dense kernel [I, O]."""
  if weight.ndim != 3 or weight.shape[-1] != 1:
    raise ValueError(f'PointNet weight must be [O, I, 1], got shape {weight.shape}')
  return np.transpose(weight[..., 0])


def _count(conv: Conversion, target_prefix: str, pattern: str) -> int:
  """Number of modules `pattern.format(i)` (i = 0, 1, ..) that the target tree holds."""
  i = 0
  while any(p.startswith(f'params{SEP}{target_prefix}{pattern.format(i)}{SEP}')
            for p in conv.target):
    i += 1
  return i


def convert_pointpillars(conv: Conversion, target_prefix: str, source_prefix: str = 'pp.'):
  """Maps a reference PointPillarEncoder's tensors into a PointPillars subtree.

  Args:
    conv: the Conversion (its target must already hold the PointPillars variables).
    target_prefix: module path of the PointPillars inside the target, ending in '/'
      (e.g. 'lidar/' in the teacher, '' for a bare PointPillars).
    source_prefix: the reference's prefix, 'pp.' in P-MapNet / MapKD teachers.

  The block layout (layers per block, head length) is read from the target tree, so a
  reference of another size fails on the first missing name or wrong shape.
  """
  t, s = target_prefix, source_prefix
  if not any(p.startswith(f'params{SEP}{t}pointnet{SEP}') for p in conv.target):
    raise ValueError(f'{conv.origin}: no PointPillars under target {t!r} (expected '
                     f'{t}pointnet/kernel)')
  conv.put(f'params{SEP}{t}pointnet{SEP}kernel', f'{s}pn.pointnet.0.weight', pointnet_kernel)
  conv.batch_norm(f'{t}pointnet_bn', f'{s}pn.pointnet.1')

  def pillar_conv(target, source_conv, source_bn):
    conv.put(f'params{SEP}{t}{target}{SEP}conv{SEP}kernel', f'{s}{source_conv}.weight',
             pillar_conv_kernel)
    conv.batch_norm(f'{t}{target}{SEP}bn', f'{s}{source_bn}')

  k = 1
  while _count(conv, t, f'block{k}_{{}}'):
    for layer in range(_count(conv, t, f'block{k}_{{}}')):
      pillar_conv(f'block{k}_{layer}', f'block{k}.layers.{3 * layer}',
                  f'block{k}.layers.{3 * layer + 1}')
    # up1 has no Upsample in front of its conv; the others do (index 0).
    first = 0 if k == 1 else 1
    pillar_conv(f'up{k}', f'up{k}.{first}', f'up{k}.{first + 1}')
    k += 1
  head = _count(conv, t, 'out_{}')
  for j in range(head):
    pillar_conv(f'out_{j}', f'conv_out.{3 * j}', f'conv_out.{3 * j + 1}')
  conv.put(f'params{SEP}{t}out{SEP}kernel', f'{s}conv_out.{3 * head}.weight', pillar_conv_kernel)
  conv.put(f'params{SEP}{t}out{SEP}bias', f'{s}conv_out.{3 * head}.bias')
