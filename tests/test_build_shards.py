"""build_shards (the TFDS builder's CLI) on the real nuScenes fragment: round trip, resume, bad
input (data_prep)."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from pyquaternion import Quaternion

from configs import tcs
from data_prep import build_plan
from data_prep import build_shards
from data_prep import nuscenes_reader
from data_prep import tfds_builder
from data_prep import sd_prior
from mapkd_jax.data import schema
from realdata_paths import FIRST_SCENE0523_SAMPLE
from realdata_paths import OTHER_SCENE
from realdata_paths import REAL_LOCATION
from realdata_paths import REAL_OSM
from realdata_paths import REAL_ROOT
from realdata_paths import REAL_SCENE
from realdata_paths import REAL_VERSION

pytestmark = pytest.mark.skipif(not os.path.isdir(REAL_ROOT), reason='real fragment absent')


def _kwargs(**overrides):
  data = tcs.get_config().data
  kwargs = dict(bev_x=(-30.0, 30.0, 1.0), bev_y=(-15.0, 15.0, 1.0), image_size=(32, 88),
                num_shards=2, workers=1, cameras=data.cameras,
                label_thickness_ref=data.label_thickness_ref,
                sd_thickness_ref=data.sd_thickness_ref,
                thickness_ref_step=data.thickness_ref_step, direction_bins=data.direction_bins, lidar_sweeps=data.lidar_sweeps,
                lidar_min_range=data.lidar_min_range, jpeg_quality=data.jpeg_quality,
                boundary_clip_margin=data.boundary_clip_margin,
                sd_road_classes=data.sd_road_classes, osm_dir=REAL_OSM, splits=['val'],
                skip_bad=True, progress=False)
  kwargs.update(overrides)
  return kwargs


def _options():
  kwargs = _kwargs()
  return nuscenes_reader.make_options(**{k: kwargs[k] for k in (
      'bev_x', 'bev_y', 'image_size', 'cameras', 'label_thickness_ref', 'sd_thickness_ref',
      'thickness_ref_step', 'direction_bins', 'lidar_sweeps',
      'lidar_min_range', 'jpeg_quality', 'boundary_clip_margin', 'sd_road_classes', 'osm_dir')})


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('shards'))
  info = build_shards.build_shards(REAL_ROOT, REAL_VERSION, out, **_kwargs())
  return out, info


def _examples(path):
  import tensorflow as tf
  return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _decode_png(feature):
  return cv2.imdecode(np.frombuffer(feature.bytes_list.value[0], np.uint8), cv2.IMREAD_UNCHANGED)


def test_dataset_info_lists_splits_and_skipped(built):
  out, info = built
  with open(os.path.join(out, 'dataset_info.json')) as f:
    assert json.load(f) == info
  assert info['splits']['val']['num_samples'] == 10  # scene-0916 keyframes 0-9
  # 81 planned samples in 2 chunks (41 + 40): keyframe 0 ends the first, 1-9 start the second.
  assert info['splits']['val']['shard_sizes'] == [1, 9]
  assert info['tfds_dir'] == os.path.join('mapkd_nuscenes', build_shards.CUSTOM_CONFIG, '2.0.0')
  assert info['splits']['val']['files'] == [os.path.join(
      info['tfds_dir'], 'mapkd_nuscenes-val.tfrecord-00000-of-00001')]
  assert info['bev']['shape'] == [30, 60] and info['image_size'] == [32, 88]
  assert len(info['skipped']) == 81 - 10
  first = next(s for s in info['skipped'] if s['sample_token'] == FIRST_SCENE0523_SAMPLE)
  assert 'CAM_FRONT_LEFT' in first['reason'] and '.jpg' in first['reason']
  # Keyframes only in the fragment: 2 previous sweeps missing per sample but the scene's first.
  assert info['lidar_missing_sweep_files'] == 18
  assert sum(len(_examples(os.path.join(out, f))) for f in info['splits']['val']['files']) == 10


def test_round_trip_equals_source_arrays(built):
  import tensorflow as tf
  out, info = built
  options = _options()
  source = nuscenes_reader.Source(REAL_ROOT, REAL_VERSION, options)
  examples = _examples(os.path.join(out, info['splits']['val']['files'][0]))[1:]
  assert len(examples) == 9  # scene-0916 keyframes 1-9 (keyframe 0 ends chunk 0)
  for example in examples[:3]:
    feature = example.features.feature
    token = feature[schema.SAMPLE_TOKEN].bytes_list.value[0].decode()
    src = nuscenes_reader.read_sample(source, token)
    assert feature[schema.SCENE_TOKEN].bytes_list.value[0] == src[schema.SCENE_TOKEN]
    assert list(feature[schema.CAMERA_JPEG].bytes_list.value) == src[schema.CAMERA_JPEG]
    image = cv2.imdecode(np.frombuffer(src[schema.CAMERA_JPEG][0], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (32, 88, 3)
    for key, shape in ((schema.CAMERA_INTRINSICS, (6, 3, 3)), (schema.CAMERA_ROTATION, (6, 3, 3)),
                       (schema.CAMERA_TRANSLATION, (6, 3)), (schema.EGO_POSE, (4, 4)),
                       (schema.LIDAR_POINTS, (-1, 5)), (schema.VECTOR_POINTS, (-1, 2))):
      got = np.array(feature[key].float_list.value, np.float32).reshape(shape)
      np.testing.assert_array_equal(got, np.asarray(src[key], np.float32).reshape(shape))
    for key in (schema.VECTOR_CLASS, schema.VECTOR_NUM_POINTS):
      np.testing.assert_array_equal(feature[key].int64_list.value, src[key])
    for key, dtype in ((schema.SD_PRIOR, np.uint8), (schema.LABEL_SEMANTIC, np.uint8),
                       (schema.LABEL_INSTANCE, np.uint16), (schema.LABEL_DIRECTION, np.uint8),
                       (schema.LABEL_DIRECTION_BACKWARD, np.uint8)):
      png = _decode_png(feature[key])
      assert png.dtype == dtype and png.shape == (30, 60)
      np.testing.assert_array_equal(png, src[key])
    parsed = tf.io.parse_single_example(example.SerializeToString(), {
        schema.EGO_POSE: tf.io.FixedLenFeature([16], tf.float32),
        schema.CAMERA_JPEG: tf.io.FixedLenFeature([6], tf.string)})
    np.testing.assert_allclose(parsed[schema.EGO_POSE].numpy().reshape(4, 4),
                               src[schema.EGO_POSE], rtol=1e-6)
    assert (src[schema.LABEL_SEMANTIC] > 0).any()  # scene-0916 has dividers and boundaries
    np.testing.assert_array_equal(src[schema.VECTOR_NUM_POINTS].sum(),
                                  len(src[schema.VECTOR_POINTS]))


def _lidar_ref(nusc, token, min_range):
  """Keyframe LiDAR -> ego frame with the devkit's matrices, one point at a time."""
  from nuscenes.utils.data_classes import LidarPointCloud
  sd = nusc.get('sample_data', nusc.get('sample', token)['data']['LIDAR_TOP'])
  cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  rot, trans = Quaternion(cs['rotation']), np.array(cs['translation'])
  cloud = LidarPointCloud.from_file(os.path.join(nusc.dataroot, sd['filename'])).points.T
  out = []
  for x, y, z, intensity in cloud[::97]:
    p = rot.rotate([x, y, z]) + trans
    if np.hypot(p[0], p[1]) >= min_range:
      out.append([p[0], p[1], p[2], intensity, 0.0])
  return np.array(out)


