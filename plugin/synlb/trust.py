"""Which files synlb may run or import as root: the rule of keepalived's
``enable_script_security`` (pure apart from reading file metadata).

Used for the health plugin's exec checks, the scripts plugin's transition
scripts, and plugins named by a dotted module path.
"""

from __future__ import annotations

import os
import stat


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


def _walk(path: str, stat_of) -> str | None:
    """Why some component of ``path`` (read with ``stat_of``) is unsafe, or None."""
    chain = _chain(path)
    for i, p in enumerate(chain):
        try:
            st = stat_of(p)
        except OSError as e:
            return f"{p}: {e.strerror}"
        why = _unsafe(p, st, i == len(chain) - 1)
        if why:
            return why
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
    real = os.path.realpath(path)
    why = _walk(path, os.lstat) or _walk(real, os.stat)
    if why:
        return None, why
    return real, None


def insecure(path: str) -> str | None:
    """Why ``path`` must not be run as root, or None when it may (see :func:`trusted`)."""
    return trusted(path)[1]
