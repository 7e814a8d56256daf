"""Evaluation of a trained stage: semantic mIoU, vector AP, figures.

  python -m mapkd_jax.evaluate --config configs/tcs.py:student,nokd,tiny --workdir runs/tiny \
      [--checkpoint best|latest|STEP] [--split val] [--num_images 4] \
      [--protocol maptr|pmapnet|legacy] [--workers N]

Restores only the `params` item of ROOT/<stage>/{best|checkpoints} (any device count), runs
the model jitted over the split (batch sharded over this process's devices, last batch
padded) and writes ROOT/<stage>/eval/: metrics.json, semantic.npz, predictions.json, gt.json
and PNG figures. Protocol: DESIGN.md section 4, mapkd_jax/eval/ and vectorize.py docstrings.
Vector AP follows MapTR's released evaluation by default; `--protocol pmapnet` computes
P-MapNet's (the paper's mAP column, its defects included on purpose and listed in
metrics.json).

Throughput. The forward of the next batch is dispatched before the current batch's outputs
are copied to the host, and each sample's host work (vectorization and its AP record:
Chamfer distances and matching) runs in `--workers` processes (default config.eval.workers,
0 = the CPU count), at most a few samples a worker queued; results are the same as inline
(workers 1). The pool starts 'spawn' processes, which import the caller's main module: a
script that calls `evaluate` must keep its work under `if __name__ == '__main__':` (launch.py
and this module do).

Several processes (jax.distributed, e.g. one per host): process p reads and decodes only
samples i with i % process_count == p of the one-process order (pipeline.eval_iterate) and
evaluates them on its own devices, writes its share (vectors, AP records, IoU counts, class
maps) under eval/parts/<run>/, and process 0 waits for every share (at most
config.eval.gather_timeout_s, then fails naming the missing processes: eval/gather.py),
merges them and writes the outputs; metrics.json is the one-process file.
"""
import functools
import json
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from tqdm import tqdm

from mapkd_jax import models as models_lib
from mapkd_jax import visualize
from mapkd_jax.data import dataset_info as info_lib
from mapkd_jax.data import pipeline
from mapkd_jax.data import schema
from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import files as vector_files
from mapkd_jax.eval import gather as gather_lib
from mapkd_jax.eval import metrics as metrics_lib
from mapkd_jax.eval import protocols
from mapkd_jax.eval import scoring
from mapkd_jax.eval import vectorize
from mapkd_jax.train import checkpoint as ckpt_lib
from mapkd_jax.train import sharding
from mapkd_jax.train import stages
from mapkd_jax.train import trainer


def _train_command(config, workdir):
  arg = config.stage + (',nokd' if config.nokd else '')
  if config.data.bev_name == 'tiny':
    arg += ',tiny'
  elif config.data.bev_name != '60x30':
    arg += f',bev={config.data.bev_name}'
  return f'python launch.py --config configs/tcs.py:{arg} --workdir {workdir}'


def checkpoint_location(config, workdir, checkpoint):
  """(manager directory, step or None) for --checkpoint best|latest|STEP."""
  stage_dir = os.path.join(workdir, stages.stage_dir_name(config))
  if checkpoint == 'best':
    return os.path.join(stage_dir, 'best'), None
  if checkpoint == 'latest':
    return os.path.join(stage_dir, 'checkpoints'), None
  try:
    return os.path.join(stage_dir, 'checkpoints'), int(checkpoint)
  except ValueError:
    raise ValueError(f"--checkpoint must be 'best', 'latest' or a step number, got "
                     f'{checkpoint!r}') from None


def _forward(variables, batch, *, model, with_direction=False):
  """Head outputs the evaluation reads; the direction logits only for config.eval.ordering=
  'reference' (the default: HDMapNet's ordering follows them), so that ordering='trace' does
  not move 37 more channels a pixel to the host."""
  out = model.apply(variables, batch, train=False)
  kept = {'semantic': out['semantic'].astype(jnp.float32),
          'embedding': out['embedding'].astype(jnp.float32)}
  if with_direction:
    kept['direction'] = out['direction'].astype(jnp.float32)
  return kept


def _score_description(score):
  """metrics.json's sentence for config.eval.score (vectorize.py computes it)."""
  if score == 'softmax':
    return ('mean over the instance\'s pixels of the softmax (over background + classes) '
            'probability of its class, as HDMapNet\'s postprocess/vectorize.py')
  return 'mean sigmoid of the class logit over the polyline pixels (this project\'s old score)'


