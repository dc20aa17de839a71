"""Turn text into GPT-2 token shards for training and validation, in bounded memory: FineWeb's parquet
files, your own text files, a Hugging Face dataset, or GPT-2 tokens others published.

    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --output datasets/fineweb-10BT
    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --analyze     # look before you cut
    python prepare_datasets.py --input my_books/ --train-tokens all --val-fraction 0.1 --output datasets/books
    python prepare_datasets.py --hub-dataset roneneldan/TinyStories --train-tokens all --output datasets/tinystories
    python prepare_datasets.py --from-tokens gpjt --output datasets/gpjt-tokens

Documents are split by a hash of their text (SPLIT_RULE), tokenized and packed (PACKING), cut at exactly
the token counts asked for, and written as DIR/{train,val}-0000N.safetensors plus DIR/manifest.json.
"""

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import struct
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import cli
import files
import reference

INPUT = "fineweb/sample/10BT/*.parquet"  # where download_fineweb.py puts FineWeb's 10BT sample
OUTPUT = "datasets/fineweb-10BT"
TEXT_FIELD = "text"           # FineWeb's column, and the usual name in JSON lines and Hub datasets
HUB_SPLIT = "train"

# The RTX 3090 run's splits (reference.py): 534,200 training batches and 3,200 validation batches
# of 6 x 1,024. The +1 is the target of the last position, so every one of those batches is whole.
TRAIN_TOKENS = reference.TRAIN_TOKENS + 1  # 3,282,124,801
VAL_TOKENS = reference.VAL_TOKENS + 1      # 19,660,801
ALL = "all"                   # --train-tokens / --val-tokens: every token of that split there is
SKIP_TRAIN_TOKENS = 0
VAL_FRACTION = 0.01           # share of documents (not tokens) that go to validation
SHARD_TOKENS = 100_000_000    # 400 MB per shard file
NUM_PROC = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
DOCUMENTS_PER_JOB = 256       # one unit of worker work: ~170k tokens of FineWeb, a few hundredths of a second
READ_ROWS = 1024              # rows a parquet or `datasets` reader takes at a time
ANALYZE_DOCUMENTS = 100_000   # documents the analysis tokenizes (0 = all)
HISTOGRAM = "out/token_lengths.png"  # out/ is git-ignored

EOT_TOKEN = 50256             # <|endoftext|>, as in gpt.py (not imported: gpt.py pulls in torch)
SPLIT_RULE = ("a document is in val iff int.from_bytes(hashlib.blake2b(text.encode('utf-8'), "
              "digest_size=8).digest(), 'big') < round(val_fraction * 2**64), else in train")
TOKENIZER_NOTE = ("tiktoken GPT-2 encode_ordinary: a literal '<|endoftext|>' inside a document is encoded "
                  "as ordinary text; token 50256 appears only as the separator after each document")
PACKING = ("each document's tokens then one <|endoftext|> (50256); a split's documents concatenated in "
           "input order (files sorted by name, rows in file order; a Hub dataset in its own order) and cut "
           "at exactly num_tokens (a split asked for all of the input ends with its last document); "
           "no padding, no cropping")
FIX_FIELD = "pass --text-field with the one that holds the text"


class PrepareError(Exception):
    """Bad input or a failed run; main() prints the message as one line and exits non-zero."""


# ---------------------------------------------------------------- input

# Each input flag's kinds of file, by name, and what it reads, in words.
KINDS = {"--input": {".parquet": "parquet", ".txt": "txt", ".jsonl": "jsonl", ".json": "json"},
         "--from-tokens": {".bin": "llmc", ".safetensors": "gpjt"}}
READS = {"--input": ".parquet, .txt, .jsonl and .json files and datasets' save_to_disk folders",
         "--from-tokens": "llm.c's fineweb_{train,val}_*.bin and gpjt's {train,validation}.safetensors files"}
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # what save_to_disk writes


def kind_of(path, flag):
    """A file's kind by its name, "saved" for a save_to_disk folder (--input), or None."""
    if os.path.isdir(path):
        saved = flag == "--input" and any(os.path.isfile(os.path.join(path, f)) for f in SAVED_DATASET_FILES)
        return "saved" if saved else None
    return KINDS[flag].get(os.path.splitext(path)[1].lower())


def find_files(patterns, flag):
    """[(path, kind)] the paths or quoted globs given to flag match, in name order, each once; a folder means the
    files of the kinds read directly in it, hidden ones left out as by * (download_fineweb.py's .cache)."""
    reads = READS[flag]
    found = {}
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.expanduser(pattern))):
            if os.path.isdir(path) and not kind_of(path, flag):
                inside = sorted(p for p in glob.glob(os.path.join(glob.escape(path), "*")) if os.path.isfile(p))
                paths = [p for p in inside if kind_of(p, flag)]
                if not paths:
                    raise PrepareError(f"{path} holds none of the files {flag} reads ({reads}); "
                                       f"point {flag} at those")
                if len(paths) < len(inside):
                    print(f"note: {path}: reading {len(paths)} of its {len(inside)} files ({flag} reads {reads})")
            elif not kind_of(path, flag):
                raise PrepareError(f"{path}: cannot tell what it holds from its name; {flag} reads {reads}")
            else:
                paths = [path]
            for p in paths:
                found.setdefault(p, kind_of(p, flag))
    if not found:
        raise PrepareError(f"no files match {' '.join(patterns)}; give {flag} paths, folders or a quoted glob "
                           f"of {reads}, or download some with download_fineweb.py"
                           f"{' --tokens gpjt' if flag == '--from-tokens' else ''}")
    return list(found.items())


