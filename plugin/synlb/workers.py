"""Start, find and stop worker processes.

A worker's pid file (``worker-<queue>.pid``, JSON) is trusted only if psutil
shows a live process whose command line is that worker's: a stale file left by
a crash or a reused pid is recognised and removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from . import health_state
from .worker import stats_file
from .config import Config, Service

QUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
BIND_TIMEOUT = 5.0


class WorkerError(RuntimeError):
    pass


@dataclass
class WorkerInfo:
    pid: int
    service: str
    queue: int
    config: str
    digest: str
    pidfile: str


def synlb_command() -> list[str]:
    """The ``synlb`` program that is running now (so a worker runs the same
    code), else the console script next to this interpreter."""
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(me) == "synlb" and os.access(me, os.X_OK):
        return [me]
    exe = os.path.join(os.path.dirname(sys.executable), "synlb")
    if not os.path.exists(exe):
        raise WorkerError(f"{exe}: synlb is not installed next to {sys.executable}")
    return [exe]


def pidfile(state_dir: str, queue: int) -> str:
    return os.path.join(state_dir, f"worker-{queue}.pid")


def _cmdline_matches(proc: psutil.Process, info: WorkerInfo) -> bool:
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "worker" in cmd and f"--queue={info.queue}" in cmd and f"--service={info.service}" in cmd


def read(path: str) -> WorkerInfo | None:
    try:
        with open(path) as fh:
            d = json.load(fh)
        return WorkerInfo(pid=int(d["pid"]), service=d["service"], queue=int(d["queue"]),
                          config=d["config"], digest=d.get("digest", ""), pidfile=path)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _write(info: WorkerInfo) -> None:
    tmp = info.pidfile + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": info.pid, "service": info.service, "queue": info.queue,
                   "config": info.config, "digest": info.digest}, fh)
    os.replace(tmp, info.pidfile)


def running(state_dir: str) -> list[WorkerInfo]:
    """Live workers of this state dir; stale pid files are removed."""
    out = []
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith("worker-") and name.endswith(".pid")):
            continue
        path = os.path.join(state_dir, name)
        info = read(path)
        alive = False
        if info is not None:
            try:
                proc = psutil.Process(info.pid)
                alive = proc.status() != psutil.STATUS_ZOMBIE and _cmdline_matches(proc, info)
            except psutil.NoSuchProcess:
                alive = False
        if alive:
            out.append(info)
        else:
            with contextlib.suppress(FileNotFoundError):  # status and the supervisor race here
                os.unlink(path)
    return out


def bound_queues() -> dict[int, dict]:
    """NFQUEUE state from the kernel: {queue: {portid, waiting, queue_dropped, user_dropped, ...}}."""
    out = {}
    try:
        with open(QUEUE_PROC) as fh:
            for line in fh:
                f = line.split()
                if len(f) < 8:
                    continue
                out[int(f[0])] = {"portid": int(f[1]), "waiting": int(f[2]), "copy_mode": int(f[3]),
                                  "copy_range": int(f[4]), "queue_dropped": int(f[5]),
                                  "user_dropped": int(f[6]), "id_sequence": int(f[7])}
    except FileNotFoundError:
        pass
    return out


def start(config_path: str, cfg: Config, svc: Service, queue: int) -> WorkerInfo:
    state_dir = cfg.globals.state_dir
    log_path = os.path.join(state_dir, f"worker-{queue}.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stats_file(state_dir, queue))
    argv = synlb_command() + ["worker", f"--config={os.path.abspath(config_path)}",
                              f"--service={svc.name}", f"--queue={queue}"]
    with open(log_path, "ab") as log:
        # a new session: keepalived kills a notify script's process group on
        # timeout, and the workers must outlive the script that started them
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
    info = WorkerInfo(pid=proc.pid, service=svc.name, queue=queue,
                      config=os.path.abspath(config_path), digest=table_digest(cfg),
                      pidfile=pidfile(state_dir, queue))
    _write(info)
    return info


def _holds_queue(info: WorkerInfo, bound: dict) -> bool:
    """The kernel has a listener on the queue, and that listener is this worker."""
    if not bound.get(info.queue, {}).get("portid"):
        return False
    try:
        with open(stats_file(os.path.dirname(info.pidfile), info.queue)) as fh:
            return json.load(fh).get("pid") == info.pid
    except (FileNotFoundError, ValueError):
        return False


def wait_bound(infos: list[WorkerInfo], timeout: float = BIND_TIMEOUT) -> None:
    """Return once every worker holds its queue; raise with the log tail if one died."""
    deadline = time.monotonic() + timeout
    pending = list(infos)
    while pending:
        bound = bound_queues()
        still = []
        for info in pending:
            if _holds_queue(info, bound):
                continue
            if not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE:
                raise WorkerError(f"worker for queue {info.queue} exited: {_log_tail(info)}")
            still.append(info)
        pending = still
        if pending and time.monotonic() > deadline:
            raise WorkerError(f"worker for queue {pending[0].queue} did not bind within {timeout}s: "
                              f"{_log_tail(pending[0])}")
        if pending:
            time.sleep(0.02)


def _log_tail(info: WorkerInfo) -> str:
    path = info.pidfile[:-4] + ".log"
    try:
        with open(path, errors="replace") as fh:
            lines = [ln.strip() for ln in fh.readlines()[-3:]]
        return " | ".join(lines) or "(empty log)"
    except FileNotFoundError:
        return "(no log)"


def stop(info: WorkerInfo, timeout: float = 3.0) -> None:
    try:
        proc = psutil.Process(info.pid)
        if _cmdline_matches(proc, info):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    for path in (info.pidfile,):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def reload(info: WorkerInfo, digest: str) -> None:
    os.kill(info.pid, signal.SIGHUP)
    info.digest = digest
    _write(info)


def reload_pins(state_dir: str) -> int:
    """Ask every running worker to re-read the pins file; how many were asked.

    Only workers that published their stats file are signalled: they have
    their SIGUSR1 handler (the default action would kill them), and they
    read the pins once more right after publishing it, so a worker that is
    still starting misses no update."""
    n = 0
    for w in running(state_dir):
        try:
            with open(stats_file(state_dir, w.queue)) as fh:
                if json.load(fh).get("pid") != w.pid:
                    continue
        except (FileNotFoundError, ValueError):
            continue
        try:
            os.kill(w.pid, signal.SIGUSR1)
            n += 1
        except ProcessLookupError:
            pass
    return n


def table_digest(cfg: Config) -> str:
    """What a worker's table is built from: the config and the targets' health."""
    return f"{cfg.digest()}-{health_state.digest(cfg.globals.state_dir)}"


def ensure(config_path: str, cfg: Config, stop_unwanted: bool = True) -> list[str]:
    """One worker per configured queue, on the current config; return changes.

    ``stop_unwanted=False`` leaves running the workers of queues no service
    wants any more (the caller stops them with a second call, once their
    NFQUEUE rules are gone: a queue never loses its listener first)."""
    state_dir = cfg.globals.state_dir
    want = {q: svc for svc in cfg.services for q in svc.queues}
    have = {w.queue: w for w in running(state_dir)}
    changes = []
    digest = table_digest(cfg)
    for q, w in sorted(have.items()):
        svc = want.get(q)
        if svc is None and not stop_unwanted:
            del have[q]
            continue
        if svc is None or svc.name != w.service or w.config != os.path.abspath(config_path):
            stop(w)
            changes.append(f"stopped worker queue {q} (pid {w.pid})")
            del have[q]
        elif w.digest != digest:
            reload(w, digest)
            changes.append(f"reloaded worker queue {q} (pid {w.pid})")
    started = []
    for q, svc in sorted(want.items()):
        if q not in have:
            started.append(start(config_path, cfg, svc, q))
    try:
        wait_bound(started)
    except WorkerError:
        for w in started:
            stop(w)
        raise
    changes += [f"started worker queue {w.queue} (pid {w.pid})" for w in started]
    return changes


def stop_all(state_dir: str) -> list[str]:
    changes = []
    for w in running(state_dir):
        stop(w)
        changes.append(f"stopped worker queue {w.queue} (pid {w.pid})")
    return changes
