"""tf.data input pipeline: schema shards -> per-host batches of numpy arrays (`schema.batch_spec`).

Order and resume. Every epoch is its own deterministic dataset: this host's files are permuted
and the examples shuffled with seeds derived from (seed, epoch) only, and every stage runs
with deterministic ordering. A position is therefore just `{'epoch', 'batch'}` (the next batch
to read); `iterate(..., position=p)` rebuilds epoch p['epoch'] and skips p['batch'] batches
of serialized records before decoding, so it yields exactly the batches an uninterrupted
iterator would have. The trainer stores `BatchIterator.position` in its checkpoint.

Hosts. Each process reads `files[process_index::process_count]` of the split's file list
(dataset_info.json order), so hosts see disjoint examples; `batch_size` is the per-host batch.

LiDAR. Clouds with more than `data_config.max_points` points are cropped to an evenly strided
subset (point i of the output is input point floor(i * N / max_points)): deterministic, and
unbiased across sweeps and range, unlike keeping the first points. Shorter clouds are
zero-padded; `lidar_mask` marks the real points.

Sources. A folder that holds the `mapkd_nuscenes` TFDS dataset (data_prep/tfds_builder.py's
output, or `python -m data_prep.build_shards`' folder, whose dataset_info.json names it under
`tfds_dir`) is read through mapkd_jax/data/tfds_source.py, each builder chunk in place of a file
(`tfds_source.dataset_folder` decides); a plain shard directory (dataset_info.json listing
TFRecord files, as build_shards wrote before issue 17 and tests/shard_fixtures.py writes) here.

Bad shards. tf.data reports a damaged TFRecord (or a record that does not decode) without its
file name; `BatchIterator` catches that, re-reads this host's files one by one, and raises a
ValueError naming the bad one.
"""
import numpy as np
import tensorflow as tf

from mapkd_jax.data import dataset_info
from mapkd_jax.data import schema

LIDAR_DIMS = 5
# PNG values at or above this read as road in the SD prior (the builder writes 0 / 255).
_SD_ROAD_THRESHOLD = 128


