"""Gaussian diffusion: the forward process, its posterior, the reverse model, the variational
bound, the training losses (with importance-sampled timesteps), the DDPM, DDIM and
DPM-Solver++(2M) samplers, classifier-free guidance and self-conditioning.

References, cited by equation number in the docstrings below:
  [Ho]      Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models".
  [Nichol]  Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
  [Song]    Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models".
  [Salimans] Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models".
  [Hang]    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy".
  [Choi]    Choi et al. 2022, "Perception Prioritized Training of Diffusion Models".
  [CFG]     Ho, Salimans 2022, "Classifier-Free Diffusion Guidance".
  [Lu]      Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
            Probabilistic Models".
  [Karras]  Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
            Generative Models".
  [Esser]   Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
            Synthesis".
  [Chen]    Chen, Zhang, Hinton 2023, "Analog Bits: Generating Discrete Data using Diffusion
            Models with Self-Conditioning".

Timestep convention (stated once, used everywhere): a timestep `t` is a LongTensor of 0-based
indices into the schedule tables. Index 0 is the paper's t = 1 (the least noisy step, whose reverse
step is the decoder p(x_0 | x_1)); index T-1 is the paper's t = T. "t - 1" in an equation is the
previous index, and the table `alphas_cumprod_prev[i]` holds ᾱ of the paper's step i, i.e. 1 at
index 0.

Notation (Ho): α_t = 1 - β_t, ᾱ_t = ∏_{s<=t} α_s. DDIM [Song] writes α_t for what is ᾱ_t here;
[Lu] writes α_t for √ᾱ_t and σ_t for √(1-ᾱ_t), and λ_t = log(α_t/σ_t) for half the log-SNR.
[Karras]'s noise level is σ = √((1-ᾱ)/ᾱ) (x_t/√ᾱ = x_0 + σ ε), so log-SNR = log(ᾱ/(1-ᾱ)) = -2 ln σ.

The network enters only as a callable `model(x_t, t) -> output`, so every formula can be driven by
an analytic model. Tables are computed once in float64; each call casts the entries it needs to the
input's dtype (float64 input -> float64 end to end) and takes them from a copy kept on the input's
device (made once per device, never per call).
"""
import math

import numpy as np
import torch

LOG2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------

def _cosine_alpha_bar(t, num_timesteps, s=0.008):
    """f(t) / f(0) with f(t) = cos²(((t/T) + s) / (1 + s) · π/2)   ([Nichol] Eq. 17)."""
    f = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return f(np.asarray(t, dtype=np.float64)) / f(0.0)


LINEAR_BETAS = (1e-4, 0.02)  # [Ho] §4: β_1 and β_T of the linear schedule at T = 1000


def make_beta_schedule(name, num_timesteps):
    """β_1..β_T as a float64 tensor [T].

    "linear": [Ho] §4, β from 1e-4 to 0.02 at T = 1000; for other T both ends scale by 1000/T
        (so that ᾱ_T stays about the same), as in [Nichol]'s code.
    "cosine": [Nichol] Eq. 17, ᾱ_t = f(t)/f(0), β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at 0.999; the
        tables then use ᾱ as the cumulative product of the clipped β.

    Checked by test_math.py section 9 (docs/derivations.md walks each step).
    """
    if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) \
            or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    T = int(num_timesteps)
    if name == "linear":
        scale = 1000.0 / T
        betas = np.linspace(scale * LINEAR_BETAS[0], scale * LINEAR_BETAS[1], T, dtype=np.float64)
    elif name == "cosine":
        abar = _cosine_alpha_bar(np.arange(T + 1), T)
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")
    return _check_betas(torch.from_numpy(betas), what=f"the {name} schedule at T={T}")


def _check_betas(betas, what="betas"):
    """Validate a β sequence: 1-D, non-empty, finite, each in the open interval (0, 1)."""
    betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
    if betas.dim() != 1 or betas.numel() == 0:
        raise ValueError(f"{what}: betas must be a non-empty 1-D sequence, got shape "
                         f"{tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError(f"{what}: betas must be finite, got a non-finite value at index "
                         f"{int((~torch.isfinite(betas)).nonzero()[0])}")
    bad = ((betas <= 0) | (betas >= 1)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{what}: every beta must lie in (0, 1), but beta[{i}] = "
                         f"{betas[i].item():.6g}; use more timesteps or another schedule")
    return betas


# ---------------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------------

def mean_flat(x):
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2):
    """D_KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats, elementwise (broadcasting).

    = ½ (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)² e^(-logvar2) - 1).

    Checked by test_math.py sections 4, 5 and 6 (docs/derivations.md walks each step).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)),
               torch.zeros((), dtype=torch.float64))
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
                                      for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log1mexp(d):
    """log(1 - e^-d) for d >= 0, accurate at both ends (Mächler 2012); each branch is fed only
    the range where it is used, so neither produces inf or nan gradients."""
    small = d < LOG2
    return torch.where(small, torch.log(-torch.expm1(-d.clamp(max=LOG2))),
                       torch.log1p(-torch.exp(-d.clamp(min=LOG2))))


def _log_normal_cdf_diff(a, b):
    """log(Φ(b) - Φ(a)) for a < b, without cancellation: where a > 0 both are reflected into
    the left tail (Φ(b) - Φ(a) = Φ(-a) - Φ(-b)), where log Φ is accurate."""
    flip = a > 0
    hi = torch.where(flip, -a, b)
    lo = torch.where(flip, -b, a)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + _log1mexp(log_hi - log_lo)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data on 256 levels in [-1, 1] under N(means, e^(2 log_scales)), in nats,
    elementwise ([Ho] Eq. 13: the decoder p_θ(x_0 | x_1)).

    Each level owns the bin [x - 1/255, x + 1/255]; the bins of -1 and +1 extend to -∞ and +∞,
    so the 256 probabilities sum to 1. Computed exactly (normal CDF, no approximation) and in log
    space, so far-tail bins stay finite.

    Checked by test_math.py section 8 (docs/derivations.md walks each step).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255)
    lower = inv_std * (centered - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)        # bin of -1: Φ(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)        # bin of +1: 1 - Φ(lower)
    log_mid = _log_normal_cdf_diff(lower, upper)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


# ---------------------------------------------------------------------------------------------
# Gaussian diffusion
# ---------------------------------------------------------------------------------------------

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("simple", "vlb", "hybrid")
HYBRID_LAMBDA = 0.001  # [Nichol] Eq. 16
LOSS_WEIGHTINGS = ("none", "min_snr", "p2")
# Training draws of t: (mean, std) of the normal law of ln σ each option gives, see timestep_probs.
TIMESTEP_SAMPLINGS = {"uniform": None,
                      "lognormal": (-1.2, 1.2),    # [Karras] §5: P_mean, P_std
                      "logitnormal": (0.0, 1.0)}   # [Esser] §3.1, §5.1: m, s
TIMESTEP_FLOOR = 0.1  # the share of draws kept uniform over all T steps


# The per-timestep tables, float64 [T] (the _ext ones [T + 1]), each an attribute of a diffusion.
TABLES = ("betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "one_minus_alphas_cumprod",
          "log_alphas_cumprod_ext", "one_minus_alphas_cumprod_ext", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
          "fixed_large_log_variance", "loss_weight", "timestep_cdf")


def _broadcast(c, x):
    """A per-example factor c [B] as [B, 1, ..., 1] in x's dtype, to broadcast against x."""
    return c.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _check_t_prev(t_prev, t, sampler):
    """t_prev (an int or [B]) as a LongTensor like t; ValueError unless -1 <= t_prev < t, checked
    on the CPU only (a CUDA check would cost a host sync per step)."""
    t_prev = torch.as_tensor(t_prev, dtype=torch.long, device=t.device).expand(t.shape)
    if t_prev.device.type == "cpu" and ((t_prev < -1) | (t_prev >= t)).any():
        raise ValueError(f"{sampler} needs -1 <= t_prev < t (t_prev = -1 is the final step to x_0)")
    return t_prev


