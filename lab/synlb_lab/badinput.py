"""Bad input for the reliability scenarios (pure: no kernel).

* :func:`fuzz_packets`: a seeded mutation loop over ``packet.flow_key``,
  ``packet._parse_key`` (the parser without flow_key's catch-all) and
  ``packet.opens_connection``: valid packets of every shape the parser
  knows (IPv4/IPv6, TCP/UDP/SCTP, options, extension header chains,
  fragments, ICMP errors quoting flows), mutated (bytes flipped, fields set
  to extremes, cut, extended, spliced) or random. Any exception, or a key
  that breaks the contract (docs/ARCHITECTURE.md), is a failure.
* :data:`BROKEN_INI`: a corpus of broken configurations, each a change to a
  good one (``good`` text in, broken text out), so that a reload of any of
  them would otherwise change the running router.
* :func:`ini_strategy`: hypothesis-generated INI files from the real
  section and key names and a pool of good and bad values.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import Counter

from synlb.packet import FALLBACK_BYTES, FALLBACK_VERSION, _parse_key, flow_key, is_flow_key, opens_connection

# ---------------------------------------------------------------- packets

TCP, UDP, SCTP, ICMP, ICMPV6 = 6, 17, 132, 1, 58


def _a(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def _v4(src, dst, proto, payload, options=b"", frag=0):
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 1, frag, 64, proto, 0,
                       _a(src), _a(dst)) + options + payload


def _v6(src, dst, nh, payload):
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, _a(src), _a(dst)) + payload


def _tcp(sport, dport, flags=0x02, options=b""):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, (5 + len(options) // 4) << 4, flags, 65535, 0, 0) + options


def _udp(sport, dport):
    return struct.pack("!HHHH", sport, dport, 13, 0) + b"hello"


def _ext(nh, units=0):
    pad = 8 * (units + 1) - 2
    return bytes((nh, units)) + bytes(pad)


def _frag6(nh, offset, more):
    return struct.pack("!BBHI", nh, 0, (offset << 3) | more, 7)


def seed_packets() -> list[bytes]:
    c4, v4, c6, v6 = "10.64.1.10", "10.64.100.1", "fd64:1::10", "fd64:100::1"
    out = []
    for flags in (0x02, 0x12, 0x10, 0x11, 0x04, 0x00, 0xFF):
        out.append(_v4(c4, v4, TCP, _tcp(40000, 80, flags)))
        out.append(_v6(c6, v6, TCP, _tcp(40000, 80, flags)))
    out.append(_v4(c4, v4, TCP, _tcp(40001, 80, 0x02, b"\x02\x04\x05\xb4\x01\x03\x03\x07")))
    out.append(_v4(c4, v4, TCP, _tcp(40002, 80), options=b"\x01" * 8))
    out.append(_v4(c4, v4, UDP, _udp(5353, 53)))
    out.append(_v6(c6, v6, UDP, _udp(5353, 53)))
    out.append(_v4(c4, v4, SCTP, struct.pack("!HHII", 1, 2, 0, 0) + bytes(20)))
    out.append(_v4(c4, v4, TCP, _tcp(40003, 80), frag=0x2000))  # first fragment
    out.append(_v4(c4, v4, TCP, b"\x00" * 16, frag=3))  # later fragment
    out.append(_v4(c4, v4, 50, bytes(24)))  # ESP
    out.append(_v4(c4, v4, ICMP, struct.pack("!BBHI", 8, 0, 0, 0) + bytes(16)))  # echo
    q4 = _v4(v4, c4, TCP, _tcp(80, 40000, 0x12))
    q6 = _v6(v6, c6, TCP, _tcp(80, 40000, 0x12))
    for t in (3, 11, 12, 4, 5):
        out.append(_v4(c4, v4, ICMP, struct.pack("!BBHI", t, 4, 0, 0) + q4))
    for t in (1, 2, 3, 4):
        out.append(_v6(c6, v6, ICMPV6, struct.pack("!BBHI", t, 0, 0, 1280) + q6))
    out.append(_v6(c6, v6, 0, _ext(60) + _ext(43) + _ext(TCP, 1) + _tcp(40004, 80)))
    out.append(_v6(c6, v6, 44, _frag6(TCP, 0, 0) + _tcp(40005, 80)))  # atomic fragment
    out.append(_v6(c6, v6, 44, _frag6(TCP, 0, 1) + _tcp(40006, 80)))
    out.append(_v6(c6, v6, 44, _frag6(TCP, 9, 0) + bytes(16)))
    out.append(_v6(c6, v6, 51, bytes((TCP, 1)) + bytes(10) + _tcp(40007, 80)))  # AH
    out.append(_v6(c6, v6, 59, b""))
    out.append(_v6(c6, v6, ICMPV6, struct.pack("!BBHI", 1, 0, 0, 0) + _v6(v6, c6, 44, _frag6(TCP, 0, 1) + _tcp(80, 1))))
    return out


def _mutate(rnd: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    p = bytearray(rnd.choice(seeds))
    how = rnd.randrange(10)
    if how == 0:
        return "random", bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 120)))
    if how == 1:
        return "cut", bytes(p[:rnd.randrange(0, len(p) + 1)])
    if how == 2:
        return "extended", bytes(p) + bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 80)))
    if how == 3:
        other = rnd.choice(seeds)
        at = rnd.randrange(0, len(p) + 1)
        return "spliced", bytes(p[:at]) + other[rnd.randrange(0, len(other) + 1):]
    if how == 4:  # a header byte to an extreme: version/IHL, lengths, flags, next headers
        for _ in range(rnd.randrange(1, 4)):
            i = rnd.choice((0, 0, 2, 3, 6, 6, 7, 9, 20, 32, 33, 40, 41, 46, 53))
            if i < len(p):
                p[i] = rnd.choice((0x00, 0xFF, 0x40, 0x45, 0x4F, 0x60, 0x6F, 0x2C, 0x3A, 0x3B, 0x33, 6, 1, 58))
        return "field", bytes(p)
    if how == 5:
        del p[rnd.randrange(0, len(p)):][:rnd.randrange(1, 12)]
        return "deleted", bytes(p)
    if how == 6:
        at = rnd.randrange(0, len(p) + 1)
        return "inserted", bytes(p[:at]) + bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 16))) + bytes(p[at:])
    for _ in range(rnd.randrange(1, 7)):
        p[rnd.randrange(len(p))] ^= 1 << rnd.randrange(8)
    if rnd.random() < 0.3:
        p = p[:rnd.randrange(0, len(p) + 1)]
    return "flipped", bytes(p)


def check_packet(p: bytes) -> str | None:
    """What is wrong with the parser's answer for ``p`` (None: nothing)."""
    key = flow_key(p)
    parsed = _parse_key(p)
    opens = opens_connection(p)
    if not isinstance(key, bytes) or opens not in (True, False):
        return f"types: key {type(key).__name__}, opens {opens!r}"
    want = parsed if parsed is not None else FALLBACK_VERSION + bytes(p[:FALLBACK_BYTES])
    if key != want:
        return f"flow_key {key.hex()} != parsed {want.hex()}"
    if key[:1] == FALLBACK_VERSION:
        if len(key) > 1 + FALLBACK_BYTES:
            return "fallback key too long"
    elif not is_flow_key(key):
        return f"key {key.hex()} is not shaped like a flow key"
    if opens and (len(p) < 20 or p[0] >> 4 not in (4, 6)):
        return "opens_connection on a packet with no IP header"
    return None


