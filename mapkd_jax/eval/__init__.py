"""Evaluation of predicted maps: IoU counts, post-processing into polylines and vector AP, one
concern a module.

  metrics.py    IoU counts of predicted classes (training's in-run eval and evaluate.py)
  vectorize.py  one sample's head outputs -> scored polylines (HDMapNet's post-processing)

  protocols.py  the three named AP protocols ('maptr' default, 'legacy', 'pmapnet'), what
                metrics.json states for each, and P-MapNet's defects
  chamfer.py    polyline resampling and Chamfer-distance matrices ('maptr' gated, 'legacy')
  matching.py   per-sample TP/FP matching and the all-point average precision
  pmapnet.py    P-MapNet's released evaluation (rasterized instances), defects included
  ap.py         AP per class and threshold and mAP under a protocol: per-sample accumulators
                (`sample_record`) and their combination (`combine_records`), so that shards
                of a split scored apart (processes, hosts) give the one-process result
  files.py      predictions.json / gt.json payloads, reading and checking them
  trace.py      the centreline trace of a cluster's pixels (ordering='trace')
  ordering.py   HDMapNet's ordering: NMS mask, sort_points_by_dist, connect_by_direction along
                the direction head (ordering='reference', the default)
  scoring.py    the host side of an evaluation: each sample's vectors and AP record, inline
                or in a bounded 'spawn' process pool (imports no jax / TensorFlow)
  gather.py     a multi-process evaluation's shares -> process 0 through files under
                eval/parts/<run>/, waiting at most config.eval.gather_timeout_s
  cli.py        python -m mapkd_jax.eval --pred predictions.json --gt gt.json [--protocol ...]
"""
