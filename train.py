"""Train a GPTModel on a prepared dataset: fast, exact on resume, safe to kill.

    python train.py --data datasets/fineweb --run-dir runs/rtx3090                  # the RTX 3090 run
    python train.py --data datasets/fineweb --run-dir runs/rtx3090 --resume latest  # continue it
    torchrun --nproc_per_node 8 train.py --data datasets/fineweb --run-dir runs/x   # 8 GPUs (DDP)
    python train.py --data D --run-dir runs/modern --recipe modern               # GPT-3-style recipe

The defaults are Giles Thomas's RTX 3090 run, as he trained it: the book's GPT-2 small, 6 sequences a step, AdamW
(lr 4e-4, weight decay 0.1 on every parameter), constant LR, no clipping, fp16 autocast + GradScaler
(+ TF32) on CUDA, a validation and checkpoint about every 30 minutes over 3,200 batches, one pass over
the training tokens. Each hypothesis for why it lost to OpenAI's GPT-2 is one flag away:
--qkv-bias, --tie-weights, --drop-rate 0, --schedule cosine|linear --warmup-steps N, --precision bf16|fp32,
--grad-accum A (bigger batches), --grad-clip 1.0, --decay-matrices-only, --init gpt2.

Step s reads global sequences [s*G, (s+1)*G) of the train split (G = batch x accumulation x processes),
dropout is seeded by (--seed, first sequence) and the LR is a function of the step: so resuming, another
number of GPUs and --max-steps are exact (docs/resuming.md, with the run folder's files). Ctrl-C or
SIGTERM finishes the current step, saves a checkpoint and exits 0.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import checkpointing as ckpt
import data
import evaluate
import experiments
import gpt
import optim
import reference
import training
from files import write_json_atomic
from recipes import RECIPES

# --- the defaults: Giles Thomas's RTX 3090 run (reference.py) ----------------------------------------
RECIPE = "rtx3090"            # the defaults below; "modern": recipes.py's, under any flag typed
MODEL = "gpt2-small"          # the book's GPT-2 small: 163M parameters with its untied head
BATCH_SIZE = reference.BATCH_SIZE  # 6 sequences per device per micro-step
GRAD_ACCUM = None             # micro-steps per optimizer step; None: 1, or derived from --tokens-per-step
TOKENS_PER_STEP = None        # if set (and --grad-accum is not), grad accumulation is derived from it
LR = reference.LR             # 4e-4, the book's AdamW lr
WEIGHT_DECAY = reference.WEIGHT_DECAY  # 0.1
BETA1 = 0.9                   # torch's AdamW defaults, as the RTX 3090 run used them
BETA2 = 0.999
DECAY_MATRICES_ONLY = False   # the RTX 3090 run decayed every parameter, LayerNorm scales and biases too
OPTIMIZER = "adamw"
MUON_LR = 0.02                # Keller Jordan's, for adjust_lr_fn "original" (torch's 1e-3 is for "match_rms_adamw")
MUON_WEIGHT_DECAY = 0.0       # Keller's GPT-2 small Muon runs used none (torch's 0.1 at lr 0.02: -0.2% a step)
SHARD_MUON = True             # under torchrun: Muon's Newton-Schulz work divided among the GPUs
ZERO1 = False                 # under torchrun: shard AdamW's state across the GPUs (ZeRO-1)
DDP_BUCKET_MB = training.DDP_BUCKET_MB  # 100 (DDP's own 25 cuts gpt2-small's compiled graph into ~26)
PROCESS_GROUP_TIMEOUT_MIN = 60  # how long ranks wait for each other (rank 0 saving, a slow validation)
FUSED = False                 # fused AdamW kernel (CUDA only); "cuda" = on when training on CUDA
SCHEDULE = "constant"
WARMUP_STEPS = 0
DECAY_STEPS = None            # decay horizon; None = the steps in one pass over the data
MIN_LR = 0.0                  # where the decay ends
GRAD_CLIP = 0.0               # 0 = no clipping (the RTX 3090 run)
PRECISION = "fp16"            # fp16 autocast + GradScaler + TF32 on CUDA (the RTX 3090 run); fp32 elsewhere
COMPILE = False               # torch.compile; "cuda" = on when training on CUDA
VAL_MINUTES = 30.0            # the RTX 3090 run validated (and checkpointed) about every 30 minutes
VAL_EVERY = None              # validate every N optimizer steps instead (exact to resume; tests use it)
MIN_VALIDATIONS = 20          # with --val-minutes, a short run still validates at least this often
CHART_SECONDS = 60            # RUN/loss.png is redrawn at a checkpoint at most this often, and at the run's end
VAL_BATCHES = reference.VAL_BATCHES    # the RTX 3090 run's validation: 3,200 batches of 6 sequences
VAL_BATCH_SIZE = reference.BATCH_SIZE  # from the start of the val split (19.7M tokens), whatever --batch-size is
HELLASWAG = None              # a HellaSwag file (hellaswag_val.jsonl or the Hub's parquet) scored at every validation
HELLASWAG_ITEMS = None        # only its first N items (None: all; the validation split's 10,042 = 40,168 rows)
EVAL_SET = None               # also the loss on windows others publish losses on (evaluate.py's --eval-set)
KEEP_LAST = 3                 # full (resumable) checkpoints kept
KEEP_WEIGHTS = 5              # of the older ones, the newest this many keep their weights ("all": every one)
SEED = 123                    # the book's torch.manual_seed(123)
DEVICE = "auto"               # CUDA, then MPS, then the CPU
LOG = None                    # "tensorboard" or "wandb": the numbers sent there too (metrics.jsonl always)
LOG_EVERY = 10                # steps between progress-bar updates (each costs one GPU sync)
MAX_NONFINITE_STEPS = 20      # stop when the loss has been inf/nan this many steps in a row
CPU_WARNING_HOURS = 1         # a CPU run estimated to take longer than this says so before it starts
GRAD_SPIKE_FACTOR = 5.0       # a gradient norm this many times its running mean is logged as a spike


# --- settings -------------------------------------------------------------------------------------

def build_parser():
    epilog = ("recipes: rtx3090 = the defaults above. modern = " +
              ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["modern"].items()) +
              ". The progress bar's mfu is model FLOPs utilisation: the share of the GPU's peak bf16 FLOP/s "
              "that the run's training FLOPs (gpt.flops_per_token) reach.")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=epilog, formatter_class=cli.HelpFormatter)
    p.add_argument("--data", help="prepared dataset folder (prepare_datasets.py --output); a --resume takes the run's")
    p.add_argument("--run-dir", required=True, help="where config, metrics, chart and checkpoints go")
    p.add_argument("--recipe", choices=list(RECIPES), default=RECIPE,
                   help="a set of defaults (see the epilog); an explicit flag overrides each")
    add_model_args(p.add_argument_group("model (None = the preset's value)"))
    add_optimization_args(p.add_argument_group("optimization"))
    add_run_args(p.add_argument_group("run"))
    return p


def add_model_args(m):
    m.add_argument("--model", choices=list(gpt.PRESETS), default=MODEL, help="model preset")
    m.add_argument("--context-length", type=cli.positive_int, help="tokens per sequence")
    m.add_argument("--emb-dim", type=cli.positive_int, help="embedding width")
    m.add_argument("--n-layers", type=cli.positive_int, help="transformer blocks")
    m.add_argument("--n-heads", type=cli.positive_int, help="attention heads (must divide --emb-dim)")
    m.add_argument("--drop-rate", type=cli.fraction, help="dropout (the book: 0.1)")
    m.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, help="biases on query/key/value (GPT-2 had them)")
    m.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, help="output head = token embedding (GPT-2)")
    m.add_argument("--init", choices=["pytorch", "gpt2"], help="weight init: the book's (pytorch) or GPT-2's")


def add_optimization_args(o):
    o.add_argument("--batch-size", type=batch_size_arg, default=BATCH_SIZE,
                   help="sequences per device per micro-step, or auto: the largest that fits in GPU memory and "
                        "divides the step")
    o.add_argument("--grad-accum", type=cli.positive_int, default=GRAD_ACCUM,
                   help="micro-steps per optimizer step (default: 1, or from --tokens-per-step, which it overrides)")
    o.add_argument("--tokens-per-step", type=cli.positive_int, default=TOKENS_PER_STEP,
                   help="tokens per optimizer step over all processes, hit exactly (or refused) by --grad-accum")
    o.add_argument("--optimizer", choices=["adamw", "muon"], default=OPTIMIZER,
                   help="muon: torch.optim.Muon for the blocks' matrices, AdamW for the rest")
    o.add_argument("--lr", type=cli.positive_float, default=LR, help="peak learning rate (AdamW)")
    o.add_argument("--muon-lr", type=cli.positive_float, default=MUON_LR,
                   help="peak learning rate of Muon's parameters (torch's adjust_lr_fn 'original' scaling)")
    o.add_argument("--muon-weight-decay", type=cli.non_negative_float, default=MUON_WEIGHT_DECAY,
                   help="Muon's decoupled weight decay (the AdamW part keeps --weight-decay)")
    o.add_argument("--weight-decay", type=cli.non_negative_float, default=WEIGHT_DECAY, help="AdamW's decoupled weight decay")
    o.add_argument("--beta1", type=cli.fraction, default=BETA1, help="AdamW's first-moment decay")
    o.add_argument("--beta2", type=cli.fraction, default=BETA2, help="AdamW's second-moment decay (GPT-3: 0.95)")
    o.add_argument("--decay-matrices-only", action=argparse.BooleanOptionalAction, default=DECAY_MATRICES_ONLY,
                   help="weight decay on 2-D weights only, not on biases and LayerNorm")
    o.add_argument("--shard-muon", action=argparse.BooleanOptionalAction, default=SHARD_MUON,
                   help="under torchrun, each GPU orthogonalises 1/N of Muon's matrices (the same update)")
    o.add_argument("--zero1", action=argparse.BooleanOptionalAction, default=ZERO1,
                   help="under torchrun, each GPU keeps 1/N of AdamW's moments (ZeRO stage 1); checkpoints stay "
                        "whole")
    o.add_argument("--fused", nargs="?", const=True, default=FUSED, type=_bool_or_cuda,
                   help="fused AdamW kernel: true, false, or cuda = on a GPU")
    o.add_argument("--schedule", choices=["constant", "cosine", "linear"], default=SCHEDULE,
                   help="LR after warmup: constant, or cosine / linear decay to --min-lr at --decay-steps")
    o.add_argument("--warmup-steps", type=cli.non_negative_int, default=WARMUP_STEPS, help="linear warmup from 0")
    o.add_argument("--decay-steps", type=cli.positive_int, default=DECAY_STEPS,
                   help="step where the decay reaches --min-lr (default: one pass over the data, so a run "
                        "cut short by --max-steps is an exact prefix of the full one)")
    o.add_argument("--min-lr", type=cli.non_negative_float, default=MIN_LR, help="the decay's floor (Muon's scaled alike)")
    o.add_argument("--grad-clip", type=cli.non_negative_float, default=GRAD_CLIP, help="max global gradient norm; 0 = off")
    o.add_argument("--precision", choices=training.PRECISIONS, default=PRECISION,
                   help="fp16 = autocast + GradScaler (CUDA); tf32/bf16 also enable TF32 matmuls on CUDA")
    o.add_argument("--compile", nargs="?", const=True, default=COMPILE, type=_bool_or_cuda,
                   help="torch.compile the model and its loss: true, false, or cuda = on a GPU")


def add_run_args(r):
    r.add_argument("--max-steps", type=cli.non_negative_int, help="stop after this optimizer step (default: the end of the data)")
    r.add_argument("--val-every", type=cli.positive_int, default=VAL_EVERY, help="validate + checkpoint every N steps")
    r.add_argument("--val-minutes", type=cli.positive_float, default=VAL_MINUTES,
                   help="validate + checkpoint every M minutes of wall clock (when --val-every is not given)")
    r.add_argument("--val-batches", type=cli.positive_int, default=VAL_BATCHES, help="batches of --batch-size for validation")
    r.add_argument("--hellaswag", metavar="FILE", default=HELLASWAG,
                   help="at every validation, also score HellaSwag acc_norm (llm.c's scoring, as evaluate.py "
                        "hellaswag) on FILE: a metrics.jsonl column and a line on the chart")
    r.add_argument("--hellaswag-items", type=cli.positive_int, default=HELLASWAG_ITEMS,
                   help="only the first N items of --hellaswag (default: all)")
    r.add_argument("--eval-set", choices=list(reference.EVAL_SETS), default=EVAL_SET,
                   help="at every validation, also the loss on these published windows of the val split (as "
                        "evaluate.py loss --eval-set); the dataset must be made from that source's tokens")
    r.add_argument("--keep-last", type=cli.positive_int, default=KEEP_LAST, help="full checkpoints to keep (plus best)")
    r.add_argument("--keep-weights", type=keep_weights_arg, default=KEEP_WEIGHTS,
                   help="of the checkpoints older than --keep-last, the newest N keep their weights, older ones are "
                        "deleted; 0 = none, all = every one (metrics.jsonl keeps every validation's numbers)")
    r.add_argument("--seed", type=int, default=SEED, help="init and dropout seed")
    r.add_argument("--device", default=DEVICE, help="auto, cpu, cuda, cuda:1, mps (torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--ddp-bucket-mb", type=cli.positive_float, default=DDP_BUCKET_MB,
                   help="under torchrun, DDP's gradient buckets, each all-reduced during the backward pass (and, "
                        "with --compile, one piece of the graph)")
    r.add_argument("--resume", help="latest, best, or a checkpoint folder: continue from it")
    r.add_argument("--allow-dataset-change", action="store_true",
                   help="resume on a different dataset (starts at its beginning)")
    r.add_argument("--allow-setting-change", action="store_true",
                   help="on --resume, take a changed setting that alters the run's mathematics (lr, schedule, "
                        "tokens per step, precision, --seed ...), recorded in config.json; without it, refused")
    r.add_argument("--log-every", type=cli.positive_int, default=LOG_EVERY, help="steps between progress-bar updates")
    r.add_argument("--log", choices=["tensorboard", "wandb"], default=LOG,
                   help="also send metrics.jsonl's rows and each progress update to TensorBoard (RUN/tensorboard/) "
                        "or Weights & Biases, continued on resume (needs the package installed)")


def keep_weights_arg(value):
    return value if value == "all" else cli.non_negative_int(value)


def batch_size_arg(value):
    return value if value == "auto" else cli.positive_int(value)


def _bool_or_cuda(value):
    words = {"cuda": "cuda", "1": True, "true": True, "yes": True, "on": True, "0": False, "false": False,
             "no": False, "off": False}
    if isinstance(value, bool) or str(value).lower() in words:
        return value if isinstance(value, bool) else words[value.lower()]
    raise argparse.ArgumentTypeError(f"expected true, false or cuda, not {value!r}")


# A resume refuses a typed change to these (it would make the run another experiment) unless
# --allow-setting-change; any other setting (validation cadence, logging, --max-steps, the batch
# layout, which keeps the run's tokens per step) is taken and said.
MATH_SETTINGS = ("recipe", "model", "context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias",
                 "tie_weights", "init", "tokens_per_step", "optimizer", "lr", "muon_lr", "muon_weight_decay",
                 "weight_decay", "beta1", "beta2", "decay_matrices_only", "schedule", "warmup_steps", "decay_steps",
                 "min_lr", "grad_clip", "precision", "seed", "val_batches")


def parse_args(argv=None):
    """The flags over --recipe's defaults; on --resume of a run folder, over the run's own arguments
    (cli.parse_resumable), so a typed flag always wins and a resume needs no flag but --run-dir."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=list(RECIPES))
    typed_recipe = pre.parse_known_args(argv)[0].recipe
    parser, args = cli.parse_resumable(build_parser, argv, MATH_SETTINGS, lambda saved: RECIPES[
        typed_recipe or (saved or {}).get("recipe", RECIPE)])
    if args.data is None:
        parser.error("--data is required (a --resume of a run folder takes it from the run's config.json)")
    return args


