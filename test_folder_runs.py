"""A folder of images through the scripts: a 64x64 RGB folder trains at a narrow width, samples and
evaluates (the held-out split's bits/dim, the copy check) on the CPU; the network fitted to the
folder's size; the run's reading options and class names in its checkpoint; the flips of
--hflip, a function of (seed, step, position), with resume bit-exact; runs saved before these
options resume as they were."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import cli
import config
import data
import ddpm
import evaluate
import imaging
import optim
import sample
import train

Image = pytest.importorskip("PIL.Image")

NARROW = {"base_channels": 8, "norm_groups": 4, "num_res_blocks": 1, "dropout": 0.0,
          "timesteps": 50, "batch_size": 8, "lr": 2e-3, "warmup": 2, "lr_schedule": "constant", "log_every": 2,
          "ckpt_every": 1000, "sample_every": 1000, "num_samples": 2, "sample_steps": 2,
          "precision": "fp32", "device": "cpu", "seed": 0}


def write_folder(root, count, size, classes=("cats", "dogs"), rgb=True, seed=0):
    """count size x size images in class subfolders: a coloured square on a grey field."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((size, size, 3), 40 + 20 * (i % len(classes)), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        pixels[top:top + size // 3, left:left + size // 3] = rng.integers(0, 256, 3)
        image = Image.fromarray(pixels if rgb else pixels[..., 0])
        image.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def rgb64(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("rgb64"), 48, 64)


