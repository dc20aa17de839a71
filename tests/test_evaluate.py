"""evaluate.py and huggingface.py's from-hf, checked against Hugging Face transformers' GPT-2 (to-hf:
test_export.py).

The OpenAI-style models here are randomly initialised `transformers.GPT2LMHeadModel`s (every weight,
bias and norm perturbed, so a wrong mapping shows), saved in the Hub's layouts: no download. The
references (loss over the same windows, HellaSwag scores) are computed in this file with
transformers directly, one unpadded row at a time.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import checkpointing
import evaluate
import gpt
import huggingface
import stopping

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_POSITIONS = 128

# A few HellaSwag-style items (context, four endings, the right one), written for this test. The last
# context is longer than the models' 128-token context, so scoring must keep only its last tokens.
LONG_CONTEXT = (
    "The river had been rising for three days, and by the fourth morning the water reached the lowest "
    "step of the mill. The miller's daughter walked along the bank before sunrise, counting the posts "
    "that still stood above the current, and she saw that two of them had already gone. Her father "
    "kept saying that the old stone walls had seen worse floods than this one, that his grandfather had "
    "watched the same river fill the lower room to the ceiling and drain away without taking a single "
    "stone, but she noticed that he had moved the sacks of flour to the loft during the night. When the "
    "rain began again in the afternoon, she"
)
ITEMS = [
    {"ctx": "A man is standing on a ladder next to a house. He",
     "endings": ["climbs to the roof and starts cleaning leaves out of the gutter.",
                 "swims across the ocean to buy a new ladder.",
                 "turns into a bicycle and rides into the garden.",
                 "reads a recipe to the ladder while it sleeps."], "label": 0},
    {"ctx": "How to boil an egg. Fill a small pot with water and place it on the stove. Then",
     "endings": ["paint the egg blue and hang it on the wall.",
                 "bring the water to a boil and gently lower the egg into the pot.",
                 "plant the pot in the garden and wait for spring.",
                 "call the egg on the phone to ask how it feels."], "label": 1},
    {"ctx": "A girl holds a violin under her chin in front of a music stand. She",
     "endings": ["eats the music stand.", "throws the violin into a lake and dives after it.",
                 "lifts the bow and begins to play the first notes of the piece.",
                 "folds the violin into a paper airplane."], "label": 2},
    {"ctx": "Two teams line up on a snowy field holding brooms. The referee",
     "endings": ["bakes a cake for the brooms.", "sings the brooms to sleep.",
                 "sweeps the referee off the field.",
                 "drops a ball between them and the players start to push it with their brooms."], "label": 3},
    {"ctx": LONG_CONTEXT,
     "endings": ["carried the last of the chickens up to the loft and sat by the window to watch the water.",
                 "decided that the river was a good place to learn to fly.",
                 "painted the mill bright orange so the flood could find it.",
                 "went to sleep in the river."], "label": 0},
]


def perturbed_gpt2(tie, seed):
    """A transformers GPT-2 (tiny shape) whose every parameter, biases and norms too, is random."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hub_gpt2(tmp_path_factory):
    """(folder, transformers model): a tied GPT-2 saved exactly as OpenAI's file on the Hub is laid out:
    no `transformer.` prefix, causal-mask buffers `h.N.attn.bias`, no lm_head, plus config.json."""
    model = perturbed_gpt2(tie=True, seed=1)
    folder = tmp_path_factory.mktemp("hub_gpt2")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS))[None, None]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(folder / "config.json"))
    return str(folder), model


@pytest.fixture(scope="module")
def hub_checkpoint(hub_gpt2, tmp_path_factory):
    """The Hub-layout GPT-2 converted by `huggingface.py from-hf` into a checkpoint of ours."""
    out = str(tmp_path_factory.mktemp("converted") / "gpt2")
    huggingface.main(["from-hf", hub_gpt2[0], out])
    return out


