"""Plot a training run's log: `python plot.py runs/mnist` writes runs/mnist/log.png.

The loss (with its quarter of the t range with the largest loss) and, where the run scored its
samples (--eval-every), the share classified confidently, the FD and the class entropy, each
against the step and against wall time. Where a resumed run logged a step twice, the last
record counts. Needs matplotlib (`pip install matplotlib`), imported only here; a few hundred
samples give biased FD and precision/recall: the plot shows their trend, evaluate.py their value.
"""
import json
import os
import sys

import runtime

MATPLOTLIB_HINT = "pip install matplotlib"


def read_log(path):
    """(training records, score records) of a log.jsonl, each sorted by step, the last record of
    a step winning; torn or foreign lines are skipped."""
    found = {"train": {}, "eval": {}}
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise runtime.UserError(f"cannot read {path} ({os.strerror(e.errno)}); give a run "
                                "directory or its log.jsonl") from None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            found["eval" if record.get("kind") == "eval" else "train"][record["step"]] = record
    return [[found[k][s] for s in sorted(found[k])] for k in ("train", "eval")]


def series(records, key):
    """(steps, wall seconds, values) of one key, over the records that have it."""
    kept = [r for r in records if r.get(key) is not None]
    return ([r["step"] for r in kept], [r.get("time_s", float("nan")) for r in kept],
            [r[key] for r in kept])


PANELS = [("train", "loss", "training loss", True), ("eval", "confident_fraction",
                                                       "confident (> 0.9)", False),
          ("eval", "fd", "FD (classifier features)", True), ("eval", "class_entropy",
                                                             "class entropy", False)]


def plot(path, out):
    train, scores = read_log(path)
    runtime.check(train or scores, f"{path} holds no log records yet")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise runtime.UserError(f"plotting needs matplotlib: {MATPLOTLIB_HINT}") from None
    panels = [p for p in PANELS if series(train if p[0] == "train" else scores, p[1])[0]]
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for row, (kind, key, label, log_scale) in zip(axes, panels):
        steps, seconds, values = series(train if kind == "train" else scores, key)
        for ax, x, xlabel in ((row[0], steps, "step"), (row[1], [s / 60 for s in seconds],
                                                        "wall time (minutes)")):
            ax.plot(x, values, marker="o" if kind == "eval" else None, markersize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if log_scale:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    fig.suptitle(os.path.dirname(os.path.abspath(path)))
    fig.tight_layout()
    try:
        runtime.atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    except OSError as err:
        raise runtime.write_error(out, err) from None
    plt.close(fig)


def parse_args(argv=None):
    p = runtime.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (its log.jsonl) or a log.jsonl file")
    p.add_argument("--out", help="the PNG to write (default: log.png beside the log)")
    args = p.parse_args(argv)
    args.log = os.path.join(args.run, "log.jsonl") if os.path.isdir(args.run) else args.run
    runtime.check(os.path.isfile(args.log), f"no log at {args.log}; give a run directory")
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.log)), "log.png")
    runtime.check(args.out.endswith(".png"), f"--out must end in .png, got {args.out}")
    runtime.check_writable(args.out)
    return args


def run(argv=None):
    args = parse_args(argv)
    plot(args.log, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    runtime.main(run)
