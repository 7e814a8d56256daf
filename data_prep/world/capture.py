"""Drives one scene through the town and writes its sensor files; returns its nuScenes table rows."""
import functools
import os

import cv2
import numpy as np
from pyquaternion import Quaternion

from data_prep.world import lidar as lidar_lib
from data_prep.world import raster as raster_lib
from data_prep.world import render
from data_prep.world import scene as scene_lib
from data_prep.world import town as town_lib
from data_prep.world.map_json import token

LOCATIONS = ('boston-seaport', 'singapore-onenorth', 'singapore-hollandvillage', 'singapore-queenstown')
KEYFRAME_US = 500_000      # keyframes at 2 Hz
SWEEP_US = 50_000          # LiDAR spins at 20 Hz; the sweeps kept are the ones just before a keyframe


@functools.lru_cache(maxsize=4)
def cached_town(location_index, seed):
  return town_lib.build_town(location_index, seed)


def _quat(matrix):
  return [float(v) for v in Quaternion(matrix=matrix[:3, :3], rtol=1e-6, atol=1e-6).elements]


def capture_scene(job):
  """Renders scene `job['index']` into job['root'] and returns its table rows.

  Args:
    job: dict(root, index, seed, samples, image_size (H, W), sweeps, ground_res, ground_margin,
      lidar (dict of lidar_lib.scan keyword args), camera_range).

  Returns:
    dict of table name -> list of rows (log, scene, sample, sample_data, ego_pose, calibrated_sensor)
    plus 'location'.
  """
  root, index, seed = job['root'], job['index'], job['seed']
  height, width = job['image_size']
  location_index = index % len(LOCATIONS)
  location = LOCATIONS[location_index]
  town = cached_town(location_index, seed)
  rng = np.random.default_rng([seed, index, 5])
  style = raster_lib.scene_style(rng)
  rig = scene_lib.RIG
  speed = float(rng.choice([0.0, 1.0, 1.0, 1.0]) * rng.uniform(4.0, 10.0))   # some scenes wait at rest
  duration = job['samples'] * KEYFRAME_US / 1e6
  ego_s0 = 25.0
  path, first = scene_lib.plan_route(town, rng, ego_s0 + speed * duration + 60.0, right_hand=location_index == 0)
  arc = town_lib.arc_length(path)
  margin = job['ground_margin']
  bbox = (*(path.min(0) - margin), *(path.max(0) + margin))
  ground = raster_lib.ground_raster(town, bbox, job['ground_res'], style, rng)
  movers, static = scene_lib.make_traffic(path, arc, first, rng, ground, ego_s0=ego_s0, ego_speed=speed,
                                          lane_width=town['params'].lane_width,
                                          sidewalk_width=town['params'].sidewalk_width)

  logfile = f'nsyn-{seed:04d}-{index:04d}'
  log_token = token(seed, 'log', index)
  scene_token = token(seed, 'scene', index)
  base_us = 1_533_000_000_000_000 + seed * 10_000_000_000 + index * 100_000_000
  rows = {k: [] for k in ('sample', 'sample_data', 'ego_pose', 'calibrated_sensor')}
  sensors = {}
  for name, translation, yaw, hfov in rig['cameras']:
    # Each car's calibration differs a little from the nominal rig (tenths of a degree, millimetres).
    ext = scene_lib.sensor_matrix(np.add(translation, rng.normal(0, 0.005, 3)), yaw + rng.normal(0, 0.3), True)
    tilt = Quaternion(axis=[1, 0, 0], angle=np.deg2rad(rng.normal(0, 0.3))).rotation_matrix   # camera pitch
    ext[:3, :3] = ext[:3, :3] @ tilt
    sensors[name] = dict(ext=ext, k=scene_lib.intrinsics(hfov, height, width))
  lidar_name, lidar_t, lidar_yaw = rig['lidar']
  sensors[lidar_name] = dict(ext=scene_lib.sensor_matrix(lidar_t, lidar_yaw, False), k=None)
  for name, sensor in sensors.items():
    sensor['token'] = token(seed, 'calibrated_sensor', index, name)
    rows['calibrated_sensor'].append(dict(
        token=sensor['token'], sensor_token=token('sensor', name),
        translation=[float(v) for v in sensor['ext'][:3, 3]], rotation=_quat(sensor['ext']),
        camera_intrinsic=sensor['k'].tolist() if sensor['k'] is not None else []))
  cam_dirs = {}
  for name, sensor in sensors.items():
    if sensor['k'] is not None:
      _, cam_dirs[name] = render.camera_rays(sensor['k'], np.eye(4), height, width)

  sample_tokens = [token(seed, 'sample', index, k) for k in range(job['samples'])]
  prev_data = {name: '' for name in sensors}
  data_chain = {name: [] for name in sensors}
  for k, sample_token in enumerate(sample_tokens):
    key_us = base_us + k * KEYFRAME_US
    rows['sample'].append(dict(token=sample_token, timestamp=key_us, prev=sample_tokens[k - 1] if k else '',
                               next=sample_tokens[k + 1] if k + 1 < len(sample_tokens) else '',
                               scene_token=scene_token))
    captures = [(lidar_name, key_us - SWEEP_US * j, False) for j in range(job['sweeps'], 0, -1)]
    captures += [(lidar_name, key_us, True)] + [(name, key_us, True) for name, *_ in rig['cameras']]
    for name, stamp, key in captures:
      time = (stamp - base_us) / 1e6
      s_ego = ego_s0 + speed * time
      (x, y), yaw = scene_lib._along(path, arc, s_ego, 0.0)
      ego = scene_lib.ego_pose_matrix(x, y, yaw, ground, rig['wheelbase'], rig['track'])
      sensor_to_map = ego @ sensors[name]['ext']
      boxes = scene_lib.boxes_at(movers, static, path, arc, ground, time)
      folder = 'samples' if key else 'sweeps'
      if name == lidar_name:
        points, _ = lidar_lib.scan(sensor_to_map, ground, town['hills'], boxes, rng, **job['lidar'])
        filename = f'{folder}/{name}/{logfile}__{name}__{stamp}.pcd.bin'
        points.tofile(os.path.join(root, filename))
        fileformat, size = 'pcd', (0, 0)
      else:
        dirs = cam_dirs[name] @ sensor_to_map[:3, :3].T
        radiance = render.shade_camera(sensor_to_map[:3, 3], dirs, ground, town['hills'], boxes, style,
                                       t_max=job['camera_range'])
        image = render.expose(radiance, height, width, style, rng)
        filename = f'{folder}/{name}/{logfile}__{name}__{stamp}.jpg'
        cv2.imwrite(os.path.join(root, filename), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, job['jpeg_quality']])
        fileformat, size = 'jpg', (height, width)
      data_token = token(seed, 'sample_data', index, name, stamp)
      rows['ego_pose'].append(dict(token=data_token, timestamp=stamp, rotation=_quat(ego),
                                   translation=[float(v) for v in ego[:3, 3]]))
      rows['sample_data'].append(dict(
          token=data_token, sample_token=sample_token, ego_pose_token=data_token,
          calibrated_sensor_token=sensors[name]['token'], timestamp=stamp, fileformat=fileformat,
          is_key_frame=key, height=size[0], width=size[1], filename=filename, prev=prev_data[name], next=''))
      data_chain[name].append(rows['sample_data'][-1])
      prev_data[name] = data_token
  for chain in data_chain.values():
    for a, b in zip(chain[:-1], chain[1:]):
      a['next'] = b['token']
  rows['log'] = [dict(token=log_token, logfile=logfile, vehicle='nsyn', date_captured='2018-08-01',
                      location=location)]
  rows['scene'] = [dict(token=scene_token, log_token=log_token, nbr_samples=len(sample_tokens),
                        first_sample_token=sample_tokens[0], last_sample_token=sample_tokens[-1],
                        name=f'scene-{index:04d}',
                        description=f'synthetic {location}, speed {speed:.1f} m/s, light {style["light"]:.2f}')]
  rows['location'] = location
  return rows
