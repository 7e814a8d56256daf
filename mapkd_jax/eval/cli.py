"""Vector AP of an evaluation's predictions.json against its gt.json.

  python -m mapkd_jax.eval --pred predictions.json --gt gt.json \
      [--protocol maptr|legacy|pmapnet] [--thresholds 0.5,1.0,1.5]

Protocols: protocols.py ('maptr', MapTR's released evaluation, is the default).
"""
import argparse
import json

from mapkd_jax.data import schema
from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import files
from mapkd_jax.eval import protocols

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pred', required=True, help='predictions.json written by evaluate')
  parser.add_argument('--gt', required=True, help='gt.json written by evaluate')
  parser.add_argument('--protocol', default='maptr', choices=protocols.PROTOCOLS,
                      help="'maptr' (default), 'legacy' or 'pmapnet' (protocols.py)")
  parser.add_argument('--thresholds', default='0.5,1.0,1.5', help='Chamfer thresholds, metres')
  parser.add_argument('--sample_step', type=float, default=0.15,
                      help="'legacy' resampling step in metres (config.eval.sample_step)")
  parser.add_argument('--bev_x', default=None,
                      help="'pmapnet': min,max,step metres; default: the files' meta")
  parser.add_argument('--bev_y', default=None, help="'pmapnet': as --bev_x")
  args = parser.parse_args(argv)
  thresholds = tuple(float(t) for t in args.thresholds.split(','))
  preds, pred_meta = files.load_vectors(args.pred, class_names=schema.CLASSES, with_score=True)
  gts, gt_meta = files.load_vectors(args.gt, class_names=schema.CLASSES, with_score=False)
  files.check_same_setup(args.pred, pred_meta, args.gt, gt_meta)
  missing = sorted(set(preds) - set(gts))
  if missing:
    raise ValueError(f'{args.pred}: samples {missing[:3]} have no entry in {args.gt}')
  meta = pred_meta or gt_meta or {}
  classes = tuple(meta.get('classes', schema.CLASSES))
  bev_x = tuple(float(v) for v in args.bev_x.split(',')) if args.bev_x else meta.get('bev_x')
  bev_y = tuple(float(v) for v in args.bev_y.split(',')) if args.bev_y else meta.get('bev_y')
  if args.protocol == 'pmapnet' and (bev_x is None or bev_y is None):
    raise ValueError(f"{args.pred}: no meta with the BEV range; --protocol pmapnet needs "
                     '--bev_x and --bev_y')
  result = ap_lib.evaluate_vectors(preds, gts, class_names=classes, thresholds=thresholds,
                            protocol=args.protocol, sample_step=args.sample_step,
                            bev_x=bev_x, bev_y=bev_y)
  print(json.dumps({**result, 'protocol': protocols.protocol_description(args.protocol)}, indent=2))
  return result


if __name__ == '__main__':
  main()
