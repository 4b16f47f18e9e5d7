"""``synlb run``: the long-running plugin host.

One thread applies changes: every event source (control socket, signals,
plugins' own threads) only submits events, and the host thread turns the
latest state into one serialized reconcile of every plugin.  Events that
arrive while a reconcile runs are coalesced into the next one.

The host thread also judges whether the router is ready to take the traffic
over (ready.py, from the plugins' facts) after every reconcile and whenever
a plugin says a fact changed, and keeps ``[vrrp] ready_file`` saying so for
keepalived's track_file: not ready from before anything starts until the
first judgement, and again from the moment the host stops.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from . import config as config_mod
from . import control, plugins, ready, statedir
from .vrrp import journal
from .vrrp.events import NodeState, standalone

log = logging.getLogger("synlb.host")

RETRY_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # seconds before the n-th retry of a failed reconcile


@dataclass
class Event:
    kind: str  # reconcile, reload, stop, vrrp, link (a link came up), ready (a readiness fact changed)
    data: dict = field(default_factory=dict)
    done: threading.Event | None = None
    result: dict = field(default_factory=dict)


class Host:
    def __init__(self, config_path: str, cfg: config_mod.Config):
        self.config_path = config_path
        self.cfg = cfg
        self.events: queue.Queue[Event] = queue.Queue()
        self.plugins = [plugins.load_module(n).create(self) for n in cfg.globals.plugins]
        self.node = self.initial_node_state(cfg)
        self.transitions = 0
        self.started = time.time()
        self.history: list[dict] = []
        self.failing: dict | None = None  # the last reconcile's errors and the next retry, while failing
        self.ready = False  # READY=1 sent to systemd: once, after the first reconcile that converged
        self.readiness = ready.STARTING  # ready to take the traffic over (keepalived's track_file)
        self.ready_since = time.time()
        self._ready_written: tuple[str, bytes] | None = None  # (path, content) last written

    # ------------------------------------------------------------ events
    def submit(self, kind: str, data: dict | None = None, *, reason: str | None = None,
               wait: bool = False, timeout: float = 30.0) -> bool | None:
        """Queue an event for the host thread; with ``wait``, return once it was applied."""
        data = dict(data or {})
        if reason is not None:
            data["reason"] = reason
        ev = Event(kind, data, threading.Event() if wait else None)
        self.events.put(ev)
        if wait:
            return ev.done.wait(timeout)
        return None

    def initial_node_state(self, cfg) -> NodeState:
        return initial_node(cfg)

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        # before anything: whatever the file said (a crashed host, keepalived's
        # init_file), this router is not ready until the first judgement
        if not self._set_readiness(ready.STARTING):
            return 1
        signal.signal(signal.SIGHUP, lambda *_: self.submit("reload"))
        signal.signal(signal.SIGTERM, lambda *_: self.submit("stop"))
        signal.signal(signal.SIGINT, lambda *_: self.submit("stop"))
        statedir.ensure(self.cfg.globals.state_dir)
        ctl = control.ControlServer(control.socket_path(self.cfg.globals.state_dir), self.handle_request)
        ctl.start()
        for p in self.plugins:
            try:
                p.start()
            except Exception as e:  # noqa: BLE001 - one clear line, then leave nothing behind
                log.error("plugin %s failed to start: %s", p.name, e)
                for q in self.plugins:
                    q.stop()
                ctl.stop()
                return 1
        log.info("host started: plugins %s, node %s", ",".join(p.name for p in self.plugins), self.node.vrrp)
        self.reconcile("start")
        try:
            while True:
                wait = None if self.failing is None else max(0.0, self.failing["next"] - time.monotonic())
                try:
                    batch = [self.events.get(timeout=wait)]
                except queue.Empty:  # a plugin failed last time: try again
                    self.reconcile(f"retry {self.failing['attempts']} after: {self.failing['errors'][0]}")
                    continue
                while True:  # coalesce what piled up during the last reconcile
                    try:
                        batch.append(self.events.get_nowait())
                    except queue.Empty:
                        break
                if self.handle(batch):
                    break
        finally:
            # not ready first, so that keepalived lowers the priority (and a
            # ready peer takes over) while the data plane still carries the traffic
            self._set_readiness(ready.STOPPED)
            # stopping is going inactive: every plugin prepares for it before
            # any teardown (the bgp plugin withdraws the VIPs and lets the
            # upstream move the flows while the data plane still carries them)
            self.node = NodeState(self.node.vrrp, False, "host stop")
            for c in self._prepare(self.node)[0]:
                log.info("stop: %s", c)
            sd_notify("STOPPING=1")
            for p in reversed(self.plugins):
                try:
                    for c in p.teardown():
                        log.info("stop: %s", c)
                except Exception:  # noqa: BLE001 - tear down the others regardless
                    log.exception("teardown of plugin %s failed", p.name)
            for p in self.plugins:
                p.stop()
            ctl.stop()
        log.info("host stopped")
        return 0

    def handle(self, batch: list[Event]) -> bool:
        """Apply a batch of events; True when the host must stop."""
        stop = any(e.kind == "stop" for e in batch)
        reasons = []
        judge = False
        if not stop:
            for e in batch:
                if e.kind == "link":
                    self._link_up(e.data)
                    judge = True
                    if e.data.get("reconcile"):
                        reasons.append(e.data.get("reason", "link up"))
                elif e.kind == "ready":
                    judge = True
                elif e.kind == "reload":
                    if self.reload():
                        reasons.append("reload")
                elif e.kind == "vrrp":
                    node = vrrp_node(self.cfg, self.node, e.data)
                    if node is not None:
                        self.node = node
                        reasons.append(node.reason)
                elif e.kind == "reconcile":
                    reasons.append(e.data.get("reason", "reconcile"))
            if reasons:
                self.reconcile("; ".join(dict.fromkeys(reasons)))  # judges readiness too
            elif judge:
                self.judge_readiness()
        for e in batch:
            if e.done:
                e.result["node"] = self.node.vrrp
                e.done.set()
        return stop

    def reload(self) -> bool:
        try:
            cfg = config_mod.load(self.config_path)
        except config_mod.ConfigError as e:
            for line in e.lines():
                log.error("reload refused, keeping the running config: %s", line)
            return False
        if cfg.globals.plugins != self.cfg.globals.plugins or cfg.globals.state_dir != self.cfg.globals.state_dir:
            log.error("reload refused: plugins and state_dir only change with a restart")
            return False
        self.cfg = cfg
        log.info("configuration reloaded from %s", self.config_path)
        return True

    def _prepare(self, node: NodeState) -> tuple[list[str], list[str]]:
        changes, errors = [], []
        for p in self.plugins:
            try:
                changes += [f"{p.name}: {c}" for c in p.prepare(self.cfg, node)]
            except Exception as e:  # noqa: BLE001 - reported; the reconcile goes on
                log.error("%s: plugin %s failed to prepare: %s", node.reason, p.name, e)
                changes.append(f"{p.name}: FAILED {e}")
                errors.append(f"{p.name}: {e}")
        return changes, errors

    def reconcile(self, reason: str) -> None:
        node = NodeState(self.node.vrrp, self.node.active, reason)
        changes, errors = self._prepare(node)
        for p in self.plugins:
            try:
                changes += [f"{p.name}: {c}" for c in p.reconcile(self.cfg, node)]
            except Exception as e:  # noqa: BLE001 - one plugin's failure is reported, the host goes on
                log.error("%s: plugin %s failed: %s", reason, p.name, e)
                changes.append(f"{p.name}: FAILED {e}")
                errors.append(f"{p.name}: {e}")
        # A failed reconcile (iptables-restore losing a lock, a full disk...)
        # leaves the router short of its desired state: try again with
        # backoff until every plugin converges, whatever event comes next.
        if errors:
            attempts = (self.failing or {}).get("attempts", 0) + 1
            delay = RETRY_BACKOFF[min(attempts - 1, len(RETRY_BACKOFF) - 1)]
            self.failing = {"since": (self.failing or {}).get("since", time.time()), "attempts": attempts,
                            "errors": errors, "next": time.monotonic() + delay, "retry_in": delay}
            log.warning("reconcile failed (attempt %d), retrying in %g s", attempts, delay)
        elif self.failing is not None:
            log.info("reconcile converged after %d failed attempts", self.failing["attempts"])
            self.failing = None
        if not errors and not self.ready:  # systemd (Type=notify): the data plane is reconciled
            self.ready = True
            sd_notify("READY=1")
        self.transitions += 1
        self.history = (self.history + [{"time": time.time(), "reason": reason, "node": node.vrrp,
                                         "active": node.active, "changes": len(changes)}])[-50:]
        log.info("%s: node %s (%s): %s", reason, node.vrrp, "active" if node.active else "inactive",
                 "; ".join(changes) if changes else "no change")
        self.judge_readiness()

    # ------------------------------------------------------------ readiness
    def _link_up(self, data: dict) -> None:
        name, at = data.get("name", "?"), data.get("at", time.monotonic())
        for p in self.plugins:
            try:
                p.link_up(name, at)
            except Exception as e:  # noqa: BLE001 - the others still hear of it
                log.error("plugin %s failed on link %s up: %s", p.name, name, e)

    def judge_readiness(self) -> None:
        """Gather every plugin's facts, judge them (ready.decide), keep the file saying so."""
        facts = []
        for p in self.plugins:
            try:
                facts += p.ready_facts(self.cfg, self.node)
            except Exception as e:  # noqa: BLE001 - a plugin that cannot tell makes the router not ready
                log.error("plugin %s cannot tell whether the router is ready: %s", p.name, e)
                facts.append(ready.Unknown(f"{p.name}: {e}"))
        self._set_readiness(ready.decide(self.node, self.cfg.vrrp.standby if self.cfg.vrrp else None, facts))

    def ready_path(self) -> str | None:
        return self.cfg.vrrp.ready_file if self.cfg.vrrp else None

    def _set_readiness(self, r: ready.Readiness) -> bool:
        """Record ``r`` and write the file when its content changes; False
        when the file could not be written (logged; tried again next time)."""
        if r != self.readiness:
            # logged when it flips or a reason comes or goes, not for each
            # target of a pending list that shrinks as the checks come in
            if r.ready != self.readiness.ready or _kinds(r) != _kinds(self.readiness):
                (log.info if r.ready else log.warning)("this router is %s", r.describe())
            self.readiness, self.ready_since = r, time.time()
        path = self.ready_path()
        old = self._ready_written
        ok = True
        if old is not None and old[0] != path and old[1] != ready.NOT_READY:
            ok = self._write_ready(old[0], ready.NOT_READY)  # a file no longer kept must not stay saying ready
        if path is not None and old != (path, r.content()):
            ok = self._write_ready(path, r.content()) and ok
        return ok

    def _write_ready(self, path: str, content: bytes) -> bool:
        try:
            statedir.write_file(path, lambda fh: fh.write(content))
        except OSError as e:
            log.error("cannot write [vrrp] ready_file %s: %s", path, e.strerror or e)
            self._ready_written = None
            return False
        self._ready_written = (path, content)
        return True

    # ------------------------------------------------------------ control socket
    def handle_request(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            failing = None if self.failing is None else {k: v for k, v in self.failing.items() if k != "next"}
            r = self.readiness
            return {"ok": True, "node": self.node.vrrp, "active": self.node.active, "failing": failing,
                    "ready": {"ready": r.ready, "reasons": list(r.reasons), "since": self.ready_since,
                              "file": self.ready_path()},
                    "plugins": {p.name: p.status() for p in self.plugins},
                    "transitions": self.transitions, "history": self.history[-10:],
                    "started": self.started}
        if cmd == "vrrp":
            done = self.submit("vrrp", req.get("event", {}), wait=True)
            return {"ok": bool(done), "node": self.node.vrrp}
        if cmd == "reload":
            done = self.submit("reload", wait=True)
            return {"ok": bool(done)}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def _kinds(r: ready.Readiness) -> tuple:
    return tuple(reason.split(":")[0] for reason in r.reasons)


# ------------------------------------------------------------ node state
# Without a [vrrp] section the node is standalone and always active. With
# one, the VRRP event sources record the latest event in the journal,
# ordered by their stamps, and then tell the host "vrrp". The host does not
# trust the order in which those requests arrive: it follows the record
# (journal.node, the same test and the same state as `synlb notify`'s), so
# the node always ends on the last event delivered.

def initial_node(cfg) -> NodeState:
    if cfg.vrrp is None:
        return standalone("start")
    # keepalived may have spoken before the host started
    return journal.node(cfg.globals.state_dir, cfg.vrrp, "start") or NodeState("INIT", False, "start")


def vrrp_node(cfg, node: NodeState, event: dict) -> NodeState | None:
    """A source recorded a VRRP event (``event``, as the request carried
    it): the node follows the latest record, whatever ``event`` says (None:
    standalone, or nothing about this node's group/instance is recorded)."""
    if cfg.vrrp is None:
        return None
    return journal.node(cfg.globals.state_dir, cfg.vrrp)


# ------------------------------------------------------------ systemd
def sd_notify(message: str) -> bool:
    """sd_notify(3) without libsystemd: send ``message`` ("READY=1",
    "STOPPING=1", ...) as one datagram to the socket systemd names in
    $NOTIFY_SOCKET (a path, or "@name" in the abstract namespace). False
    without $NOTIFY_SOCKET or when sending failed (logged, never raised)."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] not in "/@":
        log.warning("NOTIFY_SOCKET=%s: only unix sockets are supported", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), "\0" + addr[1:] if addr[0] == "@" else addr)
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", message.split("\n")[0], e)
        return False
    return True


def main(config_path: str) -> int:
    logging.getLogger().setLevel(logging.INFO)
    cfg = config_mod.load(config_path)
    return Host(config_path, cfg).run()
