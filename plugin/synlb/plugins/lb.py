"""lb: the data plane (chains, routes, pickup sysctls, NFQUEUE workers), kept
converged while the host runs.

Besides reconciling on every transition it supervises the workers (a worker
that dies is restarted within a second, with backoff when it keeps dying) and
watches links: the kernel drops per-target routes when a link goes down and
never puts them back (docs/DESIGN-NOTES.md#3, routes are lost with their
link), so a link coming up triggers a reconcile; the host tells every
plugin about it (``link_up``: the health plugin checks every target again
before the router counts as ready).

Its facts for the router's readiness (ready.py): whether the last reconcile
succeeded, whether the data plane is installed, which queues a worker serves.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from .. import ready
from . import Plugin, Wakeup

# dataplane and workers (pyroute2, psutil) are imported where used: the config
# loader imports every named plugin, and the NFQUEUE workers load the config
# too, so a plugin module must stay cheap to import.

log = logging.getLogger("synlb.lb")

SECTIONS: dict = {}
BACKOFF = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before the n-th quick restart
# Another program may change what synlb installed (a router's own commit
# rewriting nf_conntrack_tcp_loose, deleting ip rules, flushing tables):
# compare the kernel with the desired state this often, and reconcile.
DRIFT_INTERVAL = 1.0
DEAD_WORKER = (": not running", ": does not hold its queue")  # dataplane.drift's words for them
STABLE_AFTER = 30.0  # a worker that lived this long resets its backoff
IFF_UP_RUNNING = 0x1 | 0x40  # administratively up, and carrier (operationally up)


class LbPlugin(Plugin):
    name = "lb"

    def __init__(self, host):
        super().__init__(host)
        self.restarts: dict[int, int] = {}
        self._recent: dict[int, list[float]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # the supervisor looks again when the workers may have changed (a
        # reconcile, a dead worker the drift check saw) and at stop; the
        # link watcher at stop
        self._supervisor_wakeup: Wakeup | None = None
        self._links_wakeup: Wakeup | None = None
        self.active = False
        self.error: str | None = "not reconciled yet"  # why the last reconcile failed
        self.repairs = 0  # reconciles asked for because the kernel drifted
        self.last_drift: list[str] = []

    # ------------------------------------------------------------ host API
    def start(self) -> None:
        self._supervisor_wakeup, self._links_wakeup = Wakeup(), Wakeup()
        for target in (self._supervise, self._watch_links, self._watch_drift):
            t = threading.Thread(target=target, name=f"lb-{target.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)

    def reconcile(self, cfg, node) -> list[str]:
        from .. import dataplane
        g = cfg.globals
        try:
            if node.active:
                changes = dataplane.up(self.host.config_path, cfg, reason=node.reason)
            else:
                changes = dataplane.down(g.state_dir, g.route_protocol, reason=node.reason)
            changes += dataplane.forget_connections(cfg, node.vrrp)
        except Exception as e:
            self.error = str(e) or type(e).__name__
            raise
        self.error = None
        self.active = node.active
        self._poke_supervisor()
        return changes

    def ready_facts(self, cfg, node) -> list:
        from .. import workers
        wanted = frozenset(q for s in cfg.services for q in s.queues) if self.active else frozenset()
        served = workers.serving(cfg.globals.state_dir) if wanted else frozenset()
        return [ready.DataPlane(self.error, self.active, wanted, served)]

    def teardown(self) -> list[str]:
        from .. import dataplane
        g = self.host.cfg.globals
        self.active = False
        self.error = "host stop"
        changes = dataplane.down(g.state_dir, g.route_protocol, reason="host stop")
        self._poke_supervisor()
        return changes

    def stop(self) -> None:
        self._stop.set()
        # the pipes stay open: a thread still inside a reconcile it asked
        # for selects on its pipe once more before it sees the stop
        for w in (self._supervisor_wakeup, self._links_wakeup):
            if w is not None:
                w.poke()

    def _poke_supervisor(self) -> None:
        if self._supervisor_wakeup is not None:
            self._supervisor_wakeup.poke()

    def status(self) -> dict:
        return {"worker_restarts": dict(self.restarts), "drift_repairs": self.repairs,
                "last_drift": list(self.last_drift)}

    # ------------------------------------------------------------ drift
    def _watch_drift(self) -> None:
        from .. import dataplane
        while not self._stop.wait(DRIFT_INTERVAL):
            if not self.active:
                continue
            try:
                diffs = dataplane.drift(self.host.cfg)
            except Exception as e:  # noqa: BLE001 - a failed look is retried next round
                log.warning("drift check failed: %s", e)
                continue
            # a dead worker is the supervisor's: it restarts it with backoff
            # (told here too, for a worker it was not watching yet)
            if any(d.endswith(DEAD_WORKER) for d in diffs):
                self._poke_supervisor()
                self.host.submit("ready", reason="a worker does not serve its queue")
            diffs = [d for d in diffs if not d.endswith(DEAD_WORKER)]
            if not diffs:
                continue
            self.repairs += 1
            self.last_drift = diffs
            log.warning("the kernel drifted from the desired state: %s", "; ".join(diffs))
            more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
            self.host.submit("reconcile", reason=f"drift: {diffs[0]}{more}", wait=True)

    # ------------------------------------------------------------ supervision
    def _supervise(self) -> None:
        """Wait on pidfds of the running workers; when one exits, ask for a reconcile."""
        from .. import workers
        wakeup = self._supervisor_wakeup
        while not self._stop.is_set():
            if not self.active:
                select.select([wakeup], [], [])
                wakeup.drain()
                continue
            state_dir = self.host.cfg.globals.state_dir
            running = workers.running(state_dir)
            wanted = {q for s in self.host.cfg.services for q in s.queues}
            missing = wanted - {w.queue for w in running}
            if missing:
                self._restart(sorted(missing))
                continue
            fds = {}
            for w in running:
                try:
                    fds[os.pidfd_open(w.pid)] = w
                except (ProcessLookupError, OSError):
                    continue
            try:
                ready, _, _ = select.select([*fds, wakeup], [], [])
            finally:
                for fd in fds:
                    os.close(fd)
            if wakeup in ready:
                wakeup.drain()
            for fd in ready:
                if fd is wakeup:
                    continue
                w = fds[fd]
                _reap(w.pid)
                log.warning("worker queue %d (pid %d) exited", w.queue, w.pid)
                self.host.submit("ready", reason=f"worker queue {w.queue} exited")

    def _restart(self, queues: list[int]) -> None:
        now = time.monotonic()
        delay = 0.0
        for q in queues:
            recent = [t for t in self._recent.get(q, []) if now - t < STABLE_AFTER]
            delay = max(delay, BACKOFF[min(len(recent), len(BACKOFF) - 1)])
            self._recent[q] = recent + [now]
            self.restarts[q] = self.restarts.get(q, 0) + 1
        if delay and self._stop.wait(delay):
            return
        done = self.host.submit("reconcile", reason=f"restart worker queue {','.join(map(str, queues))}",
                                wait=True)
        if not done:
            self._stop.wait(0.5)

    # ------------------------------------------------------------ links
    def _watch_links(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK)
            was_up: dict[str, bool] = {}
            while not self._stop.is_set():
                r, _, _ = select.select([ipr, self._links_wakeup], [], [])
                if ipr not in r:
                    continue
                for msg in ipr.get():
                    name = msg.get_attr("IFLA_IFNAME")
                    up = msg["flags"] & IFF_UP_RUNNING == IFF_UP_RUNNING
                    if name and up and was_up.get(name) is False:
                        # stamped here: a check that started before it saw the link down
                        self.host.submit("link", {"name": name, "at": time.monotonic(),
                                                  "reconcile": self.active}, reason=f"link {name} up")
                    if name:
                        was_up[name] = up


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def create(host) -> LbPlugin:
    return LbPlugin(host)
