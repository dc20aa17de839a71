"""Data pipeline: sample text, prepare_datasets.py, download_fineweb.py and data.TokenStream.

References: tiktoken's GPT-2 encoding called directly on each document, the split rule recomputed
here with hashlib, safetensors' own reader, numpy slicing, hand-computed length statistics, and
pydoc_data's topics and inspect for the sample text's documents.
"""

import ast
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

import data
import download_fineweb
import prepare_datasets
import reference
import sample_text
import train
from gpt import GPTModel, count_parameters, get_tokenizer, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
# Rows that exercise the edge cases: nulls and empties (skipped, counted), a literal end-of-text marker
# inside web text (must stay text), non-ASCII, and an exact duplicate (must land in the same split).
SPECIAL_TEXTS = [None, "", "A page that quotes the marker <|endoftext|> in the middle of a sentence.",
                 "Naïve café, 日本語のテキスト, emoji 🙂 and a tab\there.", None, "",
                 "The same sentence twice.", "The same sentence twice."]
FINEWEB_SCHEMA = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()),
                            ("url", pa.string()), ("date", pa.string()), ("file_path", pa.string()),
                            ("language", pa.string()), ("language_score", pa.float64()),
                            ("token_count", pa.int64())])


# ---------------------------------------------------------------- independent references

def write_fineweb_parquet(path, texts, row_group_size=64):
    rows = [{"text": t, "id": f"<urn:uuid:{i}>", "dump": "CC-TEST", "url": f"https://example.com/{i}",
             "date": "2024-01-01", "file_path": "s3://test", "language": "en", "language_score": 0.9,
             "token_count": None} for i, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(rows, schema=FINEWEB_SCHEMA), path, row_group_size=row_group_size)