def iou_counts_np(pred, gt, *, num_classes, column_mask=None):
  """Per-class (intersection, union) int64 counts of [N, H, W] class maps, optional [W] mask."""
  keep = np.ones(pred.shape[-1], bool) if column_mask is None else column_mask
  inter, union = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
  for k in range(num_classes):
    p, g = (pred == k)[..., keep], (gt == k)[..., keep]
    inter[k], union[k] = np.sum(p & g), np.sum(p | g)
  return inter, union


def iou_from_class_maps(pred, gt, class_names, column_mask=None):
  """({class: IoU or NaN if absent from both}, mIoU over the present classes) of class maps."""
  inter, union = iou_counts_np(pred, gt, num_classes=len(class_names) + 1,
                               column_mask=column_mask)
  ious = {name: float(inter[k] / union[k]) if union[k] else float('nan')
          for k, name in enumerate(class_names, start=1)}
  scored = [v for v in ious.values() if not math.isnan(v)]
  return ious, float(np.mean(scored)) if scored else float('nan')


def check_label_width(meta, info, *, ckpt_dir, shards_dir):
  """Warns (and returns the message) when the checkpoint was trained on labels of another width.

  Args:
    meta: the checkpoint's meta ({'config': ...}, as the trainer saves it).
    info: the shards' dataset_info dict.

  Returns:
    The warning text, or None when the widths agree.
  """
  trained, shards = info_lib.label_width_of(meta), info_lib.label_width_of(info)
  if trained == shards:
    return None
  message = (f'{ckpt_dir} was trained with label width {trained!r} but the shards of '
             f'{shards_dir} hold labels of width {shards!r}: its IoU and AP against these '
             'labels are not comparable with a model trained on them')
  warnings.warn(message)
  logging.warning(message)
  return message


def resolve_workers(workers):
  """config.eval.workers / --workers: 0 = the CPU count, else that many (>= 1)."""
  workers = int(workers)
  if workers < 0:
    raise ValueError(f'--workers / config.eval.workers must be >= 0 (0 = CPU count), got {workers}')
  return workers or (os.cpu_count() or 1)


def _gt_json(vectors, tokens, class_names):
  return {t: [{'cls': class_names[cls - 1], 'pts': np.asarray(pts).tolist()}
              for cls, pts in vectors.get(t, [])] for t in tokens}


def _vectors_to_json(vectors):
  return [{**v, 'pts': np.asarray(v['pts']).tolist()} for v in vectors]


def _nan_from_null(tree):
  """Inverse of `_json_safe`: null -> NaN."""
  if isinstance(tree, dict):
    return {k: _nan_from_null(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_nan_from_null(v) for v in tree]
  return float('nan') if tree is None else tree


def read_metrics(path):
  """metrics.json as `evaluate` returned it (NaN where the file has null)."""
  with open(path) as f:
    return _nan_from_null(json.load(f))


def _json_safe(tree):
  """NaN (a class absent from the split) -> null, so metrics.json is strict JSON."""
  if isinstance(tree, dict):
    return {k: _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_safe(v) for v in tree]
  if isinstance(tree, float) and math.isnan(tree):
    return None
  return tree


def config_ap_kwargs(config, protocol):
  """`ap_lib.sample_record`'s keyword arguments from a full config, for `protocol`."""
  data = config.data
  return dict(class_names=tuple(data.classes), thresholds=tuple(config.eval.chamfer_thresholds),
              protocol=protocol, sample_step=config.eval.sample_step,
              num_points=config.eval.maptr_num_points, buffer_m=config.eval.maptr_buffer_m,
              bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y),
              pmapnet_thickness=config.eval.pmapnet_thickness,
              pmapnet_iou_gate=config.eval.pmapnet_iou_gate)


