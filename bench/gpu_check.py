"""The one-command GPU check: every CUDA path works, and how fast ours is against the RTX 3090 run's.

    python bench/gpu_check.py                        # on a GPU, ~10 minutes on one H100
    python bench/gpu_check.py --smoke --device cpu   # the same code paths on the CPU, a few minutes

(a) Paths. Short train.py runs on a small model and a dataset made here (Python's docs, no network),
    each checked against a reference:
      bf16 + compile + fused AdamW   the loss falls; two identical runs give the run-to-run spread
      resume                          4 steps + --resume + 4 steps ends within that spread of 8 straight
                                      steps (flash attention's backward is not bit-deterministic on GPU)
      fp16 + GradScaler               the RTX 3090 recipe (book-style fp16 training) runs and learns
      Muon (compiled Newton-Schulz)   runs and learns
      checkpoint on the device        loaded onto the GPU it gives the CPU copy's logits
      to-hf                           transformers loads the export and gives our logits (if installed)
      generation                      greedy text with the KV cache equals text without it
      attention kernel                which SDPA kernel ran (cuDNN, flash, ...), read from the profiler
      instruction fine-tune           finetune_instructions.py learns on made-up data; evaluate.py instruct answers
(b) Speed, gpt2-small at 1,024 tokens, in one process:
      RTX 3090 path   the book's attention (explicit QK^T, mask buffer, softmax), fp16 + GradScaler,
                      plain AdamW, no compile, batch 6 (Giles Thomas's run: 19,921 tokens/s on his 3090)
      ours            train.py --recipe modern's step: bf16, the compiled model+loss, fused AdamW,
                      clipping, at its --batch-size auto micro-batch; and the same with Muon
    tokens/s, MFU, peak memory and the largest micro-batch that fits, for each.
(c) With --gpus N (N > 1): train.py under torchrun on N GPUs (Muon sharded across them, AdamW's state
    sharded with --zero1) learns and resumes on 1 GPU; then bench/distributed.py throughput on 1 GPU and
    on N: tokens/s with AdamW, Muon and ZeRO-1, and the scaling (N GPUs' tokens/s over N x one GPU's;
    the target is 90%).
(d) The results are appended to bench/RESULTS.md with GPU, driver, torch, date and command.

On the CPU (--smoke) fp16 runs as fp32, nothing compiles unless --compile, the speed part uses the
tiny model, and nothing is written to RESULTS.md unless --results names a file. The exit status is
1 when any check failed.
"""

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the shared modules live at the top level, one folder up
from bench.results import RESULTS, record  # noqa: E402

import checkpointing  # noqa: E402
import gpt  # noqa: E402
import reference  # noqa: E402
import training  # noqa: E402

SECTION = "## GPU check"
SPEED_SECONDS = 10.0                 # timed seconds per speed row, after warm-up
STEPS = 8                            # per path run; resume splits it 4 + 4
# The path runs' model: on a GPU gpt2-small's width at 2 layers and 256 tokens (compiles in seconds);
# on the CPU the tiny preset.
GPU_CHECK_MODEL = ["--model", "gpt2-small", "--n-layers", "2", "--context-length", "256", "--batch-size", "8"]
CPU_CHECK_MODEL = ["--model", "tiny", "--context-length", "32", "--batch-size", "4"]


# --- (a) the paths ----------------------------------------------------------------------------------

class Checks:
    """Runs each check, catching its failure so the others still run; keeps (name, ok, detail)."""

    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        print(f"\n=== {name}", flush=True)
        start = time.time()
        try:
            ok, detail = fn()
        except Exception as exc:
            traceback.print_exc()
            ok, detail = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self.rows.append((name, ok, f"{detail} ({time.time() - start:.0f} s)"))
        print(f"--> {'ok' if ok else 'FAILED'}: {detail}", flush=True)


def run_script(*argv):
    """A stage script run as a user runs it (its own process); a failure raises with its last lines."""
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"{argv[0]} exited with {result.returncode}: {last}")
    return result.stdout


def make_dataset(folder):
    """300k train / 30k val tokens of Python's documentation, prepared as train.py reads them."""
    parquet = os.path.join(folder, "sample.parquet")
    run_script("sample_text.py", parquet, "--max-chars", "2000000")
    out = os.path.join(folder, "data")
    run_script("prepare_datasets.py", "--input", parquet, "--output", out, "--train-tokens", "300000",
               "--val-tokens", "30000", "--val-fraction", "0.1", "--shard-tokens", "100000")
    return out


