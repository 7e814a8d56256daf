"""HDMapNet `ViewTransformation` (reference `view_fusion.*`) -> `camera.ViewTransform` params.

Reference (HDMapNet model/hdmapnet.py; P-MapNet and MapKD copy it): `view_fusion.hw_mat.<i>` is
camera i's `nn.Sequential(Linear, ReLU, Linear, ReLU)`, so its Linear layers sit at Sequential
indices 0 and 2. Ours: `ViewTransform` (named 'view_fusion' inside `CameraBEV`) holds one
`ViewMLP` per camera, 'hw_mat_<i>', whose Dense layers are 'fc_<l>':

  view_fusion.hw_mat.<i>.<2 l>.weight [out, in] -> <target>/hw_mat_<i>/fc_<l>/kernel [in, out]
  view_fusion.hw_mat.<i>.<2 l>.bias   [out]     -> <target>/hw_mat_<i>/fc_<l>/bias   [out]

The reference's IPM and upsampler have no tensors (its plane grid is a plain attribute, not a
buffer), so these are all the view transform's weights.
"""
import re

from mapkd_jax.convert import common

_HW_MAT = re.compile(r'hw_mat_(\d+)/fc_(\d+)/kernel$')


def convert_view_fusion(conv: common.Conversion, target: str, source_prefix: str):
  """Fills every ViewMLP layer under the module path `target` from the reference's tensors.

  B1's `convert/pmapnet.py` calls it with the camera branch's path and the reference prefix,
  e.g. `convert_view_fusion(conv, 'camera/view_fusion', 'view_fusion.')`; the parity test
  converts a bare ViewTransform with `target=''`.

  Args:
    conv: a Conversion whose target tree holds the ViewTransform params (any enclosing path).
    target: module path of the ViewTransform inside that tree, without the 'params' collection
      ('' when the ViewTransform is the root).
    source_prefix: prefix of the reference's ViewTransformation tensors, with its trailing dot.

  Raises:
    ValueError naming the target path when it holds no view MLP, and (through `conv`) naming
    the torch tensor and our parameter on a missing tensor or a shape mismatch. A reference
    with more cameras than the target leaves tensors unused: `conv.finish()` names them.
  """
  params = common.SEP.join(p for p in ('params', target) if p) + common.SEP
  layers = {}
  for path in conv.target:
    match = _HW_MAT.match(path[len(params):]) if path.startswith(params) else None
    if match:
      layers.setdefault(int(match[1]), []).append(int(match[2]))
  if not layers:
    raise ValueError(f'{conv.origin}: no view MLP (hw_mat_<i>/fc_<l>/kernel) under target '
                     f'{params!r}; is {target!r} the ViewTransform module path?')
  for cam in sorted(layers):
    for layer in sorted(layers[cam]):
      conv.linear(f'{params}hw_mat_{cam}/fc_{layer}',
                  f'{source_prefix}hw_mat.{cam}.{2 * layer}', bias=True)
