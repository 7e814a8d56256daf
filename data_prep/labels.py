"""HD-map labels of one ego patch: map polylines per class and their rasters (DESIGN.md section 1).

Protocol (HDMapNet): the patch is the BEV range oriented with the ego yaw (pitch and roll are
ignored); divider = road_divider + lane_divider lines; ped_crossing = the two longest edges of
each ped_crossing polygon (unclipped polygon, each edge then clipped to the patch); boundary =
exterior and interior rings of the union of road_segment and lane polygons, as far as they lie
inside the patch. Polylines are [N, 2] arrays (x forward, y left, metres, keyframe ego frame).

Rasters follow mapkd_jax/data/schema.py: row i is y = y_min + (i + 0.5) ry, column j is
x = x_min + (j + 0.5) rx. They are drawn by the reference's rule (HDMapNet data/rasterize.py,
which P-MapNet and MapKD use; see `rasterize_polylines`): vertices truncated to int32 pixels,
lines drawn with cv2.polylines(..., thickness), which covers thickness + 2 pixels across for
an odd thickness > 1 (5 -> 7 rows for a horizontal line), thickness + 1 for an even one and 1
for thickness 1. The thickness is given once in reference pixels of 0.15 m
(config.data.label_thickness_ref) and converted per canvas by
mapkd_jax/data/dataset_info.thickness_px.
"""
import dataclasses
import math

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely import geometry

from mapkd_jax.data import schema

# Semantic ids of the classes, in drawing order (later classes win overlaps); 0 = background.
DIVIDER, PED_CROSSING, BOUNDARY = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class MapLayers:
  """Map-frame geometries of one location, with spatial indexes for patch queries."""
  dividers: tuple      # LineStrings (road_divider + lane_divider)
  ped_crossings: tuple  # Polygons
  road_areas: tuple     # Polygons (road_segment + lane)
  divider_tree: shapely.STRtree
  ped_tree: shapely.STRtree
  road_tree: shapely.STRtree


def _valid(polygon):
  return polygon if polygon.is_valid else shapely.make_valid(polygon)


def make_map_layers(dividers, ped_crossings, road_areas):
  """Builds `MapLayers` from shapely geometries in the map frame."""
  dividers = tuple(g for g in dividers if not g.is_empty)
  ped_crossings = tuple(_valid(g) for g in ped_crossings if not g.is_empty)
  road_areas = tuple(_valid(g) for g in road_areas if not g.is_empty)
  return MapLayers(dividers, ped_crossings, road_areas, shapely.STRtree(dividers),
                   shapely.STRtree(ped_crossings), shapely.STRtree(road_areas))


def load_map_layers(nusc_map):
  """Extracts the label layers of a `nuscenes.map_expansion.map_api.NuScenesMap` once."""
  dividers = [nusc_map.extract_line(r['line_token'])
              for layer in ('road_divider', 'lane_divider') for r in getattr(nusc_map, layer)]
  peds = [nusc_map.extract_polygon(r['polygon_token']) for r in nusc_map.ped_crossing]
  roads = [nusc_map.extract_polygon(r['polygon_token'])
           for layer in ('road_segment', 'lane') for r in getattr(nusc_map, layer)]
  return make_map_layers(dividers, peds, roads)


def ego_patch(bev_x, bev_y):
  """The BEV range as a box polygon in the ego frame; bev_x/bev_y = (min, max, step)."""
  return geometry.box(bev_x[0], bev_y[0], bev_x[1], bev_y[1])


def ego_to_map_params(ego_xy, ego_yaw):
  """shapely affine params [a, b, d, e, xoff, yoff] of ego frame -> map frame."""
  c, s = math.cos(ego_yaw), math.sin(ego_yaw)
  return [c, -s, s, c, float(ego_xy[0]), float(ego_xy[1])]


def map_to_ego_params(ego_xy, ego_yaw):
  """shapely affine params of map frame -> ego frame (inverse of `ego_to_map_params`)."""
  c, s = math.cos(ego_yaw), math.sin(ego_yaw)
  tx, ty = float(ego_xy[0]), float(ego_xy[1])
  return [c, s, -s, c, -(c * tx + s * ty), s * tx - c * ty]


