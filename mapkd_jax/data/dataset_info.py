"""`dataset_info.json`: what a shard directory holds, checked against `config.data`.

The file sits next to the shards and is written once by the shard builder:

  {
    "schema_version": 2,
    "bev_x": [min, max, step], "bev_y": [min, max, step], "bev_shape": [H, W],
    "classes": ["divider", "ped_crossing", "boundary"],
    "cameras": ["CAM_FRONT_LEFT", ...],
    "image_size": [H, W],
    "label_width": {"rule": "reference_cv2", "thickness_ref_step": 0.15,
                    "label_thickness_ref": 5, "sd_thickness_ref": 5, ...},
    "splits": {"train": {"files": ["train-00000-of-00008.tfrecord", ...],
                         "num_examples": 123}, ...}
  }

`splits[split].files` are file names relative to the directory, in a fixed order; a file
name ending in `.gz` is read as a GZIP-compressed TFRecord. `python -m data_prep.build_shards`
(issue 17: a CLI over the TFDS builder) writes this record beside the builder's TFDS folder and
adds `tfds_dir` (that folder, relative) and per split `shard_sizes`; its `files` are then the
TFDS record files, and the readers read the folder through mapkd_jax/data/tfds_source.py.

Label width (issue 15): labels and the SD prior are drawn as the reference draws them,
`cv2.polylines(..., thickness)` on int32-truncated pixel vertices (data_prep/labels.py), with
the thickness given once in reference pixels of 0.15 m (`config.data.label_thickness_ref`,
HDMapNet's `thickness` 5; `sd_thickness_ref`, P-MapNet's `sd_thickness` 5) and converted so
that other steps draw the same metres (`thickness_px`). Shards and checkpoints built before
that drew exact-width lines (`line_width_px` pixels wide at any step); `label_width_of` names
either rule so that shards, configs and checkpoint metas can be compared.
"""
import json
import math
import os

import numpy as np

from mapkd_jax.data import schema

INFO_FILENAME = 'dataset_info.json'
# A prepared TFDS folder (data_prep/tfds_builder.py): TFDS's own files beside its dataset_info.json.
TFDS_FEATURES_FILENAME = 'features.json'
TFDS_METADATA_FILENAME = 'metadata.json'
# Relative tolerance when comparing BEV ranges: JSON round trips floats exactly, but a config
# may spell 0.15 as 3 / 20.
_RANGE_RTOL = 1e-9
# HDMapNet's overlap filter draws each class `thickness + 4` wide (reference pixels) and erases
# the earlier classes under it (data_prep/labels.py).
FILTER_EXTRA_REF = 4
# The old exact-width rule's width when a config or checkpoint meta names none.
LEGACY_LINE_WIDTH_PX = 5
# Bias of the half-up rounding in `thickness_px`, so that 2.4999999999999996 (0.75 / 0.3 in
# floating point) rounds like the exact 2.5.
_ROUND_EPS = 1e-9


def info_path(shards_dir):
  return os.path.join(shards_dir, INFO_FILENAME)


