"""A user's own data: folders of images, and npz files with labels.

    load_folder(DIR) -> Folder(train, val, class_names, skipped, hint)
        every image under DIR (subfolders walked) as uint8 [N, C, H, W], decoded once into a
        cache file and read from it while the folder is unchanged; optional class labels from
        the first-level subfolders; a held-out part chosen by a hash of each file's path.
    load_labelled_npz(PATH) -> Labelled(images, labels)
        a .npz/.npy file's images and its `labels` (or `y`) array.
    read_image(PATH) -> uint8 [C, H, W]
        one image file, decoded as a folder's images are.

Reading a folder, step by step:
  1. List the files: every file under DIR whose name ends in one of IMAGE_EXTENSIONS (any case);
     names starting with "." (hidden files and folders) are passed over, other files ignored and
     counted. A directory is a folder whatever its name (a directory named x.png is walked).
  2. The cache key: sha256 over each listed file's relative path, size, modification time and
     status-change time (ctime), with image_size, channels, CROP, RESAMPLE and BACKGROUND. A
     cache file holding that key is read instead of the images, and no image is opened. The key
     costs one stat() per file, no read: it notices a file added, removed, renamed or written
     to, even one replaced by another of the same size with its modification time set back (cp
     -p, rsync -t, touch -r), because the kernel sets ctime on every write, rename and utime and
     no program can set it back (on Linux and macOS; Windows reports a creation time instead).
     A chmod or chown also moves ctime: the folder is then decoded again, needlessly but safely.
     Only a change to a file's bytes by a means that bypasses the file system (a raw disk write)
     or a clock set back goes unnoticed.
  3. Otherwise decode each file with Pillow (imported only then; only the formats in FORMATS are
     tried, so no plugin that runs an outside program is reached): the EXIF orientation applied
     (PIL.ImageOps.exif_transpose); 16-bit grey (I;16, I) scaled to 8 bits as round(v * 255 /
     65535); palette, CMYK and other modes converted to RGB; alpha composited on BACKGROUND.
     An image whose three planes are equal counts as grey.
  4. Channels: 1 when every image is grey, else 3 (or as asked; colour to grey is Pillow's ITU-R
     601-2 luma, L = (299 R + 587 G + 114 B) / 1000).
  5. Size: as found when every image is one square size, else centre-cropped to a square and
     resized to image_size x image_size with Pillow's LANCZOS filter (its kernel widens when it
     shrinks, so downscaling is antialiased).
  6. A file that cannot be used (empty, truncated, not an image, unreadable, larger than Pillow's
     decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS) is named on stderr with the reason and
     skipped; a count follows at the end. Nothing inside DIR is ever written: the cache lives in
     dataio.cache_directory() ($DDPM_CACHE or ~/.cache/ddpm), one .npz per folder and options,
     written atomically and rewritten when the folder changes.
"""
import collections
import hashlib
import json
import os
import sys
import warnings
from typing import NamedTuple, Optional

import numpy as np
from tqdm import tqdm

import cli
import dataio
import files
from dataio import DataError

# Pillow's format names tried on each file, and the file names that count as images. Formats
# whose plugins call outside programs (EPS runs Ghostscript) are deliberately absent.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif",
                    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
BACKGROUND = 255          # transparent pixels become white: out = (a c + (255 - a) 255) / 255
RESAMPLE = "LANCZOS"      # Pillow's filter for resizing (antialiased when shrinking)
CROP = "centre"           # the square kept before resizing: the largest one, centred
LABEL_MODES = ("none", "subfolders")
VAL_FRACTION = 0.05       # default share of the images held out (0 holds none out)
CACHE_VERSION = 1         # bump when the decoding changes, so that old cache files are not used
PILLOW_HINT = "pip install pillow"


class Part(NamedTuple):
    """images: uint8 [N, C, H, W]; labels: int64 [N] in 0..K-1 (labels="subfolders") or None;
    paths: the N files' paths relative to the folder, with "/" separators, sorted."""

    images: np.ndarray
    labels: Optional[np.ndarray]
    paths: tuple


