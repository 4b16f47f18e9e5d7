"""Packet bytes -> flow key, in the client->VIP direction.  Pure; never raises.

A flow key is::

    version(1) proto(1) client_addr server_addr [client_port server_port]

``version`` is 4 or 6, addresses are 4 or 16 bytes, ports 2 bytes each, all
as on the wire (network order).  So a key is 10 or 14 bytes (IPv4), 34 or 38
bytes (IPv6).  ``proto`` is the upper-layer protocol: for IPv6, the protocol
found after the extension headers, so that e.g. a hop-by-hop header does not
move a flow to another target.

What goes into the key:

* TCP, UDP, SCTP, DCCP, UDP-Lite (source and destination ports are the first
  four bytes of each): addresses and ports.
* Fragments (IPv4 MF set or offset != 0; IPv6 fragment header with M set or
  offset != 0): addresses and protocol only, for the first fragment too, so
  that all fragments of a datagram hash alike (non-first fragments carry no
  ports).  An IPv6 "atomic" fragment (offset 0, M clear) is a whole packet.
* ICMP errors (IPv4 types 3, 4, 5, 11, 12; ICMPv6 types 1-4): the key of the
  embedded packet read backwards.  The embedded packet went VIP->client, so
  its reversal is exactly the key of the client->VIP flow it belongs to (e.g.
  "fragmentation needed" lands on the target that holds the connection).
  An embedded packet that is a non-first fragment gives addresses only.
* Anything else (ICMP echo, ESP, GRE, IPv6 "no next header", ...): addresses
  and protocol.

Truncation (the worker copies only the first bytes of a packet) degrades:
whatever part of the key cannot be read is left out -- ports, then the
embedded packet (the outer addresses are used instead), then the IPv6
extension header chain (the protocol is the last next-header value read).

Packets without even an IP header (shorter than 20/40 bytes, version not 4
or 6, IPv4 IHL < 5) get the fallback key ``b"\\x00" + packet[:40]``: version
byte 0 never collides with a real key, and equal garbage still hashes alike.

IPv6 addresses are those of the fixed header even when a routing header lists
further hops: that is the destination the packet reached this router with.
"""

from __future__ import annotations

import socket

FALLBACK_VERSION = b"\x00"
FALLBACK_BYTES = 40

# Upper-layer protocols whose first four bytes are source and destination port.
PORT_PROTOCOLS = frozenset({
    6,    # TCP
    17,   # UDP
    33,   # DCCP
    132,  # SCTP
    136,  # UDP-Lite
})

ICMP = 1
ICMPV6 = 58
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})  # unreach, quench, redirect, time, param
ICMPV6_ERROR_TYPES = frozenset({1, 2, 3, 4})  # unreach, too big, time, param
ICMP_HEADER_BYTES = 8  # type, code, checksum, 4 bytes; then the embedded packet

# IPv6 extension headers laid out as (next header, length in 8-octet units not
# counting the first 8, ...): hop-by-hop, routing, destination options,
# mobility, HIP, shim6 (RFC 7045 list, less fragment and AH which differ).
V6_EXT_8OCTET = frozenset({0, 43, 60, 135, 139, 140})
V6_FRAGMENT = 44  # fixed 8 bytes
V6_AH = 51  # length in 4-octet units, minus 2
# ESP (50) and no-next-header (59) end the chain: nothing readable follows.

# Key prefixes (version, proto), built once so the hot path only slices.
_V4_HEAD = tuple(bytes((4, p)) for p in range(256))
_V6_HEAD = tuple(bytes((6, p)) for p in range(256))


# The common case, an unfragmented IPv4 packet without options carrying a port
# protocol: the key is the head and bytes 12..24 (addresses, then ports).
_V4_PORT_HEAD = tuple(_V4_HEAD[p] if p in PORT_PROTOCOLS else None for p in range(256))


def flow_key(packet: bytes) -> bytes:
    """Canonical client->VIP flow key of an IP packet (see the module doc)."""
    try:
        # fast path: version 4 with IHL 5, not a fragment, TCP/UDP/SCTP/...;
        # the same key _v4_key builds, with one slice and no calls
        if len(packet) >= 24 and packet[0] == 0x45 and not (packet[6] & 0x3F or packet[7]):
            head = _V4_PORT_HEAD[packet[9]]
            if head is not None:
                return head + packet[12:24]
        key = _parse_key(packet)
        if key is not None:
            return key
        return FALLBACK_VERSION + bytes(packet[:FALLBACK_BYTES])
    except Exception:  # belt and braces: a bad key is better than a dead worker
        return FALLBACK_VERSION


