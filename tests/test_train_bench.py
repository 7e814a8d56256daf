"""Benchmarks: bench.time_jitted's statistics and donation threading; train_bench's record."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapkd_jax import bench


def test_time_jitted_threads_donated_state_and_counts_every_call():
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  timing = bench.time_jitted(step, (jnp.zeros(3),), iters=4, warmup=2,
                             next_args=lambda args, out: (out,))
  # 2 warmup + 4 timed calls, each fed the previous output (the donated input is gone).
  np.testing.assert_array_equal(np.asarray(timing.output), np.full(3, 6.0))
  assert len(timing.times_s) == 4


def test_time_jitted_statistics_match_numpy_on_known_sleeps():
  sleeps = iter([0.0, 0.0, 0.01, 0.03, 0.02, 0.05, 0.04])   # first two are warmup

  def fn():
    time.sleep(next(sleeps))
    return jnp.ones(())

  timing = bench.time_jitted(fn, (), iters=5, warmup=2)
  times = np.asarray(timing.times_s)
  # Each timed call took at least its sleep and not much more (no call left out or doubled).
  np.testing.assert_array_less([0.01, 0.03, 0.02, 0.05, 0.04], times + 1e-4)
  assert np.all(times < np.array([0.01, 0.03, 0.02, 0.05, 0.04]) + 0.5)
  assert timing.median_s == pytest.approx(np.median(times))
  q25, q75 = np.percentile(times, [25, 75])
  assert timing.spread_s == pytest.approx(q75 - q25)
  assert timing.min_s == times.min() and timing.max_s == times.max()
  assert 0.03 <= timing.median_s < 0.03 + 0.5


def test_time_jitted_rejects_bad_counts():
  with pytest.raises(ValueError, match='--iters'):
    bench.time_jitted(lambda: 0, (), iters=0, warmup=0)
  with pytest.raises(ValueError, match='--warmup'):
    bench.time_jitted(lambda: 0, (), iters=1, warmup=-1)


# --- peak FLOP/s table and MFU -------------------------------------------------------------

def test_peak_flops_lookup_order_and_cpu_reason():
  from mapkd_jax import peak_flops
  assert peak_flops.peak_flops('TPU v5 lite', 'bf16')[0] == 197e12    # not v5p's 459e12
  assert peak_flops.peak_flops('TPU v5', 'bf16')[0] == 459e12
  assert peak_flops.peak_flops('NVIDIA H100 PCIe', 'bf16')[0] == 756.5e12
  assert peak_flops.peak_flops('NVIDIA H100 80GB HBM3', 'f32')[0] == 494.5e12
  assert peak_flops.peak_flops('NVIDIA A100-SXM4-40GB', 'f32')[0] == 156e12
  peak, reason = peak_flops.peak_flops('cpu', 'f32')
  assert peak is None and "'cpu'" in reason
  with pytest.raises(ValueError, match='dtype'):
    peak_flops.peak_flops('TPU v4', 'fp8')
  assert peak_flops.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
  assert peak_flops.mfu(2e12, 0.5, None) is None


# --- HLO instruction counts per model block ------------------------------------------------

def test_block_of_unwraps_transformations_and_keeps_module_scopes():
  from mapkd_jax.models import summary
  assert summary.block_of('jit(train_step)/transpose(jvp(Student))/camera/conv/mul') == \
      'Student/camera'
  assert summary.block_of('jit(train_step)/jvp(Teacher)/Teacher.decode/x/add') == \
      'Teacher/Teacher.decode'
  assert summary.block_of('jit(step)/jvp(Teacher)/add') == 'Teacher'   # op directly in Teacher
  assert summary.block_of('jit(train_step)/jvp()/div') == summary.OTHER
  assert summary.block_of('reduce_sum') == summary.CALLED


def test_count_blocks_on_hand_written_hlo():
  from mapkd_jax.models import summary
  text = '\n'.join([
      'HloModule m',
      '%region (a: f32[], b: f32[]) -> f32[] {',
      '  %a = f32[] parameter(0)',
      '  ROOT %add.1 = f32[] add(%a, %a), metadata={op_name="reduce_sum"}',
      '}',
      'ENTRY %main (x: f32[3]) -> f32[] {',
      '  %x = f32[3]{0} parameter(0), metadata={op_name="x"}',
      '  %c = f32[3]{0} cosine(%x), metadata={op_name="jit(f)/jvp(M)/a/cos" stack_frame_id=2}',
      '  %s = f32[3]{0} sine(%c), metadata={op_name="jit(f)/transpose(jvp(M))/a/b/sin"}',
      '  %m = f32[3]{0} multiply(%s, %s), metadata={op_name="jit(f)/jvp(M)/b/mul;jit(f)/x"}',
      '  ROOT %r = f32[] reduce(%m, %a), to_apply=%region',
      '}'])
  # Counted by hand, line by line: cos and sin in M/a (sin's backward scope unwrapped), mul in
  # M/b (the first of its ';' names); the reduce body's add and the parameter named 'x' have
  # scope-less op_names (CALLED); the region's parameter and the reduce have no metadata.
  assert summary.count_blocks(text) == {'M/a': 2, 'M/b': 1, summary.CALLED: 2,
                                        summary.UNATTRIBUTED: 2}


def test_hlo_block_counts_follow_the_size_of_each_block():
  import flax.linen as nn
  from mapkd_jax.models import summary

  class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name='small')(x)
      for i in range(3):
        x = nn.Dense(4, name=f'big{i}')(jnp.tanh(x))
      return x

  class Top(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Toy(name='toy')(x)

  model = Top()
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
  lowered = jax.jit(jax.grad(loss)).lower(params)
  counts = summary.hlo_block_counts(lowered, lowered.compile(), depth=3)
  before = counts['unoptimized']
  assert sum(before.values()) == counts['unoptimized_total']
  # Three identical Dense+tanh layers: each holds the same instruction count, above 0, and
  # the one Dense without tanh has fewer.
  big = [before[f'Top/toy/big{i}'] for i in range(3)]
  assert big[0] > 0 and big == [big[0]] * 3
  assert 0 < before['Top/toy/small'] < big[0]
  assert counts['optimized_total'] > 0


def test_while_trip_counts_flag_the_loops_cost_analysis_counts_once():
  from mapkd_jax.models import summary
  w, x = jnp.ones((12, 16, 16)), jnp.ones((4, 16))

  def scanned(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

  def unrolled(w, x):
    h = x
    for i in range(12):
      h = jnp.tanh(h @ w[i])
    return h.sum()

  scan_step = jax.jit(jax.grad(scanned)).lower(w, x).compile()
  loop_free = jax.jit(jax.grad(unrolled)).lower(w, x).compile()
  assert summary.while_trip_counts(scan_step.as_text()) == [12, 12]   # forward and backward
  assert summary.while_trip_counts(loop_free.as_text()) == []
  # Why the flag matters: the same computation, a fraction of the FLOPs when scanned.
  assert scan_step.cost_analysis()['flops'] < loop_free.cost_analysis()['flops'] / 5
  # The jaxpr count does not have the problem: 12 matmuls of 2 * 4 * 16 * 16 each, forward;
  # with the backward, 12 weight-gradient and 12 (scan) or 11 (unrolled: x is a constant)
  # input-gradient matmuls more.
  matmul = 2 * 4 * 16 * 16
  assert summary.jaxpr_matmul_flops(jax.make_jaxpr(scanned)(w, x)) == 12 * matmul
  assert summary.jaxpr_matmul_flops(jax.make_jaxpr(unrolled)(w, x)) == 12 * matmul
  assert summary.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(scanned))(w, x)) == 36 * matmul
  assert summary.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(unrolled))(w, x)) == 35 * matmul


@pytest.mark.parametrize('groups', [1, 6])   # a plain and a depthwise 3x3 convolution
def test_jaxpr_matmul_flops_of_convolutions_against_a_loop_count(groups):
  from mapkd_jax.models import summary
  images, kernel = jnp.ones((2, 10, 12, 6)), jnp.ones((3, 3, 6 // groups, 8 if groups == 1 else 6))

  def conv(kernel, images):
    return jax.lax.conv_general_dilated(
        images, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups).sum()

  # Multiply-adds counted by loops: per output pixel and feature, 3 x 3 taps over the
  # input features of its group.
  macs = 0
  for _ in range(2 * 10 * 12):
    for _ in range(kernel.shape[3]):
      macs += 3 * 3 * kernel.shape[2]
  assert summary.jaxpr_matmul_flops(jax.make_jaxpr(conv)(kernel, images)) == 2 * macs
  # Input and weight gradients are convolutions of the same work each.
  grads = jax.make_jaxpr(jax.grad(conv, argnums=(0, 1)))(kernel, images)
  assert summary.jaxpr_matmul_flops(grads) == 3 * 2 * macs


# --- train_bench end to end ----------------------------------------------------------------

RECORD_KEYS = {
    'stage', 'batch', 'batch_per_device', 'devices', 'device_kind', 'backend', 'jax_version',
    'compute_dtype', 'params', 'lower_s', 'compile_s', 'cache_hit', 'mem_argument_bytes',
    'mem_output_bytes', 'mem_temp_bytes', 'mem_alias_bytes', 'mem_generated_code_bytes',
    'mem_peak_bytes', 'device_peak_bytes_in_use', 'device_bytes_limit',
    'flops_per_step_per_device', 'step_s_median', 'step_s_iqr', 'step_s_p90', 'iters',
    'warmup', 'steps_per_s', 'samples_per_s', 'samples_per_s_per_device',
    'input_samples_per_s', 'input_note', 'peak_flops_per_s', 'peak_flops_source', 'mfu',
    'mfu_note', 'loss', 'peak_rss_gb', 'compile_cold_s', 'compile_warm_s', 'lower_warm_s',
    'warm_cache_hit', 'cache_dir_bytes', 'while_trip_counts', 'flops_note',
    'model_flops_per_step', 'model_flops_per_step_per_device'}


def test_train_bench_record_with_warm_compile_in_a_second_process(tmp_path, monkeypatch):
  """One tiny stage in this process (cold compile), its warm compile in a child process."""
  import os

  from configs import tcs
  from mapkd_jax import train_bench
  from tests import shard_fixtures
  argv = ['--config=configs/tcs.py:hd_pretrain,tiny', '--config.model.hd.depth=1']
  config = tcs.get_config('hd_pretrain,tiny')
  config.model.hd.depth = 1
  shards = str(tmp_path / 'shards')
  shard_fixtures.write_shards(shards, config.data, split_sizes={'train': 16}, num_shards=2,
                              points_range=(100, 200), seed=0)
  cache = str(tmp_path / 'cache')
  # The child reads the config path relative to its working directory: the repo root.
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  previous = train_bench.use_compile_cache(cache)
  compiled_records = []
  try:
    record = train_bench.run_stage(
        train_bench.stage_config(config, 'hd_pretrain'), argv=argv, cache_dir=cache,
        batch_per_device=1, iters=2, warmup=1, shards=shards,
        on_compiled=compiled_records.append, step_timeout_s=900.0)
  finally:   # back to the suite's cache for the tests after this one
    train_bench.use_compile_cache(**previous)
  # The compile-time figures came out before the steps ran (a hung step still leaves them),
  # and the watchdog was cancelled after the steps (this process is still alive).
  [early] = compiled_records
  assert early['phase'] == 'compiled' and 'step_s_median' not in early
  assert early['mem_peak_bytes'] == record['mem_peak_bytes']
  assert set(record) >= RECORD_KEYS, RECORD_KEYS - set(record)
  devices = len(jax.devices())   # the child sees the same (conftest's 8 fake CPU) devices
  assert record['devices'] == devices and record['batch'] == devices
  assert record['stage'] == 'hd_pretrain' and record['compute_dtype'] == 'f32'
  # Cold in this process (empty cache), warm in the second one, which found the executable.
  assert not record['cache_hit'] and record['warm_cache_hit'] and record['cache_dir_bytes'] > 0
  assert 'warm_cache_log' not in record
  assert 0 < record['compile_warm_s'] < record['compile_cold_s'] == record['compile_s']
  # The donated state (params + Adam's two moments, float32) is aliased to the output.
  assert record['mem_alias_bytes'] >= 3 * 4 * record['params']
  assert record['mem_argument_bytes'] >= record['mem_alias_bytes']
  assert record['mem_peak_bytes'] == (record['mem_argument_bytes'] + record['mem_output_bytes']
                                      + record['mem_temp_bytes'] - record['mem_alias_bytes'])
  # Training a model costs at least two forward passes' FLOPs per parameter and sample.
  assert record['flops_per_step_per_device'] >= 2 * 2 * record['params']
  assert record['model_flops_per_step_per_device'] * devices == record['model_flops_per_step']
  # Without multi-trip loops (depth 1) the two counts agree in size; they are not equal
  # (measured on this step: jaxpr 1.11e9, XLA 0.85e9 per device; XLA drops dead code and
  # counts elementwise work; the jaxpr count is tested exactly on its own above).
  ratio = record['model_flops_per_step_per_device'] / record['flops_per_step_per_device']
  assert 0.5 < ratio < 2, ratio
  assert record['step_s_median'] > 0 and record['step_s_iqr'] >= 0
  assert record['samples_per_s'] == pytest.approx(record['batch'] / record['step_s_median'],
                                                  rel=1e-2)
  assert record['input_samples_per_s'] > 0 and shards in record['input_note']
  assert record['mfu'] is None and record['peak_flops_per_s'] is None
  assert 'cpu' in record['mfu_note']
  assert record['device_peak_bytes_in_use'] is None   # CPU devices have no memory_stats
  assert np.isfinite(record['loss'])


def test_torch_student_refuses_a_student_without_a_torch_twin():
  from configs import tcs
  with pytest.raises(ValueError, match='--torch_student.*resnet_small'):
    bench.bench_torch_student(tcs.get_config('student,tiny'), batch_size=1, iters=1, warmup=0,
                              seed=0)


def test_cached_frozen_config_is_refused_naming_the_flag():
  from configs import tcs
  from mapkd_jax import train_bench
  config = tcs.get_config('student,tiny')
  config.kd.cached_frozen = True
  with pytest.raises(ValueError, match=r'--config.kd.cached_frozen=True'):
    train_bench.build_step(config, batch_per_device=1)


def test_train_step_phases_are_named_scopes_in_the_hlo():
  """frozen forward, loss forward, gradient, optimizer update, EMA and metrics each name HLO ops
  (train_step's jax.named_scope), and train_bench's phase count finds every one."""
  import functools
  from configs import tcs
  from mapkd_jax import losses
  from mapkd_jax import models as models_lib
  from mapkd_jax import train_bench
  from mapkd_jax.train import step as step_lib
  config = tcs.get_config('student,tiny')
  config.kd.update(msrd_coach_weight=0.0, tgpd_coach_weight=0.0)   # one frozen model
  config.train.ema_decay = 0.9
  student = models_lib.build('student', config)
  models = {'student': student, 'teacher': student}   # a student as the frozen model: cheap
  tgpd = losses.TGPDProjector(patch_size=tuple(config.kd.tgpd_patch_size),
                              embed_dim=config.kd.tgpd_embed_dim)
  tx = step_lib.make_optimizer(config)
  batch = {k: jnp.asarray(v) for k, v in bench.random_batch(config, 1, seed=0).items()}
  state = jax.eval_shape(functools.partial(step_lib.init_state, batch=batch, models=models,
                                           tgpd=tgpd, tx=tx, config=config), jax.random.key(0))
  frozen = {'teacher': jax.eval_shape(functools.partial(student.init, train=False),
                                      jax.random.key(1), batch)}
  step = jax.jit(functools.partial(step_lib.train_step, models=models, tgpd=tgpd, tx=tx,
                                   config=config))
  hlo = step.lower(state, frozen, batch, jax.random.key(2)).compiler_ir('hlo')
  phases = train_bench.hlo_phase_counts(hlo.as_hlo_module().to_string())
  for phase in ('frozen_forward', 'loss_forward', 'gradient_backward', 'optimizer_update',
                'ema_update', 'metrics'):
    assert phases.get(phase, 0) > 0, (phase, phases)
  # The model's own ops fall in its phases, not outside them.
  assert phases.get('other', 0) < min(phases['loss_forward'], phases['gradient_backward'])


def test_phase_of_op_names():
  from mapkd_jax import train_bench
  assert train_bench.phase_of('jit(train_step)/gradient/jvp(loss)/Student/conv') == 'loss_forward'
  assert train_bench.phase_of(
      'jit(train_step)/gradient/transpose(jvp(loss))/Student/conv') == 'gradient_backward'
  assert train_bench.phase_of('jit(train_step)/frozen_forward/Teacher/add') == 'frozen_forward'
  assert train_bench.phase_of('jit(train_step)/optimizer_update/mul') == 'optimizer_update'
  assert train_bench.phase_of('jit(train_step)/fold_in') == 'other'
  assert train_bench.phase_of('reduce_sum') == 'called'
