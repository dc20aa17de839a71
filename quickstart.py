"""The main job, end to end, on a small embedded default: bash quickstart.sh (or python quickstart.py).

Runs every stage as you would by hand, printing each command first, so the output doubles as a
tutorial (docs/stages.md lists them). Training is interrupted with Ctrl-C halfway and resumed, as a
crash would be. Everything lands in OUT; re-running skips finished stages.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import cli
import checkpointing

OUT = "out/quickstart"
FINEWEB_ROWS = 800         # ~600k tokens of FineWeb: enough for both splits below
MODEL = "tiny"
CONTEXT_LENGTH = 64        # short windows keep a 2-core CPU at ~0.5 s per step
BATCH_SIZE = 8
STEPS = 240                # about 120k tokens: the tiny model's loss falls from ~11.0 to ~5.3
VAL_EVERY = 40
VAL_BATCHES = 20
LR = 2e-3                  # the RTX 3090 run's 4e-4 is tuned for 163M parameters; the tiny model takes more
TRAIN_TOKENS = 200_000     # more than the run reads (240 steps x 512 tokens), so no window repeats
VAL_TOKENS = 20_000        # 312 val windows of 64 tokens, of which validation reads 160
VAL_FRACTION = 0.1         # of the documents: 20k val tokens need ~200k tokens of text
SAMPLE_CHARS = 1_200_000   # of the embedded text (~330k tokens): enough for both splits, written in seconds


def show(args):
    """Print the command to paste in the repo's folder: `.venv/bin/python` when the quick start made it."""
    python = os.path.relpath(sys.executable, os.path.dirname(os.path.abspath(__file__)))
    print(f"\n$ {python if python.startswith('.venv') else 'python'} {shlex.join(args)}", flush=True)


def run(*args):
    show(args)
    subprocess.run([sys.executable, *args], check=True)


def get_data(out, offline):
    """A FineWeb-schema parquet file: a FineWeb slice online, else (offline: why) the embedded default."""
    if not offline:
        run("download_fineweb.py", "--max-rows", str(FINEWEB_ROWS), "--dest", os.path.join(out, "fineweb"))
        return os.path.join(out, "fineweb", "fineweb", "slice", f"10BT-first-{FINEWEB_ROWS}-rows.parquet")
    path = os.path.join(out, "python-docs.parquet")
    if os.path.isfile(path):
        print(f"\n{path} exists: skipping the embedded text")
    else:
        print(f"\n{offline[0].upper()}{offline[1:]}: using the embedded default, Python's own documentation.")
        run("sample_text.py", path, "--max-chars", str(SAMPLE_CHARS))
    return path


def train_with_one_interruption(train_args, run_dir, steps):
    """Start training, press 'Ctrl-C' (SIGINT) once half the steps are checkpointed, then resume."""
    if checkpointing.list_checkpoints(run_dir):
        run(*train_args, "--resume", "latest")  # an earlier quickstart got this far: just continue
        return
    show(train_args)
    proc = subprocess.Popen([sys.executable, *train_args])
    while proc.poll() is None:
        saved = checkpointing.list_checkpoints(run_dir)
        if saved and saved[-1][0] >= steps // 2:
            print(f"\n--- pressing Ctrl-C after the checkpoint at step {saved[-1][0]}: training finishes the step it "
                  "is in, saves it and exits (a crash or a preempted VM is resumed the same way) ---", flush=True)
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    if proc.wait() != 0:
        raise SystemExit(f"error: training exited with status {proc.returncode}")
    print("\n--- resuming where it stopped: same command plus --resume latest ---")
    run(*train_args, "--resume", "latest")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--out", default=OUT, help="folder for everything the pipeline writes")
    parser.add_argument("--steps", type=cli.positive_int, default=STEPS, help="training steps")
    parser.add_argument("--val-every", type=cli.positive_int, default=VAL_EVERY, help="steps between validations")
    parser.add_argument("--offline", action="store_true", help="use the embedded text even if the Hub answers")
    args = parser.parse_args(argv)
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    out = args.out
    os.makedirs(out, exist_ok=True)
    started = time.time()

    offline = "--offline was given" if args.offline else None
    if not offline:
        import huggingface  # here, not at the top: it imports torch, which --offline need not wait for
        offline = huggingface.hub_unreachable_reason()
    parquet = get_data(out, offline)

    data = os.path.join(out, "data")
    run("prepare_datasets.py", "--analyze", "--input", parquet, "--context-length", str(CONTEXT_LENGTH),
        "--histogram", os.path.join(out, "token_lengths.png"))
    if os.path.isfile(os.path.join(data, "manifest.json")):
        print(f"\n{data} is already prepared: skipping")
    else:
        run("prepare_datasets.py", "--input", parquet, "--output", data, "--train-tokens", str(TRAIN_TOKENS),
            "--val-tokens", str(VAL_TOKENS), "--val-fraction", str(VAL_FRACTION))

    shape = ["--model", MODEL, "--context-length", str(CONTEXT_LENGTH)]
    run("measure_tokens_per_second.py", *shape, "--batch-sizes", f"{BATCH_SIZE // 2},{BATCH_SIZE}",
        "--precision", "fp32", "--steps", "3", "--seconds", "1", "--data", data)

    run_dir = os.path.join(out, "run")
    train_args = ["train.py", "--data", data, "--run-dir", run_dir, *shape, "--batch-size", str(BATCH_SIZE),
                  "--lr", str(LR), "--max-steps", str(args.steps), "--val-every", str(args.val_every),
                  "--val-batches", str(VAL_BATCHES)]
    train_with_one_interruption(train_args, run_dir, args.steps)

    # the same windows training validated on (--val-batches batches of 6 sequences, evaluate.py's
    # default batch), so the numbers can be checked against metrics.jsonl
    window = ["--data", data, "--context-length", str(CONTEXT_LENGTH), "--max-batches", str(VAL_BATCHES)]
    run("evaluate.py", "loss", "--run-dir", run_dir, *window)
    if not offline:
        run("evaluate.py", "compare", run_dir, "gpt2", *window, "--markdown")
    else:
        print("\n(OpenAI's GPT-2 weights need the Hub; with them this step runs: "
              f"python evaluate.py compare {run_dir} gpt2 {' '.join(window)} --markdown)")
    run("evaluate.py", "generate", "--run-dir", run_dir, "--prompt", "Every effort moves you")
    run("plot_losses.py", run_dir, "--out", os.path.join(out, "loss.png"))

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    first, last = rows[0], rows[-1]
    print(f"\nvalidation loss: {first['val_loss']:.3f} at step {first['step']} -> {last['val_loss']:.3f} "
          f"at step {last['step']} ({time.time() - started:.0f} s for the whole pipeline)")
    print(f"\nwhat was written, under {out}/:")
    for path in [parquet, f"{out}/token_lengths.png", f"{data}/manifest.json", f"{run_dir}/config.json",
                 f"{run_dir}/metrics.jsonl", f"{run_dir}/checkpoints/best", f"{run_dir}/loss.png",
                 f"{out}/loss.png"]:
        print(f"  {path}")


if __name__ == "__main__":
    main()