def model_config_from_args(args):
    return gpt.model_config(args.model, context_length=args.context_length, emb_dim=args.emb_dim,
                            n_layers=args.n_layers, n_heads=args.n_heads, drop_rate=args.drop_rate,
                            qkv_bias=args.qkv_bias, tie_weights=args.tie_weights, init=args.init)


def build_optimizers(model, args, fused, compile_muon):
    """The run's optimizers: AdamW, or Muon + AdamW, from the flags (optim.build_optimizers)."""
    return optim.build_optimizers(model, args.lr, args.weight_decay, (args.beta1, args.beta2),
                                  args.decay_matrices_only, fused, args.optimizer, args.muon_lr,
                                  args.muon_weight_decay, compile_muon, args.shard_muon, args.zero1)


def choose_batch_layout(args, batch_size, context_length, world, saved=None):
    """(B, A, G) for this session. A fresh run gets exactly what its flags say (training.batch_layout);
    a resumed run keeps the checkpoint's global batch G, adjusting accumulation to this number of
    processes, or is refused, so the data order and the LR schedule's steps stay the run's."""
    if saved is None:
        try:
            return training.batch_layout(batch_size, args.grad_accum, args.tokens_per_step, context_length, world)
        except training.BatchLayoutError as e:
            raise SystemExit(f"error: {e}") from None
    G = saved["sequences_per_step"]
    if G % (batch_size * world):
        raise SystemExit(f"error: the run takes {G:,} sequences a step, which {batch_size} per micro-batch x "
                         f"{world} process(es) does not divide; resume with a --batch-size that does "
                         f"(it had {saved['batch_size']} on {saved['world_size']} process(es))")
    A = G // (batch_size * world)
    if args.grad_accum is not None and args.grad_accum != A:
        raise SystemExit(f"error: --grad-accum {args.grad_accum} would change the run's {G:,} sequences a step; "
                         f"leave it out (this session needs {A}) or start a new --run-dir")
    return batch_size, A, G


