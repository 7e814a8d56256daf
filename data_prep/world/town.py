"""The road network of one map location: streets, junctions, zebra crossings, paint and terrain.

A town is a jittered grid of junctions joined by gently curved two-way streets with 1 or 2 lanes
per direction. Everything is in the nuScenes map frame (x east, y north, metres). The town holds
the TRUE geometry; the map JSON (`map_json.py`) writes it with annotation noise (missing
segments) and the painted strokes here are the true lines perturbed by a few decimetres, as real
HD maps and real paint disagree.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TownParams:
  """Size and style of a town; every number of the road network lives here."""
  grid: int = 4                    # junctions per side
  spacing: float = 140.0           # metres between neighbouring junctions
  jitter: float = 15.0             # junction position noise (m)
  origin: float = 150.0            # map-frame offset of the first junction (m)
  max_bend: float = 14.0           # largest lateral bow of a street (m)
  lane_width: float = 3.5
  sidewalk_width: float = 3.0
  junction_margin: float = 6.0     # extra junction radius beyond the widest road half width (m)
  crossing_depth: float = 4.0      # zebra depth along the road (m)
  step: float = 1.0                # centreline sampling step (m)
  hill_amplitude: float = 2.5      # metres, per hill wave
  hill_wavelengths: tuple = (180.0, 260.0, 400.0)
  crown_height: float = 0.12       # road crown above the edge (m)
  curb_height: float = 0.15        # sidewalk step above the road edge (m)
  paint_offset_sigma: float = 0.15  # painted line vs map line, lateral (m)
  paint_offset_wavelength: float = 60.0
  dash_length: float = 3.0
  dash_gap: float = 6.0
  dash_missing: float = 0.12       # probability a dash / solid chunk is worn away
  map_line_missing: float = 0.06   # probability a divider piece is absent from the HD map
  map_piece_length: float = 12.0   # metres per divider piece that the HD map may miss
  osm_missing: float = 0.15        # probability a side street is absent from the SD map
  osm_offset: float = 2.5          # amplitude of the smooth SD misalignment (m)


def _left_normals(points):
  """Unit left normals of a polyline [N, 2] (x fwd -> y left)."""
  tangent = np.gradient(points, axis=0)
  tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
  return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def offset_polyline(points, offset):
  """Polyline [N, 2] shifted `offset` metres to its left (negative = right); offset may be [N]."""
  return points + _left_normals(points) * np.asarray(offset, np.float64).reshape(-1, 1)


def resample(points, step):
  """Polyline [N, 2] resampled at about `step` metres (endpoints kept)."""
  seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
  arc = np.concatenate([[0.0], np.cumsum(seg)])
  count = max(int(np.ceil(arc[-1] / step)), 1) + 1
  s = np.linspace(0.0, arc[-1], count)
  return np.stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])], axis=1)


def arc_length(points):
  return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


def hill_height(x, y, hills):
  """Smooth terrain height (m) and its gradient at map points; hills: [K, 4] (ax, ay, phase, amp)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  h = np.zeros(np.broadcast(x, y).shape)
  gx = np.zeros_like(h)
  gy = np.zeros_like(h)
  for kx, ky, phase, amp in hills:
    arg = kx * x + ky * y + phase
    h += amp * np.sin(arg)
    gx += amp * kx * np.cos(arg)
    gy += amp * ky * np.cos(arg)
  return h, gx, gy


