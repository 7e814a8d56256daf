"""The pure, jitted TCS update: state, frozen models, batch and rng in; new state and metrics out.

Only the stage's own model (plus its TGPD projectors) is trained. Frozen teacher/coach
variables are a separate argument: never in the state, the optimizer or the checkpoint of
this stage, never donated; their forward passes run in eval mode under stop_gradient.

The step's phases are `jax.named_scope`s (SCOPES), so profiles and the HLO's op_name
metadata show them: 'frozen_forward', 'gradient' around value_and_grad with 'loss' inside
the differentiated function (the forward's ops are named '.../gradient/jvp(loss)/...', the
backward's '.../gradient/transpose(jvp(loss))/...'), 'optimizer_update', 'ema_update' and
'metrics'.
"""
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mapkd_jax import losses
from mapkd_jax.eval import metrics as metrics_lib
from mapkd_jax.train import config_lib

# Named scopes of train_step's phases (module docstring); train_bench counts HLO per phase.
SCOPES = ('frozen_forward', 'gradient', 'loss', 'optimizer_update', 'ema_update', 'metrics')


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: {'model': ..., 'aux': ...}; batch_stats of the model;
  ema: the debiased EMA of params['model'] (`ema_update`) when config.train.ema_decay > 0,
  else None (no array, no operation: the step is then the program it was without EMA)."""
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any
  ema: Any = None


def ema_decay(config):
  """config.train.ema_decay, 0.0 for configs written before the key existed."""
  return float(config.train.get('ema_decay', 0.0))


def cached_frozen(config):
  """Whether the frozen models' outputs come from the cache (train/frozen_cache.py) as step inputs."""
  return bool(config.kd.get('cached_frozen', False)) and bool(frozen_names(config))


def ema_update(ema, params, step, decay):
  """Debiased exponential moving average of the weights after `step` updates.

  e_t = (1 - d) sum_{i<=t} d^(t-i) p_i / (1 - d^t), the zero-initialised EMA divided by its
  bias (1 - d^t), computed in its running form e_t = (1 - w_t) e_{t-1} + w_t p_t with
  w_t = (1 - d) / (1 - d^t). w_1 = 1, so e_1 = p_1 whatever `ema` held, and the early
  average is not pulled towards the initialisation (short runs: 250 demo steps at d = 0.99
  would otherwise keep 8% of the random init in the average).

  Args:
    ema: pytree e_{t-1} (float32 leaves, like params).
    params: pytree p_t, the weights after update t.
    step: t >= 1, int scalar (the state's step after the update).
    decay: d in (0, 1) (a Python float: static).

  Returns:
    e_t, same tree and dtypes as `params`.
  """
  t = jnp.asarray(step, jnp.float32)
  # 1 - d^t as -expm1(t log d), log d from float64: 1 - power(d, t) in float32 loses 1e-4 of
  # w at d = 0.999 and small t (cancellation).
  w = (1.0 - decay) / -jnp.expm1(t * math.log(decay))
  w = jnp.where(t <= 1.0, 1.0, w)   # exactly 1 (the float formula is 1 within an ulp)
  return jax.tree.map(lambda e, p: ((1.0 - w) * e + w * p).astype(p.dtype), ema, params)


def kd_weights(config):
  """{frozen model: (MSRD weight, TGPD weight)} of the stage, models with both weights 0 left out.

  The coach distils the teacher with config.kd.coach_{msrd,tgpd}_teacher_weight; the distilled
  student the teacher and the coach with config.kd.{msrd,tgpd}_{teacher,coach}_weight.
  """
  kd = config.kd
  if config.stage == 'coach':
    weights = {'teacher': (kd.coach_msrd_teacher_weight, kd.coach_tgpd_teacher_weight)}
  elif config.stage == 'student' and not config.nokd:
    weights = {name: (kd[f'msrd_{name}_weight'], kd[f'tgpd_{name}_weight'])
               for name in ('teacher', 'coach')}
  else:
    weights = {}
  return {name: w for name, w in weights.items() if any(w)}


def frozen_names(config):
  """Frozen models a stage distills from, in a fixed order."""
  return tuple(kd_weights(config))


def model_name(config):
  return 'hd_mae' if config.stage == 'hd_pretrain' else config.stage


def make_models(config):
  """{name: module} of the stage's trained model and the frozen models it distills from."""
  from mapkd_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  return {name: models_lib.build(name, config)
          for name in (model_name(config),) + frozen_names(config)}


def make_tgpd(config):
  """The TGPD projector module of a distilling stage (its params live in params['aux'])."""
  from mapkd_jax.models import precision  # pylint: disable=g-import-not-at-top
  return losses.TGPDProjector(patch_size=tuple(config.kd.tgpd_patch_size),
                              embed_dim=config.kd.tgpd_embed_dim,
                              dtype=precision.compute_dtype(config))


