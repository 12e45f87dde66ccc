"""Tests for the copy check in metrics.py: nearest neighbours against SciPy's brute-force
distances, and the copy fraction of three model stand-ins whose answer is known: one that
returns training images (1.0), one that draws noise (0) and one that draws new images from the
training distribution (0.05 within sampling error)."""
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.stats import scoreatpercentile

import metrics


def blobs(n, seed, size=28):
    """n digit-like uint8 images [n, 1, size, size]: a Gaussian blob of random place, width and
    brightness on a dark background, plus pixel noise. Two seeds give two independent draws of
    one distribution."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size / 4, 3 * size / 4, (2, n, 1, 1))
    sigma = rng.uniform(2, 5, (n, 1, 1))
    amplitude = rng.uniform(120, 255, (n, 1, 1))
    image = amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    image = image + rng.normal(0, 8, (n, size, size))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)[:, None]


# ----------------------------------------------------------------------------- nearest


@pytest.mark.parametrize("chunk, reference_chunk", [(8, 16), (256, 8192)])
def test_nearest_matches_scipy_on_features(chunk, reference_chunk):
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(37, 5)), rng.normal(size=(53, 5)) * 2 + 1
    distances, indices = metrics.nearest(queries, references, chunk, reference_chunk)
    reference = cdist(queries, references)
    np.testing.assert_array_equal(indices, reference.argmin(1))
    np.testing.assert_allclose(distances, reference.min(1), rtol=1e-6)
    assert distances.dtype == np.float32 and indices.dtype == np.int64


def test_nearest_on_pixels_finds_exact_copies_at_distance_zero():
    references = blobs(300, seed=1)
    order = np.random.default_rng(2).permutation(300)[:40]
    queries = np.concatenate([references[order], blobs(20, seed=3)])
    distances, indices = metrics.nearest(queries, references, chunk=16, reference_chunk=64)
    np.testing.assert_array_equal(indices[:40], order)
    assert (distances[:40] == 0).all()
    flat_q, flat_r = queries.reshape(60, -1).astype(float), references.reshape(300, -1)
    reference = cdist(flat_q[40:], flat_r.astype(float))
    np.testing.assert_array_equal(indices[40:], reference.argmin(1))
    np.testing.assert_allclose(distances[40:], reference.min(1), rtol=1e-6)


@pytest.mark.parametrize("reference_chunk", [4, 64])
def test_a_duplicated_reference_is_found_at_its_lower_index(reference_chunk):
    """Ties go to the lower index: a training set holding an image twice (here at 3 and 41, in
    different blocks of 4 references and in one block of 64) returns 3 for that image, as
    NumPy's argmin of the distances does."""
    references = blobs(50, seed=4)
    references[41] = references[3]
    queries = references[[3, 41, 7]]
    _, indices = metrics.nearest(queries, references, chunk=2, reference_chunk=reference_chunk)
    flat = references.reshape(50, -1).astype(float)
    expected = cdist(queries.reshape(3, -1).astype(float), flat).argmin(1)
    np.testing.assert_array_equal(indices, expected)
    assert indices.tolist() == [3, 3, 7]


def test_nearest_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.nearest(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        metrics.nearest(np.zeros((0, 3)), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- copy fraction


def test_copy_fraction_by_hand():
    heldout = np.arange(1, 101, dtype=float)  # 5th percentile: 1 + 0.05 * 99 = 5.95
    assert scoreatpercentile(heldout, 5) == pytest.approx(5.95)
    assert metrics.copy_fraction([0, 5, 5.95, 6, 100], heldout) == pytest.approx(2 / 5)
    assert metrics.copy_fraction([0, 1], heldout, percentile=0) == pytest.approx(1 / 2)


@pytest.fixture(scope="module")
def training_and_heldout():
    return blobs(3000, seed=10), blobs(2000, seed=11)


def test_a_model_returning_training_images_scores_one(training_and_heldout):
    train, heldout = training_and_heldout
    copies = train[np.random.default_rng(12).integers(0, len(train), 500)]
    check = metrics.copy_check(copies, train, heldout)
    assert check.fraction == 1.0 and (check.distances == 0).all() and check.threshold > 0


def test_noise_images_score_zero(training_and_heldout):
    train, heldout = training_and_heldout
    rng = np.random.default_rng(13)
    noise = np.clip(rng.normal(127, 60, (500, 1, 28, 28)), 0, 255).astype(np.uint8)
    assert metrics.copy_check(noise, train, heldout).fraction == 0.0


def test_new_images_from_the_training_distribution_score_the_percentile(training_and_heldout):
    """Samples and held-out images are exchangeable draws, so a sample falls below the held-out
    5th percentile with probability 0.05; the fraction's spread comes from the samples
    (binomial, p(1-p)/n) and from estimating the percentile (about p(1-p)/n' more)."""
    train, heldout = training_and_heldout
    samples = blobs(2000, seed=14)
    check = metrics.copy_check(samples, train, heldout)
    p = metrics.COPY_PERCENTILE / 100
    sigma = np.sqrt(p * (1 - p) * (1 / len(samples) + 1 / len(heldout)))
    assert abs(check.fraction - p) < 3 * sigma
    assert check.threshold == pytest.approx(np.percentile(check.heldout_distances, 5))


# ----------------------------------------------------------------------------- the picture


def test_nearest_pairs_png_closest_first(tmp_path):
    rng = np.random.default_rng(20)
    references = rng.integers(0, 256, (10, 1, 6, 6), dtype=np.uint8)
    samples = rng.integers(0, 256, (7, 1, 6, 6), dtype=np.uint8)
    samples[4] = references[2]  # an exact copy: shown first
    distances, indices = metrics.nearest(samples, references)
    path = tmp_path / "pairs.png"
    shown = metrics.save_nearest_pairs(str(path), samples, references, distances, indices,
                                       count=5, pairs_per_row=2)
    assert shown[0] == 4 and list(shown) == list(np.argsort(distances)[:5])
    with Image.open(path) as image:
        grid = np.asarray(image)
    pad, tile = 2, 6
    assert grid.shape == (3 * (tile + pad) + pad, 4 * (tile + pad) + pad)
    for k, i in enumerate(shown):
        row, column = divmod(2 * k, 4)
        top, left = pad + row * (tile + pad), pad + column * (tile + pad)
        np.testing.assert_array_equal(grid[top:top + tile, left:left + tile], samples[i, 0])
        left += tile + pad
        np.testing.assert_array_equal(grid[top:top + tile, left:left + tile],
                                      references[indices[i], 0])
