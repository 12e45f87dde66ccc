"""Behaviour of ddpm.py beyond the derivations: the three parameterisations, the variance choices,
the loss weighting and its stop-gradient, respacing, dtypes and devices, seeds, and the errors a
user sees. References are closed forms written here or a second path through the code that must
agree; test_math.py holds the derivation checks."""
import math

import numpy as np
import pytest
import torch

import scipy.special as special

import ddpm

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def at(i, n=1, device="cpu"):
    return torch.full((n,), int(i), dtype=torch.long, device=device)


def oracle(x0, d, mean_type):
    """A model that knows x_0 and answers in the given parameterisation."""
    def model(x, t):
        ac = d.alphas_cumprod.to(x)[t].view(-1, *[1] * (x.dim() - 1))
        eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt()
        return {"eps": eps, "x0": x0.expand_as(x), "v": ac.sqrt() * eps - (1 - ac).sqrt() * x0}[mean_type]
    return model


@pytest.fixture
def cosine100():
    return ddpm.make_beta_schedule("cosine", 100)


# ---- parameterisations ----------------------------------------------------------------------

@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_parameterisations_agree_on_the_oracle(mean_type, cosine100):
    """ε, x_0 and v predictions of the same truth give the same x̂_0 and μ_θ = μ̃_t(x_t, x_0), and
    zero training loss (v = √ᾱ ε - √(1-ᾱ) x_0, Salimans & Ho §4)."""
    d = ddpm.GaussianDiffusion(cosine100, mean_type=mean_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 2, 3, dtype=F64, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 50, 90, 99])
    noise = torch.randn(x0.shape, dtype=F64, generator=g)
    x_t = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(oracle(x0, d, mean_type), x_t, t, clip_denoised=False)
    want_mean = d.q_posterior_mean_variance(x0, x_t, t)[0]
    np.testing.assert_allclose(out["pred_x0"], x0, atol=1e-9)
    np.testing.assert_allclose(out["mean"], want_mean, atol=1e-9)
    loss = d.training_losses(oracle(x0, d, mean_type), x0, t, noise=noise)
    assert loss["loss"].max().item() < 1e-20


def test_clipping_changes_only_out_of_range_predictions(cosine100):
    """clip_denoised clamps x̂_0 to [-1, 1] before μ̃_t: the same mean where x̂_0 is inside,
    a different one where it is not."""
    d = ddpm.GaussianDiffusion(cosine100)
    x_t = torch.tensor([[0.2], [3.0]], dtype=F64)
    model = lambda x, t: torch.zeros_like(x)        # x̂_0 = x_t/√ᾱ_t
    t = at(5, 2)
    a = d.p_mean_variance(model, x_t, t, clip_denoised=True)
    b = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    assert a["pred_x0"][1].item() == 1.0 and b["pred_x0"][1].item() > 1
    assert a["mean"][0].item() == pytest.approx(b["mean"][0].item(), abs=1e-15)
    assert a["mean"][1].item() != pytest.approx(b["mean"][1].item(), abs=1e-6)


# ---- variances ------------------------------------------------------------------------------

def test_fixed_variances(cosine100):
    """fixed_small: σ² = β̃_t (0 at the first step, log clipped to log β̃_2); fixed_large: σ² = β_t,
    with β̃_2 at the first step (Ho's code)."""
    small = ddpm.GaussianDiffusion(cosine100, var_type="fixed_small")
    large = ddpm.GaussianDiffusion(cosine100, var_type="fixed_large")
    x = torch.zeros(3, 1, dtype=F64)
    t = torch.tensor([0, 1, 99])
    zero = lambda x, t: torch.zeros_like(x)
    ps, pl = small.p_mean_variance(zero, x, t), large.p_mean_variance(zero, x, t)
    b, pv = small.betas, small.posterior_variance
    np.testing.assert_allclose(ps["variance"].flatten(), [0.0, pv[1], pv[99]], rtol=1e-12)
    np.testing.assert_allclose(ps["log_variance"].flatten().exp(), [pv[1], pv[1], pv[99]], rtol=1e-12)
    np.testing.assert_allclose(pl["variance"].flatten(), [pv[1], b[1], b[99]], rtol=1e-12)


