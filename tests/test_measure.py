"""The measurement scripts (tokens/s, validation timing) and the GPU benchmark, run on CPU with `tiny`.

References: hand computations with the numbers written out (MFU of gpt2-small at 100,000 tokens/s; a
validation plan at 0.25 s a batch), parameter counts of the model measured, torch's own AdamW for the
timed step's loss, a real allocation failure under an address-space cap for the out-of-memory path,
and the book's explicit masked-softmax attention against gpt.GPTModel's SDPA attention.
"""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

import data
import gpt
import measure_tokens_per_second as mtps
import measure_validation_timing as mvt
import stopping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough that a CPU step takes well under a second on a shared 2-core machine.
FAST = ["--model", "tiny", "--device", "cpu", "--context-length", "32"]
QUICK = ["--seconds", "0"]  # the timing floor (10 s a row by default) off: the step counts decide


@pytest.mark.slow
def test_throughput_rows_are_the_settings_asked_and_the_estimate_is_tokens_over_rate(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    mtps.main(FAST + QUICK + ["--precision", "fp32,bf16", "--batch-sizes", "1,2", "--steps", "1",
                              "--warmup-steps", "1", "--json-out", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["precision"], r["batch_size"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    for r in rows:
        assert set(r) >= {"batch_size", "precision", "tokens_per_second", "peak_memory_bytes", "mfu"}
        assert r["tokens_per_second"] > 0
        # tokens/s is tokens per timed step over seconds per step (steps of batch x 32 tokens)
        assert r["tokens_per_second"] == pytest.approx(r["batch_size"] * 32 / r["seconds_per_step"])
        assert r["timed_steps"] >= 1 and r["seconds_per_step"] == pytest.approx(r["timed_seconds"] / r["timed_steps"])
        assert r["peak_memory_bytes"] is None and r["mfu"] is None  # CPU: no device memory, no peak FLOP/s
    assert report["limits"] == []

    fastest = max(r["tokens_per_second"] for r in rows)
    # the estimate is for the model measured: tiny at context 32 has 3,223,680 + ... parameters, x 20 tokens each
    with torch.device("meta"):
        params = sum(p.numel() for p in gpt.GPTModel(gpt.model_config("tiny", context_length=32)).parameters())
    expected_seconds = 20 * params / fastest
    assert report["best"]["tokens_per_second"] == fastest
    assert report["best"]["train_seconds"] == pytest.approx(expected_seconds, rel=1e-12)
    printed = capsys.readouterr().out
    assert f"{expected_seconds / 3600:,.2f} h" in printed
    assert printed.count("\nfp32 ") == 2 and printed.count("\nbf16 ") == 2  # one table, a line per row


def test_cuda_only_modes_are_skipped_on_cpu_with_a_note(tmp_path, capsys):
    out = tmp_path / "t.json"
    mtps.main(FAST + QUICK + ["--precision", "fp16,tf32,fp32", "--batch-sizes", "1", "--steps", "1",
                              "--warmup-steps", "0", "--json-out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["precision"], r["batch_size"]) for r in report["rows"]] == [("fp32", 1)]
    assert len(report["notes"]) == 2 and "fp16" in report["notes"][0] and "tf32" in report["notes"][1]
    assert "note: fp16 is a CUDA mode" in capsys.readouterr().out


@pytest.mark.slow
def test_out_of_memory_ends_a_modes_sweep_and_the_next_mode_still_runs(tmp_path):
    # A real allocation failure: the child process may map at most 3 GiB, and batch 1,024 needs a
    # 1,024 x 32 x 50,257 float32 logits tensor (6.6 GB) on its own.
    cap = 3 * 2**30

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    out = tmp_path / "oom.json"
    result = subprocess.run(
        [sys.executable, "measure_tokens_per_second.py", *FAST, *QUICK, "--precision", "fp32,bf16",
         "--batch-sizes", "1,1024,2", "--steps", "1", "--warmup-steps", "0", "--json-out", str(out)],
        cwd=REPO, preexec_fn=limit_memory, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    report = json.loads(out.read_text())
    # batch 2 comes after the failure, so neither mode tries it
    assert [(r["precision"], r["batch_size"]) for r in report["rows"]] == [("fp32", 1), ("bf16", 1)]
    assert [(x["precision"], x["out_of_memory_batch_size"], x["largest_batch_size"]) for x in report["limits"]] == \
        [("fp32", 1024, 1), ("bf16", 1024, 1)]
    assert "out of memory   -> largest batch that fits: 1" in result.stdout


def test_batch_sizes_double_up_to_the_maximum(tmp_path):
    out = tmp_path / "t.json"
    doubling = [1, 2, 4, 8, 16, 32, 64]
    for argv, sizes in ((["--max-batch-size", "64"], doubling), (["--max-batch-size", "100"], doubling),
                        (["--batch-sizes", "3,5"], [3, 5])):
        mtps.main(FAST + ["--precision", "fp16", "--json-out", str(out), *argv])  # fp16 on the CPU: nothing timed
        assert json.loads(out.read_text())["batch_sizes"] == sizes


def test_bad_arguments_exit_with_a_message_not_a_traceback(tmp_path, capsys):
    for argv in (["--precision", "fp8"], ["--batch-sizes", "1,x"], ["--data", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            mtps.main(FAST + QUICK + argv)
        assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "unknown precision fp8" in err and "comma-separated positive integers" in err


def test_gpu_peak_table_matches_specific_names_before_general_ones():
    # NVIDIA data sheets, dense bf16 tensor TFLOP/s
    assert gpt.peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert gpt.peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert gpt.peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpt.peak_flops_for_name("NVIDIA A10") == 125e12
    assert gpt.peak_flops_for_name("NVIDIA GeForce RTX 3090") == 71e12
    assert gpt.peak_flops_for_name("NVIDIA A10G") is None
    assert gpt.gpu_peak_flops("cpu") is None
    # MFU by hand: a gpt2-small training token costs 6 x 123,532,032 (its matmul weights: 12 layers of
    # 12 x 768^2, plus the 768 x 50,257 head) + 12 x 12 x 768 x 1,024 (attention) = 854,438,400 FLOPs,
    # so 100,000 tokens/s is 85.44 TFLOP/s: 8.64% of an H100's 989
    cfg = gpt.model_config("gpt2-small")
    assert gpt.mfu(1e5, cfg, 989e12) == pytest.approx(85.44384e12 / 989e12)
    assert gpt.mfu(1e5, cfg, None) is None


def test_validation_plan_by_hand():
    """0.25 s a batch: a 2-minute budget fits 480 batches, of which a 300-batch split allows 300, i.e. a
    1.25-minute pass. 3,282,124,800 tokens at 100,000 tokens/s is 32,821.248 s = 547.0208 min of
    training: 54 whole 10-minute stretches, each followed by a pass, 67.5 min of validation in all,
    and 1.25 of every 11.25 minutes (1/9) spent validating."""
    plan = mvt.validation_plan(0.25, 2, 10, 100_000, 3_282_124_800, available_batches=300)
    assert plan == pytest.approx({"batches_in_budget": 480, "batches_per_pass": 300, "pass_minutes": 1.25,
                                  "train_minutes": 547.0208, "passes": 54, "validation_minutes": 67.5,
                                  "validation_share": 1 / 9})
    # without a split to run out of the pass is the whole budget: 2 of every 12 minutes
    plan = mvt.validation_plan(0.25, 2, 10, 100_000, 3_282_124_800)
    assert (plan["batches_per_pass"], plan["validation_minutes"]) == (480, 108.0)
    assert plan["validation_share"] == pytest.approx(1 / 6)
    # 0.7 s a batch: 42 batches take 29.4 s, a 43rd would end at 30.1 s, past a half-minute budget
    assert mvt.validation_plan(0.7, 0.5, 10, 1, 1)["batches_in_budget"] == 42


def test_validation_timing_reports_the_plan_for_its_measured_batch_time(tmp_path, capsys):
    out = tmp_path / "val.json"
    mvt.main(FAST + ["--batch-size", "2", "--eval-batches", "2", "--warmup-batches", "1",
                     "--precision", "fp32", "--budget-minutes", "0.5", "--val-every-minutes", "10",
                     "--train-tokens-per-second", "2000", "--json-out", str(out)])
    r = json.loads(out.read_text())
    assert r["seconds_per_batch"] > 0 and r["train_rate_measured"] is False
    # as many batches as end within the 30 s budget, and no more
    assert r["batches_in_budget"] * r["seconds_per_batch"] <= 30 < (r["batches_in_budget"] + 1) * r["seconds_per_batch"]
    # the run estimated is one of the model measured: tiny (context 32) at 20 tokens per parameter
    with torch.device("meta"):
        tokens = 20 * sum(p.numel() for p in gpt.GPTModel(gpt.model_config("tiny", context_length=32)).parameters())
    assert r["train_minutes"] == pytest.approx(tokens / 2000 / 60)
    # the arithmetic is test_validation_plan_by_hand's; here, that the flags reach it (random tokens: no split)
    plan = mvt.validation_plan(r["seconds_per_batch"], 0.5, 10, 2000, tokens)
    assert {k: r[k] for k in plan} == pytest.approx(plan)
    printed = capsys.readouterr().out
    assert f"fits {r['batches_in_budget']:,} validation batches" in printed
    assert f"{100 * r['validation_share']:.1f}% of the wall-clock time" in printed


@pytest.mark.slow
def test_both_scripts_read_real_batches_from_a_prepared_dataset(tiny_dataset, tmp_path):
    out = tmp_path / "t.json"
    mtps.main(FAST + QUICK + ["--precision", "fp32", "--batch-sizes", "2", "--steps", "1", "--warmup-steps", "0",
                              "--data", str(tiny_dataset), "--json-out", str(out)])
    row, = json.loads(out.read_text())["rows"]
    assert row["tokens_per_second"] > 0 and row["batch_size"] == 2 and row["timed_steps"] == 1
    # The timed step is train.py's second: the fresh model (seed 123, dropout on, seeded per micro-batch
    # as training seeds it) after one AdamW step on sequences 0-1, scored on sequences 2-3. Written out
    # here with torch's AdamW on batches read directly from the shards.
    stream = data.TokenStream(str(tiny_dataset), "train")
    torch.manual_seed(mtps.SEED)
    model = gpt.GPTModel(gpt.model_config("tiny", context_length=32)).train()
    adamw = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    for first in (0, 2):
        tokens = torch.from_numpy(stream.read(first * 32, 2 * 32 + 1).astype("int64"))
        torch.manual_seed((mtps.SEED * 1_000_003 + first) % 2**63)
        logits = model(tokens[:-1].view(2, 32))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:])
        loss.backward()
        adamw.step()
        adamw.zero_grad()
    assert row["last_loss"] == pytest.approx(loss.item(), rel=1e-5)

    out = tmp_path / "v.json"
    mvt.main(FAST + ["--batch-size", "1", "--eval-batches", "2", "--warmup-batches", "0", "--precision", "fp32",
                     "--train-steps", "1", "--train-seconds", "0", "--data", str(tiny_dataset), "--json-out", str(out)])
    r = json.loads(out.read_text())
    expected_available = data.TokenStream(str(tiny_dataset), "val").num_sequences(32)
    assert r["available_batches"] == expected_available
    assert r["batches_per_pass"] == min(expected_available, r["batches_in_budget"])
    assert r["train_rate_measured"] is True and r["train_tokens_per_second"] > 0


def test_the_measured_step_honours_the_recipe(tmp_path):
    """--recipe modern times train.py's modern step: clipping on, matrices-only decay; Muon when asked."""
    out = tmp_path / "m.json"
    mtps.main(FAST + QUICK + ["--recipe", "modern", "--optimizer", "muon", "--precision", "bf16", "--batch-sizes", "2",
                              "--steps", "1", "--warmup-steps", "0", "--grad-accum", "2", "--json-out", str(out)])
    report = json.loads(out.read_text())
    assert report["step"] == {"optimizer": "muon", "fused": False, "compile": False, "grad_clip": 1.0,
                              "decay_matrices_only": True, "grad_accum": 2, "shard_muon": True, "zero1": False}
    row, = report["rows"]
    assert (row["optimizer"], row["grad_accum"]) == ("muon", 2)
    assert row["tokens_per_second"] == pytest.approx(2 * 2 * 32 / row["seconds_per_step"])


def test_book_attention_gives_the_same_logits_as_sdpa():
    cfg = gpt.model_config("tiny")
    torch.manual_seed(0)
    sdpa_model = gpt.GPTModel(cfg).eval()
    book_model = gpt.book_attention_model(cfg)
    missing, unexpected = book_model.load_state_dict(sdpa_model.state_dict(), strict=False)
    assert unexpected == [] and missing == ["trf_blocks.0.att.mask", "trf_blocks.1.att.mask"]  # its own buffers
    book_model.eval()
    assert all(isinstance(b.att, gpt.BookMultiHeadAttention) for b in book_model.trf_blocks)
    assert all(b.att.mask.shape == (128, 128) for b in book_model.trf_blocks)

    tokens = torch.randint(cfg["vocab_size"], (2, 128))
    with torch.no_grad():
        expected, actual = sdpa_model(tokens), book_model(tokens)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_gpu_peak_table_gives_no_peak_for_a_mig_slice_and_the_nvl_h200_its_own():
    # a MIG slice has a fraction of the card's tensor cores; the H200 NVL is a lower-power card
    assert gpt.peak_flops_for_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None
    assert gpt.peak_flops_for_name("NVIDIA H200 NVL") == 835e12
    assert gpt.peak_flops_for_name("NVIDIA H200") == 989e12


@pytest.mark.slow
def test_the_advice_printed_is_a_train_command_that_parses(tmp_path, capsys):
    """Both measure scripts end with flags to paste into train.py, for the model they measured."""
    import shlex
    import train
    report = mtps.main(FAST + QUICK + ["--precision", "fp32", "--batch-sizes", "1,2", "--steps", "1"])
    printed = capsys.readouterr().out
    command = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("to train at that setting"))
    args = train.parse_args(shlex.split(command)[2:])
    assert (args.model, args.context_length, args.batch_size, args.precision) == \
        ("tiny", 32, report["best"]["batch_size"], "fp32")
    r = mvt.main(FAST + ["--batch-size", "3", "--eval-batches", "2", "--precision", "fp32",
                         "--train-tokens-per-second", "2000", "--budget-minutes", "0.2"])
    printed = capsys.readouterr().out
    flags = next(line.split("train.py ... ", 1)[1] for line in printed.splitlines() if "--val-batches" in line)
    args = train.parse_args(["--data", "d", "--run-dir", "r", *shlex.split(flags)])
    # train.py counts batches of 6: the budget's batches of 3 are half as many of those
    assert args.val_batches == r["batches_per_pass"] * 3 // 6 == r["train_val_batches"]


@pytest.mark.slow
def test_ctrl_c_and_sigterm_mid_measurement_end_in_one_line(tmp_path):
    """Stopped while timing (each asked for 10 minutes of it): the shell's status for the signal, 128 + its
    number, and one line saying nothing was kept, the same for Ctrl-C and SIGTERM; no traceback."""
    throughput = ["measure_tokens_per_second.py", *FAST, "--precision", "fp32", "--batch-sizes", "1",
                  "--seconds", "600"]
    validation = ["measure_validation_timing.py", *FAST, "--batch-size", "1", "--eval-batches", "2",
                  "--precision", "fp32", "--train-seconds", "600"]
    for argv, started, signum, name in (
            (throughput, lambda out, err: "settings" in err, signal.SIGINT, "Ctrl-C"),
            (throughput, lambda out, err: "settings" in err, signal.SIGTERM, "SIGTERM"),
            (validation, lambda out, err: out.startswith("evaluation:"), signal.SIGTERM, "SIGTERM")):
        code, _, err = stopping.signal_once_started(tmp_path, argv, started, signum)
        assert code == 128 + signum and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1] == f"{name}: nothing was kept; run the same command again", err[-2000:]
