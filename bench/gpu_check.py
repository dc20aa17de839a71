"""The one-command GPU check: how fast ours is against the RTX 3090 path, and whether every CUDA path works.

    python bench/gpu_check.py                        # on one GPU: at most 5 minutes, compiles included
    python bench/gpu_check.py --smoke --device cpu   # the same code paths on the CPU, 1-2 minutes on 2 cores
    bash bench/gpu_first_run.sh OUT                  # a fresh GPU machine: records it, runs this, keeps the log

In order (docs/speed.md says what each checks against what): (a) speed of the RTX 3090 path and ours;
(b) the paths as short train.py runs; (c) with --gpus N, torchrun and the scaling from 1 GPU to N.

A check starts only when the time it needs (guessed for an H100, a tenth with --smoke) is left of
--budget-minutes, and a script it runs is stopped at the budget's end; a check left out or stopped makes
the verdict "incomplete". Each check is written as it ends, so a run killed at any moment keeps every
number it took: a line in --out DIR/checks.jsonl (the last line is the verdict) and the entry in
--results FILE, rewritten in place. The exit status is 1 when a check failed or the run is incomplete.
"""

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# Named before anything imports them, so a missing package is one line rather than a traceback midway.
REQUIRED = ("torch", "numpy", "safetensors", "tiktoken", "tqdm", "pyarrow", "matplotlib")
_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(f"error: {', '.join(_missing)} not installed for {sys.executable}; install them "
                     "(pip install -r requirements.txt) or run this with the Python that has them")

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the shared modules live at the top level, one folder up
from bench.results import RESULTS, STEP_TIMING, command, record  # noqa: E402

import checkpointing  # noqa: E402
import gpt  # noqa: E402
import reference  # noqa: E402
import sample_text  # noqa: E402
import optim  # noqa: E402
import training  # noqa: E402

SECTION = "## GPU check"
BUDGET_MINUTES = 5.0
SPEED_SECONDS = 5.0                  # timed seconds per speed row, after warm-up
STEPS = 8                            # per path run; resume splits it 4 + 4
# The path runs' model, also profiled in this process by the attention check so that the train.py runs
# find its graph compiled: on a GPU gpt2-small's width at 2 layers and 256 tokens; on the CPU the tiny preset.
GPU_CHECK_MODEL = ["--model", "gpt2-small", "--n-layers", "2", "--context-length", "256", "--batch-size", "8"]
CPU_CHECK_MODEL = ["--model", "tiny", "--context-length", "32", "--batch-size", "4"]
SMOKE_NEEDS = 0.1                    # with --smoke a check needs this share of its time on an H100 (a guess)
DEADLINE = math.inf                  # time.monotonic() at the budget's end; main() sets it


class OutOfBudget(Exception):
    """A script was stopped at the budget's end."""


