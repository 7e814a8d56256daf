"""Side-by-side picture of one sample as the shard builder sees it.

  python -m data_prep.preview --dataroot DIR --version V --sample K --out x.png [--osm-dir DIR] \
      [--scene scene-0916] [--bev 60x30]

Top: the six cameras (schema order, resized to config.data.image_size). Bottom, three BEV
panels drawn with x (forward) to the right and y (left) up: LiDAR points with the label
polylines on top, LiDAR with the SD prior, and the rasterized semantic labels.
`--sample` is a sample token, or an index: into the keyframes of `--scene` (time order) when
given, else into the dataroot's sample table (table order).
"""
import argparse
import os

import cv2
import numpy as np

from data_prep import labels
from data_prep import nuscenes_reader
from mapkd_jax.data import schema

# BGR colours of background, divider, ped_crossing, boundary.
CLASS_COLOURS = np.array([[0, 0, 0], [0, 200, 255], [255, 80, 80], [80, 255, 80]], np.uint8)
SD_COLOUR = (200, 0, 200)


def lidar_bev(points, bev_x, bev_y):
  """[H, W, 3] uint8 grey image: brightness = number of LiDAR points per cell (log scale)."""
  height, width = schema.bev_shape(bev_x, bev_y)
  cols = np.floor((points[:, 0] - bev_x[0]) / bev_x[2]).astype(int)
  rows = np.floor((points[:, 1] - bev_y[0]) / bev_y[2]).astype(int)
  inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
  counts = np.zeros((height, width), np.float64)
  np.add.at(counts, (rows[inside], cols[inside]), 1.0)
  grey = np.clip(np.log1p(counts) / np.log1p(max(counts.max(), 1.0)) * 255, 0, 255)
  return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def render(fields, bev_x, bev_y):
  """The preview image [H, W, 3] uint8 BGR of a `nuscenes_reader.read_sample` dict."""
  cams = [cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
          for jpeg in fields[schema.CAMERA_JPEG]]
  camera_grid = np.concatenate([np.concatenate(cams[:3], 1), np.concatenate(cams[3:], 1)], 0)

  lidar = lidar_bev(fields[schema.LIDAR_POINTS], bev_x, bev_y)
  with_lines = lidar.copy()
  for class_id, lines in fields['polylines'].items():
    for line in lines:
      pixels = np.round(labels.to_pixels(line, bev_x, bev_y)).astype(np.int32)
      cv2.polylines(with_lines, [pixels], False, CLASS_COLOURS[class_id].tolist(), 1)
  with_sd = lidar.copy()
  with_sd[fields[schema.SD_PRIOR] > 0] = SD_COLOUR
  semantic = CLASS_COLOURS[fields[schema.LABEL_SEMANTIC]]
  # Raster rows follow +y (left); flip so that left is up in the picture.
  panels = [np.flipud(p) for p in (with_lines, with_sd, semantic)]
  separator = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
  bev_row = np.concatenate([panels[0], separator, panels[1], separator, panels[2]], 1)
  width = max(camera_grid.shape[1], bev_row.shape[1])

  def pad(image):
    return np.pad(image, ((0, 4), (0, width - image.shape[1]), (0, 0)), constant_values=255)

  return np.concatenate([pad(camera_grid), pad(bev_row)], 0)


def scene_keyframes(nusc, scene_name):
  """Sample tokens of one scene in time order, or ValueError naming --scene and the known ones."""
  by_name = {scene['name']: scene for scene in nusc.scene}
  if scene_name not in by_name:
    raise ValueError(f'--scene {scene_name!r}: not in the tables; known: {sorted(by_name)}')
  tokens, token = [], by_name[scene_name]['first_sample_token']
  while token:
    tokens.append(token)
    token = nusc.get('sample', token)['next']
  return tokens


def _road_classes(flag_value, default):
  return tuple(flag_value.split(',')) if flag_value else tuple(default)


def main(argv=None):
  from configs import tcs  # pylint: disable=g-import-not-at-top
  data = tcs.get_config().data
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataroot', required=True)
  parser.add_argument('--version', required=True)
  parser.add_argument('--sample', required=True, help='index in the sample table, or a token')
  parser.add_argument('--out', required=True, help='PNG to write')
  parser.add_argument('--osm-dir', default=None, help='OSM shapefiles; default DATAROOT/osm')
  parser.add_argument('--sd-road-classes', default=None,
                      help='comma list of OSM highway classes; default config.data.sd_road_classes')
  parser.add_argument('--scene', default=None, help='scene name; --sample K = its K-th keyframe')
  parser.add_argument('--bev', default=data.bev_name, help=f'one of {sorted(tcs.BEV_RANGES)}')
  args = parser.parse_args(argv)
  if args.bev not in tcs.BEV_RANGES:
    raise ValueError(f'--bev: {args.bev!r} is not one of {sorted(tcs.BEV_RANGES)}')
  bev_x, bev_y = tcs.BEV_RANGES[args.bev]
  dataroot = os.path.abspath(args.dataroot)
  options = nuscenes_reader.make_options(
      bev_x=bev_x, bev_y=bev_y, image_size=data.image_size, cameras=data.cameras,
      label_thickness_ref=data.label_thickness_ref, sd_thickness_ref=data.sd_thickness_ref,
      thickness_ref_step=data.thickness_ref_step, direction_bins=data.direction_bins,
      lidar_sweeps=data.lidar_sweeps, lidar_min_range=data.lidar_min_range,
      jpeg_quality=data.jpeg_quality, boundary_clip_margin=data.boundary_clip_margin,
      sd_road_classes=_road_classes(args.sd_road_classes, data.sd_road_classes), osm_dir=args.osm_dir or os.path.join(dataroot, 'osm'))
  source = nuscenes_reader.Source(dataroot, args.version, options)
  token = args.sample
  if token.isdigit():
    candidates = scene_keyframes(source.nusc, args.scene) if args.scene else [
        s['token'] for s in source.nusc.sample]
    index = int(token)
    if index >= len(candidates):
      raise ValueError(f'--sample {index}: only {len(candidates)} samples'
                       + (f' in --scene {args.scene}' if args.scene else ''))
    token = candidates[index]
  fields = nuscenes_reader.read_sample(source, token)
  nuscenes_reader.warn_missing_map_layers(source.missing_map_layers)
  image = render(fields, bev_x, bev_y)
  if not cv2.imwrite(args.out, image):
    raise ValueError(f'--out {args.out!r}: could not write the PNG')
  print(f'{args.out}: sample {token}')


if __name__ == '__main__':
  main()
