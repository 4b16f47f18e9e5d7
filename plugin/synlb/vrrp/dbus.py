"""``synlb dbus``: follow keepalived over D-Bus (``enable_dbus``).

keepalived exports one object per VRRP instance,
``/org/keepalived/Vrrp1/Instance/<ifname>/<vrid>/IPv4|IPv6`` (interface
``org.keepalived.Vrrp1.Instance``: property ``State`` = (code, name),
property ``Name``, signal ``VrrpStatusChange(u code)``), and
``/org/keepalived/Vrrp1/Vrrp`` with the signals ``VrrpStarted``,
``VrrpReloaded`` and ``VrrpStopped``. Codes: 0 Init, 1 Backup, 2 Master,
3 Fault, 97 Deleted, 98 Stop. There are no sync-group objects: a group's
state is derived from its members' (:func:`synlb.vrrp.events.group_state`).

Transitions made before a listener subscribed are never signalled, so the
listener reads ``State`` of every followed instance at start, after
``VrrpStarted``/``VrrpReloaded`` and when keepalived's bus name reappears;
``VrrpStopped`` or the name vanishing means STOP. Each change of the derived
state is delivered by :func:`synlb.vrrp.delivery.deliver` (in a detached
child, so the listener's own state never mixes with the data plane's).

Which instances: ``[vrrp] dbus_instances`` if set; otherwise, for
``instance = NAME`` the exported instance whose ``Name`` is NAME, and for
``sync_group`` every instance keepalived exports (list them in
``dbus_instances`` when keepalived also runs instances outside the group).

The main loop is GLib's (dbus-python's ``DBusGMainLoop`` on PyGObject's
``GLib.MainLoop``): signals are dispatched as they arrive, no polling.
"""

from __future__ import annotations

import logging
import re
import signal
import time
import xml.etree.ElementTree as ET

from ..errors import UserError
from . import delivery, journal
from .events import INSTANCE, VrrpEvent, group_state, state_from_dbus

log = logging.getLogger(__name__)

BUS_NAME = "org.keepalived.Vrrp1"
ROOT = "/org/keepalived/Vrrp1/Instance"
VRRP_PATH = "/org/keepalived/Vrrp1/Vrrp"
IFACE_INSTANCE = "org.keepalived.Vrrp1.Instance"
IFACE_VRRP = "org.keepalived.Vrrp1.Vrrp"
PROPS = "org.freedesktop.DBus.Properties"


RESYNC_RETRY = 0.5  # seconds between reads of State while keepalived is not answering
RESYNC_MIN_GAP = 0.2  # seconds between two resyncs that signals ask for
RESYNC_TRIES = 10


class ListenerError(UserError):
    """The bus or keepalived cannot be followed; the message says why."""


# ------------------------------------------------------------------ GLib main loop

class GLibLoop:
    """GLib's default main loop (PyGObject, Debian's python3-gi): run, quit,
    one-shot idle and timeout callbacks, Unix signal sources."""

    def __init__(self):
        try:
            from gi.repository import GLib
        except ImportError as e:
            raise ListenerError(f"cannot import GLib ({e}): apt-get install python3-gi") from None
        self.GLib = GLib
        self.loop = GLib.MainLoop()

    def run(self) -> None:
        self.loop.run()

    def quit(self) -> None:
        self.loop.quit()

    def idle_once(self, fn) -> None:
        """Call ``fn()`` once the loop is idle (after pending D-Bus messages)."""
        self.GLib.idle_add(self._once(fn))

    def later_once(self, seconds: float, fn) -> None:
        """Call ``fn()`` once, ``seconds`` from now."""
        self.GLib.timeout_add(int(seconds * 1000), self._once(fn))

    def _once(self, fn):
        def cb(*_):
            fn()
            return self.GLib.SOURCE_REMOVE
        return cb

    def on_signal(self, signum: int, fn) -> None:
        def cb(*_):
            fn()
            return self.GLib.SOURCE_CONTINUE
        self.GLib.unix_signal_add(self.GLib.PRIORITY_HIGH, signum, cb)


# ------------------------------------------------------------------ paths

def instance_path(spec: str) -> str:
    """``eth0/51/IPv4`` -> keepalived's object path (non-alphanumerics of the
    interface name become ``_``, as keepalived does)."""
    ifname, vrid, fam = spec.split("/")
    return f"{ROOT}/{re.sub(r'[^A-Za-z0-9]', '_', ifname)}/{int(vrid)}/{fam}"


