"""What one build of the records reads, and the features of each record: the per-sample code of
the `mapkd_nuscenes` builder (data_prep/tfds_builder.py), the one writer of the records, and so of
`python -m data_prep.build_shards`, its CLI.

Splits: `DIR/<version>/splits.json` ({split: [scene names]}) if present; else the devkit's
official split (v1.0-mini: mini_train -> train, mini_val -> val; v1.0-test: test; any other
version, e.g. v1.0-trainval or an extract: train/val). Scenes in no split go to `val` and are
listed under `unassigned_scenes` in the build record. A scene selection keeps only the named
scenes (each in its own split; splits left without a scene are dropped) and is recorded under
`selected_scenes` (null: all).

Samples are read by `data_prep.nuscenes_reader`; `read_record` turns one into the features of
its record (mapkd_jax/data/schema.py), rasters PNG-encoded; `record_spec` declares them.

Bad input: a missing keyframe file (camera or LIDAR_TOP) raises FileNotFoundError naming the
file, channel and sample; with skip_bad the sample is left out and its reason returned. Missing
sweep files are counted, not an error (see nuscenes_reader). Before any sample is read,
`plan_build` loads the OSM skeleton of every selected location (so a missing shapefile or a
location without a map origin fails at once, naming it, even with skip_bad).
"""
import dataclasses
import json
import os

import cv2
import numpy as np

from data_prep import nuscenes_reader
from mapkd_jax.data import schema


def scene_splits(nusc, dataroot, version):
  """({split: [scene names in table order]}, [unassigned scene names]); see module docstring."""
  path = os.path.join(dataroot, version, 'splits.json')
  if os.path.isfile(path):
    with open(path) as f:
      wanted = json.load(f)
    if not isinstance(wanted, dict) or not all(isinstance(v, list) for v in wanted.values()):
      raise ValueError(f'{path}: expected {{split: [scene names]}}')
  else:
    from nuscenes.utils import splits as devkit_splits  # pylint: disable=g-import-not-at-top
    official = devkit_splits.create_splits_scenes()
    if version == 'v1.0-mini':
      wanted = {'train': official['mini_train'], 'val': official['mini_val']}
    elif version == 'v1.0-test':
      wanted = {'test': official['test']}
    else:
      wanted = {'train': official['train'], 'val': official['val']}
  names = [scene['name'] for scene in nusc.scene]
  split_of = {name: split for split, members in wanted.items() for name in members}
  unassigned = [name for name in names if name not in split_of]
  result = {split: [n for n in names if split_of.get(n) == split] for split in wanted}
  result.setdefault('val', []).extend(unassigned)
  return result, unassigned


def split_samples(nusc, scene_names):
  """Sample tokens of the scenes, in scene order then time order."""
  by_name = {scene['name']: scene for scene in nusc.scene}
  tokens = []
  for name in scene_names:
    token = by_name[name]['first_sample_token']
    while token:
      tokens.append(token)
      token = nusc.get('sample', token)['next']
  return tokens


def select_scenes(split_scenes, wanted, known, max_listed=20):
  """{split: [scene names]} restricted to `wanted` names; splits left empty are dropped.

  Raises:
    ValueError naming --scenes and the unknown name(s), listing up to `max_listed` known ones.
  """
  unknown = [name for name in wanted if name not in known]
  if unknown:
    shown = ', '.join(known[:max_listed])
    more = f' and {len(known) - max_listed} more' if len(known) > max_listed else ''
    raise ValueError(f'--scenes: unknown scene name(s) {unknown}; known ({len(known)}): '
                     f'{shown}{more}')
  outside = [n for n in wanted if not any(n in names for names in split_scenes.values())]
  if outside:
    raise ValueError(f'--scenes: scene(s) {outside} lie outside the selected --splits '
                     f'{sorted(split_scenes)}')
  keep = set(wanted)
  selected = {split: [n for n in names if n in keep] for split, names in split_scenes.items()}
  return {split: names for split, names in selected.items() if names}


def scene_locations(nusc, scene_names):
  """Sorted map locations (log.location) of the named scenes."""
  by_name = {scene['name']: scene for scene in nusc.scene}
  return sorted({nusc.get('log', by_name[n]['log_token'])['location'] for n in scene_names})