def learning_rate_schedule(optim):
  """optim.schedule: 'step' = x decay_factor every decay_steps (the reference recipe);
  'cosine' = cosine from learning_rate down to learning_rate * cosine_final_fraction at
  decay_steps (then constant), so a short run ends annealed instead of at its peak rate."""
  if optim.schedule == 'step':
    return optax.exponential_decay(init_value=optim.learning_rate,
                                   transition_steps=optim.decay_steps,
                                   decay_rate=optim.decay_factor, staircase=True)
  if optim.schedule == 'cosine':
    return optax.cosine_decay_schedule(init_value=optim.learning_rate,
                                       decay_steps=optim.decay_steps,
                                       alpha=optim.cosine_final_fraction)
  raise ValueError(f'optim.schedule must be one of {config_lib.SCHEDULES}, got '
                   f'{optim.schedule!r}')


def make_optimizer(config):
  """config.optim.name ('adam': the reference; 'sgd': plain SGD) on
  `learning_rate_schedule(config.optim)`, after global-norm clipping."""
  optim = config.optim
  schedule = learning_rate_schedule(optim)
  if optim.name == 'adam':
    update = optax.adam(schedule, b1=optim.b1, b2=optim.b2)
  elif optim.name == 'sgd':
    update = optax.sgd(schedule)
  else:
    raise ValueError(f'config.optim.name must be one of {config_lib.OPTIMIZERS}, got '
                     f'{optim.name!r}')
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip), update)


def init_state(rng, *, batch, models, tgpd, tx, config):
  """Fresh TrainState of the stage's model, plus one TGPD projector per frozen model.

  The projectors belong to this stage's trainable state (params['aux']), so they are learned
  and checkpointed with it, and dropped at export; bev_small has one shape in all models.
  """
  name = model_name(config)
  rngs = {'params': rng, 'dropout': rng, 'mask': rng}
  variables = models[name].init(rngs, batch, train=False)
  params = {'model': variables['params'], 'aux': {}}
  if frozen_names(config):
    outputs = models[name].apply(variables, batch, train=False, rngs=rngs)
    for index, frozen_name in enumerate(frozen_names(config)):
      params['aux'][f'tgpd_{frozen_name}'] = tgpd.init(
          jax.random.fold_in(rng, index + 1), outputs['bev_small'],
          outputs['bev_small'])['params']
  # Zeros, not a copy of the params: the first update overwrites them (w_1 = 1), and a copy
  # could alias the params' buffers inside one donated state.
  ema = jax.tree.map(jnp.zeros_like, params['model']) if ema_decay(config) else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    batch_stats=variables.get('batch_stats', {}), ema=ema)


def _task(outputs, batch, config, suffix=''):
  loss_cfg = config.loss
  return losses.task_loss(
      {k: outputs[k + suffix] for k in ('semantic', 'embedding', 'direction')}, batch,
      pos_weight=loss_cfg.semantic_pos_weight, instance_weight=loss_cfg.instance_weight,
      direction_weight=loss_cfg.direction_weight, delta_v=loss_cfg.delta_v,
      delta_d=loss_cfg.delta_d, max_instances=loss_cfg.max_instances)


def _distill(outputs, frozen_outputs, aux_params, batch, config, tgpd_fn):
  """MSRD + TGPD terms from each frozen model; returns (loss, metrics)."""
  kd, weights = config.kd, kd_weights(config)
  total, logs = 0.0, {}
  for name, out_t in frozen_outputs.items():
    msrd_w, tgpd_w = weights[name]
    if msrd_w:
      msrd = losses.msrd_loss(outputs['semantic'], out_t['semantic'], batch['semantic'],
                              temperature=kd.msrd_temperature, variant=kd.msrd_variant)
      total += msrd_w * msrd
      logs[f'loss/msrd_{name}'] = msrd
    if tgpd_w:
      tgpd = tgpd_fn(aux_params[f'tgpd_{name}'], outputs['bev_small'], out_t['bev_small'])
      total += tgpd_w * tgpd
      logs[f'loss/tgpd_{name}'] = tgpd
  return total, logs


def stage_loss(params, batch_stats, frozen_outputs, batch, rng, *, model, tgpd, config,
               train=True):
  """Loss of one stage on one batch.

  Returns:
    (loss, (metrics, new_batch_stats, outputs)).
  """
  with jax.named_scope('loss'):
    return _stage_loss(params, batch_stats, frozen_outputs, batch, rng, model=model, tgpd=tgpd,
                       config=config, train=train)


