"""Faults during training and sampling keep the user's work: a diverging run never writes a
non-finite checkpoint and says truly what is kept; an existing run directory is refused unless
--resume or --overwrite; two runs cannot share a directory (and kill -9 leaves no stale lock); a
full disk while saving is one line with the previous checkpoint intact and no temporary file;
Ctrl-C while sampling changes nothing; stale temporary files go; a resumed log has each step once.
Each test checks that no file the user had changed or vanished."""
import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import cli
import ddpm
import files
import rundir
import sample
import train
import unet

TINY = {"base_channels": 8, "norm_groups": 4, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,),
        "dropout": 0.0, "timesteps": 50, "batch_size": 8, "lr": 2e-3, "warmup": 2,
        "log_every": 2, "ckpt_every": 4, "sample_every": 1000, "num_samples": 2,
        "sample_steps": 2, "precision": "fp32", "device": "cpu", "seed": 0}


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "noise.npz"
    np.savez(path, images=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    return f"npz:{path}"


def run_train(npz, out, **overrides):
    return train.train({**TINY, "dataset": npz, "out": str(out), **overrides}, progress=False)


def run_main(script_run, argv, capsys):
    """(exit status, stderr lines) of a script run through cli.run_script, in-process; progress
    bars (carriage-return lines) are left out, and there must be no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_script(script_run, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line.split("\r")[-1].replace("\x1b[A", "") for line in err.splitlines()]
    return exit_info.value.code, [line for line in lines if line.strip() and "|" not in line]


def snapshot(directory):
    """{name: sha256} of the files in a directory."""
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(directory)) if (directory / name).is_file()}


def finite(state):
    return all(torch.isfinite(v).all() for key in ("model", "ema") for v in state[key].values())


def test_a_diverging_run_never_writes_a_non_finite_checkpoint(npz, tmp_path):
    """--lr 1e6 --warmup 0 --ckpt-every 1 --log-every 100: the weights go non-finite between two
    log lines; no checkpoint with a non-finite tensor is written, and the message names the step
    of the checkpoint that is really kept."""
    with pytest.raises(train.TrainError) as excinfo:
        run_train(npz, tmp_path, lr=1e6, warmup=0, ckpt_every=1, log_every=100, steps=200)
    message = str(excinfo.value)
    assert "non-finite weights at step" in message, message
    if os.path.exists(tmp_path / "ckpt.pt"):
        state = checkpoint.load(tmp_path)
        assert finite(state)
        assert f"the last good checkpoint (step {state['step']}) is kept" in message
        assert int(message.split("at step ")[1].split(";")[0]) == state["step"] + 1
    else:
        assert "no checkpoint had been written yet" in message


def test_an_existing_run_is_refused_then_resumed_or_overwritten(npz, tmp_path, capsys):
    """A new run into a directory holding one (the README's command twice) is refused in one line
    naming --resume, --out and --overwrite, with every file kept; --overwrite replaces the run."""
    run_train(npz, tmp_path, steps=4)
    before = snapshot(tmp_path)
    argv = ["--dataset", npz, "--out", str(tmp_path), "--steps", "4", "--base-channels", "8", "--norm-groups", "4",
            "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attn-resolutions", "4",
            "--timesteps", "50", "--batch-size", "8", "--device", "cpu", "--precision", "fp32"]
    code, lines = run_main(train.main, argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "holds a run" in lines[0] and all(w in lines[0] for w in ("--resume", "--out", "--overwrite"))
    assert snapshot(tmp_path) == before
    (tmp_path / "samples_0000002.png").write_bytes(b"an old grid")
    run_train(npz, tmp_path, steps=2, overwrite=True, num_samples=3)
    assert checkpoint.load(tmp_path)["step"] == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [2]
    assert not os.path.exists(tmp_path / "samples_0000002.png")


def test_two_runs_cannot_share_a_directory_and_kill_9_frees_it(npz, tmp_path):
    """A process holding the run directory's lock (here a stand-in that takes the same flock)
    makes a second run refuse in one line naming it; once that process is killed with -9 the lock
    is gone with it and the run goes ahead."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.write('process holder'); f.flush(); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cli.UserError, match="is in use by process holder"):
            run_train(npz, tmp_path, steps=2)
        assert sorted(os.listdir(tmp_path)) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    run_train(npz, tmp_path, steps=2)
    assert checkpoint.load(tmp_path)["step"] == 2


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
        npz, tmp_path, capsys, monkeypatch):
    """ENOSPC half-way through the second checkpoint: exit status 2, one line saying to free
    space, the step-4 checkpoint intact and loadable, no temporary file left."""
    run_train(npz, tmp_path, steps=4)
    before = snapshot(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    argv = ["--out", str(tmp_path), "--resume", "--steps", "8", "--device", "cpu"]
    code, lines = run_main(train.main, argv, capsys)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert code == 2 and len(lines) == 1, lines
    assert "No space left on device" in lines[0] and "free some disk space" in lines[0]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "log.jsonl"} == \
        {k: v for k, v in before.items() if k != "log.jsonl"}
    assert checkpoint.load(tmp_path)["step"] == 4


def test_a_full_disk_while_logging_or_drawing_is_one_line(npz, tmp_path, capsys, monkeypatch):
    """ENOSPC on a log line (log.jsonl written to /dev/full) and on the final grid: one line naming
    the file, never a traceback; the checkpoint written before is intact."""
    real_open, real_write = open, files.atomic_write
    monkeypatch.setattr(rundir, "open", lambda path, mode="r", **kw: real_open(
        "/dev/full" if str(path).endswith("log.jsonl") else path, mode, **kw), raising=False)
    argv = ["--dataset", npz, "--out", str(tmp_path / "log"), "--steps", "2", "--base-channels",
            "8", "--norm-groups", "4", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attn-resolutions", "4",
            "--timesteps", "50", "--batch-size", "8", "--device", "cpu", "--log-every", "1"]
    code, lines = run_main(train.main, argv, capsys)
    assert code == 2 and len(lines) == 1 and "log.jsonl" in lines[0] \
        and "No space left on device" in lines[0], lines
    monkeypatch.undo()

    run_train(npz, tmp_path / "png", steps=2)
    monkeypatch.setattr(files, "atomic_write", lambda path, write: (
        _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) if path.endswith(".png")
        else real_write(path, write)))
    argv = ["--out", str(tmp_path / "png"), "--resume", "--steps", "4", "--device", "cpu"]
    code, lines = run_main(train.main, argv, capsys)
    assert code == 2 and len(lines) == 1 and "samples_final.png" in lines[0], lines
    assert checkpoint.load(tmp_path / "png")["step"] == 4


