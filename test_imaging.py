"""Tests for imaging.py: pixel conversions, grids, and the PNG writer, its files decoded by Pillow
(an independent reader) and their chunks checked byte by byte here."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import imaging
from test_data import assert_one_line


# ----------------------------------------------------------------------------- PNG and grids


def read_png(path):
    """A PNG file's pixels as Pillow decodes them: uint8 H x W (grey) or H x W x 3 (RGB)."""
    with Image.open(path) as image:
        return np.asarray(image)


def png_chunks(content):
    """[(type, payload)] of a PNG, asserting each CRC independently."""
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, position = [], 8
    while position < len(content):
        length, kind = struct.unpack(">I4s", content[position:position + 8])
        payload = content[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", content[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF
        chunks.append((kind, payload))
        position += 12 + length
    return chunks


@pytest.mark.parametrize("shape, color_type", [((7, 5), 0), ((6, 9, 3), 2)])
def test_png_round_trip_and_structure(tmp_path, shape, color_type):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "out.png"
    imaging.save_png(str(path), img)
    np.testing.assert_array_equal(read_png(path), img)
    chunks = png_chunks(path.read_bytes())
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (shape[1], shape[0], 8, color_type, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == shape[0] * (1 + img[0].size)
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_png_failure_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(cli.UserError) as excinfo:
        imaging.save_png(str(tmp_path / "file" / "out.png"), np.zeros((2, 2), np.uint8))
    assert_one_line(excinfo, "out.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_make_grid_geometry(channels):
    images = np.stack([np.full((channels, 3, 4), i + 1, np.uint8) for i in range(5)])
    grid = imaging.make_grid(images, pad=2)
    assert grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2) + ((3,) if channels == 3 else ())
    for i in range(5):
        top, left = 2 + (i // 3) * 5, 2 + (i % 3) * 6
        assert (grid[top:top + 3, left:left + 4] == i + 1).all()
    assert (grid == 0).sum() == grid.size - 5 * 12 * channels  # padding and the empty slot
    assert imaging.make_grid(images, nrow=5, pad=0).shape[:2] == (3, 20)


def test_make_grid_of_real_sized_batch():
    grid = imaging.make_grid(np.zeros((64, 1, 28, 28), np.uint8))
    assert grid.shape == (8 * 30 + 2, 8 * 30 + 2)


# ----------------------------------------------------------------------------- pixel conversions


def test_model_range_round_trip_is_exact_for_every_level():
    levels = torch.arange(256, dtype=torch.uint8)
    x = imaging.to_model_range(levels)
    assert x.dtype == torch.float32
    assert x[0].item() == -1.0 and x[-1].item() == 1.0
    assert torch.equal(imaging.to_uint8(x), levels)
    np.testing.assert_allclose(x.numpy(), np.arange(256) / 127.5 - 1, atol=1e-6)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 5.0])
    assert imaging.to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]
    with pytest.raises(TypeError):
        imaging.to_model_range(torch.zeros(3))
