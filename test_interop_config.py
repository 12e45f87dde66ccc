"""The diffusers configs convert.py reads and writes, field by field, against diffusers itself:
every UNet2DModel field changed alone either changes the imported network exactly as diffusers
changes its own (float64, relative 1e-9) or is refused in one line naming it; every unet.UNet
setting exported builds in diffusers the network it is in ours; every beta_schedule and
variance_type the scheduler mapping claims gives DDPMScheduler's own β table, variance and
reverse step; the defaults a missing field takes are diffusers' own. A property test (Hypothesis)
sets one field of a valid pipeline at a time to values of the wrong type or range and asserts
the same either-or through interop.import_diffusers."""
import contextlib
import inspect
import itertools
import json
import math
import os
import tempfile
import typing

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-test.txt")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

import checkpoint  # noqa: E402
import config as config_module  # noqa: E402  (the tests name their dicts "config")
import interop  # noqa: E402
import unet  # noqa: E402
from test_interop import float64_time_embedding, randomise  # noqa: E402

# A valid diffusers config of a small network (attention at 4x4 and in the middle, both 16
# channels wide) and a valid scheduler config: every field written out, as save_pretrained does.
UNET = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": None, "freq_shift": 1, "flip_sin_to_cos": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "block_out_channels": [8, 16],
        "layers_per_block": 1, "mid_block_scale_factor": 1, "downsample_padding": 0,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
        "attention_head_dim": None, "norm_num_groups": 4, "attn_norm_num_groups": None,
        "norm_eps": 1e-6, "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None}
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 20, "beta_start": 0.001,
             "beta_end": 0.2, "beta_schedule": "linear", "trained_betas": None,
             "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
             "thresholding": False, "dynamic_thresholding_ratio": 0.995,
             "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
             "steps_offset": 0, "rescale_betas_zero_snr": False}
ABSENT = "(the field removed)"


def fields_of(cls):
    """The config fields a diffusers class takes: its __init__'s parameters."""
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def changed(config, field, value):
    """config with field set to value (ABSENT: removed)."""
    out = {k: v for k, v in config.items() if k != field}
    return out if value is ABSENT else {**out, field: value}