def _raise(error):
    raise error


def test_ctrl_c_while_sampling_changes_nothing(npz, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of sample.py: exit status 130, one line, the existing output file
    untouched, no temporary file."""
    run_train(npz, tmp_path / "run", steps=2)
    (tmp_path / "out.png").write_bytes(b"the user's earlier picture")
    before = snapshot(tmp_path)
    calls = {"n": 0}
    real = ddpm.GaussianDiffusion.ddim_sample

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ddpm.GaussianDiffusion, "ddim_sample", interrupted)
    code, lines = run_main(sample.main, ["--ckpt", str(tmp_path / "run"), "--sampler", "ddim",
                                        "--steps", "5", "--n", "4", "--out",
                                        str(tmp_path / "out.png")], capsys)
    assert code == 130 and "Ctrl-C" in lines[-1] and "none is left half-written" in lines[-1], lines
    assert snapshot(tmp_path) == before


def test_stale_temporary_files_are_removed_at_start(npz, tmp_path, capsys):
    """What kill -9 during a save leaves (.ckpt.pt.<12 hex>.tmp) goes when the next run starts;
    a user's own hidden file of another name stays."""
    run_train(npz, tmp_path, steps=2)
    stale = tmp_path / ".ckpt.pt.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / ".notes.tmp"
    mine.write_text("the user's")
    run_train(npz, tmp_path, steps=4, resume=True)
    assert not stale.exists() and mine.exists()
    assert ".ckpt.pt.0123456789ab.tmp" in capsys.readouterr().err


def test_a_resumed_log_has_each_step_once(npz, tmp_path):
    """A run that logged past its last checkpoint and then died: --resume cuts log.jsonl back to
    the checkpoint's step (a torn last line too), so the replayed steps appear once."""
    run_train(npz, tmp_path, steps=4)
    with open(tmp_path / "log.jsonl", "a") as f:  # what the dead run logged after step 4
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    run_train(npz, tmp_path, steps=8, resume=True)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [2, 4, 6, 8]


def test_the_command_a_stopped_run_prints_works(npz, tmp_path, capsys, monkeypatch):
    """A run started with --overwrite and stopped by a signal says `continue with --resume --out
    DIR`; that command, as printed, continues it (the invocation's flags are not stored in the
    run's config, so --resume is not refused as a change of --overwrite)."""
    (tmp_path / "log.jsonl").write_text("")  # an old run's file: --overwrite is needed
    stop = {"signal": signal.SIGTERM}
    monkeypatch.setattr(train, "stop_on_signals", lambda: contextlib.nullcontext(stop))
    argv = ["--dataset", npz, "--out", str(tmp_path), "--steps", "6", "--overwrite", *TINY_FLAGS]
    code, lines = run_main(train.main, argv, capsys)
    assert code == 128 + signal.SIGTERM
    command = lines[-1].split("continue with ")[1].split()
    assert command == ["--resume", "--out", str(tmp_path)]
    assert "overwrite" not in checkpoint.load(tmp_path)["config"]
    monkeypatch.undo()
    cli.run_script(train.main, command)  # no SystemExit: done
    assert checkpoint.load(tmp_path)["step"] == 6


TINY_FLAGS = ["--base-channels", "8", "--norm-groups", "4", "--channel-mult", "1", "2",
              "--num-res-blocks", "1", "--attn-resolutions", "4", "--timesteps", "50",
              "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--log-every", "2",
              "--num-samples", "2", "--sample-steps", "2"]


def test_resume_keeps_going_over_a_damaged_log(npz, tmp_path):
    """A log.jsonl with lines that are not UTF-8, not JSON, or records whose step is not an
    integer: --resume drops those lines with the steps past the checkpoint, and goes on."""
    run_train(npz, tmp_path, steps=4)
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00 not text\n" + b'{"step": "3", "loss": 1}\n' + b'[1, 2]\n'
                + b'{"step": true, "loss": 1}\n' + json.dumps({"step": 6, "loss": 1.0}).encode() + b"\n")
    run_train(npz, tmp_path, steps=8, resume=True)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    assert steps == [2, 4, 6, 8]


