"""health: keepalived-like checks of the real targets.

Per ``[target:NAME]`` (keys below, all optional): ``check = none | tcp | http
| exec``.  A target starts *up*; after ``fall`` consecutive failed checks it
goes *down*, after ``rise`` consecutive good ones it is *up* again.  Checks run
every ``check_interval`` seconds (counted from the start of the previous
check), each bounded by ``check_timeout``, from the host's own network
namespace (the router's) against the target's own address (its IPv4 address
if it has one, else its IPv6 one).

- ``tcp``: a TCP connection to ``check_port`` opens (and is closed at once);
- ``http``: ``GET check_path`` on ``check_port`` answers ``check_status``;
- ``exec``: ``check_command`` (absolute path, then arguments; no shell) exits
  0.  It must pass the same ownership test as the ``scripts`` plugin's
  executables (root-owned, no group/other write on it or its directories).
  It gets ``SYNLB_TARGET``, ``SYNLB_TARGET_ADDRESS`` and ``SYNLB_CHECK_PORT``
  (empty when unset) in its environment.

On every flip the down set is written to the state dir
(``health_state.write_down``) and the host is asked to reconcile: the lb
plugin's data plane then writes the workers' tables without the down
targets and SIGHUPs the workers, which rebuild their Maglev table (for a
service of the nftables engine, the reconcile changes the slots of the
kernel's map that differ, in one transaction).  Connections already
established are untouched: they carry their target's mark in conntrack.

For the router's readiness (ready.py, keepalived's track_file) a target's
view *settles* once a check that started since the host's start, and since
the last link up (``link_up``: every target is checked again at once),
agrees with the target's state; ``check = none`` is always settled. A view
stays settled until the next link up: a target that flaps later does not
make the router unready.

Cross-key problems (a tcp/http check without ``check_port``, an exec check
without ``check_command``) are reported by ``synlb check`` as
``FILE:target:NAME:KEY`` through :func:`check_target`, the cross-key check of
:data:`TARGET_OPTIONS`.
"""

from __future__ import annotations

import collections
import logging
import shlex
import socket
import threading
import time
from dataclasses import dataclass

from .. import health_state, proc, ready, trust
from ..schema import Option, OptionError, Schema, seconds
from ..schema import choice as _choice
from ..schema import integer as _int
from . import Plugin

# http.client, concurrent.futures and dataplane (pyroute2) are imported where
# used: the config loader imports every named plugin, and the NFQUEUE workers
# load the config at start, so a plugin module must stay cheap to import.

log = logging.getLogger("synlb.health")

HISTORY = 20        # transitions kept per target
RECENT = 10         # last check results kept per target (the "+-" string)
POOL = 8            # checks running at once


# ------------------------------------------------------------------ options

def _path(text: str) -> str:
    t = text.strip()
    if not t.startswith("/") or any(c.isspace() for c in t):
        raise OptionError(f"{text!r} is not an absolute URL path like /healthz")
    if not all(33 <= ord(c) <= 126 for c in t):  # what an HTTP request line can carry as is
        raise OptionError(f"{t!r} is not an absolute URL path of printable ASCII (percent-encode the rest)")
    return t


def _command(text: str) -> tuple:
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise OptionError(f"cannot split {text!r}: {e}") from None
    if not argv:
        raise OptionError("must not be empty")
    if not argv[0].startswith("/"):
        raise OptionError(f"{argv[0]!r} is not an absolute path (no shell, no PATH lookup)")
    return tuple(argv)


def check_target(parsed: dict) -> list[tuple[str, str]]:
    """Cross-key problems of one ``[target:NAME]``: [(key, why)]."""
    kind = parsed.get("check")
    out = []
    if kind in ("tcp", "http") and parsed.get("check_port") is None and "check_port" in parsed:
        out.append(("check_port", f"a {kind} check needs check_port"))
    if kind == "exec" and parsed.get("check_command") is None and "check_command" in parsed:
        out.append(("check_command", "an exec check needs check_command (an absolute path)"))
    return out


