"""The state directory (``[synlb] state_dir``, default ``/run/synlb``): every
path in it, the check that it is safe to use, atomic writes, the lock.

synlb runs as root and trusts what it reads back from this directory (which
routes ``down`` deletes, which sysctls it restores, which pids it signals),
so the directory must be one that only root can change:

- :func:`ensure` refuses a state directory that is a symlink, not a
  directory, not owned by root (when running as root) or writable by group
  or others, or whose parents are not root's (owned by root, not writable by
  group or others unless sticky, like ``/tmp``); a missing one is created
  mode 0700, missing parents too. Every command that touches the directory
  calls it first (cli, vrrp.delivery.load), and :func:`locked` once more.
- :func:`write_json` replaces a file atomically: a unique temp file in the
  same directory (``O_EXCL``: never a fixed name, never a planted symlink
  followed), fsync, rename, fsync of the directory. A reader sees the old
  file or the new one, never half of one; a crash leaves no temp file that
  a later write would trip over.
- :func:`read_json` and :func:`open_append` never follow a symlink either.

The files (``worker-<queue>.*`` once per NFQUEUE queue). The workers run as
``[synlb] worker_user`` (``_synlb``; docs/HARDENING.md): what they read is
in ``workers/`` (root:<its group>, 0750; the files root:<its group>, 0640,
written by root only), what they write in ``workers/run/`` (the user's own,
0700); everything else is root's, 0600, in a state dir that is root's and
at most traversable (0710, group the workers' own, when they are not root).
Root reads ``workers/run/`` as untrusted input (:func:`read_untrusted`).

==========================  ==========================================  =================
file                        what                                        written by
==========================  ==========================================  =================
lock                        the data plane lock (flock)                 :func:`locked`
applied.json                what ``up`` applied (digest, route proto)   dataplane
netfilter.json              fingerprints of the applied rules           netfilter
sysctl-saved.json           pickup sysctls as found before ``up``       sysctl
targets-down.json           targets the health checks took out          health_state
control.sock                the host's control socket                   control
vrrp-state.json             the newest VRRP event                       vrrp.journal
vrrp.log, vrrp.log.1        every VRRP event seen                       vrrp.journal
worker-N.pid                the worker's pid, service, table, uid       workers
nft.json                    what the nftables engine's table holds      nft_apply
nft-slots-SVC.bin           a service's applied slot marks (nftables)   nft_apply
nft-pins-SVC.json           a service's applied pins (nftables)         nft_apply
workers/worker-N.table.json the table the worker serves (hash_key)      worker_table
workers/pins.json           pins from the peers (sync plugin)           pins_state
workers/worker-N.log        the worker's stdout and stderr (root's      workers
                            file, the worker holds an fd on it)
workers/run/worker-N.log.1  the log's older part, past 1 MiB            worker
workers/run/worker-N.stats  the worker's counters (and pid once bound)  worker
  .json
==========================  ==========================================  =================
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile

from .errors import UserError

LOCK = "lock"
APPLIED = "applied.json"
CARRIED = "carried"  # present while this router is MASTER: see dataplane.forget_connections
NETFILTER = "netfilter.json"
SYSCTL_SAVED = "sysctl-saved.json"
TARGETS_DOWN = "targets-down.json"
PINS = "pins.json"  # in WORKERS_DIR
CONTROL_SOCKET = "control.sock"
VRRP_STATE = "vrrp-state.json"
VRRP_LOG = "vrrp.log"
VRRP_LOG_OLD = VRRP_LOG + ".1"
NFT_STATE = "nft.json"
_NFT_SERVICE_RE = re.compile(r"nft-slots-[A-Za-z0-9_]{1,12}\.bin|nft-pins-[A-Za-z0-9_]{1,12}\.json")

# what the workers read (root writes it), and what they write
WORKERS_DIR = "workers"
WORKERS_RUN = "run"  # in WORKERS_DIR

# worker-<queue><suffix>
WORKER_PID = ".pid"
WORKER_LOG = ".log"
WORKER_LOG_OLD = ".log.1"
WORKER_TABLE = ".table.json"
WORKER_STATS = ".stats.json"
_WORKER_RE = re.compile(r"worker-(0|[1-9][0-9]{0,4})(\.[a-z.]+)")

# where each kind of worker-<queue><suffix> file is: the state dir (None),
# WORKERS_DIR or WORKERS_RUN
_WORKER_WHERE = {WORKER_PID: None, WORKER_TABLE: "workers", WORKER_LOG: "workers",
                 WORKER_LOG_OLD: "run", WORKER_STATS: "run"}

MODE = 0o700
FILE_MODE = 0o600
SHARED_MODE = 0o640  # the files of WORKERS_DIR: root writes them, the workers' group reads them
WORKERS_MODE = 0o750
# the most root reads of a file a worker wrote (its stats: a few hundred
# bytes per target; a log's tail)
UNTRUSTED_MAX = 4 << 20


class StateDirError(UserError):
    """A state directory synlb must not use (a symlink, not root's, writable
    by others); the message names it and says why."""


# ------------------------------------------------------------------ paths

def path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name)


def lock(state_dir: str) -> str:
    return path(state_dir, LOCK)


def applied(state_dir: str) -> str:
    return path(state_dir, APPLIED)


def carried(state_dir: str) -> str:
    return path(state_dir, CARRIED)


def netfilter(state_dir: str) -> str:
    return path(state_dir, NETFILTER)


def sysctl_saved(state_dir: str) -> str:
    return path(state_dir, SYSCTL_SAVED)


def targets_down(state_dir: str) -> str:
    return path(state_dir, TARGETS_DOWN)


def pins(state_dir: str) -> str:
    return os.path.join(workers_dir(state_dir), PINS)


def workers_dir(state_dir: str) -> str:
    """What the workers read, only root writes: their tables, the pins, their logs."""
    return path(state_dir, WORKERS_DIR)


def workers_run(state_dir: str) -> str:
    """What the workers write: their stats, their old logs."""
    return os.path.join(workers_dir(state_dir), WORKERS_RUN)


def _worker_where(state_dir: str, suffix: str) -> str:
    where = _WORKER_WHERE[suffix]
    return state_dir if where is None else workers_dir(state_dir) if where == "workers" else workers_run(state_dir)


def control_socket(state_dir: str) -> str:
    return path(state_dir, CONTROL_SOCKET)


def vrrp_state(state_dir: str) -> str:
    return path(state_dir, VRRP_STATE)


def vrrp_log(state_dir: str) -> str:
    return path(state_dir, VRRP_LOG)


def vrrp_log_old(state_dir: str) -> str:
    return path(state_dir, VRRP_LOG_OLD)


def nft_state(state_dir: str) -> str:
    return path(state_dir, NFT_STATE)


def nft_slots(state_dir: str, service: str) -> str:
    return path(state_dir, f"nft-slots-{service}.bin")


def nft_pins(state_dir: str, service: str) -> str:
    return path(state_dir, f"nft-pins-{service}.json")


def nft_service_files(state_dir: str) -> list[str]:
    """Every service's nft-slots-SVC.bin and nft-pins-SVC.json there is."""
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    return [path(state_dir, n) for n in names if _NFT_SERVICE_RE.fullmatch(n)]


