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

import contextlib
import os
from typing import Any

# What plugins and the host use, defined where the config loader and the
# VRRP journal need them too (lower layers, docs/ARCHITECTURE.md):
from ..config import PluginError  # noqa: F401  (re-exported)
from ..config import plugin_module as load_module  # noqa: F401  (re-exported)
from ..vrrp.events import NodeState  # noqa: F401  (re-exported)


class Plugin:
    """What the host calls; every method has a do-nothing default."""

    name = "plugin"

    def __init__(self, host: Any):
        self.host = host

    def start(self) -> None:
        """Start threads or sockets; called once before the first reconcile."""

    def prepare(self, cfg, node: "NodeState") -> list[str]:
        """Called on every plugin before any plugin reconciles to ``node``
        under ``cfg`` (and, with an inactive node, before the teardowns at
        host stop): stop offering what the coming state removes, while it
        is still there (the bgp plugin withdraws the VIPs before the data
        plane goes). Return what changed."""
        return []

    def reconcile(self, cfg, node: "NodeState") -> list[str]:
        """Converge to ``node`` under ``cfg``; return what changed. Idempotent."""
        return []

    def teardown(self) -> list[str]:
        """Remove what this plugin installed (the host is stopping or going inactive)."""
        return []

    def stop(self) -> None:
        """Stop threads; called once at host exit, after teardown if any."""

    def link_up(self, name: str, at: float) -> None:
        """Link ``name`` of the router came up at ``at`` (time.monotonic(),
        when the lb plugin's link watcher saw it); called on the host thread.
        What was learned over the links before may be stale (the health
        plugin checks every target again)."""

    def ready_facts(self, cfg, node: "NodeState") -> list:
        """What this plugin knows of whether the router is ready to take the
        traffic over: facts of ``synlb.ready`` (DataPlane, Checks) that
        ``ready.decide`` judges. A plugin with a thread of its own that sees
        a fact change submits ``"ready"`` to the host."""
        return []

    def status(self) -> dict:
        return {}


class Wakeup:
    """A file descriptor that one thread selects on beside its own input and
    that any thread makes readable with :meth:`poke` (stop, new work): the
    thread sleeps until there is something to do instead of waking up to
    look. One per waiting thread: the waiter drains what it was poked with."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it is readable already
            os.write(self._w, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 512):
                pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
