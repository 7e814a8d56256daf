"""Teacher-Coach-Student (MapKD) configs, one per stage.

  python launch.py --config configs/tcs.py:student --workdir runs/tcs
  python launch.py --config configs/tcs.py:student,tiny --workdir runs/tiny
  python launch.py --config configs/tcs.py:teacher,bev=120x60 --workdir runs/long

Arg tokens: first bare token = stage (hd_pretrain, teacher, coach, student, demo);
`nokd` = the student baseline (task loss only); `tiny` = CI/smoke size;
`bev=60x30|120x60|240x60` = BEV range (DESIGN.md section 1).
"""
import ml_collections

from mapkd_jax import config_lib

# name -> ((x_min, x_max, x_step), (y_min, y_max, y_step)) in metres, ego frame (x fwd, y left).
BEV_RANGES = {
    '60x30': ((-30.0, 30.0, 0.15), (-15.0, 15.0, 0.15)),
    '120x60': ((-60.0, 60.0, 0.3), (-30.0, 30.0, 0.3)),
    '240x60': ((-120.0, 120.0, 0.6), (-30.0, 30.0, 0.3)),
}
CAMERAS = ('CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT',
           'CAM_BACK_LEFT', 'CAM_BACK', 'CAM_BACK_RIGHT')


def get_config(arg=None):
  """Returns the config of one TCS stage; see the module docstring for the arg grammar."""
  arg = config_lib.parse_arg(arg, stage='student', nokd=False, tiny=False, bev='60x30')
  if arg.bev not in BEV_RANGES:
    raise ValueError(f"configs/tcs.py: arg 'bev' must be one of {sorted(BEV_RANGES)}, got {arg.bev!r}")
  if arg.nokd and arg.stage != 'student':
    raise ValueError(f"configs/tcs.py: 'nokd' applies to the student stage only, not {arg.stage!r}")
  config = ml_collections.ConfigDict()
  config.stage = arg.stage
  config.nokd = arg.nokd
  config.seed = 0

  x_range, y_range = BEV_RANGES[arg.bev]
  config.data = dict(
      root='',                    # nuScenes-format dataroot; '' = synthetic world in WORKDIR/data/world
      version='v1.0-synthetic',   # nuScenes table folder name under root
      shards='',                  # shard dir; '' = WORKDIR/data/shards-<bev name>
      bev_name=arg.bev,
      cameras=CAMERAS,
      image_size=(128, 352),      # (H, W) network input, resized from the source images
      bev_x=x_range,              # (min, max, step) metres; canvas width = (max-min)/step
      bev_y=y_range,              # (min, max, step) metres; canvas height = (max-min)/step
      classes=('divider', 'ped_crossing', 'boundary'),
      line_width_px=5,            # label and SD-prior line thickness
      direction_bins=36,          # 10 degree bins; label 0 = none
      lidar_sweeps=3,
      lidar_min_range=2.2,        # metres; closer points (the ego car) are dropped
      max_points=81920,           # LiDAR points per sample after padding/cropping
      shuffle_buffer=256,
      num_shards=8,               # TFRecord shards per split when creating data
      prep_workers=2,             # processes for data prep
      synthetic=dict(scenes=12, samples_per_scene=40, seed=0),
  )

  # One sub-dict per shared block (DESIGN.md section 2); models read only their own.
  config.model = dict(
      camera=dict(image_encoder='efficientnet_b0', channels=64),  # image encoder + view transform
      lss=dict(),        # lift-splat simulated LiDAR (coach)
      neck=dict(),       # stride-2 convs to `bev_small` and back
      decoder=dict(),    # BEV decoder + semantic/embedding/direction heads
      student=dict(),    # student-only blocks (feature expansion)
      lidar=dict(),      # PointPillars (teacher)
      sd=dict(),         # SD-prior encoder + BEV->SD cross-attention (teacher, coach)
      hd=dict(),         # HD-prior ViT refinement / MAE (teacher, coach, hd_pretrain)
  )

  config.kd = dict(
      msrd_teacher_weight=0.75, msrd_coach_weight=0.001,
      tgpd_teacher_weight=0.5, tgpd_coach_weight=0.01,
      msrd_temperature=1.0, msrd_variant='bce',   # or 'kl'
      tgpd_patch_size=(5, 5), tgpd_embed_dim=64, tgpd_temperature=1.0,
      tgpd_attention_weight=1.0, tgpd_feature_weight=1.0,
  )
  config.loss = dict(semantic_pos_weight=2.13, instance_weight=0.1, direction_weight=0.1,
                     delta_v=0.5, delta_d=3.0)

  if arg.tiny:
    config.data.image_size = (64, 176)
    config.data.bev_x = (-30.0, 30.0, 0.6)
    config.data.bev_y = (-15.0, 15.0, 0.6)
    config.data.bev_name = 'tiny'
    config.data.max_points = 4096
    config.data.num_shards = 2
    config.data.synthetic = dict(scenes=3, samples_per_scene=8, seed=0)
    config.model.camera.image_encoder = 'resnet_small'
  return config
