"""Two routers with real keepalived and synlb on both: a failover keeps the
running sessions.

Each router gets its own synlb.ini (``[vrrp] sync_group = G1``) and state
dir under ``lab.role_dir(router)``, and keepalived runs the configuration
shipped as ``conf/keepalived.conf.example``, with only the documentation
addresses, interface names, paths, router_id and priority replaced
(:func:`lab_substitutions`): advert_int 0.03, preempt_delay 5 (see the
comments there for why). synlb follows keepalived through the notify hook
(``hooks/keepalived-notify``, installed root-owned 0755 in the lab dir as a
package would), the notify FIFO or D-Bus.

The routers start the way a real one is configured: conntrack loose pickup
OFF (``nf_conntrack_tcp_loose=0``, ``be_liberal=0``) and a stateful firewall
that drops INVALID forwarded packets, so only synlb's pickup lets a new
master adopt running connections (and the pickup-off run shows it).

``run_failover_demo`` is what ``synlb-lab demo`` shows; the tests use
:class:`Pair`, :func:`run_failover` and :func:`snapshot` directly.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import addresses as A
from .netns import LabError, netns_pids
from .scenario import service_config, synlb_exe
from .topology import Lab

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "conf" / "keepalived.conf.example"
HOOK = REPO / "hooks" / "keepalived-notify"

ADVERT_INT = 0.03  # as in the example
PREEMPT_DELAY = 5.0  # as in the example
# the demo's bound on the longest gap between two deliveries: three missed
# adverts (VRRP's master-down time), plus 0.5 s for a retransmission and the
# patterns' own pauses (push: 0.3 s)
GAP_LIMIT = 3 * ADVERT_INT + 0.5

PATTERNS = ("echo", "push", "down", "up")
FAMILIES = (4, 6)
#: per pattern: client speaks first (echo), server speaks first after an
#: idle stretch (push, one line per 0.3 s), continuous download, upload
PATTERN_ARGS = {
    "echo": {"interval": 0.1},
    "push": {"interval": 0.3},
    "down": {"interval": 0.05, "chunk": 8192},
    "up": {"interval": 0.05, "chunk": 8192},
}

PICKUP_SYSCTLS = ("net.netfilter.nf_conntrack_tcp_loose", "net.netfilter.nf_conntrack_tcp_be_liberal")
FIREWALL = ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]


# ---------------------------------------------------------------- keepalived.conf

def lab_substitutions(router: int, *, config: str, hook: str, fifo: str, synlb: str,
                      ready_file: str) -> list[tuple[str, str]]:
    """(example text, lab text) pairs; each must occur in the example."""
    return [
        ("/run/synlb.ready", ready_file),
        ("router_id lb1", f"router_id lb{router}"),
        ("priority 150", f"priority {150 if router == 1 else 100}"),
        ("/usr/lib/synlb/keepalived-notify", hook),
        ("/usr/bin/synlb", synlb),
        ("/etc/synlb/synlb.ini", config),
        ("/run/keepalived/synlb.fifo", fifo),
        ("203.0.113.254/24", f"{A.FRONT_VRRP[4]}/24"),
        ("2001:db8:f::254/64", f"{A.FRONT_VRRP[6]}/64"),
        ("198.51.100.254/24", f"{A.BACK_VRRP[4]}/24"),
        ("2001:db8:1::254/64", f"{A.BACK_VRRP[6]}/64"),
        ("eth0", A.ROUTER_FRONT_IF),
        ("eth1", A.ROUTER_BACK_IF),
    ]


def keepalived_conf(router: int, *, config: str, hook: str, fifo: str, synlb: str, ready_file: str,
                    notify: bool = True, dbus: bool = False, use_fifo: bool = False,
                    example: str | None = None, preempt_delay: float | None = None) -> str:
    """The shipped example, for lab router ``router`` (1 or 2).

    ``notify``: keep the sync group's notify hook; ``dbus``/``use_fifo``:
    uncomment ``enable_dbus`` / the ``notify_fifo`` lines; ``preempt_delay``:
    the example's, or this (a test that fails back many times in a row)."""
    text = example if example is not None else EXAMPLE.read_text()
    for old, new in lab_substitutions(router, config=config, hook=hook, fifo=fifo, synlb=synlb,
                                      ready_file=ready_file):
        if old not in text:
            raise LabError(f"{EXAMPLE}: {old!r} not found; the lab and the example disagree")
        text = text.replace(old, new)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if dbus and s == "#enable_dbus":
            line = line.replace("#enable_dbus", "enable_dbus")
        if use_fifo and s.startswith("#notify_fifo"):
            line = line.replace("#notify_fifo", "notify_fifo", 1)
        if not notify and s.startswith("notify ") and hook in s:
            continue
        if preempt_delay is not None and s.startswith("preempt_delay "):
            line = line.replace(s, f"preempt_delay {preempt_delay:g}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def install_hook(lab: Lab) -> str:
    """Copy hooks/keepalived-notify into the lab dir, root-owned 0755 in
    root-owned 0755 directories, as ``enable_script_security`` requires."""
    d = os.path.join(lab.dir, "hooks")
    os.makedirs(d, mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    dst = os.path.join(d, "keepalived-notify")
    shutil.copyfile(HOOK, dst)
    os.chmod(dst, 0o755)
    return dst


# ---------------------------------------------------------------- the pair

class Pair:
    """lb1 + lb2 with keepalived and synlb; ``source`` is how synlb follows
    keepalived: ``notify`` (hook), ``fifo`` (notify_fifo) or ``dbus``.
    ``synlb`` / ``hook``: the synlb executable and the notify hook to use
    (default: this interpreter's synlb, and hooks/keepalived-notify copied
    into the lab; an installed package's /usr/bin/synlb and
    /usr/lib/synlb/keepalived-notify)."""

    def __init__(self, lab: Lab, *, source: str = "notify", standby: str = "hot",
                 pickup: bool = True, firewall: bool = True, dbus_in_host: bool = False,
                 targets: Iterable[str] | None = None, plugins: str | None = None,
                 extra: Callable[[str], str] | None = None, engine: str | Mapping[str, str] = "nfqueue",
                 flow_hash: str | Mapping[str, str | None] | None = None,
                 synlb: str | None = None, hook: str | None = None, preempt_delay: float | None = None,
                 service_options: str = ""):
        if lab.nrouters != 2:
            raise LabError("a Pair needs a 2-router lab")
        if source not in ("notify", "fifo", "dbus"):
            raise ValueError(f"source must be notify, fifo or dbus, not {source!r}")
        self.lab = lab
        self.source = source
        self.standby = standby
        self.pickup = pickup
        self.firewall = firewall
        self.dbus_in_host = dbus_in_host  # `synlb run` with the dbus plugin, not `synlb dbus`
        self.targets = list(targets or lab.targets)  # the targets the configs list
        self.plugins = plugins  # [synlb] plugins of the routers' `synlb run` (see start_hosts)
        self.extra = extra  # router -> more INI text (sections of those plugins)
        # the service's engine, on every router or per router ({"lb1": "nfqueue", "lb2": "nftables"})
        self.engines = {r: engine if isinstance(engine, str) else engine[r] for r in lab.routers}
        # the service's flow_hash likewise (None: the engine's default)
        self.flow_hashes = {r: flow_hash if flow_hash is None or isinstance(flow_hash, str) else flow_hash[r]
                            for r in lab.routers}
        self.hosts: dict[str, object] = {}
        self.synlb = synlb or synlb_exe()
        self.given_hook = hook
        self.hook = ""
        self.listeners: dict[str, object] = {}
        self.baseline: dict[str, dict] = {}  # router -> snapshot before synlb ever ran
        self.preempt_delay = preempt_delay  # keepalived's, when not the example's
        self.service_options = service_options  # more [service:web] lines (e.g. a smaller table_size)

    # --- files

    def config(self, r: str) -> str:
        return os.path.join(self.lab.role_dir(r), "synlb.ini")

    def state_dir(self, r: str) -> str:
        return os.path.join(self.lab.role_dir(r), "synlb-state")

    def fifo(self, r: str) -> str:
        return os.path.join(self.lab.role_dir(r), "keepalived.fifo")

    def ready_file(self, r: str) -> str:
        """``[vrrp] ready_file``: beside the state dir, in a directory that exists before keepalived starts."""
        return os.path.join(self.lab.role_dir(r), "synlb.ready")

    def env(self) -> dict[str, str]:
        return {"SYNLB_BIN": self.synlb}

    # --- setup

    def prepare(self) -> None:
        """Router baseline (pickup off, firewall), synlb configs, the hook."""
        lab = self.lab
        for r in lab.routers:
            lab.run(r, ["conntrack", "-C"], check=False)  # conntrack sysctls exist from here on
            lab.sysctl(r, {k: 0 for k in PICKUP_SYSCTLS})
            if self.firewall:
                for tool in ("iptables", "ip6tables"):
                    lab.run(r, [tool, *FIREWALL])
            self.write_config(r)
            self.baseline[r] = snapshot(lab, r, self.state_dir(r))
        self.hook = self.given_hook or install_hook(lab)

    def write_config(self, r: str) -> None:
        extra = f"pickup = {'yes' if self.pickup else 'no'}"
        if self.dbus_in_host:
            extra += "\nplugins = lb, dbus"
        elif self.plugins:
            extra += f"\nplugins = {self.plugins}"
        fh = self.flow_hashes[r]
        options = "\n".join(o for o in (f"flow_hash = {fh}" if fh else "", self.service_options) if o)
        text = service_config(self.lab, r, self.targets, ports="80", extra_synlb=extra, engine=self.engines[r],
                              extra_service=options)
        text += f"\n[vrrp]\nsync_group = G1\nstandby = {self.standby}\nready_file = {self.ready_file(r)}\n"
        if self.extra:
            text += self.extra(r)
        with open(self.config(r), "w") as fh:
            fh.write(text)

    def start_hosts(self, timeout: float = 20.0) -> None:
        """``synlb run`` on both routers; returns once their control sockets exist."""
        for r in self.lab.routers:
            self.hosts[r] = self.lab.popen(r, [self.synlb, "--config", self.config(r), "run"],
                                           name="synlb-run")
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(self.state_dir(r), "control.sock")) for r in self.lab.routers):
            dead = [r for r, h in self.hosts.items() if h.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise LabError(f"synlb run did not come up on {dead or 'every router'}; "
                               f"see {[self.lab.log_path(h) for h in self.hosts.values()]}")
            time.sleep(0.1)

    def set_targets(self, targets: Iterable[str], timeout: float = 20.0) -> None:
        """Rewrite both routers' configs for ``targets`` and reload their hosts
        (SIGHUP); returns once both data planes carry them."""
        self.targets = list(targets)
        for r in self.lab.routers:
            self.write_config(r)
            self.hosts[r].send_signal(signal.SIGHUP)
        for r in self.lab.routers:
            self.wait_settled(r, self.expected_active(r), timeout)

    def set_engine(self, engine: str | Mapping[str, str], routers: Iterable[str] | None = None,
                   timeout: float = 20.0) -> None:
        """Switch ``routers`` (default both, in the order given) to ``engine``
        and reload their hosts (SIGHUP); returns once their data planes run it."""
        routers = list(routers or self.lab.routers)
        for r in routers:
            self.engines[r] = engine if isinstance(engine, str) else engine[r]
            self.write_config(r)
            self.hosts[r].send_signal(signal.SIGHUP)
        for r in routers:
            self.wait_settled(r, self.expected_active(r), timeout)

    def host_status(self, r: str) -> dict:
        """The router's ``synlb status --json``."""
        return json.loads(self.lab.run(r, [self.synlb, "--config", self.config(r), "status", "--json"]).stdout)

    def keepalived_text(self, r: str) -> str:
        n = self.lab.routers.index(r) + 1
        return keepalived_conf(n, config=self.config(r), hook=self.hook, fifo=self.fifo(r),
                               synlb=self.synlb, ready_file=self.ready_file(r), notify=self.source == "notify",
                               dbus=self.source == "dbus", use_fifo=self.source == "fifo",
                               preempt_delay=self.preempt_delay)

    def start(self, timeout: float = 20.0) -> None:
        """keepalived on both (lb1 MASTER, lb2 BACKUP), synlb settled on both."""
        self.start_keepalived(self.lab.routers, wait=True)
        for r in self.lab.routers:
            self.wait_settled(r, self.expected_active(r), timeout)

    def start_keepalived(self, routers: Iterable[str], wait: bool = False) -> None:
        routers = list(routers)
        self.lab.start_keepalived(routers, wait=wait, timeout=10.0, env=self.env(),
                                  conf_text=self.keepalived_text, enable_dbus=self.source == "dbus")
        if self.source == "dbus":
            for r in routers:
                self.start_listener(r)

    def start_listener(self, r: str):
        old = self.listeners.get(r)
        if old is not None and old.poll() is None:
            return old
        cmd = ["run"] if self.dbus_in_host else ["dbus", "--wait"]
        p = self.lab.popen(r, [self.synlb, "--config", self.config(r), *cmd],
                           env={"DBUS_SYSTEM_BUS_ADDRESS": self.lab.dbus_address(r)}, name="synlb-dbus")
        self.listeners[r] = p
        return p

    def stop_keepalived(self, r: str) -> None:
        self.lab.stop_keepalived(r)

    def close(self) -> None:
        """synlb down on both routers (the lab's teardown kills the rest)."""
        for r, p in self.listeners.items():
            self.lab.stop_process(p)
        for r, p in self.hosts.items():
            self.lab.stop_process(p)
        for r in self.lab.routers:
            if keepalived_running(self.lab, r):
                self.lab.stop_keepalived(r)
            self.lab.run(r, [self.synlb, "--config", self.config(r), "down"], check=False)

    # --- state

    def vrrp_state(self, r: str) -> str:
        return self.lab.vrrp_state(r)

    def expected_active(self, r: str) -> bool:
        st = self.vrrp_state(r)
        return st == "MASTER" or (st == "BACKUP" and self.standby == "hot")

    def vrrp_log(self, r: str) -> list[dict]:
        from synlb.vrrp import journal
        return journal.read_log(self.state_dir(r))

    def busy(self, r: str) -> bool:
        """An apply holds synlb's lock in this router right now."""
        path = os.path.join(self.state_dir(r), "lock")
        if not os.path.exists(path):
            return False
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def wait_settled(self, r: str, active: bool, timeout: float = 20.0) -> dict:
        """Until the data plane is fully installed (``active``) or fully
        removed, no apply is running and no notify call is pending; returns
        the snapshot."""
        deadline = time.monotonic() + timeout
        stable = 0
        snap: dict = {}
        while True:
            quiet = not self.busy(r) and not _notify_running(self.lab, r)
            snap = snapshot(self.lab, r, self.state_dir(r))
            ok = quiet and shape_ok(snap, active, len(self.targets), self.engines[r],
                                    kernel_slots=self.flow_hashes[r] == "jhash")
            stable = stable + 1 if ok else 0
            if stable >= 2:
                return snap
            if time.monotonic() > deadline:
                raise LabError(f"{r}: data plane not settled {'active' if active else 'inactive'} "
                               f"within {timeout}s: {json.dumps(_shape(snap))}")
            time.sleep(0.15)


def keepalived_running(lab: Lab, r: str) -> bool:
    from .keepalived import keepalived_running as kr
    return kr(lab, r)


def _ns_cmdlines(lab: Lab, r: str) -> dict[int, list[str]]:
    out = {}
    for pid in netns_pids(lab.ns(r)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        out[pid] = argv
    return out


def _notify_running(lab: Lab, r: str) -> bool:
    return any("notify" in argv and any("synlb" in a or "keepalived-notify" in a for a in argv)
               for argv in _ns_cmdlines(lab, r).values())


# ---------------------------------------------------------------- snapshots

def snapshot(lab: Lab, r: str, state_dir: str) -> dict:
    """What synlb may have changed in router ``r``, free of pids and counters:
    the whole ruleset, ip rules, synlb's routes (proto 229), the pickup
    sysctls, workers (from pid files and from the processes actually
    running), bound NFQUEUEs, and whether synlb recorded itself as applied."""
    import re

    def ruleset(text):
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", ln) for ln in text.splitlines()
                         if not ln.startswith("#"))

    # one process in the namespace for every reading: a snapshot is taken
    # several times a second while a test waits for the data plane to settle
    readings = {
        "queues": "cat /proc/net/netfilter/nfnetlink_queue",
        "iptables": "iptables-save", "ip6tables": "ip6tables-save",
        # names only: `nft list ruleset` would print the 65537 slots of the engine's table
        "nft_tables": "nft list tables",
        "rules4": "ip -4 rule show", "rules6": "ip -6 rule show",
        "routes4": "ip -4 route show table all proto 229", "routes6": "ip -6 route show table all proto 229",
        **{f"sysctl {k}": f"sysctl -n {k}" for k in PICKUP_SYSCTLS},
    }
    marker = "@@synlb-snapshot@@"
    script = "; ".join(f"echo '{marker} {name}'; {cmd} || exit 1" for name, cmd in readings.items())
    got: dict[str, list[str]] = {}
    current = None
    for line in lab.run(r, ["sh", "-c", script]).stdout.splitlines():
        if line.startswith(marker + " "):
            current = got.setdefault(line[len(marker) + 1:], [])
        elif current is not None:
            current.append(line)

    def out(name):
        return "".join(ln + "\n" for ln in got.get(name, []))

    procs = _ns_cmdlines(lab, r)
    worker_procs = sorted(next((a for a in argv if a.startswith("--queue=")), "?")
                          for argv in procs.values() if "worker" in argv and any("synlb" in a for a in argv))
    pidfile_workers = []
    if os.path.isdir(state_dir):
        for name in sorted(os.listdir(state_dir)):
            if name.startswith("worker-") and name.endswith(".pid"):
                try:
                    with open(os.path.join(state_dir, name)) as fh:
                        w = json.load(fh)
                except (OSError, ValueError):
                    continue
                alive = w.get("pid") in procs and "worker" in procs[w["pid"]]
                pidfile_workers.append(f"{w.get('service')}/{w.get('queue')}{'' if alive else ' (dead)'}")
    queues = []
    for line in out("queues").splitlines():
        f = line.split()
        if len(f) >= 2 and f[1] != "0":
            queues.append(int(f[0]))
    return {
        "iptables": ruleset(out("iptables")),
        "ip6tables": ruleset(out("ip6tables")),
        "nft_tables": out("nft_tables"),
        "rules4": out("rules4"),
        "rules6": out("rules6"),
        "routes4": out("routes4"),
        "routes6": out("routes6"),
        "sysctl": {k: out(f"sysctl {k}").strip() for k in PICKUP_SYSCTLS},
        "workers": pidfile_workers,
        "worker_procs": worker_procs,
        "queues": sorted(queues),
        "applied": os.path.exists(os.path.join(state_dir, "applied.json")),
    }


def _shape(snap: dict) -> dict:
    return {"applied": snap.get("applied"), "workers": snap.get("workers"),
            "worker_procs": snap.get("worker_procs"), "queues": snap.get("queues"),
            "synlb_chains": "synlb-" in snap.get("iptables", ""),
            "nft_table": NFT_TABLE in snap.get("nft_tables", ""),
            "routes": bool(snap.get("routes4")), "sysctl": snap.get("sysctl")}


NFT_TABLE = "table inet synlb"


def shape_ok(snap: dict, active: bool, targets: int = 3, engine: str = "nfqueue",
             kernel_slots: bool = False) -> bool:
    """Fully installed or fully removed (not the exact content: see snapshot
    equality). ``kernel_slots``: the nfqueue engine with flow_hash = jhash,
    whose slot chain lives in the nftables table."""
    if active:
        routes = (snap["routes4"].count("default via") == targets
                  and snap["routes6"].count("default via") == targets)
        if engine == "nftables":  # no worker, no queue, no iptables chain: the kernel table
            return (snap["applied"] and not snap["workers"] and not snap["worker_procs"] and not snap["queues"]
                    and NFT_TABLE in snap["nft_tables"] and "synlb-" not in snap["iptables"] and routes)
        return (snap["applied"] and snap["workers"] == ["web/0"] and snap["worker_procs"] == ["--queue=0"]
                and snap["queues"] == [0] and "synlb-" in snap["iptables"] and "synlb-" in snap["ip6tables"]
                and (NFT_TABLE in snap["nft_tables"]) == kernel_slots and routes)
    return (not snap["applied"] and not snap["workers"] and not snap["worker_procs"] and not snap["queues"]
            and "synlb-" not in snap["iptables"] and "synlb-" not in snap["ip6tables"]
            and NFT_TABLE not in snap["nft_tables"]
            and not snap["routes4"].strip() and not snap["routes6"].strip())


# ---------------------------------------------------------------- sessions

def start_sessions(lab: Lab, count: int, patterns: Iterable[str] = PATTERNS,
                   families: Iterable[int] = FAMILIES, duration: float = 60.0) -> dict:
    """Every pattern x family at once, ``count`` sessions each, to the VIP;
    waits until all are connected. Returns {(pattern, family): Sessions}."""
    handles = {}
    for p in patterns:
        for fam in families:
            handles[(p, fam)] = lab.start_sessions(A.VIP[fam], p, count=count, duration=duration,
                                                   stall=2.0, connect_timeout=5.0, **PATTERN_ARGS[p])
    for key, h in handles.items():
        ready = h.wait_ready(15)
        if ready.get("connected") != count:
            raise LabError(f"sessions {key}: only {ready.get('connected')} of {count} connected: {ready}")
    return handles


def stop_sessions(handles: dict) -> dict:
    """SIGTERM every client, collect the results: {(pattern, family): result}."""
    for h in handles.values():
        if h.proc.poll() is None:
            os.kill(h.proc.pid, 15)
    return {k: h.result(30) for k, h in handles.items()}


def summarize(results: dict) -> dict:
    """Per pattern/family and overall: sessions, kept, moved, longest gap."""
    per = {}
    for (p, fam), res in sorted(results.items()):
        s = res["summary"]
        per[f"{p}/v{fam}"] = {"sessions": res["count"], "kept": s["survived"], "moved": s["moved"],
                              "max_gap": s["max_gap"], "max_delay": s.get("max_delay", 0.0),
                              "errors": s["errors"]}
    total = {
        "sessions": sum(v["sessions"] for v in per.values()),
        "kept": sum(v["kept"] for v in per.values()),
        "moved": sum(v["moved"] for v in per.values()),
        "max_gap": max((v["max_gap"] for v in per.values()), default=0.0),
        "max_delay": max((v["max_delay"] for v in per.values()), default=0.0),
    }
    return {"per": per, **total}


# ---------------------------------------------------------------- failover steps

def fail_over(pair: Pair, how: str, timeout: float = 10.0) -> dict:
    """Fail lb1 (MASTER) over to lb2: ``links`` (its links down) or
    ``keepalived`` (its keepalived stopped). Returns timings."""
    lab = pair.lab
    t0 = time.monotonic()
    if how == "links":
        lab.fail_links("lb1")
    elif how == "keepalived":
        pair.stop_keepalived("lb1")
    else:
        raise ValueError(how)
    took = lab.wait_state("lb2", "MASTER", timeout)
    pair.wait_settled("lb2", True, timeout)
    pair.wait_settled("lb1", False, timeout)
    return {"takeover": round(took, 3), "settled": round(time.monotonic() - t0, 3)}


def fail_back(pair: Pair, how: str, timeout: float = 15.0) -> dict:
    """Undo ``fail_over``: links up again or keepalived started again; lb1
    takes over after its preempt delay."""
    lab = pair.lab
    t0 = time.monotonic()
    if how == "links":
        lab.restore_links("lb1")
    else:
        pair.start_keepalived(["lb1"])
    took = lab.wait_state("lb1", "MASTER", timeout + PREEMPT_DELAY)
    lab.wait_state("lb2", "BACKUP", timeout)
    pair.wait_settled("lb1", True, timeout)
    pair.wait_settled("lb2", pair.standby == "hot", timeout)
    return {"takeover": round(took, 3), "settled": round(time.monotonic() - t0, 3)}


def run_failover(pair: Pair, how: str, count: int, patterns=PATTERNS, families=FAMILIES,
                 hold: float = 1.0, back: bool = True) -> dict:
    """Sessions of every pattern running across fail_over(how) (and fail_back)."""
    handles = start_sessions(pair.lab, count, patterns, families)
    try:
        time.sleep(hold)
        steps = {"over": fail_over(pair, how)}
        time.sleep(hold)
        if back:
            steps["back"] = fail_back(pair, how)
            time.sleep(hold)
    finally:
        results = stop_sessions(handles)
    return {"how": how, "steps": steps, **summarize(results), "results": results}


# ---------------------------------------------------------------- the demo

def _report(out: Callable, title: str, res: dict) -> None:
    out(f"\n{title}")
    for name, step in res["steps"].items():
        out(f"  fail {name}: new master in {step['takeover']:.2f} s, synlb settled on both routers "
            f"after {step['settled']:.2f} s")
    out(f"  {'pattern':<9} {'sessions':>8} {'kept':>5} {'moved':>6} {'longest gap':>12} {'data held up':>13}")
    for key, v in res["per"].items():
        out(f"  {key:<9} {v['sessions']:>8} {v['kept']:>5} {v['moved']:>6} {v['max_gap']:>10.3f} s "
            f"{v['max_delay']:>11.3f} s")
    out(f"  total: {res['kept']}/{res['sessions']} sessions kept, {res['moved']} changed target, "
        f"longest gap {res['max_gap']:.3f} s (limit {GAP_LIMIT:.2f} s = 3 x advert_int + 0.5; "
        f"it includes each pattern's own pause), data held up at most {res['max_delay']:.3f} s")


def run_failover_demo(out: Callable = print, count: int = 20) -> dict:
    """Build the 2-router lab (keepalived + synlb on both, notify hook, hot
    standby), run ``count`` sessions per pattern and family, fail the master
    over by taking its links down and by stopping its keepalived, fail back
    each time; print and return what the sessions saw."""
    result: dict = {"ok": False}
    with Lab(routers=2, targets=3, server_ports=(80,)) as lab:
        pair = Pair(lab)
        pair.prepare()
        out(f"lab {lab.prefix}: client -> lb1|lb2 (keepalived G1 + synlb, hot standby) -> t1 t2 t3")
        out(f"keepalived.conf: {EXAMPLE.name} with lab addresses; notify hook {pair.hook}")
        pair.start()
        out(f"lb1 {pair.vrrp_state('lb1')}, lb2 {pair.vrrp_state('lb2')}; synlb active on both")
        out(f"{count} sessions per pattern (echo: client first, push: server first after idle, "
            f"down, up) and family (IPv4, IPv6): {count * len(PATTERNS) * len(FAMILIES)} sessions")
        for how, title in (("links", "failover 1: the master's links go down, then come back"),
                           ("keepalived", "failover 2: the master's keepalived stops, then starts again")):
            res = run_failover(pair, how, count)
            _report(out, title, res)
            res.pop("results")
            result[how] = res
        pair.close()
    result["ok"] = all(result[h]["kept"] == result[h]["sessions"] and result[h]["moved"] == 0
                       and result[h]["max_gap"] <= GAP_LIMIT for h in ("links", "keepalived"))
    out(f"\nfailover demo: {'every session kept its target' if result['ok'] else 'FAILED'}")
    return result
