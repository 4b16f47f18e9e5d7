"""sync: hand this router's misplaced connections to its peers as pins, and
follow theirs (see pins.py and docs/STICKINESS.md); for the nftables engine
the pins go into the kernel's pins maps too (docs/ENGINES.md).

Every ``refresh`` seconds, and at once (then again a second later) when a
service's table changes or this router becomes active, the plugin reads
synlb's conntrack entries, keeps those whose mark the configured table
(every configured target, whatever the health checks say) would not give
them (``pins.misplaced``) and exchanges them with every peer: one
TCP connection per peer, our pins one way, theirs the other, each message
authenticated with HMAC-SHA256 under the key in ``key_file``.  What the
peers sent is merged into the state dir's pins file and the workers are
told to re-read it; a worker follows a pin for a packet that does not open
a connection, so a connection picked up after a failover (or an ECMP
change) goes back to the target it has been talking to.

A peer's pins are kept until that peer sends new ones: when a router dies,
the pins it published are exactly what the survivors need.

    [sync]
    listen = 10.0.2.1        ; this router's address on the link to its peers
    peers = 10.0.2.2         ; the other routers' listen addresses
    key_file = /etc/synlb/sync.key
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import stat
import threading
import time

from .. import pins as pins_mod
from ..schema import REQUIRED, Option, OptionError, Schema
from ..schema import integer as _int
from ..schema import seconds
from ..schema import words as _words
from . import Plugin, PluginError, Wakeup

log = logging.getLogger("synlb.sync")

DEFAULT_PORT = 9714
AGAIN_AFTER = 1.0  # a second exchange after a change: catches SYNs the old table marked meanwhile


def _address(text: str):
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise OptionError(f"{text!r} is not an IP address") from None


def _addresses(text: str) -> tuple:
    items = _words(text)
    if not items:
        raise OptionError("at least one peer address is required")
    addrs = tuple(_address(i) for i in items)
    if len(set(addrs)) != len(addrs):
        raise OptionError("a peer is listed twice")
    return addrs


def _abs_path(text: str) -> str:
    t = text.strip()
    if not t.startswith("/"):
        raise OptionError(f"{text!r} is not an absolute path")
    return t


def _check(parsed: dict) -> list[tuple[str, str]]:
    out = []
    listen, peers = parsed.get("listen"), parsed.get("peers")
    if listen is not None and peers:
        if listen in peers:
            out.append(("peers", f"{listen} is this router's own listen address"))
        if any(p.version != listen.version for p in peers):
            out.append(("peers", f"every peer must be IPv{listen.version}, like listen"))
    return out


SYNC_OPTIONS = Schema("sync", [
    Option("listen", _address, REQUIRED, "this router's address for its peers"),
    Option("port", _int(1, 65535), DEFAULT_PORT, "TCP port of the exchange, the same on every router"),
    Option("peers", _addresses, REQUIRED, "the other routers' listen addresses"),
    Option("key_file", _abs_path, REQUIRED,
           "file with the shared secret (at least 16 bytes; root-owned, mode 0600)"),
    Option("refresh", seconds(0.5, 3600), 5.0,
           "seconds between two exchanges when nothing changed"),
    Option("timeout", seconds(0.1, 30), 1.0, "seconds an exchange with one peer may take"),
], checks=[_check])
SECTIONS = {"sync": SYNC_OPTIONS}


def read_key(path: str) -> bytes:
    """The shared secret; PluginError unless the file is safe to trust."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PluginError(f"{path}: no such key file ([sync] key_file)") from None
    if not stat.S_ISREG(st.st_mode):
        raise PluginError(f"{path}: not a regular file ([sync] key_file)")
    if os.geteuid() == 0 and st.st_uid != 0:
        raise PluginError(f"{path}: not owned by root ([sync] key_file)")
    if st.st_mode & 0o077:
        raise PluginError(f"{path}: readable or writable by group or others; chmod 600 ([sync] key_file)")
    with open(path, "rb") as fh:
        key = fh.read().strip()
    if len(key) < pins_mod.MIN_KEY_BYTES:
        raise PluginError(f"{path}: the key has {len(key)} bytes, at least {pins_mod.MIN_KEY_BYTES} "
                          f"are needed ([sync] key_file)")
    return key


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("peer too slow")
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection early")
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket, key: bytes, timeout: float) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    header = _recv_exact(sock, pins_mod.HEADER_BYTES, deadline)
    n = pins_mod.body_length(header)
    rest = _recv_exact(sock, n + pins_mod.MAC_BYTES, deadline)
    return pins_mod.decode(header + rest, key)


