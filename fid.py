"""FID as papers compute it (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to
the 2048-d pool features of the FID Inception network, for generated images and for the training
set. Ho et al. 2020 (Table 1) report it on 50,000 samples against the training set.

    weights_path()            the weights file: the cache, else downloaded with its hash checked,
                              else one line naming the file, its hash and where to put it
    load_network(path)        the FID Inception network with those weights, in eval mode
    features(net, images)     uint8 [N, C, H, W] -> float64 [N, 2048]
    statistics(features)      (μ, Σ) of the features
    reference(...)            the training set's (μ, Σ), computed once and cached
    fid(stats1, stats2)       the Fréchet distance (metrics.frechet_distance)

The network is pytorch-fid's port of the TensorFlow FID Inception (its `fid_inception_v3`): the
torchvision Inception-v3 layout, with the average pools of the A, C and first E blocks leaving the
padding out of the average (count_include_pad=False, as TensorFlow pools) and the last E block
max-pooling its pool branch. Preprocessing follows pytorch-fid's path for image files: the uint8
pixels / 255 (ToTensor), a grey image repeated to three channels (PIL's convert("RGB")), bilinear
resizing to 299 x 299 (align_corners=False), then 2x - 1. The same weights, network and formula
give pytorch-fid's numbers (test_fid.py checks it against pytorch-fid's code); pytorch-fid's FID
is close to, not exactly, the TensorFlow implementation's (docs/sampling.md).
"""
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import dataio
import files
import metrics

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)  # pytorch-fid's FID_WEIGHTS_URL (pytorch_fid/inception.py)
# torch.hub's naming convention: the hex digits after the last "-" of the file name begin the
# file's SHA-256 (what torch.hub.load_state_dict_from_url(check_hash=True) checks). That prefix
# is what this module checks: no published full hash was at hand where this was written.
WEIGHTS_SHA256_PREFIX = "6726825d"
SIDE = 299                 # the network's input side; images are resized to it
DIMS = 2048                # the pool features' dimension
NUM_CLASSES = 1008         # the logits of the ported network (its fc layer, kept to load strictly)
SAMPLES = 10_000           # evaluate.py --fid's default sample count
PAPER_SAMPLES = 50_000     # what papers report (Ho et al. 2020 Table 1), against the training set
REFERENCE_MAX = 50_000     # training images in the reference statistics (a seeded subset beyond)


# ---- the network ------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001) -> ReLU."""

    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """3x3 average pool, stride 1, whose border averages leave the padding out (TensorFlow's)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        one_by_seven, seven_by_one = dict(kernel_size=(1, 7), padding=(0, 3)), \
            dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **one_by_seven)
        self.branch7x7_3 = BasicConv2d(c7, 192, **seven_by_one)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **seven_by_one)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **one_by_seven)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **seven_by_one)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **one_by_seven)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """The E block; `max_pool` for the last one, whose pool branch max-pools in the ported
    network (an average pool elsewhere, TensorFlow's, as in the A and C blocks)."""

    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool \
            else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
                          self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception network; forward(x) maps images in [0, 1], float [N, 3, H, W], to their
    2048-d pool features [N, 2048]. Parameter names are those of the weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(DIMS, NUM_CLASSES)  # unused by FID; in the file, so loaded

    def forward(self, x):
        x = 2 * resize(x) - 1  # [0, 1] -> [-1, 1], the range the ported network expects
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # adaptive average pool to 1 x 1: the 2048-d pool features


def resize(x):
    """Images [N, C, H, W] bilinearly resized to SIDE x SIDE (align_corners=False, no
    antialiasing), as pytorch-fid's InceptionV3(resize_input=True)."""
    return F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)


def to_unit(images):
    """uint8 images [N, C, H, W] (C 1 or 3) -> float32 [N, 3, H, W] in [0, 1]: k / 255, a grey
    image repeated to three channels (what ToTensor of PIL's convert("RGB") gives)."""
    x = torch.as_tensor(images).float() / 255
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---- the weights ------------------------------------------------------------------------------

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def standard(digest):
    """Whether a SHA-256 hex digest is that of the standard weights file."""
    return digest.startswith(WEIGHTS_SHA256_PREFIX)


def missing_message(directory):
    return (f"FID needs the Inception weights {WEIGHTS_FILE} (SHA-256 starting "
            f"{WEIGHTS_SHA256_PREFIX}), which could not be downloaded; get it from {WEIGHTS_URL} "
            f"and put it in {directory} (or set $DDPM_CACHE to the folder holding it)")


def weights_path(cache_dir=None, url=WEIGHTS_URL, progress=True, timeout=60):
    """The path of the standard weights file with its hash checked: in the cache
    (dataio.cache_directory()), else downloaded from `url` into it (written whole or not at all,
    refused if its hash is wrong). A UserError of one line when neither works."""
    directory = dataio.cache_directory(cache_dir)
    path = os.path.join(directory, WEIGHTS_FILE)
    if os.path.exists(path):
        cli.check(standard(sha256_of(path)), f"{path} is damaged: its SHA-256 does not start with "
                  f"{WEIGHTS_SHA256_PREFIX}; delete it and run again to download it, or put a "
                  f"good copy from {WEIGHTS_URL} there")
        return path
    download(url, path, progress, timeout)
    return path


