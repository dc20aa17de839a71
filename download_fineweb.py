"""Download FineWeb and/or FineWeb-Edu sample parquet files from the Hugging Face Hub, then check them.

    python download_fineweb.py                                   # FineWeb's 10BT sample (~29 GiB) into fineweb/
    python download_fineweb.py --dataset fineweb-edu --max-files 2   # a partial download to try things
    python download_fineweb.py --check-only                      # re-check what is already on disk
    python download_fineweb.py --max-rows 2000                   # just the first rows: a quick look
    python download_fineweb.py --tokens llmc --max-files 2       # GPT-2 tokens others published, no parquet

Files land in DEST/<dataset>/sample/<sample>/*.parquet (the Hub's own layout), so the next step is:

    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --output datasets/fineweb-10BT

Re-running resumes: a file already on disk at its full size is not fetched again, and an interrupted
one continues where it stopped. Afterwards every file's parquet footer is opened and its rows and
bytes reported, so a truncated file shows up now rather than an hour into preparation.
"""

import argparse
import glob
import os

import cli

DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
DATASET = "fineweb"
SAMPLES = ("10BT", "100BT", "350BT")  # the sample subsets both repos publish, in billions of GPT-2 tokens
SAMPLE = "10BT"                       # about 10B tokens: more than the 3.3B a Chinchilla-sized run needs
DEST = "."
MAX_FILES = None                      # None = the whole sample
MAX_ROWS = None                       # a number: fetch only the first rows of the first file
# GPT-2 token sets on the Hub (prepare_datasets.py --from-tokens reads both; evaluate.py --eval-set scores
# their published windows): validation files first, then the train files --max-files counts.
TOKEN_SETS = {
    "gpjt": ("gpjt/fineweb-gpt2-tokens", "validation", "train"),  # Giles Thomas's: one file per split
    "llmc": ("kjj0/fineweb10B-gpt2", "fineweb_val_", "fineweb_train_"),  # llm.c's: 100M tokens a file
}


class DownloadError(Exception):
    """Printed by main() as one line, with a non-zero exit."""


def sample_folder(dest, dataset, sample):
    return os.path.normpath(os.path.join(dest, dataset, "sample", sample))


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def offline_hint(dest, dataset, sample):
    return ("to prepare parquet files you already have, run: python prepare_datasets.py "
            f"--input '{sample_folder(dest, dataset, sample)}/*.parquet' --output DIR")


def check_hub_reachable(hint):
    """Fail fast with one line: the Hub client would otherwise retry for half a minute per request."""
    from huggingface import hub_unreachable_reason  # here: it imports torch, which an error need not wait for
    reason = hub_unreachable_reason()
    if reason:
        raise DownloadError(f"{reason}; {hint}")