def kwargs_of(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def write_folder(folder, unet_config, scheduler_config, theirs=None):
    """A DDPM pipeline folder with exactly these configs (JSON as json.dump writes it, NaN and
    Infinity included) and, given a UNet2DModel, its weights."""
    os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    if theirs is not None:
        theirs.save_pretrained(os.path.join(folder, "unet"))
    for path, value in (("model_index.json", {"_class_name": "DDPMPipeline",
                                              "scheduler": ["diffusers", "DDPMScheduler"],
                                              "unet": ["diffusers", "UNet2DModel"]}),
                        ("unet/config.json", unet_config),
                        ("scheduler/scheduler_config.json", scheduler_config)):
        with open(os.path.join(folder, path), "w") as f:
            json.dump(value, f)


def import_folder(folder):
    """(our network in float64, the checkpoint's config) of a diffusers folder."""
    out = os.path.join(folder, "imported.pt")
    interop.import_diffusers(folder, out, progress=lambda s: None)
    state = checkpoint.load(out)
    ours = unet.UNet(**state["config"]["net"])
    ours.load_state_dict(state["ema"])
    return ours.double().eval(), state["config"]


def relative_error(ours, theirs, size, channels, seed=0):
    """max |ours - theirs| / max |ours| on random float64 input at four timesteps, diffusers'
    time embedding computed in float64 too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, channels, size, size, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    theirs = theirs.double().eval()
    classes = getattr(theirs.config, "num_class_embeds", None)
    labels = torch.arange(4) % classes if classes else None  # the last is the null label
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        float64_time_embedding(patch)
        mine = ours(x, t) if labels is None else ours(x, t, labels)
        other = theirs(x, t, class_labels=labels).sample
    assert mine.shape == other.shape, (mine.shape, other.shape)
    return ((mine - other).abs().max() / mine.abs().max()).item()


def dropouts(ours, theirs):
    """The dropout probability of each residual block, ours and diffusers' (in module order):
    dropout acts in training only, so it is compared as a setting, not as outputs."""
    return ([m.dropout.p for m in ours.modules() if isinstance(m, unet.ResBlock)],
            [m.dropout.p for m in theirs.modules() if isinstance(m, ResnetBlock2D)])


def assert_imports_as_diffusers_builds(unet_config, scheduler_config, folder, seed=0):
    """diffusers' UNet2DModel built from unet_config, random weights, saved under exactly that
    config, imported: the same function and the same dropout."""
    torch.manual_seed(seed)
    theirs = randomise(UNet2DModel(**kwargs_of(unet_config)), seed)
    write_folder(folder, unet_config, scheduler_config, theirs)
    ours, config = import_folder(folder)
    size = config["net"]["image_size"]
    err = relative_error(ours, theirs, size, theirs.config.in_channels)
    assert err < 1e-9, err
    mine, other = dropouts(ours, theirs)
    assert mine == other and mine, (mine, other)
    return ours, theirs


def assert_refused_naming(field, folder, unet_config, scheduler_config):
    """import_diffusers refuses the folder in one line naming `field` and writes nothing."""
    write_folder(folder, unet_config, scheduler_config)
    with pytest.raises(interop.ConvertError) as excinfo:
        interop.import_diffusers(folder, os.path.join(folder, "x.pt"), progress=lambda s: None)
    message = str(excinfo.value)
    assert "\n" not in message and field in message, (field, message)
    assert not os.path.exists(os.path.join(folder, "x.pt"))


# ---- every UNet2DModel field, changed alone ---------------------------------------------------

# (field, value, "same": imports as diffusers builds it | "refused": one line naming the field).
UNET_CHANGES = [
    ("sample_size", 16, "same"), ("sample_size", [8, 8], "same"), ("sample_size", 4, "same"),
    ("sample_size", [8, 16], "refused"), ("sample_size", 12, "same"), ("sample_size", 7, "refused"),
    ("in_channels", 3, "refused"),          # out_channels 1 is then neither in_channels nor twice
    ("out_channels", 2, "refused"),         # a variance output with a fixed variance_type
    ("out_channels", 3, "refused"),
    ("center_input_sample", True, "refused"), ("time_embedding_type", "fourier", "refused"),
    ("time_embedding_dim", 64, "refused"), ("freq_shift", 0, "refused"),
    ("freq_shift", 1.0, "same"), ("flip_sin_to_cos", True, "refused"),
    ("down_block_types", ["AttnDownBlock2D", "AttnDownBlock2D"], "refused"),
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"], "refused"),
    ("mid_block_type", None, "refused"),
    ("up_block_types", ["AttnUpBlock2D", "AttnUpBlock2D"], "refused"),
    ("block_out_channels", [8, 24], "same"), ("block_out_channels", [16, 32], "same"),
    ("block_out_channels", [4, 16], "same"), ("block_out_channels", [8, 16, 16], "refused"),
    ("block_out_channels", [8, 12], "refused"),
    ("layers_per_block", 2, "same"), ("layers_per_block", 3, "same"),
    ("mid_block_scale_factor", 2, "refused"), ("downsample_padding", 1, "same"),
    ("downsample_padding", 0.0, "refused"),  # diffusers' Conv2d takes no float padding
    ("layers_per_block", 2.0, "refused"), ("freq_shift", True, "refused"),
    ("downsample_type", "resnet", "refused"), ("upsample_type", "resnet", "refused"),
    ("dropout", 0.3, "same"), ("act_fn", "mish", "refused"),
    ("attention_head_dim", 16, "same"),    # one head of 16 wherever there is attention
    ("attention_head_dim", 8, "refused"), ("norm_num_groups", 8, "same"),
    ("norm_num_groups", 2, "same"), ("norm_num_groups", 1, "same"),
    ("norm_num_groups", 16, "refused"), ("attn_norm_num_groups", 2, "refused"),
    ("norm_eps", 0.1, "same"), ("norm_eps", 1e-3, "same"),
    ("resnet_time_scale_shift", "scale_shift", "refused"), ("add_attention", False, "refused"),
    ("class_embed_type", "timestep", "refused"), ("num_class_embeds", 10, "same"),
    ("num_class_embeds", 1, "refused"),  # one row: the null label and no class
    ("num_train_timesteps", 1000, "same"),  # read by learned embeddings only
]
# Changes that leave the network as it was, in diffusers as in ours.
NO_EFFECT = [("num_train_timesteps", 1000), ("freq_shift", 1.0), ("attention_head_dim", 16),
             ("sample_size", [8, 8]), ("dropout", ABSENT)]
# Fields whose absence diffusers fills with a default the small network reaches: (field, outcome).
UNET_ABSENT = {"layers_per_block": "same", "dropout": "same", "downsample_padding": "same",
               "norm_eps": "same", "flip_sin_to_cos": "refused", "freq_shift": "refused",
               "attention_head_dim": "refused", "norm_num_groups": "refused",
               "sample_size": "refused", "in_channels": "refused"}


def test_every_unet2dmodel_field_is_mapped():
    """The table below names every field of UNet2DModel's __init__ and every field
    diffusers_unet_config writes, and the defaults a missing field takes are diffusers' own."""
    theirs = set(fields_of(UNet2DModel))
    assert {f for f, _, _ in UNET_CHANGES} == theirs
    written = set(interop.diffusers_unet_config(unet.PRESETS["mnist"])) - {"_class_name"}
    assert written <= theirs and written <= {f for f, _, _ in UNET_CHANGES}
    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items()
                if k != "self"}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} \
        == interop.UNET_DEFAULTS
    assert set(interop.UNET_FIELDS) == theirs


