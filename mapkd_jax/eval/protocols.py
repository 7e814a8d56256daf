"""The vector AP protocols: names, what metrics.json states for each, P-MapNet's defects.

'maptr' (the default; MapTR's released vector evaluation, DESIGN.md section 4):
  * Every GT polyline is resampled to `num_points` (100) points evenly spaced along its length
    (shapely `interpolate` at linspace(0, length, 100)); so is every prediction, except one
    that already has exactly 100 vertices, which MapTR keeps as it is. Predictions with fewer
    than 2 vertices are dropped (not scored at all).
  * Gate: a prediction/GT pair whose `buffer_m` (2 m) flat-cap, mitre-join buffers do not
    intersect is never matched (its Chamfer distance counts as infinite).
  * Chamfer distance CD = (mean over prediction points of the distance to the nearest GT point
    + mean over GT points of the distance to the nearest prediction point) / 2, in metres.
  * Matching, per sample, class and threshold: predictions in descending score; each takes its
    closest GT over ALL the sample's GTs of the class (first on ties); TP if CD <= threshold
    and that GT is still free (it is then taken), else FP (even when another free GT is within
    the threshold).
  * TP/FP flags of the whole split sorted by descending score (stable here: ties keep sample
    order, then list order; MapTR's np.argsort is unstable, so its order of exact ties is
    unspecified); AP = all-point area under the monotone precision-recall curve (mmdet 'area');
    a class without GT has AP NaN and is left out; mAP = mean over classes and thresholds.

'legacy' (what this project computed before MapTR's rules were adopted; kept for comparison):
  resampling every `sample_step` metres, no buffer gate, CD < threshold (strict), each


'pmapnet' (P-MapNet's released evaluation, tools/evaluate_json.py + tools/evaluation/AP.py,
  which produced the paper's mAP column): see `evaluate_pmapnet`; its DEFECTS are reproduced
"""
PROTOCOLS = ('maptr', 'legacy', 'pmapnet')

PROTOCOL = {   # the default ('maptr'), as metrics.json states it
    'name': 'maptr',
    'chamfer': '(mean nearest distance pred->GT + GT->pred) / 2 in metres, both polylines '
               'resampled to 100 points evenly spaced along their length',
    'gate': 'pairs whose 2 m flat-cap buffers do not intersect are never matched',
    'threshold_test': 'CD <= threshold',
    'sort_order': 'descending score over the whole dataset',
    'matching_scope': 'dataset-level TP/FP accumulation; per sample each prediction (descending '
                      'score) takes its closest GT overall: TP if within the threshold and '
                      'still free, else FP',
    'interpolation': 'all-point (VOC2010+ / mmdet area) under the monotone precision-recall curve',
    'empty_class': 'AP NaN when a class has no GT; excluded from mAP',
}

LEGACY_PROTOCOL = {
    'name': 'legacy',
    'chamfer': '(mean nearest distance pred->GT + GT->pred) / 2 in metres, polylines resampled '
               'every sample_step metres',
    'gate': 'none',
    'threshold_test': 'CD < threshold',
    'sort_order': 'descending score over the whole dataset',
    'matching_scope': 'dataset-level; each prediction takes the closest still-free GT within '
                      'the threshold',
    'interpolation': PROTOCOL['interpolation'],
    'empty_class': PROTOCOL['empty_class'],
}

PMAPNET_DEFECTS = (
    'confidence sorted ASCENDING: the least confident prediction is ranked first',
    'AP computed per sample and class, then averaged over the samples where the class has a '
    'prediction or a GT (a sample with predictions but no GT scores 0), not over the dataset',
    'polylines rasterized to instance masks (coordinates truncated to int pixels, cv2 thickness '
    '5) and distances taken between pixels: row * x_step and column * y_step (axes swapped; '
    'metres only when the grid is isotropic)',
    'Chamfer distance one-directional (mean over prediction pixels of the nearest GT pixel), '
    'clipped at the threshold; CD < threshold (strict)',
    'a pair needs instance-pixel IoU >= 0.1; a minimum-CD pair that fails the IoU gate still '
    'removes both from matching (both count unmatched)',
    'greedy matching by globally smallest CD within the sample, not by confidence',
    'AP = mean over recalls 0.1, 0.2, ..., 1.0 of the smoothed precision at the first point '
    'reaching that recall (10-point, no recall-0 point)',
    'instance ids share one uint8 mask per class: a later line overwrites an earlier one where '
    'they overlap, ids saturate at 255, and a line the BEV box cuts into pieces gets one id per '
    'piece but one confidence, shifting the confidences of the lines after it',
)

PMAPNET_PROTOCOL = {
    'name': 'pmapnet',
    'source': "P-MapNet's released evaluation (tools/evaluate_json.py, tools/evaluation/AP.py)",
    'purpose': "side-by-side comparison with the paper's mAP column only; its defects are "
               'reproduced on purpose',
    'defects': list(PMAPNET_DEFECTS),
}


def protocol_description(protocol):
  """The dict metrics.json states for `protocol`."""
  return {'maptr': PROTOCOL, 'legacy': LEGACY_PROTOCOL, 'pmapnet': PMAPNET_PROTOCOL}[
      check_protocol(protocol)]


def check_protocol(protocol):
  if protocol not in PROTOCOLS:
    raise ValueError(f'vector AP protocol {protocol!r} is unknown; known: {list(PROTOCOLS)} '
                     '(config.eval.ap_protocol / --protocol)')
  return protocol