def geometry_to_polylines(geom):
  """Flattens (Multi)LineStrings, rings and collections into [N, 2] float64 arrays (N >= 2)."""
  if geom is None or geom.is_empty:
    return []
  if isinstance(geom, (geometry.LineString, geometry.LinearRing)):
    coords = np.asarray(geom.coords, dtype=np.float64)[:, :2]
    return [coords] if len(coords) >= 2 else []
  if hasattr(geom, 'geoms'):
    return [line for part in geom.geoms for line in geometry_to_polylines(part)]
  return []  # Points and polygons carry no line of their own here.


def ped_crossing_edges(polygon):
  """The two longest edges of a polygon's exterior, as 2-point LineStrings (ties: first edge)."""
  coords = np.asarray(polygon.exterior.coords)[:, :2]
  lengths = np.linalg.norm(np.diff(coords, axis=0), axis=1)
  longest = np.argsort(-lengths, kind='stable')[:2]
  return [geometry.LineString(coords[i:i + 2]) for i in sorted(longest)]


def boundary_polylines(polygons, patch, *, clip_margin):
  """Rings of the union of `polygons` that lie inside `patch`, as polylines.

  Polygons are clipped to the patch grown by `clip_margin` before the union, so that the
  union's outline along the clip box falls outside the patch and is not mistaken for a road
  boundary (the patch edge is not a boundary).
  """
  if not polygons:
    return []
  grown = patch.buffer(clip_margin, join_style='mitre')
  union = shapely.union_all([p.intersection(grown) for p in polygons])
  rings = []
  for poly in getattr(union, 'geoms', [union]):
    if isinstance(poly, geometry.Polygon) and not poly.is_empty:
      rings.append(poly.exterior)
      rings.extend(poly.interiors)
  return [line for ring in rings for line in geometry_to_polylines(ring.intersection(patch))]


def extract_polylines(layers, ego_xy, ego_yaw, bev_x, bev_y, *, clip_margin):
  """Map polylines of the ego patch, per class, in the ego frame.

  Args:
    layers: `MapLayers` of the sample's location.
    ego_xy: (x, y) map-frame position of the ego.
    ego_yaw: ego heading in radians (map frame, counter-clockwise from x).
    bev_x, bev_y: (min, max, step) metres of the BEV range, ego frame.
    clip_margin: metres; see `boundary_polylines`.

  Returns:
    {DIVIDER: [...], PED_CROSSING: [...], BOUNDARY: [...]}, lists of [N, 2] arrays.
  """
  patch = ego_patch(bev_x, bev_y)
  patch_map = affinity.affine_transform(patch, ego_to_map_params(ego_xy, ego_yaw))
  to_ego = map_to_ego_params(ego_xy, ego_yaw)

  def ego(geom):
    return affinity.affine_transform(geom, to_ego)

  dividers = [ego(layers.dividers[i]).intersection(patch)
              for i in layers.divider_tree.query(patch_map, predicate='intersects')]
  ped_edges = [ego(edge).intersection(patch)
               for i in layers.ped_tree.query(patch_map, predicate='intersects')
               for edge in ped_crossing_edges(layers.ped_crossings[i])]
  roads = [ego(layers.road_areas[i])
           for i in layers.road_tree.query(patch_map, predicate='intersects')]
  return {
      DIVIDER: [line for g in dividers for line in geometry_to_polylines(g)],
      PED_CROSSING: [line for g in ped_edges for line in geometry_to_polylines(g)],
      BOUNDARY: boundary_polylines(roads, patch, clip_margin=clip_margin),
  }


