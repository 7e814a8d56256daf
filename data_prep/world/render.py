"""Vectorized ray casting of the world: height-field ground, box obstacles, camera shading.

Shared by the cameras and the LiDAR. Ground: the first t > 0 with o_z + t d_z = h(o_xy + t d_xy),
found by Newton steps whose slope uses the smooth hill gradient (the crown and curb relief are
small and sampled, not differentiated).
"""
import numpy as np

from data_prep.world import raster as raster_lib
from data_prep.world import town as town_lib


def camera_rays(intrinsics, cam_to_global, height, width):
  """Unit ray directions [H*W, 3] (global frame) through pixel centres (OpenCV convention) and origin [3]."""
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=0)
  dirs = (cam_to_global[:3, :3] @ (np.linalg.inv(intrinsics) @ pix)).T
  return cam_to_global[:3, 3], dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def _newton(origin, d, t, ground, hills, iterations):
  """Newton steps on f(t) = ray z - ground height; the slope uses the smooth hill gradient only."""
  ox, oy, oz = origin
  slope = None
  for step in range(iterations):
    x, y = ox + t * d[:, 0], oy + t * d[:, 1]
    f = oz + t * d[:, 2] - raster_lib.sample(ground, 'height', x, y)
    if step % 2 == 0:   # the hill gradient varies slowly: refresh it every other step
      _, gx, gy = town_lib.hill_height(x, y, hills)
      slope = d[:, 2] - (gx * d[:, 0] + gy * d[:, 1])
      slope = np.where(np.abs(slope) < 1e-4, -1e-4, slope)
    t = np.clip(t - f / slope, 0.0, None)
  return t


def _residual(origin, d, t, ground):
  x, y = origin[0] + t * d[:, 0], origin[1] + t * d[:, 1]
  return np.abs(origin[2] + t * d[:, 2] - raster_lib.sample(ground, 'height', x, y))


def _bracket(origin, d, ground, height_range, *, t_max, step, bisections, chunk=16):
  """First crossing of each ray with the ground by marching `step` metres, then bisection.

  Only the part of the ray whose height lies within the ground's height range is marched, so a
  ray costs (height span / |d_z|) / step samples at most, and t_max / step when nearly level.

  Returns:
    t [N], inf where the ray does not cross the ground within t_max.
  """
  lo_h, hi_h = height_range
  oz, dz = origin[2], d[:, 2]
  with np.errstate(divide='ignore', invalid='ignore'):
    t_enter = np.where(dz < 0, (hi_h - oz) / dz, 0.0)              # ray drops below the highest ground
    t_leave = np.where(dz < 0, (lo_h - oz) / dz, np.where(dz > 0, (hi_h - oz) / dz, t_max))
  t_lo = np.maximum(np.nan_to_num(t_enter), 0.0)
  t_hi = np.minimum(np.nan_to_num(t_leave, posinf=t_max), t_max)
  if oz > hi_h:   # a level or rising ray above the highest ground never meets it
    t_hi = np.where(dz >= 0, -1.0, t_hi)
  found = np.full(d.shape[0], np.inf)
  left = np.zeros(d.shape[0])
  todo = np.nonzero(t_hi > t_lo)[0]

  def height_above(rows, t):
    x, y = origin[0] + t * d[rows, 0, None], origin[1] + t * d[rows, 1, None]
    return oz + t * dz[rows, None] - raster_lib.sample(ground, 'height', x, y)

  offset = 0
  while todo.size:
    ts = t_lo[todo, None] + step * (offset + np.arange(chunk + 1))[None, :]
    ts = np.minimum(ts, t_hi[todo, None])
    f = height_above(todo, ts)
    crossing = (f[:, :-1] > 0) & (f[:, 1:] <= 0)
    hit = crossing.any(axis=1)
    first = crossing.argmax(axis=1)
    rows = todo[hit]
    left[rows] = ts[hit, first[hit]]
    found[rows] = ts[hit, first[hit] + 1]
    offset += chunk
    todo = todo[~hit & (t_lo[todo] + step * offset < t_hi[todo])]
  rows = np.nonzero(np.isfinite(found))[0]
  a, b = left[rows], found[rows]
  for _ in range(bisections):
    mid = (a + b) / 2
    above = height_above(rows, mid[:, None])[:, 0] > 0
    a, b = np.where(above, mid, a), np.where(above, b, mid)
  found[rows] = (a + b) / 2
  return found


