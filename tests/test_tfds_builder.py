"""mapkd_nuscenes TFDS builder (data_prep/tfds_builder.py), the one writer of the records, its CLI
data_prep/build_shards.py, and the reader (mapkd_jax/data/tfds_source.py): records against a plain
encoder of schema.py, batches against pipeline.py's reader of the chunk files build_shards wrote
before issue 17."""
import glob
import json
import os

import cv2
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import tcs
from data_prep import build_plan
from data_prep import build_shards
from data_prep import nuscenes_reader
from data_prep import tfds_builder
from mapkd_jax.data import dataset_info
from mapkd_jax.data import pipeline
from mapkd_jax.data import schema
from mapkd_jax.data import tfds_source
from mapkd_jax.train import trainer
from realdata_paths import FIRST_SCENE0523_SAMPLE
from realdata_paths import REAL_OSM
from realdata_paths import REAL_ROOT
from realdata_paths import REAL_VERSION
import stage_checkpoints

TFDS_SHARDS = 3   # TFDS files per split: boundaries unlike the 2 chunks' (5/6/5 vs 8/8)


@pytest.fixture(scope='module')
def tiny(tiny_shards, tmp_path_factory):
  """(build_shards' tiny folder (chunk files), the builder's own output of the same world
  (streamed, no chunk files, 3 TFDS files), config.data)."""
  world = os.path.join(os.path.dirname(tiny_shards), 'world')
  assert os.path.isdir(world), world
  data = tcs.get_config('student,tiny').data
  builder = tfds_builder.MapkdNuscenes(config='tiny', data_dir=str(tmp_path_factory.mktemp('tfds')),
                                       nuscenes_version=data.version, progress=False)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=world, num_shards=TFDS_SHARDS))
  return tiny_shards, os.fspath(builder.data_dir), data


def _records(files):
  return [tf.train.Example.FromString(r.numpy()) for f in files for r in tf.data.TFRecordDataset(f)]


def _split_records(out, split):
  """The records of a split of build_shards' folder, in order (its dataset_info `files`)."""
  info = dataset_info.load_dataset_info(out)
  return _records(os.path.join(out, f) for f in info['splits'][split]['files'])


def _legacy_copy(out, dest):
  """build_shards' folder as build_shards wrote it before issue 17: one TFRecord file per chunk
  and a dataset_info.json listing them (pipeline.py's own reader path), from the same records."""
  info = dataset_info.load_dataset_info(out)
  os.makedirs(dest)
  legacy = {k: v for k, v in info.items() if k != 'tfds_dir'}
  legacy['splits'] = {}
  for split, entry in info['splits'].items():
    serialized = [r.numpy() for f in entry['files']
                  for r in tf.data.TFRecordDataset(os.path.join(out, f))]
    files, start = [], 0
    for k, size in enumerate(entry['shard_sizes']):
      name = f'{split}-{k:05d}-of-{len(entry["shard_sizes"]):05d}.tfrecord'
      with tf.io.TFRecordWriter(os.path.join(dest, name)) as writer:
        for record in serialized[start:start + size]:
          writer.write(record)
      files.append(name)
      start += size
    assert start == len(serialized) == entry['num_samples']
    legacy['splits'][split] = dict(num_samples=start, num_examples=start, files=files)
  with open(os.path.join(dest, dataset_info.INFO_FILENAME), 'w') as f:
    json.dump(legacy, f)
  return dest