class Folder(NamedTuple):
    """What load_folder returns.

    train, val: the two parts (val holds the images held_out() picks; it may have N = 0).
    class_names: with labels="subfolders", the K class names in label order (label i is
        class_names[i]); None otherwise. Store it with a model to name its classes.
    skipped: ((relative path, reason), ...) for each file that could not be used.
    hint: with labels="none", one line saying that `--labels subfolders` would use the folder's
        first-level subfolders as classes, when every image lies in one of two or more of them;
        None otherwise.
    """

    train: Part
    val: Part
    class_names: Optional[tuple]
    skipped: tuple
    hint: Optional[str]

    @property
    def num_classes(self):
        """K, the number of classes; None without labels."""
        return None if self.class_names is None else len(self.class_names)


class FolderOptions(NamedTuple):
    """How load_folder reads a folder (its flags: --image-size, --channels, --labels,
    --val-fraction); see load_folder."""

    image_size: Optional[int] = None
    channels: Optional[int] = None
    labels: str = "none"
    val_fraction: float = VAL_FRACTION


# The flags of the folder options, as train.py (config.py), evaluate.py and data.py take them.
HELP = {
    "image_size": ("folder: datasets: centre-crop each image to a square and resize it to this "
                   "side", "the images' own side, when all are one square size"),
    "channels": ("folder: datasets: 1 (grey) or 3 (RGB)", "1 when every image is grey, else 3"),
    "labels": ("folder: datasets: subfolders, each first-level subfolder a class (names "
               "sorted); none, no labels", "none"),
    "val_fraction": ("folder: datasets: the share of images held out as the test split, each "
                     "chosen by a hash of its path (0: none)", str(VAL_FRACTION)),
}  # {option: (what it does, its default)}


def add_arguments(p):
    """--image-size, --channels, --labels and --val-fraction (data.py's command line)."""
    def text(name):
        return f"{HELP[name][0]} (default: {HELP[name][1]})"
    p.add_argument("--image-size", type=int, help=text("image_size"))
    p.add_argument("--channels", type=int, choices=(1, 3), help=text("channels"))
    p.add_argument("--labels", choices=LABEL_MODES, help=text("labels"))
    p.add_argument("--val-fraction", type=float, help=text("val_fraction"))


def check_arguments(given, name):
    """UserError for a folder option out of range, or given for a dataset that is not a folder.
    `given`: an argparse namespace or a {flag name: value} dict (None: not given)."""
    given = vars(given) if not isinstance(given, dict) else given
    asked = [k for k in FolderOptions._fields if given.get(k) is not None]
    cli.check(not asked or str(name).startswith("folder:"), f"--{asked[0].replace('_', '-')} "
              f"reads a folder of images; {name} is not one (give --dataset folder:DIR)"
              if asked else "")
    if given.get("image_size") is not None:
        cli.check_number("--image-size", given["image_size"], 1, 4096)
    if given.get("val_fraction") is not None:
        cli.check_number("--val-fraction", given["val_fraction"], 0, 1, open_high=True)


def options_of(given):
    """FolderOptions from a {flag name: value} dict; None (not given) keeps each default."""
    return FolderOptions(**{k: given[k] for k in FolderOptions._fields if given.get(k) is not None})


class Labelled(NamedTuple):
    """images: uint8 [N, C, H, W]; labels: int64 [N] in 0..K-1 with every class present, or None."""

    images: np.ndarray
    labels: Optional[np.ndarray]


class _Unusable(Exception):
    """A file that cannot be used; the message is the reason, shown after its name."""


# ----------------------------------------------------------------------------- the folder reader


