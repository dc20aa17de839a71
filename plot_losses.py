"""Draw the training and validation loss of one or several runs on one chart.

Overlaying runs is how hypotheses are compared: train the RTX 3090 recipe and a variant into two run
folders, then plot both. Each run gets one colour: its validation loss as a line with dots, its
training loss (mean over the steps since the previous validation) as a thin dashed line, and its
lowest validation loss marked with a star. train.py redraws RUN/loss.png with this at every validation.

    python plot_losses.py runs/rtx3090                                   # -> runs/rtx3090/loss.png
    python plot_losses.py runs/rtx3090 runs/tied runs/cosine --out compare.png
    python plot_losses.py runs/rtx3090 --x steps --xkcd
    python plot_losses.py runs/ablations/*/seed-* --target "GPT-2 small=3.50"     # seed groups, bands

Runs that differ only in --seed are drawn as one group: the mean, and a band of +-1 standard
deviation across them, labelled by the settings that differ between the groups. Each --target (or
--reference) line is a loss to reach: the step, tokens and wall time at which each run or group got
there are printed and marked.
"""

import argparse
import logging
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless GPU server
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

import cli
import experiments
from recipes import RECIPES

X_AXIS = "tokens"     # "tokens" (comparable across batch sizes), "steps" or "epochs" (fine-tuning runs)
OUT = None            # default: RUN/loss.png for one run, out/loss_comparison.png for several
FIGSIZE = (10, 6)     # inches
DPI = 120
X_KEYS = {"tokens": "tokens_seen", "steps": "step", "epochs": "epoch"}  # the metrics.jsonl field of each x axis
HELLASWAG = "hellaswag_acc_norm"  # train.py --hellaswag's column, drawn against a second axis on the right


def series(rows, key, value):
    """{x: value} of the rows that have both."""
    return {r[key]: r[value] for r in rows if r.get(value) is not None and r.get(key) is not None}


def across_runs(per_run):
    """(xs, means, stds) at the x values every run has: a seed group's mean curve and its spread."""
    xs = sorted(set.intersection(*(set(s) for s in per_run)))
    means = [statistics.mean(s[x] for s in per_run) for x in xs]
    stds = [statistics.stdev(s[x] for s in per_run) if len(per_run) > 1 else 0.0 for x in xs]
    return xs, means, stds


def averaging_window(rows, key):
    """What one point of the train line averages: "the 40 steps" (or "about 40") before it."""
    steps = [r["step"] for r in rows if r.get("train_loss") is not None]
    gaps = [b - a for a, b in zip([0] + steps, steps)]
    if not gaps:
        return "the steps"
    typical = statistics.median(gaps)
    steps = f"{typical:,.0f} step{'s' if typical != 1 else ''}"
    return f"the {steps}" if len(set(gaps[:-1] or gaps)) == 1 else f"about {steps}"


def resume_points(run_dir, key):
    """The x values where a later session of train.py took over (config.json's sessions)."""
    config = experiments.read_config(run_dir) or {}
    per_step = {"step": 1, "tokens_seen": (config.get("training") or {}).get("tokens_per_step")}.get(key)
    starts = [s["start_step"] for s in config.get("sessions", []) if s.get("start_step")]
    return [step * per_step for step in starts] if per_step else []


def parse_reference(text):
    """"GPT-2 small=3.50" -> ("GPT-2 small", 3.5); "3.28" -> ("", 3.28)."""
    label, _, value = text.rpartition("=")
    try:
        return label, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LABEL=LOSS or LOSS, not {text!r}") from None


def more_scores(ax, right, rows, key, label, color):
    """train.py's --eval-set loss (dotted, on the loss axis) and --hellaswag acc_norm (dash-dot, in % on
    a right-hand axis, made the first time and kept in `right`) of one run or group, where it has them."""
    names = sorted({k for r in rows for row in r for k in row if k.endswith("_loss") and k not in
                    ("train_loss", "val_loss", "best_val_loss")})
    for name in names:
        xs, means, _ = across_runs([series(r, key, name) for r in rows])
        ax.plot(xs, means, ":", marker="s", markersize=3, color=color, linewidth=1.5,
                label=f"{label} {name[:-5]} loss, lowest {min(means):.3f}" if xs else None)
    xs, means, _ = across_runs([series(r, key, HELLASWAG) for r in rows])
    if xs:
        if not right:
            right.append(ax.twinx())
            right[0].set_ylabel("HellaSwag acc_norm, llm.c's scoring (%)")
        right[0].plot(xs, [100 * m for m in means], "-.", marker="^", markersize=3, color=color, alpha=0.8,
                      label=f"{label} HellaSwag acc_norm (right axis), last {100 * means[-1]:.2f}%")