def worker_file(state_dir: str, queue: int, suffix: str) -> str:
    """``worker-<queue><suffix>``, suffix one of WORKER_PID/LOG/LOG_OLD/TABLE/STATS, in
    the directory that kind of file is in (the table above)."""
    return os.path.join(_worker_where(state_dir, suffix), f"worker-{int(queue)}{suffix}")


def worker_pid(state_dir: str, queue: int) -> str:
    return worker_file(state_dir, queue, WORKER_PID)


def worker_log(state_dir: str, queue: int) -> str:
    return worker_file(state_dir, queue, WORKER_LOG)


def worker_log_old(state_dir: str, queue: int) -> str:
    return worker_file(state_dir, queue, WORKER_LOG_OLD)


def worker_table(state_dir: str, queue: int) -> str:
    return worker_file(state_dir, queue, WORKER_TABLE)


def worker_stats(state_dir: str, queue: int) -> str:
    return worker_file(state_dir, queue, WORKER_STATS)


def worker_queues(state_dir: str, suffix: str) -> list[int]:
    """The queues that have a ``worker-<queue><suffix>`` file, in the order
    of the file names; none when the directory does not exist."""
    try:
        names = sorted(os.listdir(_worker_where(state_dir, suffix)))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _WORKER_RE.fullmatch(name)
        if m and m.group(2) == suffix:
            out.append(int(m.group(1)))
    return out


