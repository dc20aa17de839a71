"""Turn text into GPT-2 token shards for training and validation, in bounded memory: FineWeb's parquet
files, your own text files, or a Hugging Face dataset.

    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --output datasets/fineweb-10BT
    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --analyze     # look before you cut
    python prepare_datasets.py --input my_books/ --train-tokens all --val-fraction 0.1 --output datasets/books
    python prepare_datasets.py --hub-dataset roneneldan/TinyStories --train-tokens all --output datasets/tinystories

What --input reads, told by the name (paths or quoted globs; a folder means the files of these kinds
directly in it, in name order):
    *.parquet  a string column, --text-field (default `text`, FineWeb's), streamed row group by row group
    *.txt      one document per file: the whole file, as UTF-8 (a folder of books or articles)
    *.jsonl    one JSON object per line; the document is its --text-field
    *.json     a list of such objects, or JSON lines
    a folder written by the `datasets` library's save_to_disk (it holds state.json, dataset_info.json
               or dataset_dict.json; --hub-split picks the split of a DatasetDict)
--hub-dataset NAME streams a Hugging Face Hub dataset through `datasets` instead (--hub-split,
--hub-config; --hub-data-files for a builder such as `json` over your own files), nothing saved to disk.

Each document (null or empty ones are skipped and counted) goes to validation or training by a hash
of its text, so the same input always gives the same split, a document is never in both, and exact
duplicates always land on the same side. Documents are tokenized with GPT-2's `encode_ordinary` (a
literal "<|endoftext|>" in web text stays text), each is followed by one <|endoftext|> token, and a
split's documents are concatenated into one stream: the RTX 3090 run's "one long document" packing,
with no padding and nothing cropped. The streams are cut at exactly the token counts asked for and
written as shards (DIR/train-00000.safetensors, ..., DIR/val-00000.safetensors, ...; one 1-D int32
tensor "tokens" each) plus DIR/manifest.json, which data.py reads and which records what was read.

The default counts are the RTX 3090 run's (3.28B train, 19.7M val tokens): FineWeb's 10BT sample fills
them and the rest is not read. For your own, smaller text, --train-tokens all takes every training
document there is, and validation is then every document the hash sends there (--val-fraction of them;
--val-tokens N cuts it instead). An input too small to send validation a document is refused with the
fix: a larger --val-fraction.

--skip-train-tokens K gives a fresh training slice for continued training: tokens K .. K+N of the
same train stream; validation stays the same. Work happens in a temporary folder beside DIR that is
renamed to DIR only when complete, so a failed run leaves nothing that looks finished, and an
existing dataset is replaced only with --force (and only once the new one is complete).

--analyze tokenizes a sample of documents and draws their length histogram, with the share of
documents longer than the context and the share of tokens that cropping to it would lose (Giles Thomas
measured 16% and 29% on FineWeb 10BT).
"""

import argparse
import glob
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import cli
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


class PrepareError(Exception):
    """Bad input or a failed run; main() prints the message as one line and exits non-zero."""


# ---------------------------------------------------------------- input

def find_inputs(patterns):
    """Files matching the glob patterns, sorted by name within each pattern, each once (--from-tokens)."""
    files = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.expanduser(pattern))):
            if os.path.isfile(path) and path not in files:
                files.append(path)
    if not files:
        raise PrepareError(f"no files match {' '.join(patterns)}; download some with download_fineweb.py "
                           "or point --input at parquet files (quote the glob)")
    return files


KINDS = {".parquet": "parquet", ".txt": "txt", ".jsonl": "jsonl", ".json": "json"}
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # what save_to_disk writes
READS = ".parquet, .txt, .jsonl and .json files and datasets' save_to_disk folders"


def input_kind(path):
    """What --input makes of a path: a KINDS kind by the file's name, "saved" for a save_to_disk
    folder, or None (a plain folder, or a file of another kind)."""
    if os.path.isdir(path):
        return "saved" if any(os.path.isfile(os.path.join(path, f)) for f in SAVED_DATASET_FILES) else None
    return KINDS.get(os.path.splitext(path)[1].lower())


def find_sources(patterns):
    """[{"kind", "path"}] for the --input patterns: matches in name order, a plain folder's files
    (of the kinds read) in name order, each once."""
    sources, paths = [], set()
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.expanduser(pattern))):
            if os.path.isdir(path) and input_kind(path) is None:
                inside = sorted(p for p in glob.glob(os.path.join(path, "*")) if os.path.isfile(p))
                found = [p for p in inside if input_kind(p)]
                if not found:
                    raise PrepareError(f"{path} holds no .parquet, .txt, .jsonl or .json files and is not a "
                                       "save_to_disk folder; point --input at your text files")
                if len(found) < len(inside):
                    print(f"note: {path}: reading {len(found)} of its {len(inside)} files (--input reads {READS})")
            elif input_kind(path) is None:
                raise PrepareError(f"{path}: cannot tell what it holds from its name; --input reads {READS}")
            else:
                found = [path]
            for found_path in found:
                if found_path not in paths:
                    paths.add(found_path)
                    sources.append({"kind": input_kind(found_path), "path": found_path})
    if not sources:
        raise PrepareError(f"no files match {' '.join(patterns)}; download some with download_fineweb.py "
                           f"or point --input at your text (quote a glob; it reads {READS})")
    return sources


