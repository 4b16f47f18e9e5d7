"""Bounded packet generators for the reliability scenarios, run inside the
lab's client namespace (``python -m synlb_lab.flood ...``); one JSON line out.

``syn``: TCP SYNs to the VIP (IPv4 and IPv6 alternately, every source port
in turn), as fast as one process can send them on raw sockets, until
``--seconds`` or ``--max`` packets. Each SYN is a new connection for the
router's worker.

``udpfill``: one UDP datagram to each (address, port) of the given
addresses, from ``--sources`` sockets: every datagram is a distinct
5-tuple, so every one is a new conntrack entry in the router that forwards
it (unreplied, so not "assured": the kernel may evict them when full).

Both refuse any destination outside the lab's ranges (10.64.0.0/16,
fd64::/16): traffic never leaves the lab.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import struct
import sys
import time

LAB_NETS = (ipaddress.ip_network("10.64.0.0/16"), ipaddress.ip_network("fd64::/16"))
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)


def lab_address(text: str) -> str:
    a = ipaddress.ip_address(text)
    if not any(a.version == n.version and a in n for n in LAB_NETS):
        raise SystemExit(f"flood: {text} is not a lab address (10.64.0.0/16, fd64::/16): refused")
    return str(a)


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_syn(sport: int, dport: int, seq: int, src4: bytes | None = None, dst4: bytes | None = None) -> bytes:
    """A 20-byte TCP SYN header; with IPv4 addresses, its checksum filled in
    (IPv6: the kernel fills it, IPV6_CHECKSUM)."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    if src4 is None:
        return hdr
    pseudo = src4 + dst4 + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
    csum = ~_sum16(pseudo + hdr) & 0xFFFF
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:]


def syn_flood(vip4: str, vip6: str, src4: str, port: int, seconds: float, max_packets: int) -> dict:
    s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s6.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)
    rnd = random.Random(7)
    a4, d4 = socket.inet_pton(socket.AF_INET, src4), socket.inet_pton(socket.AF_INET, vip4)
    ports = range(1024, 65536)
    p4 = [tcp_syn(sp, port, rnd.getrandbits(32), a4, d4) for sp in ports]
    p6 = [tcp_syn(sp, port, rnd.getrandbits(32)) for sp in ports]
    dst4, dst6 = (vip4, 0), (vip6, 0)
    sent = errors = 0
    n = len(p4)
    t0 = time.monotonic()
    deadline = t0 + seconds
    i = 0
    while sent < max_packets:
        for _ in range(512):
            try:
                s4.sendto(p4[i], dst4)
                s6.sendto(p6[i], dst6)
                sent += 2
            except OSError:
                errors += 1
            i = i + 1 if i + 1 < n else 0
        if time.monotonic() >= deadline:
            break
    elapsed = time.monotonic() - t0
    return {"sent": sent, "errors": errors, "elapsed": round(elapsed, 3), "rate": round(sent / elapsed)}


def udp_fill(addresses: list[str], sources: int, count: int, seconds: float) -> dict:
    socks = []
    for _ in range(sources):
        fam = socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setblocking(False)
        socks.append(s)
    sent = errors = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    done = False
    for s in socks:
        for addr in addresses:
            for port in range(1, 65536):
                try:
                    s.sendto(b"x", (addr, port))
                    sent += 1
                except BlockingIOError:
                    errors += 1
                    time.sleep(0.0005)
                except OSError:
                    errors += 1
                if sent >= count or (sent & 1023 == 0 and time.monotonic() >= deadline):
                    done = True
                    break
            if done:
                break
        if done:
            break
    elapsed = time.monotonic() - t0
    return {"sent": sent, "errors": errors, "elapsed": round(elapsed, 3), "rate": round(sent / max(elapsed, 1e-9))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synlb_lab.flood")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("syn")
    s.add_argument("--vip4", required=True)
    s.add_argument("--vip6", required=True)
    s.add_argument("--src4", required=True)
    s.add_argument("--port", type=int, default=80)
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--max", type=int, default=5_000_000)
    u = sub.add_parser("udpfill")
    u.add_argument("--to", required=True, help="comma-separated addresses (one family)")
    u.add_argument("--sources", type=int, default=2)
    u.add_argument("--count", type=int, default=300_000)
    u.add_argument("--seconds", type=float, default=25.0)
    a = p.parse_args(argv)
    if a.cmd == "syn":
        out = syn_flood(lab_address(a.vip4), lab_address(a.vip6), lab_address(a.src4), a.port,
                        min(a.seconds, 60.0), a.max)
    else:
        out = udp_fill([lab_address(x) for x in a.to.split(",")], a.sources, a.count, min(a.seconds, 60.0))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
