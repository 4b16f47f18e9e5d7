"""``synlb notify``: keepalived's notify script (through hooks/keepalived-notify).

Called as ``TYPE NAME STATE PRIORITY`` (the generic ``notify`` script of a
sync group or instance), or with a bare ``STATE`` (``notify_master`` and the
like). The event is stamped with the hook's fork time (journal.py: the order
is keepalived's fork order) and delivered in a detached child, so that
keepalived killing the script never interrupts a teardown half way.
"""

from __future__ import annotations

from ..errors import run_reporting
from . import delivery, journal
from .events import parse_notify_args


def main(config_path: str | None, args: list[str]) -> int:
    stamp = journal.notify_stamp()  # the order is keepalived's fork order
    event = parse_notify_args(list(args))
    delivery.load(config_path)  # fail fast (in this process) on a config that cannot be used at all

    def apply() -> int:
        def run() -> int:
            res = delivery.deliver(config_path, event, stamp)
            print(f"synlb notify: {res.summary()}")
            for c in res.changes:
                print(f"  {c}")
            return 0
        return run_reporting("notify", run)

    return delivery.run_detached(apply)
