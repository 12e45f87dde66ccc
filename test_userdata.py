"""Tests for userdata.py: folders of images built here with Pillow (good, odd and damaged files),
each decoded pixel checked against a closed form or against Pillow and NumPy doing the same step
by themselves; and npz files with labels."""
import builtins
import errno
import hashlib
import os
import pathlib
import shutil
import tempfile
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

import data
import userdata
from test_data import assert_one_line


# ----------------------------------------------------------------------------- helpers


def save(path, array, mode=None, **options):
    """Write a uint8/uint16 array as an image file (format from the name); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path, **options)
    return path


def grey(seed, size=8):
    """A random uint8 size x size array."""
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def read(folder, tmp_path, **options):
    """load_folder with a private cache, no progress bar and (unless asked) nothing held out."""
    options.setdefault("val_fraction", 0)
    return userdata.load_folder(folder, cache_dir=tmp_path / "cache", progress=False, **options)


def images_by_path(part):
    """{relative path: uint8 [C, H, W]} of a Part."""
    return dict(zip(part.paths, part.images))


@pytest.fixture
def count_opens(monkeypatch):
    """A list that grows by one path for each PIL.Image.open call."""
    opened, real_open = [], Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(getattr(fp, "name", fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


# ----------------------------------------------------------------------------- pixels


def test_grey_pngs_in_nested_folders_are_one_channel(tmp_path):
    folder = tmp_path / "imgs"
    arrays = {"a.png": grey(0), "sub/b.png": grey(1), "sub/deeper/still/c.png": grey(2)}
    for relpath, array in arrays.items():
        save(folder / relpath, array)
    result = read(folder, tmp_path)
    assert result.train.paths == tuple(sorted(arrays))
    assert result.train.images.shape == (3, 1, 8, 8) and result.train.images.dtype == np.uint8
    for relpath, image in images_by_path(result.train).items():
        np.testing.assert_array_equal(image[0], arrays[relpath])
    assert result.train.labels is None and result.class_names is None
    assert len(result.val.images) == 0 and result.val.images.shape[1:] == (1, 8, 8)


def test_colour_makes_three_channels_and_grey_planes_count_as_grey(tmp_path):
    folder = tmp_path / "imgs"
    colour = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    equal_planes = np.repeat(grey(4)[:, :, None], 3, axis=2)
    save(folder / "colour.png", colour)
    save(folder / "grey.png", grey(5))
    save(folder / "equal.png", equal_planes)  # stored as RGB, but grey
    got = images_by_path(read(folder, tmp_path).train)
    np.testing.assert_array_equal(got["colour.png"], colour.transpose(2, 0, 1))
    np.testing.assert_array_equal(got["grey.png"], np.repeat(grey(5)[None], 3, axis=0))
    (folder / "colour.png").unlink()
    only_grey = read(folder, tmp_path)
    assert only_grey.train.images.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(images_by_path(only_grey.train)["equal.png"][0], grey(4))


def test_channels_one_is_itu_601_luma_and_three_repeats_grey(tmp_path):
    folder = tmp_path / "imgs"
    colour = np.random.default_rng(6).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    save(folder / "colour.png", colour)
    save(folder / "grey.png", grey(7))
    as_grey = images_by_path(read(folder, tmp_path, channels=1).train)
    luma = colour.astype(float) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert np.abs(as_grey["colour.png"][0] - luma).max() <= 1  # Pillow rounds in fixed point
    only_grey = tmp_path / "only-grey"
    save(only_grey / "g.png", grey(7))
    three = read(only_grey, tmp_path, channels=3).train.images
    assert three.shape == (1, 3, 8, 8) and (three == grey(7)).all()


@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    """EXIF 3: rotate 180 degrees to show; 6: 90 clockwise; 8: 90 counter-clockwise."""
    folder = tmp_path / "imgs"
    stored = np.zeros((16, 16), np.uint8)
    stored[:8, :4] = 255  # a bar in the top-left corner: every rotation looks different
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(folder / "photo.jpg", stored, exif=exif, quality=95)
    with Image.open(path) as image:
        decoded = np.asarray(image)  # as stored, before any orientation
    assert (decoded[:8, :4] > 200).all()
    expected = np.rot90(decoded, k=turns)
    got = read(folder, tmp_path).train.images
    assert got.shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(got[0, 0], expected)


def test_sixteen_bit_png_scaled_with_rounding(tmp_path):
    folder = tmp_path / "imgs"
    values = np.array([0, 1, 128, 129, 256, 257, 385, 386, 1000, 32767, 32768, 40000, 65000,
                       65406, 65407, 65535], dtype=np.uint16).reshape(4, 4)
    path = save(folder / "deep.png", values)
    with Image.open(path) as image:
        assert image.mode.startswith("I;16")  # a genuine 16-bit file
    got = read(folder, tmp_path).train.images
    expected = [round(Fraction(int(v) * 255, 65535)) for v in values.ravel()]
    assert got.shape == (1, 1, 4, 4)
    assert got.ravel().tolist() == expected


def test_sixteen_bit_pgm_opens_as_mode_i_and_is_scaled_too(tmp_path):
    """A 16-bit binary PGM (maxval 65535), which Pillow opens as mode I: scaled to 8 bits with
    the same rounding as a 16-bit PNG, round(v * 255 / 65535)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    values = np.array([0, 128, 129, 257, 385, 386, 1000, 32767, 32768, 40000, 65000, 65406,
                       65407, 65535, 300, 60000], dtype=">u2").reshape(4, 4)
    (folder / "deep.pgm").write_bytes(b"P5\n4 4\n65535\n" + values.tobytes())
    with Image.open(folder / "deep.pgm") as image:
        assert image.mode == "I"
    got = read(folder, tmp_path).train.images
    assert got.ravel().tolist() == [round(Fraction(int(v) * 255, 65535)) for v in values.ravel()]


