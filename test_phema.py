"""Post-hoc EMA (phema.py; Karras et al. 2024, §3 and App. C) against independent references: the
width σ_rel of a power profile by SciPy's quadrature against Eq. 123, Algorithm 2 against a SciPy
root, the per-step update's weights against their closed form, the profiles' inner products
against quadrature, the reconstruction of a tracked length (exact) and of a third length on a
random walk (against a directly tracked average), optim.py's warmup EMA against the power EMA of
γ = w - 2; and end to end: train.py --ema-snapshots writes snapshots, leaves the run's weights
as they are, resumes exactly; sample.py and evaluate.py --ema-length use the reconstruction."""
import os
import types

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq

import checkpoint
import cli
import evaluate
import optim
import phema
import rundir
import sample
from test_train import TINY, npz, run_train  # noqa: F401  (npz: the tiny dataset's fixture)


def power_weights(t, gamma):
    """The closed form of the weights of θ_1..θ_t in the power-function EMA at step t:
    (k^(γ+1) - (k-1)^(γ+1)) / t^(γ+1), the profile (γ+1) τ^γ / t^(γ+1) integrated over (k-1, k]."""
    k = np.arange(1, t + 1, dtype=np.float64)
    return (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1)


def profile(tau, t, gamma):
    """p_{t,γ}(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t], 0 after."""
    return np.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)


# ---- the profiles ---------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 6.9, 17.0, 60.0])
def test_sigma_rel_of_a_power_profile_by_quadrature(gamma):
    """σ_rel (Eq. 123) is the standard deviation of the profile ∝ τ^γ on [0, 1], integrated."""
    p = lambda tau: (gamma + 1) * tau ** gamma
    mean = quad(lambda x: x * p(x), 0, 1)[0]
    variance = quad(lambda x: (x - mean) ** 2 * p(x), 0, 1)[0]
    assert quad(p, 0, 1)[0] == pytest.approx(1.0)
    assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(np.sqrt(variance), rel=1e-8)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.03, 0.05, 0.07, 0.09, 0.10, 0.15, 0.2, 0.28])
def test_sigma_rel_to_gamma_inverts_eq_123(sigma_rel):
    """Algorithm 2's root is the γ >= 0 whose σ_rel (Eq. 123) is the one asked, found by
    bisection; a width no profile has is refused."""
    root = brentq(lambda g: phema.gamma_to_sigma_rel(g) - sigma_rel, 0.0, 1e6, xtol=1e-12)
    assert phema.sigma_rel_to_gamma(sigma_rel) == pytest.approx(root, rel=1e-8, abs=1e-10)
    with pytest.raises(ValueError):
        phema.sigma_rel_to_gamma(0.5)


@pytest.mark.parametrize("gamma", [1.8, 6.9, 8.0])
def test_the_per_step_update_gives_the_closed_form_weights(gamma):
    """optim.ema_update with β_γ(t) (Eq. 127) at t = 1..T over one-hot weights (θ_k = e_k, so
    the average is its own weights) gives (k^(γ+1) - (k-1)^(γ+1)) / T^(γ+1) to rounding, from
    any start; and those are the weights ∝ k^γ normalized, to within γ/(2k) each (their total
    variation distance below 0.01 at T = 1000)."""
    T = 1000
    average = torch.nn.Linear(T, 1, bias=False).double()
    theta = torch.nn.Linear(T, 1, bias=False).double()
    with torch.no_grad():
        average.weight.fill_(7.0)  # β_γ(1) = 0: the start is forgotten
        for t in range(1, T + 1):
            theta.weight.zero_()
            theta.weight[0, t - 1] = 1.0
            optim.ema_update(average, theta, phema.beta(t, gamma))
    found = average.weight[0].detach().numpy()
    np.testing.assert_allclose(found, power_weights(T, gamma), rtol=1e-9, atol=1e-15)
    powers = np.arange(1, T + 1, dtype=np.float64) ** gamma
    assert 0.5 * np.abs(found - powers / powers.sum()).sum() < 0.01


@pytest.mark.parametrize("t_a, gamma_a, t_b, gamma_b", [(100, 6.9, 300, 3.4), (300, 6.9, 100, 3.4),
                                                        (200, 3.4, 200, 6.9), (50, 0.5, 80, 12.0)])
