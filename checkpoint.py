"""Checkpoints: one dict, written in one place and read in one place.

A checkpoint holds {"format_version", "step", "config", "model", "ema", "optimizer", "scaler",
"rng"}; "config" is a plain dict (the training Config plus the resolved UNet kwargs under
"unet"), enough to rebuild the model with no flags. Writing goes through a temporary file in the
same directory and os.replace, so an interrupted write never damages the previous checkpoint.
Reading uses torch.load(weights_only=True): a checkpoint from elsewhere cannot execute code.
"""
import os

import torch

import data

FORMAT_VERSION = 1
FILENAME = "ckpt.pt"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line saying what to do."""


def save(path, state):
    """Write `state` to `path` atomically (temporary file + rename)."""
    data.atomic_write(path, lambda f: torch.save({**state, "format_version": FORMAT_VERSION}, f))


def resolve(path):
    """A checkpoint file from a file path or a run directory (its ckpt.pt)."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; train one with `python train.py` or pass "
                              "--ckpt with a checkpoint file or run directory")
    return path


def newest(runs_dir="runs"):
    """The most recently written ckpt.pt under `runs_dir`."""
    found = [os.path.join(root, FILENAME) for root, _, files in os.walk(runs_dir) if FILENAME in files]
    if not found:
        raise CheckpointError(f"no checkpoint under {runs_dir}/; train one with "
                              "`python train.py --dataset mnist` or pass --ckpt")
    return max(found, key=os.path.getmtime)


def load(path, map_location="cpu"):
    """Read a checkpoint written by save(); never executes code from the file."""
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
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}, this code "
                              f"reads format {FORMAT_VERSION}")
    return state


def load_weights(model, weights, path):
    """model.load_state_dict with a one-line error when the architecture differs."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3])[:200]
        raise CheckpointError(f"{path} holds weights of another architecture ({detail}); "
                              "use the flags it was trained with or start a new run") from None
