"""convert.py against diffusers itself (a test dependency: requirements-test.txt): networks built
in diffusers with random weights, imported and compared output for output in float64; ours out
to a DDPMPipeline and back, bit-exact; sampling through DDPMPipeline against ours over 1,000
steps; the scheduler mapping against DDPMScheduler's own tables; and the one-line refusals:
tables of wrong folders (config fields, JSON files, tensors) and checkpoints run through
convert.py as its __main__ runs it, each exit status 2 with one `error: ` line and no file
changed. test_interop_config.py checks the configs field by field."""
import copy
import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-test.txt")
import diffusers.models.embeddings as diffusers_embeddings  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import checkpoint  # noqa: E402
import config as config_module  # noqa: E402  (the tests name their dicts "config")
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
    ours = unet.UNet(**state["config"]["net"])
    ours.load_state_dict(state["ema"])
    return ours.eval(), state


def run_config(net, dataset=None):
    """A checkpoint's config (config.Config as saved) for the network `net`: the linear schedule,
    T = 1000, ε, β_t."""
    return {"net": net, "schedule": "linear", "timesteps": 1000, "train": {"dataset": dataset},
            "diffusion": {"mean_type": "eps", "var_type": "fixed_large", "loss_type": "simple"}}


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
    kwargs = state["config"]["net"]
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
    assert state["config"]["net"]["attn_resolutions"] == (16,)
    assert state["config"]["diffusion"]["var_type"] == "fixed_small" and state["config"]["schedule"] == "linear"
    ours = unet.UNet(**state["config"]["net"])
    ours.load_state_dict(state["ema"])
    err32, err64 = compare(ours, theirs, 1, 256, 3, monkeypatch)
    assert err32 < 1e-5 and err64 < 1e-9, (err32, err64)


@pytest.mark.parametrize("preset", ["mnist", "mnist-small", "mnist-tiny"])
def test_presets_export_and_round_trip_bit_exact(preset, tmp_path, monkeypatch):
    """Ours -> diffusers: the same function (float64, 1e-9 with the float64 embedding); -> ours
    again: the same config and bit-identical weights."""
    torch.manual_seed(2)
    model = randomise(unet.build_unet(preset))
    config = run_config(dict(unet.PRESETS[preset]), "mnist")
    checkpoint.save(tmp_path / "ours.pt", {"step": 5, "config": config,
                                          "model": model.state_dict(), "ema": model.state_dict()})
    interop.export_diffusers(str(tmp_path / "ours.pt"), str(tmp_path / "pipe"))
    theirs = DDPMPipeline.from_pretrained(tmp_path / "pipe").unet
    err32, err64 = compare(copy.deepcopy(model), theirs, 2, 28, 1, monkeypatch)
    assert err32 < 1e-5 and err64 < 1e-9, (err32, err64)
    interop.import_diffusers(str(tmp_path / "pipe"), str(tmp_path / "back.pt"))
    back = checkpoint.load(tmp_path / "back.pt")
    defaults = interop.unet_defaults()
    assert {**defaults, **back["config"]["net"]} == {**defaults, **unet.PRESETS[preset],
                                                      "out_channels": 1}
    for name, tensor in model.state_dict().items():
        assert torch.equal(back["ema"][name], tensor), name