def check_column(where, schema, field):
    """One line unless the Arrow schema has a string column named field."""
    if field not in schema.names:
        raise PrepareError(f"{where} has no {field!r} column (it has: {', '.join(schema.names)}); {FIX_FIELD}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(f"{where}: column {field!r} holds {kind}, not strings; {FIX_FIELD}")


def text_source(path, kind, args):
    """An --input as the readers take it and the manifest records it. A parquet footer is read now, to catch
    a truncated file or a missing column before any work; other kinds are checked as they are read."""
    inside = glob.glob(os.path.join(glob.escape(path), "**"), recursive=True) if kind == "saved" else [path]
    source = {"kind": kind, "path": path, "bytes": sum(os.path.getsize(p) for p in inside if os.path.isfile(p))}
    if kind == "saved" and os.path.isfile(os.path.join(path, "dataset_dict.json")):
        source["split"] = args.hub_split
    if kind == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"cannot read {path} as parquet ({cli.first_line(e)}); re-download it "
                               "(download_fineweb.py resumes) or remove it from --input") from None
        check_column(path, parquet.schema_arrow, args.text_field)
        source["rows"] = parquet.metadata.num_rows
    return source


def text_of(row, field, where):
    """A JSON row's document: the string (or null) in its field, else a one-line error naming the place."""
    if not isinstance(row, dict):
        raise PrepareError(f"{where} is a JSON {type(row).__name__}, not an object with a {field!r} field")
    if field not in row:
        raise PrepareError(f"{where} has no field {field!r} (it has: {', '.join(row) or 'none'}); {FIX_FIELD}")
    if row[field] is not None and not isinstance(row[field], str):
        raise PrepareError(f"{where}: field {field!r} holds a {type(row[field]).__name__}, not text; {FIX_FIELD}")
    return row[field]


# One reader per kind: each yields a source's documents in order (None for a null), and says in one
# line what is wrong, naming the file and the place, when it cannot.

def read_parquet(source, field):
    try:
        parquet = pq.ParquetFile(source["path"])
        # One row group per call: a single iter_batches over the whole file keeps every
        # pre-buffered row group until the end (pyarrow 26: +50 MB per 57 MB file read).
        for row_group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=[field], row_groups=[row_group]):
                yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{source['path']} is damaged ({cli.first_line(e)}); re-download it") from None


def read_txt(source, field):
    try:
        with open(source["path"], encoding="utf-8-sig", newline="") as f:  # a byte-order mark is not text
            text = f.read()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{source['path']} is not UTF-8 text (byte {e.start:,}); convert it "
                           "(iconv -f LATIN1 -t UTF-8) or leave it out of --input") from None
    yield text


def read_json(source, field):
    """JSON lines (as datasets' to_json writes them, even under a .json name), or one JSON list of objects."""
    path, number = source["path"], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        is_list = f.read(1 << 16).lstrip().startswith("[")
    if is_list:
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise PrepareError(f"{path} is not a JSON list{where} ({getattr(e, 'msg', 'not UTF-8')}); fix it, "
                               "or write one JSON object per line (.jsonl)") from None
        yield from (text_of(row, field, f"{path} item {number}") for number, row in enumerate(rows))
        return
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line (often the last) is no document
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path} line {number} is not JSON ({e.msg}, column {e.colno}); "
                                       "fix or delete that line") from None
                yield text_of(row, field, f"{path} line {number}")
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not UTF-8 text after line {number:,}; convert it (iconv -t UTF-8)") from None


def read_datasets(source, field):
    """A save_to_disk folder (memory-mapped, read in place) or a dataset load_dataset streams as it downloads."""
    import datasets  # here, not at the top: a second or two to import, and only these inputs need it
    name, what = source.get("name", ""), input_name([source])
    if "/" in name and not os.path.exists(name):  # a Hub name, not a builder (json, csv...) or a local folder
        from huggingface import hub_unreachable_reason  # here: it imports torch; an offline error need not wait
        reason = hub_unreachable_reason()  # asked once: datasets would retry for half a minute, printing
        if reason:
            raise PrepareError(f"{reason}; save the dataset where the Hub is reachable "
                               "(datasets' save_to_disk) and pass that folder to --input")
    try:
        if source["kind"] == "hub":
            dataset = datasets.load_dataset(name, source["config"], split=source["split"],
                                            data_files=source["data_files"], streaming=True)
        else:
            dataset = datasets.load_from_disk(source["path"])
            if isinstance(dataset, datasets.DatasetDict):
                if source.get("split") not in dataset:
                    raise PrepareError(f"{what} has no split {source.get('split')!r} (it has: "
                                       f"{', '.join(dataset)}); pass --hub-split with one of those")
                dataset = dataset[source["split"]]
            check_column(what, dataset.features.arrow_schema, field)
            dataset = dataset.select_columns([field])
        for number, row in enumerate(dataset):
            yield text_of(row, field, f"{what} row {number}")
    except PrepareError:
        raise
    except Exception as e:  # datasets' and the Hub's many errors: a wrong name, split or config, a lost link
        raise PrepareError(f"cannot read {what} with datasets ({type(e).__name__}: {cli.first_line(e)}); " +
                           ("save it again" if source["kind"] == "saved" else
                            "check the name, --hub-split and --hub-config against its Hub page")) from None


