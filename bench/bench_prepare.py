"""Benchmark prepare_datasets.py: tokens/s against raw tiktoken on the same cores and texts, and peak RSS.

    .venv/bin/python bench/bench_prepare.py                 # prints the numbers and records them
    .venv/bin/python bench/bench_prepare.py --copies 1 10 --no-record

The input is Python's own documentation (sample_text.py, ~1M GPT-2 tokens), repeated with a
numbered suffix per copy so every document is distinct (and the split sees new hashes), written as
FineWeb-schema parquet, in two shapes: the docstrings as they are (short, ~76 tokens each) and
joined 9 at a time (~680 tokens each, about FineWeb 10BT's mean: 10B tokens in 14.9M rows).
Per shape, measured in one run on this machine over the same texts:
  1. raw tiktoken: encode_ordinary_batch(texts, num_threads=P), the tokenizer alone (results thrown
     away chunk by chunk so they do not pile up in RAM);
  2. the design we did not pick: prepare's own job (split + encode_ordinary + int32 arrays) on a
     pool of P threads instead of P processes, without reading or writing files;
  3. prepare_datasets.main, in this process, with P worker processes and with 1 (tokens written /
     wall time, including reading the parquet and writing the shards);
Then the peak RSS of `python prepare_datasets.py` in a subprocess for FineWeb-length input of two
sizes 10x apart, from os.wait4's rusage of that one child.
Targets (issue #3): prepare >= 0.8x raw tiktoken; peak RSS within 20% across the two sizes.
Results go to bench/RESULTS.md under "## Data preparation".
"""

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import results  # noqa: E402
from bench.results import RESULTS  # noqa: E402

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


def raw_tiktoken_rate(texts, num_threads):
    enc = get_tokenizer()
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(texts), CHUNK_DOCUMENTS):
        tokens += sum(map(len, enc.encode_ordinary_batch(texts[i:i + CHUNK_DOCUMENTS], num_threads=num_threads)))
    return tokens, tokens / (time.perf_counter() - start)


def threads_rate(texts, num_threads):
    """prepare's per-job work on a thread pool: the design prepare_datasets.py did not pick."""
    enc, threshold = get_tokenizer(), prepare_datasets.val_threshold(prepare_datasets.VAL_FRACTION)
    size = prepare_datasets.DOCUMENTS_PER_JOB
    job = lambda chunk: prepare_datasets.encode_documents(chunk, enc, threshold)  # noqa: E731
    start = time.perf_counter()
    with ThreadPoolExecutor(num_threads) as pool:
        results = pool.map(job, (texts[i:i + size] for i in range(0, len(texts), size)))
        tokens = sum(len(tokens) for _, splits, _ in results for tokens, _ in splits.values())
    return tokens / (time.perf_counter() - start)


def prepare_args(path, output, total_tokens, num_proc):
    # ask for nearly everything, so the run reads (almost) the whole input
    return ["--input", path, "--output", output, "--train-tokens", str(int(total_tokens * 0.95)),
            "--val-tokens", str(int(total_tokens * 0.005)), "--num-proc", str(num_proc), "--force"]


def prepare_rate(args):
    start = time.perf_counter()
    manifest = prepare_datasets.main(args)
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    return tokens / (time.perf_counter() - start)


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


def tree_rss_mib(root_pid):
    """Resident memory of a process and its children now, from /proc (Linux), in MiB."""
    total = 0
    for status in os.listdir("/proc"):
        if not status.isdigit():
            continue
        try:
            with open(f"/proc/{status}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        if int(status) == root_pid or int(fields["PPid"]) == root_pid:
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


def peak_rss_mib(args):
    """(peak RSS of the largest single process, peak of the summed RSS of prepare and its workers
    sampled every 50 ms) for one `python prepare_datasets.py` run, in MiB. The sum counts the
    pages forked workers share with their parent once per process, so it overstates the total."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable,
                                 os.path.join(REPO, "prepare_datasets.py"), *args], stdout=subprocess.PIPE, text=True)
    summed = 0.0
    while launcher.poll() is None:
        for child in children(launcher.pid):  # the prepare process
            summed = max(summed, tree_rss_mib(child))
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
    parser.add_argument("--no-record", action="store_true", help=f"print only; do not append to {RESULTS}")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    docstrings = [d["text"] for d in sample_text.iter_documents()]
    shapes = {"docstrings (short)": docstrings,
              f"{JOIN} docstrings joined (FineWeb-length)":
                  ["\n\n".join(docstrings[i:i + JOIN]) for i in range(0, len(docstrings), JOIN)]}
    small, large = sorted(args.copies)
    rates, rss = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, base in shapes.items():
            texts = copies_of(base, large)
            path = os.path.join(tmp, "input.parquet")
            write_input(path, texts)
            total, raw = raw_tiktoken_rate(texts, args.num_proc)
            threaded = threads_rate(texts, args.num_proc)
            out = os.path.join(tmp, "out")
            processes = prepare_rate(prepare_args(path, out, total, args.num_proc))
            single = prepare_rate(prepare_args(path, out, total, 1))
            rates[shape] = (total, len(texts), raw, threaded, processes, single)
        for copies in (small, large):
            path = os.path.join(tmp, f"x{copies}.parquet")
            write_input(path, copies_of(base, copies))  # the last shape: FineWeb-length documents
            tokens = total * copies // large
            rss[copies] = (tokens, peak_rss_mib(prepare_args(path, os.path.join(tmp, f"rss{copies}"), tokens, args.num_proc)))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    growth = rss[large][1][0] / rss[small][1][0] - 1
    growth_summed = rss[large][1][1] / rss[small][1][1] - 1
    lines = [
        f"### {datetime.date.today().isoformat()}: {results.machine()} ({args.num_proc} cores used)",
        "",
        f"Command: `{shlex.join(['python', 'bench/bench_prepare.py', *(argv if argv is not None else sys.argv[1:])])}` "
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
        f"Peak RSS changes {growth:+.1%} (largest process) and {growth_summed:+.1%} (summed) for 10x the input "
        f"(target: within {TARGET_RSS_GROWTH:.0%}).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        results.record(text, SECTION)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
