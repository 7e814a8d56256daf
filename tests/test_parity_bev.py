"""Reference parity of the BEV neck, decoder and student tail (torch side: torch_ref_bev.py).

Random torch weights AND BatchNorm running statistics (so eval-mode BN can fail), converted
with mapkd_jax/convert/pmapnet.py; bound: max|diff| <= 1e-4 x max|reference output| per head.
Everything runs at reference channels on small canvases (the decoder 40 x 80 in eval and
train mode, the student tail 48 x 96): a 200 x 400 forward costs ~5-10 s per framework on two
cores. The full 200 x 400 size is tested once, for the whole student, in
test_parity_student.py.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
import torch.nn.functional as F  # noqa: E402

import torch_ref_bev as ref  # noqa: E402
from configs import tcs  # noqa: E402
from mapkd_jax.convert import common, pmapnet  # noqa: E402
from mapkd_jax.data import schema  # noqa: E402
from mapkd_jax.models.bev_decoder import BEVDecoder, BEVNeck, resize_half_pixel  # noqa: E402
from mapkd_jax.models.student import Student  # noqa: E402

REL_TOL = 1e-4
HEAD_NAMES = ('semantic', 'embedding', 'direction')


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _assert_close(ours, theirs, what):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  bound = REL_TOL * np.max(np.abs(theirs))
  err = np.max(np.abs(ours - theirs))
  print(f'{what}: max|diff| {err:.3g}, max|ref| {np.max(np.abs(theirs)):.3g}, relative '
        f'{err / np.max(np.abs(theirs)):.3g}')   # the figures, with pytest -s
  assert bound > 0 and err <= bound, f'{what}: max|diff| {err:.3g} > {bound:.3g} (1e-4 x max|ref|)'
  return err


def _reference_config(canvas_hw=None):
  """The reference student config; `canvas_hw` (multiples of 8) shrinks the BEV canvas at
  0.5 m cells, every channel count unchanged."""
  config = tcs.get_config('student')
  if canvas_hw is not None:
    config.data.bev_y = (-canvas_hw[0] / 4, canvas_hw[0] / 4, 0.5)
    config.data.bev_x = (-canvas_hw[1] / 4, canvas_hw[1] / 4, 0.5)
  return ml_collections.FrozenConfigDict(config)


def _prefixed(module, prefix):
  return {f'{prefix}{k}': v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _wrap(variables, name):
  return {col: {name: tree} for col, tree in variables.items()}


def _unwrap(variables, name):
  return {col: tree[name] for col, tree in variables.items()}


# -- resizes and the transposed conv -----------------------------------------------------------

def test_half_pixel_resize_matches_torch_and_loop():
  """The student's bev_small -> canvas resize: torch bilinear, align_corners=False."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 7, 3)).astype(np.float32)
  out = np.asarray(resize_half_pixel(jnp.asarray(x), (40, 24)))
  theirs = _nhwc(F.interpolate(_nchw(x), size=(40, 24), mode='bilinear', align_corners=False))
  np.testing.assert_allclose(out, theirs, atol=1e-5)
  # Plain loop: source = (i + 0.5) * in / out - 0.5, clamped at 0 (torch's rule).
  def src(i, n_in, n_out):
    s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = min(int(np.floor(s)), n_in - 1)
    return lo, min(lo + 1, n_in - 1), s - lo
  loop = np.zeros_like(out)
  for i in range(40):
    r0, r1, fr = src(i, 5, 40)
    for j in range(24):
      c0, c1, fc = src(j, 7, 24)
      loop[0, i, j] = ((1 - fr) * ((1 - fc) * x[0, r0, c0] + fc * x[0, r0, c1])
                       + fr * ((1 - fc) * x[0, r1, c0] + fc * x[0, r1, c1]))
  np.testing.assert_allclose(out, loop, atol=1e-5)
  with pytest.raises(ValueError, match='upsamples only'):
    resize_half_pixel(jnp.asarray(x), (4, 24))


def test_neck_matches_conv_bev_and_conv_up():
  """conv_bev (down) and conv_up (up, transposed kernels flipped) in eval and train mode."""
  config = ml_collections.ConfigDict(tcs.get_config('student,tiny'))
  config.model.neck.update(channels=6, num_layers=3)
  config = ml_collections.FrozenConfigDict(config)
  down, up = ref.conv_down(6, in_channels=5), ref.conv_up(6, 6)
  ref.randomize_(down, 1)
  ref.randomize_(up, 2)
  x = np.random.default_rng(0).normal(size=(2, 16, 24, 5)).astype(np.float32)
  neck = BEVNeck(config)
  abstract = jax.eval_shape(lambda: neck.init(jax.random.key(0), jnp.asarray(x), train=False))
  conv = common.Conversion({**_prefixed(down, 'conv_bev.'), **_prefixed(up, 'conv_up.')},
                           _wrap(abstract, 'neck'))
  pmapnet.convert_neck_down(conv, 3)
  pmapnet.convert_neck_up(conv, 3)
  variables = _unwrap(conv.finish(), 'neck')
  for train in (False, True):
    down.train(train)
    up.train(train)
    with torch.no_grad():
      small_t = down(_nchw(x))
      full_t = up(small_t)
    (small, full), _ = neck.apply(variables, jnp.asarray(x), train=train,
                                  mutable=['batch_stats'])
    _assert_close(small, _nhwc(small_t), f'neck down train={train}')
    _assert_close(full, _nhwc(full_t), f'neck up train={train}')


