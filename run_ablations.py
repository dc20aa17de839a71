"""Train a set of variants with several random seeds each, as a queue that survives interruption; then
the grouped comparison table and chart.

    python run_ablations.py plan.json            # runs what is left, then writes OUT/compare.md and OUT/loss.png
    python run_ablations.py plan.json --status   # what is done, under way and to do; runs nothing

One run per flag cannot tell a real difference from noise: Giles Thomas needed seven extra baselines to
see how far two runs of the same recipe land apart (his part 32). This runs each variant with each
seed into OUT/VARIANT/seed-S, one train.py at a time, and can be stopped at any moment: a rerun skips
finished runs, resumes an unfinished one from its latest checkpoint (--resume latest) and starts the
rest. Ctrl-C or SIGTERM tells the train.py under way to save and exit, then the runner exits (130 or
143) saying where it stopped; kill -9 loses at most what that run did since its last checkpoint. A
second runner on the same OUT is refused while the first holds it. A plan is JSON:

    {"out": "runs/ablations",
     "train": ["--data", "datasets/fineweb-10BT", "--max-steps", "2000", "--val-every", "500"],
     "seeds": [1, 2, 3],
     "variants": {"baseline": [], "qkv-bias": ["--qkv-bias"], "no-dropout": ["--drop-rate", "0"]},
     "compare": ["--data", "datasets/fineweb-10BT", "--max-batches", "200"],
     "processes": 1}

"train" goes to every run, a variant's flags after it; "compare" to evaluate.py compare (the first
variant is the baseline); "processes" > 1 runs each train.py under torchrun. The runs' output goes to
OUT/logs/VARIANT-seed-S.log.
"""

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import checkpointing as ckpt
import cli
from files import write_text_atomic

REPO = os.path.dirname(os.path.abspath(__file__))


class PlanError(Exception):
    """A plan file that cannot be run (the message says what to fix)."""


def read_plan(path):
    try:
        with open(path) as f:
            plan = json.load(f)
    except FileNotFoundError:
        raise PlanError(f"{path} does not exist; write a plan (see python run_ablations.py --help)") from None
    except ValueError as e:
        raise PlanError(f"{path} is not JSON ({e})") from None
    if not isinstance(plan, dict):
        raise PlanError(f"{path} must hold a JSON object with out, train, seeds and variants")
    flags = lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v)
    variants, problems = plan.get("variants"), []
    if not isinstance(plan.get("out"), str):
        problems.append('"out": a folder')
    if not isinstance(plan.get("seeds"), list) or not plan["seeds"] or not all(isinstance(s, int) for s in plan["seeds"]):
        problems.append('"seeds": a list of integers')
    if not isinstance(variants, dict) or not variants or not all(flags(v) for v in variants.values()):
        problems.append('"variants": {name: [train.py flags]}')
    problems += [f'"{key}": a list of flags' for key in ("train", "compare") if not flags(plan.get(key, []))]
    if problems:
        raise PlanError(f"{path} needs " + "; ".join(problems))
    for flag in ("--run-dir", "--seed", "--resume"):
        if flag in plan.get("train", []) or any(flag in v for v in variants.values()):
            raise PlanError(f"{path} sets {flag}; the runner sets it for each run, leave it out")
    return plan


def runs_of(plan):
    """[(variant, seed, run folder)] in the order they are run: every variant for seed 1, then seed 2...
    so that a queue stopped halfway already has one run of each variant to compare."""
    return [(variant, seed, os.path.join(plan["out"], variant, f"seed-{seed}"))
            for seed in plan["seeds"] for variant in plan["variants"]]


def status(run_dir):
    """done (its latest checkpoint is its last step), resume (it has checkpoints), or start."""
    if not ckpt.list_checkpoints(run_dir):
        return "start"
    try:
        meta = ckpt.read_meta(ckpt.resolve_checkpoint(run_dir, "latest"))
    except ckpt.CheckpointError:
        return "resume"  # train.py --resume latest falls back past a damaged newest checkpoint
    return "done" if meta["step"] >= meta["training"]["total_steps"] else "resume"


