"""Sample quality on 28x28 labelled datasets: a small classifier trained once per dataset (and
cached) is the feature extractor; on its features, the Fréchet distance (Dowson & Landau 1982),
improved precision and recall (Kynkäänniemi et al. 2019), the share of confidently classified
samples and the entropy of the predicted classes. Used by evaluate.py, and by training for its
in-training scores."""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
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


def class_entropy(probs, num_classes=10):
    """Entropy (nats) of the histogram of predicted classes; log(num_classes) when balanced."""
    counts = np.bincount(np.asarray(probs).argmax(1), minlength=num_classes)
    p = counts / counts.sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def confident_fraction(probs, threshold=0.9):
    return float((np.asarray(probs).max(1) > threshold).mean())


# ---- the feature network ---------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN for 28x28 digits: two conv blocks, a 128-d feature layer, 10 logits."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        """x: [B, C, 28, 28] in [-1, 1] -> (features [B, 128], logits [B, 10])."""
        f = self.features(self.conv(x))
        return f, self.head(f)


def train_classifier(images, labels, device, epochs=2, batch_size=128, seed=0, progress=True):
    """Adam on the uint8 images [N, C, 28, 28] and labels; returns the classifier in eval mode."""
    torch.manual_seed(seed)
    model = Classifier(images.shape[1]).to(device)
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
    digest = data.dataset_digest(train_set.images)
    path = os.path.join(data.cache_directory(cache_dir), f"classifier-{name}-{digest}.pt")
    model = Classifier(train_set.images.shape[1]).to(device)
    if os.path.exists(path):
        state = checkpoint.load(path, map_location=device, required=("model", "test_accuracy"))
        checkpoint.load_weights(model, state["model"], path)
        return model.eval(), state["test_accuracy"]
    print(f"training the feature classifier for {name} (once; cached in {path})", file=sys.stderr)
    model = train_classifier(train_set.images, train_set.labels, device, progress=progress)
    _, probs = embed(model, test_set.images)
    accuracy = float((probs.argmax(1) == test_set.labels).mean())
    checkpoint.save(path, {"model": model.state_dict(), "test_accuracy": accuracy})
    return model, accuracy


class Scorer:
    """Sample quality against a test set whose features are computed once: for uint8 samples
    [N, C, 28, 28], the FD to the whole test set, precision and recall against a random subset of
    it of the samples' size (equal-sized sets, as Kynkäänniemi et al. compare them), the share
    classified with confidence > 0.9 and the entropy of the predicted classes."""

    def __init__(self, classifier, test_images, seed=0, num_classes=10):
        self.classifier, self.seed, self.num_classes = classifier, seed, num_classes
        self.f_test, _ = embed(classifier, test_images)
        self.test_stats = feature_stats(self.f_test)

    def score(self, samples):
        f_fake, p_fake = embed(self.classifier, samples)
        subset = np.random.default_rng(self.seed).permutation(len(self.f_test))[:len(f_fake)]
        precision, recall = precision_recall(self.f_test[subset], f_fake)
        return {"fd": frechet_distance(*feature_stats(f_fake), *self.test_stats),
                "confident_fraction": confident_fraction(p_fake),
                "class_entropy": class_entropy(p_fake, self.num_classes),
                "precision": precision, "recall": recall}

    def floor(self, real_images):
        """The same scores for real images (the training set's): what a perfect model gets at
        this number of samples."""
        return self.score(real_images)


def sample_quality(classifier, samples, real_train, test_images, seed=0, num_classes=10):
    """The sample-quality table for uint8 samples [N, C, 28, 28] (see Scorer), with the FD,
    precision and recall of as many real training images (`real_train`) beside it: the floor of
    the FD, and the precision and recall a perfect model would get at this N."""
    scorer = Scorer(classifier, test_images, seed, num_classes)
    floor = scorer.floor(real_train)
    return {**scorer.score(samples), "fd_real_floor": floor["fd"],
            "precision_real": floor["precision"], "recall_real": floor["recall"],
            "class_entropy_max": math.log(num_classes)}