def _parse_key(packet: bytes) -> bytes | None:
    """The key, or None when ``packet`` has no usable IP header."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        return _v4_key(packet)
    if version == 6:
        return _v6_key(packet)
    return None


def _v4_key(p: bytes) -> bytes | None:
    n = len(p)
    ihl = (p[0] & 0x0F) << 2
    if n < 20 or ihl < 20:
        return None
    proto = p[9]
    addresses = p[12:20]
    # MF flag and 13-bit fragment offset: any of them set means a fragment.
    if (p[6] & 0x3F) or p[7]:
        return _V4_HEAD[proto] + addresses
    if proto in PORT_PROTOCOLS:
        if n >= ihl + 4:
            return _V4_HEAD[proto] + addresses + p[ihl:ihl + 4]
    elif proto == ICMP and n > ihl and p[ihl] in ICMP_ERROR_TYPES:
        key = _v4_embedded_key(p, ihl + ICMP_HEADER_BYTES)
        if key is not None:
            return key
    return _V4_HEAD[proto] + addresses


def _v4_embedded_key(p: bytes, at: int) -> bytes | None:
    """Reversed key of the IPv4 packet quoted in an ICMP error at ``at``."""
    n = len(p)
    if n < at + 20 or p[at] >> 4 != 4:
        return None
    ihl = (p[at] & 0x0F) << 2
    if ihl < 20:
        return None
    proto = p[at + 9]
    # Concatenate onto the bytes prefix first: works for memoryview input too.
    key = _V4_HEAD[proto] + p[at + 16:at + 20] + p[at + 12:at + 16]
    non_first_fragment = (p[at + 6] & 0x1F) or p[at + 7]
    l4 = at + ihl
    if proto in PORT_PROTOCOLS and not non_first_fragment and n >= l4 + 4:
        return key + p[l4 + 2:l4 + 4] + p[l4:l4 + 2]
    return key


def _v6_key(p: bytes) -> bytes | None:
    n = len(p)
    if n < 40:
        return None
    addresses = p[8:40]
    proto, l4, fragment = _skip_v6_extensions(p, p[6], 40)
    # Fragment field = offset << 3 | M: either set means a real fragment.
    if l4 < 0 or fragment & 0xFFF9:
        return _V6_HEAD[proto] + addresses
    if proto in PORT_PROTOCOLS:
        if n >= l4 + 4:
            return _V6_HEAD[proto] + addresses + p[l4:l4 + 4]
    elif proto == ICMPV6 and n > l4 and p[l4] in ICMPV6_ERROR_TYPES:
        key = _v6_embedded_key(p, l4 + ICMP_HEADER_BYTES)
        if key is not None:
            return key
    return _V6_HEAD[proto] + addresses


def _v6_embedded_key(p: bytes, at: int) -> bytes | None:
    """Reversed key of the IPv6 packet quoted in an ICMPv6 error at ``at``."""
    n = len(p)
    if n < at + 40 or p[at] >> 4 != 6:
        return None
    proto, l4, fragment = _skip_v6_extensions(p, p[at + 6], at + 40)
    key = _V6_HEAD[proto] + p[at + 24:at + 40] + p[at + 8:at + 24]
    non_first_fragment = fragment & 0xFFF8
    if proto in PORT_PROTOCOLS and l4 >= 0 and not non_first_fragment and n >= l4 + 4:
        return key + p[l4 + 2:l4 + 4] + p[l4:l4 + 2]
    return key


def _skip_v6_extensions(p: bytes, next_header: int, at: int) -> tuple[int, int, int]:
    """Walk the extension headers starting at ``at``.

    Returns ``(protocol, offset of the upper-layer header or -1 if the chain
    is cut short, fragment field or 0)``.  Every header is >= 8 bytes, so the
    walk ends within len(p) / 8 steps whatever the bytes say.
    """
    n = len(p)
    fragment = 0
    while True:
        if next_header in V6_EXT_8OCTET:
            if n < at + 2:
                return next_header, -1, fragment
            following = p[at]
            at += (p[at + 1] + 1) << 3
        elif next_header == V6_FRAGMENT:
            if n < at + 4:
                return next_header, -1, fragment
            following = p[at]
            fragment = (p[at + 2] << 8) | p[at + 3]
            at += 8
        elif next_header == V6_AH:
            if n < at + 2:
                return next_header, -1, fragment
            following = p[at]
            at += (p[at + 1] + 2) << 2
        else:
            return next_header, (at if at <= n else -1), fragment
        next_header = following


def key_of(proto: int, client: str, server: str, client_port: int | None = None,
           server_port: int | None = None) -> bytes:
    """The flow key of a connection given as text addresses and ports (what
    conntrack prints), equal to ``flow_key`` of its client->VIP packets.
    Ports are left out for protocols without them, as ``flow_key`` does."""
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    version = 6 if family == socket.AF_INET6 else 4
    head = (_V6_HEAD if version == 6 else _V4_HEAD)[proto]
    key = head + socket.inet_pton(family, client) + socket.inet_pton(family, server)
    if proto in PORT_PROTOCOLS and client_port is not None and server_port is not None:
        key += client_port.to_bytes(2, "big") + server_port.to_bytes(2, "big")
    return key


def is_flow_key(key: bytes) -> bool:
    """``key`` has the shape of a real flow key (not the fallback)."""
    if len(key) < 2 or key[0] not in (4, 6):
        return False
    width = 4 if key[0] == 4 else 16
    if len(key) == 2 + 2 * width:  # no ports: another protocol, or a fragment
        return True
    return len(key) == 6 + 2 * width and key[1] in PORT_PROTOCOLS


TCP = 6
SYN, ACK = 0x02, 0x10
OPENING = SYN | ACK  # the flags that tell an opening SYN (SYN without ACK) from the rest


def tcp_flags(packet: bytes) -> int | None:
    """The TCP flags byte of an unfragmented TCP packet, else None (anything
    unreadable, and anything but TCP). With it, ``flags & OPENING == SYN`` is
    a connection's opening packet; any other TCP packet a router sees first
    of its connection (what reaches a worker, or the nftables engine's hash)
    was running before, picked up after a failover or an ECMP change."""
    try:
        version = packet[0] >> 4
        if version == 4:
            if packet[9] != TCP or (packet[6] & 0x3F) or packet[7]:
                return None
            at = ((packet[0] & 0x0F) << 2) + 13
        elif version == 6:
            proto, l4, fragment = _skip_v6_extensions(packet, packet[6], 40)
            if proto != TCP or l4 < 0 or fragment & 0xFFF9:
                return None
            at = l4 + 13
        else:
            return None
        return packet[at]
    except IndexError:
        return None


def opens_connection(packet: bytes) -> bool:
    """A TCP SYN without ACK: the first packet of a new connection (as
    opposed to a running one seen for the first time, e.g. after a
    failover). Anything unreadable counts as not opening."""
    flags = tcp_flags(packet)
    return flags is not None and flags & OPENING == SYN


def describe(packet: bytes) -> str:
    """Short text for logs: the packet's flow key, e.g. ``tcp 10.0.0.1:5 > 10.0.0.2:80``."""
    return format_key(flow_key(packet))


def format_key(key: bytes) -> str:
    """Human text of a flow key (anything not shaped like one is shown as hex)."""
    version = key[0] if key else 0
    width = 4 if version == 4 else 16 if version == 6 else 0
    if not width or len(key) not in (2 + 2 * width, 6 + 2 * width):
        return f"unparsed {bytes(key[1:]).hex()}"
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    proto = key[1]
    client = socket.inet_ntop(family, bytes(key[2:2 + width]))
    server = socket.inet_ntop(family, bytes(key[2 + width:2 + 2 * width]))
    name = _PROTO_NAMES.get(proto, f"proto {proto}")
    if len(key) == 2 + 2 * width:
        return f"{name} {client} > {server}"
    ports = key[2 + 2 * width:]
    client_port = (ports[0] << 8) | ports[1]
    server_port = (ports[2] << 8) | ports[3]
    if version == 6:
        return f"{name} [{client}]:{client_port} > [{server}]:{server_port}"
    return f"{name} {client}:{client_port} > {server}:{server_port}"


_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 50: "esp", 51: "ah",
                58: "icmpv6", 59: "ipv6-nonxt", 132: "sctp", 136: "udplite"}
