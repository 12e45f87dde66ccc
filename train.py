"""Train a DDPM: `python train.py --dataset mnist`.

Writes to runs/<dataset>/ (or --out): ckpt.pt (model, EMA, optimizer, step, config), log.jsonl
(one line of metrics every --log-every steps) and sample grids samples_<step>.png, then
samples_final.png. Ctrl-C or SIGTERM writes a checkpoint and exits; --resume continues a run
exactly where it stopped.

Several GPUs or machines: `torchrun --nproc_per_node=N train.py ...` trains with
DistributedDataParallel; --batch-size is the global batch, split evenly across the processes.
"""
import time

STARTED = time.perf_counter()  # --minutes counts the run's wall time from here, imports included

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import imaging  # noqa: E402
import metrics  # noqa: E402
import runtime  # noqa: E402
import sampling  # noqa: E402
import training  # noqa: E402


class TrainError(runtime.UserError):
    """A training run that cannot go on (a non-finite loss)."""


def train(given, progress=True, started=None):
    """Ho et al.'s Algorithm 1 for the flags in `given` ({Config field: value}); --minutes counts
    from `started` (a perf_counter() reading; default: when this module was imported). Returns
    (cfg, model, ema); raises runtime.Stopped after saving when a signal stops it."""
    with contextlib.ExitStack() as held:  # the run directory's lock and the log, until the end
        run = prepare(given, held, STARTED if started is None else started)
        cfg, step = run.cfg, run.start_step
        meter = Meter(cfg, run.device)
        run.model.train()
        with stop_on_signals() as stop, tqdm(total=cfg.steps, initial=step, unit="step",
                                            disable=not (progress and run.main),
                                            dynamic_ncols=True) as bar:
            while step < cfg.steps:
                x0, t, noise = draw_batch(run, step)       # x_0 ~ q(x_0), t ~ U{1..T}, ε ~ N(0, I)
                losses, grad_norm = run.train_step(x0, t, noise, step)  # ∇ ‖ε - ε_θ(x_t, t)‖², Adam
                step += 1
                meter.add(losses, grad_norm, t)
                bar.update(1)
                if run.sizing:
                    resize(run, step, bar)

                at_end = step == cfg.steps
                stopping = stop_requested(run, stop, step, at_end)
                if step % cfg.log_every == 0 or at_end or stopping:
                    record = {**meter.record(step, run), "time_s": elapsed(run)}
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                    append_log(run, record)
                if step % cfg.ckpt_every == 0 or at_end or stopping:
                    save_checkpoint(run, step)
                    meter.restart_clock()  # img/s counts training time only
                if run.main and step % cfg.sample_every == 0 and not (at_end or stopping):
                    write_grid(run, f"{step:07d}", progress=False)
                    meter.restart_clock()
                if run.scorer and (step % cfg.eval_every == 0 or at_end) and not stopping:
                    append_log(run, score(run, step))
                    meter.restart_clock()
                if stopping:
                    raise runtime.Stopped(stop["signal"], f"stopped by signal {stop['signal']} at "
                                          f"step {step}; checkpoint saved to {run.ckpt_path}; "
                                          f"continue with --resume --out {cfg.out}")
        if run.main:  # the checkpoint is written: Ctrl-C here only stops the grid
            path = write_grid(run, "final", progress=progress)
            print(f"done: {step} steps; checkpoint {run.ckpt_path}; samples {path}",
                  file=sys.stderr)
    return cfg, run.model, run.ema


# ---- set-up ---------------------------------------------------------------------------------

class Run(NamedTuple):
    """Everything the loop needs, made once by prepare()."""
    cfg: training.Config
    unet_kwargs: dict
    device: torch.device
    rank: int
    world: int
    main: bool                   # rank 0: the process that writes
    images: torch.Tensor         # the training set, uint8 [N, C, H, W], on the device
    batches: training.Batches
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    diffusion: object
    train_step: callable         # training.make_train_step
    ema_network: callable        # the EMA model as the samplers call it
    start_step: int
    ckpt_path: str
    log: object                  # log.jsonl opened for appending, unbuffered (main process)
    saved: dict                  # {"step": the step of the last checkpoint written, or None}
    scorer: object               # metrics.Scorer for --eval-every (main process), else None
    clock: dict                  # {"start": perf_counter() at the run's step 0 (over resumes)}
    sizing: dict                 # a --minutes run's plan to re-measure its step count, or None


