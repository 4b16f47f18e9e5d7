"""The netns lab: ``with Lab(routers=2) as lab: ...``.

Namespaces (``<prefix>-<role>``, prefix ``sl`` + 4 hex chars): ``sw`` (two
bridges ``front`` and ``back``), ``client``, ``lb1`` [``lb2``], ``t1``..``tN``.
Addresses per synlb_lab.addresses (binding table in docs/ARCHITECTURE.md).
Nothing is added to the root namespace: veth pairs are created inside the
switch namespace with their peer directly in the host namespace.

Files (configs, logs, pid files, sockets) live in /run/synlb-lab/<prefix>/;
``lab.json`` there lets ``synlb-lab cleanup`` remove a lab whose owner died.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import weakref
from typing import Any, Mapping, Sequence

from . import addresses as A
from . import keepalived as K
from . import nginx as N
from .netns import (REGISTRY_DIR, LabError, ProcessTracker, Tracked, delete_netns,
                    ip_binary, list_netns, netns_exec_argv, owner_token, run_cmd,
                    synlb_lab_exe, write_registry)

_LIVE: "weakref.WeakSet[Lab]" = weakref.WeakSet()


@atexit.register
def _close_live_labs() -> None:  # safety net; normal path is the context manager
    for lab in list(_LIVE):
        try:
            lab.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# every namespace of a lab: no DAD wait for IPv6 addresses, no reverse-path filter
BASE_SYSCTLS = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}

class Lab:
    """A client, 1-2 routers and N targets in network namespaces.

    ``servers``: start the test server (``synlb-lab server``) in every
    target on ``server_ports``. ``keepalived`` (2 routers only): start
    keepalived on both routers and wait for lb1 MASTER (``True`` or a dict
    of :func:`synlb_lab.keepalived.render_keepalived_conf` keywords);
    default off, call :meth:`start_keepalived` yourself to pass hooks.
    Without keepalived a 2-router lab has no client/target gateway.
    """

    def __init__(self, routers: int = 1, targets: int = 3, *, servers: bool = True,
                 server_ports: Sequence[int] = (80, 8080),
                 keepalived: bool | Mapping[str, Any] = False,
                 keep_files: bool = False, prefix: str | None = None):
        if routers not in (1, 2):
            raise ValueError("routers must be 1 or 2")
        if not 1 <= targets <= A.MAX_TARGETS:
            raise ValueError(f"targets must be 1..{A.MAX_TARGETS}")
        if keepalived and routers != 2:
            raise ValueError("keepalived needs routers=2")
        self.nrouters = routers
        self.ntargets = targets
        self.routers = [f"lb{i}" for i in range(1, routers + 1)]
        self.targets = [f"t{k}" for k in range(1, targets + 1)]
        self.roles = ["sw", "client", *self.routers, *self.targets]
        self._want_servers = servers
        self.server_ports = list(server_ports)
        self._want_keepalived = keepalived
        self.keep_files = keep_files or os.environ.get("SYNLB_LAB_KEEP") == "1"
        self._prefix_req = prefix
        self.prefix = ""
        self.dir = ""
        self._namespaces: list[str] = []
        self.procs = ProcessTracker()
        self._k: dict[str, dict] = {r: {} for r in self.routers}
        self.servers: dict[str, subprocess.Popen] = {}
        self.nginx: dict[str, subprocess.Popen] = {}
        self._closed = False
        self._started = False
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Lab":
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        t0 = time.monotonic()
        try:
            self._alloc_prefix()
            self._build()
            self.timings["topology"] = time.monotonic() - t0
            if self._want_servers:
                self.start_servers(self.server_ports)
            if self._want_keepalived:
                kw = self._want_keepalived if isinstance(self._want_keepalived, Mapping) else {}
                self.start_keepalived(**kw)
        except BaseException:
            self.close()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Stop every process we started (by pid), delete the namespaces,
        remove the lab directory. Idempotent; safe after partial start."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        old = signal.getsignal(signal.SIGINT) if _main_thread() else None
        if old is not None:  # do not let a second ^C interrupt the teardown
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            try:
                self.procs.stop_all(timeout=3.0)
            finally:
                for ns in reversed(self._namespaces):
                    delete_netns(ns)
                if self.dir and not self.keep_files:
                    shutil.rmtree(self.dir, ignore_errors=True)
                _LIVE.discard(self)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        self.timings["teardown"] = time.monotonic() - t0

    def leftovers(self) -> dict[str, list]:
        """Namespaces and processes of this lab that still exist (for tests)."""
        live_ns = set(list_netns())
        ns_left = [ns for ns in live_ns if self.prefix and ns.startswith(self.prefix + "-")]
        procs = [t.proc.pid for t in self.procs.items if t.proc.poll() is None]
        return {"namespaces": sorted(ns_left), "processes": procs}

    def _alloc_prefix(self) -> None:
        os.makedirs(REGISTRY_DIR, mode=0o755, exist_ok=True)
        existing = set(list_netns())
        for _ in range(64):
            prefix = self._prefix_req or "sl" + secrets.token_hex(2)
            if any(ns.startswith(prefix + "-") for ns in existing):
                if self._prefix_req:
                    raise LabError(f"namespaces with prefix {prefix} already exist")
                continue
            d = os.path.join(REGISTRY_DIR, prefix)
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                if self._prefix_req:
                    raise LabError(f"{d} already exists")
                continue
            self.prefix, self.dir = prefix, d
            break
        else:
            raise LabError("could not allocate a lab prefix")
        for role in self.roles:
            os.makedirs(self.role_dir(role), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self._save_registry()

    def _save_registry(self) -> None:
        write_registry(self.dir, {**owner_token(), "prefix": self.prefix,
                                  "namespaces": [self.ns(r) for r in self.roles],
                                  "created": time.time()})

    # ------------------------------------------------------------ naming

    def ns(self, role: str) -> str:
        role = {"switch": "sw"}.get(role, role)
        if role not in self.roles:
            raise KeyError(f"unknown lab role {role!r}; roles: {self.roles}")
        return f"{self.prefix}-{role}"

    def role_dir(self, role: str) -> str:
        return os.path.join(self.dir, {"switch": "sw"}.get(role, role))

    def addr(self, role: str, family: int = 4, net: str | None = None) -> str:
        """Address of a lab host. Routers: ``net`` 'front' (default) or
        'back'. Also roles 'vip', 'front_vrrp', 'back_vrrp', and 'gateway'
        for the client's gateway."""
        if role == "client":
            return A.CLIENT[family]
        if role in self.routers:
            n = self.routers.index(role) + 1
            if net in (None, "front"):
                return A.router_front(n, family)
            if net == "back":
                return A.router_back(n, family)
            raise ValueError(f"net must be 'front' or 'back', not {net!r}")
        if role in self.targets:
            return A.target(self.targets.index(role) + 1, family)
        if role == "vip":
            return A.VIP[family]
        if role == "front_vrrp":
            return A.FRONT_VRRP[family]
        if role == "back_vrrp":
            return A.BACK_VRRP[family]
        if role == "gateway":
            return self.client_gateway(family)
        raise KeyError(f"no address for role {role!r}")

    def client_gateway(self, family: int = 4) -> str:
        return A.router_front(1, family) if self.nrouters == 1 else A.FRONT_VRRP[family]

    def target_gateway(self, family: int = 4) -> str:
        return A.router_back(1, family) if self.nrouters == 1 else A.BACK_VRRP[family]

    # ------------------------------------------------------------ commands

    def run(self, role: str, argv: Sequence[str], check: bool = True,
            timeout: float | None = 30.0, env: Mapping[str, str] | None = None,
            input: str | None = None, capture: bool = True) -> subprocess.CompletedProcess:
        """Run argv in the role's namespace (``ip netns exec``); text output."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list, not a shell string")
        return run_cmd(netns_exec_argv(self.ns(role), argv), check=check,
                       timeout=timeout, env=env, input=input, capture=capture)

    def ip(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``ip -n <ns> args...``"""
        return run_cmd([ip_binary(), "-n", self.ns(role), *args], check=check, timeout=15)

    def ip_batch(self, role: str, commands: Sequence[str]) -> None:
        if commands:
            run_cmd([ip_binary(), "-n", self.ns(role), "-batch", "-"],
                    input="\n".join(commands) + "\n", timeout=30)

    def sysctl(self, role: str, values: Mapping[str, Any]) -> None:
        """Set sysctls inside the role's namespace (keys like net.ipv4.ip_forward)."""
        if values:
            self.run(role, ["sysctl", "-q", "-w",
                            *[f"{k}={v}" for k, v in values.items()]], timeout=15)

    def sysctl_get(self, role: str, key: str) -> str:
        return self.run(role, ["sysctl", "-n", key], timeout=15).stdout.strip()

    def popen(self, role: str, argv: Sequence[str], *, name: str | None = None,
              env: Mapping[str, str] | None = None, stdout: Any = None,
              stderr: Any = None, stdin: Any = subprocess.DEVNULL,
              log_path: str | None = None, text: bool = False) -> subprocess.Popen:
        """Start argv in the role's namespace, tracked (killed on teardown).
        stdout/stderr default to a log file (``log_path`` or
        <labdir>/logs/<role>-<name>.log); pass subprocess.PIPE to read them.
        The process leads its own process group."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list, not a shell string")
        if self._closed or not self._started:
            raise LabError("lab is not running")
        name = name or os.path.basename(str(argv[0]))
        files = []
        if stdout is None or stderr is None:
            log_path = log_path or os.path.join(self.dir, "logs", f"{role}-{name}.log")
            logf = open(log_path, "ab", buffering=0)
            files.append(logf)
            stdout = logf if stdout is None else stdout
            stderr = logf if stderr is None else stderr
        envd = dict(os.environ)
        envd.update({k: str(v) for k, v in (env or {}).items()})
        try:
            proc = subprocess.Popen(netns_exec_argv(self.ns(role), argv), env=envd,
                                    stdin=stdin, stdout=stdout, stderr=stderr,
                                    start_new_session=True, text=text)
        except BaseException:
            for f in files:
                f.close()
            raise
        self.procs.add(Tracked(proc, role, name, log_path, files))
        return proc

    def stop_process(self, proc: subprocess.Popen, timeout: float = 3.0,
                     sig: int = signal.SIGTERM) -> int | None:
        return self.procs.stop(proc, timeout=timeout, sig=sig)

    def log_path(self, proc: subprocess.Popen) -> str | None:
        t = self.procs.find(proc)
        return t.log_path if t else None

    def link_set(self, role: str, ifname: str, up: bool) -> None:
        self.ip(role, "link", "set", "dev", ifname, "up" if up else "down")

    def owns(self, role: str, address: str) -> bool:
        cp = self.ip(role, "-j", "addr", "show")
        return any(a.get("local") == address
                   for link in json.loads(cp.stdout or "[]")
                   for a in link.get("addr_info", []))

    # ------------------------------------------------------------ build

    def _build_switch(self, *front: tuple[str, str, str]) -> None:
        """The switch: bridges ``front`` and ``back``, and veth pairs whose peer
        is created in the host's namespace: ``front`` (switch port, role,
        peer interface name) on the front bridge, then every router's front
        and back, every target on the back."""
        sw = ["link set lo up"]
        for br in ("front", "back"):
            sw += [f"link add {br} type bridge stp_state 0 mcast_snooping 0",
                   f"link set {br} up"]
        ports = [(port, role, peer, "front") for port, role, peer in front]
        for i, r in enumerate(self.routers, 1):
            ports += [(f"r{i}f", r, A.ROUTER_FRONT_IF, "front"),
                      (f"r{i}b", r, A.ROUTER_BACK_IF, "back")]
        for k, t in enumerate(self.targets, 1):
            ports.append((f"t{k}", t, A.HOST_IF, "back"))
        for port, role, peer, br in ports:
            sw += [f"link add {port} type veth peer name {peer} netns {self.ns(role)}",
                   f"link set {port} master {br}", f"link set {port} up"]
        self.ip_batch("sw", sw)

    def _add_namespaces(self) -> None:
        """One namespace per role, recorded as it is made (teardown deletes them)."""
        ipb = ip_binary()
        for role in self.roles:
            ns = self.ns(role)
            run_cmd([ipb, "netns", "add", ns], timeout=10)
            self._namespaces.append(ns)

    def _build(self) -> None:
        self._add_namespaces()
        base = BASE_SYSCTLS
        self.sysctl("sw", {"net.ipv6.conf.all.disable_ipv6": 1,
                           "net.ipv6.conf.default.disable_ipv6": 1})
        self.sysctl("client", base)
        for r in self.routers:
            self.sysctl(r, {**base, "net.ipv4.ip_forward": 1,
                            "net.ipv6.conf.all.forwarding": 1,
                            "net.ipv6.conf.default.forwarding": 1,
                            # keep static v6 addresses when fail_links() sets links down
                            "net.ipv6.conf.all.keep_addr_on_down": 1,
                            "net.ipv6.conf.default.keep_addr_on_down": 1})
        for t in self.targets:
            self.sysctl(t, {**base, "net.ipv4.conf.all.arp_ignore": 1,
                            "net.ipv4.conf.all.arp_announce": 2})

        self._build_switch(("c0", "client", A.HOST_IF))

        cmds = ["link set lo up", f"link set {A.HOST_IF} up",
                *host_addrs(A.HOST_IF, A.CLIENT[4], A.CLIENT[6]),
                f"route add default via {self.client_gateway(4)} dev {A.HOST_IF}",
                f"route add ::/0 via {self.client_gateway(6)} dev {A.HOST_IF}"]
        self.ip_batch("client", cmds)

        for i, r in enumerate(self.routers, 1):
            cmds = ["link set lo up"]
            for side, f4, f6 in (("front", A.router_front(i, 4), A.router_front(i, 6)),
                                 ("back", A.router_back(i, 4), A.router_back(i, 6))):
                cmds += [f"link set {side} up", *host_addrs(side, f4, f6)]
            self.ip_batch(r, cmds)
            self.sysctl(r, {f"net.ipv4.conf.{s}.rp_filter": 0 for s in ("front", "back")}
                        | {f"net.ipv6.conf.{s}.accept_dad": 0 for s in ("front", "back")})

        for k, t in enumerate(self.targets, 1):
            cmds = ["link set lo up", f"link set {A.HOST_IF} up",
                    *host_addrs(A.HOST_IF, A.target(k, 4), A.target(k, 6)),
                    f"addr add {A.VIP[4]}/32 dev lo",
                    f"addr add {A.VIP[6]}/128 dev lo nodad",
                    f"route add default via {self.target_gateway(4)} dev {A.HOST_IF}",
                    f"route add ::/0 via {self.target_gateway(6)} dev {A.HOST_IF}"]
            self.ip_batch(t, cmds)

    # ------------------------------------------------------------ servers

    def start_servers(self, ports: Sequence[int] = (80, 8080), timeout: float = 10.0,
                      targets: Sequence[str] | None = None) -> dict[str, subprocess.Popen]:
        """Start ``synlb-lab server`` in each target and wait until listening."""
        targets = list(targets or self.targets)
        started = {}
        for t in targets:
            old = self.servers.get(t)
            if old is not None and old.poll() is None:
                continue
            argv = [synlb_lab_exe(), "server", "--name", t]
            for p in ports:
                argv += ["--port", str(p)]
            started[t] = self.popen(t, argv, name="server", stdout=subprocess.PIPE)
            self.servers[t] = started[t]
        for t, proc in started.items():
            line = _readline_timeout(proc.stdout, timeout)
            if not line.startswith(b"ready"):
                raise LabError(f"server in {t} not ready: {line!r} rc={proc.poll()}; "
                               f"see {self.log_path(proc)}")
            proc.stdout.close()  # nothing else is printed on stdout
        return started

    def start_nginx(self, port: int = N.DEFAULT_PORT, timeout: float = 10.0,
                    targets: Sequence[str] | None = None, **conf_kw) -> dict[str, subprocess.Popen]:
        """nginx in each target on ``port`` (v4 + v6), waits until it answers."""
        started = {}
        for t in targets or self.targets:
            d = self.role_dir(t)
            conf = N.write_nginx_conf(t, d, port, **conf_kw)
            started[t] = self.popen(t, N.nginx_argv(conf, d), name="nginx")
            self.nginx[t] = started[t]
        deadline = time.monotonic() + timeout
        for t, proc in started.items():
            while True:
                if proc.poll() is not None:
                    raise LabError(f"nginx in {t} exited {proc.returncode}; "
                                   f"see {os.path.join(self.role_dir(t), 'nginx-error.log')}")
                cp = self.run(t, ["ss", "-Htln", f"sport = :{port}"], check=False, timeout=5)
                if cp.stdout.count("LISTEN") >= 2:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"nginx in {t} not listening after {timeout}s")
                time.sleep(0.05)
        return started

    # ------------------------------------------------------------ client driver

    def open_connections(self, vip: str, port: int = 80, count: int = 30,
                         concurrency: int = 10, timeout: float = 3.0,
                         role: str = "client") -> dict:
        """``synlb-lab client conns`` in the client namespace; parsed JSON."""
        max_time = timeout * (count / max(1, concurrency) + 2) + 5
        argv = [synlb_lab_exe(), "client", "conns", "--vip", vip, "--port", str(port),
                "--count", str(count), "--concurrency", str(concurrency),
                "--timeout", str(timeout), "--max-time", str(max_time)]
        cp = self.run(role, argv, timeout=max_time + 15)
        return json.loads(cp.stdout)

    def udp_flows(self, vip: str, port: int = 80, count: int = 30, rounds: int = 3,
                  concurrency: int = 10, interval: float = 0.0, timeout: float = 1.0,
                  role: str = "client") -> dict:
        """``synlb-lab client udp`` in the client namespace; parsed JSON."""
        max_time = (timeout + interval) * rounds * (count / max(1, concurrency) + 2) + 5
        argv = [synlb_lab_exe(), "client", "udp", "--vip", vip, "--port", str(port),
                "--count", str(count), "--rounds", str(rounds), "--concurrency", str(concurrency),
                "--interval", str(interval), "--timeout", str(timeout), "--max-time", str(max_time)]
        cp = self.run(role, argv, timeout=max_time + 15)
        return json.loads(cp.stdout)

    def start_sessions(self, vip: str, pattern: str = "echo", count: int = 10,
                       duration: float = 10.0, *, port: int = 80, interval: float = 0.1,
                       chunk: int = 16384, stall: float = 2.0,
                       connect_timeout: float = 3.0, role: str = "client") -> "Sessions":
        """Start ``synlb-lab client sessions`` in the background; returns a
        handle (``.wait_ready()``, ``.result()``, ``.stop()``)."""
        argv = [synlb_lab_exe(), "client", "sessions", "--vip", vip, "--port", str(port),
                "--pattern", pattern, "--count", str(count), "--duration", str(duration),
                "--interval", str(interval), "--chunk", str(chunk), "--stall", str(stall),
                "--connect-timeout", str(connect_timeout)]
        proc = self.popen(role, argv, name=f"sessions-{pattern}",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Sessions(self, proc, duration)

    # ------------------------------------------------------------ keepalived

    def _kstate(self, router: str) -> dict:
        if router not in self._k:
            raise KeyError(f"{router!r} is not a router of this lab")
        return self._k[router]

    def start_keepalived(self, routers: Sequence[str] | None = None, **kw):
        """See :func:`synlb_lab.keepalived.start_keepalived`."""
        if self.nrouters != 2:
            raise LabError("keepalived needs a 2-router lab")
        return K.start_keepalived(self, routers, **kw)

    def stop_keepalived(self, router: str, timeout: float = 5.0):
        return K.stop_keepalived(self, router, timeout)

    def start_dbus(self, router: str):
        return K.start_dbus(self, router)

    def dbus_address(self, router: str) -> str:
        return K.dbus_address(self, router)

    def keepalived_paths(self, router: str) -> dict[str, str]:
        return K.keepalived_paths(self, router)

    def vrrp_state(self, router: str) -> str:
        return K.vrrp_state(self, router)

    def wait_state(self, router: str, state: str, timeout: float = 5.0) -> float:
        return K.wait_state(self, router, state, timeout)

    def master(self) -> str | None:
        return K.master(self)

    def fail_links(self, router: str) -> None:
        """Set the router's ``front`` and ``back`` links down."""
        self.ip_batch(router, ["link set dev front down", "link set dev back down"])

    def restore_links(self, router: str) -> None:
        """Links up again, static addresses re-asserted (idempotent)."""
        i = self.routers.index(router) + 1
        cmds = []
        for side, fn in (("front", A.router_front), ("back", A.router_back)):
            cmds += [f"link set dev {side} up",
                     f"addr replace {A.with_prefix(fn(i, 4), 4)} dev {side}",
                     f"addr replace {A.with_prefix(fn(i, 6), 6)} dev {side} nodad"]
        self.ip_batch(router, cmds)