def _hide_gpus_from_tf():
  """TF must not grab accelerator memory that JAX owns; it only decodes on the CPU."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Devices already initialized: nothing was visible to hide, or too late.
    pass


def _compression(path):
  return 'GZIP' if path.endswith('.gz') else ''


def _epoch_seeds(seed, epoch):
  """(file permutation seed, example shuffle seed) for one epoch, independent of anything else."""
  words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
  return int(words[0]), int(words[1])


def host_files(shards_dir, split, data_config, *, process_index=None, process_count=None):
  """This host's shard paths of `split`, after checking dataset_info.json against the config.

  Raises:
    FileNotFoundError: missing directory, dataset_info.json or shard file (named).
    ValueError: dataset_info mismatch, unknown split, or a host that gets no file.
  """
  import jax  # Imported here: only needed for the default host identity.
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  info = dataset_info.load_dataset_info(shards_dir)
  dataset_info.check_dataset_info(info, data_config, shards_dir)
  files = dataset_info.split_files(info, shards_dir, split)
  mine = files[process_index::process_count]
  if not mine:
    raise ValueError(f'{dataset_info.info_path(shards_dir)}: split {split!r} has {len(files)} '
                     f'shard files, fewer than the {process_count} processes; process '
                     f'{process_index} would get none (rebuild with more shards, '
                     f'config.data.num_shards)')
  return mine


def _feature_spec(num_cams):
  fixed = tf.io.FixedLenFeature
  return {
      schema.SAMPLE_TOKEN: fixed([], tf.string),
      schema.CAMERA_JPEG: fixed([num_cams], tf.string),
      schema.CAMERA_INTRINSICS: fixed([num_cams, 3, 3], tf.float32),
      schema.CAMERA_ROTATION: fixed([num_cams, 3, 3], tf.float32),
      schema.CAMERA_TRANSLATION: fixed([num_cams, 3], tf.float32),
      schema.EGO_POSE: fixed([4, 4], tf.float32),
      # Parsed straight to a dense [N, 5]: a VarLenFeature would build a sparse tensor first.
      schema.LIDAR_POINTS: tf.io.FixedLenSequenceFeature([LIDAR_DIMS], tf.float32,
                                                         allow_missing=True),
      schema.SD_PRIOR: fixed([], tf.string),
      schema.LABEL_SEMANTIC: fixed([], tf.string),
      schema.LABEL_INSTANCE: fixed([], tf.string),
      schema.LABEL_DIRECTION: fixed([], tf.string),
      # Required: shards of schema_version < 2 lack it and are refused by check_dataset_info.
      schema.LABEL_DIRECTION_BACKWARD: fixed([], tf.string),
  }


def pad_or_crop_points(points, max_points):
  """Fixed-size LiDAR cloud and its validity mask.

  Args:
    points: [N, 5] float32, any N >= 0.
    max_points: output size P.

  Returns:
    (points [P, 5] float32 zero where invalid, mask [P] bool). N > P keeps input points
    floor(i * N / P) for i < P; N <= P keeps all N points first.
  """
  points = tf.convert_to_tensor(points, tf.float32)
  num = tf.shape(points, out_type=tf.int64)[0]
  slots = tf.range(max_points, dtype=tf.int64)
  fixed = tf.cond(num > max_points,
                  lambda: tf.gather(points, slots * num // max_points),
                  lambda: tf.pad(points, [[0, max_points - num], [0, 0]]))
  return tf.ensure_shape(fixed, [max_points, LIDAR_DIMS]), slots < num


def _decode_png(encoded, shape, dtype):
  image = tf.io.decode_png(encoded, channels=1, dtype=dtype)
  return tf.ensure_shape(image, [*shape, 1])


_IMAGENET_MEAN_255 = np.asarray(schema.IMAGENET_MEAN, np.float32) * 255.0
_IMAGENET_INV_STD_255 = 1.0 / (np.asarray(schema.IMAGENET_STD, np.float32) * 255.0)


# Keys that `_decode_fn` leaves as decoded uint8/uint16 rasters for `_convert_rasters`.
_RASTER_KEYS = ('images', 'sd_prior', 'semantic', 'instance', 'direction',
                'direction_backward')


# Module level, so that every dataset shares one XLA compilation cache entry per shape.
@tf.function(jit_compile=True)
def _convert_rasters(images, sd_prior, semantic, instance, direction, direction_backward):
  """Decoded uint8/uint16 rasters of a batch -> batch_spec dtypes, as one XLA-fused function.

  Fused, the ImageNet normalization is one pass over the pixels instead of three (cast,
  subtract, divide); run after batching, `batch` copies 1-byte instead of 4-byte pixels.
  Together that cuts the CPU cost of a reference-size sample by about 40%.
  """
  return {
      'images': (tf.cast(images, tf.float32) - _IMAGENET_MEAN_255) * _IMAGENET_INV_STD_255,
      'sd_prior': tf.where(sd_prior >= _SD_ROAD_THRESHOLD, 1.0, -1.0),
      'semantic': tf.cast(semantic[..., 0], tf.int32),
      'instance': tf.cast(instance[..., 0], tf.int32),
      'direction': tf.cast(direction[..., 0], tf.int32),
      'direction_backward': tf.cast(direction_backward[..., 0], tf.int32),
  }


def _convert_batch(batch):
  return {**batch, **_convert_rasters(*(batch[k] for k in _RASTER_KEYS))}


def _decode_fn(data_config, with_tokens):
  """serialized Example -> dict of unbatched tensors; rasters stay uint8/uint16 [..., 1]."""
  num_cams = len(data_config.cameras)
  height, width = data_config.image_size
  bev = schema.bev_shape(data_config.bev_x, data_config.bev_y)
  spec = _feature_spec(num_cams)

  def decode(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    # Unrolled over the static camera count: cheaper than tf.map_fn for six small images.
    images = tf.stack([tf.io.decode_jpeg(ex[schema.CAMERA_JPEG][c], channels=3)
                       for c in range(num_cams)])
    lidar_points, lidar_mask = pad_or_crop_points(ex[schema.LIDAR_POINTS], data_config.max_points)
    out = {
        'images': tf.ensure_shape(images, [num_cams, height, width, 3]),
        'intrinsics': ex[schema.CAMERA_INTRINSICS],
        'cam_rotation': ex[schema.CAMERA_ROTATION],
        'cam_translation': ex[schema.CAMERA_TRANSLATION],
        'ego_pose': ex[schema.EGO_POSE],
        'lidar_points': lidar_points,
        'lidar_mask': lidar_mask,
        'sd_prior': _decode_png(ex[schema.SD_PRIOR], bev, tf.uint8),
        'semantic': _decode_png(ex[schema.LABEL_SEMANTIC], bev, tf.uint8),
        'instance': _decode_png(ex[schema.LABEL_INSTANCE], bev, tf.uint16),
        'direction': _decode_png(ex[schema.LABEL_DIRECTION], bev, tf.uint8),
        'direction_backward': _decode_png(ex[schema.LABEL_DIRECTION_BACKWARD], bev, tf.uint8),
    }
    if with_tokens:
      out['sample_token'] = ex[schema.SAMPLE_TOKEN]
    return out

  return decode


def decode_and_batch(ds, data_config, *, batch_size, with_tokens, drop_remainder,
                     num_parallel_calls, threads):
  """Serialized records -> decoded, converted, prefetched batches in a fixed order: the tail
  every reader of records shares (make_dataset, eval_iterate, tfds_source.make_dataset)."""
  ds = ds.map(_decode_fn(data_config, with_tokens), num_parallel_calls=num_parallel_calls,
              deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(_convert_batch, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  if threads is not None:
    options.threading.private_threadpool_size = threads
  return ds.with_options(options)


def make_dataset(shards_dir, split, data_config, *, batch_size, seed, epoch=0, shuffle=True,
                 skip_batches=0, process_index=None, process_count=None, with_tokens=False,
                 drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, cycle_length=4,
                 threads=None):
  """One epoch of this host's batches as a deterministic `tf.data.Dataset`.

  Args:
    shards_dir: folder with dataset_info.json and the TFRecord shards.
    split: a split of dataset_info.json, e.g. 'train' or 'val'.
    data_config: `config.data` (cameras, image_size, bev_x, bev_y, max_points,
      shuffle_buffer, ...); checked against dataset_info.json.
    batch_size: per-host batch size.
    seed: shuffle seed; with `epoch` it fixes the order completely.
    epoch: epoch number (changes the order when shuffling).
    shuffle: permute files and shuffle examples (buffer data_config.shuffle_buffer).
    skip_batches: batches to drop from the start of the epoch (resume); skipped before
      decoding, so cheap.
    process_index, process_count: this host and the host count; default from jax.
    with_tokens: add 'sample_token' ([B] tf.string) to each batch.
    drop_remainder: drop the last partial batch (static shapes for training).
    num_parallel_calls: parallelism of decoding.
    cycle_length: shard files read concurrently (part of the order, keep fixed on resume).
    threads: size of the private tf.data thread pool; None = TF's default (all cores).

  Returns:
    A dataset of dicts of tensors named and shaped as `schema.batch_spec` (+ 'sample_token').
  """
  _hide_gpus_from_tf()
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  files = host_files(shards_dir, split, data_config, process_index=process_index,
                     process_count=process_count)
  file_seed, example_seed = _epoch_seeds(seed, epoch)
  if shuffle:
    files = [files[i] for i in np.random.default_rng(file_seed).permutation(len(files))]
  compression = _compression(files[0])
  ds = tf.data.Dataset.from_tensor_slices(files)
  ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
                     cycle_length=min(cycle_length, len(files)), block_length=1,
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if shuffle:
    ds = ds.shuffle(data_config.shuffle_buffer, seed=example_seed, reshuffle_each_iteration=False)
  ds = ds.skip(skip_batches * batch_size)
  return decode_and_batch(ds, data_config, batch_size=batch_size, with_tokens=with_tokens,
                          drop_remainder=drop_remainder, num_parallel_calls=num_parallel_calls,
                          threads=threads)


def find_bad_file(files, decode_fn=None):
  """(path, error) of the first file that fails to read (or to decode), else (None, None).

  Args:
    files: shard paths, scanned in order (only after a failure: this reads them all).
    decode_fn: per-record decode function to apply too, or None to check the TFRecord
      framing and checksums only.
  """
  for path in files:
    records = tf.data.TFRecordDataset(path, compression_type=_compression(path))
    if decode_fn is not None:
      records = records.map(decode_fn)
    try:
      for _ in records:
        pass
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
      return path, e
  return None, None


def _bad_file_error(files, decode_fn, error):
  """ValueError naming the shard behind a tf.data error (tf.data's message omits it)."""
  path, file_error = find_bad_file(files, decode_fn)
  error = file_error or error
  if isinstance(error, tf.errors.DataLossError):
    what = 'corrupt or truncated TFRecord shard'
  else:
    what = 'a record does not match mapkd_jax/data/schema.py and config.data'
  detail = error.message.strip().splitlines()[0] if error.message.strip() else type(error).__name__
  return ValueError(f'{path or f"one of {files}"}: {what} ({detail})')


class BatchIterator:
  """Iterator over numpy batches across epochs, with a resumable `position`.

  `position` is {'epoch': e, 'batch': b}: the next batch is batch b of epoch e. Store it in
  the checkpoint; `iterate(..., position=saved)` continues with the same batches.
  """

  def __init__(self, dataset_fn, files, *, position, num_epochs, decode_fn=None,
               allow_empty_epochs=False):
    self._dataset_fn = dataset_fn    # (epoch, skip_batches) -> tf.data.Dataset
    self._files = files
    self._decode_fn = decode_fn      # per-record decode, re-run per file to locate a bad record
    # An evaluation process may get no record of a small split (`eval_iterate`); training
    # must see at least one batch per epoch.
    self._allow_empty_epochs = allow_empty_epochs
    self._epoch, self._batch = int(position['epoch']), int(position['batch'])
    self._num_epochs = num_epochs
    self._tf_iterator = None

  @property
  def position(self):
    return {'epoch': self._epoch, 'batch': self._batch}

  def __iter__(self):
    return self

  def _next_tf(self):
    try:
      return next(self._tf_iterator)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
      raise _bad_file_error(self._files, self._decode_fn, e) from e

  def __next__(self):
    batches_this_epoch = self._batch
    while True:
      if self._num_epochs is not None and self._epoch >= self._num_epochs:
        raise StopIteration
      if self._tf_iterator is None:
        # as_numpy_iterator hands out the tensors' buffers; Tensor.numpy() would copy them.
        self._tf_iterator = self._dataset_fn(self._epoch, self._batch).as_numpy_iterator()
      try:
        batch = self._next_tf()
      except StopIteration:
        if batches_this_epoch == 0 and not self._allow_empty_epochs:
          raise ValueError(f'epoch {self._epoch} gave no batch from {self._files}: fewer '
                           f'examples than the batch size') from None
        self._tf_iterator = None
        self._epoch, self._batch, batches_this_epoch = self._epoch + 1, 0, 0
        continue
      self._batch += 1
      return _to_numpy(batch)


def _to_numpy(batch):
  if 'sample_token' in batch:
    batch['sample_token'] = np.array([t.decode() for t in batch['sample_token']])
  return batch


def iterate(shards_dir, split, data_config, *, batch_size, seed, shuffle=True, num_epochs=None,
            position=None, process_index=None, process_count=None, with_tokens=False,
            drop_remainder=True, **dataset_kwargs):
  """A `BatchIterator` of numpy batches matching `schema.batch_spec(data_config, batch_size)`.

  The arrays are read-only views of tf.data's buffers (no copy); copy before writing into them.
  With `with_tokens`, batches also hold 'sample_token': [B] str.

  Args:
    num_epochs: stop after this many epochs (counted from 0); None = forever.
    position: {'epoch', 'batch'} to start from (a saved `BatchIterator.position`);
      None = the start of epoch 0.
    dataset_kwargs: passed to `make_dataset` (num_parallel_calls, cycle_length, threads).
    Other arguments: as in `make_dataset`.
  """
  from mapkd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top  (imports us)
  folder = tfds_source.dataset_folder(shards_dir)
  if folder is not None:   # the builder's output (build_shards' too): the chunk-file batches
    shards_dir = folder
    _, files = tfds_source.host_shards(shards_dir, split, data_config,
                                       process_index=process_index, process_count=process_count)
    records_to_batches = tfds_source.make_dataset
  else:
    files = host_files(shards_dir, split, data_config, process_index=process_index,
                       process_count=process_count)
    records_to_batches = make_dataset

  def dataset_fn(epoch, skip_batches):
    return records_to_batches(
        shards_dir, split, data_config, batch_size=batch_size, seed=seed, epoch=epoch,
        shuffle=shuffle, skip_batches=skip_batches, process_index=process_index,
        process_count=process_count, with_tokens=with_tokens, drop_remainder=drop_remainder,
        **dataset_kwargs)

  return BatchIterator(dataset_fn, files, position=position or {'epoch': 0, 'batch': 0},
                       num_epochs=num_epochs, decode_fn=_decode_fn(data_config, False))


def _one_process_records(shards_dir, split, data_config, *, cycle_length):
  """(serialized records of the whole split in the one-process unshuffled order, paths).

  The order of `make_dataset(..., shuffle=False, process_index=0, process_count=1)` (and of
  tfds_source's, which reads build_shards' files back as the same order), before decoding.
  """
  from mapkd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top  (imports us)
  folder = tfds_source.dataset_folder(shards_dir)
  if folder is not None:
    shards, files = tfds_source.host_shards(folder, split, data_config, process_index=0,
                                            process_count=1)
    return tfds_source._records(shards, cycle_length), files  # pylint: disable=protected-access
  files = host_files(shards_dir, split, data_config, process_index=0, process_count=1)
  compression = _compression(files[0])
  ds = tf.data.Dataset.from_tensor_slices(files)
  ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
                     cycle_length=min(cycle_length, len(files)), block_length=1,
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds, files


def eval_iterate(shards_dir, split, data_config, *, batch_size, process_index=0,
                 process_count=1, with_tokens=True, num_parallel_calls=tf.data.AUTOTUNE,
                 cycle_length=4, threads=None):
  """This evaluation process's share of one unshuffled epoch, as numpy batches.

  Record r of the one-process order (`iterate(..., shuffle=False, process_index=0,
  process_count=1)`, all files of the split) belongs to process r % process_count. The
  others are dropped (`Dataset.shard`) BEFORE they are parsed and decoded: every process
  still reads the record bytes of the whole split (a record's share is only known from its
  place in the interleaved stream), but decodes (JPEG, PNG, LiDAR: the cost) only its own.
  Every sample is evaluated exactly once for any process count, also when the split does
  not divide evenly or has fewer records than processes (a process without records yields
  no batch). Unlike `iterate`, whose hosts read disjoint FILES, the share does not depend on
  how the split was cut into files, so it needs no file count divisible by the processes.

  Training never reads through this (its reader is `iterate`).

  Returns:
    A `BatchIterator` (one epoch) of batches of up to `batch_size` rows, the last one
    shorter; batch j of process p holds the records r = p + process_count * (batch_size * j
    + row) of the one-process order.
  """
  _hide_gpus_from_tf()
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  records, files = _one_process_records(shards_dir, split, data_config,
                                        cycle_length=cycle_length)

  def dataset_fn(epoch, skip_batches):
    del epoch  # one unshuffled epoch: the order does not depend on it
    ds = records.shard(process_count, process_index)
    ds = ds.skip(skip_batches * batch_size)
    return decode_and_batch(ds, data_config, batch_size=batch_size, with_tokens=with_tokens,
                            drop_remainder=False, num_parallel_calls=num_parallel_calls,
                            threads=threads)

  return BatchIterator(dataset_fn, files, position={'epoch': 0, 'batch': 0}, num_epochs=1,
                       decode_fn=_decode_fn(data_config, False), allow_empty_epochs=True)


def read_vectors(shards_dir, split):
  """Ground-truth polylines of a split (all hosts' files), for vector evaluation.

  Returns:
    {sample_token: [(class_id, points [N, 2] float32 x, y metres in the ego frame), ...]}
    with class_id as in label/semantic (1 = divider, 2 = ped_crossing, 3 = boundary).

  Raises:
    ValueError: naming the shard file of a corrupt record or of inconsistent vector lengths.
  """
  from mapkd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top  (imports us)
  folder = tfds_source.dataset_folder(shards_dir)
  if folder is not None:   # the builder's files, read like a shard directory's
    paths = tfds_source.split_files(folder, split)
  else:
    paths = dataset_info.split_files(dataset_info.load_dataset_info(shards_dir), shards_dir, split)
  spec = {
      schema.SAMPLE_TOKEN: tf.io.FixedLenFeature([], tf.string),
      schema.VECTOR_CLASS: tf.io.VarLenFeature(tf.int64),
      schema.VECTOR_NUM_POINTS: tf.io.VarLenFeature(tf.int64),
      schema.VECTOR_POINTS: tf.io.VarLenFeature(tf.float32),
  }
  vectors = {}
  for path in paths:
    records = tf.data.TFRecordDataset(path, compression_type=_compression(path))
    try:
      for serialized in records:
        ex = tf.io.parse_single_example(serialized, spec)
        token = ex[schema.SAMPLE_TOKEN].numpy().decode()
        classes = ex[schema.VECTOR_CLASS].values.numpy()
        counts = ex[schema.VECTOR_NUM_POINTS].values.numpy()
        flat = ex[schema.VECTOR_POINTS].values.numpy()
        if len(classes) != len(counts) or 2 * counts.sum() != len(flat):
          raise ValueError(f'{path}: sample {token!r} has {len(classes)} vector classes, '
                           f'{len(counts)} point counts summing to {counts.sum()} and '
                           f'{len(flat)} coordinates (want 2 per point)')
        starts = np.concatenate([[0], np.cumsum(counts)])
        points = flat.reshape(-1, 2)
        vectors[token] = [(int(cls), points[starts[i]:starts[i + 1]])
                          for i, cls in enumerate(classes)]
    except tf.errors.DataLossError as e:
      raise ValueError(f'{path}: corrupt or truncated TFRecord shard ({e.message})') from e
  return vectors
