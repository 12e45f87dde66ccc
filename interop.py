"""diffusers' DDPM folders and this project's checkpoints, mapped both ways: the network config
(UNet2DModel <-> unet.UNet), the weights (renamed; attention's Linear layers <-> 1x1 convs), the
scheduler (DDPMScheduler <-> ddpm.py's β table, T, prediction, variance and clipping), and the
folders themselves. convert.py is its command line; bench.py builds its diffusers peer with
diffusers_unet_config. Weights are read with the safetensors package (imported only where a
safetensors file is read or written) or torch.load(weights_only=True): nothing read executes code.

Everything read is checked before anything is built: each config against a table of its fields
(type and range: check_unet_config, check_scheduler_config), then the fields against each other,
then every tensor (name, exact shape, floating point, finite). A refusal is one ConvertError line
naming the field or tensor, its value and what is allowed.
"""
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from typing import Callable, NamedTuple

import numpy as np
import torch

import checkpoint
import cli
import config as configs
import ddpm
import files
import unet

SAFETENSORS_HINT = "pip install safetensors"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' variance types by the variance they mean (DDPMScheduler._get_variance): the "_log"
# kinds return the same variance in another form (fixed_small_log its square root, fixed_large_log
# its log), so they map to the same ddpm.py var_type.
VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
            "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
            "learned_range": "learned_range"}
# The scheduler classes whose config describes the β table a network was trained with.
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
# What unet.py computes, in diffusers' UNet2DModel terms: the fields that must have these values.
FIXED_UNET_FIELDS = {"center_input_sample": False, "time_embedding_type": "positional",
                     "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_type": "UNetMidBlock2D",
                     "mid_block_scale_factor": 1, "downsample_type": "conv",
                     "upsample_type": "conv", "act_fn": "silu", "resnet_time_scale_shift": "default",
                     "add_attention": True, "class_embed_type": None,
                     "time_embedding_dim": None, "attn_norm_num_groups": None}
# diffusers' UNet2DModel defaults (0.42.1), for the fields a config leaves out: diffusers builds
# those, so a missing flip_sin_to_cos is True (which unet.py cannot express), not False.
UNET_DEFAULTS = {"sample_size": None, "in_channels": 3, "out_channels": 3,
                 "center_input_sample": False, "time_embedding_type": "positional",
                 "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
                 "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                      "AttnDownBlock2D"],
                 "mid_block_type": "UNetMidBlock2D",
                 "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                    "UpBlock2D"],
                 "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
                 "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
                 "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
                 "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
                 "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None}
# diffusers' DDPMScheduler defaults, for the fields a config leaves out.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                      "beta_schedule": "linear", "trained_betas": None,
                      "variance_type": "fixed_small", "clip_sample": True,
                      "prediction_type": "epsilon", "thresholding": False,
                      "clip_sample_range": 1.0, "rescale_betas_zero_snr": False}
# Generous bounds that stop a typo or a damaged file before anything is allocated.
MAX_WIDTH = 2 ** 16        # channels, groups, and an image's side in pixels
MAX_LEVELS = 16            # entries of block_out_channels (2**15 downsamplings already exceed it)
MAX_LAYERS = 1024          # res blocks per level
MAX_TIMESTEPS = 100_000    # T
# The smallest β DDPMScheduler resolves: it computes 1 - β in float32, which a smaller β leaves
# exactly 1 (then ᾱ_1 = 1, and its reverse step divides by 1 - ᾱ_1 = 0 at t = 0).
MIN_BETA = 2.0 ** -24


class ConvertError(cli.UserError):
    """A folder or checkpoint that cannot be converted; the message names the field."""


# ---- checking a config: one table of fields each, then the fields against each other ----------

class Rule(NamedTuple):
    """What a config field may hold: ok(value) -> bool, and `allowed`, said when it does not."""
    ok: Callable
    allowed: str


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    """An int or a finite float (JSON's NaN and Infinity read as floats; a bool is no number)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _same(a, b):
    """a == b and of the same kind: 1.0 is 1, but true is not 1 and "1" is not 1."""
    return a == b if _is_number(a) and _is_number(b) else type(a) is type(b) and a == b


def _shown(value, limit=80):
    """A config value as JSON writes it (true, null, NaN), cut to one short line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def integer(lo, hi):
    return Rule(lambda v: _is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def number(lo, hi, lo_closed=False):
    """A finite number in (lo, hi), or [lo, hi) with lo_closed."""
    return Rule(lambda v: _is_number(v) and (lo <= v if lo_closed else lo < v) and v < hi,
                f"a finite number in {'[' if lo_closed else '('}{lo:.3g}, {hi})")


def one_of(*options, allowed=None):
    if allowed is None:
        shown = [_shown(o) for o in options]
        allowed = " or ".join(shown) if len(shown) <= 2 else f"one of {', '.join(shown)}"
    return Rule(lambda v: any(_same(v, o) for o in options), allowed)


def nullable(rule):
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.allowed}")


