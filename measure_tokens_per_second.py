"""Measure training throughput before you train: tokens/s per precision mode and batch size,
the biggest batch that fits, and how long the default training run would take.

For each precision mode and each batch size: a fresh model from the same seed, a few warm-up
optimizer steps, then --steps timed ones (forward, loss, backward, optimizer step), with the device
synchronized around the timed region. Tokens are random unless --data names a prepared dataset
(then real train batches, read the way training reads them). An out-of-memory error ends that mode's
sweep: it is reported as the mode's limit, memory is freed and the next mode runs.

    python measure_tokens_per_second.py                                   # gpt2-small, every mode
    python measure_tokens_per_second.py --precision bf16 --max-batch-size 64 --compile
    python measure_tokens_per_second.py --model tiny --device cpu --precision fp32,bf16 --batch-sizes 1,2
    python measure_tokens_per_second.py --data datasets/fineweb --json out/throughput.json

Precision modes (the same names the training script uses):
    fp32  plain float32, TF32 off
    tf32  float32 tensors, matmuls and convolutions on TF32 tensor cores (CUDA only)
    fp16  autocast float16 + GradScaler, TF32 on (CUDA only; the seed's mode)
    bf16  autocast bfloat16, TF32 on, no scaler
MFU (model FLOPs utilisation) = tokens/s x gpt.flops_per_token(cfg) / the GPU's dense bf16/fp16
tensor peak (gpt.GPU_PEAK_TFLOPS), for every mode, as nanoGPT and the PaLM paper report it.
"""

import argparse
import contextlib
import gc
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpointing
import data
import gpt

MODEL = "gpt2-small"
CONTEXT_LENGTH = None               # None: the preset's (1,024 for gpt2-small)
BATCH_SIZES = None                  # e.g. "1,2,4"; None: doubling from 1 up to MAX_BATCH_SIZE
MAX_BATCH_SIZE = 64
PRECISIONS = "fp32,tf32,fp16,bf16"
STEPS = 10                          # timed optimizer steps per setting
WARMUP_STEPS = 3                    # untimed: CUDA context, cuBLAS heuristics, torch.compile
COMPILE = False
DEVICE = "auto"                     # "cuda" when there is one, else "cpu"
SEED = 123                          # the book's torch.manual_seed
LEARNING_RATE = 4e-4                # the seed's AdamW settings: the step costs the same as in training
WEIGHT_DECAY = 0.1
TRAIN_TOKENS = 3_282_124_800        # the seed's default training run, in tokens
MAX_SCALER_WARMUP_STEPS = 30        # fp16: extra warm-up while the GradScaler is still backing off

ALL_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name):
    try:
        return gpt.resolve_device(name)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def unsupported_reason(precision, device):
    """Why a precision mode cannot run on this device (None if it can)."""
    if device.type != "cuda" and precision in ("tf32", "fp16"):
        return f"{precision} is a CUDA mode (tensor cores, GradScaler), not for {device.type}"
    if device.type == "cuda" and precision == "bf16" and not gpt.has_native_bf16(device):
        return "bf16 needs a GPU with bfloat16 support (Ampere or newer)"
    return None


