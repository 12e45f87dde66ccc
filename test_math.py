"""The derivation checker: each step of the DDPM derivations in the study notes, checked numerically.

The notes (kept outside this repository) are cited by number:
  000  forward chain, closed form q(x_t|x_0), inversion, posterior by Bayes, completed square
  001  notation, forward process, VLB derivation, L_simple, sampling, code sketches
  002  probability background, forward composition, posterior, ε-form of the mean
  003  VLB decomposition, posterior, μ_θ parameterisation, Gaussian KL, KL -> MSE, score link
Equations are those of Ho et al. 2020 ("Ho Eq. n") unless another paper is named.

References are SciPy (scipy.stats densities and CDFs, scipy.integrate quadrature), NumPy
recursions written here, or closed forms written here; never the code under test. All in float64.
Statistical tests use a fixed seed and the significance level ALPHA; the sample sizes are stated.
Section numbers follow the checklist in docs/derivations.md (the derivation checker).
"""
import functools
import math

import numpy as np
import pytest
import scipy.integrate as integrate
import scipy.special as special
import scipy.stats as stats
import torch
from hypothesis import given, settings, strategies as st

import ddpm

F64 = torch.float64
ALPHA = 0.01  # significance level of every statistical test in this file


# ---------------------------------------------------------------------------------------------
# Helpers: reference tables, schedules, analytic data distributions and their exact models
# ---------------------------------------------------------------------------------------------

def tens(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def at(i, n=1):
    """A LongTensor [n] holding the 0-based timestep i."""
    return torch.full((n,), int(i), dtype=torch.long)


def reference(betas):
    """α, ᾱ (a plain cumulative product), ᾱ_{t-1} and β̃ in NumPy: what the tables must equal."""
    b = np.asarray(betas, dtype=np.float64)
    a = 1.0 - b
    ac = np.cumprod(a)
    ac_prev = np.append(1.0, ac[:-1])
    return {"beta": b, "alpha": a, "ac": ac, "ac_prev": ac_prev,
            "post_var": b * (1 - ac_prev) / (1 - ac)}


@st.composite
def schedules(draw, min_T=1, max_T=1000):
    """β_1..β_T: the named schedules, arbitrary sequences (any order, β in [1e-6, 0.999], ᾱ_T
    down to e^-25), and short hand-drawn lists."""
    kind = draw(st.sampled_from(["linear", "cosine", "random", "list"]))
    if kind == "linear":  # the 1000/T scaling pushes β_T past 1 for 2 <= T <= 20
        long = [st.integers(max(21, min_T), max_T)] if max_T >= max(21, min_T) else []
        T = draw(st.one_of(*([st.just(1)] if min_T <= 1 else []), *long)) if long or min_T <= 1 \
            else draw(st.integers(min_T, max_T))  # (no valid linear T here: use cosine)
        if T > 1 and T < 21:
            return ddpm.make_beta_schedule("cosine", T).numpy()
        return ddpm.make_beta_schedule("linear", T).numpy()
    if kind == "cosine":
        return ddpm.make_beta_schedule("cosine", draw(st.integers(min_T, max_T))).numpy()
    if kind == "random":
        T = draw(st.integers(min_T, max_T))
        total = draw(st.floats(1e-3, 25.0))            # -log ᾱ_T
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        w = rng.dirichlet(np.full(T, draw(st.sampled_from([0.3, 1.0, 5.0])))) * total
        return np.clip(-np.expm1(-w), 1e-6, 0.999)
    return np.array(draw(st.lists(st.floats(1e-6, 0.999), min_size=max(min_T, 1),
                                  max_size=max(min_T, 12))))


def logsnr_schedule(T, hi=12.0, lo=-10.0):
    """β for log(ᾱ/(1-ᾱ)) falling linearly from `hi` to `lo`: tiny first steps, so that the
    decoder resolves 8-bit data and the bound can approach the true NLL."""
    ac = special.expit(np.linspace(hi, lo, T))
    return 1 - ac / np.append(1.0, ac[:-1])


class Mixture:
    """1-D data x_0 ~ Σ_k π_k N(m_k, s_k²) (s_k = 0: point masses), with its noisy marginals."""

    def __init__(self, pi, m, s):
        self.pi, self.m, self.s = (np.asarray(v, dtype=np.float64) for v in (pi, m, s))

    def cdf(self, x):
        x = np.asarray(x, dtype=np.float64)[..., None]
        return (self.pi * stats.norm.cdf(x, self.m, self.s)).sum(-1)

    def pdf(self, x):
        x = np.asarray(x, dtype=np.float64)[..., None]
        return (self.pi * stats.norm.pdf(x, self.m, self.s)).sum(-1)

    def noisy_score(self, x, ac):
        """∇ log q_t(x) for q_t = Σ π_k N(√ᾱ m_k, ᾱ s_k² + 1 - ᾱ), by differentiating the mixture."""
        mu, var = math.sqrt(ac) * self.m, ac * self.s ** 2 + 1 - ac
        dens = self.pi * stats.norm.pdf(x, mu, np.sqrt(var))
        return (dens * -(x - mu) / var).sum() / dens.sum()

    def eps_model(self, alphas_cumprod):
        """The exact ε*(x_t, t) = -√(1-ᾱ_t) ∇ log q_t(x_t) as a model(x, t) callable (section 10
        checks it against E[ε | x_t] by quadrature)."""
        ac_table = torch.as_tensor(alphas_cumprod, dtype=F64)
        P, M, S = (torch.tensor(v) for v in (self.pi, self.m, self.s))

        def model(x, t):
            ac = ac_table[t].to(x.dtype).view(-1, *[1] * (x.dim() - 1), 1)
            var = ac * S ** 2 + (1 - ac)
            xx = x.unsqueeze(-1)
            logw = torch.log(P) - 0.5 * torch.log(var) - 0.5 * (xx - ac.sqrt() * M) ** 2 / var
            score = (torch.softmax(logw, -1) * -(xx - ac.sqrt() * M) / var).sum(-1)
            return -torch.sqrt(1 - ac.squeeze(-1)) * score
        return model


def x0_oracle(x0, alphas_cumprod):
    """A model that knows x_0: ε(x_t, t) = (x_t - √ᾱ_t x_0)/√(1-ᾱ_t), the noise actually added."""
    ac_table = torch.as_tensor(alphas_cumprod, dtype=F64)

    def model(x, t):
        ac = ac_table[t].view(-1, *[1] * (x.dim() - 1))
        return (x - ac.sqrt() * x0) / (1 - ac).sqrt()
    return model


TWO_MODES = Mixture([0.4, 0.6], [-0.5, 0.4], [0.2, 0.25])


def sample_1d(sampler, n, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return sampler(shape=(n, 1), generator=g, dtype=F64, clip_denoised=False, **kw)[:, 0].numpy()


# ---------------------------------------------------------------------------------------------
# 1. The forward process composes to q(x_t | x_0)   (000 §1, 001 §1.1, 002 §2.1; Ho Eq. 2, 4)
# ---------------------------------------------------------------------------------------------

@given(betas=schedules(), x0=st.floats(-3, 3))
def test_1_composition_exact_moment_recursion(betas, x0):
    """000 §1: iterating x_t = √α_t x_{t-1} + √(1-α_t) ε_t from x_0 gives x_t ~ N(√ᾱ_t x_0,
    (1-ᾱ_t) I). The exact moments of the iteration, carried one step at a time
    (mean <- √α mean, var <- α var + (1-α)), equal q_mean_variance at every t."""
    d = ddpm.GaussianDiffusion(betas)
    mean, var, means, variances = x0, 0.0, [], []
    for b in betas:
        mean, var = math.sqrt(1 - b) * mean, (1 - b) * var + b
        means.append(mean)
        variances.append(var)
    T = len(betas)
    m, v, logv = d.q_mean_variance(torch.full((T, 1), x0, dtype=F64), torch.arange(T))
    np.testing.assert_allclose(m[:, 0], means, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(v[:, 0], variances, rtol=1e-9)
    np.testing.assert_allclose(torch.exp(logv[:, 0]), variances, rtol=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_1_composition_monte_carlo(name):
    """000 §1 by simulation: 4,000 chains stepped one transition at a time with NumPy's generator
    are N(√ᾱ_t x_0, 1-ᾱ_t) (one-sample KS against scipy.stats.norm) and distributed as the
    one-shot q_sample (two-sample KS), at paper t = 1, 10, 100, 1000; level ALPHA."""
    betas = ddpm.make_beta_schedule(name, 1000).numpy()
    d, ref, x0, n = ddpm.GaussianDiffusion(betas), reference(betas), 0.7, 4000
    rng, g = np.random.default_rng(1), torch.Generator().manual_seed(1)
    x = np.full(n, x0)
    for i, b in enumerate(betas):
        x = math.sqrt(1 - b) * x + math.sqrt(b) * rng.standard_normal(n)
        if i in (0, 9, 99, 999):
            law = stats.norm(math.sqrt(ref["ac"][i]) * x0, math.sqrt(1 - ref["ac"][i]))
            assert stats.kstest(x, law.cdf).pvalue > ALPHA
            eps = torch.randn(n, 1, dtype=F64, generator=g)
            shot = d.q_sample(torch.full((n, 1), x0, dtype=F64), at(i, n), eps)[:, 0].numpy()
            assert stats.ks_2samp(x, shot).pvalue > ALPHA


@given(a_t=st.floats(0.01, 0.99), a_prev=st.floats(0.01, 0.99), x=st.floats(-4, 4))
def test_1_gaussian_sum_step(a_t, a_prev, x):
    """002 §2.1: for independent ε, ε' ~ N(0, 1), √α_t √(1-α_{t-1}) ε + √(1-α_t) ε' ~
    N(0, 1 - α_t α_{t-1}), because α_t (1-α_{t-1}) + (1-α_t) = 1 - α_t α_{t-1}. The density of the
    sum, the convolution integral of the two normal densities (scipy.integrate.quad), equals the
    N(0, 1 - α_t α_{t-1}) density."""
    v1, v2 = a_t * (1 - a_prev), 1 - a_t
    assert math.isclose(v1 + v2, 1 - a_t * a_prev, rel_tol=1e-12)
    centre, sd = x * v1 / (v1 + v2), math.sqrt(v1 * v2 / (v1 + v2))  # where the integrand lives
    conv, _ = integrate.quad(lambda u: stats.norm.pdf(u, 0, math.sqrt(v1))
                             * stats.norm.pdf(x - u, 0, math.sqrt(v2)),
                             centre - 15 * sd, centre + 15 * sd, epsabs=0, epsrel=1e-11)
    assert conv == pytest.approx(stats.norm.pdf(x, 0, math.sqrt(1 - a_t * a_prev)), rel=1e-8)


@given(betas=schedules(), data=st.data())
def test_1_inversion_for_x0(betas, data):
    """000 §1, 002 §2.1: x_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t inverts x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε
    (Ho Eq. 15 with the true ε): predict_x0_from_eps(q_sample(x_0, t, ε), t, ε) = x_0."""
    d, T = ddpm.GaussianDiffusion(betas), len(betas)
    t = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=4, max_size=4)))
    x0 = tens(data.draw(st.lists(st.floats(-1, 1), min_size=12, max_size=12))).view(4, 3)
    eps = tens(data.draw(st.lists(st.floats(-4, 4), min_size=12, max_size=12))).view(4, 3)
    back = d.predict_x0_from_eps(d.q_sample(x0, t, eps), t, eps)
    ac = tens(reference(betas)["ac"])[t].view(4, 1)
    tol = 1e-13 * (1 + eps.abs()) / ac.sqrt()  # rounding grows as 1/√ᾱ_t
    assert ((back - x0).abs() <= tol).all()


# ---------------------------------------------------------------------------------------------
# 2. The posterior q(x_{t-1} | x_t, x_0) by Bayes' rule   (000 §2, 002 §2.2, 003 §4a; Ho Eq. 6-7)
# ---------------------------------------------------------------------------------------------

@given(betas=schedules(min_T=2), data=st.data())
def test_2_posterior_by_bayes_rule(betas, data):
    """000 §2: q(x_{t-1}|x_t,x_0) = q(x_t|x_{t-1}) q(x_{t-1}|x_0) / q(x_t|x_0), the Markov property
    dropping x_0 from the first factor. The right side from scipy.stats.norm densities equals the
    N(μ̃_t, β̃_t) density of q_posterior_mean_variance on a grid of x_{t-1} (t >= 2)."""
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas)
    i = data.draw(st.integers(1, len(betas) - 1))
    x0, e = data.draw(st.floats(-1.5, 1.5)), data.draw(st.floats(-3, 3))
    b, a, ac, acp = ref["beta"][i], ref["alpha"][i], ref["ac"][i], ref["ac_prev"][i]
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * e
    mean, var, _ = d.q_posterior_mean_variance(tens([x0]), tens([xt]), at(i))
    mean, sd = mean.item(), math.sqrt(var.item())
    grid = mean + sd * np.linspace(-6, 6, 41)
    log_bayes = (stats.norm.logpdf(xt, math.sqrt(a) * grid, math.sqrt(b))
                 + stats.norm.logpdf(grid, math.sqrt(acp) * x0, math.sqrt(1 - acp))
                 - stats.norm.logpdf(xt, math.sqrt(ac) * x0, math.sqrt(1 - ac)))
    np.testing.assert_allclose(stats.norm.logpdf(grid, mean, sd), log_bayes, atol=1e-6)


