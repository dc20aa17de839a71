"""Reading a dataset written by prepare_datasets.py: memory-mapped token shards served as batches.

A prepared dataset is a folder: manifest.json (what was tokenized, how, and every shard with its
sha256), then train-00000.safetensors, ..., val-00000.safetensors, ..., one 1-D int32 tensor "tokens"
each. A split is one stream of GPT-2 tokens (documents joined by <|endoftext|>) cut across its shards.
Sequence s of length T is tokens [s*T, s*T + T), its targets the same window shifted by one, so B
sequences from s read B*T + 1 consecutive tokens: safetensors' `get_slice` reads just those bytes of
the memory-mapped file, so a 13 GB split opens at once and costs almost no RAM.
"""

import contextlib
import hashlib
import json
import os
import queue
import threading

import numpy as np
import torch
from safetensors import safe_open

MANIFEST = "manifest.json"
FORMAT = "gpt2-int32-safetensors-v1"


class DatasetError(Exception):
    """A prepared dataset is missing, incomplete or not what the caller needs (message says which)."""


def load_manifest(data_dir):
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DatasetError(f"{data_dir} is not a prepared dataset (no {MANIFEST}); "
                           "create it with: python prepare_datasets.py --input 'FILES' --output DIR")
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("splits"), dict):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"{path} is not a {FORMAT} manifest with splits (format {found!r}); "
                           "re-run prepare_datasets.py")
    return manifest


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(data_dir):
    """sha256 of manifest.json: names a dataset exactly (it lists every shard's sha256)."""
    return file_sha256(os.path.join(data_dir, MANIFEST))


def open_shard(path, num_tokens):
    """The shard's "tokens" tensor as a lazy slice, after checking it is the int32 vector of
    num_tokens the manifest promises (a truncated or swapped file fails here, not mid-training)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is missing: the dataset is incomplete; re-run prepare_datasets.py")
    try:
        tokens = safe_open(path, framework="numpy").get_slice("tokens")
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise DatasetError(f"{path} is damaged ({e}); re-run prepare_datasets.py") from None
    if tokens.get_dtype() != "I32" or tokens.get_shape() != [num_tokens]:
        raise DatasetError(f"{path} holds {tokens.get_dtype()} {tokens.get_shape()}, but the manifest says "
                           f"I32 [{num_tokens}]; the dataset is inconsistent, re-run prepare_datasets.py")
    return tokens


class Tokens:
    """What a token source gives: num_tokens, read(start, count), and these from them."""

    def num_sequences(self, context_length):
        """Whole sequences of length T whose targets also exist (the last one needs one extra token)."""
        return (self.num_tokens - 1) // context_length

    def batch(self, first_sequence, batch_size, context_length):
        """batch_size sequences from first_sequence on as int64 (inputs, targets), each (batch_size, T);
        targets are the inputs shifted by one token."""
        T = context_length
        tokens = torch.from_numpy(self.read(first_sequence * T, batch_size * T + 1).astype(np.int64))
        return tokens[:-1].view(batch_size, T), tokens[1:].view(batch_size, T)


class TokenWindow(Tokens):
    """A split's tokens from a token offset on, read like a TokenStream: the evaluation sets others
    define by offset (Giles Thomas's test loss starts 50,000,000 tokens into his validation file)."""

    def __init__(self, stream, offset):
        if offset >= stream.num_tokens:
            raise DatasetError(f"the {stream.split} split of {stream.data_dir} has {stream.num_tokens:,} tokens, "
                               f"none past token {offset:,} where this evaluation set starts; is it that source's data?")
        self.stream, self.offset = stream, offset
        self.data_dir, self.split, self.num_tokens = stream.data_dir, stream.split, stream.num_tokens - offset

    def read(self, start, count):
        return self.stream.read(self.offset + start, count)


class TokenStream(Tokens):
    """One split of a prepared dataset: a read-only token stream spread over shard files."""

    def __init__(self, data_dir, split):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise DatasetError(f"{data_dir} has no {split!r} split (it has {', '.join(manifest['splits'])})")
        self.data_dir, self.split = data_dir, split
        shards = manifest["splits"][split]["shards"]
        self.paths = [os.path.join(data_dir, shard["file"]) for shard in shards]
        self.expected_sha256 = [shard.get("sha256") for shard in shards]
        self.shard_sizes = [shard["num_tokens"] for shard in shards]
        self.files = [open_shard(path, n) for path, n in zip(self.paths, self.shard_sizes)]
        # Per shard: None until hashed, then True or its DatasetError. A lock each, so the background
        # check and a reader never hash one shard twice; check_before_read: see verify_in_background.
        self.checked, self.locks = [None] * len(shards), [threading.Lock() for _ in shards]
        self.check_before_read, self.problem = False, None
        if sum(self.shard_sizes) != manifest["splits"][split]["num_tokens"]:
            raise DatasetError(f"{data_dir}: the {split} shards hold {sum(self.shard_sizes):,} tokens but the manifest "
                               f"says {manifest['splits'][split]['num_tokens']:,}; re-run prepare_datasets.py")
        # starts[i] = index of shard i's first token in the whole stream
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])

    def verify(self):
        """Check every shard's bytes against the sha256 the manifest recorded (a disk's bit-rot would
        otherwise surface as a crash or a nan mid-run). Reads the whole split: ~1 s per GB."""
        for shard in range(len(self.files)):
            self.verify_shard(shard)

    def verify_shard(self, shard):
        """Hash the shard once; damaged, its DatasetError now and at every later call."""
        with self.locks[shard]:
            if self.checked[shard] is None:
                path, expected = self.paths[shard], self.expected_sha256[shard]
                damaged = expected and file_sha256(path) != expected
                self.checked[shard] = DatasetError(f"{path} is damaged: its sha256 differs from the one in "
                                                   f"{MANIFEST}; re-run prepare_datasets.py (or copy the dataset "
                                                   "again)") if damaged else True
        if self.checked[shard] is not True:
            raise self.checked[shard]

    def verify_in_background(self):
        """verify() on a thread (`problem` holds what it finds), so training starts at once. Yet read()
        hashes a shard the thread has not got to before serving it: a damaged shard is named before any
        of its bytes reach the model (a flipped byte would be an index error in the embedding)."""
        self.check_before_read = True

        def check():
            try:
                self.verify()
            except DatasetError as e:
                self.problem = e
        threading.Thread(target=check, daemon=True).start()

    def read(self, start, count):
        """Tokens [start, start + count) as an int32 numpy array, across shard boundaries."""
        if start < 0 or start + count > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + count}) are outside the {self.split} split's "
                             f"{self.num_tokens:,} tokens")
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while count > 0:
            if self.check_before_read and self.checked[shard] is not True:
                self.verify_shard(shard)
            offset = start - int(self.starts[shard])
            take = min(count, self.shard_sizes[shard] - offset)
            pieces.append(self.files[shard][offset:offset + take])
            start, count, shard = start + take, count - take, shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class RandomTokens(Tokens):
    """A stand-in for a TokenStream of random tokens (timing does not depend on their values)."""

    def __init__(self, vocab_size, seed):
        self.vocab_size, self.seed, self.num_tokens, self.split = vocab_size, seed, 2**40, "random"

    def read(self, start, count):
        return np.random.default_rng([self.seed, start]).integers(0, self.vocab_size, count, dtype=np.int32)


