"""`dataset_info.json`: what a shard directory holds, checked against `config.data`.

The file sits next to the shards and is written once by the shard builder:

  {
    "schema_version": 1,
    "bev_x": [min, max, step], "bev_y": [min, max, step], "bev_shape": [H, W],
    "classes": ["divider", "ped_crossing", "boundary"],
    "cameras": ["CAM_FRONT_LEFT", ...],
    "image_size": [H, W],
    "splits": {"train": {"files": ["train-00000-of-00008.tfrecord", ...],
                         "num_examples": 123}, ...}
  }

`splits[split].files` are file names relative to the directory, in a fixed order; a file
name ending in `.gz` is read as a GZIP-compressed TFRecord.
"""
import json
import os

import numpy as np

from mapkd_jax.data import schema

INFO_FILENAME = 'dataset_info.json'
# Relative tolerance when comparing BEV ranges: JSON round trips floats exactly, but a config
# may spell 0.15 as 3 / 20.
_RANGE_RTOL = 1e-9


def info_path(shards_dir):
  return os.path.join(shards_dir, INFO_FILENAME)


def load_dataset_info(shards_dir):
  """Reads `shards_dir/dataset_info.json`.

  Raises:
    FileNotFoundError: naming the missing directory or file.
    ValueError: naming the file when it is not valid JSON.
  """
  if not os.path.isdir(shards_dir):
    raise FileNotFoundError(f'shard directory {shards_dir!r} does not exist (config.data.shards)')
  path = info_path(shards_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing; the shard builder writes it next to the shards')
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e


def _require(info, key, path):
  if key not in info:
    raise ValueError(f'{path}: key {key!r} missing')
  return info[key]


def check_dataset_info(info, data_config, shards_dir):
  """Raises ValueError when the shards were built for another `config.data`.

  Compares schema_version, BEV x/y ranges and canvas shape, classes, cameras and image_size.
  The message names the key, both values and the dataset_info.json path.
  """
  path = info_path(shards_dir)

  def mismatch(key, found, wanted):
    return ValueError(f'{path}: {key} is {found!r} in the shards but {wanted!r} in '
                      f'config.data ({key}); rebuild the shards or fix the config')

  version = _require(info, 'schema_version', path)
  if version != schema.SCHEMA_VERSION:
    raise ValueError(f'{path}: schema_version is {version!r} in the shards but the reader '
                     f'expects {schema.SCHEMA_VERSION} (mapkd_jax/data/schema.py)')
  for key in ('bev_x', 'bev_y'):
    found = tuple(float(v) for v in _require(info, key, path))
    wanted = tuple(float(v) for v in data_config[key])
    if len(found) != 3 or not np.allclose(found, wanted, rtol=_RANGE_RTOL, atol=0.0):
      raise mismatch(key, found, wanted)
  found_shape = tuple(int(v) for v in _require(info, 'bev_shape', path))
  wanted_shape = schema.bev_shape(data_config.bev_x, data_config.bev_y)
  if found_shape != wanted_shape:
    raise mismatch('bev_shape', found_shape, wanted_shape)
  for key in ('classes', 'cameras'):
    found = tuple(_require(info, key, path))
    wanted = tuple(data_config[key])
    if found != wanted:
      raise mismatch(key, found, wanted)
  found_size = tuple(int(v) for v in _require(info, 'image_size', path))
  wanted_size = tuple(int(v) for v in data_config.image_size)
  if found_size != wanted_size:
    raise mismatch('image_size', found_size, wanted_size)


def split_files(info, shards_dir, split):
  """Absolute paths of the shard files of `split`, in the order dataset_info lists them.

  Raises:
    ValueError: the split is not in dataset_info.json (naming the known splits).
    FileNotFoundError: a listed shard file is missing (naming it).
  """
  path = info_path(shards_dir)
  splits = _require(info, 'splits', path)
  if split not in splits:
    raise ValueError(f'{path}: no split {split!r}; known: {sorted(splits)}')
  names = splits[split].get('files') if isinstance(splits[split], dict) else None
  if not names:
    raise ValueError(f'{path}: splits[{split!r}].files is missing or empty')
  files = [os.path.join(shards_dir, name) for name in names]
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f'{file}: listed in {path} (split {split!r}) but missing')
  return files
