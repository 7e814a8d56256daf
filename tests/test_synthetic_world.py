"""Synthetic nuScenes world: devkit loading, map queries, LiDAR files, ray casting, SD shapefile, determinism."""
import json
import math
import os

import numpy as np
import pytest
import shapefile
from nuscenes.map_expansion.map_api import NuScenesMap
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import LidarPointCloud

import raster_reference

from configs import tcs
from data_prep import geo
from data_prep import labels
from data_prep import nuscenes_reader
from data_prep import synthetic_world
from data_prep.world import capture
from data_prep.world import raster as raster_lib
from data_prep.world import render
from data_prep.world import town as town_lib

CAMERAS = ('CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_LEFT', 'CAM_BACK', 'CAM_BACK_RIGHT')
# Small and fast: coarse ground, tiny images, a sparse LiDAR.
TINY = dict(workers=1, image_size=(36, 64), ground_res=0.2, ground_margin=30.0,
            lidar=dict(beams=16, azimuth_steps=200, max_range=50.0))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('world') / 'data')
  # 4 scenes: one per location (scene-0000 of seed 0 once drove on a street whose divider and
  # OSM way were both dropped).
  return synthetic_world.generate_world(root, scenes=4, samples_per_scene=3, seed=0, **TINY)


@pytest.fixture(scope='module')
def nusc(world):
  return NuScenes(version='v1.0-synthetic', dataroot=world, verbose=False)


def test_devkit_loads_scenes_samples_and_files(world, nusc):
  assert len(nusc.scene) == 4
  assert len(nusc.sample) == 12
  for scene in nusc.scene:
    tokens, token = [], scene['first_sample_token']
    while token:
      tokens.append(token)
      sample = nusc.get('sample', token)
      if sample['next']:
        assert nusc.get('sample', sample['next'])['prev'] == token
        assert nusc.get('sample', sample['next'])['timestamp'] - sample['timestamp'] == 500_000
      token = sample['next']
    assert len(tokens) == scene['nbr_samples'] == 3 and tokens[-1] == scene['last_sample_token']
  for sample in nusc.sample:
    assert set(sample['data']) == set(CAMERAS) | {'LIDAR_TOP'}
    for channel, token in sample['data'].items():
      record = nusc.get('sample_data', token)
      assert record['is_key_frame']
      assert os.path.exists(os.path.join(world, record['filename'])), record['filename']
      if channel.startswith('CAM'):
        assert len(nusc.get('calibrated_sensor', record['calibrated_sensor_token'])['camera_intrinsic']) == 3


def test_lidar_sweep_chain_between_keyframes(world, nusc):
  sample = nusc.sample[1]
  record = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
  previous = [nusc.get('sample_data', record['prev'])]
  previous.append(nusc.get('sample_data', previous[0]['prev']))
  assert [p['is_key_frame'] for p in previous] == [False, False]
  assert all(p['filename'].startswith('sweeps/LIDAR_TOP/') for p in previous)
  assert previous[0]['next'] == record['token']
  assert os.path.exists(os.path.join(world, previous[1]['filename']))
  assert nusc.get('sample_data', previous[1]['prev'])['is_key_frame']   # the previous keyframe


def test_lidar_points_load_with_five_rows(world, nusc):
  record = nusc.get('sample_data', nusc.sample[0]['data']['LIDAR_TOP'])
  cloud = LidarPointCloud.from_file(os.path.join(world, record['filename']))
  assert cloud.points.shape[0] == 4 and cloud.points.shape[1] > 500
  raw = np.fromfile(os.path.join(world, record['filename']), np.float32).reshape(-1, 5)
  assert raw[:, 4].min() >= 0 and raw[:, 4].max() <= 15 and np.all(raw[:, 4] == np.round(raw[:, 4]))
  # Ground returns: in the sensor frame the ground lies ~1.8 m below, with mild terrain.
  near = np.linalg.norm(raw[:, :2], axis=1) < 15
  assert np.median(raw[near, 2]) == pytest.approx(-1.84, abs=0.6)