def draw_val(ax, rows, key, label, color, references, annotate):
    """One run's or seed group's val loss (mean line, +-1 std band, star at the lowest, X where it reached
    each reference); returns (x of the lowest, lowest, {reference: where reached, or None})."""
    val_xs, val_mean, val_std = across_runs([series(r, key, "val_loss") for r in rows])
    n = len(rows)
    best_x, best_loss = min(zip(val_xs, val_mean), key=lambda p: p[1])
    runs = f" (mean of {n} runs, band ±1 std)" if n > 1 else ""
    ax.plot(val_xs, val_mean, "-", marker="o", markersize=3, color=color, linewidth=2,
            label=f"{label} val{runs}, lowest {best_loss:.3f}")
    if n > 1:
        ax.fill_between(val_xs, [m - s for m, s in zip(val_mean, val_std)],
                        [m + s for m, s in zip(val_mean, val_std)], color=color, alpha=0.2, linewidth=0)
    ax.plot([best_x], [best_loss], "*", color=color, markersize=16, markeredgecolor="black", zorder=5)
    if annotate:  # with several runs, the legend carries the numbers (labels here would collide)
        ax.annotate(f"{best_loss:.3f}", (best_x, best_loss), textcoords="offset points", xytext=(0, 10),
                    ha="center", fontsize=9, color=color)
    hits = {(name, value): experiments.mean_reached([experiments.reached(r, value) for r in rows])
            for name, value in references}
    for (_, value), hit in hits.items():
        if hit is not None and key in hit:
            ax.plot([hit[key]], [value], "X", color=color, markersize=9, markeredgecolor="black", zorder=5)
    return best_x, best_loss, hits


