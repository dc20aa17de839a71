"""--recipe rtx3090|modern and --optimizer muon: the optimizer groups, the LR schedules, exact Muon resume.

References: a naive listing of the model's parameters by name (which ones Muon should get, which
ones weight decay should touch), the schedules computed by hand, an uninterrupted run (for resume,
weights compared bit for bit), and a field-by-field diff of the parsed flags (for the bench's
"one change at a time" rows)."""

import importlib.util
import json
import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpointing as ckpt
import gpt
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--context-length", "32", "--batch-size", "4", "--val-batches", "2",
        "--device", "cpu", "--log-every", "2"]


def parse(*flags):
    return train.parse_args(["--data", "d", "--run-dir", "r", *flags])


def named_groups(model, optimizers):
    """[(optimizer class name, group hyperparameters, set of parameter names)] for every group."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(type(opt).__name__, g, {name_of[id(p)] for p in g["params"]})
            for opt in optimizers for g in opt.param_groups]


# What the recipes claim, written out by name: the blocks' matmul weights are the hidden matrices.
HIDDEN = re.compile(r"trf_blocks\.\d+\.(att\.(W_query|W_key|W_value|out_proj)|ff\.layers\.[02])\.weight")
NO_DECAY = re.compile(r".*\.(bias|scale|shift)")  # biases and LayerNorm, under --decay-matrices-only


@pytest.mark.parametrize("flags", [
    ["--recipe", "rtx3090"],
    ["--recipe", "modern"],
    ["--recipe", "modern", "--optimizer", "muon"],
    ["--recipe", "modern", "--optimizer", "muon", "--tie-weights", "--qkv-bias"],
    ["--recipe", "rtx3090", "--optimizer", "muon", "--muon-lr", "0.05", "--muon-weight-decay", "0.01"],
])
def test_each_recipe_builds_the_optimizer_groups_it_claims(flags):
    args = parse("--model", "tiny", *flags)
    torch.manual_seed(0)
    model = gpt.GPTModel(train.model_config_from_args(args))
    groups = named_groups(model, train.build_optimizers(model, args, False, False))
    names = [n for n, _ in model.named_parameters()]  # a tied head is listed once, as tok_emb.weight

    placed = [n for _, _, group in groups for n in group]
    assert sorted(placed) == sorted(names), "every parameter in exactly one group"
    muon = {n for n in names if HIDDEN.fullmatch(n)} if args.optimizer == "muon" else set()
    no_decay = {n for n in names if NO_DECAY.fullmatch(n)} if args.decay_matrices_only else set()
    decay = set(names) - muon - no_decay
    assert len(muon) == (6 * 2 if args.optimizer == "muon" else 0)  # 6 matrices in each of tiny's 2 blocks

    expected = {("AdamW", args.weight_decay, args.lr): decay, ("AdamW", 0.0, args.lr): no_decay,
                ("Muon", args.muon_weight_decay, args.muon_lr): muon}
    got = {(kind, g["weight_decay"], g["base_lr"]): group for kind, g, group in groups}
    assert got == {key: group for key, group in expected.items() if group}
    for kind, g, _ in groups:
        if kind == "AdamW":
            assert g["betas"] == ((0.9, 0.95) if args.recipe == "modern" else (0.9, 0.999))
        else:
            assert (g["momentum"], g["nesterov"], g["adjust_lr_fn"]) == (0.95, True, "original")


def test_recipe_flags_are_the_documented_ones_and_each_stays_a_flag():
    seed, modern = parse(), parse("--recipe", "modern")
    assert (seed.lr, seed.beta2, seed.schedule, seed.drop_rate, seed.grad_clip, seed.decay_matrices_only,
            seed.precision, seed.init, seed.tokens_per_step) == (4e-4, 0.999, "constant", None, 0.0, False,
                                                                   "fp16", None, None)
    assert (modern.lr, modern.beta2, modern.schedule, modern.warmup_steps, modern.min_lr, modern.drop_rate,
            modern.grad_clip, modern.decay_matrices_only, modern.precision, modern.fused, modern.compile,
            modern.init, modern.tokens_per_step) == (6e-4, 0.95, "cosine", 715, 6e-5, 0.0, 1.0, True, "bf16",
                                                     "cuda", "cuda", "gpt2", 524288)
    # the model the recipes build: the seed's is the book's (dropout 0.1), modern's has no dropout
    assert train.model_config_from_args(seed)["drop_rate"] == 0.1
    assert train.model_config_from_args(modern)["drop_rate"] == 0.0
    # every piece can be turned back off
    off = parse("--recipe", "modern", "--schedule", "constant", "--drop-rate", "0.1", "--grad-clip", "0",
                "--no-decay-matrices-only", "--precision", "fp32", "--fused", "false", "--compile", "false",
                "--init", "pytorch", "--beta2", "0.999", "--grad-accum", "1")
    assert (off.schedule, off.drop_rate, off.grad_clip, off.decay_matrices_only, off.precision, off.fused,
            off.compile, off.init, off.beta2) == ("constant", 0.1, 0.0, False, "fp32", False, False, "pytorch", 0.999)
    assert train.choose_batch_layout(off, 6, 1024, 1) == (6, 1, 6)  # --grad-accum sets the recipe's step size aside
    # ~0.5M tokens a step: 16 x 1,024 on one GPU accumulates 32 micro-steps (exactly 524,288 tokens)
    modern16 = parse("--recipe", "modern", "--batch-size", "16")
    assert train.choose_batch_layout(modern16, 16, 1024, 1) == (16, 32, 512)


def test_the_step_defaults_the_measure_scripts_time_are_train_pys_constants():
    """recipes.STEP_DEFAULTS stands in for train.py's constants where train.py is not imported."""
    import recipes
    args = parse()
    assert {k: getattr(args, k) for k in recipes.STEP_DEFAULTS} == recipes.STEP_DEFAULTS
    assert (train.OPTIMIZER, train.FUSED, train.COMPILE, train.GRAD_CLIP, train.DECAY_MATRICES_ONLY, train.SHARD_MUON,
            train.ZERO1) == tuple(recipes.STEP_DEFAULTS.values())


