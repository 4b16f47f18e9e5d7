"""The nftables engine: Maglev in the kernel, rendered as nft text (pure).

Everything the engine owns is one table, ``table inet synlb``; teardown
deletes it and nothing else on the router is touched. Per service
``<s>`` of ``engine = nftables`` (see docs/ENGINES.md for the packet path)::

    table inet synlb {
      map slots_<s>  { typeof numgen inc mod 2 : meta mark; size M; }   # slot -> target mark (active)
      map pickup_<s> { typeof numgen inc mod 2 : meta mark; size M; }   # the same, every configured target
      map pins4_<s>  { typeof meta l4proto . ip saddr . th sport . ip daddr . th dport : meta mark; }
      map pins6_<s>  { ... ip6 ... }                                     # pinned flows -> mark
      (track_syn=no)  map split_<s>  { typeof numgen inc mod 2 : verdict; size M; }  # slots where the two differ
      (track_syn=no)  map opened4_<s> { type ipv4_addr . inet_service . ipv4_addr . inet_service : mark;
                                        flags dynamic,timeout; timeout T; size N; }  # opened off pickup's pick
      (track_syn=no)  map opened6_<s> { typeof numgen inc mod 2 . numgen inc mod 2 : meta mark; ... }
      map picks_<s>  { type mark : counter; }                            # mark -> pick_<s>_<mark>
      counter kept4_<s>, pinned4_<s>, opened4_<s>, pickup4_<s>, hashed4_<s>, notarget4_<s> (and 6)
      chain prerouting { type filter hook prerouting priority mangle + 1; comment "synlb <digest>";
        iifname I ip daddr {VIPs} meta l4proto {P} th dport {ports} jump svc4_<s> ... }
      chain svc4_<s> {
        ct mark != 0 meta mark set ct mark counter name kept4_<s> accept
        meta l4proto != tcp       meta mark set <5-tuple> map @pins4_<s> ct mark set meta mark ... accept
        tcp flags & (syn|ack) != syn meta mark set <5-tuple> map @pins4_<s> ct mark set meta mark ... accept
        (track_syn=no) tcp flags & (syn|ack) != syn meta mark set <4-tuple> map @opened4_<s> ... accept
        tcp flags & (syn|ack) != syn meta mark set jhash <5-tuple> mod M seed S map @pickup_<s> ... accept
        meta mark set jhash <5-tuple> mod M seed S map @slots_<s> ct mark set meta mark
            counter name hashed4_<s> counter name meta mark map @picks_<s> accept   # (track_syn=no: goto hashed4_<s>)
        counter name notarget4_<s> drop            # or accept: no_target_verdict
      }
      (track_syn=no) chain hashed4_<s> { tcp flags & (syn|ack) == syn jhash <5-tuple> ... vmap @split_<s>; accept }
      (track_syn=no) chain record_<s> { meta nfproto ipv4 update @opened4_<s> { <4-tuple> : meta mark }; ...; accept }
      (nat mode)      chain nat_prerouting { type nat hook prerouting priority dstnat; ... dnat ip to meta mark map @dnat4_<s> }
      (track_syn=no)  chain raw_prerouting { type filter hook prerouting priority raw; ... syn ... notrack }
    }

A TCP packet that does not open its connection and reaches the hash is a
pickup (after a failover, or an ECMP change): it follows its pin, else the
configured table, whatever this router's health view (docs/STICKINESS.md).
UDP has no opening packet and follows the active table. With ``track_syn =
no`` the SYN leaves no conntrack entry and its first ACK is a pickup too,
so a SYN sent off the configured table's pick (its slot is in ``split``)
is recorded in ``opened``, which that ACK follows. nft 1.0.6 (Debian 12)
aborts on a dynamic update whose key is longer than 16 bytes, so the IPv6
record is keyed by two 32-bit jhashes of the 4-tuple (``_record_key``:
a pickup whose key collides with a recorded one's, about one in 2^64 per
pair, would take its mark).

The *skeleton* (declarations, chains and rules, no element) changes only
with the structure of the configuration; its digest is the base chain's
comment. The *elements* (slots, per-target counters and DNAT addresses,
pins) change with health, targets and pins, and are updated by
difference: ``update_script`` deletes and re-adds only the slots whose
mark changes, in the same transaction, so no packet ever sees a missing
slot.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import ne

from .config import SLOT_MARKS, Config, Service
from .jhash import service_seed
from .maglev import marks_per_slot
from .packet import PORT_PROTOCOLS
from .pins import Pins, active_targets, usable

FAMILY = "inet"
TABLE = "synlb"
QUALIFIED = f"{FAMILY} {TABLE}"
BASE_CHAIN = "prerouting"
COMMENT_PREFIX = "synlb "
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
ELEMENTS_PER_LINE = 2048  # elements per "add element" command (one transaction either way)

PinKey = tuple  # (l4proto, client, client port, VIP, port)


def services(cfg: Config) -> list[Service]:
    """The services of the nftables engine."""
    return [s for s in cfg.services if s.engine == "nftables"]


def slot_services(cfg: Config) -> list[Service]:
    """The nfqueue services whose workers get the slot from the kernel
    (``flow_hash = jhash``): the table hashes for them, before their
    NFQUEUE rule (chain ``slot_prerouting``)."""
    return [s for s in cfg.services if s.kernel_slots]


# ------------------------------------------------------------------ names

def slots_map(svc: str) -> str:
    return f"slots_{svc}"


def pins_map(svc: str, family: int) -> str:
    return f"pins{family}_{svc}"


def picks_map(svc: str) -> str:
    return f"picks_{svc}"


def pickup_map(svc: str) -> str:
    return f"pickup_{svc}"


def split_map(svc: str) -> str:
    return f"split_{svc}"


def opened_map(svc: str, family: int) -> str:
    return f"opened{family}_{svc}"


def hashed_chain(svc: str, family: int) -> str:
    return f"hashed{family}_{svc}"


def record_chain(svc: str) -> str:
    return f"record_{svc}"


# a TCP connection opened off the configured table's pick is remembered this
# long (its first ACK, when the SYN went untracked, is a pickup) and at most
# this many; past that, its pickup follows the configured table
OPENED_TIMEOUT = "120s"
OPENED_MAX = 65536


def pickup_families(svc: Service) -> tuple:
    """The families whose TCP pickups follow the configured table: every
    family of a TCP service."""
    return svc.families() if "tcp" in svc.protocols else ()


def records(svc: Service) -> bool:
    """The service records its SYNs sent off the configured table's pick
    (track_syn = no): chains hashed<f> and record, maps split and opened<f>."""
    return not svc.track_syn and bool(pickup_families(svc))


def _record_key(family: int, seed: int) -> str:
    """The key of the ``opened`` map for ``family``: the 4-tuple for IPv4;
    for IPv6 two jhashes of it (see above)."""
    if family == 4:
        return _tcp_tuple(4)
    return " . ".join(f"jhash {_tcp_tuple(6)} mod 4294967295 seed {(seed ^ k) & 0xFFFFFFFF:#010x}"
                      for k in (0x5EED0001, 0x5EED0002))


def dnat_map(svc: str, family: int) -> str:
    return f"dnat{family}_{svc}"


def svc_chain(svc: str, family: int) -> str:
    return f"svc{family}_{svc}"


def pick_counter(svc: str, mark: int) -> str:
    return f"pick_{svc}_{mark:x}"


COUNTERS = ("kept", "pinned", "opened", "pickup", "hashed", "notarget")


def counter_name(kind: str, svc: str, family: int) -> str:
    return f"{kind}{family}_{svc}"


# ------------------------------------------------------------------ desired state

@dataclass
class ServicePlan:
    """What one service's elements must be."""
    name: str
    size: int
    seed: int
    mode: str
    families: tuple  # IP versions of the service's VIPs
    active: tuple  # ((target name, mark), ...) sorted by name: the Maglev population of new connections
    targets: dict  # mark -> (IPv4 address or None, IPv6 address or None): every configured target
    pins: dict = field(default_factory=dict)  # family -> {PinKey: mark}, for each of the families
    key: bytes = field(default=b"", repr=False)  # hash_key: the Maglev permutations
    _pins_digest: str | None = field(default=None, repr=False, compare=False)  # see pins_digest
    # every configured target, sorted by name: the population of pickups
    configured: tuple = ()
    pickup: bool = False  # it has the pickup map (pickup_families)
    records: bool = False  # it has the split map (records)

    def slots(self) -> list[int]:
        """Mark of each slot (Maglev over the active targets), [] without one."""
        return marks_per_slot(self.active, self.size, self.key)

    def pickup_slots(self) -> list[int]:
        """Mark of each slot over every configured target."""
        return marks_per_slot(self.configured, self.size, self.key)


