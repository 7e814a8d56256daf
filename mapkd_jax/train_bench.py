"""Training speed, compile time, memory and MFU of each TCS stage: one JSON line per stage.

  python -m mapkd_jax.train_bench --config configs/tcs.py:student --batch_per_device 8
  python -m mapkd_jax.train_bench --config configs/tcs.py:student,tiny --stages student
  python -m mapkd_jax.train_bench --config configs/tcs.py:teacher --stages teacher \
      --compile_only --hlo_blocks          # reference size: memory and HLO size per block

Times the real jitted `train_step` (frozen teacher/coach forwards included for coach and
student) on random variables and a random batch, sharded over all local devices as the trainer
does. Per stage:

- compile: `lower_s` (tracing) and `compile_cold_s`, XLA's compile in this process with an
  empty persistent compilation cache; then `compile_warm_s`, the same compile in a *second
  process* (spawned here, `--compile_only`) that finds the executable in that cache, with
  `warm_cache_hit` saying it did. The cache is --compile_cache_dir (default: a new temporary
  directory, removed afterwards); min compile time and entry size are 0 so the CPU caches too.
- step: median, interquartile spread and p90 seconds over --iters steps (bench.time_jitted),
  samples/s overall and per device; `input_samples_per_s`, the input pipeline alone on
  --shards (default config.data.shards) with the same per-host batch, or null with the reason.
- memory, per device: the compiled step's `memory_analysis()` (argument / output / temp /
  alias / code bytes; `mem_peak_bytes` = argument + output + temp - alias, the buffers live at
  once) and, where the device has them, `memory_stats()`'s peak_bytes_in_use and bytes_limit.
- FLOPs: `cost_analysis()` of the compiled step, i.e. of one device's partition of it (forward,
  backward, optimizer and frozen forwards: everything the step executes; measured: 8 devices
  at batch 8 give the FLOPs of 1 device at batch 1). XLA counts a while-loop body once, so
  with nn.scan layers (the HD prior's ViT) the figure is a lower bound: `while_trip_counts`
  and `flops_note` say so. `model_flops_per_step` counts the matmuls and convolutions of the
  step's jaxpr (summary.jaxpr_matmul_flops: scan bodies times their length; elementwise work
  not counted), for the whole batch and per device; MFU uses it, against
  the chip's published peak at the step's compute dtype (mapkd_jax/peak_flops.py); null on
  devices without one (CPU), with the reason.
- --hlo_blocks: instruction counts of the step's HLO before and after XLA's optimization per
  top-level model block (models.summary.hlo_block_counts), to show what dominates compile time,
  and `hlo_phases`: the optimized HLO's instructions per phase of the step (train_step's named
  scopes: frozen forward, loss forward, gradient backward, optimizer update, ...).
"""
import faulthandler
import functools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mapkd_jax import bench
from mapkd_jax import peak_flops as peak_lib
from mapkd_jax.data import schema
from mapkd_jax.models import summary as summary_lib
from mapkd_jax.train import sharding
from mapkd_jax.train import step as step_lib

STAGES = ('hd_pretrain', 'teacher', 'coach', 'student', 'student_nokd')
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
_HLO_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?%\S+\s*=\s')
_HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')


def phase_of(op_name):
  """The train-step phase of an HLO op_name, from train_step's named scopes.

  'jit(train_step)/gradient/jvp(loss)/...' is the loss forward, '.../gradient/transpose(jvp(
  loss))/...' its backward (the gradient); 'frozen_forward', 'optimizer_update', 'ema_update'
  and 'metrics' are their own scopes; anything else (e.g. rng folding) is 'other'. The bodies
  of reductions and scatters carry their primitive's name only: 'called'.
  """
  if '/' not in op_name:
    return 'called'
  parts = op_name.split(';')[0].split('/')
  for scope in ('frozen_forward', 'optimizer_update', 'ema_update', 'metrics'):
    if scope in parts:
      return scope
  if 'gradient' in parts:
    return 'gradient_backward' if 'transpose(' in op_name else 'loss_forward'
  return 'other'


