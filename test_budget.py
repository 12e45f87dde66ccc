"""budget.py: a run sized to a time budget uses the whole budget whatever its speed does and
whatever its probe said. A fake clock drives the plan step by step as train.py's loop does (the
periodic saves, grids and scores after a step, reported aside; the final grid, save and score
after the last), the steps running faster or slower than the probe; the run must end within a
few percent of the budget, and the count it fixes must repeat the run under --steps."""
import dataclasses
import types

import pytest

import budget
import config
import optim


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def drive(cfg, plan, clock, seconds_per_step, work=None):
    """Run the plan over simulated steps as train.py's loop does: (the step at which the count
    was fixed, the count, the clock when the run ends). `work`: the real seconds of one save,
    grid and score; the loop saves every --ckpt-every steps and at the end, draws a grid every
    --sample-every steps (but at the end) and a final one, scores every --eval-every and at the
    end."""
    work = work or {"grid": 0.0, "save": 0.0, "score": 0.0}
    step, fixed_at = 0, None
    while step < plan.steps:
        clock.t += seconds_per_step(step)
        step += 1
        if not plan.fixed and plan.measure(step) is not None:
            fixed_at = step
        at_end = step == plan.steps
        for kind, every in (("save", cfg.ckpt_every), ("grid", cfg.sample_every),
                            ("score", cfg.eval_every)):
            due = every and step % every == 0
            if (due and not (kind == "grid" and at_end)) or (at_end and kind != "grid"
                                                             and (kind == "save" or every)):
                clock.t += work[kind]
                plan.aside(kind, work[kind])
    clock.t += work["grid"]  # the final grid
    return fixed_at, plan.steps, clock.t


def make_plan(cfg, clock, probe_step_s, probe_call_s=0.0):
    """budget.plan with the probe's timings given and the fake clock; the budget counts from 0."""
    diffusion = types.SimpleNamespace(num_timesteps=cfg.sample_steps)  # ddpm: T network calls
    return budget.plan(cfg, None, diffusion, None, None, 1, 0.0, clock=clock,
                       timings=(probe_step_s, probe_call_s))


def quiet(**kw):
    """A config with the periodic work far apart (none within a 2-minute test run)."""
    return config.Train(**{"minutes": 2.0, "lr": 1e-3, "sample_every": 10**6,
                            "ckpt_every": 10**6, "eval_every": 0, "sampler": "ddpm",
                            "sample_steps": 10, "batch_size": 64, **kw})


@pytest.mark.parametrize("after", [0.05, 0.1, 0.2, 0.35])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_a_wsd_run_ends_within_five_percent_of_its_budget(after, fraction):
    """The probe said 0.1 s a step; after 30 steps they take `after` s (faster, the same,
    slower). The count is fixed where the decay begins, from the run's own rate, and the run
    ends within 5% of the 120 s budget."""
    cfg = quiet(warmup=20, lr_schedule="wsd", decay_fraction=fraction)
    clock = Clock()
    plan = make_plan(cfg, clock, 0.1)
    fixed_at, steps, t = drive(cfg, plan, clock, lambda s: 0.1 if s < 30 else after)
    assert abs(t - 120.0) <= 0.05 * 120.0, (t, steps)
    assert fixed_at == optim.decay_start(dataclasses.replace(cfg, steps=steps), steps)
    # --steps with the count: the same learning rate at every step as the sized run had
    fixed = dataclasses.replace(cfg, steps=steps)
    assert all(optim.lr_at(fixed, s) == cfg.lr for s in range(cfg.warmup, fixed_at))
    assert optim.lr_at(fixed, steps - 1) == 0.0


@pytest.mark.parametrize("schedule", ["wsd", "constant", "cosine", "linear"])
@pytest.mark.parametrize("probe_factor", [50.0, 1 / 50])
def test_the_runs_own_steps_decide_however_wrong_the_probe(schedule, probe_factor):
    """A probe 50 times slower than the steps that follow (a burst of load while it ran: it
    says 23 steps where 1,180 fit) or 50 times faster: the run still ends within 2% of its
    budget with about the steps that fit, under every schedule, and the count it fixes gives
    every step the learning rate it had (--steps repeats the run)."""
    cfg = quiet(warmup=20, lr_schedule=schedule)
    clock = Clock()
    plan = make_plan(cfg, clock, 0.1 * probe_factor)
    lrs = []
    step_s = lambda s: lrs.append(optim.lr_at(dataclasses.replace(cfg, steps=plan.steps), s)) or 0.1
    fixed_at, steps, t = drive(cfg, plan, clock, step_s)
    assert abs(t - 120.0) <= 0.02 * 120.0, (t, steps)
    assert steps >= 0.97 * 120 / 0.1 - 2 / 0.1          # the 2 s save at the end
    assert fixed_at is not None
    assert lrs == [optim.lr_at(dataclasses.replace(cfg, steps=steps), s) for s in range(steps)]


@pytest.mark.parametrize("schedule", ["wsd", "constant", "cosine", "linear"])
def test_a_budget_that_ends_within_the_warmup_ends_the_run_there(schedule):
    """A warmup of 100 steps and a budget for about 60 (the CPU recipe's warmup on a slow or
    busy machine): the run ends within 2% of its budget, not at the end of the warmup, and its
    count repeats it (every step was a warmup step)."""
    cfg = quiet(warmup=100, lr_schedule=schedule)
    clock = Clock()
    plan = make_plan(cfg, clock, 2.0)
    fixed_at, steps, t = drive(cfg, plan, clock, lambda s: 1.9)
    assert abs(t - 120.0) <= 0.02 * 120.0, (t, steps)
    assert fixed_at == steps < cfg.warmup