def test_splits_are_whole_scenes(world, nusc):
  with open(os.path.join(world, 'v1.0-synthetic', 'splits.json')) as f:
    splits = json.load(f)
  assert sorted(splits['train'] + splits['val']) == sorted(s['name'] for s in nusc.scene)
  assert len(splits['val']) == 1


def test_map_api_finds_dividers_crossings_and_roads(world, nusc):
  dividers_seen = 0
  for scene in nusc.scene:
    location = nusc.get('log', scene['log_token'])['location']
    nmap = NuScenesMap(dataroot=world, map_name=location)
    sample = nusc.get('sample', scene['first_sample_token'])
    pose = nusc.get('ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token'])
    x, y = pose['translation'][:2]
    layers = ['road_divider', 'lane_divider', 'ped_crossing', 'road_segment', 'lane']
    near = nmap.get_records_in_patch((x - 40, y - 40, x + 40, y + 40), layers, mode='intersect')
    assert near['road_segment'] and near['lane'], near
    dividers_seen += len(near['road_divider']) + len(near['lane_divider'])
    everywhere = nmap.get_records_in_patch((0, 0, 3000, 3000), layers, mode='intersect')
    assert len(everywhere['ped_crossing']) > 10 and len(everywhere['road_divider']) > 10
    crossing = nmap.get('ped_crossing', everywhere['ped_crossing'][0])
    assert len(crossing['exterior_node_tokens']) == 4
    on_point = nmap.layers_on_point(x, y)
    assert on_point['road_segment'] or on_point['lane'], (location, x, y)   # the ego drives on the road
  assert dividers_seen > 0


