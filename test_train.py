"""train.py and sample.py end to end on a tiny synthetic dataset (8x8 images, a 2-level UNet,
T = 100), on the CPU: the loss goes down, resume is exact, two Gloo processes train like one,
signals and non-finite losses stop cleanly, sample.py writes what it says, bad input gives one line."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import cli
import config
import data
import imaging
import optim
import sampling
import train
import unet
from test_imaging import read_png

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses share two cores with this one
TINY = {"base_channels": 8, "norm_groups": 4, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,),
        "dropout": 0.0, "timesteps": 100, "batch_size": 16, "lr": 2e-3, "warmup": 10,
        "log_every": 5, "ckpt_every": 10, "sample_every": 1000, "num_samples": 4,
        "precision": "fp32", "device": "cpu", "seed": 0}


def bars(n):
    """n 8x8 uint8 images: a bright bar at a random row or column on a dark background (seed 0)."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 8, 8), np.uint8)
    for k, (horizontal, pos) in enumerate(zip(rng.integers(0, 2, n), rng.integers(0, 8, n))):
        if horizontal:
            images[k, pos, :] = 255
        else:
            images[k, :, pos] = 255
    return images


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """96 bars (see bars) as an npz dataset."""
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(path, images=bars(96))
    return f"npz:{path}"


def run_train(npz, out, **overrides):
    given = {**TINY, "dataset": npz, "out": str(out), **overrides}
    return train.train(given, progress=False)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(script, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE, env=ENV)


def test_loss_goes_down_and_outputs_are_written(npz, tmp_path):
    """A short run lowers the loss, logs every metric it promises, and writes a checkpoint whose
    config rebuilds the model, plus a final sample grid of the right size."""
    run_train(npz, tmp_path, steps=120)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(5, 121, 5))
    assert {"loss", "lr", "grad_norm", "img_per_s", "loss_q0", "loss_q3"} <= set(log[0])
    first, last = np.mean([r["loss"] for r in log[:2]]), np.mean([r["loss"] for r in log[-4:]])
    assert last < 0.6 * first
    state = checkpoint.load(tmp_path)
    assert state["step"] == 120 and state["config"]["net"]["image_size"] == 8
    grid = read_png(tmp_path / "samples_final.png")
    assert grid.shape == imaging.make_grid(np.zeros((4, 1, 8, 8), np.uint8)).shape
    # the grid is DDIM-50 at the default --sample-eta 1 from the EMA weights (not eta 0)
    model = checkpoint.load_model(str(tmp_path / "ckpt.pt"), torch.device("cpu"), "fp32")
    for eta, same in ((1.0, True), (0.0, False)):
        x, _ = sampling.generate(model.network, model.diffusion, (1, 8, 8), 4, 4, "ddim", 50, eta,
                                 seed=0, progress=False)
        drawn = imaging.make_grid(imaging.to_uint8(x).numpy())
        assert np.array_equal(grid.reshape(drawn.shape), drawn) == same


def test_resume_is_exact(npz, tmp_path):
    """N steps straight and N/2 + --resume + N/2 give identical weights, EMA and optimizer state."""
    run_train(npz, tmp_path / "a", steps=20)
    run_train(npz, tmp_path / "b", steps=10)
    run_train(npz, tmp_path / "b", steps=20, resume=True)
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    assert b["step"] == 20


def _ddp_worker(rank, world, port, npz, out, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        _, model, _ = run_train(npz, out, steps=6, batch_size=16)
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_like_one(npz, tmp_path):
    """torchrun-style DDP with 2 Gloo processes on the CPU: each draws a different half of the
    global batch, the ranks' weights stay identical, and they match one process trained with the
    same global batch (up to the order of the gradient all-reduce)."""
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, npz, str(tmp_path / "ddp"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _, single, _ = run_train(npz, tmp_path / "single", steps=6, batch_size=16)
    for name, w in single.state_dict().items():
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], w, rtol=1e-4, atol=1e-5)
    assert os.path.exists(tmp_path / "ddp" / "ckpt.pt")
    assert not any(n.startswith("rank") for n in os.listdir(tmp_path / "ddp"))


@pytest.mark.parametrize("option", [{"channels_last": True}, {"precision": "bf16"},
                                    {"precision": "fp16"}, {"compile": True}])
