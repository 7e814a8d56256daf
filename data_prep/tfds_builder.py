"""nuScenes-MapKD as a TFDS dataset (`mapkd_nuscenes`): the shard records, built by TFDS.

  # Locally (one process), the tiny config of configs/tcs.py, from the synthetic world:
  python -m data_prep.tfds_builder 'mapkd_nuscenes/nuscenes_version=v1.0-synthetic' \
      --config tiny --manual_dir WORKDIR/data/world --data_dir ~/tensorflow_datasets
  # Real nuScenes at the reference canvas, OSM beside it, bad samples left out and listed
  # (needs apache-beam; `tfds build --imports data_prep.tfds_builder` takes the same flags):
  python -m data_prep.tfds_builder \
      'mapkd_nuscenes/nuscenes_version=v1.0-trainval,skip_bad=True' --config ref_60x30 \
      --manual_dir /mnt/nuscenes --data_dir gs://bucket/tfds \
      --beam_pipeline_options='runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,extra_package=dist/mapkd_jax-0.1.0.tar.gz'
  # The samples are read with os.path and nuscenes-devkit (not tf.io.gfile), so --manual_dir
  # must be a path every Beam worker sees (e.g. a GCS FUSE or NFS mount on Dataflow / Spark /
  # Flink workers); the workers need this package (extra_package: `python -m build --sdist`).

`python -m data_prep.tfds_builder` is `tfds build` (same flags) with this builder registered:
tensorflow-datasets 4.9.10's `tfds` command imports apache_beam at start, so it needs the
apache-beam even for a local build (see `main`).

Builder options (`mapkd_nuscenes/k=v,k=v` with the config in --config: the CLI reads a name
with two '/' as a script path; or `tfds.builder(..., k=v)` / `MapkdNuscenes(..., k=v)`):
  nuscenes_version  the table folder under --manual_dir (default v1.0-trainval)
  osm_dir           OSM shapefiles (default MANUAL_DIR/osm; a path holds '/', so from the
                    command line put or link them at MANUAL_DIR/osm instead)
  scenes            scene names joined by '+' (default all), as build_shards --scenes
  splits            split names joined by '+' (default all), as build_shards --splits
  skip_bad          leave out unreadable samples and list them (default False)
  limit             first N samples per split (default all)

One code path: the splits, scene selection and OSM loading are `build_shards.plan_build`, each
example is `build_shards.read_record` (nuscenes_reader.read_sample -> example_features), and the
features are declared from `build_shards.record_spec`. TFDS serializes them to
`tf.train.Example`s with the schema's keys and encodings (nested feature dicts flatten to
'cameras/jpeg', ...; PNG/JPEG bytes are stored as bytes, not re-encoded), so a record parses
to the same proto as build_shards' record of the sample (tests/test_tfds_builder.py).

Order: `disable_shuffling`, keys = the sample's index in its split (scene order then time order),
so the records come in build_shards' order. build_shards' grouping into files (np.array_split of
the split's planned samples into config.num_shards) is recorded under metadata
`splits/<split>/shard_sizes`; mapkd_jax/data/tfds_source.py reads it back to give the batches
pipeline.py gives for the same seed. The rest of metadata.json is build_shards'
dataset_info.json (label_width, bev, skipped, ...) plus `skip_bad`.

Beam: with a DownloadConfig `beam_runner` / `beam_options` (`tfds build
--beam_pipeline_options`) the examples are a Beam PTransform (the `[beam]` extra; tested with
the DirectRunner). The workers cannot send back what they skipped, so with Beam the driver
checks every sample's keyframe files first (missing ones are skipped and listed with build_shards' message, or raise
naming the file without skip_bad) and counts missing sweep files; a sample that fails later
fails the pipeline. Without Beam, samples are read in this process exactly as build_shards'
workers read them.
"""
import dataclasses
import logging
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_prep import build_shards
from data_prep import nuscenes_reader
from mapkd_jax.data import schema

NAME = 'mapkd_nuscenes'
_DTYPES = {'bytes': tf.string, 'float': tf.float32, 'int': tf.int64}

