"""The nftables engine in the netns lab: Maglev in the kernel (docs/ENGINES.md).

One router; the service's packets never reach user space (no worker, no
queue): every packet without a conntrack mark is hashed by the kernel,
connections keep their mark in conntrack.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from synlb import config as config_mod
from synlb import conntrack, health_state, pins, pins_state
from synlb_lab import addresses as A
from synlb_lab.scenario import kernel_snapshot, render_service_config, status, synlb, write_config
from synlb_lab.topology import Lab
from synlb.packet import key_of

pytestmark = pytest.mark.lab(tools=("ip", "nft", "iptables", "conntrack"))

CONNS = 150
FLOWS = 90


@pytest.fixture(scope="module")
def lab(open_module_lab):
    return open_module_lab(Lab, routers=1)


@pytest.fixture
def clean(lab):
    """Every test starts and ends with synlb down and the router as the lab built it
    (`nft list ruleset`, iptables-save, ip rules, routes, sysctls)."""
    before = kernel_snapshot(lab, "lb1")
    yield before
    for name in os.listdir(lab.role_dir("lb1")):
        if name.endswith(".ini"):
            synlb(lab, "lb1", os.path.join(lab.role_dir("lb1"), name), "down", check=False)
    health_state.clear(state_dir(lab))
    pins_state.clear(state_dir(lab))
    assert kernel_snapshot(lab, "lb1") == before


def state_dir(lab) -> str:
    return os.path.join(lab.role_dir("lb1"), "synlb-state")


def nft_config(lab, name="nft.ini", **kw) -> str:
    kw.setdefault("protocols", "tcp, udp")
    return write_config(lab, "lb1", name=name, engine="nftables", **kw)


def chains(st: dict) -> dict:
    return {c["family"]: c for c in st["chains"]}


def assert_kernel_picks_are_the_python_ones(lab, conf: str, down=()) -> int:
    """Every connection conntrack holds for the VIP carries the mark that
    jhash.kernel_slot and the Maglev table predict: the kernel's hash is
    the one the docs describe (and the one pins are judged by)."""
    cfg = config_mod.load(conf)
    table = pins.ServiceTable.build(cfg, cfg.service("web"), down)
    n = 0
    for fam in ("ipv4", "ipv6"):
        for e in conntrack.parse(lab.run("lb1", ["conntrack", "-L", "-f", fam]).stdout):
            if e.dst not in (A.VIP[4], A.VIP[6]) or not e.mark:
                continue
            assert e.mark == table.pick(key_of(e.proto, e.src, e.dst, e.sport, e.dport)), e
            n += 1
    return n


def balance_both_families(lab) -> dict[int, int]:
    """CONNS TCP connections and FLOWS UDP flows (3 datagrams each) per IP
    version through the VIP: all answered, spread over t1..t3, no UDP flow
    moved or lost. Returns how many distinct flows that made per family: a
    client port the kernel gives twice in a batch (its first connection's
    TIME_WAIT allows it) is one flow to conntrack, hashed once."""
    made = {}
    for family in (4, 6):
        res = lab.open_connections(A.VIP[family], count=CONNS, concurrency=15)
        assert res["ok"] == CONNS, res["errors"]
        assert sorted(res["per_target"]) == ["t1", "t2", "t3"]
        assert all(25 <= n <= 75 for n in res["per_target"].values()), res["per_target"]
        udp = lab.udp_flows(A.VIP[family], count=FLOWS, rounds=3)
        assert udp["ok"] == FLOWS and udp["moved"] == 0 and udp["lost"] == 0, udp["errors"]
        assert sorted(udp["per_target"]) == ["t1", "t2", "t3"], udp["per_target"]
        made[family] = res["client_ports"] + len({f["sport"] for f in udp["flows"]})
    return made


def test_balances_tcp_and_udp_over_both_families_in_the_kernel(lab, clean):
    conf = nft_config(lab)
    dry = synlb(lab, "lb1", conf, "up", "--dry-run").stdout
    assert "table inet synlb {" in dry and "# slots_web: 65537 elements" in dry
    out = synlb(lab, "lb1", conf, "up").stdout
    assert "nftables: installed table inet synlb" in out, out
    made = balance_both_families(lab)
    st = status(lab, "lb1", conf)
    assert not [q for s in st["services"] for q in s["queues"]]  # no worker, no queue
    assert not lab.run("lb1", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.strip()
    # Every flow conntrack holds got the kernel's pick; a client port the kernel
    # reuses within the batch meets its predecessor's TIME_WAIT entry and
    # keeps that mark (one flow to conntrack, hashed once): the client counts them.
    flows = assert_kernel_picks_are_the_python_ones(lab, conf)
    assert flows >= sum(made.values()), made
    for family, c in chains(st).items():
        assert c["engine"] == "nftables" and c["queued_pkts"] == 0
        # the opening packets (and the UDP flows' first datagrams) were hashed in the kernel...
        assert c["hashed_pkts"] >= made[family], (c, made)
        # ...and everything after them restored its mark from conntrack
        assert c["kept_in_kernel_pkts"] >= 3 * CONNS + 2 * FLOWS, c
    assert sum(c["hashed_pkts"] for c in st["chains"]) >= flows
    picks = {t["name"]: t["kernel_picks"] for t in st["services"][0]["targets"]}
    assert sum(picks.values()) == sum(c["hashed_pkts"] for c in st["chains"]) and min(picks.values()) > 0
    assert sum(t["connections"] for t in st["services"][0]["targets"]) >= flows
    text = synlb(lab, "lb1", conf, "status").stdout
    assert "inet synlb svc4_web" in text and "engine nftables" in text
    synlb(lab, "lb1", conf, "down")


def test_nat_mode(lab, clean):
    conf = nft_config(lab, mode="nat", protocols="tcp")
    synlb(lab, "lb1", conf, "up")
    for family in (4, 6):
        res = lab.open_connections(A.VIP[family], count=60, concurrency=10)
        assert res["ok"] == 60 and sorted(res["per_target"]) == ["t1", "t2", "t3"], res
    synlb(lab, "lb1", conf, "down")


def test_up_twice_changes_nothing_and_foreign_rules_survive(lab, clean):
    foreign = ["table inet router {\n chain input {\n type filter hook input priority 0; policy accept;\n"
               " tcp dport 22 counter accept\n }\n}\n",
               "table ip mangle2 {\n chain pre {\n type filter hook prerouting priority -150;\n"
               " meta mark 0x77 counter\n }\n}\n"]
    for text in foreign:
        lab.run("lb1", ["nft", "-f", "-"], input=text)
    try:
        with_foreign = kernel_snapshot(lab, "lb1")
        conf = nft_config(lab)
        synlb(lab, "lb1", conf, "up")
        assert lab.open_connections(A.VIP[4], count=30)["ok"] == 30
        first = kernel_snapshot(lab, "lb1")
        assert synlb(lab, "lb1", conf, "up").stdout.strip() == "up: nothing to change"
        assert kernel_snapshot(lab, "lb1") == first
        assert "table inet router" in first["nft"] and "table inet synlb" in first["nft"]
        synlb(lab, "lb1", conf, "down")
        assert kernel_snapshot(lab, "lb1") == with_foreign
    finally:
        for t in ("inet router", "ip mangle2"):
            lab.run("lb1", ["nft", "delete", "table", *t.split()], check=False)


def test_picked_up_connection_is_hashed_to_the_same_target(lab, clean):
    """Conntrack forgets every connection: their next packets are hashed
    again in the kernel (no SYN, no worker) and reach the same target."""
    conf = nft_config(lab, protocols="tcp")
    synlb(lab, "lb1", conf, "up")
    handles = [lab.start_sessions(A.VIP[f], pattern="echo", count=10, duration=4.0) for f in (4, 6)]
    for h in handles:
        h.wait_ready(10)
    lab.run("lb1", ["conntrack", "-F"], check=False)
    for h in handles:
        res = h.result(20)
        assert res["summary"]["survived"] == 10 and res["summary"]["moved"] == 0, res["summary"]
    synlb(lab, "lb1", conf, "down")


def test_a_pickup_follows_the_configured_table_with_a_target_down(lab, clean):
    """t3 down in this router's view (the health plugin's file) while
    sessions run on all three: conntrack forgets every connection, and each
    next packet, a pickup, is hashed over every configured target, not the
    view: every session reaches its target again, and every re-made entry
    carries the configured table's mark (what pins are judged by)."""
    conf = nft_config(lab, protocols="tcp")
    synlb(lab, "lb1", conf, "up")
    handles = [lab.start_sessions(A.VIP[f], pattern="echo", count=15, duration=4.0) for f in (4, 6)]
    for h in handles:
        h.wait_ready(10)
    health_state.write_down(state_dir(lab), {"web": ["t3"]})
    synlb(lab, "lb1", conf, "up")  # what the health plugin's reconcile does
    lab.run("lb1", ["conntrack", "-F"], check=False)
    time.sleep(0.5)
    picked = assert_kernel_picks_are_the_python_ones(lab, conf)
    results = [h.result(20) for h in handles]
    for res in results:
        assert res["summary"]["survived"] == 15 and res["summary"]["moved"] == 0, res["summary"]
    assert picked >= 25 and "t3" in {t for r in results for s in r["sessions"] for t in s["targets"]}
    counters = lab.run("lb1", ["nft", "list", "counters", "table", "inet", "synlb"]).stdout
    assert re.search(r"counter pickup4_web \{\s+packets [1-9]", counters), counters
    synlb(lab, "lb1", conf, "down")