def _plain_example(fields, num_cameras):
  """schema.py's record of a `nuscenes_reader.read_sample` dict, spelled out key by key with
  tf.train protos and cv2.imencode (none of the builder's or TFDS's encoding code)."""
  def feature(kind, values):
    if kind == 'bytes':
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == 'int':
      return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))

  def png(array):
    ok, data = cv2.imencode('.png', array)
    assert ok
    return data.tobytes()

  floats = lambda key: np.asarray(fields[key], np.float32).ravel().tolist()
  ints = lambda key: [int(v) for v in np.asarray(fields[key]).ravel()]
  assert len(fields[schema.CAMERA_JPEG]) == num_cameras
  out = {
      schema.SAMPLE_TOKEN: feature('bytes', [fields[schema.SAMPLE_TOKEN]]),
      schema.SCENE_TOKEN: feature('bytes', [fields[schema.SCENE_TOKEN]]),
      schema.CAMERA_JPEG: feature('bytes', list(fields[schema.CAMERA_JPEG])),
      schema.VECTOR_CLASS: feature('int', ints(schema.VECTOR_CLASS)),
      schema.VECTOR_NUM_POINTS: feature('int', ints(schema.VECTOR_NUM_POINTS)),
  }
  for key in (schema.CAMERA_INTRINSICS, schema.CAMERA_ROTATION, schema.CAMERA_TRANSLATION,
              schema.EGO_POSE, schema.LIDAR_POINTS, schema.VECTOR_POINTS):
    out[key] = feature('float', floats(key))
  for key in (schema.SD_PRIOR, schema.LABEL_SEMANTIC, schema.LABEL_INSTANCE,
              schema.LABEL_DIRECTION, schema.LABEL_DIRECTION_BACKWARD):
    out[key] = feature('bytes', [png(fields[key])])
  return tf.train.Example(features=tf.train.Features(feature=out))


def test_records_equal_a_plain_encoder_of_the_schema(tiny):
  """Each val record of build_shards' folder is schema.py's record of read_sample's output
  (the train records are the same code on other samples; the next test ties both paths)."""
  shards, _, data = tiny
  info = dataset_info.load_dataset_info(shards)
  options = build_plan.plan_build(info['dataroot'], data.version, splits=['val'], limit=1, **{
      k: data[k] for k in tfds_builder._DATA_KEYS if k != 'num_shards'}).options
  source = nuscenes_reader.Source(info['dataroot'], data.version, options)
  records = _split_records(shards, 'val')
  assert len(records) == info['splits']['val']['num_samples'] == 8
  for record in records:
    token = record.features.feature[schema.SAMPLE_TOKEN].bytes_list.value[0].decode()
    fields = nuscenes_reader.read_sample(source, token)
    assert record == _plain_example(fields, len(data.cameras)), token


def test_build_shards_and_the_builder_write_the_same_records_and_record(tiny):
  """build_shards (chunk files, TFDS's default files) and the builder streaming (3 TFDS files)
  give the same records; dataset_info.json is the builder's metadata plus the folder and its
  files. (The worker pool: tests/test_build_shards.py.)"""
  shards, data_dir, _ = tiny
  info = dataset_info.load_dataset_info(shards)
  meta = tfds_source.load_builder(data_dir).info.metadata
  assert info['tfds_dir'] == os.path.join('mapkd_nuscenes', 'tiny', '2.0.0')
  for split in ('train', 'val'):
    ours = _records(sorted(glob.glob(os.path.join(data_dir, f'*-{split}.tfrecord-*'))))
    assert len(glob.glob(os.path.join(data_dir, f'*-{split}.tfrecord-*'))) == TFDS_SHARDS
    theirs = _split_records(shards, split)
    assert len(ours) == len(theirs) == info['splits'][split]['num_samples'] > 0
    for a, b in zip(ours, theirs):
      assert a == b, a.features.feature[schema.SAMPLE_TOKEN]
    entry = info['splits'][split]
    assert all(f.startswith(info['tfds_dir'] + os.sep) for f in entry['files'])
    assert meta['splits'][split] == dict(num_examples=entry['num_examples'],
                                         shard_sizes=entry['shard_sizes'])
    assert sum(entry['shard_sizes']) == entry['num_samples']
  for key, value in info.items():
    if key not in ('splits', 'tfds_dir'):
      assert meta[key] == value, key
  assert meta['skip_bad'] is False and len(meta['plan']['samples_sha256']) == 64