# ------------------------------------------------------------------ the directory

def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _refuse(state_dir: str, why: str, parent: str | None = None) -> StateDirError:
    subject = f"state_dir {state_dir}" + (f": its parent {parent}" if parent else "")
    return StateDirError(f"{subject} {why}: refused (a state directory and its parents must be "
                         "root's, writable by root only; see [synlb] state_dir)")


def _check_dir(state_dir: str, shown: str, st: os.stat_result, *, parent: bool) -> None:
    """``st`` (an lstat of ``shown``) is a directory only root can change, else raise."""
    where = shown if parent else None
    if stat.S_ISLNK(st.st_mode):
        try:
            to = os.readlink(shown)
        except OSError:
            to = "?"
        raise _refuse(state_dir, f"is a symlink (to {to})", where)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(state_dir, "is not a directory", where)
    if os.geteuid() == 0 and st.st_uid != 0:
        raise _refuse(state_dir, f"is owned by uid {st.st_uid}, not root", where)
    if st.st_mode & 0o022 and not (parent and st.st_mode & stat.S_ISVTX):
        raise _refuse(state_dir, f"is writable by group or others (mode {_mode(st)})", where)


def _check_parents(state_dir: str, d: str) -> None:
    """Every directory above ``d`` (symlinks resolved) is root's: nobody
    else can rename the state directory away and put their own in its place."""
    p = os.path.realpath(os.path.dirname(d))
    while True:
        _check_dir(state_dir, p, os.lstat(p), parent=True)
        if p == os.path.dirname(p):
            return
        p = os.path.dirname(p)


def _create(state_dir: str) -> None:
    """mkdir -p, every directory made mode 0700 (whatever the umask)."""
    missing = []
    p = state_dir
    while not os.path.lexists(p):
        missing.append(p)
        if p == os.path.dirname(p):
            break
        p = os.path.dirname(p)
    for d in reversed(missing):
        try:
            os.mkdir(d, MODE)
        except FileExistsError:  # a concurrent synlb made it: checked below like any other
            continue
        os.chmod(d, MODE)


def ensure(state_dir: str, create: bool = True) -> None:
    """Refuse a state directory synlb must not trust (StateDirError, one
    line); create a missing one (mode 0700) unless ``create`` is False (then
    a missing directory is fine: there is nothing in it to read)."""
    if not os.path.isabs(state_dir):
        raise _refuse(state_dir, "is not an absolute path")
    d = state_dir.rstrip("/") or "/"
    try:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            if not create:
                return
            first = d  # the topmost missing directory: what is above it must be root's
            while not os.path.lexists(os.path.dirname(first)):
                first = os.path.dirname(first)
            _check_parents(state_dir, first)
            _create(d)
            st = os.lstat(d)
        _check_dir(state_dir, d, st, parent=False)
        _check_parents(state_dir, d)
    except (StateDirError, PermissionError):  # not root: reported as such (errors.run_reporting)
        raise
    except OSError as e:
        raise _refuse(state_dir, f"cannot be used ({e.filename or d}: {e.strerror or e})") from None


