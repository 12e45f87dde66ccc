"""Every script against a table of bad inputs, as a new user would type them: each must exit
non-zero with one line on stderr (`error: ...`), no traceback, and leave every file of the run
directory and the data cache as it was. The scripts run in-process through cli.run_script, the same
wrapper their `__main__` calls; two cases also run as real processes."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import checkpoint
import cli
import convert
import data
import evaluate
import hardware
import plot
import sample
import sampling
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--base-channels", "8", "--norm-groups", "4", "--channel-mult", "1", "2", "--num-res-blocks", "1",
        "--attn-resolutions", "4", "--timesteps", "100", "--batch-size", "8", "--precision", "fp32",
        "--device", "cpu", "--log-every", "2", "--num-samples", "2", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run, its npz dataset, a cache directory with a file in it, and damaged
    checkpoints of several kinds."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    np.savez(root / "bars.npz", images=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    npz = f"npz:{root / 'bars.npz'}"
    cache = root / "cache"
    cache.mkdir()
    (cache / "mnist.npz").write_bytes(b"a cache file that must not change")
    run = root / "run"
    os.environ["DDPM_CACHE"] = str(cache)
    try:
        cli.run_script(train.main, ["--dataset", npz, "--out", str(run), "--steps", "2", *TINY])
    finally:
        del os.environ["DDPM_CACHE"]
    bad = root / "bad"
    bad.mkdir()
    state = checkpoint.load(run)
    torch.save({"format_version": 1}, bad / "version_only.pt")
    torch.save({**state, "format_version": 99}, bad / "future.pt")
    torch.save({k: v for k, v in state.items() if k != "ema"}, bad / "no_ema.pt")
    torch.save({**state, "config": {**state["config"], "schedule": "bogus"}}, bad / "bad_config.pt")
    torch.save({**state, "config": {**state["config"], "net": "x"}}, bad / "bad_unet.pt")
    torch.save({**state, "ema": 5}, bad / "bad_weights.pt")
    torch.save({**state, "config": {**state["config"],
                                    "net": {**state["config"]["net"], "base_channels": 16}}},
               bad / "other_arch.pt")
    torch.save({"format_version": 1, "model": {}, "test_accuracy": 0.5}, bad / "classifier.pt")
    (bad / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (bad / "resume_unknown_unet").mkdir()
    torch.save({**state, "config": {**state["config"],
                                    "net": {**state["config"]["net"], "future_field": 1}}},
               bad / "resume_unknown_unet" / "ckpt.pt")
    logs = root / "logs"
    logs.mkdir()
    (logs / "binary.jsonl").write_bytes(b"\xff\xfe not text\n\x80\x81\n")
    (logs / "strings.jsonl").write_text('{"step": 2, "loss": "0.5"}\n{"step": "4", "loss": 0.4}\n'
                                        '{"step": 6, "loss": 0.3, "time_s": "late"}\n[1, 2]\n')
    (root / "a_file").write_text("")
    (root / "empty_run").mkdir()
    return {"root": root, "npz": npz, "cache": cache, "run": run, "bad": bad}


def snapshot(*directories):
    """{path: sha256} of every file under the directories."""
    found = {}
    for directory in directories:
        for folder, _, files in os.walk(directory):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def train_cases(w):
    npz, run, root, bad = w["npz"], str(w["run"]), w["root"], w["bad"]
    new = ["--dataset", npz, "--out", str(root / "new_run"), *TINY]
    return [
        # invalid or conflicting diffusion and model flags
        ([*new, "--var-type", "fixed-large"], "invalid choice: 'fixed-large'"),
        ([*new, "--schedule", "bogus"], "invalid choice: 'bogus'"),
        ([*new, "--mean-type", "epsilon"], "invalid choice: 'epsilon'"),
        ([*new, "--timesteps", "0"], "--timesteps must be an integer in [1, 100000], got 0"),
        ([*new, "--timesteps", "10", "--schedule", "linear"], "beta"),
        ([*new, "--loss-type", "hybrid", "--var-type", "fixed_large"], "hybrid"),
        ([*new, "--loss-type", "simple", "--var-type", "learned_range"], "learned_range"),
        ([*new, "--channel-mult", "1", "2", "2", "2", "2"], "image_size 8 must be divisible"),
        ([*new, "--attn-resolutions", "3"], "attn_resolutions [3] never reached"),
        ([*new, "--base-channels", "3"], "base_channels must be even"),
        ([*new, "--channel-mult", "0", "2"], "--channel-mult must be an integer in [1, 65536], got 0"),
        ([*new, "--num-res-blocks", "0"], "--num-res-blocks must be an integer in [1, 64], got 0"),
        ([*new, "--dropout", "1.5"], "--dropout must be a finite number in [0, 1), got 1.5"),
        ([*new, "--preset", "huge"], "invalid choice: 'huge'"),
        ([*new, "--precision", "fp8"], "invalid choice: 'fp8'"),
        # numbers out of range, silently wrong before
        ([*new, "--batch-size", "0"], "--batch-size must be an integer in [1, 2147483647], got 0"),
        ([*new, "--lr", "0"], "--lr must be a finite number > 0"),
        ([*new, "--lr", "nan"], "--lr must be a finite number > 0"),
        ([*new, "--lr", "inf"], "--lr must be a finite number > 0"),
        ([*new, "--steps", "-5"], "--steps must be an integer in [1, 2147483647], got -5"),
        ([*new, "--steps", "ten"], "invalid int value: 'ten'"),
        ([*new, "--warmup", "-1"], "--warmup must be an integer in [0, 2147483647], got -1"),
        ([*new, "--ema-decay", "1"], "--ema-decay must be a finite number in [0, 1), got 1.0"),
        ([*new, "--ema-warmup", "0"], "--ema-warmup must be a finite number >= 1, got 0.0"),
        ([*new, "--ema-snapshots", "-1"], "--ema-snapshots must be an integer in [0, 2147483647]"),
        ([*new, "--minutes", "0"], "--minutes must be a finite number in (0, 1000000], got 0.0"),
        ([*new, "--sample-eta", "-0.5"], "--sample-eta must be a finite number >= 0, got -0.5"),
        ([*new, "--minutes", "5", "--steps", "10"], "give one of them"),
        # numbers that are not finite or past what the code can hold
        ([*new, "--sample-eta", "nan"], "--sample-eta must be a finite number >= 0, got nan"),
        ([*new, "--minutes", "1e308"], "--minutes must be a finite number in (0, 1000000], got 1e+308"),
        ([*new, "--minutes", "nan"], "--minutes must be a finite number in (0, 1000000], got nan"),
        ([*new, "--grad-clip", "inf"], "--grad-clip must be a finite number > 0, got inf"),
        ([*new, "--ema-warmup", "nan"], "--ema-warmup must be a finite number >= 1, got nan"),
        ([*new, "--ema-decay=-inf"], "--ema-decay must be a finite number in [0, 1), got -inf"),
        ([*new, "--p2-gamma=-1"], "--p2-gamma must be a finite number >= 0, got -1.0"),
        ([*new, "--p2-k", "nan"], "--p2-k must be a finite number > 0, got nan"),
        ([*new, "--t-sampling", "lognormal", "--t-std", "0"], "--t-std must be a finite number > 0, got 0.0"),
        ([*new, "--t-mean", "inf"], "--t-mean must be a finite number, got inf"),
        ([*new, "--t-floor", "1.5"], "--t-floor must be a finite number > 0 and <= 1, got 1.5"),
        ([*new, "--t-sampling", "uniform", "--t-mean", "1"], "--t-mean, --t-std and --t-floor shape a non-uniform"),
        ([*new, "--dropout", "nan"], "--dropout must be a finite number in [0, 1), got nan"),
        ([*new, "--lr", "1e400"], "--lr must be a finite number > 0, got inf"),
        ([*new, "--seed", "-1"], "--seed must be an integer in [0, 2147483647], got -1"),
        ([*new, "--seed", "99999999999999999999"], "--seed must be an integer in [0, 2147483647]"),
        ([*new, "--steps", "99999999999999999999"], "--steps must be an integer in [1, 2147483647]"),
        ([*new, "--timesteps", "1000000000"], "--timesteps must be an integer in [1, 100000]"),
        ([*new, "--log-every", "99999999999999999999"], "--log-every must be an integer"),
        ([*new, "--lr-schedule", "step"], "invalid choice: 'step'"),
        ([*new, "--loss-weighting", "snr"], "invalid choice: 'snr'"),
        ([*new, "--loss-weighting", "min_snr", "--snr-gamma", "0"], "--snr-gamma must be a number > 0, got 0.0"),
        ([*new, "--eval-every", "-1"], "--eval-every must be an integer in [0, 2147483647], got -1"),
        ([*new, "--eval-every", "5"], "--eval-every scores 28x28 datasets with labels"),
        ([*new, "--resume", "--overwrite"], "give one of them"),
        ([*new, "--norm-groups", "3"], "norm_groups 3 does not divide"),
        ([*new, "--grad-clip", "0"], "--grad-clip must be a finite number > 0"),
        ([*new, "--log-every", "0"], "--log-every"),
        ([*new, "--num-samples", "0"], "--num-samples must be an integer in [1, 100000], got 0"),
        ([*new, "--sample-steps", "500"], "--sample-steps must be an integer in [1, 100], got 500"),
        ([*new, "--unknown-flag"], "unrecognized arguments"),
        # devices
        ([*new, "--device", "tpu"], "unknown --device 'tpu'"),
        ([*new, "--device", "cuda:abc"], "unknown --device"),
        # data
        ([*new, "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        ([*new, "--dataset", f"npz:{root}/none.npz"], "none.npz does not exist"),
        ([*new, "--image-size", "32"], "--image-size reads a folder of images; npz:"),
        ([*new, "--labels", "subfolders"], "--labels reads a folder of images"),
        ([*new, "--class-cond"], "--class-cond needs labels, and npz:"),
        ([*new, "--class-cond", "--cond-drop", "1.5"], "--cond-drop must be a finite number in [0, 1]"),
        # flags that would do nothing
        ([*new, "--cond-drop", "0.2"], "add --class-cond or drop --cond-drop"),
        ([*new, "--decay-fraction", "0.3", "--lr-schedule", "cosine"],
         "this run's schedule is cosine; add --lr-schedule wsd or drop --decay-fraction"),
        ([*new, "--decay-fraction", "0.3", "--recipe", "ho"], "this run's schedule is constant"),
        ([*new, "--dataset", f"folder:{root}/nowhere"], "nowhere is not a folder"),
        ([*new, "--dataset", f"folder:{root}/empty_run"], "no usable image"),
        ([*new, "--dataset", f"folder:{root}/run", "--val-fraction", "1"],
         "--val-fraction must be a finite number in [0, 1), got 1.0"),
        ([*new, "--dataset", f"folder:{root}/run", "--image-size", "0"],
         "--image-size must be an integer in [1, 4096], got 0"),
        (["--dataset", "mnist", "--data-dir", f"{root}/nowhere", "--out", str(root / "new_run")],
         "does not exist"),
        # outputs
        ([*new, "--out", "/proc/nope"], "cannot write in /proc"),
        ([*new, "--out", str(root / "a_file")], "is not a directory"),
        # resume
        (["--dataset", npz, "--out", str(root / "empty_run"), "--resume"], "no checkpoint"),
        (["--dataset", npz, "--out", run, "--resume", "--base-channels", "16"],
         "cannot change base_channels"),
        (["--dataset", npz, "--out", run, "--resume", "--t-mean", "0.5"], "cannot change t_mean"),
        (["--dataset", npz, "--out", run, "--resume", "--ema-snapshots", "5"],
         "without its power-function EMAs"),
        (["--dataset", npz, "--out", str(bad / "resume_version_only"), "--resume"], "lacks"),
        (["--dataset", npz, "--out", str(bad / "resume_unknown_unet"), "--resume"],
         "has future_field, which this version's unet.py does not know"),
    ]


def sample_cases(w):
    run, bad, root = str(w["run"]), w["bad"], w["root"]
    out = ["--out", str(root / "s.png")]
    return [
        (["--ckpt", str(root / "missing.pt"), *out], "no checkpoint"),
        (["--ckpt", str(root / "empty_run"), *out], "no checkpoint"),
        (["--ckpt", run, "--n", "0", *out], "--n must be an integer in [1, 10000000], got 0"),
        (["--ckpt", run, "--batch-size", "0", *out], "--batch-size must be an integer in [1, 1000000], got 0"),
        (["--ckpt", run, "--out", "x.jpg"], ".png or .npz"),
        (["--ckpt", run, "--ema-length", "0.5", *out], "must be in [0.03, 0.2], got 0.5"),
        (["--ckpt", run, "--ema-length", "nan", *out], "--ema-length must be in [0.03, 0.2]"),
        (["--ckpt", run, "--ema-length", "0.07", "--no-ema", *out], "give one of them"),
        (["--ckpt", run, "--ema-length", "0.07", *out], "holds no EMA snapshots"),
        (["--ckpt", run, "--out", "/proc/nope.png"], "cannot write in /proc"),
        (["--ckpt", run, "--out", "/proc/nope.npz"], "cannot write in /proc"),
        (["--ckpt", run, "--out", str(root / "a_file" / "x.png")], "is not a directory"),
        (["--ckpt", run, "--eta", "-1", *out], "--eta must be a finite number >= 0"),
        (["--ckpt", run, "--trajectory", "-1", *out], "--trajectory must be an integer in [0, 100000], got -1"),
        (["--ckpt", run, "--steps", "5", "--trajectory", "10", *out],
         "--trajectory 10 asks for more snapshots than the 5 steps of DDIM-5 eta=1"),
        (["--ckpt", run, "--sampler", "ddpm", "--trajectory", "101", *out],
         "than the 100 steps of DDPM-100"),
        (["--ckpt", run, "--eta", "nan", *out], "--eta must be a finite number >= 0, got nan"),
        (["--ckpt", run, "--seed", "-1", *out], "--seed must be an integer in [0, 2147483647]"),
        (["--ckpt", run, "--class", "1", *out], "this model is not class-conditional"),
        (["--ckpt", run, "--guidance", "inf", *out], "--guidance must be a finite number"),
        # flags that would do nothing
        (["--ckpt", run, "--guidance", "3", *out], "this model is not class-conditional; drop --guidance"),
        (["--ckpt", run, "--sampler", "dpm", "--eta", "0", *out], "--eta is DDIM's, and --sampler dpm"),
        (["--ckpt", run, "--sampler", "ddpm", "--eta", "1", *out], "--eta is DDIM's, and --sampler ddpm"),
        (["--ckpt", run, "--sampler", "ddim", "--steps", "5000", *out], "--steps 5000 must be in"),
        (["--ckpt", run, "--steps", "0", *out], "--steps must be an integer in [1, 100000], got 0"),
        (["--ckpt", run, "--device", "tpu", *out], "unknown --device 'tpu'"),
        (["--ckpt", run, "--device", "cuda:7", *out], "--device"),
        (["--ckpt", run, "--precision", "fp8", *out], "invalid choice: 'fp8'"),
        (["--ckpt", str(bad / "garbage.pt"), *out], "not a readable checkpoint"),
        (["--ckpt", str(bad / "version_only.pt"), *out], "lacks step, config, model, ema"),
        (["--ckpt", str(bad / "future.pt"), *out], "checkpoint format 99"),
        (["--ckpt", str(bad / "no_ema.pt"), *out], "lacks ema"),
        (["--ckpt", str(bad / "bad_config.pt"), *out], "cannot build"),
        (["--ckpt", str(bad / "bad_unet.pt"), *out], "cannot build"),
        (["--ckpt", str(bad / "bad_weights.pt"), *out], "another architecture"),
        (["--ckpt", str(bad / "other_arch.pt"), *out], "another architecture"),
        (["--ckpt", str(bad / "classifier.pt"), *out], "lacks step, config, ema"),
    ]


def evaluate_cases(w):
    run, bad, root = str(w["run"]), w["bad"], w["root"]
    return [
        (["--ckpt", run, "--samples", "2"], "--samples must be 0 or at least 4"),
        (["--ckpt", run, "--ema-length", "0.01"], "--ema-length must be in [0.03, 0.2], got 0.01"),
        (["--ckpt", run, "--ema-length", "0.07"], "holds no EMA snapshots"),
        (["--ckpt", run, "--fid-of", str(root / "a_file"), "--ema-length", "0.07"],
         "--fid-of scores saved samples and --ema-length"),
        (["--ckpt", run, "--n", "-1"], "--n must be an integer in [0, 10000000], got -1"),
        (["--ckpt", run, "--n", "0", "--samples", "0"], "nothing to evaluate"),
        (["--ckpt", run, "--eta", "-1"], "--eta must be a finite number >= 0"),
        (["--ckpt", run, "--eta", "inf"], "--eta must be a finite number >= 0, got inf"),
        (["--ckpt", run, "--seed", "99999999999"], "--seed must be an integer in [0, 2147483647]"),
        (["--ckpt", run, "--batch-size", "0"], "--batch-size must be an integer in [1, 1000000]"),
        (["--ckpt", run, "--nearest", "4"], "--nearest compares with held-out images, and npz:"),
        (["--ckpt", run, "--nearest", "-1"], "--nearest must be an integer in [0, 1000000]"),
        (["--ckpt", run, "--n", "0", "--samples", "8", "--class", "all"],
         "this model is not class-conditional"),
        (["--ckpt", run, "--nearest", "4", "--nearest-png", "x.jpg"], "--nearest-png must end in .png"),
        (["--ckpt", run, "--n", "0", "--samples", "4", "--guidance", "1"], "drop --guidance"),
        (["--ckpt", run, "--sampler", "dpm", "--eta", "0.5"], "--eta is DDIM's, and --sampler dpm"),
        (["--ckpt", run, "--nll-batch-size", "0"], "--nll-batch-size must be an integer in [1, 1000000], got 0"),
        (["--ckpt", run, "--device", "tpu"], "unknown --device"),
        (["--ckpt", run, "--sampler", "ddim", "--steps", "5000"], "--steps 5000 must be in"),
        (["--ckpt", run, "--json", "/proc/nope.json"], "cannot write in /proc"),
        (["--ckpt", run, "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--ckpt", run, "--dataset", "mnist"], "the model takes (1, 8, 8)"),
        (["--ckpt", str(bad / "version_only.pt")], "lacks step, config, model, ema"),
        (["--ckpt", str(bad / "garbage.pt")], "not a readable checkpoint"),
        (["--ckpt", str(root / "missing.pt")], "no checkpoint"),
        (["--ckpt", run, "--fid", "1"], "--fid needs at least 2 images"),
        (["--ckpt", run, "--fid", "-3"], "--fid must be an integer in [0, 10000000]"),
        (["--fid-of", str(root / "missing.npz"), "--dataset", "mnist"],
         "--fid-of: " + str(root / "missing.npz") + " does not exist"),
        (["--fid-of", str(bad / "garbage.pt")], "--fid-of scores samples against a dataset"),
        (["--ckpt", run, "--fid", "--fid-weights", str(root / "none.pth")],
         "--fid-weights: " + str(root / "none.pth") + " is not a file"),
        (["--ckpt", run, "--fid", "--fid-weights", str(bad / "garbage.pt")],
         "cannot read the Inception weights"),
    ]


def bench_cases(w):
    return [
        (["--iters", "0"], "--iters must be an integer in [1, 100000], got 0"),
        (["--presets", "huge"], "invalid choice: 'huge'"),
        (["--device", "tpu"], "unknown --device"),
        (["--batch-sizes", "0"], "--batch-sizes must be an integer in [1, 1000000], got 0"),
        (["--json", "/proc/nope.json"], "cannot write in /proc"),
    ]


def data_cases(w):
    return [
        (["imagenet"], "unknown dataset 'imagenet'"),
        (["mnist", "--split", "val"], "invalid choice: 'val'"),
        (["mnist", "--count", "0"], "--count must be an integer in [1, 1000000], got 0"),
        (["mnist", "--grid", "/proc/x.png"], "cannot write in /proc"),
        (["npz:/no/such.npz"], "does not exist"),
        (["mnist", "--grid", "x.jpg"], "--grid must end in .png"),
        (["mnist", "--channels", "3"], "--channels reads a folder of images; mnist is not one"),
        (["folder:/no/such/folder"], "is not a folder"),
        (["mnist", "--count", "nan"], "invalid int value"),
    ]


def convert_cases(w):
    run, root = str(w["run"]), w["root"]
    broken = root / "broken_pipeline"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text("{not json")
    return [
        ([], "arguments are required"),
        (["--out", "x.pt"], "one of the arguments --from-diffusers --to-diffusers is required"),
        (["--from-diffusers", str(root / "nowhere"), "--out", str(root / "x.pt")],
         "is not a directory"),
        (["--from-diffusers", str(root / "empty_run"), "--out", str(root / "x.pt")],
         "has neither model_index.json"),
        (["--from-diffusers", str(broken), "--out", str(root / "x.pt")], "cannot read"),
        (["--from-diffusers", str(root), "--to-diffusers", run, "--out", "x"], "not allowed with"),
        (["--from-diffusers", str(root), "--out", "/proc/x.pt"], "cannot write in /proc"),
        (["--to-diffusers", str(root / "missing"), "--out", str(root / "d")], "no checkpoint"),
        (["--to-diffusers", run, "--out", str(root / "a_file")], "exists"),
        (["--to-diffusers", run, "--out", str(root / "a_file"), "--overwrite"], "is a file"),
    ]


def plot_cases(w):
    run, root = str(w["run"]), w["root"]
    return [([str(root / "nowhere")], "no log at"), ([run, "--out", "x.jpg"], "must end in .png"),
            ([run, "--out", "/proc/x.png"], "cannot write in /proc"),
            ([str(root / "empty_run")], "no log at"),
            ([str(root / "logs" / "binary.jsonl"), "--out", str(root / "p.png")],
             "holds no records of a run (2 line(s) are damaged"),
            ([str(root / "logs" / "strings.jsonl"), "--out", str(root / "p.png")],
             "holds no records of a run (4 line(s) are damaged")]


SCRIPTS = {"train": (train.main, train_cases), "convert": (convert.main, convert_cases),
           "plot": (plot.main, plot_cases), "sample": (sample.main, sample_cases),
           "evaluate": (evaluate.main, evaluate_cases), "bench": (bench.main, bench_cases),
           "data": (data.main, data_cases)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_inputs_give_one_line_and_change_nothing(script, world, capsys, monkeypatch):
    """Each case: exit status 2, exactly one line `error: ...` naming the problem, no traceback,
    and every file of the run directory, the damaged checkpoints and the cache unchanged."""
    monkeypatch.setenv("DDPM_CACHE", str(world["cache"]))
    monkeypatch.delenv("DDPM_DATA", raising=False)
    monkeypatch.chdir(world["root"])
    (world["bad"] / "resume_version_only").mkdir(exist_ok=True)
    torch.save({"format_version": 1}, world["bad"] / "resume_version_only" / "ckpt.pt")
    def no_model(*args, **kwargs):
        raise AssertionError("a bad input reached the model")

    monkeypatch.setattr(train.optim, "build", no_model)
    monkeypatch.setattr(sampling, "generate", no_model)  # outputs are checked before sampling
    run, cases = SCRIPTS[script]
    before = snapshot(world["run"], world["bad"], world["cache"])
    for argv, needle in cases(world):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.run_script(run, argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_info.value.code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert "Traceback" not in err and needle in lines[0], (argv, needle, lines[0])
        assert snapshot(world["run"], world["bad"], world["cache"]) == before, argv
    assert not os.path.exists(world["root"] / "new_run")


def test_a_genuine_bug_keeps_its_traceback(capsys):
    """Only a user's mistake is shortened to one line: anything else is a bug and propagates."""
    def buggy(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.run_script(buggy, [])


@pytest.mark.parametrize("script, args, needle", [
    ("train.py", ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    ("sample.py", ["--out", "x.jpg"], ".png or .npz"),
])
def test_real_processes_exit_2_with_one_line(script, args, needle, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py", "bench.py", "data.py",
                                    "convert.py", "plot.py"])
def test_help_explains_every_flag(script, capsys):
    """--help: every flag has a description; flags with a default or choices show them."""
    module = {"train.py": train, "sample.py": sample, "evaluate.py": evaluate, "bench.py": bench,
              "data.py": data, "convert.py": convert, "plot.py": plot}[script]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    blocks = text.split("options:")[1].split("\n  -")[1:]
    assert blocks, text
    for block in blocks:
        flag = block.split()[0]
        words = " ".join(block.split()[1:])
        if flag in ("h,", "-help"):
            continue
        assert len(words) > 12, (flag, block)
    options = text.split("options:")[1]
    for flag in ("--device", "--seed"):
        if flag in options:
            assert "default" in options.split(flag, 1)[1].split("\n  -")[0], flag


@pytest.mark.parametrize("asked, backend, cuda_device", [("cpu", "gloo", None),
                                                         ("auto", "nccl", 1), ("cuda", "nccl", 1)])
def test_ddp_backend_follows_the_device_asked_for(asked, backend, cuda_device, monkeypatch):
    """On a machine with GPUs (the CUDA probe faked), torchrun with --device cpu uses Gloo and never
    calls cuda.set_device; auto or cuda uses NCCL on the process's own GPU (LOCAL_RANK)."""
    calls = {"init": [], "set_device": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls["init"].append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hardware.setup_distributed(asked) == (1, 2, 1)
    assert calls["init"] == [backend]
    assert calls["set_device"] == ([] if cuda_device is None else [torch.device("cuda", cuda_device)])
