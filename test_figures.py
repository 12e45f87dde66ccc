"""The figures of docs/derivations.md show what the code computes: each figure's data function in
docs/figures.py is called again here and its numbers are checked against the closed forms and
SciPy references of test_math.py (the pictures themselves are not compared). The two figures
drawn from a trained model are checked on a small UNet made here."""
import importlib.util
import math
import os

import numpy as np
import pytest
import scipy.stats as stats
import torch

import ddpm
import unet
from test_math import ALPHA, Mixture, reference, reference_bin_log_prob

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("figures", os.path.join(HERE, "docs", "figures.py"))
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

F64 = torch.float64
LINEAR_AC = reference(ddpm.make_beta_schedule("linear", 1000).numpy())
SMALL = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
             attn_resolutions=(4,), dropout=0.0, image_size=8, norm_groups=4)


def noisy(mixture, i):
    """q_t of 1-D mixture data at 0-based index i (linear schedule), as test_math's Mixture: each
    component N(m, s²) becomes N(√ᾱ m, ᾱ s² + 1 - ᾱ)."""
    pi, m, s = (np.asarray(v, dtype=np.float64) for v in mixture)
    ac = LINEAR_AC["ac"][i]
    return Mixture(pi, math.sqrt(ac) * m, np.sqrt(ac * s ** 2 + 1 - ac))


# ---- section 9 --------------------------------------------------------------------------------

def test_schedule_figure_shows_the_closed_forms():
    """ᾱ_t = ∏(1-β_s), log-SNR = log(ᾱ_t/(1-ᾱ_t)) and β̃_t/β_t = (1-ᾱ_{t-1})/(1-ᾱ_t) from NumPy
    (test_math.reference); the cosine ᾱ_t = f(t)/f(0) of Nichol & Dhariwal Eq. 17 (test_9)."""
    data = figures.schedule_data()
    for name, d in data.items():
        ref = reference(ddpm.make_beta_schedule(name, 1000).numpy())
        np.testing.assert_allclose(d["t"], np.arange(1, 1001) / 1000)
        np.testing.assert_allclose(d["alpha_bar"], ref["ac"], rtol=1e-9)
        np.testing.assert_allclose(d["log_snr"], np.log(ref["ac"] / (1 - ref["ac"])), rtol=1e-9,
                                   atol=1e-9)
        np.testing.assert_allclose(d["beta_ratio"], (1 - ref["ac_prev"]) / (1 - ref["ac"]),
                                   rtol=1e-9, atol=1e-12)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    want = f[1:] / f[0]
    np.testing.assert_allclose(data["cosine"]["alpha_bar"][:-1], want[:-1], rtol=1e-9)


# ---- section 1 --------------------------------------------------------------------------------

def test_forward_figure_shows_q_xt_given_x0():
    """The drawn density is the closed form Σ π N(√ᾱ m, ᾱ s² + 1 - ᾱ) (scipy.stats.norm), and the
    histogrammed q_sample draws pass a one-sample KS test against its CDF (n = 4,000, level ALPHA)."""
    d = figures.forward_data(n=4000, seed=1)
    for i, t in enumerate(d["paper_t"]):
        law = noisy(figures.MIXTURE_1D, t - 1)
        np.testing.assert_allclose(d["density"][i], law.pdf(d["grid"]), rtol=1e-9, atol=1e-300)
        assert stats.kstest(d["samples"][i], law.cdf).pvalue > ALPHA


# ---- section 2 --------------------------------------------------------------------------------

def test_posterior_figure_shows_bayes_rule():
    """Both curves equal q(x_t|x_{t-1}) q(x_{t-1}|x_0) / q(x_t|x_0) from scipy.stats.norm densities
    (test_2): the code's N(μ̃_t, β̃_t) to rounding, the numerically normalised product to the
    trapezoid rule's accuracy."""
    d = figures.posterior_data()
    for i, t in enumerate(d["paper_t"]):
        b, a = LINEAR_AC["beta"][t - 1], LINEAR_AC["alpha"][t - 1]
        ac, acp = LINEAR_AC["ac"][t - 1], LINEAR_AC["ac_prev"][t - 1]
        x0, xt, y = d["x0"], d["x_t"][i], d["grid"][i]
        assert xt == pytest.approx(math.sqrt(ac) * x0 + math.sqrt(1 - ac) * 1.0, rel=1e-12)
        bayes = np.exp(stats.norm.logpdf(xt, math.sqrt(a) * y, math.sqrt(b))
                       + stats.norm.logpdf(y, math.sqrt(acp) * x0, math.sqrt(1 - acp))
                       - stats.norm.logpdf(xt, math.sqrt(ac) * x0, math.sqrt(1 - ac)))
        np.testing.assert_allclose(d["code"][i], bayes, rtol=1e-6, atol=1e-9 * bayes.max())
        np.testing.assert_allclose(d["bayes"][i], bayes, rtol=1e-4, atol=1e-6 * bayes.max())