def fuzz_packets(cases: int, seed: int = 12, max_seconds: float = 600.0) -> dict:
    """``cases`` mutated packets through the parser; counts and failures."""
    rnd = random.Random(seed)
    seeds = seed_packets()
    kinds: Counter = Counter()
    keys: Counter = Counter()
    failures: list[dict] = []
    opened = 0
    t0 = time.monotonic()
    done = 0
    for i in range(cases):
        if i & 4095 == 0 and time.monotonic() - t0 > max_seconds:
            break
        kind, p = _mutate(rnd, seeds)
        kinds[kind] += 1
        done += 1
        try:
            why = check_packet(p)
        except Exception as e:  # noqa: BLE001 - exactly what the fuzz looks for
            why = f"raised {type(e).__name__}: {e}"
        if why:
            if len(failures) < 20:
                failures.append({"packet": p.hex(), "why": why})
            continue
        k = flow_key(p)
        keys["fallback" if k[:1] == FALLBACK_VERSION else f"v{k[0]} {'ports' if len(k) in (14, 38) else 'addresses'}"] += 1
        opened += opens_connection(p)
    elapsed = time.monotonic() - t0
    return {"cases": done, "seed": seed, "failures": len(failures), "examples": failures,
            "mutations": dict(sorted(kinds.items())), "keys": dict(sorted(keys.items())),
            "opens_connection": opened, "elapsed": round(elapsed, 2),
            "per_case_us": round(elapsed / max(done, 1) * 1e6, 2)}


# ---------------------------------------------------------------- INI

def _sub(old: str, new: str):
    def f(text: str) -> str:
        if old not in text:
            raise ValueError(f"corpus: {old!r} not in the good config")
        return text.replace(old, new, 1)
    return f


def _append(extra: str):
    return lambda text: text + extra


