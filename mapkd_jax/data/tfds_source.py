"""Training / evaluation batches from the `mapkd_nuscenes` TFDS dataset (data_prep/tfds_builder.py).

`pipeline.iterate(data_dir, ...)` reads through this module (host_shards + make_dataset) when
data_dir is the builder's versioned folder (e.g. ~/tensorflow_datasets/mapkd_nuscenes/tiny/
2.0.0) or `python -m data_prep.build_shards`' output folder, which holds one (`dataset_folder`),
with the batches pipeline.py gave on the shard directory build_shards wrote before issue 17 (one
file per chunk); the order, the `{'epoch', 'batch'}` resume position and the per-host split are
pipeline.py's.

How. TFDS writes a split's records in order but groups them into its own files. The builder
records its chunks (metadata `splits/<split>/shard_sizes`: examples per chunk, the files
build_shards wrote before); here each of those "virtual shards" is read back as the TFDS file segments
that hold it (`TFRecordDataset(file).skip(a).take(b)`), and the virtual shards take the place
of pipeline.py's files: host h reads virtual shards h::process_count (pipeline.py's
files[h::n], rather than tfds.split_for_jax_process's even example ranges, so that every host
gets exactly today's examples), permuted per epoch and interleaved, then shuffled, decoded and
batched by pipeline.py's own functions.

The records are pipeline.py's schema (tfds_builder declares its features from build_plan's
record_spec), so pipeline's decode applies unchanged; metadata.json carries the build record
(dataset_info.py's keys) and is checked against config.data as pipeline.py checks dataset_info.json.
"""
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mapkd_jax.data import dataset_info
from mapkd_jax.data import pipeline


def is_tfds_dir(path):
  """True for a prepared TFDS dataset folder (features.json beside dataset_info.json), False
  for build_shards' shard directory; pipeline.py can dispatch on it."""
  path = os.fspath(path)
  return all(os.path.isfile(os.path.join(path, name))
             for name in ('dataset_info.json', 'features.json'))


def dataset_folder(path):
  """The prepared TFDS folder that `path` names, or None (a shard directory of another writer).

  `path` itself when it is one; `path/<tfds_dir>` when its dataset_info.json is the build record
  that `python -m data_prep.build_shards` writes beside the builder's output (key `tfds_dir`).
  """
  path = os.fspath(path)
  if is_tfds_dir(path):
    return path
  try:
    with open(os.path.join(path, dataset_info.INFO_FILENAME)) as f:
      relative = json.load(f).get('tfds_dir')
  except (OSError, ValueError, AttributeError):
    return None   # the readers' own checks name what is missing or malformed
  return None if not relative else os.path.join(path, relative)


def load_builder(data_dir):
  """The read-only builder of a prepared dataset folder (no builder code needed to read it).

  Raises:
    FileNotFoundError: naming the folder when it holds no prepared TFDS dataset.
  """
  data_dir = os.fspath(data_dir)
  if not is_tfds_dir(data_dir):
    raise FileNotFoundError(f'{data_dir}: no prepared TFDS dataset (dataset_info.json and '
                            f'features.json); build it with `tfds build --imports '
                            f'data_prep.tfds_builder mapkd_nuscenes/<config>`')
  return tfds.builder_from_directory(data_dir)


def _metadata(builder, data_dir):
  meta = dict(builder.info.metadata or {})
  if 'splits' not in meta or 'schema_version' not in meta:
    raise ValueError(f'{data_dir}/metadata.json: no build record (splits / schema_version); '
                     f'not written by data_prep/tfds_builder.py')
  return meta


def split_files(data_dir, split):
  """Paths of the TFDS record files of `split`, in record order (pipeline.read_vectors reads
  them as it reads a shard directory's files: every record, without TFDS's count check).

  Raises:
    ValueError / FileNotFoundError as `virtual_shards`.
  """
  builder = load_builder(data_dir)
  return [path for path in dict.fromkeys(
      path for shard in virtual_shards(builder, os.fspath(data_dir), split)
      for path, _, _ in shard)]


