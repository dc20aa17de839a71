"""Shared fixtures: real English text as FineWeb-style parquet, and a small prepared dataset made from it.

Other test files use `tiny_dataset` (a folder data.TokenStream reads: 300,000 train tokens in three
100,000-token shards, 30,000 val tokens) and `sample_parquet` (the parquet file it was made from).
Both are built once per test session, in a few seconds, with no network.
"""

import pytest

import prepare_datasets
import sample_text

SAMPLE_CHARS = 2_000_000      # ~550k GPT-2 tokens of Python's documentation: enough for both splits below
TINY_TRAIN_TOKENS = 300_000
TINY_VAL_TOKENS = 30_000
TINY_VAL_FRACTION = 0.1       # 10%, not the default 1%, so 30k val tokens need only ~300k tokens of text
TINY_SHARD_TOKENS = 100_000   # several shards, so readers are exercised across shard boundaries


@pytest.fixture(scope="session")
def sample_parquet(tmp_path_factory):
    """Path of a FineWeb-schema parquet file of real English text (Python's docstrings and help topics)."""
    path = tmp_path_factory.mktemp("sample") / "sample.parquet"
    sample_text.write_sample_parquet(str(path), max_chars=SAMPLE_CHARS)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, sample_parquet):
    """Path of a prepared dataset (manifest.json + train/val shards) made by prepare_datasets.main."""
    out = tmp_path_factory.mktemp("tiny_dataset_parent") / "tiny"
    prepare_datasets.main(["--input", sample_parquet, "--output", str(out),
                           "--train-tokens", str(TINY_TRAIN_TOKENS), "--val-tokens", str(TINY_VAL_TOKENS),
                           "--val-fraction", str(TINY_VAL_FRACTION), "--shard-tokens", str(TINY_SHARD_TOKENS)])
    return str(out)
