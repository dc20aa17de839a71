"""train.py on the CPU with the tiny model: loss falls, resume is exact, kills lose nothing (several
processes: test_distributed.py).

References: an uninterrupted run (for every resume, signal and kill test; weights compared bit for
bit), a naive enumeration of the data order, hand-computed LR schedules and token counts, the
uniform-guess loss ln(50257), and the file formats' own readers (json, safetensors, PNG header)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpointing as ckpt
import data
import optim
import plot_losses
import train
import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny preset, 32-token windows, 4 sequences a step: ~15 steps/s on one CPU core; dropout stays on (0.1)
TINY = ["--model", "tiny", "--context-length", "32", "--batch-size", "4", "--val-batches", "2",
        "--device", "cpu", "--lr", "1e-3", "--log-every", "2"]
STEPS = 8


def train_args(data, run, *extra):
    return ["--data", data, "--run-dir", str(run), *TINY, *extra]


def weights(run, which="latest"):
    return load_file(os.path.join(ckpt.resolve_checkpoint(str(run), which), ckpt.MODEL_FILE))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def run_script(args, **kwargs):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.lexists(path):
        if proc.poll() is not None:
            pytest.fail(f"training ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_dataset, tmp_path_factory):
    """The reference: STEPS steps without interruption, validating + checkpointing every 4."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "4"))
    return run


# --- pure pieces ----------------------------------------------------------------------------------