@contextlib.contextmanager
def precision_mode(precision, device):
    """TF32 on for every mode but fp32 (CUDA only), restored afterwards so callers are unaffected."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    if device.type == "cuda":
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def autocast(precision, device):
    """The forward pass's autocast context: fp16/bf16 mixed precision, or a no-op for fp32/tf32."""
    dtype = AUTOCAST_DTYPES.get(precision, torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype, enabled=precision in AUTOCAST_DTYPES)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory(device, compiled=False):
    if compiled:
        # Dynamo's caches hold the compiled graphs (and what they captured) of the model just
        # measured; each setting's fresh model compiles afresh instead of piling up recompiles.
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc):
    """CUDA's caching allocator raises torch.OutOfMemoryError; the CPU allocator, and cuBLAS when it
    cannot get a workspace, raise a RuntimeError that says so."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in message for words in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))


def batch_source(data_dir, split, batch_size, context_length, vocab_size, device, seed=SEED):
    """A function step -> (inputs, targets) on `device`, each (batch_size, context_length) int64.

    Without data: one random batch made up front and reused (tokens/s does not depend on the
    values). With data: consecutive sequences of the split, wrapping around, read from the memory-
    mapped shards and copied to the device each step, as the training loop does.
    """
    if data_dir is None:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(vocab_size, (batch_size, context_length + 1), generator=generator)
        inputs, targets = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
        return lambda step: (inputs, targets)

    stream = data.TokenStream(data_dir, split)
    num_sequences = stream.num_sequences(context_length)
    if num_sequences < batch_size:
        raise data.DatasetError(f"the {split} split of {data_dir} has {num_sequences:,} sequences of "
                                f"{context_length} tokens, fewer than batch size {batch_size}; "
                                "use a smaller --batch-size or --context-length")
    starts = num_sequences - batch_size + 1

    def next_batch(step):
        inputs, targets = stream.batch((step * batch_size) % starts, batch_size, context_length)
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    return next_batch


def training_step(model, optimizers, scaler, inputs, targets, precision, device):
    """One optimizer step as training takes it: forward, loss, backward, step, zero the gradients."""
    with autocast(precision, device):
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    scaler.scale(loss).backward()
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return loss


def measure_training(cfg, batch_size, precision, device, steps=STEPS, warmup_steps=WARMUP_STEPS,
                     data_dir=None, compile_model=False, fused=None, build_model=gpt.GPTModel, seed=SEED):
    """Time `steps` training steps of a fresh model; returns a result row (dict).

    build_model(cfg) makes the model (the GPU benchmark passes one with the book's attention).
    fused: fused AdamW (None: on CUDA). Raises the allocator's error when the setting does not fit.
    """
    if fused is None:
        fused = device.type == "cuda"
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with precision_mode(precision, device):
        torch.manual_seed(seed)
        model = build_model(cfg).to(device)
        model.train()
        optimizers = gpt.configure_optimizers(model, LEARNING_RATE, WEIGHT_DECAY, fused=fused)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        step_model = torch.compile(model) if compile_model else model
        next_batch = batch_source(data_dir, "train", batch_size, cfg["context_length"], cfg["vocab_size"],
                                  device, seed)

        for step in range(warmup_steps):
            training_step(step_model, optimizers, scaler, *next_batch(step), precision, device)
        # fp16: the GradScaler starts at a scale of 65,536 and halves it at each overflow, skipping that
        # step's (costly) optimizer update. Warm up until a step keeps its scale, so skipped steps
        # don't flatter the timed ones.
        first = warmup_steps
        while scaler.is_enabled() and first < warmup_steps + MAX_SCALER_WARMUP_STEPS:
            scale = scaler.get_scale()
            training_step(step_model, optimizers, scaler, *next_batch(first), precision, device)
            first += 1
            if scaler.get_scale() >= scale:
                break
        synchronize(device)
        start = time.perf_counter()
        for step in range(first, first + steps):
            loss = training_step(step_model, optimizers, scaler, *next_batch(step), precision, device)
        synchronize(device)
        seconds = time.perf_counter() - start

    tokens_per_second = steps * batch_size * cfg["context_length"] / seconds
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "batch_size": batch_size,
        "precision": precision,
        "tokens_per_second": tokens_per_second,
        "peak_memory_bytes": peak_memory,
        "mfu": gpt.mfu(tokens_per_second, cfg, gpt.gpu_peak_flops(device)),
        "seconds_per_step": seconds / steps,
        "last_loss": loss.item(),
    }


def sweep(cfg, precisions, batch_sizes, device, steps, warmup_steps, data_dir, compile_model):
    """Every (precision, batch size) in order; returns (rows, limits, notes).

    limits: one entry per mode whose sweep an out-of-memory error ended, naming the batch size
    that failed and the largest that fitted (None if even the first failed).
    """
    rows, limits, notes = [], [], []
    runnable = []
    for precision in precisions:
        reason = unsupported_reason(precision, device)
        if reason:
            notes.append(f"{reason}: skipped")
        else:
            runnable.append(precision)
    bar = tqdm(total=len(runnable) * len(batch_sizes), desc="settings", unit="setting")
    for precision in runnable:
        largest = None
        for i, batch_size in enumerate(batch_sizes):
            bar.set_postfix_str(f"{precision} batch {batch_size}")
            row, oom_error = None, None
            try:
                row = measure_training(cfg, batch_size, precision, device, steps, warmup_steps, data_dir,
                                       compile_model)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                oom_error = str(exc).strip().splitlines()[0]
            # Outside the except block the traceback (and the tensors its frames hold) is gone,
            # so this frees what the failed setting allocated before the next mode runs.
            free_memory(device, compile_model)
            if row is None:
                limits.append({"precision": precision, "out_of_memory_batch_size": batch_size,
                               "largest_batch_size": largest, "error": oom_error})
                bar.update(len(batch_sizes) - i)
                break
            rows.append(row)
            largest = batch_size
            bar.update(1)
    bar.close()
    return rows, limits, notes


def parse_batch_sizes(batch_sizes, max_batch_size):
    if batch_sizes is None:
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be at least 1, not {max_batch_size}")
        return [2 ** i for i in range(int(math.log2(max_batch_size)) + 1)]
    try:
        sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers like 1,2,4, not {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes needs positive integers, got {batch_sizes!r}")
    return sizes


def parse_precisions(precisions):
    names = [p.strip() for p in precisions.split(",") if p.strip()]
    unknown = [p for p in names if p not in ALL_PRECISIONS]
    if not names:
        raise ValueError(f"--precision names no mode; choose from {','.join(ALL_PRECISIONS)}")
    if unknown:
        raise ValueError(f"unknown precision {', '.join(unknown)}; choose from {','.join(ALL_PRECISIONS)}")
    return names


def format_duration(seconds):
    hours = seconds / 3600
    return f"{hours:,.2f} h ({hours / 24:,.2f} days)"


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


def best_setting(rows, train_tokens):
    best = max(rows, key=lambda r: r["tokens_per_second"])
    return {**best, "train_tokens": train_tokens, "train_seconds": train_tokens / best["tokens_per_second"]}


def write_json(path, report):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpointing.write_json_atomic(path, report)  # a reader never sees half a file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=MODEL, choices=list(gpt.PRESETS), help="model preset")
    parser.add_argument("--context-length", type=int, default=CONTEXT_LENGTH,
                        help="tokens per sequence; None: the preset's")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--batch-sizes", default=BATCH_SIZES,
                       help="comma-separated batch sizes to try in order, e.g. 1,2,4")
    sizes.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                       help="try 1, 2, 4, ... doubling up to this")
    parser.add_argument("--precision", default=PRECISIONS, help=f"comma-separated modes from {','.join(ALL_PRECISIONS)}")
    parser.add_argument("--compile", action="store_true", default=COMPILE, help="torch.compile the model")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed optimizer steps per setting")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="untimed steps before timing")
    parser.add_argument("--data", default=None, help="prepared dataset dir: real train batches; None: random tokens")
    parser.add_argument("--device", default=DEVICE, help="cuda, cuda:N, cpu, or auto")
    parser.add_argument("--train-tokens", type=int, default=TRAIN_TOKENS, help="tokens in the run to estimate")
    parser.add_argument("--json", default=None, help="write the rows and the best setting to this JSON file")
    args = parser.parse_args(argv)

    try:
        batch_sizes = parse_batch_sizes(args.batch_sizes, args.max_batch_size)
        precisions = parse_precisions(args.precision)
        cfg = gpt.model_config(args.model, context_length=args.context_length)
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps < 1 or args.warmup_steps < 0 or cfg["context_length"] < 1:
        parser.error("--steps and --context-length must be at least 1, --warmup-steps at least 0")
    if args.data is not None:
        try:
            num_sequences = data.TokenStream(args.data, "train").num_sequences(cfg["context_length"])
        except data.DatasetError as exc:
            raise SystemExit(f"error: {exc}") from None
        if num_sequences < max(batch_sizes):
            raise SystemExit(f"error: the train split of {args.data} holds {num_sequences:,} sequences of "
                             f"{cfg['context_length']} tokens, fewer than batch size {max(batch_sizes)}; "
                             "ask for smaller --batch-sizes")
    device = resolve_device(args.device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} at context {cfg['context_length']} on {name} ({device}), torch {torch.__version__}; "
          f"{args.steps} timed steps after {args.warmup_steps} warm-up; "
          f"{'real tokens from ' + args.data if args.data else 'random tokens'}"
          f"{'; torch.compile' if args.compile else ''}")
    try:
        rows, limits, notes = sweep(cfg, precisions, batch_sizes, device, args.steps, args.warmup_steps,
                                    args.data, args.compile)
    except data.DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None

    for note in notes:
        print(f"note: {note}")
    print(format_table(rows, limits, precisions))
    if device.type == "cuda" and gpt.gpu_peak_flops(device) is None:
        print(f"note: no peak FLOP/s for {name} in gpt.GPU_PEAK_TFLOPS, so no MFU")
    report = {"model": args.model, "context_length": cfg["context_length"], "device": name,
              "torch": torch.__version__, "compile": args.compile, "data": args.data,
              "rows": rows, "limits": limits, "notes": notes, "best": None}
    if rows:
        best = report["best"] = best_setting(rows, args.train_tokens)
        print(f"best: {best['precision']} at batch size {best['batch_size']}: {best['tokens_per_second']:,.0f} tokens/s "
              f"-> the default train ({args.train_tokens:,} tokens) would take {format_duration(best['train_seconds'])}")
    else:
        print("no setting fitted: try a smaller --batch-sizes, --context-length or model")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