def virtual_shards(builder, data_dir, split):
  """build_shards' files of `split` as TFDS file segments.

  Returns:
    [[(path, skip, take), ...] per build_shards file, in build_shards' file order].
  Raises:
    ValueError: unknown split, or recorded shard sizes that do not add up to the split's
      example count (naming metadata.json).
  """
  meta = _metadata(builder, data_dir)
  if split not in meta['splits'] or split not in builder.info.splits:
    raise ValueError(f'{data_dir}: no split {split!r}; known: {sorted(meta["splits"])}')
  sizes = [int(s) for s in meta['splits'][split]['shard_sizes']]
  info = builder.info.splits[split]
  if sum(sizes) != info.num_examples:
    raise ValueError(f'{data_dir}/metadata.json: splits[{split!r}].shard_sizes sum to '
                     f'{sum(sizes)} but the split holds {info.num_examples} examples')
  files = [(os.path.join(data_dir, name), int(length))
           for name, length in zip(info.filenames, info.shard_lengths)]
  for path, _ in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: listed in {data_dir}/dataset_info.json (split '
                              f'{split!r}) but missing')
  out, file_index, offset = [], 0, 0   # offset: position inside files[file_index]
  for size in sizes:
    segments = []
    while size > 0:
      path, length = files[file_index]
      take = min(size, length - offset)
      if take > 0:
        segments.append((path, offset, take))
      size, offset = size - take, offset + take
      if offset == length:
        file_index, offset = file_index + 1, 0
    out.append(segments)
  return out


def host_shards(data_dir, split, data_config, *, process_index=None, process_count=None):
  """(this host's virtual shards, all TFDS files of the split), after checking the config.

  Raises:
    FileNotFoundError / ValueError as `load_builder`, `virtual_shards`,
    `dataset_info.check_dataset_info`; ValueError for a host that gets no shard.
  """
  import jax  # Imported here: only needed for the default host identity.
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  data_dir = os.fspath(data_dir)
  builder = load_builder(data_dir)
  if builder.info.file_format.value != 'tfrecord':
    raise ValueError(f'{data_dir}: file format {builder.info.file_format.value!r}; this reader '
                     f'reads tfrecord (the builder\'s default)')
  dataset_info.check_dataset_info(_metadata(builder, data_dir), data_config, data_dir)
  shards = virtual_shards(builder, data_dir, split)
  mine = shards[process_index::process_count]
  if not mine:
    raise ValueError(f'{data_dir}: split {split!r} has {len(shards)} shards, fewer than the '
                     f'{process_count} processes; process {process_index} would get none '
                     f'(rebuild with a larger num_shards in the builder config)')
  files = sorted({path for shard in shards for path, _, _ in shard})
  return mine, files


def _records(shards, cycle_length):
  """Interleaved serialized records of `shards` (lists of segments), as pipeline.py's files."""
  table = [(k, path, skip, take) for k, shard in enumerate(shards)
           for path, skip, take in shard]
  ids, paths, skips, takes = (list(column) for column in zip(*table)) if table else ([], [], [], [])
  segments = tf.data.Dataset.from_tensor_slices((tf.constant(ids, tf.int64),
                                                 tf.constant(paths, tf.string),
                                                 tf.constant(skips, tf.int64),
                                                 tf.constant(takes, tf.int64)))

  def shard_records(k):
    return segments.filter(lambda i, p, s, t: tf.equal(i, k)).flat_map(
        lambda i, p, s, t: tf.data.TFRecordDataset(p).skip(s).take(t))

  order = tf.data.Dataset.from_tensor_slices(tf.range(len(shards), dtype=tf.int64))
  return order.interleave(shard_records, cycle_length=min(cycle_length, len(shards)),
                          block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)


def make_dataset(data_dir, split, data_config, *, batch_size, seed, epoch=0, shuffle=True,
                 skip_batches=0, process_index=None, process_count=None, with_tokens=False,
                 drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, cycle_length=4,
                 threads=None):
  """One epoch of this host's batches; arguments and result as `pipeline.make_dataset`."""
  pipeline._hide_gpus_from_tf()  # pylint: disable=protected-access
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  shards, _ = host_shards(data_dir, split, data_config, process_index=process_index,
                          process_count=process_count)
  file_seed, example_seed = pipeline._epoch_seeds(seed, epoch)  # pylint: disable=protected-access
  if shuffle:
    shards = [shards[i] for i in np.random.default_rng(file_seed).permutation(len(shards))]
  ds = _records(shards, cycle_length)
  if shuffle:
    ds = ds.shuffle(data_config.shuffle_buffer, seed=example_seed, reshuffle_each_iteration=False)
  ds = ds.skip(skip_batches * batch_size)
  return pipeline.decode_and_batch(ds, data_config, batch_size=batch_size,
                                   with_tokens=with_tokens, drop_remainder=drop_remainder,
                                   num_parallel_calls=num_parallel_calls, threads=threads)
