"""What switching engines costs: with its own hash (flow_hash = blake2b,
the nfqueue engine's default) the worker hashes flows independently of the
nftables engine (docs/ENGINES.md), so a session picked up by a router on the
other engine lands on another target with probability ~ 1 - 1/targets; with
the kernel's (flow_hash = jhash) both engines pick alike and nothing is lost.

Two routers with real keepalived: lb1 (MASTER) on the nfqueue engine, lb2 on
the nftables engine; sessions run through lb1, then lb1's links go down.
"""

from __future__ import annotations

import pytest

from synlb_lab.demo_failover import Pair, fail_over, snapshot, start_sessions, stop_sessions, summarize
from synlb_lab.topology import Lab

pytestmark = pytest.mark.lab(tools=("ip", "nft", "keepalived", "conntrack", "iptables"))

COUNT = 15  # sessions per pattern and family: 60 in all


@pytest.fixture
def lab(open_lab):
    return open_lab(Lab, routers=2, targets=3, server_ports=(80,))


def fail_over_between_engines(lab, flow_hash: str | None) -> tuple[dict, dict, Pair]:
    """Sessions through lb1 (nfqueue engine, ``flow_hash``), then lb1's links
    down: lb2 (nftables engine) picks them up. (summary, failover steps, pair)."""
    pair = Pair(lab, engine={"lb1": "nfqueue", "lb2": "nftables"}, flow_hash={"lb1": flow_hash, "lb2": None})
    pair.prepare()
    pair.start()
    handles = start_sessions(lab, COUNT, ("echo", "up"), (4, 6))
    try:
        steps = fail_over(pair, "links")
    finally:
        results = stop_sessions(handles)
    return summarize(results), steps, pair


def test_failover_between_engines_moves_two_thirds_of_the_sessions(lab):
    res, steps, pair = fail_over_between_engines(lab, None)
    lost = res["sessions"] - res["kept"]
    print(f"\nnfqueue master -> nftables backup, links down ({steps}): {res['kept']}/{res['sessions']} kept, "
          f"{lost} reset ({lost / res['sessions']:.0%}; 1 - 1/3 = 67% expected), {res['moved']} moved")
    # a session the new master hashes elsewhere is reset by that target, never moved
    assert res["moved"] == 0
    assert 0.45 <= lost / res["sessions"] <= 0.85, res["per"]
    pair.close()


def test_failover_between_engines_with_the_kernels_hash_keeps_every_session(lab):
    """lb1's workers get each flow's slot from the kernel (flow_hash =
    jhash, the nftables engine's hash): lb2, on the nftables engine, picks
    up every session on its target. lb1, in FAULT, is then exactly as
    before synlb ran: no table inet synlb (its slot chain), no VIPOUT rule."""
    res, steps, pair = fail_over_between_engines(lab, "jhash")
    print(f"\nnfqueue (flow_hash = jhash) master -> nftables backup, links down ({steps}): "
          f"{res['kept']}/{res['sessions']} kept, {res['moved']} moved")
    assert res["kept"] == res["sessions"] == 4 * COUNT and res["moved"] == 0, res["per"]
    assert snapshot(lab, "lb1", pair.state_dir("lb1")) == pair.baseline["lb1"]
    pair.close()
