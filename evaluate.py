"""Evaluate a trained DDPM: `python evaluate.py --ckpt runs/mnist`.

NLL: test-set bits/dim from the full variational bound (Ho et al. 2020 Eq. 5: T steps, discretized
decoder, prior), with its standard error and its three parts L_T, Σ L_{t-1}, L_0.

Sample quality (28x28 datasets with labels): a small CNN classifier trained once on the training
split (cached under the data cache, keyed by the data's checksum) is the feature extractor. For
--samples generated images: the Fréchet distance of its penultimate features to the test set
("FD", computed with this network and not comparable to Inception FID), the same FD for as many
real training images (the floor), the share of samples classified with confidence > 0.9, the
entropy of the predicted-class histogram (log 10 = 2.303 when balanced), and precision and recall
on the same features (Kynkäänniemi et al. 2019, k = 3).

Results go to stdout as a table and to eval.json beside the checkpoint (or --json).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import sample
import train


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


def fd_of_features(f1, f2):
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


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


def class_entropy(probs, num_classes=data.NUM_CLASSES):
    """Entropy (nats) of the histogram of predicted classes; log(num_classes) when balanced."""
    counts = np.bincount(np.asarray(probs).argmax(1), minlength=num_classes)
    p = counts / counts.sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def confident_fraction(probs, threshold=0.9):
    return float((np.asarray(probs).max(1) > threshold).mean())


# ---- the feature network ---------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN for 28x28 digits: two conv blocks, a 128-d feature layer, 10 logits."""

    def __init__(self, in_channels=1, num_classes=data.NUM_CLASSES):
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
        loss = F.cross_entropy(model(data.to_model_range(x_all[idx]))[1], y_all[idx])
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
        x = data.to_model_range(x) if x.dtype == torch.uint8 else x.float()
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
        state = checkpoint.load(path, map_location=device)
        checkpoint.load_weights(model, state["model"], path)
        return model.eval(), state["test_accuracy"]
    print(f"training the feature classifier for {name} (once; cached in {path})", file=sys.stderr)
    model = train_classifier(train_set.images, train_set.labels, device, progress=progress)
    _, probs = embed(model, test_set.images)
    accuracy = float((probs.argmax(1) == test_set.labels).mean())
    checkpoint.save(path, {"model": model.state_dict(), "test_accuracy": accuracy})
    return model, accuracy


# ---- the evaluation --------------------------------------------------------------------------

