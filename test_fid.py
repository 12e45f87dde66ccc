"""fid.py against pytorch-fid's own code: the same seeded random weights loaded into both networks
(the real file cannot be fetched here), the same images (theirs read from PNG files as
pytorch-fid reads them), the same features and FID; the resize and normalisation on odd sizes and
one channel; the weights found, downloaded (loopback HTTP and file://) and refused by hash."""
import contextlib
import functools
import hashlib
import http.server
import json
import importlib.metadata
import os
import sys
import threading
import types

import numpy as np
import pytest
import torch

import cli
import fid

# pytorch-fid and torchvision, installed outside the environment (an installed torchvision that
# cannot load its operators breaks diffusers' imports): .ci/run puts them here.
REFERENCE_DIR = os.environ.get("DDPM_FID_REFERENCE",
                               os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            ".fid-reference"))
INSTALL = ("python -m pip install --no-deps --target .fid-reference torchvision==0.28.0 "
           "pytorch-fid==0.3.0")


@contextlib.contextmanager
def pytorch_fid_modules():
    """pytorch-fid's inception and fid_score modules, imported from REFERENCE_DIR with
    torchvision's package __init__ skipped: it loads compiled operators that do not match the CPU
    torch ('operator torchvision::nms does not exist'), and the model code pytorch-fid uses needs
    none of them. Real torchvision and pytorch-fid code all the same; sys.path is restored and
    their modules are dropped afterwards."""
    found = os.path.isdir(os.path.join(REFERENCE_DIR, "pytorch_fid"))
    if not found and os.environ.get("CI"):
        pytest.fail(f"FID's reference is missing from {REFERENCE_DIR}: {INSTALL}")
    if not found:
        pytest.skip(f"FID's reference: {INSTALL}")
    assert "torchvision" not in sys.modules, "torchvision was imported before the reference"
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    package = types.ModuleType("torchvision")
    package.__path__ = [os.path.join(REFERENCE_DIR, "torchvision")]
    package.__version__ = next(importlib.metadata.distributions(
        name="torchvision", path=[REFERENCE_DIR])).version
    sys.modules["torchvision"] = package
    sys.path.insert(0, REFERENCE_DIR)
    try:
        import pytorch_fid.fid_score as fid_score
        import pytorch_fid.inception as inception
        import torchvision.transforms as transforms
        yield types.SimpleNamespace(inception=inception, fid_score=fid_score,
                                    transforms=transforms)
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:  # theirs only: torch's own stay loaded
            if name.split(".")[0] in ("torchvision", "pytorch_fid"):
                sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def reference():
    with pytorch_fid_modules() as modules:
        yield modules


def random_state_dict(seed=0):
    """Seeded weights of the FID Inception that keep the signal's scale through its 94 layers
    (He-normal convolutions, batch-norm statistics and affine terms drawn around 1 and 0), so that
    its features vary from image to image."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in fid.FIDInception().state_dict().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = value[0].numel()
            state[name] = torch.randn(value.shape, generator=g) * (2 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = 0.5 + torch.rand(value.shape, generator=g)
        elif name.endswith(("bn.bias", "running_mean", "fc.bias")):
            state[name] = 0.1 * torch.randn(value.shape, generator=g)
        else:  # num_batches_tracked
            state[name] = value
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    state = random_state_dict()
    torch.save(state, path)
    return path, state


def their_network(reference, state):
    """pytorch-fid's InceptionV3 (2048-d pool block) built with `state` in place of the download."""
    loader = reference.inception.load_state_dict_from_url
    reference.inception.load_state_dict_from_url = lambda *a, **k: state
    try:
        return reference.inception.InceptionV3([3]).eval()
    finally:
        reference.inception.load_state_dict_from_url = loader


