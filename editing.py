"""Fill in and edit images with a trained model, without retraining it: inpainting by replacement
with RePaint's resampling, and SDEdit, on Algorithm 2 or DDIM; the flags sample.py takes for them,
and the reading of their images and masks.

References:
  [Song]    Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
            Equations", §5 and App. I.2: imputation by replacing the known pixels at every step.
  [Lugmayr] Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
            Models", Algorithm 1 (resampling, U passes a step) and §4.2 (jumps of j steps).
  [Meng]    Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
            Differential Equations", Algorithm 1.
  [Ho]      Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models".
  [Wu]      Wu, Trippe, Naesseth, Blei, Cunningham 2023, "Practical and Asymptotically Exact
            Conditional Sampling in Diffusion Models" (the Twisted Diffusion Sampler, TDS):
            its Algorithm 1 (twisted targets, twisted proposals, weights) in its inpainting case.
  [Kitagawa] Kitagawa 1996, "Monte Carlo Filter and Smoother for Non-Gaussian Nonlinear State
            Space Models" (systematic resampling).

The chain. Both methods run on the chain the sampler visits: all T indices for Algorithm 2
(--sampler ddpm), the N indices k_0 < ... < k_{N-1} of ddim_timesteps(--steps) for DDIM (e.g.
T = 1000, 50 steps: k_i = 20 i). A *level* L counts the steps of that chain: level L >= 1 is x at
index k_{L-1}, level 0 is x_0, and sampling descends from level N (x_T ~ N(0, I)) to 0, one
network call a level. Everything below (r, j, the strength) is counted in these steps.

Inpainting. mask = 1 keeps a pixel (known), 0 fills it. Each reverse step from level L to L - 1
takes the unknown pixels from the sampler's step and the known ones from a fresh draw of
q(x_{k_{L-2}} | x_0) ([Ho] Eq. 4), or x_0 itself at level 0 ([Song] §5). RePaint's resampling
(--resample r, its U): on reaching a level L with 1 <= L <= N - j and L divisible by j, x is
taken back up to level L + j by one draw of the forward process q(x_{L+j} | x_L) and the j steps
are sampled again, r - 1 times; so every step but the last is taken r times when j = 1, and r = 1
is plain replacement. The known pixels' noise and the jumps' noise come from a second generator,
so with r = 1 the sampler's own draws are those of unconditional sampling with the same seed.

Twisted inpainting (--particles K > 1, twisted_inpaint). RePaint does not reach the exact
conditional (test_editing.py measures how far it stays); [Wu]'s sequential Monte Carlo sampler
does, as K grows, for the model's own chain p_θ: K particles an image run down the sampler's
chain, each step drawn from a proposal pulled towards the known pixels, weighted and resampled
so that at level L they target p_θ(x_{L:N}) p̃_L(y | x_L), and the last step's weight is the
chain's own p_θ(x_0 = y on the known pixels | x_1). See twisted_inpaint.

SDEdit. --strength s runs the last n = floor(s N + 1/2) steps of the N-step chain (the step
nearest s N; s T for Algorithm 2): x is drawn from q(x_t | x_0) at the 0-based index t = k_{n-1}
(Algorithm 2: t = n - 1, the paper's t = n; DDIM-50 on T = 1000: t = 20 (n - 1)) and the chain
runs down from there. s = 0 returns the input; s = 1 starts from N(0, I) as unconditional
sampling does (same seed, same samples).
"""
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import cli
import dataio
import imaging
import sampling
import userdata
from cli import UserError, check

SAMPLERS = ("ddpm", "ddim")   # the two samplers with a step from any level to the one below
# RePaint's resampling by default: r passes a step (1: plain replacement), jumps of j steps,
# chosen by the MNIST table in docs/results.md: r = 10 fills in digits of the original's class
# 83% and 82% of the time (left, bottom half missing) against 69% and 57% at r = 1, for about
# 10 times the network calls.
DEFAULT_RESAMPLE = 10
DEFAULT_JUMP = 1
DEFAULT_STRENGTH = 0.5        # SDEdit: [Meng] §4 finds t_0 in [0.3, 0.6] the useful range
KEEP_THRESHOLD = 128          # a mask pixel whose grey value is >= this keeps the input's pixel
# The second generator (known pixels, jumps) is seeded seed + KNOWN_SEED_OFFSET: never any
# --seed (those are < 2^31), so its draws are never the sampler's of another run.
KNOWN_SEED_OFFSET = 2 ** 31
# --particles: 1 is RePaint (inpaint); K > 1 the twisted SMC sampler (twisted_inpaint), K particles
# an image. The SMC literature resamples when the effective sample size falls below half of K.
DEFAULT_PARTICLES = 1
ESS_FRACTION = 0.5


