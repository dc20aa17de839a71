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
import evaluate
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
    assert experiments.mean_and_std([3.6])[1] is None  # one run says nothing of its noise


def test_t_quantiles_equal_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 1.5, 2, 2.37, 3.87, 4, 9, 30.5, 400):
        for p in (0.5, 0.8, 0.975, 0.99):
            assert experiments.t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), abs=1e-6), (p, dof)


def test_paired_and_welch_intervals_equal_scipy_and_pairing_finds_a_real_effect():
    stats = pytest.importorskip("scipy.stats")
    # Made-up groups: each seed moves both variants alike (its initial weights), the variant is 0.01 better.
    base = [(1, 3.700), (2, 3.742), (3, 3.671), (4, 3.725)]
    variant = [(4, 3.716), (1, 3.689), (3, 3.662), (2, 3.733)]  # another order: pairing is by seed
    result = experiments.compare_groups(variant, base)
    by_seed = dict(variant)
    d = [by_seed[s] - v for s, v in base]
    ref = stats.ttest_rel([by_seed[s] for s, _ in base], [v for _, v in base]).confidence_interval(0.95)
    paired = result["paired"]
    assert (paired["low"], paired["high"]) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
    assert (paired["n"], paired["dof"], paired["difference"]) == (4, 3, pytest.approx(sum(d) / 4))
    a, b = [v for _, v in variant], [v for _, v in base]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    welch = result["welch"]
    assert (welch["low"], welch["high"]) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
    assert result["difference"] == pytest.approx(sum(a) / 4 - sum(b) / 4)
    # Paired, the 0.01 is real; unpaired, the seeds' spread (0.03) hides it.
    assert paired["excludes_zero"] and paired["high"] < 0 and not welch["excludes_zero"]

    # Seeds that do not match one to one: Welch only; a single run: nothing.
    assert experiments.compare_groups([(1, 3.6), (5, 3.7)], [(1, 3.7), (2, 3.8)])["paired"] is None
    assert experiments.compare_groups([(1, 3.6)], base) == {"difference": pytest.approx(3.6 - sum(b) / 4),
                                                            "paired": None, "welch": None}


def test_the_docs_worked_example_and_seed_table_are_what_the_intervals_give():
    """docs/experiments.md's numbers, recomputed: the paired differences -0.040, -0.037, -0.043; Welch's
    interval from the group table (means and stds of n = 3); the smallest difference each n can call real."""
    stats = pytest.importorskip("scipy.stats")
    doc = open(os.path.join(REPO, "docs", "experiments.md")).read()
    d = [-0.040, -0.037, -0.043]
    paired = experiments.compare_groups([(s, x) for s, x in zip((123, 124, 125), d)],
                                        [(s, 0.0) for s in (123, 124, 125)])["paired"]
    ref = stats.ttest_1samp(d, 0).confidence_interval(0.95)
    assert (paired["low"], paired["high"]) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
    assert f"interval is {paired['low']:.4f} to {paired['high']:.4f}" in doc
    assert f"t = {experiments.t_quantile(0.975, 2):.2f} (2 degrees of freedom)" in doc
    assert f"standard error {paired['error']:.4f}" in doc
    (m0, s0), (m1, s1) = (6.0292, 0.0185), (5.9893, 0.0154)  # the table's groups
    ref = stats.ttest_ind_from_stats(m1, s1, 3, m0, s0, 3, equal_var=False)
    v0, v1 = s0 ** 2 / 3, s1 ** 2 / 3
    dof = (v0 + v1) ** 2 / (v0 ** 2 / 2 + v1 ** 2 / 2)
    half = stats.t.ppf(0.975, dof) * math.sqrt(v0 + v1)
    assert abs(ref.statistic) == pytest.approx((m0 - m1) / math.sqrt(v0 + v1))
    assert f"{dof:.1f} degrees of freedom is {stats.t.ppf(0.975, dof):.2f}" in doc
    assert f"interval is {m1 - m0 - half:.4f} to {m1 - m0 + half:.4f}" in doc
    for n in (2, 3, 5, 8, 10):
        t_paired, t_welch = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.975, 2 * n - 2)
        row = (f"| {n} | {t_paired:.2f} | {t_paired * 0.003 / math.sqrt(n):.4f} | {t_welch:.2f} | "
               f"{t_welch * 0.017 * math.sqrt(2 / n):.4f} |")
        assert row in doc, row


