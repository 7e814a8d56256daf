"""Inference speed of teacher, coach and student on this device, one JSON line per model.

  python -m mapkd_jax.bench --config configs/tcs.py:student --batch 1
  python -m mapkd_jax.bench --config configs/tcs.py:student,tiny --models student,teacher

The config only supplies sizes (its stage token is irrelevant); --models picks what is timed:
teacher, coach, coach_norefine (the coach without HD refinement, when the config's coach has
it), student, or 'all' (default) for every one of them. Each model gets random-init variables
(speed does not depend on their values) and a random batch per `schema.batch_spec` with a
plausible camera rig; it runs in eval mode. Per model: parameters and FLOPs (from
models.summary), compile time, median / p90 latency and frames/s over --iters timed calls
after --warmup untimed ones, each ending in `block_until_ready` (`time_jitted`, shared with
the other benchmarks). A final line holds the
student/teacher and student/coach frames/s ratios of this run (MapKD's claim: student >= 3x
teacher, >= 1.5x coach on the same device). --torch_student adds the PyTorch eager reference
student (same shapes, random weights) timed in the same process, its calls alternating with
the JAX student's:

  python -m mapkd_jax.bench --config configs/tcs.py:student --models student --torch_student
"""
import contextlib
import fcntl
import json
import os
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from mapkd_jax import models as models_lib
from mapkd_jax.data import schema
from mapkd_jax.models import summary as summary_lib

# A file named by this variable is held (flock, exclusive) while time_jitted runs its calls, so
# that benchmark processes compiling in parallel on a many-core host (bench_suite) take turns on
# the device for their timed calls: compiles overlap, timings do not.
DEVICE_LOCK_ENV = 'MAPKD_BENCH_DEVICE_LOCK'
ALL_MODELS = ('teacher', 'coach', 'coach_norefine', 'student')
# Speed targets of the student (frames/s ratio), from the MapKD paper's claim.
RATIO_TARGETS = {'teacher': 3.0, 'coach': 1.5}


def model_names(requested, config):
  """Expands 'all' and checks the names against ALL_MODELS.

  Raises:
    ValueError: naming --models and the unknown entry.
  """
  if list(requested) == ['all']:
    names = list(ALL_MODELS)
    if not config.model.hd.coach_refine:   # the config's coach is already the variant
      names.remove('coach_norefine')
    return names
  for name in requested:
    if name not in ALL_MODELS:
      raise ValueError(f"--models: unknown model {name!r}; known: {list(ALL_MODELS)} or 'all'")
  return list(requested)


def variant(name, config):
  """(registry name, frozen config) of a benchmarked model name."""
  # A real copy via to_dict: ConfigDict(frozen) / as_configdict() share state with the frozen
  # config, so editing them leaks the variant into every later copy.
  config = ml_collections.ConfigDict(config.to_dict())
  if name == 'coach_norefine':
    config.model.hd.coach_refine = False
    return 'coach', ml_collections.FrozenConfigDict(config)
  return name, ml_collections.FrozenConfigDict(config)


def camera_rig(num_cams, batch_size, image_hw, *, rng, hfov_deg=70.0, mount_height=1.6,
               mount_radius=1.0, jitter_deg=2.0):
  """Plausible calibration: cameras spread evenly in yaw on a ring, looking outwards.

  Returns:
    intrinsics [B, C, 3, 3], cam_rotation [B, C, 3, 3] (camera -> ego; camera x right,
    y down, z forward), cam_translation [B, C, 3], all float32.
  """
  height, width = image_hw
  focal = (width / 2) / np.tan(np.deg2rad(hfov_deg) / 2)
  intrinsics = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])
  yaw = (2 * np.pi * np.arange(num_cams) / num_cams
         + np.deg2rad(rng.uniform(-jitter_deg, jitter_deg, (batch_size, num_cams))))
  forward = np.stack([np.cos(yaw), np.sin(yaw), np.zeros_like(yaw)], -1)
  right = np.stack([np.sin(yaw), -np.cos(yaw), np.zeros_like(yaw)], -1)
  down = np.broadcast_to(np.array([0.0, 0.0, -1.0]), forward.shape)
  rotation = np.stack([right, down, forward], axis=-1)   # columns = camera axes in ego
  translation = mount_radius * forward + np.array([0.0, 0.0, mount_height])
  return (np.broadcast_to(intrinsics, (batch_size, num_cams, 3, 3)).astype(np.float32),
          rotation.astype(np.float32), translation.astype(np.float32))


