"""The nuScenes map expansion JSON (`maps/expansion/<location>.json`) of a town.

Records follow the real v1.3 layout read by `nuscenes.map_expansion.map_api.NuScenesMap`:
geometric tables (node, line, polygon) and the non-geometric layers that point into them.
`get_records_in_patch` only finds a line whose NODE lies inside the patch, so every line and
polygon edge is written with a node about every `node_step` metres.
"""
import hashlib

import numpy as np

from data_prep.world import town as town_lib

MAP_VERSION = '1.3'
# Map size [width, height] in metres, as documented in the devkit (map_api.py docstring).
CANVAS_EDGE = {
    'singapore-onenorth': [1585.6, 2025.0],
    'singapore-hollandvillage': [2808.3, 2922.9],
    'singapore-queenstown': [3228.6, 3687.1],
    'boston-seaport': [2979.5, 2118.1],
}


def token(*parts):
  """Deterministic 32-hex nuScenes-style token from any printable parts."""
  return hashlib.md5('/'.join(str(p) for p in parts).encode()).hexdigest()


class _Builder:
  """Accumulates node/line/polygon records with deterministic tokens."""

  def __init__(self, prefix):
    self.prefix = prefix
    self.nodes, self.lines, self.polygons = [], [], []

  def _node_tokens(self, points):
    tokens = []
    for x, y in points:
      t = token(self.prefix, 'node', len(self.nodes))
      self.nodes.append(dict(token=t, x=float(x), y=float(y)))
      tokens.append(t)
    return tokens

  def line(self, points, step):
    t = token(self.prefix, 'line', len(self.lines))
    self.lines.append(dict(token=t, node_tokens=self._node_tokens(town_lib.resample(points, step))))
    return t

  def polygon(self, ring, step):
    closed = np.concatenate([ring, ring[:1]], axis=0)
    dense = town_lib.resample(closed, step)[:-1]   # closing node not repeated, as in real maps
    t = token(self.prefix, 'polygon', len(self.polygons))
    self.polygons.append(dict(token=t, exterior_node_tokens=self._node_tokens(dense), holes=[]))
    return t


def mapped_pieces(line, params, rng):
  """The runs of a divider polyline [N, 2] that the HD map holds.

  Annotation gaps: the line is cut into `map_piece_length` pieces and each is missing with
  probability `map_line_missing`, as real HD maps miss stretches of paint, not whole streets
  (a whole missing street left scenes without a single divider label).

  Returns:
    list of [M, 2] polylines (consecutive kept pieces joined), in order along the line.
  """
  arc = town_lib.arc_length(line)
  count = max(int(np.ceil(arc[-1] / params.map_piece_length)), 1)
  kept = rng.uniform(size=count) >= params.map_line_missing
  runs, start = [], None
  for k in range(count + 1):
    if k < count and kept[k]:
      start = k if start is None else start
    elif start is not None:
      s0, s1 = start * arc[-1] / count, k * arc[-1] / count
      inner = (arc > s0) & (arc < s1)
      ends = [np.array([np.interp(s, arc, line[:, 0]), np.interp(s, arc, line[:, 1])]) for s in (s0, s1)]
      runs.append(np.concatenate([ends[:1], line[inner], ends[1:]]))
      start = None
  return runs


