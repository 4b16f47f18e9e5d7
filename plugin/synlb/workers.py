"""Start, find and stop worker processes.

A worker's pid file (``worker-<queue>.pid``, JSON) is trusted only if psutil
shows a live process whose command line is that worker's: a stale file left by
a crash or a reused pid is recognised and removed.

Workers run as ``[synlb] worker_user`` (default ``_synlb``) with
CAP_NET_ADMIN only (docs/HARDENING.md): started through util-linux's
``setpriv`` (a root-owned binary, checked with trust.py before it runs),
which sets the user's uid and gid, no supplementary groups, CAP_NET_ADMIN
alone in the inheritable, ambient and bounding sets, and no_new_privs, then
runs ``synlb worker``. ``worker_user = root`` starts them as root, as
before. What a worker writes (its stats, its old log) is read back here as
untrusted input (statedir.read_untrusted).
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from . import health_state, sched, statedir, trust, worker_table
from .errors import UserError
from .worker import stats_file
from .config import Config
from .worker_table import WorkerTable, WorkerTableError

QUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
BIND_TIMEOUT = 5.0
# where setpriv is looked for (util-linux: /usr/bin/setpriv on Debian 12)
SETPRIV_PATH = "/usr/bin:/bin"
# the one capability a worker keeps: binding an NFQUEUE queue, and the
# kernel checks it again on every verdict (nfnetlink_rcv)
WORKER_CAPS = "-all,+net_admin"
LOG_TAIL_BYTES = 64 << 10  # what is read of a worker's log to say why it died


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
    # the read end of the pipe the worker writes a byte to once it serves
    # its queue (wait_bound); only in the process that started it
    ready: int | None = field(default=None, compare=False, repr=False)

    @property
    def pidfile(self) -> str:
        return pidfile(self.state_dir, self.queue)


@dataclass(frozen=True)
class Identity:
    """Who the workers run as: ``[synlb] worker_user`` and its primary group."""
    user: str
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0


def _where(cfg: Config) -> str:
    return cfg.sections.get("synlb", {}).get("worker_user", (None, cfg.files[0] if cfg.files else "-"))[1]


def identity(cfg: Config) -> Identity:
    """The configured worker user, looked up now (config.load checked that
    it existed; it may have been removed since): WorkerError naming the key."""
    name = cfg.globals.worker_user
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise WorkerError(f"{_where(cfg)}:synlb:worker_user: no user {name!r} on this system "
                          "(the NFQUEUE workers run as it)") from None
    return Identity(name, pw.pw_uid, pw.pw_gid)


def launcher(ident: Identity) -> list[str]:
    """What runs ``synlb worker`` as ``ident``: setpriv with its options
    ([] for root). The setpriv run is the real path of a root-owned binary in
    root-owned directories (trust.trusted), else WorkerError."""
    if ident.root:
        return []
    found = shutil.which("setpriv", path=SETPRIV_PATH)
    if found is None:
        raise WorkerError(f"setpriv (util-linux) not found in {SETPRIV_PATH}: it starts the workers as "
                          f"worker_user {ident.user}")
    real, why = trust.trusted(found)
    if real is None:
        raise WorkerError(f"{found} is not run as root: {why}")
    return [real, f"--reuid={ident.uid}", f"--regid={ident.gid}", "--clear-groups",
            f"--inh-caps={WORKER_CAPS}", f"--ambient-caps={WORKER_CAPS}", f"--bounding-set={WORKER_CAPS}",
            "--no-new-privs", "--"]


def _interpreter(script: str) -> str | None:
    """The interpreter a script's ``#!`` line names, if any."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def prepare(cfg: Config, ident: Identity) -> None:
    """The workers' directories (statedir.ensure_workers), and the code they
    run reachable by their user: else a WorkerError before anything starts,
    rather than a worker that dies on a permission error."""
    statedir.ensure_workers(cfg.globals.state_dir, ident.uid, ident.gid)
    if ident.root:
        return
    import synlb
    prog = synlb_command()[0]
    for p in (prog, _interpreter(prog), os.path.dirname(synlb.__file__)):
        why = p and statedir.unreachable_by(p, ident.uid, ident.gid)
        if why:
            raise WorkerError(f"{_where(cfg)}:synlb:worker_user: {ident.user} (uid {ident.uid}) cannot run "
                              f"synlb's code: {why}")


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
    executable, same owner (real, effective and saved uid: the user it was
    started as), and a worker's command line for that queue and service.
    Checked before a pid is signalled or adopted."""
    try:
        cmd = proc.cmdline()
        uids = proc.uids()
        same = (abs(proc.create_time() - info.started) < 0.01 and proc.exe() == info.exe
                and uids.real == uids.effective == uids.saved == info.uid)
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


def start(state_dir: str, table: WorkerTable, ident: Identity) -> WorkerInfo:
    """Write the worker's table, then start it on that table, as ``ident``
    (``prepare`` made its directories)."""
    queue = table.queue
    statedir.remove(stats_file(state_dir, queue))
    worker_table.write(state_dir, table)
    pre = launcher(ident)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    argv = pre + synlb_command() + ["worker", f"--state-dir={state_dir}", f"--service={table.service}",
                                    f"--queue={queue}", f"--ready-fd={ready_w}"]
    try:
        with statedir.open_log(statedir.worker_log(state_dir, queue)) as log:
            # a new session: keepalived kills a notify script's process group
            # on timeout, and the workers must outlive the script that started them
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True, pass_fds=(ready_w,), cwd="/")
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)  # the worker's alone now: its exit is the pipe's end
    sched.reset_worker(proc.pid)  # the packet path, at the default priority (not the control plane's)
    info = WorkerInfo(pid=proc.pid, service=table.service, queue=queue, digest=table.digest(),
                      state_dir=state_dir, uid=ident.uid, ready=ready_r)
    try:
        me = psutil.Process(proc.pid)
        info.started = me.create_time()
        info.exe = _exe_past(me, pre[0] if pre else None, info)
        uids = me.uids()
        if not uids.real == uids.effective == uids.saved == ident.uid:
            raise WorkerError(f"worker for queue {queue} runs as uid {tuple(uids)}, not {ident.user}'s "
                              f"{ident.uid}")
        _write(info)
    except (OSError, psutil.Error, WorkerError) as e:  # a worker nobody can find would hold the queue for good
        proc.kill()
        proc.wait(5)
        _close_ready(info)
        if isinstance(e, WorkerError):
            raise
        raise WorkerError(f"{info.pidfile}: cannot record worker queue {queue}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return info


def _exe_past(me: psutil.Process, launcher_exe: str | None, info: WorkerInfo) -> str:
    """The worker's executable: what Popen started (it returns after the
    exec), or, started through setpriv, what setpriv executes next (it sets
    the user and the capabilities first)."""
    exe = me.exe()
    if launcher_exe is None:
        return exe
    deadline = time.monotonic() + BIND_TIMEOUT
    while exe == launcher_exe:
        if me.status() == psutil.STATUS_ZOMBIE:
            raise WorkerError(f"worker for queue {info.queue} exited: {_log_tail(info)}")
        if time.monotonic() > deadline:
            raise WorkerError(f"worker for queue {info.queue}: setpriv did not start it within "
                              f"{BIND_TIMEOUT}s: {_log_tail(info)}")
        time.sleep(0.001)
        # (a Process caches its exe: asked anew; the pid is our unreaped child's)
        exe = psutil.Process(me.pid).exe()
    return exe


def _holds_queue(info: WorkerInfo, bound: dict) -> bool:
    """The kernel has a listener on the queue, and that listener is this worker."""
    if not bound.get(info.queue, {}).get("portid"):
        return False
    return _published(info.state_dir, info)


def serving(state_dir: str) -> frozenset:
    """The queues that a live worker of this state dir holds (the kernel's listener is that worker)."""
    bound = bound_queues()
    return frozenset(w.queue for w in running(state_dir) if _holds_queue(w, bound))


def wait_bound(infos: list[WorkerInfo], timeout: float = BIND_TIMEOUT) -> None:
    """Return once every worker serves its queue: it writes a byte to its
    ready pipe after binding the queue, publishing its stats file and
    reading the pins. A worker that exits first ends its pipe with nothing
    (WorkerError with its log tail), and so does one not ready in time."""
    deadline = time.monotonic() + timeout
    pending = {info.ready: info for info in infos if info.ready is not None}
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                info = next(iter(pending.values()))
                raise WorkerError(f"worker for queue {info.queue} did not bind within {timeout}s: "
                                  f"{_log_tail(info)}")
            ready, _, _ = select.select(list(pending), [], [], left)
            for fd in ready:
                info = pending.pop(fd)
                said = os.read(fd, 1)
                _close_ready(info)
                if not said:
                    raise WorkerError(f"worker for queue {info.queue} exited: {_log_tail(info)}")
    finally:
        for info in pending.values():
            _close_ready(info)


def _close_ready(info: WorkerInfo) -> None:
    if info.ready is not None:
        os.close(info.ready)
        info.ready = None


def read_stats(state_dir: str, queue: int) -> dict:
    """The counters the queue's worker published ({} when there are none
    or they are not what a worker writes). A worker that is not root wrote
    them, in a directory it owns: read as untrusted input (never through a
    symlink or a hard link, bounded, every field used checked)."""
    try:
        stats = statedir.read_untrusted_json(stats_file(state_dir, queue))
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(stats, dict):
        return {}
    for key in ("pid", "packets"):
        v = stats.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return {}
    return stats


def _published(state_dir: str, info: WorkerInfo) -> bool:
    """The worker published its stats file: it holds its queue and has its signal handlers."""
    return read_stats(state_dir, info.queue).get("pid") == info.pid


def _log_tail(info: WorkerInfo) -> str:
    try:
        data = statedir.read_untrusted(statedir.worker_log(info.state_dir, info.queue), LOG_TAIL_BYTES,
                                       tail=True)
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


def _bound_flow_hash(state_dir: str, queue: int) -> str | None:
    """The flow hash of the table a running worker serves (None: unknown)."""
    try:
        return worker_table.load(state_dir, queue).flow_hash
    except WorkerTableError:
        return None


def ensure(cfg: Config, stop_unwanted: bool = True) -> list[str]:
    """One worker per configured queue, serving its desired table; return changes.

    ``stop_unwanted=False`` leaves running the workers of queues no service
    wants any more (the caller stops them with a second call, once their
    NFQUEUE rules are gone: a queue never loses its listener first)."""
    state_dir = cfg.globals.state_dir
    want = desired(cfg)
    ident = identity(cfg) if want else None
    if ident is not None:
        prepare(cfg, ident)
    have = {w.queue: w for w in running(state_dir)}
    changes = []
    for q, w in sorted(have.items()):
        table = want.get(q)
        if table is None and not stop_unwanted:
            del have[q]
            continue
        if table is not None and table.service == w.service and w.uid != ident.uid:
            stop(w)  # worker_user changed (or a worker of an older synlb, as root): started anew below
            changes.append(f"stopped worker queue {q} (pid {w.pid}): uid {w.uid}, not {ident.user}'s {ident.uid}")
            del have[q]
        elif table is None or table.service != w.service:
            stop(w)
            worker_table.remove(state_dir, q)
            changes.append(f"stopped worker queue {q} (pid {w.pid})")
            del have[q]
        elif w.digest != table.digest() and _bound_flow_hash(state_dir, q) not in (None, table.flow_hash):
            # its packet callback is the flow hash's it bound the queue with
            stop(w)
            changes.append(f"stopped worker queue {q} (pid {w.pid}): flow_hash is now {table.flow_hash}")
            del have[q]
        elif w.digest != table.digest():
            reload(w, state_dir, table)
            changes.append(f"reloaded worker queue {q} (pid {w.pid})")
    started = []
    try:
        for q, table in sorted(want.items()):
            if q not in have:
                started.append(start(state_dir, table, ident))
        wait_bound(started)
    except WorkerError:
        for w in started:
            _close_ready(w)
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
    try:
        uid = identity(cfg).uid if want else None
    except WorkerError as e:
        out.append(str(e))
        uid = None
    for q, table in sorted(want.items()):
        w = have.get(q)
        if w is None:
            out.append(f"worker queue {q}: not running")
        elif uid is not None and w.uid != uid:
            out.append(f"worker queue {q} (pid {w.pid}): runs as uid {w.uid}, not worker_user "
                       f"{cfg.globals.worker_user}'s {uid}")
        elif w.digest != table.digest():
            out.append(f"worker queue {q} (pid {w.pid}): serves another table than the configuration's")
        elif not _holds_queue(w, bound):
            out.append(f"worker queue {q} (pid {w.pid}): does not hold its queue")
    out += [f"worker queue {q} (pid {w.pid}): not in the configuration" for q, w in sorted(have.items())
            if q not in want]
    return out
