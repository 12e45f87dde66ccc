"""Draw the figures of docs/derivations.md from ddpm.py's own functions: `python docs/figures.py`.

Each figure has a data function here (schedule_data, forward_data, ...) that computes every
number the picture shows by calling ddpm.py, and a drawing function that only plots them;
test_figures.py calls the data functions again and checks their numbers against the closed forms
and SciPy references of test_math.py, so a figure cannot show what the code does not compute.

Without --checkpoint it draws the figures that need no trained model (under a minute on a 2-core
CPU); with --checkpoint it draws the two that do (the bound's terms, one MNIST digit's trajectories)
from that model, and each names the checkpoint in its title. Needs matplotlib
(`pip install matplotlib`), imported only to draw.
"""
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project's modules sit one folder up

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import ddpm  # noqa: E402
import files  # noqa: E402

MATPLOTLIB_HINT = "pip install matplotlib"
F64 = torch.float64
T = 1000
# 1-D data x_0 ~ Σ_k π_k N(m_k, s_k²): (π, m, s). Sections 1, 10 and 11 draw it.
MIXTURE_1D = ([0.4, 0.6], [-0.5, 0.5], [0.12, 0.18])
# 2-D data, one isotropic Gaussian per class: (π, means [K, 2], s). Section 11's guidance.
MIXTURE_2D = ([1 / 3, 1 / 3, 1 / 3], [[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]], [0.15, 0.15, 0.15])
FORWARD_T = (1, 100, 300, 1000)       # paper t (1-based) shown by forward_data
POSTERIOR_T = (2, 50, 500)            # paper t shown by posterior_data
SCORE_T = (10, 100, 300, 700)         # paper t shown by score_data
GUIDANCE_T = 100                      # paper t of the drawn guided score field
NO_MODEL = ("schedules", "forward", "posterior", "score", "samplers", "guidance")
WITH_MODEL = ("bound", "trajectory")


def _finish(fig, top=0.9):
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def linear_diffusion(**kw):
    """Ho's linear schedule at T = 1000 (the schedule of the 1-D and 2-D figures), float64."""
    return ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", T), **kw)


def _index(paper_t):
    """The 0-based indices of paper timesteps, each as a LongTensor [1]."""
    return torch.as_tensor(np.asarray(paper_t) - 1, dtype=torch.long).reshape(-1).split(1)


def alpha_bar_terms(diffusion, t, x):
    """(√ᾱ_t, 1 - ᾱ_t), each [B, 1, ...], read from q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)
    (q_mean_variance at x_0 = 1): the schedule as the code uses it."""
    mean, var, _ = diffusion.q_mean_variance(torch.ones_like(x), t)
    return mean, var


# ---- section 9: schedules -------------------------------------------------------------------

def schedule_data(num_timesteps=T):
    """For "linear" and "cosine": t/T, ᾱ_t, log-SNR log(ᾱ_t/(1-ᾱ_t)) and β̃_t/β_t at every t
    (Nichol & Dhariwal 2021 Fig. 5 and Fig. 1), from make_beta_schedule, q_mean_variance and
    q_posterior_mean_variance."""
    out = {}
    t = torch.arange(num_timesteps)
    for name in ("linear", "cosine"):
        betas = ddpm.make_beta_schedule(name, num_timesteps)
        d = ddpm.GaussianDiffusion(betas)
        ones = torch.ones(num_timesteps, 1, dtype=F64)
        root_ac, one_minus, log_one_minus = d.q_mean_variance(ones, t)
        _, post_var, _ = d.q_posterior_mean_variance(ones, ones, t)
        out[name] = {"t": (t.numpy() + 1) / num_timesteps,
                     "alpha_bar": (root_ac[:, 0] ** 2).numpy(),
                     "log_snr": (2 * torch.log(root_ac[:, 0]) - log_one_minus[:, 0]).numpy(),
                     "beta_ratio": (post_var[:, 0] / betas).numpy()}
    return out


