"""Active-active with BGP (synlb_lab.bgp): three routers, each running FRR
and `synlb run` (lb, sync, bgp; track_syn = no), announce the VIPs over
eBGP to an upstream router (FRR, ECMP, BFD 3 x 100 ms); the targets' replies
go through lb1, so lb2 and lb3 see one direction only (or, in the
"replies through any router" tests, over an ECMP default route on the
targets, so every router sees either direction of flows it never saw
open). Sessions through all routers, IPv4 and IPv6: echo and upload, and
in the router-leaves / router-joins / health tests every pattern (echo,
server-first after idle, download, upload), on both engines."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from synlb_lab import frr
from synlb_lab.bgp import (
    BgpLab,
    bgp_configs,
    bgp_status,
    flow_directions,
    packet_counts,
    stop_host_watching,
    user_space_share,
    wait_pins_everywhere,
)
from synlb_lab.demo_failover import start_sessions, stop_sessions, summarize
from synlb_lab.ecmp import (
    flows_by_router,
    reload_router,
    run_target_added_then_router_leaves,
    start_host,
    status,
    stop_host,
    vip_chain_packets,
    wait_targets_installed,
)
from synlb_lab.netns import list_netns
from synlb_lab.scenario import synlb
from synlb.plugins.sync import AGAIN_AFTER

pytestmark = pytest.mark.lab(tools=("vtysh", "conntrack", "nft"))  # FRR (apt-get install frr)

COUNT = 20  # sessions per pattern and family
PATTERNS = ("echo", "up")
ALL_PATTERNS = ("echo", "push", "down", "up")  # push: the server speaks first, after the client went idle
FAMILIES = (4, 6)
ENGINES = ("nfqueue", "nftables")
ONE_WAY = ("lb2", "lb3")  # with the replies through lb1, these see the client's direction only
# nfqueue, track_syn = no: the share of a router's packets that reach user space in a window that
# includes the connections' opening (2 packets each; measured 3-8 % over the first second)
USER_SHARE_MAX = 0.25


@contextlib.contextmanager
def bgp_lab(**kw):
    with BgpLab(routers=3, targets=3, server_ports=(80,), **kw) as lab:
        try:
            yield lab
        finally:
            # every host withdraws, drains and tears down at once (before FRR stops with the lab)
            for proc in lab.hosts.values():
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
            for r in list(lab.hosts):
                stop_host(lab, r)
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix + "-")]
    assert lab.leftovers() == {"namespaces": [], "processes": []}


def start_all(lab, confs, routers=None) -> float:
    """synlb run on the routers; the seconds until up routes to all of them."""
    routers = list(routers or confs)
    t0 = time.monotonic()
    for r in routers:
        start_host(lab, r, confs[r])
    lab.wait_upstream(routers)
    return time.monotonic() - t0


def report(title: str, res: dict) -> None:
    print(f"\n{title}: {res['kept']}/{res['sessions']} kept, {res['moved']} moved, "
          f"data held up at most {res['max_delay']:.3f} s, longest gap {res['max_gap']:.3f} s")
    for k, v in res["per"].items():
        print(f"  {k:<8} kept {v['kept']}/{v['sessions']} moved {v['moved']} delay {v['max_delay']:.3f} "
              f"{v['errors']}")


def assert_all_kept(res: dict, patterns=PATTERNS) -> None:
    bad = {k: v for k, v in res["per"].items() if v["kept"] != v["sessions"] or v["moved"]}
    assert not bad, bad
    assert res["sessions"] == COUNT * len(patterns) * len(FAMILIES)


def wait_plugins(lab, conf, pred, timeout: float = 10.0) -> dict:
    """The router's plugins' status once ``pred(plugins)`` holds (or at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        plugins = status(lab, conf.router, conf)["host"]["plugins"]
        if pred(plugins) or time.monotonic() > deadline:
            return plugins
        time.sleep(0.1)


def counts(lab, confs, routers=None) -> dict:
    return {r: packet_counts(lab, r) for r in (routers or lab.routers)}


def report_share(title: str, before: dict, after: dict) -> dict:
    """Print and return each router's user-space share between two counts."""
    share = {r: user_space_share(before[r], after[r]) for r in after}
    print(f"  {title}: " + "; ".join(
        f"{r} {s['user']}/{s['total']} packets in user space ({s['share']:.2%})" for r, s in share.items()))
    return share


def assert_engine_share(engine: str, share: dict) -> None:
    """nftables: no packet ever reaches user space; nfqueue with track_syn =
    no: the first packets of a connection (or of a pickup) only."""
    for r, s in share.items():
        assert s["total"] > 0, (r, s)
        if engine == "nftables":
            assert s["user"] == 0, (r, s)
        else:
            assert 0 < s["share"] < USER_SHARE_MAX, (r, s)


@pytest.mark.parametrize("engine", ENGINES)
def test_links_down_bfd_reconverges_and_every_session_is_kept(engine):
    """lb2's links go down (its side only: up's link stays up): BFD tells up,
    which drops lb2's nexthops; its flows go to lb1 and lb3, which pick them
    up to the same targets. Every session pattern, both families; the share
    of packets that reach user space on the routers that see one direction."""
    with bgp_lab() as lab:
        confs = bgp_configs(lab, targets=lab.targets, engine=engine)
        announced = start_all(lab, confs)
        st = bgp_status(lab, "lb2", confs["lb2"])
        assert st["announced"] == ["10.64.100.1/32", "fd64:100::1/128"], st
        assert "announced 10.64.100.1/32, fd64:100::1/128; 2/2 BGP sessions established" in st["summary"] \
            or st["summary"].startswith("announced 10.64.100.1/32, fd64:100::1/128"), st["summary"]
        text = synlb(lab, "lb2", confs["lb2"].path, "status").stdout
        assert "  bgp: announced 10.64.100.1/32, fd64:100::1/128" in text, text

        c0 = counts(lab, confs, ONE_WAY)
        handles = start_sessions(lab, COUNT, ALL_PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            c1 = counts(lab, confs, ONE_WAY)
            seen0 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
            took = lab.router_leave("lb2")
            time.sleep(2.0)
            c2 = counts(lab, confs, ["lb3"])
            seen1 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
        finally:
            res = summarize(stop_sessions(handles))
        report(f"{engine}: hosts up and announced in {announced:.2f} s; lb2's links down, up reconverged "
               f"(BFD 3 x {lab.bfd_interval_ms} ms) in {took:.3f} s", res)
        steady = report_share("sessions opened and running 1 s, one-direction routers", c0, c1)
        leave = report_share("the 2 s after lb2 left (lb3 picks up lb2's flows)", {"lb3": c1["lb3"]}, c2)
        print("  user-space packets per connection opened on lb2, lb3: " + ", ".join(
            f"{steady[r]['user'] / max(1, sum(len(seen0[f][r]) for f in FAMILIES)):.2f}" for r in ONE_WAY))
        assert took < 1.0, took
        assert_all_kept(res, ALL_PATTERNS)
        for fam in FAMILIES:
            assert seen0[fam]["lb2"], fam  # lb2 carried flows of both families
            moved = sum(len(seen1[fam][r] - seen0[fam][r]) for r in ("lb1", "lb3"))
            print(f"  IPv{fam}: flows per router before {[len(seen0[fam][r]) for r in lab.routers]}, "
                  f"{moved} came to lb1/lb3")
            assert moved > 0
        assert res["max_delay"] < 1.0, res["max_delay"]
        assert_engine_share(engine, steady)
        assert_engine_share(engine, leave)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_router_joins_and_every_session_is_kept(engine):
    """lb3 starts with no FRR and no synlb; sessions run through lb1 and lb2;
    then FRR and synlb start on lb3: its bgp plugin announces once its data
    plane is up, ECMP gives it some of the running flows, which it picks up
    to the same targets. Every session pattern, both families."""
    with bgp_lab(frr_routers=["lb1", "lb2"]) as lab:
        confs = bgp_configs(lab, targets=lab.targets, engine=engine)
        start_all(lab, confs, ["lb1", "lb2"])
        assert lab.announced_by(4) == lab.announced_by(6) == ["lb1", "lb2"]
        handles = start_sessions(lab, COUNT, ALL_PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            before = vip_chain_packets(lab, "lb3")
            took = lab.router_join("lb3", before_nexthop=lambda r: start_host(lab, r, confs[r]))
            time.sleep(2.0)
            c1 = counts(lab, confs, ["lb3"])
            seen = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
        finally:
            res = summarize(stop_sessions(handles))
        report(f"{engine}: FRR and synlb started on lb3, up routed to it {took:.3f} s after its host "
               f"answered", res)
        # lb3's chains (or table) and their counters are new: they count from 0
        joined = report_share("lb3 (one direction) from its start to 2 s after it joined",
                              {"lb3": {"user": 0, "kernel": 0}}, c1)
        print(f"  lb3: flows {[len(seen[f]['lb3']) for f in FAMILIES]}")
        assert_all_kept(res, ALL_PATTERNS)
        assert before == {4: 0, 6: 0}
        for fam in FAMILIES:
            assert seen[fam]["lb3"], fam  # ECMP moved running flows to lb3
        assert took < 3.0, took
        assert_engine_share(engine, joined)


def test_last_target_failing_its_checks_on_one_router_withdraws_it_and_recovery_announces_it():
    """Every router health-checks the targets (tcp, 0.3 s, fall 2, rise 2).
    lb2's checks are blocked (a REJECT rule in lb2's OUTPUT: the targets are
    fine, lb2 only cannot reach them): its last target goes down, its bgp
    plugin withdraws the VIPs and up's route loses lb2; its flows go to lb1
    and lb3, which see every target healthy. Then the rule goes, the targets
    come back on lb2, it announces again and up routes flows to it again.
    Sessions of every pattern run through all of it: none lost, none moved."""
    checks = "check = tcp\ncheck_port = 80\ncheck_interval = 0.3\ncheck_timeout = 0.25\nfall = 2\nrise = 2\n"
    with bgp_lab() as lab:
        confs = bgp_configs(lab, targets=lab.targets, plugins="lb, health, sync, bgp", target_options=checks)
        start_all(lab, confs)
        block = [[tool, "OUTPUT", "-o", "back", "-p", "tcp", "-d", lab.addr(t, fam), "--dport", "80",
                  "-j", "REJECT", "--reject-with", "tcp-reset"]
                 for t in lab.targets for fam, tool in ((4, "iptables"), (6, "ip6tables"))]
        handles = start_sessions(lab, COUNT, ALL_PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            seen0 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
            t_block = time.time()
            t0 = time.monotonic()
            for rule in block:
                lab.run("lb2", [rule[0], "-I", *rule[1:]])
            lab.wait_upstream(["lb1", "lb3"], timeout=10.0)
            withdrawn = time.monotonic() - t0
            # the withdrawal comes first (prepare); the reason with the reconcile that follows it
            lb2 = wait_plugins(lab, confs["lb2"], lambda p: p["bgp"]["withdrawn"])
            time.sleep(1.5)
            c_out = vip_chain_packets(lab, "lb2")
            time.sleep(0.5)
            c_out2 = vip_chain_packets(lab, "lb2")
            seen1 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
            t0 = time.monotonic()
            for rule in block:
                lab.run("lb2", [rule[0], "-D", *rule[1:]])
            lab.wait_upstream(lab.routers, timeout=10.0)
            back = time.monotonic() - t0
            time.sleep(2.0)
            c_back = vip_chain_packets(lab, "lb2")
            lb2_after = wait_plugins(lab, confs["lb2"], lambda p: not p["bgp"]["withdrawn"])
        finally:
            res = summarize(stop_sessions(handles))
        health, bgp = lb2["health"], lb2["bgp"]
        flips = [h["time"] for t in health["targets"].values() for h in t["history"]
                 if h["state"] == "down" and h["time"] >= t_block]
        wd = [e for e in bgp["events"] if e["action"] == "withdraw" and e["time"] >= t_block]
        report(f"lb2's checks blocked: its last target down {max(flips) - t_block:.3f} s later, withdrawn "
               f"{wd[0]['time'] - max(flips):.3f} s after that flip, up's route without lb2 {withdrawn:.3f} s "
               f"after the block; checks unblocked: announced again, up routes to lb2 {back:.3f} s later", res)
        print(f"  lb2 VIP chain packets: {c_out} 1.5 s after the withdrawal, {c_out2} 0.5 s later, "
              f"{c_back} 2 s after it was back")
        assert health["down"] == {"web": sorted(lab.targets)}, health["down"]
        assert bgp["withdrawn"] == {"web": "no healthy target"} and bgp["announced"] == [], bgp
        assert {e["prefix"] for e in wd} == {"10.64.100.1/32", "fd64:100::1/128"}, bgp["events"]
        assert all("no healthy target" in e["reason"] for e in wd), wd
        assert len(flips) == len(lab.targets) and wd[0]["time"] >= max(flips)
        assert withdrawn < 5.0, withdrawn
        assert_all_kept(res, ALL_PATTERNS)
        for fam in FAMILIES:
            assert seen0[fam]["lb2"], fam  # lb2 carried flows before
            assert sum(len(seen1[fam][r] - seen0[fam][r]) for r in ("lb1", "lb3")) > 0, fam
        assert c_out2 == c_out  # nothing routed to lb2 while it was withdrawn
        assert all(c_back[f] > c_out2[f] for f in FAMILIES), (c_out2, c_back)  # and again once back
        assert lb2_after["health"]["down"] == {} and lb2_after["bgp"]["withdrawn"] == {}, lb2_after
        assert lb2_after["bgp"]["announced"] == ["10.64.100.1/32", "fd64:100::1/128"]
        for r in ("lb1", "lb3"):
            assert not [e for e in bgp_status(lab, r, confs[r])["events"] if e["action"] == "withdraw"]


@pytest.mark.parametrize("engine", ENGINES)
def test_replies_through_any_router_keep_every_session_as_routers_leave_and_join(engine):
    """The targets reply over an ECMP default route through every router, so
    each router sees the client's direction of some flows, the targets' of
    others (connections it never saw open) and both of the rest. lb2's links
    go down (up's and the targets' routes lose it), then it comes back (FRR
    and synlb kept running; both routes get it back): every session of every
    pattern kept, none moved. Every router is on the reply path, so check
    --live warns about strict rp_filter on its back link (it would drop the
    IPv4 replies: docs/ACTIVE-ACTIVE.md)."""
    with bgp_lab(reply_router=None) as lab:
        confs = bgp_configs(lab, targets=lab.targets, engine=engine)
        start_all(lab, confs)
        assert all(lab.reply_nexthops(t, f) == [lab.addr(r, f, "back") for r in lab.routers]
                   for t in lab.targets for f in FAMILIES)
        lab.sysctl("lb2", {"net.ipv4.conf.back.rp_filter": 1})
        try:
            cp = synlb(lab, "lb2", confs["lb2"].path, "check", "--live", check=False)
        finally:
            lab.sysctl("lb2", {"net.ipv4.conf.back.rp_filter": 0})
        assert cp.returncode == 0 and "strict reverse-path filtering on back" in cp.stderr, cp.stderr
        cp = synlb(lab, "lb2", confs["lb2"].path, "check", "--live", check=False)
        assert cp.returncode == 0 and "rp_filter" not in cp.stderr, cp.stderr
        c0 = counts(lab, confs)
        handles = start_sessions(lab, COUNT, ALL_PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            c1 = counts(lab, confs)
            dirs0 = {fam: {r: flow_directions(lab, r, fam) for r in lab.routers} for fam in FAMILIES}
            left = lab.router_leave("lb2")
            assert all(lab.reply_nexthops(t, f) == [lab.addr(r, f, "back") for r in ("lb1", "lb3")]
                       for t in lab.targets for f in FAMILIES)
            time.sleep(2.0)
            c2 = counts(lab, confs, ["lb1", "lb3"])
            dirs1 = {fam: {r: flow_directions(lab, r, fam) for r in ("lb1", "lb3")} for fam in FAMILIES}
            t0 = time.monotonic()
            lab.router_join("lb2")  # its synlb ran all along: it announces once its BGP session is back
            joined = time.monotonic() - t0
            time.sleep(2.0)
            c3 = counts(lab, confs)
        finally:
            res = summarize(stop_sessions(handles))
        report(f"{engine}, replies through any router: lb2's links down (up reconverged in {left:.3f} s), "
               f"lb2 back (up routed to it again {joined:.3f} s after its links came up)", res)
        for fam in FAMILIES:
            print(f"  IPv{fam} flows per router, before: " + "; ".join(
                f"{r} {len(d['client'])} client's direction only, {len(d['target'])} targets' only, "
                f"{len(d['both'])} both" for r, d in dirs0[fam].items()))
        steady = report_share("sessions opened and running 1 s", c0, c1)
        report_share("the 2 s after lb2 left", {r: c1[r] for r in c2}, c2)
        report_share("the 2 s after lb2 came back", c2 | {"lb2": c1["lb2"]}, c3)
        assert_all_kept(res, ALL_PATTERNS)
        for fam in FAMILIES:
            # every router saw flows whose other direction crossed another router
            for r, d in dirs0[fam].items():
                assert d["client"] and d["target"], (fam, r, {k: len(v) for k, v in d.items()})
            # lb2's flows, both directions, moved to lb1 and lb3: some of what they
            # took over they had never seen open
            assert any(dirs1[fam][r]["target"] - dirs0[fam][r]["target"] for r in dirs1[fam]), fam
        assert left < 1.0 and joined < 5.0, (left, joined)
        assert_engine_share(engine, steady)


def test_synlb_stopped_withdraws_before_its_data_plane_goes():
    """SIGTERM to lb2's synlb: its bgp plugin withdraws the VIPs and waits
    `drain` (0.5 s) before the lb plugin removes the chains; up has moved
    lb2's flows by then, and no session is lost. Also: check --live names
    a FORWARD rule dropping INVALID."""
    with bgp_lab() as lab:
        confs = bgp_configs(lab, targets=lab.targets)
        start_all(lab, confs)

        rule = ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]
        lab.run("lb2", ["iptables", "-A", *rule])
        try:
            cp = synlb(lab, "lb2", confs["lb2"].path, "check", "--live", check=False)
        finally:
            lab.run("lb2", ["iptables", "-D", *rule])
        assert cp.returncode == 0, cp.stderr
        assert "drops packets conntrack calls INVALID in FORWARD (iptables filter -A FORWARD -m conntrack " \
               "--ctstate INVALID -j DROP)" in cp.stderr, cp.stderr
        cp = synlb(lab, "lb2", confs["lb2"].path, "check", "--live", check=False)
        assert cp.returncode == 0 and "INVALID" not in cp.stderr, cp.stderr

        handles = start_sessions(lab, COUNT, PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            seen0 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
            t = stop_host_watching(lab, "lb2")
            time.sleep(1.5)
        finally:
            res = summarize(stop_sessions(handles))
        report(f"lb2's synlb stopped: up lost lb2 {t['withdrawn']} s after SIGTERM, its chains went at "
               f"{t['dataplane_gone']} s, the host exited at {t['exited']} s (rc {t['rc']})", res)
        assert t["rc"] == 0
        assert t["withdrawn"] is not None and t["dataplane_gone"] is not None
        assert t["withdrawn"] < t["dataplane_gone"], t
        assert t["dataplane_gone"] - t["withdrawn"] > 0.2, t  # the drain
        assert t["withdrawn"] < 1.0, t
        assert all(seen0[fam]["lb2"] for fam in FAMILIES)
        assert_all_kept(res)
        # FRR still runs on lb2 but announces nothing
        assert frr.running(lab, "lb2") and "  network " not in frr.vtysh(lab, "lb2", "show running-config bgpd")


def test_target_added_then_a_router_leaves_keeps_every_session():
    """The stickiness case on the BGP lab: sessions through all routers on
    t1 and t2; t3 added on every router (a reload: no router withdraws
    meanwhile); every router hands its misplaced connections to the others;
    then lb2's links go down and BFD moves its flows to lb1 and lb3: every
    session kept, none moved."""
    with bgp_lab() as lab:
        confs = bgp_configs(lab, targets=("t1", "t2"))
        start_all(lab, confs)
        own: dict = {}
        changed: list[float] = []
        during: list = []

        def reload(lab_, r, conf):
            changed.append(time.time())
            reload_router(lab_, r, conf)

        def ready(lab_, new_confs):
            wait_targets_installed(lab_, new_confs)
            own.update(wait_pins_everywhere(lab_, new_confs, min(changed), again_after=AGAIN_AFTER))
            during.append({f: lab_.announced_by(f) for f in FAMILIES})

        res = run_target_added_then_router_leaves(lab, confs, count=COUNT, leaver="lb2", patterns=PATTERNS,
                                                  families=FAMILIES, reload=reload, ready=ready)
        report(f"t3 added, pins per router {own}, then lb2's links down (up reconverged in "
               f"{lab.convergence.get('lb2', 0):.3f} s); steps {res['steps']}", res)
        assert_all_kept(res)
        assert during == [{f: lab.routers for f in FAMILIES}]  # the reload withdrew nothing
        for r in ("lb1", "lb3"):
            assert not [e for e in bgp_status(lab, r, res["configs"][r])["events"] if e["action"] == "withdraw"]
        assert own["lb2"] > 0 and sum(own.values()) >= 0.15 * res["sessions"], own
        assert lab.convergence["lb2"] < 1.0