READERS = {"parquet": read_parquet, "txt": read_txt, "jsonl": read_json, "json": read_json,
           "saved": read_datasets, "hub": read_datasets}


def input_name(sources):
    if sources[0]["kind"] == "hub":
        return f"{sources[0]['name']} (split {sources[0]['split']!r})"
    return sources[0]["path"] if len(sources) == 1 else f"the {len(sources)} inputs"


def text_batches(sources, args):
    """Lists of --documents-per-job texts (None for nulls) from every source in turn. The first is read now,
    before any progress bar: a wrong --text-field or an input with no documents ends in one line."""
    texts = itertools.chain.from_iterable(READERS[s["kind"]](s, args.text_field) for s in sources)
    batches = iter(lambda: list(itertools.islice(texts, args.documents_per_job)), [])
    first = next(batches, None)
    if first is None:
        raise PrepareError(f"{input_name(sources)} holds no documents; check --input"
                           f"{' and --hub-split' if sources[0]['kind'] == 'hub' else ''}")
    return itertools.chain([first], batches)


# ---------------------------------------------------------------- tokenizing

def val_threshold(val_fraction):
    return round(val_fraction * 2 ** 64)


def encode_documents(texts, tokenizer, threshold):
    """One job: split and tokenize a list of texts. Returns the number of rows, {split: (tokens
    int32, per-document lengths including the EOT)} and the number of null or empty texts skipped."""
    tokens, lengths = {"train": [], "val": []}, {"train": [], "val": []}
    for text in filter(None, texts):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()  # SPLIT_RULE
        split = "val" if int.from_bytes(digest, "big") < threshold else "train"
        ids = tokenizer.encode_ordinary(text) + [EOT_TOKEN]
        tokens[split].extend(ids)
        lengths[split].append(len(ids))
    return len(texts), {split: (np.array(tokens[split], dtype=np.int32), np.array(lengths[split], dtype=np.int64))
                        for split in tokens}, len(texts) - sum(map(len, lengths.values()))


# Worker processes, not threads: tiktoken releases the GIL while it encodes (~190 ns a token on one
# Xeon core), but turning its token lists into an array holds it (~40 ns a token), so threads would
# stop scaling at about five cores. Texts go to the workers and int32 arrays come back through
# multiprocessing's pipes (bench/RESULTS.md, "Data preparation", compares the designs).
_worker = {}
STOPS = {signal.SIGINT, signal.SIGTERM}


def start_worker(tokenizer, threshold):
    """Runs once in each worker: keep the tokenizer; leave Ctrl-C and SIGTERM to the main process; and
    die with it (Linux's PR_SET_PDEATHSIG), so a killed prepare leaves no tokenizer processes running on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # held back in the parent while it forked us
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends them
        pass
    _worker.update(tokenizer=tokenizer, threshold=threshold)


def encode_job(texts):
    return encode_documents(texts, _worker["tokenizer"], _worker["threshold"])


def lengths_job(texts):
    """Analysis job: GPT-2 token count of each non-empty text (no EOT, as the RTX 3090 run counted)."""
    return [len(_worker["tokenizer"].encode_ordinary(text)) for text in texts if text]


@contextlib.contextmanager
def worker_pool(num_proc, tokenizer, threshold=0):
    """The tokenizer processes, started before any reader: `datasets` may start threads, and a fork then can
    hang. Ctrl-C and SIGTERM wait while they start: raised inside Python's fork hooks, they would be ignored."""
    with ProcessPoolExecutor(num_proc, initializer=start_worker, initargs=(tokenizer, threshold)) as pool:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            pool.submit(os.getpid).result()  # under fork the first job starts every worker
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
        yield pool


def run_jobs(pool, job, batches, window):
    """Apply job to each batch on the pool, keeping `window` in flight; yield results in input order."""
    pending = deque()
    try:
        while True:
            while len(pending) < window and (batch := next(batches, None)) is not None:
                pending.append(pool.submit(job, batch))
            if not pending:
                return
            yield pending.popleft().result()
    finally:  # the caller stopped early (or failed): drop work that has not started
        for future in pending:
            future.cancel()


# ---------------------------------------------------------------- writing shards