def goes_to_val(text, fraction):
    """The split rule as the issue suggests it: a hash of the text picks the bucket."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") < round(fraction * 2**64)


def reference_streams(texts, fraction):
    """{split: (token stream with an EOT after each document, list of per-document token lists)}."""
    enc = get_tokenizer()
    docs = {"train": [], "val": []}
    for text in texts:
        if text:
            docs["val" if goes_to_val(text, fraction) else "train"].append(enc.encode_ordinary(text) + [EOT])
    return {split: (np.array([t for d in ds for t in d], dtype=np.int32), ds) for split, ds in docs.items()}


def read_split(folder, split):
    """The split's tokens via safetensors' own reader, shard by shard, plus the manifest entry."""
    with open(os.path.join(folder, "manifest.json")) as f:
        info = json.load(f)["splits"][split]
    arrays = [load_file(os.path.join(folder, s["file"]))["tokens"] for s in info["shards"]]
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int32)), info


def documents_of(stream):
    """Split a packed stream back into documents at EOT (each keeps its EOT)."""
    cuts = np.flatnonzero(stream == EOT) + 1
    return [tuple(d) for d in np.split(stream, cuts) if len(d)]


def prepare(inputs, output, *extra):
    return prepare_datasets.main(["--input", *inputs, "--output", str(output), *map(str, extra)])


def run_script(script, *args, env=None):
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def assert_one_line_error(proc, *phrases):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two FineWeb-schema files of real text (Python's docstrings) plus the edge-case rows."""
    folder = tmp_path_factory.mktemp("corpus")
    # past the first 40 help topics (long) into the docstrings (short): ~1,000 documents, ~130k tokens
    texts = [d["text"] for d in sample_text.iter_documents(max_chars=700_000)][40:]
    texts = SPECIAL_TEXTS[:4] + texts[:len(texts) // 2] + SPECIAL_TEXTS[4:] + texts[len(texts) // 2:]
    half = len(texts) // 2
    paths = [str(folder / "part-000.parquet"), str(folder / "part-001.parquet")]
    write_fineweb_parquet(paths[0], texts[:half])
    write_fineweb_parquet(paths[1], texts[half:])
    return {"paths": paths, "texts": texts, "ref": reference_streams(texts, 0.1)}


@pytest.fixture(scope="module")
def many_short(tmp_path_factory):
    """20,000 short distinct documents: enough to see the default 1% split rate."""
    path = str(tmp_path_factory.mktemp("short") / "short.parquet")
    texts = [f"Note {i}: the {['red', 'green', 'blue'][i % 3]} report number {i * 7919 % 10007}." for i in range(20_000)]
    write_fineweb_parquet(path, texts, row_group_size=4096)
    return path, texts


# ---------------------------------------------------------------- sample_text.py

def test_sample_parquet_has_fineweb_schema_and_real_text(sample_parquet):
    table = pq.read_table(sample_parquet)
    assert table.schema.names == FINEWEB_SCHEMA.names
    texts = table["text"].to_pylist()
    assert len(texts) > 1000 and all(texts) and len(set(texts)) == len(texts)
    assert len(set(table["id"].to_pylist())) == len(texts)
    assert sum(map(len, texts)) >= 1_900_000
    # token_count is the GPT-2 count, as in FineWeb
    enc = get_tokenizer()
    assert table["token_count"].to_pylist()[:200] == [len(enc.encode_ordinary(t)) for t in texts[:200]]
    # mostly English prose: the commonest words are there
    words = " ".join(texts[:500]).lower().split()
    assert all(words.count(w) > 100 for w in ("the", "of", "is", "to"))


def test_sample_documents_are_pydocs_help_topics_then_the_stdlib_docstrings():
    """The order the module promises, rebuilt here from pydoc_data's dict and inspect: the help topics by
    name with repeats dropped (in Python 3.11 'if' repeats 'else'), then __future__.py's module docstring,
    the first file of the standard library in sorted order."""
    import __future__
    import inspect
    from pydoc_data.topics import topics

    version = f"python-{sys.version_info.major}.{sys.version_info.minor}"
    expected, seen = [], set()
    for name in sorted(topics):
        if topics[name].strip() not in seen:
            seen.add(topics[name].strip())
            expected.append((f"python-stdlib://{version}/pydoc_data/topics.py#{name}", topics[name].strip()))
    docs = list(sample_text.iter_documents(max_documents=300))
    assert [(d["url"], d["text"]) for d in docs[:len(expected)]] == expected
    after = docs[len(expected)]
    assert after["text"] == inspect.getdoc(__future__) and after["file_path"] == "__future__.py"
    assert len(docs) == 300 and len({d["text"] for d in docs}) == 300 and len({d["id"] for d in docs}) == 300
    assert {d["dump"] for d in docs} == {f"{version}-stdlib"} and all(d["token_count"] is None for d in docs)
    # max_chars stops at the first document that reaches it, counted by hand over the topics
    cut, total = [], 0
    for _, text in expected:
        if total >= 10_000:
            break
        cut.append(text)
        total += len(text)
    assert [d["text"] for d in sample_text.iter_documents(max_chars=10_000)] == cut


def test_docstrings_are_ast_walks_in_its_order_wherever_the_defs_nest():
    """Reference: ast.walk over every node. Defs inside if/try/except/with/for/match and classes, and the
    standard library's own files."""
    def by_ast_walk(source):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= sample_text.MIN_DOCSTRING_CHARS:
                    yield getattr(node, "lineno", 1), text

    doc = lambda name: f'"""The {name} docstring, long enough to be kept by the filter."""'
    nested = f"""{doc("module")}
if True:
    def a():
        {doc("a")}
        class B:
            {doc("B")}
try:
    pass
except ValueError:
    async def c():
        {doc("c")}
finally:
    with open("x") as f:
        for i in range(3):
            def d():
                {doc("d")}
match 1:
    case 1:
        def e():
            {doc("e")}
f = lambda: 1
def g():
    {doc("g")}
"""
    assert len(list(sample_text.docstrings(nested))) == 7
    stdlib = sysconfig.get_paths()["stdlib"]
    for source in [nested] + [open(os.path.join(stdlib, name), encoding="utf-8").read()
                              for name in ("argparse.py", "ast.py", "asyncio/base_events.py", "typing.py")]:
        assert list(sample_text.docstrings(source)) == list(by_ast_walk(source))

# ---------------------------------------------------------------- defaults

def test_default_token_counts_follow_the_rtx3090_run():
    # 3,200 validation batches of 6 x 1,024 and the RTX 3090 run's 534,200 training batches, each + 1 target
    assert prepare_datasets.VAL_TOKENS == 3_200 * 6 * 1_024 + 1 == 19_660_801
    assert prepare_datasets.TRAIN_TOKENS == 534_200 * 6 * 1_024 + 1 == 3_282_124_801
    with torch.device("meta"):
        params = count_parameters(GPTModel(model_config("gpt2-small")))
    assert reference.PARAMETERS == params
    assert prepare_datasets.TRAIN_TOKENS - 1 >= 20 * params  # at least Chinchilla's 20 tokens per parameter


# ---------------------------------------------------------------- prepare_datasets.py

def test_all_text_becomes_exactly_the_reference_streams(corpus, tmp_path):
    train_ref, val_ref = corpus["ref"]["train"][0], corpus["ref"]["val"][0]
    out = tmp_path / "full"
    manifest = prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", len(train_ref),
                       "--val-tokens", len(val_ref), "--shard-tokens", 7_000, "--num-proc", 2)
    for split, ref in (("train", train_ref), ("val", val_ref)):
        tokens, info = read_split(out, split)
        np.testing.assert_array_equal(tokens, ref)
        assert info["num_tokens"] == len(ref)
        assert info["documents"] == len(corpus["ref"][split][1])
        assert [s["num_tokens"] for s in info["shards"]] == [min(7_000, len(ref) - i) for i in range(0, len(ref), 7_000)]
        for shard in info["shards"]:
            with open(out / shard["file"], "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
    # one EOT per non-empty document: the literal "<|endoftext|>" in a document stayed text
    non_empty = [t for t in corpus["texts"] if t]
    assert np.count_nonzero(train_ref == EOT) + np.count_nonzero(val_ref == EOT) == len(non_empty)
    assert manifest["input"]["empty_rows_skipped"] == len(corpus["texts"]) - len(non_empty)
    assert [f["rows"] for f in manifest["input"]["files"]] == [pq.ParquetFile(p).metadata.num_rows for p in corpus["paths"]]
    assert "encode_ordinary" in manifest["tokenizer"]["encoding"]
    assert len(os.listdir(tmp_path)) == 1  # no temporary folder left beside the output


def test_streams_are_cut_at_exactly_the_requested_counts(corpus, tmp_path):
    train_ref, train_docs = corpus["ref"]["train"]
    n_train, n_val = len(train_ref) // 3 + 17, 123
    prepare(corpus["paths"], tmp_path / "cut", "--val-fraction", 0.1, "--train-tokens", n_train,
            "--val-tokens", n_val, "--shard-tokens", 5_000)
    tokens, info = read_split(tmp_path / "cut", "train")
    np.testing.assert_array_equal(tokens, train_ref[:n_train])
    ends = np.cumsum([len(d) for d in train_docs])
    assert info["documents"] == int(np.searchsorted(ends, n_train) + 1)  # the last one is cut
    val, _ = read_split(tmp_path / "cut", "val")
    np.testing.assert_array_equal(val, corpus["ref"]["val"][0][:n_val])


@pytest.mark.slow
def test_split_is_disjoint_deterministic_and_about_one_percent(many_short, tmp_path):
    path, texts = many_short
    ref = reference_streams(texts, prepare_datasets.VAL_FRACTION)
    counts = ["--train-tokens", len(ref["train"][0]), "--val-tokens", len(ref["val"][0])]
    manifest = prepare([path], tmp_path / "a", *counts)  # default --val-fraction
    train, info_train = read_split(tmp_path / "a", "train")
    val, info_val = read_split(tmp_path / "a", "val")
    train_docs, val_docs = documents_of(train), documents_of(val)
    assert not set(train_docs) & set(val_docs)
    assert len(train_docs) + len(val_docs) == len(texts)
    share = len(val_docs) / len(texts)
    assert 0.0075 < share < 0.0125  # 1% of 20,000 documents is 200 +- 14 (binomial sd)
    assert info_val["documents"] == len(val_docs) and info_train["documents"] == len(train_docs)
    np.testing.assert_array_equal(val, ref["val"][0])
    # the same input gives the same shards, whatever the threads and job size
    again = prepare([path], tmp_path / "b", *counts, "--num-proc", 1, "--documents-per-job", 7)
    assert again["splits"] == manifest["splits"]


def test_skip_gives_the_slice_of_the_unskipped_stream(corpus, tmp_path):
    train_ref, train_docs = corpus["ref"]["train"]
    skip, n = 10_001, 20_000
    manifest = prepare(corpus["paths"], tmp_path / "skip", "--val-fraction", 0.1, "--train-tokens", n,
                       "--val-tokens", 500, "--skip-train-tokens", skip, "--shard-tokens", 6_000)
    tokens, info = read_split(tmp_path / "skip", "train")
    np.testing.assert_array_equal(tokens, train_ref[skip:skip + n])
    ends = np.cumsum([len(d) for d in train_docs])
    assert info["skipped_documents"] == int(np.count_nonzero(ends <= skip))
    assert manifest["skip_train_tokens"] == skip
    val, _ = read_split(tmp_path / "skip", "val")
    np.testing.assert_array_equal(val, corpus["ref"]["val"][0][:500])


def test_failed_run_leaves_nothing_and_existing_dataset_is_kept(corpus, tmp_path):
    available = len(corpus["ref"]["train"][0])
    out = tmp_path / "ds"
    with pytest.raises(SystemExit, match=f"{available:,} train tokens"):
        prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", available + 1, "--val-tokens", 10,
                "--shard-tokens", 1_000)  # fails after writing many shards
    assert os.listdir(tmp_path) == []

    prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", 5_000, "--val-tokens", 10)
    before = {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))}
    with pytest.raises(SystemExit, match="--force"):
        prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", 6_000, "--val-tokens", 10)
    with pytest.raises(SystemExit, match="not enough text"):
        prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", available + 1, "--val-tokens", 10,
                "--force")
    assert {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before
    assert os.listdir(tmp_path) == ["ds"]

    prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", 6_000, "--val-tokens", 10, "--force")
    assert data.TokenStream(str(out), "train").num_tokens == 6_000
    assert os.listdir(tmp_path) == ["ds"]


def test_output_folder_holding_the_input_is_refused_even_with_force(corpus, tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    copy = folder / "part.parquet"
    copy.write_bytes(open(corpus["paths"][0], "rb").read())
    with pytest.raises(SystemExit, match="contains"):
        prepare([str(copy)], folder, "--train-tokens", 100, "--val-tokens", 10, "--force")
    assert os.listdir(folder) == ["part.parquet"] and os.listdir(tmp_path) == ["input"]


@pytest.mark.slow
def test_bad_input_gives_one_line_error(corpus, tmp_path):
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["some text"]}), no_text)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(open(corpus["paths"][0], "rb").read()[:20_000])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    good, out = corpus["paths"][0], tmp_path / "out"
    # started together: each pays Python's start-up, not one after another
    cases = [
        (run_script("prepare_datasets.py", "--input", str(tmp_path / "nothing-*.parquet"), "--output", out),
         ["no files match"]),
        (run_script("prepare_datasets.py", "--input", no_text, "--output", out), ["no 'text' column", "content"]),
        (run_script("prepare_datasets.py", "--input", truncated, "--output", out), ["truncated.parquet"]),
        (run_script("prepare_datasets.py", "--input", good, "--output", a_file), ["is a file"]),
    ]
    too_many = run_script("prepare_datasets.py", "--input", good, "--output", out, "--train-tokens", 10**9,
                          "--val-tokens", 10)
    for proc, phrases in cases:
        assert_one_line_error(proc, *phrases)
    _, err = too_many.communicate(timeout=120)
    assert too_many.returncode != 0 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: not enough text") and "1,000,000,000" in last
    assert not out.exists()


