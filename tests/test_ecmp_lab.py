"""Active-active behind ECMP (synlb_lab.ecmp): three routers running synlb
behind an upstream router with a static multipath route to the VIP; the
targets' replies all go through lb1, so lb2 and lb3 see only the client's
direction of the flows ECMP gives them."""

from __future__ import annotations

import os
import secrets
import time

import pytest
from synlb_lab import addresses as A
from synlb_lab.demo_failover import start_sessions, stop_sessions, summarize
from synlb_lab.ecmp import (
    EcmpLab,
    flows_by_router,
    reload_router,
    run_target_added_then_router_leaves,
    status,
    start_host,
    stop_host,
    synlb_down,
    synlb_up,
    vip_chain_packets,
    wait_pins_everywhere,
    wait_targets_installed,
    write_config,
    write_configs,
)
from synlb_lab.scenario import kernel_snapshot
from synlb.plugins.sync import AGAIN_AFTER

pytestmark = pytest.mark.lab(tools=("ip", "conntrack", "iptables"))

COUNT = 20  # sessions per pattern and family
PATTERNS = ("echo", "up")
FAMILIES = (4, 6)


@pytest.fixture
def lab(open_lab):
    return open_lab(EcmpLab, routers=3, targets=3, server_ports=(80,))


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


# ---------------------------------------------------------------- a target added, then a router leaves

def sync_configs(lab, targets=("t1", "t2"), plugins="lb, sync", engine="nfqueue"):
    """Every router: `synlb run` with the sync plugin (peers: the other
    routers' back addresses) and track_syn = no, since lb2 and lb3 see only
    the client's direction."""
    key = os.path.join(lab.dir, "sync.key")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    confs = {}
    for i, r in enumerate(lab.routers, 1):
        peers = ", ".join(A.router_back(j) for j in range(1, len(lab.routers) + 1) if j != i)
        confs[r] = write_config(lab, r, targets, extra_synlb=f"plugins = {plugins}", engine=engine,
                                extra_service="track_syn = no",
                                extra=f"\n[sync]\nlisten = {A.router_back(i)}\npeers = {peers}\n"
                                      f"key_file = {key}\nrefresh = 2\n")
    return confs


def shortcut_counters(lab, r, fam) -> tuple[int, int]:
    """Packets of synlb-VIP-web short-cut in the kernel and queued, in router ``r``."""
    text = lab.run(r, ["iptables-save" if fam == 4 else "ip6tables-save", "-c", "-t", "mangle"]).stdout
    kept = queued = 0
    for line in text.splitlines():
        if line.startswith("[") and "-A synlb-VIP-web " in line:
            pkts = int(line[1:].split(":", 1)[0])
            if "-j synlb-ESTABLISHED" in line:
                kept += pkts
            elif "-j NFQUEUE" in line:
                queued += pkts
    return kept, queued


def test_target_added_then_a_router_leaves_keeps_every_session(lab):
    """Sessions through all three routers; t3 added on every router (the
    routers that see one direction keep the running connections' marks in
    conntrack, thanks to track_syn = no); every router hands its misplaced
    connections to the others; then lb2 leaves and ECMP gives its flows to
    lb1 and lb3: every session kept, none moved."""
    confs = sync_configs(lab)
    for r in lab.routers:
        start_host(lab, r, confs[r])
    # the control socket answers before the host's first reconcile is done
    wait_targets_installed(lab, confs)
    own: dict = {}
    changed: list[float] = []

    def reload(lab_, r, conf):
        changed.append(time.time())
        reload_router(lab_, r, conf)

    def ready(lab_, new_confs):
        wait_targets_installed(lab_, new_confs)
        own.update(wait_pins_everywhere(lab_, new_confs, min(changed), again_after=AGAIN_AFTER))

    res = run_target_added_then_router_leaves(lab, confs, count=COUNT, leaver="lb2", patterns=PATTERNS,
                                              families=FAMILIES, reload=reload, ready=ready)
    print(f"\nt3 added, pins per router {own}, then lb2 left: {res['kept']}/{res['sessions']} kept, "
          f"{res['moved']} moved, steps {res['steps']}, established {res['established']}, "
          f"data held up at most {res['max_delay']:.3f} s")
    for k, v in res["per"].items():
        print(f"  {k:<8} kept {v['kept']}/{v['sessions']} moved {v['moved']} {v['errors']}")
    bad = {k: v for k, v in res["per"].items() if v["kept"] != v["sessions"] or v["moved"]}
    assert not bad, bad
    assert res["sessions"] == COUNT * len(PATTERNS) * len(FAMILIES)
    # the change moved running connections in the table: pins did the work
    assert own["lb2"] > 0 and sum(own.values()) >= 0.15 * res["sessions"], own
    # and the routers that see one direction keep their connections' marks in
    # conntrack (track_syn = no): most of their packets stay in the kernel
    for r in ("lb3",):  # lb2 left; lb3 carried flows all along
        for fam in FAMILIES:
            kept, queued = shortcut_counters(lab, r, fam)
            print(f"  {r} IPv{fam}: {kept} packets kept in the kernel, {queued} queued")
            assert kept > 5 * queued > 0, (r, fam, kept, queued)
    for r in lab.routers:
        stop_host(lab, r)