def intersect_ground(origin, dirs, ground, hills, *, t_max, iterations=4, tolerance=0.05, max_rise=0.1,
                     bracket_step=4.0, bisections=14):
  """Distance along each ray [N] to the height-field ground; inf where no hit within t_max.

  Newton steps from the flat-ground guess converge for most rays; rays they leave unconverged
  (grazing rays far away, where the flat guess is tens of metres off) are found by marching and
  bisection (`_bracket`), so the far ground does not turn into sky.

  Args:
    origin: [3] ray origin (map frame).
    dirs: [N, 3] unit directions.
    ground: raster dict with 'height' and optionally 'height_range' (see raster.ground_raster).
    hills: [K, 4] hill waves (town['hills']) for the Newton slope.
    t_max: longest distance considered (m).
    iterations: Newton steps.
    tolerance: largest height residual (m) accepted as a Newton hit.
    max_rise: rays with d_z above this are never tested (no terrain is that steep).
    bracket_step: marching step (m) for rays Newton did not resolve.
    bisections: bisection steps after marching (final error bracket_step / 2**bisections).
  """
  origin = np.asarray(origin, np.float64)
  ox, oy, oz = origin
  h0 = float(raster_lib.sample(ground, 'height', np.array([ox]), np.array([oy]))[0])
  t_out = np.full(dirs.shape[0], np.inf)
  # Terrain within reach rises at most `max_rise` per metre, so steeper upward rays cannot hit it.
  active = np.nonzero(dirs[:, 2] < max_rise)[0]
  d = dirs[active]
  dz = d[:, 2]
  down = dz < -1e-6
  t = np.where(down, (h0 - oz) / np.where(down, dz, -1.0), t_max)
  t = _newton(origin, d, np.clip(t, 0.0, t_max), ground, hills, iterations)
  ok = (_residual(origin, d, t, ground) < tolerance) & (t > 0.0) & (t <= t_max)
  t_out[active[ok]] = t[ok]
  retry = np.nonzero(~ok)[0]
  if retry.size:   # more Newton steps first: cheap, and enough for most of the rest
    t_more = _newton(origin, d[retry], t[retry], ground, hills, iterations)
    fixed = (_residual(origin, d[retry], t_more, ground) < tolerance) & (t_more > 0.0) & (t_more <= t_max)
    t_out[active[retry[fixed]]] = t_more[fixed]
    retry = retry[~fixed]
  if retry.size:
    height_range = ground['height_range'] if 'height_range' in ground else (
        float(ground['height'].min()), float(ground['height'].max()))
    t_out[active[retry]] = _bracket(origin, d[retry], ground, height_range, t_max=t_max,
                                    step=bracket_step, bisections=bisections)
  return t_out


def intersect_boxes(origin, dirs, boxes):
  """Nearest hit of each ray [N] with yaw-rotated boxes.

  Args:
    origin: [3]. dirs: [N, 3] unit.
    boxes: list of dicts with 'centre' [3] (bottom centre), 'size' (length, width, height), 'yaw'.

  Returns:
    (t [N] with inf where no hit, box index [N] (-1), normal [N, 3] of the hit face, local hit [N, 3]
    in the box frame relative to its bottom centre).
  """
  n = dirs.shape[0]
  best_t = np.full(n, np.inf)
  best_box = np.full(n, -1)
  normal = np.zeros((n, 3))
  local = np.zeros((n, 3))
  for index, box in enumerate(boxes):
    length, width, height = box['size']
    centre = np.asarray(box['centre'], np.float64) + [0, 0, height / 2]
    radius = 0.5 * np.sqrt(length ** 2 + width ** 2 + height ** 2)
    to_centre = centre - origin
    dist = np.linalg.norm(to_centre)
    if dist > radius:   # cone culling: only rays within the box's angular radius
      cand = np.nonzero(dirs @ (to_centre / dist) > np.sqrt(max(1 - (radius / dist) ** 2, 0.0)))[0]
    else:
      cand = np.arange(n)
    if cand.size == 0:
      continue
    c, s = np.cos(box['yaw']), np.sin(box['yaw'])
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])   # box -> map
    o_local = rot.T @ to_centre * -1.0
    d_local = dirs[cand] @ rot
    half = np.array([length, width, height]) / 2
    with np.errstate(divide='ignore', invalid='ignore'):
      inv = 1.0 / np.where(np.abs(d_local) < 1e-12, 1e-12, d_local)
      t1 = (-half - o_local) * inv
      t2 = (half - o_local) * inv
    t_near = np.minimum(t1, t2)
    t_enter = t_near.max(axis=1)
    t_exit = np.maximum(t1, t2).min(axis=1)
    hit = (t_enter <= t_exit) & (t_enter > 0) & (t_enter < best_t[cand])
    rows = cand[hit]
    best_t[rows] = t_enter[hit]
    best_box[rows] = index
    axis = t_near[hit].argmax(axis=1)
    face = np.zeros((rows.size, 3))
    face[np.arange(rows.size), axis] = -np.sign(d_local[hit, axis])
    normal[rows] = face @ rot.T
    local[rows] = o_local + t_enter[hit, None] * d_local[hit] + [0, 0, height / 2]
  return best_t, best_box, normal, local


