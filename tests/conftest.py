"""Test setup: 8 fake CPU devices, set before jax or tensorflow is imported.

`import tensorflow` imports jax too, so XLA_FLAGS must be set here, at collection time.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
