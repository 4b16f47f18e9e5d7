"""Active-active behind ECMP (synlb.lab.ecmp): three routers running synlb
behind an upstream router with a static multipath route to the VIP; the
targets' replies all go through lb1, so lb2 and lb3 see only the client's
direction of the flows ECMP gives them."""

from __future__ import annotations

import time

import pytest
from synlb.lab import addresses as A
from synlb.lab.demo_failover import start_sessions, stop_sessions, summarize
from synlb.lab.ecmp import (
    EcmpLab,
    flows_by_router,
    synlb_down,
    synlb_up,
    vip_chain_packets,
    write_configs,
)
from synlb.lab.netns import list_netns
from synlb.lab.scenario import kernel_snapshot

pytestmark = pytest.mark.lab

COUNT = 20  # sessions per pattern and family
PATTERNS = ("echo", "up")
FAMILIES = (4, 6)


@pytest.fixture
def lab():
    with EcmpLab(routers=3, targets=3, server_ports=(80,)) as lab:
        yield lab
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix + "-")]
    assert lab.leftovers() == {"namespaces": [], "processes": []}


def fronts(lab, routers, fam):
    return [lab.addr(r, fam) for r in routers]


def vip_entries(lab, r, fam):
    cp = lab.run(r, ["conntrack", "-L", "-f", "ipv4" if fam == 4 else "ipv6", "-p", "tcp",
                     "--orig-dst", A.VIP[fam]], check=False)
    return [ln for ln in cp.stdout.splitlines() if "dport=80" in ln]


def test_ecmp_balances_over_every_router_and_down_restores_them(lab):
    for fam in FAMILIES:
        assert lab.upstream_nexthops(fam) == fronts(lab, lab.routers, fam)
    for key in ("net.ipv4.fib_multipath_hash_policy", "net.ipv6.fib_multipath_hash_policy",
                "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        assert lab.sysctl_get("up", key) == "1", key
    assert [r for r in lab.routers if lab.owns(r, A.BACK_VRRP[4]) and lab.owns(r, A.BACK_VRRP[6])] == ["lb1"]

    before = {r: kernel_snapshot(lab, r) for r in lab.routers}
    for snap in before.values():  # a firewall dropping INVALID would drop one-direction flows
        assert "INVALID" not in snap["iptables"] + snap["ip6tables"]
    confs = write_configs(lab)
    for r in lab.routers:
        synlb_up(lab, r, confs[r])

    for fam in FAMILIES:
        res = lab.open_connections(A.VIP[fam], count=60, concurrency=10)
        print(f"\nIPv{fam}: {res['ok']}/60 ok, per target {res['per_target']}, {res['elapsed']} s")
        assert res["ok"] == 60 and res["errors"] == {}, res
        assert sorted(res["per_target"]) == lab.targets, res["per_target"]
    packets = {r: vip_chain_packets(lab, r) for r in lab.routers}
    print("packets through synlb-VIP-web per router:", packets)
    for r in lab.routers:
        assert all(packets[r][fam] > 0 for fam in FAMILIES), packets

    # the asymmetry: lb2 and lb3 never saw a reply, lb1 saw them all
    for fam in FAMILIES:
        for r in lab.routers:
            entries = vip_entries(lab, r, fam)
            assert entries, (r, fam)
            unreplied = [ln for ln in entries if "[UNREPLIED]" in ln]
            if r == lab.reply_router:
                assert not unreplied, unreplied[:3]
            else:
                assert len(unreplied) == len(entries), (r, fam, entries[:3])

    for r in lab.routers:
        synlb_down(lab, r, confs[r])
        assert kernel_snapshot(lab, r) == before[r], r


def test_router_leave_and_join_keep_every_session(lab):
    """20 sessions x {echo, up} x {IPv4, IPv6} through all three routers;
    lb2 (not the reply router) leaves (nexthop removed, links down) and
    joins again: every session kept, none moved to another target."""
    confs = write_configs(lab)
    for r in lab.routers:
        synlb_up(lab, r, confs[r])
    leaver = "lb2"
    others = [r for r in lab.routers if r != leaver]
    handles = start_sessions(lab, COUNT, PATTERNS, FAMILIES)
    steps = {}
    try:
        time.sleep(1.0)
        seen0 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
        t0 = time.monotonic()
        lab.router_leave(leaver)
        steps["leave"] = time.monotonic() - t0
        for fam in FAMILIES:
            assert lab.upstream_nexthops(fam) == fronts(lab, others, fam)
        time.sleep(2.0)
        seen1 = {fam: flows_by_router(lab, fam) for fam in FAMILIES}
        t0 = time.monotonic()
        lab.router_join(leaver, before_nexthop=lambda r: synlb_up(lab, r, confs[r]))
        steps["join"] = time.monotonic() - t0
        for fam in FAMILIES:
            assert lab.upstream_nexthops(fam) == fronts(lab, lab.routers, fam)
        joined = vip_chain_packets(lab, leaver)
        time.sleep(2.0)
        back = vip_chain_packets(lab, leaver)
    finally:
        res = summarize(stop_sessions(handles))

    print(f"\nleave {steps.get('leave', 0):.3f} s, join {steps.get('join', 0):.3f} s (synlb up included): "
          f"{res['kept']}/{res['sessions']} kept, {res['moved']} moved, longest gap {res['max_gap']:.3f} s, "
          f"data held up at most {res['max_delay']:.3f} s")
    for k, v in res["per"].items():
        print(f"  {k:<8} kept {v['kept']}/{v['sessions']} moved {v['moved']} gap {v['max_gap']:.3f} {v['errors']}")
    for fam in FAMILIES:
        came = {r: len(seen1[fam][r] - seen0[fam][r]) for r in others}
        print(f"  IPv{fam}: flows per router before {[len(seen0[fam][r]) for r in lab.routers]}, "
              f"came to {came} while {leaver} was away")

    bad = {k: v for k, v in res["per"].items() if v["kept"] != v["sessions"] or v["moved"]}
    assert not bad, bad
    assert res["sessions"] == COUNT * len(PATTERNS) * len(FAMILIES)
    for fam in FAMILIES:
        # the leaver carried flows of both families, and they went to the others
        assert seen0[fam][leaver], fam
        assert sum(len(seen1[fam][r] - seen0[fam][r]) for r in others) > 0, fam
        assert seen1[fam][leaver] == seen0[fam][leaver]  # nothing reached it while away
    assert all(back[fam] > joined[fam] for fam in FAMILIES), (joined, back)  # and it carries flows again

    for r in lab.routers:
        synlb_down(lab, r, confs[r])