class Checks:
    """Runs the checks in turn while the budget lasts, catching a failure so the others still run. Each
    result goes at once to DIR/checks.jsonl and to the RESULTS.md entry."""

    def __init__(self, scale=1.0, out=None, results=None, heading="### check", command=""):
        self.scale, self.results, self.heading, self.command = scale, results, heading, command
        self.rows, self.speed, self.scaling = [], [], []  # rows: (name, result, detail, seconds)
        self.budget_spent = False
        self.jsonl = open(os.path.join(out, "checks.jsonl"), "w") if out else None
        self.write_entry()

    def run(self, name, fn, needs=10):
        """needs: seconds on an H100. In-process work cannot be stopped, so it must not start without them."""
        start = time.monotonic()
        left, needs, row = DEADLINE - start, needs * self.scale, None
        if self.budget_spent:  # once one check is left out, the rest are too: later ones may need its runs
            result, detail = "not run: budget", "left out with the one before"
        elif left < needs:
            self.budget_spent = True
            result, detail = "not run: budget", f"{max(left, 0):.0f} s of the budget left, it needs about {needs:.0f}"
        else:
            print(f"\n=== {name}", flush=True)
            try:
                ok, detail, *row = fn()
                result, row = "ok" if ok else "FAILED", row[0] if row else None
            except OutOfBudget as exc:
                self.budget_spent = True
                result, detail = "cut: budget", str(exc)
            except Exception as exc:
                traceback.print_exc()
                result, detail = "FAILED", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        seconds = time.monotonic() - start
        self.rows.append((name, result, detail, seconds))
        self.write_entry()  # then the line, then the screen: what one shows, the one before holds too
        self.write_line({"name": name, "ok": result == "ok", "result": result, "detail": detail,
                         "seconds": round(seconds, 1), **({"row": row} if row else {})})
        print(f"--> {result}: {detail}", flush=True)

    def verdict(self):
        kinds = [("failed", "check(s) failed", [n for n, result, *_ in self.rows if result == "FAILED"]),
                 ("incomplete", "not run or stopped for the budget",
                  [n for n, result, *_ in self.rows if result.endswith("budget")])]
        return (", ".join(word for word, _, names in kinds if names) or "passed",
                "; ".join(f"{len(names)} {what}: {', '.join(names)}" for _, what, names in kinds if names))

    def finish(self):
        verdict, detail = self.verdict()
        self.write_line({"verdict": verdict, "detail": detail})
        self.write_entry(final=True)
        if self.jsonl:
            self.jsonl.close()
        return verdict, detail

    def write_line(self, line):
        if self.jsonl:
            self.jsonl.write(json.dumps(line) + "\n")
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())

    def write_entry(self, final=False):
        if not self.results:
            return
        verdict, detail = self.verdict()  # until final, "incomplete": if it stays, the run was stopped
        status = f"**{verdict}**" + (f": {detail}" if detail else "") if final else \
            f"**incomplete**: {len(self.rows)} check(s) written so far; the run went no further"
        lines = [self.heading, "", f"`{self.command}`", "", status, "", "| check | result |", "|---|---|"]
        lines += [f"| {name} | {'**FAILED**' if result == 'FAILED' else result}: {detail} ({seconds:.0f} s) |"
                  for name, result, detail, seconds in self.rows]
        record("\n".join(lines + self.tables()) + "\n", SECTION, path=self.results, replace=self.heading)

    def tables(self):
        """The speed rows and the scaling, each table after a blank line."""
        lines = []
        if self.speed:
            lines += ["", "| path | what | batch | largest batch | tokens/s | MFU | peak memory |",
                      "|---|---|---|---|---|---|---|"]
            for r in self.speed:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
                memory = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] is not None else "-"
                lines.append(f"| {r['path']} | {r['what']} | {r['batch_size']} | {r['largest_batch_size'] or '-'} | "
                             f"{r['tokens_per_second']:,.0f} | {mfu} | {memory} |")
            base = next((r["tokens_per_second"] for r in self.speed if r["path"] == "RTX 3090 path"), None)
            if base and len(self.speed) > 1:
                lines += ["", "; ".join(f"{r['path']} / RTX 3090 path = {r['tokens_per_second'] / base:.2f}x"
                                        for r in self.speed if r["path"] != "RTX 3090 path")
                          + f". Giles Thomas's RTX 3090 run: {reference.TOKENS_PER_SECOND:,} tokens/s."]
        if self.scaling:
            lines += ["", "| setting | 1 GPU tokens/s | N GPUs tokens/s | N | scaling |", "|---|---|---|---|---|"]
            lines += [f"| {r['setting']} | {r['one']:,.0f} | {r['many']:,.0f} | {r['gpus']} | "
                      f"{100 * r['efficiency']:.0f}% |" for r in self.scaling]
        return lines


def start_script(*argv):
    """A stage script started as a user runs it, in its own process group so that stopping it stops its
    workers too. Its output goes to files, not pipes: a script left running never blocks on a full pipe."""
    logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=logs[0], stderr=logs[1], text=True,
                            start_new_session=True)
    proc.name, proc.logs = argv[1] if argv[0] == "-m" else argv[0], logs
    return proc


