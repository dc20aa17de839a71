"""The main job, end to end, on a small embedded default: bash quickstart.sh (or python quickstart.py).

Runs every stage the way you would by hand, printing each command before it runs, so the output
doubles as a tutorial:

  1. data      a slice of FineWeb when the Hub is reachable, else Python's own documentation
               written as a FineWeb-style parquet file (real English, no network)
  2. analyze   document lengths in tokens, with a histogram
  3. prepare   GPT-2 token shards for train and val
  4. measure   training tokens/s on this machine
  5. train     the `tiny` model, interrupted with Ctrl-C halfway and resumed, as a crash would be
  6. evaluate  validation loss (and OpenAI's GPT-2 on the same tokens, when its weights can be had)
  7. generate  text from "Every effort moves you"
  8. plot      the loss chart

Everything lands in OUT (default out/quickstart). Re-running is safe and quick: finished stages are
skipped and an unfinished training run resumes.
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
FINEWEB_ROWS = 2000        # ~1.5M tokens of FineWeb: enough for a few hundred tiny-model steps
MODEL = "tiny"
CONTEXT_LENGTH = 64        # short windows keep a 2-core CPU at ~0.5 s per step
BATCH_SIZE = 8
STEPS = 240                # about 120k tokens: the tiny model's loss falls from ~11.0 to ~5.3
VAL_EVERY = 40
VAL_BATCHES = 20
LR = 2e-3                  # the RTX 3090 run's 4e-4 is tuned for 163M parameters; the tiny model takes more
TRAIN_TOKENS = 600_000     # more than the run reads, so no window repeats
VAL_TOKENS = 40_000        # 625 val windows of 64 tokens


def python_command():
    """How to call this Python from the repo's folder: `.venv/bin/python` when the quick start set up
    the environment (a plain `python` in a new shell has no torch), else `python`."""
    here = os.path.dirname(os.path.abspath(__file__))
    relative = os.path.relpath(sys.executable, here)
    return relative if relative.startswith(".venv") else "python"


def show(args):
    """Print the command as it can be pasted into a shell in the repo's folder."""
    print(f"\n$ {python_command()} " + " ".join(shlex.quote(a) for a in args), flush=True)


def run(*args):
    show(args)
    subprocess.run([sys.executable, *args], check=True)


def hub_reachable():
    import huggingface
    return huggingface.hub_unreachable_reason() is None


def get_data(out, online):
    """A FineWeb-schema parquet file: a FineWeb slice online, the embedded default offline."""
    if online:
        run("download_fineweb.py", "--max-rows", str(FINEWEB_ROWS), "--dest", os.path.join(out, "fineweb"))
        return os.path.join(out, "fineweb", "fineweb", "slice", f"10BT-first-{FINEWEB_ROWS}-rows.parquet")
    path = os.path.join(out, "python-docs.parquet")
    if os.path.isfile(path):
        print(f"\n{path} exists: skipping the embedded text")
    else:
        print("\nThe Hugging Face Hub is unreachable: using the embedded default, Python's own documentation.")
        run("sample_text.py", path)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--out", default=OUT, help="folder for everything the pipeline writes")
    parser.add_argument("--steps", type=cli.positive_int, default=STEPS, help="training steps")
    parser.add_argument("--val-every", type=cli.positive_int, default=VAL_EVERY, help="steps between validations")
    parser.add_argument("--offline", action="store_true", help="use the embedded text even if the Hub answers")
    args = parser.parse_args(argv)
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    out = args.out
    os.makedirs(out, exist_ok=True)
    started = time.time()

    online = not args.offline and hub_reachable()
    parquet = get_data(out, online)

    data = os.path.join(out, "data")
    run("prepare_datasets.py", "--analyze", "--input", parquet, "--context-length", str(CONTEXT_LENGTH),
        "--histogram", os.path.join(out, "token_lengths.png"))
    if os.path.isfile(os.path.join(data, "manifest.json")):
        print(f"\n{data} is already prepared: skipping")
    else:
        run("prepare_datasets.py", "--input", parquet, "--output", data, "--train-tokens", str(TRAIN_TOKENS),
            "--val-tokens", str(VAL_TOKENS), "--val-fraction", "0.05")

    shape = ["--model", MODEL, "--context-length", str(CONTEXT_LENGTH)]
    run("measure_tokens_per_second.py", *shape, "--batch-sizes", f"{BATCH_SIZE // 2},{BATCH_SIZE}",
        "--precision", "fp32", "--steps", "3", "--seconds", "2", "--data", data)

    run_dir = os.path.join(out, "run")
    train_args = ["train.py", "--data", data, "--run-dir", run_dir, *shape, "--batch-size", str(BATCH_SIZE),
                  "--lr", str(LR), "--max-steps", str(args.steps), "--val-every", str(args.val_every),
                  "--val-batches", str(VAL_BATCHES)]
    train_with_one_interruption(train_args, run_dir, args.steps)

    # the same windows training validated on (--val-batches batches of 6 sequences, evaluate.py's
    # default batch), so the numbers can be checked against metrics.jsonl
    window = ["--data", data, "--context-length", str(CONTEXT_LENGTH), "--max-batches", str(VAL_BATCHES)]
    run("evaluate.py", "loss", "--run-dir", run_dir, *window)
    if online:
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
    for path in [parquet, os.path.join(out, "token_lengths.png"), os.path.join(data, "manifest.json"),
                 os.path.join(run_dir, "config.json"), os.path.join(run_dir, "metrics.jsonl"),
                 os.path.join(run_dir, "checkpoints", "best"), os.path.join(run_dir, "loss.png"),
                 os.path.join(out, "loss.png")]:
        print(f"  {path}")


if __name__ == "__main__":
    main()