def test_p_dot_p_is_the_integral_of_the_profiles_product(t_a, gamma_a, t_b, gamma_b):
    """Eq. 151 / Algorithm 3 against quadrature of p_a p_b over [0, min(t_a, t_b)]."""
    reference = quad(lambda x: profile(x, t_a, gamma_a) * profile(x, t_b, gamma_b), 0,
                     min(t_a, t_b), epsabs=0, epsrel=1e-12)[0]
    assert phema.p_dot_p(t_a, gamma_a, t_b, gamma_b) == pytest.approx(reference, rel=1e-8)


# ---- reconstruction -------------------------------------------------------------------------

def tracked_walk(steps=400, every=20, dim=64, lengths=(*phema.PROFILES, 0.07), seed=0):
    """A toy run: θ_k a Gaussian random walk of a vector, tracked by the power-function EMAs of
    `lengths` with the per-step update; (snapshots [(σ_rel, step)], their values [n, dim] for
    the two PROFILES every `every` steps, {σ_rel: the tracked average at the last step})."""
    rng = np.random.default_rng(seed)
    theta = np.cumsum(rng.normal(size=(steps, dim)), axis=0)
    averages = {s: np.zeros(dim) for s in lengths}
    snapshots, values = [], []
    for t in range(1, steps + 1):
        for s in lengths:
            b = phema.beta(t, phema.sigma_rel_to_gamma(s))
            averages[s] = b * averages[s] + (1 - b) * theta[t - 1]
        if t % every == 0:
            for s in phema.PROFILES:
                snapshots.append((s, t))
                values.append(averages[s].copy())
    return snapshots, np.array(values), averages


def test_a_tracked_length_is_reconstructed_exactly():
    """Asking for a tracked length at the last step gives that snapshot alone (weight 1, the
    others 0 to float tolerance), a profile error of 0, and combine() gives back its values."""
    snapshots, values, averages = tracked_walk()
    for sigma_rel in phema.PROFILES:
        fit = phema.reconstruct(snapshots, sigma_rel)
        one_hot = np.array([s == (sigma_rel, 400) for s in snapshots], np.float64)
        np.testing.assert_allclose(fit.weights, one_hot, atol=1e-6)
        assert fit.step == 400 and fit.error < 1e-6
        states = [{"w": torch.from_numpy(v)} for v in values]
        np.testing.assert_allclose(phema.combine(states, fit.weights)["w"].numpy(),
                                   averages[sigma_rel], rtol=1e-6, atol=1e-6)


def test_a_third_length_is_close_to_its_directly_tracked_average():
    """σ_rel 0.07, between the two tracked lengths, reconstructed from 20 snapshots of each on a
    400-step random walk: the tolerance, fixed before the result was seen, is 5% of the distance
    between the two tracked averages (the range of lengths being resolved)."""
    snapshots, values, averages = tracked_walk()
    fit = phema.reconstruct(snapshots, 0.07)
    states = [{"w": torch.from_numpy(v)} for v in values]
    reconstructed = phema.combine(states, fit.weights)["w"].numpy()
    spread = np.linalg.norm(averages[0.05] - averages[0.10])
    assert np.linalg.norm(reconstructed - averages[0.07]) <= 0.05 * spread
    assert fit.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("sigma_rel", [*phema.LENGTH_RANGE, 0.07, 0.15])
def test_the_lengths_allowed_are_reconstructed_well(sigma_rel):
    """Within LENGTH_RANGE, snapshots every 5% of a run (20 of each profile) fit the target
    profile to within MAX_PROFILE_ERROR, the error computed from the inner products agreeing
    with quadrature of the squared difference of the profiles."""
    snapshots, _, _ = tracked_walk()
    fit = phema.reconstruct(snapshots, sigma_rel)
    assert fit.error <= phema.MAX_PROFILE_ERROR
    gammas = [phema.sigma_rel_to_gamma(s) for s, _ in snapshots]
    target = phema.sigma_rel_to_gamma(sigma_rel)
    mixed = lambda x: sum(w * profile(x, t, g)
                          for w, (_, t), g in zip(fit.weights, snapshots, gammas))
    points = sorted({t for _, t in snapshots})
    squared = quad(lambda x: (mixed(x) - profile(x, 400, target)) ** 2, 0, 400, points=points,
                   limit=500, epsabs=0, epsrel=1e-10)[0]
    norm = quad(lambda x: profile(x, 400, target) ** 2, 0, 400, epsabs=0, epsrel=1e-10)[0]
    assert fit.error == pytest.approx(np.sqrt(squared / norm), rel=1e-3, abs=1e-6)


