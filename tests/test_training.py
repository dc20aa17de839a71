"""training.py, the step shared by train.py and the measure scripts, against independent references:
torch.optim.Muon itself, data.TokenStream's own batches, a linear scan, and the book's precision rules."""

import json
import os

import pytest
import torch

import data
import gpt
import optim
import train
import training


@pytest.mark.slow
def test_muon_with_its_iteration_written_out_equals_torch_muon():
    """Same state, same update: 3 steps on the same gradients give bit-identical weights and buffers
    (eager), and compiled within bf16 rounding."""
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (32, 32)]  # wide, tall (transposed inside) and square
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]

    def run(cls, **extra):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = cls(params, lr=0.02, momentum=0.95, weight_decay=0.01, adjust_lr_fn="original", **extra)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return params, opt

    ref, ref_opt = run(torch.optim.Muon)
    ours, ours_opt = run(optim.Muon, compile_iteration=False, shard=False)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert ours_opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    for key, state in ref_opt.state_dict()["state"].items():
        assert torch.equal(ours_opt.state_dict()["state"][key]["momentum_buffer"], state["momentum_buffer"])
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # plain C++ loops: half the compile time
        compiled, _ = run(optim.Muon, compile_iteration=True, shard=False)
    for a, b in zip(compiled, ref):
        assert torch.allclose(a, b, rtol=0, atol=0.02 * 3 * 0.02)  # within a bf16 ulp of each of 3 updates


def test_batch_loader_serves_the_token_streams_batches_in_order(tiny_dataset):
    stream = data.TokenStream(tiny_dataset, "train")
    starts = [0, 5, 2000, 999, 7]  # out of order, across the shard boundary at 100,000 tokens (sequence 3,125 / 32)
    starts += [3120, 3124]
    loader = data.BatchLoader(stream, starts, 4, 32, "cpu", depth=2)
    served = list(loader)
    assert [first for first, _, _ in served] == starts
    for first, inputs, targets in served:
        ref_inputs, ref_targets = stream.batch(first, 4, 32)
        assert inputs.dtype == torch.int64 and torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)


def test_batch_loader_hands_a_read_error_to_the_consumer(tiny_dataset):
    stream = data.TokenStream(tiny_dataset, "train")
    loader = data.BatchLoader(stream, [0, 10**9], 4, 32, "cpu")
    next(loader)
    with pytest.raises(IndexError, match="outside the train split"):
        next(loader)


def test_largest_fitting_equals_a_linear_scan():
    candidates = [1, 2, 4, 8, 16, 32]
    for limit in [0, 1, 3, 8, 31, 32, 1000]:
        tried = []

        def fits(b):
            tried.append(b)
            return b <= limit

        expected = max((c for c in candidates if c <= limit), default=None)
        assert training.largest_fitting(candidates, fits) == expected
        assert tried == candidates[:len([c for c in candidates if c <= limit]) + 1][:len(candidates)]


def test_auto_candidates_divide_a_ranks_share_of_the_step():
    assert training.auto_batch_candidates(512 // 8) == [1, 2, 4, 8, 16, 32, 64]
    assert training.auto_batch_candidates(96) == [1, 2, 4, 8, 16, 32]
    assert training.auto_batch_candidates(None) == list(training.AUTO_BATCH_CANDIDATES)


def test_precision_falls_back_off_cuda():
    cpu = torch.device("cpu")
    assert [(p.name, p.dtype, p.use_scaler) for p in map(lambda n: training.Precision(n, cpu), ["fp16", "tf32", "bf16", "fp32"])] == \
        [("fp32", None, False), ("fp32", None, False), ("bf16", torch.bfloat16, False), ("fp32", None, False)]


def test_optimizer_state_bytes_by_hand():
    model = gpt.GPTModel(gpt.model_config("tiny"))
    n = sum(p.numel() for p in model.parameters())
    hidden = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("trf_blocks."))
    assert optim.optimizer_state_bytes(model, "adamw") == 8 * n           # two fp32 moments
    assert optim.optimizer_state_bytes(model, "muon") == 8 * n - 4 * hidden  # one momentum on Muon's matrices


@pytest.mark.slow
def test_batch_size_auto_is_resolved_and_recorded(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train.main(["--data", tiny_dataset, "--run-dir", str(run), "--model", "tiny", "--context-length", "32",
                "--batch-size", "auto", "--tokens-per-step", str(32 * 16), "--val-batches", "2", "--device", "cpu",
                "--max-steps", "2", "--val-every", "2"])
    settings = json.load(open(run / "config.json"))["training"]
    # off CUDA auto takes AUTO_BATCH_OFF_CUDA (8), which divides the 16 sequences a step: 2 micro-steps
    assert (settings["batch_size_requested"], settings["batch_size"], settings["grad_accum"],
            settings["sequences_per_step"]) == ("auto", 8, 2, 16)


@pytest.mark.slow
def test_precision_leaves_both_tf32_getters_readable_and_sets_tf32_as_the_mode_says():
    """Inductor reads torch.get_float32_matmul_precision() while picking kernels; setting TF32 through
    the new fp32_precision flag alone makes it (and allow_tf32) raise. Each mode is applied in a fresh
    process, as a run applies it, for a CUDA device (the flags can be set without a GPU)."""
    import subprocess
    import sys
    names = ["fp32", "tf32", "fp16"] + (["bf16"] if torch.cuda.is_available() else [])  # bf16 checks the GPU
    code = ("import sys, torch, training\n"
            "training.Precision(sys.argv[1], torch.device('cuda')).apply()\n"
            "print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)")
    for name in names:
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=120,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr[-1500:]
        legacy, allow_tf32 = out.stdout.split()
        assert (legacy, allow_tf32) == (("highest", "False") if name == "fp32" else ("high", "True")), name