def random_batch(config, batch_size, *, seed):
  """A random model batch with every key of `schema.batch_spec` (numpy arrays).

  Images are standard-normal (already normalized), LiDAR points fill the BEV range and are all
  valid (the worst case for the pillar scatter), the SD prior is random -1/+1, labels are 0.
  """
  spec = schema.batch_spec(config.data, batch_size)
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  batch['images'] = rng.standard_normal(spec['images'][0]).astype(np.float32)
  batch['intrinsics'], batch['cam_rotation'], batch['cam_translation'] = camera_rig(
      len(config.data.cameras), batch_size, tuple(config.data.image_size), rng=rng)
  batch['ego_pose'][:] = np.eye(4, dtype=np.float32)
  points = batch['lidar_points']
  points[..., 0] = rng.uniform(config.data.bev_x[0], config.data.bev_x[1], points.shape[:2])
  points[..., 1] = rng.uniform(config.data.bev_y[0], config.data.bev_y[1], points.shape[:2])
  points[..., 2] = rng.uniform(-2.0, 2.0, points.shape[:2])
  points[..., 3] = rng.uniform(0.0, 1.0, points.shape[:2])
  batch['lidar_mask'][:] = True
  batch['sd_prior'] = rng.choice(np.array([-1.0, 1.0], np.float32), spec['sd_prior'][0])
  return batch


class Timing(NamedTuple):
  """Wall-clock seconds of `iters` timed calls; `output` is the last call's result."""
  median_s: float
  spread_s: float   # interquartile range (p75 - p25) of the timed calls
  p90_s: float
  min_s: float
  max_s: float
  times_s: tuple    # every timed call, in order
  output: Any


@contextlib.contextmanager
def device_turn():
  """Holds the exclusive lock on the file named by $MAPKD_BENCH_DEVICE_LOCK, if it is set.

  Yields the seconds spent waiting for it (0.0 without the variable).
  """
  path = os.environ.get(DEVICE_LOCK_ENV)
  if not path:
    yield 0.0
    return
  start = time.perf_counter()
  with open(path, 'a') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield time.perf_counter() - start
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def time_jitted(fn, args, *, iters, warmup, next_args=None):
  """Times `fn(*args)` (a jitted or compiled callable) to completion of its outputs.

  Each call ends in `jax.block_until_ready` of its output, so asynchronous dispatch does
  not hide device time; the `warmup` untimed calls come first (autotuning, allocator). With
  $MAPKD_BENCH_DEVICE_LOCK set, warmup and timed calls run while holding that file's lock
  (device_turn), so that concurrent benchmark processes never time on a shared device.

  Args:
    fn: the callable to time; compile it beforehand, or the first warmup call does.
    args: tuple of positional arguments of the first call.
    iters: timed calls (>= 1); the median and spread are over these.
    warmup: untimed calls (>= 0) before them.
    next_args: optional `(args, output) -> args` of the next call, for steps that donate their
      inputs (a train step gets its new state back: the donated buffers are gone).
  Returns:
    Timing.
  Raises:
    ValueError: iters < 1 or warmup < 0.
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f'--iters must be >= 1 and --warmup >= 0, got {iters}, {warmup}')
  advance = next_args or (lambda a, _: a)
  output = None
  times = []
  with device_turn():   # warmup too: its first calls may still allocate or autotune
    for _ in range(warmup):
      output = jax.block_until_ready(fn(*args))
      args = advance(args, output)
    for _ in range(iters):
      start = time.perf_counter()
      output = jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
      args = advance(args, output)
  return _timing(times, output)


def _timing(times, output):
  """Timing of a list of call durations (seconds)."""
  times = np.asarray(times)
  p25, p50, p75, p90 = np.percentile(times, [25, 50, 75, 90])
  return Timing(median_s=float(p50), spread_s=float(p75 - p25), p90_s=float(p90),
                min_s=float(times.min()), max_s=float(times.max()),
                times_s=tuple(float(t) for t in times), output=output)


def paired_ratio(numerator_s, denominator_s):
  """Round-by-round ratios of two alternating timings: numerator_s[i] / denominator_s[i].

  With calls alternating (time_alternating), round i's two calls ran within a few seconds of
  each other, so a burst of load from other processes mostly falls on both; the median of
  the per-round ratios is less sensitive to it than the ratio of the two medians, whose calls
  may come from different rounds. For frames/s of A over B pass B's times over A's.

  Args:
    numerator_s, denominator_s: sequences of seconds of equal length >= 1 (Timing.times_s).
  Returns:
    {'median', 'min', 'max'} of the per-round ratios (floats, rounded to 3 places).
  Raises:
    ValueError: the lengths differ or are 0, or a denominator is not positive.
  """
  num, den = np.asarray(numerator_s, np.float64), np.asarray(denominator_s, np.float64)
  if num.shape != den.shape or num.ndim != 1 or num.size == 0:
    raise ValueError(f'paired_ratio needs two equally long non-empty timings, got '
                     f'{num.shape} and {den.shape}')
  if np.any(den <= 0):
    raise ValueError(f'paired_ratio: non-positive denominator time in {den.tolist()}')
  ratios = num / den
  return {'median': round(float(np.median(ratios)), 3), 'min': round(float(ratios.min()), 3),
          'max': round(float(ratios.max()), 3)}


def time_alternating(calls, *, iters, warmup):
  """Times several callables in rounds, one call of each per round, in the given order.

  For a speed RATIO on a shared host: load that comes and goes (other processes on the same
  cores) then falls on every callable alike, where timing one after the other lets a busy
  minute land on one of them only. Each call ends in `jax.block_until_ready` (a no-op on
  torch tensors, whose eager CPU calls return when done); held under device_turn like
  time_jitted.

  Args:
    calls: {name: (fn, args)}.
    iters, warmup: timed and untimed rounds (iters >= 1, warmup >= 0).
  Returns:
    {name: Timing}.
  Raises:
    ValueError: iters < 1 or warmup < 0.
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f'--iters must be >= 1 and --warmup >= 0, got {iters}, {warmup}')
  times = {name: [] for name in calls}
  outputs = {}
  with device_turn():
    for round_index in range(warmup + iters):
      for name, (fn, args) in calls.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(fn(*args))
        if round_index >= warmup:
          times[name].append(time.perf_counter() - start)
  return {name: _timing(times[name], outputs[name]) for name in calls}


