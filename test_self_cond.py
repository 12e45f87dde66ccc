"""Self-conditioning (Chen, Zhang & Hinton 2023, "Analog Bits", §3), off by default: the network
with the option is the 2C-input network on [x_t, x̂_0]; a training step runs the extra pass
without gradient on exactly the self-conditioned share, fed back by the closed-form x̂_0 of each
mean_type; every sampler (and guidance, SDEdit, inpainting) feeds step k's x̂_0 to step k+1, one
chain at a time; the bound takes two passes per t; export refuses it; train.py, --resume,
sample.py and evaluate.py carry it end to end. Without the option nothing changes (the draws of
the run's other streams, the network's initialisation)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import checkpoint
import cli
import config
import ddpm
import editing
import evaluate
import hardware
import interop
import optim
import sample
import sampling
import unet
from test_train import TINY, npz, run_train  # noqa: F401 (npz: the suite's tiny data, a fixture)

NET = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
           attn_resolutions=(4,), dropout=0.0, image_size=8, norm_groups=4)


def randomised(module, seed=0, std=0.1):
    """Every parameter redrawn N(0, std²), so that no zero-initialised layer hides an input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def diffusion_of(mean_type="eps", T=100):
    return ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", T), mean_type=mean_type)


def x0_hat(diffusion, out, x_t, t, clip=True):
    """x̂_0 from a network output in closed form, from ᾱ alone (float64): ε: (x_t - √(1-ᾱ) ε̂)/√ᾱ
    (Ho et al. Eq. 15); x_0: the output; v: √ᾱ x_t - √(1-ᾱ) v̂ (Salimans & Ho §4)."""
    ac = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    out, x_t = out.double(), x_t.double()
    x0 = {"eps": (x_t - (1 - ac).sqrt() * out) / ac.sqrt(), "x0": out,
          "v": ac.sqrt() * x_t - (1 - ac).sqrt() * out}[diffusion.mean_type]
    return x0.clamp(-1, 1) if clip else x0


# ---- the network -----------------------------------------------------------------------------

def test_without_the_option_the_network_is_built_and_runs_as_before():
    """The default is off, and a UNet without it draws the same initial weights (the same
    generator draws in the same order) as one built with self_cond=False, and computes the same."""
    assert unet.UNet.__init__.__defaults__[-1] is False
    assert not any("self_cond" in preset for preset in unet.PRESETS.values())
    torch.manual_seed(3)
    default = unet.UNet(**NET)
    torch.manual_seed(3)
    off = unet.UNet(**NET, self_cond=False)
    assert default.conv_in.in_channels == 1
    a, b = default.state_dict(), off.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    assert torch.equal(randomised(default)(x, t), randomised(off)(x, t))


