"""The one entry point that changes the kernel: reconcile the whole desired
state, or tear everything down.  Serialized by a lock in the state dir
(statedir.locked), so concurrent callers (keepalived runs notify scripts in
parallel) never interleave; every step is idempotent.

``applied.json`` records what ``up`` applied; ``down`` reads back its
``route_protocol`` (the routes it deletes are that protocol's), and takes it
only if it is one the config could have set and no other routing daemon's.
"""

from __future__ import annotations

import logging
import os
import time

from . import (conntrack, health_state, live, netfilter, nft_apply, nft_engine, pins_state, routing, rules,
               statedir, sysctl, workers)
from .config import FOREIGN_PROTOCOLS, ROUTE_PROTOCOL_RANGE, Config

log = logging.getLogger(__name__)

APPLIED = statedir.APPLIED

locked = statedir.locked  # the data plane lock


def applied(state_dir: str) -> dict | None:
    try:
        data = statedir.read_json(statedir.applied(state_dir))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_applied(state_dir: str, data: dict | None) -> None:
    if data is None:
        statedir.remove(statedir.applied(state_dir))
        return
    statedir.write_json(statedir.applied(state_dir), data)


def nft_plan(cfg: Config) -> nft_engine.Plan:
    """The nftables engine's table for ``cfg``, the targets' health and the
    pins in the state dir (what the NFQUEUE workers read too)."""
    state_dir = cfg.globals.state_dir
    svcs = nft_engine.services(cfg)
    down = health_state.down_sets(state_dir, [s.name for s in svcs])
    try:
        pins = pins_state.load(state_dir) if svcs else {}
    except pins_state.PinsError as e:
        log.error("pins not loaded for the nftables engine: %s", e)
        pins = {}
    return nft_engine.desired(cfg, down, pins)


def applied_route_protocol(state_dir: str, prev: dict, default: int) -> int:
    """The route protocol ``prev`` (applied.json) names, if it is one synlb
    may own: an integer in the config's range, no other daemon's. Anything
    else is refused (logged) and ``default``, the config's, is used."""
    rp = prev.get("route_protocol", default)
    lo, hi = ROUTE_PROTOCOL_RANGE
    if isinstance(rp, bool) or not isinstance(rp, int) or not lo <= rp <= hi:
        why = f"not a protocol number within {lo}..{hi}"
    elif rp in FOREIGN_PROTOCOLS:
        why = f"protocol {FOREIGN_PROTOCOLS[rp]}'s (another routing daemon's)"
    else:
        return rp
    log.error("%s: route_protocol %r refused (%s): using the config's, %d",
              statedir.applied(state_dir), rp, why, default)
    return default


def plan(cfg: Config) -> str:
    """What ``up`` would install, as text (dry run)."""
    out = [t for t in (rules.describe(rules.render(cfg)), nft_engine.describe(nft_plan(cfg))) if t]
    rl, rt = routing.desired(cfg)
    out += [f"{r} proto {cfg.globals.route_protocol}" for r in sorted(rl) + sorted(rt)]
    if cfg.globals.pickup:
        out += [f"sysctl -w {n.replace('/', '.')}={v}" for n, v in sysctl.PICKUP.items()]
    for svc in cfg.services:
        for q in svc.queues:
            out.append(f"worker: service {svc.name} queue {q} over "
                       f"{', '.join(svc.target_names)} (Maglev M={svc.table_size})")
    return "\n".join(out)


def _apply(config_path: str, cfg: Config, reason: str) -> list[str]:
    g = cfg.globals
    changes = []
    # workers first: a queue with a listener before its rules means no
    # packet is ever queued to nobody (and those no longer wanted stop
    # after their rules are gone)
    changes += workers.ensure(cfg, stop_unwanted=False)
    # what is added goes in before what is removed: a service switching
    # engines is never without rules (both engines restore the same marks)
    nft = nft_plan(cfg)
    if nft.empty:
        changes += netfilter.reconcile(rules.render(cfg), g.state_dir)
        changes += nft_apply.reconcile(nft, g.state_dir)
    else:
        changes += nft_apply.reconcile(nft, g.state_dir)
        changes += netfilter.reconcile(rules.render(cfg), g.state_dir)
    changes += workers.ensure(cfg)
    with routing.Routing(g.route_protocol) as rt:
        changes += rt.reconcile(*routing.desired(cfg))
    if g.pickup:
        changes += sysctl.activate(g.state_dir)
    else:
        changes += sysctl.restore(g.state_dir)
    _write_applied(g.state_dir, {"digest": cfg.digest(), "route_protocol": g.route_protocol,
                                 "config": os.path.abspath(config_path), "reason": reason,
                                 "time": time.time()})
    return changes


def _teardown(state_dir: str, route_protocol: int) -> list[str]:
    """Every step runs even when one fails (a half-removed data plane is
    worse than a reported error); the first error is raised at the end."""
    def routes() -> list[str]:
        with routing.Routing(route_protocol) as rt:
            return rt.reconcile(set(), set())

    def health() -> list[str]:
        health_state.clear(state_dir)
        return []

    changes: list[str] = []
    first: Exception | None = None
    steps = (lambda: nft_apply.remove(state_dir), lambda: netfilter.remove_all(state_dir), routes,
             lambda: workers.stop_all(state_dir), health, lambda: sysctl.restore(state_dir))
    for step in steps:
        try:
            changes += step()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other steps
            log.error("teardown step failed: %s", e)
            first = first or e
    if first is not None:
        raise first
    _write_applied(state_dir, None)
    return changes


