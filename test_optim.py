"""optim.py against the definitions it implements: the EMA update and its warmup at several
constants, the learning-rate schedule at the boundary step counts, and the draws of each step
(t, ε and the data order), which must repeat for the same (seed, step) and differ otherwise."""
import math

import pytest
import torch

import config
import ddpm
import optim
import unet

SMALL = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
             attn_resolutions=(4,), dropout=0.0, image_size=8, norm_groups=4)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.9999])
def test_ema_update_is_the_weighted_average(decay):
    """θ_ema <- decay θ_ema + (1 - decay) θ for every parameter, computed here in float64."""
    g = torch.Generator().manual_seed(0)
    model, ema = unet.UNet(**SMALL), unet.UNet(**SMALL)
    with torch.no_grad():
        for p in [*model.parameters(), *ema.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    expected = [decay * e.double() + (1 - decay) * m.double()
                for e, m in zip(ema.parameters(), model.parameters())]
    optim.ema_update(ema, model, decay)
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("decay, warmup", [(0.999, 10.0), (0.9999, 50.0), (0.5, 1.0), (0.9, 3.0)])
def test_ema_decay_warms_up_as_its_formula(decay, warmup):
    """min(decay, (1 + step) / (w + step)) at the first steps, at the crossing and far out."""
    cfg = config.Train(ema_decay=decay, ema_warmup=warmup)
    crossing = max(0, math.ceil((decay * warmup - 1) / (1 - decay)))
    for step in sorted({0, 1, 2, 5, max(crossing - 1, 0), crossing, crossing + 1, 10 ** 6}):
        assert optim.ema_decay_at(cfg, step) == pytest.approx(
            min(decay, (1 + step) / (warmup + step)), rel=1e-12), step
    assert optim.ema_decay_at(cfg, 0) == min(decay, 1 / warmup)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("steps, warmup", [(1, 0), (2, 0), (3, 0), (10, 10), (11, 10), (12, 10),
                                           (13, 10), (100, 0), (100, 1)])
def test_lr_schedule_at_its_boundaries(schedule, steps, warmup):
    """The warmup rises linearly to lr, reaching it at its last step; the first step after it is
    at lr; a decaying schedule reaches exactly 0 at the last step when at least two steps follow
    the warmup, falls monotonically in between, and is at lr/2 half-way (cosine and line alike)."""
    lr = 1e-3
    cfg = config.Train(lr=lr, warmup=warmup, steps=steps, lr_schedule=schedule)
    lrs = [optim.lr_at(cfg, s) for s in range(steps)]
    for s in range(min(warmup, steps)):
        assert lrs[s] == pytest.approx(lr * (s + 1) / warmup, rel=1e-12)
    after = lrs[warmup:]
    if not after:
        return
    assert after[0] == lr
    if schedule == "constant" or len(after) < 2:
        assert all(v == lr for v in after)
        return
    assert after[-1] == 0.0
    assert all(a >= b for a, b in zip(after, after[1:]))
    if (len(after) - 1) % 2 == 0:
        assert after[(len(after) - 1) // 2] == pytest.approx(lr / 2, rel=1e-12)


def test_the_draws_of_each_step_repeat_and_differ():
    """t and ε of a step are functions of (seed, step): the same for the same pair, different
    for another step or another seed."""
    cfg = config.Train(seed=3, batch_size=32)
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    draws = {s: optim.step_noise(cfg, s, (1, 4, 4), "cpu", d) for s in range(4)}
    again = optim.step_noise(cfg, 2, (1, 4, 4), "cpu", d)
    assert torch.equal(draws[2][0], again[0]) and torch.equal(draws[2][1], again[1])
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(draws[a][0], draws[b][0]), (a, b)
            assert not torch.equal(draws[a][1], draws[b][1]), (a, b)
    other = optim.step_noise(config.Train(seed=4, batch_size=32), 2, (1, 4, 4), "cpu", d)
    assert not torch.equal(other[1], draws[2][1])
    t = torch.cat([optim.step_noise(cfg, s, (1, 1, 1), "cpu", d)[0] for s in range(200)])
    assert t.min() == 0 and t.max() == 999  # the whole range is drawn


def test_the_data_order_differs_from_epoch_to_epoch():
    """Each epoch is its own permutation (seeded by (seed, epoch)): every image once per epoch,
    a different order in the next epoch, a different order for another seed."""
    n, batch = 12, 4
    b = optim.Batches(n, batch, seed=1, device="cpu")
    epochs = [torch.cat([b.indices(e * 3 + s) for s in range(3)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    other = torch.cat([optim.Batches(n, batch, seed=2, device="cpu").indices(s) for s in range(3)])
    assert not torch.equal(other, epochs[0])


@pytest.mark.parametrize("steps, warmup, fraction", [(100, 10, 0.2), (100, 0, 0.1), (50, 10, 0.5),
                                                     (12, 10, 0.2), (10, 10, 0.2), (7, 0, 0.3)])
def test_wsd_is_constant_then_a_line_to_zero_over_the_last_fraction(steps, warmup, fraction):
    """Warmup-stable-decay: the warmup, then lr until the last round(fraction * steps) steps
    (never into the warmup), which fall along a line from lr to exactly 0 at the last step."""
    lr = 1e-3
    cfg = config.Train(lr=lr, warmup=warmup, steps=steps, lr_schedule="wsd",
                        decay_fraction=fraction)
    lrs = [optim.lr_at(cfg, s) for s in range(steps)]
    start = max(warmup, steps - round(fraction * steps))
    assert optim.decay_start(cfg, steps) == start
    assert all(lrs[s] == pytest.approx(lr * (s + 1) / warmup) for s in range(warmup))
    assert all(v == lr for v in lrs[warmup:start + 1])
    if steps - 1 > start:
        assert lrs[-1] == 0.0
        for s in range(start, steps):
            assert lrs[s] == pytest.approx(lr * (steps - 1 - s) / (steps - 1 - start), abs=1e-15)


@pytest.mark.parametrize("fraction", [0.15, 0.2, 0.35, 0.5])
def test_wsd_decays_over_the_nearest_whole_number_of_steps(fraction):
    """The decay's length is the whole number nearest fraction x steps (within half a step), for
    every count up to 300, not that number rounded down."""
    cfg = config.Train(warmup=0, decay_fraction=fraction)
    for steps in range(1, 301):
        assert abs((steps - optim.decay_start(cfg, steps)) - fraction * steps) <= 0.5, steps


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_every_stream_of_every_step_has_a_seed_of_its_own(seed):
    """Over 1,000 steps, the generators of t and ε, of the flips and of the label drops, the
    dropout seeds of two processes and the data order of 1,000 epochs are 6,000 different seeds
    (stream k of step s once shared the seed of stream 0 of step 4s + k, and epoch e that of step
    e); the same (seed, stream, step) gives the same seed again."""
    cfg = config.Train(seed=seed)
    seeds = [optim._generator(cfg, step, "cpu", stream).initial_seed()
             for step in range(1000) for stream in (optim.NOISE, optim.FLIPS, optim.LABEL_DROPS)]
    seeds += [optim.stream_seed(seed, optim.DROPOUT, step, rank)
              for step in range(1000) for rank in (0, 1)]
    seeds += [optim.stream_seed(seed, optim.EPOCH, epoch) for epoch in range(1000)]
    assert len(set(seeds)) == len(seeds) == 6000
    assert optim._generator(cfg, 7, "cpu", optim.FLIPS).initial_seed() == seeds[7 * 3 + 1]
