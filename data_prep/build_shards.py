"""nuScenes-format dataroot -> a prepared `mapkd_nuscenes` TFDS dataset: the builder's CLI.

  python -m data_prep.build_shards --dataroot DIR --version v1.0-trainval --out SHARDS \
      [--bev 60x30] [--image-size 128x352] [--num-shards 8] [--workers 2] [--skip-bad] \
      [--osm-dir DIR/osm] [--splits train,val] [--scenes scene-0916,...] [--limit N]

A thin CLI over data_prep/tfds_builder.py, the one writer of the records (issue 17): the
builder's per-sample code (data_prep/build_plan.py) reads the samples, TFDS's writer writes
the records. Defaults come from `configs/tcs.py` (config.data). Real nuScenes and the synthetic
world share this code path; the splits, scene selection and bad-input rules are build_plan's.

SHARDS holds (training, evaluation and the demo read it through mapkd_jax/data/tfds_source.py):
  mapkd_nuscenes/<config>/2.0.0/   the TFDS dataset (its own dataset_info.json, features.json,
                                   metadata.json and record files); <config> is the name of the
                                   tfds_builder config these flags equal (e.g. tiny), else custom
  dataset_info.json                written last: the build record (the builder's metadata:
                                   label_width, bev, skipped, ...; mapkd_jax/data/dataset_info.py)
                                   plus `tfds_dir` (the folder above, relative) and per split
                                   `num_samples` and `files` (its record files, relative)
  _progress/                       chunk records, the OSM cache (osm/) and, during a build,
                                   the chunks' features (deleted once the build is complete)

Bad input: a missing keyframe file (camera or LIDAR_TOP) raises FileNotFoundError naming the
file, channel and sample; with --skip-bad the sample is left out and listed, with the reason,
under `skipped`. Missing sweep files are counted (`lidar_missing_sweep_files`), not an error.
Layers absent from a map JSON are treated as empty, logged once per location and listed under
`missing_map_layers`. Before any sample is read, the OSM skeleton of every selected location is
loaded (so a missing shapefile or a location without a map origin fails at once, naming it,
even with --skip-bad) and cached in SHARDS/_progress/osm/ for the workers and for reruns. A
split whose samples are all skipped is refused, naming it (TFDS writes no empty split; before
issue 17 this wrote empty files); a split without a scene is listed with no file.

Resume: each chunk of a split (config.num_shards per split, np.array_split of its samples) is
read into a file under _progress/ that is renamed when complete, then a small record of it
lands beside it; a rerun (e.g. after kill -9) reuses the chunks whose record matches the
current build settings and samples, reads the rest, and TFDS writes the records again (cheap
next to reading the samples). A complete build whose plan (settings, samples, skip_bad) differs
from this run's is deleted first; an equal one is kept as it is. A folder build_shards wrote
before issue 17 (its own TFRecord files) is still read as it is; a rerun into it deletes those
files. TFDS does not serialize in a deterministic map order: two builds give records equal
when parsed, not always byte-equal files (build_shards' own writer did).
"""
import argparse
import glob
import json
import logging
import os
import shutil

from data_prep import build_plan
from data_prep import nuscenes_reader
from data_prep import tfds_builder

PROGRESS_DIR = '_progress'
INFO_FILENAME = 'dataset_info.json'
OSM_CACHE_DIR = 'osm'        # under PROGRESS_DIR: converted OSM skeletons (sd_prior cache)
CHUNKS_DIR = 'chunks'        # under PROGRESS_DIR: the builder's chunk files and records
CUSTOM_CONFIG = 'custom'     # builder config name when the flags equal no registered config


def _config(data):
  """The builder config of these settings: a registered one's name when they equal it."""
  config = tfds_builder.config_from_data(CUSTOM_CONFIG, data, 'data_prep.build_shards flags')
  for known in tfds_builder.MapkdNuscenes.BUILDER_CONFIGS:
    if all(getattr(known, k) == getattr(config, k) for k in tfds_builder._DATA_KEYS):  # pylint: disable=protected-access
      return known
  return config


def _clean(out_dir, data_path):
  """Removes what a killed run leaves: temp files and TFDS's incomplete folders."""
  for folder in (os.path.join(out_dir, PROGRESS_DIR, name) for name in (CHUNKS_DIR, OSM_CACHE_DIR)):
    for path in glob.glob(os.path.join(folder, '*.tmp')):
      os.remove(path)
  # TFDS writes into <config>/incomplete.* and renames it to the version folder when done.
  for path in glob.glob(os.path.join(os.path.dirname(data_path), 'incomplete.*')):
    shutil.rmtree(path)
  if os.path.isfile(os.path.join(out_dir, INFO_FILENAME) + '.tmp'):
    os.remove(os.path.join(out_dir, INFO_FILENAME) + '.tmp')


def _stale(path, wanted):
  """True when the JSON file `path` (a build's metadata.json or dataset_info.json) exists but
  records another plan than `wanted` (or cannot be read)."""
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      return json.load(f).get('plan') != wanted
  except (OSError, ValueError, AttributeError):
    return True


