"""Train a GPTModel on a prepared dataset: fast, exact on resume, safe to kill.

    python train.py --data datasets/fineweb --run-dir runs/seed                  # the seed's run
    python train.py --data datasets/fineweb --run-dir runs/seed --resume latest  # continue it
    torchrun --nproc_per_node 8 train.py --data datasets/fineweb --run-dir runs/x   # 8 GPUs (DDP)
    python train.py --data D --run-dir runs/modern --recipe modern               # GPT-3-style recipe

The defaults are the seed's run, as it was: the book's GPT-2 small, 6 sequences a step, AdamW
(lr 4e-4, weight decay 0.1 on every parameter), constant LR, no clipping, fp16 autocast + GradScaler
(+ TF32) on CUDA, a validation and checkpoint about every 30 minutes over 3,200 batches, one pass over
the training tokens. Each hypothesis for why the seed lost to OpenAI's GPT-2 is one flag away:
--qkv-bias, --tie-weights, --drop-rate 0, --schedule cosine|linear --warmup-steps N, --precision bf16|fp32,
--grad-accum A (bigger batches), --grad-clip 1.0, --decay-matrices-only, --init gpt2.

Data order. Optimizer step s reads global sequences [s*G, (s+1)*G) of the train split, G = batch size
x grad accumulation x processes; micro-step m of rank r takes sequences starting at
s*G + (r*A + m)*B. So 1 process accumulating 2 micro-batches and 2 DDP processes with 1 each see the
same tokens, and dropout masks are seeded by (seed, first sequence), so they match too. The LR is a
pure function of the step. Together this makes resuming, changing the number of GPUs, and stopping
early with --max-steps exact. Validation touches neither the data order nor the dropout seeds, so the
weights do not depend on when it runs; with --val-minutes only which steps get a checkpoint varies.

The run folder:
    RUN/config.json            model config, every setting, dataset manifest sha256, command, versions
    RUN/metrics.jsonl          one line per validation: step, tokens_seen, train_loss, val_loss, lr, ...
    RUN/loss.png               the loss chart, redrawn at every validation (plot_losses.py)
    RUN/checkpoints/step-*/    model.safetensors + checkpoint.json (+ train_state.safetensors)
    RUN/checkpoints/latest     -> newest complete checkpoint;  RUN/checkpoints/best -> lowest val loss
Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits 0.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpointing as ckpt
import data
import gpt
import training
from training import RECIPES

# --- the seed's run (the defaults) ----------------------------------------------------------------
MODEL = "gpt2-small"          # the book's GPT-2 small: 163M parameters with its untied head
BATCH_SIZE = 6                # sequences per device per micro-step (the seed's batch)
GRAD_ACCUM = 1                # micro-steps per optimizer step (used unless --tokens-per-step is given)
TOKENS_PER_STEP = None        # if set (and --grad-accum is not), grad accumulation is derived from it
LR = 4e-4                     # the book's AdamW lr, which the seed kept
WEIGHT_DECAY = 0.1
BETA1 = 0.9                   # torch's AdamW defaults, as the seed used them
BETA2 = 0.999
DECAY_MATRICES_ONLY = False   # the seed decayed every parameter, LayerNorm scales and biases too
OPTIMIZER = "adamw"
MUON_LR = 0.02                # Keller Jordan's Muon lr, for torch.optim.Muon's default adjust_lr_fn
                              # ("original": x sqrt(max(1, rows/cols))); torch's own default, 1e-3, is
                              # for adjust_lr_fn="match_rms_adamw"
MUON_WEIGHT_DECAY = 0.0       # Keller's Muon runs (the ~1.7B-token GPT-2 small result) used none; torch's
                              # default 0.1 at lr 0.02 would shrink the matrices 0.2% every step
FUSED = False                 # fused AdamW kernel (CUDA only); "cuda" = on when training on CUDA
SCHEDULE = "constant"
WARMUP_STEPS = 0
DECAY_STEPS = None            # decay horizon; None = the steps in one pass over the data
MIN_LR = 0.0                  # where the decay ends
GRAD_CLIP = 0.0               # 0 = no clipping (the seed)
PRECISION = "fp16"            # fp16 autocast + GradScaler + TF32 matmuls on CUDA (the seed); fp32 elsewhere
COMPILE = False               # torch.compile; "cuda" = on when training on CUDA
VAL_MINUTES = 30.0            # the seed validated (and checkpointed) about every 30 minutes
VAL_EVERY = None              # validate every N optimizer steps instead (exact to resume; tests use it)
VAL_BATCHES = 3200            # the RTX 3090 run's validation: 3,200 batches of VAL_BATCH_SIZE sequences from
VAL_BATCH_SIZE = 6            # the start of the val split (19.7M tokens), whatever --batch-size is
KEEP_LAST = 3                 # full (resumable) checkpoints kept; older ones keep weights + metrics
SEED = 123                    # the book's torch.manual_seed(123)
LOG_EVERY = 10                # steps between progress-bar updates (each costs one GPU sync)
MAX_NONFINITE_STEPS = 20      # stop when the loss has been inf/nan this many steps in a row
GRAD_SPIKE_FACTOR = 5.0       # a gradient norm this many times its running mean is logged as a spike

# --- settings -------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Recipes: " + json.dumps(RECIPES),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset folder (prepare_datasets.py --output)")
    p.add_argument("--run-dir", required=True, help="where config, metrics, chart and checkpoints go")
    p.add_argument("--recipe", choices=list(RECIPES) + list(training.RECIPE_ALIASES), default="rtx3090",
                   help="a set of defaults: rtx3090 (Giles Thomas's RTX 3090 run, as he trained it) or modern "
                        "(see the epilog); an explicit flag overrides each")
    m = p.add_argument_group("model (None = the preset's value)")
    m.add_argument("--model", choices=list(gpt.PRESETS), default=MODEL, help="model preset")
    m.add_argument("--context-length", type=int, help="tokens per sequence")
    m.add_argument("--emb-dim", type=int, help="embedding width")
    m.add_argument("--n-layers", type=int, help="transformer blocks")
    m.add_argument("--n-heads", type=int, help="attention heads (must divide --emb-dim)")
    m.add_argument("--drop-rate", type=float, help="dropout (the book: 0.1)")
    m.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, help="biases on query/key/value (GPT-2 had them)")
    m.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, help="output head = token embedding (GPT-2)")
    m.add_argument("--init", choices=["pytorch", "gpt2"], help="weight init: the book's (pytorch) or GPT-2's")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=batch_size_arg, default=BATCH_SIZE,
                   help="sequences per device per micro-step, or auto: the largest that fits in GPU memory and "
                        "divides the step (found once at start-up, recorded in config.json)")
    o.add_argument("--grad-accum", type=int, default=None,
                   help=f"micro-steps per optimizer step (default {GRAD_ACCUM}, or derived from --tokens-per-step)")
    o.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP,
                   help="tokens per optimizer step over all processes; --grad-accum is derived from it, and a "
                        "value that batch x accumulation x processes x context cannot hit exactly is refused")
    o.add_argument("--optimizer", choices=["adamw", "muon"], default=OPTIMIZER,
                   help="muon: torch.optim.Muon for the blocks' matrices, AdamW for the rest")
    o.add_argument("--lr", type=float, default=LR, help="peak learning rate (AdamW)")
    o.add_argument("--muon-lr", type=float, default=MUON_LR,
                   help="peak learning rate of Muon's parameters (torch's adjust_lr_fn 'original' scaling)")
    o.add_argument("--muon-weight-decay", type=float, default=MUON_WEIGHT_DECAY,
                   help="Muon's decoupled weight decay (the AdamW part keeps --weight-decay)")
    o.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW's decoupled weight decay")
    o.add_argument("--beta1", type=float, default=BETA1, help="AdamW's first-moment decay")
    o.add_argument("--beta2", type=float, default=BETA2, help="AdamW's second-moment decay (GPT-3: 0.95)")
    o.add_argument("--decay-matrices-only", action=argparse.BooleanOptionalAction, default=DECAY_MATRICES_ONLY,
                   help="weight decay on 2-D weights only, not on biases and LayerNorm")
    o.add_argument("--fused", nargs="?", const=True, default=FUSED, type=_bool_or_cuda,
                   help="fused AdamW (CUDA): true, false or cuda (on when training on CUDA)")
    o.add_argument("--schedule", choices=["constant", "cosine", "linear"], default=SCHEDULE,
                   help="LR after warmup: constant, or cosine / linear decay to --min-lr at --decay-steps")
    o.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="linear warmup from 0")
    o.add_argument("--decay-steps", type=int, default=DECAY_STEPS,
                   help="step where the decay reaches --min-lr (default: one pass over the data; "
                        "not --max-steps, so a shortened run is an exact prefix of the full one)")
    o.add_argument("--min-lr", type=float, default=MIN_LR, help="the decay's floor (Muon's scaled alike)")
    o.add_argument("--grad-clip", type=float, default=GRAD_CLIP, help="max global gradient norm; 0 = off")
    o.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default=PRECISION,
                   help="fp16 = autocast + GradScaler (CUDA); tf32/bf16 also enable TF32 matmuls on CUDA")
    o.add_argument("--compile", nargs="?", const=True, default=COMPILE, type=_bool_or_cuda,
                   help="torch.compile the model: true, false or cuda (on when training on CUDA)")
    r = p.add_argument_group("run")
    r.add_argument("--max-steps", type=int, help="stop after this optimizer step (default: the end of the data)")
    r.add_argument("--val-every", type=int, default=VAL_EVERY, help="validate + checkpoint every N steps")
    r.add_argument("--val-minutes", type=float, default=VAL_MINUTES,
                   help="validate + checkpoint every M minutes of wall clock (when --val-every is not given)")
    r.add_argument("--val-batches", type=int, default=VAL_BATCHES, help="batches of --batch-size for validation")
    r.add_argument("--keep-last", type=int, default=KEEP_LAST, help="full checkpoints to keep (plus best)")
    r.add_argument("--seed", type=int, default=SEED, help="init and dropout seed")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--resume", help="latest, best, or a checkpoint folder: continue from it")
    r.add_argument("--allow-dataset-change", action="store_true",
                   help="resume on a different dataset (starts at its beginning)")
    r.add_argument("--log-every", type=int, default=LOG_EVERY, help="steps between progress-bar updates")
    return p


def batch_size_arg(value):
    if value == "auto" or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, not {value!r}") from None


def _bool_or_cuda(value):
    if isinstance(value, bool) or value == "cuda":
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or cuda, not {value!r}")


def parse_args(argv=None):
    """Parse once for --recipe, install its values as the defaults, then parse for real, so a flag
    given on the command line always wins over the recipe."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=list(RECIPES) + list(training.RECIPE_ALIASES), default="rtx3090")
    recipe = pre.parse_known_args(argv)[0].recipe
    if recipe in training.RECIPE_ALIASES:
        print(f"note: --recipe {recipe} is now called --recipe {training.RECIPE_ALIASES[recipe]}", file=sys.stderr)
        recipe = training.RECIPE_ALIASES[recipe]
    parser = build_parser()
    parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args(argv)
    args.recipe = recipe
    for name in ("batch_size", "grad_accum", "tokens_per_step", "val_batches", "keep_last", "log_every",
                 "max_steps", "val_every"):
        value = getattr(args, name)
        if value is not None and value != "auto" and value < (0 if name == "max_steps" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, not {value}")
    for name in ("lr", "muon_lr"):  # the schedule scales every group by its base lr over --lr
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    return args


def model_config_from_args(args):
    return gpt.model_config(args.model, context_length=args.context_length, emb_dim=args.emb_dim,
                            n_layers=args.n_layers, n_heads=args.n_heads, drop_rate=args.drop_rate,
                            qkv_bias=args.qkv_bias, tie_weights=args.tie_weights, init=args.init)


def build_optimizers(model, args, fused=False, compile_muon=False):
    """The run's optimizers: AdamW, or Muon + AdamW, from the flags (training.build_optimizers)."""
    return training.build_optimizers(model, args.lr, args.weight_decay, (args.beta1, args.beta2),
                                     args.decay_matrices_only, fused, args.optimizer, args.muon_lr,
                                     muon_weight_decay=args.muon_weight_decay, compile_muon=compile_muon)


def choose_geometry(args, batch_size, context_length, world, saved=None):
    """(B, A, G) for this session. A fresh run gets exactly what its flags say (training.batch_geometry);
    a resumed run keeps the checkpoint's global batch G, adjusting accumulation to this number of
    processes, or is refused, so the data order and the LR schedule's steps stay the run's."""
    if saved is None:
        try:
            return training.batch_geometry(batch_size, args.grad_accum, args.tokens_per_step, context_length, world)
        except training.GeometryError as e:
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


def lr_at(step, peak_lr, schedule="constant", warmup_steps=0, decay_steps=None, min_lr=0.0):
    """Learning rate for optimizer step `step` (0-based): linear warmup to peak_lr over warmup_steps,
    then constant, or a cosine or straight-line decay from peak_lr down to min_lr at decay_steps (and
    min_lr after it). A pure function of the step: resuming, another number of GPUs or a shorter
    --max-steps give every step the LR it would have had in the full run."""
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


# --- devices and precision ------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world_size, device, control_group). Under torchrun: one process per GPU (NCCL), or
    gloo on CPU. control_group is a gloo group for small CPU-side decisions (stop, validate now),
    which all ranks must agree on without making the GPU wait."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_arg), None
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_arg.startswith("cuda:"):
        raise SystemExit("error: under torchrun each process takes the GPU cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return rank, world, device, dist.new_group(backend="gloo")
    dist.init_process_group("gloo")
    return rank, world, resolve_device("cpu" if device_arg == "auto" else device_arg), None


def resolve_device(device_arg):
    try:
        return gpt.resolve_device(device_arg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def library_versions():
    import numpy
    import safetensors
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "safetensors": safetensors.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


# --- checkpoints ----------------------------------------------------------------------------------

def training_state(optimizers, scaler, progress):
    """(tensors, json) holding everything but the weights needed to continue exactly. The optimizer
    state dict is split: its tensors become safetensors keys "optimizer.I.state.P.NAME", the rest JSON."""
    tensors, optimizer_docs = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        state_doc = {}
        for pid, entries in sd["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{i}.state.{pid}.{key}"] = value
                else:
                    state_doc.setdefault(str(pid), {})[key] = value
        optimizer_docs.append({"state": state_doc, "param_groups": sd["param_groups"]})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{d}"] = state
    doc = {"optimizers": optimizer_docs, "scaler": scaler.state_dict(), **progress}
    return tensors, doc


def restore_training_state(ckpt_dir, meta, optimizers, scaler):
    """Load optimizer, scaler and RNG state saved by training_state() into the live objects."""
    tensors = ckpt.load_tensors(ckpt_dir, ckpt.TRAIN_STATE_FILE)
    doc = meta["train_state"]
    if len(doc["optimizers"]) != len(optimizers):
        raise SystemExit(f"error: {ckpt_dir} was trained with {len(doc['optimizers'])} optimizer(s), this run "
                         f"builds {len(optimizers)}; resume with the same --optimizer")
    for i, (opt, saved) in enumerate(zip(optimizers, doc["optimizers"])):
        state = {}
        for key, value in tensors.items():
            parts = key.split(".", 4)
            if parts[0] == "optimizer" and int(parts[1]) == i:
                state.setdefault(int(parts[3]), {})[parts[4]] = value
        for pid, entries in saved["state"].items():
            state.setdefault(int(pid), {}).update(entries)
        # Keep this run's hyperparameters (betas, weight decay, ...): a changed flag takes effect.
        fresh_groups = opt.state_dict()["param_groups"]
        if [len(g["params"]) for g in fresh_groups] != [len(g["params"]) for g in saved["param_groups"]]:
            raise SystemExit(f"error: {ckpt_dir}'s optimizer groups its parameters differently "
                             "(--decay-matrices-only or --optimizer changed?); resume with the run's settings")
        groups = [{**fresh, "params": old["params"]} for fresh, old in zip(fresh_groups, saved["param_groups"])]
        opt.load_state_dict({"state": state, "param_groups": groups})
    if doc["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return doc


def find_resume_checkpoint(run_dir, resume):
    """(folder, meta) to resume from. "latest" tries the latest pointer, then every checkpoint newest
    first, skipping damaged or weights-only ones (a kill -9 mid-write leaves the previous intact)."""
    if resume not in ("latest", "best"):
        candidates = [resume]
    else:
        candidates = []
        link = os.path.join(run_dir, ckpt.CHECKPOINTS, resume)
        if os.path.lexists(link):
            candidates.append(os.path.normpath(ckpt._read_pointer(link)))
        if resume == "latest":
            candidates += [d for _, d in reversed(ckpt.list_checkpoints(run_dir)) if d not in candidates]
    problems = []
    for candidate in candidates:
        try:
            folder = ckpt.resolve_checkpoint(candidate, resume if resume in ("latest", "best") else "latest")
            meta = ckpt.read_meta(folder)
            if ckpt.TRAIN_STATE_FILE not in meta.get("files", {}):
                raise ckpt.CheckpointError(f"{folder} holds weights only (older than --keep-last); cannot resume from it")
            ckpt.check_headers(folder)  # fail here, not halfway through restoring
            return folder, meta
        except ckpt.CheckpointError as e:
            problems.append(str(e))
            if resume == "latest":
                print(f"warning: skipping {candidate}: {e}", file=sys.stderr)
    if not candidates:
        raise SystemExit(f"error: --resume {resume}: {run_dir} has no checkpoints yet; start without --resume")
    raise SystemExit(f"error: --resume {resume}: no usable checkpoint: " + "; ".join(problems))


def set_aside_newer_checkpoints(run_dir, step):
    """Resuming from an older checkpoint starts a new branch of the run. The old branch's newer
    checkpoints move to RUN/checkpoints/abandoned-<time>/: kept, never overwritten by the new
    branch, and out of the way of --keep-last pruning and of --resume latest."""
    newer = [folder for s, folder in ckpt.list_checkpoints(run_dir) if s > step]
    if not newer:
        return
    dest = os.path.join(run_dir, ckpt.CHECKPOINTS, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(dest)
    for folder in newer:
        os.rename(folder, os.path.join(dest, os.path.basename(folder)))
    print(f"note: resuming from step {step:,}; the {len(newer)} newer checkpoint(s) were moved to {dest}")


def check_same_run(ckpt_dir, meta, cfg, digest, allow_dataset_change):
    """Refuse to continue a checkpoint with another model or (unless allowed) another dataset."""
    saved = meta["model_config"]
    diffs = [f"{k}={cfg.get(k)!r} (checkpoint: {saved.get(k)!r})"
             for k in sorted(set(cfg) | set(saved)) if cfg.get(k) != saved.get(k)]
    if diffs:
        raise SystemExit(f"error: the model config differs from {ckpt_dir}'s: {', '.join(diffs)}; "
                         "resume with the run's model flags, or start a new --run-dir")
    if meta.get("dataset_sha256") != digest and not allow_dataset_change:
        raise SystemExit(f"error: --data is not the dataset {ckpt_dir} was trained on (manifest sha256 "
                         f"{digest[:12]} vs {str(meta.get('dataset_sha256'))[:12]}); pass --allow-dataset-change "
                         "to continue on new data")


def prune_checkpoints(run_dir, keep_last, best_dir):
    """Checkpoints older than the last `keep_last` (except best) keep weights + metrics only."""
    checkpoints = ckpt.list_checkpoints(run_dir)
    for _, folder in checkpoints[:-keep_last]:
        if best_dir is None or os.path.normpath(folder) != os.path.normpath(best_dir):
            try:
                ckpt.strip_train_state(folder)
            except ckpt.CheckpointError as e:
                print(f"warning: cannot prune {folder}: {e}", file=sys.stderr)


def remove_unfinished_writes(run_dir):
    """Temporary folders left by a run killed while saving (never read; safe to delete)."""
    root = os.path.join(run_dir, ckpt.CHECKPOINTS)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(ckpt.TMP_PREFIX):
                path = os.path.join(root, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def write_metrics(run_dir, rows):
    """metrics.jsonl from the checkpoint's history: after a resume, no lines from the lost steps."""
    path = os.path.join(run_dir, "metrics.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def draw_chart(run_dir):
    try:
        import plot_losses
        plot_losses.plot_runs([run_dir], os.path.join(run_dir, "loss.png"))
    except Exception as e:  # a chart must never stop training
        print(f"warning: could not draw the loss chart: {e}", file=sys.stderr)


# --- the loop's pieces ----------------------------------------------------------------------------

def set_lr(optimizers, step, args, decay_steps):
    for opt in optimizers:
        for group in opt.param_groups:
            scale = group["base_lr"] / args.lr
            group["lr"] = lr_at(step, group["base_lr"], args.schedule, args.warmup_steps, decay_steps,
                                args.min_lr * scale)


def validation_geometry(val_batches, batch_size, available_sequences):
    """(batches, batch size) covering the first val_batches x VAL_BATCH_SIZE sequences of the val split
    (fewer if it is shorter), in batches as large as the training micro-batch allows. The loss is a
    mean over equal batches of full windows, so it is the same number whatever the batch size: a run
    with --batch-size auto validates on exactly the tokens the RTX 3090 run did."""
    sequences = min(val_batches * VAL_BATCH_SIZE, available_sequences)
    if sequences >= VAL_BATCH_SIZE:
        sequences -= sequences % VAL_BATCH_SIZE
    size = max(b for b in range(1, max(1, min(batch_size, sequences)) + 1) if sequences % b == 0) if sequences else 1
    return sequences // size, size


def agree_min(value, control_group, device):
    """The smallest of every rank's value (so all ranks take the same micro-batch)."""
    t = torch.tensor([value], dtype=torch.int64, device="cpu" if control_group is not None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group)
    return t.item()


def agree(flags, control_group, device):
    """Every rank's flags OR-ed together, so all ranks stop / validate at the same step."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32,
                     device="cpu" if control_group is not None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group)
    return [bool(v) for v in t.tolist()]


class StopSignals:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world, device, control_group = setup_distributed(args.device)
    try:
        train(args, argv, rank, world, device, control_group)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, argv, rank, world, device, control_group):
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    run_dir = args.run_dir

    # The dataset, the model config, the precision.
    try:
        manifest = data.load_manifest(args.data)
        train_data, val_data = data.TokenStream(args.data, "train"), data.TokenStream(args.data, "val")
        cfg = model_config_from_args(args)
        precision = training.Precision(args.precision, device).apply()
    except (data.DatasetError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    digest = data.manifest_digest(args.data)
    T = cfg["context_length"]
    if precision.name != args.precision:
        say(f"note: --precision {args.precision} needs CUDA; training in {precision.name} on {device.type}")
    on_cuda = device.type == "cuda"
    use_compile = args.compile is True or (args.compile == "cuda" and on_cuda)
    use_fused = args.fused is True or (args.fused == "cuda" and on_cuda)  # the AdamW part, with Muon too

    # Resume or start fresh; never overwrite a run's checkpoints by accident.
    if args.resume:
        ckpt_dir, meta = find_resume_checkpoint(run_dir, args.resume)
        check_same_run(ckpt_dir, meta, cfg, digest, args.allow_dataset_change)
        if rank == 0:
            set_aside_newer_checkpoints(run_dir, meta["step"])
    elif ckpt.list_checkpoints(run_dir):
        raise SystemExit(f"error: {run_dir} already has checkpoints; continue it with --resume latest, "
                         "or pick a new --run-dir")
    else:
        ckpt_dir, meta = None, None
    saved = meta["training"] if meta else None

    # The batch geometry: checked before anything is built, unless the micro-batch must be measured.
    auto_note = None
    if args.batch_size != "auto":
        B, A, G = choose_geometry(args, args.batch_size, T, world, saved)
    torch.manual_seed(args.seed)
    raw_model = gpt.GPTModel(cfg).to(device)
    if args.batch_size == "auto":
        if saved and saved["world_size"] == world:
            B, auto_note = saved["batch_size"], f"auto: {saved['batch_size']}, as the run had it"
        else:
            step_sequences = saved["sequences_per_step"] if saved else \
                (args.tokens_per_step // T if args.tokens_per_step and args.tokens_per_step % T == 0 else None)
            candidates = training.auto_batch_candidates(step_sequences // world if step_sequences else None)
            if not candidates:
                raise SystemExit(f"error: --batch-size auto found no micro-batch in {training.AUTO_BATCH_CANDIDATES} "
                                 f"that divides {step_sequences:,} sequences a step over {world} process(es); "
                                 "give --batch-size")
            try:
                B, auto_note = training.find_batch_size(raw_model, candidates, T, precision,
                                                        training.optimizer_state_bytes(raw_model, args.optimizer))
            except training.GeometryError as e:
                raise SystemExit(f"error: {e}") from None
            if world > 1:  # every rank must take the same micro-batch: the smallest any of them found
                B = int(agree_min(B, control_group, device))
        B, A, G = choose_geometry(args, B, T, world, saved)
        torch.manual_seed(args.seed)  # the probe drew random tokens: start from the seed's state again
    if saved and (A, world) != (saved["grad_accum"], saved["world_size"]):
        say(f"note: the run took {saved['batch_size']} x {saved['grad_accum']} x {saved['world_size']} process(es); "
            f"now {B} x {A} x {world}: the same {G:,} sequences a step")

    val_batches, val_batch_size = validation_geometry(args.val_batches, B, val_data.num_sequences(T))
    if val_batches < 1:
        raise SystemExit(f"error: the val split of {args.data} has {val_data.num_tokens:,} tokens, fewer than one "
                         f"batch of {VAL_BATCH_SIZE} x {T}; prepare more validation tokens")
    if val_batches * val_batch_size < args.val_batches * VAL_BATCH_SIZE:
        say(f"note: the val split holds {val_batches * val_batch_size:,} sequences of {T}; validating on those")
    steps_per_pass = train_data.num_sequences(T) // G
    decay_steps = args.decay_steps if args.decay_steps is not None else steps_per_pass
    check_schedule(args, decay_steps, steps_per_pass, G * T)

    optimizers = build_optimizers(raw_model, args, use_fused, compile_muon=use_compile)

    step, next_sequence, best_val, best_dir, metrics, elapsed_before = 0, 0, None, None, [], 0.0
    loss_since_val, steps_since_val = 0.0, 0
    # The model and its loss as one compiled graph; DDP wraps the compiled module (as nanoGPT does).
    eval_model = step_model = training.compile_model(raw_model, use_compile)
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index] if on_cuda else None)
    train_step = training.TrainStep(step_model, optimizers, precision, args.grad_clip, args.seed, distributed=world > 1)
    scaler = train_step.scaler
    if ckpt_dir is not None:
        raw_model.load_state_dict(ckpt.load_tensors(ckpt_dir, ckpt.MODEL_FILE, device))
        state = restore_training_state(ckpt_dir, meta, optimizers, scaler)
        step, next_sequence = meta["step"], meta["next_sequence"]
        if meta.get("dataset_sha256") != digest:
            next_sequence = 0  # --allow-dataset-change: the new data from its start
        best_val, metrics, elapsed_before = meta.get("best_val_loss"), meta.get("metrics", []), meta["elapsed_s"]
        loss_since_val, steps_since_val = state["train_loss_sum"], state["train_loss_steps"]
        if meta.get("best_step") is not None:
            best_dir = os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.STEP_DIR.format(meta["best_step"]))
            if not os.path.isdir(best_dir):
                best_dir = None
        say(f"resuming from {ckpt_dir} at step {step:,} (sequence {next_sequence:,})")
    total_steps = step + (train_data.num_sequences(T) - next_sequence) // G
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    flops_per_token = gpt.flops_per_token(cfg)
    peak = gpt.gpu_peak_flops(device)

    settings = {**{k: v for k, v in vars(args).items() if k not in ("data", "run_dir")},
                "batch_size": B, "batch_size_requested": args.batch_size, "grad_accum": A, "world_size": world,
                "sequences_per_step": G, "tokens_per_step": G * T, "precision": precision.name,
                "compile": use_compile, "fused": use_fused, "device": str(device), "decay_steps": decay_steps,
                "total_steps": total_steps, "val_batches": val_batches, "val_batch_size": val_batch_size}
    if is_main:
        os.makedirs(os.path.join(run_dir, ckpt.CHECKPOINTS), exist_ok=True)
        remove_unfinished_writes(run_dir)
        config_path = os.path.join(run_dir, "config.json")
        history = []
        if args.resume and os.path.isfile(config_path):
            with open(config_path) as f:
                history = json.load(f).get("sessions", [])
        history.append({"command": [sys.executable] + sys.argv if argv is None else ["train.py"] + list(argv),
                        "start_step": step, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "resumed_from": ckpt_dir})
        ckpt.write_json_atomic(config_path, {
            "model_config": cfg, "training": settings,
            "dataset": {"path": os.path.abspath(args.data), "manifest_sha256": digest,
                        "train_tokens": train_data.num_tokens, "val_tokens": val_data.num_tokens,
                        "tokenizer": manifest.get("tokenizer")},
            "command": history[-1]["command"], "versions": library_versions(), "sessions": history})
        write_metrics(run_dir, metrics)
        if best_dir is not None:  # after falling back past a damaged checkpoint, best may point at it
            ckpt.set_pointer(run_dir, "best", best_dir)
        say(f"model: {gpt.count_parameters(raw_model):,} parameters {cfg}")
        say(f"batch: {B} seq{' (' + auto_note + ')' if auto_note else ''} x {A} accum x {world} processes = "
            f"{G} sequences = {G * T:,} tokens per step; steps {step:,} -> {total_steps:,}; {precision.name} on "
            f"{device}; compile={use_compile} fused={use_fused}")
        muon = f", Muon lr {args.muon_lr:g} on the blocks' matrices" if args.optimizer == "muon" else ""
        decay = "" if args.schedule == "constant" else f", {args.schedule} decay to {args.min_lr:g} at step {decay_steps:,}"
        say(f"lr: AdamW {args.lr:g}{muon}; warmup {args.warmup_steps:,} steps{decay}")

    def save(val_loss, train_loss_now):
        """Checkpoint the state after `step` steps (rank 0), move the pointers, prune old ones."""
        nonlocal best_val, best_dir
        improved = val_loss is not None and (best_val is None or val_loss < best_val)
        if improved:
            best_val = val_loss
        tensors, doc = training_state(optimizers, scaler, {"train_loss_sum": loss_since_val,
                                                           "train_loss_steps": steps_since_val})
        folder = os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.STEP_DIR.format(step))
        ckpt.save_checkpoint(folder, raw_model, {
            "step": step, "tokens_seen": step_tokens_seen(), "next_sequence": next_sequence,
            "val_loss": val_loss, "train_loss": train_loss_now, "best_val_loss": best_val,
            "best_step": step if improved else best_step(),
            "elapsed_s": elapsed(), "dataset_sha256": digest, "training": settings, "metrics": metrics,
        }, tensors, doc)
        ckpt.set_pointer(run_dir, "latest", folder)
        if improved:
            ckpt.set_pointer(run_dir, "best", folder)
            best_dir = folder
        prune_checkpoints(run_dir, args.keep_last, best_dir)

    tokens_before = meta["tokens_seen"] if meta else 0
    best_step = lambda: int(ckpt.STEP_DIR_RE.match(os.path.basename(best_dir)).group(1)) if best_dir else None
    start_step, session_start = step, time.time()
    step_tokens_seen = lambda: tokens_before + (step - start_step) * G * T
    elapsed = lambda: elapsed_before + time.time() - session_start

    # Device-side running sums: read (one sync) only when logged.
    zero = lambda: torch.zeros((), device=device)
    train_loss_sum = torch.tensor(loss_since_val, device=device)
    log_loss_sum, nonfinite_streak = zero(), zero()
    norms, norm_stats = [], {"sum": 0.0, "max": 0.0, "count": 0, "spikes": 0, "ema": None}
    last_val_time, last_val_step = time.time(), step
    log_time, log_step = time.time(), step

    def read_logs():
        """The one sync of a log interval: losses, norms, non-finite streak."""
        nonlocal log_loss_sum, norms, log_time, log_step
        n = step - log_step
        loss = log_loss_sum.item() / max(1, n)
        for value in (torch.stack(norms).tolist() if norms else []):
            if math.isfinite(value):
                ema = norm_stats["ema"]
                if ema is not None and value > GRAD_SPIKE_FACTOR * ema and is_main:
                    norm_stats["spikes"] += 1
                    tqdm.write(f"gradient-norm spike: {value:.3g} ({value / ema:.1f}x its running mean {ema:.3g})")
                norm_stats["ema"] = value if ema is None else 0.9 * ema + 0.1 * value
                norm_stats["sum"] += value
                norm_stats["max"] = max(norm_stats["max"], value)
                norm_stats["count"] += 1
        now = time.time()
        tok_s = n * G * T / max(now - log_time, 1e-9)
        log_loss_sum, norms, log_time, log_step = zero(), [], now, step
        return loss, tok_s, int(nonfinite_streak.item())

    def validate():
        with training.attention_context(device):
            return training.validation_loss(eval_model, val_data, val_batch_size, T, val_batches, precision, rank, world)

    if step == 0 and not metrics:
        # The untrained model's loss (about ln(50257) = 10.8) anchors the chart and the "how far did
        # it come" comparison; a fresh run pays for one extra validation pass.
        val_loss = validate()
        metrics.append({"step": 0, "tokens_seen": 0, "train_loss": None, "val_loss": val_loss, "lr": None,
                        "grad_norm": None, "grad_norm_max": None, "grad_norm_spikes": 0,
                        "tokens_per_s": None, "elapsed_s": 0.0})
        say(f"step 0: val loss {val_loss:.4f} (untrained)")
        last_val_time = log_time = time.time()  # the pass above is not training time

    raw_model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not is_main, dynamic_ncols=True)
    exit_reason = None
    # A background thread reads this rank's micro-batches, in the run's order, ahead of the GPU.
    loader = training.BatchLoader(train_data, training.micro_batch_starts(next_sequence, total_steps - step, G, rank, B, A),
                                  B, T, device)
    with StopSignals() as signals, training.attention_context(device), contextlib.closing(loader):
        while step < total_steps:
            lr_now = lr_at(step, args.lr, args.schedule, args.warmup_steps, decay_steps, args.min_lr)
            set_lr(optimizers, step, args, decay_steps)
            step_loss, norm = train_step(next(loader) for _ in range(A))
            if step == start_step:
                # What exists after the first step (model, optimizer state, compiled graphs) lives for
                # the whole run: keep it out of the garbage collector's full scans (nanochat does this).
                gc.collect()
                gc.freeze()
            step += 1
            next_sequence += G
            finite = torch.isfinite(step_loss)
            nonfinite_streak = torch.where(finite, zero(), nonfinite_streak + 1)
            train_loss_sum += torch.where(finite, step_loss, zero())
            steps_since_val += 1
            log_loss_sum += step_loss
            norms.append(norm.detach())
            bar.update(1)

            val_due = (step % args.val_every == 0) if args.val_every else \
                (time.time() - last_val_time >= args.val_minutes * 60)
            stop, val_due = agree([signals.received is not None, val_due], control_group, device)
            if step % args.log_every == 0 or val_due or stop or step == total_steps:
                loss_now, tok_s, streak = read_logs()
                postfix = {"loss": f"{loss_now:.3f}", "lr": f"{lr_now:.2e}", "tok/s": f"{tok_s:,.0f}"}
                if peak:
                    postfix["mfu"] = f"{100 * tok_s * flops_per_token / (peak * world):.1f}%"
                bar.set_postfix(postfix, refresh=False)
                # Without a GradScaler one non-finite step has already spoiled the weights.
                diverged = agree([streak >= MAX_NONFINITE_STEPS or (streak > 0 and not precision.use_scaler)],
                                 control_group, device)[0]
                if diverged:
                    bar.close()
                    raise SystemExit(f"error: the loss was not finite for {streak} step(s) in a row at step {step}; "
                                     f"stopped without saving. The last good checkpoint is "
                                     f"{os.path.join(run_dir, ckpt.CHECKPOINTS, 'latest')}. Try a lower --lr, "
                                     "--grad-clip 1.0 or --precision bf16.")

            if val_due or step == total_steps:
                val_loss = validate()
                if world > 1:
                    dist.all_reduce(train_loss_sum)
                    train_loss_sum /= world
                train_loss = train_loss_sum.item() / max(1, steps_since_val)
                if not math.isfinite(val_loss):
                    bar.close()
                    raise SystemExit(f"error: validation loss is {val_loss} at step {step}; not saving. The last "
                                     f"good checkpoint is {os.path.join(run_dir, ckpt.CHECKPOINTS, 'latest')}.")
                window = time.time() - last_val_time
                row = {"step": step, "tokens_seen": step_tokens_seen(), "train_loss": train_loss,
                       "val_loss": val_loss, "lr": lr_now,
                       "grad_norm": norm_stats["sum"] / max(1, norm_stats["count"]),
                       "grad_norm_max": norm_stats["max"], "grad_norm_spikes": norm_stats["spikes"],
                       "tokens_per_s": (step - last_val_step) * G * T / max(window, 1e-9),
                       "elapsed_s": elapsed()}
                metrics.append(row)
                train_loss_sum, steps_since_val, loss_since_val = zero(), 0, 0.0
                norm_stats.update(sum=0.0, max=0.0, count=0, spikes=0)
                if is_main:
                    save(val_loss, train_loss)
                    write_metrics(run_dir, metrics)
                    draw_chart(run_dir)
                    tqdm.write(f"step {step:,}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                               f"{' (best)' if best_val == val_loss else ''}")
                last_val_time, last_val_step = time.time(), step
                # Validation and saving are not training: leave them out of the next tokens/s.
                log_time = time.time()

            if stop and step < total_steps:
                exit_reason = signals.received or "a signal on another process"
                total = train_loss_sum.clone()
                if world > 1:
                    dist.all_reduce(total)
                    total /= world
                loss_since_val = total.item()
                if is_main:
                    save(None, None)
                break
    bar.close()
    if world > 1:
        dist.barrier()
    if exit_reason:
        say(f"{exit_reason}: saved {os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.STEP_DIR.format(step))}; "
            f"continue with --resume latest")
    elif is_main:
        say(f"done at step {step:,}; best val loss {best_val}; checkpoints in {os.path.join(run_dir, ckpt.CHECKPOINTS)}")


if __name__ == "__main__":
    main()
