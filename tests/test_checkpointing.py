"""checkpointing.py: self-describing safetensors + JSON checkpoints, atomic writes, clear errors.

References: the model object that was saved (its state dict and its logits), safetensors' own reader
for what is in the file, and the bytes on disk."""

import errno
import fcntl
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import checkpointing as ckpt
import gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(**overrides):
    torch.manual_seed(0)
    return gpt.GPTModel(gpt.model_config("tiny", context_length=16, **overrides))


def test_save_then_load_gives_the_same_model_and_logits(tmp_path):
    model = tiny_model(qkv_bias=True)
    ckpt.save_model(model, tmp_path / "ck", {"step": 7, "note": "hello"})
    loaded, meta = ckpt.load_model(str(tmp_path / "ck"))
    assert not loaded.training
    assert meta["step"] == 7 and meta["note"] == "hello" and meta["model_config"] == model.cfg
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))


def test_tied_head_is_stored_once_and_tied_again_on_load(tmp_path):
    model = tiny_model(tie_weights=True)
    ckpt.save_model(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / ckpt.MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "tok_emb.weight" in keys and "out_head.weight" not in keys
    assert keys == set(model.state_dict()) - {"out_head.weight"}
    loaded, _ = ckpt.load_model(str(tmp_path / "ck"))
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert gpt.count_parameters(loaded) == gpt.count_parameters(model)
    assert torch.equal(loaded.out_head.weight, model.tok_emb.weight)


def test_checkpoint_json_describes_the_files(tmp_path):
    ckpt.save_model(tiny_model(), tmp_path / "ck", {"val_loss": 3.5})
    with open(tmp_path / "ck" / ckpt.META_FILE) as f:
        doc = json.load(f)
    assert doc["model_config"]["emb_dim"] == 64 and doc["val_loss"] == 3.5
    assert doc["files"] == {ckpt.MODEL_FILE: os.path.getsize(tmp_path / "ck" / ckpt.MODEL_FILE)}
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folder left behind


def test_saving_again_replaces_the_folder_atomically(tmp_path):
    ckpt.save_model(tiny_model(), tmp_path / "ck", {"step": 1})
    (tmp_path / "ck" / "stray.txt").write_text("from the old folder")
    other = tiny_model(emb_dim=32, n_heads=2)
    ckpt.save_model(other, tmp_path / "ck", {"step": 2})
    loaded, meta = ckpt.load_model(str(tmp_path / "ck"))
    assert meta["step"] == 2 and loaded.cfg["emb_dim"] == 32
    assert not (tmp_path / "ck" / "stray.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_run_folder_pointers_resolve_to_best_and_latest(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20):
        folder = run / ckpt.CHECKPOINTS / ckpt.STEP_DIR.format(step)
        ckpt.save_model(tiny_model(), folder, {"step": step})
    ckpt.set_pointer(str(run), "best", str(run / ckpt.CHECKPOINTS / "step-00000010"))
    ckpt.set_pointer(str(run), "latest", str(run / ckpt.CHECKPOINTS / "step-00000020"))
    assert os.path.basename(ckpt.resolve_checkpoint(str(run))) == "step-00000010"
    assert os.path.basename(ckpt.resolve_checkpoint(str(run), "latest")) == "step-00000020"
    assert ckpt.load_model(str(run), which="latest")[1]["step"] == 20
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [10, 20]
    # moving a pointer replaces it in one rename; the pointer file itself is a relative link
    ckpt.set_pointer(str(run), "best", str(run / ckpt.CHECKPOINTS / "step-00000020"))
    assert ckpt.load_model(str(run))[1]["step"] == 20
    assert os.readlink(run / ckpt.CHECKPOINTS / "best") == "step-00000020"


def test_missing_or_damaged_checkpoints_raise_an_error_naming_them(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(str(tmp_path / "nowhere"))
    ckpt.save_model(tiny_model(), tmp_path / "ck")
    model_file = tmp_path / "ck" / ckpt.MODEL_FILE
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])  # a write cut short
    with pytest.raises(ckpt.CheckpointError, match=str(model_file)):
        ckpt.load_model(str(tmp_path / "ck"))
    # same size, garbage header: its recorded sha256 (or, for a checkpoint without one, safetensors'
    # parser) rejects it
    model_file.write_bytes(b"\xff" * len(data))
    with pytest.raises(ckpt.CheckpointError, match="is damaged: its sha256 differs"):
        ckpt.load_model(str(tmp_path / "ck"))
    os.remove(tmp_path / "ck" / ckpt.META_FILE)
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        ckpt.load_model(str(tmp_path / "ck"))


def test_strip_train_state_keeps_weights_and_metadata(tmp_path):
    model = tiny_model()
    extra = {"optimizer.0.state.0.exp_avg": torch.ones(3)}
    ckpt.save_checkpoint(tmp_path / "ck", model, {"step": 3, "metrics": [{"step": 3}]}, extra, {"optimizers": []})
    assert ckpt.read_meta(str(tmp_path / "ck"))["files"].keys() == {ckpt.MODEL_FILE, ckpt.TRAIN_STATE_FILE}
    ckpt.strip_train_state(str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path / "ck")) == [ckpt.META_FILE, ckpt.MODEL_FILE]
    loaded, meta = ckpt.load_model(str(tmp_path / "ck"))
    assert "train_state" not in meta and meta["metrics"] == [{"step": 3}]
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


