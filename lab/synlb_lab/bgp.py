"""Active-active lab with BGP: the ECMP lab (synlb_lab.ecmp) where the
upstream router ``up`` learns its multipath route to the VIPs over eBGP
from the synlb routers, each running FRR, with BFD.

    from synlb_lab.bgp import BgpLab, bgp_configs
    with BgpLab(routers=3) as lab:            # FRR on up and on every router
        confs = bgp_configs(lab)
        for r in lab.routers:
            start_host(lab, r, confs[r])      # synlb run: lb, sync, bgp
        lab.wait_upstream(lab.routers)        # the bgp plugins announced the VIPs

::

    client ─── up (FRR, AS 65000) ══ front ══ lb1 (FRR, AS 65100) ══ back ══ t1 t2 t3
               maximum-paths 8            ╠═ lb2 (FRR, AS 65100) ═╣
               fib_multipath_hash_policy  ╚═ lb3 (FRR, AS 65100) ═╝
               BFD 3 x 100 ms per session

- ``up`` has one eBGP session per router and family (IPv4 over 10.64.1.N,
  IPv6 over fd64:1::N), each with BFD (profile ``synlb-lab``: detect
  multiplier 3, 100 ms both ways), ``timers bgp 1 3``, ``timers connect 1``,
  ``maximum-paths 8`` (ECMP: the routers share one AS, so their paths are
  equal), and an inbound route-map that prefers the global IPv6 nexthop (so
  ``ip -6 route`` shows fd64:1::N rather than link-local addresses).
- Each router's bgpd has ``router bgp 65100`` with ``no bgp network
  import-check`` and nothing to announce: its synlb's bgp plugin adds the
  VIPs' ``network`` lines while the router is ready.
- The targets' replies go through lb1 (the back address, as in the ECMP lab),
  so lb2 and lb3 see one direction only; with ``reply_router=None`` through
  any router (the targets' multipath default route over the routers' back
  addresses, synlb_lab.ecmp), which the lab updates as soon as up's route
  lost or gained the router.
- A router leaving (:meth:`BgpLab.router_leave`) only loses its links: the
  upstream's veth stays up (it is on the bridge), so only BFD tells ``up``
  that the router is gone; the time until the kernel route lost the nexthop
  is recorded in ``lab.convergence``.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import addresses as A
from . import frr
from .ecmp import (
    EcmpLab,
    RouterConfig,
    flow_directions,
    packet_counts,
    status,
    user_space_share,
    wait_pins_everywhere,
    write_config,
)
from .netns import LabError

UPSTREAM_AS = 65000
ROUTER_AS = 65100
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3

__all__ = ["BgpLab", "UPSTREAM_AS", "ROUTER_AS", "bgp_configs", "router_bgpd_conf", "upstream_bgpd_conf",
           "stop_host_watching", "wait_pins_everywhere", "chains_installed", "flow_directions", "packet_counts",
           "user_space_share"]


def _neighbor(addr: str, remote_as: int, profile: str = frr.BFD_PROFILE) -> list[str]:
    return [f" neighbor {addr} remote-as {remote_as}",
            f" neighbor {addr} bfd profile {profile}",
            f" neighbor {addr} timers connect 1",
            f" neighbor {addr} advertisement-interval 0"]


def upstream_bgpd_conf(router_fronts: Mapping[int, Sequence[str]]) -> str:
    """up's bgpd: eBGP to each router front address (``{4: [...], 6: [...]}``), ECMP."""
    lines = [f"router bgp {UPSTREAM_AS}", f" bgp router-id {A.UPSTREAM_FRONT[4]}",
             " no bgp ebgp-requires-policy", " no bgp default ipv4-unicast", " timers bgp 1 3"]
    for fam in (4, 6):
        for a in router_fronts[fam]:
            lines += _neighbor(a, ROUTER_AS)
    for fam, afi in ((4, "ipv4"), (6, "ipv6")):
        lines.append(f" address-family {afi} unicast")
        for a in router_fronts[fam]:
            lines.append(f"  neighbor {a} activate")
            if fam == 6:
                lines.append(f"  neighbor {a} route-map PREFER-GLOBAL in")
        lines += ["  maximum-paths 8", " exit-address-family"]
    lines += ["exit", "route-map PREFER-GLOBAL permit 10", " set ipv6 next-hop prefer-global", "exit"]
    return "\n".join(lines) + "\n"


def router_bgpd_conf(n: int) -> str:
    """Router N's bgpd: eBGP to up, both families, nothing announced (synlb adds the VIPs)."""
    lines = [f"router bgp {ROUTER_AS}", f" bgp router-id {A.router_front(n, 4)}",
             " no bgp ebgp-requires-policy", " no bgp network import-check",
             " no bgp default ipv4-unicast", " timers bgp 1 3"]
    for fam in (4, 6):
        lines += _neighbor(A.UPSTREAM_FRONT[fam], UPSTREAM_AS)
    for fam, afi in ((4, "ipv4"), (6, "ipv6")):
        lines += [f" address-family {afi} unicast", f"  neighbor {A.UPSTREAM_FRONT[fam]} activate",
                  " exit-address-family"]
    return "\n".join(lines + ["exit"]) + "\n"