def is_dataset_dict(source):
    return source["kind"] == "saved" and os.path.isfile(os.path.join(source["path"], "dataset_dict.json"))


def describe_source(source, field):
    """What the manifest records of an input. A parquet file's footer is opened now (a truncated file
    is caught before any work) and its --text-field checked; other kinds are checked as they are read."""
    if source["kind"] == "hub":
        return dict(source)
    path = source["path"]
    if source["kind"] == "saved":
        size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(p))
        return {**source, "bytes": size}
    if source["kind"] != "parquet":
        return {**source, "bytes": os.path.getsize(path)}
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"cannot read {path} as parquet ({str(e).splitlines()[0]}); "
                           "re-download it (download_fineweb.py resumes) or remove it from --input") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise PrepareError(f"{path} has no {field!r} column (it has: {', '.join(schema.names)}); "
                           "pass --text-field with the one that holds the text")
    if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
        raise PrepareError(f"{path}: column {field!r} holds {schema.field(field).type}, not strings; "
                           "pass --text-field with the one that holds the text")
    return {**source, "bytes": os.path.getsize(path), "rows": parquet.metadata.num_rows}


def text_of(row, field, where):
    """A JSON row's document: the string (or null) in its field, else a one-line error naming the place."""
    if not isinstance(row, dict):
        raise PrepareError(f"{where} is a JSON {type(row).__name__}, not an object with a {field!r} field")
    if field not in row:
        raise PrepareError(f"{where} has no field {field!r} (it has: {', '.join(row) or 'none'}); "
                           "pass --text-field with the one that holds the text")
    if row[field] is not None and not isinstance(row[field], str):
        raise PrepareError(f"{where}: field {field!r} holds a {type(row[field]).__name__}, not text; "
                           "pass --text-field with the one that holds the text")
    return row[field]


# One reader per kind: each yields a source's documents in order (None for a null), and says in one
# line what is wrong, naming the file and the place, when it cannot.

def read_parquet(source, field):
    path = source["path"]
    try:
        parquet = pq.ParquetFile(path)
        # One row group per call: a single iter_batches over the whole file keeps every
        # pre-buffered row group until the end (pyarrow 26: +50 MB per 57 MB file read).
        for row_group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=[field], row_groups=[row_group]):
                yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path} is damaged ({str(e).splitlines()[0]}); re-download it") from None


def read_txt(source, field):
    path = source["path"]
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text (byte {e.start:,}); convert it "
                           "(iconv -f LATIN1 -t UTF-8) or leave it out of --input") from None
    yield text


def read_jsonl(source, field):
    path = source["path"]
    number = 0
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


def read_json(source, field):
    path = source["path"]
    with open(path, encoding="utf-8", errors="replace") as f:
        is_list = f.read(1 << 16).lstrip().startswith("[")
    if not is_list:  # JSON lines under a .json name, as datasets' to_json writes them
        yield from read_jsonl(source, field)
        return
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise PrepareError(f"{path} is not a JSON list{where} ({getattr(e, 'msg', 'not UTF-8')}); fix it, "
                           "or write one JSON object per line (.jsonl)") from None
    for number, row in enumerate(rows):
        yield text_of(row, field, f"{path} item {number}")


def import_datasets(what):
    try:
        import datasets  # here, not at the top: a second or two to import, and only these inputs need it
    except ImportError:
        raise PrepareError(f"{what} needs the datasets library: pip install datasets") from None
    return datasets


def read_saved(source, field):
    """A save_to_disk folder, memory-mapped: Arrow files read in place, never loaded whole."""
    datasets, path = import_datasets("a save_to_disk folder"), source["path"]
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as e:  # datasets' own errors: a half-written folder, another version's layout
        raise PrepareError(f"cannot open {path} with datasets.load_from_disk ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); save it again") from None
    if isinstance(dataset, datasets.DatasetDict):
        if source.get("split") not in dataset:
            raise PrepareError(f"{path} has no split {source.get('split')!r} (it has: {', '.join(dataset)}); "
                               "pass --hub-split with one of those")
        dataset = dataset[source["split"]]
    if field not in dataset.column_names:
        raise PrepareError(f"{path} has no {field!r} column (it has: {', '.join(dataset.column_names)}); "
                           "pass --text-field with the one that holds the text")
    if dataset.features[field] not in (datasets.Value("string"), datasets.Value("large_string")):
        raise PrepareError(f"{path}: column {field!r} holds {dataset.features[field]}, not strings; "
                           "pass --text-field with the one that holds the text")
    for batch in dataset.select_columns([field]).with_format("arrow").iter(batch_size=READ_ROWS):
        yield from batch.column(0).to_pylist()


