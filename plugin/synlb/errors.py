"""Errors a user can cause, and how a command reports them.

Everything a user can cause and fix (a config problem, a missing interface,
iptables refusing a rule, a worker that cannot bind its queue, keepalived not
on the bus, another host already running...) is a :class:`UserError`: the
command prints its :meth:`~UserError.lines` and exits 1. Any other exception
is a bug in synlb and keeps its traceback.

Pure: no kernel, no files.
"""

from __future__ import annotations

import sys

EXIT_USER = 1
EXIT_UNCONFIGURED = 3  # synlb check: no problem, but no service either (the shipped synlb.ini)
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix. ``lines()`` is what to print, one line
    each; they are printed as ``synlb COMMAND: line`` unless the class says
    its lines name their place themselves (``FILE:SECTION:KEY: why``)."""

    #: lines are printed after ``synlb COMMAND: `` (False: they stand alone)
    prefixed = True

    def __init__(self, *lines: str):
        self._lines = [str(line) for line in lines]
        super().__init__("\n".join(self._lines))

    def lines(self) -> list[str]:
        return [" ".join(line.split()) for line in self._lines] or [type(self).__name__]


def print_lines(command: str, e: UserError, file=None) -> None:
    out = sys.stderr if file is None else file
    for line in e.lines():
        print(f"synlb {command}: {line}" if e.prefixed else line, file=out)


def run_reporting(command: str, fn) -> int:
    """Run ``fn() -> int``; a user error is printed and gives exit 1 (a
    permission error too: synlb must run as root). Anything else propagates."""
    try:
        return fn()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UserError as e:
        print_lines(command, e)
        return EXIT_USER
    except PermissionError as e:
        print(f"synlb {command}: permission denied: {e.filename or e} (run as root)", file=sys.stderr)
        return EXIT_USER
