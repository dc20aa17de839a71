"""The README and docs/*.md show real commands: every `python SCRIPT.py ...` in them parses with that
script's own argparse, every flag they name is one some script takes, and every link lands.

(The quick start and the other tests run the commands at a small size; this test catches pages that
drift from the flags the scripts actually take.)
"""

import argparse
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
TEXT = {page: open(os.path.join(REPO, page)).read() for page in PAGES}
README = TEXT["README.md"]
README_MAX_CHARS = 12_000  # the front door; depth goes to docs/

# Flags of the other programs the pages show (torchrun, pip, lm_eval), not ours to parse.
OTHER_PROGRAMS_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr",
                        "--master_port", "--index-url", "--model_args", "--tasks", "--batch_size"}


class Parsed(Exception):
    """Raised instead of running the script once its command line has parsed."""


def code_snippets(text):
    """Each line of a fenced block (continuations joined) and each inline code span outside them."""
    snippets = []
    for i, part in enumerate(re.split(r"^```[a-z]*\n", text, flags=re.M)):
        if i % 2:  # inside a fence
            block = part.split("```")[0].replace("\\\n", " ")
            snippets += [line for line in block.splitlines() if line.strip()]
        else:
            snippets += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", part)]
    return snippets


def command_in(snippet):
    """(script path, argv) when the snippet runs one of our scripts with python or torchrun, else None."""
    snippet = re.sub(r"\[(--[^\[\]]*)\]", r"\1", snippet)  # `[--flag V]` in a synopsis: parse it too
    try:
        words = shlex.split(snippet, comments=True)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word in ("python", "python3") or word.endswith("/python") or word == "torchrun":
            rest = words[i + 1:]
            if word == "torchrun":
                rest = rest[next((j for j, w in enumerate(rest) if w.endswith(".py")), len(rest)):]
            if not rest or not re.fullmatch(r"[a-z_][a-z0-9_/]*\.py", rest[0]):
                return None  # `python -m ...`, `python SCRIPT.py` (a placeholder), `python ...`
            argv = rest[1:]
            for j, w in enumerate(argv):
                if w in ("&&", "||", ";", "|"):
                    argv = argv[:j]
                    break
            return rest[0], argv
    return None


def page_commands():
    return [(page, script, argv) for page in PAGES for snippet in code_snippets(TEXT[page])
            if (found := command_in(snippet)) for script, argv in [found]]


def load_script(path):
    if "/" not in path:
        return importlib.import_module(path[:-3])
    spec = importlib.util.spec_from_file_location(path[:-3].replace("/", "_"), os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main_until_parsed(monkeypatch, path, argv, parse_argv=True):
    """The parser the script built and the namespace it parsed argv into (None after --help, or
    without parse_argv)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(self, original(self, args, namespace) if parse_argv else None)

    main = load_script(path).main
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [path] + list(argv))
    try:
        main(list(argv)) if inspect.signature(main).parameters else main()
    except Parsed as parsed:
        return parsed.args
    except SystemExit as e:
        assert e.code == 0 and ("--help" in argv or "-h" in argv), f"{path} {' '.join(argv)}: exit {e.code}"
        return None, None
    raise AssertionError(f"{path} {' '.join(argv)} ran past its argument parsing")


def parse(monkeypatch, path, argv):
    return run_main_until_parsed(monkeypatch, path, argv)[1]


def scripts_with_main():
    paths = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "*.py")))
    paths += sorted("bench/" + os.path.basename(p) for p in glob.glob(os.path.join(REPO, "bench", "*.py")))
    return [p for p in paths if re.search(r"^def main\(", open(os.path.join(REPO, p)).read(), re.M)]


def option_strings(parser):
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def test_the_two_commands_are_the_first_code_block_at_the_top_of_the_readme():
    """CI and newcomers start from these two lines."""
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block == "bash quickstart.sh\nbash run_tests.sh\n"
    assert README.index("```bash\n") < README.index("\n## "), "the two commands come before the first section"
    for script in ("quickstart.sh", "run_tests.sh"):
        assert os.path.exists(os.path.join(REPO, script)), script


def test_the_readme_stays_the_front_door():
    assert len(README) <= README_MAX_CHARS, (f"README.md is {len(README):,} characters, over {README_MAX_CHARS:,}: "
                                             "move the depth to a page in docs/ and link it")


def test_the_pages_show_every_stage():
    shown = {script for _, script, _ in page_commands()}
    assert {"download_fineweb.py", "prepare_datasets.py", "measure_tokens_per_second.py",
            "measure_validation_timing.py", "train.py", "evaluate.py", "plot_losses.py", "checkpointing.py",
            "huggingface.py", "finetune_instructions.py", "run_ablations.py", "bench/gpu_check.py"} <= shown
    first_run = {script for page, script, _ in page_commands() if page == "README.md"}
    assert {"download_fineweb.py", "prepare_datasets.py", "measure_tokens_per_second.py", "train.py",
            "evaluate.py", "plot_losses.py"} <= first_run


@pytest.mark.parametrize("page,script,argv", page_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_page_command_parses(monkeypatch, page, script, argv):
    assert os.path.exists(os.path.join(REPO, script)), f"{page} runs {script}, which does not exist"
    parse(monkeypatch, script, argv)


def test_every_flag_the_pages_name_is_a_real_option(monkeypatch):
    known = set(OTHER_PROGRAMS_FLAGS)
    for path in scripts_with_main():
        parser, _ = run_main_until_parsed(monkeypatch, path, [], parse_argv=False)
        known |= option_strings(parser)
    unknown = {(page, flag) for page in PAGES for snippet in code_snippets(TEXT[page])
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", snippet) if flag not in known}
    assert not unknown, sorted(unknown)


def heading_anchors(text):
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES)
def test_links_and_named_scripts_exist(page):
    text = TEXT[page]
    here = os.path.dirname(os.path.join(REPO, page))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(REPO, page)
        assert os.path.exists(full), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in heading_anchors(open(full).read()), f"{page} links to {target}: no such heading"
    for snippet in code_snippets(text):
        for name in re.findall(r"(?<![\w/.-])([a-z_][a-z0-9_]*(?:/[a-z0-9_]+)*\.(?:py|sh))(?![\w])", snippet):
            in_repo = os.path.exists(os.path.join(REPO, name)) or os.path.exists(os.path.join(REPO, "bench", name))
            assert in_repo, f"{page} names {name}, which is not in the repo"


def test_each_hypothesis_flag_parses_and_changes_the_rtx3090_run(monkeypatch):
    """docs/experiments.md's table: each hypothesis is a flag that really changes the RTX 3090 run."""
    section = TEXT["docs/experiments.md"].split("## One flag per hypothesis")[1].split("\n## ")[0]
    rows = [row for row in section.splitlines() if row.startswith("| ") and "`--" in row]
    assert len(rows) >= 9
    base = ["--data", "d", "--run-dir", "r"]
    rtx3090 = vars(parse(monkeypatch, "train.py", base))
    for row in rows:
        for flag in re.findall(r"`([^`]+)`", row.split("|")[2]):
            assert vars(parse(monkeypatch, "train.py", base + shlex.split(flag))) != rtx3090, flag
