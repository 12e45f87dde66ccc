"""What every source of data shares (data.py's named datasets, userdata.py's files and folders):
the Dataset record, the one error type of reading data, the cache directory, and the digest that
keys what is cached about a dataset.
"""
import hashlib
import os
from typing import NamedTuple, Optional

import numpy as np

import cli


class DataError(cli.UserError):
    """A dataset or file could not be used; the message is one line saying what to do."""


class Dataset(NamedTuple):
    """images: uint8 [N, C, H, W]; labels: int64 [N] in 0..K-1, or None for data without labels;
    name: as requested (mnist, npz:PATH, folder:DIR); class_names: the K classes' names in label
    order, where the data names them (a folder's subfolders, a named dataset's classes)."""

    images: np.ndarray
    labels: Optional[np.ndarray]
    name: str
    class_names: Optional[tuple] = None

    @property
    def num_classes(self):
        """K: the number of classes, or None without labels."""
        if self.class_names is not None:
            return len(self.class_names)
        return None if self.labels is None or not len(self.labels) else int(self.labels.max()) + 1


def one_line(err):
    """An exception as one line of text."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def cache_directory(cache_dir=None):
    """The cache directory: the argument, else $DDPM_CACHE, else ~/.cache/ddpm."""
    chosen = cache_dir or os.environ.get("DDPM_CACHE") or os.path.join("~", ".cache", "ddpm")
    return os.path.expanduser(chosen)


def dataset_digest(images):
    """16 hex digits of sha256 over an array's dtype, shape and bytes (to key caches)."""
    array = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()[:16]
