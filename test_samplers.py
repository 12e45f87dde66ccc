"""Classifier-free guidance, DPM-Solver++(2M) and importance-sampled training timesteps, checked
against independent references: SciPy (scipy.stats densities and CDFs, chi-square and KS tests),
closed forms written here (the probability-flow ODE of Gaussian data, Lu et al.'s update in
NumPy), and the exact ε* of Gaussian-mixture data from test_math.py. In float64 (one device test
also runs float32); statistical tests use a fixed seed and test_math's significance level ALPHA;
sample sizes are stated.

  [CFG]    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance".
  [Lu]     Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
           Probabilistic Models".
  [Karras] Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".
  [Esser]  Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
           Synthesis".
"""
import functools
import math

import numpy as np
import pytest
import scipy.integrate as integrate
import scipy.special as special
import scipy.stats as stats
import torch

import ddpm
from test_math import (ALPHA, TWO_MODES, Mixture, at, linear_betas, logsnr_schedule, reference,
                       sample_1d, x0_oracle)

F64 = torch.float64


@functools.cache
def cosine_betas():
    """The cosine schedule at T = 1000, built when a test first asks (not at collection)."""
    return ddpm.make_beta_schedule("cosine", 1000)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance   ([CFG] Eq. 6)
# ---------------------------------------------------------------------------------------------

def class_network(mix, alphas_cumprod):
    """network(x, t, y) exact for class-wise Gaussian data, p(x|c=k) = N(m_k, s_k²) and
    p(x) = Σ_k π_k p(x|k): y = k < K answers the ε* of component k alone, y = K (the null label)
    the ε* of the whole mixture. Counts its calls in `network.calls`."""
    parts = [Mixture([1.0], [m], [s]).eps_model(alphas_cumprod) for m, s in zip(mix.m, mix.s)]
    parts.append(mix.eps_model(alphas_cumprod))

    def network(x, t, y):
        network.calls.append(len(y))
        return torch.stack([p(x, t) for p in parts])[y, torch.arange(len(y))]
    network.calls = []
    return network


def tilted_eps(mix, c, w, x, ac):
    """ε of p_t(x|c)^(1+w) / p_t(x)^w, i.e. -√(1-ᾱ) d/dx of (1+w) log p_t(x|c) - w log p_t(x),
    the log densities from scipy.stats.norm.logpdf and scipy.special.logsumexp, differentiated by
    the five-point central difference (error O(h⁴))."""
    mu, sd = math.sqrt(ac) * mix.m, np.sqrt(ac * mix.s ** 2 + 1 - ac)

    def log_tilted(y):
        y = np.asarray(y, dtype=np.float64)[..., None]
        log_cond = stats.norm.logpdf(y[..., 0], mu[c], sd[c])
        log_marg = special.logsumexp(np.log(mix.pi) + stats.norm.logpdf(y, mu, sd), axis=-1)
        return (1 + w) * log_cond - w * log_marg

    h = 1e-3 * sd.min()
    grad = (-log_tilted(x + 2 * h) + 8 * log_tilted(x + h) - 8 * log_tilted(x - h)
            + log_tilted(x - 2 * h)) / (12 * h)
    return -math.sqrt(1 - ac) * grad


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guided_eps_is_the_eps_of_the_tilted_density(w):
    """[CFG] Eq. 6 and §3.2: with exact class-conditional and unconditional scores, the guided
    ε̃ = (1+w) ε(x_t, c) - w ε(x_t, ∅) is -√(1-ᾱ_t) ∇ log [p_t(x|c)^(1+w) / p_t(x)^w] at every t.
    guided_model drives the exact class-wise network of TWO_MODES (one call per evaluation, on the
    doubled batch); the reference differentiates the tilted log density by finite differences of
    SciPy log densities. 41 points x_t over the range of both modes, both classes, paper t = 1, 50,
    300, 700, 1000."""
    ac = reference(linear_betas().numpy())["ac"]
    network = class_network(TWO_MODES, ac)
    x = np.linspace(-3, 3, 41)
    for c in (0, 1):
        model = ddpm.guided_model(network, torch.full((41,), c), null_label=2, w=w)
        for i in (0, 49, 299, 699, 999):
            got = model(torch.tensor(x)[:, None], at(i, 41))[:, 0].numpy()
            want = tilted_eps(TWO_MODES, c, w, x, ac[i])
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)
    assert network.calls == [82] * 10  # one call per evaluation, on both halves at once


