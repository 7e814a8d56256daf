"""The multi-process tests' runner: error lines on failure; only a taken port is retried."""
import os

import pytest

import two_processes

_SCRIPT = '''
import os, sys
marker, i = sys.argv[1], sys.argv[2]
if {fail} and not os.path.exists(marker + i):
  open(marker + i, 'w').close()
  print('E1201 00:00:00.0 1 coordination_service.cc:1] something went wrong', flush=True)
  print({message!r}, flush=True)
  print('Extension modules: numpy, scipy (total: 2)', flush=True)
  sys.exit(134)
print('ok', i)
'''


def _argv(tmp_path, *, fail, message):
  script = tmp_path / 'proc.py'
  script.write_text(_SCRIPT.format(fail=fail, message=message))
  return lambda i, port: [str(script), str(tmp_path / 'attempted'), str(i)]


def test_a_runtime_abort_is_not_retried(tmp_path):
  argv = _argv(tmp_path, fail=True, message=f'F1201 client.h:80] {two_processes.RUNTIME_ABORT}')
  with pytest.raises(AssertionError, match='attempt 1:[\\s\\S]*something went wrong') as info:
    two_processes.run(argv, timeout_s=60, before_retry=lambda: pytest.fail('retried'))
  assert 'Extension modules' not in str(info.value)


def test_a_taken_port_is_retried_once(tmp_path):
  argv = _argv(tmp_path, fail=True, message=f'JaxRuntimeError: {two_processes.PORT_TAKEN}')
  with pytest.warns(UserWarning, match='retrying once'):
    outputs, _ = two_processes.run(argv, timeout_s=60, before_retry=lambda: None)
  assert [o.strip() for o in outputs] == ['ok 0', 'ok 1']


def test_any_other_failure_is_not_retried(tmp_path):
  argv = _argv(tmp_path, fail=True, message='Traceback: ValueError: bad shard')
  with pytest.raises(AssertionError, match='attempt 1:[\\s\\S]*bad shard'):
    two_processes.run(argv, timeout_s=60, before_retry=lambda: pytest.fail('retried'))


def test_a_second_taken_port_fails(tmp_path):
  argv = _argv(tmp_path, fail=True, message=two_processes.PORT_TAKEN)
  # Each attempt fails: the marker files are removed before the retry.
  reset = lambda: [os.remove(tmp_path / f'attempted{i}') for i in range(2)]  # noqa: E731
  with pytest.warns(UserWarning), pytest.raises(AssertionError, match='attempt 2'):
    two_processes.run(argv, timeout_s=60, before_retry=reset)


def test_diagnosis_keeps_error_lines_and_drops_the_module_list():
  out = 'x\nE1201 12:00:00 a.cc:1] boom\n' + 'y\n' * 50 + 'Extension modules: ' + 'm, ' * 900
  text = two_processes.diagnosis(out)
  assert 'boom' in text and 'Extension modules' not in text and len(text) < 1000