def share_size(num_samples, process_index, process_count):
  """Samples of this process's share: those i < num_samples with i % process_count == index.

  Every sample exactly once over the processes, shares differing by at most one (a process
  beyond the sample count gets 0).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count='
                     f'{process_count})')
  return len(range(process_index, num_samples, process_count))


def _my_batches(batches, process_index, process_count):
  """Yields (indices [R] in the one-process order, host batch of R rows) of this process's
  share, read as `pipeline.eval_iterate` hands it out (row j of the share = sample
  process_index + process_count * j)."""
  row = 0
  for host in batches:
    rows = len(host['semantic'])
    yield process_index + process_count * (row + np.arange(rows)), host
    row += rows


def _forward_ahead(forward, variables, batches, *, batch_size, mesh):
  """Yields (indices, host batch, device outputs), dispatching the forward of the NEXT batch
  before the current one is handed out, so the device computes while the caller copies,
  argmaxes and submits the current one (JAX dispatch is asynchronous)."""
  pending = None
  for indices, host in batches:
    padded = trainer.pad_batch(host, batch_size)
    device_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh))
                    for k, v in padded.items()}
    out = forward(variables, device_batch)
    if pending is not None:
      yield pending
    pending = (indices, host, out)
  if pending is not None:
    yield pending


def _to_local(variables, mesh):
  """Replicated global arrays -> the same values replicated over this process's mesh."""
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x.addressable_data(0)), repl),
                      variables)


def throughput(clock, *, num_samples, first_rows, workers):
  """Samples/s of an evaluation loop from its perf_counter marks (timing.json, the log).

  Args:
    clock: {'start', 'first_batch' (first batch's outputs on the host: compile + forward),
      'last_batch' (the loop over batches done), 'end' (every sample vectorized and scored)}.
    num_samples: samples this process evaluated; first_rows: rows of its first batch.
  Returns:
    {'samples', 'workers', 'loop_s', 'samples_per_s', 'first_batch_s',
     'steady_samples_per_s' (after the first batch; None with a single batch), 'host_tail_s'
     (vectorization and AP still running after the last forward: the part that did not
     overlap the device)}.
  """
  loop_s = clock['end'] - clock['start']
  first_s = clock.get('first_batch', clock['end']) - clock['start']
  rest = num_samples - first_rows
  steady_s = clock['end'] - clock.get('first_batch', clock['end'])
  return {'samples': num_samples, 'workers': workers, 'loop_s': round(loop_s, 3),
          'samples_per_s': round(num_samples / loop_s, 3) if loop_s > 0 else None,
          'first_batch_s': round(first_s, 3),
          'steady_samples_per_s': round(rest / steady_s, 3) if rest > 0 and steady_s > 0 else None,
          'host_tail_s': round(clock['end'] - clock['last_batch'], 3)}

