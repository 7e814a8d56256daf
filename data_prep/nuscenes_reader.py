"""nuScenes-format dataroot -> arrays of one keyframe, through nuscenes-devkit only.

Reads the six cameras (JPEG re-encoded at the target size, intrinsics scaled to it), merges the
LIDAR_TOP keyframe with its previous sweeps into the keyframe's ego frame, and computes the map
labels (`labels`) and the SD prior (`sd_prior`) of the ego patch. Real nuScenes and the synthetic
world share this code path; `build_shards` turns the result into shard records.

Bad input: a missing keyframe file (camera or LIDAR_TOP) raises FileNotFoundError naming the
file, channel and sample; a table folder lacking a table the devkit loads raises
FileNotFoundError naming the JSON file. Missing *sweep* files are not an error: the sample keeps
the sweeps that exist and the missing ones are counted, because public extracts often ship
keyframes only. Layers missing from a map-expansion JSON (the devkit would raise KeyError) are
treated as empty and listed in `Source.missing_map_layers`; the caller reports them once.
"""
import dataclasses
import io
import json
import logging
import os

import numpy as np
from PIL import Image
from pyquaternion import Quaternion

from data_prep import labels
from data_prep import sd_prior
from mapkd_jax.data import dataset_info
from mapkd_jax.data import schema

LIDAR_CHANNEL = 'LIDAR_TOP'
# The tables nuscenes-devkit 1.2 `NuScenes.__init__` loads unconditionally.
REQUIRED_TABLES = ('category', 'attribute', 'visibility', 'instance', 'sensor',
                   'calibrated_sensor', 'ego_pose', 'log', 'scene', 'sample', 'sample_data',
                   'sample_annotation', 'map')


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """Everything that determines the content of a shard (compared on resume)."""
  bev_x: tuple
  bev_y: tuple
  image_size: tuple          # (H, W)
  cameras: tuple
  label_thickness_ref: int   # cv2 thickness at thickness_ref_step (config.data)
  sd_thickness_ref: int
  thickness_ref_step: float
  direction_bins: int
  lidar_sweeps: int          # keyframe included
  lidar_min_range: float
  jpeg_quality: int
  boundary_clip_margin: float
  sd_road_classes: tuple
  osm_dir: str


def make_options(*, bev_x, bev_y, image_size, cameras, direction_bins, lidar_sweeps,
                 lidar_min_range, jpeg_quality, boundary_clip_margin, sd_road_classes, osm_dir,
                 label_thickness_ref=None, sd_thickness_ref=None, thickness_ref_step=0.15):
  """`BuildOptions` with canonical types (tuples, floats, absolute osm_dir)."""
  if label_thickness_ref is None or sd_thickness_ref is None:
    raise ValueError('make_options: label_thickness_ref and sd_thickness_ref are required '
                     '(config.data.label_thickness_ref / sd_thickness_ref)')
  options = BuildOptions(tuple(map(float, bev_x)), tuple(map(float, bev_y)),
                         tuple(map(int, image_size)), tuple(cameras), int(label_thickness_ref),
                         int(sd_thickness_ref), float(thickness_ref_step), int(direction_bins),
                         int(lidar_sweeps), float(lidar_min_range), int(jpeg_quality),
                         float(boundary_clip_margin), tuple(sd_road_classes),
                         os.path.abspath(osm_dir))
  label_width_spec(options)  # Fails now, naming the key, on a bad thickness or step.
  return options


def label_width_spec(options):
  """dataset_info's `label_width` record (cv2 thicknesses on this canvas) of `BuildOptions`."""
  return dataset_info.label_width_spec(dict(
      label_thickness_ref=options.label_thickness_ref, sd_thickness_ref=options.sd_thickness_ref,
      thickness_ref_step=options.thickness_ref_step, bev_x=options.bev_x, bev_y=options.bev_y))


def open_nuscenes(dataroot, version):
  """NuScenes tables, or ValueError/FileNotFoundError naming what exists."""
  if not os.path.isdir(dataroot):
    raise FileNotFoundError(f'--dataroot {dataroot!r} is not a directory')
  table_dir = os.path.join(dataroot, version)
  if not os.path.isfile(os.path.join(table_dir, 'scene.json')):
    found = sorted(d for d in os.listdir(dataroot)
                   if os.path.isfile(os.path.join(dataroot, d, 'scene.json')))
    raise ValueError(f'--version {version!r}: no tables at {table_dir}; versions in '
                     f'{dataroot}: {found}')
  missing = [os.path.join(table_dir, f'{name}.json') for name in REQUIRED_TABLES
             if not os.path.isfile(os.path.join(table_dir, f'{name}.json'))]
  if missing:
    raise FileNotFoundError(f'--version {version!r}: table file(s) missing: {missing} (a table '
                            f'folder of nuScenes v1.0 needs {list(REQUIRED_TABLES)})')
  _require_map_masks(dataroot, table_dir)
  from nuscenes.nuscenes import NuScenes  # pylint: disable=g-import-not-at-top
  return NuScenes(version=version, dataroot=dataroot, verbose=False)


