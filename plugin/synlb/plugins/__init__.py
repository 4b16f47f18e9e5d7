"""Plugins of the host (``synlb run``), named in ``[synlb] plugins``.

A plugin is a module that declares, next to its code:

- ``SECTIONS``: {section name or prefix: Schema} of its own INI sections;
- ``TARGET_OPTIONS`` / ``SERVICE_OPTIONS``: the options it adds to the
  ``[target:NAME]`` / ``[service:NAME]`` sections, as a Schema (whose
  ``checks`` are its cross-key checks, see schema.py) or a list of Options;
- ``create(host) -> Plugin``.

Names without a dot are modules of this package (``lb`` is
``synlb.plugins.lb``); a dotted name is imported as is, for plugins shipped
elsewhere.  A name that does not import, or a module without ``create``, makes
``synlb check`` fail naming the plugin.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import UserError


class PluginError(UserError):
    """A plugin named in [synlb] plugins that does not import or has no create()."""


def load_module(name: str):
    modname = name if "." in name else f"{__name__}.{name}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            raise PluginError(f"no plugin {name!r} (module {modname} not found)") from None
        raise PluginError(f"plugin {name!r} is broken: {e}") from None
    except Exception as e:  # noqa: BLE001 - a broken plugin must not crash `check`
        raise PluginError(f"plugin {name!r} is broken: {type(e).__name__}: {e}") from None
    if not callable(getattr(mod, "create", None)):
        raise PluginError(f"plugin {name!r} ({modname}) has no create(host)")
    return mod


class Plugin:
    """What the host calls; every method has a do-nothing default."""

    name = "plugin"

    def __init__(self, host: Any):
        self.host = host

    def start(self) -> None:
        """Start threads or sockets; called once before the first reconcile."""

    def reconcile(self, cfg, node: "NodeState") -> list[str]:
        """Converge to ``node`` under ``cfg``; return what changed. Idempotent."""
        return []

    def teardown(self) -> list[str]:
        """Remove what this plugin installed (the host is stopping or going inactive)."""
        return []

    def stop(self) -> None:
        """Stop threads; called once at host exit, after teardown if any."""

    def status(self) -> dict:
        return {}


class NodeState:
    """What this router should be doing, derived from the last VRRP event."""

    def __init__(self, vrrp: str, active: bool, reason: str):
        self.vrrp = vrrp      # MASTER, BACKUP, FAULT, STOP, DELETED, or STANDALONE
        self.active = active  # data plane installed (master, or hot-standby backup)
        self.reason = reason

    def __repr__(self) -> str:
        return f"NodeState({self.vrrp}, active={self.active})"

    def __eq__(self, other) -> bool:
        return isinstance(other, NodeState) and (self.vrrp, self.active) == (other.vrrp, other.active)