# ---------------------------------------------------------------- analysis

def test_analysis_matches_a_hand_computation(corpus, tmp_path, capsys):
    enc = get_tokenizer()
    lengths = np.array([len(enc.encode_ordinary(t)) for t in corpus["texts"] if t])
    png = tmp_path / "lengths.png"
    stats = prepare_datasets.main(["--analyze", "--input", *corpus["paths"], "--analyze-documents", "0",
                                   "--context-length", "64", "--histogram", str(png)])
    assert stats["documents"] == len(lengths)
    assert stats["total_tokens"] == lengths.sum()
    assert stats["share_documents_longer"] == pytest.approx(sum(n > 64 for n in lengths) / len(lengths))
    assert stats["share_tokens_cropped"] == pytest.approx(sum(n - 64 for n in lengths if n > 64) / lengths.sum())
    assert stats["median"] == np.median(lengths) and stats["mean"] == pytest.approx(lengths.mean())
    printed = capsys.readouterr().out
    assert f"{len(lengths):,}" in printed and f"{stats['share_tokens_cropped']:.2%}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    few = prepare_datasets.main(["--analyze", "--input", *corpus["paths"], "--analyze-documents", "100",
                                 "--histogram", str(png)])
    assert few["documents"] == 100 and few["total_tokens"] == lengths[:100].sum()


