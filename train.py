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
import json
import math
import os
import signal
import sys
import time
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import imaging
import runtime
import sampling
import training


class TrainError(runtime.UserError):
    """A training run that cannot go on (a non-finite loss)."""


def train(given, progress=True):
    """Ho et al.'s Algorithm 1 for the flags in `given` ({Config field: value});
    returns (cfg, model, ema)."""
    run = prepare(given)
    cfg, step = run.cfg, run.start_step
    meter = Meter(cfg, run.device)
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and run.main), unit="step",
               dynamic_ncols=True)
    run.model.train()
    with stop_on_signals() as stop, open_log(run) as log, bar:
        while step < cfg.steps:
            x0, t, noise = draw_batch(run, step)           # x_0 ~ q(x_0), t ~ U{1..T}, ε ~ N(0, I)
            losses, grad_norm = run.train_step(x0, t, noise, step)  # ∇_θ ‖ε - ε_θ(x_t, t)‖², Adam
            step += 1
            meter.add(losses, grad_norm, t)
            bar.update(1)

            at_end = step == cfg.steps
            stopping = stop_requested(run, stop, step, at_end)
            if step % cfg.log_every == 0 or at_end or stopping:
                record = meter.record(step, run.ckpt_path)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if run.main and (step % cfg.ckpt_every == 0 or at_end or stopping):
                save_checkpoint(run, step)
                meter.restart_clock()  # img/s counts training time only
            if run.main and step % cfg.sample_every == 0 and not (at_end or stopping):
                write_grid(run, f"{step:07d}", progress=False)
                meter.restart_clock()
            if stopping:
                if run.main:
                    print(f"\nstopped by a signal at step {step}; checkpoint saved to "
                          f"{run.ckpt_path}; continue with --resume --out {cfg.out}", file=sys.stderr)
                return cfg, run.model, run.ema
    if run.main:
        path = write_grid(run, "final", progress=progress)
        print(f"done: {step} steps; checkpoint {run.ckpt_path}; samples {path}", file=sys.stderr)
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


def prepare(given):
    """Check every flag, then load the data, build the model and restore a resumed run."""
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
    if rank == 0:
        runtime.check_writable_dir(cfg.out)
    if train_set is None:
        train_set = data.load_dataset(dataset, "train", cfg.data_dir, progress=rank == 0)
    if rank == 0:
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
    # DDP compares a gradient's strides literally; for 1x1 kernels the strides of the size-1 dims
    # differ between oneDNN's gradient and the bucket while the memory layout is the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(net) if cfg.compile else net
    in_precision = lambda network: runtime.in_precision(network, cfg.precision, device,
                                                        cfg.channels_last)
    images = torch.from_numpy(train_set.images).to(device)
    return Run(cfg, unet_kwargs, device, rank, world, rank == 0, images,
               training.Batches(len(images), cfg.batch_size, cfg.seed, device),
               model, ema, optimizer, scaler, diffusion,
               training.make_train_step(in_precision(forward), model, ema, optimizer, scaler,
                                        diffusion, cfg),
               in_precision(ema), state["step"] if state else 0, ckpt_path)


def load_resumed(out):
    """The checkpoint of the run in `out`, for --resume."""
    path = os.path.join(out, checkpoint.FILENAME)
    runtime.check(os.path.isfile(path),
                  f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    return checkpoint.load(path, required=checkpoint.RUN_KEYS + ("optimizer", "scaler", "rng"))


def announce_default(cfg, given, state):
    """The one line that says what the README's command does on a machine without a GPU."""
    if state is None and cfg.preset and "preset" not in given and "steps" not in given \
            and cfg.steps == training.CPU_STEPS:
        print(f"no GPU: training the {cfg.preset} preset for {cfg.steps} steps at batch "
              f"{cfg.batch_size} ({cfg.precision}); --preset and --steps override this",
              file=sys.stderr)


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

    def record(self, step, ckpt_path):
        """The log line for the steps since the last one; TrainError if the loss went non-finite."""
        stats = self.sums.tolist()
        self.sums.zero_()
        if not math.isfinite(stats[0]):
            kept = (f"the last good checkpoint {ckpt_path} is kept"
                    if os.path.exists(ckpt_path) else "no checkpoint had been written yet")
            raise TrainError(f"non-finite loss by step {step}; stopped without saving, {kept} "
                             "(try a lower --lr or --precision fp32)")
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


@contextlib.contextmanager
def open_log(run):
    """log.jsonl of the run directory, appended to, on the main process; None elsewhere."""
    if not run.main:
        yield None
        return
    os.makedirs(run.cfg.out, exist_ok=True)
    with open(os.path.join(run.cfg.out, "log.jsonl"), "a") as f:
        yield f


def save_checkpoint(run, step):
    checkpoint.save(run.ckpt_path, {
        "step": step, "config": {**dataclasses.asdict(run.cfg), "unet": run.unet_kwargs},
        "model": run.model.state_dict(), "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state()}})


def write_grid(run, tag, progress):
    """samples_<tag>.png: cfg.num_samples images of the EMA model with the grid sampler, drawn from
    a generator of their own (the training run is the same with or without grids)."""
    cfg = run.cfg
    x, _ = sampling.generate(run.ema_network, run.diffusion, run.images.shape[1:],
                             cfg.num_samples, cfg.num_samples, cfg.sampler, cfg.sample_steps,
                             seed=cfg.seed, device=run.device, progress=progress)
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
