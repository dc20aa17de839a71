"""Tokens/s of train.py's step under DDP: one JSON line per optimizer setting, printed by rank 0.

    torchrun --nproc_per_node 8 bench/distributed.py --seconds 10

training.time_training on random tokens with AdamW, Muon (sharded) and AdamW with ZeRO-1, on every
rank. bench/gpu_check.py --gpus N runs it on 1 GPU and on N and reports the scaling; without CUDA the
processes train on the CPU over gloo (its --smoke test).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import STEP_TIMING  # noqa: E402

import gpt  # noqa: E402
import training  # noqa: E402

SETTINGS = {"AdamW": {"optimizer": "adamw"}, "Muon, sharded": {"optimizer": "muon", "shard_muon": True},
            "AdamW, ZeRO-1": {"optimizer": "adamw", "zero1": True}}
PRINTED = ("world_size", "batch_size", "tokens_per_second", "mfu", "seconds_per_step", "peak_memory_bytes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=list(gpt.PRESETS), default="gpt2-small")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per GPU per step")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per setting")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_cuda else "gloo")
    cfg = gpt.model_config(args.model, context_length=args.context_length, drop_rate=0.0, init="gpt2")
    for name, kwargs in SETTINGS.items():
        row = training.time_training(cfg, args.batch_size, "bf16" if on_cuda else "fp32", device, fused=on_cuda,
                                     compile=on_cuda, grad_clip=1.0, decay_matrices_only=True,
                                     min_seconds=args.seconds, **{**STEP_TIMING, **kwargs})
        if on_cuda:
            torch.compiler.reset()
        if dist.get_rank() == 0:
            print(json.dumps({"setting": name, **{k: row[k] for k in PRINTED}}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