def test_lidar_in_ego_frame_close_points_dropped(built):
  options = _options()
  source = nuscenes_reader.Source(REAL_ROOT, REAL_VERSION, options)
  token = 'b5989651183643369174912bc5641d3b'
  sd = source.nusc.get('sample_data', source.nusc.get('sample', token)['data']['LIDAR_TOP'])
  points, missing = nuscenes_reader.read_lidar(source.nusc, sd, token, 3, 2.2)
  assert missing == 0  # the scene's first keyframe has no previous sweep at all
  assert points.shape[1] == 5 and (np.hypot(points[:, 0], points[:, 1]) >= 2.2).all()
  ref = _lidar_ref(source.nusc, token, 2.2)
  raw = nuscenes_reader.read_lidar(source.nusc, sd, token, 1, 0.0)[0][::97]
  kept = np.hypot(raw[:, 0], raw[:, 1]) >= 2.2
  np.testing.assert_allclose(raw[kept], ref, atol=1e-4)


def _all_records(out, info):
  return [r for f in info['splits']['val']['files'] for r in _examples(os.path.join(out, f))]


def test_resume_reuses_finished_chunks(built, tmp_path, monkeypatch):
  """A build that dies in its second chunk (what kill -9 leaves: the first chunk's file and
  record, a half-written temp file, TFDS's incomplete folder, no dataset_info.json); the rerun
  reads only the second chunk again and writes the records and record of an unbroken build."""
  out, info = built
  copy = str(tmp_path / 'shards')
  generate = tfds_builder.generate_chunk
  read = []

  def dies_in_the_second_chunk(task, on_sample=None):
    if task['name'].startswith('val-00001'):
      raise KeyboardInterrupt('killed')
    return generate(task, on_sample)

  monkeypatch.setattr(tfds_builder, 'generate_chunk', dies_in_the_second_chunk)
  with pytest.raises(KeyboardInterrupt):
    build_shards.build_shards(REAL_ROOT, REAL_VERSION, copy, **_kwargs())
  chunks = os.path.join(copy, build_shards.PROGRESS_DIR, build_shards.CHUNKS_DIR)
  assert sorted(os.listdir(chunks)) == ['val-00000-of-00002.json', 'val-00000-of-00002.pkl']
  assert not os.path.exists(os.path.join(copy, 'dataset_info.json'))
  first = os.stat(os.path.join(chunks, 'val-00000-of-00002.json')).st_mtime_ns
  with open(os.path.join(chunks, 'val-00001-of-00002.pkl.tmp'), 'wb') as f:
    f.write(b'half')
  incomplete = os.path.join(copy, 'mapkd_nuscenes', build_shards.CUSTOM_CONFIG, 'incomplete.x')
  os.makedirs(incomplete)

  def counted(task, on_sample=None):
    read.append(task['name'])
    return generate(task, on_sample)

  monkeypatch.setattr(tfds_builder, 'generate_chunk', counted)
  info2 = build_shards.build_shards(REAL_ROOT, REAL_VERSION, copy, **_kwargs())
  assert read == ['val-00001-of-00002']
  assert os.stat(os.path.join(chunks, 'val-00000-of-00002.json')).st_mtime_ns == first
  assert sorted(os.listdir(chunks)) == ['val-00000-of-00002.json', 'val-00001-of-00002.json']
  assert not os.path.exists(incomplete)
  assert info2 == info | {'dataroot': info2['dataroot']}
  assert _all_records(copy, info2) == _all_records(out, info)

  # A finished build is kept as it is; one of other settings is deleted and built anew.
  read.clear()
  record_file = os.path.join(copy, info2['splits']['val']['files'][0])
  kept = os.stat(record_file).st_mtime_ns
  assert build_shards.build_shards(REAL_ROOT, REAL_VERSION, copy, **_kwargs()) == info2
  assert read == [] and os.stat(record_file).st_mtime_ns == kept
  other = build_shards.build_shards(REAL_ROOT, REAL_VERSION, copy, **_kwargs(limit=42))
  assert read == ['val-00000-of-00002', 'val-00001-of-00002']   # 21 + 21 other samples
  assert other['splits']['val']['shard_sizes'] == [0, 2] and other['plan'] != info2['plan']
  assert _all_records(copy, other) == _all_records(out, info)[:2]