def split_slots(slots: Sequence[int], pickup: Sequence[int]) -> list[int]:
    """The slots where a new connection's target is not the configured
    table's (a target is down): a SYN hashed there is recorded in ``opened``."""
    if not slots:
        return []
    return list(compress(range(len(slots)), map(ne, slots, pickup)))


@dataclass
class Plan:
    """The whole table: skeleton text, its digest, and each service's elements."""
    skeleton: str
    digest: str
    services: dict  # name -> ServicePlan

    @property
    def empty(self) -> bool:
        """No table wanted: no service of the engine, none with the kernel's slots."""
        return not self.skeleton


def pin_key(flow_key: bytes) -> tuple[int, PinKey] | None:
    """(family, map key) of a pinned flow (packet.flow_key layout), or None
    for a flow without ports (the engine's rules only match port protocols)."""
    if len(flow_key) < 2 or flow_key[1] not in PORT_PROTOCOLS:
        return None
    fam = flow_key[0]
    alen = {4: 4, 6: 16}.get(fam)
    if alen is None or len(flow_key) != 2 + 2 * alen + 4:
        return None
    af = socket.AF_INET if fam == 4 else socket.AF_INET6
    client = socket.inet_ntop(af, flow_key[2:2 + alen])
    server = socket.inet_ntop(af, flow_key[2 + alen:2 + 2 * alen])
    at = 2 + 2 * alen
    cport = int.from_bytes(flow_key[at:at + 2], "big")
    sport = int.from_bytes(flow_key[at + 2:at + 4], "big")
    return fam, (flow_key[1], client, cport, server, sport)