def hub_is_local(name):
    """A builder that ships with datasets (json, csv, parquet, text...) or a local folder: no Hub needed."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # a datasets that moved it: ask the Hub, which costs a second
        return os.path.exists(name)
    return name in _PACKAGED_DATASETS_MODULES or os.path.exists(name)


def read_hub(source, field):
    """A Hugging Face dataset streamed with datasets.load_dataset(..., streaming=True): read as it
    downloads, nothing cached whole."""
    datasets, name = import_datasets("--hub-dataset"), source["name"]
    if not hub_is_local(name):
        from huggingface import hub_unreachable_reason  # here: it imports torch; an offline error need not wait
        reason = hub_unreachable_reason()  # asked once: datasets would retry for half a minute, printing
        if reason:
            raise PrepareError(f"{reason}; save the dataset where the Hub is reachable "
                               "(datasets' save_to_disk) and pass that folder to --input")
    what = f"{name} (split {source['split']!r})"
    try:
        dataset = datasets.load_dataset(name, source["config"], split=source["split"],
                                        data_files=source["data_files"], streaming=True)
        for batch in dataset.iter(batch_size=READ_ROWS):
            if field not in batch:
                raise PrepareError(f"{what} has no {field!r} field (it has: {', '.join(batch)}); "
                                   "pass --text-field with the one that holds the text")
            texts = batch[field]
            if not all(t is None or isinstance(t, str) for t in texts):
                raise PrepareError(f"{what}: field {field!r} does not hold text; "
                                   "pass --text-field with the one that holds the text")
            yield from texts
    except PrepareError:
        raise
    except Exception as e:  # datasets' and the Hub's many errors: a wrong name, split or config, a lost link
        raise PrepareError(f"cannot read {what} with datasets ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no message'}); check the name, "
                           "--hub-split and --hub-config against its Hub page") from None


READERS = {"parquet": read_parquet, "txt": read_txt, "jsonl": read_jsonl, "json": read_json,
           "saved": read_saved, "hub": read_hub}


def iter_texts(sources, field, batch_documents):
    """Lists of batch_documents texts (None for nulls): every source's documents in turn, each read by
    the reader of its kind, so all kinds feed the same tokenizer jobs."""
    texts = itertools.chain.from_iterable(READERS[source["kind"]](source, field) for source in sources)
    while batch := list(itertools.islice(texts, batch_documents)):
        yield batch


def source_paths(sources):
    """The local paths the sources read: check_output refuses an output that holds one."""
    return [path for s in sources for path in ([s["path"]] if "path" in s else s.get("data_files") or [])]


def input_name(sources):
    if sources[0]["kind"] == "hub":
        return f"{sources[0]['name']} (split {sources[0]['split']!r})"
    return sources[0]["path"] if len(sources) == 1 else f"the {len(sources)} inputs"


def texts_looked_at(sources, args):
    """iter_texts with its first job read now, before the progress bar: a wrong --text-field, a file
    that is not what its name says or an input with no documents ends in one line."""
    batches = iter_texts(sources, args.text_field, args.documents_per_job)
    first = next(batches, None)
    if first is None:
        raise PrepareError(f"{input_name(sources)} holds no documents; check --input"
                           f"{' and --hub-split' if sources[0]['kind'] == 'hub' else ''}")
    return itertools.chain([first], batches)


# ---------------------------------------------------------------- tokenizing

def load_tokenizer():
    from gpt import get_tokenizer  # here, not at the top: importing torch would slow every error message
    return get_tokenizer()


def tokenizer_sha256(tokenizer):
    """Names the vocabulary exactly: the bytes of every token id in order, plus the split pattern."""
    digest = hashlib.sha256(getattr(tokenizer, "_pat_str", "").encode())
    for token in range(tokenizer.n_vocab):
        piece = tokenizer.decode_single_token_bytes(token)
        digest.update(struct.pack("<I", len(piece)) + piece)
    return digest.hexdigest()


def in_val(text, threshold):
    """The split rule (SPLIT_RULE): a 64-bit hash of the text below the threshold means validation."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < threshold


def val_threshold(val_fraction):
    return round(val_fraction * 2 ** 64)


def encode_documents(texts, tokenizer, threshold):
    """One job: split and tokenize a list of texts. Returns the number of rows, {split: (tokens
    int32, per-document lengths including the EOT)} and the number of null or empty texts skipped."""
    tokens, lengths, empty = {"train": [], "val": []}, {"train": [], "val": []}, 0
    for text in texts:
        if not text:
            empty += 1
            continue
        split = "val" if in_val(text, threshold) else "train"
        ids = tokenizer.encode_ordinary(text)
        ids.append(EOT_TOKEN)
        tokens[split].extend(ids)
        lengths[split].append(len(ids))
    return len(texts), {split: (np.array(tokens[split], dtype=np.int32), np.array(lengths[split], dtype=np.int64))
                        for split in tokens}, empty


def document_lengths(texts, tokenizer):
    """Analysis job: GPT-2 token count of each non-empty text (no EOT, as the RTX 3090 run counted)."""
    return [len(tokenizer.encode_ordinary(text)) for text in texts if text]


# Worker processes, not threads: tiktoken releases the GIL while it encodes (~190 ns a token on one
# Xeon core), but turning its token lists into an array holds it (~40 ns a token), so threads would
# stop scaling at about five cores. Texts go to the workers and int32 arrays come back through
# multiprocessing's pipes; bench/bench_prepare.py compares the designs.
_worker = {}
SIGTERM_RECEIVED = threading.Event()