def test_learned_range_interpolates_log_variance(cosine100):
    """Nichol & Dhariwal Eq. 15: output v = 1 gives β_t, v = -1 gives β̃_t (clipped), v = 0 their
    geometric mean."""
    d = ddpm.GaussianDiffusion(cosine100, var_type="learned_range", loss_type="hybrid")
    x = torch.zeros(3, 1, 2, dtype=F64)
    t = at(40, 3)
    v = torch.tensor([1.0, -1.0, 0.0], dtype=F64).view(3, 1, 1).expand(3, 1, 2)
    out = d.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), v], 1), x, t)
    b, pv = d.betas[40].item(), d.posterior_variance[40].item()
    np.testing.assert_allclose(out["variance"][:, 0, 0], [b, pv, math.sqrt(b * pv)], rtol=1e-12)


# ---- losses ---------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """A per-pixel affine model with separate mean and variance parameters."""

    def __init__(self, out_channels):
        super().__init__()
        self.mean = torch.nn.Linear(2, 1, dtype=F64)
        self.var = torch.nn.Linear(2, 1, dtype=F64) if out_channels == 2 else None

    def forward(self, x, t):
        feats = torch.stack([x, (t.to(x) / 100).view(-1, 1, 1).expand_as(x)], -1)
        out = self.mean(feats)[..., 0]
        return out if self.var is None else torch.cat([out, torch.tanh(self.var(feats)[..., 0])], 1)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (6, 1, 4), generator=g).to(F64) / 127.5 - 1
    return x0, torch.tensor([0, 1, 5, 30, 70, 99]), torch.randn(6, 1, 4, dtype=F64, generator=g)


def test_loss_weights(cosine100):
    """simple: loss = mse; vlb: loss = T·L_t (the one-sample unbiased estimate of Σ_t L_t);
    hybrid: mse + λ T L_t with λ = 0.001 (Nichol & Dhariwal Eq. 16). L_t is checked against
    normal_kl (t > 0) and the decoder (t = 0) computed here, in bits/dim."""
    x0, t, noise = _batch()
    net = TinyNet(2)
    for loss_type in ("vlb", "hybrid"):
        d = ddpm.GaussianDiffusion(cosine100, var_type="learned_range", loss_type=loss_type)
        out = d.training_losses(net, x0, t, noise=noise)
        x_t = d.q_sample(x0, t, noise)
        p = d.p_mean_variance(net, x_t, t, clip_denoised=False)
        qm, _, qlv = d.q_posterior_mean_variance(x0, x_t, t)
        kl = ddpm.normal_kl(qm, qlv, p["mean"], p["log_variance"]).mean((1, 2)) / math.log(2)
        nll = -ddpm.discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"]).mean((1, 2)) / math.log(2)
        vb = torch.where(t == 0, nll, kl)
        np.testing.assert_allclose(out["vb"].detach(), vb.detach(), rtol=1e-10)
        want = 100 * vb if loss_type == "vlb" else out["mse"] + 0.001 * 100 * vb
        np.testing.assert_allclose(out["loss"].detach(), want.detach(), rtol=1e-10)
    d = ddpm.GaussianDiffusion(cosine100)
    out = d.training_losses(TinyNet(1), x0, t, noise=noise)
    assert set(out) == {"loss", "mse"} and torch.equal(out["loss"], out["mse"])


def test_hybrid_stops_the_vb_gradient_at_the_mean(cosine100):
    """Nichol & Dhariwal §3.1: in L_hybrid the VB term trains only the variance. The mean
    parameters get exactly the L_simple gradient; the variance parameters get the VB gradient."""
    x0, t, noise = _batch(1)
    torch.manual_seed(0)
    net = TinyNet(2)
    hybrid = ddpm.GaussianDiffusion(cosine100, var_type="learned_range", loss_type="hybrid")
    hybrid.training_losses(net, x0, t, noise=noise)["loss"].sum().backward()
    g_mean, g_var = net.mean.weight.grad.clone(), net.var.weight.grad.clone()
    net.zero_grad()
    mse = hybrid.training_losses(net, x0, t, noise=noise)["mse"].sum()
    mse.backward()
    np.testing.assert_allclose(g_mean, net.mean.weight.grad, rtol=1e-12)
    assert net.var.weight.grad is None or net.var.weight.grad.abs().max() == 0
    assert g_var.abs().max() > 0
    # with loss_type "vlb" the mean does receive the VB gradient
    net.zero_grad()
    vlb = ddpm.GaussianDiffusion(cosine100, var_type="learned_range", loss_type="vlb")
    vlb.training_losses(net, x0, t, noise=noise)["loss"].sum().backward()
    assert net.mean.weight.grad.abs().max() > 0