# ---------------------------------------------------------------- data.py

@pytest.fixture(scope="module")
def small_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "ds"
    n = len(corpus["ref"]["train"][0])
    prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", n, "--val-tokens", 100,
            "--shard-tokens", 1_000)
    return str(out), corpus["ref"]["train"][0]


def test_token_stream_batches_cross_shard_boundaries(small_shards):
    folder, ref = small_shards
    stream = data.TokenStream(folder, "train")
    assert len(stream.shard_sizes) > 10 and stream.num_tokens == len(ref)
    B, T = 3, 100
    assert stream.num_sequences(T) == (len(ref) - 1) // T
    for first in list(range(0, stream.num_sequences(T) - B + 1, 7)) + [stream.num_sequences(T) - B]:
        inputs, targets = stream.batch(first, B, T)
        window = ref[first * T:first * T + B * T + 1].astype(np.int64)
        assert inputs.dtype == torch.int64 and inputs.shape == (B, T)
        np.testing.assert_array_equal(inputs.numpy(), window[:-1].reshape(B, T))
        np.testing.assert_array_equal(targets.numpy(), window[1:].reshape(B, T))
    np.testing.assert_array_equal(stream.read(999, 2_002), ref[999:3_001])
    with pytest.raises(IndexError):
        stream.read(len(ref) - 5, 6)