@given(betas=schedules(min_T=2), x0=st.floats(-2, 2), xt=st.floats(-3, 3))
def test_2_completed_square(betas, x0, xt):
    """002 §2.2: collecting the x_{t-1} terms of the exponent, the precision is
    1/β̃_t = α_t/β_t + 1/(1-ᾱ_{t-1}) and the mean is β̃_t (√α_t/β_t x_t + √ᾱ_{t-1}/(1-ᾱ_{t-1}) x_0).
    Both equal the code's β̃_t and μ̃_t (Ho Eq. 7) for t >= 2."""
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas)
    T = len(betas)
    b, a, acp = ref["beta"][1:], ref["alpha"][1:], ref["ac_prev"][1:]
    var = 1 / (a / b + 1 / (1 - acp))
    mean = var * (np.sqrt(a) / b * xt + np.sqrt(acp) / (1 - acp) * x0)
    m, v, _ = d.q_posterior_mean_variance(torch.full((T - 1, 1), x0, dtype=F64),
                                          torch.full((T - 1, 1), xt, dtype=F64), torch.arange(1, T))
    np.testing.assert_allclose(v[:, 0], var, rtol=1e-9)
    np.testing.assert_allclose(m[:, 0], mean, rtol=1e-9, atol=1e-12)


@given(betas=schedules(min_T=2), x0=st.floats(-2, 2), xt=st.floats(-3, 3))
def test_2_posterior_at_the_first_step(betas, x0, xt):
    """Ho Eq. 7 at t = 1 (index 0): ᾱ_0 = 1, so β̃_1 = 0 and μ̃_1 = x_0 (the posterior is a point
    mass); the log-variance, log 0, is clipped to log β̃_2 so that it stays finite."""
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas)
    m, v, logv = d.q_posterior_mean_variance(tens([[x0]]), tens([[xt]]), at(0))
    assert v.item() == 0.0
    assert m.item() == pytest.approx(x0, rel=1e-12, abs=1e-15)
    assert logv.item() == pytest.approx(math.log(ref["post_var"][1]), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 3. The ε-form of the mean   (002 §2.2 end, 003 §4b; Ho Eq. 11)
# ---------------------------------------------------------------------------------------------

@given(betas=schedules(), data=st.data())
def test_3_eps_form_of_the_mean(betas, data):
    """002 §2.2, 003 §4b: substituting x_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t into μ̃_t gives
    μ̃_t(x_t, x̂_0(x_t, ε)) = (x_t - β_t/√(1-ᾱ_t) ε)/√α_t, an identity in x_t and ε. The code's
    posterior mean at x̂_0, and p_mean_variance of an ε-model with clipping off, equal the right
    side computed here, at every t including the first."""
    d, ref, T = ddpm.GaussianDiffusion(betas), reference(betas), len(betas)
    i = data.draw(st.integers(0, T - 1))
    xt, eps = data.draw(st.floats(-3, 3)), data.draw(st.floats(-3, 3))
    b, a, ac = ref["beta"][i], ref["alpha"][i], ref["ac"][i]
    want = (xt - b / math.sqrt(1 - ac) * eps) / math.sqrt(a)
    x_t, e = tens([[xt]]), tens([[eps]])
    via_x0 = d.q_posterior_mean_variance(d.predict_x0_from_eps(x_t, at(i), e), x_t, at(i))[0]
    via_model = d.p_mean_variance(lambda x, t: e, x_t, at(i), clip_denoised=False)["mean"]
    coef1 = math.sqrt(ref["ac_prev"][i]) * b / (1 - ac)
    tol = 1e-12 * (1 + abs(want) + coef1 * (abs(xt) + abs(eps)) / math.sqrt(ac))
    assert abs(via_x0.item() - want) <= tol
    assert abs(via_model.item() - want) <= tol


# ---------------------------------------------------------------------------------------------
# 4. The KL divergence of two Gaussians   (003 §4c)
# ---------------------------------------------------------------------------------------------

@given(m1=st.floats(-3, 3), m2=st.floats(-3, 3), lv1=st.floats(-4, 2), lv2=st.floats(-4, 2))
def test_4_normal_kl_matches_quadrature(m1, m2, lv1, lv2):
    """003 §4c: D_KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) = ½[log σ2²/σ1² - 1 + σ1²/σ2² + (μ2-μ1)²/σ2²]:
    normal_kl equals ∫ p log(p/q) by scipy.integrate.quad with scipy.stats densities."""
    p, q = stats.norm(m1, math.exp(lv1 / 2)), stats.norm(m2, math.exp(lv2 / 2))
    sd1 = math.exp(lv1 / 2)
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)),
                            m1 - 40 * sd1, m1 + 40 * sd1, epsabs=1e-13, epsrel=1e-11, limit=200)
    got = ddpm.normal_kl(tens(m1), tens(lv1), tens(m2), tens(lv2)).item()
    assert got == pytest.approx(ref, rel=1e-8, abs=1e-11)