def draw_schedules(plt, d):
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for name, v in d.items():
        axes[0].plot(v["t"], v["alpha_bar"], label=name)
        axes[1].plot(v["t"], v["log_snr"], label=name)
        axes[2].plot(v["t"], v["beta_ratio"], label=name)
    for ax, label in zip(axes, ("ᾱ_t", "log(ᾱ_t / (1-ᾱ_t))", "β̃_t / β_t")):
        ax.set_xlabel("t / T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].set_xscale("log")
    fig.suptitle("make_beta_schedule, T = 1000: ᾱ_t and log-SNR (Nichol & Dhariwal Fig. 5), "
                 "β̃_t/β_t (their Fig. 1)", fontsize=9)
    return _finish(fig)


# ---- section 1: the forward marginals ------------------------------------------------------

def noisy_mixture(diffusion, t, mixture=MIXTURE_1D):
    """(π, means [K, D], variances [K]) of q_t = Σ_k π_k N(√ᾱ_t m_k, (ᾱ_t s_k² + 1 - ᾱ_t) I), the
    marginal of x_t for mixture data: each component pushed through q(x_t | x_0) (Gaussian x_0
    plus independent Gaussian noise). t: a 0-based index [1]."""
    pi, m, s = (torch.as_tensor(v, dtype=F64) for v in mixture)
    m = m.reshape(len(pi), -1)
    mean, one_minus, _ = diffusion.q_mean_variance(m, t.expand(len(pi)))
    root_ac = alpha_bar_terms(diffusion, t, m[:1])[0][0, 0]
    return pi, mean, root_ac ** 2 * s ** 2 + one_minus[:, 0]


def mixture_log_density(diffusion, x, t, mixture=MIXTURE_1D):
    """log q_t(x) of the noisy mixture (noisy_mixture) at points x [N, D]: [N]."""
    pi, mean, var = noisy_mixture(diffusion, t, mixture)
    D = x.shape[1]
    sq = ((x[:, None, :] - mean[None]) ** 2).sum(-1)                      # [N, K]
    log_k = torch.log(pi) - 0.5 * D * torch.log(2 * math.pi * var) - 0.5 * sq / var
    return torch.logsumexp(log_k, dim=1)


def mixture_x0_samples(n, generator, mixture=MIXTURE_1D):
    """n draws of x_0 from the mixture: [n, D], float64."""
    pi, m, s = (torch.as_tensor(v, dtype=F64) for v in mixture)
    m = m.reshape(len(pi), -1)
    k = torch.multinomial(pi, n, replacement=True, generator=generator)
    return m[k] + s[k, None] * torch.randn(n, m.shape[1], generator=generator, dtype=F64)


def forward_data(n=20000, seed=0, paper_t=FORWARD_T):
    """Draws of x_t = q_sample(x_0, t, ε) for x_0 from MIXTURE_1D, and the closed-form density
    of q_t on a grid, at each paper t in `paper_t`."""
    d, g = linear_diffusion(), torch.Generator().manual_seed(seed)
    grid = torch.linspace(-3.5, 3.5, 701, dtype=F64)[:, None]
    out = {"paper_t": np.array(paper_t), "grid": grid[:, 0].numpy(), "samples": [], "density": []}
    for t in _index(paper_t):
        x0 = mixture_x0_samples(n, g)
        eps = torch.randn(n, 1, generator=g, dtype=F64)
        out["samples"].append(d.q_sample(x0, t.expand(n), eps)[:, 0].numpy())
        out["density"].append(torch.exp(mixture_log_density(d, grid, t.reshape(1))).numpy())
    out["samples"], out["density"] = np.stack(out["samples"]), np.stack(out["density"])
    return out


def draw_forward(plt, d):
    fig, axes = plt.subplots(1, len(d["paper_t"]), figsize=(10, 2.4), sharey=False)
    for ax, t, xs, dens in zip(axes, d["paper_t"], d["samples"], d["density"]):
        ax.hist(xs, bins=80, range=(-3.5, 3.5), density=True, color="0.75", label="q_sample")
        ax.plot(d["grid"], dens, "C0", lw=1.2, label="closed form")
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_xlabel("x_t")
    axes[0].legend(fontsize=7)
    fig.suptitle("q(x_t | x_0) for a two-component mixture: draws of q_sample against the "
                 "closed-form density of x_t", fontsize=9)
    return _finish(fig)


# ---- section 2: the posterior by Bayes' rule ----------------------------------------------

def posterior_data(x0=0.5, eps=1.0, paper_t=POSTERIOR_T, points=801):
    """At each paper t >= 2, with x_t = q_sample(x_0, t, ε): the code's density N(μ̃_t, β̃_t) of
    q(x_{t-1} | x_t, x_0) (q_posterior_mean_variance) on a grid of x_{t-1}, and Bayes' rule
    q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised by the trapezoid rule on the same grid, with
    q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t) and q(x_{t-1} | x_0) from q_mean_variance."""
    d = linear_diffusion()
    betas = ddpm.make_beta_schedule("linear", T)
    out = {"paper_t": np.array(paper_t), "x0": x0, "x_t": [], "grid": [], "code": [], "bayes": []}
    for t in _index(paper_t):
        x_0 = torch.full((1, 1), x0, dtype=F64)
        x_t = d.q_sample(x_0, t, torch.full((1, 1), eps, dtype=F64))
        mean, var, _ = d.q_posterior_mean_variance(x_0, x_t, t)
        mean, sd = mean.item(), math.sqrt(var.item())
        y = torch.linspace(mean - 8 * sd, mean + 8 * sd, points, dtype=F64)
        prior_mean, prior_var, _ = d.q_mean_variance(x_0, t - 1)
        b = betas[t].item()
        log_num = (-0.5 * (x_t.item() - math.sqrt(1 - b) * y) ** 2 / b
                   - 0.5 * (y - prior_mean.item()) ** 2 / prior_var.item())
        num = torch.exp(log_num - log_num.max())
        out["x_t"].append(x_t.item())
        out["grid"].append(y.numpy())
        code = torch.exp(-0.5 * (y - mean) ** 2 / sd ** 2) / (sd * math.sqrt(2 * math.pi))
        out["code"].append(code.numpy())
        out["bayes"].append((num / torch.trapezoid(num, y)).numpy())
    for k in ("x_t", "grid", "code", "bayes"):
        out[k] = np.array(out[k])
    return out


def draw_posterior(plt, d):
    fig, axes = plt.subplots(1, len(d["paper_t"]), figsize=(10, 2.4))
    for i, ax in enumerate(axes):
        ax.plot(d["grid"][i], d["code"][i], "C0", lw=1.2, label="N(μ̃_t, β̃_t), code")
        ax.plot(d["grid"][i][::40], d["bayes"][i][::40], "C3o", ms=3, label="Bayes' rule, quadrature")
        ax.set_title(f"t = {d['paper_t'][i]}, x_t = {d['x_t'][i]:.3f}", fontsize=9)
        ax.set_xlabel("x_{t-1}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"q(x_{{t-1}} | x_t, x_0 = {d['x0']}): q_posterior_mean_variance against "
                 "q(x_t|x_{t-1}) q(x_{t-1}|x_0) normalised numerically", fontsize=9)
    return _finish(fig)


# ---- section 10: ε* is the scaled score ----------------------------------------------------

def mixture_eps_model(diffusion, mixture=MIXTURE_1D):
    """The exact ε*(x_t, t) = E[ε | x_t] for mixture data, as a model(x_t, t) callable, x_t [B, D]:
    predict_eps_from_x0(x_t, t, E[x_0 | x_t]) (x_t = √ᾱ x_0 + √(1-ᾱ) ε is linear in ε), with
    E[x_0 | x_t] = Σ_k r_k (m_k + √ᾱ s_k²/(ᾱ s_k² + 1-ᾱ) (x_t - √ᾱ m_k)), r_k ∝ π_k N(x_t; √ᾱ m_k,
    (ᾱ s_k² + 1-ᾱ) I): each component's Gaussian conditional mean, weighted by its posterior."""
    pi, m, s = (torch.as_tensor(v, dtype=F64) for v in mixture)
    m = m.reshape(len(pi), -1)

    def model(x, t):
        root_ac, one_minus = (v.to(F64)[:, :, None] for v in alpha_bar_terms(diffusion, t, x[:, :1]))
        var = root_ac ** 2 * s[None, :, None] ** 2 + one_minus                 # [B, K, 1]
        diff = x.to(F64)[:, None, :] - root_ac * m[None]                       # [B, K, D]
        log_r = (torch.log(pi) - 0.5 * m.shape[1] * torch.log(var[..., 0])
                 - 0.5 * (diff ** 2).sum(-1) / var[..., 0])
        cond = m[None] + root_ac * s[None, :, None] ** 2 / var * diff
        x0 = (torch.softmax(log_r, dim=1)[..., None] * cond).sum(1)
        return diffusion.predict_eps_from_x0(x.to(F64), t, x0).to(x.dtype)
    return model


def score_data(paper_t=SCORE_T, mixture=MIXTURE_1D):
    """Over a grid of x_t at each paper t: ε*(x_t, t) (mixture_eps_model) and -√(1-ᾱ_t) ∇ log q_t(x_t),
    the gradient taken by autograd of the closed-form log-density (mixture_log_density)."""
    d = linear_diffusion()
    grid = torch.linspace(-2.5, 2.5, 201, dtype=F64)[:, None]
    model = mixture_eps_model(d, mixture)
    out = {"paper_t": np.array(paper_t), "grid": grid[:, 0].numpy(), "eps_star": [], "score": []}
    for t in _index(paper_t):
        tt = t.expand(len(grid))
        out["eps_star"].append(model(grid, tt)[:, 0].numpy())
        x = grid.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mixture_log_density(d, x, t, mixture).sum(), x)
        out["score"].append((-alpha_bar_terms(d, tt, grid)[1].sqrt() * grad)[:, 0].numpy())
    out["eps_star"], out["score"] = np.stack(out["eps_star"]), np.stack(out["score"])
    return out