_DESCRIPTION = """\
nuScenes keyframes prepared for MapKD (Teacher-Coach-Student cross-modal distillation for
online HD map construction; HDMapNet / P-MapNet lineage): six camera JPEGs resized to the
config's image size with intrinsics/extrinsics, multi-sweep LiDAR in the keyframe's ego frame,
the P-MapNet SD-map prior rasterized from OpenStreetMap, HDMapNet semantic / instance /
direction label rasters and the ego-frame map polylines (mapkd_jax/data/schema.py).
"""

_CITATION = """\
@article{yan2025mapkd,
  title={MapKD: Unlocking Prior Knowledge with Cross-Modal Distillation for Efficient Online HD Map Construction},
  author={Yan, Ziyang and Li, Ruikai and Cui, Zhiyong and Li, Bohan and Jiang, Han and Ren, Yilong and
          Li, Aoyong and Li, Zhenning and Wen, Sijia and Yu, Haiyang},
  journal={arXiv preprint arXiv:2508.15653}, year={2025}}
@article{jiang2024pmapnet,
  title={P-MapNet: Far-seeing Map Generator Enhanced by both SDMap and HDMap Priors},
  author={Jiang, Zhou and Zhu, Zhenxin and Li, Pengfei and Gao, Huan-ang and Yuan, Tianyuan and
          Shi, Yongliang and Zhao, Hang and Zhao, Hao},
  journal={arXiv preprint arXiv:2403.10521}, year={2024}}
@inproceedings{li2022hdmapnet,
  title={HDMapNet: An Online HD Map Construction and Evaluation Framework},
  author={Li, Qi and Wang, Yue and Wang, Yilun and Zhao, Hang},
  booktitle={ICRA}, year={2022}}
@inproceedings{caesar2020nuscenes,
  title={nuScenes: A multimodal dataset for autonomous driving},
  author={Caesar, Holger and Bankiti, Varun and Lang, Alex H. and Vora, Sourabh and Liong, Venice
          Erin and Xu, Qiang and Krishnan, Anush and Pan, Yu and Baldan, Giancarlo and Beijbom, Oscar},
  booktitle={CVPR}, year={2020}}
"""