def made_images(rng, n, channels, height, width):
    """uint8 images with structure (smooth ramps of random slope) and noise."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    images = np.empty((n, channels, height, width), np.uint8)
    for i in range(n):
        for c in range(channels):
            a, b, k = rng.uniform(-1, 1, 3)
            ramp = 128 + 100 * np.sin(3 * a * xx + 3 * b * yy + 6 * k)
            images[i, c] = np.clip(ramp + rng.normal(0, 20, (height, width)), 0, 255)
    return images


def save_pngs(directory, images):
    from PIL import Image
    directory.mkdir()
    for i, img in enumerate(images):
        pixels = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(pixels).save(directory / f"{i:03d}.png")
    return sorted(directory.glob("*.png"))


@pytest.mark.parametrize("channels,height,width", [(3, 29, 37), (1, 23, 23)])
def test_features_and_fid_equal_pytorch_fids(reference, weights, tmp_path, channels, height,
                                             width):
    """Our features of uint8 arrays equal pytorch-fid's get_activations of the same images saved
    as PNG (its ToTensor, convert("RGB"), resize and 2x - 1 included) with the same weights; the
    features vary between images; the FID of two sets equals calculate_frechet_distance of
    pytorch-fid's statistics."""
    path, state = weights
    images = made_images(np.random.default_rng(channels), 8, channels, height, width)
    theirs = reference.fid_score.get_activations(
        save_pngs(tmp_path / "png", images), their_network(reference, state), batch_size=4,
        dims=2048, device="cpu", num_workers=0).astype(np.float64)
    ours = fid.features(fid.load_network(path), images, batch_size=3, progress=False)
    assert ours.shape == theirs.shape == (8, 2048)
    spread = ours.std(0).mean()
    assert spread > 0.05 * np.abs(ours).mean() and spread > 1e-3  # "equal" says something
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
    # FID, on the first 3 dimensions: 4 images per set give covariances of full rank there
    # (pytorch-fid's sqrtm of the 2048-d product of rank-3 covariances is not well defined).
    a, b = (slice(0, 4), slice(4, 8))
    theirs_fid = reference.fid_score.calculate_frechet_distance(
        theirs[a, :3].mean(0), np.cov(theirs[a, :3], rowvar=False),
        theirs[b, :3].mean(0), np.cov(theirs[b, :3], rowvar=False))
    ours_fid = fid.fid(fid.statistics(ours[a, :3]), fid.statistics(ours[b, :3]))
    assert ours_fid == pytest.approx(theirs_fid, rel=1e-3)


def test_fid_formula_equals_pytorch_fids(reference):
    """The FD of 512-d statistics of full rank equals pytorch-fid's calculate_frechet_distance
    (its scipy sqrtm of Σ1 Σ2; ours the symmetric form of metrics.frechet_distance)."""
    rng = np.random.default_rng(0)
    d = 512  # the formula does not depend on the dimension; 2048 costs a minute of sqrtm
    f1 = rng.standard_normal((3000, d)) @ (np.eye(d) + 0.02 * rng.standard_normal((d, d)))
    f2 = rng.standard_normal((3000, d)) * 1.1 + 0.05
    s1, s2 = fid.statistics(f1), fid.statistics(f2)
    theirs = reference.fid_score.calculate_frechet_distance(*s1, *s2)
    assert fid.fid(s1, s2) == pytest.approx(theirs, rel=1e-6)


def their_network_input(reference, network, x):
    """What pytorch-fid's InceptionV3 feeds its first block for input x in [0, 1]."""
    seen = []

    class Seen(Exception):
        pass

    def hook(module, args):
        seen.append(args[0])
        raise Seen

    handle = network.blocks[0].register_forward_pre_hook(hook)
    try:
        with pytest.raises(Seen):
            network(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (28, 28), (31, 17), (300, 301)])
def test_resize_and_normalisation_equal_pytorch_fids(reference, weights, size):
    """On odd sizes, grey and colour: pytorch-fid's input to its network (ToTensor of PIL's
    convert("RGB"), bilinear resize to 299, 2x - 1) equals ours."""
    from PIL import Image
    _, state = weights
    network = their_network(reference, state)
    rng = np.random.default_rng(size[0])
    for channels in (1, 3):
        img = rng.integers(0, 256, (1, channels, *size), dtype=np.uint8)
        pil = Image.fromarray(img[0, 0] if channels == 1 else img[0].transpose(1, 2, 0))
        x = reference.transforms.ToTensor()(pil.convert("RGB"))[None]
        theirs = their_network_input(reference, network, x)
        ours = 2 * fid.resize(fid.to_unit(img)) - 1
        assert ours.shape == theirs.shape == (1, 3, 299, 299)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_weights_are_read_without_running_code(tmp_path):
    """A pickle that would run code is refused by weights_only loading, in one line."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo ran",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(cli.UserError, match="cannot read the Inception weights"):
        fid.load_network(path)
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(cli.UserError, match="does not hold FID Inception weights"):
        fid.load_network(path)


# ---- finding and downloading the weights --------------------------------------------------

@pytest.fixture
def served(tmp_path, monkeypatch, weights):
    """A directory holding a weights file under the standard name, and the standard hash prefix
    set to that file's, as for the real file."""
    source = tmp_path / "served"
    source.mkdir()
    data = weights[0].read_bytes()
    (source / fid.WEIGHTS_FILE).write_bytes(data)
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(data).hexdigest()[:8])
    return source


