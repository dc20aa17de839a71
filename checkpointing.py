"""Checkpoints: save and load a GPTModel (and a training run's full state) as safetensors + JSON.

A checkpoint is a folder that describes itself, so `evaluate.py` can load it with nothing else:
model.safetensors (the weights, under the book's keys), checkpoint.json (model_config, step, losses, each
file's size and sha256, a run's progress) and, in a run's, train_state.safetensors (optimizer and RNG
states). Nothing is pickled. The run folder and why a kill at any instant loses nothing:
docs/resuming.md. `python checkpointing.py info RUN` and `list RUN` show what a run holds.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cli
import gpt
from data import file_sha256
from files import fsync_path, remove_dead_temp_folders, write_json_atomic, write_jsonl_atomic

MODEL_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
TRAIN_STATE_FILE = "train_state.safetensors"
CHECKPOINTS = "checkpoints"       # RUN/checkpoints/
STEP_DIR = "step-{:08d}"          # RUN/checkpoints/step-00001234
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"              # unfinished writes; never listed as checkpoints
METRICS_FILE = "metrics.jsonl"    # RUN/metrics.jsonl: one line per validation
LOCK_FILE = ".lock.json"          # RUN/.lock.json: held by the train.py writing into RUN
RESUME_KEYS = ("step", "next_sequence", "tokens_seen", "elapsed_s", "training", "train_state")
# The values of checkpoint.json (and of its train_state, a run's progress) that readers compute with.
META_TYPES = {"step": int, "next_sequence": int, "tokens_seen": int, "elapsed_s": float, "val_loss": float,
              "best_val_loss": float, "best_step": int, "train_loss_sum": float, "train_loss_steps": int,
              "epoch": int, "batch_in_epoch": int, "best_epoch": int, "stopped_early": bool, "files": dict,
              "sha256": dict, "train_state": dict, "training": dict, "metrics": list}
MAY_BE_NULL = ("val_loss", "best_val_loss", "best_step", "best_epoch")  # none yet, before a validation


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or unreadable (the message names the path)."""


# --- writing atomically ---------------------------------------------------------------------------