def load_folder(directory, image_size=None, channels=None, labels="none",
                val_fraction=VAL_FRACTION, cache_dir=None, progress=True):
    """Every image under `directory` as a Folder (see the module docstring for each step).

    image_size: None (the images' own side: they must all be one square size) or N >= 1
        (centre-crop to a square, resize to N x N).
    channels: None (1 when every image is grey, else 3), 1 or 3.
    labels: "none", or "subfolders" (each first-level subfolder is a class, names sorted,
        label = index; an image directly in `directory` is then an error naming it).
    val_fraction: the share of images held out, chosen by held_out(path, val_fraction).
    cache_dir: where the decoded images are kept (default: dataio.cache_directory()).
    Raises DataError (one line) for bad options, a missing folder, images of several sizes
    without image_size, or a folder with no usable image.
    """
    root = _check_options(directory, image_size, channels, labels, val_fraction)
    listing = _list_folder(root)
    class_names = _class_names(root, listing.files) if labels == "subfolders" else None
    images, paths, skipped = _decoded(root, listing, image_size, channels, cache_dir, progress)
    _report_skipped(root, skipped, len(listing.files) + len(listing.problems))
    if len(images) == 0:
        raise DataError(_no_image_message(root, listing, skipped))
    label_array = _labels_of(paths, class_names) if class_names is not None else None
    if class_names is not None:
        _report_empty_classes(class_names, label_array)
    train, val = _split(images, label_array, paths, val_fraction)
    if len(train.images) == 0:
        raise DataError(f"folder {root}: val_fraction {val_fraction} held out all "
                        f"{len(images)} images; lower it")
    hint = _subfolder_hint(listing.files) if labels == "none" else None
    return Folder(train, val, class_names, tuple(skipped), hint)


# The side a folder whose images are not all one square size is trained at when no --image-size
# is given: what a run of the default budget can learn on the device (docs/results.md).
AUTO_SIDE = {"cpu": 32}
AUTO_SIDE_ACCELERATOR = 64


def auto_side(device_type):
    """The side chosen for a folder of mixed sizes on a device of this type ("cpu", "cuda")."""
    return AUTO_SIDE.get(device_type, AUTO_SIDE_ACCELERATOR)


def needs_size(directory):
    """Whether the images under `directory` are not all one square size (read from the files'
    headers, EXIF orientation applied; files whose header cannot be read are passed over, the
    decoder names them), so that a side must be chosen. False for a missing or empty folder: the
    reader's own errors say what is wrong."""
    root = os.path.expanduser(str(directory))
    if not os.path.isdir(root):
        return False
    Image, ImageOps = _import_pillow()
    sizes = set()
    for relpath, _, _ in _list_folder(root).files:
        size = _header_size(Image, ImageOps, os.path.join(root, relpath))
        if size is not None:
            sizes.add(size)
        if len(sizes) > 1:
            return True
    return bool(sizes) and not _one_square_size(collections.Counter(sizes))


def held_out(relpath, fraction):
    """True when the file at relpath (relative to the folder, "/" separators) is held out:
    the first 8 bytes of sha256(relpath as UTF-8), as a big-endian integer / 2**64, < fraction.
    Each file's side depends on its path alone, so adding files moves no other file."""
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def _check_options(directory, image_size, channels, labels, val_fraction):
    """The folder's absolute path, after checking every option; DataError on the first bad one."""
    root = os.path.abspath(os.path.expanduser(str(directory)))
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"folder {root} {what}; give a folder of images")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise DataError(f"image size must be a whole number >= 1, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3 (or left out), got {channels!r}")
    if labels not in LABEL_MODES:
        raise DataError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return root


# ----------------------------------------------------------------------------- listing


class _Listing(NamedTuple):
    """files: ((relpath, size, (mtime_ns, ctime_ns)), ...) of image-named files, sorted by relpath;
    problems: ((relpath, reason), ...) for entries that could not be listed;
    ignored: Counter of the extensions of files not named as images."""

    files: tuple
    problems: tuple
    ignored: collections.Counter


def _list_folder(root):
    """The _Listing of root: every non-hidden file below it, subfolders walked (symbolic links
    followed, each real folder visited once)."""
    found, problems, ignored = [], [], collections.Counter()
    _walk(root, "", found, problems, ignored, set())
    return _Listing(tuple(sorted(found)), tuple(sorted(problems)), ignored)


