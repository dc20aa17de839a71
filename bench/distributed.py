"""Several processes: the optimizer step per rank, sharded or not (CPU, gloo), and DDP training speed (GPUs).

    python bench/distributed.py optimizer --processes 1 2 4       # CPU: Muon and AdamW steps, sharded vs not
    torchrun --nproc_per_node 8 bench/distributed.py throughput   # GPUs: tokens/s of train.py's step under DDP

optimizer: each process holds the same model and the same gradients (as DDP leaves them) and takes
the optimizer step, timed per rank; a step lasts as long as its slowest rank. Muon (the blocks'
matrices) unsharded, where every rank runs Newton-Schulz on all of them, against sharded, where each
runs 1/N and all_gather swaps the results; AdamW (the rest) against ZeRO-1, where each rank steps and
keeps the moments of 1/N of the parameters and broadcasts them. On one CPU the ranks share its cores
(each gets cores / N threads), so this shows how the work divides, not a GPU's time.

throughput: training.time_training under DDP on random tokens, for AdamW, Muon (sharded), and AdamW
with ZeRO-1; run it with --nproc_per_node 1 and N for the scaling (bench/gpu_check.py --gpus N does both).
"""

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.results import RESULTS, machine, record  # noqa: E402

import gpt  # noqa: E402
import optim  # noqa: E402
import training  # noqa: E402

SECTION = "## Distributed optimizer step (CPU, gloo)"
MODEL = ["gpt2-small", 4]      # preset and layers: gpt2-small's matrices, 4 blocks so the CPU finishes
STEPS = 5                      # timed optimizer steps per setting, after one untimed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_steps(optimizer, steps):
    """Seconds of each step on the slowest rank (a barrier before each, so all start together)."""
    optimizer.step()
    times = []
    for _ in range(steps):
        dist.barrier()
        begin = time.perf_counter()
        optimizer.step()
        elapsed = torch.tensor(time.perf_counter() - begin)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return times


def optimizer_worker(rank, world, port, cfg, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    model = gpt.GPTModel(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3  # the same on every rank, as after DDP's all-reduce
    rows = []
    for name, kwargs in (("Muon, unsharded", {"optimizer": "muon", "shard_muon": False}),
                         ("Muon, sharded", {"optimizer": "muon", "shard_muon": True}),
                         ("AdamW, unsharded", {"optimizer": "adamw", "zero1": False}),
                         ("AdamW, ZeRO-1", {"optimizer": "adamw", "zero1": True})):
        optimizers = optim.build_optimizers(model, 1e-3, 0.1, **kwargs)
        optimizer = optimizers[-1] if kwargs["optimizer"] == "muon" else optimizers[0]
        times = timed_steps(optimizer, steps)
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        state_max = torch.tensor(float(state))
        dist.all_reduce(state_max, op=dist.ReduceOp.MAX)
        rows.append((name, statistics.median(times), state_max.item()))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def cmd_optimizer(args):
    cfg = gpt.model_config(args.model, n_layers=args.n_layers)
    matrices = sum(1 for n, p in gpt.GPTModel(cfg).named_parameters() if p.dim() == 2 and n.startswith("trf_blocks."))
    lines = [f"{args.model} with {args.n_layers} blocks ({matrices} Muon matrices), median of {args.steps} steps, "
             "time of the slowest rank:", "",
             "| processes | optimizer | step (ms) | x 1 process | state per rank (MiB) |", "|---|---|---|---|---|"]
    single = {}
    context = mp.get_context("spawn")
    for world in args.processes:
        out = context.Queue()
        mp.start_processes(optimizer_worker, args=(world, free_port(), cfg, args.steps, out), nprocs=world,
                           start_method="spawn")
        for name, seconds, state in out.get():
            single.setdefault(name, seconds)
            lines.append(f"| {world} | {name} | {1000 * seconds:,.0f} | {seconds / single[name]:.2f} | "
                         f"{state / 2**20:,.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.results:
        command = "python bench/distributed.py optimizer " + " ".join(sys.argv[2:])
        record(f"### {datetime.date.today().isoformat()} · {machine()}\n\n`{command}`\n\n{text}\n", SECTION,
               path=args.results)
        print(f"appended to {args.results}")


def cmd_throughput(args):
    """Under torchrun: one row per optimizer setting, printed by rank 0 (as JSON lines for gpu_check)."""
    import json
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = gpt.model_config(args.model, context_length=args.context_length, drop_rate=0.0, init="gpt2")
    on_cuda = device.type == "cuda"
    for name, kwargs in (("AdamW", {"optimizer": "adamw"}), ("Muon, sharded", {"optimizer": "muon", "shard_muon": True}),
                         ("AdamW, ZeRO-1", {"optimizer": "adamw", "zero1": True})):
        row = training.time_training(cfg, args.batch_size, "bf16" if on_cuda else "fp32", device, fused=on_cuda,
                                     compile=on_cuda, grad_clip=1.0, decay_matrices_only=True,
                                     min_seconds=args.seconds, **kwargs)
        if on_cuda:
            torch.compiler.reset()
        if dist.get_rank() == 0:
            print(json.dumps({"setting": name, **{k: row[k] for k in ("world_size", "batch_size", "tokens_per_second",
                                                                       "mfu", "seconds_per_step", "peak_memory_bytes")}}),
                  flush=True)
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimizer", help="the optimizer step per rank, sharded vs not (CPU, gloo)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="process counts (the first is the baseline)")
    p.add_argument("--model", choices=list(gpt.PRESETS), default=MODEL[0])
    p.add_argument("--n-layers", type=int, default=MODEL[1])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--results", help=f"append the table here (e.g. {os.path.relpath(RESULTS, REPO)})")
    p.set_defaults(func=cmd_optimizer)
    p = sub.add_parser("throughput", help="under torchrun: tokens/s of the training step under DDP")
    p.add_argument("--model", choices=list(gpt.PRESETS), default="gpt2-small")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per GPU per step")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per setting")
    p.set_defaults(func=cmd_throughput)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
