"""Files that appear whole or not at all: JSON and JSON Lines are written to a temporary file beside
the target, then renamed over it, so a reader (or a kill at any instant) sees the old file or the new
one, never half of one; and the temporary folders a killed writer leaves, removed by the next one.
No torch here: a script that only writes a report need not load it."""

import json
import os
import re
import shutil

# checkpointing.py's and huggingface.py's temporary folders: .tmp-NAME-PID, beside the final one.
TEMP_FOLDER_RE = re.compile(r"^\.tmp-.+-(\d+)$")


def fsync_path(path):
    """Flush a file or folder to disk (a folder: the renames made in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    """JSON (no NaN: other tools' parsers refuse it) written whole or not at all."""
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False))
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_jsonl_atomic(path, rows):
    """One JSON line per row, written whole or not at all."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_text_atomic(path, text):
    """text to a temporary file beside path, fsynced, renamed over it; the folder made if need be."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pid_alive(pid):
    """Whether process `pid` runs on this machine (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    return True


def remove_dead_temp_folders(parent, pattern=TEMP_FOLDER_RE):
    """Delete the folders in `parent` whose name matches `pattern` (group 1: the writer's pid) and whose
    writer no longer runs: one killed with SIGKILL cannot clean up, and its hidden folder (an export: GBs)
    is named after no folder a rerun would replace. Each writer calls this before making its own. The
    pids are this machine's: two machines must not write into one shared folder at the same time."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        path = os.path.join(parent, name)
        if m and os.path.isdir(path) and not os.path.islink(path) and not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