def _search_bit(st: os.stat_result, uid: int, gid: int) -> int:
    """The x bit that counts for uid:gid (no other groups) on a file with ``st``."""
    return 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001


def unreachable_by(p: str, uid: int, gid: int) -> str | None:
    """Why uid:gid (no supplementary groups, as the workers run) cannot reach
    ``p`` (symlinks resolved): the first directory on the way it may not
    search, or ``p`` itself when it is a file it may not read; None when it can."""
    real = os.path.realpath(p)
    parts = [x for x in real.split("/") if x]
    chain = ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for d in chain:
        try:
            st = os.stat(d)
        except OSError as e:
            return f"{d}: {e.strerror}"
        if stat.S_ISDIR(st.st_mode):
            if not st.st_mode & _search_bit(st, uid, gid):
                return f"{d} is not searchable by it (mode {_mode(st)}, uid {st.st_uid}, gid {st.st_gid})"
        elif not st.st_mode & (_search_bit(st, uid, gid) << 2):
            return f"{d} is not readable by it (mode {_mode(st)}, uid {st.st_uid}, gid {st.st_gid})"
    return None


def _own_dir(p: str, uid: int, gid: int, mode: int) -> None:
    """``p`` is a directory (made if missing, never a symlink followed) owned
    by uid:gid with ``mode``."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(p, mode)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StateDirError(f"{p}: not a directory synlb made ({e.strerror}): refused") from None
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def ensure_workers(state_dir: str, uid: int | None = None, gid: int | None = None) -> None:
    """The directories of workers that run as uid:gid (``[synlb]
    worker_user``; by default this process's user, for a worker run in this
    process), made or put right; StateDirError when the workers could not
    reach them.

    - the state dir (:func:`ensure`: root's, not writable by group or
      others): when uid:gid may not search it, its group becomes gid and
      gid may search it (0700 -> 0710); nothing else in it is theirs to read
      (every file is root's, 0600);
    - ``workers/``: root:gid, 0750; the tables and the pins in it root:gid,
      0640 (root writes them: :func:`write_file` with ``share``);
    - ``workers/run/``: uid:gid, 0700, the one place the workers write.
    """
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    ensure(state_dir)
    d = state_dir.rstrip("/") or "/"
    if uid != 0 and os.geteuid() == 0:
        st = os.lstat(d)
        if not st.st_mode & _search_bit(st, uid, gid):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, 0, gid)
                os.fchmod(fd, (stat.S_IMODE(st.st_mode) & ~0o070) | 0o010)
            finally:
                os.close(fd)
        why = unreachable_by(d, uid, gid)
        if why:
            raise _refuse(state_dir, f"cannot be reached by the workers' user (uid {uid}): {why}; make "
                          "its parents searchable by others (o+x), or set [synlb] worker_user = root")
    w = workers_dir(state_dir)
    _own_dir(w, 0 if os.geteuid() == 0 else os.geteuid(), gid, WORKERS_MODE)
    _own_dir(workers_run(state_dir), uid, gid, 0o700)
    for name in os.listdir(w):
        if name == PINS or (_WORKER_RE.fullmatch(name) and name.endswith(WORKER_TABLE)):
            try:
                fd = _open_regular(os.path.join(w, name), os.O_RDONLY)
            except (OSError, ValueError):
                continue
            try:
                st = os.fstat(fd)
                if st.st_gid != gid:
                    os.fchown(fd, -1, gid)
                if stat.S_IMODE(st.st_mode) != SHARED_MODE:
                    os.fchmod(fd, SHARED_MODE)
            finally:
                os.close(fd)


@contextlib.contextmanager
def locked(state_dir: str):
    """The data plane lock: one writer of the kernel at a time (flock on
    ``lock``, which is opened without following a symlink)."""
    ensure(state_dir)
    try:
        fd = _open_regular(lock(state_dir), os.O_RDWR | os.O_CREAT)
    except (OSError, ValueError) as e:
        raise StateDirError(f"{lock(state_dir)}: cannot open the data plane lock: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ files

def write_json(path: str, data, *, sync: bool = True, share: bool = False, **dump) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically (:func:`write_file`).
    ``dump``: extra ``json.dump`` arguments."""
    write_file(path, lambda fh: fh.write(json.dumps(data, **dump).encode()), sync=sync, share=share)


def write_file(path: str, fill, *, sync: bool = True, share: bool = False) -> None:
    """Replace ``path`` atomically with what ``fill(fh)`` writes to a binary
    file: a unique temp file beside it (created with O_EXCL, mode 0600: a
    symlink or file planted at any name is never followed nor reused),
    fsync, rename over ``path``, fsync of the directory. ``sync=False``
    leaves out both fsyncs, for a file that nothing recovers after a crash
    and whose writer must not wait on a disk (the worker's counters, its old
    log: its loop runs between two packets' verdicts). ``share``: a file
    of ``workers/`` that the workers read: mode 0640, group the directory's
    (made, 0750, if missing; :func:`ensure_workers` gives it the workers'
    group). The temp file never stays behind."""
    d, name = os.path.split(path)
    if share:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, WORKERS_MODE)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d or ".")
    try:
        if share:
            os.fchown(fd, -1, os.stat(d).st_gid)
            os.fchmod(fd, SHARED_MODE)
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        dfd = os.open(d or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class NotAFile(ValueError):
    """What is at a state file's name is a symlink or no regular file: not read."""


def _open_regular(path: str, flags: int, mode: int = FILE_MODE) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise NotAFile(f"{path}: a symlink, not followed") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAFile(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: str) -> bytes:
    """The file's bytes; FileNotFoundError when there is none, NotAFile (a
    ValueError) for a symlink or anything but a regular file."""
    with os.fdopen(_open_regular(path, os.O_RDONLY), "rb") as fh:
        return fh.read()


def read_json(path: str):
    """The file's JSON; FileNotFoundError when there is none, ValueError when
    it is not JSON or not a regular file (a symlink is never followed)."""
    return json.loads(read_bytes(path))


def read_untrusted(path: str, max_bytes: int = UNTRUSTED_MAX, *, tail: bool = False) -> bytes:
    """A file a worker wrote (or could have replaced), read by root: never
    through a symlink, only a regular file with one link (not a hard link a
    worker made to a file it may not read), at most ``max_bytes`` (``tail``:
    its last ``max_bytes``; else a longer file is refused). FileNotFoundError
    when there is none; NotAFile (a ValueError) for anything else wrong."""
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:  # a socket (ENXIO), no permission...: not something to read
        raise NotAFile(f"{path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if st.st_nlink != 1:
            raise NotAFile(f"{path}: {st.st_nlink} hard links, not read")
        if tail:
            fh.seek(max(0, st.st_size - max_bytes))
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        if not tail:
            raise NotAFile(f"{path}: larger than {max_bytes} bytes, not read")
        data = data[-max_bytes:]
    return data


def read_untrusted_json(path: str, max_bytes: int = UNTRUSTED_MAX):
    """:func:`read_untrusted`, as JSON: ValueError for anything but JSON
    (nesting too deep for the parser included)."""
    data = read_untrusted(path, max_bytes)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deep") from None


def open_append(path: str):
    """A log file opened for appending (binary; created mode 0600), never
    through a symlink."""
    return os.fdopen(_open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")


def open_log(path: str):
    """A worker's log, opened by root for the worker to inherit: appending,
    created mode 0600 (root's: the worker cannot open it by its name, only
    use this fd), readable through the fd too so that the worker can copy
    it when it rotates it (worker.rotate_log); never through a symlink."""
    return os.fdopen(_open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT), "ab")


def is_file(path: str) -> bool:
    """A regular file is there (a symlink is not one, whatever it points to)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove(path: str) -> bool:
    """Remove the file (a symlink itself, never its target); False if there was none."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