def list_sample_files(repo, sample):
    """(path in repo, size in bytes) of the sample's parquet files, in name order."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        entries = HfApi().list_repo_tree(repo, path_in_repo=f"sample/{sample}", repo_type="dataset")
        files = sorted((e.path, e.size) for e in entries if e.path.endswith(".parquet"))
    except (HfHubHTTPError, OSError) as e:
        raise DownloadError(f"cannot list {repo} sample/{sample} on the Hub ({str(e).splitlines()[0]})") from None
    if not files:
        raise DownloadError(f"{repo} has no parquet files under sample/{sample}")
    return files


def download_file(repo, path, size, dest):
    """Fetch one file into dest (the Hub's layout); skip it if it is already there at full size."""
    from huggingface_hub import hf_hub_download

    local = os.path.join(dest, path)
    if os.path.isfile(local) and os.path.getsize(local) == size:
        return local, False
    try:
        # hf_hub_download shows a byte progress bar (rate, ETA) and resumes a partial *.incomplete file.
        # A finished file of the wrong size is not a partial download but a damaged or outdated one.
        return hf_hub_download(repo, path, repo_type="dataset", local_dir=dest,
                               force_download=os.path.exists(local)), True
    except Exception as e:  # network drop, disk full, ...: say which file and that re-running resumes
        raise DownloadError(f"downloading {repo}/{path} failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "run the same command again to resume") from None


def check_parquet(path):
    """Rows and bytes from the parquet footer, or the reason the file is unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        return {"path": path, "bytes": os.path.getsize(path), "error": str(e).splitlines()[0]}
    return {"path": path, "bytes": os.path.getsize(path), "rows": metadata.num_rows,
            "row_groups": metadata.num_row_groups}


def report(paths):
    """Print one line per file and a total; returns the damaged files."""
    results = [check_parquet(path) for path in paths]
    for r in results:
        status = f"DAMAGED: {r['error']}" if "error" in r else f"{r['rows']:>12,} rows"
        print(f"{r['path']}  {human_bytes(r['bytes']):>12}  {status}")
    good = [r for r in results if "error" not in r]
    print(f"{len(good)} of {len(results)} files readable: {sum(r['rows'] for r in good):,} rows, "
          f"{human_bytes(sum(r['bytes'] for r in results))}")
    return [r["path"] for r in results if "error" in r]


def download_sample(dataset, sample, dest, max_files):
    repo = DATASETS[dataset]
    root = os.path.join(dest, dataset)
    check_hub_reachable(offline_hint(dest, dataset, sample))
    files = list_sample_files(repo, sample)[:max_files]
    print(f"{repo} sample/{sample}: {len(files)} files, {human_bytes(sum(s for _, s in files))} -> {root}")
    local_paths = []
    for i, (path, size) in enumerate(files, start=1):
        local, fetched = download_file(repo, path, size, root)
        print(f"[{i}/{len(files)}] {path}: {'downloaded' if fetched else 'already complete, skipped'}")
        local_paths.append(local)
    return local_paths


def download_tokens(name, dest, max_files):
    """A published token set into DEST/NAME/: its validation file(s) and the first max_files train files."""
    from huggingface_hub import HfApi
    repo, val_prefix, train_prefix = TOKEN_SETS[name]
    check_hub_reachable("prepare parquet you already have with prepare_datasets.py --input instead")
    try:
        entries = [e for e in HfApi().list_repo_tree(repo, repo_type="dataset") if getattr(e, "size", None)]
    except Exception as e:  # the Hub answered the probe but not this
        raise DownloadError(f"cannot list {repo} on the Hub ({type(e).__name__}); run again later") from None
    val = sorted((e.path, e.size) for e in entries if e.path.startswith(val_prefix))
    train = sorted((e.path, e.size) for e in entries if e.path.startswith(train_prefix))[:max_files]
    root = os.path.join(dest, name)
    print(f"{repo}: {len(val)} validation and {len(train)} train file(s), "
          f"{human_bytes(sum(s for _, s in val + train))} -> {root}")
    paths = [download_file(repo, path, size, root)[0] for path, size in val + train]
    print(f"next: python prepare_datasets.py --from-tokens '{root}/*' --output datasets/{name}-tokens")
    return paths


def download_slice(dataset, sample, dest, max_rows):
    """The first max_rows documents of the sample's first file, without fetching the whole ~2 GB file:
    parquet is read row group by row group, and HfFileSystem turns each read into an HTTP range request."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem

    repo = DATASETS[dataset]
    out = os.path.join(dest, dataset, "slice", f"{sample}-first-{max_rows}-rows.parquet")
    if os.path.isfile(out):
        print(f"{out}: already complete, skipped")
        return [out]
    check_hub_reachable(offline_hint(dest, dataset, sample))
    path = list_sample_files(repo, sample)[0][0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    partial, rows, writer = out + ".partial", 0, None
    try:
        with HfFileSystem().open(f"datasets/{repo}/{path}", "rb") as remote:
            source = pq.ParquetFile(remote)
            for group in range(source.num_row_groups):
                table = source.read_row_group(group).slice(0, max_rows - rows)
                writer = writer or pq.ParquetWriter(partial, table.schema)
                writer.write_table(table)
                rows += table.num_rows
                if rows >= max_rows:
                    break
    except OSError as e:
        raise DownloadError(f"reading {repo}/{path} failed ({str(e).splitlines()[0]}); run again to retry") from None
    finally:
        if writer is not None:
            writer.close()
    os.replace(partial, out)  # only a finished slice gets the real name
    print(f"{repo}/{path}: first {rows:,} rows -> {out}")
    return [out]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--dataset", nargs="+", choices=list(DATASETS), default=[DATASET],
                        help="which dataset(s): fineweb, fineweb-edu or both")
    parser.add_argument("--sample", choices=SAMPLES, default=SAMPLE, help="which sample subset")
    parser.add_argument("--dest", default=DEST, help="folder that receives <dataset>/sample/<sample>/")
    parser.add_argument("--max-files", type=cli.non_negative_int, default=MAX_FILES,
                        help="download only the first N files of the sample, or with --tokens the first N train "
                             "files (0: the validation file(s) alone, for evaluation) (default: all of them)")
    parser.add_argument("--max-rows", type=cli.positive_int, default=MAX_ROWS,
                        help="fetch only the first N documents of the sample's first file (a quick look)")
    parser.add_argument("--tokens", choices=list(TOKEN_SETS),
                        help="instead of parquet, GPT-2 tokens others published: gpjt (Giles Thomas's, "
                             "gpjt/fineweb-gpt2-tokens) or llmc (llm.c's, kjj0/fineweb10B-gpt2); --max-files counts "
                             "their train files")
    parser.add_argument("--check-only", action="store_true",
                        help="download nothing; just check the parquet files already in the destination")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.tokens:
            return download_tokens(args.tokens, args.dest, args.max_files)
        paths = []
        for dataset in args.dataset:
            if args.check_only:
                found = sorted(glob.glob(os.path.join(sample_folder(args.dest, dataset, args.sample), "*.parquet")))
                if not found:
                    raise DownloadError(f"no parquet files in {sample_folder(args.dest, dataset, args.sample)}")
                paths += found[:args.max_files]
            elif args.max_rows:
                paths += download_slice(dataset, args.sample, args.dest, args.max_rows)
            else:
                paths += download_sample(dataset, args.sample, args.dest, args.max_files)
        damaged = report(paths)
        if damaged:
            raise DownloadError(f"{len(damaged)} file(s) are damaged ({', '.join(damaged)}); "
                                "delete them and run again to fetch them afresh")
    except DownloadError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run the same command again to resume") from None
    return paths


if __name__ == "__main__":
    main()