def test_pins_reach_the_kernel_map(lab, clean):
    """Pins in the state dir (what the sync plugin writes) go into the pins
    maps; a picked-up connection follows its pin, a new one the table."""
    conf = nft_config(lab, protocols="tcp")
    cfg = config_mod.load(conf)
    synlb(lab, "lb1", conf, "up")
    lab.run("lb1", ["conntrack", "-F"], check=False)  # the earlier tests' closed connections
    sessions = lab.start_sessions(A.VIP[4], pattern="echo", count=6, duration=6.0)
    sessions.wait_ready(10)
    entries = [e for e in conntrack.parse(lab.run("lb1", ["conntrack", "-L", "-f", "ipv4"]).stdout)
               if e.dst == A.VIP[4] and e.mark]
    assert len(entries) == 6
    # pin every session to the target it is on (a no-op for routing, but every
    # picked-up packet must now come out of the pins map, not the jhash)
    found = {"web": {key_of(e.proto, e.src, e.dst, e.sport, e.dport): e.mark for e in entries}}
    pins_state.write(state_dir(lab), found)
    out = synlb(lab, "lb1", conf, "up").stdout
    assert "nftables: updated targets or pins" in out, out
    listed = lab.run("lb1", ["nft", "list", "map", "inet", "synlb", "pins4_web"]).stdout
    assert listed.count(f"{A.VIP[4]} . 80 : 0x") == 6, listed
    before = chains(status(lab, "lb1", conf))[4]["pinned_pkts"]
    lab.run("lb1", ["conntrack", "-F"], check=False)
    res = sessions.result(20)
    assert res["summary"]["survived"] == 6 and res["summary"]["moved"] == 0, res["summary"]
    assert chains(status(lab, "lb1", conf))[4]["pinned_pkts"] >= before + 6
    # new connections are hashed, pins or not
    assert lab.open_connections(A.VIP[4], count=30)["ok"] == 30
    assert cfg.service("web").engine == "nftables"
    synlb(lab, "lb1", conf, "down")