def list_of(rule, max_len):
    return Rule(lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= max_len
                and all(rule.ok(entry) for entry in v),
                f"a list of 1 to {max_len} entries, each {rule.allowed}")


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
SQUARE_SIZE = Rule(lambda v: integer(1, MAX_WIDTH).ok(v) or (
    isinstance(v, (list, tuple)) and len(v) == 2 and integer(1, MAX_WIDTH).ok(v[0])
    and _same(v[0], v[1])), f"an integer in [1, {MAX_WIDTH}] or a list of two equal ones "
                            "(unet.py takes square images)")

UNET_FIELDS = {
    **{field: one_of(value, allowed=f"{_shown(value)}, the only value unet.py computes")
       for field, value in FIXED_UNET_FIELDS.items()},
    "sample_size": SQUARE_SIZE,
    "in_channels": integer(1, MAX_WIDTH),
    "out_channels": integer(1, 2 * MAX_WIDTH),
    "down_block_types": list_of(one_of("DownBlock2D", "AttnDownBlock2D"), MAX_LEVELS),
    "up_block_types": list_of(one_of("UpBlock2D", "AttnUpBlock2D"), MAX_LEVELS),
    "block_out_channels": list_of(integer(1, MAX_WIDTH), MAX_LEVELS),
    "layers_per_block": integer(1, MAX_LAYERS),
    "downsample_padding": Rule(lambda v: _is_int(v) and v in (0, 1),
                               "the integer 0 (TF SAME, Ho et al.'s) or 1 (symmetric)"),
    "dropout": number(0, 1, lo_closed=True),
    "attention_head_dim": nullable(integer(1, MAX_WIDTH)),
    "norm_num_groups": integer(1, MAX_WIDTH),
    "norm_eps": number(0, 1),
    "num_train_timesteps": nullable(integer(1, MAX_TIMESTEPS)),  # read only by learned embeddings
    # K + 1 class embeddings: K classes and the null label, the last row (classifier-free guidance)
    "num_class_embeds": nullable(integer(2, MAX_WIDTH)),
}
SCHEDULER_FIELDS = {
    "num_train_timesteps": integer(1, MAX_TIMESTEPS),
    "beta_start": number(MIN_BETA, 1, lo_closed=True),
    "beta_end": number(MIN_BETA, 1, lo_closed=True),
    "beta_schedule": one_of("linear", "scaled_linear", "squaredcos_cap_v2",
                            allowed='"linear", "scaled_linear" or "squaredcos_cap_v2" (give '
                                    "trained_betas for another schedule)"),
    "trained_betas": nullable(list_of(number(MIN_BETA, 1, lo_closed=True), MAX_TIMESTEPS)),
    "variance_type": one_of(*VARIANCE),
    "clip_sample": BOOLEAN,
    "prediction_type": one_of(*PREDICTION),
    "thresholding": one_of(False, allowed="false (ddpm.py cannot express thresholding)"),
    "clip_sample_range": one_of(1.0, allowed="1.0 (ddpm.py cannot express another range)"),
    "rescale_betas_zero_snr": one_of(False, allowed="false (ddpm.py cannot express "
                                                    "rescale_betas_zero_snr)"),
}


def _check_fields(config, defaults, rules, where):
    """`config` with `defaults` filled in; ConvertError naming the first field its rule refuses."""
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, rule in rules.items():
        if not rule.ok(c[field]):
            absent = "" if field in config else " (absent, so diffusers' default)"
            raise ConvertError(f"{where}: {field} = {_shown(c[field])}{absent}; it must be "
                               f"{rule.allowed}")
    return c