def evaluate(config, workdir, *, checkpoint='best', split='val', num_images=4, protocol=None,
             workers=None, process_index=None, process_count=None):
  """Evaluates ROOT/<stage> on `split` and writes ROOT/<stage>/eval/.

  On several processes (jax.distributed), each reads, decodes and evaluates only its share
  of the samples (`share_size`, pipeline.eval_iterate) on its own devices, then process 0
  merges the exact IoU counts, the vectors and the per-sample AP records and writes the
  outputs: the same metrics.json as one process (AP records are combined in sorted token
  order, IoU counts are integers). Process 0 waits at most config.eval.gather_timeout_s for
  the other shares (eval/gather.py) and then raises a TimeoutError naming the missing ones.

  Args:
    protocol: vector AP protocol; default config.eval.ap_protocol ('maptr').
    workers: vectorization processes; default config.eval.workers (0 = CPU count). The pool
      is used only for splits of at least config.eval.pool_min_samples samples (starting
      'spawn' processes costs seconds).
    process_index, process_count: this process and the process count; default from jax.

  Returns:
    The metrics dict of metrics.json (with NaN where the file has null: a class absent from
    both prediction and ground truth, or without GT vectors), on every process.
  """
  if config.stage == 'hd_pretrain':
    raise ValueError("evaluate: stage 'hd_pretrain' (model hd_mae) reconstructs masked ground "
                     'truth and has no map to score; evaluate teacher, coach or student')
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  data = config.data
  classes = tuple(data.classes)
  protocol = protocols.check_protocol(config.eval.ap_protocol if protocol is None else protocol)
  workers = resolve_workers(config.eval.workers if workers is None else workers)
  # Each process runs the forward on its own devices: no collective, so the processes need
  # not step in lockstep and uneven shares need no padding batches.
  # config.train.batch_size is the global batch, as in training: each process forwards its
  # share, so every device computes as many rows as in a one-process run (same programs,
  # same float32 outputs).
  mesh = sharding.make_mesh(jax.local_devices())
  if config.train.batch_size % process_count:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'the {process_count} processes of this evaluation')
  batch_size = config.train.batch_size // process_count
  sharding.check_batch_size(batch_size, mesh, flag='config.train.batch_size / process count')
  stage_dir = os.path.join(workdir, stages.stage_dir_name(config))
  out_dir = os.path.join(stage_dir, 'eval')
  gather_timeout_s = float(config.eval.gather_timeout_s)
  if gather_timeout_s <= 0:
    raise ValueError(f'config.eval.gather_timeout_s must be > 0, got {gather_timeout_s}')
  run_dir = None
  if process_count > 1:
    # Drawn by process 0 while every process is alive; names this run's parts folder.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    run_id = multihost_utils.broadcast_one_to_all(
        np.frombuffer(os.urandom(8), np.uint32).copy())
    run_dir = os.path.join(out_dir, 'parts', ''.join(f'{int(w):08x}' for w in run_id))

  model = models_lib.build(config.stage, config)
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  # Restored replicated over all processes' devices (what every process's restore agrees
  # on), then placed on this process's mesh.
  abstract = stages.abstract_variables(model, dummy, sharding.make_mesh())
  ckpt_dir, want_step = checkpoint_location(config, workdir, checkpoint)
  step, variables = ckpt_lib.restore_params(
      ckpt_dir, abstract, step=want_step, what=f'{stages.stage_dir_name(config)} evaluation',
      hint=f'train it first: {_train_command(config, workdir)}')
  variables = _to_local(variables, mesh)

  shards_dir = stages.shards_dir(config, workdir)
  info = info_lib.load_dataset_info(shards_dir)
  if split not in info['splits']:
    raise ValueError(f'{shards_dir}: no split {split!r}; known: {sorted(info["splits"])}')
  num_samples = int(info['splits'][split]['num_samples'])
  if num_samples == 0:
    raise ValueError(f'{shards_dir}: split {split!r} is empty; nothing to evaluate')
  _, meta = ckpt_lib.read_meta(ckpt_dir, step)
  check_label_width(meta, info, ckpt_dir=ckpt_dir, shards_dir=shards_dir)
  if num_samples < config.eval.pool_min_samples * process_count:
    workers = 1

  repl = sharding.replicated(mesh)
  vec_kwargs = vectorize.config_kwargs(config)
  with_direction = vec_kwargs['ordering'] == 'reference'   # HDMapNet's ordering reads them
  forward = jax.jit(functools.partial(_forward, model=model, with_direction=with_direction),
                    in_shardings=(repl, sharding.batch_sharding(mesh)), out_shardings=repl)
  # Each process decodes only its share of the records (sample i of the one-process order
  # if i % process_count == process_index), in batches of its per-process batch size.
  batches = pipeline.eval_iterate(shards_dir, split, data, batch_size=batch_size,
                                  process_index=process_index, process_count=process_count,
                                  with_tokens=True)
  truth = pipeline.read_vectors(shards_dir, split)
  ap_kwargs = config_ap_kwargs(config, protocol)
  scorer = scoring.Scorer(workers, vec_kwargs, ap_kwargs)
  # |x| of each column's centre: near and far halves of the range (DESIGN.md section 6).
  height, width = schema.bev_shape(data.bev_x, data.bev_y)
  x_centres = data.bev_x[0] + (np.arange(width) + 0.5) * data.bev_x[2]
  split_m, x_max = config.eval.range_split, max(abs(data.bev_x[0]), abs(data.bev_x[1]))
  column_masks = {'all': None, f'0-{split_m:g}m': np.abs(x_centres) < split_m,
                  f'{split_m:g}-{x_max:g}m': np.abs(x_centres) >= split_m}
  counts = {name: np.zeros((2, len(classes) + 1), np.int64) for name in column_masks}
  indices, tokens, preds, gts, figures, gt_json = [], [], [], [], [], {}
  share = share_size(num_samples, process_index, process_count)
  clock = {'start': time.perf_counter()}
  with scorer:   # the pool is shut down however the loop ends
    for rows_at, host, out in tqdm(
        _forward_ahead(forward, variables,
                       _my_batches(batches, process_index, process_count),
                       batch_size=batch_size, mesh=mesh),
        total=math.ceil(share / batch_size), desc=f'eval {split}'):
      rows = len(rows_at)
      out = jax.device_get(out)
      clock.setdefault('first_batch', time.perf_counter())   # compile + first forward
      pred = np.argmax(out['semantic'][:rows], axis=-1).astype(np.uint8)
      gt = host['semantic'].astype(np.uint8)
      for name, mask in column_masks.items():
        inter, union = iou_counts_np(pred, gt, num_classes=len(classes) + 1, column_mask=mask)
        counts[name] += np.stack([inter, union])
      for i in range(rows):
        token = str(host['sample_token'][i])
        gt_json[token] = _gt_json(truth, [token], classes)[token]
        scorer.submit(token, out['semantic'][i], out['embedding'][i], gt_json[token],
                      direction=out['direction'][i] if with_direction else None)
        if len(figures) < num_images:
          figures.append((token, host['images'][i], pred[i], gt[i]))
        tokens.append(token)
      indices.append(rows_at)
      preds.append(pred)
      gts.append(gt)
    clock['last_batch'] = time.perf_counter()
    scored = scorer.results()
    clock['end'] = time.perf_counter()
  timing = throughput(clock, num_samples=len(tokens), first_rows=len(indices[0]) if indices else 0,
                      workers=workers)
  vectors = {t: v for t, (v, _) in scored.items()}
  part = {'indices': [int(i) for k in indices for i in k], 'tokens': tokens,
          'records': {t: r for t, (_, r) in scored.items()},
          'predictions': {t: _vectors_to_json(vectors[t]) for t in tokens},
          'gt': gt_json, 'counts': {k: v.tolist() for k, v in counts.items()}}
  maps = {'pred': np.concatenate(preds) if preds else np.zeros((0, height, width), np.uint8),
          'gt': np.concatenate(gts) if gts else np.zeros((0, height, width), np.uint8)}
  if process_count > 1:
    gathered = gather_lib.gather(run_dir, part, maps, process_index=process_index,
                                 process_count=process_count, timeout_s=gather_timeout_s)
    if gathered is None:   # not process 0: wait for its metrics.json
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('mapkd_jax.evaluate: metrics written')
      return read_metrics(os.path.join(out_dir, 'metrics.json'))
    part, maps = gather_lib.merge_parts(*gathered)
  if not part['tokens']:
    raise ValueError(f'{shards_dir}: split {split!r} gave no sample')

  tokens, records = part['tokens'], part['records']
  pred_json, gt_json = part['predictions'], part['gt']
  ap = ap_lib.combine_records(records, class_names=classes,
                              thresholds=tuple(config.eval.chamfer_thresholds),
                              protocol=protocol)
  counts = {k: np.asarray(v, np.int64) for k, v in part['counts'].items()}
  overall = metrics_lib.iou_from_counts(*counts.pop('all'), classes)
  by_range = {name: metrics_lib.iou_from_counts(*c, classes) for name, c in counts.items()}
  metrics = {
      'iou': overall['iou'], 'miou': overall['miou'], 'iou_by_range': by_range,
      'ap': ap['ap'], 'map': ap['map'],
      'num_gt_vectors': ap['num_gt'], 'num_pred_vectors': ap['num_pred'],
      'num_samples': len(tokens), 'checkpoint_step': int(step), 'checkpoint_dir': ckpt_dir,
      'split': split,
      'protocol': {
          'bev_x': list(data.bev_x), 'bev_y': list(data.bev_y),
          'resolution_m': [data.bev_x[2], data.bev_y[2]],
          'iou': 'argmax over background + classes; per-class intersection and union summed '
                 'over the split; mIoU = mean over classes',
          'range_split': f'|x| of pixel centres < {split_m:g} m vs >= {split_m:g} m',
          'thresholds_m': [float(t) for t in config.eval.chamfer_thresholds],
          'score': _score_description(vec_kwargs['score']),
          'dbscan': {'eps': config.eval.dbscan_eps, 'min_samples': config.eval.dbscan_min_samples,
                     'algorithm': config.eval.dbscan_algorithm},
          'postprocess': {k: config.eval[k] for k in (
              'close_kernel_ref', 'min_area_ref', 'standardize', 'score', 'max_cluster_pixels',
              'ordering', 'ordering_seed')},
          'ap_protocol': protocol,
          **_protocol_numbers(config, protocol),
          **protocols.protocol_description(protocol)}}

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(_json_safe(metrics), f, indent=2, allow_nan=False)
  np.savez_compressed(os.path.join(out_dir, 'semantic.npz'), tokens=np.asarray(tokens),
                      pred=maps['pred'], gt=maps['gt'])
  file_meta = dict(bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y), class_names=classes)
  with open(os.path.join(out_dir, 'predictions.json'), 'w') as f:
    json.dump(vector_files.vector_file(pred_json, **file_meta), f)
  with open(os.path.join(out_dir, 'gt.json'), 'w') as f:
    json.dump(vector_files.vector_file(gt_json, **file_meta), f)
  with open(os.path.join(out_dir, 'timing.json'), 'w') as f:
    json.dump({**timing, 'process_count': process_count,
               'note': "process 0's own loop; one process per host evaluates its share"}, f,
              indent=2)
  for token, images, pred, gt in figures:
    figure = visualize.render_sample(
        images, pred, gt, vectors[token],
        [{**v, 'pts': np.asarray(v['pts'])} for v in gt_json[token]],
        bev_x=tuple(data.bev_x), bev_y=tuple(data.bev_y), class_names=classes, title=token)
    visualize.save_png(os.path.join(out_dir, f'{token}.png'), figure)
  logging.info('Evaluation of %s step %d on %s (%d samples, %d processes): mIoU %.4f, '
               'mAP (%s) %.4f -> %s', stages.stage_dir_name(config), step, split, len(tokens),
               process_count, metrics['miou'], protocol, ap['map'], out_dir)
  logging.info('Evaluation throughput (process 0, %d workers): %.2f samples/s over the loop '
               '(%.1f s), %.2f samples/s after the first batch (compile + first forward %.1f '
               's); host work left after the last forward %.2f s', timing['workers'],
               timing['samples_per_s'], timing['loop_s'], timing['steady_samples_per_s'] or 0.0,
               timing['first_batch_s'], timing['host_tail_s'])
  if process_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('mapkd_jax.evaluate: metrics written')
  return metrics


