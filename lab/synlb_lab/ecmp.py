"""Active-active lab: N synlb routers behind an upstream router with a
static multipath (ECMP) route to the VIP.

    from synlb_lab.ecmp import EcmpLab, write_configs, synlb_up
    with EcmpLab(routers=3, targets=3) as lab:
        confs = write_configs(lab)
        for r in lab.routers:
            synlb_up(lab, r, confs[r])
        print(lab.open_connections(lab.addr("vip"), count=30))

Namespaces (``<prefix>-<role>``): ``sw`` (bridges ``front`` and ``back``),
``client``, ``up`` (the upstream router), ``lb1``..``lbN`` (N 2..4),
``t1``..``tK``. Addresses: synlb_lab.addresses (the ECMP rows of the table
in docs/ARCHITECTURE.md).

::

    client ─── up ══ front bridge ══ lb1 ══ back bridge ══ t1, t2, t3
    10.64.0.10      10.64.1.250   ╠═ lb2 ═╣   (lb1 owns    (VIP on lo, gateway
                    multipath     ╚═ lb3 ═╝    10.64.2.254)  10.64.2.254)
                    route to the VIP: one nexthop per active router

The targets' replies all go through the router that owns the back VRRP
address (lb1 unless :meth:`EcmpLab.move_reply_router` moved it), so the other
routers see only the client->VIP direction of the flows ECMP gives them:
their conntrack entries stay ``[UNREPLIED]``, every later packet of those
flows is INVALID to them and reaches the worker (which still sends it to
the same target). That asymmetry is the point of the lab. No router has a
firewall dropping INVALID packets (it would drop every packet of a
one-direction router).

``reply_router=None``: replies through any router. No router owns the back
VRRP address; each target has a multipath default route over the active
routers' back addresses (:meth:`EcmpLab.set_reply_routers`; L4 hash,
``fib_multipath_hash_policy=1``, which for a target's own sockets hashes
the 5-tuple), so both directions of a flow are hashed independently: a
router sees the client's direction of some flows, the targets' direction of
others (connections it never saw open, in conntrack as opened by the
target) and both of the rest. The routers leaving and joining update the
targets' route along with up's (the back side learning of a router as
soon as the front does: on a real network BFD/BGP between the targets and
the routers, or a back VRRP address per router).

``up`` hashes each flow to one of the active routers' front addresses
(``fib_multipath_hash_policy=1``, L4, both families). Measured in this lab:
with policy 1 the kernel reuses an L4 hash the packet already carries, and
a veth keeps the one the client's socket gave it (``sk_txhash``: random per
connection, drawn again by TCP after a retransmission timeout). So here a
flow's router follows that per-socket hash rather than its 5-tuple (``ip
route get ... sport ... dport`` on ``up`` does not predict it), and a flow
that times out may come back through another router. A NIC's RSS hash, on
real links, is a function of the 5-tuple. ``multipath_hash="fields"``
(policy 3 with ``fib_multipath_hash_fields=0x37``: addresses, protocol,
ports) hashes the packet's 5-tuple itself.

The multipath route lists the active routers in router order (lb1, lb2, ...).
Linux splits the hash space of a multipath route into one contiguous range
per nexthop (hash-threshold), so removing a nexthop moves the flows of every
range that shifts, not only those of the removed router: lb2 (the middle)
leaving sends its flows to lb1 and lb3 and nothing else moves; lb3 (the
last) leaving sends its flows to lb2 and some of lb2's to lb1. Joining again
moves each flow back where it was. :func:`flows_seen` tells which flows a
router handled.

EcmpLab is a :class:`synlb_lab.topology.Lab` with another topology: process
tracking, the registry (``synlb-lab cleanup``), teardown, the test servers,
``open_connections`` and ``start_sessions`` (:class:`Sessions`) are Lab's.

The module's functions run synlb in the routers (configs, ``up``/``down``, the
``synlb run`` host) and the scenario of a target added under traffic, then a
router leaving: :func:`run_target_added_then_router_leaves`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from synlb import statedir

from . import addresses as A
from .netns import LabError
from .scenario import render_service_config, synlb, synlb_exe
from .topology import BASE_SYSCTLS, Lab, Sessions, host_addrs

__all__ = [
    "EcmpLab",
    "RouterConfig",
    "Sessions",
    "client_flows",
    "flow_directions",
    "flows_by_router",
    "flows_seen",
    "host_running",
    "packet_counts",
    "reload_router",
    "render_config",
    "run_target_added_then_router_leaves",
    "start_host",
    "state_dir",
    "status",
    "stop_host",
    "synlb_down",
    "synlb_routes",
    "synlb_up",
    "user_space_share",
    "vip_chain_packets",
    "wait_targets_installed",
    "write_config",
    "write_configs",
]


#: up's multipath hash sysctls per EcmpLab(multipath_hash=...)
MULTIPATH_HASH = {
    "l4": {"net.ipv4.fib_multipath_hash_policy": 1, "net.ipv6.fib_multipath_hash_policy": 1},
    "fields": {"net.ipv4.fib_multipath_hash_policy": 3, "net.ipv6.fib_multipath_hash_policy": 3,
               "net.ipv4.fib_multipath_hash_fields": "0x0037", "net.ipv6.fib_multipath_hash_fields": "0x0037"},
}


class EcmpLab(Lab):
    """A client, an upstream router ``up``, ``routers`` synlb routers (2..4)
    and ``targets`` targets in network namespaces; a context manager.

    ``servers``: start the test server in every target on ``server_ports``.
    ``reply_router``: the router that owns the back VRRP address at start;
    None: no back VRRP address, the targets' replies go through any active
    router (a multipath default route, see the module doc).
    ``multipath_hash``: ``l4`` (policy 1) or ``fields`` (the 5-tuple, see
    the module doc).
    All routers are active (in ``up``'s multipath route) at start.
    """

    #: up gets the static multipath route at build (a subclass routing
    #: with BGP, synlb_lab.bgp, sets it False)
    static_upstream = True

    def __init__(self, routers: int = 3, targets: int = 3, *, servers: bool = True,
                 server_ports: Sequence[int] = (80, 8080), reply_router: str | None = "lb1",
                 multipath_hash: str = "l4", keep_files: bool = False, prefix: str | None = None):
        if not 2 <= routers <= A.ECMP_MAX_ROUTERS:
            raise ValueError(f"routers must be 2..{A.ECMP_MAX_ROUTERS}")
        if multipath_hash not in MULTIPATH_HASH:
            raise ValueError(f"multipath_hash must be one of {sorted(MULTIPATH_HASH)}")
        # Lab checks and stores everything but the routers (it allows 1-2); ours follow
        super().__init__(routers=1, targets=targets, servers=servers, server_ports=server_ports,
                         keepalived=False, keep_files=keep_files, prefix=prefix)
        self.nrouters = routers
        self.routers = [f"lb{i}" for i in range(1, routers + 1)]
        if reply_router is not None and reply_router not in self.routers:
            raise ValueError(f"reply_router must be one of {self.routers} or None")
        self.roles = ["sw", "client", "up", *self.routers, *self.targets]
        self._k = {r: {} for r in self.routers}
        self.reply_router = reply_router
        self.multipath_hash = multipath_hash
        self.active: list[str] = []  # routers in up's multipath route
        self.reply_routers: list[str] = []  # reply_router None: routers in the targets' default route
        #: ``synlb run`` host per router (see start_host)
        self.hosts: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ naming

    def addr(self, role: str, family: int = 4, net: str | None = None) -> str:
        """Address of a lab host. Routers: ``net`` 'front' (default) or
        'back'; ``up``: 'front' (default) or 'client'. Also 'vip',
        'back_vrrp' (the targets' gateway) and 'gateway' (the client's)."""
        if role == "client":
            return A.ECMP_CLIENT[family]
        if role == "up":
            if net in (None, "front"):
                return A.UPSTREAM_FRONT[family]
            if net == "client":
                return A.UPSTREAM_CLIENT[family]
            raise ValueError(f"net must be 'front' or 'client', not {net!r}")
        if role == "front_vrrp":
            raise KeyError("the ECMP lab has no front VRRP address (the client's gateway is 'up')")
        return super().addr(role, family, net)

    def client_gateway(self, family: int = 4) -> str:
        return A.UPSTREAM_CLIENT[family]

    def target_gateway(self, family: int = 4) -> str:
        return A.BACK_VRRP[family]

    # ------------------------------------------------------------ build

    def _build(self) -> None:
        self._add_namespaces()
        base = BASE_SYSCTLS
        forwarding = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
                      "net.ipv6.conf.default.forwarding": 1}
        self.sysctl("sw", {"net.ipv6.conf.all.disable_ipv6": 1,
                           "net.ipv6.conf.default.disable_ipv6": 1})
        self.sysctl("client", base)
        self.sysctl("up", {**base, **forwarding, **MULTIPATH_HASH[self.multipath_hash]})
        for r in self.routers:
            self.sysctl(r, {**base, **forwarding,
                            # keep static v6 addresses while router_leave() has the links down
                            "net.ipv6.conf.all.keep_addr_on_down": 1,
                            "net.ipv6.conf.default.keep_addr_on_down": 1})
        for t in self.targets:
            self.sysctl(t, {**base, "net.ipv4.conf.all.arp_ignore": 1,
                            "net.ipv4.conf.all.arp_announce": 2,
                            **({} if self.reply_router else MULTIPATH_HASH["l4"])})

        self._build_switch(("u0", "up", A.UPSTREAM_FRONT_IF))

        # client <-> up: a link of their own
        self.ip_batch("client", [
            "link set lo up",
            f"link add {A.HOST_IF} type veth peer name {A.UPSTREAM_CLIENT_IF} netns {self.ns('up')}",
            f"link set {A.HOST_IF} up",
            *host_addrs(A.HOST_IF, A.ECMP_CLIENT[4], A.ECMP_CLIENT[6]),
            f"route add default via {A.UPSTREAM_CLIENT[4]} dev {A.HOST_IF}",
            f"route add ::/0 via {A.UPSTREAM_CLIENT[6]} dev {A.HOST_IF}"])
        self.ip_batch("up", [
            "link set lo up",
            f"link set {A.UPSTREAM_CLIENT_IF} up",
            *host_addrs(A.UPSTREAM_CLIENT_IF, A.UPSTREAM_CLIENT[4], A.UPSTREAM_CLIENT[6]),
            f"link set {A.UPSTREAM_FRONT_IF} up",
            *host_addrs(A.UPSTREAM_FRONT_IF, A.UPSTREAM_FRONT[4], A.UPSTREAM_FRONT[6])])

        for i, r in enumerate(self.routers, 1):
            cmds = ["link set lo up"]
            for side, f4, f6 in (("front", A.router_front(i, 4), A.router_front(i, 6)),
                                 ("back", A.router_back(i, 4), A.router_back(i, 6))):
                cmds += [f"link set {side} up", *host_addrs(side, f4, f6)]
            cmds += self._router_routes()
            if r == self.reply_router:
                cmds += self._reply_addrs("add")
            self.ip_batch(r, cmds)
            self.sysctl(r, {f"net.ipv4.conf.{s}.rp_filter": 0 for s in ("front", "back")}
                        | {f"net.ipv6.conf.{s}.accept_dad": 0 for s in ("front", "back")})

        for k, t in enumerate(self.targets, 1):
            cmds = ["link set lo up", f"link set {A.HOST_IF} up",
                    *host_addrs(A.HOST_IF, A.target(k, 4), A.target(k, 6)),
                    f"addr add {A.VIP[4]}/32 dev lo",
                    f"addr add {A.VIP[6]}/128 dev lo nodad"]
            if self.reply_router:
                cmds += [f"route add default via {self.target_gateway(4)} dev {A.HOST_IF}",
                         f"route add ::/0 via {self.target_gateway(6)} dev {A.HOST_IF}"]
            self.ip_batch(t, cmds)
        if not self.reply_router:
            self.set_reply_routers(self.routers)

        if self.static_upstream:
            self.set_active_routers(self.routers)

    @staticmethod
    def _router_routes() -> list[str]:
        """A router's default routes, via up (the kernel deletes them with the link)."""
        return [f"route replace default via {A.UPSTREAM_FRONT[4]} dev {A.ROUTER_FRONT_IF}",
                f"route replace ::/0 via {A.UPSTREAM_FRONT[6]} dev {A.ROUTER_FRONT_IF}"]

    @staticmethod
    def _reply_addrs(op: str) -> list[str]:
        """ip commands adding (``replace``) or removing (``del``) the back VRRP address."""
        nodad = "" if op == "del" else " nodad"
        return [f"addr {op} {A.with_prefix(A.BACK_VRRP[4], 4)} dev {A.ROUTER_BACK_IF}",
                f"addr {op} {A.with_prefix(A.BACK_VRRP[6], 6)} dev {A.ROUTER_BACK_IF}{nodad}"]

    # ------------------------------------------------------------ upstream routing

    def set_active_routers(self, routers: Iterable[str]) -> None:
        """Replace up's multipath route to the VIP (IPv4 and IPv6) with exactly
        these routers' front addresses as nexthops, in router order; an empty
        list removes the route."""
        routers = list(routers)
        unknown = [r for r in routers if r not in self.routers]
        if unknown:
            raise KeyError(f"not routers of this lab: {unknown}")
        routers = [r for r in self.routers if r in routers]
        for fam in (4, 6):
            dst = f"{A.VIP[fam]}/{A.VIP_PREFIXLEN[fam]}"
            if not routers:
                self.ip("up", f"-{fam}", "route", "del", dst, check=False)
                continue
            hops = []
            for r in routers:
                hops += ["nexthop", "via", self.addr(r, fam), "dev", A.UPSTREAM_FRONT_IF]
            self.ip("up", f"-{fam}", "route", "replace", dst, "proto", "static", *hops)
        self.active = routers

    def set_reply_routers(self, routers: Iterable[str]) -> None:
        """(``reply_router=None``) Replace every target's default route, both
        families, with a multipath route over these routers' back addresses,
        in router order; an empty list removes it."""
        if self.reply_router:
            raise LabError(f"the targets' gateway is the back VRRP address (on {self.reply_router})")
        routers = [r for r in self.routers if r in set(routers)]
        for t in self.targets:
            if not routers:
                for fam in (4, 6):
                    self.ip(t, f"-{fam}", "route", "del", "default", check=False)
                continue
            self.ip_batch(t, [f"route replace {dst} " + " ".join(
                f"nexthop via {self.addr(r, fam, 'back')} dev {A.HOST_IF}" for r in routers)
                for fam, dst in ((4, "0.0.0.0/0"), (6, "::/0"))])
        self.reply_routers = routers

    def reply_nexthops(self, target: str, family: int = 4) -> list[str]:
        """The gateways of the target's default route, as the kernel has them."""
        routes = json.loads(self.ip(target, f"-{family}", "-j", "route", "show", "default").stdout or "[]")
        out = []
        for rt in routes:
            out += [h.get("gateway") for h in rt.get("nexthops") or []] or [rt.get("gateway")]
        return [g for g in out if g]

    def upstream_nexthops(self, family: int = 4) -> list[str]:
        """The gateways of up's route to the VIP, as the kernel has them."""
        dst = f"{A.VIP[family]}/{A.VIP_PREFIXLEN[family]}"
        routes = json.loads(self.ip("up", f"-{family}", "-j", "route", "show", dst).stdout or "[]")
        out = []
        for rt in routes:
            if rt.get("nexthops"):
                out += [h.get("gateway") for h in rt["nexthops"]]
            elif rt.get("gateway"):
                out.append(rt["gateway"])
        return out

    # ------------------------------------------------------------ router changes

    def router_leave(self, router: str) -> None:
        """``router`` leaves: its nexthop removed upstream (and from the
        targets' route, ``reply_router=None``), then its links down."""
        self.set_active_routers([r for r in self.active if r != router])
        if not self.reply_router:
            self.set_reply_routers([r for r in self.reply_routers if r != router])
        self.fail_links(router)

    def router_join(self, router: str, before_nexthop: Callable[[str], Any] | None = None) -> None:
        """``router`` (back) joins: links up, addresses and default routes
        re-asserted (and the back VRRP address if it is the reply router),
        ``before_nexthop(router)`` if given, then its nexthop added upstream.

        The kernel deleted synlb's per-target routes with the back link
        (docs/DESIGN-NOTES.md#3, routes are lost with their link): without a
        ``synlb run`` host, which restores them
        on link up, pass ``before_nexthop`` that runs ``synlb up``."""
        self.restore_links(router)
        cmds = self._router_routes()
        if router == self.reply_router:
            cmds += self._reply_addrs("replace")
        self.ip_batch(router, cmds)
        if before_nexthop is not None:
            before_nexthop(router)
        self.set_active_routers([*self.active, router])
        if not self.reply_router:
            self.set_reply_routers([*self.reply_routers, router])

    def move_reply_router(self, router: str) -> None:
        """Move the back VRRP address (the targets' gateway) to ``router``:
        added there, removed from the old owner, and the targets' neighbour
        entries for it flushed (no keepalived here to send gratuitous ARP/NA)."""
        if router not in self.routers:
            raise KeyError(f"{router!r} is not a router of this lab")
        if not self.reply_router:
            raise LabError("replies go through every router (reply_router=None): no back VRRP address to move")
        old = self.reply_router
        if router == old:
            return
        self.ip_batch(router, self._reply_addrs("replace"))
        for cmd in self._reply_addrs("del"):
            self.ip(old, *cmd.split(), check=False)
        self.reply_router = router
        for t in self.targets:
            for fam in (4, 6):
                self.ip(t, f"-{fam}", "neigh", "flush", "to", A.BACK_VRRP[fam], check=False)

    # ------------------------------------------------------------ not here

    def start_keepalived(self, *a, **kw):
        raise LabError("the ECMP lab runs no keepalived (lb1 owns the back address statically)")


# ---------------------------------------------------------------- synlb configs

def state_dir(lab: Lab, router: str) -> str:
    return os.path.join(lab.role_dir(router), "synlb-state")


def render_config(lab: Lab, router: str, targets: Sequence[str] | None = None, **kw: Any) -> str:
    """:func:`synlb_lab.scenario.render_service_config` for ``router``: its
    state dir, service ``web`` on port 80 (unless ``ports``) over
    ``targets`` (default: all the lab's targets)."""
    names = list(targets) if targets is not None else list(lab.targets)
    tlist = [(t, lab.addr(t, 4), lab.addr(t, 6)) for t in names]
    return render_service_config(state_dir(lab, router), tlist, **{"ports": "80", **kw})


@dataclass(frozen=True)
class RouterConfig:
    """One router's synlb.ini: where it is and what it was rendered from, so
    that a scenario can re-render it with other targets (``options`` are
    render_service_config's keywords: extra_synlb, extra_service, ...)."""
    router: str
    path: str
    targets: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    def render(self, lab: Lab) -> str:
        return render_config(lab, self.router, self.targets, **self.options)

    def write(self, lab: Lab) -> RouterConfig:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(self.render(lab))
        os.replace(tmp, self.path)  # a reload never reads half a file
        return self

    def with_targets(self, targets: Iterable[str]) -> RouterConfig:
        return replace(self, targets=tuple(targets))


def write_config(lab: Lab, router: str, targets: Sequence[str] | None = None,
                 name: str = "synlb.ini", **kw: Any) -> RouterConfig:
    """Write ``router``'s config (see :func:`render_config`) in its lab dir."""
    names = tuple(targets) if targets is not None else tuple(lab.targets)
    return RouterConfig(router, os.path.join(lab.role_dir(router), name), names, dict(kw)).write(lab)


def write_configs(lab: Lab, routers: Sequence[str] | None = None,
                  targets: Sequence[str] | None = None, **kw: Any) -> dict[str, RouterConfig]:
    """:func:`write_config` for every router (same targets and options)."""
    return {r: write_config(lab, r, targets, **kw) for r in (routers or lab.routers)}


def _path(conf: RouterConfig | str) -> str:
    return conf.path if isinstance(conf, RouterConfig) else conf


# ---------------------------------------------------------------- synlb in a router

def synlb_up(lab: Lab, router: str, conf: RouterConfig | str, timeout: float = 60):
    """``synlb -c CONF up`` in the router (returns once the workers hold their queues)."""
    return synlb(lab, router, _path(conf), "up", timeout=timeout)


def synlb_down(lab: Lab, router: str, conf: RouterConfig | str, check: bool = True,
               timeout: float = 60):
    return synlb(lab, router, _path(conf), "down", check=check, timeout=timeout)


def status(lab: Lab, router: str, conf: RouterConfig | str) -> dict:
    """``synlb -c CONF status --json``, parsed."""
    return json.loads(synlb(lab, router, _path(conf), "status", "--json").stdout)


def start_host(lab: EcmpLab, router: str, conf: RouterConfig | str,
               timeout: float = 30.0) -> subprocess.Popen:
    """Start ``synlb -c CONF run`` (the plugin host) in the router as a tracked
    process (lab.hosts[router]) and wait until its control socket answers
    (``synlb status --json`` shows "host" non-null)."""
    old = lab.hosts.get(router)
    if old is not None and old.poll() is None:
        raise LabError(f"{router}: a synlb run host already runs (pid {old.pid})")
    proc = lab.popen(router, [synlb_exe(), "-c", _path(conf), "run"], name="synlb-run")
    lab.hosts[router] = proc
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.2) + 1):
        if proc.poll() is not None:
            raise LabError(f"{router}: synlb run exited {proc.returncode}; see {lab.log_path(proc)}")
        cp = synlb(lab, router, _path(conf), "status", "--json", check=False, timeout=30)
        if cp.returncode == 0:
            try:
                host = json.loads(cp.stdout).get("host")
            except ValueError:
                host = None
            if isinstance(host, dict) and host.get("ok"):
                return proc
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    raise LabError(f"{router}: synlb run's control socket did not answer within {timeout}s; "
                   f"see {lab.log_path(proc)}")


