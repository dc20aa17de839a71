"""Measure training throughput before you train: tokens/s per precision mode and batch size, the
biggest batch that fits, and how long a full run of the measured model would take.

    python measure_tokens_per_second.py                                   # gpt2-small, every mode
    python measure_tokens_per_second.py --recipe modern --precision bf16 --max-batch-size 64
    python measure_tokens_per_second.py --model tiny --device cpu --precision fp32,bf16 --batch-sizes 1,2 --seconds 1
    python measure_tokens_per_second.py --data datasets/fineweb --json-out out/throughput.json

What is timed is train.py's own step under a recipe (training.time_training: a fresh model from the
same seed for each setting, the compiling first step alone, warm-up, then at least --seconds of timed
steps), on random tokens or real train batches. An out-of-memory error ends that mode's sweep as its
limit, and the next mode runs. MFU is against the GPU's dense bf16 peak for every mode (docs/speed.md).
"""

import argparse
import math

import torch
from tqdm import tqdm

import cli
import data
import gpt
import training
from files import write_json_atomic
from recipes import RECIPES

MODEL = "gpt2-small"
RECIPE = "rtx3090"                  # whose step to time: train.py's recipes (optimizer, clipping, compile)
CONTEXT_LENGTH = None               # None: the preset's (1,024 for gpt2-small)
BATCH_SIZES = None                  # e.g. "1,2,4"; None: doubling from 1 up to MAX_BATCH_SIZE
MAX_BATCH_SIZE = 64
PRECISIONS = ",".join(training.PRECISIONS)  # every mode
GRAD_ACCUM = 1                      # micro-steps per timed optimizer step
SECONDS = 10.0                      # of timed steps per setting, after warm-up
STEPS = 2                           # and at least this many timed steps
WARMUP_STEPS = 3                    # untimed, after the first (compiling) step
DEVICE = "auto"                     # "cuda" when there is one, else "cpu"
SEED = 123                          # the book's torch.manual_seed


def unsupported_reason(precision, device):
    """Why a precision mode cannot run on this device, by training.Precision's rules (None if it can)."""
    try:
        if training.Precision(precision, device).name == precision:
            return None
    except ValueError as e:  # bf16 on a GPU without it
        return str(e)
    return f"{precision} is a CUDA mode (tensor cores, GradScaler), not for {device.type}"


def sweep(cfg, precisions, batch_sizes, device, timing, stream=None):
    """Every (precision, batch size) in order; returns (rows, limits, notes).

    timing: training.time_training's keyword arguments (the recipe's step, warm-up, seconds).
    limits: one entry per mode whose sweep an out-of-memory error ended, naming the batch size
    that failed and the largest that fitted (None if even the first failed).
    """
    rows, limits, reasons = [], [], [unsupported_reason(p, device) for p in precisions]
    notes = [f"{reason}: skipped" for reason in reasons if reason]
    runnable = [p for p, reason in zip(precisions, reasons) if not reason]
    bar = tqdm(total=len(runnable) * len(batch_sizes), desc="settings", unit="setting")
    for precision in runnable:
        largest = None
        for i, batch_size in enumerate(batch_sizes):
            bar.set_postfix_str(f"{precision} batch {batch_size}")
            row, oom_error = None, None
            try:
                row = training.time_training(cfg, batch_size, precision, device, stream=stream, **timing)
            except Exception as exc:
                if not training.is_out_of_memory(exc):
                    raise
                oom_error = str(exc).strip().splitlines()[0]
            # Outside the except block the traceback (and the tensors its frames hold) is gone, so
            # this frees what the failed setting allocated; compiled graphs of the last model go too.
            if timing["compile"]:
                torch.compiler.reset()
            training.free_memory(device)
            if row is None:
                limits.append({"precision": precision, "out_of_memory_batch_size": batch_size,
                               "largest_batch_size": largest, "error": oom_error})
                bar.update(len(batch_sizes) - i)
                break
            if timing["compile"]:
                tqdm.write(f"{precision} batch {batch_size}: first step (compiling) took {row['compile_seconds']:.1f} s")
            rows.append(row)
            largest = batch_size
            bar.update(1)
    bar.close()
    return rows, limits, notes


