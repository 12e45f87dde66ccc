"""checkpoint.py: the format-version refusal, the required keys, strict weight matching, the
newest run, atomic saving, and the model rebuilt from a checkpoint."""
import os

import pytest
import torch

import checkpoint
import cli
import hardware
import rundir
import unet

# A network as format 1 stored it (no norm_groups, no downsample_padding), and as today's code
# stores it (too narrow for Ho et al.'s default 32 groups: it names its own).
SMALL_V1 = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, image_size=8)
SMALL = dict(SMALL_V1, norm_groups=4)


def run_state(model):
    config = {"net": SMALL, "schedule": "linear", "timesteps": 100,
              "diffusion": {"mean_type": "eps", "var_type": "fixed_large", "loss_type": "simple"},
              "train": {"dataset": "mnist"}}
    return {"step": 7, "config": config, "model": model.state_dict(), "ema": model.state_dict()}


def test_a_format_1_config_comes_in_today_s_shape(tmp_path):
    """Format 1 kept the flags flat beside the network's kwargs; load() hands every reader the
    parts (net, diffusion beside schedule and T, train), with what format 1's missing fields
    meant: no network field left out, Ho et al.'s recipe, uniform t, no flips, unconditional."""
    model = unet.UNet(**SMALL)
    flat = {"unet": SMALL_V1, "schedule": "linear", "timesteps": 100, "mean_type": "eps",
            "var_type": "fixed_large", "loss_type": "simple", "dataset": "mnist", "lr": 1e-3,
            "base_channels": 8, "resume": False}
    torch.save({"step": 7, "config": flat, "model": model.state_dict(), "ema": model.state_dict(),
                "format_version": 1}, tmp_path / "old.pt")
    state = checkpoint.load(tmp_path / "old.pt")
    assert state["format_version"] == checkpoint.FORMAT_VERSION
    config = state["config"]
    assert config["net"] == {**SMALL_V1, "norm_groups": None, "downsample_padding": "symmetric"}
    assert config["diffusion"] == {"mean_type": "eps", "var_type": "fixed_large",
                                   "loss_type": "simple", "loss_weighting": "none",
                                   "timestep_sampling": "uniform"}
    assert (config["schedule"], config["timesteps"]) == ("linear", 100)
    assert config["train"] == {"dataset": "mnist", "lr": 1e-3, "batch_size": 128, "warmup": 5000,
                               "lr_schedule": "constant", "ema_decay": 0.9999,
                               "ema_warmup": 10.0, "hflip": False, "class_cond": False}
    assert checkpoint.load_model(tmp_path / "old.pt", torch.device("cpu")).diffusion.num_timesteps == 100


def test_other_format_versions_are_refused(tmp_path):
    model = unet.UNet(**SMALL)
    checkpoint.save(tmp_path / "a.pt", run_state(model))
    assert checkpoint.load(tmp_path / "a.pt")["format_version"] == checkpoint.FORMAT_VERSION
    for version in (checkpoint.FORMAT_VERSION + 1, 0, "1"):
        torch.save({**run_state(model), "format_version": version}, tmp_path / "b.pt")
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint format"):
            checkpoint.load(tmp_path / "b.pt")


def test_required_keys_are_named(tmp_path):
    torch.save({"format_version": 1, "step": 1}, tmp_path / "c.pt")
    with pytest.raises(checkpoint.CheckpointError, match="lacks config, model, ema"):
        checkpoint.load(tmp_path / "c.pt")
    state = run_state(unet.UNet(**SMALL))
    del state["config"]["schedule"]
    checkpoint.save(tmp_path / "d.pt", state)
    with pytest.raises(checkpoint.CheckpointError, match="lacks config.schedule"):
        checkpoint.load(tmp_path / "d.pt")
    assert checkpoint.load(tmp_path / "c.pt", required=("step",))["step"] == 1


def test_weights_must_match_key_for_key(tmp_path):
    """Strict loading: one extra key, one missing key or one wrong shape is refused in one line."""
    model = unet.UNet(**SMALL)
    good = model.state_dict()
    extra = {**good, "surplus.weight": torch.zeros(1)}
    missing = {k: v for k, v in good.items() if k != "conv_out.bias"}
    shape = {**good, "conv_out.bias": torch.zeros(3)}
    for weights, needle in ((extra, "surplus.weight"), (missing, "conv_out.bias"),
                            (shape, "conv_out.bias")):
        with pytest.raises(checkpoint.CheckpointError, match="another architecture") as excinfo:
            checkpoint.load_weights(unet.UNet(**SMALL), weights, "x.pt")
        assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)
    fresh = unet.UNet(**SMALL)
    checkpoint.load_weights(fresh, good, "x.pt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), good.values()))


def test_newest_is_the_most_recently_written(tmp_path):
    """Not the first found nor the last in name order: the newest modification time."""
    for i, name in enumerate(["b", "a", "c"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / rundir.CHECKPOINT).write_bytes(b"x")
        os.utime(tmp_path / name / rundir.CHECKPOINT, (1000 + i, [5, 9, 7][i] * 1000))
    assert checkpoint.newest(str(tmp_path)) == str(tmp_path / "a" / rundir.CHECKPOINT)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint under"):
        checkpoint.newest(str(tmp_path / "empty"))


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path / "ckpt.pt", {"step": 1})

    def broken(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(cli.UserError, match=r"\(No space left on device\); free some disk space"):
        checkpoint.save(tmp_path / "ckpt.pt", {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path, required=("step",))["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_model_rebuilds_the_ema_network(tmp_path):
    """The network comes back from the config alone with the EMA weights (or the raw ones),
    frozen, in eval mode, fp32 on a CPU without bf16 units, and computes what the original does."""
    torch.manual_seed(0)
    model, ema = unet.UNet(**SMALL), unet.UNet(**SMALL)
    for p in list(model.parameters()) + list(ema.parameters()):
        torch.nn.init.normal_(p, std=0.05)
    state = {**run_state(model), "ema": ema.state_dict()}
    checkpoint.save(tmp_path / "ckpt.pt", state)
    cpu = torch.device("cpu")
    loaded = checkpoint.load_model(tmp_path, cpu, precision="fp32")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 60])
    assert loaded.step == 7 and loaded.precision == "fp32" and not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x, t), ema.eval()(x, t))
        raw = checkpoint.load_model(tmp_path, cpu, precision="fp32", use_ema=False)
        torch.testing.assert_close(raw.network(x, t), model.eval()(x, t))
    assert loaded.diffusion.num_timesteps == 100
    assert checkpoint.load_model(tmp_path, cpu).precision == hardware.resolve_precision("auto", cpu)