def _png(array):
  ok, data = cv2.imencode('.png', array)
  if not ok:
    raise ValueError(f'PNG encoding failed for an array of shape {array.shape}')
  return data.tobytes()


# The one description of a record's features: data_prep/tfds_builder.py declares its TFDS
# features from it, and TFDS's serializer writes them (see `record_spec`).
PNG_KEYS = (schema.SD_PRIOR, schema.LABEL_SEMANTIC, schema.LABEL_INSTANCE,
             schema.LABEL_DIRECTION, schema.LABEL_DIRECTION_BACKWARD)


def record_spec(num_cameras):
  """{schema key: ('bytes' | 'float' | 'int', shape)} of one record; see schema.py."""
  c = num_cameras
  spec = {
      schema.SAMPLE_TOKEN: ('bytes', ()),
      schema.SCENE_TOKEN: ('bytes', ()),
      schema.CAMERA_JPEG: ('bytes', (c,)),
      schema.CAMERA_INTRINSICS: ('float', (c, 3, 3)),
      schema.CAMERA_ROTATION: ('float', (c, 3, 3)),
      schema.CAMERA_TRANSLATION: ('float', (c, 3)),
      schema.EGO_POSE: ('float', (4, 4)),
      schema.LIDAR_POINTS: ('float', (None, 5)),
      schema.VECTOR_CLASS: ('int', (None,)),
      schema.VECTOR_NUM_POINTS: ('int', (None,)),
      schema.VECTOR_POINTS: ('float', (None, 2)),
  }
  spec.update({key: ('bytes', ()) for key in PNG_KEYS})
  return spec


def example_features(fields, num_cameras):
  """The features of one record from a `read_sample` dict: rasters PNG-encoded.

  Returns:
    {schema key: value} with value shaped as `record_spec(num_cameras)[key]`: bytes (scalar
    keys), a list of bytes (cameras/jpeg), float32 or int64 numpy arrays.
  """
  out = {}
  for key, (kind, shape) in record_spec(num_cameras).items():
    value = fields[key]
    if key in PNG_KEYS:
      value = _png(value)
    elif kind == 'bytes':
      value = value if shape == () else list(value)
    else:
      dtype = np.float32 if kind == 'float' else np.int64
      value = np.asarray(value).astype(dtype).reshape([-1 if d is None else d for d in shape])
    out[key] = value
  return out


def read_record(source, token, skip_bad):
  """One sample's record features, or its skip reason: the builder's per-sample code.

  Returns:
    (features or None, missing sweep files, None or {'sample_token', 'reason'}).
  Raises:
    FileNotFoundError / ValueError of `nuscenes_reader.read_sample` unless `skip_bad`.
  """
  try:
    fields = nuscenes_reader.read_sample(source, token)
  except (FileNotFoundError, ValueError) as e:
    if not skip_bad:
      raise
    return None, 0, dict(sample_token=token, reason=str(e))
  return (example_features(fields, len(source.options.cameras)), fields['missing_sweeps'], None)


_SOURCES = {}  # per-process cache: (dataroot, version, options, osm cache) -> nuscenes_reader.Source


def get_source(dataroot, version, options, osm_cache_dir=None):
  """The `nuscenes_reader.Source` of these settings, opened once per process."""
  key = (dataroot, version, options, osm_cache_dir)
  if key not in _SOURCES:
    _SOURCES[key] = nuscenes_reader.Source(dataroot, version, options,
                                           osm_cache_dir=osm_cache_dir)
  return _SOURCES[key]


@dataclasses.dataclass
class Plan:
  """What a build reads: options, tables, and the samples of each split (in record order)."""
  dataroot: str
  version: str
  options: nuscenes_reader.BuildOptions
  source: nuscenes_reader.Source
  split_tokens: dict        # split -> [sample tokens], scene order then time order
  unassigned: list          # scene names in no split (sent to 'val')
  scenes: list = None       # the --scenes selection, None = all

  @property
  def settings(self):
    """JSON-able build settings (compared on resume)."""
    return json.loads(json.dumps(dict(dataroot=self.dataroot, version=self.version,
                                      **dataclasses.asdict(self.options))))


