"""Apply the nftables engine's table (``nft_engine.py`` renders it).

Every change is one nftables transaction, through libnftables (the Debian
package python3-nftables) or, without it, ``nft -f -``:

- the first install, or any change of the skeleton (services, VIPs, ports,
  table size, mode...): the whole table, deleting the live one in the same
  transaction;
- otherwise only the elements that differ: a health flip or a target added
  or removed deletes and re-adds only the slots whose mark changes; new
  pins replace the old ones (flush + add).

What the live table holds is recorded in the state dir (``nft.json``, and
the applied slot marks in ``nft-slots-<service>.bin``, the applied pins in
``nft-pins-<service>.json``) and checked against
the kernel by the digest in the base chain's comment (``nft list chains``
answers without reading the 65537 slots). A record written before a
transaction that did not finish (``pending``) means: rebuild the whole
table.
"""

from __future__ import annotations

import array
import json
import logging
import re
import subprocess
import threading
import time

from . import nft_engine as E
from . import statedir
from .errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = statedir.NFT_STATE
TIMEOUT = 30.0


class NftError(UserError):
    """nft refused a command or is not there; the message says which."""


# ------------------------------------------------------------------ running nft

def _binding():
    try:
        import nftables  # python3-nftables (libnftables)
    except ImportError:
        return None
    return nftables


def available() -> str | None:
    """How nft text is applied here: "libnftables", "nft", or None."""
    if _binding() is not None:
        return "libnftables"
    from shutil import which
    return "nft" if which("nft") else None


_context = None  # this process's libnftables context, made on first use
_context_lock = threading.Lock()  # a context is not thread-safe (the metrics server reads counters)


def run(text: str, json_output: bool = False) -> str:
    """Run nft commands (one transaction); their output."""
    global _context
    mod = _binding()
    if mod is not None:
        with _context_lock:
            # One context for the process: freeing one after a transaction
            # that replaced map elements closes its netlink socket, which
            # waits for the kernel to release the old elements (about 20 ms
            # after a health flip at M = 65537) -- time no packet waits for
            # but every update would.
            if _context is None:
                _context = mod.Nftables()
            _context.set_json_output(json_output)
            rc, out, err = _context.cmd(text)
        if rc != 0:
            raise NftError(f"nft: {_first_error(err)}")
        return out
    argv = ["nft"] + (["-j"] if json_output else []) + ["-f", "-"]
    try:
        p = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        raise NftError("nft: not installed (apt-get install nftables python3-nftables)") from None
    if p.returncode != 0:
        raise NftError(f"nft: {_first_error(p.stderr)}")
    return p.stdout


def drift(plan: E.Plan, state_dir: str) -> list[str]:
    """How ``table inet synlb`` differs from ``plan`` (changes nothing): the
    live table's structure by the digest in its base chain's comment, its
    elements by the record of the last apply (listing 65537 slots costs a
    quarter of a second; an element deleted by hand is not seen)."""
    if available() is None:
        return [] if plan.empty else [f"nftables: no nft and no python3-nftables to install {E.QUALIFIED}"]
    live = live_digest()
    if plan.empty:
        return [] if live is None else [f"nftables: unexpected table {E.QUALIFIED} (no service uses the engine)"]
    if live is None:
        return [f"nftables: missing table {E.QUALIFIED}"]
    if live != plan.digest:
        return [f"nftables: table {E.QUALIFIED} is not the configuration's (changed, or not applied)"]
    old, pending = load_state(state_dir)
    if old is None or pending or old != E.applied_of(plan):
        return [f"nftables: the maps of {E.QUALIFIED} are not the configuration's (targets, health or pins "
                "not applied)"]
    return []


def _first_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    # nft prints the error, then the offending line and a caret line: keep the first two
    return " | ".join(ln.strip()[:300] for ln in lines[:2]) or "failed"


_CHAIN_COMMENT = re.compile(r'chain ' + E.BASE_CHAIN + r' \{\s*comment "' + re.escape(E.COMMENT_PREFIX)
                            + r'([0-9a-f]+)"')


