"""Read (and forget) conntrack entries carrying synlb's marks (the ``conntrack`` tool).

Only synlb's entries are read: the dump is filtered in the kernel by the
longest common bit prefix of the marks asked for, because a router's table
can hold a million connections that are none of synlb's business.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "dccp": 33, "sctp": 132, "udplite": 136}
_ENTRY_RE = re.compile(
    r"^(?P<name>\w+)\s+(?P<num>\d+)\s.*?\bsrc=(?P<src>\S+) dst=(?P<dst>\S+)"
    r"(?: sport=(?P<sport>\d+) dport=(?P<dport>\d+))?.*?\bmark=(?P<mark>\d+)")
DUMP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Entry:
    """One connection's original direction and its connmark."""
    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    mark: int


def mark_filter(marks: Iterable[int]) -> str | None:
    """``VALUE/MASK`` covering every mark in ``marks`` with their longest
    common prefix of bits, for ``conntrack -L --mark``. None when they share
    no bit (or there are none)."""
    marks = list(marks)
    if not marks:
        return None
    mask = 0xFFFFFFFF
    for m in marks[1:]:
        while (m ^ marks[0]) & mask:
            mask = (mask << 1) & 0xFFFFFFFF
    if not mask:
        return None
    return f"{marks[0] & mask:#x}/{mask:#x}"


def parse(text: str) -> list[Entry]:
    """Entries of ``conntrack -L`` output (its default format); lines that
    are not entries are skipped."""
    out = []
    for line in text.splitlines():
        m = _ENTRY_RE.match(line)
        if m is None:
            continue
        sport, dport = m.group("sport"), m.group("dport")
        out.append(Entry(int(m.group("num")), m.group("src"), m.group("dst"),
                         int(sport) if sport else None, int(dport) if dport else None,
                         int(m.group("mark"))))
    return out


def dump(marks: Iterable[int]) -> list[Entry]:
    """Entries of both families whose mark shares ``marks``' common prefix
    (every entry when they share none). A missing tool or a dump that takes
    too long gives no entries for that family."""
    flt = mark_filter(marks)
    entries: list[Entry] = []
    for fam in ("ipv4", "ipv6"):
        argv = ["conntrack", "-L", "-f", fam] + (["--mark", flt] if flt else [])
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=DUMP_TIMEOUT, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        entries += parse(p.stdout)
    return entries


def count_marks(marks: Iterable[int] = ()) -> dict[int, int]:
    """Connections per connmark, both families (only ``marks``' prefix when given)."""
    counts: dict[int, int] = {}
    for e in dump(marks):
        counts[e.mark] = counts.get(e.mark, 0) + 1
    return counts


def forget(marks: Iterable[int]) -> int:
    """Delete the entries of both families whose mark is one of ``marks``;
    how many there were. By the marks' common prefix in one call per family
    when every entry under that prefix is one of ``marks``, else mark by
    mark: an entry of another program's mark is never touched."""
    wanted = set(marks)
    entries = dump(wanted)
    mine = [e for e in entries if e.mark in wanted]
    if not mine:
        return 0
    flt = mark_filter(wanted)
    filters = [flt] if flt and len(mine) == len(entries) else [str(m) for m in sorted({e.mark for e in mine})]
    for fam in ("ipv4", "ipv6"):
        for f in filters:
            try:
                subprocess.run(["conntrack", "-D", "-f", fam, "--mark", f], capture_output=True, text=True,
                               timeout=DUMP_TIMEOUT, check=False)  # exit 1: none of that family
            except (FileNotFoundError, subprocess.TimeoutExpired):
                continue
    return len(mine)
