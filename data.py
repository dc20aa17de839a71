"""Reading a dataset written by prepare_datasets.py: memory-mapped token shards served as batches.

A prepared dataset is a folder:
    manifest.json                       what was tokenized, how, and the shard list (the reader's index)
    train-00000.safetensors, ...        one 1-D int32 tensor named "tokens" each
    val-00000.safetensors, ...

Each split is one long stream of GPT-2 tokens (documents joined by <|endoftext|>), cut across shard
files. Sequence s of length T is tokens [s*T, s*T + T) and its targets are the same window shifted by
one, so a batch of B sequences starting at sequence s reads B*T + 1 consecutive tokens. Nothing is
loaded up front: safetensors' `get_slice` reads just the bytes a batch needs from the memory-mapped
file, so a 13 GB train split opens instantly and costs almost no RAM.
"""

import hashlib
import json
import os
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
    with open(os.path.join(data_dir, MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def open_shard(path, num_tokens):
    """The shard's "tokens" tensor as a lazy slice, after checking it is the int32 vector of
    num_tokens the manifest promises (a truncated or swapped file fails here, not mid-training)."""
    try:
        tokens = safe_open(path, framework="numpy").get_slice("tokens")
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise DatasetError(f"{path} is damaged ({e}); re-run prepare_datasets.py") from None
    if tokens.get_dtype() != "I32" or tokens.get_shape() != [num_tokens]:
        raise DatasetError(f"{path} holds {tokens.get_dtype()} {tokens.get_shape()}, but the manifest says "
                           f"I32 [{num_tokens}]; the dataset is inconsistent, re-run prepare_datasets.py")
    return tokens


class TokenWindow:
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

    def num_sequences(self, context_length):
        return (self.num_tokens - 1) // context_length


class TokenStream:
    """One split of a prepared dataset: a read-only token stream spread over shard files."""

    def __init__(self, data_dir, split):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise DatasetError(f"{data_dir} has no {split!r} split (it has {', '.join(manifest['splits'])})")
        self.data_dir, self.split = data_dir, split
        self.files, self.shard_sizes, self.expected_sha256 = [], [], {}
        for shard in manifest["splits"][split]["shards"]:
            path = os.path.join(data_dir, shard["file"])
            self.expected_sha256[path] = shard.get("sha256")
            if not os.path.isfile(path):
                raise DatasetError(f"{path} is missing: the dataset is incomplete; re-run prepare_datasets.py")
            self.files.append(open_shard(path, shard["num_tokens"]))
            self.shard_sizes.append(shard["num_tokens"])
        if sum(self.shard_sizes) != manifest["splits"][split]["num_tokens"]:
            raise DatasetError(f"{data_dir}: the {split} shards hold {sum(self.shard_sizes):,} tokens but the manifest "
                               f"says {manifest['splits'][split]['num_tokens']:,}; re-run prepare_datasets.py")
        # starts[i] = index of shard i's first token in the whole stream
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])

    def verify(self):
        """Check every shard's bytes against the sha256 the manifest recorded (a disk's bit-rot would
        otherwise surface as a crash or a nan mid-run). Reads the whole split: ~1 s per GB."""
        for path, expected in self.expected_sha256.items():
            if expected and file_sha256(path) != expected:
                raise DatasetError(f"{path} is damaged: its sha256 differs from the one in {MANIFEST}; "
                                   "re-run prepare_datasets.py (or copy the dataset again)")

    def verify_in_background(self):
        """verify() on a thread; `problem` holds its DatasetError if it finds one (the training loop
        looks at it), so training starts at once and a 13 GB split is checked while it runs."""
        self.problem = None

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
            offset = start - int(self.starts[shard])
            take = min(count, self.shard_sizes[shard] - offset)
            pieces.append(self.files[shard][offset:offset + take])
            start, count, shard = start + take, count - take, shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def num_sequences(self, context_length):
        """Whole sequences of length T whose targets also exist (the last one needs one extra token)."""
        return (self.num_tokens - 1) // context_length

    def batch(self, first_sequence, batch_size, context_length):
        """Sequences first_sequence .. first_sequence + batch_size - 1 as int64 (inputs, targets),
        each (batch_size, context_length); targets are the inputs shifted by one token."""
        tokens = self.read(first_sequence * context_length, batch_size * context_length + 1)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        inputs = tokens[:-1].view(batch_size, context_length)
        targets = tokens[1:].view(batch_size, context_length)
        return inputs, targets