def unwrap_model(model):
    """The GPTModel inside DistributedDataParallel and/or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def model_tensors(model):
    """The state dict as CPU tensors, a tied head left out: safetensors refuses shared tensors, and a tied
    `out_head.weight` is `tok_emb.weight` (GPTModel.load_state_dict re-ties it)."""
    model = unwrap_model(model)
    tied = "out_head.weight" if model.cfg["tie_weights"] else None
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items() if name != tied}


def save_checkpoint(out_dir, model, meta=None, train_tensors=None, train_json=None):
    """Atomically write (or replace) the checkpoint folder out_dir; train_tensors / train_json: a run's
    state (training_state). checkpoint.json, written last, lists each file's size and sha256."""
    files = {MODEL_FILE: model_tensors(model)}
    if train_tensors is not None:
        files[TRAIN_STATE_FILE] = {k: v.detach().to("cpu").contiguous() for k, v in train_tensors.items()}
    sizes, hashes = {}, {}
    try:
        with folder_written_whole(out_dir) as tmp:
            for name, tensors in files.items():
                path = os.path.join(tmp, name)
                save_file(tensors, path)
                fsync_path(path)
                sizes[name] = os.path.getsize(path)
                hashes[name] = file_sha256(path)  # read back from the page cache: ~1 s per GB
            doc = {"model_config": dict(unwrap_model(model).cfg), **(meta or {}), "files": sizes,
                   "sha256": hashes, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if train_json is not None:
                doc["train_state"] = train_json
            write_json_atomic(os.path.join(tmp, META_FILE), doc)
            fsync_path(tmp)
    except (OSError, SafetensorError) as e:  # disk full, read-only, quota
        needed = sum(t.numel() * t.element_size() for tensors in files.values() for t in tensors.values())
        raise CheckpointError(f"could not write the checkpoint {out_dir} ({e}); it needs about "
                              f"{needed / 2**30:.2f} GiB free in {os.path.dirname(os.path.abspath(out_dir))}. "
                              "The previous checkpoints are kept") from None
    return os.path.abspath(out_dir)


@contextlib.contextmanager
def folder_written_whole(out_dir):
    """A new folder to write out_dir's files into: .tmp-NAME-PID beside it (the final rename stays on one
    filesystem; a later writer removes it if this one is killed), renamed to out_dir when the block ends,
    a folder already there (a step saved again after a resume from an older one) moved aside first, as a
    rename cannot replace a full folder. Whatever stops the block (an error, Ctrl-C, SIGTERM) removes it."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_dead_temp_folders(parent)
    tmp, trash = (os.path.join(parent, f"{TMP_PREFIX}{n}-{os.getpid()}") for n in (name, f"old-{name}"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(out_dir):
            os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
        fsync_path(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place


def save_model(model, out_dir, meta=None):
    """save_checkpoint of the model alone: model.safetensors + checkpoint.json ({"model_config", **meta})."""
    return save_checkpoint(out_dir, model, meta)


def set_pointer(run_dir, name, target):
    """Point RUN/checkpoints/<name> at the checkpoint folder `target`, atomically: a relative symlink
    (the run folder can be moved), or where there are none (FAT, some network shares) a JSON file."""
    ckpt_root = os.path.join(run_dir, CHECKPOINTS)
    tmp = os.path.join(ckpt_root, f"{TMP_PREFIX}{name}-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    target_name = os.path.basename(os.path.normpath(target))
    try:
        os.symlink(target_name, tmp)
    except OSError:
        return write_json_atomic(os.path.join(ckpt_root, name), {"checkpoint": target_name})
    os.replace(tmp, os.path.join(ckpt_root, name))
    fsync_path(ckpt_root)


@contextlib.contextmanager
def run_folder_lock(run_dir):
    """Hold RUN/.lock.json (an exclusive flock) while training writes into RUN: a second run on the folder
    is refused instead of interleaving its checkpoints. The kernel drops the lock however the process
    dies, so none goes stale. A run refused before it wrote anything leaves no folder behind."""
    import fcntl
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise CheckpointError(f"--run-dir {run_dir} is a file, not a folder; pick another --run-dir")
    created = not os.path.isdir(run_dir)
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        os.makedirs(run_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise CheckpointError(f"cannot write into --run-dir {run_dir} ({e.strerror}); pick a folder you can write to") from None

    def close():
        f.close()
        if created and os.listdir(run_dir) == [LOCK_FILE]:  # nothing written: leave no trace
            os.remove(path)
            os.rmdir(run_dir)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: held by another process, which wrote who it is
        f.seek(0)
        try:
            holder = "{script} pid {pid} on {host}".format(**{"script": "a process", **json.load(f)})
        except (ValueError, KeyError, TypeError):
            holder = "another process"
        f.close()
        raise CheckpointError(f"{run_dir} is in use by {holder}; wait for it to finish or stop it (Ctrl-C saves "
                              "and exits), or pick another --run-dir") from None
    except OSError as e:  # ENOLCK and the like: this filesystem has no locks (some NFS mounts)
        close()
        raise CheckpointError(f"cannot lock {path} ({e.strerror or e}): its filesystem has no file locks "
                              "(some network mounts); put the run folder on a local disk") from None
    f.seek(0)
    f.truncate()
    json.dump({"script": os.path.basename(sys.argv[0]), "pid": os.getpid(), "host": os.uname().nodename}, f)
    f.flush()
    try:
        yield
    finally:
        close()


# --- reading --------------------------------------------------------------------------------------

def _read_pointer(link):
    if os.path.islink(link):
        return os.path.join(os.path.dirname(link), os.readlink(link))
    if not os.path.isfile(link):
        return link
    try:
        with open(link) as f:
            return os.path.join(os.path.dirname(link), json.load(f)["checkpoint"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{link} is not a checkpoint pointer (a symlink, or JSON naming a step-* "
                              "folder); delete it and use --which step-NNNNNNNN") from None


def resolve_checkpoint(path, which="best"):
    """The checkpoint folder `path` names: itself, or in a run folder checkpoints/<which> (best, latest,
    step-NNNNNNNN)."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return os.path.normpath(path)
    for candidate in (os.path.join(path, CHECKPOINTS, which), os.path.join(path, which)):
        if os.path.lexists(candidate):
            target = os.path.normpath(_read_pointer(candidate))
            if not os.path.isfile(os.path.join(target, META_FILE)):
                raise CheckpointError(f"{candidate} points to {target}, which is not a complete checkpoint "
                                      f"(no {META_FILE}); pick another with --which or a step-* folder")
            return target
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a run folder or a checkpoint folder")
    raise CheckpointError(f"{path} is neither a checkpoint (no {META_FILE}) nor a run with a "
                          f"'{which}' checkpoint (no {os.path.join(path, CHECKPOINTS, which)})")


def read_meta(ckpt_dir):
    """checkpoint.json of a checkpoint folder, after checking its values (check_meta) and its files."""
    path = os.path.join(ckpt_dir, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: {META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint is damaged") from None
    check_meta(meta, path)
    for name, size in meta.get("files", {MODEL_FILE: None}).items():
        file = os.path.join(ckpt_dir, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
        if size is not None and os.path.getsize(file) != size:
            raise CheckpointError(f"{file} has {os.path.getsize(file):,} bytes, {META_FILE} says {size:,}; "
                                  "the checkpoint is damaged (a write was cut short?)")
    return meta


def check_meta(meta, path):
    """The one check of checkpoint.json (at path) that every reader makes: a model_config GPTModel
    builds, values of META_TYPES' types. A hand-edited "step": "forty" is refused here in one line,
    not met as a TypeError in the model or a summary."""
    def refuse(problem):
        raise CheckpointError(f"{path}: {problem}; the checkpoint is damaged (edited by hand?): restore "
                              "the file from a copy, or use another checkpoint")
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        refuse("no model_config")
    try:
        gpt.check_config({**gpt.CONFIG_DEFAULTS, **meta["model_config"]})
    except ValueError as e:
        refuse(f"model_config: {e}")
    for doc, where in ((meta, ""), (meta.get("train_state", {}), "train_state.")):
        for key, kind in META_TYPES.items():
            if key in doc and not (doc[key] is None and key in MAY_BE_NULL) and not gpt.is_a(doc[key], kind):
                refuse(f"{where}{key} is {doc[key]!r}, not {kind.__name__}")
    for name, size in meta.get("files", {}).items():
        if not gpt.is_a(size, int):
            refuse(f"files.{name} is {size!r}, not a size in bytes")


def load_tensors(ckpt_dir, name, device="cpu"):
    """The file's tensors, each in its own allocation: safetensors' CPU views into one buffer sit at any
    byte offset, and vectorised kernels round unaligned data differently (a resume drifted by a bit)."""
    path = os.path.join(ckpt_dir, name)
    try:
        tensors = load_file(path, device=str(device))
        return {k: v.clone() for k, v in tensors.items()} if torch.device(device).type == "cpu" else tensors
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not load ({e}); the checkpoint is damaged") from None


def verify_files(ckpt_dir, meta, names=None):
    """Each file's sha256 against the one checkpoint.json recorded (older checkpoints have none): bit-rot
    is caught here, not as a nan loss that looks like a bad run."""
    for name in names or meta.get("files", {}):
        expected = meta.get("sha256", {}).get(name)
        if expected and file_sha256(os.path.join(ckpt_dir, name)) != expected:
            raise CheckpointError(f"{os.path.join(ckpt_dir, name)} is damaged: its sha256 differs from "
                                  f"the one in {META_FILE}")


def model_from_state(cfg, state, where):
    """GPTModel(cfg) in eval mode holding `state`, never initialising the weights it replaces."""
    with torch.device("meta"):
        model = gpt.GPTModel(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where} does not fit its model config: {e}") from None
    if model.cfg["tie_weights"]:
        model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters of one tensor
    return model.eval()


def load_model(path, device="cpu", which="best"):
    """(GPTModel in eval mode on `device`, checkpoint.json as a dict) from a checkpoint or run folder."""
    ckpt_dir = resolve_checkpoint(path, which)
    meta = read_meta(ckpt_dir)
    verify_files(ckpt_dir, meta, [MODEL_FILE])
    state = load_tensors(ckpt_dir, MODEL_FILE, device)
    meta["path"] = ckpt_dir
    return model_from_state(meta["model_config"], state, os.path.join(ckpt_dir, MODEL_FILE)), meta


def list_checkpoints(run_dir):
    """[(step, folder)] of RUN/checkpoints/step-*, oldest first; unfinished temporary folders skipped."""
    root = os.path.join(run_dir, CHECKPOINTS)
    found = [(int(m.group(1)), os.path.join(root, m.group(0)))
             for m in map(STEP_DIR_RE.match, os.listdir(root) if os.path.isdir(root) else []) if m]
    return sorted((step, path) for step, path in found if os.path.isdir(path) and not os.path.islink(path))


def refuse_to_overwrite(run_dir):
    """A fresh run (no --resume) never writes over a run's checkpoints by accident."""
    if list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already has checkpoints; continue it with --resume latest, "
                              "or pick a new --run-dir")


def strip_train_state(ckpt_dir):
    """Drop the optimizer state (2/3 of the bytes), keeping weights and metrics: checkpoint.json first,
    so a kill in between leaves a stray file, not a lie."""
    meta = read_meta(ckpt_dir)
    if TRAIN_STATE_FILE not in meta.get("files", {}):
        return
    meta["files"].pop(TRAIN_STATE_FILE)
    meta.get("sha256", {}).pop(TRAIN_STATE_FILE, None)
    meta.pop("train_state", None)
    write_json_atomic(os.path.join(ckpt_dir, META_FILE), meta)
    os.remove(os.path.join(ckpt_dir, TRAIN_STATE_FILE))


# --- a training run: its state, resuming, pruning --------------------------------------------------

def training_state(optimizers, scaler, progress):
    """(tensors, json): all but the weights a run needs to continue exactly; optimizer state tensors are
    the keys "optimizer.I.state.P.NAME", the rest JSON."""
    tensors, optimizer_docs = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        state_doc = {}
        for pid, entries in sd["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{i}.state.{pid}.{key}"] = value
                else:
                    state_doc.setdefault(str(pid), {})[key] = value
        optimizer_docs.append({"state": state_doc, "param_groups": sd["param_groups"]})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{d}": state for d, state in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"optimizers": optimizer_docs, "scaler": scaler.state_dict(), **progress}


def restore_training_state(ckpt_dir, meta, optimizers, scaler):
    """Load optimizer, scaler and RNG state saved by training_state() into the live objects."""
    tensors = load_tensors(ckpt_dir, TRAIN_STATE_FILE)
    doc = meta["train_state"]
    if len(doc["optimizers"]) != len(optimizers):
        raise CheckpointError(f"{ckpt_dir} was trained with {len(doc['optimizers'])} optimizer(s), this run "
                              f"builds {len(optimizers)}; resume with the same --optimizer")
    for i, (opt, saved) in enumerate(zip(optimizers, doc["optimizers"])):
        state = {}
        for key, value in tensors.items():
            parts = key.split(".", 4)
            if parts[0] == "optimizer" and int(parts[1]) == i:
                state.setdefault(int(parts[3]), {})[parts[4]] = value
        for pid, entries in saved["state"].items():
            state.setdefault(int(pid), {}).update(entries)
        # Keep this run's hyperparameters (betas, weight decay, ...): a changed flag takes effect.
        fresh_groups = opt.state_dict()["param_groups"]
        if [len(g["params"]) for g in fresh_groups] != [len(g["params"]) for g in saved["param_groups"]]:
            raise CheckpointError(f"{ckpt_dir}'s optimizer groups its parameters differently "
                                  "(--decay-matrices-only or --optimizer changed?); resume with the run's settings")
        groups = [{**fresh, "params": old["params"]} for fresh, old in zip(fresh_groups, saved["param_groups"])]
        opt.load_state_dict({"state": state, "param_groups": groups})
    if doc["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[f"rng.cuda.{d}"] for d in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return doc


def find_resume_checkpoint(run_dir, resume):
    """(folder, meta) to resume from. "latest": the newest resumable checkpoint by step, not by the
    pointer (a kill between a rename and the pointer's swap leaves it one behind), skipping damaged
    or weights-only ones, so a kill -9 mid-write falls back to the previous checkpoint."""
    if resume == "latest":
        candidates = [d for _, d in reversed(list_checkpoints(run_dir))]
    elif resume == "best":
        link = os.path.join(run_dir, CHECKPOINTS, "best")
        if not os.path.lexists(link) and list_checkpoints(run_dir):
            raise CheckpointError(f"--resume best: {run_dir} has checkpoints but none is marked best yet (no "
                                  "validation has finished); use --resume latest")
        candidates = [os.path.normpath(_read_pointer(link))] if os.path.lexists(link) else []
    else:
        candidates = [resume]
    problems = []
    for candidate in candidates:
        try:
            folder = resolve_checkpoint(candidate, resume if resume in ("latest", "best") else "latest")
            meta = read_meta(folder)
            if TRAIN_STATE_FILE not in meta.get("files", {}):
                raise CheckpointError(f"{folder} holds weights only (older than --keep-last); cannot resume from it")
            missing = [k for k in RESUME_KEYS if k not in meta]
            if missing:
                raise CheckpointError(f"{folder}/{META_FILE} lacks {', '.join(missing)}; it was not written by "
                                      "train.py, or is damaged")
            verify_files(folder, meta)  # damage is found here, not halfway through restoring
            return folder, meta
        except CheckpointError as e:
            problems.append(str(e))
            if resume == "latest":
                print(f"warning: skipping {candidate}: {e}", file=sys.stderr)
    if not candidates:
        raise CheckpointError(f"--resume {resume}: {run_dir} has no checkpoints yet; start without --resume")
    raise CheckpointError(f"--resume {resume}: no usable checkpoint: " + "; ".join(problems))


def set_aside_newer_checkpoints(run_dir, step):
    """Resuming from an older checkpoint starts a new branch: the newer checkpoints move to
    RUN/checkpoints/abandoned-<time>/, kept but out of the way of pruning and --resume latest."""
    newer = [folder for s, folder in list_checkpoints(run_dir) if s > step]
    if not newer:
        return
    dest = os.path.join(run_dir, CHECKPOINTS, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(dest)
    for folder in newer:
        os.rename(folder, os.path.join(dest, os.path.basename(folder)))
    print(f"note: resuming from step {step:,}; the {len(newer)} newer checkpoint(s) were moved to {dest}")


def check_same_run(ckpt_dir, meta, cfg, digest, allow_dataset_change):
    """Refuse to continue a checkpoint with another model or (unless allowed) another dataset."""
    saved = meta["model_config"]
    diffs = [f"{k}={cfg.get(k)!r} (checkpoint: {saved.get(k)!r})"
             for k in sorted(set(cfg) | set(saved)) if cfg.get(k) != saved.get(k)]
    if diffs:
        raise CheckpointError(f"the model config differs from {ckpt_dir}'s: {', '.join(diffs)}; "
                              "resume with the run's model flags, or start a new --run-dir")
    if meta.get("dataset_sha256") != digest and not allow_dataset_change:
        raise CheckpointError(f"--data is not the dataset {ckpt_dir} was trained on (manifest sha256 "
                              f"{digest[:12]} vs {str(meta.get('dataset_sha256'))[:12]}); pass --allow-dataset-change "
                              "to continue on new data")


def prune_checkpoints(run_dir, keep_last, keep_weights, best_dir):
    """The newest `keep_last` checkpoints stay whole, the `keep_weights` before them (None: all) keep
    weights + metrics only, older ones go; best always stays (metrics.jsonl keeps every number)."""
    older = list_checkpoints(run_dir)[:-keep_last]
    for i, (_, folder) in enumerate(reversed(older)):
        if best_dir is not None and os.path.normpath(folder) == os.path.normpath(best_dir):
            continue
        try:
            if keep_weights is not None and i >= keep_weights:
                shutil.rmtree(folder)
            else:
                strip_train_state(folder)
        except (CheckpointError, OSError) as e:
            print(f"warning: cannot prune {folder}: {e}", file=sys.stderr)


def disk_plan(run_dir, weights_bytes, full_bytes, keep_last, keep_weights):
    """(the most the run's checkpoints will hold: keep_last + the one being written + best whole,
    keep_weights weights-only, None if unbounded; the free space plus what they hold now). Refused
    when two whole checkpoints do not fit: the next save could not be written beside the last."""
    existing = run_dir
    while not os.path.isdir(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    held = sum(os.path.getsize(os.path.join(root, name)) for _, folder in list_checkpoints(run_dir)
               for root, _, names in os.walk(folder) for name in names)
    available = shutil.disk_usage(existing).free + held
    if available < 2 * full_bytes:
        raise CheckpointError(f"{run_dir}'s disk has {available / 1e9:,.1f} GB for checkpoints, less than two of this "
                              f"run's {full_bytes / 1e9:,.2f} GB checkpoints; free some space or pick a --run-dir on "
                              "a larger disk")
    most = None if keep_weights is None else (keep_last + 2) * full_bytes + keep_weights * weights_bytes
    return most, available


def remove_unfinished_writes(run_dir):
    """Temporary folders left by a run killed while saving (never read; safe to delete)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def write_metrics(run_dir, rows):
    """RUN/metrics.jsonl from the checkpoint's history (after a resume, no lines from the lost steps)."""
    write_jsonl_atomic(os.path.join(run_dir, METRICS_FILE), rows)


def step_folder(run_dir, step):
    return os.path.join(run_dir, CHECKPOINTS, STEP_DIR.format(step))


def save_run_checkpoint(run_dir, step, model, meta, optimizer_state, improved, keep_last, keep_weights, best_step,
                        metrics):
    """A run's checkpoint after `step` with its optimizer state (training_state), `latest` (and if
    `improved` `best`) moved to it, older ones pruned, metrics.jsonl rewritten; a full disk ends in
    one line with the earlier checkpoints kept."""
    folder = step_folder(run_dir, step)
    try:
        save_checkpoint(folder, model, meta, *optimizer_state)
        set_pointer(run_dir, "latest", folder)
        if improved:
            set_pointer(run_dir, "best", folder)
        best = None if best_step is None else step_folder(run_dir, best_step)  # kept whole, whatever its age
        prune_checkpoints(run_dir, keep_last, keep_weights, best)
        write_metrics(run_dir, metrics)
    except OSError as e:
        raise CheckpointError(f"could not update {run_dir} after step {step} ({e}); the checkpoints already "
                              "written are kept: free some space, then --resume latest") from None
    return folder


# --- command line ---------------------------------------------------------------------------------

def _summary(meta):
    cfg, val = meta["model_config"], meta.get("val_loss")
    val = f"val_loss {val:.4f}" if val is not None else "no val_loss"
    return (f"step {meta.get('step', '?')}, tokens {meta.get('tokens_seen', 0):,}, {val}, "
            f"{cfg['n_layers']} layers x {cfg['emb_dim']} dims, ctx {cfg['context_length']}")


def cmd_info(args):
    ckpt_dir = resolve_checkpoint(args.path, args.which)
    meta = read_meta(ckpt_dir)
    shown = {k: v for k, v in meta.items() if k not in ("train_state", "metrics")}
    print(ckpt_dir, _summary(meta), json.dumps(shown, indent=1), sep="\n")


def cmd_list(args):
    checkpoints = list_checkpoints(args.run)
    if not checkpoints:
        raise CheckpointError(f"{args.run} has no checkpoints (no {os.path.join(args.run, CHECKPOINTS, 'step-*')})")
    pointers, damaged = {}, 0
    for name in ("latest", "best"):
        link = os.path.join(args.run, CHECKPOINTS, name)
        if os.path.lexists(link):
            pointers.setdefault(os.path.normpath(_read_pointer(link)), []).append(name)
    for _, ckpt_dir in checkpoints:
        try:
            meta = read_meta(ckpt_dir)
            full = TRAIN_STATE_FILE in meta.get("files", {})
            line = f"{_summary(meta)}, {'resumable' if full else 'weights only'}"
        except CheckpointError as e:
            line, damaged = f"DAMAGED: {e}", damaged + 1
        tags = ",".join(pointers.get(os.path.normpath(ckpt_dir), []))
        print(f"{os.path.basename(ckpt_dir)}  {f'[{tags}] ' if tags else ''}{line}")
    if damaged:
        raise CheckpointError(f"{damaged} of the {len(checkpoints)} checkpoints in {args.run} are damaged "
                              "(DAMAGED above); use another with --which, or delete them")


def add_checkpoint_arguments(parser, name):
    """A command's checkpoint to read, as every command that reads one takes it."""
    parser.add_argument(name, help="a checkpoint folder, or a run folder (then --which picks one)")
    parser.add_argument("--which", default="best",
                        help="in a run folder: best, latest or step-NNNNNNNN (default: best)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("info", help="print a checkpoint's config, step and losses")
    add_checkpoint_arguments(p, "path")
    p.set_defaults(func=cmd_info)
    p = commands.add_parser("list", help="list a run's checkpoints, which are latest/best, which are damaged")
    p.add_argument("run", help="a run folder (train.py --run-dir)")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with cli.errors_end_in_one_line(CheckpointError,
                                    stopped=lambda: "stopped; info and list only read, so nothing changed"):
        args.func(args)


if __name__ == "__main__":
    main()