def test_every_sample_has_divider_labels_and_sd_prior(world, nusc):
  data = tcs.get_config().data
  options = nuscenes_reader.make_options(
      bev_x=(-30.0, 30.0, 0.6), bev_y=(-15.0, 15.0, 0.6), image_size=(16, 32), cameras=CAMERAS,
      label_thickness_ref=data.label_thickness_ref, sd_thickness_ref=data.sd_thickness_ref,
      thickness_ref_step=data.thickness_ref_step, direction_bins=data.direction_bins,
      lidar_sweeps=1, lidar_min_range=2.2,
      jpeg_quality=50, boundary_clip_margin=data.boundary_clip_margin,
      sd_road_classes=data.sd_road_classes, osm_dir=os.path.join(world, 'osm'))
  source = nuscenes_reader.Source(world, 'v1.0-synthetic', options)
  for sample in nusc.sample:
    fields = nuscenes_reader.read_sample(source, sample['token'])
    name = nusc.get('scene', sample['scene_token'])['name']
    assert fields['polylines'][labels.DIVIDER], (name, sample['token'])
    assert (fields['label/semantic'] == labels.DIVIDER).any(), name
    # Labels drawn by the reference rule (tests/raster_reference.py) on the synthetic world too.
    width = nuscenes_reader.label_width_spec(options)
    semantic, instance, forward, backward = raster_reference.label_rasters(
        fields['polylines'], options.bev_x, options.bev_y, thickness=width['label_thickness_px'],
        filter_thickness=width['filter_thickness_px'], angle_class=options.direction_bins)
    np.testing.assert_array_equal(fields['label/semantic'], semantic)
    np.testing.assert_array_equal(fields['label/instance'], instance)
    np.testing.assert_array_equal(fields['label/direction'], forward)
    np.testing.assert_array_equal(fields['label/direction_backward'], backward)
    sd = fields['prior/sd'] > 0
    assert sd.any(), (name, sample['token'])
    # The SD road runs near the ego (the route is on a mapped road, misaligned by a few metres):
    # some SD pixel lies within lane offset + misalignment of the ego, laterally.
    rows = np.nonzero(sd[:, sd.shape[1] // 2 - 5:sd.shape[1] // 2 + 5].any(axis=1))[0]
    lateral = options.bev_y[0] + (rows + 0.5) * options.bev_y[2]
    assert np.min(np.abs(lateral)) < 2 * 3.5 + town_lib.TownParams().osm_offset * math.sqrt(2), name


def _bilinear_ref(grid, x0, y0, res, x, y):
  col, row = (x - x0) / res, (y - y0) / res
  c, r = int(math.floor(col)), int(math.floor(row))
  fc, fr = col - c, row - r
  return ((1 - fr) * ((1 - fc) * grid[r, c] + fc * grid[r, c + 1])
          + fr * ((1 - fc) * grid[r + 1, c] + fc * grid[r + 1, c + 1]))


def _smooth_ground():
  hills = np.array([[2 * np.pi / 90, 2 * np.pi / 150, 0.3, 1.5], [-2 * np.pi / 200, 2 * np.pi / 70, 1.0, 0.8]])
  res, x0, y0, n = 0.1, -80.0, -80.0, 1601
  xs = x0 + res * np.arange(n)
  gx_, gy_ = np.meshgrid(xs, xs)
  height, _, _ = town_lib.hill_height(gx_, gy_, hills)
  height += 0.1 * np.sin(gx_ / 3.0)   # road-crown-scale relief, not in the Newton slope
  return dict(x0=x0, y0=y0, res=res, height=height.astype(np.float32)), hills


def _first_hit_ref(origin, direction, ground, t_max, step=0.02):
  """Slow oracle: march along the ray, then bisect the first sign change of (ray z - ground)."""
  def f(t):
    p = origin + t * direction
    return p[2] - _bilinear_ref(ground['height'], ground['x0'], ground['y0'], ground['res'], p[0], p[1])
  t0, f0 = 0.0, f(0.0)
  for t1 in np.arange(step, t_max, step):
    f1 = f(t1)
    if f0 > 0 >= f1:
      for _ in range(40):
        mid = (t0 + t1) / 2
        t0, t1 = (mid, t1) if f(mid) > 0 else (t0, mid)
      return (t0 + t1) / 2
    t0, f0 = t1, f1
  return np.inf


def test_raster_sample_matches_loop_reference():
  ground, _ = _smooth_ground()
  rng = np.random.default_rng(0)
  x, y = rng.uniform(-70, 70, 50), rng.uniform(-70, 70, 50)
  got = raster_lib.sample(ground, 'height', x, y)
  want = [_bilinear_ref(ground['height'], -80.0, -80.0, 0.1, a, b) for a, b in zip(x, y)]
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize('pitch_deg', [0.0, 4.0])
def test_camera_ray_ground_intersection_matches_marching_reference(pitch_deg):
  ground, hills = _smooth_ground()
  height, width = 30, 40
  k = np.array([[20.0, 0, 20], [0, 20.0, 15], [0, 0, 1]])
  cam_to_global = np.eye(4)
  pitch = np.deg2rad(pitch_deg)   # looking down by `pitch`
  base = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float64)
  tilt = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
  cam_to_global[:3, :3] = base @ tilt
  h0 = _bilinear_ref(ground['height'], -80.0, -80.0, 0.1, 3.0, -2.0)
  cam_to_global[:3, 3] = [3.0, -2.0, h0 + 1.5]
  origin, dirs = render.camera_rays(k, cam_to_global, height, width)
  t = render.intersect_ground(origin, dirs, ground, hills, t_max=60.0)
  checked = 0
  for pixel in [(29, 0), (29, 39), (25, 20), (20, 5), (18, 33), (16, 20), (0, 0)]:
    i = pixel[0] * width + pixel[1]
    want = _first_hit_ref(origin, dirs[i], ground, 60.0)
    if np.isfinite(want):
      checked += 1
      assert t[i] == pytest.approx(want, abs=0.02), pixel
    else:
      assert not np.isfinite(t[i]) or t[i] > 55, pixel
  assert checked >= 4
  # The terrain is not flat: flat-ground distances are off by decimetres somewhere in the image.
  down = np.isfinite(t) & (dirs[:, 2] < -0.05)
  flat_t = (h0 - origin[2]) / dirs[down, 2]
  assert np.max(np.abs(flat_t - t[down])) > 0.2


def _box_ref(origin, direction, box):
  length, width, height = box['size']
  c, s = math.cos(box['yaw']), math.sin(box['yaw'])
  rel = np.asarray(origin) - (np.asarray(box['centre']) + [0, 0, height / 2])
  o = [c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]]
  d = [c * direction[0] + s * direction[1], -s * direction[0] + c * direction[1], direction[2]]
  lo, hi = -np.inf, np.inf
  for axis, half in enumerate((length / 2, width / 2, height / 2)):
    if abs(d[axis]) < 1e-12:
      if abs(o[axis]) > half:
        return np.inf
      continue
    a, b = (-half - o[axis]) / d[axis], (half - o[axis]) / d[axis]
    lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
  return lo if lo <= hi and lo > 0 else np.inf


