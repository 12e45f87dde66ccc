"""The optimisation of Algorithm 1, shared by train.py and bench.py: one gradient step (the loss,
Adam, gradient clipping, the EMA), the model and optimiser it updates, the learning-rate schedule
and the EMA's decay, and the data order and draws of t and ε of each step (functions of the seed
and the step alone, so that a resumed or distributed run draws exactly what one process would).
"""
import copy
import math
from typing import Callable, NamedTuple

import numpy as np
import torch

import hardware
import phema
import unet

# ---- the data order -------------------------------------------------------------------------

class Batches:
    """The global batch of step s, without state: the data stream is the concatenation of one
    random permutation per epoch (seeded by (seed, epoch): stream_seed), and step s takes
    positions [s B, (s+1) B). Every process computes the same global batch and keeps its own
    slice."""

    def __init__(self, n, batch_size, seed, device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self._epoch, self._perm = None, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, EPOCH, epoch))
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


# The run's streams of random draws: the data order of each epoch, and for each step t and ε,
# the flips, the label drops and (per process) dropout. Each (seed, stream, step or epoch) gets a
# seed of its own from NumPy's SeedSequence, a hash of the whole tuple: no stream of one step
# shares a seed with another step's or another stream's.
EPOCH, NOISE, FLIPS, LABEL_DROPS, DROPOUT = range(5)


def stream_seed(seed, stream, index, rank=0):
    """The 63-bit seed of `stream` at `index` (a step, or an epoch for EPOCH) of the run seeded
    `seed`, in process `rank` (DROPOUT only): SeedSequence((seed, stream, index, rank))'s first
    64-bit word, its top bit dropped."""
    words = np.random.SeedSequence([seed, stream, index, rank]).generate_state(1, np.uint64)
    return int(words[0] >> np.uint64(1))


def _generator(cfg, step, device, stream=NOISE):
    """The generator of one stream of draws of `step`, seeded by (seed, stream, step) alone."""
    return torch.Generator(device).manual_seed(stream_seed(cfg.seed, stream, step))


def step_noise(cfg, step, shape, device, diffusion):
    """Algorithm 1's t ~ Uniform({1..T}) (or the diffusion's importance-sampled law, --t-sampling)
    and ε ~ N(0, I) for the global batch of `step`, from (seed, step) alone: the same draws after
    a resume and in every process."""
    g = _generator(cfg, step, device)
    t = diffusion.sample_timesteps(cfg.batch_size, g, device)
    noise = torch.randn((cfg.batch_size, *shape), generator=g, device=device)
    return t, noise


def step_flips(cfg, step, device):
    """Which images of the global batch of `step` are flipped left-right (--hflip): a bool [B],
    each True with probability 1/2, from (seed, step) alone, on a stream of its own (the draws of
    t and ε are the same with or without flips)."""
    return torch.rand(cfg.batch_size, generator=_generator(cfg, step, device, FLIPS),
                      device=device) < 0.5


def step_label_drops(cfg, step, device):
    """Which labels of the global batch of `step` become the null label (--class-cond): a bool
    [B], each True with probability cfg.cond_drop, from (seed, step) alone on a stream of its
    own, so that one network learns ε(x_t, c) and ε(x_t, ∅) (Ho & Salimans 2022, Algorithm 1)."""
    return torch.rand(cfg.batch_size, generator=_generator(cfg, step, device, LABEL_DROPS),
                      device=device) < cfg.cond_drop


# ---- model, optimiser and the step ----------------------------------------------------------

def ema_update(ema, model, decay):
    """θ_ema <- decay θ_ema + (1 - decay) θ, for all parameters at once."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def lr_at(cfg, step):
    """The learning rate of 0-based `step`: linear warmup over cfg.warmup steps to cfg.lr, then
    constant (Ho et al.), or decaying to 0 at the last step along a half cosine or a line, or
    (wsd) constant until decay_start, then a line to 0 at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = decay_start(cfg, cfg.steps) if cfg.lr_schedule == "wsd" else cfg.warmup
    if cfg.lr_schedule == "constant" or step < start or cfg.steps <= start + 1:
        return cfg.lr
    progress = (step - start) / (cfg.steps - 1 - start)     # 0 where the decay starts, 1 at the end
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


def decay_start(cfg, steps):
    """The first step of a wsd schedule's decay in a run of `steps` steps: the last
    round(cfg.decay_fraction * steps) steps decay, never into the warmup."""
    return max(cfg.warmup, steps - round(cfg.decay_fraction * steps))


def ema_decay_at(cfg, step):
    """min(decay, (1 + step) / (w + step)): the EMA starts as a plain average and reaches its
    decay as the run goes on (w = cfg.ema_warmup)."""
    return min(cfg.ema_decay, (1 + step) / (cfg.ema_warmup + step))


class Trainee(NamedTuple):
    """What a training step updates: the model's parameters (`model`), the model as the loss
    calls it (`forward`: in its precision and layout, under DDP or torch.compile when asked), its
    EMA copy, the optimiser, the gradient scaler and the power-function EMAs of --ema-snapshots
    (phema.Tracked, none without it)."""
    model: torch.nn.Module
    forward: Callable
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tracked: tuple = ()


def build(cfg, net, device):
    """(model, ema, optimizer, scaler) for the training settings `cfg` and the network's kwargs
    `net`: the model in its memory format, the EMA a frozen copy, Adam fused on CUDA and foreach
    on the CPU, a GradScaler for fp16."""
    torch.manual_seed(cfg.seed)
    layout = hardware.memory_format(cfg.channels_last)
    model = unet.UNet(**net).to(device, memory_format=layout)
    ema = unet.UNet(**net).to(device, memory_format=layout).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = adam(model.parameters(), cfg.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return model, ema, optimizer, scaler


def track(ema, profiles=phema.PROFILES):
    """The power-function EMAs of --ema-snapshots, one per σ_rel of `profiles`: copies of the
    EMA network (a copy draws no random numbers; its start does not matter, β_γ(1) = 0)."""
    return tuple(phema.Tracked(p, phema.sigma_rel_to_gamma(p), copy.deepcopy(ema))
                 for p in profiles)


def adam(parameters, lr, device):
    """Adam, fused on CUDA and foreach (one kernel per step for all tensors) elsewhere."""
    return torch.optim.Adam(parameters, lr=lr,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def train_step(trainee, diffusion, cfg, x0, t, noise, step, y=None):
    """One step of Ho et al.'s Algorithm 1: the gradient of the loss (L_simple: ‖ε - ε_θ(√ᾱ_t x_0
    + √(1-ᾱ_t) ε, t)‖², weighted as cfg says; ε_θ(x_t, t, y) for a class-conditional model, y
    the labels) at the learning rate of `step`, clipped, an Adam step, then the EMA update (and
    that of each power-function EMA, at step t = step + 1: the model after its t-th update).
    Returns (per-example losses, gradient norm), both detached, with no host sync."""
    model, optimizer, scaler = trainee.model, trainee.optimizer, trainee.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    forward = trainee.forward if y is None else lambda x_t, t: trainee.forward(x_t, t, y)
    losses = diffusion.training_losses(forward, x0, t, noise=noise)["loss"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses.mean()).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    ema_update(trainee.ema, model, ema_decay_at(cfg, step))
    for tracked in trainee.tracked:
        ema_update(tracked.average, model, phema.beta(step + 1, tracked.gamma))
    return losses.detach(), grad_norm.detach()
