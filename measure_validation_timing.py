"""Measure what validation costs: how many validation batches fit in a time budget, and what share
of a training run's time validation takes at a given checkpoint cadence.

    python measure_validation_timing.py                                  # gpt2-small, bf16, 5 min budget
    python measure_validation_timing.py --data datasets/fineweb --batch-size 32 --budget-minutes 3
    python measure_validation_timing.py --train-tokens-per-second 150000 --val-every-minutes 60
    python measure_validation_timing.py --model tiny --device cpu --batch-size 2 --eval-batches 3

It times train.py's own validation (training.validation_loss). The RTX 3090 run validated on 3,200
batches of 6 sequences in its 5-minute budget; this says what that costs on your machine and, given
the training rate (--train-tokens-per-second, or measured briefly here with train.py's default step),
what share of the wall-clock time a pass every --val-every-minutes of training costs.
"""

import argparse
import math
import time

import torch

import cli
import data
import gpt
import reference
import training
from files import write_json_atomic

MODEL = "gpt2-small"
BATCH_SIZE = reference.BATCH_SIZE   # the RTX 3090 run's batch; its validation batches are of this size
CONTEXT_LENGTH = None               # None: the preset's (1,024 for gpt2-small)
PRECISION = "bf16"                  # the training step's (see measure_tokens_per_second.py)
BUDGET_MINUTES = 5.0                # the RTX 3090 run's validation budget
VAL_EVERY_MINUTES = 30.0            # checkpoint (and validation) cadence, in minutes of training
EVAL_BATCHES = 20                   # timed evaluation batches
WARMUP_BATCHES = 2
TRAIN_TOKENS_PER_SECOND = None      # None: measure with TRAIN_STEPS optimizer steps
TRAIN_STEPS = 5
TRAIN_SECONDS = 5.0                 # and at least this long
TRAIN_TOKENS = None                 # None: the RTX 3090 run's for gpt2-small, else 20 per parameter
COMPILE = False
DEVICE = "auto"
SEED = 123                          # the book's torch.manual_seed


def time_evaluation(model, stream, batch_size, context_length, num_batches, warmup_batches, device):
    """Seconds per evaluation batch of training.validation_loss (data read included), over
    num_batches after a pass of warmup_batches (the first compiles, when compile is on)."""
    with training.attention_context(device):
        if warmup_batches:
            training.validation_loss(model, stream, batch_size, context_length, warmup_batches, device)
        training.synchronize(device)
        start = time.perf_counter()
        training.validation_loss(model, stream, batch_size, context_length, num_batches, device)
        return (time.perf_counter() - start) / num_batches  # validation_loss ends with one .item(): synced