def test_missing_camera_file_names_file_and_sample(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    build_shards.build_shards(REAL_ROOT, REAL_VERSION, str(tmp_path), **_kwargs(skip_bad=False))
  message = str(error.value)
  assert FIRST_SCENE0523_SAMPLE in message and 'CAM_FRONT_LEFT' in message
  assert os.path.join(REAL_ROOT, 'samples', 'CAM_FRONT_LEFT') in message
  assert not os.path.exists(tmp_path / 'dataset_info.json')


def test_unknown_version_and_split_list_what_exists(tmp_path):
  with pytest.raises(ValueError, match=r"v1.0-trainval.*\['v1.0-mini-extract'\]"):
    build_shards.build_shards(REAL_ROOT, 'v1.0-trainval', str(tmp_path), **_kwargs())
  with pytest.raises(ValueError, match=r"unknown split.*'test'.*known: \['train', 'val'\]"):
    build_shards.build_shards(REAL_ROOT, REAL_VERSION, str(tmp_path),
                              **_kwargs(splits=['test']))


def _edited_root(tmp_path, *, drop_tables=(), location=None, drop_map_layers=()):
  """A dataroot beside the fragment: big folders symlinked, tables/map JSON edited copies.

  Args:
    drop_tables: table names whose JSON is left out.
    location: if given, every log row (and the map JSON's name) is moved to this location.
    drop_map_layers: layer keys deleted from the map-expansion JSON.
  """
  root = tmp_path / 'root'
  (root / REAL_VERSION).mkdir(parents=True)
  (root / 'maps' / 'expansion').mkdir(parents=True)
  os.symlink(os.path.join(REAL_ROOT, 'samples'), root / 'samples')
  for name in os.listdir(os.path.join(REAL_ROOT, 'maps')):
    if name.endswith('.png'):
      os.symlink(os.path.join(REAL_ROOT, 'maps', name), root / 'maps' / name)
  for name in os.listdir(os.path.join(REAL_ROOT, REAL_VERSION)):
    if name[:-len('.json')] in drop_tables:
      continue
    source = os.path.join(REAL_ROOT, REAL_VERSION, name)
    if name == 'log.json' and location:
      with open(source) as f:
        logs = json.load(f)
      with open(root / REAL_VERSION / name, 'w') as f:
        json.dump([dict(row, location=location) for row in logs], f)
    else:
      os.symlink(source, root / REAL_VERSION / name)
  with open(os.path.join(REAL_ROOT, 'maps', 'expansion', f'{REAL_LOCATION}.json')) as f:
    map_json = json.load(f)
  for layer in drop_map_layers:
    del map_json[layer]
  with open(root / 'maps' / 'expansion' / f'{location or REAL_LOCATION}.json', 'w') as f:
    json.dump(map_json, f)
  return str(root)


def _build_scene(root, out, **overrides):
  return build_shards.build_shards(root, REAL_VERSION, str(out), **_kwargs(
      **dict(dict(scenes=[REAL_SCENE], splits=None), **overrides)))


def test_unknown_scene_names_flag_bad_name_and_known_scenes(tmp_path):
  with pytest.raises(ValueError) as error:
    _build_scene(REAL_ROOT, tmp_path, scenes=[REAL_SCENE, 'scene-9999'])
  message = str(error.value)
  assert '--scenes' in message and "'scene-9999'" in message
  assert REAL_SCENE in message and OTHER_SCENE in message
  assert not os.path.exists(tmp_path / 'dataset_info.json')


def test_select_scenes_lists_at_most_max_listed_known_names():
  known = [f'scene-{k:04d}' for k in range(30)]
  with pytest.raises(ValueError, match=r'known \(30\): scene-0000, .*scene-0019 and 10 more'):
    build_plan.select_scenes({'train': known}, ['nope'], known, max_listed=20)
  assert build_plan.select_scenes({'train': known[:2], 'val': known[2:]}, ['scene-0001'],
                                    known) == {'train': ['scene-0001']}
  with pytest.raises(ValueError, match=r"--scenes: scene\(s\) \['scene-0005'\] lie outside"):
    build_plan.select_scenes({'train': known[:2]}, ['scene-0005'], known)


def test_missing_map_layer_reported_once_and_treated_as_empty(tmp_path, caplog):
  root = _edited_root(tmp_path, drop_map_layers=('lane_divider',))
  with caplog.at_level('WARNING'):
    info = _build_scene(root, tmp_path / 'out', limit=4)
  assert info['missing_map_layers'] == {REAL_LOCATION: ['lane_divider']}
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  layer_warnings = [w for w in warnings if 'lane_divider' in w]
  assert len(layer_warnings) == 1 and REAL_LOCATION in layer_warnings[0], warnings
  assert info['splits']['val']['num_samples'] == 4 and not info['skipped']
  # The fragment has no road_divider near scene-0916: without lane dividers no divider is left.
  source = nuscenes_reader.Source(root, REAL_VERSION, _options())
  fields = nuscenes_reader.read_sample(source, 'b5989651183643369174912bc5641d3b')
  assert source.missing_map_layers == {REAL_LOCATION: ['lane_divider']}
  assert not fields['polylines'][1] and fields['polylines'][3]


def test_full_map_reports_no_missing_layer(tmp_path):
  _, missing = nuscenes_reader.load_map(REAL_ROOT, REAL_LOCATION)
  assert missing == []


def test_location_without_origin_fails_naming_it_even_with_skip_bad(tmp_path):
  root = _edited_root(tmp_path, location='singapore-mars')
  osm = tmp_path / 'osm'
  osm.mkdir()
  for ext in ('shp', 'shx', 'dbf', 'prj', 'cpg'):
    os.symlink(os.path.join(REAL_OSM, f'{REAL_LOCATION}.{ext}'), osm / f'singapore-mars.{ext}')
  with pytest.raises(ValueError) as error:
    _build_scene(root, tmp_path / 'out', osm_dir=str(osm), skip_bad=True)
  message = str(error.value)
  assert "'singapore-mars'" in message and 'singapore-mars.shp' in message
  assert REAL_LOCATION in message and 'boston-seaport' in message


def test_missing_shapefile_fails_naming_it_even_with_skip_bad(tmp_path):
  empty = tmp_path / 'osm'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f'{empty}/{REAL_LOCATION}.shp.*--osm-dir'):
    _build_scene(REAL_ROOT, tmp_path / 'out', osm_dir=str(empty), skip_bad=True)


