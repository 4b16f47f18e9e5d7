"""synlb on the lab's routers: config files and the synlb command, per router."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from . import addresses as A


def synlb_exe() -> str:
    return os.path.join(os.path.dirname(sys.executable), "synlb")


def render_service_config(state_dir: str, targets: list[tuple[str, str, str]], *, mode: str = "route",
                          queue: str = "0", ports: str = "80, 8080", marks: dict[str, int] | None = None,
                          engine: str = "nfqueue", protocols: str = "tcp",
                          extra_synlb: str = "", extra_service: str = "", extra: str = "",
                          target_options: str = "") -> str:
    """The lab's standard service ``web`` (the VIPs, over every target) as INI
    text; ``targets`` are (name, IPv4, IPv6), ``marks`` optional fwmarks by
    name, ``target_options`` lines added to every target's section."""
    names = ", ".join(name for name, _, _ in targets)
    text = f"""[synlb]
state_dir = {state_dir}
{extra_synlb}
[service:web]
vips = {A.VIP[4]}/32, {A.VIP[6]}/128
ingress = {A.ROUTER_FRONT_IF}
egress = {A.ROUTER_BACK_IF}
protocols = {protocols}
ports = {ports}
mode = {mode}
queue = {queue}
engine = {engine}
targets = {names}
{extra_service}
"""
    for name, a4, a6 in targets:
        text += f"\n[target:{name}]\naddress = {a4}, {a6}\n"
        if marks and name in marks:
            text += f"mark = {marks[name]:#x}\n"
        if target_options:
            text += target_options.strip("\n") + "\n"
    return text + extra


def service_config(lab, router: str, targets=None, **kw: Any) -> str:
    """render_service_config for a router of ``lab`` (its state dir; the
    lab's targets, or only those named in ``targets``)."""
    targets = [(t, lab.addr(t, 4), lab.addr(t, 6)) for t in (targets or lab.targets)]
    return render_service_config(os.path.join(lab.role_dir(router), "synlb-state"), targets, **kw)


def write_config(lab, router: str, text: str | None = None, name: str = "synlb.ini", **kw: Any) -> str:
    path = os.path.join(lab.role_dir(router), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text if text is not None else service_config(lab, router, **kw))
    return path


def synlb(lab, router: str, config: str, *args: str, check: bool = True, timeout: float = 60):
    """Run ``synlb -c CONFIG ARGS`` in the router's namespace."""
    return lab.run(router, [synlb_exe(), "-c", config, *args], check=check, timeout=timeout)


def status(lab, router: str, config: str) -> dict:
    return json.loads(synlb(lab, router, config, "status", "--json").stdout)


def kernel_snapshot(lab, router: str) -> dict:
    """Everything synlb may change in a router, as text: for before/after equality."""
    def out(argv):
        return lab.run(router, argv).stdout

    def strip_comments(text):
        # built-in chain counters move with any traffic; the rules are what matter
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", ln) for ln in text.splitlines()
                         if not ln.startswith("#"))

    # the conntrack sysctls exist once nf_conntrack is loaded; make sure the
    # "before" picture already has them
    lab.run(router, ["conntrack", "-C"], check=False)

    return {
        # the whole ruleset, iptables-nft's tables included, without counters
        "nft": out(["nft", "-s", "list", "ruleset"]),
        "iptables": strip_comments(out(["iptables-save"])),
        "ip6tables": strip_comments(out(["ip6tables-save"])),
        "rules4": out(["ip", "-4", "rule", "show"]),
        "rules6": out(["ip", "-6", "rule", "show"]),
        "routes4": out(["ip", "-4", "route", "show", "table", "all"]),
        "routes6": out(["ip", "-6", "route", "show", "table", "all"]),
        "sysctl": out(["sysctl", "net.netfilter.nf_conntrack_tcp_loose",
                       "net.netfilter.nf_conntrack_tcp_be_liberal"]),
    }
