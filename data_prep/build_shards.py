"""nuScenes-format dataroot -> sharded TFRecords of `tf.train.Example`s (mapkd_jax/data/schema.py).

  python -m data_prep.build_shards --dataroot DIR --version v1.0-trainval --out SHARDS \
      [--bev 60x30] [--image-size 128x352] [--num-shards 8] [--workers 2] [--skip-bad] \
      [--osm-dir DIR/osm] [--splits train,val] [--scenes scene-0916,...] [--limit N]

Writes SHARDS/{split}-NNNNN-of-MMMMM.tfrecord and, last, SHARDS/dataset_info.json. Defaults come
from `configs/tcs.py` (config.data). Real nuScenes and the synthetic world share this code path.

Splits: `DIR/<version>/splits.json` ({split: [scene names]}) if present; else the devkit's
official split (v1.0-mini: mini_train -> train, mini_val -> val; v1.0-test: test; any other
version, e.g. v1.0-trainval or an extract: train/val). Scenes in no split go to `val` and are
listed under `unassigned_scenes` in dataset_info.json. `--scenes` keeps only the named scenes
(each in its own split; splits left without a scene are dropped); dataset_info.json records the
selection under `selected_scenes` (null: all).

Samples are read by `data_prep.nuscenes_reader`; this module splits, runs the workers (progress
bar over samples), writes shards atomically, resumes and holds the CLI. Labels and SD prior are
drawn by the reference's rule at config.data.label_thickness_ref / sd_thickness_ref (data_prep/
labels.py); dataset_info.json records it under `label_width` and the training/eval readers
refuse shards whose width differs from their config (mapkd_jax/data/dataset_info.py).

Bad input: a missing keyframe file (camera or LIDAR_TOP) raises FileNotFoundError naming the
file, channel and sample; with --skip-bad the sample is left out and listed, with the reason,
under `skipped` in dataset_info.json. Missing sweep files are counted
(`lidar_missing_sweep_files`), not an error (see nuscenes_reader). Layers absent from a map
JSON are treated as empty, logged once per location and listed under `missing_map_layers`.
Before any sample is read, the OSM skeleton of every selected location is loaded (so a missing
shapefile or a location without a map origin fails at once, naming it, even with --skip-bad)
and cached in SHARDS/_progress/osm/ for the workers and for reruns.

Resume: each shard is written to a temp file and renamed when complete, then a small record of
it lands in SHARDS/_progress/; a rerun (e.g. after kill -9) skips shards whose record matches
the current build settings and redoes the rest.
"""
import argparse
import dataclasses
import json
import logging
import multiprocessing
import os

import cv2
import numpy as np
import tqdm

from data_prep import nuscenes_reader
from mapkd_jax.data import schema

PROGRESS_DIR = '_progress'
INFO_FILENAME = 'dataset_info.json'
OSM_CACHE_DIR = 'osm'  # under PROGRESS_DIR: converted OSM skeletons (sd_prior cache)


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