def test_speed_options_train_the_same_model(npz, tmp_path, option):
    """Each speed option gives the same training, up to its arithmetic: after 4 steps the weights
    are close to the fp32 / contiguous / eager run (exactly equal losses are not expected under
    reduced precision, and compiled kernels may reorder sums), and they moved from where they
    started as far as the reference's did, the same way: the update of 4 steps is smaller than
    the tolerance of the weights themselves, so a path that did not train would pass that alone."""
    _, ref, _ = run_train(npz, tmp_path / "ref", steps=4)
    _, got, _ = run_train(npz, tmp_path / "opt", steps=4, **option)
    _, start, _ = run_train(npz, tmp_path / "start", steps=1, lr=1e-30)  # the initial weights
    tol = {"precision": dict(rtol=0.05, atol=5e-3)}.get(next(iter(option)), dict(rtol=1e-4, atol=1e-5))
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), **tol, msg=name)
    flat = lambda model: torch.cat([p.detach().float().flatten() for p in model.parameters()])
    moved, moved_ref = flat(got) - flat(start), flat(ref) - flat(start)
    assert moved_ref.norm() > 0
    assert (moved - moved_ref).norm() <= 0.25 * moved_ref.norm(), (moved.norm(), moved_ref.norm())
    log = read_log(tmp_path / "opt")
    assert all(np.isfinite(r["loss"]) for r in log)


