"""Train the tiny model once per recipe on the same real-text tokens and compare the validation losses.

    python bench/recipes.py                     # all 13 rows, ~20 min on 2 CPU cores; records the table
    python bench/recipes.py --rows rtx3090 modern --tokens 32768 --no-record   # a quick look

A CPU proxy for issue #8's question: why did the RTX 3090 run lose to OpenAI's GPT-2, and does the modern
recipe fix it? Each row is a `train.py` run of `tiny` from the same seed on the same tokens; bench/RESULTS.md
("Recipes") says what each row changes, the constants below how the GPU run is scaled down.
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
from bench import results  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import cli  # noqa: E402
import experiments  # noqa: E402
import plot_losses  # noqa: E402
import prepare_datasets  # noqa: E402
import sample_text  # noqa: E402
import reference  # noqa: E402
from recipes import RECIPES  # noqa: E402  (the top-level recipes.py: REPO comes first on sys.path)

TOKENS = 131_072              # training tokens per run: 512 steps of 256, 128 of 1,024 (~20 min for 13 rows)
CONTEXT = 128                 # the tiny preset's context
SMALL_BATCH = 2               # sequences per step in the RTX 3090 recipe's rows
BIG_BATCH = 8                 # in the big-batch and modern rows: 4x, where the GPU's 85x (524,288 tokens vs
                              # 6 x 1,024) would leave the big-batch runs 6 steps; here they get 128
LR_SCALE = 768 / 64           # gpt2-small's width / tiny's, for every AdamW LR: Adam's best LR for hidden
                              # matrices scales as 1 / width (muP, Yang et al. 2022). Muon's is not scaled:
                              # its orthogonalised update is already sized per matrix
WARMUP_FRACTION = 0.1         # of a run's steps; the decay ends at its last step (the GPU run's 715 warmup
                              # steps are ~12% of its ~6,000)
VAL_SEQUENCES = 288           # 36,864 val tokens, the same for every batch size (288 = 2 x 144 = 8 x 36)
VALS_PER_RUN = 2              # validations per run after step 0 (mid-way, end): each costs ~10 s here
THREADS = 1                   # torch threads per run: on 2 shared cores, 1 thread trained the tiny model
                              # 1.5-3x faster than 2 (threads waiting on each other)
SEED = 123
SEED_REPEAT = 124             # the "noise" row: the RTX 3090 recipe with another init and dropout seed
WORK_DIR = os.path.join(REPO, "out", "bench_recipes")
SECTION = "## Recipes (CPU proxy)"
VAL_FRACTION = 0.05           # of sample_text's ~13,600 documents: ~50k val tokens, the rest train
# glibc hands each ~100 MB logits buffer back to the OS when it is freed and page-faults it in again
# for the next batch; keeping freed memory in the process made the tiny model's steps ~30% faster here.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32),
              "MALLOC_TOP_PAD_": str(2**30)}
# --rows names, in the order of rows()
ROW_KEYS = ("rtx3090", "noise", "schedule", "dropout", "clip", "batch", "qkv-bias", "tied", "modern", "linear",
            "muon", "modern-small", "muon-small")


def rows(tokens, lr_scale=LR_SCALE):
    """(name, train.py flags) for every row. The rtx3090 rows share its batch, LR and schedule except
    for the one flag named; the modern rows take --recipe modern, scaled as the docstring says."""
    small_steps, big_steps = tokens // (SMALL_BATCH * CONTEXT), tokens // (BIG_BATCH * CONTEXT)
    seed_lr, modern_lr = reference.LR * lr_scale, RECIPES["modern"]["lr"] * lr_scale
    modern_floor = RECIPES["modern"]["min_lr"] * lr_scale
    rtx3090 = ["--recipe", "rtx3090", "--batch-size", str(SMALL_BATCH), "--lr", f"{seed_lr:g}"]

    def schedule(steps, floor):
        return ["--warmup-steps", str(max(1, round(WARMUP_FRACTION * steps))), "--decay-steps", str(steps),
                "--min-lr", f"{floor:g}"]

    def modern(batch, steps):
        return ["--recipe", "modern", "--batch-size", str(batch), "--tokens-per-step", str(batch * CONTEXT),
                "--lr", f"{modern_lr:g}", *schedule(steps, modern_floor)]

    # everything modern but the big batch: what the rest of the recipe is worth at rtx3090's step count
    modern_small = modern(SMALL_BATCH, small_steps)
    return [
        ("rtx3090", rtx3090),
        (f"rtx3090, --seed {SEED_REPEAT}", rtx3090 + ["--seed", str(SEED_REPEAT)]),
        ("rtx3090 + warmup & cosine", rtx3090 + ["--schedule", "cosine", *schedule(small_steps, 0.1 * seed_lr)]),
        ("rtx3090 + dropout 0", rtx3090 + ["--drop-rate", "0"]),
        ("rtx3090 + grad clip 1.0", rtx3090 + ["--grad-clip", "1.0"]),
        ("rtx3090 + 4x batch", rtx3090 + ["--batch-size", str(BIG_BATCH)]),
        ("rtx3090 + qkv bias", rtx3090 + ["--qkv-bias"]),
        ("rtx3090 + tied head", rtx3090 + ["--tie-weights"]),
        ("modern (AdamW, cosine)", modern(BIG_BATCH, big_steps)),
        ("modern, linear decay", modern(BIG_BATCH, big_steps) + ["--schedule", "linear"]),
        ("modern + Muon", modern(BIG_BATCH, big_steps) + ["--optimizer", "muon"]),
        ("modern, rtx3090 batch", modern_small),
        ("modern + Muon, rtx3090 batch", modern_small + ["--optimizer", "muon"]),
    ]


def prepare_data(work_dir, tokens):
    """A prepared dataset with `tokens` + 1 train tokens. sample_text's documents come module by module,
    so they are shuffled (in a fixed order): a model trained on them in order would be judged on modules
    it has not reached. The shards are written each time (2 s): a new --tokens never reads stale ones."""
    parquet = os.path.join(work_dir, "sample-shuffled.parquet")
    if not os.path.isfile(parquet):
        documents = list(sample_text.iter_documents())
        random.Random(SEED).shuffle(documents)
        pq.write_table(pa.Table.from_pylist(documents, schema=sample_text.SCHEMA), parquet,
                       row_group_size=sample_text.ROW_GROUP_SIZE)
    out = os.path.join(work_dir, "data")
    prepare_datasets.main(["--input", parquet, "--output", out, "--force", "--train-tokens", str(tokens + 1),
                           "--val-tokens", str(VAL_SEQUENCES * CONTEXT + 1), "--val-fraction", str(VAL_FRACTION),
                           "--num-proc", "1"])
    return out


def batch_of(flags):
    """The --batch-size a row's flags give (the last one named; every row names one)."""
    return int(flags[len(flags) - 1 - flags[::-1].index("--batch-size") + 1])