def host_running(lab: EcmpLab, router: str) -> bool:
    proc = lab.hosts.get(router)
    return proc is not None and proc.poll() is None


def stop_host(lab: EcmpLab, router: str, timeout: float = 20.0) -> int | None:
    """SIGTERM the router's host and wait (it tears the data plane down);
    returns its exit code (None: there was none)."""
    proc = lab.hosts.pop(router, None)
    if proc is None:
        return None
    return lab.stop_process(proc, timeout=timeout)


def reload_router(lab: EcmpLab, router: str, conf: RouterConfig | str) -> None:
    """Make the router follow its (rewritten) config: SIGHUP to its ``synlb
    run`` host if one runs (the host reloads asynchronously), else ``synlb up``."""
    if host_running(lab, router):
        os.kill(lab.hosts[router].pid, signal.SIGHUP)
    else:
        synlb_up(lab, router, conf)


def synlb_routes(lab: Lab, router: str, family: int, protocol: int = 229) -> int:
    """Per-target default routes synlb has installed in the router."""
    out = lab.ip(router, f"-{family}", "route", "show", "table", "all", "proto", str(protocol)).stdout
    return sum(1 for ln in out.splitlines() if ln.startswith("default"))


def wait_targets_installed(lab: Lab, configs: Mapping[str, RouterConfig],
                           timeout: float = 20.0) -> float:
    """Until every router has one synlb route per target of its config, both
    families (what a reload changes first). Returns the seconds waited."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    pending = dict(configs)
    for _ in range(int(timeout / 0.1) + 1):
        for r, conf in list(pending.items()):
            if all(synlb_routes(lab, r, fam) == len(conf.targets) for fam in (4, 6)):
                del pending[r]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if pending:
        raise LabError(f"routers without a route per target after {timeout}s: {sorted(pending)}")
    return time.monotonic() - t0


# ---------------------------------------------------------------- observing

_SAVE_RULE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) ")


def vip_chain_packets(lab: Lab, router: str) -> dict[int, int]:
    """Packets that entered synlb's VIP chains (``synlb-VIP-*``, every rule:
    kept in the kernel + queued) in the router, per family."""
    out = {}
    for fam, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
        text = lab.run(router, [tool, "-c", "-t", "mangle"]).stdout
        n = 0
        for ln in text.splitlines():
            m = _SAVE_RULE.match(ln)
            if m and m.group(3).startswith("synlb-VIP-"):
                n += int(m.group(1))
        out[fam] = n
    return out


def client_flows(lab: EcmpLab, port: int = 80) -> dict[int, list[int]]:
    """Local ports of the client's established TCP connections to VIP:port, per family."""
    out: dict[int, list[int]] = {}
    for fam in (4, 6):
        cp = lab.run("client", ["ss", "-Htn", f"-{fam}", "state", "established",
                                "dst", A.VIP[4] if fam == 4 else f"[{A.VIP[6]}]", "dport", "=", f":{port}"],
                     check=False)
        ports = []
        for ln in cp.stdout.splitlines():
            f = ln.split()  # Recv-Q Send-Q Local Peer (one state asked: no State column)
            if len(f) >= 4:
                ports.append(int(f[2].rsplit(":", 1)[1]))
        out[fam] = sorted(ports)
    return out