def test_a_target_step_uses_the_snapshots_before_it():
    """An EMA at an earlier step is a sum of the snapshots at or before it; a tracked length at a
    snapshot's step is that snapshot."""
    snapshots, _, _ = tracked_walk()
    fit = phema.reconstruct(snapshots, 0.10, step=200)
    later = np.array([t > 200 for _, t in snapshots])
    assert (fit.weights[later] == 0).all() and fit.step == 200
    np.testing.assert_allclose(fit.weights, [s == (0.10, 200) for s in snapshots], atol=1e-6)


# ---- today's EMA as a power-function EMA ----------------------------------------------------

@pytest.mark.parametrize("w", [10.0, 6.0])
def test_the_warmup_ema_is_a_power_ema_of_gamma_w_minus_2(w):
    """optim.py's EMA, decay min(0.9999, (1 + s)/(w + s)) at step s, over one-hot weights for
    3,000 steps (the cap not reached): its weights are within 0.02 in total variation of the
    power-function EMA's of γ = w - 2, and their spread relative to the run is σ_rel(w - 2)
    within 2%."""
    T = 3000
    cfg = types.SimpleNamespace(ema_decay=0.9999, ema_warmup=w)
    average = torch.nn.Linear(T + 1, 1, bias=False).double()
    theta = torch.nn.Linear(T + 1, 1, bias=False).double()
    with torch.no_grad():
        average.weight.zero_()
        average.weight[0, 0] = 1.0  # θ_0, the initial weights the EMA starts from
        for s in range(T):
            theta.weight.zero_()
            theta.weight[0, s + 1] = 1.0  # θ_{s+1}: the model after step s
            optim.ema_update(average, theta, optim.ema_decay_at(cfg, s))
    found = average.weight[0].detach().numpy()
    assert found.sum() == pytest.approx(1.0)
    expected = np.concatenate([[0.0], power_weights(T, w - 2)])
    assert 0.5 * np.abs(found - expected).sum() < 0.02
    middle = (np.arange(T + 1) - 0.5).clip(0)  # θ_k holds over (k-1, k]
    mean = (found * middle).sum()
    spread = np.sqrt((found * (middle - mean) ** 2).sum() + (found * 1 / 12).sum())
    assert spread / T == pytest.approx(phema.gamma_to_sigma_rel(w - 2), rel=0.02)


# ---- train.py, sample.py and evaluate.py ----------------------------------------------------

@pytest.fixture(scope="module")
def runs(npz, tmp_path_factory):
    """Three runs of 20 steps of the tiny network: without snapshots; with --ema-snapshots 2
    (the model after every step recorded); and 10 steps with it, then --resume to 20."""
    root = tmp_path_factory.mktemp("phema")
    tiny = {**TINY, "preset": "mnist-tiny", "steps": 20}
    run_train(npz, root / "plain", **tiny)
    recorded, step = [], optim.train_step

    def recording(trainee, *args, **kwargs):
        out = step(trainee, *args, **kwargs)
        recorded.append({k: v.clone() for k, v in trainee.model.state_dict().items()})
        return out

    optim.train_step = recording
    try:
        run_train(npz, root / "snap", **tiny, ema_snapshots=2)
    finally:
        optim.train_step = step
    run_train(npz, root / "resumed", **{**tiny, "steps": 10}, ema_snapshots=2)
    run_train(npz, root / "resumed", **tiny, resume=True)
    return root, recorded


def test_snapshots_leave_the_run_as_it_was_and_hold_the_power_emas(runs):
    """With --ema-snapshots 2 the weights, the EMA, torch's generator and the losses are those of
    the run without it; snapshots of both profiles are written every 2 steps, weights only, and
    the one at step 20 is the closed form Σ_k w_k θ_k of the recorded weights."""
    root, recorded = runs
    plain, snap = checkpoint.load(root / "plain"), checkpoint.load(root / "snap")
    for key in ("model", "ema"):
        for name, value in plain[key].items():
            assert torch.equal(value, snap[key][name]), (key, name)
    assert torch.equal(plain["rng"]["torch"], snap["rng"]["torch"])
    assert checkpoint.TRACKED not in plain and set(snap[checkpoint.TRACKED]) == {"0.050", "0.100"}
    found = rundir.snapshots(root / "snap")
    assert [(s, t) for s, t, _ in found] == [(s, t) for t in range(2, 21, 2) for s in (0.05, 0.1)]
    assert len(recorded) == 20
    for sigma_rel in phema.PROFILES:
        weights = power_weights(20, phema.sigma_rel_to_gamma(sigma_rel))
        path = os.path.join(root, "snap", rundir.SNAPSHOTS, rundir.snapshot_name(sigma_rel, 20))
        held = torch.load(path, weights_only=True)
        assert set(held) == set(plain["model"])
        for name, value in held.items():
            expected = sum(w * r[name].double() for w, r in zip(weights, recorded))
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_resume_continues_the_tracked_emas_exactly(runs):
    """10 steps, then --resume to 20: the tracked EMAs in the checkpoint and every snapshot file
    are those of the run of 20 steps straight."""
    root, _ = runs
    snap, resumed = checkpoint.load(root / "snap"), checkpoint.load(root / "resumed")
    for key, weights in snap[checkpoint.TRACKED].items():
        for name, value in weights.items():
            assert torch.equal(value, resumed[checkpoint.TRACKED][key][name]), (key, name)
    ours, theirs = rundir.snapshots(root / "snap"), rundir.snapshots(root / "resumed")
    assert [s[:2] for s in ours] == [s[:2] for s in theirs]
    for (_, _, a), (_, _, b) in zip(ours, theirs):
        mine, resumed_file = (torch.load(p, weights_only=True) for p in (a, b))
        for name, value in mine.items():
            assert torch.equal(value, resumed_file[name]), (a, name)


