"""Train a DDPM: `python train.py --dataset mnist`.

Writes to runs/<dataset>/ (or --out): ckpt.pt (model, EMA, optimizer, step, config), log.jsonl
(one line of metrics every --log-every steps) and sample grids samples_<step>.png. Ctrl-C or
SIGTERM writes a checkpoint and exits; --resume continues a run exactly where it stopped.

Several GPUs or machines: `torchrun --nproc_per_node=N train.py ...` trains with
DistributedDataParallel; --batch-size is the global batch, split evenly across the processes.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import ddpm
import unet

CPU_STEPS = 3000  # no --preset on a CPU: mnist-small for this many steps (about 20 min, 2 cores)
GPU_STEPS = 30000


@dataclass
class Config:
    """Training configuration; defaults follow Ho et al. 2020 (App. B) where it gives one."""
    dataset: str = "mnist"
    data_dir: str = None
    preset: str = None             # None: mnist-small on a CPU, mnist (or cifar10) on a GPU
    base_channels: int = None      # None: the preset's
    channel_mult: tuple = None
    num_res_blocks: int = None
    attn_resolutions: tuple = None
    dropout: float = None
    steps: int = None              # None: CPU_STEPS on a CPU without --preset, else GPU_STEPS
    batch_size: int = None         # global batch; None: 64 on a CPU, 128 (Ho) on a GPU
    lr: float = None               # None: 1e-3 for mnist-small, 2e-4 (Ho) otherwise
    warmup: int = None             # linear lr warmup steps; None: 200 for mnist-small, 5000 (Ho)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999      # with warmup: min(decay, (1 + step) / (10 + step))
    schedule: str = "linear"
    timesteps: int = 1000
    loss_type: str = "simple"
    mean_type: str = "eps"
    var_type: str = "fixed_large"  # Ho's CIFAR-10 sampler
    precision: str = "auto"        # fp32 | bf16 | fp16 (autocast); auto: bf16 where supported
    compile: bool = False
    channels_last: bool = None     # None: on for CUDA
    seed: int = 0
    out: str = None                # None: runs/<dataset>
    resume: bool = False
    device: str = "auto"
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    num_samples: int = 64          # images in each sample grid


ARCH_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")
# What --resume may not change: the model, the diffusion and the data it was trained on.
FIXED_ON_RESUME = ("dataset", "preset", "schedule", "timesteps", "loss_type", "mean_type",
                   "var_type", "seed", "batch_size") + ARCH_FIELDS


class TrainError(Exception):
    """A problem to report in one line (bad flags, non-finite loss, unusable checkpoint)."""


# ---- configuration --------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <what is wrong>`, exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    """Command-line flags from the Config fields; returns {field: value} for the flags given."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction)
        elif f.type is tuple:
            p.add_argument(flag, type=int, nargs="+", help="space-separated integers")
        else:
            kind = {"int": int, "float": float}.get(getattr(f.type, "__name__", f.type), str)
            p.add_argument(flag, type=kind)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}