def service_pins(pins: Mapping[bytes, int], target_marks: Iterable[int], families: Iterable[int] = (4, 6)
                 ) -> dict:
    """A service's pins (flow key -> mark) as map elements per family, only
    those whose mark is a configured target (``pins.usable``) and whose
    family the service has."""
    return _service_pins(pins, target_marks, families)[0]


def _service_pins(pins: Mapping[bytes, int], target_marks: Iterable[int], families: Iterable[int]
                  ) -> tuple[dict, str]:
    """(service_pins, their digest): the digest hashes the flow keys in
    byte order (cheap: 100k pins in a few tens of ms)."""
    out: dict = {f: {} for f in families}
    h = hashlib.sha256()
    for key, mark in sorted(usable(pins, target_marks).items()):
        pk = pin_key(key)
        if pk is not None and pk[0] in out:
            out[pk[0]][pk[1]] = mark
            h.update(len(key).to_bytes(1, "big") + key + mark.to_bytes(4, "big"))
    return out, h.hexdigest()[:16]


def desired(cfg: Config, down: Mapping[str, Iterable[str]] | None = None, pins: Pins | None = None) -> Plan:
    """The table for ``cfg`` with the ``down`` targets out of the active sets."""
    down = down or {}
    pins = pins or {}
    key = cfg.globals.hash_key.encode()
    plans = {}
    for svc in services(cfg):
        active = tuple((t.name, t.mark) for t in active_targets(cfg, svc, down.get(svc.name, ())))
        configured = tuple((t.name, t.mark) for t in active_targets(cfg, svc))
        targets = {t.mark: (_addr(t, 4), _addr(t, 6)) for t in cfg.targets_of(svc)}
        spins, pdigest = _service_pins(pins.get(svc.name, {}), targets, svc.families())
        plans[svc.name] = ServicePlan(
            svc.name, svc.table_size, service_seed(cfg.globals.hash_key, svc.name), svc.mode, svc.families(),
            active, targets, spins, key, pdigest, configured, bool(pickup_families(svc)), records(svc))
    skel = skeleton(cfg)
    return Plan(skel, digest(skel), plans)


def _addr(target, family: int) -> str | None:
    a = target.address(family)
    return str(a) if a is not None else None