TARGET_OPTIONS = Schema("target", [
    Option("check", _choice("none", "tcp", "http", "exec"), "none",
           "health check: none (always up), tcp, http or exec"),
    Option("check_port", _int(1, 65535), None, "tcp/http: port on the target's address (required for them)"),
    Option("check_path", _path, "/", "http: path of the GET request"),
    Option("check_status", _int(100, 599), 200, "http: the status code that means healthy"),
    Option("check_command", _command, None,
           "exec: absolute path of an executable, then arguments (no shell); exit 0 = healthy"),
    Option("check_interval", seconds(0.05, 3600), 2.0, "seconds between the starts of two checks"),
    Option("check_timeout", seconds(0.01, 600), 1.0, "seconds before a check counts as failed"),
    Option("rise", _int(1, 1000), 2, "consecutive good checks that bring a down target back"),
    Option("fall", _int(1, 1000), 3, "consecutive failed checks that take an up target out"),
], checks=[check_target])

SECTIONS: dict = {}


# ------------------------------------------------------------------ checks

@dataclass(frozen=True)
class Check:
    kind: str
    address: str | None
    port: int | None
    path: str
    status: int
    command: tuple | None
    interval: float
    timeout: float
    rise: int
    fall: int
    # the target's IPv6 address when ``address`` is its IPv4 one: tcp and http
    # probe both, since the service takes connections over both families
    other_address: str | None = None

    @classmethod
    def of(cls, target) -> Check:
        o = target.options or {}
        a4, a6 = target.address(4), target.address(6)
        addr = a4 or a6
        return cls(kind=o.get("check", "none"), address=str(addr) if addr else None,
                   port=o.get("check_port"), path=o.get("check_path", "/"),
                   status=o.get("check_status", 200), command=o.get("check_command"),
                   interval=o.get("check_interval", 2.0), timeout=o.get("check_timeout", 1.0),
                   rise=o.get("rise", 2), fall=o.get("fall", 3),
                   other_address=str(a6) if a4 and a6 else None)

    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.address, self.other_address) if a)

    def describe(self) -> str:
        if self.kind == "tcp":
            return "tcp " + ", ".join(f"{_host(a)}:{self.port}" for a in self.addresses())
        if self.kind == "http":
            return ", ".join(f"http://{_host(a)}:{self.port}{self.path}" for a in self.addresses()) + \
                f" = {self.status}"
        if self.kind == "exec":
            return "exec " + shlex.join(self.command or ())
        return "none"


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def run_check(c: Check, target: str) -> tuple[bool, str]:
    """One check, each probe bounded by the timeout; (ok, what happened).
    tcp and http probe every address of the target: one failing fails the
    check, and the detail names it."""
    if c.kind == "none":
        return True, "no check"
    if c.address is None and c.kind in ("tcp", "http"):
        return False, "target has no address"
    if c.kind == "exec":
        try:
            return _exec(c, target)
        except OSError as e:
            return False, e.strerror or type(e).__name__
    if c.kind not in ("tcp", "http"):
        return False, f"unknown check {c.kind!r}"
    ok, detail = _probe(c, c.address)
    if ok and c.other_address:
        ok2, detail2 = _probe(c, c.other_address)
        if not ok2:
            return False, f"{_host(c.other_address)}:{c.port}: {detail2}"
    return ok, detail


def _probe(c: Check, address: str) -> tuple[bool, str]:
    try:
        if c.kind == "tcp":
            with socket.create_connection((address, c.port), timeout=c.timeout):
                return True, "connected"
        return _http(c, address)
    except TimeoutError:
        return False, f"timeout after {c.timeout:g} s"
    except OSError as e:
        return False, e.strerror or type(e).__name__


def _http(c: Check, address: str) -> tuple[bool, str]:
    import http.client
    deadline = time.monotonic() + c.timeout
    host = _host(address)
    conn = http.client.HTTPConnection(address, c.port, timeout=c.timeout)
    try:
        conn.request("GET", c.path, headers={"Host": f"{host}:{c.port}", "User-Agent": "synlb-health",
                                             "Connection": "close"})
        conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
        resp = conn.getresponse()
        resp.read(1 << 16)
    except http.client.HTTPException as e:
        return False, f"bad HTTP answer: {type(e).__name__}"
    finally:
        conn.close()
    if resp.status == c.status:
        return True, f"HTTP {resp.status}"
    return False, f"HTTP {resp.status}, want {c.status}"


def _exec(c: Check, target: str) -> tuple[bool, str]:
    exe, why = trust.trusted(c.command[0])  # the same rule as the admin's transition scripts
    if why:
        return False, f"refused: {why}"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYNLB_TARGET": target,
           "SYNLB_TARGET_ADDRESS": c.address or "", "SYNLB_CHECK_PORT": str(c.port or "")}
    done = proc.run([exe, *c.command[1:]], env, c.timeout, keep=200)  # exactly what was checked
    tail = done.output.decode("utf-8", "replace").strip().splitlines()
    last = f": {tail[-1]}" if tail else ""
    if done.rc is None:
        return False, f"timeout after {c.timeout:g} s (killed){last}"
    return done.rc == 0, f"exit {done.rc}{last}"


