"""The vectorizer's faster ops give the bits of the plain formulas they replace."""
import numpy as np
import pytest
from sklearn import preprocessing as sk_preprocessing

from mapkd_jax.eval import ordering
from mapkd_jax.eval import vectorize


def _softmax_formula(logits):
  """The reference's softmax as first written here: whole-axis max, exp, sum, divide."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize('channels', [1, 2, 4, 7, 8, 37])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_softmax_is_the_formula_bit_for_bit(channels, dtype):
  rng = np.random.default_rng(channels)
  logits = (rng.normal(size=(23, 41, channels)) * rng.choice([0.1, 3.0, 30.0])).astype(dtype)
  logits[0, :3] = 0.0                       # ties
  logits[1, :3] = np.array(1e4, dtype)      # large logits
  want = _softmax_formula(logits)
  got = ordering.softmax_probability(logits)
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  # Non-contiguous input (a transposed view) and leading dims other than [H, W].
  view = np.ascontiguousarray(logits.transpose(1, 0, 2)).transpose(1, 0, 2)
  np.testing.assert_array_equal(ordering.softmax_probability(view), want)
  np.testing.assert_array_equal(ordering.softmax_probability(logits[3]), want[3])


def test_softmax_at_the_reference_size_is_the_formula_bit_for_bit():
  """[200, 400, 4] label-like logits (background +2 / line -2, class +2, plus noise)."""
  rng = np.random.default_rng(0)
  logits = np.zeros((200, 400, 4), np.float32)
  logits[..., 0] = 2.0
  logits[90:97, 50:350, 0] = -2.0
  logits[90:97, 50:350, 2] = 2.0
  logits += rng.normal(scale=0.5, size=logits.shape).astype(np.float32)
  np.testing.assert_array_equal(ordering.softmax_probability(logits), _softmax_formula(logits))


def _features(rng, num, dtype, kind):
  x = rng.normal(size=(num, 16)) * rng.uniform(0.01, 10.0, size=16)
  if kind == 'constant':
    x[:, 3] = 1.5
    x[:, 5] = 0.0
  elif kind == 'offset':
    x = x + 1e4
  elif kind == 'integers':
    x[:, :4] = rng.integers(0, 3, size=(num, 4))
  return x.astype(dtype)


@pytest.mark.parametrize('num', [1, 2, 7, 50, 3000])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_standardize_features_is_sklearns_scaler_bit_for_bit(num, dtype):
  rng = np.random.default_rng(num)
  for kind in ('normal', 'constant', 'offset', 'integers'):
    x = _features(rng, num, dtype, kind)
    want = sk_preprocessing.StandardScaler().fit_transform(x)
    got = vectorize.standardize_features(x)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(got, want, err_msg=kind)


def test_standardize_features_passes_other_input_to_sklearn():
  x = np.arange(12, dtype=np.int64).reshape(6, 2)
  np.testing.assert_array_equal(vectorize.standardize_features(x),
                                sk_preprocessing.StandardScaler().fit_transform(x))


def test_sort_points_by_dist_on_repeated_and_scattered_pixels_is_the_loop():
  """The pixel chain (lists of neighbours, rankings) against the reference's dense loop, on
  noisy line pixels with scattered outliers (rankings, discards, the 10-px end) and with a
  repeated pixel (then the loop itself)."""
  rng = np.random.default_rng(11)
  for trial in range(6):
    t = np.sort(rng.uniform(0, 60, size=120))
    line = np.stack([t, 0.3 * t + rng.normal(scale=1.2, size=len(t))], axis=1)
    outliers = rng.uniform(-10, 70, size=(12, 2))
    pixels = np.unique(np.round(np.concatenate([line, outliers])).astype(np.int64), axis=0)
    pixels = pixels[rng.permutation(len(pixels))].astype(np.float64)
    if trial % 3 == 2:
      pixels = np.concatenate([pixels, pixels[5:6]])
    want = pixels[ordering._sort_points_by_dist_dense(pixels)]
    np.testing.assert_array_equal(ordering.sort_points_by_dist(pixels), want)
