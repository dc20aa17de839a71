"""Turn FineWeb parquet files into GPT-2 token shards for training and validation, in bounded memory.

    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --output datasets/fineweb-10BT
    python prepare_datasets.py --input 'fineweb/sample/10BT/*.parquet' --analyze     # look before you cut

Each document (a row's `text`; null or empty rows are skipped and counted) goes to validation or
training by a hash of its text, so the same input always gives the same split, a document is never
in both, and exact duplicates always land on the same side. Documents are tokenized with GPT-2's
`encode_ordinary` (a literal "<|endoftext|>" in web text stays text), each is followed by one
<|endoftext|> token, and a split's documents are concatenated into one stream: the RTX 3090 run's "one long
document" packing, with no padding and nothing cropped. The streams are cut at exactly the token
counts asked for and written as shards (DIR/train-00000.safetensors, ..., DIR/val-00000.safetensors,
...; one 1-D int32 tensor "tokens" each) plus DIR/manifest.json, which data.py reads.

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

# The RTX 3090 run's splits (reference.py): 534,200 training batches and 3,200 validation batches
# of 6 x 1,024. The +1 is the target of the last position, so every one of those batches is whole.
TRAIN_TOKENS = reference.TRAIN_TOKENS + 1  # 3,282,124,801
VAL_TOKENS = reference.VAL_TOKENS + 1      # 19,660,801
SKIP_TRAIN_TOKENS = 0
VAL_FRACTION = 0.01           # share of documents (not tokens) that go to validation
SHARD_TOKENS = 100_000_000    # 400 MB per shard file
NUM_PROC = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
DOCUMENTS_PER_JOB = 256       # one unit of worker work: ~170k tokens of FineWeb, a few hundredths of a second
ANALYZE_DOCUMENTS = 100_000   # documents the analysis tokenizes (0 = all)
HISTOGRAM = "out/token_lengths.png"  # out/ is git-ignored

EOT_TOKEN = 50256             # <|endoftext|>, as in gpt.py (not imported: gpt.py pulls in torch)
SPLIT_RULE = ("a document is in val iff int.from_bytes(hashlib.blake2b(text.encode('utf-8'), "
              "digest_size=8).digest(), 'big') < round(val_fraction * 2**64), else in train")
TOKENIZER_NOTE = ("tiktoken GPT-2 encode_ordinary: a literal '<|endoftext|>' inside a document is encoded "
                  "as ordinary text; token 50256 appears only as the separator after each document")
PACKING = ("each document's tokens then one <|endoftext|> (50256); a split's documents concatenated in "
           "input order (files sorted by name, rows in file order) and cut at exactly num_tokens; "
           "no padding, no cropping")


class PrepareError(Exception):
    """Bad input or a failed run; main() prints the message as one line and exits non-zero."""


# ---------------------------------------------------------------- input

def find_inputs(patterns):
    """Files matching the glob patterns, sorted by name within each pattern, each once."""
    files = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.expanduser(pattern))):
            if os.path.isfile(path) and path not in files:
                files.append(path)
    if not files:
        raise PrepareError(f"no files match {' '.join(patterns)}; download some with download_fineweb.py "
                           "or point --input at parquet files (quote the glob)")
    return files


def describe_input(path):
    """Open a parquet file's footer (catches truncated files now) and check it has a text column."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"cannot read {path} as parquet ({str(e).splitlines()[0]}); "
                           "re-download it (download_fineweb.py resumes) or remove it from --input") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise PrepareError(f"{path} has no 'text' column (it has: {', '.join(schema.names)}); "
                           "the input must use FineWeb's schema")
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise PrepareError(f"{path}: column 'text' holds {schema.field('text').type}, not strings")
    return {"path": path, "bytes": os.path.getsize(path), "rows": parquet.metadata.num_rows}


