"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion
models", §3 and App. C.1-C.2): a run tracks two power-function EMAs of its weights and stores
snapshots of both every few steps; afterwards, an EMA of any length is a weighted sum of the
snapshots, the weights found by least squares between the averages' profiles. Equation numbers
are the paper's appendix's (arXiv:2312.02696).

Time is counted in steps: θ_k is the model after its k-th update (k = 1, 2, ...). A power-function
EMA of exponent γ at step t is

    θ̂_γ(t) = Σ_{k<=t} w_k θ_k,   w_k = (k^(γ+1) - (k-1)^(γ+1)) / t^(γ+1),

which is exactly the continuous profile p_{t,γ}(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] applied to
the weights held constant between updates (θ(τ) = θ_k for τ in (k-1, k]), and which the per-step
update with β_γ(t) (beta) computes. So the inner products of profiles (p_dot_p) are those of the
averages' weights, and a tracked profile is reconstructed exactly.

The warmup EMA of optim.py, decay (1 + s)/(w + s) at 0-based step s, is asymptotically this
average with γ = w - 2 (its weight of θ_k is (w-1) Γ(k+w-1)/Γ(k+1) Γ(t+1)/Γ(t+w), about
(w-1) k^(w-2) / t^(w-1)): --ema-warmup w is an EMA length, σ_rel(w - 2), until the decay reaches
--ema-decay. Imports nothing of the project.
"""
from typing import NamedTuple

import numpy as np
import torch

PROFILES = (0.05, 0.10)  # σ_rel of the two tracked EMAs, as Karras et al. track (§3)
# The lengths --ema-length reconstructs: between about half the shorter tracked profile and twice
# the longer one, least squares over the two profiles' snapshots matches the target profile to a
# relative L2 error of a few percent (test_phema.py); outside, the error grows fast.
LENGTH_RANGE = (0.03, 0.20)
MAX_PROFILE_ERROR = 0.05  # the largest relative L2 error of a reconstructed profile accepted


def gamma_to_sigma_rel(gamma):
    """σ_rel = (γ+1)^(1/2) (γ+2)^(-1) (γ+3)^(-1/2) (Eq. 123): the standard deviation of the
    profile p(τ) ∝ τ^γ on [0, t], relative to t."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """γ of the profile of relative width σ_rel (Eq. 126, Algorithm 2): the largest real root
    of γ³ + 7γ² + (16 - σ_rel⁻²) γ + (12 - σ_rel⁻²), Eq. 123 solved for γ. ValueError where no
    profile is that wide (γ > -1)."""
    s = np.float64(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots[np.abs(roots.imag) < 1e-9].real
    gamma = real.max() if len(real) else -np.inf
    if not gamma > -1:
        raise ValueError(f"no power-function EMA has sigma_rel {sigma_rel}")
    return float(gamma)


def beta(t, gamma):
    """β_γ(t) = (1 - 1/t)^(γ+1) (Eq. 127): the decay of the update θ̂ <- β θ̂ + (1 - β) θ_t at
    step t >= 1 that keeps θ̂ the power-function EMA of exponent γ (β_γ(1) = 0: the average
    starts at θ_1, whatever it held)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def p_dot_p(t_a, gamma_a, t_b, gamma_b):
    """∫ p_{t_a,γ_a}(τ) p_{t_b,γ_b}(τ) dτ (Eq. 151, Algorithm 3), broadcasting: for t_a < t_b,
    (γ_a+1)(γ_b+1) (t_a/t_b)^γ_b / ((γ_a+γ_b+1) t_b), and symmetrically."""
    t_a, gamma_a, t_b, gamma_b = (np.float64(v) for v in (t_a, gamma_a, t_b, gamma_b))
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp / ((gamma_a + gamma_b + 1) * t_max)


def solve_weights(t_i, gamma_i, t_r, gamma_r):
    """The weights x [n, m] of n snapshots (steps t_i, exponents γ_i) whose sum Σ_i x_i p_i is
    nearest, in L2, each of m target profiles (t_r, γ_r) (Algorithm 3: A x = b, A the
    snapshots' profiles' inner products, b theirs with the target), each column scaled to sum
    to 1, so that a weight no step changed keeps its value."""
    row = lambda v: np.float64(v).reshape(-1, 1)
    column = lambda v: np.float64(v).reshape(1, -1)
    A = p_dot_p(row(t_i), row(gamma_i), column(t_i), column(gamma_i))
    B = p_dot_p(row(t_i), row(gamma_i), column(t_r), column(gamma_r))
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)


def profile_error(t_i, gamma_i, x, t_r, gamma_r):
    """‖Σ_i x_i p_i - p_r‖ / ‖p_r‖ in L2: how far the reconstruction's profile (weights x [n])
    is from the target's (t_r, γ_r), from the inner products alone."""
    t_i, gamma_i, x = (np.float64(v).ravel() for v in (t_i, gamma_i, x))
    A = p_dot_p(t_i[:, None], gamma_i[:, None], t_i[None], gamma_i[None])
    b = p_dot_p(t_i, gamma_i, t_r, gamma_r)
    c = p_dot_p(t_r, gamma_r, t_r, gamma_r)
    return float(np.sqrt(max(x @ A @ x - 2 * x @ b + c, 0.0) / c))


def combine(state_dicts, weights):
    """Σ_i weights[i] state_dicts[i], summed in float64 and cast back to each tensor's dtype;
    tensors that are not floating point (counters) come from the last state dict. state_dicts
    may be an iterator (each is read once, so that only one is held at a time)."""
    total, last = None, None
    for weight, state in zip(weights, state_dicts):
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()
                     if v.is_floating_point()}
        for k, v in state.items():
            if v.is_floating_point():
                total[k].add_(v.double(), alpha=float(weight))
        last = state
    return {k: total[k].to(v.dtype) if v.is_floating_point() else v for k, v in last.items()}


class Tracked(NamedTuple):
    """A power-function EMA tracked during training (--ema-snapshots): its σ_rel, its γ and the
    average itself (a frozen copy of the network)."""
    sigma_rel: float
    gamma: float
    average: torch.nn.Module


class Reconstruction(NamedTuple):
    """The weights of the snapshots for one target EMA, and how good the fit is."""
    weights: np.ndarray   # [n], one per snapshot, summing to 1
    step: int             # the target step
    error: float          # profile_error of the fit


def reconstruct(snapshots, sigma_rel, step=None):
    """Reconstruction of the EMA of length `sigma_rel` at `step` (default: the last snapshot's)
    from `snapshots` [(σ_rel, step)], using those at or before `step` (a later one holds
    weights the target cannot); the weights of the others are 0."""
    steps = np.array([s for _, s in snapshots], np.float64)
    step = int(steps.max()) if step is None else step
    used = steps <= step
    gammas = np.array([sigma_rel_to_gamma(p) for p, _ in snapshots])
    x = np.zeros(len(snapshots))
    target = sigma_rel_to_gamma(sigma_rel)
    x[used] = solve_weights(steps[used], gammas[used], step, target)[:, 0]
    return Reconstruction(x, step, profile_error(steps[used], gammas[used], x[used], step, target))
