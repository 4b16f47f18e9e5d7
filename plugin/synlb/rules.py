"""Render the netfilter rules synlb owns, as iptables-restore input (pure).

What synlb owns, and nothing else, in every family:
- user chains whose name starts with ``synlb-``;
- rules in built-in chains carrying ``-m comment --comment synlb:<service>``.

The packet path (docs/DESIGN-NOTES.md): only packets that are not an ESTABLISHED,
already-marked connection reach the NFQUEUE worker; the worker's mark is
saved into the connmark on the way out (VIPOUT), and every later packet has
it restored in the kernel (ESTABLISHED).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import SLOT_MARK_MASK, SLOT_MARKS, Config, Service

PREFIX = "synlb-"
COMMENT_PREFIX = "synlb:"
ESTABLISHED = PREFIX + "ESTABLISHED"
TABLES = ("mangle", "nat", "raw")  # the netfilter tables synlb may have rules in
VIPOUT = PREFIX + "VIPOUT"


def vip_chain(service: Service) -> str:
    return f"{PREFIX}VIP-{service.name}"


def dnat_chain(service: Service) -> str:
    return f"{PREFIX}DNAT-{service.name}"


@dataclass
class Table:
    """One netfilter table's owned chains and rules, in apply order."""
    name: str
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # "-A CHAIN ..." lines

    def add_chain(self, chain: str) -> None:
        if chain not in self.chains:
            self.chains.append(chain)

    def is_empty(self) -> bool:
        return not self.chains and not self.rules


def _ports_match(service: Service) -> list[str]:
    if not service.ports:
        return []
    spec = ",".join(str(a) if a == b else f"{a}:{b}" for a, b in service.ports)
    return ["-m", "multiport", "--dports", spec]


def _comment(service: Service) -> list[str]:
    return ["-m", "comment", "--comment", COMMENT_PREFIX + service.name]


def _queue_target(service: Service) -> list[str]:
    if service.queue_first == service.queue_last:
        argv = ["-j", "NFQUEUE", "--queue-num", str(service.queue_first)]
    else:
        argv = ["-j", "NFQUEUE", "--queue-balance", f"{service.queue_first}:{service.queue_last}"]
    if service.queue_bypass:
        argv.append("--queue-bypass")
    if service.queue_first != service.queue_last:
        # spread flows over the queues by the CPU that received them
        argv.append("--queue-cpu-fanout")
    return argv


def render_family(cfg: Config, family: int, active_targets: dict[str, list[str]] | None = None
                  ) -> dict[str, Table]:
    """Owned chains and rules for IP version ``family``: {"mangle", "nat", "raw": Table}.

    ``active_targets`` is accepted for symmetry with the worker; the kernel
    side does not depend on health (DNAT rules exist for every configured
    target so a connection keeps working while its target is marked down).
    """
    mangle = Table("mangle")
    nat = Table("nat")
    raw = Table("raw")
    tables = {"mangle": mangle, "nat": nat, "raw": raw}
    # services of the nftables engine have no iptables rules (nft_engine.py)
    services = [s for s in cfg.services if family in s.families() and s.engine == "nfqueue"]
    if not services:
        return tables

    for svc in services:
        mangle.add_chain(vip_chain(svc))
    mangle.add_chain(ESTABLISHED)
    mangle.add_chain(VIPOUT)

    for svc in services:
        chain = vip_chain(svc)
        vips = [v for v in svc.vips if v.version == family]
        for vip in vips:
            for proto in svc.protocols:
                m = ["-d", str(vip), "-i", svc.ingress, "-p", proto] + _ports_match(svc) + _comment(svc)
                mangle.rules.append(" ".join(["-A", "PREROUTING"] + m + ["-j", chain]))
        for vip in vips:
            for proto in svc.protocols:
                if svc.mode == "route":
                    m = ["-d", str(vip), "-p", proto]
                else:  # after DNAT the destination is the target: match the original one
                    # a host VIP is written bare: iptables-save prints it so, and a
                    # rule added as "a.b.c.d/32" cannot be deleted by that spelling
                    orig = str(vip.network_address) if vip.num_addresses == 1 else str(vip)
                    m = ["-p", proto, "-m", "conntrack", "--ctorigdst", orig]
                m += _ports_match(svc) + _comment(svc)
                mangle.rules.append(" ".join(["-A", "POSTROUTING"] + m + ["-j", VIPOUT]))
        # Only connections that already carry a mark are short-cut: after a
        # failover a connection first seen in the reply direction has
        # connmark 0 and must still reach the worker (docs/DESIGN-NOTES.md#4,
        # unmarked established connections).
        if svc.shortcut and svc.track_syn:
            mangle.rules.append(f"-A {chain} -m conntrack --ctstate ESTABLISHED -m connmark ! --mark 0 "
                                f"-j {ESTABLISHED}")
        elif svc.shortcut:
            # A router that sees only the client's direction never sees a
            # reply, so its entries stay ctstate NEW: the connmark alone says
            # the connection was marked (no entry, no connmark match).
            mangle.rules.append(f"-A {chain} -m connmark ! --mark 0 -j {ESTABLISHED}")
        if not svc.track_syn and "tcp" in svc.protocols:
            # Untracked SYN: the first ACK is then picked up as an established
            # connection (loose pickup) instead of being INVALID after a SYN
            # whose SYN-ACK this router never sees.
            for vip in vips:
                m = ["-d", str(vip), "-i", svc.ingress, "-p", "tcp", "-m", "tcp", "--syn"]
                raw.rules.append(" ".join(["-A", "PREROUTING"] + m + _ports_match(svc) + _comment(svc)
                                          + ["-j", "CT", "--notrack"]))
        mangle.rules.append(" ".join(["-A", chain] + _queue_target(svc)))

        if svc.mode == "nat":
            dchain = dnat_chain(svc)
            nat.add_chain(dchain)
            for vip in vips:
                for proto in svc.protocols:
                    m = ["-d", str(vip), "-i", svc.ingress, "-p", proto] + _ports_match(svc) + _comment(svc)
                    nat.rules.append(" ".join(["-A", "PREROUTING"] + m + ["-j", dchain]))
            for t in cfg.targets_of(svc):
                addr = t.address(family)
                nat.rules.append(f"-A {dchain} -m mark --mark {t.mark:#x} -j DNAT --to-destination {addr}")

    mangle.rules.append(f"-A {ESTABLISHED} -j CONNMARK --restore-mark")
    mangle.rules.append(f"-A {ESTABLISHED} -j ACCEPT")
    # NEW connections, and picked-up ones first seen from the target side
    # (connmark still 0), get the worker's mark saved. A slot mark (what the
    # kernel handed a worker, flow_hash = jhash) is never saved: it is still
    # there only if no worker gave a verdict (queue_bypass).
    keep_slot = (f"-m mark ! --mark {SLOT_MARKS.start:#x}/{SLOT_MARK_MASK:#x} "
                 if any(s.kernel_slots for s in services) else "")
    mangle.rules.append(f"-A {VIPOUT} -m connmark --mark 0 {keep_slot}-j CONNMARK --save-mark")
    return tables


