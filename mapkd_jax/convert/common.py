"""Shared helpers for converting PyTorch reference weights into Flax variables trees.

Used by every converter in this package (efficientnet.py, pmapnet.py, ...). Only this package
imports torch, and only lazily (inside `load_torch_state_dict`), so `import mapkd_jax.convert`
works without torch installed.

Layout conventions (PyTorch -> Flax):
  Conv2d weight        [O, I/groups, kh, kw] -> kernel [kh, kw, I/groups, O]   (`conv_kernel`;
                       grouped and depthwise convs included: Flax's feature_group_count kernel
                       has the same [kh, kw, in/groups, out] layout)
  Linear weight        [out, in]             -> kernel [in, out]               (`linear_kernel`)
  BatchNorm2d          weight, bias          -> params scale, bias
                       running_mean/var      -> batch_stats mean, var
                       num_batches_tracked   -> ignored (Flax keeps no counter; the reference's
                                                momentum is not None, so it is never read)

A `Conversion` fills a target tree leaf by leaf, checks every shape, and at `finish()` fails
naming any target leaf left unfilled or any source tensor neither used nor explicitly ignored,
so a converter cannot silently drop or invent weights.
"""
import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

SEP = '/'   # target paths: 'params/EfficientNetB0_0/ConvBNAct_0/Conv_0/kernel'
NAMES_SHOWN = 8   # how many names an error lists before '... (N more)'


def _preview(names: Iterable[str]) -> str:
  names = sorted(names)
  shown = ', '.join(names[:NAMES_SHOWN])
  return shown + (f', ... ({len(names) - NAMES_SHOWN} more)' if len(names) > NAMES_SHOWN else '')


def _to_numpy(value):
  import torch  # only converters import torch
  value = value.detach().cpu()
  if value.dtype in (torch.bfloat16, torch.float16):   # numpy has no bfloat16; keep precision
    value = value.float()
  return value.numpy()


def unwrap_state_dict(obj, path: str = '<object>') -> dict:
  """The state dict inside a loaded torch object: itself, or its 'state_dict' / 'model' entry.

  The 'module.' prefix DataParallel / DistributedDataParallel adds to every name is stripped.
  Raises ValueError naming `path` when no dict of tensors is found.
  """
  import torch
  if isinstance(obj, Mapping):
    for key in ('state_dict', 'model'):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f'{path}: not a PyTorch state dict (got {type(obj).__name__}); expected a '
                     "dict of tensors, or a checkpoint dict holding one under 'state_dict' or "
                     "'model'")
  non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if non_tensors:
    raise ValueError(f'{path}: not a PyTorch state dict: entries that are not tensors: '
                     f'{_preview(map(str, non_tensors))}')
  prefix = 'module.'
  if all(k.startswith(prefix) for k in obj):
    obj = {k[len(prefix):]: v for k, v in obj.items()}
  return {k: _to_numpy(v) for k, v in obj.items()}


