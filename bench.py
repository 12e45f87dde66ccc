"""Speed against the hardware: `python bench.py` (add `--json FILE` to keep the table).

On the present device (CPU or CUDA), for the network `python train.py --dataset mnist` trains
there (config.default_preset; --presets names others) and a few batch sizes, it measures
  train img/s    the training step train.py runs (forward, backward, Adam, EMA)
  DDPM/DDIM img/s  sampling throughput of Ho's 1000-step sampler and DDIM-50, from the median
                   time of one sampling step (the network call plus the update), times the steps
  peak memory    CUDA max allocated, or the process's peak resident set on the CPU
  achieved FLOP/s  the step's FLOPs (torch.utils.flop_counter: convolutions and matmuls, forward
                   and backward) over its median time, as a fraction of the best dense matmul
                   measured in the same run (several sizes; fp32 and bf16): the physical limit
  convs alone    the same for the step's convolutions by themselves (each Conv2d call, forward and
                 backward, at the step's shapes, precision and memory layout): the fraction the step
                 would reach if everything else in it (GroupNorm, SiLU, attention, Adam, EMA) were
                 free, i.e. the ceiling set by the convolution kernels
and repeats the training step with each speed option on and off: bf16 autocast, channels_last,
torch.compile (and CUDA graphs for sampling on CUDA).
"""
import copy
import importlib.util
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: hardware.py says why
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils.flop_counter import FlopCounterMode

import cli
import config
import data
import ddpm
import files
import hardware
import interop
import optim
import unet


def matmul_peak(device, dtype, sizes):
    """The best FLOP/s of n x n x n matmuls in `dtype` over `sizes` (each: 5 warm-up calls, then the
    best of 5 timed rounds of 10 calls): the machine's dense-matmul limit for that dtype."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(5):
            a @ b
        for _ in range(5):
            hardware.sync(device)
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            hardware.sync(device)
            best = max(best, 2 * n ** 3 * 10 / (time.perf_counter() - start))
    return best


def reset_peak_memory(device):
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's resident-set
    high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: peak_memory falls back to the peak since the process started


def peak_memory(device):
    """Bytes: CUDA max allocated, or the CPU process's peak resident set since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_preset(cuda):
    """The preset `python train.py --dataset mnist` trains on this kind of device: the one bench.py
    times unless --presets names others."""
    return config.default_preset(data.image_shape("mnist")[1], cpu=not cuda)


def row_config(preset, batch, precision, channels_last, compile_):
    """The training config of a bench row: Ho et al.'s recipe at this preset, batch and options."""
    recipe = {k: v for k, v in config.RECIPES["ho"].items() if hasattr(config.Train, k)}
    cfg = config.Train(**{**recipe, "warmup": 1000, "batch_size": batch}, preset=preset,
                       precision=precision, channels_last=channels_last, compile=compile_)
    return cfg, dict(unet.PRESETS[preset])


def as_called(network, cfg, device):
    return hardware.as_called(network, cfg.precision, device, cfg.channels_last)


def batch_shape(preset, batch):
    """[batch, C, H, W] of the preset's images."""
    kwargs = unet.PRESETS[preset]
    return (batch, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])


class DiffusersPeer(nn.Module):
    """diffusers' UNet2DModel configured as the preset (interop.diffusers_unet_config: the same
    architecture and parameter count), called as unet.UNet is: forward(x, t) -> the output."""

    def __init__(self, kwargs):
        super().__init__()
        from diffusers import UNet2DModel  # only for --peers; checked in parse_args
        settings = {k: v for k, v in interop.diffusers_unet_config(kwargs).items()
                    if not k.startswith("_")}
        self.net = UNet2DModel(**settings)

    def forward(self, x, t):
        return self.net(x, t).sample


def build_peer(cfg, kwargs, device):
    """(model, ema, optimizer, scaler) as optim.build makes them, around the peer."""
    torch.manual_seed(cfg.seed)
    layout = hardware.memory_format(cfg.channels_last)
    model = DiffusersPeer(kwargs).to(device, memory_format=layout)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = optim.adam(model.parameters(), cfg.lr, device)
    return model, ema, optimizer, torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")


