"""Map-label geometry and rasterization (data_prep/labels.py) and the SD prior (sd_prior.py)."""
import json
import math
from fractions import Fraction

import cv2
import numpy as np
import pytest
import shapefile
from shapely import geometry

from data_prep import geo
from data_prep import labels
from data_prep import sd_prior

import raster_reference
from mapkd_jax.data import dataset_info

# Reference pixels (0.15 m) on a small centred canvas: 80 columns x 40 rows.
BEV_X = (-6.0, 6.0, 0.15)
BEV_Y = (-3.0, 3.0, 0.15)
THICKNESS, FILTER = 5, 9          # HDMapNet: thickness 5, overlap filter thickness + 4
WIDTH = 5                         # SD prior test below (cv2 thickness on its 0.5 m canvas)


def _ours(polylines, bev_x=BEV_X, bev_y=BEV_Y, thickness=THICKNESS, filter_thickness=FILTER):
  return labels.rasterize_polylines(polylines, bev_x, bev_y, thickness=thickness,
                                    filter_thickness=filter_thickness, num_direction_bins=36,
                                    with_backward=True)


def _assert_equal_to_reference(polylines, bev_x=BEV_X, bev_y=BEV_Y, thickness=THICKNESS,
                               filter_thickness=FILTER):
  got = _ours(polylines, bev_x, bev_y, thickness, filter_thickness)
  want = raster_reference.label_rasters(polylines, bev_x, bev_y, thickness=thickness,
                                        filter_thickness=filter_thickness, angle_class=36)
  for name, g, w in zip(('semantic', 'instance', 'forward', 'backward'), got, want):
    np.testing.assert_array_equal(g, w, err_msg=name)
  return got


