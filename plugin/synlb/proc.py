"""The admin's executables that synlb runs as root: the health plugin's exec
checks and the scripts plugin's transition scripts.

- which paths may be run as root at all: :mod:`synlb.trust`;
- :func:`run`: spawn one (argv, no shell; cwd ``/``; stdin from /dev/null;
  stdout and stderr together into a temporary file; its own session), wait
  at most ``timeout``, then kill its whole process group (SIGTERM, SIGKILL
  :data:`KILL_GRACE` later), and hand back the exit code and the end of its
  output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass

KILL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL of a process group that timed out


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