@pytest.fixture(scope="module")
def untied_hf(tmp_path_factory):
    """(folder, transformers model): an untied GPT-2 written by save_pretrained (`transformer.` keys + lm_head)."""
    model = perturbed_gpt2(tie=False, seed=2)
    folder = str(tmp_path_factory.mktemp("untied_hf"))
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def short_val_dataset(tiny_dataset, tmp_path_factory):
    """tiny_dataset with its val split cut to its first 5,000 tokens in one shard (a full pass stays cheap)."""
    folder = tmp_path_factory.mktemp("short_val")
    tokens = val_tokens(tiny_dataset)[:5000].astype(np.int32)
    save_numpy({"tokens": tokens}, str(folder / "val-00000.safetensors"))
    with open(os.path.join(tiny_dataset, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["splits"] = {"val": {"num_tokens": len(tokens), "shards": [{"file": "val-00000.safetensors",
                                                                         "num_tokens": len(tokens)}]}}
    with open(folder / "manifest.json", "w") as f:
        json.dump(manifest, f)
    return str(folder)


def val_tokens(data_dir):
    """The val split read directly from the shard files the manifest lists (not through data.py)."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        shards = json.load(f)["splits"]["val"]["shards"]
    return np.concatenate([load_numpy(os.path.join(data_dir, s["file"]))["tokens"] for s in shards]).astype(np.int64)


@torch.no_grad()
def reference_loss(hf_model, tokens, batch_size, context_length, max_batches=None):
    """Mean cross-entropy of transformers' GPT-2 over consecutive (B, T) windows, targets shifted by one."""
    n = (len(tokens) - 1) // context_length // batch_size
    n = n if max_batches is None else min(n, max_batches)
    losses = []
    for b in range(n):
        chunk = torch.from_numpy(tokens[b * batch_size * context_length:(b + 1) * batch_size * context_length + 1])
        x, y = chunk[:-1].view(batch_size, -1), chunk[1:].view(batch_size, -1)
        losses.append(F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()).item())
    return sum(losses) / n, n * batch_size * context_length


@torch.no_grad()
def reference_hellaswag(hf_model, items):
    """llm.c's scoring with transformers, one unpadded row per ending: (per-item (sums, means), acc, acc_norm)."""
    enc = gpt.get_tokenizer()
    scores, correct, correct_norm = [], 0, 0
    for item in items:
        ctx = enc.encode(item["ctx"])
        sums, means = [], []
        for ending in item["endings"]:
            end = enc.encode(" " + ending)
            row = (ctx + end)[-N_POSITIONS:]
            n = min(len(end), len(row) - 1)
            logprobs = torch.log_softmax(hf_model(torch.tensor([row])).logits[0, :-1], dim=-1)
            token_losses = -logprobs[torch.arange(len(row) - 1), torch.tensor(row[1:])][-n:]
            sums.append(token_losses.sum().item())
            means.append(token_losses.mean().item())
        scores.append((sums, means))
        correct += int(np.argmin(sums)) == item["label"]
        correct_norm += int(np.argmin(means)) == item["label"]
    return scores, correct / len(items), correct_norm / len(items)


def write_jsonl(path, items):
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return str(path)


def run_json(capsys, argv):
    capsys.readouterr()
    evaluate.main(argv)
    return json.loads(capsys.readouterr().out)


def error_of(main, argv):
    """The message of the SystemExit a bad command ends with; it must be one line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# --- from-hf ----------------------------------------------------------------------------------------

def test_from_hf_writes_a_tied_qkv_bias_checkpoint_with_transformers_logits(hub_gpt2, hub_checkpoint):
    meta = checkpointing.read_meta(hub_checkpoint)
    cfg = meta["model_config"]
    assert (cfg["qkv_bias"], cfg["tie_weights"], cfg["drop_rate"]) == (True, True, 0.0)
    assert (cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"], cfg["context_length"]) == (64, 2, 4, N_POSITIONS)
    model, _ = checkpointing.load_model(hub_checkpoint)
    idx = torch.randint(0, 50257, (2, N_POSITIONS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hub_gpt2[1](idx).logits, atol=1e-4, rtol=1e-4)


def test_from_hf_reads_untied_save_pretrained_folder_and_single_file(untied_hf, tmp_path):
    folder, hf_model = untied_hf
    idx = torch.randint(0, 50257, (2, 50), generator=torch.Generator().manual_seed(1))
    for source in (folder, os.path.join(folder, "model.safetensors")):
        out = str(tmp_path / f"ckpt{len(os.listdir(tmp_path))}")
        huggingface.main(["from-hf", source, out])
        model, meta = checkpointing.load_model(out)
        assert meta["model_config"]["tie_weights"] is False
        with torch.no_grad():
            torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_loss_of_imported_gpt2_equals_transformers_loss_on_the_same_windows(hub_gpt2, hub_checkpoint,
                                                                             short_val_dataset, capsys):
    tokens = val_tokens(short_val_dataset)
    # Defaults: B=6, T=1024 capped at the model's 128, every whole batch of the val split.
    result = run_json(capsys, ["loss", "--checkpoint", hub_checkpoint, "--data", short_val_dataset,
                               "--device", "cpu", "--json"])
    expected, n_tokens = reference_loss(hub_gpt2[1], tokens, 6, N_POSITIONS)
    assert result["tokens"] == n_tokens == (len(tokens) - 1) // N_POSITIONS // 6 * 6 * N_POSITIONS
    assert result["context_length"] == N_POSITIONS
    assert result["loss"] == pytest.approx(expected, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)

    result = run_json(capsys, ["loss", "--checkpoint", hub_checkpoint, "--data", short_val_dataset, "--device", "cpu",
                               "--json", "--batch-size", "3", "--context-length", "40", "--max-batches", "5"])
    expected, n_tokens = reference_loss(hub_gpt2[1], tokens, 3, 40, max_batches=5)
    assert result["tokens"] == n_tokens == 5 * 3 * 40
    assert result["loss"] == pytest.approx(expected, abs=1e-4)


# --- HellaSwag --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hellaswag_scores_equal_transformers_on_jsonl_and_parquet(hub_gpt2, hub_checkpoint, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores, acc, acc_norm = reference_hellaswag(hub_gpt2[1], ITEMS)
    model, _ = checkpointing.load_model(hub_checkpoint)
    ours = evaluate.hellaswag_scores(model, ITEMS, items_per_batch=3)  # batches of mixed lengths, padded
    for (sums, means), (ref_sums, ref_means) in zip(ours, scores):
        assert sums == pytest.approx(ref_sums, abs=1e-4) and means == pytest.approx(ref_means, abs=1e-4)
    assert evaluate.hellaswag(model, ITEMS, "cpu")["acc_norm"] == acc_norm  # what train.py may call

    jsonl = write_jsonl(tmp_path / "hellaswag_val.jsonl", ITEMS)
    # The Hub's parquet (Rowan/hellaswag) stores the label as a string.
    parquet = str(tmp_path / "validation.parquet")
    pq.write_table(pa.table({"ctx": [i["ctx"] for i in ITEMS], "endings": [i["endings"] for i in ITEMS],
                             "label": [str(i["label"]) for i in ITEMS]}), parquet)
    for path in (jsonl, parquet):
        result = run_json(capsys, ["hellaswag", "--checkpoint", hub_checkpoint, "--file", path,
                                   "--device", "cpu", "--json"])
        assert result == {"acc": acc, "acc_norm": acc_norm, "n": len(ITEMS)}

    _, acc3, acc_norm3 = reference_hellaswag(hub_gpt2[1], ITEMS[:3])
    result = run_json(capsys, ["hellaswag", "--checkpoint", hub_checkpoint, "--file", jsonl, "--limit", "3",
                               "--batch-size", "1", "--device", "cpu", "--json"])
    assert result == {"acc": acc3, "acc_norm": acc_norm3, "n": 3}


# --- compare ----------------------------------------------------------------------------------------

def test_compare_tables_several_models_on_the_same_tokens(hub_gpt2, hub_checkpoint, untied_hf, tiny_dataset,
                                                          tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "hs.jsonl", ITEMS[:4])
    # A checkpoint of ours and a Hub folder (converted on the fly), side by side.
    capsys.readouterr()
    evaluate.main(["compare", hub_checkpoint, untied_hf[0], "--data", tiny_dataset, "--batch-size", "2",
                   "--context-length", "64", "--max-batches", "3", "--device", "cpu", "--markdown",
                   "--hellaswag", jsonl])
    printed = capsys.readouterr().out
    # next to the figures llm.c published with the same scoring
    assert "HellaSwag acc_norm, llm.c's scoring, as published by llm.c on all 10,042 items: OpenAI GPT-2 small " \
           "29.55%, OpenAI GPT-2 XL 48.93%" in printed
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1:-1] == [" model ", " parameters ", " val loss ", " perplexity ",
                                         " HellaSwag acc_norm, llm.c's scoring "]
    tokens = val_tokens(tiny_dataset)
    for line, (name, hf_model) in zip(table[1:], [(hub_checkpoint, hub_gpt2[1]), (untied_hf[0], untied_hf[1])]):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        expected, _ = reference_loss(hf_model, tokens, 2, 64, max_batches=3)
        _, _, acc_norm = reference_hellaswag(hf_model, ITEMS[:4])
        n_params = sum(p.numel() for p in hf_model.parameters())  # transformers counts a tied head once
        assert cells[:2] == [name, f"{n_params / 1e6:.1f}M"]
        assert float(cells[2]) == pytest.approx(expected, abs=2e-4)  # printed to 4 decimals
        assert float(cells[3]) == pytest.approx(math.exp(expected), rel=2e-4)
        assert cells[4] == f"{100 * acc_norm:.2f}%"
    assert len(table) == 3


# --- generate ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_is_reproducible_for_a_seed(hub_checkpoint, capsys):
    def sample(seed):
        capsys.readouterr()
        evaluate.main(["generate", "--checkpoint", hub_checkpoint, "--seed", str(seed), "--device", "cpu"])
        return capsys.readouterr().out

    first = sample(7)
    assert first.startswith(evaluate.PROMPT) and len(first) > len(evaluate.PROMPT) + 5
    assert sample(7) == first
    assert sample(8) != first  # 15 tokens at temperature 1.4 over 25 candidates: a repeat is ~impossible

    out = subprocess.run([sys.executable, "evaluate.py", "generate", "--checkpoint", hub_checkpoint, "--seed", "7",
                          "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == first

    # Streamed token by token, the text is what the book's generate returns, decoded whole.
    torch.manual_seed(7)
    model, _ = checkpointing.load_model(hub_checkpoint)
    enc = gpt.get_tokenizer()
    ids = gpt.generate(model, gpt.text_to_token_ids(evaluate.PROMPT, enc), evaluate.MAX_NEW_TOKENS,
                       N_POSITIONS, evaluate.TEMPERATURE, evaluate.TOP_K)
    assert first == enc.decode(ids[0].tolist()) + "\n"


# --- errors -----------------------------------------------------------------------------------------

def test_bad_paths_give_one_line_errors(tmp_path, hub_checkpoint, tiny_dataset):
    missing = str(tmp_path / "nowhere")
    assert "does not exist" in error_of(evaluate.main, ["loss", "--checkpoint", missing, "--data", tiny_dataset])
    assert "not a prepared dataset" in error_of(evaluate.main, ["loss", "--checkpoint", hub_checkpoint,
                                                                "--data", missing])
    assert "does not exist" in error_of(evaluate.main, ["hellaswag", "--checkpoint", hub_checkpoint,
                                                        "--file", missing])
    assert missing in error_of(huggingface.main, ["from-hf", missing, str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    assert "model.safetensors" in error_of(huggingface.main, ["from-hf", str(tmp_path / "empty"),
                                                              str(tmp_path / "out")])
    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    assert "not a GPT-2" in error_of(huggingface.main, ["from-hf", str(tmp_path / "other.safetensors"),
                                                        str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")
    assert "exists and is not empty" in error_of(huggingface.main, ["to-hf", hub_checkpoint, hub_checkpoint])


def test_inputs_that_would_skew_results_are_refused_in_one_line(tmp_path, hub_checkpoint, tiny_dataset):
    # A HellaSwag item with 3 endings would be scored as a 3-way choice: each bad item names its line.
    bad = [dict(ITEMS[0], endings=ITEMS[0]["endings"][:3]), dict(ITEMS[0], label=4), dict(ITEMS[0], ctx=" ")]
    for item in bad:
        jsonl = write_jsonl(tmp_path / "hs.jsonl", [ITEMS[1], item])
        message = error_of(evaluate.main, ["hellaswag", "--checkpoint", hub_checkpoint, "--file", jsonl])
        assert "hs.jsonl line 2 is not a HellaSwag item (a non-empty ctx, 4 endings, a label 0-3)" in message
    # The same model twice would be one run counted as a group of two.
    for twice in ([hub_checkpoint, hub_checkpoint], [hub_checkpoint, hub_checkpoint + "/"]):
        assert "is named twice" in error_of(evaluate.main, ["compare", *twice, "--data", tiny_dataset])
    assert "neither a loss nor one of the models" in error_of(
        evaluate.main, ["compare", hub_checkpoint, "--data", tiny_dataset, "--target", "gpt2"])


def test_misnamed_paths_and_endless_requests_say_what_is_wrong(tmp_path, hub_checkpoint, tiny_dataset):
    (tmp_path / "v.parquet").write_bytes(b"PAR1 not a model")
    assert "is a file, not a run folder" in error_of(evaluate.main, ["loss", "--run-dir", str(tmp_path / "v.parquet"),
                                                                     "--data", tiny_dataset])
    (tmp_path / "answers").mkdir()
    assert f"--out {tmp_path / 'answers'} is a folder; name the answers file" in error_of(
        evaluate.main, ["instruct", "--checkpoint", hub_checkpoint, "--out", str(tmp_path / "answers")])
    # a billion tokens would run for days, the model seeing none of the prompt after its 128th
    message = error_of(evaluate.main, ["generate", "--checkpoint", hub_checkpoint, "--max-new-tokens", "1000000000",
                                       "--device", "cpu"])
    assert "--max-new-tokens 1,000,000,000 is more than the model's context of 128 tokens" in message


def test_mismatched_vocabularies_give_one_line_errors(tmp_path, hub_gpt2, tiny_dataset):
    small = gpt.GPTModel(gpt.model_config("tiny", vocab_size=1000))
    checkpointing.save_model(small, str(tmp_path / "small"))
    assert "vocabulary" in error_of(evaluate.main, ["loss", "--checkpoint", str(tmp_path / "small"),
                                                    "--data", tiny_dataset, "--device", "cpu"])
    jsonl = write_jsonl(tmp_path / "hs.jsonl", ITEMS[:1])
    assert "vocabulary" in error_of(evaluate.main, ["hellaswag", "--checkpoint", str(tmp_path / "small"),
                                                    "--file", jsonl, "--device", "cpu"])

    # A config.json that disagrees with the weights beside it.
    folder = tmp_path / "mismatch"
    folder.mkdir()
    os.link(os.path.join(hub_gpt2[0], "model.safetensors"), folder / "model.safetensors")
    with open(os.path.join(hub_gpt2[0], "config.json")) as f:
        config = json.load(f)
    with open(folder / "config.json", "w") as f:
        json.dump({**config, "vocab_size": 50304}, f)
    assert "vocab_size 50304" in error_of(huggingface.main, ["from-hf", str(folder), str(tmp_path / "out")])


def test_an_unreachable_hub_while_fetching_hellaswag_is_a_hub_error_in_one_line(tmp_path, monkeypatch):
    """huggingface.hub_file fails with a HubError (not a checkpoint's error), and evaluate.py ends it in
    one line that says to pass --file."""
    import huggingface_hub

    def not_in_the_cache(*args, **kwargs):
        raise OSError("not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_in_the_cache)
    monkeypatch.setattr(huggingface, "hub_unreachable_reason", lambda: "the Hugging Face Hub is unreachable (test)")
    with pytest.raises(huggingface.HubError):
        evaluate.download_hellaswag()
    checkpointing.save_model(gpt.GPTModel(gpt.model_config("tiny")), str(tmp_path / "ck"))
    message = error_of(evaluate.main, ["hellaswag", "--checkpoint", str(tmp_path / "ck"), "--device", "cpu"])
    assert "unreachable (test)" in message and "--file" in message


@pytest.mark.slow
def test_offline_names_say_which_local_file_to_pass(tmp_path, hub_checkpoint):
    # HF_HUB_OFFLINE makes huggingface_hub fail at once, as an unreachable Hub does after its timeouts.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    for args, hint in ((["huggingface.py", "from-hf", "gpt2", str(tmp_path / "out")], "model.safetensors"),
                       (["evaluate.py", "hellaswag", "--checkpoint", hub_checkpoint], "--file")):
        out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and hint in lines[0], out.stderr


@pytest.mark.slow
def test_compare_checks_every_model_before_evaluating_any_and_fails_fast_offline(tmp_path, hub_checkpoint, tiny_dataset):
    """An unreachable Hub (here: an endpoint on a closed local port) used to show up only after every
    other model was evaluated, under a dozen lines of retries."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.time()
    out = subprocess.run([sys.executable, "evaluate.py", "compare", hub_checkpoint, "gpt2", "--data", tiny_dataset,
                          "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:9 is unreachable" in lines[0] and "model.safetensors" in lines[0], out.stderr
    assert "val loss" not in out.stdout + out.stderr  # nothing was evaluated first
    assert time.time() - start < 30


@pytest.mark.slow
def test_an_eval_set_scores_exactly_its_windows_and_prints_its_published_numbers(tmp_path, monkeypatch, capsys):
    """gpjt-test's definition, scaled down (offset 1,000, 5 batches of 2 x 32) so the test's files stay
    small; the windows and the loss are checked against a naive computation written here."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    val = rng.integers(0, 50257, 20_000).astype(np.uint16)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"tokens": rng.integers(0, 50257, 30_000).astype(np.uint16)}, str(src / "train.safetensors"))
    save_file({"tokens": val}, str(src / "validation.safetensors"))
    import prepare_datasets
    prepare_datasets.main(["--from-tokens", str(src / "*"), "--output", str(tmp_path / "ds")])
    monkeypatch.setitem(evaluate.EVAL_SETS, "gpjt-test", {**evaluate.EVAL_SETS["gpjt-test"], "offset": 1000,
                                                          "batch_size": 2, "context_length": 32, "batches": 5})
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.model_config("tiny", context_length=64)).eval()
    checkpointing.save_model(model, str(tmp_path / "ck"))

    result = run_json(capsys, ["loss", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "ds"),
                               "--eval-set", "gpjt-test", "--device", "cpu", "--json"])
    tokens = torch.from_numpy(val.astype(np.int64))
    losses = []
    for i in range(5):  # batch i: sequences starting at token 1,000 + i*64, targets shifted by one
        start = 1000 + i * 2 * 32
        x, y = tokens[start:start + 64].view(2, 32), tokens[start + 1:start + 65].view(2, 32)
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    assert (result["batch_size"], result["context_length"], result["tokens"]) == (2, 32, 5 * 2 * 32)
    assert result["loss"] == pytest.approx(sum(losses) / 5, rel=1e-5)

    evaluate.main(["compare", str(tmp_path / "ck"), "--data", str(tmp_path / "ds"), "--eval-set", "gpjt-test",
                   "--device", "cpu"])
    assert "published by Giles Thomas" in capsys.readouterr().out
    evaluate.main(["compare", str(tmp_path / "ck"), "--data", str(tmp_path / "ds"), "--device", "cpu",
                   "--context-length", "32"])
    assert "published" not in capsys.readouterr().out  # no reference line under other windows


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A random model wide enough that scoring the test's data takes tens of seconds on a CPU, and with a
    context long enough for thousands of generated tokens: work to interrupt."""
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("slow") / "ck")
    checkpointing.save_model(gpt.GPTModel(gpt.model_config("tiny", emb_dim=256, context_length=4096)).eval(), out)
    return out


def interrupt(tmp_path, argv, started, signum=signal.SIGINT):
    """evaluate.py ARGV stopped by `signum` once `started(stdout, stderr)`: (exit status, stdout, stderr)."""
    return stopping.signal_once_started(tmp_path, ["evaluate.py", *argv], started, signum, wait=300)


@pytest.mark.slow
def test_ctrl_c_mid_way_ends_every_command_in_one_line_and_sigterm_keeps_the_answers(
        slow_checkpoint, tiny_dataset, tmp_path):
    hs = write_jsonl(tmp_path / "hs.jsonl", ITEMS * 400)
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": str(i)}
                                for i in range(400)]))
    model = ["--checkpoint", slow_checkpoint]
    cases = [(["loss", *model, "--data", tiny_dataset], "val loss", "Ctrl-C: nothing was kept"),
             (["compare", slow_checkpoint, "--data", tiny_dataset], "val loss", "Ctrl-C: nothing was kept"),
             (["hellaswag", *model, "--file", hs], "hellaswag", "Ctrl-C: nothing was kept"),
             (["instruct", *model, "--data", str(data), "--out", str(tmp_path / "a.jsonl")], "answers",
              f"Ctrl-C: the answers so far are kept in {tmp_path / 'a.jsonl'}.partial")]
    for argv, progress, line in cases:
        code, _, err = interrupt(tmp_path, argv + ["--device", "cpu"], lambda out, err: progress in err)
        assert code == 130 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(line) and err.count("Ctrl-C") == 1, err[-3000:]

    # SIGTERM (a scheduler's stop) to instruct once an answer is written: 143, the answers kept, resumable.
    partial = tmp_path / "b.jsonl.partial"
    argv = ["instruct", *model, "--data", str(data), "--out", str(tmp_path / "b.jsonl"), "--device", "cpu"]
    code, _, err = interrupt(tmp_path, argv, lambda out, err: partial.exists() and partial.read_text().count("\n") > 0,
                             signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"SIGTERM: the answers so far are kept in {partial}")
    assert all(json.loads(line)["model"] for line in partial.read_text().splitlines())


@pytest.mark.slow
def test_generate_streams_its_tokens_and_ctrl_c_keeps_them(slow_checkpoint, tmp_path):
    prompt = evaluate.PROMPT
    argv = ["generate", "--checkpoint", slow_checkpoint, "--max-new-tokens", "4000", "--device", "cpu"]
    # the first tokens are on stdout while the process still runs (it is interrupted below, mid-way)
    code, out, err = interrupt(tmp_path, argv, lambda out, err: len(out) > len(prompt) + 20)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert out.startswith(prompt) and len(out) > len(prompt) + 20
    assert err.strip().splitlines()[-1] == "Ctrl-C: the text so far is above; run the command again for a whole sample"