def test_command_line_lists_and_reports(tmp_path, capsys):
    run = tmp_path / "run"
    folder = run / ckpt.CHECKPOINTS / ckpt.STEP_DIR.format(5)
    ckpt.save_model(tiny_model(), folder, {"step": 5, "val_loss": 4.25, "tokens_seen": 640})
    ckpt.set_pointer(str(run), "latest", str(folder))
    ckpt.main(["list", str(run)])
    out = capsys.readouterr().out
    assert "step-00000005  [latest]" in out and "val_loss 4.2500" in out
    ckpt.main(["info", str(run), "--which", "latest"])
    assert '"val_loss": 4.25' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^error: .*has no checkpoints"):
        ckpt.main(["list", str(tmp_path / "empty")])


def test_loaded_tensors_are_aligned_so_a_resume_rounds_as_the_uninterrupted_run(tmp_path):
    """safetensors' CPU load returns views at arbitrary offsets of one buffer; SIMD kernels round
    differently on unaligned data (a resume differed in the last bit 1 time in 8)."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 50257, (1, 8))).sum().backward()
    opt.step()
    tensors, doc = ckpt.training_state([opt], torch.amp.GradScaler("cpu", enabled=False), {})
    ckpt.save_checkpoint(tmp_path / "ck", model, {"step": 1}, tensors, doc)
    for name in (ckpt.MODEL_FILE, ckpt.TRAIN_STATE_FILE):
        loaded = ckpt.load_tensors(str(tmp_path / "ck"), name)
        assert all(t.data_ptr() % 64 == 0 for t in loaded.values()), name


def one_line_error(argv):
    """The message `checkpointing.py ARGV` ends with: one line, "error: ..."."""
    with pytest.raises(SystemExit, match=r"^error: [^\n]*$") as e:
        ckpt.main(argv)
    return str(e.value.code)


def dead_pid():
    """The pid of a process that has ended (the kernel hands a pid out again only after ~4 million)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# What a hand edit of checkpoint.json can do, and the words naming it in the error.
WRONG_TYPES = [({"step": "forty"}, "step is 'forty', not int"),
               ({"model_config": {"n_layers": "2"}}, "n_layers is '2', not int"),
               ({"model_config": {"tie_weights": "no"}}, "tie_weights is 'no', not bool"),
               ({"tokens_seen": True}, "tokens_seen is True, not int"),
               ({"val_loss": "low"}, "val_loss is 'low', not float"),
               ({"files": {ckpt.MODEL_FILE: "big"}}, "files.model.safetensors is 'big'")]