def build_town(location_index, seed, params=TownParams()):
  """Road network of one location, deterministic in (location_index, seed).

  Returns:
    dict with 'streets' (list of dicts: centre [N,2] full node-to-node centreline, lanes_per_dir,
    half_width, nodes (a, b), trim (start, end) arc lengths, kind), 'junctions' (list of dicts:
    centre [2], polygon [M,2], arms), 'crossings' (list of [4,2] rectangles), 'hills' [K,4],
    'paint' (list of strokes dicts: points [N,2], width, colour 'white'|'yellow', dashed),
    'extent' (x_max, y_max) of the town in metres. Each street also has `osm_mapped` (bool):
    whether the SD map holds it (see `_osm_mapped`).
  """
  rng = np.random.default_rng([seed, location_index, 17])
  n = params.grid
  node_xy = (params.origin + params.spacing * np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing='ij'), -1)
             + rng.uniform(-params.jitter, params.jitter, (n, n, 2)))
  row_lanes = rng.integers(1, 3, size=n)   # lanes per direction for each east-west grid line
  col_lanes = rng.integers(1, 3, size=n)
  edges = []
  for i in range(n):
    for j in range(n):
      if i + 1 < n:
        edges.append(((i, j), (i + 1, j), int(row_lanes[j])))
      if j + 1 < n:
        edges.append(((i, j), (i, j + 1), int(col_lanes[i])))
  junction_radius = {}
  for a, b, lanes in edges:
    for node in (a, b):
      r = lanes * params.lane_width + params.junction_margin
      junction_radius[node] = max(junction_radius.get(node, 0.0), r)

  streets = []
  for a, b, lanes in edges:
    pa, pb = node_xy[a], node_xy[b]
    length = np.linalg.norm(pb - pa)
    t = np.linspace(0.0, 1.0, max(int(length / params.step), 2) + 1)
    chord = (pb - pa) / length
    normal = np.array([-chord[1], chord[0]])
    bend = rng.uniform(-params.max_bend, params.max_bend)
    centre = pa + t[:, None] * (pb - pa) + normal * (bend * np.sin(np.pi * t))[:, None]
    centre = resample(centre, params.step)
    total = arc_length(centre)[-1]
    streets.append(dict(centre=centre, lanes_per_dir=lanes, half_width=lanes * params.lane_width,
                        nodes=(a, b), trim=(junction_radius[a], total - junction_radius[b]),
                        kind='secondary' if lanes == 2 else 'residential'))

  for street, mapped in zip(streets, _osm_mapped(streets, params.osm_missing,
                                                 np.random.default_rng([seed, location_index, 31]))):
    street['osm_mapped'] = mapped

  junctions = {}
  crossings = []
  for index, street in enumerate(streets):
    for end in (0, 1):
      node = street['nodes'][end]
      s_end = street['trim'][end]
      piece = trimmed(street, s_end - 0.5, s_end + 0.5)
      point = piece[1] if piece.shape[0] > 2 else piece.mean(0)
      normal = _left_normals(piece)[len(piece) // 2]
      hw = street['half_width']
      j = junctions.setdefault(node, dict(centre=node_xy[node], corners=[], arms=[]))
      j['corners'] += [point + normal * hw, point - normal * hw]
      j['arms'].append((index, end))
      # Zebra just outside the junction: from the trim point `crossing_depth` into the street.
      s_far = s_end + params.crossing_depth if end == 0 else s_end - params.crossing_depth
      far = trimmed(street, min(s_far, s_end), max(s_far, s_end))
      p0, p1 = far[0], far[-1]
      n0 = _left_normals(far)[0]
      crossings.append(np.array([p0 + n0 * hw, p1 + n0 * hw, p1 - n0 * hw, p0 - n0 * hw]))
  junction_list = []
  for node, j in sorted(junctions.items()):
    corners = np.array(j['corners'])
    centre = corners.mean(0)
    angle = np.arctan2(corners[:, 1] - centre[1], corners[:, 0] - centre[0])
    j['polygon'] = corners[np.argsort(angle)]   # corners of all arms, counter-clockwise
    del j['corners']
    junction_list.append(j)

  wavelengths = np.asarray(params.hill_wavelengths)
  directions = rng.uniform(0, 2 * np.pi, len(wavelengths))
  hills = np.stack([2 * np.pi / wavelengths * np.cos(directions), 2 * np.pi / wavelengths * np.sin(directions),
                    rng.uniform(0, 2 * np.pi, len(wavelengths)),
                    params.hill_amplitude * rng.uniform(0.5, 1.0, len(wavelengths))], axis=1)
  town = dict(streets=streets, junctions=junction_list, crossings=crossings, hills=hills,
              extent=tuple(node_xy.reshape(-1, 2).max(0) + params.origin), params=params)
  # Boston paints the centre line yellow, Singapore white.
  town['paint'] = _paint_strokes(town, rng, params, yellow_centre=location_index == 0)
  return town


def _osm_mapped(streets, missing, rng):
  """Which streets the SD map holds: each is dropped with probability `missing`, but only while
  both its junctions keep >= 2 mapped arms.

  Real OSM misses side streets, not the roads a survey car drives: every junction reached along a
  mapped street keeps a mapped way out, so routes (scene.plan_route) can stay on mapped streets.
  """
  arms = {}
  for street in streets:
    for node in street['nodes']:
      arms[node] = arms.get(node, 0) + 1
  mapped = [True] * len(streets)
  for index in rng.permutation(len(streets)):
    nodes = streets[index]['nodes']
    if rng.uniform() < missing and all(arms[node] >= 3 for node in nodes):
      mapped[index] = False
      for node in nodes:
        arms[node] -= 1
  return mapped


def trimmed(street, s0, s1):
  """Part of a street centreline between arc lengths s0 < s1, resampled at the town step."""
  centre = street['centre']
  arc = arc_length(centre)
  s = np.linspace(s0, s1, max(int(np.ceil((s1 - s0) / 1.0)), 1) + 1)
  return np.stack([np.interp(s, arc, centre[:, 0]), np.interp(s, arc, centre[:, 1])], axis=1)


def divider_offsets(street, lane_width):
  """(road_divider offset, [lane_divider offsets]) from the centreline, metres to the left."""
  lanes = street['lanes_per_dir']
  return 0.0, [k * lane_width for k in range(1, lanes)] + [-k * lane_width for k in range(1, lanes)]


def _smooth_offset(rng, length, sigma, wavelength, step):
  """Lateral perturbation [N] of a painted line: a random low-frequency sinusoid mix, std ~sigma."""
  s = np.arange(0.0, length + step, step)
  out = np.zeros_like(s)
  for _ in range(2):
    out += rng.normal(0.0, sigma / np.sqrt(2)) * np.sin(2 * np.pi * s / (wavelength * rng.uniform(0.5, 1.5))
                                                      + rng.uniform(0, 2 * np.pi))
  return out + rng.normal(0.0, sigma / 2)


def _chunks(points, on, off, rng, missing):
  """Splits a polyline into painted pieces `on` metres long separated by `off`, some worn away."""
  arc = arc_length(points)
  pieces = []
  start = 0.0
  while start < arc[-1]:
    end = min(start + on, arc[-1])
    if rng.uniform() >= missing:
      mask = (arc >= start) & (arc <= end)
      if mask.sum() >= 2:
        pieces.append(points[mask])
    start = end + off
  return pieces


def _paint_strokes(town, rng, params, *, yellow_centre):
  """Painted lines: map lines perturbed by a few decimetres, dashes and chunks partly worn away."""
  strokes = []
  for street in town['streets']:
    s0, s1 = street['trim']
    centre = trimmed(street, s0 + params.crossing_depth + 1.0, s1 - params.crossing_depth - 1.0)
    if centre.shape[0] < 3:
      continue
    length = arc_length(centre)[-1]

    def perturbed(offset):
      shift = _smooth_offset(rng, length, params.paint_offset_sigma, params.paint_offset_wavelength, params.step)
      shift = np.interp(arc_length(centre), np.arange(shift.size) * params.step, shift)
      return offset_polyline(centre, offset + shift)

    centre_offset, lane_offsets = divider_offsets(street, params.lane_width)
    for side in (-0.15, 0.15):   # double solid centre line
      line = perturbed(centre_offset + side)
      for piece in _chunks(line, 5.0, 0.0, rng, params.dash_missing / 2):
        strokes.append(dict(points=piece, width=0.12, colour='yellow' if yellow_centre else 'white'))
    for offset in lane_offsets:
      for piece in _chunks(perturbed(offset), params.dash_length, params.dash_gap, rng, params.dash_missing):
        strokes.append(dict(points=piece, width=0.12, colour='white'))
    for edge in (street['half_width'] - 0.4, -street['half_width'] + 0.4):   # edge lines: paint, not a map class
      for piece in _chunks(perturbed(edge), 5.0, 0.0, rng, params.dash_missing):
        strokes.append(dict(points=piece, width=0.12, colour='white'))
  for rect in town['crossings']:
    jitter = rng.normal(0.0, params.paint_offset_sigma, 2)
    near, far = (rect[0] + rect[3]) / 2 + jitter, (rect[1] + rect[2]) / 2 + jitter
    across = rect[0] - rect[3]
    width = np.linalg.norm(across)
    across /= width
    for u in np.arange(-width / 2 + 0.5, width / 2 - 0.3, 1.0):   # bars along the road, 0.5 m wide
      if rng.uniform() >= params.dash_missing:
        strokes.append(dict(points=np.array([near + across * u, far + across * u]), width=0.5, colour='white'))
  return strokes
