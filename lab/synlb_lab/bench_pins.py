"""The benchmark's ``pins`` section: what keeping sessions across target
changes costs (docs/STICKINESS.md quotes these figures).

- ``hotpath``: the worker's per-packet Python cost with stub packets: the
  callback as it was before pins (reproduced here), the current one with no
  pins (the normal state), with 10 000 pins none of which matches, and a
  packet that follows its pin; the current callback in the normal state
  against the one before pickups followed the configured table (also
  reproduced), and, with a target down (the two tables split), a SYN and a
  picked-up packet, and the bytes the second table takes.
- ``misplaced``: ``pins.misplaced`` per conntrack entry (10 000 and 100 000
  synthetic entries, every one on t1, table over t1..t3: two thirds move).
- ``memory``: bytes a worker's pins dict takes per pin; ``message``: bytes
  per pin on the wire, encode + decode time.
- ``conntrack``: in a namespace with real conntrack entries (UDP flows to
  the VIP, marked like synlb's), the sync plugin's whole computation:
  ``conntrack.dump`` (the tool, kernel-side mark filter, parsing) and
  ``pins.misplaced``.
- ``unreachable_peer``: two sync plugins in a namespace plus a third peer
  whose port drops everything: how long the reachable peer waits for its
  pins (nothing), and how long the round takes (the exchange timeout).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
import uuid
from dataclasses import replace

from synlb import pins as P
from synlb.config import load
from synlb.packet import key_of

from .bench import _StubPacket

CONFIG = """[synlb]
state_dir = {state}

[service:web]
vips = 10.64.100.1/32, fd64:100::1/128
ingress = front
egress = back
protocols = tcp, udp
targets = t1, t2, t3