def stop(proc):
    if proc.poll() is None:
        if proc.name == "torch.distributed.run":  # its workers have sessions of their own: it stops them
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_script(proc):
    """A started script's output once it ends; stopped at the budget's end; a failure raises with its last lines."""
    try:
        proc.wait(timeout=max(0.1, DEADLINE - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise OutOfBudget(f"{proc.name} was stopped at the budget's end") from None
    finally:
        stop(proc)  # also on Ctrl-C
    for f in proc.logs:
        f.seek(0)
    stdout, stderr = (f.read() for f in proc.logs)
    if proc.returncode != 0:
        print(stdout[-3000:], stderr[-3000:], sep="\n")
        last = (stderr.strip() or stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"{proc.name} exited with {proc.returncode}: {last}")
    return stdout


def run_script(*argv):
    return wait_script(start_script(*argv))


def make_dataset(folder):
    """250k train / 10k val tokens of Python's documentation, prepared as train.py reads them: enough for
    --gpus 8 (12 steps of 8 x 8 x 256 tokens), in a few seconds."""
    parquet = os.path.join(folder, "sample.parquet")
    sample_text.write_sample_parquet(parquet, max_chars=1_200_000)  # here: no second start of torch
    out = os.path.join(folder, "data")
    run_script("prepare_datasets.py", "--input", parquet, "--output", out, "--train-tokens", "250000",
               "--val-tokens", "10000", "--val-fraction", "0.1", "--shard-tokens", "100000")
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
        return [row["val_loss"] for row in map(json.loads, f) if row["val_loss"] is not None]


def attention_verdict(op_names, capability):
    """Whether the attention kernels among the profiler's event names are right for the device: on
    Hopper (capability 9.x) cuDNN's or flash; on other GPUs (capability (major, minor)) and on the CPU
    (None) any fused kernel. The math fallback is plain matmuls and a softmax: no name here matches it."""
    kinds = {}
    for name in sorted(op_names):
        low = name.lower()
        kind = "cudnn" if "cudnn" in low and ("attention" in low or "sdpa" in low) else "flash" if "flash" in low \
            else "efficient" if "efficient_attention" in low or "fmha" in low else None
        if kind and "backward" not in low:
            kinds.setdefault(kind, []).append(name[:80])
    wanted = ("cudnn", "flash") if capability and capability[0] == 9 else ("cudnn", "flash", "efficient")
    ran = "; ".join(f"{kind}: {', '.join(names[:3])}" for kind, names in kinds.items())
    if any(kind in kinds for kind in wanted):
        return True, ran
    device = f"compute capability {capability[0]}.{capability[1]}" if capability else "the CPU"
    ran = ran or "the math fallback (no fused attention kernel ran)"
    return False, f"{ran}; on {device} want {' or '.join(wanted)}"


# --- (a) speed --------------------------------------------------------------------------------------

def speed_rows(checks, device, smoke, compile_on_cpu, seconds):
    """The RTX 3090 path and ours (AdamW, Muon): tokens/s, MFU, peak memory, largest micro-batch."""
    on_cuda = device.type == "cuda"
    cfg_name, context = ("tiny", 32) if smoke else ("gpt2-small", 1024)
    rtx_cfg = gpt.model_config(cfg_name, context_length=context)                 # dropout 0.1, the book's
    modern_cfg = gpt.model_config(cfg_name, context_length=context, drop_rate=0.0, init="gpt2")
    ours = {"precision": "bf16", "fused": on_cuda, "compile": on_cuda or compile_on_cpu, "grad_clip": 1.0,
            "decay_matrices_only": True}
    paths = [  # name, what, config, model, step, batch, seconds on an H100 beyond the timed ones (a guess)
        ("RTX 3090 path", "book attention, fp16 + GradScaler, AdamW, no compile", rtx_cfg, gpt.book_attention_model,
         {"precision": "fp16", "optimizer": "adamw", "fused": False, "compile": False, "grad_clip": 0.0,
          "decay_matrices_only": False},
         reference.BATCH_SIZE, 25),
        ("ours (AdamW)", "SDPA, bf16, compiled model + loss, fused AdamW, clip 1.0", modern_cfg, gpt.GPTModel,
         {**ours, "optimizer": "adamw"}, "auto", 75),
        ("ours (Muon)", "as above, Muon (compiled Newton-Schulz) on the blocks' matrices", modern_cfg, gpt.GPTModel,
         {**ours, "optimizer": "muon"}, "auto", 45),  # the model's graph compiled once already: cached
    ]
    for name, what, cfg, build, step, batch, overhead in paths:
        def measure():
            precision = training.Precision(step["precision"], device).apply()
            model = build(cfg).to(device)
            largest, _ = training.find_batch_size(model, list(training.AUTO_BATCH_CANDIDATES), cfg["context_length"],
                                                  precision, optim.optimizer_state_bytes(model, step["optimizer"]))
            del model
            training.free_memory(device)
            batch_size = largest if batch == "auto" else batch
            largest = largest if on_cuda else None  # off CUDA "auto" is a fixed choice, not a measurement
            row = training.time_training(cfg, batch_size, device=device, build_model=build, min_seconds=seconds,
                                         **STEP_TIMING, **step)
            if step["compile"]:
                torch.compiler.reset()
            training.free_memory(device)
            row = {**row, "path": name, "what": what if on_cuda else f"{what} (as run on {device.type}: "
                   f"{row['precision']}{', compiled' if row['compile'] else ', eager'})", "largest_batch_size": largest}
            checks.speed.append(row)
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
            return True, f"{row['tokens_per_second']:,.0f} tokens/s at batch {batch_size}{mfu}; largest batch " \
                         f"{largest or '-'}; first step {row['compile_seconds']:.1f} s", row
        checks.run(f"speed: {name}", measure, needs=seconds + overhead)


# --- (b) the paths ----------------------------------------------------------------------------------

class PathRuns:
    """What the path checks share: their train.py runs' flags, the runs the first check starts for the
    later ones to collect, and the run-to-run spread it measures."""

    def __init__(self, work, device, smoke, compile_on_cpu):
        self.work, self.device = work, device
        self.on_cuda = device.type == "cuda"
        self.compiled = self.on_cuda or compile_on_cpu
        self.model_flags = CPU_CHECK_MODEL if smoke else GPU_CHECK_MODEL
        self.common = [*self.model_flags, "--val-batches", "2", "--device", str(device), "--lr", "1e-3",
                       "--val-every", "4", "--log-every", "4", "--seed", "1"]
        self.fast = ["--precision", "bf16", "--compile", "true" if self.compiled else "false",
                     "--fused", "true" if self.on_cuda else "false", "--drop-rate", "0"]
        self.dataset = os.path.join(work, "data")
        self.first = os.path.join(work, "uninterrupted-1")
        self.started, self.spread = {}, None

    def train(self, name, *extra):
        return start_script("train.py", "--run-dir", os.path.join(self.work, name), "--data", self.dataset,
                            *self.common, *extra)

    def learns(self, name):
        """Once the run `name` ends, whether its validation loss fell."""
        wait_script(self.started[name])
        losses = val_losses(os.path.join(self.work, name))
        return losses[-1] < losses[0] and all(math.isfinite(x) for x in losses), \
            f"val loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_attention_kernel(runs):
    # One training step of the path runs' model, compiled, inside attention_context as train.py runs it:
    # a compiled graph keeps the kernel chosen while it was traced. On the CPU without --compile the
    # same trace runs without inductor's code generation (a minute on 2 cores).
    device = runs.device
    flags = dict(zip(runs.model_flags[::2], runs.model_flags[1::2]))
    cfg = gpt.model_config(flags["--model"], n_layers=int(flags.get("--n-layers", 0)) or None,
                           context_length=int(flags["--context-length"]), drop_rate=0.0)
    model = gpt.GPTModel(cfg).to(device)
    step_model = training.compile_model(model, True) if runs.compiled else \
        torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    precision = training.Precision("bf16", device).apply()
    tokens = torch.randint(0, cfg["vocab_size"], (int(flags["--batch-size"]), cfg["context_length"] + 1),
                           device=device)

    def step():
        with precision.autocast():
            loss = step_model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()

    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if runs.on_cuda else [])
    with training.attention_context(device):
        step()  # compiles
        with torch.profiler.profile(activities=activities) as prof:
            step()
    return attention_verdict({e.name for e in prof.events()},
                             torch.cuda.get_device_capability(device) if runs.on_cuda else None)


def check_uninterrupted(runs):
    make_dataset(runs.work)
    # The runs that need only the dataset start together, for the checks after this one to collect:
    # each spends seconds starting up, and these small models leave the GPU idle much of the time.
    fast = runs.fast
    runs.started.update({name: runs.train(name, *extra, "--max-steps", str(steps)) for name, extra, steps in (
        ("uninterrupted-1", fast, STEPS), ("uninterrupted-2", fast, STEPS), ("resumed", fast, STEPS // 2),
        ("fp16", ["--recipe", "rtx3090", "--precision", "fp16", "--compile", "false", "--fused", "false"], STEPS),
        ("muon", [*fast, "--optimizer", "muon"], STEPS))})
    ok, detail = runs.learns("uninterrupted-1")
    wait_script(runs.started["uninterrupted-2"])
    second = final_weights(os.path.join(runs.work, "uninterrupted-2"))
    runs.spread = max_difference(final_weights(runs.first), second)
    return ok, f"{detail}; two identical runs differ by at most {runs.spread:.2e} in any weight"


def check_resume(runs):
    wait_script(runs.started["resumed"])
    wait_script(runs.train("resumed", *runs.fast, "--max-steps", str(STEPS), "--resume", "latest"))
    diff = max_difference(final_weights(os.path.join(runs.work, "resumed")), final_weights(runs.first))
    return diff <= 3 * runs.spread or diff == 0, f"{STEPS // 2} + {STEPS // 2} steps vs {STEPS} uninterrupted: " \
                                                 f"{diff:.2e} (run-to-run spread {runs.spread:.2e})"


def check_fp16(runs):
    ok, detail = runs.learns("fp16")
    meta = checkpointing.read_meta(checkpointing.resolve_checkpoint(os.path.join(runs.work, "fp16"), "latest"))
    scale = (meta["train_state"].get("scaler") or {}).get("scale")
    ran = "fp16 + GradScaler" if runs.on_cuda else "fp32 (fp16 is a CUDA mode)"
    return ok and (scale is not None or not runs.on_cuda), f"{ran}; {detail}; loss scale {scale}"


def check_muon(runs):
    ok, detail = runs.learns("muon")
    return ok, f"{detail}; Newton-Schulz {'compiled' if runs.compiled else 'eager'}"


def check_checkpoint_on_device(runs):
    device = runs.device
    on_device, _ = checkpointing.load_model(runs.first, device, "latest")
    on_cpu, _ = checkpointing.load_model(runs.first, "cpu", "latest")
    training.Precision("fp32", device).apply()
    tokens = torch.randint(0, 50257, (2, 32))
    error = relative_difference(on_device(tokens.to(device)).cpu(), on_cpu(tokens))
    return error < 1e-4, f"logits on {device} vs cpu: max relative difference {error:.1e}"


def check_generation(runs):
    model, _ = checkpointing.load_model(runs.first, runs.device, "latest")
    prompt = torch.tensor([gpt.get_tokenizer().encode("Every effort moves you")], device=runs.device)
    context = model.cfg["context_length"]
    with_cache = gpt.generate(model, prompt, 40, context, use_cache=True)
    without = gpt.generate(model, prompt, 40, context, use_cache=False)
    same = torch.equal(with_cache, without)
    return same, f"40 greedy tokens, KV cache {'equals' if same else 'differs from'} full recompute"


def check_to_hf(runs):
    if importlib.util.find_spec("transformers") is None:
        return True, "skipped: transformers is not installed here"
    import transformers
    out = os.path.join(runs.work, "hf")
    run_script("huggingface.py", "to-hf", runs.first, out, "--which", "latest")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).to(runs.device).eval()
    ours, _ = checkpointing.load_model(runs.first, runs.device, "latest")
    tokens = torch.randint(0, 50257, (2, 32), device=runs.device)
    error = relative_difference(hf(tokens).logits, ours(tokens))
    return error < 1e-4, f"transformers' logits vs ours: max relative difference {error:.1e}"


def check_instruction_fine_tune(runs):
    # 40 made-up examples in the book's format; fp16 + GradScaler on CUDA, as finetune_instructions.py runs.
    work, device = runs.work, str(runs.device)
    data = os.path.join(work, "instructions.json")
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window"]
    with open(data, "w") as f:
        json.dump([{"instruction": "Write the word in capital letters.", "input": words[i % 8],
                    "output": words[i % 8].upper()} for i in range(40)], f)
    out = os.path.join(work, "instruct")
    run_script("finetune_instructions.py", "--checkpoint", runs.first, "--which", "latest", "--data", data,
               "--run-dir", out, "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--device", device)
    losses = val_losses(out)
    answers = os.path.join(work, "answers.jsonl")
    run_script("evaluate.py", "instruct", "--run-dir", out, "--data", data, "--out", answers,
               "--max-new-tokens", "8", "--device", device)
    count = sum(1 for _ in open(answers))
    return losses[-1] < losses[0] and count == 4, f"val loss {losses[0]:.3f} -> {losses[-1]:.3f}; {count} answers"


# (name, check, seconds it needs on an H100), in the order they run: the later ones use the runs and the
# spread of "bf16 + compile + fused AdamW (twice)".
PATH_CHECKS = [
    ("attention kernel", check_attention_kernel, 30),  # a compile, in this process
    ("bf16 + compile + fused AdamW (twice)", check_uninterrupted, 10),
    ("resume", check_resume, 10),
    ("fp16 + GradScaler", check_fp16, 10),
    ("Muon", check_muon, 10),
    ("checkpoint loaded on the device", check_checkpoint_on_device, 10),
    ("generation with and without the KV cache", check_generation, 10),
    ("to-hf", check_to_hf, 10),
    ("instruction fine-tune and answers", check_instruction_fine_tune, 10),
]


def path_checks(checks, work, device, smoke, compile_on_cpu):
    runs = PathRuns(work, device, smoke, compile_on_cpu)
    try:
        for name, check, needs in PATH_CHECKS:
            checks.run(name, functools.partial(check, runs), needs=needs)
    finally:
        for proc in runs.started.values():  # the runs of checks left out
            stop(proc)


# --- (c) several GPUs ---------------------------------------------------------------------------------

def torchrun(processes, *argv):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *argv)