def to_pixels(points, bev_x, bev_y):
  """Ego-frame metres [N, 2] (x, y) -> continuous pixel coordinates [N, 2] (column, row) of
  this project's pixel centres (previews; the labels use `to_reference_pixels`)."""
  points = np.asarray(points, dtype=np.float64)
  col = (points[:, 0] - bev_x[0]) / bev_x[2] - 0.5
  row = (points[:, 1] - bev_y[0]) / bev_y[2] - 0.5
  return np.stack([col, row], axis=1)


def to_reference_pixels(points, bev_x, bev_y):
  """Ego-frame metres [N, 2] (x, y) -> int32 [N, 2] (column, row) as HDMapNet moves them.

  HDMapNet shifts the patch corner to the origin, scales by canvas size / patch size and casts
  to int32 (truncation): column = int((x - x_min) * (W / (x_max - x_min))), row likewise from
  y with H (same float operations as its shapely translate + scale on its centred patch).
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  points = np.asarray(points, dtype=np.float64)
  col = (points[:, 0] - bev_x[0]) * (width / (bev_x[1] - bev_x[0]))
  row = (points[:, 1] - bev_y[0]) * (height / (bev_y[1] - bev_y[0]))
  return np.stack([col, row], axis=1).astype(np.int32)


def direction_bins(pixels, num_bins):
  """Bin 1..num_bins of each segment of int pixel vertices, as HDMapNet's get_discrete_degree.

  The angle atan2(d row, d column) in [0, 360) is rounded to the nearest bin centre (bin k
  centred at (k - 1) * 360 / num_bins degrees); a zero-length segment has angle 0 -> bin 1.

  Args:
    pixels: [N, 2] (column, row) int vertices of one polyline.

  Returns:
    [N - 1] int64 array.
  """
  delta = np.diff(np.asarray(pixels), axis=0)
  degrees = np.mod(np.degrees(np.arctan2(delta[:, 1], delta[:, 0])), 360)
  return (np.floor(degrees / (360 / num_bins) + 0.5).astype(np.int64) % num_bins) + 1


def _clipped_pixel_lines(line, patch, bev_x, bev_y):
  """The parts of one polyline inside `patch`, each as int32 [M, 2] reference pixels (M >= 2).

  Like HDMapNet, each part of a clip that splits the line is a line of its own (own instance
  id); a clip that only touches the patch (a point) draws nothing. Where the reference would
  fail (a clip returning a GeometryCollection), its line parts are drawn.
  """
  line = np.asarray(line, dtype=np.float64)
  if len(line) < 2:
    return []
  clipped = geometry.LineString(line).intersection(patch)
  return [to_reference_pixels(part, bev_x, bev_y) for part in geometry_to_polylines(clipped)]


def _draw(canvas, pixels, value, thickness):
  cv2.polylines(canvas, [pixels], False, int(value), thickness=int(thickness))


def rasterize_polylines(polylines, bev_x, bev_y, *, thickness, filter_thickness,
                        num_direction_bins, with_backward=False):
  """Semantic, instance and direction rasters of per-class polylines, by HDMapNet's rule.

  HDMapNet (data/rasterize.py `preprocess_map`, used by P-MapNet and MapKD): per class, each
  polyline is clipped to the patch, moved to int32 pixels (`to_reference_pixels`) and drawn
  with `cv2.polylines(..., thickness)`:
  - instance: the whole polyline in colour idx (1, 2, ... over all classes in order; later
    lines of a class overwrite earlier ones);
  - forward direction: for i = 0..N-2 the sub-polyline from vertex i on, in the bin of segment
    i (`direction_bins`), so a pixel holds the bin of the last segment whose stroke covers it;
  - backward direction: the same on the reversed polyline (the opposite bins, and at a vertex
    the bin of the first segment instead of the last);
  - overlap filter: each class also drawn `filter_thickness` wide (reference: thickness + 4);
    every earlier class is erased under each later class's filter stroke, so a class overlaps
    no other and later classes win with a margin.
  Here each segment is drawn once as a 2-point cv2.polylines in that order (last write wins),
  which covers the same pixels with the same values: a cv2 polyline is the union of its
  segments' strokes, each a quad plus round caps at its own vertices.

  Pixel mapping: cv2 point (column, row) is canvas[row, column], rows follow +y and columns +x
  with no flip; under this project's convention (schema.py: row i centred at y_min + (i + 0.5)
  ry) the truncated vertex is the pixel whose cell contains it, so the reference's pixel sets
  are reproduced on our axes unchanged.

  Deviation: instance ids are uint16; the reference draws them on uint8 (ids above 255
  saturate to 255 and merge). A patch with more than 65535 polylines raises.

  Args:
    polylines: {class id (1..): [[N, 2] ego-frame metres, ...]}, classes in ascending order.
    bev_x, bev_y: (min, max, step) metres.
    thickness: cv2 thickness on this canvas (dataset_info.thickness_px).
    filter_thickness: cv2 thickness of the overlap filter on this canvas.
    num_direction_bins: direction bins over 360 degrees (label 0 = none).
    with_backward: also return the reference's backward direction raster.

  Returns:
    semantic [H, W] uint8 (class id), instance [H, W] uint16, direction [H, W] uint8 (the
    forward bins; 0 = no line) [, backward [H, W] uint8].
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  patch = ego_patch(bev_x, bev_y)
  classes = sorted(polylines)
  layers = []   # per class: (instance, filter, forward, backward) canvases
  next_id = 1
  for class_id in classes:
    instance = np.zeros((height, width), np.uint16)
    keep_out = np.zeros((height, width), np.uint8)
    forward = np.zeros((height, width), np.uint8)
    backward = np.zeros((height, width), np.uint8) if with_backward else None
    for line in polylines[class_id]:
      for pixels in _clipped_pixel_lines(line, patch, bev_x, bev_y):
        if next_id > np.iinfo(np.uint16).max:
          raise ValueError(f'more than {next_id - 1} polylines in one patch: instance ids '
                           f'exceed uint16 (label/instance)')
        _draw(instance, pixels, next_id, thickness)
        next_id += 1
        _draw(keep_out, pixels, 1, filter_thickness)
        bins = direction_bins(pixels, num_direction_bins)
        for k in range(len(pixels) - 1):
          _draw(forward, pixels[k:k + 2], bins[k], thickness)
        if with_backward:
          reverse = pixels[::-1].copy()
          back_bins = direction_bins(reverse, num_direction_bins)
          for k in range(len(reverse) - 1):
            _draw(backward, reverse[k:k + 2], back_bins[k], thickness)
    layers.append((instance, keep_out, forward, backward))
  semantic = np.zeros((height, width), np.uint8)
  instance_out = np.zeros((height, width), np.uint16)
  forward_out = np.zeros((height, width), np.uint8)
  backward_out = np.zeros((height, width), np.uint8)
  for k, class_id in enumerate(classes):
    instance, _, forward, backward = layers[k]
    erased = np.zeros((height, width), bool)
    for _, later_filter, _, _ in layers[k + 1:]:
      erased |= later_filter != 0
    drawn = (instance != 0) & ~erased
    semantic[drawn] = class_id
    instance_out[drawn] = instance[drawn]
    forward_out[drawn] = forward[drawn]
    if with_backward:
      backward_out[drawn] = backward[drawn]
  if with_backward:
    return semantic, instance_out, forward_out, backward_out
  return semantic, instance_out, forward_out


def rasterize_lines(polylines, bev_x, bev_y, *, thickness):
  """Binary [H, W] bool raster of polylines ([N, 2] ego-frame metres), P-MapNet's SD rule.

  P-MapNet's `preprocess_osm_map`: every line clipped to the patch, moved to int32 pixels and
  drawn with cv2.polylines(..., thickness) (no overlap filter); any drawn pixel is road.
  """
  height, width = schema.bev_shape(bev_x, bev_y)
  patch = ego_patch(bev_x, bev_y)
  mask = np.zeros((height, width), np.uint8)
  for line in polylines:
    for pixels in _clipped_pixel_lines(line, patch, bev_x, bev_y):
      _draw(mask, pixels, 1, thickness)
  return mask > 0