def start_worker(tokenizer, threshold):
    """Runs once in each worker: keep the tokenizer; leave Ctrl-C and SIGTERM to the main process; and
    die with it (Linux's PR_SET_PDEATHSIG), so a killed prepare leaves no tokenizer processes running on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends them
        pass
    _worker.update(tokenizer=tokenizer, threshold=threshold)


def encode_job(texts):
    return encode_documents(texts, _worker["tokenizer"], _worker["threshold"])


def lengths_job(texts):
    return document_lengths(texts, _worker["tokenizer"])


def worker_pool(num_proc, tokenizer, threshold=0):
    """The tokenizer processes, started now, before a reader runs: `datasets` and its file systems may
    start threads, and a fork while other threads run can deadlock the child."""
    pool = ProcessPoolExecutor(num_proc, initializer=start_worker, initargs=(tokenizer, threshold))
    pool.submit(os.getpid).result()  # under fork the first job starts every worker
    return pool


def run_jobs(pool, job, batches, window):
    """Apply job to each batch on the pool, keeping `window` in flight; yield results in input order."""
    pending = deque()
    try:
        while True:
            while len(pending) < window:
                batch = next(batches, None)
                if batch is None:
                    break
                pending.append(pool.submit(job, batch))
            if not pending:
                return
            result = pending.popleft().result()
            stop_if_asked()
            yield result
    finally:  # the caller stopped early (or failed): drop work that has not started
        for future in pending:
            future.cancel()


# ---------------------------------------------------------------- writing shards

def safetensors_header(num_tokens, length=0):
    """The safetensors preamble for one little-endian int32 tensor "tokens" of num_tokens: an 8-byte
    header length, then JSON padded with spaces to 8 bytes (or to `length` bytes in all, to rewrite a
    header in place). Written by hand so a shard can be streamed to disk without ever holding it in memory."""
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
        self.seen = 0        # tokens of the whole (unskipped) stream received so far
        self.written = 0
        self.documents = 0   # documents with at least one token kept
        self.skipped_documents = 0  # documents wholly before the skip
        self.shards, self.file, self.hasher = [], None, None

    @property
    def done(self):
        return self.num_tokens is not None and self.seen >= self.skip + self.num_tokens

    def add(self, tokens, lengths):
        """Take the next piece of the stream (documents of the given lengths); returns the tokens kept."""
        end = None if self.num_tokens is None else self.skip + self.num_tokens
        doc_ends = self.seen + np.cumsum(lengths)
        doc_starts = doc_ends - lengths
        self.skipped_documents += int(np.count_nonzero(doc_ends <= self.skip))
        if self.num_tokens != 0:
            kept_documents = doc_ends > self.skip if end is None else (doc_ends > self.skip) & (doc_starts < end)
            self.documents += int(np.count_nonzero(kept_documents))
        keep = kept = tokens[max(0, self.skip - self.seen):None if end is None else max(0, end - self.seen)]
        self.seen += len(tokens)
        while len(keep):
            if self.file is None:
                self._open_shard()
            room = self.shard_end - self.written
            self._write(keep[:room])
            keep = keep[room:]
            if self.written == self.shard_end:
                self._close_shard()
        return kept

    def _open_shard(self):
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        left = self.shard_tokens if self.num_tokens is None else self.num_tokens - self.written
        self.shard_end = self.written + min(self.shard_tokens, left)
        self.shards.append({"file": name, "num_tokens": self.shard_end - self.written})
        self.file = open(os.path.join(self.folder, name), "w+b")
        self.hasher = hashlib.sha256()
        self._write_bytes(safetensors_header(self.shards[-1]["num_tokens"]))

    def _write(self, tokens):
        self._write_bytes(tokens.astype("<i4", copy=False).tobytes())
        self.written += len(tokens)

    def _write_bytes(self, data):
        self.file.write(data)
        self.hasher.update(data)

    def _close_shard(self):
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the manifest that vouches for it
        self.file.close()
        self.shards[-1]["sha256"] = self.hasher.hexdigest()
        self.file = None

    def finish(self):
        """End a split asked for all of the input where the input ended: its last shard, begun for
        shard_tokens, gets a header with the tokens it holds (as long as the first, so it is rewritten
        in place) and is hashed again."""
        if self.file is None:
            return
        shard = self.shards[-1]
        count = shard["num_tokens"] - (self.shard_end - self.written)
        self.file.seek(0)
        self.file.write(safetensors_header(count, len(safetensors_header(shard["num_tokens"]))))
        self.file.seek(0)
        self.hasher = hashlib.sha256()
        for block in iter(lambda: self.file.read(1 << 24), b""):
            self.hasher.update(block)
        shard["num_tokens"], self.shard_end = count, self.written
        self._close_shard()

    def close(self):
        if self.file is not None:
            self.file.close()

    def summary(self):
        return {"num_tokens": self.written, "documents": self.documents,
                "skipped_documents": self.skipped_documents, "shards": self.shards}


def tokens_needed_so_far(writers):
    return sum(w.seen if w.num_tokens is None else min(w.seen, w.skip + w.num_tokens) for w in writers.values())


def count(num_tokens):
    return ALL if num_tokens is None else f"{num_tokens:,}"


def tokenize_into(folder, sources, tokenizer, args):
    """Stream the input through the tokenizer into both splits' shards; stop once both are full."""
    writers = {"train": SplitWriter(folder, "train", args.train_tokens, args.shard_tokens, args.skip_train_tokens),
               "val": SplitWriter(folder, "val", args.val_tokens, args.shard_tokens)}
    rows = empty = 0
    with worker_pool(args.num_proc, tokenizer, val_threshold(args.val_fraction)) as pool:
        texts = texts_looked_at(sources, args)
        asked = [args.skip_train_tokens, args.train_tokens, args.val_tokens]
        progress = tqdm(total=None if None in asked else sum(asked), unit="tok", unit_scale=True,
                        desc="tokenizing", smoothing=0.05)
        try:
            for n, encoded, n_empty in run_jobs(pool, encode_job, texts, window=2 * args.num_proc):
                before = tokens_needed_so_far(writers)
                for split, (tokens, lengths) in encoded.items():
                    writers[split].add(tokens, lengths)
                rows, empty = rows + n, empty + n_empty
                progress.update(tokens_needed_so_far(writers) - before)
                if all(w.done for w in writers.values()):
                    break
            for writer in writers.values():
                writer.finish()
        finally:
            progress.close()
            for writer in writers.values():
                writer.close()
    train, val = writers["train"], writers["val"]
    if rows == empty:
        raise PrepareError(f"{input_name(sources)} holds no text: its {rows:,} documents are all null or empty")
    if not all(w.done for w in writers.values() if w.num_tokens is not None):
        raise PrepareError(
            f"not enough text: the input holds {train.seen:,} train tokens (asked {count(args.train_tokens)}"
            f"{f' after skipping {args.skip_train_tokens:,}' if args.skip_train_tokens else ''}) and "
            f"{val.seen:,} val tokens (asked {count(args.val_tokens)}); add input, ask for fewer tokens, "
            "or pass --train-tokens all to take what there is")
    if val.num_tokens is None and not val.written:
        raise PrepareError(f"no document went to validation: none of the {rows - empty:,} documents hashed below "
                           f"--val-fraction {args.val_fraction}; pass a larger one (0.1 sends about one in ten)")
    if train.num_tokens is None and not train.written:
        raise PrepareError(f"no train tokens: the train stream holds {train.seen:,}"
                           f"{f', all skipped by --skip-train-tokens {args.skip_train_tokens:,}' if args.skip_train_tokens else ''}"
                           "; add input or skip fewer")
    return {"rows_read": rows, "empty_rows_skipped": empty, "documents_read": rows - empty,
            "tokens_read": train.seen + val.seen, "splits": {name: w.summary() for name, w in writers.items()}}


