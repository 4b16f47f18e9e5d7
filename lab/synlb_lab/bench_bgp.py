"""Per-router costs of active-active with BGP, measured on the BGP lab
(synlb_lab.bgp): ``python -m synlb_lab.bench_bgp [--json]`` as root, about a
minute. The figures feed the N-router model of bench/README.md; this
machine (2 vCPUs shared by every namespace) cannot show the scaling itself.

1. Idle control plane, 10 s, per router: CPU of the ``synlb run`` host
   (lb, sync, bgp; its vtysh children included), of FRR's zebra, bfdd and
   bgpd (BFD 3 x 100 ms, one session per family), and up's FRR.
2. New connections: 300 short connections per family through the VIP, per
   router: connections it handled, packets queued to its worker and kept in
   the kernel, its workers' CPU per connection. lb1 sees both directions
   (the targets' replies cross it), lb2 and lb3 the client's only
   (``track_syn = no``).
3. Running sessions: 20 echo + 20 upload sessions per family for 5 s, per
   router: packets queued against kept in the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psutil

from . import addresses as A
from .bgp import BgpLab, bgp_configs
from .demo_failover import start_sessions, stop_sessions, summarize
from .ecmp import flows_by_router, start_host, state_dir, stop_host

IDLE = 10.0


def _cpu(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def _worker_pids(lab, r) -> list[int]:
    from synlb import workers
    return [w.pid for w in workers.running(state_dir(lab, r))]


def _counters(lab, r) -> dict:
    """(kept in the kernel, queued) packets of synlb-VIP-web, both families."""
    kept = queued = 0
    for tool in ("iptables-save", "ip6tables-save"):
        for line in lab.run(r, [tool, "-c", "-t", "mangle"]).stdout.splitlines():
            if line.startswith("[") and "-A synlb-VIP-web " in line:
                pkts = int(line[1:].split(":", 1)[0])
                if "-j synlb-ESTABLISHED" in line:
                    kept += pkts
                elif "-j NFQUEUE" in line:
                    queued += pkts
    return {"kept": kept, "queued": queued}


def measure(out=print) -> dict:
    res: dict = {"machine": {"cpus": os.cpu_count()}}
    with BgpLab(routers=3, targets=3, server_ports=(80,)) as lab:
        confs = bgp_configs(lab, targets=lab.targets)
        t0 = time.monotonic()
        for r in lab.routers:
            start_host(lab, r, confs[r])
        lab.wait_upstream(lab.routers)
        res["hosts_up_and_announced_s"] = round(time.monotonic() - t0, 2)
        try:
            # 1. idle control plane
            groups = {r: {"synlb_host": [lab.hosts[r].pid],
                          **{f"frr_{n}": [p.pid] for n, p in lab.frr[r].items()}} for r in lab.routers}
            groups["up"] = {f"frr_{n}": [p.pid] for n, p in lab.frr["up"].items()}
            before = {r: {k: _cpu(v) for k, v in g.items()} for r, g in groups.items()}
            time.sleep(IDLE)
            idle = {r: {k: round(100 * (_cpu(v) - before[r][k]) / IDLE, 2) for k, v in g.items()}
                    for r, g in groups.items()}
            res["idle_cpu_percent"] = idle
            out(f"idle, % of one CPU over {IDLE:g} s: {json.dumps(idle)}")

            # 2. new connections
            c0 = {r: _counters(lab, r) for r in lab.routers}
            w0 = {r: _cpu(_worker_pids(lab, r)) for r in lab.routers}
            f0 = {fam: flows_by_router(lab, fam) for fam in (4, 6)}
            ok = 0
            for fam in (4, 6):
                ok += lab.open_connections(A.VIP[fam], count=300, concurrency=10)["ok"]
            conns = {}
            for r in lab.routers:
                c1 = _counters(lab, r)
                n = sum(len(flows_by_router(lab, fam)[r] - f0[fam][r]) for fam in (4, 6))
                cpu = _cpu(_worker_pids(lab, r)) - w0[r]
                q, k = c1["queued"] - c0[r]["queued"], c1["kept"] - c0[r]["kept"]
                conns[r] = {"connections": n, "queued": q, "kept": k,
                            "queued_per_connection": round(q / n, 2) if n else None,
                            "worker_us_per_connection": round(1e6 * cpu / n, 1) if n else None,
                            "sees": "both directions" if r == lab.reply_router else "client's direction only"}
            res["new_connections"] = {"ok": ok, "of": 600, "per_router": conns}
            out(f"new connections ({ok}/600 ok): {json.dumps(conns)}")

            # 3. running sessions
            c0 = {r: _counters(lab, r) for r in lab.routers}
            handles = start_sessions(lab, 20, ("echo", "up"), (4, 6))
            time.sleep(5.0)
            s = summarize(stop_sessions(handles))
            sess = {}
            for r in lab.routers:
                c1 = _counters(lab, r)
                q, k = c1["queued"] - c0[r]["queued"], c1["kept"] - c0[r]["kept"]
                sess[r] = {"queued": q, "kept": k, "user_space_share": round(q / (q + k), 4) if q + k else None}
            res["sessions"] = {"kept": s["kept"], "of": s["sessions"], "per_router": sess}
            out(f"sessions ({s['kept']}/{s['sessions']} kept): {json.dumps(sess)}")
        finally:
            for r in list(lab.hosts):
                stop_host(lab, r)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = measure(out=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
