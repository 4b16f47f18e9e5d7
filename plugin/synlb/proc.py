"""The admin's executables that synlb runs as root: the health plugin's exec
checks and the scripts plugin's transition scripts.

- :func:`insecure`: whether a path may be run as root at all (the rule of
  keepalived's ``enable_script_security``);
- :func:`run`: spawn one (argv, no shell; cwd ``/``; stdin from /dev/null;
  stdout and stderr together into a temporary file; its own session), wait
  at most ``timeout``, then kill its whole process group (SIGTERM, SIGKILL
  :data:`KILL_GRACE` later), and hand back the exit code and the end of its
  output.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass

KILL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL of a process group that timed out


def _chain(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _unsafe(p: str, st: os.stat_result, last: bool) -> str | None:
    if st.st_uid != 0:
        return f"{p} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not stat.S_ISLNK(st.st_mode):
        if not last and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return None  # sticky, like /tmp: nobody but root can replace root's entries in it
        who = "group and others" if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH \
            else "group" if st.st_mode & stat.S_IWGRP else "others"
        return f"{p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def trusted(path: str) -> tuple[str | None, str | None]:
    """``(what to run, None)`` when ``path`` may be run as root, else
    ``(None, why)``.

    The rule of keepalived's ``enable_script_security``: every component
    must be owned by root and not writable by group or others (a directory
    with the sticky bit may be writable by others). It is checked twice: on
    the path as given, each component with lstat (so that no symlink on the
    way can be switched by a user between the check and the exec), and on
    the real path it leads to. What to run is that real path: exactly what
    was checked, whatever the links do later.
    """
    if not path.startswith("/") or "/../" in path + "/" or "/./" in path + "/":
        return None, f"{path}: not a plain absolute path"
    given = _chain(path)
    for i, p in enumerate(given):
        try:
            st = os.lstat(p)
        except OSError as e:
            return None, f"{p}: {e.strerror}"
        why = _unsafe(p, st, i == len(given) - 1)
        if why:
            return None, why
    real = os.path.realpath(path)
    chain = _chain(real)
    for i, p in enumerate(chain):
        try:
            st = os.stat(p)
        except OSError as e:
            return None, f"{p}: {e.strerror}"
        why = _unsafe(p, st, i == len(chain) - 1)
        if why:
            return None, why
    return real, None


def insecure(path: str) -> str | None:
    """Why ``path`` must not be run as root, or None when it may (see :func:`trusted`)."""
    return trusted(path)[1]


@dataclass(frozen=True)
class Finished:
    rc: int | None  # None: killed after the timeout
    output: bytes   # the last ``keep`` bytes of stdout and stderr


def run(argv: list[str], env: dict, timeout: float, keep: int) -> Finished:
    """Run ``argv`` to its end or to ``timeout``; raises OSError when it
    cannot be started."""
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd="/", start_new_session=True, close_fds=True)
        rc = wait_or_kill(child, timeout)
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - keep))
        return Finished(rc, out.read())


def wait_or_kill(child: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None after killing the process group on timeout."""
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)  # its own session: the group is the child's
        except (ProcessLookupError, PermissionError):
            pass
        try:
            child.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    return None
