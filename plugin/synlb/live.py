"""Checks only the live system can answer, run before anything is changed."""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shutil

from .config import Config
from .errors import UserError


class LiveError(UserError):
    """Problems with the live system, one per line: ``FILE:SECTION:KEY: why``."""

    prefixed = False

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(*problems)

    def lines(self) -> list[str]:
        return list(self.problems)


def problems(cfg: Config) -> list[str]:
    # pyroute2 is imported here: the CLI imports this module for LiveError,
    # and every NFQUEUE worker starts through the CLI (12 MB of RSS)
    from pyroute2 import IPRoute

    out = []
    main = cfg.files[0]
    for tool in ("iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"):
        if shutil.which(tool) is None:
            out.append(f"{main}:-:-: {tool} not found (apt-get install iptables)")
    if any(s.flow_hash == "jhash" for s in cfg.services):
        from .nft_apply import available
        if available() is None:
            out.append(f"{main}:-:-: neither python3-nftables nor nft found, needed by engine = nftables "
                       "and flow_hash = jhash (apt-get install python3-nftables)")
    if os.geteuid() != 0:
        out.append(f"{main}:-:-: must run as root to change the data plane")
    with IPRoute() as ipr:
        links = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        local = [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()
                 if a.get_attr("IFA_ADDRESS")]
    for svc in cfg.services:
        sec = f"service:{svc.name}"
        src = cfg.sections.get(sec, {})
        where = lambda key: src.get(key, (None, main))[1]  # noqa: E731
        if svc.ingress not in links:
            out.append(f"{where('ingress')}:{sec}:ingress: no interface {svc.ingress!r} in this network namespace")
        if svc.egress and svc.egress not in links:
            out.append(f"{where('egress')}:{sec}:egress: no interface {svc.egress!r} in this network namespace")
        if svc.mode == "route":
            for vip in svc.vips:
                hits = [a for a in local if a.version == vip.version and a in vip]
                if hits:
                    out.append(f"{where('vips')}:{sec}:vips: {hits[0]} is a local address of this router; "
                               "in route mode marked packets would be delivered locally (use mode = nat, "
                               "or remove the address)")
    return out


def warnings(cfg: Config) -> list[str]:
    """Legal but unwise, as ``FILE:SECTION:KEY: why`` lines (never an error)."""
    from .config import DEFAULT_HASH_KEY
    out = []
    if cfg.globals.hash_key == DEFAULT_HASH_KEY:
        where = cfg.sections.get("synlb", {}).get("hash_key", (None, cfg.files[0]))[1]
        out.append(f"{where}:synlb:hash_key: the shipped key is public: anyone can predict which target "
                   "a flow goes to and pile connections onto one; set a secret, the same on every router "
                   "(e.g. openssl rand -hex 32)")
    if any(s.queues for s in cfg.services):
        try:
            root = pwd.getpwnam(cfg.globals.worker_user).pw_uid == 0
        except KeyError:  # config.load refused it already
            root = False
        if root:
            where = cfg.sections.get("synlb", {}).get("worker_user", (None, cfg.files[0]))[1]
            out.append(f"{where}:synlb:worker_user: {cfg.globals.worker_user}: the NFQUEUE workers, which parse "
                       "every queued packet, run as root with every capability; the default _synlb runs "
                       "them with CAP_NET_ADMIN only (docs/HARDENING.md)")
    saves = {tool: _capture([f"{tool}-save"]) for tool in ("iptables", "ip6tables") if shutil.which(f"{tool}-save")}
    nft = _capture(["nft", "list", "ruleset"]) if shutil.which("nft") else ""
    out += invalid_drop_warnings(cfg, saves, nft)
    out += rp_filter_warnings(cfg)
    return out


# ------------------------------------------------------------ strict reverse-path filtering