def load_torch_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a file written by `torch.save` into {name: np.ndarray}.

  Args:
    path: a .pth/.pt file: a raw state dict, or a checkpoint dict with one under 'state_dict'
      or 'model' (other entries, e.g. an optimizer, are ignored).
    allow_pickle: False loads with torch's `weights_only=True` (tensors and plain containers
      only; safe on untrusted files). True unpickles arbitrary objects (some training scripts
      save an argparse Namespace beside the weights); use only on files you trust.
  Raises:
    ValueError naming `path` when the file is missing or torch cannot read it.
  """
  import torch
  if not os.path.isfile(path):
    raise ValueError(f'{path}: no such file')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
    blocked = 'weights_only' in str(e) or 'Unpickler' in str(e)
    hint = (' (a trusted checkpoint holding non-tensor objects: retry with --allow_pickle)'
            if blocked and not allow_pickle else '')
    raise ValueError(f'{path}: torch.load cannot read it: {type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}{hint}') from e
  return unwrap_state_dict(obj, path)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I/groups, kh, kw] -> Flax nn.Conv kernel [kh, kw, I/groups, O]."""
  if weight.ndim != 4:
    raise ValueError(f'conv weight must be 4-d [O, I/groups, kh, kw], got shape {weight.shape}')
  return np.transpose(weight, (2, 3, 1, 0))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax nn.Dense kernel [in, out]."""
  if weight.ndim != 2:
    raise ValueError(f'linear weight must be 2-d [out, in], got shape {weight.shape}')
  return np.transpose(weight)


def check_names(source: Mapping[str, Any], expected: Iterable[str], *, what: str,
                origin: str = 'state dict'):
  """Raises ValueError when `source` lacks any `expected` name, listing missing and unexpected.

  For a state dict of another model (or under another prefix) this is the first, readable
  error: 'missing: _conv_stem.weight, ...; unexpected: conv1.weight, ...'.
  """
  expected = set(expected)
  missing = expected - set(source)
  if missing:
    unexpected = set(source) - expected
    raise ValueError(
        f'{origin}: not a {what} state dict: {len(missing)} of {len(expected)} expected tensors '
        f'missing: {_preview(missing)}; {len(unexpected)} names not expected: '
        f'{_preview(unexpected) if unexpected else "none"}')


class Conversion:
  """Fills a Flax variables tree from a torch state dict, with bookkeeping and shape checks.

  Usage:
    conv = Conversion(state_dict, abstract_variables, origin='x.pth')
    conv.conv('params/EfficientNetB0_0/ConvBNAct_0/Conv_0', '_conv_stem')
    conv.batch_norm('EfficientNetB0_0/ConvBNAct_0/BatchNorm_0', '_bn0')
    conv.ignore_prefix('_fc.', 'classifier head, unused by the encoder')
    variables = conv.finish()   # raises on unfilled targets / unused sources

  `target` is any nested mapping whose leaves have `.shape` (arrays or jax.ShapeDtypeStruct),
  e.g. `jax.eval_shape(model.init, ...)`; `finish` returns a nested dict of np.ndarrays.
  """

  def __init__(self, source: Mapping[str, np.ndarray], target: Mapping[str, Any], *,
               origin: str = 'state dict'):
    self.source = dict(source)
    self.origin = origin
    self.target = traverse_util.flatten_dict(_as_dict(target), sep=SEP)
    self.filled: dict[str, np.ndarray] = {}
    self.used: dict[str, str] = {}        # source name -> target path
    self.ignored: dict[str, str] = {}     # source name -> reason

  # -- single tensors -------------------------------------------------------------------------
  def put(self, target_path: str, source_name: str,
          transform: Callable[[np.ndarray], np.ndarray] = lambda x: x):
    """target[target_path] = transform(source[source_name]), shape-checked."""
    if source_name not in self.source:
      raise ValueError(f'{self.origin}: tensor {source_name!r} (for {target_path}) not found')
    if target_path not in self.target:
      raise ValueError(f'{self.origin}: {source_name!r}: target {target_path!r} is not a leaf of '
                       f'the model (near: {_preview(self._near(target_path))})')
    if source_name in self.used:
      raise ValueError(f'{self.origin}: {source_name!r} used twice ({self.used[source_name]} and '
                       f'{target_path})')
    if target_path in self.filled:
      raise ValueError(f'{self.origin}: target {target_path} filled twice')
    raw = self.source[source_name]
    value = np.asarray(transform(raw))
    want = tuple(self.target[target_path].shape)
    if tuple(value.shape) != want:
      raise ValueError(f'{self.origin}: shape mismatch: source {source_name} {tuple(raw.shape)} '
                       f'(converted {tuple(value.shape)}) vs target {target_path} {want}')
    self.filled[target_path] = value.astype(np.float32) if value.dtype.kind == 'f' else value
    self.used[source_name] = target_path

  def put_stacked(self, target_path: str, source_names: list,
                  transform: Callable[[np.ndarray], np.ndarray] = lambda x: x):
    """target[target_path] = stack([transform(source[n]) for n in source_names]) on a new
    leading axis (the parameters of an nn.scan over identical layers), shape-checked; each
    source name is recorded as used for `target_path[i]`."""
    if target_path not in self.target:
      raise ValueError(f'{self.origin}: {source_names[0]!r}: target {target_path!r} is not a '
                       f'leaf of the model (near: {_preview(self._near(target_path))})')
    want = tuple(self.target[target_path].shape)
    if not source_names or want[0] != len(source_names):
      raise ValueError(f'{self.origin}: target {target_path} {want} stacks {want[0]} layers; '
                       f'the source has {len(source_names)}: {_preview(source_names)}')
    if target_path in self.filled:
      raise ValueError(f'{self.origin}: target {target_path} filled twice')
    values = []
    for i, name in enumerate(source_names):
      if name not in self.source:
        raise ValueError(f'{self.origin}: tensor {name!r} (for {target_path}[{i}]) not found')
      values.append(np.asarray(transform(self.source[name])))
      if tuple(values[-1].shape) != want[1:]:
        raise ValueError(f'{self.origin}: shape mismatch: source {name} '
                         f'{tuple(self.source[name].shape)} (converted '
                         f'{tuple(values[-1].shape)}) vs target {target_path}[{i}] {want[1:]}')
    value = np.stack(values)
    self.filled[target_path] = value.astype(np.float32) if value.dtype.kind == 'f' else value
    for i, name in enumerate(source_names):
      if name in self.used:
        raise ValueError(f'{self.origin}: {name!r} used twice ({self.used[name]} and '
                         f'{target_path}[{i}])')
      self.used[name] = f'{target_path}[{i}]'

  def ignore(self, source_name: str, reason: str):
    """Marks one source tensor as deliberately unused."""
    if source_name not in self.source:
      raise ValueError(f'{self.origin}: cannot ignore {source_name!r}: not in the state dict')
    self.ignored[source_name] = reason

  def ignore_prefix(self, prefix: str, reason: str, *, required: bool = False):
    """Marks every source tensor whose name starts with `prefix` as deliberately unused."""
    names = [k for k in self.source if k.startswith(prefix)]
    if required and not names:
      raise ValueError(f'{self.origin}: no tensor starts with {prefix!r}')
    for name in names:
      self.ignored[name] = reason

  # -- layers ---------------------------------------------------------------------------------
  def conv(self, target: str, source: str, *, bias: bool | None = None):
    """torch Conv2d `source`.{weight,bias} -> Flax Conv at params path `target`.{kernel,bias}.

    `bias=None` maps the bias when the source has one; True/False demand it.
    """
    self.put(f'{_params(target)}{SEP}kernel', f'{source}.weight', conv_kernel)
    self._bias(target, source, bias)

  def linear(self, target: str, source: str, *, bias: bool | None = None):
    """torch Linear `source` -> Flax Dense at `target`."""
    self.put(f'{_params(target)}{SEP}kernel', f'{source}.weight', linear_kernel)
    self._bias(target, source, bias)

  def batch_norm(self, target: str, source: str):
    """torch BatchNorm `source` -> Flax BatchNorm at `target` (module path, no collection).

    weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var;
    num_batches_tracked is ignored (Flax keeps no step counter).
    """
    target = _strip_collection(target)
    self.put(f'params{SEP}{target}{SEP}scale', f'{source}.weight')
    self.put(f'params{SEP}{target}{SEP}bias', f'{source}.bias')
    self.put(f'batch_stats{SEP}{target}{SEP}mean', f'{source}.running_mean')
    self.put(f'batch_stats{SEP}{target}{SEP}var', f'{source}.running_var')
    counter = f'{source}.num_batches_tracked'
    if counter in self.source:
      self.ignore(counter, 'BatchNorm step counter; Flax BatchNorm has none (momentum is fixed)')

  def _bias(self, target, source, bias):
    has = f'{source}.bias' in self.source
    if bias is True and not has:
      raise ValueError(f'{self.origin}: {source}.bias expected (for {target}) but not found')
    if bias is False and has:
      raise ValueError(f'{self.origin}: {source}.bias present but {target} has no bias')
    if has:
      self.put(f'{_params(target)}{SEP}bias', f'{source}.bias')

  def _near(self, path):
    head = path.rsplit(SEP, 2)[0]
    near = [t for t in self.target if t.startswith(head)]
    return near or list(self.target)

  # -- end ------------------------------------------------------------------------------------
  def finish(self) -> dict:
    """The filled nested variables dict; raises on unfilled targets or unaccounted sources."""
    unfilled = set(self.target) - set(self.filled)
    if unfilled:
      raise ValueError(f'{self.origin}: {len(unfilled)} target leaves not filled: '
                       f'{_preview(unfilled)}')
    unused = set(self.source) - set(self.used) - set(self.ignored)
    if unused:
      raise ValueError(f'{self.origin}: {len(unused)} source tensors neither converted nor '
                       f'ignored: {_preview(unused)}')
    return traverse_util.unflatten_dict(self.filled, sep=SEP)

  def report(self) -> dict:
    """{'mapped': {source: target}, 'ignored': {source: reason}} for logs and the CLI's JSON."""
    return {'origin': self.origin, 'mapped': dict(sorted(self.used.items())),
            'ignored': dict(sorted(self.ignored.items()))}


def _as_dict(tree):
  """Nested Mapping (FrozenDict included) -> nested dict."""
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _strip_collection(path: str) -> str:
  for collection in ('params', 'batch_stats'):
    if path.startswith(collection + SEP):
      return path[len(collection) + 1:]
  return path


def _params(path: str) -> str:
  return f'params{SEP}{_strip_collection(path)}'
