"""A plain transcription of the reference rasterization, for tests only (never imported by code).

HDMapNet data/rasterize.py (`preprocess_map`, `line_geom_to_mask`, `mask_for_lines`,
`get_discrete_degree`, `overlap_filter`), which P-MapNet and MapKD reuse, and P-MapNet's
`preprocess_osm_map` for the SD prior, written out step by step as the reference does them:
the centred patch box, shapely translate + scale to the canvas, int32 cast, one cv2.polylines
per line (instance), per sub-polyline coords[i:] (forward / backward direction), separate uint8
canvases per class, the overlap filter drawn thickness + 4, and the class sum. Written
independently of data_prep/labels.py (which draws each segment once, numpy pixel maths).
"""
import cv2
import numpy as np
from shapely import affinity
from shapely import geometry


def _canvas(bev_x, bev_y):
  """(patch_h, patch_w, canvas_h, canvas_w, patch box) of a centred BEV range."""
  patch_w, patch_h = bev_x[1] - bev_x[0], bev_y[1] - bev_y[0]
  if bev_x[0] != -bev_x[1] or bev_y[0] != -bev_y[1]:
    raise ValueError(f'the reference patch is centred on the ego; got {bev_x}, {bev_y}')
  canvas_h, canvas_w = int(round(patch_h / bev_y[2])), int(round(patch_w / bev_x[2]))
  box = geometry.box(-patch_w / 2.0, -patch_h / 2.0, patch_w / 2.0, patch_h / 2.0)
  return patch_h, patch_w, canvas_h, canvas_w, box


def _canvas_lines(lines, bev_x, bev_y):
  """int32 [M, 2] pixel coordinates of each drawn LineString, in the reference's order."""
  patch_h, patch_w, canvas_h, canvas_w, box = _canvas(bev_x, bev_y)
  out = []
  for line in lines:
    new_line = geometry.LineString(np.asarray(line, np.float64)).intersection(box)
    if new_line.is_empty:
      continue
    new_line = affinity.affine_transform(new_line, [1.0, 0.0, 0.0, 1.0, patch_w / 2.0,
                                                    patch_h / 2.0])
    new_line = affinity.scale(new_line, xfact=canvas_w / patch_w, yfact=canvas_h / patch_h,
                              origin=(0, 0))
    parts = list(new_line.geoms) if new_line.geom_type == 'MultiLineString' else [new_line]
    for part in parts:
      if part.geom_type not in ('LineString', 'Point'):
        raise ValueError(f'the reference cannot draw a {part.geom_type}')
      out.append(np.asarray(list(part.coords), np.int32).reshape((-1, 2)))
  return out


def discrete_degree(vec, angle_class):
  deg = np.mod(np.degrees(np.arctan2(vec[1], vec[0])), 360)
  return (int(deg / (360 / angle_class) + 0.5) % angle_class) + 1


def _line_mask(lines, bev_x, bev_y, thickness, idx, kind, angle_class):
  _, _, canvas_h, canvas_w, _ = _canvas(bev_x, bev_y)
  mask = np.zeros((canvas_h, canvas_w), np.uint8)
  for coords in _canvas_lines(lines, bev_x, bev_y):
    if len(coords) < 2:
      continue
    if kind == 'backward':
      coords = np.flip(coords, 0)
    if kind == 'index':
      cv2.polylines(mask, [coords], False, color=idx, thickness=thickness)
      idx += 1
    else:
      for i in range(len(coords) - 1):
        cv2.polylines(mask, [coords[i:]], False,
                      color=discrete_degree(coords[i + 1] - coords[i], angle_class),
                      thickness=thickness)
  return mask, idx


def _overlap_filter(mask, filter_mask):
  for c in range(mask.shape[0] - 1, -1, -1):
    keep_out = np.repeat((filter_mask[c] != 0)[None, :], c, axis=0)
    mask[:c][keep_out] = 0
  return mask


def label_rasters(polylines, bev_x, bev_y, *, thickness, filter_thickness, angle_class):
  """The reference's label rasters of {class id 1..K: [[N, 2] metres, ...]}.

  `filter_thickness` is thickness + 4 in the reference (at 0.15 m); given separately so that
  the converted thicknesses of other steps can be checked too.

  Returns:
    semantic [H, W] (class id, 0 none), instance [H, W], forward [H, W], backward [H, W].
  """
  num_classes = max(polylines) if polylines else 0
  idx = 1
  instance, keep_out, forward, backward = [], [], [], []
  for class_id in range(1, num_classes + 1):
    lines = polylines.get(class_id, [])
    mask, idx = _line_mask(lines, bev_x, bev_y, thickness, idx, 'index', angle_class)
    # uint8 canvases: ids above 255 saturate in the reference (labels.py keeps them apart).
    assert idx <= 256, 'keep test patches under 256 polylines'
    instance.append(mask)
    keep_out.append(_line_mask(lines, bev_x, bev_y, filter_thickness, 1, 'index',
                               angle_class)[0])
    forward.append(_line_mask(lines, bev_x, bev_y, thickness, 1, 'forward', angle_class)[0])
    backward.append(_line_mask(lines, bev_x, bev_y, thickness, 1, 'backward', angle_class)[0])
  _, _, canvas_h, canvas_w, _ = _canvas(bev_x, bev_y)
  if not num_classes:
    zeros = np.zeros((canvas_h, canvas_w), np.int64)
    return zeros, zeros, zeros, zeros
  keep_out = np.stack(keep_out)
  instance = _overlap_filter(np.stack(instance), keep_out)
  forward = _overlap_filter(np.stack(forward), keep_out).sum(0).astype(np.int64)
  backward = _overlap_filter(np.stack(backward), keep_out).sum(0).astype(np.int64)
  semantic = np.zeros((canvas_h, canvas_w), np.int64)
  for c in range(num_classes):
    semantic[instance[c] != 0] = c + 1
  return semantic, instance.astype(np.int64).sum(0), forward, backward


def sd_mask(lines, bev_x, bev_y, *, thickness):
  """P-MapNet's OSM raster of the lines (any drawn id) as bool [H, W]."""
  mask, _ = _line_mask(lines, bev_x, bev_y, thickness, 1, 'index', 36)
  return mask != 0
