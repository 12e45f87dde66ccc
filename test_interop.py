"""convert.py against diffusers itself (a test dependency: requirements-test.txt): networks built
in diffusers with random weights, imported and compared output for output in float64; ours out
to a DDPMPipeline and back, bit-exact; sampling through DDPMPipeline against ours over 1,000
steps; the scheduler mapping against DDPMScheduler's own tables; and the one-line refusals."""
import copy
import json
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-test.txt")
import diffusers.models.embeddings as diffusers_embeddings  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import checkpoint  # noqa: E402
import convert  # noqa: E402
import interop  # noqa: E402
import cli  # noqa: E402
import sample  # noqa: E402
import evaluate  # noqa: E402
import unet  # noqa: E402

# Ho et al.'s CIFAR-10 network as google/ddpm-cifar10-32 configures it.
HO_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  layers_per_block=2, attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32,
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
# The level structure of Ho et al.'s 256x256 models (google/ddpm-celebahq-256) at 1/8 of the width.
HO_256_NARROW = dict(sample_size=256, in_channels=3, out_channels=3,
                     block_out_channels=(16, 16, 32, 32, 64, 64),
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                     layers_per_block=2, attention_head_dim=None, norm_eps=1e-6, norm_num_groups=8,
                     downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
TINY = dict(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, image_size=8, norm_groups=4,
            downsample_padding="tf_same")


def randomise(model, seed=0):
    """Every parameter random (unet.py zeroes the residual branches' last convs at init): N(0,
    0.05²), GroupNorm scales 1 + N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                shift = 1.0 if isinstance(module, torch.nn.GroupNorm) and name == "weight" else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + shift)
    return model


def float64_time_embedding(monkeypatch):
    """diffusers computes the sinusoidal embedding in float32; this computes its formula in
    float64 so that the two networks can be compared at 1e-9."""
    def in_float64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                   scale=1, max_period=10000):
        half = embedding_dim // 2
        exponent = -np.log(max_period) * torch.arange(half, dtype=torch.float64) / (
            half - downscale_freq_shift)
        emb = timesteps[:, None].double() * torch.exp(exponent)[None, :] * scale
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb

    monkeypatch.setattr(diffusers_embeddings, "get_timestep_embedding", in_float64)


def import_model(theirs, tmp_path, name="model"):
    """Save a diffusers UNet2DModel as its folder, import it, rebuild ours from the checkpoint."""
    theirs.save_pretrained(tmp_path / name)
    interop.import_diffusers(str(tmp_path / name), str(tmp_path / f"{name}.pt"), progress=lambda s: None)
    state = checkpoint.load(tmp_path / f"{name}.pt")
    ours = unet.UNet(**state["config"]["unet"])
    ours.load_state_dict(state["ema"])
    return ours.eval(), state


def compare(ours, theirs, batch, size, channels, monkeypatch, seed=0):
    """(max relative error with diffusers' float32 time embedding, the same with it in float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 999, 500, 37][:batch])
    ours, theirs = ours.double().eval(), theirs.double().eval()
    with torch.no_grad():
        mine = ours(x, t)
        scale = mine.abs().max()
        err32 = ((theirs(x, t).sample - mine).abs().max() / scale).item()
        float64_time_embedding(monkeypatch)
        err64 = ((theirs(x, t).sample - mine).abs().max() / scale).item()
        monkeypatch.undo()
    return err32, err64


def test_ho_cifar10_network_is_the_cifar10_preset(tmp_path, monkeypatch):
    """google/ddpm-cifar10-32's configuration imports as exactly the cifar10 preset (35.7M
    parameters), and computes what diffusers computes: relative 1e-5 with diffusers' float32
    time embedding, 1e-9 with it in float64."""
    torch.manual_seed(0)
    theirs = UNet2DModel(**HO_CIFAR10)
    ours, state = import_model(theirs, tmp_path)
    kwargs = state["config"]["unet"]
    assert {k: kwargs[k] for k in unet.PRESETS["cifar10"]} == {**unet.PRESETS["cifar10"],
                                                               "channel_mult": (1, 2, 2, 2)}
    assert unet.count_parameters(ours) == 35_746_307 == sum(p.numel() for p in theirs.parameters())
    err32, err64 = compare(ours, theirs, 2, 32, 3, monkeypatch)
    assert err32 < 1e-5 and err64 < 1e-9, (err32, err64)


def test_ho_256_structure_at_small_width_as_a_pipeline_folder(tmp_path, monkeypatch):
    """The six-level 256x256 layout (attention at 16x16), imported from a pipeline folder with
    model_index.json and a DDPMScheduler config."""
    torch.manual_seed(1)
    theirs = UNet2DModel(**HO_256_NARROW)
    pipeline = DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(variance_type="fixed_small"))
    pipeline.save_pretrained(tmp_path / "pipe")
    interop.import_diffusers(str(tmp_path / "pipe"), str(tmp_path / "pipe.pt"))
    state = checkpoint.load(tmp_path / "pipe.pt")
    assert state["config"]["unet"]["attn_resolutions"] == (16,)
    assert state["config"]["var_type"] == "fixed_small" and state["config"]["schedule"] == "linear"
    ours = unet.UNet(**state["config"]["unet"])
    ours.load_state_dict(state["ema"])
    err32, err64 = compare(ours, theirs, 1, 256, 3, monkeypatch)
    assert err32 < 1e-5 and err64 < 1e-9, (err32, err64)


@pytest.mark.parametrize("preset", ["mnist", "mnist-small", "mnist-tiny"])
def test_presets_export_and_round_trip_bit_exact(preset, tmp_path, monkeypatch):
    """Ours -> diffusers: the same function (float64, 1e-9 with the float64 embedding); -> ours
    again: the same config and bit-identical weights."""
    torch.manual_seed(2)
    model = randomise(unet.build_unet(preset))
    config = {"unet": dict(unet.PRESETS[preset]), "schedule": "linear", "timesteps": 1000,
              "mean_type": "eps", "var_type": "fixed_large", "loss_type": "simple",
              "dataset": "mnist"}
    checkpoint.save(tmp_path / "ours.pt", {"step": 5, "config": config,
                                          "model": model.state_dict(), "ema": model.state_dict()})
    interop.export_diffusers(str(tmp_path / "ours.pt"), str(tmp_path / "pipe"))
    theirs = DDPMPipeline.from_pretrained(tmp_path / "pipe").unet
    err32, err64 = compare(copy.deepcopy(model), theirs, 2, 28, 1, monkeypatch)
    assert err32 < 1e-5 and err64 < 1e-9, (err32, err64)
    interop.import_diffusers(str(tmp_path / "pipe"), str(tmp_path / "back.pt"))
    back = checkpoint.load(tmp_path / "back.pt")
    defaults = interop.unet_defaults()
    assert {**defaults, **back["config"]["unet"]} == {**defaults, **unet.PRESETS[preset],
                                                      "out_channels": 1}
    for name, tensor in model.state_dict().items():
        assert torch.equal(back["ema"][name], tensor), name


def test_ddpm_pipeline_samples_what_ddpm_py_samples(tmp_path):
    """An exported model in DDPMPipeline and ours, same initial and per-step noise (one CPU
    generator, drawn in the same order), Algorithm 2 over 1,000 steps in fp32: max |Δ| <= 1e-4
    on [-1, 1] images."""
    torch.manual_seed(3)
    model = randomise(unet.UNet(**TINY))
    config = {"unet": TINY, "schedule": "linear", "timesteps": 1000, "mean_type": "eps",
              "var_type": "fixed_large", "loss_type": "simple", "dataset": None}
    checkpoint.save(tmp_path / "ours.pt", {"step": 1, "config": config, "model": model.state_dict(),
                                          "ema": model.state_dict()})
    interop.export_diffusers(str(tmp_path / "ours.pt"), str(tmp_path / "pipe"))
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=2, generator=torch.Generator().manual_seed(7),
                      num_inference_steps=1000, output_type="np").images   # [2, 8, 8, 1] in [0, 1]
    loaded = checkpoint.load_model(tmp_path / "ours.pt", torch.device("cpu"), "fp32")
    ours = loaded.diffusion.p_sample_loop(loaded.network, (2, 1, 8, 8),
                                          generator=torch.Generator().manual_seed(7))
    ours01 = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours01 - theirs).max() * 2 <= 1e-4
    assert np.abs(ours01 - 0.5).max() > 0.1  # not a constant picture