def _choice(value, options, what):
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")
    return value


def _check_number(name, value, *bounds, infinite=False):
    """ValueError unless `value` is a number (finite unless `infinite`) within `bounds`, pairs of
    a comparison ("<", "<=", ">", ">=") and a limit: "p2_k must be a finite number > 0, got 0.0"."""
    compare = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__}
    pairs = list(zip(bounds[::2], bounds[1::2]))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (math.isfinite(value) or (infinite and value == math.inf)) and \
        all(compare[op](float(value), float(limit)) for op, limit in pairs)
    if not ok:
        ends = "".join(f" {op} {limit:g}" if i == 0 else f" and {op} {limit:g}"
                       for i, (op, limit) in enumerate(pairs))
        raise ValueError(f"{name} must be {'a' if infinite else 'a finite'} number{ends}, "
                         f"got {value}")


def _progress(iterable, progress, desc):
    """Wrap `iterable` in a progress bar: `progress` is False, True (tqdm) or a callable."""
    if not progress:
        return iterable
    if progress is True:
        from tqdm.auto import tqdm  # only when a bar is asked for
        progress = tqdm
    return progress(iterable, desc=desc)


class GaussianDiffusion:
    """The diffusion process of [Ho] with the choices of [Nichol] and [Salimans].

    mean_type: what the network predicts: "eps" (ε, [Ho] Eq. 11), "x0" (x_0), "v"
        (v = √ᾱ_t ε - √(1-ᾱ_t) x_0, [Salimans] §4).
    var_type: Σ_θ(x_t, t) = σ_t² I with "fixed_small" (σ² = β̃_t), "fixed_large" (σ² = β_t, and
        β̃_2 at the first step as in [Ho]'s code), or "learned_range" ([Nichol] Eq. 15: the network
        emits 2C channels, the last C give v ∈ [-1, 1] and Σ = exp(u log β_t + (1-u) log β̃_t),
        u = (v + 1)/2).
    loss_type: "simple" (L_simple, [Ho] Eq. 14, on the predicted quantity), "vlb" (T · L_t with
        t uniform, the unbiased one-sample estimate of L_0 + ... + L_{T-1}; the prior L_T has no
        parameters) or "hybrid" ([Nichol] Eq. 16: L_simple + λ T L_t with λ = 0.001 and the mean
        detached in L_t; needs var_type "learned_range").
    loss_weighting: a weight w_t on the squared error of L_simple (and of hybrid's L_simple part),
        see loss_weights(): "none" (w = 1), "min_snr" ([Hang] §3.4, γ = snr_gamma) or "p2"
        ([Choi] §3.3, 1/(p2_k + SNR)^p2_gamma).
    timestep_sampling: the law P[t] training draws t from (sample_timesteps, timestep_probs):
        "uniform" (Algorithm 1), "lognormal" or "logitnormal" (ln σ normal with mean t_mean and
        std t_std, None for the option's paper values, mixed with a uniform share t_floor). The
        squared error is then weighted by (1/T)/P[t] as well, so the expected loss is the one of
        uniform t (importance sampling); loss_type "simple" only.

    Checked by test_math.py section 9 (docs/derivations.md walks each step).
    """

    def __init__(self, betas, mean_type="eps", var_type="fixed_small", loss_type="simple",
                 loss_weighting="none", snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0,
                 timestep_sampling="uniform", t_mean=None, t_std=None, t_floor=TIMESTEP_FLOOR):
        # every option as given, so that respace() builds its chain with the same ones
        self.options = {k: v for k, v in locals().items() if k not in ("self", "betas")}
        self.mean_type = _choice(mean_type, MEAN_TYPES, "mean_type")
        self.var_type = _choice(var_type, VAR_TYPES, "var_type")
        self.loss_type = _choice(loss_type, LOSS_TYPES, "loss_type")
        if var_type == "learned_range" and loss_type == "simple":
            raise ValueError("var_type='learned_range' needs loss_type 'hybrid' or 'vlb': "
                             "L_simple gives the variance output no gradient")
        if loss_type == "hybrid" and var_type != "learned_range":
            raise ValueError("loss_type='hybrid' trains a learned variance (its VB term has the "
                             "mean detached); with a fixed variance use loss_type 'simple'")
        self.loss_weighting = _choice(loss_weighting, LOSS_WEIGHTINGS, "loss_weighting")
        if loss_weighting != "none" and loss_type == "vlb":
            raise ValueError("loss_weighting weights L_simple's squared error; loss_type 'vlb' "
                             "has none (use 'simple' or 'hybrid')")
        _check_number("snr_gamma", snr_gamma, ">", 0, infinite=True)  # ∞: L_simple
        _check_number("p2_k", p2_k, ">", 0)
        _check_number("p2_gamma", p2_gamma, ">=", 0)
        self.weighting_args = {"snr_gamma": snr_gamma, "p2_k": p2_k, "p2_gamma": p2_gamma}
        self._set_timestep_sampling(timestep_sampling, t_mean, t_std, t_floor)
        betas = _check_betas(betas)
        T = self.num_timesteps = betas.numel()
        self.timestep_map = torch.arange(T)  # index -> the timestep the model is told (respace)

        # ᾱ_t = ∏ α_s, in log space so that 1 - ᾱ_t keeps its precision for tiny β.
        log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), 0)
        self.betas = betas
        self.alphas_cumprod = torch.exp(log_alphas_cumprod)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        one_minus_ac = -torch.expm1(log_alphas_cumprod)                   # 1 - ᾱ_t
        one_minus_ac_prev = torch.cat([torch.zeros(1, dtype=torch.float64), one_minus_ac[:-1]])

        # q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I), [Ho] Eq. 6-7.
        self.posterior_variance = betas * one_minus_ac_prev / one_minus_ac    # β̃_t
        # β̃_1 = 0: its log is clipped to log β̃_2 (β_1 when T = 1, where there is no β̃_2).
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([first.reshape(1), self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = torch.sqrt(self.alphas_cumprod_prev) * betas / one_minus_ac
        self.posterior_mean_coef2 = torch.sqrt(1.0 - betas) * one_minus_ac_prev / one_minus_ac

        self.log_betas = torch.log(betas)
        self.one_minus_alphas_cumprod = one_minus_ac
        # log ᾱ and 1 - ᾱ of the step before index i are entry i; entry 0 is ᾱ = 1, the target
        # of DDIM's last step.
        self.log_alphas_cumprod_ext = torch.cat([torch.zeros(1, dtype=torch.float64),
                                                 log_alphas_cumprod])
        self.one_minus_alphas_cumprod_ext = torch.cat([torch.zeros(1, dtype=torch.float64),
                                                       one_minus_ac])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(one_minus_ac)
        self.log_one_minus_alphas_cumprod = torch.log(one_minus_ac)
        self.sqrt_recip_alphas_cumprod = torch.exp(-0.5 * log_alphas_cumprod)          # 1/√ᾱ_t
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(torch.expm1(-log_alphas_cumprod))  # √(1/ᾱ_t - 1)
        # fixed_large: β_t, with β̃_2 at the first step ([Ho]'s code; a better decoder).
        self.fixed_large_log_variance = torch.log(torch.cat([first.reshape(1), betas[1:]]))
        probs = self.timestep_probs()
        # w_t, times the importance weight (1/T)/P[t] when t is not drawn uniformly
        self.loss_weight = self.loss_weights() if self.timestep_sampling == "uniform" else \
            self.loss_weights() / (T * probs)
        self.timestep_cdf = torch.cumsum(probs, 0)
        bad = [k for k in TABLES if not torch.isfinite(getattr(self, k)).all()]
        if bad:
            raise ValueError(f"betas give non-finite {', '.join(bad)}; betas this close to 0 or 1 "
                             "cannot be represented in float64")
        self._device_copies = {}

    def _set_timestep_sampling(self, name, t_mean, t_std, t_floor):
        self.timestep_sampling = _choice(name, tuple(TIMESTEP_SAMPLINGS), "timestep_sampling")
        if name == "uniform":
            if t_mean is not None or t_std is not None or t_floor != TIMESTEP_FLOOR:
                raise ValueError("t_mean, t_std and t_floor shape a non-uniform "
                                 "timestep_sampling; choose 'lognormal' or 'logitnormal' to use them")
            self.sampling_args = {}
            return
        if self.loss_type != "simple":
            raise ValueError(f"timestep_sampling={name!r} reweights L_simple's squared error; "
                             f"loss_type {self.loss_type!r} would be biased (use 'simple')")
        mean, std = TIMESTEP_SAMPLINGS[name]
        mean, std = (mean if t_mean is None else t_mean), (std if t_std is None else t_std)
        _check_number("t_mean", mean)
        _check_number("t_std", std, ">", 0)
        _check_number("t_floor", t_floor, ">", 0, "<=", 1)
        self.sampling_args = {"t_mean": mean, "t_std": std, "t_floor": t_floor}

    def __repr__(self):
        return (f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type!r}, "
                f"var_type={self.var_type!r}, loss_type={self.loss_type!r})")

    # ---- tables --------------------------------------------------------------------------------

    def _on(self, table, device):
        """One of the tables (float64, on the CPU) as the copy kept on `device`, made on first
        use: no table is copied to the device per call."""
        if table.device == torch.device(device):
            return table
        key = (id(table), torch.device(device))
        if key not in self._device_copies:
            self._device_copies[key] = table.to(device)
        return self._device_copies[key]

    def _extract(self, table, t, x):
        """table[t] as a [B, 1, ..., 1] factor in x's dtype, ready to broadcast against x."""
        return _broadcast(self._on(table, x.device)[t], x)

    def _check_t(self, t, x):
        """t must be a LongTensor [B] on x's device; its range is checked on the CPU only (a CUDA
        check would cost a host sync in every call)."""
        if isinstance(t, int):
            t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a LongTensor of shape [{x.shape[0]}] (one 0-based "
                             f"timestep per example), got {getattr(t, 'dtype', type(t))} "
                             f"of shape {tuple(getattr(t, 'shape', ()))}")
        t = t.to(x.device)
        if t.device.type == "cpu" and len(t) and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}] (0-based), got "
                             f"values from {int(t.min())} to {int(t.max())}")
        return t

    def respace(self, timesteps):
        """The diffusion restricted to the kept 0-based `timesteps`, for sampling in fewer steps.

        β is recomputed from the kept ᾱ: β'_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}} (ᾱ before the first
        kept step is 1), so q(x_{k_i} | x_0) is unchanged ([Nichol] §4). Keeping the original β_k
        instead would change ᾱ. The model is still called with the original timestep k_i.

        Checked by test_math.py section 11 (docs/derivations.md walks each step).
        """
        keep = sorted({int(k) for k in timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respace needs a non-empty set of timesteps in "
                             f"[0, {self.num_timesteps - 1}], got {keep[:1]}..{keep[-1:]}")
        log_ac = torch.log(self.alphas_cumprod[keep])
        log_ac_prev = torch.cat([torch.zeros(1, dtype=torch.float64), log_ac[:-1]])
        betas = -torch.expm1(log_ac - log_ac_prev)
        new = GaussianDiffusion(betas, **self.options)
        new.timestep_map = self.timestep_map[keep]
        return new

    # ---- forward process q -------------------------------------------------------------------

    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) ([Ho] Eq. 4).

        x0: [B, ...]; t: [B]. Returns (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]).

        Checked by test_math.py section 1 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x0)
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0,
                self._extract(self.one_minus_alphas_cumprod, t, x0),
                self._extract(self.log_one_minus_alphas_cumprod, t, x0))

    def q_sample(self, x0, t, noise=None):
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, a draw from q(x_t | x_0) ([Ho] Eq. 4). Shapes as x0.

        Checked by test_math.py sections 1 and 13 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x0 has {tuple(x0.shape)}")
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) ([Ho] Eq. 6-7):
        μ̃_t = √ᾱ_{t-1} β_t / (1-ᾱ_t) · x_0 + √α_t (1-ᾱ_{t-1}) / (1-ᾱ_t) · x_t,
        β̃_t = (1-ᾱ_{t-1}) / (1-ᾱ_t) · β_t.

        Returns (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]); at index 0, where
        β̃ = 0, the log-variance is clipped to log β̃ of index 1.

        Checked by test_math.py sections 2, 3 and 6 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x_t)
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x0
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    # ---- the three parameterisations ----------------------------------------------------------

    def predict_x0_from_eps(self, x_t, t, eps):
        """x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t ([Ho] Eq. 15), written 1/√ᾱ_t x_t - √(1/ᾱ_t - 1) ε.

        Checked by test_math.py sections 1 and 3 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x_t)
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        """ε̂ = (x_t - √ᾱ_t x̂_0) / √(1-ᾱ_t), the inverse of predict_x0_from_eps."""
        t = self._check_t(t, x_t)
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def predict_x0_from_v(self, x_t, t, v):
        """x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v̂ ([Salimans] §4, with v = √ᾱ_t ε - √(1-ᾱ_t) x_0)."""
        t = self._check_t(t, x_t)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

    def _eps_from_output(self, mean_out, x_t, t):
        """ε̂ implied by the network's (unclipped) output, whatever it predicts."""
        if self.mean_type == "eps":
            return mean_out
        if self.mean_type == "x0":
            return self.predict_eps_from_x0(x_t, t, mean_out)
        return (self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
                + self._extract(self.sqrt_alphas_cumprod, t, x_t) * mean_out)

    def _target(self, x0, t, noise):
        """What the network is trained to output for x_t = q_sample(x0, t, noise)."""
        if self.mean_type == "eps":
            return noise
        if self.mean_type == "x0":
            return x0
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    # ---- reverse process p_θ ------------------------------------------------------------------

    def _split_output(self, output, x_t):
        """(mean part, variance part or None) of the network output, with a clear shape error."""
        C = x_t.shape[1] if x_t.dim() > 1 else 1
        if self.var_type == "learned_range":
            want = (x_t.shape[0], 2 * C, *x_t.shape[2:])
            if tuple(output.shape) != want:
                raise ValueError(f"var_type='learned_range' needs a model output of shape {want} "
                                 f"(2x the input channels), got {tuple(output.shape)}")
            return output[:, :C], output[:, C:]
        if output.shape != x_t.shape:
            raise ValueError(f"the model output has shape {tuple(output.shape)}, expected the input "
                             f"shape {tuple(x_t.shape)} (set out_channels = 2x in_channels only for "
                             "var_type='learned_range')")
        return output, None

    def _model_variance(self, var_out, x_t, t):
        """(σ², log σ²) of p_θ(x_{t-1} | x_t) for the chosen var_type."""
        if self.var_type == "fixed_small":
            log_var = self._extract(self.posterior_log_variance_clipped, t, x_t)
            return self._extract(self.posterior_variance, t, x_t), log_var
        if self.var_type == "fixed_large":
            log_var = self._extract(self.fixed_large_log_variance, t, x_t)
            return torch.exp(log_var), log_var
        u = (var_out + 1) / 2                                     # [Nichol] Eq. 15
        log_var = (u * self._extract(self.log_betas, t, x_t)
                   + (1 - u) * self._extract(self.posterior_log_variance_clipped, t, x_t))
        return torch.exp(log_var), log_var

    def _pred_x0(self, mean_out, x_t, t, clip_denoised):
        """x̂_0 from the mean part of the network output, whatever it predicts, clipped to
        [-1, 1] with clip_denoised."""
        if self.mean_type == "eps":
            pred_x0 = self.predict_x0_from_eps(x_t, t, mean_out)
        elif self.mean_type == "x0":
            pred_x0 = mean_out
        else:
            pred_x0 = self.predict_x0_from_v(x_t, t, mean_out)
        return pred_x0.clamp(-1.0, 1.0) if clip_denoised else pred_x0

    def pred_x0_from_output(self, output, x_t, t, clip_denoised=True):
        """x̂_0 implied by a network output at (x_t, t) for this mean_type (ε: [Ho] Eq. 15; x_0
        itself; v: [Salimans] §4), clipped to [-1, 1] with clip_denoised: the x̂_0 the samplers
        use, and the one self-conditioning feeds back. output: [B, C or 2C, ...]; x_t: [B, C,
        ...]; t: [B] -> [B, C, ...]."""
        t = self._check_t(t, x_t)
        return self._pred_x0(self._split_output(output, x_t)[0], x_t, t, clip_denoised)

    def _p_from_output(self, output, x_t, t, clip_denoised):
        """p_mean_variance for a network output already computed."""
        mean_out, var_out = self._split_output(output, x_t)
        variance, log_variance = self._model_variance(var_out, x_t, t)
        pred_x0 = self._pred_x0(mean_out, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_x0": pred_x0, "model_output": mean_out}

    def _call_model(self, model, x_t, t):
        return model(x_t, self._on(self.timestep_map, x_t.device)[t])

    def p_mean_variance(self, model, x_t, t, clip_denoised=True):
        """p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ) ([Ho] Eq. 1), with μ_θ = μ̃_t(x_t, x̂_0) ([Ho] Eq. 11
        for ε: then μ_θ = (x_t - β_t/√(1-ᾱ_t) ε_θ)/√α_t exactly). With clip_denoised, x̂_0 is
        clipped to [-1, 1] before it enters μ̃ (as in [Ho]'s sampler).

        x_t: [B, ...]; t: [B]. Returns a dict of "mean", "pred_x0", "model_output" ([B, ...]) and
        "variance", "log_variance" ([B, 1, ...] for fixed variances, [B, ...] when learned).

        Checked by test_math.py sections 3 and 5 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x_t)
        return self._p_from_output(self._call_model(model, x_t, t), x_t, t, clip_denoised)

    def p_sample(self, model, x_t, t, clip_denoised=True, noise=None, generator=None):
        """One step of [Ho] Algorithm 2: x_{t-1} = μ_θ(x_t, t) + σ_t z, with z = 0 at index 0.

        Returns {"sample": x_{t-1}, "pred_x0": x̂_0}.

        Checked by test_math.py section 11 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x_t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised)
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = _broadcast(t != 0, x_t)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    def _loop(self, step, pairs, x, progress, trajectory, desc):
        """Run `step(x, t, t_prev) -> dict` over (t, t_prev) pairs, keeping `trajectory` evenly
        spaced snapshots of (t, x_t, x̂_0) when asked."""
        keep = set(np.linspace(0, len(pairs) - 1, trajectory).round().astype(int).tolist()) \
            if trajectory else set()
        snaps = {"t": [], "x_t": [], "pred_x0": []}
        for i, (t, t_prev) in enumerate(_progress(pairs, progress, desc)):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = step(x, tt, t_prev)
            if i in keep:
                snaps["t"].append(t)
                snaps["x_t"].append(x)
                snaps["pred_x0"].append(out["pred_x0"])
            x = out["sample"]
        if not trajectory:
            return x
        return x, {"t": torch.tensor(snaps["t"]), "x_t": torch.stack(snaps["x_t"]),
                   "pred_x0": torch.stack(snaps["pred_x0"])}

    @staticmethod
    def _initial_noise(shape, noise, generator, device, dtype):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return torch.randn(tuple(shape), generator=generator, device=device,
                           dtype=dtype or torch.float32)

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, generator=None,
                      progress=False, device=None, dtype=None, trajectory=0):
        """[Ho] Algorithm 2: x_T ~ N(0, I), then p_sample for t = T..1; no noise at the last step.

        x_T is `noise` if given (its device and dtype are used), else drawn from `generator` on
        `device`. Each step's z is drawn from `generator` too, so a seed fixes the samples.
        trajectory=K > 0 also returns K evenly spaced snapshots {"t", "x_t", "pred_x0"} of the
        loop's steps (fewer when the loop has fewer than K steps); the first is x_T itself.

        Checked by test_math.py section 11 (docs/derivations.md walks each step).
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)

        def step(x, t, t_prev):
            z = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                 if t_prev >= 0 else torch.zeros_like(x))
            return self.p_sample(model, x, t, clip_denoised, noise=z)

        pairs = [(t, t - 1) for t in reversed(range(self.num_timesteps))]
        return self._loop(step, pairs, x, progress, trajectory, "DDPM sampling")

    # ---- DDIM ---------------------------------------------------------------------------------

    def ddim_timesteps(self, steps, spacing="uniform"):
        """The ascending 0-based timesteps a DDIM run of `steps` steps visits ([Song]'s code).

        "uniform": 0, k, 2k, ... below T with k = T // steps (e.g. T=1000, 50 steps: 0, 20, ...,
        980; when steps does not divide T this gives a few more than `steps`).
        "quad": ⌊(linspace(0, √(0.8 T), steps))²⌋, duplicates removed.

        Checked by test_math.py section 11 (docs/derivations.md walks each step).
        """
        T = self.num_timesteps
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise ValueError(f"DDIM steps must be an integer in [1, {T}], got {steps!r}")
        if spacing == "uniform":
            return list(range(0, T, T // steps))
        if spacing == "quad":
            return sorted(set((np.linspace(0, math.sqrt(T * 0.8), steps) ** 2).astype(int).tolist()))
        raise ValueError(f"unknown DDIM spacing {spacing!r}; use 'uniform' or 'quad'")

    def ddim_sample(self, model, x_t, t, t_prev, eta=0.0, clip_denoised=True, noise=None,
                    generator=None):
        """One DDIM step from index t to index t_prev < t (t_prev = -1 means ᾱ_prev = 1, x_0)
        ([Song] Eq. 12, whose α is ᾱ here):

        x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z,
        σ = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev)   ([Song] Eq. 16).

        ε̂ is recomputed from the (possibly clipped) x̂_0, so that η = 1 over consecutive steps is
        exactly [Ho]'s step with σ² = β̃_t. Returns {"sample", "pred_x0", "variance"}, the last
        σ² per example in float64 (the step's Gaussian, which editing.twisted_inpaint weighs).

        Checked by test_math.py section 11 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x_t)
        t_prev = _check_t_prev(t_prev, t, "DDIM")
        out = self.p_mean_variance(model, x_t, t, clip_denoised)
        eps = self.predict_eps_from_x0(x_t, t, out["pred_x0"])
        # The coefficients in float64 from the tables, cast once: in fp16/bf16 1 - ᾱ rounds to 0.
        log_ac = self._on(self.log_alphas_cumprod_ext, x_t.device)
        one_minus = self._on(self.one_minus_alphas_cumprod_ext, x_t.device)
        log_ac_t, log_ac_prev = log_ac[t + 1], log_ac[t_prev + 1]
        om_t, om_prev = one_minus[t + 1], one_minus[t_prev + 1]
        var = eta ** 2 * om_prev / om_t * -torch.expm1(log_ac_t - log_ac_prev)   # σ², Eq. 16
        mean = (_broadcast(torch.exp(0.5 * log_ac_prev), x_t) * out["pred_x0"]
                + _broadcast(torch.sqrt((om_prev - var).clamp(min=0)), x_t) * eps)
        if eta == 0:
            return {"sample": mean, "pred_x0": out["pred_x0"], "variance": var}
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return {"sample": mean + _broadcast(torch.sqrt(var), x_t) * noise,
                "pred_x0": out["pred_x0"], "variance": var}

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, steps, eta, noise=None, clip_denoised=True,
                         generator=None, progress=False, device=None, dtype=None, spacing="uniform",
                         trajectory=0):
        """DDIM sampling ([Song] Eq. 12) over ddim_timesteps(steps, spacing), descending; the last
        step goes from the smallest kept index to ᾱ = 1 (x_0). E.g. T=1000, steps=50 visits
        980 -> 960 -> ... -> 20 -> 0 -> x_0. eta = 0 is the deterministic DDIM, eta = 1 Algorithm 2
        on the respaced chain (the project's default sampler lives in sampling.py). Noise,
        generator and trajectory as in p_sample_loop; with eta > 0 one z per step is drawn from
        `generator`, none at the last step.

        Checked by test_math.py section 11 (docs/derivations.md walks each step).
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)
        seq = self.ddim_timesteps(steps, spacing)
        pairs = list(zip(reversed(seq), reversed([-1] + seq[:-1])))

        def step(x, t, t_prev):
            z = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                 if eta > 0 and t_prev >= 0 else None)
            return self.ddim_sample(model, x, t, t_prev, eta, clip_denoised, noise=z)

        return self._loop(step, pairs, x, progress, trajectory, f"DDIM-{len(seq)} sampling")

    # ---- DPM-Solver++(2M) ----------------------------------------------------------------------

    def dpm_solver_timesteps(self, steps, spacing="logsnr"):
        """The `steps` ascending 0-based timesteps a DPM-Solver++ run visits, T-1 and 0 included
        (one index, T-1, for steps = 1).

        "logsnr": the indices nearest to `steps` values of λ = ½ log-SNR evenly spaced from
            λ_{T-1} to λ_0 ([Lu]'s choice for low-resolution pixel models, and the one its error
            analysis suggests: the step size is h = Δλ). Where several values round to one index
            (the clipped end of the cosine schedule, or steps near T) neighbours are taken, so the
            indices stay distinct. On the linear schedule, time-uniform steps leave h ≈ 2 for the
            step into index 0 even at 25 steps, and sample far worse.
        "time": round(linspace(T-1, 0, steps)), ascending.
        """
        T = self.num_timesteps
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise ValueError(f"DPM-Solver steps must be an integer in [1, {T}], got {steps!r}")
        if spacing == "time":
            return np.round(np.linspace(T - 1, 0, steps)).astype(int)[::-1].tolist()
        if spacing != "logsnr":
            raise ValueError(f"unknown DPM-Solver spacing {spacing!r}; use 'logsnr' or 'time'")
        lam = self._half_logsnr(torch.arange(T), "cpu").numpy()
        target = np.linspace(lam[-1], lam[0], steps)
        nearest, k = np.sort(np.abs(lam[None, :] - target[:, None]).argmin(1)), np.arange(steps)
        # idx_k = max(nearest_k, idx_{k-1} + 1), then kept <= T-1 - (steps-1-k): distinct, in range
        return (np.minimum(np.maximum.accumulate(nearest - k), T - steps) + k).tolist()

    def _half_logsnr(self, t, device):
        """λ_t = log(√ᾱ_t/√(1-ᾱ_t)) in float64 for indices t >= -1 (-1: ᾱ = 1, λ = +∞)."""
        log_ac = self._on(self.log_alphas_cumprod_ext, device)[t + 1]
        one_minus = self._on(self.one_minus_alphas_cumprod_ext, device)[t + 1]
        return 0.5 * (log_ac - torch.log(one_minus))

    def dpm_solver_step(self, x_t, t, t_prev, pred_x0, older=None):
        """One step of DPM-Solver++(2M) ([Lu] Algorithm 2) from index t to t_prev < t (t_prev = -1:
        ᾱ = 1, x_0), given x̂_0 = x_θ(x_t, t) and `older` = (s [B], x_θ(x_s, s)) of the step
        before (s > t), or None for the first step. With α = √ᾱ, σ = √(1-ᾱ), h = λ_prev - λ_t:

        x_prev = (σ_prev/σ_t) x_t - α_prev (e^{-h} - 1) D,
        D = (1 + 1/(2r)) x̂_0 - 1/(2r) x_θ(x_s, s),  r = (λ_t - λ_s)/h;   D = x̂_0 without `older`
        (the first-order DPM-Solver++ step, which is DDIM eta = 0). The last step, to λ = +∞, has
        h = ∞ and r = 0, where the second-order term has no limit; it is taken first-order, which
        there gives x_0 = x̂_0 (as in [Lu]'s code, and as DDIM's last step). x_t: [B, ...];
        t: [B]; t_prev: an int or [B]. Returns x_prev, [B, ...].
        """
        t = self._check_t(t, x_t)
        t_prev = _check_t_prev(t_prev, t, "DPM-Solver")
        lam_t, lam_prev = self._half_logsnr(t, x_t.device), self._half_logsnr(t_prev, x_t.device)
        D = pred_x0
        if older is not None:
            s, x0_s = older
            half_inv_r = (lam_prev - lam_t) / (2 * (lam_t - self._half_logsnr(s, x_t.device)))
            half_inv_r = torch.where(t_prev >= 0, half_inv_r, torch.zeros_like(half_inv_r))
            D = pred_x0 + _broadcast(half_inv_r, x_t) * (pred_x0 - x0_s)
        one_minus = self._on(self.one_minus_alphas_cumprod_ext, x_t.device)
        sigma_ratio = torch.sqrt(one_minus[t_prev + 1] / one_minus[t + 1])
        alpha_prev = torch.exp(0.5 * self._on(self.log_alphas_cumprod_ext, x_t.device)[t_prev + 1])
        return (_broadcast(sigma_ratio, x_t) * x_t
                - _broadcast(alpha_prev * torch.expm1(lam_t - lam_prev), x_t) * D)

    @torch.no_grad()
    def dpm_solver_sample_loop(self, model, shape, steps, noise=None, clip_denoised=True,
                               generator=None, progress=False, device=None, dtype=None,
                               spacing="logsnr", trajectory=0):
        """DPM-Solver++(2M) ([Lu] Algorithm 2) on the probability-flow ODE over
        dpm_solver_timesteps(steps, spacing), descending, with one network call per visited index:
        e.g. T=1000, 4 steps: 999 -> 603 -> 73 -> 0 -> x_0. The first step is first order (no older
        x̂_0 yet), the last (index 0 to ᾱ = 1) gives x̂_0, the rest are second order. x̂_0 comes
        from the model in any mean_type (p_mean_variance), clipped to [-1, 1] with clip_denoised.
        Deterministic given x_T; noise, generator and trajectory as in p_sample_loop.
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)
        seq = self.dpm_solver_timesteps(steps, spacing)
        pairs = list(zip(reversed(seq), reversed([-1] + seq[:-1])))
        older = []

        def step(x, t, t_prev):
            pred_x0 = self.p_mean_variance(model, x, t, clip_denoised)["pred_x0"]
            sample = self.dpm_solver_step(x, t, t_prev, pred_x0, older[0] if older else None)
            older[:] = [(t, pred_x0)]
            return {"sample": sample, "pred_x0": pred_x0}

        return self._loop(step, pairs, x, progress, trajectory, f"DPM-Solver++-{len(seq)} sampling")

    # ---- the variational bound and the losses -------------------------------------------------

    def _vb_terms_bpd(self, output, x0, x_t, t, clip_denoised):
        """L_{t-1} of [Ho] Eq. 5 in bits/dim, [B]: D_KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for
        index > 0, and the decoder -log p_θ(x_0 | x_1) ([Ho] Eq. 13) at index 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self._p_from_output(output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / LOG2
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"])) / LOG2
        return torch.where(t == 0, decoder_nll, kl), p

    def training_losses(self, model, x0, t, noise=None):
        """Per-example training loss for x0 [B, ...] at timesteps t [B] ([Ho] Algorithm 1).

        Returns a dict of [B] tensors: "loss"; "mse" (the mean squared error of the predicted
        quantity, [Ho] Eq. 14 for ε, before any loss_weighting) unless loss_type is "vlb"; "vb"
        (L_t in bits/dim) for "vlb", "hybrid", or a learned variance.

        Checked by test_math.py section 13 (docs/derivations.md walks each step).
        """
        t = self._check_t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = self._call_model(model, x_t, t)
        mean_out, var_out = self._split_output(output, x0)
        terms = {}
        if self.loss_type != "vlb":
            terms["mse"] = mean_flat((self._target(x0, t, noise) - mean_out) ** 2)
            unweighted = self.loss_weighting == "none" and self.timestep_sampling == "uniform"
            weighted = terms["mse"] if unweighted else \
                self._on(self.loss_weight, x0.device)[t].to(terms["mse"].dtype) * terms["mse"]
        if self.loss_type != "simple":
            if self.loss_type == "hybrid":  # L_vlb trains the variance only ([Nichol] §3.1)
                output = mean_out.detach() if var_out is None else \
                    torch.cat([mean_out.detach(), var_out], dim=1)
            terms["vb"], _ = self._vb_terms_bpd(output, x0, x_t, t, clip_denoised=False)
        T = self.num_timesteps
        if self.loss_type == "simple":
            terms["loss"] = weighted
        elif self.loss_type == "vlb":
            terms["loss"] = T * terms["vb"]
        else:
            terms["loss"] = weighted + HYBRID_LAMBDA * T * terms["vb"]
        return terms

    def loss_weights(self):
        """w_t, float64 [T], the weight on the squared error of the predicted quantity at each
        index. SNR_t = ᾱ_t / (1 - ᾱ_t). Both schemes are defined on ε-prediction's squared error,
        and carried to the other targets by ‖ε - ε̂‖² = SNR ‖x_0 - x̂_0‖² = SNR/(SNR+1) ‖v - v̂‖²:
          "none": 1 (L_simple of the predicted quantity, [Ho] Eq. 14 for ε).
          "min_snr" ([Hang] §3.4, γ = snr_gamma): min(SNR, γ) in x_0's terms, so
              ε: min(SNR, γ)/SNR,  x_0: min(SNR, γ),  v: min(SNR, γ)/(SNR + 1).
          "p2" ([Choi] §3.3, λ'_t = λ_t/(k + SNR)^γ with [Ho]'s λ_t = 1): in ε's terms, so
              ε: 1/(k + SNR)^γ,  x_0: SNR/(k + SNR)^γ,  v: SNR/((SNR + 1)(k + SNR)^γ).
        training_losses multiplies this by (1/T)/P[t] when timestep_sampling is not uniform.
        """
        ac = self.alphas_cumprod
        snr = ac / -torch.expm1(torch.log(ac))                        # ᾱ / (1 - ᾱ)
        a = self.weighting_args
        if self.loss_weighting == "none":
            return torch.ones_like(snr)
        if self.loss_weighting == "min_snr":
            in_x0 = torch.clamp(snr, max=a["snr_gamma"])
            return {"eps": in_x0 / snr, "x0": in_x0, "v": in_x0 / (snr + 1)}[self.mean_type]
        in_eps = (a["p2_k"] + snr) ** -a["p2_gamma"]
        return {"eps": in_eps, "x0": in_eps * snr, "v": in_eps * snr / (snr + 1)}[self.mean_type]

    def timestep_probs(self):
        """P[t], float64 [T] summing to 1: the law of the index t that training draws.

        "uniform": 1/T ([Ho] Algorithm 1). Otherwise ln σ_t, σ_t = √((1-ᾱ_t)/ᾱ_t), is drawn from
        N(t_mean, t_std²):
          "lognormal" ([Karras] §5, Table 1: ln σ ~ N(P_mean, P_std²), P_mean = -1.2, P_std = 1.2);
          "logitnormal" ([Esser] §3.1: logit(τ) ~ N(m, s²), m = 0 and s = 1 as §5.1 recommends,
              for the rectified-flow time τ of z_τ = (1-τ) x_0 + τ ε. The τ with the SNR of index
              t, ((1-τ)/τ)² = ᾱ_t/(1-ᾱ_t), is τ = σ_t/(1+σ_t), so logit(τ) = ln σ_t.)
        Either way log-SNR = -2 ln σ ~ N(-2 t_mean, 4 t_std²). Index t gets that normal's mass over
        its bin of ln σ, between the midpoints to its neighbours (the end bins open to ±∞), and a
        share t_floor is spread uniformly: P = (1 - t_floor) mass + t_floor/T, so every P[t] >=
        t_floor/T and the importance weight (1/T)/P[t] stays <= 1/t_floor.
        """
        T = self.num_timesteps
        if self.timestep_sampling == "uniform":
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        a = self.sampling_args
        log_ac = torch.log(self.alphas_cumprod)
        log_sigma = 0.5 * (torch.log(-torch.expm1(log_ac)) - log_ac)   # increasing in t
        edges = (log_sigma[1:] + log_sigma[:-1]) / 2
        cdf = torch.special.ndtr((edges - a["t_mean"]) / a["t_std"])
        mass = torch.diff(cdf, prepend=torch.zeros(1, dtype=torch.float64),
                          append=torch.ones(1, dtype=torch.float64))
        return (1 - a["t_floor"]) * mass + a["t_floor"] / T

    def sample_timesteps(self, batch, generator=None, device=None):
        """t ~ P (timestep_probs), a LongTensor [batch] on `device` (default: the generator's,
        else the CPU), drawn from `generator`. "uniform" is torch.randint(0, T), the same draw
        (and random numbers) as [Ho] Algorithm 1 in the training loop; the others invert the CDF:
        one u ~ U[0, 1) in float64 per example, t = the first index whose cumulative P exceeds u.
        """
        device = torch.device(device if device is not None else
                              generator.device if generator is not None else "cpu")
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                                 device=device)
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
        cdf = self._on(self.timestep_cdf, device)
        return torch.searchsorted(cdf, u, right=True).clamp(max=self.num_timesteps - 1)

    def prior_bpd(self, x0):
        """L_T = D_KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, [B] ([Ho] Eq. 5).

        Checked by test_math.py section 7 (docs/derivations.md walks each step).
        """
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / LOG2

    @torch.no_grad()
    def calc_bpd_loop(self, model, x0, clip_denoised=True, generator=None, progress=False):
        """The full variational bound ([Ho] Eq. 5) of each example in bits/dim, one x_t draw per t.

        x0: [B, ...] on the 256 levels of [-1, 1]. Returns a dict: "total_bpd" [B] = Σ_t vb + prior,
        "prior_bpd" [B] (L_T), "vb" [B, T] (column 0 is L_0, the decoder; column i > 0 is
        L_i = the KL at index i), "mse" [B, T] (the squared error of the network's ε prediction, unclipped, at each t).

        Checked by test_math.py section 12 (docs/derivations.md walks each step).
        """
        B, T = x0.shape[0], self.num_timesteps
        vb = torch.zeros(B, T, dtype=x0.dtype, device=x0.device)
        mse = torch.zeros_like(vb)
        for i in _progress(list(reversed(range(T))), progress, "bound"):
            t = torch.full((B,), i, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            vb[:, i], p = self._vb_terms_bpd(self._call_model(model, x_t, t), x0, x_t, t,
                                             clip_denoised)
            mse[:, i] = mean_flat((self._eps_from_output(p["model_output"], x_t, t) - noise) ** 2)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse}


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

def guided_output(out_cond, out_null, w, learned_variance=False):
    """The classifier-free guided network output ([CFG] Eq. 6): (1 + w) out_cond - w out_null.

    [CFG] combines the ε predictions, ε̃ = (1 + w) ε(x_t, c) - w ε(x_t, ∅). Every parameterisation
    is, for fixed (x_t, t), affine in the output with the same coefficients for both calls
    (ε = o; ε = (x_t - √ᾱ o)/√(1-ᾱ) for x_0; ε = √(1-ᾱ) x_t + √ᾱ o for v), and the weights
    (1 + w) and -w sum to 1, so combining the outputs gives exactly the combination of the implied
    ε's, whatever the mean_type. With learned_variance (var_type "learned_range", outputs of 2C
    channels) the guidance applies to the mean half only; the variance half is out_cond's.
    out_cond, out_null: [B, C, ...] (or [B, 2C, ...]). Returns the same shape.
    """
    if not learned_variance:
        return (1 + w) * out_cond - w * out_null
    mean_c, var_c = out_cond.chunk(2, dim=1)
    mean_u, _ = out_null.chunk(2, dim=1)
    return torch.cat([(1 + w) * mean_c - w * mean_u, var_c], dim=1)


def guided_model(network, labels, null_label, w, learned_variance=False):
    """model(x_t, t) for the samplers: a class-conditional `network(x, t, y)` guided towards
    `labels` ([CFG] Eq. 6 via guided_output) with ONE network call per step, on the batch doubled
    as [x_t, x_t], [t, t], [labels, null_label]. labels: LongTensor [B] of class indices;
    null_label: the index reserved for "no class" (∅); learned_variance as in guided_output.
    """
    def model(x_t, t):
        y = labels.to(x_t.device)
        out = network(torch.cat([x_t, x_t]), torch.cat([t, t]),
                      torch.cat([y, torch.full_like(y, null_label)]))
        out_cond, out_null = out.chunk(2)
        return guided_output(out_cond, out_null, w, learned_variance)
    return model


# ---------------------------------------------------------------------------------------------
# Self-conditioning
# ---------------------------------------------------------------------------------------------

def self_conditioned(network, diffusion, clip_denoised=True):
    """model(x_t, t, *rest) for ONE sampling chain of a self-conditioned network(x_t, t, *rest,
    pred_x0=x̂_0) ([Chen] §3, Fig. 3's generate): each call is given the x̂_0 of the call before
    (None, i.e. zeros, at the first) and keeps its own output's x̂_0 for the next, as
    diffusion.pred_x0_from_output computes it (clipped with clip_denoised, as the sampler clips
    it). It sits below guided_model, so the conditional and the null half of a guided batch
    each keep their own x̂_0. `diffusion` is the one whose tables the network's t indexes (not
    a respaced chain: _call_model hands the network the original timesteps). Build one per
    chain: it carries the chain's state.
    """
    last = {"pred_x0": None}

    def model(x_t, t, *rest):
        out = network(x_t, t, *rest, pred_x0=last["pred_x0"])
        last["pred_x0"] = diffusion.pred_x0_from_output(out, x_t, t, clip_denoised)
        return out
    return model


def self_conditioned_twice(network, diffusion, clip_denoised=True):
    """model(x_t, t, *rest) of a self-conditioned network that depends on x_t alone: a first
    call with x̂_0 = 0, then a second fed the first's x̂_0 (clipped with clip_denoised), whose
    output it returns ([Chen] §3's training forward with the self-conditioning on). Its
    p_θ(x_{t-1} | x_t) is a Markov step, so calc_bpd_loop's bound is a bound on that model's
    NLL; the samplers' chain (self_conditioned) feeds the previous step's x̂_0 instead, which
    the bound cannot follow, since it draws each t's x_t independently. Two calls per t.
    """
    def model(x_t, t, *rest):
        first = network(x_t, t, *rest)
        return network(x_t, t, *rest,
                       pred_x0=diffusion.pred_x0_from_output(first, x_t, t, clip_denoised))
    return model