# -- decoder at reference channels ---------------------------------------------------------------

@pytest.fixture(scope='module')
def decoder_pair():
  """(torch BevEncode(192), our BEVDecoder, converted variables, input [2, 40, 80, 192])."""
  config = _reference_config()
  torch_model = ref.randomize_(ref.BevEncode(192), 3)
  x = np.random.default_rng(1).normal(size=(2, 40, 80, 192)).astype(np.float32)
  decoder = BEVDecoder(config)
  abstract = jax.eval_shape(lambda: decoder.init(jax.random.key(0), jnp.asarray(x), train=False))
  conv = common.Conversion(_prefixed(torch_model, 'bevencode.'), _wrap(abstract, 'decoder'))
  pmapnet.convert_decoder(conv, config.model.decoder.blocks_per_layer)
  return torch_model, decoder, _unwrap(conv.finish(), 'decoder'), x


def test_decoder_eval_parity(decoder_pair):
  torch_model, decoder, variables, x = decoder_pair
  torch_model.eval()
  with torch.no_grad():
    theirs = dict(zip(HEAD_NAMES, torch_model(_nchw(x))))
  ours = jax.jit(lambda v, b: decoder.apply(v, b, train=False))(variables, jnp.asarray(x))
  for name in HEAD_NAMES:
    _assert_close(ours[name], _nhwc(theirs[name]), f'decoder eval {name}')


def test_decoder_train_parity(decoder_pair):
  """Batch statistics in the forward; running means updated with torch's momentum 0.1."""
  torch_model, decoder, variables, x = decoder_pair
  torch_model.train()
  with torch.no_grad():
    theirs = dict(zip(HEAD_NAMES, torch_model(_nchw(x))))
  ours, updated = jax.jit(lambda v, b: decoder.apply(v, b, train=True, mutable=['batch_stats']))(
      variables, jnp.asarray(x))
  for name in HEAD_NAMES:
    _assert_close(ours[name], _nhwc(theirs[name]), f'decoder train {name}')
  # Running statistics after one step (torch: 0.9 old + 0.1 batch mean / UNBIASED batch
  # variance, models/batch_norm.py); checked on the stem and the last BN of the direction head.
  stats = updated['batch_stats']
  state = torch_model.state_dict()
  for ours_bn, theirs in ((stats['stem']['bn'], 'bn1'),
                          (stats['head_direction']['conv1']['bn'], 'up2_direction.2')):
    np.testing.assert_allclose(ours_bn['mean'], state[f'{theirs}.running_mean'].numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours_bn['var'], state[f'{theirs}.running_var'].numpy(),
                               rtol=1e-4, atol=1e-5)
  torch_model.eval()


# -- converter bookkeeping -----------------------------------------------------------------------

def test_converter_errors_name_the_problem(decoder_pair):
  torch_model, decoder, variables, x = decoder_pair
  abstract = _wrap(jax.eval_shape(lambda: variables), 'decoder')
  source = _prefixed(torch_model, 'bevencode.')
  # A shape mismatch names both sides.
  bad = dict(source, **{'bevencode.up2.4.weight': np.zeros((5, 128, 1, 1), np.float32)})
  conv = common.Conversion(bad, abstract, origin='bad.pt')
  with pytest.raises(ValueError, match=r'bevencode\.up2\.4\.weight.*decoder/head_semantic/out'):
    pmapnet.convert_decoder(conv, 2)
  # An unused source tensor is an error at finish().
  conv = common.Conversion(dict(source, extra=np.zeros(3, np.float32)), abstract, origin='x.pt')
  pmapnet.convert_decoder(conv, 2)
  with pytest.raises(ValueError, match='neither converted nor ignored: extra'):
    conv.finish()
  # A student's tensors are not a teacher's, a coach's nor an HD prior's: names are listed.
  with pytest.raises(ValueError, match=r'not a MapKD coach .*missing: .*expand_to_128'):
    pmapnet.convert_state_dict(source, tcs.get_config('coach,tiny'), {}, origin='t.pt')
  with pytest.raises(ValueError, match=r'not a P-MapNet teacher .*missing: .*mae_head\.'):
    pmapnet.convert_state_dict(source, tcs.get_config('teacher,tiny'), {}, origin='t.pt')
  with pytest.raises(ValueError, match=r'not a P-MapNet HD prior .*missing: .*pos_embed'):
    pmapnet.convert_state_dict(source, tcs.get_config('hd_pretrain,tiny'), {}, origin='t.pt')
  # Another model's state dict: missing and unexpected names listed.
  with pytest.raises(ValueError, match=r'missing: .*feature_expand\.conv1\.weight.*not '
                                       r'expected: .*conv1\.weight'):
    pmapnet.convert_state_dict({'conv1.weight': np.zeros(1)}, _reference_config(), {},
                               origin='other.pt', camera=False)