# ---- the chain ---------------------------------------------------------------------------------

def chain(diffusion, sampler, steps):
    """The ascending 0-based indices k_0 < ... < k_{N-1} the sampler visits: all T for Algorithm
    2, ddim_timesteps(steps) for DDIM."""
    check(sampler in SAMPLERS, f"inpainting and SDEdit take --sampler ddpm or ddim, not "
          f"{sampler} (DPM-Solver's multistep update has no single step to replace pixels in)")
    if sampler == "ddpm":
        return list(range(diffusion.num_timesteps))
    return list(diffusion.ddim_timesteps(steps))


def reverse_step(diffusion, model, x, t, t_prev, sampler, eta, clip_denoised, generator):
    """x at index t_prev (-1: x_0) from x at index t: [Ho] Algorithm 2's step (p_sample; t_prev =
    t - 1) or DDIM's ([Song DDIM] Eq. 12, ddim_sample), the step's noise drawn from `generator`
    exactly as p_sample_loop and ddim_sample_loop draw it, so that a run that takes only these
    steps is the unconditional sampler itself."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    draw = lambda: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if sampler == "ddpm":
        z = draw() if t_prev >= 0 else torch.zeros_like(x)
        return diffusion.p_sample(model, x, tt, clip_denoised, noise=z)["sample"]
    z = draw() if eta > 0 and t_prev >= 0 else None
    return diffusion.ddim_sample(model, x, tt, t_prev, eta, clip_denoised, noise=z)["sample"]


def forward_jump(diffusion, x, t_from, t_to, generator):
    """A draw of q(x_{t_to} | x_{t_from}) for indices t_from < t_to (t_from = -1: from x_0):
    N(√(ᾱ_to/ᾱ_from) x, (1 - ᾱ_to/ᾱ_from) I), [Ho] Eq. 2 composed over the steps between (as Eq.
    4 composes them from x_0)."""
    ac = diffusion.alphas_cumprod
    ratio = ac[t_to] / (ac[t_from] if t_from >= 0 else 1.0)          # ᾱ_to / ᾱ_from, float64
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * z


def repaint_levels(n, resample, jump):
    """The levels RePaint's schedule visits on an n-step chain, from n down to 0 (see the module
    docstring): descending one level a step; on reaching L with 1 <= L <= n - jump and L % jump
    == 0, back up to L + jump and down again, resample - 1 times. E.g. n = 4, r = 2, j = 1:
    4 3 4 3 2 3 2 1 2 1 0; n = 4, r = 2, j = 2: 4 3 2 4 3 2 1 0."""
    levels, level = [n], n
    while level > 0:
        level -= 1
        levels.append(level)
        if 1 <= level <= n - jump and level % jump == 0:
            for _ in range(resample - 1):
                levels.extend(range(level + jump, level - 1, -1))
    return levels


def repaint_calls(n, resample, jump):
    """The network calls (reverse steps) of repaint_levels(n, resample, jump)."""
    points = len([L for L in range(1, n - jump + 1) if L % jump == 0])
    return n + (resample - 1) * jump * points


def check_repaint(n, resample, jump):
    """UserError unless resample >= 1 and jump >= 1, and a jump fits in the n-step chain."""
    cli.check_number("--resample", resample, 1, 10_000)
    cli.check_number("--jump-length", jump, 1, 100_000)
    check(resample == 1 or jump < n, f"--jump-length {jump} needs a chain of more than {jump} "
          f"steps, and this sampler's has {n}; give a smaller --jump-length or more --steps")


def strength_steps(strength, n):
    """SDEdit's n_s = floor(s n + 1/2): how many of the n chain steps --strength s runs."""
    return int(math.floor(strength * n + 0.5))


# ---- the two algorithms ------------------------------------------------------------------------

