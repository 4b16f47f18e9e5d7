"""Apply the owned netfilter rules: read live, diff, one iptables-restore.

iptables-restore --noflush applies each table's block as one transaction, so
the data plane is never half-installed, and rules synlb does not own are
never touched (see rules.py for what it owns).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from . import rules
from .errors import UserError
from .rules import Table

SAVE = {4: "iptables-save", 6: "ip6tables-save"}
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
STATE_FILE = "netfilter.json"
XTABLES_WAIT = 5  # seconds iptables-restore waits for the xtables lock another program holds


class NetfilterError(UserError):
    """iptables missing, or refusing what synlb asked; the message says which."""


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetfilterError(f"{argv[0]}: not installed (apt-get install iptables)") from None
    if p.returncode != 0:
        raise NetfilterError(f"{' '.join(argv)}: {p.stderr.strip() or 'exit ' + str(p.returncode)}")
    return p.stdout


def save(family: int, counters: bool = False) -> str:
    return _run([SAVE[family]] + (["-c"] if counters else []))


def live_owned(family: int) -> dict[str, Table]:
    return rules.owned_from_save(save(family))


def _fingerprint(tables: dict[str, Table]) -> str:
    data = {n: (t.chains, t.rules) for n, t in sorted(tables.items()) if not t.is_empty()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _load_state(state_dir: str) -> dict:
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return {}


def _store_state(state_dir: str, state: dict) -> None:
    path = os.path.join(state_dir, STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, path)


def reconcile(desired: dict[int, dict[str, Table]], state_dir: str) -> list[str]:
    """Make the owned rules of both families equal ``desired``. Returns changes.

    iptables-save prints rules in its own canonical spelling, so "unchanged"
    means: the desired rules are the ones last applied, and the live owned
    rules are exactly what the kernel showed right after that apply.
    """
    state = _load_state(state_dir)
    changes = []
    for fam, tables in desired.items():
        text = save(fam)
        # remember which tables existed before synlb's first change, so that
        # teardown can leave iptables-save's output exactly as it found it
        state.setdefault(f"tables_before_{fam}", sorted(_table_names(text)))
        if f"chains_before_{fam}" not in state:
            state[f"chains_before_{fam}"] = sorted(_nft_chains(fam))
        live = rules.owned_from_save(text)
        want = _fingerprint(tables)
        seen = _fingerprint(live)
        if state.get(str(fam)) == [want, seen]:
            continue
        if not any(not t.is_empty() for t in live.values()) and all(t.is_empty() for t in tables.values()):
            state[str(fam)] = [want, seen]
            continue
        script = rules.restore_script(live, tables)
        if script:
            _run([RESTORE[fam], "--wait", str(XTABLES_WAIT), "--noflush"], stdin=script)
            changes.append(f"{'ip6tables' if fam == 6 else 'iptables'}: applied "
                           f"{sum(len(t.rules) for t in tables.values())} rules")
        after = live_owned(fam)
        state[str(fam)] = [want, _fingerprint(after)]
        state[f"rules_{fam}"] = _rule_lines(after)
    _store_state(state_dir, state)
    return changes


def _rule_lines(tables: dict[str, Table]) -> list[str]:
    return sorted(f"-t {n} {line}" for n, t in tables.items() for line in t.rules) + \
        sorted(f"-t {n} :{c}" for n, t in tables.items() for c in t.chains)


def drift(desired: dict[int, dict[str, Table]], state_dir: str) -> list[str]:
    """How synlb's live rules differ from ``desired`` (changes nothing).

    The desired rules were applied if their fingerprint is the one recorded
    at the last apply; the live ones are intact if they are exactly what the
    kernel showed right after it (iptables-save has its own spelling)."""
    state = _load_state(state_dir)
    out = []
    for fam, tables in desired.items():
        tool = "ip6tables" if fam == 6 else "iptables"
        live = live_owned(fam)
        want_empty = all(t.is_empty() for t in tables.values())
        live_empty = all(t.is_empty() for t in live.values())
        if want_empty and live_empty:
            continue
        if want_empty:
            out += [f"{tool}: unexpected {line}" for line in _rule_lines(live)]
            continue
        rec = state.get(str(fam))
        if rec is None or rec[0] != _fingerprint(tables):
            out.append(f"{tool}: synlb's rules are not the ones the configuration asks for (not applied)")
            continue
        if rec[1] == _fingerprint(live):
            continue
        seen, now = set(state.get(f"rules_{fam}", [])), set(_rule_lines(live))
        out += [f"{tool}: missing {line}" for line in sorted(seen - now)]
        out += [f"{tool}: unexpected {line}" for line in sorted(now - seen)]
        if seen == now:
            out.append(f"{tool}: synlb's rules changed since they were applied")
    return out


def _table_names(save_text: str) -> set[str]:
    return {ln[1:].strip() for ln in save_text.splitlines() if ln.startswith("*")}


def _is_pristine(save_text: str, table: str) -> bool:
    """Only built-in chains, policy ACCEPT, no rule: as if the table did not exist."""
    inside = False
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line[1:] == table
        elif inside and line.startswith(":"):
            parts = line[1:].split()
            if len(parts) < 2 or parts[1] != "ACCEPT":
                return False
        elif inside and line.startswith("-"):
            return False
    return True


def _drop_created_tables(fam: int, before: list[str]) -> list[str]:
    """Delete tables synlb's rules made iptables-nft create, once they are empty again.

    Only with the nf_tables backend (with iptables-legacy the tables always
    exist) and only when the table holds nothing at all.
    """
    if "nf_tables" not in _run([RESTORE[fam].replace("-restore", ""), "--version"]):
        return []
    text = save(fam)
    changes = []
    for table in sorted(_table_names(text) - set(before)):
        if table in rules.TABLES and _is_pristine(text, table):
            _run(["nft", "delete", "table", "ip" if fam == 4 else "ip6", table])
            changes.append(f"{'ip6tables' if fam == 6 else 'iptables'}: deleted empty table {table}")
    return changes


NFT_FAMILY = {4: "ip", 6: "ip6"}


def _nft_chains(fam: int) -> set[str]:
    """Chains of synlb's tables as nf_tables holds them ("mangle PREROUTING"):
    iptables-nft creates a built-in chain the first time a rule goes into
    it, and iptables-save lists every built-in chain whether it exists or
    not, so only nft tells them apart. Empty without nft (or with the
    legacy backend, where nft sees none of them)."""
    from . import nft_apply
    if not nft_apply.available():
        return set()
    try:
        text = nft_apply.run(f"list chains {NFT_FAMILY[fam]}")
    except nft_apply.NftError:
        return set()
    out, table = set(), None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table" and words[1] == NFT_FAMILY[fam]:
            table = words[2] if words[2] in rules.TABLES else None
        elif table and len(words) >= 2 and words[0] == "chain":
            out.add(f"{table} {words[1]}")
    return out


def _drop_created_chains(fam: int, before: list[str]) -> list[str]:
    """Delete the empty built-in chains synlb's rules made iptables-nft create
    in tables that existed before (``_drop_created_tables`` takes the others)."""
    from . import nft_apply
    changes = []
    for name in sorted(_nft_chains(fam) - set(before)):
        table, chain = name.split()
        if chain.startswith(rules.PREFIX):
            continue
        listed = nft_apply.run(f"list chain {NFT_FAMILY[fam]} {table} {chain}")
        body = [ln.strip() for ln in listed.splitlines()[2:] if ln.strip() not in ("", "}")]
        if all(ln.startswith("type ") for ln in body):
            nft_apply.run(f"delete chain {NFT_FAMILY[fam]} {table} {chain}")
            changes.append(f"{'ip6tables' if fam == 6 else 'iptables'}: deleted empty chain {table} {chain}")
    return changes


def remove_all(state_dir: str | None = None) -> list[str]:
    """Remove every owned chain and rule in both families."""
    empty = {name: Table(name) for name in rules.TABLES}
    state = _load_state(state_dir) if state_dir else {}
    changes = []
    for fam in (4, 6):
        live = live_owned(fam)
        script = rules.restore_script(live, empty)
        if script:
            _run([RESTORE[fam], "--wait", str(XTABLES_WAIT), "--noflush"], stdin=script)
            changes.append(f"{'ip6tables' if fam == 6 else 'iptables'}: removed synlb rules")
        before = state.get(f"tables_before_{fam}")
        if before is not None:
            changes += _drop_created_tables(fam, before)
        chains = state.get(f"chains_before_{fam}")
        if chains is not None:
            changes += _drop_created_chains(fam, chains)
    if state_dir:
        try:
            os.unlink(os.path.join(state_dir, STATE_FILE))
        except FileNotFoundError:
            pass
    return changes


def counters(family: int) -> dict[str, list[tuple[int, int, str]]]:
    """Owned rules with their packet/byte counters: {chain: [(pkts, bytes, rule)]}."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for raw in save(family, counters=True).splitlines():
        line = raw.strip()
        if not line.startswith("["):
            continue
        cnt, rule = line[1:].split("]", 1)
        rule = rule.strip()
        if not rules.is_owned_rule(rule):
            continue
        pkts, byts = (int(x) for x in cnt.split(":"))
        chain = rule.split()[1]
        out.setdefault(chain, []).append((pkts, byts, rule))
    return out
