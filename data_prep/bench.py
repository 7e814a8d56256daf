"""Data-prep throughput of the TFDS builder and its CLI build_shards on this machine.

  python -m data_prep.bench [--dataroot DIR --version V --osm-dir DIR] [--workers 2]

Prints these figures at config.data's image size and BEV range:
  1. per-process steady state: samples/s of read_record + TFDS's Example serialization (the
     builder's per-sample work and its writer's encoding; no start-up),
  2. end to end: `build_shards` into a temp dir with --workers processes, wall clock including
     process start-up and NuScenes/map/OSM loading, samples written / s,
  3. end to end in this process: `build_shards` with one worker (the builder through chunk
     files, for resume), then the TFDS builder (data_prep/tfds_builder.py) `download_and_prepare`
     streaming (no chunk files), same settings and samples, both into temp dirs,
  4. the same with Apache Beam's DirectRunner (--beam-workers processes), when apache-beam
     is installed (not by .ci/install: see pyproject.toml); otherwise it says so.
Defaults to the real nuScenes fragment in /work/shared/realdata (10 readable keyframes).
"""
import argparse
import os
import tempfile
import time

from data_prep import build_plan
from data_prep import build_shards
from data_prep import nuscenes_reader

# The project's shared/ folder lies beside the repository checkout.
_REALDATA = os.path.normpath(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'realdata'))
DEFAULT_ROOT = os.path.join(_REALDATA, 'nuscenes_scene0916_subset')
DEFAULT_VERSION = 'v1.0-mini-extract'
DEFAULT_OSM = os.path.join(_REALDATA, 'osm')


def _builder_kwargs(data, osm_dir):
  return dict(bev_x=data.bev_x, bev_y=data.bev_y, image_size=data.image_size,
              cameras=data.cameras, label_thickness_ref=data.label_thickness_ref,
              sd_thickness_ref=data.sd_thickness_ref, thickness_ref_step=data.thickness_ref_step,
              direction_bins=data.direction_bins, lidar_sweeps=data.lidar_sweeps,
              lidar_min_range=data.lidar_min_range, jpeg_quality=data.jpeg_quality,
              boundary_clip_margin=data.boundary_clip_margin,
              sd_road_classes=data.sd_road_classes, osm_dir=osm_dir)


def steady_state(dataroot, version, tokens, options, repeats):
  """samples/s of reading + serializing `tokens` `repeats` times in this process (warm caches)."""
  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top
  source = nuscenes_reader.Source(dataroot, version, options)
  features = tfds_builder.tfds_features(len(options.cameras))

  def one(token):
    record = build_plan.read_record(source, token, skip_bad=False)[0]
    return features.serialize_example(tfds_builder._unnest(record))  # pylint: disable=protected-access

  one(tokens[0])
  start = time.perf_counter()
  for _ in range(repeats):
    for token in tokens:
      one(token)
  return repeats * len(tokens) / (time.perf_counter() - start)


def tfds_build(dataroot, version, data, osm_dir, beam_workers=None):
  """(samples written, wall seconds) of the TFDS builder into a temp dir; Beam if beam_workers."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top
  config = tfds_builder.config_from_data('bench', data, 'data_prep.bench: config.data')
  download = dict(manual_dir=os.path.abspath(dataroot))
  if beam_workers:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
    download['beam_options'] = pipeline_options.PipelineOptions(
        ['--runner=DirectRunner', f'--direct_num_workers={beam_workers}',
         '--direct_running_mode=multi_processing'])
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    builder = tfds_builder.MapkdNuscenes(config=config, data_dir=out, nuscenes_version=version,
                                         osm_dir=osm_dir, skip_bad=True, progress=False)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**download))
    wall = time.perf_counter() - start
    written = sum(split.num_examples for split in builder.info.splits.values())
  return written, wall


def main(argv=None):
  from configs import tcs  # pylint: disable=g-import-not-at-top
  data = tcs.get_config().data
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataroot', default=DEFAULT_ROOT)
  parser.add_argument('--version', default=DEFAULT_VERSION)
  parser.add_argument('--osm-dir', default=DEFAULT_OSM)
  parser.add_argument('--workers', type=int, default=data.prep_workers)
  parser.add_argument('--repeats', type=int, default=3, help='passes for the steady state')
  parser.add_argument('--beam-workers', type=int, default=data.prep_workers,
                      help='DirectRunner processes for the Beam figure')
  args = parser.parse_args(argv)
  kwargs = _builder_kwargs(data, args.osm_dir)
  options = nuscenes_reader.make_options(**kwargs)
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    info = build_shards.build_shards(args.dataroot, args.version, out,
                                     num_shards=args.workers, workers=args.workers,
                                     skip_bad=True, progress=False, **kwargs)
    wall = time.perf_counter() - start
  written = sum(s['num_samples'] for s in info['splits'].values())
  skipped = {s['sample_token'] for s in info['skipped']}
  nusc = nuscenes_reader.open_nuscenes(os.path.abspath(args.dataroot), args.version)
  tokens = [s['token'] for s in nusc.sample if s['token'] not in skipped]
  rate = steady_state(os.path.abspath(args.dataroot), args.version, tokens, options, args.repeats)
  print(f'image_size={tuple(data.image_size)} bev={data.bev_name} '
        f'sweeps={data.lidar_sweeps} dataroot={args.dataroot}')
  print(f'steady state, 1 process: {rate:.1f} samples/s '
        f'({len(tokens)} samples x {args.repeats} passes)')
  print(f'end to end, {args.workers} workers: {written} samples in {wall:.1f} s = '
        f'{written / wall:.2f} samples/s (includes process start-up, TF import, table/map '
        f'loading and {len(skipped)} skipped samples)')
  # Like for like with TFDS's generator path: one process, this one (TF already imported).
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    info = build_shards.build_shards(args.dataroot, args.version, out, num_shards=data.num_shards,
                                     workers=1, skip_bad=True, progress=False, **kwargs)
    wall = time.perf_counter() - start
  written = sum(s['num_samples'] for s in info['splits'].values())
  print(f'build_shards, 1 process (this one): {written} samples in {wall:.1f} s = '
        f'{written / wall:.2f} samples/s (includes table/map/OSM loading, skipped samples, '
        f'chunk files, TFDS writing)')
  written, wall = tfds_build(args.dataroot, args.version, data, args.osm_dir)
  print(f'TFDS builder, 1 process (this one): {written} samples in {wall:.1f} s = '
        f'{written / wall:.2f} samples/s (same, streamed: no chunk files)')
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('TFDS builder, Beam DirectRunner: not measured: apache-beam is not installed '
          '(pip install -e ".[beam]")')
  else:
    written, wall = tfds_build(args.dataroot, args.version, data, args.osm_dir,
                               beam_workers=args.beam_workers)
    print(f'TFDS builder, Beam DirectRunner x{args.beam_workers}: {written} samples in '
          f'{wall:.1f} s = {written / wall:.2f} samples/s')


if __name__ == '__main__':
  main()
