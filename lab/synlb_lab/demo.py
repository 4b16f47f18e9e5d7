"""`synlb-lab demo`: synlb doing its job on a lab built for the occasion.

Part 1 (one router): 300 real TCP connections per IP family to the VIP,
balanced over three targets; the chain counters show that only the SYNs
reached user space.  Part 2 (two routers with keepalived, if built):
sessions running through a failover.  Part 3 (demo_bgp): three routers
active-active behind ECMP, announced with BGP through FRR.
"""

from __future__ import annotations

from . import addresses as A
from .scenario import kernel_snapshot, status, synlb, write_config
from .topology import Lab

CONNS = 300


def _print(*a) -> None:
    print(*a, flush=True)


def balance_demo(out=_print) -> dict:
    result = {}
    with Lab(routers=1) as lab:
        conf = write_config(lab, "lb1")
        before = kernel_snapshot(lab, "lb1")
        out(f"lab {lab.prefix}: client -> lb1 (synlb) -> t1 t2 t3, VIPs {A.VIP[4]} and {A.VIP[6]}")
        out(f"$ synlb -c {conf} up")
        out(synlb(lab, "lb1", conf, "up").stdout.rstrip())
        for fam in (4, 6):
            res = lab.open_connections(A.VIP[fam], count=CONNS, concurrency=20)
            spread = "  ".join(f"{t}={n}" for t, n in sorted(res["per_target"].items()))
            out(f"\nIPv{fam}: {res['ok']}/{CONNS} connections to {A.VIP[fam]} answered: {spread}")
            result[f"v{fam}"] = res["per_target"]
        st = status(lab, "lb1", conf)
        out(f"\n$ synlb -c {conf} status")
        out(synlb(lab, "lb1", conf, "status").stdout.rstrip())
        for c in st["chains"]:
            out(f"\nIPv{c['family']}: {c['queued_pkts']} packets went to the worker (one per connection), "
                f"{c['kept_in_kernel_pkts']} stayed in the kernel")
        result["chains"] = st["chains"]
        out(f"\n$ synlb -c {conf} down")
        out(synlb(lab, "lb1", conf, "down").stdout.rstrip())
        clean = kernel_snapshot(lab, "lb1") == before
        out(f"\nafter down, the router's rules, routes and sysctls are as before: {'yes' if clean else 'NO'}")
        result["clean_after_down"] = clean
    return result


def main(failover: bool = True) -> int:
    res = balance_demo()
    ok = res["clean_after_down"] and all(
        c["queued_pkts"] < 1.05 * CONNS for c in res["chains"])
    if failover:
        try:
            from .demo_failover import run_failover_demo
        except ImportError:
            _print("\n(failover demo not available in this build)")
        else:
            _print("\n--- failover: two routers with keepalived ---")
            fo = run_failover_demo(out=_print)
            ok = ok and bool(fo.get("ok", True))
        from .demo_bgp import run_bgp_demo
        _print("\n--- active-active: three routers behind ECMP, announced with BGP ---")
        ok = ok and bool(run_bgp_demo(out=_print).get("ok"))
    return 0 if ok else 1