@pytest.mark.parametrize('thickness, rows', [(5, 7), (3, 5), (1, 1)])
def test_cv2_thickness_covers_thickness_plus_two_rows(thickness, rows):
  # The reference's rule itself: a horizontal line drawn with cv2 thickness 5 sets 7 rows.
  mask = np.zeros((20, 40), np.uint8)
  cv2.polylines(mask, [np.array([[5, 10], [30, 10]], np.int32)], False, 1, thickness=thickness)
  np.testing.assert_array_equal(np.nonzero(mask.any(axis=1))[0],
                                np.arange(10 - rows // 2, 10 + rows // 2 + 1))


@pytest.mark.parametrize('y, row', [(0.1, 20), (-2.99, 0), (0.149, 20), (-0.001, 19)])
def test_horizontal_divider_covers_seven_rows_around_the_truncated_row(y, row):
  # Row = int((y + 3) / 0.15): the vertex's cell (truncation), not the nearest pixel centre.
  semantic, instance, direction, backward = _assert_equal_to_reference(
      {labels.DIVIDER: [np.array([[-4.0, y], [4.0, y]])]})
  rows = np.nonzero(semantic.any(axis=1))[0]
  np.testing.assert_array_equal(rows, [r for r in range(row - 3, row + 4) if 0 <= r < 40])
  assert set(np.unique(semantic)) == {0, labels.DIVIDER}
  np.testing.assert_array_equal(instance > 0, semantic > 0)
  assert set(np.unique(direction[semantic > 0])) == {1}    # +x: 0 degrees -> bin 1
  assert set(np.unique(backward[semantic > 0])) == {19}    # 180 degrees -> bin 19


HAND_MADE = {
    'horizontal': {labels.DIVIDER: [[[-4.0, 0.1], [4.0, 0.1]]]},
    'vertical': {labels.BOUNDARY: [[[1.03, -2.5], [1.03, 2.5]]]},
    'diagonal': {labels.PED_CROSSING: [[[-5.0, -2.6], [4.4, 2.7]]]},
    'corner': {labels.DIVIDER: [[[-5.0, -2.0], [0.0, 1.5], [5.0, -1.0]]]},
    'leaving_the_canvas': {labels.DIVIDER: [[[-8.0, -1.0], [-2.0, 4.0], [1.0, 0.0], [3.0, 5.0],
                                             [9.0, -0.5]]],   # clipped into three parts
                           labels.BOUNDARY: [[[-10.0, 0.0], [10.0, 0.5]],
                                             [[6.0, -2.0], [6.0, 2.0]],       # on the far edge
                                             [[6.0, 3.0], [7.0, 4.0]]]},      # touches a corner
    'sub_pixel_vertices': {labels.BOUNDARY: [[[0.01, 0.02], [0.07, 0.11], [0.5, 0.13],
                                              [0.52, 0.9], [0.53, 0.91]]]},  # last: 0 length
    'zero_length_first_segment': {labels.DIVIDER: [[[-2.0, 0.0], [-1.99, 0.01], [2.0, 1.0]]]},
    'classes_overlap': {labels.DIVIDER: [[[-5.0, 0.2], [5.0, 0.2]], [[-5.0, 0.9], [5.0, 1.1]]],
                        labels.PED_CROSSING: [[[-1.0, -2.5], [-0.5, 2.5]]],
                        labels.BOUNDARY: [[[2.0, -2.5], [2.2, 2.5]]]},
}


@pytest.mark.parametrize('name', sorted(HAND_MADE))
def test_hand_made_geometry_equals_reference_transcription(name):
  polylines = {c: [np.array(line) for line in lines] for c, lines in HAND_MADE[name].items()}
  semantic, _, _, _ = _assert_equal_to_reference(polylines)
  assert semantic.any()


def test_later_classes_erase_earlier_ones_under_a_wider_stroke():
  divider = np.array([[-5.0, 0.1], [5.0, 0.1]])          # row 20
  boundary = np.array([[0.1, -2.5], [0.1, 2.5]])         # column 40
  semantic, instance, _, _ = _assert_equal_to_reference(
      {labels.BOUNDARY: [boundary], labels.DIVIDER: [divider]})
  assert semantic[20, 40] == labels.BOUNDARY and instance[20, 40] == 2
  assert semantic[20, 10] == labels.DIVIDER and instance[20, 10] == 1
  # The boundary covers columns 37..43; the filter (thickness 9: 11 px) erases the divider on
  # columns 35..45, leaving two background columns each side of the boundary.
  np.testing.assert_array_equal(semantic[20, 34:47], [1, 0, 0] + [3] * 7 + [0, 0, 1])


def test_clipped_parts_are_instances_of_their_own():
  line = np.array([[-8.0, -1.0], [-2.0, 4.0], [1.0, 0.0], [3.0, 5.0], [9.0, -0.5]])
  _, instance, _, _ = _assert_equal_to_reference({labels.DIVIDER: [line]})
  assert set(np.unique(instance)) == {0, 1, 2, 3}


@pytest.mark.parametrize('bev_x, bev_y', [
    (BEV_X, BEV_Y),                              # 0.15 m: thickness 5, filter 9
    ((-6.0, 6.0, 0.3), (-3.0, 3.0, 0.3)),         # 0.3 m: 3, 5
    ((-6.0, 6.0, 0.6), (-3.0, 3.0, 0.6)),         # 0.6 m (demo): 1, 2
    ((-12.0, 12.0, 0.6), (-3.0, 3.0, 0.3)),       # 240x60's 0.6 x 0.3 m: 2, 3
])
def test_random_polylines_equal_reference_at_every_step(bev_x, bev_y):
  data = dict(label_thickness_ref=THICKNESS, sd_thickness_ref=5, thickness_ref_step=0.15,
              bev_x=bev_x, bev_y=bev_y)
  spec = dataset_info.label_width_spec(data)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    polylines = {c: [np.stack([rng.uniform(1.2 * bev_x[0], 1.2 * bev_x[1], n),
                               rng.uniform(1.2 * bev_y[0], 1.2 * bev_y[1], n)], axis=1)
                     for n in rng.integers(2, 9, rng.integers(0, 5))]
                 for c in (labels.DIVIDER, labels.PED_CROSSING, labels.BOUNDARY)}
    _assert_equal_to_reference(polylines, bev_x, bev_y, spec['label_thickness_px'],
                               spec['filter_thickness_px'])


def _thickness_px_ref(thickness_ref, ref_step, step_x, step_y):
  """Half-up rounding of thickness_ref * ref_step / sqrt(rx * ry), in exact decimals."""
  target = Fraction(thickness_ref) * Fraction(str(ref_step))
  best = 1
  for t in range(1, 100):   # largest t with t - 1/2 <= target / step, i.e. (t - 1/2)^2 rx ry <= target^2
    if (Fraction(2 * t - 1, 2)) ** 2 * Fraction(str(step_x)) * Fraction(str(step_y)) <= target ** 2:
      best = t
  return best


@pytest.mark.parametrize('thickness_ref, steps, want', [
    (5, (0.15, 0.15), 5), (5, (0.3, 0.3), 3), (5, (0.6, 0.6), 1), (5, (0.6, 0.3), 2),
    (9, (0.3, 0.3), 5), (9, (0.6, 0.6), 2), (9, (0.6, 0.3), 3), (3, (0.5, 0.5), 1),
    (5, (0.5, 0.5), 2), (5, (0.05, 0.05), 15),
])
def test_thickness_conversion_draws_the_same_metres(thickness_ref, steps, want):
  bev_x, bev_y = (-30.0, 30.0, steps[0]), (-15.0, 15.0, steps[1])
  assert dataset_info.thickness_px(thickness_ref, 0.15, bev_x, bev_y) == want
  assert _thickness_px_ref(thickness_ref, 0.15, *steps) == want
  with pytest.raises(ValueError, match='label_thickness_ref'):
    dataset_info.thickness_px(0, 0.15, bev_x, bev_y)


def test_label_width_of_configs_metas_and_shards():
  from configs import tcs
  config = tcs.get_config()
  new = 'reference cv2 thickness 5 (labels) / 5 (SD prior) at 0.15 m'
  assert dataset_info.label_width_of(config) == new
  assert dataset_info.label_width_of(config.data) == new
  meta = {'stage': 'student', 'config': json.loads(config.to_json_best_effort())}
  assert dataset_info.label_width_of(meta) == new
  assert dataset_info.label_width_of({'label_width': dataset_info.label_width_spec(
      config.data)}) == new
  # Checkpoints and shards from before: exact-width lines, line_width_px (default 5) px wide.
  old_meta = json.loads(json.dumps(meta))
  for key in ('label_thickness_ref', 'sd_thickness_ref', 'thickness_ref_step'):
    del old_meta['config']['data'][key]
  assert dataset_info.label_width_of(old_meta) == (
      'exact 5 px (labels and SD prior; before issue 15)')
  assert dataset_info.label_width_of({'config': {}}) == dataset_info.label_width_of(old_meta)
  assert dataset_info.label_width_of({'line_width_px': 3}).startswith('exact 3 px')
  config.data.label_thickness_ref = 3
  assert dataset_info.label_width_of(config) != new


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
  raster = sd_prior.sd_raster(roads, ego, 0.0, bev_x, bev_y, thickness=WIDTH)
  row = int((3.0 - bev_y[0]) / bev_y[2])  # y = 3 m -> 36.0 -> row 36 (+- 1: the OSM round trip)
  rows = np.nonzero((raster == 255).any(axis=1))[0]
  assert rows.min() >= row - 4 and rows.max() <= row + 4 and len(rows) == WIDTH + 2
  assert set(np.unique(raster)) == {0, 255}
  lines = sd_prior.sd_polylines(roads, ego, 0.0, bev_x, bev_y)
  np.testing.assert_array_equal(raster == 255, raster_reference.sd_mask(
      lines, bev_x, bev_y, thickness=WIDTH))
  with pytest.raises(FileNotFoundError, match='boston-seaport'):
    sd_prior.osm_path(str(tmp_path), 'boston-seaport')
