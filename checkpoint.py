"""Checkpoints: one dict, written in one place and read in one place, and the model rebuilt from it.

A training checkpoint holds {"format_version", "step", "config", "model", "ema", "optimizer",
"scaler", "rng", "elapsed" (the run's seconds so far), "train_images" (how many images it trained
on), "sizing" (true while a --minutes run's count is not fixed)} and, with --ema-snapshots,
"phema" (the power-function EMAs: {σ_rel with 3 decimals: the network's state dict}); "config"
is config.Config as a plain dict ({"net", "diffusion", "schedule", "timesteps", "train",
"class_names"}), enough to rebuild the network and the diffusion with no flags. A checkpoint of
an older format comes in through one door, upgrade(), which turns its config into today's shape
on load. Writing goes through a temporary file in the same directory and os.replace, so an
interrupted write never damages the previous checkpoint. Reading uses
torch.load(weights_only=True): a checkpoint from elsewhere cannot execute code.
"""
import dataclasses
import inspect
import math
import os
import sys
from typing import NamedTuple

import numpy as np
import torch

import cli
import config as configs
import ddpm
import files
import hardware
import phema
import rundir
import unet

FORMAT_VERSION = 2  # 1: the flags flat beside the network's kwargs ("unet"); 2: config.Config
RUN_KEYS = ("step", "config", "model", "ema")  # what sampling and evaluation need of a run
TRACKED = "phema"  # --ema-snapshots: the power-function EMAs, {tracked_key(σ_rel): state dict}
CONFIG_KEYS = {1: ("unet", "schedule", "timesteps", "mean_type", "var_type", "loss_type"),
               2: ("net", "diffusion", "schedule", "timesteps")}


class CheckpointError(cli.UserError):
    """A checkpoint that cannot be used; the message is one line saying what to do."""


def tracked_key(sigma_rel):
    """The key of the power-function EMA of length sigma_rel under TRACKED: 3 decimals."""
    return f"{sigma_rel:.3f}"


def save(path, state):
    """Write `state` to `path` atomically (temporary file + rename). A failed write (a full disk)
    raises UserError and leaves the previous file at `path` intact."""
    files.write_file(path, lambda f: torch.save({**state, "format_version": FORMAT_VERSION}, f))


def resolve(path):
    """A checkpoint file from a file path or a run directory (its ckpt.pt)."""
    if os.path.isdir(path):
        path = os.path.join(path, rundir.CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; train one with `python train.py` or pass "
                              "--ckpt with a checkpoint file or run directory")
    return path


def newest(runs_dir="runs"):
    """The most recently written ckpt.pt under `runs_dir`."""
    found = [os.path.join(root, rundir.CHECKPOINT) for root, _, files in os.walk(runs_dir) if rundir.CHECKPOINT in files]
    if not found:
        raise CheckpointError(f"no checkpoint under {runs_dir}/; train one with "
                              "`python train.py --dataset mnist` or pass --ckpt")
    return max(found, key=os.path.getmtime)


def load(path, map_location="cpu", required=RUN_KEYS):
    """Read a checkpoint written by save(); never executes code from the file. Every key in
    `required` must be there (and a run's config must hold what rebuilds the model)."""
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or objects weights_only refuses
        raise CheckpointError(f"{path} is not a readable checkpoint ({cli.first_line(e)}); "
                              "pass a ckpt.pt written by train.py") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (no format_version)")
    version = state["format_version"]
    if version not in CONFIG_KEYS:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, this code reads formats "
                              f"1 to {FORMAT_VERSION}; use the version of this code that wrote it")
    missing = [k for k in required if k not in state]
    if "config" in required and not missing:
        config = state["config"]
        missing = [f"config.{k}" for k in CONFIG_KEYS[version]
                   if not isinstance(config, dict) or k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is damaged or not a "
                              "checkpoint of a training run")
    if "config" in state:
        state = {**state, "config": upgrade(state["config"], version),
                 "format_version": FORMAT_VERSION}
        net = state["config"].get("net")
        unknown = sorted(set(net) - set(inspect.signature(unet.UNet).parameters)) \
            if isinstance(net, dict) else []
        if unknown:
            raise CheckpointError(f"{path}: the checkpoint's network config has "
                                  f"{', '.join(unknown)}, which this version's unet.py does not "
                                  "know; use it with the version of this code that wrote it")
    return state


def upgrade(config, version):
    """The config of a checkpoint of format `version` in today's shape (config.Config as a dict):
    the one place that knows older formats. Format 1 kept the flags flat beside the network's
    kwargs ("unet"); runs saved before a field existed resume as they ran then (Ho et al.'s
    recipe where a recipe field is missing, no flips, unconditional), and networks saved before
    norm_groups and downsample_padding were stored have per-layer groups and symmetric padding."""
    if version == 1:
        old = config
        net = old["unet"]
        if isinstance(net, dict):
            net = {"norm_groups": None, "downsample_padding": "symmetric", **net}
        diffusion = {"mean_type": old["mean_type"], "var_type": old["var_type"],
                     "loss_type": old["loss_type"],
                     "loss_weighting": old.get("loss_weighting") or "none",
                     **{k: old[k] for k in ("snr_gamma", "p2_k", "p2_gamma")
                        if old.get(k) is not None},
                     "timestep_sampling": old.get("t_sampling") or "uniform"}
        fields = {f.name for f in dataclasses.fields(configs.Train)}
        train = {k: v for k, v in old.items() if k in fields}
        for key, value in {**configs.RECIPES["ho"], "hflip": False, "class_cond": False}.items():
            if key in fields and train.get(key) is None and old.get("dataset") is not None:
                train[key] = value
        config = {"net": net, "diffusion": diffusion, "schedule": old["schedule"],
                  "timesteps": old["timesteps"], "train": train,
                  "class_names": old.get("class_names"),
                  **{k: old[k] for k in ("betas", "clip_denoised", "imported_from") if k in old}}
    return config