_LICENSE = ('nuScenes (images, LiDAR, tables, map expansion): CC BY-NC-SA 4.0, '
            'https://www.nuscenes.org/terms-of-use. SD prior from OpenStreetMap: ODbL 1.0, '
            '(c) OpenStreetMap contributors, https://www.openstreetmap.org/copyright.')

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
--manual_dir is a nuScenes-format dataroot (nuScenes terms forbid redistribution, so TFDS
cannot download it): NUSCENES_VERSION/ tables, samples/, sweeps/, maps/ (with maps/expansion/
*.json) and, unless the osm_dir option says otherwise, osm/<location>.shp (+ .shx/.dbf/.prj).
Real nuScenes (register at https://www.nuscenes.org), the real fragment in shared/realdata, or
the synthetic world of data_prep/synthetic_world.py all have this layout.
"""


@dataclasses.dataclass(kw_only=True, eq=False)
class MapkdNuscenesConfig(tfds.core.BuilderConfig):
  """The record-shaping keys of a `config.data` (configs/tcs.py); see BuildOptions."""
  bev_x: tuple = ()
  bev_y: tuple = ()
  image_size: tuple = ()
  cameras: tuple = ()
  label_thickness_ref: int = 5
  sd_thickness_ref: int = 5
  thickness_ref_step: float = 0.15
  direction_bins: int = 36
  lidar_sweeps: int = 3
  lidar_min_range: float = 2.2
  jpeg_quality: int = 95
  boundary_clip_margin: float = 1.0
  sd_road_classes: tuple = ()
  num_shards: int = 8   # build_shards' files per split (the reader's file grouping)


_DATA_KEYS = ('bev_x', 'bev_y', 'image_size', 'cameras', 'label_thickness_ref',
              'sd_thickness_ref', 'thickness_ref_step', 'direction_bins', 'lidar_sweeps',
              'lidar_min_range', 'jpeg_quality', 'boundary_clip_margin', 'sd_road_classes',
              'num_shards')


def config_from_data(name, data, description):
  """A `MapkdNuscenesConfig` of a `config.data` section (ConfigDict or dict)."""
  values = {key: data[key] for key in _DATA_KEYS}
  for key in ('bev_x', 'bev_y', 'image_size', 'cameras', 'sd_road_classes'):
    values[key] = tuple(values[key])
  return MapkdNuscenesConfig(name=name, description=description, **values)


def _builder_configs():
  from configs import tcs  # pylint: disable=g-import-not-at-top
  out = []
  for bev in sorted(tcs.BEV_RANGES):
    data = tcs.get_config(f'student,bev={bev}').data
    out.append(config_from_data(
        f'ref_{bev}', data, f'configs/tcs.py bev={bev}: {bev} m canvas, image '
        f'{tuple(data.image_size)}'))
  tiny = tcs.get_config('student,tiny').data
  out.append(config_from_data('tiny', tiny, f'configs/tcs.py tiny: 0.6 m canvas, image '
                                            f'{tuple(tiny.image_size)} (CI / demo size)'))
  return out


def _names(value, option):
  """'a+b' (CLI) or a sequence -> list of names; None stays None."""
  if value is None:
    return None
  if isinstance(value, str):
    value = [v for v in value.strip('\'"').split('+') if v]
  value = list(value)
  if not value or not all(isinstance(v, str) for v in value):
    raise ValueError(f'{NAME}: builder option {option!r} must name at least one entry, '
                     f'got {value!r}')
  return value


def _flag(value, option):
  if isinstance(value, str):
    lowered = value.strip('\'"').lower()
    if lowered not in ('true', 'false', '1', '0'):
      raise ValueError(f'{NAME}: builder option {option!r} must be True or False, got {value!r}')
    return lowered in ('true', '1')
  return bool(value)


def _unnest(features):
  """{'cameras/jpeg': v, ...} -> {'cameras': {'jpeg': v}, ...} (TFDS flattens it back with '/')."""
  out = {}
  for key, value in features.items():
    *parents, leaf = key.split('/')
    node = out
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return out


def tfds_features(num_cameras):
  """The `FeaturesDict` of a record, from `build_shards.record_spec`."""
  spec = {key: tfds.features.Tensor(shape=shape, dtype=_DTYPES[kind],
                                    encoding=tfds.features.Encoding.NONE)
          for key, (kind, shape) in build_shards.record_spec(num_cameras).items()}
  return tfds.features.FeaturesDict(_unnest(spec))


def _keyframe_problem(nusc, token, cameras, lidar_sweeps):
  """(None or the error read_sample would raise, missing sweep files), without decoding.

  Beam's driver runs this instead of collecting the workers' skips: the channel and
  keyframe-file checks of nuscenes_reader.read_sample (same exceptions and messages) and the
  missing-sweep count of nuscenes_reader.read_lidar.
  """
  sample = nusc.get('sample', token)
  for channel in tuple(cameras) + (nuscenes_reader.LIDAR_CHANNEL,):
    if channel not in sample['data']:
      return ValueError(f'sample {token}: no {channel} sample_data in the tables'), 0
  records = [nusc.get('sample_data', sample['data'][channel])
             for channel in tuple(cameras) + (nuscenes_reader.LIDAR_CHANNEL,)]
  for record in records:
    try:
      nuscenes_reader._require_file(nusc, record, token)  # pylint: disable=protected-access
    except FileNotFoundError as e:
      return e, 0
  missing, record = 0, records[-1]
  for _ in range(lidar_sweeps):
    missing += not os.path.isfile(os.path.join(nusc.dataroot, record['filename']))
    if not record['prev']:
      break
    record = nusc.get('sample_data', record['prev'])
  return None, missing


def _map_problem(source, token):
  """None, or the FileNotFoundError read_sample raises for a location without a map."""
  try:
    source.map_layers(source.location(source.nusc.get('sample', token)))
  except FileNotFoundError as e:
    return e
  return None


class _Tally:
  """Per split: examples per build_shards file, skipped samples, missing sweep files."""

  def __init__(self, chunks):
    self.chunk_of = {token: k for k, chunk in enumerate(chunks) for token in chunk}
    self.shard_sizes = [0] * len(chunks)
    self.skipped, self.missing_sweeps = [], 0

  def add(self, token, missing_sweeps, skipped):
    if skipped:
      self.skipped.append(skipped)
    else:
      self.shard_sizes[self.chunk_of[token]] += 1
      self.missing_sweeps += missing_sweeps


def _read_example(key_token, dataroot, version, options, skip_bad):
  """(key, features dict) of a sample in a Beam worker (the Source is cached per process)."""
  key, token = key_token
  source = build_shards._get_source(dataroot, version, options)  # pylint: disable=protected-access
  features, _, _ = build_shards.read_record(source, token, skip_bad)
  return key, _unnest(features)


# Run as `python -m data_prep.tfds_builder`, this file is __main__ and main() imports it again as
# data_prep.tfds_builder: only that copy registers the name (TFDS refuses a second one).
class MapkdNuscenes(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == '__main__'):
  """nuScenes keyframes with MapKD's labels and SD prior (mapkd_jax/data/schema.py records)."""

  VERSION = tfds.core.Version('2.0.0')   # = schema.SCHEMA_VERSION
  RELEASE_NOTES = {'2.0.0': 'schema_version 2: reference label rule, label/direction_backward.'}
  BUILDER_CONFIGS = _builder_configs()
  DEFAULT_CONFIG_NAME = 'ref_60x30'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, nuscenes_version='v1.0-trainval', osm_dir=None, scenes=None,
               splits=None, skip_bad=False, limit=None, **kwargs):
    self._nuscenes_version = str(nuscenes_version).strip('\'"')
    self._osm_dir = None if osm_dir is None else str(osm_dir).strip('\'"')
    self._scenes = _names(scenes, 'scenes')
    self._splits = _names(splits, 'splits')
    self._skip_bad = _flag(skip_bad, 'skip_bad')
    self._limit = None if limit is None else int(limit)
    self._use_beam = False
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds_features(len(self.builder_config.cameras)),
        homepage='https://www.nuscenes.org',
        citation=_CITATION,
        license=_LICENSE,
        redistribution_info={'license': _LICENSE},
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)   # records in build_shards' order (keys = index in split)

  def _generate_splits(self, dl_manager, download_config):
    # The generator or Beam path is chosen by the DownloadConfig, which _split_generators
    # does not see.
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    return super()._generate_splits(dl_manager, download_config)

  def _plan(self, manual_dir):
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f'{NAME}: --manual_dir {manual_dir!r} is not a directory\n'
                              f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    c = self.builder_config
    return build_shards.plan_build(
        os.fspath(manual_dir), self._nuscenes_version, bev_x=c.bev_x, bev_y=c.bev_y,
        image_size=c.image_size, cameras=c.cameras, direction_bins=c.direction_bins,
        lidar_sweeps=c.lidar_sweeps, lidar_min_range=c.lidar_min_range,
        jpeg_quality=c.jpeg_quality, boundary_clip_margin=c.boundary_clip_margin,
        sd_road_classes=c.sd_road_classes, label_thickness_ref=c.label_thickness_ref,
        sd_thickness_ref=c.sd_thickness_ref, thickness_ref_step=c.thickness_ref_step,
        osm_dir=self._osm_dir, splits=self._splits, scenes=self._scenes, limit=self._limit)

  def _split_generators(self, dl_manager):
    plan = self._plan(os.fspath(dl_manager.manual_dir))
    metadata = self.info.metadata
    metadata.update(build_shards.info_header(plan))
    metadata.update(unassigned_scenes=plan.unassigned, selected_scenes=plan.scenes,
                    skip_bad=self._skip_bad, splits={}, skipped=[],
                    lidar_missing_sweep_files=0, missing_map_layers={})
    self._tallies = {}
    generators = {}
    for split, tokens in plan.split_tokens.items():
      chunks = build_shards.shard_chunks(tokens, self.builder_config.num_shards)
      if not tokens:   # e.g. a fragment with val scenes only: build_shards writes one empty file
        logging.warning('%s: split %r has no scene; left out (TFDS cannot write an empty split)',
                        NAME, split)
        metadata['splits'][split] = dict(num_examples=0, shard_sizes=[0])
        continue
      self._tallies[split] = _Tally(chunks)
      if self._use_beam:
        generators[split] = self._beam_examples(plan, split, tokens)
      else:
        generators[split] = self._generate_examples(plan, split, tokens)
    return generators

  def _generate_examples(self, plan, split, tokens):
    """(index in split, features) of each readable sample, read as build_shards reads it."""
    tally = self._tallies[split]
    for index, token in enumerate(tokens):
      features, missing_sweeps, skipped = build_shards.read_record(plan.source, token,
                                                                   self._skip_bad)
      tally.add(token, missing_sweeps, skipped)
      if features is not None:
        yield index, _unnest(features)
    self._finish_split(plan, split)

  def _beam_examples(self, plan, split, tokens):
    """A Beam PTransform of the readable samples; skips are decided here, in the driver."""
    beam = tfds.core.lazy_imports.apache_beam
    tally = self._tallies[split]
    keep = []
    for index, token in enumerate(tokens):
      error, missing_sweeps = _keyframe_problem(plan.source.nusc, token,
                                                plan.options.cameras, plan.options.lidar_sweeps)
      if error is None:
        # read_sample's next failure after the files: no map for the sample's location. Loading
        # it here also fills missing_map_layers as the workers will see it. Only the locations of
        # readable samples are loaded: a skipped scene's missing map is no error (as without Beam).
        error = _map_problem(plan.source, token)
      if error is not None and not self._skip_bad:
        raise error
      tally.add(token, missing_sweeps,
                None if error is None else dict(sample_token=token, reason=str(error)))
      if error is None:
        keep.append((index, token))
    self._finish_split(plan, split)
    read = dict(dataroot=plan.dataroot, version=plan.version, options=plan.options,
                skip_bad=False)
    return (f'{split}/Create' >> beam.Create(keep)
            | f'{split}/Read' >> beam.Map(_read_example, **read))

  def _finish_split(self, plan, split):
    tally, metadata = self._tallies[split], self.info.metadata
    if not sum(tally.shard_sizes):
      # build_shards writes empty shard files; TFDS refuses an empty split ("No examples were
      # yielded"), so say which split and why.
      first = f'; first: {tally.skipped[0]["reason"]}' if tally.skipped else ''
      raise ValueError(f'{NAME}: split {split!r} has no readable sample ({len(tally.skipped)} '
                       f'skipped{first}); TFDS cannot write an empty split: choose others with '
                       f'the splits / scenes options')
    metadata['splits'][split] = dict(num_examples=sum(tally.shard_sizes),
                                     shard_sizes=list(tally.shard_sizes))
    metadata['skipped'] += [dict(split=split, **s) for s in tally.skipped]
    metadata['lidar_missing_sweep_files'] += tally.missing_sweeps
    for location, names in plan.source.missing_map_layers.items():
      if names:
        merged = set(metadata['missing_map_layers'].get(location, [])) | set(names)
        metadata['missing_map_layers'][location] = sorted(merged)
    metadata['missing_map_layers'] = dict(sorted(metadata['missing_map_layers'].items()))


def main():
  """`tfds build` with this builder registered: the same flags, without `tfds` itself.

  tensorflow-datasets 4.9.10's `tfds` command imports apache_beam as it starts (its
  convert_format subcommand defines a beam.DoFn at import), so without apache-beam
  `tfds build` fails before building anything; `build`'s own code does not need Beam.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import build  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import cli_utils  # pylint: disable=g-import-not-at-top
  import data_prep.tfds_builder  # pylint: disable=g-import-not-at-top,unused-import,import-self
  app.run(lambda args: args.execute(),
          flags_parser=cli_utils.make_flags_parser(build.Args, description=__doc__.split('\n')[0]))


if __name__ == '__main__':
  main()