def test_ddpm_pipeline_samples_what_ddpm_py_samples(tmp_path):
    """An exported model in DDPMPipeline and ours, same initial and per-step noise (one CPU
    generator, drawn in the same order), Algorithm 2 over 1,000 steps in fp32: max |Δ| <= 1e-4
    on [-1, 1] images."""
    torch.manual_seed(3)
    model = randomise(unet.UNet(**TINY))
    config = run_config(TINY)
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
    config = {**ours, "diffusion": {"mean_type": "v", "var_type": "fixed_small",
                                    "loss_type": "simple"}}
    scheduler = DDPMScheduler(**{k: v for k, v in interop.scheduler_from_diffusion_config(
        config).items() if not k.startswith("_")})
    diffusion = config_module.build_diffusion(config)
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
    assert (ours["schedule"], ours["diffusion"]["var_type"], ours["diffusion"]["mean_type"]) == \
        (schedule, var_type, mean_type)
    reference = DDPMScheduler(**theirs).betas.double().numpy()
    np.testing.assert_allclose(config_module.build_diffusion(ours).betas.numpy(), reference,
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
    ours = unet.UNet(**state["config"]["net"])
    ours.load_state_dict(state["ema"])
    return ours.eval(), state


@pytest.mark.parametrize("change, field", [
    ({"down_block_types": ("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")},
     "CrossAttnDownBlock2D"),
    ({"num_class_embeds": 1}, "num_class_embeds"),
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


@pytest.mark.parametrize("groups", ["absent", 0])
def test_old_per_layer_group_counts_refuse_to_export(tmp_path, groups):
    """A checkpoint of the earlier presets (16 groups at 64 channels, 32 at 128), or of a run with
    --norm-groups 0 (per layer too), cannot be said in diffusers' one norm_num_groups: refused in
    one line saying why."""
    old = {k: v for k, v in unet.PRESETS["mnist"].items() if k not in ("norm_groups",
                                                                     "downsample_padding")}
    model = unet.UNet(**old, norm_groups=None, downsample_padding="symmetric")  # as it was trained
    if groups != "absent":
        old["norm_groups"] = groups
    config = {"unet": old, "schedule": "linear", "timesteps": 1000, "mean_type": "eps",
              "var_type": "fixed_large", "loss_type": "simple"}  # format 1, as they were saved
    torch.save({"step": 1, "config": config, "model": model.state_dict(),
                "ema": model.state_dict(), "format_version": 1}, tmp_path / "old.pt")
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


# ---- refusals: one line, exit status 2, nothing changed ---------------------------------------

SMALL = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
             attention_head_dim=None, norm_num_groups=4, downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1)
SMALL_SCHEDULER = dict(num_train_timesteps=20, beta_start=0.001, beta_end=0.2)
ABSENT = "(absent)"  # a field removed from a config
# A conv whose two channel counts differ (32 in, 16 out) in the small network, and an attention
# layer's key.
CONV = "up_blocks.0.resnets.0.conv1.weight"
TO_K = "down_blocks.1.attentions.0.to_k.weight"


def snapshot(root):
    """{path: bytes} of every file under root."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.join(folder, name)] = f.read()
    return found


def run_convert(argv, capsys):
    """convert.py in-process as its __main__ runs it: (exit status, stderr lines)."""
    capsys.readouterr()
    try:
        cli.run_script(convert.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A DDPM pipeline folder of the small network (random weights) and a factory of copies with
    one thing changed: a config field, a JSON file's bytes, or the weights."""
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(6)
    theirs = randomise(UNet2DModel(**SMALL))
    pipeline = DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(**SMALL_SCHEDULER))
    pipeline.save_pretrained(root / "pipe")
    weights = {k: v.clone() for k, v in theirs.state_dict().items()}

    count = itertools.count()

    def variant(name=None, unet=None, scheduler=None, files=None, state=None, as_bin=False):
        folder = root / (name or f"variant{next(count)}")
        shutil.copytree(root / "pipe", folder)
        for part, change in (("unet/config.json", unet),
                             ("scheduler/scheduler_config.json", scheduler)):
            if change:
                config = json.loads((folder / part).read_text())
                config.update(change)
                config = {k: v for k, v in config.items() if v != ABSENT}
                (folder / part).write_text(json.dumps(config))
        for part, content in (files or {}).items():
            (folder / part).write_bytes(content)
        if state is not None:
            os.remove(folder / "unet" / interop.WEIGHT_FILES[0])
            changed = state({k: v.clone() for k, v in weights.items()})
            if as_bin:
                torch.save(changed, folder / "unet" / interop.WEIGHT_FILES[1])
            else:
                from safetensors.torch import save_file
                save_file(changed, folder / "unet" / interop.WEIGHT_FILES[0])
        return str(folder)

    return root, variant, weights


def with_tensor(key, make):
    """A state-dict edit: weights[key] replaced by make(weights[key])."""
    def edit(state):
        state[key] = make(state[key])
        return state
    return edit


def renamed(old, new):
    def edit(state):
        state[new] = state.pop(old)
        return state
    return edit


def poisoned(value):
    """The conv weight with one entry set to value (NaN, +inf, -inf)."""
    def make(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[7] = value
        return tensor
    return make


def import_cases(variant):
    """(folder, what the one line must say) for each kind of bad diffusers folder."""
    u, s = lambda **c: variant(unet=c), lambda **c: variant(scheduler=c)
    weights = lambda name, edit, **kw: variant(name, state=edit, **kw)
    raw = lambda name, part, content: variant(name, files={part: content})
    return [
        # config.json: types
        (u(layers_per_block="2"), 'layers_per_block = "2"; it must be an integer in [1, 1024]'),
        (u(layers_per_block=1.5), "layers_per_block = 1.5"),
        (u(layers_per_block=True), "layers_per_block = true"),
        (u(block_out_channels=None), "block_out_channels = null; it must be a list"),
        (u(block_out_channels="8,16"), 'block_out_channels = "8,16"'),
        (u(block_out_channels=[8, True]), "block_out_channels = [8, true]"),
        (u(sample_size="8"), 'sample_size = "8"'),
        (u(norm_eps="1e-6"), 'norm_eps = "1e-6"'),
        (u(attention_head_dim=[16]), "attention_head_dim = [16]"),
        (u(down_block_types="DownBlock2D"), "down_block_types"),
        (u(flip_sin_to_cos=0), "flip_sin_to_cos = 0; it must be false"),
        (u(freq_shift=True), "freq_shift = true; it must be 1"),
        (u(downsample_padding=True), "downsample_padding = true"),
        (u(downsample_padding=0.0), "downsample_padding = 0.0"),
        # config.json: ranges
        (u(layers_per_block=0), "layers_per_block = 0"),
        (u(layers_per_block=-1), "layers_per_block = -1"),
        (u(layers_per_block=10 ** 9), "layers_per_block = 1000000000"),
        (u(block_out_channels=[8, -16]), "block_out_channels = [8, -16]"),
        (u(block_out_channels=[0, 16]), "block_out_channels = [0, 16]"),
        (u(sample_size=0), "sample_size = 0"),
        (u(sample_size=-8), "sample_size = -8"),
        (u(in_channels=0), "in_channels = 0"),
        (u(norm_num_groups=0), "norm_num_groups = 0"),
        (u(norm_num_groups=None), "norm_num_groups = null"),
        (u(attention_head_dim=0), "attention_head_dim = 0"),
        (u(norm_eps=0), "norm_eps = 0; it must be a finite number in (0, 1)"),
        (u(norm_eps=-1e-6), "norm_eps = -1e-06"),
        (u(norm_eps=math.nan), "norm_eps = NaN"),
        (u(norm_eps=math.inf), "norm_eps = Infinity"),
        (u(dropout=1.0), "dropout = 1.0; it must be a finite number in [0, 1)"),
        (u(dropout=-0.1), "dropout = -0.1"),
        (u(dropout=math.nan), "dropout = NaN"),
        (u(downsample_padding=2), "downsample_padding = 2"),
        # config.json: what unet.py cannot express, and fields against each other
        (u(flip_sin_to_cos=ABSENT), "flip_sin_to_cos = true (absent, so diffusers' default)"),
        (u(num_class_embeds=1), "num_class_embeds = 1; it must be"),
        (u(num_class_embeds=2.5), "num_class_embeds = 2.5"),
        (u(act_fn="gelu"), 'act_fn = "gelu"; it must be "silu"'),
        (u(sample_size=7), "sample_size = 7 is not divisible by 2**(levels - 1) = 2"),
        (u(sample_size=[8, 16]), "sample_size = [8, 16]"),
        (u(norm_num_groups=3), "norm_num_groups = 3 does not divide every width"),
        (u(block_out_channels=[6, 12]), "norm_num_groups = 4 does not divide every width of "
                                        "block_out_channels = [6, 12]"),
        (u(block_out_channels=[2, 4], norm_num_groups=2), "block_out_channels[0] = 2"),
        (u(block_out_channels=[8, 12]), "each must be a multiple of the first"),
        (u(block_out_channels=[8, 16, 16]), "block_out_channels, down_block_types and "
                                            "up_block_types have 3, 2 and 2 entries"),
        (u(up_block_types=["UpBlock2D", "AttnUpBlock2D"]), "up_block_types"),
        (u(attention_head_dim=8), "attention_head_dim = 8 splits the attention"),
        (u(out_channels=3), "out_channels = 3 is neither in_channels = 1 nor twice it"),
        (u(out_channels=2), "out_channels = 2 = 2 x in_channels"),
        (u(_class_name="UNet2DConditionModel"), '_class_name = "UNet2DConditionModel"'),
        # scheduler_config.json
        (s(num_train_timesteps=20.5), "num_train_timesteps = 20.5; it must be an integer"),
        (s(num_train_timesteps="20"), 'num_train_timesteps = "20"'),
        (s(num_train_timesteps=0), "num_train_timesteps = 0"),
        (s(num_train_timesteps=True), "num_train_timesteps = true"),
        (s(num_train_timesteps=10 ** 9), "num_train_timesteps = 1000000000"),
        (s(beta_start=0), "beta_start = 0; it must be a finite number in [5.96e-08, 1)"),
        (s(beta_start=1e-45), "beta_start = 1e-45"),  # 1 - β is 1 in float32: ᾱ_1 = 1
        (s(beta_start=-0.001), "beta_start = -0.001"),
        (s(beta_start="0.001"), 'beta_start = "0.001"'),
        (s(beta_start=math.nan), "beta_start = NaN"),
        (s(beta_end=1.0), "beta_end = 1.0"),
        (s(beta_end=math.inf), "beta_end = Infinity"),
        (s(beta_start=0.3), "beta_start = 0.3 exceeds beta_end = 0.2"),
        (s(num_train_timesteps=3, trained_betas=[0.1, 0.2]), "trained_betas has 2 entries for "
                                                             "num_train_timesteps = 3"),
        (s(num_train_timesteps=2, trained_betas=[0.1, 0.0]), "trained_betas = [0.1, 0.0]"),
        (s(num_train_timesteps=2, trained_betas=[0.1, math.nan]), "trained_betas = [0.1, NaN]"),
        (s(num_train_timesteps=2, trained_betas=[0.1, "0.2"]), "trained_betas"),
        (s(trained_betas="0.1"), 'trained_betas = "0.1"'),
        (s(beta_schedule="sigmoid"), 'beta_schedule = "sigmoid"; it must be "linear"'),
        (s(variance_type="learned"), 'variance_type = "learned"; it must be one of'),
        (s(variance_type="learned_range"), 'variance_type = "learned_range", but the network'),
        (s(prediction_type="eps"), 'prediction_type = "eps"'),
        (s(clip_sample=1), "clip_sample = 1; it must be true or false"),
        (s(clip_sample="true"), 'clip_sample = "true"'),
        (s(thresholding=True), "thresholding = true"),
        (s(clip_sample_range=2.0), "clip_sample_range = 2.0"),
        (s(rescale_betas_zero_snr=True), "rescale_betas_zero_snr = true"),
        (s(num_train_timesteps=100_000), "give a β table ddpm.py cannot use"),
        (s(_class_name="ScoreSdeVeScheduler"), '_class_name = "ScoreSdeVeScheduler"'),
        # the JSON files themselves
        (raw("index_list", "model_index.json", b"[1, 2]"),
         "holds a JSON list, not the JSON object"),
        (raw("index_latin1", "model_index.json", '{"unet": "é"}'.encode("latin-1")),
         "is not UTF-8 text"),
        (raw("index_broken", "model_index.json", b'{"unet": '), "cannot read"),
        (raw("index_latent", "model_index.json", json.dumps({
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"],
            "vqvae": ["diffusers", "VQModel"]}).encode()), "lists scheduler, unet, vqvae"),
        (raw("index_no_unet", "model_index.json", b'{"scheduler": ["diffusers", "DDPMScheduler"]}'),
         "lists scheduler"),
        (raw("index_bad_pair", "model_index.json", b'{"unet": "UNet2DModel"}'),
         'unet = "UNet2DModel"; a component is a pair'),
        (raw("unet_string", "unet/config.json", b'"UNet2DModel"'), "holds a JSON str"),
        (raw("unet_binary", "unet/config.json", b"\xff\xfe\x00{"), "is not UTF-8 text"),
        (raw("unet_empty", "unet/config.json", b""), "cannot read"),
        (raw("unet_deep", "unet/config.json", b"[" * 100_000), "cannot read"),
        (raw("scheduler_number", "scheduler/scheduler_config.json", b"3"), "holds a JSON int"),
        (raw("scheduler_binary", "scheduler/scheduler_config.json", b"\x80abc"), "not UTF-8"),
        # the weights
        (weights("transposed", with_tensor(CONV, lambda t: t.transpose(0, 1).contiguous())),
         f"{CONV} has shape [32, 16, 3, 3], but the network its config.json describes needs "
         "[16, 32, 3, 3]"),
        (weights("flattened", with_tensor(CONV, lambda t: t.reshape(16, -1).contiguous())),
         f"{CONV} has shape [16, 288]"),
        (weights("attention_as_conv",
                 with_tensor(TO_K, lambda t: t[:, :, None, None].contiguous())),
         f"{TO_K} has shape [16, 16, 1, 1], but the network its config.json describes needs "
         "[16, 16]"),
        (weights("nan", with_tensor(CONV, poisoned(math.nan))), f"{CONV} holds 1 non-finite "
                                                                "values (NaN)"),
        (weights("inf", with_tensor(CONV, poisoned(math.inf))), f"{CONV} holds 1 non-finite "
                                                                "values (+inf)"),
        (weights("neg_inf", with_tensor(CONV, poisoned(-math.inf))), "(-inf)"),
        (weights("float64_overflow", with_tensor(CONV, lambda t: t.double() * 1e300)),
         f"{CONV} holds values too large for torch.float32"),
        (weights("int64", with_tensor(CONV, lambda t: t.long())), f"{CONV} is a torch.int64 "
                                                                   "tensor; weights must be"),
        (weights("bool", with_tensor(CONV, lambda t: t > 0)), f"{CONV} is a torch.bool tensor"),
        (weights("complex", with_tensor(CONV, lambda t: t.to(torch.complex64)), as_bin=True),
         "torch.complex64"),
        (weights("not_a_tensor", with_tensor(CONV, lambda t: 3), as_bin=True),
         f"{CONV} is a int, not a tensor"),
        (weights("int_key", lambda state: {**state, 5: state[CONV]}, as_bin=True),
         "names a weight 5, which is not a string"),
        (weights("a_list", lambda state: list(state.values()), as_bin=True),
         "does not hold a state dict"),
        (weights("missing", lambda state: {k: v for k, v in state.items() if k != CONV}),
         f"lacks {CONV}"),
        (weights("extra", lambda state: {**state, "extra.weight": state[CONV].clone()}),
         "no place for (extra.weight)"),
        (weights("twice",
                 lambda state: {**state, TO_K.replace("to_k", "key"): state[TO_K].clone()}),
         f"holds {TO_K} twice"),
        (raw("garbage_weights", f"unet/{interop.WEIGHT_FILES[0]}", b"not safetensors"),
         "cannot read"),
    ]


def test_import_refusals_are_one_line_and_change_nothing(pipelines, tmp_path, capsys):
    """Every kind of wrong diffusers folder (a config field of the wrong type or range, fields
    that contradict each other, a JSON file that is no UTF-8 JSON object, a pipeline that is not
    a pixel-space DDPM, a tensor of the wrong shape, dtype or values): exit status 2, exactly
    one line `error: ...` saying what is wrong, no traceback, no checkpoint written, and no file
    of the folders changed."""
    root, variant, _ = pipelines
    cases = import_cases(variant)
    before = snapshot(root)
    out = tmp_path / "imported.pt"
    for folder, needle in cases:
        code, lines = run_convert(["--from-diffusers", folder, "--out", str(out)], capsys)
        assert code == 2, (folder, needle, lines)
        assert len(lines) == 1 and lines[0].startswith("error: "), (folder, lines)
        assert "Traceback" not in lines[0] and needle in lines[0], (needle, lines[0])
        assert not out.exists(), folder
    assert snapshot(root) == before
    code, lines = run_convert(["--from-diffusers", str(root / "pipe"), "--out", str(out)], capsys)
    assert code == 0 and out.exists(), lines  # the folder they were made from imports


def test_a_transposed_conv_weight_is_refused(pipelines, tmp_path):
    """A 3x3 conv weight stored [in, out, 3, 3] (32 x 16) instead of [out, in, 3, 3] has the
    element count the network needs: it must be refused naming the tensor and both shapes, not
    reshaped into a scrambled import."""
    _, variant, weights = pipelines
    assert weights[CONV].shape == (16, 32, 3, 3)
    folder = variant("transposed_alone",
                     state=with_tensor(CONV, lambda t: t.transpose(0, 1).contiguous()))
    with pytest.raises(interop.ConvertError) as excinfo:
        interop.import_diffusers(folder, str(tmp_path / "t.pt"), progress=lambda s: None)
    message = str(excinfo.value)
    assert CONV in message and "[32, 16, 3, 3]" in message and "[16, 32, 3, 3]" in message
    assert "\n" not in message and not (tmp_path / "t.pt").exists()


def test_weights_of_other_floating_dtypes_import_as_float32(pipelines, tmp_path):
    """float16 and float64 weights are legitimate: cast to float32, the same values."""
    _, variant, weights = pipelines
    for dtype in (torch.float16, torch.float64):
        folder = variant(f"as_{dtype}".replace(".", "_"),
                         state=lambda state: {k: v.to(dtype) for k, v in state.items()})
        interop.import_diffusers(folder, str(tmp_path / "d.pt"), progress=lambda s: None)
        ours = checkpoint.load(tmp_path / "d.pt")["ema"]
        conv = "up.0.blocks.0.conv1.weight"
        assert ours[conv].dtype == torch.float32
        assert torch.equal(ours[conv], weights[CONV].to(dtype).float())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of the small network (random weights, EMA and raw weights different), one
    whose EMA weights hold a NaN, and one whose config no network can be built from."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(7)
    model = randomise(unet.UNet(**TINY))
    raw = randomise(unet.UNet(**TINY), seed=1).state_dict()
    config = run_config(TINY)
    good = {"step": 1, "config": config, "model": raw, "ema": model.state_dict()}
    checkpoint.save(root / "ours.pt", good)
    nan = {k: v.clone() for k, v in model.state_dict().items()}
    nan["conv_in.weight"][0, 0, 0, 0] = math.nan
    checkpoint.save(root / "nan.pt", {**good, "ema": nan})
    checkpoint.save(root / "bad_config.pt", {**good, "config": {**config, "net": "x"}})
    checkpoint.save(root / "bad_schedule.pt", {**good, "config": {**config, "schedule": "bogus"}})
    checkpoint.save(root / "other_arch.pt", {**good, "config": {**config, "net": {
        **TINY, "base_channels": 32}}})
    (root / "a_file").write_text("")
    (root / "a_folder").mkdir()
    (root / "a_folder" / "keep.txt").write_text("not an export")
    return root, model, raw


def test_export_refusals_are_one_line_and_change_nothing(trained, capsys):
    root, _, _ = trained
    ours, out = str(root / "ours.pt"), str(root / "exported")
    cases = [
        (["--to-diffusers", ours, "--out", str(root / "a_file")], "exists"),
        (["--to-diffusers", ours, "--out", str(root / "a_file"), "--overwrite"], "is a file"),
        (["--to-diffusers", ours, "--out", str(root / "a_folder")], "exists"),
        (["--to-diffusers", ours, "--out", str(root / "a_folder"), "--overwrite"],
         "is a folder but not a diffusers pipeline"),
        (["--to-diffusers", ours, "--out", str(root / "a_file" / "x")], "is not a directory"),
        (["--to-diffusers", str(root / "nan.pt"), "--out", out],
         "the EMA weight conv_in.weight holds non-finite values"),
        (["--to-diffusers", str(root / "bad_config.pt"), "--out", out], "cannot build"),
        (["--to-diffusers", str(root / "bad_schedule.pt"), "--out", out], "cannot build"),
        (["--to-diffusers", str(root / "other_arch.pt"), "--out", out], "another architecture"),
        (["--to-diffusers", str(root / "missing.pt"), "--out", out], "no checkpoint"),
        (["--from-diffusers", str(root), "--out", str(root / "a_folder"), "--overwrite"],
         "is a directory"),
    ]
    before = snapshot(root)
    for argv, needle in cases:
        code, lines = run_convert(argv, capsys)
        assert code == 2, (argv, lines)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
        assert "Traceback" not in lines[0] and needle in lines[0], (needle, lines[0])
        assert snapshot(root) == before, argv
    assert not os.path.exists(out)


def test_overwrite_replaces_an_earlier_export(trained, tmp_path, capsys):
    """--to-diffusers over an existing export folder: refused without --overwrite, replaced with
    it (the new weights, nothing of the old folder left); --no-ema exports the raw weights."""
    root, model, raw = trained
    out = str(tmp_path / "pipe")
    assert run_convert(["--to-diffusers", str(root / "ours.pt"), "--out", out], capsys)[0] == 0
    (tmp_path / "pipe" / "stale.txt").write_text("from before")
    code, lines = run_convert(["--to-diffusers", str(root / "ours.pt"), "--out", out, "--no-ema"],
                              capsys)
    assert code == 2 and "--overwrite" in lines[0]
    code, lines = run_convert(["--to-diffusers", str(root / "ours.pt"), "--out", out, "--no-ema",
                               "--overwrite"], capsys)
    assert code == 0, lines
    assert not (tmp_path / "pipe" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary folder left
    theirs = UNet2DModel.from_pretrained(out, subfolder="unet").state_dict()
    assert torch.equal(theirs["conv_in.weight"], raw["conv_in.weight"])
    assert not torch.equal(theirs["conv_in.weight"], model.state_dict()["conv_in.weight"])