@pytest.mark.parametrize('table', ['sample_data', 'log'])
def test_missing_table_json_named_not_a_devkit_traceback(tmp_path, table):
  root = _edited_root(tmp_path, drop_tables=(table,))
  with pytest.raises(FileNotFoundError, match=f'{REAL_VERSION}/{table}.json'):
    _build_scene(root, tmp_path / 'out')


def test_missing_map_raster_named(tmp_path):
  root = _edited_root(tmp_path)
  with open(os.path.join(REAL_ROOT, REAL_VERSION, 'map.json')) as f:
    first_png = json.load(f)[0]['filename']
  os.remove(os.path.join(root, first_png))
  with pytest.raises(FileNotFoundError, match=first_png):
    _build_scene(root, tmp_path / 'out')


def test_osm_cache_gives_the_converted_lines_and_is_used(tmp_path, monkeypatch):
  classes = tcs.get_config().data.sd_road_classes
  shp = sd_prior.osm_path(REAL_OSM, REAL_LOCATION)
  converted = sd_prior.load_osm_roads(shp, REAL_LOCATION, classes)[0]
  first = sd_prior.load_osm_roads(shp, REAL_LOCATION, classes, cache_dir=str(tmp_path))[0]
  cache_file = sd_prior.osm_cache_path(str(tmp_path), shp, REAL_LOCATION, classes)
  assert os.listdir(tmp_path) == [os.path.basename(cache_file)]
  assert os.path.basename(cache_file).startswith(REAL_LOCATION + '-')

  def no_conversion(*args):
    raise AssertionError(f'converted again: {args}')

  monkeypatch.setattr(sd_prior, 'convert_osm_lines', no_conversion)
  cached = sd_prior.load_osm_roads(shp, REAL_LOCATION, classes, cache_dir=str(tmp_path))[0]
  assert len(converted) == len(first) == len(cached) > 0
  for a, b, c in zip(converted, first, cached):
    np.testing.assert_array_equal(np.asarray(a.coords), np.asarray(b.coords))
    np.testing.assert_array_equal(np.asarray(a.coords), np.asarray(c.coords))
  # Another class list is another entry (so it converts, and the patched converter raises).
  assert sd_prior.osm_cache_path(str(tmp_path), shp, REAL_LOCATION, classes[:2]) != cache_file
  with pytest.raises(AssertionError, match='converted again'):
    sd_prior.load_osm_roads(shp, REAL_LOCATION, classes[:2], cache_dir=str(tmp_path))


