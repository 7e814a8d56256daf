"""Published peak dense FLOP/s per chip, for model-FLOPs utilization (MFU).

`peak_flops(device_kind, dtype)` returns (FLOP/s, source) or (None, reason). dtype 'bf16' is
the bfloat16 matmul peak; 'f32' is the peak of a float32 matmul at JAX's *default* precision
(what `train_step` runs when config.mixed_precision is off), which is not the chip's IEEE fp32
figure: per `jax.lax.Precision.DEFAULT`'s documentation, float32 dots run as one bfloat16 pass
on TPU and as TensorFloat-32 on A100 / H100-class GPUs. All figures are dense (NVIDIA's
datasheets print the 2:4-sparsity figure, twice the dense one, with a footnote; the dense half
is listed here). Devices missing from the table (the CPU included) get MFU null with the reason.
"""

# (device_kind substring, {'bf16': FLOP/s, 'f32': FLOP/s}, source). Matched in order on
# jax.Device.device_kind, so the more specific names come first ('TPU v5 lite' before 'TPU v5').
PEAKS = (
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS and TF32 989 TFLOPS, both
    # with sparsity -> dense 989.5 and 494.5.
    ('H200', {'bf16': 989.5e12, 'f32': 494.5e12}, 'NVIDIA H200 datasheet (SXM), dense'),
    # NVIDIA H100 Tensor Core GPU datasheet: SXM BF16 1,979 / TF32 989 TFLOPS sparse; PCIe
    # BF16 1,513 / TF32 756 sparse. device_kind of the PCIe card names it.
    ('H100 PCIe', {'bf16': 756.5e12, 'f32': 378e12}, 'NVIDIA H100 datasheet (PCIe), dense'),
    ('H100', {'bf16': 989.5e12, 'f32': 494.5e12}, 'NVIDIA H100 datasheet (SXM), dense'),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS, TF32 156 TFLOPS (dense; 624 / 312
    # with sparsity), same for the SXM and PCIe cards.
    ('A100', {'bf16': 312e12, 'f32': 156e12}, 'NVIDIA A100 datasheet, dense'),
    # Google Cloud TPU system-architecture pages, peak bf16 compute per chip; f32 dots at default
    # precision are single bf16 MXU passes, so the same peak applies.
    ('TPU v6 lite', {'bf16': 918e12, 'f32': 918e12}, 'Cloud TPU v6e (Trillium) docs, per chip'),
    ('TPU v6e', {'bf16': 918e12, 'f32': 918e12}, 'Cloud TPU v6e (Trillium) docs, per chip'),
    ('TPU v5 lite', {'bf16': 197e12, 'f32': 197e12}, 'Cloud TPU v5e docs, per chip'),
    ('TPU v5e', {'bf16': 197e12, 'f32': 197e12}, 'Cloud TPU v5e docs, per chip'),
    ('TPU v5p', {'bf16': 459e12, 'f32': 459e12}, 'Cloud TPU v5p docs, per chip'),
    ('TPU v5', {'bf16': 459e12, 'f32': 459e12}, 'Cloud TPU v5p docs, per chip'),
    ('TPU v4', {'bf16': 275e12, 'f32': 275e12}, 'Cloud TPU v4 docs, per chip'),
)
DTYPES = ('bf16', 'f32')


def peak_flops(device_kind, dtype):
  """(peak FLOP/s per chip, source) of `device_kind` at `dtype`, or (None, why there is none).

  Raises:
    ValueError: dtype not in DTYPES.
  """
  if dtype not in DTYPES:
    raise ValueError(f'peak_flops: dtype must be one of {DTYPES}, got {dtype!r}')
  for name, peaks, source in PEAKS:
    if name.lower() in device_kind.lower():
      return peaks[dtype], f'{source} ({dtype})'
  return None, (f'no published peak for device kind {device_kind!r} in '
                'mapkd_jax/peak_flops.PEAKS (CPUs have none)')


def mfu(flops_per_step, step_s, peak):
  """Model FLOPs utilization of one chip: achieved FLOP/s over the peak; None without a peak."""
  if peak is None or not step_s or flops_per_step is None:
    return None
  return flops_per_step / step_s / peak
