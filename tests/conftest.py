"""Shared fixtures: real English text as FineWeb-style parquet, and a small prepared dataset made from it.

Other test files use `tiny_dataset` (a folder data.TokenStream reads: 300,000 train tokens in three
100,000-token shards, 30,000 val tokens) and `sample_parquet` (the parquet file it was made from).
Both are built once per test session (shared by pytest-xdist's workers), in seconds, with no network.

The tests run in an environment of their own, whatever the caller exported: see KNOWN_ENVIRONMENT.
"""

import atexit
import fcntl
import os
import shutil
import tempfile

# Settings of the caller's shell that change what the code under test does: the Hub's offline switch,
# endpoint, token and caches (HF_*, and the older HUGGINGFACE_* and TRANSFORMERS_* names), hidden GPUs,
# an OpenAI key, torchrun's rank variables, tiktoken's cache. They are removed; a test that wants one
# sets it itself. This runs here, before any test module is imported, and not in a fixture:
# huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME once, when it is imported
# (huggingface_hub.constants), so a fixture would reach the tests' subprocesses but not the tests.
CALLERS_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
CALLERS_NAMES = ("CUDA_VISIBLE_DEVICES", "OPENAI_API_KEY", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                 "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
for name in list(os.environ):
    if name.startswith(CALLERS_PREFIXES) or name in CALLERS_NAMES:
        del os.environ[name]
# A fresh folder for the session, removed at its end: an empty Hub cache, and the temporary folder of
# every subprocess. This process keeps the one it started with (tempfile has read it by now), where
# pytest keeps the last run's failed tests' tmp_path folders for a look (pytest.ini).
ENVIRONMENT_DIR = tempfile.mkdtemp(prefix="tests-environment-", dir=tempfile.gettempdir())
atexit.register(shutil.rmtree, ENVIRONMENT_DIR, ignore_errors=True)
# One torch thread per process, here and in every subprocess: the tests' models are tiny and their
# processes many, so a second thread only spins for the other core (an 8-step train.py run on 2 loaded
# cores: 13 s with 2 threads, 6 s with 1).
KNOWN_ENVIRONMENT = {"HF_HOME": os.path.join(ENVIRONMENT_DIR, "hf_home"),
                     "TMPDIR": os.path.join(ENVIRONMENT_DIR, "tmp"), "OMP_NUM_THREADS": "1"}
os.mkdir(KNOWN_ENVIRONMENT["TMPDIR"])
os.environ.update(KNOWN_ENVIRONMENT)

import pytest  # noqa: E402  (after the environment is set, like everything the tests import)

import prepare_datasets  # noqa: E402
import sample_text  # noqa: E402

SAMPLE_CHARS = 2_000_000      # ~550k GPT-2 tokens of Python's documentation: enough for both splits below
TINY_TRAIN_TOKENS = 300_000
TINY_VAL_TOKENS = 30_000
TINY_VAL_FRACTION = 0.1       # 10%, not the default 1%, so 30k val tokens need only ~300k tokens of text
TINY_SHARD_TOKENS = 100_000   # several shards, so readers are exercised across shard boundaries


def built_once(tmp_path_factory, name, build):
    """Path of FOLDER/FILE `name`, made by build(path) once per test session, alone in a folder of its own:
    under pytest-xdist the first worker to need it builds it in the session's shared folder while the
    others wait on a lock, then all read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, the session's folder; each worker's own is pytest-N/popen-gwK/
    folder = name.split("/")[0]
    with open(root / f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{folder}.done").exists():
            shutil.rmtree(root / folder, ignore_errors=True)  # what a failed build left
            (root / folder).mkdir()
            build(str(root / name))
            (root / f"{folder}.done").touch()
    return str(root / name)


@pytest.fixture(scope="session")
def sample_parquet(tmp_path_factory):
    """Path of a FineWeb-schema parquet file of real English text (Python's docstrings and help topics)."""
    return built_once(tmp_path_factory, "sample/sample.parquet",
                      lambda path: sample_text.write_sample_parquet(path, max_chars=SAMPLE_CHARS))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, sample_parquet):
    """Path of a prepared dataset (manifest.json + train/val shards) made by prepare_datasets.main."""
    return built_once(tmp_path_factory, "tiny_dataset/tiny", lambda path: prepare_datasets.main([
        "--input", sample_parquet, "--output", path, "--train-tokens", str(TINY_TRAIN_TOKENS),
        "--val-tokens", str(TINY_VAL_TOKENS), "--val-fraction", str(TINY_VAL_FRACTION),
        "--shard-tokens", str(TINY_SHARD_TOKENS)]))
