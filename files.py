"""Files that appear whole or not at all: JSON and JSON Lines are written to a temporary file beside
the target, then renamed over it, so a reader (or a kill at any instant) sees the old file or the new
one, never half of one. No torch here: a script that only writes a report need not load it."""

import json
import os


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
    """Write JSON to path.tmp, fsync, rename: readers see the old file or the new one, never half.
    The folder is created if need be."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_jsonl_atomic(path, rows):
    """One JSON line per row, written to a temporary file and renamed: whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
