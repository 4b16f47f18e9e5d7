"""bgp: announce the VIP prefixes through FRR while this router can serve them.

A service's VIP prefixes are announced while

- the node is active (standalone: always; with ``[vrrp]``: MASTER only, so
  that the upstream follows the master: announcing from a hot-standby backup
  would make the pair active-active);
- the data plane is ready: installed for the configuration the host runs
  (``applied.json`` carries its digest) and a worker listens on every queue
  of the service;
- at least one of the service's targets is healthy (not in the health
  plugin's down set).

Otherwise they are withdrawn. synlb never speaks BGP: it adds and removes
``network PREFIX`` lines under bgpd's ``router bgp ASN`` (``address-family
ipv4 unicast`` / ``ipv6 unicast``) with ``vtysh -c``, runtime state only
(never written to frr.conf: a router whose synlb does not run announces
nothing after an FRR restart). Why vtysh rather than a kernel route that
FRR redistributes: synlb's data plane owns every route of its
``route_protocol`` and reconciles them away, a route of another protocol in
the main table would change how the router forwards unmarked VIP packets,
and ``redistribute`` needs a route-map in the admin's FRR config to keep it
to the VIPs. ``network`` lines change nothing in the kernel, FRR announces
them exactly as listed (``no bgp network import-check`` in bgpd's config:
there is no route to the VIP on the router), and the state is read back
with ``show running-config bgpd``. Lines synlb did not add (other prefixes)
are never touched, and ``router bgp ASN`` is never created: bgpd's config
must have it (with its neighbors, BFD, ...).

Order: before any plugin reconciles, ``prepare`` withdraws what the coming
state no longer wants (node going inactive, a service removed, its last
target down) and, when the data plane goes with it, waits ``drain``
seconds so that the upstream has moved the flows to the other routers
before the chains go. On host stop the same happens before any teardown.
Announcing happens after the data plane is up: in ``reconcile`` (plugins
after lb) and from the plugin's own watch, every :data:`POLL` seconds, which
also follows the health plugin's down set and workers that die, and
compares FRR's state with the wanted one every ``refresh`` seconds (a
restarted bgpd is re-told within that time).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time

from ..schema import REQUIRED, Option, OptionError, Schema, seconds
from ..schema import integer as _int
from . import Plugin, PluginError

log = logging.getLogger("synlb.bgp")

POLL = 0.2           # seconds between two looks at the local readiness (data plane, down set)
PEERS_EVERY = 5.0    # seconds between two readings of bgpd's neighbors (status only)
KEEP_OUTPUT = 4000   # bytes of vtysh output kept for an error message
AFI = {4: "ipv4", 6: "ipv6"}


def _abs(text: str) -> str:
    t = text.strip()
    if not t.startswith("/") or any(c.isspace() for c in t):
        raise OptionError(f"{text!r} is not an absolute path")
    return t


BGP_OPTIONS = Schema("bgp", [
    Option("asn", _int(1, 4294967295), REQUIRED,
           "AS number of bgpd's `router bgp ASN` (which must exist in its config); synlb adds and "
           "removes `network` lines for the VIPs under it"),
    Option("vtysh", _abs, "/usr/bin/vtysh", "FRR's vtysh (root-owned, like every executable synlb runs)"),
    Option("vty_socket", _abs, None,
           "directory of the daemons' vty sockets (vtysh --vty_socket); default FRR's own"),
    Option("drain", seconds(0, 30), 0.5,
           "seconds between a withdrawal and taking the data plane down (host stop, going inactive): "
           "time for the upstream to move the flows"),
    Option("refresh", seconds(0.2, 3600), 5.0,
           "seconds between two comparisons of FRR's announcements with the wanted ones"),
    Option("timeout", seconds(0.1, 30), 2.0, "seconds one vtysh call may take"),
])
SECTIONS = {"bgp": BGP_OPTIONS}


# ------------------------------------------------------------------ pure parts

def wanted(cfg, node, ready: dict, down: dict) -> tuple[set, dict]:
    """The prefixes to announce, and why each other service's are not.

    ``ready``: {service: why not ready, or None}; ``down``: {service: set of
    targets down}. Returns ({ip_network}, {service: reason}).
    """
    out: set = set()
    why: dict = {}
    if not node.active:
        reason = f"node {node.vrrp} is not active"
    elif cfg.vrrp is not None and node.vrrp != "MASTER":
        reason = f"node {node.vrrp}: with [vrrp], only the master announces"
    else:
        reason = None
    for svc in cfg.services:
        if reason is not None:
            why[svc.name] = reason
            continue
        if ready.get(svc.name):
            why[svc.name] = ready[svc.name]
            continue
        up = [t for t in svc.target_names if t not in down.get(svc.name, set())]
        if not up:
            why[svc.name] = "no healthy target"
            continue
        out.update(svc.vips)
    return out, why


def managed(cfg) -> set:
    """Every prefix synlb may add or remove: the services' VIPs."""
    return {v for s in cfg.services for v in s.vips}


