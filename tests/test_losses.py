"""Losses against slow numpy / Python-loop oracles (`*_ref`), plus gradient and jit checks."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mapkd_jax import losses

RTOL, ATOL = 2e-5, 1e-6


def _jit(fn, **static):
  """fn jitted with keyword arguments bound: one compile instead of op-by-op dispatch."""
  return jax.jit(functools.partial(fn, **static))


# ----------------------------------------------------------------------------- oracles

def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _bce_ref(x, y, pos_weight=1.0):
  p = _sigmoid(float(x))
  return -(pos_weight * y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def _semantic_ref(logits, labels, pos_weight, mask=None):
  b, h, w, k = logits.shape
  total, count = 0.0, 0
  for i in range(b):
    for r in range(h):
      for c in range(w):
        if mask is not None and not mask[i, r, c]:
          continue
        for ch in range(k):
          total += _bce_ref(logits[i, r, c, ch], float(labels[i, r, c] == ch), pos_weight)
        count += 1
  return total / (count * k) if count else 0.0


def _discriminative_ref(embedding, instance, delta_v, delta_d, max_instances):
  """HDMapNet's DiscriminativeLoss, one sample and one instance at a time."""
  b = embedding.shape[0]
  pull = push = reg = 0.0
  for i in range(b):
    ids = [v for v in np.unique(instance[i]) if 0 < v <= max_instances]
    n = len(ids)
    if n == 0:
      continue
    means = []
    for v in ids:
      pixels = embedding[i][instance[i] == v].astype(np.float64)  # [P, E]
      mean = pixels.mean(axis=0)
      means.append(mean)
      dist = np.linalg.norm(pixels - mean, axis=1)
      pull += np.mean(np.maximum(dist - delta_v, 0.0) ** 2) / n
    if n > 1:
      acc = 0.0
      for a in range(n):
        for c in range(n):
          if a != c:
            acc += max(delta_d - np.linalg.norm(means[a] - means[c]), 0.0) ** 2
      push += acc / (n * (n - 1)) / 2.0
    reg += np.mean([np.linalg.norm(m) for m in means])
  return pull / b, push / b, reg / b


def _direction_ref(logits, forward, backward):
  """HDMapNet's direction loss, one pixel and one channel at a time."""
  b, h, w, k = logits.shape
  total, weight_sum = 0.0, 0.0
  for i in range(b):
    for r in range(h):
      for c in range(w):
        target = np.zeros(k)
        target[int(forward[i, r, c])] += 1.0
        target[int(backward[i, r, c])] += 1.0
        target /= target.sum()
        weight = 1.0 - target[0]   # the reference's lane_mask
        z = logits[i, r, c].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        for ch in range(k):
          log_p = max(math.log(p[ch]), -100.0) if p[ch] > 0 else -100.0
          log_1mp = max(math.log(1 - p[ch]), -100.0) if p[ch] < 1 else -100.0
          total += weight * -(target[ch] * log_p + (1 - target[ch]) * log_1mp)
        weight_sum += weight
  return total / (weight_sum * k + 1e-6)


def _direction_labels(rng, shape, line_fraction):
  """Forward bins and backward bins that are the opposite, the same or another bin."""
  forward = rng.integers(1, 37, shape)
  opposite = (forward - 1 + 18) % 36 + 1
  pick = rng.random(shape)
  backward = np.where(pick < 0.5, opposite, np.where(pick < 0.75, forward,
                                                      rng.integers(1, 37, shape)))
  on_line = rng.random(shape) < line_fraction
  return (np.where(on_line, forward, 0).astype(np.int32),
          np.where(on_line, backward, 0).astype(np.int32))


