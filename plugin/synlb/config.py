"""INI configuration: layered files -> validated, frozen dataclasses.

Files are read in this order, later ones overriding single keys of earlier
ones (fail2ban style): the main file, then ``<dir>/synlb.d/*.ini`` in sorted
order.  Every problem is collected and reported at once as
``FILE:SECTION:KEY: why``; a bad value is never replaced by a default.

Which sections a file may have is fixed here (:data:`SECTION_KINDS`:
``[synlb]``, ``[service:NAME]``, ``[target:NAME]``, ``[vrrp]``), plus what the
plugins named in ``[synlb] plugins`` declare (their ``SECTIONS``,
``SERVICE_OPTIONS``, ``TARGET_OPTIONS``, see plugins/__init__.py); nothing is
registered at import time, so :func:`load` alone accepts every valid file.

This module is pure: it reads files but never looks at the kernel (the
user database excepted: ``[synlb] worker_user`` must name a user that
exists when a service has workers, :func:`worker_user_problem`).  What
only the live system can tell (interfaces, local addresses) is in
``live.py``.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import importlib
import ipaddress
import os
import pwd
import re
from dataclasses import dataclass, field
from typing import Any

from . import schema, trust
from .errors import UserError
from .maglev import MAX_KEY_BYTES, is_prime
from .schema import Option, OptionError
from .schema import boolean as _bool
from .schema import choice as _choice
from .schema import integer as _int
from .schema import nonempty as _nonempty
from .schema import words as _list
from .vrrp.events import VRRP_SCHEMA, VrrpConfig, vrrp_config

DEFAULT_CONFIG = "/etc/synlb/synlb.ini"
# The shipped key: public, so anyone can predict which target a flow goes to
# (`synlb check` warns while it is in use).
DEFAULT_HASH_KEY = "synlb-maglev-v1"
ENV_CONFIG = "SYNLB_CONFIG"
# The problem of a file that describes no service (the shipped synlb.ini,
# every example commented): `synlb check` reports it as nothing configured.
NO_SERVICE = "no [service:NAME] section"

# Marks derived from a target's name live in [AUTO_MARK_BASE, +0x10000) so that
# a target keeps its mark when others are added or removed: a running
# connection's connmark must keep meaning the same target across reloads.
AUTO_MARK_BASE = 0x5E10000
AUTO_MARK_SPAN = 0x10000

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,12}$")
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# the NAME of [kind:NAME]: pattern, and what a name that does not match is told
NAME_RULES = {
    "service": (SERVICE_NAME_RE, "service name must be 1-12 of A-Z a-z 0-9 _"),
    "target": (TARGET_NAME_RE, "target name must be 1-64 of A-Z a-z 0-9 _ . -"),
}


class ConfigError(UserError):
    """One or more problems, each ``(file, section, key, message)``, printed
    as ``FILE:SECTION:KEY: why``."""

    prefixed = False

    def __init__(self, problems: list[tuple[str, str, str, str]]):
        self.problems = problems
        super().__init__(*self.lines())

    def lines(self) -> list[str]:
        return [f"{f}:{s}:{k}: {m}" for f, s, k, m in self.problems]

    @property
    def nothing_configured(self) -> bool:
        """The only problem is that no service is described: synlb balances nothing."""
        return bool(self.problems) and all(p[3] == NO_SERVICE for p in self.problems)


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
    flow_hash: str = "blake2b"  # "blake2b" (the worker's) or "jhash" (the kernel's; always, for nftables)

    @property
    def kernel_slots(self) -> bool:
        """An nfqueue service whose worker gets the slot from the kernel (flow_hash = jhash)."""
        return self.engine == "nfqueue" and self.flow_hash == "jhash"

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


DEFAULT_NICE = -10  # the control plane's: see sched.py


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
    worker_user: str = "_synlb"
    # the control plane's scheduling priority: not part of the data plane's
    # fingerprint (changing it reinstalls nothing)
    nice: int = field(default=DEFAULT_NICE, compare=False, repr=False)


@dataclass(frozen=True)
class Config:
    files: tuple
    globals: Globals
    services: tuple  # of Service, in name order
    targets: dict  # name -> Target
    sections: dict = field(default_factory=dict, compare=False, hash=False)
    # every section as read: name -> {key: (value, file)}
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # parsed values of the sections that plugins declare: name -> {key: value}
    vrrp: VrrpConfig | None = field(default=None, compare=False, hash=False)
    # the [vrrp] section: which keepalived group/instance drives this node; None: standalone

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def targets_of(self, service: Service) -> list[Target]:
        return [self.targets[n] for n in service.target_names]

    def service_marks(self) -> set[int]:
        """The marks of every target some service balances to: synlb's connections carry one."""
        return {t.mark for s in self.services for t in self.targets_of(s)}

    def digest(self) -> str:
        """A stable fingerprint of everything the data plane depends on."""
        h = hashlib.sha256(repr((self.globals, self.services, sorted(self.targets.items()))).encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- option types









# A VIP prefix shorter than these would capture a router's whole traffic
# (vips = 0.0.0.0/0 queues every new connection that crosses the router).
MIN_VIP_PREFIXLEN = {4: 16, 6: 48}
MAX_QUEUES = 64  # per service: one worker process per queue, more than any router has CPUs
# Routing protocol numbers of other daemons (iproute2's rt_protos and
# rt_protos.d): synlb deletes every rule and route tagged with its own.
# ROUTE_PROTOCOL_RANGE: the numbers route_protocol may take at all.
ROUTE_PROTOCOL_RANGE = (5, 255)
FOREIGN_PROTOCOLS = {8: "gated", 9: "ra", 10: "mrt", 11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp",
                     15: "ntk", 16: "dhcp", 17: "mrouted", 18: "keepalived", 42: "babel", 99: "openr",
                     186: "bgp", 187: "isis", 188: "ospf", 189: "rip", 192: "eigrp"}


def _special(a) -> str | None:
    """Why address or network ``a`` cannot be a VIP or a target, or None."""
    for test, what in (("is_unspecified", "the unspecified address"), ("is_loopback", "loopback"),
                       ("is_multicast", "multicast"), ("is_link_local", "link-local")):
        if getattr(a, test):
            return what
    if a.version == 4 and ipaddress.ip_network(a).overlaps(ipaddress.ip_network("255.255.255.255/32")):
        return "the broadcast address"
    return None


def _vips(text: str) -> tuple:
    items = _list(text)
    if not items:
        raise OptionError("at least one VIP prefix is required")
    nets = []
    for item in items:
        if "%" in item:
            raise OptionError(f"{item!r}: a VIP has no zone (%...)")
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as e:
            raise OptionError(f"{item!r} is not an IP prefix ({e})") from None
        if net.prefixlen < MIN_VIP_PREFIXLEN[net.version]:
            raise OptionError(f"{net} would capture /{net.prefixlen} of the router's traffic; a VIP prefix "
                              f"is /{MIN_VIP_PREFIXLEN[net.version]} or longer")
        why = _special(net)
        if why:
            raise OptionError(f"{net} is {why}, not a service address")
        nets.append(net)
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
    if last - first + 1 > MAX_QUEUES:
        raise OptionError(f"{last - first + 1} queues (one worker each); at most {MAX_QUEUES}")
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
        if "%" in item:
            raise OptionError(f"{item!r}: a target address has no zone (%...)")
        try:
            a = ipaddress.ip_address(item)
        except ValueError:
            raise OptionError(f"{item!r} is not an IP address") from None
        why = _special(a)
        if why:
            raise OptionError(f"{a} is {why}, not a real server's address")
        addrs.append(a)
    versions = [a.version for a in addrs]
    if len(set(versions)) != len(versions):
        raise OptionError("one address per family (IPv4, IPv6) at most")
    return tuple(addrs)


def _route_protocol(text: str) -> int:
    v = _int(*ROUTE_PROTOCOL_RANGE)(text)
    if v in FOREIGN_PROTOCOLS:
        raise OptionError(f"{v} is {FOREIGN_PROTOCOLS[v]}'s routing protocol; synlb would delete its "
                          f"rules and routes (the default is 229)")
    return v


def _hash_key(text: str) -> str:
    t = _nonempty(text)
    if len(t.encode()) > MAX_KEY_BYTES:
        raise OptionError(f"{len(t.encode())} bytes; the hash uses at most {MAX_KEY_BYTES} (a longer key "
                          "would be cut, so two keys that differ after that would hash alike)")
    return t


# VyOS's policy routing marks a table's packets 0x7FFFFFFF - table (tables
# 1..200) and deletes the ip rules that carry such marks on every commit.
VYOS_MARKS = range(0x7FFFFFFF - 200, 0x7FFFFFFF)

# With ``flow_hash = jhash`` the kernel hands a worker the packet's Maglev
# slot as its mark, SLOT_MARKS.start + slot (nft_engine.py), until the
# worker sets the target's mark: no target may have one of these marks.
# (1 << 20 slots: the largest table_size, 1000003, fits.)
SLOT_MARKS = range(0x7E000000, 0x7E000000 + (1 << 20))
SLOT_MARK_MASK = 0xFFF00000  # mark & SLOT_MARK_MASK == SLOT_MARKS.start: a slot mark


def _mark(text: str) -> int:
    v = _int(1, 0xFFFFFFFF)(text)
    if v in VYOS_MARKS:
        raise OptionError(f"{v:#x} is one of VyOS's policy-route marks ({VYOS_MARKS.start:#x}.."
                          f"{VYOS_MARKS.stop - 1:#x}), whose ip rules VyOS deletes")
    if v in SLOT_MARKS:
        raise OptionError(f"{v:#x} is in synlb's slot marks ({SLOT_MARKS.start:#x}..{SLOT_MARKS.stop - 1:#x}), "
                          "which carry a packet's Maglev slot to the worker (flow_hash = jhash)")
    return v


def _table_id(text: str) -> int:
    v = _int(1, 0xFFFFFFFF)(text)
    if v in (253, 254, 255):
        raise OptionError(f"{v} is a reserved routing table (default/main/local)")
    return v


# The user the NFQUEUE workers run as (with CAP_NET_ADMIN only, docs/HARDENING.md):
# `make deps` and the Debian package create it.
DEFAULT_WORKER_USER = "_synlb"
WORKER_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def _worker_user(text: str) -> str:
    t = text.strip()
    if not WORKER_USER_RE.fullmatch(t):
        raise OptionError(f"{text!r} is not a user name (1-32 of A-Z a-z 0-9 _ . -, not starting with a "
                          "digit, a dot or a dash)")
    return t


def worker_user_problem(name: str) -> str | None:
    """Why ``name`` cannot run the workers (no such user), or None."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        how = ("`make deps` or the Debian package creates it: useradd --system --no-create-home "
               "--home-dir /nonexistent --shell /usr/sbin/nologin --user-group " + name
               if name == DEFAULT_WORKER_USER else "create it, or name another")
        return (f"no user {name!r} on this system: the NFQUEUE workers run as it ({how}; "
                "worker_user = root runs them as root)")
    return None


def _state_dir(text: str) -> str:
    t = text.strip()
    if not t.startswith("/"):
        raise OptionError(f"{text!r} is not an absolute path")
    return t




# ------------------------------------------------------------------- schemas
# Each section type declares its options next to the code that uses them.

GLOBAL_OPTIONS = schema.Schema("synlb", [
    Option("state_dir", _state_dir, "/run/synlb", "pid files, saved sysctls, applied state"),
    Option("hash_key", _hash_key, DEFAULT_HASH_KEY,
           "key of the flow and Maglev hashes; must be equal on every router of a cluster"),
    Option("rule_priority", _int(1, 32765), 3000, "priority of synlb's fwmark ip rules"),
    Option("route_protocol", _route_protocol, 229,
           "routing protocol number that tags synlb's ip rules and routes"),
    Option("pickup", _bool, True,
           "turn on conntrack loose pickup while active (nf_conntrack_tcp_loose, be_liberal)"),
    Option("copy_range", _int(64, 65535), 256, "bytes of each queued packet copied to the worker"),
    Option("queue_maxlen", _int(16, 1 << 20), 4096, "NFQUEUE kernel queue length per queue"),
    Option("plugins", _list, ["lb"],
           "plugins `synlb run` hosts: lb, health, scripts, metrics, or a dotted module path"),
    Option("worker_user", _worker_user, DEFAULT_WORKER_USER,
           "user the NFQUEUE workers run as, with CAP_NET_ADMIN only (it must exist when a service "
           "uses the nfqueue engine); root: "
           "as root, with every capability (check warns)"),
    Option("nice", _int(-20, 19), DEFAULT_NICE,
           "nice value of synlb run and of the commands that change the data plane (the NFQUEUE "
           "workers run at 0)"),
])

def _check_service(s: dict) -> list[tuple[str, str]]:
    out = []
    if "targets" in s and len(set(s["targets"])) != len(s["targets"]):
        out.append(("targets", "a target is listed twice"))
    if s.get("targets") and "table_size" in s and s["table_size"] < 100 * len(s["targets"]):
        out.append(("table_size", f"{s['table_size']} is below 100 x {len(s['targets'])} targets; "
                                  "balance would be poor"))
    if s.get("track_syn") is False and s.get("mode") == "nat":
        out.append(("track_syn", "no needs mode = route (DNAT needs the connection tracked from its SYN)"))
    if s.get("engine") == "nftables" and s.get("shortcut") is False:
        out.append(("shortcut", "no is for the nfqueue engine only (the nftables engine has no queue)"))
    if s.get("engine") == "nftables" and s.get("flow_hash") == "blake2b":
        out.append(("flow_hash", "blake2b is the nfqueue engine's worker hash; the nftables engine hashes "
                                 "in the kernel (jhash)"))
    return out


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
    Option("flow_hash", _choice("blake2b", "jhash"), None,
           "the flow hash that picks a connection's Maglev slot: blake2b (keyed BLAKE2b in the "
           "worker; the nfqueue engine's default) or jhash (the kernel's, as the nftables engine "
           "computes it: the kernel hands the worker the slot, and both engines pick alike)"),
], checks=[_check_service])

TARGET_OPTIONS = schema.Schema("target", [
    Option("address", _addresses, schema.REQUIRED, "one address per family"),
    Option("mark", _mark, None, "fwmark; default derived from the name"),
    Option("table", _table_id, None, "route mode routing table; default = mark"),
])

# The sections config.load() knows itself: kind -> (schema, named). A named
# kind is written [kind:NAME], any number of times; the others are one [kind].
# Plugins add sections of their own (SECTIONS, see plugins/__init__.py).
SECTION_KINDS: dict[str, tuple[schema.Schema, bool]] = {
    "synlb": (GLOBAL_OPTIONS, False),
    "service": (SERVICE_OPTIONS, True),
    "target": (TARGET_OPTIONS, True),
    "vrrp": (VRRP_SCHEMA, False),
}


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
    for path in list(files):
        if not os.path.isfile(path):  # a FIFO would hang every reader of the config
            problems.append((path, "-", "-", "not a regular file"))
            files.remove(path)
            continue
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
    schemas = {kind: sch for kind, (sch, _) in SECTION_KINDS.items()}
    for kind, attr in (("service", "SERVICE_OPTIONS"), ("target", "TARGET_OPTIONS")):
        schemas[kind] = schemas[kind].extended(*(getattr(m, attr, ()) for m in mods))
    plugin_sections: dict[str, schema.Schema] = {}
    for m in mods:
        plugin_sections.update(getattr(m, "SECTIONS", {}))
    extra_values: dict[str, dict] = {}
    single: dict[str, dict] = {}  # kind -> parsed values of [kind]
    named: dict[str, dict[str, dict]] = {"service": {}, "target": {}}  # kind -> NAME -> parsed values
    for sec, vals in sections.items():
        kind, _, name = sec.partition(":")
        if sec == "synlb":
            continue  # parsed first: it names the plugins
        if kind in SECTION_KINDS and bool(name) == SECTION_KINDS[kind][1]:
            if name:
                pattern, why = NAME_RULES[kind]
                if not pattern.match(name):
                    problems.append((where(sec), sec, "-", why))
                    continue
                named[kind][name] = schema.parse_section(schemas[kind], sec, vals, main, problems)
            else:
                single[kind] = schema.parse_section(schemas[kind], sec, vals, main, problems)
        elif kind in plugin_sections or sec in plugin_sections:
            sch = plugin_sections.get(kind) or plugin_sections[sec]
            extra_values[sec] = schema.parse_section(sch, sec, vals, main, problems)
        else:
            problems.append((where(sec), sec, "-", f"unknown section (known: {_known(plugin_sections)})"))
    services_raw, targets_raw = named["service"], named["target"]

    if not services_raw and not any(p[1].startswith("service:") for p in problems):
        problems.append((main, "-", "-", NO_SERVICE))

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
            for a in t.addresses:
                if any(a in vip for vip in s.get("vips", ()) if vip.version == a.version):
                    problems.append((src("targets"), sec, "targets",
                                     f"target {tname}'s address {a} is one of the service's VIPs"))
        if not {"vips", "targets", "queue", "table_size"} <= s.keys():
            continue
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
            shortcut=s["shortcut"], track_syn=s["track_syn"], engine=s["engine"],
            flow_hash=s["flow_hash"] or ("jhash" if s["engine"] == "nftables" else "blake2b")))

    # The workers' user must exist wherever there are workers (a service of
    # the nfqueue engine): never a fallback to root. Not asked otherwise (no
    # service: the shipped file, checked where the package is built; only
    # the nftables engine), nor by load_globals and load_teardown (down
    # needs no worker).
    if "worker_user" in glob_vals and any(s.get("engine", "nfqueue") == "nfqueue" for s in services_raw.values()):
        why = worker_user_problem(glob_vals["worker_user"])
        if why:
            problems.append((sections.get("synlb", {}).get("worker_user", (None, main))[1], "synlb",
                             "worker_user", why))

    # The same VIP:port in two services would make the first one win silently.
    for i, a in enumerate(services):
        for b in services[i + 1:]:
            if _services_overlap(a, b):
                problems.append((where(f"service:{b.name}"), f"service:{b.name}", "vips",
                                 f"overlaps service {a.name} (same VIPs, protocol and ports)"))

    why = _ready_file_problem(single.get("vrrp", {}).get("ready_file"), glob_vals.get("state_dir"))
    if why:
        problems.append((sections["vrrp"]["ready_file"][1], "vrrp", "ready_file", why))

    if problems:
        raise ConfigError(problems)
    g = Globals(**{**glob_vals, "plugins": tuple(glob_vals["plugins"])})
    return Config(files=tuple(files), globals=g, services=tuple(services), targets=targets,
                  sections=sections, extra=extra_values,
                  vrrp=vrrp_config(single["vrrp"]) if "vrrp" in single else None)


def _ready_file_problem(ready_file: str | None, state_dir: str | None) -> str | None:
    """Why ``[vrrp] ready_file`` cannot be in ``state_dir``, or None."""
    if not ready_file or not state_dir:
        return None
    sd = os.path.normpath(state_dir)
    if os.path.commonpath([sd, os.path.normpath(ready_file)]) == sd:
        # keepalived drops a track_file whose directory is missing when it
        # starts, and synlb makes its state dir later (at boot, /run/synlb)
        return (f"{ready_file} is inside state_dir {state_dir}, which may not exist yet when keepalived "
                "starts (keepalived then ignores the file for good): name a file in a directory that "
                "always exists, e.g. /run/synlb.ready")
    return None


def _known(plugin_sections: dict) -> str:
    """The known sections, for the message about an unknown one: the core
    three first, then [vrrp] and the plugins' in name order."""
    def show(kind: str) -> str:
        return f"[{kind}:NAME]" if SECTION_KINDS.get(kind, (None, False))[1] else f"[{kind}]"
    core = ("synlb", "service", "target")
    rest = sorted((set(SECTION_KINDS) - set(core)) | set(plugin_sections))
    return ", ".join(show(k) for k in (*core, *rest))


class PluginError(UserError):
    """A plugin named in [synlb] plugins that does not import or has no create()."""


def plugin_module(name: str):
    """The module of the plugin ``name`` (``[synlb] plugins``): names without
    a dot are modules of ``synlb.plugins`` (``lb`` is ``synlb.plugins.lb``); a
    dotted name is imported as is, for plugins shipped elsewhere. Raises
    PluginError naming the plugin when it does not import or has no create()."""
    modname = name if "." in name else f"synlb.plugins.{name}"
    if "." in name:
        # `synlb check` imports it, as root: never code a user could have written
        for path in _module_files(modname):
            why = trust.insecure(path)
            if why:
                raise PluginError(f"plugin {name!r} not imported: {why} (a plugin must be a root-owned "
                                  f"file that only root can write, in such directories)")
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            raise PluginError(f"no plugin {name!r} (module {modname} not found)") from None
        raise PluginError(f"plugin {name!r} is broken: {e}") from None
    except Exception as e:  # noqa: BLE001 - a broken plugin must not crash `check`
        raise PluginError(f"plugin {name!r} is broken: {type(e).__name__}: {e}") from None
    if not callable(getattr(mod, "create", None)):
        raise PluginError(f"plugin {name!r} ({modname}) has no create(host)")
    return mod


def _module_files(modname: str) -> list[str]:
    """The files ``import modname`` would run (each package's __init__, then
    the module), found without importing anything."""
    from importlib.machinery import PathFinder
    files: list[str] = []
    search = None  # sys.path
    for part in modname.split("."):
        spec = PathFinder.find_spec(part, search)
        if spec is None:
            break  # the import below says it is not found
        if spec.origin and os.path.isabs(spec.origin):
            files.append(spec.origin)
        search = spec.submodule_search_locations
        if search is None:
            break
        files += [d for d in search if os.path.isabs(d)]
    return files


def _plugin_modules(names, sections: dict, main: str, problems: list) -> list:
    mods = []
    where = sections.get("synlb", {}).get("plugins", (None, main))[1]
    for name in names:
        try:
            mods.append(plugin_module(name))
        except PluginError as e:
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
    """Parse one already-validated plugin section (e.g. [scripts]) into a dict."""
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


def load_teardown(path: str | None = None) -> tuple[Globals, VrrpConfig | None]:
    """Only [synlb] and [vrrp] (None when there is no [vrrp]): enough to tear
    down on a VRRP event even when the rest of the file is broken. Raises
    ConfigError when a file does not parse or either section is broken."""
    main = config_path(path)
    _, sections, problems = read_layers(main)
    vals = schema.parse_section(GLOBAL_OPTIONS, "synlb", sections.get("synlb", {}), main, problems)
    vrrp_vals = (schema.parse_section(VRRP_SCHEMA, "vrrp", sections["vrrp"], main, problems)
                 if "vrrp" in sections else None)
    if problems:
        raise ConfigError(problems)
    g = Globals(**{**vals, "plugins": tuple(vals["plugins"])})
    return g, None if vrrp_vals is None else vrrp_config(vrrp_vals)
