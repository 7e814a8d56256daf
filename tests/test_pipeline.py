"""Tests of the shard reader: round trip, contract, host split, order, resume and errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

import shard_fixtures
from mapkd_jax.data import dataset_info
from mapkd_jax.data import pipeline
from mapkd_jax.data import schema
from mapkd_jax.train import sharding

# Mean / max absolute JPEG error (grey levels) on the fixtures' smooth images at quality 95
# (measured: <= 2.5 / 25 with 4:2:0 chroma subsampling on these 16 x 24 images).
JPEG_MEAN_TOLERANCE = 4.0
JPEG_MAX_TOLERANCE = 48.0
# Pixel error allowed against TF's own decode of the stored bytes: float round-off of the
# normalization only.
NORMALIZATION_ATOL = 1e-3
NUM_TRAIN = 10


@pytest.fixture(scope='module')
def data_config():
  return shard_fixtures.tiny_data_config()


@pytest.fixture(scope='module')
def shards(tmp_path_factory, data_config):
  """(directory, {split: samples}) with 4 train shards, so 3 hosts each get a file."""
  directory = str(tmp_path_factory.mktemp('shards'))
  samples = shard_fixtures.write_shards(directory, data_config, num_shards=4,
                                        split_sizes={'train': NUM_TRAIN, 'val': 4})
  return directory, samples


def _all_batches(iterator):
  return [batch for batch in iterator]


def _tokens(batches):
  return [t for batch in batches for t in batch['sample_token']]


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for got_batch, want_batch in zip(got, want):
    assert sorted(got_batch) == sorted(want_batch)
    for key in want_batch:
      np.testing.assert_array_equal(got_batch[key], want_batch[key], err_msg=key)


def _pad_or_crop_ref(points, max_points):
  """Loop oracle: strided crop when too many points, zero padding otherwise."""
  out = np.zeros((max_points, 5), np.float32)
  mask = np.zeros(max_points, bool)
  num = len(points)
  for i in range(max_points):
    if num > max_points:
      out[i], mask[i] = points[(i * num) // max_points], True
    elif i < num:
      out[i], mask[i] = points[i], True
  return out, mask


@pytest.mark.parametrize('num_points', [0, 1, 63, 64, 65, 129, 1000])
def test_pad_or_crop_matches_ref(num_points):
  max_points = 64
  points = np.random.default_rng(num_points).normal(size=(num_points, 5)).astype(np.float32)
  got_points, got_mask = pipeline.pad_or_crop_points(points, max_points)
  want_points, want_mask = _pad_or_crop_ref(points, max_points)
  np.testing.assert_array_equal(got_mask.numpy(), want_mask)
  np.testing.assert_array_equal(got_points.numpy(), want_points)


def test_round_trip_equals_source(shards, data_config):
  directory, samples = shards
  by_token = {s['sample_token']: s for s in samples['train']}
  batches = _all_batches(pipeline.iterate(directory, 'train', data_config, batch_size=3, seed=0,
                                          shuffle=False, num_epochs=1, with_tokens=True,
                                          drop_remainder=False))
  assert sorted(_tokens(batches)) == sorted(by_token)
  mean = np.array(schema.IMAGENET_MEAN, np.float32)
  std = np.array(schema.IMAGENET_STD, np.float32)
  for batch in batches:
    for row, token in enumerate(batch['sample_token']):
      source = by_token[token]
      pixels = (batch['images'][row] * std + mean) * 255.0
      error = np.abs(pixels - source['images'].astype(np.float32))
      assert error.mean() < JPEG_MEAN_TOLERANCE and error.max() < JPEG_MAX_TOLERANCE, token
      decoded = np.stack([tf.io.decode_jpeg(jpeg, channels=3).numpy() for jpeg in source['jpeg']])
      np.testing.assert_allclose(pixels, decoded, atol=NORMALIZATION_ATOL, rtol=0)
      for key in ('intrinsics', 'cam_rotation', 'cam_translation', 'ego_pose'):
        shape = batch[key].shape[1:]
        np.testing.assert_array_equal(batch[key][row], source[key].reshape(shape), err_msg=key)
      for key in ('semantic', 'instance', 'direction', 'direction_backward'):
        np.testing.assert_array_equal(batch[key][row], source[key].astype(np.int32), err_msg=key)
      np.testing.assert_array_equal(batch['sd_prior'][row, ..., 0],
                                    np.where(source['sd_prior'] == 255, 1.0, -1.0))
      want_points, want_mask = _pad_or_crop_ref(source['lidar_points'], data_config.max_points)
      np.testing.assert_array_equal(batch['lidar_points'][row], want_points)
      np.testing.assert_array_equal(batch['lidar_mask'][row], want_mask)


def test_fixture_spans_lidar_edge_cases(shards, data_config):
  counts = [len(s['lidar_points']) for s in shards[1]['train']]
  assert min(counts) < data_config.max_points < max(counts)


@pytest.mark.parametrize('with_tokens', [False, True])
def test_batches_match_batch_spec(shards, data_config, with_tokens):
  directory, _ = shards
  batch_size = 4
  batch = next(pipeline.iterate(directory, 'train', data_config, batch_size=batch_size, seed=1,
                                with_tokens=with_tokens))
  spec = schema.batch_spec(data_config, batch_size)
  assert sorted(batch) == sorted(list(spec) + (['sample_token'] if with_tokens else []))
  for key, (shape, dtype) in spec.items():
    assert batch[key].shape == shape, key
    assert batch[key].dtype == dtype, key


@pytest.mark.parametrize('process_count', [2, 3])
def test_host_split_disjoint_and_complete(shards, data_config, process_count):
  directory, samples = shards
  per_host = []
  for index in range(process_count):
    it = pipeline.iterate(directory, 'train', data_config, batch_size=2, seed=3, num_epochs=1,
                          process_index=index, process_count=process_count, with_tokens=True,
                          drop_remainder=False)
    per_host.append(set(_tokens(_all_batches(it))))
  union = set().union(*per_host)
  assert sum(len(tokens) for tokens in per_host) == len(union)
  assert union == {s['sample_token'] for s in samples['train']}


def test_host_without_file_fails_naming_shard_count(shards, data_config):
  directory, _ = shards
  with pytest.raises(ValueError, match=r"split 'train' has 4 shard files.*process 4"):
    pipeline.iterate(directory, 'train', data_config, batch_size=1, seed=0, process_index=4,
                     process_count=5)


def test_order_depends_on_seed_and_epoch_only(shards, data_config):
  directory, _ = shards

  def order(seed, epoch):
    it = pipeline.iterate(directory, 'train', data_config, batch_size=1, seed=seed,
                          num_epochs=epoch + 1, position={'epoch': epoch, 'batch': 0},
                          with_tokens=True)
    return _tokens(_all_batches(it))

  first = order(seed=7, epoch=0)
  assert sorted(first) == sorted(order(seed=8, epoch=0))
  assert order(seed=7, epoch=0) == first
  assert order(seed=8, epoch=0) != first
  assert order(seed=7, epoch=1) != first


def test_order_is_the_same_in_a_fresh_process(shards, data_config):
  """A resumed trainer is a new process: the order may not depend on process state."""
  directory, _ = shards
  kwargs = dict(batch_size=2, seed=5, num_epochs=2, with_tokens=True)
  here = _tokens(_all_batches(pipeline.iterate(directory, 'train', data_config, **kwargs)))
  script = (
      'import json, sys; import shard_fixtures; from mapkd_jax.data import pipeline; '
      f'it = pipeline.iterate({directory!r}, "train", shard_fixtures.tiny_data_config(), '
      f'**{kwargs!r}); '
      'print(json.dumps([t for b in it for t in b["sample_token"].tolist()]))')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])}
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, check=True)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize('resume_at', [0, 1, 3, 4, 6])
def test_resume_yields_remaining_batches(shards, data_config, resume_at):
  directory, _ = shards
  kwargs = dict(batch_size=3, seed=11, num_epochs=2, with_tokens=True)
  uninterrupted = pipeline.iterate(directory, 'train', data_config, **kwargs)
  want = _all_batches(uninterrupted)
  assert len(want) == 2 * (NUM_TRAIN // 3)
  assert uninterrupted.position == {'epoch': 2, 'batch': 0}

  interrupted = pipeline.iterate(directory, 'train', data_config, **kwargs)
  for _ in range(resume_at):
    next(interrupted)
  saved = json.loads(json.dumps(interrupted.position))  # As a checkpoint would store it.
  resumed = pipeline.iterate(directory, 'train', data_config, position=saved, **kwargs)
  _assert_batches_equal(_all_batches(resumed), want[resume_at:])


@pytest.mark.parametrize('key, wanted', [
    ('bev_x', (-6.0, 6.0, 0.3)),
    ('bev_y', (-4.0, 4.0, 0.6)),
    ('image_size', (16, 32)),
    ('classes', ('divider', 'boundary')),
    ('cameras', ('CAM_FRONT',) * 6),
])
def test_dataset_info_mismatch_names_both_values(shards, key, wanted):
  directory, _ = shards
  config = shard_fixtures.tiny_data_config(**{key: wanted})
  info = dataset_info.load_dataset_info(directory)
  with pytest.raises(ValueError) as error:
    pipeline.make_dataset(directory, 'train', config, batch_size=1, seed=0)
  message = str(error.value)
  assert dataset_info.info_path(directory) in message
  assert key in message
  assert repr(tuple(wanted)) in message
  assert repr(tuple(info[key])) in message


def test_schema_version_mismatch(tmp_path, shards, data_config):
  directory, _ = shards
  info = dataset_info.load_dataset_info(directory)
  with pytest.raises(ValueError, match='schema_version is 99'):
    dataset_info.check_dataset_info({**info, 'schema_version': 99}, data_config, str(tmp_path))


def test_missing_directory_and_info_file(tmp_path, data_config):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope'):
    pipeline.make_dataset(missing, 'train', data_config, batch_size=1, seed=0)
  with pytest.raises(FileNotFoundError, match='dataset_info.json'):
    pipeline.make_dataset(str(tmp_path), 'train', data_config, batch_size=1, seed=0)


def test_unknown_split_names_known_ones(shards, data_config):
  with pytest.raises(ValueError, match=r"no split 'test'.*'train', 'val'"):
    pipeline.make_dataset(shards[0], 'test', data_config, batch_size=1, seed=0)


def test_truncated_shard_error_names_file(tmp_path, shards, data_config):
  directory = str(tmp_path / 'copy')
  shutil.copytree(shards[0], directory)
  info = dataset_info.load_dataset_info(directory)
  broken = os.path.join(directory, info['splits']['train']['files'][2])
  with open(broken, 'r+b') as f:
    f.truncate(os.path.getsize(broken) - 10)
  with pytest.raises(ValueError, match=f'{broken}: corrupt or truncated'):
    _all_batches(pipeline.iterate(directory, 'train', data_config, batch_size=2, seed=0,
                                  num_epochs=1))
  with pytest.raises(ValueError, match=f'{broken}: corrupt or truncated'):
    pipeline.read_vectors(directory, 'train')


def test_undecodable_record_error_names_file(tmp_path, data_config):
  directory = str(tmp_path)
  shard_fixtures.write_shards(directory, data_config, split_sizes={'train': 4}, num_shards=2)
  sample = shard_fixtures.random_sample(np.random.default_rng(0), data_config, 99, 3)
  sample['lidar_points'] = np.zeros(7, np.float32)  # Not a whole number of 5-float points.
  broken = os.path.join(directory, dataset_info.load_dataset_info(directory)['splits']['train']
                        ['files'][1])
  with tf.io.TFRecordWriter(broken) as writer:
    writer.write(shard_fixtures.serialize_sample(sample))
  with pytest.raises(ValueError, match=f'{broken}: a record does not match'):
    _all_batches(pipeline.iterate(directory, 'train', data_config, batch_size=1, seed=0,
                                  num_epochs=1))


def test_read_vectors_equals_source(shards):
  directory, samples = shards
  vectors = pipeline.read_vectors(directory, 'val')
  assert sorted(vectors) == sorted(s['sample_token'] for s in samples['val'])
  for sample in samples['val']:
    got = vectors[sample['sample_token']]
    assert [cls for cls, _ in got] == [cls for cls, _ in sample['vectors']]
    for (_, got_points), (_, want_points) in zip(got, sample['vectors']):
      assert got_points.dtype == np.float32
      np.testing.assert_array_equal(got_points, want_points)


def test_host_batch_becomes_global_array_on_8_devices(shards, data_config):
  assert jax.device_count() == 8
  batch = next(pipeline.iterate(shards[0], 'train', data_config, batch_size=8, seed=0,
                                with_tokens=True))
  mesh = sharding.make_mesh()
  global_batch = sharding.host_batch_to_global(batch, mesh)
  assert 'sample_token' not in global_batch
  assert sorted(global_batch) == sorted(schema.batch_spec(data_config, 8))
  for key, array in global_batch.items():
    assert tuple(array.sharding.spec) == (sharding.DATA_AXIS,), key
    assert len(array.addressable_shards) == 8
    assert array.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(array), batch[key], err_msg=key)


def _counting_decode(monkeypatch):
  """Patches pipeline._decode_fn to also record the token of every record it decodes."""
  decoded = []
  real = pipeline._decode_fn   # pylint: disable=protected-access
  token_spec = {schema.SAMPLE_TOKEN: tf.io.FixedLenFeature([], tf.string)}

  def record(token):
    decoded.append(token.numpy().decode())
    return np.int64(len(decoded))

  def counting(data_config, with_tokens):
    decode = real(data_config, with_tokens)

    def wrapped(serialized):
      token = tf.io.parse_single_example(serialized, token_spec)[schema.SAMPLE_TOKEN]
      seen = tf.py_function(record, [token], tf.int64)
      out = decode(serialized)
      with tf.control_dependencies([seen]):   # keep the counter in the traced map function
        out['ego_pose'] = tf.identity(out['ego_pose'])
      return out
    return wrapped

  monkeypatch.setattr(pipeline, '_decode_fn', counting)
  return decoded


@pytest.mark.parametrize('process_count', [3, 12])
def test_eval_share_decodes_only_its_records(shards, data_config, monkeypatch, process_count):
  """10 train records: 3 processes get 4, 3, 3; 12 processes leave two with none."""
  directory, _ = shards
  whole = _all_batches(pipeline.iterate(directory, 'train', data_config, batch_size=3, seed=0,
                                        shuffle=False, num_epochs=1, drop_remainder=False,
                                        with_tokens=True, process_index=0, process_count=1))
  rows = {k: np.concatenate([b[k] for b in whole]) for k in whole[0]}
  assert len(rows['sample_token']) == NUM_TRAIN
  decoded = _counting_decode(monkeypatch)
  seen = []
  for index in range(process_count):
    decoded.clear()
    share = _all_batches(pipeline.eval_iterate(directory, 'train', data_config, batch_size=2,
                                               process_index=index,
                                               process_count=process_count))
    want = {k: v[index::process_count] for k, v in rows.items()}
    # Decoded exactly the records of its share, each once.
    assert sorted(decoded) == sorted(want['sample_token'].tolist())
    if not len(want['sample_token']):
      assert share == []
      continue
    assert all(len(b['semantic']) <= 2 for b in share)
    for key, value in want.items():   # the one-process rows, bit for bit, in order
      np.testing.assert_array_equal(np.concatenate([b[key] for b in share]), value,
                                    err_msg=key)
    seen.extend(want['sample_token'].tolist())
  assert sorted(seen) == sorted(rows['sample_token'].tolist())