def test_beam_worker_function_gives_the_record(tiny):
  """_read_example (what each Beam worker runs) -> the TFDS record of the sample."""
  shards, _, data = tiny
  first = _split_records(shards, 'val')[0]
  token = first.features.feature[schema.SAMPLE_TOKEN].bytes_list.value[0].decode()
  world = os.path.join(os.path.dirname(shards), 'world')
  options = build_plan.plan_build(world, data.version, splits=['val'], limit=1, **{
      k: data[k] for k in tfds_builder._DATA_KEYS if k != 'num_shards'}).options
  key, features = tfds_builder._read_example((7, token), os.path.abspath(world), data.version,
                                             options, False)
  serialized = tfds_builder.tfds_features(len(data.cameras)).serialize_example(features)
  assert key == 7 and tf.train.Example.FromString(serialized) == first


def test_tfds_serializer_writes_the_schema_with_and_without_vectors():
  rng = np.random.default_rng(0)
  features = tfds_builder.tfds_features(num_cameras=2)
  for num_vectors in (0, 2):
    record = {
        schema.SAMPLE_TOKEN: b'token', schema.SCENE_TOKEN: b'scene',
        schema.CAMERA_JPEG: [b'jpeg0', b'jpeg1'],
        schema.CAMERA_INTRINSICS: rng.normal(size=(2, 3, 3)).astype(np.float32),
        schema.CAMERA_ROTATION: rng.normal(size=(2, 3, 3)).astype(np.float32),
        schema.CAMERA_TRANSLATION: rng.normal(size=(2, 3)).astype(np.float32),
        schema.EGO_POSE: rng.normal(size=(4, 4)).astype(np.float32),
        schema.LIDAR_POINTS: rng.normal(size=(7, 5)).astype(np.float32),
        schema.VECTOR_CLASS: np.arange(num_vectors, dtype=np.int64) + 1,
        schema.VECTOR_NUM_POINTS: np.full(num_vectors, 3, np.int64),
        schema.VECTOR_POINTS: rng.normal(size=(3 * num_vectors, 2)).astype(np.float32),
        **{key: rng.integers(0, 3, size=(4, 5)).astype(np.uint8) for key in build_plan.PNG_KEYS},
    }
    encoded = build_plan.example_features(record, num_cameras=2)   # rasters -> PNG bytes
    serialized = features.serialize_example(tfds_builder._unnest(encoded))
    assert tf.train.Example.FromString(serialized) == _plain_example(record, 2), num_vectors


