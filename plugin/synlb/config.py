"""INI configuration: layered files -> validated, frozen dataclasses.

Files are read in this order, later ones overriding single keys of earlier
ones (fail2ban style): the main file, then ``<dir>/synlb.d/*.ini`` in sorted
order.  Every problem is collected and reported at once as
``FILE:SECTION:KEY: why``; a bad value is never replaced by a default.

This module is pure: it reads files but never looks at the kernel.  What only
the live system can tell (interfaces, local addresses) is in ``live.py``.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .maglev import is_prime
from .schema import Option, OptionError
from .schema import boolean as _bool
from .schema import choice as _choice
from .schema import integer as _int
from .schema import nonempty as _nonempty
from .schema import words as _list

DEFAULT_CONFIG = "/etc/synlb/synlb.ini"
ENV_CONFIG = "SYNLB_CONFIG"

# Marks derived from a target's name live in [AUTO_MARK_BASE, +0x10000) so that
# a target keeps its mark when others are added or removed: a running
# connection's connmark must keep meaning the same target across reloads.
AUTO_MARK_BASE = 0x5E10000
AUTO_MARK_SPAN = 0x10000

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,12}$")
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(Exception):
    """One or more problems, each ``(file, section, key, message)``."""

    def __init__(self, problems: list[tuple[str, str, str, str]]):
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{f}:{s}:{k}: {m}" for f, s, k, m in self.problems]


@dataclass(frozen=True)
class Target:
    name: str
    addresses: tuple  # of ipaddress.IPv4Address / IPv6Address, at most one per family
    mark: int
    table: int
    options: dict = field(default_factory=dict, compare=False, hash=False)

    def address(self, family: int):
        """The target's address for IP version ``family`` (4 or 6), or None."""
        for a in self.addresses:
            if a.version == family:
                return a
        return None


@dataclass(frozen=True)
class Service:
    name: str
    vips: tuple  # of ipaddress.IPv4Network / IPv6Network
    ingress: str
    protocols: tuple  # of "tcp" / "udp" / "sctp"
    ports: tuple  # of (first, last) ranges; empty = every port
    mode: str  # "route" or "nat"
    egress: str | None
    queue_first: int
    queue_last: int
    queue_bypass: bool
    target_names: tuple
    table_size: int
    no_target_verdict: str  # "drop" or "accept"
    shortcut: bool = True
    track_syn: bool = True
    engine: str = "nfqueue"  # "nfqueue" (iptables + NFQUEUE workers) or "nftables" (Maglev in the kernel)

    @property
    def queues(self) -> range:
        """The NFQUEUE queues of the service's workers; none for the nftables
        engine, which has no worker (every caller that starts, supervises or
        reports workers goes through this)."""
        if self.engine != "nfqueue":
            return range(0)
        return range(self.queue_first, self.queue_last + 1)

    def families(self) -> tuple:
        return tuple(sorted({v.version for v in self.vips}))


@dataclass(frozen=True)
class Globals:
    state_dir: str
    hash_key: str
    rule_priority: int
    route_protocol: int
    pickup: bool
    copy_range: int
    queue_maxlen: int
    plugins: tuple = ("lb",)


