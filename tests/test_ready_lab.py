"""A router that is not ready does not take over: real keepalived on both
routers with the shipped configuration (its track_file on the file that
`synlb run` keeps, [vrrp] ready_file; preempt_delay shortened to 1 s), lb,
health on both. lb1, the higher priority, starts (and later comes back from
a link outage) with its health checks unable to finish: it stays BACKUP
however long that lasts, then takes over once its checks have settled.
"""

from __future__ import annotations

import os
import time

import pytest
from synlb_lab.demo_failover import Pair
from synlb_lab.topology import Lab

pytestmark = pytest.mark.lab(tools=("ip", "keepalived", "conntrack", "iptables"))

PREEMPT_DELAY = 1.0
HOLD = 2.5  # > preempt_delay + VRRP's master-down time: a router that could preempt has by then
ROUNDS = 3  # a link outage and the return, repeated: races show only on repetition
# fall far out of reach: checks that time out keep failing while the target
# stays up, so the router's view never settles until they pass
HEALTH = "check = tcp\ncheck_port = 8080\ncheck_interval = 0.2\ncheck_timeout = 0.3\nrise = 1\nfall = 1000\n"
BLOCK = ["OUTPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP"]


@pytest.fixture
def pair(open_lab):
    lab = open_lab(Lab, routers=2, targets=2, server_ports=(80, 8080))
    for r in lab.routers:
        d = os.path.join(lab.role_dir(r), "synlb.d")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "health.ini"), "w") as fh:
            fh.write("".join(f"[target:{t}]\n{HEALTH}\n" for t in lab.targets))
    p = Pair(lab, plugins="lb, health")
    shipped = p.keepalived_text
    p.keepalived_text = lambda r: shipped(r).replace("preempt_delay 5", f"preempt_delay {PREEMPT_DELAY:g}")
    p.prepare()
    return p


def block_checks(pair: Pair, r: str, on: bool) -> None:
    """lb1's health checks time out (SYNs to the check port dropped on the way out) or pass again."""
    for tool in ("iptables", "ip6tables"):
        pair.lab.run(r, [tool, "-I" if on else "-D", *BLOCK])


def readiness(pair: Pair, r: str) -> dict:
    return pair.host_status(r)["host"]["ready"]


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def stays_backup(pair: Pair, r: str, hold: float) -> None:
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        assert pair.lab.vrrp_state(r) in ("BACKUP", "FAULT"), f"{r} took over while not ready"
        time.sleep(0.05)


def test_a_router_whose_checks_have_not_settled_does_not_preempt(pair):
    lab = pair.lab
    block_checks(pair, "lb1", True)
    pair.start_hosts()
    pair.start_keepalived(["lb2"])
    lab.wait_state("lb2", "MASTER", 10)
    pair.wait_settled("lb2", True)

    pair.start_keepalived(["lb1"])  # higher priority, back from a restart
    lab.wait_state("lb1", "BACKUP", 10)
    pair.wait_settled("lb1", True)  # its hot standby is there: only the checks keep it not ready
    stays_backup(pair, "lb1", HOLD)
    r = readiness(pair, "lb1")
    assert not r["ready"] and r["reasons"] == ["health checks not settled since host start: t1, t2"], r
    assert read(pair.ready_file("lb1")) == "1\n" and read(pair.ready_file("lb2")) == "0\n"

    block_checks(pair, "lb1", False)
    lab.wait_state("lb1", "MASTER", 10)
    lab.wait_state("lb2", "BACKUP", 10)
    assert readiness(pair, "lb1")["ready"] and read(pair.ready_file("lb1")) == "0\n"

    for _ in range(ROUNDS):
        # the view, once settled, stays so: checks failing now move nothing
        block_checks(pair, "lb1", True)
        stays = time.monotonic() + 1.0
        while time.monotonic() < stays:
            assert lab.vrrp_state("lb1") == "MASTER"
            time.sleep(0.05)
        # a link outage: what the checks said before the link came back no longer counts
        lab.fail_links("lb1")
        lab.wait_state("lb2", "MASTER", 10)
        lab.restore_links("lb1")
        lab.wait_state("lb1", "BACKUP", 10)
        stays_backup(pair, "lb1", HOLD)
        r = readiness(pair, "lb1")
        assert not r["ready"] and any(x.startswith("health checks not settled since link ") and x.endswith(" up: t1, t2")
                                      for x in r["reasons"]), r
        assert read(pair.ready_file("lb1")) == "1\n"
        block_checks(pair, "lb1", False)
        lab.wait_state("lb1", "MASTER", 10)
        lab.wait_state("lb2", "BACKUP", 10)

    # synlb run stops: the file says not ready, and the ready peer takes over
    lab.stop_process(pair.hosts["lb1"])
    assert read(pair.ready_file("lb1")) == "1\n"
    lab.wait_state("lb2", "MASTER", 10 + PREEMPT_DELAY)
    stays_backup(pair, "lb1", HOLD)