_CT_FIELD = re.compile(r"\b(src|dst|sport|dport|mark)=(\S+)")


def flows_seen(lab: Lab, router: str, family: int, port: int = 80) -> set[int]:
    """Client ports of the TCP flows to VIP:port whose client->VIP packets
    ``router`` has handled, from its conntrack table: entries a client packet
    created (original destination the VIP), and entries a target's packet
    created that then got a mark (the worker handled a client packet of it:
    docs/DESIGN-NOTES.md#4, unmarked established connections). Entries outlive the router's part in a flow, so the
    difference of two calls is the flows that came to the router in between."""
    cp = lab.run(router, ["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6", "-p", "tcp"],
                 check=False)
    vip = A.VIP[family]
    out = set()
    for ln in cp.stdout.splitlines():
        orig: dict[str, str] = {}
        mark = 0
        for k, v in _CT_FIELD.findall(ln):
            if k == "mark":
                mark = int(v)
            elif k not in orig:
                orig[k] = v  # the first src/dst/sport/dport are the original direction's
        if orig.get("dst") == vip and orig.get("dport") == str(port):
            out.add(int(orig["sport"]))
        elif orig.get("src") == vip and orig.get("sport") == str(port) and mark:
            out.add(int(orig["dport"]))
    return out


def flows_by_router(lab: EcmpLab, family: int, port: int = 80) -> dict[str, set[int]]:
    """:func:`flows_seen` for every router."""
    return {r: flows_seen(lab, r, family, port) for r in lab.routers}


