"""The Student: camera branch only (no LiDAR, SD or HD inputs); the model that ships.

camera BEV [B, Hb, Wb, camera.channels] -> feature expansion (3x3 conv with bias, BN, ReLU per
entry of student.expand_channels, 64 -> 96 -> 192 in the reference) -> the neck's stride-2
convs -> `bev_small` -> bilinear resize (align_corners=False) back to the canvas -> BEV decoder.

Reference: MapKD `PMapNet_sdmap_S` (model/pmapnet_sdmap_S.py), which `convert/pmapnet.py`
maps onto these parameters. Deviation (DESIGN.md section 3): the reference resizes to a
hard-coded 200 x 400; here the canvas comes from config.data (200 x 400 at the reference
ranges, so the same function there).
"""
import flax.linen as nn

from mapkd_jax.data import schema
from mapkd_jax.models import precision
from mapkd_jax.models.bev_decoder import BEVDecoder, BEVNeck, ConvBN, resize_half_pixel
from mapkd_jax.models.camera import CameraBEV


class Student(nn.Module):
  """Reads config.model.{camera, student, neck, decoder} and config.data.

  Attributes:
    config: the full (frozen) config.
  """
  config: object

  def setup(self):
    dtype = precision.compute_dtype(self.config)
    self.camera = CameraBEV(self.config)
    self.expand = [ConvBN(width, 3, 1, 1, use_bias=True, dtype=dtype, name=f'expand_{i}')
                   for i, width in enumerate(self.config.model.student.expand_channels)]
    self.neck = BEVNeck(self.config)
    self.decoder = BEVDecoder(self.config)

  def __call__(self, batch, *, train: bool):
    """batch: the schema batch; only images, intrinsics, cam_rotation, cam_translation are read.

    Returns:
      semantic [B, Hb, Wb, 4], embedding [B, Hb, Wb, E], direction [B, Hb, Wb, 37] (logits),
      bev_small [B, h, w, neck.channels]; all float32 (computed in
      precision.compute_dtype(config)).
    """
    return self.decode(self.camera(batch, train=train), train=train)

  def decode(self, camera_bev, *, train: bool):
    """Everything after the camera branch (reference: from `topdown` on).

    camera_bev: [B, Hb, Wb, camera.channels] -> the outputs of __call__.
    """
    x = camera_bev
    for layer in self.expand:
      x = layer(x, train=train)
    bev_small = self.neck.down(x, train=train)
    canvas = schema.bev_shape(self.config.data.bev_x, self.config.data.bev_y)
    out = self.decoder(resize_half_pixel(bev_small, canvas), train=train)
    return precision.outputs_to_float32({**out, 'bev_small': bev_small})
