"""Draw the training and validation loss of one or several runs on one chart.

Overlaying runs is how hypotheses are compared: train the RTX 3090 recipe and a variant into two run
folders, then plot both. Each run gets one colour: its validation loss as a line with dots, its
training loss (mean over the steps since the previous validation) as a thin dashed line, and its
lowest validation loss marked with a star. train.py redraws RUN/loss.png with this at every validation.

    python plot_losses.py runs/rtx3090                                   # -> runs/rtx3090/loss.png
    python plot_losses.py runs/rtx3090 runs/tied runs/cosine --out compare.png
    python plot_losses.py runs/rtx3090 --x steps --xkcd
"""

import argparse
import json
import logging
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless GPU server
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

import cli

X_AXIS = "tokens"     # "tokens" (comparable across batch sizes), "steps" or "epochs" (fine-tuning runs)
OUT = None            # default: RUN/loss.png for one run, out/loss_comparison.png for several
FIGSIZE = (10, 6)     # inches
DPI = 120
METRICS = "metrics.jsonl"
X_KEYS = {"tokens": "tokens_seen", "steps": "step", "epochs": "epoch"}  # the metrics.jsonl field of each x axis


def read_metrics(run_dir):
    """The rows of RUN/metrics.jsonl (one per validation); a cut-off last line is skipped."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a train.py --run-dir?")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _format_tokens(value, _pos=None):
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def run_label(run_dir):
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def plot_runs(run_dirs, out_path, x=X_AXIS, xkcd=False, labels=None):
    """Draw every run's losses onto one PNG at out_path; returns the best (run, step, val_loss) list."""
    labels = labels or [run_label(d) for d in run_dirs]
    if xkcd:  # the xkcd fonts are optional; without them matplotlib warns once per text element
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    style = plt.xkcd() if xkcd else plt.rc_context()
    bests = []
    with style:
        fig, ax = plt.subplots(figsize=FIGSIZE)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
            color = colors[i % len(colors)]
            rows = read_metrics(run_dir)
            key = X_KEYS[x]
            train = [(r[key], r["train_loss"]) for r in rows if r.get("train_loss") is not None and key in r]
            val = [(r[key], r["val_loss"]) for r in rows if r.get("val_loss") is not None and key in r]
            if train:
                ax.plot(*zip(*train), "--", color=color, alpha=0.6, linewidth=1.2,
                        label=f"{label} train (mean since the previous validation)")
            if val:
                ax.plot(*zip(*val), "-", marker="o", markersize=3, color=color, linewidth=2, label=f"{label} val")
                best_x, best_loss = min(val, key=lambda p: p[1])
                ax.plot([best_x], [best_loss], "*", color=color, markersize=16, markeredgecolor="black", zorder=5)
                ax.annotate(f"{best_loss:.3f}", (best_x, best_loss), textcoords="offset points", xytext=(0, 10),
                            ha="center", fontsize=9, color=color)
                bests.append((label, best_x, best_loss))
        ax.set_xlabel({"tokens": "tokens seen", "steps": "optimizer step", "epochs": "epoch"}[x])
        ax.set_ylabel("cross-entropy loss (nats/token)")
        if x == "tokens":
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_format_tokens))
        title = "Training and validation loss" + (f": {labels[0]}" if len(labels) == 1 else f" of {len(labels)} runs")
        ax.set_title(title + "  (star = lowest val loss)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8 if len(labels) > 4 else 10, ncol=2 if len(labels) > 5 else 1, loc="upper right")
        fig.tight_layout()
        tmp = f"{out_path}.tmp.png"
        fig.savefig(tmp, dpi=DPI)
        plt.close(fig)
        os.replace(tmp, out_path)  # a reader never sees half a PNG
    return bests


def update_run_chart(run_dir, x=X_AXIS):
    """Redraw RUN/loss.png (train.py and finetune_instructions.py call this after each validation);
    a chart that cannot be drawn is a warning, never the end of a training run."""
    try:
        plot_runs([run_dir], os.path.join(run_dir, "loss.png"), x=x)
    except Exception as e:
        print(f"warning: could not draw the loss chart: {e}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (train.py --run-dir), each with metrics.jsonl")
    parser.add_argument("--out", default=OUT, help="PNG to write (default: RUN/loss.png for one run, out/loss_comparison.png for several)")
    parser.add_argument("--x", choices=list(X_KEYS), default=X_AXIS, help="x axis")
    parser.add_argument("--xkcd", action="store_true", help="hand-drawn style")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run (default: folder names)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    out = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1
                       else os.path.join("out", "loss_comparison.png"))  # out/ is git-ignored
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        bests = plot_runs(args.runs, out, x=args.x, xkcd=args.xkcd, labels=args.labels)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    for label, x, loss in bests:
        print(f"{label}: lowest val loss {loss:.4f} at {args.x} {x:,}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
