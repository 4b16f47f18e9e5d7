"""The optimised worker hot path gives exactly the reference's answer (the
hot path as first written), and the
benchmark's report code works on a results document (pure, no root)."""

from __future__ import annotations

import re

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synlb_lab import bench
from synlb_lab.bench_report import render_markdown, summary_lines
from synlb.maglev import Maglev
from synlb.packet import FALLBACK_BYTES, FALLBACK_VERSION, _parse_key, flow_key
from synlb.config import load
from synlb.worker import Worker


def slow_key(p: bytes) -> bytes:
    """flow_key as it was before the IPv4 fast path."""
    key = _parse_key(p)
    return key if key is not None else FALLBACK_VERSION + bytes(p[:FALLBACK_BYTES])


def v4(proto: int, sport: int, dport: int, frag: int = 0x4000, ihl: int = 5, tail: bytes = b"") -> bytes:
    opts = bytes(4 * (ihl - 5))
    l4 = struct.pack("!HH", sport, dport) + tail
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(l4), 7, frag, 64, proto, 0,
                       socket.inet_aton("192.0.2.7"), socket.inet_aton("198.51.100.1")) + opts + l4


@settings(max_examples=400, deadline=None)
@given(proto=st.integers(0, 255), sport=st.integers(0, 65535), dport=st.integers(0, 65535),
       frag=st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x4001, 0x00FF]), ihl=st.integers(5, 7),
       tail=st.binary(max_size=8), cut=st.integers(0, 40))
def test_fast_path_key_equals_the_general_parser(proto, sport, dport, frag, ihl, tail, cut):
    p = v4(proto, sport, dport, frag, ihl, tail)
    for pkt in (p, p[:len(p) - cut], bytearray(p), memoryview(p)):
        assert flow_key(pkt) == slow_key(bytes(pkt))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fast_path_on_garbage(data):
    assert flow_key(data) == slow_key(data) if data else flow_key(data) == FALLBACK_VERSION


def _worker(tmp_path):
    conf = tmp_path / "synlb.ini"
    conf.write_text(bench.render_config(str(tmp_path / "state"), iperf_service=False))
    cfg = load(str(conf))
    return Worker.from_config(cfg, "web"), cfg


def test_worker_marks_equal_maglev_lookup(tmp_path):
    w, cfg = _worker(tmp_path)
    m = Maglev(["t1", "t2", "t3"], bench.TABLE_SIZE, cfg.globals.hash_key.encode())
    marks = {i: cfg.targets[name].mark for i, name in enumerate(m.names)}
    seen = set()
    for i in range(3000):
        p = bench._StubPacket(bench._syn(4 if i % 3 else 6, 1024 + i))
        w.on_packet(p)
        assert p.mark == marks[m.lookup(flow_key(p.payload))]
        seen.add(p.mark)
    assert seen == set(marks.values())
    assert w.packets == 3000
    assert sum(w.table.picks.values()) == 3000


def test_hotpath_bench_agrees_with_the_reference(tmp_path, fake):
    """The benchmark times ``Worker.on_packet`` against the reference callback
    (the hot path as first written, ``bench._seed_on_packet``) on its packet
    mix: for every one of those packets both choose the same target, Maglev's
    for the packet's flow key; and the benchmark refuses to time callbacks
    that disagree."""
    w, cfg = _worker(tmp_path)
    reference = bench._seed_on_packet(w)
    m = Maglev(["t1", "t2", "t3"], bench.TABLE_SIZE, cfg.globals.hash_key.encode())
    marks = {i: cfg.targets[name].mark for i, name in enumerate(m.names)}
    seen = set()
    for i in range(4096):  # bench_hotpath's packets
        payload = bench._syn(4 if i % 4 else 6, 1024 + i % 60000)
        ours, theirs = bench._StubPacket(payload), bench._StubPacket(payload)
        w.on_packet(ours)
        reference(theirs)
        assert ours.mark == theirs.mark == marks[m.lookup(flow_key(payload))], i
        seen.add(ours.mark)
    assert seen == set(marks.values())

    out = bench.bench_hotpath(bench.Plan(hotpath_packets=2000))
    assert out["current_us_per_packet"] > 0 and out["seed_us_per_packet"] > 0

    def wrong_reference(worker):
        def on_packet(pkt) -> None:
            pkt.set_mark(0xDEAD)
            pkt.accept()
        return on_packet
    fake(bench, "_seed_on_packet", wrong_reference)
    with pytest.raises(bench.BenchError, match="disagree"):
        bench.bench_hotpath(bench.Plan(hotpath_packets=2000))