# ---------------------------------------------------------------- health flips

def many_targets(lab, n: int) -> list[tuple[str, str, str]]:
    """``n`` configured targets over the lab's 3 servers (target i on server i % 3)."""
    real = [(lab.addr(t, 4), lab.addr(t, 6)) for t in lab.targets]
    return [(f"x{i:03d}", *real[i % len(real)]) for i in range(n)]


def _change_line(out: str) -> tuple[int, float, float]:
    m = re.search(r"nftables: updated web: (\d+) slots in one transaction: (\d+) ms \(kernel\), (\d+) ms in all",
                  out)
    assert m, out
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def test_health_flip_of_100_targets_under_traffic(lab, clean):
    """100 targets, M = 65537: one target out and back, twice, while
    sessions run and new connections keep coming. Each flip is one
    transaction of the ~1% differing slots; no connection fails, no
    session moves."""
    targets = many_targets(lab, 100)
    text = render_service_config(state_dir(lab), targets, engine="nftables", ports="80",
                                 marks={name: 0x1000 + i for i, (name, _, _) in enumerate(targets)})
    conf = write_config(lab, "lb1", text=text, name="many.ini")
    t0 = time.monotonic()
    out = synlb(lab, "lb1", conf, "up", timeout=120).stdout
    first_up = time.monotonic() - t0
    assert "installed table inet synlb (1 services, 65537 slots)" in out, out
    sessions = [lab.start_sessions(A.VIP[f], pattern="echo", count=15, duration=30.0) for f in (4, 6)]
    for s in sessions:
        s.wait_ready(15)
    conns = {"ok": 0, "count": 0, "errors": {}, "rounds": 0}
    stop = threading.Event()

    def load() -> None:  # new connections all along, until the last flip is applied
        while not stop.is_set() and conns["rounds"] < 100:
            res = lab.open_connections(A.VIP[4], count=200, concurrency=6, timeout=5.0)
            conns["ok"] += res["ok"]
            conns["count"] += res["count"]
            conns["rounds"] += 1
            for k, v in res["errors"].items():
                conns["errors"][k] = conns["errors"].get(k, 0) + v

    loader = threading.Thread(target=load)
    loader.start()
    flips = []
    try:
        for down in (["x042"], [], ["x017"], []):
            time.sleep(0.7)
            health_state.write_down(state_dir(lab), {"web": down})
            flips.append((down, _change_line(synlb(lab, "lb1", conf, "up").stdout)))
    finally:
        stop.set()
        loader.join(120)
        results = [s.stop() for s in sessions]
    print(f"\n100 targets, M=65537: first up {first_up:.2f} s; flips (slots, kernel ms, nft reconcile ms): "
          f"{[f for _, f in flips]}; new connections meanwhile {conns.get('ok')}/{conns.get('count')} "
          f"in {conns['rounds']} rounds")
    for down, (slots, kernel_ms, _) in flips:
        assert 600 <= slots <= 1400, (down, slots)  # ~1/100 of the slots, and Maglev's knock-on moves
    assert conns["rounds"] >= 4 and conns["ok"] == conns["count"], conns
    for res in results:
        assert res["summary"]["survived"] == 15 and res["summary"]["moved"] == 0, res["summary"]
    synlb(lab, "lb1", conf, "down", timeout=120)


