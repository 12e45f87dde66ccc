"""bench.py: the FLOPs it counts per training step against an analytic count, and a small run of
its command line. No timing is asserted (speed is what bench.py prints, not what tests check)."""
import importlib.util
import json

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import bench
import unet


def per_layer_flops(model, x, t):
    """2 * multiply-adds of every convolution, linear layer and attention product in one forward
    pass, counted from the layers' shapes by hooks (independent of torch.utils.flop_counter):
    [(layer, FLOPs, whether its input needs a gradient)]."""
    per_layer = []

    def conv_hook(m, inputs, out):
        cin = m.in_channels // m.groups
        per_layer.append((m, 2 * out.numel() * cin * m.kernel_size[0] * m.kernel_size[1],
                          inputs[0].requires_grad))

    def linear_hook(m, inputs, out):
        per_layer.append((m, 2 * out.numel() * m.in_features, inputs[0].requires_grad))

    def attn_hook(m, inputs, out):
        B, C, H, W = inputs[0].shape
        # Q K^T: [HW, C] x [C, HW]; then (.) V: [HW, HW] x [HW, C]
        per_layer.append((m, 2 * 2 * B * (H * W) ** 2 * C, True))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, unet.AttnBlock):
            handles.append(m.register_forward_hook(attn_hook))
    model(x, t)
    for h in handles:
        h.remove()
    return per_layer


def analytic_forward_flops(model, x, t):
    """(total forward FLOPs, the FLOPs of layers whose input needs no gradient)."""
    per_layer = per_layer_flops(model, x, t)
    total = sum(f for _, f, _ in per_layer)
    no_input_grad = sum(f for _, f, needs in per_layer if not needs)
    return total, no_input_grad


def test_training_step_flops_are_forward_plus_backward():
    """Forward F, then backward: each layer's weight gradient (F again) and input gradient (F again,
    except for layers whose input needs none: conv_in on x_t, the first embedding linear); the two
    attention products' backward is four products, 2x their forward. So 3F - F(no input grad)."""
    batch = 2
    r = bench.bench_train("mnist-small", batch, "fp32", False, False, torch.device("cpu"), iters=1)
    model = unet.build_unet("mnist-small")
    x = torch.randn(batch, 1, 28, 28)
    t = torch.tensor([3, 700])
    forward, no_input_grad = analytic_forward_flops(model, x, t)
    assert r["flops"] == 3 * forward - no_input_grad


def test_convs_alone_are_every_convolution_forward_and_backward():
    """bench_convs runs each Conv2d call of a forward pass with input, weight and bias gradients:
    3x the convolutions' forward FLOPs (bias adds are counted by neither side)."""
    batch = 2
    flops, seconds = bench.bench_convs("mnist-small", batch, "fp32", False, torch.device("cpu"), iters=1)
    model = unet.build_unet("mnist-small")
    x = torch.randn(batch, 1, 28, 28)
    t = torch.tensor([3, 700])
    conv_forward = sum(f for m, f, _ in per_layer_flops(model, x, t) if isinstance(m, nn.Conv2d))
    assert flops == 3 * conv_forward and seconds > 0


def test_matmul_peak_is_a_rate():
    """The measured peak is a positive, finite FLOP/s (its size: n^3 multiply-adds per call)."""
    peak = bench.matmul_peak(torch.device("cpu"), torch.float32, (64, 128))
    assert 1e6 < peak < 1e16


def test_command_line_writes_every_variant(tmp_path, capsys):
    """With no --presets, the network `train.py --dataset mnist` trains on a CPU (the README's
    mnist-stem), which has no diffusers peer: --peers says so in one line instead of a row."""
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--batch-sizes", "2", "--iters", "1", "--no-compile", "--peers",
                "--json", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "dense matmul" in printed and "training step" in printed
    assert {r["preset"] for r in result["train"] + result["sample"]} == {"mnist-stem"}
    assert result["peers"] == []
    if importlib.util.find_spec("diffusers") is not None:
        assert "mnist-stem   no peer: preset mnist-stem has a space-to-depth stem" in printed
    variants = {(r["precision"], r["channels_last"], r["compile"]) for r in result["train"]}
    assert ("fp32", False, False) in variants and ("fp32" if "bf16" not in result["matmul_flop_s"]
                                                   else "bf16", True, False) in variants
    for row in result["train"]:
        assert row["img_s"] > 0 and row["flops"] > 0 and 0 < row["frac"]
        assert row["frac"] == row["flop_s"] / result["matmul_flop_s"][row["precision"]]
        assert row["conv_frac"] == row["conv_flop_s"] / result["matmul_flop_s"][row["precision"]] > 0
    assert result["sample"][0]["ddpm1000_img_s"] > 0 and result["sample"][0]["ddim50_img_s"] > 0


def test_peers_are_diffusers_unet_with_the_same_step_and_flops(tmp_path, capsys):
    """--peers: the diffusers UNet2DModel row has the preset's parameter count and, being the
    same architecture, the same FLOPs per step as ours; without diffusers, one line."""
    pytest.importorskip("diffusers")
    peer = bench.DiffusersPeer(dict(unet.PRESETS["mnist-small"]))
    assert unet.count_parameters(peer) == unet.count_parameters(unet.build_unet("mnist-small"))
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--presets", "mnist-small", "--batch-sizes", "2", "--iters", "1",
               "--no-compile", "--peers", "--json", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["peers"]
    ours = next(r for r in result["train"] if r["precision"] == row["precision"]
                and r["channels_last"] == row["channels_last"] and not r["compile"])
    assert row["network"] == "diffusers" and row["img_s"] > 0 and row["ours_img_s"] == ours["img_s"]
    assert "ours/peer" in capsys.readouterr().out
    # The same convolutions and linear layers, FLOP for FLOP (the counter misses diffusers'
    # attention products, which run in a fused CPU kernel; ours appear as bmm).
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    counts = {}
    for name, model in (("ours", unet.build_unet("mnist-small")), ("peer", peer)):
        with FlopCounterMode(display=False) as flops:
            model(x, t).sum().backward()
        counts[name] = {str(k): v for k, v in flops.get_flop_counts()["Global"].items()}
    assert sum(v for k, v in counts["ours"].items() if k != "aten.bmm") == sum(counts["peer"].values())


def test_peers_without_diffusers_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    bench.main(["--device", "cpu", "--presets", "mnist-small", "--batch-sizes", "2", "--iters", "1",
               "--no-compile", "--peers"])
    lines = [l for l in capsys.readouterr().out.splitlines() if "--peers" in l]
    assert lines == ["--peers: diffusers is not installed (pip install -r requirements-test.txt); "
                     "no peer rows"]