def choose_auto_batch_size(args, model, context_length, world, saved, precision, control_group, device):
    """--batch-size auto: (micro-batch, how it was chosen). A resume on as many processes keeps the
    run's; else the largest candidate that divides a rank's share of the step and fits in memory
    (training.find_batch_size), the same on every rank."""
    if saved and saved["world_size"] == world:
        return saved["batch_size"], f"auto: {saved['batch_size']}, as the run had it"
    T = context_length
    step_sequences = saved["sequences_per_step"] if saved else \
        (args.tokens_per_step // T if args.tokens_per_step and args.tokens_per_step % T == 0 else None)
    candidates = training.auto_batch_candidates(step_sequences // world if step_sequences else None)
    if not candidates:
        raise SystemExit(f"error: --batch-size auto found no micro-batch in {training.AUTO_BATCH_CANDIDATES} "
                         f"that divides {step_sequences:,} sequences a step over {world} process(es); give --batch-size")
    try:
        batch_size, note = training.find_batch_size(model, candidates, T, precision,
                                                    optim.optimizer_state_bytes(model, args.optimizer))
    except training.BatchLayoutError as e:
        raise SystemExit(f"error: {e}") from None
    if world > 1:  # every rank must take the same micro-batch: the smallest any of them found
        batch_size = across_ranks([batch_size], dist.ReduceOp.MIN, control_group, device)[0]
    return batch_size, note


def lr_at(step, peak_lr, schedule, warmup_steps, decay_steps, min_lr):
    """The LR of step `step` (0-based): linear warmup, then constant or a cosine / linear decay to min_lr
    at decay_steps. A pure function of the step, so a resume or a shorter --max-steps is exact."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if decay_steps is None or step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if schedule == "linear":
        return peak_lr + progress * (min_lr - peak_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def set_lr(optimizers, step, args, decay_steps):
    """Every param group at the schedule's LR for `step`, Muon's at its own peak with the floor at the
    same fraction; returns AdamW's (the LR the run reports)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, group["base_lr"], args.schedule, args.warmup_steps, decay_steps,
                                args.min_lr * group["base_lr"] / args.lr)
    return optimizers[0].param_groups[0]["lr"]


def check_schedule(args, decay_steps, steps_per_pass, tokens_per_step):
    """Refuse a schedule that cannot do what it says. The modern recipe's 715 warmup steps are GPT-3's
    375M tokens at 0.5M tokens a step; a CPU run with a few thousand tokens a step and a small dataset
    may have fewer steps than that in all, and would never leave warmup."""
    if steps_per_pass < 1:
        raise SystemExit(f"error: one optimizer step takes {tokens_per_step:,} tokens, more than the train split "
                         "holds; lower --tokens-per-step / --grad-accum / --batch-size or prepare more tokens")
    if args.schedule != "constant" and args.warmup_steps >= decay_steps:
        raise SystemExit(f"error: --warmup-steps {args.warmup_steps:,} is not shorter than the decay horizon of "
                         f"{decay_steps:,} steps ({tokens_per_step:,} tokens a step), so the LR would never decay; "
                         f"give --warmup-steps about {max(1, decay_steps // 10):,} (a tenth) or a longer --decay-steps")


def validation_layout(val_batches, batch_size, available_sequences):
    """(batches, batch size) covering the first val_batches x VAL_BATCH_SIZE sequences of the val split
    (fewer if it is shorter), in batches as large as the training micro-batch allows. The loss is a
    mean over equal batches of full windows, so it is the same number whatever the batch size: a run
    with --batch-size auto validates on exactly the tokens the RTX 3090 run did."""
    sequences = min(val_batches * VAL_BATCH_SIZE, available_sequences)
    if sequences >= VAL_BATCH_SIZE:
        sequences -= sequences % VAL_BATCH_SIZE
    size = max(b for b in range(1, max(1, min(batch_size, sequences)) + 1) if sequences % b == 0) if sequences else 1
    return sequences // size, size


# --- devices and processes ------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world_size, device, control_group). Under torchrun: one process per GPU (NCCL), or
    gloo on CPU. control_group is a gloo group for small CPU-side decisions (stop, validate now),
    which all ranks must agree on without making the GPU wait."""
    if "RANK" not in os.environ:
        return 0, 1, gpt.resolve_device(device_arg), None
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    # Rank 0 writes checkpoints while the others wait at their next collective: long enough for that.
    timeout = datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MIN)
    if device_arg.startswith("cuda:"):
        raise SystemExit("error: under torchrun each process takes the GPU cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
        return rank, world, device, dist.new_group(backend="gloo", timeout=timeout)
    dist.init_process_group("gloo", timeout=timeout)
    return rank, world, gpt.resolve_device(device_arg), None


def across_ranks(values, op, control_group, device):
    """Every rank's integers combined element-wise by `op` (on the CPU-side gloo group when there is
    one, so the GPU does not wait); the values themselves in a single process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device="cpu" if control_group is not None else device)
    dist.all_reduce(t, op=op, group=control_group)
    return t.tolist()