def safetensors_header(num_tokens, length=0):
    """The safetensors header of one int32 tensor "tokens" of num_tokens, padded to 8 bytes (or to `length`
    bytes in all, to rewrite one in place): by hand, so a shard streams to disk, never whole in memory."""
    header = json.dumps({"tokens": {"dtype": "I32", "shape": [num_tokens], "data_offsets": [0, 4 * num_tokens]}},
                        separators=(",", ":")).encode()
    header = header.ljust(max(length - 8, len(header) + (-len(header) % 8)))
    return struct.pack("<Q", len(header)) + header


class SplitWriter:
    """Receives one split's token stream in pieces and keeps tokens [skip, skip + num_tokens) of it
    (num_tokens None: every token from skip on), streamed into shard files of at most shard_tokens each."""

    def __init__(self, folder, split, num_tokens, shard_tokens, skip=0):
        self.folder, self.split = folder, split
        self.num_tokens, self.shard_tokens, self.skip = num_tokens, shard_tokens, skip
        self.end = None if num_tokens is None else skip + num_tokens
        self.seen = 0        # tokens of the whole (unskipped) stream received so far
        self.written = 0
        self.documents = 0   # documents with at least one token kept
        self.skipped_documents = 0  # documents wholly before the skip
        self.shards, self.file = [], None

    @property
    def done(self):
        return self.end is not None and self.seen >= self.end

    def add(self, tokens, lengths):
        """Take the next piece of the stream (documents of the given lengths); returns the tokens kept."""
        doc_ends = self.seen + np.cumsum(lengths)
        self.skipped_documents += int(np.count_nonzero(doc_ends <= self.skip))
        if self.num_tokens != 0:
            self.documents += int(np.count_nonzero((doc_ends > self.skip) &
                                                   (self.end is None or doc_ends - lengths < self.end)))
        stop = None if self.end is None else max(0, self.end - self.seen)
        keep = kept = tokens[max(0, self.skip - self.seen):stop]
        self.seen += len(tokens)
        while len(keep):
            if self.file is None:
                left = self.shard_tokens if self.num_tokens is None else self.num_tokens - self.written
                self.shard_start, self.shard_end = self.written, self.written + min(self.shard_tokens, left)
                self.shards.append({"file": f"{self.split}-{len(self.shards):05d}.safetensors"})
                self.file = open(os.path.join(self.folder, self.shards[-1]["file"]), "wb")
                self.file.write(safetensors_header(self.shard_end - self.shard_start))
            piece, keep = np.split(keep, [self.shard_end - self.written])
            self.file.write(piece.astype("<i4", copy=False).tobytes())
            self.written += len(piece)
            if self.written == self.shard_end:
                self.close_shard()
        return kept

    def close_shard(self):
        """Close the shard; one the input ended early gets the header of the tokens it holds, rewritten in place."""
        from data import file_sha256  # data.py imports torch: not worth waiting for before an error message
        if self.file is None:
            return
        count, planned = self.written - self.shard_start, self.shard_end - self.shard_start
        if count != planned:
            self.file.seek(0)
            self.file.write(safetensors_header(count, len(safetensors_header(planned))))
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the manifest that vouches for it
        self.file.close()
        self.file = None
        path = os.path.join(self.folder, self.shards[-1]["file"])
        self.shards[-1].update(num_tokens=count, sha256=file_sha256(path))

    def close(self):
        if self.file is not None:
            self.file.close()

    def summary(self):
        return {"num_tokens": self.written, "documents": self.documents,
                "skipped_documents": self.skipped_documents, "shards": self.shards}


def asked(args, split):
    """The tokens asked of a split, in words: a count or all, and the train tokens skipped first."""
    count = args.train_tokens if split == "train" else args.val_tokens
    skip = f" after skipping {args.skip_train_tokens:,}" if split == "train" and args.skip_train_tokens else ""
    return (ALL if count is None else f"{count:,}") + skip


