"""The NFQUEUE worker: one process per queue.

Per packet: copy of the first ``copy_range`` bytes -> flow key (client->VIP
direction) -> keyed hash -> Maglev table of marks -> set the fwmark, accept.
Only packets that open a connection (or first-seen ones after a failover)
get here; conntrack carries the mark for everything after.

A packet that does not open a connection (not a TCP SYN: a connection
picked up mid-stream after a failover or an ECMP change) follows its pin
(``pins.py``: a running connection the configured table would send
elsewhere) if it has one.  While a target is down (the active table is not
the configured one), a TCP packet that does not open a connection follows
what this worker opened it with (``opened``: the connections it sent off
the configured table's pick, the last ``OPENED_MAX``), else the configured
table: where a running connection lives does not depend on this router's
health view, which may lag its peer's (docs/STICKINESS.md).

With ``flow_hash = jhash`` the kernel has already hashed the flow: the
packet comes with its Maglev slot as its mark (``SLOT_MARKS.start`` +
slot, nft_engine.py), or, for a connection that has a mark, with that mark,
which the worker keeps (``on_slot_packet``).

A worker never reads the INI files: it serves the table the data plane
wrote for its queue (worker_table.py), so it can never pick a target the
kernel has no route or DNAT for.  SIGHUP re-reads that table; SIGUSR1
re-reads the pins; SIGTERM/SIGINT stop the loop and unbind the queue.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
import time
from collections import OrderedDict
from hashlib import blake2b

from . import pins_state, statedir, worker_table
from .config import SLOT_MARKS
from .jhash import kernel_slot
from .maglev import FLOW_PERSON, MAX_KEY_BYTES, Maglev, marks_per_slot
from .packet import OPENING, SYN, flow_key, opens_connection, tcp_flags
from .pins import usable
from .worker_table import WorkerTable, WorkerTableError

log = logging.getLogger("synlb.worker")

STATS_INTERVAL = 1.0
LOG_MAX_BYTES = 1 << 20  # worker-N.log is copied to worker-N.log.1 and emptied past this
# connections opened off the configured table's pick, remembered for their
# first packets after the SYN (the first ACK of an untracked SYN, track_syn =
# no, is a pickup): about 100 bytes each, the oldest forgotten first, and all
# of them OPENED_KEEP seconds after the last target came back (the nftables
# engine's record has the same timeout per entry)
OPENED_MAX = 1 << 16
OPENED_KEEP = 120.0


class MarkTable:
    """Maglev table flattened to marks: one list index per packet.

    ``marks[slot]`` is the fwmark of the target owning Maglev slot ``slot``
    in the active table (precomputed: a packet costs one hash and one list
    index), ``keyed`` the flow hash state that has already absorbed the key
    (what ``Maglev.slot`` copies, without its attribute lookups), ``picks``
    the per-mark counters. ``pickup_marks`` is the same over every
    configured target, what a picked-up connection follows; ``differ``
    says the two differ (a target is down). ``split`` says a packet must be
    told apart as opening or not: they differ, or the worker still
    remembers connections it opened while they did (``Worker.swap_built``).
    """

    __slots__ = ("names", "maglev", "marks", "size", "keyed", "picks", "verdict_accept", "digest",
                 "pickup_marks", "pickup_size", "differ", "split")

    def __init__(self, table: WorkerTable):
        self.names = table.names
        key = table.hash_key.encode()
        self.maglev = Maglev(self.names, table.table_size, key)
        marks = [m for _, m in table.targets]
        self.marks = [marks[i] for i in self.maglev.table]
        self.size = len(self.marks)
        if table.configured == table.targets:
            self.pickup_marks = self.marks
        else:
            self.pickup_marks = marks_per_slot(table.configured, table.table_size, key)
        self.pickup_size = len(self.pickup_marks)
        self.differ = self.split = self.pickup_marks != self.marks
        self.keyed = blake2b(key=key[:MAX_KEY_BYTES], digest_size=8, person=FLOW_PERSON)
        self.picks = {m: 0 for _, m in table.configured} or {m: 0 for m in marks}
        self.verdict_accept = table.no_target_verdict == "accept"
        self.digest = table.digest()


class Worker:
    def __init__(self, state_dir: str, service_name: str, queue: int):
        self.state_dir = state_dir
        self.service_name = service_name
        self.queue = queue
        self.spec = self.read_table()
        self.table = MarkTable(self.spec)
        self.pins: dict[bytes, int] = {}
        self.opened: OrderedDict[bytes, int] = OrderedDict()  # flow key -> mark, see OPENED_MAX
        self.forget_opened_at = 0.0  # monotonic: when ``opened`` is cleared, once no target is down
        self.load_pins()
        self.stop = False
        self.reload = False
        self.reload_pins = False
        self.built: tuple[WorkerTable, MarkTable] | None = None  # a new table, ready to swap in
        self._builder: threading.Thread | None = None
        self._build_again = False
        self.notify_built = lambda: None  # run() sets it: wakes the loop to swap the table in
        self.attention = False  # reload, stop or stats_due is set: on_packet must look
        self.stats_due = False
        self.no_target = 0
        self.pinned = 0  # packets that followed a pin
        self.picked_up = 0  # packets that followed the configured table or what we opened (a target down)
        self.kept = 0  # packets that came with their connection's mark (flow_hash = jhash)
        self.unslotted = 0  # of those without a slot, hashed here as the kernel would (jhash)
        self.picks: dict[int, int] = {}  # counts of the tables a reload replaced
        self.started = time.time()

    @property
    def packets(self) -> int:
        return (self.no_target + self.pinned + self.picked_up + self.kept + sum(self.picks.values())
                + sum(self.table.picks.values()))

    # The hot path: no allocation beyond what netfilterqueue (Packet, payload)
    # and hashing (hash state, digest, int) force. With no pins and no
    # target down (the normal state) a packet costs two extra truth tests.
    def on_packet(self, pkt, _from_bytes=int.from_bytes, _flow_key=flow_key,
                  _opens=opens_connection) -> None:
        if self.attention:  # before the verdict: a new table must apply to this packet
            self.attend()
        t = self.table
        payload = pkt.get_payload()
        key = _flow_key(payload)
        pins = self.pins
        if pins and key in pins and not _opens(payload):
            pkt.set_mark(pins[key])
            pkt.accept()
            self.pinned += 1
        elif t.split:
            h = t.keyed.copy()
            h.update(key)
            self.split_verdict(pkt, payload, key, _from_bytes(h.digest(), "big") % t.pickup_size, t)
        elif t.size:
            h = t.keyed.copy()
            h.update(key)
            mark = t.marks[_from_bytes(h.digest(), "big") % t.size]
            pkt.set_mark(mark)
            pkt.accept()
            t.picks[mark] += 1
        else:
            self.no_target_verdict(pkt, t)
        if self.stop:
            raise LeaveLoop

    def split_verdict(self, pkt, payload: bytes, key: bytes, slot: int, t: MarkTable,
                      _flags=tcp_flags) -> None:
        """A target is down (or was, a moment ago: see ``swap_built``): a TCP
        pickup follows what we opened it with, else the configured table; a
        new connection (and anything but TCP, which has no opening packet to
        tell a pickup by) the active table, remembered when its target is
        not the configured table's pick."""
        flags = _flags(payload)
        if flags is not None and flags & OPENING != SYN:  # TCP, not opening: a pickup
            mark = self.opened.get(key) or t.pickup_marks[slot]
            pkt.set_mark(mark)
            pkt.accept()
            self.picked_up += 1
            return
        if not t.size:
            self.no_target_verdict(pkt, t)
            return
        mark = t.marks[slot]
        if mark != t.pickup_marks[slot] and flags is not None:  # a SYN (what is left of TCP)
            opened = self.opened
            opened[key] = mark
            opened.move_to_end(key)
            if len(opened) > OPENED_MAX:
                opened.popitem(last=False)
        pkt.set_mark(mark)
        pkt.accept()
        t.picks[mark] += 1

    def on_slot_packet(self, pkt, _flow_key=flow_key, _opens=opens_connection, _base=SLOT_MARKS.start,
                       _span=len(SLOT_MARKS)) -> None:
        """The callback for ``flow_hash = jhash``: no hash here, the kernel
        gave the slot. Pins first, as in ``on_packet``; a packet that came
        with neither a slot nor a mark (the kernel's rule missing) is
        hashed as the kernel would have, at the pure-Python jhash's cost."""
        if self.attention:
            self.attend()
        t = self.table
        pins = self.pins
        if pins:
            payload = pkt.get_payload()
            key = _flow_key(payload)
            if key in pins and not _opens(payload):
                pkt.set_mark(pins[key])
                pkt.accept()
                self.pinned += 1
                if self.stop:
                    raise LeaveLoop
                return
        mark = pkt.get_mark()
        slot = mark - _base
        if mark and not 0 <= slot < _span:
            pkt.accept()  # the connection's own mark, restored by the kernel: it stays
            self.kept += 1
        elif t.split:
            payload = pkt.get_payload()
            if not mark or slot >= t.pickup_size:
                slot = self._kernel_slot(payload)
            self.split_verdict(pkt, payload, _flow_key(payload), slot, t)
        elif t.size:
            if not mark or slot >= t.size:  # no slot, or one of another table size (a change under way)
                slot = self._kernel_slot(pkt.get_payload())
            mark = t.marks[slot]
            pkt.set_mark(mark)
            pkt.accept()
            t.picks[mark] += 1
        else:
            self.no_target_verdict(pkt, t)
        if self.stop:
            raise LeaveLoop

    def no_target_verdict(self, pkt, t: MarkTable) -> None:
        """No target is active: the service's ``no_target_verdict``."""
        self.no_target += 1
        if t.verdict_accept:
            pkt.accept()
        else:
            pkt.drop()

    def _kernel_slot(self, payload: bytes) -> int:
        self.unslotted += 1
        key = flow_key(payload)
        size = self.table.pickup_size  # the size of every table of the service, or 0 with no target
        slot = kernel_slot(key, self.spec.seed, size)
        if slot is None:  # no ports (a fragment conntrack did not reassemble): the kernel never hashes it
            h = self.table.keyed.copy()
            h.update(key)
            slot = int.from_bytes(h.digest(), "big") % size
        return slot

    @classmethod
    def from_config(cls, cfg, service_name: str, queue: int = 0) -> "Worker":
        """A worker on the table the data plane would write for ``cfg`` (for
        the benchmark and tests, which run a worker without the data plane,
        in this process: its directories are this process's user's)."""
        statedir.ensure_workers(cfg.globals.state_dir)
        worker_table.write(cfg.globals.state_dir, worker_table.build(cfg, cfg.service(service_name), queue))
        return cls(cfg.globals.state_dir, service_name, queue)

    def read_table(self) -> WorkerTable:
        spec = worker_table.load(self.state_dir, self.queue)
        if spec.service != self.service_name:
            raise WorkerTableError(f"{worker_table.path(self.state_dir, self.queue)}: the table of service "
                                   f"{spec.service}, not {self.service_name}")
        return spec

    def do_reload(self) -> None:
        """Build the new table aside, in a thread: a Maglev build takes up to
        seconds (2.5 s at M = 1000003) and no packet may wait for it; packets
        keep the running table until ``swap_built`` puts the new one in."""
        self.reload = False
        if self._builder is not None and self._builder.is_alive():
            self._build_again = True  # the table file changed again meanwhile
            return
        self._builder = threading.Thread(target=self._build, name=f"build-{self.queue}", daemon=True)
        self._builder.start()

    def _build(self) -> None:
        while True:
            self._build_again = False
            try:
                spec = self.read_table()
                if spec.flow_hash != self.spec.flow_hash:
                    raise WorkerTableError(f"flow_hash {spec.flow_hash}, not {self.spec.flow_hash}: a worker "
                                           "binds its queue for one flow hash (the data plane restarts it)")
                self.built = (spec, MarkTable(spec))
            except (WorkerTableError, ValueError) as e:
                log.error("reload refused, keeping the running table: %s", e)
            if not self._build_again:
                break
        self.notify_built()

    def swap_built(self) -> None:
        """Put the table the builder finished in place, between two packets."""
        spec, table = self.built
        self.built = None
        for mark, n in self.table.picks.items():
            self.picks[mark] = self.picks.get(mark, 0) + n
        self.spec, self.table = spec, table
        if self.opened and not table.differ:
            # a SYN sent just before the last target came back may not have
            # had its first ACK yet: what we opened is still followed a while
            table.split = True
            self.forget_opened_at = time.monotonic() + OPENED_KEEP
        log.info("queue %d: table rebuilt for targets %s", self.queue, ",".join(table.names) or "(none)")
        self.load_pins()  # the configured targets, and so the usable pins, may have changed

    def load_pins(self) -> None:
        """This service's pins whose mark is one of its configured targets."""
        self.reload_pins = False
        try:
            found = pins_state.load(self.state_dir).get(self.service_name, {})
        except pins_state.PinsError as e:
            log.error("queue %d: pins not loaded, keeping %d: %s", self.queue, len(self.pins), e)
            return
        self.pins = usable(found, self.spec.target_marks)
        if self.pins or found:
            log.info("queue %d: %d pins (%d for unknown targets left out)", self.queue,
                     len(self.pins), len(found) - len(self.pins))

    def stats_path(self) -> str:
        return stats_file(self.state_dir, self.queue)

    def write_stats(self) -> None:
        picks = dict(self.picks)
        for mark, n in self.table.picks.items():
            picks[mark] = picks.get(mark, 0) + n
        data = {"pid": os.getpid(), "queue": self.queue, "service": self.service_name,
                "packets": self.no_target + self.pinned + self.picked_up + self.kept + sum(picks.values()),
                "no_target": self.no_target, "pinned": self.pinned, "pins": len(self.pins),
                "picked_up": self.picked_up, "opened": len(self.opened),
                "kept": self.kept, "unslotted": self.unslotted, "flow_hash": self.spec.flow_hash,
                "targets": self.table.names,
                "picks": {f"{m:#x}": n for m, n in picks.items() if n},
                "table_digest": self.table.digest, "started": self.started}
        # no fsync: rewritten every second, between two packets' verdicts
        statedir.write_json(self.stats_path(), data, sync=False)

    def attend(self) -> None:
        """What signals and the clock ask for, between two packets: a new
        table (SIGHUP), the stats file (every STATS_INTERVAL)."""
        self.attention = False
        # a SIGHUP that came as the builder was finishing is picked up here
        # (attend runs at least every STATS_INTERVAL)
        if self.reload or (self._build_again and not self._builder.is_alive()):
            self.do_reload()
        if self.built is not None:
            self.swap_built()
            self.stats_due = True  # status shows the new targets at once
        if self.reload_pins:
            self.load_pins()
            self.stats_due = True
        t = self.table
        if t.split and not t.differ and time.monotonic() >= self.forget_opened_at:
            self.opened.clear()
            t.split = False  # the hot path of the normal state again
        if self.stats_due:
            self.stats_due = False
            try:
                self.write_stats()
                rotate_log(2, LOG_MAX_BYTES, statedir.worker_log_old(self.state_dir, self.queue))
            except OSError as e:  # runs before a packet's verdict: never let it cost the packet
                log.warning("queue %d: stats not written: %s", self.queue, e)

    def run(self, ready_fd: int | None = None) -> int:
        """Serve the queue until SIGTERM; ``ready_fd`` (from the starter) gets
        one byte once the queue is served, and is closed."""
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        # netfilterqueue's C loop blocks in recv() with no Python between
        # packets: one recv and one verdict per packet, no poll. A signal
        # makes the socket non-blocking, so that the loop's next recv returns
        # EAGAIN and hands back to us; while packets flow, on_packet attends
        # to the flags itself. Handlers never raise: they run inside that
        # loop, where an exception would reach the next packet's callback.
        fd = -1  # until bound

        def wake() -> None:
            self.attention = True
            if fd >= 0:
                os.set_blocking(fd, False)

        def on_term(signum, frame):
            self.stop = True
            wake()

        def on_hup(signum, frame):
            self.reload = True
            wake()

        def on_usr1(signum, frame):
            self.reload_pins = True
            wake()

        def on_alarm(signum, frame):
            self.stats_due = True
            wake()

        def on_built(signum, frame):
            wake()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGUSR1, on_usr1)
        signal.signal(signal.SIGUSR2, on_built)
        # the builder thread cannot touch the blocked loop; a signal to this
        # process reaches the main thread, whose handler wakes it
        self.notify_built = lambda: os.kill(os.getpid(), signal.SIGUSR2)
        signal.signal(signal.SIGALRM, on_alarm)
        nfq = NetfilterQueue()
        # the callback is the flow hash's for the worker's life: a table of
        # the other flow_hash is refused (_build); the data plane restarts it
        callback = self.on_slot_packet if self.spec.flow_hash == "jhash" else self.on_packet
        nfq.bind(self.queue, callback, max_len=self.spec.queue_maxlen, mode=COPY_PACKET,
                 range=self.spec.copy_range)
        try:
            self.write_stats()  # tells the starter that this process holds the queue
        except OSError as e:  # a full state dir: nobody would know we hold it
            log.error("queue %d: cannot write %s: %s; leaving the queue", self.queue, self.stats_path(),
                      e.strerror or e)
            nfq.unbind()
            return 1
        self.load_pins()  # from here on SIGUSR1 reaches us for every later change (workers.reload_pins)
        if ready_fd is not None:
            _say_ready(ready_fd)
        log.info("queue %d bound (service %s, targets %s)", self.queue, self.service_name,
                 ",".join(self.table.names))
        fd = nfq.get_fd()
        signal.setitimer(signal.ITIMER_REAL, STATS_INTERVAL, STATS_INTERVAL)
        try:
            while not self.stop:
                os.set_blocking(fd, True)  # before attend(): a signal from here on is seen
                self.attend()
                if self.stop:
                    break
                try:
                    nfq.run(block=True)
                except LeaveLoop:
                    pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            nfq.unbind()
            try:
                self.write_stats()
            except OSError as e:
                log.warning("queue %d: stats not written: %s", self.queue, e.strerror or e)
        log.info("queue %d unbound", self.queue)
        return 0


