"""Runs one command as two jax.distributed processes on localhost, for the multi-process tests.

When a process fails, the test shows its error lines (not faulthandler's list of extension
modules, which was all that the last 3000 characters of an aborted process's output showed).
That is how session 8 found why CI aborted the 2-process training test: Orbax's multi-process
barriers of the latest and best checkpoint managers, which save the same step at once, shared
their keys (fixed in checkpoint._options); process 0's commit of best/1 failed, process 1 waited
in the barrier, and jax.distributed's shutdown barrier then aborted both after 300 s.

A coordinator port taken between free_port() and the bind (process 0 exits with 'Failed to start
RPC server', process 1 then aborts) is a race with the machine, not a property of the code: that,
and only that, is retried once on a fresh port, with the first attempt's diagnosis in a warning.
A runtime abort ('JAX distributed service detected fatal errors') fails the test: retrying it
would have hidden the checkpoint bug above.
"""
import os
import re
import socket
import subprocess
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_ABORT = 'JAX distributed service detected fatal errors'
# The coordinator's port, free when free_port() looked, taken before process 0 bound it (process
# 0 exits 1 with this; process 1 then aborts with RUNTIME_ABORT).
PORT_TAKEN = 'Failed to start RPC server'
# Seconds; passed as --heartbeat_timeout_s. Margin for a loaded machine (CI's abort was not a
# missed heartbeat, see above; this only keeps a slow machine from becoming a failure).
HEARTBEAT_TIMEOUT_S = 600


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def diagnosis(output, *, tail_lines=40):
  """The informative part of a failed process's output: its log's error and fatal lines, then its
  last lines, without faulthandler's one-line list of loaded extension modules."""
  lines = [line for line in output.splitlines() if not line.startswith('Extension modules:')]
  errors = [line for line in lines if re.match(r'[EF]\d{4} ', line)][:20]
  return '\n'.join(['error lines:', *errors, f'last {tail_lines} lines:', *lines[-tail_lines:]])


def _start(argv_for, port, env):
  return [subprocess.Popen([sys.executable, *argv_for(i, port)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def run(argv_for, *, timeout_s, before_retry, while_running=None, devices_per_process=4):
  """Runs argv_for(process_id, port) for process ids 0 and 1; asserts both exit 0.

  argv_for: (process_id, port) -> the arguments after `python` (a script or -m module, flags).
  before_retry: () -> None, called before the one retry; resets what the first attempt wrote.
  while_running: optional () -> value, run here once while the first attempt's processes run
    (the one-process reference, say); its value is returned.
  devices_per_process: CPU devices each process has.
  Returns (outputs of the two processes, while_running's value or None).
  """
  # Replaces the 8 devices conftest gives this process: 2 x 4 = the one-process reference's 8.
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
  result = None
  for attempt in (1, 2):
    procs = _start(argv_for, free_port(), env)
    try:
      if while_running is not None and attempt == 1:
        result = while_running()
      outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if not failed:
      return outputs, result
    report = '\n'.join(f'process {i} exited {procs[i].returncode}:\n{diagnosis(outputs[i])}'
                       for i in failed)
    if attempt == 1 and any(PORT_TAKEN in outputs[i] for i in failed):
      warnings.warn(f"the coordinator's port was taken; retrying once.\n{report}")
      before_retry()
      continue
    raise AssertionError(f'attempt {attempt}:\n{report}')
