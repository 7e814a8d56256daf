"""python -m mapkd_jax.convert {efficientnet,pmapnet} ... : PyTorch reference weights -> JAX.

  efficientnet  efficientnet_pytorch efficientnet-b0 weights (bare ImageNet file, or a
                CamEncode inside a HDMapNet / P-MapNet / MapKD checkpoint with --prefix) ->
                OUT/variables, an Orbax item loaded by --config.init.image_encoder=OUT into
                every EfficientNet-B0 of a stage's model.
  pmapnet       a whole P-MapNet / MapKD checkpoint -> a stage checkpoint (convert/pmapnet.py).

Each converter is a module of this package exposing `add_arguments(parser)` (argparse) and
`run(args) -> summary`; it is imported only when its command runs, so `--help` stays cheap.
"""
import argparse
import importlib
import sys

CONVERTERS = {
    'efficientnet': ('mapkd_jax.convert.efficientnet',
                     'efficientnet-b0 / HDMapNet CamEncode -> image encoder variables (Orbax)'),
    'pmapnet': ('mapkd_jax.convert.pmapnet',
                'P-MapNet / MapKD checkpoint -> a stage checkpoint of this project'),
}


def build_parser(command=None):
  """The CLI parser; only `command`'s module is imported (for its arguments)."""
  parser = argparse.ArgumentParser(
      prog='python -m mapkd_jax.convert', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  subparsers = parser.add_subparsers(dest='command', required=True, metavar='{%s}' %
                                     ','.join(CONVERTERS))
  for name, (module_name, help_text) in CONVERTERS.items():
    sub = subparsers.add_parser(name, help=help_text, description=help_text)
    if name == command:
      importlib.import_module(module_name).add_arguments(sub)
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  command = next((a for a in argv if not a.startswith('-')), None)
  args = build_parser(command if command in CONVERTERS else None).parse_args(argv)
  module = importlib.import_module(CONVERTERS[args.command][0])
  try:
    module.run(args)
  except ValueError as e:   # bad input: a clear message, not a traceback
    sys.exit(f'python -m mapkd_jax.convert {args.command}: error: {e}')
  return 0


if __name__ == '__main__':
  main()