@pytest.mark.parametrize("field, value, outcome", UNET_CHANGES + [
    (field, ABSENT, outcome) for field, outcome in UNET_ABSENT.items()])
def test_each_unet_field_changes_the_network_as_diffusers_does(field, value, outcome, tmp_path):
    """One field changed (or removed) from a valid config: imported, the network computes what
    diffusers' UNet2DModel computes from the same config, and differs from the network before the
    change (so the field was read), or the import is refused in one line naming the field."""
    config = changed(UNET, field, value)
    if outcome == "refused":
        assert_refused_naming(field, str(tmp_path), config, SCHEDULER)
        return
    ours, _ = assert_imports_as_diffusers_builds(config, SCHEDULER, str(tmp_path))
    before = unet.UNet(**interop.unet_kwargs_from_diffusers(UNET)).double().eval()
    if (field, value) in NO_EFFECT:
        return
    if field == "dropout":
        assert dropouts(ours, before)[0] != dropouts(before, before)[0]
        return
    shapes = lambda net: {k: v.shape for k, v in net.state_dict().items()}
    if shapes(ours) != shapes(before) or ours.image_size != before.image_size:
        return  # another architecture
    before.load_state_dict(ours.state_dict())  # the same weights: only the setting differs
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        mine, other = ours(x, t), before(x, t)
    assert (mine - other).abs().max() > 1e-8 * mine.abs().max()


# (unet.UNet setting, value) for every setting diffusers_unet_config writes, changed alone.
OUR_CHANGES = [("in_channels", 3), ("out_channels", 2), ("base_channels", 16),
               ("channel_mult", (1, 1, 2)), ("channel_mult", (1, 2, 4)), ("num_res_blocks", 2),
               ("attn_resolutions", (8,)), ("attn_resolutions", ()), ("attn_resolutions", (8, 4)),
               ("dropout", 0.2), ("image_size", 4), ("image_size", 12), ("norm_groups", 2),
               ("norm_groups", 8), ("norm_eps", 1e-2), ("downsample_padding", "symmetric"),
               ("num_classes", 3), ("num_classes", 1)]
OURS = dict(in_channels=1, out_channels=None, base_channels=8, channel_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, image_size=8, norm_groups=4,
            norm_eps=1e-6, downsample_padding="tf_same")


def test_every_unet_setting_is_exported():
    """Every setting but the space-to-depth stem and self-conditioning, which diffusers cannot
    express (refused below, and in test_self_cond.py)."""
    assert {f for f, _ in OUR_CHANGES} | {"space_to_depth", "self_cond"} == \
        set(inspect.signature(unet.UNet).parameters)


