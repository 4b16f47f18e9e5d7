"""Apply VRRP events: record the latest one, reconcile the data plane to it.

Every event source (``synlb notify``, ``synlb fifo``, ``synlb dbus``) ends in
:func:`handle`, which, under the data plane lock (``dataplane.locked``):

1. stores the event in ``<state_dir>/vrrp-state.json`` if it is newer than
   the one stored (see *Ordering*), and
2. reconciles the whole data plane to the *stored* (latest) state:
   ``dataplane.up_locked`` or ``dataplane.down_locked``, both idempotent.

So concurrent or repeated events never interleave, never leave half-applied
rules, and a late stale invocation cannot undo a newer one: it re-applies
the newer state (DESIGN pitfalls 3-5).

Ordering. keepalived forks its notify scripts in order but they run
concurrently and may reach the lock in any order. A notify event's stamp is
the fork time of the process keepalived started (the hook passes its own
``/proc/PID/stat`` start time and pid in ``SYNLB_NOTIFY_STAMP``; without the
hook, this process's), on the boot clock, with the pid as tie-break within
one clock tick (pids grow with each fork). So the order is the order in
which keepalived started the scripts, not the order in which they got the
CPU (a stamp taken once Python is up would be). FIFO and D-Bus events are
delivered in order; they are stamped with the boot clock when read. Stamps
are only compared within one boot (the stored boot id), so a state dir that
outlives a reboot never blocks new events.

Detaching. keepalived kills a STOP script's process group after 1 s and
sends every script SIGTERM when it exits; neither may interrupt a teardown
half way. The hook runs synlb under ``setsid`` (at once, before Python
starts), and the apply itself runs in a child in its own session
(:func:`run_detached`), which also keeps worker processes from being
children of a long-running FIFO or D-Bus listener (no zombies there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

from . import config as config_mod
from . import schema, vrrp
from .errors import UserError, run_reporting
from .vrrp import VrrpConfig, VrrpEvent

log = logging.getLogger(__name__)

STATE_FILE = "vrrp-state.json"
LOG_FILE = "vrrp.log"
LOG_MAX = 1 << 20  # rotate vrrp.log beyond 1 MiB (one old copy kept)

Stamp = tuple  # (boot clock ns, tie-break)
ENV_STAMP = "SYNLB_NOTIFY_STAMP"


class VrrpError(UserError):
    """A VRRP event source cannot do its job; the message says why."""


# ------------------------------------------------------------------ stamps

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def process_stamp(pid: int | None = None) -> Stamp:
    """When ``pid`` (default: this process) was forked, on the boot clock,
    with the pid as tie-break within a clock tick."""
    pid = os.getpid() if pid is None else pid
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    hz = os.sysconf("SC_CLK_TCK")
    return (ticks * (1_000_000_000 // hz), pid)


def notify_stamp() -> Stamp:
    """The stamp of a ``synlb notify`` call: the hook's fork time and pid
    (``SYNLB_NOTIFY_STAMP="TICKS PID"``, set by hooks/keepalived-notify), else
    this process's own."""
    env = os.environ.get(ENV_STAMP, "").split()
    if len(env) == 2 and all(x.isdigit() for x in env):
        hz = os.sysconf("SC_CLK_TCK")
        return (int(env[0]) * (1_000_000_000 // hz), int(env[1]))
    return process_stamp()


_last_now = 0


def now_stamp() -> Stamp:
    """Boot clock now, strictly increasing within this process."""
    global _last_now
    t = max(time.clock_gettime_ns(time.CLOCK_BOOTTIME), _last_now + 1)
    _last_now = t
    return (t, 0)


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


def _teardown_only(main: str, err: config_mod.ConfigError) -> Loaded | None:
    """What a broken config still allows: [synlb] and [vrrp] parse -> teardown."""
    _, sections, problems = config_mod.read_layers(main)
    if problems or "vrrp" not in sections:
        return None
    try:
        g = config_mod.load_globals(main)
    except config_mod.ConfigError:
        return None
    vals = schema.parse_section(vrrp.VRRP_SCHEMA, "vrrp", sections["vrrp"], main, problems)
    if problems:
        return None
    return Loaded(main, vrrp.vrrp_config(vals), g.state_dir, g.route_protocol, None, err)


def load(path: str | None) -> Loaded:
    """The config and its ``[vrrp]`` section.

    A config that does not load still allows a teardown (FAULT/STOP must
    never be blocked by a typo made since the last ``up``) if ``[synlb]`` and
    ``[vrrp]`` themselves are fine; ``Loaded.cfg`` is then None.
    """
    vrrp.register_config()
    main = config_mod.config_path(path)
    try:
        cfg = config_mod.load(main)
    except config_mod.ConfigError as err:
        fallback = _teardown_only(main, err)
        if fallback is None:
            raise
        return fallback
    if "vrrp" not in cfg.sections:
        raise _no_section(main)
    vals = config_mod.load_section(cfg, "vrrp", vrrp.VRRP_SCHEMA)
    return Loaded(main, vrrp.vrrp_config(vals), cfg.globals.state_dir, cfg.globals.route_protocol, cfg)


# ------------------------------------------------------------------ record

def read_state(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as fh:
            d = json.load(fh)
        d["event"] = VrrpEvent.from_dict(d["event"])
        d["stamp"] = tuple(d["stamp"])
        return d
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _write_state(state_dir: str, event: VrrpEvent, stamp: Stamp) -> None:
    path = os.path.join(state_dir, STATE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"event": event.to_dict(), "stamp": list(stamp), "boot_id": boot_id(),
                   "recorded": time.time()}, fh)
    os.replace(tmp, path)


def record(state_dir: str, vcfg: VrrpConfig, event: VrrpEvent, stamp: Stamp) -> tuple[VrrpEvent, bool]:
    """Store ``event`` if it is newer than the stored one (caller holds the
    lock). Returns (the latest event, whether ``event`` was stored)."""
    cur = read_state(state_dir)
    if (cur is None or cur.get("boot_id") != boot_id() or not vcfg.matches(cur["event"])
            or tuple(stamp) > cur["stamp"]):
        _write_state(state_dir, event, stamp)
        return event, True
    return cur["event"], False


def _log_line(state_dir: str, entry: dict) -> None:
    path = os.path.join(state_dir, LOG_FILE)
    with contextlib.suppress(OSError):
        if os.path.getsize(path) > LOG_MAX:
            os.replace(path, path + ".1")
    entry = {"time": round(time.time(), 6), "pid": os.getpid(), **entry}
    with contextlib.suppress(OSError):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def read_log(state_dir: str) -> list[dict]:
    """Entries of ``vrrp.log`` (oldest first), for status and tests."""
    out = []
    for name in (LOG_FILE + ".1", LOG_FILE):
        with contextlib.suppress(FileNotFoundError), open(os.path.join(state_dir, name)) as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


# ------------------------------------------------------------------ apply

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


def handle(config_path: str | None, event: VrrpEvent, stamp: Stamp) -> Result:
    """Record ``event`` (if newest) and reconcile to the latest state, under
    the data plane lock. Raises ConfigError/LiveError/... on failure (the
    event is recorded even then, so the next reconcile uses it).

    When a plugin host (``synlb run``) listens on the state dir's control
    socket, it owns the data plane: the event is recorded, then the host is
    told, and it follows the recorded state (vrrp_state.py).
    """
    from . import control, dataplane

    ld = load(config_path)
    event = event.about(ld.vcfg.kind, ld.vcfg.name)
    res = Result(event)
    if not ld.vcfg.matches(event):
        res.ignored = True
        _log_line(ld.state_dir, {"event": event.to_dict(), "stamp": list(stamp), "ignored": True})
        return res
    host = os.path.exists(control.socket_path(ld.state_dir))
    with dataplane.locked(ld.state_dir):
        latest, stored = record(ld.state_dir, ld.vcfg, event, stamp)
        res.latest, res.stored = latest, stored
        res.active = ld.vcfg.active(latest.state)
        entry = {"event": event.to_dict(), "stamp": list(stamp), "stored": stored,
                 "latest": latest.state, "active": res.active}
        if not host:
            _reconcile(ld, latest, entry, res)
    if host:
        # outside the lock: the host's own reconcile takes it
        answer = control.request(ld.state_dir, {"cmd": "vrrp", "event": event.to_dict()})
        if answer is not None:
            res.host = answer
            _log_line(ld.state_dir, {**entry, "host": answer})
            if not answer.get("ok"):
                raise VrrpError(f"synlb run did not take the event: {answer.get('error', answer)}")
        else:  # the host went away meanwhile: reconcile here, to the latest record
            with dataplane.locked(ld.state_dir):
                cur = read_state(ld.state_dir)
                latest = cur["event"] if cur and ld.vcfg.matches(cur["event"]) else latest
                res.latest, res.active = latest, ld.vcfg.active(latest.state)
                _reconcile(ld, latest, {**entry, "latest": latest.state, "active": res.active}, res)
    for c in res.changes:
        log.info("vrrp %s: %s", latest.state, c)
    return res


def _reconcile(ld: Loaded, latest: VrrpEvent, entry: dict, res: Result) -> None:
    """The data plane to ``latest`` (caller holds the lock); logged."""
    from . import dataplane

    reason = f"vrrp {latest.kind} {latest.name} {latest.state}"
    try:
        if res.active:
            if ld.cfg is None:
                raise ld.error
            res.changes = dataplane.up_locked(ld.path, ld.cfg, reason)
        else:
            res.changes = dataplane.down_locked(ld.state_dir, ld.route_protocol)
    except Exception as e:
        entry["error"] = _one_line(e)
        _log_line(ld.state_dir, entry)
        raise
    entry["changes"] = res.changes
    _log_line(ld.state_dir, entry)


def apply_detached(command: str, config_path: str | None, event: VrrpEvent, stamp: Stamp) -> int:
    """``handle`` in a detached child, its one-line summary on stdout: what
    the long-running sources (fifo, dbus) do for each event, so their own
    state never mixes with the data plane's."""
    def run() -> int:
        res = handle(config_path, event, stamp)
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


# ------------------------------------------------------------------ errors

def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------ commands

def _config_arg(args) -> str | None:
    return getattr(args, "config", None)


def cmd_notify(args) -> int:
    stamp = notify_stamp()  # the order is keepalived's fork order
    event = vrrp.parse_notify_args(list(args.args))
    path = _config_arg(args)
    load(path)  # fail fast (in this process) on a config that cannot be used at all

    def apply() -> int:
        def run() -> int:
            res = handle(path, event, stamp)
            print(f"synlb notify: {res.summary()}")
            for c in res.changes:
                print(f"  {c}")
            return 0
        return run_reporting("notify", run)

    return run_detached(apply)


def cmd_fifo(args) -> int:
    from . import vrrp_fifo
    return vrrp_fifo.follow(_config_arg(args), args.path)


def cmd_dbus(args) -> int:
    from . import dbus_listener
    return dbus_listener.main(_config_arg(args), address=args.address, wait=args.wait)


COMMANDS = {"notify": cmd_notify, "fifo": cmd_fifo, "dbus": cmd_dbus}


def main(command: str, args: argparse.Namespace) -> int:
    return run_reporting(command, lambda: COMMANDS[command](args))