def validation_plan(seconds_per_batch, budget_minutes, val_every_minutes, train_tokens_per_second,
                    train_tokens, available_batches=None):
    """The arithmetic: batches per pass, pass time, and validation's share of a run's time.

    A pass is as many batches as fit in the budget (no more than the split holds). Validating after
    every `val_every_minutes` of training, validation takes pass / (every + pass) of the wall clock.
    """
    in_budget = math.floor(budget_minutes * 60 / seconds_per_batch)
    batches = in_budget if available_batches is None else min(in_budget, available_batches)
    pass_minutes = batches * seconds_per_batch / 60
    train_minutes = train_tokens / train_tokens_per_second / 60
    passes = math.floor(train_minutes / val_every_minutes)
    return {"batches_in_budget": in_budget, "batches_per_pass": batches, "pass_minutes": pass_minutes,
            "train_minutes": train_minutes, "passes": passes, "validation_minutes": passes * pass_minutes,
            "validation_share": pass_minutes / (val_every_minutes + pass_minutes)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--model", default=MODEL, choices=list(gpt.PRESETS), help="model preset")
    parser.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE, help="sequences per evaluation batch")
    parser.add_argument("--context-length", type=cli.positive_int, default=CONTEXT_LENGTH,
                        help="tokens per sequence; None: the preset's")
    parser.add_argument("--precision", default=PRECISION, choices=training.PRECISIONS,
                        help="the training step's precision, for the training rate (validation always runs as train.py "
                             "validates: fp16 autocast on CUDA, fp32 elsewhere)")
    parser.add_argument("--budget-minutes", type=cli.positive_float, default=BUDGET_MINUTES,
                        help="time allowed per validation pass")
    parser.add_argument("--val-every-minutes", type=cli.positive_float, default=VAL_EVERY_MINUTES,
                        help="validate after every this many minutes of training")
    parser.add_argument("--train-tokens-per-second", type=cli.positive_float, default=TRAIN_TOKENS_PER_SECOND,
                        help="the training rate; None: measured here with --train-steps steps")
    parser.add_argument("--train-steps", type=cli.positive_int, default=TRAIN_STEPS,
                        help="timed steps when measuring the training rate")
    parser.add_argument("--train-seconds", type=cli.non_negative_float, default=TRAIN_SECONDS, help="and this long")
    parser.add_argument("--train-tokens", type=cli.positive_int, default=TRAIN_TOKENS, help="tokens in the training "
                        "run (default: the RTX 3090 run's for gpt2-small, else 20 per parameter of the measured model)")
    parser.add_argument("--eval-batches", type=cli.positive_int, default=EVAL_BATCHES, help="timed evaluation batches")
    parser.add_argument("--warmup-batches", type=cli.non_negative_int, default=WARMUP_BATCHES, help="untimed batches first")
    parser.add_argument("--compile", action="store_true", default=COMPILE, help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the fresh model and the random tokens")
    parser.add_argument("--data", default=None, help="prepared dataset dir: time its val split; None: random tokens")
    parser.add_argument("--device", default=DEVICE, help="cuda, cuda:N, cpu, or auto")
    parser.add_argument("--json-out", default=None, metavar="FILE", help="also write the measurements and the plan to this JSON file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_folder(parser, "--json-out", args.json_out)
    with cli.errors_end_in_one_line(ValueError, data.DatasetError,  # no such device, emulated bf16, no data
                                    stopped=lambda: "nothing was kept; run the same command again"):
        return measure(args, gpt.model_config(args.model, context_length=args.context_length))


def measure(args, cfg):
    device = gpt.resolve_device(args.device)
    precision = training.Precision(args.precision, device)
    if precision.name != args.precision:
        raise SystemExit(f"error: --precision {args.precision} is a CUDA mode; on {device.type} use fp32 or bf16")
    T, B = cfg["context_length"], args.batch_size

    available_batches, stream = None, data.RandomTokens(cfg["vocab_size"], args.seed)
    if args.data is not None:
        stream = data.TokenStream(args.data, "val")
        available_batches = stream.num_sequences(T) // B
    if available_batches is not None and available_batches < args.eval_batches + args.warmup_batches:
        raise SystemExit(f"error: the val split of {args.data} holds {available_batches:,} batches of {B} x {T}; "
                         "ask for fewer --eval-batches / --warmup-batches")

    precision.apply()
    torch.manual_seed(args.seed)
    model = gpt.GPTModel(cfg).to(device)
    eval_model = training.compile_model(model, args.compile)
    seconds_per_batch = time_evaluation(eval_model, stream, B, T, args.eval_batches, args.warmup_batches, device)
    del model, eval_model
    if args.compile:
        torch.compiler.reset()
    training.free_memory(device)
    eval_rate = B * T / seconds_per_batch
    print(f"evaluation: {args.model}, batch {B} x {T} tokens, {training.evaluation_precision(device).name} on {device}: "
          f"{seconds_per_batch:.4f} s per batch ({eval_rate:,.0f} tokens/s)")

    train_rate, measured = args.train_tokens_per_second, args.train_tokens_per_second is None
    if measured:
        train_stream = data.TokenStream(args.data, "train") if args.data else None
        step = {**training.recipe_step("rtx3090", device), "compile": args.compile}
        train_rate = training.time_training(cfg, B, args.precision, device, **step, grad_accum=1, seed=args.seed,
                                            warmup_steps=1, min_steps=args.train_steps,
                                            min_seconds=args.train_seconds, stream=train_stream)["tokens_per_second"]

    train_tokens = args.train_tokens or training.full_run_tokens(args.model, cfg)[0]
    plan = validation_plan(seconds_per_batch, args.budget_minutes, args.val_every_minutes, train_rate,
                           train_tokens, available_batches)
    rtx3090_minutes = reference.VAL_BATCHES * seconds_per_batch / 60
    print(f"a {args.budget_minutes:g}-minute budget fits {plan['batches_in_budget']:,} validation batches "
          f"({plan['batches_in_budget'] * B * T:,} tokens); the RTX 3090 run's {reference.VAL_BATCHES:,} batches "
          f"(5 minutes on his RTX 3090) would take {rtx3090_minutes:.1f} min here")
    if available_batches is not None:
        print(f"the val split holds {available_batches:,} batches: a full pass takes "
              f"{available_batches * seconds_per_batch / 60:.1f} min; a pass is "
              f"{'the whole split' if available_batches <= plan['batches_in_budget'] else 'its first part'}")
    print(f"training: {train_rate:,.0f} tokens/s ({'measured here' if measured else 'given'}): "
          f"a run of {train_tokens:,} training tokens takes {plan['train_minutes'] / 60:,.2f} h")
    print(f"validating every {args.val_every_minutes:g} min of training ({plan['pass_minutes']:.1f} min a pass, "
          f"{plan['passes']:,} passes, {plan['validation_minutes'] / 60:,.2f} h in all) costs "
          f"{100 * plan['validation_share']:.1f}% of the wall-clock time")

    # train.py counts --val-batches in batches of 6 sequences (the RTX 3090 run's), whatever the batch here
    val_batches = max(1, plan["batches_per_pass"] * B // reference.BATCH_SIZE)
    print(f"to validate within the budget: python train.py ... --val-batches {val_batches} "
          f"--val-minutes {args.val_every_minutes:g}")
    report = {"model": args.model, "batch_size": B, "train_val_batches": val_batches, "context_length": T,
              "precision": args.precision, "device": str(device), "seconds_per_batch": seconds_per_batch,
              "eval_tokens_per_second": eval_rate,
              "budget_minutes": args.budget_minutes, "val_every_minutes": args.val_every_minutes,
              "train_tokens_per_second": train_rate, "train_rate_measured": measured,
              "available_batches": available_batches, **plan}
    if args.json_out:
        write_json_atomic(args.json_out, report)
    return report


if __name__ == "__main__":
    main()
