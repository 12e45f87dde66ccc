"""sampling.py: the default sampler's step count on chains shorter and longer than it, the
number of network calls a loop makes, and the one name every report gives a sampler."""
import numpy as np
import pytest
import torch

import ddpm
import sampling


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
