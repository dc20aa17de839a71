"""Every constant at the top of a script that names a flag is that flag's default, and the only one.

The promise to users: edit a constant at the top of a file and the default changes. For each stage
script, each top-level constant whose lower-case name is one of its flags is changed in a copy of
the script; the copy's parser must then take the new value as the flag's default, show it in --help
where --help shows defaults, and parse to it when the flag is not typed."""

import argparse
import ast
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def flag_constants(source):
    """[(NAME, value)] of the top-level `NAME = literal` assignments (numbers, strings, booleans, None)."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.isupper():
            try:
                found.append((node.targets[0].id, ast.literal_eval(node.value)))
            except ValueError:
                pass  # an expression (another module's constant): its own home is tested there
    return found


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


def parsers(parser):
    """The parser and every subcommand's parser."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.values())
    return found


def load_copy(script, tmp_path, name=None, value=None):
    """The script as a module, from a copy with NAME's line set to `value`."""
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


ALIASES = {"X_AXIS": "x"}  # plot_losses.py: the constant says what --x is


def actions_by_dest(module):
    """{dest: [(action, parser)]} over the script's parser and its subcommands' parsers."""
    found = {}
    for parser in parsers(module.build_parser()):
        for action in parser._actions:
            found.setdefault(action.dest, []).append((action, parser))
    return found


def parsed(module, script, dest):
    """What a parse with no flag for `dest` gives it, through the script's own parse step."""
    if SCRIPTS[script] is None:
        return None  # subcommands: the parsers' defaults are what is checked
    parse = getattr(module, "parse_args", None)
    args = parse(SCRIPTS[script]) if parse else module.build_parser().parse_args(SCRIPTS[script])
    return getattr(args, dest)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_constant_at_the_top_is_its_flags_default(script, tmp_path):
    sys.path.insert(0, REPO)
    source = open(os.path.join(REPO, script)).read()
    original = actions_by_dest(load_copy(script, tmp_path))
    checked, wrong = [], []
    for name, value in flag_constants(source):
        dest = ALIASES.get(name, name.lower())
        if dest not in original:
            continue
        new = changed(value, original[dest][0][0])
        if new is None:
            continue
        module = load_copy(script, tmp_path, name, new)
        expected = [new] if original[dest][0][0].nargs in ("+", "*") else new
        defaults = [action.default for action, _ in actions_by_dest(module)[dest]]
        result = parsed(module, script, dest)
        checked.append(name)
        if expected not in defaults and result != expected:
            wrong.append(f"{name} = {new!r} but --{dest.replace('_', '-')} defaults to {defaults} and parses to {result!r}")
        elif SCRIPTS[script] is not None and result != expected:
            wrong.append(f"{name} = {new!r} but a parse gives {result!r}")
        # argparse wraps long help (at spaces and hyphens), so whitespace is left out of the comparison
        helps = [p.format_help() for action, p in actions_by_dest(module)[dest] if "default" in (action.help or "")
                 or action.default not in (None, False)]
        if value is not None and helps and not any("".join(str(new).split()) in "".join(text.split()) for text in helps):
            wrong.append(f"{name} = {new!r} but --help does not show it")
    assert checked, f"{script}: no constant names a flag"
    assert not wrong, f"{script}: " + "; ".join(wrong)
