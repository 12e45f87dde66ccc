"""Checkpoints written by older versions of this code come in through checkpoint.py's one door
(upgrade) and sample exactly as the code of 2a0f094 did with them, and resume exactly as a
checkpoint of today's format holding the same state does.

fixtures/ holds a checkpoint written by the code of 66855ce (format 1, before class conditioning,
flips and t sampling) and one by 2a0f094 (format 1), each 6 steps of a one-level mnist-tiny on 8x8
bars, and what 2a0f094's sample.py and train.py --resume made of each (expected_<name>.npz). They
were made by the old code itself, so they need no history to check:

    git worktree add /tmp/old668 66855ce && git worktree add /tmp/old2a0 2a0f094
    python test_old_checkpoints.py /tmp/old668 /tmp/old2a0      # rewrites fixtures/

The resumed digest in expected_<name>.npz is what 2a0f094 trained from the checkpoint; the code
matched it until each stream of draws got a seed of its own (optim.stream_seed), which changed
every run's draws after step 6. Since then a resume is checked against the same state saved in
today's format: the one door must give the run exactly what a checkpoint of today gives it.
"""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import sample
import train
from test_train import bars

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
NAMES = ("66855ce", "2a0f094")
TRAIN = ["--dataset", "npz:bars.npz", "--preset", "mnist-tiny", "--base-channels", "4",
         "--norm-groups", "2", "--channel-mult", "1", "--attn-resolutions", "8",
         "--timesteps", "100", "--batch-size", "8", "--steps", "6", "--ckpt-every", "100",
         "--sample-every", "1000", "--num-samples", "4", "--log-every", "2", "--out", "run"]
RESUME = ["--resume", "--out", "run", "--steps", "10"]
SAMPLE = ["--n", "4", "--out", "samples.npz"]


def write_bars(path):
    """48 bars (test_train.bars), the data the fixtures were trained on."""
    np.savez(path, images=bars(48))


def digest(path):
    """sha256 of every tensor a training checkpoint restores: model, EMA, optimizer, scaler, RNG."""
    state = torch.load(path, weights_only=True)
    h = hashlib.sha256(str(state["step"]).encode())

    def feed(x):
        if isinstance(x, torch.Tensor):
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                     if x.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())
    for key in ("model", "ema", "optimizer", "scaler", "rng"):
        feed(state[key])
    return h.hexdigest()


def samples(path):
    with np.load(path) as f:
        return f["images"]


@pytest.mark.parametrize("name", NAMES)
def test_an_old_checkpoint_samples_and_resumes_as_2a0f094_did(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_bars("bars.npz")
    os.makedirs("run")
    shutil.copy(os.path.join(FIXTURES, f"ckpt_{name}.pt"), "run/ckpt.pt")
    expected = np.load(os.path.join(FIXTURES, f"expected_{name}.npz"))

    state = checkpoint.load("run/ckpt.pt")  # the one door: today's shape, whatever wrote it
    assert state["format_version"] == checkpoint.FORMAT_VERSION
    assert set(state["config"]) >= {"net", "diffusion", "schedule", "timesteps", "train"}

    sample.main(["--ckpt", "run"] + SAMPLE)
    np.testing.assert_array_equal(samples("samples.npz"), expected["samples"])

    os.makedirs("today")  # the same state, written in today's format
    checkpoint.save("today/ckpt.pt", {k: v for k, v in state.items() if k != "format_version"})
    assert digest("today/ckpt.pt") == digest("run/ckpt.pt")
    train.train(train.parse_args(RESUME), progress=False)
    train.train(train.parse_args(["--resume", "--out", "today", "--steps", "10"]), progress=False)
    assert checkpoint.load("run/ckpt.pt")["step"] == 10
    assert digest("run/ckpt.pt") == digest("today/ckpt.pt")
    assert digest("run/ckpt.pt") != str(expected["resumed_digest"])  # the draws of today's seeds


def make_fixtures(old668, old2a0):
    """Write fixtures/ckpt_<name>.pt with each old version's train.py, and expected_<name>.npz
    with what 2a0f094's sample.py and train.py --resume make of it."""
    import tempfile
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda code, script, args, cwd: subprocess.run(
        [sys.executable, os.path.join(code, script), *args], cwd=cwd, env=env, check=True,
        capture_output=True)
    os.makedirs(FIXTURES, exist_ok=True)
    for name, code in zip(NAMES, (old668, old2a0)):
        with tempfile.TemporaryDirectory() as tmp:
            write_bars(os.path.join(tmp, "bars.npz"))
            run(code, "train.py", TRAIN, tmp)
            shutil.copy(os.path.join(tmp, "run", "ckpt.pt"), os.path.join(FIXTURES, f"ckpt_{name}.pt"))
            run(old2a0, "sample.py", ["--ckpt", "run"] + SAMPLE, tmp)
            first = samples(os.path.join(tmp, "samples.npz"))
            run(old2a0, "train.py", RESUME, tmp)
            run(old2a0, "sample.py", ["--ckpt", "run"] + SAMPLE, tmp)
            np.savez(os.path.join(FIXTURES, f"expected_{name}.npz"), samples=first,
                     resumed_samples=samples(os.path.join(tmp, "samples.npz")),
                     resumed_digest=np.array(digest(os.path.join(tmp, "run", "ckpt.pt"))))


if __name__ == "__main__":
    make_fixtures(*sys.argv[1:3])
