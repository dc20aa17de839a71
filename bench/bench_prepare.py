"""Benchmark prepare_datasets.py: tokens/s against raw tiktoken on the same cores and texts, and peak RSS.

    .venv/bin/python bench/bench_prepare.py                 # prints the numbers and records them
    .venv/bin/python bench/bench_prepare.py --copies 1 10 --no-record

Input, contenders and targets (issue #3) are described under "## Data preparation" in bench/RESULTS.md,
where the results go.
"""

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import results  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import prepare_datasets  # noqa: E402
import sample_text  # noqa: E402
from gpt import get_tokenizer  # noqa: E402

COPIES = (1, 10)          # the two input sizes, in copies of the ~1M-token sample: 10x apart
JOIN = 9                  # docstrings per FineWeb-length document
NUM_PROC = prepare_datasets.NUM_PROC
CHUNK_DOCUMENTS = 10_000  # raw tiktoken is called per chunk so its token lists never pile up in RAM
SECTION = "## Data preparation"
TARGET_RATIO = 0.8
TARGET_RSS_GROWTH = 0.2


def copies_of(texts, copies):
    return [f"{text}\n\n(copy {k})" for k in range(copies) for text in texts]


def write_input(path, texts):
    table = pa.table({"text": pa.array(texts, pa.string()), "id": pa.array([str(i) for i in range(len(texts))])})
    pq.write_table(table, path, row_group_size=2_000)
    return path


def raw_tiktoken(texts, num_threads):
    enc = get_tokenizer()
    return sum(sum(map(len, enc.encode_ordinary_batch(texts[i:i + CHUNK_DOCUMENTS], num_threads=num_threads)))
               for i in range(0, len(texts), CHUNK_DOCUMENTS))


def threads(texts, num_threads):
    """prepare's per-job work on a thread pool: the design prepare_datasets.py did not pick."""
    enc, threshold = get_tokenizer(), prepare_datasets.val_threshold(prepare_datasets.VAL_FRACTION)
    size = prepare_datasets.DOCUMENTS_PER_JOB
    with ThreadPoolExecutor(num_threads) as pool:
        jobs = pool.map(lambda chunk: prepare_datasets.encode_documents(chunk, enc, threshold),
                        (texts[i:i + size] for i in range(0, len(texts), size)))
        return sum(len(tokens) for _, splits, _ in jobs for tokens, _ in splits.values())


def prepare_args(path, output, total_tokens, num_proc):
    # ask for nearly everything, so the run reads (almost) the whole input
    return ["--input", path, "--output", output, "--train-tokens", str(int(total_tokens * 0.95)),
            "--val-tokens", str(int(total_tokens * 0.005)), "--num-proc", str(num_proc), "--force"]


def rate(fn, *args):
    """Tokens per second of fn, which returns a token count or prepare's manifest."""
    seconds, result = results.timed(fn, *args)
    tokens = result if isinstance(result, int) else sum(s["num_tokens"] for s in result["splits"].values())
    return tokens / seconds