def test_without_sync_a_router_leaving_resets_the_moved_sessions(lab):
    """The same with track_syn = no but no sync: adding t3 resets nothing
    (the one-direction routers keep the marks in conntrack), but when lb2
    leaves, the routers taking its flows hash the moved ones to t3."""
    confs = write_configs(lab, targets=("t1", "t2"), extra_service="track_syn = no")
    for r in lab.routers:
        start_host(lab, r, confs[r])
    wait_targets_installed(lab, confs)
    res = run_target_added_then_router_leaves(lab, confs, count=COUNT, leaver="lb2",
                                              patterns=PATTERNS, families=FAMILIES)
    print(f"\nno sync: {res['kept']}/{res['sessions']} kept, established {res['established']}")
    assert res["established"]["after_reload"] == res["established"]["start"] == res["sessions"]
    assert res["kept"] < res["sessions"] and res["established"]["after_leave"] < res["sessions"]
    for r in lab.routers:
        stop_host(lab, r)


# ---------------------------------------------------------------- a router whose health view differs

HEALTH = "check = tcp\ncheck_port = 8080\ncheck_interval = 0.2\ncheck_timeout = 0.5\nrise = 2\nfall = 2\n"


@pytest.fixture
def checked_lab(open_lab):
    return open_lab(EcmpLab, routers=3, targets=3, server_ports=(80, 8080))


def block_checks(lab, router, target, block):
    """``router``'s own checks of ``target`` fail; the target and its sessions are untouched."""
    for tool, fam in (("iptables", 4), ("ip6tables", 6)):
        lab.run(router, [tool, "-I" if block else "-D", "OUTPUT", "-d", lab.addr(target, fam), "-p", "tcp",
                         "--dport", "8080", "-j", "REJECT", "--reject-with", "tcp-reset"])


@pytest.mark.parametrize("engine", ("nfqueue", "nftables"))
def test_a_router_whose_checks_fail_for_a_target_then_a_router_leaves_keeps_every_session(checked_lab, engine):
    """Sessions through all three routers; lb3's checks of t3 fail (t3
    serves, lb1 and lb2 see it up); more sessions start, some through lb3,
    which opens them without t3; then lb2 leaves, and ECMP gives its flows
    to lb1 and lb3. lb3 picks up lb2's running sessions where they live
    (the configured table, not its view without t3), and lb1 follows
    lb3's pins for what lb3 opened: every session kept, none moved."""
    lab = checked_lab
    confs = sync_configs(lab, targets=("t1", "t2", "t3"), plugins="lb, health, sync", engine=engine)
    for r in lab.routers:
        d = os.path.join(os.path.dirname(confs[r].path), "synlb.d")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "health.ini"), "w") as fh:
            fh.write("".join(f"[target:{t}]\n{HEALTH}\n" for t in lab.targets))
        start_host(lab, r, confs[r])
    wait_targets_installed(lab, confs)

    def view(r):
        return status(lab, r, confs[r])["host"]["plugins"]["health"]["targets"]["t3"]["state"]

    handles = {}
    try:
        handles["before"] = start_sessions(lab, 10, PATTERNS, FAMILIES)
        block_checks(lab, "lb3", "t3", True)
        deadline = time.monotonic() + 10
        while view("lb3") != "down":
            assert time.monotonic() < deadline, "lb3 never saw t3 down"
            time.sleep(0.1)
        assert view("lb1") == view("lb2") == "up"
        handles["during"] = start_sessions(lab, 10, PATTERNS, FAMILIES)
        own = wait_pins_everywhere(lab, confs, time.time(), again_after=AGAIN_AFTER)
        lab.router_leave("lb2")
        time.sleep(1.0)
    finally:
        results = {when: stop_sessions(h) for when, h in handles.items()}
        block_checks(lab, "lb3", "t3", False)
    for when, r in results.items():
        res = summarize(r)
        print(f"\n{when}: t3 down on lb3 only, pins {own}, then lb2 left: {res['kept']}/{res['sessions']} kept, "
              f"{res['moved']} moved")
        bad = {k: v for k, v in res["per"].items() if v["kept"] != v["sessions"] or v["moved"]}
        assert not bad, (when, bad)
    assert own["lb3"] > 0, own  # what lb3 opened off the configured table's pick, pinned for the others
    for r in lab.routers:
        stop_host(lab, r)
