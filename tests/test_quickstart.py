"""The README's first command, end to end at a smaller size: every stage runs and the model learns."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_the_loss_falls(tmp_path):
    out = tmp_path / "qs"
    result = subprocess.run([sys.executable, "quickstart.py", "--out", str(out), "--steps", "8",
                             "--val-every", "4", "--offline"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    python = os.path.relpath(sys.executable, REPO)
    python = python if python.startswith(".venv") else "python"
    for command in ["sample_text.py", "prepare_datasets.py --analyze", "prepare_datasets.py --input",
                    "measure_tokens_per_second.py", "train.py", "evaluate.py loss", "evaluate.py generate",
                    "plot_losses.py"]:
        assert f"$ {python} {command}" in printed, command
    assert "--resume latest" in printed
    # a printed command works as printed, pasted into a shell that has not activated any environment
    plot = next(line[2:] for line in printed.splitlines() if line.startswith(f"$ {python} plot_losses.py"))
    pasted = subprocess.run(plot, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
    assert pasted.returncode == 0, pasted.stderr[-2000:]
    for path in ["python-docs.parquet", "token_lengths.png", "data/manifest.json", "run/config.json",
                 "run/checkpoints/best/model.safetensors", "loss.png"]:
        assert (out / path).exists(), path

    rows = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    steps = [r["step"] for r in rows]
    assert steps[0] == 0 and steps[-1] == 8 and steps == sorted(set(steps))  # nothing lost or repeated
    assert abs(rows[0]["val_loss"] - math.log(50257)) < 0.5  # untrained: about a uniform guess
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    # evaluate.py scored the best checkpoint on the same windows training validated on
    best = min(r["val_loss"] for r in rows)
    assert f"run: val loss {best:.4f}, perplexity" in printed  # evaluate.py's line, not train.py's
