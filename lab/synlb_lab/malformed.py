"""Malformed, truncated, fragmented and oversized packets and ICMP errors at
the VIP, built with scapy and sent as raw Ethernet frames from the lab's
client namespace to its gateway (``python -m synlb_lab.malformed``); one
JSON line out: packets sent per kind.

Frames go out of the client's ``eth0`` to the gateway's MAC address with the
VIP as IP destination, so nothing leaves the lab (every destination is
checked against the lab's ranges). Raw frames, not a raw IP socket: the
kernel would fix a raw socket's total length and checksum.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from .flood import lab_address

KINDS_DOC = {
    "syn_control": "a well-formed SYN (the control)",
    "ip_truncated": "an IP header claiming a TCP segment the frame does not carry",
    "ip_bad_lengths": "total length shorter than the header, longer than the frame; IHL < 5; IHL 15 with no options",
    "ip_bad_checksum": "IPv4 header checksum wrong",
    "ip_bad_version": "version 5 / 7 / 0 in an IPv4 frame",
    "ip_options": "IPv4 options: 40 bytes of NOP, record route, timestamp, garbage",
    "tcp_truncated": "TCP header cut at 1..19 bytes (IP lengths consistent)",
    "tcp_bad_offset": "TCP data offset 0..4 and 15 with no options",
    "tcp_flags": "SYN+FIN, SYN+RST, SYN+ACK, FIN, RST, no flags, every flag",
    "tcp_options": "TCP options: garbage, MSS 0, window scale 255, option lengths past the header",
    "tcp_bad_checksum": "TCP checksum wrong",
    "tcp_syn_payload": "SYN with 1400 bytes of payload",
    "frag_tiny": "SYN in 8-byte fragments (TCP header split across fragments)",
    "frag_overlap": "overlapping fragments of a SYN",
    "frag_missing_first": "the later fragments of a datagram whose first never comes",
    "frag_first_only": "a first fragment (MF set) whose rest never comes",
    "oversized": "64 000-byte SYN (IPv4) and 60 000-byte SYN (IPv6) in MTU-sized fragments",
    "v6_ext_chain": "IPv6 extension header chains: 8 destination options, hop-by-hop + routing + atomic fragment",
    "v6_bad_ext": "IPv6 extension headers cut short, lengths past the packet, unknown next header",
    "v6_jumbo": "IPv6 payload length 0 with a jumbo hop-by-hop option",
    "icmp_errors": "ICMP/ICMPv6 errors (unreachable, frag needed, too big, time exceeded, param problem) quoting VIP:80 flows, some with cut quotes",
    "udp_to_vip": "UDP to VIP:80 (a protocol the service does not balance)",
    "random_l3": "valid IPv4/IPv6 header + 0-300 random bytes as TCP, 100 per family",
    "garbage_frames": "Ethernet frames typed IPv4/IPv6 with random bytes and empty ones",
}


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip4_with_options(src: str, dst: str, proto: int, options: bytes, payload: bytes) -> bytes:
    """An IPv4 header with these option bytes (padded to 4), checksum right."""
    import socket
    import struct
    options += bytes(-len(options) % 4)
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 1, 0, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst)) + options
    hdr = hdr[:10] + _csum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + payload


def build(vip4: str, vip6: str, src4: str, src6: str, seed: int = 5):
    from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
    from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6ParamProblem,
                                    ICMPv6TimeExceeded, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                    IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Jumbo, fragment6)
    from scapy.packet import Raw

    rnd = random.Random(seed)

    def sport() -> int:
        return rnd.randint(20000, 60000)

    def syn4(**kw):
        return IP(src=src4, dst=vip4) / TCP(sport=sport(), dport=80, flags="S", **kw)

    def syn6(**kw):
        return IPv6(src=src6, dst=vip6) / TCP(sport=sport(), dport=80, flags="S", **kw)

    out: dict[str, list] = {k: [] for k in KINDS_DOC}
    out["syn_control"] += [syn4(), syn6()]
    for cut in (20, 24, 30, 39):
        out["ip_truncated"].append(Raw(bytes(syn4())[:cut]))
        out["ip_truncated"].append(Raw(bytes(syn6())[:cut + 20]))
    b = bytearray(bytes(syn4()))
    for tl in (10, 19, 60, 1500, 65535):
        x = bytearray(b)
        x[2:4] = tl.to_bytes(2, "big")
        out["ip_bad_lengths"].append(Raw(bytes(x)))
    for ihl in (0, 1, 4, 15):
        x = bytearray(b)
        x[0] = 0x40 | ihl
        out["ip_bad_lengths"].append(Raw(bytes(x)))
    out["ip_bad_checksum"] += [IP(src=src4, dst=vip4, chksum=0x1234) / TCP(sport=sport(), dport=80, flags="S")]
    for v in (5, 7, 0):
        x = bytearray(b)
        x[0] = (v << 4) | 5
        out["ip_bad_version"].append(Raw(bytes(x)))
    for opts in (b"\x01" * 40, b"\x07\x27\x04" + bytes(36) + b"\x00", b"\x44\x28\x05\x00" + bytes(36),
                 bytes(rnd.getrandbits(8) for _ in range(40)), b"\x83\xff\x00\x00"):
        seg = bytes(syn4())[20:]
        out["ip_options"].append(Raw(ip4_with_options(src4, vip4, 6, opts, seg)))
    for cut in (1, 4, 12, 13, 14, 19):
        tcp = bytes(TCP(sport=sport(), dport=80, flags="S"))[:cut]
        out["tcp_truncated"].append(IP(src=src4, dst=vip4, proto=6) / Raw(tcp))
        out["tcp_truncated"].append(IPv6(src=src6, dst=vip6, nh=6) / Raw(tcp))
    for off in (0, 1, 4, 15):
        out["tcp_bad_offset"] += [syn4(dataofs=off), syn6(dataofs=off)]
    for fl in ("SF", "SR", "SA", "F", "R", "", "FSRPAUEC", "SU", "SE"):
        out["tcp_flags"] += [IP(src=src4, dst=vip4) / TCP(sport=sport(), dport=80, flags=fl),
                             IPv6(src=src6, dst=vip6) / TCP(sport=sport(), dport=80, flags=fl)]
    for opts in ([(255, b"\xff" * 6)], [("MSS", 0)], [("WScale", 255)], [("SAckOK", b""), ("Timestamp", (0, 0))]):
        out["tcp_options"] += [syn4(options=opts), syn6(options=opts)]
    for raw_opts in (b"\x02\x28" + bytes(2), b"\x08\xff" + bytes(6), b"\x03", bytes(rnd.getrandbits(8) for _ in range(40))):
        t = bytearray(bytes(TCP(sport=sport(), dport=80, flags="S")))
        pad = raw_opts + bytes(-len(raw_opts) % 4)
        t[12] = ((20 + len(pad)) // 4) << 4
        seg = bytes(t) + pad
        out["tcp_options"] += [IP(src=src4, dst=vip4, proto=6) / Raw(seg), IPv6(src=src6, dst=vip6, nh=6) / Raw(seg)]
    out["tcp_bad_checksum"] += [syn4(chksum=0xBEEF), syn6(chksum=0xBEEF)]
    out["tcp_syn_payload"] += [syn4() / Raw(b"p" * 1400), syn6() / Raw(b"p" * 1380)]
    out["frag_tiny"] += fragment(syn4() / Raw(b"t" * 40), fragsize=8)
    out["frag_tiny"] += fragment6(IPv6(src=src6, dst=vip6) / IPv6ExtHdrFragment() / TCP(sport=sport(), dport=80, flags="S") / Raw(b"t" * 100), 100)
    frags = fragment(syn4() / Raw(b"o" * 64), fragsize=32)
    if len(frags) > 1:
        dup = frags[1].copy()
        dup.frag = max(0, dup.frag - 2)  # overlaps the first
        out["frag_overlap"] += [frags[0], dup, *frags[1:]]
    frags = fragment(syn4() / Raw(b"m" * 200), fragsize=64)
    out["frag_missing_first"] += frags[1:]
    out["frag_first_only"] += frags[:1]
    f6 = fragment6(IPv6(src=src6, dst=vip6) / IPv6ExtHdrFragment() / TCP(sport=sport(), dport=80, flags="S") / Raw(b"m" * 400), 200)
    out["frag_missing_first"] += f6[1:]
    out["frag_first_only"] += f6[:1]
    out["oversized"] += fragment(syn4() / Raw(b"O" * 64000), fragsize=1480)
    out["oversized"] += fragment6(IPv6(src=src6, dst=vip6) / IPv6ExtHdrFragment() / TCP(sport=sport(), dport=80, flags="S") / Raw(b"O" * 60000), 1400)
    chain = IPv6(src=src6, dst=vip6)
    for _ in range(8):
        chain = chain / IPv6ExtHdrDestOpt()
    out["v6_ext_chain"] += [chain / TCP(sport=sport(), dport=80, flags="S"),
                            IPv6(src=src6, dst=vip6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[vip6])
                            / IPv6ExtHdrFragment(offset=0, m=0) / TCP(sport=sport(), dport=80, flags="S")]
    for body in (b"\x06\x00", b"\x06\x20" + bytes(6), b"\x3b\x00" + bytes(6) + bytes(20), b"\xfe\x00" + bytes(6)):
        for nh in (0, 60, 43, 44, 51):
            out["v6_bad_ext"].append(IPv6(src=src6, dst=vip6, nh=nh) / Raw(body))
    out["v6_jumbo"] += [IPv6(src=src6, dst=vip6, plen=0) / IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=70000)])
                        / TCP(sport=sport(), dport=80, flags="S")]
    # ICMP errors as a target would send them about a VIP:80 -> client packet
    q4 = bytes(IP(src=vip4, dst=src4) / TCP(sport=80, dport=sport(), flags="SA"))
    q6 = bytes(IPv6(src=vip6, dst=src6) / TCP(sport=80, dport=sport(), flags="SA"))
    for t, c in ((3, 4), (3, 1), (11, 0), (12, 0), (5, 1), (4, 0)):
        for quote in (q4, q4[:28], q4[:20], q4[:8], b"", q6):
            out["icmp_errors"].append(IP(src=src4, dst=vip4) / ICMP(type=t, code=c) / Raw(quote))
    for layer in (ICMPv6DestUnreach(), ICMPv6PacketTooBig(mtu=1280), ICMPv6TimeExceeded(), ICMPv6ParamProblem(ptr=6)):
        for quote in (q6, q6[:48], q6[:40], q6[:8], q4):
            out["icmp_errors"].append(IPv6(src=src6, dst=vip6) / layer / Raw(quote))
    out["udp_to_vip"] += [IP(src=src4, dst=vip4) / UDP(sport=sport(), dport=80) / Raw(b"u" * 32),
                          IPv6(src=src6, dst=vip6) / UDP(sport=sport(), dport=80) / Raw(b"u" * 32)]
    for _ in range(100):
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 300)))
        out["random_l3"] += [IP(src=src4, dst=vip4, proto=6) / Raw(body), IPv6(src=src6, dst=vip6, nh=6) / Raw(body)]
    return out


def frames(packets: dict, gw_mac: str, seed: int = 6) -> dict[str, list]:
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    rnd = random.Random(seed)
    out: dict[str, list] = {}
    for kind, pkts in packets.items():
        out[kind] = []
        for p in pkts:
            raw = bytes(p)
            etype = 0x86DD if raw and raw[0] >> 4 == 6 else 0x0800
            out[kind].append(Ether(dst=gw_mac, type=etype) / Raw(raw))
    garbage = []
    for _ in range(40):
        etype = rnd.choice((0x0800, 0x86DD))
        garbage.append(Ether(dst=gw_mac, type=etype) / Raw(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 80)))))
    garbage.append(Ether(dst=gw_mac, type=0x0800))
    garbage.append(Ether(dst=gw_mac, type=0x86DD))
    out["garbage_frames"] = garbage
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synlb_lab.malformed")
    p.add_argument("--vip4", required=True)
    p.add_argument("--vip6", required=True)
    p.add_argument("--src4", required=True)
    p.add_argument("--src6", required=True)
    p.add_argument("--gw-mac", required=True)
    p.add_argument("--iface", default="eth0")
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args(argv)
    for addr in (a.vip4, a.vip6, a.src4, a.src6):
        lab_address(addr)
    import logging
    logging.getLogger("scapy").setLevel(logging.ERROR)
    from scapy.sendrecv import sendp
    out = frames(build(a.vip4, a.vip6, a.src4, a.src6), a.gw_mac)
    counts = {}
    for kind, fr in out.items():
        for _ in range(max(1, min(a.repeat, 20))):
            sendp(fr, iface=a.iface, verbose=False)
        counts[kind] = len(fr) * max(1, min(a.repeat, 20))
    print(json.dumps({"sent": counts, "total": sum(counts.values())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
