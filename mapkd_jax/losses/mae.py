"""Masked-autoencoder reconstruction loss of the HD-prior pretraining (hd_pretrain stage).

MAE convention (He et al. 2022): the error counts on masked patches only; visible patches are
copied from the input and would teach nothing. Patches have equal size, so the mean over masked
pixels equals the mean over masked patches of their per-patch mean error.
"""
import jax.numpy as jnp

from mapkd_jax.losses import task

MAE_KINDS = ('bce', 'mse')


def mae_loss(reconstruction, target, mask, *, kind='bce', pos_weight=1.0):
  """Reconstruction error over masked pixels and all channels.

  Args:
    reconstruction: [B, H, W, K]; logits for kind='bce', values for kind='mse'.
    target: [B, H, W, K]; the one-hot ground-truth raster (in [0, 1] for 'bce').
    mask: [B, H, W] bool or {0, 1} float, 1 = pixel of a masked patch.
    kind: 'bce' (BCE-with-logits, for one-hot rasters) or 'mse'.
    pos_weight: weight of positive targets, 'bce' only.

  Returns:
    Scalar; exactly 0.0 with zero gradients when nothing is masked.
  """
  if kind not in MAE_KINDS:
    raise ValueError(f'mae_loss: kind must be one of {MAE_KINDS}, got {kind!r}')
  if reconstruction.shape != target.shape:
    raise ValueError(f'mae_loss: reconstruction {reconstruction.shape} and target '
                     f'{target.shape} differ')
  if mask.shape != reconstruction.shape[:-1]:
    raise ValueError(f'mae_loss: mask {mask.shape} must be {reconstruction.shape[:-1]}')
  reconstruction = reconstruction.astype(jnp.float32)
  target = target.astype(jnp.float32)
  if kind == 'bce':
    error = task.bce_with_logits(reconstruction, target, pos_weight=pos_weight)
  else:
    error = jnp.square(reconstruction - target)
  return task.masked_mean(jnp.mean(error, axis=-1), mask > 0)