@given(m1=st.floats(-3, 3), m2=st.floats(-3, 3), lv1=st.floats(-4, 2), lv2=st.floats(-4, 2))
def test_4_normal_kl_is_nonnegative_and_zero_only_at_equality(m1, m2, lv1, lv2):
    """The KL is >= 0, is 0 for identical Gaussians, and is > 0 when they differ."""
    kl = ddpm.normal_kl(tens(m1), tens(lv1), tens(m2), tens(lv2)).item()
    assert kl >= 0
    assert ddpm.normal_kl(tens(m1), tens(lv1), tens(m1), tens(lv1)).item() == 0
    if abs(m1 - m2) > 1e-3 or abs(lv1 - lv2) > 1e-3:
        assert kl > 0


# ---------------------------------------------------------------------------------------------
# 5. The KL term is a weighted MSE on ε   (003 §4c; Ho Eq. 8-12)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
@given(betas=schedules(min_T=2), data=st.data())
def test_5_kl_is_weighted_eps_mse(var_type, betas, data):
    """003 §4c: with Σ_θ = σ_t² I and μ_θ in ε-form, D_KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) =
    β_t²/(2 σ_t² α_t (1-ᾱ_t)) (ε - ε_θ)² + ½(β̃_t/σ_t² - 1 - log(β̃_t/σ_t²)) (Ho Eq. 12 plus the
    variance-only constant), which vanishes at σ_t² = β̃_t (fixed_small); fixed_large has σ_t² = β_t.
    The left side is normal_kl of the code's posterior and p_mean_variance (t >= 2)."""
    d, ref = ddpm.GaussianDiffusion(betas, var_type=var_type), reference(betas)
    i = data.draw(st.integers(1, len(betas) - 1))
    x0, eps, eps_th = (data.draw(st.floats(-2, 2)) for _ in range(3))
    b, a, ac, pv = ref["beta"][i], ref["alpha"][i], ref["ac"][i], ref["post_var"][i]
    x_t = d.q_sample(tens([[x0]]), at(i), tens([[eps]]))
    q_mean, _, q_logvar = d.q_posterior_mean_variance(tens([[x0]]), x_t, at(i))
    p = d.p_mean_variance(lambda x, t: tens([[eps_th]]), x_t, at(i), clip_denoised=False)
    kl = ddpm.normal_kl(q_mean, q_logvar, p["mean"], p["log_variance"]).item()
    s2 = pv if var_type == "fixed_small" else b
    want = (b ** 2 / (2 * s2 * a * (1 - ac)) * (eps - eps_th) ** 2
            + 0.5 * (pv / s2 - 1 - math.log(pv / s2)))
    assert kl == pytest.approx(want, rel=1e-7, abs=1e-12 * (1 + b / (a * (1 - ac))))


# ---------------------------------------------------------------------------------------------
# 6. The variational bound decomposes into L_T + Σ L_{t-1} + L_0   (001 §1.3, 003 §3; Ho Eq. 3, 5)
# ---------------------------------------------------------------------------------------------

def _gaussian_reverse_model(T, rng):
    """p_θ(x_{t-1}|x_t) = N(a_t x_t + c_t, s_t²) with arbitrary parameters, p(x_T) = N(0, 1)."""
    return rng.uniform(0.5, 1.5, T), rng.uniform(-0.3, 0.3, T), rng.uniform(0.05, 1.0, T)


def _trajectories(betas, x0, n, rng):
    """x_0..x_T ~ q, stepped one transition at a time: array [T+1, n]."""
    x = np.empty((len(betas) + 1, n))
    x[0] = x0
    for t, b in enumerate(betas, start=1):
        x[t] = math.sqrt(1 - b) * x[t - 1] + math.sqrt(b) * rng.standard_normal(n)
    return x


def _log_ratio(betas, x, a, c, s):
    """log q(x_{1:T}|x_0) - log p_θ(x_{0:T}) from the definitions (Ho Eq. 1-3), per trajectory."""
    T, log_q, log_p = len(betas), 0.0, stats.norm.logpdf(x[-1])
    for t in range(1, T + 1):
        b = betas[t - 1]
        log_q = log_q + stats.norm.logpdf(x[t], math.sqrt(1 - b) * x[t - 1], math.sqrt(b))
        log_p = log_p + stats.norm.logpdf(x[t - 1], a[t - 1] * x[t] + c[t - 1], s[t - 1])
    return log_q - log_p


def _posteriors(d, x0, x):
    """(mean, sd) of q(x_{t-1}|x_t,x_0) from the code, for t = 2..T, each [n]."""
    n = x.shape[1]
    out = {}
    for t in range(2, x.shape[0]):
        m, v, _ = d.q_posterior_mean_variance(torch.full((n,), x0, dtype=F64), tens(x[t]), at(t - 1, n))
        out[t] = (m.numpy(), np.sqrt(v.numpy()))
    return out


@given(betas=schedules(max_T=6), x0=st.floats(-1, 1), seed=st.integers(0, 2 ** 32 - 1))
def test_6_vlb_telescopes_on_every_trajectory(betas, x0, seed):
    """001 §1.3, 003 §3: on every trajectory x_{1:T} ~ q(·|x_0), log q(x_{1:T}|x_0)/p_θ(x_{0:T}) =
    log q(x_T|x_0)/p(x_T) + Σ_{t>=2} log q(x_{t-1}|x_t,x_0)/p_θ(x_{t-1}|x_t) - log p_θ(x_0|x_1)
    exactly (Bayes' rule on each q(x_t|x_{t-1}), then the telescoping of Σ log q(x_t|x_0)/q(x_{t-1}|x_0)).
    Gaussian reverse model with arbitrary parameters; posterior densities from the code."""
    rng = np.random.default_rng(seed)
    d, ref, T = ddpm.GaussianDiffusion(betas), reference(betas), len(betas)
    a, c, s = _gaussian_reverse_model(T, rng)
    x = _trajectories(betas, x0, 64, rng)
    lhs = _log_ratio(betas, x, a, c, s)
    rhs = (stats.norm.logpdf(x[T], math.sqrt(ref["ac"][-1]) * x0, math.sqrt(1 - ref["ac"][-1]))
           - stats.norm.logpdf(x[T]) - stats.norm.logpdf(x0, a[0] * x[1] + c[0], s[0]))
    for t, (m, sd) in _posteriors(d, x0, x).items():
        rhs = rhs + (stats.norm.logpdf(x[t - 1], m, sd)
                     - stats.norm.logpdf(x[t - 1], a[t - 1] * x[t] + c[t - 1], s[t - 1]))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-8)


