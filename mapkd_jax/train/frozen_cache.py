"""Frozen-output cache: the frozen teacher's and coach's outputs, computed once per sample.

Built by the CLI mapkd_jax/cache_frozen.py (or the demo, or `ensure`):
  python -m mapkd_jax.cache_frozen --config configs/tcs.py:student --workdir ROOT
  python launch.py --config configs/tcs.py:student --workdir ROOT --config.kd.cached_frozen=True

A distilling stage (coach, student) uses only two outputs of each frozen model: the semantic
logits (MSRD) and `bev_small` (TGPD). They depend only on the sample: the frozen models run in
eval mode (BatchNorm running statistics, no dropout, no masking rng) and the input pipeline has
no augmentation (data/pipeline.py decodes and normalizes only; shuffling changes the order, not
a sample). So they are computed once per train sample here, and training with
config.kd.cached_frozen=True reads them instead of running the frozen models every step.

Layout: one cache per frozen model, `<model dir>/frozen_cache/` beside its checkpoints
(ROOT/teacher/frozen_cache, ROOT/coach/frozen_cache; config.kd.frozen_cache_dir=D puts them at
D/<model>): the coach stage and every student seed or ablation share them.
  meta.json      what the cache was computed from (checkpoint dir, step and a fingerprint of
                 its meta item; shard dir and dataset_info.json fingerprint; the model and data
                 config; the dtype); written last: a cache without it is not a cache.
  tokens.json    sample tokens, row order of the arrays.
  semantic.npy   [N, H, W, K] semantic logits of the train split;
  bev_small.npy  [N, h, w, C];
stored as float32, or as bfloat16 bits in uint16 (config.kd.frozen_cache_dtype, default
'bfloat16': half the size; the loss difference is measured by tests/test_cache_frozen.py).
A build writes into `frozen_cache.partial/` and records finished rows in progress.json after
each batch: an interrupted build resumes there, and the directory is renamed to
`frozen_cache` only when complete.

Size per sample and frozen model (`output_shapes`, `bytes_per_sample`), bfloat16 (float32: x2):
  reference (configs/tcs.py:student): semantic 200 x 400 x 4 + bev_small 25 x 50 x 192
    = 1.12 MB; teacher + coach 2.24 MB a sample, 63 GB for nuScenes' 28130 train samples;
  demo / tiny: semantic 50 x 100 x 4 + bev_small 25 x 50 x 32 = 120 KB; teacher + coach
    240 KB a sample, 58 MB for the demo's 240 train samples.
"""
import functools
import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from mapkd_jax.data import dataset_info as info_lib
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import stages

FORMAT_VERSION = 1
KEYS = ('semantic', 'bev_small')   # what losses/distill.py reads of a frozen model
SPLIT = 'train'                    # distillation runs in training steps only
DTYPES = ('bfloat16', 'float32')
_META = 'meta.json'
_TOKENS = 'tokens.json'
_PROGRESS = 'progress.json'
_PARTIAL_SUFFIX = '.partial'


def command(config, workdir):
  """The command that builds the caches of `config`'s stage."""
  return (f'python -m mapkd_jax.cache_frozen --config configs/tcs.py:{config.stage}'
          f'{stages._modifiers(config)} --workdir {workdir}')  # pylint: disable=protected-access


def cache_dir(config, workdir, name):
  """Where frozen model `name`'s cache lives: beside its checkpoint directory by default."""
  root = config.kd.get('frozen_cache_dir', '')
  if root:
    return os.path.join(os.path.abspath(root), name)
  ckpt_dir = stages.dependency_dir(config, workdir, f'frozen.{name}', name)
  return os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), 'frozen_cache')


def _dtype_name(config):
  return config.kd.get('frozen_cache_dtype', 'bfloat16')


def _sha(data):
  return hashlib.sha256(data).hexdigest()[:16]


def _json_sha(obj):
  return _sha(json.dumps(obj, sort_keys=True, default=str).encode())