def bench_train(preset, batch, precision, channels_last, compile_, device, iters, peer=False):
    """The training step's img/s, FLOPs and peak memory; peer=True: the same step around
    diffusers' UNet2DModel configured as the preset."""
    cfg, kwargs = row_config(preset, batch, precision, channels_last, compile_)
    build = build_peer if peer else optim.build
    model, ema, optimizer, scaler = build(cfg, kwargs, device)
    diffusion = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    if compile_:
        torch._dynamo.reset()  # each row compiles afresh, so its graph count is its own
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    network = torch.compile(model) if compile_ else model
    trainee = optim.Trainee(model, as_called(network, cfg, device), ema, optimizer, scaler)
    g = torch.Generator(device).manual_seed(0)
    shape = batch_shape(preset, batch)
    x0 = torch.rand(shape, generator=g, device=device) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    noise = torch.randn(shape, generator=g, device=device)
    counter = {"step": 0}

    def run():
        optim.train_step(trainee, diffusion, cfg, x0, t, noise, counter["step"])
        counter["step"] += 1

    reset_peak_memory(device)
    seconds = hardware.median_seconds(run, device, warmup=3 if not compile_ else 5, iters=iters)
    peak = peak_memory(device)  # before the FLOP-counting pass below, which runs uncompiled
    with FlopCounterMode(display=False) as flops:
        losses = diffusion.training_losses(as_called(model, cfg, device), x0, t, noise=noise)
        losses["loss"].mean().backward()
    optimizer.zero_grad(set_to_none=True)
    compiled_graphs = dynamo_counters["stats"]["unique_graphs"] - graphs_before
    if compile_ and compiled_graphs == 0:
        raise RuntimeError("torch.compile produced no graph (it fell back to eager)")
    return {"compiled_graphs": compiled_graphs, "img_s": batch / seconds, "step_ms": 1e3 * seconds,
            "flops": flops.get_total_flops(), "flop_s": flops.get_total_flops() / seconds,
            "peak_mem_mb": peak / 2 ** 20}


