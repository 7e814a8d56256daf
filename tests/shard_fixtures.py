"""Small, valid shards + dataset_info.json from random arrays, per mapkd_jax/data/schema.py.

For tests of any module that reads shards (and for the pipeline benchmark):

  import shard_fixtures
  data_config = shard_fixtures.tiny_data_config()
  samples = shard_fixtures.write_shards(tmp_path, data_config, split_sizes={'train': 6})
  # samples['train'][i] holds the source arrays of the i-th written example (file order).

Images are smooth (upsampled noise) so JPEG round trips stay within a few grey levels;
labels use their full value ranges (instance ids above 255 exercise the uint16 PNG).
"""
import json
import os

import cv2
import numpy as np
import tensorflow as tf

from configs import tcs
from mapkd_jax.data import dataset_info
from mapkd_jax.data import schema

JPEG_QUALITY = 95
# Side of the coarse noise grid that is upsampled into a smooth image.
_IMAGE_NOISE_CELL = 8


def tiny_data_config(**overrides):
  """`config.data` of the tiny test setup, shrunk further so shards build in milliseconds."""
  data_config = tcs.get_config('student,tiny').data
  data_config.image_size = (16, 24)
  data_config.bev_x = (-6.0, 6.0, 0.6)    # 20 columns
  data_config.bev_y = (-3.0, 3.0, 0.6)    # 10 rows
  data_config.max_points = 64
  data_config.shuffle_buffer = 16
  for key, value in overrides.items():
    data_config[key] = value
  return data_config