@contextlib.contextmanager
def loopback_server(directory):
    """An HTTP server on 127.0.0.1 (a free port) serving `directory`, stopped on exit."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_over_loopback_http_with_the_right_hash(served, tmp_path, weights):
    cache = tmp_path / "cache"
    with loopback_server(served) as root:
        path = fid.weights_path(cache, url=f"{root}/{fid.WEIGHTS_FILE}", progress=False)
    assert path == str(cache / fid.WEIGHTS_FILE)
    net = fid.load_network(path)
    torch.testing.assert_close(net.state_dict()["Mixed_7c.branch_pool.conv.weight"],
                               weights[1]["Mixed_7c.branch_pool.conv.weight"])
    assert fid.weights_path(cache, url="http://127.0.0.1:9/none") == path  # found, not fetched


def test_download_with_a_wrong_hash_saves_nothing(served, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", "00000000")
    cache = tmp_path / "cache"
    for url in ((served / fid.WEIGHTS_FILE).as_uri(), None):
        if url is None:
            with loopback_server(served) as root:
                url = f"{root}/{fid.WEIGHTS_FILE}"
                with pytest.raises(cli.UserError, match="not one starting 00000000"):
                    fid.weights_path(cache, url=url, progress=False)
        else:
            with pytest.raises(cli.UserError, match="not one starting 00000000; nothing was saved"):
                fid.weights_path(cache, url=url, progress=False)
        assert not cache.exists() or os.listdir(cache) == []


def test_download_from_a_file_url_with_the_right_hash(served, tmp_path):
    cache = tmp_path / "cache"
    path = fid.weights_path(cache, url=(served / fid.WEIGHTS_FILE).as_uri(), progress=False)
    assert open(path, "rb").read() == (served / fid.WEIGHTS_FILE).read_bytes()


def test_without_the_file_or_a_network_one_line_names_file_hash_and_place(tmp_path):
    cache = tmp_path / "cache"
    with loopback_server(tmp_path) as root:  # serves no weights: 404
        with pytest.raises(cli.UserError) as err:
            fid.weights_path(cache, url=f"{root}/{fid.WEIGHTS_FILE}", progress=False)
    text = str(err.value)
    assert "\n" not in text and fid.WEIGHTS_FILE in text and fid.WEIGHTS_SHA256_PREFIX in text
    assert str(cache) in text and fid.WEIGHTS_URL in text
    assert not cache.exists() or os.listdir(cache) == []


def test_a_damaged_file_in_the_cache_is_refused_by_its_hash(served, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    data = bytearray((served / fid.WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (cache / fid.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(cli.UserError, match="is damaged: its SHA-256"):
        fid.weights_path(cache, url="http://127.0.0.1:9/none", progress=False)


# ---- evaluate.py --fid --------------------------------------------------------------------

def direct_fid(net, a, b):
    return fid.fid(fid.statistics(fid.features(net, a, progress=False)),
                   fid.statistics(fid.features(net, b, progress=False)))


def test_evaluate_fid_of_a_run_with_its_floor_and_cached_statistics(tmp_path, monkeypatch,
                                                                    weights):
    """evaluate.py --ckpt RUN --fid N: the FID of N samples and the floor (the first N held-out
    images) against the training set; the statistics are cached, keyed by the data and the
    weights, and a second evaluation computes the samples' features only."""
    import data
    import evaluate
    import train
    import userdata
    save_pngs(tmp_path / "photos", made_images(np.random.default_rng(0), 16, 3, 16, 16))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    given = {"dataset": f"folder:{tmp_path / 'photos'}", "val_fraction": 0.3,
             "out": str(tmp_path / "run"), "steps": 2, "base_channels": 8,
             "norm_groups": 4, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attn_resolutions": (), "dropout": 0.0, "timesteps": 20, "sample_steps": 2,
             "batch_size": 4, "precision": "fp32", "device": "cpu", "num_samples": 2,
             "log_every": 1}
    train.train(given, progress=False)
    sets = {split: data.load_dataset(given["dataset"], split, folder=userdata.FolderOptions(
        val_fraction=0.3), progress=False) for split in ("train", "test")}
    n = min(4, len(sets["test"].images))
    assert n >= 2
    argv = ["--ckpt", str(tmp_path / "run"), "--n", "0", "--fid", "4", "--sampler", "ddim",
            "--steps", "2", "--fid-weights", str(weights[0])]
    evaluate.main(argv)
    r = json.loads((tmp_path / "run" / "eval.json").read_text())["fid"]
    net = fid.load_network(weights[0])
    assert r["count"] == 4 and r["reference_count"] == len(sets["train"].images) >= 8
    assert not r["standard_weights"] and r["floor_count"] == n
    assert r["floor"] == pytest.approx(direct_fid(net, sets["test"].images[:n],
                                                  sets["train"].images), rel=1e-6)
    assert r["fid"] > 0 and np.isfinite(r["fid"])
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert [f.split("-")[1] for f in cached if f.startswith("fid-")] == ["heldout", "train"]
    calls = []
    features = fid.features
    monkeypatch.setattr(fid, "features", lambda net, images, *a, **k: calls.append(len(images))
                        or features(net, images, *a, **k))
    evaluate.main(argv)
    again = json.loads((tmp_path / "run" / "eval.json").read_text())["fid"]
    assert calls == [4] and again["fid"] == pytest.approx(r["fid"], rel=1e-9)