def flow_directions(lab: Lab, router: str, family: int, port: int = 80) -> dict[str, set[int]]:
    """Client ports of the TCP flows to VIP:port in ``router``'s conntrack
    table, by the directions it has seen: ``client`` (the client's only: an
    entry a client packet opened, ``[UNREPLIED]``), ``target`` (the
    targets' only: an entry a target's packet opened, mid-stream, that no
    client packet matched since) and ``both``."""
    cp = lab.run(router, ["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6", "-p", "tcp"],
                 check=False)
    vip = A.VIP[family]
    out: dict[str, set[int]] = {"client": set(), "target": set(), "both": set()}
    for ln in cp.stdout.splitlines():
        orig: dict[str, str] = {}
        for k, v in _CT_FIELD.findall(ln):
            if k != "mark" and k not in orig:
                orig[k] = v
        one_way = "[UNREPLIED]" in ln
        if orig.get("dst") == vip and orig.get("dport") == str(port):
            out["client" if one_way else "both"].add(int(orig["sport"]))
        elif orig.get("src") == vip and orig.get("sport") == str(port):
            out["target" if one_way else "both"].add(int(orig["dport"]))
    return out


def packet_counts(lab: Lab, router: str, service: str = "web") -> dict[str, int]:
    """The service's packets so far in the router, from the kernel's own
    counters (both engines, both families): ``user`` those that went to a
    worker (nfqueue: the VIP chains' NFQUEUE rules), ``kernel`` those
    decided in the kernel (nfqueue: the rule that restores the mark from
    conntrack; nftables: the table's kept, hashed, pinned and no-target
    counters, read with ``nft -j list counters``: the engine has no queue).
    What ``synlb status`` shows as queued and kept per chain."""
    from synlb import nft_engine

    user = kernel = 0
    for tool in ("iptables-save", "ip6tables-save"):
        for ln in lab.run(router, [tool, "-c", "-t", "mangle"]).stdout.splitlines():
            m = _SAVE_RULE.match(ln)
            if m and m.group(3) == f"synlb-VIP-{service}":
                if "-j NFQUEUE" in ln:
                    user += int(m.group(1))
                elif "-j synlb-ESTABLISHED" in ln:
                    kernel += int(m.group(1))
    cp = lab.run(router, ["nft", "-j", "list", "counters", "table", *nft_engine.QUALIFIED.split()], check=False)
    names = {nft_engine.counter_name(k, service, f) for k in nft_engine.COUNTERS for f in (4, 6)}
    if cp.returncode == 0:
        for item in json.loads(cp.stdout or "{}").get("nftables", []):
            c = item.get("counter")
            if c and c.get("name") in names:
                kernel += int(c.get("packets", 0))
    return {"user": user, "kernel": kernel}