def _check_consistent(checks, where):
    """ConvertError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ConvertError(f"{where}: {message}")


def check_unet_config(config, where="config.json"):
    """A diffusers UNet2DModel config, with diffusers' defaults filled in, when unet.py computes
    exactly what diffusers builds from it; else ConvertError naming the field, its value and what
    is allowed. Nothing is built."""
    c = _check_fields(config, UNET_DEFAULTS, UNET_FIELDS, where)
    down, up, widths = c["down_block_types"], c["up_block_types"], list(c["block_out_channels"])
    size = c["sample_size"] if _is_int(c["sample_size"]) else c["sample_size"][0]
    groups, heads, levels = c["norm_num_groups"], c["attention_head_dim"], len(widths)
    attention = [t == "AttnDownBlock2D" for t in down]
    attention_widths = [w for w, a in zip(widths, attention) if a] + widths[-1:]  # + the middle
    split = next((w for w in attention_widths if heads not in (None, w)), None)  # > 1 head there
    factor = 2 ** (levels - 1)
    _check_consistent([
        (len(down) == len(up) == levels,
         f"block_out_channels, down_block_types and up_block_types have {levels}, {len(down)} "
         f"and {len(up)} entries; they need one per level"),
        (attention == [t == "AttnUpBlock2D" for t in reversed(up)],
         f"up_block_types {_shown(up)} put attention at other levels than down_block_types "
         f"{_shown(down)}; unet.py has it at the same resolutions both ways"),
        (widths[0] % 2 == 0 and widths[0] >= 4,
         f"block_out_channels[0] = {widths[0]}; it must be even and >= 4 (it is the width of the "
         "sinusoidal timestep embedding)"),
        (all(w % widths[0] == 0 for w in widths),
         f"block_out_channels = {_shown(widths)}; each must be a multiple of the first "
         "(unet.py's channel_mult)"),
        (all(w % groups == 0 for w in widths),
         f"norm_num_groups = {groups} does not divide every width of block_out_channels = "
         f"{_shown(widths)}"),
        (size % factor == 0,
         f"sample_size = {size} is not divisible by 2**(levels - 1) = {factor}, which "
         f"{levels} levels of downsampling need; use fewer levels or another size"),
        (split is None,
         f"attention_head_dim = {heads} splits the attention of {split} channels into "
         f"{(split or 0) / (heads or 1):g} heads; unet.py's attention has one "
         "(attention_head_dim null or the width)"),
        (c["out_channels"] in (c["in_channels"], 2 * c["in_channels"]),
         f"out_channels = {c['out_channels']} is neither in_channels = {c['in_channels']} nor "
         "twice it (a learned variance)"),
    ], where)
    return c


def check_scheduler_config(config, where="scheduler_config.json"):
    """A diffusers DDPMScheduler config, with DDPMScheduler's defaults filled in, when ddpm.py
    expresses it; else ConvertError naming the field, its value and what is allowed."""
    c = _check_fields(config, SCHEDULER_DEFAULTS, SCHEDULER_FIELDS, where)
    T, betas = c["num_train_timesteps"], c["trained_betas"]
    _check_consistent([
        (c["beta_start"] <= c["beta_end"],
         f"beta_start = {_shown(c['beta_start'])} exceeds beta_end = {_shown(c['beta_end'])}; "
         "the β schedule rises from beta_start to beta_end"),
        (betas is None or len(betas) == T,
         f"trained_betas has {0 if betas is None else len(betas)} entries for "
         f"num_train_timesteps = {T}; it needs one per timestep"),
    ], where)
    return c


# ---- the network config ---------------------------------------------------------------------

def unet_kwargs_from_diffusers(config, where="config.json"):
    """unet.UNet kwargs for a diffusers UNet2DModel config (check_unet_config first: ConvertError
    naming the first field unet.py cannot express)."""
    c = check_unet_config(config, where)
    widths, size = list(c["block_out_channels"]), c["sample_size"]
    size = size if _is_int(size) else size[0]
    base = widths[0]
    return {"in_channels": c["in_channels"], "out_channels": c["out_channels"],
            "base_channels": base, "channel_mult": tuple(w // base for w in widths),
            "num_res_blocks": c["layers_per_block"],
            "attn_resolutions": tuple(size // 2 ** i for i, t in enumerate(c["down_block_types"])
                                      if t == "AttnDownBlock2D"),
            "dropout": float(c["dropout"]), "image_size": size,
            "norm_groups": c["norm_num_groups"], "norm_eps": float(c["norm_eps"]),
            "downsample_padding": "tf_same" if c["downsample_padding"] == 0 else "symmetric",
            **({"num_classes": c["num_class_embeds"] - 1} if c["num_class_embeds"] else {})}


def diffusers_unet_config(kwargs, where="the checkpoint"):
    """The diffusers UNet2DModel config of unet.UNet kwargs; ConvertError when the network uses
    per-layer GroupNorm group counts, which diffusers' single norm_num_groups cannot express, a
    first level wider than its input conv (channel_mult[0] != 1), a space-to-depth stem or
    self-conditioning."""
    full = {**unet_defaults(), **kwargs}
    base, mult, size = full["base_channels"], full["channel_mult"], full["image_size"]
    widths = [base * m for m in mult]
    if full["space_to_depth"] != 1:
        raise ConvertError(f"{where} has a space-to-depth stem (space_to_depth = "
                           f"{full['space_to_depth']}), which diffusers' UNet2DModel cannot "
                           "express; networks without one export (docs/interop.md lists them)")
    if full["self_cond"]:
        raise ConvertError(f"{where} is self-conditioned (self_cond = True: x̂_0 is a second "
                           "input), which diffusers' UNet2DModel cannot express; networks "
                           "trained without --self-cond export")
    if mult[0] != 1:
        raise ConvertError(f"{where} has channel_mult[0] = {mult[0]}: its input conv and timestep "
                           f"embedding are {base} channels wide and its first level {widths[0]}, "
                           "but diffusers' UNet2DModel makes all three block_out_channels[0] "
                           "wide; networks with channel_mult[0] = 1 export")
    groups = full["norm_groups"]
    if not groups:  # per layer (None: an older checkpoint; 0: --norm-groups 0), if they agree
        counts = sorted({m.num_groups for m in unet.UNet(**kwargs).modules()
                         if isinstance(m, torch.nn.GroupNorm)})
        if len(counts) != 1:
            raise ConvertError(f"{where} was trained with GroupNorm group counts that differ from "
                               f"layer to layer ({', '.join(map(str, counts))}), which diffusers' "
                               "single norm_num_groups cannot express; networks trained with the "
                               "current presets (one count each) export")
        groups = counts[0]
    attn = [size // 2 ** i in full["attn_resolutions"] for i in range(len(mult))]
    return {"_class_name": "UNet2DModel", "sample_size": size,
            "in_channels": full["in_channels"],
            "out_channels": full["out_channels"] or full["in_channels"],
            "center_input_sample": False, "time_embedding_type": "positional",
            "flip_sin_to_cos": False, "freq_shift": 1,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "block_out_channels": widths, "layers_per_block": full["num_res_blocks"],
            "mid_block_scale_factor": 1, "downsample_padding":
                0 if full["downsample_padding"] == "tf_same" else 1,
            "downsample_type": "conv", "upsample_type": "conv", "dropout": full["dropout"],
            "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": groups,
            "attn_norm_num_groups": None, "norm_eps": full["norm_eps"],
            "resnet_time_scale_shift": "default", "add_attention": True,
            "class_embed_type": None,
            "num_class_embeds": full["num_classes"] + 1 if full["num_classes"] else None}


# A class-conditional model's class names, in label order, in its UNet2DModel config.json. The
# leading "_" keeps diffusers quiet: it passes such keys through from_pretrained and
# save_pretrained untouched, as it does _class_name, without a warning about unexpected ones.
CLASS_NAMES = "_class_names"


def class_names_to_diffusers(config):
    """{CLASS_NAMES: names} for a checkpoint config whose network has classes and names them;
    {} otherwise."""
    names = config.get("class_names")
    return {CLASS_NAMES: list(names)} if config["net"].get("num_classes") and names else {}


def class_names_from_diffusers(unet_config, kwargs, where="config.json"):
    """The class names a UNet2DModel config carries (CLASS_NAMES), or None; ConvertError unless
    they are distinct strings, one per class of the network."""
    names = unet_config.get(CLASS_NAMES)
    if names is None:
        return None
    count = kwargs.get("num_classes")
    if not (count and isinstance(names, list) and len(names) == count
            and all(isinstance(n, str) for n in names) and len(set(names)) == count):
        raise ConvertError(f"{where}: {CLASS_NAMES} = {_shown(names)}; it must be a list of "
                           f"{count or 'no'} distinct names, one per class of num_class_embeds - 1")
    return names


def unet_defaults():
    """unet.UNet's keyword defaults: what a config that leaves a field out builds."""
    return {k: p.default for k, p in inspect.signature(unet.UNet).parameters.items()}