def test_decoder_gradient_is_finite_in_the_tails():
    """The log-space decoder gives finite values and gradients even 10^4 standard deviations out."""
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=F64)
    mean = torch.full((5,), 0.9, dtype=F64, requires_grad=True)
    log_scale = torch.full((5,), math.log(1e-4), dtype=F64, requires_grad=True)
    ll = ddpm.discretized_gaussian_log_likelihood(x, mean, log_scale)
    ll.sum().backward()
    assert torch.isfinite(ll).all() and torch.isfinite(mean.grad).all()
    assert torch.isfinite(log_scale.grad).all()
    assert ll[0].item() < -1e7


# ---- respacing ------------------------------------------------------------------------------

def test_respace_keeps_alpha_bar_and_maps_timesteps():
    """Respacing recomputes β from the kept ᾱ so that ᾱ at the kept steps is unchanged, and the
    model is called with the original timesteps; keeping the original β would not keep ᾱ."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    keep = list(range(0, 1000, 40))
    r = d.respace(keep)
    assert r.num_timesteps == 25
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[keep], rtol=1e-12)
    naive = torch.cumprod(1 - d.betas[keep], 0)
    assert (naive / d.alphas_cumprod[keep]).max() > 10
    seen = []
    r.p_mean_variance(lambda x, t: seen.append(t.tolist()) or torch.zeros_like(x),
                      torch.zeros(2, 1), torch.tensor([0, 24]))
    assert seen == [[0, 960]]
    assert r.respace([0, 24]).timestep_map.tolist() == [0, 960]


# ---- dtypes, devices, seeds -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dtype_and_device_follow_the_input(device, dtype, cosine100):
    """Outputs keep the input's dtype and device; the tables are copied to a device once and
    reused (the same tensor object on every call)."""
    d = ddpm.GaussianDiffusion(cosine100)
    x0 = torch.rand(4, 1, 3, 3, dtype=dtype, device=device)
    t = torch.tensor([0, 3, 50, 99], device=device)
    x_t = d.q_sample(x0, t)
    out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x_t, t)
    loss = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t)["loss"]
    for v in (x_t, out["mean"], out["log_variance"], loss):
        assert v.dtype == dtype and v.device.type == device
    table = d._on(d.alphas_cumprod, x0.device)
    d.q_sample(x0, t)
    assert d._on(d.alphas_cumprod, x0.device) is table
    assert table.dtype == F64


def test_float32_matches_float64(cosine100):
    """Float32 inputs use float64 tables cast per call: the posterior mean agrees with float64
    to float32 precision at every t, including where ᾱ_t is tiny."""
    d = ddpm.GaussianDiffusion(cosine100)
    x0 = torch.linspace(-1, 1, 100, dtype=F64)[:, None]
    x_t = d.q_sample(x0, torch.arange(100), torch.ones_like(x0))
    m64 = d.p_mean_variance(lambda x, t: torch.full_like(x, 0.5), x_t, torch.arange(100))["mean"]
    m32 = d.p_mean_variance(lambda x, t: torch.full_like(x, 0.5), x_t.float(), torch.arange(100))["mean"]
    np.testing.assert_allclose(m32.double(), m64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim_eta"])
def test_same_seed_same_samples_and_trajectory(sampler, cosine100):
    """A generator seed fixes the samples; trajectory=K returns K snapshots, the first at the start
    (x_T itself) and the last at the final step."""
    d = ddpm.GaussianDiffusion(cosine100)
    model = lambda x, t: 0.1 * x
    run = {"ddpm": lambda **kw: d.p_sample_loop(model, (3, 1, 2, 2), **kw),
           "ddim": lambda **kw: d.ddim_sample_loop(model, (3, 1, 2, 2), steps=10, eta=0.0, **kw),
           "ddim_eta": lambda **kw: d.ddim_sample_loop(model, (3, 1, 2, 2), steps=10, eta=0.5, **kw)}[sampler]
    a = run(generator=torch.Generator().manual_seed(7))
    b, traj = run(generator=torch.Generator().manual_seed(7), trajectory=4)
    c = run(generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert traj["x_t"].shape == (4, 3, 1, 2, 2) and traj["pred_x0"].shape == (4, 3, 1, 2, 2)
    assert traj["t"][0].item() == (99 if sampler == "ddpm" else 90) and traj["t"][-1].item() == 0
    x_T = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(traj["x_t"][0], x_T)


def test_ddim_timesteps():
    """Song et al.'s sequences: uniform T=1000, 50 steps -> 0, 20, ..., 980; quad ends at 0.8 T and
    loses the repeat of 0 its formula makes at 50 steps (49 distinct steps)."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    assert d.ddim_timesteps(50) == list(range(0, 1000, 20))
    assert d.ddim_timesteps(1000) == list(range(1000))
    assert d.ddim_timesteps(1) == [0]
    q = d.ddim_timesteps(50, "quad")
    assert q[0] == 0 and q[-1] == 800 and len(q) == 49 and q == sorted(set(q))


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(mean_type="score"), "unknown mean_type 'score'; choose one of eps, x0, v"),
    (dict(var_type="learned"), "unknown var_type"),
    (dict(loss_type="l1"), "unknown loss_type"),
    (dict(var_type="learned_range"), "needs loss_type 'hybrid' or 'vlb'"),
    (dict(loss_type="hybrid"), "with a fixed variance use loss_type 'simple'")])
