"""Deliver a VRRP event: the one entry point of every event source.

:func:`deliver` (``synlb notify``, ``synlb fifo``, ``synlb dbus`` and the
host's ``dbus`` plugin all end in it), under the data plane lock
(``dataplane.locked``):

1. records the event in the journal if it is newer than the one recorded
   (``journal.record``, see the journal for the ordering), and
2. reconciles the whole data plane to the *recorded* (latest) state:
   ``dataplane.up_locked`` or ``dataplane.down_locked``, both idempotent.

So concurrent or repeated events never interleave, never leave half-applied
rules, and a late stale invocation cannot undo a newer one: it re-applies
the newer state.

When a plugin host (``synlb run``) listens on the state dir's control
socket, it owns the data plane: the event is recorded, then handed to the
host, which follows the recorded state (``journal.node``).

Detaching. keepalived kills a STOP script's process group after 1 s and
sends every script SIGTERM when it exits; neither may interrupt a teardown
half way. The hook runs synlb under ``setsid`` (at once, before Python
starts), and the apply itself runs in a child in its own session
(:func:`run_detached`), which also keeps worker processes from being
children of a long-running FIFO or D-Bus listener (no zombies there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field

from .. import config as config_mod
from .. import control, dataplane, statedir
from ..errors import run_reporting
from . import journal
from .events import VrrpConfig, VrrpError, VrrpEvent

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ config

@dataclass
class Loaded:
    path: str
    vcfg: VrrpConfig
    state_dir: str
    route_protocol: int
    cfg: config_mod.Config | None  # None: the config is broken; only teardown is possible
    error: config_mod.ConfigError | None = None


def _no_section(path: str) -> config_mod.ConfigError:
    why = "no [vrrp] section: name the keepalived sync_group or instance that drives this node"
    return config_mod.ConfigError([(path, "vrrp", "-", why)])


def load(path: str | None) -> Loaded:
    """The config and its ``[vrrp]`` section.

    A config that does not load still allows a teardown (FAULT/STOP must
    never be blocked by a typo made since the last ``up``) if ``[synlb]`` and
    ``[vrrp]`` themselves are fine; ``Loaded.cfg`` is then None.

    The state dir is checked (statedir.ensure) before anything uses it.
    """
    main = config_mod.config_path(path)
    try:
        cfg = config_mod.load(main)
    except config_mod.ConfigError as err:
        try:
            g, vcfg = config_mod.load_teardown(main)
        except config_mod.ConfigError:
            raise err from None
        if vcfg is None:
            raise
        statedir.ensure(g.state_dir)
        return Loaded(main, vcfg, g.state_dir, g.route_protocol, None, err)
    if cfg.vrrp is None:
        raise _no_section(main)
    statedir.ensure(cfg.globals.state_dir)
    return Loaded(main, cfg.vrrp, cfg.globals.state_dir, cfg.globals.route_protocol, cfg)


# ------------------------------------------------------------------ deliver

@dataclass
class Result:
    event: VrrpEvent
    ignored: bool = False
    stored: bool = False
    latest: VrrpEvent | None = None
    active: bool | None = None
    changes: list = field(default_factory=list)
    host: dict | None = None  # the plugin host's answer, when it owns the data plane

    def summary(self) -> str:
        if self.ignored:
            return f"{self.event.describe()}: not about this node's [vrrp] group/instance, ignored"
        how = "recorded" if self.stored else f"older than {self.latest.state} already recorded"
        what = "active" if self.active else "inactive"
        if self.host is not None:
            return f"{self.event.describe()}: {how}; passed to synlb run (node {self.host.get('node')})"
        n = len(self.changes)
        return f"{self.event.describe()}: {how}; data plane {what} ({n} change{'s' * (n != 1)})"


def deliver(config_path: str | None, event: VrrpEvent, stamp: journal.Stamp) -> Result:
    """Record ``event`` (if newest) and reconcile to the latest state, under
    the data plane lock, or hand it to the running host. Raises
    ConfigError/LiveError/... on failure (the event is recorded even then,
    so the next reconcile uses it)."""
    ld = load(config_path)
    event = event.about(ld.vcfg.kind, ld.vcfg.name)
    res = Result(event)
    if not ld.vcfg.matches(event):
        res.ignored = True
        journal.log_event(ld.state_dir, event, stamp, ignored=True)
        return res
    host = os.path.exists(control.socket_path(ld.state_dir))
    with dataplane.locked(ld.state_dir):
        latest, stored = journal.record(ld.state_dir, ld.vcfg, event, stamp)
        res.latest, res.stored = latest, stored
        res.active = ld.vcfg.node(latest).active
        entry = {"event": event.to_dict(), "stamp": list(stamp), "stored": stored,
                 "latest": latest.state, "active": res.active}
        if not host:
            _reconcile(ld, latest, entry, res)
    if host:
        # outside the lock: the host's own reconcile takes it
        answer = control.request(ld.state_dir, {"cmd": "vrrp", "event": event.to_dict()})
        if answer is not None:
            res.host = answer
            journal.log(ld.state_dir, {**entry, "host": answer})
            if not answer.get("ok"):
                raise VrrpError(f"synlb run did not take the event: {answer.get('error', answer)}")
        else:  # the host went away meanwhile: reconcile here, to the latest record
            with dataplane.locked(ld.state_dir):
                cur = journal.latest(ld.state_dir, ld.vcfg)
                latest = cur.event if cur is not None else latest
                res.latest, res.active = latest, ld.vcfg.node(latest).active
                _reconcile(ld, latest, {**entry, "latest": latest.state, "active": res.active}, res)
    for c in res.changes:
        log.info("vrrp %s: %s", latest.state, c)
    return res


def _reconcile(ld: Loaded, latest: VrrpEvent, entry: dict, res: Result) -> None:
    """The data plane to ``latest`` (caller holds the lock); logged."""
    reason = f"vrrp {latest.kind} {latest.name} {latest.state}"
    try:
        if res.active:
            if ld.cfg is None:
                raise ld.error
            res.changes = dataplane.up_locked(ld.path, ld.cfg, reason)
        else:
            res.changes = dataplane.down_locked(ld.state_dir, ld.route_protocol)
        if ld.cfg is not None:
            res.changes += dataplane.forget_connections(ld.cfg, latest.state)
    except Exception as e:
        entry["error"] = " ".join(str(e).split()) or type(e).__name__
        journal.log(ld.state_dir, entry)
        raise
    entry["changes"] = res.changes
    journal.log(ld.state_dir, entry)


# ------------------------------------------------------------------ detached

def deliver_detached(command: str, config_path: str | None, event: VrrpEvent, stamp: journal.Stamp) -> int:
    """:func:`deliver` in a detached child, its one-line summary on stdout:
    what the long-running sources (fifo, dbus) do for each event, so their
    own state never mixes with the data plane's."""
    def run() -> int:
        res = deliver(config_path, event, stamp)
        print(f"synlb {command}: {res.summary()}", flush=True)
        return 0

    rc = run_detached(lambda: run_reporting(command, run))
    sys.stdout.flush()
    return rc


def run_detached(fn) -> int:
    """Run ``fn() -> int`` in a child in a new session and wait for it.

    Killing this process (or its process group, as keepalived does to a STOP
    script after 1 s) does not stop the child: the apply always completes.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        rc = 1
        try:
            os.setsid()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_IGN)
            rc = fn()
        except BaseException:  # noqa: BLE001 - report, never unwind into the parent's code
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(rc if isinstance(rc, int) else 1)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 1
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