def test_token_stream_refuses_shards_that_disagree_with_the_manifest(small_shards, tmp_path):
    folder, _ = small_shards
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][2]["num_tokens"] += 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(data.DatasetError, match="train-00002"):
        data.TokenStream(str(bad), "train")
    shutil.copy(os.path.join(folder, "manifest.json"), bad / "manifest.json")
    shard = bad / "train-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(data.DatasetError, match="train-00003"):
        data.TokenStream(str(bad), "train")


def test_tiny_dataset_fixture_is_readable(tiny_dataset):
    train, val = data.TokenStream(tiny_dataset, "train"), data.TokenStream(tiny_dataset, "val")
    assert train.num_tokens == 300_000 and val.num_tokens == 30_000 and len(train.shard_sizes) == 3
    text = get_tokenizer().decode(train.read(0, 2_000).tolist())
    assert "<|endoftext|>" in text and " the " in text


def flip_first_token(shard):
    """Flip a high bit of the shard's first token, as bit-rot would: in safetensors' layout (8-byte
    header length, JSON header, data) its 4 little-endian bytes start at the tensor's first offset."""
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    first = 8 + header_len + json.loads(raw[8:8 + header_len])["tokens"]["data_offsets"][0]
    raw[first + 3] ^= 0x40
    shard.write_bytes(bytes(raw))


def test_a_damaged_train_shard_is_named_before_any_of_its_tokens_reach_the_model(tiny_dataset, tmp_path):
    """The train split is hashed on a thread while training runs; its first batch must still wait for
    its shard's check (it used to reach the embedding first: IndexError at step 1)."""
    damaged = tmp_path / "tiny"
    shutil.copytree(tiny_dataset, damaged)
    shard = damaged / "train-00000.safetensors"
    flip_first_token(shard)
    assert load_file(str(shard))["tokens"][0] >= 2**30  # far outside the vocabulary

    stream = data.TokenStream(str(damaged), "train")
    stream.verify_in_background()
    with pytest.raises(data.DatasetError, match=f"^{shard} is damaged: .*re-run prepare_datasets.py"):
        stream.read(0, 10)  # whether or not the thread got there first
    np.testing.assert_array_equal(stream.read(100_000, 10), data.TokenStream(tiny_dataset, "train").read(100_000, 10))

    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(damaged), "--run-dir", str(tmp_path / "run"), "--model", "tiny",
                    "--context-length", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu",
                    "--max-steps", "4"])
    message = str(e.value.code)
    assert message.startswith(f"error: {shard} is damaged") and "\n" not in message, message


