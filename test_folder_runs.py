"""A folder of images through the scripts: a 64x64 RGB folder trains at a narrow width, samples and
evaluates (the held-out split's bits/dim, the copy check) on the CPU; the network fitted to the
folder's size; the run's reading options and class names in its checkpoint; the flips of
--hflip, a function of (seed, step, position), with resume bit-exact; runs saved before these
options resume as they were."""
import contextlib
import os
import shutil
import subprocess
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


def write_photos(root, sizes, seed=0):
    """JPEGs of the given (width, height) sizes: a colour ramp with a bright square."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[..., 0] = np.linspace(0, 255, w)[None, :]
        pixels[..., 1] = np.linspace(255, 0, h)[:, None]
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        pixels[top:top + h // 4, left:left + w // 4] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(root / f"photo{i:02d}.jpg", quality=90)
    return root


@pytest.mark.parametrize("sizes", [[(48, 40), (40, 48), (64, 64), (50, 37)] * 3,
                                   [(45, 30)] * 12])
def test_a_folder_of_mixed_sizes_starts_at_a_side_chosen_for_the_machine(tmp_path, monkeypatch,
                                                                         capsys, sizes):
    """Several sizes, or one that is not square: no --image-size needed; one line says the side
    (the CPU's, 32) and how to change it; the checkpoint keeps it, so --resume and evaluate.py
    read the folder at that size; --image-size given keeps its meaning."""
    photos = write_photos(tmp_path / "photos", sizes)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run = {**NARROW, "dataset": f"folder:{photos}", "out": str(out), "val_fraction": 0.2}
    cfg, model, _ = train.train({**run, "steps": 2}, progress=False)
    err = capsys.readouterr().err
    line = [s for s in err.splitlines() if "not all one square size" in s]
    assert len(line) == 1 and "32x32" in line[0] and "--image-size N" in line[0]
    assert cfg.train.image_size == 32 and model.image_size == 32
    assert checkpoint.load(out)["config"]["train"]["image_size"] == 32
    train.train({**run, "steps": 3, "resume": True}, progress=False)
    assert "not all one square size" not in capsys.readouterr().err
    assert checkpoint.load(out)["step"] == 3
    evaluate.main(["--ckpt", str(out), "--n", "2", "--samples", "0", "--nll-batch-size", "2"])
    cfg, model, _ = train.train({**run, "steps": 1, "image_size": 16, "overwrite": True},
                                progress=False)
    assert cfg.train.image_size == 16 and "not all one square size" not in capsys.readouterr().err


def test_a_folder_of_one_square_size_keeps_it(tmp_path):
    import userdata
    assert not userdata.needs_size(write_photos(tmp_path / "a", [(24, 24)] * 3))
    assert userdata.needs_size(write_photos(tmp_path / "b", [(24, 24), (24, 25)]))
    assert userdata.auto_side("cpu") == 32 and userdata.auto_side("cuda") == 64


@contextlib.contextmanager
def read_only_copy(run, tmp_path):
    """The run's checkpoint in a folder this process cannot write in: a read-only tmpfs as root
    (root writes through a folder's permissions), a folder without write permission otherwise."""
    ro = tmp_path / "read_only"
    ro.mkdir()
    if os.geteuid() != 0:
        shutil.copy(run / "ckpt.pt", ro / "ckpt.pt")
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ro)],
                      capture_output=True).returncode:
        pytest.skip("a read-only folder for root needs a tmpfs mount")
    try:
        shutil.copy(run / "ckpt.pt", ro / "ckpt.pt")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_nearest_checks_its_default_png_before_any_work(tmp_path, monkeypatch, capsys):
    """evaluate.py --nearest with the checkpoint in a read-only folder and a writable --json:
    the default nearest.png beside the checkpoint is refused in one line before any sampling,
    and nothing is written."""
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "images", 24, 8, rgb=False)
    train.train({**NARROW, "dataset": f"folder:{folder}", "out": str(tmp_path / "run"),
                 "steps": 2, "val_fraction": 0.5, "channel_mult": (1, 2),
                 "attn_resolutions": (4,), "space_to_depth": 1}, progress=False)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the outputs")

    monkeypatch.setattr(evaluate.sampling, "generate", no_sampling)
    with read_only_copy(tmp_path / "run", tmp_path) as ro:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.run_script(evaluate.main, ["--ckpt", str(ro), "--n", "0", "--samples", "0",
                                           "--nearest", "4", "--json", str(tmp_path / "e.json")])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        assert "--nearest-png" in lines[0] and str(ro / "nearest.png") in lines[0], lines
        assert not (tmp_path / "e.json").exists() and os.listdir(ro) == ["ckpt.pt"]


