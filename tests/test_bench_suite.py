"""bench_suite's job runner and bench.device_turn's lock: cheap processes, no models."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from mapkd_jax import bench
from mapkd_jax import bench_suite


def _job(name, code):
  """A Job whose process runs `code` (run_jobs launches `python -m <argv>`: use -c instead)."""
  job = bench_suite.Job(name, [])
  job.argv = ['_bench_suite_probe', code]
  return job


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
  """A module `_bench_suite_probe` that execs its first argument, importable by children."""
  (tmp_path / '_bench_suite_probe.py').write_text('import sys\nexec(sys.argv[1])\n')
  path = os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')])
  monkeypatch.setenv('PYTHONPATH', path)
  return dict(os.environ)


def test_run_jobs_parallel_limit_deadline_and_outputs(probe_module, tmp_path):
  jobs = [_job('a', 'print(\'{"x": 1}\')'),
          _job('b', 'import sys; sys.exit(3)'),
          _job('slow', 'import time; time.sleep(60)'),
          _job('late', 'print(1)')]
  log = []
  start = time.monotonic()
  bench_suite.run_jobs(jobs, parallel=3, deadline_s=4.0, env=probe_module, log=log.append,
                       poll_s=0.1)
  assert time.monotonic() - start < 30   # the sleeper was killed at the deadline
  status = {j.name: j.status for j in jobs}
  assert status['a'] == 'ok' and status['b'] == 'failed' and jobs[1].returncode == 3
  assert status['slow'] == 'killed'
  # 'late' waits for a free slot (parallel=3 and three started first) -> it starts once a or b
  # ends, well before the deadline, and succeeds.
  assert status['late'] == 'ok'
  summary = bench_suite.write_outputs(str(tmp_path / 'out'), jobs, parallel=3, env_text='env')
  assert summary[0]['records'] == [{'x': 1}]
  assert json.load(open(tmp_path / 'out' / 'summary.json'))[2]['status'] == 'killed'
  with tarfile.open(tmp_path / 'out' / 'logs.tar.gz') as tar:
    assert sorted(tar.getnames()) == ['a.log', 'b.log', 'late.log', 'slow.log']


def test_run_jobs_skips_jobs_not_started_by_the_deadline(probe_module):
  jobs = [_job('slow', 'import time; time.sleep(60)'), _job('never', 'print(1)')]
  bench_suite.run_jobs(jobs, parallel=1, deadline_s=1.0, env=probe_module, log=lambda _: None,
                       poll_s=0.1)
  assert [j.status for j in jobs] == ['killed', 'skipped']


def test_a_job_writing_more_than_a_pipe_holds_finishes(probe_module):
  """Output goes to files: a job that logs more than a pipe's 64 KiB is not blocked on it."""
  jobs = [_job('loud', 'import sys; sys.stderr.write("x" * 300000); print("done")')]
  bench_suite.run_jobs(jobs, parallel=1, deadline_s=60.0, env=probe_module, log=lambda _: None,
                       poll_s=0.1)
  assert jobs[0].status == 'ok' and jobs[0].stdout == 'done\n'
  assert len(jobs[0].stderr) == 300000


def test_records_of_keeps_json_object_lines_only():
  out = 'hello\n{"a": 1}\n{broken\n  {"b": [2]}\n[1, 2]\n'
  assert bench_suite.records_of(out) == [{'a': 1}, {'b': [2]}]


def test_default_jobs_order_and_flags():
  jobs = bench_suite.default_jobs(batch_per_device=8, iters=10, warmup=2,
                                  precisions=['f32', 'bf16'])
  names = [j.name for j in jobs]
  assert names[:5] == ['train_teacher_f32', 'train_coach_f32', 'train_student_f32',
                       'train_hd_pretrain_f32', 'infer_all_f32']
  assert names[-1] == 'infer_all_bf16'
  assert len(names) == len(set(names)) == 13
  by_name = {j.name: j.argv for j in jobs}
  assert '--nowarm_compile' not in by_name['train_teacher_f32']
  assert '--config.mixed_precision=True' in by_name['train_coach_bf16']
  assert '--nowarm_compile' in by_name['train_coach_bf16']
  assert '--config.model.hd.remat=True' in by_name['train_teacher_f32_remat']


_HOLD = textwrap.dedent('''
    import sys, time
    from mapkd_jax import bench
    with bench.device_turn():
      print('start', time.time(), flush=True)
      time.sleep(float(sys.argv[1]))
      print('end', time.time(), flush=True)
''')


def test_device_turn_serializes_processes(tmp_path):
  env = dict(os.environ, **{bench.DEVICE_LOCK_ENV: str(tmp_path / 'lock')})
  procs = [subprocess.Popen([sys.executable, '-c', _HOLD, '1.0'], env=env, text=True,
                            stdout=subprocess.PIPE) for _ in range(2)]
  spans = []
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    lines = dict(line.split() for line in out.splitlines())
    spans.append((float(lines['start']), float(lines['end'])))
  (s0, e0), (s1, e1) = sorted(spans)
  assert s1 >= e0 - 0.05, f'the two holders overlapped: {spans}'


def test_device_turn_is_free_without_the_variable(monkeypatch):
  monkeypatch.delenv(bench.DEVICE_LOCK_ENV, raising=False)
  with bench.device_turn() as waited:
    assert waited == 0.0