@pytest.mark.parametrize("change,named", WRONG_TYPES)
def test_wrong_types_in_checkpoint_json_are_refused_by_every_reader_in_one_line(tmp_path, capsys, change, named):
    run = tmp_path / "run"
    folder = run / ckpt.CHECKPOINTS / ckpt.STEP_DIR.format(5)
    ckpt.save_model(tiny_model(), folder, {"step": 5, "val_loss": 4.25, "tokens_seen": 640})
    ckpt.set_pointer(str(run), "best", str(folder))
    doc = json.loads((folder / ckpt.META_FILE).read_text())
    for key, value in change.items():
        doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) else value
    (folder / ckpt.META_FILE).write_text(json.dumps(doc))

    with pytest.raises(ckpt.CheckpointError, match=named):
        ckpt.load_model(str(run))
    assert named in one_line_error(["info", str(run)])
    capsys.readouterr()
    assert "1 of the 1 checkpoints" in one_line_error(["list", str(run)])
    assert f"step-00000005  [best] DAMAGED: {folder / ckpt.META_FILE}: " in capsys.readouterr().out


def test_evaluate_py_refuses_a_wrong_typed_checkpoint_in_one_line(tmp_path):
    """evaluate.py loads through checkpointing.load_model: a config of strings was a TypeError in gpt.py."""
    ckpt.save_model(tiny_model(), tmp_path / "ck", {"step": 5})
    doc = json.loads((tmp_path / "ck" / ckpt.META_FILE).read_text())
    doc["model_config"]["n_layers"] = "2"
    (tmp_path / "ck" / ckpt.META_FILE).write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, "evaluate.py", "generate", "--checkpoint", str(tmp_path / "ck"),
                          "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "n_layers is '2', not int" in out.stderr


def test_resume_skips_a_checkpoint_whose_train_state_has_wrong_types(tmp_path, capsys):
    """train.py resumes through find_resume_checkpoint: its train_state is checked like the rest."""
    run = tmp_path / "run"
    progress = {"step": 3, "next_sequence": 12, "tokens_seen": 384, "elapsed_s": 1.5, "training": {}}
    tensors = {"optimizer.0.state.0.exp_avg": torch.ones(3)}
    for step, train_step in ((3, 3), (6, "six")):
        folder = run / ckpt.CHECKPOINTS / ckpt.STEP_DIR.format(step)
        ckpt.save_checkpoint(folder, tiny_model(), {**progress, "step": step}, tensors,
                             {"optimizers": [], "scaler": {}, "step": train_step})
    folder, meta = ckpt.find_resume_checkpoint(str(run), "latest")
    assert os.path.basename(folder) == "step-00000003" and meta["train_state"]["step"] == 3
    assert "train_state.step is 'six', not int" in capsys.readouterr().err  # the newer one, skipped
    with pytest.raises(ckpt.CheckpointError, match="train_state.step is 'six'"):
        ckpt.find_resume_checkpoint(str(run), str(run / ckpt.CHECKPOINTS / "step-00000006"))


def test_a_run_folder_in_use_names_its_holder(tmp_path):
    run = str(tmp_path / "run")
    with ckpt.run_folder_lock(run):  # flock: a second open file is refused, even in this process
        with pytest.raises(ckpt.CheckpointError, match=f"is in use by .* pid {os.getpid()} on "):
            with ckpt.run_folder_lock(run):
                pass
    with ckpt.run_folder_lock(run):  # released with the first
        pass


def test_a_filesystem_without_locks_is_said_so_not_taken_for_a_run_in_use(tmp_path, monkeypatch):
    """Some NFS mounts answer flock with ENOLCK. fcntl.flock stands in for such an OS: it is the kernel's."""
    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ckpt.CheckpointError) as e:
        with ckpt.run_folder_lock(str(tmp_path / "run")):
            pass
    message = str(e.value)
    assert "in use" not in message and os.strerror(errno.ENOLCK) in message and "local disk" in message, message
    assert os.listdir(tmp_path) == []  # refused before anything was written: no run folder left


def test_a_save_removes_the_temporary_folders_of_killed_writers_only(tmp_path):
    stale = tmp_path / f".tmp-ck-{dead_pid()}"  # what a kill -9 mid-save leaves
    stale.mkdir()
    (stale / ckpt.MODEL_FILE).write_bytes(b"half a file")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        busy = tmp_path / f".tmp-other-{live.pid}"  # another process writing right now
        busy.mkdir()
        ckpt.save_model(tiny_model(), tmp_path / "ck")
        assert sorted(os.listdir(tmp_path)) == sorted([busy.name, "ck"])
    finally:
        live.kill()
        live.wait()