@pytest.mark.parametrize("ours", [
    {"schedule": "linear", "timesteps": 1000}, {"schedule": "linear", "timesteps": 100},
    {"schedule": "cosine", "timesteps": 1000},
    {"schedule": "custom", "timesteps": 4, "betas": [0.01, 0.05, 0.2, 0.5]}])
def test_exported_scheduler_has_our_tables(ours):
    """DDPMScheduler built from the exported config has our ᾱ (to float32, as it computes)."""
    config = {**ours, "mean_type": "v", "var_type": "fixed_small", "loss_type": "simple"}
    scheduler = DDPMScheduler(**{k: v for k, v in interop.scheduler_from_diffusion_config(
        config).items() if not k.startswith("_")})
    diffusion = checkpoint.build_diffusion(config)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(),
                               diffusion.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-7)
    assert scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("theirs, schedule, var_type, mean_type", [
    ({}, "linear", "fixed_small", "eps"),
    ({"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large",
      "prediction_type": "sample"}, "cosine", "fixed_large", "x0"),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "prediction_type": "v_prediction"}, "custom", "fixed_small", "v"),
    ({"num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.2,
      "variance_type": "fixed_small_log"}, "custom", "fixed_small", "eps"),
    ({"num_train_timesteps": 5, "trained_betas": [0.1, 0.2, 0.3, 0.4, 0.5]}, "custom",
     "fixed_small", "eps"),
    ({"num_train_timesteps": 100, "beta_start": 0.001, "beta_end": 0.2}, "linear",
     "fixed_small", "eps")])