def batch_size_list(text):
    """--batch-sizes: comma-separated positive integers."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,4, not {text!r}")
    return sizes


def precision_list(parser, text):
    """--precision's modes, checked after parsing (so PRECISIONS stays the string --help shows)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in training.PRECISIONS]
    if unknown or not names:
        parser.error(f"--precision: unknown precision {', '.join(unknown) or repr(text)}; choose from "
                     f"{','.join(training.PRECISIONS)}")
    return names


def format_table(rows, limits, order):
    """One table in sweep order, each mode's out-of-memory limit on the line after its last row."""
    lines = [f"{'mode':5s} {'batch':>6s} {'tokens/s':>12s} {'peak memory':>12s} {'MFU':>7s}"]
    for precision in order:
        for r in (r for r in rows if r["precision"] == precision):
            memory = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None else "-"
            share = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            lines.append(f"{precision:5s} {r['batch_size']:6d} {r['tokens_per_second']:12,.0f} {memory:>12s} {share:>7s}")
        for lim in (lim for lim in limits if lim["precision"] == precision):
            fitted = lim["largest_batch_size"]
            lines.append(f"{precision:5s} {lim['out_of_memory_batch_size']:6d} {'out of memory':>12s}   "
                         f"-> largest batch that fits: {fitted if fitted is not None else 'none'}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--model", default=MODEL, choices=list(gpt.PRESETS), help="model preset")
    parser.add_argument("--context-length", type=cli.positive_int, default=CONTEXT_LENGTH,
                        help="tokens per sequence; None: the preset's")
    parser.add_argument("--recipe", default=RECIPE, choices=list(RECIPES),
                        help="time train.py's step for this recipe: its optimizer, clipping, fused AdamW, compile")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], help="override the recipe's optimizer")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--batch-sizes", type=batch_size_list, default=BATCH_SIZES,
                       help="comma-separated batch sizes to try in order, e.g. 1,2,4")
    sizes.add_argument("--max-batch-size", type=cli.positive_int, default=MAX_BATCH_SIZE,
                       help="try 1, 2, 4, ... doubling up to this")
    parser.add_argument("--precision", default=PRECISIONS,
                        help="comma-separated modes from " + ",".join(training.PRECISIONS))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: as the recipe does on this device)")
    parser.add_argument("--grad-accum", type=cli.positive_int, default=GRAD_ACCUM, help="micro-steps per timed optimizer step")
    parser.add_argument("--seconds", type=cli.non_negative_float, default=SECONDS, help="time at least this long per setting")
    parser.add_argument("--steps", type=cli.positive_int, default=STEPS, help="and at least this many optimizer steps")
    parser.add_argument("--warmup-steps", type=cli.non_negative_int, default=WARMUP_STEPS, help="untimed steps after the first")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of each fresh model and the random tokens")
    parser.add_argument("--data", default=None, help="prepared dataset dir: real train batches; None: random tokens")
    parser.add_argument("--device", default=DEVICE, help="cuda, cuda:N, cpu, or auto")
    parser.add_argument("--train-tokens", type=cli.positive_int, default=None,
                        help="tokens in the run to estimate (default: the RTX 3090 run's for gpt2-small, else "
                             f"{training.TOKENS_PER_PARAMETER} per parameter)")
    parser.add_argument("--json-out", default=None, metavar="FILE", help="also write the rows and the best setting to this JSON file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_folder(parser, "--json-out", args.json_out)
    args.precision = precision_list(parser, args.precision)
    with cli.errors_end_in_one_line(gpt.DeviceError, data.DatasetError,
                                    stopped=lambda: "nothing was kept; run the same command again"):
        return measure(args)


def measure(args):
    cfg = gpt.model_config(args.model, context_length=args.context_length,
                           drop_rate=RECIPES[args.recipe].get("drop_rate"))
    batch_sizes = args.batch_sizes or [2 ** i for i in range(int(math.log2(args.max_batch_size)) + 1)]
    stream, T = None, cfg["context_length"]
    if args.data is not None:
        stream = data.TokenStream(args.data, "train")
        if stream.num_sequences(T) < max(batch_sizes):
            raise SystemExit(f"error: the train split of {args.data} holds {stream.num_sequences(T):,} sequences of "
                             f"{T} tokens, fewer than batch size {max(batch_sizes)}; ask for smaller --batch-sizes")
    device = gpt.resolve_device(args.device)
    step = {**training.recipe_step(args.recipe, device), "grad_accum": args.grad_accum}
    step.update({k: v for k, v in (("optimizer", args.optimizer), ("compile", args.compile)) if v is not None})
    timing = {**step, "warmup_steps": args.warmup_steps, "min_steps": args.steps, "min_seconds": args.seconds,
              "seed": args.seed}
    train_tokens, whose = (args.train_tokens, "given") if args.train_tokens else training.full_run_tokens(args.model, cfg)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} at context {T} on {name} ({device}), torch {torch.__version__}; "
          f"train.py's {args.recipe} step: {step['optimizer']}{', fused' if step['fused'] else ''}"
          f"{', clip ' + str(step['grad_clip']) if step['grad_clip'] else ''}{', torch.compile' if step['compile'] else ''}"
          f", {step['grad_accum']} micro-step(s) a step; >= {args.seconds:g} s of timed steps after "
          f"{args.warmup_steps} warm-up; {'real tokens from ' + args.data if args.data else 'random tokens'}")
    rows, limits, notes = sweep(cfg, args.precision, batch_sizes, device, timing, stream)

    for note in notes:
        print(f"note: {note}")
    print(format_table(rows, limits, args.precision))
    if device.type == "cuda" and gpt.gpu_peak_flops(device) is None:
        print(f"note: no peak FLOP/s for {name} in gpt.GPU_PEAK_TFLOPS, so no MFU")
    report = {"model": args.model, "context_length": T, "device": name, "torch": torch.__version__,
              "recipe": args.recipe, "step": step, "data": args.data, "batch_sizes": batch_sizes, "rows": rows,
              "limits": limits, "notes": notes, "best": None}
    if rows:
        best = max(rows, key=lambda r: r["tokens_per_second"])
        best = report["best"] = {**best, "train_tokens": train_tokens,
                                 "train_seconds": train_tokens / best["tokens_per_second"]}
        hours = best["train_seconds"] / 3600
        print(f"best: {best['precision']} at batch size {best['batch_size']}: {best['tokens_per_second']:,.0f} tokens/s "
              f"-> training this {args.model} on {train_tokens:,} tokens ({whose}) would take "
              f"{hours:,.2f} h ({hours / 24:,.2f} days)")
        shape = ([f"--model {args.model}"] if args.model != MODEL else []) + \
            ([f"--context-length {args.context_length}"] if args.context_length else []) + \
            ([f"--recipe {args.recipe}"] if args.recipe != RECIPE else []) + \
            ([f"--optimizer {args.optimizer}"] if args.optimizer else [])
        report["train_command"] = " ".join(["python train.py --data DATASET --run-dir RUN", *shape,
                                            f"--batch-size {best['batch_size']}", f"--precision {best['precision']}"])
        print(f"to train at that setting: {report['train_command']}")
    else:
        print("no setting fitted: try a smaller --batch-sizes, --context-length or model")
    if args.json_out:
        write_json_atomic(args.json_out, report)  # a reader never sees half a file
    return report


if __name__ == "__main__":
    main()