def up(config_path: str, cfg: Config, reason: str = "up") -> list[str]:
    """Install (or re-converge) everything. On failure from a clean state,
    everything installed so far is removed again: never half-applied."""
    live.verify(cfg)
    with locked(cfg.globals.state_dir):
        changes = up_locked(config_path, cfg, reason, verify=False)
    for c in changes:
        log.debug("%s: %s", reason, c)
    return changes


def apply_pins(cfg: Config) -> list[str]:
    """The pins file into the nftables engine's maps, while the data plane is
    up (the sync plugin, after writing the file). Under the lock, so a
    reconcile never installs older pins after these."""
    if not nft_engine.services(cfg):
        return []
    state_dir = cfg.globals.state_dir
    with locked(state_dir):
        if applied(state_dir) is None:
            return []
        return nft_apply.replace_pins(nft_plan(cfg), state_dir)


# VRRP states in which this router carries the VIPs' traffic
CARRYING = ("MASTER", "STANDALONE")


def forget_connections(cfg: Config, vrrp_state: str) -> list[str]:
    """From MASTER straight to BACKUP, delete the conntrack entries carrying
    synlb's marks.

    The peer that took over carries those connections to their end, so this
    router's entries are never refreshed nor closed: an ESTABLISHED one
    outlives its connection for days (nf_conntrack_tcp_timeout_established),
    keeps a misplaced one pinned for the peers all that time, and gives a
    later connection that reuses the 5-tuple the old mark at the next
    failover instead of a pickup where it lives. A connection that comes
    back is picked up again (its pin, or the configured table). Out of
    MASTER by FAULT or STOP (links or keepalived gone) the entries are kept:
    the router usually comes back to carry the same connections, and
    picking all of them up again would make many from the targets' side
    (docs/DESIGN-NOTES.md#4), whose closed entries refuse a client that
    reuses the port within nf_conntrack_tcp_timeout_close."""
    marker = statedir.carried(cfg.globals.state_dir)
    if vrrp_state in CARRYING:
        if not os.path.exists(marker):
            statedir.write_file(marker, lambda fh: fh.write(b"MASTER\n"))
        return []
    if not statedir.remove(marker) or vrrp_state != "BACKUP":
        return []
    n = conntrack.forget(cfg.service_marks())
    return [f"conntrack: forgot {n} connections of synlb's targets (MASTER -> BACKUP: a peer carries them)"
            ] if n else []


def down(state_dir: str, route_protocol: int, reason: str = "down") -> list[str]:
    with locked(state_dir):
        changes = down_locked(state_dir, route_protocol)
    for c in changes:
        log.debug("%s: %s", reason, c)
    return changes


# The *_locked variants are for callers that hold ``locked(state_dir)``
# themselves, to do more under the same lock (the VRRP event sources record
# the latest event and reconcile to it in one critical section).

def up_locked(config_path: str, cfg: Config, reason: str, verify: bool = True) -> list[str]:
    """``up`` for a caller that holds ``locked(cfg.globals.state_dir)``."""
    if verify:
        live.verify(cfg)
    g = cfg.globals
    was_active = applied(g.state_dir) is not None
    try:
        return _apply(config_path, cfg, reason)
    except Exception:
        if not was_active:
            _teardown(g.state_dir, g.route_protocol)
        raise


def down_locked(state_dir: str, route_protocol: int) -> list[str]:
    """``down`` for a caller that holds ``locked(state_dir)``."""
    prev = applied(state_dir)
    if prev:
        route_protocol = applied_route_protocol(state_dir, prev, route_protocol)
    return _teardown(state_dir, route_protocol)


def drift(cfg: Config) -> list[str]:
    """Every way the live kernel differs from what this router should have
    now: the whole data plane if it is applied (``up``, or the VRRP state
    says active), nothing of synlb's if it is not. Changes nothing; shared by
    ``status --check`` and the host, which reconciles when it finds any."""
    g = cfg.globals
    active = applied(g.state_dir) is not None
    if active:
        rules_want, routes_want = routing.desired(cfg)
        desired_rules = rules.render(cfg)
    else:
        rules_want, routes_want = set(), set()
        desired_rules = {fam: {n: rules.Table(n) for n in rules.TABLES} for fam in (4, 6)}
    out = netfilter.drift(desired_rules, g.state_dir)
    out += nft_apply.drift(nft_plan(cfg) if active else nft_engine.Plan("", "", {}), g.state_dir)
    with routing.Routing(g.route_protocol) as rt:
        out += rt.drift(rules_want, routes_want)
    out += sysctl.drift(active and g.pickup)
    if active:
        out += workers.drift(cfg)
    else:
        out += [f"worker queue {w.queue} (pid {w.pid}): running while synlb is not active"
                for w in workers.running(g.state_dir)]
    return out
