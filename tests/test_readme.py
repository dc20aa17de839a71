"""The README's commands are real: every `python SCRIPT.py ...` it shows parses with that script's CLI.

(The quick start and the other tests run the commands at a small size; this test catches a README
that drifts from the flags the scripts actually take.)
"""

import argparse
import importlib
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md")).read()


class Parsed(Exception):
    """Raised instead of running the script once its command line has parsed."""


def readme_commands():
    found = []
    for line in README.splitlines():
        for match in re.finditer(r"(?:python|torchrun[^`]*?) ([a-z_]+)\.py((?: [^`|\[]*)?)(?=`|\||$)", line):
            found.append((match.group(1), shlex.split(match.group(2))))
    return found


def hypothesis_flags():
    """The flags column of the 'one flag per hypothesis' table."""
    section = README.split("## Testing why the RTX 3090 run lost")[1].split("\n## ")[0]
    return [re.findall(r"`([^`]+)`", row.split("|")[2]) for row in section.splitlines()
            if row.startswith("| ") and "`--" in row]


def parse(monkeypatch, script, argv):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(script).main(argv)
    return parsed.value.args[0]


def test_readme_shows_every_stage():
    scripts = {script for script, _ in readme_commands()}
    assert {"download_fineweb", "prepare_datasets", "measure_tokens_per_second", "measure_validation_timing",
            "train", "evaluate", "plot_losses", "checkpointing", "huggingface", "finetune_instructions",
            "run_ablations"} <= scripts


@pytest.mark.parametrize("script,argv", readme_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_readme_command_parses(monkeypatch, script, argv):
    parse(monkeypatch, script, argv)


def test_each_hypothesis_flag_parses_and_changes_the_rtx3090_run(monkeypatch):
    base = ["--data", "d", "--run-dir", "r"]
    seed = vars(parse(monkeypatch, "train", base))
    for flags in hypothesis_flags():
        for flag in flags:
            changed = vars(parse(monkeypatch, "train", base + shlex.split(flag)))
            assert changed != seed, flag


def test_seed_means_only_the_random_seed_in_the_readme_and_help_texts(capsys):
    """The first round called the RTX 3090 run "the seed", a word no reader of the post knows."""
    import train
    with pytest.raises(SystemExit):
        train.main(["--help"])
    texts = {"README.md": README, "train.py --help": capsys.readouterr().out}
    for where, text in texts.items():
        for match in re.finditer(r"(?i)\bseed\b[^\n]{0,30}", text):
            context = text[max(0, match.start() - 30):match.end()]
            assert re.search(r"(?i)random seed|--seed|seeded|(init|dropout)[ a-z]* seed|seed \(|seed\.", context), \
                f"{where}: {context!r}"
