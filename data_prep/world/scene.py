"""One scene: an ego route through the town, traffic, and the rendered sensor files + table rows."""
import numpy as np

from data_prep.world import raster as raster_lib
from data_prep.world import town as town_lib

# The nuScenes car (positions in metres in the ego frame, yaw in degrees; ego x forward, y left),
# close to the real calibrated_sensor values; horizontal fields of view as in the nuScenes spec.
RIG = dict(
    cameras=(('CAM_FRONT_LEFT', (1.52, 0.49, 1.51), 55.0, 70.0),
             ('CAM_FRONT', (1.70, 0.00, 1.51), 0.0, 70.0),
             ('CAM_FRONT_RIGHT', (1.55, -0.49, 1.50), -55.0, 70.0),
             ('CAM_BACK_LEFT', (1.04, 0.48, 1.56), 110.0, 70.0),
             ('CAM_BACK', (0.03, 0.00, 1.58), 180.0, 110.0),
             ('CAM_BACK_RIGHT', (1.02, -0.48, 1.56), -110.0, 70.0)),
    lidar=('LIDAR_TOP', (0.94, 0.0, 1.84), -90.0),
    wheelbase=2.7, track=1.6,
)


def _hermite(p0, t0, p1, t1, step):
  scale = np.linalg.norm(p1 - p0)
  u = np.linspace(0, 1, max(int(scale / step), 2) + 1)[:, None]
  return ((2 * u ** 3 - 3 * u ** 2 + 1) * p0 + (u ** 3 - 2 * u ** 2 + u) * t0 * scale
          + (-2 * u ** 3 + 3 * u ** 2) * p1 + (u ** 3 - u ** 2) * t1 * scale)


def plan_route(town, rng, length, *, right_hand):
  """Lane-centre path [N, 2] (about 1 m steps) driving `length` metres along SD-mapped streets.

  Returns:
    (path, offset of the ego lane from the first street's centreline (left positive, in the
    travel direction), lanes per direction of the first street, its half width).
  """
  streets = town['streets']
  lw = town['params'].lane_width
  arms = {}
  for index, street in enumerate(streets):
    for end in (0, 1):
      arms.setdefault(street['nodes'][end], []).append((index, end))
  # Survey routes keep to streets the SD map holds (town._osm_mapped keeps a mapped way out of
  # every junction), so the SD prior is never empty because the ego is on a missing street.
  mapped = [i for i, street in enumerate(streets) if street['osm_mapped']]
  index = mapped[int(rng.integers(len(mapped)))]
  forward = bool(rng.integers(2))
  lane = int(rng.integers(1, streets[index]['lanes_per_dir'] + 1))
  first = None
  pieces = []
  total = 0.0
  start_fraction = rng.uniform(0.0, 0.5)
  while total < length:
    street = streets[index]
    centre = town_lib.trimmed(street, *street['trim'])
    if not forward:
      centre = centre[::-1]
    lane = min(lane, street['lanes_per_dir'])
    offset = (-1 if right_hand else 1) * (lane - 0.5) * lw
    lane_line = town_lib.offset_polyline(centre, offset)
    if first is None:
      first = (offset, street['lanes_per_dir'], street['half_width'])
      lane_line = lane_line[int(start_fraction * len(lane_line)):]
    elif pieces:
      prev = pieces[-1]
      t0 = prev[-1] - prev[-2]
      t1 = lane_line[1] - lane_line[0]
      pieces.append(_hermite(prev[-1], t0 / np.linalg.norm(t0), lane_line[0], t1 / np.linalg.norm(t1), 1.0)[1:-1])
    pieces.append(lane_line)
    total = town_lib.arc_length(np.concatenate(pieces))[-1]
    node = street['nodes'][1 if forward else 0]
    options = [a for a in arms[node] if a[0] != index]
    options = [a for a in options if streets[a[0]]['osm_mapped']] or options
    index, end = options[int(rng.integers(len(options)))]
    forward = end == 0   # leave the junction along the new street
  return town_lib.resample(np.concatenate(pieces), 1.0), first


def ego_pose_matrix(x, y, yaw, ground, wheelbase, track):
  """4x4 ego -> map: origin on the ground under the rear axle, pitch/roll from the wheel contacts."""
  c, s = np.cos(yaw), np.sin(yaw)
  fwd, left = np.array([c, s]), np.array([-s, c])
  contacts = np.array([[x, y], [x, y] + fwd * wheelbase, [x, y] + left * track / 2, [x, y] - left * track / 2])
  h = raster_lib.sample(ground, 'height', contacts[:, 0], contacts[:, 1]).astype(np.float64)
  rear_mid = (h[2] + h[3]) / 2
  x_axis = np.array([c, s, (h[1] - rear_mid) / wheelbase])
  y_axis = np.array([-s, c, (h[2] - h[3]) / track])
  x_axis /= np.linalg.norm(x_axis)
  z_axis = np.cross(x_axis, y_axis)
  z_axis /= np.linalg.norm(z_axis)
  y_axis = np.cross(z_axis, x_axis)
  pose = np.eye(4)
  pose[:3, :3] = np.stack([x_axis, y_axis, z_axis], axis=1)
  pose[:3, 3] = [x, y, rear_mid]
  return pose


