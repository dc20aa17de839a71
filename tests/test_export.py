"""huggingface.py to-hf: the export is a complete transformers GPT-2 folder, opened offline.

Checked against this repo's own references: tiktoken's GPT-2 encoding over OpenAI's files
(gpt.get_tokenizer) for transformers' tokenizer, our GPTModel for the logits, `evaluate.py generate`
for the pipeline's greedy text, and our model's log-probabilities for lm-evaluation-harness's scores.
The models are small random GPT-2s with every weight perturbed, so a wrong mapping shows.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import checkpointing
import data
import gpt
import huggingface
import sample_text

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")  # comes with transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Text a tokenizer can get wrong: contractions, runs of spaces and newlines, digits, accents, emoji, CJK,
# and GPT-2's one special token written out.
TRICKY_TEXT = ("Hello world!  It's 2024 -- naïve café, 'S and 's.\n\n\n   x  \t tab 日本語 🙂 "
               "<|endoftext|>after the end <|endoftext|> ")


def perturbed_model(seed, **overrides):
    """One of our tiny GPT-2s (50,257 tokens, 128 positions) with every parameter randomised."""
    torch.manual_seed(seed)
    model = gpt.GPTModel(gpt.model_config("tiny", init="gpt2", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def error_of(argv):
    """The message of the SystemExit `huggingface.py ARGV` ends with; it must be one line."""
    with pytest.raises(SystemExit) as e:
        huggingface.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(checkpoint folder, export folder, our model) for one tiny model."""
    folder = tmp_path_factory.mktemp("export")
    model = perturbed_model(seed=5)
    checkpointing.save_model(model, str(folder / "ck"))
    huggingface.main(["to-hf", str(folder / "ck"), str(folder / "hf")])
    return str(folder / "ck"), str(folder / "hf"), model


