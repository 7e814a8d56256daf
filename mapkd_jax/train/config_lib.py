"""Config files: parsing their `:arg` string (`configs/tcs.py:student,tiny,bev=120x60`),
loading one from a `path:arg` spec, and validating the result."""
import importlib.util
import os
import types

# Learning-rate schedules train_step.learning_rate_schedule builds.
SCHEDULES = ('step', 'cosine')
# Optimizers train_step.make_optimizer builds: 'adam' is the reference recipe; 'sgd' (plain,
# no momentum) makes an update a fixed multiple of the gradient, which the device-layout
# equivalence tests compare at float precision.
OPTIMIZERS = ('adam', 'sgd')

# demo and study run the whole chain (mapkd_jax/demo.py); the others train one stage.
STAGES = ('hd_pretrain', 'teacher', 'coach', 'student', 'demo', 'study')


def parse_arg(arg, *, source='configs/tcs.py', **defaults):
  """Parses 'stage,flag,key=value' against typed defaults.

  The first bare token sets `stage` (checked against STAGES); other bare names set a
  boolean default to True; `key=value` is cast to the default's type.

  Args:
    arg: the string after ':' in `--config FILE:arg`, or None.
    source: config file named in error messages.
    **defaults: every accepted key with its default value (its type is the value type).

  Returns:
    A SimpleNamespace with one attribute per default.

  Raises:
    ValueError: naming the config file and the offending token.
  """
  values = dict(defaults)
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  for i, token in enumerate(tokens):
    if '=' in token:
      key, raw = token.split('=', 1)
      if key not in defaults:
        raise ValueError(f'{source}: unknown arg {key!r}; known: {sorted(defaults)}')
      kind = type(defaults[key])
      if kind is bool:
        if raw.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(f'{source}: arg {key!r} wants true/false, got {raw!r}')
        values[key] = raw.lower() in ('true', '1')
      else:
        try:
          values[key] = kind(raw)
        except ValueError as e:
          raise ValueError(f'{source}: arg {key!r} wants {kind.__name__}, got {raw!r}') from e
    elif i == 0 and 'stage' in defaults and token not in defaults:
      if token not in STAGES:
        raise ValueError(f'{source}: unknown stage {token!r}; known: {list(STAGES)}')
      values['stage'] = token
    elif token in defaults and isinstance(defaults[token], bool):
      values[token] = True
    else:
      raise ValueError(f'{source}: unknown arg {token!r}; known: {sorted(defaults)}')
  return types.SimpleNamespace(**values)


def _require(ok, key, value, wants):
  if not ok:
    raise ValueError(f'config.{key}={value!r}: {wants}')


def validate(config):
  """Checks the values a run depends on before any work; errors name the config key."""
  _require(config.stage in STAGES, 'stage', config.stage, f'one of {list(STAGES)}')
  _require(isinstance(config.mixed_precision, bool), 'mixed_precision', config.mixed_precision,
           'True or False')
  for key in ('steps', 'batch_size', 'log_every', 'checkpoint_every', 'eval_every',
              'keep_checkpoints'):
    value = config.train[key]
    _require(isinstance(value, int) and value > 0, f'train.{key}', value, 'a positive integer')
  _require(config.train.eval_batches >= 0, 'train.eval_batches', config.train.eval_batches,
           '>= 0 (0 = the whole split)')
  optim = config.optim
  for key in ('learning_rate', 'decay_steps', 'grad_clip'):
    _require(optim[key] > 0, f'optim.{key}', optim[key], 'a positive number')
  _require(0 < optim.decay_factor <= 1, 'optim.decay_factor', optim.decay_factor, 'in (0, 1]')
  _require(optim.name in OPTIMIZERS, 'optim.name', optim.name, f'one of {OPTIMIZERS}')
  _require(optim.schedule in SCHEDULES, 'optim.schedule', optim.schedule,
           f'one of {SCHEDULES}')
  _require(0 <= optim.cosine_final_fraction <= 1, 'optim.cosine_final_fraction',
           optim.cosine_final_fraction, 'in [0, 1]')
  for key, value in config.kd.items():
    if key.endswith('_weight'):
      _require(value >= 0, f'kd.{key}', value, 'a non-negative loss weight')
  _require(config.kd.msrd_variant in ('bce', 'kl'), 'kd.msrd_variant', config.kd.msrd_variant,
           "'bce' or 'kl'")
  for key in ('msrd_temperature', 'tgpd_temperature'):
    _require(config.kd[key] > 0, f'kd.{key}', config.kd[key], 'a positive temperature')
  for axis in ('bev_x', 'bev_y'):
    lo, hi, step = config.data[axis]
    cells = (hi - lo) / step if step > 0 else 0
    _require(hi > lo and step > 0 and abs(cells - round(cells)) < 1e-6, f'data.{axis}',
             tuple(config.data[axis]), '(min, max, step) with max > min and a whole number of steps')
  _require(all(s > 0 and s % 16 == 0 for s in config.data.image_size), 'data.image_size',
           tuple(config.data.image_size), '(H, W), positive multiples of 16 (1/16 features)')
  _require(config.data.max_points > 0, 'data.max_points', config.data.max_points, '> 0')
  for section in ('camera', 'lss'):
    encoder = config.model[section].image_encoder
    _require(encoder in ('efficientnet_b0', 'resnet_small'), f'model.{section}.image_encoder',
             encoder, "'efficientnet_b0' or 'resnet_small'")
  _check_tgpd_patches(config)


def _check_tgpd_patches(config):
  """TGPD patches must tile bev_small (canvas / 2**neck.num_layers) exactly."""
  factor = 2 ** config.model.neck.num_layers
  height = round((config.data.bev_y[1] - config.data.bev_y[0]) / config.data.bev_y[2])
  width = round((config.data.bev_x[1] - config.data.bev_x[0]) / config.data.bev_x[2])
  small = (-(-height // factor), -(-width // factor))
  patch = tuple(config.kd.tgpd_patch_size)
  _require(small[0] % patch[0] == 0 and small[1] % patch[1] == 0, 'kd.tgpd_patch_size', patch,
           f'must tile bev_small {small} (BEV canvas / 2**model.neck.num_layers)')


def load_config_file(spec, *, flag='--config'):
  """'configs/tcs.py:<arg>' -> the validated, frozen config (what launch.py's --config builds).

  For command-line tools outside absl's config_flags: the file is executed from its path, so
  no module of this package imports configs/.

  Raises:
    ValueError: naming `flag` and the path when the file does not exist or has no get_config,
      or naming the key when validation fails.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'{flag} {spec!r}: no config file {path!r}')
  module_spec = importlib.util.spec_from_file_location('_loaded_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{flag} {spec!r}: {path} defines no get_config(arg)')
  config = module.get_config(arg or None)
  validate(config)
  return ml_collections.FrozenConfigDict(config)