@dataclass(frozen=True)
class Config:
    files: tuple
    globals: Globals
    services: tuple  # of Service, in name order
    targets: dict  # name -> Target
    sections: dict = field(default_factory=dict, compare=False, hash=False)
    # every section as read: name -> {key: (value, file)}
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # parsed values of the sections that plugins and other modules declare: name -> {key: value}

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def targets_of(self, service: Service) -> list[Target]:
        return [self.targets[n] for n in service.target_names]

    def digest(self) -> str:
        """A stable fingerprint of everything the data plane depends on."""
        h = hashlib.sha256(repr((self.globals, self.services, sorted(self.targets.items()))).encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- option types









def _vips(text: str) -> tuple:
    items = _list(text)
    if not items:
        raise OptionError("at least one VIP prefix is required")
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise OptionError(f"{item!r} is not an IP prefix ({e})") from None
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if a.version == b.version and a.overlaps(b):
                raise OptionError(f"{a} overlaps {b}")
    return tuple(nets)


def _protocols(text: str) -> tuple:
    items = [p.lower() for p in _list(text)]
    if not items:
        raise OptionError("at least one protocol is required")
    for p in items:
        if p not in ("tcp", "udp", "sctp"):
            raise OptionError(f"{p!r} is not one of tcp, udp, sctp")
    if len(set(items)) != len(items):
        raise OptionError("a protocol is listed twice")
    return tuple(sorted(set(items)))


def _ports(text: str) -> tuple:
    ranges = []
    for item in _list(text):
        m = re.fullmatch(r"(\d+)(?:[-:](\d+))?", item)
        if not m:
            raise OptionError(f"{item!r} is not a port or a range like 8000-8100")
        first = int(m.group(1))
        last = int(m.group(2) or first)
        if not (1 <= first <= last <= 65535):
            raise OptionError(f"{item!r} is not a port range within 1..65535")
        ranges.append((first, last))
    ranges.sort()
    for (a1, b1), (a2, b2) in zip(ranges, ranges[1:]):
        if a2 <= b1:
            raise OptionError(f"port ranges {a1}-{b1} and {a2}-{b2} overlap")
    # iptables multiport takes at most 15 ports (a range counts twice)
    if sum(1 if a == b else 2 for a, b in ranges) > 15:
        raise OptionError("more than 15 ports (a range counts as two); split the service")
    return tuple(ranges)


def _queue(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[-:]\s*(\d+)\s*)?", text)
    if not m:
        raise OptionError(f"{text!r} is not a queue number or a range like 0-1")
    first = int(m.group(1))
    last = int(m.group(2) or first)
    if not (0 <= first <= last <= 65535):
        raise OptionError(f"{text!r} is not a queue range within 0..65535")
    return first, last


def _table_size(text: str) -> int:
    v = _int(3, 1_000_003)(text)
    if not is_prime(v):
        raise OptionError(f"{v} is not prime (Maglev needs a prime table size, e.g. 65537)")
    return v


def _ifname(text: str) -> str:
    t = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.@:+-]{1,15}", t):
        raise OptionError(f"{text!r} is not an interface name")
    return t


def _addresses(text: str) -> tuple:
    items = _list(text)
    if not items:
        raise OptionError("at least one address is required")
    addrs = []
    for item in items:
        try:
            addrs.append(ipaddress.ip_address(item))
        except ValueError:
            raise OptionError(f"{item!r} is not an IP address") from None
    versions = [a.version for a in addrs]
    if len(set(versions)) != len(versions):
        raise OptionError("one address per family (IPv4, IPv6) at most")
    return tuple(addrs)


def _table_id(text: str) -> int:
    v = _int(1, 0xFFFFFFFF)(text)
    if v in (253, 254, 255):
        raise OptionError(f"{v} is a reserved routing table (default/main/local)")
    return v


def _state_dir(text: str) -> str:
    t = text.strip()
    if not t.startswith("/"):
        raise OptionError(f"{text!r} is not an absolute path")
    return t




# ------------------------------------------------------------------- schemas
# Each section type declares its options next to the code that uses them.

GLOBAL_OPTIONS = schema.Schema("synlb", [
    Option("state_dir", _state_dir, "/run/synlb", "pid files, saved sysctls, applied state"),
    Option("hash_key", _nonempty, "synlb-maglev-v1",
           "key of the flow and Maglev hashes; must be equal on every router of a cluster"),
    Option("rule_priority", _int(1, 32765), 3000, "priority of synlb's fwmark ip rules"),
    Option("route_protocol", _int(5, 255), 229,
           "routing protocol number that tags synlb's ip rules and routes"),
    Option("pickup", _bool, True,
           "turn on conntrack loose pickup while active (nf_conntrack_tcp_loose, be_liberal)"),
    Option("copy_range", _int(64, 65535), 256, "bytes of each queued packet copied to the worker"),
    Option("queue_maxlen", _int(16, 1 << 20), 4096, "NFQUEUE kernel queue length per queue"),
    Option("plugins", _list, ["lb"],
           "plugins `synlb run` hosts: lb, health, scripts, metrics, or a dotted module path"),
])