# ------------------------------------------------------------------ state

class TargetHealth:
    def __init__(self, name: str, check: Check, now: float):
        self.name = name
        self.check = check
        self.up = True
        self.successes = 0   # consecutive
        self.failures = 0    # consecutive
        self.checks = 0
        self.since = now
        self.last: dict | None = None
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        self.history.append({"time": now, "state": "up", "detail": "initial state"})
        self.next_due = 0.0  # monotonic
        self.running = False
        # a check that started since the plugin's epoch agreed with the state
        # (ready.settled): the view is no longer what it was at the start or
        # before the last link up. No check: always settled.
        self.settled = check.kind == "none"

    def record(self, ok: bool, detail: str, started: float, duration: float, *, fresh: bool = True) -> bool:
        """Count one result; True when the target flipped. ``fresh``: the
        check started since the plugin's epoch (it may settle the view)."""
        self.checks += 1
        self.recent.append(ok)
        self.last = {"time": started, "ok": ok, "detail": detail, "duration": round(duration, 4)}
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        flip = (not self.up and ok and self.successes >= self.check.rise) or \
               (self.up and not ok and self.failures >= self.check.fall)
        if flip:
            self.up = not self.up
            self.since = time.time()
            self.history.append({"time": self.since, "state": "up" if self.up else "down", "detail": detail})
        if fresh and ready.settled(self.up, ok):
            self.settled = True
        return flip

    def unsettle(self) -> None:
        """What the checks told before (a link up, a new check) no longer counts: check again now."""
        self.settled = self.check.kind == "none"
        self.next_due = 0.0

    def status(self) -> dict:
        return {"state": "up" if self.up else "down", "check": self.check.describe(),
                "since": self.since, "successes": self.successes, "failures": self.failures,
                "rise": self.check.rise, "fall": self.check.fall, "interval": self.check.interval,
                "checks": self.checks, "recent": "".join("+" if r else "-" for r in self.recent),
                "settled": self.settled,
                "last": self.last, "history": list(self.history)}