# ---------------------------------------------------------------- output

def check_output(path, force, files):
    """Refuse an output that is a file, an existing dataset/folder without --force, or a folder
    that holds the input or the working directory (--force would delete it)."""
    from data import MANIFEST  # data.py imports torch: not worth waiting for before an error message
    if os.path.exists(path) and not os.path.isdir(path):
        raise PrepareError(f"--output {path} is a file; give a folder path")
    output = os.path.realpath(path)
    for inside in [os.getcwd(), *files]:
        if os.path.commonpath([output, os.path.realpath(inside)]) == output:
            raise PrepareError(f"--output {path} contains {inside}; choose a new folder for the dataset")
    if os.path.isdir(path) and os.listdir(path) and not force:
        what = "a prepared dataset" if os.path.isfile(os.path.join(path, MANIFEST)) else "files"
        raise PrepareError(f"--output {path} already holds {what}; choose another folder or pass --force "
                           "(the old one is kept until the new one is complete)")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_up_after_a_killed_run(output):
    """What a prepare killed with SIGKILL can leave beside OUTPUT: its working folder
    (.NAME.partial-PID-*), removed once that process is gone; and, killed between the two renames of
    a --force replace, the old dataset aside (.NAME.old-*) with OUTPUT missing: it is put back."""
    parent, name = os.path.split(os.path.abspath(output))
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if entry.startswith(f".{name}.partial-"):
            pid = entry[len(f".{name}.partial-"):].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                print(f"note: removing {path}, left by a prepare_datasets.py that was killed")
                shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(f".{name}.old-") and not os.path.exists(output):
            print(f"note: a replace of {output} was killed halfway; putting the previous dataset back")
            os.rename(path, output)


def make_temp_folder(output):
    """A hidden working folder beside the output (so the final rename stays on one filesystem),
    named after this process so that a later run can tell it was left by a killed one."""
    parent, name = os.path.split(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent)


def publish(folder, output):
    """Put the finished folder at `output`. A dataset already there is moved aside, the new one
    renamed in, then the old one deleted; a kill between the renames is undone by the next run
    (clean_up_after_a_killed_run), so --output is never lost."""
    os.chmod(folder, 0o755)  # mkdtemp makes it private
    if os.path.isdir(output):
        parent, name = os.path.split(os.path.abspath(output))
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
        os.rename(folder, output)
        shutil.rmtree(old)
    else:
        os.rename(folder, output)


