"""Images: pixels <-> the model's [-1, 1], sample grids, and PNG files written with zlib alone
(no Pillow).

    to_model_range(uint8) -> float in [-1, 1]      to_uint8(float in [-1, 1]) -> uint8
    make_grid(uint8 [N, C, H, W]) -> one image     save_grid(path, float [N, C, H, W])
    save_png(path, array)
"""
import math
import struct
import zlib

import numpy as np
import torch

import files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- pixels --------------------------------------------------------------------------------

def to_model_range(images):
    """uint8 tensor (any shape, any device) -> float32 tensor in [-1, 1]: x / 127.5 - 1."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {images.dtype}")
    return images.float() / 127.5 - 1


def to_uint8(x):
    """Float tensor in [-1, 1] (any shape, any device) -> uint8 tensor: round((x + 1) * 127.5)."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


# ---- grids and PNG files ----------------------------------------------------------------------

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
    """Write a uint8 H x W or H x W x 3 array as a PNG file, atomically (UserError when the
    write fails: the file at path, if any, is then untouched)."""
    data = _encode_png(img)
    files.write_file(path, lambda f: f.write(data))


def save_grid(path, images, nrow=None):
    """Images in [-1, 1], [N, C, H, W] (any device), as one PNG grid of nrow per row."""
    save_png(path, make_grid(to_uint8(images).cpu().numpy(), nrow=nrow))