# ------------------------------------------------------------------ skeleton

def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _match(svc: Service, family: int) -> str:
    ip = "ip" if family == 4 else "ip6"
    vips = [str(v) for v in svc.vips if v.version == family]
    m = f'iifname "{svc.ingress}" {ip} daddr {_set(vips)} meta l4proto {_set(list(svc.protocols))}'
    if svc.ports:
        m += " th dport " + _set([str(a) if a == b else f"{a}-{b}" for a, b in svc.ports])
    return m


def _tuple(family: int) -> str:
    ip = "ip" if family == 4 else "ip6"
    return f"meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport"


def _tcp_tuple(family: int) -> str:
    ip = "ip" if family == 4 else "ip6"
    return f"{ip} saddr . tcp sport . {ip} daddr . tcp dport"


def _hash(svc: Service, family: int, seed: int) -> str:
    return f"jhash {_tuple(family)} mod {svc.table_size} seed {seed:#010x}"


PICKUP = "tcp flags & (syn | ack) != syn"  # TCP that does not open its connection


def _service_rules(svc: Service, family: int, seed: int) -> list[str]:
    n = svc.name
    t = _tuple(family)
    save = "ct mark set meta mark"
    rules = [f"ct mark != 0 meta mark set ct mark counter name {counter_name('kept', n, family)} accept"]
    pinned = (f"meta mark set {t} map @{pins_map(n, family)} {save} "
              f"counter name {counter_name('pinned', n, family)} accept")
    # pins are for packets that do not open a connection: not a TCP SYN without ACK
    if any(p != "tcp" for p in svc.protocols):
        rules.append(f"meta l4proto != tcp {pinned}")
    picks = f"counter name meta mark map @{picks_map(n)}"
    recorded = records(svc)
    if "tcp" in svc.protocols:
        rules.append(f"{PICKUP} {pinned}")
    if recorded:
        rules.append(f"{PICKUP} meta mark set {_record_key(family, seed)} map @{opened_map(n, family)} {save} "
                     f"counter name {counter_name('opened', n, family)} accept")
    if family in pickup_families(svc):
        rules.append(f"{PICKUP} meta mark set {_hash(svc, family, seed)} map @{pickup_map(n)} {save} "
                     f"counter name {counter_name('pickup', n, family)} {picks} accept")
    rules.append(f"meta mark set {_hash(svc, family, seed)} map @{slots_map(n)} {save} "
                 f"counter name {counter_name('hashed', n, family)} {picks} "
                 + (f"goto {hashed_chain(n, family)}" if recorded else "accept"))
    verdict = "accept" if svc.no_target_verdict == "accept" else "drop"
    rules.append(f"counter name {counter_name('notarget', n, family)} {verdict}")
    return rules


def _record_chains(svc: Service, seed: int) -> list[str]:
    """A SYN whose slot is in ``split`` is recorded with its mark in
    ``opened`` (a full map records nothing: the packet goes on alike)."""
    n = svc.name
    out = []
    for fam in svc.families():
        out += [f"\tchain {hashed_chain(n, fam)} {{",
                f"\t\ttcp flags & (syn | ack) == syn {_hash(svc, fam, seed)} vmap @{split_map(n)}",
                "\t\taccept", "\t}"]
    out.append(f"\tchain {record_chain(n)} {{")
    for fam in svc.families():
        out.append(f"\t\tmeta nfproto {'ipv4' if fam == 4 else 'ipv6'} update @{opened_map(n, fam)} "
                   f"{{ {_record_key(fam, seed)} : meta mark }}")
    out += ["\t\taccept", "\t}"]
    return out