def hlo_phase_counts(hlo_text):
  """{phase: instruction count} of an HLO module's text (fusion bodies included)."""
  counts = {}
  for line in hlo_text.splitlines():
    if _HLO_INSTRUCTION.match(line):
      name = _HLO_OP_NAME.search(line)
      phase = phase_of(name.group(1)) if name else '(no op_name)'
      counts[phase] = counts.get(phase, 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def stage_config(config, stage):
  """A copy of `config` for one stage (student_nokd = the baseline)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.stage, config.nokd = ('student', True) if stage == 'student_nokd' else (stage, False)
  return config


def use_compile_cache(cache_dir, *, min_compile_time_secs=0.0, min_entry_size_bytes=0):
  """Points JAX's persistent compilation cache at `cache_dir`; returns the previous settings.

  The thresholds default to 0 so that CPU compiles (often under JAX's 1 s default) are written
  too. Resets the cache object, in case this process already opened another directory;
  `use_compile_cache(**previous)` puts the previous settings back.
  """
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  previous = {'cache_dir': jax.config.jax_compilation_cache_dir,
              'min_compile_time_secs': jax.config.jax_persistent_cache_min_compile_time_secs,
              'min_entry_size_bytes': jax.config.jax_persistent_cache_min_entry_size_bytes}
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', min_entry_size_bytes)
  compilation_cache.reset_cache()
  return previous


class _CacheHits:
  """Counts persistent-cache hits (jax.monitoring events) while it is registered."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, **kwargs):
    del kwargs
    if event == _CACHE_HIT_EVENT:
      self.count += 1


def build_step(config, *, batch_per_device, seed=0):
  """The stage's jitted train step and the abstract (shape, sharding) arguments it takes.

  Returns:
    dict with 'step' (jitted, state donated), 'abstract' = (state, frozen, batch, rng) as
    ShapeDtypeStructs with their shardings, 'init' = callable making the concrete arguments,
    'mesh', 'batch_size'.
  """
  if step_lib.cached_frozen(config):
    # The cached step takes the frozen outputs as inputs; this bench builds the live one.
    raise ValueError('train_bench times the step with live frozen models: drop '
                     '--config.kd.cached_frozen=True (a cached step costs about the baseline '
                     "step, README 'Frozen-output cache')")
  mesh = sharding.make_mesh(jax.local_devices())
  batch_size = batch_per_device * mesh.size
  models = step_lib.make_models(config)
  names = tuple(models)
  tgpd = step_lib.make_tgpd(config)
  tx = step_lib.make_optimizer(config)
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  spec = schema.batch_spec(config.data, batch_size)
  abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
                    for k, (shape, dtype) in spec.items()}
  init_batch = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype)
                for k, v in abstract_batch.items()}
  init = functools.partial(step_lib.init_state, models=models, tgpd=tgpd, tx=tx, config=config)
  rngs = {k: jax.random.key(seed) for k in ('params', 'dropout', 'mask')}
  frozen_init = {name: functools.partial(lambda b, m: m.init(rngs, b, train=False),
                                         m=models[name]) for name in names[1:]}
  state_shape = jax.eval_shape(lambda r, b: init(r, batch=b), jax.random.key(seed), init_batch)
  state_sh = sharding.state_shardings(mesh, state_shape)
  frozen_shape = {name: jax.eval_shape(fn, init_batch) for name, fn in frozen_init.items()}
  frozen_sh = jax.tree.map(lambda _: repl, frozen_shape)

  def with_sharding(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)

  rng_shape = jax.eval_shape(lambda: jax.random.key(seed))
  abstract = (with_sharding(state_shape, state_sh), with_sharding(frozen_shape, frozen_sh),
              abstract_batch, jax.ShapeDtypeStruct(rng_shape.shape, rng_shape.dtype,
                                                   sharding=repl))
  step = jax.jit(functools.partial(step_lib.train_step, models=models, tgpd=tgpd, tx=tx,
                                   config=config),
                 in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))

  def make_arguments():
    """Concrete (state, frozen, batch, rng): random variables, random batch (bench.random_batch)."""
    host = bench.random_batch(config, batch_size, seed=seed)
    one = {k: v[:1] for k, v in host.items()}
    state = jax.jit(lambda r, b: init(r, batch=b), out_shardings=state_sh)(
        jax.random.key(seed), one)
    frozen = {name: jax.jit(fn, out_shardings=repl)(one) for name, fn in frozen_init.items()}
    batch = sharding.host_batch_to_global(host, mesh)
    return state, frozen, batch, jax.device_put(jax.random.key(seed), repl)

  return {'step': step, 'abstract': abstract, 'init': make_arguments, 'mesh': mesh,
          'batch_size': batch_size}


