"""nuScenes JSON tables of a synthetic world: the constant tables plus the rows of every scene."""
import json
import os

from data_prep.world.map_json import token

# Semantic-prior map tokens the devkit hard-codes (nuscenes/map_expansion/bitmap.py).
MAP_TOKENS = {
    'singapore-onenorth': '53992ee3023e5494b90c316c183be829',
    'singapore-hollandvillage': '37819e65e09e5547b8a3ceaefba56bb2',
    'singapore-queenstown': '93406b464a165eaba6d9de76ca09f5da',
    'boston-seaport': '36092f0b03a857c6a3403e25b4b7aab3',
}
CHANNELS = (('CAM_FRONT_LEFT', 'camera'), ('CAM_FRONT', 'camera'), ('CAM_FRONT_RIGHT', 'camera'),
            ('CAM_BACK_LEFT', 'camera'), ('CAM_BACK', 'camera'), ('CAM_BACK_RIGHT', 'camera'),
            ('LIDAR_TOP', 'lidar'))
CATEGORIES = ('vehicle.car', 'vehicle.truck', 'vehicle.bus.rigid', 'human.pedestrian.adult',
              'movable_object.barrier', 'static_object.bicycle_rack')
ATTRIBUTES = ('vehicle.moving', 'vehicle.stopped', 'vehicle.parked', 'pedestrian.moving')
VISIBILITY = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))


def assemble(scene_rows):
  """Table name -> rows for all scenes (in scene order), including the constant tables."""
  tables = dict(
      category=[dict(token=token('category', n), name=n, description=n, index=i) for i, n in enumerate(CATEGORIES)],
      attribute=[dict(token=token('attribute', n), name=n, description=n) for n in ATTRIBUTES],
      visibility=[dict(token=t, level=lvl, description=f'visibility of whole object is {lvl}') for t, lvl in VISIBILITY],
      sensor=[dict(token=token('sensor', c), channel=c, modality=m) for c, m in CHANNELS],
      instance=[], sample_annotation=[])
  for name in ('log', 'scene', 'sample', 'sample_data', 'ego_pose', 'calibrated_sensor'):
    tables[name] = [row for rows in scene_rows for row in rows[name]]
  logs_by_location = {}
  for rows in scene_rows:
    logs_by_location.setdefault(rows['location'], []).extend(row['token'] for row in rows['log'])
  tables['map'] = [dict(category='semantic_prior', token=MAP_TOKENS[loc], filename=f'maps/{MAP_TOKENS[loc]}.png',
                        log_tokens=logs) for loc, logs in sorted(logs_by_location.items())]
  return tables


def write_tables(tables, table_dir):
  os.makedirs(table_dir, exist_ok=True)
  for name, rows in sorted(tables.items()):
    with open(os.path.join(table_dir, f'{name}.json'), 'w') as f:
      json.dump(rows, f, indent=1)


def split_scenes(scene_names, val_fraction):
  """Whole-scene split: the last round(val_fraction * n) scenes (at least 1 when n >= 2) are val."""
  n = len(scene_names)
  n_val = min(max(int(round(val_fraction * n)), 1 if n >= 2 else 0), n)
  return dict(train=list(scene_names[:n - n_val]), val=list(scene_names[n - n_val:]))
