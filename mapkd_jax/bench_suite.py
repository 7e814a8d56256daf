"""Every benchmark of the scaling issue in one command, for a short accelerator lease.

  python -m mapkd_jax.bench_suite --out /tmp/bench --parallel 4 --deadline_s 540

Runs train_bench (each stage, float32 and mixed precision, batch --batch_per_device) and bench
(inference of every model, batch 1) as separate processes, --parallel at a time, in the order
of JOBS (most wanted first). Compiles overlap, which is what makes the suite fit a short lease
on a many-core host; timed calls never do: every process takes its turn on the device through
bench.device_turn's file lock ($MAPKD_BENCH_DEVICE_LOCK). A compile time measured while other
processes compile is therefore an upper bound of the same compile alone; each record carries
`concurrent_jobs` to say so.

A job that has not started when --deadline_s has passed is skipped; one still running then is
killed. Everything lands in --out as three files (few files, since a lease may bring back only
a handful): `summary.json` (each job's command, exit status, wall time and JSON records),
`logs.tar.gz` (each job's stderr) and `env.txt` (versions, devices).
"""
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app
from absl import flags

from mapkd_jax import bench as bench_lib

TRAIN_STAGES = ('teacher', 'coach', 'student', 'hd_pretrain')


@dataclasses.dataclass
class Job:
  name: str
  argv: list       # after `python -m`
  process: object = None
  output_files: tuple = ()   # (stdout, stderr) temporary files while it runs
  started: float = 0.0
  wall_s: float = None
  status: str = 'pending'   # pending | running | ok | failed (rc) | killed | skipped
  returncode: int = None
  stdout: str = ''
  stderr: str = ''


REMAT_FLAGS = tuple(f'--config.model.{block}.remat=True'
                    for block in ('camera', 'lss', 'neck', 'decoder', 'lidar', 'hd', 'sd')) + (
                        '--config.model.hd.remat_upsample=True',)


def default_jobs(*, batch_per_device, iters, warmup, precisions, stages=TRAIN_STAGES,
                 config_args='', remat_stages=('teacher', 'coach', 'student'),
                 step_timeout_s=180.0):
  """The suite's jobs, most wanted first.

  Float32 train steps of every stage (each with the warm-compile child), float32 inference of
  every model (batch 1), then mixed precision, then float32 steps with every block's remat on
  (memory per remat setting), then mixed-precision inference. `config_args` is appended to
  each config's argument (e.g. ',tiny' for a smoke run). A train job whose steps take longer
  than `step_timeout_s` dumps its stacks and ends (its compile record is already out): on
  the first H200 lease the reference-size student's first step never returned.
  """
  def train(stage, precision, *extra):
    argv = ['mapkd_jax.train_bench', f'--config=configs/tcs.py:{stage}{config_args}',
            f'--stages={stage}', f'--batch_per_device={batch_per_device}', f'--iters={iters}',
            f'--warmup={warmup}', '--shards=', f'--config.mixed_precision={precision == "bf16"}',
            f'--step_timeout_s={step_timeout_s}', *extra]
    if precision != 'f32' or extra:   # the warm compile is measured once per stage
      argv.append('--nowarm_compile')
    suffix = '_remat' if extra else ''
    return Job(f'train_{stage}_{precision}{suffix}', argv)

  def infer(precision):
    return Job(f'infer_all_{precision}', [
        'mapkd_jax.bench', f'--config=configs/tcs.py:student{config_args}', '--models=all',
        '--batch=1', '--iters=20', '--warmup=3', f'--config.mixed_precision={precision == "bf16"}'])

  jobs = []
  if 'f32' in precisions:
    jobs += [train(stage, 'f32') for stage in stages] + [infer('f32')]
  if 'bf16' in precisions:
    jobs += [train(stage, 'bf16') for stage in stages]
  if 'f32' in precisions:
    jobs += [train(stage, 'f32', *REMAT_FLAGS) for stage in stages if stage in remat_stages]
  if 'bf16' in precisions:
    jobs.append(infer('bf16'))
  return jobs


def records_of(stdout):
  """The JSON object lines of a job's stdout."""
  out = []
  for line in stdout.splitlines():
    line = line.strip()
    if line.startswith('{'):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


def environment_text():
  """Versions and devices of this host, for env.txt."""
  lines = [f'python {platform.python_version()} {sys.executable}', f'host {platform.node()}',
           f'cpus {os.cpu_count()}']
  try:
    import jax  # pylint: disable=g-import-not-at-top
    import flax  # pylint: disable=g-import-not-at-top
    lines += [f'jax {jax.__version__} flax {flax.__version__} backend {jax.default_backend()}',
              f'devices {jax.devices()}']
  except Exception as e:  # pylint: disable=broad-except
    lines.append(f'jax unavailable: {e!r}')
  try:
    lines.append(subprocess.run(['nvidia-smi'], capture_output=True, text=True,
                                timeout=30).stdout)
  except (OSError, subprocess.SubprocessError) as e:
    lines.append(f'nvidia-smi: {e!r}')
  return '\n'.join(lines)