def test_6_vlb_mean_is_the_sum_of_analytic_kls_and_bounds_the_nll():
    """Ho Eq. 5: averaged over 20,000 trajectories, the log-ratio equals the average of
    L_T + Σ_{t>=2} D_KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) - log p_θ(x_0|x_1), each KL in closed
    form by normal_kl (within 5 standard errors); and both are >= -log p_θ(x_0), the exact NLL of
    the linear-Gaussian reverse model, whose marginal is propagated here in closed form (Ho Eq. 3)."""
    rng = np.random.default_rng(0)
    betas = np.array([0.3, 0.5, 0.2, 0.6])
    d, ref, T, x0, n = ddpm.GaussianDiffusion(betas), reference(betas), 4, 0.4, 20000
    a, c, s = _gaussian_reverse_model(T, rng)
    x = _trajectories(betas, x0, n, rng)
    lhs = _log_ratio(betas, x, a, c, s)
    kls = ddpm.normal_kl(tens(math.sqrt(ref["ac"][-1]) * x0), tens(math.log(1 - ref["ac"][-1])),
                         tens(0.0), tens(0.0)).item()
    kls = kls - stats.norm.logpdf(x0, a[0] * x[1] + c[0], s[0])
    for t, (m, sd) in _posteriors(d, x0, x).items():
        kls = kls + ddpm.normal_kl(tens(m), tens(2 * np.log(sd)), tens(a[t - 1] * x[t] + c[t - 1]),
                                   tens(2 * math.log(s[t - 1]))).numpy()
    diff = lhs - kls
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(n)
    mean, var = 0.0, 1.0  # p_θ(x_t) for t = T..0
    for t in range(T, 0, -1):
        mean, var = a[t - 1] * mean + c[t - 1], a[t - 1] ** 2 * var + s[t - 1] ** 2
    nll = -stats.norm.logpdf(x0, mean, math.sqrt(var))
    assert kls.mean() >= nll
    assert lhs.mean() + 5 * lhs.std() / math.sqrt(n) >= nll


# ---------------------------------------------------------------------------------------------
# 7. The prior term L_T   (003 §3 "prior matching"; Ho §4)
# ---------------------------------------------------------------------------------------------

def test_7_prior_term_is_about_1e_5_bits_per_dim():
    """Ho §4: with the linear schedule at T = 1000, L_T = D_KL(q(x_T|x_0) ‖ N(0, I)) is about
    10^-5 bits/dim on data in [-1, 1]. prior_bpd equals the KL by quadrature (scipy) for each of the
    256 levels, and its mean over the levels lies in [10^-6, 10^-4] (it is 2.9e-5 at |x_0| = 1)."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    levels = torch.arange(256, dtype=F64) / 127.5 - 1
    got = d.prior_bpd(levels[:, None])
    ac = reference(d.betas.numpy())["ac"][-1]
    for k in (0, 60, 128, 200, 255):
        q = stats.norm(math.sqrt(ac) * levels[k].item(), math.sqrt(1 - ac))
        kl, _ = integrate.quad(lambda x: q.pdf(x) * (q.logpdf(x) - stats.norm.logpdf(x)),
                               -12, 12, epsabs=1e-15, epsrel=1e-10, limit=200)
        assert got[k].item() == pytest.approx(kl / math.log(2), rel=1e-4)
    assert 1e-6 < got.mean().item() < 1e-4
    assert 2e-5 < got[255].item() < 4e-5


# ---------------------------------------------------------------------------------------------
# 8. The discretized decoder p_θ(x_0 | x_1)   (003 §3 "reconstruction"; Ho Eq. 13)
# ---------------------------------------------------------------------------------------------

LEVELS = np.arange(256) / 127.5 - 1


def reference_bin_log_prob(x, mu, sigma):
    """log P(bin of level x) under N(mu, sigma²) with SciPy: log Φ for the open edge bins, a CDF
    difference where the bin holds real mass, and in the far tail the form
    Φ(z) = ½ erfcx(-z/√2) e^{-z²/2} (scipy.special.erfcx), which has no cancellation there."""
    if x < -0.999:
        return special.log_ndtr((x + 1 / 255 - mu) / sigma)
    if x > 0.999:
        return special.log_ndtr(-(x - 1 / 255 - mu) / sigma)
    a, b = (x - 1 / 255 - mu) / sigma, (x + 1 / 255 - mu) / sigma
    if a > 0:
        a, b = -b, -a  # the same mass, reflected into the left tail
    if b > -5:
        return math.log(special.ndtr(b) - special.ndtr(a))
    r = 1 / math.sqrt(2)
    return -b * b / 2 + math.log(0.5 * (special.erfcx(-b * r)
                                        - special.erfcx(-a * r) * math.exp((b * b - a * a) / 2)))


@given(mu=st.floats(-2, 2), log_scale=st.floats(-7, 1.5))
def test_8_decoder_bins_sum_to_one(mu, log_scale):
    """Ho Eq. 13: the 256 bins (half-width 1/255, the edge bins open to ±∞) partition the line,
    so their probabilities sum to 1."""
    ll = ddpm.discretized_gaussian_log_likelihood(tens(LEVELS), tens(mu), tens(log_scale))
    assert torch.exp(ll).sum().item() == pytest.approx(1.0, abs=1e-10)


@given(mu=st.floats(-2, 2), log_scale=st.floats(-7, 1.5))
def test_8_decoder_matches_scipy_cdf_differences(mu, log_scale):
    """Ho Eq. 13: each bin's log-probability equals the SciPy normal-CDF reference, exactly (no
    approximation is used), including bins 10^5 standard deviations out in the tail."""
    ll = ddpm.discretized_gaussian_log_likelihood(tens(LEVELS), tens(mu), tens(log_scale)).numpy()
    ref = np.array([reference_bin_log_prob(x, mu, math.exp(log_scale)) for x in LEVELS])
    assert np.isfinite(ll).all()
    np.testing.assert_allclose(ll, ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 9. Schedules   (001 §4.1.1; Ho §4; Nichol & Dhariwal 2021 Eq. 17)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [21, 100, 1000, 4000])
def test_9_linear_schedule_endpoints(T):
    """Ho §4: β rises linearly from 10^-4 to 0.02 at T = 1000; at other T both ends scale by
    1000/T, which keeps ᾱ_T within a factor 2 of its T = 1000 value (4.0e-5) for T >= 100."""
    betas = ddpm.make_beta_schedule("linear", T).numpy()
    assert betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), (betas[-1] - betas[0]) / (T - 1), rtol=1e-9)
    if T >= 100:
        assert 2e-5 < np.prod(1 - betas) < 8e-5


@given(T=st.integers(1, 1000))
def test_9_cosine_schedule(T):
    """Nichol & Dhariwal Eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1+s) · π/2), s = 0.008,
    holds at every integer t before the first clipped step; β <= 0.999; ᾱ strictly decreasing;
    every coefficient the sampler and the bound use is finite."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", T))
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    want = np.array(f[1:]) / f[0]
    raw_beta = 1 - want / np.append(1.0, want[:-1])
    unclipped = np.cumprod(raw_beta < 0.999) > 0
    np.testing.assert_allclose(d.alphas_cumprod.numpy()[unclipped], want[unclipped], rtol=1e-9)
    assert (d.betas <= 0.999).all() and (d.betas > 0).all()
    assert (torch.diff(d.alphas_cumprod) < 0).all()
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert torch.isfinite(getattr(d, name)).all(), name
    assert all(torch.isfinite(getattr(d, k)).all() for k in ddpm.TABLES)


@pytest.mark.parametrize("name,T,message", [
    ("linear", 0, "num_timesteps"), ("cosine", -3, "num_timesteps"), ("linear", 2.5, "num_timesteps"),
    ("quadratic", 100, "unknown beta schedule"), ("linear", 10, "(0, 1)")])
def test_9_bad_schedules_raise(name, T, message):
    """Bad names, T < 1 and β outside (0, 1) raise ValueError with a message saying what is wrong."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ddpm.make_beta_schedule(name, T)


@pytest.mark.parametrize("betas", [[0.1, 0.0], [0.1, 1.0], [0.2, float("nan")], [-0.1], [],
                                   [[0.1, 0.2]]])
def test_9_bad_betas_raise(betas):
    with pytest.raises(ValueError, match="beta"):
        ddpm.GaussianDiffusion(betas)


# ---------------------------------------------------------------------------------------------
# 10. ε-prediction is score estimation   (003 §4 "关键结论" and §"为什么此优化有效")
# ---------------------------------------------------------------------------------------------

@st.composite
def mixtures(draw):
    k = draw(st.integers(1, 3))
    pi = np.array(draw(st.lists(st.floats(0.1, 1), min_size=k, max_size=k)))
    return Mixture(pi / pi.sum(), draw(st.lists(st.floats(-1, 1), min_size=k, max_size=k)),
                   draw(st.lists(st.floats(0.05, 0.5), min_size=k, max_size=k)))


@given(data=mixtures(), i=st.integers(0, 999), e=st.floats(-3, 3))
def test_10_optimal_eps_is_the_scaled_score(data, i, e):
    """003 §4: the minimiser of E‖ε - ε_θ(x_t)‖² is ε*(x_t) = E[ε | x_t] = -√(1-ᾱ_t) ∇ log q_t(x_t).
    For Gaussian-mixture data, E[ε | x_t] = (x_t - √ᾱ_t E[x_0 | x_t])/√(1-ᾱ_t) by quadrature over
    x_0 (scipy.integrate.quad) equals -√(1-ᾱ_t) times the score of the closed-form noisy mixture
    q_t, and the test's exact model (used by the sampler tests) equals both."""
    ac = reference(ddpm.make_beta_schedule("linear", 1000).numpy())["ac"]
    a, sd = math.sqrt(ac[i]), math.sqrt(1 - ac[i])
    xt = a * data.m[0] + math.sqrt(ac[i] * data.s[0] ** 2 + 1 - ac[i]) * e
    weight = lambda x0: data.pdf(x0) * stats.norm.pdf(xt, a * x0, sd)
    span = (min(data.m) - 8 * max(data.s), max(data.m) + 8 * max(data.s))
    opts = dict(points=list(data.m), limit=400, epsabs=1e-13, epsrel=1e-11)
    z, _ = integrate.quad(weight, *span, **opts)
    m1, _ = integrate.quad(lambda x0: x0 * weight(x0), *span, **opts)
    eps_quad = (xt - a * m1 / z) / sd
    eps_score = -sd * data.noisy_score(xt, ac[i])
    eps_model = data.eps_model(ac)(tens([[xt]]), at(i)).item()
    tol = 1e-6 * (1 + abs(eps_score))
    assert abs(eps_quad - eps_score) <= tol
    assert abs(eps_model - eps_score) <= tol


