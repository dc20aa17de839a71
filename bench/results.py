"""What the benchmarks here share: the machine in one line, the command as typed, the step they time,
and adding an entry to its own section of bench/RESULTS.md while every other section stays where it is."""

import os
import platform
import shlex
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# training.time_training's settings that the benchmarks share: one micro-batch a step, unsharded (a
# setting that shards says so), 3 untimed steps after the first.
STEP_TIMING = {"grad_accum": 1, "shard_muon": False, "zero1": False, "seed": 123, "warmup_steps": 3, "min_steps": 1}


def machine():
    """CPU model, cores, OS, Python and torch: enough to know whether two entries are comparable."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def command(script, argv=None):
    """`python bench/X.py ...` as run: argv, or this process's own when main() was called without it."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def record(entry, section, path=RESULTS, intro="", replace=None):
    """Append `entry` at the end of `section` (a '## ' heading, created with `intro` if absent). With
    `replace`, the first line of an entry written before, that entry is rewritten where it stands
    instead (bench/gpu_check.py rewrites its entry after every check). Written to a temporary file and
    renamed, so RESULTS.md is never left half-written."""
    content = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if section not in content:
        content = content.rstrip("\n") + f"\n\n{section}\n" + (f"\n{intro.strip()}\n" if intro else "")
    old = content.find("\n" + replace + "\n") + 1 if replace else 0
    if old > 0:  # up to the next entry or section
        following = [i for i in (content.find("\n### ", old), content.find("\n## ", old)) if i >= 0]
        end = min(following, default=len(content))
        content = content[:old] + entry.strip("\n") + "\n" + content[end:]
    else:
        start = content.index(section) + len(section)
        following = content.find("\n## ", start)
        end = len(content) if following < 0 else following + 1
        content = content[:end].rstrip("\n") + "\n\n" + entry.strip("\n") + "\n\n" + content[end:].lstrip("\n")
    with open(path + ".tmp", "w") as f:
        f.write(content.rstrip("\n") + "\n")
    os.replace(path + ".tmp", path)