def skeleton(cfg: Config) -> str:
    """The table without elements (``comment`` left out: see ``with_comment``);
    "" when no service uses the engine or the kernel's slots."""
    svcs = services(cfg)
    slotted = slot_services(cfg)
    if not svcs and not slotted:
        return ""
    out = [f"table {QUALIFIED} {{"]
    for svc in svcs:
        n = svc.name
        out.append(f"\tmap {slots_map(n)} {{ typeof numgen inc mod 2 : meta mark; size {svc.table_size}; }}")
        if pickup_families(svc):
            out.append(f"\tmap {pickup_map(n)} {{ typeof numgen inc mod 2 : meta mark; size {svc.table_size}; }}")
        if records(svc):
            out.append(f"\tmap {split_map(n)} {{ typeof numgen inc mod 2 : verdict; size {svc.table_size}; }}")
            dynamic = f"flags dynamic,timeout; timeout {OPENED_TIMEOUT}; size {OPENED_MAX};"
            for fam in svc.families():
                key = ("type ipv4_addr . inet_service . ipv4_addr . inet_service : mark" if fam == 4
                       else "typeof numgen inc mod 2 . numgen inc mod 2 : meta mark")
                out.append(f"\tmap {opened_map(n, fam)} {{ {key}; {dynamic} }}")
        for fam in svc.families():
            ip = "ip" if fam == 4 else "ip6"
            out.append(f"\tmap {pins_map(n, fam)} {{ typeof meta l4proto . {ip} saddr . th sport . "
                       f"{ip} daddr . th dport : meta mark; }}")
            if svc.mode == "nat":
                out.append(f"\tmap {dnat_map(n, fam)} {{ type mark : {'ipv4_addr' if fam == 4 else 'ipv6_addr'}; }}")
        out.append(f"\tmap {picks_map(n)} {{ type mark : counter; }}")
        for fam in svc.families():
            for kind in COUNTERS:
                out.append(f"\tcounter {counter_name(kind, n, fam)} {{ }}")
    out.append(f"\tchain {BASE_CHAIN} {{")
    # just after iptables' mangle PREROUTING: while a service switches from the
    # nfqueue engine (both sets of rules for a moment), the kernel's pick is
    # the one set last, and the one saved in conntrack
    out.append("\t\ttype filter hook prerouting priority mangle + 1; policy accept;")
    for svc in svcs:
        for fam in svc.families():
            out.append(f"\t\t{_match(svc, fam)} jump {svc_chain(svc.name, fam)}")
    out.append("\t}")
    for svc in svcs:
        seed = service_seed(cfg.globals.hash_key, svc.name)
        for fam in svc.families():
            out.append(f"\tchain {svc_chain(svc.name, fam)} {{")
            out.extend(f"\t\t{r}" for r in _service_rules(svc, fam, seed))
            out.append("\t}")
        if records(svc):
            out.extend(_record_chains(svc, seed))
    nat = [s for s in svcs if s.mode == "nat"]
    if nat:
        out.append("\tchain nat_prerouting {")
        out.append("\t\ttype nat hook prerouting priority dstnat; policy accept;")
        for svc in nat:
            for fam in svc.families():
                out.append(f"\t\t{_match(svc, fam)} dnat {'ip' if fam == 4 else 'ip6'} to meta mark map "
                           f"@{dnat_map(svc.name, fam)}")
        out.append("\t}")
    if slotted:
        out.extend(_slot_chain(cfg, slotted))
    untracked = [s for s in svcs if not s.track_syn and "tcp" in s.protocols]
    if untracked:
        # the opening SYN untracked: the first ACK makes the conntrack entry
        # (loose pickup) that keeps the mark, on a router that sees only the
        # client's direction (see the track_syn option)
        out.append("\tchain raw_prerouting {")
        out.append("\t\ttype filter hook prerouting priority raw; policy accept;")
        for svc in untracked:
            for fam in svc.families():
                m = _match(svc, fam).replace(f"meta l4proto {_set(list(svc.protocols))}", "meta l4proto tcp")
                out.append(f"\t\t{m} tcp flags & (syn | ack) == syn notrack")
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def _slot_chain(cfg: Config, slotted: list[Service]) -> list[str]:
    # Before iptables' mangle PREROUTING, where the service's NFQUEUE rule
    # is: a packet of a connection without a mark reaches the worker with
    # its Maglev slot as its mark (SLOT_MARKS.start + the slot the nftables
    # engine's rule computes), one with a mark with that mark (the worker
    # keeps it). iptables' CONNMARK restore overwrites either for the
    # established packets it short-cuts.
    out = ["\tchain slot_prerouting {", "\t\ttype filter hook prerouting priority mangle - 1; policy accept;"]
    for svc in slotted:
        seed = service_seed(cfg.globals.hash_key, svc.name)
        for fam in svc.families():
            m = _match(svc, fam)
            out.append(f"\t\t{m} ct mark != 0 meta mark set ct mark accept")
            # no "ct mark 0" here: an untracked SYN (track_syn = no) has no ct to test
            out.append(f"\t\t{m} meta mark set {_hash(svc, fam, seed)} offset {SLOT_MARKS.start:#x}")
    out.append("\t}")
    return out