# ---------------------------------------------------------------------------------------------
# 11. The samplers reproduce the data distribution   (001 §2; Ho Alg. 2; Song et al. 2021 Eq. 12)
# ---------------------------------------------------------------------------------------------

@functools.cache
def linear_betas():
    """Ho et al.'s linear schedule at T = 1000, built when a test first asks (a bug in it is
    then that test's failure, not an error collecting the file)."""
    return ddpm.make_beta_schedule("linear", 1000)


@pytest.mark.parametrize("sampler", ["ddpm fixed_small", "ddpm fixed_large",
                                     "ddim eta=0 1000 steps", "ddim eta=1 1000 steps",
                                     "ddim eta=0 50 steps", "ddim eta=1 50 steps"])
def test_11_samplers_reproduce_the_data(sampler):
    """Ho Alg. 2 and Song Eq. 12 driven by the exact ε* of a two-mode mixture: one-sample KS test
    against the mixture CDF at level ALPHA, seed 0, n = 4,000 samples for the 1000-step samplers
    and n = 1,000 for DDIM-50. DDIM-50 has a real discretisation bias (it shrinks the spread; see
    test_11_ddim_is_euler_on_the_probability_flow_ode), which KS resolves from about n = 2,000 for
    eta = 1; that bias, not a bug, is why its n is smaller."""
    kind, *rest = sampler.split()
    var_type = rest[0] if kind == "ddpm" else "fixed_small"
    d = ddpm.GaussianDiffusion(linear_betas(), var_type=var_type)
    model = TWO_MODES.eps_model(d.alphas_cumprod)
    if kind == "ddpm":
        x = sample_1d(lambda **kw: d.p_sample_loop(model, **kw), 4000)
    else:
        eta, steps = float(rest[0][4:]), int(rest[1])
        x = sample_1d(lambda **kw: d.ddim_sample_loop(model, steps=steps, eta=eta, **kw),
                      4000 if steps == 1000 else 1000)
    assert stats.kstest(x, TWO_MODES.cdf).pvalue > ALPHA


@given(steps=st.integers(1, 1000), spacing=st.sampled_from(["uniform", "quad"]),
       m=st.floats(-0.5, 0.5), s=st.floats(0.05, 1.0))
@settings(max_examples=10)
def test_11_ddim_is_euler_on_the_probability_flow_ode(steps, spacing, m, s):
    """Song §4.3 (Eq. 13-14): with x̄ = x/√ᾱ and σ̄ = √((1-ᾱ)/ᾱ), a DDIM eta=0 step is the Euler
    step x̄_prev = x̄_t + (σ̄_prev - σ̄_t) ε(x_t) of the probability-flow ODE. For Gaussian data
    N(m, s²) with its exact ε*, the Euler recursion computed here matches ddim_sample_loop sample
    by sample, for any step count and both spacings; and the variance it gives converges to s² as
    the steps grow, the bias that the DDIM-50 KS test above works around (measured relative
    variance deficit at 10 / 100 / 1000 uniform steps: 0.66 / 0.098 / 0.012 for s = 0.25,
    0.31 / 0.036 / 0.0037 for s = 1; narrow data converge more slowly, 0.080 at 1000 for s = 0.05)."""
    d = ddpm.GaussianDiffusion(linear_betas())
    ac = reference(linear_betas().numpy())["ac"]
    data = Mixture([1.0], [m], [s])
    xT = torch.linspace(-3, 3, 25, dtype=F64)[:, None]
    got = d.ddim_sample_loop(data.eps_model(ac), xT.shape, steps=steps, eta=0.0, noise=xT,
                             clip_denoised=False, spacing=spacing)[:, 0].numpy()

    def euler(x, seq):
        ts = list(reversed(seq))
        x_bar = x / math.sqrt(ac[ts[0]])
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            sig, sig_prev = math.sqrt((1 - ac[t]) / ac[t]), (
                math.sqrt((1 - ac[t_prev]) / ac[t_prev]) if t_prev >= 0 else 0.0)
            x_t = x_bar * math.sqrt(ac[t])
            eps = -math.sqrt(1 - ac[t]) * -(x_t - math.sqrt(ac[t]) * m) / (ac[t] * s * s + 1 - ac[t])
            x_bar = x_bar + (sig_prev - sig) * eps
        return x_bar

    np.testing.assert_allclose(got, euler(xT[:, 0].numpy(), d.ddim_timesteps(steps, spacing)),
                               rtol=1e-9, atol=1e-9)
    # the map x_T -> x_0 is affine: its slope squared is the variance of the samples
    slope = lambda n: euler(1.0, d.ddim_timesteps(n)) - euler(0.0, d.ddim_timesteps(n))
    bias = [abs(slope(n) ** 2 / s ** 2 - 1) for n in (10, 100, 1000)]
    assert bias[0] > bias[1] > 2 * bias[2]


@given(x0=st.lists(st.floats(-1, 1), min_size=6, max_size=6), steps=st.integers(1, 1000),
       spacing=st.sampled_from(["uniform", "quad"]), clip=st.booleans())