def test_a_space_to_depth_stem_is_refused_on_export():
    with pytest.raises(interop.ConvertError) as excinfo:
        interop.diffusers_unet_config({**OURS, "space_to_depth": 2, "image_size": 16})
    message = str(excinfo.value)
    assert "space_to_depth = 2" in message and "cannot express" in message and "\n" not in message


@pytest.mark.parametrize("setting, value", OUR_CHANGES)
def test_each_unet_setting_exports_as_the_network_it_is(setting, value):
    """One unet.UNet setting changed: diffusers' UNet2DModel built from diffusers_unet_config,
    with our weights renamed (load_state_dict strict), computes what ours computes (float64,
    relative 1e-9), with the same dropout; and the config imports back as the same settings."""
    kwargs = {**OURS, setting: value}
    if setting == "image_size" and value == 12:
        kwargs["attn_resolutions"] = (6,)
    ours = randomise(unet.UNet(**kwargs))
    config = interop.diffusers_unet_config(kwargs)
    theirs = UNet2DModel(**kwargs_of(config))
    theirs.load_state_dict(interop.weights_to_diffusers(ours.state_dict()))
    err = relative_error(ours.double().eval(), theirs, kwargs["image_size"], kwargs["in_channels"])
    assert err < 1e-9, err
    mine, other = dropouts(ours, theirs)
    assert mine == other
    back = interop.unet_kwargs_from_diffusers(json.loads(json.dumps(config)))
    assert back == {**kwargs, "out_channels": kwargs["out_channels"] or kwargs["in_channels"],
                    "attn_resolutions": tuple(sorted(kwargs["attn_resolutions"], reverse=True))}


def test_a_first_level_wider_than_the_input_conv_is_refused_on_export():
    """unet.py's channel_mult[0] = 2 widens base_channels at the first level, where diffusers'
    input conv and timestep embedding are already that wide: no UNet2DModel config says it."""
    with pytest.raises(interop.ConvertError, match=r"channel_mult\[0\] = 2"):
        interop.diffusers_unet_config({**OURS, "channel_mult": (2, 2)})


# ---- the scheduler: β tables, variances and the reverse step -----------------------------------

def float64_scheduler(config):
    """DDPMScheduler of a config, its ᾱ recomputed in float64 from its own β (it keeps them in
    float32), so that its formulas can be compared with ours at float64 precision."""
    scheduler = DDPMScheduler(**kwargs_of(config))
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


# What DDPMScheduler._get_variance returns, as the standard deviation step() adds noise with:
# fixed_small_log returns σ itself, learned_range log σ², the others σ² (fixed_large_log is
# GLIDE's log β_t, log σ²; step() takes its square root instead, a NaN: its step is not compared).
NOISE_STD = {"fixed_small": torch.sqrt, "fixed_small_log": lambda v: v,
             "fixed_large": torch.sqrt, "fixed_large_log": lambda v: torch.exp(0.5 * v),
             "learned_range": lambda v: torch.exp(0.5 * v)}


def test_every_variance_type_is_mapped():
    assert set(NOISE_STD) == set(interop.VARIANCE)


@pytest.mark.parametrize("variance_type", list(NOISE_STD))
@pytest.mark.parametrize("betas", [{"num_train_timesteps": 1000},
                                   {"num_train_timesteps": 50, "beta_start": 0.001,
                                    "beta_end": 0.2, "beta_schedule": "scaled_linear"}])
def test_each_variance_type_is_ddpm_schedulers_variance(variance_type, betas):
    """For every t >= 1, the noise scale σ_t of the imported settings is the one DDPMScheduler's
    _get_variance gives for that variance_type (learned_range: for model outputs v in [-1, 1]).
    At t = 0 neither adds noise (DDPMScheduler's step: `if t > 0`; ddpm.py: z = 0 at index 0),
    and there ddpm.py's fixed_large uses β̃_2, as Ho et al.'s code, where diffusers uses β_1."""
    assert_same_variances({**betas, "variance_type": variance_type})


