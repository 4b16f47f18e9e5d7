"""packet.flow_key on hand-built packets, plus fuzzing: it must never raise."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synlb.packet import _parse_key, describe, flow_key, format_key

TCP, UDP, SCTP, ICMP, ESP, ICMPV6, NO_NEXT = 6, 17, 132, 1, 50, 58, 59
HOP_BY_HOP, ROUTING, FRAGMENT, AH, DEST_OPTS = 0, 43, 44, 51, 60
DF, MF = 0x4000, 0x2000

# Lab addresses (docs/ARCHITECTURE.md).
CLIENT4, VIP4, ROUTER4 = "10.64.1.10", "10.64.100.1", "10.64.1.1"
CLIENT6, VIP6, ROUTER6 = "fd64:1::10", "fd64:100::1", "fd64:1::1"
CLIENT_PORT, SERVICE_PORT = 40000, 443


def a4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def a6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


# -- packet builders (checksums left 0: the parser does not read them)


def ipv4(src, dst, proto, payload, options=b"", frag=0, ident=1):
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), ident,
                         frag, 64, proto, 0, a4(src), a4(dst))
    return header + options + payload


def ipv6(src, dst, next_header, payload):
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                       a6(src), a6(dst)) + payload


def tcp_syn(sport, dport):
    return struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)


def udp(sport, dport, data=b"hello"):
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def sctp_init(sport, dport):
    return struct.pack("!HHII", sport, dport, 0, 0) + bytes(20)


def icmp(type_, code, quoted, rest=0):
    # ICMP and ICMPv6 share this layout: type, code, checksum, 4 bytes, body.
    return struct.pack("!BBHI", type_, code, 0, rest) + quoted


def hop_by_hop(next_header, units=0):
    # PadN option filling the header: 8 * (units + 1) bytes in all.
    pad = 8 * (units + 1) - 2
    return bytes((next_header, units, 1, pad - 2)) + bytes(pad - 2)


def dest_opts(next_header):
    return hop_by_hop(next_header)


def routing(next_header):
    # Type 4 (segment routing) with segments left 0 and one segment.
    return bytes((next_header, 2, 4, 0, 0, 0, 0, 0)) + a6(VIP6)


def fragment(next_header, offset, more, ident=7):
    return struct.pack("!BBHI", next_header, 0, (offset << 3) | more, ident)


def ah(next_header):
    # 12 bytes of header + 12 bytes ICV = 24 = (4 + 2) * 4.
    return struct.pack("!BBHII", next_header, 4, 0, 0x1000, 1) + bytes(12)


def key4(proto, src, dst, ports=None):
    key = bytes((4, proto)) + a4(src) + a4(dst)
    return key + struct.pack("!HH", *ports) if ports else key


def key6(proto, src, dst, ports=None):
    key = bytes((6, proto)) + a6(src) + a6(dst)
    return key + struct.pack("!HH", *ports) if ports else key


CLIENT_FLOW4 = key4(TCP, CLIENT4, VIP4, (CLIENT_PORT, SERVICE_PORT))
CLIENT_FLOW6 = key6(TCP, CLIENT6, VIP6, (CLIENT_PORT, SERVICE_PORT))


# -- IPv4


@pytest.mark.parametrize("proto, l4", [
    (TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT)),
    (UDP, udp(CLIENT_PORT, SERVICE_PORT)),
    (SCTP, sctp_init(CLIENT_PORT, SERVICE_PORT)),
])
def test_v4_ports(proto, l4):
    assert flow_key(ipv4(CLIENT4, VIP4, proto, l4)) == key4(proto, CLIENT4, VIP4, (CLIENT_PORT, SERVICE_PORT))


def test_v4_options_are_skipped():
    options = bytes((7, 11, 4)) + bytes(8) + b"\x00"  # record route, end of list
    packet = ipv4(CLIENT4, VIP4, TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT), options=options)
    assert packet[0] & 0x0F == 8
    assert flow_key(packet) == CLIENT_FLOW4


def test_v4_dont_fragment_is_not_a_fragment():
    assert flow_key(ipv4(CLIENT4, VIP4, TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT), frag=DF)) == CLIENT_FLOW4


def test_v4_fragments_all_hash_on_addresses():
    first = ipv4(CLIENT4, VIP4, UDP, udp(CLIENT_PORT, SERVICE_PORT, bytes(64)), frag=MF)
    middle = ipv4(CLIENT4, VIP4, UDP, bytes(64), frag=MF | 9)
    last = ipv4(CLIENT4, VIP4, UDP, bytes(16), frag=18)
    expected = key4(UDP, CLIENT4, VIP4)
    assert flow_key(first) == flow_key(middle) == flow_key(last) == expected


def test_v4_echo_hashes_on_addresses_and_proto():
    echo = ipv4(CLIENT4, VIP4, ICMP, icmp(8, 0, b"ping" * 8, rest=0x00010001))
    assert flow_key(echo) == key4(ICMP, CLIENT4, VIP4)


def test_v4_other_protocol_hashes_on_addresses():
    assert flow_key(ipv4(CLIENT4, VIP4, ESP, bytes(32))) == key4(ESP, CLIENT4, VIP4)


def vip_reply4(proto=TCP, l4=None, **kw):
    """What the VIP sent back to the client (the packet an ICMP error quotes)."""
    return ipv4(VIP4, CLIENT4, proto, l4 if l4 is not None else tcp_syn(SERVICE_PORT, CLIENT_PORT), **kw)


def test_v4_fragmentation_needed_matches_client_flow():
    quoted = vip_reply4(frag=DF)[:28]  # IP header + 8 bytes, as routers quote
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(3, 4, quoted, rest=1400))
    assert flow_key(error) == CLIENT_FLOW4


@pytest.mark.parametrize("icmp_type", [3, 4, 5, 11, 12])
def test_v4_every_error_type_uses_the_quoted_flow(icmp_type):
    client = ipv4(CLIENT4, VIP4, UDP, udp(CLIENT_PORT, 53))
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(icmp_type, 0, ipv4(VIP4, CLIENT4, UDP, udp(53, CLIENT_PORT))))
    assert flow_key(error) == flow_key(client)


def test_v4_error_quoting_options():
    quoted = vip_reply4(options=bytes(8))
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(11, 0, quoted))
    assert flow_key(error) == CLIENT_FLOW4


def test_v4_error_quoting_echo_matches_echo():
    echo = ipv4(CLIENT4, VIP4, ICMP, icmp(8, 0, b"x" * 8))
    reply = ipv4(VIP4, CLIENT4, ICMP, icmp(0, 0, b"x" * 8))
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(3, 1, reply))
    assert flow_key(error) == flow_key(echo)


def test_v4_error_quoting_non_first_fragment_uses_addresses():
    quoted = vip_reply4(UDP, bytes(16), frag=100)
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(11, 1, quoted))
    assert flow_key(error) == key4(UDP, CLIENT4, VIP4)


def test_v4_error_quote_without_ports_uses_addresses():
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(3, 4, vip_reply4()[:22]))
    assert flow_key(error) == key4(TCP, CLIENT4, VIP4)


@pytest.mark.parametrize("quoted", [b"", vip_reply4()[:19], ipv6(VIP6, CLIENT6, TCP, b""), b"\x44" + bytes(40)])
def test_v4_error_with_bad_quote_uses_outer_addresses(quoted):
    error = ipv4(ROUTER4, VIP4, ICMP, icmp(3, 4, quoted))
    assert flow_key(error) == key4(ICMP, ROUTER4, VIP4)


def test_v4_truncated_transport_uses_addresses():
    packet = ipv4(CLIENT4, VIP4, TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT))[:22]
    assert flow_key(packet) == key4(TCP, CLIENT4, VIP4)


def test_v4_header_longer_than_packet_uses_addresses():
    packet = ipv4(CLIENT4, VIP4, TCP, b"", options=bytes(40))[:30]
    assert flow_key(packet) == key4(TCP, CLIENT4, VIP4)


# -- IPv6


@pytest.mark.parametrize("proto, l4", [
    (TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT)),
    (UDP, udp(CLIENT_PORT, SERVICE_PORT)),
    (SCTP, sctp_init(CLIENT_PORT, SERVICE_PORT)),
])
def test_v6_ports(proto, l4):
    assert flow_key(ipv6(CLIENT6, VIP6, proto, l4)) == key6(proto, CLIENT6, VIP6, (CLIENT_PORT, SERVICE_PORT))


SYN6 = tcp_syn(CLIENT_PORT, SERVICE_PORT)


@pytest.mark.parametrize("first, chain", [
    (HOP_BY_HOP, hop_by_hop(TCP)),
    (HOP_BY_HOP, hop_by_hop(TCP, units=3)),
    (DEST_OPTS, dest_opts(TCP)),
    (ROUTING, routing(TCP)),
    (AH, ah(TCP)),
    (FRAGMENT, fragment(TCP, 0, 0)),  # atomic fragment: a whole packet
    (HOP_BY_HOP, hop_by_hop(ROUTING) + routing(DEST_OPTS) + dest_opts(AH) + ah(TCP)),
])
def test_v6_extension_headers_are_skipped(first, chain):
    assert flow_key(ipv6(CLIENT6, VIP6, first, chain + SYN6)) == CLIENT_FLOW6


def test_v6_hop_by_hop_and_fragments_hash_on_addresses():
    first = ipv6(CLIENT6, VIP6, HOP_BY_HOP, hop_by_hop(FRAGMENT) + fragment(UDP, 0, 1) + udp(1, 2, bytes(64)))
    later = ipv6(CLIENT6, VIP6, HOP_BY_HOP, hop_by_hop(FRAGMENT) + fragment(UDP, 9, 1) + bytes(72))
    last = ipv6(CLIENT6, VIP6, FRAGMENT, fragment(UDP, 18, 0) + bytes(8))
    assert flow_key(first) == flow_key(later) == flow_key(last) == key6(UDP, CLIENT6, VIP6)


@pytest.mark.parametrize("first, chain, proto", [
    (ESP, bytes(40), ESP),
    (NO_NEXT, b"", NO_NEXT),
    (HOP_BY_HOP, hop_by_hop(NO_NEXT) + bytes(16), NO_NEXT),
    (DEST_OPTS, dest_opts(ESP) + bytes(24), ESP),
    (ICMPV6, icmp(128, 0, b"ping"), ICMPV6),  # echo request
])
def test_v6_without_ports_hash_on_addresses(first, chain, proto):
    assert flow_key(ipv6(CLIENT6, VIP6, first, chain)) == key6(proto, CLIENT6, VIP6)


def vip_reply6(chain=b"", first=TCP):
    return ipv6(VIP6, CLIENT6, first, chain + tcp_syn(SERVICE_PORT, CLIENT_PORT))


def test_v6_packet_too_big_matches_client_flow():
    error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(2, 0, vip_reply6() + bytes(1000), rest=1280))
    assert flow_key(error[:256]) == CLIENT_FLOW6  # the worker copies 256 bytes


@pytest.mark.parametrize("icmp_type", [1, 2, 3, 4])
def test_v6_every_error_type_uses_the_quoted_flow(icmp_type):
    error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(icmp_type, 0, vip_reply6()))
    assert flow_key(error) == CLIENT_FLOW6


def test_v6_error_with_extension_headers_both_sides():
    quoted = vip_reply6(hop_by_hop(DEST_OPTS) + dest_opts(TCP), first=HOP_BY_HOP)
    error = ipv6(ROUTER6, VIP6, HOP_BY_HOP, hop_by_hop(ICMPV6) + icmp(2, 0, quoted, rest=1280))
    assert flow_key(error) == CLIENT_FLOW6


def test_v6_error_quoting_non_first_fragment_uses_addresses():
    quoted = ipv6(VIP6, CLIENT6, FRAGMENT, fragment(TCP, 100, 1) + bytes(16))
    error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(3, 1, quoted))
    assert flow_key(error) == key6(TCP, CLIENT6, VIP6)


def test_v6_error_quoting_first_fragment_uses_ports():
    quoted = ipv6(VIP6, CLIENT6, FRAGMENT, fragment(TCP, 0, 1) + tcp_syn(SERVICE_PORT, CLIENT_PORT))
    error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(2, 0, quoted))
    assert flow_key(error) == CLIENT_FLOW6


@pytest.mark.parametrize("quoted", [b"", vip_reply6()[:39], ipv4(VIP4, CLIENT4, TCP, bytes(40))])
def test_v6_error_with_bad_quote_uses_outer_addresses(quoted):
    error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(1, 0, quoted))
    assert flow_key(error) == key6(ICMPV6, ROUTER6, VIP6)


def test_v6_chain_cut_short_uses_addresses_and_last_next_header():
    packet = ipv6(CLIENT6, VIP6, HOP_BY_HOP, hop_by_hop(DEST_OPTS, units=2) + dest_opts(TCP) + SYN6)
    assert flow_key(packet[:50]) == key6(DEST_OPTS, CLIENT6, VIP6)  # inside hop-by-hop
    assert flow_key(packet[:65]) == key6(DEST_OPTS, CLIENT6, VIP6)  # dest opts header's first byte only
    assert flow_key(packet[:66]) == key6(TCP, CLIENT6, VIP6)  # dest opts readable, TCP cut
    assert flow_key(packet[:76]) == CLIENT_FLOW6


# -- truncation, garbage, other input types


@pytest.mark.parametrize("packet", [
    b"", b"\x45", bytes(19), b"\x45" + bytes(18), b"\x44" + bytes(39),  # IHL 4 < 5
    b"\x60" + bytes(38), b"\x00" * 60, b"\xff" * 60,
])
def test_garbage_gets_fallback_key(packet):
    assert flow_key(packet) == b"\x00" + packet[:40]


def test_long_packet_cut_to_256_bytes_keeps_its_key():
    full = ipv4(CLIENT4, VIP4, TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT) + bytes(1400))
    assert flow_key(full[:256]) == flow_key(full) == CLIENT_FLOW4


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_other_buffer_types(wrap):
    v4_error = ipv4(ROUTER4, VIP4, ICMP, icmp(3, 4, vip_reply4()))
    v6_error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(2, 0, vip_reply6()))
    assert bytes(flow_key(wrap(v4_error))) == CLIENT_FLOW4
    assert bytes(flow_key(wrap(v6_error))) == CLIENT_FLOW6


def test_describe():
    assert describe(ipv4(CLIENT4, VIP4, TCP, tcp_syn(CLIENT_PORT, SERVICE_PORT))) == \
        "tcp 10.64.1.10:40000 > 10.64.100.1:443"
    assert describe(ipv6(CLIENT6, VIP6, ESP, bytes(40))) == "esp fd64:1::10 > fd64:100::1"
    assert describe(ipv6(CLIENT6, VIP6, UDP, udp(1, 2))) == "udp [fd64:1::10]:1 > [fd64:100::1]:2"
    assert describe(b"\x01\x02") == "unparsed 0102"
    assert format_key(b"") == "unparsed "


# -- fuzzing: never raise, always a well-formed key


def assert_well_formed(key: bytes, packet: bytes) -> None:
    assert isinstance(key, bytes)
    if key[0] == 0:
        assert key == b"\x00" + packet[:40]
    elif key[0] == 4:
        assert len(key) in (10, 14)
    else:
        assert key[0] == 6 and len(key) in (34, 38)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(packet):
    key = _parse_key(packet)  # unguarded: a raise here is a parser bug
    assert_well_formed(flow_key(packet), packet)
    assert key is None or key == flow_key(packet)
    describe(packet)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\x45", b"\x4f", b"\x60", b"\x6f"]), st.binary(max_size=300))
def test_arbitrary_bytes_behind_an_ip_version_never_raise(first, rest):
    packet = first + rest
    _parse_key(packet)
    assert_well_formed(flow_key(packet), packet)


def valid_packets():
    ports = st.integers(0, 65535)
    l4 = st.one_of(
        st.builds(lambda s, d: (TCP, tcp_syn(s, d)), ports, ports),
        st.builds(lambda s, d: (UDP, udp(s, d)), ports, ports),
        st.builds(lambda s, d: (SCTP, sctp_init(s, d)), ports, ports),
        st.just((ICMP, icmp(8, 0, b"ping"))),
    )
    v4 = st.builds(lambda pl: ipv4(CLIENT4, VIP4, *pl), l4)
    v4_error = st.builds(lambda pl: ipv4(ROUTER4, VIP4, ICMP, icmp(3, 4, ipv4(VIP4, CLIENT4, *pl))), l4)
    v6_chain = st.sampled_from([
        (TCP, b""), (HOP_BY_HOP, hop_by_hop(TCP)), (FRAGMENT, fragment(TCP, 0, 1)),
        (HOP_BY_HOP, hop_by_hop(ROUTING) + routing(AH) + ah(DEST_OPTS) + dest_opts(TCP)),
    ])
    v6 = st.builds(lambda c, s, d: ipv6(CLIENT6, VIP6, c[0], c[1] + tcp_syn(s, d)), v6_chain, ports, ports)
    v6_error = st.builds(lambda c: ipv6(ROUTER6, VIP6, ICMPV6, icmp(2, 0, ipv6(VIP6, CLIENT6, c[0], c[1] + SYN6))),
                         v6_chain)
    return st.one_of(v4, v4_error, v6, v6_error)


@settings(max_examples=400, deadline=None)
@given(valid_packets(), st.lists(st.tuples(st.integers(0, 299), st.integers(0, 255)), max_size=6),
       st.integers(0, 300))
def test_mutated_and_truncated_packets_never_raise(packet, mutations, cut):
    mutated = bytearray(packet)
    for at, value in mutations:
        if at < len(mutated):
            mutated[at] = value
    mutated = bytes(mutated[:cut])
    _parse_key(mutated)
    assert_well_formed(flow_key(mutated), mutated)
    describe(mutated)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.sampled_from([TCP, UDP, SCTP]), st.integers(0, 65535), st.integers(0, 65535))
def test_icmp_error_key_equals_original_flow_key(v6, proto, client_port, service_port):
    build = {TCP: tcp_syn, UDP: udp, SCTP: sctp_init}[proto]
    if v6:
        original = ipv6(CLIENT6, VIP6, proto, build(client_port, service_port))
        reply = ipv6(VIP6, CLIENT6, proto, build(service_port, client_port))
        error = ipv6(ROUTER6, VIP6, ICMPV6, icmp(2, 0, reply, rest=1280))
    else:
        original = ipv4(CLIENT4, VIP4, proto, build(client_port, service_port))
        reply = ipv4(VIP4, CLIENT4, proto, build(service_port, client_port))
        error = ipv4(ROUTER4, VIP4, ICMP, icmp(3, 4, reply[:28], rest=1400))
    assert flow_key(error) == flow_key(original)
