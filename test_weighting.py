"""Loss weighting through every path that builds a diffusion: the hybrid loss, a respaced chain,
and a diffusion rebuilt from a checkpoint's config, each against the papers' formulas computed
here from the β table (Min-SNR-γ: min(SNR, γ)/SNR on ε's error; P2: 1/(k + SNR)^γ)."""
import dataclasses
import functools

import numpy as np
import pytest
import torch

import checkpoint
import config
import ddpm


@functools.cache
def betas():
    """The linear schedule at T = 100, built when a test first asks (not at collection)."""
    return ddpm.make_beta_schedule("linear", 100)


def snr_of(betas):
    """SNR_t = ᾱ_t / (1 - ᾱ_t), in NumPy from the betas alone."""
    ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    return ac / (1.0 - ac)


def eps_weight(snr, weighting, gamma=5.0, k=1.0, p2_gamma=1.0):
    if weighting == "min_snr":
        return np.minimum(snr, gamma) / snr
    return 1.0 / (k + snr) ** p2_gamma


def test_the_hybrid_loss_weights_its_squared_error():
    """L_hybrid = w_t ‖ε - ε̂‖² + λ T L_t with λ = 1/1000 (Nichol Eq. 16), w_t Min-SNR's."""
    d = ddpm.GaussianDiffusion(betas(), "eps", "learned_range", "hybrid", "min_snr", snr_gamma=2.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99])
    model = lambda x, tt: torch.cat([0.5 * x, torch.tanh(x)], dim=1)
    terms = d.training_losses(model, x0, t, noise=noise)
    w = torch.from_numpy(eps_weight(snr_of(betas()), "min_snr", gamma=2.0))[t]
    torch.testing.assert_close(terms["loss"], w * terms["mse"] + 0.001 * 100 * terms["vb"],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting, kwargs", [("min_snr", {"snr_gamma": 2.0}),
                                                ("p2", {"p2_k": 2.0, "p2_gamma": 0.5})])
def test_a_respaced_chain_keeps_the_weighting_and_its_constants(weighting, kwargs):
    """The respaced diffusion's weights are the formula at the kept steps' SNR (ᾱ is unchanged
    at those steps), with the constants given, not the defaults."""
    keep = list(range(0, 100, 7))
    d = ddpm.GaussianDiffusion(betas(), loss_weighting=weighting, **kwargs).respace(keep)
    snr = snr_of(betas())[keep]
    args = {"gamma": kwargs.get("snr_gamma", 5.0), "k": kwargs.get("p2_k", 1.0),
            "p2_gamma": kwargs.get("p2_gamma", 1.0)}
    np.testing.assert_allclose(d.loss_weights().numpy(), eps_weight(snr, weighting, **args),
                               rtol=1e-10)


@pytest.mark.parametrize("weighting, kwargs", [("min_snr", {"snr_gamma": 3.0}),
                                                ("p2", {"p2_k": 2.0, "p2_gamma": 0.5}),
                                                ("none", {})])
def test_a_diffusion_rebuilt_from_a_checkpoint_weights_as_it_trained(weighting, kwargs):
    """The config a run stores (dataclasses.asdict of its Config) rebuilds a diffusion whose
    weights are the formula with the run's constants; a config of a run saved before weighting
    existed (format 1, no such fields) rebuilds L_simple."""
    flags = dict(schedule="linear", timesteps=100, mean_type="eps", loss_weighting=weighting,
                 t_sampling="uniform", preset="mnist-tiny", steps=1, **kwargs)
    cfg = config.automatic(flags, torch.device("cpu"), (1, 28, 28), None)
    d = config.build_diffusion(dataclasses.asdict(cfg))
    args = {"gamma": kwargs.get("snr_gamma", 5.0), "k": kwargs.get("p2_k", 1.0),
            "p2_gamma": kwargs.get("p2_gamma", 1.0)}
    expected = np.ones(100) if weighting == "none" else eps_weight(snr_of(betas()), weighting, **args)
    np.testing.assert_allclose(d.loss_weights().numpy(), expected, rtol=1e-10)
    old = {"unet": cfg.net, "schedule": "linear", "timesteps": 100, "mean_type": "eps",
           "var_type": "fixed_large", "loss_type": "simple"}
    rebuilt = config.build_diffusion(checkpoint.upgrade(old, 1))
    assert torch.equal(rebuilt.loss_weights(), torch.ones(100, dtype=torch.float64))


def test_a_diffusion_rebuilt_from_a_checkpoint_draws_t_as_it_trained():
    """The CPU recipe's logit-normal t survives the checkpoint: the config a run stores rebuilds
    a diffusion with the law of t that GaussianDiffusion gives for it directly (not uniform),
    and a format-1 config from before the option draws t uniformly."""
    flags = dict(schedule="linear", timesteps=100, mean_type="eps", loss_weighting="none",
                 t_sampling="logitnormal", preset="mnist-tiny", steps=1)
    cfg = config.automatic(flags, torch.device("cpu"), (1, 28, 28), None)
    d = config.build_diffusion(dataclasses.asdict(cfg))
    direct = ddpm.GaussianDiffusion(betas(), timestep_sampling="logitnormal")
    assert d.timestep_sampling == "logitnormal"
    assert torch.equal(d.timestep_probs(), direct.timestep_probs())
    assert d.timestep_probs().max() > 2 * d.timestep_probs().min()
    old = {"unet": cfg.net, "schedule": "linear", "timesteps": 100, "mean_type": "eps",
           "var_type": "fixed_large", "loss_type": "simple"}
    unset = config.build_diffusion(checkpoint.upgrade(old, 1))
    assert torch.equal(unset.timestep_probs(), torch.full((100,), 0.01, dtype=torch.float64))


@pytest.mark.parametrize("law", ["lognormal", "logitnormal"])
def test_a_respaced_chain_keeps_the_law_of_t_and_its_constants(law):
    """respace keeps the law of t with the constants given (t_mean, t_std, t_floor), not the
    option's defaults."""
    given = {"t_mean": 0.7, "t_std": 1.3, "t_floor": 0.2}
    d = ddpm.GaussianDiffusion(betas(), timestep_sampling=law, **given).respace(range(0, 100, 7))
    assert d.timestep_sampling == law and d.sampling_args == given