def compile_step(step, abstract):
  """Traces, lowers and compiles `step` at `abstract`.

  Returns:
    (lowered, compiled, lower_s, compile_s, jaxpr): lower_s covers tracing and lowering; the
    jaxpr is the traced step's (for summary.jaxpr_matmul_flops).
  """
  start = time.perf_counter()
  traced = step.trace(*abstract)
  lowered = traced.lower()
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  return lowered, compiled, lower_s, time.perf_counter() - start, traced.jaxpr


def memory_record(compiled, device):
  """Per-device bytes of the compiled step (memory_analysis) and of the device (memory_stats)."""
  record = {}
  analysis = compiled.memory_analysis()
  if analysis is None:
    record['mem_note'] = 'memory_analysis() unavailable on this backend'
  else:
    for key in ('argument', 'output', 'temp', 'alias', 'generated_code'):
      record[f'mem_{key}_bytes'] = int(getattr(analysis, f'{key}_size_in_bytes'))
    # Arguments and outputs are live together except where an output reuses a donated
    # argument's buffer (alias); temporaries come on top at the step's worst point.
    record['mem_peak_bytes'] = (record['mem_argument_bytes'] + record['mem_output_bytes']
                                + record['mem_temp_bytes'] - record['mem_alias_bytes'])
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats:
    record['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
    record['device_bytes_limit'] = stats.get('bytes_limit')
  else:
    record['device_peak_bytes_in_use'] = record['device_bytes_limit'] = None
    record['device_memory_note'] = f'{device.platform} device has no memory_stats()'
  return record


def step_flops(compiled):
  """FLOPs of one device's partition of the compiled step (XLA cost analysis), or None."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX returned one dict per computation
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return None if flops is None or flops < 0 else float(flops)


def input_throughput(config, shards, *, batch_size, iters, warmup, seed=0):
  """(samples/s of the input pipeline alone on `shards`' train split, note) or (None, why)."""
  if not shards:
    return None, 'no shards: pass --shards DIR or --config.data.shards=DIR'
  if not os.path.isdir(shards):
    return None, f'--shards / config.data.shards {shards!r} is not a directory'
  from mapkd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  iterator = pipeline.iterate(shards, 'train', config.data, batch_size=batch_size, seed=seed,
                              shuffle=True, num_epochs=None)
  timing = bench.time_jitted(lambda: next(iterator), (), iters=iters, warmup=warmup)
  return batch_size / timing.median_s, f'{shards} train split, batch {batch_size}'


def warm_compile(argv, stage, cache_dir):
  """Runs this module with --compile_only in a new process on `cache_dir`; returns its record.

  Args:
    argv: this run's flags (config overrides included), the program name excluded.
  Raises:
    RuntimeError: the child failed, with its stderr's tail.
  """
  cmd = [sys.executable, '-m', 'mapkd_jax.train_bench', *argv, f'--stages={stage}',
         '--compile_only', '--nohlo_blocks', '--nowarm_compile',
         f'--compile_cache_dir={cache_dir}']
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f'warm-compile process failed ({" ".join(cmd)}):\n{done.stderr[-3000:]}')
  record = json.loads(done.stdout.strip().splitlines()[-1])
  if not record['cache_hit']:   # keep what the child logged about the cache, to see why
    record['cache_log'] = [line[-300:] for line in done.stderr.splitlines()
                           if 'cache' in line.lower()][-10:]
  return record


def directory_bytes(path):
  """Total size of the files under `path` (the persistent cache's entries)."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def bench_stage(config, *, batch_per_device, iters, warmup, compile_only=False,
                hlo_blocks=False, shards='', seed=0, on_compiled=None, step_timeout_s=0.0):
  """Compiles (and unless compile_only, times) one stage's train step; a JSON-ready record.

  The caller sets up the persistent compilation cache (use_compile_cache) beforehand.
  `on_compiled(record)`, if given, gets the compile-time part of the record (memory, FLOPs,
  compile time) with 'phase': 'compiled' before any step runs, so that a step that never
  returns still leaves those figures. `step_timeout_s` > 0: if making the arguments and the
  timed steps take longer, every thread's Python stack is written to stderr and the process
  exits (faulthandler), naming the stage, instead of hanging until killed from outside.
  """
  setup = build_step(config, batch_per_device=batch_per_device, seed=seed)
  device = setup['mesh'].devices.flat[0]
  hits = _CacheHits()
  jax.monitoring.register_event_listener(hits)
  try:
    lowered, compiled, lower_s, compile_s, jaxpr = compile_step(setup['step'],
                                                                setup['abstract'])
  finally:
    jax.monitoring.unregister_event_listener(hits)
  dtype = 'bf16' if config.mixed_precision else 'f32'
  record = {'stage': config.stage + ('_nokd' if config.nokd else ''),
            'batch': setup['batch_size'], 'batch_per_device': batch_per_device,
            'devices': setup['mesh'].size, 'device_kind': device.device_kind,
            'backend': jax.default_backend(), 'jax_version': jax.__version__,
            'compute_dtype': dtype,
            'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(
                setup['abstract'][0].params))),
            'lower_s': round(lower_s, 3), 'compile_s': round(compile_s, 3),
            'cache_hit': hits.count > 0, **memory_record(compiled, device),
            'flops_per_step_per_device': step_flops(compiled)}
  # Matmul and convolution FLOPs of the whole (global-batch) step from its jaxpr, scan bodies
  # times their length: the MFU numerator, exact where XLA's count is a lower bound.
  record['model_flops_per_step'] = summary_lib.jaxpr_matmul_flops(jaxpr)
  record['model_flops_per_step_per_device'] = record['model_flops_per_step'] / setup['mesh'].size
  loops = summary_lib.while_trip_counts(compiled.as_text())
  record['while_trip_counts'] = loops
  if any(trip is None or trip > 1 for trip in loops):
    record['flops_note'] = (
        'lower bound: XLA cost analysis counts each while-loop body once, and this step has '
        f'loops with trip counts {loops} (nn.scan layers); model_flops_per_step (from the '
        'jaxpr, scans times their length) does not have this problem')
  else:
    record['flops_note'] = 'XLA cost analysis of the compiled step (no multi-trip loops)'
  if hlo_blocks:
    record['hlo_blocks'] = summary_lib.hlo_block_counts(lowered, compiled)
    record['hlo_phases'] = hlo_phase_counts(compiled.as_text())
  if compile_only:
    return record
  if on_compiled is not None:
    on_compiled({**record, 'phase': 'compiled'})
  if step_timeout_s > 0:
    sys.stderr.write(f'train_bench: {record["stage"]}: steps must finish within '
                     f'{step_timeout_s} s (--step_timeout_s), else the stacks follow\n')
    sys.stderr.flush()
    faulthandler.dump_traceback_later(step_timeout_s, exit=True)
  try:
    arguments = setup['init']()
    timing = bench.time_jitted(compiled, arguments, iters=iters, warmup=warmup,
                               next_args=lambda args, out: (out[0],) + tuple(args[1:]))
  finally:
    if step_timeout_s > 0:
      faulthandler.cancel_dump_traceback_later()
  step_s = timing.median_s
  peak, source = peak_lib.peak_flops(device.device_kind, dtype)
  utilization = peak_lib.mfu(record['model_flops_per_step_per_device'], step_s, peak)
  input_sps, input_note = input_throughput(
      config, shards, batch_size=setup['batch_size'] // jax.process_count(), iters=iters,
      warmup=max(warmup, 1), seed=seed)
  record.update({
      'step_s_median': round(step_s, 5), 'step_s_iqr': round(timing.spread_s, 5),
      'step_s_p90': round(timing.p90_s, 5), 'iters': iters, 'warmup': warmup,
      'steps_per_s': round(1 / step_s, 4),
      'samples_per_s': round(setup['batch_size'] / step_s, 3),
      'samples_per_s_per_device': round(batch_per_device / step_s, 3),
      'input_samples_per_s': None if input_sps is None else round(input_sps, 2),
      'input_note': input_note,
      'peak_flops_per_s': peak, 'peak_flops_source': source,
      'mfu': None if utilization is None else round(utilization, 5),
      'mfu_note': source if utilization is None else
                  'model_flops_per_step_per_device / step_s_median / peak_flops_per_s',
      'loss': float(timing.output[1]['loss/total']),
      **{k: v for k, v in memory_record(compiled, device).items()
         if k.startswith('device_')},   # memory_stats again: now after real steps
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
  return record


def run_stage(config, *, argv, cache_dir, **kwargs):
  """bench_stage, then (given `argv`) the warm compile of the same step in a second process.

  Args:
    config: the stage's config (stage_config).
    argv: the flags that reproduce `config` in a new process (this run's sys.argv[1:]);
      None = no warm-compile measurement.
    cache_dir: the persistent compilation cache, already in use (use_compile_cache).
    kwargs: bench_stage's keyword arguments.
  Returns:
    bench_stage's record, plus compile_cold_s (null when this process already hit the cache),
    compile_warm_s, lower_warm_s, warm_cache_hit and cache_dir_bytes (the cache's size after
    this process's compiles) when `argv` is given; on a miss, warm_cache_log holds the child's
    log lines about the cache.
  """
  record = bench_stage(config, **kwargs)
  if argv is not None:
    stage = record['stage']
    record['compile_cold_s'] = None if record['cache_hit'] else record['compile_s']
    record['cache_dir_bytes'] = directory_bytes(cache_dir)
    warm = warm_compile(argv, stage, cache_dir)
    record.update(compile_warm_s=warm['compile_s'], lower_warm_s=warm['lower_s'],
                  warm_cache_hit=warm['cache_hit'])
    if 'cache_log' in warm:
      record['warm_cache_log'] = warm['cache_log']
  return record


def define_flags():
  """CLI flags; defined only when run as a program."""
  config_flags.DEFINE_config_file('config', None, 'Config giving the sizes, e.g. '
                                  'configs/tcs.py:student,tiny (its stage token is ignored).',
                                  lock_config=True)
  flags.DEFINE_list('stages', list(STAGES), f'Stages to time, from {list(STAGES)}.')
  flags.DEFINE_integer('batch_per_device', 1, 'Per-device batch of the timed steps.')
  flags.DEFINE_integer('iters', 5, 'Timed steps per stage (median over these).')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
  flags.DEFINE_bool('compile_only', False, 'Only lower and compile (memory, FLOPs, HLO); '
                    'no step is run.')
  flags.DEFINE_bool('hlo_blocks', False, 'Add HLO instruction counts per model block.')
  flags.DEFINE_bool('warm_compile', True, 'Measure compile_warm_s in a second process.')
  flags.DEFINE_string('compile_cache_dir', '', 'Persistent compilation cache directory; '
                      "'' = a new temporary one (empty: the first compile is cold), removed "
                      'at exit.')
  flags.DEFINE_float('step_timeout_s', 0.0, 'If > 0: a stage whose timed steps (argument set-'
                     'up included) take longer dumps its Python stacks and exits (a hung step '
                     'on an accelerator); its compile record is printed before the steps.')
  flags.DEFINE_string('shards', None, 'Shards for input_samples_per_s (default: '
                      'config.data.shards).')


def main(argv):
  del argv   # the child of warm_compile gets sys.argv's flags
  f = flags.FLAGS
  for stage in f.stages:
    if stage not in STAGES:
      raise ValueError(f'--stages: unknown stage {stage!r}; known: {list(STAGES)}')
  if f.iters < 1 or f.warmup < 0 or f.batch_per_device < 1:
    raise ValueError(f'--iters and --batch_per_device must be >= 1 and --warmup >= 0, got '
                     f'{f.iters}, {f.batch_per_device}, {f.warmup}')
  cache_dir = f.compile_cache_dir or tempfile.mkdtemp(prefix='train_bench_cache_')
  use_compile_cache(cache_dir)
  try:
    for stage in f.stages:
      record = run_stage(
          stage_config(f.config, stage), argv=sys.argv[1:] if f.warm_compile else None,
          cache_dir=cache_dir, batch_per_device=f.batch_per_device, iters=f.iters,
          warmup=f.warmup, compile_only=f.compile_only, hlo_blocks=f.hlo_blocks,
          shards=f.config.data.shards if f.shards is None else f.shards,
          on_compiled=lambda r: print(json.dumps(r), flush=True),
          step_timeout_s=f.step_timeout_s)
      print(json.dumps(record), flush=True)
  finally:
    if not f.compile_cache_dir:
      shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