def train_command(plan, variant, seed, run_dir, resume):
    processes = plan.get("processes", 1)
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return launcher + ["train.py", *plan.get("train", []), *plan["variants"][variant], "--seed", str(seed),
                       "--run-dir", run_dir] + (["--resume", "latest"] if resume else [])


def error_line(output):
    """Why a script failed: its last "error: ..." line (or a traceback's last line), never a progress bar."""
    lines = [line.strip() for line in re.split(r"[\r\n]", output) if re.match(r"(error|\w+Error)\b", line)]
    return lines[-1] if lines else "it printed no error line"


def run_all(plan, where):
    """Train every run not done yet; `where` says which run is under way, for the line a stop ends in."""
    runs = runs_of(plan)
    logs = os.path.join(plan["out"], "logs")
    os.makedirs(logs, exist_ok=True)
    for i, (variant, seed, run_dir) in enumerate(runs, 1):
        where["run"] = (variant, seed, run_dir)
        state = status(run_dir)
        print(f"[{i}/{len(runs)}] {variant}, seed {seed}: {state}", flush=True)
        if state == "done":
            continue
        log = os.path.join(logs, f"{variant}-seed-{seed}.log")
        start = os.path.getsize(log) if os.path.exists(log) else 0
        with open(log, "a") as out:
            child = subprocess.Popen(train_command(plan, variant, seed, run_dir, state == "resume"), cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT)
            try:
                code = child.wait()
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli.Terminated): train.py saves and exits on one SIGTERM
                child.send_signal(signal.SIGTERM)  # (a terminal's Ctrl-C reached it too: a second SIGINT would
                child.wait()                       # stop it unsaved, a SIGTERM after it changes nothing)
                raise
        if code != 0 or status(run_dir) != "done":
            with open(log, "rb") as f:
                f.seek(start)  # this session's output only
                reason = error_line(f.read().decode(errors="replace"))
            raise PlanError(f"{variant}, seed {seed} failed (exit {code}): {reason}; see {log}")
    where["run"] = None
    return [run_dir for _, _, run_dir in runs]


def stopped_at(where):
    """The line a stop ends in: what was kept and how to continue."""
    again = "run the same command again to continue"
    if "run" not in where:
        return f"no run was started: {again}"
    if where["run"] is None:
        return f"every run is done; the comparison was not written: {again}"
    variant, seed, run_dir = where["run"]
    if status(run_dir) == "done":
        return f"{variant}, seed {seed} is done; stopped before the next run: {again}"
    return f"stopped during {variant}, seed {seed} (its train.py saved a checkpoint): {again}"


def summarise(plan, run_dirs):
    """OUT/compare.md (evaluate.py compare: groups, mean +- std, difference to the first variant) and
    OUT/loss.png (plot_losses.py: each variant's mean curve with its band)."""
    path, chart = os.path.join(plan["out"], "compare.md"), os.path.join(plan["out"], "loss.png")
    outputs = []
    for argv in (["evaluate.py", "compare", *run_dirs, *plan.get("compare", []), "--baseline", run_dirs[0],
                  "--markdown", "--per-run"], ["plot_losses.py", *run_dirs, "--out", chart]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise PlanError(f"{argv[0]} failed: {error_line(done.stderr)}")
        outputs.append(done.stdout)
    write_text_atomic(path, outputs[0])
    print(outputs[0])
    print(f"wrote {path} and {chart}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the plan: a JSON file (see below)")
    parser.add_argument("--status", action="store_true", help="list each run as done, resume or start; run nothing")
    args = parser.parse_args(argv)
    where = {}
    with cli.errors_end_in_one_line(PlanError, ckpt.CheckpointError, stopped=lambda: stopped_at(where)), \
            contextlib.ExitStack() as held:
        plan = read_plan(args.plan)
        if args.status:
            for variant, seed, run_dir in runs_of(plan):
                print(f"{status(run_dir):6}  {variant}, seed {seed}  ({run_dir})")
            return
        try:  # a second runner on this plan is refused, naming the first
            held.enter_context(ckpt.run_folder_lock(plan["out"]))
        except ckpt.CheckpointError as e:
            raise PlanError(str(e).replace("--run-dir", '"out" in the plan')) from None
        summarise(plan, run_all(plan, where))


if __name__ == "__main__":
    main()
