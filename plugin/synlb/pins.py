"""Pins: running connections that stay on a target the current table no
longer picks for them (pure; see docs/STICKINESS.md).

Maglev moves about 1/(N+1) of the flows when a target joins (added to the
config, or back from a failed health check).  A router that holds such a
connection keeps it where it is through its conntrack mark; a router that
picks it up later (after a failover, or when ECMP moves the flow) hashes it
with the current table and sends it to the wrong target, which answers
with a RST.

So a connection picked up mid-stream (any packet but a TCP SYN without
ACK) never follows the health-filtered table: it follows its pin if it has
one, else the *configured* table, Maglev over every configured target of
the service, which no router's health view changes.  Every active router
works out which of its connections are *misplaced* (connmark differs from
the configured table's pick: they started while a target was down, or
before a target was added), hands exactly those to its peers as pins
``(service, flow key) -> mark``, and a worker uses a pin for a packet that
does not open a connection.  New connections follow the health-filtered
table (``active_targets``).

Everything here is pure: the conntrack entries come from ``conntrack.py``,
the transport is ``plugins/sync.py``.

Peer message (one per TCP connection and direction)::

    b"SLP1" | length of body (4 bytes, big-endian) | body | HMAC-SHA256(key, all before)

``body`` is UTF-8 JSON ``{"seq": int, "services": {name: [[key_hex, mark], ...]}}``;
``seq`` grows with every message a router sends (nanoseconds since the
epoch), so a receiver refuses a replayed or reordered one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .config import Config, Service
from .jhash import kernel_slot, service_seed
from .maglev import Maglev
from .packet import is_flow_key, key_of

MAGIC = b"SLP1"
HEADER_BYTES = len(MAGIC) + 4
MAC_BYTES = 32
MAX_PINS = 1_000_000  # per message; about 60 MB of JSON at the very most
MAX_BODY = 64 << 20
MIN_KEY_BYTES = 16

PROTOCOL_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}  # what a service can balance

Pins = dict[str, dict[bytes, int]]  # service -> flow key -> mark


class PinsError(ValueError):
    """A peer message or pin file that cannot be trusted or read."""


# ------------------------------------------------------------------ tables

def active_targets(cfg: Config, service: Service, down: Iterable[str] = ()) -> list:
    """The targets a service's table is built over, in the order every router
    uses (sorted by name): its configured targets less those marked down."""
    down = set(down)
    return sorted((t for t in cfg.targets_of(service) if t.name not in down), key=lambda t: t.name)


@dataclass
class ServiceTable:
    """The marks a service's current Maglev table gives to flow keys.

    Both engines build the same table (slot -> mark); the service's
    ``flow_hash`` picks the slot: the NFQUEUE worker's keyed BLAKE2b
    (``Maglev.slot``), or the kernel's jhash (``jhash.kernel_slot``, see
    docs/ENGINES.md), the nftables engine's and an nfqueue service's with
    ``flow_hash = jhash``."""
    service: Service
    marks: list  # mark of each slot
    maglev: Maglev
    target_marks: frozenset  # marks of every configured target of the service
    seed: int | None = None  # the kernel jhash seed (flow_hash = jhash), None for blake2b

    @classmethod
    def build(cls, cfg: Config, service: Service, down: Iterable[str] = ()) -> "ServiceTable":
        targets = active_targets(cfg, service, down)
        maglev = Maglev([t.name for t in targets], service.table_size, cfg.globals.hash_key.encode())
        seed = service_seed(cfg.globals.hash_key, service.name) if service.flow_hash == "jhash" else None
        return cls(service, [targets[i].mark for i in maglev.table], maglev,
                   frozenset(t.mark for t in cfg.targets_of(service)), seed)

    def slot(self, key: bytes) -> int | None:
        if self.seed is None:
            return self.maglev.slot(key)
        return kernel_slot(key, self.seed, len(self.marks))

    def pick(self, key: bytes) -> int | None:
        if not self.marks:
            return None
        slot = self.slot(key)
        return None if slot is None else self.marks[slot]


def _service_of(services: list[Service], proto: int, server: str, port: int | None):
    """The service whose VIP, protocol and ports match a connection's server side."""
    addr = ipaddress.ip_address(server)
    name = PROTOCOL_NAMES.get(proto)
    for svc in services:
        if name not in svc.protocols:
            continue
        if not any(addr in vip for vip in svc.vips if vip.version == addr.version):
            continue
        if svc.ports and (port is None or not any(a <= port <= b for a, b in svc.ports)):
            continue
        return svc
    return None