def test_evaluate_fid_of_saved_samples_against_a_dataset(tmp_path, monkeypatch, weights):
    """evaluate.py --fid-of SAMPLES.npz --dataset npz:DATA: the FID of the saved samples against
    the dataset's images; an npz: dataset has no held-out images, so no floor."""
    import evaluate
    rng = np.random.default_rng(1)
    samples, real = made_images(rng, 5, 1, 20, 20), made_images(rng, 9, 3, 20, 20)
    np.savez(tmp_path / "samples.npz", images=samples)
    np.savez(tmp_path / "real.npz", images=real)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    evaluate.main(["--fid-of", str(tmp_path / "samples.npz"), "--dataset",
                   f"npz:{tmp_path / 'real.npz'}", "--fid-weights", str(weights[0]),
                   "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())["fid"]
    assert r["count"] == 5 and "floor" not in r
    assert r["fid"] == pytest.approx(direct_fid(fid.load_network(weights[0]), samples, real),
                                     rel=1e-6)


def test_evaluate_fid_without_weights_or_network_is_one_line(tmp_path, monkeypatch):
    import evaluate
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 1, 8, 8), np.uint8))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "WEIGHTS_URL", "http://127.0.0.1:9/none")
    monkeypatch.setattr(fid.weights_path, "__defaults__", (None, "http://127.0.0.1:9/none",
                                                           True, 60))
    with pytest.raises(cli.UserError, match=f"{fid.WEIGHTS_FILE} .SHA-256 starting"):
        evaluate.main(["--fid-of", str(tmp_path / "s.npz"), "--dataset",
                       f"npz:{tmp_path / 's.npz'}"])


def test_training_scored_by_fid_on_a_folder(tmp_path, monkeypatch, weights):
    """train.py --eval-every N --fid on a folder of colour images: FID records in log.jsonl, the
    weights found in the cache by their hash."""
    import rundir
    import train
    cache = tmp_path / "cache"
    cache.mkdir()
    data = weights[0].read_bytes()
    (cache / fid.WEIGHTS_FILE).write_bytes(data)
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(data).hexdigest()[:8])
    monkeypatch.setenv("DDPM_CACHE", str(cache))
    save_pngs(tmp_path / "photos", made_images(np.random.default_rng(2), 12, 3, 16, 16))
    given = {"dataset": f"folder:{tmp_path / 'photos'}", "out": str(tmp_path / "run"),
             "steps": 2, "base_channels": 8, "norm_groups": 4, "channel_mult": (1, 2),
             "num_res_blocks": 1, "attn_resolutions": (), "dropout": 0.0, "timesteps": 20,
             "sample_steps": 2, "batch_size": 4, "precision": "fp32", "device": "cpu",
             "num_samples": 2, "log_every": 1, "eval_every": 2, "eval_samples": 4, "fid": True}
    train.train(given, progress=False)
    lines = (tmp_path / "run" / rundir.LOG).read_text().splitlines()
    scores = [json.loads(s) for s in lines if '"kind": "eval"' in s]
    assert [r["step"] for r in scores] == [2] and np.isfinite(scores[0]["fid"])
    assert scores[0]["fid"] > 0 and scores[0]["samples"] == 4


def test_fid_in_training_needs_eval_every(tmp_path):
    import train
    with pytest.raises(cli.UserError, match="--fid scores the run every --eval-every"):
        train.train({"dataset": "mnist", "out": str(tmp_path / "r"), "fid": True, "steps": 1},
                    progress=False)
