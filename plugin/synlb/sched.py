"""The scheduling priority of synlb's own processes.

The control plane (``synlb run`` and the commands that change the data
plane) runs at ``[synlb] nice``: a health flip, a failover or a table
rebuild should not wait behind best-effort processes on a busy router. The
NFQUEUE workers are the packet path and run at the default priority,
:data:`WORKER_NICE`, whatever the process that started them had: a SYN
flood keeping a worker busy must not crowd out the control plane that
reacts to it.

Linux keeps a nice value per thread, and a thread starts with its
creator's: ``set_nice`` runs before a process makes its threads.
"""

from __future__ import annotations

import errno
import os

from .errors import UserError

WORKER_NICE = 0


class PriorityError(UserError):
    pass


def set_nice(nice: int, where: str) -> None:
    """This process's nice value; ``where`` names the setting (FILE:SECTION:KEY)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as e:
        raise PriorityError(f"{where}: cannot run at nice {nice}: {errno.errorcode.get(e.errno, e.errno)} "
                            "(a negative value needs root or CAP_SYS_NICE)") from None


def reset_worker(pid: int) -> None:
    """A worker just started: back to :data:`WORKER_NICE` (a worker that
    already ended is the caller's to find out)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, WORKER_NICE)
    except ProcessLookupError:
        pass


def nice_of(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)
