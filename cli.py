"""The command line every script shares: the error type for a user's mistake, the argument parser
whose errors are one line, the wrapper that runs a script's main() and turns such a mistake into
one line and exit status 2, and the checks of flag values (numbers finite and in range).
"""
import argparse
import math
import sys

import torch


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a missing dataset): reported as one line,
    `error: <what is wrong>; <what to do>`, and exit status 2, never a traceback."""


class Stopped(Exception):
    """Work stopped early on a signal, after saving what it had: run_script() prints the message
    and exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), the shell's
    convention, so that a scheduler can tell it from a finished run (0)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each flag's default to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "(default:" in text or default is None or default is False \
                or default == argparse.SUPPRESS or not action.option_strings or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: <what is wrong>`, with exit status 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def run_script(main, argv=None):
    """Call main(argv). A UserError becomes one line on stderr and exit status 2; Stopped its
    message and 128 + its signal; Ctrl-C anywhere else one line and 130 (the shell's code for
    SIGINT; files are written atomically, so none is left half-written). Any other exception is a
    bug and keeps its traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); every file written so far is whole (each is written to a "
              "temporary file and renamed), and none is left half-written", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check(ok, message):
    """Raise UserError(message) unless ok."""
    if not ok:
        raise UserError(message)


MAX_COUNT = 2 ** 31 - 1  # the largest step, batch, interval or seed a flag may give


def check_number(flag, value, low=None, high=None, open_low=False, open_high=False):
    """UserError unless `value` (a flag's int or float) is finite and within the range: [low,
    high], open at an end where asked; None leaves an end unbounded. Every number a flag takes is
    checked here, so NaN, infinities and values past what the code can hold all get one line."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    low_text, high_text = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
    ends = (f"{'>' if open_low else '>='} {low_text}" if high is None else
            f"{'<' if open_high else '<='} {high_text}" if low is None else
            f"in {'(' if open_low else '['}{low_text}, {high_text}{')' if open_high else ']'}")
    ok = (integer or (isinstance(value, float) and math.isfinite(value))) and \
        (low is None or (value > low if open_low else value >= low)) and \
        (high is None or (value < high if open_high else value <= high))
    check(ok, f"{flag} must be {'an integer' if integer else 'a finite number'} {ends}, "
          f"got {value}")


def first_line(err, limit=160):
    """The first line of an exception's message, cut to `limit` characters (its type's name when
    the message is empty): what a one-line error quotes of a library's longer message."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