def _stage_loss(params, batch_stats, frozen_outputs, batch, rng, *, model, tgpd, config, train):
  variables = {'params': params['model'], 'batch_stats': batch_stats}
  rngs = {'dropout': jax.random.fold_in(rng, 0), 'mask': jax.random.fold_in(rng, 1)}
  if train:
    outputs, updates = model.apply(variables, batch, train=True, rngs=rngs,
                                   mutable=['batch_stats'])
    new_stats = updates['batch_stats']
  else:
    outputs, new_stats = model.apply(variables, batch, train=False, rngs=rngs), batch_stats
  if config.stage == 'hd_pretrain':
    loss = losses.mae_loss(outputs['reconstruction'], outputs['target'], outputs['mask'])
    return loss, ({'loss/mae': loss, 'loss/total': loss}, new_stats, outputs)
  loss, logs = _task(outputs, batch, config)
  if 'semantic_pre' in outputs and config.loss.pre_refine_weight:
    # Deep supervision of the pre-refinement heads keeps the BEV branch a good map on its
    # own, so the HD module refines a sensible input rather than compensating for it.
    pre_loss, _ = _task(outputs, batch, config, suffix='_pre')
    loss += config.loss.pre_refine_weight * pre_loss
    logs['loss/task_pre_refine'] = pre_loss
  if frozen_outputs:
    tgpd_fn = functools.partial(_tgpd_apply, tgpd=tgpd, config=config)
    kd_loss, kd_logs = _distill(outputs, frozen_outputs, params['aux'], batch, config, tgpd_fn)
    loss += kd_loss
    logs.update(kd_logs)
  logs['loss/total'] = loss
  return loss, (logs, new_stats, outputs)


def _tgpd_apply(tgpd_params, student_bev, teacher_bev, *, tgpd, config):
  kd = config.kd
  student_tokens, teacher_tokens = tgpd.apply({'params': tgpd_params}, student_bev, teacher_bev)
  return losses.tgpd_loss(student_bev, teacher_bev, student_tokens, teacher_tokens,
                          temperature=kd.tgpd_temperature,
                          attention_weight=kd.tgpd_attention_weight,
                          feature_weight=kd.tgpd_feature_weight)


def frozen_forward(frozen, batch, *, models):
  """Eval-mode outputs of the frozen models, as constants for the student's loss."""
  with jax.named_scope('frozen_forward'):
    return jax.lax.stop_gradient(
        {name: models[name].apply(variables, batch, train=False)
         for name, variables in frozen.items()})


def train_step(state, frozen, batch, rng, *, models, tgpd, tx, config):
  """One optimizer step of the stage's model.

  Args:
    state: TrainState of the trained model (donated).
    frozen: {'teacher': variables, 'coach': variables} (subset by stage); read-only. With
      config.kd.cached_frozen, their cached outputs instead: {name: {'semantic':
      [B, H, W, K], 'bev_small': [B, h, w, C]}} (train/frozen_cache.py), sharded like the batch.
    batch: global batch dict (schema.batch_spec), sharded over 'data'.
    rng: base PRNG key; folded with the step so there is no rng state to save.
    models: {name: nn.Module} for the trained model and the frozen ones (static).
    tgpd: the TGPD projector module (static), params under state.params['aux'].
    tx: optax transformation (static).
    config: the stage config (static; read-only).

  Returns:
    (new_state, metrics) with scalar metrics.
  """
  rng = jax.random.fold_in(rng, state.step)
  if cached_frozen(config):
    frozen_outputs = jax.lax.stop_gradient(frozen)
  else:
    frozen_outputs = frozen_forward(frozen, batch, models=models)
  loss_fn = functools.partial(stage_loss, model=models[model_name(config)], tgpd=tgpd,
                              config=config)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  with jax.named_scope('gradient'):
    (_, (logs, batch_stats, _)), grads = grad_fn(state.params, state.batch_stats,
                                                 frozen_outputs, batch, rng)
  with jax.named_scope('optimizer_update'):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, batch_stats=batch_stats)
  if ema_decay(config):
    # Weights only: BatchNorm statistics are already a running average (of the live model's
    # activations); checkpoints pair the EMA weights with the live statistics.
    with jax.named_scope('ema_update'):
      new_state = new_state.replace(ema=ema_update(state.ema, new_state.params['model'],
                                                   new_state.step, ema_decay(config)))
  # Norm of the updated params: a non-finite update shows up in this step's metrics.
  with jax.named_scope('metrics'):
    return new_state, {**logs, 'train/l2_grads': optax.tree.norm(grads),
                       'train/l2_params': optax.tree.norm(new_state.params)}


def eval_step(variables, batch, *, model, num_classes):
  """Eval-mode forward and per-class IoU counts of one batch (rows with valid=False ignored).

  Returns:
    {'intersection': [num_classes], 'union': [num_classes]} int32 (summed over the batch).
  """
  outputs = model.apply(variables, batch, train=False, rngs={'mask': jax.random.key(0)})
  # hd_pretrain scores its reconstruction of the masked ground truth; the others their map.
  logits = outputs['reconstruction'] if 'reconstruction' in outputs else outputs['semantic']
  pred = metrics_lib.predicted_classes(logits)
  inter, union = metrics_lib.iou_counts(pred, batch['semantic'], num_classes=num_classes,
                                        valid=batch['valid'])
  return {'intersection': inter, 'union': union}
