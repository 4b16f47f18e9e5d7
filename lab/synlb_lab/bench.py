"""``synlb-lab bench``: synlb against plain forwarding and kernel hashing.

Everything runs in lab namespaces built for the occasion (nothing in the
root namespace) and is torn down at the end, also on error or ^C.

The machine is shared and noisy, so every figure is a *ratio against a
baseline measured right next to it*: arms alternate in rounds (A B, B A,
...: neither arm always goes first) and the report gives the median of the
per-round ratios. The CPU used by everything outside the lab is measured
during every run (``Foreign``); rounds it disturbed are left out of the
medians when enough undisturbed ones exist, and the bench waits for quiet
moments and adds rounds (bounded) to get them.

Sections (see bench/README.md for how to read the report):

``throughput``  iperf3 (several streams) client -> router -> t1. Baseline:
                plain routing, synlb down, to t1's own address. Arms: synlb
                SYN-only (to the VIP) and synlb all-packets (``shortcut =
                no``: every packet queued, as nfqlb without the SYN
                optimisation).
``conn_rate``   wrk with ``Connection: close`` against nginx on the three
                targets through the VIP. Baseline: kernel-only hashing, the
                NFQUEUE rule replaced by iptables HMARK into the same marks
                (same chains, CONNMARK save/restore, ip rules and tables).
                Arms: synlb (one queue) and synlb multi-queue (``queue =
                0-1``: two workers, --queue-balance --queue-cpu-fanout).
                Worker CPU per new connection (psutil, user + system) and
                worker RSS come from the same runs. In the same rounds: the
                reference C worker (cref.py, bench/cref) on its own queue, and
                the nftables engine (``engine = nftables``, no worker).
``nft_update``  (inside single_router) the nftables engine's health flip
                with 100 targets at M = 65537 while wrk runs.
``failover``    two routers on the shipped keepalived config, synlb hot
                standby on both; echo (client first), push (server first),
                download and upload sessions over IPv4 and IPv6 through the VIP;
                the master's links go down, then come back (fail back);
                five times. The gap is how long data was held up in any
                session (arrival minus send time, one clock); the longest
                time between two deliveries, which also counts each
                pattern's own pause, is reported beside it.
``failover_nft`` the same with ``engine = nftables`` on both routers.
``maglev``      table build time for 10, 100, 1000 targets at M = 65537.
``hotpath``     the worker's per-packet Python path with a stub packet
                (no kernel): the current ``Worker.on_packet`` and the reference
                callback (:func:`_seed_on_packet`, the hot path as first written).
``pins``        what keeping sessions across target changes costs
                (bench_pins.py): the hot path with and without pins against
                the callback before pins, the sync plugin's conntrack read
                and misplaced computation per entry, memory and wire bytes
                per pin, an exchange round with an unreachable peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from synlb import config as config_mod
from synlb import health_state, worker_table

from . import addresses as A
from . import cref
from .pyfloor import PyFloor
from .netns import LabError
from .scenario import render_service_config, synlb_exe
from .topology import Lab

SCHEMA = 1
IPERF_PORT = 5201
IPERF_QUEUE = 8
CREF_QUEUE = 5  # the C reference worker's; no service of the bench uses it
FLOOR_QUEUE = 6  # the Python floor worker's (pyfloor.py), likewise
NGINX_PORT = 8081
SESSION_PORT = 80
MARK_BASE = 0x101  # t1, t2, t3 = 0x101, 0x102, 0x103: HMARK's offset + hash % 3
HMARK_RND = 0x5EED
TABLE_SIZE = 65537
ADVERT_INT = 0.03  # conf/keepalived.conf.example's, which the failover section runs
# client first every 0.1 s, server first every 0.3 s, a continuous download and upload
FAILOVER_PATTERNS = ("echo", "push", "down", "up")

# The figures synlb aims for (README, benchmark table): the benchmark reports
# them met or missed; tests never assert them.
TARGETS = {
    "throughput_ratio": (">=", 0.95),
    "conn_rate_ratio": (">=", 0.9),
    "cpu_us_per_conn": ("<=", 10.0),
    "worker_rss_mb": ("<=", 40.0),
    "maglev_build_ms_100": ("<", 200.0),
    "failover_gap_s": ("<=", 3 * ADVERT_INT + 0.3),
    "sessions_kept_ratio": (">=", 1.0),
    # pins cost nothing while there are none: the same per-packet cost as before them, within noise
    "pins_normal_path_ratio": ("<=", 1.05),
    "pickup_normal_path_ratio": ("<=", 1.05),
    # the nftables engine (Maglev in a kernel map): kernel speed, no user space on the packet path
    "nft_conn_rate_ratio": (">=", 0.97),
    "nft_throughput_ratio": (">=", 0.97),
    "nft_update_ms_100": ("<", 100.0),
    "nft_connections_failed_in_update": ("<=", 0),
    "nft_user_space_packets": ("<=", 0),
    "nft_sessions_kept_ratio": (">=", 1.0),
    # the Python worker against the reference C worker on the same links, same rounds
    "nfqueue_cpu_vs_c": ("<=", 1.1),
    "nfqueue_jhash_cpu_vs_c": ("<=", 1.1),
    "nfqueue_conn_rate_vs_c": (">=", 0.95),
}


class BenchError(RuntimeError):
    pass


@dataclass
class Plan:
    """Durations and repetitions. ``quick`` is for the smoke test."""
    quick: bool = False
    tput_seconds: int = 10
    tput_omit: int = 1
    tput_streams: int = 4
    tput_rounds: int = 11
    tput_rounds_max: int = 12
    tput_rounds_all_arms: int = 3
    tput_conntrack_arm: bool = True
    conn_seconds: int = 3
    conn_rounds: int = 8
    conn_rounds_max: int = 14
    conn_rounds_mq: int = 4
    conn_rounds_mq_max: int = 6
    conn_rounds_nic: int = 4
    conn_rounds_nic_max: int = 6
    quiet_wait_budget: float = 60.0
    wrk_threads: int = 2
    wrk_connections: int = 64
    failovers: int = 5
    sessions_per_pattern: int = 10
    failover_hold: float = 3.0
    maglev_repeats: int = 5
    hotpath_packets: int = 200_000
    perf_profile: bool = True

    @classmethod
    def quick_plan(cls) -> "Plan":
        return cls(quick=True, tput_seconds=2, tput_omit=0, tput_rounds=1, tput_rounds_max=1,
                   tput_rounds_all_arms=1, tput_conntrack_arm=False,
                   conn_seconds=2, conn_rounds=1, conn_rounds_max=1, conn_rounds_mq=1,
                   conn_rounds_mq_max=1, conn_rounds_nic=1, conn_rounds_nic_max=1, quiet_wait_budget=0.0, failovers=2,
                   sessions_per_pattern=4, failover_hold=2.5, maglev_repeats=1,
                   hotpath_packets=20_000, perf_profile=False)


def _log(msg: str) -> None:
    try:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    except OSError:
        # the reader went away (`make bench 2>&1 | head`): the run and, above
        # all, its labs' teardown go on with nothing more written there
        sys.stderr = open(os.devnull, "w")


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rounded(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------- synlb in a router

def iperf_section(engine: str, extra: str = "") -> str:
    """Service ``ipf``: the lab's VIPs on the iperf3 port with t1 alone, since
    an iperf3 test's control and data connections must reach one server; its
    own queue (8)."""
    return f"""
