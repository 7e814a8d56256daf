"""A scene's ground as rasters: colour, height and surface class on a map-frame grid.

The ground of a scene (its route plus a margin) is drawn once with OpenCV and then sampled by
the camera and LiDAR ray casters. Row r is y = y0 + r * res, column c is x = x0 + c * res
(pixel centres on integer coordinates).
"""
import cv2
import numpy as np

from data_prep.world import town as town_lib

GRASS, SIDEWALK, ASPHALT, PAINT = 0, 1, 2, 3
_SHIFT = 2   # cv2 sub-pixel bits for drawing


def scene_style(rng):
  """Per-scene look: surface tones, paint fade, light, sun, glare, haze, sensor noise."""
  light = rng.choice([0.35, 0.7, 1.0, 1.0, 1.2])   # dusk / overcast / day / bright
  sun_elevation = rng.uniform(0.15, 1.1)
  sun_azimuth = rng.uniform(-np.pi, np.pi)
  return dict(
      asphalt=np.array([0.30, 0.30, 0.31]) * rng.uniform(0.7, 1.3) + rng.normal(0, 0.015, 3),
      sidewalk=np.array([0.62, 0.60, 0.57]) * rng.uniform(0.8, 1.15),
      grass=np.array([0.22, 0.36, 0.14]) * rng.uniform(0.7, 1.3) + rng.normal(0, 0.02, 3),
      paint_fade=rng.uniform(0.35, 1.0),
      light=float(light),
      sun=np.array([np.cos(sun_elevation) * np.cos(sun_azimuth), np.cos(sun_elevation) * np.sin(sun_azimuth),
                    np.sin(sun_elevation)]),
      glare=float(rng.uniform(0.0, 1.0) ** 2),
      visibility=float(rng.uniform(80.0, 400.0)),   # metres of haze e-folding
      noise=float(rng.uniform(0.01, 0.03) / light),
      sky_horizon=np.array([0.75, 0.80, 0.85]) * rng.uniform(0.8, 1.1),
      sky_zenith=np.array([0.35, 0.50, 0.80]) * rng.uniform(0.7, 1.1),
  )


def _px(points, x0, y0, res):
  return np.round((np.asarray(points)[:, :2] - [x0, y0]) / res * (1 << _SHIFT)).astype(np.int32)


