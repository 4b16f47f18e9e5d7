"""The lab address plan (binding: docs/ARCHITECTURE.md, "Lab").

Pure data and helpers; nothing here touches the kernel.

| what                                   | IPv4            | IPv6           |
|----------------------------------------|-----------------|----------------|
| front net (client, routers)            | 10.64.1.0/24    | fd64:1::/64    |
| client                                 | 10.64.1.10      | fd64:1::10     |
| router N front                         | 10.64.1.N       | fd64:1::N      |
| front VRRP address (client gateway)    | 10.64.1.254     | fd64:1::254    |
| back net (routers, targets)            | 10.64.2.0/24    | fd64:2::/64    |
| router N back                          | 10.64.2.N       | fd64:2::N      |
| back VRRP address (targets' gateway)   | 10.64.2.254     | fd64:2::254    |
| target K (1..)                         | 10.64.2.1K      | fd64:2::1K     |
| service VIP (targets' lo, route mode)  | 10.64.100.1     | fd64:100::1    |

ECMP lab (synlb_lab.ecmp): the client sits behind an upstream router ``up``
on a net of its own; ``up`` reaches the routers on the front net and has a
multipath route to the VIP through them. lb1 owns the back VRRP address
statically (targets' replies go through it only); routers 1..4.

| what                                   | IPv4            | IPv6           |
|----------------------------------------|-----------------|----------------|
| client net (client, up)                | 10.64.0.0/24    | fd64::/64      |
| client (ECMP lab)                      | 10.64.0.10      | fd64::10       |
| up, client side (client's gateway)     | 10.64.0.1       | fd64::1        |
| up, front side (routers' gateway)      | 10.64.1.250     | fd64:1::250    |
"""

from __future__ import annotations

FRONT_NET = {4: "10.64.1.0/24", 6: "fd64:1::/64"}
BACK_NET = {4: "10.64.2.0/24", 6: "fd64:2::/64"}
PREFIXLEN = {4: 24, 6: 64}

CLIENT = {4: "10.64.1.10", 6: "fd64:1::10"}
FRONT_VRRP = {4: "10.64.1.254", 6: "fd64:1::254"}
BACK_VRRP = {4: "10.64.2.254", 6: "fd64:2::254"}
VIP = {4: "10.64.100.1", 6: "fd64:100::1"}
VIP_PREFIXLEN = {4: 32, 6: 128}

VIP4, VIP6 = VIP[4], VIP[6]

MAX_ROUTERS = 2
MAX_TARGETS = 9

#: ECMP lab (synlb_lab.ecmp)
ECMP_CLIENT_NET = {4: "10.64.0.0/24", 6: "fd64::/64"}
ECMP_CLIENT = {4: "10.64.0.10", 6: "fd64::10"}
UPSTREAM_CLIENT = {4: "10.64.0.1", 6: "fd64::1"}
UPSTREAM_FRONT = {4: "10.64.1.250", 6: "fd64:1::250"}
ECMP_MAX_ROUTERS = 4
UPSTREAM_CLIENT_IF = "client"  # up's link to the client
UPSTREAM_FRONT_IF = "front"  # up's link to the front bridge

#: interface names inside the lab namespaces
ROUTER_FRONT_IF = "front"
ROUTER_BACK_IF = "back"
HOST_IF = "eth0"  # client and targets


def _check_family(family: int) -> None:
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")


def router_front(n: int, family: int = 4) -> str:
    _check_family(family)
    return f"10.64.1.{n}" if family == 4 else f"fd64:1::{n}"


def router_back(n: int, family: int = 4) -> str:
    _check_family(family)
    return f"10.64.2.{n}" if family == 4 else f"fd64:2::{n}"


def target(k: int, family: int = 4) -> str:
    _check_family(family)
    if not 1 <= k <= MAX_TARGETS:
        raise ValueError(f"target index must be 1..{MAX_TARGETS}, not {k}")
    return f"10.64.2.1{k}" if family == 4 else f"fd64:2::1{k}"


def with_prefix(addr: str, family: int) -> str:
    return f"{addr}/{PREFIXLEN[family]}"
