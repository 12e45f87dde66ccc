"""A run sized to a time budget (--minutes): how many training steps fit.

    plan = budget.plan(cfg, parts, diffusion, shape, device, world, started)
    cfg.steps = plan.steps            # provisional, from a probe on throwaway copies
    ...after each step: new = plan.measure(step); if new: cfg.steps = new   # the count, fixed

The probe times a few training steps and sampling calls on deep copies of the model (the run
itself is untouched) and counts in the grids, checkpoints and scores the run will also make.
A CPU's speed moves in a run's first minutes (faster at first, or slower as it warms), so the
run then times its own steps and fixes the count only when the count starts to matter:

  wsd (warmup-stable-decay)  the learning rate is constant until the decay, over the last
      --decay-fraction of the steps, begins; the run re-estimates the count at every step from
      the rate of its stable phase and fixes it when the decay must begin, so the whole budget
      is used on any CPU;
  constant, cosine, linear   the count is fixed at step `at` (60, or the end of a shorter warmup),
      from the steps timed before it, where the learning rate does not depend on it yet.

Every process gets rank 0's answer. The count is printed and stored: --steps N repeats the run
bit for bit.
"""
import copy
import dataclasses
import os
import sys
import time

import torch
from tqdm import tqdm

import hardware
import optim
import sampling
from cli import check


def process_started():
    """The perf_counter() reading of when this process started, so that --minutes counts the
    imports too (Linux: from /proc/self/stat; elsewhere: when this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(0.0, age)
    except (OSError, IndexError, ValueError, AttributeError):
        return _IMPORTED


_IMPORTED = time.perf_counter()


class Plan:
    """The step count of a --minutes run: `steps` now (provisional until measure() fixes it).

    end: the clock's reading when the budget ends; tail_s: the seconds the end of the run takes
    (final grid, save, score); extra_s: the seconds per step of the periodic grids, checkpoints
    and scores; first: the step from which the run's own steps are timed; at: the step at which
    the count is fixed (None: when the wsd decay must begin); clock: perf_counter, or a fake."""

    def __init__(self, cfg, steps, end, tail_s, extra_s, world=1, speak=True, first=None,
                 at=None, clock=time.perf_counter):
        self.cfg, self.steps, self.world, self.speak = cfg, steps, world, speak
        self.end, self.tail_s, self.extra_s, self.clock = end, tail_s, extra_s, clock
        self.first, self.at, self.t_first, self.fixed = first, at, None, first is None

    def measure(self, step):
        """After `step` steps: the count, once it is fixed (at that step only); None else."""
        if self.fixed or step < self.first:
            return None
        now = self.clock()
        if step == self.first:
            self.t_first = now
            return None
        step_s = (now - self.t_first) / (step - self.first)
        estimate = step + max(0, int((self.end - now - self.tail_s) / (step_s + self.extra_s)))
        if self.at is not None:  # fixed at `at`
            if step < self.at:
                return None
            steps = estimate
        else:  # wsd: fixed where the decay must begin
            if optim.decay_start(self.cfg, estimate) > step:
                self.steps = estimate
                return None
            steps = decay_starting_at(self.cfg, step, estimate)
        if self.world > 1:
            steps = hardware.broadcast_int(steps)
        self.steps, self.fixed = steps, True
        if self.speak:  # beside the progress bar
            tqdm.write(f"sized to {self.cfg.minutes:g} minutes: {steps} steps ({step_s:.3f} s "
                       f"each, the run's own steps); --steps {steps} repeats this run",
                       file=sys.stderr)
        return steps


def decay_starting_at(cfg, step, estimate):
    """The step count nearest `estimate` whose wsd decay begins exactly at `step` (at or before
    which the run fixes its count), so that --steps with it repeats the run."""
    candidates = range(step + 1, 2 * max(estimate, step) + 2)
    return min((n for n in candidates if optim.decay_start(cfg, n) == step),
               key=lambda n: abs(n - estimate), default=step + 1)


def plan(cfg, parts, diffusion, shape, device, world, started, speak=True):
    """The Plan of a --minutes run (cfg.minutes from `started`, a perf_counter() reading) for the
    model parts (model, ema, optimizer, scaler), which are not changed; `speak`: print the count
    (the writing process)."""
    step_s, call_s = probe(cfg, parts, diffusion, shape, device)
    calls = sampling.network_calls(cfg.sampler, cfg.sample_steps, diffusion)
    guided = 2 if cfg.class_cond and sampling.DEFAULT_GUIDANCE else 1  # doubled network batches
    grid_s = guided * calls * call_s * cfg.num_samples / cfg.batch_size
    eval_s = guided * cfg.sample_steps * call_s * cfg.eval_samples / cfg.batch_size + 5.0
    end = started + cfg.minutes * 60
    tail_s = grid_s + 2.0 + (eval_s if cfg.eval_every else 0)   # final grid, save, score
    extra_s = (grid_s / cfg.sample_every + 2.0 / cfg.ckpt_every  # per step, on average
               + (eval_s / cfg.eval_every if cfg.eval_every else 0))
    steps = int((end - time.perf_counter() - tail_s) / (step_s + extra_s))
    if world > 1:
        steps = hardware.broadcast_int(steps)
    check(steps >= 1, f"--minutes {cfg.minutes:g} leaves no time for a training step "
          f"(one takes {step_s:.1f} s here); give more minutes or --steps")
    if cfg.lr_schedule == "wsd":
        first = max(cfg.warmup, 10)
        remeasure, at = steps > first + 10, None
        when = "when its decay begins, from the stable phase's own steps"
    else:
        at = 60 if cfg.lr_schedule == "constant" else min(60, cfg.warmup)
        first = at // 3  # the steps from `first` to `at` are timed
        busy = [k for k in (cfg.sample_every, cfg.ckpt_every, cfg.eval_every)  # a grid, save or
                if k and at // k > first // k]                              # score while timed
        remeasure = at >= 15 and steps > 2 * at and not busy
        when = f"at step {at} from the steps' own time"
    if speak and remeasure:
        print(f"sized to {cfg.minutes:g} minutes: about {steps} steps ({step_s:.2f} s each on a "
              f"probe); the count is fixed {when}", file=sys.stderr)
    elif speak:
        print(f"sized to {cfg.minutes:g} minutes: {steps} steps ({step_s:.2f} s each, measured); "
              f"--steps {steps} repeats this run", file=sys.stderr)
    return Plan(cfg, steps, end, tail_s, extra_s, world, speak,
                *((first, at) if remeasure else ()))


def probe(cfg, parts, diffusion, shape, device, warmup=2, timed=4):
    """(seconds per training step, seconds per sampling call at batch cfg.batch_size), median of
    `timed` after `warmup`, on deep copies of parts; the global RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, ema, optimizer, scaler = copy.deepcopy(parts)
        forward = hardware.as_called(model, cfg.precision, device, cfg.channels_last)
        trainee = optim.Trainee(model, forward, ema, optimizer, scaler)
        long_cfg = dataclasses.replace(cfg, steps=10**9)
        g = torch.Generator(device).manual_seed(0)
        x0 = torch.rand((cfg.batch_size, *shape), generator=g, device=device) * 2 - 1
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        sample = hardware.as_called(ema, cfg.precision, device, cfg.channels_last)

        timed_median = lambda fn: hardware.median_seconds(fn, device, warmup, timed)
        step_s = timed_median(lambda: optim.train_step(trainee, diffusion, long_cfg, x0, t, noise, 0))
        with torch.no_grad():
            call_s = timed_median(lambda: sample(x0, t))
    return step_s, call_s
