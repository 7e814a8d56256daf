"""The Student: camera branch only (no LiDAR, SD or HD inputs); the model that ships.

camera BEV [B, Hb, Wb, camera.channels] -> feature expansion (3x3 conv-BN-ReLU per entry of
student.expand_channels, 64 -> 96 -> 192 in the reference) -> the neck's stride-2 convs ->
`bev_small` -> bilinear resize back to the canvas derived from config.data -> BEV decoder.
"""
import flax.linen as nn
import jax

from mapkd_jax.data import schema
from mapkd_jax.models import precision
from mapkd_jax.models.bev_decoder import BEVDecoder, BEVNeck
from mapkd_jax.models.camera import CameraBEV
from mapkd_jax.models.image_encoder import ConvBNAct


class Student(nn.Module):
  """Reads config.model.{camera, student, neck, decoder} and config.data.

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  @nn.compact
  def __call__(self, batch, *, train: bool):
    """batch: the schema batch; only images, intrinsics, cam_rotation, cam_translation are read.

    Returns:
      semantic [B, Hb, Wb, 4], embedding [B, Hb, Wb, E], direction [B, Hb, Wb, 37] (logits),
      bev_small [B, h, w, neck.channels]; all float32 (computed in
      precision.compute_dtype(config)).
    """
    dtype = precision.compute_dtype(self.config)
    x = CameraBEV(self.config, name='camera')(batch, train=train)
    for i, width in enumerate(self.config.model.student.expand_channels):
      x = ConvBNAct(width, dtype=dtype, name=f'expand_{i}')(x, train=train)
    bev_small = BEVNeck(self.config, name='neck').down(x, train=train)
    canvas = schema.bev_shape(self.config.data.bev_x, self.config.data.bev_y)
    x = jax.image.resize(bev_small, (bev_small.shape[0], *canvas, bev_small.shape[-1]),
                         'bilinear')
    out = BEVDecoder(self.config, name='decoder')(x, train=train)
    return precision.outputs_to_float32({**out, 'bev_small': bev_small})
