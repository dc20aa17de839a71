"""Train the tiny model once per recipe on the same real-text tokens and compare the validation losses.

    .venv/bin/python bench/recipes.py                     # all 13 rows, ~20 min on 2 CPU cores; records the table
    .venv/bin/python bench/recipes.py --rows rtx3090 modern --tokens 32768 --no-record   # a quick look

A CPU proxy for issue #8's question: why did the RTX 3090 run lose to OpenAI's GPT-2, and does the modern
recipe (--recipe modern, and --optimizer muon) fix it? Every row is a `train.py` run from the same
initial seed over the same first --tokens training tokens (Python's documentation from sample_text.py
in a fixed shuffled order, prepared by prepare_datasets.py), validated on the same 288 sequences: the
RTX 3090 recipe, the modern one, modern with a linear decay, modern with Muon, the RTX 3090 recipe with one change
at a time, the seed with another random seed (how big a difference is noise), and modern (AdamW and
Muon) at the RTX 3090 recipe's batch (what the recipe is worth without its big batch's fewer steps).

What the proxy scales, and why (the GPU run is gpt2-small, 3B tokens, 524,288 tokens a step):
  - the model is `tiny` (width 64, 2 blocks, context 128; the 50257 x 64 output head is most of its
    cost), so a whole comparison fits in minutes on a laptop CPU;
  - every AdamW learning rate (the RTX 3090 recipe's 4e-4, modern's 6e-4 and its 10% floor) is multiplied by
    LR_SCALE = 768 / 64 = 12: Adam's best LR for hidden matrices scales as 1 / width (muP, Yang et al.
    2022). Muon's LR is not scaled: its orthogonalised update is already sized per matrix;
  - the RTX 3090 recipe's batch is 2 sequences (256 tokens) and the big batch 8 (1,024, 4x): on the GPU the
    ratio is 85x (6 x 1,024 vs 524,288), which at this budget would leave the big-batch runs 6 steps.
    Both GPU runs take thousands of steps; here the big-batch runs get 128;
  - warmup is WARMUP_FRACTION of the run's steps and the decay ends at its last step (the GPU run:
    715 warmup steps of ~5,600-6,300).
Precision is each recipe's own: the RTX 3090 recipe's fp16 falls back to fp32 on the CPU, modern's bf16 autocast
runs on the CPU. compile and fused AdamW are CUDA-only speed pieces; bench/gpu_check.py measures them.
The table goes to bench/RESULTS.md under "## Recipes (CPU proxy)", the chart to WORK_DIR/recipes.png.
"""

import argparse
import datetime
import os
import random
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.results import RESULTS, machine, record  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import plot_losses  # noqa: E402
import prepare_datasets  # noqa: E402
import sample_text  # noqa: E402
import reference  # noqa: E402
from recipes import RECIPES  # noqa: E402  (the top-level recipes.py: REPO comes first on sys.path)

TOKENS = 131_072              # training tokens per run: 512 steps of 256, 128 steps of 1,024 (all 13 rows:
                              # ~20 min on 2 shared cores)
CONTEXT = 128                 # the tiny preset's context
SMALL_BATCH = 2               # sequences per step in the RTX 3090 recipe's rows
BIG_BATCH = 8                 # sequences per step in the big-batch and modern rows (4x)
LR_SCALE = 768 / 64           # gpt2-small's width / tiny's width (muP: Adam LR ~ 1 / width)
WARMUP_FRACTION = 0.1         # the GPU run's 715 warmup steps are ~12% of its ~6,000
VAL_SEQUENCES = 288           # 36,864 val tokens, the same for every batch size (288 = 2 x 144 = 8 x 36)
VALS_PER_RUN = 2              # validations per run after step 0 (mid-way, end): each costs ~10 s here
THREADS = 1                   # torch threads per run: on 2 cores shared with other work, 1 thread trained
                              # the tiny model 1.5-3x faster than 2 (threads waiting on each other)
SEED = 123
SEED_REPEAT = 124             # the "noise" row: the RTX 3090 recipe's recipe with another init and dropout seed
WORK_DIR = os.path.join(REPO, "out", "bench_recipes")
SECTION = "## Recipes (CPU proxy)"
VAL_FRACTION = 0.05           # of sample_text's ~13,600 documents: ~50k val tokens, the rest train
# glibc hands each ~100 MB logits buffer back to the OS when it is freed and page-faults it in again
# for the next batch; keeping freed memory in the process made the tiny model's steps ~30% faster here.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32),
              "MALLOC_TOP_PAD_": str(2**30)}


