"""metrics: a Prometheus endpoint (``GET /metrics``), evaluated at scrape time.

Section ``[metrics]``: ``listen = ADDRESS:PORT`` (default ``127.0.0.1:9712``,
loopback only; ``[v6addr]:port`` for IPv6, ``0.0.0.0:9712`` / ``[::]:9712``
for every address).  The server binds in the host's network namespace (the
router's).  Every scrape reads the kernel's own counters (``status.collect``)
and the host's state; nothing is cached.

Metrics:

- ``synlb_vrrp_state{state}``: 1 for the node's current state, 0 for the others
- ``synlb_active``: 1 while this router should carry traffic (data plane wanted)
- ``synlb_dataplane_installed``: 1 while synlb's chains are installed
- ``synlb_transitions_total``: reconciles done by the host
- ``synlb_target_healthy{service,target}``, ``synlb_target_connections{service,target}``
  (conntrack entries carrying the target's mark)
- ``synlb_packets_queued_total{service,family}``: packets sent to a worker
  (connection openers); ``synlb_packets_kernel_total{service,family}``:
  packets of established connections kept in the kernel
- nftables engine: ``synlb_packets_hashed_kernel_total{service,family}``
  (packets without a conntrack mark the kernel hashed to a target),
  ``synlb_packets_pinned_kernel_total{service,family}`` (those that followed
  a pin), ``synlb_packets_picked_up_kernel_total{service,family}`` (TCP
  pickups without a pin: the configured table's target),
  ``synlb_target_kernel_picks_total{service,target}``
- ``synlb_queue_dropped_total{queue}``, ``synlb_user_dropped_total{queue}``
  (kernel NFQUEUE drops: queue full / netlink buffer full),
  ``synlb_queue_listening{queue}``, ``synlb_queue_waiting{queue}``
- ``synlb_worker_restarts_total{queue}``, ``synlb_worker_packets_total{queue}``,
  ``synlb_worker_cpu_seconds_total{queue}``, ``synlb_worker_rss_bytes{queue}``
- ``synlb_host_cpu_seconds_total``, ``synlb_host_rss_bytes``: the host process
- ``synlb_scrape_ok``: 0 when reading the kernel's counters failed
- ``synlb_reconcile_failing``: 1 while the last reconcile failed (the host retries with backoff)
- with the sync plugin: ``synlb_pins_own`` (this router's misplaced
  connections, handed to its peers), ``synlb_pins_held`` (the peers' pins
  its workers follow), ``synlb_sync_peer_ok{peer}`` (1 when the last
  exchange with the peer worked), ``synlb_sync_last_exchange_seconds{peer}``
  (when it last worked, Unix time)
- with the bgp plugin: ``synlb_bgp_announced{prefix}`` (1 while FRR
  announces the VIP prefix, 0 while it is withdrawn), ``synlb_bgp_frr_ok``
  (0 when the last vtysh call failed), ``synlb_bgp_sessions_established``
  (bgpd's established neighbors, all address families),
  ``synlb_bgp_last_change_seconds`` (when an announcement last changed, Unix time)

Kernel counters restart from 0 when synlb re-installs its chains, and a
worker's CPU time when it is restarted: Prometheus' ``rate()`` handles that.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from ..schema import Option, OptionError, Schema
from . import Plugin

log = logging.getLogger("synlb.metrics")

DEFAULT_LISTEN = "127.0.0.1:9712"
STATES = ("INIT", "BACKUP", "MASTER", "FAULT", "STOP", "DELETED", "STANDALONE")


def parse_listen(text: str) -> tuple[str, int]:
    t = text.strip()
    if t.startswith("["):
        addr, sep, port = t[1:].partition("]:")
        if not sep:
            raise OptionError(f"{text!r} is not [IPv6]:PORT")
    else:
        addr, sep, port = t.rpartition(":")
        if not sep or ":" in addr:
            raise OptionError(f"{text!r} is not ADDRESS:PORT (IPv6: [ADDRESS]:PORT)")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise OptionError(f"{addr!r} is not an IP address") from None
    if t.startswith("[") and ip.version != 6:
        raise OptionError(f"{addr!r} in brackets is not an IPv6 address")
    try:
        p = int(port)
    except ValueError:
        raise OptionError(f"{port!r} is not a port number") from None
    if not 1 <= p <= 65535:
        raise OptionError(f"port {p} is out of range 1..65535")
    return str(ip), p


def _listen(text: str) -> str:
    addr, port = parse_listen(text)
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


SCHEMA = Schema("metrics", [
    Option("listen", _listen, DEFAULT_LISTEN,
           "ADDRESS:PORT or [IPv6]:PORT of the Prometheus endpoint; default loopback only"),
])
SECTIONS = {"metrics": SCHEMA}
CACHE_SECONDS = 1.0


class Collector:
    """prometheus-client custom collector over status.collect and the host."""

    def __init__(self, plugin: MetricsPlugin):
        self.plugin = plugin
        self._lock = threading.Lock()  # one scrape at a time: each runs conntrack and iptables
        self._cached: list = []
        self._at = float("-inf")

    def collect(self):
        # scrapes within CACHE_SECONDS of each other share one reading of the
        # kernel: a scraper in a loop costs one conntrack and iptables dump a second
        with self._lock:
            now = time.monotonic()
            if now - self._at >= CACHE_SECONDS:
                self._cached = list(self._collect())
                self._at = time.monotonic()
            return list(self._cached)

    def _collect(self):
        import psutil
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .. import status
        host = self.plugin.host
        cfg, node = host.cfg, host.node
        g = GaugeMetricFamily("synlb_vrrp_state", "1 for the node's current VRRP state", labels=["state"])
        for s in STATES + (() if node.vrrp in STATES else (node.vrrp,)):
            g.add_metric([s], 1.0 if s == node.vrrp else 0.0)
        yield g
        yield GaugeMetricFamily("synlb_active", "1 while this router should carry traffic",
                                value=1.0 if node.active else 0.0)
        yield CounterMetricFamily("synlb_transitions", "reconciles done by the host", value=host.transitions)
        try:
            me = psutil.Process()
            cpu = me.cpu_times()
            yield CounterMetricFamily("synlb_host_cpu_seconds", "CPU time of the synlb host process",
                                      value=cpu.user + cpu.system)
            yield GaugeMetricFamily("synlb_host_rss_bytes", "resident memory of the synlb host process",
                                    value=me.memory_info().rss)
        except psutil.Error:
            pass

        try:
            st = status.collect(cfg)
            ok = 1.0
        except Exception as e:  # noqa: BLE001 - a scrape must answer even when the kernel does not
            log.error("metrics: reading the counters failed: %s", e)
            st, ok = None, 0.0
        yield GaugeMetricFamily("synlb_scrape_ok", "1 when the kernel's counters could be read", value=ok)
        yield GaugeMetricFamily("synlb_reconcile_failing", "1 while the last reconcile failed (it is retried)",
                                value=1.0 if host.failing else 0.0)
        if st is None:
            return
        yield GaugeMetricFamily("synlb_dataplane_installed", "1 while synlb's chains are installed",
                                value=1.0 if st["active"] else 0.0)

        plugins = {p.name: p for p in host.plugins}
        health = plugins["health"].status()["targets"] if "health" in plugins else {}
        restarts = plugins["lb"].status().get("worker_restarts", {}) if "lb" in plugins else {}

        healthy = GaugeMetricFamily("synlb_target_healthy", "1 while the target is in the Maglev active set",
                                    labels=["service", "target"])
        conns = GaugeMetricFamily("synlb_target_connections", "conntrack entries carrying the target's mark",
                                  labels=["service", "target"])
        for s in st["services"]:
            for t in s["targets"]:
                h = health.get(t["name"])
                up = (h["state"] == "up") if h else t["healthy"]
                healthy.add_metric([s["name"], t["name"]], 1.0 if up else 0.0)
                conns.add_metric([s["name"], t["name"]], t["connections"])
        yield healthy
        yield conns

        queued = CounterMetricFamily("synlb_packets_queued", "packets sent to a worker (connection openers)",
                                     labels=["service", "family"])
        kernel = CounterMetricFamily("synlb_packets_kernel", "packets of established connections kept in the kernel",
                                     labels=["service", "family"])
        hashed = CounterMetricFamily("synlb_packets_hashed_kernel",
                                     "nftables engine: packets without a conntrack mark hashed in the kernel",
                                     labels=["service", "family"])
        pinned = CounterMetricFamily("synlb_packets_pinned_kernel",
                                     "nftables engine: packets without a conntrack mark that followed a pin",
                                     labels=["service", "family"])
        picked_up = CounterMetricFamily("synlb_packets_picked_up_kernel",
                                        "nftables engine: TCP packets of connections picked up mid-stream without "
                                        "a pin, sent by the table of every configured target",
                                        labels=["service", "family"])
        for c in st["chains"]:
            fam = str(c["family"])
            queued.add_metric([c["service"], fam], c["queued_pkts"])
            kernel.add_metric([c["service"], fam], c["kept_in_kernel_pkts"])
            if "hashed_pkts" in c:
                hashed.add_metric([c["service"], fam], c["hashed_pkts"])
                pinned.add_metric([c["service"], fam], c["pinned_pkts"])
                picked_up.add_metric([c["service"], fam], c.get("picked_up_pkts", 0))
        yield queued
        yield kernel
        yield hashed
        yield pinned
        yield picked_up
        picks = CounterMetricFamily("synlb_target_kernel_picks",
                                    "nftables engine: packets the kernel hashed to the target",
                                    labels=["service", "target"])
        for s in st["services"]:
            for t in s["targets"]:
                if t.get("kernel_picks") is not None:
                    picks.add_metric([s["name"], t["name"]], t["kernel_picks"])
        yield picks

        qdrop = CounterMetricFamily("synlb_queue_dropped", "packets dropped by the kernel: queue full", labels=["queue"])
        udrop = CounterMetricFamily("synlb_user_dropped", "packets dropped by the kernel: netlink buffer full",
                                    labels=["queue"])
        listening = GaugeMetricFamily("synlb_queue_listening", "1 while a worker is bound to the queue",
                                      labels=["queue"])
        waiting = GaugeMetricFamily("synlb_queue_waiting", "packets waiting in the queue", labels=["queue"])
        wrestarts = CounterMetricFamily("synlb_worker_restarts", "worker restarts by the host", labels=["queue"])
        wpackets = CounterMetricFamily("synlb_worker_packets", "packets the current worker handled",
                                       labels=["queue"])
        wcpu = CounterMetricFamily("synlb_worker_cpu_seconds", "CPU time of the current worker", labels=["queue"])
        wrss = GaugeMetricFamily("synlb_worker_rss_bytes", "resident memory of the worker", labels=["queue"])
        for s in st["services"]:
            for q in s["queues"]:
                label = [str(q["queue"])]
                qdrop.add_metric(label, q["queue_dropped"])
                udrop.add_metric(label, q["user_dropped"])
                listening.add_metric(label, 1.0 if q["listening"] else 0.0)
                waiting.add_metric(label, q["waiting"])
                wrestarts.add_metric(label, restarts.get(q["queue"], restarts.get(str(q["queue"]), 0)))
                w = q.get("worker")
                if not w:
                    continue
                wpackets.add_metric(label, w.get("packets", 0))
                try:  # exact figures; status rounds them for humans
                    p = psutil.Process(w["pid"])
                    wcpu.add_metric(label, status.cpu_seconds(p))
                    wrss.add_metric(label, p.memory_info().rss)
                except psutil.Error:
                    continue
        yield from (qdrop, udrop, listening, waiting, wrestarts, wpackets, wcpu, wrss)
        if "sync" in plugins:
            yield from _sync_metrics(plugins["sync"].status())
        if "bgp" in plugins:
            yield from _bgp_metrics(plugins["bgp"].status())


def _bgp_metrics(st: dict):
    from prometheus_client.core import GaugeMetricFamily
    ann = GaugeMetricFamily("synlb_bgp_announced", "1 while FRR announces the VIP prefix, 0 while withdrawn",
                            labels=["prefix"])
    for prefix in st["managed"]:
        ann.add_metric([prefix], 1.0 if prefix in st["announced"] else 0.0)
    yield ann
    yield GaugeMetricFamily("synlb_bgp_frr_ok", "0 when the last vtysh call failed",
                            value=0.0 if st["error"] else 1.0)
    yield GaugeMetricFamily("synlb_bgp_sessions_established", "bgpd's established neighbors (all families)",
                            value=sum(1 for af in st["peers"].values() for s in af.values() if s == "Established"))
    if st["changed_at"]:
        yield GaugeMetricFamily("synlb_bgp_last_change_seconds", "when an announcement last changed",
                                value=st["changed_at"])


def _sync_metrics(st: dict):
    from prometheus_client.core import GaugeMetricFamily
    yield GaugeMetricFamily("synlb_pins_own", "this router's misplaced connections, handed to its peers",
                            value=st["own_pins"])
    yield GaugeMetricFamily("synlb_pins_held", "pins from the peers that the workers follow",
                            value=st["held_pins"])
    ok = GaugeMetricFamily("synlb_sync_peer_ok", "1 when the last exchange with the peer worked", labels=["peer"])
    last = GaugeMetricFamily("synlb_sync_last_exchange_seconds", "when the last exchange with the peer worked",
                             labels=["peer"])
    for peer, p in st["peers"].items():
        ok.add_metric([peer], 0.0 if p["error"] or not p["last_ok"] else 1.0)
        if p["last_ok"]:
            last.add_metric([peer], p["last_ok"])
    yield ok
    yield last


class MetricsPlugin(Plugin):
    name = "metrics"

    def __init__(self, host):
        super().__init__(host)
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(self))
        self.listen: str | None = None
        self.error: str | None = None
        self._server = None
        self._thread = None

    def _wanted(self, cfg) -> str:
        from .. import config as config_mod
        return config_mod.load_section(cfg, "metrics", SCHEMA)["listen"]

    def start(self) -> None:
        self._serve(self._wanted(self.host.cfg))

    def reconcile(self, cfg, node) -> list[str]:
        want = self._wanted(cfg)
        if want == self.listen and self._server is not None:
            return []
        self._close()
        self._serve(want)
        if self._server is None:
            raise RuntimeError(self.error)
        return [f"serving /metrics on {want}"]

    def stop(self) -> None:
        self._close()

    def status(self) -> dict:
        if self._server is None:
            return {"summary": f"NOT serving: {self.error}", "listen": self.listen, "error": self.error}
        return {"summary": f"serving http://{self.listen}/metrics", "listen": self.listen}

    def _serve(self, listen: str) -> None:
        # prometheus-client's WSGI app on a threading wsgiref server: what its
        # start_http_server does, kept here because Debian 12's 0.16 does not
        # return the server, which stop() and a changed `listen` need
        import socket
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        from ..control import Bounded

        addr, port = parse_listen(listen)
        self.listen = listen

        class Server(Bounded, WSGIServer):  # at most a few scrapes at once, each bounded in time
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        try:
            self._server = make_server(addr, port, make_wsgi_app(self.registry), Server,
                                       handler_class=QuietHandler)
            self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
            self._thread.start()
        except OSError as e:
            self._server = None
            self.error = f"cannot listen on {listen}: {e.strerror or e}"
            log.error("metrics: %s", self.error)
            return
        self.error = None
        log.info("metrics: serving http://%s/metrics", listen)

    def _close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(2.0)
            self._server = self._thread = None


def create(host) -> MetricsPlugin:
    return MetricsPlugin(host)
