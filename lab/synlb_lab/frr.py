"""FRR (Debian's ``frr`` 8.4) in a lab namespace: zebra, bfdd and bgpd.

Each daemon runs in the foreground as a tracked process of the lab (stopped
by pid at teardown), with its own zebra socket (``-z``), pid file (``-i``),
vty socket directory (``--vty_socket``), config (``-f``) and, for bfdd,
control socket (``--bfdctl``), all in ``<role dir>/frr``, a directory owned
by the ``frr`` user: the daemons drop to ``-u frr -g frr`` (as root they
refuse, root not being in ``frrvty``). ``-P 0``: no vty TCP port. Nothing
is shared with another namespace or with an FRR of the machine itself.

    from synlb_lab import frr
    procs = frr.start(lab, "up", bgpd_conf_text, bfdd_conf=frr.bfd_profile())
    print(frr.vtysh(lab, "up", "show bgp summary"))
    frr.stop(lab, "up")
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import time
from collections.abc import Sequence

from .netns import LabError

FRR_LIB = "/usr/lib/frr"
VTYSH = "/usr/bin/vtysh"
DAEMONS = ("zebra", "bfdd", "bgpd")  # start order (zebra first: the others connect to it)
BFD_PROFILE = "synlb-lab"


def available() -> bool:
    return all(os.access(os.path.join(FRR_LIB, d), os.X_OK) for d in DAEMONS) and os.access(VTYSH, os.X_OK)


def frr_dir(lab, role: str) -> str:
    """``<role dir>/frr``, owned by frr:frr (created when missing)."""
    d = os.path.join(lab.role_dir(role), "frr")
    os.makedirs(d, mode=0o755, exist_ok=True)
    uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
    os.chown(d, uid, gid)
    return d


def bfd_profile(name: str = BFD_PROFILE, interval_ms: int = 100, multiplier: int = 3) -> str:
    """bfdd config text: one profile, ``multiplier`` x ``interval_ms``."""
    return (f"bfd\n profile {name}\n  detect-multiplier {multiplier}\n"
            f"  receive-interval {interval_ms}\n  transmit-interval {interval_ms}\n exit\nexit\n")


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
    os.chown(path, pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid)


def running(lab, role: str) -> bool:
    procs = lab.frr.get(role, {})
    return bool(procs) and all(p.poll() is None for p in procs.values())


def start(lab, role: str, bgpd_conf: str, *, bfdd_conf: str = "", timeout: float = 15.0) -> dict:
    """Write the configs and start zebra, bfdd and bgpd in ``role``'s
    namespace; returns once vtysh reaches all three. The processes are in
    ``lab.frr[role]`` (name -> Popen)."""
    if not available():
        raise LabError("FRR is not installed (apt-get install frr)")
    if running(lab, role):
        raise LabError(f"{role}: FRR already runs")
    d = frr_dir(lab, role)
    for name in DAEMONS:  # a stale pid file or socket from an earlier run in this dir
        for suffix in (".pid", ".vty"):
            _unlink(os.path.join(d, name + suffix))
    _unlink(os.path.join(d, "zserv.api"))
    _unlink(os.path.join(d, "bfdd.sock"))
    confs = {"zebra": f"hostname {role}\nlog file {d}/zebra.log\n",
             "bfdd": f"hostname {role}\nlog file {d}/bfdd.log\n{bfdd_conf}",
             "bgpd": f"hostname {role}\nlog file {d}/bgpd.log\n{bgpd_conf}"}
    procs: dict = {}
    lab.frr = getattr(lab, "frr", {})
    lab.frr[role] = procs
    deadline = time.monotonic() + timeout
    try:
        for name in DAEMONS:
            conf = os.path.join(d, f"{name}.conf")
            _write(conf, confs[name])
            argv = [os.path.join(FRR_LIB, name), "-u", "frr", "-g", "frr", "-z", os.path.join(d, "zserv.api"),
                    "-i", os.path.join(d, f"{name}.pid"), "--vty_socket", d, "-f", conf, "-P", "0"]
            if name == "bfdd":
                argv += ["--bfdctl", os.path.join(d, "bfdd.sock")]
            procs[name] = lab.popen(role, argv, name=f"frr-{name}")
            # the others connect to zebra's socket: wait for it
            want = os.path.join(d, "zserv.api" if name == "zebra" else f"{name}.vty")
            _wait_path(procs[name], want, deadline, f"{role} {name}")
        for _ in range(int(timeout / 0.1) + 1):
            if _vtysh_ok(lab, role):
                return procs
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise LabError(f"{role}: vtysh does not reach FRR after {timeout}s; see {d}")
    except BaseException:
        stop(lab, role)
        raise


def stop(lab, role: str, timeout: float = 5.0) -> None:
    """Stop the role's daemons by pid (SIGTERM, then SIGKILL), bgpd first."""
    procs = getattr(lab, "frr", {}).pop(role, {})
    for name in reversed(DAEMONS):
        p = procs.get(name)
        if p is not None:
            lab.stop_process(p, timeout=timeout)


