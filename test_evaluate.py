"""evaluate.py: the metrics on cases with known answers, the feature classifier, and an end-to-end
evaluation of a tiny model on a synthetic labelled 28x28 dataset."""
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import data
import evaluate
import metrics
import train


def fd_of_features(f1, f2):
    """The FD of two sets of features, as evaluate.py computes it from their moments."""
    return metrics.frechet_distance(*metrics.feature_stats(f1), *metrics.feature_stats(f2))


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fd_of_identical_sets_is_zero():
    f = np.random.default_rng(0).standard_normal((500, 16))
    assert abs(fd_of_features(f, f)) < 1e-8


@pytest.mark.parametrize("d", [1, 3, 20])
def test_fd_matches_the_closed_form_with_scipy_sqrtm(d):
    """‖μ1-μ2‖² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) with scipy.linalg.sqrtm of the (non-symmetric)
    product, for non-commuting covariances."""
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = random_spd(rng, d), random_spd(rng, d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8, abs=1e-9)


def test_fd_of_diagonal_gaussians():
    """For diagonal covariances the FD is ‖μ1-μ2‖² + Σ_i (σ1_i - σ2_i)²."""
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.3, 2.0, 1.5])
    mu1, mu2 = np.zeros(3), np.array([1.0, -1.0, 0.0])
    fd = metrics.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2))
    assert fd == pytest.approx(2.0 + ((s1 - s2) ** 2).sum(), rel=1e-12)


def test_fd_from_samples_of_two_gaussians():
    """From 200,000 samples of each Gaussian the estimate is within 1% of the exact value."""
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(3), np.array([0.5, 0.0, -0.5])
    c1, c2 = random_spd(rng, 3), random_spd(rng, 3)
    x = rng.multivariate_normal(mu1, c1, 200000)
    y = rng.multivariate_normal(mu2, c2, 200000)
    exact = metrics.frechet_distance(mu1, c1, mu2, c2)
    assert fd_of_features(x, y) == pytest.approx(exact, rel=0.01)


def test_precision_recall():
    """A set against itself: precision = recall = 1. Against a far-away set: 0 and 0. Half of the
    fakes copied from the real set and half far away: precision 1/2."""
    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 8))
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    fake = np.concatenate([real[:200], real[200:] + 100.0])
    assert metrics.precision_recall(real, fake)[0] == 0.5


def test_kth_neighbour_radius_counts_other_points_only():
    """On the line {0, 1, 2, 4, 8, 16}: the distance to the k-th nearest *other* point, by hand."""
    x = np.array([[0.0], [1.0], [2.0], [4.0], [8.0], [16.0]])
    assert metrics._kth_neighbour_radius(x, 1).tolist() == [1, 1, 1, 2, 4, 8]
    assert metrics._kth_neighbour_radius(x, 2).tolist() == [2, 1, 2, 3, 6, 12]
    assert metrics._kth_neighbour_radius(x, 5, chunk=4).tolist() == [16, 15, 14, 12, 8, 16]


def test_precision_recall_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than 3 points"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_class_entropy_and_confidence():
    balanced = np.eye(10)[np.arange(1000) % 10]
    assert metrics.class_entropy(balanced) == pytest.approx(math.log(10))
    assert metrics.class_entropy(np.eye(10)[np.zeros(50, int)]) == 0.0
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.05, 0.95]])
    assert metrics.confident_fraction(probs) == pytest.approx(2 / 3)


def synthetic_digits(n, seed):
    """28x28 uint8 images whose class k (0..9) is a bright 2-pixel bar at row 2 + 2.5k, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 1, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r = int(2 + 2.5 * k)
        images[i, 0, r:r + 2, 3:25] = 255
    return data.Dataset(images, labels.astype(np.int64), "mnist")


def test_classifier_learns_a_separable_dataset():
    train_set, test_set = synthetic_digits(1280, 0), synthetic_digits(300, 1)
    model = metrics.train_classifier(train_set.images, train_set.labels, 10, torch.device("cpu"),
                                      epochs=2, batch_size=64, progress=False)
    feats, probs = metrics.embed(model, test_set.images)
    assert feats.shape == (300, 128) and probs.shape == (300, 10)
    assert (probs.argmax(1) == test_set.labels).mean() > 0.95


def test_evaluate_end_to_end(tmp_path, monkeypatch):
    """A tiny model trained on the synthetic set: the NLL parts add up to the total, every sample
    metric is present and in range, the classifier is cached, eval.json is written."""
    sets = {"train": synthetic_digits(640, 0), "test": synthetic_digits(200, 1)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", *a, **k: sets[split])
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    given = {"dataset": "mnist", "out": str(tmp_path / "run"), "steps": 6, "base_channels": 8, "norm_groups": 4,
             "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (14,), "dropout": 0.0,
             "timesteps": 50, "batch_size": 8, "precision": "fp32", "device": "cpu",
             "num_samples": 2, "log_every": 3}
    train.train(given, progress=False)
    argv = ["--ckpt", str(tmp_path / "run"), "--n", "6", "--nll-batch-size", "4", "--samples", "40",
            "--batch-size", "20"]
    evaluate.main(argv)
    r = json.loads((tmp_path / "run" / "eval.json").read_text())
    nll = r["nll"]
    assert nll["images"] == 6 and nll["split"] == "test"
    parts = nll["prior"]["mean"] + nll["denoising"]["mean"] + nll["decoder"]["mean"]
    assert nll["total"]["mean"] == pytest.approx(parts, rel=1e-6)  # float32 sums
    s = r["samples"]
    assert s["count"] == 40 and s["autocast"] in ("fp32", "bf16")  # not shadowed by the metric
    assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
    assert s["fd"] >= 0 and s["fd_real_floor"] >= 0
    assert 0 <= s["class_entropy"] <= math.log(10) + 1e-12
    assert s["classifier_test_accuracy"] > 0.9
    assert any(f.startswith("classifier-mnist-") for f in os.listdir(tmp_path / "cache"))
