"""Map-frame <-> WGS84 conversion for OpenStreetMap (SD prior) data.

A nuScenes map frame is metres east/north of a per-location origin; OSM shapefiles (as shipped
with P-MapNet) are WGS84 lon/lat. Conversion is topocentric ENU about the origin (pymap3d).
"""
import numpy as np
import pymap3d

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
  east, north, _ = pymap3d.geodetic2enu(np.asarray(lat), np.asarray(lon), 0.0, lat0, lon0, 0.0)
  return np.asarray(east), np.asarray(north)


def map_to_lonlat(x, y, location):
  """Map-frame metres -> WGS84 (lon, lat) degrees; inverse of `lonlat_to_map`."""
  lat0, lon0 = map_origin(location)
  lat, lon, _ = pymap3d.enu2geodetic(np.asarray(x), np.asarray(y), 0.0, lat0, lon0, 0.0)
  return np.asarray(lon), np.asarray(lat)