def test_bad_options_raise(kwargs, match, cosine100):
    with pytest.raises(ValueError, match=match):
        ddpm.GaussianDiffusion(cosine100, **kwargs)


def test_bad_calls_raise_one_line_errors(cosine100):
    d = ddpm.GaussianDiffusion(cosine100)
    x = torch.zeros(2, 1, 3, 3)
    zero = lambda x, t: torch.zeros_like(x)
    cases = [
        (lambda: d.q_sample(x, torch.tensor([0, 100])), "timesteps must lie in \\[0, 99\\]"),
        (lambda: d.q_sample(x, torch.tensor([0.0, 1.0])), "LongTensor of shape \\[2\\]"),
        (lambda: d.q_sample(x, torch.tensor([0, 1, 2])), "LongTensor of shape \\[2\\]"),
        (lambda: d.q_sample(x, at(0, 2), noise=torch.zeros(2, 1, 3)), "noise has shape"),
        (lambda: d.p_mean_variance(lambda x, t: torch.zeros(2, 2, 3, 3), x, at(0, 2)),
         "model output has shape"),
        (lambda: d.ddim_sample_loop(zero, x.shape, steps=0, eta=0.0), "DDIM steps must be an integer in \\[1, 100\\]"),
        (lambda: d.ddim_sample_loop(zero, x.shape, steps=101, eta=0.0), "DDIM steps"),
        (lambda: d.ddim_timesteps(10, "cubic"), "unknown DDIM spacing"),
        (lambda: d.p_sample_loop(zero, x.shape, noise=torch.zeros(3, 1, 3, 3)), "noise has shape"),
        (lambda: d.respace([]), "non-empty"),
        (lambda: d.ddim_sample(zero, x, at(5, 2), -2), "t_prev"),
        (lambda: d.ddim_sample(zero, x, at(5, 2), 5), "t_prev"),
        (lambda: d.respace([5, 100]), "respace needs"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    learned = ddpm.GaussianDiffusion(cosine100, var_type="learned_range", loss_type="hybrid")
    with pytest.raises(ValueError, match="2x the input channels"):
        learned.p_mean_variance(zero, x, at(0, 2))


def test_short_chains():
    """T = 1 and T = 2 work end to end (sampling, loss, bound)."""
    for betas in ([0.5], [0.1, 0.6]):
        d = ddpm.GaussianDiffusion(betas)
        zero = lambda x, t: torch.zeros_like(x)
        x0 = torch.zeros(2, 1)
        assert torch.isfinite(d.p_sample_loop(zero, (2, 1))).all()
        assert torch.isfinite(d.ddim_sample_loop(zero, (2, 1), steps=len(betas), eta=0.0)).all()
        assert torch.isfinite(d.training_losses(zero, x0, at(0, 2))["loss"]).all()
        assert torch.isfinite(d.calc_bpd_loop(zero, x0)["total_bpd"]).all()


# ---- exact behaviour of single steps, loops and the bound ----------------------------------

def reference(betas):
    """β, ᾱ (a plain cumulative product), ᾱ_{t-1} and β̃ in NumPy."""
    b = np.asarray(betas, dtype=np.float64)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    return {"beta": b, "ac": ac, "ac_prev": ac_prev, "post_var": b * (1 - ac_prev) / (1 - ac)}


# ---- p_sample adds no noise at index 0 (Ho Algorithm 2: z = 0 at t = 1) ---------------------

@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_p_sample_adds_noise_only_above_index_0(var_type):
    """Ho Alg. 2: x_{t-1} = μ_θ + σ_t z with z ~ N(0, I) for t > 1 and z = 0 for t = 1. p_sample
    with an explicit z (and with a generator) returns exactly the mean at index 0, and
    mean + σ z at index 1 with σ² = β̃_2 (fixed_small) or β_2 (fixed_large) from NumPy."""
    betas = ddpm.make_beta_schedule("cosine", 50)
    d, ref = ddpm.GaussianDiffusion(betas, var_type=var_type), reference(betas.numpy())
    model = lambda x, t: torch.tanh(x)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=F64, generator=g)
    z = torch.randn(4, 3, dtype=F64, generator=g)
    mean0 = d.p_mean_variance(model, x, at(0, 4))["mean"]
    assert torch.equal(d.p_sample(model, x, at(0, 4), noise=z)["sample"], mean0)
    assert torch.equal(d.p_sample(model, x, at(0, 4), generator=g)["sample"], mean0)
    mean1 = d.p_mean_variance(model, x, at(1, 4))["mean"]
    sigma1 = math.sqrt(ref["post_var"][1] if var_type == "fixed_small" else ref["beta"][1])
    np.testing.assert_allclose(d.p_sample(model, x, at(1, 4), noise=z)["sample"],
                               mean1 + sigma1 * z, rtol=1e-12, atol=1e-14)


# ---- a DDIM step is Song Eq. 12 with the σ of Eq. 16, for fractional η too ------------------

@pytest.mark.parametrize("eta", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("t,t_prev", [(999, 979), (600, 300), (20, 0), (0, -1)])
def test_ddim_step_is_song_eq12_with_eq16_sigma(eta, t, t_prev):
    """Song Eq. 12: x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε + σ z, with
    σ = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev) (Eq. 16), x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t,
    ᾱ_prev = 1 for t_prev = -1; all in NumPy. η = 0 and η = 1 are covered elsewhere; η ∉ {0, 1}
    is what separates η from η²."""
    betas = ddpm.make_beta_schedule("linear", 1000)
    d, ac = ddpm.GaussianDiffusion(betas), reference(betas.numpy())["ac"]
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(5, 2, dtype=F64, generator=g)
    z = torch.randn(5, 2, dtype=F64, generator=g)
    model = lambda x, tt: 0.8 * torch.tanh(x)
    got = d.ddim_sample(model, x_t, at(t, 5), t_prev, eta=eta, clip_denoised=False, noise=z)["sample"]
    a_t, a_p = ac[t], (ac[t_prev] if t_prev >= 0 else 1.0)
    xt, zz = x_t.numpy(), z.numpy()
    eps = 0.8 * np.tanh(xt)
    x0 = (xt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps + sigma * zz
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


# ---- the random stream of p_sample_loop: x_T, then one z per step for t > 1 -----------------

def test_p_sample_loop_is_algorithm_2_draw_for_draw():
    """Ho Alg. 2 written out here: x_T ~ N(0, I) and one z per step for t = T..2 drawn from the
    same generator, none at t = 1. The samples and the generator's state afterwards equal
    p_sample_loop's, so a second batch drawn with the same generator also agrees (and agrees with
    DDIM η = 1 over all steps, which draws no z at its last step either)."""
    betas = ddpm.make_beta_schedule("cosine", 30)
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas.numpy())
    model = lambda x, t: 0.3 * x
    shape = (3, 2)
    g_code, g_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = d.p_sample_loop(model, shape, generator=g_code, dtype=F64, clip_denoised=False)
    x = torch.randn(shape, dtype=F64, generator=g_ref)
    for i in reversed(range(30)):
        mean = d.p_mean_variance(model, x, at(i, 3), clip_denoised=False)["mean"]
        x = mean + (math.sqrt(ref["post_var"][i]) * torch.randn(shape, dtype=F64, generator=g_ref)
                    if i > 0 else 0.0)
    np.testing.assert_allclose(got, x, rtol=1e-12, atol=1e-12)
    assert torch.equal(g_code.get_state(), g_ref.get_state())
    # consecutive batches from one generator: DDPM and DDIM η=1 stay in step
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = [d.p_sample_loop(model, shape, generator=g1, dtype=F64) for _ in range(2)]
    b = [d.ddim_sample_loop(model, shape, steps=30, eta=1.0, generator=g2, dtype=F64) for _ in range(2)]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-9, atol=1e-9)


# ---- the cosine schedule clips β at 0.999 (Nichol & Dhariwal §3.2) --------------------------

@pytest.mark.parametrize("T", [1, 2, 10, 100, 1000, 4000])
def test_cosine_betas_including_the_clipped_ones(T):
    """Nichol & Dhariwal §3.2: β_t = min(1 - ᾱ_t/ᾱ_{t-1}, 0.999) with ᾱ_t = f(t)/f(0) (Eq. 17);
    every β, the clipped last one included, equals the NumPy formula; β_T is exactly 0.999
    (f(T) = cos²(π/2) ≈ 0 makes the raw β_T ≈ 1)."""
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    want = np.minimum(1 - f[1:] / f[:-1], 0.999)
    got = ddpm.make_beta_schedule("cosine", T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    assert got[-1] == 0.999


# ---- calc_bpd_loop on an x_0 oracle: exact zeros and closed-form columns -------------------

def _bits_decoder_nll(x0, sigma):
    """-log2 P(bin of x_0 | N(x_0, σ²)) per element, SciPy: edge bins open, bin half-width 1/255."""
    w = 1 / 255 / sigma
    inner = np.log(special.ndtr(w) - special.ndtr(-w))
    edge = special.log_ndtr(w)
    return -np.where(np.abs(x0) > 0.999, edge, inner) / math.log(2)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_calc_bpd_loop_on_the_oracle(mean_type):
    """With a model that knows x_0 (any parameterisation), fixed_small: the ε error is exactly 0 at
    every t ("mse"); every KL column i > 0 is 0 (μ_θ = μ̃_t, σ² = β̃_t); column 0 is the decoder
    at mean μ̃_1 = x_0 and σ² = β̃_2 (the clipped log-variance), by SciPy; the prior is the closed
    form ½(ᾱ_T x_0² + (1-ᾱ_T) - 1 - log(1-ᾱ_T)) / log 2; the total is their sum."""
    betas = ddpm.make_beta_schedule("cosine", 40)
    ref = reference(betas.numpy())
    d = ddpm.GaussianDiffusion(betas, mean_type=mean_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (3, 1, 2, 2), generator=g).to(F64) / 127.5 - 1
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # both open edge bins
    out = d.calc_bpd_loop(oracle(x0, d, mean_type), x0, generator=g)
    assert out["mse"].abs().max().item() < 1e-20
    assert out["vb"][:, 1:].abs().max().item() < 1e-9
    x = x0.numpy().reshape(3, -1)
    want0 = _bits_decoder_nll(x, math.sqrt(ref["post_var"][1])).mean(1)
    np.testing.assert_allclose(out["vb"][:, 0], want0, rtol=1e-9)
    a = ref["ac"][-1]
    prior = (0.5 * (a * x ** 2 + (1 - a) - 1 - math.log(1 - a)) / math.log(2)).mean(1)
    np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(out["total_bpd"], want0 + prior, rtol=1e-9, atol=1e-9)


# ---- calc_bpd_loop's "mse" is the unclipped ε error, noise reproduced from the seed ---------

def test_calc_bpd_mse_is_the_unclipped_eps_error():
    """calc_bpd_loop draws one ε per t, for t = T-1 down to 0, from `generator`; "mse"[:, i] is
    mean((ε_θ - ε_i)²) of the network's own ε, not of an ε recomputed from the clipped x̂_0. With
    ε_θ = 0 (x̂_0 = x_t/√ᾱ_t, far outside [-1, 1] at large t, so clipping is active) it is
    mean(ε_i²), with the ε_i redrawn here from the same seed."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 20))
    x0 = torch.linspace(-1, 1, 6, dtype=F64).view(2, 1, 3)
    out = d.calc_bpd_loop(lambda x, t: torch.zeros_like(x), x0, clip_denoised=True,
                          generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    want = torch.zeros(2, 20, dtype=F64)
    for i in reversed(range(20)):
        want[:, i] = (torch.randn(x0.shape, dtype=F64, generator=g) ** 2).mean((1, 2))
    np.testing.assert_allclose(out["mse"], want, rtol=1e-12)


# ---- low precision: DDIM's coefficients come from the float64 tables ----------------------

@pytest.mark.parametrize("case", ["float16 linear T=1000", "bfloat16 linear T=1000",
                                  "float32 first beta 2e-9"])
def test_ddim_has_no_nan_in_low_precision(case):
    """DDIM (η = 0) must return finite samples whenever DDPM does: fp16/bf16 inputs with Ho's
    linear schedule (ᾱ_1 = 0.9999 rounds to 1), and float32 with a first β of 2e-9."""
    if case.startswith("float32"):
        ac = special.expit(np.linspace(20, -10, 100))
        betas, dtype = 1 - ac / np.append(1.0, ac[:-1]), torch.float32
    else:
        betas = ddpm.make_beta_schedule("linear", 1000)
        dtype = torch.float16 if case.startswith("float16") else torch.bfloat16
    d = ddpm.GaussianDiffusion(betas)
    x = torch.randn(4, 1, generator=torch.Generator().manual_seed(0)).to(dtype)
    model = lambda x, t: 0.1 * x
    assert torch.isfinite(d.p_sample_loop(model, x.shape, noise=x.clone())).all()
    assert torch.isfinite(d.ddim_sample_loop(model, x.shape, steps=d.num_timesteps // 20 or 1,
                                             eta=0.0, noise=x.clone())).all()


# ---- single steps with noise=None draw z from the generator they are given -----------------

def test_p_sample_draws_z_from_its_generator():
    """Ho Alg. 2 step with noise=None: x_{t-1} = μ_θ + √β̃_t z (t ≥ 1), z = torch.randn(x.shape) from
    the `generator` passed in, the only draw (its state afterwards equals a twin seeded alike that
    made that one draw); equal seeds give equal samples, different seeds different ones."""
    betas = ddpm.make_beta_schedule("cosine", 20)
    d, ref = ddpm.GaussianDiffusion(betas), reference(betas.numpy())
    model = lambda x, t: 0.3 * x
    x = torch.randn(3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([7, 1, 19])
    g = torch.Generator().manual_seed(5)
    a = d.p_sample(model, x, t, generator=g)["sample"]
    b = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(5))["sample"]
    c = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(6))["sample"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    g_ref = torch.Generator().manual_seed(5)
    z = torch.randn(x.shape, dtype=F64, generator=g_ref)
    sigma = torch.from_numpy(np.sqrt(ref["post_var"][t.numpy()])).view(3, 1, 1)
    want = d.p_mean_variance(model, x, t)["mean"] + sigma * z
    np.testing.assert_allclose(a, want, rtol=1e-12, atol=1e-14)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_ddim_sample_draws_z_from_its_generator(cosine100):
    """DDIM step with η = 0.5 and noise=None: Song Eq. 12 (NumPy, as above) with its σ z term's z =
    torch.randn(x.shape) from the `generator` passed in (one draw); equal seeds give equal samples,
    different seeds different ones."""
    d, ac = ddpm.GaussianDiffusion(cosine100), reference(cosine100.numpy())["ac"]
    x_t = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = lambda x, tt: 0.8 * torch.tanh(x)
    step = lambda g: d.ddim_sample(model, x_t, at(60, 4), 30, eta=0.5, clip_denoised=False,
                                   generator=g)["sample"]
    g = torch.Generator().manual_seed(11)
    a, b, c = step(g), step(torch.Generator().manual_seed(11)), step(torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g_ref = torch.Generator().manual_seed(11)
    z = torch.randn(x_t.shape, dtype=F64, generator=g_ref).numpy()
    a_t, a_p = ac[60], ac[30]
    xt = x_t.numpy()
    eps = 0.8 * np.tanh(xt)
    x0 = (xt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = 0.5 * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps + sigma * z
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_ddim_sample_loop_with_eta_is_song_eq12_draw_for_draw():
    """DDIM η = 0.5 over T = 20, 5 steps (16 -> 12 -> 8 -> 4 -> 0 -> x_0), written out here: x_T and
    then one z per step except the last (to ᾱ = 1) drawn from one generator, each step Song Eq. 12
    with the σ of Eq. 16. Samples and the generator's state afterwards equal ddim_sample_loop's."""
    betas = ddpm.make_beta_schedule("cosine", 20)
    d, ac = ddpm.GaussianDiffusion(betas), reference(betas.numpy())["ac"]
    model = lambda x, t: 0.3 * x
    eta, shape = 0.5, (3, 2)
    g_code, g_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = d.ddim_sample_loop(model, shape, steps=5, eta=eta, generator=g_code, dtype=F64,
                             clip_denoised=False)
    x = torch.randn(shape, dtype=F64, generator=g_ref)
    for t, t_prev in [(16, 12), (12, 8), (8, 4), (4, 0), (0, -1)]:
        a_t, a_p = ac[t], (ac[t_prev] if t_prev >= 0 else 1.0)
        eps = 0.3 * x
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps
        if t_prev >= 0:
            x = x + sigma * torch.randn(shape, dtype=F64, generator=g_ref)
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-12)
    assert torch.equal(g_code.get_state(), g_ref.get_state())


# ---------------------------------------------------------------------------------------------
# Loss weighting over t: Min-SNR-γ (Hang et al. 2023) and P2 (Choi et al. 2022)
# ---------------------------------------------------------------------------------------------

def _snr(betas):
    """SNR_t = ᾱ_t / (1 - ᾱ_t), from the betas in NumPy (independent of ddpm.py's tables)."""
    ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    return ac / (1.0 - ac)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_min_snr_and_p2_weights_are_the_papers(mean_type, cosine100):
    """Min-SNR: min(SNR, γ) on the x_0 error, i.e. ε: min(SNR, γ)/SNR, x_0: min(SNR, γ),
    v: min(SNR, γ)/(SNR + 1). P2: 1/(k + SNR)^γ on the ε error, i.e. ε: that, x_0: SNR times it,
    v: SNR/(SNR + 1) times it."""
    betas = cosine100.numpy()
    snr = _snr(betas)
    gamma, k, p2_gamma = 5.0, 1.0, 0.5
    min_snr = ddpm.GaussianDiffusion(betas, mean_type, loss_weighting="min_snr", snr_gamma=gamma)
    p2 = ddpm.GaussianDiffusion(betas, mean_type, loss_weighting="p2", p2_k=k, p2_gamma=p2_gamma)
    clipped = np.minimum(snr, gamma)
    expected_min_snr = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[mean_type]
    p2_eps = 1.0 / (k + snr) ** p2_gamma
    expected_p2 = {"eps": p2_eps, "x0": p2_eps * snr, "v": p2_eps * snr / (snr + 1)}[mean_type]
    np.testing.assert_allclose(min_snr.loss_weights().numpy(), expected_min_snr, rtol=1e-12)
    np.testing.assert_allclose(p2.loss_weights().numpy(), expected_p2, rtol=1e-12)


@pytest.mark.parametrize("weighting, kwargs", [("min_snr", {"snr_gamma": 5.0}),
                                                ("p2", {"p2_k": 1.0, "p2_gamma": 1.0})])
def test_each_target_gives_the_same_weighted_loss(weighting, kwargs, cosine100):
    """A network whose prediction corresponds to the same x̂_0, whichever quantity it outputs,
    gets the same weighted loss in all three parameterisations: Min-SNR's
    min(SNR, γ) ‖x_0 - x̂_0‖² and P2's ‖ε - ε̂‖²/(k + SNR)^γ, computed here from x̂_0 directly."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    delta = 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    ac = torch.from_numpy(np.cumprod(1 - cosine100.numpy()))[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    x0_hat = x0 + delta
    eps_hat = (x_t - ac.sqrt() * x0_hat) / (1 - ac).sqrt()
    outputs = {"eps": eps_hat, "x0": x0_hat, "v": ac.sqrt() * eps_hat - (1 - ac).sqrt() * x0_hat}
    snr = (ac / (1 - ac)).flatten()
    x0_err = (delta ** 2).mean(dim=(1, 2, 3))
    eps_err = ((noise - eps_hat) ** 2).mean(dim=(1, 2, 3))
    expected = (torch.clamp(snr, max=kwargs.get("snr_gamma", 0)) * x0_err if weighting == "min_snr"
                else eps_err / (kwargs.get("p2_k", 1) + snr) ** kwargs.get("p2_gamma", 1))
    for mean_type, out in outputs.items():
        d = ddpm.GaussianDiffusion(cosine100, mean_type, loss_weighting=weighting, **kwargs)
        loss = d.training_losses(lambda x, tt: out, x0, t, noise=noise)["loss"]
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12, msg=mean_type)


@pytest.mark.parametrize("weighting, kwargs", [("min_snr", {"snr_gamma": float("inf")}),
                                                ("p2", {"p2_gamma": 0.0}), ("none", {})])
def test_neutral_weighting_is_l_simple_exactly(weighting, kwargs, cosine100):
    """Min-SNR with γ = ∞ and P2 with γ = 0 weigh ε-prediction's squared error by exactly 1: the
    loss is L_simple bit for bit."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 33, 70, 99])
    model = lambda x, tt: 0.7 * x - 0.1
    plain = ddpm.GaussianDiffusion(cosine100).training_losses(model, x0, t, noise=noise)
    weighted = ddpm.GaussianDiffusion(cosine100, loss_weighting=weighting, **kwargs)
    out = weighted.training_losses(model, x0, t, noise=noise)
    assert torch.equal(out["loss"], plain["loss"]) and torch.equal(out["loss"], plain["mse"])


def test_weighting_needs_a_squared_error(cosine100):
    with pytest.raises(ValueError, match="loss_weighting weights L_simple"):
        ddpm.GaussianDiffusion(cosine100, var_type="learned_range", loss_type="vlb",
                               loss_weighting="min_snr")
    with pytest.raises(ValueError, match="unknown loss_weighting"):
        ddpm.GaussianDiffusion(cosine100, loss_weighting="snr")
    respaced = ddpm.GaussianDiffusion(cosine100, loss_weighting="p2").respace(range(0, 100, 10))
    assert respaced.loss_weighting == "p2" and respaced.loss_weights().shape == (10,)