def test_linear_and_cosine_schedules_match_hand_computed_values():
    # warmup 10 steps to a peak of 1.0, decay to 0.1 at step 110 (100 steps of decay)
    lin = lambda s: train.lr_at(s, 1.0, "linear", 10, 110, 0.1)
    assert [lin(0), lin(4), lin(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lin(10) == pytest.approx(1.0)
    assert lin(35) == pytest.approx(1.0 - 0.25 * 0.9)  # a quarter of the way down
    assert lin(60) == pytest.approx(0.55)
    assert lin(109) == pytest.approx(0.1 + 0.01 * 0.9)
    assert lin(110) == lin(10 ** 6) == 0.1
    # the modern recipe at GPT-3's numbers: 715 warmup steps, peak 6e-4, floor 6e-5, horizon 5,715
    cos = lambda s: train.lr_at(s, 6e-4, "cosine", 715, 5715, 6e-5)
    assert cos(0) == pytest.approx(6e-4 / 715)
    assert cos(714) == pytest.approx(6e-4)
    assert cos(3215) == pytest.approx(3.3e-4)  # halfway: the mean of peak and floor
    assert cos(4465) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(0.75 * math.pi)) * 5.4e-4)
    assert cos(5715) == 6e-5


def test_set_lr_moves_muon_and_adamw_along_the_same_schedule():
    """Muon's LR follows the schedule at its own peak, with the floor at the same fraction."""
    args = parse("--model", "tiny", "--recipe", "modern", "--optimizer", "muon", "--schedule", "linear",
                 "--warmup-steps", "10", "--min-lr", "6e-5")
    model = gpt.GPTModel(train.model_config_from_args(args))
    adamw, muon = train.build_optimizers(model, args, False, False)
    for step, fraction in [(0, 0.1), (9, 1.0), (60, 0.55), (110, 0.1), (500, 0.1)]:  # hand-computed, as above
        train.set_lr([adamw, muon], step, args, decay_steps=110)
        assert [g["lr"] for g in adamw.param_groups] == [pytest.approx(6e-4 * fraction)] * 2  # decay, no decay
        assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.02 * fraction)]