def _implied_eps(mean_type, out, x_t, ac):
    """ε implied by a network output, from the definitions: ε = o; x_0 = o, so ε = (x_t - √ᾱ o)/
    √(1-ᾱ); v = √ᾱ ε - √(1-ᾱ) x_0 = o, so ε = √(1-ᾱ) x_t + √ᾱ o."""
    a, s = ac.sqrt(), (1 - ac).sqrt()
    return {"eps": out, "x0": (x_t - a * out) / s, "v": s * x_t + a * out}[mean_type]


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("learned", [False, True])
def test_guiding_outputs_guides_the_implied_eps(mean_type, learned):
    """Combining network outputs is combining the ε's they imply ([CFG] Eq. 6), in every
    parameterisation: each is affine in the output with weights (1+w) - w = 1. The x̂_0 that
    p_mean_variance derives from the guided output implies (1+w) ε_c - w ε_u, with ε_c and ε_u
    implied by the two outputs separately (arbitrary outputs, x_t, t and w). With a learned variance
    (learned_range, 2C channels) the variance is the conditional output's, and guiding that half
    too would have changed it."""
    betas = cosine_betas().numpy()[::10].copy()  # any schedule; 100 steps
    kw = dict(var_type="learned_range", loss_type="hybrid") if learned else {}
    d = ddpm.GaussianDiffusion(betas, mean_type, **kw)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 2, 3, dtype=F64, generator=g)
    t = torch.tensor([0, 3, 20, 50, 80, 99])
    ac = torch.from_numpy(reference(betas)["ac"])[t].view(-1, 1, 1)
    channels = 4 if learned else 2
    out_c, out_u = (torch.randn(6, channels, 3, dtype=F64, generator=g) for _ in range(2))
    if learned:  # the variance half lies in [-1, 1]
        out_c[:, 2:], out_u[:, 2:] = torch.tanh(out_c[:, 2:]), torch.tanh(out_u[:, 2:])
    for w in (0.0, 0.5, 3.0, 7.5):
        guided = ddpm.guided_output(out_c, out_u, w, learned_variance=learned)
        p = d.p_mean_variance(lambda x, tt: guided, x_t, t, clip_denoised=False)
        eps_c, eps_u = (_implied_eps(mean_type, o[:, :2], x_t, ac) for o in (out_c, out_u))
        got = (x_t - ac.sqrt() * p["pred_x0"]) / (1 - ac).sqrt()
        np.testing.assert_allclose(got, (1 + w) * eps_c - w * eps_u, rtol=1e-9, atol=1e-9)
        if learned:
            cond = d.p_mean_variance(lambda x, tt: out_c, x_t, t, clip_denoised=False)
            assert torch.equal(p["log_variance"], cond["log_variance"])
            if w > 0:
                assert not torch.allclose(ddpm.guided_output(out_c, out_u, w)[:, 2:], out_c[:, 2:])


def test_guided_model_splits_one_doubled_batch():
    """guided_model calls the network once on [x_t, x_t], [t, t], [labels, null] and combines the
    halves as guided_output does with two separate calls."""
    seen = []

    def network(x, t, y):
        seen.append((x.clone(), t.clone(), y.clone()))
        return torch.sin(x * (y.to(x) + 1).view(-1, 1, 1)) + t.to(x).view(-1, 1, 1) / 100

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 5, dtype=F64, generator=g)
    t, labels = torch.tensor([1, 7, 7, 40]), torch.tensor([0, 3, 1, 2])
    got = ddpm.guided_model(network, labels, null_label=9, w=2.0)(x, t)
    assert len(seen) == 1
    sx, st_, sy = seen[0]
    assert torch.equal(sx, torch.cat([x, x])) and torch.equal(st_, torch.cat([t, t]))
    assert sy.tolist() == [0, 3, 1, 2, 9, 9, 9, 9]
    want = 3.0 * network(x, t, labels) - 2.0 * network(x, t, torch.full((4,), 9))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim eta=0 50 steps", "dpm-solver++ 20 steps"])