[service:ipf]
vips = {A.VIP[4]}/32, {A.VIP[6]}/128
ingress = {A.ROUTER_FRONT_IF}
egress = {A.ROUTER_BACK_IF}
protocols = tcp
ports = {IPERF_PORT}
queue = {IPERF_QUEUE}
targets = t1
engine = {engine}
{extra}
"""


def render_config(state_dir: str, *, queue: str = "0", shortcut: bool = True, engine: str = "nfqueue",
                  iperf_service: bool = True, ports: str = f"80, 8080, {NGINX_PORT}",
                  flow_hash: str | None = None, plugins: str | None = None) -> str:
    """The bench's synlb configuration for one router.

    ``web``: the lab's VIPs on ``ports`` over t1..t3, with explicit marks
    0x101..0x103 so that an HMARK rule (offset 0x101, mod 3) can stand in
    for the worker. ``ipf``: the same VIPs on the iperf3 port with t1 only,
    because an iperf3 test (control + data connections) must reach one
    server; its queue is separate (8). ``engine`` is both services';
    ``flow_hash`` web's (None: the engine's default)."""
    sc = "yes" if shortcut else "no"
    ipf = iperf_section(engine, f"shortcut = {sc}") if iperf_service else ""
    targets = [(f"t{k}", A.target(k, 4), A.target(k, 6)) for k in (1, 2, 3)]
    marks = {f"t{k}": MARK_BASE + k - 1 for k in (1, 2, 3)}
    return "# written by synlb-lab bench\n" + render_service_config(
        state_dir, targets, queue=queue, ports=ports, marks=marks, engine=engine,
        extra_synlb=f"plugins = {plugins}" if plugins else "",
        extra_service=f"table_size = {TABLE_SIZE}\nshortcut = {sc}" + (f"\nflow_hash = {flow_hash}" if flow_hash else ""),
        extra=ipf)


class Synlb:
    """synlb on one lab router, driven by its command line (as an operator would)."""

    def __init__(self, lab: Lab, router: str):
        self.lab = lab
        self.router = router
        d = lab.role_dir(router)
        self.conf = os.path.join(d, "bench-synlb.ini")
        self.state_dir = os.path.join(d, "bench-state")
        self.active = False

    def write(self, **kw) -> None:
        with open(self.conf, "w") as fh:
            fh.write(render_config(self.state_dir, **kw))

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return self.lab.run(self.router, [synlb_exe(), "-c", self.conf, *args],
                            check=check, timeout=timeout).stdout

    def up(self, **kw) -> None:
        if kw:
            self.write(**kw)
        self.cmd("up")
        self.active = True

    def down(self, check: bool = True) -> None:
        self.stop_host()
        if os.path.exists(self.conf):
            self.cmd("down", check=check)
        self.active = False

    host = None  # the `synlb run` process of the host arm

    def start_host(self, timeout: float = 30.0) -> None:
        """``synlb run`` with the lb plugin (supervisor, link watcher, drift
        check once a second) instead of ``synlb up``: what a router runs."""
        self.down(check=False)
        self.write(plugins="lb")
        self.host = self.lab.popen(self.router, [synlb_exe(), "-c", self.conf, "run"], name="bench-synlb-run")
        deadline = time.monotonic() + timeout
        while not self._host_ready():
            if self.host.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.router}: synlb run did not reconcile; see {self.lab.log_path(self.host)}")
            time.sleep(0.2)
        self.active = True

    def _host_ready(self) -> bool:
        """The host's first reconcile is done: the data plane installed, a worker on every queue."""
        try:
            host = json.loads(self.cmd("status", "--json", check=False)).get("host") or {}
        except ValueError:
            return False
        return bool(host.get("ready", {}).get("ready"))

    def stop_host(self) -> None:
        if self.host is not None:
            self.lab.stop_process(self.host)  # SIGTERM: the host tears the data plane down
            self.host = None
            self.write()

    def workers(self) -> dict[int, psutil.Process]:
        """queue -> worker process, from the pid files (checked with psutil)."""
        out = {}
        for path in glob.glob(os.path.join(self.state_dir, "worker-*.pid")):
            try:
                with open(path) as fh:
                    d = json.load(fh)
                p = psutil.Process(int(d["pid"]))
                if "worker" in p.cmdline():
                    out[int(d["queue"])] = p
            except (OSError, ValueError, KeyError, psutil.Error):
                continue
        return out

    def queue_counters(self) -> dict[int, dict]:
        """/proc/net/netfilter/nfnetlink_queue of the router's namespace."""
        text = self.lab.run(self.router, ["cat", "/proc/net/netfilter/nfnetlink_queue"],
                            check=False).stdout
        out = {}
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 8:
                out[int(f[0])] = {"waiting": int(f[2]), "copy_mode": int(f[3]), "copy_range": int(f[4]),
                                  "queue_dropped": int(f[5]),
                                  "user_dropped": int(f[6]), "id_sequence": int(f[7])}
        return out

    def chain_packets(self, chain: str, target: str) -> int:
        """Packets counted by the rules of ``chain`` (IPv4 mangle) jumping to ``target``."""
        text = self.lab.run(self.router, ["iptables-save", "-c", "-t", "mangle"]).stdout
        n = 0
        for line in text.splitlines():
            m = re.match(r"\[(\d+):\d+\] -A (\S+) .*-j (\S+)", line)
            if m and m.group(2) == chain and m.group(3) == target:
                n += int(m.group(1))
        return n

    def last_rule(self, chain: str) -> list[str]:
        """The arguments of the chain's last rule (IPv4 mangle), as iptables-save spells them."""
        text = self.lab.run(self.router, ["iptables-save", "-t", "mangle"]).stdout
        rules = [ln for ln in text.splitlines() if ln.startswith(f"-A {chain} ")]
        if not rules:
            raise BenchError(f"{self.router}: chain {chain} is empty")
        return rules[-1].split()[2:]

    def replace_last_rule(self, chain: str, args: list[str]) -> None:
        text = self.lab.run(self.router, ["iptables-save", "-t", "mangle"]).stdout
        n = sum(1 for ln in text.splitlines() if ln.startswith(f"-A {chain} "))
        self.lab.run(self.router, ["iptables", "-t", "mangle", "-R", chain, str(n), *args])

    def set_hmark(self, chain: str = "synlb-VIP-web") -> None:
        """Kernel-only hashing: the chain's NFQUEUE rule (its last) becomes HMARK
        into marks MARK_BASE .. MARK_BASE+2. ``up`` puts the NFQUEUE rule back."""
        text = self.lab.run(self.router, ["iptables-save", "-t", "mangle"]).stdout
        rules = [ln for ln in text.splitlines() if ln.startswith(f"-A {chain} ")]
        if rules and "-j HMARK" in rules[-1]:
            return
        if not rules or "NFQUEUE" not in rules[-1]:
            raise BenchError(f"{self.router}: no NFQUEUE rule at the end of {chain}: {rules}")
        self.lab.run(self.router, [
            "iptables", "-t", "mangle", "-R", chain, str(len(rules)), "-j", "HMARK",
            "--hmark-tuple", "src,dst,sport,dport", "--hmark-mod", "3",
            "--hmark-offset", f"{MARK_BASE:#x}", "--hmark-rnd", f"{HMARK_RND:#x}"])


# ---------------------------------------------------------------- load generators

def cpu_snapshot() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def cpu_busy(a: list[int], b: list[int]) -> dict[str, float]:
    d = [y - x for x, y in zip(a, b)]
    tot = sum(d) or 1
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: round(100.0 * d[i] / tot, 1) for i, n in enumerate(names) if i < len(d)}


class Foreign:
    """Who used the CPUs during a run: this lab, or the rest of the machine.

    Rest of the machine: user processes outside the lab's namespaces (and
    not this process), with the time of their reaped children; kernel
    threads are left out. A run during which it took more than QUIET of the
    CPUs counts as disturbed.

    This lab: processes in the lab's namespaces (nginx, the workers, iperf3
    server), the children this process reaped (wrk, the iperf3 client) and
    the ksoftirqd threads (softirq work deferred out of the lab's own
    processes). Dividing a run's result by the CPUs the lab used gives a
    figure that other load on the machine hardly moves.
    """

    QUIET = 0.15

    def __init__(self, lab: Lab):
        self.lab_ns = set()
        for role in lab.roles:
            with contextlib.suppress(OSError):
                self.lab_ns.add(os.stat(os.path.join("/run/netns", lab.ns(role))).st_ino)
        self.me = os.getpid()
        self.ncpu = os.cpu_count() or 1

    def _in_lab(self, pid: int) -> bool | None:
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            return None
        return int(link[link.index("[") + 1:-1]) in self.lab_ns

    def snapshot(self) -> dict:
        foreign, mine = {}, {}
        softirqd = 0.0
        for p in psutil.process_iter(["pid", "ppid", "name", "create_time", "cpu_times"]):
            i = p.info
            c = i["cpu_times"]
            if c is None or i["pid"] == self.me:
                continue
            if i["pid"] == 2 or i["ppid"] == 2:  # kernel threads
                if (i["name"] or "").startswith("ksoftirqd"):
                    softirqd += c.user + c.system
                continue
            where = self._in_lab(i["pid"])
            if where is None:
                continue
            (mine if where else foreign)[i["pid"]] = (
                i["create_time"], c.user + c.system + c.children_user + c.children_system)
        me = psutil.Process(self.me).cpu_times()
        return {"t": time.monotonic(), "foreign": foreign, "lab": mine, "softirqd": softirqd,
                "children": me.children_user + me.children_system}

    @staticmethod
    def _used(pa: dict, pb: dict) -> float:
        used = 0.0
        for pid, (created, cpu) in pb.items():
            prev = pa.get(pid)
            used += cpu - prev[1] if prev and prev[0] == created else cpu
        # a process that ended was reaped: its whole time moved into its
        # parent's children time, of which only what it used since ``a`` is new
        for pid, (created, cpu) in pa.items():
            now = pb.get(pid)
            if now is None or now[0] != created:
                used -= cpu
        return max(0.0, used)

    def share(self, a: dict, b: dict) -> float:
        """Share of the machine's CPUs the rest of the machine used between two snapshots."""
        return min(1.0, self._used(a["foreign"], b["foreign"]) / max(1e-3, (b["t"] - a["t"]) * self.ncpu))

    def lab_cpus(self, a: dict, b: dict) -> float:
        """CPUs (0..ncpu) the lab used on average between two snapshots."""
        used = (self._used(a["lab"], b["lab"]) + (b["softirqd"] - a["softirqd"])
                + (b["children"] - a["children"]))
        return used / max(1e-3, b["t"] - a["t"])

    def measure(self, fn: Callable[[], dict]) -> dict:
        """Run ``fn`` (one load-generator run) between two snapshots."""
        a = self.snapshot()
        res = fn()
        b = self.snapshot()
        res["foreign_share"] = round(self.share(a, b), 3)
        res["lab_cpus"] = round(self.lab_cpus(a, b), 3)
        return res

    def wait_quiet(self, budget: list[float], step: float = 0.5) -> float:
        """Wait (from ``budget[0]`` seconds, shared by all calls) until the rest of
        the machine is quiet; returns the last share seen."""
        while True:
            a = self.snapshot()
            time.sleep(step)
            sh = self.share(a, self.snapshot())
            if sh <= self.QUIET or budget[0] <= 0:
                return sh
            budget[0] -= step


