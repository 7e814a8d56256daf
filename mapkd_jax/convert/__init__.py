"""Converters from PyTorch reference weights (efficientnet_pytorch, HDMapNet, P-MapNet, MapKD)
to this project's Flax variables. CLI: `python -m mapkd_jax.convert --help`.

torch is imported only inside this package, and only when a file is actually converted.
"""