def test_ema_length_loads_the_reconstruction(runs, capsys):
    """load_model(ema_length=0.10) is the tracked profile's last snapshot; 0.07 lies between the
    two, and sample.py and evaluate.py use it and say so."""
    root, _ = runs
    run = str(root / "snap")
    cpu = torch.device("cpu")
    loaded = checkpoint.load_model(checkpoint.resolve(run), cpu, "fp32", ema_length=0.10)
    last = torch.load(os.path.join(run, rundir.SNAPSHOTS, rundir.snapshot_name(0.10, 20)),
                      weights_only=True)
    for name, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, last[name], rtol=1e-5, atol=1e-6)
    assert "the EMA of length 0.1 at step 20" in capsys.readouterr().err
    cli.run_script(sample.main, ["--ckpt", run, "--ema-length", "0.07", "--n", "2", "--steps",
                                 "2", "--out", str(root / "s.png")])
    assert "the EMA of length 0.07 at step 20" in capsys.readouterr().err
    assert os.path.exists(root / "s.png")
    cli.run_script(evaluate.main, ["--ckpt", run, "--ema-length", "0.07", "--n", "2",
                                   "--samples", "0", "--json", str(root / "e.json")])
    assert "EMA length 0.07 reconstructed" in capsys.readouterr().out


def test_a_run_without_snapshots_and_a_poor_fit_are_one_line(runs, capsys):
    """No snapshots, or too few to fit the length asked: exit 2 and one line."""
    root, _ = runs
    few = root / "few"
    (few / rundir.SNAPSHOTS).mkdir(parents=True)
    (few / "ckpt.pt").write_bytes((root / "snap" / "ckpt.pt").read_bytes())
    for s in phema.PROFILES:  # one snapshot of each at step 20: a length between is a poor fit
        name = rundir.snapshot_name(s, 20)
        (few / rundir.SNAPSHOTS / name).write_bytes((root / "snap" / rundir.SNAPSHOTS / name)
                                                    .read_bytes())
    for run, needle in ((root / "plain", "holds no EMA snapshots"),
                        (few, "reconstruct it only to a profile error")):
        with pytest.raises(SystemExit) as info:
            cli.run_script(sample.main, ["--ckpt", str(run), "--ema-length", "0.03", "--n", "2",
                                         "--out", str(root / "x.png")])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_a_resumed_run_drops_the_snapshots_after_its_checkpoint(tmp_path):
    """rundir.take: --resume from step 10 removes the snapshots a killed run wrote after it (the
    resumed run writes them again) and keeps the others; --overwrite removes them all."""
    folder = tmp_path / rundir.SNAPSHOTS
    folder.mkdir()
    for step in (5, 10, 15):
        for s in phema.PROFILES:
            (folder / rundir.snapshot_name(s, step)).write_bytes(b"")
    (folder / "notes.txt").write_text("not ours")
    rundir.take(str(tmp_path), 10, overwrite=False)
    assert [s[:2] for s in rundir.snapshots(tmp_path)] == [(s, t) for t in (5, 10)
                                                            for s in phema.PROFILES]
    assert rundir.run_files(tmp_path) == [rundir.SNAPSHOTS]
    rundir.take(str(tmp_path), None, overwrite=True)
    assert rundir.snapshots(tmp_path) == [] and os.listdir(folder) == ["notes.txt"]