# ---------------------------------------------------------------- download_fineweb.py

@pytest.mark.slow
def test_download_without_network_fails_fast_with_one_line():
    offline = run_script("download_fineweb.py", "--max-files", 1, env={"HF_HUB_OFFLINE": "1"})
    refused = run_script("download_fineweb.py", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    for proc in (offline, refused):
        assert_one_line_error(proc, "unreachable", "prepare_datasets.py --input")


def test_download_check_reports_rows_and_catches_truncated_files(corpus, tmp_path, capsys):
    folder = tmp_path / "fineweb" / "sample" / "10BT"
    folder.mkdir(parents=True)
    good = folder / "000_00000.parquet"
    good.write_bytes(open(corpus["paths"][0], "rb").read())
    paths = download_fineweb.main(["--check-only", "--dest", str(tmp_path)])
    assert paths == [str(good)]
    rows = pq.ParquetFile(corpus["paths"][0]).metadata.num_rows
    assert f"{rows:,} rows" in capsys.readouterr().out
    (folder / "000_00001.parquet").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(SystemExit, match="000_00001.parquet"):
        download_fineweb.main(["--check-only", "--dest", str(tmp_path)])


def test_what_a_killed_prepare_leaves_is_cleaned_up_by_the_next_run(corpus, tmp_path):
    """Injected as a SIGKILL leaves it: a working folder of a dead process, and (killed between the
    two renames of --force) the old dataset aside with --output missing."""
    out = tmp_path / "ds"
    prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", 5_000, "--val-tokens", 10)
    before = {os.path.basename(p): open(p, "rb").read() for p in glob.glob(str(out / "*"))}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ds.partial-{dead.stdout.strip()}-abc123"
    stale.mkdir()
    (stale / "train-00000.safetensors").write_bytes(b"half a shard")
    os.rename(out, tmp_path / ".ds.old-1234abcd")  # the kill came after the first rename
    with pytest.raises(SystemExit, match="already holds a prepared dataset"):
        prepare(corpus["paths"], out, "--val-fraction", 0.1, "--train-tokens", 6_000, "--val-tokens", 10)
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # the old dataset is back, the stale folder gone
    assert {os.path.basename(p): open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before


@pytest.mark.slow
def test_sigterm_stops_prepare_cleanly_with_no_workers_left(tmp_path, sample_parquet):
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "prepare_datasets.py", "--input", sample_parquet, "--output", str(out),
                             "--train-tokens", "400000", "--val-tokens", "30000", "--val-fraction", "0.1",
                             "--num-proc", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / ".ds.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == \
        "SIGTERM: nothing was written; run the same command again", err  # 128 + SIGTERM, as a shell reports it
    assert os.listdir(tmp_path) == []
    time.sleep(0.5)
    lingering = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in lingering  # no tokenizer worker outlived it
    # killed outright, its workers die with it (PR_SET_PDEATHSIG) rather than tokenizing on for minutes
    proc = subprocess.Popen([sys.executable, "prepare_datasets.py", "--input", sample_parquet, "--output", str(out),
                             "--train-tokens", "400000", "--val-tokens", "30000", "--val-fraction", "0.1",
                             "--num-proc", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / ".ds.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are up and tokenizing
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    assert str(out) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


# ---------------------------------------------------------------- --from-tokens (llm.c and gpjt files)

def write_llmc(path, tokens, magic=20240520, version=1, count=None):
    """llm.c's token file, written here from its description: 256 int32 (magic, version, count), uint16s."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, len(tokens) if count is None else count]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def write_gpjt(path, tokens, dtype=np.uint16):
    from safetensors.numpy import save_file
    save_file({"tokens": np.asarray(tokens, dtype=dtype)}, str(path))


def streams(rng):
    return {"train": rng.integers(0, 50257, 70_000), "val": rng.integers(0, 50257, 9_000)}


@pytest.mark.parametrize("kind", ["llmc", "gpjt"])
def test_from_tokens_keeps_the_sources_streams_and_split(kind, tmp_path):
    rng = np.random.default_rng(0)
    ref = streams(rng)
    src = tmp_path / "src"
    src.mkdir()
    if kind == "llmc":  # the train stream over two files, as llm.c shards it
        write_llmc(src / "fineweb_val_000000.bin", ref["val"])
        write_llmc(src / "fineweb_train_000001.bin", ref["train"][:40_000])
        write_llmc(src / "fineweb_train_000002.bin", ref["train"][40_000:])
    else:
        write_gpjt(src / "train.safetensors", ref["train"])
        write_gpjt(src / "validation.safetensors", ref["val"])
    out = tmp_path / "ds"
    manifest = prepare_datasets.main(["--from-tokens", str(src / "*"), "--output", str(out), "--shard-tokens", "30000"])
    for split in ("train", "val"):
        stream = data.TokenStream(str(out), split)
        assert np.array_equal(stream.read(0, stream.num_tokens), ref[split]), split
    assert len(manifest["splits"]["train"]["shards"]) == 3  # 70,000 tokens in shards of 30,000
    files = manifest["input"]["token_files"]
    assert {f["format"] for f in files} == {kind}
    assert manifest["eval_sets"] == [{"llmc": "llmc-val", "gpjt": "gpjt-test"}[kind]]
    assert all(f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest() for f in files)
    # a slice: the first tokens of each split
    prepare_datasets.main(["--from-tokens", str(src / "*"), "--output", str(tmp_path / "slice"),
                           "--train-tokens", "1000", "--val-tokens", "500"])
    assert np.array_equal(data.TokenStream(str(tmp_path / "slice"), "train").read(0, 1000), ref["train"][:1000])


def test_bad_token_files_give_one_line_and_write_nothing(tmp_path, capsys):
    """In this process: main() ends every error in one SystemExit line (test_bad_input_gives_one_line_error
    runs the script and reads its stderr)."""
    rng = np.random.default_rng(1)
    ref = streams(rng)
    cases = {
        "bad magic": lambda d: write_llmc(d / "fineweb_train_000001.bin", ref["train"], magic=1234),
        "format version 7": lambda d: write_llmc(d / "fineweb_train_000001.bin", ref["train"], version=7),
        "truncated or damaged": lambda d: write_llmc(d / "fineweb_train_000001.bin", ref["train"], count=80_000),
        "expected a 1-D uint16": lambda d: write_gpjt(d / "train.safetensors", ref["train"], dtype=np.int32),
        "has no train": lambda d: None,
    }
    for message, make in cases.items():
        src = tmp_path / message.replace(" ", "-")
        src.mkdir()
        write_llmc(src / "fineweb_val_000000.bin", ref["val"])
        make(src)
        out = tmp_path / f"out-{src.name}"
        with pytest.raises(SystemExit) as e:
            prepare_datasets.main(["--from-tokens", str(src / "*"), "--output", str(out)])
        error = str(e.value.code)
        assert error.startswith("error: ") and "\n" not in error and capsys.readouterr().err == "", error
        assert {"bad magic": "no magic 20240520"}.get(message, message) in error
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out-")]


@pytest.mark.slow
def test_downloading_a_token_set_offline_fails_in_one_line_before_anything_else(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    start = time.time()
    proc = run_script("download_fineweb.py", "--tokens", "llmc", "--dest", str(tmp_path / "d"), env=env)
    assert_one_line_error(proc, "127.0.0.1:9 is unreachable")
    assert time.time() - start < 30 and not (tmp_path / "d").exists()


def test_an_evaluation_only_dataset_from_the_validation_file_alone(tmp_path):
    """Scoring gpjt-test needs only gpjt's validation file, not its 20 GB train file."""
    rng = np.random.default_rng(2)
    val = rng.integers(0, 50257, 5_000)
    write_gpjt(tmp_path / "validation.safetensors", val)
    prepare_datasets.main(["--from-tokens", str(tmp_path / "validation.safetensors"), "--output", str(tmp_path / "ds"),
                           "--train-tokens", "0"])
    assert np.array_equal(data.TokenStream(str(tmp_path / "ds"), "val").read(0, 5_000), val)
    assert data.TokenStream(str(tmp_path / "ds"), "train").num_tokens == 0