# -- the student after the camera branch ---------------------------------------------------------

def test_student_tail_parity():
  """topdown [1, 64, 48, 96] -> heads and bev_small; unused reference blocks ignored by name."""
  canvas = (48, 96)
  config = _reference_config(canvas)
  assert schema.bev_shape(config.data.bev_x, config.data.bev_y) == canvas
  torch_model = ref.randomize_(ref.StudentTail(canvas=canvas), 4).eval()
  x = np.random.default_rng(2).normal(size=(1, *canvas, 64)).astype(np.float32)
  x = np.maximum(x, 0)   # the camera branch ends in a ReLU / max over cameras
  with torch.no_grad():
    theirs = torch_model(_nchw(x))
  student = Student(config)
  abstract = jax.eval_shape(lambda: student.init(
      jax.random.key(0), jnp.asarray(x), train=False, method=Student.decode))
  variables, report = pmapnet.convert_state_dict(
      {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, config, abstract,
      origin='tail.pt', camera=False)
  assert set(report['ignored']) >= {k for k in torch_model.state_dict()
                                    if k.startswith(('input_proj.', 'conv_osm.', 'conv_up.'))}
  ours = jax.jit(lambda v, b: student.apply(v, b, train=False, method=Student.decode))(
      variables, jnp.asarray(x))
  for name in (*HEAD_NAMES, 'bev_small'):
    _assert_close(ours[name], _nhwc(theirs[name]), f'student tail {name}')


# -- the converted checkpoint's training state and the CLI ---------------------------------------

def test_fresh_train_extra_matches_the_trainers_state():
  """The optimizer state and TGPD projectors saved beside converted weights have the tree,
  shapes and dtypes of trainer.initial_state's (what restore_train reads on resume). Traced
  only: running the trainer's init costs ~10-80 s here."""
  import functools
  from mapkd_jax.train import stages, trainer
  from mapkd_jax.train import step as step_lib
  config = ml_collections.FrozenConfigDict(tcs.get_config('student,tiny'))
  dummy = {k: jnp.zeros(s, d) for k, (s, d) in stages.batch_spec(config, 1).items()}
  models = step_lib.make_models(config)
  init_state = functools.partial(step_lib.init_state, batch=dummy, models=models,
                                 tgpd=step_lib.make_tgpd(config),
                                 tx=step_lib.make_optimizer(config), config=config)
  state = jax.eval_shape(init_state, jax.random.key(0))
  out, variables = jax.eval_shape(lambda: models['student'].init_with_output(
      jax.random.key(0), dummy, train=False))
  variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), variables)
  ours = pmapnet._fresh_train_extra(config, variables, out['bev_small'])
  theirs = trainer._train_extra_of(state)
  assert set(ours['aux']) == {'tgpd_teacher', 'tgpd_coach'}
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(
      f'{a.shape} {a.dtype} vs {b.shape} {b.dtype}'), ours, theirs)


def test_cli_errors(tmp_path):
  """`python -m mapkd_jax.convert pmapnet` exits with a message naming the problem."""
  from mapkd_jax.convert import __main__ as cli
  def run(path, stage):
    return cli.main(['pmapnet', '--input', str(path), '--config', f'configs/tcs.py:{stage}',
                     '--workdir', str(tmp_path / 'root')])
  with pytest.raises(SystemExit, match='missing.pt: no such file'):
    run(tmp_path / 'missing.pt', 'student')
  path = tmp_path / 'tiny.pt'
  torch.save({'conv1.weight': torch.zeros(1)}, path)
  with pytest.raises(SystemExit, match=r'not a MapKD coach .*missing: .*expand_to_128'):
    run(path, 'coach')
  with pytest.raises(SystemExit, match=r'not a P-MapNet teacher .*missing: .*conv_bev'):
    run(path, 'teacher')
  with pytest.raises(SystemExit, match=r'not a MapKD student .*missing: .*bevencode'):
    run(path, 'student')
  assert not (tmp_path / 'root' / 'student' / 'checkpoints').exists()
