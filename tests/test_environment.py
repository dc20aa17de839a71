"""The tests set their own environment (conftest.py), so a caller's exported HF_HUB_OFFLINE, HF_HOME,
HF_ENDPOINT, TMPDIR, CUDA_VISIBLE_DEVICES or OMP_NUM_THREADS changes no test's outcome."""

import os
import subprocess
import sys

import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_hub_and_the_subprocesses_see_the_tests_own_settings():
    from huggingface_hub import constants  # read once, at import: conftest.py must have come first
    assert not constants.HF_HUB_OFFLINE and constants.ENDPOINT == "https://huggingface.co"
    assert constants.HF_HOME == os.environ["HF_HOME"] == conftest.KNOWN_ENVIRONMENT["HF_HOME"]
    assert not any(name.startswith(conftest.CALLERS_PREFIXES) or name in conftest.CALLERS_NAMES
                   for name in os.environ if name != "HF_HOME")
    child = subprocess.run([sys.executable, "-c", "import os, tempfile; print(tempfile.gettempdir(), "
                            "os.environ['OMP_NUM_THREADS'])"], capture_output=True, text=True, check=True)
    assert child.stdout.split() == [os.environ["TMPDIR"], "1"]
    assert os.environ["TMPDIR"] == conftest.KNOWN_ENVIRONMENT["TMPDIR"] and os.environ["OMP_NUM_THREADS"] == "1"


def test_a_callers_exported_settings_do_not_reach_the_tests(tmp_path):
    """The test above, run by a pytest started from a shell that exported settings conftest.py removes."""
    callers_tmp = tmp_path / "callers_tmp"
    callers_tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "callers_hf"),
           "TMPDIR": str(callers_tmp), "HF_ENDPOINT": "http://127.0.0.1:9", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "RANK": "3", "OPENAI_API_KEY": "sk-callers", "OMP_NUM_THREADS": "2"}
    test = "tests/test_environment.py::test_the_hub_and_the_subprocesses_see_the_tests_own_settings"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # pytest's own folders stay in the caller's temporary folder; the session's folder is removed at its end
    assert [name for name in os.listdir(callers_tmp) if not name.startswith("pytest-of-")] == []