def test_a_full_disk_while_the_lock_records_its_holder_is_one_line(npz, tmp_path, capsys,
                                                                  monkeypatch):
    """ENOSPC when the run directory's lock file records the process id: one line naming it, the
    lock released (the next run takes it), no traceback."""
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(files.DirectoryLock.NAME):
            def write(text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = write
        return f

    monkeypatch.setattr(files, "open", full, raising=False)
    argv = ["--dataset", npz, "--out", str(tmp_path / "run"), "--steps", "2", *TINY_FLAGS]
    code, lines = run_main(train.main, argv, capsys)
    assert code == 2 and len(lines) == 1 and ".lock" in lines[0] \
        and "No space left on device" in lines[0], lines
    monkeypatch.undo()
    run_train(npz, tmp_path / "run", steps=2)
    assert checkpoint.load(tmp_path / "run")["step"] == 2


def test_a_checkpoint_of_a_newer_format_is_refused_and_kept(npz, tmp_path):
    """A checkpoint written by a newer version (a format this code does not read, whose config
    may hold fields it does not know) is refused on --resume in one line, before anything is
    written: nothing of it is lost."""
    run_train(npz, tmp_path, steps=4)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["config"]["a_newer_field"] = {"kept": [1, 2]}
    newer = {**state, "format_version": checkpoint.FORMAT_VERSION + 1}
    torch.save(newer, tmp_path / "ckpt.pt")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint format") as excinfo:
        run_train(npz, tmp_path, steps=8, resume=True)
    assert "\n" not in str(excinfo.value)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_plot_skips_damaged_lines_and_says_so(npz, tmp_path, capsys):
    """plot.py over a log with a line that is not UTF-8 and a record whose loss is a string:
    the picture is drawn from the good records, and one line says how many were skipped."""
    pytest.importorskip("matplotlib")
    import plot
    run_train(npz, tmp_path, steps=4)
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b"\x80\x81\n" + json.dumps({"step": 6, "loss": "0.5"}).encode() + b"\n")
    train_records, _, skipped = plot.read_log(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in train_records] == [2, 4] and skipped == 2
    capsys.readouterr()
    plot.main([str(tmp_path)])
    assert "skipped 2 line(s)" in capsys.readouterr().err
    assert (tmp_path / "log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_weights_are_never_saved(npz, tmp_path, bad, monkeypatch):
    """Not only NaN: an infinity in the EMA weights stops the run before a checkpoint holds it,
    and the message names the step really kept."""
    run_train(npz, tmp_path, steps=4)
    real = train.optim.ema_update
    calls = {"n": 0}

    def poisoned(ema, model, decay):
        real(ema, model, decay)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(ema.parameters()).view(-1)[0] = bad

    monkeypatch.setattr(train.optim, "ema_update", poisoned)
    with pytest.raises(train.TrainError, match="non-finite weights at step 8.*step 4"):
        run_train(npz, tmp_path, steps=8, resume=True)
    assert finite(checkpoint.load(tmp_path)) and checkpoint.load(tmp_path)["step"] == 4


def test_an_infinite_loss_stops_the_run(npz, tmp_path, monkeypatch):
    run_train(npz, tmp_path, steps=4)
    forward = unet.UNet.forward
    monkeypatch.setattr(unet.UNet, "forward", lambda self, x, t, *a: forward(self, x, t) + float("inf"))
    with pytest.raises(train.TrainError, match="non-finite loss by step 5;.*step 4"):
        run_train(npz, tmp_path, steps=8, resume=True, log_every=1)  # +inf, not yet NaN, at 5
    assert checkpoint.load(tmp_path)["step"] == 4


class FullFileIO(io.FileIO):
    """A file on a full disk: every write that reaches the kernel fails with ENOSPC."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def open_on_full_disk(path, mode="r", buffering=-1, **kwargs):
    """open() for files.py with the lock file on a full disk, built as open() builds its layers
    (raw, buffer, text), so that a buffered write fails when it is flushed, as on a full disk."""
    if not str(path).endswith(files.DirectoryLock.NAME):
        return open(path, mode, buffering, **kwargs)
    raw = FullFileIO(path, mode.replace("b", "").replace("t", ""))
    if "b" in mode and buffering == 0:
        return raw
    buffered = io.BufferedRandom(raw)
    return buffered if "b" in mode else io.TextIOWrapper(buffered, **kwargs)


@contextlib.contextmanager
def full_disk(tmp_path, kind, monkeypatch):
    """A directory on a completely full disk: a 1 MB tmpfs filled to the last byte (needs root
    and mount), or files.py's lock file opened as on a full disk (every write that reaches the
    kernel fails with ENOSPC), which needs neither."""
    if kind == "simulated":
        monkeypatch.setattr(files, "open", open_on_full_disk, raising=False)
        yield tmp_path / "run"
        return
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                            str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with open(mount / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield mount / "run"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("kind", ["tmpfs", "simulated"])
def test_a_completely_full_disk_at_the_start_is_one_line_and_leaves_no_lock(npz, tmp_path, capsys,
                                                                            kind, monkeypatch):
    """train.py into a directory on a full disk: the lock cannot record its holder; one line
    saying to free space (not the ENOSPC of the lock's close replacing it), exit status 2, and
    no empty .lock left behind."""
    with full_disk(tmp_path, kind, monkeypatch) as run:
        argv = ["--dataset", npz, "--out", str(run), "--steps", "2", *TINY_FLAGS]
        code, lines = run_main(train.main, argv, capsys)
        assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0] \
            and "free some disk space" in lines[0], lines
        assert not os.path.lexists(run / files.DirectoryLock.NAME)
