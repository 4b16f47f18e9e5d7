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
4. Scaling (per engine, a lab of its own): new connections/s through 3, 2,
   1, 2, 3 announcing routers (``measure_scaling``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import psutil

from . import addresses as A
from .bench import IPERF_PORT, Plan, iperf_section, run_iperf, run_wrk
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


SCALING_PORT = 80  # nginx on the targets (no test server): the service the lab configures
SCALING_STEPS = (3, 2, 1, 2, 3)  # routers announcing: lb3 leaves, lb2 leaves, then both come back


def _wrk(lab, seconds: int = 3) -> dict:
    res = run_wrk(lab, f"http://{A.VIP[4]}:{SCALING_PORT}/", Plan(conn_seconds=seconds))
    return {"requests": res["requests"], "rate": res["rate"],
            "socket_errors": sum(res["errors"].values()) + res["non2xx"]}


def measure_scaling(engine: str, out=print) -> dict:
    """New connections/s (wrk, ``Connection: close``, nginx on the 3 targets)
    through 3, 2, 1, 2, 3 announcing routers: lb3's links go down, then
    lb2's, then they come back (lb1 carries the targets' replies and stays).
    On this machine every router shares the same 2 CPUs with the client,
    up and the targets, so the rates show what the machine can do, not how
    synlb scales (bench/README.md has the model)."""
    res: dict = {"engine": engine, "steps": []}
    with BgpLab(routers=3, targets=3, servers=False) as lab:
        lab.sysctl("client", {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": 1})
        lab.start_nginx(port=SCALING_PORT)
        iperf = lab.popen("t1", ["iperf3", "-s", "-p", str(IPERF_PORT)], name="iperf3")
        # iperf3's control and data connections must reach one server: a service of
        # its own with t1 alone, on the same VIPs
        confs = bgp_configs(lab, targets=lab.targets, engine=engine)
        for r, conf in confs.items():  # plus the single-target iperf3 service
            confs[r] = replace(conf, options={**conf.options, "extra": conf.options.get("extra", "")
                                              + iperf_section(engine, "track_syn = no")}).write(lab)
        for r in lab.routers:
            start_host(lab, r, confs[r])
        lab.wait_upstream(lab.routers)
        try:
            announcing = list(lab.routers)
            for k in SCALING_STEPS:
                while len(announcing) > k:
                    gone = announcing.pop()
                    lab.router_leave(gone)
                while len(announcing) < k:
                    back = lab.routers[len(announcing)]
                    lab.router_join(back)
                    announcing.append(back)
                # (the iptables chains' counters: the nfqueue engine's; the nftables
                # engine keeps everything in the kernel, see the BGP lab tests)
                counted = announcing if engine == "nfqueue" else []
                c0 = {r: _counters(lab, r) for r in counted}
                w = _wrk(lab)
                per = {}
                for r in counted:
                    c1 = _counters(lab, r)
                    per[r] = {"queued": c1["queued"] - c0[r]["queued"], "kept": c1["kept"] - c0[r]["kept"]}
                gbps = _iperf(lab)
                step = {"routers": k, "announcing": list(announcing), **w, "per_router": per, "gbps": gbps}
                res["steps"].append(step)
                out(f"{engine}: {k} router(s) {announcing}: {w['rate']:.0f} conn/s, {w['socket_errors']} failed; "
                    f"{gbps:.2f} Gbit/s; per router (queued, kept in kernel): "
                    f"{ {r: (v['queued'], v['kept']) for r, v in per.items()} or 'n/a' }")
        finally:
            for r in list(lab.hosts):
                stop_host(lab, r)
            lab.stop_process(iperf)
    res["conn_per_s"] = _mean_per_router_count(res["steps"], "rate", 0)
    res["gbps"] = _mean_per_router_count(res["steps"], "gbps", 2)
    return res


def _mean_per_router_count(steps: list[dict], key: str, nd: int) -> dict:
    """{announcing routers: mean of ``key`` over the steps with that many}."""
    by_k: dict = {}
    for st in steps:
        by_k.setdefault(st["routers"], []).append(st[key])
    return {str(k): round(sum(v) / len(v), nd or None) for k, v in sorted(by_k.items())}


def _iperf(lab, seconds: int = 5) -> float:
    """Established throughput client -> VIP -> t1, 4 streams (ECMP spreads them), Gbit/s."""
    return run_iperf(lab, A.VIP[4], Plan(tput_seconds=seconds, tput_omit=1, tput_streams=4))["gbps"]



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("--only", choices=("costs", "scaling"), help="one part only")
    args = p.parse_args(argv)
    out = (lambda *a: None) if args.json else print
    res: dict = {}
    if args.only in (None, "costs"):
        res = measure(out=out)
    if args.only in (None, "scaling"):
        res["scaling"] = {e: measure_scaling(e, out=out) for e in ("nfqueue", "nftables")}
    if args.json:
        print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