def agree(flags, control_group, device):
    """Every rank's flags OR-ed together, so all ranks stop / validate at the same step."""
    return [bool(v) for v in across_ranks([int(f) for f in flags], dist.ReduceOp.MAX, control_group, device)]


def library_versions():
    import numpy
    import safetensors
    gpu = {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "platform": platform.platform(), **gpu}


# --- the loop's running sums ----------------------------------------------------------------------

def rate(steps, tokens_per_step, seconds):
    """Tokens per second over `steps` timed steps; None when there were none."""
    return steps * tokens_per_step / max(seconds, 1e-9) if steps > 0 else None


def hopeless(streak, use_scaler):
    """A loss non-finite `streak` steps in a row that will not recover: without a GradScaler one such
    step has already spoiled the weights; with one, which skips such steps, MAX_NONFINITE_STEPS."""
    return streak >= MAX_NONFINITE_STEPS or (streak > 0 and not use_scaler)


class Meter:
    """The loop's running sums, kept on the device so that a bf16 step never waits for the GPU; they
    are read (one sync) once per log interval and, into the run's state, once per validation or save."""

    def __init__(self, device, state):
        self.state, self.zero = state, torch.zeros((), device=device)
        self.unfolded_loss = self.zero.clone()  # finite step losses not yet added to state.train_loss_sum
        self.log_loss_sum, self.log_steps = self.zero.clone(), 0  # every step's loss since the last read
        self.nonfinite_streak, self.norms, self.norm_ema = self.zero.clone(), [], None
        self.start_interval(state.step)
        self.read_time = self.val_time

    def restart_clocks(self, step):
        """Rates count the steps from here on (after the first step, which compiles)."""
        self.log_time = self.val_time = time.time()
        self.log_step = self.val_step = step

    def start_interval(self, step):
        """After a validation: new sums, and the time validating and saving took is not training time."""
        self.norm_sum, self.norm_max, self.norm_count, self.spikes = 0.0, 0.0, 0, 0
        self.restart_clocks(step)

    def add(self, step_loss, norm):
        finite = torch.isfinite(step_loss)
        self.nonfinite_streak = torch.where(finite, self.zero, self.nonfinite_streak + 1)
        self.unfolded_loss += torch.where(finite, step_loss, self.zero)
        self.state.train_loss_steps += 1
        self.log_loss_sum += step_loss
        self.log_steps += 1
        self.norms.append(norm.detach())

    def read(self, step, tokens_per_step, report_spikes):
        """(mean loss since the last read, tokens/s since then or None when no timed step ran, steps in a
        row with a non-finite loss); the finite gradient norms go into the interval's sums."""
        loss = self.log_loss_sum.item() / max(1, self.log_steps)
        for value in (torch.stack(self.norms).tolist() if self.norms else []):
            if not math.isfinite(value):
                continue
            if self.norm_ema is not None and value > GRAD_SPIKE_FACTOR * self.norm_ema and report_spikes:
                self.spikes += 1
                tqdm.write(f"gradient-norm spike: {value:.3g} ({value / self.norm_ema:.1f}x its running mean "
                           f"{self.norm_ema:.3g})")
            self.norm_ema = value if self.norm_ema is None else 0.9 * self.norm_ema + 0.1 * value
            self.norm_sum, self.norm_max, self.norm_count = self.norm_sum + value, max(self.norm_max, value), \
                self.norm_count + 1
        now = self.read_time = time.time()  # the loss's .item() above waited for the GPU: the time is exact
        tokens_per_second = rate(step - self.log_step, tokens_per_step, now - self.log_time)
        self.log_loss_sum, self.log_steps, self.norms, self.log_time, self.log_step = self.zero.clone(), 0, [], now, step
        return loss, tokens_per_second, int(self.nonfinite_streak.item())

    def fold(self, world):
        """Add the step losses summed on the device (averaged over the ranks) to the state's sum."""
        total = self.unfolded_loss
        if world > 1:
            dist.all_reduce(total)
            total /= world
        self.state.train_loss_sum += total.item()
        self.unfolded_loss = self.zero.clone()

    def validation_row(self, scores, train_loss, lr, tokens_per_step):
        """The metrics.jsonl row of a validation after state.step steps (step 0: the untrained model)."""
        state, counted = self.state, self.norm_count > 0
        return {"step": state.step, "tokens_seen": state.tokens_seen, "train_loss": train_loss, **scores, "lr": lr,
                "grad_norm": self.norm_sum / self.norm_count if counted else None,
                "grad_norm_max": self.norm_max if counted else None, "grad_norm_spikes": self.spikes,
                # up to the read just before validation: validating and saving are not training time
                "tokens_per_s": rate(state.step - self.val_step, tokens_per_step, self.read_time - self.val_time),
                "elapsed_s": state.elapsed_s}


