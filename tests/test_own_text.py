"""Training on your own text: prepare_datasets.py reading .txt, .jsonl, .json, parquet with another
column, a save_to_disk folder and a streamed `datasets` dataset, with --train-tokens all; then train.py on it.

References: tiktoken's GPT-2 encoding called directly on each document, an <|endoftext|> after each,
the split rule recomputed here with hashlib, and safetensors' own reader for the shards.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file, save

import data
import prepare_datasets
import sample_text
import train
from gpt import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
VAL_FRACTION = 0.2  # a fifth of 60 documents: validation gets some, deterministically (the hash decides)
EDGE_TEXTS = ["A line that quotes the marker <|endoftext|> as text.", "Naïve café, 日本語, emoji 🙂 and a\ttab."]


@pytest.fixture(scope="module")
def texts():
    """60 documents of real English (Python's docstrings, past the long help topics) and two edge cases."""
    documents = [d["text"] for d in sample_text.iter_documents(max_documents=98)][40:]
    return documents[:30] + EDGE_TEXTS + documents[30:]


def reference(texts, fraction):
    """{split: the token stream}: each non-empty document's GPT-2 tokens then EOT, split by hash, in order."""
    enc, threshold = get_tokenizer(), round(fraction * 2**64)
    streams = {"train": [], "val": []}
    for text in texts:
        if text:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
            streams["val" if int.from_bytes(digest, "big") < threshold else "train"] += enc.encode_ordinary(text) + [EOT]
    return {split: np.array(stream, dtype=np.int32) for split, stream in streams.items()}


def write_txt(folder, texts):
    """One document per file; file names sort in document order. An empty file and a file of
    another kind sit among them: the first is counted as empty, the second not read."""
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc-{i:03d}.txt").write_bytes(text.encode("utf-8"))
    (folder / "doc-999.txt").write_bytes(b"")
    (folder / "README.md").write_text("not a document")
    return ["--input", str(folder)]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, field: text}) + "\n")
            if i == 3:
                f.write(json.dumps({"id": -1, field: None}) + "\n\n")  # a null document and a blank line
    return path


def write_input(kind, tmp_path, texts):
    """The documents as `kind`, and prepare_datasets' arguments that read them."""
    if kind == "txt":
        return write_txt(tmp_path / "books", texts)
    if kind == "jsonl":
        return ["--input", str(write_jsonl(tmp_path / "articles.jsonl", texts, "body")), "--text-field", "body"]
    if kind == "json":
        path = tmp_path / "articles.json"
        path.write_text(json.dumps([{"title": str(i), "text": t} for i, t in enumerate(texts)], indent=1))
        return ["--input", str(path)]
    if kind == "parquet":
        path = tmp_path / "articles.parquet"
        pq.write_table(pa.table({"content": texts, "n": list(range(len(texts)))}), path, row_group_size=16)
        return ["--input", str(path), "--text-field", "content"]
    import datasets
    if kind == "saved":
        datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(tmp_path / "saved"))
        return ["--input", str(tmp_path / "saved")]
    if kind == "hub":  # the streaming path, with datasets' json builder over a local file standing in for the Hub
        return ["--hub-dataset", "json", "--hub-data-files", str(write_jsonl(tmp_path / "hub.jsonl", texts))]
    raise ValueError(kind)