def test_lr_schedule_matches_hand_computed_values():
    # linear warmup over 10 steps: step 0 -> peak/10, step 9 -> peak
    assert train.lr_at(0, 1.0, "cosine", 10, 110, 0.1) == pytest.approx(0.1)
    assert train.lr_at(9, 1.0, "cosine", 10, 110, 0.1) == pytest.approx(1.0)
    # cosine: at the start of decay the peak, halfway the mean of peak and floor, then the floor
    assert train.lr_at(10, 1.0, "cosine", 10, 110, 0.1) == pytest.approx(1.0)
    assert train.lr_at(60, 1.0, "cosine", 10, 110, 0.1) == pytest.approx(0.55)
    assert train.lr_at(85, 1.0, "cosine", 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert train.lr_at(110, 1.0, "cosine", 10, 110, 0.1) == 0.1
    assert train.lr_at(5000, 1.0, "cosine", 10, 110, 0.1) == 0.1
    # the seed: constant, no warmup
    assert [train.lr_at(s, 4e-4, "constant", 0, None, 0.0) for s in (0, 1, 10 ** 6)] == [4e-4] * 3


def test_rates_leave_out_the_compiling_first_step_and_the_validation_time():
    """A slow first step (compiling) and a slow validation must not show up as a slow run: the rate is
    timed steps over the time they took, measured here by hand around each phase."""
    state = training.RunState()
    meter = train.Meter("cpu", state)
    one = torch.tensor(1.0)
    time.sleep(0.3)                      # the first step, compiling
    state.step = 1
    meter.add(one, one)
    meter.restart_clocks(1)
    begin = time.time()
    for _ in range(4):                   # four steps of 50 ms
        time.sleep(0.05)
        state.step += 1
        meter.add(one, one)
    loss, rate, _ = meter.read(state.step, 1000, report_spikes=False)
    training_seconds = time.time() - begin
    time.sleep(0.4)                      # validating and saving
    row = meter.validation_row({"val_loss": 1.0}, 1.0, 1e-3, 1000)
    assert loss == 1.0                   # the first step's loss still counts in the mean
    assert rate == pytest.approx(4000 / training_seconds, rel=0.05)
    assert row["tokens_per_s"] == pytest.approx(4000 / training_seconds, rel=0.05)
    empty = train.Meter("cpu", state)
    assert empty.read(state.step, 1000, report_spikes=False)[1] is None  # no timed step: no rate


def test_each_step_reads_its_own_sequences_whatever_the_process_layout():
    """Naive reference: step s owns sequences [s*G, (s+1)*G); every (rank, micro-step) reads a
    distinct block of B, and together they tile that range exactly."""
    B = 3
    for world, accum in [(1, 1), (1, 4), (2, 2), (4, 1)]:
        G = B * world * accum
        per_rank = [list(data.micro_batch_starts(0, 3, G, rank, B, accum)) for rank in range(world)]
        for step in range(3):
            seen = []
            for starts in per_rank:
                for first in starts[step * accum:(step + 1) * accum]:
                    seen += list(range(first, first + B))
            assert sorted(seen) == list(range(step * G, (step + 1) * G))
    # 1 process x 2 micro-steps and 2 processes x 1 read the same (first sequence) blocks
    one = list(data.micro_batch_starts(24, 1, 12, 0, 6, 2))
    two = [next(data.micro_batch_starts(24, 1, 12, r, 6, 1)) for r in range(2)]
    assert one == two == [24, 30]


def test_defaults_are_the_rtx3090_run_and_recipes_yield_to_flags():
    args = train.parse_args(["--data", "d", "--run-dir", "r"])
    assert (args.recipe, args.model, args.batch_size, args.lr, args.weight_decay, args.beta1, args.beta2) == \
        ("rtx3090", "gpt2-small", 6, 4e-4, 0.1, 0.9, 0.999)
    assert (args.schedule, args.grad_clip, args.precision, args.val_minutes, args.val_batches) == \
        ("constant", 0.0, "fp16", 30.0, 3200)
    assert train.choose_batch_layout(args, 6, 1024, 1) == (6, 1, 6)
    modern = train.parse_args(["--data", "d", "--run-dir", "r", "--recipe", "modern", "--lr", "1e-3"])
    assert (modern.lr, modern.beta2, modern.schedule, modern.precision, modern.grad_clip, modern.batch_size) == \
        (1e-3, 0.95, "cosine", "bf16", 1.0, "auto")
    # 524,288 tokens a step = 512 sequences of 1,024: on 8 GPUs at 16 a micro-batch, 4 micro-steps
    assert train.choose_batch_layout(modern, 16, 1024, 8) == (16, 4, 512)
    explicit = train.parse_args(["--data", "d", "--run-dir", "r", "--recipe", "modern", "--grad-accum", "2"])
    assert train.choose_batch_layout(explicit, 6, 1024, 8) == (6, 2, 96)


def test_a_step_size_the_batch_cannot_hit_exactly_is_refused():
    """An earlier version rounded: 524,288 tokens on 8 GPUs at a micro-batch of 6 silently became 540,672."""
    modern = train.parse_args(["--data", "d", "--run-dir", "r", "--recipe", "modern"])
    with pytest.raises(SystemExit, match=r"524,288 is 512 sequences of 1024 tokens, which 6 per micro-batch x 8 "
                                         r"process\(es\) = 48 does not divide; choose --batch-size 8, 16, 32, 64 or auto"):
        train.choose_batch_layout(modern, 6, 1024, 8)
    odd = train.parse_args(["--data", "d", "--run-dir", "r", "--tokens-per-step", "1000"])
    with pytest.raises(SystemExit, match="not a whole number of 1024-token sequences"):
        train.choose_batch_layout(odd, 6, 1024, 1)


def test_resuming_on_another_number_of_processes_keeps_the_global_batch():
    args = train.parse_args(["--data", "d", "--run-dir", "r", "--batch-size", "4"])
    saved = {"sequences_per_step": 16, "batch_size": 4, "grad_accum": 2, "world_size": 2}
    assert train.choose_batch_layout(args, 4, 32, 1, saved) == (4, 4, 16)   # 1 process accumulates 4
    assert train.choose_batch_layout(args, 4, 32, 4, saved) == (4, 1, 16)   # 4 processes, 1 each
    with pytest.raises(SystemExit, match="16 sequences a step, which 4 per micro-batch x 8 process"):
        train.choose_batch_layout(args, 4, 32, 8, saved)
    explicit = train.parse_args(["--data", "d", "--run-dir", "r", "--batch-size", "4", "--grad-accum", "1"])
    with pytest.raises(SystemExit, match="--grad-accum 1 would change the run's 16 sequences a step"):
        train.choose_batch_layout(explicit, 4, 32, 1, saved)


def test_validation_covers_the_same_sequences_whatever_the_micro_batch():
    # the RTX 3090 run's 3,200 batches of 6 = 19,200 sequences, in batches as large as the micro-batch allows
    assert train.validation_layout(3200, 6, 10**6) == (3200, 6)
    assert train.validation_layout(3200, 32, 10**6) == (600, 32)
    assert train.validation_layout(3200, 7, 10**6) == (3200, 6)     # 19,200 is not a multiple of 7
    assert train.validation_layout(2, 4, 10**6) == (3, 4)
    # a short val split: its whole multiples of 6 sequences
    assert train.validation_layout(3200, 32, 941) == (36, 26)  # 936 = 36 x 26


# --- training -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_loss_falls_on_real_text_and_the_chart_is_drawn(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", "40", "--val-every", "20", "--lr", "3e-3"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert [r["tokens_seen"] for r in rows] == [0, 20 * 4 * 32, 40 * 4 * 32]
    uniform = math.log(50257)  # the loss of guessing every token equally likely
    # step 0 is the untrained model: near the uniform guess (the book's init gives logits of std ~0.6)
    assert rows[0]["train_loss"] is None and abs(rows[0]["val_loss"] - uniform) < 0.5
    rows = rows[1:]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < uniform
    assert rows[-1]["val_loss"] < uniform - 3.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # the chart: a PNG whose IHDR says FIGSIZE x DPI pixels
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (plot_losses.FIGSIZE[0] * plot_losses.DPI, plot_losses.FIGSIZE[1] * plot_losses.DPI)
    # best = lowest val loss, here the last one
    assert ckpt.load_model(str(run))[1]["step"] == 40


def test_resume_is_bit_identical_to_a_uninterrupted_run(tiny_dataset, uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS // 2), "--val-every", "4"))
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "4", "--resume", "latest"))
    assert_same_weights(weights(run), weights(uninterrupted_run))
    same = ("step", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm")
    rows = lambda r: [{k: row[k] for k in same} for row in map(json.loads, open(r / "metrics.jsonl"))]
    assert rows(run) == rows(uninterrupted_run)
    config = json.load(open(run / "config.json"))
    assert [s["start_step"] for s in config["sessions"]] == [0, STEPS // 2]


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_0(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = run_script(["train.py", *train_args(tiny_dataset, run, "--val-every", "5")])
    wait_for(run / "checkpoints" / "latest", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    stopped_at = ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))["step"]
    assert stopped_at >= 5
    # continue 2 more steps; an uninterrupted run to the same step (other validation cadence) must match
    end = stopped_at + 2
    train.main(train_args(tiny_dataset, run, "--val-every", "5", "--max-steps", str(end), "--resume", "latest"))
    reference = tmp_path / "reference"
    train.main(train_args(tiny_dataset, reference, "--max-steps", str(end), "--val-every", "1000"))
    assert_same_weights(weights(run), weights(reference))


@pytest.mark.slow
def test_kill_9_while_checkpointing_then_resume_latest(tiny_dataset, uninterrupted_run, tmp_path):
    """Checkpoint every step, so a SIGKILL lands in or near a save; resuming must still reach the
    uninterrupted run's weights, and only the newest --keep-last checkpoints (and best) stay resumable."""
    run = tmp_path / "run"
    proc = run_script(["train.py", *train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "1",
                                               "--keep-last", "2")])
    wait_for(run / "checkpoints" / "latest", proc)
    # then kill it the moment a save is under way (its temporary folder exists)
    while proc.poll() is None and not any(n.startswith(ckpt.TMP_PREFIX) for n in os.listdir(run / "checkpoints")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "1", "--keep-last", "2",
                          "--resume", "latest"))
    assert_same_weights(weights(run), weights(uninterrupted_run))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(0, STEPS + 1))  # step 0, then none lost, none repeated
    best_step = min(rows, key=lambda r: r["val_loss"])["step"]
    for step, folder in ckpt.list_checkpoints(str(run)):
        resumable = ckpt.TRAIN_STATE_FILE in os.listdir(folder)
        assert resumable == (step > STEPS - 2 or step == best_step), step
        assert ckpt.MODEL_FILE in os.listdir(folder)
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(ckpt.TMP_PREFIX)]