def multi_gpu_checks(checks, work, device, smoke, gpus, seconds):
    """train.py on `gpus` processes learns and resumes on one; the throughput of 1 and of `gpus` GPUs."""
    on_cuda = device.type == "cuda"
    common = ["--data", os.path.join(work, "data"), *(CPU_CHECK_MODEL if smoke else GPU_CHECK_MODEL),
              "--val-batches", "2", "--device", "cuda" if on_cuda else "cpu", "--lr", "1e-3", "--val-every", "4",
              "--log-every", "4", "--precision", "bf16", "--compile", "true" if on_cuda else "false",
              "--optimizer", "muon", "--zero1", "--drop-rate", "0"]
    batch = int(common[common.index("--batch-size") + 1])
    common += ["--tokens-per-step", str(gpus * batch * int(common[common.index("--context-length") + 1]))]
    run_dir = os.path.join(work, f"ddp-{gpus}")

    def learns_and_resumes():
        if not os.path.isdir(os.path.join(work, "data")):
            make_dataset(work)
        torchrun(gpus, "train.py", "--run-dir", run_dir, *common, "--max-steps", str(STEPS))
        losses = val_losses(run_dir)
        run_script("train.py", "--run-dir", run_dir, *common[:common.index("--tokens-per-step")],
                   "--max-steps", str(STEPS + 4), "--resume", "latest")
        after = val_losses(run_dir)[-1]
        ok = losses[-1] < losses[0] and math.isfinite(after)
        return ok, f"{gpus} processes: val loss {losses[0]:.3f} -> {losses[-1]:.3f}; resumed on 1: {after:.3f} " \
                   f"after {STEPS + 4} steps"

    def scaling():
        measured = {}
        for n in (1, gpus):
            out = torchrun(n, "bench/distributed.py", "--seconds", str(seconds), *(CPU_CHECK_MODEL if smoke else ()))
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            measured[n] = {r["setting"]: r for r in rows}
        for setting, row in measured[1].items():
            one, many = row["tokens_per_second"], measured[gpus][setting]["tokens_per_second"]
            checks.scaling.append({"setting": setting, "one": one, "many": many, "gpus": gpus,
                                   "efficiency": many / (gpus * one)})
        parts = [f"{r['setting']} {100 * r['efficiency']:.0f}%" for r in checks.scaling]
        worst = min(r["efficiency"] for r in checks.scaling)
        return worst >= 0.9 or not on_cuda, f"{gpus} GPUs / ({gpus} x 1 GPU): " + ", ".join(parts) + \
            ("" if on_cuda else " (CPU processes sharing cores: not a GPU figure)"), {"scaling": checks.scaling}

    checks.run(f"train.py on {gpus} processes (sharded Muon, ZeRO-1), resumed on 1", learns_and_resumes)
    checks.run(f"scaling, 1 -> {gpus} GPUs", scaling)


