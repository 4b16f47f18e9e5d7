"""Conntrack loose pickup: set while synlb is active, restore after.

With ``nf_conntrack_tcp_loose=1`` and ``nf_conntrack_tcp_be_liberal=1`` a
router that never saw a connection's handshake adopts it from its first
packet, which is what lets a new master keep running sessions.  Both are per
network namespace.  The values found before the first activation are saved in
the state dir, so that the last deactivation restores exactly them.

Only these two sysctls are ever written: :func:`restore` writes back a
saved value only for a name of :data:`PICKUP` and only if it is a small
integer, whatever else the saved file holds (anything else is logged and
left alone: the file is read back as root, and a name such as
``../../kernel/hostname`` would otherwise be a path under /proc/sys).
"""

from __future__ import annotations

import logging
import os
import re

from . import statedir
from .errors import UserError

log = logging.getLogger(__name__)

PICKUP = {
    "net/netfilter/nf_conntrack_tcp_loose": "1",
    "net/netfilter/nf_conntrack_tcp_be_liberal": "1",
}
SAVED = statedir.SYSCTL_SAVED
_VALUE_RE = re.compile(r"[0-9]{1,3}")  # what these sysctls read as (0 or 1)


class SysctlError(UserError):
    """The pickup sysctls cannot be set (conntrack not loaded here)."""


def _path(name: str) -> str:
    return os.path.join("/proc/sys", name)


def read(name: str) -> str:
    with open(_path(name)) as fh:
        return fh.read().strip()


def write(name: str, value: str) -> None:
    if name not in PICKUP:  # never any other file under /proc/sys
        raise ValueError(f"sysctl {name!r}: not one synlb sets")
    with open(_path(name), "w") as fh:
        fh.write(value)


def ensure_conntrack() -> None:
    """The nf_conntrack sysctls exist only once conntrack is loaded in this namespace."""
    if not os.path.exists(_path(next(iter(PICKUP)))):
        raise SysctlError("conntrack sysctls missing: is nf_conntrack loaded? (modprobe nf_conntrack)")


def activate(state_dir: str) -> list[str]:
    """Save current values once, then set the pickup values. Returns what changed."""
    ensure_conntrack()
    saved_file = statedir.sysctl_saved(state_dir)
    if not statedir.is_file(saved_file):  # (a symlink there is replaced, never followed)
        statedir.write_json(saved_file, {name: read(name) for name in PICKUP})
    changes = []
    for name, value in PICKUP.items():
        if read(name) != value:
            write(name, value)
            changes.append(f"sysctl {name.replace('/', '.')}={value}")
    return changes


def restore(state_dir: str) -> list[str]:
    """Put back what ``activate`` found; forget the saved values."""
    saved_file = statedir.sysctl_saved(state_dir)
    try:
        saved = statedir.read_json(saved_file)
    except FileNotFoundError:
        return []
    except ValueError as e:
        log.error("%s: not what synlb saved, nothing restored from it: %s", saved_file, e)
        saved = {}
    if not isinstance(saved, dict):
        log.error("%s: not a {sysctl: value} object, nothing restored from it", saved_file)
        saved = {}
    changes = []
    for name, value in saved.items():
        if name not in PICKUP:
            log.error("%s: %r is not a sysctl synlb sets: not written", saved_file, name)
            continue
        if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
            log.error("%s: %s = %r is not a value synlb saved: not written", saved_file, name, value)
            continue
        if os.path.exists(_path(name)) and read(name) != value:
            write(name, value)
            changes.append(f"sysctl {name.replace('/', '.')}={value}")
    statedir.remove(saved_file)
    return changes


def current() -> dict[str, str]:
    return {name.replace("/", "."): (read(name) if os.path.exists(_path(name)) else "n/a")
            for name in PICKUP}


def drift(active: bool) -> list[str]:
    """The pickup sysctls that are not as they should be while synlb is
    ``active`` (both on); nothing is expected of them while it is not."""
    if not active:
        return []
    out = []
    for name, want in PICKUP.items():
        try:
            have = read(name)
        except OSError as e:
            have = f"unreadable ({e.strerror})"
        if have != want:
            out.append(f"sysctl {name.replace('/', '.')} = {have}, should be {want} (loose pickup)")
    return out