def read_split(folder, info):
    arrays = [load_file(os.path.join(folder, s["file"]))["tokens"] for s in info["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "saved", "hub"])
def test_own_text_becomes_exactly_the_reference_streams(kind, texts, tmp_path):
    out = tmp_path / "ds"
    manifest = prepare_datasets.main([*write_input(kind, tmp_path, texts), "--output", str(out),
                                      "--train-tokens", "all", "--val-fraction", str(VAL_FRACTION),
                                      "--shard-tokens", "2000", "--num-proc", "2", "--documents-per-job", "7"])
    ref = reference(texts, VAL_FRACTION)
    assert len(ref["val"]) > 0 and len(ref["train"]) > 4 * 2000  # both splits, the train one over several shards
    for split, info in manifest["splits"].items():
        np.testing.assert_array_equal(read_split(out, info), ref[split])
        assert info["num_tokens"] == len(ref[split]) == data.TokenStream(str(out), split).num_tokens
        assert info["documents"] == np.count_nonzero(ref[split] == EOT)
        assert [s["num_tokens"] for s in info["shards"]] == [min(2000, len(ref[split]) - i)
                                                             for i in range(0, len(ref[split]), 2000)]
        for shard in info["shards"]:  # the last one, rewritten when the input ended, too
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    read = manifest["input"]
    assert read["documents"] == len(texts) and read["tokens"] == len(ref["train"]) + len(ref["val"])
    assert read["empty_rows_skipped"] == (0 if kind in ("json", "parquet", "saved") else 1)
    assert read["text_field"] == {"jsonl": "body", "parquet": "content"}.get(kind, "text")
    if kind == "hub":
        assert read["hub"]["name"] == "json" and read["hub"]["split"] == "train" and "files" not in read
    else:
        assert {f["kind"] for f in read["files"]} == {kind}
        assert len(read["files"]) == (len(texts) + 1 if kind == "txt" else 1)  # README.md is not read
    assert out.is_dir() and not [name for name in os.listdir(tmp_path) if name.startswith(".ds.")]  # no working folder left


def test_all_takes_the_train_documents_and_a_cut_val(texts, tmp_path):
    """--train-tokens all with --val-tokens N: validation cut at N, train every document it is given."""
    ref = reference(texts, VAL_FRACTION)
    args = write_input("jsonl", tmp_path, texts)
    manifest = prepare_datasets.main([*args, "--output", str(tmp_path / "ds"), "--train-tokens", "all",
                                      "--val-tokens", "100", "--val-fraction", str(VAL_FRACTION)])
    np.testing.assert_array_equal(read_split(tmp_path / "ds", manifest["splits"]["val"]), ref["val"][:100])
    np.testing.assert_array_equal(read_split(tmp_path / "ds", manifest["splits"]["train"]), ref["train"])
    with pytest.raises(SystemExit, match="no document went to validation.*--val-fraction"):
        prepare_datasets.main([*args, "--output", str(tmp_path / "none"), "--train-tokens", "all",
                               "--val-fraction", "0.000001"])
    assert not (tmp_path / "none").exists()


def test_prepare_ends_with_its_rate_and_the_peak_memory(texts, tmp_path, capsys):
    """The last line printed: tokens/s and the largest process's peak memory, checked against this process's
    own resident memory in /proc (prepare runs in it here; its workers, forked from it, are of its size)."""
    rss = lambda field: int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field)))
    before = rss("VmRSS:") / 1024
    prepare_datasets.main([*write_input("jsonl", tmp_path, texts), "--output", str(tmp_path / "ds"),
                           "--train-tokens", "all", "--val-fraction", str(VAL_FRACTION)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rate, mib = re.fullmatch(r"([\d,]+) tokens/s over [\d.,]+ s; the largest process's peak memory ([\d,]+) MiB",
                             last).groups()
    assert int(rate.replace(",", "")) > 0
    assert before - 1 <= int(mib.replace(",", "")) <= 2 * rss("VmHWM:") / 1024  # in MiB, not KiB or bytes


def as_downloaded(local_dir, files):
    """Write {path: bytes} into local_dir as download_fineweb.py leaves it: hf_hub_download(local_dir=...)
    puts each file at its path in the repo and keeps its own records in a hidden .cache/huggingface."""
    cache = local_dir / ".cache" / "huggingface"
    for path, content in files.items():
        (local_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (local_dir / path).write_bytes(content)
        (cache / "download" / f"{path}.metadata").parent.mkdir(parents=True, exist_ok=True)
        (cache / "download" / f"{path}.metadata").write_text(f"{'0' * 40}\n{'1' * 64}\n1712656091.123\n")
    (cache / ".gitignore").write_text("*\n")


def test_a_folder_means_the_files_in_it(texts, tmp_path):
    """`download_fineweb.py --tokens gpjt` writes gpjt/{validation,train}.safetensors, and a sample's
    parquet files go to fineweb/sample/10BT/: each folder, given where files are expected, makes the
    dataset that listing its files makes, and that dataset holds the reference streams."""
    rng = np.random.default_rng(0)
    tokens = {"train": rng.integers(0, 50257, 7_000, dtype=np.uint16),
              "validation": rng.integers(0, 50257, 3_000, dtype=np.uint16)}
    as_downloaded(tmp_path / "gpjt", {f"{split}.safetensors": save({"tokens": tokens[split]}) for split in tokens})
    parquet = {}
    for i, part in enumerate((texts[:30], texts[30:])):
        pq.write_table(pa.table({"text": part}), tmp_path / "part.parquet")
        parquet[f"sample/10BT/00{i}_00000.parquet"] = (tmp_path / "part.parquet").read_bytes()
    as_downloaded(tmp_path / "fineweb", parquet)

    listed = sorted(str(tmp_path / "gpjt" / name) for name in os.listdir(tmp_path / "gpjt") if name[0] != ".")
    folder = prepare_datasets.main(["--from-tokens", str(tmp_path / "gpjt"), "--output", str(tmp_path / "a")])
    files = prepare_datasets.main(["--from-tokens", *listed, "--output", str(tmp_path / "b")])
    assert folder["splits"] == files["splits"] and folder["input"]["token_files"] == files["input"]["token_files"]
    for split, name in (("train", "train"), ("val", "validation")):
        np.testing.assert_array_equal(read_split(tmp_path / "a", folder["splits"][split]), tokens[name])

    sample = tmp_path / "fineweb" / "sample" / "10BT"
    common = ["--train-tokens", "all", "--val-fraction", str(VAL_FRACTION)]
    folder = prepare_datasets.main(["--input", str(sample), *common, "--output", str(tmp_path / "c")])
    listed = sorted(map(str, sample.iterdir()))
    files = prepare_datasets.main(["--input", *listed, *common, "--output", str(tmp_path / "d")])
    assert folder["splits"] == files["splits"] and folder["input"]["files"] == files["input"]["files"]
    ref = reference(texts, VAL_FRACTION)
    for split in ref:
        np.testing.assert_array_equal(read_split(tmp_path / "c", folder["splits"][split]), ref[split])

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty holds none of the files --from-tokens reads"):
        prepare_datasets.main(["--from-tokens", str(tmp_path / "empty"), "--output", str(tmp_path / "e")])


@pytest.mark.slow
def test_fifty_documents_prepare_and_train(texts, tmp_path):
    out, run = tmp_path / "ds", tmp_path / "run"
    prepare_datasets.main([*write_txt(tmp_path / "books", texts[:50]), "--output", str(out),
                           "--train-tokens", "all", "--val-fraction", "0.1"])
    train.main(["--data", str(out), "--run-dir", str(run), "--model", "tiny", "--context-length", "32",
                "--batch-size", "2", "--device", "cpu", "--max-steps", "4", "--val-every", "2",
                "--val-batches", "1", "--log-every", "1"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and all(np.isfinite(r["val_loss"]) for r in rows)
    assert rows[-1]["tokens_seen"] == 4 * 2 * 32


def run_prepare(*args, env=None):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "prepare_datasets.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def one_line_error(proc):
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture
def bad_inputs(texts, tmp_path):
    """{case: (prepare_datasets arguments, phrases its one-line error must hold)}."""
    bad_line = write_jsonl(tmp_path / "bad_line.jsonl", texts[:6])
    lines = bad_line.read_text().splitlines(keepends=True)
    bad_line.write_text("".join(lines[:2]) + '{"text": "cut off\n' + "".join(lines[2:]))
    body = write_jsonl(tmp_path / "body.jsonl", texts[:6], "body")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    return {
        "bad line": ([bad_line], [str(bad_line), "line 3 is not JSON", "fix or delete that line"]),
        "no field": ([body], ["body.jsonl line 1 has no field 'text'", "(it has: id, body)", "--text-field"]),
        "empty": ([tmp_path / "empty.jsonl"], ["empty.jsonl holds no documents"]),
        "not utf-8": ([tmp_path / "latin1.txt"], ["latin1.txt is not UTF-8", "iconv"]),
        "nothing there": ([tmp_path / "nowhere"], ["no files match"]),
    }


def test_bad_own_text_is_refused_in_one_line_and_nothing_is_written(bad_inputs, tmp_path):
    out = tmp_path / "out"
    for name, (inputs, phrases) in bad_inputs.items():
        with pytest.raises(SystemExit) as stop:
            prepare_datasets.main(["--input", *map(str, inputs), "--output", str(out), "--train-tokens", "all"])
        message = str(stop.value.code)
        assert message.startswith("error:") and "\n" not in message, (name, message)
        assert all(phrase in message for phrase in phrases), (name, message)
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


@pytest.mark.slow
def test_bad_own_text_run_as_a_command_prints_one_line_and_no_traceback(bad_inputs, tmp_path):
    out = tmp_path / "out"
    procs = {name: run_prepare("--input", *inputs, "--output", out, "--train-tokens", "all")  # started together
             for name, (inputs, _) in bad_inputs.items() if name in ("bad line", "no field")}
    for name, proc in procs.items():
        line = one_line_error(proc)
        assert all(phrase in line for phrase in bad_inputs[name][1]), (name, line)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


@pytest.mark.slow
def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path):
    proc = run_prepare("--hub-dataset", "roneneldan/TinyStories", "--output", tmp_path / "ds", "--train-tokens", "all",
                       env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    line = one_line_error(proc)
    assert "127.0.0.1:9 is unreachable" in line and "save_to_disk" in line
    assert not (tmp_path / "ds").exists()


# --- Ctrl-C and SIGTERM: one line, the shell's status for the signal, nothing half-written --------------

@pytest.mark.slow
def test_ctrl_c_mid_prepare_ends_in_one_line_and_leaves_nothing(sample_parquet, tmp_path):
    table = pq.read_table(sample_parquet)
    pq.write_table(pa.concat_tables([table] * 8), tmp_path / "big.parquet")  # ~4M tokens: seconds of work
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "prepare_datasets.py", "--input", str(tmp_path / "big.parquet"),
                             "--output", str(tmp_path / "ds"), "--train-tokens", "all", "--val-fraction", "0.1",
                             "--num-proc", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    while "tokenizing" not in open(err.name).read() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the progress bar: the workers are up and tokenizing
    assert proc.poll() is None, open(err.name).read()[-2000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    text = open(err.name).read()
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "Ctrl-C: nothing was written; run the same command again", text
    assert sorted(os.listdir(tmp_path)) == ["big.parquet", "stderr"]  # no dataset, no working folder


@pytest.mark.slow
def test_sigterm_while_download_fineweb_reads_ends_in_one_line(texts, tmp_path):
    """--check-only stopped while it waits on a file still arriving (a named pipe: reading it blocks, as a
    slow disk or network would): SIGTERM ends it as Ctrl-C does, in one line saying how to go on."""
    sample = tmp_path / "fineweb" / "sample" / "10BT"
    sample.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:5]}), sample / "000_00000.parquet")
    arriving = sample / "001_00000.parquet"
    os.mkfifo(arriving)
    proc = subprocess.Popen([sys.executable, "-u", "download_fineweb.py", "--check-only", "--dest", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "000_00000.parquet" in proc.stdout.readline()  # the first file is checked; the second is being read
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None:  # then the pipe gets a writer, so the read returns and the signal is acted on
        try:
            os.close(os.open(arriving, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader yet (or any more)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["SIGTERM: the files downloaded so far are kept; run the same command "
                                        "again to resume"]