class PeerState:
    def __init__(self) -> None:
        self.pins: pins_mod.Pins = {}
        self.seq = 0  # the newest seq accepted from this peer
        self.last_ok: float | None = None
        self.error: str | None = None  # why our last exchange with it failed
        self.refused: str | None = None  # why we last refused a message from it
        self.stale = 0  # messages dropped for being older than one already accepted
        self.crossed = 0  # our message dropped by the peer as older than one it got from us since
        self.exchanges = 0


class SyncPlugin(Plugin):
    name = "sync"

    def __init__(self, host):
        super().__init__(host)
        self._lock = threading.Lock()  # peers, own pins, the pins file
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._apply_wanted = threading.Event()
        self._server_wakeup: Wakeup | None = None
        self._threads: list[threading.Thread] = []
        self._server: socket.socket | None = None
        self._key = b""
        self._seq = 0
        self._own: pins_mod.Pins = {}
        self._own_at: float | None = None
        self._peers: dict[str, PeerState] = {}
        self._previous: pins_mod.Pins = {}  # the pins file found at start, until every peer spoke
        self._written: pins_mod.Pins | None = None
        self._due: list[float] = []  # monotonic times of exchanges asked for
        self._opts: dict = {}
        self._signature = None
        self._active = False

    # ------------------------------------------------------------ host API
    def start(self) -> None:
        opts = self._opts = self._options(self.host.cfg)
        self._key = read_key(opts["key_file"])
        listen = opts["listen"]
        family = socket.AF_INET6 if listen.version == 6 else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((str(listen), opts["port"]))
        except OSError as e:
            srv.close()
            raise PluginError(f"[sync] listen = {listen} port {opts['port']}: {e.strerror}") from None
        srv.listen(16)
        self._server = srv
        self._server_wakeup = Wakeup()
        from .. import pins_state
        try:
            self._previous = pins_state.load(self.host.cfg.globals.state_dir)
        except pins_state.PinsError as e:
            log.warning("sync: old pins file ignored: %s", e)
        self._peers = {str(p): PeerState() for p in opts["peers"]}
        self._due = [time.monotonic()]  # a first exchange at once: peers' pins reach us at start
        self._apply_wanted.set()  # the pins file found, held until every peer spoke
        for target in (self._serve, self._publish_loop, self._apply_loop):
            t = threading.Thread(target=target, name=f"sync-{target.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("sync: listening on %s port %d, peers %s", listen, opts["port"],
                 ", ".join(self._peers))

    def reconcile(self, cfg, node) -> list[str]:
        from .. import health_state
        state_dir = cfg.globals.state_dir
        down = health_state.down_sets(state_dir, [s.name for s in cfg.services])
        signature = (cfg.digest(), tuple(sorted((n, tuple(sorted(d))) for n, d in down.items())))
        changes = []
        with self._lock:
            self._opts = self._options(cfg)
            peers = {str(p) for p in self._opts["peers"]}
            for p in peers - set(self._peers):
                self._peers[p] = PeerState()
            for p in set(self._peers) - peers:
                del self._peers[p]
                self._apply_wanted.set()  # its pins are no longer held
            changed = signature != self._signature or node.active != self._active
            self._signature, self._active = signature, node.active
            if changed:
                now = time.monotonic()
                self._due = sorted(self._due + [now, now + AGAIN_AFTER])
                changes.append("tables or state changed: exchanging pins with peers")
        self._wake.set()
        # the workers may have been restarted by the lb plugin: they read the
        # pins file themselves at start, so nothing more to do for them here
        return changes

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._apply_wanted.set()
        if self._server_wakeup is not None:
            self._server_wakeup.poke()
        for t in self._threads:
            t.join(2.0)
        if self._server is not None:
            self._server.close()
        if self._server_wakeup is not None and not any(t.is_alive() for t in self._threads):
            self._server_wakeup.close()

    def status(self) -> dict:
        with self._lock:
            bad = [f"{p}: {st.error}" for p, st in sorted(self._peers.items()) if st.error]
            summary = (f"{pins_mod.count(self._own)} own pins handed to {len(self._peers)} peers, "
                       f"{pins_mod.count(self._written or {})} held from them"
                       + (f"; FAILING {'; '.join(bad)}" if bad else ""))
            return {"summary": summary, "own_pins": pins_mod.count(self._own), "own_at": self._own_at,
                    "own_digest": pins_mod.digest(self._own),
                    "held_pins": pins_mod.count(self._written or {}),
                    "peers": {p: {"pins": pins_mod.count(s.pins), "digest": pins_mod.digest(s.pins),
                                  "last_ok": s.last_ok, "exchanges": s.exchanges, "stale": s.stale,
                                  "crossed": s.crossed,
                                  "error": s.error, "refused": s.refused}
                              for p, s in sorted(self._peers.items())}}

    # ------------------------------------------------------------ our pins
    @staticmethod
    def _options(cfg) -> dict:
        opts = cfg.extra.get("sync")
        if opts is None:
            raise PluginError("the sync plugin needs a [sync] section")
        return opts

    def _compute_own(self) -> pins_mod.Pins:
        from .. import conntrack
        cfg = self.host.cfg
        return pins_mod.misplaced(cfg, conntrack.dump(cfg.service_marks()))

    def _next_seq(self) -> int:
        self._seq = max(time.time_ns(), self._seq + 1)
        return self._seq

    def _publish_loop(self) -> None:
        next_refresh = 0.0
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                run = now >= next_refresh or any(t <= now for t in self._due)
                if run:
                    self._due = [t for t in self._due if t > now]
                    next_refresh = now + self._opts["refresh"]
                wait = min([next_refresh - now] + [t - now for t in self._due])
            if run:
                self.exchange_all()
                continue
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def exchange_all(self) -> None:
        """Work out our pins, and trade them with every peer."""
        try:
            own = self._compute_own()
        except Exception as e:  # noqa: BLE001 - a failed dump must not stop the exchange loop
            log.error("sync: conntrack not read, sending the last pins: %s", e)
            own = self._own
        with self._lock:
            self._own, self._own_at = own, time.time()
            peers = list(self._peers)
        # one thread per peer: an unreachable peer costs the others nothing
        # (each exchange is bounded by [sync] timeout)
        threads = [threading.Thread(target=self._exchange, args=(p,), name=f"sync-to-{p}", daemon=True)
                   for p in peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _exchange(self, peer: str) -> None:
        self._send(peer, *self._message_for(peer))

    def _message_for(self, peer: str) -> tuple[bytes, int]:
        """Our pins for ``peer``, and how many of its messages we had accepted
        when they were signed."""
        with self._lock:
            st = self._peers.get(peer)
            return pins_mod.encode(self._own, self._next_seq(), self._key), st.exchanges if st else 0

    def _send(self, peer: str, message: bytes, accepted_before: int) -> None:
        with self._lock:
            opts = self._opts
        try:
            with socket.create_connection((peer, opts["port"]), timeout=opts["timeout"],
                                          source_address=(str(opts["listen"]), 0)) as sock:
                sock.sendall(message)
                seq, theirs = read_message(sock, self._key, opts["timeout"])
        except ConnectionError as e:
            if not self._crossed(peer, accepted_before):
                self._record_error(peer, e)
            return
        except (OSError, pins_mod.PinsError) as e:
            self._record_error(peer, e)
            return
        self._accept(peer, seq, theirs)

    def _crossed(self, peer: str, accepted_before: int) -> bool:
        """A peer closes without a reply when our message is older than one
        it already holds from us. That happens when both push at once and our
        reply to its push overtakes this message: it then has our newer pins,
        and we have just accepted its message, so the exchange worked."""
        with self._lock:
            st = self._peers.get(peer)
            if st is None or st.exchanges == accepted_before:
                return False
            st.crossed += 1
        log.debug("sync: %s: our message crossed its own and was dropped as older", peer)
        return True

    # ------------------------------------------------------------ their pins
    def _serve(self) -> None:
        srv = self._server
        while not self._stop.is_set():
            r, _, _ = select.select([srv, self._server_wakeup], [], [])
            if srv not in r:
                continue
            try:
                sock, addr = srv.accept()
            except OSError:
                continue
            with sock:
                self._handle(sock, addr[0])

    def _handle(self, sock: socket.socket, addr: str) -> None:
        peer = _canonical(addr)
        with self._lock:
            known = peer in self._peers
        if not known:
            log.warning("sync: connection from %s refused: not a [sync] peer", addr)
            return
        opts = self._opts
        try:
            seq, theirs = read_message(sock, self._key, opts["timeout"])
        except (OSError, pins_mod.PinsError) as e:
            self._record_refusal(peer, e)
            return
        if self._accept(peer, seq, theirs):
            with self._lock:
                reply = pins_mod.encode(self._own, self._next_seq(), self._key)
            try:
                sock.settimeout(opts["timeout"])
                sock.sendall(reply)
            except OSError as e:
                self._record_error(peer, e)

    def _accept(self, peer: str, seq: int, theirs: pins_mod.Pins) -> bool:
        with self._lock:
            st = self._peers.get(peer)
            if st is None:
                return False
            if seq <= st.seq:
                # Two exchanges with a peer can cross (its push and its reply
                # to ours): the older one arriving second is dropped, and a
                # replayed message the same way.
                st.stale += 1
                log.debug("sync: %s: message %d older than %d, dropped", peer, seq, st.seq)
                return False
            st.seq, st.pins, st.last_ok, st.error = seq, theirs, time.time(), None
            st.exchanges += 1
            if all(s.last_ok is not None for s in self._peers.values()):
                self._previous = {}
        # applied by a thread of its own, not by the server or the exchange:
        # the apply waits for the disk and for the data plane's lock (a
        # reconcile may hold it for a second), and the next peer's push must
        # not wait for it past its timeout
        self._apply_wanted.set()
        return True

    def _record_refusal(self, peer: str, e: Exception) -> None:
        with self._lock:
            st = self._peers.get(peer)
            if st is not None:
                st.refused = str(e) or type(e).__name__
        log.warning("sync: message from %s refused: %s", peer, e)

    def _record_error(self, peer: str, e: Exception) -> None:
        with self._lock:
            st = self._peers.get(peer)
            if st is not None:
                if st.error != str(e):
                    log.warning("sync: exchange with %s failed: %s", peer, e)
                st.error = str(e) or type(e).__name__

    def _apply_loop(self) -> None:
        while True:
            self._apply_wanted.wait()
            if self._stop.is_set():
                return
            self._apply_wanted.clear()
            self._apply()

    def _apply(self) -> None:
        """Write the merged pins and tell the workers, when they changed; the
        nftables engine's pins maps get them in one transaction."""
        from .. import dataplane, pins_state, statedir, workers
        cfg = self.host.cfg
        state_dir = cfg.globals.state_dir
        with self._lock:
            merged = pins_mod.merge(self._previous, *(s.pins for _, s in sorted(self._peers.items())))
            if merged == self._written:
                return
            try:
                statedir.ensure(state_dir)
                pins_state.write(state_dir, merged)
            except (OSError, statedir.StateDirError) as e:  # the next exchange tries again
                log.error("sync: pins file not written: %s", e)
                return
            self._written = merged
        n = workers.reload_pins(state_dir)
        try:
            kernel = dataplane.apply_pins(cfg)
        except Exception as e:  # noqa: BLE001 - the next reconcile installs them with the table
            log.error("sync: pins not written to the nftables maps: %s", e)
            kernel = []
        log.info("sync: %d pins held from peers, %d workers told%s", pins_mod.count(merged), n,
                 "".join(f"; {c}" for c in kernel))


def _canonical(addr: str) -> str:
    a = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(a)


def create(host) -> SyncPlugin:
    return SyncPlugin(host)
