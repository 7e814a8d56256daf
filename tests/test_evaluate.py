"""evaluate end to end on a 2-step tiny student, and its errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import tcs
from mapkd_jax import evaluate as eval_lib
from mapkd_jax.data import pipeline
from mapkd_jax.eval import ap as ap_lib
from mapkd_jax.eval import cli
from mapkd_jax.eval import protocols
from mapkd_jax.eval import scoring
from mapkd_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  config = tcs.get_config('student,nokd,tiny')
  config.train.update(steps=2, checkpoint_every=2, eval_every=2)
  # Half the tiny world: 2 train scenes x 4 = one batch of 8, 1 val scene of 4 samples.
  config.data.synthetic.samples_per_scene = 4
  return config


@pytest.fixture(scope='module')
def trained_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('eval_root'))
  trainer.train_and_evaluate(_config(), root)
  return root


def _iou_ref(pred, gt, classes, keep_columns=None):
  """Per-class IoU by explicit loops over samples and classes."""
  ious = {}
  for k, name in enumerate(classes, start=1):
    inter = union = 0
    for p, g in zip(pred, gt):
      if keep_columns is not None:
        p, g = p[:, keep_columns], g[:, keep_columns]
      inter += int(np.logical_and(p == k, g == k).sum())
      union += int(np.logical_or(p == k, g == k).sum())
    ious[name] = inter / union if union else float('nan')
  return ious


def test_end_to_end_files_and_metrics(trained_root):
  config = _config()
  metrics = eval_lib.evaluate(config, trained_root, checkpoint='best', num_images=2)
  out = os.path.join(trained_root, 'student_nokd', 'eval')
  with open(os.path.join(out, 'metrics.json')) as f:
    written = json.load(f)
  for key in ('iou', 'miou', 'ap', 'map', 'num_samples', 'checkpoint_step', 'protocol',
              'iou_by_range'):
    assert key in written, key
  assert written['checkpoint_step'] == 2
  assert set(written['iou']) == set(config.data.classes)
  for name in config.data.classes:
    assert set(written['ap'][name]) == {'0.5', '1.0', '1.5'}
  for key in ('thresholds_m', 'sort_order', 'matching_scope', 'interpolation', 'bev_x', 'gate',
              'threshold_test', 'num_points', 'buffer_m'):
    assert key in written['protocol'], key
  assert written['protocol']['ap_protocol'] == 'maptr'

  with open(os.path.join(out, 'timing.json')) as f:
    timing = json.load(f)
  assert timing['samples'] == written['num_samples'] and timing['process_count'] == 1
  assert timing['loop_s'] > 0 and timing['samples_per_s'] == pytest.approx(
      timing['samples'] / timing['loop_s'], rel=2e-3)
  assert 0 < timing['first_batch_s'] <= timing['loop_s'] and timing['host_tail_s'] >= 0

  npz = np.load(os.path.join(out, 'semantic.npz'))
  pred, gt, tokens = npz['pred'], npz['gt'], npz['tokens']
  assert pred.dtype == np.uint8 and gt.dtype == np.uint8
  assert pred.shape == gt.shape == (len(tokens), 50, 100)
  assert written['num_samples'] == len(tokens) == len(set(tokens.tolist()))
  nan_of = lambda v: float('nan') if v is None else v   # metrics.json writes NaN as null
  ref = _iou_ref(pred, gt, config.data.classes)
  for name, value in ref.items():
    np.testing.assert_allclose(nan_of(written['iou'][name]), value, rtol=1e-12)
  x_centres = config.data.bev_x[0] + (np.arange(100) + 0.5) * config.data.bev_x[2]
  near = _iou_ref(pred, gt, config.data.classes, keep_columns=np.abs(x_centres) < 15.0)
  for name, value in near.items():
    np.testing.assert_allclose(nan_of(written['iou_by_range']['0-15m']['iou'][name]), value,
                               rtol=1e-12)

  with open(os.path.join(out, 'gt.json')) as f:
    gt_file = json.load(f)
  with open(os.path.join(out, 'predictions.json')) as f:
    pred_file = json.load(f)
  assert gt_file['meta'] == pred_file['meta'] == {
      'bev_x': list(config.data.bev_x), 'bev_y': list(config.data.bev_y),
      'classes': list(config.data.classes)}
  gt_json, pred_json = gt_file['results'], pred_file['results']
  assert set(gt_json) == set(pred_json) == set(tokens.tolist())
  shards = os.path.join(trained_root, 'data', 'shards-tiny')
  truth = pipeline.read_vectors(shards, 'val')
  for token in tokens.tolist():
    assert len(gt_json[token]) == len(truth[token])
    for item, (cls, pts) in zip(gt_json[token], truth[token]):
      assert item['cls'] == config.data.classes[cls - 1]
      np.testing.assert_allclose(item['pts'], pts, rtol=1e-6)
  assert sum(map(len, gt_json.values())) > 0, 'the val split should hold map vectors'
  recomputed = cli.main(['--pred', os.path.join(out, 'predictions.json'),
                               '--gt', os.path.join(out, 'gt.json'),
                               '--sample_step', str(config.eval.sample_step)])
  for name in config.data.classes:
    for threshold, value in written['ap'][name].items():
      np.testing.assert_allclose(recomputed['ap'][name][threshold], nan_of(value))
      np.testing.assert_allclose(metrics['ap'][name][threshold], nan_of(value))
  for protocol in ('pmapnet', 'legacy'):
    other = cli.main(['--pred', os.path.join(out, 'predictions.json'),
                            '--gt', os.path.join(out, 'gt.json'), '--protocol', protocol])
    assert other['protocol'] == protocol
  pngs = [f for f in os.listdir(out) if f.endswith('.png')]
  assert len(pngs) == 2
  np.testing.assert_allclose(metrics['miou'], nan_of(written['miou']))


def test_cli_in_fresh_process_on_one_device(trained_root):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'mapkd_jax.evaluate', '--config', 'configs/tcs.py:student,nokd,tiny',
       '--workdir', trained_root, '--checkpoint', '2', '--num_images', '0'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '"miou"' in result.stdout


def test_missing_checkpoint_names_directory_and_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'student_nokd/best.*launch\.py --config '
                                              r'configs/tcs\.py:student,nokd,tiny'):
    eval_lib.evaluate(_config(), str(tmp_path))


def test_checkpoint_of_another_config_is_rejected(trained_root):
  config = _config()
  config.model.decoder.head_channels = 8
  with pytest.raises(ValueError, match='student_nokd/best'):
    eval_lib.evaluate(config, trained_root)


def test_empty_split_is_rejected(trained_root, tmp_path):
  src = os.path.join(trained_root, 'data', 'shards-tiny')
  shards = tmp_path / 'shards'
  shutil.copytree(src, shards)
  info_path = shards / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['splits']['val'].update(num_samples=0, num_examples=0, files=[])
  info_path.write_text(json.dumps(info))
  config = _config()
  config.data.shards = str(shards)
  with pytest.raises(ValueError, match=r"split 'val' is empty"):
    eval_lib.evaluate(config, trained_root)


def test_hd_pretrain_and_bad_checkpoint_flag_are_rejected(trained_root):
  with pytest.raises(ValueError, match='hd_pretrain'):
    eval_lib.evaluate(tcs.get_config('hd_pretrain,tiny'), trained_root)
  with pytest.raises(ValueError, match='--checkpoint'):
    eval_lib.evaluate(_config(), trained_root, checkpoint='newest')


def test_figure_vectors_land_on_their_raster_pixels():
  from mapkd_jax import visualize
  bev_x, bev_y = (-30.0, 30.0, 0.6), (-15.0, 15.0, 0.6)
  raster = np.zeros((50, 100), np.uint8)
  for row, col in ((3, 7), (40, 90), (25, 50)):
    raster[row, col] = 1
    x = bev_x[0] + (col + 0.5) * bev_x[2]
    y = bev_y[0] + (row + 0.5) * bev_y[2]
    shown = visualize.bev_to_display(raster)
    c, r = visualize.metres_to_display(np.array([[x, y]]), bev_x, bev_y, 1)[0]
    # The metres -> display map lands inside the displayed pixel of the raster cell.
    assert shown[int(np.floor(r)), int(np.floor(c))] == 1
    raster[row, col] = 0
  # x forward is up: a cell further forward is higher (smaller display row).
  assert visualize.metres_to_display(np.array([[10.0, 0.0]]), bev_x, bev_y, 1)[0, 1] < \
      visualize.metres_to_display(np.array([[-10.0, 0.0]]), bev_x, bev_y, 1)[0, 1]
  images = np.zeros((6, 16, 44, 3), np.float32)
  figure = visualize.render_sample(images, raster, raster, [], [], bev_x=bev_x, bev_y=bev_y,
                                   class_names=('divider', 'ped_crossing', 'boundary'),
                                   bev_height_px=200)
  assert figure.dtype == np.uint8 and figure.shape[2] == 3


@pytest.mark.parametrize('shape,seed', [((1, 5, 7), 0), ((3, 8, 12), 1), ((2, 4, 4), 2)])
def test_iou_counts_match_loop_and_gt_as_prediction_scores_one(shape, seed):
  rng = np.random.default_rng(seed)
  pred, gt = rng.integers(0, 4, shape), rng.integers(0, 4, shape)
  keep = rng.random(shape[-1]) < 0.5
  classes = ('divider', 'ped_crossing', 'boundary')
  for columns in (None, keep):
    ious, _ = eval_lib.iou_from_class_maps(pred, gt, classes, column_mask=columns)
    want = _iou_ref(pred, gt, classes, keep_columns=columns)
    np.testing.assert_allclose([ious[c] for c in classes], [want[c] for c in classes])
  ious, miou = eval_lib.iou_from_class_maps(gt, gt, classes)
  assert miou == 1.0 and all(v == 1.0 for v in ious.values())


def test_reference_ordering_gets_the_direction_head_and_metrics_name_the_postprocess(
    trained_root, monkeypatch):
  """config.eval.ordering='reference' (the default) hands every sample's direction logits to the
  scorer (HDMapNet's ordering follows them); 'trace' does not; metrics.json records the
  post-processing settings."""
  seen = []
  original = scoring.Scorer.submit

  def spy(self, token, semantic, embedding, gt_vectors=(), direction=None):
    seen.append(None if direction is None else np.shape(direction))
    return original(self, token, semantic, embedding, gt_vectors, direction)

  monkeypatch.setattr(scoring.Scorer, 'submit', spy)
  config = _config()
  assert config.eval.ordering == 'reference'
  out = os.path.join(trained_root, 'student_nokd', 'eval')
  eval_lib.evaluate(config, trained_root, num_images=0, workers=1)
  with open(os.path.join(out, 'metrics.json')) as f:
    written = json.load(f)
  assert written['protocol']['postprocess']['ordering'] == 'reference'
  assert written['protocol']['postprocess']['standardize'] is True
  assert 'softmax' in written['protocol']['score']
  num_bins = config.data.direction_bins
  assert seen and all(shape == (50, 100, num_bins + 1) for shape in seen), seen[:3]
  seen.clear()
  config.eval.ordering = 'trace'
  eval_lib.evaluate(config, trained_root, num_images=0, workers=1)
  assert seen and all(shape is None for shape in seen)


def test_pmapnet_protocol_in_metrics_json(trained_root):
  # metrics.json names the P-MapNet protocol and lists its defects; the CLI recomputes it.
  config = _config()
  out = os.path.join(trained_root, 'student_nokd', 'eval')
  metrics = eval_lib.evaluate(config, trained_root, num_images=0, workers=1, protocol='pmapnet')
  with open(os.path.join(out, 'metrics.json')) as f:
    written = json.load(f)
  assert written['protocol']['ap_protocol'] == 'pmapnet'
  assert written['protocol']['defects'] == list(protocols.PMAPNET_DEFECTS)
  assert 'ASCENDING' in ' '.join(written['protocol']['defects'])
  recomputed = cli.main(['--pred', os.path.join(out, 'predictions.json'),
                               '--gt', os.path.join(out, 'gt.json'), '--protocol', 'pmapnet'])
  np.testing.assert_equal(recomputed['ap'], metrics['ap'])
  with pytest.raises(ValueError, match="protocol 'hdmapnet' is unknown"):
    eval_lib.evaluate(config, trained_root, protocol='hdmapnet')
  with pytest.raises(ValueError, match='--workers'):
    eval_lib.evaluate(config, trained_root, workers=-1)


def test_worker_pool_gives_the_inline_vectors():
  # Label-like head outputs of 3 samples: two lines and a ring, embeddings by instance.
  rng = np.random.default_rng(0)
  samples = []
  for k in range(3):
    semantic = np.full((40, 80, 4), -4.0, np.float32)
    semantic[..., 0] = 4.0
    embedding = rng.normal(scale=0.05, size=(40, 80, 4)).astype(np.float32)
    for inst, (row, cls) in enumerate(((8 + k, 1), (25, 3))):
      semantic[row:row + 3, 5:75, 0], semantic[row:row + 3, 5:75, cls] = -4.0, 4.0
      embedding[row:row + 3, 5:75] += 3.0 * inst
    samples.append((f'tok{k}', semantic, embedding))
  kwargs = dict(bev_x=(-24.0, 24.0, 0.6), bev_y=(-12.0, 12.0, 0.6),
                class_names=('divider', 'ped_crossing', 'boundary'), eps=1.5, min_samples=10,
                max_cluster_pixels=4000, link_radius_px=1.5, line_width_px=3,
                simplify_tolerance=0.2)
  gt = [{'cls': 'divider', 'pts': [[-20.0, -6.0], [20.0, -6.0]]}]
  ap_kwargs = dict(class_names=kwargs['class_names'], thresholds=(0.5, 1.0, 1.5))
  results = []
  # max_pending=1: the pool's bounded queue waits for the oldest sample at every submit.
  for workers, max_pending in ((1, None), (2, 1)):
    with scoring.Scorer(workers, kwargs, ap_kwargs, max_pending=max_pending) as scorer:
      for token, semantic, embedding in samples:
        scorer.submit(token, semantic, embedding, gt)
      results.append(scorer.results())
  inline, pooled = results
  assert set(inline) == {'tok0', 'tok1', 'tok2'}
  assert all(len(vectors) == 2 for vectors, _ in inline.values())
  np.testing.assert_equal(pooled, inline)
  # Each sample's AP record is the one `sample_record` gives its vectors.
  for vectors, record in inline.values():
    assert record == ap_lib.sample_record(vectors, gt, **ap_kwargs)
    assert record['divider']['num_gt'] == 1 and record['boundary']['num_pred'] == 1


def test_shares_take_every_sample_once():
  for count, total, batch in ((1, 5, 2), (2, 7, 4), (3, 10, 6), (4, 3, 8), (3, 10, 1)):
    owners = np.full(total, -1)
    for p in range(count):
      size = eval_lib.share_size(total, p, count)
      # The share in batches of `batch` rows, as pipeline.eval_iterate hands it out.
      batches = [{'semantic': np.zeros(min(batch, size - r))} for r in range(0, size, batch)]
      for indices, _ in eval_lib._my_batches(batches, p, count):  # pylint: disable=protected-access
        assert np.all(owners[indices] == -1)
        owners[indices] = p
    np.testing.assert_array_equal(owners, np.arange(total) % count)   # loop reference
  with pytest.raises(ValueError, match='process_index=2'):
    eval_lib.share_size(4, 2, 2)


def test_label_width_warning_names_trained_width():
  info = {'label_width': {'rule': 'reference_cv2', 'thickness_ref_step': 0.15,
                          'label_thickness_ref': 5, 'sd_thickness_ref': 5}}
  old_meta = {'config': {'data': {'line_width_px': 5}}}   # a checkpoint from before issue 15
  with pytest.warns(UserWarning, match=r"ckpt was trained with label width 'exact 5 px"):
    message = eval_lib.check_label_width(old_meta, info, ckpt_dir='ckpt', shards_dir='shards')
  assert "'reference cv2 thickness 5" in message
  new_meta = {'config': {'data': dict(info['label_width'])}}
  assert eval_lib.check_label_width(new_meta, info, ckpt_dir='ckpt', shards_dir='shards') is None


def test_eval_bench_record_on_noisy_label_like_maps():
  from mapkd_jax import eval_bench
  config = tcs.get_config('student,tiny')
  semantic, embedding, gt = eval_bench.noisy_outputs(np.random.default_rng(0), config,
                                                     num_lines=3, noise=0.0)
  assert semantic.shape == (50, 100, 4) and embedding.shape == (50, 100, 16) and len(gt) == 3
  # Without noise every drawn pixel is its line's class and nothing else is foreground.
  drawn = semantic.argmax(-1) > 0
  assert drawn.any() and np.all(semantic[~drawn, 0] == 2.0)
  record = eval_bench.run(config, samples=2, workers=1, noise=0.5, forward=False)
  for key in ('vectorize_s', 'vectorize_before_s', 'ap_s', 'host_before_s', 'host_after_s',
              'host_speedup', 'samples_per_s_before', 'samples_per_s_after'):
    assert record[key] > 0, key
  # 'before' is the original path (the trace); 'after' follows config.eval.ordering, so their
  # vectors agree only when that is the trace too (tests/test_eval_bench.py covers the rest).
  assert record['ordering'] == config.eval.ordering and record['ordering_before'] == 'trace'
  assert record['same_vectors_before_after'] == (config.eval.ordering == 'trace')
  assert record['canvas'] == [50, 100] and record['forward_s'] == 0.0
  with pytest.raises(ValueError, match='--samples'):
    eval_bench.run(config, samples=0, workers=1, noise=0.5)


def test_throughput_from_clock_marks():
  clock = {'start': 10.0, 'first_batch': 12.0, 'last_batch': 15.0, 'end': 16.0}
  got = eval_lib.throughput(clock, num_samples=24, first_rows=8, workers=2)
  assert got == {'samples': 24, 'workers': 2, 'loop_s': 6.0, 'samples_per_s': 4.0,
                 'first_batch_s': 2.0, 'steady_samples_per_s': 4.0, 'host_tail_s': 1.0}
  one_batch = eval_lib.throughput({'start': 0.0, 'first_batch': 1.0, 'last_batch': 1.0,
                                   'end': 1.5}, num_samples=8, first_rows=8, workers=1)
  assert one_batch['steady_samples_per_s'] is None and one_batch['host_tail_s'] == 0.5
