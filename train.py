"""Train a DDPM: `python train.py --dataset mnist`.

Writes to runs/<dataset>/ (or --out): ckpt.pt (model, EMA, optimizer, step, config), log.jsonl
(one line of metrics every --log-every steps) and sample grids samples_<step>.png, then
samples_final.png. Ctrl-C or SIGTERM writes a checkpoint and exits; --resume continues a run
exactly where it stopped.

Several GPUs or machines: `torchrun --nproc_per_node=N train.py ...` trains with
DistributedDataParallel; --batch-size is the global batch, split evenly across the processes.
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: hardware.py says why
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import budget
import checkpoint
import cli
import config
import data
import fid
import files
import hardware
import imaging
import metrics
import optim
import phema
import rundir
import sampling
import userdata


class TrainError(cli.UserError):
    """A training run that cannot go on (a non-finite loss)."""


def train(given, progress=True, started=None):
    """Ho et al.'s Algorithm 1 for the flags in `given` ({Flags field or --resume/--overwrite:
    value}); --minutes counts from `started` (a perf_counter() reading; default: when this
    process started). Returns (cfg, model, ema); raises cli.Stopped after saving when a signal
    stops it."""
    started = budget.process_started() if started is None else started
    # The flags, checked before any data is read; the processes and the device.
    flags, invocation = config.split_invocation(given)
    config.validate(flags, resuming=invocation["resume"])
    data.check_name(flags.get("dataset", config.Flags.dataset))
    rank, world, local_rank = hardware.setup_distributed(flags.get("device", config.Flags.device))
    device = hardware.pick_device(flags.get("device", config.Flags.device), local_rank)
    out = flags.get("out") or config.default_out(flags.get("dataset", config.Flags.dataset))
    # A resumed run's checkpoint; the data's shape (a user's file or folder is read for it).
    state = load_resumed(out) if invocation["resume"] else None
    saved = state["config"] if state else None
    dataset = flags.get("dataset", saved["train"]["dataset"] if saved else config.Flags.dataset)
    userdata.check_arguments(flags, dataset)
    if dataset.startswith("folder:") and flags.get("image_size") is None \
            and (saved["train"] if saved else {}).get("image_size") is None:
        flags = {**flags, **chosen_side(dataset, device, rank)}
    shape, train_set = data.image_shape(dataset), None
    if shape is None:
        train_set = load_training_set(dataset, {**(saved["train"] if saved else {}), **flags},
                                      flags.get("data_dir"), rank)
        shape = train_set.images.shape[1:]
    classes = train_set.num_classes if train_set else data.num_classes(dataset)
    # The configuration, every automatic choice made once, and the diffusion.
    cfg, diffusion = config.settle({**flags, "out": out}, device, shape, classes, saved)
    opts = cfg.train
    check_tracked(opts, state)
    check_processes(opts, world, shape, train_set, dataset)
    if opts.fid and rank == 0:
        fid.weights_path()  # found or fetched before the run directory is touched
    if rank == 0:
        files.check_writable_dir(opts.out)
        rundir.refuse_existing(opts.out, state is not None, invocation["overwrite"])
    if train_set is None:
        train_set = load_training_set(dataset, dataclasses.asdict(opts), opts.data_dir, rank)
    if state is not None:
        check_resumed_data(state, train_set, dataset, speak=rank == 0)
    cfg.class_names = class_names_of(train_set)
    if cfg.train.class_cond:  # what the samplers draw the classes from, unless asked for some
        cfg.class_counts = np.bincount(train_set.labels, minlength=cfg.net["num_classes"]).tolist()
    if rank == 0:
        describe_data(dataset, train_set, state)
    with contextlib.ExitStack() as held:  # the run directory's lock and the log, until the end
        if rank == 0:
            held.enter_context(files.DirectoryLock(opts.out))
            rundir.take(opts.out, state["step"] if state else None, invocation["overwrite"])
            announce_default(cfg, flags, state)
        # The model, restored when resuming; the scorer of --eval-every.
        parts = optim.build(opts, cfg.net, device)
        tracked = optim.track(parts[1]) if opts.ema_snapshots else ()  # --ema-snapshots
        if state is not None:
            restore(parts, tracked, state, os.path.join(opts.out, rundir.CHECKPOINT))
        scorer = make_scorer(opts, train_set, device) if opts.eval_every and rank == 0 else None
        # The budget: a --minutes run's step count, measured on copies of the model (a resumed
        # run stopped before its count was fixed goes on sizing, in the time it has left).
        plan, start = None, state["step"] if state else 0
        before_s = state.get("elapsed", 0.0) if state else 0.0  # the seconds it has run
        if still_sizing(state, flags):
            opts.steps = None
        if opts.steps is None:
            plan = budget.plan(opts, parts, diffusion, shape, device, world,
                               started - before_s,
                               speak=rank == 0, start=start,
                               score_s=scorer.seconds_per_image() * opts.eval_samples
                               if opts.fid and scorer else 0.0)
            opts.steps = plan.steps
        plan = plan if plan is not None and not plan.fixed else None
        model, ema, optimizer, scaler = parts
        trainee = optim.Trainee(model, wrap(model, opts, device, world), ema, optimizer, scaler,
                                tracked)
        run = Run(cfg, diffusion, trainee, device, rank, world,
                  Data.on(train_set, opts, device),
                  held.enter_context(rundir.Log(opts.out)) if rank == 0 else None, scorer,
                  time.perf_counter() - before_s,
                  state["step"] if state else None)
        loop(run, start, plan, progress)
    return cfg, trainee.model, trainee.ema


def loop(run, step, plan, progress):
    """Algorithm 1 from `step` to the last, with the log, checkpoints, grids and scores due."""
    opts = run.cfg.train
    meter = Meter(opts, run.diffusion.num_timesteps, run.device)
    run.trainee.model.train()
    with stop_on_signals() as stop, tqdm(total=opts.steps, initial=step, unit="step",
                                        disable=not (progress and run.writes),
                                        dynamic_ncols=True) as bar:
        while step < opts.steps:
            x0, y, t, noise = draw_batch(run, step)  # x_0, y ~ q(x_0, y), t ~ P(t), ε ~ N(0, I)
            losses, grad_norm = optim.train_step(  # ∇ ‖ε - ε_θ(x_t, t[, y, x̂_0])‖², Adam, EMA
                run.trainee, run.diffusion, opts, x0, t, noise, step, y, self_cond_share(run, step))
            step += 1
            meter.add(losses, grad_norm, t)
            bar.update(1)
            if plan is not None:
                plan = remeasure(plan, opts, step, bar)

            at_end = step == opts.steps
            stopping = stop_requested(run, stop, step, at_end)
            if step % opts.log_every == 0 or at_end or stopping:
                record = {**meter.record(step, run), "time_s": elapsed(run)}
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                append_log(run, record)
            if step % opts.ckpt_every == 0 or at_end or stopping:
                with aside(plan, meter, "save"):
                    save_checkpoint(run, step, sizing=plan is not None)
            if run.writes and opts.ema_snapshots and (step % opts.ema_snapshots == 0 or at_end):
                with aside(plan, meter, "snapshot"):
                    write_snapshots(run, step)
            if run.writes and step % opts.sample_every == 0 and not (at_end or stopping):
                with aside(plan, meter, "grid"):
                    write_grid(run, f"{step:07d}", progress=False)
            if run.scorer and (step % opts.eval_every == 0 or at_end) and not stopping:
                with aside(plan, meter, "score"):
                    append_log(run, score(run, step))
            if stopping:
                raise cli.Stopped(stop["signal"], f"stopped by signal {stop['signal']} at "
                                  f"step {step}; checkpoint saved to {run.ckpt_path}; "
                                  f"continue with --resume --out {opts.out}")
    if run.writes:  # the checkpoint is written: Ctrl-C here only stops the grid
        path = write_grid(run, "final", progress=progress)
        print(f"done: {step} steps; checkpoint {run.ckpt_path}; samples {path}",
              file=sys.stderr)


# ---- set-up ---------------------------------------------------------------------------------

class Data(NamedTuple):
    """The training set on the device and the order a step draws it in."""
    images: torch.Tensor         # uint8 [N, C, H, W]
    labels: Optional[torch.Tensor]  # int64 [N], or None
    batches: optim.Batches

    @classmethod
    def on(cls, dataset, opts, device):
        labels = None if dataset.labels is None else torch.from_numpy(dataset.labels).to(device)
        return cls(torch.from_numpy(dataset.images).to(device), labels,
                   optim.Batches(len(dataset.images), opts.batch_size, opts.seed, device))


@dataclass
class Run:
    """What the loop and its helpers share, made once by train()."""
    cfg: config.Config
    diffusion: object
    trainee: optim.Trainee       # what a step updates
    device: torch.device
    rank: int
    world: int
    data: Data
    log: Optional[rundir.Log]    # the writing process's log.jsonl
    scorer: object               # metrics.Scorer for --eval-every (writing process), else None
    clock_start: float           # perf_counter() at the run's step 0 (over resumes)
    saved_step: Optional[int]    # the step of the last checkpoint written

    @property
    def writes(self):
        """Rank 0: the process that writes files."""
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.train.out, rundir.CHECKPOINT)


def check_processes(opts, world, shape, train_set, dataset):
    """The batch splits evenly over the processes; --eval-every has data it can score (the
    classifier's: 28x28 with labels; FID's: any)."""
    cli.check(opts.batch_size % world == 0,
              f"--batch-size {opts.batch_size} must divide evenly over {world} processes")
    scorable = (train_set.labels is not None and shape[1:] == (28, 28)) if train_set \
        else shape[1:] == (28, 28)
    cli.check(not opts.eval_every or scorable or opts.fid,
              f"--eval-every scores 28x28 datasets with labels with the classifier; {dataset} is "
              "not one: add --fid to score it by FID")
    cli.check(not opts.fid or opts.eval_every, "--fid scores the run every --eval-every steps; "
              "give --eval-every N (or use evaluate.py --fid after training)")


def chosen_side(dataset, device, rank):
    """{"image_size": side} for a folder whose images are not all one square size (several
    sizes, or one that is not square), chosen for the device and said in one line; stored in the
    checkpoint, so that --resume and evaluate.py read the folder at the same size. {} else."""
    if not userdata.needs_size(dataset[len("folder:"):]):
        return {}
    side = userdata.auto_side(device.type)
    if rank == 0:
        print(f"{dataset}: the images are not all one square size; training at {side}x{side} "
              f"(each centre-cropped and resized), the side chosen for this {device.type}; give "
              "--image-size N to change it", file=sys.stderr)
    return {"image_size": side}


def check_resumed_data(state, train_set, dataset, speak):
    """A resumed run's data against its checkpoint's: its classes must be the same
    (config.check_classes_unchanged); a training set that gained or lost images is said in one
    line."""
    config.check_classes_unchanged(state["config"], class_names_of(train_set), dataset)
    before, now = state.get("train_images"), len(train_set.images)
    if speak and before is not None and before != now:
        print(f"{dataset} now holds {now} training images, {before} when the checkpoint was "
              "written; the run goes on with the images as they are now", file=sys.stderr)


def still_sizing(state, flags):
    """Whether a resumed --minutes run was stopped before its step count was fixed (and no
    --steps is given now): it goes on sizing, from the time it has left, until the count is
    fixed."""
    return state is not None and state.get("sizing", False) and "steps" not in flags


def describe_data(dataset, train_set, state):
    """A user's data: its classes; a new run on a small folder: the warning that it will copy."""
    if train_set.class_names and data.user_data(dataset):
        print(f"{train_set.num_classes} classes: " + ", ".join(
            f"{i} {n}" for i, n in enumerate(train_set.class_names)), file=sys.stderr)
    if state is None and dataset.startswith("folder:") and len(train_set.images) < SMALL:
        print(f"{dataset} holds {len(train_set.images)} training images: a network of this size "
              "will likely learn to copy them; check with `python evaluate.py --nearest 100`",
              file=sys.stderr)