def _append_service(line: str):
    return lambda text: text.replace("[service:web]\n", f"[service:web]\n{line}\n", 1)


#: name -> change that breaks a good lab config (each must be refused)
BROKEN_INI = {
    "empty file": lambda text: "",
    "binary garbage": lambda text: "\x00\x01\x02\xff[[[\n\x7f",
    "not utf-8": None,  # bytes, see broken_ini_bytes
    "no section header": lambda text: "vips = 10.64.100.1/32\n" + text,
    "unterminated section": lambda text: text + "\n[service:web\n",
    "duplicate section": lambda text: text + "\n[target:t1]\naddress = 10.64.2.11\n",
    "duplicate key": _sub("protocols = tcp", "protocols = tcp\nprotocols = udp"),
    "unknown section": _append("\n[servce:web]\nvips = 10.64.100.1/32\n"),
    "unknown key": _sub("protocols = tcp", "protocols = tcp\nprotcols = tcp"),
    "bad service name": _append("\n[service:this-name-is-far-too-long!]\nvips = 10.64.100.2/32\n"),
    "no service": lambda text: "\n".join(ln for ln in text.splitlines() if not ln.startswith("[service")),
    "vips missing": _sub("vips =", "#vips ="),
    "vip not an address": _sub("vips = ", "vips = 10.64.100.300/32, "),
    "vip /0": _sub("vips = ", "vips = 0.0.0.0/0, "),
    "vip loopback": _sub("vips = ", "vips = 127.0.0.1/32, "),
    "vip with zone": _sub("vips = ", "vips = fe80::1%front/128, "),
    "protocol unknown": _sub("protocols = tcp", "protocols = tcp, quic"),
    "port 0": _sub("ports = 80", "ports = 0"),
    "port out of range": _sub("ports = 80", "ports = 80, 65536"),
    "port range backwards": _sub("ports = 80", "ports = 90-80"),
    "queue range huge": _sub("queue = 0", "queue = 0-65535"),
    "queue not a number": _sub("queue = 0", "queue = zero"),
    "mode unknown": _sub("mode = route", "mode = dsr"),
    "table_size not prime": _append_service("table_size = 65536"),
    "table_size too small": _append_service("table_size = 101"),
    "targets unknown": _sub("targets = t1", "targets = t9, t1"),
    "target listed twice": _sub("targets = t1", "targets = t1, t1"),
    "target address missing": _sub("address = 10.64.2.11, fd64:2::11", "address ="),
    "target address unspecified": _sub("address = 10.64.2.11", "address = 0.0.0.0"),
    "target address is the VIP": _sub("address = 10.64.2.11", "address = 10.64.100.1"),
    "target without IPv6": _sub("address = 10.64.2.11, fd64:2::11", "address = 10.64.2.11"),
    "two marks alike": lambda text: text.replace("[target:t1]\n", "[target:t1]\nmark = 0x100\n", 1).replace(
        "[target:t2]\n", "[target:t2]\nmark = 0x100\n", 1),
    "reserved table": lambda text: text.replace("[target:t1]\n", "[target:t1]\ntable = 254\n", 1),
    "mark not a number": lambda text: text.replace("[target:t1]\n", "[target:t1]\nmark = lots\n", 1),
    "route_protocol of bgp": _sub("[synlb]\n", "[synlb]\nroute_protocol = 186\n"),
    "hash_key too long": _sub("[synlb]\n", "[synlb]\nhash_key = " + "k" * 100 + "\n"),
    "copy_range too small": _sub("[synlb]\n", "[synlb]\ncopy_range = 10\n"),
    "pickup not boolean": _sub("pickup = yes", "pickup = maybe"),
    "plugin unknown": _sub("plugins = lb", "plugins = lb, nosuchplugin"),
    "plugins changed (restart only)": _sub("plugins = lb", "plugins = lb, metrics"),
    "state_dir relative": _sub("state_dir = /", "state_dir = relative/"),
    "state_dir changed (restart only)": _sub("state_dir = /", "state_dir = /run/synlb-lab-other/"),
    "vrrp bad standby": _sub("standby = hot", "standby = lukewarm"),
    "vrrp unknown key": _sub("[vrrp]\n", "[vrrp]\ninstance_name = x\n"),
    "overlapping services": _append("\n[service:web2]\nvips = 10.64.100.1/32\ningress = front\negress = back\n"
                                    "protocols = tcp\nports = 80\nqueue = 1\ntargets = t1\n"),
    "huge value": _sub("targets = t1", "targets = t1, " + ", ".join(f"x{i}" for i in range(3000))),
    "interpolation syntax": _sub("ingress = front", "ingress = %(front)s"),
    "continuation line": _sub("ingress = front", "ingress = front\n  back"),
}


