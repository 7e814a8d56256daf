"""Generates a procedural synthetic world in the real nuScenes on-disk format.

  python -m data_prep.synthetic_world --out /tmp/world --scenes 12 --samples-per-scene 40 --seed 0

Writes DIR/<version>/*.json (+ splits.json), DIR/maps/<token>.png, DIR/maps/expansion/<location>.json,
DIR/samples/{CAM_*,LIDAR_TOP}, DIR/sweeps/LIDAR_TOP and DIR/osm/<location>.shp. Everything is built
in DIR.partial and renamed to DIR at the end, so an interrupted run never looks complete.
"""
import argparse
import json
import logging
import multiprocessing
import os
import shutil
import time

import cv2
import numpy as np
import tqdm

from data_prep.world import capture
from data_prep.world import map_json
from data_prep.world import osm
from data_prep.world import tables as tables_lib
from data_prep.world import town as town_lib

DEFAULT_LIDAR = dict(beams=32, azimuth_steps=1000, max_range=70.0)


def _semantic_prior_png(town, path, resolution=0.1):
  """Drivable-area mask at the devkit's 10 px/m (MapMask): row 0 is the top (largest y)."""
  width, height = (int(np.ceil(e / resolution)) for e in town['extent'])
  mask = np.zeros((height, width), np.uint8)
  rings = [np.concatenate([town_lib.offset_polyline(c, s['half_width']), town_lib.offset_polyline(c, -s['half_width'])[::-1]])
           for s in town['streets'] for c in [town_lib.trimmed(s, *s['trim'])]]
  rings += [j['polygon'] for j in town['junctions']]
  pts = [np.round(np.stack([r[:, 0] / resolution, height - r[:, 1] / resolution], 1)).astype(np.int32) for r in rings]
  cv2.fillPoly(mask, pts, 255)
  cv2.imwrite(path, mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def generate_world(out_dir, *, scenes, samples_per_scene, seed, version='v1.0-synthetic', workers=2,
                   image_size=(225, 400), sweeps=2, val_fraction=0.2, ground_res=0.1, ground_margin=60.0,
                   camera_range=150.0, jpeg_quality=90, lidar=None):
  """Writes a synthetic nuScenes-format world to out_dir (skipped if already complete); returns out_dir.

  Args:
    out_dir: dataroot to create.
    scenes, samples_per_scene: number of scenes and of 2 Hz keyframes per scene.
    seed: world seed; the same seed gives the same tables, byte for byte.
    version: table folder name.
    workers: processes rendering scenes.
    image_size: (H, W) of the rendered camera images.
    sweeps: LiDAR sweeps (20 Hz) written before each keyframe.
    val_fraction: share of whole scenes in the val split.
    ground_res, ground_margin: ground raster resolution and margin around a route (m).
    camera_range: farthest ground distance the cameras resolve (m).
    jpeg_quality: JPEG quality of the images.
    lidar: LiDAR scan options (lidar.scan keyword args); None = DEFAULT_LIDAR.
  """
  if scenes < 1 or samples_per_scene < 1:
    raise ValueError(f'--scenes and --samples-per-scene must be >= 1, got {scenes}, {samples_per_scene}')
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, version, 'scene.json')):
    logging.info('%s already holds a world (%s); not regenerating', out_dir, version)
    return out_dir
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f'{out_dir}: exists, is not empty and holds no {version}/scene.json; remove it first')
  partial = out_dir + '.partial'
  shutil.rmtree(partial, ignore_errors=True)   # leftovers of an interrupted run
  start = time.time()
  for folder in [f'samples/{c}' for c, _ in tables_lib.CHANNELS] + ['sweeps/LIDAR_TOP', 'maps/expansion', 'osm']:
    os.makedirs(os.path.join(partial, folder), exist_ok=True)
  job = dict(root=partial, seed=seed, samples=samples_per_scene, image_size=tuple(image_size), sweeps=sweeps,
             ground_res=ground_res, ground_margin=ground_margin, camera_range=camera_range,
             jpeg_quality=jpeg_quality, lidar=dict(lidar or DEFAULT_LIDAR))
  jobs = [dict(job, index=i) for i in range(scenes)]
  if workers > 1 and scenes > 1:
    with multiprocessing.get_context('spawn').Pool(min(workers, scenes)) as pool:
      rows = list(tqdm.tqdm(pool.imap(capture.capture_scene, jobs), total=scenes, desc='scenes'))
  else:
    rows = [capture.capture_scene(j) for j in tqdm.tqdm(jobs, desc='scenes')]

  locations = sorted({r['location'] for r in rows})
  for location in locations:
    town = capture.cached_town(capture.LOCATIONS.index(location), seed)
    with open(os.path.join(partial, 'maps', 'expansion', f'{location}.json'), 'w') as f:
      json.dump(map_json.build_map_json(town, location, seed), f)
    _semantic_prior_png(town, os.path.join(partial, 'maps', f'{tables_lib.MAP_TOKENS[location]}.png'))
    osm.write_osm(town, location, os.path.join(partial, 'osm', location), seed)
  tables = tables_lib.assemble(rows)
  table_dir = os.path.join(partial, version)
  tables_lib.write_tables(tables, table_dir)
  with open(os.path.join(table_dir, 'splits.json'), 'w') as f:
    json.dump(tables_lib.split_scenes([s['name'] for s in tables['scene']], val_fraction), f, indent=1)
  if os.path.exists(out_dir):
    os.rmdir(out_dir)   # empty (checked above)
  os.replace(partial, out_dir)
  logging.info('wrote %d scenes x %d samples to %s in %.1f s', scenes, samples_per_scene, out_dir,
               time.time() - start)
  return out_dir


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='dataroot to create (must not exist or be empty)')
  parser.add_argument('--scenes', type=int, default=12, help='number of scenes')
  parser.add_argument('--samples-per-scene', type=int, default=40, help='2 Hz keyframes per scene')
  parser.add_argument('--seed', type=int, default=0, help='world seed (same seed -> same tables)')
  parser.add_argument('--version', default='v1.0-synthetic', help='table folder name')
  parser.add_argument('--workers', type=int, default=2, help='processes rendering scenes')
  parser.add_argument('--image-size', type=int, nargs=2, default=(225, 400), metavar=('H', 'W'),
                      help='rendered camera image size')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  generate_world(args.out, scenes=args.scenes, samples_per_scene=args.samples_per_scene, seed=args.seed,
                 version=args.version, workers=args.workers, image_size=tuple(args.image_size))


if __name__ == '__main__':
  main()