def test_imported_scheduler_has_diffusers_tables(theirs, schedule, var_type, mean_type):
    """Each DDPMScheduler config maps to ddpm.py's settings whose β table is DDPMScheduler's own
    (a named schedule only where it is one)."""
    ours = interop.diffusion_config_from_scheduler(theirs)
    assert (ours["schedule"], ours["var_type"], ours["mean_type"]) == (schedule, var_type, mean_type)
    reference = DDPMScheduler(**theirs).betas.double().numpy()
    np.testing.assert_allclose(checkpoint.build_diffusion(ours).betas.numpy(), reference,
                               rtol=1e-6, atol=1e-9)


def test_deprecated_attention_names_and_bin_weights(tmp_path, monkeypatch):
    """The google/ddpm-* weights on the Hub name attention query/key/value/proj_attn and come as
    .bin: both are read (with torch.load(weights_only=True))."""
    torch.manual_seed(4)
    theirs = UNet2DModel(**{**HO_CIFAR10, "block_out_channels": (16, 32, 32, 32),
                            "norm_num_groups": 8})
    folder = tmp_path / "old"
    theirs.save_pretrained(folder)
    os.remove(folder / "diffusion_pytorch_model.safetensors")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, tensor in theirs.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = tensor
    torch.save(renamed, folder / "diffusion_pytorch_model.bin")
    ours, _ = import_model_from(folder, tmp_path)
    err32, _ = compare(ours, theirs, 2, 32, 3, monkeypatch)
    assert err32 < 1e-5


def import_model_from(folder, tmp_path):
    interop.import_diffusers(str(folder), str(tmp_path / "imported.pt"), progress=lambda s: None)
    state = checkpoint.load(tmp_path / "imported.pt")
    ours = unet.UNet(**state["config"]["unet"])
    ours.load_state_dict(state["ema"])
    return ours.eval(), state


@pytest.mark.parametrize("change, field", [
    ({"down_block_types": ("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")},
     "CrossAttnDownBlock2D"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift")])
def test_what_unet_py_cannot_express_is_one_line(change, field):
    with pytest.raises(interop.ConvertError) as excinfo:
        interop.unet_kwargs_from_diffusers({**HO_CIFAR10, **change})
    assert field in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize("change, field", [({"thresholding": True}, "thresholding"),
                                           ({"variance_type": "learned"}, "variance_type"),
                                           ({"clip_sample_range": 2.0}, "clip_sample_range"),
                                           ({"rescale_betas_zero_snr": True}, "rescale_betas")])
def test_what_ddpm_py_cannot_express_is_one_line(change, field):
    with pytest.raises(interop.ConvertError, match=field):
        interop.diffusion_config_from_scheduler(change)


def test_old_per_layer_group_counts_refuse_to_export(tmp_path):
    """A checkpoint of the earlier presets (16 groups at 64 channels, 32 at 128) cannot be said
    in diffusers' one norm_num_groups: refused in one line saying why."""
    old = {k: v for k, v in unet.PRESETS["mnist"].items() if k not in ("norm_groups",
                                                                     "downsample_padding")}
    model = unet.UNet(**old)
    config = {"unet": old, "schedule": "linear", "timesteps": 1000, "mean_type": "eps",
              "var_type": "fixed_large", "loss_type": "simple"}
    checkpoint.save(tmp_path / "old.pt", {"step": 1, "config": config, "model": model.state_dict(),
                                         "ema": model.state_dict()})
    with pytest.raises(interop.ConvertError, match="differ from layer to layer"):
        interop.export_diffusers(str(tmp_path / "old.pt"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_command_line_import_sample_and_evaluate(tmp_path, capsys, monkeypatch):
    """convert.py writes a checkpoint that sample.py samples from and evaluate.py scores with
    --dataset (an imported model names none; without it, one line says so)."""
    torch.manual_seed(5)
    theirs = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                         attention_head_dim=None, norm_num_groups=4, downsample_padding=0,
                         flip_sin_to_cos=False, freq_shift=1)
    DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(num_train_timesteps=50, beta_start=0.001,
                                                      beta_end=0.2)).save_pretrained(tmp_path / "p")
    cli.run_script(convert.main, ["--from-diffusers", str(tmp_path / "p"), "--out",
                               str(tmp_path / "m.pt")])
    with pytest.raises(SystemExit) as exit_info:  # the same --out again
        cli.run_script(convert.main, ["--from-diffusers", str(tmp_path / "p"), "--out",
                                   str(tmp_path / "m.pt")])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    cli.run_script(sample.main, ["--ckpt", str(tmp_path / "m.pt"), "--n", "3", "--out",
                              str(tmp_path / "s.png")])
    np.savez(tmp_path / "d.npz", images=np.zeros((6, 8, 8), np.uint8))
    with pytest.raises(SystemExit):
        cli.run_script(evaluate.main, ["--ckpt", str(tmp_path / "m.pt"), "--n", "2", "--samples", "0"])
    assert "give --dataset" in capsys.readouterr().err
    cli.run_script(evaluate.main, ["--ckpt", str(tmp_path / "m.pt"), "--dataset",
                                f"npz:{tmp_path / 'd.npz'}", "--n", "2", "--samples", "0",
                                "--json", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["step"] is None and result["nll"]["images"] == 2
    assert np.isfinite(result["nll"]["total"]["mean"])
