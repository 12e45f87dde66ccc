"""diffusers' DDPM folders and this project's checkpoints, mapped both ways: the network config
(UNet2DModel <-> unet.UNet), the weights (renamed; attention's Linear layers <-> 1x1 convs), the
scheduler (DDPMScheduler <-> ddpm.py's β table, T, prediction, variance and clipping), and the
folders themselves. convert.py is its command line; bench.py builds its diffusers peer with
diffusers_unet_config. Weights are read with the safetensors package (imported only where a
safetensors file is read or written) or torch.load(weights_only=True): nothing read executes code.
"""
import inspect
import json
import os
import re
import shutil
import tempfile

import numpy as np
import torch

import checkpoint
import cli
import ddpm
import files
import unet

SAFETENSORS_HINT = "pip install safetensors"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
            "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
            "learned_range": "learned_range"}
# What unet.py computes, in diffusers' UNet2DModel terms: the fields that must have these values.
FIXED_UNET_FIELDS = {"center_input_sample": False, "time_embedding_type": "positional",
                     "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_type": "UNetMidBlock2D",
                     "mid_block_scale_factor": 1, "downsample_type": "conv",
                     "upsample_type": "conv", "act_fn": "silu", "resnet_time_scale_shift": "default",
                     "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
                     "time_embedding_dim": None, "attn_norm_num_groups": None}
# diffusers' DDPMScheduler defaults, for the fields a config leaves out.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                      "beta_schedule": "linear", "trained_betas": None,
                      "variance_type": "fixed_small", "clip_sample": True,
                      "prediction_type": "epsilon", "thresholding": False,
                      "clip_sample_range": 1.0, "rescale_betas_zero_snr": False}


class ConvertError(cli.UserError):
    """A folder or checkpoint that cannot be converted; the message names the field."""


# ---- the network config ---------------------------------------------------------------------

def unet_kwargs_from_diffusers(config, where="config.json"):
    """unet.UNet kwargs for a diffusers UNet2DModel config; ConvertError naming the first field
    unet.py cannot express."""
    for field, value in FIXED_UNET_FIELDS.items():
        if field in config and config[field] != value:
            raise ConvertError(f"{where}: {field} = {config[field]!r}, which unet.py cannot "
                               f"express (it computes {field} = {value!r})")
    down, up = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    widths = list(config.get("block_out_channels", ()))
    for field, types, allowed in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                  ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        other = [t for t in types if t not in allowed]
        if other:
            raise ConvertError(f"{where}: {field} has {other[0]}, which unet.py cannot express "
                               f"(it has {' and '.join(allowed)})")
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise ConvertError(f"{where}: block_out_channels, down_block_types and up_block_types "
                           "must have one entry per level")
    attn_down = [t.startswith("Attn") for t in down]
    if attn_down != [t.startswith("Attn") for t in reversed(up)]:
        raise ConvertError(f"{where}: up_block_types put attention at other levels than "
                           "down_block_types; unet.py has it at the same resolutions both ways")
    base = widths[0]
    if any(w % base for w in widths):
        raise ConvertError(f"{where}: block_out_channels {widths} are not multiples of the first, "
                           "which unet.py's channel_mult needs")
    size = config.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int):
        raise ConvertError(f"{where}: sample_size {config.get('sample_size')!r}: unet.py takes "
                           "square images of one size")
    heads = config.get("attention_head_dim", 8)
    for level, width in enumerate(widths):
        if (attn_down[level] or level == len(widths) - 1) and heads is not None and heads != width:
            raise ConvertError(f"{where}: attention_head_dim = {heads} gives {width // heads} "
                               f"attention heads at {width} channels; unet.py's attention has one "
                               "head (attention_head_dim null)")
    padding = config.get("downsample_padding", 1)
    if padding not in (0, 1):
        raise ConvertError(f"{where}: downsample_padding = {padding}; unet.py has 0 (TF SAME) "
                           "and 1")
    in_channels = config.get("in_channels", 3)
    out_channels = config.get("out_channels", 3)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConvertError(f"{where}: out_channels {out_channels} is neither in_channels "
                           f"{in_channels} nor twice it (a learned variance)")
    return {"in_channels": in_channels, "out_channels": out_channels, "base_channels": base,
            "channel_mult": tuple(w // base for w in widths),
            "num_res_blocks": config.get("layers_per_block", 2),
            "attn_resolutions": tuple(size // 2 ** i for i, a in enumerate(attn_down) if a),
            "dropout": float(config.get("dropout", 0.0)), "image_size": size,
            "norm_groups": config.get("norm_num_groups", 32),
            "norm_eps": float(config.get("norm_eps", 1e-5)),
            "downsample_padding": "tf_same" if padding == 0 else "symmetric"}


def diffusers_unet_config(kwargs, where="the checkpoint"):
    """The diffusers UNet2DModel config of unet.UNet kwargs; ConvertError when the network uses
    per-layer GroupNorm group counts, which diffusers' single norm_num_groups cannot express."""
    full = {**unet_defaults(), **kwargs}
    base, mult, size = full["base_channels"], full["channel_mult"], full["image_size"]
    widths = [base * m for m in mult]
    groups = full["norm_groups"]
    if groups is None:  # an older checkpoint: the per-layer counts, if they happen to agree
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
            "class_embed_type": None, "num_class_embeds": None}


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
          (r"^mid_attn\.", "mid_block.attentions.0."), (r"^norm_out\.", "conv_norm_out.")]
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
    """diffusers' state dict -> ours for `model` (strict: every parameter found, none left over)."""
    theirs = {_undeprecate(k): v for k, v in theirs.items()}
    ours, used = {}, set()
    for name, like in model.state_dict().items():
        target = _diffusers_name(name)
        if ".attentions." in target and name.rsplit(".", 2)[-2] == "qkv":
            prefix, kind = target.rsplit(".", 2)[0], target.rsplit(".", 1)[1]
            keys = [f"{prefix}.{part}.{kind}" for part in ("to_q", "to_k", "to_v")]
        else:
            keys = [target]
        missing = [k for k in keys if k not in theirs]
        if missing:
            raise ConvertError(f"{where} lacks {missing[0]} (for {name}); it is not the network "
                               "its config.json describes")
        tensor = torch.cat([theirs[k] for k in keys]) if len(keys) > 1 else theirs[keys[0]]
        if tensor.numel() != like.numel():
            raise ConvertError(f"{where}: {keys[0]} has shape {tuple(tensor.shape)}, the network "
                               f"needs {tuple(like.shape)}")
        ours[name] = tensor.reshape(like.shape).to(like.dtype)
        used.update(keys)
    extra = sorted(set(theirs) - used)
    if extra:
        raise ConvertError(f"{where} holds weights unet.py has no place for ({', '.join(extra[:3])}"
                           f"{', ...' if len(extra) > 3 else ''})")
    return ours


