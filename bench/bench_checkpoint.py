"""Benchmark checkpoint save and load for a gpt2-small training run (weights + AdamW state).

    .venv/bin/python bench/bench_checkpoint.py                 # prints the numbers and records them
    .venv/bin/python bench/bench_checkpoint.py --dir /mnt/nvme/tmp --repeats 5 --no-record

What is timed is exactly what train.py does, on the CPU, for the book's GPT-2 small (163M parameters,
untied head) with AdamW's two moments filled in by one step:
  save  ckpt.training_state + checkpointing.save_checkpoint (safetensors + JSON, temp folder, fsync,
        rename) + moving the `latest` pointer;
  load  for --resume: checkpointing.check_headers, then the weights into the model and
        ckpt.restore_training_state (optimizer, scaler, RNG), read cold: the files' pages are dropped
        from the page cache first (posix_fadvise DONTNEED on just those files);
  load_model  the weights alone into a fresh model (what evaluate.py does), cold too.
Reference: Giles Thomas's torch.save/torch.load checkpoints took about 1 s each on an NVMe disk.
Results go to bench/RESULTS.md under "## Checkpoint save/load".
"""

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.results import RESULTS, machine, record  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import checkpointing as ckpt  # noqa: E402
import gpt  # noqa: E402
import optim  # noqa: E402
import reference  # noqa: E402

MODEL = "gpt2-small"
REPEATS = 3
SECTION = "## Checkpoint save/load"
SEED_SECONDS = 1.0  # the RTX 3090 run's save and load, each, on NVMe


def trained_state(model_name):
    """A model and its AdamW (the RTX 3090 run's settings) after one step, so both moments are filled."""
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.model_config(model_name))
    optimizers = optim.build_optimizers(model, reference.LR, reference.WEIGHT_DECAY)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, optimizers


def drop_from_page_cache(folder):
    """Evict just these files from the page cache, so the next read comes from the disk."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_save(run_dir, step, model, optimizers, scaler):
    start = time.perf_counter()
    tensors, doc = ckpt.training_state(optimizers, scaler, {"train_loss_sum": 0.0, "train_loss_steps": 0})
    folder = os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.STEP_DIR.format(step))
    ckpt.save_checkpoint(folder, model, {"step": step, "metrics": []}, tensors, doc)
    ckpt.set_pointer(run_dir, "latest", folder)
    return time.perf_counter() - start, folder


def time_resume_load(folder, model, optimizers, scaler):
    drop_from_page_cache(folder)
    start = time.perf_counter()
    meta = ckpt.check_headers(folder)
    model.load_state_dict(load_file(os.path.join(folder, ckpt.MODEL_FILE)))
    ckpt.restore_training_state(folder, meta, optimizers, scaler)
    return time.perf_counter() - start


def time_load_model(folder):
    drop_from_page_cache(folder)
    start = time.perf_counter()
    ckpt.load_model(folder)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=list(gpt.PRESETS), default=MODEL, help="model preset")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="saves and loads timed (median reported)")
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: the system temp dir)")
    parser.add_argument("--disk", default="unknown disk", help="what the disk under --dir is, for the record")
    parser.add_argument("--no-record", action="store_true", help=f"print only; do not append to {RESULTS}")
    args = parser.parse_args(argv)

    print(f"building {args.model} and one AdamW step ...")
    model, optimizers = trained_state(args.model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    saves, loads, model_loads = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_checkpoint_") as run_dir:
        for i in range(args.repeats):
            seconds, folder = time_save(run_dir, i, model, optimizers, scaler)
            saves.append(seconds)
            loads.append(time_resume_load(folder, model, optimizers, scaler))
            model_loads.append(time_load_model(folder))
            print(f"  repeat {i + 1}: save {saves[-1]:.2f} s, resume load {loads[-1]:.2f} s, "
                  f"load_model {model_loads[-1]:.2f} s")
        sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
        disk = os.path.realpath(run_dir)
    total_bytes = sum(sizes.values())
    save, load, load_model = (statistics.median(x) for x in (saves, loads, model_loads))
    lines = [
        f"- {datetime.date.today()}, {machine()}; disk: {args.disk} ({disk})",
        f"  command: `{shlex.join(['.venv/bin/python', 'bench/bench_checkpoint.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"  {args.model}: {gpt.count_parameters(model):,} parameters; checkpoint {total_bytes / 1e9:.2f} GB "
        f"({', '.join(f'{k} {v / 1e6:,.0f} MB' for k, v in sizes.items())})",
        f"  median of {args.repeats}: save {save:.2f} s ({total_bytes / save / 1e9:.2f} GB/s, fsynced), "
        f"resume load {load:.2f} s (cold), load_model {load_model:.2f} s (cold, weights only); "
        f"the RTX 3090 run: ~{SEED_SECONDS:.0f} s each on NVMe",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record("\n".join(lines), SECTION)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
