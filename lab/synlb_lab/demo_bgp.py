"""`synlb-lab demo`, part 3: active-active. Three routers, each running FRR
and `synlb run` (lb, sync, bgp), announce the VIPs over eBGP to an upstream
router (FRR, ECMP, BFD 3 x 100 ms); sessions run through all of them; one
router's links go down, another router's synlb is stopped: every session
keeps its target."""

from __future__ import annotations

import time
from typing import Callable

from . import frr
from .bgp import BgpLab, bgp_configs, stop_host_watching
from .demo_failover import start_sessions, stop_sessions, summarize
from .ecmp import start_host, stop_host

PATTERNS = ("echo", "up")
FAMILIES = (4, 6)


def run_bgp_demo(out: Callable = print, count: int = 10) -> dict:
    if not frr.available():
        out("(active-active demo skipped: FRR is not installed)")
        return {"ok": True, "skipped": True}
    result: dict = {"ok": False}
    with BgpLab(routers=3, targets=3, server_ports=(80,)) as lab:
        try:
            confs = bgp_configs(lab, targets=lab.targets)
            out(f"lab {lab.prefix}: client -> up (FRR, ECMP over eBGP, BFD 3 x 100 ms) -> lb1 lb2 lb3 "
                f"(FRR + synlb run: lb, sync, bgp) -> t1 t2 t3; replies through lb1")
            t0 = time.monotonic()
            for r in lab.routers:
                start_host(lab, r, confs[r])
            lab.wait_upstream(lab.routers)
            out(f"synlb started on the three routers; their bgp plugins announced the VIPs, up routes to "
                f"{lab.announced_by(4)} ({time.monotonic() - t0:.1f} s)")
            out("up's route:\n  " + lab.ip("up", "route", "show", "10.64.100.1").stdout.strip()
                .replace("\n", "\n  "))
            n = count * len(PATTERNS) * len(FAMILIES)
            handles = start_sessions(lab, count, PATTERNS, FAMILIES)
            try:
                time.sleep(1.0)
                took = lab.router_leave("lb2")
                out(f"\n{n} sessions running (echo, upload; IPv4, IPv6); lb2's links go down: BFD told up, "
                    f"which routes to {lab.announced_by(4)} after {took:.3f} s")
                time.sleep(1.5)
                t = stop_host_watching(lab, "lb3")
                out(f"lb3's synlb stopped (SIGTERM): withdrawn from up after {t['withdrawn']:.3f} s, its "
                    f"chains removed at {t['dataplane_gone']:.3f} s; up routes to {lab.announced_by(4)}")
                time.sleep(1.5)
            finally:
                res = summarize(stop_sessions(handles))
            out(f"{res['kept']}/{res['sessions']} sessions kept, {res['moved']} changed target, data held up "
                f"at most {res['max_delay']:.3f} s")
            result.update(ok=res["kept"] == res["sessions"] and res["moved"] == 0, kept=res["kept"],
                          sessions=res["sessions"], convergence=took, stop=t)
        finally:
            for r in list(lab.hosts):
                stop_host(lab, r)
    out(f"\nactive-active demo: {'every session kept its target' if result['ok'] else 'FAILED'}")
    return result