@pytest.mark.parametrize("schedule, call_s", [
    ("wsd", 0.3), ("constant", 0.3), ("cosine", 0.3), ("linear", 0.3),  # the probe was right
    ("wsd", 0.01), ("constant", 0.01)])  # 30x off: measured by the time the count is fixed
def test_periodic_grids_saves_and_scores_are_counted_once(schedule, call_s):
    """Grids every 150 steps (3 s each), checkpoints every 250 (2 s), scores every 300 (8 s)
    and a final grid, save and score: the run ends within 2% of its budget (counted both in the
    step time and again per step, they would end it early). A probe that guessed them 30x too
    cheap is corrected where the count is fixed late enough to have measured them."""
    cfg = quiet(warmup=20, lr_schedule=schedule, sample_every=150, ckpt_every=250,
                eval_every=300, eval_samples=64, batch_size=64, num_samples=64)
    clock = Clock()
    # a grid and a score are 10 sampling calls at batch 64: 3 s at 0.3 s a call (a score 5 s more)
    plan = make_plan(cfg, clock, 0.1, call_s)
    _, steps, t = drive(cfg, plan, clock, lambda s: 0.1,
                        work={"grid": 3.0, "save": 2.0, "score": 8.0})
    assert abs(t - 120.0) <= 0.02 * 120.0, (t, steps)


def test_the_end_of_the_run_is_counted_while_the_count_is_estimated():
    """A final grid of 20 s (a sixth of the budget, as the probe's share of a step said: 200
    steps) with no periodic grid before it: the steps stop early enough for it."""
    cfg = quiet(warmup=20, lr_schedule="wsd", num_samples=64, batch_size=64, sample_steps=10)
    clock = Clock()
    plan = make_plan(cfg, clock, 0.1, 2.0)     # a grid: 10 calls of 2 s = 20 s = 200 steps
    _, steps, t = drive(cfg, plan, clock, lambda s: 0.1, work={"grid": 20.0, "save": 0.0,
                                                               "score": 0.0})
    assert abs(t - 120.0) <= 0.02 * 120.0, (t, steps)


def test_a_conditional_model_s_grids_cost_what_an_unconditional_model_s_do():
    """A run's grids and scores draw a class-conditional model's classes as the training labels
    have them, unguided (one network call per step, not a doubled batch): they cost what an
    unconditional model's do, each the calls times the seconds per call (per batch) in training
    steps."""
    diffusion = types.SimpleNamespace(num_timesteps=100)
    base = dict(sampler="ddpm", sample_steps=50, num_samples=128, batch_size=64, eval_samples=640)
    plain = budget.first_costs(config.Train(**base), diffusion, 0.5, 0.01)
    conditional = budget.first_costs(config.Train(**base, class_cond=True), diffusion, 0.5, 0.01)
    assert plain["grid"][0] == pytest.approx(100 * 0.01 * 128 / 64 / 0.5)
    assert plain["score"][0] == pytest.approx(50 * 0.01 * 640 / 64 / 0.5)
    assert conditional == plain


def test_decay_starting_at_gives_a_count_whose_decay_begins_there():
    cfg = config.Train(warmup=10, decay_fraction=0.2)
    for step, estimate in [(80, 100), (80, 90), (80, 130), (400, 500), (11, 12)]:
        n = budget.decay_starting_at(cfg, step, estimate)
        assert optim.decay_start(cfg, n) == step and n > step
        others = [m for m in range(step + 1, 3 * estimate) if optim.decay_start(cfg, m) == step]
        assert abs(n - estimate) == min(abs(m - estimate) for m in others)


def test_fid_scores_are_counted_in_the_step_count(monkeypatch):
    """A run scored by FID every E steps: each score's Inception seconds S come off the budget,
    S / E per step and S once at the end, as a closed form of the plan's count gives."""
    import time
    step_s, call_s, minutes, every, samples = 0.1, 0.01, 10.0, 50, 100
    monkeypatch.setattr(budget, "probe", lambda *a, **k: (step_s, call_s))
    monkeypatch.setattr(budget.sampling, "network_calls", lambda *a: 20)
    cfg = config.Train(minutes=minutes, eval_every=every, eval_samples=samples, batch_size=64,
                        sample_every=1000, ckpt_every=1000, num_samples=64, lr_schedule="constant",
                        sampler="ddim", sample_steps=20)
    started = time.perf_counter()

    def count(score_s):
        plan = budget.plan(cfg, None, None, (3, 32, 32), None, 1, started, speak=True,
                           score_s=score_s)
        return plan.steps

    def closed_form(score_s):  # the largest n whose steps, periodic work and end fit
        grid = 20 * call_s * 64 / 64
        score = 20 * call_s * samples / 64 + 5.0 + score_s

        def need(n):  # periodic grids/saves every 1000 and scores every E before the end, then the end's
            return (n * step_s + (grid + 2.0) * ((n - 1) // 1000) + score * ((n - 1) // every)
                    + grid + 2.0 + score)
        return max(n for n in range(1, 10**5) if need(n) <= minutes * 60)

    for score_s in (0.0, 30.0):  # within one periodic score's worth of steps
        assert abs(count(score_s) - closed_form(score_s)) <= every
    assert count(30.0) < 0.9 * count(0.0)