def ground_raster(town, bbox, res, style, rng):
  """Draws the ground of `bbox` = (x_min, y_min, x_max, y_max) metres.

  Returns:
    dict(x0, y0, res, colour [H, W, 3] float32 in [0, 1], height [H, W] float32 metres,
    surface [H, W] uint8 (GRASS/SIDEWALK/ASPHALT/PAINT), paint [H, W] float32 coverage x fade,
    height_range (min, max) of height: bounds where a ray can meet the ground).
  """
  params = town['params']
  x0, y0, x1, y1 = bbox
  width, height = int(np.ceil((x1 - x0) / res)) + 1, int(np.ceil((y1 - y0) / res)) + 1
  surface = np.zeros((height, width), np.uint8)
  road_rings = []
  for street in town['streets']:
    centre = town_lib.trimmed(street, *street['trim'])
    hw = street['half_width']
    road_rings.append(np.concatenate([town_lib.offset_polyline(centre, hw),
                                      town_lib.offset_polyline(centre, -hw)[::-1]]))
  road_rings += [j['polygon'] for j in town['junctions']]
  pts = [_px(r, x0, y0, res) for r in road_rings]
  walk_px = max(int(round(2 * params.sidewalk_width / res)), 1)
  cv2.polylines(surface, pts, True, SIDEWALK, walk_px, cv2.LINE_8, _SHIFT)
  cv2.fillPoly(surface, pts, ASPHALT, cv2.LINE_8, _SHIFT)

  white = np.zeros((height, width), np.uint8)
  yellow = np.zeros((height, width), np.uint8)
  for stroke in town['paint']:
    target = yellow if stroke['colour'] == 'yellow' else white
    thickness = max(int(round(stroke['width'] / res)), 1)
    cv2.polylines(target, [_px(stroke['points'], x0, y0, res)], False, 255, thickness, cv2.LINE_AA, _SHIFT)

  # Wear: low-frequency multiplicative noise on the paint, times the scene's fade.
  wear = cv2.resize(rng.uniform(0.3, 1.0, (height // 40 + 2, width // 40 + 2)).astype(np.float32), (width, height))
  fade = np.float32(style['paint_fade'])
  white_a = white.astype(np.float32) * (fade / 255.0) * wear
  yellow_a = yellow.astype(np.float32) * (fade / 255.0) * wear
  road = surface == ASPHALT
  white_a *= road
  yellow_a *= road

  palette = np.stack([style['grass'], style['sidewalk'], style['asphalt'], style['asphalt']]).astype(np.float32)
  grain = cv2.resize(rng.normal(1.0, 0.08, (height // 3 + 1, width // 3 + 1)).astype(np.float32), (width, height),
                     interpolation=cv2.INTER_NEAREST)
  blotch = cv2.resize(rng.normal(1.0, 0.08, (height // 60 + 2, width // 60 + 2)).astype(np.float32), (width, height))
  colour = palette[surface] * (grain * blotch)[..., None]
  for alpha, paint in ((white_a, (0.92, 0.92, 0.90)), (yellow_a, (0.90, 0.72, 0.18))):
    colour += alpha[..., None] * (np.asarray(paint, np.float32) - colour)
  paint = white_a + yellow_a
  surface[paint > 0.3] = PAINT

  # Height: hills + road crown (from the distance to the road edge) + curb step off the road.
  ys = y0 + res * np.arange(height, dtype=np.float64)
  xs = x0 + res * np.arange(width, dtype=np.float64)
  hill = np.zeros((height, width), np.float32)
  for kx, ky, phase, amp in town['hills']:
    # sin(a + b) expanded into an outer product: no full-size float64 temporaries.
    sx, cx_ = np.sin(kx * xs).astype(np.float32), np.cos(kx * xs).astype(np.float32)
    sy, cy_ = np.sin(ky * ys + phase).astype(np.float32), np.cos(ky * ys + phase).astype(np.float32)
    hill += np.float32(amp) * (np.outer(cy_, sx) + np.outer(sy, cx_))
  drivable = (surface != GRASS) & (surface != SIDEWALK)
  edge_distance = cv2.distanceTransform(drivable.astype(np.uint8), cv2.DIST_L2, 5) * res
  crown_run = 2.0 * params.lane_width
  c = np.minimum(edge_distance / crown_run, 1.0)
  relief = np.where(drivable, params.crown_height * (1.0 - (1.0 - c) ** 2), params.curb_height).astype(np.float32)
  relief = cv2.GaussianBlur(relief, (3, 3), 0)   # a curb is a short ramp at this resolution, not a cliff
  height_map = hill + relief
  return dict(x0=x0, y0=y0, res=res, colour=np.clip(colour, 0, 1), height=height_map, surface=surface,
              paint=paint, height_range=(float(height_map.min()), float(height_map.max())))


def sample(raster, key, x, y, *, nearest=False):
  """Raster values at map points (bilinear, or nearest); points outside are clamped to the edge."""
  grid = raster[key]
  col = ((np.asarray(x) - raster['x0']) / raster['res']).astype(np.float32)
  row = ((np.asarray(y) - raster['y0']) / raster['res']).astype(np.float32)
  h, w = grid.shape[:2]
  if nearest:
    r = np.clip(np.rint(row), 0, h - 1).astype(np.int64)
    c = np.clip(np.rint(col), 0, w - 1).astype(np.int64)
    return grid[r, c]
  np.clip(col, 0, w - 1.001, out=col)
  np.clip(row, 0, h - 1.001, out=row)
  c0 = col.astype(np.int64)
  r0 = row.astype(np.int64)
  fc = col - c0
  fr = row - r0
  if grid.ndim == 3:
    fc, fr = fc[..., None], fr[..., None]
  flat = grid.reshape(h * w, *grid.shape[2:])
  index = r0 * w + c0
  top = flat[index] * (1 - fc) + flat[index + 1] * fc
  bottom = flat[index + w] * (1 - fc) + flat[index + w + 1] * fc
  return top * (1 - fr) + bottom * fr