@pytest.mark.slow
def test_resume_latest_skips_a_partial_write_and_a_damaged_newest_checkpoint(tiny_dataset, uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    root = run / "checkpoints"
    # what a kill -9 in the middle of saving step 12 leaves: a temporary folder, half a file
    partial = root / f"{ckpt.TMP_PREFIX}step-00000012-4242"
    partial.mkdir()
    (partial / ckpt.MODEL_FILE).write_bytes(b"\x00" * 1000)
    # and the newest complete-looking checkpoint (step 8, where latest points) is damaged
    damaged = root / ckpt.STEP_DIR.format(STEPS) / ckpt.TRAIN_STATE_FILE
    damaged.write_bytes(damaged.read_bytes()[:-100])
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "4", "--resume", "latest"))
    # it went back to step 4, retrained 4 steps and rewrote step 8: identical to the original
    assert_same_weights(weights(run), weights(uninterrupted_run))
    assert ckpt.read_meta(str(root / ckpt.STEP_DIR.format(STEPS)))["files"][ckpt.TRAIN_STATE_FILE] > 0
    assert not partial.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dataset, uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    with pytest.raises(SystemExit, match="not finite"):
        train.main(train_args(tiny_dataset, run, "--max-steps", "20", "--val-every", "4", "--log-every", "1",
                              "--lr", "1e30", "--allow-setting-change", "--resume", "latest"))
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [4, STEPS]
    assert_same_weights(weights(run), weights(uninterrupted_run))


