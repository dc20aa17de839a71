"""Download FineWeb and/or FineWeb-Edu sample parquet files from the Hugging Face Hub, then check them.

    python download_fineweb.py                                   # FineWeb's 10BT sample (~29 GiB) into fineweb/
    python download_fineweb.py --dataset fineweb-edu --max-files 2   # a partial download to try things
    python download_fineweb.py --check-only                      # re-check what is already on disk
    python download_fineweb.py --max-rows 2000                   # just the first rows: a quick look
    python download_fineweb.py --tokens llmc --max-files 2       # GPT-2 tokens others published, no parquet

Files land in DEST/<dataset>/sample/<sample>/*.parquet, the Hub's own layout. Re-running resumes.
Every file's parquet footer is then opened, so a truncated file shows up now, not an hour into preparation.
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


def check_hub_reachable(flag, files):
    """Fail fast with one line: the Hub client would otherwise retry for half a minute per request."""
    from huggingface import hub_unreachable_reason  # here: it imports torch, which an error need not wait for
    reason = hub_unreachable_reason()
    if reason:
        raise DownloadError(f"{reason}; to prepare files you already have, run: python prepare_datasets.py "
                            f"{flag} {files} --output DIR")


def list_files(repo, folder=None, suffix=""):
    """(path in repo, size in bytes) of the dataset repo's files (in folder, named *suffix), in name order."""
    from huggingface_hub import HfApi
    where = f"{repo}{'/' + folder if folder else ''}"
    try:
        entries = HfApi().list_repo_tree(repo, path_in_repo=folder, repo_type="dataset")
        files = sorted((e.path, e.size) for e in entries if getattr(e, "size", None) and e.path.endswith(suffix))
    except Exception as e:  # the Hub answered the probe but not this
        raise DownloadError(f"cannot list {where} on the Hub ({type(e).__name__}: {cli.first_line(e)}); "
                            "run again later") from None
    if not files:
        raise DownloadError(f"{where} on the Hub holds no{' ' + suffix if suffix else ''} files; check --sample "
                            "against the dataset's page on the Hub")
    return files


def download_files(repo, files, dest):
    """Fetch the files into dest (the Hub's layout), skipping those already there at full size."""
    from huggingface_hub import hf_hub_download

    print(f"{repo}: {len(files)} file(s), {human_bytes(sum(size for _, size in files))} -> {dest}")
    paths = []
    for i, (path, size) in enumerate(files, start=1):
        local = os.path.join(dest, path)
        done = os.path.isfile(local) and os.path.getsize(local) == size
        if not done:
            try:
                # hf_hub_download shows a byte progress bar and resumes a partial *.incomplete file. A
                # finished file of the wrong size is not a partial download but a damaged or outdated one.
                local = hf_hub_download(repo, path, repo_type="dataset", local_dir=dest,
                                        force_download=os.path.exists(local))
            except Exception as e:  # network drop, disk full, ...: say which file and that re-running resumes
                raise DownloadError(f"downloading {repo}/{path} failed ({type(e).__name__}: {cli.first_line(e)}); "
                                    "run the same command again to resume") from None
        print(f"[{i}/{len(files)}] {path}: {'already complete, skipped' if done else 'downloaded'}")
        paths.append(local)
    return paths