def run_iperf(lab: Lab, addr: str, plan: Plan) -> dict:
    argv = ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-P", str(plan.tput_streams),
            "-t", str(plan.tput_seconds), "-O", str(plan.tput_omit), "-J"]
    last = None
    for attempt in range(3):  # "server is busy" right after the previous test
        cp = lab.run("client", argv, check=False, timeout=plan.tput_seconds + plan.tput_omit + 30)
        try:
            res = json.loads(cp.stdout)
        except ValueError:
            res = {"error": (cp.stderr or cp.stdout)[:200]}
        if "error" not in res:
            end = res["end"]
            recv = end["sum_received"]
            return {"gbps": recv["bits_per_second"] / 1e9, "bytes": recv["bytes"],
                    "retransmits": end.get("sum_sent", {}).get("retransmits"),
                    "seconds": recv.get("seconds")}
        last = res["error"]
        time.sleep(1.0 + attempt)
    raise BenchError(f"iperf3 to {addr} failed: {last}")


WRK_REQ = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def run_wrk(lab: Lab, url: str, plan: Plan) -> dict:
    argv = ["wrk", f"-t{plan.wrk_threads}", f"-c{plan.wrk_connections}", f"-d{plan.conn_seconds}s",
            "-H", "Connection: close", url]
    cp = lab.run("client", argv, timeout=plan.conn_seconds + 30)
    m = WRK_REQ.search(cp.stdout)
    if not m:
        raise BenchError(f"wrk output not understood: {cp.stdout[-300:]!r}")
    n = int(m.group(1))
    secs = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60, "us": 1e-6}.get(m.group(3), 1)
    e = WRK_ERR.search(cp.stdout)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, e.groups()))) if e else {}
    bad = WRK_NON2XX.search(cp.stdout)
    return {"requests": n, "seconds": secs, "rate": n / secs if secs else 0.0,
            "errors": errors, "non2xx": int(bad.group(1)) if bad else 0}


def wait_listening(lab: Lab, role: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cp = lab.run(role, ["ss", "-Htln", f"sport = :{port}"], check=False, timeout=5)
        if "LISTEN" in cp.stdout:
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} in {role}")


def run_rounds(block: str, arms: list[str] | Callable[[int], list[str]], run_arm: Callable[[str], dict],
               foreign: Foreign, min_rounds: int, max_rounds: int, want_clean: int,
               wait_budget: list[float]) -> list[dict]:
    """Rounds of ``arms`` (a list, or a function of the round number; order
    reversed every other round) until ``min_rounds`` are done and
    ``want_clean`` of them were undisturbed, or ``max_rounds``."""
    runs: list[dict] = []
    clean = 0
    for r in range(max_rounds):
        if r >= min_rounds and clean >= want_clean:
            break
        foreign.wait_quiet(wait_budget)
        mine = []
        these = arms(r) if callable(arms) else arms
        for arm in (these if r % 2 == 0 else list(reversed(these))):
            res = run_arm(arm)  # measures foreign_share and lab_cpus around its load run
            res.update(block=block, round=r, arm=arm)
            mine.append(res)
        quiet = all(x["foreign_share"] <= Foreign.QUIET for x in mine)
        for x in mine:
            x["quiet_round"] = quiet
        clean += quiet
        runs += mine
    return runs


def summarize_pairs(runs: list[dict], metric: str, base: str, arms: list[str],
                    min_clean: int = 3) -> dict:
    """Median of the per-round ratios arm / base (same block and round). When
    at least ``min_clean`` rounds were undisturbed by the rest of the
    machine, only those count; ``ratios_all`` keeps every round."""
    out: dict[str, Any] = {"runs": runs, "median": {}, "ratio": {}, "ratios": {}, "ratios_all": {},
                           "quiet_rounds": {}, "noisy": {}}
    for arm in [base] + arms:
        vals = [r[metric] for r in runs if r["arm"] == arm]
        if vals:
            out["median"][arm] = rounded(median(vals), 4)
    for arm in arms:
        pairs = []
        for r in runs:
            if r["arm"] != arm:
                continue
            b = [x for x in runs if x["arm"] == base and x["block"] == r["block"] and x["round"] == r["round"]]
            if b and b[0][metric]:
                pairs.append((r[metric] / b[0][metric], r["quiet_round"]))
        if not pairs:
            continue
        quiet = [x for x, q in pairs if q]
        use = quiet if len(quiet) >= min(min_clean, len(pairs)) else [x for x, _ in pairs]
        out["ratios_all"][arm] = [round(x, 4) for x, _ in pairs]
        out["ratios"][arm] = [round(x, 4) for x in use]
        out["ratio"][arm] = rounded(median(use), 4)
        # second estimate, better when the noise is run-to-run rather than load bursts
        rounds_used = {(r["block"], r["round"]) for r in runs if r["arm"] == arm
                       and (r["quiet_round"] or use is not quiet)}
        a = median([r[metric] for r in runs if r["arm"] == arm and (r["block"], r["round"]) in rounds_used])
        b = median([r[metric] for r in runs if r["arm"] == base and (r["block"], r["round"]) in rounds_used])
        out.setdefault("ratio_of_medians", {})[arm] = rounded(a / b, 4) if a and b else None
        out["quiet_rounds"][arm] = len(quiet)
        out["noisy"][arm] = use is not quiet
    return out


# ---------------------------------------------------------------- single router

def prepare_single_router(lab: Lab) -> None:
    # The client opens thousands of connections/s to one VIP:port: reuse
    # TIME_WAIT ports and use the whole port range, or it runs out of ports.
    lab.sysctl("client", {"net.ipv4.ip_local_port_range": "1024 65535",
                          "net.ipv4.tcp_tw_reuse": 1})
    # A switch does not run conntrack/iptables on bridged frames; with
    # br_netfilter loaded on the host it would (in every arm alike).
    lab.run("sw", ["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0",
                   "net.bridge.bridge-nf-call-ip6tables=0"], check=False)


def bench_throughput(lab: Lab, sl: Synlb, plan: Plan, foreign: Foreign, wait_budget: list[float]) -> dict:
    """plain routing vs synlb SYN-only vs synlb all-packets, iperf3 to t1."""
    iperf = lab.popen("t1", ["iperf3", "-s", "-p", str(IPERF_PORT)], name="iperf3")

    def run_arm(arm: str) -> dict:
        lab.run(sl.router, ["nft", "delete", "table", "inet", CT_ALONE_TABLE], check=False)
        if arm == "plain":
            sl.down()
            addr = A.target(1, 4)
        elif arm == "ct_alone":  # conntrack on (one rule that needs it), no synlb: its bare cost
            sl.down()
            lab.run(sl.router, ["nft", "-f", "-"], input=CT_ALONE)
            addr = A.target(1, 4)
        elif arm == "syn_only_host":  # the nfqueue engine under `synlb run` (drift check, supervisor)
            sl.start_host()
            addr = A.VIP[4]
        elif arm == "conntrack_only":  # synlb up, traffic not to the VIP: conntrack + table walk
            sl.up(shortcut=True)
            addr = A.target(1, 4)
        elif arm == "nft":  # the nftables engine: Maglev in the kernel, no worker
            sl.up(engine="nftables")
            addr = A.VIP[4]
        else:
            sl.up(shortcut=(arm == "syn_only"))
            addr = A.VIP[4]
        nfqueue = sl.active and arm != "nft"
        q0 = sl.chain_packets("synlb-VIP-ipf", "NFQUEUE") if nfqueue else 0
        k0 = sl.queue_counters().get(IPERF_QUEUE, {})
        a = cpu_snapshot()
        res = foreign.measure(lambda: run_iperf(lab, addr, plan))
        res["cpu"] = cpu_busy(a, cpu_snapshot())
        res["gbps_per_cpu"] = res["gbps"] / res["lab_cpus"] if res["lab_cpus"] else 0.0
        k1 = sl.queue_counters().get(IPERF_QUEUE, {})
        res["queued_packets"] = (sl.chain_packets("synlb-VIP-ipf", "NFQUEUE") - q0 if nfqueue else 0)
        # the rule counts what it saw (GSO packets of up to 64 KB); the queue counts
        # entries, after the kernel segmented them (netfilterqueue cannot ask for GSO)
        res["queue_entries"] = k1.get("id_sequence", 0) - k0.get("id_sequence", 0)
        res["queue_dropped"] = k1.get("queue_dropped", 0) - k0.get("queue_dropped", 0)
        res["user_dropped"] = k1.get("user_dropped", 0) - k0.get("user_dropped", 0)
        res["addr"] = addr
        _log(f"throughput {arm:12s} {res['gbps']:7.2f} Gbit/s (queued {res['queued_packets']} pkts)")
        return res

    try:
        wait_listening(lab, "t1", IPERF_PORT)
        # plain sits next to both arms it is compared with, in either order. The
        # headline pair runs every round; all-packets (stable, ~25x slower) and
        # the conntrack-only diagnosis only in the first rounds.
        # The pieces of the established path, in the first rounds: conntrack
        # alone, synlb's rules with no VIP traffic, each engine, the host.
        def arms(r: int) -> list[str]:
            if r >= plan.tput_rounds_all_arms:
                return ["nft", "plain", "syn_only"]
            pieces = ["ct_alone", "conntrack_only", "syn_only_host"] if plan.tput_conntrack_arm else []
            return pieces + ["nft", "plain", "syn_only", "all_packets"]
        runs = run_rounds("throughput", arms, run_arm, foreign,
                          plan.tput_rounds, plan.tput_rounds_max, plan.tput_rounds, wait_budget)
    finally:
        lab.stop_process(iperf)
    for r in runs:
        _log_disturbed(r)
    arms = ["syn_only", "nft", "all_packets", "conntrack_only", "ct_alone", "syn_only_host"]
    out = summarize_pairs(runs, "gbps", "plain", arms, min_clean=plan.tput_rounds)
    out["per_cpu"] = summarize_pairs(runs, "gbps_per_cpu", "plain", arms, min_clean=plan.tput_rounds)
    del out["per_cpu"]["runs"]
    out["flowtable"] = flowtable_probe(lab, sl.router)
    return out


