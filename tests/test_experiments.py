"""Seed groups, their statistics, the grouped chart, TensorBoard logging and the ablation runner, against
hand computations, tensorboard's own event reader and runs trained here."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import checkpointing as ckpt
import experiments
import plot_losses
import recipes
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--context-length", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu"]


def fake_run(folder, training_settings, model_config=None, sessions=()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"training": training_settings, "model_config": model_config or {"emb_dim": 64},
                   "sessions": list(sessions)}, f)
    return str(folder)


def test_runs_that_differ_only_in_how_they_ran_form_one_group_labelled_by_what_differs(tmp_path):
    base = {**{k: "train.py's" for k in recipes.RECIPES["modern"]}, "recipe": "rtx3090", "lr": 4e-4, "seed": 1, "device": "cuda:0", "batch_size": 6, "grad_accum": 1,
            "world_size": 1, "sequences_per_step": 6, "drop_rate": 0.1}
    runs = [fake_run(tmp_path / "a1", base),
            fake_run(tmp_path / "a2", {**base, "seed": 2, "device": "cuda:1", "batch_size": 3, "grad_accum": 2}),
            fake_run(tmp_path / "b1", {**base, "lr": 1e-3}),
            fake_run(tmp_path / "m1", {**base, "recipe": "modern", **recipes.RECIPES["modern"], "seed": 7}),
            "gpt2"]
    groups = experiments.group_runs(runs, recipes.RECIPES)
    assert [g["members"] for g in groups] == [[0, 1], [2], [3], [4]]
    # the model flags are replaced by the model config they resolved to (drop_rate moved there)
    labels = [g["label"] for g in groups]
    assert labels[0] == "lr=0.0004, recipe=rtx3090" and labels[1] == "lr=0.001, recipe=rtx3090"
    assert labels[2] == "recipe=modern" and labels[3] == "gpt2"  # modern's own defaults are not listed
    assert experiments.run_labels(runs[:2]) == ["seed=1", "seed=2"]


def test_noise_statistics_equal_a_hand_computation():
    mean, std, n = experiments.mean_and_std([3.70, 3.68, 3.72])
    assert (mean, n) == (pytest.approx(3.70), 3)
    assert std == pytest.approx(math.sqrt(((0.0) ** 2 + 0.02 ** 2 + 0.02 ** 2) / 2))  # sample std: n - 1
    difference, error = experiments.difference_with_error([3.60, 3.64], [3.70, 3.68, 3.72])
    assert difference == pytest.approx(3.62 - 3.70)
    assert error == pytest.approx(math.sqrt(statistics.variance([3.60, 3.64]) / 2 + statistics.variance([3.70, 3.68, 3.72]) / 3))
    assert experiments.difference_with_error([3.6], [3.7, 3.8])[1] is None  # one run says nothing of its noise


def test_chart_helpers_mean_band_resume_points_and_references(tmp_path):
    xs, means, stds = plot_losses.across_runs([{0: 10.0, 2: 9.0, 4: 8.0}, {0: 11.0, 2: 8.0}])
    assert (xs, means) == ([0, 2], [10.5, 8.5]) and stds == pytest.approx([math.sqrt(0.5)] * 2)
    run = fake_run(tmp_path / "r", {"tokens_per_step": 1024}, sessions=[{"start_step": 0}, {"start_step": 300}])
    assert plot_losses.resume_points(run, "tokens_seen") == [300 * 1024]
    assert plot_losses.resume_points(run, "step") == [300]
    assert plot_losses.parse_reference("GPT-2 small=3.50") == ("GPT-2 small", 3.5)
    assert plot_losses.parse_reference("3.28") == ("", 3.28)


# --- runs trained here ----------------------------------------------------------------------------

@pytest.mark.slow
def test_tensorboard_events_read_back_equal_metrics_jsonl_and_a_resume_continues_them(tiny_dataset, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    common = ["--data", tiny_dataset, "--run-dir", str(run), *TINY, "--val-every", "2", "--log", "tensorboard"]
    train.main(common + ["--max-steps", "4"])
    train.main(common + ["--max-steps", "6", "--resume", "latest"])
    reader = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    reader.Reload()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    for field in ("val_loss", "train_loss", "lr", "grad_norm", "tokens_seen"):
        logged = [(e.step, e.value) for e in reader.Scalars(f"metrics/{field}")]
        expected = [(r["step"], r[field]) for r in rows if r[field] is not None]
        assert [s for s, _ in logged] == [s for s, _ in expected], field
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), field  # float32 events
    assert [e.step for e in reader.Scalars("train/loss")] == [2, 4, 6]  # each --log-every 10 update, and validations
    assert "config" in "".join(reader.Tags()["tensors"])


@pytest.mark.slow
def test_the_runner_killed_midway_finishes_the_rest_on_restart_without_redoing_runs(tiny_dataset, tmp_path):
    plan = {"out": str(tmp_path / "out"), "seeds": [1, 2], "variants": {"base": [], "fast": ["--lr", "2e-3"]},
            "train": ["--data", tiny_dataset, *TINY, "--max-steps", "6", "--val-every", "2"],
            "compare": ["--data", tiny_dataset, "--context-length", "32", "--max-batches", "4", "--device", "cpu"]}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    command = [sys.executable, "run_ablations.py", str(plan_file)]
    first = tmp_path / "out" / "base" / "seed-1"
    second = tmp_path / "out" / "fast" / "seed-1"
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not os.path.lexists(second / "checkpoints" / "latest") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its train.py, mid-queue
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the queue finished before it could be killed"
    finished = ckpt.resolve_checkpoint(str(first), "latest")
    written = os.path.getmtime(os.path.join(finished, ckpt.MODEL_FILE))

    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[1/4] base, seed 1: done" in out.stdout and "[2/4] fast, seed 1: resume" in out.stdout
    assert os.path.getmtime(os.path.join(finished, ckpt.MODEL_FILE)) == written  # not redone
    sessions = lambda run: len(json.load(open(run / "config.json"))["sessions"])
    assert (sessions(first), sessions(second)) == (1, 2)

    # the grouped table: per group mean and sample std of the runs' own losses, computed here
    runs = [os.path.join(plan["out"], v, f"seed-{s}") for s in plan["seeds"] for v in plan["variants"]]
    for run in runs:
        assert ckpt.read_meta(ckpt.resolve_checkpoint(run, "latest"))["step"] == 6
    capture = subprocess.run([sys.executable, "evaluate.py", "compare", *runs, *plan["compare"], "--json"], cwd=REPO,
                             capture_output=True, text=True, check=True)
    result = json.loads(capture.stdout)
    loss = {row["model"]: row["loss"] for row in result["runs"]}
    base = [loss[runs[0]], loss[runs[2]]]
    fast = [loss[runs[1]], loss[runs[3]]]
    groups = {g["label"]: g for g in result["groups"]}
    assert set(groups) == {"lr=0.0004", "lr=0.002"}
    assert groups["lr=0.0004"]["loss_mean"] == pytest.approx(sum(base) / 2)
    assert groups["lr=0.0004"]["loss_std"] == pytest.approx(abs(base[0] - base[1]) / math.sqrt(2))
    assert groups["lr=0.002"]["difference"] == pytest.approx(sum(fast) / 2 - sum(base) / 2)
    assert groups["lr=0.002"]["difference_error"] == pytest.approx(
        math.sqrt((base[0] - base[1]) ** 2 / 4 + (fast[0] - fast[1]) ** 2 / 4))
    assert "| lr=0.002 | 2 |" in open(os.path.join(plan["out"], "compare.md")).read()
    assert os.path.getsize(os.path.join(plan["out"], "loss.png")) > 10_000


def test_log_to_a_library_that_is_not_installed_ends_in_one_line_before_the_run_starts(tiny_dataset, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit) as e:
        train.main(["--data", tiny_dataset, "--run-dir", str(tmp_path / "run"), *TINY, "--log", "wandb"])
    assert e.value.code.startswith("error: --log wandb needs the wandb package: pip install wandb")
    assert not (tmp_path / "run").exists()


def test_a_plan_that_cannot_run_ends_in_one_line(tmp_path):
    import run_ablations
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"out": "x", "seeds": [], "variants": {"a": ["--seed", "3"]}}))
    with pytest.raises(SystemExit) as e:
        run_ablations.main([str(bad)])
    assert e.value.code == f'error: {bad} needs "seeds": a list of integers'
    bad.write_text(json.dumps({"out": "x", "seeds": [1], "variants": {"a": ["--seed", "3"]}}))
    with pytest.raises(SystemExit, match="sets --seed; the runner sets it"):
        run_ablations.main([str(bad)])