SMALL = 1000  # fewer training images than this: a model will likely copy them (said once)


def class_names_of(dataset):
    """The class names of a labelled dataset, in label order (numbers where the data names none);
    None without labels."""
    if dataset.labels is None:
        return None
    return list(dataset.class_names or map(str, range(dataset.num_classes)))


def load_training_set(dataset, settings, data_dir, rank):
    """The training split, a folder read with the options in `settings` (flags or a config)."""
    return data.load_dataset(dataset, "train", data_dir, progress=rank == 0,
                             folder=userdata.options_of(settings), hint=rank == 0)


def load_resumed(out):
    """The checkpoint of the run in `out`, for --resume."""
    path = os.path.join(out, rundir.CHECKPOINT)
    cli.check(os.path.isfile(path),
              f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    return checkpoint.load(path, required=checkpoint.RUN_KEYS + ("optimizer", "scaler", "rng"))


def restore(parts, tracked, state, path):
    """The model, EMA, optimizer, scaler, the power-function EMAs of --ema-snapshots (`tracked`)
    and torch's generator as the checkpoint has them."""
    model, ema, optimizer, scaler = parts
    checkpoint.load_weights(model, state["model"], path)
    checkpoint.load_weights(ema, state["ema"], path)
    for power in tracked:
        held = state[checkpoint.TRACKED][checkpoint.tracked_key(power.sigma_rel)]
        checkpoint.load_weights(power.average, held, path)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])


