"""Faults, load and bad input in the netns lab, with sessions running;
``make reliability`` runs every scenario and writes docs/RELIABILITY.md.

One 2-router lab for the whole run (:class:`Rig`): keepalived on both
(the shipped example: advert_int 0.03, preempt_delay 5, notify hook), the
plugin host (``synlb run``, plugin ``lb``) on both, hot standby, targets
t1..t3 (t4 is there for the reload scenario). lb1's state dir is a 16 MiB
tmpfs mounted inside the lab's own directory (the full-state-dir scenario
fills it); the hosts' iptables use a lock file of the lab's
(``XTABLES_LOCKFILE``), so holding it blocks nobody outside the lab.

Each scenario starts its own load (:class:`Load`): long sessions (echo and
upload, IPv4 and IPv6) and a probe that opens a new connection every 0.05 s
(IPv4 and IPv6 in turn). It returns one result row: what was done, the load,
sessions kept / reset / moved, new connections failed or slow (> 0.5 s:
a SYN retransmitted), the recovery time and the figures measured. Every
loop here is bounded in count and time; the lab is torn down even on
failure. Traffic goes only to lab addresses inside the lab's namespaces.

``python -m synlb_lab.reliability [--fast] [--only NAME ...] --json FILE --markdown FILE``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Callable

from synlb import statedir
from synlb.errors import EXIT_UNCONFIGURED
from . import addresses as A
from . import badinput
from .demo_failover import FAMILIES, PATTERN_ARGS, Pair, snapshot, start_sessions, stop_sessions
from .netns import LabError
from .scenario import synlb_exe
from .topology import Lab

SLOW = 0.5  # a new connection that took longer waited for a SYN retransmit
PROBE_STEP = 0.05
STATE_TMPFS = "16m"
SESSION_PATTERNS = ("echo", "up")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One new connection every STEP seconds, IPv4 and IPv6 in turn, each in its
# own thread, until DURATION or SIGTERM; prints their start/end times.
PROBE = r"""
import json, signal, socket, sys, threading, time
v4, v6, port, duration, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
out, stop = [], threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
def one(vip, fam):
    t0 = time.time()
    try:
        with socket.create_connection((vip, port), timeout=4) as s:
            s.settimeout(4)
            s.sendall(b"NAME\n")
            name = s.makefile().readline().strip()
        out.append({"start": t0, "end": time.time(), "ok": bool(name), "target": name, "fam": fam})
    except OSError as e:
        out.append({"start": t0, "end": time.time(), "ok": False, "error": type(e).__name__, "fam": fam})
threads = []
t_start = time.monotonic()
i = 0
while not stop.is_set() and time.monotonic() - t_start < duration and i < 4000:
    fam = 4 if i % 2 == 0 else 6
    th = threading.Thread(target=one, args=(v4 if fam == 4 else v6, fam), daemon=True)
    th.start()
    threads.append(th)
    i += 1
    stop.wait(max(0.0, t_start + i * step - time.monotonic()))
for th in threads:
    th.join(6)