def report(paths):
    """Print one line per file, with its rows from the parquet footer, and a total; returns the damaged files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, damaged = 0, []
    for path in paths:
        try:
            n = pq.ParquetFile(path).metadata.num_rows
            rows, status = rows + n, f"{n:>12,} rows"
        except (pa.ArrowException, OSError) as e:
            status = f"DAMAGED: {cli.first_line(e)}"
            damaged.append(path)
        print(f"{path}  {human_bytes(os.path.getsize(path)):>12}  {status}")
    print(f"{len(paths) - len(damaged)} of {len(paths)} files readable: {rows:,} rows, "
          f"{human_bytes(sum(os.path.getsize(p) for p in paths))}")
    return damaged


def download_tokens(name, dest, max_files):
    """A published token set into DEST/NAME/: its validation file(s) and the first max_files train files."""
    repo, val_prefix, train_prefix = TOKEN_SETS[name]
    folder = os.path.normpath(os.path.join(dest, name))
    check_hub_reachable("--from-tokens", folder)
    files = list_files(repo)
    val = [f for f in files if f[0].startswith(val_prefix)]
    train = [f for f in files if f[0].startswith(train_prefix)][:max_files]
    paths = download_files(repo, val + train, folder)
    print(f"next: python prepare_datasets.py --from-tokens {folder} --output datasets/{name}-tokens")
    return paths


def download_slice(dataset, sample, dest, max_rows):
    """The first max_rows documents of the sample's first ~2 GB file, read by row group as HTTP range requests."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem

    repo = DATASETS[dataset]
    out = os.path.join(dest, dataset, "slice", f"{sample}-first-{max_rows}-rows.parquet")
    if os.path.isfile(out):
        print(f"{out}: already complete, skipped")
        return [out]
    check_hub_reachable("--input", f"'{sample_folder(dest, dataset, sample)}/*.parquet'")
    path = list_files(repo, f"sample/{sample}", ".parquet")[0][0]
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
        raise DownloadError(f"reading {repo}/{path} failed ({cli.first_line(e)}); run again to retry") from None
    finally:
        if writer is not None:
            writer.close()
    os.replace(partial, out)  # only a finished slice gets the real name
    print(f"{repo}/{path}: first {rows:,} rows -> {out}")
    return [out]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--dataset", nargs="+", choices=list(DATASETS), default=[DATASET],
                        help="which dataset(s): fineweb, fineweb-edu or both")
    parser.add_argument("--sample", choices=SAMPLES, default=SAMPLE, help="which sample subset")
    parser.add_argument("--dest", default=DEST, help="folder that receives <dataset>/sample/<sample>/")
    parser.add_argument("--max-files", type=cli.non_negative_int, default=MAX_FILES,
                        help="only the first N files of the sample, or with --tokens the first N train files (0: "
                             "the validation file(s) alone, for evaluation) (default: all of them)")
    parser.add_argument("--max-rows", type=cli.positive_int, default=MAX_ROWS,
                        help="fetch only the first N documents of the sample's first file (a quick look)")
    parser.add_argument("--tokens", choices=list(TOKEN_SETS),
                        help="instead of parquet, GPT-2 tokens others published: gpjt (Giles Thomas's) or llmc "
                             "(llm.c's); --max-files counts their train files")
    parser.add_argument("--check-only", action="store_true", help="download nothing; check the files in --dest")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    kept = "the files downloaded so far are kept; run the same command again to resume"
    with cli.errors_end_in_one_line(DownloadError, stopped=lambda: kept):
        if args.tokens:
            return download_tokens(args.tokens, args.dest, args.max_files)
        paths = []
        for dataset in args.dataset:
            folder = sample_folder(args.dest, dataset, args.sample)
            if args.check_only:
                found = sorted(glob.glob(os.path.join(folder, "*.parquet")))
                if not found:
                    raise DownloadError(f"no parquet files in {folder}; download them first (leave out "
                                        "--check-only) or pass the --dest and --sample they were downloaded with")
                paths += found[:args.max_files]
            elif args.max_rows:
                paths += download_slice(dataset, args.sample, args.dest, args.max_rows)
            else:
                check_hub_reachable("--input", f"'{folder}/*.parquet'")
                repo = DATASETS[dataset]
                files = list_files(repo, f"sample/{args.sample}", ".parquet")[:args.max_files]
                paths += download_files(repo, files, os.path.join(args.dest, dataset))
        damaged = report(paths)
        if damaged:
            raise DownloadError(f"{len(damaged)} file(s) are damaged ({', '.join(damaged)}); "
                                "delete them and run again to fetch them afresh")
    return paths


if __name__ == "__main__":
    main()
