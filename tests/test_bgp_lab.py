"""Active-active with BGP (synlb_lab.bgp): three routers, each running FRR
and `synlb run` (lb, sync, bgp; track_syn = no), announce the VIPs over
eBGP to an upstream router (FRR, ECMP, BFD 3 x 100 ms); the targets' replies
go through lb1, so lb2 and lb3 see one direction only. Sessions: echo and
upload, IPv4 and IPv6, through all routers."""

from __future__ import annotations

import contextlib
import time

import pytest
from synlb_lab import frr
from synlb_lab.bgp import BgpLab, bgp_configs, bgp_status, stop_host_watching, wait_pins_everywhere
from synlb_lab.demo_failover import start_sessions, stop_sessions, summarize
from synlb_lab.ecmp import (
    flows_by_router,
    reload_router,
    run_target_added_then_router_leaves,
    start_host,
    stop_host,
    vip_chain_packets,
    wait_targets_installed,
)
from synlb_lab.netns import list_netns
from synlb_lab.scenario import synlb
from synlb.plugins.sync import AGAIN_AFTER

pytestmark = pytest.mark.lab(tools=("vtysh",))  # FRR (apt-get install frr)

COUNT = 20  # sessions per pattern and family
PATTERNS = ("echo", "up")
FAMILIES = (4, 6)


@contextlib.contextmanager
def bgp_lab(**kw):
    with BgpLab(routers=3, targets=3, server_ports=(80,), **kw) as lab:
        try:
            yield lab
        finally:
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


def assert_all_kept(res: dict) -> None:
    bad = {k: v for k, v in res["per"].items() if v["kept"] != v["sessions"] or v["moved"]}
    assert not bad, bad
    assert res["sessions"] == COUNT * len(PATTERNS) * len(FAMILIES)


def test_links_down_bfd_reconverges_and_every_session_is_kept():
    """lb2's links go down (its side only: up's link stays up): BFD tells up,
    which drops lb2's nexthops; its flows go to lb1 and lb3, which pick them
    up to the same targets."""
    with bgp_lab() as lab:
        confs = bgp_configs(lab, targets=lab.targets)
        announced = start_all(lab, confs)
        st = bgp_status(lab, "lb2", confs["lb2"])
        assert st["announced"] == ["10.64.100.1/32", "fd64:100::1/128"], st
        assert "announced 10.64.100.1/32, fd64:100::1/128; 2/2 BGP sessions established" in st["summary"] \
            or st["summary"].startswith("announced 10.64.100.1/32, fd64:100::1/128"), st["summary"]
        text = synlb(lab, "lb2", confs["lb2"].path, "status").stdout
        assert "  bgp: announced 10.64.100.1/32, fd64:100::1/128" in text, text

        handles = start_sessions(lab, COUNT, PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            seen0 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
            took = lab.router_leave("lb2")
            time.sleep(2.0)
            seen1 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
        finally:
            res = summarize(stop_sessions(handles))
        report(f"hosts up and announced in {announced:.2f} s; lb2's links down, up reconverged "
               f"(BFD 3 x {lab.bfd_interval_ms} ms) in {took:.3f} s", res)
        assert took < 1.0, took
        assert_all_kept(res)
        for fam in FAMILIES:
            assert seen0[fam]["lb2"], fam  # lb2 carried flows of both families
            moved = sum(len(seen1[fam][r] - seen0[fam][r]) for r in ("lb1", "lb3"))
            print(f"  IPv{fam}: flows per router before {[len(seen0[fam][r]) for r in lab.routers]}, "
                  f"{moved} came to lb1/lb3")
            assert moved > 0
        assert res["max_delay"] < 1.0, res["max_delay"]


def test_a_router_joins_and_every_session_is_kept():
    """lb3 starts with no FRR and no synlb; sessions run through lb1 and lb2;
    then FRR and synlb start on lb3: its bgp plugin announces once its data
    plane is up, ECMP gives it some of the running flows, which it picks up
    to the same targets."""
    with bgp_lab(frr_routers=["lb1", "lb2"]) as lab:
        confs = bgp_configs(lab, targets=lab.targets)
        start_all(lab, confs, ["lb1", "lb2"])
        assert lab.announced_by(4) == lab.announced_by(6) == ["lb1", "lb2"]
        handles = start_sessions(lab, COUNT, PATTERNS, FAMILIES)
        try:
            time.sleep(1.0)
            before = vip_chain_packets(lab, "lb3")
            took = lab.router_join("lb3", before_nexthop=lambda r: start_host(lab, r, confs[r]))
            time.sleep(2.0)
            after = vip_chain_packets(lab, "lb3")
            seen = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
        finally:
            res = summarize(stop_sessions(handles))
        report(f"FRR and synlb started on lb3, up routed to it {took:.3f} s after its host answered", res)
        print(f"  lb3: {after} packets through its VIP chain, flows {[len(seen[f]['lb3']) for f in FAMILIES]}")
        assert_all_kept(res)
        assert before == {4: 0, 6: 0}
        for fam in FAMILIES:
            assert after[fam] > 0 and seen[fam]["lb3"], fam  # ECMP moved running flows to lb3
        assert took < 3.0, took


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
