"""finetune_instructions.py and evaluate.py instruct, against references written here: the book's
template and custom_collate_fn rebuilt by hand on tiktoken's token ids, a naive greedy decoder, and
an uninterrupted run for every interrupted one. Models are the `tiny` preset; data is written here."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpointing as ckpt
import evaluate
import finetune_instructions
import gpt
import instructions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOK_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.")
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window", "candle", "rocket"]


def examples(n, seed=0):
    """Three kinds of instruction, with and without input, as the book's file mixes them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = rng.choice(WORDS)
        out.append([{"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()},
                    {"instruction": "Repeat the word twice.", "input": word, "output": f"{word} {word}"},
                    {"instruction": "Name a fruit.", "input": "", "output": rng.choice(["apple", "pear", "plum"])}][i % 3])
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny GPTModel saved as a checkpoint: the base model to fine-tune."""
    torch.manual_seed(0)
    return ckpt.save_model(gpt.GPTModel(gpt.model_config("tiny")), str(tmp_path_factory.mktemp("base") / "base"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "instructions.json"
    path.write_text(json.dumps(examples(40)))  # 34 train, 4 test, 2 val: 8 steps of 4 an epoch
    return str(path)


def finetune_args(base, data, run, *extra):
    return ["--checkpoint", base, "--data", data, "--run-dir", str(run), "--device", "cpu", "--batch-size", "4",
            "--lr", "3e-3", *extra]


def weights(run, which="latest"):
    return load_file(os.path.join(ckpt.resolve_checkpoint(str(run), which), ckpt.MODEL_FILE))


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


# --- the book's format ----------------------------------------------------------------------------

def book_collate(token_lists, pad=50256, ignore=-100):
    """The book's custom_collate_fn, written out plainly: + one pad, pad to the longest + 1, shift by
    one, and every pad target after the first becomes the ignore index."""
    width = max(len(t) + 1 for t in token_lists)
    inputs, targets = [], []
    for tokens in token_lists:
        padded = tokens + [pad] * (width - len(tokens))
        x, y = padded[:-1], padded[1:]
        pads = [i for i, t in enumerate(y) if t == pad]
        for i in pads[1:]:
            y[i] = ignore
        inputs.append(x)
        targets.append(y)
    return torch.tensor(inputs), torch.tensor(targets)


def test_template_padding_and_masking_equal_the_book_token_by_token():
    entries = [{"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
                "output": "The car is as fast as lightning."},
               {"instruction": "Name the author of 'Pride and Prejudice'.", "input": "", "output": "Jane Austen."}]
    texts = [f"{BOOK_PREAMBLE}\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
             "The car is very fast.\n\n### Response:\nThe car is as fast as lightning.",
             f"{BOOK_PREAMBLE}\n\n### Instruction:\nName the author of 'Pride and Prejudice'.\n\n### Response:\n"
             "Jane Austen."]
    tokenizer = gpt.get_tokenizer()
    book_ids = [tokenizer.encode(t) for t in texts]   # the book encodes the whole text at once
    encoded = [instructions.encode_example(e, tokenizer) for e in entries]
    assert [tokens for tokens, _ in encoded] == book_ids

    want_x, want_y = book_collate(book_ids)
    x, y = instructions.collate(encoded)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert (y == -100).sum() == len(book_ids[0]) - len(book_ids[1])  # the shorter row: its padding after one EOT

    # Masking: every target that is a token of the prompt (up to "### Response:\n") is ignored.
    prompts = [t[:t.index("### Response:\n") + len("### Response:\n")] for t in texts]
    _, masked = instructions.collate(encoded, mask_prompt=True)
    for row, prompt in enumerate(prompts):
        n = len(tokenizer.encode(prompt))
        assert (masked[row, :n - 1] == -100).all()
        assert torch.equal(masked[row, n - 1:], want_y[row, n - 1:])
        assert masked[row, n - 1] == book_ids[row][n]  # the first response token is learned

    x, y = instructions.collate(encoded, max_length=20)
    assert torch.equal(x, want_x[:, :20]) and torch.equal(y, want_y[:, :20])


def test_the_split_is_the_books_85_10_5_in_file_order():
    data = [{"instruction": str(i), "input": "", "output": ""} for i in range(1100)]
    splits = instructions.split_examples(data)
    assert [len(splits[k]) for k in ("train", "test", "val")] == [935, 110, 55]
    assert splits["train"] == data[:935] and splits["test"] == data[935:1045] and splits["val"] == data[1045:]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"instruction": "x"}', "not a list"),
    ('[{"instruction": "x", "output": "y"}]', "item 0 is not an object with the text fields"),
    ('[{"instruction": "x", "input": "", "output": "y"}]', "needs at least 10"),
])
def test_data_not_in_the_books_format_ends_in_one_line_and_writes_nothing(base, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        finetune_instructions.main(finetune_args(base, str(bad), tmp_path / "run"))
    assert e.value.code.startswith("error: ") and message in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["instruct", "--checkpoint", base, "--data", str(bad), "--out", str(tmp_path / "a.jsonl")])
    assert message in e.value.code and not [n for n in os.listdir(tmp_path) if n.startswith("a.jsonl")]


# --- fine-tuning ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(base, data_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    finetune_instructions.main(finetune_args(base, data_file, run, "--epochs", "2"))
    return run


def test_fine_tuning_lowers_validation_loss_and_keeps_the_best_epoch(uninterrupted, data_file):
    rows = metrics(uninterrupted)
    val = [r for r in rows if r["val_loss"] is not None]
    assert [r["epoch"] for r in val] == [0, 1, 2]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    # the best checkpoint is the best epoch's, and its weights give the val loss recorded for it
    best = min(val[1:], key=lambda r: r["val_loss"])
    folder = ckpt.resolve_checkpoint(str(uninterrupted), "best")
    assert ckpt.read_meta(folder)["step"] == best["step"]
    model, _ = ckpt.load_model(str(uninterrupted))
    splits = instructions.split_examples(json.load(open(data_file)))
    encoded = [instructions.encode_example(e, gpt.get_tokenizer()) for e in splits["val"]]
    assert instructions.examples_loss(model, encoded, 4, False, 128, "cpu") == pytest.approx(best["val_loss"], abs=1e-5)
    files = {f for _, d in ckpt.list_checkpoints(str(uninterrupted)) for f in os.listdir(d)}
    assert files <= {ckpt.MODEL_FILE, ckpt.META_FILE, ckpt.TRAIN_STATE_FILE}
    assert os.path.getsize(os.path.join(uninterrupted, "loss.png")) > 10_000


@pytest.mark.slow
def test_early_stopping_stops_patience_epochs_after_the_best_and_keeps_it(base, tmp_path):
    """Train says the sky is red, validation says blue: validation loss falls while the template is
    learned, then rises as "red" wins."""
    data = tmp_path / "contra.json"
    sky = lambda colour: {"instruction": "Name the color of the sky.", "input": "", "output": colour}
    data.write_text(json.dumps([sky("red")] * 17 + [sky("green")] * 2 + [sky("blue")]))  # train, test, val
    run = tmp_path / "run"
    finetune_instructions.main(finetune_args(base, str(data), run, "--epochs", "12", "--patience", "2", "--lr", "1e-2"))
    val = [r for r in metrics(run) if r["val_loss"] is not None][1:]  # the epochs' ends
    best = min(val, key=lambda r: r["val_loss"])
    assert 1 < best["epoch"] < val[-1]["epoch"] < 12, [r["val_loss"] for r in val]
    assert val[-1]["epoch"] == best["epoch"] + 2
    assert ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "best"))["step"] == best["step"]
    # resuming a finished run does nothing
    finetune_instructions.main(finetune_args(base, str(data), run, "--epochs", "12", "--patience", "2", "--lr", "1e-2",
                                             "--resume", "latest"))
    assert len([r for r in metrics(run) if r["val_loss"] is not None][1:]) == len(val)


@pytest.mark.slow
def test_a_stopped_fine_tune_resumes_bit_identically(base, data_file, uninterrupted, tmp_path):
    run = tmp_path / "run"
    finetune_instructions.main(finetune_args(base, data_file, run, "--epochs", "2", "--max-steps", "11"))  # mid-epoch 2
    assert ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))["step"] == 11
    # the run's own settings from its config.json; only the stop is moved (a bookkeeping change)
    finetune_instructions.main(["--run-dir", str(run), "--resume", "latest", "--max-steps", "1000"])
    a, b = weights(run), weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip(metrics(run)) == strip(metrics(uninterrupted))


def test_a_new_fine_tune_will_not_overwrite_a_run_and_resume_checks_the_settings(base, data_file, uninterrupted, tmp_path):
    with pytest.raises(SystemExit, match="already has checkpoints"):
        finetune_instructions.main(finetune_args(base, data_file, uninterrupted, "--epochs", "2"))
    with pytest.raises(SystemExit, match=r"--batch-size 2 \(the run has 4\)"):
        finetune_instructions.main(finetune_args(base, data_file, uninterrupted, "--batch-size", "2", "--resume", "latest"))


@pytest.mark.slow
def test_kill_9_then_resume_latest_reaches_the_uninterrupted_run(base, data_file, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "finetune_instructions.py", *finetune_args(base, data_file, run, "--epochs", "2")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.lexists(run / "checkpoints" / "latest") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the fine-tune finished before it could be killed"
    # the run's own settings from its config.json; only the stop is moved (a bookkeeping change)
    finetune_instructions.main(["--run-dir", str(run), "--resume", "latest", "--max-steps", "1000"])
    a, b = weights(run), weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_the_step_under_way_and_exits_0_as_ctrl_c_does(base, data_file, tmp_path):
    run, err = tmp_path / "run", open(tmp_path / "stderr", "w+")
    argv = finetune_args(base, data_file, run, "--epochs", "50")
    proc = subprocess.Popen([sys.executable, "finetune_instructions.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    deadline = time.time() + 120
    while "fine-tune:" not in open(err.name).read() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the progress bar: the base model is scored and the first steps are under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, open(err.name).read()[-3000:]
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))
    said = out.strip().splitlines()[-1]
    if meta["step"] % 8:  # mid-epoch (8 steps an epoch)
        assert said.startswith(f"SIGTERM: saved step {meta['step']} (epoch {meta['epoch'] + 1}, batch "), said
    else:  # at an epoch's end
        assert said.startswith(f"SIGTERM: saved epoch {meta['epoch']};"), said
    assert said.endswith("continue with --resume latest") and meta["step"] < 50 * 8  # stopped, not finished


# --- answers --------------------------------------------------------------------------------------

def naive_greedy_answer(model, entry, max_new_tokens):
    """Greedy decoding by hand: the whole sequence through the model for every token, no cache."""
    tokenizer = gpt.get_tokenizer()
    ids = tokenizer.encode(f"{BOOK_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
                           + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""))
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(torch.tensor([(ids + new)[-model.cfg["context_length"]:]]))[0, -1].argmax())
            if next_id == 50256:
                break
            new.append(next_id)
    return tokenizer.decode(new).replace("### Response:", "").strip()


def test_answers_are_the_greedy_continuation_with_the_reference_loss_and_resume(base, data_file, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    args = ["instruct", "--checkpoint", base, "--data", data_file, "--out", str(out), "--max-new-tokens", "12",
            "--device", "cpu", "--name", "tiny"]
    evaluate.main(args)
    records = [json.loads(line) for line in open(out)]
    test = instructions.split_examples(json.load(open(data_file)))["test"]
    assert [r["item"] for r in records] == list(range(len(test))) == list(range(4))
    model, _ = ckpt.load_model(base)
    tokenizer = gpt.get_tokenizer()
    for record, entry in zip(records, test):
        assert {k: record[k] for k in ("instruction", "input", "output")} == entry and record["model"] == "tiny"
        assert record["model_answer"] == naive_greedy_answer(model, entry, 12)
        prompt = tokenizer.encode(f"{BOOK_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
                                  + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "") + "\n\n### Response:\n")
        answer = tokenizer.encode(entry["output"]) + [50256]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer[:-1]]))[0, len(prompt) - 1:]
        assert record["reference_loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(answer)).item(), abs=1e-5)
    assert "wrote 4 answers" in capsys.readouterr().out

    # Interrupted after two answers and half a line: the rerun keeps those two and writes the rest.
    lines = open(out).read().splitlines(keepends=True)
    kept = [json.dumps({**json.loads(line), "model_answer": f"kept {i}"}) + "\n" for i, line in enumerate(lines[:2])]
    os.remove(out)
    with open(f"{out}.partial", "w") as f:
        f.write("".join(kept) + lines[2][:25])
    evaluate.main(args)
    again = [json.loads(line) for line in open(out)]
    assert [r["model_answer"] for r in again[:2]] == ["kept 0", "kept 1"]
    assert again[2:] == records[2:] and not os.path.exists(f"{out}.partial")
    assert "resuming: 2 of 4" in capsys.readouterr().out

    evaluate.main(args)  # finished: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already exists with other answers"):
        evaluate.main(args[:-1] + ["other"])


@pytest.mark.slow
def test_drop_rate_0_turns_off_every_dropout_and_a_resume_stays_on_the_uninterrupted_run(base, data_file, tmp_path):
    """The base model drops at 0.1, in its layers and in attention. --drop-rate 0 must turn off both: a
    model in training mode then gives the same output twice, and a fine-tune stopped mid-epoch and
    resumed (rebuilt from its saved config) ends where the uninterrupted one does."""
    model, _ = ckpt.load_model(base)
    model.set_dropout(0.0).train()
    tokens = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))
    uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    finetune_instructions.main(finetune_args(base, data_file, uninterrupted, "--epochs", "1", "--drop-rate", "0"))
    finetune_instructions.main(finetune_args(base, data_file, stopped, "--epochs", "1", "--drop-rate", "0",
                                             "--max-steps", "3"))
    finetune_instructions.main(["--run-dir", str(stopped), "--resume", "latest", "--max-steps", "1000"])
    a, b = weights(stopped), weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