@pytest.mark.slow
def test_resume_refuses_another_model_or_dataset(tiny_dataset, uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    with pytest.raises(SystemExit, match=r"--emb-dim 32 \(the run has None\)"):
        train.main(train_args(tiny_dataset, run, "--emb-dim", "32", "--resume", "latest"))
    with pytest.raises(SystemExit, match=r"emb_dim=32 \(checkpoint: 64\)"):  # allowed, the weights still differ
        train.main(train_args(tiny_dataset, run, "--emb-dim", "32", "--allow-setting-change", "--resume", "latest"))
    other = tmp_path / "other_data"
    shutil.copytree(tiny_dataset, other)
    manifest = json.load(open(other / "manifest.json"))
    manifest["note"] = "another dataset"
    json.dump(manifest, open(other / "manifest.json", "w"))
    with pytest.raises(SystemExit, match="--allow-dataset-change"):
        train.main(train_args(str(other), run, "--resume", "latest"))
    train.main(train_args(str(other), run, "--resume", "latest", "--allow-dataset-change",
                          "--max-steps", str(STEPS + 1)))
    assert ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))["next_sequence"] == 4  # new data's start + 1 step


def test_a_new_run_will_not_overwrite_checkpoints(tiny_dataset, uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    with pytest.raises(SystemExit, match="already has checkpoints.*--resume latest"):
        train.main(train_args(tiny_dataset, run, "--max-steps", "2"))
    assert_same_weights(weights(run), weights(uninterrupted_run))


def test_run_folder_holds_only_json_safetensors_and_png(uninterrupted_run):
    """No pickle anywhere: every file parses as what its name says."""
    seen = set()
    for root, _, files in os.walk(uninterrupted_run):
        for name in files:
            path = os.path.join(root, name)
            ext = name.rsplit(".", 1)[-1]
            seen.add(ext)
            if ext == "json":
                json.load(open(path))
            elif ext == "jsonl":
                [json.loads(line) for line in open(path)]
            elif ext == "safetensors":
                with safe_open(path, framework="pt") as f:
                    assert list(f.keys())
            elif ext == "png":
                assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
            else:
                pytest.fail(f"unexpected file {path}")
    assert seen == {"json", "jsonl", "safetensors", "png"}
    for pointer in ("latest", "best"):
        assert os.path.islink(os.path.join(uninterrupted_run, "checkpoints", pointer))


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    """training_state -> checkpoint files -> restore_training_state gives an optimizer whose next
    step equals the original's (reference: the original optimizer object)."""
    import gpt
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.model_config("tiny", context_length=8, drop_rate=0.0))
    opts = optim.build_optimizers(model, 1e-3, 0.1, (0.9, 0.95), True, False, "adamw", 0.02, 0.0, False, False,
                                  False)
    idx = torch.randint(0, 50257, (2, 8))
    for _ in range(2):
        model(idx).logsumexp(-1).mean().backward()
        opts[0].step()
        opts[0].zero_grad()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tensors, doc = ckpt.training_state(opts, scaler, {"train_loss_sum": 1.5, "train_loss_steps": 2})
    ckpt.save_checkpoint(tmp_path / "ck", model, {"step": 2}, tensors, doc)

    torch.manual_seed(1)  # a different init, replaced by the checkpoint
    restored = gpt.GPTModel(gpt.model_config("tiny", context_length=8, drop_rate=0.0))
    restored.load_state_dict(load_file(str(tmp_path / "ck" / ckpt.MODEL_FILE)))
    restored_opts = optim.build_optimizers(restored, 1e-3, 0.1, (0.9, 0.95), True, False, "adamw", 0.02, 0.0, False,
                                           False, False)
    state = ckpt.restore_training_state(str(tmp_path / "ck"), ckpt.read_meta(str(tmp_path / "ck")),
                                         restored_opts, scaler)
    assert (state["train_loss_sum"], state["train_loss_steps"]) == (1.5, 2)
    original, loaded = opts[0].state_dict(), restored_opts[0].state_dict()
    assert original["state"].keys() == loaded["state"].keys()
    for pid in original["state"]:
        for key, value in original["state"][pid].items():
            assert torch.equal(loaded["state"][pid][key], value), (pid, key)
    for m, o in ((model, opts[0]), (restored, restored_opts[0])):
        m(idx).logsumexp(-1).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_plot_losses_overlays_runs(uninterrupted_run, tmp_path, capsys):
    out = tmp_path / "compare.png"
    plot_losses.main([str(uninterrupted_run), str(uninterrupted_run), "--labels", "a", "b", "--out", str(out), "--x", "steps"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = min(json.loads(line)["val_loss"] for line in open(uninterrupted_run / "metrics.jsonl"))
    assert f"a: lowest val loss {best:.4f}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot_losses.main([str(tmp_path)])


@pytest.mark.slow
def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tiny_dataset, uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "2"))
    older = ckpt.resolve_checkpoint(str(run), "step-00000004")
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "4", "--resume", older))
    # the new branch ends where an uninterrupted run ends ...
    assert_same_weights(weights(run), weights(uninterrupted_run))
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [2, 4, 8]
    # ... and the old branch's steps 6 and 8 are kept, untouched, beside it
    aside = [d for d in os.listdir(run / "checkpoints") if d.startswith("abandoned-")]
    assert len(aside) == 1
    assert sorted(os.listdir(run / "checkpoints" / aside[0])) == ["step-00000006", "step-00000008"]


