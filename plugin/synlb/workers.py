"""Start, find and stop worker processes.

A worker's pid file (``worker-<queue>.pid``, JSON) is trusted only if psutil
shows a live process whose command line is that worker's: a stale file left by
a crash or a reused pid is recognised and removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from . import health_state, statedir, worker_table
from .errors import UserError
from .worker import stats_file
from .config import Config
from .worker_table import WorkerTable

QUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
BIND_TIMEOUT = 5.0


class WorkerError(UserError):
    """A worker that cannot start or bind its queue; the message says why."""


@dataclass
class WorkerInfo:
    pid: int
    service: str
    queue: int
    digest: str  # of the table (worker_table) it was last told to serve
    state_dir: str
    # who the process is, recorded when it was started: a pid alone may have
    # been reused by anything since (see _is_ours)
    started: float = 0.0  # psutil create_time
    exe: str = ""
    uid: int = -1

    @property
    def pidfile(self) -> str:
        return pidfile(self.state_dir, self.queue)


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
    return statedir.worker_pid(state_dir, queue)


def _is_ours(proc: psutil.Process, info: WorkerInfo) -> bool:
    """The process is the worker ``info`` records: same start time, same
    executable, same owner, and a worker's command line for that queue and
    service. Checked before a pid is signalled or adopted."""
    try:
        cmd = proc.cmdline()
        same = (abs(proc.create_time() - info.started) < 0.01 and proc.exe() == info.exe
                and proc.uids().real == info.uid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if not cmd:  # /proc/PID/cmdline is empty for a moment right after the exec
        return same
    return same and "worker" in cmd and f"--queue={info.queue}" in cmd and f"--service={info.service}" in cmd


def read(state_dir: str, queue: int) -> WorkerInfo | None:
    """The worker the queue's pid file names (None: no file, or not one ``_write`` wrote)."""
    try:
        d = statedir.read_json(pidfile(state_dir, queue))
        info = WorkerInfo(pid=int(d["pid"]), service=d["service"], queue=int(d["queue"]),
                          digest=d.get("digest", ""), state_dir=state_dir, started=float(d["started"]),
                          exe=str(d["exe"]), uid=int(d["uid"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if (info.pid <= 1 or info.queue != queue or not isinstance(info.service, str)
            or not isinstance(info.digest, str)):
        return None  # never a pid to signal (0, -1: a process group, every process)
    return info


def _write(info: WorkerInfo) -> None:
    statedir.write_json(info.pidfile, {"pid": info.pid, "service": info.service, "queue": info.queue,
                                       "digest": info.digest, "started": info.started, "exe": info.exe,
                                       "uid": info.uid})


def running(state_dir: str) -> list[WorkerInfo]:
    """Live workers of this state dir; stale pid files are removed."""
    out = []
    for queue in statedir.worker_queues(state_dir, statedir.WORKER_PID):
        info = read(state_dir, queue)
        alive = False
        if info is not None:
            try:
                proc = psutil.Process(info.pid)
                alive = proc.status() != psutil.STATUS_ZOMBIE and _is_ours(proc, info)
            except psutil.NoSuchProcess:
                alive = False
        if alive:
            out.append(info)
        else:
            statedir.remove(pidfile(state_dir, queue))  # (status and the supervisor race here: it may be gone)
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


def start(state_dir: str, table: WorkerTable) -> WorkerInfo:
    """Write the worker's table, then start it on that table."""
    queue = table.queue
    statedir.remove(stats_file(state_dir, queue))
    worker_table.write(state_dir, table)
    argv = synlb_command() + ["worker", f"--state-dir={state_dir}", f"--service={table.service}",
                              f"--queue={queue}"]
    with statedir.open_append(statedir.worker_log(state_dir, queue)) as log:
        # a new session: keepalived kills a notify script's process group on
        # timeout, and the workers must outlive the script that started them
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
    info = WorkerInfo(pid=proc.pid, service=table.service, queue=queue, digest=table.digest(),
                      state_dir=state_dir)
    try:
        me = psutil.Process(proc.pid)  # Popen returns after the exec: this is the worker's own image
        info.started, info.exe, info.uid = me.create_time(), me.exe(), me.uids().real
        _write(info)
    except (OSError, psutil.Error) as e:  # a worker nobody can find would hold the queue for good
        proc.kill()
        proc.wait(5)
        raise WorkerError(f"{info.pidfile}: cannot record worker queue {queue}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return info


def _holds_queue(info: WorkerInfo, bound: dict) -> bool:
    """The kernel has a listener on the queue, and that listener is this worker."""
    if not bound.get(info.queue, {}).get("portid"):
        return False
    return _published(info.state_dir, info)


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


def _published(state_dir: str, info: WorkerInfo) -> bool:
    """The worker published its stats file: it holds its queue and has its signal handlers."""
    try:
        stats = statedir.read_json(stats_file(state_dir, info.queue))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(stats, dict) and stats.get("pid") == info.pid


def _log_tail(info: WorkerInfo) -> str:
    try:
        data = statedir.read_bytes(statedir.worker_log(info.state_dir, info.queue))
    except (FileNotFoundError, ValueError):
        return "(no log)"
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines()[-3:]]
    return " | ".join(lines) or "(empty log)"


def stop(info: WorkerInfo, timeout: float = 3.0) -> None:
    try:
        proc = psutil.Process(info.pid)
        if _is_ours(proc, info):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    statedir.remove(info.pidfile)


def reload(info: WorkerInfo, state_dir: str, table: WorkerTable) -> None:
    """Write the worker's new table, then tell it (SIGHUP)."""
    worker_table.write(state_dir, table)
    os.kill(info.pid, signal.SIGHUP)
    info.digest = table.digest()
    _write(info)


def reload_pins(state_dir: str) -> int:
    """Ask every running worker to re-read the pins file; how many were asked.

    Only workers that published their stats file are signalled: they have
    their SIGUSR1 handler (the default action would kill them), and they
    read the pins once more right after publishing it, so a worker that is
    still starting misses no update."""
    n = 0
    for w in running(state_dir):
        if not _published(state_dir, w):
            continue
        try:
            os.kill(w.pid, signal.SIGUSR1)
            n += 1
        except ProcessLookupError:
            pass
    return n


def desired(cfg: Config) -> dict[int, WorkerTable]:
    """The table each queue's worker must serve: the config's targets less
    those the health checks took out (the state dir's down set)."""
    state_dir = cfg.globals.state_dir
    down = health_state.down_sets(state_dir, [s.name for s in cfg.services])
    return {q: worker_table.build(cfg, svc, q, down[svc.name]) for svc in cfg.services for q in svc.queues}


def ensure(cfg: Config, stop_unwanted: bool = True) -> list[str]:
    """One worker per configured queue, serving its desired table; return changes.

    ``stop_unwanted=False`` leaves running the workers of queues no service
    wants any more (the caller stops them with a second call, once their
    NFQUEUE rules are gone: a queue never loses its listener first)."""
    state_dir = cfg.globals.state_dir
    want = desired(cfg)
    have = {w.queue: w for w in running(state_dir)}
    changes = []
    for q, w in sorted(have.items()):
        table = want.get(q)
        if table is None and not stop_unwanted:
            del have[q]
            continue
        if table is None or table.service != w.service:
            stop(w)
            worker_table.remove(state_dir, q)
            changes.append(f"stopped worker queue {q} (pid {w.pid})")
            del have[q]
        elif w.digest != table.digest():
            reload(w, state_dir, table)
            changes.append(f"reloaded worker queue {q} (pid {w.pid})")
    started = []
    for q, table in sorted(want.items()):
        if q not in have:
            started.append(start(state_dir, table))
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
    for queue in statedir.worker_queues(state_dir, statedir.WORKER_TABLE):
        worker_table.remove(state_dir, queue)
    return changes


def drift(cfg: Config) -> list[str]:
    """Queues without their worker, workers serving another table, queues no worker holds."""
    state_dir = cfg.globals.state_dir
    want = desired(cfg)
    have = {w.queue: w for w in running(state_dir)}
    bound = bound_queues()
    out = []
    for q, table in sorted(want.items()):
        w = have.get(q)
        if w is None:
            out.append(f"worker queue {q}: not running")
        elif w.digest != table.digest():
            out.append(f"worker queue {q} (pid {w.pid}): serves another table than the configuration's")
        elif not _holds_queue(w, bound):
            out.append(f"worker queue {q} (pid {w.pid}): does not hold its queue")
    out += [f"worker queue {q} (pid {w.pid}): not in the configuration" for q, w in sorted(have.items())
            if q not in want]
    return out