def check_tracked(opts, state):
    """--ema-snapshots on a resumed run needs the power-function EMAs in its checkpoint: each
    averages the run from its first step, so none can start mid-run."""
    if not (opts.ema_snapshots and state is not None):
        return
    held = state.get(checkpoint.TRACKED) or {}
    cli.check(all(checkpoint.tracked_key(p) in held for p in phema.PROFILES),
              f"--ema-snapshots: the run was trained to step {state['step']} without its "
              "power-function EMAs, which average the run from its first step and cannot start "
              "mid-run; resume without --ema-snapshots (or with --ema-snapshots 0), or start a new "
              "--out with it")


def wrap(model, opts, device, world):
    """The model as the loss calls it: under DDP for several processes, compiled if asked, in
    the run's precision and memory layout."""
    # DDP compares a gradient's strides literally; for 1x1 kernels the strides of the size-1 dims
    # differ between oneDNN's gradient and the bucket while the memory layout is the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(net) if opts.compile else net
    return hardware.as_called(forward, opts.precision, device, opts.channels_last)


def announce_default(cfg, given, state):
    """The one line that says what the README's command does on a machine without a GPU."""
    opts = cfg.train
    if state is None and opts.minutes and "preset" not in given and "minutes" not in given:
        print(f"no GPU: the {opts.preset} preset at batch {opts.batch_size} ({opts.precision}), "
              f"as many steps as fit in {opts.minutes:g} minutes; --minutes, --steps and --preset "
              "override this", file=sys.stderr)


