"""The Coach: the teacher with PointPillars replaced by lift-splat simulated LiDAR.

camera BEV ++ LiftSplat [B, Hb, Wb, lss.out_channels] -> the teacher's neck, SD-prior
cross-attention, decoder and (if config.model.hd.coach_refine) HD-prior refinement. It reads
no LiDAR, so it runs on camera-only data while sharing the teacher's prior modules.
"""
import flax.linen as nn

from mapkd_jax.models import precision
from mapkd_jax.models.camera import CameraBEV
from mapkd_jax.models.lss import LiftSplat
from mapkd_jax.models.teacher import decode_with_priors


class Coach(nn.Module):
  """Reads config.model.{camera, lss, neck, sd, decoder, hd} and config.data.

  Attributes:
    config: the full (frozen) config; config.model.hd.coach_refine picks the variant.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch: the schema batch; lidar_points / lidar_mask are never read.

    Returns:
      See `teacher.decode_with_priors`; the `*_pre` keys only with coach_refine; float32.
    """
    camera_bev = CameraBEV(self.config, name='camera')(batch, train=train)
    simulated_lidar = LiftSplat(self.config, name='lss')(batch, train=train)
    return precision.outputs_to_float32(decode_with_priors(
        self.config, camera_bev, simulated_lidar, batch['sd_prior'],
        refine=self.config.model.hd.coach_refine, train=train))
