"""The pins a router's workers follow, as a file in the state dir
(``workers/pins.json``: root's, readable by the workers' group).

The sync plugin writes it (every peer's pins, merged) and SIGUSR1s the
workers; a worker reads it at start and on SIGUSR1.  A missing file means
no pins.
"""

from __future__ import annotations

from . import statedir
from .pins import Pins, PinsError, from_json, to_json

__all__ = ["PinsError", "load", "write", "clear", "path"]


def path(state_dir: str) -> str:
    return statedir.pins(state_dir)


def load(state_dir: str) -> Pins:
    """The pins in the file; PinsError when it is not what ``write`` writes."""
    try:
        data = statedir.read_json(path(state_dir))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise PinsError(f"{path(state_dir)}: not JSON ({e})") from None
    return from_json(data)


def write(state_dir: str, pins: Pins) -> None:
    """Replace the file atomically: a worker reads the old or the new pins, never half."""
    statedir.write_json(path(state_dir), to_json(pins), share=True, separators=(",", ":"))


def clear(state_dir: str) -> None:
    statedir.remove(path(state_dir))