# ---- section 10 -------------------------------------------------------------------------------

def test_score_figure_shows_eps_star_and_the_scaled_score():
    """Both curves equal -√(1-ᾱ_t) ∇ log q_t(x_t), the score of the closed-form noisy mixture
    (test_math.Mixture.noisy_score, which test_10 checks against E[ε | x_t] by quadrature)."""
    d = figures.score_data()
    for i, t in enumerate(d["paper_t"]):
        ac = LINEAR_AC["ac"][t - 1]
        data = Mixture(*figures.MIXTURE_1D)
        want = np.array([-math.sqrt(1 - ac) * data.noisy_score(x, ac) for x in d["grid"]])
        np.testing.assert_allclose(d["eps_star"][i], want, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(d["score"][i], want, rtol=1e-9, atol=1e-9)


# ---- section 11 -------------------------------------------------------------------------------

def test_sampler_figure_shows_samples_of_the_data():
    """The drawn density is the mixture's (scipy.stats.norm), and each sampler's samples, driven by
    the exact ε*, pass a one-sample KS test against the mixture CDF at n = 1,000 (the DDIM-50
    bias that test_11 describes stays below what KS resolves at this n)."""
    d = figures.sampler_data(n=1000, seed=2)
    data = Mixture(*figures.MIXTURE_1D)
    np.testing.assert_allclose(d["density"], data.pdf(d["grid"]), rtol=1e-9)
    for name, xs in d["samples"].items():
        assert stats.kstest(xs, data.cdf).pvalue > ALPHA, name


def mixture_score_2d(x, ac, mixture):
    """∇ log q_t(x) of isotropic 2-D Gaussian-mixture data, differentiated by hand: Σ_k r_k
    (-(x - √ᾱ m_k)/v_k), v_k = ᾱ s_k² + 1 - ᾱ, r_k ∝ π_k N(x; √ᾱ m_k, v_k I)."""
    pi, m, s = (np.asarray(v, dtype=np.float64) for v in mixture)
    v = ac * s ** 2 + 1 - ac
    diff = x[:, None, :] - math.sqrt(ac) * m[None]
    logr = np.log(pi) - np.log(v) - 0.5 * (diff ** 2).sum(-1) / v
    r = np.exp(logr - logr.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return (r[..., None] * -diff / v[None, :, None]).sum(1)


def test_guidance_figure_shows_the_guided_score():
    """The arrows are (1 + w) ∇log q_t(x | c) - w ∇log q_t(x) (Ho & Salimans Eq. 6 in score form),
    from the hand-differentiated mixture scores; at w = 0 the guided samples are the class's
    Gaussian (KS per coordinate, n = 500), and at w = 3 they are pulled tighter (smaller spread)."""
    d = figures.guidance_data(n=500, seed=3)
    pi, m, s = figures.MIXTURE_2D
    c, ac = d["label"], LINEAR_AC["ac"][figures.GUIDANCE_T - 1]
    cond = mixture_score_2d(d["grid"], ac, ([1.0], [m[c]], [s[c]]))
    uncond = mixture_score_2d(d["grid"], ac, figures.MIXTURE_2D)
    for w, field in zip(d["w"], d["field"]):
        np.testing.assert_allclose(field, (1 + w) * cond - w * uncond, rtol=1e-9, atol=1e-9)
    for j in range(2):
        law = stats.norm(m[c][j], s[c])
        assert stats.kstest(d["samples"][0][:, j], law.cdf).pvalue > ALPHA
    assert d["samples"][1].std(0).max() < 0.8 * d["samples"][0].std(0).min()


# ---- the figures drawn from a trained model, on a small UNet made here -------------------------

def small_model(seed=0):
    torch.manual_seed(seed)
    net = unet.UNet(**SMALL).double().eval().requires_grad_(False)
    return lambda x, t: net(x, t)


def images(n, seed=0):
    levels = np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8))
    return torch.as_tensor(levels / 127.5 - 1, dtype=F64)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_bound_figure_terms_are_the_closed_forms(var_type):
    """On a small UNet: every KL column L_{t-1} (t >= 2) is section 5's closed form
    β_t²/(2σ_t² α_t (1-ᾱ_t)) ‖ε - ε_θ‖² + ½(β̃_t/σ_t² - 1 - log(β̃_t/σ_t²)) of the same draw,
    in bits/dim; L_T is the KL of N(√ᾱ_T x_0, 1-ᾱ_T) from N(0, 1) in closed form; the total is their
    sum (Ho Eq. 5)."""
    betas = ddpm.make_beta_schedule("cosine", 30)
    d, ref = ddpm.GaussianDiffusion(betas, var_type=var_type), reference(betas.numpy())
    x0 = images(3)
    out = figures.bound_data(d, small_model(), x0, seed=4)
    b, a, ac, pv = (ref[k][1:] for k in ("beta", "alpha", "ac", "post_var"))  # t >= 2
    s2 = pv if var_type == "fixed_small" else b
    want = b ** 2 / (2 * s2 * a * (1 - ac)) * out["mse"][:, 1:] + 0.5 * (pv / s2 - 1 - np.log(pv / s2))
    np.testing.assert_allclose(out["vb"][:, 1:], want / math.log(2), rtol=1e-7)
    x, ac = x0.numpy().reshape(3, -1), ref["ac"]
    prior = 0.5 * (ac[-1] * x ** 2 + (1 - ac[-1]) - 1 - math.log(1 - ac[-1])).mean(1) / math.log(2)
    np.testing.assert_allclose(out["prior"], prior, rtol=1e-9)
    np.testing.assert_allclose(out["total"], out["vb"].sum(1) + out["prior"], rtol=1e-12)