def live_digest() -> str | None:
    """The digest in the live table's base chain comment; "" for a table
    without it, None when there is no table."""
    text = run(f"list chains {E.FAMILY}")
    m = re.search(r"^table " + re.escape(E.QUALIFIED) + r" \{\n(.*?)^\}", text, re.M | re.S)
    if m is None:
        return None
    c = _CHAIN_COMMENT.search(m.group(1))
    return c.group(1) if c else ""


# ------------------------------------------------------------------ state

def _state_path(state_dir: str) -> str:
    return statedir.nft_state(state_dir)


def _slots_path(state_dir: str, svc: str) -> str:
    return statedir.nft_slots(state_dir, svc)


def load_state(state_dir: str) -> tuple[E.Applied | None, bool]:
    """(what the live table holds, pending); (None, False) when nothing is recorded."""
    try:
        d = statedir.read_json(_state_path(state_dir))
        applied = E.Applied(d["digest"], d["active"],
                            {s: {int(m): tuple(a) for m, a in t.items()} for s, t in d["targets"].items()},
                            d["pins"], d["configured"])
        return applied, bool(d.get("pending"))
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None, False


def _store_state(state_dir: str, applied: E.Applied, pending: bool) -> None:
    d = {"digest": applied.digest, "active": applied.active,
         "targets": {s: {str(m): list(a) for m, a in t.items()} for s, t in applied.targets.items()},
         "pins": applied.pins, "configured": applied.configured, "pending": pending}
    statedir.write_json(_state_path(state_dir), d)


def load_slots(state_dir: str, svc: str) -> list[int] | None:
    try:
        a = array.array("I")
        a.frombytes(statedir.read_bytes(_slots_path(state_dir, svc)))
        return a.tolist()
    except (FileNotFoundError, ValueError):
        return None


def _store_slots(state_dir: str, svc: str, slots: list[int]) -> None:
    statedir.write_file(_slots_path(state_dir, svc), lambda fh: fh.write(array.array("I", slots).tobytes()))


def _pins_path(state_dir: str, svc: str) -> str:
    return statedir.nft_pins(state_dir, svc)


def load_pins(state_dir: str, svc: str, digest: str | None) -> dict | None:
    """A service's pins as last applied ({family: {key: mark}}), if the record
    is the one of ``digest`` (the state's); None otherwise."""
    try:
        d = statedir.read_json(_pins_path(state_dir, svc))
        if d.get("digest") != digest:
            return None
        return {int(f): {tuple(item[:5]): item[5] for item in items} for f, items in d["pins"].items()}
    except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _store_pins(state_dir: str, sp: E.ServicePlan) -> None:
    statedir.write_json(_pins_path(state_dir, sp.name), {
        "digest": E.pins_digest(sp),
        "pins": {str(f): [[*k, m] for k, m in p.items()] for f, p in sp.pins.items()}})


def clear_state(state_dir: str) -> None:
    for p in [_state_path(state_dir), *statedir.nft_service_files(state_dir)]:
        statedir.remove(p)


# ------------------------------------------------------------------ reconcile

def _ms(t0: float) -> str:
    return f"{(time.monotonic() - t0) * 1000:.0f} ms"


def reconcile(plan: E.Plan, state_dir: str) -> list[str]:
    """Make ``table inet synlb`` hold ``plan``; the changes made."""
    if plan.empty:
        return remove(state_dir)
    t0 = time.monotonic()
    live = live_digest()
    old, pending = load_state(state_dir)
    if old is not None and not pending and live == plan.digest == old.digest:
        try:
            return _update(plan, old, state_dir, t0)
        except NftError as e:  # the kernel is not what the record says: rebuild it whole
            log.warning("nftables: update refused (%s); installing the whole table", e)
            live = live_digest()
    return _install(plan, state_dir, live is not None, t0)


def _install(plan: E.Plan, state_dir: str, replace: bool, t0: float) -> list[str]:
    slots = {n: sp.slots() for n, sp in plan.services.items()}
    script = E.full_script(plan, slots, replace)
    applied = E.applied_of(plan)
    _store_state(state_dir, applied, pending=True)
    t1 = time.monotonic()
    run(script)
    took = _ms(t1)
    for n, s in slots.items():
        _store_slots(state_dir, n, s)
    for sp in plan.services.values():
        _store_pins(state_dir, sp)
    _store_state(state_dir, applied, pending=False)
    total = sum(len(s) for s in slots.values())
    return [f"nftables: {'replaced' if replace else 'installed'} table {E.QUALIFIED} "
            f"({len(plan.services)} services, {total} slots) in one transaction: {took} "
            f"(kernel), {_ms(t0)} in all"]