_ROUTER = re.compile(r"^router bgp (\d+)\s*$")
_AF = re.compile(r"^\s*address-family (ipv4|ipv6) unicast\s*$")
_NETWORK = re.compile(r"^\s*network (\S+)(\s.*)?$")


def parse_running(text: str, asn: int) -> set | None:
    """The ``network`` prefixes under ``router bgp ASN`` (default VRF) in
    ``show running-config`` text; None when there is no such router."""
    found = False
    inside = False
    af = None
    nets: set = set()
    for line in text.splitlines():
        m = _ROUTER.match(line)
        if m:
            inside = int(m.group(1)) == asn
            found = found or inside
            af = None
            continue
        if line.startswith("router ") or line.strip() == "exit" and not line.startswith(" "):
            inside, af = False, None
            continue
        if not inside:
            continue
        m = _AF.match(line)
        if m:
            af = m.group(1)
            continue
        if line.strip() == "exit-address-family":
            af = None
            continue
        m = _NETWORK.match(line)
        if m and af is not None:
            try:
                net = ipaddress.ip_network(m.group(1), strict=False)
            except ValueError:
                continue
            if AFI[net.version] == af:
                nets.add(net)
    return nets if found else None


def commands(asn: int, add: set, remove: set) -> list[str]:
    """vtysh ``-c`` commands that add ``add`` and remove ``remove``."""
    cmds = ["configure terminal", f"router bgp {asn}"]
    for fam in (4, 6):
        a = sorted(str(n) for n in add if n.version == fam)
        r = sorted(str(n) for n in remove if n.version == fam)
        if not a and not r:
            continue
        cmds.append(f"address-family {AFI[fam]} unicast")
        cmds += [f"network {n}" for n in a] + [f"no network {n}" for n in r]
        cmds.append("exit-address-family")
    return cmds + ["end"]


def peers_summary(data: dict) -> dict:
    """``show bgp summary json`` -> {afi: {peer: state}}."""
    out: dict = {}
    for afi, body in (data or {}).items():
        if isinstance(body, dict) and isinstance(body.get("peers"), dict):
            out[afi] = {p: v.get("state", "?") for p, v in body["peers"].items() if isinstance(v, dict)}
    return out


class VtyshError(RuntimeError):
    pass


# ------------------------------------------------------------------ the plugin