def _require_map_masks(dataroot, table_dir):
  """The devkit asserts that every map.json raster exists; name the absent one instead."""
  path = os.path.join(table_dir, 'map.json')
  try:
    with open(path) as f:
      records = json.load(f)
    filenames = [r['filename'] for r in records]
  except (json.JSONDecodeError, TypeError, KeyError) as e:
    raise ValueError(f'{path}: expected a list of map records with a filename ({e})') from e
  absent = [os.path.join(dataroot, f) for f in filenames
            if not os.path.isfile(os.path.join(dataroot, f))]
  if absent:
    raise FileNotFoundError(f'{path}: map raster file(s) missing: {absent}')


def load_map(dataroot, location):
  """NuScenesMap of `location`, with layers absent from its JSON treated as empty.

  The devkit indexes the JSON by every layer name and raises a bare KeyError on the first
  absent one; map files cut down to a region (or older exports) lack some layers.

  Returns:
    (NuScenesMap, sorted names of the layers absent from the JSON).
  """
  from nuscenes.map_expansion.map_api import NuScenesMap  # pylint: disable=g-import-not-at-top
  missing = set()

  class TolerantMap(NuScenesMap):
    """Returns [] / {} for a layer the JSON does not hold, and remembers its name."""

    def _load_layer(self, layer_name):
      if layer_name not in self.json_obj:
        missing.add(layer_name)
        return []
      return self.json_obj[layer_name]

    def _load_layer_dict(self, layer_name):
      if layer_name not in self.json_obj:
        missing.add(layer_name)
        return {}
      return self.json_obj[layer_name]

  path = os.path.join(dataroot, 'maps', 'expansion', f'{location}.json')
  try:
    nusc_map = TolerantMap(dataroot=dataroot, map_name=location)
  except KeyError as e:
    # A record refers to a node/line/polygon token of a layer that is absent or incomplete.
    raise ValueError(f'{path}: map record refers to unknown token {e} (layers absent from the '
                     f'file: {sorted(missing)})') from e
  return nusc_map, sorted(missing)


def warn_missing_map_layers(missing_by_location):
  """Logs one warning per location that lacks map layers ({location: [layer names]})."""
  for location, names in sorted(missing_by_location.items()):
    if names:
      logging.warning('map %s: layer(s) %s absent from the map-expansion JSON; treated as empty',
                      location, ', '.join(names))


def _pose_matrix(record):
  """4x4 of a calibrated_sensor or ego_pose record (child frame -> parent frame)."""
  matrix = np.eye(4)
  matrix[:3, :3] = Quaternion(record['rotation']).rotation_matrix
  matrix[:3, 3] = record['translation']
  return matrix


def _require_file(nusc, sample_data, sample_token):
  path = os.path.join(nusc.dataroot, sample_data['filename'])
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: {sample_data["channel"]} keyframe file missing for '
                            f'sample {sample_token}')
  return path


def read_camera(nusc, sample_data, sample_token, image_size, jpeg_quality):
  """(JPEG bytes at image_size, intrinsics 3x3 scaled to it, rotation 3x3, translation 3)."""
  path = _require_file(nusc, sample_data, sample_token)
  height, width = image_size
  with Image.open(path) as image:
    source_w, source_h = image.size
    image.draft('RGB', (width, height))  # JPEG DCT downscaling: decode only what we need.
    image = image.convert('RGB').resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=jpeg_quality)
  calib = nusc.get('calibrated_sensor', sample_data['calibrated_sensor_token'])
  intrinsics = np.array(calib['camera_intrinsic'], dtype=np.float64)
  intrinsics[0] *= width / source_w
  intrinsics[1] *= height / source_h
  return (buffer.getvalue(), intrinsics, Quaternion(calib['rotation']).rotation_matrix,
          np.array(calib['translation'], dtype=np.float64))


def read_lidar(nusc, keyframe, sample_token, num_sweeps, min_range):
  """Keyframe + previous sweeps in the keyframe's ego frame.

  Returns:
    (points [N, 5] float32 (x, y, z, intensity, dt seconds), number of missing sweep files).
  """
  from nuscenes.utils.data_classes import LidarPointCloud  # pylint: disable=g-import-not-at-top
  _require_file(nusc, keyframe, sample_token)
  key_pose = _pose_matrix(nusc.get('ego_pose', keyframe['ego_pose_token']))
  ego_from_global = np.linalg.inv(key_pose)
  merged, missing, record = [], 0, keyframe
  for _ in range(num_sweeps):
    path = os.path.join(nusc.dataroot, record['filename'])
    if os.path.isfile(path):
      cloud = LidarPointCloud.from_file(path).points  # [4, N] sensor frame
      transform = (ego_from_global @ _pose_matrix(nusc.get('ego_pose', record['ego_pose_token']))
                   @ _pose_matrix(nusc.get('calibrated_sensor',
                                           record['calibrated_sensor_token'])))
      xyz = transform[:3, :3] @ cloud[:3] + transform[:3, 3:]
      dt = np.full((1, cloud.shape[1]), 1e-6 * (keyframe['timestamp'] - record['timestamp']))
      merged.append(np.concatenate([xyz, cloud[3:4], dt], axis=0).T)
    else:
      missing += 1
    if not record['prev']:
      break
    record = nusc.get('sample_data', record['prev'])
  points = np.concatenate(merged, axis=0)
  points = points[np.hypot(points[:, 0], points[:, 1]) >= min_range]
  return points.astype(np.float32), missing