def prepare_model(name, config, *, batch_size, seed):
  """(compiled eval-mode forward, its args, record fields) of a benchmarked model name."""
  registry_name, model_config = variant(name, config)
  model = models_lib.build(registry_name, model_config)
  batch = jax.device_put(random_batch(model_config, batch_size, seed=seed))
  rngs = {name: jax.random.key(seed) for name in ('params', 'dropout', 'mask')}
  variables = jax.jit(lambda b: model.init(rngs, b, train=False))(batch)
  summary = summary_lib.summarize(registry_name, model_config, batch_size)

  start = time.perf_counter()
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False)).lower(variables, batch).compile()
  compile_s = time.perf_counter() - start
  fields = {'name': name, 'params': summary['params'], 'flops': summary['flops'],
            'compile_s': round(compile_s, 3)}
  return forward, (variables, batch), fields


def _latency_fields(timing, *, batch_size, iters, warmup):
  return {
      'latency_ms_median': round(1e3 * timing.median_s, 3),
      'latency_ms_p90': round(1e3 * timing.p90_s, 3),
      'latency_ms_iqr': round(1e3 * timing.spread_s, 3),
      'frames_per_s': round(batch_size / timing.median_s, 3),
      'iters': iters, 'warmup': warmup, 'batch': batch_size}


def _model_record(fields, timing, *, batch_size, iters, warmup, config_name):
  return {**fields, **_latency_fields(timing, batch_size=batch_size, iters=iters, warmup=warmup),
          'device_kind': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
          'config_name': config_name}


def bench_model(name, config, *, batch_size, iters, warmup, seed, config_name=''):
  """Times one model's eval-mode forward pass; returns its JSON-ready record."""
  if iters < 1 or warmup < 0:
    raise ValueError(f'--iters must be >= 1 and --warmup >= 0, got {iters}, {warmup}')
  forward, args, fields = prepare_model(name, config, batch_size=batch_size, seed=seed)
  timing = time_jitted(forward, args, iters=iters, warmup=warmup)
  return _model_record(fields, timing, batch_size=batch_size, iters=iters, warmup=warmup,
                       config_name=config_name)