CT_ALONE_TABLE = "synlb_bench_ct"
CT_ALONE = f"""table inet {CT_ALONE_TABLE} {{
	chain prerouting {{ type filter hook prerouting priority -300; policy accept; ct state established counter; }}
}}
"""

FLOWTABLE_PROBE = f"""table inet synlb_bench_probe {{
	flowtable ft {{ hook ingress priority 0; devices = {{ {A.ROUTER_FRONT_IF}, {A.ROUTER_BACK_IF} }}; }}
	chain forward {{ type filter hook forward priority 0; policy accept; ct state established flow add @ft; }}
}}
"""


def flowtable_probe(lab: Lab, router: str) -> dict:
    """Whether this kernel has the nftables flowtable, the usual way for
    established flows past conntrack and the forwarding path (tried in the
    router's namespace, then removed)."""
    p = lab.run(router, ["nft", "-f", "-"], input=FLOWTABLE_PROBE, check=False)
    lab.run(router, ["nft", "delete table inet synlb_bench_probe"], check=False)
    return {"supported": p.returncode == 0, "error": (p.stderr.strip().splitlines() or [""])[0][:200]}


def _log_disturbed(r: dict) -> None:
    if r["foreign_share"] > Foreign.QUIET:
        _log(f"  ({r['block']} round {r['round']} {r['arm']}: the rest of the machine used "
             f"{100 * r['foreign_share']:.0f}% of the CPUs)")


def _cpu_seconds(procs: dict[int, psutil.Process]) -> dict[int, tuple[float, float]]:
    out = {}
    for q, p in procs.items():
        try:
            t = p.cpu_times()
            out[q] = (t.user, t.system)
        except psutil.Error:
            out[q] = (0.0, 0.0)
    return out


def _rss_mb(procs: dict[int, psutil.Process]) -> dict[int, float]:
    out = {}
    for q, p in procs.items():
        with contextlib.suppress(psutil.Error):
            out[q] = p.memory_info().rss / 2**20
    return out


def bench_conn_rate(lab: Lab, sl: Synlb, plan: Plan, foreign: Foreign, wait_budget: list[float]) -> dict:
    """Kernel HMARK against synlb's worker, the C reference worker and the
    nftables engine (one queue), then HMARK against synlb with 2 queues,
    then HMARK, synlb and the C reference on NIC-like router links; wrk,
    ``Connection: close``.

    Within a block the NFQUEUE arms differ by one rule (the chain's NFQUEUE
    rule as synlb installed it, the same rule to the C worker's queue, or
    HMARK in its place), so they switch in milliseconds and each synlb run
    has the others right next to it. The nftables arm is ``synlb up`` with
    ``engine = nftables`` (its own table, no worker); the next NFQUEUE arm
    puts the chains back with ``synlb up``."""
    url = f"http://{A.VIP[4]}:{NGINX_PORT}/"
    runs: list[dict] = []
    work = cref.tempdir()
    try:
        exe = cref.build(work)
        c = _cref_check_hash(exe, work)
        # The last block runs on NIC-like router links (kept to the end: the
        # lab's wire is not switched back).
        blocks = (
            ("synlb", "hmark", "0", plan.conn_rounds, plan.conn_rounds_max, ["synlb", "cref", "nft"]),
            ("synlb_mq", "hmark", "0-1", plan.conn_rounds_mq, plan.conn_rounds_mq_max, ["synlb_mq"]),
            ("synlb_nic", "hmark_nic", "0", plan.conn_rounds_nic, plan.conn_rounds_nic_max,
             ["synlb_nic", "cref_nic", "floor_nic"]),
            # flow_hash = jhash: the kernel hands both workers the slot
            ("synlb_jhash_nic", "hmark_jhash_nic", "0", plan.conn_rounds_nic, plan.conn_rounds_nic_max,
             ["synlb_jhash_nic", "cref_jhash_nic"]))
        for block_name, base, queue, rounds, rounds_max, others in blocks:
            if block_name == "synlb_nic":
                nic_like_wire(lab, sl.router)
            flow_hash = "jhash" if "jhash" in block_name else None
            block = _conn_rate_block(lab, sl, plan, foreign, wait_budget, url, exe, work, block_name, base,
                                     queue, rounds, rounds_max, others, flow_hash)
            for r in block:
                _log_disturbed(r)
            runs += block
            sl.up(queue=queue)  # the rules exactly as synlb renders them (checks nothing drifted)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    veth = [r for r in runs if r["block"] not in ("synlb_nic", "synlb_jhash_nic")]
    out = summarize_pairs(veth, "rate", "hmark", ["synlb", "synlb_mq", "cref", "nft"])
    out["per_cpu"] = summarize_pairs(veth, "conn_per_cpu", "hmark", ["synlb", "synlb_mq", "cref", "nft"])
    del out["per_cpu"]["runs"]
    nic_runs = [r for r in runs if r["block"] == "synlb_nic"]
    nic = summarize_pairs(nic_runs, "rate", "hmark_nic", ["synlb_nic", "cref_nic", "floor_nic"])
    jh_runs = [r for r in runs if r["block"] == "synlb_jhash_nic"]
    jh = summarize_pairs(jh_runs, "rate", "hmark_jhash_nic", ["synlb_jhash_nic", "cref_jhash_nic"])
    out["runs"] = runs
    for part in (nic, jh):
        for k in ("median", "ratio", "ratios", "ratios_all", "quiet_rounds", "noisy"):
            out[k].update(part.get(k, {}))
    # synlb's worker against the C reference, same rounds: connections/s (plain
    # veth, like conn_rate_ratio) and CPU per connection (both wires)
    first = [r for r in runs if r["block"] == "synlb"]
    vs_c = {"conn_rate": summarize_pairs(first, "rate", "cref", ["synlb"]),
            "cpu_veth": summarize_pairs(first, "cpu_us_per_conn", "cref", ["synlb"]),
            "cpu_nic": summarize_pairs(nic_runs, "cpu_us_per_conn", "cref_nic", ["synlb_nic", "floor_nic"]),
            "cpu_nic_jhash": summarize_pairs(jh_runs, "cpu_us_per_conn", "cref_jhash_nic", ["synlb_jhash_nic"])}
    for v in vs_c.values():
        del v["runs"]
    vs_c["hash_check"] = c
    out["vs_c"] = vs_c
    for arm in ("synlb", "synlb_mq", "synlb_nic", "cref", "cref_nic", "floor_nic", "synlb_jhash_nic",
                "cref_jhash_nic"):
        mine = [r for r in runs if r["arm"] == arm]
        quiet = [r for r in mine if r["quiet_round"]]
        use = quiet if len(quiet) >= 3 else mine
        if not mine:
            continue
        for k in ("cpu_us_per_conn", "worker_user_us_per_conn", "worker_sys_us_per_conn"):
            out.setdefault(k, {})[arm] = rounded(median([r[k] for r in use]), 2)
        out.setdefault("worker_rss_mb", {})[arm] = rounded(max(r["worker_rss_mb"] or 0 for r in mine), 1)
        out.setdefault("queued_per_conn", {})[arm] = rounded(median(
            [r["queued_packets"] / max(1, r["requests"]) for r in mine]), 3)
        out.setdefault("copy_range", {})[arm] = mine[-1].get("copy_range")
    nft = [r for r in runs if r["arm"] == "nft"]
    if nft:  # the nftables engine has no worker: nothing may reach user space
        out["nft_queued_packets"] = sum(r["queued_packets"] for r in nft)
        out["nft_workers"] = max(r.get("workers_running", 0) for r in nft)
    if plan.perf_profile:  # on the NIC-like wire: where the worker's own CPU goes
        sl.up(queue="0")
        out["profile"] = profile_worker(lab, sl, url, plan)
    sl.up(queue="0")
    return out


