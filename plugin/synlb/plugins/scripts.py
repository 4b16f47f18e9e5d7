"""scripts: the admin's executables, run on every VRRP state transition.

Section ``[scripts]``: ``dir`` (default ``/etc/synlb/scripts.d``) and
``timeout`` (seconds per script, default 10).  When a reconcile's node state
(``MASTER``, ``BACKUP``, ``FAULT``, ``STOP``, ``STANDALONE``...) differs from
the previous reconcile's, every executable in ``<dir>/<state in lower
case>/`` runs, one after the other in sorted name order (run-parts style:
names starting with ``.`` or ending in ``~`` / ``.dpkg-*`` / ``.ucf-*`` are
ignored, non-executable files are skipped).  The first reconcile of the host
counts as a transition from nothing (``SYNLB_PREVIOUS_STATE`` empty).

Like keepalived's ``enable_script_security``, a script is refused (logged,
skipped) unless it and every directory above it (symlinks resolved) are owned
by root and not writable by group or others; a root-owned directory with the
sticky bit (such as /tmp) may be writable by others, since nobody else can
replace root's entries in it.

Each script runs with argv ``[path]`` (no shell), cwd ``/``, stdin from
/dev/null, in its own session (on timeout its whole process group gets
SIGTERM, then SIGKILL), and a clean environment: ``PATH``,
``SYNLB_STATE``, ``SYNLB_PREVIOUS_STATE``, ``SYNLB_REASON``,
``SYNLB_CONFIG`` and ``SYNLB_JSON`` (those plus ``active``, ``time``,
``services`` and ``targets`` as one JSON object).  Output (stdout and stderr,
last 2 KiB) goes to the log and to ``synlb status``.

Transitions are queued and run in order in one thread of their own, so a slow
script never holds up the data plane.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import stat
import threading
import time

from .. import config as config_mod
from .. import health_state, proc, trust
from ..trust import insecure  # noqa: F401  (the rule, also this plugin's API)
from ..schema import Option, OptionError, Schema, seconds
from . import Plugin

log = logging.getLogger("synlb.scripts")

DEFAULT_DIR = "/etc/synlb/scripts.d"
RUNS_KEPT = 30
OUTPUT_KEPT = 2048
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IGNORED = re.compile(r"^\.|~$|\.dpkg-(old|new|dist|tmp|bak)$|\.ucf-(old|new|dist)$")


def _abspath(text: str) -> str:
    t = text.strip()
    if not t.startswith("/"):
        raise OptionError(f"{text!r} is not an absolute path")
    return os.path.normpath(t)


SCHEMA = Schema("scripts", [
    Option("dir", _abspath, DEFAULT_DIR, "directory holding one sub-directory per state (master/, backup/...)"),
    Option("timeout", seconds(0.1, 3600), 10.0, "seconds a script may run before its process group is killed"),
])
SECTIONS = {"scripts": SCHEMA}


def event_json(cfg, state: str, previous: str, reason: str, active: bool) -> dict:
    """What a script gets in SYNLB_JSON."""
    g = cfg.globals
    services = []
    for svc in cfg.services:
        down = health_state.down_targets(g.state_dir, svc.name)
        services.append({"name": svc.name, "mode": svc.mode, "vips": [str(v) for v in svc.vips],
                         "protocols": list(svc.protocols),
                         "ports": [f"{a}" if a == b else f"{a}-{b}" for a, b in svc.ports],
                         "queues": list(svc.queues), "targets": list(svc.target_names),
                         "down": sorted(down)})
    targets = [{"name": t.name, "addresses": [str(a) for a in t.addresses], "mark": t.mark, "table": t.table}
               for t in sorted(cfg.targets.values(), key=lambda t: t.name)]
    return {"state": state, "previous_state": previous, "reason": reason, "active": active,
            "config": os.path.abspath(cfg.files[0]) if cfg.files else "", "time": time.time(),
            "services": services, "targets": targets}


def scripts_of(directory: str) -> list[str]:
    """Candidate files of a state directory, in run order."""
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(directory, n) for n in names if not IGNORED.search(n)]


def run_one(path: str, exe: str, env: dict, timeout: float) -> dict:
    """Run one script; ``exe`` is what trust.trusted vetted for ``path``. Its record for status."""
    t0 = time.monotonic()
    rec: dict = {"script": path, "time": time.time()}
    try:
        done = proc.run([exe], env, timeout, keep=OUTPUT_KEPT)
    except OSError as e:
        rec.update(rc=None, error=f"cannot start: {e.strerror or e}", duration=0.0, output="")
        return rec
    rec["output"] = done.output.decode("utf-8", "replace")
    rec["duration"] = round(time.monotonic() - t0, 4)
    if done.rc is None:
        rec.update(rc=None, error=f"timed out after {timeout:g} s; process group killed")
    else:
        rec["rc"] = done.rc
    return rec


class ScriptsPlugin(Plugin):
    name = "scripts"

    def __init__(self, host):
        super().__init__(host)
        self.previous: str | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.runs: collections.deque = collections.deque(maxlen=RUNS_KEPT)
        self.transitions: collections.deque = collections.deque(maxlen=RUNS_KEPT)
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ host API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._runner, name="scripts", daemon=True)
        self._thread.start()

    def reconcile(self, cfg, node) -> list[str]:
        if node.vrrp == self.previous:
            return []
        previous, self.previous = self.previous or "", node.vrrp
        opts = config_mod.load_section(cfg, "scripts", SCHEMA)
        directory = os.path.join(opts["dir"], node.vrrp.lower())
        env = {"PATH": PATH, "LANG": "C.UTF-8", "SYNLB_STATE": node.vrrp, "SYNLB_PREVIOUS_STATE": previous,
               "SYNLB_REASON": node.reason,
               "SYNLB_CONFIG": os.path.abspath(self.host.config_path),
               "SYNLB_JSON": json.dumps(event_json(cfg, node.vrrp, previous, node.reason, node.active),
                                        separators=(",", ":"))}
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self.jobs.put((directory, env, opts["timeout"]))
        n = len(scripts_of(directory))
        return [f"{previous or '(start)'} -> {node.vrrp}: {n} file{'s' * (n != 1)} of {directory} queued"] if n else []

    def stop(self) -> None:
        self._stop.set()
        self.jobs.put(None)
        if self._thread:
            self._thread.join(5.0)

    def status(self) -> dict:
        with self._lock:
            runs = list(self.runs)
            transitions = list(self.transitions)
        if transitions:
            t = transitions[-1]
            summary = (f"last {t['previous'] or '(start)'} -> {t['state']}: {t['ok']} ok, {t['failed']} failed, "
                       f"{t['refused']} refused")
        else:
            summary = "no transition yet"
        return {"summary": summary, "pending": self._pending, "transitions": transitions, "runs": runs}

    def wait_idle(self, timeout: float) -> bool:
        """For tests: every queued transition has been run."""
        return self._idle.wait(timeout)

    # ------------------------------------------------------------ runner
    def _runner(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self._stop.is_set():
                self._idle.set()
                return
            try:
                self._run_dir(*job)
            except Exception:
                log.exception("scripts: running %s failed", job[0])
            with self._lock:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()

    def _run_dir(self, directory: str, env: dict, timeout: float) -> None:
        state, previous = env["SYNLB_STATE"], env["SYNLB_PREVIOUS_STATE"]
        counts = {"ok": 0, "failed": 0, "refused": 0}
        for path in scripts_of(directory):
            if self._stop.is_set():
                break
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if not st.st_mode & 0o111:
                log.info("scripts: %s skipped: not executable", path)
                continue
            exe, why = trust.trusted(path)
            if why:
                log.error("scripts: %s REFUSED: %s", path, why)
                rec = {"script": path, "time": time.time(), "rc": None, "refused": why, "duration": 0.0,
                       "output": ""}
                counts["refused"] += 1
            else:
                rec = run_one(path, exe, env, timeout)
                ok = rec.get("rc") == 0
                counts["ok" if ok else "failed"] += 1
                tail = rec.get("output", "").strip().splitlines()[-1:] or [""]
                (log.info if ok else log.warning)(
                    "scripts: %s -> %s: %s %s in %.2f s%s", previous or "(start)", state,
                    os.path.basename(path), rec.get("error") or f"exit {rec['rc']}", rec["duration"],
                    f": {tail[0][:200]}" if tail[0] else "")
            rec["state"] = state
            with self._lock:
                self.runs.append(rec)
        with self._lock:
            self.transitions.append({"time": time.time(), "state": state, "previous": previous,
                                     "directory": directory, **counts})


def create(host) -> ScriptsPlugin:
    return ScriptsPlugin(host)
