"""Train a set of variants with several random seeds each, as a queue that survives interruption; then
the grouped comparison table and chart.

    python run_ablations.py plan.json            # runs what is left, then writes OUT/compare.md and OUT/loss.png
    python run_ablations.py plan.json --status   # what is done, under way and to do; runs nothing

One run per flag cannot tell a real difference from noise: Giles Thomas needed seven extra baselines to
see how far two runs of the same recipe land apart (his part 32). This runs each variant with each
seed into OUT/VARIANT/seed-S, one train.py at a time, and can be stopped at any moment: a rerun skips
finished runs, resumes an unfinished one from its latest checkpoint (--resume latest) and starts the
rest. Ctrl-C or SIGTERM is passed on to the train.py under way, which saves and exits; kill -9 loses at
most what that run did since its last checkpoint. A plan is JSON:

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
import json
import os
import signal
import subprocess
import sys

import checkpointing as ckpt

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
    problems = []
    if not isinstance(plan, dict):
        raise PlanError(f"{path} must hold a JSON object with out, train, seeds and variants")
    if not isinstance(plan.get("out"), str):
        problems.append('"out": a folder')
    if not isinstance(plan.get("seeds"), list) or not plan["seeds"] or not all(isinstance(s, int) for s in plan["seeds"]):
        problems.append('"seeds": a list of integers')
    variants = plan.get("variants")
    if not isinstance(variants, dict) or not variants or not all(
            isinstance(v, list) and all(isinstance(a, str) for a in v) for v in variants.values()):
        problems.append('"variants": {name: [train.py flags]}')
    for key in ("train", "compare"):
        if not isinstance(plan.get(key, []), list) or not all(isinstance(a, str) for a in plan.get(key, [])):
            problems.append(f'"{key}": a list of flags')
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
    checkpoints = ckpt.list_checkpoints(run_dir)
    if not checkpoints:
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


class Child:
    """The train.py under way. Ctrl-C in the terminal reaches it directly (a second one from here would
    make it stop without saving); SIGTERM, sent to this process alone, is passed on. Either way the
    queue stops once it has saved."""
    proc = None
    stopping = False

    @classmethod
    def stop(cls, signum, frame):
        cls.stopping = True
        if signum == signal.SIGTERM and cls.proc is not None and cls.proc.poll() is None:
            cls.proc.send_signal(signum)


def run_all(plan):
    runs = runs_of(plan)
    logs = os.path.join(plan["out"], "logs")
    os.makedirs(logs, exist_ok=True)
    for i, (variant, seed, run_dir) in enumerate(runs, 1):
        state = status(run_dir)
        print(f"[{i}/{len(runs)}] {variant}, seed {seed}: {state}", flush=True)
        if state == "done":
            continue
        log = os.path.join(logs, f"{variant}-seed-{seed}.log")
        with open(log, "a") as out:
            Child.proc = subprocess.Popen(train_command(plan, variant, seed, run_dir, state == "resume"), cwd=REPO,
                                          stdout=out, stderr=subprocess.STDOUT)
            code = Child.proc.wait()
        if Child.stopping:
            raise SystemExit(f"stopped during {variant}, seed {seed} (it saved a checkpoint); run the same command "
                             "again to continue")
        if code != 0 or status(run_dir) != "done":
            last = open(log).read().strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"error: {variant}, seed {seed} failed (exit {code}): {last[0]}; see {log}")
    return [run_dir for _, _, run_dir in runs]


def summarise(plan, run_dirs):
    """OUT/compare.md (evaluate.py compare: groups, mean +- std, difference to the first variant) and
    OUT/loss.png (plot_losses.py: each variant's mean curve with its band)."""
    first = run_dirs[0]
    table = subprocess.run([sys.executable, "evaluate.py", "compare", *run_dirs, *plan.get("compare", []),
                            "--baseline", first, "--markdown", "--per-run"], cwd=REPO, capture_output=True, text=True)
    if table.returncode != 0:
        raise SystemExit(f"error: evaluate.py compare failed: {(table.stderr.strip() or 'no output').splitlines()[-1]}")
    path = os.path.join(plan["out"], "compare.md")
    with open(path + ".tmp", "w") as f:
        f.write(table.stdout)
    os.replace(path + ".tmp", path)
    chart = os.path.join(plan["out"], "loss.png")
    subprocess.run([sys.executable, "plot_losses.py", *run_dirs, "--out", chart], cwd=REPO, check=True,
                   capture_output=True)
    print(table.stdout)
    print(f"wrote {path} and {chart}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the plan: a JSON file (see below)")
    parser.add_argument("--status", action="store_true", help="list each run as done, resume or start; run nothing")
    args = parser.parse_args(argv)
    try:
        plan = read_plan(args.plan)
    except PlanError as e:
        raise SystemExit(f"error: {e}") from None
    if args.status:
        for variant, seed, run_dir in runs_of(plan):
            print(f"{status(run_dir):6}  {variant}, seed {seed}  ({run_dir})")
        return
    previous = {sig: signal.signal(sig, Child.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_dirs = run_all(plan)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summarise(plan, run_dirs)


if __name__ == "__main__":
    main()