def _msrd_ref(student, teacher, labels, temperature, variant):
  b, h, w, k = student.shape
  total, count = 0.0, 0
  for i in range(b):
    for r in range(h):
      for c in range(w):
        if labels[i, r, c] == 0:
          continue
        count += 1
        s, t = student[i, r, c].astype(np.float64), teacher[i, r, c].astype(np.float64)
        if variant == 'bce':
          total += np.mean([_bce_ref(s[ch], _sigmoid(t[ch] / temperature)) for ch in range(k)])
        else:
          pt = np.exp(t / temperature) / np.sum(np.exp(t / temperature))
          ps = np.exp(s / temperature) / np.sum(np.exp(s / temperature))
          total += np.sum(pt * (np.log(pt) - np.log(ps))) * temperature**2
  return total / count if count else 0.0


def _patches_ref(bev, patch_size):
  b, h, w, c = bev.shape
  ph, pw = patch_size
  out = []
  for i in range(b):
    patches = []
    for gr in range(h // ph):
      for gc in range(w // pw):
        vec = []
        for r in range(ph):
          for col in range(pw):
            for ch in range(c):
              vec.append(bev[i, gr * ph + r, gc * pw + col, ch])
        patches.append(vec)
    out.append(patches)
  return np.asarray(out)


def _softmax_rows(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _tgpd_terms_ref(student_bev, teacher_bev, student_tokens, teacher_tokens, temperature):
  b, t, d = student_tokens.shape
  kl = 0.0
  for i in range(b):
    xs, xt = student_tokens[i].astype(np.float64), teacher_tokens[i].astype(np.float64)
    a_s = _softmax_rows(xs @ xs.T / math.sqrt(d) / temperature)
    a_t = _softmax_rows(xt @ xt.T / math.sqrt(d) / temperature)
    for row in range(t):
      kl += np.sum(a_t[row] * (np.log(a_t[row]) - np.log(a_s[row])))
  attention = kl / (b * t) * temperature**2
  feature = np.mean((student_bev.astype(np.float64) - teacher_bev) ** 2)
  return attention, feature


def _projector_ref(params, student_bev, teacher_bev, patch_size, eps):
  def tokens(bev):
    patches = _patches_ref(bev, patch_size).astype(np.float64)
    toks = np.concatenate([patches.mean(axis=1, keepdims=True), patches], axis=1)
    mean = toks.mean(axis=-1, keepdims=True)
    var = toks.var(axis=-1, keepdims=True)
    return (toks - mean) / np.sqrt(var + eps)
  proj = params['student_proj']
  student = tokens(student_bev) @ np.asarray(proj['kernel']) + np.asarray(proj['bias'])
  teacher = tokens(teacher_bev) @ np.asarray(params['teacher_proj'])
  return student, teacher


def _mae_ref(reconstruction, target, mask, kind, pos_weight):
  b, h, w, k = reconstruction.shape
  total, count = 0.0, 0
  for i in range(b):
    for r in range(h):
      for c in range(w):
        if not mask[i, r, c]:
          continue
        count += 1
        for ch in range(k):
          x, y = reconstruction[i, r, c, ch], target[i, r, c, ch]
          total += _bce_ref(x, y, pos_weight) if kind == 'bce' else (x - y) ** 2
  return total / (count * k) if count else 0.0


# ----------------------------------------------------------------------------- helpers

def _rng(seed):
  return np.random.default_rng(seed)


def _instances(rng, shape, num_ids):
  """Random blob-free instance map with ids 1..num_ids (0 = none) on ~half the pixels."""
  ids = rng.integers(1, num_ids + 1, size=shape) if num_ids else np.zeros(shape, np.int64)
  return np.where(rng.random(shape) < 0.5, ids, 0).astype(np.int32)


SHAPES = [(1, 4, 6), (3, 5, 7)]


# ----------------------------------------------------------------------------- semantic

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('pos_weight', [1.0, 2.13])
@pytest.mark.parametrize('case', ['random', 'all_background', 'masked', 'all_masked'])
def test_semantic_loss_matches_ref(shape, pos_weight, case):
  rng = _rng(0)
  logits = rng.normal(0, 3, shape + (4,)).astype(np.float32)
  labels = rng.integers(0, 4, shape).astype(np.int32)
  if case == 'all_background':
    labels[:] = 0
  mask = None
  if case == 'masked':
    mask = rng.random(shape) < 0.5
  if case == 'all_masked':
    mask = np.zeros(shape, bool)
  got = _jit(losses.semantic_loss, pos_weight=pos_weight)(
      logits, labels, mask=None if mask is None else jnp.asarray(mask))
  np.testing.assert_allclose(got, _semantic_ref(logits, labels, pos_weight, mask),
                             rtol=RTOL, atol=ATOL)


def test_bce_with_logits_large_logits_finite():
  x = jnp.array([-200.0, -50.0, 0.0, 50.0, 200.0])
  for y in (0.0, 1.0):
    value = losses.bce_with_logits(x, jnp.full_like(x, y), pos_weight=2.0)
    assert np.all(np.isfinite(value))


# ----------------------------------------------------------------------------- discriminative

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('num_ids', [0, 1, 2, 5])
def test_discriminative_loss_matches_ref(shape, num_ids):
  rng = _rng(num_ids)
  embedding = rng.normal(0, 1.5, shape + (3,)).astype(np.float32)
  instance = _instances(rng, shape, num_ids)
  got = _jit(losses.discriminative_loss, delta_v=0.5, delta_d=3.0, max_instances=8)(
      embedding, instance)
  pull, push, reg = _discriminative_ref(embedding, instance, 0.5, 3.0, 8)
  np.testing.assert_allclose(got['pull'], pull, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got['push'], push, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got['reg'], reg, rtol=RTOL, atol=ATOL)
  assert float(got['overflow_pixels']) == 0.0


def test_discriminative_loss_sparse_ids_and_overflow():
  """Non-contiguous ids, one sample empty, ids above max_instances ignored and counted."""
  rng = _rng(3)
  embedding = rng.normal(0, 1.0, (3, 6, 6, 4)).astype(np.float32)
  instance = np.zeros((3, 6, 6), np.int32)
  instance[0, :2, :] = 7
  instance[0, 4:, :3] = 2
  instance[0, 5, 5] = 9     # one-pixel instance
  instance[1, 3, :] = 12    # above max_instances = 9: ignored
  instance[1, 0, :] = 4
  got = _jit(losses.discriminative_loss, delta_v=0.2, delta_d=2.0, max_instances=9)(
      embedding, instance)
  pull, push, reg = _discriminative_ref(embedding, instance, 0.2, 2.0, 9)
  np.testing.assert_allclose([got['pull'], got['push'], got['reg']], [pull, push, reg],
                             rtol=RTOL, atol=ATOL)
  assert float(got['overflow_pixels']) == 6.0


@pytest.mark.parametrize('num_ids', [0, 1, 3])
def test_discriminative_grads_finite(num_ids):
  rng = _rng(5)
  embedding = jnp.asarray(rng.normal(0, 1.0, (2, 4, 5, 3)).astype(np.float32))
  instance = _instances(rng, (2, 4, 5), num_ids)
  instance[0, 0, 0] = 1 if num_ids else 0   # a pixel that may be its instance's mean
  def fn(e):
    terms = losses.discriminative_loss(e, instance, delta_v=0.5, delta_d=3.0, max_instances=4)
    return terms['pull'] + terms['push'] + terms['reg']
  grads = np.asarray(jax.jit(jax.grad(fn))(embedding))
  assert np.all(np.isfinite(grads))
  background = instance == 0
  np.testing.assert_array_equal(grads[background], 0.0)
  if num_ids:
    assert np.any(grads[~background] != 0)


# ----------------------------------------------------------------------------- direction

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('case', ['random', 'no_lines', 'all_lines', 'one_sided'])
def test_direction_loss_matches_ref(shape, case):
  rng = _rng(1)
  logits = rng.normal(0, 2, shape + (37,)).astype(np.float32)
  line_fraction = {'random': 0.4, 'no_lines': 0.0, 'all_lines': 1.0, 'one_sided': 0.6}[case]
  forward, backward = _direction_labels(rng, shape, line_fraction)
  if case == 'one_sided':
    # Pixels on one mask only: target 0.5 on channel 0, weight 0.5 in the reference.
    forward = np.where(rng.random(shape) < 0.3, 0, forward).astype(np.int32)
    backward = np.where(rng.random(shape) < 0.3, 0, backward).astype(np.int32)
  got = jax.jit(losses.direction_loss)(logits, forward, backward)
  np.testing.assert_allclose(got, _direction_ref(logits, forward, backward), rtol=RTOL, atol=ATOL)
  if case == 'no_lines':
    assert float(got) == 0.0


def test_direction_targets_match_loop():
  rng = _rng(3)
  forward, backward = _direction_labels(rng, (2, 5, 7), 0.7)
  forward[0, 0, :3] = [0, 5, 0]
  backward[0, 0, :3] = [0, 0, 23]
  targets = np.asarray(losses.direction_targets(forward, backward, num_bins=36))
  expected = np.zeros((2, 5, 7, 37))
  for index in np.ndindex(forward.shape):
    expected[index][forward[index]] += 1.0
    expected[index][backward[index]] += 1.0
    expected[index] /= expected[index].sum()
  np.testing.assert_allclose(targets, expected)
  # Hand-checked pixels: off lines, forward only, backward only.
  np.testing.assert_allclose(targets[0, 0, 0, 0], 1.0)
  np.testing.assert_allclose(targets[0, 0, 1, [0, 5]], [0.5, 0.5])
  np.testing.assert_allclose(targets[0, 0, 2, [0, 23]], [0.5, 0.5])
  same = (forward == backward) & (forward > 0)
  assert same.any() and np.all(targets[same].max(-1) == 1.0)


def test_direction_grads_zero_off_lines():
  rng = _rng(2)
  logits = jnp.asarray(rng.normal(0, 1, (2, 4, 4, 37)).astype(np.float32))
  forward, backward = _direction_labels(rng, (2, 4, 4), 0.5)
  grads = np.asarray(jax.jit(jax.grad(losses.direction_loss))(logits, forward, backward))
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[forward == 0], 0.0)
  assert np.all(np.abs(grads[forward > 0]).sum(-1) > 0)


# ----------------------------------------------------------------------------- task_loss

def test_task_loss_combines_terms_and_jits():
  rng = _rng(4)
  b, h, w = 2, 6, 8
  outputs = {'semantic': rng.normal(0, 1, (b, h, w, 4)).astype(np.float32),
             'embedding': rng.normal(0, 1, (b, h, w, 5)).astype(np.float32),
             'direction': rng.normal(0, 1, (b, h, w, 37)).astype(np.float32)}
  batch = {'semantic': rng.integers(0, 4, (b, h, w)).astype(np.int32),
           'instance': _instances(rng, (b, h, w), 4)}
  batch['direction'], batch['direction_backward'] = _direction_labels(rng, (b, h, w), 0.3)
  kwargs = dict(pos_weight=2.13, instance_weight=0.1, direction_weight=0.2, delta_v=0.5,
                delta_d=3.0, max_instances=6)
  loss, metrics = losses.task_loss(outputs, batch, **kwargs)
  pull, push, _ = _discriminative_ref(outputs['embedding'], batch['instance'], 0.5, 3.0, 6)
  direction = _direction_ref(outputs['direction'], batch['direction'],
                             batch['direction_backward'])
  expected = (_semantic_ref(outputs['semantic'], batch['semantic'], 2.13)
              + 0.1 * (pull + push) + 0.2 * direction)
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
  np.testing.assert_allclose(metrics['loss/task'], loss)
  for key in ('loss/semantic', 'loss/instance', 'loss/direction', 'loss/instance_reg'):
    assert key in metrics
  jit_loss, jit_metrics = jax.jit(lambda o, bt: losses.task_loss(o, bt, **kwargs))(outputs, batch)
  np.testing.assert_allclose(jit_loss, loss, rtol=1e-6)
  for key, value in metrics.items():
    np.testing.assert_allclose(jit_metrics[key], value, rtol=1e-5, atol=1e-7)
  grads = jax.jit(jax.grad(lambda o: losses.task_loss(o, batch, **kwargs)[0]))(outputs)
  for key, g in grads.items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), key


def test_task_loss_missing_key_raises():
  with pytest.raises(ValueError, match='embedding'):
    losses.task_loss({'semantic': np.zeros((1, 2, 2, 4)), 'direction': np.zeros((1, 2, 2, 37))},
                     {}, pos_weight=1.0, instance_weight=0.1, direction_weight=0.1, delta_v=0.5,
                     delta_d=3.0, max_instances=4)


# ----------------------------------------------------------------------------- MSRD

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('variant', ['bce', 'kl'])
@pytest.mark.parametrize('temperature', [1.0, 2.5])
@pytest.mark.parametrize('case', ['random', 'one_foreground_pixel', 'empty_class'])
def test_msrd_matches_ref(shape, variant, temperature, case):
  rng = _rng(6)
  student = rng.normal(0, 2, shape + (4,)).astype(np.float32)
  teacher = rng.normal(0, 2, shape + (4,)).astype(np.float32)
  labels = rng.integers(0, 4, shape).astype(np.int32)
  if case == 'one_foreground_pixel':
    labels[:] = 0
    labels[0, 1, 2] = 3
  if case == 'empty_class':
    labels[labels == 2] = 0
  got = _jit(losses.msrd_loss, temperature=temperature, variant=variant)(student, teacher, labels)
  np.testing.assert_allclose(got, _msrd_ref(student, teacher, labels, temperature, variant),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('variant', ['bce', 'kl'])
@pytest.mark.parametrize('temperature', [1.0, 3.0])
def test_msrd_no_foreground_is_exact_zero_with_finite_grads(variant, temperature):
  rng = _rng(7)
  student = jnp.asarray(rng.normal(0, 50, (2, 3, 5, 4)).astype(np.float32))
  teacher = jnp.asarray(rng.normal(0, 50, (2, 3, 5, 4)).astype(np.float32))
  labels = jnp.zeros((2, 3, 5), jnp.int32)
  fn = lambda s: losses.msrd_loss(s, teacher, labels, temperature=temperature, variant=variant)
  assert float(fn(student)) == 0.0
  assert float(jax.jit(fn)(student)) == 0.0
  grads = np.asarray(jax.jit(jax.grad(fn))(student))
  assert np.all(np.isfinite(grads)) and np.all(grads == 0.0)


@pytest.mark.parametrize('variant', ['bce', 'kl'])
def test_msrd_grads_only_on_foreground_and_jit(variant):
  rng = _rng(8)
  student = jnp.asarray(rng.normal(0, 1, (2, 4, 6, 4)).astype(np.float32))
  teacher = jnp.asarray(rng.normal(0, 1, (2, 4, 6, 4)).astype(np.float32))
  labels = rng.integers(0, 4, (2, 4, 6)).astype(np.int32)
  fn = lambda s, t: losses.msrd_loss(s, t, labels, temperature=2.0, variant=variant)
  np.testing.assert_allclose(jax.jit(fn)(student, teacher), fn(student, teacher), rtol=1e-6)
  grad_s, grad_t = jax.jit(jax.grad(fn, argnums=(0, 1)))(student, teacher)
  grad_s = np.asarray(grad_s)
  np.testing.assert_array_equal(grad_s[labels == 0], 0.0)
  assert np.all(np.abs(grad_s[labels != 0]).sum(-1) > 0)
  np.testing.assert_array_equal(np.asarray(grad_t), 0.0)   # teacher is a constant


def test_msrd_bad_variant_and_temperature_raise():
  x = np.zeros((1, 2, 2, 4), np.float32)
  labels = np.ones((1, 2, 2), np.int32)
  with pytest.raises(ValueError, match='msrd_variant'):
    losses.msrd_loss(x, x, labels, variant='mse')
  with pytest.raises(ValueError, match='msrd_temperature'):
    losses.msrd_loss(x, x, labels, temperature=0.0)


# ----------------------------------------------------------------------------- TGPD

@pytest.mark.parametrize('bev_shape,patch_size', [
    ((2, 4, 6, 3), (2, 3)),     # 2 x 2 grid
    ((1, 5, 10, 2), (5, 5)),    # 1 x 2 grid
    ((2, 3, 4, 2), (3, 4)),     # one patch
    ((1, 6, 4, 1), (1, 1)),     # every pixel a patch
])
def test_extract_patches_matches_loop(bev_shape, patch_size):
  bev = _rng(9).normal(size=bev_shape).astype(np.float32)
  np.testing.assert_array_equal(losses.extract_patches(bev, patch_size),
                                _patches_ref(bev, patch_size))
  tokens = np.asarray(losses.patch_tokens(bev, patch_size))
  np.testing.assert_allclose(tokens[:, 0], _patches_ref(bev, patch_size).mean(axis=1), rtol=1e-5,
                             atol=1e-6)


def test_reference_map_gives_50_patches():
  bev = np.zeros((1, 25, 50, 2), np.float32)
  assert losses.extract_patches(bev, (5, 5)).shape == (1, 50, 50)


def test_projector_reference_size():
  """bev_small 25 x 50 x 192, 5 x 5 patches: 51 tokens; teacher side orthonormal columns."""
  bev = _rng(15).normal(size=(1, 25, 50, 192)).astype(np.float32)
  projector = losses.TGPDProjector(patch_size=(5, 5), embed_dim=64)
  variables = jax.jit(projector.init)(jax.random.key(0), bev, bev)
  student_tokens, teacher_tokens = jax.jit(projector.apply)(variables, bev, bev)
  assert student_tokens.shape == teacher_tokens.shape == (1, 51, 64)
  kernel = np.asarray(variables['params']['teacher_proj'])
  assert kernel.shape == (5 * 5 * 192, 64)
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(64), atol=1e-4)


def test_extract_patches_bad_size_raises():
  with pytest.raises(ValueError, match='tgpd_patch_size'):
    losses.extract_patches(np.zeros((1, 25, 50, 2)), (4, 5))


def _tgpd_setup(seed, bev_shape, teacher_channels, patch_size, embed_dim):
  rng = _rng(seed)
  student_bev = rng.normal(0, 1, bev_shape).astype(np.float32)
  teacher_bev = rng.normal(0.5, 2, bev_shape[:-1] + (teacher_channels,)).astype(np.float32)
  projector = losses.TGPDProjector(patch_size=patch_size, embed_dim=embed_dim)
  params = projector.init(jax.random.key(seed), student_bev, teacher_bev)['params']
  return projector, params, student_bev, teacher_bev


@pytest.mark.parametrize('bev_shape,teacher_channels,patch_size', [
    ((2, 4, 6, 3), 3, (2, 3)),
    ((1, 5, 10, 2), 4, (5, 5)),   # channels differ between sides
    ((2, 3, 4, 2), 2, (3, 4)),    # one patch: 2 tokens
])
@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_tgpd_matches_ref(bev_shape, teacher_channels, patch_size, temperature):
  projector, params, student_bev, teacher_bev = _tgpd_setup(
      10, bev_shape, teacher_channels, patch_size, embed_dim=8)
  student_tokens, teacher_tokens = projector.apply({'params': params}, student_bev, teacher_bev)
  ref_s, ref_t = _projector_ref(params, student_bev, teacher_bev, patch_size,
                                projector.norm_epsilon)
  np.testing.assert_allclose(student_tokens, ref_s, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(teacher_tokens, ref_t, rtol=1e-4, atol=1e-4)

  # The loss is checked on the module's tokens; the MSE needs equal map shapes.
  teacher_same = teacher_bev[..., :bev_shape[-1]] if teacher_channels >= bev_shape[-1] else None
  terms = losses.tgpd_terms(student_bev, teacher_same, student_tokens, teacher_tokens,
                            temperature=temperature)
  attention, feature = _tgpd_terms_ref(student_bev, teacher_same, np.asarray(student_tokens),
                                       np.asarray(teacher_tokens), temperature)
  np.testing.assert_allclose(terms['attention'], attention, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(terms['feature'], feature, rtol=1e-5)
  loss = losses.tgpd_loss(student_bev, teacher_same, student_tokens, teacher_tokens,
                          temperature=temperature, attention_weight=0.7, feature_weight=0.3)
  np.testing.assert_allclose(loss, 0.7 * attention + 0.3 * feature, rtol=1e-4)


def test_tgpd_identical_maps_and_tokens_give_zero():
  student_bev = _rng(11).normal(size=(1, 4, 6, 3)).astype(np.float32)
  tokens = _rng(0).normal(size=(1, 5, 4)).astype(np.float32)
  loss = losses.tgpd_loss(student_bev, student_bev, tokens, tokens, temperature=1.0,
                          attention_weight=1.0, feature_weight=1.0)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_tgpd_shape_mismatch_raises():
  tokens = np.zeros((1, 3, 4), np.float32)
  with pytest.raises(ValueError, match='MSE'):
    losses.tgpd_terms(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 4)), tokens, tokens,
                      temperature=1.0)


def _tgpd_objective(projector, student_bev, teacher_bev):
  def fn(params, student_bev=student_bev):
    s_tok, t_tok = projector.apply({'params': params}, student_bev, teacher_bev)
    return losses.tgpd_loss(student_bev, teacher_bev, s_tok, t_tok, temperature=1.0,
                            attention_weight=1.0, feature_weight=1.0)
  return fn


def test_tgpd_grads_and_jit():
  projector, params, student_bev, teacher_bev = _tgpd_setup(12, (2, 4, 6, 3), 3, (2, 3), 8)
  fn = _tgpd_objective(projector, student_bev, teacher_bev)
  np.testing.assert_allclose(jax.jit(fn)(params), fn(params), rtol=1e-5)
  grads = jax.jit(jax.grad(fn))(params)
  np.testing.assert_array_equal(grads['teacher_proj'], 0.0)   # fixed teacher side
  for leaf in jax.tree.leaves(grads['student_proj']):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
  bev_grad = np.asarray(jax.jit(jax.grad(lambda b: fn(params, b)))(jnp.asarray(student_bev)))
  assert np.all(np.isfinite(bev_grad)) and np.any(bev_grad != 0)


def test_tgpd_projection_learns_without_collapse():
  """Training the projector lowers the attention KL by matching, not by going uniform."""
  rng = _rng(13)
  # Teacher features with structure: patches share one of two prototypes plus noise, so the
  # teacher attention map is far from uniform.
  prototypes = rng.normal(0, 1, (2, 2, 3, 4))
  assign = rng.integers(0, 2, (2, 4))
  teacher_bev = np.zeros((1, 4, 12, 4), np.float32)
  for gr in range(2):
    for gc in range(4):
      teacher_bev[0, gr * 2:(gr + 1) * 2, gc * 3:(gc + 1) * 3] = prototypes[assign[gr, gc]]
  teacher_bev += rng.normal(0, 0.1, teacher_bev.shape).astype(np.float32)
  student_bev = (teacher_bev[..., :3] + rng.normal(0, 0.3, (1, 4, 12, 3))).astype(np.float32)
  projector = losses.TGPDProjector(patch_size=(2, 3), embed_dim=8)
  params = projector.init(jax.random.key(0), student_bev, teacher_bev)['params']

  def attention_kl(p):
    s_tok, t_tok = projector.apply({'params': p}, student_bev, teacher_bev)
    return losses.tgpd_terms(student_bev, student_bev, s_tok, t_tok, temperature=1.0)['attention']

  # Collapse (student projection zero -> uniform attention) is not a minimizer: it costs a
  # clearly positive KL against the fixed teacher attention.
  collapsed = jax.tree.map(jnp.zeros_like, params)
  collapsed['teacher_proj'] = params['teacher_proj']
  collapsed_kl = float(attention_kl(collapsed))
  assert collapsed_kl > 0.1

  tx = optax.adam(0.05)
  opt_state = tx.init(params)
  start_kl = float(attention_kl(params))
  step = jax.jit(lambda p, s: _adam_step(p, s, attention_kl, tx))
  trained = params
  for _ in range(150):
    trained, opt_state = step(trained, opt_state)
  end_kl = float(attention_kl(trained))
  assert end_kl < 0.5 * start_kl and end_kl < 0.5 * collapsed_kl
  np.testing.assert_array_equal(trained['teacher_proj'], params['teacher_proj'])
  assert float(jnp.linalg.norm(trained['student_proj']['kernel'])) > 0.5 * float(
      jnp.linalg.norm(params['student_proj']['kernel']))
  # The student's attention reaches the teacher's (non-uniform) sharpness, not uniformity.
  s_tok, t_tok = projector.apply({'params': trained}, student_bev, teacher_bev)
  student_entropy, teacher_entropy = (_mean_row_entropy(tok) for tok in (s_tok, t_tok))
  assert teacher_entropy < math.log(s_tok.shape[1]) - 0.1
  assert abs(student_entropy - teacher_entropy) < 0.02


def _mean_row_entropy(tokens):
  rows = jax.nn.softmax(losses.token_attention_logits(tokens), axis=-1)
  return float(jnp.mean(-jnp.sum(rows * jnp.log(rows), axis=-1)))


def _adam_step(params, opt_state, loss_fn, tx):
  grads = jax.grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


# ----------------------------------------------------------------------------- MAE

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('kind,pos_weight', [('bce', 1.0), ('bce', 2.13), ('mse', 1.0)])
@pytest.mark.parametrize('case', ['random', 'nothing_masked', 'all_masked'])
def test_mae_loss_matches_ref(shape, kind, pos_weight, case):
  rng = _rng(14)
  reconstruction = rng.normal(0, 2, shape + (4,)).astype(np.float32)
  target = np.eye(4, dtype=np.float32)[rng.integers(0, 4, shape)]
  mask = rng.random(shape) < 0.5
  if case == 'nothing_masked':
    mask[:] = False
  if case == 'all_masked':
    mask[:] = True
  loss_fn = _jit(losses.mae_loss, kind=kind, pos_weight=pos_weight)
  got = loss_fn(reconstruction, target, mask.astype(np.float32))
  np.testing.assert_allclose(got, _mae_ref(reconstruction, target, mask, kind, pos_weight),
                             rtol=RTOL, atol=ATOL)
  grads = np.asarray(jax.jit(jax.grad(loss_fn))(reconstruction, target, mask))
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[~mask], 0.0)
  if mask.any():
    assert np.all(np.abs(grads[mask]).sum(-1) > 0)


def test_mae_loss_bad_kind_raises():
  x = np.zeros((1, 2, 2, 4), np.float32)
  with pytest.raises(ValueError, match='kind'):
    losses.mae_loss(x, x, np.ones((1, 2, 2)), kind='l1')