class Sessions:
    """Handle on a background ``synlb-lab client sessions`` run."""

    def __init__(self, lab: Lab, proc: subprocess.Popen, duration: float):
        self.lab, self.proc, self.duration = lab, proc, duration
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self._out = bytearray()
        self._ready = threading.Event()
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err.start()
        self._t_out.start()
        self._result: dict | None = None

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                ev = json.loads(line)
            except ValueError:
                self.stderr_lines.append(line)
                continue
            if isinstance(ev, dict):
                self.events.append(ev)
                if ev.get("event") == "ready":
                    self._ready.set()
        self._ready.set()

    def _read_out(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read(65536), b""):
            self._out += chunk

    def wait_ready(self, timeout: float = 10.0) -> dict:
        """Wait until every session had its first exchange (or failed)."""
        if not self._ready.wait(timeout):
            raise LabError(f"sessions not ready after {timeout}s")
        for ev in self.events:
            if ev.get("event") == "ready":
                return ev
        raise LabError(f"sessions client ended before ready: {self.stderr_lines[-5:]}")

    def stop(self) -> dict:
        """SIGTERM the client: it ends the sessions and prints results."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.result()

    def result(self, timeout: float | None = None) -> dict:
        if self._result is not None:
            return self._result
        timeout = self.duration + 20 if timeout is None else timeout
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.lab.stop_process(self.proc)
            raise LabError(f"sessions client did not finish within {timeout}s")
        self._t_out.join(5)
        self._t_err.join(5)
        try:
            self._result = json.loads(bytes(self._out))
        except ValueError as e:
            raise LabError(f"sessions client rc={self.proc.returncode}, bad output "
                           f"{bytes(self._out[:200])!r}; stderr {self.stderr_lines[-5:]}") from e
        return self._result


def host_addrs(ifname: str, a4: str, a6: str) -> list[str]:
    """``ip`` batch lines giving ``ifname`` a lab host's IPv4 and IPv6 address."""
    return [f"addr add {A.with_prefix(a4, 4)} dev {ifname}",
            f"addr add {A.with_prefix(a6, 6)} dev {ifname} nodad"]


def _readline_timeout(stream, timeout: float) -> bytes:
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else b""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
