"""A run sized to a time budget (--minutes): how many training steps fit.

    plan = budget.plan(cfg, parts, diffusion, shape, device, world, started)
    cfg.steps = plan.steps            # provisional: a first estimate from a probe
    ...after each step:   new = plan.measure(step); cfg.steps = plan.steps  # new: the count, fixed
    ...after a grid, a save or a score:   plan.aside(kind, seconds)

The probe times a few training steps and sampling calls on deep copies of the model (the run
itself is untouched). It only gives a first estimate and what a grid or a score costs in training
steps: a CPU's speed moves in a run's first minutes (faster at first, slower as it warms, or much
slower while other work shares it), so the run's own steps decide. After every step the count is
estimated again from the time of a training step (over the later half of the steps so far, the
grids, checkpoints and scores the loop reports through aside() taken out), with what is still to
come counted once each: the periodic grids, checkpoints and scores before the end, then the final
grid, save and score (as the run measured them, or before it has, the probe's share of a training
step times the run's own step time). The count is fixed once the next step's learning rate
depends on it:

  wsd (warmup-stable-decay)  the learning rate is constant until the decay, over the last
      --decay-fraction of the steps, begins: the count is fixed where the decay must begin, so
      the whole budget is used on any CPU;
  cosine, linear             the decay begins after the warmup: the count is fixed there (a run
      with no warmup fixes it after its first step);
  constant                   the count never changes the learning rate: the run ends when the
      estimate says so.
A budget that ends within the warmup ends the run there (the warmup's rates do not depend on the
count either).

Every process gets rank 0's decision at every step until the count is fixed (one broadcast of an
integer a step, so that they all fix it at the same step). The count is printed and stored:
--steps N repeats the run bit for bit.
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

ASIDE = ("grid", "save", "score", "snapshot")  # the work beside the steps, periodically, at the end


class Plan:
    """The step count of a --minutes run: `steps` now (provisional until measure() fixes it).

    end: the clock's reading when the budget ends; costs: {kind: (training steps, seconds)}, a
    first guess at what one grid, save or score costs (that many of the run's own training steps
    plus that many seconds), replaced by the run's measurement of it; start: the step the run
    starts from (its clock is read now); writes: this process writes the grids and scores (rank
    0); clock: perf_counter, or a fake."""

    def __init__(self, cfg, steps, end, costs, start=0, world=1, speak=True, writes=True,
                 clock=time.perf_counter):
        self.cfg, self.steps, self.end, self.costs = cfg, steps, end, dict(costs)
        self.world, self.speak, self.clock, self.fixed = world, speak, clock, False
        self.every = {"grid": cfg.sample_every if writes else 0, "save": cfg.ckpt_every,
                      "score": cfg.eval_every if writes else 0,
                      "snapshot": cfg.ema_snapshots if writes else 0}
        self.at_end = {"grid": writes, "save": True, "score": bool(cfg.eval_every) and writes,
                       "snapshot": bool(cfg.ema_snapshots) and writes}
        self.measured, self.aside_s = {}, 0.0
        # marks[i]: the clock, less the work done aside, after step start + i
        self.start, self.marks = start, [clock()]

    def aside(self, kind, seconds):
        """The loop did a grid, save, score or snapshot (`kind`) that took `seconds`, not a step's
        time."""
        self.measured[kind], self.aside_s = seconds, self.aside_s + seconds

    def cost(self, kind, step_s):
        """Seconds of one grid, save or score: as measured, else the first guess at step_s."""
        steps, seconds = self.costs[kind]
        return self.measured.get(kind, steps * step_s + seconds)

    def estimate(self, step, left_s, step_s):
        """The largest count n >= step whose steps from `step` on, the periodic work after steps
        step..n-1 and the end's work fit in left_s seconds, at step_s seconds a step."""
        cost = {k: self.cost(k, step_s) for k in ASIDE}
        tail = sum(cost[k] for k in ASIDE if self.at_end[k])

        def need(n):  # seconds from now to the end of a run of n steps
            periodic = sum(cost[k] * ((n - 1) // e - (step - 1) // e)  # multiples of e in [step, n)
                           for k, e in self.every.items() if e)
            return (n - step) * step_s + periodic + tail

        per_step = step_s + sum(cost[k] / e for k, e in self.every.items() if e)
        n = step + max(0, int((left_s - tail) / per_step))   # about right; then exactly
        while need(n + 1) <= left_s:
            n += 1
        while n > step and need(n) > left_s:
            n -= 1
        return n

    def fixes_at(self, n):
        """The first step whose learning rate depends on a count of n (the count is fixed then)."""
        if self.cfg.lr_schedule == "wsd":
            return optim.decay_start(self.cfg, n)
        if self.cfg.lr_schedule in ("cosine", "linear"):
            return self.cfg.warmup + 1  # the decay's first step has the peak rate for any count
        return n  # constant

    def measure(self, step):
        """After `step` steps: the count, once it is fixed (at that step only); None else."""
        if self.fixed:
            return None
        now = self.clock()
        self.marks.append(now - self.aside_s)
        done = step - self.start
        half = done // 2  # the later half of the steps timed: the speed now, not the start's
        step_s = (self.marks[done] - self.marks[half]) / (done - half)
        estimate = self.estimate(step, self.end - now, step_s)
        steps = 0  # not fixed yet
        if self.fixes_at(estimate) <= step:
            steps = (decay_starting_at(self.cfg, step, estimate) if self.cfg.lr_schedule == "wsd"
                     else max(estimate, step))
        elif estimate <= step:  # the time is up within the warmup, where no count changes the rate
            steps = step
        if self.world > 1:  # rank 0 decides for every process, at the same step
            steps = hardware.broadcast_int(steps)
        if not steps:
            self.steps = max(estimate, step + 1)
            return None
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


SAVE_S = 2.0   # a first guess at a checkpoint's seconds, until the run has written one
SCORE_S = 5.0  # and at a score's seconds beyond its sampling (the classifier's features)
SNAPSHOT_S = 0.2  # and at the seconds of --ema-snapshots' two files


def first_costs(cfg, diffusion, step_s, call_s, score_s=0.0):
    """{kind: (training steps, seconds)}: what one grid, save and score cost, from a probe's
    seconds per training step and per sampling call at batch cfg.batch_size. Only the ratio of
    the two is kept (a probe run while the machine is busy is slow at both); a class-conditional
    run samples unguided (train.drawn_classes), so its calls are those of any run. score_s: the
    seconds a score takes beyond sampling (--fid's Inception features of the samples)."""
    calls = sampling.network_calls(cfg.sampler, cfg.sample_steps, diffusion)
    grid = calls * call_s * cfg.num_samples / cfg.batch_size  # unguided, conditional or not
    score = cfg.sample_steps * call_s * cfg.eval_samples / cfg.batch_size
    return {"grid": (grid / step_s, 0.0), "save": (0.0, SAVE_S),
            "score": (score / step_s, SCORE_S + score_s), "snapshot": (0.0, SNAPSHOT_S)}


def plan(cfg, parts, diffusion, shape, device, world, started, speak=True, start=0, score_s=0.0,
         clock=time.perf_counter, timings=None):
    """The Plan of a --minutes run (cfg.minutes from `started`, a `clock` reading) for the model
    parts (model, ema, optimizer, scaler), which are not changed; `speak`: print the count (the
    writing process); `start`: the step a resumed run goes on from (its count not fixed yet;
    `started` then moved back by the seconds it has run); score_s: see first_costs; `timings`:
    (step_s, call_s) instead of a probe's."""
    step_s, call_s = timings or probe(cfg, parts, diffusion, shape, device)
    plan = Plan(cfg, None, started + cfg.minutes * 60,
                first_costs(cfg, diffusion, step_s, call_s, score_s), start=start, world=world,
                speak=speak, writes=speak, clock=clock)
    steps = plan.estimate(start, plan.end - clock(), step_s)
    if world > 1:
        steps = hardware.broadcast_int(steps)
    check(steps >= start + 1, f"--minutes {cfg.minutes:g} leaves no time for a training step "
          f"(one takes {step_s:.1f} s here); give more minutes or --steps")
    plan.steps = steps
    when = {"wsd": "when its decay begins", "constant": "as the run goes"}.get(cfg.lr_schedule) \
        or f"when its decay begins (step {cfg.warmup + 1})"
    if speak:
        print(f"sized to {cfg.minutes:g} minutes: about {steps} steps ({step_s:.2f} s each on a "
              f"probe); the count is fixed {when}, from the run's own steps", file=sys.stderr)
    return plan


def probe(cfg, parts, diffusion, shape, device, warmup=2, timed=4):
    """(seconds per training step, seconds per sampling call at batch cfg.batch_size), median of
    `timed` after `warmup`, on deep copies of parts; the global RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, ema, optimizer, scaler = copy.deepcopy(parts)
        forward = hardware.as_called(model, cfg.precision, device, cfg.channels_last)
        trainee = optim.Trainee(model, forward, ema, optimizer, scaler,
                                optim.track(ema) if cfg.ema_snapshots else ())
        long_cfg = dataclasses.replace(cfg, steps=10**9)
        g = torch.Generator(device).manual_seed(0)
        x0 = torch.rand((cfg.batch_size, *shape), generator=g, device=device) * 2 - 1
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        sample = hardware.as_called(ema, cfg.precision, device, cfg.channels_last)

        timed_median = lambda fn: hardware.median_seconds(fn, device, warmup, timed)
        share = optim.step_self_cond(cfg, 0) if model.self_cond else None  # its extra pass too
        step_s = timed_median(lambda: optim.train_step(trainee, diffusion, long_cfg, x0, t, noise,
                                                       0, share=share))
        with torch.no_grad():
            call_s = timed_median(lambda: sample(x0, t))
    return step_s, call_s
