"""Where and how the network runs: the device, the precision, the memory layout, the network as
the math calls it (under autocast, in its layout, float32 out), and the processes of a
distributed run.

One policy, used by training and sampling alike:
  device     "auto": cuda:LOCAL_RANK where CUDA is available, else the CPU.
  precision  "auto": bf16 autocast where the device runs it fast (CUDA with bf16, a CPU with
             AMX or AVX512-BF16 units), else fp32. Elsewhere bf16 matmuls run tens of times
             slower than fp32 ones.
  layout     channels_last on CUDA (cuDNN's fast kernels), NCHW on the CPU (its GroupNorm is
             many times slower on channels_last tensors).
  threads    train.py, sample.py, evaluate.py and bench.py set OMP_WAIT_POLICY=PASSIVE and
             GOMP_SPINCOUNT=1000 before torch loads OpenMP (the lines at their top; a value in
             the environment wins): an idle OpenMP thread spins briefly (libgomp: 1,000 polls,
             where its default is 300,000), then sleeps, so on a CPU shared with other work the
             threads that wait at each parallel region's barrier leave the cores to the threads
             that have work, while a run alone keeps its speed (docs/benchmarks.md: alone 0.21
             s a step either way; beside one other run 0.44 s, against 6.5 s with the default
             spin). GOMP_SPINCOUNT=300000 turns libgomp's default back.
"""
import os
import statistics
import time

import torch

from cli import UserError, check

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
PRECISION_HELP = ("autocast precision of the network; auto: bf16 where the device runs it fast "
                  "(CUDA, CPUs with AMX or AVX512-BF16), else fp32")


def add_arguments(p, precision_help=PRECISION_HELP):
    """--device and --precision, as every script that runs the network takes them."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                   help=precision_help)


def pick_device(name="auto", local_rank=0):
    """The torch.device for --device: auto, cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {name!r}; use {DEVICE_HELP}") from None
    check(device.type in ("cpu", "cuda"), f"unknown --device {name!r}; use {DEVICE_HELP}")
    if device.type == "cuda":
        check(torch.cuda.is_available(),
              "--device cuda asked for, but this machine has no CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        check(device.index < torch.cuda.device_count(),
              f"--device {device} asked for, but this machine has {torch.cuda.device_count()} "
              "GPU(s); use cuda:0 or --device auto")
    return device


def bf16_is_fast(device):
    """bf16 autocast pays on CUDA and on CPUs with bf16 matrix units (AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or \
        _cpuinfo_has("amx_bf16") or _cpuinfo_has("avx512_bf16")


def _cpuinfo_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def resolve_precision(asked, device):
    """The precision to run in: `asked` (fp32, bf16, fp16), or for "auto" bf16 where the device
    runs it fast, else fp32."""
    if asked == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    check(asked in PRECISIONS, f"unknown precision {asked!r}; use auto, {', '.join(PRECISIONS)}")
    return asked


def channels_last_default(device):
    """channels_last on CUDA, NCHW elsewhere (see the module docstring)."""
    return device.type == "cuda"


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(precision, device):
    """The autocast context for precision fp32 (off), bf16 or fp16."""
    enabled = precision != "fp32"
    return torch.autocast(device.type, dtype=DTYPES[precision] if enabled else None,
                          enabled=enabled)


def as_called(network, precision, device, channels_last):
    """fn(x, *rest, **named) = network(x in the memory layout, *rest, **named) under autocast,
    returned in float32: the network as the diffusion calls it. The math around the network
    stays in float32 (float64 inputs stay float64 when precision is fp32)."""
    layout = memory_format(channels_last)

    def fn(x, *rest, **named):
        with autocast(precision, device):
            out = network(x.contiguous(memory_format=layout), *rest, **named)
        return out if out.dtype == torch.float64 else out.float()
    return fn


# ---- processes ------------------------------------------------------------------------------

def setup_distributed(device_name="auto"):
    """(rank, world_size, local_rank) from torchrun's environment, initialising the process group.
    The backend follows the device asked for: NCCL for CUDA, Gloo for the CPU (so `--device cpu`
    on a machine with GPUs never touches them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        device = pick_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local_rank


def broadcast_int(value):
    """Rank 0's integer, on every process of the group."""
    tensor = torch.tensor([int(value)], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.broadcast(tensor, 0)
    return int(tensor.item())


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup, iters):
    """Median wall time of fn() in seconds over `iters` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
