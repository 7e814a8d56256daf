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
  workers           processes that read samples (default 1: this process)
  progress_dir      resume folder (default none): each chunk's samples are read into a file
                    there first, and a rerun reuses the chunks its records show complete
  osm_cache_dir     converted OSM skeletons, kept for workers and reruns (default none)
  progress          a samples progress bar with ETA (default True)
`python -m data_prep.build_shards` is this builder's CLI with progress_dir and osm_cache_dir
under its --out folder (see there).

This is the one writer of the records (issue 17). The splits, scene selection and OSM loading
are `build_plan.plan_build`, each example is `build_plan.read_record`
(nuscenes_reader.read_sample -> example_features), and the features are declared from
`build_plan.record_spec`. TFDS serializes them to `tf.train.Example`s with the schema's keys
and encodings (nested feature dicts flatten to 'cameras/jpeg', ...; PNG/JPEG bytes are stored as
bytes, not re-encoded), so a record parses to the proto schema.py documents
(tests/test_tfds_builder.py checks it against a plain encoder of the schema).

Order: `disable_shuffling`, keys = the sample's index in its split (scene order then time order).
Chunks: a split's planned samples are dealt into config.num_shards contiguous chunks
(np.array_split, `build_plan.shard_chunks`; before issue 17 build_shards wrote each as a file);
the examples per chunk are recorded under metadata `splits/<split>/shard_sizes`, and
mapkd_jax/data/tfds_source.py reads each chunk back as a host's and an epoch's unit (as
pipeline.py reads a shard file). The rest of metadata.json is the build record (label_width,
bev, skipped, ...; mapkd_jax/data/dataset_info.py) plus `skip_bad` and `plan` (the build
settings and a digest of the planned samples: build_shards compares it on a rerun).

Workers and resume (generator path): with workers > 1 or a progress_dir, chunks are read by a
spawn pool (or this process) into pickle files of their features, each renamed when complete
and followed by a JSON record (settings, samples, skips), and the generator yields them back in
order; TFDS's writer then writes the records. These files are the generator's checkpoint, read
only here (the caller deletes them after a finished build); a chunk whose record matches the
current settings and samples is not read again (workers without a progress_dir use a temp
folder: peak disk is then about twice the dataset). Without either, samples are read and
yielded one by one in this process.