def write_manifest(folder, tokenizer, inputs, result, args, argv):
    import tiktoken
    from data import FORMAT, MANIFEST

    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python prepare_datasets.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "tokenizer": {"name": "gpt2", "library": f"tiktoken {tiktoken.__version__}", "n_vocab": tokenizer.n_vocab,
                      "eot_token": EOT_TOKEN, "sha256": tokenizer_sha256(tokenizer), "encoding": TOKENIZER_NOTE},
        "packing": PACKING,
        "split": {"rule": SPLIT_RULE, "val_fraction": args.val_fraction,
                  "threshold": val_threshold(args.val_fraction)},
        "skip_train_tokens": args.skip_train_tokens,
        "shard_tokens": args.shard_tokens,
        # what was read: the files (each with its kind) or the Hub dataset, the field, documents and tokens
        "input": {**({"hub": inputs[0]} if args.hub_dataset else {"patterns": args.input, "files": inputs}),
                  "text_field": args.text_field, "rows_read": result.get("rows_read"),
                  "empty_rows_skipped": result.get("empty_rows_skipped"),
                  "documents": result.get("documents_read"), "tokens": result.get("tokens_read")},
        "splits": result["splits"],
    }
    if args.from_tokens:  # tokens someone else published: their packing and split, as they made them
        manifest.update(packing="as the source's files hold them (GPT-2 tokens with <|endoftext|> between "
                                "documents), converted without re-tokenizing",
                        split={"rule": "the source's own train/validation files"},
                        input={"patterns": args.from_tokens, "token_files": result["token_files"]},
                        # the published windows on this data: evaluate.py --eval-set NAME scores them
                        eval_sets=sorted({EVAL_SET_OF[f["format"]] for f in result["token_files"]}))
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def prepare(files, inputs, args, argv):
    """files: --from-tokens' token files, or the text sources (find_sources, or the Hub dataset)."""
    clean_up_after_a_killed_run(args.output)
    check_output(args.output, args.force, files if args.from_tokens else source_paths(files))
    tokenizer = load_tokenizer()
    if args.from_tokens:
        print(f"{len(files)} token file(s), {sum(os.path.getsize(f) for f in files) / 2**20:,.1f} MiB -> "
              f"{args.output}: the source's train and validation splits, shards of {args.shard_tokens:,}")
    else:
        what = [input_name(files) if args.hub_dataset else f"{len(files)} input file(s)"]
        if not args.hub_dataset:
            what.append(f"{sum(i['bytes'] for i in inputs) / 2**20:,.1f} MiB")
        if any("rows" in i for i in inputs):
            what.append(f"{sum(i.get('rows', 0) for i in inputs):,} rows")
        print(f"{', '.join(what)} -> {args.output}: train {count(args.train_tokens)} tokens"
              f"{f' after skipping {args.skip_train_tokens:,}' if args.skip_train_tokens else ''}, val "
              f"{count(args.val_tokens)} tokens ({args.val_fraction:.2%} of documents), shards of "
              f"{args.shard_tokens:,}, {args.num_proc} tokenizer processes")
    folder = make_temp_folder(args.output)
    try:
        if args.from_tokens:
            result = convert_tokens_into(folder, files, args)
        else:
            result = tokenize_into(folder, files, tokenizer, args)
        manifest = write_manifest(folder, tokenizer, inputs, result, args, argv)
        stop_if_asked()  # a SIGTERM during the last jobs still stops the run before it is published
        publish(folder, args.output)
    finally:
        if os.path.isdir(folder):  # still here means the run did not finish: leave nothing behind
            shutil.rmtree(folder)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_tokens']:,} tokens from {info['documents']:,} documents "
              f"in {len(info['shards'])} shard(s)")
    if not args.from_tokens:
        print(f"wrote {args.output} ({result['rows_read']:,} rows read, {result['empty_rows_skipped']:,} empty skipped)")
    else:
        print(f"wrote {args.output}")
    return manifest


# ---------------------------------------------------------------- from shared token files

# Token sets other people publish, already GPT-2 tokenized (an EOT before or after each document):
#   llm.c / modded-nanogpt (`kjj0/fineweb10B-gpt2` on the Hub): fineweb_val_000000.bin,
#     fineweb_train_000001.bin, ...: a header of 256 int32 (magic 20240520, version 1, token count),
#     then that many uint16 tokens.
#   Giles Thomas's (`gpjt/fineweb-gpt2-tokens`): train.safetensors and validation.safetensors, each one
#     1-D uint16 tensor named "tokens".
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
EVAL_SET_OF = {"gpjt": "gpjt-test", "llmc": "llmc-val"}  # evaluate.py's EVAL_SETS, by source
TOKEN_CHUNK = 1 << 24  # tokens converted at a time: 16M (64 MB as int32), whatever the source's size


