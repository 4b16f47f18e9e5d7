"""Route mode: one fwmark ip rule and one routing table per target (pyroute2).

Everything synlb installs carries ``route_protocol`` (``ip rule ... proto
229``, ``ip route ... proto 229``): that tag is how synlb recognises its own
objects and leaves every other rule and route alone.

Reconcile, never apply deltas: the kernel deletes the routes of a table when
their link goes down and does not restore them on link up
(docs/DESIGN-NOTES.md#3, routes are lost with their link),
so every call compares the whole desired state with the live one.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .config import Config

log = logging.getLogger(__name__)

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True, order=True)
class Rule:
    family: int
    priority: int
    fwmark: int
    table: int

    def __str__(self) -> str:
        return f"ip -{self.family} rule priority {self.priority} fwmark {self.fwmark:#x} lookup {self.table}"


@dataclass(frozen=True, order=True)
class Route:
    family: int
    table: int
    gateway: str
    oif: str | None  # interface name, or None to let the kernel resolve the next hop

    def __str__(self) -> str:
        dev = f" dev {self.oif}" if self.oif else ""
        return f"ip -{self.family} route default via {self.gateway}{dev} table {self.table}"


def desired(cfg: Config) -> tuple[set[Rule], set[Route]]:
    rules: set[Rule] = set()
    routes: set[Route] = set()
    prio = cfg.globals.rule_priority
    for svc in cfg.services:
        if svc.mode != "route":
            continue
        for fam in svc.families():
            for t in cfg.targets_of(svc):
                rules.add(Rule(fam, prio, t.mark, t.table))
                routes.add(Route(fam, t.table, str(t.address(fam)), svc.egress))
    return rules, routes


# Netlink attributes are read by their NLA names: that spelling works with
# every pyroute2 from Debian 12's 0.7 to the current one.

def _live_rules(ipr: IPRoute, proto: int) -> set[Rule]:
    out = set()
    for fam, af in FAMILIES.items():
        for r in ipr.get_rules(family=af):
            if r.get_attr("FRA_PROTOCOL") == proto:
                out.add(Rule(fam, r.get_attr("FRA_PRIORITY") or 0, r.get_attr("FRA_FWMARK") or 0,
                             r.get_attr("FRA_TABLE") or r["table"]))
    return out


def _live_routes(ipr: IPRoute, proto: int) -> set[Route]:
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    out = set()
    for fam, af in FAMILIES.items():
        for r in ipr.get_routes(family=af):
            if r["proto"] != proto:
                continue
            out.add(Route(fam, r.get_attr("RTA_TABLE") or r["table"], r.get_attr("RTA_GATEWAY"),
                          names.get(r.get_attr("RTA_OIF"))))
    return out


def _same_route(want: Route, live: Route) -> bool:
    """A route without an interface matches whatever interface the kernel chose."""
    return (want.family, want.table, want.gateway) == (live.family, live.table, live.gateway) \
        and (want.oif is None or want.oif == live.oif)


def _route_diff(want: set[Route], live: set[Route]) -> tuple[list[Route], list[Route]]:
    """(live routes no wanted one matches, wanted routes no live one matches)."""
    stale = [r for r in live if not any(_same_route(d, r) for d in want)]
    missing = [d for d in want if not any(_same_route(d, r) for r in live)]
    return stale, missing


class Routing:
    """Kernel side; one netlink socket per call site, closed by the context manager."""

    def __init__(self, proto: int):
        self.proto = proto
        self.ipr = IPRoute()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ipr.close()

    def live(self) -> tuple[set[Rule], set[Route]]:
        return _live_rules(self.ipr, self.proto), _live_routes(self.ipr, self.proto)

    def reconcile(self, rules: set[Rule], routes: set[Route]) -> list[str]:
        """Make the live synlb rules/routes equal ``rules``/``routes``; return what changed.

        A route whose next hop is unreachable right now (link down) is
        reported and retried by the next reconcile, not treated as fatal.
        """
        live_rules, live_routes = self.live()
        changes: list[str] = []
        stale, missing = _route_diff(routes, live_routes)
        for r in sorted(stale):
            self._route("del", r)
            changes.append(f"del {r}")
        for r in sorted(live_rules - rules):
            self._rule("del", r)
            changes.append(f"del {r}")
        for r in sorted(rules - live_rules):
            self._rule("add", r)
            changes.append(f"add {r}")
        for r in sorted(missing):
            try:
                self._route("replace", r)
                changes.append(f"add {r}")
            except NetlinkError as e:
                if e.code not in (errno.ENETUNREACH, errno.ENODEV, errno.EHOSTUNREACH):
                    raise
                changes.append(f"pending {r}: {e.args[1] if len(e.args) > 1 else e}")
                log.warning("route %s not installable now (%s); retried on next reconcile", r, e)
        return changes

    def drift(self, rules: set[Rule], routes: set[Route]) -> list[str]:
        """How the live rules and routes differ from ``rules``/``routes`` (changes nothing)."""
        live_rules, live_routes = self.live()
        stale, missing = _route_diff(routes, live_routes)
        return ([f"missing {r}" for r in sorted(rules - live_rules)]
                + [f"missing {r}" for r in sorted(missing)]
                + [f"unexpected {r}" for r in sorted(live_rules - rules)]
                + [f"unexpected {r}" for r in sorted(stale)])

    def _rule(self, cmd: str, r: Rule) -> None:
        self.ipr.rule(cmd, family=FAMILIES[r.family], priority=r.priority, fwmark=r.fwmark,
                      table=r.table, protocol=self.proto)

    def _route(self, cmd: str, r: Route) -> None:
        kw = dict(family=FAMILIES[r.family], dst="default" if r.family == 4 else "::/0",
                  gateway=r.gateway, table=r.table, proto=self.proto)
        if r.oif:
            idx = self.ipr.link_lookup(ifname=r.oif)
            if not idx:
                raise NetlinkError(errno.ENODEV, f"no interface {r.oif}")
            kw["oif"] = idx[0]
        if cmd == "del":
            kw.pop("gateway")
            kw.pop("oif", None)
        self.ipr.route(cmd, **kw)
