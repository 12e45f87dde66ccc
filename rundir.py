"""A run directory: the names of the files a run writes there, and taking the directory for a
run (a new run never mixes with an old one's files; a resumed run's log is cut back to its
checkpoint).

    runs/mnist/ckpt.pt             the checkpoint (checkpoint.py)
    runs/mnist/log.jsonl           one JSON record per --log-every steps, and the scores
    runs/mnist/samples_<step>.png  the sample grids, then samples_final.png
    runs/mnist/eval.json           what evaluate.py measured
    runs/mnist/nearest.png         evaluate.py --nearest: samples beside their nearest training images
    runs/mnist/ema/0.050-0002000.pt  --ema-snapshots: a power-function EMA (sigma_rel 0.050) at step
                                   2000, the network's state dict (phema.py)
"""
import json
import os
import re
import sys

import files
from cli import UserError

CHECKPOINT = "ckpt.pt"
LOG = "log.jsonl"
EVAL = "eval.json"
NEAREST = "nearest.png"  # evaluate.py --nearest: samples beside their nearest training images
SNAPSHOTS = "ema"  # --ema-snapshots: the folder of the power-function EMAs' snapshots


def grid_name(tag):
    """samples_<tag>.png: a grid of the run (tag: the step, zero-padded, or "final")."""
    return f"samples_{tag}.png"


def snapshot_name(sigma_rel, step):
    """<sigma_rel, 3 decimals>-<step, 7 digits>.pt: a snapshot of the power-function EMA of
    length sigma_rel at `step`, in the run's SNAPSHOTS folder."""
    return f"{sigma_rel:.3f}-{step:07d}.pt"


SNAPSHOT_NAME = re.compile(r"(\d+\.\d{3})-(\d{7,})\.pt")


def snapshots(directory):
    """[(sigma_rel, step, path)] of the snapshots in the run directory `directory`, by step then
    sigma_rel; [] where there are none."""
    folder = os.path.join(directory, SNAPSHOTS)
    found = [(float(m[1]), int(m[2]), os.path.join(folder, n))
             for n in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := SNAPSHOT_NAME.fullmatch(n))]
    return sorted(found, key=lambda s: (s[1], s[0]))


def run_files(directory):
    """The files of a run in `directory`: its checkpoint, log, grids, evaluation and snapshots
    folder."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory)
                  if n in (CHECKPOINT, LOG, EVAL) or (n.startswith("samples_") and n.endswith(".png"))
                  or (n == SNAPSHOTS and snapshots(directory)))


def refuse_existing(directory, resuming, overwrite):
    """A new run is refused where another run's files are, unless --overwrite."""
    found = run_files(directory)
    if not resuming and found and not overwrite:
        raise UserError(
            f"{directory} holds a run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
            "add --resume to continue it, --out DIR for a new run beside it, or --overwrite to "
            "replace it")


def take(directory, resumed_step, overwrite):
    """Make the run directory ready, under its lock: temporary files of a killed save removed;
    the check of refuse_existing again (another run may have written since), then with
    --overwrite the old run's files deleted; a resumed run's log cut back to its checkpoint's
    step (resumed_step; None for a new run), so that no step is logged twice, and its snapshots
    after that step removed (the resumed run writes them again)."""
    for folder in (directory, os.path.join(directory, SNAPSHOTS)):
        for name in files.remove_stale_temporaries(folder):
            print(f"removed {os.path.join(folder, name)}, left by a save that was killed",
                  file=sys.stderr)
    refuse_existing(directory, resumed_step is not None, overwrite)
    if resumed_step is None:
        for name in run_files(directory):
            if name != SNAPSHOTS:
                os.remove(os.path.join(directory, name))
    else:
        truncate_log(os.path.join(directory, LOG), resumed_step)
    for _, step, path in snapshots(directory):
        if resumed_step is None or step > resumed_step:
            os.remove(path)


def read_log(path):
    """([(record, its line)], lines skipped) of a log.jsonl: a record is a JSON object with an
    integer "step". Lines that are not UTF-8, not JSON, torn by a kill, or of another kind are
    skipped and counted."""
    kept, skipped = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
                record = json.loads(line)
            except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
                skipped += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                kept.append((record, line if line.endswith("\n") else line + "\n"))
            else:
                skipped += 1
    return kept, skipped


def is_number(value):
    """An int or float that JSON gave (not a bool, which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def truncate_log(path, step):
    """Keep the records of log.jsonl up to `step` (the resumed checkpoint's), rewritten atomically;
    a torn last line (a kill during a write), and any line that is not a record, is dropped."""
    if not os.path.exists(path):
        return
    with files.writing(path):  # unreadable: one line
        records, _ = read_log(path)
    kept = [line for record, line in records if record["step"] <= step]
    files.write_file(path, lambda f: f.write("".join(kept).encode()))


class Log:
    """log.jsonl opened for appending, unbuffered: each record is one write() of a whole line,
    nothing waits in a buffer. A failed write is one line naming the file."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOG)
        with files.writing(self.path):
            self.file = open(self.path, "ab", buffering=0)

    def append(self, record):
        with files.writing(self.path):
            self.file.write((json.dumps(record) + "\n").encode())

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