# --- setting a run up -------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What setup_run builds, whole, and the loop uses: the data, the model and its step, the batch layout
    (B sequences a micro-batch x A micro-steps x processes = G sequences a step), the plan and the state."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    control_group: object
    print0: object                      # print on rank 0, nothing elsewhere
    cfg: dict
    digest: str                         # the dataset manifest's sha256
    train_data: data.TokenStream
    val_data: data.TokenStream
    precision: training.Precision
    B: int
    A: int
    G: int
    raw_model: torch.nn.Module
    eval_model: torch.nn.Module         # compiled, without DDP
    optimizers: list
    train_step: training.TrainStep
    state: training.RunState
    val_batches: int
    val_batch_size: int
    decay_steps: int
    total_steps: int
    settings: dict                      # what config.json and every checkpoint record
    hellaswag_items: list | None        # --hellaswag's items
    eval_windows: tuple | None          # --eval-set's (windows, batch size, context length, batches)
    peak_flops: float | None            # the GPU's, for MFU (None off CUDA or for an unknown GPU)
    chart_drawn: float = dataclasses.field(default_factory=time.monotonic)  # when loss.png was last drawn

    @property
    def T(self):
        return self.cfg["context_length"]

    @property
    def is_main(self):
        return self.rank == 0

    def evaluate(self):
        """What each validation measures, {name: value}: a metrics.jsonl column each, said on the
        progress line and drawn on the chart; val_loss decides `best`. self.seconds: what each took."""
        def loss_on(windows, batch_size, context_length, batches, desc="validation"):
            return lambda: training.validation_loss(self.eval_model, windows, batch_size, context_length, batches,
                                                    self.device, self.rank, self.world, desc=desc)
        timed = {"val_loss": loss_on(self.val_data, self.val_batch_size, self.T, self.val_batches)}
        if self.eval_windows is not None:
            timed[f"{self.args.eval_set}_loss"] = loss_on(*self.eval_windows, desc=self.args.eval_set)
        if self.hellaswag_items is not None:
            timed["hellaswag_acc_norm"] = self.hellaswag_acc_norm
        scores, self.seconds = {}, {}
        for name, score in timed.items():
            start = time.time()
            scores[name] = score()
            self.seconds[name] = time.time() - start
        return scores

    def hellaswag_acc_norm(self):
        """evaluate.py's HellaSwag scoring of the model as it is now, each rank taking every world-th item."""
        items = self.hellaswag_items[self.rank::self.world]
        self.raw_model.eval()  # no dropout; and not the compiled model: every item has its own length
        result = evaluate.hellaswag(self.raw_model, items, self.device, desc="hellaswag" if self.is_main else None) \
            if items else {"correct_norm": 0, "n": 0}
        self.raw_model.train()
        correct, n = across_ranks([result["correct_norm"], result["n"]], dist.ReduceOp.SUM, self.control_group,
                                  self.device)
        return correct / n


def open_data(args, device, print0):
    """(manifest, train stream, val stream, digest, model config, precision), each checked now."""
    try:
        manifest = data.load_manifest(args.data)
        train_data, val_data = data.TokenStream(args.data, "train"), data.TokenStream(args.data, "val")
        cfg = model_config_from_args(args)
        precision = training.Precision(args.precision, device).apply()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    val_data.verify()                 # the small split now; the train split while training runs
    train_data.verify_in_background()
    for setting, (old, new) in args.setting_changes.items():
        print0(f"note: --{setting.replace('_', '-')} {new} (the run had {old})"
               + (": a change to the run's mathematics, recorded in config.json" if setting in MATH_SETTINGS else ""))
    if precision.name != args.precision:
        print0(f"note: --precision {args.precision} needs CUDA; training in {precision.name} on {device.type}")
    return manifest, train_data, val_data, data.manifest_digest(args.data), cfg, precision


def more_evaluations(args, cfg, val_data):
    """(--hellaswag's items, --eval-set's windows), each checked now, before the run folder is touched."""
    try:
        items = evaluate.read_hellaswag(args.hellaswag, args.hellaswag_items) if args.hellaswag else None
        windows = evaluate.eval_set_windows(val_data, args.eval_set) if args.eval_set else None
    except (evaluate.EvaluationError, data.DatasetError) as e:
        raise SystemExit(f"error: {e}") from None
    if items and cfg["vocab_size"] < gpt.get_tokenizer().n_vocab:
        raise SystemExit(f"error: --hellaswag needs the GPT-2 tokenizer's {gpt.get_tokenizer().n_vocab:,} token ids; "
                         f"the model has a vocabulary of {cfg['vocab_size']:,}")
    if windows and cfg["context_length"] < windows[2]:
        raise SystemExit(f"error: --eval-set {args.eval_set} scores windows of {windows[2]:,} tokens; the model's "
                         f"context is {cfg['context_length']:,}")
    return items, windows