@settings(max_examples=15)
def test_11_ddim_with_an_x0_oracle_returns_x0(x0, steps, spacing, clip):
    """Song Eq. 12 with eta = 0: if the model knows x_0, x̂_0 = x_0 at every step and the last step
    (to ᾱ = 1) returns x_0 exactly, for any number of steps (a loop that stops one step early
    would return a noisy x_t instead)."""
    d = ddpm.GaussianDiffusion(linear_betas())
    x0 = tens(x0).view(2, 3)
    out = d.ddim_sample_loop(x0_oracle(x0, d.alphas_cumprod), x0.shape, steps=steps, eta=0.0,
                             clip_denoised=clip, spacing=spacing,
                             noise=torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(out, x0, atol=1e-9)


@given(betas=schedules(min_T=2), data=st.data(), clip=st.booleans())
def test_11_ddim_eta1_step_is_the_ddpm_fixed_small_step(betas, data, clip):
    """Song §4.1: with eta = 1 between consecutive steps, σ_t² = β̃_t and the DDIM step is Ho's
    ancestral step with the same noise, exactly (clipped or not)."""
    d, T = ddpm.GaussianDiffusion(betas), len(betas)
    i = data.draw(st.integers(1, T - 1))
    x_t, z = (tens(data.draw(st.lists(st.floats(-3, 3), min_size=3, max_size=3)))[None]
              for _ in range(2))
    model = lambda x, t: torch.tanh(x) * 1.5
    ddim = d.ddim_sample(model, x_t, at(i), i - 1, eta=1.0, clip_denoised=clip, noise=z)["sample"]
    ddpm_step = d.p_sample(model, x_t, at(i), clip_denoised=clip, noise=z)["sample"]
    np.testing.assert_allclose(ddim, ddpm_step, rtol=1e-9, atol=1e-9)


def test_11_ddim_eta1_over_all_steps_equals_ddpm_sampling():
    """The same over whole runs: DDIM eta = 1 with all T steps and DDPM fixed_small, driven by one
    seed (each draws x_T, then one z per step but the last), give the same samples."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 200))
    model = TWO_MODES.eps_model(d.alphas_cumprod)
    a = sample_1d(lambda **kw: d.p_sample_loop(model, **kw), 64, seed=3)
    b = sample_1d(lambda **kw: d.ddim_sample_loop(model, steps=200, eta=1.0, **kw), 64, seed=3)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_11_ddim_eta1_strided_is_ddpm_on_the_respaced_chain():
    """Nichol & Dhariwal §4: DDIM eta = 1 over a strided subsequence is Ho's sampler on the chain
    restricted to it, with β recomputed from the kept ᾱ (respace), driven by the same seed."""
    d = ddpm.GaussianDiffusion(linear_betas())
    model = TWO_MODES.eps_model(d.alphas_cumprod)
    for spacing in ("uniform", "quad"):
        seq = d.ddim_timesteps(50, spacing)
        a = sample_1d(lambda **kw: d.ddim_sample_loop(model, steps=50, eta=1.0, spacing=spacing,
                                                      **kw), 64, seed=5)
        b = sample_1d(lambda **kw: d.respace(seq).p_sample_loop(model, **kw), 64, seed=5)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 12. The bound is a bound   (001 §1.3, 003 §2; Ho Eq. 3)
# ---------------------------------------------------------------------------------------------

def test_12_the_bound_is_above_the_true_nll_and_tightens_with_T():
    """003 §2: E_q[-log p_θ(x_0)] <= E_q[L], and E_q[-log p_θ(x_0)] >= H(q) for any model; so the
    full bound (calc_bpd_loop, discretized decoder) averaged over the data is at least the data's
    entropy, the true NLL. Data: three of the 256 levels with probabilities (0.2, 0.5, 0.3),
    H = 1.4855 bits; model: the exact ε*; schedule: log-SNR linear from 12 to -10, fixed_small.
    1,000 draws per level: the bound minus 3 standard errors stays >= H at T = 30, 100, 300, and the
    gap shrinks with T (measured: 0.75, 0.19, 0.06 bits)."""
    levels, probs = np.array([40, 128, 220]) / 127.5 - 1, np.array([0.2, 0.5, 0.3])
    entropy = -(probs * np.log2(probs)).sum()
    data, reps, gaps = Mixture(probs, levels, np.zeros(3)), 1000, []
    x0 = tens(np.repeat(levels, reps))[:, None]
    for T in (30, 100, 300):
        d = ddpm.GaussianDiffusion(logsnr_schedule(T))
        out = d.calc_bpd_loop(data.eps_model(d.alphas_cumprod), x0, clip_denoised=False,
                              generator=torch.Generator().manual_seed(T))
        per_level = out["total_bpd"].numpy().reshape(3, reps)
        bound = (probs * per_level.mean(1)).sum()
        se = math.sqrt((probs ** 2 * per_level.var(1) / reps).sum())
        assert bound - 3 * se >= entropy
        gaps.append(bound - entropy)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.15


def test_12_bound_parts_add_up():
    """Ho Eq. 5 as computed: total = L_T + Σ_t L_{t-1} (the decoder in column 0), all finite and
    the KL columns non-negative, for the linear schedule at T = 100 on random 8-bit images."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100))
    x0 = tens(np.random.default_rng(0).integers(0, 256, (4, 1, 3, 3)) / 127.5 - 1)
    out = d.calc_bpd_loop(lambda x, t: torch.zeros_like(x), x0,
                          generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (4, 100) and out["mse"].shape == (4, 100)
    np.testing.assert_allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-12)
    assert torch.isfinite(out["vb"]).all() and (out["vb"][:, 1:] >= 0).all()


# ---------------------------------------------------------------------------------------------
# 13. The optimum of L_simple   (001 §1.3, 003 §5; Ho Eq. 14)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", [0, 100, 500, 999])
def test_13_lsimple_optimum_is_the_conditional_mean_of_eps(i):
    """Ho Eq. 14: for Gaussian data x_0 ~ N(m, s²), the least-squares linear predictor of ε from
    x_t (NumPy lstsq on 40,000 draws from q_sample) has the slope and intercept of
    E[ε | x_t] = √(1-ᾱ_t)(x_t - √ᾱ_t m)/(ᾱ_t s² + 1 - ᾱ_t) within 5 standard errors; the mean
    training loss of that predictor is the residual variance ᾱ_t s²/(ᾱ_t s² + 1 - ᾱ_t)."""
    m, s, n = 0.3, 0.4, 40000
    d = ddpm.GaussianDiffusion(linear_betas())
    ac = reference(linear_betas().numpy())["ac"][i]
    g = torch.Generator().manual_seed(i)
    x0 = m + s * torch.randn(n, 1, dtype=F64, generator=g)
    eps = torch.randn(n, 1, dtype=F64, generator=g)
    xt = d.q_sample(x0, at(i, n), eps)[:, 0].numpy()
    X = np.stack([xt, np.ones(n)], 1)
    coef, res, *_ = np.linalg.lstsq(X, eps[:, 0].numpy(), rcond=None)
    v = ac * s * s + 1 - ac
    want = np.array([math.sqrt(1 - ac) / v, -math.sqrt(1 - ac) * math.sqrt(ac) * m / v])
    se = np.sqrt(np.diag(np.linalg.inv(X.T @ X)) * res[0] / (n - 2))
    assert (np.abs(coef - want) < 5 * se).all()
    optimum = lambda x, t: tens(want[0]) * x + tens(want[1])
    loss = d.training_losses(optimum, x0, at(i, n), noise=eps)["loss"].numpy()
    residual = ac * s * s / v
    assert abs(loss.mean() - residual) < 5 * loss.std() / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# 14. Mistakes in the notes: the written form fails, the corrected one holds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written", ["beta*eps", "(1-alpha)*eps"])
def test_14_note001_one_step_noise_is_scaled_by_the_std(written):
    """001 §1.1 writes q(x_t|x_{t-1}) as √(1-β_t) x_{t-1} + β_t ε and as √α_t x_{t-1} + (1-α_t) ε.
    Both scale ε by the variance β_t: KS rejects N(√(1-β) x, β) for that draw (n = 4,000); with the
    standard deviation √β_t, as in the N(·, β_t I) the same note writes, it is accepted."""
    b, x, n = 0.1, 0.5, 4000
    eps = np.random.default_rng(0).standard_normal(n)
    law = stats.norm(math.sqrt(1 - b) * x, math.sqrt(b))
    scale = b if written == "beta*eps" else 1 - (1 - b)
    assert stats.kstest(math.sqrt(1 - b) * x + scale * eps, law.cdf).pvalue < ALPHA
    assert stats.kstest(math.sqrt(1 - b) * x + math.sqrt(b) * eps, law.cdf).pvalue > ALPHA


def test_14_note001_two_step_composition():
    """001 §1.1 composes two steps as √(α_t α_{t-1}) x_{t-2} + √α_t β_{t-1} ε + β_t ε, whose noise
    variance α_t β_{t-1}² + β_t² is not the 1 - α_t α_{t-1} of q(x_t|x_{t-2}); with standard
    deviations √β and independent draws it is."""
    bt, bp = 0.02, 0.01
    at_ = 1 - bt
    target = 1 - at_ * (1 - bp)
    assert abs((at_ * bp ** 2 + bt ** 2) - target) > 0.5 * target
    assert (at_ * bp + bt) == pytest.approx(target, rel=1e-12)


def test_14_note002_composition_needs_independent_noise():
    """002 §2.1 writes both noise terms with the same ε: √α_t √(1-α_{t-1}) ε + √(1-α_t) ε. With
    one ε the variance is (√(α_t(1-α_{t-1})) + √(1-α_t))², not 1 - α_t α_{t-1}; the sum rule the
    note then applies needs independent draws. Sample variances of 100,000 draws, compared with
    scipy.stats.chi2 bounds at level ALPHA."""
    a_t, a_p, n = 0.9, 0.8, 100000
    rng = np.random.default_rng(0)
    e1, e2 = rng.standard_normal(n), rng.standard_normal(n)
    c1, c2 = math.sqrt(a_t * (1 - a_p)), math.sqrt(1 - a_t)
    lo, hi = (stats.chi2.ppf(q, n - 1) / (n - 1) * (1 - a_t * a_p) for q in (ALPHA / 2, 1 - ALPHA / 2))
    assert not lo < np.var(c1 * e1 + c2 * e1, ddof=1) < hi
    assert lo < np.var(c1 * e1 + c2 * e2, ddof=1) < hi
    assert (c1 + c2) ** 2 == pytest.approx(np.var(c1 * e1 + c2 * e1, ddof=1), rel=1e-2)


def test_14_note002_normal_density_normaliser():
    """002 §1.2.2 writes the normal density with 1/√(2πσ); it integrates to √σ, not 1 (quad),
    unless σ = 1. With 1/√(2πσ²) it integrates to 1 and equals scipy.stats.norm.pdf."""
    mu, sigma = 0.3, 0.25
    kernel = lambda x: math.exp(-(x - mu) ** 2 / (2 * sigma ** 2))
    written, _ = integrate.quad(lambda x: kernel(x) / math.sqrt(2 * math.pi * sigma), -np.inf, np.inf)
    right, _ = integrate.quad(lambda x: kernel(x) / math.sqrt(2 * math.pi * sigma ** 2), -np.inf, np.inf)
    assert written == pytest.approx(math.sqrt(sigma), rel=1e-9)
    assert right == pytest.approx(1.0, rel=1e-9)
    assert kernel(0.7) / math.sqrt(2 * math.pi * sigma ** 2) == pytest.approx(
        stats.norm.pdf(0.7, mu, sigma), rel=1e-12)


def test_14_note002_closed_form_drops_factors():
    """002 §2.1 writes the induction result as √(α_t…α_1) x_0 + √(1 - α_t α_{t-1} α_1) ε: the
    variance keeps only three factors, which is wrong from t = 4 on; 1 - ᾱ_t is the variance of
    the iterated chain (exact moments, as in section 1)."""
    alphas = np.array([0.9, 0.8, 0.95, 0.7, 0.85])
    var = 0.0
    for a in alphas:
        var = a * var + (1 - a)
    assert var == pytest.approx(1 - np.prod(alphas), rel=1e-12)
    assert abs((1 - alphas[-1] * alphas[-2] * alphas[0]) - var) > 0.05


def test_14_note001_forward_sample_code():
    """001 §4.1 samples x_t with `torch.rand_like` (uniform on [0, 1)) and multiplies by
    `sqrt(1 - alpha_bars)` without [t]. Uniform noise has mean ½ and variance 1/12, so its x_t
    fails the KS test against q(x_t|x_0) (n = 4,000); the coefficient is a length-T vector, not
    √(1-ᾱ_t). The code's q_sample (Gaussian noise, √(1-ᾱ_t)) passes the same test."""
    d = ddpm.GaussianDiffusion(linear_betas())
    ac = d.alphas_cumprod
    i, x, n = 300, 0.5, 4000
    law = stats.norm(math.sqrt(ac[i]) * x, math.sqrt(1 - ac[i]))
    g = torch.Generator().manual_seed(0)
    written = torch.sqrt(ac[i]) * x + torch.sqrt(1 - ac[i]) * torch.rand(n, dtype=F64, generator=g)
    assert stats.kstest(written.numpy(), law.cdf).pvalue < ALPHA
    assert torch.sqrt(1 - ac).shape == (1000,)
    eps = torch.randn(n, 1, dtype=F64, generator=g)
    right = d.q_sample(torch.full((n, 1), x, dtype=F64), at(i, n), eps)[:, 0].numpy()
    assert stats.kstest(right, law.cdf).pvalue > ALPHA


def test_14_note001_linear_schedule_endpoints_swapped():
    """001 §4.1.1 lists min_beta = 2e-2 and max_beta = 1e-4, so linspace(min, max) gives a β that
    falls from 0.02 to 1e-4; Ho's schedule (and the note's own range [1e-4, 0.02]) rises. With the
    swap the first step already adds noise of std √0.02 = 0.14, 18 bins of 8-bit data."""
    written = np.linspace(2e-2, 1e-4, 1000)
    right = ddpm.make_beta_schedule("linear", 1000).numpy()
    assert written[0] == 2e-2 and (np.diff(written) < 0).all()
    assert right[0] == pytest.approx(1e-4) and (np.diff(right) > 0).all()
    assert math.sqrt(written[0]) / (1 / 127.5) > 18


@pytest.mark.parametrize("written", ["(x_t - beta*eps)/sqrt(1-beta)", "x_t - eps"])
@given(betas=schedules(min_T=2), data=st.data())
def test_14_note001_denoising_step(written, betas, data):
    """001 §4.2 writes the reverse step as x_{t-1} = (x_t - β_t ε_θ(x_{t-1}, t))/√(1-β_t) (and §2,
    for "simple_var", as x_t - ε_θ); the network sees x_t, not the unknown x_{t-1}. Given the true
    ε, neither is the posterior mean μ̃_t(x_t, x_0) of the code (Ho Eq. 7); the ε-form
    (x_t - β_t/√(1-ᾱ_t) ε)/√α_t of Ho Eq. 11 is. Checked where the two differ by more than 1e-6."""
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas)
    i = data.draw(st.integers(1, len(betas) - 1))
    x0, eps = data.draw(st.floats(-1, 1)), data.draw(st.floats(0.5, 3))
    b, a, ac = ref["beta"][i], ref["alpha"][i], ref["ac"][i]
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * eps
    mu = d.q_posterior_mean_variance(tens([x0]), tens([xt]), at(i))[0].item()
    right = (xt - b / math.sqrt(1 - ac) * eps) / math.sqrt(a)
    wrong = (xt - b * eps) / math.sqrt(1 - b) if written.startswith("(") else xt - eps
    assert right == pytest.approx(mu, rel=1e-7, abs=1e-9)
    if abs(wrong - right) > 1e-6:
        assert wrong != pytest.approx(mu, rel=1e-7, abs=1e-9)
    # with Ho's linear schedule at t = 10 the written ε coefficient β_t is 1/√(1-ᾱ_t) > 10 times
    # too small (at large t, where 1 - ᾱ_t ≈ 1, it is nearly right)
    assert 1 / math.sqrt(1 - reference(linear_betas().numpy())["ac"][9]) > 10