#: entries of BROKEN_INI that are valid files: `synlb check` passes them, the
#: running host refuses them (plugins and state_dir change only with a restart)
RESTART_ONLY = frozenset({"plugins changed (restart only)", "state_dir changed (restart only)"})


def broken_ini(good: str) -> dict[str, bytes]:
    """The corpus for this good config: name -> file bytes."""
    out = {}
    for name, change in BROKEN_INI.items():
        if change is None:
            out[name] = good.encode().replace(b"front", b"fr\xffnt", 1)
        else:
            out[name] = change(good).encode()
    return out


#: sections and keys the strategy draws from (real ones and near misses)
INI_SECTIONS = ["synlb", "service:web", "service:w2", "service:bad name", "target:t1", "target:t2",
                "target:", "vrrp", "health", "metrics", "scripts", "sync", "nosuch", "service"]
INI_KEYS = ["state_dir", "hash_key", "rule_priority", "route_protocol", "pickup", "copy_range", "queue_maxlen",
            "plugins", "vips", "ingress", "egress", "protocols", "ports", "mode", "queue", "queue_bypass",
            "targets", "table_size", "no_target_verdict", "shortcut", "track_syn", "address", "mark", "table",
            "sync_group", "instance", "standby", "check", "check_port", "interval", "listen", "peers",
            "unknown_key", ""]
INI_VALUES = ["", "0", "1", "-1", "65535", "65536", "99999999999999999999", "yes", "no", "maybe",
              "10.64.100.1/32", "fd64:100::1/128", "0.0.0.0/0", "::/0", "10.64.2.11", "fd64:2::11",
              "10.64.2.11, fd64:2::11", "256.1.1.1", "front", "back", "lo", "eth0 eth1", "tcp", "udp, sctp",
              "quic", "80", "80-90", "90-80", "1-65535", "route", "nat", "0-3", "0-65535", "t1", "t1, t2",
              "t1, t1", "65537", "1000003", "4", "drop", "accept", "0x5e10001", "0xffffffff", "254", "229",
              "/run/synlb-hyp", "relative", "lb", "lb, health, metrics", "lb, nosuch", "nosuch.module",
              "synlb.nosuch", "G1", "hot", "cold", "%(x)s", "\x00", "é", "a" * 300, "[x]", "=", "#"]


def ini_strategy(good: str | None = None):
    """hypothesis strategy: INI text (imported lazily: hypothesis is a test
    extra). Files made of the real sections and keys with values drawn from
    good and bad ones; with ``good``, also that file with a few of its
    values replaced, keys added or lines cut (mostly one problem away from
    valid, some valid)."""
    from hypothesis import strategies as st
    key = st.one_of(st.sampled_from(INI_KEYS), st.text(min_size=1, max_size=12))
    value = st.one_of(st.sampled_from(INI_VALUES), st.text(max_size=40),
                      st.lists(st.sampled_from(INI_VALUES), max_size=4).map(", ".join))
    section = st.tuples(st.one_of(st.sampled_from(INI_SECTIONS), st.text(max_size=15)),
                        st.lists(st.tuples(key, value), max_size=8))
    garbage = st.text(max_size=60)

    def render(parts) -> str:
        sections, junk, where = parts
        out = []
        for name, items in sections:
            out.append(f"[{name}]")
            out += [f"{k} = {v}" for k, v in items]
        if junk:
            out.insert(min(where, len(out)), junk)
        return "\n".join(out) + "\n"
    random_files = st.tuples(st.lists(section, max_size=6), garbage, st.integers(0, 50)).map(render)
    if good is None:
        return random_files
    lines = good.splitlines()
    edit = st.one_of(
        st.tuples(st.just("value"), st.integers(0, len(lines) - 1), value),
        st.tuples(st.just("add"), st.integers(0, len(lines)), st.tuples(key, value).map(lambda kv: f"{kv[0]} = {kv[1]}")),
        st.tuples(st.just("cut"), st.integers(0, len(lines) - 1), st.just("")),
        st.tuples(st.just("raw"), st.integers(0, len(lines)), garbage))

    def mutate(edits) -> str:
        out = list(lines)
        for how, at, text in edits:
            at = min(at, len(out) - 1) if how in ("value", "cut") else min(at, len(out))
            if how == "value" and "=" in out[at]:
                out[at] = out[at].split("=", 1)[0] + "= " + text
            elif how == "cut" and out:
                del out[at]
            elif how in ("add", "raw"):
                out.insert(at, text)
        return "\n".join(out) + "\n"
    mutated = st.lists(edit, min_size=1, max_size=3).map(mutate)
    return st.one_of(random_files, mutated, mutated)
