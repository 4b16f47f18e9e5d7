"""The NFQUEUE worker: one process per queue.

Per packet: copy of the first ``copy_range`` bytes -> flow key (client->VIP
direction) -> keyed hash -> Maglev table of marks -> set the fwmark, accept.
Only packets that open a connection (or first-seen ones after a failover)
get here; conntrack carries the mark for everything after.

SIGHUP re-reads the configuration and the target health file and rebuilds
the table; SIGTERM/SIGINT stop the loop and unbind the queue.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time
from hashlib import blake2b

from . import config as config_mod
from . import health_state
from .maglev import FLOW_PERSON, MAX_KEY_BYTES, Maglev
from .packet import flow_key

log = logging.getLogger("synlb.worker")

STATS_INTERVAL = 1.0


class MarkTable:
    """Maglev table flattened to marks: one list index per packet.

    ``marks[slot]`` is the fwmark of the target owning Maglev slot ``slot``
    (precomputed: a packet costs one hash and one list index), ``keyed`` the
    flow hash state that has already absorbed the key (what ``Maglev.slot``
    copies, without its attribute lookups), ``picks`` the per-mark counters.
    """

    __slots__ = ("names", "maglev", "marks", "size", "keyed", "picks", "verdict_accept", "digest")

    def __init__(self, cfg: config_mod.Config, service_name: str):
        svc = cfg.service(service_name)
        down = health_state.down_targets(cfg.globals.state_dir, svc.name)
        # sorted: every router and worker must hash over the same ordering
        targets = sorted((t for t in cfg.targets_of(svc) if t.name not in down), key=lambda t: t.name)
        self.names = [t.name for t in targets]
        key = cfg.globals.hash_key.encode()
        self.maglev = Maglev(self.names, svc.table_size, key)
        self.marks = [targets[i].mark for i in self.maglev.table]
        self.size = len(self.marks)
        self.keyed = blake2b(key=key[:MAX_KEY_BYTES], digest_size=8, person=FLOW_PERSON)
        self.picks = {t.mark: 0 for t in targets}
        self.verdict_accept = svc.no_target_verdict == "accept"
        self.digest = cfg.digest()


class Worker:
    def __init__(self, config_path: str, service_name: str, queue: int):
        self.config_path = config_path
        self.service_name = service_name
        self.queue = queue
        self.cfg = config_mod.load(config_path)
        self.table = MarkTable(self.cfg, service_name)
        self.stop = False
        self.reload = False
        self.no_target = 0
        self.picks: dict[int, int] = {}  # counts of the tables a reload replaced
        self.started = time.time()

    @property
    def packets(self) -> int:
        return self.no_target + sum(self.picks.values()) + sum(self.table.picks.values())

    # The hot path: no allocation beyond what netfilterqueue (Packet, payload)
    # and hashing (hash state, digest, int) force.
    def on_packet(self, pkt, _from_bytes=int.from_bytes, _flow_key=flow_key) -> None:
        t = self.table
        if t.size:
            h = t.keyed.copy()
            h.update(_flow_key(pkt.get_payload()))
            mark = t.marks[_from_bytes(h.digest(), "big") % t.size]
            pkt.set_mark(mark)
            pkt.accept()
            t.picks[mark] += 1
        else:
            self.no_target += 1
            if t.verdict_accept:
                pkt.accept()
            else:
                pkt.drop()

    def do_reload(self) -> None:
        self.reload = False
        try:
            cfg = config_mod.load(self.config_path)
            table = MarkTable(cfg, self.service_name)
        except (config_mod.ConfigError, KeyError) as e:
            log.error("reload refused, keeping the running table: %s", e)
            return
        for mark, n in self.table.picks.items():
            self.picks[mark] = self.picks.get(mark, 0) + n
        self.cfg, self.table = cfg, table
        log.info("queue %d: table rebuilt for targets %s", self.queue, ",".join(table.names) or "(none)")

    def stats_path(self) -> str:
        return stats_file(self.cfg.globals.state_dir, self.queue)

    def write_stats(self) -> None:
        picks = dict(self.picks)
        for mark, n in self.table.picks.items():
            picks[mark] = picks.get(mark, 0) + n
        data = {"pid": os.getpid(), "queue": self.queue, "service": self.service_name,
                "packets": self.no_target + sum(picks.values()),
                "no_target": self.no_target, "targets": self.table.names,
                "picks": {f"{m:#x}": n for m, n in picks.items() if n},
                "config_digest": self.table.digest, "started": self.started}
        tmp = self.stats_path() + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, self.stats_path())

    def run(self) -> int:
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        def on_term(signum, frame):
            self.stop = True

        def on_hup(signum, frame):
            self.reload = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        g = self.cfg.globals
        nfq = NetfilterQueue()
        nfq.bind(self.queue, self.on_packet, max_len=g.queue_maxlen, mode=COPY_PACKET, range=g.copy_range)
        self.write_stats()  # tells the starter that this process holds the queue
        log.info("queue %d bound (service %s, targets %s)", self.queue, self.service_name,
                 ",".join(self.table.names))
        poller = select.poll()
        nfq_fd = nfq.get_fd()
        poller.register(nfq_fd, select.POLLIN)
        # a signal wakes the poll at once (PEP 475 would otherwise resume it
        # for up to STATS_INTERVAL, and a SIGHUP'd table would stay stale)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        poller.register(wake_r, select.POLLIN)
        last_stats = 0.0
        try:
            while not self.stop:
                # poll in Python, not nfq.run(): signals must reach their handlers
                ready = {fd for fd, _ in poller.poll(STATS_INTERVAL * 1000)}
                if wake_r in ready:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                if self.reload:  # before the packets: they must get the new table
                    self.do_reload()
                if nfq_fd in ready:
                    nfq.run(block=False)
                now = time.monotonic()
                if now - last_stats >= STATS_INTERVAL:
                    self.write_stats()
                    last_stats = now
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            nfq.unbind()
            self.write_stats()
        log.info("queue %d unbound", self.queue)
        return 0


def stats_file(state_dir: str, queue: int) -> str:
    """Where a worker publishes its counters (and, right after binding, its pid)."""
    return os.path.join(state_dir, f"worker-{queue}.stats.json")


def main(config_path: str, service_name: str, queue: int) -> int:
    # force: cli.main already configured the root logger at WARNING
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d]: %(message)s", force=True)
    return Worker(config_path, service_name, queue).run()