def assert_same_variances(config):
    """σ_t of the imported settings is the one DDPMScheduler._get_variance gives, t = 1..T-1."""
    ours = interop.diffusion_config_from_scheduler(config)
    diffusion = config_module.build_diffusion(ours)
    scheduler = float64_scheduler(config)
    T, kind = diffusion.num_timesteps, scheduler.config.variance_type
    v = torch.linspace(-1, 1, 5, dtype=torch.float64).reshape(1, 5, 1, 1)
    x = torch.zeros(1, 5, 1, 1, dtype=torch.float64)
    output = torch.cat([x, v], dim=1) if kind == "learned_range" else x
    for t in range(1, T):
        theirs = NOISE_STD[kind](scheduler._get_variance(t, predicted_variance=v))
        out = diffusion.p_mean_variance(lambda x_t, s: output, x, torch.tensor([t]))
        mine, theirs = torch.broadcast_tensors(torch.exp(0.5 * out["log_variance"]), theirs)
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)  # float32 β in diffusers


# (DDPMScheduler config, the ddpm.py schedule it must be): every beta_schedule it computes.
BETA_CASES = [
    ({"num_train_timesteps": 1000}, "linear"),
    ({"num_train_timesteps": 100, "beta_start": 0.001, "beta_end": 0.2}, "linear"),
    ({"num_train_timesteps": 100, "beta_start": 0.002, "beta_end": 0.1}, "custom"),
    ({"num_train_timesteps": 1, "beta_start": 0.3, "beta_end": 0.3}, "custom"),
    ({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
      "beta_end": 0.012}, "custom"),
    ({"num_train_timesteps": 30, "beta_schedule": "scaled_linear", "beta_start": 0.01,
      "beta_end": 0.5}, "custom"),
    ({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}, "cosine"),
    ({"num_train_timesteps": 10, "beta_schedule": "squaredcos_cap_v2"}, "cosine"),
    ({"num_train_timesteps": 4, "trained_betas": [0.5, 0.25, 0.125, 0.0625]}, "custom"),
    ({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3],
      "beta_schedule": "squaredcos_cap_v2"}, "custom"),  # trained_betas win, as in diffusers
]


def test_every_beta_schedule_is_mapped():
    """Every beta_schedule DDPMScheduler names that the import accepts has cases below."""
    named = set(typing.get_args(inspect.signature(DDPMScheduler.__init__).parameters[
        "beta_schedule"].annotation)) | {"laplace"}
    accepted = {kind for kind in named if interop.SCHEDULER_FIELDS["beta_schedule"].ok(kind)}
    assert accepted == {c.get("beta_schedule", "linear") for c, _ in BETA_CASES
                        if "trained_betas" not in c} == {"linear", "scaled_linear",
                                                         "squaredcos_cap_v2"}


@pytest.mark.parametrize("config, schedule", BETA_CASES)
def test_each_beta_schedule_is_ddpm_schedulers_table(config, schedule):
    """The imported β table is DDPMScheduler's own (to its float32 rounding), named where it is
    one of ddpm.py's schedules; exported again, DDPMScheduler builds the same table."""
    ours = interop.diffusion_config_from_scheduler(config)
    assert ours["schedule"] == schedule and ours["timesteps"] == config["num_train_timesteps"]
    reference = DDPMScheduler(**config).betas.double()
    betas = config_module.build_diffusion(ours).betas
    torch.testing.assert_close(betas, reference, rtol=1e-6, atol=1e-9)
    again = DDPMScheduler(**kwargs_of(interop.scheduler_from_diffusion_config(ours))).betas
    torch.testing.assert_close(again.double(), reference, rtol=1e-6, atol=1e-9)


STEP_CASES = [dict(zip(("variance_type", "prediction_type", "clip_sample"), combo))
              for combo in itertools.product(
                  ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"],
                  ["epsilon", "sample", "v_prediction"], [True, False])]


