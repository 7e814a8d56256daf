"""Map-frame <-> WGS84 conversion for OpenStreetMap (SD prior) data.

A nuScenes map frame is metres east/north of a per-location origin; OSM shapefiles (as shipped
with P-MapNet) are WGS84 lon/lat. nuscenes-devkit georeferences the map frame on a SPHERE of
radius 6378137 m about the origin (`nuscenes/scripts/export_poses.py`: great-circle distance and
bearing from the origin). We convert with pymap3d's topocentric ENU on that sphere; within a map
(a few km) it differs from the devkit's great-circle formula by well under a millimetre.

Why not the WGS84 ellipsoid: its north-south radius at the equator is 0.67% shorter than the
sphere's, so ellipsoidal ENU puts Singapore's OSM roads 0.0067 * y (~12 m at y = 1800 m) south
of the map; measured on the real fragment, the ellipsoid's OSM skeleton matched the drivable area
best when shifted 12 m north, the sphere's with no shift.
"""
import numpy as np
import pymap3d

# nuscenes-devkit's EARTH_RADIUS_METERS (scripts/export_poses.py): the map frame's sphere.
EARTH_RADIUS_M = 6.378137e6
_MAP_SPHERE = pymap3d.Ellipsoid(EARTH_RADIUS_M, EARTH_RADIUS_M, name='nuScenes map sphere')

# (latitude, longitude) of each nuScenes map's origin (P-MapNet / nuScenes map expansion).
MAP_ORIGINS = {
    'boston-seaport': (42.336849169438615, -71.05785369873047),
    'singapore-onenorth': (1.2882100868743724, 103.78475189208984),
    'singapore-hollandvillage': (1.2993652317780957, 103.78217697143555),
    'singapore-queenstown': (1.2782562240223188, 103.76741409301758),
}


def map_origin(location):
  """(latitude, longitude) degrees of the map origin, or ValueError naming the known ones."""
  if location not in MAP_ORIGINS:
    raise ValueError(f'no map origin for location {location!r}; known: {sorted(MAP_ORIGINS)}')
  return MAP_ORIGINS[location]


def lonlat_to_map(lon, lat, location):
  """WGS84 degrees -> map-frame (x east, y north) metres; arrays of equal shape."""
  lat0, lon0 = map_origin(location)
  east, north, _ = pymap3d.geodetic2enu(np.asarray(lat), np.asarray(lon), 0.0, lat0, lon0, 0.0,
                                        ell=_MAP_SPHERE)
  return np.asarray(east), np.asarray(north)


def map_to_lonlat(x, y, location):
  """Map-frame metres -> WGS84 (lon, lat) degrees; inverse of `lonlat_to_map`."""
  lat0, lon0 = map_origin(location)
  lat, lon, _ = pymap3d.enu2geodetic(np.asarray(x), np.asarray(y), 0.0, lat0, lon0, 0.0,
                                      ell=_MAP_SPHERE)
  return np.asarray(lon), np.asarray(lat)
