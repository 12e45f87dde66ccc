"""sampling.py: the default sampler's step count on chains shorter and longer than it, the
number of network calls a loop makes, the one name every report gives a sampler, and the labels
of the classes asked for."""
import numpy as np
import pytest
import scipy.stats
import torch

import ddpm
import sampling
from cli import UserError


@pytest.mark.parametrize("T, expected", [(1, 1), (20, 20), (49, 49), (50, 50), (51, 50),
                                         (1000, 50)])
def test_the_default_step_count_is_capped_by_the_chain(T, expected):
    """DDIM's default is DEFAULT_STEPS (50), or T itself on a shorter chain; the loop then makes
    exactly that many network calls when the steps divide T."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", T))
    steps = sampling.steps_for("ddim", None, d)
    assert steps == expected
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)
    d.ddim_sample_loop(model, (1, 1), steps=steps, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == sampling.network_calls("ddim", steps, d) == len(d.ddim_timesteps(steps))
    assert sampling.network_calls("ddpm", steps, d) == T


def test_an_explicit_step_count_is_kept_or_refused():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100))
    assert sampling.steps_for("ddim", 7, d) == 7
    with pytest.raises(Exception, match="must be in \\[1, the model's T = 100\\]"):
        sampling.steps_for("ddim", 101, d)


def test_reports_name_the_sampler_one_way():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    assert sampling.describe("ddim", 50, 1.0, d) == "DDIM-50 eta=1"
    assert sampling.describe("ddim", 25, 0.5, d) == "DDIM-25 eta=0.5"
    assert sampling.describe("ddpm", 50, 1.0, d) == "DDPM-1000"


def test_dpm_solver_through_the_driver_is_the_loop_itself():
    """sampling.generate with --sampler dpm draws what ddpm.dpm_solver_sample_loop draws from the
    same generator, batch by batch, with as many network calls as it reports."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    model = lambda x, t: 0.1 * x + 0.01 * t.view(-1, 1, 1, 1).float() / 1000
    x, _ = sampling.generate(model, d, (1, 2, 2), 5, 5, "dpm", 15, seed=3, progress=False)
    g = torch.Generator().manual_seed(3)
    direct = d.dpm_solver_sample_loop(model, (5, 1, 2, 2), steps=15, generator=g)
    assert torch.equal(x, direct)
    assert sampling.network_calls("dpm", 15, d) == 15
    assert sampling.describe("dpm", 15, 1.0, d) == "DPM-Solver++(2M)-15"


def test_non_uniform_draws_of_t_in_training_follow_their_law():
    """The training loop's t (optim.step_noise) with --t-sampling lognormal follows the
    diffusion's P (chi-square over 300 steps of 64 draws, bins of 50 timesteps)."""
    import scipy.stats
    import config
    import optim
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000), loss_weighting="min_snr",
                               timestep_sampling="lognormal")
    cfg = config.Train(seed=0, batch_size=64)
    t = torch.cat([optim.step_noise(cfg, s, (1, 1, 1), "cpu", d)[0] for s in range(300)])
    counts = torch.bincount(t // 50, minlength=20).numpy()
    expected = d.timestep_probs().view(20, 50).sum(1).numpy() * len(t)
    assert scipy.stats.chisquare(counts, expected).pvalue > 1e-3
    uniform = optim.step_noise(cfg, 5, (1, 1, 1), "cpu", ddpm.GaussianDiffusion(d.betas))[0]
    g = torch.Generator().manual_seed(optim.stream_seed(cfg.seed, optim.NOISE, 5))  # Algorithm 1: t ~ U{0..T-1}
    assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=g))


def test_the_flags_of_the_law_of_t_reach_the_diffusion():
    """--t-mean, --t-std and --t-floor give the law of t: ln σ_t ~ N(t_mean, t_std²) over the
    bins between neighbouring ln σ, mixed with a uniform share t_floor (SciPy's normal CDF
    here), and the run's config stores them as GaussianDiffusion's arguments."""
    import scipy.stats
    import config
    flags = config.parse_args(["--t-sampling", "lognormal", "--t-mean", "0.5", "--t-std", "0.8",
                               "--t-floor", "0.2", "--schedule", "linear", "--preset",
                               "mnist-tiny", "--steps", "1"])
    cfg, d = config.settle(flags, torch.device("cpu"), (1, 28, 28))
    assert {k: cfg.diffusion[k] for k in ("timestep_sampling", "t_mean", "t_std", "t_floor")} \
        == {"timestep_sampling": "lognormal", "t_mean": 0.5, "t_std": 0.8, "t_floor": 0.2}
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    log_sigma = 0.5 * np.log((1 - ac) / ac)
    cdf = scipy.stats.norm.cdf((log_sigma[1:] + log_sigma[:-1]) / 2, 0.5, 0.8)
    mass = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    np.testing.assert_allclose(d.timestep_probs().numpy(), 0.8 * mass + 0.2 / 1000, rtol=1e-6)