class BgpPlugin(Plugin):
    name = "bgp"

    def __init__(self, host):
        super().__init__(host)
        self._lock = threading.RLock()  # FRR calls and our state: the host thread and the watch
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._exe: str | None = None
        self.announced: set = set()      # what FRR had after our last call (ours only)
        self.want: set = set()
        self.why: dict = {}              # service -> why not announced
        self.error: str | None = None    # the last FRR call's failure
        self.last_check: float | None = None
        self.changed_at: float | None = None
        self.events: list[dict] = []     # announcements and withdrawals, newest last
        self.peers: dict = {}
        self._peers_at = 0.0
        self._checked_at = float("-inf")  # monotonic
        self._withdrawn_at = float("-inf")  # monotonic
        self._stopping = False
        self._installed: set = set()  # services the data plane was installed with

    # ------------------------------------------------------------ host API
    def start(self) -> None:
        from .. import trust
        opts = self._opts(self.host.cfg)
        exe, why = trust.trusted(opts["vtysh"])
        if why:
            raise PluginError(f"[bgp] vtysh = {opts['vtysh']}: {why}")
        self._exe = exe
        if self.host.cfg.vrrp is None:
            nat = [s.name for s in self.host.cfg.services if s.mode == "nat"]
            if nat:
                raise PluginError(f"service {', '.join(nat)}: mode = nat needs the replies through the router "
                                  "that translated the connection, which active-active behind ECMP (no [vrrp]) "
                                  "does not give (docs/ACTIVE-ACTIVE.md); use mode = route")
        try:  # FRR may start after synlb (boot): then the watch keeps trying
            with self._lock:
                self._sync(self.host.cfg)
        except VtyshError as e:
            log.warning("bgp: FRR not reachable yet: %s", e)
        self._thread = threading.Thread(target=self._watch, name="bgp-watch", daemon=True)
        self._thread.start()

    def prepare(self, cfg, node) -> list[str]:
        """Withdraw what the coming state does not want, before the data plane
        follows it; drain when the data plane is going away."""
        with self._lock:
            keep, _ = wanted(cfg, node, {}, self._down(cfg))
            drop = self.announced - keep
            changes = []
            if drop:
                changes = self._withdraw(cfg, drop, f"{node.reason}: {self._reason(cfg, node)}")
            going = not node.active or any(v not in managed(cfg) for v in drop)
            # the watch may have withdrawn a moment ago (it follows the node
            # too): the drain counts from the last withdrawal, whoever made it
            since = time.monotonic() - self._withdrawn_at
        if going and since < self._opts(cfg)["drain"]:
            self._drain(cfg, since)
        return changes

    def reconcile(self, cfg, node) -> list[str]:
        with self._lock:
            return self._sync(cfg, node)

    def teardown(self) -> list[str]:
        cfg = self.host.cfg
        with self._lock:
            self._stopping = True  # the watch changes nothing from now on
            if not self.announced:
                return []
            changes = self._withdraw(cfg, set(self.announced), "host stop")
        self._drain(cfg)
        return changes

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def status(self) -> dict:
        with self._lock:
            ann = sorted(map(str, self.announced), key=_sort_key)
            if self.error:
                state = f"FRR FAILING: {self.error}; "
            else:
                state = ""
            withheld = {s: w for s, w in self.why.items()}
            summary = state + (f"announced {', '.join(ann)}" if ann else "nothing announced")
            if withheld:
                summary += "; withdrawn: " + "; ".join(f"{s}: {w}" for s, w in sorted(withheld.items()))
            established = sum(1 for af in self.peers.values() for st in af.values() if st == "Established")
            total = sum(len(af) for af in self.peers.values())
            if total:
                summary += f"; {established}/{total} BGP sessions established"
            return {"summary": summary, "announced": ann,
                    "wanted": sorted(map(str, self.want), key=_sort_key),
                    "withdrawn": withheld, "error": self.error, "last_check": self.last_check,
                    "changed_at": self.changed_at, "events": self.events[-20:], "peers": self.peers,
                    "managed": sorted(map(str, managed(self.host.cfg)), key=_sort_key)}

    # ------------------------------------------------------------ options, readiness
    @staticmethod
    def _opts(cfg) -> dict:
        opts = cfg.extra.get("bgp")
        if opts is None:
            raise PluginError("the bgp plugin needs a [bgp] section (asn = ...)")
        return opts

    @staticmethod
    def _down(cfg) -> dict:
        from .. import health_state
        return {s.name: health_state.down_targets(cfg.globals.state_dir, s.name) for s in cfg.services}

    def _ready(self, cfg) -> dict:
        """{service: why its data plane is not ready, or None}.

        A service is ready once the data plane was installed for a
        configuration that has it (``applied.json`` carrying that
        configuration's digest) and while a worker listens on each of its
        queues. During a reload (the host runs the new configuration, the
        data plane is not at it yet) the services it had stay ready: their
        chains are there, and withdrawing every router's VIPs at once for a
        reload would leave the upstream without a route."""
        from .. import dataplane, workers
        ap = dataplane.applied(cfg.globals.state_dir)
        if ap is None:
            self._installed = set()
            return {s.name: "data plane not installed" for s in cfg.services}
        if ap.get("digest") == cfg.digest():
            self._installed = {s.name for s in cfg.services}
        bound = workers.bound_queues()
        out = {}
        for s in cfg.services:
            missing = [q for q in s.queues if q not in bound]
            if s.name not in self._installed:
                out[s.name] = "data plane not yet installed for it"
            elif missing:
                out[s.name] = f"no worker on queue {','.join(map(str, missing))}"
            else:
                out[s.name] = None
        return out

    def _reason(self, cfg, node) -> str:
        _, why = wanted(cfg, node, {}, self._down(cfg))
        return "; ".join(f"{s}: {w}" for s, w in sorted(why.items())) or "prefix no longer configured"

    # ------------------------------------------------------------ FRR
    def _vtysh(self, cfg, *cmds: str) -> str:
        from .. import proc
        opts = self._opts(cfg)
        if self._exe is None:
            raise VtyshError("vtysh not checked yet")
        argv = [self._exe]
        if opts.get("vty_socket"):
            argv += ["--vty_socket", opts["vty_socket"]]
        for c in cmds:
            argv += ["-c", c]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VTYSH_PAGER": "cat", "HOME": "/"}
        try:
            done = proc.run(argv, env, opts["timeout"], keep=KEEP_OUTPUT)
        except OSError as e:
            raise VtyshError(f"{self._exe}: {e.strerror or e}") from None
        text = done.output.decode("utf-8", "replace")
        if done.rc is None:
            raise VtyshError(f"vtysh timed out after {opts['timeout']:g} s")
        if done.rc != 0:
            last = [ln for ln in text.strip().splitlines() if ln.strip()]
            raise VtyshError(f"vtysh exit {done.rc}: {last[-1] if last else 'no output'}")
        return text

    def _read(self, cfg) -> set:
        asn = self._opts(cfg)["asn"]
        text = self._vtysh(cfg, "show running-config bgpd")
        nets = parse_running(text, asn)
        if nets is None:
            raise VtyshError(f"bgpd has no `router bgp {asn}` ([bgp] asn); synlb never creates it")
        return nets

    def _apply(self, cfg, add: set, remove: set) -> set:
        """Change FRR, read it back; returns our prefixes FRR now has."""
        self._vtysh(cfg, *commands(self._opts(cfg)["asn"], add, remove))
        return self._read(cfg) & (managed(cfg) | self.announced | add | remove)

    def _record(self, before: set, after: set, reason: str) -> list[str]:
        changes = []
        now = time.time()
        for n in sorted(after - before, key=_net_key):
            changes.append(f"announced {n}")
            self.events.append({"time": now, "prefix": str(n), "action": "announce", "reason": reason})
        if before - after:
            self._withdrawn_at = time.monotonic()
        for n in sorted(before - after, key=_net_key):
            changes.append(f"withdrawn {n} ({reason})")
            self.events.append({"time": now, "prefix": str(n), "action": "withdraw", "reason": reason})
        self.events = self.events[-50:]
        if changes:
            self.changed_at = now
            for c in changes:
                log.info("bgp: %s", c)
        return changes

    def _withdraw(self, cfg, drop: set, reason: str) -> list[str]:
        before = set(self.announced)
        try:
            now = self._apply(cfg, set(), drop)
            self.error = None
        except VtyshError as e:
            self.error = str(e)
            log.error("bgp: withdrawing %s failed: %s", ", ".join(map(str, sorted(drop, key=_net_key))), e)
            raise
        self.announced = now
        self.want -= drop
        return self._record(before, now, reason)

    def _drain(self, cfg, elapsed: float = 0.0) -> None:
        d = self._opts(cfg)["drain"] - elapsed
        if d > 0:
            log.info("bgp: waiting %.3g s for the upstream to move the flows", d)
            time.sleep(d)

    def _sync(self, cfg, node=None) -> list[str]:
        """Make FRR announce exactly what is wanted now (caller holds the lock)."""
        node = node or self.host.node
        want, why = wanted(cfg, node, self._ready(cfg), self._down(cfg))
        self.want, self.why = want, why
        ours = managed(cfg) | self.announced
        try:
            current = self._read(cfg) & ours
            add, remove = want - current, (current & ours) - want
            after = self._apply(cfg, add, remove) if add or remove else current
            self.error = None
        except VtyshError as e:
            if self.error != str(e):
                log.error("bgp: %s", e)
            self.error = str(e)
            raise
        finally:
            self.last_check = time.time()
            self._checked_at = time.monotonic()
        before = self.announced
        self.announced = after
        reason = "ready" if add else "; ".join(f"{s}: {w}" for s, w in sorted(why.items())) or "not wanted"
        return self._record(before, after, reason) if (add or remove or before != after) else []

    def _watch(self) -> None:
        last_want = None
        while not self._stop.wait(POLL):
            cfg = self.host.cfg
            try:
                opts = self._opts(cfg)
                with self._lock:
                    if self._stopping:
                        return
                    want, _ = wanted(cfg, self.host.node, self._ready(cfg), self._down(cfg))
                    due = time.monotonic() - self._checked_at >= opts["refresh"]
                    if want != last_want or due:  # a local change at once; FRR's state every refresh
                        last_want = want
                        self._sync(cfg)
                if time.monotonic() - self._peers_at >= PEERS_EVERY:
                    self._read_peers(cfg)
            except (VtyshError, PluginError):
                continue  # recorded in status; tried again next round
            except Exception:  # noqa: BLE001 - the watch must survive anything
                log.exception("bgp: watch round failed")

    def _read_peers(self, cfg) -> None:
        import json
        self._peers_at = time.monotonic()
        try:
            data = json.loads(self._vtysh(cfg, "show bgp summary json") or "{}")
        except (VtyshError, ValueError):
            return
        with self._lock:
            self.peers = peers_summary(data)


def _net_key(n) -> tuple:
    return (n.version, int(n.network_address), n.prefixlen)


def _sort_key(text: str) -> tuple:
    return _net_key(ipaddress.ip_network(text))


def create(host) -> BgpPlugin:
    return BgpPlugin(host)
