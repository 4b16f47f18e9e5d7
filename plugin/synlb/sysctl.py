"""Conntrack loose pickup: set while synlb is active, restore after.

With ``nf_conntrack_tcp_loose=1`` and ``nf_conntrack_tcp_be_liberal=1`` a
router that never saw a connection's handshake adopts it from its first
packet, which is what lets a new master keep running sessions.  Both are per
network namespace.  The values found before the first activation are saved in
the state dir, so that the last deactivation restores exactly them.
"""

from __future__ import annotations

import json
import os

from .errors import UserError

PICKUP = {
    "net/netfilter/nf_conntrack_tcp_loose": "1",
    "net/netfilter/nf_conntrack_tcp_be_liberal": "1",
}
SAVED = "sysctl-saved.json"


class SysctlError(UserError):
    """The pickup sysctls cannot be set (conntrack not loaded here)."""


def _path(name: str) -> str:
    return os.path.join("/proc/sys", name)


def read(name: str) -> str:
    with open(_path(name)) as fh:
        return fh.read().strip()


def write(name: str, value: str) -> None:
    with open(_path(name), "w") as fh:
        fh.write(value)


def ensure_conntrack() -> None:
    """The nf_conntrack sysctls exist only once conntrack is loaded in this namespace."""
    if not os.path.exists(_path(next(iter(PICKUP)))):
        raise SysctlError("conntrack sysctls missing: is nf_conntrack loaded? (modprobe nf_conntrack)")


def activate(state_dir: str) -> list[str]:
    """Save current values once, then set the pickup values. Returns what changed."""
    ensure_conntrack()
    saved_file = os.path.join(state_dir, SAVED)
    if not os.path.exists(saved_file):
        saved = {name: read(name) for name in PICKUP}
        tmp = saved_file + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(saved, fh)
        os.replace(tmp, saved_file)
    changes = []
    for name, value in PICKUP.items():
        if read(name) != value:
            write(name, value)
            changes.append(f"sysctl {name.replace('/', '.')}={value}")
    return changes


def restore(state_dir: str) -> list[str]:
    """Put back what ``activate`` found; forget the saved values."""
    saved_file = os.path.join(state_dir, SAVED)
    try:
        with open(saved_file) as fh:
            saved = json.load(fh)
    except FileNotFoundError:
        return []
    changes = []
    for name, value in saved.items():
        if os.path.exists(_path(name)) and read(name) != value:
            write(name, value)
            changes.append(f"sysctl {name.replace('/', '.')}={value}")
    os.unlink(saved_file)
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