def remeasure(plan, opts, step, bar):
    """A --minutes run measures its own steps: it re-estimates its count after every step until
    the count starts to matter, and fixes it there (budget.py). Returns the plan, or None once
    the count is fixed."""
    fixed = plan.measure(step)
    opts.steps = plan.steps
    if fixed is not None or abs(bar.total - opts.steps) > 0.005 * bar.total:
        bar.total = opts.steps
        bar.refresh()
    return None if fixed is not None else plan


@contextlib.contextmanager
def aside(plan, meter, kind):
    """A save, grid or score (`kind`) beside the training steps: img/s counts training time
    only, and a --minutes run still sizing its count learns what the work cost (budget.py)."""
    start = time.perf_counter()
    yield
    if plan is not None:
        plan.aside(kind, time.perf_counter() - start)
    meter.restart_clock()


def make_scorer(opts, train_set, device):
    """The --eval-every scorer: with --fid, the FID Inception network and the training set's
    statistics (fid.Scorer, cached); else the evaluation classifier (trained once per dataset,
    cached) and the test set's features."""
    name = opts.dataset
    if opts.fid:  # against as many training images as samples: FID at N, both sides
        scorer = fid.Scorer(fid.weights_path(), name, train_set.images, device,
                            reference_max=opts.eval_samples)  # a bar while the reference is made
        scorer.progress = False  # none beside the training's own bar
        return scorer
    with torch.random.fork_rng():  # the classifier's training leaves the run's generators alone
        test_set = data.load_dataset(name, "test", opts.data_dir, progress=False,
                                     folder=userdata.options_of(dataclasses.asdict(opts)))
        classifier, _ = metrics.classifier_for(name, train_set, test_set, device)
    return metrics.Scorer(classifier, test_set.images, opts.seed)


