"""GPU benchmark: the seed's training path against ours, side by side in one process.

Trains a fresh gpt2-small at context 1,024 for a few timed steps two ways and prints tokens/s, MFU
and peak memory for each, and their ratio:
  (a) the seed's path: the book's MultiHeadAttention (explicit QK^T, causal-mask buffer, softmax,
      dropout on the weights), fp16 autocast + GradScaler, TF32, plain (for-each) AdamW, no compile,
      at the seed's batch of 6 sequences;
  (b) our path: scaled_dot_product_attention (flash kernels, which also free the memory for a
      bigger batch: 16), bf16 autocast without a scaler, TF32, fused AdamW, torch.compile;
  (c) with --data: path (b) again, reading real train batches from the memory-mapped shards each
      step (pinned, non-blocking copies), to show what the data path costs against (b)'s synthetic batch.
Both paths start from the same weights; the result, with GPU name, driver, torch version and date,
is appended to bench/RESULTS.md under "## GPU throughput: seed path vs ours".

    python bench/gpu_bench.py                                   # the headline numbers
    python bench/gpu_bench.py --data datasets/fineweb           # ... and the real data path (c)
    python bench/gpu_bench.py --device cpu --model tiny --seed-batch-size 2 --batch-size 2 --steps 2   # smoke test, no GPU

Targets (measured here, never asserted in tests): on an H100, (b) >= 45% MFU (about 500k tokens/s)
and >= 3x (a); on a 24 GB card, (b) >= 1.5x (a). The seed measured (a) at 19,921 tokens/s on an RTX 3090.
"""

import argparse
import datetime
import os
import shlex
import subprocess
import sys

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the shared modules live at the top level, one folder up
from bench.results import RESULTS, record  # noqa: E402

import gpt  # noqa: E402
import measure_tokens_per_second as mtps  # noqa: E402

MODEL = "gpt2-small"
CONTEXT_LENGTH = None            # None: the preset's (1,024 for gpt2-small)
SEED_BATCH_SIZE = 6              # path (a): the seed's batch (train.py's BATCH_SIZE)
BATCH_SIZE = 16                  # path (b); either is halved if it runs out of memory (reported)
STEPS = 20                       # timed optimizer steps per path
WARMUP_STEPS = 5                 # untimed: torch.compile compiles during the first
DEVICE = "cuda"
SECTION = "## GPU throughput: seed path vs ours"
SEED_RTX3090_TOKENS_PER_SECOND = 19_921  # the seed's run, path (a), RTX 3090

SEED_PATH = {"name": "(a) seed", "attention": "book", "precision": "fp16", "fused": False, "compile": False,
             "batch_flag": "seed_batch_size"}
OUR_PATH = {"name": "(b) ours", "attention": "sdpa", "precision": "bf16", "fused": True, "compile": True,
            "batch_flag": "batch_size"}