def render(cfg: Config) -> dict[int, dict[str, Table]]:
    """{4: {...}, 6: {...}} for both IP versions."""
    return {fam: render_family(cfg, fam) for fam in (4, 6)}


# -------------------------------------------------------- live rules (parsing)

def is_owned_rule(line: str) -> bool:
    """An iptables-save line ("-A CHAIN ...") that synlb owns."""
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] != "-A":
        return False
    if parts[1].startswith(PREFIX):
        return True
    return f'--comment "{COMMENT_PREFIX}' in line or f"--comment {COMMENT_PREFIX}" in line


def owned_from_save(text: str) -> dict[str, Table]:
    """Parse iptables-save output into the owned part of each table."""
    tables: dict[str, Table] = {}
    current: Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], Table(line[1:]))
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(PREFIX):
                current.add_chain(chain)
        else:
            if line.startswith("["):  # counters from iptables-save -c
                line = line.split("]", 1)[1].strip()
            if is_owned_rule(line):
                current.rules.append(line)
    return tables


def restore_script(live: dict[str, Table], desired: dict[str, Table]) -> str:
    """iptables-restore --noflush input turning ``live`` into ``desired``.

    One transaction per call: built-in chain rules synlb owns are deleted and
    re-added, owned chains are flushed by declaring them, chains no longer
    wanted are deleted after the rules that reference them.
    """
    out: list[str] = []
    for name in TABLES:
        old = live.get(name, Table(name))
        new = desired.get(name, Table(name))
        if old.is_empty() and new.is_empty():
            continue
        out.append(f"*{name}")
        for line in old.rules:
            chain = line.split()[1]
            if not chain.startswith(PREFIX):
                out.append("-D" + line[2:])
        for chain in new.chains:
            out.append(f":{chain} - [0:0]")
        stale = [c for c in old.chains if c not in new.chains]
        for chain in stale:
            out.append(f":{chain} - [0:0]")
        out.extend(new.rules)
        for chain in stale:
            out.append(f"-X {chain}")
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def describe(desired: dict[int, dict[str, Table]]) -> str:
    """Human text of what would be installed (dry run)."""
    out = []
    for fam, tables in desired.items():
        tool = "iptables" if fam == 4 else "ip6tables"
        for name, t in tables.items():
            if t.is_empty():
                continue
            out.append(f"# {tool} -t {name}")
            out.extend(f":{c}" for c in t.chains)
            out.extend(t.rules)
    return "\n".join(out)
