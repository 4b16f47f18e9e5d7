"""The pins a router's workers follow, as a file in the state dir.

The sync plugin writes it (every peer's pins, merged) and SIGUSR1s the
workers; a worker reads it at start and on SIGUSR1.  A missing file means
no pins.
"""

from __future__ import annotations

import json
import os
import tempfile

from .pins import Pins, PinsError, from_json, to_json

__all__ = ["PinsError", "load", "write", "clear", "path"]


def path(state_dir: str) -> str:
    return os.path.join(state_dir, "pins.json")


def load(state_dir: str) -> Pins:
    """The pins in the file; PinsError when it is not what ``write`` writes."""
    try:
        with open(path(state_dir), "rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise PinsError(f"{path(state_dir)}: not JSON ({e})") from None
    return from_json(data)


def write(state_dir: str, pins: Pins) -> None:
    """Replace the file atomically: a worker reads the old or the new pins, never half."""
    fd, tmp = tempfile.mkstemp(prefix=".pins-", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(to_json(pins), fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path(state_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def clear(state_dir: str) -> None:
    try:
        os.unlink(path(state_dir))
    except FileNotFoundError:
        pass
