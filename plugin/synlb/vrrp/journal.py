"""The VRRP journal in the state dir: the newest event (``vrrp-state.json``)
and the log of every event seen (``vrrp.log``). Files only: no kernel.

Ordering. keepalived forks its notify scripts in order but they run
concurrently and may reach the lock in any order. A notify event's stamp is
the fork time of the process keepalived started (the hook passes its own
``/proc/PID/stat`` start time and pid in ``SYNLB_NOTIFY_STAMP``; without the
hook, this process's), on the boot clock, with the pid as tie-break within
one clock tick (pids grow with each fork). So the order is the order in
which keepalived started the scripts, not the order in which they got the
CPU (a stamp taken once Python is up would be). FIFO and D-Bus events are
delivered in order; they are stamped with the boot clock when read. Stamps
are only compared within one boot (the stored boot id), so a state dir that
outlives a reboot never blocks new events.

:func:`record` stores an event only if it is newer than the one stored; the
caller holds the data plane lock (``dataplane.locked``). :func:`latest` is
the one test of which stored event still counts (this boot, about this
node's group/instance): ``record`` uses it, and so do ``synlb notify`` and
the host when they derive the node state from it (``VrrpConfig.node``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

from .. import statedir
from .events import NodeState, VrrpConfig, VrrpEvent

STATE_FILE = statedir.VRRP_STATE
LOG_FILE = statedir.VRRP_LOG
LOG_MAX = 1 << 20  # rotate vrrp.log beyond 1 MiB (one old copy kept)

Stamp = tuple  # (boot clock ns, tie-break)
ENV_STAMP = "SYNLB_NOTIFY_STAMP"


# ------------------------------------------------------------------ stamps

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def process_stamp(pid: int | None = None) -> Stamp:
    """When ``pid`` (default: this process) was forked, on the boot clock,
    with the pid as tie-break within a clock tick."""
    pid = os.getpid() if pid is None else pid
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    hz = os.sysconf("SC_CLK_TCK")
    return (ticks * (1_000_000_000 // hz), pid)


def notify_stamp() -> Stamp:
    """The stamp of a ``synlb notify`` call: the hook's fork time and pid
    (``SYNLB_NOTIFY_STAMP="TICKS PID"``, set by hooks/keepalived-notify), else
    this process's own."""
    env = os.environ.get(ENV_STAMP, "").split()
    if len(env) == 2 and all(x.isdigit() for x in env):
        hz = os.sysconf("SC_CLK_TCK")
        return (int(env[0]) * (1_000_000_000 // hz), int(env[1]))
    return process_stamp()


_last_now = 0


def now_stamp() -> Stamp:
    """Boot clock now, strictly increasing within this process."""
    global _last_now
    t = max(time.clock_gettime_ns(time.CLOCK_BOOTTIME), _last_now + 1)
    _last_now = t
    return (t, 0)


# ------------------------------------------------------------------ the newest event

def read_state(state_dir: str) -> dict | None:
    """The stored record as it is: ``{"event", "stamp", "boot_id", "recorded"}``."""
    try:
        d = statedir.read_json(statedir.vrrp_state(state_dir))
        d["event"] = VrrpEvent.from_dict(d["event"])
        d["stamp"] = tuple(d["stamp"])
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if len(d["stamp"]) != 2 or not all(type(x) is int for x in d["stamp"]):
        return None  # not a stamp: it could not be compared with a new event's
    return d


def _write_state(state_dir: str, event: VrrpEvent, stamp: Stamp) -> None:
    statedir.write_json(statedir.vrrp_state(state_dir), {
        "event": event.to_dict(), "stamp": list(stamp), "boot_id": boot_id(), "recorded": time.time()})


@dataclass(frozen=True)
class Latest:
    event: VrrpEvent
    stamp: Stamp


def latest(state_dir: str, vcfg: VrrpConfig) -> Latest | None:
    """The stored event if it still counts: recorded this boot, about the
    group/instance ``vcfg`` names. None otherwise (nothing that counts)."""
    cur = read_state(state_dir)
    if cur is None or cur.get("boot_id") != boot_id() or not vcfg.matches(cur["event"]):
        return None
    return Latest(cur["event"], cur["stamp"])


def record(state_dir: str, vcfg: VrrpConfig, event: VrrpEvent, stamp: Stamp) -> tuple[VrrpEvent, bool]:
    """Store ``event`` if it is newer than the stored one (caller holds the
    lock). Returns (the latest event, whether ``event`` was stored)."""
    cur = latest(state_dir, vcfg)
    if cur is None or tuple(stamp) > cur.stamp:
        _write_state(state_dir, event, stamp)
        return event, True
    return cur.event, False


def node(state_dir: str, vcfg: VrrpConfig, reason: str | None = None) -> NodeState | None:
    """The node state that follows from the latest event (None: nothing
    about this node's group/instance is recorded this boot)."""
    cur = latest(state_dir, vcfg)
    return None if cur is None else vcfg.node(cur.event, reason)


# ------------------------------------------------------------------ the log

def log(state_dir: str, entry: dict) -> None:
    """Append one entry to ``vrrp.log`` (never raises: the log is best effort)."""
    path = statedir.vrrp_log(state_dir)
    with contextlib.suppress(OSError):
        if os.lstat(path).st_size > LOG_MAX:
            os.replace(path, statedir.vrrp_log_old(state_dir))
    entry = {"time": round(time.time(), 6), "pid": os.getpid(), **entry}
    with contextlib.suppress(OSError, ValueError, statedir.StateDirError):
        statedir.ensure(state_dir)
        with statedir.open_append(path) as fh:
            fh.write((json.dumps(entry) + "\n").encode())


def log_event(state_dir: str, event: VrrpEvent, stamp: Stamp, **what) -> None:
    """Log an event that is not applied (``ignored=True``, ``superseded=True``)."""
    log(state_dir, {"event": event.to_dict(), "stamp": list(stamp), **what})


def read_log(state_dir: str) -> list[dict]:
    """Entries of ``vrrp.log`` (oldest first), for status and tests."""
    out = []
    for path in (statedir.vrrp_log_old(state_dir), statedir.vrrp_log(state_dir)):
        with contextlib.suppress(FileNotFoundError, ValueError):
            for line in statedir.read_bytes(path).splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out