def nll_bits_per_dim(model, diffusion, images, batch_size, seed=0, progress=True):
    """Per-image bound terms over uint8 images [N, C, H, W]: dict of [N] arrays "total", "prior"
    (L_T), "denoising" (Σ_{t>=2} L_{t-1}), "decoder" (L_0), in bits/dim. The network runs in
    fp32: the bound is a sum of 1,000 terms, and a low-precision bias in each would add up."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    parts = {"total": [], "prior": [], "denoising": [], "decoder": []}
    batches = range(0, len(images), batch_size)
    # One bar over every network call (batches x T), so the time estimate is there from the start.
    bar = tqdm(total=len(batches) * diffusion.num_timesteps, desc="NLL", unit="step",
               disable=not progress)

    def ticking(iterable, desc):
        for item in iterable:
            yield item
            bar.update(1)

    for i in batches:
        x0 = data.to_model_range(torch.from_numpy(images[i:i + batch_size]).to(device))
        out = diffusion.calc_bpd_loop(model, x0, clip_denoised=True, generator=g, progress=ticking)
        for key, value in (("total", out["total_bpd"]), ("prior", out["prior_bpd"]),
                           ("denoising", out["vb"][:, 1:].sum(1)), ("decoder", out["vb"][:, 0])):
            parts[key].append(value.double().cpu().numpy())
    bar.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def mean_and_se(x):
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def sample_quality(classifier, samples, real_train, test_images, seed=0):
    """The sample-quality table for uint8 samples [N, C, 28, 28]. FD against the whole test set;
    precision and recall against a random subset of it of the samples' size (equal-sized sets, as
    Kynkäänniemi et al. compare them)."""
    f_test, _ = embed(classifier, test_images)
    f_fake, p_fake = embed(classifier, samples)
    f_real, _ = embed(classifier, real_train)
    subset = np.random.default_rng(seed).permutation(len(f_test))[:len(f_fake)]
    precision, recall = precision_recall(f_test[subset], f_fake)
    return {"fd": fd_of_features(f_fake, f_test), "fd_real_floor": fd_of_features(f_real, f_test),
            "confident_fraction": confident_fraction(p_fake), "class_entropy": class_entropy(p_fake),
            "class_entropy_max": math.log(data.NUM_CLASSES), "precision": precision, "recall": recall}


def parse_args(argv=None):
    p = train.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint file or run directory (default: newest under runs/)")
    p.add_argument("--n", type=int, default=None,
                   help="test images for the NLL (default: all; 0 skips the NLL)")
    p.add_argument("--nll-batch-size", type=int, default=250)
    p.add_argument("--samples", type=int, default=10000,
                   help="generated images for sample quality (0 skips it)")
    p.add_argument("--batch-size", type=int, default=500, help="sampling batch size")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="network autocast for sampling (the NLL is always fp32)")
    p.add_argument("--data-dir", help="where local dataset files live (default $DDPM_DATA)")
    p.add_argument("--json", help="where to write the results (default: eval.json beside the checkpoint)")
    args = p.parse_args(argv)
    for name in ("n", "samples"):
        value = getattr(args, name)
        if value is not None and value < 0:
            p.error(f"--{name} must be >= 0, got {value}")
    for name in ("nll_batch_size", "batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if 0 < args.samples <= 3:
        p.error(f"--samples must be 0 or at least 4 (precision/recall use 3 neighbours), "
                f"got {args.samples}")
    if args.eta < 0:
        p.error(f"--eta must be >= 0, got {args.eta}")
    return args


def evaluate(args, progress=True):
    device = train.pick_device(args.device, 0)
    path = checkpoint.resolve(args.ckpt) if args.ckpt else checkpoint.newest()
    model, diffusion, cfg, step = sample.load_model(path, device)
    if args.samples:
        sample.check_steps(args.sampler, args.steps, diffusion)
    name = cfg["dataset"]
    test_set = data.load_dataset(name, "test", args.data_dir, progress=progress)
    results = {"checkpoint": path, "dataset": name, "step": step,
               "device": str(device)}

    n = len(test_set.images) if args.n is None else min(args.n, len(test_set.images))
    if n:
        start = time.perf_counter()
        parts = nll_bits_per_dim(model, diffusion, test_set.images[:n], args.nll_batch_size,
                                 args.seed, progress)
        results["nll"] = {"images": n, "seconds": time.perf_counter() - start,
                          # a user's npz file has no test split: its NLL is on training images
                          "split": "training" if name.startswith("npz:") else "test",
                          **{k: dict(zip(("mean", "se"), mean_and_se(v))) for k, v in parts.items()}}

    labelled_28 = test_set.labels is not None and test_set.images.shape[2:] == (28, 28)
    if args.samples and not labelled_28:
        print(f"sample quality needs a 28x28 dataset with labels; {name} has none, skipped",
              file=sys.stderr)
    elif args.samples:
        train_set = data.load_dataset(name, "train", args.data_dir, progress=progress)
        classifier, accuracy = classifier_for(name, train_set, test_set, device, progress=progress)
        start = time.perf_counter()
        x, _ = sample.generate(model, diffusion, args.samples, args.batch_size, args.sampler,
                               args.steps, args.eta, args.seed,
                               sample.sampling_precision(args.precision, cfg), progress=progress)
        seconds = time.perf_counter() - start
        fakes = data.to_uint8(x).cpu().numpy()
        real = train_set.images[np.random.default_rng(args.seed).permutation(
            len(train_set.images))[:args.samples]]
        results["samples"] = {
            "count": args.samples, "sampler": args.sampler if args.sampler == "ddpm" else
            f"ddim-{args.steps} eta={args.eta:g}", "seconds": seconds,
            "classifier_test_accuracy": accuracy,
            **sample_quality(classifier, fakes, real, test_set.images, args.seed)}
    return results


def number(v):
    """Four decimals, or three significant digits for small values (L_T is of the order of 1e-5)."""
    return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def print_table(r):
    print(f"{r['checkpoint']} (step {r['step']}, {r['dataset']}, {r['device']})")
    if "nll" in r:
        n = r["nll"]
        print(f"NLL on {n['images']} {n.get('split', 'test')} images ({n['seconds']:.0f} s), "
              f"bits/dim, mean ± s.e.:")
        for key, label in (("total", "total"), ("prior", "L_T"), ("denoising", "Σ L_{t-1}, t>=2"),
                           ("decoder", "L_0")):
            print(f"  {label:<16} {number(n[key]['mean'])} ± {number(n[key]['se'])}")
    if "samples" in r:
        s = r["samples"]
        print(f"sample quality: {s['count']} samples, {s['sampler']} ({s['seconds']:.0f} s); "
              f"features of a classifier with test accuracy {s['classifier_test_accuracy']:.4f}")
        for label, value in (
                ("FD (this classifier's features, not Inception FID)", f"{s['fd']:.3f}"),
                (f"FD of {s['count']} real training images (floor)", f"{s['fd_real_floor']:.3f}"),
                ("classified with confidence > 0.9", f"{s['confident_fraction']:.3f}"),
                (f"class-histogram entropy (max log 10 = {s['class_entropy_max']:.3f})",
                 f"{s['class_entropy']:.3f}"),
                ("precision / recall (k = 3)", f"{s['precision']:.3f} / {s['recall']:.3f}")):
            print(f"  {label:<52} {value}")


def main(argv=None):
    args = parse_args(argv)
    try:
        results = evaluate(args)
    except (checkpoint.CheckpointError, data.DataError, train.TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(results)
    out = args.json or os.path.join(os.path.dirname(results["checkpoint"]), "eval.json")
    data.atomic_write(out, lambda f: f.write(json.dumps(results, indent=1).encode()))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