def _config_fingerprint(config):
  """What the frozen outputs depend on besides weights and shards: the model section (sizes,
  LiDAR padding mode, ...), the data section's decoding keys and the compute precision."""
  data = {k: v for k, v in config.data.to_dict().items()
          if k not in ('shards', 'root', 'prep_workers', 'shuffle_buffer', 'synthetic')}
  return _json_sha({'model': config.model.to_dict(), 'data': data,
                    'mixed_precision': config.get('mixed_precision', False)})


def expected_meta(config, workdir, name, shards_dir):
  """The meta.json a valid cache of frozen model `name` has for this config and workdir."""
  ckpt_dir = os.path.abspath(stages.dependency_dir(config, workdir, f'frozen.{name}', name))
  step, ckpt_meta = ckpt_lib.read_meta(ckpt_dir)
  with open(info_lib.info_path(shards_dir), 'rb') as f:
    shards_fp = _sha(f.read())
  info = info_lib.load_dataset_info(shards_dir)
  return {
      'format_version': FORMAT_VERSION,
      'model': name,
      'checkpoint_dir': ckpt_dir,
      'checkpoint_step': int(step),
      # The same step number can be trained again (another seed, a rerun): the step's own
      # meta item (its config and metrics) tells the two apart.
      'checkpoint_meta_fingerprint': _json_sha(ckpt_meta),
      'shards_dir': os.path.abspath(shards_dir),
      'shards_fingerprint': shards_fp,
      'split': SPLIT,
      'num_samples': int(info['splits'][SPLIT]['num_samples']),
      'config_fingerprint': _config_fingerprint(config),
      'dtype': _dtype_name(config),
      'keys': list(KEYS),
  }


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json_atomic(path, obj):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _differences(found, wanted):
  return [f'{k}: cache has {found.get(k)!r}, this run needs {wanted[k]!r}'
          for k in wanted if found.get(k) != wanted[k]]


class StaleCacheError(ValueError):
  """A cache computed from other weights, shards, config or dtype than this run's."""


def check(config, workdir, name, shards_dir):
  """The cache directory of `name`, after checking it is complete and matches this run.

  Raises:
    FileNotFoundError: no complete cache (naming the command that builds it).
    StaleCacheError: naming each differing field with the cache's and this run's value.
  """
  directory = cache_dir(config, workdir, name)
  meta_path = os.path.join(directory, _META)
  if not os.path.isfile(meta_path):
    partial = os.path.isdir(directory + _PARTIAL_SUFFIX)
    raise FileNotFoundError(
        f'config.kd.cached_frozen=True but {directory} holds no complete {name} output cache'
        f'{" (an interrupted build is in " + directory + _PARTIAL_SUFFIX + ")" if partial else ""}'
        f'; build it with: {command(config, workdir)}')
  found, wanted = _read_json(meta_path), expected_meta(config, workdir, name, shards_dir)
  diffs = _differences(found, wanted)
  if diffs:
    raise StaleCacheError(f'{directory} is stale for this run ({"; ".join(diffs)}); rebuild it '
                          f'with: {command(config, workdir)}')
  return directory


class _ModelCache:
  """One frozen model's cache, memory-mapped; rows looked up by sample token."""

  def __init__(self, directory, dtype_name):
    self.directory = directory
    tokens = _read_json(os.path.join(directory, _TOKENS))
    self.row = {t: i for i, t in enumerate(tokens)}
    self.arrays = {k: np.load(os.path.join(directory, f'{k}.npy'), mmap_mode='r') for k in KEYS}
    self.bfloat16 = dtype_name == 'bfloat16'

  def rows(self, tokens):
    """{key: [len(tokens), ...]} float32 or bfloat16 host arrays."""
    try:
      index = np.asarray([self.row[t] for t in tokens])
    except KeyError as e:
      raise KeyError(f'{self.directory}: sample {e.args[0]!r} is not in the cache (its shards '
                     'differ from the cached ones; rebuild the cache)') from None
    out = {}
    for key, array in self.arrays.items():
      values = np.asarray(array[index])
      out[key] = values.view(ml_dtypes.bfloat16) if self.bfloat16 else values
    return out