def _protocol_numbers(config, protocol):
  """The protocol's own constants, for metrics.json."""
  if protocol == 'maptr':
    return {'num_points': config.eval.maptr_num_points, 'buffer_m': config.eval.maptr_buffer_m}
  if protocol == 'pmapnet':
    return {'thickness': config.eval.pmapnet_thickness,
            'iou_gate': config.eval.pmapnet_iou_gate}
  return {'sample_step_m': config.eval.sample_step}


def define_flags():
  """CLI flags; defined only when run as a program (launch.py imports this module)."""
  config_flags.DEFINE_config_file('config', None, 'configs/tcs.py:<stage>[,mods]',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'experiment root (ROOT/<stage>/...)')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number")
  flags.DEFINE_string('split', 'val', 'dataset split to evaluate')
  flags.DEFINE_integer('num_images', None, 'figures to write; default config.eval.num_images')
  flags.DEFINE_enum('protocol', None, list(protocols.PROTOCOLS),
                    "vector AP protocol; default config.eval.ap_protocol ('maptr'); 'pmapnet' "
                    "= P-MapNet's released evaluation (the paper's mAP column, defects included)")
  flags.DEFINE_integer('workers', None, 'vectorization processes; default config.eval.workers '
                       '(0 = CPU count)')
  flags.DEFINE_integer('num_processes', None, 'processes of a multi-process evaluation '
                       '(jax.distributed); each evaluates its share, process 0 writes eval/')
  flags.DEFINE_integer('process_id', None, 'this process index in [0, --num_processes)')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (--num_processes)')
  flags.DEFINE_integer('heartbeat_timeout_s', 100, 'seconds without a heartbeat before '
                       "jax.distributed aborts every process (JAX's default 100); raise it "
                       'where a process can stall')


def main(argv):
  del argv
  f = flags.FLAGS
  if f.num_processes is not None:
    if f.process_id is None or not f.coordinator_address:
      raise app.UsageError('--num_processes needs --process_id and --coordinator_address')
    # CPU-only processes need a collectives backend for the barriers (no-op on GPU/TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id,
                               heartbeat_timeout_seconds=f.heartbeat_timeout_s)
  config = f.config
  num_images = config.eval.num_images if f.num_images is None else f.num_images
  metrics = evaluate(config, f.workdir, checkpoint=f.checkpoint, split=f.split,
                     num_images=num_images, protocol=f.protocol, workers=f.workers)
  if jax.process_index() == 0:
    print(json.dumps({k: metrics[k] for k in ('iou', 'miou', 'ap', 'map', 'num_samples')},
                     indent=2))


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
