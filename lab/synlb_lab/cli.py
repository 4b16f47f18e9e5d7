"""``synlb-lab``: lab helpers (run as root).

    synlb-lab server --name t1 [--port 80 --port 8080]     (inside a target netns)
    synlb-lab client conns --vip ADDR [--port 80] [--count N] [--concurrency C]
    synlb-lab client udp --vip ADDR [--port 80] [--count N] [--rounds R]
    synlb-lab client sessions --vip ADDR --pattern echo|push|down|up
                              [--count N] [--duration S] [--interval S]
    synlb-lab cleanup [--force]      remove labs whose owner process died
    synlb-lab demo                   balance + failover demo
    synlb-lab bench [--quick] [--out DIR]   benchmark report (bench/results/latest.*)
"""

from __future__ import annotations

import argparse
import json


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synlb-lab", description="synlb netns lab helpers")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("server", help="target test server (run inside a target netns)")
    s.add_argument("--name", required=True, help="target name put in every reply")
    s.add_argument("--port", type=int, action="append", dest="ports",
                   help="TCP port (repeatable; default 80 and 8080)")
    s.add_argument("--verbose", action="store_true", help="log connections to stderr")

    c = sub.add_parser("client", help="client driver (run inside the client netns); JSON out")
    csub = c.add_subparsers(dest="client_cmd", required=True)
    cc = csub.add_parser("conns", help="N short NAME connections; per-target counts")
    cc.add_argument("--vip", required=True)
    cc.add_argument("--port", type=int, default=80)
    cc.add_argument("--count", type=_positive_int, default=30)
    cc.add_argument("--concurrency", type=_positive_int, default=10)
    cc.add_argument("--timeout", type=_nonneg_float, default=3.0,
                    help="per connect and per reply (s)")
    cc.add_argument("--max-time", type=_nonneg_float, default=120.0,
                    help="bound on the whole run (s)")
    cu = csub.add_parser("udp", help="N UDP flows of R datagrams; per-target counts")
    cu.add_argument("--vip", required=True)
    cu.add_argument("--port", type=int, default=80)
    cu.add_argument("--count", type=_positive_int, default=30)
    cu.add_argument("--rounds", type=_positive_int, default=3, help="datagrams per flow")
    cu.add_argument("--concurrency", type=_positive_int, default=10)
    cu.add_argument("--interval", type=_nonneg_float, default=0.0, help="pause between a flow's datagrams (s)")
    cu.add_argument("--timeout", type=_nonneg_float, default=1.0, help="per answer (s)")
    cu.add_argument("--max-time", type=_nonneg_float, default=120.0, help="bound on the whole run (s)")
    cs = csub.add_parser("sessions", help="N concurrent long sessions for a duration")
    cs.add_argument("--vip", required=True)
    cs.add_argument("--port", type=int, default=80)
    cs.add_argument("--pattern", choices=("echo", "push", "down", "up"), default="echo")
    cs.add_argument("--count", type=_positive_int, default=10)
    cs.add_argument("--duration", type=_nonneg_float, default=10.0)
    cs.add_argument("--interval", type=_nonneg_float, default=0.1,
                    help="echo: pause between exchanges; push: server interval; "
                         "down/up: pause between chunks (0 = full speed)")
    cs.add_argument("--chunk", type=_positive_int, default=16384, help="down/up chunk bytes")
    cs.add_argument("--stall", type=_nonneg_float, default=2.0,
                    help="a session whose final gap exceeds this did not survive")
    cs.add_argument("--connect-timeout", type=_nonneg_float, default=3.0)

    cl = sub.add_parser("cleanup", help="remove labs whose owner process is gone")
    cl.add_argument("--force", action="store_true", help="also labs whose owner is alive")

    d = sub.add_parser("demo", help="balance real connections in a lab, then fail a router over")
    d.add_argument("--no-failover", action="store_true", help="only the single-router part")
    b = sub.add_parser("bench", help="benchmark: synlb against plain routing and kernel HMARK")
    b.add_argument("--quick", action="store_true", help="short runs, few rounds (smoke test)")
    b.add_argument("--out", help="report directory (default: bench/results of the checkout)")
    b.add_argument("--only", help="comma-separated sections: maglev,hotpath,single_router,failover")
    b.add_argument("--no-perf", action="store_true", help="skip the perf profile of the worker")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "server":
        from .server import main as server_main
        return server_main(args.name, args.ports or [80, 8080], quiet=not args.verbose)
    if args.cmd == "client":
        from . import client
        if args.client_cmd == "conns":
            return client.main_conns(args)
        if args.client_cmd == "udp":
            return client.main_udp(args)
        return client.main_sessions(args)
    if args.cmd == "cleanup":
        from .netns import cleanup_stale
        print(json.dumps({"removed": cleanup_stale(force=args.force)}))
        return 0
    if args.cmd == "demo":
        from .demo import main as demo_main
        return demo_main(failover=not args.no_failover)
    if args.cmd == "bench":
        from .bench import main as bench_main
        return bench_main(args)
    if args.cmd in ("demo", "bench"):
        print(f"{args.cmd}: not yet built")
        return 1
    return 2

