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

from . import config as config_mod
from . import health_state
from .maglev import Maglev
from .packet import flow_key

log = logging.getLogger("synlb.worker")

STATS_INTERVAL = 1.0


class MarkTable:
    """Maglev table flattened to marks: one list index per packet."""

    def __init__(self, cfg: config_mod.Config, service_name: str):
        svc = cfg.service(service_name)
        down = health_state.down_targets(cfg.globals.state_dir, svc.name)
        # sorted: every router and worker must hash over the same ordering
        targets = sorted((t for t in cfg.targets_of(svc) if t.name not in down), key=lambda t: t.name)
        self.names = [t.name for t in targets]
        self.maglev = Maglev(self.names, svc.table_size, cfg.globals.hash_key.encode())
        self.marks = [targets[i].mark for i in self.maglev.table]
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
        self.packets = 0
        self.no_target = 0
        self.picks: dict[int, int] = {}
        self.started = time.time()

    # The hot path: no allocation beyond what netfilterqueue and hashing force.
    def on_packet(self, pkt) -> None:
        table = self.table
        marks = table.marks
        self.packets += 1
        if not marks:
            self.no_target += 1
            if table.verdict_accept:
                pkt.accept()
            else:
                pkt.drop()
            return
        mark = marks[table.maglev.slot(flow_key(pkt.get_payload()))]
        pkt.set_mark(mark)
        pkt.accept()
        self.picks[mark] = self.picks.get(mark, 0) + 1

    def do_reload(self) -> None:
        self.reload = False
        try:
            cfg = config_mod.load(self.config_path)
            table = MarkTable(cfg, self.service_name)
        except (config_mod.ConfigError, KeyError) as e:
            log.error("reload refused, keeping the running table: %s", e)
            return
        self.cfg, self.table = cfg, table
        log.info("queue %d: table rebuilt for targets %s", self.queue, ",".join(table.names) or "(none)")

    def stats_path(self) -> str:
        return os.path.join(self.cfg.globals.state_dir, f"worker-{self.queue}.stats.json")

    def write_stats(self) -> None:
        data = {"pid": os.getpid(), "queue": self.queue, "service": self.service_name, "packets": self.packets,
                "no_target": self.no_target, "targets": self.table.names,
                "picks": {f"{m:#x}": n for m, n in self.picks.items()},
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
        poller.register(nfq.get_fd(), select.POLLIN)
        last_stats = 0.0
        try:
            while not self.stop:
                # poll in Python, not nfq.run(): signals must reach their handlers
                if poller.poll(STATS_INTERVAL * 1000):
                    nfq.run(block=False)
                if self.reload:
                    self.do_reload()
                now = time.monotonic()
                if now - last_stats >= STATS_INTERVAL:
                    self.write_stats()
                    last_stats = now
        finally:
            nfq.unbind()
            self.write_stats()
        log.info("queue %d unbound", self.queue)
        return 0


def main(config_path: str, service_name: str, queue: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d]: %(message)s")
    return Worker(config_path, service_name, queue).run()