def _cref_check_hash(exe: str, work: str) -> dict:
    """The C worker hashes a flow key exactly as synlb's worker does (the
    bench's key; an IPv4 and an IPv6 TCP key), or the comparison is void."""
    from synlb.packet import flow_key
    out = {}
    for hash_key in ("synlb-maglev-v1", "k" * 64):  # the shipped key, and one of the longest allowed
        key_path, _ = cref.write_inputs(work, hash_key, [])
        for fam, pkt in ((4, _syn(4, 40000)), (6, _syn(6, 40001))):
            k = flow_key(pkt)
            got, want = cref.hash_of(exe, key_path, k), cref.python_hash(hash_key, k)
            if got != want:
                raise BenchError(f"the C reference worker hashes IPv{fam} key {k.hex()} to {got}, "
                                 f"synlb to {want}")
            out[f"ipv{fam}_key{len(hash_key)}"] = True
    return out


def _conn_rate_block(lab: Lab, sl: Synlb, plan: Plan, foreign: Foreign, wait_budget: list[float], url: str,
                     exe: str, work: str, block: str, base: str, queue: str, rounds: int, rounds_max: int,
                     others: list[str], flow_hash: str | None = None) -> list[dict]:
    sl.up(queue=queue, flow_hash=flow_hash)
    nfqueue_rule = sl.last_rule("synlb-VIP-web")
    c = floor = None
    if any(a.startswith(("cref", "floor")) for a in others):
        # the same mark table as synlb's worker for the queue, each on a queue of its own
        spec = worker_table.load(sl.state_dir, 0)
        key_path, marks_path = cref.write_inputs(work, spec.hash_key, cref.marks_of(spec))
    if any(a.startswith("cref") for a in others):
        c = cref.CRef(lab, sl.router, exe, CREF_QUEUE, key_path, marks_path, spec.copy_range, spec.queue_maxlen,
                      slot_base=config_mod.SLOT_MARKS.start if spec.flow_hash == "jhash" else None)
        cref_rule = _retarget(nfqueue_rule, CREF_QUEUE)
    if any(a.startswith("floor") for a in others):
        # netfilterqueue with the least Python a worker can run
        floor = PyFloor(lab, sl.router, FLOOR_QUEUE, marks_path, spec.copy_range, spec.queue_maxlen)
        floor_rule = _retarget(nfqueue_rule, FLOOR_QUEUE)
    engine = ["nfqueue"]

    def nfqueue_engine() -> None:
        if engine[0] != "nfqueue":
            sl.up(queue=queue, flow_hash=flow_hash)
            engine[0] = "nfqueue"

    def run_arm(a: str) -> dict:
        procs: dict[int, psutil.Process] = {}
        if a == "nft":
            sl.up(queue=queue, engine="nftables")
            engine[0] = "nftables"
        elif a.startswith("cref"):
            nfqueue_engine()
            sl.replace_last_rule("synlb-VIP-web", cref_rule)
            procs = {CREF_QUEUE: c.ps}
        elif a.startswith("floor"):
            nfqueue_engine()
            sl.replace_last_rule("synlb-VIP-web", floor_rule)
            procs = {FLOOR_QUEUE: floor.ps}
        elif a == base:
            nfqueue_engine()
            sl.set_hmark()
        else:
            nfqueue_engine()
            sl.replace_last_rule("synlb-VIP-web", nfqueue_rule)
            procs = {q: p for q, p in sl.workers().items() if q != IPERF_QUEUE}
        res = measure_wrk(lab, sl, url, plan, procs, foreign)
        res["workers_running"] = len([q for q in sl.workers() if q != IPERF_QUEUE])
        extra = (f" worker {res['cpu_us_per_conn']:.1f} us/conn "
                 f"(user {res['worker_user_us_per_conn']:.1f} sys {res['worker_sys_us_per_conn']:.1f}) "
                 f"rss {res['worker_rss_mb']:.1f} MB" if procs else "")
        _log(f"conn_rate {a:9s} {res['rate']:8.0f} conn/s queued {res['queued_packets']}{extra}")
        return res

    try:
        return run_rounds(block, [*others[:1], base, *others[1:]], run_arm, foreign, rounds, rounds_max,
                          max(min(3, rounds), rounds - 2), wait_budget)
    finally:
        if c is not None:
            counters = c.stop()
            _log(f"C reference worker, block {block}: {counters}")
        if floor is not None:
            _log(f"Python floor worker, block {block}: {floor.stop()}")


def _retarget(rule: list[str], queue: int) -> list[str]:
    """An NFQUEUE rule's arguments with its queue number replaced."""
    out = list(rule)
    i = out.index("--queue-num")
    out[i + 1] = str(queue)
    return out


def nic_like_wire(lab: Lab, router: str) -> None:
    """Make the router's links hand packets over the way a NIC does.

    A veth pair delivers a packet to its peer at once: the verdict syscall
    that re-injects an accepted SYN then also runs, in softirq, the switch
    and the target's and client's TCP stacks (and what they send back), and
    the kernel charges all of it to the worker. With GRO on the switch-side
    end, veth queues the packet for that end's NAPI instead, and threaded
    NAPI polls it from a kernel thread: the router's part ends at the
    hand-over, as at a NIC's transmit ring. veth takes that path only for
    packets from a device without TSO, so the router's links lose TSO (the
    kernel segments in software; the new-connection arms send small
    packets)."""
    i = lab.routers.index(router) + 1
    for dev, port in ((A.ROUTER_FRONT_IF, f"r{i}f"), (A.ROUTER_BACK_IF, f"r{i}b")):
        lab.run(router, ["ethtool", "-K", dev, "tso", "off"])
        lab.run("sw", ["ethtool", "-K", port, "gro", "on"])
        lab.run("sw", ["tee", f"/sys/class/net/{port}/threaded"], input="1\n")
        got = lab.run("sw", ["cat", f"/sys/class/net/{port}/threaded"]).stdout.strip()
        if got != "1":
            raise BenchError(f"threaded NAPI did not turn on for {port} (read {got!r})")


def measure_wrk(lab: Lab, sl: Synlb, url: str, plan: Plan, procs: dict[int, psutil.Process],
                foreign: Foreign | None = None) -> dict:
    """One wrk run; with ``procs``, the workers' CPU per connection and RSS."""
    q0 = sl.queue_counters()
    c0 = _cpu_seconds(procs)
    a = cpu_snapshot()
    res = foreign.measure(lambda: run_wrk(lab, url, plan)) if foreign else run_wrk(lab, url, plan)
    res["cpu"] = cpu_busy(a, cpu_snapshot())
    if res.get("lab_cpus"):
        res["conn_per_cpu"] = res["rate"] / res["lab_cpus"]
    c1 = _cpu_seconds(procs)
    q1 = sl.queue_counters()
    res["queued_packets"] = sum(q1.get(q, {}).get("id_sequence", 0) - q0.get(q, {}).get("id_sequence", 0)
                                for q in q1 if q != IPERF_QUEUE)
    res["queue_dropped"] = sum(q1.get(q, {}).get("queue_dropped", 0) - q0.get(q, {}).get("queue_dropped", 0)
                               for q in q1 if q != IPERF_QUEUE)
    if procs:
        user = sum(c1[q][0] - c0[q][0] for q in procs)
        system = sum(c1[q][1] - c0[q][1] for q in procs)
        n = max(1, res["requests"])
        res["worker_user_us_per_conn"] = 1e6 * user / n
        res["worker_sys_us_per_conn"] = 1e6 * system / n
        res["cpu_us_per_conn"] = 1e6 * (user + system) / n
        rss = _rss_mb(procs)
        res["worker_rss_mb"] = max(rss.values()) if rss else None
        res["workers"] = len(procs)
        res["per_worker_cpu_s"] = {str(q): round(sum(c1[q]) - sum(c0[q]), 3) for q in procs}
        res["copy_range"] = {str(q): q1.get(q, {}).get("copy_range") for q in procs}
    return res


