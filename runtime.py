"""What every script needs and nothing about diffusion: the error type for a user's mistake, the
argument parser and the `main()` wrapper that turns such a mistake into one line, the choice of
device, precision and memory layout, the autocast wrapper, atomic writes, seeding and the
distributed set-up.

One policy, used by training and sampling alike:
  device     "auto": cuda:LOCAL_RANK where CUDA is available, else the CPU.
  precision  "auto": bf16 autocast where the device runs it fast (CUDA with bf16, a CPU with
             AMX or AVX512-BF16 units), else fp32. Elsewhere bf16 matmuls run tens of times
             slower than fp32 ones.
  layout     channels_last on CUDA (cuDNN's fast kernels), NCHW on the CPU (its GroupNorm is
             many times slower on channels_last tensors).
"""
import argparse
import errno
import os
import random
import sys
import uuid

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a missing dataset): reported as one line,
    `error: <what is wrong>; <what to do>`, and exit status 2, never a traceback."""


class Stopped(Exception):
    """Work stopped early on a signal, after saving what it had: main() prints the message and
    exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), the shell's
    convention, so that a scheduler can tell it from a finished run (0)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# ---- command line ---------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each flag's default to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "(default:" in text or default is None or default is False \
                or default == argparse.SUPPRESS or not action.option_strings or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: <what is wrong>`, with exit status 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def main(run, argv=None):
    """Call run(argv). A UserError becomes one line on stderr and exit status 2; Stopped its
    message and 128 + its signal; Ctrl-C anywhere else one line and 130 (the shell's code for
    SIGINT; files are written atomically, so none is left half-written). Any other exception is a
    bug and keeps its traceback."""
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); every file written so far is whole (each is written to a "
              "temporary file and renamed), and none is left half-written", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check(ok, message):
    """Raise UserError(message) unless ok."""
    if not ok:
        raise UserError(message)


# ---- device, precision, layout --------------------------------------------------------------

def pick_device(name="auto", local_rank=0):
    """The torch.device for --device: auto, cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    check(device.type in ("cpu", "cuda"), f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
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


def in_precision(network, precision, device, channels_last):
    """fn(*args) = network(x in the layout, *rest) under autocast, returned in float32: the math
    around the network stays in float32 (float64 inputs stay float64 when precision is fp32)."""
    layout = memory_format(channels_last)

    def fn(x, *rest):
        with autocast(precision, device):
            out = network(x.contiguous(memory_format=layout), *rest)
        return out if out.dtype == torch.float64 else out.float()
    return fn


# ---- seeding and processes ------------------------------------------------------------------

def seed_all(seed):
    """Seed Python's, NumPy's and torch's global generators (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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


# ---- files ----------------------------------------------------------------------------------

def atomic_write(path, write):
    """Call write(binary file) on a temporary file beside path, then rename it to path.

    Either the whole file appears or nothing does: on any error the temporary file is removed
    and the file at path, if any, is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_error(path, err):
    """A UserError for a failed write of path, saying what to do."""
    reason = os.strerror(err.errno) if getattr(err, "errno", None) else str(err)
    advice = ("free some disk space" if getattr(err, "errno", None) == errno.ENOSPC
              else "choose a writable location")
    return UserError(f"cannot write {path} ({reason}); {advice}")


def check_writable(path, what="--out"):
    """Fail early, before any long work, if `path` (a file to be written) cannot be created: its
    directory, or the nearest existing ancestor, must be a writable directory."""
    check(not os.path.isdir(path), f"{what} {path} is a directory; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what, path)


def check_writable_dir(directory, what="--out", shown=None):
    """Fail early unless `directory` exists as a writable directory or can be created."""
    shown = shown or directory
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    check(os.path.isdir(probe), f"{what} {shown}: {probe} is not a directory; choose another path")
    try:  # a file in it, removed at once: catches read-only mounts, /proc and permissions alike
        with open(os.path.join(probe, f".write-test-{uuid.uuid4().hex[:8]}"), "xb") as f:
            name = f.name
        os.remove(name)
    except OSError as e:
        raise UserError(f"{what} {shown}: cannot write in {probe} ({os.strerror(e.errno)}); "
                        "choose a writable location") from None


TEMPORARY_SUFFIX = ".tmp"


def remove_stale_temporaries(directory):
    """Delete the temporary files atomic_write leaves when a process is killed mid-write
    (.<name>.<12 hex digits>.tmp). Call it only while holding the directory's lock, when no
    write of ours can be in flight. Returns the names removed."""
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        parts = name.rsplit(".", 2)
        if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX) and len(parts) == 3 \
                and len(parts[1]) == 12 and all(c in "0123456789abcdef" for c in parts[1]):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


class DirectoryLock:
    """An exclusive lock on a directory for one process (fcntl.flock on its .lock file): the
    kernel drops it when the process ends, however it ends, so kill -9 leaves no stale lock. A
    second holder gets a UserError naming the process that holds it."""

    NAME = ".lock"

    def __init__(self, directory, what="run directory"):
        self.directory, self.what, self.file = directory, what, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, self.NAME)
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise UserError(f"the {self.what} {self.directory} is in use by {holder}; wait for it "
                            "to finish or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None