# Started from this small launcher, not from the benchmark itself: a child's ru_maxrss counts the
# memory of the process that forked it (Linux keeps the high-water mark across exec), and the
# benchmark holds the whole input in RAM. wait4's usage covers prepare and the workers it waited for.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); _, status, usage = os.wait4(p.pid, 0); print(status, usage.ru_maxrss)")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def rss_kib(pid):
    """A process's resident memory now, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0  # exited meanwhile


def peak_rss_mib(args):
    """(peak RSS of the largest single process, peak of the summed RSS of prepare and its workers
    sampled every 50 ms) for one `python prepare_datasets.py` run, in MiB. The sum counts the
    pages forked workers share with their parent once per process, so it overstates the total."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable,
                                 os.path.join(REPO, "prepare_datasets.py"), *args], stdout=subprocess.PIPE, text=True)
    summed = 0.0
    while launcher.poll() is None:
        for prepare in children(launcher.pid):
            summed = max(summed, sum(map(rss_kib, [prepare, *children(prepare)])) / 1024)
        time.sleep(0.05)
    status, maxrss_kib = map(int, launcher.stdout.read().split())
    if status != 0:
        raise SystemExit(f"error: prepare_datasets.py {' '.join(args)} failed (status {status})")
    return maxrss_kib / 1024, summed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, nargs=2, default=COPIES,
                        help="the small and large input sizes, in copies of the ~1M-token sample")
    parser.add_argument("--num-proc", type=int, default=NUM_PROC, help="cores for every contender")
    results.add_no_record(parser)
    args = parser.parse_args(argv)

    load_before = results.load_average()
    docstrings = [d["text"] for d in sample_text.iter_documents()]
    shapes = {"docstrings (short)": docstrings,
              f"{JOIN} docstrings joined (FineWeb-length)":
                  ["\n\n".join(docstrings[i:i + JOIN]) for i in range(0, len(docstrings), JOIN)]}
    small, large = sorted(args.copies)
    rates, rss = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, base in shapes.items():
            texts = copies_of(base, large)
            path = write_input(os.path.join(tmp, "input.parquet"), texts)
            (seconds, total), out = results.timed(raw_tiktoken, texts, args.num_proc), os.path.join(tmp, "out")
            rates[shape] = (total, len(texts), total / seconds, rate(threads, texts, args.num_proc),
                            rate(prepare_datasets.main, prepare_args(path, out, total, args.num_proc)),
                            rate(prepare_datasets.main, prepare_args(path, out, total, 1)))
        for copies in (small, large):
            # the last shape: FineWeb-length documents
            path = write_input(os.path.join(tmp, f"x{copies}.parquet"), copies_of(base, copies))
            tokens = total * copies // large
            rss[copies] = (tokens, peak_rss_mib(prepare_args(path, os.path.join(tmp, f"rss{copies}"), tokens, args.num_proc)))

    load = results.load_average()
    growth = rss[large][1][0] / rss[small][1][0] - 1
    growth_summed = rss[large][1][1] / rss[small][1][1] - 1
    lines = [
        f"### {datetime.date.today().isoformat()}: {results.machine()} ({args.num_proc} cores used)",
        "",
        f"Command: `{results.command('bench/bench_prepare.py', argv)}` "
        f"(P = --num-proc {args.num_proc}; input: Python's docs x{large}; load average {load_before:.1f} "
        f"before, {load:.1f} after: other processes were sharing these cores)",
        "",
        "| documents | tokens | raw tiktoken `encode_ordinary_batch(num_threads=P)` | prepare's jobs on P threads, "
        "no I/O | `prepare_datasets.py`, P processes | `prepare_datasets.py`, 1 process |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {shape}: {n_docs:,} | {total:,} | {raw:,.0f} tok/s | {threaded:,.0f} tok/s ({threaded / raw:.2f}x) | "
          f"{processes:,.0f} tok/s (**{processes / raw:.2f}x**) | {single:,.0f} tok/s ({single / raw:.2f}x) |"
          for shape, (total, n_docs, raw, threaded, processes, single) in rates.items()],
        "",
        f"Target: `prepare_datasets.py` with P processes >= {TARGET_RATIO}x raw tiktoken.",
        "",
        "| FineWeb-length input | peak RSS, largest process (ru_maxrss) | peak RSS, prepare + workers summed (/proc every 50 ms) |",
        "|---|---:|---:|",
        *[f"| {tokens:,} tokens | {one:,.1f} MiB | {summed:,.1f} MiB |" for tokens, (one, summed) in (rss[small], rss[large])],
        "",
        f"Peak RSS changes {growth:+.1%} (largest process) and {growth_summed:+.1%} (summed) for "
        f"{large // small}x the input (target: within {TARGET_RSS_GROWTH:.0%}).",
    ]
    results.publish("\n".join(lines), SECTION, args.no_record)


if __name__ == "__main__":
    main()