SERVICE_OPTIONS = schema.Schema("service", [
    Option("vips", _vips, schema.REQUIRED, "VIP prefixes, IPv4 and/or IPv6"),
    Option("ingress", _ifname, schema.REQUIRED, "interface the clients' packets arrive on"),
    Option("protocols", _protocols, schema.REQUIRED, "tcp, udp, sctp"),
    Option("ports", _ports, (), "destination ports or ranges; empty = every port"),
    Option("mode", _choice("route", "nat"), "route", "route (targets own the VIP) or nat (DNAT)"),
    Option("egress", _ifname, None, "route mode: interface towards the targets"),
    Option("queue", _queue, (0, 0), "NFQUEUE number or range (one worker per queue)"),
    Option("queue_bypass", _bool, False, "accept new connections in the kernel while no worker listens"),
    Option("targets", _list, schema.REQUIRED, "names of [target:NAME] sections"),
    Option("table_size", _table_size, 65537, "Maglev lookup table size (prime, >= 100 x targets)"),
    Option("no_target_verdict", _choice("drop", "accept"), "drop",
           "what a new connection gets when no target is available"),
    Option("shortcut", _bool, True,
           "keep marked established connections in the kernel; no = queue every packet "
           "(nfqlb-style, for comparison only)"),
    Option("engine", _choice("nfqueue", "nftables"), "nfqueue",
           "nfqueue: iptables chains and NFQUEUE workers pick the target of each new connection; "
           "nftables: the Maglev table lives in the kernel (table inet synlb), no worker"),
    Option("track_syn", _bool, True,
           "conntrack the opening SYN; no = leave it untracked (route mode only), for routers "
           "that see only the client's direction (behind ECMP): the connection's first ACK "
           "then makes the conntrack entry that keeps its mark"),
])

TARGET_OPTIONS = schema.Schema("target", [
    Option("address", _addresses, schema.REQUIRED, "one address per family"),
    Option("mark", _int(1, 0xFFFFFFFF), None, "fwmark; default derived from the name"),
    Option("table", _table_id, None, "route mode routing table; default = mark"),
])

# Section types other modules (vrrp, plugins) add: prefix -> Schema
EXTRA_SECTIONS: dict[str, schema.Schema] = {}


def register_section(prefix: str, sch: schema.Schema) -> None:
    EXTRA_SECTIONS[prefix] = sch


def auto_mark(name: str) -> int:
    h = hashlib.blake2b(name.encode(), digest_size=4, person=b"synlb-mark").digest()
    return AUTO_MARK_BASE + int.from_bytes(h, "big") % AUTO_MARK_SPAN


# -------------------------------------------------------------------- loading

def config_path(cli_path: str | None) -> str:
    return cli_path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def dropin_files(main: str) -> list[str]:
    d = os.path.join(os.path.dirname(os.path.abspath(main)), "synlb.d")
    return sorted(glob.glob(os.path.join(d, "*.ini")))


def read_layers(main: str) -> tuple[list[str], dict, list]:
    """Read the main file and its drop-ins.

    Returns (files, sections, problems) where sections maps a section name to
    {key: (raw value, file)}; a later file overrides single keys.
    """
    problems: list[tuple[str, str, str, str]] = []
    if not os.path.isfile(main):
        problems.append((main, "-", "-", "no such file"))
        return [main], {}, problems
    files = [main] + dropin_files(main)
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    for path in files:
        cp = configparser.ConfigParser(interpolation=None, default_section="\0none")
        cp.optionxform = str  # keys are case sensitive, as documented
        try:
            with open(path, encoding="utf-8") as fh:
                cp.read_file(fh, source=path)
        except (configparser.Error, OSError, UnicodeDecodeError) as e:
            msg = str(e).replace("\n", " ")
            problems.append((path, "-", "-", f"cannot parse: {msg}"))
            continue
        for sec in cp.sections():
            dst = sections.setdefault(sec, {})
            for key, value in cp.items(sec, raw=True):
                dst[key] = (value, path)
    return files, sections, problems