[target:t1]
address = 10.64.2.11, fd64:2::11
mark = 0x101
[target:t2]
address = 10.64.2.12, fd64:2::12
mark = 0x102
[target:t3]
address = 10.64.2.13, fd64:2::13
mark = 0x103
"""


def _tcp4(sport: int, flags: int) -> bytes:
    import struct
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 0x50, flags, 64240, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                       socket.inet_aton("10.64.1.10"), socket.inet_aton("10.64.100.1")) + tcp


def _before_on_packet(w):
    """Worker.on_packet as it was before pins (commit 8dfb696), bound to ``w``."""
    from synlb.packet import flow_key
    from synlb.worker import LeaveLoop

    def on_packet(pkt, _from_bytes=int.from_bytes, _flow_key=flow_key) -> None:
        if w.attention:
            w.attend()
        t = w.table
        if t.size:
            h = t.keyed.copy()
            h.update(_flow_key(pkt.get_payload()))
            mark = t.marks[_from_bytes(h.digest(), "big") % t.size]
            pkt.set_mark(mark)
            pkt.accept()
            t.picks[mark] += 1
        else:
            w.no_target += 1
            if t.verdict_accept:
                pkt.accept()
            else:
                pkt.drop()
        if w.stop:
            raise LeaveLoop
    return on_packet


def _before_pickup_on_packet(w):
    """Worker.on_packet as it was before pickups followed the configured
    table (commit fd54d41), bound to ``w``."""
    from synlb.packet import flow_key, opens_connection
    from synlb.worker import LeaveLoop

    def on_packet(pkt, _from_bytes=int.from_bytes, _flow_key=flow_key, _opens=opens_connection) -> None:
        if w.attention:
            w.attend()
        t = w.table
        payload = pkt.get_payload()
        key = _flow_key(payload)
        pins = w.pins
        if pins and key in pins and not _opens(payload):
            pkt.set_mark(pins[key])
            pkt.accept()
            w.pinned += 1
        elif t.size:
            h = t.keyed.copy()
            h.update(key)
            mark = t.marks[_from_bytes(h.digest(), "big") % t.size]
            pkt.set_mark(mark)
            pkt.accept()
            t.picks[mark] += 1
        else:
            w.no_target_verdict(pkt, t)
        if w.stop:
            raise LeaveLoop
    return on_packet


def _rounds_us(fns: dict, pkts: dict, batch: int, rounds: int = 20) -> dict:
    """Per round, the time per packet of each callback (the callbacks
    alternate, neither always first): {name: [us, ...]}."""
    out: dict = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, ps = fns[name], pkts[name]
            n = len(ps)
            t0 = time.perf_counter()
            for i in range(batch):
                fn(ps[i % n])
            out[name].append((time.perf_counter() - t0) / batch * 1e6)
    return out


def bench_hotpath(packets: int) -> dict:
    from synlb.worker import MarkTable, Worker
    with tempfile.TemporaryDirectory(prefix="synlb-bench-pins-") as tmp:
        conf = os.path.join(tmp, "synlb.ini")
        os.makedirs(os.path.join(tmp, "state"))
        with open(conf, "w") as fh:
            fh.write(CONFIG.format(state=os.path.join(tmp, "state")))
        w = Worker.from_config(load(conf), "web")
        syns = [_StubPacket(_tcp4(1024 + i, 0x02)) for i in range(4096)]
        before = _before_on_packet(w)
        for p in syns[:512]:  # the same answer
            w.on_packet(p)
            m = p.mark
            before(p)
            if p.mark != m:
                raise RuntimeError("current and pre-pins hot paths disagree")
        many = {key_of(6, "10.64.2.200", "10.64.100.1", 20000 + i, 80): 0x101 for i in range(10_000)}
        acks = [_StubPacket(_tcp4(1024 + i, 0x10)) for i in range(4096)]
        hits = {key_of(6, "10.64.1.10", "10.64.100.1", 1024 + i, 80): 0x101 for i in range(4096)}
        batch = max(1000, packets // 10)
        w.pins = {}
        pair = _rounds_us({"before": before, "no_pins": w.on_packet}, {"before": syns, "no_pins": syns}, batch)
        ratios = sorted(b / a for a, b in zip(pair["before"], pair["no_pins"]))
        out = {name: min(v) for name, v in pair.items()}
        w.pins = many
        out["10k_pins_miss"] = min(_rounds_us({"x": w.on_packet}, {"x": acks}, batch, 10)["x"])
        w.pins = hits
        out["pinned_hit"] = min(_rounds_us({"x": w.on_packet}, {"x": acks}, batch, 10)["x"])
        w.pins = {}
        # the normal state (no pin, no target down) against the callback before pickups
        # followed the configured table, same rounds
        before_pickup = _before_pickup_on_packet(w)
        pk = _rounds_us({"before_pickup": before_pickup, "normal": w.on_packet},
                        {"before_pickup": syns, "normal": syns}, batch)
        pk_ratios = sorted(b / a for a, b in zip(pk["before_pickup"], pk["normal"]))
        out["before_pickup"], out["normal"] = min(pk["before_pickup"]), min(pk["normal"])
        # t3 down: the active table over t1, t2; pickups follow the one over t1..t3
        table = w.spec
        down = replace(table, targets=tuple(t for t in table.targets if t[0] != "t3"))
        w.table = MarkTable(down)
        if not w.table.split:
            raise RuntimeError("a target down did not split the tables")
        out["split_syn"] = min(_rounds_us({"x": w.on_packet}, {"x": syns}, batch, 10)["x"])
        out["split_pickup"] = min(_rounds_us({"x": w.on_packet}, {"x": acks}, batch, 10)["x"])
        second = sys.getsizeof(w.table.pickup_marks)
        opened = len(w.opened)
        w.table = MarkTable(table)
        return {"us_per_packet": {k: round(v, 3) for k, v in out.items()},
                # the normal state (no pins) against the callback before pins, same rounds
                "no_pins_vs_before": round(ratios[len(ratios) // 2], 3),
                "no_pins_vs_before_spread": [round(ratios[0], 3), round(ratios[-1], 3)],
                "normal_vs_before_pickup": round(pk_ratios[len(pk_ratios) // 2], 3),
                "normal_vs_before_pickup_spread": [round(pk_ratios[0], 3), round(pk_ratios[-1], 3)],
                "split_table_bytes": second, "table_size": len(w.table.marks),
                "opened_after_split_syns": opened, "split_syns": min(batch, len(syns)),
                "packets_per_arm": 20 * batch}


def _entries(n: int) -> list:
    from synlb.conntrack import Entry
    out = []
    for i in range(n):
        client = f"10.64.{1 + i // 60000}.{10 + (i // 250) % 240}"
        out.append(Entry(6, client, "10.64.100.1", 1024 + i % 250 * 200 + i % 200, 80, 0x101))
    return out


def bench_misplaced(sizes=(10_000, 100_000)) -> dict:
    with tempfile.TemporaryDirectory(prefix="synlb-bench-pins-") as tmp:
        conf = os.path.join(tmp, "synlb.ini")
        with open(conf, "w") as fh:
            fh.write(CONFIG.format(state=tmp))
        cfg = load(conf)
        out = {}
        for n in sizes:
            entries = _entries(n)
            t0 = time.perf_counter()
            pins = P.misplaced(cfg, entries)
            dt = time.perf_counter() - t0
            out[str(n)] = {"seconds": round(dt, 3), "us_per_entry": round(dt / n * 1e6, 2),
                           "pins": P.count(pins)}
        return out


def bench_memory_and_message(n: int = 100_000) -> dict:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    pins = {key_of(6, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "10.64.100.1", 1024 + i % 60000, 80): 0x101
            for i in range(n)}
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    sample = {"web": dict(list(pins.items())[:10_000])}
    key = b"k" * 32
    t0 = time.perf_counter()
    msg = P.encode(sample, 1, key)
    t1 = time.perf_counter()
    P.decode(msg, key)
    t2 = time.perf_counter()
    return {"memory": {"bytes_per_pin": round(used / n, 1), "pins": n,
                       "note": "dict entries plus the key bytes objects (IPv4 TCP keys, 14 bytes)"},
            "message": {"bytes_per_pin": round(len(msg) / 10_000, 1), "pins": 10_000,
                        "encode_ms": round((t1 - t0) * 1e3, 1), "decode_ms": round((t2 - t1) * 1e3, 1)}}


_NETNS_DRIVER = textwrap.dedent(r"""
    import json, os, socket, subprocess, sys, time
    from synlb import conntrack, pins as P
    from synlb.config import load
    n, conf = int(sys.argv[1]), sys.argv[2]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", "10.64.100.1/32", "dev", "lo")
    run("iptables", "-t", "mangle", "-A", "OUTPUT", "-d", "10.64.100.1", "-j", "CONNMARK", "--set-mark", "0x101")
    clients = [f"10.64.1.{10 + i}" for i in range(n // 60000 + 1)]
    for c in clients:
        run("ip", "addr", "add", c + "/32", "dev", "lo")
    sent = 0
    for c in clients:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((c, 5000))
        for port in range(1, 60001):
            if sent == n:
                break
            s.sendto(b"x", ("10.64.100.1", port))
            sent += 1
        s.close()
    cfg = load(conf)
    marks = {t.mark for t in cfg.targets.values()}
    t0 = time.perf_counter()
    entries = conntrack.dump(marks)
    t1 = time.perf_counter()
    pins = P.misplaced(cfg, entries)
    t2 = time.perf_counter()
    print(json.dumps({"entries": len(entries), "dump_s": round(t1 - t0, 3), "misplaced_s": round(t2 - t1, 3),
                      "pins": P.count(pins)}))
""")


def _in_netns(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    ns = f"slbp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                              timeout=timeout, check=True)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def bench_conntrack(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="synlb-bench-pins-") as tmp:
        conf = os.path.join(tmp, "synlb.ini")
        with open(conf, "w") as fh:
            fh.write(CONFIG.format(state=tmp).replace("protocols = tcp, udp", "protocols = udp"))
        cp = _in_netns([sys.executable, "-c", _NETNS_DRIVER, str(n), conf], timeout=300)
        out = json.loads(cp.stdout)
        out["us_per_entry"] = round((out["dump_s"] + out["misplaced_s"]) / max(1, out["entries"]) * 1e6, 2)
        return out


_PEER_DRIVER = textwrap.dedent(r"""
    import json, os, subprocess, sys, time
    from synlb.config import load
    from synlb.plugins import NodeState
    from synlb.plugins import sync as S
    base, timeout = sys.argv[1], sys.argv[2]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run("ip", "link", "set", "lo", "up")
    for a in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):
        run("ip", "addr", "add", a + "/32", "dev", "lo")
    # the third peer is there but silent: every packet to it is dropped
    run("iptables", "-A", "INPUT", "-d", "127.0.0.13", "-j", "DROP")
    key = os.path.join(base, "key")
    with open(key, "w") as fh:
        fh.write("k" * 32)
    os.chmod(key, 0o600)
    class Host:
        def __init__(self, cfg):
            self.cfg, self.config_path = cfg, ""
    plugins = {}
    for me, peers in (("127.0.0.11", "127.0.0.12 127.0.0.13"), ("127.0.0.12", "127.0.0.11")):
        d = os.path.join(base, me)
        os.makedirs(os.path.join(d, "state"))
        with open(os.path.join(d, "synlb.ini"), "w") as fh:
            fh.write(open(sys.argv[3]).read().replace("{state}", d + "/state")
                     + f"[sync]\nlisten = {me}\npeers = {peers}\nkey_file = {key}\n"
                     + f"refresh = 3600\ntimeout = {timeout}\n")
        p = S.create(Host(load(os.path.join(d, "synlb.ini"))))
        p.start()
        plugins[me] = p
    a = plugins["127.0.0.11"]
    time.sleep(float(timeout) + 0.5)  # the start-up round
    t0 = time.time()
    a.exchange_all()
    took = time.time() - t0
    st = a.status()
    print(json.dumps({"round_s": round(took, 3),
                      "reachable_peer_answered_after_s": round(st["peers"]["127.0.0.12"]["last_ok"] - t0, 4),
                      "silent_peer_error": st["peers"]["127.0.0.13"]["error"]}))
    for p in plugins.values():
        p.stop()
""")


def bench_unreachable_peer(timeout: float = 1.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="synlb-bench-pins-") as tmp:
        template = os.path.join(tmp, "template.ini")
        with open(template, "w") as fh:
            fh.write(CONFIG.replace("[synlb]\n", "[synlb]\nplugins = lb, sync\n"))
        cp = _in_netns([sys.executable, "-c", _PEER_DRIVER, tmp, str(timeout), template], timeout=60)
        out = json.loads(cp.stdout)
        out["timeout_s"] = timeout
        return out


def bench_pins(plan) -> dict:
    quick = plan.quick
    return {
        "hotpath": bench_hotpath(plan.hotpath_packets),
        "misplaced": bench_misplaced((2_000,) if quick else (10_000, 100_000)),
        **bench_memory_and_message(10_000 if quick else 100_000),
        "conntrack": bench_conntrack(2_000 if quick else 50_000),
        "unreachable_peer": bench_unreachable_peer(),
    }
