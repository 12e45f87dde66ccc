"""Plot a training run's log: `python plot.py runs/mnist` writes runs/mnist/log.png.

The training loss, over all t and over each quarter of the t range (which shows where a model is
weak: the first quarter, the least noisy, is the hardest to fit), and, where the run scored its
samples (--eval-every), the share classified confidently, the FD and the class entropy, each
against the step and against wall time. Where a resumed run logged a step twice, the last
record counts. Needs matplotlib (`pip install matplotlib`), imported only here; a few hundred
samples give biased FD and precision/recall: the plot shows their trend, evaluate.py their value.
"""
import os
import sys

import cli
import files
import rundir

MATPLOTLIB_HINT = "pip install matplotlib"


def read_log(path):
    """(training records, score records, lines skipped) of a log.jsonl, each sorted by step, the
    last record of a step winning; lines that are not records of a run (torn, damaged, foreign,
    or with a plotted field that is not a number) are skipped."""
    try:
        records, skipped = rundir.read_log(path)
    except OSError as e:
        raise cli.UserError(f"cannot read {path} ({os.strerror(e.errno)}); give a run "
                            "directory or its log.jsonl") from None
    found = {"train": {}, "eval": {}}
    for record, _ in records:
        kind = "eval" if record.get("kind") == "eval" else "train"
        plotted = [key for p in PANELS if p[0] == kind for key in (*p[1], "time_s") if key in record]
        if all(record[key] is None or rundir.is_number(record[key]) for key in plotted):
            found[kind][record["step"]] = record
        else:
            skipped += 1
    train, scores = ([found[k][s] for s in sorted(found[k])] for k in ("train", "eval"))
    return train, scores, skipped


def series(records, key):
    """(steps, wall seconds, values) of one key, over the records that have it."""
    kept = [r for r in records if r.get(key) is not None]
    return ([r["step"] for r in kept], [r.get("time_s", float("nan")) for r in kept],
            [r[key] for r in kept])


# (records, {key: curve label}, axis label, log scale)
QUARTERS = {f"loss_q{q}": f"t in [{q}T/4, {q + 1}T/4)" for q in range(4)}
PANELS = [("train", {"loss": "all t", **QUARTERS}, "training loss", True),
          ("eval", {"confident_fraction": None}, "confident (> 0.9)", False),
          ("eval", {"fd": None}, "FD (classifier features)", True),
          ("eval", {"class_entropy": None}, "class entropy", False)]


def plot(path, out):
    train, scores, skipped = read_log(path)
    cli.check(train or scores, f"{path} holds no records of a run"
              + (f" ({skipped} line(s) are damaged or not a run's)" if skipped else " yet"))
    if skipped:
        print(f"{path}: skipped {skipped} line(s) that are damaged or not a run's records",
              file=sys.stderr)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise cli.UserError(f"plotting needs matplotlib: {MATPLOTLIB_HINT}") from None
    records = {"train": train, "eval": scores}
    panels = [p for p in PANELS if any(series(records[p[0]], key)[0] for key in p[1])]
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for row, (kind, curves, label, log_scale) in zip(axes, panels):
        for key, curve in curves.items():
            steps, seconds, values = series(records[kind], key)
            for ax, x in ((row[0], steps), (row[1], [s / 60 for s in seconds])):
                ax.plot(x, values, marker="o" if kind == "eval" else None, markersize=3,
                        linewidth=2 if key == "loss" else 1, label=curve)
        for ax, xlabel in ((row[0], "step"), (row[1], "wall time (minutes)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if log_scale:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        if len(curves) > 1:
            row[0].legend(fontsize=7)
    fig.suptitle(os.path.dirname(os.path.abspath(path)))
    fig.tight_layout()
    files.write_file(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (its log.jsonl) or a log.jsonl file")
    p.add_argument("--out", help="the PNG to write (default: log.png beside the log)")
    args = p.parse_args(argv)
    args.log = os.path.join(args.run, rundir.LOG) if os.path.isdir(args.run) else args.run
    cli.check(os.path.isfile(args.log), f"no log at {args.log}; give a run directory")
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.log)), "log.png")
    cli.check(args.out.endswith(".png"), f"--out must end in .png, got {args.out}")
    files.check_writable(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    plot(args.log, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    cli.run_script(main)
