"""The Teacher: camera + LiDAR (PointPillars) + SD-prior cross-attention + HD-prior refinement.

camera BEV [B, Hb, Wb, camera.channels] ++ PointPillars [B, Hb, Wb, lidar.out_channels]
-> the neck's stride-2 convs -> `bev_small` [B, h, w, neck.channels]
-> SD cross-attention at that resolution [B, h, w, sd.d_model]
-> the neck's transposed convs back to the canvas -> BEV decoder (`*_pre` logits)
-> HD-prior ViT refinement of the semantic logits -> final semantic / embedding / direction.
The coach reuses `decode_with_priors` with simulated LiDAR in the LiDAR's slot.
"""
import flax.linen as nn
import jax.numpy as jnp

from mapkd_jax.data import schema
from mapkd_jax.models import lidar, precision, prior
from mapkd_jax.models.bev_decoder import BEVDecoder, BEVNeck
from mapkd_jax.models.camera import CameraBEV


def decode_with_priors(config, camera_bev, range_bev, sd_prior, *, refine: bool, train: bool):
  """Fuses the two BEV branches with the map priors; call from a parent's compact method.

  Submodules are created in the caller's scope with fixed names ('neck', 'sd_prior',
  'decoder', 'hd_prior'), so teacher and coach share one parameter layout and
  `params['hd_prior']` is the hd_pretrain checkpoint's subtree.

  Args:
    config: the full (frozen) config.
    camera_bev: [B, Hb, Wb, Cc] camera branch.
    range_bev: [B, Hb, Wb, Cl] LiDAR or simulated-LiDAR branch.
    sd_prior: [B, Hb, Wb, 1] SD raster in {-1, +1}.
    refine: whether to apply the HD-prior refinement.
    train: training mode (BatchNorm statistics, dropout).

  Returns:
    semantic [B, Hb, Wb, K], embedding [B, Hb, Wb, E], direction [B, Hb, Wb, D] (logits),
    bev_small [B, h, w, neck.channels] and, with `refine`, semantic_pre / embedding_pre /
    direction_pre: the decoder's logits before refinement; in the compute dtype (the caller
    casts to float32 with precision.outputs_to_float32).
  """
  canvas = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  if camera_bev.shape[1:3] != canvas or range_bev.shape[1:3] != canvas:
    raise ValueError(f'config.data bev_x/bev_y give a {canvas} canvas, but the camera branch '
                     f'is {camera_bev.shape[1:3]} and the range branch {range_bev.shape[1:3]}')
  neck = BEVNeck(config, name='neck')
  bev_small = neck.down(jnp.concatenate([camera_bev, range_bev], axis=-1), train=train)
  fused = prior.sd_fusion_from_config(config, name='sd_prior')(bev_small, sd_prior, train=train)
  bev = neck.up(fused, canvas, train=train)
  out = BEVDecoder(config, name='decoder')(bev, train=train)
  if not refine:
    return {**out, 'bev_small': bev_small}
  refined = prior.HDPrior(config, name='hd_prior')(
      out['semantic'], train=train)
  return {**refined, **{f'{k}_pre': v for k, v in out.items()}, 'bev_small': bev_small}


class Teacher(nn.Module):
  """Reads config.model.{camera, lidar, neck, sd, decoder, hd} and config.data.

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch: the schema batch (cameras, lidar_points, lidar_mask, sd_prior).

    Returns:
      See `decode_with_priors` (always refined); float32.
    """
    camera_bev = CameraBEV(self.config, name='camera')(batch, train=train)
    lidar_bev = lidar.from_config(self.config, name='lidar')(
        batch['lidar_points'], batch['lidar_mask'], train=train)
    return precision.outputs_to_float32(decode_with_priors(
        self.config, camera_bev, lidar_bev, batch['sd_prior'], refine=True, train=train))
