"""Images: pixels <-> the model's [-1, 1], sample grids, and PNG files written and read with zlib
alone (no Pillow).

    to_model_range(uint8) -> float in [-1, 1]      to_uint8(float in [-1, 1]) -> uint8
    make_grid(uint8 [N, C, H, W]) -> one image     save_grid(path, float [N, C, H, W])
    save_png(path, array) / read_png(path)
"""
import math
import os
import struct
import zlib

import numpy as np
import torch

import runtime

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PNGError(runtime.UserError):
    """A PNG file that cannot be read; the message names it."""


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
    try:
        runtime.atomic_write(path, lambda f: f.write(data))
    except OSError as err:
        raise runtime.write_error(path, err) from None


def save_grid(path, images, nrow=None):
    """Images in [-1, 1], [N, C, H, W] (any device), as one PNG grid of nrow per row."""
    save_png(path, make_grid(to_uint8(images).cpu().numpy(), nrow=nrow))


def read_png(path):
    """uint8 H x W or H x W x 3 array from an 8-bit gray/RGB non-interlaced PNG (filters 0-4)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise PNGError(f"PNG: cannot read {path} ({os.strerror(err.errno)})") from None
    if not data.startswith(PNG_SIGNATURE):
        raise PNGError(f"PNG: {path} does not start with the PNG signature")
    chunks = _png_chunks(path, data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise PNGError(f"PNG: {path} does not start with an IHDR chunk")
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 8 or color_type not in (0, 2) or interlace != 0:
        raise PNGError(f"PNG: {path} is depth {depth}, color type {color_type}, interlace "
                        f"{interlace}; only 8-bit gray/RGB non-interlaced files are read")
    channels = 1 if color_type == 0 else 3
    try:
        raw = zlib.decompress(b"".join(payload for kind, payload in chunks if kind == b"IDAT"))
    except zlib.error as err:
        raise PNGError(f"PNG: {path} has damaged image data ({err})") from None
    if len(raw) != height * (width * channels + 1):
        raise PNGError(f"PNG: {path} has {len(raw)} bytes of scanlines for a "
                        f"{width}x{height} image")
    pixels = _unfilter(path, np.frombuffer(raw, np.uint8).reshape(height, -1), channels)
    return pixels.reshape(height, width) if channels == 1 else pixels.reshape(height, width, 3)


def _png_chunks(path, data):
    """[(type, payload)] up to IEND, each CRC-checked."""
    chunks, position = [], len(PNG_SIGNATURE)
    while True:
        if position + 12 > len(data):
            raise PNGError(f"PNG: {path} is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        payload = data[position + 8:position + 8 + length]
        crc_bytes = data[position + 8 + length:position + 12 + length]
        if len(crc_bytes) < 4:
            raise PNGError(f"PNG: {path} is truncated inside chunk {kind!r}")
        if struct.unpack(">I", crc_bytes)[0] != zlib.crc32(kind + payload):
            raise PNGError(f"PNG: {path} chunk {kind!r} fails its CRC check")
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
            raise PNGError(f"PNG: {path} row {y} has unknown filter type {kind}")
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
