"""Every constant at the top of a script is a default, and its only home: edit it and the script follows.

The promise to users: edit a constant at the top of a file and the default changes. Each top-level
constant whose lower-case name is one of the script's flags is changed in a copy of the script; the
copy's parser must then take the new value as the flag's default, show it in --help where --help
shows defaults, and parse to it when the flag is not typed. A constant with no flag (how often a
short run validates, when a gradient norm is a spike, ...) is changed in a copy too, and the copy
must behave by the new value. For train.py, finetune_instructions.py and the two measure scripts
every constant at the top is covered one way or the other."""

import argparse
import ast
import datetime
import importlib.util
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# script -> the flags a parse needs besides defaults (to check what a parse gives)
SCRIPTS = {
    "train.py": ["--data", "d", "--run-dir", "r"],
    "finetune_instructions.py": ["--checkpoint", "c", "--run-dir", "r"],
    "prepare_datasets.py": [],
    "measure_tokens_per_second.py": [],
    "measure_validation_timing.py": [],
    "download_fineweb.py": [],
    "plot_losses.py": ["r"],
    "evaluate.py": None,  # subcommands: defaults are checked on each subcommand's parser
}
# every constant at the top of these is checked (a flag's default, or BEHAVIOUR below), with the flag's own
# --help entry; elsewhere the literal ones that name a flag, anywhere in --help
WHOLLY_COVERED = ("train.py", "finetune_instructions.py", "measure_tokens_per_second.py",
                  "measure_validation_timing.py")
ALIASES = {"X_AXIS": "x", "PRECISIONS": "precision"}  # the constant says what the flag is (plot_losses, mtps)


def assignments(source, top_only=False, literal_only=False):
    """The upper-case names assigned at the module level, in order: only those before the first function
    or class with top_only, only those given a literal (a number, string, None ...) with literal_only."""
    names = []
    for node in ast.parse(source).body:
        if top_only and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.isupper():
            try:
                literal_only and ast.literal_eval(node.value)
                names.append(node.targets[0].id)
            except ValueError:
                pass
    return names