Cost of the one writer: TFDS serializes every example in the generating process, and its
serializer copies numpy floats one by one (`FloatList(value=array.flat)`, ~3x slower than the
list copy build_shards' own encoder used), so with workers the main process serializes while
the pool reads. Its protobuf maps are not written in a deterministic order either: the same
record can differ in bytes between two builds, never when parsed.

Beam: with a DownloadConfig `beam_runner` / `beam_options` (`tfds build
--beam_pipeline_options`) the examples are a Beam PTransform (the `[beam]` extra; tested with
the DirectRunner). The workers cannot send back what they skipped, so with Beam the driver
checks every sample's keyframe files first (missing ones are skipped and listed with
read_sample's message, or raise naming the file without skip_bad) and counts missing sweep
files; a sample that fails later fails the pipeline.
"""
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import tempfile

import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from data_prep import build_plan
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
  num_shards: int = 8   # chunks per split: resume/parallel unit, the readers' host unit


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


def _path(value):
  return None if value is None else os.fspath(value).strip('\'"')


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
  """The `FeaturesDict` of a record, from `build_plan.record_spec`."""
  spec = {key: tfds.features.Tensor(shape=shape, dtype=_DTYPES[kind],
                                    encoding=tfds.features.Encoding.NONE)
          for key, (kind, shape) in build_plan.record_spec(num_cameras).items()}
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
  """Per split: examples per chunk, skipped samples, missing sweep files."""

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
  source = build_plan.get_source(dataroot, version, options)
  features, _, _ = build_plan.read_record(source, token, skip_bad)
  return key, _unnest(features)


POLL_SECONDS = 0.5      # how often the progress bar follows the pool's sample count
CHUNK_SUFFIX = '.pkl'    # a chunk's features (pickle stream); its record: '.json'
_SAMPLE_COUNTER = None   # in pool workers: shared count of samples read, for the progress bar


def chunk_name(split, index, count):
  return f'{split}-{index:05d}-of-{count:05d}'


def _chunk_paths(progress_dir, name):
  return (os.path.join(progress_dir, name + CHUNK_SUFFIX),
          os.path.join(progress_dir, name + '.json'))


def generate_chunk(task, on_sample=None):
  """Reads a chunk's samples into its features file, atomically; returns its record.

  The file is a pickle stream of one (features or None, missing sweep files, None or skip
  record) per planned sample; the JSON record (settings, samples, counts, skips, missing map
  layers) lands beside it once the file is complete.

  Args:
    task: dict(name, samples, dataroot, version, options, settings, skip_bad, progress_dir,
      osm_cache_dir).
    on_sample: called with no argument after each sample (read or skipped), for progress.
  """
  source = build_plan.get_source(task['dataroot'], task['version'], task['options'],
                                 task['osm_cache_dir'])
  path, record_path = _chunk_paths(task['progress_dir'], task['name'])
  record = dict(chunk=task['name'], settings=task['settings'], samples=list(task['samples']),
                num_samples=0, skipped=[], missing_sweeps=0)
  with open(path + '.tmp', 'wb') as f:
    for token in task['samples']:
      features, missing_sweeps, skipped = build_plan.read_record(source, token, task['skip_bad'])
      pickle.dump((features, missing_sweeps, skipped), f, protocol=pickle.HIGHEST_PROTOCOL)
      if skipped:
        record['skipped'].append(skipped)
      else:
        record['num_samples'] += 1
        record['missing_sweeps'] += missing_sweeps
      if on_sample is not None:
        on_sample()
  os.replace(path + '.tmp', path)
  record['missing_map_layers'] = {loc: names for loc, names
                                  in sorted(source.missing_map_layers.items()) if names}
  build_plan.write_json(record_path, record)
  return record


def finished_chunk(progress_dir, name, settings, samples):
  """The chunk's record if its features file is complete for these settings and samples."""
  path, record_path = _chunk_paths(progress_dir, name)
  try:
    with open(record_path) as f:
      record = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  ok = (record.get('settings') == settings and record.get('samples') == list(samples)
        and os.path.isfile(path))
  return record if ok else None


def _read_chunk(progress_dir, name):
  """The (features, missing sweeps, skip record) of each planned sample of a finished chunk."""
  with open(_chunk_paths(progress_dir, name)[0], 'rb') as f:
    while True:
      try:
        yield pickle.load(f)
      except EOFError:
        return


def _init_worker(counter):
  global _SAMPLE_COUNTER
  _SAMPLE_COUNTER = counter


def _count_sample():
  with _SAMPLE_COUNTER.get_lock():
    _SAMPLE_COUNTER.value += 1


def _generate_chunk_in_worker(task):
  return generate_chunk(task, on_sample=_count_sample)


class _ChunkRunner:
  """Reads chunk tasks, in a spawn pool of `workers` processes (all submitted at once, run in
  order) or lazily in this process; `result(name)` waits for one, moving the progress bar."""

  def __init__(self, tasks, workers, bar):
    self._bar, self._pool = bar, None
    self._tasks = {task['name']: task for task in tasks}
    if workers > 1 and len(tasks) > 1:
      # spawn, not fork: the caller (trainer) may hold JAX/TF threads that fork would copy.
      context = multiprocessing.get_context('spawn')
      self._counter = context.Value('q', 0)
      self._pool = context.Pool(min(workers, len(tasks)), initializer=_init_worker,
                                initargs=(self._counter,))
      self._pending = {task['name']: self._pool.apply_async(_generate_chunk_in_worker, (task,))
                       for task in tasks}

  def result(self, name):
    if self._pool is None:
      return generate_chunk(self._tasks.pop(name), on_sample=lambda: self._bar.update())
    pending = self._pending.pop(name)
    while not pending.ready():
      pending.wait(POLL_SECONDS)
      self._bar.update(self._counter.value - self._bar.n)
    self._bar.update(self._counter.value - self._bar.n)
    return pending.get()   # re-raises a worker's error (e.g. a missing file) here

  def close(self):
    if self._pool is not None:
      self._pool.terminate()   # after an error: the other chunks' work is not needed
      self._pool.join()
      self._pool = None


def plan_record(plan, skip_bad):
  """What a build's records depend on: the build settings, a digest of the planned samples of
  each split (in order) and skip_bad; stored as metadata `plan`."""
  digest = hashlib.sha256(json.dumps(plan.split_tokens, sort_keys=True).encode()).hexdigest()
  return dict(settings=plan.settings, samples_sha256=digest, skip_bad=bool(skip_bad))


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
               splits=None, skip_bad=False, limit=None, workers=1, progress_dir=None,
               osm_cache_dir=None, progress=True, **kwargs):
    self._nuscenes_version = str(nuscenes_version).strip('\'"')
    self._osm_dir = _path(osm_dir)
    self._scenes = _names(scenes, 'scenes')
    self._splits = _names(splits, 'splits')
    self._skip_bad = _flag(skip_bad, 'skip_bad')
    self._limit = None if limit is None else int(limit)
    self._workers = int(workers)
    if self._workers < 1:
      raise ValueError(f'{NAME}: builder option \'workers\' must be >= 1, got {workers!r}')
    self._progress_dir = _path(progress_dir)
    self._osm_cache_dir = _path(osm_cache_dir)
    self._progress = _flag(progress, 'progress')
    self._use_beam = False
    self._runner = self._bar = self._scratch = None   # set by _split_generators, per build
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
    try:
      return super()._generate_splits(dl_manager, download_config)
    finally:
      if self._runner is not None:
        self._runner.close()
        self._runner = None
      if self._bar is not None:
        self._bar.close()
        self._bar = None
      if self._scratch is not None:
        self._scratch.cleanup()
        self._scratch = None

  def plan(self, manual_dir):
    """The `build_plan.Plan` of this builder's options over the dataroot `manual_dir`."""
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f'{NAME}: --manual_dir {manual_dir!r} is not a directory\n'
                              f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    c = self.builder_config
    return build_plan.plan_build(
        os.fspath(manual_dir), self._nuscenes_version, bev_x=c.bev_x, bev_y=c.bev_y,
        image_size=c.image_size, cameras=c.cameras, direction_bins=c.direction_bins,
        lidar_sweeps=c.lidar_sweeps, lidar_min_range=c.lidar_min_range,
        jpeg_quality=c.jpeg_quality, boundary_clip_margin=c.boundary_clip_margin,
        sd_road_classes=c.sd_road_classes, label_thickness_ref=c.label_thickness_ref,
        sd_thickness_ref=c.sd_thickness_ref, thickness_ref_step=c.thickness_ref_step,
        osm_dir=self._osm_dir, splits=self._splits, scenes=self._scenes, limit=self._limit,
        osm_cache_dir=self._osm_cache_dir)

  def _split_generators(self, dl_manager):
    plan = self.plan(os.fspath(dl_manager.manual_dir))
    metadata = self.info.metadata
    metadata.update(build_plan.info_header(plan))
    metadata.update(unassigned_scenes=plan.unassigned, selected_scenes=plan.scenes,
                    skip_bad=self._skip_bad, plan=plan_record(plan, self._skip_bad), splits={},
                    skipped=[], lidar_missing_sweep_files=0, missing_map_layers={})
    self._tallies, self._map_layers = {}, {}
    chunked = not self._use_beam and (self._workers > 1 or self._progress_dir is not None)
    if chunked:
      self._start_chunks(plan)
    elif not self._use_beam:
      self._bar = tqdm.tqdm(total=sum(map(len, plan.split_tokens.values())), desc='samples',
                            unit='sample', disable=not self._progress)
    generators = {}
    for split, tokens in plan.split_tokens.items():
      chunks = build_plan.shard_chunks(tokens, self.builder_config.num_shards)
      if not tokens:   # e.g. a fragment with val scenes only
        logging.warning('%s: split %r has no scene; left out (TFDS cannot write an empty split)',
                        NAME, split)
        metadata['splits'][split] = dict(num_examples=0, shard_sizes=[0])
        continue
      self._tallies[split] = _Tally(chunks)
      if self._use_beam:
        generators[split] = self._beam_examples(plan, split, tokens)
      elif chunked:
        generators[split] = self._chunk_examples(plan, split, chunks)
      else:
        generators[split] = self._generate_examples(plan, split, tokens)
    return generators

  def _start_chunks(self, plan):
    """Finds the finished chunks of every split and starts reading the others (all splits at
    once: one pool for the build)."""
    if self._progress_dir is None:   # workers without a resume folder: a scratch one
      self._scratch = tempfile.TemporaryDirectory(prefix=f'{NAME}_chunks_')
      self._chunk_dir = self._scratch.name
    else:
      self._chunk_dir = self._progress_dir
      os.makedirs(self._chunk_dir, exist_ok=True)
    settings, tasks, self._done = plan.settings, [], {}
    for split, tokens in plan.split_tokens.items():
      chunks = build_plan.shard_chunks(tokens, self.builder_config.num_shards) if tokens else []
      for k, chunk in enumerate(chunks):
        name = chunk_name(split, k, len(chunks))
        record = finished_chunk(self._chunk_dir, name, settings, chunk)
        if record is not None:
          self._done[name] = record
        else:
          tasks.append(dict(name=name, samples=list(chunk), dataroot=plan.dataroot,
                            version=plan.version, options=plan.options, settings=settings,
                            skip_bad=self._skip_bad, progress_dir=self._chunk_dir,
                            osm_cache_dir=self._osm_cache_dir))
    logging.info('%s: %d chunks to read, %d already done (%s)', NAME, len(tasks),
                 len(self._done), self._chunk_dir)
    self._bar = tqdm.tqdm(total=sum(len(t['samples']) for t in tasks), desc='samples',
                          unit='sample', disable=not self._progress)
    self._runner = _ChunkRunner(tasks, self._workers, self._bar)

  def _chunk_examples(self, plan, split, chunks):
    """(index in split, features) of each readable sample, chunk by chunk from the files."""
    tally, index = self._tallies[split], 0
    for k, chunk in enumerate(chunks):
      name = chunk_name(split, k, len(chunks))
      record = self._done.pop(name, None) or self._runner.result(name)
      for location, names in record.get('missing_map_layers', {}).items():
        self._map_layers[location] = sorted(set(self._map_layers.get(location, [])) | set(names))
      entries = _read_chunk(self._chunk_dir, name)
      for token, (features, missing_sweeps, skipped) in zip(chunk, entries, strict=True):
        tally.add(token, missing_sweeps, skipped)
        if features is not None:
          yield index, _unnest(features)
        index += 1
    self._finish_split(plan, split)

  def _generate_examples(self, plan, split, tokens):
    """(index in split, features) of each readable sample, read one by one in this process."""
    tally = self._tallies[split]
    for index, token in enumerate(tokens):
      features, missing_sweeps, skipped = build_plan.read_record(plan.source, token,
                                                                 self._skip_bad)
      tally.add(token, missing_sweeps, skipped)
      self._bar.update()
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
      # TFDS refuses an empty split ("No examples were yielded"), so say which split and why.
      first = f'; first: {tally.skipped[0]["reason"]}' if tally.skipped else ''
      raise ValueError(f'{NAME}: split {split!r} has no readable sample ({len(tally.skipped)} '
                       f'skipped{first}); TFDS cannot write an empty split: choose others with '
                       f'the splits / scenes options')
    metadata['splits'][split] = dict(num_examples=sum(tally.shard_sizes),
                                     shard_sizes=list(tally.shard_sizes))
    metadata['skipped'] += [dict(split=split, **s) for s in tally.skipped]
    metadata['lidar_missing_sweep_files'] += tally.missing_sweeps
    layers = dict(self._map_layers)
    for location, names in plan.source.missing_map_layers.items():
      layers[location] = sorted(set(layers.get(location, [])) | set(names))
    for location, names in layers.items():
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