def _undeprecate(name):
    parts = name.split(".")
    if ".attentions." in name and len(parts) >= 2 and parts[-2] in _DEPRECATED:
        return ".".join(parts[:-2] + [_DEPRECATED[parts[-2]], parts[-1]])
    return name


# ---- the scheduler --------------------------------------------------------------------------

def diffusion_config_from_scheduler(config, where="scheduler_config.json"):
    """ddpm.py's settings for a diffusers DDPMScheduler (or DDIMScheduler) config: {"schedule",
    "timesteps", "mean_type", "var_type", "loss_type", "clip_denoised"} and, when the β table is
    not one of ddpm.py's named schedules, "betas" (the table itself)."""
    c = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, ok in (("thresholding", not c["thresholding"]),
                      ("clip_sample_range", float(c["clip_sample_range"]) == 1.0),
                      ("rescale_betas_zero_snr", not c["rescale_betas_zero_snr"]),
                      ("prediction_type", c["prediction_type"] in PREDICTION),
                      ("variance_type", c["variance_type"] in VARIANCE)):
        if not ok:
            raise ConvertError(f"{where}: {field} = {c[field]!r}, which ddpm.py cannot express")
    T = int(c["num_train_timesteps"])
    betas = diffusers_betas(c)
    schedule = next((name for name in ("linear", "cosine")
                     if _same_table(betas, _named_betas(name, T))), "custom")
    out = {"schedule": schedule, "timesteps": T, "mean_type": PREDICTION[c["prediction_type"]],
           "var_type": VARIANCE[c["variance_type"]],
           "loss_type": "hybrid" if c["variance_type"] == "learned_range" else "simple",
           "clip_denoised": bool(c["clip_sample"])}
    if schedule == "custom":
        out["betas"] = betas.tolist()
    try:
        checkpoint.build_diffusion(out)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    return out