def misplaced(cfg: Config, entries: Iterable) -> Pins:
    """The pins this router must hand to its peers: every conntrack entry
    of a service whose mark is one of the service's targets but not the one
    the configured table (every configured target, whatever the health
    checks say) picks for it: what a pickup anywhere would send elsewhere.

    ``entries`` have ``proto, src, dst, sport, dport, mark`` (conntrack's
    original direction).  An entry conntrack created from the target's side
    (its original source is the VIP) is read backwards.
    """
    services = list(cfg.services)
    tables = {s.name: ServiceTable.build(cfg, s) for s in services}
    out: Pins = {}
    for e in entries:
        if not e.mark:
            continue
        svc = _service_of(services, e.proto, e.dst, e.dport)
        client, server, cport, sport = e.src, e.dst, e.sport, e.dport
        if svc is None:
            svc = _service_of(services, e.proto, e.src, e.sport)
            client, server, cport, sport = e.dst, e.src, e.dport, e.sport
        if svc is None:
            continue
        table = tables[svc.name]
        if e.mark not in table.target_marks:
            continue
        key = key_of(e.proto, client, server, cport, sport)
        if table.pick(key) != e.mark:
            out.setdefault(svc.name, {})[key] = e.mark
    return out


def count(pins: Pins) -> int:
    return sum(len(v) for v in pins.values())


def digest(pins: Pins) -> str:
    """A short fingerprint of a set of pins: equal on two routers when they
    hold the same pins (status shows it, so that one can tell)."""
    h = hashlib.sha256()
    for svc, keys in sorted(pins.items()):
        for k, m in sorted(keys.items()):
            h.update(svc.encode() + b"\0" + k + m.to_bytes(4, "big"))
    return h.hexdigest()[:12]


def merge(*sources: Pins) -> Pins:
    """One set of pins from several peers' (a later source wins a conflict)."""
    out: Pins = {}
    for src in sources:
        for svc, keys in src.items():
            out.setdefault(svc, {}).update(keys)
    return out


def usable(pins: Mapping[bytes, int], target_marks: Iterable[int]) -> dict[bytes, int]:
    """The pins a worker may follow: those whose mark is a configured target
    of its service (the kernel has a route or DNAT for exactly those)."""
    allowed = set(target_marks)
    return {k: m for k, m in pins.items() if m in allowed}


# ------------------------------------------------------------------ encoding

def to_json(pins: Pins) -> dict:
    return {svc: [[k.hex(), m] for k, m in sorted(keys.items())] for svc, keys in sorted(pins.items())}


def from_json(data) -> Pins:
    """Validate and decode ``to_json``'s shape; PinsError on anything else."""
    if not isinstance(data, dict):
        raise PinsError("pins: not an object")
    out: Pins = {}
    total = 0
    for svc, items in data.items():
        if not isinstance(svc, str) or not isinstance(items, list):
            raise PinsError("pins: a service must map to a list")
        total += len(items)
        if total > MAX_PINS:
            raise PinsError(f"pins: more than {MAX_PINS}")
        keys = out.setdefault(svc, {})
        for item in items:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or not isinstance(item[1], int) or isinstance(item[1], bool)
                    or not 1 <= item[1] <= 0xFFFFFFFF):
                raise PinsError("pins: an item must be [key_hex, mark]")
            try:
                key = bytes.fromhex(item[0])
            except ValueError:
                raise PinsError("pins: a key is not hex") from None
            if not is_flow_key(key):
                raise PinsError("pins: a key is not a flow key")
            keys[key] = item[1]
    return out


def encode(pins: Pins, seq: int, key: bytes) -> bytes:
    body = json.dumps({"seq": seq, "services": to_json(pins)}, separators=(",", ":")).encode()
    head = MAGIC + len(body).to_bytes(4, "big")
    return head + body + hmac.new(key, head + body, hashlib.sha256).digest()


def body_length(header: bytes) -> int:
    """Length of the body announced by a message's first HEADER_BYTES."""
    if len(header) != HEADER_BYTES or header[:4] != MAGIC:
        raise PinsError("not a synlb pins message")
    n = int.from_bytes(header[4:], "big")
    if n > MAX_BODY:
        raise PinsError(f"message body of {n} bytes is over {MAX_BODY}")
    return n


def decode(message: bytes, key: bytes) -> tuple[int, Pins]:
    """``(seq, pins)`` of an authenticated message; PinsError otherwise."""
    n = body_length(message[:HEADER_BYTES])
    if len(message) != HEADER_BYTES + n + MAC_BYTES:
        raise PinsError("message length does not match its header")
    signed, mac = message[:-MAC_BYTES], message[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, signed, hashlib.sha256).digest()):
        raise PinsError("bad message authentication code (different [sync] key?)")
    try:
        data = json.loads(signed[HEADER_BYTES:])
    except ValueError:
        raise PinsError("message body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("seq"), int):
        raise PinsError("message has no seq")
    return data["seq"], from_json(data.get("services", {}))