def resolve_config(given, device, image_shape, saved=None):
    """Fill the automatic choices. `saved` is the config of the run being resumed."""
    if saved is not None:
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if changed:
            raise TrainError(f"--resume cannot change {', '.join(changed)} (the checkpoint has "
                             f"{', '.join(f'{k}={saved[k]}' for k in changed)}); start a new --out")
        cfg = Config(**{**{k: v for k, v in saved.items() if k != "unet"}, **given})
        _validate(cfg)
        return cfg, dict(saved["unet"])
    cfg = Config(**given)
    cpu = device.type == "cpu"
    C, H, W = image_shape
    if cfg.preset is None:
        cfg.preset = "cifar10" if (H == 32 and C == 3 and not cpu) else ("mnist-small" if cpu else "mnist")
    if cfg.preset not in unet.PRESETS:
        raise TrainError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(unet.PRESETS)}")
    small = cfg.preset == "mnist-small"
    if cfg.steps is None:
        cfg.steps = CPU_STEPS if (cpu and "preset" not in given) else GPU_STEPS
    cfg.batch_size = cfg.batch_size or (64 if cpu else 128)
    cfg.lr = cfg.lr or (1e-3 if small else 2e-4)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (200 if small else 5000)
    if cfg.channels_last is None:
        cfg.channels_last = device.type == "cuda"
    if cfg.precision == "auto":
        cfg.precision = "bf16" if bf16_is_fast(device) else "fp32"
    cfg.out = cfg.out or default_out(cfg.dataset)
    kwargs = {**unet.PRESETS[cfg.preset],
              **{k: getattr(cfg, k) for k in ARCH_FIELDS if getattr(cfg, k) is not None}}
    if (H, W) != (kwargs["image_size"],) * 2 or C != kwargs["in_channels"]:
        if H != W:
            raise TrainError(f"images must be square, got {H}x{W}")
        levels = len(kwargs["channel_mult"])
        if "attn_resolutions" not in given:  # attention at the coarsest level
            kwargs["attn_resolutions"] = (H // 2 ** (levels - 1),)
        kwargs.update(in_channels=C, image_size=H)
    kwargs["out_channels"] = 2 * C if cfg.var_type == "learned_range" else C
    for k in ARCH_FIELDS:
        setattr(cfg, k, kwargs[k])
    _validate(cfg)
    return cfg, kwargs


def default_out(dataset):
    """runs/<dataset>, with the ':' and '/' of an npz:PATH dataset made safe for a directory name."""
    return os.path.join("runs", dataset.replace(":", "_").replace("/", "_"))


def _validate(cfg):
    checks = [(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
              (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
              (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
              (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
              (0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
              (cfg.grad_clip > 0, f"--grad-clip must be > 0, got {cfg.grad_clip}"),
              (cfg.precision in ("fp32", "bf16", "fp16"),
               f"--precision must be fp32, bf16, fp16 or auto, got {cfg.precision}"),
              (min(cfg.log_every, cfg.sample_every, cfg.ckpt_every) >= 1,
               "--log-every, --sample-every and --ckpt-every must be >= 1"),
              (cfg.num_samples >= 1, f"--num-samples must be >= 1, got {cfg.num_samples}")]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)


def bf16_is_fast(device):
    """bf16 autocast pays on CUDA and on CPUs with bf16 matrix units (AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or \
        _cpuinfo_has("amx_bf16") or _cpuinfo_has("avx512_bf16")


def _cpuinfo_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def pick_device(name, local_rank):
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


# ---- data -----------------------------------------------------------------------------------

class Batches:
    """The global batch of step s, without state: the data stream is the concatenation of one
    random permutation per epoch (seeded by (seed, epoch)), and step s takes positions
    [s B, (s+1) B). Every process computes the same global batch and keeps its own slice."""

    def __init__(self, n, batch_size, seed, device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self._epoch, self._perm = None, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).to(self.device)
        return self._perm

    def indices(self, step):
        start, parts = step * self.batch_size, []
        while sum(len(p) for p in parts) < self.batch_size:
            epoch, offset = divmod(start, self.n)
            take = min(self.n - offset, self.batch_size - sum(len(p) for p in parts))
            parts.append(self._permutation(epoch)[offset:offset + take])
            start += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---- the run --------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return rank, world, local_rank


def ema_update(ema, model, decay):
    """θ_ema <- decay θ_ema + (1 - decay) θ, for all parameters at once."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision, device):
    """The autocast context for precision fp32 (off), bf16 or fp16."""
    enabled = precision != "fp32"
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision] if enabled else None,
                          enabled=enabled)


def memory_format_for(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def build_training(cfg, unet_kwargs, device):
    """(model, ema, optimizer, scaler) for a config: the model in its memory format, the EMA a
    frozen copy, Adam fused on CUDA and foreach on the CPU, a GradScaler for fp16."""
    torch.manual_seed(cfg.seed)
    memory_format = memory_format_for(cfg.channels_last)
    model = unet.UNet(**unet_kwargs).to(device, memory_format=memory_format)
    ema = unet.UNet(**unet_kwargs).to(device, memory_format=memory_format).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr,
                                 **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return model, ema, optimizer, scaler


def under_autocast(network, cfg, device):
    """network(x, t) in cfg.precision, returning fp32: the diffusion math around it stays fp32."""
    memory_format = memory_format_for(cfg.channels_last)

    def fn(x, t):
        with autocast(cfg.precision, device):
            return network(x.contiguous(memory_format=memory_format), t).float()
    return fn


def make_train_step(model_fn, model, ema, optimizer, scaler, diffusion, cfg):
    """One step of Ho et al.'s Algorithm 1 with Adam, gradient clipping and the EMA update:
    step_fn(x0, t, noise, step) -> (per-example losses, grad norm), both detached, no host sync."""
    def step_fn(x0, t, noise, step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        losses = diffusion.training_losses(model_fn, x0, t, noise=noise)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.mean()).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        return losses.detach(), grad_norm.detach()
    return step_fn


def save_grid(path, images):
    """Images in [-1, 1], [N, C, H, W], as one PNG grid."""
    data.save_png(path, data.make_grid(data.to_uint8(images).cpu().numpy()))


def train(given, progress=True):
    """Run training for the flags in `given` ({Config field: value}); returns (cfg, model, ema)."""
    rank, world, local_rank = setup_distributed()
    main_process = rank == 0
    device = pick_device(given.get("device", "auto"), local_rank)
    out = given.get("out") or default_out(given.get("dataset", "mnist"))
    state = None
    if given.get("resume"):
        path = os.path.join(out, checkpoint.FILENAME)
        if not os.path.isfile(path):
            raise TrainError(f"--resume: no checkpoint at {path}; drop --resume to start a new run")
        state = checkpoint.load(path)
    dataset = given.get("dataset", state["config"]["dataset"] if state else "mnist")
    train_set = data.load_dataset(dataset, "train", given.get("data_dir"), progress=main_process)
    cfg, unet_kwargs = resolve_config({**given, "out": out}, device, train_set.images.shape[1:],
                                      state["config"] if state else None)
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
    if main_process and state is None and not given.get("preset") and device.type == "cpu" \
            and "steps" not in given:
        print(f"no GPU: training the {cfg.preset} preset for {cfg.steps} steps at batch "
              f"{cfg.batch_size} ({cfg.precision}), about 20 minutes on 2 cores; "
              "--preset and --steps override this", file=sys.stderr)

    model, ema, optimizer, scaler = build_training(cfg, unet_kwargs, device)
    step = 0
    ckpt_path = os.path.join(cfg.out, checkpoint.FILENAME)
    if state is not None:
        checkpoint.load_weights(model, state["model"], ckpt_path)
        checkpoint.load_weights(ema, state["ema"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])

    diffusion = ddpm.GaussianDiffusion(ddpm.make_beta_schedule(cfg.schedule, cfg.timesteps),
                                       cfg.mean_type, cfg.var_type, cfg.loss_type)
    images = torch.from_numpy(train_set.images).to(device)            # uint8, resident
    batches = Batches(len(images), cfg.batch_size, cfg.seed, device)
    local = cfg.batch_size // world
    # DDP compares a gradient's strides literally; for 1x1 kernels the strides of the size-1 dims
    # differ between oneDNN's gradient and the bucket while the memory layout is the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(net) if cfg.compile else net

    ema_fn = under_autocast(ema, cfg, device)
    train_step = make_train_step(under_autocast(forward, cfg, device), model, ema, optimizer,
                                 scaler, diffusion, cfg)

    def checkpoint_state():
        return {"step": step, "config": {**dataclasses.asdict(cfg), "unet": unet_kwargs},
                "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state()}}

    def write_samples(tag, final):
        """A grid from the EMA model: Ho's sampler at the end, DDIM-50 (cheap) on the way."""
        g = torch.Generator(device).manual_seed(cfg.seed)
        shape, bar_on = (cfg.num_samples, *images.shape[1:]), progress and main_process
        x = (diffusion.p_sample_loop(ema_fn, shape, generator=g, device=device, progress=bar_on)
             if final else diffusion.ddim_sample_loop(ema_fn, shape, steps=50, generator=g,
                                                      device=device))
        save_grid(os.path.join(cfg.out, f"samples_{tag}.png"), x)

    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda num, _: stop.update(signal=num))
                for s in (signal.SIGINT, signal.SIGTERM)}
    if main_process:
        os.makedirs(cfg.out, exist_ok=True)
        log = open(os.path.join(cfg.out, "log.jsonl"), "a")
    sums = torch.zeros(3 + 8, device=device)  # loss, grad norm, count, 4 quarter sums, 4 counts
    g = torch.Generator(device)
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and main_process),
               unit="step", dynamic_ncols=True)
    t_last, step_last, stopping = time.perf_counter(), step, False
    model.train()
    try:
        while step < cfg.steps:
            # The step's global batch, timesteps and noise, from seeds alone (exact resume, DDP).
            idx = batches.indices(step)[rank * local:(rank + 1) * local]
            g.manual_seed(cfg.seed * 1_000_003 + step)
            t_all = torch.randint(0, cfg.timesteps, (cfg.batch_size,), generator=g, device=device)
            noise_all = torch.randn((cfg.batch_size, *images.shape[1:]), generator=g, device=device)
            t, noise = (v[rank * local:(rank + 1) * local] for v in (t_all, noise_all))
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout
            losses, grad_norm = train_step(data.to_model_range(images[idx]), t, noise, step)
            step += 1

            quarter = t * 4 // cfg.timesteps
            sums[:3] += torch.stack([losses.mean(), grad_norm, torch.ones((), device=device)])
            sums[3:7].index_add_(0, quarter, losses)
            sums[7:].index_add_(0, quarter, torch.ones_like(losses))
            bar.update(1)

            at_end = step == cfg.steps
            if world == 1:
                stopping = stop["signal"] is not None
            elif step % cfg.log_every == 0 or at_end:  # all processes stop at the same step
                flag = torch.tensor([float(stop["signal"] is not None)], device=device)
                dist.all_reduce(flag)
                stopping = flag.item() > 0
            else:
                stopping = False
            if step % cfg.log_every == 0 or at_end or stopping:
                stats = sums.tolist()  # the one host sync, every log_every steps
                sums.zero_()
                if not math.isfinite(stats[0]):
                    kept = (f"the last good checkpoint {ckpt_path} is kept"
                            if os.path.exists(ckpt_path) else "no checkpoint had been written yet")
                    raise TrainError(f"non-finite loss by step {step}; stopped without saving, "
                                     f"{kept} (try a lower --lr or --precision fp32)")
                now = time.perf_counter()
                rate = (step - step_last) * cfg.batch_size / (now - t_last)
                t_last, step_last = now, step
                record = {"step": step, "loss": stats[0] / stats[2], "lr": lr_at(cfg, step - 1),
                          "grad_norm": stats[1] / stats[2], "img_per_s": rate,
                          **{f"loss_q{q}": stats[3 + q] / stats[7 + q] if stats[7 + q] else None
                             for q in range(4)}}
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}")
                if main_process:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if main_process and (step % cfg.ckpt_every == 0 or at_end or stopping):
                checkpoint.save(ckpt_path, checkpoint_state())
                t_last = time.perf_counter()  # img/s counts training time only
            if main_process and step % cfg.sample_every == 0 and not at_end and not stopping:
                write_samples(f"{step:07d}", final=False)
                t_last = time.perf_counter()
            if stopping:
                if main_process:
                    print(f"\nstopped by a signal at step {step}; checkpoint saved to "
                          f"{ckpt_path}; continue with --resume --out {cfg.out}", file=sys.stderr)
                break
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if main_process:
            log.close()
    if main_process and step == cfg.steps and not stopping:
        write_samples("final", final=True)
        print(f"done: {step} steps; checkpoint {ckpt_path}; samples "
              f"{os.path.join(cfg.out, 'samples_final.png')}", file=sys.stderr)
    return cfg, model, ema


def main(argv=None):
    try:
        given = parse_args(argv)
        train(given)
    except (TrainError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