def test_build_writes_osm_cache_under_progress(built):
  out, _ = built
  cache = os.path.join(out, build_shards.PROGRESS_DIR, build_shards.OSM_CACHE_DIR)
  names = sorted(os.listdir(cache))
  # splits=['val'] holds scene-0916 (queenstown) and scene-0523 (boston): both warmed.
  assert [n.rsplit('-', 1)[0] for n in names] == ['boston-seaport', REAL_LOCATION]
  assert all(n.endswith('.npz') for n in names)


def test_dataset_info_records_the_label_width_and_the_check_refuses_another(built):
  from mapkd_jax.data import dataset_info
  out, info = built
  data = tcs.get_config().data
  # 1.0 m pixels: 5 x 0.15 / 1.0 = 0.75 -> cv2 thickness 1; filter 9 x 0.15 = 1.35 -> 1.
  assert info['label_width'] == dict(
      rule='reference_cv2', thickness_ref_step=0.15, label_thickness_ref=5, sd_thickness_ref=5,
      label_thickness_px=1, filter_thickness_px=1, sd_thickness_px=1)
  data.bev_x, data.bev_y, data.image_size = (-30.0, 30.0, 1.0), (-15.0, 15.0, 1.0), (32, 88)
  dataset_info.check_dataset_info(info, data, out)   # the config the shards were built for
  data.label_thickness_ref = 3
  with pytest.raises(ValueError) as error:
    dataset_info.check_dataset_info(info, data, out)
  message = str(error.value)
  assert out in message and 'thickness 5 (labels)' in message
  assert 'thickness 3 (labels)' in message
  # Shards built before the reference rule (no label_width record): refused, named.
  data.label_thickness_ref = 5
  legacy = {k: v for k, v in info.items() if k != 'label_width'}
  with pytest.raises(ValueError, match='exact 5 px'):
    dataset_info.check_dataset_info({**legacy, 'line_width_px': 5}, data, out)


