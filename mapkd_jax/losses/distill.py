"""Distillation losses: MSRD (masked semantic response) and TGPD (token-guided 2D patches).

Teacher-side inputs are wrapped in `stop_gradient` here too, so a caller that forgets to freeze
them still cannot push gradients into a frozen model.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mapkd_jax.losses import task

MSRD_VARIANTS = ('bce', 'kl')


def _check_temperature(temperature, name):
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'{name} must be > 0, got {temperature}')


def msrd_loss(student_logits, teacher_logits, semantic_label, *, temperature=1.0, variant='bce'):
  """Masked semantic response distillation on ground-truth foreground pixels.

  Args:
    student_logits: [B, H, W, K] semantic logits of the trained model.
    teacher_logits: [B, H, W, K] semantic logits of the frozen model.
    semantic_label: [B, H, W] int ground truth; foreground = label != 0.
    temperature: T > 0 (config.kd.msrd_temperature).
    variant: 'bce' = BCE-with-logits(student, sigmoid(teacher / T)) averaged over foreground
      pixels and the K channels (the MapKD reference, T = 1); 'kl' = KL(softmax(teacher / T) ||
      softmax(student / T)) * T^2 averaged over foreground pixels (config.kd.msrd_variant).

  Returns:
    Scalar; exactly 0.0 with zero gradients when there is no foreground pixel.
  """
  if variant not in MSRD_VARIANTS:
    raise ValueError(f'variant (config.kd.msrd_variant) must be one of {MSRD_VARIANTS}, '
                     f'got {variant!r}')
  _check_temperature(temperature, 'temperature (config.kd.msrd_temperature)')
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'msrd_loss: student logits {student_logits.shape} and teacher logits '
                     f'{teacher_logits.shape} differ')
  student = student_logits.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  foreground = semantic_label != 0
  if variant == 'bce':
    per_pixel = jnp.mean(task.bce_with_logits(student, jax.nn.sigmoid(teacher / temperature)),
                         axis=-1)
  else:
    log_p_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(student / temperature, axis=-1)
    per_pixel = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    per_pixel = per_pixel * temperature**2
  return task.masked_mean(per_pixel, foreground)


def extract_patches(bev, patch_size):
  """Non-overlapping 2D patches, row-major over the patch grid.

  Args:
    bev: [B, h, w, C] feature map.
    patch_size: (ph, pw); must divide (h, w).

  Returns:
    [B, (h // ph) * (w // pw), ph * pw * C]; patch n = (n // (w // pw), n % (w // pw)) of the
    grid, flattened in (row, column, channel) order.
  """
  b, h, w, c = bev.shape
  ph, pw = patch_size
  if ph < 1 or pw < 1 or h % ph or w % pw:
    raise ValueError(f'patch_size (config.kd.tgpd_patch_size) {tuple(patch_size)} must divide '
                     f'the bev_small map ({h}, {w})')
  grid = bev.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return grid.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def patch_tokens(bev, patch_size):
  """[global token, patches]: [B, 1 + N, ph * pw * C].

  The global token is the mean patch, i.e. the map spatially pooled at patch resolution, so
  it lives in the same space as the patches and shares their projection.
  """
  patches = extract_patches(bev, patch_size)
  return jnp.concatenate([jnp.mean(patches, axis=1, keepdims=True), patches], axis=1)


def token_attention_logits(tokens):
  """X X^T / sqrt(d) for tokens [B, T, d] -> [B, T, T]; softmax is applied once, by the caller."""
  d = tokens.shape[-1]
  return jnp.einsum('bid,bjd->bij', tokens, tokens) / jnp.sqrt(jnp.float32(d))


class TGPDProjector(nn.Module):
  """Token/patch projections of TGPD, part of the trained model's parameters.

  Each side's tokens (`patch_tokens`) are standardized per token (zero mean, unit variance over
  their features, no learned scale), then projected to `embed_dim`:
  - student side: a learned Dense layer (`student_proj`);
  - teacher side: `teacher_proj`, an orthogonal random matrix drawn once at init, stored and
    checkpointed with the other parameters, and always used through `stop_gradient`, so it
    never changes (with a plain Adam its update is exactly 0).

  Why the teacher side is fixed: if both projections were learned against
  KL(A_teacher || A_student), both could shrink to 0 (or to one direction), making both
  attention maps uniform and the loss 0 without transferring anything. With the teacher side
  fixed, A_teacher depends on the teacher features only and is not uniform, so the only way to
  lower the loss is to reproduce the teacher's patch relations. An orthogonal projection of
  standardized tokens keeps their inner products (Johnson-Lindenstrauss), so A_teacher is a
  faithful sketch of softmax over the teacher's own patch similarities, and each projected
  coordinate has unit variance, which keeps X X^T / sqrt(d) in softmax's useful range whatever
  the feature scale. The reference re-drew random projections at every step instead.

  The two input channel counts may differ. One projector per frozen model (teacher, coach).
  The standardization runs in float32; the two projections in `dtype`
  (models.precision.compute_dtype), and the tokens are returned as float32.
  """
  patch_size: tuple[int, int]  # (ph, pw) on bev_small; 5x5 gives 50 patches on 25 x 50
  embed_dim: int               # d of the projected tokens
  norm_epsilon: float = 1e-6   # variance floor of the per-token standardization
  dtype: Any = jnp.float32     # compute dtype of the projections; params stay float32

  def _standardize(self, tokens):
    mean = jnp.mean(tokens, axis=-1, keepdims=True)
    var = jnp.var(tokens, axis=-1, keepdims=True)
    return (tokens - mean) * jax.lax.rsqrt(var + self.norm_epsilon)

  @nn.compact
  def __call__(self, student_bev, teacher_bev):
    """Projects both maps' tokens.

    Args:
      student_bev: [B, h, w, Cs] trained model's bev_small.
      teacher_bev: [B, h, w, Ct] frozen model's bev_small (gradient stopped).

    Returns:
      (student_tokens, teacher_tokens): each [B, 1 + N, embed_dim] float32, token 0 = global.
    """
    student = self._standardize(patch_tokens(student_bev.astype(jnp.float32), self.patch_size))
    teacher = self._standardize(patch_tokens(
        jax.lax.stop_gradient(teacher_bev.astype(jnp.float32)), self.patch_size))
    student_tokens = nn.Dense(self.embed_dim, dtype=self.dtype, name='student_proj')(student)
    teacher_kernel = self.param('teacher_proj', nn.initializers.orthogonal(),
                                (teacher.shape[-1], self.embed_dim), jnp.float32)
    teacher_tokens = teacher.astype(self.dtype) @ jax.lax.stop_gradient(
        teacher_kernel).astype(self.dtype)
    return student_tokens.astype(jnp.float32), teacher_tokens.astype(jnp.float32)


def tgpd_terms(student_bev, teacher_bev, student_tokens, teacher_tokens, *, temperature):
  """The two TGPD terms, unweighted.

  Args:
    student_bev, teacher_bev: [B, h, w, C] bev_small maps (same shape).
    student_tokens, teacher_tokens: [B, 1 + N, d] projected tokens (`TGPDProjector`).
    temperature: T > 0; A = softmax(X X^T / sqrt(d) / T).

  Returns:
    {'attention': KL(A_teacher || A_student) per row, * T^2, mean over rows and batch,
     'feature': mean squared error between the maps}.
  """
  _check_temperature(temperature, 'temperature (config.kd.tgpd_temperature)')
  if student_bev.shape != teacher_bev.shape:
    raise ValueError(f'tgpd: student bev_small {student_bev.shape} and teacher bev_small '
                     f'{teacher_bev.shape} differ; the feature MSE needs equal shapes')
  if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
    raise ValueError(f'tgpd: student tokens {student_tokens.shape} and teacher tokens '
                     f'{teacher_tokens.shape} have different token counts')
  teacher_tokens = jax.lax.stop_gradient(teacher_tokens.astype(jnp.float32))
  teacher_bev = jax.lax.stop_gradient(teacher_bev.astype(jnp.float32))
  log_a_teacher = jax.nn.log_softmax(token_attention_logits(teacher_tokens) / temperature, -1)
  log_a_student = jax.nn.log_softmax(
      token_attention_logits(student_tokens.astype(jnp.float32)) / temperature, -1)
  row_kl = jnp.sum(jnp.exp(log_a_teacher) * (log_a_teacher - log_a_student), axis=-1)
  attention = jnp.mean(row_kl) * temperature**2
  feature = jnp.mean(jnp.square(student_bev.astype(jnp.float32) - teacher_bev))
  return {'attention': attention, 'feature': feature}


def tgpd_loss(student_bev, teacher_bev, student_tokens, teacher_tokens, *, temperature,
              attention_weight, feature_weight):
  """attention_weight * KL(A_teacher || A_student) + feature_weight * MSE; see `tgpd_terms`.

  Unlike the reference (softmax applied twice; KL summed over rows, divided by B only), the
  attention softmax is applied once and the KL is a mean over rows, so its scale does not grow
  with the number of patches.
  """
  terms = tgpd_terms(student_bev, teacher_bev, student_tokens, teacher_tokens,
                     temperature=temperature)
  return attention_weight * terms['attention'] + feature_weight * terms['feature']