def test_batches_cover_each_epoch_once():
    """The stateless data order: every image once per epoch, across batch boundaries."""
    b = optim.Batches(10, 4, seed=3, device="cpu")
    seen = torch.cat([b.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(b.indices(3), optim.Batches(10, 4, 3, "cpu").indices(3))


def test_sigterm_writes_a_checkpoint_and_exits_143(npz, tmp_path):
    args = [sys.executable, os.path.join(HERE, "train.py"), "--dataset", npz, "--out", tmp_path,
            "--steps", 100000, "--log-every", 5, "--ckpt-every", 100000, "--device", "cpu",
            "--precision", "fp32", "--base-channels", 8, "--norm-groups", 4, "--channel-mult", 1, 2,
            "--num-res-blocks", 1, "--attn-resolutions", 4, "--timesteps", 100,
            "--batch-size", 8, "--seed", 0]
    proc = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env=ENV)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 90
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err  # stopped, not done: a scheduler can tell
    assert "--resume" in err
    state = checkpoint.load(tmp_path)
    assert state["step"] >= 10


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(npz, tmp_path, monkeypatch):
    run_train(npz, tmp_path, steps=10)  # a good checkpoint at step 10
    calls = {"n": 0}
    real = unet.UNet.forward

    def poisoned(self, x, t):
        calls["n"] += 1
        out = real(self, x, t)
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(unet.UNet, "forward", poisoned)
    with pytest.raises(train.TrainError, match="non-finite loss by step 15.*last good checkpoint"):
        run_train(npz, tmp_path, steps=40, resume=True)
    state = checkpoint.load(tmp_path)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.fixture(scope="module")
def trained(npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_train(npz, out, steps=10)
    return out


def test_sample_writes_png_npz_and_trajectory(trained, tmp_path):
    """sample.py rebuilds the model from the checkpoint alone; PNG grid of the right size, .npz of
    uint8 [N, H, W], the same seed giving the same images, a trajectory strip of K + 1 columns."""
    r = run_script("sample.py", "--ckpt", trained, "--n", 6, "--sampler", "ddim", "--steps", 5,
            "--out", tmp_path / "s.png")
    assert r.returncode == 0, r.stderr
    png = read_png(tmp_path / "s.png")
    assert png.shape == imaging.make_grid(np.zeros((6, 1, 8, 8), np.uint8)).shape
    for name in ("a.npz", "b.npz"):
        assert run_script("sample.py", "--ckpt", trained / "ckpt.pt", "--n", 5, "--sampler", "ddim",
                   "--steps", 5, "--eta", 1, "--batch-size", 2, "--out", tmp_path / name).returncode == 0
    a, b = (np.load(tmp_path / n)["images"] for n in ("a.npz", "b.npz"))
    assert a.shape == (5, 8, 8) and a.dtype == np.uint8 and np.array_equal(a, b)
    r = run_script("sample.py", "--ckpt", trained, "--n", 3, "--trajectory", 4, "--out", tmp_path / "t.png")
    assert r.returncode == 0, r.stderr
    assert read_png(tmp_path / "t.png").shape == imaging.make_grid(
        np.zeros((15, 1, 8, 8), np.uint8), nrow=5).shape


def test_sample_uses_the_newest_run_by_default(trained, tmp_path):
    runs = tmp_path / "runs" / "x"
    runs.mkdir(parents=True)
    (runs / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    r = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--n", "2",
                        "--sampler", "ddim", "--steps", "3"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "samples.png")


def test_checkpoint_loading_never_executes_code(tmp_path):
    """A pickle that would run a command when unpickled is refused by weights_only loading."""
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format_version": 1, "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint intact and no temporary file."""
    checkpoint.save(tmp_path / "ckpt.pt", {"step": 1})

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(cli.UserError, match="cannot write .*ckpt.pt"):
        checkpoint.save(tmp_path / "ckpt.pt", {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path, required=("step",))["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# ---- the recipe's knobs: lr schedules, EMA warmup, runs sized by time, in-training scores ----

def test_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    """Linear warmup to lr over `warmup` steps; then constant, or a half cosine / a line from lr
    at the first step after the warmup to exactly 0 at the last step."""
    cfg = config.Train(lr=1e-3, warmup=10, steps=110)
    for schedule in ("constant", "cosine", "linear"):
        cfg.lr_schedule = schedule
        lrs = [optim.lr_at(cfg, s) for s in range(110)]
        assert lrs[:10] == [1e-3 * (s + 1) / 10 for s in range(10)]
        assert lrs[10] == 1e-3
        assert lrs[-1] == (1e-3 if schedule == "constant" else 0.0)
    cfg.lr_schedule = "cosine"
    assert optim.lr_at(cfg, 60) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 50 / 99)))
    cfg.lr_schedule = "linear"
    assert optim.lr_at(cfg, 60) == pytest.approx(1e-3 * (1 - 50 / 99))


def test_ema_decay_warms_up():
    cfg = config.Train(ema_decay=0.999, ema_warmup=10)
    assert optim.ema_decay_at(cfg, 0) == 0.1
    assert optim.ema_decay_at(cfg, 90) == 91 / 100
    assert optim.ema_decay_at(cfg, 100000) == 0.999


@pytest.mark.parametrize("warmup, schedule", [(10, "cosine"), (30, "cosine"), (10, "wsd")])
def test_a_run_sized_by_time_is_repeated_by_its_steps(npz, tmp_path, capsys, warmup, schedule):
    """--minutes: the step count is measured, printed and stored; --steps with that count gives
    a byte-identical model, and the learning rate decays to 0 at that step. The count is fixed
    from the run's own steps where the decay begins (the probe's estimate is replaced)."""
    start = time.perf_counter()
    cfg, _, _ = train.train({**TINY, "dataset": npz, "out": str(tmp_path / "timed"), "minutes": 0.25,
                             "lr_schedule": schedule, "ckpt_every": 100000, "log_every": 1,
                             "warmup": warmup}, progress=False, started=start)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    steps = cfg.train.steps
    assert f"--steps {steps} repeats this run" in err and steps >= 1
    assert ("the count is fixed when its decay begins, from" in err) == (schedule == "wsd")
    assert (f"when its decay begins (step {warmup + 1})" in err) == (schedule == "cosine")
    assert "each, the run's own steps); --steps" in err
    timed = checkpoint.load(tmp_path / "timed")
    assert timed["config"]["train"]["steps"] == steps and timed["config"]["train"]["minutes"] == 0.25
    assert elapsed < 0.25 * 60 * 2  # sized to the budget (with room for a slow, shared machine)
    run_train(npz, tmp_path / "fixed", steps=steps, lr_schedule=schedule, ckpt_every=100000,
              warmup=warmup)
    fixed = checkpoint.load(tmp_path / "fixed")
    for key in ("model", "ema"):
        assert all(torch.equal(timed[key][k], fixed[key][k]) for k in timed[key])
    assert read_log(tmp_path / "timed")[-1]["lr"] == 0.0


def test_scores_while_training_leave_the_training_alone(tmp_path, monkeypatch):
    """--eval-every writes score records (confident, FD, entropy, precision, recall, their time)
    into log.jsonl, drawn from a generator of their own: the weights are those of a run
    without them."""
    import test_evaluate  # its synthetic labelled 28x28 digits
    sets = {"train": test_evaluate.synthetic_digits(320, 0), "test": test_evaluate.synthetic_digits(100, 1)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", *a, **k: sets[split])
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    given = {**TINY, "dataset": "mnist", "attn_resolutions": (14,), "steps": 4, "timesteps": 50,
             "batch_size": 8, "log_every": 2, "sample_steps": 5}
    train.train({**given, "out": str(tmp_path / "scored"), "eval_every": 2, "eval_samples": 20},
                progress=False)
    train.train({**given, "out": str(tmp_path / "plain")}, progress=False)
    scores = [r for r in read_log(tmp_path / "scored") if r.get("kind") == "eval"]
    assert [r["step"] for r in scores] == [2, 4]
    for r in scores:
        assert {"fd", "confident_fraction", "class_entropy", "precision", "recall",
                "eval_seconds", "time_s"} <= set(r) and r["samples"] == 20
    a, b = checkpoint.load(tmp_path / "scored"), checkpoint.load(tmp_path / "plain")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_plot_reads_the_last_record_of_each_step_and_draws(tmp_path, monkeypatch):
    import plot
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 2, "loss": 1.0, "time_s": 1}, {"step": 4, "loss": 0.5, "time_s": 2},
        {"step": 4, "loss": 0.4, "time_s": 3},        # a resumed run's replay: the last counts
        {"step": 4, "kind": "eval", "fd": 9.0, "confident_fraction": 0.5, "class_entropy": 2.0,
         "time_s": 4}]) + '\n{"step": 6, "lo')
    train_records, scores, skipped = plot.read_log(log)
    assert skipped == 1  # the torn last line
    assert [(r["step"], r["loss"]) for r in train_records] == [(2, 1.0), (4, 0.4)]
    assert [r["fd"] for r in scores] == [9.0]
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_matplotlib)
    with pytest.raises(cli.UserError, match="pip install matplotlib"):
        plot.plot(str(log), str(tmp_path / "log.png"))
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    plot.plot(str(log), str(tmp_path / "log.png"))
    assert (tmp_path / "log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_minutes_count_from_the_start_of_the_process():
    """--minutes counts the imports too: a process that spent a second before importing
    budget.py is at least a second old by budget.process_started(), and not much older."""
    code = ("import time; t = time.perf_counter(); time.sleep(1.0); import budget; "
            "print(time.perf_counter() - budget.process_started(), time.perf_counter() - t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       env=ENV, timeout=60)
    age, since_t = map(float, r.stdout.split())
    assert since_t <= age <= since_t + 5.0, (age, since_t)


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_time_sized_run_stopped_before_its_count_is_fixed_resumes_sizing(npz, tmp_path, capsys,
                                                                          monkeypatch, schedule):
    """A --minutes run stopped (a signal) at step 5, before its count is fixed: the checkpoint
    says it is still sizing; its provisional count is made far too small (a probe run during a
    burst of load), and --resume sizes it again from its own steps and the time it has left,
    instead of training to that count: it fixes a count far above it and trains to it."""
    given = {**TINY, "dataset": npz, "out": str(tmp_path), "minutes": 0.2, "lr_schedule": schedule,
             "warmup": 30, "ckpt_every": 100000, "log_every": 1}
    stop, real_step = {"signal": None}, optim.train_step

    def step_then_stop(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if args[6] == 4:  # the step index: stop after the 5th
            stop["signal"] = signal.SIGTERM
        return result

    monkeypatch.setattr(train, "stop_on_signals", lambda: contextlib.nullcontext(stop))
    monkeypatch.setattr(optim, "train_step", step_then_stop)
    with pytest.raises(cli.Stopped):
        train.train(given, progress=False, started=time.perf_counter())
    monkeypatch.undo()
    state = checkpoint.load(tmp_path, required=checkpoint.RUN_KEYS)
    assert state["step"] == 5
    state["config"]["train"]["steps"] = 8  # the provisional count of a probe slowed 50x
    torch.save(state, tmp_path / "ckpt.pt")
    capsys.readouterr()
    cfg, _, _ = train.train({**given, "resume": True}, progress=False, started=time.perf_counter())
    err = capsys.readouterr().err
    after = checkpoint.load(tmp_path)
    steps = cfg.train.steps
    assert after["step"] == steps == after["config"]["train"]["steps"] > 30, (steps, err)
    assert f"--steps {steps} repeats this run" in err and "the run's own steps" in err, err
    assert after["sizing"] is False  # fixed: a later resume keeps the count