def rows(tokens, lr_scale=LR_SCALE):
    """(name, train.py flags) for every row. The rtx3090 rows share its batch, LR and schedule except
    for the one flag named; the modern rows take --recipe modern, scaled as the docstring says."""
    small_steps, big_steps = tokens // (SMALL_BATCH * CONTEXT), tokens // (BIG_BATCH * CONTEXT)
    seed_lr, modern_lr = reference.LR * lr_scale, RECIPES["modern"]["lr"] * lr_scale
    modern_floor = RECIPES["modern"]["min_lr"] * lr_scale
    rtx3090 = ["--recipe", "rtx3090", "--batch-size", str(SMALL_BATCH), "--lr", f"{seed_lr:g}"]
    schedule = lambda steps, floor: ["--warmup-steps", str(max(1, round(WARMUP_FRACTION * steps))),
                                     "--decay-steps", str(steps), "--min-lr", f"{floor:g}"]
    modern = ["--recipe", "modern", "--batch-size", str(BIG_BATCH), "--tokens-per-step", str(BIG_BATCH * CONTEXT),
              "--lr", f"{modern_lr:g}", *schedule(big_steps, modern_floor)]
    # everything modern but the big batch: what the rest of the recipe is worth at the RTX 3090 recipe's step count
    modern_small = ["--recipe", "modern", "--batch-size", str(SMALL_BATCH), "--tokens-per-step",
                    str(SMALL_BATCH * CONTEXT), "--lr", f"{modern_lr:g}", *schedule(small_steps, modern_floor)]
    return [
        ("rtx3090", rtx3090),
        ("rtx3090, --seed {}".format(SEED_REPEAT), rtx3090 + ["--seed", str(SEED_REPEAT)]),
        ("rtx3090 + warmup & cosine", rtx3090 + ["--schedule", "cosine", *schedule(small_steps, 0.1 * seed_lr)]),
        ("rtx3090 + dropout 0", rtx3090 + ["--drop-rate", "0"]),
        ("rtx3090 + grad clip 1.0", rtx3090 + ["--grad-clip", "1.0"]),
        ("rtx3090 + 4x batch", rtx3090 + ["--batch-size", str(BIG_BATCH)]),
        ("rtx3090 + qkv bias", rtx3090 + ["--qkv-bias"]),
        ("rtx3090 + tied head", rtx3090 + ["--tie-weights"]),
        ("modern (AdamW, cosine)", modern),
        ("modern, linear decay", modern + ["--schedule", "linear"]),
        ("modern + Muon", modern + ["--optimizer", "muon"]),
        ("modern, rtx3090 batch", modern_small),
        ("modern + Muon, rtx3090 batch", modern_small + ["--optimizer", "muon"]),
    ]


ROW_KEYS = {"rtx3090": 0, "noise": 1, "schedule": 2, "dropout": 3, "clip": 4, "batch": 5, "qkv-bias": 6,
            "tied": 7, "modern": 8, "linear": 9, "muon": 10, "modern-small": 11, "muon-small": 12}


def write_shuffled_parquet(path):
    """sample_text's documents in a fixed random order. FineWeb's documents come in no particular
    order; Python's come module by module, and a model trained on them in that order would be judged
    on validation documents from modules it has not reached yet."""
    documents = list(sample_text.iter_documents())
    random.Random(SEED).shuffle(documents)
    pq.write_table(pa.Table.from_pylist(documents, schema=sample_text.SCHEMA), path,
                   row_group_size=sample_text.ROW_GROUP_SIZE)


def prepare_data(work_dir, tokens):
    """A prepared dataset with `tokens` + 1 train tokens: the parquet is written once, the shards each
    time (2 s), so a change of --tokens never reads a stale dataset."""
    parquet = os.path.join(work_dir, "sample-shuffled.parquet")
    if not os.path.isfile(parquet):
        write_shuffled_parquet(parquet)
    out = os.path.join(work_dir, "data")
    prepare_datasets.main(["--input", parquet, "--output", out, "--force", "--train-tokens", str(tokens + 1),
                           "--val-tokens", str(VAL_SEQUENCES * CONTEXT + 1), "--val-fraction", str(VAL_FRACTION),
                           "--num-proc", "1"])
    return out


def batch_of(flags):
    """The --batch-size a row's flags give (every row names one)."""
    return int(flags[len(flags) - 1 - flags[::-1].index("--batch-size") + 1])