def iter_texts(files, batch_documents):
    """Lists of texts (None for nulls), streamed row group by row group so memory stays flat."""
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            # One row group per call: a single iter_batches over the whole file keeps every
            # pre-buffered row group until the end (pyarrow 26: +50 MB per 57 MB file read).
            for row_group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(batch_size=batch_documents, columns=["text"], row_groups=[row_group]):
                    yield batch.column(0).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{path} is damaged ({str(e).splitlines()[0]}); re-download it") from None


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
    return ProcessPoolExecutor(num_proc, initializer=start_worker, initargs=(tokenizer, threshold))


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

def safetensors_header(num_tokens):
    """The safetensors preamble for one little-endian int32 tensor "tokens" of num_tokens: an 8-byte
    header length, then JSON padded with spaces to 8 bytes. Written by hand so a shard can be
    streamed to disk without ever holding it in memory."""
    header = json.dumps({"tokens": {"dtype": "I32", "shape": [num_tokens], "data_offsets": [0, 4 * num_tokens]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


class SplitWriter:
    """Receives one split's token stream in pieces and keeps tokens [skip, skip + num_tokens) of it,
    streamed into shard files of at most shard_tokens each."""

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
        return self.seen >= self.skip + self.num_tokens

    def add(self, tokens, lengths):
        """Take the next piece of the stream (documents of the given lengths); returns the tokens kept."""
        end = self.skip + self.num_tokens
        doc_ends = self.seen + np.cumsum(lengths)
        doc_starts = doc_ends - lengths
        self.skipped_documents += int(np.count_nonzero(doc_ends <= self.skip))
        if self.num_tokens:
            self.documents += int(np.count_nonzero((doc_ends > self.skip) & (doc_starts < end)))
        keep = kept = tokens[max(0, self.skip - self.seen):max(0, end - self.seen)]
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
        self.shard_end = self.written + min(self.shard_tokens, self.num_tokens - self.written)
        self.shards.append({"file": name, "num_tokens": self.shard_end - self.written})
        self.file = open(os.path.join(self.folder, name), "wb")
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

    def close(self):
        if self.file is not None:
            self.file.close()

    def summary(self):
        return {"num_tokens": self.written, "documents": self.documents,
                "skipped_documents": self.skipped_documents, "shards": self.shards}


def tokens_needed_so_far(writers):
    return sum(min(w.seen, w.skip + w.num_tokens) for w in writers.values())


def tokenize_into(folder, files, tokenizer, args):
    """Stream the input through the tokenizer into both splits' shards; stop once both are full."""
    writers = {"train": SplitWriter(folder, "train", args.train_tokens, args.shard_tokens, args.skip_train_tokens),
               "val": SplitWriter(folder, "val", args.val_tokens, args.shard_tokens)}
    rows = empty = 0
    total = args.skip_train_tokens + args.train_tokens + args.val_tokens
    progress = tqdm(total=total, unit="tok", unit_scale=True, desc="tokenizing", smoothing=0.05)
    try:
        with worker_pool(args.num_proc, tokenizer, val_threshold(args.val_fraction)) as pool:
            for n, encoded, n_empty in run_jobs(pool, encode_job, iter_texts(files, args.documents_per_job),
                                                window=2 * args.num_proc):
                before = tokens_needed_so_far(writers)
                for split, (tokens, lengths) in encoded.items():
                    writers[split].add(tokens, lengths)
                rows, empty = rows + n, empty + n_empty
                progress.update(tokens_needed_so_far(writers) - before)
                if all(w.done for w in writers.values()):
                    break
    finally:
        progress.close()
        for writer in writers.values():
            writer.close()
    train, val = writers["train"], writers["val"]
    if not (train.done and val.done):
        raise PrepareError(
            f"not enough text: the input holds {train.seen:,} train tokens (asked {args.train_tokens:,}"
            f"{f' after skipping {args.skip_train_tokens:,}' if args.skip_train_tokens else ''}) and "
            f"{val.seen:,} val tokens (asked {args.val_tokens:,}); add input files or ask for fewer tokens")
    return {"rows_read": rows, "empty_rows_skipped": empty,
            "splits": {name: w.summary() for name, w in writers.items()}}


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
        "input": {"patterns": args.input, "files": inputs, "rows_read": result.get("rows_read"),
                  "empty_rows_skipped": result.get("empty_rows_skipped")},
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
    clean_up_after_a_killed_run(args.output)
    check_output(args.output, args.force, files)
    tokenizer = load_tokenizer()
    if args.from_tokens:
        print(f"{len(files)} token file(s), {sum(os.path.getsize(f) for f in files) / 2**20:,.1f} MiB -> "
              f"{args.output}: the source's train and validation splits, shards of {args.shard_tokens:,}")
    else:
        print(f"{len(files)} input file(s), {sum(i['bytes'] for i in inputs) / 2**20:,.1f} MiB, "
              f"{sum(i['rows'] for i in inputs):,} rows -> {args.output}: train {args.train_tokens:,} tokens"
              f"{f' after skipping {args.skip_train_tokens:,}' if args.skip_train_tokens else ''}, val "
              f"{args.val_tokens:,} tokens ({args.val_fraction:.2%} of documents), shards of "
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
    if os.path.isdir(args.histogram):
        raise PrepareError(f"--histogram {args.histogram} is a folder; give a .png file name")
    tokenizer = load_tokenizer()
    limit = args.analyze_documents or None
    lengths = []
    progress = tqdm(total=limit, unit="doc", desc="tokenizing")
    with worker_pool(args.num_proc, tokenizer) as pool:
        for batch in run_jobs(pool, lengths_job, iter_texts(files, args.documents_per_job), window=2 * args.num_proc):
            lengths.extend(batch)
            progress.update(len(batch))
            if limit and len(lengths) >= limit:
                break
    progress.close()
    if not lengths:
        raise PrepareError("the input has no non-empty documents")
    lengths = np.array(lengths[:limit])
    stats = length_stats(lengths, args.context_length)
    source = files[0] if len(files) == 1 else f"{len(files)} files"
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

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--input", nargs="+", default=[INPUT],
                        help="parquet files with a 'text' column: paths or quoted globs")
    parser.add_argument("--from-tokens", nargs="+", metavar="FILE",
                        help="instead of parquet: token files others published, converted without re-tokenizing: "
                             "llm.c's fineweb_{train,val}_*.bin or Giles Thomas's {train,validation}.safetensors "
                             "(paths or quoted globs; their own train/validation split is kept)")
    parser.add_argument("--output", default=OUTPUT, help="dataset folder to create")
    parser.add_argument("--train-tokens", type=cli.non_negative_int, default=None,
                        help="tokens in the train split (default: the RTX 3090 run's 534,200 batches of 6 x 1,024, "
                             "+ 1; with --from-tokens, all of the source's)")
    parser.add_argument("--val-tokens", type=cli.non_negative_int, default=None,
                        help="tokens in the val split (default: the RTX 3090 run's 3,200 batches of 6 x 1,024, + 1; "
                             "with --from-tokens, all of the source's)")
    parser.add_argument("--skip-train-tokens", type=cli.non_negative_int, default=SKIP_TRAIN_TOKENS,
                        help="start the train split this far into the train stream (a fresh slice for "
                             "continued training); val is unchanged")
    parser.add_argument("--val-fraction", type=cli.fraction, default=VAL_FRACTION,
                        help="share of documents that go to validation (by hash of the text)")
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
    args = parser.parse_args(argv)
    if not args.from_tokens:
        args.train_tokens = TRAIN_TOKENS if args.train_tokens is None else args.train_tokens
        args.val_tokens = VAL_TOKENS if args.val_tokens is None else args.val_tokens
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
        files = find_inputs(args.from_tokens or args.input)
        inputs = [] if args.from_tokens else [describe_input(path) for path in files]
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