# ---- the weights ----------------------------------------------------------------------------

# Module paths, ours -> diffusers' (the ResBlock and AttnBlock insides are renamed below).
_PATHS = [(r"^emb\.0\.", "time_embedding.linear_1."), (r"^emb\.2\.", "time_embedding.linear_2."),
          (r"^(down|up)\.(\d+)\.blocks\.(\d+)\.", r"\1_blocks.\2.resnets.\3."),
          (r"^(down|up)\.(\d+)\.attns\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
          (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
          (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
          (r"^mid1\.", "mid_block.resnets.0."), (r"^mid2\.", "mid_block.resnets.1."),
          (r"^mid_attn\.", "mid_block.attentions.0."), (r"^norm_out\.", "conv_norm_out."),
          (r"^class_emb\.", "class_embedding.")]
_RESNET = {"emb_proj": "time_emb_proj", "shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "proj": "to_out.0"}
# diffusers before 0.15 (and the google/ddpm-* weights on the Hub) named the attention layers so.
_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_name(ours):
    """(diffusers parameter name, or for qkv its prefix) of one of our parameter names."""
    name = ours
    for pattern, replacement in _PATHS:
        name = re.sub(pattern, replacement, name)
    head, layer, kind = name.rsplit(".", 2) if name.count(".") >= 2 else ("", *name.split("."))
    table = _RESNET if ".resnets." in name else _ATTENTION if ".attentions." in name else {}
    return ".".join(p for p in (head, table.get(layer, layer), kind) if p)


def weights_to_diffusers(state):
    """Our state dict -> diffusers UNet2DModel's (attention's 1x1 convs become Linear layers and
    qkv splits into to_q, to_k, to_v)."""
    out = {}
    for name, tensor in state.items():
        target = _diffusers_name(name)
        layer, kind = name.rsplit(".", 2)[-2:]
        if ".attentions." in target and layer in ("qkv", "proj") and tensor.dim() == 4:
            tensor = tensor.reshape(tensor.shape[0], -1)  # [out, in, 1, 1] -> [out, in]
        if ".attentions." in target and layer == "qkv":
            prefix = target.rsplit(".", 2)[0]
            for part, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                out[f"{prefix}.{part}.{kind}"] = chunk.contiguous()
        else:
            out[target] = tensor.contiguous()
    return out


def weights_from_diffusers(theirs, model, where):
    """diffusers' state dict -> ours for `model` (only its parameter names and shapes are read: it
    may live on the meta device). Strict: every tensor there with exactly the shape diffusers
    gives that layer, floating point and finite, none left over; the only reshape is attention's
    Linear [out, in] -> our 1x1 conv [out, in, 1, 1], to_q, to_k and to_v stacked into qkv."""
    theirs = _current_names(theirs, where)
    ours, used = {}, set()
    for name, like in model.state_dict().items():
        tensors = []
        for key, shape in _diffusers_parts(name, tuple(like.shape)):
            if key not in theirs:
                raise ConvertError(f"{where} lacks {key} (for {name}); it is not the network "
                                   "its config.json describes")
            tensors.append(_checked_tensor(*theirs[key], shape, like.dtype, where))
            used.add(key)
        ours[name] = torch.cat(tensors).reshape(like.shape)
    extra = sorted(theirs[k][0] for k in set(theirs) - used)
    if extra:
        raise ConvertError(f"{where} holds weights unet.py has no place for ({', '.join(extra[:3])}"
                           f"{', ...' if len(extra) > 3 else ''})")
    return ours


def _diffusers_parts(name, shape):
    """[(diffusers name, the shape diffusers gives it)] that make up our parameter `name` of
    `shape`: one, or three (to_q, to_k, to_v) for attention's qkv."""
    target = _diffusers_name(name)
    layer = name.rsplit(".", 2)[-2]
    if ".attentions." not in target or layer not in ("qkv", "proj"):
        return [(target, shape)]
    linear = shape[:2]  # a weight [out, in, 1, 1] -> [out, in]; a bias [out] stays
    if layer == "proj":
        return [(target, linear)]
    prefix, kind = target.rsplit(".", 2)[0], target.rsplit(".", 1)[1]
    return [(f"{prefix}.{part}.{kind}", (linear[0] // 3, *linear[1:]))
            for part in ("to_q", "to_k", "to_v")]


def _checked_tensor(key, tensor, shape, dtype, where):
    """The tensor in `dtype`; ConvertError naming it unless it is a dense floating-point tensor
    of exactly `shape` whose values are finite, in its dtype and in `dtype`."""
    if not isinstance(tensor, torch.Tensor):
        raise ConvertError(f"{where}: {key} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or not tensor.is_floating_point():
        kind = f"{tensor.dtype} tensor" + ("" if tensor.layout == torch.strided
                                           else f" ({tensor.layout})")
        raise ConvertError(f"{where}: {key} is a {kind}; weights must be dense floating point")
    if tuple(tensor.shape) != shape:
        raise ConvertError(f"{where}: {key} has shape {list(tensor.shape)}, but the network its "
                           f"config.json describes needs {list(shape)}")
    finite = torch.isfinite(tensor)
    if not finite.all():
        bad = tensor[~finite]
        kinds = [k for k, n in (("NaN", bad.isnan().sum()), ("+inf", (bad == math.inf).sum()),
                                ("-inf", (bad == -math.inf).sum())) if n]
        raise ConvertError(f"{where}: {key} holds {int((~finite).sum())} non-finite values "
                           f"({', '.join(kinds)}); the weights are damaged")
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all():
        raise ConvertError(f"{where}: {key} holds values too large for {dtype} (they would be "
                           "inf); the weights are damaged")
    return cast


def _current_names(theirs, where):
    """{current diffusers name: (the name in the file, tensor)}, the old attention names renamed;
    ConvertError for a name that is no string or a tensor given under both names."""
    out = {}
    for key, tensor in theirs.items():
        if not isinstance(key, str):
            raise ConvertError(f"{where} names a weight {_shown(key)}, which is not a string")
        name = _undeprecate(key)
        if name in out:
            raise ConvertError(f"{where} holds {name} twice, as {out[name][0]} and as {key}")
        out[name] = (key, tensor)
    return out


def _undeprecate(name):
    parts = name.split(".")
    if ".attentions." in name and len(parts) >= 2 and parts[-2] in _DEPRECATED:
        return ".".join(parts[:-2] + [_DEPRECATED[parts[-2]], parts[-1]])
    return name


# ---- the scheduler --------------------------------------------------------------------------

def diffusion_config_from_scheduler(config, where="scheduler_config.json"):
    """ddpm.py's settings for a diffusers DDPMScheduler (or DDIMScheduler) config, checked first
    (check_scheduler_config), in the shape of a checkpoint's config: {"schedule", "timesteps",
    "diffusion": GaussianDiffusion's kwargs, "clip_denoised"} and, when the β table is not one of
    ddpm.py's named schedules, "betas" (the table itself)."""
    c = check_scheduler_config(config, where)
    T = c["num_train_timesteps"]
    betas = diffusers_betas(c)
    schedule = next((name for name in ("linear", "cosine")
                     if _same_table(betas, _named_betas(name, T))), "custom")
    out = {"schedule": schedule, "timesteps": T,
           "diffusion": {"mean_type": PREDICTION[c["prediction_type"]],
                         "var_type": VARIANCE[c["variance_type"]], "loss_type":
                         "hybrid" if c["variance_type"] == "learned_range" else "simple"},
           "clip_denoised": c["clip_sample"]}
    if schedule == "custom":
        out["betas"] = betas.tolist()
    try:
        configs.build_diffusion(out)
    except ValueError as e:
        raise ConvertError(f"{where}: num_train_timesteps, beta_schedule, beta_start, beta_end "
                           f"and trained_betas give a β table ddpm.py cannot use ({e})") from None
    return out


def diffusers_betas(c):
    """The β table of a checked DDPMScheduler config (check_scheduler_config), computed as
    diffusers computes it (float32 for the linear kinds) and returned in float64."""
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        return np.asarray(c["trained_betas"], dtype=np.float64)
    kind, start, end = c["beta_schedule"], c["beta_start"], c["beta_end"]
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32).double().numpy()
    if kind == "scaled_linear":
        return (torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float32) ** 2).double().numpy()
    return _named_betas("cosine", T)  # squaredcos_cap_v2


def _named_betas(name, T):
    try:
        return ddpm.make_beta_schedule(name, T).numpy()
    except ValueError:
        return None


def _same_table(a, b):
    """Equal up to float32 rounding (diffusers computes the linear table in float32)."""
    return b is not None and a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-9)


def scheduler_from_diffusion_config(config):
    """The DDPMScheduler config of a checkpoint's diffusion settings."""
    T = config["timesteps"]
    out = {"_class_name": "DDPMScheduler", "num_train_timesteps": T, "trained_betas": None,
           "variance_type": config["diffusion"]["var_type"],
           "clip_sample": config.get("clip_denoised", True),
           "clip_sample_range": 1.0,
           "prediction_type": {v: k for k, v in PREDICTION.items()}[
               config["diffusion"]["mean_type"]]}
    if config["schedule"] == "linear":
        scale = 1000.0 / T
        out.update(beta_schedule="linear", beta_start=scale * ddpm.LINEAR_BETAS[0],
                   beta_end=scale * ddpm.LINEAR_BETAS[1])
    elif config["schedule"] == "cosine":
        out.update(beta_schedule="squaredcos_cap_v2")
    else:
        out.update(beta_schedule="linear", trained_betas=list(map(float, config["betas"])))
    return out


# ---- folders --------------------------------------------------------------------------------

def read_json(path):
    """The JSON object in the UTF-8 file at `path`; ConvertError (one line) for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as e:
        raise ConvertError(f"cannot read {path}: it is not UTF-8 text (byte {e.start}); is it a "
                           "diffusers folder?") from None
    except (OSError, ValueError, RecursionError) as e:
        reason = cli.first_line(e)
        raise ConvertError(f"cannot read {path} ({reason}); is it a diffusers folder?") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path} holds a JSON {type(value).__name__}, not the JSON object "
                           "(the {...} of fields) a diffusers config is")
    return value


def read_weights(folder):
    """(path, state dict) of the weights in a diffusers model folder, read without executing
    anything."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ConvertError(f"{path} is a safetensors file: {SAFETENSORS_HINT}") from None
            try:
                return path, load_file(path)
            except Exception as e:  # a damaged or foreign file
                raise ConvertError(f"cannot read {path} ({cli.first_line(e)})") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"cannot read {path} ({cli.first_line(e)}); "
                               "only plain tensors are read") from None
        if not isinstance(state, dict):
            raise ConvertError(f"{path} does not hold a state dict")
        return path, state
    raise ConvertError(f"{folder} has neither {' nor '.join(WEIGHT_FILES)}")


def read_folder(folder):
    """(UNet2DModel config, its path, the folder of its weights, scheduler config or {} for
    DDPMScheduler's defaults, its path) of a pipeline folder (model_index.json) or a model folder
    (config.json)."""
    if not os.path.isdir(folder):
        raise ConvertError(f"--from-diffusers {folder} is not a directory")
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        components = _components(read_json(index_path), index_path)
        unet_dir = os.path.join(folder, "unet")
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        scheduler = read_json(sched_path) if "scheduler" in components else {}
    elif os.path.isfile(os.path.join(folder, "config.json")):
        unet_dir, sched_path, scheduler = folder, "DDPMScheduler's defaults", {}
    else:
        raise ConvertError(f"{folder} has neither model_index.json (a pipeline) nor config.json "
                           "(a UNet2DModel folder)")
    unet_path = os.path.join(unet_dir, "config.json")
    unet_config = read_json(unet_path)
    for path, config, classes in ((unet_path, unet_config, ("UNet2DModel",)),
                                  (sched_path, scheduler, SCHEDULER_CLASSES)):
        name = config.get("_class_name", classes[0])
        if not any(_same(name, c) for c in classes):
            raise ConvertError(f"{path}: _class_name = {_shown(name)}; this converter reads "
                               f"{' and '.join(classes)}")
    return unet_config, unet_path, unet_dir, scheduler, sched_path


def _components(index, path):
    """The names of the components a model_index.json lists (a [library, class] pair each, or
    [null, null] for none); ConvertError unless they are a unet and at most a scheduler."""
    components = set()
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2
                and all(v is None or isinstance(v, str) for v in value)):
            raise ConvertError(f"{path}: {name} = {_shown(value)}; a component is a pair "
                               '["library", "class"]')
        if value[1] is not None:
            components.add(name)
    other = sorted(components - {"unet", "scheduler"})
    if "unet" not in components or other:
        raise ConvertError(f"{path} lists {', '.join(sorted(components)) or 'no component'}; a "
                           "DDPM pipeline has a unet and a scheduler only (this may be a latent "
                           "or conditional one, which unet.py's pixel-space model is not)")
    return components


def import_diffusers(folder, out, progress=print):
    """Write our checkpoint at `out` for the diffusers folder; returns its config. Both configs
    are checked, then against each other, then every tensor, before anything is written."""
    unet_config, unet_path, unet_dir, scheduler, sched_path = read_folder(folder)
    kwargs = unet_kwargs_from_diffusers(unet_config, unet_path)
    diffusion = diffusion_config_from_scheduler(scheduler, sched_path)
    _check_variance_output(kwargs, diffusion["diffusion"]["var_type"], unet_path, sched_path)
    with torch.device("meta"):  # the parameters' names and shapes, nothing allocated
        model = unet.UNet(**kwargs)
    weights_path, theirs = read_weights(unet_dir)
    weights = weights_from_diffusers(theirs, model, weights_path)
    config = {**diffusion, "net": kwargs, "train": {"dataset": None},
              "imported_from": os.path.abspath(folder),
              "class_names": class_names_from_diffusers(unet_config, kwargs, unet_path)}
    checkpoint.save(out, {"step": None, "config": config, "model": weights, "ema": weights})
    if not scheduler:
        progress(f"{folder} has no scheduler: used DDPMScheduler's defaults (linear betas 1e-4 "
                 "to 0.02, T = 1000, epsilon, fixed_small, clipping)")
    return config


def _check_variance_output(kwargs, var_type, unet_path, sched_path):
    """A network with a variance output (out_channels = 2 x in_channels) goes with variance_type
    learned_range, and only it: DDPMScheduler reads the second half of the output then alone."""
    out, doubled = kwargs["out_channels"], 2 * kwargs["in_channels"]
    if var_type == "learned_range" and out != doubled:
        raise ConvertError(f"{sched_path}: variance_type = \"learned_range\", but the network of "
                           f"{unet_path} has no variance output (out_channels = {out}, not "
                           f"2 x in_channels = {doubled})")
    if var_type != "learned_range" and out == doubled:
        raise ConvertError(f"{unet_path}: out_channels = {out} = 2 x in_channels, a variance "
                           f"output, but {sched_path} has a fixed variance_type, which ignores "
                           "it; only learned_range reads it")


def check_export_out(out):
    """An existing --out of an export must be a folder an export wrote (model_index.json in it),
    which the export replaces; a file, or any other folder, is refused (never deleted)."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ConvertError(f"--out {out} is a file; the export writes a folder")
    if not os.path.isfile(os.path.join(out, "model_index.json")):
        raise ConvertError(f"--out {out} is a folder but not a diffusers pipeline (no "
                           "model_index.json); --overwrite replaces only an earlier export, so "
                           "choose another path")


def export_diffusers(path, out, use_ema=True, progress=print):
    """Write a DDPMPipeline folder at `out` for the checkpoint at `path`: built in a temporary
    folder beside it and renamed into place, so `out` is whole or untouched (an existing `out`,
    an earlier export, is replaced only once the new folder is complete). The checkpoint is
    rebuilt as sampling rebuilds it (its weights strictly those of its config), its weights must
    be finite, and what is written must import again (_check_reads_back)."""
    check_export_out(out)
    model = checkpoint.load_model(path, torch.device("cpu"), "fp32", use_ema=use_ema)
    state = model.module.state_dict()
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ConvertError(f"{path}: the {'EMA' if use_ema else 'raw (--no-ema)'} weight {bad[0]} "
                           f"holds non-finite values (NaN or inf), as do {len(bad) - 1} more; "
                           "the run diverged: export an earlier checkpoint")
    unet_config = {**diffusers_unet_config(model.config["net"], path),
                   **class_names_to_diffusers(model.config)}
    scheduler = scheduler_from_diffusion_config(model.config)
    weights = weights_to_diffusers(state)
    _check_reads_back(unet_config, scheduler, weights, path)
    parent = os.path.dirname(os.path.abspath(out))
    with files.writing(out):
        os.makedirs(parent, exist_ok=True)
        temp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
        try:
            _write_pipeline(temp, unet_config, scheduler, weights, progress)
            if os.path.isdir(out):  # --overwrite: swap the complete new folder in, drop the old
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=parent)
                os.replace(out, os.path.join(old, "previous"))
                os.replace(temp, out)
                shutil.rmtree(old)
            else:
                os.replace(temp, out)
        finally:
            if os.path.isdir(temp):
                shutil.rmtree(temp)
    return unet_config, scheduler


def _check_reads_back(unet_config, scheduler, weights, path):
    """What an export writes imports again: both configs pass their checks, agree, and the
    weights fit the network the config describes; else ConvertError (a network diffusers does not
    express), before anything is written."""
    where = f"{path} exported"
    kwargs = unet_kwargs_from_diffusers(unet_config, f"{where} as a UNet2DModel config")
    diffusion = diffusion_config_from_scheduler(scheduler, f"{where} as a DDPMScheduler config")
    _check_variance_output(kwargs, diffusion["diffusion"]["var_type"],
                           f"{where} as a UNet2DModel config", f"{where} as a DDPMScheduler config")
    with torch.device("meta"):
        model = unet.UNet(**kwargs)
    weights_from_diffusers(weights, model, f"{where} as diffusers weights")


def _write_pipeline(folder, unet_config, scheduler, weights, progress):
    """model_index.json, unet/ (config and weights) and scheduler/ of a DDPMPipeline in `folder`."""
    version = {"_diffusers_version": "0.42.1"}
    _write_json(os.path.join(folder, "model_index.json"), {
        "_class_name": "DDPMPipeline", **version, "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]})
    os.makedirs(os.path.join(folder, "unet"))
    os.makedirs(os.path.join(folder, "scheduler"))
    _write_json(os.path.join(folder, "unet", "config.json"), {**unet_config, **version})
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), {**scheduler, **version})
    try:
        from safetensors.torch import save_file
        save_file(weights, os.path.join(folder, "unet", WEIGHT_FILES[0]), {"format": "pt"})
    except ImportError:
        torch.save(weights, os.path.join(folder, "unet", WEIGHT_FILES[1]))
        progress(f"safetensors is not installed: wrote unet/{WEIGHT_FILES[1]} instead "
                 f"({SAFETENSORS_HINT} for the safetensors file)")


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