def finish_axes(ax, right, x, title, references, n_groups):
    """Axis labels, title, grid, and one legend for the loss axis and the HellaSwag axis (when drawn)."""
    ax.set_xlabel({"tokens": "tokens seen", "steps": "optimizer step", "epochs": "epoch"}[x])
    ax.set_ylabel("cross-entropy loss (nats/token)")
    if x == "tokens":
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: cli.count(value)))
    ax.set_title(title + "  (star = lowest val loss" + (", X = reached the line)" if references else ")"))
    ax.grid(True, alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    for other in right:
        more = other.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    if handles:
        ax.legend(handles, names, fontsize=8 if n_groups > 3 else 9, ncol=2 if n_groups > 5 else 1, loc="best")


def plot_runs(run_dirs, out_path, x=X_AXIS, xkcd=False, labels=None, references=(), group=True):
    """Draw the runs' losses onto one PNG at out_path; returns [(label, x, lowest val loss, {reference:
    the point the group reached it (experiments.mean_reached), or None})].

    Runs that differ only in their random seed (experiments.group_runs) are drawn as one mean line
    with a band of +-1 sample standard deviation; each line is labelled by the settings that set it
    apart from the others (labels= overrides, one per run, and draws every run on its own). Dotted
    verticals mark where a resumed session took over; references are (label, loss) lines, losses to
    reach such as OpenAI's GPT-2's on the same tokens or the speedrun's 3.28, with an X where each got there."""
    key = X_KEYS[x]
    if labels:
        groups = [{"label": label, "members": [i]} for i, label in enumerate(labels)]
    elif group:
        groups = experiments.group_runs(run_dirs, RECIPES)
    else:
        groups = [{"label": label, "members": [i]}
                  for i, label in enumerate(experiments.run_labels(run_dirs, RECIPES))]
    if xkcd:  # the xkcd fonts are optional; without them matplotlib warns once per text element
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    style = plt.xkcd() if xkcd else plt.rc_context()
    bests, resumed_drawn, later, start = [], False, [], []  # y values after x = 0, and at it
    with style:
        fig, ax = plt.subplots(figsize=FIGSIZE)
        right = []  # the HellaSwag axis, once a run has HellaSwag scores
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, g in enumerate(groups):
            color = colors[i % len(colors)]
            rows = [experiments.read_metrics(run_dirs[m]) for m in g["members"]]
            train_xs, train_mean, _ = across_runs([series(r, key, "train_loss") for r in rows])
            val_xs, val_mean, val_std = across_runs([series(r, key, "val_loss") for r in rows])
            for xs, ys, spread in ((train_xs, train_mean, [0.0] * len(train_xs)), (val_xs, val_mean, val_std)):
                later += [y + s for x_, y, s in zip(xs, ys, spread) if x_] + [y - s for x_, y, s in zip(xs, ys, spread) if x_]
                start += [y for x_, y in zip(xs, ys) if not x_]
            if train_xs:
                ax.plot(train_xs, train_mean, "--", color=color, alpha=0.6, linewidth=1.2,
                        label=f"{g['label']} train: mean of {averaging_window(rows[0], key)} before each point")
            if val_xs:
                bests.append((g["label"], *draw_val(ax, rows, key, g["label"], color, references, len(groups) == 1)))
            more_scores(ax, right, rows, key, g["label"], color)
            for m in g["members"]:
                for point in resume_points(run_dirs[m], key):
                    ax.axvline(point, color=color, linestyle=":", linewidth=1, alpha=0.7,
                               label=None if resumed_drawn else "resumed here")
                    resumed_drawn = True
        span = max(later) - min(later) + 1e-9 if later else 0.0
        if later and start and max(start) > max(later) + 0.15 * span:
            # The untrained model's ~10.8 would squeeze every difference that matters into a sliver.
            ax.set_ylim(min(later) - 0.08 * span, max(later) + 0.15 * span)
            ax.annotate(f"start (untrained): {max(start):.2f}, above the chart", (0.01, 0.98), xycoords="axes fraction",
                        ha="left", va="top", fontsize=9, color="dimgray")
        for label, value in references:
            ax.axhline(value, color="dimgray", linestyle="-.", linewidth=1)
            ax.annotate(f"{label} ({value:g})" if label else f"{value:g}", (0.0, value), xycoords=("axes fraction", "data"),
                        xytext=(4, 3), textcoords="offset points", ha="left", fontsize=9, color="dimgray")
        finish_axes(ax, right, x, "Training and validation loss" + (
            f": {groups[0]['label']}" if len(groups) == 1 else f" of {len(run_dirs)} runs"), references, len(groups))
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)  # only now: every run was read
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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (train.py --run-dir), each with metrics.jsonl")
    parser.add_argument("--out", default=OUT, help="PNG to write (default: RUN/loss.png for one run, out/loss_comparison.png for several)")
    parser.add_argument("--x", choices=list(X_KEYS), default=X_AXIS, help="x axis")
    parser.add_argument("--xkcd", action="store_true", help="hand-drawn style")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run, each drawn on its own (default: "
                                                    "the settings that set the runs apart)")
    parser.add_argument("--target", "--reference", dest="reference", type=parse_reference, action="append", default=[],
                        metavar="LABEL=LOSS", help="a loss to reach, drawn as a line: each run's (or group's) first "
                        "step, tokens and time at or below it are printed and marked, e.g. 'GPT-2 small=3.50' (from "
                        "evaluate.py compare) or 'speedrun target=3.28'; repeatable")
    parser.add_argument("--no-groups", dest="groups", action="store_false",
                        help="draw every run on its own, also those that differ only in --seed")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    out = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1
                       else os.path.join("out", "loss_comparison.png"))  # out/ is git-ignored
    with cli.errors_end_in_one_line(experiments.RunError, stopped=lambda: f"{out} was not written; run the same "
                                    "command again"):
        bests = plot_runs(args.runs, out, x=args.x, xkcd=args.xkcd, labels=args.labels, references=args.reference,
                          group=args.groups)
    for label, x, loss, hits in bests:
        print(f"{label}: lowest val loss {loss:.4f} at {args.x} {x:,}")
        for (name, value), point in hits.items():
            what = f"{name or 'the target'} ({value:g})"
            print(f"{label}: reached {what} at {experiments.reached_text(point)}" if point else
                  f"{label}: did not reach {what}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