def _rp_filter(ifname: str) -> int | None:
    try:
        with open(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def rp_filter_warnings(cfg: Config, read=_rp_filter) -> list[str]:
    """Warnings for strict IPv4 reverse-path filtering (``rp_filter`` 1, the
    larger of ``all`` and the interface's) on a route-mode service's
    ``egress``: the targets' replies come from the VIP and arrive there,
    while this router's route to the VIP (if any: the default route) goes
    out another interface, so the kernel drops them (nstat
    TcpExtIPReversePathFilter). ``read(ifname)``: the sysctl's value, None
    when the interface is not here."""
    out = []
    main = cfg.files[0]
    seen = set()
    for svc in cfg.services:
        if svc.mode != "route" or not svc.egress or svc.egress in seen \
                or not any(v.version == 4 for v in svc.vips):
            continue
        seen.add(svc.egress)
        dev, alls = read(svc.egress), read("all")
        if dev is None:
            continue
        if max(dev, alls or 0) == 1:
            where = cfg.sections.get(f"service:{svc.name}", {}).get("egress", (None, main))[1]
            out.append(f"{where}:service:{svc.name}:egress: strict reverse-path filtering on {svc.egress} "
                       f"(net.ipv4.conf.{svc.egress}.rp_filter = {dev}, all = {alls}): the targets' replies "
                       f"come from the VIP and arrive on {svc.egress}, and the kernel drops them unless this "
                       "router's route to the VIP goes out there; a router on the targets' reply path (the "
                       "VRRP master, or any router when the targets reply over ECMP) needs rp_filter = 2 "
                       f"(loose) or 0 on {svc.egress} and all")
    return out


# ------------------------------------------------------------ firewalls dropping INVALID

_IPT_TABLES = {"filter", "mangle", "raw", "nat", "security"}  # nft tables iptables-nft owns: read with iptables-save
_JUMP = re.compile(r"\s-[jg]\s+(\S+)")


def _drops(rule: str) -> bool:
    m = _JUMP.search(rule)
    return bool(m) and m.group(1) in ("DROP", "REJECT")


def _matches_invalid(rule: str) -> bool:
    for m in re.finditer(r"(!\s+)?--(?:ctstate|state)\s+(\S+)", rule):
        if not m.group(1) and "INVALID" in m.group(2).split(","):
            return True
    return False


def invalid_drops_iptables(save_text: str) -> list[str]:
    """The rules of an ``iptables-save`` text that drop (DROP, REJECT)
    packets in ctstate INVALID on their way through FORWARD: in FORWARD
    itself or in a chain FORWARD jumps to (any table that has FORWARD)."""
    out = []
    table = None
    rules: dict[str, dict[str, list[str]]] = {}
    for line in save_text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
            rules[table] = {}
        elif line.startswith("-A ") and table is not None:
            chain = line.split()[1]
            rules[table].setdefault(chain, []).append(line)
    for table, chains in rules.items():
        seen, todo = set(), ["FORWARD"]
        while todo:
            chain = todo.pop()
            if chain in seen:
                continue
            seen.add(chain)
            for rule in chains.get(chain, []):
                m = _JUMP.search(rule)
                if m and m.group(1) in chains:
                    todo.append(m.group(1))
                if _drops(rule) and _matches_invalid(rule):
                    out.append(f"{table} {rule}")
    return out


def invalid_drops_nft(ruleset: str) -> list[str]:
    """The same for ``nft list ruleset`` text: rules with ``ct state``
    including ``invalid`` and a drop or reject verdict, in a chain hooked on
    forward or one it jumps to. iptables-nft's own tables (filter, mangle,
    ... in ip and ip6) are left to :func:`invalid_drops_iptables`."""
    out = []
    tables: dict[str, dict[str, list[str]]] = {}
    hooked: dict[str, list[str]] = {}
    table = chain = None
    for raw in ruleset.splitlines():
        line = raw.strip()
        m = re.match(r"table (\S+) (\S+) \{", line)
        if m:
            fam, name = m.groups()
            table = None if fam in ("ip", "ip6") and name in _IPT_TABLES else f"{fam} {name}"
            if table:
                tables[table], hooked[table] = {}, []
            chain = None
            continue
        if table is None:
            continue
        m = re.match(r"chain (\S+) \{", line)
        if m:
            chain = m.group(1)
            tables[table][chain] = []
            continue
        if chain is None or not line or line == "}":
            continue
        if re.search(r"\bhook forward\b", line):
            hooked[table].append(chain)
        elif not line.startswith(("type ", "policy ")):
            tables[table][chain].append(line)
    for table, chains in tables.items():
        seen, todo = set(), list(hooked[table])
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            for rule in chains.get(c, []):
                for j in re.findall(r"\b(?:jump|goto) (\S+)", rule):
                    todo.append(j)
                m = re.search(r"\bct state (\{[^}]*\}|\S+)", rule)
                if m and not re.search(r"ct state != ", rule) and "invalid" in re.split(r"[{},\s]+", m.group(1)) \
                        and re.search(r"\b(drop|reject)\b", rule):
                    out.append(f"{table} chain {c}: {rule}")
    return out


def invalid_drop_warnings(cfg: Config, saves: dict[str, str], nft_ruleset: str = "") -> list[str]:
    """Warnings for the firewall rules that drop ctstate INVALID in FORWARD
    (``saves``: {"iptables": text, "ip6tables": text})."""
    main = cfg.files[0]
    found = [f"{tool} {r}" for tool, text in sorted(saves.items()) for r in invalid_drops_iptables(text)]
    found += [f"nft {r}" for r in invalid_drops_nft(nft_ruleset)]
    return [f"{main}:-:-: the firewall drops packets conntrack calls INVALID in FORWARD ({r}): a router "
            "that sees only one direction of its connections (active-active behind ECMP, the replies "
            "through another router) needs them (with track_syn = yes every packet after the SYN is INVALID "
            "there), so it would drop its share of the sessions; accept the VIPs' packets before that rule, "
            "or keep this router on the reply path" for r in found]


def _capture(argv: list[str]) -> str:
    import subprocess
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def verify(cfg: Config) -> None:
    found = problems(cfg)
    if found:
        raise LiveError(found)