def open_token_file(path):
    """(split, format, uint16 array-like of the file's tokens, their count) for an llm.c .bin or a gpjt
    safetensors file; the split comes from the file name, as each source names its files."""
    name = os.path.basename(path)
    split = "val" if ("_val_" in name or name.startswith(("validation", "val"))) else \
        "train" if ("_train_" in name or name.startswith("train")) else None
    if split is None:
        raise PrepareError(f"{path}: cannot tell its split from the name; expected llm.c's fineweb_train_*/"
                           "fineweb_val_*.bin or train/validation.safetensors")
    if name.endswith(".bin"):
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
        return split, "llmc", np.memmap(path, dtype="<u2", mode="r", offset=4 * LLMC_HEADER_INTS, shape=(count,)), count
    if name.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            tokens = safe_open(path, framework="numpy").get_slice("tokens")
        except Exception as e:  # safetensors' own error type: truncated, not safetensors, no "tokens"
            raise PrepareError(f"{path} is not a token file with a 'tokens' tensor ({e})") from None
        if tokens.get_dtype() != "U16" or len(tokens.get_shape()) != 1:
            raise PrepareError(f"{path}: 'tokens' is {tokens.get_dtype()} {tokens.get_shape()}, expected a 1-D "
                               "uint16 tensor of GPT-2 tokens")
        return split, "gpjt", tokens, tokens.get_shape()[0]
    raise PrepareError(f"{path}: expected an llm.c .bin or a safetensors token file")


def convert_tokens_into(folder, files, args):
    """Copy the token files' streams into our shards, split by split, in TOKEN_CHUNK pieces (bounded
    memory): no text, no tokenizer, the source's own train/validation split kept."""
    from data import file_sha256  # data.py imports torch: not worth waiting for before an error message
    sources = {"train": [], "val": []}
    for path in files:
        split, *source = open_token_file(path)
        sources[split].append((path, *source))
    # --train-tokens 0 makes an evaluation-only dataset from the validation file(s) alone
    missing = [s for s, found in sources.items() if not found and not (s == "train" and args.train_tokens == 0)]
    if missing:
        raise PrepareError(f"--from-tokens has no {' or '.join(missing)} file among {len(files)} file(s); "
                           "give both splits' files (llm.c: fineweb_val_000000.bin; gpjt: validation.safetensors)")
    wanted = {"train": args.train_tokens, "val": args.val_tokens}
    splits, described = {}, []
    for split, found in sources.items():
        available = sum(size for *_, size in found)
        count = available - args.skip_train_tokens * (split == "train") if wanted[split] is None else wanted[split]
        writer = SplitWriter(folder, split, count, args.shard_tokens, args.skip_train_tokens if split == "train" else 0)
        eot = 0
        with tqdm(total=count, unit="tok", unit_scale=True, desc=f"{split} tokens") as bar:
            for path, kind, tokens, size in found:
                described.append({"path": path, "format": kind, "split": split, "tokens": size,
                                  "sha256": file_sha256(path)})
                for start in range(0, size, TOKEN_CHUNK):
                    stop_if_asked()
                    if writer.done:
                        break
                    chunk = np.asarray(tokens[start:min(start + TOKEN_CHUNK, size)], dtype=np.int32)
                    kept = writer.add(chunk, [len(chunk)])
                    eot += int(np.count_nonzero(kept == EOT_TOKEN))
                    bar.update(len(kept))
        writer.close()
        if not writer.done:
            raise PrepareError(f"the {split} file(s) hold {writer.seen:,} tokens; asked for {count:,}"
                               f"{f' after skipping {args.skip_train_tokens:,}' if split == 'train' and args.skip_train_tokens else ''}")
        splits[split] = {**writer.summary(), "documents": eot}
    return {"splits": splits, "token_files": described}


# ---------------------------------------------------------------- analysis

def length_stats(lengths, context_length):
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    return {"documents": len(lengths), "total_tokens": total,
            "mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "share_documents_longer": float(np.mean(lengths > context_length)),
            "share_tokens_cropped": float(np.maximum(lengths - context_length, 0).sum() / total),
            "context_length": context_length}


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