def resume_point(args, cfg, digest, is_main):
    """(checkpoint folder, its meta) to resume from, or (None, None) for a fresh run."""
    if not args.resume:
        ckpt.refuse_to_overwrite(args.run_dir)
        return None, None
    ckpt_dir, meta = ckpt.find_resume_checkpoint(args.run_dir, args.resume)
    ckpt.check_same_run(ckpt_dir, meta, cfg, digest, args.allow_dataset_change)
    if is_main:
        ckpt.set_aside_newer_checkpoints(args.run_dir, meta["step"])
    return ckpt_dir, meta


def check_disk(run_dir, cfg, args):
    """Say how much disk the run's checkpoints will take against what its disk has, before any model is
    built; refuse (one line) when not even two checkpoints fit. Sizes: fp32 weights, plus the optimizer
    state for a resumable checkpoint (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = gpt.GPTModel(cfg)
    weights = 4 * gpt.count_parameters(model)
    full = weights + optim.optimizer_state_bytes(model, args.optimizer)
    keep_weights = None if args.keep_weights == "all" else args.keep_weights
    projected, available = ckpt.disk_plan(run_dir, weights, full, args.keep_last, keep_weights)
    gb = lambda n: f"{n / 1e9:,.2f} GB"
    layout = f"{args.keep_last} resumable x {gb(full)} + best + the one being written, and "
    where = f"{gb(available)} available in {os.path.abspath(run_dir)}"
    if projected is None:
        print(f"disk: checkpoints take {layout}{gb(weights)} of weights per older validation (--keep-weights all); "
              f"{where}")
    else:
        print(f"disk: checkpoints will take at most {gb(projected)} ({layout}{keep_weights} weights-only x "
              f"{gb(weights)}); {where}")
        if projected > available:
            print("warning: that is more than the disk has; lower --keep-weights or --keep-last, or free space")


def model_and_batch_layout(args, cfg, world, saved, precision, control_group, device, print0):
    """(model, B, A, G, how B was chosen). The layout is checked before the model is built, unless the
    micro-batch must be measured on it (--batch-size auto)."""
    T, auto_note = cfg["context_length"], None
    if args.batch_size != "auto":
        B, A, G = choose_batch_layout(args, args.batch_size, T, world, saved)
    torch.manual_seed(args.seed)
    model = gpt.GPTModel(cfg).to(device)
    if args.batch_size == "auto":
        B, auto_note = choose_auto_batch_size(args, model, T, world, saved, precision, control_group, device)
        B, A, G = choose_batch_layout(args, B, T, world, saved)
        torch.manual_seed(args.seed)  # the probe drew random tokens: start from the seed's state again
    if saved and (B, A, world) != (saved["batch_size"], saved["grad_accum"], saved["world_size"]):
        print0(f"note: the run took {saved['batch_size']} x {saved['grad_accum']} x {saved['world_size']} "
               f"process(es); now {B} x {A} x {world}: the same {G:,} sequences a step, in the same order"
               + (f"; dropout masks are drawn per micro-batch, so with {B} instead of {saved['batch_size']} "
                  "sequences in one they differ from here on from an uninterrupted run's"
                  if B != saved["batch_size"] and cfg["drop_rate"] > 0 else ""))
    return model, B, A, G, auto_note


def plan_run(args, T, B, G, state, train_data, val_data, print0):
    """(validation batches, their size, the decay horizon, the last step), each checked now."""
    val_batches, val_batch_size = validation_layout(args.val_batches, B, val_data.num_sequences(T))
    if val_batches < 1:
        raise SystemExit(f"error: the val split of {args.data} has {val_data.num_tokens:,} tokens, fewer than "
                         f"one batch of {VAL_BATCH_SIZE} x {T}; prepare more validation tokens")
    if val_batches * val_batch_size < args.val_batches * VAL_BATCH_SIZE:
        print0(f"note: the val split holds {val_batches * val_batch_size:,} sequences of {T}; validating on those")
    steps_per_pass = train_data.num_sequences(T) // G
    decay_steps = args.decay_steps if args.decay_steps is not None else steps_per_pass
    check_schedule(args, decay_steps, steps_per_pass, G * T)
    total_steps = state.step + (train_data.num_sequences(T) - state.next_sequence) // G
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    return val_batches, val_batch_size, decay_steps, total_steps


def setup_run(args, argv, rank, world, device, control_group):
    """Everything before the first step, in order: data, resume point, disk, batch layout and model, the
    step, the restored state, the plan (validation, schedule, last step), config.json and the start-up
    lines. Returns the Run, whole."""
    print0 = print if rank == 0 else (lambda *args, **kwargs: None)  # one rank speaks for all
    if args.log and rank == 0:
        experiments.logging_library(args.log)  # a missing package is said now, before the run folder is touched
    manifest, train_data, val_data, digest, cfg, precision = open_data(args, device, print0)
    hellaswag_items, eval_windows = more_evaluations(args, cfg, val_data)
    ckpt_dir, meta = resume_point(args, cfg, digest, rank == 0)
    saved = meta["training"] if meta else None
    if rank == 0:
        check_disk(args.run_dir, cfg, args)
    model, B, A, G, auto_note = model_and_batch_layout(args, cfg, world, saved, precision, control_group, device,
                                                       print0)
    # The model and its loss as one compiled graph; DDP wraps the compiled module (as nanoGPT does).
    use_compile, use_fused = training.enabled_on(args.compile, device), training.enabled_on(args.fused, device)
    optimizers = build_optimizers(model, args, use_fused, use_compile)
    eval_model = step_model = training.compile_model(model, use_compile)
    if world > 1:
        step_model = training.wrap_ddp(step_model, device, args.ddp_bucket_mb, A, use_compile)
    train_step = training.TrainStep(step_model, optimizers, precision, A, args.grad_clip, args.seed, world > 1)
    state = training.RunState()
    if ckpt_dir is not None:
        model.load_state_dict(ckpt.load_tensors(ckpt_dir, ckpt.MODEL_FILE, device))
        ckpt.restore_training_state(ckpt_dir, meta, optimizers, train_step.scaler)
        state = training.RunState.from_checkpoint(meta)
        if meta.get("dataset_sha256") != digest:
            state.next_sequence = 0  # --allow-dataset-change: the new data from its start
        print0(f"resuming from {ckpt_dir} at step {state.step:,} (sequence {state.next_sequence:,})")
    val_batches, val_batch_size, decay_steps, total_steps = plan_run(args, cfg["context_length"], B, G, state,
                                                                     train_data, val_data, print0)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("data", "run_dir", "setting_changes")},
                "batch_size": B, "batch_size_requested": args.batch_size, "grad_accum": A, "world_size": world,
                "sequences_per_step": G, "tokens_per_step": G * cfg["context_length"], "precision": precision.name,
                "compile": use_compile, "fused": use_fused, "device": str(device), "decay_steps": decay_steps,
                "total_steps": total_steps, "val_batches": val_batches, "val_batch_size": val_batch_size}
    run = Run(args, rank, world, device, control_group, print0, cfg, digest, train_data, val_data, precision,
              B, A, G, model, eval_model, optimizers, train_step, state, val_batches, val_batch_size, decay_steps,
              total_steps, settings, hellaswag_items, eval_windows, gpt.gpu_peak_flops(device))
    if rank == 0:
        start_run_folder(run, argv, manifest, ckpt_dir, auto_note)
    return run


def start_run_folder(run, argv, manifest, resumed_from, auto_note):
    """Rank 0, before the first step: the folder, config.json, metrics.jsonl, and what the run will do."""
    args, state, settings = run.args, run.state, run.settings
    if run.device.type == "cpu":
        seconds = training.cpu_training_seconds(run.cfg, (run.total_steps - state.step) * run.G * run.T,
                                                CPU_WARNING_HOURS * 3600)
        if seconds > CPU_WARNING_HOURS * 3600:
            print(f"note: on this CPU the {run.total_steps - state.step:,} steps to go would take about "
                  f"{cli.duration(seconds)} (estimated from its matmul speed); a GPU is hundreds of times faster, "
                  "and --max-steps N stops early")
    os.makedirs(os.path.join(args.run_dir, ckpt.CHECKPOINTS), exist_ok=True)
    ckpt.remove_unfinished_writes(args.run_dir)
    write_config(run, argv, manifest, resumed_from)
    ckpt.write_metrics(args.run_dir, state.metrics)
    best = ckpt.step_folder(args.run_dir, state.best_step) if state.best_step is not None else None
    if best and os.path.isdir(best):  # after falling back past a damaged checkpoint, the pointer may name that one
        ckpt.set_pointer(args.run_dir, "best", best)
    print(f"model: {gpt.count_parameters(run.raw_model):,} parameters {run.cfg}")
    print(f"batch: {run.B} seq{' (' + auto_note + ')' if auto_note else ''} x {run.A} accum x {run.world} processes = "
          f"{run.G} sequences = {run.G * run.T:,} tokens per step; steps {state.step:,} -> {run.total_steps:,}; "
          f"{run.precision.name} on {run.device}; compile={settings['compile']} fused={settings['fused']}")
    muon = f", Muon lr {args.muon_lr:g} on the blocks' matrices" if args.optimizer == "muon" else ""
    decay = "" if args.schedule == "constant" else f", {args.schedule} decay to {args.min_lr:g} at step {run.decay_steps:,}"
    print(f"lr: AdamW {args.lr:g}{muon}; warmup {args.warmup_steps:,} steps{decay}")


def write_config(run, argv, manifest, resumed_from):
    """RUN/config.json: the model, every setting, the arguments a resume takes, the dataset, and one
    entry per session (command, start step, time, changed settings), so a resumed run's history stays."""
    args = run.args
    config_path = os.path.join(args.run_dir, cli.CONFIG_FILE)
    history = []
    if args.resume and os.path.isfile(config_path):
        with open(config_path) as f:
            history = json.load(f).get("sessions", [])
    history.append({"command": cli.command_line("train.py", argv),
                    "start_step": run.state.step, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "resumed_from": resumed_from, **({"setting_changes": args.setting_changes}
                                                      if args.setting_changes else {})})
    write_json_atomic(config_path, {
        "model_config": run.cfg, "training": run.settings,
        "dataset": {"path": os.path.abspath(args.data), "manifest_sha256": run.digest,
                    "train_tokens": run.train_data.num_tokens, "val_tokens": run.val_data.num_tokens,
                    "tokenizer": manifest.get("tokenizer")},
        "command": history[-1]["command"], "versions": library_versions(), "sessions": history,
        "arguments": {**cli.run_arguments(args), "data": os.path.abspath(args.data)}})