def _assert_same_batches(a, b, count):
  for _ in range(count):
    x, y = next(a), next(b)
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope='module')
def legacy(tiny, tmp_path_factory):
  """build_shards' tiny records in the chunk files it wrote before issue 17."""
  return _legacy_copy(tiny[0], str(tmp_path_factory.mktemp('legacy') / 'shards'))


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_reader_gives_pipeline_batches_and_resumes(tiny, legacy, process_index, process_count):
  """Today's batches: build_shards' folder and the builder's own (other TFDS file boundaries)
  read through tfds_source give the batches pipeline.py gives on the chunk files."""
  shards, data_dir, data = tiny
  kwargs = dict(batch_size=3, seed=5, with_tokens=True, process_index=process_index,
                process_count=process_count)
  theirs = pipeline.iterate(legacy, 'train', data, **kwargs)
  # pipeline.iterate dispatches on the folder: either TFDS folder in config.data.shards trains.
  ours = [pipeline.iterate(folder, 'train', data, **kwargs) for folder in (data_dir, shards)]
  assert all(isinstance(it, pipeline.BatchIterator) for it in ours)
  per_epoch = 16 // process_count // 3
  for _ in range(per_epoch + 1):   # into the second epoch
    want = next(theirs)
    for it in ours:
      got = next(it)
      assert sorted(got) == sorted(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  position = ours[0].position
  assert position == ours[1].position == theirs.position == {'epoch': 1, 'batch': 1}
  resumed = pipeline.iterate(shards, 'train', data, position=position, **kwargs)
  _assert_same_batches(resumed, theirs, 1)


def test_trainer_and_evaluation_read_the_tfds_folder(tiny, tmp_path):
  """The README's `--config.data.shards=<TFDS folder>`: the trainer and the evaluation at its
  end read the build record from TFDS's metadata.json (the folder's dataset_info.json is TFDS's
  own, which they refused before). The batches equal the shards' (tests above), so one step
  here shows the stage runs end to end; it is not compared with a second run (two compiles)."""
  _, data_dir, _ = tiny
  info = dataset_info.load_dataset_info(data_dir)
  assert info['schema_version'] >= 2
  assert {s: info['splits'][s]['num_samples'] for s in ('train', 'val')} == {
      'train': 16, 'val': info['splits']['val']['num_examples']}
  config = tcs.get_config('student,nokd,tiny')
  config.data.shards = data_dir
  config.train.update(steps=1, checkpoint_every=1, eval_every=1)
  metrics = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics['miou']), metrics
  step, params = stage_checkpoints.params_item(str(tmp_path / 'student_nokd'))
  assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_read_vectors_equal_pipeline(tiny, legacy):
  shards, data_dir, _ = tiny
  ours, theirs = pipeline.read_vectors(data_dir, 'val'), pipeline.read_vectors(legacy, 'val')
  assert pipeline.read_vectors(shards, 'val').keys() == theirs.keys()
  assert sorted(ours) == sorted(theirs) and len(ours) == 8
  for token, lines in theirs.items():
    assert [c for c, _ in ours[token]] == [c for c, _ in lines]
    for (_, p), (_, q) in zip(ours[token], lines):
      np.testing.assert_array_equal(p, q)


def test_reader_refuses_another_config_and_missing_dir(tiny, tmp_path):
  _, data_dir, data = tiny
  other = tcs.get_config('student').data   # reference canvas: not what was built
  with pytest.raises(ValueError, match=r'bev_x .* in config\.data'):
    pipeline.iterate(data_dir, 'train', other, batch_size=2, seed=0, process_count=1,
                     process_index=0)
  with pytest.raises(ValueError, match=r"no split 'test'"):
    pipeline.iterate(data_dir, 'test', data, batch_size=2, seed=0, process_count=1,
                     process_index=0)
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tfds_source.load_builder(tmp_path)
  assert tfds_source.is_tfds_dir(data_dir) and not tfds_source.is_tfds_dir(tiny[0])
  assert tfds_source.dataset_folder(data_dir) == data_dir
  assert tfds_source.dataset_folder(tiny[0]) == os.path.join(tiny[0], 'mapkd_nuscenes', 'tiny',
                                                             '2.0.0')
  assert tfds_source.dataset_folder(tmp_path) is None


def test_builder_configs_follow_configs_tcs():
  configs = {c.name: c for c in tfds_builder.MapkdNuscenes.BUILDER_CONFIGS}
  assert sorted(configs) == ['ref_120x60', 'ref_240x60', 'ref_60x30', 'tiny']
  for name, arg in (('ref_120x60', 'student,bev=120x60'), ('tiny', 'student,tiny')):
    data = tcs.get_config(arg).data
    for key in tfds_builder._DATA_KEYS:
      want = data[key]
      assert getattr(configs[name], key) == (tuple(want) if isinstance(want, (list, tuple))
                                              else want), (name, key)
  # Builder options from the `tfds build` name: 'name/config/k=v,...'.
  builder = tfds.builder('mapkd_nuscenes/tiny/nuscenes_version=v1.0-synthetic,skip_bad=True,'
                         'scenes=scene-0001+scene-0002', data_dir='/nonexistent')
  assert (builder._nuscenes_version, builder._skip_bad, builder._scenes) == (
      'v1.0-synthetic', True, ['scene-0001', 'scene-0002'])
  with pytest.raises(ValueError, match="'skip_bad' must be True or False"):
    tfds_builder.MapkdNuscenes(config='tiny', data_dir='/nonexistent', skip_bad='maybe')