def score(run, step):
    """The log record of one --eval-every score: cfg.eval_samples DDIM samples of the EMA model
    from a generator of their own (seed + 1), scored; with the seconds it took. A conditional
    model draws its classes as sample.py does by default (as often as the training labels have
    each, unguided) and is scored on its class accuracy too."""
    cfg, start = run.cfg.train, time.perf_counter()
    labels = drawn_classes(run.cfg, cfg.eval_samples)
    n = cfg.eval_samples
    x, _ = sampling.generate(ema_network(run), run.diffusion, run.data.images.shape[1:],
                             n, max(cfg.batch_size, 100), "ddim", cfg.sample_steps,
                             cfg.sample_eta, seed=cfg.seed + 1, device=run.device, progress=False,
                             labels=labels, guidance=0.0, null_label=run.cfg.net.get("num_classes"),
                             self_cond=run.cfg.net.get("self_cond", False))
    samples = imaging.to_uint8(x).cpu().numpy()
    scores = {"fid": run.scorer.score(samples)} if cfg.fid else \
        run.scorer.score(samples, None if labels is None else labels.numpy())
    return {"step": step, "kind": "eval", "samples": n,
            "sampler": sampling.describe("ddim", cfg.sample_steps, cfg.sample_eta, run.diffusion),
            **({} if labels is None else {"guidance": 0.0}),
            **scores, "eval_seconds": time.perf_counter() - start, "time_s": elapsed(run)}


def drawn_classes(cfg, n):
    """The labels of n samples of a class-conditional run as sample.py draws them by default
    (from the seed, as often as the training labels have each class; sorted, so a grid's rows
    go by class); None for an unconditional run."""
    config = {"net": cfg.net, "class_counts": cfg.class_counts}
    return sampling.class_labels(None, n, config, cfg.train.seed, counts="total")[0]


def ema_network(run):
    """The EMA model as the samplers call it."""
    opts = run.cfg.train
    return hardware.as_called(run.trainee.ema, opts.precision, run.device, opts.channels_last)


def elapsed(run):
    """Seconds of the run so far, over all its sessions."""
    return time.perf_counter() - run.clock_start


# ---- the loop's helpers ---------------------------------------------------------------------

def draw_batch(run, step):
    """This process's slice of the global batch of `step`: (x_0 in [-1, 1], flipped left-right
    where --hflip draws it; its labels for a class-conditional run, the null label where
    --cond-drop draws it, else None; t; ε), from the seed and the step alone (exact resume,
    DDP); also seeds dropout for the step."""
    cfg, mine = run.cfg.train, my_share(run)
    idx = run.data.batches.indices(step)[mine]
    t, noise = optim.step_noise(cfg, step, run.data.images.shape[1:], run.device, run.diffusion)
    torch.manual_seed(optim.stream_seed(cfg.seed, optim.DROPOUT, step, run.rank))  # dropout
    x0 = imaging.to_model_range(run.data.images[idx])
    if cfg.hflip:  # each image of the global batch flipped or not, by (seed, step, position)
        x0 = torch.where(optim.step_flips(cfg, step, run.device)[mine, None, None, None],
                         x0.flip(-1), x0)
    y = None
    if cfg.class_cond:
        null = run.cfg.net["num_classes"]  # the index the network keeps for "no class"
        y = torch.where(optim.step_label_drops(cfg, step, run.device)[mine], null,
                        run.data.labels[idx])
    return x0, y, t[mine], noise[mine]


def self_cond_share(run, step):
    """This process's slice of the examples of `step` trained self-conditioned (--self-cond,
    optim.step_self_cond), or None for a network without self-conditioning."""
    if not run.cfg.net.get("self_cond"):
        return None
    return optim.step_self_cond(run.cfg.train, step)[my_share(run)]


def my_share(run):
    """This process's slice of the global batch (all of it in a single process)."""
    local = run.cfg.train.batch_size // run.world
    return slice(run.rank * local, (run.rank + 1) * local)