def _children(xml_text: str) -> list[str]:
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return []
    return [n.get("name") for n in root.findall("node") if n.get("name")]


# ------------------------------------------------------------------ listener

class Listener:
    def __init__(self, config_path: str | None, bus, loop: GLibLoop, wait: bool):
        self.config_path = config_path
        self.bus = bus
        self.loop = loop
        self.wait = wait
        self.ld = delivery.load(config_path)
        self.states: dict[str, str] = {}  # object path -> state name
        self.excluded: set[str] = set()  # instances exported but not followed
        self.applied: str | None = None  # derived state last applied
        self.force = True  # apply even if unchanged (start, keepalived (re)started/reloaded)
        self.scheduled = False
        self.error: str | None = None
        self.last_resync = float("-inf")
        self.resync_pending = False

    # --- keepalived on the bus

    def owner(self) -> str | None:
        import dbus
        try:
            return str(self.bus.get_name_owner(BUS_NAME))
        except dbus.DBusException:
            return None

    def _call(self, path: str, method: str, *args, iface: str):
        obj = self.bus.get_object(BUS_NAME, path, introspect=False)
        return getattr(obj, method)(*args, dbus_interface=iface)

    def discover(self) -> list[str]:
        """Object paths of the instances to follow (the others exported go
        to ``self.excluded``)."""
        self.excluded = set()
        if self.ld.vcfg.dbus_instances:
            return [instance_path(s) for s in self.ld.vcfg.dbus_instances]
        intro = "org.freedesktop.DBus.Introspectable"
        paths = []
        for ifname in _children(self._call(ROOT, "Introspect", iface=intro)):
            for vrid in _children(self._call(f"{ROOT}/{ifname}", "Introspect", iface=intro)):
                for fam in _children(self._call(f"{ROOT}/{ifname}/{vrid}", "Introspect", iface=intro)):
                    paths.append(f"{ROOT}/{ifname}/{vrid}/{fam}")
        if self.ld.vcfg.kind == INSTANCE:
            mine = [p for p in paths
                    if str(self._call(p, "Get", IFACE_INSTANCE, "Name", iface=PROPS)) == self.ld.vcfg.name]
            self.excluded = set(paths) - set(mine)
            paths = mine
        return paths

    def read_states(self) -> dict[str, str]:
        import dbus
        states = {}
        for p in self.discover():
            try:
                code, _name = self._call(p, "Get", IFACE_INSTANCE, "State", iface=PROPS)
            except dbus.DBusException as e:
                log.warning("%s: %s", p, e.get_dbus_message())
                states[p] = "DELETED"  # configured but not exported: not running here
                continue
            states[p] = state_from_dbus(int(code)) or "INIT"
        return states

    def resync(self, why: str, attempt: int = 0) -> None:
        """Read every followed instance's State (keepalived there or not).

        keepalived gone: STOP. keepalived there but its instances not (yet)
        readable, as for a moment around a reload: keep the states known so
        far and read again shortly (a bounded number of times)."""
        import dbus
        self.ld = self._reload() or self.ld
        if self.owner() is None:
            if self.states:
                log.warning("keepalived is not on the bus (%s)", why)
            self.states, self.excluded = {}, set()
        else:
            try:
                states = self.read_states()
            except dbus.DBusException as e:
                log.warning("reading keepalived's states (%s): %s", why, e.get_dbus_message())
                states = {}
            if not states or "DELETED" in states.values():
                if attempt < RESYNC_TRIES:
                    self.loop.later_once(RESYNC_RETRY, lambda: self.resync(why, attempt + 1))
                    if self.states:
                        return  # keep what we know until keepalived answers
                else:
                    log.warning("keepalived exports none of the followed instances (%s)", why)
            self.states = states
        self.force = True
        self.schedule()

    def resync_soon(self, why: str) -> None:
        """A resync asked for by a signal: at most one per RESYNC_MIN_GAP,
        so that a burst of signals costs one read of every State."""
        now = time.monotonic()
        if self.resync_pending:
            return
        wait = self.last_resync + RESYNC_MIN_GAP - now
        if wait <= 0:
            self.last_resync = now
            self.resync(why)
            return
        self.resync_pending = True

        def later():
            self.resync_pending = False
            self.last_resync = time.monotonic()
            self.resync(why)
        self.loop.later_once(wait, later)

    def _reload(self):
        try:
            return delivery.load(self.config_path)
        except Exception as e:  # noqa: BLE001 - keep following with the config we have
            log.warning("config: %s", e)
            return None

    # --- signals

    def on_status(self, code, path=None) -> None:
        if path not in self.states:
            if path not in self.excluded and self.owner() is not None:
                self.resync_soon(f"signal from {path}")  # an instance not seen before
            return
        state = state_from_dbus(int(code))
        log.debug("VrrpStatusChange %s %s", path, state)
        if state is None:
            return
        self.states[path] = state
        self.schedule()

    def on_vrrp(self, member=None) -> None:
        log.debug("%s", member)
        if member in ("VrrpStarted", "VrrpReloaded"):
            self.resync_soon(member)
        elif member == "VrrpStopped":
            self.states = {p: "STOP" for p in self.states}
            self.schedule()

    def on_owner(self, name, old, new) -> None:
        if name != BUS_NAME:
            return
        if new:
            self.resync_soon("keepalived on the bus")
        else:
            self.states = {p: "STOP" for p in self.states} or {}
            self.schedule()

    def on_disconnected(self, *args) -> None:
        self.error = "lost the connection to the bus"
        self.loop.quit()

    # --- apply

    def derived(self) -> str:
        return group_state(self.states.values())

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.idle_once(self.evaluate)

    def evaluate(self) -> None:
        self.scheduled = False
        state = self.derived()
        log.debug("states %s -> %s (last applied %s%s)", self.states, state, self.applied,
                  ", forced" if self.force else "")
        if state == self.applied and not self.force:
            return
        self.force = False
        self.applied = state
        self.apply(VrrpEvent("dbus", self.ld.vcfg.kind, self.ld.vcfg.name, state), journal.now_stamp())

    def apply(self, ev: VrrpEvent, stamp) -> None:
        delivery.deliver_detached("dbus", self.config_path, ev, stamp)

    def subscribe(self) -> None:
        # Any local user may send signals on the system bus: a signal counts
        # only from the current owner of keepalived's name (dbus-python
        # follows the owner), and NameOwnerChanged only from the bus itself;
        # else anyone could fake FAULT or STOP and tear the master down.
        b = self.bus
        b.add_signal_receiver(self.on_status, signal_name="VrrpStatusChange", bus_name=BUS_NAME,
                              dbus_interface=IFACE_INSTANCE, path_keyword="path")
        b.add_signal_receiver(self.on_vrrp, dbus_interface=IFACE_VRRP, path=VRRP_PATH, bus_name=BUS_NAME,
                              member_keyword="member")
        b.add_signal_receiver(self.on_owner, signal_name="NameOwnerChanged", bus_name="org.freedesktop.DBus",
                              dbus_interface="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                              arg0=BUS_NAME)
        b.add_signal_receiver(self.on_disconnected, signal_name="Disconnected",
                              dbus_interface="org.freedesktop.DBus.Local")


def connect(address: str | None = None):
    """A bus connection dispatched by GLib's default main loop."""
    try:
        import dbus
        import dbus.bus
        import dbus.mainloop.glib
    except ImportError as e:
        raise ListenerError(f"dbus-python is not installed ({e})") from None
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    try:
        bus = dbus.bus.BusConnection(address) if address else dbus.SystemBus()
    except dbus.DBusException as e:
        raise ListenerError(f"cannot connect to the {'bus ' + address if address else 'system bus'}: "
                            f"{e.get_dbus_message() or e}") from None
    bus.set_exit_on_disconnect(False)
    return bus


def main(config_path: str | None, address: str | None = None, wait: bool = False) -> int:
    delivery.load(config_path)  # a config error is reported before touching the bus
    loop = GLibLoop()
    bus = connect(address)
    lst = Listener(config_path, bus, loop, wait)
    lst.subscribe()  # before reading State: no transition falls between the two
    if lst.owner() is None and not wait:
        raise ListenerError(f"keepalived is not on the bus ({BUS_NAME} has no owner): start it with "
                            "enable_dbus in global_defs, or pass --wait")
    lst.resync("start")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.on_signal(sig, loop.quit)
    print(f"synlb dbus: following {lst.ld.vcfg.kind.lower()} {lst.ld.vcfg.name} "
          f"({len(lst.states)} instance{'s' * (len(lst.states) != 1)})", flush=True)
    loop.run()
    if lst.error:
        raise ListenerError(lst.error)
    return 0