class HealthPlugin(Plugin):
    name = "health"

    def __init__(self, host):
        super().__init__(host)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.targets: dict[str, TargetHealth] = {}
        self.services: dict[str, tuple] = {}   # service -> target names
        self.active = False
        # checks that started before this (monotonic) do not settle a view: the
        # host's start, then the last link up
        self.epoch = time.monotonic()
        self.epoch_reason = "host start"
        self._thread: threading.Thread | None = None
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(max_workers=POOL, thread_name_prefix="health-check")
        self._sync(host.cfg)

    # ------------------------------------------------------------ host API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._schedule, name="health", daemon=True)
        self._thread.start()

    def reconcile(self, cfg, node) -> list[str]:
        changes = self._sync(cfg)
        with self._lock:
            self.active = node.active
            if node.active and self._write_if_needed():
                changes.append("down set rewritten: " + self._down_text())
                # the lb plugin may have reconciled before us in this pass; not
                # when its data plane is not up (a failed `up` clears the file:
                # asking again would retry that failure in a loop)
                from .. import dataplane
                if dataplane.applied(cfg.globals.state_dir) is not None:
                    self.host.submit("reconcile", reason="health: down set restored")
        self._wake.set()
        return changes

    def link_up(self, name: str, at: float) -> None:
        # while a link was down the checks over it failed, and the view may
        # say a target is down that is not (or the reverse): every target
        # must be checked again before the router is ready again
        with self._lock:
            if at < self.epoch:
                return
            self.epoch, self.epoch_reason = at, f"link {name} up"
            for th in self.targets.values():
                th.unsettle()
        self._wake.set()

    def ready_facts(self, cfg, node) -> list:
        with self._lock:
            pending = tuple(sorted(n for n, t in self.targets.items() if not t.settled))
            return [ready.Checks(pending, self.epoch_reason)]

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(2.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict:
        with self._lock:
            down = sorted(n for n, t in self.targets.items() if not t.up)
            checked = sum(1 for t in self.targets.values() if t.check.kind != "none")
            summary = (f"{len(self.targets) - len(down)}/{len(self.targets)} targets up "
                       f"({checked} checked)" + (f"; DOWN: {', '.join(down)}" if down else ""))
            return {"summary": summary, "down": self._down_map(),
                    "targets": {n: t.status() for n, t in sorted(self.targets.items())}}

    # ------------------------------------------------------------ config
    def _sync(self, cfg) -> list[str]:
        """Follow the configuration: new targets start up, changed checks restart."""
        changes = []
        wanted = {}
        for svc in cfg.services:
            for t in cfg.targets_of(svc):
                wanted[t.name] = Check.of(t)
        now = time.time()
        with self._lock:
            self.services = {svc.name: tuple(svc.target_names) for svc in cfg.services}
            for name in sorted(set(self.targets) - set(wanted)):
                del self.targets[name]
                changes.append(f"{name}: no longer checked")
            for name, check in sorted(wanted.items()):
                th = self.targets.get(name)
                if th is None:
                    self.targets[name] = TargetHealth(name, check, now)
                    if check.kind != "none":
                        changes.append(f"{name}: checking {check.describe()} every {check.interval:g} s")
                elif th.check != check:
                    th.check = check
                    th.successes = th.failures = 0
                    th.unsettle()
                    if check.kind == "none" and not th.up:
                        th.up = True
                        th.since = now
                        th.history.append({"time": now, "state": "up", "detail": "check removed"})
                    changes.append(f"{name}: check is now {check.describe()}")
        return changes

    # ------------------------------------------------------------ down set
    def _down_map(self) -> dict[str, list[str]]:
        out = {}
        for svc, names in self.services.items():
            down = sorted(n for n in names if n in self.targets and not self.targets[n].up)
            if down:
                out[svc] = down
        return out

    def _down_text(self) -> str:
        m = self._down_map()
        return "; ".join(f"{s}: {', '.join(v)}" for s, v in m.items()) or "all up"

    def _write_if_needed(self) -> bool:
        """Make the state dir's down set match ours (caller holds the lock)."""
        state_dir = self.host.cfg.globals.state_dir
        want = self._down_map()
        have = {}
        for svc in self.services:
            d = health_state.down_targets(state_dir, svc)
            if d:
                have[svc] = sorted(d)
        if want == have:
            return False
        if want:
            health_state.write_down(state_dir, want)
        else:
            health_state.clear(state_dir)
        return True

    # ------------------------------------------------------------ checking
    def _schedule(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            due = []
            wait = 1.0
            with self._lock:
                for th in self.targets.values():
                    if th.check.kind == "none" or th.running:
                        continue
                    if th.next_due <= now:
                        th.running = True
                        th.next_due = now + th.check.interval
                        due.append(th)
                    else:
                        wait = min(wait, th.next_due - now)
            for th in due:
                try:
                    self._pool.submit(self._check, th)
                except RuntimeError:  # pool shut down: we are stopping
                    return
            self._wake.wait(max(0.0, wait))

    def _check(self, th: TargetHealth) -> None:
        started, t0 = time.time(), time.monotonic()
        try:
            ok, detail = run_check(th.check, th.name)
        except Exception as e:  # noqa: BLE001 - a broken check is a failed check, never a dead thread
            ok, detail = False, f"check error: {type(e).__name__}: {e}"
        duration = time.monotonic() - t0
        reason = None
        with self._lock:
            th.running = False
            if self.targets.get(th.name) is not th or self._stop.is_set():
                return  # removed by a reload meanwhile
            was_settled = th.settled
            if th.record(ok, detail, started, duration, fresh=t0 >= self.epoch):
                state = "up" if th.up else "down"
                n = th.check.rise if th.up else th.check.fall
                services = sorted(s for s, names in self.services.items() if th.name in names)
                log.warning("health: target %s %s after %d %s checks (%s: %s); down now: %s; services %s",
                            th.name, state.upper(), n, "good" if th.up else "failed", th.check.describe(),
                            detail, self._down_text(), ", ".join(services))
                if self.active:
                    try:
                        self._write_if_needed()
                    except OSError as e:  # the reconcile asked for below writes it again
                        log.error("health: cannot write the down set: %s", e)
                reason = f"health: {th.name} {state}"
            settled_now = th.settled and not was_settled
        self._wake.set()
        if reason:
            self.host.submit("reconcile", reason=reason)
        elif settled_now:  # the router may be ready now (a reconcile judges it too)
            self.host.submit("ready", reason=f"health: {th.name} checked")


def create(host) -> HealthPlugin:
    return HealthPlugin(host)
