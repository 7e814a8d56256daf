"""The shard and batch contract shared by data_prep (writer), the pipeline (reader) and models.

Shard records (`tf.train.Example`, one per keyframe; README "Shard schema"):
  sample_token, scene_token      bytes
  cameras/jpeg                   6 x JPEG bytes, resized to dataset_info.image_size, CAMERAS order
  cameras/intrinsics             6 x 9 floats, row-major 3x3, for the resized image
  cameras/rotation               6 x 9 floats, row-major 3x3, camera -> ego
  cameras/translation            6 x 3 floats, camera -> ego, metres
  ego/pose                       16 floats, row-major 4x4, ego -> global
  lidar/points                   N x 5 floats (x, y, z, intensity, dt), keyframe ego frame
  prior/sd                       PNG uint8 [H, W]: 0 no road, 255 road (read as -1 / +1)
  label/semantic                 PNG uint8 [H, W]: 0 bg, 1 divider, 2 ped_crossing, 3 boundary
  label/instance                 PNG uint16 [H, W]: 0 none, else a per-sample polyline id
  label/direction                PNG uint8 [H, W]: 0 none, 1..36 = 10-degree bins (reference's
                                 forward mask: the bin of the last segment covering the pixel)
  label/direction_backward       PNG uint8 [H, W]: the reference's backward mask (the reversed
                                 polyline's bins: the opposite bin, but at a pixel two segments
                                 share, the first segment's); HDMapNet's direction target is
                                 one-hot(forward) + one-hot(backward), normalized
  vectors/class                  int64 list (1..3 as in label/semantic), one per polyline
  vectors/num_points             int64 list, points per polyline
  vectors/points                 float list, x, y metres (ego frame) concatenated

Raster convention: row i is y = y_min + (i + 0.5) * ry, column j is x = x_min + (j + 0.5) * rx.

Model batches (`batch_spec`) are dicts of arrays, channels last, B = batch size:
  images          [B, C, H, W, 3] float32, ImageNet mean/std normalized
  intrinsics      [B, C, 3, 3] float32, pixel coordinates of the network input size
  cam_rotation    [B, C, 3, 3] float32, camera -> ego
  cam_translation [B, C, 3] float32
  ego_pose        [B, 4, 4] float32, ego -> global
  lidar_points    [B, P, 5] float32, zero where lidar_mask is False
  lidar_mask      [B, P] bool
  sd_prior        [B, Hb, Wb, 1] float32 in {-1, +1}
  semantic        [B, Hb, Wb] int32 (0..3)
  instance        [B, Hb, Wb] int32 (0 = none)
  direction       [B, Hb, Wb] int32 (0 = none, 1..36), forward bins (label/direction)
  direction_backward [B, Hb, Wb] int32 (0 = none, 1..36), backward bins
"""
import numpy as np

# 2: labels drawn by the reference rule (data_prep/labels.py), label/direction_backward added.
SCHEMA_VERSION = 2
CLASSES = ('divider', 'ped_crossing', 'boundary')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Example keys.
SAMPLE_TOKEN = 'sample_token'
SCENE_TOKEN = 'scene_token'
CAMERA_JPEG = 'cameras/jpeg'
CAMERA_INTRINSICS = 'cameras/intrinsics'
CAMERA_ROTATION = 'cameras/rotation'
CAMERA_TRANSLATION = 'cameras/translation'
EGO_POSE = 'ego/pose'
LIDAR_POINTS = 'lidar/points'
SD_PRIOR = 'prior/sd'
LABEL_SEMANTIC = 'label/semantic'
LABEL_INSTANCE = 'label/instance'
LABEL_DIRECTION = 'label/direction'
LABEL_DIRECTION_BACKWARD = 'label/direction_backward'
VECTOR_CLASS = 'vectors/class'
VECTOR_NUM_POINTS = 'vectors/num_points'
VECTOR_POINTS = 'vectors/points'


def bev_shape(bev_x, bev_y):
  """(H, W) of the BEV canvas for (min, max, step) ranges: rows follow y, columns x."""
  height = int(round((bev_y[1] - bev_y[0]) / bev_y[2]))
  width = int(round((bev_x[1] - bev_x[0]) / bev_x[2]))
  return height, width


def batch_spec(data_config, batch_size):
  """name -> (shape, dtype) of a model batch for a `config.data` section."""
  num_cams = len(data_config.cameras)
  height, width = data_config.image_size
  bev_h, bev_w = bev_shape(data_config.bev_x, data_config.bev_y)
  b = batch_size
  return {
      'images': ((b, num_cams, height, width, 3), np.float32),
      'intrinsics': ((b, num_cams, 3, 3), np.float32),
      'cam_rotation': ((b, num_cams, 3, 3), np.float32),
      'cam_translation': ((b, num_cams, 3), np.float32),
      'ego_pose': ((b, 4, 4), np.float32),
      'lidar_points': ((b, data_config.max_points, 5), np.float32),
      'lidar_mask': ((b, data_config.max_points), np.bool_),
      'sd_prior': ((b, bev_h, bev_w, 1), np.float32),
      'semantic': ((b, bev_h, bev_w), np.int32),
      'instance': ((b, bev_h, bev_w), np.int32),
      'direction': ((b, bev_h, bev_w), np.int32),
      'direction_backward': ((b, bev_h, bev_w), np.int32),
  }