def draw_score(plt, d):
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, t in enumerate(d["paper_t"]):
        ax.plot(d["grid"], d["eps_star"][i], f"C{i}", lw=1.2, label=f"t = {t}")
        ax.plot(d["grid"][::5], d["score"][i][::5], f"C{i}o", ms=3)
    ax.set_xlabel("x_t")
    ax.set_ylabel("ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="lines: E[ε | x_t];  dots: -√(1-ᾱ_t) ∇log q_t", title_fontsize=7)
    ax.set_title("ε-prediction is score estimation (two-component mixture)", fontsize=9)
    fig.tight_layout()
    return fig


# ---- section 11: the samplers and guidance -------------------------------------------------

SAMPLERS = {"DDPM, 1000 steps": ("ddpm", None, None), "DDIM η=0, 50 steps": ("ddim", 50, 0.0),
            "DDIM η=1, 50 steps": ("ddim", 50, 1.0), "DPM-Solver++(2M), 20 steps": ("dpm", 20, None)}


def sample_mixture(diffusion, model, sampler, n, seed, shape_tail=(1,)):
    """n samples of one of SAMPLERS' (kind, steps, eta), float64, unclipped, from one seed."""
    kind, steps, eta = sampler
    kw = dict(generator=torch.Generator().manual_seed(seed), dtype=F64, clip_denoised=False)
    shape = (n, *shape_tail)
    if kind == "ddpm":
        return diffusion.p_sample_loop(model, shape, **kw)
    if kind == "ddim":
        return diffusion.ddim_sample_loop(model, shape, steps=steps, eta=eta, **kw)
    return diffusion.dpm_solver_sample_loop(model, shape, steps=steps, **kw)


def sampler_data(n=20000, seed=0, mixture=MIXTURE_1D):
    """Samples of each of SAMPLERS driven by the exact ε* of MIXTURE_1D, and its density."""
    d = linear_diffusion()
    model = mixture_eps_model(d, mixture)
    grid = torch.linspace(-1.5, 1.5, 301, dtype=F64)[:, None]
    return {"grid": grid[:, 0].numpy(), "density": _data_density(grid, mixture).numpy(),
            "samples": {name: sample_mixture(d, model, s, n, seed)[:, 0].numpy()
                        for name, s in SAMPLERS.items()}}


def _data_density(x, mixture):
    """q(x_0) of the mixture at x [N, D] (t = 0: no noise)."""
    pi, m, s = (torch.as_tensor(v, dtype=F64) for v in mixture)
    m = m.reshape(len(pi), -1)
    sq = ((x[:, None, :] - m[None]) ** 2).sum(-1)
    var = s ** 2
    log_k = torch.log(pi) - 0.5 * x.shape[1] * torch.log(2 * math.pi * var) - 0.5 * sq / var
    return torch.exp(torch.logsumexp(log_k, dim=1))


def draw_samplers(plt, d):
    fig, axes = plt.subplots(1, len(d["samples"]), figsize=(10, 2.4), sharey=True)
    for ax, (name, xs) in zip(axes, d["samples"].items()):
        ax.hist(xs, bins=90, range=(-1.5, 1.5), density=True, color="0.75")
        ax.plot(d["grid"], d["density"], "C0", lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x_0")
    fig.suptitle(f"{len(next(iter(d['samples'].values()))):,} samples of each sampler, driven by "
                 "the exact ε* (grey), against the data density (blue)", fontsize=9)
    return _finish(fig)


def class_network(diffusion, mixture=MIXTURE_2D):
    """network(x_t, t, y): the exact ε of class y's own Gaussian (one component of the mixture),
    or of the whole mixture for y = K, the null label ("no class")."""
    pi, m, s = mixture
    per_class = [mixture_eps_model(diffusion, ([1.0], [m[k]], [s[k]])) for k in range(len(pi))]
    unconditional = mixture_eps_model(diffusion, mixture)

    def network(x, t, y):
        out = unconditional(x, t)
        for k, model in enumerate(per_class):
            out = torch.where((y == k)[:, None], model(x, t), out)
        return out
    return network


def guidance_data(ws=(0.0, 3.0), label=0, n=500, seed=0, mixture=MIXTURE_2D):
    """For each guidance weight w: the guided score -ε̃/√(1-ᾱ_t), with ε̃ = guided_model's
    (1+w) ε(x_t, t, c) - w ε(x_t, t, ∅), on a grid at paper t = GUIDANCE_T, and n guided
    DPM-Solver++(2M) samples (20 steps) of class `label`."""
    d = linear_diffusion()
    network, K = class_network(d, mixture), len(mixture[0])
    axis = torch.linspace(-1.2, 1.2, 17, dtype=F64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    t = _index(GUIDANCE_T)[0].expand(len(grid))
    root = alpha_bar_terms(d, t, grid)[1].sqrt()
    out = {"w": np.array(ws), "label": label, "grid": grid.numpy(), "field": [], "samples": []}
    for w in ws:
        field_model = ddpm.guided_model(network, torch.full((len(grid),), label), K, w)
        out["field"].append((-field_model(grid, t) / root).numpy())
        model = ddpm.guided_model(network, torch.full((n,), label), K, w)
        out["samples"].append(sample_mixture(d, model, ("dpm", 20, None), n, seed, (2,)).numpy())
    out["field"], out["samples"] = np.stack(out["field"]), np.stack(out["samples"])
    axis_fine = torch.linspace(-1.2, 1.2, 121, dtype=F64)
    fine = torch.stack(torch.meshgrid(axis_fine, axis_fine, indexing="xy"), -1).reshape(-1, 2)
    out["density_axis"] = axis_fine.numpy()
    out["density"] = _data_density(fine, mixture).reshape(121, 121).numpy()
    return out


def draw_guidance(plt, d):
    fig, axes = plt.subplots(1, len(d["w"]), figsize=(8, 4.3))
    longest = np.linalg.norm(d["field"], axis=-1).max()
    for i, ax in enumerate(axes):
        ax.contour(d["density_axis"], d["density_axis"], d["density"], levels=4, colors="0.6",
                   linewidths=0.7)
        f = d["field"][i]
        ax.quiver(d["grid"][:, 0], d["grid"][:, 1], f[:, 0], f[:, 1], color="C0", alpha=0.7,
                  angles="xy", scale_units="xy", scale=longest / 0.3, width=0.004)
        ax.plot(d["samples"][i][:, 0], d["samples"][i][:, 1], "C3.", ms=2)
        ax.set_title(f"w = {d['w'][i]:g}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.2, 1.2)
    fig.suptitle(f"guidance towards class {d['label']} of a 2-D mixture: the guided score at "
                 f"t = {GUIDANCE_T} (arrows, one scale)\nand guided DPM-Solver++ samples (red)",
                 fontsize=9)
    return _finish(fig)


# ---- sections 6, 7, 12 and 1, 11 on a trained model -----------------------------------------

def bound_data(diffusion, model, x0, seed=0, progress=False):
    """The bound's terms of each image x0 [B, C, H, W] by calc_bpd_loop (unclipped x̂_0, so that each
    L_{t-1} is exactly section 5's weighted ε error): "vb" [B, T] in bits/dim (column 0 is L_0,
    column i the KL L_i at paper t = i + 1), "prior" [B] (L_T), "total" [B] and "mse" [B, T]."""
    out = diffusion.calc_bpd_loop(model, x0, clip_denoised=False,
                                  generator=torch.Generator().manual_seed(seed), progress=progress)
    return {"vb": out["vb"].numpy(), "prior": out["prior_bpd"].numpy(),
            "total": out["total_bpd"].numpy(), "mse": out["mse"].numpy()}


def draw_bound(plt, d, source):
    vb, T_ = d["vb"], d["vb"].shape[1]
    t = np.arange(1, T_ + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for row in vb:
        axes[0].plot(t[1:], row[1:], color="0.7", lw=0.5)
    axes[0].plot(t[1:], vb[:, 1:].mean(0), "C0", lw=1.2, label="L_{t-1}, t = 2..T (KL)")
    axes[0].plot([1] * len(vb), vb[:, 0], "C3o", ms=4, label="L_0 (decoder)")
    axes[0].plot([T_] * len(vb), d["prior"], "C2s", ms=4,
                 label=f"L_T (prior), {d['prior'].mean():.1e}")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("bits/dim")
    axes[0].legend(fontsize=7)
    terms = np.concatenate([vb, d["prior"][:, None]], 1)
    axes[1].plot(np.arange(1, T_ + 2), (np.cumsum(terms, 1) / d["total"][:, None]).mean(0), "C0")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("share of the total, steps <= t")
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"the bound's terms on {len(vb)} MNIST test images: total "
                 f"{d['total'].mean():.3f} bits/dim (calc_bpd_loop, x̂_0 unclipped)\n{source}",
                 fontsize=8)
    return _finish(fig, 0.85)


def trajectory_data(diffusion, model, x0, shown=8, seed=0, progress=False):
    """One image x0 [1, C, H, W] forward, x_t = q_sample(x_0, t, ε) with one ε at `shown` evenly
    spaced t, and one reverse trajectory of p_sample_loop (Ho's Algorithm 2, x̂_0 clipped):
    `shown` snapshots of x_t and of x̂_0 at each, and the final sample."""
    n = diffusion.num_timesteps
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(np.linspace(0, n - 1, shown).round().astype(int), dtype=torch.long)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    forward = diffusion.q_sample(x0.expand(shown, *x0.shape[1:]), t,
                                 eps.expand(shown, *x0.shape[1:]))
    sample, traj = diffusion.p_sample_loop(model, x0.shape, generator=g, dtype=x0.dtype,
                                           trajectory=shown, progress=progress)
    return {"x0": x0[0].numpy(), "eps": eps[0].numpy(), "t_forward": t.numpy(),
            "forward": forward.numpy(), "t_reverse": traj["t"].numpy(),
            "x_t": traj["x_t"][:, 0].numpy(), "pred_x0": traj["pred_x0"][:, 0].numpy(),
            "sample": sample[0].numpy()}


def draw_trajectory(plt, d, source):
    k = len(d["t_forward"])
    fig, axes = plt.subplots(3, k + 1, figsize=(1.2 * (k + 1), 4.7))
    rows = [("forward x_t", [d["x0"], *d["forward"]], [0, *(d["t_forward"] + 1)]),
            ("reverse x_t", [*d["x_t"], d["sample"]], [*(d["t_reverse"] + 1), 0]),
            ("x̂_0 at that x_t", [*d["pred_x0"], d["sample"]], [*(d["t_reverse"] + 1), 0])]
    for r, (label, images, ts) in enumerate(rows):
        for c, (img, t) in enumerate(zip(images, ts)):
            ax = axes[r, c]
            ax.imshow(np.transpose(img, (1, 2, 0)).squeeze(-1) if img.shape[0] == 1
                      else np.transpose((img + 1) / 2, (1, 2, 0)).clip(0, 1),
                      cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"t={t}", fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"one digit forward (q_sample) and one reverse trajectory (p_sample_loop)\n"
                 f"{source}", fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.01, top=0.84, wspace=0.08, hspace=0.3)
    return fig


def load_checkpoint(path, images):
    """(diffusion, network, first test images in [-1, 1], the title line naming the model)."""
    import checkpoint
    import data
    import imaging
    model = checkpoint.load_model(path, torch.device("cpu"), precision="fp32")
    cli.check(not model.config.get("class_cond"), f"{path} is class-conditional; the bound "
              "and trajectory figures need an unconditional model")
    cli.check(not model.module.self_cond, f"{path} is self-conditioned (--self-cond); the bound "
              "and trajectory figures call the network without x̂_0 and need a model without it")
    test = data.load_dataset(model.config["dataset"], "test", progress=False)
    x0 = imaging.to_model_range(torch.from_numpy(test.images[:images]))
    c = model.config
    source = (f"drawn from {os.path.basename(os.path.dirname(os.path.abspath(path)))}/"
              f"{os.path.basename(path)} (step {model.step}, {c['schedule']} schedule, "
              f"T = {c['timesteps']}) by python docs/figures.py --checkpoint {path}")
    return model.diffusion, model.network, x0, source


# ---- the command ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "figures"),
                   help="the folder the PNGs are written to (default: docs/figures)")
    p.add_argument("--only", nargs="+", choices=NO_MODEL + WITH_MODEL, metavar="NAME",
                   help="draw only these figures; choices: " + ", ".join(NO_MODEL + WITH_MODEL)
                   + " (default: every figure the other flags allow)")
    p.add_argument("--checkpoint", help="a trained unconditional model (ckpt.pt) to draw the "
                   "bound and trajectory figures from; without it those two are not drawn")
    p.add_argument("--images", type=int, default=4,
                   help="MNIST test images the bound figure averages over; the bound runs the "
                   "network T times on them (default: %(default)s)")
    p.add_argument("--dpi", type=int, default=70, help="resolution of the PNGs (default: %(default)s)")
    args = p.parse_args(argv)
    cli.check_number("--images", args.images, low=1)
    cli.check_number("--dpi", args.dpi, low=20, high=300)
    if args.checkpoint is not None:
        cli.check(os.path.isfile(args.checkpoint), f"no checkpoint at {args.checkpoint}; give a "
                  "ckpt.pt that train.py wrote")
    wanted = args.only or (NO_MODEL + (WITH_MODEL if args.checkpoint else ()))
    cli.check(args.checkpoint or not set(wanted) & set(WITH_MODEL),
              f"{', '.join(sorted(set(wanted) & set(WITH_MODEL)))} need(s) a trained model: "
              "give --checkpoint runs/mnist/ckpt.pt")
    args.wanted = wanted
    files.check_writable_dir(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise cli.UserError(f"drawing needs matplotlib: {MATPLOTLIB_HINT}") from None
    from tqdm.auto import tqdm
    plain = {"schedules": (schedule_data, draw_schedules), "forward": (forward_data, draw_forward),
             "posterior": (posterior_data, draw_posterior), "score": (score_data, draw_score),
             "samplers": (sampler_data, draw_samplers), "guidance": (guidance_data, draw_guidance)}
    loaded = load_checkpoint(args.checkpoint, args.images) if args.checkpoint else None
    for name in tqdm(args.wanted, desc="figures"):
        if name in plain:
            compute, draw = plain[name]
            fig = draw(plt, compute())
        else:
            diffusion, network, x0, source = loaded
            if name == "bound":
                fig = draw_bound(plt, bound_data(diffusion, network, x0, progress=True), source)
            else:
                fig = draw_trajectory(plt, trajectory_data(diffusion, network, x0[:1], progress=True),
                                      source)
        out = os.path.join(args.out, f"{name}.png")
        files.write_file(out, lambda f: fig.savefig(f, format="png", dpi=args.dpi))
        plt.close(fig)
        print(f"wrote {out} ({os.path.getsize(out) // 1024} KB)", file=sys.stderr)


if __name__ == "__main__":
    cli.run_script(main)
