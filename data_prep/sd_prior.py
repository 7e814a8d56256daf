"""SD prior: an OpenStreetMap road skeleton rasterized on the BEV canvas (DESIGN.md section 1).

OSM shapefiles (WGS84 lon/lat LineStrings, one per location, `<osm_dir>/<location>.shp`, as
P-MapNet ships them) are converted to the nuScenes map frame with `data_prep.geo`, filtered to
the road classes of `config.data.sd_road_classes` (shapefile column `type`), cropped and rotated
to the ego patch and drawn as P-MapNet draws them (cv2.polylines, `sd_thickness`). The raster
is uint8 0 (no road) / 255 (road); the reader maps it to -1 / +1.

The converted skeleton of a location can be cached on disk (`cache_dir`), so that worker
processes and reruns skip the lon/lat -> ENU conversion: one .npz per (shapefile path, size,
mtime, location origin, road classes), written to a temp file and renamed.
"""
import hashlib
import json
import os

import numpy as np
import shapefile
import shapely
from shapely import affinity
from shapely import geometry

from data_prep import geo
from data_prep import labels

# Shapefile attribute holding the OSM highway class.
ROAD_CLASS_FIELD = 'type'


def osm_path(osm_dir, location):
  """`<osm_dir>/<location>.shp`, or FileNotFoundError listing the shapefiles that exist."""
  path = os.path.join(osm_dir, f'{location}.shp')
  if not os.path.isfile(path):
    found = sorted(f for f in os.listdir(osm_dir) if f.endswith('.shp')) if os.path.isdir(
        osm_dir) else []
    raise FileNotFoundError(f'{path}: no OSM shapefile for map {location!r} (--osm-dir '
                            f'{osm_dir!r} holds {found})')
  return path


def _origin(path, location):
  try:
    return geo.map_origin(location)
  except ValueError as e:
    raise ValueError(f'{path}: cannot convert to the map frame: {e}') from e


def convert_osm_lines(path, location, road_classes):
  """Map-frame polylines ([N, 2] float64 east/north metres) of the kept road classes.

  Args:
    path: .shp file (WGS84 lon/lat polylines).
    location: nuScenes map name, selects the map origin.
    road_classes: OSM highway classes to keep (column `type`).
  """
  _origin(path, location)
  reader = shapefile.Reader(path)
  fields = [f[0] for f in reader.fields[1:]]
  if ROAD_CLASS_FIELD not in fields:
    raise ValueError(f'{path}: no column {ROAD_CLASS_FIELD!r}; columns: {fields}')
  keep = set(road_classes)
  lines = []
  for shape_record in reader.iterShapeRecords():
    if shape_record.record[ROAD_CLASS_FIELD] not in keep:
      continue
    shape = shape_record.shape
    points = np.asarray(shape.points, dtype=np.float64)
    if len(points) < 2:
      continue
    east, north = geo.lonlat_to_map(points[:, 0], points[:, 1], location)
    bounds = list(shape.parts) + [len(points)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
      if stop - start >= 2:
        lines.append(np.stack([east[start:stop], north[start:stop]], 1))
  reader.close()
  return lines


def osm_cache_path(cache_dir, path, location, road_classes):
  """`<cache_dir>/<location>-<hash>.npz`; the hash covers what the converted lines depend on."""
  stat = os.stat(path)
  key = json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, location,
                    list(_origin(path, location)), list(road_classes)])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return os.path.join(cache_dir, f'{location}-{digest}.npz')


def _save_lines(cache_path, lines):
  """Atomic: concurrent workers may write the same entry; each renames its own temp file."""
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  counts = np.array([len(line) for line in lines], np.int64)
  points = np.concatenate(lines) if lines else np.zeros((0, 2), np.float64)
  temp = f'{cache_path}.{os.getpid()}.tmp'
  with open(temp, 'wb') as f:
    np.savez(f, counts=counts, points=points)
  os.replace(temp, cache_path)


def _load_lines(cache_path):
  with np.load(cache_path) as data:
    counts, points = data['counts'], data['points']
  return np.split(points, np.cumsum(counts)[:-1]) if len(counts) else []


def load_osm_roads(path, location, road_classes, *, cache_dir=None):
  """Map-frame LineStrings of the kept road classes in one shapefile, with an STRtree.

  Args:
    path: .shp file (WGS84 lon/lat polylines).
    location: nuScenes map name, selects the map origin.
    road_classes: OSM highway classes to keep (column `type`).
    cache_dir: folder of converted skeletons (see module docstring); None converts every time.

  Returns:
    (tuple of LineStrings, shapely.STRtree over them).
  """
  if cache_dir is None:
    arrays = convert_osm_lines(path, location, road_classes)
  else:
    cache_path = osm_cache_path(cache_dir, path, location, road_classes)
    if os.path.isfile(cache_path):
      arrays = _load_lines(cache_path)
    else:
      arrays = convert_osm_lines(path, location, road_classes)
      _save_lines(cache_path, arrays)
  lines = tuple(geometry.LineString(a) for a in arrays)
  return lines, shapely.STRtree(lines)


def sd_polylines(roads, ego_xy, ego_yaw, bev_x, bev_y):
  """OSM road polylines inside the ego patch, in the ego frame ([N, 2] arrays)."""
  lines, tree = roads
  patch = labels.ego_patch(bev_x, bev_y)
  patch_map = affinity.affine_transform(patch, labels.ego_to_map_params(ego_xy, ego_yaw))
  to_ego = labels.map_to_ego_params(ego_xy, ego_yaw)
  clipped = [affinity.affine_transform(lines[i], to_ego).intersection(patch)
             for i in tree.query(patch_map, predicate='intersects')]
  return [line for g in clipped for line in labels.geometry_to_polylines(g)]


def sd_raster(roads, ego_xy, ego_yaw, bev_x, bev_y, *, thickness):
  """[H, W] uint8 SD prior: 255 on OSM roads, else 0.

  Drawn by P-MapNet's rule (`labels.rasterize_lines`): cv2.polylines with cv2 `thickness` on
  this canvas (dataset_info.thickness_px of config.data.sd_thickness_ref).
  """
  mask = labels.rasterize_lines(sd_polylines(roads, ego_xy, ego_yaw, bev_x, bev_y), bev_x,
                                bev_y, thickness=thickness)
  return np.where(mask, 255, 0).astype(np.uint8)
