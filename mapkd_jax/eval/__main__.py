"""python -m mapkd_jax.eval: cli.py."""
from mapkd_jax.eval import cli

if __name__ == '__main__':
  cli.main()