def test_maglev_bench_shape():
    out = bench.bench_maglev(bench.Plan(maglev_repeats=1))
    assert set(out["build_ms"]) == {"10", "100", "1000"}


def test_check_targets():
    t = bench.check_targets({"throughput_ratio": 0.9, "conn_rate_ratio": 0.95, "cpu_us_per_conn": 20.0,
                             "worker_rss_mb": 30.0, "maglev_build_ms_100": 50.0, "failover_gap_s": 0.35,
                             "sessions_kept_ratio": 1.0})
    assert t["throughput_ratio"]["met"] is False and t["throughput_ratio"]["missed_by_pct"] == 5.3
    assert t["conn_rate_ratio"]["met"] is True
    assert t["cpu_us_per_conn"]["met"] is False and t["cpu_us_per_conn"]["missed_by_pct"] == 100.0
    assert t["failover_gap_s"]["met"] is True and t["sessions_kept_ratio"]["met"] is True
    # the gap target follows the shipped advert_int: 3 x 0.03 + 0.3 = 0.39 s
    assert bench.check_targets({"failover_gap_s": 0.4})["failover_gap_s"]["met"] is False


def test_advert_int_is_the_shipped_one():
    """The bench's target and the failover lab assume conf/keepalived.conf.example's advert_int."""
    from synlb_lab import demo_failover

    text = demo_failover.EXAMPLE.read_text()
    values = {float(v) for v in re.findall(r"^\s*advert_int\s+([0-9.]+)", text, re.M)}
    assert values == {bench.ADVERT_INT} == {demo_failover.ADVERT_INT}


def test_summarize_pairs_prefers_quiet_rounds():
    runs = []
    for r, (b, c, quiet) in enumerate([(100, 90, True), (100, 95, True), (100, 300, False), (100, 92, True)]):
        runs += [{"block": "x", "round": r, "arm": "base", "v": b, "quiet_round": quiet},
                 {"block": "x", "round": r, "arm": "cand", "v": c, "quiet_round": quiet}]
    out = bench.summarize_pairs(runs, "v", "base", ["cand"])
    assert out["ratio"]["cand"] == 0.92 and out["quiet_rounds"]["cand"] == 3 and not out["noisy"]["cand"]
    assert len(out["ratios_all"]["cand"]) == 4
    noisy = bench.summarize_pairs(runs[:6], "v", "base", ["cand"], min_clean=3)
    assert noisy["noisy"]["cand"] is True and noisy["ratio"]["cand"] == 0.95


def test_report_renders_partial_results(tmp_path):
    res = {"date": "2026-01-01T00:00:00+0000", "quick": True,
           "machine": {"hostname": "h", "cpus": 2}, "plan": {},
           "maglev": bench.bench_maglev(bench.Plan(maglev_repeats=1))}
    res.update(bench.headline(res))
    res["targets"] = bench.check_targets(bench.headline(res))
    md = render_markdown(res)
    assert "Maglev table build" in md and "| 100 |" in md
    assert any("maglev_build_ms_100" in line for line in summary_lines(res))


def test_bench_log_survives_its_reader_going_away(monkeypatch):
    """`make bench 2>&1 | head`: once the reader is gone, logging must not
    raise, or the labs' teardown (which logs) would stop half-way."""
    import os
    r, w = os.pipe()
    os.close(r)
    monkeypatch.setattr("sys.stderr", os.fdopen(w, "w"))
    bench._log("first line, to a closed pipe")
    bench._log("and every line after it")