def load_dataset_info(shards_dir):
  """Reads the build record of a shard directory or of a prepared TFDS dataset folder.

  A shard directory's record is its `dataset_info.json`. A folder that data_prep/tfds_builder.py
  prepared holds TFDS's own dataset_info.json (with features.json beside it) and the same build
  record in TFDS's `metadata.json`; that one is returned, each split's `num_samples` filled from
  its `num_examples`, so that the trainer, evaluation and the frozen cache read either source.

  Raises:
    FileNotFoundError: naming the missing directory or file.
    ValueError: naming the file when it is not valid JSON.
  """
  if not os.path.isdir(shards_dir):
    raise FileNotFoundError(f'shard directory {shards_dir!r} does not exist (config.data.shards)')
  path = info_path(shards_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing; the shard builder writes it next to the shards')
  tfds_folder = os.path.isfile(os.path.join(shards_dir, TFDS_FEATURES_FILENAME))
  if tfds_folder:
    path = os.path.join(shards_dir, TFDS_METADATA_FILENAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: missing; data_prep/tfds_builder.py writes the build '
                              f'record there')
  with open(path) as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e
  if tfds_folder:
    for split in (info.get('splits') or {}).values():
      if isinstance(split, dict) and 'num_examples' in split:
        split.setdefault('num_samples', split['num_examples'])
  return info


def thickness_px(thickness_ref, ref_step, bev_x, bev_y):
  """cv2 thickness on this canvas that draws the metres `thickness_ref` draws at `ref_step`.

  thickness_px = max(1, floor(thickness_ref * ref_step / step + 0.5)), step = sqrt(rx * ry):
  a non-square pixel (240x60: 0.6 x 0.3 m) counts as the square pixel of the same area, since
  cv2 draws round caps and the same pixel half-width across and along. With the reference's 5
  at 0.15 m: 0.15 m -> 5 (7 px = 1.05 m across; cv2 thickness t > 1 covers t + 2 px when t is
  odd, t + 1 when even), 0.3 m -> 3 (5 px = 1.5 m), 0.6 m -> 1 (a 1-px 8-connected line,
  0.6 m), 0.6 x 0.3 m -> 2 (3 px: 1.8 m along x, 0.9 m along y). The reference itself keeps
  5 px at every step (P-MapNet's 120 m / 240 m configs); this project draws the same metres.

  Raises:
    ValueError: a non-positive thickness or step.
  """
  if int(thickness_ref) != thickness_ref or thickness_ref < 1:
    raise ValueError(f'label thickness must be an integer >= 1 (config.data.label_thickness_ref'
                     f' / sd_thickness_ref), got {thickness_ref!r}')
  if not ref_step > 0 or not bev_x[2] > 0 or not bev_y[2] > 0:
    raise ValueError(f'steps must be > 0: thickness_ref_step {ref_step!r}, bev_x {bev_x!r}, '
                     f'bev_y {bev_y!r}')
  step = math.sqrt(float(bev_x[2]) * float(bev_y[2]))
  return max(1, int(math.floor(thickness_ref * ref_step / step + 0.5 + _ROUND_EPS)))


def label_width_spec(data_config):
  """The `label_width` record of dataset_info.json for a `config.data` (see module docstring).

  Returns:
    {'rule': 'reference_cv2', 'thickness_ref_step', 'label_thickness_ref', 'sd_thickness_ref',
     and the cv2 thicknesses on this canvas: 'label_thickness_px', 'filter_thickness_px',
     'sd_thickness_px'}.
  """
  for key in ('label_thickness_ref', 'sd_thickness_ref', 'thickness_ref_step'):
    if key not in data_config:
      raise ValueError(f'config.data has no {key!r} (configs/tcs.py defines it)')
  step = float(data_config['thickness_ref_step'])
  bev_x, bev_y = tuple(data_config['bev_x']), tuple(data_config['bev_y'])
  label, sd = int(data_config['label_thickness_ref']), int(data_config['sd_thickness_ref'])
  return {
      'rule': 'reference_cv2', 'thickness_ref_step': step,
      'label_thickness_ref': label, 'sd_thickness_ref': sd,
      'label_thickness_px': thickness_px(label, step, bev_x, bev_y),
      'filter_thickness_px': thickness_px(label + FILTER_EXTRA_REF, step, bev_x, bev_y),
      'sd_thickness_px': thickness_px(sd, step, bev_x, bev_y),
  }


def _get(mapping, key):
  try:
    return mapping[key] if key in mapping else None
  except TypeError:
    return None


def label_width_of(config_or_meta):
  """The label-width rule of a config, `config.data`, checkpoint meta or dataset_info, as text.

  Accepts the full config (`.data`), a checkpoint `meta` ({'config': {...}}, as the trainer
  saves it), a `config.data` section (ConfigDict or dict) or a dataset_info dict. Those without
  the issue-15 keys predate it: they drew exact-width lines, `line_width_px` (default 5) px
  wide at their own step, for labels and SD prior alike.

  Returns:
    e.g. 'reference cv2 thickness 5 (labels) / 5 (SD prior) at 0.15 m' or
    'exact 5 px (labels and SD prior; before issue 15)'. Equal strings = equal rasters.
  """
  section = config_or_meta
  for key in ('config', 'data'):
    inner = _get(section, key)
    if inner is not None and hasattr(inner, 'keys'):
      section = inner
  spec = _get(section, 'label_width')
  if spec is not None:   # dataset_info.json
    section = spec
  label = _get(section, 'label_thickness_ref')
  if label is not None:
    sd = _get(section, 'sd_thickness_ref')
    step = _get(section, 'thickness_ref_step')
    return (f'reference cv2 thickness {int(label)} (labels) / {int(sd)} (SD prior) at '
            f'{float(step):g} m')
  width = _get(section, 'line_width_px')
  width = LEGACY_LINE_WIDTH_PX if width is None else int(width)
  return f'exact {width} px (labels and SD prior; before issue 15)'


def _require(info, key, path):
  if key not in info:
    raise ValueError(f'{path}: key {key!r} missing')
  return info[key]


def check_dataset_info(info, data_config, shards_dir):
  """Raises ValueError when the shards were built for another `config.data`.

  Compares schema_version, BEV x/y ranges and canvas shape, classes, cameras, image_size and
  the label width (`label_width_of`; shards without a `label_width` record predate issue 15).
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
  found_width, wanted_width = label_width_of(info), label_width_of(data_config)
  if found_width != wanted_width:
    raise ValueError(f'{path}: label width is {found_width!r} in the shards of {shards_dir!r} but '
                     f'{wanted_width!r} in config.data (label_thickness_ref, sd_thickness_ref, '
                     f'thickness_ref_step); rebuild the shards or fix the config')


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