def _walk(root, prefix, found, problems, ignored, seen):
    """Add the entries of root/prefix to the lists; recurse into its subfolders."""
    here = os.path.join(root, prefix) if prefix else root
    try:
        stat = os.stat(here)
        if (stat.st_dev, stat.st_ino) in seen:
            return
        seen.add((stat.st_dev, stat.st_ino))
        entries = sorted(os.scandir(here), key=lambda e: e.name)
    except OSError as err:
        if not prefix:
            raise DataError(f"folder {root} cannot be listed ({_reason(err)}); "
                            "give a folder you can read") from None
        problems.append((prefix, f"cannot list this folder ({_reason(err)})"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relpath = prefix + entry.name
        try:
            if entry.is_dir():
                _walk(root, relpath + "/", found, problems, ignored, seen)
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                ignored[os.path.splitext(entry.name)[1].lower() or "(no extension)"] += 1
            else:
                stat = entry.stat()
                found.append((relpath, stat.st_size, (stat.st_mtime_ns, stat.st_ctime_ns)))
        except OSError as err:  # a broken symbolic link, a file removed meanwhile
            problems.append((relpath, _reason(err)))


def _class_names(root, listed):
    """Sorted names of the first-level subfolders holding image files; DataError when an image
    file lies directly in root."""
    loose = [relpath for relpath, _, _ in listed if "/" not in relpath]
    if loose:
        raise DataError(f"folder {root}: with labels from subfolders every image must be in a "
                        f"class subfolder, but {len(loose)} lie directly in it "
                        f"({_first_few(loose)}); move them into a subfolder")
    return tuple(sorted({relpath.split("/", 1)[0] for relpath, _, _ in listed}))


def _subfolder_hint(listed):
    """The `--labels subfolders` hint, or None (see Folder.hint)."""
    tops = sorted({relpath.split("/", 1)[0] for relpath, _, _ in listed if "/" in relpath})
    if len(tops) < 2 or any("/" not in relpath for relpath, _, _ in listed):
        return None
    return (f"the images are in {len(tops)} subfolders ({_first_few(tops)}); "
            f"--labels subfolders would use them as {len(tops)} classes")


def _first_few(names, shown=3):
    """'a, b, c and 4 more'."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ----------------------------------------------------------------------------- the cache


def _decoded(root, listing, image_size, channels, cache_dir, progress):
    """(images uint8 [N, C, H, W], paths (N,), skipped [(relpath, reason)]) from the cache when
    it holds this listing and these options, else decoded now and cached."""
    key = _cache_key(listing, image_size, channels)
    path = _cache_path(root, image_size, channels, cache_dir)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    images, paths, skipped = _decode_folder(root, listing, image_size, channels, progress)
    if len(images):
        _write_cache(path, key, images, paths, skipped)
    return images, paths, skipped


def _cache_key(listing, image_size, channels):
    """Hex sha256 of what the decoded images depend on: each listed file's relative path, size,
    modification and status-change times (step 2 of the module docstring says what that
    notices), the listing's problems and the decoding options."""
    what = {"version": CACHE_VERSION, "files": listing.files, "problems": listing.problems,
            "image_size": image_size, "channels": channels, "crop": CROP, "resample": RESAMPLE,
            "background": BACKGROUND, "formats": FORMATS}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _cache_path(root, image_size, channels, cache_dir):
    """The cache file of this folder with these options: folder-<16 hex digits>.npz. A changed
    folder rewrites the same file, so old versions do not pile up."""
    name = json.dumps([os.path.realpath(root), image_size, channels])
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(dataio.cache_directory(cache_dir), f"folder-{digest}.npz")


def _read_cache(path, key):
    """(images, paths, skipped) from a cache file holding `key`; None when there is none, it is
    for another listing, or it is damaged (the folder is then decoded again)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            images, paths = npz["images"], tuple(str(p) for p in npz["paths"])
            skipped = list(zip(map(str, npz["skipped_paths"]), map(str, npz["skipped_reasons"])))
    except Exception:  # zipfile, numpy and OS errors alike mean a cache file to rebuild
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) \
            or len(images) != len(paths):
        return None
    return images, paths, skipped


def _write_cache(path, key, images, paths, skipped):
    """Save the decoded folder atomically; a failed write is a warning (decoding still worked)."""
    arrays = {"key": np.array(key), "images": images, "paths": np.array(paths, dtype=str),
              "skipped_paths": np.array([p for p, _ in skipped], dtype=str),
              "skipped_reasons": np.array([r for _, r in skipped], dtype=str)}
    try:
        files.atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        print(f"warning: cannot write cache file {path} ({_reason(err)}); the folder will be "
              "decoded again next time (set $DDPM_CACHE to a writable directory)", file=sys.stderr)


# ----------------------------------------------------------------------------- decoding


def _import_pillow():
    """(PIL.Image, PIL.ImageOps), or DataError with the install command."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError(f"reading a folder of images needs Pillow: {PILLOW_HINT}") from None
    return Image, ImageOps


def _decode_folder(root, listing, image_size, channels, progress):
    """(images uint8 [N, C, H, W], paths, skipped) decoded from the listed files."""
    Image, ImageOps = _import_pillow()
    arrays, paths, skipped = [], [], list(listing.problems)
    sizes = collections.Counter()
    names = [relpath for relpath, _, _ in listing.files]
    bar = tqdm(names, desc=f"decoding {root}", unit="img", disable=not (progress and names),
               leave=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, relpath in enumerate(bar):
            try:
                pixels = _read_pixels(Image, ImageOps, os.path.join(root, relpath))
            except _Unusable as err:
                skipped.append((relpath, str(err)))
                continue
            sizes[_size_of(pixels)] += 1
            if image_size is None and not _one_square_size(sizes):
                _raise_sizes(root, sizes, Image, ImageOps, [os.path.join(root, r)
                                                            for r in names[i + 1:]])
            arrays.append(_shaped(Image, pixels, image_size, channels))
            paths.append(relpath)
    skipped.sort()
    return _stack(arrays, channels), tuple(paths), skipped


def _read_pixels(Image, ImageOps, path):
    """uint8 H x W (grey) or H x W x 3 (colour) pixels of the image file at path, upright, alpha
    composited on BACKGROUND; _Unusable with the reason when the file cannot be used."""
    try:
        if os.path.getsize(path) == 0:
            raise _Unusable("empty file (0 bytes)")
        with open(path, "rb") as f:
            image = Image.open(f, formats=FORMATS)
            image = ImageOps.exif_transpose(image)
            image.load()
            return _to_8bit(image)
    except _Unusable:
        raise
    except MemoryError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        text = " ".join(str(err).split()).rstrip(".")
        raise _Unusable(f"too large for Pillow's decompression-bomb guard, "
                        f"PIL.Image.MAX_IMAGE_PIXELS ({text})") from None
    except Image.UnidentifiedImageError:
        raise _Unusable(f"not an image Pillow can read as {', '.join(FORMATS)}") from None
    except OSError as err:
        if err.errno is not None and err.strerror:  # permission denied, an I/O error
            raise _Unusable(err.strerror) from None
        raise _Unusable(f"truncated or damaged ({dataio.one_line(err)})") from None
    except Exception as err:  # damaged files raise many other kinds of errors in Pillow
        raise _Unusable(f"damaged ({dataio.one_line(err)})") from None


def _to_8bit(image):
    """A loaded Pillow image -> uint8 H x W (grey) or H x W x 3 (colour) array.

    16-bit grey (I;16*, I): round(v * 255 / 65535) = floor((v + 128) / 257) for v clipped to
    0..65535 (exact: v / 257 never ends in .5). Alpha modes and images with a transparent colour:
    composited on BACKGROUND. Any other mode: Pillow's conversion to RGB. (16-bit colour PNGs
    reach us from Pillow as 8-bit already, by their high byte.)"""
    mode = image.mode
    if mode == "L" and "transparency" not in image.info:
        return np.asarray(image)
    if mode == "F":
        raise _Unusable("32-bit floating-point pixels; save it with 8 or 16 bits per channel")
    if mode == "I" or mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return ((values + 128) // 257).astype(np.uint8)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgb = _composite(np.asarray(image.convert("RGBA")))
    else:
        rgb = np.asarray(image.convert("RGB"))
    grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return np.ascontiguousarray(rgb[..., 0]) if grey else rgb


def _composite(rgba):
    """uint8 H x W x 4 -> H x W x 3 on BACKGROUND: round((a c + (255 - a) BACKGROUND) / 255),
    computed as floor((a c + (255 - a) BACKGROUND + 127) / 255), exact since 255 is odd."""
    colour, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((colour * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)


def _size_of(pixels):
    """(width, height) of an H x W or H x W x 3 array."""
    return pixels.shape[1], pixels.shape[0]


def _one_square_size(sizes):
    """True when the sizes seen so far are all one square size."""
    return len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1]


def _shaped(Image, pixels, image_size, channels):
    """H x W or H x W x 3 pixels -> uint8 [C, S, S]: grey made colour or colour made grey as
    `channels` asks (None keeps each as it is), then centre-cropped and resized to image_size."""
    if channels == 1 and pixels.ndim == 3:
        pixels = np.asarray(Image.fromarray(pixels, "RGB").convert("L"))
    if image_size is not None:
        pixels = _crop_resize(Image, pixels, image_size)
    if pixels.ndim == 2:
        pixels = pixels[None]
        return np.repeat(pixels, 3, axis=0) if channels == 3 else pixels
    return pixels.transpose(2, 0, 1)


def _crop_resize(Image, pixels, size):
    """The largest centred square of an H x W (x 3) array, resized to size x size by LANCZOS."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(pixels[top:top + side, left:left + side]))
    if side != size:
        square = square.resize((size, size), getattr(Image.Resampling, RESAMPLE))
    return np.asarray(square)


def _stack(arrays, channels):
    """[C_i, S, S] arrays -> uint8 [N, C, S, S]: C = channels, or 1 when all are grey, else 3."""
    if not arrays:
        return np.zeros((0, channels or 1, 1, 1), np.uint8)
    if channels is None and any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return np.stack(arrays)


def _raise_sizes(root, sizes, Image, ImageOps, rest):
    """DataError listing the sizes seen (the remaining files measured from their headers)."""
    for path in rest:
        size = _header_size(Image, ImageOps, path)
        if size is not None:
            sizes[size] += 1
    if len(sizes) == 1:
        (width, height), = sizes
        raise DataError(f"folder {root}: the images are {width}x{height}, not square; give "
                        "--image-size N to centre-crop and resize them to N x N")
    seen = [f"{w}x{h} ({n})" for (w, h), n in sizes.most_common()]
    raise DataError(f"folder {root}: the images have {len(sizes)} sizes, {_first_few(seen, 4)} "
                    "(width x height, count); give --image-size N to centre-crop and resize "
                    "them all to N x N")


def _header_size(Image, ImageOps, path):
    """(width, height) of an image file as shown (EXIF orientation applied), read from its
    header alone; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f, formats=FORMATS)
            width, height = image.size
            turned = image.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:
        return None
    return (height, width) if turned else (width, height)


# ----------------------------------------------------------------------------- labels, split


def _labels_of(paths, class_names):
    """int64 [N]: the index in class_names of each path's first folder."""
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[p.split("/", 1)[0]] for p in paths], dtype=np.int64)


def _split(images, labels, paths, val_fraction):
    """(train Part, val Part) by held_out() of each path."""
    val = np.array([held_out(p, val_fraction) for p in paths], dtype=bool)

    def part(mask):
        return Part(images[mask], None if labels is None else labels[mask],
                    tuple(p for p, m in zip(paths, mask) if m))

    return part(~val), part(val)


# ----------------------------------------------------------------------------- messages


def _reason(err):
    """An exception as a short reason: the strerror of an OSError with an errno ("Permission
    denied"), else its one-line text."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        return err.strerror
    return dataio.one_line(err)


def _report_skipped(root, skipped, total):
    """On stderr, one line per skipped file with its reason, then one line counting them (the
    same lines whether the folder was decoded now or read from the cache)."""
    for relpath, reason in skipped:
        print(f"skipping {os.path.join(root, relpath)}: {reason}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} of {total} image files in {root}: "
              f"{_first_few([p for p, _ in skipped])}", file=sys.stderr)


def _report_empty_classes(class_names, labels):
    """One line naming the classes left without a usable image, if any."""
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts) if n == 0]
    if empty:
        print(f"warning: {len(empty)} class subfolders hold no usable image: "
              f"{_first_few(empty)}", file=sys.stderr)


def _no_image_message(root, listing, skipped):
    """The one line for a folder without a usable image."""
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} files skipped")
    if listing.ignored:
        kinds = [f"{ext} ({n})" for ext, n in listing.ignored.most_common()]
        parts.append(f"{sum(listing.ignored.values())} files not named as images: "
                     f"{_first_few(kinds)}")
    found = f" ({'; '.join(parts)})" if parts else ""
    return (f"folder {root} holds no usable image{found}; it needs image files named "
            f"*{', *'.join(IMAGE_EXTENSIONS[:6])} and the like")


# ----------------------------------------------------------------------------- one image


def read_image(path):
    """One image file as uint8 [C, H, W] (C = 1 when it is grey, else 3), decoded as a folder's
    images are (steps 3 and 4 above; never resized); DataError (one line) when it cannot be
    used."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; give the path of an image file (PNG)")
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError(f"reading {path} needs Pillow: {PILLOW_HINT}") from None
    try:
        pixels = _read_pixels(Image, ImageOps, path)
    except _Unusable as err:
        raise DataError(f"cannot use {path}: {err}; give a PNG image") from None
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- npz with labels