class Source:
  """Tables, map layers and OSM roads of one dataroot, loaded once per process."""

  def __init__(self, dataroot, version, options, *, osm_cache_dir=None):
    """`osm_cache_dir`: where converted OSM skeletons are cached on disk (None: no disk cache)."""
    self.nusc = open_nuscenes(dataroot, version)
    self.options = options
    self.osm_cache_dir = osm_cache_dir
    self.missing_map_layers = {}  # location -> [layer names absent from its map JSON]
    self._maps, self._osm = {}, {}

  def location(self, sample):
    scene = self.nusc.get('scene', sample['scene_token'])
    return self.nusc.get('log', scene['log_token'])['location']

  def map_layers(self, location):
    if location not in self._maps:
      map_dir = os.path.join(self.nusc.dataroot, 'maps', 'expansion')
      if not os.path.isfile(os.path.join(map_dir, f'{location}.json')):
        found = sorted(os.listdir(map_dir)) if os.path.isdir(map_dir) else []
        raise FileNotFoundError(f'{map_dir}/{location}.json: no map for location {location!r}; '
                                f'maps there: {found}')
      nusc_map, missing = load_map(self.nusc.dataroot, location)
      self.missing_map_layers[location] = missing
      self._maps[location] = labels.load_map_layers(nusc_map)
    return self._maps[location]

  def osm_roads(self, location):
    if location not in self._osm:
      path = sd_prior.osm_path(self.options.osm_dir, location)
      self._osm[location] = sd_prior.load_osm_roads(
          path, location, self.options.sd_road_classes, cache_dir=self.osm_cache_dir)
    return self._osm[location]


def read_sample(source, sample_token):
  """All shard fields of one keyframe, keyed by schema constants, plus `polylines` (per class
  id, ego-frame [N, 2] arrays) and `missing_sweeps`. Images stay JPEG bytes."""
  nusc, opts = source.nusc, source.options
  sample = nusc.get('sample', sample_token)
  for channel in tuple(opts.cameras) + (LIDAR_CHANNEL,):
    if channel not in sample['data']:
      raise ValueError(f'sample {sample_token}: no {channel} sample_data in the tables')
  cams = [read_camera(nusc, nusc.get('sample_data', sample['data'][cam]), sample_token,
                      opts.image_size, opts.jpeg_quality) for cam in opts.cameras]
  keyframe = nusc.get('sample_data', sample['data'][LIDAR_CHANNEL])
  points, missing = read_lidar(nusc, keyframe, sample_token, opts.lidar_sweeps,
                               opts.lidar_min_range)
  ego_pose = _pose_matrix(nusc.get('ego_pose', keyframe['ego_pose_token']))
  ego_xy = ego_pose[:2, 3]
  ego_yaw = float(np.arctan2(ego_pose[1, 0], ego_pose[0, 0]))
  location = source.location(sample)
  polylines = labels.extract_polylines(source.map_layers(location), ego_xy, ego_yaw, opts.bev_x,
                                       opts.bev_y, clip_margin=opts.boundary_clip_margin)
  width = label_width_spec(opts)
  semantic, instance, direction, backward = labels.rasterize_polylines(
      polylines, opts.bev_x, opts.bev_y, thickness=width['label_thickness_px'],
      filter_thickness=width['filter_thickness_px'], num_direction_bins=opts.direction_bins,
      with_backward=True)
  sd = sd_prior.sd_raster(source.osm_roads(location), ego_xy, ego_yaw, opts.bev_x, opts.bev_y,
                          thickness=width['sd_thickness_px'])
  vectors = [(c, line) for c in sorted(polylines) for line in polylines[c]]
  return {
      schema.SAMPLE_TOKEN: sample_token.encode(),
      schema.SCENE_TOKEN: sample['scene_token'].encode(),
      schema.CAMERA_JPEG: [c[0] for c in cams],
      schema.CAMERA_INTRINSICS: np.stack([c[1] for c in cams]),
      schema.CAMERA_ROTATION: np.stack([c[2] for c in cams]),
      schema.CAMERA_TRANSLATION: np.stack([c[3] for c in cams]),
      schema.EGO_POSE: ego_pose,
      schema.LIDAR_POINTS: points,
      schema.SD_PRIOR: sd,
      schema.LABEL_SEMANTIC: semantic,
      schema.LABEL_INSTANCE: instance,
      schema.LABEL_DIRECTION: direction,
      schema.LABEL_DIRECTION_BACKWARD: backward,
      schema.VECTOR_CLASS: np.array([c for c, _ in vectors], np.int64),
      schema.VECTOR_NUM_POINTS: np.array([len(line) for _, line in vectors], np.int64),
      schema.VECTOR_POINTS: (np.concatenate([line for _, line in vectors]) if vectors
                             else np.zeros((0, 2))),
      'polylines': polylines,
      'missing_sweeps': missing,
  }