def _say_ready(fd: int) -> None:
    try:
        os.write(fd, b"1")
        os.close(fd)
    except OSError as e:  # the starter is gone: nobody waits for us any more
        log.warning("ready pipe not written: %s", e.strerror or e)


class LeaveLoop(Exception):
    """Raised by the packet callback, after the packet's verdict, to leave
    netfilterqueue's loop (nfq_handle_packet passes callback exceptions on)."""


def rotate_log(fd: int, max_bytes: int, old: str) -> bool:
    """When ``fd`` (the worker's stderr, which its starter opened in append
    mode on workers/worker-N.log) is a file larger than ``max_bytes``: copy
    it to ``old`` (workers/run/worker-N.log.1, replaced atomically, never
    through a symlink) and empty it. Appending goes on at the new end, so
    nothing is reopened; a worker that logs a lot keeps at most twice
    ``max_bytes``. The copy is read through ``fd`` itself (the starter opens
    it read-write: the file is root's, and a worker that is not root could
    not open it again by any name), or, when ``fd`` is write-only, through
    /proc/self/fd."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size <= max_bytes:
        return False

    def copy(dst) -> None:
        # the very file fd is open on, whatever its name is now
        try:
            pos = 0
            while chunk := os.pread(fd, 1 << 16, pos):
                dst.write(chunk)
                pos += len(chunk)
            return
        except OSError as e:
            if e.errno != errno.EBADF:  # EBADF: opened write-only
                raise
        with open(f"/proc/self/fd/{fd}", "rb") as src:
            while chunk := src.read(1 << 16):
                dst.write(chunk)

    statedir.write_file(old, copy, sync=False)
    os.ftruncate(fd, 0)
    return True


def stats_file(state_dir: str, queue: int) -> str:
    """Where a worker publishes its counters (and, right after binding, its pid)."""
    return statedir.worker_stats(state_dir, queue)


def main(state_dir: str, service_name: str, queue: int, ready_fd: int | None = None) -> int:
    # force: cli.main already configured the root logger at WARNING
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d]: %(message)s", force=True)
    try:
        w = Worker(state_dir, service_name, queue)
    except WorkerTableError as e:
        log.error("queue %d: %s", queue, e)
        return 1
    return w.run(ready_fd)
