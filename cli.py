"""What every script's command line shares, without importing torch (so --help and a bad flag are
answered at once): argparse types for numbers, a help formatter that says each default once, the
one-line ending of an error or a stop, and the tables the commands print."""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import traceback


def _number(convert, minimum, strictly_above, below=None):
    """An argparse type: a finite number of `convert`'s kind, at least (or strictly above) `minimum`
    and, when given, below `below`."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {convert.__name__}, not {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strictly_above and value == minimum) or \
                (below is not None and value >= below):
            bound = f"{'above' if strictly_above else 'at least'} {minimum}" + (f" and below {below}" if below else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value
    return parse


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, as Ctrl-C raises KeyboardInterrupt: the same clean-up runs."""


def _terminate(signum, frame):
    raise Terminated


@contextlib.contextmanager
def errors_end_in_one_line(*error_types, stopped=None):
    """A script's errors that the user can fix (a bad path, a damaged file) end the process with
    "error: MESSAGE" and exit status 1, never a traceback. Given `stopped` (a function giving one line:
    what was kept and how to continue), Ctrl-C and SIGTERM end it too, with "Ctrl-C: LINE" or
    "SIGTERM: LINE" and exit status 130 or 143 (128 + the signal, what a shell reports for a kill)."""
    previous, signum = signal.signal(signal.SIGTERM, _terminate) if stopped else None, None
    try:
        yield
    except error_types as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:
        if not stopped:
            raise
        traceback.clear_frames(e.__traceback__)  # the interrupted loops end now: their progress bars close first
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
    finally:
        if stopped:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if signum is not None:
        print(f"{'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}: {stopped()}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default said once: none where the help already gives it, there is none, or a
    flag is off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


# --- resuming from a run folder: the run's own settings, and what a resume may change ----------------

CONFIG_FILE = "config.json"        # RUN/config.json: "arguments" holds the flags the run was started with
PER_SESSION = ("run_dir", "resume", "allow_setting_change", "allow_dataset_change")  # never carried over


def saved_arguments(run_dir):
    """The arguments a run was started with, from RUN/config.json, or None when there are none to take
    (no such file, or a run from before they were recorded: then every flag must be typed again)."""
    try:
        with open(os.path.join(run_dir, CONFIG_FILE)) as f:
            saved = json.load(f).get("arguments")
    except (OSError, ValueError, AttributeError):
        return None
    return {k: v for k, v in saved.items() if k not in PER_SESSION} if isinstance(saved, dict) else None


def command_line(script, argv):
    """The command a session ran, for config.json: as typed, or `script` + argv when called from Python."""
    return [sys.executable] + sys.argv if argv is None else [script] + list(argv)


def run_arguments(args):
    """config.json's "arguments": what a --resume of the run takes as its defaults."""
    return {k: v for k, v in vars(args).items() if k not in PER_SESSION and k != "setting_changes"}


def first_line(error):
    return str(error).splitlines()[0] if str(error) else "no message"


def typed_flags(build_parser, argv):
    """The options typed on this command line, as parsed values (dest -> value), defaults left out."""
    parser = build_parser()
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return vars(parser.parse_args(argv))


def parse_resumable(build_parser, argv, refused, defaults=lambda saved: {}):
    """(parser, args) for a script whose runs resume (train.py, finetune_instructions.py): on --resume of
    a run folder the run's own arguments (RUN/config.json) are the defaults, over `defaults(saved)`, so
    --run-dir and --resume are all a resume needs; a typed change is checked (setting_changes) and put
    in args.setting_changes."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--run-dir")
    pre.add_argument("--resume")
    known = pre.parse_known_args(argv)[0]
    saved = saved_arguments(known.run_dir) if known.resume and known.run_dir else None
    parser = build_parser()
    parser.set_defaults(**defaults(saved))
    if saved:
        parser.set_defaults(**{a.dest: saved[a.dest] for a in parser._actions if a.dest in saved})
    args = parser.parse_args(argv)
    args.setting_changes = setting_changes(typed_flags(build_parser, argv), saved, refused,
                                           args.allow_setting_change) if saved else {}
    return parser, args


def refuse_folder(parser, flag, path):
    """A file-name flag given a folder ends in argparse's one line, with the fix."""
    if path and os.path.isdir(path):
        parser.error(f"{flag} {path} is a folder; name a file, e.g. {path.rstrip('/')}/report.json")


def setting_changes(typed, saved, refused, allowed):
    """{setting: [run's value, typed value]} for each typed flag that differs from the run's. A change
    to a setting in `refused` (one that changes the run's mathematics) ends in one line naming both
    values, unless `allowed` (--allow-setting-change)."""
    changes = {k: [saved[k], v] for k, v in typed.items() if k in saved and k not in PER_SESSION and saved[k] != v}
    hard = [k for k in changes if k in refused]
    if hard and not allowed:
        said = ", ".join(f"--{k.replace('_', '-')} {changes[k][1]} (the run has {changes[k][0]})" for k in hard)
        raise SystemExit(f"error: resuming with {said} would change the run's mathematics; leave "
                         f"{'it' if len(hard) == 1 else 'them'} out to continue the run as it was, pass "
                         "--allow-setting-change to change it from here on (config.json records it), or start a new "
                         "--run-dir")
    return changes


def duration(seconds):
    """A time in the unit a person would use: 50 seconds, 45 minutes, 3.2 hours, 41 days, 2.1 years."""
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.{0 if size == 60 else 1}f} {unit}"
    return f"{seconds:,.0f} seconds"


def count(n):
    """A token count to three digits: 950, 12.3k, 5.1M, 3.28B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def render_table(header, rows, markdown=False):
    """Rows of cells as Markdown, or as aligned text: the first column to the left, numbers to the right."""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in rows])


positive_int = _number(int, 1, False)
non_negative_int = _number(int, 0, False)
positive_float = _number(float, 0, True)
non_negative_float = _number(float, 0, False)
fraction = _number(float, 0, False, below=1)  # dropout, Adam's betas