# --- faults: two runs on one folder, stale pointers, early signals, bad values ----------------------

def wait_for_line(proc, text, timeout=120):
    """Read the process's output until a line holds `text`; returns what was read."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        if time.time() > deadline:
            break
    proc.kill()
    pytest.fail(f"no line with {text!r} within {timeout} s:\n{''.join(seen)}")


@pytest.mark.slow
def test_a_second_train_on_the_same_run_folder_is_refused_while_the_first_lives(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    long_run = ["train.py", *train_args(tiny_dataset, run, "--max-steps", "100000", "--val-every", "50000")]
    first = run_script(long_run)
    try:
        wait_for_line(first, "step 0: val loss")  # it holds the folder and is training
        second = subprocess.run([sys.executable, *long_run], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert second.stderr.strip().splitlines() == [second.stderr.strip()]  # one line, no traceback
        assert f"is in use by train.py pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one is untouched
    finally:
        first.kill()
        first.wait()
    # killed with SIGKILL, the first leaves no lock behind that blocks the folder
    train.main(train_args(tiny_dataset, run, "--max-steps", "2", "--val-every", "2"))
    assert ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))["step"] == 2


def test_resume_latest_takes_the_newest_complete_checkpoint_over_a_stale_pointer(uninterrupted_run, tmp_path):
    """A kill between a checkpoint's rename and the pointer's swap leaves `latest` one behind."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    ckpt.set_pointer(str(run), "latest", str(run / "checkpoints" / "step-00000004"))
    folder, meta = ckpt.find_resume_checkpoint(str(run), "latest")
    assert os.path.basename(folder) == "step-00000008" and meta["step"] == 8


def test_resume_best_without_a_best_checkpoint_and_a_garbage_pointer_say_what_is_wrong(uninterrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    os.remove(run / "checkpoints" / "best")
    with pytest.raises(ckpt.CheckpointError, match="none is marked best yet"):
        ckpt.find_resume_checkpoint(str(run), "best")
    (run / "checkpoints" / "best").write_text("not json")
    with pytest.raises(ckpt.CheckpointError, match="is not a checkpoint pointer"):
        ckpt.resolve_checkpoint(str(run), "best")


@pytest.mark.slow
def test_a_signal_during_start_up_exits_0_in_one_line(tiny_dataset, tmp_path):
    """SIGTERM before the first step (start-up, the step-0 validation) used to kill with status 143."""
    run = tmp_path / "run"
    proc = run_script(["train.py", *train_args(tiny_dataset, run, "--max-steps", "50", "--val-every", "50")])
    wait_for_line(proc, "model:")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "SIGTERM before the first step: nothing new to save" in out or "SIGTERM: saved" in out


@pytest.mark.parametrize("flags, message", [
    (["--context-length", "0"], "--context-length: must be at least 1, not 0"),
    (["--n-heads", "0"], "--n-heads: must be at least 1"),
    (["--emb-dim", "0"], "--emb-dim: must be at least 1"),
    (["--n-layers", "-1"], "--n-layers: must be at least 1"),
    (["--drop-rate", "1.5"], "--drop-rate: must be at least 0 and below 1"),
    (["--beta1", "1.5"], "--beta1: must be at least 0 and below 1"),
    (["--lr", "nan"], "--lr: must be above 0, not nan"),
    (["--lr", "inf"], "--lr: must be above 0, not inf"),
    (["--weight-decay", "-1"], "--weight-decay: must be at least 0"),
    (["--min-lr", "-1"], "--min-lr: must be at least 0"),
    (["--decay-steps", "-10"], "--decay-steps: must be at least 1, not -10"),
])
def test_bad_values_are_refused_by_name_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--data", "d", "--run-dir", "r", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_dir_that_is_a_file_and_a_manifest_without_splits_end_in_one_line(tiny_dataset, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --run-dir .*file is a file, not a folder"):
        train.main(train_args(tiny_dataset, tmp_path / "file"))
    broken = tmp_path / "data"
    shutil.copytree(tiny_dataset, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["splits"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"^error: .*manifest.json is not a .* manifest with splits"):
        train.main(train_args(str(broken), tmp_path / "run"))


def test_runs_overlaid_without_out_are_drawn_under_out_which_git_ignores(uninterrupted_run, tmp_path, monkeypatch):
    """Not in the repo's root. (That a short run on the default time cadence still draws a curve, rather
    than two points, is test_constants' MIN_VALIDATIONS check.)"""
    monkeypatch.chdir(tmp_path)
    plot_losses.main([str(uninterrupted_run), str(uninterrupted_run)])
    assert (tmp_path / "out" / "loss_comparison.png").is_file()
    assert "/out/" in open(os.path.join(REPO, ".gitignore")).read().split()


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_ends_in_one_line_and_keeps_the_previous_checkpoint(tiny_dataset, tmp_path):
    """The fault: files may grow to 30 MB only (RLIMIT_FSIZE), so the tiny model's weights (26 MB) fit
    and its AdamW state (52 MB) does not, as on a nearly full disk."""
    import resource
    run = tmp_path / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", "2", "--val-every", "2"))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (30 * 2**20, 30 * 2**20))

    result = subprocess.run([sys.executable, "train.py", *train_args(tiny_dataset, run, "--max-steps", "4",
                                                                      "--val-every", "2", "--resume", "latest")],
                            cwd=REPO, preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write the checkpoint") and "GiB free" in last
    assert "Traceback" not in result.stderr
    names = os.listdir(run / "checkpoints")
    assert not [n for n in names if n.startswith(ckpt.TMP_PREFIX)], names  # nothing half-written left behind
    assert ckpt.find_resume_checkpoint(str(run), "latest")[1]["step"] == 2


def flip_a_byte(path, offset_from_end=100):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))