def test_a_64x64_rgb_folder_trains_samples_and_evaluates(rgb64, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train.train({**NARROW, "dataset": f"folder:{rgb64}", "out": str(out), "steps": 4,
                 "labels": "subfolders", "val_fraction": 0.25}, progress=False)
    err = capsys.readouterr().err
    assert "2 classes: 0 cats, 1 dogs" in err
    assert "will likely learn to copy them" in err and "--nearest" in err
    state = checkpoint.load(out)
    c, t = state["config"], state["config"]["train"]
    assert (t["image_size"], t["channels"], t["labels"], t["val_fraction"], t["hflip"]) == \
        (None, None, "subfolders", 0.25, True)  # size and channels as found: 64, 3
    assert (c["net"]["image_size"], c["net"]["in_channels"]) == (64, 3)
    assert c["class_names"] == ["cats", "dogs"]
    # the CPU's network, fitted to 64 pixels: after its 2x2 stem, levels 32, 16, 8, attention
    # where mnist-stem's second level had it
    assert c["net"]["channel_mult"] == (1, 2, 2) and c["net"]["attn_resolutions"] == (16,)
    assert c["net"]["space_to_depth"] == 2
    cli.run_script(sample.main, ["--ckpt", str(out), "--n", "2", "--steps", "2", "--out",
                                 str(tmp_path / "s.png")])
    with Image.open(tmp_path / "s.png") as grid:
        assert grid.mode == "RGB" and grid.size == (2 * 66 + 2, 66 + 2)
    cli.run_script(evaluate.main, ["--ckpt", str(out), "--n", "3", "--nll-batch-size", "3",
                                   "--samples", "0", "--nearest", "4", "--steps", "2",
                                   "--json", str(tmp_path / "e.json")])
    results = evaluate_json(tmp_path / "e.json")
    held_out = len(data.load_dataset(f"folder:{rgb64}", "test", folder=config_options(t)).images)
    assert 0 < held_out < 48
    assert results["nll"]["split"] == "held-out" and results["nll"]["images"] == min(3, held_out)
    assert results["copies"]["heldout"] == held_out and results["copies"]["train"] == 48 - held_out
    assert 0 <= results["copies"]["pixels"]["fraction"] <= 1
    assert (tmp_path / "run" / "nearest.png").exists()


def evaluate_json(path):
    import json
    with open(path) as f:
        return json.load(f)


def config_options(c):
    import userdata
    return userdata.options_of(c)


def test_held_out_images_are_needed_for_the_copy_check(rgb64, tmp_path, monkeypatch, capsys):
    """--val-fraction 0 holds nothing out: evaluate.py's test split (and so --nearest) is one
    line naming --val-fraction."""
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    train.train({**NARROW, "dataset": f"folder:{rgb64}", "out": str(tmp_path / "run"),
                 "steps": 2, "val_fraction": 0.0}, progress=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_script(evaluate.main, ["--ckpt", str(tmp_path / "run"), "--n", "0",
                                       "--samples", "0", "--nearest", "4"])
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "\r" not in line and "|" not in line]
    assert exit_info.value.code == 2 and len(lines) == 1 and "--val-fraction" in lines[-1], lines


@pytest.mark.parametrize("size, mult, attn", [(20, (1, 2, 2), (5,)), (48, (1, 2, 2, 2), (12,)),
                                              (128, (1, 2, 2, 2, 2), (32,))])
def test_the_cpu_network_is_fitted_to_the_size(size, mult, attn):
    """Levels down to 4-8 pixels (the fewest that get there), mnist-tiny's multipliers cut or
    their last repeated, attention on the third level as mnist-tiny has it."""
    fitted = config.fit_levels({"channel_mult": (1, 2, 2), "attn_resolutions": (7,),
                                "image_size": 28}, size)
    assert fitted == {"channel_mult": mult, "attn_resolutions": attn}
    coarsest = size // 2 ** (len(mult) - 1)
    assert 4 <= coarsest <= 8 and size % 2 ** (len(mult) - 1) == 0


@pytest.mark.parametrize("size, mult, attn", [(20, (1, 2), (5,)), (32, (1, 2), (8,)),
                                              (64, (1, 2, 2), (16,)), (96, (1, 2, 2, 2), (24,))])
def test_a_stem_network_is_fitted_from_its_first_level(size, mult, attn):
    """With a 2x2 space-to-depth stem the levels start at size / 2: mnist-stem's 14 and 7
    become 16 and 8 at 32, and 32, 16, 8 at 64 (attention on the second level, as at 7)."""
    fitted = config.fit_levels({"channel_mult": (1, 2), "attn_resolutions": (7,),
                                "image_size": 28, "space_to_depth": 2}, size, 2)
    assert fitted == {"channel_mult": mult, "attn_resolutions": attn}
    coarsest = size // 2 // 2 ** (len(mult) - 1)
    assert 4 <= coarsest <= 8 and size % (2 * 2 ** (len(mult) - 1)) == 0


def test_a_size_that_cannot_be_halved_that_far_names_image_size():
    with pytest.raises(cli.UserError) as excinfo:
        config.fit_levels(dict(unet_kwargs()), 36)
    message = str(excinfo.value)
    assert "36x36" in message and "--image-size 32 or 40" in message and "\n" not in message


def unet_kwargs():
    import unet
    return unet.PRESETS["mnist-tiny"]


@pytest.mark.parametrize("size, preset", [(28, "mnist"), (32, "cifar10"), (40, "cifar10"),
                                          (48, "imagenet64"), (64, "imagenet64"),
                                          (128, "celebahq256"), (256, "celebahq256")])
def test_a_gpu_gets_the_network_of_the_nearest_resolution(size, preset):
    assert config.default_preset(size, cpu=False) == preset
    assert config.default_preset(size, cpu=True) == "mnist-stem"


def test_flips_are_a_function_of_seed_step_and_position():
    """Half the images flipped on average; the same (seed, step) gives the same flips, another
    step or seed others; draw_batch flips exactly the images marked, each process its slice."""
    cfg = config.Train(seed=5, batch_size=64)
    flips = optim.step_flips(cfg, 3, "cpu")
    assert torch.equal(flips, optim.step_flips(cfg, 3, "cpu"))
    assert not torch.equal(flips, optim.step_flips(cfg, 4, "cpu"))
    assert not torch.equal(flips, optim.step_flips(config.Train(seed=6, batch_size=64), 3, "cpu"))
    share = torch.stack([optim.step_flips(cfg, s, "cpu") for s in range(200)]).float().mean()
    assert abs(share - 0.5) < 4 * (0.25 / (200 * 64)) ** 0.5
    images = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8)
    for world, rank in ((1, 0), (2, 1)):
        opts = config.Train(seed=5, batch_size=64, hflip=True)
        run = SimpleNamespace(cfg=config.Config({}, {}, "linear", 10, opts), world=world,
                              rank=rank, device="cpu", diffusion=ddpm.GaussianDiffusion(
                                  ddpm.make_beta_schedule("cosine", 10)),
                              data=train.Data(images, None, optim.Batches(64, 64, 5, "cpu")))
        x0, y, _, _ = train.draw_batch(run, 3)
        assert y is None
        mine = slice(rank * 64 // world, (rank + 1) * 64 // world)
        idx = run.data.batches.indices(3)[mine]
        plain = imaging.to_model_range(images[idx])
        want = torch.where(flips[mine, None, None, None], plain.flip(-1), plain)
        assert torch.equal(x0, want)


def test_resume_with_flips_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "imgs", 24, 16, rgb=False)
    given = {**NARROW, "dataset": f"folder:{folder}", "channel_mult": (1, 2),
             "attn_resolutions": (8,)}
    train.train({**given, "out": str(tmp_path / "a"), "steps": 8}, progress=False)
    train.train({**given, "out": str(tmp_path / "b"), "steps": 4}, progress=False)
    train.train({**given, "out": str(tmp_path / "b"), "steps": 8, "resume": True}, progress=False)
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a["config"]["train"]["hflip"] is True and a["config"]["net"]["in_channels"] == 1
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    train.train({**given, "out": str(tmp_path / "c"), "steps": 8, "hflip": False}, progress=False)
    c = checkpoint.load(tmp_path / "c")
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_a_run_saved_before_these_options_resumes_as_it_was(tmp_path):
    """A checkpoint whose config lacks hflip, image_size, channels, labels, val_fraction and
    class_names (written before them) resumes without flips, to the weights of a run that never
    had them."""
    rng = np.random.default_rng(0)
    path = tmp_path / "bars.npz"
    np.savez(path, images=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    given = {**NARROW, "dataset": f"npz:{path}", "channel_mult": (1, 2), "attn_resolutions": (4,),
             "hflip": False}
    train.train({**given, "out": str(tmp_path / "a"), "steps": 6}, progress=False)
    train.train({**given, "out": str(tmp_path / "b"), "steps": 3}, progress=False)
    state = checkpoint.load(tmp_path / "b", required=checkpoint.RUN_KEYS)
    c = state["config"]  # as format 1 wrote it: flat, the network's kwargs under "unet"
    flat = {**c["train"], "unet": c["net"], "schedule": c["schedule"], "timesteps": c["timesteps"],
            "t_sampling": c["diffusion"]["timestep_sampling"],
            **{k: c["diffusion"][k] for k in ("mean_type", "var_type", "loss_type",
                                              "loss_weighting", "snr_gamma", "p2_k", "p2_gamma")}}
    for key in ("hflip", "image_size", "channels", "labels", "val_fraction"):
        flat.pop(key)
    torch.save({**state, "config": flat, "format_version": 1}, tmp_path / "b" / "ckpt.pt")
    del given["hflip"]
    train.train({**given, "out": str(tmp_path / "b"), "steps": 6, "resume": True}, progress=False)
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert b["config"]["train"]["hflip"] is False
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def export_dataset(name, root, count=None, seed=0):
    """Write a dataset's images as PNG files in class subfolders (root/<class>/<n>.png): both
    splits, or `count` of them chosen at random, so that a folder run has something real to
    read (docs/results.md measures such folders)."""
    sets = [data.load_dataset(name, split) for split in ("train", "test")]
    images = np.concatenate([s.images for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    chosen = np.arange(len(images)) if count is None else \
        np.random.default_rng(seed).choice(len(images), count, replace=False)
    names = sets[0].class_names
    for i in chosen:
        folder = root / names[labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = images[i].transpose(1, 2, 0)
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
            folder / f"{i:05d}.png")
    return root


def test_a_dataset_exported_as_a_folder_reads_back_as_it_was(tmp_path, monkeypatch):
    """export_dataset's folder, read as folder:DIR with --labels subfolders, holds the dataset's
    own pixels and labels (here a small synthetic labelled set in place of a download)."""
    import test_evaluate
    sets = {"train": test_evaluate.synthetic_digits(30, 0), "test": test_evaluate.synthetic_digits(10, 1)}
    sets = {k: v._replace(class_names=tuple("0123456789")) for k, v in sets.items()}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", *a, **k: sets[split])
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    root = export_dataset("mnist", tmp_path / "digits")
    monkeypatch.undo()
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    import userdata
    found = userdata.load_folder(root, labels="subfolders", val_fraction=0, progress=False)
    images = np.concatenate([sets["train"].images, sets["test"].images])
    labels = np.concatenate([sets["train"].labels, sets["test"].labels])
    order = [int(os.path.basename(p)[:-4]) for p in found.train.paths]
    assert np.array_equal(found.train.images, images[order])
    assert [int(found.class_names[k]) for k in found.train.labels] == labels[order].tolist()
