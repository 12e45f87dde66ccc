"""Sample quality on 28x28 labelled datasets: a small classifier trained once per dataset (and
cached) is the feature extractor; on its features, the Fréchet distance (Dowson & Landau 1982),
improved precision and recall (Kynkäänniemi et al. 2019), the share of confidently classified
samples and the entropy of the predicted classes. Used by evaluate.py, and by training for its
in-training scores. And the copy check: how many samples lie closer to a training image than
almost all new real images do (nearest, copy_fraction, copy_check, save_nearest_pairs)."""
import math
import os
import re
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import dataio
import imaging


# ---- metrics on features (NumPy / torch, no model) ------------------------------------------

def _sqrtm_psd(a):
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) between N(μ1, Σ1) and N(μ2, Σ2) (Dowson & Landau
    1982). tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½, whose argument is symmetric PSD."""
    s1 = _sqrtm_psd(cov1)
    middle = s1 @ cov2 @ s1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def feature_stats(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _kth_neighbour_radius(features, k, chunk=2048):
    """Distance of each point to its k-th nearest other point in the same set."""
    x = torch.as_tensor(features, dtype=torch.float32)
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself
    return torch.cat(radii)


def _covered(queries, support, radii, chunk=2048):
    """For each query: is it within the k-NN ball of some support point?"""
    q, s = (torch.as_tensor(a, dtype=torch.float32) for a in (queries, support))
    out = []
    for i in range(0, len(q), chunk):
        out.append((torch.cdist(q[i:i + chunk], s) <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the share of fake
    points inside the union of the real points' k-NN balls, recall the share of real points inside
    the fake points' balls. The two sets should be of equal size: a smaller set has larger balls.
    Each needs more than k points."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points in each set, "
                         f"got {len(real)} and {len(fake)}")
    precision = _covered(fake, real, _kth_neighbour_radius(real, k)).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k)).double().mean().item()
    return precision, recall


def class_entropy(probs):
    """Entropy (nats) of the histogram of predicted classes ([N, K] probabilities); log K when
    balanced."""
    probs = np.asarray(probs)
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    p = counts / counts.sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def class_accuracy(probs, labels):
    """The share of samples whose most probable class is the one asked for ([N] labels)."""
    return float((np.asarray(probs).argmax(1) == np.asarray(labels)).mean())


def confident_fraction(probs, threshold=0.9):
    return float((np.asarray(probs).max(1) > threshold).mean())


# ---- the feature network ---------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN for 28x28 images: two conv blocks, a 128-d feature layer, one logit a class."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        """x: [B, C, 28, 28] in [-1, 1] -> (features [B, 128], logits [B, K])."""
        f = self.features(self.conv(x))
        return f, self.head(f)


def train_classifier(images, labels, num_classes, device, epochs=2, batch_size=128, seed=0,
                     progress=True):
    """Adam on the uint8 images [N, C, 28, 28] and labels in 0..num_classes-1; returns the
    classifier in eval mode."""
    torch.manual_seed(seed)
    model = Classifier(images.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(images) // batch_size
    for step in tqdm(range(epochs * per_epoch), desc="classifier", disable=not progress, leave=False):
        if step % per_epoch == 0:
            order = torch.randperm(len(images), generator=g).to(device)
        idx = order[(step % per_epoch) * batch_size:][:batch_size]
        loss = F.cross_entropy(model(imaging.to_model_range(x_all[idx]))[1], y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def embed(model, images, batch_size=1000):
    """(features [N, 128], class probabilities [N, 10]) of images in [-1, 1] or uint8."""
    device = next(model.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size]).to(device)
        x = imaging.to_model_range(x) if x.dtype == torch.uint8 else x.float()
        f, logits = model(x)
        feats.append(f.cpu())
        probs.append(logits.softmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def classifier_for(name, train_set, test_set, device, cache_dir=None, progress=True):
    """The feature network for a dataset, trained once and cached by the data's checksum;
    returns (model, test accuracy)."""
    digest = dataio.dataset_digest(train_set.images) + dataio.dataset_digest(train_set.labels)[:8]
    safe = re.sub(r"[^\w.-]+", "_", name).strip("_")[-40:]
    path = os.path.join(dataio.cache_directory(cache_dir), f"classifier-{safe}-{digest}.pt")
    model = Classifier(train_set.images.shape[1], train_set.num_classes).to(device)
    if os.path.exists(path):
        state = checkpoint.load(path, map_location=device, required=("model", "test_accuracy"))
        checkpoint.load_weights(model, state["model"], path)
        return model.eval(), state["test_accuracy"]
    print(f"training the feature classifier for {name} (once; cached in {path})", file=sys.stderr)
    model = train_classifier(train_set.images, train_set.labels, train_set.num_classes, device,
                             progress=progress)
    _, probs = embed(model, test_set.images)
    accuracy = float((probs.argmax(1) == test_set.labels).mean())
    checkpoint.save(path, {"model": model.state_dict(), "test_accuracy": accuracy})
    return model, accuracy


class Scorer:
    """Sample quality against a test set whose features are computed once: for uint8 samples
    [N, C, 28, 28], the FD to the whole test set, precision and recall against a random subset of
    it of the samples' size (equal-sized sets, as Kynkäänniemi et al. compare them), the share
    classified with confidence > 0.9 and the entropy of the predicted classes."""

    def __init__(self, classifier, test_images, seed=0):
        self.classifier, self.seed = classifier, seed
        self.f_test, _ = embed(classifier, test_images)
        self.test_stats = feature_stats(self.f_test)

    def score(self, samples, labels=None):
        """The scores of uint8 samples; with `labels` (the classes a conditional model was asked
        for, [N]) also "class_accuracy", the share the classifier assigns to the class asked."""
        f_fake, p_fake = embed(self.classifier, samples)
        subset = np.random.default_rng(self.seed).permutation(len(self.f_test))[:len(f_fake)]
        precision, recall = precision_recall(self.f_test[subset], f_fake)
        scores = {"fd": frechet_distance(*feature_stats(f_fake), *self.test_stats),
                  "confident_fraction": confident_fraction(p_fake),
                  "class_entropy": class_entropy(p_fake),
                  "precision": precision, "recall": recall}
        if labels is not None:
            scores["class_accuracy"] = class_accuracy(p_fake, labels)
        return scores

    def floor(self, real_images):
        """The same scores for real images (the training set's): what a perfect model gets at
        this number of samples."""
        return self.score(real_images)


def sample_quality(classifier, samples, real_train, test_images, seed=0, labels=None):
    """The sample-quality table for uint8 samples [N, C, 28, 28] (see Scorer), with the FD,
    precision and recall of as many real training images (`real_train`) beside it: the floor of
    the FD, and the precision and recall a perfect model would get at this N; with `labels`
    (the classes asked of a conditional model) the class accuracy too."""
    scorer = Scorer(classifier, test_images, seed)
    floor = scorer.floor(real_train)
    return {**scorer.score(samples, labels), "fd_real_floor": floor["fd"],
            "precision_real": floor["precision"], "recall_real": floor["recall"],
            "class_entropy_max": math.log(classifier.head.out_features)}


# ---- the copy check: does the model return its training images? ----------------------------

COPY_PERCENTILE = 5  # held-out images closer than this percentile count as "close"


def nearest(queries, references, chunk=256, reference_chunk=8192, device="cpu"):
    """Each query's nearest reference by Euclidean distance over the flattened values.

    queries [N, ...], references [M, ...] with the same trailing shape: uint8 pixels (taken as
    0..255) or float feature vectors. Returns (distances float32 [N], indices int64 [N]) in the
    inputs' units; ties go to the lower index.

    Searched as ‖q - r‖² = ‖q‖² - 2 q·r + ‖r‖² in float32 blocks of chunk x reference_chunk
    pairs (memory stays bounded: 10,000 x 60,000 MNIST images need the references once in
    float32, 190 MB, and 8 MB per block), after subtracting the references' mean to keep the
    terms small; the distance to the neighbour found is then recomputed directly in float64, so
    an exact copy scores 0.
    """
    q_all, r_all = _flat(queries), _flat(references)
    if q_all.shape[1] != r_all.shape[1] or not len(q_all) or not len(r_all):
        raise ValueError(f"nearest needs non-empty queries and references of one shape, got "
                         f"{np.shape(queries)} and {np.shape(references)}")
    mean = r_all.mean(0, dtype=np.float64)
    refs = np.empty(r_all.shape, np.float32)
    for j in range(0, len(refs), reference_chunk):  # no float64 copy of them all
        refs[j:j + reference_chunk] = r_all[j:j + reference_chunk] - mean
    refs = torch.as_tensor(refs, device=device)
    ref_sq = (refs * refs).sum(1)
    indices = np.empty(len(q_all), np.int64)
    for i in range(0, len(q_all), chunk):
        q = torch.as_tensor((q_all[i:i + chunk] - mean).astype(np.float32), device=device)
        indices[i:i + chunk] = _nearest_block(q, refs, ref_sq, reference_chunk).cpu().numpy()
    exact = q_all.astype(np.float64) - r_all[indices].astype(np.float64)
    return np.sqrt((exact * exact).sum(1)).astype(np.float32), indices


def _flat(x):
    """An array [N, ...] as [N, D] (a view where possible)."""
    x = np.asarray(x)
    return x.reshape(len(x), -1)


def _nearest_block(q, refs, ref_sq, reference_chunk):
    """Index of each row of q's nearest row of refs (squared distances up to ‖q‖², which does
    not change the order), references visited reference_chunk at a time."""
    best = torch.full((len(q),), float("inf"), device=q.device)
    best_index = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for j in range(0, len(refs), reference_chunk):
        d = ref_sq[None, j:j + reference_chunk] - 2 * q @ refs[j:j + reference_chunk].T
        value, index = d.min(1)
        better = value < best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + j, best_index)
    return best_index


def copy_fraction(sample_dist, heldout_dist, percentile=COPY_PERCENTILE):
    """The share of samples closer to their nearest training image than the `percentile`-th
    percentile (NumPy's linear interpolation) of held-out real images' distances to their
    nearest training image. About percentile / 100 (0.05) when samples lie as far from the
    training set as new real images do; 1.0 for a model that returns its training images.
    (A training set holding duplicates of held-out images puts the threshold at 0, and then
    nothing counts as close.)"""
    threshold = np.percentile(np.asarray(heldout_dist, np.float64), percentile)
    return float((np.asarray(sample_dist, np.float64) < threshold).mean())


class CopyCheck(NamedTuple):
    """fraction: copy_fraction of the samples; threshold: the held-out percentile it uses;
    distances, indices: each sample's nearest training image [N]; heldout_distances [M']."""

    fraction: float
    threshold: float
    distances: np.ndarray
    indices: np.ndarray
    heldout_distances: np.ndarray


def copy_check(samples, train, heldout, percentile=COPY_PERCENTILE, chunk=256, device="cpu"):
    """Does the model copy its training images? samples [N, ...], train [M, ...] and heldout
    [M', ...] real images the model never saw (pixels or features, one shape) -> CopyCheck."""
    distances, indices = nearest(samples, train, chunk, device=device)
    heldout_distances, _ = nearest(heldout, train, chunk, device=device)
    threshold = float(np.percentile(heldout_distances.astype(np.float64), percentile))
    return CopyCheck(copy_fraction(distances, heldout_distances, percentile), threshold,
                     distances, indices, heldout_distances)


def save_nearest_pairs(path, samples, references, distances, indices, count=32, pairs_per_row=4):
    """A PNG of the `count` samples closest to a training image, closest first: rows of
    pairs_per_row pairs, each a sample (uint8 [C, H, W]) then its nearest reference,
    references[indices[i]]. Returns the sample indices shown, in order."""
    samples, references = np.asarray(samples), np.asarray(references)
    if samples.shape[1:] != references.shape[1:]:
        raise ValueError(f"samples {samples.shape} and references {references.shape} differ in "
                         "image shape")
    order = np.argsort(np.asarray(distances), kind="stable")[:count]
    tiles = np.stack([tile for i in order for tile in (samples[i], references[indices[i]])])
    imaging.save_png(path, imaging.make_grid(tiles, nrow=2 * pairs_per_row))
    return order