def digest(skel: str) -> str:
    return hashlib.sha256(skel.encode()).hexdigest()[:16]


def with_comment(skel: str, dig: str) -> str:
    """The skeleton with its digest as the base chain's comment (what the
    adapter reads back to know the live table is this one)."""
    head = f"\tchain {BASE_CHAIN} {{\n"
    return skel.replace(head, head + f'\t\tcomment "{COMMENT_PREFIX}{dig}"\n', 1)


# ------------------------------------------------------------------ elements

def _elements(cmd: str, name: str, items: list[str]) -> list[str]:
    return [f"{cmd} element {QUALIFIED} {name} {{ {', '.join(items[i:i + ELEMENTS_PER_LINE])} }}"
            for i in range(0, len(items), ELEMENTS_PER_LINE)]


def _pin_item(k: PinKey, mark: int) -> str:
    proto, client, cport, vip, vport = k
    return f"{proto} . {client} . {cport} . {vip} . {vport} : {mark:#x}"


def _target_adds(sp: ServicePlan, marks: Iterable[int]) -> list[str]:
    marks = sorted(marks)
    out = [f"add counter {QUALIFIED} {pick_counter(sp.name, m)}" for m in marks]
    out += _elements("add", picks_map(sp.name), [f'{m:#x} : "{pick_counter(sp.name, m)}"' for m in marks])
    if sp.mode == "nat":
        for i, fam in enumerate((4, 6)):
            items = [f"{m:#x} : {sp.targets[m][i]}" for m in marks if sp.targets[m][i]]
            out += _elements("add", dnat_map(sp.name, fam), items) if _has_family(sp, fam) else []
    return out


def _target_deletes(sp: ServicePlan, old: Mapping[int, tuple], marks: Iterable[int]) -> list[str]:
    marks = sorted(marks)
    out = []
    if sp.mode == "nat":
        for i, fam in enumerate((4, 6)):
            items = [f"{m:#x}" for m in marks if old[m][i]]
            out += _elements("delete", dnat_map(sp.name, fam), items) if _has_family(sp, fam) else []
    out += _elements("delete", picks_map(sp.name), [f"{m:#x}" for m in marks])
    out += [f"delete counter {QUALIFIED} {pick_counter(sp.name, m)}" for m in marks]
    return out


def _has_family(sp: ServicePlan, fam: int) -> bool:
    return fam in sp.families


def _pin_element(k: PinKey) -> str:
    return _pin_item(k, 0).rsplit(" : ", 1)[0]


def _pins_replace(sp: ServicePlan, flush: bool) -> list[str]:
    out = []
    for fam, pins in sorted(sp.pins.items()):
        if flush:
            out.append(f"flush map {QUALIFIED} {pins_map(sp.name, fam)}")
        out += _elements("add", pins_map(sp.name, fam), [_pin_item(k, m) for k, m in sorted(pins.items())])
    return out


def pins_diff(old: Mapping, new: Mapping) -> tuple[list, dict]:
    """(keys to delete, {key: mark} to add) turning one family's pins map
    ``old`` into ``new``: a pin whose mark changes is deleted and re-added."""
    deletes = [k for k, m in old.items() if new.get(k) != m]
    adds = {k: m for k, m in new.items() if old.get(k) != m}
    return sorted(deletes), adds


def _pins_commands(sp: ServicePlan, old: Mapping | None) -> list[str]:
    """The pins maps from ``old`` (family -> {key: mark}, as last applied) to
    ``sp``'s by difference; replaced whole (flush + add) when ``old`` is unknown."""
    if old is None:
        return _pins_replace(sp, flush=True)
    out = []
    for fam, pins in sorted(sp.pins.items()):
        deletes, adds = pins_diff(old.get(fam, {}), pins)
        out += _elements("delete", pins_map(sp.name, fam), [_pin_element(k) for k in deletes])
        out += _elements("add", pins_map(sp.name, fam), [_pin_item(k, m) for k, m in sorted(adds.items())])
    return out


