"""The kernel's flow hash of the nftables engine, in Python (pure).

The nftables engine's rule is (IPv4; the IPv6 rule reads ``ip6``)::

    meta mark set jhash meta l4proto . ip saddr . th sport . ip daddr . th dport
                  mod M seed S map @slots_<service>

on the client->VIP packet. To reproduce its slot:

- the key the kernel hashes is the concatenation as nft lays it out in its
  32-bit registers, each field padded with zero bytes to a multiple of 4:
  ``l4proto 0 0 0 | client address | client port (big-endian) 0 0 |
  VIP | port (big-endian) 0 0`` (20 bytes for IPv4, 44 for IPv6);
- the hash is the kernel's ``jhash()`` (``include/linux/jhash.h``, Bob
  Jenkins' lookup3) with ``initval = S``, reading the key as little-endian
  32-bit words (the CPU's byte order on x86 and arm64; a big-endian router
  would compute other slots);
- the slot is ``reciprocal_scale(hash, M) = (hash * M) >> 32``, not
  ``hash % M``.

The seed ``S`` of a service (``service_seed``) is
``BLAKE2b(UTF-8(service name), key=hash_key[:64], digest_size=4,
person=b"synlb-jhash")`` read big-endian: every router with the same
``hash_key`` builds the same kernel table.

Checked against the kernel in the lab (tests/test_nft_lab.py): every
connection's conntrack mark is the one ``kernel_slot`` predicts.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

from .maglev import MAX_KEY_BYTES
from .packet import PORT_PROTOCOLS

JHASH_INITVAL = 0xDEADBEEF
SEED_PERSON = b"synlb-jhash"
M32 = 0xFFFFFFFF

_unpack3 = struct.Struct("<III").unpack_from


def service_seed(hash_key: str, service: str) -> int:
    """The ``seed`` of a service's jhash rule (32 bits)."""
    d = blake2b(service.encode(), key=hash_key.encode()[:MAX_KEY_BYTES], digest_size=4,
                person=SEED_PERSON).digest()
    return int.from_bytes(d, "big")


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M32


def jhash(data: bytes, initval: int) -> int:
    """Linux ``jhash(key, length, initval)`` of ``data`` (little-endian words)."""
    n = len(data)
    a = b = c = (JHASH_INITVAL + n + initval) & M32
    i = 0
    while n > 12:
        x, y, z = _unpack3(data, i)
        a = (a + x) & M32
        b = (b + y) & M32
        c = (c + z) & M32
        # __jhash_mix
        a = (a - c) & M32; a ^= _rol(c, 4); c = (c + b) & M32  # noqa: E702
        b = (b - a) & M32; b ^= _rol(a, 6); a = (a + c) & M32  # noqa: E702
        c = (c - b) & M32; c ^= _rol(b, 8); b = (b + a) & M32  # noqa: E702
        a = (a - c) & M32; a ^= _rol(c, 16); c = (c + b) & M32  # noqa: E702
        b = (b - a) & M32; b ^= _rol(a, 19); a = (a + c) & M32  # noqa: E702
        c = (c - b) & M32; c ^= _rol(b, 4); b = (b + a) & M32  # noqa: E702
        n -= 12
        i += 12
    if n == 0:
        return c
    # the last 1..12 bytes, zero-padded: the kernel adds them byte by byte
    # (k[0] + k[1] << 8 + ...), which is a little-endian read of the padding
    x, y, z = _unpack3(data[i:] + bytes(12 - n))
    a = (a + x) & M32
    b = (b + y) & M32
    c = (c + z) & M32
    # __jhash_final
    c ^= b; c = (c - _rol(b, 14)) & M32  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & M32  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & M32  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & M32  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & M32  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & M32  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & M32  # noqa: E702
    return c


def reciprocal_scale(value: int, size: int) -> int:
    """The kernel's ``reciprocal_scale``: ``value`` (32 bits) onto ``0..size-1``."""
    return (value * size) >> 32


_PAD2 = b"\x00\x00"
_PAD3 = b"\x00\x00\x00"


def kernel_key(flow_key: bytes) -> bytes | None:
    """The bytes the kernel's jhash reads for a flow key (``packet.flow_key``
    layout: version, proto, client, server, client port, server port), or
    None for a flow the engine's rules never hash (no ports)."""
    if len(flow_key) < 2 or flow_key[1] not in PORT_PROTOCOLS:
        return None
    alen = 4 if flow_key[0] == 4 else 16 if flow_key[0] == 6 else 0
    if not alen or len(flow_key) != 2 + 2 * alen + 4:
        return None
    client = flow_key[2:2 + alen]
    server = flow_key[2 + alen:2 + 2 * alen]
    ports = flow_key[2 + 2 * alen:]
    return (flow_key[1:2] + _PAD3 + client + ports[:2] + _PAD2 + server + ports[2:] + _PAD2)


def kernel_slot(flow_key: bytes, seed: int, size: int) -> int | None:
    """The Maglev slot the kernel gives a flow, or None (see kernel_key)."""
    data = kernel_key(flow_key)
    if data is None:
        return None
    return reciprocal_scale(jhash(data, seed), size)
