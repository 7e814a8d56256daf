"""HD-map labels of one ego patch: map polylines per class and their rasters (DESIGN.md section 1).

Protocol (HDMapNet): the patch is the BEV range oriented with the ego yaw (pitch and roll are
ignored); divider = road_divider + lane_divider lines; ped_crossing = the two longest edges of
each ped_crossing polygon (unclipped polygon, each edge then clipped to the patch); boundary =
exterior and interior rings of the union of road_segment and lane polygons, as far as they lie
inside the patch. Polylines are [N, 2] arrays (x forward, y left, metres, keyframe ego frame).

Rasters follow mapkd_jax/data/schema.py: row i is y = y_min + (i + 0.5) ry, column j is
x = x_min + (j + 0.5) rx. A line covers every pixel within the `line_width_px` disk of a pixel
its 1-px rasterization passes (a straight line 5 px thick covers exactly 5 rows or columns).
"""
import dataclasses
import math

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely import geometry

# Semantic ids of the classes, in drawing order (later classes win overlaps); 0 = background.
DIVIDER, PED_CROSSING, BOUNDARY = 1, 2, 3
# Sub-pixel bits of cv2's fixed-point drawing: vertices keep 1/16 px precision.
_CV2_SHIFT = 4


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
  """Ego-frame metres [N, 2] (x, y) -> continuous pixel coordinates [N, 2] (column, row)."""
  points = np.asarray(points, dtype=np.float64)
  col = (points[:, 0] - bev_x[0]) / bev_x[2] - 0.5
  row = (points[:, 1] - bev_y[0]) / bev_y[2] - 0.5
  return np.stack([col, row], axis=1)


def direction_bins(pixels, num_bins):
  """Bin 1..num_bins of each segment's angle in the raster (atan2(d row, d column)); 0 if empty.

  Args:
    pixels: [N, 2] (column, row) vertices of one polyline.

  Returns:
    [N - 1] int array.
  """
  delta = np.diff(np.asarray(pixels, dtype=np.float64), axis=0)
  angle = np.degrees(np.arctan2(delta[:, 1], delta[:, 0])) % 360.0
  bins = np.minimum((angle // (360.0 / num_bins)).astype(np.int64), num_bins - 1) + 1
  return np.where(np.hypot(delta[:, 0], delta[:, 1]) > 0, bins, 0)


def _disk(line_width):
  return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (line_width, line_width))


def _draw_polyline(canvas_hw, pixels, values, line_width):
  """Thick rasterization of one polyline in a window around it.

  Returns:
    (window slices, covered mask, per-pixel segment value) or None if off canvas; the value
    of a covered pixel is the largest value among the segments whose 1-px line is in reach.
  """
  height, width = canvas_hw
  radius = line_width // 2 + 1
  lo = np.floor(pixels.min(axis=0)).astype(int) - radius
  hi = np.ceil(pixels.max(axis=0)).astype(int) + radius + 1
  c0, r0 = max(lo[0], 0), max(lo[1], 0)
  c1, r1 = min(hi[0], width), min(hi[1], height)
  if c0 >= c1 or r0 >= r1:
    return None
  # Draw on the window grown by `radius` so that lines just outside it still dilate in.
  gc0, gr0 = lo[0], lo[1]
  thin = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
  fixed = np.round((pixels - [gc0, gr0]) * (1 << _CV2_SHIFT)).astype(np.int32)
  for k, value in enumerate(values):
    if value:
      cv2.line(thin, tuple(map(int, fixed[k])), tuple(map(int, fixed[k + 1])), int(value),
               thickness=1, lineType=cv2.LINE_8, shift=_CV2_SHIFT)
  thick = cv2.dilate(thin, _disk(line_width))
  window = thick[r0 - gr0:r1 - gr0, c0 - gc0:c1 - gc0]
  return (slice(r0, r1), slice(c0, c1)), window > 0, window


def rasterize_polylines(polylines, bev_x, bev_y, *, line_width, num_direction_bins):
  """Semantic, instance and direction rasters of per-class polylines.

  Args:
    polylines: {class id (1..): [[N, 2] ego-frame metres, ...]}; classes are drawn in
      ascending id order so later classes win overlaps; instance ids count polylines from 1
      in that order.
    bev_x, bev_y: (min, max, step) metres.
    line_width: pixels (odd).
    num_direction_bins: direction bins over 360 degrees (label 0 = none).

  Returns:
    semantic [H, W] uint8, instance [H, W] uint16, direction [H, W] uint8.
  """
  height = int(round((bev_y[1] - bev_y[0]) / bev_y[2]))
  width = int(round((bev_x[1] - bev_x[0]) / bev_x[2]))
  semantic = np.zeros((height, width), np.uint8)
  instance = np.zeros((height, width), np.uint16)
  direction = np.zeros((height, width), np.uint8)
  instance_id = 0
  for class_id in sorted(polylines):
    for line in polylines[class_id]:
      instance_id += 1
      pixels = to_pixels(line, bev_x, bev_y)
      drawn = _draw_polyline((height, width), pixels, direction_bins(pixels, num_direction_bins),
                             line_width)
      if drawn is None:
        continue
      window, mask, values = drawn
      semantic[window][mask] = class_id
      instance[window][mask] = instance_id
      direction[window][mask] = values[mask]
  return semantic, instance, direction


def rasterize_lines(polylines, bev_x, bev_y, *, line_width):
  """Binary [H, W] bool raster of polylines ([N, 2] ego-frame metres) drawn `line_width` px."""
  semantic, _, _ = rasterize_polylines({1: list(polylines)}, bev_x, bev_y, line_width=line_width,
                                       num_direction_bins=1)
  return semantic > 0