def test_a_warmup_longer_than_the_run_is_refused(tiny_dataset, tmp_path):
    """--recipe modern's 715 warmup steps assume 0.5M tokens a step; 300k tokens at 128 a step is
    2,343 steps, so the default is fine there, but a 2,048-token step gives only 146."""
    common = ["--data", tiny_dataset, *TINY, "--recipe", "modern", "--grad-accum", "1", "--max-steps", "1"]
    with pytest.raises(SystemExit, match=r"--warmup-steps 715 is not shorter than the decay horizon of 146 steps"):
        train.main([*common, "--run-dir", str(tmp_path / "a"), "--batch-size", "64"])
    with pytest.raises(SystemExit, match="more than the train split holds"):
        train.main([*common, "--run-dir", str(tmp_path / "b"), "--grad-accum", "3000"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_muon_run_resumes_bit_identically_on_cpu(tiny_dataset, tmp_path):
    """The modern recipe with Muon on the CPU (bf16 autocast, no compile, no fused AdamW): an uninterrupted
    run of 8 steps vs 4 steps (--max-steps) + --resume latest + 4 more; the LR decays across the break."""
    steps = 8
    modern = ["--recipe", "modern", "--optimizer", "muon", "--grad-accum", "1", "--warmup-steps", "2",
              "--decay-steps", str(steps), "--val-every", "4"]
    args = lambda run, *extra: ["--data", tiny_dataset, "--run-dir", str(run), *TINY, *modern, *extra]
    uninterrupted, halves = tmp_path / "uninterrupted", tmp_path / "halves"
    train.main(args(uninterrupted, "--max-steps", str(steps)))
    train.main(args(halves, "--max-steps", str(steps // 2)))
    train.main(args(halves, "--max-steps", str(steps), "--resume", "latest"))

    a, b = (load_file(os.path.join(ckpt.resolve_checkpoint(str(r), "latest"), ckpt.MODEL_FILE))
            for r in (uninterrupted, halves))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
    rows = lambda r: [json.loads(line) for line in open(r / "metrics.jsonl")]
    same = ("step", "train_loss", "val_loss", "lr")
    assert [{k: row[k] for k in same} for row in rows(halves)] == \
        [{k: row[k] for k in same} for row in rows(uninterrupted)]
    assert rows(uninterrupted)[-1]["val_loss"] < rows(uninterrupted)[0]["val_loss"]

    # Muon's momentum buffers went into the safetensors file (optimizer 1), next to AdamW's moments
    folder = ckpt.resolve_checkpoint(str(uninterrupted), "latest")
    with safe_open(os.path.join(folder, ckpt.TRAIN_STATE_FILE), framework="pt") as f:
        keys = list(f.keys())
    assert len([k for k in keys if k.startswith("optimizer.1.") and k.endswith(".momentum_buffer")]) == 12
    assert [k for k in keys if k.startswith("optimizer.0.") and k.endswith(".exp_avg_sq")]
    training = json.load(open(uninterrupted / "config.json"))["training"]
    assert (training["precision"], training["compile"], training["fused"], training["optimizer"]) == \
        ("bf16", False, False, "muon")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_recipes", os.path.join(REPO, "bench", "recipes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_rows_change_one_thing_at_a_time():
    """Each "rtx3090 + X" row differs from the seed row in X's flags only (a diff of the parsed flags)."""
    bench = load_bench()
    rows = dict(bench.rows(bench.TOKENS))
    parsed = {name: vars(parse(*flags)) for name, flags in rows.items()}
    diff = lambda a, b: {k for k in parsed[a] if parsed[a][k] != parsed[b][k]}
    expected = {
        f"rtx3090, --seed {bench.SEED_REPEAT}": {"seed"},
        "rtx3090 + warmup & cosine": {"schedule", "warmup_steps", "decay_steps", "min_lr"},
        "rtx3090 + dropout 0": {"drop_rate"},
        "rtx3090 + grad clip 1.0": {"grad_clip"},
        "rtx3090 + 4x batch": {"batch_size"},
        "rtx3090 + qkv bias": {"qkv_bias"},
        "rtx3090 + tied head": {"tie_weights"},
    }
    for name, changed in expected.items():
        assert diff(name, "rtx3090") == changed, name
    assert diff("modern, linear decay", "modern (AdamW, cosine)") == {"schedule"}
    assert diff("modern + Muon", "modern (AdamW, cosine)") == {"optimizer"}
    # at the seed's batch the schedule stretches over the 4x more steps
    assert diff("modern, rtx3090 batch", "modern (AdamW, cosine)") == {"batch_size", "tokens_per_step",
                                                                      "warmup_steps", "decay_steps"}
    assert diff("modern + Muon, rtx3090 batch", "modern, rtx3090 batch") == {"optimizer"}
    # the same tokens for every row, and the LRs scaled alike
    steps = {name: bench.TOKENS // (p["batch_size"] * bench.CONTEXT) for name, p in parsed.items()}
    assert steps["rtx3090"] == 4 * steps["rtx3090 + 4x batch"] == 4 * steps["modern + Muon"] == 512
    assert parsed["rtx3090"]["lr"] / train.LR == pytest.approx(parsed["modern + Muon"]["lr"] / 6e-4) == pytest.approx(12)
    assert parsed["modern + Muon"]["muon_lr"] == train.MUON_LR
