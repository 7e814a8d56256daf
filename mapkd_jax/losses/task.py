"""Task losses of every stage (HDMapNet heads): semantic BCE, discriminative instance, direction.

All functions are pure, keyword-only past the arrays, jit-safe and computed in float32. Rasters
follow `mapkd_jax.data.schema`: `semantic` [B, H, W] int (0 = background), `instance`
[B, H, W] int (0 = none, else a per-sample polyline id), `direction` / `direction_backward`
[B, H, W] int (0 = none, 1..num_bins = bins of 360 / num_bins degrees; the reference's forward
and backward masks).
"""
import jax
import jax.numpy as jnp

# torch.nn.BCELoss clamps log-probabilities at -100 so that p in {0, 1} gives a finite loss;
# the direction loss reproduces that reference behaviour.
_BCE_LOG_CLAMP = -100.0


def masked_mean(values, mask):
  """Mean of `values` where `mask`; exactly 0.0 (finite grads) when `mask` is all False."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, values, 0.0) * mask)
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def bce_with_logits(logits, targets, *, pos_weight=1.0):
  """Elementwise -[pw * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x))], overflow-free.

  Args:
    logits: float array.
    targets: float array in [0, 1], broadcastable to `logits`.
    pos_weight: weight of the positive term (torch's BCEWithLogitsLoss `pos_weight`).
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  # log sigmoid(x) = -softplus(-x) and log(1 - sigmoid(x)) = -x - softplus(-x).
  return (1.0 - targets) * logits + (1.0 + (pos_weight - 1.0) * targets) * jax.nn.softplus(-logits)


def semantic_loss(logits, semantic, *, pos_weight, mask=None):
  """BCE-with-logits over the one-hot semantic channels (channel 0 = background).

  Args:
    logits: [B, H, W, K] semantic logits.
    semantic: [B, H, W] int class labels in [0, K).
    pos_weight: weight of positive targets (DESIGN.md: 2.13).
    mask: optional [B, H, W] bool, pixels that count; default all.

  Returns:
    Scalar: mean over counted pixels and the K channels (0.0 when none count).
  """
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(semantic, num_classes, dtype=jnp.float32)
  per_pixel = jnp.mean(bce_with_logits(logits, targets, pos_weight=pos_weight), axis=-1)
  if mask is None:
    mask = jnp.ones(semantic.shape, bool)
  return masked_mean(per_pixel, mask)


def _safe_norm(x, axis=-1):
  """Euclidean norm whose gradient at 0 is 0 rather than NaN (a 1-pixel instance, i == j)."""
  squared = jnp.sum(jnp.square(x), axis=axis)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _discriminative_one(embedding, instance, *, delta_v, delta_d, max_instances):
  """Discriminative terms of one sample; see `discriminative_loss`."""
  emb = embedding.reshape(-1, embedding.shape[-1]).astype(jnp.float32)
  ids = instance.reshape(-1)
  valid = (ids > 0) & (ids <= max_instances)
  # Segment 0 collects the background (and out-of-range ids); it is never an instance.
  segments = jnp.where(valid, ids, 0)
  num_segments = max_instances + 1
  validf = valid.astype(jnp.float32)
  counts = jax.ops.segment_sum(validf, segments, num_segments=num_segments)
  sums = jax.ops.segment_sum(emb * validf[:, None], segments, num_segments=num_segments)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  present = (counts > 0).at[0].set(False)
  num_present = jnp.sum(present.astype(jnp.float32))

  # Pull: each instance's pixels within delta_v of its mean; mean over pixels, then instances.
  pixel_pull = jnp.square(jax.nn.relu(_safe_norm(emb - means[segments]) - delta_v)) * validf
  instance_pull = jax.ops.segment_sum(pixel_pull, segments, num_segments=num_segments)
  instance_pull = instance_pull / jnp.maximum(counts, 1.0)
  pull = jnp.sum(jnp.where(present, instance_pull, 0.0)) / jnp.maximum(num_present, 1.0)

  # Push: distinct means at least delta_d apart. HDMapNet averages over ordered pairs and then
  # halves the result ("divided by two for double calculated loss"); kept for parity.
  distances = _safe_norm(means[:, None, :] - means[None, :, :])
  pair = present[:, None] & present[None, :] & ~jnp.eye(num_segments, dtype=bool)
  hinge = jnp.where(pair, jnp.square(jax.nn.relu(delta_d - distances)), 0.0)
  num_pairs = num_present * (num_present - 1.0)
  push = jnp.sum(hinge) / jnp.maximum(num_pairs, 1.0) / 2.0

  # Regularization: mean norm of the instance means (HDMapNet computes it but does not use it).
  reg = jnp.sum(jnp.where(present, _safe_norm(means), 0.0)) / jnp.maximum(num_present, 1.0)
  overflow = jnp.sum(((ids > max_instances) | (ids < 0)).astype(jnp.float32))
  return {'pull': pull, 'push': push, 'reg': reg, 'overflow_pixels': overflow}


def discriminative_loss(embedding, instance, *, delta_v, delta_d, max_instances):
  """Discriminative instance loss (De Brabandere et al. 2017, as in HDMapNet).

  Instances of all classes take part; per-instance means come from `jax.ops.segment_sum` over
  the instance ids, so there is no loop over instances. Each term is computed per sample and
  averaged over the batch; a sample with no instance contributes 0 to every term, one with a
  single instance 0 to the push term.

  Args:
    embedding: [B, H, W, E] instance embeddings.
    instance: [B, H, W] int instance ids, 0 = no instance.
    delta_v: pull margin (DESIGN.md: 0.5).
    delta_d: push margin between instance means (DESIGN.md: 3.0).
    max_instances: static upper bound on the ids; pixels with an id above it are ignored and
      counted in 'overflow_pixels' so that a too-small bound is visible in the metrics.

  Returns:
    {'pull', 'push', 'reg', 'overflow_pixels'} scalars ('overflow_pixels' summed, not averaged).
  """
  if max_instances < 1:
    raise ValueError(f'max_instances (config.loss.max_instances) must be >= 1, got {max_instances}')
  per_sample = jax.vmap(lambda e, i: _discriminative_one(
      e, i, delta_v=delta_v, delta_d=delta_d, max_instances=max_instances))(embedding, instance)
  terms = {k: jnp.mean(v) for k, v in per_sample.items() if k != 'overflow_pixels'}
  terms['overflow_pixels'] = jnp.sum(per_sample['overflow_pixels'])
  return terms


def direction_targets(forward, backward, *, num_bins):
  """HDMapNet's direction target: one_hot(forward) + one_hot(backward), normalized per pixel.

  The reference (P-MapNet data_osm/dataset.py; HDMapNet's train loop) adds the one-hots of the
  forward mask (bin of the last segment covering a pixel) and of the backward mask (the reversed
  polyline's bins, first segment kept) over num_bins + 1 channels and divides by their sum over
  channels. So a line pixel gets 0.5 on each of two bins, or 1.0 on one bin where both masks
  agree; a pixel on neither line gets 1.0 on channel 0; a pixel on one mask only (not produced
  by data_prep/labels.py, which draws both on the same pixels) gets 0.5 on channel 0.

  Args:
    forward: [B, H, W] int, 0 = none, 1..num_bins (batch 'direction').
    backward: [B, H, W] int, 0 = none, 1..num_bins (batch 'direction_backward').
    num_bins: number of direction bins (config.data.direction_bins).

  Returns:
    [B, H, W, num_bins + 1] float32 summing to 1 over the last axis (labels must lie in
    0..num_bins; a pixel with both labels out of range gets an all-zero row).
  """
  both = (jax.nn.one_hot(forward, num_bins + 1, dtype=jnp.float32)
          + jax.nn.one_hot(backward, num_bins + 1, dtype=jnp.float32))
  return both / jnp.maximum(jnp.sum(both, axis=-1, keepdims=True), 1.0)


# HDMapNet's train loop divides the masked BCE sum by (mask sum * channels + 1e-6).
_DIRECTION_DENOMINATOR_EPS = 1e-6


def direction_loss(logits, forward, backward):
  """BCE between softmax(logits) and the two-direction target, weighted by the line mask.

  As in HDMapNet's train loop: the per-pixel weight is 1 - target[..., 0] (1 on line pixels, 0
  off lines), the BCE (log clamped at -100 like torch.nn.BCELoss) is summed over the batch,
  pixels and all num_bins + 1 channels with that weight, then divided by
  (sum of weights * (num_bins + 1) + 1e-6).

  Args:
    logits: [B, H, W, num_bins + 1] direction logits (channel 0 = none).
    forward: [B, H, W] int forward direction labels.
    backward: [B, H, W] int backward direction labels.

  Returns:
    Scalar; exactly 0.0 when there is no line pixel.
  """
  num_channels = logits.shape[-1]
  targets = direction_targets(forward, backward, num_bins=num_channels - 1)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # log(1 - p) = log(-expm1(log p)); the floor keeps log finite (and its gradient) at p == 1.
  one_minus_p = -jnp.expm1(log_p)
  log_1mp = jnp.log(jnp.maximum(one_minus_p, jnp.finfo(jnp.float32).tiny))
  log_p = jnp.maximum(log_p, _BCE_LOG_CLAMP)
  log_1mp = jnp.maximum(log_1mp, _BCE_LOG_CLAMP)
  bce = -(targets * log_p + (1.0 - targets) * log_1mp)
  weight = 1.0 - targets[..., 0]
  # where(): a zero weight gives an exactly zero gradient even where the BCE is huge.
  total = jnp.sum(jnp.where(weight[..., None] > 0, bce * weight[..., None], 0.0))
  return total / (jnp.sum(weight) * num_channels + _DIRECTION_DENOMINATOR_EPS)


def task_loss(outputs, batch, *, pos_weight, instance_weight, direction_weight, delta_v,
              delta_d, max_instances):
  """Semantic + instance_weight * (pull + push) + direction_weight * direction.

  Args:
    outputs: {'semantic': [B, H, W, K], 'embedding': [B, H, W, E],
      'direction': [B, H, W, num_bins + 1]} logits/embeddings of a model.
    batch: {'semantic', 'instance', 'direction', 'direction_backward'}: [B, H, W] int labels
      (schema.batch_spec).
    pos_weight, instance_weight, direction_weight, delta_v, delta_d, max_instances: see
      `semantic_loss` and `discriminative_loss` (config.loss).

  Returns:
    (loss, metrics) with flat scalar metrics 'loss/task', 'loss/semantic', 'loss/instance',
    'loss/instance_pull', 'loss/instance_push', 'loss/instance_reg' (logged, not in the loss,
    as in HDMapNet), 'loss/direction' and 'data/instance_overflow_pixels'.
  """
  for key in ('semantic', 'embedding', 'direction'):
    if key not in outputs:
      raise ValueError(f"task_loss: outputs lack {key!r}; got {sorted(outputs)}")
  for key in ('semantic', 'instance', 'direction', 'direction_backward'):
    if key not in batch:
      raise ValueError(f"task_loss: batch lacks {key!r}; got {sorted(batch)}")
  semantic = semantic_loss(outputs['semantic'], batch['semantic'], pos_weight=pos_weight)
  inst = discriminative_loss(outputs['embedding'], batch['instance'], delta_v=delta_v,
                             delta_d=delta_d, max_instances=max_instances)
  instance = inst['pull'] + inst['push']
  direction = direction_loss(outputs['direction'], batch['direction'],
                             batch['direction_backward'])
  loss = semantic + instance_weight * instance + direction_weight * direction
  metrics = {
      'loss/task': loss,
      'loss/semantic': semantic,
      'loss/instance': instance,
      'loss/instance_pull': inst['pull'],
      'loss/instance_push': inst['push'],
      'loss/instance_reg': inst['reg'],
      'loss/direction': direction,
      'data/instance_overflow_pixels': inst['overflow_pixels'],
  }
  return loss, metrics