def download(url, path, progress=True, timeout=60):
    """Fetch `url` to `path` with its SHA-256 checked against WEIGHTS_SHA256_PREFIX; nothing is
    left at `path` unless the whole file arrived with the right hash."""
    directory = os.path.dirname(path)
    h = hashlib.sha256()

    def write(f):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {WEIGHTS_FILE}",
                      disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    h.update(block)
                    f.write(block)
                    bar.update(len(block))
        cli.check(standard(h.hexdigest()), f"the file downloaded from {url} has SHA-256 "
                  f"{h.hexdigest()}, not one starting {WEIGHTS_SHA256_PREFIX}; nothing was "
                  f"saved. {missing_message(directory).split('; ', 1)[1]}")

    print(f"downloading {WEIGHTS_FILE} from {url} into {directory}", file=sys.stderr)
    try:
        files.atomic_write(path, write)
    except (urllib.error.URLError, OSError, ValueError) as err:
        if isinstance(err, OSError) and not isinstance(err, urllib.error.URLError) \
                and getattr(err, "filename", None) and str(directory) in str(err.filename):
            raise files.write_error(path, err) from None
        raise cli.UserError(missing_message(directory)) from None


def load_network(path, device="cpu"):
    """The FID Inception network with the weights in the file at `path` (read with
    weights_only=True: loading runs no code), in eval mode, without gradients."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise cli.UserError(f"cannot read the Inception weights {path} "
                            f"({cli.first_line(err, 200)})") from None
    net = FIDInception()
    cli.check(isinstance(state, dict), f"{path} holds no state dict of Inception weights")
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise cli.UserError(f"{path} does not hold FID Inception weights "
                            f"({' '.join(str(err).split())[:300]})") from None
    return net.eval().requires_grad_(False).to(device)


# ---- features, statistics, FID ----------------------------------------------------------------

@torch.no_grad()
def features(net, images, batch_size=50, device="cpu", progress=True, desc="Inception features"):
    """uint8 images [N, C, H, W] (C 1 or 3; saved samples are uint8, so generated images are
    quantised before this) -> float64 [N, 2048] pool features."""
    out = np.empty((len(images), DIMS))
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch",
                  disable=not progress, leave=False):
        x = to_unit(images[i:i + batch_size]).to(device)
        out[i:i + len(x)] = net(x).double().cpu().numpy()
    return out


def statistics(feats):
    """(μ, Σ) of features [N, D]: the mean and the unbiased covariance (np.cov, N - 1)."""
    return metrics.feature_stats(feats)


def fid(stats1, stats2):
    """‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), the FID of Heusel et al. 2017, by
    metrics.frechet_distance."""
    return metrics.frechet_distance(*stats1, *stats2)


def _stats_path(kind, key, cache_dir):
    return os.path.join(dataio.cache_directory(cache_dir), f"fid-{kind}-{key}.npz")


def cached_statistics(kind, key, compute, cache_dir=None):
    """(μ, Σ) from the cache file named by kind and key, else compute() -> (μ, Σ), cached (a
    cache that cannot be written only costs the time next run)."""
    path = _stats_path(kind, key, cache_dir)
    try:
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    except Exception:  # absent, partial or stale: computed again
        pass
    mu, sigma = compute()
    try:
        files.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))
    except OSError as err:
        print(f"warning: cannot write {path} ({err}); FID statistics will be computed again",
              file=sys.stderr)
    return mu, sigma


def cache_key(name, images, weights_digest, *extra):
    """The key of statistics of `images` of dataset `name` with the weights of this digest."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-60:]
    return "-".join([safe, dataio.dataset_digest(images), weights_digest[:16], *map(str, extra)])


def reference_images(train_images, limit=REFERENCE_MAX, seed=0):
    """The training images of the reference statistics: all of them, or a seeded random subset
    of `limit` when there are more."""
    if len(train_images) <= limit:
        return train_images
    return train_images[np.sort(np.random.default_rng(seed).permutation(len(train_images))[:limit])]


class Scorer:
    """FID against a training set whose statistics are computed once (and cached): the network,
    the reference statistics, and the floor at a given N (held-out real images against them)."""

    def __init__(self, weights, name, train_images, device="cpu", cache_dir=None, progress=True,
                 batch_size=50, reference_max=REFERENCE_MAX, net=None):
        self.digest = sha256_of(weights)
        self.net = load_network(weights, device) if net is None else net  # net: loaded from it
        self.name, self.device, self.cache_dir = name, device, cache_dir
        self.progress, self.batch_size = progress, batch_size
        ref = reference_images(train_images, reference_max)
        self.reference_count = len(ref)
        self.reference = cached_statistics(
            "train", cache_key(name, ref, self.digest), lambda: statistics(self.features(
                ref, "Inception features of the training set")), cache_dir)

    def features(self, images, desc="Inception features"):
        return features(self.net, images, self.batch_size, self.device, self.progress, desc)

    def seconds_per_image(self, count=4):
        """The seconds the features of one image take here (a batch of `count` timed once, after
        a warm-up call), for the time sizing of a run scored by FID."""
        x = np.zeros((count, 3, SIDE, SIDE), np.uint8)
        features(self.net, x[:1], device=self.device, progress=False)
        start = time.perf_counter()
        features(self.net, x, batch_size=count, device=self.device, progress=False)
        return (time.perf_counter() - start) / count

    def score(self, images):
        """FID of uint8 images [N, C, H, W] against the training set."""
        return fid(statistics(self.features(images, "Inception features of the samples")),
                   self.reference)

    def floor(self, heldout, n):
        """FID of n held-out real images (the first n) against the training set, cached: what a
        perfect model scores at this N."""
        real = heldout[:n]
        return fid(cached_statistics("heldout", cache_key(self.name, real, self.digest),
                                     lambda: statistics(self.features(
                                         real, "Inception features of held-out images")),
                                     self.cache_dir), self.reference)