# --- the loop's pieces ------------------------------------------------------------------------------

def save(run, val_loss=None, train_loss=None):
    """Checkpoint the run after state.step steps: every rank gathers the optimizer state with the others
    (ZeRO-1 keeps it sharded), then rank 0 alone writes it (ckpt.save_run_checkpoint: atomically, latest
    and best moved, old checkpoints pruned, metrics.jsonl rewritten) and redraws the chart: at the run's
    last checkpoint (its end, or a stop) and otherwise at most every CHART_SECONDS, so that a run of
    seconds (the tests, the quick start) does not spend as long drawing as training."""
    state = run.state
    optimizer_state = ckpt.training_state(run.optimizers, run.train_step.scaler, state.progress())
    if not run.is_main:
        return
    improved = val_loss is not None and (state.best_val_loss is None or val_loss < state.best_val_loss)
    if improved:
        state.best_val_loss, state.best_step = val_loss, state.step
    keep_weights = None if run.args.keep_weights == "all" else run.args.keep_weights
    ckpt.save_run_checkpoint(run.args.run_dir, state.step, run.raw_model, {
        "step": state.step, "tokens_seen": state.tokens_seen, "next_sequence": state.next_sequence,
        "val_loss": val_loss, "train_loss": train_loss, "best_val_loss": state.best_val_loss,
        "best_step": state.best_step, "elapsed_s": state.elapsed_s, "dataset_sha256": run.digest,
        "training": run.settings, "metrics": state.metrics,
    }, optimizer_state, improved, run.args.keep_last, keep_weights, state.best_step, state.metrics)
    last = state.step == run.total_steps or val_loss is None  # the run's end, or a stop (saved without validating)
    if last or time.monotonic() - run.chart_drawn >= CHART_SECONDS:
        import plot_losses  # matplotlib: loaded by the process that draws, when it first draws
        plot_losses.update_run_chart(run.args.run_dir)
        run.chart_drawn = time.monotonic()