def sensor_matrix(translation, yaw_deg, camera):
  """4x4 sensor -> ego; cameras look along their z axis (x right, y down), as in nuScenes."""
  yaw = np.deg2rad(yaw_deg)
  rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
  base = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float64) if camera else np.eye(3)
  out = np.eye(4)
  out[:3, :3] = rz @ base
  out[:3, 3] = translation
  return out


def intrinsics(hfov_deg, height, width):
  f = (width / 2) / np.tan(np.deg2rad(hfov_deg) / 2)
  return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])


def _along(path, arc, s, lateral):
  s = np.clip(s, 0, arc[-1])
  p = np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1])])
  d = np.stack([np.interp(s + 0.5, arc, path[:, 0]), np.interp(s + 0.5, arc, path[:, 1])]) - \
      np.stack([np.interp(s - 0.5, arc, path[:, 0]), np.interp(s - 0.5, arc, path[:, 1])])
  yaw = np.arctan2(d[1], d[0])
  return p + lateral * np.array([-np.sin(yaw), np.cos(yaw)]), yaw


def make_traffic(path, arc, first, rng, ground, *, ego_s0, ego_speed, lane_width, sidewalk_width,
                 building_setback=(8.0, 25.0), footprint_samples=5):
  """Vehicles (moving/parked, with their motion) and static buildings/poles along the route.

  Buildings stand `building_setback` metres (uniform range) beyond the sidewalk, and only where a
  `footprint_samples` x `footprint_samples` grid over their footprint is all grass: a building
  closer than that filled a whole side camera, and a corner-only test let buildings straddle
  cross streets.
  """
  offset, lanes, half_width = first
  sign = -1.0 if offset < 0 else 1.0   # side of the travel direction's lanes
  movers = []
  for _ in range(int(rng.integers(6, 18))):
    big = rng.uniform() < 0.15
    size = (rng.uniform(8, 12), 2.5, rng.uniform(2.8, 3.4)) if big else (rng.uniform(4.0, 5.0), 1.9, rng.uniform(1.4, 1.8))
    kind = rng.choice(['same', 'oncoming', 'parked'])
    if kind == 'same':
      lane_centre = sign * (int(rng.integers(1, lanes + 1)) - 0.5) * lane_width
      gap = rng.choice([-1, 1]) * rng.uniform(10, 40)
      movers.append(dict(s0=ego_s0 + gap, speed=ego_speed, lateral=lane_centre - offset, flip=False, size=size))
    elif kind == 'oncoming':
      lane_centre = -sign * (int(rng.integers(1, lanes + 1)) - 0.5) * lane_width
      movers.append(dict(s0=rng.uniform(0, arc[-1]), speed=-rng.uniform(3, 12), lateral=lane_centre - offset,
                         flip=True, size=size))
    else:
      side = rng.choice([-1.0, 1.0])
      movers.append(dict(s0=rng.uniform(0, arc[-1]), speed=0.0, lateral=side * (half_width - 1.2) - offset,
                         flip=bool(side != sign), size=size))
    movers[-1]['colour'] = rng.uniform(0.1, 0.9, 3) * rng.choice([0.3, 1.0])
  static = []
  for s in np.arange(0.0, arc[-1], 12.0):
    for side in (-1.0, 1.0):
      if rng.uniform() < 0.15:   # building set back from the sidewalk
        length, width, height = rng.uniform(8, 20), rng.uniform(6, 12), rng.uniform(4, 18)
        lateral = side * (half_width + sidewalk_width + rng.uniform(*building_setback) + width / 2) - offset
        centre, yaw = _along(path, arc, s, lateral)
        c, sn = np.cos(yaw), np.sin(yaw)
        a, b = np.meshgrid(np.linspace(-0.5, 0.5, footprint_samples), np.linspace(-0.5, 0.5, footprint_samples))
        a, b = a.ravel() * length, b.ravel() * width
        footprint = centre + np.stack([a * c - b * sn, a * sn + b * c], axis=1)
        if np.all(raster_lib.sample(ground, 'surface', footprint[:, 0], footprint[:, 1], nearest=True)
                  == raster_lib.GRASS):
          static.append(dict(centre=centre, yaw=yaw, size=(length, width, height), kind='building',
                             colour=rng.uniform(0.35, 0.8) * np.array([1.0, 0.95, 0.85])))
      if rng.uniform() < 0.15:   # pole on the sidewalk
        centre, yaw = _along(path, arc, s, side * (half_width + 0.6) - offset)
        if raster_lib.sample(ground, 'surface', centre[:1], centre[1:], nearest=True)[0] == raster_lib.SIDEWALK:
          static.append(dict(centre=centre, yaw=yaw, size=(0.25, 0.25, 6.0), kind='pole', colour=np.full(3, 0.4)))
  for box in static:
    box['centre'] = np.array([*box['centre'], float(raster_lib.sample(ground, 'height', box['centre'][:1],
                                                                      box['centre'][1:])[0]) - 0.3])
  return movers, static


def boxes_at(movers, static, path, arc, ground, time):
  boxes = list(static)
  for m in movers:
    centre, yaw = _along(path, arc, m['s0'] + m['speed'] * time, m['lateral'])
    z = float(raster_lib.sample(ground, 'height', centre[:1], centre[1:])[0])
    boxes.append(dict(centre=np.array([*centre, z]), yaw=yaw + np.pi * m['flip'], size=m['size'],
                      kind='vehicle', colour=m['colour']))
  return boxes
