"""`synlb-lab bench --quick` end to end in the lab: every section runs, the
report has the headline figures (README, benchmark table), with sane values. Speed is
not asserted (the machine is shared); the targets are the benchmark's job."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.lab(tools=("ip", "wrk", "iperf3", "nginx", "keepalived", "conntrack", "iptables", "nft",
                                    "gcc", "pkg-config"))

KEYS = ("throughput_ratio", "all_packets_ratio", "conn_rate_ratio", "cpu_us_per_conn", "worker_rss_mb",
        "maglev_build_ms_100", "failover_gap_s", "sessions_kept_ratio",
        "nft_conn_rate_ratio", "nft_throughput_ratio", "nft_update_ms_100", "nfqueue_cpu_vs_c",
        "nfqueue_conn_rate_vs_c", "nft_sessions_kept_ratio", "nfqueue_floor_cpu_vs_c", "nfqueue_jhash_cpu_vs_c")


def synlb_lab() -> str:
    return os.path.join(os.path.dirname(sys.executable), "synlb-lab")


def test_quick_bench_writes_a_sane_report(tmp_path):
    t0 = time.monotonic()
    cp = subprocess.run([synlb_lab(), "bench", "--quick", "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=480)
    took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr[-3000:]
    print(f"\nquick bench took {took:.1f} s\n{cp.stdout}")

    res = json.loads((tmp_path / "latest.json").read_text())
    for k in KEYS:
        assert isinstance(res.get(k), (int, float)) and math.isfinite(res[k]), (k, res.get(k))
    assert 0.2 < res["throughput_ratio"] < 5
    assert 0 < res["all_packets_ratio"] < 2
    assert 0.1 < res["conn_rate_ratio"] < 10
    assert 0 < res["cpu_us_per_conn"] < 10_000
    assert 5 < res["worker_rss_mb"] < 1000
    # timings lie within the run that measured them (their size is the benchmark's job)
    assert 0 < res["maglev_build_ms_100"] <= took * 1000
    assert 0 <= res["failover_gap_s"] <= took
    assert 0 <= res["sessions_kept_ratio"] <= 1
    assert res["quick"] is True

    # the pieces behind the headline: the arms really ran as described
    tp = res["single_router"]["throughput"]
    queued = {r["arm"]: r["queued_packets"] for r in tp["runs"]}
    assert queued["plain"] == 0
    assert queued["syn_only"] <= 20  # the SYNs of the iperf3 connections
    assert queued["all_packets"] > 50 * queued["syn_only"]  # every packet
    cr = res["single_router"]["conn_rate"]
    for arm in ("synlb", "synlb_mq", "synlb_nic"):
        assert 0.9 <= cr["queued_per_conn"][arm] <= 1.2, cr["queued_per_conn"]  # one SYN per connection
    assert all(r["queued_packets"] == 0 for r in cr["runs"] if r["arm"].startswith("hmark"))
    # the nftables engine: no worker, nothing queued, in either section
    assert queued["nft"] == 0
    assert res["nft_user_space_packets"] == 0 and cr["nft_workers"] == 0
    assert all(r["queued_packets"] == 0 for r in cr["runs"] if r["arm"] == "nft")
    # the C reference worker served the same connections (one SYN each), hashing as synlb does
    # and so did the Python floor worker (netfilterqueue, the least Python)
    for arm in ("cref", "cref_nic", "floor_nic", "synlb_jhash_nic", "cref_jhash_nic"):
        assert 0.9 <= cr["queued_per_conn"][arm] <= 1.2, cr["queued_per_conn"]
        assert 0 < cr["cpu_us_per_conn"][arm] < 10_000
    assert all(cr["vs_c"]["hash_check"].values()) and len(cr["vs_c"]["hash_check"]) == 4
    # a health flip of 100 targets changes ~1% of the slots, in one transaction, with no
    # new connection failing meanwhile
    nu = res["single_router"]["nft_update"]
    assert nu["flips"] and all(600 <= f["slots"] <= 1400 for f in nu["flips"]), nu["flips"]
    assert nu["wrk"]["requests"] > 0 and nu["connections_failed"] == 0, nu["wrk"]
    # at the shipped nice and at nice 0, both series under wrk
    assert {f["nice"] for f in nu["flips"]} == {"default", 0} and nu["nice_0"]["median_total_ms"] > 0
    assert isinstance(res["single_router"]["throughput"]["flowtable"]["supported"], bool)
    assert res["nft_connections_failed_in_update"] == 0
    # the drift check finds nothing on a data plane just installed, with either engine
    assert set(res["drift"]) == {"nfqueue_3", "nfqueue_100", "nftables_3", "nftables_100"}
    assert all(v["drift_found"] == [] and v["cpu_ms"] > 0 for v in res["drift"].values()), res["drift"]
    fn = res["failover_nft"]
    assert fn["engine"] == "nftables" and len(fn["events"]) >= 1 and fn["sessions"] > 0
    # the worker's CPU on NIC-like router links is the headline; the plain veth figure beside it
    assert res["cpu_us_per_conn"] == cr["cpu_us_per_conn"]["synlb_nic"]
    assert 0 < res["cpu_us_per_conn_veth"] < 10_000
    fo = res["failover"]
    assert len(fo["events"]) >= 1 and fo["sessions"] > 0
    assert {e["from"] for e in fo["events"]} <= {"lb1", "lb2"}
    # the gap is the longest time data was held up; every pattern reports it, and it never
    # exceeds the longest time between deliveries (which adds the sessions' own pauses)
    for e in fo["events"]:
        assert set(e["delays"]) == set(e["gaps"]) == {f"{p}_v{f}" for p in fo["patterns"] for f in (4, 6)}
        assert 0 < e["max_delay_s"] <= e["max_gap_s"], e
    assert res["failover_gap_s"] == fo["max_delay_s"]
    assert set(res["maglev"]["build_ms"]) == {"10", "100", "1000"}
    assert res["hotpath"]["current_us_per_packet"] > 0
    # pins: measured in the same run, real conntrack entries read back whole
    pn = res["pins"]
    assert all(v > 0 for v in pn["hotpath"]["us_per_packet"].values())
    assert res["pins_normal_path_ratio"] == pn["hotpath"]["no_pins_vs_before"] > 0
    assert pn["conntrack"]["entries"] == 2000 and 0 < pn["conntrack"]["pins"] < 2000
    assert pn["unreachable_peer"]["silent_peer_error"] and \
        pn["unreachable_peer"]["reachable_peer_answered_after_s"] < pn["unreachable_peer"]["round_s"]

    md = (tmp_path / "latest.md").read_text()
    assert "## Headline" in md and "Failover" in md and "HMARK" in md and "## Pins" in md
    if res.get("chart"):
        png = (tmp_path / "latest.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    # nothing left behind by the labs
    prefixes = set(re.findall(r"\blab (sl[0-9a-f]{4})\b", cp.stderr))
    assert len(prefixes) == 4, cp.stderr[-2000:]  # drift, single router, failover on either engine
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [n for n in ns if n.split("-")[0] in prefixes]
