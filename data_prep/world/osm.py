"""OpenStreetMap-like SD prior: road centrelines as a WGS84 polyline shapefile per location.

Same layout as the real files P-MapNet ships (fields osm_id, name, ref, type, oneway, bridge,
maxspeed), so real OSM drops in. The SD map is deliberately imperfect: a smooth displacement
field of a few metres shifts every line and some streets are missing.
"""
import os

import numpy as np
import shapefile

from data_prep import geo

WGS84_PRJ = ('GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",SPHEROID["WGS_1984",6378137,298.257223563]],'
             'PRIMEM["Greenwich",0],UNIT["Degree",0.017453292519943295]]')


def displacement(x, y, field):
  """Smooth SD misalignment (dx, dy) in metres at map points; field: [2, K, 4] (kx, ky, phase, amp)."""
  out = []
  for waves in field:
    d = np.zeros(np.broadcast(x, y).shape)
    for kx, ky, phase, amp in waves:
      d += amp * np.sin(kx * x + ky * y + phase)
    out.append(d)
  return out


def misalignment_field(rng, amplitude, wavelength=300.0, waves=2):
  """Random displacement waves whose sum is bounded by `amplitude` per axis."""
  angle = rng.uniform(0, 2 * np.pi, (2, waves))
  k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.3, (2, waves)))
  amp = rng.uniform(0.3, 1.0, (2, waves)) * amplitude / waves
  return np.stack([k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi, (2, waves)), amp], -1)


def write_osm(town, location, path_stem, seed):
  """Writes path_stem.{shp,shx,dbf,prj}; returns the kept (displaced) lines in map metres."""
  params = town['params']
  rng = np.random.default_rng([seed, 31, len(location)])
  field = misalignment_field(rng, params.osm_offset)
  os.makedirs(os.path.dirname(path_stem), exist_ok=True)
  kept = []
  with shapefile.Writer(path_stem, shapeType=shapefile.POLYLINE) as writer:
    writer.field('osm_id', 'N', 11, 0)
    writer.field('name', 'C', 48)
    writer.field('ref', 'C', 16)
    writer.field('type', 'C', 16)
    writer.field('oneway', 'N', 1, 0)
    writer.field('bridge', 'N', 1, 0)
    writer.field('maxspeed', 'N', 3, 0)
    for index, street in enumerate(town['streets']):
      if not street['osm_mapped']:   # town.build_town decides (routes avoid unmapped streets)
        continue
      centre = street['centre'][::5]   # OSM ways are sparse: a node every ~5 m
      dx, dy = displacement(centre[:, 0], centre[:, 1], field)
      xy = centre + np.stack([dx, dy], 1)
      lon, lat = geo.map_to_lonlat(xy[:, 0], xy[:, 1], location)
      writer.line([[[float(a), float(b)] for a, b in zip(lon, lat)]])
      writer.record(100000 + index, f'Synthetic Street {index}', '', street['kind'], 0, 0,
                    60 if street['kind'] == 'secondary' else 40)
      kept.append(xy)
  with open(path_stem + '.prj', 'w') as f:
    f.write(WGS84_PRJ)
  with open(path_stem + '.cpg', 'w') as f:
    f.write('UTF-8\n')
  return kept