def kill(lab, role: str) -> None:
    """SIGKILL the role's daemons (a router dying without a word)."""
    import signal
    procs = getattr(lab, "frr", {}).pop(role, {})
    for name in reversed(DAEMONS):
        p = procs.get(name)
        if p is not None:
            lab.stop_process(p, timeout=0.1, sig=signal.SIGKILL)


def vtysh_argv(lab, role: str, *cmds: str) -> list[str]:
    argv = [VTYSH, "--vty_socket", os.path.join(lab.role_dir(role), "frr")]
    for c in cmds:
        argv += ["-c", c]
    return argv


def vtysh(lab, role: str, *cmds: str, check: bool = True, timeout: float = 10.0) -> str:
    cp = lab.run(role, vtysh_argv(lab, role, *cmds), check=check, timeout=timeout)
    return cp.stdout


def vtysh_json(lab, role: str, cmd: str) -> dict:
    try:
        return json.loads(vtysh(lab, role, cmd, check=False) or "{}")
    except ValueError:
        return {}


def bgp_peers(lab, role: str) -> dict[str, str]:
    """{neighbor address: state} over bgpd's address families."""
    out: dict[str, str] = {}
    for body in vtysh_json(lab, role, "show bgp summary json").values():
        if isinstance(body, dict):
            for peer, v in (body.get("peers") or {}).items():
                out[peer] = v.get("state", "?")
    return out


def bfd_peers(lab, role: str) -> dict[str, str]:
    """{peer address: status} of bfdd's sessions."""
    data = []
    try:
        data = json.loads(vtysh(lab, role, "show bfd peers json", check=False) or "[]")
    except ValueError:
        pass
    return {p.get("peer"): p.get("status") for p in data if isinstance(p, dict)}


def wait_peers(lab, role: str, peers: Sequence[str], state: str = "Established", bfd: bool = False,
               timeout: float = 20.0) -> float:
    """Until every one of ``peers`` is in ``state`` (and, with ``bfd``, its
    BFD session up); returns the seconds waited."""
    t0 = time.monotonic()
    for _ in range(int(timeout / 0.1) + 1):
        st = bgp_peers(lab, role)
        ok = all(st.get(p) == state for p in peers)
        if ok and bfd:
            b = bfd_peers(lab, role)
            ok = all(b.get(p) == "up" for p in peers)
        if ok:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.1)
    raise LabError(f"{role}: BGP peers not {state}{' with BFD up' if bfd else ''} after {timeout}s: "
                   f"{bgp_peers(lab, role)} bfd {bfd_peers(lab, role) if bfd else '-'}")


def _vtysh_ok(lab, role: str) -> bool:
    try:
        cp = lab.run(role, vtysh_argv(lab, role, "show daemons"), check=False, timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return cp.returncode == 0 and all(n in cp.stdout for n in DAEMONS)


def _wait_path(proc, path: str, deadline: float, what: str) -> None:
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise LabError(f"{what} exited {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: {path} did not appear")
        time.sleep(0.02)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
