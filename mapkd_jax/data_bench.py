"""Input pipeline throughput, in samples per second, printed as JSON lines.

  python -m mapkd_jax.data_bench --shards DIR [--config configs/tcs.py:student] [--batch_size 8]
  python -m mapkd_jax.data_bench            # random shards at the reference size, in a temp dir

Without --shards it writes random schema shards (tests/shard_fixtures.py; run from the repo
root) for `--config` (default configs/tcs.py:student): 6 x 128 x 352 JPEGs, a 200 x 400 BEV and
--points LiDAR points per sample, then times `pipeline.iterate` after a warm-up.
"""
import argparse
import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF is imported (by the pipeline).

from mapkd_jax.data import pipeline
from mapkd_jax.train import config_lib


def _write_random_shards(directory, data_config, args):
  try:
    from tests import shard_fixtures  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError('tests/shard_fixtures.py is needed to write random shards: run '
                            'from the repo root, or pass --shards DIR') from e
  start = time.perf_counter()
  shard_fixtures.write_shards(directory, data_config, split_sizes={args.split: args.samples},
                              num_shards=args.num_shards,
                              points_range=(args.points, args.points + 1), seed=args.seed,
                              label_style=args.label_style)
  return time.perf_counter() - start


def run(args):
  data_config = config_lib.load_config_file(args.config).data
  with tempfile.TemporaryDirectory() as scratch:
    shards_dir = args.shards
    if not shards_dir:
      shards_dir = scratch
      seconds = _write_random_shards(shards_dir, data_config, args)
      print(json.dumps(dict(event='random_shards', dir=shards_dir, samples=args.samples,
                            num_shards=args.num_shards, points=args.points,
                            label_style=args.label_style,
                            write_s=round(seconds, 2))), flush=True)
    iterator = pipeline.iterate(shards_dir, args.split, data_config, batch_size=args.batch_size,
                                seed=args.seed, shuffle=True, num_epochs=None,
                                threads=args.threads)
    for _ in range(args.warmup):
      next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      next(iterator)
    seconds = time.perf_counter() - start
    # CPU seconds of all threads: the figure that does not depend on what else the host runs.
    cpu_seconds = time.process_time() - cpu_start
  samples = args.batches * args.batch_size
  result = dict(event='throughput', samples_per_s=round(samples / seconds, 1),
                cpu_ms_per_sample=round(1000 * cpu_seconds / samples, 2),
                batches=args.batches, batch_size=args.batch_size, seconds=round(seconds, 2),
                image_size=list(data_config.image_size), max_points=data_config.max_points,
                config=args.config, threads=args.threads, cpus=os.cpu_count(),
                shards=args.shards or 'random')
  print(json.dumps(result), flush=True)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shards', default='', help='shard dir; default: random shards in a temp dir')
  parser.add_argument('--config', default='configs/tcs.py:student',
                      help="config file and arg, e.g. 'configs/tcs.py:student,tiny'")
  parser.add_argument('--split', default='train', help='split to read')
  parser.add_argument('--batch_size', type=int, default=8, help='per-host batch')
  parser.add_argument('--warmup', type=int, default=5, help='batches before timing')
  parser.add_argument('--batches', type=int, default=55, help='timed batches')
  parser.add_argument('--threads', type=int, default=None, help='tf.data thread pool; default all')
  parser.add_argument('--samples', type=int, default=512,
                      help='random shards: examples (default: warm-up + timed batches fit one epoch)')
  parser.add_argument('--num_shards', type=int, default=4, help='random shards: files')
  parser.add_argument('--points', type=int, default=34000,
                      help='random shards: LiDAR points per sample (one nuScenes sweep ~34k)')
  parser.add_argument('--label_style', default='lines', choices=('lines', 'noise'),
                      help='random shards: sparse line rasters (realistic) or per-pixel noise')
  parser.add_argument('--seed', type=int, default=0, help='content and shuffle seed')
  return run(parser.parse_args(argv))


if __name__ == '__main__':
  main()