def run_row(data_dir, run_dir, flags, tokens, threads):
    """Train one row in its own process (the user's command, one thread); (final val loss, metrics, seconds)."""
    batch = batch_of(flags)
    steps = tokens // (batch * CONTEXT)
    argv = ["--data", data_dir, "--run-dir", run_dir, "--model", "tiny", "--device", "cpu", "--seed", str(SEED),
            *flags, "--max-steps", str(steps), "--val-every", str(steps // VALS_PER_RUN),
            "--val-batches", str(VAL_SEQUENCES // batch), "--log-every", "25"]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads)}
    print(f"\n$ OMP_NUM_THREADS={threads} python train.py {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *argv], cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: train.py failed (exit {done.returncode}) for {run_dir}; see its output above")
    metrics = plot_losses.read_metrics(run_dir)
    return metrics[-1]["val_loss"], metrics, seconds


def draw(results, out_path, tokens):
    """Left: each row's val loss over the tokens; right: the final val losses as bars."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = [plt.get_cmap("tab20")(i % 20) for i in range(len(results))]
    for (name, loss, metrics, _, _), color in zip(results, colors):
        # from the first validation after step 0: the untrained ~10.8 would flatten everything else
        points = [(r["tokens_seen"], r["val_loss"]) for r in metrics if r["tokens_seen"] > 0]
        curves.plot(*zip(*points), "-", marker="o", markersize=3, color=color, label=name,
                    linewidth=2.5 if name in ("rtx3090", "modern (AdamW, cosine)", "modern + Muon") else 1.2)
    curves.set_xlabel("training tokens seen")
    curves.set_ylabel("validation loss (nats/token)")
    curves.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(plot_losses._format_tokens))
    curves.set_title("Validation loss during training")
    curves.grid(True, alpha=0.3)
    curves.legend(fontsize=8)
    names = [r[0] for r in results][::-1]
    losses = [r[1] for r in results][::-1]
    bars.barh(names, losses, color=colors[::-1])
    low, high = min(losses), max(losses)
    bars.set_xlim(low - 0.25 * (high - low + 0.05), high + 0.25 * (high - low + 0.05))
    for y, loss in enumerate(losses):
        bars.annotate(f"{loss:.3f}", (loss, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    seed_loss = dict((r[0], r[1]) for r in results).get("rtx3090")
    if seed_loss is not None:
        bars.axvline(seed_loss, color="black", linewidth=1, linestyle=":", label="rtx3090")
        bars.legend(fontsize=8, loc="lower right")
    bars.set_xlabel("final validation loss (lower is better)")
    bars.set_title(f"After {tokens:,} training tokens")
    bars.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Training recipes on the CPU proxy (tiny GPT, Python docs text)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def table(results, tokens):
    seed_loss = dict((r[0], r[1]) for r in results).get("rtx3090")
    lines = ["| row | flags (besides the shared ones) | tokens/step | steps | final val loss | vs seed | wall |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, loss, metrics, seconds, flags in results:
        step_tokens = metrics[-1]["tokens_seen"] // metrics[-1]["step"]
        delta = f"{loss - seed_loss:+.3f}" if seed_loss is not None and name != "seed" else ""
        lines.append(f"| {name} | `{shlex.join(flags)}` | {step_tokens:,} | {tokens // step_tokens:,} | "
                     f"{loss:.3f} | {delta} | {seconds / 60:.1f} min |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="training tokens per run (the budget)")
    parser.add_argument("--rows", nargs="+", choices=list(ROW_KEYS), default=list(ROW_KEYS),
                        help="which rows to run, in the table's order")
    parser.add_argument("--lr-scale", type=float, default=LR_SCALE,
                        help="multiplies every AdamW learning rate (the RTX 3090 recipe's 4e-4, modern's 6e-4 and its floor)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per training run")
    parser.add_argument("--work-dir", default=WORK_DIR, help="dataset, run folders and chart (replaced each time)")
    parser.add_argument("--no-record", action="store_true", help=f"print only; do not append to {RESULTS}")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.threads < 1 or args.lr_scale <= 0:
        parser.error("--tokens, --threads and --lr-scale must be positive")

    all_rows = rows(args.tokens, args.lr_scale)
    chosen = [all_rows[ROW_KEYS[k]] for k in sorted(set(args.rows), key=ROW_KEYS.get)]
    biggest = max(batch_of(flags) for _, flags in chosen) * CONTEXT
    if args.tokens < 10 * biggest:  # the schedules' 10% warmup needs at least one step
        parser.error(f"--tokens {args.tokens:,} is under 10 steps of the largest batch ({biggest:,} tokens); "
                     f"give at least {10 * biggest:,}")

    os.makedirs(args.work_dir, exist_ok=True)
    runs_dir = os.path.join(args.work_dir, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # our own run folders from last time
    data_dir = prepare_data(args.work_dir, args.tokens)
    started, results = time.perf_counter(), []
    for i, (name, flags) in enumerate(chosen):
        loss, metrics, seconds = run_row(data_dir, os.path.join(runs_dir, f"{i:02d}"), flags, args.tokens,
                                         args.threads)
        results.append((name, loss, metrics, seconds, flags))
        print(f"=== {name}: val loss {loss:.4f} after {args.tokens:,} tokens, {seconds:.0f} s", flush=True)
    total = time.perf_counter() - started

    chart = os.path.join(args.work_dir, "recipes.png")
    draw(results, chart, args.tokens)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = shlex.join([".venv/bin/python", "bench/recipes.py", *(argv if argv is not None else sys.argv[1:])])
    entry = "\n".join([
        f"- {datetime.date.today()}, {machine()}; load average {load:.1f} at the end (shared cores: wall "
        "times are approximate)",
        f"  command: `{command}`",
        f"  {args.tokens:,} training tokens per run, validation on {VAL_SEQUENCES * CONTEXT:,} tokens; "
        f"shared flags: `--model tiny --device cpu --seed {SEED}`, {args.threads} thread(s) a run; "
        f"whole bench {total / 60:.0f} min",
        "",
        table(results, args.tokens),
    ])
    print("\n" + entry + f"\n\nchart: {chart}")
    if not args.no_record:
        record(entry, SECTION, intro="`python bench/recipes.py`: see its docstring.")
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