def final_weights(run):
    return checkpointing.load_tensors(checkpointing.resolve_checkpoint(run, "latest"), checkpointing.MODEL_FILE)


@torch.no_grad()
def relative_difference(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def val_losses(run):
    with open(os.path.join(run, checkpointing.METRICS_FILE)) as f:
        return [json.loads(line)["val_loss"] for line in f]


def path_checks(checks, work, device, smoke, compile_on_cpu):
    dataset = make_dataset(work)
    on_cuda = device.type == "cuda"
    compile_flag = "true" if (on_cuda or compile_on_cpu) else "false"
    common = ["--data", dataset, *(CPU_CHECK_MODEL if smoke else GPU_CHECK_MODEL), "--val-batches", "2",
              "--device", str(device), "--lr", "1e-3", "--val-every", "4", "--log-every", "4", "--seed", "1"]
    fast = ["--precision", "bf16", "--compile", compile_flag, "--fused", "true" if on_cuda else "false",
            "--drop-rate", "0"]
    run = lambda name, *extra: run_script("train.py", "--run-dir", os.path.join(work, name), *common, *extra)

    def learns(name):
        losses = val_losses(os.path.join(work, name))
        return losses[-1] < losses[0] and all(math.isfinite(x) for x in losses), \
            f"val loss {losses[0]:.3f} -> {losses[-1]:.3f}"

    def straight():
        run("straight-1", *fast, "--max-steps", str(STEPS))
        run("straight-2", *fast, "--max-steps", str(STEPS))
        ok, detail = learns("straight-1")
        spread = max_difference(final_weights(os.path.join(work, "straight-1")),
                                final_weights(os.path.join(work, "straight-2")))
        checks.spread = spread
        return ok, f"{detail}; two identical runs differ by at most {spread:.2e} in any weight"

    def resume():
        run("resumed", *fast, "--max-steps", str(STEPS // 2))
        run("resumed", *fast, "--max-steps", str(STEPS), "--resume", "latest")
        diff = max_difference(final_weights(os.path.join(work, "resumed")), final_weights(os.path.join(work, "straight-1")))
        spread = getattr(checks, "spread", 0.0)
        return diff <= 3 * spread or diff == 0, f"{STEPS // 2} + {STEPS // 2} steps vs {STEPS} straight: {diff:.2e} " \
                                                f"(run-to-run spread {spread:.2e})"

    def fp16():
        run("fp16", "--recipe", "rtx3090", "--precision", "fp16", "--compile", "false", "--fused", "false",
            "--max-steps", str(STEPS))
        ok, detail = learns("fp16")
        meta = checkpointing.read_meta(checkpointing.resolve_checkpoint(os.path.join(work, "fp16"), "latest"))
        scale = (meta["train_state"].get("scaler") or {}).get("scale")
        ran = "fp16 + GradScaler" if on_cuda else "fp32 (fp16 is a CUDA mode)"
        return ok and (scale is not None or not on_cuda), f"{ran}; {detail}; loss scale {scale}"

    def muon():
        run("muon", *fast, "--optimizer", "muon", "--max-steps", str(STEPS))
        ok, detail = learns("muon")
        return ok, f"{detail}; Newton-Schulz {'compiled' if compile_flag == 'true' else 'eager'}"

    def checkpoint_on_device():
        on_device, _ = checkpointing.load_model(os.path.join(work, "straight-1"), device, "latest")
        on_cpu, _ = checkpointing.load_model(os.path.join(work, "straight-1"), "cpu", "latest")
        training.Precision("fp32", device).apply()
        tokens = torch.randint(0, 50257, (2, 32))
        error = relative_difference(on_device(tokens.to(device)).cpu(), on_cpu(tokens))
        return error < 1e-4, f"logits on {device} vs cpu: max relative difference {error:.1e}"

    def to_hf():
        try:
            import transformers
        except ImportError:
            return True, "skipped: transformers is not installed here"
        out = os.path.join(work, "hf")
        run_script("checkpointing.py", "to-hf", os.path.join(work, "straight-1"), out, "--which", "latest")
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).to(device).eval()
        ours, _ = checkpointing.load_model(os.path.join(work, "straight-1"), device, "latest")
        tokens = torch.randint(0, 50257, (2, 32), device=device)
        error = relative_difference(hf(tokens).logits, ours(tokens))
        return error < 1e-4, f"transformers' logits vs ours: max relative difference {error:.1e}"

    def generation():
        model, _ = checkpointing.load_model(os.path.join(work, "straight-1"), device, "latest")
        prompt = torch.tensor([gpt.get_tokenizer().encode("Every effort moves you")], device=device)
        context = model.cfg["context_length"]
        with_cache = gpt.generate(model, prompt, 40, context, use_cache=True)
        without = gpt.generate(model, prompt, 40, context, use_cache=False)
        same = torch.equal(with_cache, without)
        return same, f"40 greedy tokens, KV cache {'equals' if same else 'differs from'} full recompute"

    def attention_kernel():
        cfg = gpt.model_config("tiny" if smoke else "gpt2-small", context_length=32 if smoke else 256, drop_rate=0.0)
        model = gpt.GPTModel(cfg).to(device)
        tokens = torch.randint(0, 50257, (2, cfg["context_length"] + 1), device=device)
        precision = training.Precision("bf16", device).apply()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
        with torch.profiler.profile(activities=activities) as prof, training.attention_context(device):
            with precision.autocast():
                loss = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss.backward()
        names = {e.name for e in prof.events()}
        prefixes = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
                    "aten::_cudnn_attention")
        ops = sorted(n for n in names if n.startswith(prefixes) and "backward" not in n)
        checks.attention = ", ".join(ops[:4]) or "unknown"
        return bool(ops), checks.attention

    checks.run("bf16 + compile + fused AdamW (twice)", straight)
    checks.run("resume", resume)
    checks.run("fp16 + GradScaler", fp16)
    checks.run("Muon", muon)
    checks.run("checkpoint loaded on the device", checkpoint_on_device)
    checks.run("to-hf", to_hf)
    checks.run("generation with and without the KV cache", generation)
    def instruction_fine_tune():
        # 40 made-up examples in the book's format; fp16 + GradScaler on CUDA, as finetune_instructions.py runs.
        data = os.path.join(work, "instructions.json")
        words = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window"]
        with open(data, "w") as f:
            json.dump([{"instruction": "Write the word in capital letters.", "input": words[i % 8],
                        "output": words[i % 8].upper()} for i in range(40)], f)
        out = os.path.join(work, "instruct")
        run_script("finetune_instructions.py", "--checkpoint", os.path.join(work, "straight-1"), "--which", "latest",
                   "--data", data, "--run-dir", out, "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                   "--device", str(device))
        rows = [json.loads(line) for line in open(os.path.join(out, checkpointing.METRICS_FILE))]
        losses = [r["val_loss"] for r in rows if r["val_loss"] is not None]
        answers = os.path.join(work, "answers.jsonl")
        run_script("evaluate.py", "instruct", "--run-dir", out, "--data", data, "--out", answers,
                   "--max-new-tokens", "8", "--device", str(device))
        count = sum(1 for _ in open(answers))
        return losses[-1] < losses[0] and count == 4, f"val loss {losses[0]:.3f} -> {losses[-1]:.3f}; {count} answers"

    checks.run("attention kernel", attention_kernel)
    checks.run("instruction fine-tune and answers", instruction_fine_tune)


# --- (c) several GPUs ---------------------------------------------------------------------------------

def torchrun(processes, *argv):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *argv)


def multi_gpu_checks(checks, work, device, smoke, gpus, seconds):
    """train.py on `gpus` processes learns and resumes on one; the throughput of 1 and of `gpus` GPUs."""
    dataset = os.path.join(work, "data") if os.path.isdir(os.path.join(work, "data")) else make_dataset(work)
    on_cuda = device.type == "cuda"
    common = ["--data", dataset, *(CPU_CHECK_MODEL if smoke else GPU_CHECK_MODEL), "--val-batches", "2",
              "--device", "cuda" if on_cuda else "cpu", "--lr", "1e-3", "--val-every", "4", "--log-every", "4",
              "--precision", "bf16", "--compile", "true" if on_cuda else "false", "--optimizer", "muon", "--zero1",
              "--drop-rate", "0"]
    batch = int(common[common.index("--batch-size") + 1])
    common += ["--tokens-per-step", str(gpus * batch * int(common[common.index("--context-length") + 1]))]
    run_dir = os.path.join(work, f"ddp-{gpus}")

    def learns_and_resumes():
        torchrun(gpus, "train.py", "--run-dir", run_dir, *common, "--max-steps", str(STEPS))
        losses = val_losses(run_dir)
        run_script("train.py", "--run-dir", run_dir, *common[:common.index("--tokens-per-step")],
                   "--max-steps", str(STEPS + 4), "--resume", "latest")
        after = val_losses(run_dir)[-1]
        ok = losses[-1] < losses[0] and math.isfinite(after)
        return ok, f"{gpus} processes: val loss {losses[0]:.3f} -> {losses[-1]:.3f}; resumed on 1: {after:.3f} " \
                   f"after {STEPS + 4} steps"

    rows = []

    def scaling():
        size = ["--model", "tiny", "--context-length", "32", "--batch-size", "4"] if smoke else []
        measured = {}
        for n in (1, gpus):
            out = torchrun(n, "bench/distributed.py", "throughput", "--seconds", str(seconds), *size)
            measured[n] = {r["setting"]: r for r in map(json.loads, (l for l in out.splitlines() if l.startswith("{")))}
        parts = []
        for setting, one in measured[1].items():
            many = measured[gpus][setting]
            efficiency = many["tokens_per_second"] / (gpus * one["tokens_per_second"])
            rows.append({"setting": setting, "one": one["tokens_per_second"], "many": many["tokens_per_second"],
                         "gpus": gpus, "efficiency": efficiency})
            parts.append(f"{setting} {100 * efficiency:.0f}%")
        worst = min(r["efficiency"] for r in rows)
        return worst >= 0.9 or not on_cuda, f"{gpus} GPUs / ({gpus} x 1 GPU): " + ", ".join(parts) + \
            ("" if on_cuda else " (CPU processes sharing cores: not a GPU figure)")

    checks.run(f"train.py on {gpus} processes (sharded Muon, ZeRO-1), resumed on 1", learns_and_resumes)
    checks.run(f"scaling, 1 -> {gpus} GPUs", scaling)
    return rows


def format_scaling(rows):
    if not rows:
        return []
    lines = ["| setting | 1 GPU tokens/s | N GPUs tokens/s | N | scaling |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['one']:,.0f} | {r['many']:,.0f} | {r['gpus']} | {100 * r['efficiency']:.0f}% |"
              for r in rows]
    return lines


# --- (b) speed --------------------------------------------------------------------------------------

def speed_rows(checks, device, smoke, compile_on_cpu, seconds):
    """The RTX 3090 path and ours (AdamW, Muon): tokens/s, MFU, peak memory, largest micro-batch."""
    on_cuda = device.type == "cuda"
    cfg_name, context = ("tiny", 32) if smoke else ("gpt2-small", 1024)
    rtx_cfg = gpt.model_config(cfg_name, context_length=context)                 # dropout 0.1, the book's
    modern_cfg = gpt.model_config(cfg_name, context_length=context, drop_rate=0.0, init="gpt2")
    compile_ours = on_cuda or compile_on_cpu
    paths = [
        ("RTX 3090 path", "book attention, fp16 + GradScaler, AdamW, no compile", rtx_cfg, gpt.book_attention_model,
         {"precision": "fp16", "optimizer": "adamw", "fused": False, "compile": False, "grad_clip": 0.0},
         reference.BATCH_SIZE),
        ("ours (AdamW)", "SDPA, bf16, compiled model + loss, fused AdamW, clip 1.0", modern_cfg, gpt.GPTModel,
         {"precision": "bf16", "optimizer": "adamw", "fused": on_cuda, "compile": compile_ours, "grad_clip": 1.0,
          "decay_matrices_only": True}, "auto"),
        ("ours (Muon)", "as above, Muon (compiled Newton-Schulz) on the blocks' matrices", modern_cfg, gpt.GPTModel,
         {"precision": "bf16", "optimizer": "muon", "fused": on_cuda, "compile": compile_ours, "grad_clip": 1.0,
          "decay_matrices_only": True}, "auto"),
    ]
    rows = []
    for name, what, cfg, build, step, batch in paths:
        def measure():
            precision = training.Precision(step["precision"], device).apply()
            model = build(cfg).to(device)
            largest, _ = training.find_batch_size(model, list(training.AUTO_BATCH_CANDIDATES), cfg["context_length"],
                                                  precision, training.optimizer_state_bytes(model, step["optimizer"]))
            del model
            training.free_memory(device)
            batch_size = largest if batch == "auto" else batch
            largest = largest if on_cuda else None  # off CUDA "auto" is a fixed choice, not a measurement
            row = training.time_training(cfg, batch_size, step["precision"], device, build_model=build,
                                         min_seconds=seconds, warmup_steps=3,
                                         **{k: v for k, v in step.items() if k != "precision"})
            if step["compile"]:
                torch.compiler.reset()
            training.free_memory(device)
            rows.append({**row, "path": name, "what": what if on_cuda else f"{what} (as run on {device.type}: "
                         f"{row['precision']}{', compiled' if row['compile'] else ', eager'})",
                         "largest_batch_size": largest})
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
            return True, f"{row['tokens_per_second']:,.0f} tokens/s at batch {batch_size}{mfu}; largest batch {largest or '-'}; " \
                         f"first step {row['compile_seconds']:.1f} s"
        checks.run(f"speed: {name}", measure)
    return rows


def format_rows(rows):
    lines = ["| path | what | batch | largest batch | tokens/s | MFU | peak memory |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] is not None else "-"
        lines.append(f"| {r['path']} | {r['what']} | {r['batch_size']} | {r['largest_batch_size'] or '-'} | "
                     f"{r['tokens_per_second']:,.0f} | {mfu} | {memory} |")
    return lines


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_description(device):
    if device.type != "cuda":
        return f"CPU smoke test, not a GPU figure · torch {torch.__version__}"
    return (f"{torch.cuda.get_device_name(device)} · driver {driver_version()} · torch {torch.__version__} "
            f"(CUDA {torch.version.cuda})")


def summary_line(rows):
    by_path = {r["path"]: r for r in rows}
    if "RTX 3090 path" not in by_path or "ours (AdamW)" not in by_path:
        return ""
    base = by_path["RTX 3090 path"]["tokens_per_second"]
    parts = [f"{name} / RTX 3090 path = {r['tokens_per_second'] / base:.2f}x" for name, r in by_path.items()
             if name != "RTX 3090 path"]
    return "; ".join(parts) + f". Giles Thomas's RTX 3090 run: {reference.TOKENS_PER_SECOND:,} tokens/s."


def results_entry(checks, rows, scaling, machine, command, today):
    lines = [f"### {today} · {machine}", "", f"`{command}`", "", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'ok' if ok else '**FAILED**'}: {detail} |" for name, ok, detail in checks.rows]
    lines += [""] + format_rows(rows) + ["", summary_line(rows)] + ([""] + format_scaling(scaling) if scaling else [])
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu with --smoke")
    parser.add_argument("--smoke", action="store_true",
                        help="small models and short timings: the same code paths in minutes (for the CPU)")
    parser.add_argument("--compile", action="store_true", help="on the CPU, still torch.compile (slow)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"timed seconds per speed row (default {SPEED_SECONDS:g}; 1 with --smoke)")
    parser.add_argument("--skip", choices=["paths", "speed"], action="append", default=[], help="leave a part out")
    parser.add_argument("--gpus", type=int, default=1,
                        help="with N > 1, also train on N GPUs under torchrun and measure the scaling from 1 to N "
                             "(with --smoke: N CPU processes)")
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--results", default=None,
                        help=f"append the results here; default {os.path.relpath(RESULTS, REPO)} on a GPU, "
                             "nowhere with --smoke")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; for the same code paths on the CPU run: "
                         "python bench/gpu_check.py --smoke --device cpu")
    try:
        device = gpt.resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    seconds = args.seconds if args.seconds is not None else (1.0 if args.smoke else SPEED_SECONDS)
    machine = machine_description(device)
    print(f"GPU check on {machine}", flush=True)

    if args.gpus > 1 and device.type == "cuda" and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"error: --gpus {args.gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    checks, rows, scaling = Checks(), [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        if "paths" not in args.skip:
            path_checks(checks, work, device, args.smoke, args.compile)
        if "speed" not in args.skip:
            rows = speed_rows(checks, device, args.smoke, args.compile, seconds)
        if args.gpus > 1:
            scaling = multi_gpu_checks(checks, work, device, args.smoke, args.gpus, seconds)

    print("\n" + "\n".join(f"{'ok    ' if ok else 'FAILED'}  {name}: {detail}" for name, ok, detail in checks.rows))
    if rows:
        print("\n".join([""] + format_rows(rows) + [summary_line(rows)]))
    if scaling:
        print("\n".join([""] + format_scaling(scaling)))
    results = args.results or (RESULTS if device.type == "cuda" and not args.smoke else None)
    if results:
        command = "python bench/gpu_check.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        record(results_entry(checks, rows, scaling, machine, command.strip(), datetime.date.today().isoformat()), SECTION,
               path=results)
        print(f"appended to {results}")
    failed = [name for name, ok, _ in checks.rows if not ok]
    if failed:
        raise SystemExit(f"error: {len(failed)} check(s) failed: {', '.join(failed)}")
    return {"checks": checks.rows, "rows": rows, "scaling": scaling}


if __name__ == "__main__":
    main()
