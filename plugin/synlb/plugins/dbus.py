"""dbus: the host follows keepalived over D-Bus itself, instead of a separate
``synlb dbus`` process (keepalived needs ``enable_dbus``; the [vrrp] section
names the sync group or instance, as for every VRRP event source).

The listener runs GLib's main loop in its own thread; each change of the
derived VRRP state is delivered like every other source's (vrrp/delivery.py):
recorded, then handed to the host, which reconciles every plugin.  The bus is
the system bus, or ``$DBUS_SYSTEM_BUS_ADDRESS``.
"""

from __future__ import annotations

import logging
import threading

from . import Plugin

log = logging.getLogger("synlb.dbus")

SECTIONS: dict = {}
RETRY = 2.0  # seconds between attempts while the bus is not there


class DbusPlugin(Plugin):
    name = "dbus"

    def __init__(self, host):
        super().__init__(host)
        self._loop = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.following: int = 0

    def start(self) -> None:
        if self.host.cfg.vrrp is None:
            self.error = "no [vrrp] section: nothing to follow"
            log.error("dbus: %s", self.error)
            return
        self._thread = threading.Thread(target=self._run, name="dbus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ..vrrp import dbus as dbus_source
        from ..vrrp import delivery

        plugin = self

        class InHost(dbus_source.Listener):
            def apply(self, ev, stamp) -> None:
                # record, then the host's control socket: the host thread applies it
                res = delivery.deliver(plugin.host.config_path, ev, stamp)
                log.info("dbus: %s", res.summary())

        while not self._stop.is_set():
            try:
                loop = dbus_source.GLibLoop()
                bus = dbus_source.connect()
                lst = InHost(self.host.config_path, bus, loop, wait=True)
                lst.subscribe()
                lst.resync("start")
                self.following, self.error = len(lst.states), None
                self._loop = loop
                if self._stop.is_set():
                    return
                loop.run()
                if lst.error is None:
                    return
                self.error = lst.error
            except Exception as e:  # noqa: BLE001 - keep trying: the bus may come later
                self.error = str(e)
            log.warning("dbus: %s; retrying in %.0f s", self.error, RETRY)
            self._stop.wait(RETRY)

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.GLib.idle_add(self._loop.quit)

    def status(self) -> dict:
        summary = f"error: {self.error}" if self.error else f"following {self.following} instance(s)"
        return {"summary": summary, "error": self.error, "instances": self.following}


def create(host) -> DbusPlugin:
    return DbusPlugin(host)
