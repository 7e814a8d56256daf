"""Map-label geometry and rasterization (data_prep/labels.py) and the SD prior (sd_prior.py)."""
import json
import math

import numpy as np
import pytest
import shapefile
from shapely import geometry

from data_prep import geo
from data_prep import labels
from data_prep import sd_prior

BEV_X = (-6.0, 6.0, 0.5)   # 24 columns
BEV_Y = (-3.0, 3.0, 0.5)   # 12 rows
WIDTH = 5


def _point_segment_distance_ref(p, a, b):
  ab, ap = b - a, p - a
  denom = float(ab @ ab)
  t = 0.0 if denom == 0 else min(max(float(ap @ ab) / denom, 0.0), 1.0)
  return math.dist(p, a + t * ab)


def _direction_bins_ref(pixels, num_bins):
  out = []
  for (c0, r0), (c1, r1) in zip(pixels[:-1], pixels[1:]):
    if c0 == c1 and r0 == r1:
      out.append(0)
      continue
    angle = math.degrees(math.atan2(r1 - r0, c1 - c0))
    angle = angle + 360.0 if angle < 0 else angle
    out.append(min(int(angle // (360.0 / num_bins)), num_bins - 1) + 1)
  return out


def _pixel_distances_ref(line, bev_x, bev_y):
  """Per pixel: (distance in px to the polyline, segment index of the nearest segment)."""
  pixels = labels.to_pixels(line, bev_x, bev_y)
  height = int(round((bev_y[1] - bev_y[0]) / bev_y[2]))
  width = int(round((bev_x[1] - bev_x[0]) / bev_x[2]))
  dist = np.full((height, width), np.inf)
  nearest = np.zeros((height, width), int)
  for r in range(height):
    for c in range(width):
      for k in range(len(pixels) - 1):
        d = _point_segment_distance_ref(np.array([c, r], float), pixels[k], pixels[k + 1])
        if d < dist[r, c]:
          dist[r, c], nearest[r, c] = d, k
  return dist, nearest


@pytest.mark.parametrize('row', [0, 3, 6, 11])
def test_horizontal_divider_covers_exact_rows(row):
  y = BEV_Y[0] + (row + 0.5) * BEV_Y[2]
  line = np.array([[-4.0, y], [4.0, y]])
  semantic, instance, direction = labels.rasterize_polylines(
      {labels.DIVIDER: [line]}, BEV_X, BEV_Y, line_width=WIDTH, num_direction_bins=36)
  rows = np.nonzero(semantic.any(axis=1))[0]
  expected = [r for r in range(row - WIDTH // 2, row + WIDTH // 2 + 1) if 0 <= r < 12]
  np.testing.assert_array_equal(rows, expected)
  assert set(np.unique(semantic)) == {0, labels.DIVIDER}
  np.testing.assert_array_equal(instance > 0, semantic > 0)
  assert set(np.unique(direction[semantic > 0])) == {1}  # +x is angle 0 -> bin 1


@pytest.mark.parametrize('col', [2, 12, 23])
def test_vertical_line_covers_exact_columns_and_points_down(col):
  x = BEV_X[0] + (col + 0.5) * BEV_X[2]
  line = np.array([[x, -2.0], [x, 2.0]])   # +y = increasing rows = 90 degrees -> bin 10
  semantic, _, direction = labels.rasterize_polylines(
      {labels.BOUNDARY: [line]}, BEV_X, BEV_Y, line_width=WIDTH, num_direction_bins=36)
  cols = np.nonzero(semantic.any(axis=0))[0]
  np.testing.assert_array_equal(cols, [c for c in range(col - 2, col + 3) if 0 <= c < 24])
  assert set(np.unique(direction[semantic > 0])) == {10}


@pytest.mark.parametrize('num_points,num_bins', [(2, 36), (7, 36), (12, 8)])
def test_direction_bins_match_loop_reference(num_points, num_bins):
  rng = np.random.default_rng(num_points)
  pixels = rng.uniform(-20, 20, (num_points, 2))
  pixels[1] = pixels[0]  # a zero-length segment -> 0
  got = labels.direction_bins(pixels, num_bins)
  np.testing.assert_array_equal(got, _direction_bins_ref(pixels, num_bins))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_raster_matches_per_pixel_distance_reference(seed):
  rng = np.random.default_rng(seed)
  line = np.stack([rng.uniform(-7, 7, 4), rng.uniform(-3.5, 3.5, 4)], axis=1)
  semantic, instance, direction = labels.rasterize_polylines(
      {labels.PED_CROSSING: [line]}, BEV_X, BEV_Y, line_width=WIDTH, num_direction_bins=36)
  dist, _ = _pixel_distances_ref(line, BEV_X, BEV_Y)
  # A 1-px line is within 0.71 px of the true line and the 5-px disk reaches 2 px in every
  # direction (2.24 at most): pixels closer than 1.25 px must be drawn, pixels beyond 3 px not.
  drawn = semantic == labels.PED_CROSSING
  assert drawn[dist <= 1.25].all()
  assert not drawn[dist > 3.0].any()
  assert (semantic[~drawn] == 0).all() and (instance[drawn] == 1).all()
  bins = np.array(_direction_bins_ref(labels.to_pixels(line, BEV_X, BEV_Y), 36))
  per_segment = [_pixel_distances_ref(line[k:k + 2], BEV_X, BEV_Y)[0] for k in range(3)]
  for k in range(3):
    others = np.min([per_segment[j] for j in range(3) if j != k], axis=0)
    alone = (per_segment[k] <= 0.5) & (others > 3.5)  # only segment k is in reach
    np.testing.assert_array_equal(direction[alone], bins[k])
  assert (direction[drawn] > 0).all() and (direction[~drawn] == 0).all()


def test_later_classes_win_and_instances_count_in_order():
  divider = np.array([[-5.0, 0.25], [5.0, 0.25]])
  boundary = np.array([[0.25, -2.5], [0.25, 2.5]])
  semantic, instance, _ = labels.rasterize_polylines(
      {labels.BOUNDARY: [boundary], labels.DIVIDER: [divider]}, BEV_X, BEV_Y, line_width=WIDTH,
      num_direction_bins=36)
  assert semantic[6, 12] == labels.BOUNDARY and instance[6, 12] == 2
  assert semantic[6, 2] == labels.DIVIDER and instance[6, 2] == 1


def test_ped_crossing_two_longest_edges():
  polygon = geometry.Polygon([(0, 0), (1, 0), (1.2, 6), (0.1, 6.5)])
  edges = labels.ped_crossing_edges(polygon)
  coords = np.asarray(polygon.exterior.coords)
  lengths = [math.dist(coords[i], coords[i + 1]) for i in range(len(coords) - 1)]
  longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:2]
  expected = [geometry.LineString(coords[i:i + 2]) for i in sorted(longest)]
  assert [e.equals(x) for e, x in zip(edges, expected)] == [True, True]


def test_boundary_is_union_rings_without_patch_edges():
  patch = labels.ego_patch((-10, 10, 1), (-10, 10, 1))
  a = geometry.box(-5, -5, 1, 5)
  b = geometry.Polygon(geometry.box(0, -5, 5, 5).exterior, [[(2, -1), (3, -1), (3, 1), (2, 1)]])
  lines = labels.boundary_polylines([a, b], patch, clip_margin=1.0)
  assert len(lines) == 2  # the union's exterior and the hole, as closed rings
  rings = [geometry.LineString(l) for l in lines]
  assert all(np.allclose(l[0], l[-1]) for l in lines)
  assert any(r.equals(geometry.box(-5, -5, 5, 5).exterior) for r in rings)
  assert any(r.equals(geometry.box(2, -1, 3, 1).exterior) for r in rings)
  total = sum(geometry.LineString(l).length for l in lines)
  assert total == pytest.approx(2 * (10 + 10) + 2 * (1 + 2))
  # A road running off the patch: the patch edge is not a boundary.
  road = geometry.box(-20, -3, 20, 3)
  lines = labels.boundary_polylines([road], patch, clip_margin=1.0)
  assert len(lines) == 2 and all(np.allclose(np.abs(l[:, 1]), 3.0) for l in lines)


def _write_map_json(root, location, divider_xy, ped_xy):
  nodes, lines, polygons = [], [], []

  def add_nodes(xy, prefix):
    tokens = []
    for i, (x, y) in enumerate(xy):
      nodes.append(dict(token=f'{prefix}-{i}', x=float(x), y=float(y)))
      tokens.append(f'{prefix}-{i}')
    return tokens

  lines.append(dict(token='line-0', node_tokens=add_nodes(divider_xy, 'dn')))
  polygons.append(dict(token='poly-0', exterior_node_tokens=add_nodes(ped_xy, 'pn'), holes=[]))
  empty = ['drivable_area', 'road_segment', 'road_block', 'lane', 'walkway', 'stop_line',
           'carpark_area', 'lane_divider', 'traffic_light', 'lane_connector']
  obj = dict(version='1.3', canvas_edge=[1000.0, 1000.0], node=nodes, line=lines,
             polygon=polygons, road_divider=[dict(token='rd-0', line_token='line-0')],
             ped_crossing=[dict(token='pc-0', polygon_token='poly-0')], arcline_path_3={},
             connectivity={}, **{k: [] for k in empty})
  path = root / 'maps' / 'expansion'
  path.mkdir(parents=True)
  (path / f'{location}.json').write_text(json.dumps(obj))


def test_hand_built_nuscenes_map_in_rotated_ego_frame(tmp_path):
  from nuscenes.map_expansion.map_api import NuScenesMap
  ego, yaw = np.array([100.0, 200.0]), math.pi / 2  # heading north: ego x = map +y
  # Divider running north 2 m east of the ego (= 2 m to its right, ego y = -2).
  _write_map_json(tmp_path, 'singapore-onenorth', [(102.0, 150.0), (102.0, 250.0)],
                  [(95.0, 210.0), (97.0, 210.0), (97.0, 220.0), (95.0, 220.0)])
  layers = labels.load_map_layers(NuScenesMap(dataroot=str(tmp_path),
                                              map_name='singapore-onenorth'))
  lines = labels.extract_polylines(layers, ego, yaw, (-30, 30, .5), (-15, 15, .5),
                                   clip_margin=1.0)
  (divider,) = lines[labels.DIVIDER]
  np.testing.assert_allclose(divider[:, 1], -2.0, atol=1e-9)
  np.testing.assert_allclose(sorted(divider[:, 0]), [-30.0, 30.0], atol=1e-9)
  peds = lines[labels.PED_CROSSING]  # long edges run north at map x 95 and 97 -> ego y 5, 3
  assert len(peds) == 2
  assert sorted(float(p[0, 1]) for p in peds) == pytest.approx([3.0, 5.0])
  for p in peds:
    assert sorted(p[:, 0]) == pytest.approx([10.0, 20.0])
  assert lines[labels.BOUNDARY] == []


def test_sd_prior_keeps_road_classes_and_lands_on_expected_rows(tmp_path):
  location = 'singapore-queenstown'
  ego = np.array([700.0, 1800.0])
  writer = shapefile.Writer(str(tmp_path / location), shapeType=shapefile.POLYLINE)
  writer.field('type', 'C', size=16)
  for kind, north in (('primary', ego[1] + 3.0), ('footway', ego[1] - 6.0)):
    lon, lat = geo.map_to_lonlat(np.array([ego[0] - 50, ego[0] + 50]), np.array([north] * 2),
                                 location)
    writer.line([list(zip(lon.tolist(), lat.tolist()))])
    writer.record(kind)
  writer.close()
  roads = sd_prior.load_osm_roads(sd_prior.osm_path(str(tmp_path), location), location,
                                  ('primary',))
  assert len(roads[0]) == 1
  bev_x, bev_y = (-30.0, 30.0, 0.5), (-15.0, 15.0, 0.5)
  raster = sd_prior.sd_raster(roads, ego, 0.0, bev_x, bev_y, line_width=WIDTH)
  row = int((3.0 - bev_y[0]) / bev_y[2] - 0.5 + 0.5)  # y = 3 m -> row 35.5 -> cv2 rounds
  rows = np.nonzero((raster == 255).any(axis=1))[0]
  assert rows.min() >= row - 3 and rows.max() <= row + 3 and len(rows) == WIDTH
  assert set(np.unique(raster)) == {0, 255}
  with pytest.raises(FileNotFoundError, match='boston-seaport'):
    sd_prior.osm_path(str(tmp_path), 'boston-seaport')