class FrozenCache:
  """The caches of a stage's frozen models, as the trainer reads them."""

  def __init__(self, caches):
    self.caches = caches   # {name: _ModelCache}

  def host_rows(self, tokens):
    """{name: {'semantic': [B, H, W, K], 'bev_small': [B, h, w, C]}} for this host's tokens."""
    return {name: cache.rows(list(tokens)) for name, cache in self.caches.items()}

  def global_batch(self, tokens, mesh):
    """host_rows as global jax.Arrays sharded over 'data' like the batch."""
    from mapkd_jax.train import sharding  # pylint: disable=g-import-not-at-top
    # Not sharding.host_batch_to_global: it keeps numeric dtypes by kind, and bfloat16's is 'V'.
    batch_sharding = sharding.batch_sharding(mesh)
    return {name: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                   for k, v in rows.items()}
            for name, rows in self.host_rows(tokens).items()}

  def shardings(self, batch_sharding):
    return {name: {k: batch_sharding for k in KEYS} for name in self.caches}


def open_for_training(config, workdir, shards_dir):
  """Checks and opens the caches of `config`'s frozen models (see `check` for the errors)."""
  from mapkd_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  caches = {}
  for name in step_lib.frozen_names(config):
    directory = check(config, workdir, name, shards_dir)
    caches[name] = _ModelCache(directory, _dtype_name(config))
    logging.info('Frozen %s outputs read from %s', name, directory)
  return FrozenCache(caches)


def bytes_per_sample(shapes, dtype_name):
  """Bytes one sample takes in one model's cache, from {key: per-sample shape}."""
  itemsize = 2 if dtype_name == 'bfloat16' else 4
  return sum(int(np.prod(s)) * itemsize for s in shapes.values())


def output_shapes(config, name):
  """{key: per-sample shape} of frozen model `name`'s cached outputs under `config`."""
  from mapkd_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  model = models_lib.build(name, config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(0), 'mask': jax.random.key(0)}

  def forward():
    variables = model.init(rngs, dummy, train=False)
    return model.apply(variables, dummy, train=False)

  outputs = jax.eval_shape(forward)
  return {k: tuple(outputs[k].shape[1:]) for k in KEYS}


def frozen_outputs(variables, batch, *, name, model):
  """The cached outputs of one frozen model: train_step.frozen_forward's, keys KEYS, float32."""
  from mapkd_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  outputs = step_lib.frozen_forward({name: variables}, batch, models={name: model})[name]
  return {k: outputs[k].astype(jnp.float32) for k in KEYS}


def _to_storage(array, dtype_name):
  if dtype_name == 'bfloat16':
    return np.asarray(array.astype(ml_dtypes.bfloat16)).view(np.uint16)
  return np.asarray(array, np.float32)