def write_metrics(folder, rows, extra=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return str(folder)


# Made-up validations: the loss crosses 3.5 between steps 200 and 300.
CURVE = [{"step": 0, "tokens_seen": 0, "elapsed_s": 0.0, "val_loss": 10.9, "train_loss": None},
         {"step": 100, "tokens_seen": 51_200, "elapsed_s": 60.0, "val_loss": 4.1, "train_loss": 4.3},
         {"step": 200, "tokens_seen": 102_400, "elapsed_s": 130.0, "val_loss": 3.6, "train_loss": 3.7},
         {"step": 300, "tokens_seen": 153_600, "elapsed_s": 190.0, "val_loss": 3.2, "train_loss": 3.3}]


def test_where_a_run_reached_a_loss_is_interpolated_between_validations(tmp_path, capsys):
    run = write_metrics(tmp_path / "run", CURVE)
    # By hand: 3.5 lies a quarter of the way from 3.6 (step 200) to 3.2 (step 300).
    assert experiments.reached(experiments.read_metrics(run), 3.5) == {
        "step": pytest.approx(225), "tokens_seen": pytest.approx(115_200), "elapsed_s": pytest.approx(145.0)}
    assert experiments.reached(CURVE, 4.1) == {"step": 100, "tokens_seen": 51_200, "elapsed_s": 60.0}
    assert experiments.reached(CURVE, 3.0) is None
    assert experiments.reached_text(experiments.reached(CURVE, 3.5)) == "step 225, 115k tokens, 2 minutes"
    assert experiments.reached_text(None) == "not reached"
    assert experiments.mean_reached([{"step": 200.0}, {"step": 300.0}]) == {"step": 250.0}
    assert experiments.mean_reached([{"step": 200.0}, None]) is None

    # the chart prints (and marks) it for each --target; a second run that never gets there: not reached
    late = write_metrics(tmp_path / "late", [dict(r, val_loss=r["val_loss"] + 0.5) for r in CURVE])
    plot_losses.main([run, late, "--labels", "a", "b", "--target", "GPT-2 small=3.5", "--out",
                      str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "a: reached GPT-2 small (3.5) at step 225, 115k tokens, 2 minutes" in out
    assert "b: did not reach GPT-2 small (3.5)" in out


def test_damaged_metrics_and_missing_runs_end_in_one_line_and_create_nothing(tmp_path):
    run = write_metrics(tmp_path / "run", CURVE[:2], extra='{"step": 300, "val_lo\n' + json.dumps(CURVE[3]) + "\n")
    with pytest.raises(SystemExit) as e:
        plot_losses.main([run])
    assert e.value.code == (f"error: {run}/metrics.jsonl line 3 is not JSON: the file is damaged; resuming the "
                            "run rewrites it from its checkpoint, or delete that line")
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot_losses.main([str(missing)])
    assert not missing.exists()  # the chart's folder is made only once every run was read


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
def test_the_runner_killed_midway_finishes_the_rest_on_restart_without_redoing_runs(tiny_dataset, tmp_path,
                                                                                    capsys):
    plan = {"out": str(tmp_path / "out"), "seeds": [1, 2], "variants": {"base": [], "fast": ["--lr", "2e-3"]},
            "train": ["--data", tiny_dataset, *TINY, "--max-steps", "4", "--val-every", "2"],
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
        assert ckpt.read_meta(ckpt.resolve_checkpoint(run, "latest"))["step"] == 4
    curves = {run: [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in runs}
    target = statistics.median(c[-1]["val_loss"] for c in curves.values())  # some runs get there, some may not
    capsys.readouterr()
    evaluate.main(["compare", *runs, *plan["compare"], "--json", "--target", str(target)])
    result = json.loads(capsys.readouterr().out)
    for row in result["runs"]:  # by hand: the first validation at or under the target, back along the line
        rows = curves[row["model"]]
        i = next((i for i, r in enumerate(rows) if r["val_loss"] <= target), None)
        if i is None:
            assert row["reached"] is None
            continue
        f = (rows[i - 1]["val_loss"] - target) / (rows[i - 1]["val_loss"] - rows[i]["val_loss"])
        assert row["reached"]["tokens_seen"] == pytest.approx(rows[i - 1]["tokens_seen"] + f * (
            rows[i]["tokens_seen"] - rows[i - 1]["tokens_seen"]))
    loss = {row["model"]: row["loss"] for row in result["runs"]}
    base = [loss[runs[0]], loss[runs[2]]]
    fast = [loss[runs[1]], loss[runs[3]]]
    groups = {g["label"]: g for g in result["groups"]}
    assert set(groups) == {"lr=0.0004", "lr=0.002"}
    assert groups["lr=0.0004"]["loss_mean"] == pytest.approx(sum(base) / 2)
    assert groups["lr=0.0004"]["loss_std"] == pytest.approx(abs(base[0] - base[1]) / math.sqrt(2))
    assert groups["lr=0.002"]["difference"] == pytest.approx(sum(fast) / 2 - sum(base) / 2)
    assert groups["lr=0.002"]["welch"]["error"] == pytest.approx(
        math.sqrt((base[0] - base[1]) ** 2 / 4 + (fast[0] - fast[1]) ** 2 / 4))
    d = [fast[0] - base[0], fast[1] - base[1]]  # the same seeds on both sides: paired, 1 dof, t = 12.706
    assert groups["lr=0.002"]["paired"]["high"] == pytest.approx(sum(d) / 2 + 12.7062047 * abs(d[0] - d[1]) / 2)
    assert "| lr=0.002 | 2 |" in open(os.path.join(plan["out"], "compare.md")).read()
    assert os.path.getsize(os.path.join(plan["out"], "loss.png")) > 10_000


@pytest.mark.slow
def test_the_runner_stopped_by_a_signal_has_its_train_save_and_says_how_to_continue(tiny_dataset, tmp_path):
    import run_ablations
    plan = {"out": str(tmp_path / "out"), "seeds": [1],
            "variants": {"short": [], "long": ["--max-steps", "5000", "--val-every", "10"]},
            "train": ["--data", tiny_dataset, *TINY, "--max-steps", "2", "--val-every", "2"]}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    command = [sys.executable, "run_ablations.py", str(plan_file)]
    short, long = tmp_path / "out" / "short" / "seed-1", tmp_path / "out" / "long" / "seed-1"
    latest = lambda: ckpt.read_meta(ckpt.resolve_checkpoint(str(long), "latest"))["step"]

    def start_and_wait(saved_after):
        """The runner, once the long run has a checkpoint after step `saved_after`."""
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                if latest() > saved_after:
                    return proc
            except ckpt.CheckpointError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the long run saved nothing: {proc.communicate()}")

    proc = start_and_wait(0)
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and second.stderr.strip() == (
        f"error: {tmp_path / 'out'} is in use by run_ablations.py pid {proc.pid} on {os.uname().nodename}; wait for "
        'it to finish or stop it (Ctrl-C saves and exits), or pick another "out" in the plan'), second.stderr

    proc.send_signal(signal.SIGTERM)  # to the runner alone, as a scheduler does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["SIGTERM: stopped during long, seed 1 (its train.py saved a checkpoint): run "
                                        "the same command again to continue"]
    saved = latest()
    assert 10 <= saved < 5000
    with ckpt.run_folder_lock(str(long)):  # its train.py is gone: the run folder is free
        pass
    assert run_ablations.stopped_at({"run": ("short", 1, str(short))}) == (
        "short, seed 1 is done; stopped before the next run: run the same command again to continue")

    # Ctrl-C sent to the runner alone: its train.py is told too, and saves, rather than finishing its run.
    proc = start_and_wait(saved)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "[1/2] short, seed 1: done" in out and "[2/2] long, seed 1: resume" in out
    assert err.strip().splitlines()[-1].startswith("Ctrl-C: stopped during long, seed 1 (its train.py saved")
    assert saved < latest() < 5000


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
    # a failed run is reported by its own error line, never by the progress bar it was drawing
    log = "step 40%|####      | 4/10 [00:01<00:02]\rerror: runs/x is in use by train.py pid 7\nstep 50%|#####     |\r"
    assert run_ablations.error_line(log) == "error: runs/x is in use by train.py pid 7"