@pytest.mark.parametrize("direction", ["import", "export"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_one_reverse_step_is_ddpm_schedulers_step(case, direction):
    """x_{t-1} from x_t and a model output, with the same noise: DDPMScheduler.step of the config
    and ddpm.py's p_sample of the mapped settings agree at t = 0, 1, T/2 and T-1, for every
    prediction_type, clip_sample and variance_type whose step() is defined (fixed_large_log's is
    not: see NOISE_STD). "import": from a diffusers config; "export": ours -> diffusers."""
    config = {"num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.2, **case}
    if direction == "export":
        config = interop.scheduler_from_diffusion_config(
            interop.diffusion_config_from_scheduler(config))
    assert_same_steps(config)


def assert_same_steps(config, atol=1e-7):
    """DDPMScheduler.step (float64 ᾱ) and ddpm.py's p_sample of the imported settings agree.
    fixed_large_log's step() takes the square root of log β_t, a NaN: its variance is compared as
    _get_variance gives it, and its step as fixed_large's, from which it differs in nothing else."""
    if config.get("variance_type") == "fixed_large_log":
        assert_same_variances(config)
        config = {**config, "variance_type": "fixed_large"}
    ours = interop.diffusion_config_from_scheduler(config)
    diffusion = config_module.build_diffusion(ours)
    scheduler = float64_scheduler(config)
    torch.testing.assert_close(diffusion.betas, scheduler.betas.double(), rtol=1e-6, atol=1e-9)
    T, learned = diffusion.num_timesteps, ours["diffusion"]["var_type"] == "learned_range"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    output = torch.randn(2, 6 if learned else 3, 4, 4, generator=g, dtype=torch.float64) * 1.5
    if learned:
        output[:, 3:] = output[:, 3:].tanh()  # v in (-1, 1)
    for t in sorted({0, min(1, T - 1), T // 2, T - 1}):
        g = torch.Generator().manual_seed(t)
        theirs = scheduler.step(output, t, x, generator=g).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
        mine = diffusion.p_sample(lambda x_t, s: output, x, torch.full((2,), t),
                                  clip_denoised=ours["clip_denoised"], noise=noise)["sample"]
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=atol)


def test_every_ddpm_scheduler_field_is_checked():
    """Every field DDPMScheduler takes is either checked by the table or one convert.py leaves
    alone because it acts only in what it does not import (thresholding's settings, the inference
    timestep spacing); the defaults a missing field takes are DDPMScheduler's own."""
    unused = {"dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "steps_offset"}
    assert set(interop.SCHEDULER_FIELDS) == set(fields_of(DDPMScheduler)) - unused
    defaults = {k: p.default for k, p in
                inspect.signature(DDPMScheduler.__init__).parameters.items()}
    assert {k: defaults[k] for k in interop.SCHEDULER_DEFAULTS} == interop.SCHEDULER_DEFAULTS


# ---- the property: a wrong value is refused naming its field, a right one maps exactly ---------

ENTRY = st.one_of(st.none(), st.booleans(), st.integers(-2, 20), st.sampled_from([10 ** 9]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3))
BAD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 20), st.sampled_from([10 ** 9, 2 ** 63, -2 ** 31]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 8.0, -0.0, 1e-7]),
    st.text(max_size=6), st.sampled_from(["8", "linear", "DownBlock2D", "epsilon", "true"]),
    st.lists(ENTRY, max_size=3), st.just({"a": 1}), st.just(ABSENT))
# Values right in kind for a field, often valid, sometimes not (drawn besides BAD).
NEAR = {
    "sample_size": [16, 4, [8, 8], [8, 16], 6, 2],
    "in_channels": [2, 3], "out_channels": [2, 3],
    "block_out_channels": [[8, 8], [16, 32], [8, 24], [4, 8], [8, 16, 16], [6, 12], [8, 16.0]],
    "down_block_types": [["AttnDownBlock2D", "AttnDownBlock2D"], ["DownBlock2D", "DownBlock2D"],
                         ["CrossAttnDownBlock2D", "AttnDownBlock2D"]],
    "up_block_types": [["AttnUpBlock2D", "AttnUpBlock2D"], ["UpBlock2D", "UpBlock2D"]],
    "layers_per_block": [2, 2.0], "attention_head_dim": [16, 8], "norm_num_groups": [2, 8, 1, 4.0],
    "norm_eps": [0.1, 1e-5, 1e-12], "dropout": [0.3, 0, 0.99], "downsample_padding": [1, 2, 0.0],
    "freq_shift": [0, 1.0], "mid_block_scale_factor": [1.0, 2], "time_embedding_dim": [32, 64],
    "attn_norm_num_groups": [4, 2], "num_train_timesteps": [1000, 1, 10, 1000.0],
    "beta_start": [0.0001, 0.19, 0.2, 0.5, 1e-12], "beta_end": [0.02, 0.5, 0.999, 0.0011],
    "beta_schedule": ["scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"],
    "trained_betas": [list(np.linspace(0.01, 0.3, 20)), [0.1] * 19, [0.0] + [0.1] * 19,
                      [0.1] * 19 + [1.0], None],
    "variance_type": ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                      "learned", "learned_range"],
    "prediction_type": ["epsilon", "sample", "v_prediction"],
    "clip_sample": [False, True], "thresholding": [True, False], "clip_sample_range": [1, 2.0],
    "rescale_betas_zero_snr": [True, False], "timestep_spacing": ["trailing"],
}


def value_for(field):
    return st.one_of(BAD, st.sampled_from(NEAR.get(field, [ABSENT])))


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield folder


def refused_or_mapped(which, field, value):
    """The property, for one field of one config set to value: import_diffusers refuses it in
    one line naming the field, or the value is valid and maps exactly (the network: as diffusers'
    UNet2DModel computes; the scheduler: DDPMScheduler's β table and reverse step)."""
    unet_config = changed(UNET, field, value) if which == "unet" else UNET
    scheduler_config = changed(SCHEDULER, field, value) if which == "scheduler" else SCHEDULER
    with scratch() as folder:
        write_folder(folder, unet_config, scheduler_config)  # no weights: the configs first
        with pytest.raises(interop.ConvertError) as excinfo:
            interop.import_diffusers(folder, os.path.join(folder, "x.pt"), progress=lambda s: None)
        message = str(excinfo.value)
        assert "\n" not in message and not os.path.exists(os.path.join(folder, "x.pt"))
        if "has neither" not in message:  # refused before the weights were looked for
            assert field in message, (field, value, message)
            return "refused"
    with scratch() as folder:
        if which == "unet":
            assert_imports_as_diffusers_builds(unet_config, scheduler_config, folder)
        else:
            assert_same_steps(scheduler_config)
    return "mapped"


@settings(max_examples=60)
@given(data=st.data())
def test_a_wrong_unet_field_is_refused_naming_it(data):
    field = data.draw(st.sampled_from(fields_of(UNet2DModel)), label="field")
    value = data.draw(value_for(field), label="value")
    event(refused_or_mapped("unet", field, value))


@settings(max_examples=60)
@given(data=st.data())
def test_a_wrong_scheduler_field_is_refused_naming_it(data):
    field = data.draw(st.sampled_from(fields_of(DDPMScheduler)), label="field")
    value = data.draw(value_for(field), label="value")
    event(refused_or_mapped("scheduler", field, value))


@pytest.mark.parametrize("which, field, value, outcome", [
    ("unet", "layers_per_block", 2, "mapped"), ("unet", "sample_size", [8, 8], "mapped"),
    ("unet", "norm_eps", 0.1, "mapped"), ("unet", "layers_per_block", 0, "refused"),
    ("unet", "block_out_channels", [8, math.nan], "refused"),
    ("scheduler", "beta_schedule", "scaled_linear", "mapped"),
    ("scheduler", "variance_type", "fixed_large", "mapped"),
    ("scheduler", "trained_betas", list(np.linspace(0.01, 0.3, 20)), "mapped"),
    ("scheduler", "timestep_spacing", "trailing", "mapped"),
    ("scheduler", "beta_end", math.inf, "refused"), ("scheduler", "clip_sample", 0, "refused")])
def test_the_property_takes_both_branches(which, field, value, outcome):
    """Each of the property's two outcomes is reached (Hypothesis draws both, but which ones it
    draws is up to it)."""
    assert refused_or_mapped(which, field, value) == outcome