def profile_worker(lab: Lab, sl: Synlb, url: str, plan: Plan) -> dict | None:
    """Where the worker's CPU goes, by kernel stack (perf, if installed):
    user space, the recv and verdict syscalls, and under the verdict the
    kernel forwarding the accepted SYN (nfqnl_reinject), and softirq work
    of other hosts that still ran in the worker's context."""
    perf = _which("perf")
    if perf is None:
        return None
    procs = sl.workers()
    if 0 not in procs:
        return None
    long = dataclasses.replace(plan, conn_seconds=max(5, plan.conn_seconds))
    with tempfile.TemporaryDirectory(prefix="synlb-bench-perf-") as tmp:
        data = os.path.join(tmp, "perf.data")
        rec = subprocess.Popen([perf, "record", "-q", "-g", "-o", data, "-p", str(procs[0].pid),
                                "--", "sleep", str(long.conn_seconds - 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run_wrk(lab, url, long)
        finally:
            try:
                rec.wait(timeout=long.conn_seconds + 30)
            except subprocess.TimeoutExpired:
                rec.kill()
                rec.wait()
        try:
            sym = subprocess.run([perf, "report", "-i", data, "--children", "--sort", "sym", "--stdio",
                                  "-g", "none"], capture_output=True, text=True, timeout=120).stdout
            dso = subprocess.run([perf, "report", "-i", data, "--no-children", "--sort", "dso", "--stdio",
                                  "-g", "none"], capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None

    def pct(text: str, name: str) -> float:
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 3 and f[-1] == name and f[0].endswith("%"):
                return float(f[0].rstrip("%"))
        return 0.0
    user = 0.0
    for line in dso.splitlines():
        f = line.split()
        if len(f) >= 2 and f[0].endswith("%") and not f[-1].startswith("[kernel"):
            user += float(f[0].rstrip("%"))
    return {"softirq_in_worker_pct": pct(sym, "net_rx_action"),
            "verdict_syscall_pct": pct(sym, "nfqnl_recv_verdict"),
            "recv_syscall_pct": pct(sym, "netlink_recvmsg"),
            "reinject_pct": pct(sym, "nfqnl_reinject"),
            "user_space_pct": round(user, 2),
            "note": "shares of the worker's perf samples (NIC-like wire); reinject = the kernel forwarding "
                    "the accepted SYN, under the verdict syscall; softirq = net_rx_action in the worker's "
                    "context"}


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":") + ["/usr/bin"]:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def bench_single_router(plan: Plan) -> dict:
    out: dict[str, Any] = {}
    with Lab(routers=1, targets=3, servers=False) as lab:
        prepare_single_router(lab)
        lab.start_nginx(port=NGINX_PORT)
        foreign = Foreign(lab)
        wait_budget = [plan.quiet_wait_budget]
        sl = Synlb(lab, "lb1")
        try:
            sl.write()
            _log(f"lab {lab.prefix}: throughput")
            out["throughput"] = bench_throughput(lab, sl, plan, foreign, wait_budget)
            _log("conn_rate")
            out["conn_rate"] = bench_conn_rate(lab, sl, plan, foreign, wait_budget)
            _log("nft_update")
            out["nft_update"] = bench_nft_update(lab, sl, plan)
        finally:
            with contextlib.suppress(Exception):
                sl.down(check=False)
        out["quiet_wait_used_s"] = round(plan.quiet_wait_budget - wait_budget[0], 1)
    return out


NFT_UPDATE_TARGETS = 100
NFT_CHANGE = re.compile(r"nftables: updated web: (\d+) slots in one transaction: (\d+) ms \(kernel\), "
                        r"(\d+) ms in all")


def bench_nft_update(lab: Lab, sl: Synlb, plan: Plan) -> dict:
    """The nftables engine's health flip: 100 targets at M = 65537, one
    target out and back (twice per round), each applied by ``synlb up`` as
    the host would (only the differing slots, one transaction), while wrk
    opens new connections all along: none may fail.

    Two series of flips under the same wrk: at the shipped ``[synlb] nice``
    (the figures), then at ``nice = 0``, beside wrk and nginx, which share
    this lab's CPUs as no load generator shares a router's."""
    real = [(A.target(k, 4), A.target(k, 6)) for k in (1, 2, 3)]
    targets = [(f"x{i:03d}", *real[i % 3]) for i in range(NFT_UPDATE_TARGETS)]
    marks = {name: 0x1000 + i for i, (name, _, _) in enumerate(targets)}

    def write(nice: int | None) -> None:
        with open(sl.conf, "w") as fh:
            fh.write("# written by synlb-lab bench (nft_update)\n" + render_service_config(
                sl.state_dir, targets, ports=str(NGINX_PORT), marks=marks, engine="nftables",
                extra_service=f"table_size = {TABLE_SIZE}", extra_synlb="" if nice is None else f"nice = {nice}"))

    write(None)
    if os.path.isdir(sl.state_dir):  # no down set left by an earlier section
        health_state.write_down(sl.state_dir, {"web": []})
    t0 = time.monotonic()
    sl.cmd("up", timeout=120)
    sl.active = True
    first_up = time.monotonic() - t0
    downs = [["x042"], [], ["x017"], []] * (1 if plan.quick else 3)
    series = [(None, downs), (0, downs)]
    # wrk should outlast every flip (each a `synlb up`, about 1 s with its
    # Python start and more under load, then a 0.6 s pause); a flip made after
    # wrk ended is recorded as not loaded and left out of the medians
    flip_count = sum(len(d) for _, d in series)
    wrk_plan = dataclasses.replace(plan, conn_seconds=int(flip_count * (2 if plan.quick else 3) + 4))
    flips = []
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(run_wrk(lab, f"http://{A.VIP[4]}:{NGINX_PORT}/", wrk_plan))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(1.0)  # wrk is up to speed before the first flip
        for nice, flip_downs in series:
            write(nice)
            for down in flip_downs:
                health_state.write_down(sl.state_dir, {"web": down})
                out = sl.cmd("up", timeout=60)
                m = NFT_CHANGE.search(out)
                if not m:
                    raise BenchError(f"synlb up did not report an nftables update: {out[-300:]!r}")
                flips.append({"down": down, "nice": "default" if nice is None else nice, "slots": int(m.group(1)),
                              "kernel_ms": float(m.group(2)), "total_ms": float(m.group(3)),
                              "loaded": loader.is_alive()})
                _log(f"nft_update nice={flips[-1]['nice']} down={down}: {flips[-1]['slots']} slots, "
                     f"{flips[-1]['kernel_ms']:.0f} ms kernel, {flips[-1]['total_ms']:.0f} ms in all")
                time.sleep(0.6)
    finally:
        loader.join(wrk_plan.conn_seconds + 60)
        health_state.write_down(sl.state_dir, {"web": []})
        write(None)
    errors = sum(result.get("errors", {}).values()) + result.get("non2xx", 0)

    def medians(of: list[dict]) -> dict:
        loaded = [f for f in of if f["loaded"]] or of  # (all of them, if wrk ended before the first)
        return {"median_total_ms": rounded(median([f["total_ms"] for f in loaded]), 1),
                "max_total_ms": max(f["total_ms"] for f in loaded),
                "median_kernel_ms": rounded(median([f["kernel_ms"] for f in loaded]), 1)}
    shipped = medians([f for f in flips if f["nice"] == "default"])
    return {"targets": NFT_UPDATE_TARGETS, "table_size": TABLE_SIZE, "first_up_s": round(first_up, 3),
            "flips": flips, **shipped, "nice": config_mod.DEFAULT_NICE,
            "nice_0": medians([f for f in flips if f["nice"] == 0]),
            "flips_without_load": sum(not f["loaded"] for f in flips),
            "wrk": {k: result.get(k) for k in ("requests", "rate", "errors", "non2xx")},
            "connections_failed": errors}


DRIFT_PROBE = """
import json, resource, sys, time
from synlb import config, dataplane
cfg = config.load(sys.argv[1])
found = dataplane.drift(cfg)  # warm: imports, first netlink sockets
n = int(sys.argv[2])
r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
for _ in range(n):
    found += dataplane.drift(cfg)
r1, c1, t1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
cpu = lambda a, b: (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)
print(json.dumps({"wall_ms": 1000 * (t1 - t0) / n, "cpu_ms": 1000 * cpu(r0, r1) / n,
                  "children_cpu_ms": 1000 * cpu(c0, c1) / n, "drift_found": found}))
"""


def bench_drift(plan: Plan) -> dict:
    """What the host's drift check (``dataplane.drift``, once a second while
    active) costs: its CPU per call, in the router's namespace, on an
    installed data plane that has not drifted (3 and 100 targets, both engines)."""
    out = {}
    calls = 5 if plan.quick else 20
    with Lab(routers=1, targets=3, servers=False) as lab:
        _log(f"lab {lab.prefix}: drift")
        sl = Synlb(lab, "lb1")
        for n, engine in ((3, "nfqueue"), (100, "nfqueue"), (3, "nftables"), (100, "nftables")):
            real = [(A.target(k, 4), A.target(k, 6)) for k in (1, 2, 3)]
            targets = [(f"x{i:03d}", *real[i % 3]) for i in range(n)]
            with open(sl.conf, "w") as fh:
                fh.write(render_service_config(sl.state_dir, targets, ports=str(NGINX_PORT), engine=engine,
                                               marks={t: 0x1000 + i for i, (t, _, _) in enumerate(targets)},
                                               extra_service=f"table_size = {TABLE_SIZE}"))
            try:
                sl.cmd("up", timeout=120)
                cp = lab.run("lb1", [sys.executable, "-c", DRIFT_PROBE, sl.conf, str(calls)], timeout=300)
                res = json.loads(cp.stdout.strip().splitlines()[-1])
            finally:
                sl.cmd("down", timeout=120, check=False)
            res = {k: (rounded(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
            res["cpu_share_at_1s_pct"] = rounded((res["cpu_ms"] + res["children_cpu_ms"]) / 10, 2)
            out[f"{engine}_{n}"] = res
            _log(f"drift check, {engine}, {n} targets: {res['cpu_ms']} ms CPU (+{res['children_cpu_ms']} ms in "
                 f"children), {res['wall_ms']} ms wall per call; found {res['drift_found']}")
    return out


# ---------------------------------------------------------------- failover

def bench_failover_nft(plan: Plan) -> dict:
    """The failover section with ``engine = nftables`` on both routers (one
    failover and back in quick mode: the smoke test checks that it runs)."""
    return bench_failover(dataclasses.replace(plan, failovers=1) if plan.quick else plan, engine="nftables")


def bench_failover(plan: Plan, engine: str = "nfqueue") -> dict:
    """Five failovers (the master's links down, then back) with sessions
    running, on the configuration synlb ships: conf/keepalived.conf.example
    (advert_int 0.03, preempt_delay), the notify hook, hot standby on both."""
    from .demo_failover import ADVERT_INT as SHIPPED_ADVERT_INT
    from .demo_failover import PATTERN_ARGS, Pair, run_failover

    assert SHIPPED_ADVERT_INT == ADVERT_INT, "the targets table assumes the shipped advert_int"

    events: list[dict] = []
    with Lab(routers=2, targets=3, server_ports=(80,)) as lab:
        pair = Pair(lab, engine=engine)
        pair.prepare()
        _log(f"lab {lab.prefix}: failover, engine {engine}")
        try:
            pair.start()
            for i in range(plan.failovers):
                res = run_failover(pair, "links", plan.sessions_per_pattern,
                                   patterns=FAILOVER_PATTERNS, hold=1.0, back=True)
                ev = {"index": i, "from": "lb1", "to": "lb2",
                      "takeover_s": res["steps"]["over"]["takeover"],
                      "takeover_back_s": res["steps"]["back"]["takeover"],
                      "max_delay_s": res["max_delay"],
                      "delays": {k.replace("/", "_"): v["max_delay"] for k, v in res["per"].items()},
                      "max_gap_s": res["max_gap"],
                      "gaps": {k.replace("/", "_"): v["max_gap"] for k, v in res["per"].items()},
                      "sessions": res["sessions"], "kept": res["kept"], "moved": res["moved"]}
                events.append(ev)
                _log(f"failover {i}: takeover {ev['takeover_s']:.2f} s, data held up at most "
                     f"{ev['max_delay_s']:.3f} s, longest time between deliveries {ev['max_gap_s']:.3f} s, "
                     f"kept {ev['kept']}/{ev['sessions']}, moved {ev['moved']}")
        finally:
            with contextlib.suppress(Exception):
                pair.close()
    delays = [e["max_delay_s"] for e in events]
    gaps = [e["max_gap_s"] for e in events]
    total = sum(e["sessions"] for e in events)
    kept = sum(e["kept"] for e in events)
    return {"events": events, "advert_int": SHIPPED_ADVERT_INT, "engine": engine,
            "patterns": {p: PATTERN_ARGS[p]["interval"] for p in FAILOVER_PATTERNS},
            "max_delay_s": max(delays) if delays else None,
            "median_delay_s": rounded(median(delays), 3),
            "max_gap_s": max(gaps) if gaps else None,
            "median_gap_s": rounded(median(gaps), 3),
            "sessions": total, "kept": kept,
            "moved": sum(e["moved"] for e in events),
            "kept_ratio": kept / total if total else None,
            "median_takeover_s": rounded(median([e["takeover_s"] for e in events]), 3)}


# ---------------------------------------------------------------- pure parts

def bench_maglev(plan: Plan) -> dict:
    from synlb.maglev import Maglev
    out = {}
    key = b"synlb-maglev-v1"
    for n in (10, 100, 1000):
        names = [f"target-{i:04d}" for i in range(n)]
        times = []
        for _ in range(plan.maglev_repeats):
            t0 = time.perf_counter()
            Maglev(names, TABLE_SIZE, key)
            times.append((time.perf_counter() - t0) * 1000)
        out[str(n)] = {"median_ms": round(statistics.median(times), 2),
                       "min_ms": round(min(times), 2), "runs": len(times)}
    return {"table_size": TABLE_SIZE, "build_ms": out}


class _StubPacket:
    """What Worker.on_packet uses of a netfilterqueue Packet."""
    __slots__ = ("payload", "mark")

    def __init__(self, payload: bytes):
        self.payload = payload
        self.mark = 0

    def get_payload(self) -> bytes:
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        pass

    def drop(self) -> None:
        pass


def _syn(family: int, sport: int) -> bytes:
    import struct
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 0xA0, 0x02, 64240, 0, 0) + bytes(20)
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                         socket.inet_pton(socket.AF_INET, A.CLIENT[4]),
                         socket.inet_pton(socket.AF_INET, A.VIP[4]))
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, 64,
                         socket.inet_pton(socket.AF_INET6, A.CLIENT[6]),
                         socket.inet_pton(socket.AF_INET6, A.VIP[6]))
    return ip + tcp


def _seed_on_packet(worker) -> Callable:
    """The reference hot path: the worker callback as first written, before
    the IPv4 fast path of ``packet.flow_key`` and the flattened mark table
    (flow key by the general parser, ``Maglev.slot``). It must give the
    same mark as ``Worker.on_packet`` for every packet; the benchmark times
    both. (Its name and the ``seed_*`` result keys are kept for the results
    already published.)"""
    from synlb.packet import FALLBACK_BYTES, FALLBACK_VERSION, _parse_key

    def flow_key(p: bytes) -> bytes:
        key = _parse_key(p)
        return key if key is not None else FALLBACK_VERSION + bytes(p[:FALLBACK_BYTES])

    class Counters:
        packets = 0
        picks: dict[int, int] = {}

    c = Counters()

    def on_packet(pkt) -> None:
        table = worker.table
        marks = table.marks
        c.packets += 1
        if not marks:
            pkt.drop()
            return
        mark = marks[table.maglev.slot(flow_key(pkt.get_payload()))]
        pkt.set_mark(mark)
        pkt.accept()
        c.picks[mark] = c.picks.get(mark, 0) + 1
    return on_packet


def _jhash_on_packet(worker) -> Callable:
    """The worker's callback with the nftables engine's hash instead of its
    own: the kernel's jhash of the same 5-tuple layout, seed and
    reciprocal_scale (what the worker would run to pick the kernel's
    target, docs/ENGINES.md). Same counters, same table."""
    from synlb.jhash import kernel_slot, service_seed
    from synlb.packet import flow_key
    seed = service_seed(worker.spec.hash_key, worker.service_name)

    def on_packet(pkt, _flow_key=flow_key, _slot=kernel_slot) -> None:
        t = worker.table
        key = _flow_key(pkt.get_payload())
        if t.size:
            slot = _slot(key, seed, t.size)
            mark = t.marks[slot if slot is not None else 0]
            pkt.set_mark(mark)
            pkt.accept()
            t.picks[mark] += 1
        else:
            pkt.drop()
    return on_packet


def bench_hotpath(plan: Plan) -> dict:
    """Per-packet Python cost of the worker callback, stub packets (no kernel);
    besides, the same callback hashing with the kernel's jhash (``kernel_jhash``)."""
    from synlb.config import load
    from synlb.worker import Worker
    with tempfile.TemporaryDirectory(prefix="synlb-bench-") as tmp:
        conf = os.path.join(tmp, "synlb.ini")
        with open(conf, "w") as fh:
            fh.write(render_config(os.path.join(tmp, "state"), iperf_service=False))
        w = Worker.from_config(load(conf), "web")
        n = plan.hotpath_packets
        pkts = [_StubPacket(_syn(4 if i % 4 else 6, 1024 + i % 60000)) for i in range(4096)]
        seed = _seed_on_packet(w)
        impls = {"current": w.on_packet, "seed": seed, "kernel_jhash": _jhash_on_packet(w)}
        # same answer for every packet
        for p in pkts[:512]:
            impls["current"](p)
            m1 = p.mark
            seed(p)
            if p.mark != m1:
                raise BenchError("hot path and the reference callback disagree on a packet's mark")
        # short batches, the two callbacks alternating, best batch of each:
        # a burst of load from the rest of the machine hits both alike
        best = {name: float("inf") for name in impls}
        batch = max(1000, n // 10)
        for _ in range(10):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                for i in range(batch):
                    fn(pkts[i & 4095])
                best[name] = min(best[name], (time.perf_counter() - t0) / batch * 1e6)
        out = {name + "_us_per_packet": round(v, 3) for name, v in best.items()}
        # what computing the kernel's hash would add to the worker's CPU per packet
        out["kernel_jhash_extra_pct"] = round(100 * (best["kernel_jhash"] / best["current"] - 1), 1)
        out["packets"] = 10 * batch
        out["mix"] = "75% IPv4 SYN, 25% IPv6 SYN"
        return out


# ---------------------------------------------------------------- the whole run

def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    commit = None
    with contextlib.suppress(Exception):
        here = os.path.dirname(os.path.abspath(__file__))
        cp = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=5)
        commit = cp.stdout.strip() or None
    return {"hostname": socket.gethostname(), "cpu_model": model, "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_before": [round(x, 2) for x in os.getloadavg()], "commit": commit}


def headline(results: dict) -> dict:
    sr = results.get("single_router", {})
    tp = sr.get("throughput", {})
    cr = sr.get("conn_rate", {})
    fo = results.get("failover", {})
    mg = results.get("maglev", {}).get("build_ms", {})
    cpu = cr.get("cpu_us_per_conn", {})
    nu = sr.get("nft_update", {})
    fon = results.get("failover_nft", {})
    vs_c = cr.get("vs_c", {})
    return {
        "throughput_ratio": tp.get("ratio", {}).get("syn_only"),
        # the established path's pieces, same rounds (bench/README.md): conntrack alone, synlb's
        # rules with no VIP traffic, the nfqueue engine under `synlb run`
        "ct_alone_throughput_ratio": tp.get("ratio_of_medians", {}).get("ct_alone"),
        "no_vip_throughput_ratio": tp.get("ratio_of_medians", {}).get("conntrack_only"),
        "host_throughput_ratio": tp.get("ratio_of_medians", {}).get("syn_only_host"),
        "all_packets_ratio": tp.get("ratio", {}).get("all_packets"),
        "conn_rate_ratio": cr.get("ratio", {}).get("synlb"),
        "conn_rate_ratio_multiqueue": cr.get("ratio", {}).get("synlb_mq"),
        # the same ratios per CPU the lab used (hardly moved by other load on the machine)
        "throughput_per_cpu_ratio": tp.get("per_cpu", {}).get("ratio", {}).get("syn_only"),
        "conn_per_cpu_ratio": cr.get("per_cpu", {}).get("ratio", {}).get("synlb"),
        "conn_per_cpu_ratio_multiqueue": cr.get("per_cpu", {}).get("ratio", {}).get("synlb_mq"),
        # the worker's own CPU: router links NIC-like (see nic_like_wire)
        "cpu_us_per_conn": cpu.get("synlb_nic"),
        # plain veth links: also the other hosts' packet processing run in the worker's syscalls
        "cpu_us_per_conn_veth": cpu.get("synlb"),
        "conn_rate_ratio_nic": cr.get("ratio", {}).get("synlb_nic"),
        "worker_rss_mb": cr.get("worker_rss_mb", {}).get("synlb"),
        "maglev_build_ms_10": mg.get("10", {}).get("median_ms"),
        "maglev_build_ms_100": mg.get("100", {}).get("median_ms"),
        "maglev_build_ms_1000": mg.get("1000", {}).get("median_ms"),
        # the longest time data was held up in any session (the interruption)
        "failover_gap_s": fo.get("max_delay_s"),
        # the longest time between two deliveries: also counts each pattern's own pause
        "failover_longest_interarrival_s": fo.get("max_gap_s"),
        "sessions_kept_ratio": fo.get("kept_ratio"),
        "pins_normal_path_ratio": results.get("pins", {}).get("hotpath", {}).get("no_pins_vs_before"),
        # the normal path against the one before pickups followed the configured table (issue 20)
        "pickup_normal_path_ratio": results.get("pins", {}).get("hotpath", {}).get("normal_vs_before_pickup"),
        # the nftables engine and the C reference: ratios of the medians of the same rounds
        "nft_conn_rate_ratio": cr.get("ratio_of_medians", {}).get("nft"),
        "nft_throughput_ratio": tp.get("ratio_of_medians", {}).get("nft"),
        "nft_update_ms_100": nu.get("median_total_ms"),
        "nft_update_ms_100_max": nu.get("max_total_ms"),
        "nft_connections_failed_in_update": nu.get("connections_failed"),
        "nft_user_space_packets": cr.get("nft_queued_packets"),
        "nft_failover_gap_s": fon.get("max_delay_s"),
        "nft_sessions_kept_ratio": fon.get("kept_ratio"),
        "nfqueue_cpu_vs_c": vs_c.get("cpu_nic", {}).get("ratio_of_medians", {}).get("synlb_nic"),
        "nfqueue_cpu_vs_c_veth": vs_c.get("cpu_veth", {}).get("ratio_of_medians", {}).get("synlb"),
        "nfqueue_conn_rate_vs_c": vs_c.get("conn_rate", {}).get("ratio_of_medians", {}).get("synlb"),
        "cref_cpu_us_per_conn": cpu.get("cref_nic"),
        # netfilterqueue with the least Python (pyfloor.py) against C: below it no Python worker can go
        "nfqueue_floor_cpu_vs_c": vs_c.get("cpu_nic", {}).get("ratio_of_medians", {}).get("floor_nic"),
        # flow_hash = jhash: synlb's worker and the C reference both read the kernel's slot
        "nfqueue_jhash_cpu_vs_c": vs_c.get("cpu_nic_jhash", {}).get("ratio_of_medians", {}).get("synlb_jhash_nic"),
        # the host's drift check, once a second: % of one CPU, 3 and 100 targets (the worse engine)
        "drift_check_cpu_pct_3": max((v["cpu_share_at_1s_pct"] for k, v in results.get("drift", {}).items()
                                      if k.endswith("_3")), default=None),
        "drift_check_cpu_pct_100": max((v["cpu_share_at_1s_pct"] for k, v in results.get("drift", {}).items()
                                        if k.endswith("_100")), default=None),
        "pins_us_per_conntrack_entry": results.get("pins", {}).get("conntrack", {}).get("us_per_entry"),
    }


def check_targets(h: dict) -> dict:
    out = {}
    for key, (op, limit) in TARGETS.items():
        v = h.get(key)
        if v is None:
            out[key] = {"target": f"{op} {limit:g}", "value": None, "met": None}
            continue
        met = {">=": v >= limit, "<=": v <= limit, "<": v < limit}[op]
        if not limit:  # a count that must be zero: the value says by how much
            by = None
        elif op == ">=":
            by = (limit - v) / limit
        else:
            by = (v - limit) / limit
        out[key] = {"target": f"{op} {limit:g}", "value": v, "met": bool(met),
                    "missed_by_pct": None if met or by is None else round(100 * by, 1)}
    return out


def run(plan: Plan, out_dir: str, sections: list[str] | None = None) -> dict:
    sections = sections or ["maglev", "hotpath", "pins", "drift", "single_router", "failover", "failover_nft"]
    started = time.time()
    t0 = time.monotonic()
    results: dict[str, Any] = {"schema": SCHEMA, "quick": plan.quick,
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                               "machine": machine_info(), "plan": dataclasses.asdict(plan)}
    timings = {}
    from .bench_pins import bench_pins
    for name, fn in (("maglev", bench_maglev), ("hotpath", bench_hotpath), ("pins", bench_pins),
                     ("drift", bench_drift),
                     ("single_router", bench_single_router), ("failover", bench_failover),
                     ("failover_nft", bench_failover_nft)):
        if name not in sections:
            continue
        s0 = time.monotonic()
        _log(f"section {name}")
        results[name] = fn(plan)
        timings[name] = round(time.monotonic() - s0, 1)
    results["timings_s"] = timings
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    h = headline(results)
    results["targets"] = check_targets(h)
    final = {**h, **results}
    from .bench_report import write_reports
    write_reports(final, out_dir)
    return final


def default_out_dir() -> str:
    """<repo>/bench/results when running from a source checkout, else ./bench/results."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.abspath(os.path.join(here, "..", ".."))
    if os.path.exists(os.path.join(repo, "pyproject.toml")):
        return os.path.join(repo, "bench", "results")
    return os.path.join(os.getcwd(), "bench", "results")


def main(args) -> int:
    if os.geteuid() != 0:
        print("synlb-lab bench: must run as root (network namespaces)", file=sys.stderr)
        return 1
    plan = Plan.quick_plan() if args.quick else Plan()
    if getattr(args, "no_perf", False):
        plan.perf_profile = False
    out_dir = args.out or default_out_dir()
    sections = args.only.split(",") if getattr(args, "only", None) else None
    # SIGTERM ends the run like ^C: the labs' context managers tear down
    old = signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        res = run(plan, out_dir, sections)
    except KeyboardInterrupt:
        print("synlb-lab bench: interrupted; labs torn down", file=sys.stderr)
        return 130
    except (BenchError, LabError) as e:
        print(f"synlb-lab bench: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
    from .bench_report import summary_lines
    try:
        print("\n".join(summary_lines(res)))
        print(f"\nreport: {os.path.join(out_dir, 'latest.md')}", flush=True)
    except BrokenPipeError:  # the results are written; only this summary is lost
        sys.stdout = open(os.devnull, "w")
    return 0