def check_finds_the_table_deleted_and_up_repairs_it(lab, conf: str) -> None:
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0
    lab.run("lb1", ["nft", "delete", "table", "inet", "synlb"])
    r = synlb(lab, "lb1", conf, "status", "--check", check=False)
    assert r.returncode == 1 and "nftables: missing table inet synlb" in r.stdout.splitlines(), r.stdout
    synlb(lab, "lb1", conf, "up")
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0


def test_status_check_covers_the_nftables_table(lab, clean):
    conf = nft_config(lab)
    synlb(lab, "lb1", conf, "up")
    check_finds_the_table_deleted_and_up_repairs_it(lab, conf)
    synlb(lab, "lb1", conf, "down")
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0


def test_nfqueue_workers_on_the_kernels_hash_pick_as_the_nftables_engine(lab, clean):
    """flow_hash = jhash on the nfqueue engine: the kernel hands the worker
    each new connection's slot (table inet synlb, chain slot_prerouting)
    and the worker only looks it up. Every connection conntrack holds has
    the mark the nftables engine's hash gives it, the worker hashed nothing
    itself, status --check covers the slot chain, and down leaves the router
    as it was (the clean fixture)."""
    import json

    from synlb import statedir
    lab.run("lb1", ["conntrack", "-F"], check=False)  # no entry of an earlier test's marks
    conf = write_config(lab, "lb1", name="slots.ini", protocols="tcp, udp", extra_service="flow_hash = jhash")
    out = synlb(lab, "lb1", conf, "up").stdout
    assert "nftables: installed table inet synlb (0 services, 0 slots)" in out, out
    made = balance_both_families(lab)
    flows = assert_kernel_picks_are_the_python_ones(lab, conf)
    assert flows >= sum(made.values()), made

    def stats(packets: int = 0) -> dict:
        """The worker's stats file, once it counts ``packets`` (it is
        rewritten once a second; 5 s at most)."""
        deadline = time.monotonic() + 5
        while True:
            with open(statedir.worker_stats(state_dir(lab), 0)) as fh:
                st = json.load(fh)
            if st["packets"] >= packets or time.monotonic() > deadline:
                return st
            time.sleep(0.2)
    st = stats(flows)
    assert st["flow_hash"] == "jhash" and st["unslotted"] == 0 and st["packets"] >= flows, st
    check_finds_the_table_deleted_and_up_repairs_it(lab, conf)
    # an untracked SYN (track_syn = no: a router behind ECMP) gets its slot too
    write_config(lab, "lb1", name="slots.ini", protocols="tcp", extra_service="flow_hash = jhash\ntrack_syn = no")
    synlb(lab, "lb1", conf, "up")
    before = stats()
    assert lab.open_connections(A.VIP[4], count=30, concurrency=5)["ok"] == 30
    st = stats(before["packets"] + 60)
    # each connection's SYN (untracked) and first ACK (picked up) reached the worker, each with its slot
    assert st["packets"] >= before["packets"] + 60 and st["unslotted"] == before["unslotted"], (before, st)
    # back to the worker's own hash: the worker binds anew, the slot chain goes
    write_config(lab, "lb1", name="slots.ini", protocols="tcp, udp")
    out = synlb(lab, "lb1", conf, "up").stdout
    assert "stopped worker queue 0" in out and "flow_hash is now blake2b" in out and "started worker queue 0" in out
    assert "nftables: deleted table inet synlb" in out, out
    assert lab.open_connections(A.VIP[4], count=30, concurrency=5)["ok"] == 30
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0
    synlb(lab, "lb1", conf, "down")