def _smooth_image(rng, height, width):
  coarse = rng.integers(0, 256, (max(1, height // _IMAGE_NOISE_CELL),
                                 max(1, width // _IMAGE_NOISE_CELL), 3)).astype(np.uint8)
  return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def _noise_rasters(rng, data_config, bev_h, bev_w):
  """Every pixel random: exercises the full value range of each raster."""
  return {
      'sd_prior': (rng.integers(0, 2, (bev_h, bev_w)) * 255).astype(np.uint8),
      'semantic': rng.integers(0, len(data_config.classes) + 1, (bev_h, bev_w)).astype(np.uint8),
      'instance': rng.integers(0, 2**16, (bev_h, bev_w)).astype(np.uint16),
      'direction': rng.integers(0, data_config.direction_bins + 1, (bev_h, bev_w)).astype(np.uint8),
  }


def _line_rasters(rng, data_config, bev_h, bev_w, num_lines):
  """Random straight lines on an empty canvas, like real labels (and as cheap to decode)."""
  rasters = {'sd_prior': np.zeros((bev_h, bev_w), np.uint8),
             'semantic': np.zeros((bev_h, bev_w), np.uint8),
             'instance': np.zeros((bev_h, bev_w), np.uint16),
             'direction': np.zeros((bev_h, bev_w), np.uint8)}
  thickness = dataset_info.label_width_spec(data_config)['label_thickness_px']
  for instance in range(1, num_lines + 1):
    ends = [(int(rng.integers(0, bev_w)), int(rng.integers(0, bev_h))) for _ in range(2)]
    values = {'sd_prior': 255, 'semantic': int(rng.integers(1, len(data_config.classes) + 1)),
              'instance': instance,
              'direction': int(rng.integers(1, data_config.direction_bins + 1))}
    for key, value in values.items():
      cv2.line(rasters[key], ends[0], ends[1], value, thickness)
  return rasters


def random_sample(rng, data_config, index, num_points, *, label_style='noise'):
  """Source arrays of one keyframe, named after schema batch keys (+ tokens, JPEGs, vectors).

  label_style: 'noise' (every pixel random) or 'lines' (sparse lines, realistic PNG sizes).
  """
  num_cams = len(data_config.cameras)
  height, width = data_config.image_size
  bev_h, bev_w = schema.bev_shape(data_config.bev_x, data_config.bev_y)
  num_lines = int(rng.integers(0, 4))
  vectors = []
  for _ in range(num_lines):
    cls = int(rng.integers(1, len(data_config.classes) + 1))
    points = rng.uniform(-10, 10, (int(rng.integers(2, 7)), 2)).astype(np.float32)
    vectors.append((cls, points))
  images = np.stack([_smooth_image(rng, height, width) for _ in range(num_cams)])
  if label_style == 'noise':
    rasters = _noise_rasters(rng, data_config, bev_h, bev_w)
  elif label_style == 'lines':
    rasters = _line_rasters(rng, data_config, bev_h, bev_w, num_lines=int(rng.integers(5, 30)))
  else:
    raise ValueError(f"label_style must be 'noise' or 'lines', got {label_style!r}")
  # The reference's backward bins: the opposite of the forward ones (they differ only where two
  # segments share a pixel, which random rasters do not model).
  direction, half = rasters['direction'].astype(np.int64), data_config.direction_bins // 2
  rasters['direction_backward'] = np.where(
      direction > 0, (direction - 1 + half) % data_config.direction_bins + 1, 0).astype(np.uint8)
  return {
      'sample_token': f'sample-{index:05d}',
      'scene_token': f'scene-{index // 4:03d}',
      'images': images,
      'jpeg': [_jpeg(image) for image in images],   # what the shard stores
      'intrinsics': rng.normal(size=(num_cams, 3, 3)).astype(np.float32),
      'cam_rotation': rng.normal(size=(num_cams, 3, 3)).astype(np.float32),
      'cam_translation': rng.normal(size=(num_cams, 3)).astype(np.float32),
      'ego_pose': rng.normal(size=(4, 4)).astype(np.float32),
      'lidar_points': rng.normal(size=(num_points, 5)).astype(np.float32),
      **rasters,
      'vectors': vectors,
  }


def _png(array):
  ok, encoded = cv2.imencode('.png', array)
  if not ok:
    raise ValueError(f'PNG encoding failed for an array of shape {array.shape}')
  return encoded.tobytes()


def _jpeg(rgb):
  ok, encoded = cv2.imencode('.jpg', rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise ValueError(f'JPEG encoding failed for an image of shape {rgb.shape}')
  return encoded.tobytes()


def serialize_sample(sample):
  """One schema `tf.train.Example`, serialized."""
  def floats(array):
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(array).tolist()))

  def ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

  def blobs(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

  vectors = sample['vectors']
  points = (np.concatenate([p for _, p in vectors]) if vectors else np.zeros((0, 2), np.float32))
  feature = {
      schema.SAMPLE_TOKEN: blobs([sample['sample_token'].encode()]),
      schema.SCENE_TOKEN: blobs([sample['scene_token'].encode()]),
      schema.CAMERA_JPEG: blobs(sample['jpeg']),
      schema.CAMERA_INTRINSICS: floats(sample['intrinsics']),
      schema.CAMERA_ROTATION: floats(sample['cam_rotation']),
      schema.CAMERA_TRANSLATION: floats(sample['cam_translation']),
      schema.EGO_POSE: floats(sample['ego_pose']),
      schema.LIDAR_POINTS: floats(sample['lidar_points']),
      schema.SD_PRIOR: blobs([_png(sample['sd_prior'])]),
      schema.LABEL_SEMANTIC: blobs([_png(sample['semantic'])]),
      schema.LABEL_INSTANCE: blobs([_png(sample['instance'])]),
      schema.LABEL_DIRECTION: blobs([_png(sample['direction'])]),
      schema.LABEL_DIRECTION_BACKWARD: blobs([_png(sample['direction_backward'])]),
      schema.VECTOR_CLASS: ints(cls for cls, _ in vectors),
      schema.VECTOR_NUM_POINTS: ints(len(p) for _, p in vectors),
      schema.VECTOR_POINTS: floats(points),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_dataset_info(directory, data_config, split_files, split_sizes):
  """Writes dataset_info.json for `split_files` ({split: [file names]})."""
  info = {
      'schema_version': schema.SCHEMA_VERSION,
      'bev_x': list(data_config.bev_x),
      'bev_y': list(data_config.bev_y),
      'bev_shape': list(schema.bev_shape(data_config.bev_x, data_config.bev_y)),
      'classes': list(data_config.classes),
      'cameras': list(data_config.cameras),
      'image_size': list(data_config.image_size),
      'label_width': dataset_info.label_width_spec(data_config),
      'splits': {split: {'files': files, 'num_examples': split_sizes[split]}
                 for split, files in split_files.items()},
  }
  with open(dataset_info.info_path(directory), 'w') as f:
    json.dump(info, f, indent=2)
  return info


def write_shards(directory, data_config, *, split_sizes=None, num_shards=2, points_range=None,
                 seed=0, label_style='noise'):
  """Writes `split-0000i-of-0000n.tfrecord` shards + dataset_info.json into `directory`.

  Examples are dealt round-robin over the shards, so shard sizes differ by at most one.

  Args:
    directory: output folder (created).
    data_config: `config.data`; sets cameras, image_size, BEV canvas and classes.
    split_sizes: {split: number of examples}; default {'train': 8, 'val': 4}.
    num_shards: files per split.
    points_range: (low, high) LiDAR point counts, high exclusive; the default spans empty,
      padded and cropped clouds around data_config.max_points.
    seed: numpy seed of the random content.
    label_style: 'noise' or 'lines' rasters (see `random_sample`).

  Returns:
    {split: [sample dicts of source arrays]} in file order: shard 0 first, then shard 1, ...
  """
  split_sizes = dict(split_sizes or {'train': 8, 'val': 4})
  low, high = points_range or (0, 2 * data_config.max_points + 1)
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  samples_by_split, files_by_split, index = {}, {}, 0
  for split, size in split_sizes.items():
    samples = [random_sample(rng, data_config, index + i, int(rng.integers(low, high)),
                             label_style=label_style)
               for i in range(size)]
    index += size
    names = [f'{split}-{s:05d}-of-{num_shards:05d}.tfrecord' for s in range(num_shards)]
    in_file_order = []
    for shard, name in enumerate(names):
      with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
        for sample in samples[shard::num_shards]:
          writer.write(serialize_sample(sample))
          in_file_order.append(sample)
    samples_by_split[split], files_by_split[split] = in_file_order, names
  write_dataset_info(directory, data_config, files_by_split, split_sizes)
  return samples_by_split