def run_row(data_dir, run_dir, flags, tokens, threads):
    """Train one row in its own process (the user's command); (final val loss, metrics, seconds)."""
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
    metrics = experiments.read_metrics(run_dir)
    return metrics[-1]["val_loss"], metrics, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=cli.positive_int, default=TOKENS,
                        help="training tokens per run (the budget)")
    parser.add_argument("--rows", nargs="+", choices=ROW_KEYS, default=list(ROW_KEYS),
                        help="which rows to run, in the table's order")
    parser.add_argument("--lr-scale", type=cli.positive_float, default=LR_SCALE,
                        help="multiplies every AdamW learning rate (the RTX 3090 recipe's 4e-4, modern's 6e-4 and "
                             "its floor)")
    parser.add_argument("--threads", type=cli.positive_int, default=THREADS,
                        help="torch threads per training run")
    parser.add_argument("--work-dir", default=WORK_DIR, help="dataset, run folders and chart (replaced each time)")
    parser.add_argument("--no-record", action="store_true", help=f"print only; do not add to {results.RESULTS}")
    args = parser.parse_args(argv)
    chosen = [row for key, row in zip(ROW_KEYS, rows(args.tokens, args.lr_scale)) if key in args.rows]
    biggest = max(batch_of(flags) for _, flags in chosen) * CONTEXT
    if args.tokens < 10 * biggest:  # the schedules' 10% warmup needs at least one step
        parser.error(f"--tokens {args.tokens:,} is under 10 steps of the largest batch ({biggest:,} tokens); "
                     f"give at least {10 * biggest:,}")

    os.makedirs(args.work_dir, exist_ok=True)
    runs_dir = os.path.join(args.work_dir, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # our own run folders from last time
    data_dir = prepare_data(args.work_dir, args.tokens)
    done, run_dirs = [], [os.path.join(runs_dir, f"{i:02d}") for i in range(len(chosen))]
    for (name, flags), run_dir in zip(chosen, run_dirs):
        loss, metrics, seconds = run_row(data_dir, run_dir, flags, args.tokens, args.threads)
        done.append((name, loss, metrics, seconds, flags))
        print(f"=== {name}: val loss {loss:.4f} after {args.tokens:,} tokens, {seconds:.0f} s", flush=True)
    chart = os.path.join(args.work_dir, "recipes.png")
    plot_losses.plot_runs(run_dirs, chart, labels=[row[0] for row in done])
    seed_loss = dict((r[0], r[1]) for r in done).get("rtx3090")
    lines = ["| row | flags (besides the shared ones) | tokens/step | steps | final val loss | vs seed | wall |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, loss, metrics, seconds, flags in done:
        step_tokens = metrics[-1]["tokens_seen"] // metrics[-1]["step"]
        delta = f"{loss - seed_loss:+.3f}" if seed_loss is not None and name != "rtx3090" else ""
        lines.append(f"| {name} | `{shlex.join(flags)}` | {step_tokens:,} | {args.tokens // step_tokens:,} | "
                     f"{loss:.3f} | {delta} | {seconds / 60:.1f} min |")
    entry = "\n".join([
        f"- {datetime.date.today()}, {results.machine()}; load average {os.getloadavg()[0]:.1f} at the end "
        "(shared cores: wall times are approximate)",
        f"  command: `{results.command('bench/recipes.py', argv)}`",
        f"  {args.tokens:,} training tokens per run, validation on {VAL_SEQUENCES * CONTEXT:,} tokens; "
        f"shared flags: `--model tiny --device cpu --seed {SEED}`, {args.threads} thread(s) a run; "
        f"training {sum(row[3] for row in done) / 60:.0f} min in all",
        "",
        *lines,
    ])
    print(entry)
    if not args.no_record:
        results.record(entry, SECTION, intro="`python bench/recipes.py`: see its docstring.")
        print(f"recorded in {results.RESULTS}")
    print(f"chart: {chart}")


if __name__ == "__main__":
    main()