def build_map_json(town, location, seed, *, node_step=2.0):
  """Map expansion dict of a town; divider pieces are dropped (`mapped_pieces`, HD map errors).

  Args:
    town: from `town.build_town`.
    location: nuScenes location name (a CANVAS_EDGE key).
    seed: world seed (tokens and annotation noise depend on it).
    node_step: metres between consecutive nodes of lines and polygon edges.

  Returns:
    dict with every layer key NuScenesMap reads.
  """
  if location not in CANVAS_EDGE:
    raise ValueError(f'unknown map location {location!r}; known: {sorted(CANVAS_EDGE)}')
  params = town['params']
  rng = np.random.default_rng([seed, sorted(CANVAS_EDGE).index(location), 23])
  geo = _Builder(f'{seed}/{location}')
  layers = {k: [] for k in ('drivable_area', 'road_segment', 'road_block', 'lane', 'ped_crossing', 'walkway',
                            'stop_line', 'carpark_area', 'road_divider', 'lane_divider', 'traffic_light',
                            'lane_connector')}
  drivable_token = token(seed, location, 'drivable_area')
  drivable_polygons = []

  for index, street in enumerate(town['streets']):
    centre = town_lib.trimmed(street, *street['trim'])
    hw = street['half_width']
    ring = np.concatenate([town_lib.offset_polyline(centre, hw), town_lib.offset_polyline(centre, -hw)[::-1]])
    segment_token = token(seed, location, 'road_segment', index)
    polygon_token = geo.polygon(ring, node_step)
    drivable_polygons.append(polygon_token)
    layers['road_segment'].append(dict(token=segment_token, polygon_token=polygon_token, is_intersection=False,
                                       drivable_area_token=drivable_token))
    lanes = street['lanes_per_dir']
    for k in range(-lanes, lanes):   # lane k spans offsets [k, k + 1] lane widths
      left = town_lib.offset_polyline(centre, (k + 1) * params.lane_width)
      right = town_lib.offset_polyline(centre, k * params.lane_width)
      lane_ring = np.concatenate([left, right[::-1]])
      layers['lane'].append(dict(token=token(seed, location, 'lane', index, k),
                                 polygon_token=geo.polygon(lane_ring, node_step), lane_type='CAR',
                                 from_edge_line_token=None, to_edge_line_token=None,
                                 left_lane_divider_segments=[], right_lane_divider_segments=[]))
    centre_offset, lane_offsets = town_lib.divider_offsets(street, params.lane_width)
    for part, piece in enumerate(mapped_pieces(town_lib.offset_polyline(centre, centre_offset), params, rng)):
      layers['road_divider'].append(dict(token=token(seed, location, 'road_divider', index, part),
                                         line_token=geo.line(piece, node_step), road_segment_token=segment_token))
    for k, offset in enumerate(lane_offsets):
      for part, piece in enumerate(mapped_pieces(town_lib.offset_polyline(centre, offset), params, rng)):
        layers['lane_divider'].append(dict(token=token(seed, location, 'lane_divider', index, k, part),
                                           line_token=geo.line(piece, node_step), lane_divider_segments=[]))
    for side in (1.0, -1.0):   # sidewalk strip along each road edge
      inner = town_lib.offset_polyline(centre, side * hw)
      outer = town_lib.offset_polyline(centre, side * (hw + params.sidewalk_width))
      layers['walkway'].append(dict(token=token(seed, location, 'walkway', index, side),
                                    polygon_token=geo.polygon(np.concatenate([inner, outer[::-1]]), node_step)))

  for index, junction in enumerate(town['junctions']):
    polygon_token = geo.polygon(junction['polygon'], node_step)
    drivable_polygons.append(polygon_token)
    layers['road_segment'].append(dict(token=token(seed, location, 'junction', index), polygon_token=polygon_token,
                                       is_intersection=True, drivable_area_token=drivable_token))
  for index, rect in enumerate(town['crossings']):
    # Four corners, as real ped_crossing polygons; no densification so the rectangle stays 4 nodes.
    t = token(geo.prefix, 'polygon', len(geo.polygons))
    geo.polygons.append(dict(token=t, exterior_node_tokens=geo._node_tokens(rect), holes=[]))
    layers['ped_crossing'].append(dict(token=token(seed, location, 'ped_crossing', index), polygon_token=t,
                                       road_segment_token=None))
  layers['drivable_area'].append(dict(token=drivable_token, polygon_tokens=drivable_polygons))
  return dict(version=MAP_VERSION, canvas_edge=CANVAS_EDGE[location], node=geo.nodes, line=geo.lines,
              polygon=geo.polygons, arcline_path_3={}, connectivity={}, **layers)