class BookMultiHeadAttention(nn.Module):
    """The book's causal multi-head attention, as the seed trained it: scores as an explicit
    (tokens x tokens) matrix per head, masked with a stored upper-triangular buffer, softmax, dropout."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x, kv_cache=None):
        if kv_cache is not None:
            raise ValueError("the book's attention has no KV cache")
        b, num_tokens, _ = x.shape
        heads = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries, keys, values = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


def use_book_attention(model):
    """Swap every block's attention for the book's, keeping its weights; returns the model."""
    cfg = model.cfg
    for block in model.trf_blocks:
        book = BookMultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg["qkv_bias"]).to(block.att.out_proj.weight.device)
        missing, unexpected = book.load_state_dict(block.att.state_dict(), strict=False)
        assert missing == ["mask"] and not unexpected, (missing, unexpected)
        block.att = book
    return model


def describe(path, device):
    """What a path does, in words, as it actually ran on this device."""
    if "what" in path:
        return path["what"]
    parts = [{"book": "book attention", "sdpa": "SDPA flash attention"}[path["attention"]],
             {"fp16": "fp16 + GradScaler", "bf16": "bf16 autocast", "fp32": "fp32"}[path["precision"]]]
    if device.type == "cuda":
        parts.append("TF32")
    parts.append("fused AdamW" if path["fused"] else "AdamW")
    if path["compile"]:
        parts.append("torch.compile")
    return ", ".join(parts)


def build_model(path):
    """The model-building function measure_training calls for a path."""
    if path["attention"] == "book":
        return lambda cfg: use_book_attention(gpt.GPTModel(cfg))
    return gpt.GPTModel


def path_for_device(path, device, compile_on_cpu):
    """On CPU (a smoke test) fp16 and compile do not apply: fp16 becomes fp32, compile needs --compile."""
    if device.type == "cuda":
        return path, None
    changes = {}
    if path["precision"] == "fp16":
        changes["precision"] = "fp32"
    if path["compile"] and not compile_on_cpu:
        changes["compile"] = False
    if not changes:
        return path, None
    note = f"{path['name']} on {device.type}: " + ", ".join(f"{k} {path[k]} -> {v}" for k, v in changes.items())
    return {**path, **changes}, note


def run_path(path, cfg, batch_size, device, steps, warmup_steps, data_dir=None):
    """measure_training for one path, halving the batch size until it fits; returns the row."""
    while True:
        row, out_of_memory = None, False
        try:
            row = mtps.measure_training(cfg, batch_size, path["precision"], device, steps, warmup_steps,
                                        data_dir=data_dir, compile_model=path["compile"], fused=path["fused"],
                                        build_model=build_model(path))
        except Exception as exc:
            if not mtps.is_out_of_memory(exc):
                raise
            out_of_memory = True
        mtps.free_memory(device, path["compile"])  # after the except block, so the failed attempt's tensors are gone
        if not out_of_memory:
            return {**row, "path": path["name"], "what": describe(path, device)}
        if batch_size == 1:
            raise SystemExit(f"error: {path['name']} runs out of memory even at batch size 1; "
                             "try a smaller --context-length or --model")
        print(f"note: {path['name']} ran out of memory at batch size {batch_size}; trying {batch_size // 2}")
        batch_size //= 2


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_description(device):
    if device.type != "cuda":
        return f"CPU smoke test (not a GPU figure) · torch {torch.__version__}"
    return (f"{torch.cuda.get_device_name(device)} · driver {driver_version()} · torch {torch.__version__} "
            f"(CUDA {torch.version.cuda})")


def format_row(row):
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
    memory = f"{row['peak_memory_bytes'] / 2**30:.2f} GiB" if row["peak_memory_bytes"] is not None else "-"
    return row["path"], row["what"], row["batch_size"], f"{row['tokens_per_second']:,.0f}", mfu, memory


def print_table(rows):
    print(f"{'path':12s} {'batch':>5s} {'tokens/s':>12s} {'MFU':>7s} {'peak memory':>12s}  what")
    for row in rows:
        name, what, batch, rate, mfu, memory = format_row(row)
        print(f"{name:12s} {batch:5d} {rate:>12s} {mfu:>7s} {memory:>12s}  {what}")


def results_entry(rows, summary, machine, command, today):
    lines = [f"### {today} · {machine}", "", f"`{command}`", "",
             "| path | what | batch | tokens/s | MFU | peak memory |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(x) for x in format_row(row)) + " |" for row in rows]
    return "\n".join(lines + ["", summary, ""]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=MODEL, choices=list(gpt.PRESETS), help="model preset")
    parser.add_argument("--context-length", type=int, default=CONTEXT_LENGTH,
                        help="tokens per sequence; None: the preset's")
    parser.add_argument("--seed-batch-size", type=int, default=SEED_BATCH_SIZE, help="sequences per step, path (a)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="sequences per step, paths (b) and (c)")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed optimizer steps per path")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="untimed steps first (compilation)")
    parser.add_argument("--data", default=None, help="prepared dataset dir: also time (c), path (b) on real batches")
    parser.add_argument("--device", default=DEVICE, help="cuda or cuda:N; cpu only for a smoke test")
    parser.add_argument("--compile", action="store_true", help="on cpu, still torch.compile path (b)")
    parser.add_argument("--results", default=None,
                        help=f"append the result here; None: {os.path.relpath(RESULTS, REPO)} on a GPU, "
                             "nowhere for a CPU smoke test")
    args = parser.parse_args(argv)

    if min(args.seed_batch_size, args.batch_size, args.steps, args.context_length or 1) < 1 or args.warmup_steps < 0:
        parser.error("--seed-batch-size, --batch-size and --steps must be at least 1, --warmup-steps at least 0")
    try:
        cfg = gpt.model_config(args.model, context_length=args.context_length)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here, and this benchmark measures GPU throughput; for a smoke "
                         "test run: python bench/gpu_bench.py --device cpu --model tiny --seed-batch-size 2 --batch-size 2 --steps 2")
    try:
        device = gpt.resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.data is not None:
        try:
            mtps.data.load_manifest(args.data)
        except mtps.data.DatasetError as exc:
            raise SystemExit(f"error: {exc}") from None

    machine = machine_description(device)
    print(f"{args.model} at context {cfg['context_length']}, batch {args.seed_batch_size} (a) and "
          f"{args.batch_size} (b), {args.steps} timed steps "
          f"after {args.warmup_steps} warm-up · {machine}")
    paths = []
    for path in (SEED_PATH, OUR_PATH):
        path, note = path_for_device(path, device, args.compile)
        if note:
            print(f"note: {note}")
        paths.append(path)

    rows = []
    for path in paths:
        print(f"timing {path['name']}: {describe(path, device)} ...", flush=True)
        rows.append(run_path(path, cfg, getattr(args, path["batch_flag"]), device, args.steps, args.warmup_steps))
    seed_row, our_row = rows
    if args.data is not None:
        print(f"timing (c): (b) on real batches from {args.data} ...", flush=True)
        try:
            real = run_path({**paths[1], "name": "(c) data", "what": f"(b) on real batches from {args.data}"},
                            cfg, our_row["batch_size"], device, args.steps, args.warmup_steps, args.data)
        except mtps.data.DatasetError as exc:
            raise SystemExit(f"error: {exc}") from None
        rows.append(real)

    speedup = our_row["tokens_per_second"] / seed_row["tokens_per_second"]
    summary = f"(b)/(a) = {speedup:.2f}x"
    if args.data is not None:
        summary += f"; (c)/(b), real batches against synthetic = {rows[2]['tokens_per_second'] / our_row['tokens_per_second']:.2f}"
    summary += f". The seed's (a) on an RTX 3090: {SEED_RTX3090_TOKENS_PER_SECOND:,} tokens/s."
    print_table(rows)
    print(summary)

    results = args.results or (RESULTS if device.type == "cuda" else None)
    if results:
        command = "python bench/gpu_bench.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        entry = results_entry(rows, summary, machine, command.strip(), datetime.date.today().isoformat())
        record(entry, SECTION, path=results)
        print(f"appended to {results}")
    return {"rows": rows, "speedup": speedup}


if __name__ == "__main__":
    main()
