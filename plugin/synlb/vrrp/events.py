"""keepalived (VRRP) events: notify arguments, notify_fifo lines and D-Bus
state codes become one :class:`VrrpEvent`; the ``[vrrp]`` section says which
keepalived sync group or instance drives this node and what each state means.

Pure: no kernel, no files, no processes. ``config.load()`` parses
``[vrrp]`` with :data:`VRRP_SCHEMA` into ``Config.vrrp`` (a
:class:`VrrpConfig`); the journal, the delivery and the event sources are the
other modules of this package.

States and what they make of the data plane (``standby`` = hot by default)::

    MASTER                  active
    BACKUP                  active (hot: chains, routes, workers ready, so a
                            takeover needs nothing from synlb) / inactive (cold)
    FAULT, STOP, DELETED    inactive: everything synlb installed is removed
    INIT                    inactive (keepalived starting; BACKUP follows)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UserError
from ..schema import Option, OptionError, Schema, words

GROUP = "GROUP"
INSTANCE = "INSTANCE"
KINDS = (GROUP, INSTANCE)

STATES = ("INIT", "BACKUP", "MASTER", "FAULT", "STOP", "DELETED")
ACTIVE_STATES = ("MASTER",)
HOT_STATES = ("BACKUP",)

#: keepalived's VRRP_STATE_* numbers, as D-Bus ``State`` / ``VrrpStatusChange`` carry them
DBUS_STATES = {0: "INIT", 1: "BACKUP", 2: "MASTER", 3: "FAULT", 97: "DELETED", 98: "STOP"}

SOURCES = ("notify", "fifo", "dbus")


class VrrpArgError(UserError):
    """Arguments or a line that are not a keepalived notification."""


class VrrpError(UserError):
    """A VRRP event source cannot do its job; the message says why."""


@dataclass(frozen=True)
class VrrpEvent:
    """One VRRP state notification, whatever carried it.

    ``kind``/``name`` are None for the short form ``notify STATE`` (a
    ``notify_master``-style script without keepalived's arguments): it is
    about whatever the ``[vrrp]`` section names.
    """
    source: str
    kind: str | None
    name: str | None
    state: str
    priority: int | None = None

    def about(self, kind: str, name: str) -> VrrpEvent:
        """This event with the configured kind/name filled in (short form)."""
        if self.kind is not None:
            return self
        return VrrpEvent(self.source, kind, name, self.state, self.priority)

    def describe(self) -> str:
        prio = "" if self.priority is None else f" {self.priority}"
        return f"{self.kind} {self.name} {self.state}{prio} ({self.source})"

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "name": self.name,
                "state": self.state, "priority": self.priority}

    @classmethod
    def from_dict(cls, d: dict) -> VrrpEvent:
        return cls(str(d["source"]), d.get("kind"), d.get("name"), str(d["state"]), d.get("priority"))


# ------------------------------------------------------------------ parsing

def _state(text: str) -> str:
    s = text.strip().upper()
    if s not in STATES:
        raise VrrpArgError(f"{text!r} is not a VRRP state ({', '.join(STATES[1:])})")
    return s


def _kind(text: str) -> str:
    k = text.strip().upper()
    if k not in KINDS:
        raise VrrpArgError(f"{text!r} is not GROUP or INSTANCE")
    return k


def _priority(text: str) -> int:
    try:
        p = int(text)
    except ValueError:
        raise VrrpArgError(f"priority {text!r} is not an integer") from None
    if not 0 <= p <= 255:
        raise VrrpArgError(f"priority {p} is out of range 0..255")
    return p


def parse_notify_args(argv: list[str], source: str = "notify") -> VrrpEvent:
    """keepalived's notify arguments: ``GROUP|INSTANCE NAME STATE PRIORITY``
    (the generic ``notify`` script); also ``TYPE NAME STATE`` and a bare
    ``STATE`` (for ``notify_master "hook MASTER"`` and the like)."""
    if len(argv) == 4:
        return VrrpEvent(source, _kind(argv[0]), argv[1], _state(argv[2]), _priority(argv[3]))
    if len(argv) == 3:
        return VrrpEvent(source, _kind(argv[0]), argv[1], _state(argv[2]))
    if len(argv) == 1:
        return VrrpEvent(source, None, None, _state(argv[0]))
    raise VrrpArgError(f"expected GROUP|INSTANCE NAME STATE PRIORITY (or STATE alone), got "
                       f"{len(argv)} argument{'s' * (len(argv) != 1)}")


FIFO_LINE = re.compile(r'^(GROUP|INSTANCE) "(.*)" (\S+) (\d+)$')


def parse_fifo_line(line: str | bytes) -> VrrpEvent | None:
    """One notify_fifo line, e.g. ``GROUP "G1" MASTER 0``.

    Returns None for lines that are not a VRRP state change: the checker's
    ``VS``/``RS`` lines, ``MASTER_RX_LOWER_PRI`` and the priority-change
    events, anything garbled.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    m = FIFO_LINE.match(line.strip("\r\n"))
    if not m:
        return None
    kind, name, state, prio = m.groups()
    if state not in STATES or state == "INIT":
        return None
    return VrrpEvent("fifo", kind, name, state, min(int(prio), 255))


def state_from_dbus(code: int) -> str | None:
    """keepalived's numeric state (D-Bus) -> state name; None if unknown."""
    return DBUS_STATES.get(int(code))


def group_state(states: Iterable[str]) -> str:
    """The state of a sync group from its members' states (D-Bus has no
    group objects). keepalived moves members together; while they differ
    (a transition in progress) the most cautious reading wins: any FAULT ->
    FAULT, any STOP/DELETED -> that, MASTER only when every member is."""
    states = list(states)
    if not states:
        return "STOP"
    for bad in ("FAULT", "STOP", "DELETED", "INIT"):
        if bad in states:
            return bad
    if all(s == "MASTER" for s in states):
        return "MASTER"
    return "BACKUP"


def desired_active(state: str, standby: str) -> bool:
    """Whether the data plane is installed in ``state``."""
    if state in ACTIVE_STATES:
        return True
    if state in HOT_STATES:
        return standby == "hot"
    return False


class NodeState:
    """What this router should be doing, derived from the last VRRP event."""

    def __init__(self, vrrp: str, active: bool, reason: str):
        self.vrrp = vrrp      # MASTER, BACKUP, FAULT, STOP, DELETED, INIT, or STANDALONE
        self.active = active  # data plane installed (master, or hot-standby backup)
        self.reason = reason

    def __repr__(self) -> str:
        return f"NodeState({self.vrrp}, active={self.active})"

    def __eq__(self, other) -> bool:
        return isinstance(other, NodeState) and (self.vrrp, self.active) == (other.vrrp, other.active)


def standalone(reason: str) -> NodeState:
    """The node without a [vrrp] section: always active."""
    return NodeState("STANDALONE", True, reason)


# ------------------------------------------------------------------ config

def _name(text: str) -> str:
    t = text.strip()
    if not t or any(c.isspace() or c == '"' for c in t):
        raise OptionError(f"{text!r} is not a keepalived name (no spaces or quotes)")
    return t


def _standby(text: str) -> str:
    t = text.strip().lower()
    if t not in ("hot", "cold"):
        raise OptionError(f"{text!r} is not one of hot, cold")
    return t


def _ready_file(text: str) -> str | None:
    t = text.strip()
    if not t:
        return None
    if not t.startswith("/"):
        raise OptionError(f"{text!r} is not an absolute path")
    # keepalived reads it as a quoted string: no quote, no space, no control character
    if any(c.isspace() or c == '"' or ord(c) < 32 for c in t):
        raise OptionError(f"{t!r}: keepalived's track_file cannot name a path with spaces or quotes")
    if t.endswith("/") or t.rsplit("/", 1)[1] in (".", ".."):
        raise OptionError(f"{t!r} names a directory, not a file")
    return t


DBUS_INSTANCE = re.compile(r"^([^/\s]{1,15})/(\d{1,3})/(IPv4|IPv6)$")


def _dbus_instances(text: str) -> tuple:
    out = []
    for item in words(text):
        m = DBUS_INSTANCE.match(item)
        if not m or not 1 <= int(m.group(2)) <= 255:
            raise OptionError(f"{item!r} is not IFNAME/VRID/IPv4|IPv6 (e.g. eth0/51/IPv4)")
        out.append(item)
    return tuple(out)


def _check(vals: dict) -> list[tuple[str, str]]:
    if "sync_group" not in vals or "instance" not in vals:
        return []  # a value did not parse: already reported
    if vals["sync_group"] and vals["instance"]:
        return [("instance", "set sync_group or instance, not both")]
    if not vals["sync_group"] and not vals["instance"]:
        return [("-", "name what drives this node: sync_group = NAME or instance = NAME")]
    return []


VRRP_SCHEMA = Schema("vrrp", [
    Option("sync_group", _name, None, "keepalived vrrp_sync_group whose state drives this node"),
    Option("instance", _name, None, "or: the keepalived vrrp_instance whose state drives this node"),
    Option("standby", _standby, "hot",
           "BACKUP state: hot = data plane installed (takeover needs no action), "
           "cold = removed until MASTER"),
    Option("dbus_instances", _dbus_instances, (),
           "synlb dbus: keepalived instance objects to follow, as IFNAME/VRID/IPv4|IPv6; "
           "default: every instance keepalived exposes (sync_group) or the one named by instance"),
    Option("ready_file", _ready_file, None,
           "synlb run keeps this file saying 0 while the router is ready to take over, 1 while not, "
           "for keepalived's track_file (conf/keepalived.conf.example); in a directory that exists "
           "when keepalived starts, not the state dir; default: none"),
], checks=[_check])


@dataclass(frozen=True)
class VrrpConfig:
    kind: str  # GROUP or INSTANCE
    name: str
    standby: str  # hot or cold
    dbus_instances: tuple = ()
    ready_file: str | None = None  # the track_file synlb run keeps (ready.py); None: none

    def matches(self, ev: VrrpEvent) -> bool:
        return ev.kind == self.kind and ev.name == self.name

    def active(self, state: str) -> bool:
        return desired_active(state, self.standby)

    def node(self, latest: VrrpEvent, reason: str | None = None) -> NodeState:
        """The node state that follows from the latest recorded event (what
        ``synlb notify`` reconciles to, and what the host follows)."""
        return NodeState(latest.state, self.active(latest.state),
                         reason or f"vrrp {latest.state} ({latest.source})")


def vrrp_config(vals: dict) -> VrrpConfig:
    """From the parsed ``[vrrp]`` values (already checked)."""
    if vals.get("sync_group"):
        kind, name = GROUP, vals["sync_group"]
    else:
        kind, name = INSTANCE, vals["instance"]
    return VrrpConfig(kind, name, vals.get("standby", "hot"), tuple(vals.get("dbus_instances", ())),
                      vals.get("ready_file"))
