"""Checkpoints: one dict, written in one place and read in one place, and the model rebuilt from it.

A training checkpoint holds {"format_version", "step", "config", "model", "ema", "optimizer",
"scaler", "rng", "elapsed" (the run's seconds so far), "train_images" (how many images it trained
on), "sizing" (true while a --minutes run's count is not fixed)}; "config" is a plain dict (the
training Config plus the resolved UNet kwargs under "unet"), enough to rebuild the network and
the diffusion with no flags. Writing goes through a temporary file in the same directory and
os.replace, so an interrupted write never damages the previous checkpoint. Reading uses
torch.load(weights_only=True): a checkpoint from elsewhere cannot execute code.
"""
import os
from typing import NamedTuple

import torch

import cli
import ddpm
import files
import hardware
import rundir
import unet

FORMAT_VERSION = 1
RUN_KEYS = ("step", "config", "model", "ema")  # what sampling and evaluation need of a run
CONFIG_KEYS = ("unet", "schedule", "timesteps", "mean_type", "var_type", "loss_type")


class CheckpointError(cli.UserError):
    """A checkpoint that cannot be used; the message is one line saying what to do."""


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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason[:160]}); "
                              "pass a ckpt.pt written by train.py") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (no format_version)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']!r}, this code "
                              f"reads format {FORMAT_VERSION}; use the version of this code that "
                              "wrote it")
    missing = [k for k in required if k not in state]
    if "config" in required and not missing:
        config = state["config"]
        missing = [f"config.{k}" for k in CONFIG_KEYS
                   if not isinstance(config, dict) or k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is damaged or not a "
                              "checkpoint of a training run")
    return state


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

def build_diffusion(config):
    """The GaussianDiffusion a config describes ({"schedule", "timesteps", "mean_type",
    "var_type", "loss_type", ...}; schedule "custom" with the table under "betas", as imported
    models have it); ValueError for a combination ddpm.py refuses."""
    if config["schedule"] == "custom":
        betas = torch.tensor(config["betas"], dtype=torch.float64)
        if betas.shape != (config["timesteps"],):
            raise ValueError(f"{len(betas)} betas for T = {config['timesteps']}")
    else:
        betas = ddpm.make_beta_schedule(config["schedule"], config["timesteps"])
    weighting = {k: config[k] for k in ("snr_gamma", "p2_k", "p2_gamma") if config.get(k) is not None}
    return ddpm.GaussianDiffusion(betas, config["mean_type"], config["var_type"],
                                  config["loss_type"], config.get("loss_weighting", "none"),
                                  timestep_sampling=config.get("t_sampling") or "uniform",
                                  **weighting)


class Model(NamedTuple):
    """A network ready to sample from: `network(x, t)` runs in `precision` and `layout` and
    returns float32; `module` is the nn.Module itself."""

    network: callable
    module: torch.nn.Module
    diffusion: ddpm.GaussianDiffusion
    config: dict
    step: int
    precision: str


def load_model(path, device, precision="auto", use_ema=True, compile=False):
    """The network (EMA weights unless use_ema=False) and diffusion of a checkpoint, rebuilt from
    its config alone, in the memory layout and precision hardware.py picks for `device`.
    compile=True runs the network through torch.compile (on CUDA with CUDA graphs)."""
    state = load(path, map_location=device)
    config = state["config"]
    try:
        diffusion = build_diffusion(config)
        module = unet.UNet(**config["unet"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} has a config this code cannot build ({e})") from None
    channels_last = hardware.channels_last_default(device)
    module = module.to(device, memory_format=hardware.memory_format(channels_last))
    load_weights(module, state["ema" if use_ema else "model"], path)
    module.eval().requires_grad_(False)
    precision = hardware.resolve_precision(precision, device)
    compiled = torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None) \
        if compile else module
    network = hardware.as_called(compiled, precision, device, channels_last)
    return Model(network, module, diffusion, config, state["step"], precision)