@torch.no_grad()
def inpaint(diffusion, model, x0, mask, sampler="ddim", steps=sampling.DEFAULT_STEPS,
            eta=sampling.DEFAULT_ETA, resample=DEFAULT_RESAMPLE, jump=DEFAULT_JUMP,
            clip_denoised=True, generator=None, known_generator=None, tick=None):
    """x_0 with the pixels where `mask` is False filled by the model ([Song] §5 replacement,
    [Lugmayr] Algorithm 1 resampling with jumps of `jump` steps); the kept pixels are x0's
    exactly.

    x0: [B, ...] in [-1, 1] (its values where mask is False are never read); mask: bool,
    broadcastable to x0, True = keep. x_T is drawn from `generator` as the samplers draw it, and
    each step's noise too; the known pixels' noise and the jumps' from `known_generator`. tick():
    called once a network call. Returns [B, ...].
    """
    seq = chain(diffusion, sampler, steps)
    check_repaint(len(seq), resample, jump)
    index = [-1] + seq                                  # level L -> its 0-based index
    mask = mask.to(x0.device).bool()
    x = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)   # x_T
    levels = repaint_levels(len(seq), resample, jump)
    for level, nxt in zip(levels, levels[1:]):
        t, t_next = index[level], index[nxt]
        if nxt > level:                                 # resample: back up by q(x_next | x)
            x = forward_jump(diffusion, x, t, t_next, known_generator)
            continue
        unknown = reverse_step(diffusion, model, x, t, t_next, sampler, eta, clip_denoised,
                               generator)
        if t_next >= 0:
            noise = torch.randn(x0.shape, generator=known_generator, device=x0.device,
                                dtype=x0.dtype)
            known = diffusion.q_sample(x0, torch.full((x0.shape[0],), t_next, dtype=torch.long,
                                                      device=x0.device), noise)
        else:
            known = x0
        x = torch.where(mask, known, unknown)
        if tick:
            tick()
    return x


# ---- the twisted SMC sampler ([Wu]) ------------------------------------------------------------

def check_twisted(sampler, eta, particles):
    """UserError unless the sampler's steps are Gaussian (Algorithm 2, or DDIM with eta > 0) and
    particles >= 1."""
    cli.check_number("--particles", particles, 1, 100_000)
    check(sampler == "ddpm" or eta > 0, f"--particles {particles} weighs each step by its Gaussian "
          "density, and DDIM at --eta 0 is deterministic; give --eta above 0 (1: the default)")