def tokenize_into(folder, sources, tokenizer, args):
    """Stream the input through the tokenizer into both splits' shards; stop once both are full."""
    writers = {"train": SplitWriter(folder, "train", args.train_tokens, args.shard_tokens, args.skip_train_tokens),
               "val": SplitWriter(folder, "val", args.val_tokens, args.shard_tokens)}
    rows = empty = 0
    with worker_pool(args.num_proc, tokenizer, val_threshold(args.val_fraction)) as pool:
        texts = text_batches(sources, args)
        counts = [args.skip_train_tokens, args.train_tokens, args.val_tokens]
        try:
            with tqdm(total=None if None in counts else sum(counts), unit="tok", unit_scale=True,
                      desc="tokenizing", smoothing=0.05) as progress:
                for n, encoded, n_empty in run_jobs(pool, encode_job, texts, window=2 * args.num_proc):
                    for split, (tokens, lengths) in encoded.items():
                        writers[split].add(tokens, lengths)
                    rows, empty = rows + n, empty + n_empty
                    # the tokens that count towards those asked for: the ones skipped, then the ones written
                    progress.update(sum(min(w.seen, w.skip) + w.written for w in writers.values()) - progress.n)
                    if all(w.done for w in writers.values()):
                        break
            for writer in writers.values():
                writer.close_shard()
        finally:
            for writer in writers.values():
                writer.close()
    train, val = writers["train"], writers["val"]
    if rows == empty:
        raise PrepareError(f"{input_name(sources)} holds no text: its {rows:,} documents are all null or empty")
    if not all(w.done for w in writers.values() if w.num_tokens is not None):
        raise PrepareError(f"not enough text: the input holds {train.seen:,} train tokens (asked "
                           f"{asked(args, 'train')}) and {val.seen:,} val tokens (asked "
                           f"{asked(args, 'val')}); add input, ask for fewer tokens, or pass --train-tokens all "
                           "to take what there is")
    if val.num_tokens is None and not val.written:
        raise PrepareError(f"no document went to validation: none of the {rows - empty:,} documents hashed below "
                           f"--val-fraction {args.val_fraction}; pass a larger one (0.1 sends about one in ten)")
    if train.num_tokens is None and not train.written:
        raise PrepareError(f"no train tokens: the train stream holds {train.seen:,} (asked {asked(args, 'train')});"
                           f" add input{' or skip fewer' if args.skip_train_tokens else ''}")
    return {"packing": PACKING,
            "split": {"rule": SPLIT_RULE, "val_fraction": args.val_fraction,
                      "threshold": val_threshold(args.val_fraction)},
            # the files (each with its kind) or the Hub dataset, the field, documents and tokens
            "input": {**({"hub": sources[0]} if args.hub_dataset else {"patterns": args.input, "files": sources}),
                      "text_field": args.text_field, "rows_read": rows, "empty_rows_skipped": empty,
                      "documents": rows - empty, "tokens": train.seen + val.seen},
            "splits": {name: w.summary() for name, w in writers.items()}}


# ---------------------------------------------------------------- output

