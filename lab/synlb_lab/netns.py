"""Low-level helpers: commands in network namespaces, process tracking,
the lab registry and stale-lab cleanup.

Every process the lab starts goes through :class:`ProcessTracker`; it is
stopped by pid (SIGTERM to the process, then SIGKILL to its process group).
Namespaces are swept with ``ip netns pids`` before deletion, so nothing the
lab started can outlive it, and nothing outside the lab is ever signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Mapping, Sequence

#: every lab keeps its files (configs, logs, pid files, sockets) in
#: REGISTRY_DIR/<lab id>/ ; lab.json there records owner and namespaces so
#: that ``synlb-lab cleanup`` can remove a lab whose owner died.
REGISTRY_DIR = "/run/synlb-lab"

DEFAULT_TIMEOUT = 30.0


class LabError(RuntimeError):
    """A lab command failed or a wait timed out."""


def ip_binary() -> str:
    return shutil.which("ip") or "/usr/sbin/ip"


def synlb_lab_exe() -> str:
    """The ``synlb-lab`` console script next to the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), "synlb-lab")


def run_cmd(argv: Sequence[str], *, check: bool = True,
            timeout: float | None = DEFAULT_TIMEOUT,
            env: Mapping[str, str] | None = None, input: str | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
    """Run argv (a list, never a shell string); text output captured."""
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(
            argv, check=False, timeout=timeout, env=_env(env), text=True,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        raise LabError(f"exit {cp.returncode}: {' '.join(argv)}\n"
                       f"{(cp.stderr or '').strip()}")
    return cp


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    if not extra:
        return None
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def netns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return [ip_binary(), "netns", "exec", ns, *[str(a) for a in argv]]


def list_netns() -> list[str]:
    cp = run_cmd([ip_binary(), "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    cp = run_cmd([ip_binary(), "netns", "pids", ns], check=False, timeout=10)
    if cp.returncode != 0:
        return []
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def kill_netns_processes(ns: str, timeout: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process inside netns ``ns`` (a lab
    namespace: everything in it was started by the lab). Returns the pids."""
    pids = [p for p in netns_pids(ns) if p != os.getpid()]
    if not pids:
        return []
    for p in pids:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return pids


def delete_netns(ns: str) -> None:
    kill_netns_processes(ns)
    run_cmd([ip_binary(), "netns", "del", ns], check=False, timeout=10)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (zombies of our children are
    reaped by Popen.wait; foreign zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@dataclass
class Tracked:
    proc: subprocess.Popen
    role: str
    name: str
    log_path: str | None = None
    files: list[IO[Any]] = field(default_factory=list)


class ProcessTracker:
    """Processes started by one lab, stopped by pid in reverse start order."""

    def __init__(self) -> None:
        self.items: list[Tracked] = []

    def add(self, t: Tracked) -> None:
        self.items.append(t)

    def find(self, proc: subprocess.Popen) -> Tracked | None:
        for t in self.items:
            if t.proc is proc:
                return t
        return None

    def stop(self, proc: subprocess.Popen, timeout: float = 3.0,
             sig: int = signal.SIGTERM) -> int | None:
        """Stop one process: ``sig`` to its pid, wait, then SIGKILL to its
        process group (it was started as a session leader). Returns the exit
        code (None if it could not be reaped)."""
        t = self.find(proc)
        if proc.poll() is None:
            _signal(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # leader alive: pgid is ours
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        if t is not None:
            for f in t.files:
                try:
                    f.close()
                except OSError:
                    pass
            t.files.clear()
        return proc.returncode

    def stop_all(self, timeout: float = 3.0) -> None:
        # SIGTERM everything first so slow exits overlap, then reap in order
        for t in reversed(self.items):
            if t.proc.poll() is None:
                _signal(t.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for t in reversed(self.items):
            self.stop(t.proc, timeout=max(0.1, deadline - time.monotonic()))
        self.items.clear()


# ---------------------------------------------------------------- registry

def write_registry(labdir: str, info: dict) -> None:
    path = os.path.join(labdir, "lab.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)


def _proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_token() -> dict:
    return {"owner_pid": os.getpid(), "owner_start": _proc_start_time(os.getpid())}


def owner_alive(info: dict) -> bool:
    pid = info.get("owner_pid")
    if not isinstance(pid, int):
        return False
    return _alive(pid) and _proc_start_time(pid) == info.get("owner_start")


def cleanup_stale(force: bool = False) -> list[str]:
    """Remove labs recorded under REGISTRY_DIR whose owner process is gone
    (all of them with ``force``). Only namespaces listed in a lab's
    lab.json are touched. Returns the lab ids removed."""
    removed = []
    if not os.path.isdir(REGISTRY_DIR):
        return removed
    existing = set(list_netns())
    for lab_id in sorted(os.listdir(REGISTRY_DIR)):
        labdir = os.path.join(REGISTRY_DIR, lab_id)
        try:
            with open(os.path.join(labdir, "lab.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if owner_alive(info) and not force:
            continue
        for ns in info.get("namespaces", []):
            if ns in existing:
                delete_netns(ns)
        shutil.rmtree(labdir, ignore_errors=True)
        removed.append(lab_id)
    return removed
