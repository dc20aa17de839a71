"""Stopping a script mid-work, as a user's Ctrl-C or a scheduler's SIGTERM would (the tests of every
script's one-line ending use this)."""

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signal_once_started(tmp_path, argv, started, signum, wait=120):
    """Run `python -u ARGV` in the repo, send `signum` once `started(stdout, stderr)` says work is under
    way (within `wait` seconds), and return (exit status, stdout, stderr)."""
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-u", *argv], cwd=REPO, stdout=out, stderr=err, text=True)
    read = lambda f: open(f.name).read()
    deadline = time.time() + wait
    while not started(read(out), read(err)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"{argv[0]} ended before it could be stopped: {read(err)[-2000:]}"
    proc.send_signal(signum)
    proc.wait(timeout=120)
    return proc.returncode, read(out), read(err)