def bench_sample(preset, batch, precision, channels_last, graphs, device, iters):
    """Sampling img/s of DDPM-1000 and DDIM-50 from the median time of one step of each."""
    cfg, kwargs = row_config(preset, batch, precision, channels_last, False)
    _, ema, _, _ = optim.build(cfg, kwargs, device)
    diffusion = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    network = torch.compile(ema, mode="reduce-overhead") if graphs else ema
    fn = as_called(network, cfg, device)
    shape = batch_shape(preset, batch)
    x = torch.randn(shape, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    with torch.no_grad():
        ddpm_step = hardware.median_seconds(lambda: diffusion.p_sample(fn, x, t), device, 3, iters)
        ddim_step = hardware.median_seconds(lambda: diffusion.ddim_sample(fn, x, t, 480), device, 3, iters)
    return {"ddpm1000_img_s": batch / (1000 * ddpm_step), "ddim50_img_s": batch / (50 * ddim_step)}


def conv_calls(model, x, t):
    """[(conv, input shape)] for every Conv2d call in one forward pass of model(x, t)."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: calls.append((m, inputs[0].shape)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return calls


def bench_convs(preset, batch, precision, channels_last, device, iters):
    """The training step's convolutions alone: each Conv2d call of the network's forward pass,
    timed forward and backward (input, weight and bias gradients) on random tensors of its shapes
    in the step's dtype and memory layout. Returns (FLOPs, seconds) summed over the calls."""
    model = unet.build_unet(preset).to(device)
    x = torch.randn(batch_shape(preset, batch), device=device)
    dtype = hardware.DTYPES[precision]
    layout = hardware.memory_format(channels_last)
    total_flops, total_seconds = 0, 0.0
    for conv, shape in conv_calls(model, x, torch.zeros(batch, dtype=torch.long, device=device)):
        inp = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        weight = conv.weight.detach().to(dtype).contiguous(memory_format=layout)
        bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        wrt = [p.requires_grad_() for p in (inp, weight, bias) if p is not None]

        def forward():
            return F.conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        grad_out = torch.randn_like(forward())

        def run():
            torch.autograd.grad(forward(), wrt, grad_out)
        total_seconds += hardware.median_seconds(run, device, warmup=2, iters=iters)
        with FlopCounterMode(display=False) as flops:
            run()
        total_flops += flops.get_total_flops()
    return total_flops, total_seconds


def fmt_row(row):
    return (f"{row['preset']:<12} {row['batch']:>5} {row['precision']:>5} {row['channels_last']!s:>6} "
            f"{row['compile']!s:>7} {row['img_s']:>9.1f} {row['step_ms']:>9.1f} "
            f"{row['flop_s'] / 1e9:>9.1f} {100 * row['frac']:>6.1f}% {100 * row['conv_frac']:>6.1f}% "
            f"{row['peak_mem_mb']:>8.0f}")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help=hardware.DEVICE_HELP)
    p.add_argument("--presets", nargs="+", default=None, choices=sorted(unet.PRESETS),
                   help="network presets to time (default: the network `train.py --dataset "
                   f"mnist` trains there: {default_preset(cuda=False)} on a CPU, "
                   f"{default_preset(cuda=True)} on CUDA)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes to time (default: 64 128 on a CPU, 128 512 on CUDA)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations per row (default: 5 on a CPU, 20 on CUDA)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile rows (each compiles for a minute or two on a CPU)")
    p.add_argument("--peers", action="store_true",
                   help="also time the same training step around diffusers' UNet2DModel "
                   "configured as each preset (the same architecture and parameter count); "
                   "needs diffusers, which the project does not depend on")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.iters is not None:
        cli.check_number("--iters", args.iters, 1, 100_000)
    for batch in args.batch_sizes or ():
        cli.check_number("--batch-sizes", batch, 1, 1_000_000)
    if args.json:
        files.check_writable(args.json, "--json")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    cuda = device.type == "cuda"
    presets = args.presets or [default_preset(cuda)]
    batches = args.batch_sizes or ([128, 512] if cuda else [64, 128])
    iters = args.iters or (20 if cuda else 5)
    bf16_ok = hardware.bf16_is_fast(device)

    sizes = (4096, 8192) if cuda else (512, 1024, 2048)
    peaks = {"fp32": matmul_peak(device, torch.float32, sizes)}
    if bf16_ok:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, sizes)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print("dense matmul: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))

    # The speed options, each switched on or off alone from the device's default.
    base = {"precision": "bf16" if bf16_ok else "fp32", "channels_last": cuda, "compile": False}
    variants = [base, {**base, "precision": "fp32"}, {**base, "channels_last": not cuda}]
    if not args.no_compile:
        variants.append({**base, "compile": True})
    variants = [v for i, v in enumerate(variants) if v not in variants[:i]]

    rows, samples, peer_rows = [], [], []
    header = (f"{'preset':<12} {'batch':>5} {'prec':>5} {'chlast':>6} {'compile':>7} "
              f"{'img/s':>9} {'step ms':>9} {'GFLOP/s':>9} {'of mm':>7} {'convs':>7} {'peak MB':>8}")
    print("\ntraining step (forward, backward, Adam, EMA); 'of mm': its FLOP/s over the same-run "
          "matmul's;\n'convs': the same for its convolutions alone, the ceiling their kernels set\n"
          + header)
    ceilings = {}  # (preset, batch, precision, channels_last) -> convs-alone FLOP/s
    for preset in presets:
        for batch in batches:
            for v in variants:
                key = (preset, batch, v["precision"], v["channels_last"])
                try:
                    r = bench_train(preset, batch, v["precision"], v["channels_last"], v["compile"],
                                    device, iters)
                    if key not in ceilings:  # a compiled row runs the same convolutions
                        conv_flops, conv_seconds = bench_convs(*key, device, iters)
                        ceilings[key] = conv_flops / conv_seconds
                except Exception as e:  # e.g. out of memory, or no compiler toolchain
                    print(f"{preset:<12} {batch:>5} {v}: failed ({cli.first_line(e, 80)})")
                    continue
                row = {"preset": preset, "batch": batch, **v, **r,
                       "frac": r["flop_s"] / peaks[v["precision"]],
                       "conv_flop_s": ceilings[key], "conv_frac": ceilings[key] / peaks[v["precision"]]}
                rows.append(row)
                print(fmt_row(row), flush=True)

    if args.peers and importlib.util.find_spec("diffusers") is None:
        print("\n--peers: diffusers is not installed (pip install -r requirements-test.txt); "
              "no peer rows")
    elif args.peers:
        print(f"\npeers: the same training step (autocast, layout, Adam, EMA, clipping) around "
              f"diffusers' UNet2DModel as the preset, {base['precision']}, "
              f"channels_last={base['channels_last']}, eager; 'ours/peer' divides img/s\n"
              f"{'preset':<12} {'batch':>5} {'ours img/s':>11} {'peer img/s':>11} {'ours/peer':>10}")
        for preset in presets:
            try:  # a network UNet2DModel cannot express (a space-to-depth stem) has no peer
                interop.diffusers_unet_config(unet.PRESETS[preset], f"preset {preset}")
            except interop.ConvertError as e:
                print(f"{preset:<12} no peer: {e}")
                continue
            for batch in batches:
                ours = next((r for r in rows if (r["preset"], r["batch"]) == (preset, batch)
                             and {k: r[k] for k in base} == base), None)
                try:
                    r = bench_train(preset, batch, base["precision"], base["channels_last"], False,
                                    device, iters, peer=True)
                except Exception as e:
                    print(f"{preset:<12} {batch:>5} peer: failed ({cli.first_line(e, 80)})")
                    continue
                row = {"preset": preset, "batch": batch, **base, **r, "network": "diffusers",
                       "ours_img_s": ours["img_s"] if ours else None}
                peer_rows.append(row)
                ratio = f"{ours['img_s'] / r['img_s']:>10.2f}" if ours else f"{'-':>10}"
                ours_text = f"{ours['img_s']:>11.1f}" if ours else f"{'-':>11}"
                print(f"{preset:<12} {batch:>5} {ours_text} {r['img_s']:>11.1f} {ratio}", flush=True)

    print("\nsampling (one network call per step; img/s for the whole run of steps)")
    print(f"{'preset':<12} {'batch':>5} {'prec':>5} {'graphs':>6} {'DDPM-1000':>10} {'DDIM-50':>9}")
    for preset in presets:
        for batch in batches:
            for graphs in ([False, True] if cuda and not args.no_compile else [False]):
                try:
                    r = bench_sample(preset, batch, base["precision"], base["channels_last"], graphs,
                                     device, iters)
                except Exception as e:  # e.g. out of memory, or CUDA graphs failing to capture
                    print(f"{preset:<12} {batch:>5} graphs={graphs}: failed "
                          f"({cli.first_line(e, 80)})")
                    continue
                samples.append({"preset": preset, "batch": batch, "precision": base["precision"],
                                "cuda_graphs": graphs, **r})
                print(f"{preset:<12} {batch:>5} {base['precision']:>5} {graphs!s:>6} "
                      f"{r['ddpm1000_img_s']:>10.2f} {r['ddim50_img_s']:>9.1f}", flush=True)
    if args.json:
        result = {"device": name, "torch": torch.__version__, "matmul_flop_s": peaks,
                  "train": rows, "peers": peer_rows, "sample": samples}
        files.write_file(args.json, lambda f: f.write(json.dumps(result, indent=1).encode()))
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    cli.run_script(main)