def run_jobs(jobs, *, parallel, deadline_s, env, log=print, poll_s=1.0):
  """Runs `jobs` at most `parallel` at a time until done or until `deadline_s` has passed.

  A job's stdout and stderr go to temporary files, not pipes: nothing reads a running job's
  output, and a job that wrote more than a pipe holds (XLA's logs can) would block on it.
  """
  start = time.monotonic()
  pending = list(jobs)
  running = []

  def finish(job, status):
    job.process.wait()
    for handle in job.output_files:
      handle.seek(0)
    job.stdout, job.stderr = (handle.read() for handle in job.output_files)
    for handle in job.output_files:
      handle.close()
    job.returncode = job.process.returncode
    job.wall_s = round(time.monotonic() - job.started, 2)
    job.status = status if status != 'done' else ('ok' if job.returncode == 0 else 'failed')
    log(f'[{time.monotonic() - start:7.1f}s] {job.name}: {job.status} '
        f'(rc {job.returncode}, {job.wall_s} s)')

  while pending or running:
    elapsed = time.monotonic() - start
    for job in list(running):
      if job.process.poll() is not None:
        finish(job, 'done')
        running.remove(job)
      elif elapsed > deadline_s:
        job.process.kill()
        finish(job, 'killed')
        running.remove(job)
    if elapsed > deadline_s:
      for job in pending:
        job.status = 'skipped'
      pending = []
    while pending and len(running) < parallel:
      job = pending.pop(0)
      job.started = time.monotonic()
      job.output_files = (tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+'))
      job.process = subprocess.Popen([sys.executable, '-m', *job.argv], text=True, env=env,
                                     stdout=job.output_files[0], stderr=job.output_files[1])
      job.status = 'running'
      running.append(job)
      log(f'[{elapsed:7.1f}s] {job.name}: started ({len(running)} running)')
    time.sleep(poll_s)
  return jobs


def write_outputs(out_dir, jobs, *, parallel, env_text):
  """summary.json, logs.tar.gz and env.txt in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  summary = [{'job': j.name, 'command': ['python', '-m', *j.argv], 'status': j.status,
              'returncode': j.returncode, 'wall_s': j.wall_s, 'concurrent_jobs': parallel,
              'records': records_of(j.stdout),
              'stderr_tail': j.stderr[-1500:] if j.status != 'ok' else ''} for j in jobs]
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with tarfile.open(os.path.join(out_dir, 'logs.tar.gz'), 'w:gz') as tar:
    for job in jobs:
      data = (job.stderr + '\n--- stdout ---\n' + job.stdout).encode()
      info = tarfile.TarInfo(f'{job.name}.log')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with open(os.path.join(out_dir, 'env.txt'), 'w') as f:
    f.write(env_text)
  return summary


def define_flags():
  flags.DEFINE_string('out', None, 'Folder for summary.json, logs.tar.gz and env.txt.')
  flags.DEFINE_integer('parallel', 4, 'Benchmark processes at a time (compiles overlap; timed '
                       'calls take turns on the device).')
  flags.DEFINE_float('deadline_s', 540.0, 'Start no job after this many seconds; kill those '
                     'still running then.')
  flags.DEFINE_integer('batch_per_device', 8, 'Per-device batch of the train steps.')
  flags.DEFINE_integer('iters', 10, 'Timed train steps per job.')
  flags.DEFINE_integer('warmup', 2, 'Untimed train steps per job.')
  flags.DEFINE_list('precisions', ['f32', 'bf16'], 'Compute precisions, from f32, bf16.')
  flags.DEFINE_list('stages', list(TRAIN_STAGES), f'Train stages, from {list(TRAIN_STAGES)}.')
  flags.DEFINE_float('step_timeout_s', 180.0, 'A train job whose steps take longer dumps its '
                     'stacks and ends (train_bench --step_timeout_s).')
  flags.DEFINE_list('only', [], 'Run only these job names (default: all).')
  flags.DEFINE_string('config_args', '', "Appended to each job's config argument, e.g. ',tiny' "
                      'for a quick smoke run of the suite.')


def main(argv):
  del argv
  f = flags.FLAGS
  for precision in f.precisions:
    if precision not in ('f32', 'bf16'):
      raise ValueError(f'--precisions: unknown {precision!r}; known: f32, bf16')
  for stage in f.stages:
    if stage not in TRAIN_STAGES:
      raise ValueError(f'--stages: unknown {stage!r}; known: {list(TRAIN_STAGES)}')
  if f.parallel < 1:
    raise ValueError(f'--parallel must be >= 1, got {f.parallel}')
  jobs = default_jobs(batch_per_device=f.batch_per_device, iters=f.iters, warmup=f.warmup,
                      precisions=f.precisions, stages=f.stages, config_args=f.config_args,
                      step_timeout_s=f.step_timeout_s)
  if f.only:
    names = {j.name for j in jobs}
    unknown = sorted(set(f.only) - names)
    if unknown:
      raise ValueError(f'--only: unknown jobs {unknown}; known: {sorted(names)}')
    jobs = [j for j in jobs if j.name in f.only]
  # The processes share one device: none may grab most of its memory up front (this one
  # included: environment_text initializes the backend).
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  env = dict(os.environ)
  lock = tempfile.NamedTemporaryFile(prefix='bench_suite_lock_', delete=False)
  env[bench_lib.DEVICE_LOCK_ENV] = lock.name
  env_text = environment_text()
  print(env_text.splitlines()[2] if len(env_text.splitlines()) > 2 else env_text, flush=True)
  run_jobs(jobs, parallel=f.parallel, deadline_s=f.deadline_s, env=env,
           log=lambda s: print(s, flush=True))
  summary = write_outputs(f.out, jobs, parallel=f.parallel, env_text=env_text)
  os.unlink(lock.name)
  for entry in summary:
    for record in entry['records']:
      print(json.dumps({'job': entry['job'], **{k: record.get(k) for k in (
          'stage', 'model', 'compute_dtype', 'compile_s', 'compile_warm_s', 'step_s_median',
          'samples_per_s', 'mfu', 'mem_peak_bytes', 'device_peak_bytes_in_use', 'name',
          'frames_per_s', 'latency_ms_median') if k in record}}), flush=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('out')
  app.run(main)