def step_gaussian(diffusion, model, x, t, t_prev, sampler, eta, clip_denoised):
    """The sampler's step from index t to t_prev as a Gaussian N(mean, std² I): (mean, std,
    x̂_0), one network call. Algorithm 2: μ_θ(x_t) and σ_t = exp(½ log Σ_θ) ([Ho] Eq. 1, 11, as
    p_sample draws it); DDIM: [Song DDIM] Eq. 12's mean and σ of Eq. 16 (ddim_sample at zero
    noise, and the same σ it draws with). The last step (t_prev = -1) of both samplers is
    x̂_0(x_t) itself, drawn without noise; its std here is Algorithm 2's decoder σ_1 (the log
    β̃ of index 0, clipped as p_mean_variance clips it; the learned one for Algorithm 2 with a
    learned variance), under which twisted_inpaint weighs the known pixels. std: [B, 1, ...],
    or [B, ...] for a learned variance."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if sampler == "ddpm":
        out = diffusion.p_mean_variance(model, x, tt, clip_denoised)
        return out["mean"], torch.exp(0.5 * out["log_variance"]), out["pred_x0"]
    out = diffusion.ddim_sample(model, x, tt, t_prev, eta, clip_denoised,
                                noise=torch.zeros_like(x))
    if t_prev < 0:
        std = torch.exp(0.5 * diffusion.posterior_log_variance_clipped[0]).expand(x.shape[0])
    else:   # Eq. 16's σ, as ddim_sample drew with it
        std = torch.sqrt(out["variance"])
    std = std.to(device=x.device, dtype=x.dtype)
    return out["sample"], std.reshape(-1, *[1] * (x.dim() - 1)), out["pred_x0"]


def twist_variance(diffusion, t):
    """s_t² = (1 - ᾱ_t)/ᾱ_t, the variance of the twisting function p̃_t(y | x_t) = N(y; x̂_0(x_t)
    on the known pixels, s_t² I) (the choice of [Wu]'s inpainting experiments): x_t/√ᾱ_t = x_0 + s_t ε
    under q, so s_t is the noise x_t leaves on x_0 (the posterior std of x_0 under a flat prior).
    It is wide where x_t says little (x_T: about 1/ᾱ_T) and goes to ᾱ_1's β_1/(1 - β_1), about
    the decoder's variance, at the last step, where the twist meets the exact likelihood."""
    return float(torch.expm1(-torch.log(diffusion.alphas_cumprod[t])))


def log_normal_known(y, mean, var, mask):
    """log N(y; mean, var I) over the pixels where mask is True, summed per particle: [P] from
    [P, ...] (var a number or [P, 1 or ..., ...]); the unknown pixels of y are never read."""
    var = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    terms = (y - mean) ** 2 / var + torch.log(2 * math.pi * var)
    return -0.5 * torch.where(mask, terms, torch.zeros((), dtype=mean.dtype,
                                                       device=mean.device)).flatten(1).sum(1)


def twisted_state(diffusion, model, x, t, t_prev, y, mask, sampler, eta, clip_denoised, grad):
    """At particles x at index t: the step to t_prev (step_gaussian: mean, std) and log p̃_t(y |
    x_t) (twist_variance) with, if `grad`, its gradient ∇_{x_t} log p̃_t through the network
    (one backward pass; the model is called with gradients on). All returned detached."""
    with torch.set_grad_enabled(grad):
        x = x.detach().requires_grad_(grad)
        mean, std, pred_x0 = step_gaussian(diffusion, model, x, t, t_prev, sampler, eta,
                                           clip_denoised)
        log_twist = log_normal_known(y, pred_x0, twist_variance(diffusion, t), mask)
        g = torch.autograd.grad(log_twist.sum(), x)[0] if grad else None
    return mean.detach(), std.detach(), log_twist.detach(), g


def systematic_resample(log_w, generator):
    """Ancestors [B, K] by systematic resampling ([Kitagawa]: one uniform u per image, the K
    points (u + k)/K through the cumulative weights) for the images whose effective sample size
    1/Σ w_k² (w normalised) is below ESS_FRACTION K; the others keep their particles (and where
none is below, no uniform is drawn). Returns
    (ancestors, log weights: 0 where resampled, else as given). log_w: [B, K]."""
    B, K = log_w.shape
    w = torch.softmax(log_w, 1)
    low = 1.0 / (w ** 2).sum(1) < ESS_FRACTION * K
    keep = torch.arange(K, device=log_w.device).expand(B, K)
    if not low.any():                # no draw: equal weights use the generator as sampling does
        return keep, log_w
    u = (torch.rand((B, 1), generator=generator, device=log_w.device, dtype=log_w.dtype)
         + torch.arange(K, device=log_w.device, dtype=log_w.dtype)) / K
    cdf = torch.cumsum(w, 1)
    cdf = cdf / cdf[:, -1:]          # ends at 1: a particle of weight 0 is never picked
    picked = torch.searchsorted(cdf, u).clamp(max=K - 1)
    return (torch.where(low[:, None], picked, keep),
            torch.where(low[:, None], torch.zeros_like(log_w), log_w))


@torch.no_grad()
def twisted_inpaint(diffusion, model, x0, mask, particles=8, sampler="ddim",
                    steps=sampling.DEFAULT_STEPS, eta=sampling.DEFAULT_ETA, clip_denoised=True,
                    generator=None, tick=None):
    """x_0 with the pixels where `mask` is False filled by [Wu]'s Twisted Diffusion Sampler: a
    draw, asymptotically exact as `particles` K grows, from the model's own chain conditioned on
    the known pixels y: p_θ(x_0 | x_0 = y on the known pixels) ∝ ∫ p_θ(x_{0:N}) dx_{1:N}, with
    p_θ the sampler's chain (all T steps of Algorithm 2, or DDIM's N at eta > 0: Gaussian steps
    N(μ_θ(x_L), σ_L² I), step_gaussian). The kept pixels are x0's exactly.

    [Wu] Algorithm 1: K particles an image, x_N ~ N(0, I), the twisted targets γ_L(x_{L:N}) ∝
    p_θ(x_{L:N}) p̃_L(y | x_L), with the twisting function p̃_L(y | x_L) = N(y; x̂_0(x_L) on the
    known pixels, s_L² I), s_L² = (1 - ᾱ)/ᾱ at x_L's index (twist_variance). Each step from level
    L to L - 1
    draws from the twisted proposal
        r(x_{L-1} | x_L) = N(μ_θ(x_L) + σ_L² ∇_{x_L} log p̃_L(y | x_L), σ_L² I)
    (the gradient through the network) and multiplies the weight by
        w_L = p_θ(x_{L-1} | x_L) p̃_{L-1}(y | x_{L-1}) / [p̃_L(y | x_L) r(x_{L-1} | x_L)],
    in log space (the first weight is p̃_N(y | x_N)). Before each step an image whose particles'
    effective sample size is below K/2 is resampled, systematically (systematic_resample). The
    last step, to x_0 = x̂_0(x_1) (as the samplers take it, without noise), is weighed by the
    chain's own decoder at the known pixels, p_θ(x_0 = y there | x_1) = N(y; x̂_0(x_1), σ_1² I)
    (step_gaussian), over p̃_1(y | x_1); the known pixels are set to y, the unknown ones are
    x̂_0(x_1)'s, and one particle an image is returned, drawn by the final weights.

    K = 1 has no weights to act on: it is the twisted proposal alone, each step's mean moved by
    σ_L² ∇ log p̃_L (reconstruction guidance, biased), and with a mask that keeps nothing (no
    twist) it is unconditional sampling, the same seed giving the same samples. N network calls,
    each on B K images with a backward pass (none at the last).

    x0: [B, ...] (its values where mask is False are never read); mask: bool, broadcastable to
    x0, True = keep. Everything random (x_N, each step's noise, the resampling and the final
    draw) comes from `generator`, in that order. tick(): called once a network call. Returns
    [B, ...].
    """
    check_twisted(sampler, eta, particles)
    seq = chain(diffusion, sampler, steps)
    index = [-1] + seq                                  # level L -> its 0-based index
    B, K, n = x0.shape[0], particles, len(seq)
    y = x0.repeat_interleave(K, 0)                      # particle i belongs to image i // K
    mask = mask.to(x0.device).bool().expand(x0.shape).repeat_interleave(K, 0)
    x = torch.randn(y.shape, generator=generator, device=x0.device, dtype=x0.dtype)    # x_N
    state = lambda x, level: twisted_state(diffusion, model, x, index[level],
                                           index[level - 1], y, mask, sampler, eta,
                                           clip_denoised, grad=level > 1)
    mean, std, log_twist, g = state(x, n)
    log_w = log_twist.view(B, K)                        # γ_N / N(0, I) = p̃_N(y | x_N)
    for level in range(n, 0, -1):
        if tick:
            tick()
        ancestors, log_w = systematic_resample(log_w, generator)
        pick = (ancestors + K * torch.arange(B, device=x.device)[:, None]).flatten()
        x, mean, log_twist = x[pick], mean[pick], log_twist[pick]
        std = std[pick]
        if level == 1:                                  # p_θ(x_0 = y on the known pixels | x_1)
            log_w = log_w + (log_normal_known(y, mean, std ** 2, mask) - log_twist).view(B, K)
            x = torch.where(mask, y, mean)
            break
        shift = std ** 2 * g[pick]                      # σ_L² ∇ log p̃_L(y | x_L)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + shift + std * z                      # x_{L-1} ~ r(· | x_L)
        # log p_θ(x_{L-1} | x_L) - log r(x_{L-1} | x_L), with x_{L-1} - μ_θ = shift + σ z:
        # -(|shift + σ z|² - |σ z|²) / (2 σ²), summed over the pixels
        log_ratio = -(shift ** 2 / (2 * std ** 2) + shift * z / std).flatten(1).sum(1)
        mean, std, new_twist, g = state(x, level - 1)
        log_w = log_w + (log_ratio + new_twist - log_twist).view(B, K)
        log_w = log_w - torch.logsumexp(log_w, 1, keepdim=True)
        log_twist = new_twist
    chosen = torch.multinomial(torch.softmax(log_w, 1), 1, generator=generator)[:, 0]
    return x[chosen + K * torch.arange(B, device=x.device)]


@torch.no_grad()
def sdedit(diffusion, model, x0, strength, sampler="ddim", steps=sampling.DEFAULT_STEPS,
           eta=sampling.DEFAULT_ETA, clip_denoised=True, generator=None, tick=None):
    """[Meng] Algorithm 1 on the sampler's chain: x0 noised by q(x_t | x_0) ([Ho] Eq. 4) to the
    index of strength_steps(strength, N) (see the module docstring), then denoised by the
    sampler's steps. strength 0 returns x0; 1 starts from N(0, I), drawn from `generator` as the
    samplers draw x_T, and is unconditional sampling. x0: [B, ...] in [-1, 1]. Returns [B, ...].
    """
    seq = chain(diffusion, sampler, steps)
    n = strength_steps(strength, len(seq))
    if n == 0:
        return x0.clone()
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t_start = torch.full((x0.shape[0],), seq[n - 1], dtype=torch.long, device=x0.device)
    x = noise if n == len(seq) else diffusion.q_sample(x0, t_start, noise)
    for i in reversed(range(n)):
        x = reverse_step(diffusion, model, x, seq[i], seq[i - 1] if i else -1, sampler, eta,
                         clip_denoised, generator)
        if tick:
            tick()
    return x


def network_calls(job, diffusion, sampler, steps, resample=1, jump=1, strength=1.0,
                  particles=1):
    """The network calls of one batch of `job` ("inpaint" or "edit"); the twisted sampler's
    (particles > 1) are on particles times the batch, each with a backward pass but the last."""
    n = len(chain(diffusion, sampler, steps))
    if job == "inpaint":
        return n if particles > 1 else repaint_calls(n, resample, jump)
    return strength_steps(strength, n)


def run(job, network, diffusion, images, masks=None, labels=None, batch_size=256,
        sampler=sampling.DEFAULT_SAMPLER, steps=sampling.DEFAULT_STEPS, eta=sampling.DEFAULT_ETA,
        resample=DEFAULT_RESAMPLE, jump=DEFAULT_JUMP, strength=DEFAULT_STRENGTH, seed=0,
        device="cpu", clip_denoised=True, guidance=sampling.DEFAULT_GUIDANCE, null_label=None,
        progress=True, self_cond=False, particles=DEFAULT_PARTICLES):
    """inpaint (or, with particles K > 1, twisted_inpaint: K particles an image, the network
    called on batch_size K images) or sdedit over `images` ([N, C, H, W] in [-1, 1]), batch by
    batch, from one generator on `device` seeded with `seed` (and, for RePaint, a second one for
    the known pixels), as sampling.generate draws: the same seed and batch size give the same
    images. masks: bool [N or 1, C or 1, H, W] for "inpaint". labels: LongTensor [N] for a
    class-conditional network(x, t, y), guided with weight `guidance` (sampling.conditioned);
    None calls network(x, t). self_cond: a self-conditioned network, fed the previous step's x̂_0
    (sampling.chain_model; not with particles > 1). Returns [N, C, H, W]."""
    twisted = job == "inpaint" and particles > 1
    if twisted:
        check_twisted(sampler, eta, particles)
        check(not self_cond, f"--particles {particles}: a self-conditioned model feeds each "
              "step the x̂_0 of its own chain, which resampling the particles would cut; give "
              "--particles 1 (RePaint)")
    g = torch.Generator(device).manual_seed(seed)
    g_known = torch.Generator(device).manual_seed(seed + KNOWN_SEED_OFFSET)
    starts = range(0, len(images), batch_size)
    calls = network_calls(job, diffusion, sampler, steps, resample, jump, strength, particles)
    what = "filling" if job == "inpaint" else "editing"
    each = f" x {particles} particles" if twisted else ""
    bar = tqdm(total=len(starts) * calls, desc=f"{what} {len(images)} images{each}", unit="step",
               disable=not progress, leave=False)
    out = []
    with bar:
        for start in starts:
            x0 = images[start:start + batch_size].to(device)
            y = None if labels is None else labels[start:start + len(x0)]
            if twisted and y is not None:
                y = y.repeat_interleave(particles)      # the particles of image i: i K .. i K + K-1
            model = sampling.chain_model(network, diffusion, y, null_label, guidance,
                                         clip_denoised, self_cond)
            kw = dict(sampler=sampler, steps=steps, eta=eta, clip_denoised=clip_denoised,
                      generator=g, tick=lambda: bar.update(1))
            if twisted:
                mask = masks if len(masks) == 1 else masks[start:start + len(x0)]
                out.append(twisted_inpaint(diffusion, model, x0, mask.to(device), particles, **kw))
            elif job == "inpaint":
                mask = masks if len(masks) == 1 else masks[start:start + len(x0)]
                out.append(inpaint(diffusion, model, x0, mask.to(device), resample=resample,
                                   jump=jump, known_generator=g_known, **kw))
            else:
                out.append(sdedit(diffusion, model, x0, strength, **kw))
    return torch.cat(out)


# ---- the flags ---------------------------------------------------------------------------------

def add_arguments(p):
    """--inpaint, --mask, --resample, --jump-length, --edit and --strength, as sample.py takes
    them (None where not given, so that a flag given without its job is caught)."""
    p.add_argument("--inpaint", metavar="IMAGE", help="fill in IMAGE where --mask says: a PNG of "
                   "the model's size and channels, or an .npz of several (uint8 [N, H, W], "
                   "[N, H, W, C] or [N, C, H, W]; its labels array gives a class-conditional model "
                   "each image's class, unless --class does); writes each input | its mask | --n "
                   "fillings (one row each) to --out, or the fillings to an .npz")
    p.add_argument("--mask", metavar="MASK", help="with --inpaint: white keeps the input's "
                   f"pixel, black fills it (grey values >= {KEEP_THRESHOLD} keep; a colour mask's "
                   "grey value is the mean of R, G, B): a PNG of the model's size, or an .npz "
                   "(bool, or uint8 0/255: [H, W] or [N, H, W] or [N, C, H, W]), one mask for all "
                   "images or one each")
    p.add_argument("--resample", type=int, metavar="R", help="with --inpaint: RePaint's U, "
                   "each step taken R times, going back by the forward process between passes "
                   f"(1: plain replacement, biased) (default: {DEFAULT_RESAMPLE}, the best of "
                   "1, 2, 5, 10 for MNIST digits with a half to fill, docs/results.md; the network "
                   "calls grow about R times; a class-conditional model given each image's class "
                   "did as well there at 1)")
    p.add_argument("--jump-length", type=int, metavar="J", help="with --inpaint and --resample "
                   "above 1: go back J steps of the chain actually sampled (the --steps of DDIM, "
                   f"all T of ddpm) at every J-th step (default: {DEFAULT_JUMP})")
    p.add_argument("--particles", type=int, metavar="K", help="with --inpaint: K > 1 uses the "
                   "twisted SMC sampler (Wu et al. 2023) instead of RePaint: K particles an image "
                   "run down the chain, pulled towards the kept pixels, weighted and resampled, "
                   "one returned; a draw from the model's exact conditional as K grows; about K "
                   "times the network calls of plain sampling, each with a backward pass, on "
                   "--batch-size times K images (Algorithm 2 or DDIM with --eta above 0; not with "
                   f"--resample or --jump-length) (default: {DEFAULT_PARTICLES}: RePaint)")
    p.add_argument("--edit", metavar="IMAGE", help="SDEdit: noise IMAGE (PNG or .npz as for "
                   "--inpaint) to the step nearest --strength times the chain's length and "
                   "denoise it; writes each input | --n edits to --out, or the edits to an .npz")
    p.add_argument("--strength", type=float, metavar="S", help="with --edit, in [0, 1]: runs the "
                   "last floor(S N + 1/2) of the sampler's N steps (N = --steps for ddim, T for "
                   "ddpm); 0 returns the input, 1 starts from pure noise (unconditional "
                   f"sampling) (default: {DEFAULT_STRENGTH})")


def check_arguments(args):
    """What the flags must be together, before any checkpoint or image is read."""
    job = "inpaint" if args.inpaint else "edit" if args.edit else None
    check(not (args.inpaint and args.edit), "--inpaint and --edit are two jobs; give one")
    check(args.mask is None or args.inpaint, "--mask goes with --inpaint IMAGE; give the image "
          "to fill")
    check(not args.inpaint or args.mask, "--inpaint needs --mask MASK (white keeps, black fills)")
    for flag, value, owner in (("--resample", args.resample, "inpaint"),
                               ("--jump-length", args.jump_length, "inpaint"),
                               ("--particles", args.particles, "inpaint"),
                               ("--strength", args.strength, "edit")):
        check(value is None or job == owner, f"{flag} goes with --{owner}; give --{owner} IMAGE")
    if job is None:
        return None
    if job == "inpaint":
        args.particles = DEFAULT_PARTICLES if args.particles is None else args.particles
        cli.check_number("--particles", args.particles, 1, 100_000)
        if args.particles > 1:
            for flag, value in (("--resample", args.resample), ("--jump-length", args.jump_length)):
                check(value is None or value == 1, f"--particles {args.particles} runs the "
                      f"twisted SMC sampler, which does not take RePaint's {flag}; drop {flag} "
                      "or give --particles 1")
            args.resample, args.jump_length = 1, 1
            check_twisted(args.sampler, 1.0 if args.eta is None else args.eta, args.particles)
        args.resample = DEFAULT_RESAMPLE if args.resample is None else args.resample
        args.jump_length = DEFAULT_JUMP if args.jump_length is None else args.jump_length
        cli.check_number("--resample", args.resample, 1, 10_000)
        cli.check_number("--jump-length", args.jump_length, 1, 100_000)
    else:
        args.strength = DEFAULT_STRENGTH if args.strength is None else args.strength
        cli.check_number("--strength", args.strength, 0.0, 1.0)
    check(args.sampler in SAMPLERS, f"--{job} takes --sampler ddpm or ddim, not {args.sampler} "
          "(DPM-Solver's multistep update has no single step to replace pixels in)")
    check(not args.trajectory, f"--trajectory draws unconditional samples; it does not go with "
          f"--{job}")
    return job


# ---- images and masks --------------------------------------------------------------------------

def read_images(path, shape):
    """(uint8 [N, C, H, W], labels int64 [N] or None) from a PNG (N = 1) or an .npz (with an
    optional `labels` array), checked against the model's (C, H, W) = `shape`; a grey image for a
    colour model is repeated to 3 channels."""
    if path.endswith((".npz", ".npy")):
        images, labels = userdata.load_labelled_npz(path)
    else:
        images, labels = userdata.read_image(path)[None], None
    channels, size = shape[0], shape[1:]
    check(images.shape[2:] == tuple(size), f"{path} holds images of {images.shape[2]}x"
          f"{images.shape[3]} pixels, and the model takes {size[0]}x{size[1]}; resize it first")
    if images.shape[1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=1)
    check(images.shape[1] == channels, f"{path} holds colour images, and the model takes "
          f"grey ones ({channels} channel); convert it to grey first")
    return images, labels


def read_masks(path, shape, count):
    """bool [count or 1, C or 1, H, W], True = keep, from a PNG or an .npz (see --mask's help)
    for `count` images of the model's (C, H, W) = `shape`."""
    channels, size = shape[0], tuple(shape[1:])
    if path.endswith((".npz", ".npy")):
        array = _npz_mask(path)
    else:
        pixels = userdata.read_image(path).astype(np.float64)
        array = (pixels.mean(axis=0) >= KEEP_THRESHOLD)[None, None]
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] not in (1, channels) and array.shape[3] in (1, channels):
        array = array.transpose(0, 3, 1, 2)
    check(array.ndim == 4 and array.shape[2:] == size, f"{path} holds a mask of shape "
          f"{array.shape}, and the model's images are {size[0]}x{size[1]}; give [H, W], "
          f"[N, H, W] or [N, C, H, W] masks of that size")
    check(array.shape[1] in (1, channels), f"{path} holds masks of {array.shape[1]} channels, "
          f"and the model's images have {channels}; give one channel or {channels}")
    check(len(array) in (1, count), f"{path} holds {len(array)} masks for {count} images; give "
          "one mask for all or one each")
    return torch.from_numpy(np.ascontiguousarray(array))