def test_bit_rot_in_a_shard_stops_training_naming_the_file(tiny_dataset, tmp_path):
    damaged = tmp_path / "data"
    shutil.copytree(tiny_dataset, damaged)
    flip_a_byte(damaged / "train-00001.safetensors")  # the file still parses: only its hash can tell
    with pytest.raises(SystemExit, match=r"^error: .*train-00001.safetensors is damaged: its sha256 differs"):
        train.main(train_args(str(damaged), tmp_path / "run", "--max-steps", "20", "--val-every", "20"))
    flip_a_byte(damaged / "train-00001.safetensors")  # mended
    flip_a_byte(damaged / "val-00000.safetensors")
    with pytest.raises(SystemExit, match=r"^error: .*val-00000.safetensors is damaged"):
        train.main(train_args(str(damaged), tmp_path / "run2", "--max-steps", "2"))


def test_bit_rot_in_a_checkpoint_is_caught_and_resume_falls_back(uninterrupted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    flip_a_byte(run / "checkpoints" / "step-00000008" / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000008/model.safetensors is damaged"):
        ckpt.load_model(str(run / "checkpoints" / "step-00000008"))
    folder, meta = ckpt.find_resume_checkpoint(str(run), "latest")
    assert meta["step"] == 4
    assert "step-00000008/model.safetensors is damaged" in capsys.readouterr().err


@pytest.mark.slow
def test_resuming_one_checkpoint_in_fresh_processes_is_bit_identical_every_time(tiny_dataset, uninterrupted_run, tmp_path):
    """The CPU promise, kept: every resume from the same checkpoint, each in its own process (with
    its own memory layout), ends on exactly the uninterrupted run's weights."""
    half = tmp_path / "half"
    train.main(train_args(tiny_dataset, half, "--max-steps", str(STEPS // 2), "--val-every", "4"))
    for i in range(2):
        run = tmp_path / f"resumed-{i}"
        shutil.copytree(half, run, symlinks=True)
        done = subprocess.run([sys.executable, "train.py", *train_args(tiny_dataset, run, "--max-steps", str(STEPS),
                                                                        "--val-every", "4", "--resume", "latest")],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_same_weights(weights(run), weights(uninterrupted_run))


@pytest.mark.slow
def test_a_second_ctrl_c_while_saving_waits_for_the_save(tiny_dataset, tmp_path):
    """It used to abort the stop-save with a KeyboardInterrupt traceback, losing the interval."""
    run = tmp_path / "run"
    bigger = ["--emb-dim", "256", "--n-layers", "4"]  # ~30M parameters: a save takes long enough to hit
    proc = run_script(["train.py", *train_args(tiny_dataset, run, *bigger, "--max-steps", "1000", "--val-every", "1000")])
    wait_for_line(proc, "step 0: val loss")
    time.sleep(2)  # a few steps in
    proc.send_signal(signal.SIGINT)
    root, deadline = run / "checkpoints", time.time() + 120
    while not any(n.startswith(ckpt.TMP_PREFIX + "step") for n in os.listdir(root)) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)  # during the save
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "still saving the checkpoint" in out
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))
    assert meta["step"] >= 1 and ckpt.TRAIN_STATE_FILE in meta["files"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA")
def test_an_nvidia_gpu_that_torch_cannot_use_stops_the_default_device_in_one_line(tiny_dataset, tmp_path,
                                                                                   monkeypatch):
    """PyPI's torch built for a newer CUDA than the driver: torch sees no GPU, and --device auto must not
    quietly train on the CPU. A stand-in nvidia-smi reports an RTX 3090 on driver 550."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 3090, 550.54.15'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    auto = [a for a in train_args(tiny_dataset, tmp_path / "auto", "--max-steps", "2") if a not in ("--device", "cpu")]
    for script, argv in (("train.py", auto), ("measure_tokens_per_second.py", ["--model", "tiny", "--steps", "1"])):
        result = subprocess.run([sys.executable, script, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode != 0, script
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: this machine has NVIDIA GeForce RTX 3090"), result.stderr
        assert "driver 550.54.15" in lines[0] and f"torch {torch.__version__}" in lines[0]
        assert "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126" in lines[0]
    assert not (tmp_path / "auto").exists()  # refused before the run folder was made
    monkeypatch.setenv("PATH", env["PATH"])  # --device cpu on purpose trains, here in this process
    train.main(train_args(tiny_dataset, tmp_path / "cpu", "--max-steps", "2", "--val-every", "2"))
    assert [json.loads(line)["step"] for line in open(tmp_path / "cpu" / "metrics.jsonl")] == [0, 2]


@pytest.mark.slow
def test_a_run_folder_resumes_with_no_other_flag_bit_identically(tiny_dataset, uninterrupted_run, tmp_path):
    """A crash after step 4's checkpoint: `--run-dir R --resume latest` alone takes every setting (and the
    dataset) from R/config.json and ends on the uninterrupted run's weights."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    shutil.rmtree(run / "checkpoints" / ckpt.STEP_DIR.format(STEPS))  # as if killed before this save
    train.main(["--run-dir", str(run), "--resume", "latest"])
    assert_same_weights(weights(run), weights(uninterrupted_run))
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [0, 4, STEPS]


@pytest.mark.slow
def test_a_changed_setting_on_resume_is_refused_naming_both_values_unless_allowed(tiny_dataset, uninterrupted_run,
                                                                                   tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, symlinks=True)
    with pytest.raises(SystemExit) as refused:
        train.main(["--run-dir", str(run), "--resume", "latest", "--lr", "0.002", "--max-steps", str(STEPS + 2)])
    assert "--lr 0.002 (the run has 0.001)" in str(refused.value) and "--allow-setting-change" in str(refused.value)
    assert json.loads(open(run / "metrics.jsonl").readlines()[-1])["step"] == STEPS  # nothing ran
    train.main(["--run-dir", str(run), "--resume", "latest", "--lr", "0.002", "--allow-setting-change",
                "--max-steps", str(STEPS + 2), "--val-every", "2"])
    printed = capsys.readouterr().out
    assert "--max-steps 10 (the run had 8)" in printed  # bookkeeping: taken and said
    assert "--lr 0.002 (the run had 0.001): a change to the run's mathematics" in printed
    config = json.load(open(run / "config.json"))
    last = config["sessions"][-1]
    assert (last["start_step"], last["setting_changes"]["lr"]) == (STEPS, [0.001, 0.002])
    assert config["arguments"]["lr"] == 0.002  # the next resume continues with the new value
    optimizer_lr = ckpt.read_meta(ckpt.resolve_checkpoint(str(run), "latest"))["training"]["lr"]
    assert optimizer_lr == 0.002


@pytest.mark.slow
def test_older_checkpoints_keep_weights_for_keep_weights_validations_and_the_disk_use_is_said(
        tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", str(STEPS), "--val-every", "1", "--keep-last", "2",
                          "--keep-weights", "2"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # every validation's numbers stay
    best = min(rows[1:], key=lambda r: r["val_loss"])["step"]
    kept = {step: ckpt.TRAIN_STATE_FILE in os.listdir(folder) for step, folder in ckpt.list_checkpoints(str(run))}
    # by hand: steps 7, 8 resumable; 5, 6 weights only; 1-4 deleted, unless one of them is best (kept whole)
    expected = {7: True, 8: True, 5: False, 6: False}
    expected.setdefault(best, True)
    assert kept == expected
    # the start-up line, against the sizes of the files the run wrote
    folder = ckpt.step_folder(str(run), STEPS)
    weights_bytes = os.path.getsize(os.path.join(folder, ckpt.MODEL_FILE))
    full_bytes = weights_bytes + os.path.getsize(os.path.join(folder, ckpt.TRAIN_STATE_FILE))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("disk: "))
    said = float(line.split("at most ")[1].split(" GB")[0])
    assert said == pytest.approx(((2 + 2) * full_bytes + 2 * weights_bytes) / 1e9, rel=0.02)
    assert "GB available in" in line


@pytest.mark.slow
def test_a_run_folder_on_a_disk_too_small_for_two_checkpoints_is_refused_before_training(tiny_dataset, tmp_path):
    """A model whose two checkpoints (fp32 weights + AdamW's two moments) outsize this disk's free space,
    by hand; the address space is capped, so building it by mistake fails instead of swapping."""
    import resource
    free = shutil.disk_usage(tmp_path).free
    per_layer = 12 * 1600 ** 2 * 4 * 3   # a gpt2-xl block's matrices: weights + 2 AdamW moments, fp32
    layers = int(1.5 * free / (2 * per_layer)) + 1
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--data", tiny_dataset, "--run-dir", str(run), "--device", "cpu",
                             "--model", "gpt2-xl", "--n-layers", str(layers), "--context-length", "32"],
                            cwd=REPO, preexec_fn=cap, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "less than two of this run's" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists()


def made_up_hellaswag(path, n=24):
    """HellaSwag-format items (a context, four endings, a label) written as hellaswag_val.jsonl."""
    subjects = ["The cat", "A man", "The river", "Our teacher", "The old car", "My sister"]
    endings = ["sat on the mat and slept.", "went to the market to buy bread.", "flowed quietly past the town.",
               "explained the lesson again.", "would not start this morning.", "played the piano all evening."]
    with open(path, "w") as f:
        for i in range(n):
            choices = [endings[(i + k) % len(endings)] for k in range(4)]
            f.write(json.dumps({"ctx": f"{subjects[i % len(subjects)]} was tired, so it", "endings": choices,
                                "label": i % 4}) + "\n")
    return str(path)


@pytest.mark.slow
def test_hellaswag_and_an_eval_set_are_scored_at_every_validation_as_evaluate_py_scores_them(
        tiny_dataset, tmp_path, monkeypatch, capsys):
    import evaluate
    import reference
    # Giles Thomas's test windows, moved to where the tiny dataset has tokens and shrunk to its context.
    monkeypatch.setitem(reference.EVAL_SETS, "gpjt-test", {**reference.EVAL_SETS["gpjt-test"], "offset": 1_000,
                                                          "batch_size": 2, "context_length": 32, "batches": 3})
    items = made_up_hellaswag(tmp_path / "hellaswag_val.jsonl")
    run = tmp_path / "run"
    train.main(train_args(tiny_dataset, run, "--max-steps", "8", "--val-every", "4", "--keep-weights", "all",
                          "--hellaswag", items, "--hellaswag-items", "20", "--eval-set", "gpjt-test"))
    assert "each validation takes val loss" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 4, 8]
    for row in rows[1:]:  # the untrained model has no checkpoint
        folder = ckpt.step_folder(str(run), row["step"])
        evaluate.main(["hellaswag", "--checkpoint", folder, "--file", items, "--limit", "20", "--device", "cpu",
                       "--json"])
        assert row["hellaswag_acc_norm"] == json.loads(capsys.readouterr().out)["acc_norm"]
        evaluate.main(["loss", "--checkpoint", folder, "--data", tiny_dataset, "--eval-set", "gpjt-test",
                       "--device", "cpu", "--json"])
        assert row["gpjt-test_loss"] == pytest.approx(json.loads(capsys.readouterr().out)["loss"], abs=1e-6)
    assert os.path.getsize(run / "loss.png") > 0


def test_a_bad_hellaswag_file_or_eval_set_is_refused_before_the_run_folder_is_made(tiny_dataset, tmp_path, capsys):
    bad = tmp_path / "three_endings.jsonl"
    bad.write_text(json.dumps({"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}) + "\n")
    for flags, message in ((["--hellaswag", str(bad)], "4 endings"), (["--eval-set", "gpjt-test"], "50,000,000")):
        with pytest.raises(SystemExit) as e:
            train.main(train_args(tiny_dataset, tmp_path / "run", "--max-steps", "2", *flags))
        assert message in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "run").exists()