def build(config, workdir, name, shards_dir, *, after_batch=None):
  """Computes frozen model `name`'s cache of the train split (resuming an interrupted build).

  Args:
    after_batch: called with the number of finished rows after each batch (tests interrupt
      a build with it).

  Returns:
    The cache directory.
  """
  from mapkd_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from mapkd_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mapkd_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from mapkd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    raise RuntimeError(f'{command(config, workdir)} runs as one process (it reads every shard '
                       f'file); got {jax.process_count()} processes')
  wanted = expected_meta(config, workdir, name, shards_dir)
  directory = cache_dir(config, workdir, name)
  partial = directory + _PARTIAL_SUFFIX
  progress_path = os.path.join(partial, _PROGRESS)
  progress = _read_json(progress_path) if os.path.isfile(progress_path) else None
  if progress is None or progress['meta'] != wanted:
    if os.path.isdir(partial):
      logging.info('Discarding %s: built for other inputs', partial)
      shutil.rmtree(partial)
    os.makedirs(partial)
    progress = {'meta': wanted, 'tokens': []}
  done = len(progress['tokens'])

  mesh = sharding.make_mesh()
  batch_size = config.train.batch_size
  sharding.check_batch_size(batch_size, mesh)
  model = models_lib.build(name, config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  repl = sharding.replicated(mesh)
  _, variables = ckpt_lib.restore_params(
      wanted['checkpoint_dir'], stages.abstract_variables(model, dummy, mesh),
      step=wanted['checkpoint_step'], what=f'frozen {name} for its output cache')
  shapes = output_shapes(config, name)
  num = wanted['num_samples']
  mode = 'r+' if done else 'w+'
  arrays = {k: np.lib.format.open_memmap(
      os.path.join(partial, f'{k}.npy'), mode=mode,
      dtype=np.uint16 if wanted['dtype'] == 'bfloat16' else np.float32, shape=(num,) + shapes[k])
      for k in KEYS}

  forward_fn = jax.jit(functools.partial(frozen_outputs, name=name, model=model), in_shardings=(repl, sharding.batch_sharding(mesh)),
                       out_shardings=repl)
  if done % batch_size and done != num:
    raise ValueError(f'{progress_path}: {done} finished rows is not a multiple of the batch '
                     f'size {batch_size}; delete {partial} and rebuild')
  batches = [] if done == num else pipeline.iterate(shards_dir, SPLIT, config.data, batch_size=batch_size,
                             seed=config.seed, shuffle=False, num_epochs=1, drop_remainder=False,
                             with_tokens=True, position={'epoch': 0, 'batch': done // batch_size},
                             process_index=0, process_count=1)
  logging.info('Caching frozen %s outputs (%s step %d) of %d %s samples into %s (%d done)',
               name, wanted['checkpoint_dir'], wanted['checkpoint_step'], num, SPLIT, partial,
               done)
  with tqdm.tqdm(total=num, initial=done, desc=f'cache {name}', unit='sample') as bar:
    for host in batches:
      tokens = [str(t) for t in host.pop('sample_token')]
      rows = len(tokens)
      outputs = jax.device_get(forward_fn(variables, sharding.host_batch_to_global(
          trainer.pad_batch(host, batch_size), mesh)))
      for k in KEYS:
        arrays[k][done:done + rows] = _to_storage(outputs[k][:rows], wanted['dtype'])
        arrays[k].flush()
      done += rows
      progress['tokens'].extend(tokens)
      _write_json_atomic(progress_path, progress)   # after the rows it counts are on disk
      bar.update(rows)
      if after_batch is not None:
        after_batch(done)
  if done != num or len(set(progress['tokens'])) != num:
    raise ValueError(f'{shards_dir}: split {SPLIT!r} gave {done} samples '
                     f'({len(set(progress["tokens"]))} distinct tokens) but dataset_info.json '
                     f'says {num}')
  del arrays
  _write_json_atomic(os.path.join(partial, _TOKENS), progress['tokens'])
  os.remove(progress_path)
  _write_json_atomic(os.path.join(partial, _META), wanted)
  if os.path.isdir(directory):
    shutil.rmtree(directory)   # a stale cache (check() refused it)
  os.replace(partial, directory)
  logging.info('Frozen %s output cache complete: %s (%.1f MB)', name, directory,
               num * bytes_per_sample(shapes, wanted['dtype']) / 2**20)
  return directory


def ensure(config, workdir):
  """Builds every missing or stale cache of `config`'s frozen models; returns {name: dir}.

  `config` is the distilling stage's config (coach or student) and `workdir` its --workdir
  (the frozen checkpoints are found as training finds them: config.frozen.* or
  WORKDIR/<model>/checkpoints). A no-op for stages without frozen models.
  """
  from mapkd_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  shards_dir = stages.ensure_data(config, workdir)
  stages.check_dependencies(config, workdir)
  out = {}
  for name in step_lib.frozen_names(config):
    try:
      out[name] = check(config, workdir, name, shards_dir)
      logging.info('Frozen %s output cache up to date: %s', name, out[name])
    except (FileNotFoundError, StaleCacheError) as e:
      logging.info('%s', e)
      start = time.time()
      out[name] = build(config, workdir, name, shards_dir)
      logging.info('Built %s in %.1f s', out[name], time.time() - start)
  return out