class BgpLab(EcmpLab):
    """EcmpLab whose upstream route comes from BGP. ``frr_routers``: the
    routers whose FRR starts with the lab (default all; the others can join
    later with :meth:`start_frr` or :meth:`router_join`). At start, up has
    an established session, with BFD up, to each of them; nothing is
    announced until synlb's bgp plugin says so."""

    static_upstream = False

    def __init__(self, routers: int = 3, targets: int = 3, *, frr_routers: Iterable[str] | None = None,
                 bfd_interval_ms: int = BFD_INTERVAL_MS, **kw: Any):
        super().__init__(routers=routers, targets=targets, **kw)
        self.frr: dict[str, dict] = {}
        self.frr_routers = list(self.routers if frr_routers is None else frr_routers)
        self.bfd_interval_ms = bfd_interval_ms
        self.convergence: dict[str, float] = {}  # router -> seconds until up lost its nexthops

    def start(self) -> BgpLab:
        if self._started:
            return self
        super().start()
        try:
            t0 = time.monotonic()
            fronts = {fam: [self.addr(r, fam) for r in self.routers] for fam in (4, 6)}
            frr.start(self, "up", upstream_bgpd_conf(fronts), bfdd_conf=self._bfd())
            for r in self.frr_routers:
                self.start_frr(r, wait=False)
            for r in self.frr_routers:
                self.wait_session(r)
            self.timings["frr"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _bfd(self) -> str:
        return frr.bfd_profile(interval_ms=self.bfd_interval_ms, multiplier=BFD_MULTIPLIER)

    # ------------------------------------------------------------ FRR per router

    def start_frr(self, router: str, wait: bool = True) -> None:
        n = self.routers.index(router) + 1
        frr.start(self, router, router_bgpd_conf(n), bfdd_conf=self._bfd())
        if wait:
            self.wait_session(router)

    def stop_frr(self, router: str) -> None:
        frr.stop(self, router)

    def wait_session(self, router: str, timeout: float = 20.0) -> float:
        """Until up has both sessions to ``router`` established, BFD up."""
        return frr.wait_peers(self, "up", [self.addr(router, fam) for fam in (4, 6)], bfd=True,
                              timeout=timeout)

    # ------------------------------------------------------------ upstream

    def announced_by(self, family: int = 4) -> list[str]:
        """The routers that are nexthops of up's kernel route to the VIP."""
        hops = set(self.upstream_nexthops(family))
        return [r for r in self.routers if self.addr(r, family) in hops]

    def wait_upstream(self, routers: Iterable[str], timeout: float = 15.0,
                      families: Sequence[int] = (4, 6)) -> float:
        """Until up's route to the VIP has exactly ``routers`` as nexthops,
        every family; returns the seconds waited (polled every 10 ms)."""
        want = sorted(routers)
        t0 = time.monotonic()
        for _ in range(int(timeout / 0.01) + 1):
            if all(sorted(self.announced_by(f)) == want for f in families):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                break
            time.sleep(0.01)
        raise LabError(f"up's nexthops to the VIP are not {want} after {timeout}s: "
                       f"{ {f: self.announced_by(f) for f in families} }")

    # ------------------------------------------------------------ router changes

    def router_leave(self, router: str, wait: bool = True) -> float | None:
        """``router``'s links go down (carrier lost on its side only: up's
        link stays up, so BFD is what tells up); with ``wait``, until up's
        route lost it (then, ``reply_router=None``, the targets' route loses
        it too). Returns (and records in ``convergence``) the seconds from
        the links going down to up's route losing it."""
        before = [r for r in self.announced_by(4) if r != router]
        t0 = time.monotonic()
        self.fail_links(router)
        if not wait:
            self._replies_follow([r for r in self.reply_routers if r != router])
            return None
        self.wait_upstream(before, timeout=10.0)
        took = time.monotonic() - t0
        self._replies_follow([r for r in self.reply_routers if r != router])
        self.convergence[router] = took
        return took

    def _replies_follow(self, routers: list[str]) -> None:
        """(``reply_router=None``) the targets' default route over ``routers``."""
        if not self.reply_router:
            self.set_reply_routers(routers)

    def router_join(self, router: str, before_nexthop: Callable[[str], Any] | None = None,
                    wait: bool = True) -> float | None:
        """``router`` (back) joins: links up, addresses, default routes and
        (reply router) the back address re-asserted; FRR started if it does
        not run; ``before_nexthop(router)`` (e.g. start its synlb host, whose
        bgp plugin announces the VIPs); with ``wait``, until up routes to it
        too (then, ``reply_router=None``, the targets' route gets it back).
        Returns the seconds from ``before_nexthop``'s end to up routing to it."""
        self.restore_links(router)
        cmds = self._router_routes()
        if router == self.reply_router:
            cmds += self._reply_addrs("replace")
        self.ip_batch(router, cmds)
        if not frr.running(self, router):
            self.start_frr(router)
        else:
            self.wait_session(router)
        # a router whose synlb kept running announces again as soon as its
        # session is back: it may be a nexthop already
        others = [r for r in self.announced_by(4) if r != router]
        if before_nexthop is not None:
            before_nexthop(router)
        if not wait:
            self._replies_follow([*self.reply_routers, router])
            return None
        t0 = time.monotonic()
        self.wait_upstream([*others, router], timeout=15.0)
        took = time.monotonic() - t0
        self._replies_follow([*self.reply_routers, router])
        return took

    def set_active_routers(self, routers: Iterable[str]) -> None:
        raise LabError("the BGP lab's upstream route comes from BGP: start or stop synlb (its bgp "
                       "plugin) or FRR on the routers, or take their links down")


# ---------------------------------------------------------------- synlb configs

def bgp_configs(lab: BgpLab, targets: Sequence[str] = ("t1", "t2"), *, sync: bool = True,
                plugins: str | None = None, drain: float = 0.5, extra_service: str = "track_syn = no",
                routers: Sequence[str] | None = None, engine: str = "nfqueue",
                target_options: str = "") -> dict[str, RouterConfig]:
    """Every router's config for ``synlb run`` with the bgp plugin (asn
    65100, its FRR's vty sockets) and, with ``sync``, the sync plugin (peers:
    the other routers' back addresses); ``track_syn = no``, since lb2 and
    lb3 see only the client's direction. ``engine``: the service's;
    ``target_options``: lines for every ``[target:NAME]`` (health checks)."""
    key = os.path.join(lab.dir, "sync.key")
    if sync and not os.path.exists(key):
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    plugins = plugins or ("lb, sync, bgp" if sync else "lb, bgp")
    confs = {}
    for i, r in enumerate(lab.routers, 1):
        if routers is not None and r not in routers:
            continue
        extra = (f"\n[bgp]\nasn = {ROUTER_AS}\nvty_socket = {os.path.join(lab.role_dir(r), 'frr')}\n"
                 f"drain = {drain}\nrefresh = 1\n")
        if sync:
            peers = ", ".join(A.router_back(j) for j in range(1, len(lab.routers) + 1) if j != i)
            extra += f"\n[sync]\nlisten = {A.router_back(i)}\npeers = {peers}\nkey_file = {key}\nrefresh = 2\n"
        confs[r] = write_config(lab, r, targets, extra_synlb=f"plugins = {plugins}",
                                extra_service=extra_service, extra=extra, engine=engine,
                                target_options=target_options)
    return confs


def bgp_status(lab: BgpLab, router: str, conf: RouterConfig) -> dict:
    return status(lab, router, conf)["host"]["plugins"]["bgp"]


def chains_installed(lab: BgpLab, router: str) -> bool:
    """synlb's VIP chain is in the router's IPv4 mangle table."""
    out = lab.run(router, ["iptables-save", "-t", "mangle"], check=False, timeout=10).stdout
    return ":synlb-VIP-" in out


def stop_host_watching(lab: BgpLab, router: str, timeout: float = 20.0) -> dict:
    """SIGTERM the router's ``synlb run`` and watch, every few ms, when up's
    route lost the router (both families) and when the router's chains went.
    Returns seconds after the signal: ``withdrawn``, ``dataplane_gone``,
    ``exited``, and the host's exit code ``rc``."""
    proc = lab.hosts.get(router)
    if proc is None or proc.poll() is not None:
        raise LabError(f"{router}: no synlb run host")
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    out: dict = {"withdrawn": None, "dataplane_gone": None, "exited": None}
    for out["polls"] in range(1, int(timeout / 0.005) + 1):
        now = time.monotonic() - t0
        if out["withdrawn"] is None and all(router not in lab.announced_by(f) for f in (4, 6)):
            out["withdrawn"] = now
        if out["dataplane_gone"] is None and not chains_installed(lab, router):
            out["dataplane_gone"] = time.monotonic() - t0
        if proc.poll() is not None and out["exited"] is None:
            out["exited"] = time.monotonic() - t0
        if all(out[k] is not None for k in ("withdrawn", "dataplane_gone", "exited")) or now > timeout:
            break
        time.sleep(0.005)
    lab.hosts.pop(router, None)
    out["rc"] = lab.stop_process(proc, timeout=5)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


# ---------------------------------------------------------------- pins (sync)