def load(path: str | None = None) -> Config:
    """Load and validate; raise ConfigError listing every problem."""
    main = config_path(path)
    files, sections, problems = read_layers(main)
    if problems and not sections:
        raise ConfigError(problems)

    def where(sec: str) -> str:
        vals = sections.get(sec, {})
        return next(iter(vals.values()))[1] if vals else main

    glob_vals = schema.parse_section(GLOBAL_OPTIONS, "synlb", sections.get("synlb", {}), main, problems)
    # plugins add their own sections and keys: resolve them before validating the rest
    mods = _plugin_modules(glob_vals.get("plugins", ()), sections, main, problems)
    service_schema = SERVICE_OPTIONS.extended(o for m in mods for o in getattr(m, "SERVICE_OPTIONS", ()))
    target_schema = TARGET_OPTIONS.extended(o for m in mods for o in getattr(m, "TARGET_OPTIONS", ()))
    extra_sections = dict(EXTRA_SECTIONS)
    for m in mods:
        extra_sections.update(getattr(m, "SECTIONS", {}))
    extra_values: dict[str, dict] = {}
    services_raw: dict[str, dict] = {}
    targets_raw: dict[str, dict] = {}
    for sec, vals in sections.items():
        kind, _, name = sec.partition(":")
        if sec == "synlb":
            continue
        if kind == "service" and name:
            if not SERVICE_NAME_RE.match(name):
                problems.append((where(sec), sec, "-", "service name must be 1-12 of A-Z a-z 0-9 _"))
                continue
            services_raw[name] = schema.parse_section(service_schema, sec, vals, main, problems)
        elif kind == "target" and name:
            if not TARGET_NAME_RE.match(name):
                problems.append((where(sec), sec, "-", "target name must be 1-64 of A-Z a-z 0-9 _ . -"))
                continue
            targets_raw[name] = schema.parse_section(target_schema, sec, vals, main, problems)
            # plugins' cross-key checks of their target keys: m.check_target(parsed) -> [(key, why)]
            for m in mods:
                for key, why in getattr(m, "check_target", lambda _: [])(targets_raw[name]):
                    problems.append((vals.get(key, (None, where(sec)))[1], sec, key, why))
        elif kind in extra_sections or sec in extra_sections:
            sch = extra_sections.get(kind) or extra_sections[sec]
            parsed = schema.parse_section(sch, sec, vals, main, problems)
            extra_values[sec] = parsed
            # an optional cross-key check: sch.check(parsed) -> [(key, why)]
            for key, why in getattr(sch, "check", lambda _: [])(parsed):
                problems.append((vals.get(key, (None, where(sec)))[1], sec, key, why))
        else:
            known = ", ".join(["[synlb]", "[service:NAME]", "[target:NAME]"]
                              + [f"[{p}]" for p in sorted(extra_sections)])
            problems.append((where(sec), sec, "-", f"unknown section (known: {known})"))

    if not services_raw and not any(p[1].startswith("service:") for p in problems):
        problems.append((main, "-", "-", "no [service:NAME] section"))

    targets: dict[str, Target] = {}
    marks: dict[int, str] = {}
    tables: dict[int, str] = {}
    for name in sorted(targets_raw):
        t = targets_raw[name]
        sec = f"target:{name}"
        if "mark" not in t or "table" not in t:
            continue
        mark = t["mark"] if t["mark"] is not None else auto_mark(name)
        table = t["table"] if t["table"] is not None else mark
        src = lambda key: sections[sec].get(key, (None, where(sec)))[1]  # noqa: E731
        if mark in marks:
            how = "set" if t["mark"] is not None else "derived from the name"
            problems.append((src("mark"), sec, "mark",
                             f"mark {mark:#x} ({how}) is also target {marks[mark]}'s; set a distinct mark"))
        marks.setdefault(mark, name)
        if table in tables and not (t["table"] is None and mark in marks and marks[mark] != name):
            problems.append((src("table"), sec, "table",
                             f"table {table} is also target {tables[table]}'s; set a distinct table"))
        tables.setdefault(table, name)
        if table in (253, 254, 255) and t["table"] is None:
            problems.append((src("mark"), sec, "table", f"mark {mark} would use reserved table {table}; set table"))
        if "address" in t:
            targets[name] = Target(name, t["address"], mark, table, options=t)

    services = []
    queues_seen: dict[int, str] = {}
    for name in sorted(services_raw):
        s = services_raw[name]
        sec = f"service:{name}"
        src = lambda key: sections[sec].get(key, (None, where(sec)))[1]  # noqa: E731
        families = {v.version for v in s.get("vips", ())}
        for tname in s.get("targets", ()):
            if tname not in targets_raw:
                problems.append((src("targets"), sec, "targets", f"unknown target {tname!r} (no [target:{tname}])"))
                continue
            t = targets.get(tname)
            if t is None:
                continue
            for fam in families:
                if t.address(fam) is None:
                    problems.append((src("targets"), sec, "targets",
                                     f"target {tname} has no IPv{fam} address but the service has IPv{fam} VIPs"))
        if not {"vips", "targets", "queue", "table_size"} <= s.keys():
            continue
        if len(set(s["targets"])) != len(s["targets"]):
            problems.append((src("targets"), sec, "targets", "a target is listed twice"))
        if s["targets"] and s["table_size"] < 100 * len(s["targets"]):
            problems.append((src("table_size"), sec, "table_size",
                             f"{s['table_size']} is below 100 x {len(s['targets'])} targets; balance would be poor"))
        if not s.get("track_syn", True) and s.get("mode") == "nat":
            problems.append((src("track_syn"), sec, "track_syn",
                             "no needs mode = route (DNAT needs the connection tracked from its SYN)"))
        if s.get("engine") == "nftables" and not s.get("shortcut", True):
            problems.append((src("shortcut"), sec, "shortcut",
                             "no is for the nfqueue engine only (the nftables engine has no queue)"))
        q1, q2 = s["queue"]
        for q in range(q1, q2 + 1) if s.get("engine", "nfqueue") == "nfqueue" else ():
            if q in queues_seen:
                problems.append((src("queue"), sec, "queue", f"queue {q} is also service {queues_seen[q]}'s"))
                break
            queues_seen[q] = name
        if problems:
            continue  # the dataclasses are only built from a clean config
        services.append(Service(
            name=name, vips=s["vips"], ingress=s["ingress"], protocols=s["protocols"], ports=s["ports"],
            mode=s["mode"], egress=s["egress"], queue_first=q1, queue_last=q2,
            queue_bypass=s["queue_bypass"], target_names=tuple(s["targets"]),
            table_size=s["table_size"], no_target_verdict=s["no_target_verdict"],
            shortcut=s["shortcut"], track_syn=s["track_syn"], engine=s["engine"]))

    # The same VIP:port in two services would make the first one win silently.
    for i, a in enumerate(services):
        for b in services[i + 1:]:
            if _services_overlap(a, b):
                problems.append((where(f"service:{b.name}"), f"service:{b.name}", "vips",
                                 f"overlaps service {a.name} (same VIPs, protocol and ports)"))

    if problems:
        raise ConfigError(problems)
    g = Globals(**{**glob_vals, "plugins": tuple(glob_vals["plugins"])})
    return Config(files=tuple(files), globals=g, services=tuple(services), targets=targets,
                  sections=sections, extra=extra_values)