def _update(plan: E.Plan, old: E.Applied, state_dir: str, t0: float) -> list[str]:
    old_slots: dict = {}
    new_slots: dict = {}
    for n, sp in plan.services.items():
        if [list(a) for a in sp.active] == [list(a) for a in old.active.get(n, [])]:
            continue
        prev = load_slots(state_dir, n)
        if prev is None:
            raise NftError(f"no record of {n}'s slots")
        old_slots[n] = prev
        new_slots[n] = sp.slots()
    repinned = [sp for n, sp in plan.services.items() if E.pins_digest(sp) != old.pins.get(n)]
    old_pins = {sp.name: load_pins(state_dir, sp.name, old.pins.get(sp.name)) for sp in repinned}
    script = E.update_script(old, old_slots, plan, new_slots, old_pins)
    if not script:
        return []
    applied = E.applied_of(plan)
    _store_state(state_dir, applied, pending=True)
    t1 = time.monotonic()
    run(script)
    took = _ms(t1)
    for n, s in new_slots.items():
        _store_slots(state_dir, n, s)
    for sp in repinned:
        _store_pins(state_dir, sp)
    _store_state(state_dir, applied, pending=False)
    changed = {n: E.changed_slots(old_slots[n], new_slots[n]) for n in new_slots}
    what = ", ".join(f"{n}: {c} slots" for n, c in changed.items()) or "targets or pins"
    return [f"nftables: updated {what} in one transaction: {took} (kernel), {_ms(t0)} in all"]


def replace_pins(plan: E.Plan, state_dir: str) -> list[str]:
    """Only the pins of ``plan`` into the live maps (the sync plugin's
    update), by difference from the pins last applied (replacing them whole
    when that is unknown or refused); nothing when the live table is not
    ``plan``'s (the next reconcile installs the pins with the rest)."""
    old, pending = load_state(state_dir)
    if old is None or pending or old.digest != plan.digest:
        return []
    repinned = [sp for n, sp in plan.services.items() if E.pins_digest(sp) != old.pins.get(n)]
    if not repinned:
        return []
    old_pins = {sp.name: load_pins(state_dir, sp.name, old.pins.get(sp.name)) for sp in repinned}
    t0 = time.monotonic()
    try:
        run(E.pins_script(old, plan, old_pins))
    except NftError as e:
        if all(p is None for p in old_pins.values()):
            raise
        log.warning("nftables: pins update refused (%s); replacing them whole", e)
        run(E.pins_script(old, plan))
    for sp in repinned:
        _store_pins(state_dir, sp)
    old.pins = E.applied_of(plan).pins
    _store_state(state_dir, old, pending=False)
    n = sum(len(p) for sp in repinned for p in sp.pins.values())
    return [f"nftables: pins of {', '.join(sp.name for sp in repinned)} in the maps ({n} pins): {_ms(t0)}"]


def remove(state_dir: str | None) -> list[str]:
    """Delete ``table inet synlb`` (all the engine ever installed), if there is one.

    A system where nft cannot even list (no nftables, no nf_tables in the
    kernel) has no table, unless the state dir says one was installed."""
    changes = []
    try:
        live = live_digest() if available() else None
    except NftError:
        if state_dir and load_state(state_dir)[0] is not None:
            raise
        live = None
    if live is not None:
        run(f"delete table {E.QUALIFIED}")
        changes.append(f"nftables: deleted table {E.QUALIFIED}")
    if state_dir:
        clear_state(state_dir)
    return changes


# ------------------------------------------------------------------ counters

def counters() -> dict[str, tuple[int, int]]:
    """The table's named counters: {name: (packets, bytes)}; {} without a table."""
    try:
        out = run(f"list counters table {E.QUALIFIED}", json_output=True)
    except NftError:
        return {}
    found = {}
    for item in json.loads(out or "{}").get("nftables", []):
        c = item.get("counter")
        if c and c.get("table") == E.TABLE:
            found[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return found
