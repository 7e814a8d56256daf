"""predictions.json / gt.json: the payload `evaluate` writes, reading and checking it."""
import json

import numpy as np


def vector_file(results, *, bev_x, bev_y, class_names):
  """The predictions.json / gt.json payload: {'meta': {...}, 'results': {token: [...]}}.

  The meta (BEV range and class list) lets `load_vectors` refuse files of another setup.
  """
  return {'meta': {'bev_x': [float(v) for v in bev_x], 'bev_y': [float(v) for v in bev_y],
                   'classes': list(class_names)},
          'results': results}


def load_vectors(path, *, class_names, with_score):
  """Reads and checks a predictions/gt JSON file.

  Accepts {'meta': {'bev_x', 'bev_y', 'classes'}, 'results': {token: [vectors]}} (what
  `evaluate` writes) or a bare {token: [vectors]} (no meta to check).

  Returns:
    (results {token: [vectors]}, meta dict or None).

  Raises:
    FileNotFoundError: naming the file.
    ValueError: naming the file, sample and offending class or field.
  """
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: no such vector file') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path}: want {{sample_token: [vectors]}}, got {type(data).__name__}')
  meta = None
  if 'results' in data and isinstance(data.get('meta'), dict):
    meta, data = data['meta'], data['results']
    class_names = tuple(meta.get('classes', class_names))
  for token, items in data.items():
    if not isinstance(items, list):
      raise ValueError(f'{path}: sample {token!r}: want a list of vectors, got '
                       f'{type(items).__name__}')
    for k, item in enumerate(items):
      if item.get('cls') not in class_names:
        raise ValueError(f'{path}: sample {token!r} vector {k} has unknown class '
                         f'{item.get("cls")!r}; known: {list(class_names)}')
      pts = np.asarray(item.get('pts', []), np.float64)
      if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise ValueError(f'{path}: sample {token!r} vector {k}: pts must be a non-empty '
                         f'[[x, y], ...] list, got shape {pts.shape}')
      if with_score and 'score' not in item:
        raise ValueError(f'{path}: sample {token!r} vector {k} has no score')
  return data, meta


def check_same_setup(pred_path, pred_meta, gt_path, gt_meta):
  """Raises ValueError naming both files when their BEV range or class list differ."""
  if pred_meta is None or gt_meta is None:
    return
  for key in ('bev_x', 'bev_y', 'classes'):
    if pred_meta.get(key) != gt_meta.get(key):
      raise ValueError(f'{pred_path} has {key}={pred_meta.get(key)} but {gt_path} has '
                       f'{key}={gt_meta.get(key)}: predictions and ground truth of different '
                       'BEV ranges or class lists cannot be scored together')