def test_rerun_over_a_pre_issue17_shard_dir_removes_its_files(built, tmp_path):
  """Shards build_shards wrote with its own writer (files in SHARDS, dataset_info.json without
  `plan`): the rerun deletes them and their progress records, and keeps the TFDS build."""
  out, info = built
  copy = str(tmp_path / 'shards')
  shutil.copytree(out, copy)
  names = ['val-00000-of-00002.tfrecord', 'val-00001-of-00002.tfrecord']
  for name in names:
    with open(os.path.join(copy, name), 'wb') as f:
      f.write(b'old records')
    with open(os.path.join(copy, build_shards.PROGRESS_DIR, name + '.json'), 'w') as f:
      f.write('{}')
  legacy = {k: v for k, v in info.items() if k not in ('plan', 'tfds_dir')}
  legacy['splits'] = {'val': dict(num_samples=10, num_examples=10, files=names)}
  with open(os.path.join(copy, 'dataset_info.json'), 'w') as f:
    json.dump(legacy, f)
  assert build_shards.build_shards(REAL_ROOT, REAL_VERSION, copy, **_kwargs()) == info
  assert not [n for n in os.listdir(copy) if n.endswith('.tfrecord')]
  assert not [n for n in os.listdir(os.path.join(copy, build_shards.PROGRESS_DIR))
              if n.endswith('.tfrecord.json')]


def test_two_worker_processes_write_the_records_of_one(built, tmp_path):
  """The builder's spawn pool (a chunk per task, results read back in order) against the
  in-process build of the `built` fixture."""
  out, info = built
  other = str(tmp_path / 'shards')
  info2 = build_shards.build_shards(REAL_ROOT, REAL_VERSION, other, **_kwargs(workers=2))
  assert info2 == info
  assert _all_records(other, info2) == _all_records(out, info)