def assert_tokenizes_as_tiktoken(folder):
    """transformers' AutoTokenizer for the folder, after checking that it, and tokenizer.json on its own
    (which other tools read without transformers), give tiktoken's ids and text."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    fast_file = os.path.join(folder, "tokenizer.json")
    alone = tokenizers.Tokenizer.from_file(fast_file) if os.path.exists(fast_file) else None
    tiktoken = gpt.get_tokenizer()
    texts = [TRICKY_TEXT] + [d["text"] for d in sample_text.iter_documents(max_chars=100_000)]
    for text in texts:
        ids = tiktoken.encode(text, allowed_special={"<|endoftext|>"})
        assert tokenizer.encode(text) == ids, text[:200]
        assert tokenizer.decode(ids) == tiktoken.decode(ids)
        if alone:
            assert alone.encode(text).ids == ids, text[:200]
            assert alone.decode(ids, skip_special_tokens=False) == tiktoken.decode(ids)
    return tokenizer


# --- what transformers sees ---------------------------------------------------------------------

def test_export_holds_the_files_transformers_writes_for_gpt2(export):
    _, folder, model = export
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "generation_config.json", "merges.txt",
                                          "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                                          "tokenizer_config.json", "vocab.json"]
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):  # OpenAI's, byte for byte
        with open(os.path.join(gpt.TOKENIZER_DIR, ours), "rb") as a, open(os.path.join(folder, theirs), "rb") as b:
            assert a.read() == b.read()
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 50256, "eos_token_id": 50256}

    tokenizer = assert_tokenizes_as_tiktoken(folder)
    assert tokenizer.is_fast and tokenizer.model_max_length == model.cfg["context_length"] == 128
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|endoftext|>",) * 3
    assert tokenizer.eos_token_id == 50256 and tokenizer.encode("Hello") != tokenizer.encode(" Hello")
    slow = transformers.GPT2Tokenizer.from_pretrained(folder, local_files_only=True)
    assert slow.encode(TRICKY_TEXT) == tokenizer.encode(TRICKY_TEXT)


def test_without_the_tokenizers_library_the_export_skips_tokenizer_json_only(tmp_path, monkeypatch, capsys):
    checkpointing.save_model(perturbed_model(seed=6), str(tmp_path / "ck"))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails, as where it is not installed
        huggingface.main(["to-hf", str(tmp_path / "ck"), str(tmp_path / "hf")])
    assert "no tokenizer.json" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "vocab.json").exists()
    assert_tokenizes_as_tiktoken(str(tmp_path / "hf"))  # transformers builds it from vocab.json + merges.txt


@pytest.mark.parametrize("tie,qkv_bias", [(False, False), (True, True)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tie, qkv_bias):
    ours = perturbed_model(seed=3, tie_weights=tie, qkv_bias=qkv_bias)
    checkpointing.save_model(ours, str(tmp_path / "ours"))
    huggingface.main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")])

    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is tie
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True, local_files_only=True)
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, 50257, (2, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(idx)
        torch.testing.assert_close(hf_model.eval()(idx).logits, expected, atol=1e-4, rtol=1e-4)

        # ...and back: the export is a Hub-layout folder that from-hf reads.
        huggingface.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
        back, meta = checkpointing.load_model(str(tmp_path / "back"))
        assert meta["model_config"]["tie_weights"] is tie
        torch.testing.assert_close(back(idx), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_pipeline_greedy_text_equals_evaluate_py_generate(export):
    checkpoint, folder, _ = export
    prompt, n = "The café on the corner opened at 7:30, and", 30
    ours = subprocess.run([sys.executable, "evaluate.py", "generate", "--checkpoint", checkpoint, "--prompt", prompt,
                           "--max-new-tokens", str(n), "--temperature", "0", "--device", "cpu"],
                          cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    generate = transformers.pipeline("text-generation", model=folder, device="cpu")
    theirs = generate(prompt, do_sample=False, max_new_tokens=n)[0]["generated_text"]
    assert ours.stdout.removesuffix("\n") == theirs  # print() added the newline


# --- the model card -----------------------------------------------------------------------------

def front_matter(folder):
    """(the card's YAML metadata, its text after it)"""
    with open(os.path.join(folder, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1]), card.split("---\n", 2)[2]


def test_model_card_says_license_language_and_the_run_s_dataset(tmp_path):
    model = perturbed_model(seed=0)
    run, dataset = tmp_path / "run", tmp_path / "datasets" / "mine"
    step = run / "checkpoints" / "step-00000007"
    checkpointing.save_checkpoint(str(step), model, {"step": 7, "tokens_seen": 7168, "val_loss": 6.5,
                                                     "training": {"recipe": "modern", "optimizer": "muon"}})
    dataset.mkdir(parents=True)  # the data's folder has no telling name: its manifest's input files do
    (dataset / "manifest.json").write_text(json.dumps({"input": {"patterns": ["fineweb-edu/sample/10BT/*.parquet"]}}))
    (run / "config.json").write_text(json.dumps({"dataset": {"path": str(dataset),
                                                             "manifest_sha256": data.manifest_digest(str(dataset))}}))
    results = tmp_path / "results.json"  # what evaluate.py compare --json prints, for this model
    results.write_text(json.dumps([{"model": "ck", "loss": 3.6123, "tokens": 19_660_800, "eval_set": "gpjt-test",
                                    "hellaswag": {"acc": 0.29, "acc_norm": 0.3012, "n": 10042}}]))
    huggingface.main(["to-hf", str(step), str(tmp_path / "hf"), "--results", str(results), "--license", "apache-2.0"])
    meta, body = front_matter(str(tmp_path / "hf"))
    assert meta == {"license": "apache-2.0", "language": ["en"], "library_name": "transformers",
                    "pipeline_tag": "text-generation", "datasets": ["HuggingFaceFW/fineweb-edu"],
                    "tags": ["gpt2", "text-generation"]}
    for row in (f"| parameters | {sum(p.numel() for p in model.parameters()):,} |", "| tokens trained | 7,168 |",
                "| optimizer steps | 7 |", "| recipe | modern |", "| optimizer | muon |",
                "| validation loss (its own val split) | 6.5000 |",
                "| loss on gpjt-test | 3.6123 (19,660,800 tokens) |", "| HellaSwag acc_norm | 30.12% (10,042 items) |"):
        assert row in body, row
    assert "lm_eval --model hf --model_args pretrained=FOLDER" in body

    # The data changed since the run (another manifest): only the folder's name is left to go on.
    (dataset / "manifest.json").write_text("{}")
    assert huggingface.trained_on({"path": str(step)}) == []
    (run / "config.json").write_text(json.dumps({"dataset": {"path": "datasets/fineweb-10BT"}}))
    assert huggingface.trained_on({"path": str(step)}) == ["HuggingFaceFW/fineweb"]


@pytest.mark.slow
def test_a_lone_checkpoint_s_card_names_no_dataset_and_push_fails_fast_offline(export, tmp_path):
    checkpoint, folder, _ = export
    meta, _ = front_matter(folder)
    assert meta["license"] == "mit" and "datasets" not in meta
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "huggingface.py", "to-hf", checkpoint, str(tmp_path / "hf2"),
                          "--push", "someone/model"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "unreachable" in out.stderr
    assert not (tmp_path / "hf2").exists()  # failed before doing anything else


# --- errors -------------------------------------------------------------------------------------

def test_errors_are_one_line_and_leave_no_folder(tmp_path, monkeypatch):
    small = gpt.GPTModel(gpt.model_config("tiny", vocab_size=1000))
    checkpointing.save_model(small, str(tmp_path / "small"))
    assert "vocabulary of 1,000 tokens" in error_of(["to-hf", str(tmp_path / "small"), str(tmp_path / "hf")])

    checkpointing.save_model(perturbed_model(seed=7), str(tmp_path / "ck"))
    bad = tmp_path / "tokenizer"  # a damaged copy of OpenAI's files: found half way through the writing
    bad.mkdir()
    (bad / "encoder.json").write_text("{}")
    os.symlink(os.path.join(gpt.TOKENIZER_DIR, "vocab.bpe"), bad / "vocab.bpe")
    monkeypatch.setattr(huggingface, "TOKENIZER_DIR", str(bad))
    assert "not OpenAI's GPT-2 BPE file" in error_of(["to-hf", str(tmp_path / "ck"), str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["ck", "small", "tokenizer"]  # no export, no temporary folder


def test_a_wrong_typed_checkpoint_json_is_refused_in_one_line(export, tmp_path):
    """to-hf reads the checkpoint through checkpointing's one check of checkpoint.json."""
    checkpoint = tmp_path / "ck"
    checkpointing.save_model(perturbed_model(seed=7), str(checkpoint), {"step": 40})
    doc = json.loads((checkpoint / checkpointing.META_FILE).read_text())
    (checkpoint / checkpointing.META_FILE).write_text(json.dumps({**doc, "step": "forty"}))
    assert "step is 'forty', not int" in error_of(["to-hf", str(checkpoint), str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_an_export_removes_what_a_killed_export_left_but_not_a_live_one_s(export, tmp_path):
    """A kill -9 mid-export leaves its hidden .tmp-NAME-PID folder (GBs for a real model): the next
    export beside it removes it, once that pid is gone; a running export's folder stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = tmp_path / f".tmp-hfk-{dead}"
    stale.mkdir()
    (stale / huggingface.HF_WEIGHTS_FILE).write_bytes(b"the first bytes of the weights")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        busy = tmp_path / f".tmp-other-{live.pid}"
        busy.mkdir()
        huggingface.main(["to-hf", export[0], str(tmp_path / "hfk")])
        assert sorted(os.listdir(tmp_path)) == sorted([busy.name, "hfk"])
    finally:
        live.kill()
        live.wait()


# --- lm-evaluation-harness ----------------------------------------------------------------------

MC_ITEMS = [
    {"ctx": "A man is standing on a ladder next to a house. He",
     "endings": ["climbs to the roof and cleans the gutter.", "swims across the ocean."], "label": 0},
    {"ctx": "The café opened at 7:30, and the first customer",
     "endings": ["ordered a naïve croissant.", "was 42 years old!", "paid 3.50 for tea"], "label": 1},
    {"ctx": "Fill a small pot with water and place it on the stove. Then",
     "endings": ["bring the water to a boil.", "paint the pot blue."], "label": 0},
]


def our_loglikelihood(model, context, continuation):
    """Sum of log p(continuation token | everything before it), tokenized by tiktoken, in fp32."""
    tokenizer = gpt.get_tokenizer()
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont]))[0].float()
    logprobs = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(cont)[:, None]).sum().item()


# lm_eval's own Python API, in a process of its own (offline): its `lm_eval run` command would index the
# thousands of tasks it ships (12 s on 2 cores) before reading the one task written here.
LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks, out = sys.argv[1:]
results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["export_mc"],
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False),
                                  device="cpu", batch_size=2, log_samples=True)
with open(out, "w") as f:
    json.dump(results["samples"]["export_mc"], f, default=str)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed")
def test_lm_evaluation_harness_scores_the_export_as_our_model_does(export, tmp_path):
    _, folder, model = export
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "export_mc.yaml").write_text(yaml.safe_dump({
        "task": "export_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(items)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{ctx}}",
        "doc_to_choice": "{{endings}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    samples = tmp_path / "samples.json"
    out = subprocess.run([sys.executable, "-c", LM_EVAL, folder, str(tasks), str(samples)],
                         cwd=tmp_path, env={**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home")},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    logged = sorted(json.loads(samples.read_text()), key=lambda s: s["doc_id"])
    assert [s["doc"] for s in logged] == MC_ITEMS
    for sample in logged:
        item = sample["doc"]
        theirs = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]
        ours = [our_loglikelihood(model, item["ctx"], " " + ending) for ending in item["endings"]]
        assert theirs == pytest.approx(ours, abs=1e-3), item["ctx"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_mid_export_leaves_nothing_and_says_so_in_one_line(tmp_path, monkeypatch, capsys, signum):
    checkpointing.save_model(perturbed_model(seed=7), str(tmp_path / "ck"))
    monkeypatch.setattr(huggingface, "write_tokenizer_json", lambda folder: os.kill(os.getpid(), signum))
    with pytest.raises(SystemExit) as stop:
        huggingface.main(["to-hf", str(tmp_path / "ck"), str(tmp_path / "hf")])
    assert stop.value.code == 128 + signum
    said = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert capsys.readouterr().err.splitlines() == [f"{said}: nothing was written to {tmp_path / 'hf'}, "
                                                    "and nothing half-written is left; run the command again"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]   # no export, no .tmp-hf-PID