def bench_torch_student(config, *, batch_size, iters, warmup, seed, config_name='',
                        alongside=None):
  """Times the PyTorch eager reference student (tests/torch_ref_bev.Student) on this CPU.

  The reference architecture the converter maps (PMapNet_sdmap_S: EfficientNet-B0 CamEncode,
  HDMapNet view MLP + IPM, BEV tail), random weights (speed does not depend on their values),
  eval mode under torch.no_grad, the same batch shapes as the JAX student's call. torch and
  the tests/ references are imported here only: no other code of this package needs them.

  Args:
    alongside: optional (fn, args) of another callable (the JAX student) to time in
      alternation with the torch student (time_alternating); then returns (torch record,
      that callable's Timing).

  Raises:
    FileNotFoundError: tests/torch_ref_bev.py cannot be found (run from the repo root).
    ValueError: the config's student is not the reference's (only that one has a torch twin).
  """
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  tests_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')
  if not os.path.exists(os.path.join(tests_dir, 'torch_ref_bev.py')):
    raise FileNotFoundError(f'--torch_student needs {tests_dir}/torch_ref_bev.py (a source '
                            'checkout of mapkd-jax)')
  camera = config.model.camera
  if camera.image_encoder != 'efficientnet_b0' or camera.view_transform != 'hdmapnet':
    raise ValueError('--torch_student: the PyTorch reference student has an efficientnet_b0 '
                     'encoder and the hdmapnet view transform; the config has '
                     f'{camera.image_encoder!r} / {camera.view_transform!r}')
  import torch  # pylint: disable=g-import-not-at-top   (after the checks: it takes seconds)
  # The references import each other as top-level modules (also inside forward): tests/ stays
  # on the path until the timing is done.
  sys.path.insert(0, tests_dir)
  try:
    forward = _torch_student_forward(config, torch, batch_size=batch_size, seed=seed)
    if alongside is None:
      timing, other = time_jitted(forward, (), iters=iters, warmup=warmup), None
    else:
      timings = time_alternating({'other': alongside, 'torch': (forward, ())}, iters=iters,
                                 warmup=warmup)
      timing, other = timings['torch'], timings['other']
  finally:
    sys.path.remove(tests_dir)
  record = {'name': 'torch_student', 'framework': f'torch {torch.__version__} eager',
            'torch_threads': torch.get_num_threads(),
            **_latency_fields(timing, batch_size=batch_size, iters=iters, warmup=warmup),
            'config_name': config_name}
  if alongside is not None:
    # Frames/s of the other (JAX) call over torch's, round by round (paired_ratio).
    record['other_over_torch_fps_per_round'] = paired_ratio(timing.times_s, other.times_s)
  return record if alongside is None else (record, other)


def _torch_student_forward(config, torch, *, batch_size, seed):
  """bench_torch_student's model and batch (tests/ on sys.path): a no-argument callable."""
  import torch_ref_bev  # pylint: disable=g-import-not-at-top
  camera = config.model.camera
  canvas = schema.bev_shape(config.data.bev_x, config.data.bev_y)
  model = torch_ref_bev.Student(image_hw=tuple(config.data.image_size), canvas=tuple(canvas),
                                cam_channels=camera.channels,
                                n_views=len(config.data.cameras)).eval()
  batch = random_batch(config, batch_size, seed=seed)
  images = torch.from_numpy(np.ascontiguousarray(batch['images'].transpose(0, 1, 4, 2, 3)))
  rots, trans = torch.from_numpy(batch['cam_rotation']), torch.from_numpy(batch['cam_translation'])

  def forward():
    with torch.no_grad():   # eager CPU torch is synchronous: the call returns when done
      return model(images, rots, trans)['semantic']

  return forward


def speed_ratios(records):
  """{'student_over_<model>_fps': ratio} for every timed model besides the student."""
  fps = {r['name']: r['frames_per_s'] for r in records}
  if 'student' not in fps:
    return {}
  # torch_student: >= 1 means the jitted JAX student is at least as fast as PyTorch eager.
  return {f'student_over_{name}_fps': round(fps['student'] / value, 3)
          for name, value in fps.items() if name != 'student'}


