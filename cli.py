"""What every script's command line shares, without importing torch (so --help and a bad flag are
answered at once): argparse types for numbers, a help formatter that says each default once, and the
one-line ending of an error the user can fix."""

import argparse
import contextlib
import math


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


@contextlib.contextmanager
def errors_end_in_one_line(*error_types):
    """A script's errors that the user can fix (a bad path, a damaged file) end the process with
    "error: MESSAGE" and exit status 1, never a traceback."""
    try:
        yield
    except error_types as e:
        raise SystemExit(f"error: {e}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default said once: none where the help already gives it, there is none, or a
    flag is off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


def duration(seconds):
    """A long time in the unit a person would use: 45 minutes, 3.2 hours, 41 days, 2.1 years."""
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds / 60:,.0f} minutes"


positive_int = _number(int, 1, False)
non_negative_int = _number(int, 0, False)
positive_float = _number(float, 0, True)
non_negative_float = _number(float, 0, False)
fraction = _number(float, 0, False, below=1)  # dropout, Adam's betas