def analyze(files, args):
    """files: the text sources (find_sources, or the Hub dataset)."""
    if os.path.isdir(args.histogram):
        raise PrepareError(f"--histogram {args.histogram} is a folder; give a .png file name")
    tokenizer = load_tokenizer()
    limit = args.analyze_documents or None
    lengths = []
    progress = tqdm(total=limit, unit="doc", desc="tokenizing")
    with worker_pool(args.num_proc, tokenizer) as pool:
        for batch in run_jobs(pool, lengths_job, texts_looked_at(files, args), window=2 * args.num_proc):
            lengths.extend(batch)
            progress.update(len(batch))
            if limit and len(lengths) >= limit:
                break
    progress.close()
    if not lengths:
        raise PrepareError("the input has no non-empty documents")
    lengths = np.array(lengths[:limit])
    stats = length_stats(lengths, args.context_length)
    source = input_name(files) if len(files) == 1 else f"{len(files)} files"
    os.makedirs(os.path.dirname(os.path.abspath(args.histogram)), exist_ok=True)
    plot_lengths(lengths, stats, args.histogram, source)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--input", nargs="+",
                        help=f"paths or quoted globs of .parquet (FineWeb's, or any with a string column), .txt "
                             f"(one document per file), .jsonl or .json files (one JSON object per document), "
                             f"folders of those, or folders written by datasets' save_to_disk (default: {INPUT})")
    parser.add_argument("--text-field", default=TEXT_FIELD,
                        help="the column or JSON field that holds each document's text")
    parser.add_argument("--hub-dataset", metavar="NAME",
                        help="instead of --input: stream a Hugging Face Hub dataset with the datasets library, "
                             "e.g. roneneldan/TinyStories (or a builder that ships with datasets, such as json, "
                             "with --hub-data-files)")
    parser.add_argument("--hub-split", default=HUB_SPLIT,
                        help="the split of --hub-dataset to read (also: of a save_to_disk DatasetDict folder)")
    parser.add_argument("--hub-config", metavar="NAME", help="the configuration (subset) of --hub-dataset")
    parser.add_argument("--hub-data-files", nargs="+", metavar="FILE",
                        help="data_files for --hub-dataset: files of a Hub dataset, or your own for a builder "
                             "such as json")
    parser.add_argument("--from-tokens", nargs="+", metavar="FILE",
                        help="instead of --input: token files others published, converted without re-tokenizing: "
                             "llm.c's fineweb_{train,val}_*.bin or Giles Thomas's {train,validation}.safetensors "
                             "(paths or quoted globs; their own train/validation split is kept)")
    parser.add_argument("--output", default=OUTPUT, help="dataset folder to create")
    parser.add_argument("--train-tokens", type=token_count, default=None,
                        help="tokens in the train split, or all: every train document of the input (default: the "
                             "RTX 3090 run's 534,200 batches of 6 x 1,024, + 1; with --from-tokens, all of the source's)")
    parser.add_argument("--val-tokens", type=token_count, default=None,
                        help="tokens in the val split, or all: every document the split rule sends to validation "
                             "(default: all with --train-tokens all or --from-tokens, else the RTX 3090 run's "
                             "3,200 batches of 6 x 1,024, + 1)")
    parser.add_argument("--skip-train-tokens", type=cli.non_negative_int, default=SKIP_TRAIN_TOKENS,
                        help="start the train split this far into the train stream (a fresh slice for "
                             "continued training); val is unchanged")
    parser.add_argument("--val-fraction", type=cli.fraction, default=VAL_FRACTION,
                        help="share of documents that go to validation (by hash of the text); with --val-tokens "
                             "all, that share is the whole val split")
    parser.add_argument("--shard-tokens", type=cli.positive_int, default=SHARD_TOKENS, help="tokens per shard file")
    parser.add_argument("--num-proc", type=cli.positive_int, default=NUM_PROC, help="tokenizer processes; the default is every core of this machine")
    parser.add_argument("--documents-per-job", type=cli.positive_int, default=DOCUMENTS_PER_JOB,
                        help="documents per unit of tokenizer work")
    parser.add_argument("--force", action="store_true", help="replace an existing --output once the new one is complete")
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
    if args.from_tokens and (args.input or args.hub_dataset):
        parser.error("--from-tokens is an input of its own; give it without --input or --hub-dataset")
    if args.hub_dataset and args.input:
        parser.error("--hub-dataset and --input are two inputs; give one")
    if (args.hub_config or args.hub_data_files) and not args.hub_dataset:
        parser.error("--hub-config and --hub-data-files go with --hub-dataset")
    if not (args.from_tokens or args.hub_dataset or args.input):
        args.input = [INPUT]
    if not args.from_tokens:
        args.train_tokens = TRAIN_TOKENS if args.train_tokens is None else args.train_tokens
        args.val_tokens = (ALL if args.train_tokens == ALL else VAL_TOKENS) if args.val_tokens is None else args.val_tokens
    # from here on None is "all of it", as --from-tokens has always taken an absent count
    args.train_tokens, args.val_tokens = (None if n == ALL else n for n in (args.train_tokens, args.val_tokens))
    if args.from_tokens and args.analyze:
        parser.error("--analyze reads text; it does not go with --from-tokens")
    if args.val_fraction == 0:
        parser.error("--val-fraction must be above 0: the validation split needs documents")
    return args


def stop_on_sigterm(signum, frame):
    """SIGTERM is noted, and acted on at the next safe point (stop_if_asked): raised from the handler
    itself it could land inside the pool's fork hooks, where Python ignores it."""
    SIGTERM_RECEIVED.set()


def stop_if_asked():
    if SIGTERM_RECEIVED.is_set():
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C: the working folder is removed


def main(argv=None):
    args = parse_args(argv)
    SIGTERM_RECEIVED.clear()
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        if args.from_tokens:
            files, inputs = find_inputs(args.from_tokens), []
        else:
            files = [{"kind": "hub", "name": args.hub_dataset, "split": args.hub_split, "config": args.hub_config,
                      "data_files": args.hub_data_files}] if args.hub_dataset else \
                [{**s, "split": args.hub_split} if is_dataset_dict(s) else s for s in find_sources(args.input)]
            inputs = [describe_source(source, args.text_field) for source in files]
        if args.analyze:
            return analyze(files, args)
        return prepare(files, inputs, args, argv)
    except PrepareError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: nothing was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