def load_labelled_npz(path):
    """Labelled(images uint8 [N, C, H, W], labels int64 [N] or None) from a user's .npz/.npy.

    Images: the only array, or the one named images, x or arr_0. Labels: the array named `labels` (or else `y`), if any: integers, one per
    image, each in 0..K-1 with K = max + 1 and every class 0..K-1 present (a missing class is
    usually labels counted from 1). A .npy file holds images only. DataError (one line) else."""
    path = os.path.expanduser(str(path))
    hint = "save it with numpy.savez(path, images=uint8_array, labels=int_array)"
    if not os.path.isfile(path):
        raise DataError(f"npz: {path} does not exist; give the path of a .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy file: images only
            images, labels = loaded, None
        else:
            with loaded:
                images = np.array(_pick_npz_array(path, loaded))
                key = next((k for k in ("labels", "y") if k in loaded.files), None)
                labels = None if key is None else np.array(loaded[key])
    except DataError:
        raise
    except Exception as err:  # a pickled object array, a damaged zip or not numpy at all
        raise DataError(f"npz: cannot read {path} ({dataio.one_line(err)}); {hint}")
    images = _npz_images(path, images)
    return Labelled(images, None if labels is None else _check_labels(path, labels, len(images)))


def _check_labels(path, labels, count):
    """int64 [count] from a labels array, or DataError naming what is wrong."""
    fix = "save one integer class index 0..K-1 per image, named labels"
    if labels.dtype.kind not in "iu":
        raise DataError(f"npz: {path} holds {labels.dtype} labels; {fix}")
    if labels.shape != (count,):
        raise DataError(f"npz: {path} holds labels of shape {labels.shape} for {count} images; "
                        f"{fix}")
    if labels.min() < 0:
        raise DataError(f"npz: {path} holds negative labels (smallest {labels.min()}); {fix}")
    present = np.unique(labels)  # sorted: class i is present when present[i] == i
    gaps = np.flatnonzero(present != np.arange(len(present)))
    if len(gaps):
        raise DataError(f"npz: {path} labels range 0..{labels.max()} but no image has class "
                        f"{gaps[0]}; number the classes 0..K-1 with every class present")
    return labels.astype(np.int64)


def _pick_npz_array(path, npz):
    """The images array of an NpzFile: its only array, or the one named images, x or arr_0."""
    candidates = [k for k in npz.files if k not in ("labels", "y")]
    if len(candidates) == 1:
        return npz[candidates[0]]
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
