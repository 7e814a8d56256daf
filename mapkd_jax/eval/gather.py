"""The shares of a multi-process evaluation -> process 0, through files, with a timeout.

Files, not a collective: the shares are nested, variable-size (vectors, per-sample AP
records), which jax's multihost_utils.process_allgather would need padded into fixed-size
arrays; the workdir is shared by all hosts anyway (they restore the same checkpoint and
process 0 writes the outputs there).

Process p writes eval/parts/<run>/process_<p>.npz (class maps) then process_<p>.json (the
rest), each by an atomic rename, so a .json on disk means the part is complete. Process 0
polls for every process's .json instead of waiting in a barrier: a process that died or hangs
would hold a barrier forever; here process 0 fails after `timeout_s` naming the missing
process ids and files. <run> is an id process 0 draws and broadcasts when all processes are
alive (evaluate does), so parts left behind by an earlier run that failed are never read as
this run's.

The other processes, once their part is written, wait for process 0's metrics.json in
evaluate's final barrier (jax), as before; this timeout bounds process 0's wait only. If
process 0 fails, they learn it only through jax's distributed runtime (process 0 runs its
coordination service).

Imports no jax (evaluate does the broadcast and the final barrier).
"""
import json
import os
import shutil
import time

import numpy as np


def part_paths(run_dir, process_index):
  """(.json, .npz) paths of a process's part in `run_dir`."""
  name = os.path.join(run_dir, f'process_{process_index:05d}')
  return f'{name}.json', f'{name}.npz'


def write_part(run_dir, process_index, part, maps):
  """Writes this process's part: `maps` ({name: array}) as .npz, then `part` (JSON) as .json."""
  os.makedirs(run_dir, exist_ok=True)
  json_path, npz_path = part_paths(run_dir, process_index)
  tmp = f'{npz_path}.tmp.npz'
  np.savez(tmp, **maps)
  os.replace(tmp, npz_path)
  with open(f'{json_path}.tmp', 'w') as f:
    json.dump(part, f)
  os.replace(f'{json_path}.tmp', json_path)   # last: marks the part complete


def wait_for_parts(run_dir, process_count, *, timeout_s, poll_s=0.5, clock=time.monotonic,
                   sleep=time.sleep):
  """Waits until every process's part is complete in `run_dir`.

  Args:
    timeout_s: seconds to wait (config.eval.gather_timeout_s), counted from this call.
    poll_s: seconds between looks.
    clock, sleep: injectable for tests.

  Raises:
    TimeoutError: after `timeout_s`, naming the processes whose part is missing and its files
      (the parts already written stay on disk).
  """
  if timeout_s <= 0:
    raise ValueError(f'config.eval.gather_timeout_s must be > 0, got {timeout_s}')
  deadline = clock() + timeout_s
  while True:
    missing = [k for k in range(process_count)
               if not os.path.exists(part_paths(run_dir, k)[0])]
    if not missing:
      return
    if clock() >= deadline:
      files = [p for k in missing for p in part_paths(run_dir, k)]
      raise TimeoutError(
          f'multi-process evaluation: after {timeout_s:g} s (config.eval.gather_timeout_s) '
          f'process 0 still has no part from process(es) {missing} of {process_count}; '
          f'missing files: {files}. A process died or hangs: see its log; rerun the '
          'evaluation (parts of this run are left in place).')
    sleep(min(poll_s, max(deadline - clock(), 0.0)))


def read_parts(run_dir, process_count):
  """(parts, maps) of every process in process order; removes `run_dir` afterwards."""
  parts, all_maps = [], []
  for k in range(process_count):
    json_path, npz_path = part_paths(run_dir, k)
    with open(json_path) as f:
      parts.append(json.load(f))
    with np.load(npz_path) as z:
      all_maps.append({key: z[key] for key in z.files})
  shutil.rmtree(run_dir)
  parent = os.path.dirname(run_dir)
  if os.path.isdir(parent) and not os.listdir(parent):
    os.rmdir(parent)
  return parts, all_maps


def gather(run_dir, part, maps, *, process_index, process_count, timeout_s, poll_s=0.5):
  """Writes this process's part; on process 0 waits for all and returns (parts, maps).

  Returns:
    On process 0: (list of parts, list of map dicts) in process order; elsewhere None.

  Raises:
    TimeoutError: on process 0, as `wait_for_parts`.
  """
  write_part(run_dir, process_index, part, maps)
  if process_index != 0:
    return None
  wait_for_parts(run_dir, process_count, timeout_s=timeout_s, poll_s=poll_s)
  return read_parts(run_dir, process_count)


def merge_parts(parts, all_maps):
  """One part (as one process's, in sample order) from every process's part and maps.

  Each part holds 'indices' (the samples' places in the one-process order), 'tokens',
  'records', 'predictions', 'gt' and 'counts'; maps hold 'pred' and 'gt' class maps.
  """
  indices = np.concatenate([np.asarray(p['indices'], np.int64) for p in parts])
  order = np.argsort(indices, kind='stable')
  tokens = [t for p in parts for t in p['tokens']]
  merged = {'indices': indices[order].tolist(), 'tokens': [tokens[i] for i in order],
            'records': {}, 'predictions': {}, 'gt': {}, 'counts': {}}
  for p in parts:
    for key in ('records', 'predictions', 'gt'):
      merged[key].update(p[key])
  for name in parts[0]['counts']:
    merged['counts'][name] = np.sum([np.asarray(p['counts'][name], np.int64) for p in parts],
                                    axis=0).tolist()
  merged['predictions'] = {t: merged['predictions'][t] for t in merged['tokens']}
  merged['gt'] = {t: merged['gt'][t] for t in merged['tokens']}
  maps = {k: np.concatenate([m[k] for m in all_maps])[order] for k in ('pred', 'gt')}
  return merged, maps
