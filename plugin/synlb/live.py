"""Checks only the live system can answer, run before anything is changed."""

from __future__ import annotations

import ipaddress
import os
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
    if any(s.engine == "nftables" for s in cfg.services):
        from .nft_apply import available
        if available() is None:
            out.append(f"{main}:-:-: neither python3-nftables nor nft found, needed by engine = nftables "
                       "(apt-get install python3-nftables)")
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
    return out


def verify(cfg: Config) -> None:
    found = problems(cfg)
    if found:
        raise LiveError(found)