def _real_builder(tmp_path, **options):
  data = dict(tcs.get_config().data, bev_x=(-30.0, 30.0, 1.0), bev_y=(-15.0, 15.0, 1.0),
              image_size=(32, 88), num_shards=2)
  config = tfds_builder.config_from_data('real_test', data, 'test canvas')
  return tfds_builder.MapkdNuscenes(config=config, data_dir=str(tmp_path),
                                    nuscenes_version=REAL_VERSION, osm_dir=REAL_OSM,
                                    splits='val', limit=42, **options), data


@pytest.mark.skipif(not os.path.isdir(REAL_ROOT), reason='real fragment absent')
def test_bad_input_as_build_shards_skip_bad_recorded(tmp_path):
  builder, data = _real_builder(tmp_path / 'strict')
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=REAL_ROOT))
  message = str(error.value)
  assert FIRST_SCENE0523_SAMPLE in message and 'CAM_FRONT_LEFT' in message
  assert os.path.join(REAL_ROOT, 'samples', 'CAM_FRONT_LEFT') in message

  empty, _ = _real_builder(tmp_path / 'empty', skip_bad=True, scenes='scene-0523')
  with pytest.raises(ValueError, match=r"split 'val' has no readable sample \(40 skipped; "
                     r"first: .*CAM_FRONT_LEFT"):
    empty.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=REAL_ROOT))

  builder, data = _real_builder(tmp_path / 'lenient', skip_bad=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=REAL_ROOT))
  info = build_shards.build_shards(
      REAL_ROOT, REAL_VERSION, str(tmp_path / 'shards'), workers=1, osm_dir=REAL_OSM,
      splits=['val'], limit=42, skip_bad=True, progress=False,
      **{k: data[k] for k in tfds_builder._DATA_KEYS})
  meta = builder.info.metadata
  assert meta['skip_bad'] is True
  assert meta['skipped'] == info['skipped'] and len(info['skipped']) == 40  # scene-0523: tables only
  # 42 planned samples in 2 files of 21: the first all of scene-0523, the second 19 + 2 readable.
  assert meta['splits']['val'] == dict(num_examples=2, shard_sizes=[0, 2])
  assert info['splits']['val']['num_examples'] == 2
  ours = _records(sorted(glob.glob(os.path.join(builder.data_dir, '*-val.tfrecord-*'))))
  theirs = _records(os.path.join(tmp_path / 'shards', f) for f in info['splits']['val']['files'])
  assert ours == theirs

  # The Beam path's driver-side check skips the same samples for the same reasons and counts
  # the same missing sweeps, without reading them.
  plan = build_plan.plan_build(REAL_ROOT, REAL_VERSION, osm_dir=REAL_OSM, splits=['val'],
                                 limit=42, **{k: data[k] for k in tfds_builder._DATA_KEYS
                                              if k != 'num_shards'})
  found, missing = [], 0
  for token in plan.split_tokens['val']:
    error, sweeps = tfds_builder._keyframe_problem(plan.source.nusc, token, data['cameras'],
                                                   data['lidar_sweeps'])
    missing += sweeps
    if error is not None:
      assert isinstance(error, FileNotFoundError)
      found.append(dict(split='val', sample_token=token, reason=str(error)))
  assert found == info['skipped']
  assert missing == info['lidar_missing_sweep_files'] == meta['lidar_missing_sweep_files']


