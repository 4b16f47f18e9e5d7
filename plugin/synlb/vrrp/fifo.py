"""``synlb fifo PATH``: keepalived's ``notify_fifo_script``.

keepalived creates the FIFO, starts this with the FIFO's path appended, then
writes one line per transition (``GROUP "G1" MASTER 0``, ``INSTANCE "FRONT"
BACKUP 150``, ...). Lines arrive in order; each relevant one becomes a
:class:`~synlb.vrrp.events.VrrpEvent`, delivered by
:func:`synlb.vrrp.delivery.deliver` in a detached child.
Lines already waiting behind one are read first and only the last relevant
event of such a burst is applied (the others are logged as superseded): the
end state is the same, with one reconcile instead of several.

keepalived's shutdown order matters: it sends this script SIGTERM *before*
writing the STOP lines, then closes the FIFO about a second later. So
SIGTERM does not end the reader at once: it keeps reading for
:data:`GRACE` seconds (or until EOF), applies what came (STOP), then exits.
A reload (SIGHUP to keepalived) also sends SIGTERM and closes the FIFO, then
starts a new reader on a new FIFO. EOF ends the reader.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import time

from . import delivery, journal
from .events import VrrpError, parse_fifo_line

GRACE = 0.5  # seconds to keep reading after SIGTERM (keepalived writes STOP after it)


class _Stop(Exception):
    pass


def _readable(fd: int) -> bool:
    r, _, _ = select.select([fd], [], [], 0)
    return bool(r)


def follow(config_path: str | None, path: str) -> int:
    ld = delivery.load(config_path)  # fail fast on a config that cannot be used
    try:
        st = os.stat(path)
    except OSError as e:
        raise VrrpError(f"{path}: {e.strerror}") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise VrrpError(f"{path} is not a FIFO (keepalived's notify_fifo)")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return _follow(config_path, path, ld)
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _follow(config_path: str | None, path: str, ld) -> int:
    # Until keepalived opens its end, open() blocks; SIGTERM then just ends us.
    def early(signum, frame):
        raise _Stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, early)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except _Stop:
        return 0

    term_at: list[float] = []

    def on_term(signum, frame):
        if not term_at:
            term_at.append(time.monotonic())

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    reader = _Reader(config_path, ld)
    try:
        buf = b""
        eof = False
        while True:
            timeout = None if not term_at else max(0.0, term_at[0] + GRACE - time.monotonic())
            ready, _, _ = select.select([fd, wake_r], [], [], timeout)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
            if fd in ready:
                data = os.read(fd, 65536)
                if data:
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    reader.lines(lines)
                else:
                    eof = True
            if eof or not _readable(fd):
                if eof and buf.strip():
                    reader.lines([buf])
                    buf = b""
                reader.flush()
            if eof:
                break
            if term_at and time.monotonic() >= term_at[0] + GRACE and not _readable(fd):
                break
        reader.flush()
    finally:
        signal.set_wakeup_fd(-1)
        for f in (fd, wake_r, wake_w):
            with contextlib.suppress(OSError):
                os.close(f)
    return 0


class _Reader:
    """Turns lines into events; applies the last relevant one of a burst."""

    def __init__(self, config_path: str | None, ld: delivery.Loaded):
        self.config_path = config_path
        self.ld = ld
        self.pending: tuple | None = None  # (event, stamp)

    def lines(self, lines: list[bytes]) -> None:
        with contextlib.suppress(Exception):  # a config broken since start: keep the old view
            self.ld = delivery.load(self.config_path)
        for raw in lines:
            ev = parse_fifo_line(raw)
            if ev is None:
                continue
            stamp = journal.now_stamp()
            if not self.ld.vcfg.matches(ev):
                journal.log_event(self.ld.state_dir, ev, stamp, ignored=True)
                continue
            if self.pending is not None:
                journal.log_event(self.ld.state_dir, *self.pending, superseded=True)
            self.pending = (ev, stamp)

    def flush(self) -> None:
        if self.pending is None:
            return
        ev, stamp = self.pending
        self.pending = None
        delivery.deliver_detached("fifo", self.config_path, ev, stamp)