def test_bound_figure_decoder_term_is_the_discretized_likelihood():
    """L_0 (column 0) with a model whose x̂_0 is a known image c at every x_t: -log₂ of each
    pixel's bin probability under N(c, σ_1²), σ_1² = β̃_2 (the clipped first variance), from the
    SciPy CDF reference of test_8."""
    betas = ddpm.make_beta_schedule("cosine", 30)
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas.numpy())
    x0, c = images(2, seed=5), 0.9 * images(2, seed=6)
    ac_table = torch.as_tensor(ref["ac"])

    def model(x, t):  # ε such that (x - √(1-ᾱ) ε)/√ᾱ = c
        a = ac_table[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()
    out = figures.bound_data(d, model, x0, seed=0)
    sd = math.sqrt(ref["post_var"][1])
    for k in range(2):
        want = -np.mean([reference_bin_log_prob(x, mu, sd) for x, mu in
                         zip(x0[k].flatten().tolist(), c[k].flatten().tolist())]) / math.log(2)
        assert out["vb"][k, 0] == pytest.approx(want, rel=1e-7)


def test_trajectory_figure_shows_q_sample_and_algorithm_2():
    """Forward: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho Eq. 4, ᾱ from NumPy). Reverse, on a small UNet: the
    first snapshot is x_T ~ N(0, I) from the seed; each x̂_0 is (x_t - √(1-ᾱ_t) ε_θ(x_t, t))/√ᾱ_t
    clipped to [-1, 1] (Ho Eq. 15); the snapshots are evenly spaced from t = T to t = 1; and the
    sample is the x̂_0 of the last step (β̃_1 = 0, μ̃_1 = x̂_0: section 2)."""
    betas = ddpm.make_beta_schedule("cosine", 30)
    d, ac = ddpm.GaussianDiffusion(betas), reference(betas.numpy())["ac"]
    model, x0 = small_model(1), images(1, seed=7)
    out = figures.trajectory_data(d, model, x0, shown=5, seed=8)
    np.testing.assert_array_equal(out["t_forward"], [0, 7, 14, 22, 29])
    for k, i in enumerate(out["t_forward"]):
        want = math.sqrt(ac[i]) * out["x0"] + math.sqrt(1 - ac[i]) * out["eps"]
        np.testing.assert_allclose(out["forward"][k], want, rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(8)
    torch.randn(x0.shape, generator=g, dtype=F64)  # the forward ε comes first
    np.testing.assert_array_equal(out["x_t"][0], torch.randn(x0.shape, generator=g, dtype=F64)[0])
    np.testing.assert_array_equal(out["t_reverse"], [29, 22, 15, 7, 0])
    for k, i in enumerate(out["t_reverse"]):
        x_t = torch.as_tensor(out["x_t"][k])[None]
        eps = model(x_t, torch.tensor([int(i)])).numpy()[0]
        want = np.clip((out["x_t"][k] - math.sqrt(1 - ac[i]) * eps) / math.sqrt(ac[i]), -1, 1)
        np.testing.assert_allclose(out["pred_x0"][k], want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out["sample"], out["pred_x0"][-1], rtol=1e-12, atol=1e-12)


# ---- the script -------------------------------------------------------------------------------

def test_committed_figures_are_small_pngs():
    folder = os.path.join(HERE, "docs", "figures")
    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    assert set(figures.NO_MODEL) <= {p[:-4] for p in pngs}
    for p in pngs:
        with open(os.path.join(folder, p), "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 200_000, p


def test_the_script_draws_a_figure_and_refuses_model_figures_without_a_model(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    figures.main(["--only", "schedules", "--out", str(tmp_path)])
    assert (tmp_path / "schedules.png").stat().st_size < 200_000
    with pytest.raises(figures.cli.UserError, match="--checkpoint"):
        figures.parse_args(["--only", "bound", "--out", str(tmp_path)])
    with pytest.raises(figures.cli.UserError, match="no checkpoint at"):
        figures.parse_args(["--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(figures.cli.UserError, match="--images"):
        figures.parse_args(["--images", "0"])