@pytest.mark.parametrize("stem", [1, 2])
def test_the_first_conv_takes_twice_the_channels(stem):
    """[x_t, x̂_0] on channels: conv_in has 2 s² C inputs, and exactly s² C · width · 9 more
    weights than the network without the option (nothing else changes)."""
    kw = dict(NET, in_channels=3, space_to_depth=stem, attn_resolutions=(4 // stem,))
    plain, selfcond = unet.UNet(**kw), unet.UNet(**kw, self_cond=True)
    assert selfcond.conv_in.in_channels == 2 * stem ** 2 * 3 == 2 * plain.conv_in.in_channels
    assert unet.count_parameters(selfcond) - unet.count_parameters(plain) == stem ** 2 * 3 * 8 * 9


@pytest.mark.parametrize("stem", [1, 2])
def test_a_self_conditioned_network_is_the_2c_input_network_on_the_concatenation(stem):
    """With the same weights, UNet(self_cond=True)(x, t, pred_x0=x̂) equals the plain network of
    2C inputs (and C outputs) applied to cat([x, x̂]); pred_x0=None is x̂ = 0. With the stem this
    holds because pixel_unshuffle(cat([a, b])) = cat([pixel_unshuffle(a), pixel_unshuffle(b)])."""
    kw = dict(NET, in_channels=2, space_to_depth=stem, attn_resolutions=(4 // stem,))
    ours = randomised(unet.UNet(**kw, self_cond=True))
    ref = unet.UNet(**{**kw, "in_channels": 4, "out_channels": 2})
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x, xh = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    t = torch.tensor([0, 40, 99])
    with torch.no_grad():
        assert torch.allclose(ours(x, t, pred_x0=xh), ref(torch.cat([x, xh], 1), t), atol=1e-6)
        assert torch.allclose(ours(x, t), ref(torch.cat([x, torch.zeros_like(x)], 1), t), atol=1e-6)
        assert not torch.allclose(ours(x, t, pred_x0=xh), ours(x, t), atol=1e-3)
    a, b = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    assert torch.equal(F.pixel_unshuffle(torch.cat([a, b], 1), 2),
                       torch.cat([F.pixel_unshuffle(a, 2), F.pixel_unshuffle(b, 2)], 1))


def test_pred_x0_is_refused_where_it_cannot_go():
    for make, pred, words in (
            (lambda: unet.UNet(**NET), torch.zeros(2, 1, 8, 8), "self_cond=False"),
            (lambda: unet.UNet(**NET, self_cond=True), torch.zeros(2, 1, 4, 4), "shaped as x")):
        with pytest.raises(ValueError) as e:
            make()(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), pred_x0=pred)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        unet.UNet(**NET, self_cond=1)


def test_pred_x0_from_output_is_each_mean_types_formula():
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(4, 1, 8, 8, generator=g) * 2, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    for mean_type in ddpm.MEAN_TYPES:
        d = diffusion_of(mean_type)
        for clip in (True, False):
            assert torch.allclose(d.pred_x0_from_output(out, x_t, t, clip).double(),
                                  x0_hat(d, out, x_t, t, clip), atol=1e-5)


# ---- training --------------------------------------------------------------------------------

def test_the_coins_are_a_stream_of_their_own():
    """The existing streams keep their numbers (so their draws are those of runs made before), the
    new one has another; its coins are fair, and a function of (seed, step) alone."""
    assert (optim.EPOCH, optim.NOISE, optim.FLIPS, optim.LABEL_DROPS, optim.DROPOUT,
            optim.SELF_COND) == tuple(range(6))
    cfg = config.Train(batch_size=64)
    draws = torch.stack([optim.step_self_cond(cfg, s) for s in range(200)])
    assert draws.dtype == torch.bool and draws.device.type == "cpu"
    n = draws.numel()
    assert abs(draws.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert torch.equal(optim.step_self_cond(cfg, 7), draws[7])
    assert not torch.equal(draws[7], draws[8])
    assert not torch.equal(optim.step_self_cond(config.Train(batch_size=64, seed=1), 7), draws[7])


def recording(network, calls):
    """network as the diffusion calls it, recording each call's inputs and output."""
    def fn(x, t, *rest, pred_x0=None):
        out = network(x, t, *rest, pred_x0=pred_x0)
        calls.append({"x": x.detach().clone(), "t": t.clone(), "rest": [r.clone() for r in rest],
                      "pred_x0": None if pred_x0 is None else pred_x0.detach().clone(),
                      "grad": torch.is_grad_enabled(), "out": out.detach().clone()})
        return out
    return fn


def trainee_for(model, calls):
    forward = recording(hardware.as_called(model, "fp32", torch.device("cpu"), False), calls)
    ema = unet.UNet(**NET, self_cond=True, num_classes=model.null_label)
    ema.load_state_dict(model.state_dict())
    opt = optim.adam(model.parameters(), 1e-3, torch.device("cpu"))
    return optim.Trainee(model, forward, ema.requires_grad_(False), opt,
                         torch.amp.GradScaler("cpu", enabled=False))


TRAIN = dict(batch_size=6, lr=1e-3, warmup=0, lr_schedule="constant", ema_decay=0.999,
             ema_warmup=10.0, steps=10)


@pytest.mark.parametrize("mean_type", ddpm.MEAN_TYPES)
def test_a_training_step_passes_twice_on_the_share_and_once_on_the_rest(mean_type):
    """Chen et al.'s Fig. 3: for the share, a pass without gradient at x̂_0 = 0 on exactly its
    x_t, whose output's x̂_0 (this mean_type's formula, clipped) is fed to the one training pass
    over the whole batch; zeros for the rest."""
    torch.manual_seed(0)
    model, calls = randomised(unet.UNet(**NET, self_cond=True)), []
    d, cfg = diffusion_of(mean_type), config.Train(**TRAIN)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    share = torch.tensor([True, False, True, True, False, False])
    before = [p.detach().clone() for p in model.parameters()]
    optim.train_step(trainee_for(model, calls), d, cfg, x0, t, noise, 0, share=share)
    assert [(len(c["x"]), c["grad"]) for c in calls] == [(3, False), (6, True)]
    ac = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = (ac.sqrt() * x0 + (1 - ac).sqrt() * noise).float()     # Ho et al. Eq. 4
    first, second = calls
    assert first["pred_x0"] is None and torch.equal(first["t"], t[share])
    assert torch.allclose(first["x"], x_t[share], atol=1e-6)
    fed = second["pred_x0"]
    assert torch.allclose(fed[share].double(), x0_hat(d, first["out"], x_t[share], t[share]),
                          atol=1e-5)
    assert fed[share].abs().sum() > 0 and torch.equal(fed[~share], torch.zeros_like(fed[~share]))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_no_share_is_one_pass_and_labels_reach_both_passes():
    torch.manual_seed(0)
    model = randomised(unet.UNet(**NET, self_cond=True, num_classes=3))
    d, cfg = diffusion_of(), config.Train(**TRAIN)
    x0, noise = torch.zeros(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    t, y = torch.arange(6) * 10, torch.tensor([0, 3, 1, 2, 3, 0])   # 3: the null label (a drop)
    calls = []
    optim.train_step(trainee_for(model, calls), d, cfg, x0, t, noise, 0, y,
                     share=torch.zeros(6, dtype=torch.bool))
    assert len(calls) == 1 and torch.equal(calls[0]["pred_x0"], torch.zeros(6, 1, 8, 8))
    calls = []
    share = torch.tensor([False, True, True, False, False, True])
    optim.train_step(trainee_for(model, calls), d, cfg, x0, t, noise, 1, y, share=share)
    assert torch.equal(calls[0]["rest"][0], y[share]) and torch.equal(calls[1]["rest"][0], y)


# ---- sampling --------------------------------------------------------------------------------

def mock(calls, conditional=False):
    """A network(x, t[, y], pred_x0) whose output depends on all of them, recording each call."""
    def network(x, t, *rest, pred_x0=None):
        out = 0.3 * x + (t.float() / 100)[:, None, None, None]
        if pred_x0 is not None:
            out = out + 0.5 * pred_x0
        if conditional:
            out = out + 0.2 * (rest[0].float() - 1)[:, None, None, None]
        calls.append({"x": x.clone(), "t": t.clone(), "out": out.clone(),
                      "pred_x0": None if pred_x0 is None else pred_x0.clone()})
        return out
    return network


def assert_chained(calls, d, clip=True, halves=1):
    """Each chain's first call gets no x̂_0; each later call gets the x̂_0 of the call before it
    (each half of a guided batch its own). Returns the number of chains."""
    chains = 0
    for before, call in zip([None] + calls[:-1], calls):
        if call["pred_x0"] is None:
            chains += 1
            continue
        want = x0_hat(d, before["out"], before["x"], before["t"], clip)
        assert torch.allclose(call["pred_x0"].double(), want, atol=1e-5)
    return chains


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 10), ("dpm", 6)])
def test_every_sampler_feeds_step_k_its_x0_estimate_to_step_k_plus_1(sampler, steps):
    """generate, 5 images in batches of 3: two chains, each starting from zeros and chained step
    by step, for Algorithm 2, DDIM and DPM-Solver++; clipped as the sampler clips."""
    d = diffusion_of(T=30)
    for clip in (True, False):
        calls = []
        x, _ = sampling.generate(mock(calls), d, (1, 4, 4), 5, 3, sampler, steps or 30, 1.0,
                                 progress=False, clip_denoised=clip, self_cond=True)
        assert x.shape == (5, 1, 4, 4)
        assert assert_chained(calls, d, clip) == 2
        assert len(calls) == 2 * sampling.network_calls(sampler, steps or 30, d)


def test_guidance_keeps_two_estimates():
    """The guided batch [x_t, x_t] with [y, ∅]: the conditional and the null half are each fed
    the x̂_0 of their own output at the step before (not the guided one), and the two differ."""
    d, calls = diffusion_of(T=30), []
    labels = torch.tensor([0, 2])
    sampling.generate(mock(calls, conditional=True), d, (1, 4, 4), 2, 2, "ddim", 10, 1.0,
                      progress=False, labels=labels, guidance=0.5, null_label=3, self_cond=True)
    assert all(len(c["x"]) == 4 for c in calls) and assert_chained(calls, d) == 1
    fed = calls[-1]["pred_x0"]
    assert not torch.allclose(fed[:2], fed[2:])


@pytest.mark.parametrize("job", ["inpaint", "edit"])
def test_editing_feeds_the_chain_too(job):
    d, calls = diffusion_of(T=30), []
    images = torch.rand(4, 1, 4, 4) * 2 - 1
    masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    masks[..., :2] = True
    editing.run(job, mock(calls), d, images, masks if job == "inpaint" else None, batch_size=2,
                sampler="ddim", steps=10, resample=2, jump=1, strength=0.6, progress=False,
                self_cond=True)
    assert assert_chained(calls, d) == 2


def test_without_the_option_the_samplers_call_the_network_as_before():
    """self_cond off: the network is called with no pred_x0, and draws the same images as the
    plain network function does."""
    d, calls = diffusion_of(T=30), []
    a, _ = sampling.generate(mock(calls), d, (1, 4, 4), 3, 3, "ddim", 10, 1.0, progress=False)
    assert all(c["pred_x0"] is None for c in calls)
    b, _ = sampling.generate(lambda x, t: 0.3 * x + (t.float() / 100)[:, None, None, None], d,
                             (1, 4, 4), 3, 3, "ddim", 10, 1.0, progress=False)
    assert torch.equal(a, b)


def test_the_bound_takes_two_passes_per_t():
    """calc_bpd_loop through self_conditioned_twice: at every t a call at x̂_0 = 0, then one at the
    same x_t fed its x̂_0; the terms are finite."""
    d, calls = diffusion_of(T=30), []
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    out = d.calc_bpd_loop(ddpm.self_conditioned_twice(mock(calls), d), x0,
                          generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * 30 and torch.isfinite(out["total_bpd"]).all()
    for first, second in zip(calls[::2], calls[1::2]):
        assert first["pred_x0"] is None and torch.equal(first["x"], second["x"])
        assert torch.allclose(second["pred_x0"].double(),
                              x0_hat(d, first["out"], first["x"], first["t"]), atol=1e-5)


# ---- export, flags, and the scripts end to end ------------------------------------------------

def test_export_refuses_a_self_conditioned_network():
    with pytest.raises(interop.ConvertError) as e:
        interop.diffusers_unet_config({**NET, "norm_groups": 4, "self_cond": True})
    message = str(e.value)
    assert "self-conditioned" in message and "cannot express" in message and "\n" not in message


def test_the_flag_is_in_help_and_fills_the_net_part(capsys):
    """--self-cond is explained in --help, fills the net part (so --resume keeps it), and a run
    without it gets the preset's network exactly, with no self_cond key."""
    assert config.FLAG_OF["self_cond"].metadata["part"] == "net"
    assert config.parse_args(["--self-cond"]) == {"self_cond": True}
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--self-cond" in text and "Chen et al. 2023" in text and "(default: off)" in text
    cfg, _ = config.settle({"self_cond": True, "preset": "mnist-tiny"}, torch.device("cpu"),
                           (1, 28, 28))
    assert cfg.net["self_cond"] is True
    cfg, _ = config.settle({"preset": "mnist-stem"}, torch.device("cpu"), (1, 28, 28))
    assert "self_cond" not in cfg.net and cfg.net == {**unet.PRESETS["mnist-stem"],
                                                      "out_channels": 1}


def test_train_resume_sample_and_evaluate_end_to_end(npz, tmp_path, monkeypatch):
    """--preset mnist-tiny --self-cond on the tiny data: the checkpoint's network is
    self-conditioned, N steps straight equal N/2 + --resume (the flag not repeated) + N/2, a
    resume cannot turn it off, sample.py draws, evaluate.py bounds, export refuses."""
    tiny = {"preset": "mnist-tiny", "sample_steps": 4}
    run_train(npz, tmp_path / "a", steps=8, self_cond=True, **tiny)
    run_train(npz, tmp_path / "b", steps=4, self_cond=True, **tiny)
    run_train(npz, tmp_path / "b", steps=8, resume=True, **tiny)
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a["config"]["net"]["self_cond"] is True and b["config"]["net"]["self_cond"] is True
    assert a["model"]["conv_in.weight"].shape[1] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    with pytest.raises(cli.UserError) as e:
        run_train(npz, tmp_path / "b", steps=10, resume=True, self_cond=False, **tiny)
    assert "self_cond" in str(e.value)

    # the scripts wrap the network as the model asks: one chain per batch, two passes per t
    made = {"chains": 0, "bounds": 0}
    chain, twice = ddpm.self_conditioned, ddpm.self_conditioned_twice
    monkeypatch.setattr(ddpm, "self_conditioned", lambda *a, **k: (
        made.__setitem__("chains", made["chains"] + 1), chain(*a, **k))[1])
    monkeypatch.setattr(ddpm, "self_conditioned_twice", lambda *a, **k: (
        made.__setitem__("bounds", made["bounds"] + 1), twice(*a, **k))[1])
    ckpt = str(tmp_path / "a" / "ckpt.pt")
    np.savez(tmp_path / "in.npz", images=np.random.default_rng(0).integers(0, 256, (3, 8, 8),
                                                                           dtype=np.uint8))
    for more in ([], ["--edit", str(tmp_path / "in.npz"), "--strength", "0.5", "--n", "1"]):
        sample.main(["--ckpt", ckpt, "--n", "3", "--steps", "4", "--batch-size", "2", "--out",
                     str(tmp_path / ("e.png" if more else "s.png")), "--device", "cpu",
                     "--precision", "fp32", *more])
    assert made == {"chains": 2 + 2, "bounds": 0} and (tmp_path / "e.png").exists()
    evaluate.main(["--ckpt", ckpt, "--n", "2", "--samples", "0", "--nll-batch-size", "2",
                   "--device", "cpu", "--json", str(tmp_path / "eval.json")])
    nll = json.loads((tmp_path / "eval.json").read_text())["nll"]
    assert made["bounds"] == 1 and math.isfinite(nll["total"]["mean"]) and nll["total"]["mean"] > 0
    model = checkpoint.load_model(ckpt, torch.device("cpu"), "fp32")
    assert model.module.self_cond
    with pytest.raises(interop.ConvertError):
        interop.diffusers_unet_config(model.config["net"])


def _ddp_worker(rank, world, port, npz, out, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        _, model, _ = run_train(npz, out, steps=4, batch_size=16, self_cond=True)
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_like_one(npz, tmp_path):
    """Under DDP each process takes its slice of the global batch's coins (as of t, ε and the
    images), so two processes train the self-conditioned model as one does."""
    port = 29500 + (os.getpid() + 500) % 1000
    mp.spawn(_ddp_worker, args=(2, port, npz, str(tmp_path / "ddp"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _, single, _ = run_train(npz, tmp_path / "single", steps=4, batch_size=16, self_cond=True)
    _, start, _ = run_train(npz, tmp_path / "start", steps=1, lr=1e-30, self_cond=True)
    moved = False
    for (name, w), w0 in zip(single.state_dict().items(), start.state_dict().values()):
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], w, rtol=1e-4, atol=1e-5)
        moved = moved or (w - w0).abs().max() > 1e-3
    assert moved