@pytest.mark.parametrize('num_boxes', [0, 1, 4])
def test_box_intersection_matches_loop_reference(num_boxes):
  rng = np.random.default_rng(num_boxes)
  boxes = [dict(centre=rng.uniform(-15, 15, 3) * [1, 1, 0.1], size=tuple(rng.uniform(1, 5, 3)),
                yaw=rng.uniform(-np.pi, np.pi)) for _ in range(num_boxes)]
  dirs = rng.normal(size=(400, 3))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  origin = np.array([0.0, 0.0, 1.0])
  t, index, _, _ = render.intersect_boxes(origin, dirs, boxes)
  want = np.array([min([_box_ref(origin, d, b) for b in boxes], default=np.inf) for d in dirs])
  np.testing.assert_allclose(t, want, rtol=1e-9)
  assert np.all((index >= 0) == np.isfinite(want))


def test_osm_shapefile_reads_back_near_true_centrelines(world, nusc):
  params = town_lib.TownParams()
  for location in sorted({log['location'] for log in nusc.log}):
    reader = shapefile.Reader(os.path.join(world, 'osm', location))
    assert [f[0] for f in reader.fields[1:]] == ['osm_id', 'name', 'ref', 'type', 'oneway', 'bridge', 'maxspeed']
    town = town_lib.build_town(capture.LOCATIONS.index(location), 0)
    assert 0 < len(reader) <= len(town['streets'])
    centres = np.concatenate([s['centre'] for s in town['streets']])
    offsets = []
    for shape, record in zip(reader.shapes(), reader.records()):
      assert record['type'] in ('residential', 'secondary')
      lon, lat = np.array(shape.points).T
      x, y = geo.lonlat_to_map(lon, lat, location)
      for px, py in zip(x, y):
        offsets.append(np.min(np.hypot(centres[:, 0] - px, centres[:, 1] - py)))
    offsets = np.array(offsets)
    assert offsets.max() <= params.osm_offset * math.sqrt(2) + 0.6   # misaligned, but within the bound
    assert offsets.mean() > 0.3                                       # and really misaligned


def _tables_bytes(root):
  folder = os.path.join(root, 'v1.0-synthetic')
  return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


def test_same_seed_same_tables_other_seed_differs(tmp_path):
  small = dict(TINY, image_size=(18, 32), lidar=dict(beams=8, azimuth_steps=90, max_range=40.0))
  a = synthetic_world.generate_world(str(tmp_path / 'a'), scenes=1, samples_per_scene=2, seed=3, **small)
  b = synthetic_world.generate_world(str(tmp_path / 'b'), scenes=1, samples_per_scene=2, seed=3, **small)
  c = synthetic_world.generate_world(str(tmp_path / 'c'), scenes=1, samples_per_scene=2, seed=4, **small)
  assert _tables_bytes(a) == _tables_bytes(b)
  assert _tables_bytes(a)['ego_pose.json'] != _tables_bytes(c)['ego_pose.json']
  lidar = sorted(os.listdir(os.path.join(a, 'samples', 'LIDAR_TOP')))[0]
  assert (open(os.path.join(a, 'samples', 'LIDAR_TOP', lidar), 'rb').read()
          == open(os.path.join(b, 'samples', 'LIDAR_TOP', lidar), 'rb').read())
  assert not os.path.exists(a + '.partial')


def test_existing_incomplete_dir_is_refused(tmp_path):
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'junk').write_text('')
  with pytest.raises(FileExistsError, match='junk|scene.json'):
    synthetic_world.generate_world(str(tmp_path / 'x'), scenes=1, samples_per_scene=1, seed=0, **TINY)