def load_weights(model, weights, path):
    """model.load_state_dict (strict) with a one-line error when the architecture differs."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3] or first[:1])[:200]
        raise CheckpointError(f"{path} holds weights of another architecture ({detail}); "
                              "use the flags it was trained with or start a new run") from None


# ---- the model from a checkpoint ------------------------------------------------------------

class Model(NamedTuple):
    """A network ready to sample from: `network(x, t)` runs in `precision` and `layout` and
    returns float32; `module` is the nn.Module itself."""

    network: callable
    module: torch.nn.Module
    diffusion: ddpm.GaussianDiffusion
    config: dict
    step: int
    precision: str


def load_model(path, device, precision="auto", use_ema=True, compile=False, ema_length=None):
    """The network (EMA weights unless use_ema=False) and diffusion of a checkpoint, rebuilt from
    its config alone, in the memory layout and precision hardware.py picks for `device`.
    compile=True runs the network through torch.compile (on CUDA with CUDA graphs). ema_length:
    the EMA of that length (σ_rel) reconstructed from the run's snapshots instead
    (reconstructed_ema)."""
    state = load(path, map_location=device)
    config = state["config"]
    try:
        diffusion = configs.build_diffusion(config)
        module = unet.UNet(**config["net"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has a config this code cannot build ({e})") from None
    channels_last = hardware.channels_last_default(device)
    module = module.to(device, memory_format=hardware.memory_format(channels_last))
    weights = state["ema" if use_ema else "model"] if ema_length is None else \
        reconstructed_ema(path, ema_length, state["step"])
    load_weights(module, weights, path)
    module.eval().requires_grad_(False)
    precision = hardware.resolve_precision(precision, device)
    compiled = torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None) \
        if compile else module
    network = hardware.as_called(compiled, precision, device, channels_last)
    return Model(network, module, diffusion, config, state["step"], precision)


# ---- an EMA of any length, reconstructed from a run's snapshots (--ema-length) --------------

def add_ema_length_argument(parser):
    """--ema-length, for the scripts that load a model (sample.py, evaluate.py)."""
    low, high = phema.LENGTH_RANGE
    parser.add_argument(
        "--ema-length", type=float, metavar="SIGMA_REL",
        help="use the EMA of this length instead of the checkpoint's, reconstructed after "
        "training from the run's snapshots (train.py --ema-snapshots N; Karras et al. 2024's "
        "post-hoc EMA): sigma_rel is the spread of the average's weights over the run, relative "
        f"to its length (the checkpoint's EMA: about 0.09 with --ema-warmup 10); {low:g} to "
        f"{high:g}, what the two tracked lengths {' and '.join(map(str, phema.PROFILES))} "
        "reconstruct well from about 20 snapshots each (docs/training.md)")


def check_ema_length(value):
    """UserError unless --ema-length (None: not given) is a length two profiles reconstruct."""
    if value is None:
        return
    low, high = phema.LENGTH_RANGE
    cli.check(math.isfinite(value) and low <= value <= high,
              f"--ema-length must be in [{low:g}, {high:g}], got {value:g}: the run tracks EMAs "
              f"of length {' and '.join(map(str, phema.PROFILES))}, and lengths outside that "
              "range are not reconstructed well from them")


def reconstructed_ema(path, sigma_rel, step):
    """The weights of the EMA of length sigma_rel at the last snapshot at or before `step` (the
    checkpoint's), a weighted sum of the snapshots in the run directory of the checkpoint at
    `path` (phema.reconstruct); the one line that says what they are goes to stderr."""
    directory = os.path.dirname(os.path.abspath(path))
    found = [s for s in rundir.snapshots(directory) if s[1] <= step]
    folder = os.path.join(directory, rundir.SNAPSHOTS)
    if not found:
        raise CheckpointError(f"--ema-length: {folder} holds no EMA snapshots of this run; train "
                              "it with --ema-snapshots N (train.py) to choose the EMA's length "
                              "after training, or drop --ema-length")
    try:
        fit = phema.reconstruct([(s, t) for s, t, _ in found], sigma_rel)
    except np.linalg.LinAlgError:
        fit = None
    if fit is None or not fit.error <= phema.MAX_PROFILE_ERROR:
        raise CheckpointError(
            f"--ema-length {sigma_rel:g}: the {len(found)} snapshots in {folder} reconstruct it "
            f"only {'roughly' if fit is None else f'to a profile error of {fit.error:.1%}'} (at "
            f"most {phema.MAX_PROFILE_ERROR:.0%} is used): give a length nearer "
            f"{' and '.join(map(str, phema.PROFILES))}, or train with snapshots more often")
    used = [(p, x) for (_, _, p), x in zip(found, fit.weights) if x != 0]
    weights = phema.combine((load_snapshot(p) for p, _ in used), [x for _, x in used])
    print(f"the EMA of length {sigma_rel:g} at step {fit.step}, reconstructed from {len(used)} "
          f"snapshots in {folder} (profile error {fit.error:.1%})"
          + (f"; the checkpoint is at step {step}" if fit.step != step else ""), file=sys.stderr)
    return weights


def load_snapshot(path):
    """A snapshot's state dict; never executes code from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or objects weights_only refuses
        raise CheckpointError(f"{path} is not a readable EMA snapshot ({cli.first_line(e)}); "
                              "delete it, or train the run again with --ema-snapshots") from None
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path} is not an EMA snapshot written by train.py (not a dict of "
                              "tensors); delete it")
    return state