@given(betas=schedules(min_T=2), data=st.data())
def test_14_note001_reverse_step_variance(betas, data):
    """001 §4.2's reverse-step code computes the posterior variance as
    β_t ᾱ_t (1-ᾱ_{t-1})/(1-ᾱ_{t-1}) = β_t ᾱ_t. The variance of the Bayes posterior (second moment of
    the scipy density product, by quad) is β̃_t = β_t (1-ᾱ_{t-1})/(1-ᾱ_t) (Ho Eq. 7), as the code's
    posterior_variance is; the written one differs (checked where they differ by > 1%)."""
    ref = reference(betas)
    i = data.draw(st.integers(1, len(betas) - 1))
    b, a, ac, acp = ref["beta"][i], ref["alpha"][i], ref["ac"][i], ref["ac_prev"][i]
    x0 = data.draw(st.floats(-1, 1))
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * data.draw(st.floats(-2, 2))
    post_var = ddpm.GaussianDiffusion(betas).posterior_variance[i].item()
    mean = (math.sqrt(acp) * b * x0 + math.sqrt(a) * (1 - acp) * xt) / (1 - ac)
    log_dens = lambda y: (stats.norm.logpdf(xt, math.sqrt(a) * y, math.sqrt(b))
                          + stats.norm.logpdf(y, math.sqrt(acp) * x0, math.sqrt(1 - acp)))
    dens = lambda y: math.exp(log_dens(y) - log_dens(mean))  # scaled: no underflow
    span = (mean - 12 * math.sqrt(post_var), mean + 12 * math.sqrt(post_var))
    z, _ = integrate.quad(dens, *span, epsabs=0, epsrel=1e-12, limit=200)
    m2, _ = integrate.quad(lambda y: (y - mean) ** 2 * dens(y), *span, epsabs=0, epsrel=1e-12,
                           limit=200)
    assert m2 / z == pytest.approx(post_var, rel=1e-6)
    written = b * ac * (1 - acp) / (1 - acp)
    if abs(written / post_var - 1) > 0.01:
        assert m2 / z != pytest.approx(written, rel=1e-3)


def test_14_note001_reverse_step_noise_code():
    """001 §4.2's reverse-step code draws its noise with `torch.rand_like` (uniform on [0, 1)), and
    its `if t == 0: noise = 0` is overwritten, so noise is added at the last step as well. Driven
    by the exact ε*, that sampler fails the KS test against the data (n = 2,000); Ho's Algorithm 2
    (Gaussian z, none at the last step) passes it (test_11)."""
    d = ddpm.GaussianDiffusion(linear_betas(), var_type="fixed_large")
    model, n = TWO_MODES.eps_model(d.alphas_cumprod), 2000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, dtype=F64, generator=g)
    with torch.no_grad():
        for i in reversed(range(1000)):
            out = d.p_mean_variance(model, x, at(i, n), clip_denoised=False)
            x = out["mean"] + d.betas[i].sqrt() * torch.rand(n, 1, dtype=F64, generator=g)
    assert stats.kstest(x[:, 0].numpy(), TWO_MODES.cdf).pvalue < ALPHA