def check_output(path, force, inputs):
    """Clean up what a prepare killed with SIGKILL left: its working folder (.NAME.partial-PID-*), and, killed
    between the renames of a --force replace, the old dataset aside (.NAME.old-*), put back. Then refuse a
    file, a non-empty folder without --force, or one holding an input or the working directory."""
    from data import MANIFEST
    parent, name = os.path.split(os.path.abspath(path))
    files.remove_dead_temp_folders(parent, re.compile(rf"^\.{re.escape(name)}\.partial-(\d+)-"))
    for old in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*")):
        if not os.path.exists(path):
            print(f"note: a replace of {path} was killed halfway; putting the previous dataset back")
            os.rename(old, path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PrepareError(f"--output {path} is a file; give a folder path")
    output = os.path.realpath(path)
    for inside in [os.getcwd(), *inputs]:
        if os.path.commonpath([output, os.path.realpath(inside)]) == output:
            raise PrepareError(f"--output {path} contains {inside}; choose a new folder for the dataset")
    if os.path.isdir(path) and os.listdir(path) and not force:
        what = "a prepared dataset" if os.path.isfile(os.path.join(path, MANIFEST)) else "files"
        raise PrepareError(f"--output {path} already holds {what}; choose another folder or pass --force "
                           "(the old one is kept until the new one is complete)")


@contextlib.contextmanager
def working_folder(output):
    """A hidden folder beside output (one filesystem: renames are atomic), named after this process so a later
    run can tell a killed one left it. Finished, it becomes output: a dataset there is moved aside, the new one
    renamed in, the old one deleted (check_output undoes a kill between). Unfinished, it is removed."""
    parent, name = os.path.split(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    folder = os.path.join(parent, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(folder)  # inside the try: a Ctrl-C or SIGTERM just after it still removes the folder
        yield folder
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        if os.path.isdir(output):
            os.rename(output, old)
        os.rename(folder, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(folder):
            shutil.rmtree(folder)


def prepare(sources, args, argv):
    """sources: --from-tokens' [(path, kind)], or the text sources (text_source, or the Hub dataset's)."""
    if args.from_tokens:
        paths = [path for path, _ in sources]
        what = (f"{len(paths)} token file(s), {sum(map(os.path.getsize, paths)) / 2**20:,.1f} MiB -> "
                f"{args.output}: the source's train and validation splits")
    else:
        paths = [p for s in sources for p in ([s["path"]] if "path" in s else s["data_files"] or [])]
        rows = sum(s.get("rows", 0) for s in sources)
        what = (input_name(sources) if args.hub_dataset else f"{len(sources)} input file(s), "
                f"{sum(s['bytes'] for s in sources) / 2**20:,.1f} MiB{f', {rows:,} rows' if rows else ''}")
        what += (f" -> {args.output}: train tokens {asked(args, 'train')}, val tokens {asked(args, 'val')} "
                 f"({args.val_fraction:.2%} of documents)")
    check_output(args.output, args.force, paths)
    import tiktoken
    from data import FORMAT, MANIFEST
    from gpt import GPT2_BPE_FILES, get_tokenizer  # here, not at the top: torch would slow every error message
    tokenizer = get_tokenizer()
    print(f"{what}, shards of {args.shard_tokens:,}"
          f"{'' if args.from_tokens else f', {args.num_proc} tokenizer processes'}")
    started = time.perf_counter()
    with working_folder(args.output) as folder:
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python prepare_datasets.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "tokenizer": {"name": "gpt2", "library": f"tiktoken {tiktoken.__version__}",
                          "n_vocab": tokenizer.n_vocab, "eot_token": EOT_TOKEN,
                          "bpe_files_sha256": GPT2_BPE_FILES, "encoding": TOKENIZER_NOTE},
            "skip_train_tokens": args.skip_train_tokens,
            "shard_tokens": args.shard_tokens,
            # packing, split, input (what was read) and splits
            **(convert_tokens_into(folder, sources, args) if args.from_tokens else
               tokenize_into(folder, sources, tokenizer, args)),
        }
        files.write_json_atomic(os.path.join(folder, MANIFEST), manifest)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_tokens']:,} tokens from {info['documents']:,} documents "
              f"in {len(info['shards'])} shard(s)")
    read, seconds = manifest["input"], time.perf_counter() - started
    print(f"wrote {args.output}" + ("" if args.from_tokens else f" ({read['rows_read']:,} rows read, "
                                                                 f"{read['empty_rows_skipped']:,} empty skipped)"))
    # what bench/bench_prepare.py measured (bench/RESULTS.md); the workers count once the pool waited for them
    written = sum(info["num_tokens"] for info in manifest["splits"].values())
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"{written / seconds:,.0f} tokens/s over {seconds:,.1f} s; the largest process's peak memory "
          f"{peak / (2**20 if sys.platform == 'darwin' else 2**10):,.0f} MiB")  # ru_maxrss: KiB, on macOS bytes
    return manifest


# ---------------------------------------------------------------- from shared token files

# Token sets others publish, GPT-2 tokenized (an EOT before or after each document): llm.c's .bin files
# (256 int32 of header, then uint16 tokens) and Giles Thomas's safetensors (one uint16 tensor "tokens").
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
EVAL_SET_OF = {"gpjt": "gpjt-test", "llmc": "llmc-val"}  # evaluate.py's EVAL_SETS, by source
TOKEN_CHUNK = 1 << 24  # tokens converted at a time: 16M (64 MB as int32), whatever the source's size


def open_token_file(path, kind):
    """(split, told by the name as each source names its files; uint16 array-like of the tokens; their count)."""
    name = os.path.basename(path)
    split = "val" if ("_val_" in name or name.startswith(("validation", "val"))) else \
        "train" if ("_train_" in name or name.startswith("train")) else None
    if split is None:
        raise PrepareError(f"{path}: cannot tell its split from the name; expected llm.c's fineweb_train_*/"
                           "fineweb_val_*.bin or train/validation.safetensors")
    if kind == "llmc":
        header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
        if len(header) < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
            raise PrepareError(f"{path} is not an llm.c token file (no magic {LLMC_MAGIC} in its header)")
        if header[1] != LLMC_VERSION:
            raise PrepareError(f"{path} is llm.c token format version {header[1]}; only {LLMC_VERSION} "
                               "(uint16 GPT-2 tokens) is read")
        count, expected = int(header[2]), 4 * LLMC_HEADER_INTS + 2 * int(header[2])
        if os.path.getsize(path) != expected:
            raise PrepareError(f"{path} has {os.path.getsize(path):,} bytes, its header promises {expected:,}: "
                               "truncated or damaged; download it again")
        return split, np.memmap(path, dtype="<u2", mode="r", offset=4 * LLMC_HEADER_INTS, shape=(count,)), count
    from safetensors import safe_open
    try:
        tokens = safe_open(path, framework="numpy").get_slice("tokens")
    except Exception as e:  # safetensors' own error type: truncated, not safetensors, no "tokens"
        raise PrepareError(f"{path} is not a token file with a 'tokens' tensor ({e}); download it again") from None
    if tokens.get_dtype() != "U16" or len(tokens.get_shape()) != 1:
        raise PrepareError(f"{path}: 'tokens' is {tokens.get_dtype()} {tokens.get_shape()}, expected a 1-D "
                           "uint16 tensor of GPT-2 tokens")
    return split, tokens, tokens.get_shape()[0]


def convert_tokens_into(folder, sources, args):
    """Copy the token files' streams into our shards, split by split, TOKEN_CHUNK tokens at a time."""
    from data import file_sha256  # data.py imports torch: not worth waiting for before an error message
    found = {"train": [], "val": []}
    for path, kind in sources:
        split, tokens, size = open_token_file(path, kind)
        found[split].append((path, kind, tokens, size))
    # --train-tokens 0 makes an evaluation-only dataset from the validation file(s) alone
    missing = [s for s, listed in found.items() if not listed and not (s == "train" and args.train_tokens == 0)]
    if missing:
        raise PrepareError(f"--from-tokens has no {' or '.join(missing)} file among {len(sources)} file(s); "
                           "give both splits' files (llm.c: fineweb_val_000000.bin; gpjt: validation.safetensors)")
    splits, described = {}, []
    for split, listed in found.items():
        wanted, skip = (args.train_tokens, args.skip_train_tokens) if split == "train" else (args.val_tokens, 0)
        count = sum(size for *_, size in listed) - skip if wanted is None else wanted
        writer = SplitWriter(folder, split, count, args.shard_tokens, skip)
        eot = 0
        with tqdm(total=count, unit="tok", unit_scale=True, desc=f"{split} tokens") as bar:
            for path, kind, tokens, size in listed:
                described.append({"path": path, "format": kind, "split": split, "tokens": size,
                                  "sha256": file_sha256(path)})
                for start in range(0, size, TOKEN_CHUNK):
                    if writer.done:
                        break
                    chunk = np.asarray(tokens[start:min(start + TOKEN_CHUNK, size)], dtype=np.int32)
                    kept = writer.add(chunk, [len(chunk)])
                    eot += int(np.count_nonzero(kept == EOT_TOKEN))
                    bar.update(len(kept))
        writer.close()
        if not writer.done:
            raise PrepareError(f"the {split} file(s) hold {writer.seen:,} tokens; asked for {asked(args, split)}: "
                               "ask for fewer or add that split's files")
        splits[split] = {**writer.summary(), "documents": eot}
    # tokens someone else published: their packing and split, as they made them
    return {"packing": "as the source's files hold them (GPT-2 tokens with <|endoftext|> between documents), "
                       "converted without re-tokenizing",
            "split": {"rule": "the source's own train/validation files"},
            "input": {"patterns": args.from_tokens, "token_files": described},
            "splits": splits,
            # the published windows on this data: evaluate.py --eval-set NAME scores them
            "eval_sets": sorted({EVAL_SET_OF[f["format"]] for f in described})}


# ---------------------------------------------------------------- analysis

def plot_lengths(lengths, stats, path, source):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The tail runs to 100k+ tokens; cut the x axis at the 99.5th percentile so the bulk is visible.
    limit = max(float(np.percentile(lengths, 99.5)), stats["context_length"] * 1.1)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.hist(np.minimum(lengths, limit), bins=100, range=(0, limit), color="#4c72b0")
    for x, label, style in ((stats["mean"], f"mean {stats['mean']:,.0f}", "--"),
                            (stats["median"], f"median {stats['median']:,.0f}", ":"),
                            (stats["context_length"], f"context {stats['context_length']:,}", "-")):
        ax.axvline(x, color="black" if style == "-" else "#c44e52", linestyle=style, label=label)
    ax.set_title(f"GPT-2 token lengths of {stats['documents']:,} documents ({source})\n"
                 f"{stats['share_documents_longer']:.1%} longer than the context; cropping would lose "
                 f"{stats['share_tokens_cropped']:.1%} of the tokens")
    ax.set_xlabel(f"document length in GPT-2 tokens (last bin: {limit:,.0f} and over)")
    ax.set_ylabel("documents")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze(sources, args):
    if os.path.isdir(args.histogram):
        raise PrepareError(f"--histogram {args.histogram} is a folder; give a .png file name")
    from gpt import get_tokenizer
    limit, lengths = args.analyze_documents or None, []
    with tqdm(total=limit, unit="doc", desc="tokenizing") as progress, \
            worker_pool(args.num_proc, get_tokenizer()) as pool:
        for batch in run_jobs(pool, lengths_job, text_batches(sources, args), window=2 * args.num_proc):
            lengths.extend(batch)
            progress.update(len(batch))
            if limit and len(lengths) >= limit:
                break
    if not lengths:
        raise PrepareError(f"{input_name(sources)} holds no text: its documents are all null or empty; "
                           "check --input and --text-field")
    lengths, context = np.array(lengths[:limit], dtype=np.int64), args.context_length
    stats = {"documents": len(lengths), "total_tokens": int(lengths.sum()),
             "mean": float(lengths.mean()), "median": float(np.median(lengths)),
             "share_documents_longer": float(np.mean(lengths > context)),
             "share_tokens_cropped": float(np.maximum(lengths - context, 0).sum() / lengths.sum()),
             "context_length": context}
    plot_lengths(lengths, stats, args.histogram, input_name(sources))
    print(f"documents:                          {stats['documents']:,}")
    print(f"total tokens:                       {stats['total_tokens']:,}")
    print(f"mean / median tokens per document:  {stats['mean']:,.1f} / {stats['median']:,.1f}")
    print(f"documents longer than {args.context_length:,} tokens:   {stats['share_documents_longer']:.2%}")
    print(f"tokens lost cropping to {args.context_length:,}:       {stats['share_tokens_cropped']:.2%}")
    print(f"histogram: {args.histogram}")
    return stats


# ---------------------------------------------------------------- main

def token_count(text):
    """--train-tokens / --val-tokens: a count, or all."""
    if text == ALL:
        return ALL
    try:
        return cli.non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a token count (0 or more) or all, not {text!r}") from None


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    one_input = parser.add_mutually_exclusive_group()  # text files, a Hub dataset, or token files
    one_input.add_argument("--input", nargs="+",
                           help="paths, folders or quoted globs of .parquet (a string column), .txt (one document "
                                "per file), .jsonl or .json files, or datasets' save_to_disk folders "
                                f"(default: {INPUT})")
    parser.add_argument("--text-field", default=TEXT_FIELD, help="the column or JSON field that holds the text")
    one_input.add_argument("--hub-dataset", metavar="NAME",
                           help="instead of --input: stream a Hugging Face dataset, e.g. roneneldan/TinyStories "
                                "(or a builder that ships with datasets, such as json, with --hub-data-files)")
    parser.add_argument("--hub-split", default=HUB_SPLIT,
                        help="the split of --hub-dataset (or of a save_to_disk DatasetDict folder) to read")
    parser.add_argument("--hub-config", metavar="NAME", help="the configuration (subset) of --hub-dataset")
    parser.add_argument("--hub-data-files", nargs="+", metavar="FILE",
                        help="data_files for --hub-dataset: a Hub dataset's files, or yours for a builder (json)")
    one_input.add_argument("--from-tokens", nargs="+", metavar="FILE",
                           help="instead of --input: llm.c's .bin or Giles Thomas's .safetensors token files "
                                "(paths, folders or quoted globs), converted with their own split")
    parser.add_argument("--output", default=OUTPUT, help="dataset folder to create")
    parser.add_argument("--train-tokens", type=token_count, default=None,
                        help="tokens in the train split, or all (default: the RTX 3090 run's 534,200 batches of "
                             "6 x 1,024, + 1; with --from-tokens, all)")
    parser.add_argument("--val-tokens", type=token_count, default=None,
                        help="tokens in the val split, or all (default: all with --train-tokens all or "
                             "--from-tokens, else the RTX 3090 run's 3,200 batches of 6 x 1,024, + 1)")
    parser.add_argument("--skip-train-tokens", type=cli.non_negative_int, default=SKIP_TRAIN_TOKENS,
                        help="start the train split this far into the train stream (a fresh slice); val is unchanged")
    parser.add_argument("--val-fraction", type=cli.fraction, default=VAL_FRACTION,
                        help="share of documents that go to validation (by hash of the text)")
    parser.add_argument("--shard-tokens", type=cli.positive_int, default=SHARD_TOKENS, help="tokens per shard file")
    parser.add_argument("--num-proc", type=cli.positive_int, default=NUM_PROC,
                        help="tokenizer processes; the default is every core of this machine")
    parser.add_argument("--documents-per-job", type=cli.positive_int, default=DOCUMENTS_PER_JOB,
                        help="documents per unit of tokenizer work")
    parser.add_argument("--force", action="store_true", help="replace an existing --output once the new one is done")
    parser.add_argument("--analyze", action="store_true",
                        help="instead of writing shards, report document lengths and draw their histogram")
    parser.add_argument("--analyze-documents", type=cli.non_negative_int, default=ANALYZE_DOCUMENTS,
                        help="with --analyze: documents to tokenize, from the start of the input (0 = all)")
    parser.add_argument("--context-length", type=cli.positive_int, default=reference.CONTEXT_LENGTH,
                        help="with --analyze: the context the lengths are compared with")
    parser.add_argument("--histogram", default=HISTOGRAM, help="with --analyze: PNG file to write")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.hub_config or args.hub_data_files) and not args.hub_dataset:
        parser.error("--hub-config and --hub-data-files go with --hub-dataset")
    if args.from_tokens and args.analyze:
        parser.error("--analyze reads text; it does not go with --from-tokens")
    if args.val_fraction == 0:
        parser.error("--val-fraction must be above 0: the validation split needs documents")
    if not (args.from_tokens or args.hub_dataset or args.input):
        args.input = [INPUT]
    if not args.from_tokens:
        args.train_tokens = TRAIN_TOKENS if args.train_tokens is None else args.train_tokens
        if args.val_tokens is None:
            args.val_tokens = ALL if args.train_tokens == ALL else VAL_TOKENS
    # from here on None is "all of it", as --from-tokens has always taken an absent count
    args.train_tokens, args.val_tokens = (None if n == ALL else n for n in (args.train_tokens, args.val_tokens))
    return args


def main(argv=None):
    args = parse_args(argv)
    nothing = "nothing was written; run the same command again"
    with cli.errors_end_in_one_line(PrepareError, stopped=lambda: nothing):
        if args.from_tokens:
            sources = find_files(args.from_tokens, "--from-tokens")
        elif args.hub_dataset:
            sources = [{"kind": "hub", "name": args.hub_dataset, "split": args.hub_split, "config": args.hub_config,
                        "data_files": args.hub_data_files}]
        else:
            sources = [text_source(path, kind, args) for path, kind in find_files(args.input, "--input")]
        return analyze(sources, args) if args.analyze else prepare(sources, args, argv)


if __name__ == "__main__":
    main()