def user_space_share(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict:
    """Between two :func:`packet_counts`: packets in user space, in all, and the share."""
    user = after["user"] - before["user"]
    total = user + after["kernel"] - before["kernel"]
    return {"user": user, "total": total, "share": user / total if total else 0.0}


# ---------------------------------------------------------------- a target added, then a router leaves

def _default_ready(lab: EcmpLab, configs: Mapping[str, RouterConfig]) -> None:
    wait_targets_installed(lab, configs)


def run_target_added_then_router_leaves(
        lab: EcmpLab, configs: Mapping[str, RouterConfig], *, count: int, leaver: str,
        patterns: Sequence[str] = ("echo", "up"), families: Sequence[int] = (4, 6),
        new_target: str | None = None,
        reload: Callable[[EcmpLab, str, RouterConfig], Any] = reload_router,
        ready: Callable[[EcmpLab, Mapping[str, RouterConfig]], Any] = _default_ready,
        hold: float = 1.0, settle: float = 1.0) -> dict:
    """A target added under traffic, then a router leaves (docs/STICKINESS.md).

    Precondition: every router of ``configs`` runs synlb (``synlb up`` or
    :func:`start_host`) with its config, whose targets do not include
    ``new_target`` (default: the first lab target none of them lists, t3
    for configs listing t1, t2), and every router is active upstream.

    1. ``count`` sessions per pattern and family start through all routers
       (so on the targets of the configs only) and run ``hold`` seconds;
    2. each router's config is rewritten with ``new_target`` added and
       ``reload(lab, router, new_config)`` is called for each router
       (default :func:`reload_router`: SIGHUP to its ``synlb run`` host if
       one runs, else ``synlb up``);
    3. ``ready(lab, new_configs)`` waits until the routers are ready after
       the change (default: every router has a route per target; insert a
       wait for a state sync here), then ``settle`` seconds;
    4. ``leaver`` leaves (:meth:`EcmpLab.router_leave`), ``hold`` seconds;
    5. the sessions are stopped and summarized.

    Returns :func:`synlb_lab.demo_failover.summarize`'s dict (``per``,
    ``sessions``, ``kept``, ``moved``, ``max_gap``, ...) plus ``results`` (the
    raw session results), ``configs`` (the new RouterConfigs, to ``down``
    with), ``steps`` (seconds each step took) and ``established``: the
    client's established connections to the VIP after each step (a session
    reset by a target is gone from it at once; a stalled one stays), so a
    loss can be told to come from the target change or from the leave.
    """
    from .demo_failover import start_sessions, stop_sessions, summarize

    if leaver not in configs:
        raise ValueError(f"leaver {leaver!r} is not one of the configs' routers {sorted(configs)}")
    if new_target is None:
        listed = {t for c in configs.values() for t in c.targets}
        new_target = next((t for t in lab.targets if t not in listed), None)
        if new_target is None:
            raise ValueError("every lab target is already in the configs; pass new_target")
    if any(new_target in c.targets for c in configs.values()):
        raise ValueError(f"{new_target} is already a target of some config")

    def established() -> int:
        return sum(len(v) for v in client_flows(lab).values())

    steps: dict[str, float] = {}
    seen: dict[str, int] = {}
    new_configs: dict[str, RouterConfig] = {}
    handles = start_sessions(lab, count, patterns, families)
    try:
        seen["start"] = established()
        time.sleep(hold)
        t0 = time.monotonic()
        for r, conf in configs.items():
            new_configs[r] = conf.with_targets([*conf.targets, new_target]).write(lab)
            reload(lab, r, new_configs[r])
        steps["reload"] = round(time.monotonic() - t0, 3)
        t0 = time.monotonic()
        ready(lab, new_configs)
        steps["ready"] = round(time.monotonic() - t0, 3)
        time.sleep(settle)
        seen["after_reload"] = established()
        t0 = time.monotonic()
        lab.router_leave(leaver)
        steps["leave"] = round(time.monotonic() - t0, 3)
        time.sleep(hold)
        seen["after_leave"] = established()
    finally:
        results = stop_sessions(handles)
    return {"new_target": new_target, "leaver": leaver, "steps": steps, "established": seen,
            "configs": new_configs, **summarize(results), "results": results}


def worker_pins(lab: Lab, router: str, queue: int = 0) -> int:
    """How many pins the router's data plane follows: its worker's (from its
    stats file), or, with no worker (the nftables engine), the elements of
    the kernel's pins maps; -1 before either is there."""
    try:
        with open(statedir.worker_stats(state_dir(lab, router), queue)) as fh:
            return json.load(fh).get("pins", -1)
    except (FileNotFoundError, ValueError):
        pass
    n = 0
    for fam in (4, 6):
        cp = lab.run(router, ["nft", "list", "map", "inet", "synlb", f"pins{fam}_web"], check=False)
        if cp.returncode != 0:
            return -1
        n += cp.stdout.count(" : 0x")
    return n


def wait_pins_everywhere(lab: Lab, confs: Mapping[str, RouterConfig], since: float,
                         again_after: float = 1.0, timeout: float = 20.0) -> dict:
    """Until every router of ``confs`` computed its pins after ``since`` (its
    second exchange, ``again_after`` later, included), holds exactly what
    each peer last computed, and its worker follows the merged set; returns
    {router: own pins}. Judged by the pins' digests, not by times: the
    statuses are read one router after the other while the routers refresh."""
    deadline = time.monotonic() + timeout
    backs = {A.router_back(i): r for i, r in enumerate(lab.routers, 1)}
    while True:
        st = {r: status(lab, r, confs[r])["host"]["plugins"]["sync"] for r in confs}
        fresh = all(s["own_at"] and s["own_at"] >= since + again_after for s in st.values())
        received = all(p["digest"] == st[backs[addr]]["own_digest"]
                       for s in st.values() for addr, p in s["peers"].items() if backs.get(addr) in st)
        loaded = all(worker_pins(lab, r) == st[r]["held_pins"] for r in confs)
        if fresh and received and loaded:
            return {r: s["own_pins"] for r, s in st.items()}
        if time.monotonic() > deadline:
            raise LabError(f"pins not exchanged within {timeout}s: {st}")
        time.sleep(0.2)