def diffusers_betas(c):
    """The β table a DDPMScheduler config describes, computed as diffusers computes it (float32
    for the linear kinds) and returned in float64."""
    T = int(c["num_train_timesteps"])
    if c.get("trained_betas") is not None:
        return np.asarray(c["trained_betas"], dtype=np.float64)
    kind, start, end = c["beta_schedule"], c["beta_start"], c["beta_end"]
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32).double().numpy()
    if kind == "scaled_linear":
        return (torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float32) ** 2).double().numpy()
    if kind == "squaredcos_cap_v2":
        return _named_betas("cosine", T)
    raise ConvertError(f"beta_schedule = {kind!r}, which this converter does not compute; give "
                       "trained_betas instead")


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
           "variance_type": config["var_type"], "clip_sample": config.get("clip_denoised", True),
           "clip_sample_range": 1.0,
           "prediction_type": {v: k for k, v in PREDICTION.items()}[config["mean_type"]]}
    if config["schedule"] == "linear":
        scale = 1000.0 / T
        out.update(beta_schedule="linear", beta_start=scale * 1e-4, beta_end=scale * 0.02)
    elif config["schedule"] == "cosine":
        out.update(beta_schedule="squaredcos_cap_v2")
    else:
        out.update(beta_schedule="linear", trained_betas=list(map(float, config["betas"])))
    return out


# ---- folders --------------------------------------------------------------------------------

def read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {path} ({e}); is it a diffusers folder?") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path} does not hold a JSON object")
    return value


def read_weights(folder):
    """The state dict in a diffusers model folder, read without executing anything."""
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
                return load_file(path)
            except Exception as e:  # a damaged or foreign file
                raise ConvertError(f"cannot read {path} ({str(e).splitlines()[0][:160]})") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"cannot read {path} ({str(e).strip().splitlines()[0][:160]}); "
                               "only plain tensors are read") from None
        if not isinstance(state, dict):
            raise ConvertError(f"{path} does not hold a state dict")
        return state
    raise ConvertError(f"{folder} has neither {' nor '.join(WEIGHT_FILES)}")


def import_diffusers(folder, out, progress=print):
    """Write our checkpoint at `out` for the diffusers folder; returns its config."""
    if not os.path.isdir(folder):
        raise ConvertError(f"--from-diffusers {folder} is not a directory")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        index = read_json(os.path.join(folder, "model_index.json"))
        unet_dir, sched_dir = os.path.join(folder, "unet"), os.path.join(folder, "scheduler")
        if "unet" not in index:
            raise ConvertError(f"{folder}/model_index.json names no unet; it is not a DDPM "
                               "pipeline (it may be a latent or conditional one)")
        scheduler = read_json(os.path.join(sched_dir, "scheduler_config.json")) \
            if "scheduler" in index else {}
    elif os.path.isfile(os.path.join(folder, "config.json")):
        unet_dir, scheduler = folder, {}
        progress(f"{folder} is a model folder without a scheduler: using DDPMScheduler's "
                 "defaults (linear betas 1e-4 to 0.02, T = 1000, epsilon, fixed_small, clipping)")
    else:
        raise ConvertError(f"{folder} has neither model_index.json (a pipeline) nor config.json "
                           "(a UNet2DModel folder)")
    unet_config = read_json(os.path.join(unet_dir, "config.json"))
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConvertError(f"{unet_dir}/config.json is a {unet_config['_class_name']}; this "
                           "converter reads UNet2DModel")
    kwargs = unet_kwargs_from_diffusers(unet_config, f"{unet_dir}/config.json")
    diffusion = diffusion_config_from_scheduler(scheduler, "the scheduler config")
    if diffusion["var_type"] == "learned_range" and kwargs["out_channels"] != 2 * kwargs["in_channels"]:
        raise ConvertError("the scheduler's variance_type is learned_range but the network has no "
                           "variance output (out_channels = in_channels)")
    model = unet.UNet(**kwargs)
    weights = weights_from_diffusers(read_weights(unet_dir), model, unet_dir)
    config = {**diffusion, "unet": kwargs, "dataset": None, "imported_from": os.path.abspath(folder)}
    checkpoint.save(out, {"step": None, "config": config, "model": weights, "ema": weights})
    return config


def export_diffusers(path, out, use_ema=True, progress=print):
    """Write a DDPMPipeline folder at `out` for the checkpoint at `path`: built in a temporary
    folder beside it and renamed into place, so `out` is whole or untouched (an existing `out`
    is replaced only once the new folder is complete)."""
    state = checkpoint.load(path)
    config = state["config"]
    unet_config = diffusers_unet_config(config["unet"], path)
    scheduler = scheduler_from_diffusion_config(config)
    weights = weights_to_diffusers(state["ema" if use_ema else "model"])
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