def changed(value, action):
    """Another valid value for the flag: the next choice, a flipped boolean, a bigger number, a sample
    of the flag's type where the default is None (off, or worked out from other flags)."""
    if action.choices:
        return next(c for c in action.choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 3 + 3
    if isinstance(value, str):
        return value + "-edited"
    for sample in ("3", "0.5", "edited"):
        try:
            return action.type(sample) if action.type else sample
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    return None


def load_copy(script, tmp_path, name=None, value=None):
    """The script as a module, from a copy with NAME's assignment set to `value`."""
    source = open(os.path.join(REPO, script)).read()
    if name is not None:
        lines = source.splitlines(keepends=True)
        node = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign)
                    and isinstance(n.targets[0], ast.Name) and n.targets[0].id == name)
        lines[node.lineno - 1:node.end_lineno] = [f"{name} = {value!r}\n"]
        source = "".join(lines)
    path = tmp_path / f"edited_{name or 'none'}_{script}"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def actions_by_dest(module):
    """{dest: [(action, parser)]} over the script's parser and its subcommands' parsers."""
    found, parsers = {}, [module.build_parser()]
    for action in parsers[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for parser in parsers:
        for action in parser._actions:
            found.setdefault(action.dest, []).append((action, parser))
    return found


def flag_help(action, parser):
    """The flag's own entry in --help, as the script's formatter writes it."""
    formatter = parser._get_formatter()
    formatter.add_arguments([action])
    return formatter.format_help()


def parsed(module, script, dest):
    """What a parse with no flag for `dest` gives it, through the script's own parse step."""
    if SCRIPTS[script] is None:
        return None  # subcommands: the parsers' defaults are what is checked
    parse = getattr(module, "parse_args", None)
    args = parse(SCRIPTS[script]) if parse else module.build_parser().parse_args(SCRIPTS[script])
    return getattr(args, dest)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_constant_at_the_top_is_its_flags_default(script, tmp_path):
    source = open(os.path.join(REPO, script)).read()
    module = load_copy(script, tmp_path)
    original = actions_by_dest(module)
    checked, wrong, literals = [], [], assignments(source, literal_only=True)
    for name in assignments(source):
        dest, value = ALIASES.get(name, name.lower()), getattr(module, name)
        if dest not in original or (script not in WHOLLY_COVERED and name not in literals):
            continue
        new = changed(value, original[dest][0][0])
        if new is None:
            continue
        edited_module = load_copy(script, tmp_path, name, new)
        edited = actions_by_dest(edited_module)[dest]
        expected = [new] if original[dest][0][0].nargs in ("+", "*") else new
        defaults = [action.default for action, _ in edited]
        result = parsed(edited_module, script, dest)
        checked.append(name)
        if expected not in defaults and result != expected:
            wrong.append(f"{name} = {new!r} but --{dest.replace('_', '-')} defaults to {defaults} and parses to {result!r}")
        elif SCRIPTS[script] is not None and result != expected:
            wrong.append(f"{name} = {new!r} but a parse gives {result!r}")
        # argparse wraps long help (at spaces and hyphens), so whitespace is left out of the comparison
        helps = [flag_help(action, parser) if script in WHOLLY_COVERED else parser.format_help()
                 for action, parser in edited
                 if "default" in (action.help or "") or action.default not in (None, False)]
        if value is not None and helps and not any("".join(str(new).split()) in "".join(text.split()) for text in helps):
            wrong.append(f"{name} = {new!r} but --{dest.replace('_', '-')}'s --help does not show it")
    assert checked, f"{script}: no constant names a flag"
    assert not wrong, f"{script}: " + "; ".join(wrong)


# --- constants without a flag: the behaviour that follows them --------------------------------------

TINY_RUN = ["--model", "tiny", "--context-length", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu"]


def check_process_group_timeout(module, minutes, tmp_path, monkeypatch):
    """The process group a torchrun rank starts waits this long for the others."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    module.setup_distributed("cpu")
    try:
        group = dist.distributed_c10d._get_default_group()
        assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(minutes=minutes)
    finally:
        dist.destroy_process_group()


def check_val_batch_size(module, size, tmp_path, monkeypatch):
    """--val-batches counts batches of this many sequences, whatever the micro-batch."""
    batches, batch_size = module.validation_layout(2, 64, 10 ** 6)
    assert batches * batch_size == 2 * size


def check_max_nonfinite_steps(module, steps, tmp_path, monkeypatch):
    """With a GradScaler (which skips non-finite steps) a run stops after this many in a row."""
    assert not module.hopeless(steps - 1, use_scaler=True) and module.hopeless(steps, use_scaler=True)
    assert module.hopeless(1, use_scaler=False)  # without one the first has spoiled the weights


def check_grad_spike_factor(module, factor, tmp_path, monkeypatch):
    """A gradient norm above factor x its running mean is a spike; one below it is not."""
    import training
    meter = module.Meter("cpu", training.RunState())
    norms = [1.0, 0.9 * factor]           # the second is below factor x the first: no spike
    norms.append(factor * (0.9 * norms[0] + 0.1 * norms[1]) + 0.1)  # just above factor x their running mean
    for norm in norms:
        meter.add(torch.tensor(1.0), torch.tensor(norm))
        meter.read(1, 1, report_spikes=True)
    assert meter.spikes == 1


def check_min_validations(module, count, tmp_path, monkeypatch, tiny_dataset):
    """On the time cadence, a run of N steps still validates every N / count steps."""
    module.main(["--data", tiny_dataset, "--run-dir", str(tmp_path / "run"), *TINY_RUN, "--max-steps", "4"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [0] + list(range(4 // count, 5, 4 // count))


def check_chart_seconds(module, seconds, tmp_path, monkeypatch, tiny_dataset):
    """RUN/loss.png is redrawn at a checkpoint once this many seconds have passed since it was last drawn
    (0: at each one), and at the run's end whatever the time: here, the rows it was drawn from."""
    import plot_losses
    draw, drawn = plot_losses.update_run_chart, []

    def counting_draw(run_dir, **kwargs):
        drawn.append(sum(1 for _ in open(os.path.join(run_dir, "metrics.jsonl"))))
        draw(run_dir, **kwargs)
    monkeypatch.setattr(plot_losses, "update_run_chart", counting_draw)
    module.main(["--data", tiny_dataset, "--run-dir", str(tmp_path / "run"), *TINY_RUN, "--max-steps", "3",
                 "--val-every", "1"])
    assert drawn == [2, 3, 4]  # step 0's row and each validation's


def check_cpu_warning_hours(module, hours, tmp_path, monkeypatch, tiny_dataset, capsys):
    """A CPU run estimated to take longer than this says so before it starts."""
    module.main(["--data", tiny_dataset, "--run-dir", str(tmp_path / "run"), *TINY_RUN, "--max-steps", "1"])
    assert "note: on this CPU the 1 steps to go would take about" in capsys.readouterr().out


def check_logs_per_epoch(module, points, tmp_path, monkeypatch):
    """A fine-tune draws this many chart points an epoch (validation: once, at its end)."""
    import checkpointing as ckpt
    import gpt
    torch.manual_seed(0)
    base = ckpt.save_model(gpt.GPTModel(gpt.model_config("tiny")), str(tmp_path / "base"))
    examples = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    (tmp_path / "data.json").write_text(json.dumps(examples))  # 34 train: 8 steps of 4 an epoch
    module.main(["--checkpoint", base, "--data", str(tmp_path / "data.json"), "--run-dir", str(tmp_path / "run"),
                 "--device", "cpu", "--batch-size", "4", "--epochs", "1"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [0] + list(range(8 // points, 9, 8 // points))


# (script, constant): (the value the copy gets, the check, which fixtures it needs)
BEHAVIOUR = {
    ("train.py", "PROCESS_GROUP_TIMEOUT_MIN"): (7, check_process_group_timeout, ()),
    ("train.py", "VAL_BATCH_SIZE"): (5, check_val_batch_size, ()),
    ("train.py", "MAX_NONFINITE_STEPS"): (7, check_max_nonfinite_steps, ()),
    ("train.py", "GRAD_SPIKE_FACTOR"): (2.0, check_grad_spike_factor, ()),
    ("train.py", "MIN_VALIDATIONS"): (2, check_min_validations, ("tiny_dataset",)),
    ("train.py", "CHART_SECONDS"): (0, check_chart_seconds, ("tiny_dataset",)),
    ("train.py", "CPU_WARNING_HOURS"): (1e-12, check_cpu_warning_hours, ("tiny_dataset", "capsys")),
    ("finetune_instructions.py", "LOGS_PER_EPOCH"): (2, check_logs_per_epoch, ()),
}
RUNS = {"MIN_VALIDATIONS", "CHART_SECONDS", "CPU_WARNING_HOURS", "LOGS_PER_EPOCH"}  # a short training run each


@pytest.mark.parametrize("script, name", [pytest.param(*key, marks=[pytest.mark.slow] if key[1] in RUNS else [])
                                          for key in BEHAVIOUR])
def test_a_constant_without_a_flag_changes_what_the_script_does(script, name, tmp_path, monkeypatch, request):
    value, check, fixtures = BEHAVIOUR[script, name]
    fixtures = [request.getfixturevalue(f) for f in fixtures]
    check(load_copy(script, tmp_path, name, value), value, tmp_path, monkeypatch, *fixtures)
    as_is = tmp_path / "as-is"
    as_is.mkdir()
    with pytest.raises(AssertionError):  # the check can fail: the script as it is does not pass it
        check(load_copy(script, as_is), value, as_is, monkeypatch, *fixtures)


@pytest.mark.parametrize("script", WHOLLY_COVERED)
def test_every_constant_at_the_top_is_a_flags_default_or_has_its_behaviour_checked(script, tmp_path):
    module = load_copy(script, tmp_path)
    flags = actions_by_dest(module)
    missing = [name for name in assignments(open(os.path.join(REPO, script)).read(), top_only=True)
               if ALIASES.get(name, name.lower()) not in flags and (script, name) not in BEHAVIOUR]
    assert not missing, f"{script}: {missing} have neither a flag nor a behaviour check here"