def test_equal_red_and_green_with_another_blue_stay_colour(tmp_path):
    """Only an image whose three planes are all equal counts as grey: R = G with B different is
    colour, kept as it is, and makes the folder three-channel."""
    folder = tmp_path / "imgs"
    rgb = np.repeat(grey(40)[:, :, None], 3, axis=2)
    rgb[..., 2] = grey(41)
    save(folder / "yellowish.png", rgb)
    save(folder / "grey.png", grey(42))
    got = images_by_path(read(folder, tmp_path).train)
    np.testing.assert_array_equal(got["yellowish.png"], rgb.transpose(2, 0, 1))


def test_palette_with_alpha_is_composited_on_white(tmp_path):
    assert userdata.BACKGROUND == 255  # white, as the docstring says
    folder = tmp_path / "imgs"
    palette = [(200, 30, 40), (10, 220, 90), (0, 0, 0), (255, 255, 255)]
    alphas = [255, 128, 0, 64]
    indices = np.array([[0, 1, 2, 3]] * 4, dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([c for colour in palette for c in colour])
    path = tmp_path / "imgs" / "pal.png"
    folder.mkdir()
    image.save(path, transparency=bytes(alphas))
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    got = read(folder, tmp_path).train.images[0]  # [3, 4, 4]
    for column, (colour, alpha) in enumerate(zip(palette, alphas)):
        expected = [round(Fraction(c * alpha + 255 * (255 - alpha), 255)) for c in colour]
        assert got[:, 0, column].tolist() == expected


def test_grey_with_alpha_is_grey_composited(tmp_path):
    folder = tmp_path / "imgs"
    level = np.array([[0, 100, 200, 255]] * 4, dtype=np.uint8)
    alpha = np.array([[0, 50, 255, 128]] * 4, dtype=np.uint8).T
    save(folder / "la.png", np.stack([level, alpha], axis=2), "LA")
    got = read(folder, tmp_path).train.images
    assert got.shape == (1, 1, 4, 4)
    expected = [[round(Fraction(int(v) * int(a) + 255 * (255 - int(a)), 255))
                 for v, a in zip(row_v, row_a)] for row_v, row_a in zip(level, alpha)]
    assert got[0, 0].tolist() == expected


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    quadrants = {(0, 0): (0, 0, 0, 0), (0, 8): (255, 0, 0, 0),
                 (8, 0): (0, 0, 0, 128), (8, 8): (0, 255, 255, 0)}
    image = Image.new("CMYK", (16, 16))
    for (top, left), cmyk in quadrants.items():
        image.paste(cmyk, (left, top, left + 8, top + 8))
    image.save(folder / "print.jpg", quality=100)
    got = read(folder, tmp_path).train.images[0].astype(int)  # [3, 16, 16]
    for (top, left), (c, m, y, k) in quadrants.items():
        expected = [(255 - ink) * (255 - k) / 255 for ink in (c, m, y)]
        block = got[:, top:top + 8, left:left + 8]
        assert np.abs(block - np.array(expected)[:, None, None]).max() <= 4


def test_gif_first_frame_webp_bmp_and_tiff_are_read(tmp_path):
    folder = tmp_path / "imgs"
    first, second = grey(8), grey(9)
    frames = [Image.fromarray(a) for a in (first, second)]
    folder.mkdir()
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    save(folder / "lossless.webp", grey(10), lossless=True)
    save(folder / "plain.bmp", grey(11))
    save(folder / "scan.tif", grey(12))
    got = images_by_path(read(folder, tmp_path).train)
    assert sorted(got) == ["anim.gif", "lossless.webp", "plain.bmp", "scan.tif"]
    for name, array in [("anim.gif", first), ("plain.bmp", grey(11)), ("scan.tif", grey(12))]:
        np.testing.assert_array_equal(got[name][0], array)
    webp = got["lossless.webp"]  # WebP stores colour: its planes may be equal or not
    assert np.abs(webp.astype(int) - grey(10)).max() <= 1


# ----------------------------------------------------------------------------- sizes


def make_mixed_sizes(folder):
    """3 images 16x16, 2 of 20x20, 1 of 16x12 (width x height), named so the 16x16 come first."""
    rng = np.random.default_rng(0)
    shapes = {"a0.png": (16, 16), "a1.png": (16, 16), "a2.png": (16, 16), "b0.png": (20, 20),
              "b1.png": (20, 20), "c.png": (12, 16)}
    arrays = {}
    for name, shape in shapes.items():
        arrays[name] = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        save(folder / name, arrays[name])
    return arrays


def test_mixed_sizes_error_lists_sizes_with_counts(tmp_path):
    folder = tmp_path / "imgs"
    make_mixed_sizes(folder)
    with pytest.raises(data.DataError) as excinfo:
        read(folder, tmp_path)
    assert_one_line(excinfo, "16x16 (3)", "20x20 (2)", "16x12 (1)", "--image-size")


def test_one_size_not_square_asks_for_image_size(tmp_path):
    folder = tmp_path / "imgs"
    save(folder / "wide.png", np.zeros((6, 10), np.uint8))
    with pytest.raises(data.DataError) as excinfo:
        read(folder, tmp_path)
    assert_one_line(excinfo, "10x6", "not square", "--image-size")


def test_image_size_centre_crops_then_resizes_as_pillow_does(tmp_path):
    folder = tmp_path / "imgs"
    arrays = make_mixed_sizes(folder)
    got = images_by_path(read(folder, tmp_path, image_size=8).train)
    for name, array in arrays.items():
        height, width = array.shape[:2]
        side = min(height, width)
        box = ((width - side) // 2, (height - side) // 2,
               (width - side) // 2 + side, (height - side) // 2 + side)
        expected = Image.fromarray(array).crop(box).resize((8, 8), Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(got[name], np.asarray(expected).transpose(2, 0, 1))


def test_small_images_are_enlarged_as_pillow_does(tmp_path):
    """4x4 images with --image-size 8: enlarged by Pillow's LANCZOS filter, not left small."""
    folder = tmp_path / "imgs"
    small = grey(43, size=4)
    save(folder / "small.png", small)
    got = read(folder, tmp_path, image_size=8).train.images
    expected = Image.fromarray(small).resize((8, 8), Image.Resampling.LANCZOS)
    assert got.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(got[0, 0], np.asarray(expected))


def test_crop_keeps_the_centre_square(tmp_path):
    """A uniform centre square between margins of another colour: after crop and resize, only
    the centre's colour is left (whatever the resampling filter)."""
    folder = tmp_path / "imgs"
    tall, wide = np.full((30, 10), 40, np.uint8), np.full((10, 30), 40, np.uint8)
    tall[10:20], wide[:, 10:20] = 200, 200
    save(folder / "tall.png", tall)
    save(folder / "wide.png", wide)
    got = read(folder, tmp_path, image_size=4).train.images
    assert got.shape == (2, 1, 4, 4) and (got == 200).all()


# ----------------------------------------------------------------------------- bad files


def make_damaged_folder(folder):
    """Two good 8x8 images (one inside a directory named like an image) and four bad files;
    returns {relative path: expected reason fragment} of the bad ones."""
    save(folder / "good.png", grey(20))
    save(folder / "dir.png" / "inside.png", grey(21))
    whole = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[:len(whole) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all")
    (folder / "readme.txt").write_text("ignored: not named as an image")
    save(folder / "big.png", grey(22, size=40))
    return {"truncated.png": "truncated", "empty.png": "empty", "notes.png": "not an image",
            "big.png": "decompression"}


def test_bad_files_are_named_skipped_and_counted(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    bad = make_damaged_folder(folder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 40 x 40 = 1600 > 2 x 600: an error
    result = read(folder, tmp_path)
    assert result.train.paths == ("dir.png/inside.png", "good.png")
    assert dict(result.skipped).keys() == bad.keys()
    err = capsys.readouterr().err
    for relpath, reason in bad.items():
        [line] = [line for line in err.splitlines() if line.startswith("skipping")
                  and line.split(":")[0].endswith(relpath)]
        assert reason in line.lower() and str(folder / relpath) in line
    assert "skipped 4 of 6 image files" in err
    assert "Traceback" not in err


def test_bomb_warning_size_is_skipped_too(tmp_path, capsys, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice it Pillow only warns; the reader skips it all the same."""
    folder = tmp_path / "imgs"
    save(folder / "ok.png", grey(23, size=8))
    save(folder / "large.png", grey(24, size=12))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 < 100 < 144 < 200
    result = read(folder, tmp_path)
    assert result.train.paths == ("ok.png",)
    assert dict(result.skipped)["large.png"].startswith(
        "too large for Pillow's decompression-bomb guard")  # said as such, not "damaged"


def test_permission_denied_is_skipped(tmp_path, capsys, monkeypatch):
    """The reason an unreadable file gives, raised where the reader opens the file (this runs
    as root too, where chmod 000 does not stop reading)."""
    folder = tmp_path / "imgs"
    save(folder / "ok.png", grey(25))
    locked = save(folder / "locked.png", grey(26))
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    result = read(folder, tmp_path)
    assert result.train.paths == ("ok.png",)
    assert result.skipped == (("locked.png", "Permission denied"),)
    assert f"skipping {locked}: Permission denied" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no file modes here")
def test_unreadable_file_is_skipped(tmp_path):
    """A file whose mode forbids reading it (chmod 000) is skipped with the system's reason. Root
    reads such a file, so as root the folder is read with the effective user id of nobody
    (os.seteuid, restored afterwards), in a folder of /tmp that nobody can enter."""
    as_root = os.geteuid() == 0
    base = pathlib.Path(tempfile.mkdtemp(prefix="unreadable-")) if as_root else tmp_path
    try:
        base.chmod(0o755)
        folder = base / "imgs"
        save(folder / "ok.png", grey(27))
        locked = save(folder / "locked.png", grey(28))
        cache = base / "cache"
        cache.mkdir(mode=0o777)
        cache.chmod(0o777)
        locked.chmod(0)
        read(folder, tmp_path)  # as the owner: what the read imports is imported
        if as_root:
            os.seteuid(NOBODY)
        try:
            result = userdata.load_folder(folder, cache_dir=cache, progress=False, val_fraction=0)
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        if as_root:
            shutil.rmtree(base)
    assert result.train.paths == ("ok.png",)
    assert dict(result.skipped)["locked.png"] == os.strerror(errno.EACCES)  # Permission denied


NOBODY = 65534  # the user id of "nobody"


def test_hidden_files_and_folders_are_passed_over(tmp_path, capsys, count_opens):
    folder = tmp_path / "imgs"
    save(folder / "seen.png", grey(32))
    save(folder / ".git" / "objects.png", grey(33))
    (folder / "._seen.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    result = read(folder, tmp_path)
    assert result.train.paths == ("seen.png",) and result.skipped == ()
    assert len(count_opens) == 1 and capsys.readouterr().err == ""


def test_folder_without_usable_image_is_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    (folder / "b.txt").write_text("y")
    (folder / "c.png").write_bytes(b"")
    with pytest.raises(data.DataError) as excinfo:
        read(folder, tmp_path)
    assert_one_line(excinfo, str(folder), "no usable image", "1 files skipped", ".txt (2)")


@pytest.mark.parametrize("options, needle", [
    ({"channels": 2}, "channels"), ({"image_size": 0}, "image size"),
    ({"image_size": 8.5}, "image size"), ({"labels": "folders"}, "subfolders"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": -0.1}, "val_fraction")])
def test_bad_options_are_one_line(tmp_path, options, needle):
    save(tmp_path / "imgs" / "a.png", grey(29))
    with pytest.raises(data.DataError) as excinfo:
        read(tmp_path / "imgs", tmp_path, **options)
    assert_one_line(excinfo, needle)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        read(tmp_path / "nowhere", tmp_path)
    assert_one_line(excinfo, "does not exist")
    save(tmp_path / "a.png", grey(30))
    with pytest.raises(data.DataError) as excinfo:
        read(tmp_path / "a.png", tmp_path)
    assert_one_line(excinfo, "is not a folder")


def test_without_pillow_one_line_with_the_pip_command(tmp_path, monkeypatch):
    save(tmp_path / "imgs" / "a.png", grey(31))
    real_import = builtins.__import__

    def no_pillow(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pillow)
    with pytest.raises(data.DataError) as excinfo:
        read(tmp_path / "imgs", tmp_path)
    assert_one_line(excinfo, "needs Pillow: pip install pillow")


# ----------------------------------------------------------------------------- cache


def test_unchanged_folder_is_read_from_the_cache_without_opening_an_image(tmp_path, count_opens):
    folder = tmp_path / "imgs"
    for i in range(3):
        save(folder / f"{i}.png", grey(40 + i))
    first = read(folder, tmp_path)
    assert len(count_opens) == 3
    cache_files = os.listdir(tmp_path / "cache")
    assert len(cache_files) == 1 and cache_files[0].endswith(".npz")
    count_opens.clear()
    second = read(folder, tmp_path)
    assert count_opens == []
    np.testing.assert_array_equal(second.train.images, first.train.images)
    assert second.train.paths == first.train.paths


def test_cache_hit_repeats_the_skipped_lines(tmp_path, capsys):
    folder = tmp_path / "imgs"
    save(folder / "ok.png", grey(45))
    (folder / "empty.png").write_bytes(b"")
    first = read(folder, tmp_path)
    first_err = capsys.readouterr().err
    second = read(folder, tmp_path)
    assert second.skipped == first.skipped == (("empty.png", "empty file (0 bytes)"),)
    assert capsys.readouterr().err == first_err


@pytest.mark.parametrize("change", ["touch", "add", "remove", "options"])
def test_changed_folder_is_decoded_again(tmp_path, count_opens, change):
    folder = tmp_path / "imgs"
    for i in range(3):
        save(folder / f"{i}.png", grey(50 + i))
    read(folder, tmp_path)
    count_opens.clear()
    options = {}
    if change == "touch":
        stat = os.stat(folder / "1.png")
        os.utime(folder / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 10))
    elif change == "add":
        save(folder / "3.png", grey(53))
    elif change == "remove":
        (folder / "0.png").unlink()
    else:
        options = {"image_size": 4}
    result = read(folder, tmp_path, **options)
    assert len(count_opens) == len(result.train.paths) > 0
    expected = {"touch": 3, "add": 4, "remove": 2, "options": 3}[change]
    assert len(result.train.images) == expected


def test_a_file_replaced_by_one_of_the_same_size_and_time_is_decoded_again(tmp_path):
    """A file overwritten by another of the same size, its modification time set back (as cp -p,
    rsync -t or touch -r leave it): the new pixels are read, not the cached ones."""
    folder = tmp_path / "imgs"
    save(folder / "a.bmp", grey(60))
    save(folder / "b.bmp", grey(61))
    np.testing.assert_array_equal(read(folder, tmp_path).train.images[0, 0], grey(60))
    before = os.stat(folder / "a.bmp")
    replacement = save(tmp_path / "other.bmp", grey(62)).read_bytes()
    assert len(replacement) == before.st_size  # uncompressed: the same size
    (folder / "a.bmp").write_bytes(replacement)
    os.utime(folder / "a.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(folder / "a.bmp")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    np.testing.assert_array_equal(read(folder, tmp_path).train.images[0, 0], grey(62))


def test_damaged_cache_file_is_rebuilt(tmp_path):
    folder = tmp_path / "imgs"
    save(folder / "a.png", grey(55))
    read(folder, tmp_path)
    [name] = os.listdir(tmp_path / "cache")
    (tmp_path / "cache" / name).write_bytes(b"not a zip")
    result = read(folder, tmp_path)
    np.testing.assert_array_equal(result.train.images[0, 0], grey(55))


def snapshot(folder):
    """{relative path: (kind, size, mtime_ns, sha256)} of everything under folder."""
    state = {}
    for directory, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            digest = None
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            state[os.path.relpath(path, folder)] = (stat.st_mode, stat.st_size, stat.st_mtime_ns,
                                                    digest)
    return state


def test_nothing_inside_the_folder_is_ever_written(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    make_damaged_folder(folder)
    save(folder / "class" / "x.jpg", grey(56, size=40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    before = snapshot(folder)
    read(folder, tmp_path, val_fraction=0.5)
    read(folder, tmp_path, image_size=4, channels=3)
    read(folder, tmp_path)  # a cache hit
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------- the split


def independent_held_out(relpath, fraction):
    """The documented rule, written again: sha256 of the path, first 8 bytes / 2**64."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:16], 16) < fraction * 2 ** 64


def test_split_is_disjoint_reproducible_and_follows_the_hash_rule(tmp_path):
    folder = tmp_path / "imgs"
    names = [f"d{i % 3}/img{i:03d}.png" for i in range(60)]
    for i, name in enumerate(names):
        save(folder / name, grey(i, size=4))
    result = read(folder, tmp_path, val_fraction=0.3)
    train, val = set(result.train.paths), set(result.val.paths)
    assert not train & val and train | val == set(names)
    assert val == {n for n in names if independent_held_out(n, 0.3)}
    assert 0 < len(val) < 60
    for part in (result.train, result.val):
        for relpath, image in images_by_path(part).items():
            np.testing.assert_array_equal(image[0], grey(names.index(relpath), size=4))
    again = read(folder, tmp_path, val_fraction=0.3)
    assert again.train.paths == result.train.paths and again.val.paths == result.val.paths
    for i in range(60, 80):
        save(folder / f"d{i % 3}/img{i:03d}.png", grey(i, size=4))
    grown = read(folder, tmp_path, val_fraction=0.3)
    assert val <= set(grown.val.paths) and train <= set(grown.train.paths)


def test_held_out_share_matches_the_fraction():
    n, fraction = 20000, 0.05
    share = np.mean([userdata.held_out(f"class{i % 7}/image_{i}.png", fraction) for i in range(n)])
    assert abs(share - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / n)
    assert not any(userdata.held_out(f"x{i}.png", 0) for i in range(1000))


# ----------------------------------------------------------------------------- labels


def test_labels_from_subfolders(tmp_path):
    folder = tmp_path / "imgs"
    layout = {"zebra": 2, "ant": 3, "moth": 1}
    for cls, n in layout.items():
        for i in range(n):
            save(folder / cls / "nested" / f"{i}.png" if i == 0 else folder / cls / f"{i}.png",
                 grey(60 + i))
    result = read(folder, tmp_path, labels="subfolders")
    assert result.class_names == ("ant", "moth", "zebra") and result.num_classes == 3
    for relpath, label in zip(result.train.paths, result.train.labels):
        assert result.class_names[label] == relpath.split("/")[0]
    assert result.train.labels.dtype == np.int64
    assert np.bincount(result.train.labels).tolist() == [3, 1, 2]
    assert result.hint is None


def test_labels_split_with_their_images(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(30):
        save(folder / f"c{i % 2}" / f"{i}.png", grey(i, size=4))
    result = read(folder, tmp_path, labels="subfolders", val_fraction=0.4)
    for part in (result.train, result.val):
        assert len(part.labels) == len(part.images) == len(part.paths)
        assert [f"c{label}" for label in part.labels] == [p.split("/")[0] for p in part.paths]


def test_subfolder_labels_refuse_loose_images(tmp_path):
    folder = tmp_path / "imgs"
    save(folder / "cats" / "a.png", grey(70))
    save(folder / "stray.png", grey(71))
    with pytest.raises(data.DataError) as excinfo:
        read(folder, tmp_path, labels="subfolders")
    assert_one_line(excinfo, "stray.png", "move them into a subfolder")


def test_hint_when_every_image_is_in_subfolders(tmp_path):
    folder = tmp_path / "imgs"
    save(folder / "cats" / "a.png", grey(72))
    save(folder / "dogs" / "b.png", grey(73))
    hint = read(folder, tmp_path).hint
    assert "--labels subfolders" in hint and "cats, dogs" in hint and "\n" not in hint
    save(folder / "loose.png", grey(74))
    assert read(folder, tmp_path).hint is None


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_labels_or_y(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    labels = np.array([2, 0, 1, 1, 0, 2], dtype=np.uint8)
    got = userdata.load_labelled_npz(write_npz(tmp_path / "a.npz", images=images, labels=labels))
    np.testing.assert_array_equal(got.images, images[:, None])
    assert got.labels.dtype == np.int64 and got.labels.tolist() == labels.tolist()
    got = userdata.load_labelled_npz(write_npz(tmp_path / "b.npz", x=images, y=labels))
    assert got.labels.tolist() == labels.tolist()
    assert userdata.load_labelled_npz(write_npz(tmp_path / "c.npz", images=images)).labels is None
    np.save(tmp_path / "d.npy", images)
    assert userdata.load_labelled_npz(tmp_path / "d.npy").labels is None


@pytest.mark.parametrize("labels, needle", [
    (np.array([0, 1, 0, 1, 0]), "shape (5,) for 6 images"),
    (np.array([0, 1, -1, 1, 0, 1]), "negative"),
    (np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]), "float64 labels"),
    (np.array([[0], [1], [0], [1], [0], [1]]), "shape (6, 1)"),
    (np.array([1, 2, 3, 1, 2, 3]), "class 0"),
    (np.array([0, 2, 3, 0, 2, 3]), "class 1"),
    (np.array([True, False] * 3), "bool labels")])
def test_npz_bad_labels_are_one_line(tmp_path, labels, needle):
    images = np.zeros((6, 4, 4), np.uint8)
    path = write_npz(tmp_path / "bad.npz", images=images, labels=labels)
    with pytest.raises(data.DataError) as excinfo:
        userdata.load_labelled_npz(path)
    assert_one_line(excinfo, path, needle)


def test_npz_missing_and_damaged(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        userdata.load_labelled_npz(tmp_path / "none.npz")
    assert_one_line(excinfo, "does not exist")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(data.DataError) as excinfo:
        userdata.load_labelled_npz(tmp_path / "bad.npz")
    assert_one_line(excinfo, "cannot read")


def test_unwritable_cache_is_a_warning_and_the_images_still_come(tmp_path, capsys):
    folder = tmp_path / "imgs"
    save(folder / "a.png", grey(80))
    (tmp_path / "not-a-dir").write_text("a file where the cache directory should be")
    result = userdata.load_folder(folder, cache_dir=tmp_path / "not-a-dir", progress=True)
    np.testing.assert_array_equal(result.train.images.reshape(-1, 8, 8)[0], grey(80))
    err = capsys.readouterr().err
    assert "warning: cannot write cache file" in err and "$DDPM_CACHE" in err


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_linked_folders_are_followed_and_a_loop_is_walked_once(tmp_path):
    folder, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere"
    save(folder / "a.png", grey(81))
    save(elsewhere / "b.png", grey(82))
    os.symlink(elsewhere, folder / "linked")
    os.symlink(folder, folder / "loop")
    assert read(folder, tmp_path).train.paths == ("a.png", "linked/b.png")
