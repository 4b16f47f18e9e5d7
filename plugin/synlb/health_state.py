"""Which targets are out of the Maglev active set, as a file in the state dir.

The health checker writes it; the data plane reads it when it writes the
workers' tables (worker_table.py).  A missing file means every target is in.
"""

from __future__ import annotations

import hashlib
import json
import os


def _path(state_dir: str) -> str:
    return os.path.join(state_dir, "targets-down.json")


def down_targets(state_dir: str, service: str) -> set[str]:
    try:
        with open(_path(state_dir)) as fh:
            return set(json.load(fh).get(service, []))
    except (FileNotFoundError, ValueError):
        return set()


def write_down(state_dir: str, down: dict[str, list[str]]) -> None:
    path = _path(state_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({k: sorted(v) for k, v in down.items()}, fh)
    os.replace(tmp, path)


def digest(state_dir: str) -> str:
    """Changes whenever the down set changes: workers rebuild their table then."""
    try:
        with open(_path(state_dir), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return "all-up"
    return hashlib.sha256(data).hexdigest()[:12]


def clear(state_dir: str) -> None:
    try:
        os.unlink(_path(state_dir))
    except FileNotFoundError:
        pass