def micro_batch_starts(first_step_sequence, num_steps, sequences_per_step, rank, batch_size, grad_accum):
    """The first sequence of every micro-batch this rank reads, step by step: step s owns global
    sequences [s*G, (s+1)*G), and micro-step m of rank r takes the block at (r*A + m)*B inside it."""
    for step in range(num_steps):
        start = first_step_sequence + step * sequences_per_step
        for micro in range(grad_accum):
            yield start + (rank * grad_accum + micro) * batch_size


class BatchLoader:
    """(first_sequence, inputs, targets) for each first sequence in `starts`, in order, on `device`.
    A thread reads ahead into `depth` pinned int32 buffers, reused in turn; each copy to the GPU is
    asynchronous, and a buffer is refilled only once its copy has finished (a CUDA event says when):
    reading, copying and the GPU's work overlap, and no step waits for data or pins fresh memory."""

    def __init__(self, stream, starts, batch_size, context_length, device, depth=4):
        self.stream, self.B, self.T, self.device = stream, batch_size, context_length, torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        n = batch_size * context_length + 1
        with torch.inference_mode(False):  # the reading thread writes them, outside any inference mode
            self.buffers = [torch.empty(n, dtype=torch.int32, pin_memory=self.on_cuda) for _ in range(depth)]
        self.copied = [None] * depth      # the CUDA event of each buffer's last copy to the device
        self.free, self.ready = queue.Queue(), queue.Queue(maxsize=depth)
        for slot in range(depth):
            self.free.put(slot)
        self.stopping = False
        self.thread = threading.Thread(target=self._read, args=(iter(starts),), daemon=True)
        self.thread.start()

    def _read(self, starts):
        try:
            for first in starts:
                slot = self.free.get()
                if self.stopping:
                    return
                if self.copied[slot] is not None:
                    self.copied[slot].synchronize()
                tokens = self.stream.read(first * self.T, self.B * self.T + 1)
                self.buffers[slot].copy_(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32)))
                self.ready.put((first, slot))
                if self.stopping:
                    return
            self.ready.put(None)
        except BaseException as exc:  # handed to the training loop, which raises it
            self.ready.put(exc)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.ready.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        first, slot = item
        if self.on_cuda:
            # The copy runs on the current stream of *this* GPU, and the event must be recorded on that
            # same stream: recorded on another device's stream it completes at once, and the reading
            # thread would refill a buffer still being copied.
            tokens = self.buffers[slot].to(self.device, non_blocking=True)
            self.copied[slot] = torch.cuda.current_stream(self.device).record_event()
        else:
            tokens = self.buffers[slot].clone().to(self.device)
        self.free.put(slot)
        return first, tokens[:-1].view(self.B, self.T).long(), tokens[1:].view(self.B, self.T).long()

    def close(self):
        """Stop the reading thread and wait for it: a thread still copying into a tensor while the
        interpreter exits makes torch abort the process."""
        self.stopping = True
        self.free.put(0)  # wake the thread if it waits for a buffer
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:  # and if it waits to hand one over
                    self.ready.get_nowait()
            self.thread.join(timeout=0.05)
