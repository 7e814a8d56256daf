"""Parsing of the `:arg` string of config files (`configs/tcs.py:student,tiny,bev=120x60`)."""
import types

STAGES = ('hd_pretrain', 'teacher', 'coach', 'student', 'demo')


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