def prepare(given, held, started):
    """Check every flag, take the run directory (its lock held in `held` until the run ends),
    then load the data, build the model and restore a resumed run."""
    training.validate(training.Config(**given))
    data.check_name(given.get("dataset", "mnist"))
    rank, world, local_rank = runtime.setup_distributed(given.get("device", "auto"))
    device = runtime.pick_device(given.get("device", "auto"), local_rank)
    out = given.get("out") or training.default_out(given.get("dataset", "mnist"))
    state = load_resumed(out) if given.get("resume") else None
    saved = state["config"] if state else None
    dataset = given.get("dataset", saved["dataset"] if saved else "mnist")
    shape = data.image_shape(dataset)
    train_set = None
    if shape is None:  # a user's npz file: its shape is in the file
        train_set = data.load_dataset(dataset, "train", given.get("data_dir"), progress=rank == 0)
        shape = train_set.images.shape[1:]
    cfg, unet_kwargs = training.resolve_config({**given, "out": out}, device, shape, saved)
    runtime.check(cfg.batch_size % world == 0,
                  f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
    runtime.check(not cfg.eval_every or (data.image_shape(dataset) or ())[1:] == (28, 28),
                  f"--eval-every scores 28x28 datasets with labels; {dataset} is not one")
    if rank == 0:
        runtime.check_writable_dir(cfg.out)
        check_directory(cfg, state)
    if train_set is None:
        train_set = data.load_dataset(dataset, "train", cfg.data_dir, progress=rank == 0)
    if rank == 0:
        held.enter_context(runtime.DirectoryLock(cfg.out))
        take_directory(cfg, state)
        announce_default(cfg, given, state)

    model, ema, optimizer, scaler = training.build_training(cfg, unet_kwargs, device)
    ckpt_path = os.path.join(cfg.out, checkpoint.FILENAME)
    if state is not None:
        checkpoint.load_weights(model, state["model"], ckpt_path)
        checkpoint.load_weights(ema, state["ema"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
    diffusion = checkpoint.build_diffusion(dataclasses.asdict(cfg))
    scorer = make_scorer(cfg, train_set, device) if cfg.eval_every and rank == 0 else None
    sizing = None
    if cfg.steps is None:  # --minutes: as many steps as fit
        cfg.steps, sizing = size_run(cfg, model, ema, optimizer, scaler, diffusion,
                                     train_set.images.shape[1:], device, world, started)
    # DDP compares a gradient's strides literally; for 1x1 kernels the strides of the size-1 dims
    # differ between oneDNN's gradient and the bucket while the memory layout is the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(net) if cfg.compile else net
    in_precision = lambda network: runtime.in_precision(network, cfg.precision, device,
                                                        cfg.channels_last)
    images = torch.from_numpy(train_set.images).to(device)
    # Unbuffered: each record is one write() of whole lines, nothing waits in a buffer.
    log = held.enter_context(open(os.path.join(cfg.out, LOG), "ab", buffering=0)) \
        if rank == 0 else None
    return Run(cfg, unet_kwargs, device, rank, world, rank == 0, images,
               training.Batches(len(images), cfg.batch_size, cfg.seed, device),
               model, ema, optimizer, scaler, diffusion,
               training.make_train_step(in_precision(forward), model, ema, optimizer, scaler,
                                        diffusion, cfg),
               in_precision(ema), state["step"] if state else 0, ckpt_path, log,
               {"step": state["step"] if state else None}, scorer,
               {"start": time.perf_counter() - (state.get("elapsed", 0.0) if state else 0.0)},
               sizing)


def load_resumed(out):
    """The checkpoint of the run in `out`, for --resume."""
    path = os.path.join(out, checkpoint.FILENAME)
    runtime.check(os.path.isfile(path),
                  f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    return checkpoint.load(path, required=checkpoint.RUN_KEYS + ("optimizer", "scaler", "rng"))


LOG = "log.jsonl"
RUN_FILES = (checkpoint.FILENAME, LOG, "eval.json")  # and samples_*.png: what a run writes


def run_files(directory):
    """The files of a run in `directory`: its checkpoint, log, grids and evaluation."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory)
                  if n in RUN_FILES or (n.startswith("samples_") and n.endswith(".png")))


def check_directory(cfg, state):
    """A new run is refused where another run's files are, unless --overwrite."""
    found = run_files(cfg.out)
    if state is None and found and not cfg.overwrite:
        raise runtime.UserError(
            f"{cfg.out} holds a run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
            "add --resume to continue it, --out DIR for a new run beside it, or --overwrite to "
            "replace it")


def take_directory(cfg, state):
    """Make the run directory ready, under its lock: temporary files of a killed save removed;
    the check of check_directory again (another run may have written since), then with
    --overwrite the old run's files deleted; a resumed run's log cut back to its checkpoint's
    step, so that no step is logged twice."""
    for name in runtime.remove_stale_temporaries(cfg.out):
        print(f"removed {os.path.join(cfg.out, name)}, left by a save that was killed",
              file=sys.stderr)
    check_directory(cfg, state)
    if state is None:
        for name in run_files(cfg.out):
            os.remove(os.path.join(cfg.out, name))
    else:
        truncate_log(os.path.join(cfg.out, LOG), state["step"])


def truncate_log(path, step):
    """Keep the records of log.jsonl up to `step` (the resumed checkpoint's), rewritten atomically;
    a torn last line (a kill during a write) is dropped too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    runtime.atomic_write(path, lambda f: f.write("".join(kept).encode()))


def announce_default(cfg, given, state):
    """The one line that says what the README's command does on a machine without a GPU."""
    if state is None and cfg.minutes and "preset" not in given and "minutes" not in given:
        print(f"no GPU: the {cfg.preset} preset at batch {cfg.batch_size} ({cfg.precision}), "
              f"as many steps as fit in {cfg.minutes:g} minutes; --minutes, --steps and --preset "
              "override this", file=sys.stderr)


def size_run(cfg, model, ema, optimizer, scaler, diffusion, shape, device, world, started):
    """(steps, plan): the number of steps that fit in what is left of cfg.minutes. A few training
    steps and sampling calls are timed on throwaway copies of the model (the run itself is
    untouched), and the grids, checkpoints and scores the run will also make are counted in.
    A CPU's first seconds run faster than its steady state, so where the learning rate of the
    first steps does not depend on the step count (inside the warmup, or a constant rate), the
    loop measures its own steps and fixes the count at step plan["at"] (resize()); until then
    the count is provisional. Every process gets rank 0's answer."""
    step_s, call_s = probe(cfg, model, ema, optimizer, scaler, diffusion, shape, device)
    calls = diffusion.num_timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    grid_s = calls * call_s * cfg.num_samples / cfg.batch_size
    eval_s = cfg.sample_steps * call_s * cfg.eval_samples / cfg.batch_size + 5.0
    plan = {"end": started + cfg.minutes * 60,
            "tail_s": grid_s + 2.0 + (eval_s if cfg.eval_every else 0),  # final grid, save, score
            "extra_s": grid_s / cfg.sample_every + 2.0 / cfg.ckpt_every   # per step, on average
                       + (eval_s / cfg.eval_every if cfg.eval_every else 0)}
    budget = plan["end"] - time.perf_counter() - plan["tail_s"]
    steps = int(budget / (step_s + plan["extra_s"]))
    if world > 1:
        steps = int(runtime.broadcast_int(steps))
    runtime.check(steps >= 1, f"--minutes {cfg.minutes:g} leaves no time for a training step "
                  f"(one takes {step_s:.1f} s here); give more minutes or --steps")
    at = 60 if cfg.lr_schedule == "constant" else min(60, cfg.warmup)
    first = at // 3  # the steps from `first` to `at` are timed
    busy = [k for k in (cfg.sample_every, cfg.ckpt_every, cfg.eval_every)  # a grid, save or
            if k and at // k > first // k]                              # score while timed
    if at >= 15 and steps > 2 * at and not busy:
        plan.update(first=first, at=at)
        print(f"sized to {cfg.minutes:g} minutes: about {steps} steps ({step_s:.2f} s each on a "
              f"probe); the count is fixed at step {at} from the steps' own time", file=sys.stderr)
        return steps, plan
    print(f"sized to {cfg.minutes:g} minutes: {steps} steps ({step_s:.2f} s each, measured); "
          f"--steps {steps} repeats this run", file=sys.stderr)
    return steps, None


def resize(run, step, bar):
    """A --minutes run's step count, from the time of its own steps plan["first"]..plan["at"]
    (see size_run): what is left of the budget over the measured seconds per step."""
    plan, cfg = run.sizing, run.cfg
    if step == plan["first"]:
        plan["t"] = time.perf_counter()
    if step != plan["at"]:
        return
    step_s = (time.perf_counter() - plan["t"]) / (plan["at"] - plan["first"])
    left = plan["end"] - time.perf_counter() - plan["tail_s"]
    steps = step + max(0, int(left / (step_s + plan["extra_s"])))
    if run.world > 1:
        steps = int(runtime.broadcast_int(steps))
    cfg.steps = steps
    bar.total = steps
    bar.refresh()
    plan.clear()  # falsy: done
    if run.main:
        tqdm.write(f"sized to {cfg.minutes:g} minutes: {steps} steps ({step_s:.2f} s each, the "
                   f"run's own steps); --steps {steps} repeats this run", file=sys.stderr)


def probe(cfg, model, ema, optimizer, scaler, diffusion, shape, device, warmup=2, timed=4):
    """(seconds per training step, seconds per sampling call at batch cfg.batch_size), median of
    `timed` after `warmup`, on deep copies; the global RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        parts = copy.deepcopy((model, ema, optimizer, scaler))
        fn = runtime.in_precision(parts[0], cfg.precision, device, cfg.channels_last)
        step = training.make_train_step(fn, *parts, diffusion, dataclasses.replace(cfg, steps=10**9))
        g = torch.Generator(device).manual_seed(0)
        x0 = torch.rand((cfg.batch_size, *shape), generator=g, device=device) * 2 - 1
        t = torch.randint(0, cfg.timesteps, (cfg.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        sample = runtime.in_precision(parts[1], cfg.precision, device, cfg.channels_last)

        def timed_median(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(timed):
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            return float(np.median(times))

        step_s = timed_median(lambda: step(x0, t, noise, 0))
        with torch.no_grad():
            call_s = timed_median(lambda: sample(x0, t))
    return step_s, call_s


def make_scorer(cfg, train_set, device):
    """The --eval-every scorer: the evaluation classifier (trained once per dataset, cached) and
    the test set's features."""
    name = cfg.dataset
    with torch.random.fork_rng():  # the classifier's training leaves the run's generators alone
        test_set = data.load_dataset(name, "test", cfg.data_dir, progress=False)
        classifier, _ = metrics.classifier_for(name, train_set, test_set, device)
    return metrics.Scorer(classifier, test_set.images, cfg.seed)


def score(run, step):
    """The log record of one --eval-every score: cfg.eval_samples DDIM samples of the EMA model
    from a generator of their own (seed + 1), scored; with the seconds it took."""
    cfg, start = run.cfg, time.perf_counter()
    x, _ = sampling.generate(run.ema_network, run.diffusion, run.images.shape[1:],
                             cfg.eval_samples, max(cfg.batch_size, 100), "ddim", cfg.sample_steps,
                             cfg.sample_eta, seed=cfg.seed + 1, device=run.device, progress=False)
    scores = run.scorer.score(imaging.to_uint8(x).cpu().numpy())
    return {"step": step, "kind": "eval", "samples": cfg.eval_samples,
            "sampler": f"ddim-{cfg.sample_steps} eta={cfg.sample_eta:g}", **scores,
            "eval_seconds": time.perf_counter() - start, "time_s": elapsed(run)}


def elapsed(run):
    """Seconds of the run so far, over all its sessions."""
    return time.perf_counter() - run.clock["start"]


# ---- the loop's helpers ---------------------------------------------------------------------

def draw_batch(run, step):
    """This process's slice of the global batch of `step`: (x_0 in [-1, 1], t, ε), from the seed
    and the step alone (exact resume, DDP); also seeds dropout for the step."""
    cfg, local = run.cfg, run.cfg.batch_size // run.world
    mine = slice(run.rank * local, (run.rank + 1) * local)
    idx = run.batches.indices(step)[mine]
    t, noise = training.step_noise(cfg, step, run.images.shape[1:], run.device)
    torch.manual_seed(cfg.seed * 1_000_003 + step * run.world + run.rank)  # dropout
    return imaging.to_model_range(run.images[idx]), t[mine], noise[mine]


class Meter:
    """Sums of the loss, the gradient norm and the loss per quarter of the t range on the device,
    read (one host sync) when a log line is due."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.sums = torch.zeros(3 + 8, device=device)  # loss, grad norm, count, 4 quarters, 4 counts
        self.restart_clock()

    def restart_clock(self):
        self.t_last = time.perf_counter()

    def add(self, losses, grad_norm, t):
        quarter = t * 4 // self.cfg.timesteps
        self.sums[:3] += torch.stack([losses.mean(), grad_norm, torch.ones((), device=self.device)])
        self.sums[3:7].index_add_(0, quarter, losses)
        self.sums[7:].index_add_(0, quarter, torch.ones_like(losses))

    def record(self, step, run):
        """The log line for the steps since the last one; TrainError if the loss went non-finite."""
        stats = self.sums.tolist()
        self.sums.zero_()
        if not math.isfinite(stats[0]):
            raise diverged(run, f"non-finite loss by step {step}")
        now, count = time.perf_counter(), stats[2]
        rate = count * self.cfg.batch_size / (now - self.t_last)
        self.t_last = now
        return {"step": step, "loss": stats[0] / count, "lr": training.lr_at(self.cfg, step - 1),
                "grad_norm": stats[1] / count, "img_per_s": rate,
                **{f"loss_q{q}": stats[3 + q] / stats[7 + q] if stats[7 + q] else None
                   for q in range(4)}}


@contextlib.contextmanager
def stop_on_signals():
    """{"signal": None}, set to the signal's number on Ctrl-C or SIGTERM (the loop then saves and
    stops at the end of its step); the previous handlers come back afterwards."""
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda num, _: stop.update(signal=num))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested(run, stop, step, at_end):
    """Whether to stop after this step. Under DDP the processes agree (an all-reduce every
    --log-every steps), so they all stop at the same step."""
    if run.world == 1:
        return stop["signal"] is not None
    if step % run.cfg.log_every and not at_end:
        return False
    flag = torch.tensor([float(stop["signal"] is not None)], device=run.device)
    dist.all_reduce(flag)
    return flag.item() > 0


def append_log(run, record):
    """One line of log.jsonl (main process), flushed."""
    if run.log is None:
        return
    try:
        run.log.write((json.dumps(record) + "\n").encode())
    except OSError as err:
        raise runtime.write_error(os.path.join(run.cfg.out, LOG), err) from None


def diverged(run, what):
    """The TrainError for a run whose loss or weights went non-finite, saying truly what is kept."""
    kept = (f"the last good checkpoint (step {run.saved['step']}) is kept at {run.ckpt_path}"
            if run.saved["step"] is not None else "no checkpoint had been written yet")
    return TrainError(f"{what}; stopped without saving, {kept} (try a lower --lr, more --warmup "
                      "or --precision fp32)")


def save_checkpoint(run, step):
    """Write the checkpoint of `step` (main process), but never one with a non-finite tensor: every
    process checks its weights, EMA and optimizer state first (they are the same on all)."""
    tensors = [*run.model.parameters(), *run.ema.parameters(),
               *(v for s in run.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point())]
    if not torch.stack([t.float().abs().max() for t in tensors if t.numel()]).isfinite().all():
        raise diverged(run, f"non-finite weights at step {step}")
    if run.main:
        checkpoint.save(run.ckpt_path, {
            "step": step, "config": {**dataclasses.asdict(run.cfg), "unet": run.unet_kwargs},
            "model": run.model.state_dict(), "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "elapsed": elapsed(run)})
        run.saved["step"] = step


def write_grid(run, tag, progress):
    """samples_<tag>.png: cfg.num_samples images of the EMA model with the grid sampler, drawn from
    a generator of their own (the training run is the same with or without grids)."""
    cfg = run.cfg
    x, _ = sampling.generate(run.ema_network, run.diffusion, run.images.shape[1:],
                             cfg.num_samples, cfg.num_samples, cfg.sampler, cfg.sample_steps,
                             cfg.sample_eta, seed=cfg.seed, device=run.device, progress=progress)
    path = os.path.join(cfg.out, f"samples_{tag}.png")
    imaging.save_grid(path, x)
    return path


def parse_args(argv=None):
    """{Config field: value} for the flags given (see --help)."""
    return training.parse_args(argv, description=__doc__.split("\n\n")[0])


def run_main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    runtime.main(run_main)
