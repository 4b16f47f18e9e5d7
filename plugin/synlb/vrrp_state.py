"""The host's view of VRRP: which node state follows from which event.

Without a [vrrp] section the node is standalone and always active.
"""

from __future__ import annotations

from .plugins import NodeState


def initial(cfg) -> NodeState:
    if "vrrp" not in cfg.extra:
        return NodeState("STANDALONE", True, "start")
    return NodeState("INIT", False, "start")


def apply(cfg, node: NodeState, event: dict) -> NodeState | None:
    return None
