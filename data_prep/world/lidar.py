"""A 32-beam spinning LiDAR scan of the world, in the nuScenes LIDAR_TOP file layout.

Points are float32 (x, y, z, intensity, ring) in the sensor frame; intensity follows the
surface (paint is retro-reflective, so brighter than asphalt), scaled like nuScenes (0-255).
"""
import numpy as np

from data_prep.world import raster as raster_lib
from data_prep.world import render

# Reflectivity per ground surface (GRASS, SIDEWALK, ASPHALT, PAINT) and for boxes.
_REFLECTIVITY = np.array([12.0, 25.0, 8.0, 80.0])
_BOX_REFLECTIVITY = 30.0


def beam_directions(beams, azimuth_steps, elevation_range):
  """Unit directions [beams * azimuth_steps, 3] in the sensor frame and ring index of each."""
  elevation = np.deg2rad(np.linspace(elevation_range[0], elevation_range[1], beams))
  azimuth = np.linspace(-np.pi, np.pi, azimuth_steps, endpoint=False)
  el, az = np.meshgrid(elevation, azimuth, indexing='ij')
  dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
  ring = np.repeat(np.arange(beams), azimuth_steps)
  return dirs, ring


def scan(lidar_to_global, ground, hills, boxes, rng, *, beams=32, azimuth_steps=1000,
         elevation_range=(-30.67, 10.67), max_range=70.0, min_range=1.0, range_noise=0.02, dropout=0.05):
  """One sweep: points [P, 5] float32 (x, y, z, intensity, ring) in the sensor frame.

  Returns:
    (points, box_hits [len(boxes)] number of returns on each box).
  """
  dirs_sensor, ring = beam_directions(beams, azimuth_steps, elevation_range)
  rot = lidar_to_global[:3, :3]
  origin = lidar_to_global[:3, 3]
  dirs = dirs_sensor @ rot.T
  t_ground = render.intersect_ground(origin, dirs, ground, hills, t_max=max_range)
  t_box, box_index, _, _ = render.intersect_boxes(origin, dirs, boxes)
  on_box = t_box < t_ground
  t = np.minimum(t_ground, t_box)
  keep = np.isfinite(t) & (t > min_range) & (t < max_range) & (rng.uniform(size=t.size) > dropout)
  t_noisy = np.where(keep, t, 0.0) + rng.normal(0.0, range_noise, t.size)
  hit = origin + t[:, None] * dirs
  surface = raster_lib.sample(ground, 'surface', hit[:, 0], hit[:, 1], nearest=True)
  paint = raster_lib.sample(ground, 'paint', hit[:, 0], hit[:, 1], nearest=True)
  reflect = _REFLECTIVITY[np.minimum(surface, 2)] + (_REFLECTIVITY[3] - _REFLECTIVITY[2]) * np.clip(paint, 0, 1) * (surface >= 2)
  reflect = np.where(on_box, _BOX_REFLECTIVITY, reflect)
  incidence = np.abs(dirs[:, 2]) + 0.3 * on_box
  intensity = np.clip(reflect * (0.4 + 0.6 * np.clip(incidence * 3, 0, 1)) * rng.lognormal(0, 0.2, t.size), 0, 255)
  points = np.concatenate([dirs_sensor * t_noisy[:, None], np.round(intensity)[:, None], ring[:, None]], axis=1)
  box_hits = np.bincount(box_index[keep & on_box], minlength=len(boxes)) if boxes else np.zeros(0, int)
  return points[keep].astype(np.float32), box_hits