@pytest.mark.skipif(not os.path.isdir(REAL_ROOT), reason='real fragment absent')
def test_beam_skips_the_samples_build_shards_skips(tmp_path):
  """Bad input through Beam: scene-0523 of the fragment has tables only, and no map of its
  location (boston-seaport) is there. Beam's driver skips its 40 samples for the reasons
  build_shards gives, without loading the missing map (it raised FileNotFoundError on it
  before), and the workers write build_shards' records of the readable ones."""
  beam = pytest.importorskip('apache_beam', reason='apache-beam is not installed: '
                             'pip install -e ".[beam]" (.ci/install does)')
  builder, data = _real_builder(tmp_path / 'beam', skip_bad=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=REAL_ROOT, beam_options=beam.options.pipeline_options.PipelineOptions(
          ['--runner=DirectRunner', '--direct_num_workers=1'])))
  info = build_shards.build_shards(
      REAL_ROOT, REAL_VERSION, str(tmp_path / 'shards'), workers=1, osm_dir=REAL_OSM,
      splits=['val'], limit=42, skip_bad=True, progress=False,
      **{k: data[k] for k in tfds_builder._DATA_KEYS})
  meta = builder.info.metadata
  assert meta['skipped'] == info['skipped'] and len(info['skipped']) == 40
  assert meta['lidar_missing_sweep_files'] == info['lidar_missing_sweep_files']
  assert meta['missing_map_layers'] == info['missing_map_layers']
  assert meta['splits']['val'] == dict(num_examples=2, shard_sizes=[0, 2])
  ours = _records(sorted(glob.glob(os.path.join(builder.data_dir, '*-val.tfrecord-*'))))
  theirs = _records(os.path.join(tmp_path / 'shards', f) for f in info['splits']['val']['files'])
  assert ours == theirs and len(ours) == 2


def test_beam_direct_runner_gives_the_same_records(request, tmp_path):
  pytest.importorskip('apache_beam', reason='apache-beam is not installed: pip install -e ".[beam]" '
                      '(.ci/install does)')
  shards, _, data = request.getfixturevalue('tiny')   # after the skip: the world costs ~20 s
  world = os.path.join(os.path.dirname(shards), 'world')
  builder = tfds_builder.MapkdNuscenes(config='tiny', data_dir=str(tmp_path),
                                       nuscenes_version=data.version)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=world, beam_options=__import__('apache_beam').options.pipeline_options
      .PipelineOptions(['--runner=DirectRunner', '--direct_num_workers=1'])))
  info = dataset_info.load_dataset_info(shards)
  for split in ('train', 'val'):
    theirs = _records(os.path.join(shards, f) for f in info['splits'][split]['files'])
    ours = _records(sorted(glob.glob(os.path.join(builder.data_dir, f'*-{split}.tfrecord-*'))))
    assert ours == theirs, split
  assert builder.info.metadata['splits'] == tfds_source.load_builder(
      builder.data_dir).info.metadata['splits']


def test_tfds_build_command_gives_the_builders_records(tiny, tmp_path):
  """TFDS's own `tfds build` (the tfds-cli extra brings mlcroissant, which its CLI imports)
  with this builder imported writes the records the builder writes in-process."""
  pytest.importorskip('mlcroissant', reason='pip install -e ".[tfds-cli]" (.ci/install does)')
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  shards, tfds_dir, data = tiny
  world = os.path.join(os.path.dirname(shards), 'world')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, '-c', 'from tensorflow_datasets.scripts.cli.main import launch_cli; '
       'launch_cli()', 'build', '--imports', 'data_prep.tfds_builder',
       f'mapkd_nuscenes/nuscenes_version={data.version}', '--config', 'tiny',
       '--manual_dir', world, '--data_dir', str(tmp_path)],
      cwd=repo, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  built = os.path.join(tmp_path, 'mapkd_nuscenes', 'tiny', '2.0.0')
  for split in ('train', 'val'):
    ours = _records(sorted(glob.glob(os.path.join(built, f'*-{split}.tfrecord-*'))))
    theirs = _records(sorted(glob.glob(os.path.join(tfds_dir, f'*-{split}.tfrecord-*'))))
    assert ours == theirs and ours, split