def main(argv=None):
    global DEADLINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu with --smoke")
    parser.add_argument("--smoke", action="store_true", help="small models, short timings: for the CPU")
    parser.add_argument("--compile", action="store_true", help="on the CPU, still torch.compile (slow)")
    parser.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                        help="checks that would not finish in this time are left out (the verdict is incomplete)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"timed seconds per speed row (default {SPEED_SECONDS:g}; 1 with --smoke)")
    parser.add_argument("--skip", choices=["paths", "speed"], action="append", default=[], help="leave a part out")
    parser.add_argument("--gpus", type=int, default=1, help="with N > 1, also train on N GPUs under torchrun "
                                                             "and measure the scaling (--smoke: N CPU processes)")
    parser.add_argument("--out", default=None, help="write DIR/checks.jsonl, a line per check as it ends")
    parser.add_argument("--work-dir", help="the runs and their compiled kernels (default: a temporary folder)")
    parser.add_argument("--results", help=f"write the entry here (default {os.path.relpath(RESULTS, REPO)} on a "
                                           "GPU, nowhere with --smoke)")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; for the same code paths on the CPU run: "
                         "python bench/gpu_check.py --smoke --device cpu")
    try:
        device = gpt.resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.gpus > 1 and device.type == "cuda" and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"error: --gpus {args.gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    DEADLINE = time.monotonic() + 60 * args.budget_minutes
    seconds = args.seconds if args.seconds is not None else (1.0 if args.smoke else SPEED_SECONDS)
    machine = f"CPU smoke test, not a GPU figure · torch {torch.__version__}" if device.type != "cuda" else (
        f"{torch.cuda.get_device_name(device)} · driver {gpt.nvidia_smi()[1] or 'unknown'} · "
        f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"GPU check on {machine}, within {args.budget_minutes:g} minutes", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = args.results or (RESULTS if device.type == "cuda" and not args.smoke else None)
    heading = f"### {datetime.datetime.now():%Y-%m-%d %H:%M:%S} · {machine}"
    checks = Checks(SMOKE_NEEDS if args.smoke else 1.0, args.out, results, heading,
                    command("bench/gpu_check.py", argv))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = os.path.abspath(args.work_dir or tmp)
        runs = os.path.join(work, "runs")
        shutil.rmtree(runs, ignore_errors=True)  # an earlier check's: train.py refuses to start over a run
        os.makedirs(runs)
        # Compiled kernels on disk, set before anything compiles: the train.py runs started here compile the
        # graphs this process compiled (the same small model), and find them there.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(work, "inductor-cache")
        os.environ.update(TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1")
        if "speed" not in args.skip:
            speed_rows(checks, device, args.smoke, args.compile, seconds)
        if "paths" not in args.skip:
            path_checks(checks, runs, device, args.smoke, args.compile)
        if args.gpus > 1:
            multi_gpu_checks(checks, runs, device, args.smoke, args.gpus, seconds)
    verdict, detail = checks.finish()

    print("\n" + "\n".join([f"{result:16s}  {name}: {detail} ({s:.0f} s)" for name, result, detail, s in checks.rows]
                            + checks.tables()))
    if results:
        print(f"written to {results}")
    print(f"\nverdict: {verdict}" + (f" ({detail})" if detail else ""))
    if verdict != "passed":
        raise SystemExit(f"error: {verdict}: {detail}; see the lines above" +
                         ("; give it more --budget-minutes" if "incomplete" in verdict else ""))
    return {"checks": checks.rows, "rows": checks.speed, "scaling": checks.scaling}


if __name__ == "__main__":
    main()