def shade_camera(origin, dirs, ground, hills, boxes, style, *, t_max):
  """Linear radiance [N, 3] of each camera ray: sky, lit ground with haze, lit boxes."""
  t_ground = intersect_ground(origin, dirs, ground, hills, t_max=t_max)
  t_box, box_index, normal, local = intersect_boxes(origin, dirs, boxes)
  sun = style['sun']
  elevation = np.clip(dirs[:, 2], 0.0, 1.0)[:, None]
  colour = style['sky_horizon'] + (style['sky_zenith'] - style['sky_horizon']) * np.sqrt(elevation)
  sun_cos = np.clip(dirs @ sun, -1.0, 1.0)
  colour = colour + style['glare'] * (2.0 * np.exp((sun_cos - 1.0) / 0.002) + 0.6 * np.exp((sun_cos - 1.0) / 0.05))[:, None]
  colour = colour * style['light']

  ground_hit = np.isfinite(t_ground) & (t_ground < t_box)
  t_hit = np.where(ground_hit, t_ground, t_box)
  g = np.nonzero(ground_hit)[0]
  if g.size:
    x = origin[0] + t_ground[g] * dirs[g, 0]
    y = origin[1] + t_ground[g] * dirs[g, 1]
    albedo = raster_lib.sample(ground, 'colour', x, y)
    _, gx, gy = town_lib.hill_height(x, y, hills)
    n = np.stack([-gx, -gy, np.ones_like(gx)], 1) / np.sqrt(1 + gx ** 2 + gy ** 2)[:, None]
    lit = 0.45 + 0.55 * np.clip(n @ sun, 0.0, 1.0)
    colour[g] = albedo * (lit * style['light'])[:, None]
  b = np.nonzero(np.isfinite(t_box) & ~ground_hit)[0]
  if b.size:
    box_colour = np.array([box['colour'] for box in boxes], np.float64).reshape(-1, 3)
    box_height = np.array([box['size'][2] for box in boxes])
    box_kind = np.array([box['kind'] for box in boxes])
    which = box_index[b]
    albedo = box_colour[which]
    glass = (box_kind[which] == 'vehicle') & (local[b, 2] > 0.55 * box_height[which])
    windows = box_kind[which] == 'building'
    windows &= (np.mod(local[b, 2], 3.0) > 1.2) & (np.mod(local[b, 0] + local[b, 1], 4.0) > 1.5)
    albedo[glass | windows] *= 0.25
    lit = 0.35 + 0.65 * np.clip(normal[b] @ sun, 0.0, 1.0)
    colour[b] = albedo * (lit * style['light'])[:, None]
  hit = np.isfinite(t_hit)
  haze = np.exp(-t_hit[hit] / style['visibility'])[:, None]
  colour[hit] = colour[hit] * haze + (1 - haze) * style['sky_horizon'] * style['light']
  return colour


def expose(radiance, height, width, style, rng):
  """Camera response: vignetting, exposure, noise, gamma -> uint8 [H, W, 3] RGB."""
  img = radiance.reshape(height, width, 3)
  v, u = np.mgrid[0:height, 0:width]
  r2 = ((u - width / 2) / width) ** 2 + ((v - height / 2) / height) ** 2
  img = img * (1.0 - 0.6 * r2)[..., None] / max(style['light'], 0.5)   # auto-exposure, limited in the dark
  img = img + rng.normal(0.0, style['noise'], img.shape)
  return (np.clip(img, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)