def report_progress(run, meter, bar, log, lr_now):
    """The progress bar's loss, LR, tokens/s and MFU (one GPU sync), and the stop on a loss that
    stays non-finite (hopeless)."""
    state = run.state
    if run.train_data.problem:
        raise run.train_data.problem
    loss_now, tokens_per_s, streak = meter.read(state.step, run.G * run.T, run.is_main)
    mfu = gpt.mfu(tokens_per_s, run.cfg, run.peak_flops * run.world) if run.peak_flops and tokens_per_s else None
    bar.set_postfix({"loss": f"{loss_now:.3f}", "lr": f"{lr_now:.2e}",
                     **({"tok/s": f"{tokens_per_s:,.0f}"} if tokens_per_s is not None else {}),
                     **({"mfu": f"{100 * mfu:.1f}%"} if mfu is not None else {})}, refresh=False)
    if log:
        log.scalars(state.step, {"train/loss": loss_now, "train/lr": lr_now, "train/tokens_per_s": tokens_per_s,
                                 "train/mfu": mfu})
    if agree([hopeless(streak, run.precision.use_scaler)], run.control_group, run.device)[0]:
        raise SystemExit(f"error: the loss was not finite for {streak} step(s) in a row at step {state.step}; "
                         f"stopped without saving. The last good checkpoint is "
                         f"{os.path.join(run.args.run_dir, ckpt.CHECKPOINTS, 'latest')}. Try a lower --lr, "
                         "--grad-clip 1.0 or --precision bf16.")


def record(run, meter, log, scores, train_loss, lr):
    """A validation's metrics.jsonl row, sent to the log too; returns what to print of it."""
    run.state.metrics.append(meter.validation_row(scores, train_loss, lr, run.G * run.T))
    if log:
        log.scalars(run.state.step, {f"metrics/{k}": v for k, v in run.state.metrics[-1].items() if k != "step"})
    return ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in scores.items())


def validate_and_save(run, meter, log, signals, lr_now):
    state = run.state
    scores = run.evaluate()
    meter.fold(run.world)
    train_loss = state.train_loss_sum / max(1, state.train_loss_steps)
    if not math.isfinite(scores["val_loss"]):
        raise SystemExit(f"error: validation loss is {scores['val_loss']} at step {state.step}; not saving. The "
                         f"last good checkpoint is {os.path.join(run.args.run_dir, ckpt.CHECKPOINTS, 'latest')}.")
    state.tick()
    said = record(run, meter, log, scores, train_loss, lr_now)
    state.train_loss_sum, state.train_loss_steps = 0.0, 0
    signals.saving = True
    save(run, scores["val_loss"], train_loss)
    signals.saving = False
    if run.is_main:
        tqdm.write(f"step {state.step:,}: train loss {train_loss:.4f}, {said}"
                   f"{' (best)' if state.best_step == state.step else ''}")
    meter.start_interval(state.step)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    with cli.errors_end_in_one_line(gpt.DeviceError):
        rank, world, device, control_group = setup_distributed(args.device)
    try:
        lock = ckpt.run_folder_lock(args.run_dir) if rank == 0 else contextlib.nullcontext()
        with cli.errors_end_in_one_line(ckpt.CheckpointError, data.DatasetError), lock, training.StopSignals() as signals:
            train(args, argv, rank, world, device, control_group, signals)
    except KeyboardInterrupt:
        print(f"stopped at once (a second Ctrl-C), without saving; the checkpoints in {args.run_dir} are intact: "
              "continue with --resume latest", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, argv, rank, world, device, control_group, signals):
    """setup_run, then the loop: a step, the progress bar, a validation + checkpoint when due, a clean
    stop on a signal. A background thread reads this rank's micro-batches, in the run's order."""
    run = setup_run(args, argv, rank, world, device, control_group)
    state, print0 = run.state, run.print0
    loader = data.BatchLoader(run.train_data, data.micro_batch_starts(state.next_sequence, run.total_steps - state.step,
                                                                      run.G, rank, run.B, run.A), run.B, run.T, device)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", disable=not run.is_main,
               dynamic_ncols=True)
    log = experiments.ExperimentLog(args.log, args.run_dir, {"model_config": run.cfg, "training": run.settings},
                                    state.step) if args.log and run.is_main else None
    # With --val-minutes, a run shorter than a few intervals would draw a chart of two points.
    min_val_interval = max(1, (run.total_steps - state.step) // MIN_VALIDATIONS)
    first_step, exit_reason, meter = state.step, None, Meter(device, state)
    with training.attention_context(device), contextlib.closing(loader), bar, \
            contextlib.closing(log) if log else contextlib.nullcontext():  # closed before any error line
        if state.step == 0 and not state.metrics:  # the untrained model (about ln(50257)) anchors the chart
            print0(f"step 0: {record(run, meter, log, run.evaluate(), None, None)} (untrained)")
            if len(run.seconds) > 1:  # what each validation will cost, said once
                print0("each validation takes " + ", ".join(f"{name.replace('_', ' ')} {cli.duration(seconds)}"
                                                            for name, seconds in run.seconds.items()))
        if agree([signals.received is not None], control_group, device)[0]:
            print0(f"{signals.received or 'a signal on another process'} before the first step: nothing new to save")
            return
        state.start_clock()  # after step 0's validation: that is not training time
        run.raw_model.train()
        while state.step < run.total_steps:
            lr_now = set_lr(run.optimizers, state.step, args, run.decay_steps)
            step_loss, norm = run.train_step(loader)
            state.step += 1
            state.next_sequence += run.G
            state.tokens_seen += run.G * run.T
            meter.add(step_loss, norm)
            bar.update(1)
            if state.step == first_step + 1:
                # What exists after the first step (model, optimizer state, compiled graphs) lives for
                # the whole run: keep it out of the garbage collector's full scans (nanochat does this).
                gc.collect()
                gc.freeze()
                training.synchronize(device)  # the first step compiles: its time is not the run's rate
                meter.restart_clocks(state.step)
            last = state.step == run.total_steps
            val_due = (state.step % args.val_every == 0) if args.val_every else \
                (time.time() - meter.val_time >= args.val_minutes * 60 or state.step % min_val_interval == 0)
            stop, val_due = agree([signals.received is not None, val_due], control_group, device)
            if state.step % args.log_every == 0 or val_due or stop or last:
                report_progress(run, meter, bar, log, lr_now)
            if val_due or last:
                validate_and_save(run, meter, log, signals, lr_now)
            if stop and not last:
                exit_reason = signals.received or "a signal on another process"
                state.tick()
                meter.fold(run.world)  # the running train-loss sums go into the checkpoint: a resume continues them
                signals.saving = True
                save(run)
                break
    gc.unfreeze()  # train() may run again in this process (the tests do)
    if world > 1:
        dist.barrier()
    if exit_reason:
        print0(f"{exit_reason}: saved {ckpt.step_folder(args.run_dir, state.step)}; continue with --resume latest")
    else:
        print0(f"done at step {state.step:,}; best val loss {state.best_val_loss}; checkpoints in "
               f"{os.path.join(args.run_dir, ckpt.CHECKPOINTS)}")


if __name__ == "__main__":
    main()
