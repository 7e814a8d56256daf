"""mapkd_nuscenes TFDS builder (data_prep/tfds_builder.py) and its reader (mapkd_jax/data/tfds_source.py)
against build_shards' shards and pipeline.py's batches of the same samples."""
import glob
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import tcs
from data_prep import build_shards
from data_prep import tfds_builder
from mapkd_jax.data import dataset_info
from mapkd_jax.data import pipeline
from mapkd_jax.data import schema
from mapkd_jax import trainer
from mapkd_jax.data import tfds_source
from realdata_paths import FIRST_SCENE0523_SAMPLE
from realdata_paths import REAL_OSM
from realdata_paths import REAL_ROOT
from realdata_paths import REAL_VERSION
import stage_checkpoints

TFDS_SHARDS = 3   # TFDS files per split: boundaries unlike build_shards' 2 files (5/6/5 vs 8/8)


@pytest.fixture(scope='module')
def tiny(tiny_shards, tmp_path_factory):
  """(build_shards' tiny shard dir, the builder's output dir of the same world, config.data)."""
  world = os.path.join(os.path.dirname(tiny_shards), 'world')
  assert os.path.isdir(world), world
  data = tcs.get_config('student,tiny').data
  builder = tfds_builder.MapkdNuscenes(config='tiny', data_dir=str(tmp_path_factory.mktemp('tfds')),
                                       nuscenes_version=data.version)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=world, num_shards=TFDS_SHARDS))
  return tiny_shards, os.fspath(builder.data_dir), data


def _records(files):
  return [tf.train.Example.FromString(r.numpy()) for f in files for r in tf.data.TFRecordDataset(f)]


def test_records_and_info_equal_build_shards(tiny):
  shards, data_dir, _ = tiny
  info = dataset_info.load_dataset_info(shards)
  meta = tfds_source.load_builder(data_dir).info.metadata
  for split in ('train', 'val'):
    theirs = _records(os.path.join(shards, f) for f in info['splits'][split]['files'])
    ours = _records(sorted(glob.glob(os.path.join(data_dir, f'*-{split}.tfrecord-*'))))
    assert len(glob.glob(os.path.join(data_dir, f'*-{split}.tfrecord-*'))) == TFDS_SHARDS
    assert len(ours) == len(theirs) == info['splits'][split]['num_examples'] > 0
    for a, b in zip(ours, theirs):   # proto equality: same keys, kinds and values
      assert a == b, a.features.feature[schema.SAMPLE_TOKEN]
    sizes = [len(_records([os.path.join(shards, f)])) for f in info['splits'][split]['files']]
    assert meta['splits'][split] == dict(num_examples=sum(sizes), shard_sizes=sizes)
  for key, value in info.items():
    if key != 'splits':
      assert meta[key] == value, key
  assert meta['skip_bad'] is False


def test_beam_worker_function_gives_the_record(tiny):
  """_read_example (what each Beam worker runs) -> the TFDS record = build_shards' record."""
  shards, _, data = tiny
  first = _records([os.path.join(shards, 'val-00000-of-00002.tfrecord')])[0]
  token = first.features.feature[schema.SAMPLE_TOKEN].bytes_list.value[0].decode()
  world = os.path.join(os.path.dirname(shards), 'world')
  options = build_shards.plan_build(world, data.version, splits=['val'], limit=1, **{
      k: data[k] for k in tfds_builder._DATA_KEYS if k != 'num_shards'}).options
  key, features = tfds_builder._read_example((7, token), os.path.abspath(world), data.version,
                                             options, False)
  serialized = tfds_builder.tfds_features(len(data.cameras)).serialize_example(features)
  assert key == 7 and tf.train.Example.FromString(serialized) == first


def test_tfds_serializer_matches_build_shards_with_and_without_vectors():
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
        **{key: b'png' + key.encode() for key in build_shards._PNG_KEYS},
    }
    serialized = features.serialize_example(tfds_builder._unnest(record))
    assert (tf.train.Example.FromString(serialized)
            == build_shards.example_from_features(record)), num_vectors


def _assert_same_batches(a, b, count):
  for _ in range(count):
    x, y = next(a), next(b)
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_reader_gives_pipeline_batches_and_resumes(tiny, process_index, process_count):
  shards, data_dir, data = tiny
  kwargs = dict(batch_size=3, seed=5, with_tokens=True, process_index=process_index,
                process_count=process_count)
  # pipeline.iterate dispatches on the folder: a TFDS dataset dir in config.data.shards trains.
  ours = pipeline.iterate(data_dir, 'train', data, **kwargs)
  assert isinstance(ours, pipeline.BatchIterator)
  theirs = pipeline.iterate(shards, 'train', data, **kwargs)
  per_epoch = 16 // process_count // 3
  _assert_same_batches(ours, theirs, per_epoch + 1)   # into the second epoch
  position = ours.position
  assert position == theirs.position == {'epoch': 1, 'batch': 1}
  resumed = pipeline.iterate(data_dir, 'train', data, position=position, **kwargs)
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


def test_read_vectors_equal_pipeline(tiny):
  shards, data_dir, _ = tiny
  ours, theirs = pipeline.read_vectors(data_dir, 'val'), pipeline.read_vectors(shards, 'val')
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
  plan = build_shards.plan_build(REAL_ROOT, REAL_VERSION, osm_dir=REAL_OSM, splits=['val'],
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