# key -> (feature kind, shape of one record's value; None = any length, C = camera count).
# The one description of a record's features: `to_example` writes shards from it and
# data_prep/tfds_builder.py declares its TFDS features from it.
_PNG_KEYS = (schema.SD_PRIOR, schema.LABEL_SEMANTIC, schema.LABEL_INSTANCE,
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
  spec.update({key: ('bytes', ()) for key in _PNG_KEYS})
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
    if key in _PNG_KEYS:
      value = _png(value)
    elif kind == 'bytes':
      value = value if shape == () else list(value)
    else:
      dtype = np.float32 if kind == 'float' else np.int64
      value = np.asarray(value).astype(dtype).reshape([-1 if d is None else d for d in shape])
    out[key] = value
  return out


def example_from_features(features):
  """`tf.train.Example` of `example_features`' output, exactly as schema.py documents."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  feature = {}
  for key, value in features.items():
    if isinstance(value, bytes):
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    elif isinstance(value, list):
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=value))
    elif value.dtype == np.int64:
      feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=value.ravel().tolist()))
    else:
      # A list, not an array: protobuf copies Python floats ~5x faster than numpy scalars.
      feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=value.ravel().tolist()))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def to_example(fields):
  """`tf.train.Example` of a `read_sample` dict, exactly as schema.py documents."""
  return example_from_features(example_features(fields, len(fields[schema.CAMERA_JPEG])))


def read_record(source, token, skip_bad):
  """One sample's record features, or its skip reason: the per-sample code of every writer.

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


_SOURCES = {}  # per-process cache: (dataroot, version, options) -> nuscenes_reader.Source
_SAMPLE_COUNTER = None  # in pool workers: shared count of samples done, for the progress bar


def _get_source(dataroot, version, options, osm_cache_dir=None):
  key = (dataroot, version, options, osm_cache_dir)
  if key not in _SOURCES:
    _SOURCES[key] = nuscenes_reader.Source(dataroot, version, options,
                                           osm_cache_dir=osm_cache_dir)
  return _SOURCES[key]


def _osm_cache_dir(out_dir):
  return os.path.join(out_dir, PROGRESS_DIR, OSM_CACHE_DIR)


def write_shard(task, on_sample=None):
  """Writes one shard atomically; returns its record (also saved under _progress/).

  Args:
    task: dict(file, samples, dataroot, version, options, settings, skip_bad, out_dir).
    on_sample: called with no argument after each sample (written or skipped), for progress.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  source = _get_source(task['dataroot'], task['version'], task['options'],
                       _osm_cache_dir(task['out_dir']))
  path = os.path.join(task['out_dir'], task['file'])
  record = dict(file=task['file'], settings=task['settings'], samples=list(task['samples']),
                num_samples=0, skipped=[], missing_sweeps=0)
  with tf.io.TFRecordWriter(path + '.tmp') as writer:
    for token in task['samples']:
      features, missing_sweeps, skipped = read_record(source, token, task['skip_bad'])
      if skipped:
        record['skipped'].append(skipped)
      else:
        # deterministic: map keys sorted, so a shard is byte-reproducible across processes.
        writer.write(example_from_features(features).SerializeToString(deterministic=True))
        record['num_samples'] += 1
        record['missing_sweeps'] += missing_sweeps
      if on_sample is not None:
        on_sample()
  os.replace(path + '.tmp', path)
  record['missing_map_layers'] = {loc: names for loc, names
                                  in sorted(source.missing_map_layers.items()) if names}
  _write_json(_progress_path(task['out_dir'], task['file']), record)
  return record


def _init_worker(counter):
  global _SAMPLE_COUNTER
  _SAMPLE_COUNTER = counter


def _count_sample():
  with _SAMPLE_COUNTER.get_lock():
    _SAMPLE_COUNTER.value += 1


def _write_shard_in_worker(task):
  return write_shard(task, on_sample=_count_sample)


def _run_tasks(tasks, workers, bar, poll_seconds):
  """Shard records of `tasks`, written by `workers` processes; `bar` counts samples."""
  if workers <= 1 or len(tasks) <= 1:
    return [write_shard(task, on_sample=lambda: bar.update()) for task in tasks]
  # spawn, not fork: the caller (trainer) may hold JAX/TF threads that fork would copy.
  context = multiprocessing.get_context('spawn')
  counter = context.Value('q', 0)
  with context.Pool(min(workers, len(tasks)), initializer=_init_worker,
                    initargs=(counter,)) as pool:
    pending = pool.map_async(_write_shard_in_worker, tasks, chunksize=1)
    while not pending.ready():
      pending.wait(poll_seconds)
      bar.update(counter.value - bar.n)
    records = pending.get()  # re-raises a worker's error (e.g. a missing file) here
  bar.update(counter.value - bar.n)
  return records


def _progress_path(out_dir, file):
  return os.path.join(out_dir, PROGRESS_DIR, file + '.json')


def _write_json(path, obj):
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


def _finished(out_dir, file, settings, samples):
  """The shard's progress record if it is complete for these settings and samples, else None."""
  try:
    with open(_progress_path(out_dir, file)) as f:
      record = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  ok = (record.get('settings') == settings and record.get('samples') == list(samples)
        and os.path.isfile(os.path.join(out_dir, file)))
  return record if ok else None


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
  without a map origin fails at once, naming it (even with skip_bad). Args: see `build_shards`.
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
  source = _get_source(dataroot, version, options, osm_cache_dir)
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
  """dataset_info.json's keys that describe the build settings (all but the per-split tallies)."""
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
  """The split's tokens dealt into contiguous shards (np.array_split: the first ones longer)."""
  count = min(num_shards, max(1, len(tokens)))
  return [list(chunk) for chunk in np.array_split(np.array(tokens, dtype=object), count)]


def build_shards(dataroot, version, out_dir, *, bev_x, bev_y, image_size, num_shards, workers,
                 cameras, direction_bins, lidar_sweeps, lidar_min_range, jpeg_quality,
                 boundary_clip_margin, sd_road_classes, label_thickness_ref=None,
                 sd_thickness_ref=None, thickness_ref_step=0.15, osm_dir=None,
                 splits=None, scenes=None, skip_bad=False, limit=None, progress=True):
  """Builds (or completes) a shard directory; returns the dataset_info dict it wrote.

  Args mirror config.data (see configs/tcs.py); `osm_dir` defaults to `dataroot/osm`; `splits`
  selects split names (default: all); `scenes` selects scene names (default: all); `limit`
  keeps the first N samples of each split.
  """
  plan = plan_build(
      dataroot, version, bev_x=bev_x, bev_y=bev_y, image_size=image_size, cameras=cameras,
      direction_bins=direction_bins, lidar_sweeps=lidar_sweeps, lidar_min_range=lidar_min_range,
      jpeg_quality=jpeg_quality, boundary_clip_margin=boundary_clip_margin,
      sd_road_classes=sd_road_classes, label_thickness_ref=label_thickness_ref,
      sd_thickness_ref=sd_thickness_ref, thickness_ref_step=thickness_ref_step, osm_dir=osm_dir,
      splits=splits, scenes=scenes, limit=limit, osm_cache_dir=_osm_cache_dir(out_dir))
  for folder in (out_dir, os.path.join(out_dir, PROGRESS_DIR), _osm_cache_dir(out_dir)):
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # Leftovers of a killed run.
      if name.endswith('.tmp'):
        os.remove(os.path.join(folder, name))
  dataroot, options, settings = plan.dataroot, plan.options, plan.settings

  tasks, records, split_files = [], {}, {}
  for split, tokens in plan.split_tokens.items():
    chunks = shard_chunks(tokens, num_shards)
    split_files[split] = []
    for k, chunk in enumerate(chunks):
      file = f'{split}-{k:05d}-of-{len(chunks):05d}.tfrecord'
      split_files[split].append(file)
      done = _finished(out_dir, file, settings, chunk)
      if done:
        records[file] = done
      else:
        tasks.append(dict(file=file, samples=list(chunk), dataroot=dataroot, version=version,
                          options=options, settings=settings, skip_bad=skip_bad,
                          out_dir=out_dir))
  logging.info('%s: %d shards to write, %d already done', out_dir, len(tasks), len(records))
  bar = tqdm.tqdm(total=sum(len(t['samples']) for t in tasks), desc='samples', unit='sample',
                  disable=not progress)
  for record in _run_tasks(tasks, workers, bar, poll_seconds=0.5):
    records[record['file']] = record
  bar.close()

  info = dict(info_header(plan), splits={}, skipped=[], lidar_missing_sweep_files=0,
              unassigned_scenes=plan.unassigned, selected_scenes=plan.scenes,
              missing_map_layers={})
  for split, files in split_files.items():
    count = sum(records[f]['num_samples'] for f in files)
    info['splits'][split] = dict(num_samples=count, num_examples=count, files=files)
    for f in files:
      info['skipped'] += [dict(split=split, **s) for s in records[f]['skipped']]
      info['lidar_missing_sweep_files'] += records[f]['missing_sweeps']
      for location, names in records[f].get('missing_map_layers', {}).items():
        merged = set(info['missing_map_layers'].get(location, [])) | set(names)
        info['missing_map_layers'][location] = sorted(merged)
  info['missing_map_layers'] = dict(sorted(info['missing_map_layers'].items()))
  nuscenes_reader.warn_missing_map_layers(info['missing_map_layers'])
  _write_json(os.path.join(out_dir, INFO_FILENAME), info)
  logging.info('%s: %s; skipped %d samples; %d missing sweep files', out_dir,
               {s: v['num_samples'] for s, v in info['splits'].items()}, len(info['skipped']),
               info['lidar_missing_sweep_files'])
  return info


def _pair(text, flag):
  try:
    first, second = (int(v) for v in text.lower().split('x'))
  except ValueError as e:
    raise ValueError(f'{flag}: expected AxB, got {text!r}') from e
  return first, second


def main(argv=None):
  from configs import tcs  # pylint: disable=g-import-not-at-top
  data = tcs.get_config().data
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataroot', required=True, help='nuScenes-format root folder')
  parser.add_argument('--version', required=True, help='table folder, e.g. v1.0-trainval')
  parser.add_argument('--out', required=True, help='shard directory to create or complete')
  parser.add_argument('--bev', default=data.bev_name, help=f'one of {sorted(tcs.BEV_RANGES)}')
  parser.add_argument('--image-size', default='%dx%d' % tuple(data.image_size), help='HxW')
  parser.add_argument('--num-shards', type=int, default=data.num_shards, help='per split')
  parser.add_argument('--workers', type=int, default=data.prep_workers, help='processes')
  parser.add_argument('--skip-bad', action='store_true', help='leave out unreadable samples')
  parser.add_argument('--osm-dir', default=None, help='OSM shapefiles; default DATAROOT/osm')
  parser.add_argument('--splits', default=None, help='comma list, e.g. train,val; default all')
  parser.add_argument('--sd-road-classes', default=None,
                      help='comma list of OSM highway classes; default config.data.sd_road_classes')
  parser.add_argument('--scenes', default=None,
                      help='comma list of scene names, e.g. scene-0916; default all')
  parser.add_argument('--limit', type=int, default=None, help='first N samples per split')
  args = parser.parse_args(argv)
  if args.bev not in tcs.BEV_RANGES:
    raise ValueError(f'--bev: {args.bev!r} is not one of {sorted(tcs.BEV_RANGES)}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  bev_x, bev_y = tcs.BEV_RANGES[args.bev]
  build_shards(args.dataroot, args.version, args.out, bev_x=bev_x, bev_y=bev_y,
               image_size=_pair(args.image_size, '--image-size'), num_shards=args.num_shards,
               workers=args.workers, cameras=data.cameras,
               label_thickness_ref=data.label_thickness_ref,
               sd_thickness_ref=data.sd_thickness_ref,
               thickness_ref_step=data.thickness_ref_step, direction_bins=data.direction_bins, lidar_sweeps=data.lidar_sweeps,
               lidar_min_range=data.lidar_min_range, jpeg_quality=data.jpeg_quality,
               boundary_clip_margin=data.boundary_clip_margin,
               sd_road_classes=(args.sd_road_classes.split(',') if args.sd_road_classes
                                else data.sd_road_classes), osm_dir=args.osm_dir,
               splits=args.splits.split(',') if args.splits else None,
               scenes=args.scenes.split(',') if args.scenes else None, skip_bad=args.skip_bad,
               limit=args.limit)


if __name__ == '__main__':
  main()