def plan_build(dataroot, version, *, bev_x, bev_y, image_size, cameras, direction_bins,
               lidar_sweeps, lidar_min_range, jpeg_quality, boundary_clip_margin,
               sd_road_classes, label_thickness_ref=None, sd_thickness_ref=None,
               thickness_ref_step=0.15, osm_dir=None, splits=None, scenes=None, limit=None,
               osm_cache_dir=None):
  """Opens the dataroot, selects splits/scenes and loads every selected location's OSM roads.

  The OSM skeletons are loaded before any sample is read, so a missing shapefile or a location
  without a map origin fails at once, naming it (even with skip_bad). Args mirror config.data
  (configs/tcs.py); `osm_dir` defaults to `dataroot/osm`; `splits` / `scenes` select split /
  scene names (default: all); `limit` keeps the first N samples of each split; `osm_cache_dir`
  caches the converted OSM skeletons (sd_prior) on disk.
  """
  dataroot = os.path.abspath(dataroot)
  options = nuscenes_reader.make_options(
      bev_x=bev_x, bev_y=bev_y, image_size=image_size, cameras=cameras,
      label_thickness_ref=label_thickness_ref, sd_thickness_ref=sd_thickness_ref,
      thickness_ref_step=thickness_ref_step,
      direction_bins=direction_bins,
      lidar_sweeps=lidar_sweeps, lidar_min_range=lidar_min_range,
      jpeg_quality=jpeg_quality, boundary_clip_margin=boundary_clip_margin,
      sd_road_classes=sd_road_classes, osm_dir=osm_dir or os.path.join(dataroot, 'osm'))
  source = get_source(dataroot, version, options, osm_cache_dir)
  nusc = source.nusc
  split_scenes, unassigned = scene_splits(nusc, dataroot, version)
  if splits is not None:
    unknown = [s for s in splits if s not in split_scenes]
    if unknown:
      raise ValueError(f'--splits: unknown split(s) {unknown}; known: {sorted(split_scenes)}')
    split_scenes = {s: split_scenes[s] for s in splits}
  if scenes is not None:
    split_scenes = select_scenes(split_scenes, scenes, [s['name'] for s in nusc.scene])
  if osm_cache_dir:
    os.makedirs(osm_cache_dir, exist_ok=True)
  for location in scene_locations(nusc, [n for names in split_scenes.values() for n in names]):
    source.osm_roads(location)  # Fail early, naming the location; fills the disk cache.
  split_tokens = {split: split_samples(nusc, names)[:limit]
                  for split, names in split_scenes.items()}
  return Plan(dataroot, version, options, source, split_tokens, unassigned,
              None if scenes is None else list(scenes))


def info_header(plan):
  """The build record's keys that describe the build settings (all but the per-split tallies)."""
  options = plan.options
  return dict(
      version=plan.version, dataroot=plan.dataroot, schema_version=schema.SCHEMA_VERSION,
      classes=list(schema.CLASSES), cameras=list(options.cameras),
      image_size=list(options.image_size),
      bev=dict(x_range=list(options.bev_x[:2]), y_range=list(options.bev_y[:2]),
               resolution=[options.bev_x[2], options.bev_y[2]],
               shape=list(schema.bev_shape(options.bev_x, options.bev_y))),
      bev_x=list(options.bev_x), bev_y=list(options.bev_y),
      bev_shape=list(schema.bev_shape(options.bev_x, options.bev_y)),
      label_width=nuscenes_reader.label_width_spec(options),
      direction_bins=options.direction_bins,
      lidar_sweeps=options.lidar_sweeps, lidar_min_range=options.lidar_min_range,
      sd_prior=dict(osm_dir=options.osm_dir, road_classes=list(options.sd_road_classes)))


def shard_chunks(tokens, num_shards):
  """The split's tokens dealt into contiguous chunks (np.array_split: the first ones longer).

  A chunk is the unit of resume and of parallel generation, and the readers' unit of per-host
  splitting and file shuffling (metadata `shard_sizes`; mapkd_jax/data/tfds_source.py).
  """
  count = min(num_shards, max(1, len(tokens)))
  return [list(chunk) for chunk in np.array_split(np.array(tokens, dtype=object), count)]


def write_json(path, obj):
  """Writes `obj` as JSON atomically (a temp file renamed over `path`)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)