def run(config, names, *, batch_size, iters, warmup, seed, config_name='', emit=print,
        torch_student=False):
  """Benchmarks `names` in order, emitting one JSON line each, then the ratio line.

  With `torch_student`, the PyTorch eager reference student is timed in the same process
  (bench_torch_student), in alternation with the JAX student when that is among `names`
  (time_alternating: one call of each per round, so that load from other processes falls on
  both), and the ratio line gains student_over_torch_student_fps (ratio of the medians) and,
  when alternating, student_over_torch_student_fps_per_round_{median,min,max} (of the
  per-round ratios, paired_ratio).
  """
  records = []
  alternate = torch_student and 'student' in names
  for name in names:
    if alternate and name == 'student':
      continue   # timed below, in alternation with the torch student
    records.append(bench_model(name, config, batch_size=batch_size, iters=iters, warmup=warmup,
                               seed=seed, config_name=config_name))
    emit(json.dumps(records[-1]))
  if alternate:
    # One JAX call, one torch call, and so on: the ratio of a loaded host stays meaningful.
    forward, args, fields = prepare_model('student', config, batch_size=batch_size, seed=seed)
    torch_record, timing = bench_torch_student(
        config, batch_size=batch_size, iters=iters, warmup=warmup, seed=seed,
        config_name=config_name, alongside=(forward, args))
    records.append({**_model_record(fields, timing, batch_size=batch_size, iters=iters,
                                    warmup=warmup, config_name=config_name),
                    'timed': 'alternating with torch_student'})
    emit(json.dumps(records[-1]))
    records.append({**torch_record, 'timed': 'alternating with student'})
    emit(json.dumps(records[-1]))
  elif torch_student:
    records.append(bench_torch_student(config, batch_size=batch_size, iters=iters,
                                       warmup=warmup, seed=seed, config_name=config_name))
    emit(json.dumps(records[-1]))
  ratios = speed_ratios(records)
  if alternate:
    # The median of the per-round ratios beside the ratio of medians (paired_ratio says why).
    # Flat float fields, as every other ratio (report.py formats each value as a number).
    for stat, value in records[-1]['other_over_torch_fps_per_round'].items():
      ratios[f'student_over_torch_student_fps_per_round_{stat}'] = value
  targets = {f'student_over_{k}_fps': v for k, v in RATIO_TARGETS.items()
             if f'student_over_{k}_fps' in ratios}
  emit(json.dumps({'name': 'ratios', **ratios, 'targets': targets,
                   'device_kind': jax.devices()[0].device_kind, 'batch': batch_size,
                   'config_name': config_name}))
  return records, ratios


def define_flags():
  """Defines the CLI flags; only when run as a script, so importing this module defines none."""
  # models.summary defines --config and --models at import; allow_override lets these (with
  # this script's help texts) replace them instead of raising DuplicateFlagError.
  config_flags.DEFINE_config_file(
      'config', None, 'Config giving the model sizes, e.g. configs/tcs.py:student or '
      'configs/tcs.py:student,tiny,bev=120x60 (the stage token does not matter).',
      lock_config=True, allow_override=True)
  flags.DEFINE_list('models', ['all'], f"Models to time, from {list(ALL_MODELS)}, or 'all'. "
                    'coach_norefine = the coach with config.model.hd.coach_refine off (skipped '
                    'under all when the config coach already lacks it).', allow_override=True)
  flags.DEFINE_integer('batch', 1, 'Batch size of every timed call.')
  flags.DEFINE_integer('iters', 20, 'Timed calls per model (median / p90 over these).')
  flags.DEFINE_integer('warmup', 3, 'Untimed calls per model after compilation.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random variables and inputs.')
  flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads for --torch_student; 0 = '
                       "torch's default (one per core). XLA's own thread count is set by "
                       'XLA_FLAGS (--xla_cpu_multi_thread_eigen=false limits Eigen\'s; XLA:CPU '
                       'may still run independent operations in parallel).')
  flags.DEFINE_bool('torch_student', False, 'Also time the PyTorch eager reference student '
                    '(tests/torch_ref_bev.py; needs the [torch] extra) in the same run; the '
                    'ratio line gives student_over_torch_student_fps.')


def main(argv):
  del argv
  f = flags.FLAGS
  config = ml_collections.FrozenConfigDict(f.config)
  if f.torch_student and f.torch_threads:
    import torch  # pylint: disable=g-import-not-at-top   (only with the flags that need it)
    torch.set_num_threads(f.torch_threads)
  run(config, model_names(f.models, config), batch_size=f.batch, iters=f.iters,
      warmup=f.warmup, seed=f.seed, config_name=f['config'].config_filename,
      emit=lambda line: print(line, flush=True), torch_student=f.torch_student)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