def slot_diff(old: Sequence[int], new: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """(slots to delete, (slot, mark) to add) turning map ``old`` into ``new``
    (each a mark per slot, or empty for an empty map); only differing slots."""
    if not old:
        return [], list(enumerate(new))
    if not new:
        return list(range(len(old))), []
    if len(old) != len(new):
        raise ValueError(f"slot tables of {len(old)} and {len(new)} entries: a new table size is a new skeleton")
    changed = list(compress(range(len(new)), map(ne, old, new)))  # C speed: 65537 slots in ~2 ms
    return changed, [(i, new[i]) for i in changed]


def changed_slots(old: Sequence[int], new: Sequence[int]) -> int:
    """How many slots ``slot_diff`` touches."""
    if not old or not new:
        return max(len(old), len(new))
    return sum(map(ne, old, new))


def _slot_commands(name: str, deletes: list[int], adds: list[tuple[int, int]], map_name=slots_map) -> list[str]:
    return (_elements("delete", map_name(name), [str(i) for i in deletes])
            + _elements("add", map_name(name), [f"{i} : {m:#x}" for i, m in adds]))


def _split_commands(sp: ServicePlan, slots: Sequence[int], pickup: Sequence[int], flush: bool) -> list[str]:
    """``split`` replaced whole: its few elements (the down targets' share of
    the slots) change with every health flip."""
    if not sp.records:
        return []
    out = [f"flush map {QUALIFIED} {split_map(sp.name)}"] if flush else []
    return out + _elements("add", split_map(sp.name),
                           [f"{i} : goto {record_chain(sp.name)}" for i in split_slots(slots, pickup)])


def pins_digest(sp: ServicePlan) -> str:
    """A fingerprint of the service's pins (``desired`` computes it from the
    flow keys; else once per plan from the map elements)."""
    if sp._pins_digest is None:
        data = repr(sorted((f, sorted(p.items())) for f, p in sp.pins.items()))
        sp._pins_digest = hashlib.sha256(data.encode()).hexdigest()[:16]
    return sp._pins_digest


def full_script(plan: Plan, slots: Mapping[str, Sequence[int]], replace: bool) -> str:
    """One transaction installing the whole table (``replace``: deleting the
    live one first, in the same transaction)."""
    out = []
    if replace:
        out += [f"table {QUALIFIED} {{ }}", f"delete table {QUALIFIED}"]
    out.append(with_comment(plan.skeleton, plan.digest).rstrip("\n"))
    for name, sp in plan.services.items():
        out += _target_adds(sp, sp.targets)
        out += _slot_commands(name, [], list(enumerate(slots[name])))
        if sp.pickup:
            pickup = sp.pickup_slots()
            out += _slot_commands(name, [], list(enumerate(pickup)), pickup_map)
            out += _split_commands(sp, slots[name], pickup, flush=False)
        out += _pins_replace(sp, flush=False)
    return "\n".join(out) + "\n"


@dataclass
class Applied:
    """What the live table holds, per service (the adapter's state file)."""
    digest: str
    active: dict  # service -> [[name, mark], ...]
    targets: dict  # service -> {mark: (a4, a6)}
    pins: dict  # service -> pins digest
    configured: dict = field(default_factory=dict)  # service -> [[name, mark], ...]: the pickup map's population


def update_script(old: Applied, old_slots: Mapping[str, Sequence[int]], plan: Plan,
                  new_slots: Mapping[str, Sequence[int]], old_pins: Mapping[str, Mapping] | None = None) -> str:
    """One transaction turning the live elements ``old`` into ``plan``'s, for
    the same skeleton; "" when nothing differs. ``old_pins``: each service's
    pins as last applied, when known (then only the pins that differ change)."""
    if old.digest != plan.digest:
        raise ValueError("update_script needs the live skeleton (full_script otherwise)")
    out = []
    for name, sp in plan.services.items():
        was = old.targets.get(name, {})
        now = sp.targets
        gone = [m for m in was if m not in now]
        moved = [m for m in was if m in now and was[m] != now[m]]  # addresses changed (nat mode)
        came = [m for m in now if m not in was]
        out += _target_deletes(sp, was, gone)
        if sp.mode == "nat" and moved:
            for i, fam in enumerate((4, 6)):
                if not _has_family(sp, fam):
                    continue
                out += _elements("delete", dnat_map(name, fam), [f"{m:#x}" for m in sorted(moved) if was[m][i]])
                out += _elements("add", dnat_map(name, fam),
                                 [f"{m:#x} : {now[m][i]}" for m in sorted(moved) if now[m][i]])
        out += _target_adds(sp, came)
        active_changed = [list(a) for a in sp.active] != [list(a) for a in old.active.get(name, [])]
        if active_changed:
            out += _slot_commands(name, *slot_diff(old_slots.get(name, []), new_slots[name]))
        if sp.pickup:
            was_configured = [tuple(a) for a in old.configured.get(name, [])]
            configured_changed = was_configured != list(sp.configured)
            if configured_changed or active_changed:
                pickup = sp.pickup_slots()
                if configured_changed:  # a target added or removed: rare, and by difference too
                    out += _slot_commands(name, *slot_diff(marks_per_slot(was_configured, sp.size, sp.key), pickup),
                                          pickup_map)
                slots = new_slots[name] if name in new_slots else sp.slots()
                out += _split_commands(sp, slots, pickup, flush=True)
        if pins_digest(sp) != old.pins.get(name):
            out += _pins_commands(sp, (old_pins or {}).get(name))
    return "\n".join(out) + "\n" if out else ""


def pins_script(old: Applied, plan: Plan, old_pins: Mapping[str, Mapping] | None = None) -> str:
    """One transaction changing the pins of every service whose pins differ
    from ``old``'s (the skeleton must be the live one); "" if none. By
    difference from ``old_pins`` when known, else replacing them whole."""
    if old.digest != plan.digest:
        raise ValueError("pins_script needs the live skeleton")
    out = []
    for name, sp in plan.services.items():
        if pins_digest(sp) != old.pins.get(name):
            out += _pins_commands(sp, (old_pins or {}).get(name))
    return "\n".join(out) + "\n" if out else ""


def applied_of(plan: Plan) -> Applied:
    """The state record of a plan once applied."""
    return Applied(plan.digest, {n: [list(a) for a in sp.active] for n, sp in plan.services.items()},
                   {n: dict(sp.targets) for n, sp in plan.services.items()},
                   {n: pins_digest(sp) for n, sp in plan.services.items()},
                   {n: [list(a) for a in sp.configured] for n, sp in plan.services.items()})


# ------------------------------------------------------------------ dry run

def describe(plan: Plan, slots: Mapping[str, Sequence[int]] | None = None) -> str:
    """Human text of the table (dry run): the skeleton, then a summary of the
    elements instead of the M slot lines."""
    if plan.empty:
        return ""
    out = [f"# nft (one transaction): table {QUALIFIED}", with_comment(plan.skeleton, plan.digest).rstrip("\n")]
    for name, sp in plan.services.items():
        table = slots[name] if slots is not None else sp.slots()
        share = {m: 0 for _, m in sp.active}
        for m in table:
            share[m] += 1
        names = dict((m, n) for n, m in sp.active)
        spread = ", ".join(f"{names[m]} {c}" for m, c in share.items()) or "no active target"
        out.append(f"# {slots_map(name)}: {len(table)} elements slot : mark ({spread}); "
                   f"seed {sp.seed:#010x} = blake2b({name!r}, key=hash_key, person=synlb-jhash)")
        out.append(f"# {picks_map(name)}: {len(sp.targets)} targets, counters "
                   + ", ".join(pick_counter(name, m) for m in sorted(sp.targets)))
        if sp.pickup:
            pickup = sp.pickup_slots()
            out.append(f"# {pickup_map(name)}: {len(pickup)} elements slot : mark over every configured target "
                       "(what a picked-up TCP connection follows)"
                       + (f"; {split_map(name)}: {len(split_slots(table, pickup))} slots whose SYNs are recorded "
                          "in opened4/6" if sp.records else ""))
        for fam, p in sorted(sp.pins.items()):
            out.append(f"# {pins_map(name, fam)}: {len(p)} pins")
    return "\n".join(out)
