"""``synlb`` command line. User errors end in one message and exit 1, never a traceback.

A user error is an ``errors.UserError``; any other exception is a bug and
keeps its traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import config as config_mod
from . import statedir
from .errors import EXIT_UNCONFIGURED, run_reporting


def _load(args) -> config_mod.Config:
    return config_mod.load(args.config)


# Every command that touches the state dir checks it first (statedir.ensure:
# a symlink, a directory not root's or writable by others is refused); the
# VRRP event sources do it in vrrp.delivery.load.


def cmd_check(args) -> int:
    try:
        cfg = _load(args)
    except config_mod.ConfigError as e:
        if not e.nothing_configured:
            raise
        # the shipped synlb.ini: valid, and it balances nothing (not an error)
        print(f"{config_mod.config_path(args.config)}: nothing configured: no [service:NAME] section, so "
              f"synlb balances nothing (exit {EXIT_UNCONFIGURED}); see synlb.ini(5)")
        return EXIT_UNCONFIGURED
    from . import live
    if args.live:
        live.verify(cfg)
    for line in live.warnings(cfg):  # about the configuration alone: no live system needed
        print(f"warning: {line}", file=sys.stderr)
    n = len(cfg.services)
    print(f"{config_mod.config_path(args.config)}: OK ({n} service{'s' * (n != 1)}, "
          f"{len(cfg.targets)} targets, {len(cfg.files)} file{'s' * (len(cfg.files) != 1)})")
    return 0


def cmd_up(args) -> int:
    from . import dataplane
    cfg = _load(args)
    if args.dry_run:
        print(dataplane.plan(cfg))
        return 0
    statedir.ensure(cfg.globals.state_dir)
    path = config_mod.config_path(args.config)
    changes = dataplane.up(path, cfg, reason="up")
    print("\n".join(changes) if changes else "up: nothing to change")
    return 0


def cmd_down(args) -> int:
    from . import dataplane
    g = config_mod.load_globals(args.config)
    statedir.ensure(g.state_dir)
    changes = dataplane.down(g.state_dir, g.route_protocol, reason="down")
    print("\n".join(changes) if changes else "down: nothing to remove")
    return 0


def cmd_status(args) -> int:
    from . import status
    cfg = _load(args)
    statedir.ensure(cfg.globals.state_dir, create=False)  # only read: a missing one is not made
    if args.check:
        from . import dataplane
        diffs = dataplane.drift(cfg)
        for line in diffs:
            print(line)
        if diffs:
            print(f"synlb status --check: {len(diffs)} difference{'s' * (len(diffs) != 1)} from the "
                  "desired state", file=sys.stderr)
            return 1
        print("synlb status --check: the live state is the desired one")
        return 0
    st = status.collect(cfg)
    from . import control
    st["host"] = control.request(cfg.globals.state_dir, {"cmd": "status"}, timeout=5)
    print(json.dumps(st, indent=2) if args.json else status.render_text(st))
    return 0


def cmd_worker(args) -> int:
    from . import worker
    statedir.ensure(args.state_dir, create=False)  # the data plane made it, with the worker's table
    return worker.main(args.state_dir, args.service, args.queue, args.ready_fd)


def cmd_run(args) -> int:
    from . import host
    cfg = _load(args)
    statedir.ensure(cfg.globals.state_dir)
    from . import live
    live.verify(cfg)
    return host.main(config_mod.config_path(args.config))


def cmd_notify(args) -> int:
    from .vrrp import notify
    return notify.main(args.config, args.args)


def cmd_fifo(args) -> int:
    from .vrrp import fifo
    return fifo.follow(args.config, args.path)


def cmd_dbus(args) -> int:
    from .vrrp import dbus
    return dbus.main(args.config, address=args.address, wait=args.wait)


class _Version(argparse.Action):
    """``--version``: the package's version, read only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import synlb
        print(f"synlb {synlb.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synlb", description=__doc__.split("\n")[0])
    p.add_argument("--version", action=_Version, help="print the version and exit")
    p.add_argument("--config", "-c", help=f"INI file (default ${config_mod.ENV_CONFIG} or "
                                           f"{config_mod.DEFAULT_CONFIG}), plus synlb.d/*.ini beside it")
    p.add_argument("--verbose", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("check", help="validate the configuration (no root, no kernel)",
                       description=f"Exit 0: valid; 1: problems, each named as FILE:SECTION:KEY; "
                                   f"{EXIT_UNCONFIGURED}: nothing configured (no [service:NAME] section).")
    s.add_argument("--live", action="store_true", help="also check interfaces and local addresses")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("up", help="install the data plane and start the workers")
    s.add_argument("--dry-run", "-n", action="store_true", help="print what would be applied")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="remove everything synlb installed")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="counters, targets, queues, workers")
    s.add_argument("--json", action="store_true")
    s.add_argument("--check", action="store_true",
                   help="compare the live kernel with the desired state; exit 1 listing every difference")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("run", help="the long-running plugin host (foreground)")
    s.set_defaults(func=cmd_run)

    # internal (workers.py starts it): no help=, so --help does not list it
    s = sub.add_parser("worker")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--service", required=True)
    s.add_argument("--queue", type=int, required=True)
    s.add_argument("--ready-fd", type=int)  # written to once the queue is served (workers.wait_bound)
    s.set_defaults(func=cmd_worker)

    # the VRRP event sources (synlb/vrrp/)
    def config_opt(s):
        # also accepted after the command (keepalived-notify --config FILE ...)
        s.add_argument("--config", "-c", default=argparse.SUPPRESS, help="INI file (same as synlb --config)")

    s = sub.add_parser("notify", help="keepalived notify script: apply a VRRP state change",
                       description="Called by keepalived (through hooks/keepalived-notify) as "
                                   "TYPE NAME STATE PRIORITY, e.g. GROUP G1 MASTER 0; or with a "
                                   "bare STATE for notify_master/backup/fault/stop.")
    config_opt(s)
    s.add_argument("args", nargs="*", metavar="ARG", help="GROUP|INSTANCE NAME STATE PRIORITY, or STATE")
    s.set_defaults(func=cmd_notify)

    s = sub.add_parser("fifo", help="keepalived notify_fifo_script: follow the notify FIFO until EOF")
    config_opt(s)
    s.add_argument("path", metavar="PATH", help="the FIFO (keepalived appends it)")
    s.set_defaults(func=cmd_fifo)

    s = sub.add_parser("dbus", help="follow keepalived's D-Bus signals (org.keepalived.Vrrp1)")
    config_opt(s)
    s.add_argument("--address", help="D-Bus address (default: the system bus, $DBUS_SYSTEM_BUS_ADDRESS)")
    s.add_argument("--wait", action="store_true",
                   help="if keepalived is not on the bus yet, treat it as stopped and wait")
    s.set_defaults(func=cmd_dbus)
    return p


# The control plane, which runs at [synlb] nice (sched.py): the host, the
# commands that change the data plane, and the VRRP event sources. An event
# source that may not take the priority still delivers its event.
CONTROL_PLANE = frozenset({"up", "down", "run"})
EVENT_SOURCES = frozenset({"notify", "fifo", "dbus"})


def _control_plane_priority(args) -> None:
    if args.command not in CONTROL_PLANE | EVENT_SOURCES or getattr(args, "dry_run", False):
        return
    try:
        g = config_mod.load_globals(args.config)
    except config_mod.ConfigError:
        return  # the command reports what is wrong with the file, its own way
    from . import sched
    try:
        sched.set_nice(g.nice, f"{config_mod.config_path(args.config)}:synlb:nice")
    except sched.PriorityError as e:
        if args.command in CONTROL_PLANE:
            raise
        logging.getLogger("synlb").warning("%s; going on at nice %d", e, sched.nice_of(0))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s synlb[%(process)d] %(levelname)s: %(message)s"
                        if args.command == "run" else "synlb: %(message)s")

    def command() -> int:
        _control_plane_priority(args)  # first: before any thread starts
        return args.func(args)
    return run_reporting(args.command, command)