class Meter:
    """Sums of the loss, the gradient norm and the loss per quarter of the t range on the device,
    read (one host sync) when a log line is due."""

    def __init__(self, cfg, timesteps, device):
        self.cfg, self.timesteps, self.device = cfg, timesteps, device
        self.sums = torch.zeros(3 + 8, device=device)  # loss, grad norm, count, 4 quarters, 4 counts
        self.restart_clock()

    def restart_clock(self):
        self.t_last = time.perf_counter()

    def add(self, losses, grad_norm, t):
        quarter = t * 4 // self.timesteps
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
        return {"step": step, "loss": stats[0] / count, "lr": optim.lr_at(self.cfg, step - 1),
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
    if step % run.cfg.train.log_every and not at_end:
        return False
    flag = torch.tensor([float(stop["signal"] is not None)], device=run.device)
    dist.all_reduce(flag)
    return flag.item() > 0


def append_log(run, record):
    """One line of log.jsonl (the writing process)."""
    if run.log is not None:
        run.log.append(record)


def diverged(run, what):
    """The TrainError for a run whose loss or weights went non-finite, saying truly what is kept."""
    kept = (f"the last good checkpoint (step {run.saved_step}) is kept at {run.ckpt_path}"
            if run.saved_step is not None else "no checkpoint had been written yet")
    return TrainError(f"{what}; stopped without saving, {kept} (try a lower --lr, more --warmup "
                      "or --precision fp32)")


def save_checkpoint(run, step, sizing=False):
    """Write the checkpoint of `step` (the writing process), but never one with a non-finite
    tensor: every process checks its weights, EMA and optimizer state first (they are the same
    on all). `sizing`: a --minutes run whose count is not fixed yet (a resume goes on sizing)."""
    model, ema, optimizer = run.trainee.model, run.trainee.ema, run.trainee.optimizer
    tracked = run.trainee.tracked
    tensors = [*model.parameters(), *ema.parameters(),
               *(p for power in tracked for p in power.average.parameters()),
               *(v for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point())]
    if not torch.stack([t.float().abs().max() for t in tensors if t.numel()]).isfinite().all():
        raise diverged(run, f"non-finite weights at step {step}")
    if run.writes:
        checkpoint.save(run.ckpt_path, {
            "step": step,
            "config": dataclasses.asdict(run.cfg),
            "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": run.trainee.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "elapsed": elapsed(run),
            "train_images": len(run.data.images), "sizing": sizing,
            **({checkpoint.TRACKED: {checkpoint.tracked_key(p.sigma_rel): p.average.state_dict()
                                     for p in tracked}} if tracked else {})})
        run.saved_step = step


def write_snapshots(run, step):
    """--ema-snapshots: each power-function EMA's weights at `step` (a state dict, nothing else)
    to <out>/ema/<σ_rel>-<step>.pt, atomically."""
    for power in run.trainee.tracked:
        path = os.path.join(run.cfg.train.out, rundir.SNAPSHOTS,
                            rundir.snapshot_name(power.sigma_rel, step))
        weights = {k: v.detach().cpu() for k, v in power.average.state_dict().items()}
        files.write_file(path, lambda f: torch.save(weights, f))


def write_grid(run, tag, progress):
    """samples_<tag>.png: cfg.num_samples images of the EMA model with the grid sampler, drawn from
    a generator of their own (the training run is the same with or without grids); for a
    class-conditional run its classes drawn as sample.py draws them by default (unguided, so a
    grid costs what an unconditional one does)."""
    cfg = run.cfg.train
    labels, n = drawn_classes(run.cfg, cfg.num_samples), cfg.num_samples
    x, _ = sampling.generate(ema_network(run), run.diffusion, run.data.images.shape[1:],
                             n, n, cfg.sampler, cfg.sample_steps,
                             cfg.sample_eta, seed=cfg.seed, device=run.device, progress=progress,
                             labels=labels, guidance=0.0, null_label=run.cfg.net.get("num_classes"),
                             self_cond=run.cfg.net.get("self_cond", False))
    path = os.path.join(cfg.out, rundir.grid_name(tag))
    imaging.save_grid(path, x)
    return path


def parse_args(argv=None):
    """{Flags field or --resume/--overwrite: value} for the flags given (see --help)."""
    return config.parse_args(argv, description=__doc__.split("\n\n")[0])


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    cli.run_script(main)