def test_guidance_scale_0_samples_each_class(sampler):
    """w = 0 is the conditional model: the guided model of the class-wise TWO_MODES network
    samples p(x|c). Half the batch asks for class 0 and half for class 1; each half passes the
    one-sample KS test against its component N(m_c, s_c²) (scipy.stats.norm) at level ALPHA, and
    fails against the other class. n = 4,000 in all (DDPM, DPM-Solver++) or 1,000 (DDIM-50, whose
    discretisation bias KS resolves at larger n; see test_math's section 11), seed 0."""
    d = ddpm.GaussianDiffusion(linear_betas())
    n = 1000 if sampler.startswith("ddim") else 4000
    labels = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    model = ddpm.guided_model(class_network(TWO_MODES, d.alphas_cumprod), labels, 2, w=0.0)
    run = {"ddpm": lambda **kw: d.p_sample_loop(model, **kw),
           "ddim": lambda **kw: d.ddim_sample_loop(model, steps=50, eta=0.0, **kw),
           "dpm-solver++": lambda **kw: d.dpm_solver_sample_loop(model, steps=20, **kw)}
    x = sample_1d(run[sampler.split()[0]], n)
    for c, half in enumerate((x[:n // 2], x[n // 2:])):
        law = lambda k: stats.norm(TWO_MODES.m[k], TWO_MODES.s[k]).cdf
        assert stats.kstest(half, law(c)).pvalue > ALPHA
        assert stats.kstest(half, law(1 - c)).pvalue < ALPHA


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M)   ([Lu] Algorithm 2)
# ---------------------------------------------------------------------------------------------

def gaussian_x0(m, s):
    """x̂_0 = E[x_0 | x_t] for data N(m, s²): m + √ᾱ s² (x_t - √ᾱ m)/(ᾱ s² + 1 - ᾱ)."""
    return lambda x, ac: m + math.sqrt(ac) * s * s * (x - math.sqrt(ac) * m) / (ac * s * s + 1 - ac)


def pf_ode_solution(m, s, x, ac_from, ac_to):
    """The probability-flow ODE carried from ᾱ_from to ᾱ_to, for Gaussian data N(m, s²). The ODE
    is linear and keeps the marginals N(√ᾱ m, ᾱ s² + 1 - ᾱ); a continuous, increasing affine map
    between two Gaussians is fixed by them: the standardised value z = (x - √ᾱ m)/√(ᾱ s² + 1 - ᾱ)
    is carried unchanged. At ᾱ_to = 1: x_0 = m + s z."""
    z = (x - math.sqrt(ac_from) * m) / math.sqrt(ac_from * s * s + 1 - ac_from)
    return math.sqrt(ac_to) * m + math.sqrt(ac_to * s * s + 1 - ac_to) * z


def lu_algorithm_2(x, seq, x0_of, ac):
    """[Lu] Algorithm 2 written out in NumPy, over the descending indices of `seq` (ascending
    list), α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ), h_i = λ_{t_i} - λ_{t_{i-1}}:
      x_{t_1} = (σ_{t_1}/σ_{t_0}) x_{t_0} - α_{t_1}(e^{-h_1} - 1) x_θ(x_{t_0}, t_0);
      for i >= 2: r_i = h_{i-1}/h_i,
                  D_i = (1 + 1/(2r_i)) x_θ(x_{t_{i-1}}) - 1/(2r_i) x_θ(x_{t_{i-2}}),
                  x_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x_{t_{i-1}} - α_{t_i}(e^{-h_i} - 1) D_i;
    then the final step to ᾱ = 1 (λ = ∞, e^{-h} = 0, σ = 0), first order: x_0 = x_θ of the last
    index. Returns (x at the smallest index, x_0)."""
    ts = list(reversed(seq))
    alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
    lam = np.log(alpha / sigma)
    prev_x0 = x0_of(x, ac[ts[0]])
    h_prev = None
    for t_from, t_to in zip(ts, ts[1:]):
        h = lam[t_to] - lam[t_from]
        D = prev_x0 if h_prev is None else \
            (1 + 1 / (2 * h_prev / h)) * prev_x0 - 1 / (2 * h_prev / h) * older_x0
        x = sigma[t_to] / sigma[t_from] * x - alpha[t_to] * (math.exp(-h) - 1) * D
        older_x0, prev_x0, h_prev = prev_x0, x0_of(x, ac[t_to]), h
    return x, prev_x0


@pytest.mark.parametrize("schedule,steps,spacing", [
    ("linear", 10, "logsnr"), ("linear", 20, "logsnr"), ("cosine", 15, "logsnr"),
    ("cosine", 25, "time"), ("linear", 1, "logsnr"), ("linear", 2, "time")])
def test_dpm_solver_is_lu_algorithm_2(schedule, steps, spacing):
    """dpm_solver_sample_loop is [Lu] Algorithm 2 (DPM-Solver++(2M)) step for step: for Gaussian
    data with its exact x̂_0 (written here), the NumPy recursion of lu_algorithm_2 gives the same
    x at the last index and the same x_0, for 25 values of x_T; one network call per visited
    index, `steps` of them."""
    betas = (linear_betas() if schedule == "linear" else cosine_betas()).numpy()
    d, ac, (m, s) = ddpm.GaussianDiffusion(betas), reference(betas)["ac"], (0.2, 0.3)
    eps_model, calls = Mixture([1.0], [m], [s]).eps_model(ac), []
    model = lambda x, t: calls.append(1) or eps_model(x, t)
    xT = torch.linspace(-3, 3, 25, dtype=F64)[:, None]
    seq = d.dpm_solver_timesteps(steps, spacing)
    x0, traj = d.dpm_solver_sample_loop(model, xT.shape, steps, noise=xT, clip_denoised=False,
                                        spacing=spacing, trajectory=len(seq))
    want_last, want_x0 = lu_algorithm_2(xT[:, 0].numpy(), seq, gaussian_x0(m, s), ac)
    assert len(seq) == len(calls) == steps and seq[-1] == 999
    assert seq[0] == (0 if steps > 1 else 999)
    np.testing.assert_allclose(traj["x_t"][-1][:, 0], want_last, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x0[:, 0], want_x0, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("mean_type,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_matches_diffusers(mean_type, prediction_type, steps):
    """A second implementation: diffusers' DPMSolverMultistepScheduler (algorithm_type
    "dpmsolver++", solver_order 2, midpoint, final_sigmas_type "zero": first order into σ = 0;
    lower_order_final off, which would otherwise also lower the second-to-last step below 15
    steps) over our timesteps, driven by the same exact model of Gaussian data, gives our samples
    to float32 precision (diffusers keeps its tables in float32)."""
    diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-test.txt")
    d, ac = ddpm.GaussianDiffusion(linear_betas(), mean_type), reference(linear_betas().numpy())["ac"]
    eps_model = Mixture([1.0], [0.2], [0.3]).eps_model(ac)
    model = lambda x, t: _output_for(d, mean_type, x, t, _x0_from_eps(x, t, eps_model(x, t), ac))
    xT = torch.linspace(-3, 3, 25, dtype=F64)[:, None]
    ours = d.dpm_solver_sample_loop(model, xT.shape, steps, noise=xT, clip_denoised=False)
    theirs = diffusers.DPMSolverMultistepScheduler(
        trained_betas=linear_betas().numpy(), prediction_type=prediction_type, solver_order=2,
        algorithm_type="dpmsolver++", lower_order_final=False, final_sigmas_type="zero")
    theirs.set_timesteps(timesteps=list(reversed(d.dpm_solver_timesteps(steps))))
    x = xT
    for t in theirs.timesteps:
        x = theirs.step(model(x, at(t, 25)), t, x).prev_sample
    np.testing.assert_allclose(x, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_dpm_solver_step_formulas(mean_type):
    """One step of dpm_solver_step against [Lu]'s formulas in NumPy, for arbitrary x_t, x̂_0 and
    older x̂_0 (the second-order update with r = (λ_t - λ_s)/h), and the first-order step
    (no older x̂_0), which is DDIM with eta = 0 (a second derivation, [Song] Eq. 12). The final
    step to ᾱ = 1 returns x̂_0 whatever the older one."""
    betas = linear_betas().numpy()
    d, ac = ddpm.GaussianDiffusion(betas, mean_type), reference(betas)["ac"]
    g = torch.Generator().manual_seed(2)
    x_t, x0_t, x0_s = (torch.randn(3, 4, dtype=F64, generator=g) for _ in range(3))
    lam = lambda i: 0.5 * math.log(ac[i] / (1 - ac[i]))
    for s_, t, t_prev in ((700, 500, 300), (40, 19, 10), (3, 1, 0)):
        h, r = lam(t_prev) - lam(t), (lam(t) - lam(s_)) / (lam(t_prev) - lam(t))
        D = (1 + 1 / (2 * r)) * x0_t.numpy() - 1 / (2 * r) * x0_s.numpy()
        want = (math.sqrt((1 - ac[t_prev]) / (1 - ac[t])) * x_t.numpy()
                - math.sqrt(ac[t_prev]) * math.expm1(-h) * D)
        got = d.dpm_solver_step(x_t, at(t, 3), t_prev, x0_t, (at(s_, 3), x0_s))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        first = d.dpm_solver_step(x_t, at(t, 3), t_prev, x0_t)
        ddim = d.ddim_sample(lambda x, tt: _output_for(d, mean_type, x, tt, x0_t), x_t, at(t, 3),
                             t_prev, eta=0.0, clip_denoised=False)["sample"]
        np.testing.assert_allclose(first, ddim, rtol=1e-9, atol=1e-10)
    last = d.dpm_solver_step(x_t, at(0, 3), -1, x0_t, (at(5, 3), x0_s))
    assert torch.equal(last, x0_t)


def _output_for(d, mean_type, x_t, t, x0):
    """The output a network of `mean_type` gives when its x̂_0 is x0 (closed forms)."""
    ac = torch.from_numpy(reference(d.betas.numpy())["ac"])[t].view(-1, *[1] * (x_t.dim() - 1))
    eps = (x_t - ac.sqrt() * x0) / (1 - ac).sqrt()
    return {"eps": eps, "x0": x0, "v": ac.sqrt() * eps - (1 - ac).sqrt() * x0}[mean_type]


def test_dpm_solver_is_second_order_and_ddim_first():
    """[Lu] §4: DPM-Solver++(2M) is a second-order solver of the probability-flow ODE, DDIM
    (eta = 0, its first-order case) a first-order one. On a schedule with log-SNR linear in the
    index (T = 641, λ from 5 to -5), time-uniform steps are exactly λ-uniform, so doubling the
    steps halves h everywhere. For Gaussian data N(0.3, 0.25²) and 25 values of x_T, the error
    at index 0 against the exact ODE solution (pf_ode_solution) falls by about 4 per doubling from
    21 steps on (measured 3.67, 3.93, 3.98 for 21 -> 41 -> 81 -> 161), DDIM's by about 2 (1.94,
    1.97, 1.98), so DPM-Solver++'s lead grows with the steps (measured 8x at 21, 64x at 161)."""
    betas = logsnr_schedule(641, 10.0, -10.0)
    d, ac, (m, s) = ddpm.GaussianDiffusion(betas), reference(betas)["ac"], (0.3, 0.25)
    model = Mixture([1.0], [m], [s]).eps_model(ac)
    xT = torch.linspace(-3, 3, 25, dtype=F64)[:, None]
    exact = pf_ode_solution(m, s, xT[:, 0].numpy(), ac[-1], ac[0])
    dpm, ddim = [], []
    for steps in (21, 41, 81, 161):
        seq = d.dpm_solver_timesteps(steps, "time")
        assert len(set(np.diff(seq))) == 1  # equal steps in the index, so in λ
        _, traj = d.dpm_solver_sample_loop(model, xT.shape, steps, noise=xT, clip_denoised=False,
                                           spacing="time", trajectory=steps)
        dpm.append(np.abs(traj["x_t"][-1][:, 0].numpy() - exact).max())
        x = xT
        for t, t_prev in zip(reversed(seq[1:]), reversed(seq[:-1])):
            x = d.ddim_sample(model, x, at(t, 25), t_prev, eta=0.0, clip_denoised=False)["sample"]
        ddim.append(np.abs(x[:, 0].numpy() - exact).max())
    dpm_ratio, ddim_ratio = np.array(dpm[:-1]) / dpm[1:], np.array(ddim[:-1]) / ddim[1:]
    assert ((dpm_ratio > 3.2) & (dpm_ratio < 4.8)).all(), dpm_ratio
    assert ((ddim_ratio > 1.6) & (ddim_ratio < 2.4)).all(), ddim_ratio
    lead = np.array(ddim) / dpm
    assert lead[0] > 5 and (np.diff(lead) > 0).all()


def test_dpm_solver_reaches_the_pf_ode_solution_in_few_steps():
    """On the linear schedule at T = 1000 with the default log-SNR spacing, for Gaussian data of
    std s = 0.05, 0.25, 1 and x_T in [-3, 3], the x_0 of 10, 15, 20 and 25 steps is within 0.15 s
    of the exact probability-flow solution x_0 = m + s (x_T - √ᾱ_T m)/√(ᾱ_T s² + 1 - ᾱ_T)
    (measured: at most 0.14 s at 10 steps, 0.04 s at 25), and over 4x closer than DDIM with as
    many steps (DDIM: 0.5 s to 2 s at 10 steps, 0.2 s to 1.5 s at 25)."""
    d, ac = ddpm.GaussianDiffusion(linear_betas()), reference(linear_betas().numpy())["ac"]
    xT = torch.linspace(-3, 3, 25, dtype=F64)[:, None]
    for m, s in ((0.3, 0.25), (0.0, 1.0), (-0.5, 0.05)):
        model = Mixture([1.0], [m], [s]).eps_model(ac)
        exact = pf_ode_solution(m, s, xT[:, 0].numpy(), ac[-1], 1.0)
        for steps in (10, 15, 20, 25):
            run = lambda loop, **kw: loop(model, xT.shape, steps, noise=xT, clip_denoised=False,
                                          **kw)[:, 0].numpy()
            err = np.abs(run(d.dpm_solver_sample_loop) - exact).max() / s
            ddim_err = np.abs(run(d.ddim_sample_loop, eta=0.0) - exact).max() / s
            assert err < 0.15 and 4 * err < ddim_err, (m, s, steps, err, ddim_err)


@pytest.mark.parametrize("schedule,steps,n", [("linear", 15, 2000), ("linear", 20, 4000),
                                              ("linear", 25, 4000), ("cosine", 25, 2000)])
def test_dpm_solver_reproduces_the_data(schedule, steps, n):
    """DPM-Solver++(2M) driven by the exact ε* of the two-mode mixture: one-sample KS test against
    the mixture CDF at level ALPHA, seed 0. Its discretisation bias is real but small: KS resolves
    it at n = 20,000 for 20 steps (p = 3e-4), where DDIM-20's KS distance is 3x larger (checked
    below), hence the sample sizes."""
    d = ddpm.GaussianDiffusion(linear_betas() if schedule == "linear" else cosine_betas())
    model = TWO_MODES.eps_model(d.alphas_cumprod)
    x = sample_1d(lambda **kw: d.dpm_solver_sample_loop(model, steps=steps, **kw), n)
    assert stats.kstest(x, TWO_MODES.cdf).pvalue > ALPHA
    if (schedule, steps) == ("linear", 20):
        x = sample_1d(lambda **kw: d.dpm_solver_sample_loop(model, steps=20, **kw), 20000)
        y = sample_1d(lambda **kw: d.ddim_sample_loop(model, steps=20, eta=0.0, **kw), 20000)
        distance = lambda sample: stats.kstest(sample, TWO_MODES.cdf).statistic
        assert 2 * distance(x) < distance(y)


@pytest.mark.parametrize("steps", [1, 7, 20])
@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_with_an_x0_oracle_returns_x0(steps, clip):
    """If the model knows x_0, x̂_0 = x_0 at every step, D = x_0 in every update, and the last
    step (to ᾱ = 1) returns x_0 exactly, whatever the step count and the clipping."""
    d = ddpm.GaussianDiffusion(linear_betas())
    x0 = torch.linspace(-1, 1, 6, dtype=F64).view(2, 3)
    noise = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = d.dpm_solver_sample_loop(x0_oracle(x0, d.alphas_cumprod), x0.shape, steps,
                                   noise=noise, clip_denoised=clip)
    np.testing.assert_allclose(out, x0, atol=1e-9)


def test_dpm_solver_parameterisations_agree():
    """The same exact model answering in ε, x_0 or v gives the same DPM-Solver++ samples (x̂_0 comes
    from p_mean_variance in each case), and clipping x̂_0 keeps the samples in [-1, 1]."""
    ac = reference(linear_betas().numpy())["ac"]
    eps_model = TWO_MODES.eps_model(ac)
    xT = torch.randn(64, 1, dtype=F64, generator=torch.Generator().manual_seed(4))
    runs = {}
    for mean_type in ("eps", "x0", "v"):
        d = ddpm.GaussianDiffusion(linear_betas(), mean_type)
        model = lambda x, t: _output_for(d, mean_type, x, t,
                                         _x0_from_eps(x, t, eps_model(x, t), ac))
        runs[mean_type] = d.dpm_solver_sample_loop(model, xT.shape, 15, noise=xT,
                                                   clip_denoised=False)
    np.testing.assert_allclose(runs["x0"], runs["eps"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(runs["v"], runs["eps"], rtol=1e-9, atol=1e-9)
    wide = Mixture([0.5, 0.5], [-0.95, 0.95], [0.3, 0.3])
    d = ddpm.GaussianDiffusion(linear_betas())
    clipped = d.dpm_solver_sample_loop(wide.eps_model(ac), xT.shape, 15, noise=xT)
    free = d.dpm_solver_sample_loop(wide.eps_model(ac), xT.shape, 15, noise=xT, clip_denoised=False)
    assert clipped.abs().max() <= 1 and free.abs().max() > 1


def _x0_from_eps(x_t, t, eps, ac):
    a = torch.from_numpy(ac)[t].view(-1, *[1] * (x_t.dim() - 1))
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def test_dpm_solver_timesteps():
    """logsnr: `steps` distinct ascending indices from 0 to T-1; on the linear schedule (up to 25
    steps) each is the index whose λ is nearest to evenly spaced values, checked by brute force;
    where values share a nearest index (the clipped end of the cosine schedule, or steps = T)
    neighbours are taken. time: round(linspace(T-1, 0, steps)), ascending. Bad counts and
    spacings raise."""
    for betas in (linear_betas(), cosine_betas()):
        d, ac = ddpm.GaussianDiffusion(betas), reference(betas.numpy())["ac"]
        lam = 0.5 * np.log(ac / (1 - ac))
        for steps in (2, 10, 15, 25, 999, 1000):
            seq = d.dpm_solver_timesteps(steps)
            assert seq[0] == 0 and seq[-1] == 999 and len(set(seq)) == steps and seq == sorted(seq)
            if betas is linear_betas() and steps <= 25:
                target = np.linspace(lam[-1], lam[0], steps)[::-1]
                assert seq == [int(np.argmin(np.abs(lam - v))) for v in target]
    assert d.dpm_solver_timesteps(1) == d.dpm_solver_timesteps(1, "time") == [999]
    assert d.dpm_solver_timesteps(5, "time") == [0, 250, 500, 749, 999]
    for bad, match in ((0, "steps"), (1001, "steps"), (2.5, "steps")):
        with pytest.raises(ValueError, match=match):
            d.dpm_solver_timesteps(bad)
    with pytest.raises(ValueError, match="spacing"):
        d.dpm_solver_timesteps(10, "quad")
    with pytest.raises(ValueError, match="t_prev < t"):
        d.dpm_solver_step(torch.zeros(2, 1), at(5, 2), 5, torch.zeros(2, 1))


# ---------------------------------------------------------------------------------------------
# Importance-sampled training timesteps   ([Karras] §5, [Esser] §3.1)
# ---------------------------------------------------------------------------------------------

def reference_probs(betas, kind, floor=0.1):
    """P[t] from SciPy: σ_t = √((1-ᾱ_t)/ᾱ_t), bin edges at the geometric means of neighbouring σ
    (the end bins open); "lognormal": σ ~ scipy.stats.lognorm with ln σ ~ N(-1.2, 1.2²) ([Karras]
    §5); "logitnormal": the rectified-flow time τ = σ/(1+σ) (SNR ((1-τ)/τ)² = 1/σ²) has
    logit(τ) ~ N(0, 1) ([Esser] §3.1), its CDF Φ(logit τ) from scipy.special.logit. Plus the
    uniform share `floor`."""
    ac = reference(betas)["ac"]
    sigma = np.sqrt((1 - ac) / ac)
    edges = np.sqrt(sigma[1:] * sigma[:-1])
    if kind == "lognormal":
        cdf = stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf(edges)
    else:
        cdf = stats.norm.cdf(special.logit(edges / (1 + edges)))
    mass = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    return (1 - floor) * mass + floor / len(betas)


def esser_density(tau, m=0.0, s=1.0):
    """[Esser] §3.1's logit-normal density,
    π_ln(τ; m, s) = 1/(s√(2π)) 1/(τ(1-τ)) exp(-(logit τ - m)²/(2s²))."""
    return math.exp(-(math.log(tau / (1 - tau)) - m) ** 2 / (2 * s * s)) / (
        s * math.sqrt(2 * math.pi) * tau * (1 - tau))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("kind", ["lognormal", "logitnormal"])
def test_timestep_probs_are_the_papers_laws(schedule, kind):
    """P[t] equals the SciPy reference (reference_probs) at T = 1000, sums to 1, keeps the floor
    (P >= 0.1/T, so the importance weight (1/T)/P <= 10); a few bins' logit-normal masses also
    equal the quadrature of [Esser]'s density; and the respaced chain carries the option, its P
    computed on its own steps."""
    betas = (linear_betas() if schedule == "linear" else cosine_betas()).numpy()
    d = ddpm.GaussianDiffusion(betas, timestep_sampling=kind)
    P = d.timestep_probs().numpy()
    want = reference_probs(betas, kind)
    np.testing.assert_allclose(P, want, rtol=1e-9, atol=1e-15)
    assert P.sum() == pytest.approx(1.0, abs=1e-12) and P.min() >= 0.1 / 1000 * (1 - 1e-12)
    np.testing.assert_allclose(d.loss_weight.numpy(), 1 / (1000 * want), rtol=1e-9)
    if kind == "logitnormal":
        ac = reference(betas)["ac"]
        sigma = np.sqrt((1 - ac) / ac)
        tau_edges = np.sqrt(sigma[1:] * sigma[:-1]) / (1 + np.sqrt(sigma[1:] * sigma[:-1]))
        for i in (100, 400, 700):
            mass, _ = integrate.quad(esser_density, tau_edges[i - 1], tau_edges[i], epsabs=1e-14)
            assert 0.9 * mass + 0.1 / 1000 == pytest.approx(P[i], rel=1e-8)
    r = d.respace(range(0, 1000, 10))
    assert r.timestep_sampling == kind and r.sampling_args == d.sampling_args
    np.testing.assert_allclose(r.timestep_probs().numpy(),
                               reference_probs(-np.expm1(np.diff(np.log(np.concatenate(
                                   [[1.0], reference(betas)["ac"][::10]])))), kind), rtol=1e-9,
                               atol=1e-15)


@pytest.mark.parametrize("kind", ["lognormal", "logitnormal"])
def test_sample_timesteps_draws_p(kind):
    """200,000 draws of sample_timesteps at T = 1000 (linear): the chi-square goodness-of-fit test
    (scipy.stats.chisquare, 999 degrees of freedom, every expected count >= 20) accepts the SciPy
    reference P at level ALPHA and rejects the other option's P and the uniform law."""
    d = ddpm.GaussianDiffusion(linear_betas(), timestep_sampling=kind)
    n = 200000
    t = d.sample_timesteps(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (n,)
    counts = np.bincount(t.numpy(), minlength=1000)
    other = "logitnormal" if kind == "lognormal" else "lognormal"
    assert stats.chisquare(counts, n * reference_probs(linear_betas().numpy(), kind)).pvalue > ALPHA
    assert stats.chisquare(counts, n * reference_probs(linear_betas().numpy(), other)).pvalue < ALPHA
    assert stats.chisquare(counts, np.full(1000, n / 1000)).pvalue < ALPHA


def test_uniform_sampling_is_todays_draw():
    """"uniform" (the default) draws exactly what the training loop's torch.randint(0, T) draws
    from the same generator, leaves the generator in the same state, and keeps P = 1/T and the
    loss weights as they were."""
    d = ddpm.GaussianDiffusion(linear_betas())
    assert d.timestep_sampling == "uniform"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(d.sample_timesteps(64, g1), torch.randint(0, 1000, (64,), generator=g2))
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    assert torch.equal(d.timestep_probs(), torch.full((1000,), 1e-3, dtype=F64))
    assert torch.equal(d.loss_weight, torch.ones(1000, dtype=F64))


@pytest.mark.parametrize("kind", ["lognormal", "logitnormal"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_importance_weighted_loss_is_unbiased(kind, weighting):
    """With t ~ P and each example's weighted squared error times (1/T)/P[t], the expected loss is
    the uniform one: for a fixed model, x_0 and a fixed ε per t, Σ_t P[t] ℓ'(t) = (1/T) Σ_t ℓ(t)
    (ℓ from the uniform diffusion with the same loss_weighting, P from SciPy), and the average over
    50,000 draws of sample_timesteps agrees within z_{1-ALPHA/2} standard errors, while the same
    draws without the weight are off by more than that (linear schedule, T = 1000)."""
    T = 1000
    uniform = ddpm.GaussianDiffusion(linear_betas(), loss_weighting=weighting)
    weighted = ddpm.GaussianDiffusion(linear_betas(), loss_weighting=weighting, timestep_sampling=kind)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(1, 1, 2, 2, dtype=F64, generator=g).expand(T, 1, 2, 2) * 2 - 1
    noise = torch.randn(T, 1, 2, 2, dtype=F64, generator=g)
    model = lambda x, t: torch.tanh(1.3 * x) - 0.05 * x ** 2
    t = torch.arange(T)
    loss_u = uniform.training_losses(model, x0, t, noise=noise)["loss"].numpy()
    loss_w = weighted.training_losses(model, x0, t, noise=noise)["loss"].numpy()
    P = reference_probs(linear_betas().numpy(), kind)
    np.testing.assert_allclose(loss_w, loss_u / (T * P), rtol=1e-9)
    exact = loss_u.mean()
    assert (P * loss_w).sum() == pytest.approx(exact, rel=1e-9)
    draws = weighted.sample_timesteps(50000, torch.Generator().manual_seed(6)).numpy()
    z = stats.norm.ppf(1 - ALPHA / 2)
    sample = loss_w[draws]
    assert abs(sample.mean() - exact) < z * sample.std() / math.sqrt(len(draws))
    biased = loss_u[draws]
    assert abs(biased.mean() - exact) > z * biased.std() / math.sqrt(len(draws))


def test_timestep_sampling_options_and_errors():
    """Custom ln σ mean, std and floor reach P (against SciPy); t_floor = 1 is uniform; the
    option is refused for the bound's losses (they would be biased) and for bad values."""
    d = ddpm.GaussianDiffusion(linear_betas(), timestep_sampling="lognormal", t_mean=0.5, t_std=2.0,
                               t_floor=0.3)
    ac = reference(linear_betas().numpy())["ac"]
    edges = 0.25 * (np.log((1 - ac[1:]) / ac[1:]) + np.log((1 - ac[:-1]) / ac[:-1]))
    mass = np.diff(np.concatenate([[0.0], stats.norm.cdf(edges, 0.5, 2.0), [1.0]]))
    np.testing.assert_allclose(d.timestep_probs(), 0.7 * mass + 0.3 / 1000, rtol=1e-9)
    flat = ddpm.GaussianDiffusion(linear_betas(), timestep_sampling="logitnormal", t_floor=1.0)
    np.testing.assert_allclose(flat.timestep_probs(), np.full(1000, 1e-3), rtol=1e-12)
    for kwargs, match in (({"timestep_sampling": "beta"}, "unknown timestep_sampling"),
                          ({"timestep_sampling": "lognormal", "t_std": 0.0}, "t_std"),
                          ({"timestep_sampling": "lognormal", "t_floor": 0.0}, "t_floor"),
                          ({"timestep_sampling": "lognormal", "t_floor": 1.5}, "t_floor"),
                          ({"t_mean": 0.0}, "non-uniform"),
                          ({"timestep_sampling": "lognormal", "var_type": "learned_range",
                            "loss_type": "hybrid"}, "biased")):
        with pytest.raises(ValueError, match=match):
            ddpm.GaussianDiffusion(linear_betas(), **kwargs)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_new_paths_follow_the_input_device_and_dtype(device, dtype):
    """DPM-Solver++ with a guided model and the non-uniform timestep draw run where their inputs
    are, in their dtype, and agree with the float64 CPU run (float32 within 1e-4)."""
    d = ddpm.GaussianDiffusion(linear_betas(), timestep_sampling="logitnormal")
    network = lambda x, t, y: 0.3 * x + 0.1 * y.to(x).view(-1, 1, 1) - t.to(x).view(-1, 1, 1) / 5000
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    run = lambda dev, dt: d.dpm_solver_sample_loop(
        ddpm.guided_model(network, labels, 3, w=1.5), noise.shape, 12,
        noise=noise.to(dev, dt), clip_denoised=False)
    got, want = run(device, dtype), run("cpu", F64)
    assert got.device.type == device and got.dtype == dtype
    np.testing.assert_allclose(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
    t = d.sample_timesteps(8, torch.Generator(device).manual_seed(0))
    assert t.device.type == device and t.dtype == torch.long and 0 <= t.min() <= t.max() < 1000
