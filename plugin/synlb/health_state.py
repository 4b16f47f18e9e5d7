"""Which targets are out of the Maglev active set, as a file in the state dir.

The health checker writes it; the data plane reads it when it writes the
workers' tables (worker_table.py).  A missing file means every target is in.
"""

from __future__ import annotations

import hashlib
import logging

from . import statedir

log = logging.getLogger("synlb.health")


def _path(state_dir: str) -> str:
    return statedir.targets_down(state_dir)


def down_targets(state_dir: str, service: str) -> set[str]:
    """The service's targets out of the active set (see :func:`down_sets`)."""
    return down_sets(state_dir, [service])[service]


def down_sets(state_dir: str, services) -> dict[str, set[str]]:
    """Each of ``services``' targets out of the active set, from one read of
    the file. A file that is not what ``write_down`` writes counts as none
    down (logged): the health plugin rewrites it at its next check round, and
    until then every target stays in rather than the whole data plane failing."""
    none: dict[str, set[str]] = {s: set() for s in services}
    try:
        data = statedir.read_json(_path(state_dir))
    except FileNotFoundError:
        return none
    except ValueError as e:
        log.warning("%s: not JSON, read as no target down: %s", _path(state_dir), e)
        return none
    for svc in services:
        names = data.get(svc, []) if isinstance(data, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            log.warning("%s: not a {service: [target, ...]} object, read as no target down", _path(state_dir))
            continue
        none[svc] = set(names)
    return none


def write_down(state_dir: str, down: dict[str, list[str]]) -> None:
    statedir.write_json(_path(state_dir), {k: sorted(v) for k, v in down.items()})


def digest(state_dir: str) -> str:
    """Changes whenever the down set changes: workers rebuild their table then."""
    try:
        data = statedir.read_bytes(_path(state_dir))
    except FileNotFoundError:
        return "all-up"
    except ValueError:  # a symlink or no file: down_targets reads it as none down
        data = b"not a file"
    return hashlib.sha256(data).hexdigest()[:12]


def clear(state_dir: str) -> None:
    statedir.remove(_path(state_dir))