# ---- the classes asked for (--class) ---------------------------------------------------------

FOUR = {"net": {"num_classes": 4}, "class_names": ["ant", "bee", "cat", "dog"]}


@pytest.mark.parametrize("asked, n, counts, labels, per_row", [
    ("2", 3, "each", [2, 2, 2], None),                        # sample.py --class 2 --n 3
    ("cat,ant", 2, "each", [2, 2, 0, 0], 2),                  # by name, in the order asked
    ("all", 1, "each", [0, 1, 2, 3], 1),
    ("all", 9, "total", [0, 0, 1, 1, 2, 2, 3, 3], 2),         # evaluate.py --class all
    ("none", 3, "total", [4, 4, 4], None),                    # the null label (index K = 4)
    ("none", 2, "each", [4, 4], None),
    ("all", 2, "total", [0, 1, 2, 3], 1),                     # at least one of each
    ("1, 3", 5, "total", [1, 1, 3, 3], 2),
    ("2", 5, "total", [2, 2, 2, 2, 2], None),
    ("1", 3, "images", [1, 1, 1], None),                      # sample.py --edit, 3 images
    ("3,0,2", 3, "images", [3, 0, 2], None),
    (None, 3, "images", None, None),                          # the images' own labels stand
])
def test_class_labels_of_each_kind_of_count(asked, n, counts, labels, per_row):
    got, rows = sampling.class_labels(asked, n, FOUR, seed=5, counts=counts)
    assert (got if got is None else got.tolist()) == labels and rows == per_row
    assert got is None or got.dtype == torch.long


def test_class_labels_drawn_from_the_seed_and_refused():
    """No --class with n of each: n classes drawn uniformly from the seed, sorted (4,000 draws:
    every class within 5 standard deviations of 1,000); a model without classes gives none and
    refuses --class; an unknown class and a count of classes that fits no image count are one
    line each."""
    drawn, rows = sampling.class_labels(None, 4000, FOUR, seed=5)
    again, _ = sampling.class_labels(None, 4000, FOUR, seed=5)
    assert rows is None and torch.equal(drawn, again) and torch.equal(drawn, drawn.sort().values)
    counts = torch.bincount(drawn, minlength=4)
    assert len(counts) == 4 and ((counts - 1000).abs() < 5 * (4000 * 0.25 * 0.75) ** 0.5).all()
    for counts_of in sampling.COUNTS:
        assert sampling.class_labels(None, 3, {"net": {}}, counts=counts_of) == (None, None)
        with pytest.raises(UserError, match="not class-conditional"):
            sampling.class_labels("1", 3, {"net": {}}, counts=counts_of)
    with pytest.raises(UserError, match="'emu' is not one of the model's 4 classes"):
        sampling.class_labels("ant,emu", 2, FOUR)


@pytest.mark.parametrize("counts", ["each", "total"])
def test_classes_not_asked_for_are_drawn_as_often_as_the_training_labels_have_them(counts):
    """A model that knows its training labels' counts (1:2:3:0, config["class_counts"]) and no
    --class: 6,000 labels drawn from the seed, sorted, pass a chi-square test of those
    frequencies at level 0.01 and never draw the class no training image had; the same seed
    draws the same labels. A data class named "none" is that class, not the null label."""
    config = {**FOUR, "class_counts": [100, 200, 300, 0]}
    drawn, rows = sampling.class_labels(None, 6000, config, seed=3, counts=counts)
    assert rows is None and torch.equal(drawn, drawn.sort().values)
    assert torch.equal(drawn, sampling.class_labels(None, 6000, config, seed=3, counts=counts)[0])
    seen = torch.bincount(drawn, minlength=4).numpy()
    assert seen[3] == 0
    assert scipy.stats.chisquare(seen[:3], [1000, 2000, 3000]).pvalue > 0.01
    assert sampling.class_labels(None, 0, config, counts=counts)[0].tolist() == []  # --samples 0
    named = {"net": {"num_classes": 2}, "class_names": ["some", "none"]}
    assert sampling.class_labels("none", 2, named)[0].tolist() == [1, 1]


@pytest.mark.parametrize("asked, given, expected", [
    (None, None, 0.0),                # classes drawn as the data has them: unguided
    ("none", None, 0.0),              # the null label: guidance does nothing
    ("3", None, sampling.DEFAULT_GUIDANCE), ("all", None, sampling.DEFAULT_GUIDANCE),
    ("given", None, sampling.DEFAULT_GUIDANCE),   # an edit's images' own classes
    (None, 2.0, 2.0), ("3", 0.0, 0.0)])
def test_the_default_guidance_is_for_classes_asked_for(asked, given, expected):
    assert sampling.guidance_for(given, FOUR, asked) == expected
    with pytest.raises(UserError, match="names 2 classes for 3 images"):
        sampling.class_labels("1,2", 3, FOUR, counts="images")
