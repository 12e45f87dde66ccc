"""Behaviour of ddpm.py beyond the derivations: the three parameterisations, the variance choices,
the loss weighting and its stop-gradient, respacing, dtypes and devices, seeds, and the errors a
user sees. References are closed forms written here or a second path through the code that must
agree; test_math.py holds the derivation checks."""
import math

import numpy as np
import pytest
import torch

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
    table = d._table("alphas_cumprod", x0.device)
    d.q_sample(x0, t)
    assert d._table("alphas_cumprod", x0.device) is table
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
           "ddim": lambda **kw: d.ddim_sample_loop(model, (3, 1, 2, 2), steps=10, **kw),
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
    (dict(var_type="learned_range"), "needs loss_type 'hybrid' or 'vlb'")])
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
        (lambda: d.ddim_sample_loop(zero, x.shape, steps=0), "DDIM steps must be an integer in \\[1, 100\\]"),
        (lambda: d.ddim_sample_loop(zero, x.shape, steps=101), "DDIM steps"),
        (lambda: d.ddim_timesteps(10, "cubic"), "unknown DDIM spacing"),
        (lambda: d.p_sample_loop(zero, x.shape, noise=torch.zeros(3, 1, 3, 3)), "noise has shape"),
        (lambda: d.respace([]), "non-empty"),
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
        assert torch.isfinite(d.ddim_sample_loop(zero, (2, 1), steps=len(betas))).all()
        assert torch.isfinite(d.training_losses(zero, x0, at(0, 2))["loss"]).all()
        assert torch.isfinite(d.calc_bpd_loop(zero, x0)["total_bpd"]).all()