print(json.dumps(sorted(out, key=lambda r: r["start"])))
"""


def wait_for(pred: Callable, what: str, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


# ---------------------------------------------------------------- the rig

class Rig:
    """The lab, the pair and the hosts for a whole run."""

    def __init__(self) -> None:
        self.lab: Lab | None = None
        self.pair: Pair | None = None
        self.mounted: str | None = None
        self.lockfile = ""

    def __enter__(self) -> "Rig":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.lab = lab = Lab(routers=2, targets=4, server_ports=(80,)).start()
        sd = os.path.join(lab.role_dir("lb1"), "synlb-state")
        os.makedirs(sd, mode=0o700, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STATE_TMPFS},mode=0700", "synlb-lab-state", sd],
                           capture_output=True, text=True, timeout=10)
        self.mount_error = None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")
        if r.returncode == 0:
            self.mounted = sd
        self.lockfile = os.path.join(lab.dir, "xtables.lock")
        open(self.lockfile, "a").close()
        self.pair = pair = Pair(lab, targets=["t1", "t2", "t3"], plugins="lb")
        pair.prepare()
        for rt in lab.routers:
            pair.hosts[rt] = lab.popen(rt, [synlb_exe(), "--config", pair.config(rt), "run"], name="synlb-run",
                                       env={"XTABLES_LOCKFILE": self.lockfile})
        wait_for(lambda: all(os.path.exists(os.path.join(pair.state_dir(rt), "control.sock")) for rt in lab.routers)
                 or any(h.poll() is not None for h in pair.hosts.values()), "synlb run on both routers", 20)
        if any(h.poll() is not None for h in pair.hosts.values()):
            raise LabError(f"synlb run exited: see {[lab.log_path(h) for h in pair.hosts.values()]}")
        pair.start()

    def close(self) -> None:
        try:
            if self.pair is not None:
                with contextlib.suppress(Exception):
                    self.pair.close()
        finally:
            if self.mounted:
                subprocess.run(["umount", "-l", self.mounted], capture_output=True, timeout=10)
                self.mounted = None
            if self.lab is not None:
                self.lab.close()

    # --- reading the routers
    def state_dir(self, r: str) -> str:
        return self.pair.state_dir(r)

    def worker_pid(self, r: str = "lb1") -> int | None:
        try:
            with open(os.path.join(self.state_dir(r), "worker-0.pid")) as fh:
                return json.load(fh)["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def worker_stats(self, r: str = "lb1") -> dict:
        try:
            with open(statedir.worker_stats(self.state_dir(r), 0)) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def queue(self, r: str = "lb1") -> dict:
        out = self.lab.run(r, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 8 and f[0] == "0":
                return {"portid": int(f[1]), "waiting": int(f[2]), "queue_dropped": int(f[5]),
                        "user_dropped": int(f[6])}
        return {"portid": 0, "waiting": 0, "queue_dropped": 0, "user_dropped": 0}

    def worker_ready(self, r: str = "lb1") -> int | None:
        """The worker's pid once it holds its queue (stats file written after the bind)."""
        pid = self.worker_pid(r)
        if pid and self.worker_stats(r).get("pid") == pid and self.queue(r)["portid"]:
            return pid
        return None

    def host_log(self, r: str = "lb1") -> str:
        with open(self.lab.log_path(self.pair.hosts[r]), errors="replace") as fh:
            return fh.read()

    def host_status(self, r: str = "lb1") -> dict:
        return self.pair.host_status(r).get("host") or {}

    def drift(self, r: str) -> list[str]:
        cp = self.lab.run(r, [synlb_exe(), "--config", self.pair.config(r), "status", "--check"], check=False)
        return [] if cp.returncode == 0 else cp.stdout.splitlines()

    def conntrack_stats(self, r: str = "lb1") -> Counter:
        out = self.lab.run(r, ["conntrack", "-S"], check=False).stdout
        c: Counter = Counter()
        for line in out.splitlines():
            for field in line.split()[1:]:
                k, _, v = field.partition("=")
                if v.isdigit():
                    c[k] += int(v)
        return c

    def conntrack_count(self, r: str = "lb1") -> int:
        out = self.lab.run(r, ["conntrack", "-C"], check=False).stdout.strip()
        return int(out) if out.isdigit() else -1

    def settle(self, timeout: float = 30.0) -> None:
        """lb1 MASTER, lb2 BACKUP, both data planes installed and quiet."""
        self.lab.wait_state("lb1", "MASTER", timeout)
        self.lab.wait_state("lb2", "BACKUP", timeout)
        for r in self.lab.routers:
            self.pair.wait_settled(r, True, timeout)

    def load(self, count: int = 10, probe: bool = True, max_seconds: float = 90.0) -> "Load":
        return Load(self, count, probe, max_seconds)

    def rss_kb(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0


class Load:
    """Sessions (echo + upload, IPv4 + IPv6, ``count`` each) and the probe."""

    def __init__(self, rig: Rig, count: int, probe: bool, max_seconds: float):
        self.rig = rig
        self.count = count
        self.handles = start_sessions(rig.lab, count, SESSION_PATTERNS, FAMILIES, duration=max_seconds + 30)
        self.probe = None
        if probe:
            self.probe = rig.lab.popen("client", [sys.executable, "-c", PROBE, A.VIP[4], A.VIP[6], "80",
                                                  str(max_seconds), str(PROBE_STEP)],
                                       name="probe", stdout=subprocess.PIPE)
        self.t0 = time.time()

    def describe(self) -> str:
        n = self.count * len(SESSION_PATTERNS) * len(FAMILIES)
        s = f"{n} sessions (echo, upload; IPv4, IPv6)"
        return s + f" + a new connection every {PROBE_STEP} s" if self.probe else s

    def finish(self, t_ref: float | None = None) -> dict:
        results = stop_sessions(self.handles)
        attempts = []
        if self.probe is not None:
            if self.probe.poll() is None:
                self.probe.send_signal(signal.SIGTERM)
            out, _ = self.probe.communicate(timeout=20)
            try:
                attempts = json.loads(out or b"[]")
            except ValueError:
                attempts = []
        return {"load": self.describe(), "sessions": session_summary(results),
                "new": probe_summary(attempts, self.t0 if t_ref is None else t_ref),
                "seconds": round(time.time() - self.t0, 1)}


def session_summary(results: dict) -> dict:
    total = kept = lost = moved = 0
    max_gap = 0.0
    moved_bytes = 0
    errors: Counter = Counter()
    for res in results.values():
        for s in res["sessions"]:
            total += 1
            if not s["survived"]:
                lost += 1
                errors[(s["error"] or "stalled").split(":")[0]] += 1
            elif s["moved"]:
                moved += 1
            else:
                kept += 1
            moved_bytes += s["bytes_sent"] + s["bytes_received"]
        max_gap = max(max_gap, res["summary"]["max_gap"])
    return {"total": total, "kept": kept, "reset": lost, "moved": moved, "max_gap": round(max_gap, 3),
            "bytes": moved_bytes, "errors": dict(errors)}


def probe_summary(attempts: list[dict], t_ref: float) -> dict:
    bad = [a for a in attempts if not a["ok"] or a["end"] - a["start"] > SLOW]
    failed = sum(not a["ok"] for a in attempts)
    out = {"total": len(attempts), "failed": failed, "slow": len(bad) - failed,
           "targets": dict(Counter(a.get("target") for a in attempts if a["ok"]))}
    if not bad:
        out["recovery"] = 0.0
        return out
    last_bad = max(a["start"] for a in bad)
    good_after = [a["end"] for a in attempts if a["start"] > last_bad and a["ok"] and a["end"] - a["start"] <= SLOW]
    out["recovery"] = round(min(good_after) - t_ref, 3) if good_after else None
    out["first_bad"] = round(min(a["start"] for a in bad) - t_ref, 3)
    out["errors"] = dict(Counter(a.get("error", "slow") for a in bad))
    return out


#: what the recovery figure of each scenario counts
RECOVERY = {
    "worker_kill": "kill to the new worker holding its queue",
    "egress_link": "link down to new connections served at once again",
    "keepalived_restart": "stop to new connections served at once again",
    "both_keepalived": "keepalived started to new connections served at once again",
    "reload_sighup": "first SIGHUP to new connections served at once again",
    "syn_flood": "flood end to new connections served at once again",
    "conntrack_full": "table full to new connections served at once again",
    "xtables_lock": "STOP to new connections served at once again",
    "full_state_dir": "space freed to the worker holding its queue again",
}


def row(name: str, title: str, done: str, res: dict, *, ok: bool, recovery: float | None,
        figures: dict, notes: list[str]) -> dict:
    return {"name": name, "title": title, "done": done, **res, "recovery": recovery,
            "recovery_what": RECOVERY.get(name, ""), "figures": figures, "notes": notes, "ok": bool(ok)}


def all_kept(res: dict) -> bool:
    s = res["sessions"]
    return s["kept"] == s["total"] and s["total"] > 0


# ---------------------------------------------------------------- faults

def worker_kill(rig: Rig, fast: bool = False) -> dict:
    kills = 1 if fast else 3
    load = rig.load()
    time.sleep(1.0)
    times, t_first = [], None
    for i in range(kills):
        pid = wait_for(rig.worker_ready, "worker ready", 10)
        t = time.time()
        t_first = t_first or t
        os.kill(pid, signal.SIGKILL)
        new = wait_for(lambda: (p := rig.worker_ready()) and p != pid and p, "worker restarted", 15, 0.01)
        times.append(round(time.time() - t, 3))
        time.sleep(2.0)
    res = load.finish(t_first)
    restarts = rig.host_status().get("plugins", {}).get("lb", {}).get("worker_restarts", {})
    new = res["new"]
    ok = all_kept(res) and new["failed"] == 0 and times[0] < 1.5  # "within a second", with slack for a loaded VM
    return row("worker_kill", "Worker SIGKILL",
               f"SIGKILL to lb1's (the master's) worker, {kills}x, 2 s apart", res, ok=ok, recovery=times[0],
               figures={"restart_s": times, "restarts_counted": restarts},
               notes=[f"restarted (holding its queue again) after {', '.join(f'{t:.2f}' for t in times)} s "
                      f"(backoff 0, 0.5, 1 s for a worker that keeps dying)",
                      f"{new['slow']} new connections waited for a SYN retransmit, none failed"
                      if not new["failed"] else f"{new['failed']} new connections failed",
                      "established sessions never reach the worker (conntrack keeps the mark)"])


def egress_link(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    load = rig.load()
    time.sleep(1.0)
    t0 = time.time()
    lab.link_set("lb1", "back", False)
    takeover = lab.wait_state("lb2", "MASTER", 10)
    pair.wait_settled("lb2", True, 15)
    pair.wait_settled("lb1", False, 15)
    time.sleep(2.0)
    t_up = time.time()
    lab.restore_links("lb1")
    pair.wait_settled("lb1", True, 20)  # BACKUP, hot standby: routes restored
    routes_back = time.time() - t_up
    lab.wait_state("lb1", "MASTER", 20)
    back = time.time() - t_up
    rig.settle()
    time.sleep(1.0)
    res = load.finish(t0)
    ok = all_kept(res) and not rig.drift("lb1")
    return row("egress_link", "Egress link down and up",
               "lb1's (the master's) link to the targets down for 2 s, then up", res, ok=ok,
               recovery=res["new"]["recovery"],
               figures={"takeover_s": round(takeover, 3), "routes_restored_s": round(routes_back, 3),
                        "master_again_s": round(back, 3)},
               notes=[f"lb2 MASTER {takeover:.2f} s after the link went down (keepalived tracks it: FAULT)",
                      f"lb1's per-target routes back {routes_back:.2f} s after the link came up (the kernel "
                      "dropped them; lb1 reconciles as hot-standby BACKUP)",
                      f"lb1 MASTER again after {back:.2f} s (preempt_delay 5 s)"])


def keepalived_restart(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    load = rig.load()
    time.sleep(1.0)
    t0 = time.time()
    pair.stop_keepalived("lb1")
    pair.start_keepalived(["lb1"])
    restarted = time.time() - t0
    lab.wait_state("lb1", "MASTER", 20)
    back = time.time() - t0
    rig.settle()
    time.sleep(1.0)
    res = load.finish(t0)
    ok = all_kept(res)
    return row("keepalived_restart", "keepalived restart on the master",
               "lb1's keepalived stopped (SIGTERM) and started again at once", res, ok=ok,
               recovery=res["new"]["recovery"],
               figures={"restart_s": round(restarted, 3), "master_again_s": round(back, 3)},
               notes=["lb2 takes over at once (lb1 sends priority 0 on stop), lb1 preempts after "
                      f"preempt_delay: MASTER again {back:.2f} s after the stop",
                      "lb1 tears down on STOP and re-installs as BACKUP (hot), sessions picked up both ways"])


def both_keepalived(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    load = rig.load()
    time.sleep(1.0)
    t0 = time.time()
    procs = {r: lab._kstate(r)["keepalived"] for r in lab.routers}
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    wait_for(lambda: all(p.poll() is not None for p in procs.values()), "keepalived exits", 10, 0.02)
    exited = time.time() - t0
    for r in lab.routers:
        pair.stop_keepalived(r)  # already exited: only the lab's bookkeeping
    for r in lab.routers:
        pair.wait_settled(r, False, 15)
    down = time.time() - t0
    time.sleep(2.0)
    t_start = time.time()
    pair.start_keepalived(lab.routers)
    first = wait_for(lambda: lab.master(), "a master", 20, 0.02)
    t_master = time.time() - t_start
    lab.wait_state("lb1", "MASTER", 20)
    rig.settle()
    t_all = time.time() - t_start
    # a session whose segments were lost for the whole outage retransmits
    # with exponential backoff: its next try comes up to about twice the
    # outage later; give every session that long to resume
    time.sleep(min(15.0, 2 * (t_start + t_master - t0) + 1.0))
    res = load.finish(t_start)
    ok = all_kept(res)
    return row("both_keepalived", "Both routers' keepalived stopped and started",
               "keepalived stopped on lb1 and lb2 (no router owns the VRRP addresses), "
               "started on both 2 s later", res, ok=ok, recovery=res["new"]["recovery"],
               figures={"keepalived_exited_s": round(exited, 3), "both_down_s": round(down, 3),
                        "first_master_s": round(t_master, 3),
                        "first_master": first, "settled_s": round(t_all, 3)},
               notes=[f"both keepalived exited {exited:.2f} s after SIGTERM, both data planes removed {down:.2f} s "
                      "after it (STOP on each)",
                      f"{first} MASTER {t_master:.2f} s after the start; everything settled after {t_all:.2f} s",
                      f"no gateway for {t_start + t_master - t0:.1f} s: sessions wait in TCP retransmission and "
                      "resume (their conntrack entries and marks outlive synlb's teardown); new connections "
                      "meanwhile time out or retransmit"])


def reload_sighup(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    load = rig.load()
    time.sleep(1.0)
    pids = {r: rig.worker_pid(r) for r in lab.routers}
    n0 = rig.host_log("lb1").count("configuration reloaded")
    t0 = time.time()
    hups = 3 if fast else 10
    for _ in range(hups):  # unchanged config: a no-op reconcile each
        for r in lab.routers:
            pair.hosts[r].send_signal(signal.SIGHUP)
        time.sleep(0.2)
    wait_for(lambda: rig.host_log("lb1").count("configuration reloaded") >= n0 + 1, "reloads", 10)
    t_add = time.time()
    pair.set_targets(["t1", "t2", "t3", "t4"])  # SIGHUP with a new target, both routers
    added = time.time() - t_add
    time.sleep(0.5)
    conns = lab.open_connections(A.VIP[4], count=80, concurrency=10)
    res = load.finish(t0)
    same_pid = all(rig.worker_pid(r) == pids[r] for r in lab.routers)
    pair.set_targets(["t1", "t2", "t3"])  # back, with no sessions running
    rig.settle()
    ok = all_kept(res) and res["new"]["failed"] == 0 and same_pid and conns["ok"] == 80 \
        and conns["per_target"].get("t4", 0) > 0
    return row("reload_sighup", "Config reload (SIGHUP to synlb run) during traffic",
               f"{hups} SIGHUPs to both hosts with the config unchanged, then t4 added (SIGHUP)", res, ok=ok,
               recovery=res["new"]["recovery"],
               figures={"hups": hups, "t4_installed_s": round(added, 3), "workers_restarted": not same_pid,
                        "new_connections_after": conns["per_target"]},
               notes=[f"workers reloaded in place (same pid: {same_pid}); t4 installed on both routers "
                      f"{added:.2f} s after the SIGHUP",
                      f"80 new connections afterwards: {conns['per_target']} (t4 takes its share, no running "
                      "session moved)"])


def syn_flood(rig: Rig, fast: bool = False) -> dict:
    lab = rig.lab
    seconds = 2.0 if fast else 6.0
    load = rig.load()
    time.sleep(1.0)
    pid = rig.worker_ready()
    rss0 = rig.rss_kb(pid)
    st0, q0 = rig.worker_stats(), rig.queue()
    vrrp0 = {r: len(rig.pair.vrrp_log(r)) for r in lab.routers}
    peak = [rss0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak.append(rig.rss_kb(pid))
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    fl = lab.popen("client", [sys.executable, "-m", "synlb_lab.flood", "syn", "--vip4", A.VIP[4], "--vip6", A.VIP[6],
                              "--src4", A.CLIENT[4], "--seconds", str(seconds)], name="flood", stdout=subprocess.PIPE)
    out, _ = fl.communicate(timeout=seconds + 30)
    t_end = time.time()
    flood = json.loads(out)
    time.sleep(1.2)  # the worker's stats tick
    st1, q1 = rig.worker_stats(), rig.queue()
    handled = st1.get("packets", 0) - st0.get("packets", 0)
    time.sleep(3.0)
    stop.set()
    th.join(2)
    res = load.finish(t_end)
    rss1 = rig.rss_kb(pid)
    dropped = q1["queue_dropped"] - q0["queue_dropped"]
    vrrp_changes = {r: len(rig.pair.vrrp_log(r)) - vrrp0[r] for r in lab.routers}
    elapsed = max(flood["elapsed"], 1e-3)
    capacity = handled / elapsed
    ratio = flood["sent"] / max(handled, 1)
    after = res["new"]
    ok = (all_kept(res) and rig.worker_pid() == pid and max(peak) < 60_000
          and after["recovery"] is not None and after["recovery"] < 3.0)
    rig.settle()
    return row("syn_flood", "SYN flood at several times worker capacity",
               f"{flood['sent']} SYNs (IPv4 + IPv6, every source port in turn) at the VIP from the client "
               f"for {flood['elapsed']:.1f} s ({flood['rate']}/s, raw sockets)", res, ok=ok,
               recovery=after["recovery"],
               figures={"sent": flood["sent"], "offered_per_s": flood["rate"], "worker_handled": handled,
                        "worker_per_s": round(capacity), "offered_over_handled": round(ratio, 1),
                        "queue_dropped": dropped, "user_dropped": q1["user_dropped"] - q0["user_dropped"],
                        "rss_kb": {"before": rss0, "peak": max(peak), "after": rss1},
                        "vrrp_events": vrrp_changes, "worker_pid_kept": rig.worker_pid() == pid},
               notes=[f"the worker handled {handled} ({capacity:.0f}/s); the kernel dropped {dropped} at the full "
                      f"queue: {ratio:.1f}x what the worker could take",
                      f"worker RSS {rss0 // 1024} MiB before, {max(peak) // 1024} MiB peak, {rss1 // 1024} MiB after",
                      f"new connections served at once again {after['recovery']} s after the flood ended; "
                      f"{after['failed']} failed, {after['slow']} slow during it",
                      f"VRRP events during the flood: {vrrp_changes}"])


def conntrack_full(rig: Rig, fast: bool = False) -> dict:
    lab = rig.lab
    cmax = int(lab.sysctl_get("lb1", "net.netfilter.nf_conntrack_max"))
    writable = os.access("/proc/sys/net/netfilter/nf_conntrack_max", os.W_OK)
    probe_ns = lab.run("lb1", ["sysctl", "-w", f"net.netfilter.nf_conntrack_max={cmax}"], check=False)
    udp_timeout = lab.sysctl_get("lb1", "net.netfilter.nf_conntrack_udp_timeout")
    lab.sysctl("lb1", {"net.netfilter.nf_conntrack_udp_timeout": 25})
    load = rig.load()
    try:
        time.sleep(1.0)
        pid = rig.worker_ready()
        c0, s0 = rig.conntrack_count(), rig.conntrack_stats()
        t0 = time.time()
        targets = ",".join(A.target(k, 4) for k in (1, 2, 3))
        fill = lab.popen("client", [sys.executable, "-m", "synlb_lab.flood", "udpfill", "--to", targets,
                                    "--sources", "2", "--count", str(cmax + 30000), "--seconds", "25"],
                         name="udpfill", stdout=subprocess.PIPE)
        full_at = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = rig.conntrack_count()
            if n >= cmax * 0.999:
                full_at = time.time()
                break
            if fill.poll() is not None and n < cmax * 0.999:
                time.sleep(0.5)
                if rig.conntrack_count() < cmax * 0.999:
                    break
            time.sleep(0.2)
        out, _ = fill.communicate(timeout=40)
        filled = json.loads(out)
        time.sleep(6.0)  # held full, load running
        peak = rig.conntrack_count()
        s1 = rig.conntrack_stats()
        res = load.finish(full_at or t0)
    finally:
        lab.sysctl("lb1", {"net.netfilter.nf_conntrack_udp_timeout": udp_timeout})
    alive = rig.worker_pid() == pid and rig.pair.hosts["lb1"].poll() is None
    # clean up: the filler entries expire (25 s) or are deleted
    t_clean = time.time()
    with contextlib.suppress(LabError):
        wait_for(lambda: rig.conntrack_count() < cmax // 2, "filler entries gone", 30, 0.5)
    if rig.conntrack_count() >= cmax // 2:
        lab.run("lb1", ["conntrack", "-D", "-p", "udp"], check=False, timeout=120)
    cleaned = time.time() - t_clean
    delta = {k: s1[k] - s0[k] for k in ("drop", "early_drop", "insert_failed", "error", "invalid")}
    new = res["new"]
    ok = all_kept(res) and alive and full_at is not None
    note_max = ("nf_conntrack_max is a global sysctl, read-only in every namespace but the init one "
                f"(`sysctl -w` in lb1: {probe_ns.stderr.strip() or 'refused'}); it cannot be lowered "
                "without changing the root namespace, so lb1's table was filled for real to the global "
                f"maximum ({cmax}) with unreplied UDP entries")
    return row("conntrack_full", "conntrack table full",
               f"lb1's conntrack table filled to nf_conntrack_max = {cmax} ({filled['sent']} UDP datagrams, "
               "one distinct 5-tuple each, client -> targets through lb1), held full 6 s", res, ok=ok,
               recovery=new["recovery"],
               figures={"nf_conntrack_max": cmax, "count_before": c0, "count_full": peak,
                        "filled_after_s": None if full_at is None else round(full_at - t0, 2),
                        "fill": filled, "stats_delta": delta, "worker_pid_kept": rig.worker_pid() == pid,
                        "host_alive": alive, "cleanup_s": round(cleaned, 1), "root_writable": writable},
               notes=[note_max,
                      f"full after {'-' if full_at is None else round(full_at - t0, 1)} s; while full, the kernel "
                      f"evicted unassured entries (early_drop +{delta['early_drop']}) and dropped "
                      f"{delta['drop']} packets it found no room for",
                      f"new connections while full: {new['failed']} failed, {new['slow']} slow of {new['total']} "
                      "(a new connection takes the place of an unreplied entry: synlb's SYNs get an entry "
                      "like any other)",
                      "established sessions are assured entries, never evicted: none lost; the worker and "
                      "the host kept running (synlb reads no conntrack state on the packet path)"])


def xtables_lock(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    env = {"XTABLES_LOCKFILE": rig.lockfile}
    script = "*filter\nCOMMIT\n"

    def restore_time() -> tuple[float, int]:
        t = time.monotonic()
        cp = lab.run("lb1", ["iptables-restore", "--wait", "2", "--noflush"], input=script, env=env, check=False)
        return round(time.monotonic() - t, 3), cp.returncode
    free = [restore_time() for _ in range(3)]
    fh = open(rig.lockfile, "r")
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        held = [restore_time() for _ in range(3)]
        # the lock is real and held: iptables-legacy waits for it (and gives up), touching nothing
        t = time.monotonic()
        legacy = lab.run("lb1", ["iptables-legacy", "-w", "1", "-t", "filter", "-n", "-L"], env=env, check=False)
        legacy_s = round(time.monotonic() - t, 3)
        version = lab.run("lb1", ["iptables", "--version"]).stdout.strip()
        load = rig.load()
        time.sleep(1.0)
        fails0 = rig.host_log("lb1").count("FAILED")
        # another program writes iptables rules all through the transition
        writer = lab.popen("lb1", ["sh", "-c", "for i in $(seq 150); do iptables -w -A FORWARD -s 192.0.2.7 -j ACCEPT; "
                                               "iptables -w -D FORWARD -s 192.0.2.7 -j ACCEPT; done"],
                           name="other-iptables", env=env)
        t0 = time.time()
        pair.stop_keepalived("lb1")  # lb1: STOP -> tear down (iptables-restore) with the lock held
        lab.wait_state("lb2", "MASTER", 10)
        pair.wait_settled("lb1", False, 20)
        down_s = time.time() - t0
        t1 = time.time()
        pair.start_keepalived(["lb1"])  # BACKUP -> hot standby up (iptables-restore), then MASTER
        pair.wait_settled("lb1", True, 20)
        up_s = time.time() - t1
        lab.wait_state("lb1", "MASTER", 20)
        rig.settle()
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(60)
        time.sleep(1.0)
        res = load.finish(t0)
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
    fails = rig.host_log("lb1").count("FAILED") - fails0
    left = "192.0.2.7" in lab.run("lb1", ["iptables-save"]).stdout
    drift = rig.drift("lb1") + rig.drift("lb2")
    nft = "nf_tables" in version
    ok = all_kept(res) and not drift and not left
    return row("xtables_lock", "xtables lock held by another program during a transition",
               "the xtables lock held (flock) all through lb1's STOP and restart, with another program "
               "adding and deleting its own iptables rule 300 times meanwhile", res, ok=ok,
               recovery=res["new"]["recovery"],
               figures={"iptables": version, "restore_s_lock_free": free, "restore_s_lock_held": held,
                        "legacy_with_lock_held": {"rc": legacy.returncode, "s": legacy_s,
                                                  "stderr": legacy.stderr.strip()[-120:]},
                        "teardown_s": round(down_s, 3), "reinstall_s": round(up_s, 3), "reconcile_failures": fails,
                        "writer_rc": writer.returncode, "drift_after": drift},
               notes=[f"{version}: iptables-restore took {max(t for t, _ in held):.3f} s with the lock held, "
                      f"{max(t for t, _ in free):.3f} s without" + (
                          " - iptables-nft never takes the xtables lock (`--wait` is accepted and ignored); "
                          "nf_tables serializes commits in the kernel, and the other program's concurrent "
                          "commits did not fail synlb's" if nft else ""),
                      f"lb1 torn down {down_s:.2f} s after its keepalived stopped and reinstalled "
                      f"{up_s:.2f} s after it started; {fails} failed reconciles",
                      f"the lock was real: `iptables-legacy -w 1` waited {legacy_s:.2f} s for it and gave up "
                      f"(exit {legacy.returncode}); with the legacy backend synlb's iptables-restore would wait up "
                      "to 5 s (--wait 5), then the reconcile fails and is retried with backoff (test_host_retry)"])


class DiskFiller:
    """Another program filling a file system: writes FILE until ENOSPC, and
    again whenever space comes free (every 5 ms), until stopped (at most
    ``max_seconds``); then the file is removed."""

    def __init__(self, path: str, max_seconds: float = 60.0):
        self.path, self.max_seconds = path, max_seconds
        self.written = 0
        self._stop = threading.Event()
        self.full = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "DiskFiller":
        self._t.start()
        if not self.full.wait(30):
            raise LabError(f"{self.path}: not full after 30 s")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                for chunk in (1 << 20, 4096, 1):
                    block = b"f" * chunk
                    for _ in range((64 << 20) // chunk):
                        try:
                            n = os.write(fd, block)
                        except OSError:
                            break
                        self.written += n
                        if n < chunk:
                            break
                self.full.set()
                self._stop.wait(0.005)
        finally:
            os.close(fd)


def full_state_dir(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    sd = rig.state_dir("lb1")
    if not rig.mounted:
        return row("full_state_dir", "Full state directory", "not run", {"load": "-", "sessions": {}, "new": {}},
                   ok=False, recovery=None, figures={},
                   notes=[f"could not mount a tmpfs in the lab directory: {rig.mount_error}"])
    def worker_tracebacks() -> int:
        n = 0
        for name in (statedir.worker_log(sd, 0), statedir.worker_log_old(sd, 0)):
            with contextlib.suppress(OSError), open(name, errors="replace") as fh:
                n += fh.read().count("Traceback")
        return n
    load = rig.load()
    time.sleep(1.0)
    pid = wait_for(rig.worker_ready, "worker ready", 10)
    fails0 = rig.host_log("lb1").count("FAILED")
    tb0 = worker_tracebacks()
    hold = 5.0
    with DiskFiller(os.path.join(sd, "filler")) as filler:
        st = os.statvfs(sd)
        pair.hosts["lb1"].send_signal(signal.SIGHUP)  # a reload with nothing to change
        time.sleep(1.0)
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        time.sleep(hold)
        during = rig.worker_ready()
        status_full = rig.host_status()
        failing = (status_full.get("failing") or {})
        written = filler.written
        t_free = time.time()
    new_pid = wait_for(lambda: (p := rig.worker_ready()) and p != pid and p, "worker back", 40, 0.02)
    back = time.time() - t_free
    time.sleep(1.0)
    res = load.finish(t_kill)
    log = rig.host_log("lb1")
    fails = log.count("FAILED") - fails0
    rig.settle()
    converged = wait_for(lambda: rig.host_status().get("failing") is None, "converged", 40, 0.2)
    drift = rig.drift("lb1")
    new = res["new"]
    tbs = worker_tracebacks() - tb0
    ok = all_kept(res) and not drift and bool(converged) and back < 3.0 and tbs == 0
    return row("full_state_dir", "Full state directory",
               f"lb1's state dir (a {STATE_TMPFS} tmpfs mounted in the lab directory) kept full (ENOSPC) by "
               f"another writer; a SIGHUP, then the worker SIGKILLed; space freed {hold:.0f} s later", res, ok=ok,
               recovery=round(back, 3),
               figures={"filled_bytes": written, "free_blocks": st.f_bavail, "worker_while_full": during,
                        "failing_while_full": {k: failing.get(k) for k in ("attempts", "errors", "retry_in")},
                        "failed_reconciles": fails, "worker_back_after_free_s": round(back, 3),
                        "new_worker": new_pid, "drift_after": drift, "worker_tracebacks": tbs},
               notes=[f"while full no worker could start ({'none running' if not during else 'one ran!'}): "
                      f"{fails} failed reconciles ({(failing.get('errors') or ['?'])[0]}), retried with backoff "
                      "and by the drift check every second; status shows `failing`",
                      f"new connections while the worker was missing: {new['failed']} failed, {new['slow']} slow "
                      f"of {new['total']} (no listener on the queue: the kernel drops the SYN)",
                      f"worker back {back:.2f} s after space was freed; established sessions never need the "
                      "worker: none lost",
                      f"tracebacks in the worker's log: {tbs} (a worker that starts but cannot write its stats "
                      "file leaves its queue with one line, exit 1)"])


# ---------------------------------------------------------------- bad input

BATCH = r"""
import contextlib, io, json, sys, traceback
from synlb import cli
out = {}
for path in sys.argv[2:]:
    rec = {}
    for cmd in sys.argv[1].split(","):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(["-c", path, cmd])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc, err = "traceback", io.StringIO(traceback.format_exc())
        text = err.getvalue()
        rec[cmd] = {"rc": rc, "traceback": rc == "traceback" or "Traceback" in text, "first": text.strip()[:160]}
    out[path] = rec
print(json.dumps(out))
"""


def hypothesis_ini(examples: int, workdir: str, good: str | None = None) -> dict:
    """Run hypothesis-generated INI files through config.load; returns counts
    and up to 30 refused files (text) for the lab's reload."""
    from hypothesis import HealthCheck, given, settings

    from synlb import config as config_mod
    stats: Counter = Counter()
    crashes: list[str] = []
    refused: list[str] = []
    path = os.path.join(workdir, "hyp.ini")

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(badinput.ini_strategy(good))
    def one(text: str) -> None:
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
        try:
            config_mod.load(path)
            stats["loaded"] += 1
        except config_mod.ConfigError:
            stats["refused"] += 1
            if len(refused) < 30 and "[service:web]" in text and "state_dir" in text:
                refused.append(text)
        except Exception as e:  # noqa: BLE001 - a traceback: what this looks for
            stats["crashed"] += 1
            crashes.append(f"{type(e).__name__}: {e} in {text[:200]!r}")
    t0 = time.monotonic()
    one()
    return {"examples": sum(stats.values()), **dict(stats), "crashes": crashes[:5], "refused_texts": refused,
            "elapsed": round(time.monotonic() - t0, 1)}


def bad_ini(rig: Rig, fast: bool = False) -> dict:
    lab, pair = rig.lab, rig.pair
    conf = pair.config("lb1")
    with open(conf) as fh:
        good = fh.read()
    corpus = badinput.broken_ini(good)
    if fast:
        corpus = dict(list(corpus.items())[::6])
    work = os.path.join(lab.role_dir("lb1"), "badini")
    os.makedirs(work, exist_ok=True)
    hyp = hypothesis_ini(100 if fast else 2000, work, good)
    for i, text in enumerate(hyp.pop("refused_texts")[: 4 if fast else 25]):
        corpus[f"hypothesis #{i}"] = text.encode("utf-8", "surrogateescape")
    files = {}
    for i, (name, data) in enumerate(corpus.items()):
        p = os.path.join(work, f"{i:03d}.ini")
        with open(p, "wb") as fh:
            fh.write(data)
        files[p] = name
    before = snapshot(lab, "lb1", rig.state_dir("lb1"))
    pid = rig.worker_pid()
    transitions = rig.host_status().get("transitions")
    load = rig.load(probe=False)
    t0 = time.time()
    # synlb check and synlb up on each, in lb1's namespace
    cmds = "check,up"
    batch_files = [p for p, n in files.items() if n not in badinput.RESTART_ONLY]
    cp = lab.run("lb1", [sys.executable, "-c", BATCH, cmds, *batch_files], timeout=300)
    batch = json.loads(cp.stdout)
    # exit 1, or for `check` on a file that only lacks a service, 3 (nothing configured)
    ok_rc = {"check": (1, EXIT_UNCONFIGURED), "up": (1,)}
    cli_bad = {files[p]: r for p, r in batch.items()
               if any(v["traceback"] or v["rc"] not in ok_rc[c] for c, v in r.items())}
    after_cli = snapshot(lab, "lb1", rig.state_dir("lb1"))
    # each one as the running host's config, then SIGHUP
    reload_bad, kept_state = [], True
    host = pair.hosts["lb1"]
    from synlb import config as config_mod
    for p, name in files.items():
        n = rig.host_log("lb1").count("reload refused")
        tmp = conf + ".tmp"
        with open(p, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, conf)
        try:  # how many lines the host's refusal has: one per problem
            config_mod.load(conf)
            lines = 1  # valid, but plugins or state_dir changed: one line
        except config_mod.ConfigError as e:
            lines = len(e.lines())
        host.send_signal(signal.SIGHUP)
        try:
            wait_for(lambda: rig.host_log("lb1").count("reload refused") >= n + lines, f"reload refused: {name}",
                     8, 0.02)
        except LabError:
            reload_bad.append(name)
    with open(conf + ".tmp", "w") as fh:
        fh.write(good)
    os.replace(conf + ".tmp", conf)
    after = snapshot(lab, "lb1", rig.state_dir("lb1"))
    kept_state = after == before and rig.worker_pid() == pid
    elapsed = time.time() - t0
    res = load.finish(t0)
    tb = "Traceback" in rig.host_log("lb1")
    host.send_signal(signal.SIGHUP)  # the good one again: accepted
    wait_for(lambda: rig.host_log("lb1").rstrip().endswith(("no change", "configuration reloaded"))
             or "configuration reloaded" in rig.host_log("lb1")[-2000:], "good reload", 10)
    ok = (not cli_bad and not reload_bad and kept_state and after_cli == before and not tb
          and hyp.get("crashed", 0) == 0 and all_kept(res))
    ncorpus = len(files) - sum(n.startswith("hypothesis") for n in files.values())
    return row("bad_ini", "Broken INI files (corpus + hypothesis)",
               f"{ncorpus} broken files of the corpus and {len(files) - ncorpus} hypothesis-generated ones: "
               "`synlb check` and `synlb up` on each, then each as the running host's config + SIGHUP", res,
               ok=ok, recovery=None,
               figures={"corpus": ncorpus, "hypothesis": hyp, "cli_unexpected": cli_bad,
                        "reload_not_refused": reload_bad, "state_kept": kept_state,
                        "traceback_in_host_log": tb, "seconds": round(elapsed, 1)},
               notes=[f"hypothesis: {hyp['examples']} generated files through config.load: "
                      f"{hyp.get('refused', 0)} refused, {hyp.get('loaded', 0)} valid, {hyp.get('crashed', 0)} "
                      "tracebacks",
                      f"check and up: exit 1 with FILE:SECTION:KEY lines for all {len(batch)} "
                      f"(unexpected: {len(cli_bad)}), the kernel unchanged",
                      f"SIGHUP with each: refused {len(files) - len(reload_bad)}/{len(files)}, the router's "
                      f"rules, routes, sysctls and worker (pid) unchanged: {kept_state}",
                      "plugins or state_dir changed: valid files, refused by the running host (restart only)"])


def packet_fuzz(rig: Rig | None, fast: bool = False, cases: int | None = None) -> dict:
    cases = cases or (20_000 if fast else 1_000_000)
    r = badinput.fuzz_packets(cases)
    res = {"load": "in process (pure code)", "sessions": {}, "new": {}, "seconds": r["elapsed"]}
    return row("packet_fuzz", "Packet parser fuzzed",
               f"{r['cases']} seeded mutations (seed {r['seed']}) of {len(badinput.seed_packets())} valid packets "
               "through flow_key, its parser without the catch-all, and opens_connection", res,
               ok=r["failures"] == 0 and r["cases"] >= cases, recovery=None, figures=r,
               notes=[f"{r['failures']} failures (an exception, or a key against the contract); "
                      f"{r['per_case_us']} us per case",
                      f"keys: {r['keys']}", f"mutations: {r['mutations']}"])


def malformed(rig: Rig, fast: bool = False) -> dict:
    lab = rig.lab
    lab.open_connections(A.VIP[4], count=4, concurrency=2)
    lab.open_connections(A.VIP[6], count=4, concurrency=2)
    neigh = json.loads(lab.run("client", ["ip", "-j", "neigh", "show", A.FRONT_VRRP[4]]).stdout or "[]")
    mac = next((n["lladdr"] for n in neigh if n.get("lladdr")), None)
    if mac is None:
        raise LabError("no neighbour entry for the client's gateway")
    pid = wait_for(rig.worker_ready, "worker ready", 10)
    st0 = rig.worker_stats()
    logsize0 = os.path.getsize(statedir.worker_log(rig.state_dir("lb1"), 0))
    load = rig.load(probe=False)
    time.sleep(0.5)
    t0 = time.time()
    repeat = 1 if fast else 3
    cp = lab.run("client", [sys.executable, "-m", "synlb_lab.malformed", "--vip4", A.VIP[4], "--vip6", A.VIP[6],
                            "--src4", A.CLIENT[4], "--src6", A.CLIENT[6], "--gw-mac", mac,
                            "--iface", A.HOST_IF, "--repeat", str(repeat)], timeout=300)
    sent = json.loads(cp.stdout)
    time.sleep(1.5)  # the worker's stats tick
    st1 = rig.worker_stats()
    reached = st1.get("packets", 0) - st0.get("packets", 0)
    res = load.finish(t0)
    conns = {fam: lab.open_connections(A.VIP[fam], count=60, concurrency=10) for fam in (4, 6)}
    with open(statedir.worker_log(rig.state_dir("lb1"), 0), errors="replace") as fh:
        fh.seek(logsize0)
        new_log = fh.read()
    same = rig.worker_pid() == pid
    balances = all(c["ok"] == 60 and len(c["per_target"]) == 3 for c in conns.values())
    ok = same and balances and "Traceback" not in new_log and all_kept(res)
    return row("malformed", "Malformed packets and ICMP errors at the VIP (scapy)",
               f"{sent['total']} frames of {len(sent['sent'])} kinds (truncated, bad lengths/versions/checksums, "
               "IP and TCP options, odd flags, tiny/overlapping/incomplete fragments, 64 KB datagrams, IPv6 "
               "extension chains, jumbo, ICMP/ICMPv6 errors, random) from the client to the VIP", res, ok=ok,
               recovery=None,
               figures={"sent": sent, "reached_worker": reached, "worker_pid_kept": same,
                        "after": {f"v{f}": c["per_target"] for f, c in conns.items()},
                        "worker_log_lines": len(new_log.splitlines())},
               notes=[f"{reached} of them reached the worker (the kernel drops what IP or conntrack cannot "
                      "parse; the queue rule also takes INVALID TCP to the VIP's port)",
                      f"worker pid unchanged: {same}; afterwards 60 + 60 new connections over "
                      f"{sorted(conns[4]['per_target'])}: {balances}",
                      "no traceback in the worker's log" if "Traceback" not in new_log else "TRACEBACK in the worker log"])


# ---------------------------------------------------------------- the run

SCENARIOS: list[tuple[str, Callable, bool]] = [  # name, function, in the fast part
    ("worker_kill", worker_kill, True),
    ("reload_sighup", reload_sighup, True),
    ("malformed", malformed, True),
    ("bad_ini", bad_ini, True),
    ("syn_flood", syn_flood, True),
    ("egress_link", egress_link, False),
    ("keepalived_restart", keepalived_restart, False),
    ("both_keepalived", both_keepalived, False),
    ("xtables_lock", xtables_lock, False),
    ("full_state_dir", full_state_dir, False),
    ("conntrack_full", conntrack_full, False),
]


def run(names: list[str] | None = None, fast: bool = False, out: Callable = print,
        fuzz_cases: int | None = None) -> dict:
    chosen = [s for s in SCENARIOS if (names is None and (s[2] or not fast)) or (names and s[0] in names)]
    t0 = time.time()
    rows = []
    meta = environment()
    with Rig() as rig:
        meta["lab_setup_s"] = round(time.time() - t0, 1)
        meta["prefix"] = rig.lab.prefix
        meta["state_tmpfs"] = rig.mounted is not None
        for name, fn, _ in chosen:
            out(f"--- {name}")
            ts = time.time()
            try:
                rig.settle()
                r = fn(rig, fast)
            except Exception as e:  # noqa: BLE001 - a scenario that broke is a row too
                r = row(name, name, "scenario raised", {"load": "-", "sessions": {}, "new": {}}, ok=False,
                        recovery=None, figures={}, notes=[f"{type(e).__name__}: {e}"])
            r["elapsed"] = round(time.time() - ts, 1)
            rows.append(r)
            out(f"    {'ok' if r['ok'] else 'NOT OK'} in {r['elapsed']} s: {r['notes'][:2]}")
        meta["tracebacks"] = tracebacks(rig)
    if names is None or "packet_fuzz" in (names or []):
        ts = time.time()
        r = packet_fuzz(None, fast, fuzz_cases)
        r["elapsed"] = round(time.time() - ts, 1)
        rows.append(r)
        out(f"--- packet_fuzz: {'ok' if r['ok'] else 'NOT OK'} {r['notes'][0]}")
    meta["total_s"] = round(time.time() - t0, 1)
    return {"meta": meta, "fast": fast, "rows": rows}


def tracebacks(rig: Rig) -> dict:
    """Tracebacks in the hosts' and the workers' logs over the whole run (a crash would leave one)."""
    out = {}
    for r in rig.lab.routers:
        with contextlib.suppress(OSError, KeyError):
            out[f"{r} synlb run"] = rig.host_log(r).count("Traceback")
        sd = rig.state_dir(r)
        for name in sorted(os.listdir(sd)) if os.path.isdir(sd) else []:
            if name.startswith("worker-") and ".log" in name:
                with open(os.path.join(sd, name), errors="replace") as fh:
                    out[f"{r} {name}"] = fh.read().count("Traceback")
    return out


def environment() -> dict:
    def first_line(argv):
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (cp.stdout or cp.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "keepalived": first_line(["keepalived", "--version"]),
            "iptables": first_line(["iptables", "--version"])}


# ---------------------------------------------------------------- the report

def _kept(r: dict) -> str:
    s = r.get("sessions") or {}
    if not s:
        return "-"
    text = f"{s['kept']}/{s['total']} kept, {s['reset']} reset, {s['moved']} moved"
    if s.get("max_gap"):
        text += f" (longest pause {s['max_gap']:.2f} s)"
    return text


def _new(r: dict) -> str:
    n = r.get("new") or {}
    if not n or not n.get("total"):
        return "-"
    return f"{n['failed']} failed, {n['slow']} slow of {n['total']}"


def _rec(r: dict) -> str:
    v = r.get("recovery")
    if v is None:
        return "-"
    return f"{v:.2f} s ({r['recovery_what']})" if r.get("recovery_what") else f"{v:.2f} s"


def render(data: dict) -> str:
    m = data["meta"]
    rows = data["rows"]
    ok = sum(r["ok"] for r in rows)
    out = [
        "# Reliability",
        "",
        "<!-- generated by `make reliability` (python -m synlb_lab.reliability); do not edit by hand -->",
        "",
        "Faults, load and bad input in the netns lab, each with sessions running. One 2-router lab: "
        "keepalived on both (the shipped `conf/keepalived.conf.example`: advert_int 0.03, preempt_delay 5, "
        "notify hook), `synlb run` on both (hot standby), targets t1..t3; the routers start as a real "
        "one is set up (conntrack loose pickup off, a firewall dropping INVALID forwarded packets) and "
        "synlb turns pickup on while active. The load of each scenario: "
        "long sessions (echo: client speaks first; upload: 8 KiB every 0.05 s; IPv4 and IPv6) and a "
        "probe opening a new connection every 0.05 s (IPv4 and IPv6 in turn). A session is *kept* if it "
        "never failed and stayed on its target, *reset* if it failed, *moved* if it reached another "
        "target; a new connection is *slow* if it took more than 0.5 s (a SYN retransmitted), *failed* "
        "if it did not connect within 4 s. *Recovery*: from the fault (or its end, see the row) until "
        "new connections were served at once again.",
        "",
        f"Run {m['date']}: {m.get('total_s', 0):.0f} s in all (lab set up in {m.get('lab_setup_s', 0)} s), "
        f"{ok}/{len(rows)} scenarios as expected; Linux {m['kernel']}, {m['cpus']} CPUs shared with other "
        f"work, Python {m['python']}, {m['keepalived']}, {m['iptables']}. Tracebacks in the hosts' and "
        f"workers' logs over the whole run: {sum((m.get('tracebacks') or {}).values())}. Figures: "
        "[bench/results/reliability.json](../bench/results/reliability.json).",
        "",
        "| scenario | what was done | load held | sessions | new connections | recovery | as expected | main note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = r["notes"][0].replace("|", "/") if r["notes"] else ""
        out.append(f"| {r['title']} | {r['done']} | {r.get('load', '-')} | {_kept(r)} | {_new(r)} | {_rec(r)} | "
                   f"{'yes' if r['ok'] else '**no**'} | {notes} |")
    out += ["", "## Per scenario", ""]
    for r in rows:
        out.append(f"### {r['title']}")
        out.append("")
        for n in r["notes"]:
            out.append(f"- {n}")
        figs = {k: v for k, v in r["figures"].items() if k not in ("examples",)}
        out.append(f"- figures: `{json.dumps(figs, sort_keys=True)[:1500]}`")
        out.append(f"- ran {r.get('elapsed', '?')} s")
        out.append("")
    out += findings({r["name"]: r for r in rows})
    out += EXTRA_DOC
    return "\n".join(out) + "\n"


def findings(by: dict) -> list[str]:
    """What the scenarios show synlb does not (yet) do, with their figures."""
    def fig(name: str, *path, default="?"):
        v = by.get(name, {}).get("figures", {})
        for k in path:
            v = v.get(k, default) if isinstance(v, dict) else default
        return v

    def new(name: str) -> str:
        n = by.get(name, {}).get("new") or {}
        return f"{n.get('failed', '?')} failed and {n.get('slow', '?')} slow of {n.get('total', '?')}"
    out = ["## Fixed on the way", "",
           "- A worker started on a full state dir that could not write its stats file right after binding "
           "(how its starter learns that it holds the queue) died on an OSError traceback, and so did one "
           "that could not write it at its stop: it now leaves the queue with one line and exits 1, or only "
           "logs (`tests/test_worker_full_disk.py`, failing before the fix). Seen as a traceback in lb1's "
           "worker log after the full-state-dir scenario.", "",
           "## Limits found (not fixed)", ""]
    if "full_state_dir" in by:
        out.append(
            "- **A worker cannot start while the state dir is full.** Its table, pid and stats files must be "
            "written first, so after a worker crash on a full `/run` new connections are dropped (no listener "
            f"on the queue) until space comes free: {new('full_state_dir')} new connections in the scenario; "
            f"the worker came back {fig('full_state_dir', 'worker_back_after_free_s')} s after space was freed, "
            "and `synlb status` shows the reconcile failing (`No space left on device`) all along. Running "
            "workers and established sessions are not affected. A fix would keep pre-sized files and rewrite "
            "them in place (no new blocks); not done. Keep `/run` from filling: synlb's own files are bounded "
            "(a worker's log at 2 MiB).")
    if "worker_kill" in by:
        out.append(
            "- **The drift check restarts a dead worker within a second, whatever the supervisor's backoff.** "
            f"Measured restarts after three kills 2 s apart: {fig('worker_kill', 'restart_s')} s (the supervisor "
            "alone would wait 0, 0.5, 1 s): a worker that keeps dying is restarted about every second instead "
            "of backing off to 8 s. Harmless for one crash; a crash loop costs a process start a second.")
    if "syn_flood" in by:
        out.append(
            "- **A SYN flood shares the queue with real clients.** At "
            f"{fig('syn_flood', 'offered_over_handled')}x what the worker took "
            f"({fig('syn_flood', 'worker_per_s')}/s), the kernel dropped {fig('syn_flood', 'queue_dropped')} "
            f"SYNs at the full queue, and real new connections suffered with them ({new('syn_flood')} during "
            "the run); established sessions did not, the worker's memory did not grow, and new connections "
            "were served at once again as soon as the flood stopped. synlb has no SYN rate limit of its own: "
            "more queues (`queue = 0-1`, one worker per core), a `hashlimit` rule in front of the queue, or "
            "SYN cookies on the targets are the tools.")
    if "conntrack_full" in by:
        out.append(
            "- **conntrack full is the kernel's business.** `nf_conntrack_max` cannot be set in a namespace "
            "(read-only outside the init namespace), so the scenario filled lb1's table to the global maximum "
            f"({fig('conntrack_full', 'nf_conntrack_max')}). The kernel then evicts entries that are not "
            f"*assured* (early_drop +{fig('conntrack_full', 'stats_delta', 'early_drop')}) to admit new ones, "
            "so new connections kept working; a table full of established (assured) connections would drop "
            "new ones instead (not reproduced: it needs that many real connections). Size "
            "`nf_conntrack_max` for the router; synlb reads no conntrack state on the packet path.")
    if "xtables_lock" in by:
        out.append(
            "- **The xtables lock was measured with iptables-nft only** (Debian 12's default): it never takes "
            "the lock, so holding it changes nothing. With the legacy backend synlb's `iptables-restore "
            "--wait 5` waits for it and a reconcile that still fails is retried with backoff "
            "(tests/test_host_retry.py); that path was not run against a held lock in the lab.")
    if "both_keepalived" in by:
        out.append(
            "- **With keepalived stopped on both routers nothing is balanced** (by design: STOP removes the "
            "data plane, and no router owns the gateway addresses). Sessions survive the outage by TCP "
            f"retransmission (longest pause {by['both_keepalived'].get('sessions', {}).get('max_gap', '?')} s) "
            "because their conntrack entries and marks outlive the teardown; new connections fail meanwhile "
            f"({new('both_keepalived')}).")
    return out + [""]


EXTRA_DOC = [
    "## How it is run",
    "",
    "- `make reliability` runs every scenario in one lab (well under 15 minutes), then fuzzes the packet "
    "parser for a million cases, and writes this file and `bench/results/reliability.json`. "
    "`make test` runs the fast part (`tests/test_reliability_lab.py`: worker kill, reload, malformed "
    "packets, broken INI files, a short flood, 20 000 fuzz cases) and the pure checks "
    "(`tests/test_reliability_inputs.py`).",
    "- The code: `lab/synlb_lab/reliability.py` (scenarios, this report), `lab/flood.py` (raw-socket "
    "SYN flood, conntrack filler), `lab/malformed.py` (scapy packets), `lab/badinput.py` (packet fuzzer, "
    "INI corpus, hypothesis strategy).",
    "- Traffic goes only to lab addresses inside the lab's namespaces (the generators refuse anything else); "
    "lb1's state dir is a tmpfs mounted inside the lab's directory and unmounted at the end; the hosts' "
    "iptables lock file is the lab's (`XTABLES_LOCKFILE`).",
    "",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synlb_lab.reliability")
    p.add_argument("--fast", action="store_true", help="the fast part only (what make test runs)")
    p.add_argument("--only", nargs="*", help="these scenarios only")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "reliability.json"))
    p.add_argument("--markdown", default=os.path.join(REPO, "docs", "RELIABILITY.md"))
    p.add_argument("--fuzz-cases", type=int, default=None)
    p.add_argument("--render", action="store_true", help="only write the markdown again from the JSON")
    a = p.parse_args(argv)
    if a.render:
        with open(a.json) as fh:
            data = json.load(fh)
        with open(a.markdown, "w") as fh:
            fh.write(render(data))
        return 0
    if os.geteuid() != 0:
        print("reliability: needs root (network namespaces)", file=sys.stderr)
        return 1
    data = run(a.only, a.fast, fuzz_cases=a.fuzz_cases)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(a.json), delete=False) as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(fh.name, a.json)
    with open(a.markdown, "w") as fh:
        fh.write(render(data))
    print(f"wrote {a.markdown} and {a.json}: {sum(r['ok'] for r in data['rows'])}/{len(data['rows'])} as expected")
    return 0 if all(r["ok"] for r in data["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
