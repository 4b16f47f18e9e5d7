"""Whether this router is ready to take the traffic over, and why not.

keepalived lowers a router's VRRP priority from a file (``track_file`` with
a weight, conf/keepalived.conf.example): ``synlb run`` keeps that file
(``[vrrp] ready_file``) saying ``0`` while the router is ready and ``1``
while it is not, so that ``weight -N`` takes N off the priority of a router
that is not ready and its peer keeps (or takes) the traffic. Ready means:

- the data plane is as the node state wants it: the lb plugin's last
  reconcile succeeded, and with ``standby = hot`` it is installed (a BACKUP
  whose hot standby is missing would take over with nothing to carry the
  traffic; with ``cold`` it is only installed once MASTER);
- while installed, a worker serves every NFQUEUE queue of the configuration;
- the health plugin's view has settled since the host started and since the
  last link up: every checked target has had a check that started after
  that and agreed with the target's state (see :func:`settled`).

This module only judges the facts the plugins report (:class:`DataPlane`,
:class:`Checks`); the host gathers them and writes the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .vrrp.events import NodeState

READY, NOT_READY = b"0\n", b"1\n"  # the file's two contents: value x weight is added to the priority
SHOWN = 5  # names listed in a reason; the rest are counted


@dataclass(frozen=True)
class DataPlane:
    """The lb plugin's facts."""
    error: str | None      # why its last reconcile failed; None when it succeeded
    installed: bool        # the data plane it last reconciled to is installed
    wanted: frozenset      # NFQUEUE queues of the configuration (while installed)
    served: frozenset      # queues a live worker of this state dir holds


@dataclass(frozen=True)
class Checks:
    """The health plugin's facts."""
    pending: tuple         # checked targets whose view has not settled since ``since``
    since: str             # "host start", "link back up", ...


@dataclass(frozen=True)
class Unknown:
    """A plugin that could not tell (its facts raised): not ready, to be safe."""
    why: str


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple = ()    # why not, each one line; () when ready

    def content(self) -> bytes:
        return READY if self.ready else NOT_READY

    def describe(self) -> str:
        return "ready" if self.ready else "not ready: " + "; ".join(self.reasons)


STARTING = Readiness(False, ("synlb run is starting",))
STOPPED = Readiness(False, ("synlb run has stopped",))


def settled(up: bool, ok: bool) -> bool:
    """A check result settles a target's view when it agrees with the state
    the target is in once the result is counted: up and passing, or down and
    failing. A result still on its way to ``rise`` or ``fall`` does not: the
    view is about to change. Whatever the results, a view settles within
    max(rise, fall) checks (a run of disagreeing results is a run of equal
    ones, and ``rise`` or ``fall`` of them flip the target)."""
    return up == ok


def _names(names: Iterable) -> str:
    names = [str(n) for n in sorted(names)]
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def decide(node: NodeState, standby: str | None, facts: Iterable) -> Readiness:
    """Judge the plugins' facts (:class:`DataPlane`, :class:`Checks`,
    :class:`Unknown`; a fact
    of a plugin that is not loaded is simply absent) for ``node`` (the host's
    node state) and the ``[vrrp] standby`` (None: no [vrrp], standalone)."""
    reasons = []
    for f in facts:
        if isinstance(f, DataPlane):
            if f.error is not None:
                reasons.append(f"the data plane's last reconcile failed: {f.error}")
            elif node.active and not f.installed:
                reasons.append("the data plane is not installed")
            elif not node.active and standby == "hot":
                reasons.append(f"the hot standby is not installed (VRRP {node.vrrp})")
            if f.installed and f.wanted - f.served:
                q = sorted(f.wanted - f.served)
                reasons.append(f"no worker serves queue{'s' * (len(q) > 1)} {_names(q)}")
        elif isinstance(f, Checks) and f.pending:
            reasons.append(f"health checks not settled since {f.since}: {_names(f.pending)}")
        elif isinstance(f, Unknown):
            reasons.append(f"cannot tell: {f.why}")
    return Readiness(not reasons, tuple(reasons))