def test_a_folder_with_nothing_held_out_gets_advice_evaluate_can_follow(tmp_path, monkeypatch,
                                                                       capsys):
    """A folder whose few images all fall on the training side at the default --val-fraction:
    evaluate.py's one line gives the fraction the run was trained with and names no flag
    evaluate.py lacks as its own; following it (a new run with a larger --val-fraction) works."""
    import userdata
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "images", 8, 8, rgb=False)
    for held in [p for p in folder.rglob("*.png")
                 if userdata.held_out(f"{p.parent.name}/{p.name}", userdata.VAL_FRACTION)]:
        held.unlink()  # cats/002.png: what remains is all on the training side
    paths = [f"{p.parent.name}/{p.name}" for p in folder.rglob("*.png")]
    assert len(paths) >= 6
    small = {**NARROW, "dataset": f"folder:{folder}", "steps": 2, "batch_size": 2,
             "channel_mult": (1, 2), "attn_resolutions": (4,), "space_to_depth": 1}
    train.train({**small, "out": str(tmp_path / "run")}, progress=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_script(evaluate.main, ["--ckpt", str(tmp_path / "run"), "--n", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "\r" not in line and "|" not in line]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert f"--val-fraction {userdata.VAL_FRACTION:g}" in lines[0] and "above 0" not in lines[0]
    assert "train a new run with a larger --val-fraction (train.py)" in lines[0], lines
    larger = next(f for f in (0.1, 0.2, 0.3, 0.5) if any(userdata.held_out(p, f) for p in paths))
    train.train({**small, "out": str(tmp_path / "run2"), "val_fraction": larger}, progress=False)
    cli.run_script(evaluate.main, ["--ckpt", str(tmp_path / "run2"), "--n", "1", "--samples", "0",
                                   "--json", str(tmp_path / "e.json")])
    assert evaluate_json(tmp_path / "e.json")["nll"]["split"] == "held-out"


def test_a_diffusers_round_trip_keeps_a_folder_models_class_names(tmp_path, monkeypatch, capsys):
    """A class-conditional folder model exported, loaded and saved again by diffusers itself, and
    imported: its class names come back, so --class asks by name after the import as before."""
    diffusers = pytest.importorskip("diffusers")
    import convert
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "images", 24, 8, rgb=False, classes=("owl", "cat", "bee"))
    train.train({**NARROW, "dataset": f"folder:{folder}", "out": str(tmp_path / "run"),
                 "steps": 2, "labels": "subfolders", "class_cond": True, "channel_mult": (1, 2),
                 "attn_resolutions": (4,), "space_to_depth": 1}, progress=False)
    assert checkpoint.load(tmp_path / "run")["config"]["class_names"] == ["bee", "cat", "owl"]
    cli.run_script(convert.main, ["--to-diffusers", str(tmp_path / "run"), "--out",
                                  str(tmp_path / "pipe")])
    diffusers.UNet2DModel.from_pretrained(str(tmp_path / "pipe" / "unet")).save_pretrained(
        str(tmp_path / "again"))
    cli.run_script(convert.main, ["--from-diffusers", str(tmp_path / "again"), "--out",
                                  str(tmp_path / "back.pt")])
    assert checkpoint.load(tmp_path / "back.pt")["config"]["class_names"] == ["bee", "cat", "owl"]
    cli.run_script(sample.main, ["--ckpt", str(tmp_path / "back.pt"), "--class", "owl", "--n", "2",
                                 "--steps", "2", "--out", str(tmp_path / "owls.npz")])
    assert np.load(tmp_path / "owls.npz")["labels"].tolist() == [2, 2]


def one_line_refusal(capsys, given):
    """(the one line, nothing else) of a train() refused with a UserError through cli.run_script;
    progress bars are left out."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_script(lambda argv: train.train(given, progress=False))
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "\r" not in line and "|" not in line]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def conditional_folder_run(tmp_path, monkeypatch):
    """(folder, flags) of a class-conditional run on 24 8x8 images in class subfolders a, b, c."""
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "images", 24, 8, rgb=False, classes=("a", "b", "c"))
    return folder, {**NARROW, "dataset": f"folder:{folder}", "out": str(tmp_path / "run"),
                    "labels": "subfolders", "class_cond": True, "channel_mult": (1, 2),
                    "attn_resolutions": (4,), "space_to_depth": 1}


@pytest.mark.parametrize("change, now", [
    ("aa", "4 (a, aa, b, c)"),     # b and c would become 2 and 3, 3 the null label
    ("d", "4 (a, b, c, d)"),       # d would train as "no class"
    ("-a", "2 (b, c)"),            # b and c would train under a's and b's embeddings
])
def test_a_conditional_run_refuses_to_resume_on_other_classes(tmp_path, monkeypatch, capsys,
                                                             change, now):
    """A class subfolder added or removed after a class-conditional run was saved: --resume is
    refused in one line naming both class lists, and the checkpoint stays as it was."""
    folder, given = conditional_folder_run(tmp_path, monkeypatch)
    train.train({**given, "steps": 2}, progress=False)
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    if change.startswith("-"):
        shutil.rmtree(folder / change[1:])
    else:
        shutil.copytree(folder / "a", folder / change)
    line = one_line_refusal(capsys, {**given, "steps": 4, "resume": True})
    assert f"now has {now}, and the run was trained on 3 classes (a, b, c)" in line, line
    assert "start a new --out" in line
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_a_conditional_run_refuses_to_resume_on_npz_labels_with_a_new_class(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(24) % 3)
    given = {**NARROW, "dataset": f"npz:{tmp_path / 'd.npz'}", "out": str(tmp_path / "run"),
             "class_cond": True, "channel_mult": (1, 2), "attn_resolutions": (4,),
             "space_to_depth": 1}
    train.train({**given, "steps": 2}, progress=False)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(24) % 4)
    line = one_line_refusal(capsys, {**given, "steps": 4, "resume": True})
    assert "now has 4 (0, 1, 2, 3), and the run was trained on 3 classes (0, 1, 2)" in line, line


def test_a_folder_that_gained_images_resumes_and_says_so_once(tmp_path, monkeypatch, capsys):
    """Images added to the classes a run has: it resumes (the classes are the same), and one line
    gives the training set's size then and now."""
    folder, given = conditional_folder_run(tmp_path, monkeypatch)
    train.train({**given, "steps": 2}, progress=False)
    before = len(data.load_dataset(f"folder:{folder}", folder=config_options(given)).images)
    for name in ("000.png", "003.png"):
        shutil.copy(folder / "a" / name, folder / "a" / f"copy_{name}")
    after = len(data.load_dataset(f"folder:{folder}", folder=config_options(given)).images)
    assert after > before
    capsys.readouterr()
    train.train({**given, "steps": 4, "resume": True}, progress=False)
    said = [line for line in capsys.readouterr().err.splitlines() if "training images" in line]
    assert said == [f"folder:{folder} now holds {after} training images, {before} when the "
                    "checkpoint was written; the run goes on with the images as they are now"]
    assert checkpoint.load(tmp_path / "run")["train_images"] == after
