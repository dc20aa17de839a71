"""Activation memory per token, measured on the CPU: what the RTX 3090 path and ours keep for backward.

A training step's memory is the fixed part (weights, gradients, optimizer state, autocast's weight
copies) plus the tensors autograd saves for backward, which grow with the tokens in a micro-batch.
This counts the second exactly, with torch's saved-tensor hooks (every distinct storage once), for
a forward pass of gpt2-small at 1,024 tokens at batch 1 and batch 2: the difference is one sequence's
activations, free of anything that does not grow with the batch. Then it estimates the largest
micro-batch that could fit on a 24 GB and an 80 GB card: an upper bound, since backward's temporary
buffers (largest for the book's tokens x tokens attention scores) come on top. Eager mode; it needs
no GPU.

    python bench/activation_memory.py            # ~1 minute on 2 cores; appends to bench/RESULTS.md
    python bench/activation_memory.py --model tiny --no-record
"""

import argparse
import datetime
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.results import machine, record  # noqa: E402

import gpt  # noqa: E402

SECTION = "## Activation memory per token (CPU-measured)"
CARDS_GIB = {"24 GB card (RTX 3090/4090)": 24, "80 GB card (A100/H100)": 80}
RESERVED_GIB = 1.5   # CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack (an estimate)


def saved_bytes(model, batch_size, context_length, dtype):
    """Bytes of the distinct storages autograd saves in one forward pass with the loss (autocast)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, model.cfg["vocab_size"], (batch_size, context_length + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=dtype):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    del loss
    return sum(storages.values())


def per_token_bytes(model, context_length, dtype):
    one, two = saved_bytes(model, 1, context_length, dtype), saved_bytes(model, 2, context_length, dtype)
    return (two - one) / context_length


def fixed_bytes(model):
    """fp32 weights + fp32 gradients + AdamW's two fp32 moments + the 16-bit copies autocast makes."""
    n = sum(p.numel() for p in model.parameters())
    return n * (4 + 4 + 8 + 2)


def largest_batch(card_gib, fixed, per_token, context_length):
    free = card_gib * 10**9 - fixed - RESERVED_GIB * 2**30
    return max(0, int(free // (per_token * context_length)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=list(gpt.PRESETS))
    parser.add_argument("--context-length", type=int, default=None, help="default: the preset's")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)

    rows = []
    paths = [("RTX 3090 path", "book attention, fp16 autocast, dropout 0.1", torch.float16, 0.1, gpt.book_attention_model),
             ("ours", "SDPA (flash-style kernel), bf16 autocast, dropout 0, loss in forward", torch.bfloat16, 0.0,
              gpt.GPTModel)]
    for name, what, dtype, drop_rate, build in paths:
        cfg = gpt.model_config(args.model, context_length=args.context_length, drop_rate=drop_rate)
        torch.manual_seed(0)
        model = build(cfg).train()
        T = cfg["context_length"]
        per_token = per_token_bytes(model, T, dtype)
        fixed = fixed_bytes(model)
        fits = {card: largest_batch(gib, fixed, per_token, T) for card, gib in CARDS_GIB.items()}
        rows.append((name, what, per_token, fixed, fits))
        print(f"{name}: {per_token / 1024:,.1f} KiB saved for backward per token; fixed {fixed / 2**30:.2f} GiB; "
              + "; ".join(f"{card}: ~{b} x {T}" for card, b in fits.items()), flush=True)

    lines = [f"### {datetime.date.today().isoformat()} · {machine()}", "",
             f"`python bench/activation_memory.py{' --model ' + args.model if args.model != 'gpt2-small' else ''}`", "",
             "| path | what | saved for backward per token (measured) | fixed: weights, grads, AdamW, autocast copies | "
             + " | ".join(f"largest micro-batch, {card} (estimated)" for card in CARDS_GIB) + " |",
             "|---|---|---|---|" + "---|" * len(CARDS_GIB)]
    for name, what, per_token, fixed, fits in rows:
        lines.append(f"| {name} | {what} | {per_token / 1024:,.1f} KiB | {fixed / 2**30:.2f} GiB | "
                     + " | ".join(str(b) for b in fits.values()) + " |")
    ratio = rows[0][2] / rows[1][2]
    lines += ["", f"The RTX 3090 path keeps {ratio:.1f}x the activations per token. Estimates: card memory minus the "
                  f"fixed part minus {RESERVED_GIB} GiB reserved, over one sequence's saved activations. They are upper "
                  "bounds: backward's temporary buffers come on top (the RTX 3090 run fit 6 sequences in fp16 on its "
                  "24 GB card, measured by Giles Thomas)."]
    print("\n".join(lines))
    if not args.no_record:
        record("\n".join(lines), SECTION, intro=__doc__.split("\n\n")[1])
    return rows


if __name__ == "__main__":
    main()