def _npz_mask(path):
    """The mask array of a .npz/.npy: its only array or the one named mask or masks; bool, or
    integers where >= 128 keeps (0/255)."""
    check(os.path.isfile(path), f"{path} does not exist; give the path of a mask (PNG or .npz)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            array = loaded
        else:
            with loaded:
                keys = [k for k in ("mask", "masks") if k in loaded.files] or loaded.files
                check(len(keys) == 1, f"{path} holds arrays {loaded.files}; name the mask array "
                      "'mask'")
                array = np.array(loaded[keys[0]])
    except UserError:
        raise
    except Exception as err:  # a pickled object array, a damaged zip or not numpy at all
        raise UserError(f"cannot read {path} as a mask ({dataio.one_line(err)}); save it with "
                        "numpy.savez(path, mask=bool_array)") from None
    if array.dtype == np.bool_:
        return array
    check(array.dtype.kind in "iu", f"{path} holds a {array.dtype} mask; save it as bool "
          "(True keeps) or uint8 0/255 (white keeps)")
    check(array.size == 0 or array.max() > 1 or array.min() < 0, f"{path} holds a mask of 0s "
          "and 1s only, which reads as all black (fill everything) on the 0-255 scale; save it "
          "as bool or as 0/255")
    return array >= KEEP_THRESHOLD


def labels_for(asked, count, config, given):
    """The class of each of `count` images for the model with `config`: --class `asked` (one for
    all, or one each as 0,1,2: sampling.class_labels), else the labels `given` with the images (an
    .npz's), else None (network(x, t): a class-conditional model's "no class"). UserError as
    class_labels says, or for given labels the model has no class for."""
    labels, _ = sampling.class_labels(asked, count, config, counts="images")
    classes = config["net"].get("num_classes")
    if labels is not None or given is None or classes is None:
        return labels
    check(int(given.max()) < classes, f"the images' labels go up to {int(given.max())}, and the "
          f"model has {classes} classes; give --class")
    return torch.as_tensor(given, dtype=torch.long)


def grid_rows(inputs, outputs, per_image, masks=None):
    """uint8 images for a grid of one row per input: the input, its mask (white keeps; inpaint
    only) and its `per_image` outputs. inputs: uint8 [N, C, H, W]; outputs: uint8
    [N * per_image, C, H, W], image by image; masks: bool [N or 1, C or 1, H, W] or None.
    Returns (images [N * (1 + [1] + per_image), C, H, W], images a row)."""
    n, channels = inputs.shape[:2]
    parts = [inputs[:, None]]
    if masks is not None:
        m = np.broadcast_to(masks.numpy(), (n, channels, *inputs.shape[2:]))
        parts.append((m * np.uint8(255)).astype(np.uint8)[:, None])
    parts.append(outputs.reshape(n, per_image, *outputs.shape[1:]))
    rows = np.concatenate(parts, axis=1)
    return rows.reshape(-1, *rows.shape[2:]), rows.shape[1]


def to_model_range(images):
    """uint8 numpy [N, C, H, W] -> float32 tensor in [-1, 1]."""
    return imaging.to_model_range(torch.from_numpy(np.array(images)))