def test_14_note001_dropping_the_sampling_noise():
    """001 §2 suggests leaving out σ_t z in Algorithm 2 for reproducible samples. With the exact ε*
    the noiseless chain does not sample the data: its outputs collapse (std far below the data's
    0.50) and KS rejects (n = 2,000). The deterministic sampler that keeps the distribution is
    DDIM with eta = 0 (test_11)."""
    d = ddpm.GaussianDiffusion(linear_betas())
    model, n = TWO_MODES.eps_model(d.alphas_cumprod), 2000
    x = torch.randn(n, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in reversed(range(1000)):
            x = d.p_mean_variance(model, x, at(i, n), clip_denoised=False)["mean"]
    assert x.std().item() < 0.1
    assert stats.kstest(x[:, 0].numpy(), TWO_MODES.cdf).pvalue < ALPHA


def test_14_note001_joint_drops_q_x0():
    """001 §1.3 writes q(x_{1:T}, x_0) = ∏_t q(x_t|x_{t-1}), which is q(x_{1:T}|x_0): as a density
    in (x_0, x_1) (T = 1) it integrates to the length of the x_0 range (dblquad over a box), not 1;
    with the data density q(x_0) as a factor it integrates to 1."""
    b, q0 = 0.3, stats.norm(0.2, 0.5)
    kernel = lambda x1, x0: stats.norm.pdf(x1, math.sqrt(1 - b) * x0, math.sqrt(b))
    box = dict(a=-4, b=4, gfun=lambda x0: -10, hfun=lambda x0: 10)
    written, _ = integrate.dblquad(kernel, **box)
    right, _ = integrate.dblquad(lambda x1, x0: kernel(x1, x0) * q0.pdf(x0), **box)
    assert written == pytest.approx(8.0, rel=1e-6)
    assert right == pytest.approx(1.0, rel=1e-4)


def test_14_note001_posterior_variance_and_conditioning():
    """001 §1.3 writes the target as q(x_{t-1}|x_t) = N(μ_t, β_t I). The posterior that is Gaussian
    is q(x_{t-1}|x_t, x_0), and its variance is β̃_t < β_t (test_2 and the previous test). Without
    x_0 it is not that Gaussian: for two-point data (x_0 = ±0.8), q(x_{t-1}|x_t) is a mixture whose
    variance, by quadrature of Bayes' rule over the noisy marginal, exceeds β̃_t."""
    ref = reference(linear_betas().numpy())
    i = 20
    b, a, acp, pv = (ref[k][i] for k in ("beta", "alpha", "ac_prev", "post_var"))
    assert pv < b
    xt = 0.0  # halfway between the two modes, where both x_0 remain equally likely
    modes = [math.sqrt(acp) * x0 for x0 in (-0.8, 0.8)]
    log_dens = lambda y: (stats.norm.logpdf(xt, math.sqrt(a) * y, math.sqrt(b)) + np.logaddexp(
        *[stats.norm.logpdf(y, mu, math.sqrt(1 - acp)) for mu in modes]))
    peak = max(log_dens(y) for y in np.linspace(-1, 1, 2001))
    dens = lambda y: math.exp(log_dens(y) - peak)
    opts = dict(epsabs=0, epsrel=1e-11, limit=400, points=[-0.1, 0, 0.1])
    z, _ = integrate.quad(dens, -1, 1, **opts)
    m2, _ = integrate.quad(lambda y: y * y * dens(y), -1, 1, **opts)  # the mean is 0 by symmetry
    assert m2 / z > 2 * pv


def test_14_note001_bound_needs_the_expectation():
    """001 §1.3 rewrites the KL term of -log p(x_0) <= -log p(x_0) + D_KL(q(x_{1:T}|x_0) ‖
    p(x_{1:T}|x_0)) as the bare log-ratio log q/p, without the expectation over q. The KL is >= 0
    but the log-ratio is negative on a good share of trajectories (T = 1, Gaussian model), so the
    inequality holds only in expectation."""
    b, x0, n = 0.3, 0.5, 20000
    rng = np.random.default_rng(0)
    x1 = math.sqrt(1 - b) * x0 + math.sqrt(b) * rng.standard_normal(n)
    # p(x_1 | x_0) under p_θ(x_1) = N(0, 1), p_θ(x_0|x_1) = N(0.6 x_1, 0.5²): Gaussian by Bayes
    post_var = 1 / (1 + 0.36 / 0.25)
    post_mean = post_var * 0.6 * x0 / 0.25
    ratio = (stats.norm.logpdf(x1, math.sqrt(1 - b) * x0, math.sqrt(b))
             - stats.norm.logpdf(x1, post_mean, math.sqrt(post_var)))
    kl = ddpm.normal_kl(tens(math.sqrt(1 - b) * x0), tens(math.log(b)), tens(post_mean),
                        tens(math.log(post_var))).item()
    assert kl > 0 and ratio.mean() == pytest.approx(kl, abs=5 * ratio.std() / math.sqrt(n))
    assert (ratio < 0).mean() > 0.1


def test_14_note003_vlb_middle_step():
    """003 §3 rewrites the bound as E[log p_θ(x_0|x_1) + Σ_{t>=2} log p_θ/q(x_{t-1}|x_t,x_0)
    - Σ_t log q(x_t|x_{t-1})/q(x_{t-1}|x_0)] + C. Bayes' rule gives q(x_t|x_0) where it writes
    q(x_t|x_{t-1}) (and at t = 1 its q(x_0|x_0) is undefined, so that term is left out here). On
    trajectories, the written form minus the true log-ratio varies (no constant C makes it hold);
    with q(x_t|x_0) and the prior log p(x_T), the difference is 0 on every trajectory."""
    betas = np.array([0.2, 0.4, 0.3])
    ref, rng = reference(betas), np.random.default_rng(0)
    d, T, x0 = ddpm.GaussianDiffusion(betas), 3, 0.3
    a, c, s = _gaussian_reverse_model(T, rng)
    x = _trajectories(betas, x0, 2000, rng)
    truth = -_log_ratio(betas, x, a, c, s)  # log p_θ(x_{0:T})/q(x_{1:T}|x_0)
    q_marg = lambda t, y: stats.norm.logpdf(y, math.sqrt(ref["ac"][t - 1]) * x0,
                                            math.sqrt(1 - ref["ac"][t - 1]))
    common = stats.norm.logpdf(x0, a[0] * x[1] + c[0], s[0])
    for t, (m, sd) in _posteriors(d, x0, x).items():
        common = common + (stats.norm.logpdf(x[t - 1], a[t - 1] * x[t] + c[t - 1], s[t - 1])
                           - stats.norm.logpdf(x[t - 1], m, sd))
    written = common - sum(stats.norm.logpdf(x[t], math.sqrt(1 - betas[t - 1]) * x[t - 1],
                                             math.sqrt(betas[t - 1])) - q_marg(t - 1, x[t - 1])
                           for t in range(2, T + 1))
    right = (common + stats.norm.logpdf(x[T]) - stats.norm.logpdf(x[1], math.sqrt(1 - betas[0]) * x0,
                                                                  math.sqrt(betas[0]))
             - sum(q_marg(t, x[t]) - q_marg(t - 1, x[t - 1]) for t in range(2, T + 1)))
    assert np.std(written - truth) > 0.1
    np.testing.assert_allclose(right, truth, atol=1e-9)


@given(betas=schedules(min_T=2), data=st.data())
def test_14_note003_sign_of_the_mean_difference(betas, data):
    """003 §4c writes μ̃_t - μ_θ = β_t/(√α_t √(1-ᾱ_t)) (ε - ε_θ). With μ_θ of Ho Eq. 11 the
    difference is β_t/(√α_t √(1-ᾱ_t)) (ε_θ - ε): the written sign is wrong (harmless inside ‖·‖²,
    where both agree)."""
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas)
    i = data.draw(st.integers(1, len(betas) - 1))
    x0, eps = data.draw(st.floats(-1, 1)), data.draw(st.floats(-2, 2))
    eps_th = eps + data.draw(st.floats(0.1, 2))
    b, a, ac = ref["beta"][i], ref["alpha"][i], ref["ac"][i]
    x_t = d.q_sample(tens([[x0]]), at(i), tens([[eps]]))
    diff = (d.q_posterior_mean_variance(tens([[x0]]), x_t, at(i))[0]
            - d.p_mean_variance(lambda x, t: tens([[eps_th]]), x_t, at(i), False)["mean"]).item()
    k = b / (math.sqrt(a) * math.sqrt(1 - ac))
    tol = 1e-9 * (1 + abs(k) * (abs(eps) + abs(eps_th)) + abs(x_t.item()) / math.sqrt(a))
    assert abs(diff - k * (eps_th - eps)) <= tol
    assert abs(diff - k * (eps - eps_th)) > tol
    assert diff ** 2 == pytest.approx((k * (eps - eps_th)) ** 2, rel=1e-6)
