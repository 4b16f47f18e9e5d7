"""The host's view of VRRP: which node state follows from which event.

Without a [vrrp] section the node is standalone and always active.

With one, the VRRP event sources (``synlb notify``, ``synlb fifo``,
``synlb dbus``) record the latest event in the state dir, ordered by their
stamps (see vrrp_apply.py), and then tell a running host "vrrp". The host
does not trust the order in which those requests arrive: it follows the
recorded state, so the node always ends on the last event delivered.
"""

from __future__ import annotations

from .plugins import NodeState


def initial(cfg) -> NodeState:
    if "vrrp" not in cfg.extra:
        return NodeState("STANDALONE", True, "start")
    # keepalived may have spoken before the host started
    return recorded(cfg, "start") or NodeState("INIT", False, "start")


def apply(cfg, node: NodeState, event: dict) -> NodeState | None:
    """A source recorded a VRRP event: the node follows the latest record
    (None: nothing about this node's group/instance is recorded)."""
    if "vrrp" not in cfg.extra:
        return None
    return recorded(cfg)


def recorded(cfg, reason: str | None = None) -> NodeState | None:
    from . import vrrp, vrrp_apply
    vc = vrrp.vrrp_config(cfg.extra["vrrp"])
    st = vrrp_apply.read_state(cfg.globals.state_dir)
    if st is None or st.get("boot_id") != vrrp_apply.boot_id() or not vc.matches(st["event"]):
        return None
    ev = st["event"]
    return NodeState(ev.state, vc.active(ev.state), reason or f"vrrp {ev.state} ({ev.source})")