def _remove_legacy_shards(out_dir, info_path):
  """Deletes the shard files and progress records build_shards wrote here before issue 17 (its
  own writer: files directly in SHARDS, listed in dataset_info.json)."""
  try:
    with open(info_path) as f:
      splits = json.load(f).get('splits') or {}
    names = [n for entry in splits.values() for n in entry.get('files', []) if os.sep not in n]
  except (OSError, ValueError, AttributeError):
    return
  for name in names:
    for path in (os.path.join(out_dir, name), os.path.join(out_dir, PROGRESS_DIR, name + '.json')):
      if os.path.isfile(path):
        os.remove(path)


def _drop_stale(out_dir, data_path, wanted):
  """Deletes what records another plan: dataset_info.json (first, so that no reader takes the
  folder for complete), the TFDS folder of this config, those of other configs (SHARDS holds
  one build, as build_shards' files did before)."""
  info_path = os.path.join(out_dir, INFO_FILENAME)
  if _stale(info_path, wanted):
    _remove_legacy_shards(out_dir, info_path)
    os.remove(info_path)
  if os.path.exists(data_path) and _stale(os.path.join(data_path, 'metadata.json'), wanted):
    logging.info('%s: holds a build of other settings or samples; deleting it', data_path)
    shutil.rmtree(data_path)
  version = os.path.basename(data_path)
  for other in glob.glob(os.path.join(out_dir, tfds_builder.NAME, '*', version)):
    if os.path.abspath(other) != os.path.abspath(data_path):
      logging.info('%s: a build of another builder config; deleting it', other)
      shutil.rmtree(other)


def build_shards(dataroot, version, out_dir, *, bev_x, bev_y, image_size, num_shards, workers,
                 cameras, direction_bins, lidar_sweeps, lidar_min_range, jpeg_quality,
                 boundary_clip_margin, sd_road_classes, label_thickness_ref=None,
                 sd_thickness_ref=None, thickness_ref_step=0.15, osm_dir=None,
                 splits=None, scenes=None, skip_bad=False, limit=None, progress=True):
  """Builds (or completes) SHARDS with the TFDS builder; returns the dataset_info dict it wrote.

  Args mirror config.data (see configs/tcs.py); `osm_dir` defaults to `dataroot/osm`; `splits`
  selects split names (default: all); `scenes` selects scene names (default: all); `limit`
  keeps the first N samples of each split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data = dict(bev_x=bev_x, bev_y=bev_y, image_size=image_size, cameras=cameras,
              label_thickness_ref=label_thickness_ref, sd_thickness_ref=sd_thickness_ref,
              thickness_ref_step=thickness_ref_step, direction_bins=direction_bins,
              lidar_sweeps=lidar_sweeps, lidar_min_range=lidar_min_range,
              jpeg_quality=jpeg_quality, boundary_clip_margin=boundary_clip_margin,
              sd_road_classes=sd_road_classes, num_shards=num_shards)
  progress_dir = os.path.join(out_dir, PROGRESS_DIR)
  chunk_dir = os.path.join(progress_dir, CHUNKS_DIR)
  osm_cache_dir = os.path.join(progress_dir, OSM_CACHE_DIR)
  for folder in (out_dir, progress_dir, chunk_dir, osm_cache_dir):
    os.makedirs(folder, exist_ok=True)
  builder = tfds_builder.MapkdNuscenes(
      config=_config(data), data_dir=out_dir, nuscenes_version=version, osm_dir=osm_dir,
      scenes=scenes, splits=splits, skip_bad=skip_bad, limit=limit, workers=workers,
      progress_dir=chunk_dir, osm_cache_dir=osm_cache_dir, progress=progress)
  data_path = os.fspath(builder.data_path)
  _clean(out_dir, data_path)
  plan = builder.plan(os.path.abspath(dataroot))   # fails early: splits, scenes, OSM
  _drop_stale(out_dir, data_path, tfds_builder.plan_record(plan, skip_bad))
  builder.download_and_prepare(
      download_dir=os.path.join(progress_dir, 'downloads'),   # TFDS makes it; nothing lands there
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(dataroot),
                                                   try_download_gcs=False))
  for path in glob.glob(os.path.join(chunk_dir, '*' + tfds_builder.CHUNK_SUFFIX)):
    os.remove(path)   # the records hold them now; the chunk records stay (small)

  built = tfds.builder_from_directory(data_path)
  info = dict(built.info.metadata)
  info['tfds_dir'] = os.path.relpath(data_path, out_dir)
  for split, entry in info['splits'].items():
    names = built.info.splits[split].filenames if split in built.info.splits else []
    entry.update(num_samples=entry['num_examples'],
                 files=[os.path.relpath(os.path.join(data_path, n), out_dir) for n in names])
  nuscenes_reader.warn_missing_map_layers(info['missing_map_layers'])
  build_plan.write_json(os.path.join(out_dir, INFO_FILENAME), info)
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
  parser.add_argument('--num-shards', type=int, default=data.num_shards,
                      help="chunks per split: the unit of resume, of the workers and of the "
                           "readers' per-host split (TFDS sizes its own files)")
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