def _plugin_modules(names, sections: dict, main: str, problems: list) -> list:
    from . import plugins
    mods = []
    where = sections.get("synlb", {}).get("plugins", (None, main))[1]
    for name in names:
        try:
            mods.append(plugins.load_module(name))
        except plugins.PluginError as e:
            problems.append((where, "synlb", "plugins", str(e)))
    return mods


def _services_overlap(a: Service, b: Service) -> bool:
    if not set(a.protocols) & set(b.protocols):
        return False
    if not any(x.version == y.version and x.overlaps(y) for x in a.vips for y in b.vips):
        return False
    if not a.ports or not b.ports:
        return True
    return any(x1 <= y2 and y1 <= x2 for x1, x2 in a.ports for y1, y2 in b.ports)


def load_section(cfg: Config, section: str, sch: schema.Schema) -> dict[str, Any]:
    """Parse one already-validated extra section (e.g. [vrrp]) into a dict."""
    problems: list = []
    main = cfg.files[0]
    vals = schema.parse_section(sch, section, cfg.sections.get(section, {}), main, problems)
    if problems:
        raise ConfigError(problems)
    return vals


def load_globals(path: str | None = None) -> Globals:
    """Only the [synlb] section: enough to tear down even when the rest is broken."""
    main = config_path(path)
    _, sections, problems = read_layers(main)
    vals = schema.parse_section(GLOBAL_OPTIONS, "synlb", sections.get("synlb", {}), main, problems)
    if problems:
        raise ConfigError(problems)
    return Globals(**{**vals, "plugins": tuple(vals["plugins"])})
