"""Failover in the netns lab: two routers with real keepalived (Debian's 2.2),
synlb on both, real TCP sessions through failovers.

Every router starts with conntrack loose pickup off and a firewall dropping
INVALID forwarded packets (a real router's defaults), so that only synlb's
pickup lets a new master adopt running sessions.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest
from synlb.vrrp import events as vrrp
from synlb_lab.demo_failover import (
    FAMILIES,
    GAP_LIMIT,
    PATTERNS,
    Pair,
    fail_back,
    fail_over,
    run_failover,
    snapshot,
    start_sessions,
    stop_sessions,
    summarize,
)
from synlb_lab import addresses as A
from synlb_lab.netns import netns_exec_argv, netns_pids
from synlb.vrrp import dbus as vrrp_dbus
from synlb_lab.scenario import synlb_exe
from synlb_lab.topology import Lab

pytestmark = pytest.mark.lab(tools=("ip", "keepalived", "conntrack", "iptables", "dbus-daemon"))

COUNT = 20  # sessions per pattern and family
PICKUP_OFF_HOLD = 3.0  # s before and after the failover without pickup: more than the client's stall limit


def report(title: str, res: dict) -> None:
    print(f"\n{title}: {res['kept']}/{res['sessions']} kept, {res['moved']} moved, "
          f"longest gap {res['max_gap']:.3f} s (limit {GAP_LIMIT:.2f}); steps {res.get('steps')}")
    for k, v in res["per"].items():
        print(f"  {k:<8} kept {v['kept']}/{v['sessions']} moved {v['moved']} gap {v['max_gap']:.3f} {v['errors']}")


def assert_all_kept(res: dict) -> None:
    bad = {k: v for k, v in res["per"].items() if v["kept"] != v["sessions"] or v["moved"]}
    assert not bad, bad


def log_marks(pair: Pair) -> dict[str, int]:
    """Where each router's vrrp.log stands now (see assert_hot_takeovers)."""
    return {r: len(pair.vrrp_log(r)) for r in pair.lab.routers}


def assert_hot_takeovers(pair: Pair, since: dict[str, int], takeovers: int) -> None:
    """Hot standby: a router that becomes MASTER has nothing left to install,
    so the running sessions wait for VRRP and TCP only, never for synlb. That
    is what keeps the failover gap to about VRRP's detection time (the gap
    is printed against GAP_LIMIT by report(); `make bench` judges it against
    its target). Every MASTER event the notify hook recorded since ``since``
    changed nothing in the data plane, and there were ``takeovers`` of them."""
    masters = [(r, e) for r in pair.lab.routers for e in pair.vrrp_log(r)[since[r]:]
               if not e.get("ignored") and e.get("stored") and e["event"]["state"] == "MASTER"]
    assert len(masters) == takeovers, masters
    assert all(e.get("changes") == [] for _, e in masters), masters


def sources(pair: Pair, r: str) -> set:
    return {e["event"]["source"] for e in pair.vrrp_log(r) if not e.get("ignored")}


@pytest.fixture
def lab(open_lab):
    return open_lab(Lab, routers=2, targets=3, server_ports=(80,))


# ---------------------------------------------------------------- sessions survive

@pytest.mark.parametrize("engine", ["nfqueue", "nftables"])
def test_sessions_survive_failover_and_failback(lab, engine):
    """20 sessions x {echo, push, down, up} x {IPv4, IPv6} through: the
    master's links down + fail back, then its keepalived stopped + fail back
    (notify hook, hot standby); on either engine."""
    pair = Pair(lab, engine=engine)
    pair.prepare()
    pair.start()
    active_ref = {r: snapshot(lab, r, pair.state_dir(r)) for r in lab.routers}

    marks = log_marks(pair)
    links = run_failover(pair, "links", COUNT)
    report("links down", links)
    assert_hot_takeovers(pair, marks, takeovers=2)  # over to lb2, back to lb1
    marks = log_marks(pair)
    stop = run_failover(pair, "keepalived", COUNT)
    report("keepalived stopped", stop)
    assert_hot_takeovers(pair, marks, takeovers=2)
    for res in (links, stop):
        assert_all_kept(res)
        assert res["sessions"] == COUNT * len(PATTERNS) * len(FAMILIES)

    # every transition went through the hook; lb1 saw FAULT and STOP, each
    # removing everything and restoring the sysctls (checked on the way by
    # fail_over's wait_settled); after fail back both are as at the start
    log = [e for e in pair.vrrp_log("lb1") if not e.get("ignored")]
    stored = [e["event"]["state"] for e in log if e.get("stored")]
    later = ["MASTER", "FAULT", "BACKUP", "MASTER", "STOP", "BACKUP", "MASTER"]
    assert stored in (["BACKUP"] + later, later), stored
    if stored == later:
        # keepalived starts the start-up BACKUP and MASTER hooks 0.1 s apart; when
        # MASTER's takes the lock first, BACKUP's is recorded as older, not applied
        assert [e["event"]["state"] for e in log if not e.get("stored")][:1] == ["BACKUP"], log
    assert sources(pair, "lb1") == sources(pair, "lb2") == {"notify"}
    for r in lab.routers:
        assert snapshot(lab, r, pair.state_dir(r)) == active_ref[r], r
    pair.close()


def test_failover_without_pickup_loses_sessions(lab):
    """The same failover with pickup = no: the new master drops the running
    sessions' packets as INVALID, so the test above can fail.

    "Lost" is what the sessions did after the failover, whatever its speed.
    The client counts a session as kept unless it failed or its final silence
    exceeds its stall limit (2 s). run_failover stops the sessions ``hold``
    seconds after fail_over returned; with the default 1 s, a failover that
    settled within about a second left the dead sessions' final silence under
    2 s, and they counted as kept (30 of 40 once, on a loaded machine). Held
    longer than the stall limit, a session whose data stopped at the failover
    cannot pass, and every session's final silence shows that nothing came
    after the failover."""
    pair = Pair(lab, pickup=False)
    pair.prepare()
    pair.start()
    for r in lab.routers:
        assert snapshot(lab, r, pair.state_dir(r))["sysctl"] == {
            "net.netfilter.nf_conntrack_tcp_loose": "0", "net.netfilter.nf_conntrack_tcp_be_liberal": "0"}
    res = run_failover(pair, "links", 5, back=False, hold=PICKUP_OFF_HOLD)
    report("links down, pickup off", res)
    assert all(r["stall"] < PICKUP_OFF_HOLD for r in res["results"].values())
    assert res["kept"] == 0, res["per"]
    # no session got anything through after the failover: each one's last
    # exchange came before fail_over returned, PICKUP_OFF_HOLD before the end
    quiet = [s["last_gap"] for r in res["results"].values() for s in r["sessions"]]
    assert len(quiet) == res["sessions"] and min(quiet) >= PICKUP_OFF_HOLD - 0.001, sorted(quiet)[:5]
    pair.close()


@pytest.mark.parametrize("engine", ["nfqueue", "nftables"])
def test_fault_and_stop_restore_the_router(lab, engine):
    """After FAULT (links down) and STOP (keepalived stopped) the old master
    is exactly as before synlb ever ran: ruleset (its own firewall rule
    included), rules, routes, sysctls, no worker, no nftables table."""
    pair = Pair(lab, engine=engine)
    pair.prepare()
    pair.start()
    for how in ("links", "keepalived"):
        fail_over(pair, how)
        snap = snapshot(lab, "lb1", pair.state_dir("lb1"))
        assert snap == pair.baseline["lb1"], how
        assert "-A FORWARD -m conntrack --ctstate INVALID -j DROP" in snap["iptables"]
        fail_back(pair, how)
    pair.close()


# ---------------------------------------------------------------- D-Bus and FIFO on their own

def _cold_failover(pair: Pair, over: str, back: str) -> None:
    """Cold standby: the BACKUP has nothing installed, so the takeover
    depends on the event source delivering MASTER (and FAULT/STOP on the old
    master); sessions must survive it."""
    lab = pair.lab
    assert pair.wait_settled("lb1", True) and pair.wait_settled("lb2", False)
    handles = start_sessions(lab, 5, patterns=("echo", "push"))
    try:
        time.sleep(0.5)
        fail_over(pair, over)  # waits: lb2 active, lb1 inactive
        time.sleep(0.5)
        fail_back(pair, back)  # waits: lb1 active, lb2 inactive again
        time.sleep(0.5)
    finally:
        res = summarize(stop_sessions(handles))
    report(f"cold standby via {pair.source}: {over}", res)
    assert_all_kept(res)  # cold: the takeover waits for the workers to start (not a hot takeover)


def test_dbus_alone_drives_failover(lab):
    pair = Pair(lab, source="dbus", standby="cold")
    pair.prepare()
    # a bus without keepalived on it: one clear line, exit 1 (unless --wait)
    lab.start_dbus("lb1")
    r = lab.run("lb1", [synlb_exe(), "--config", pair.config("lb1"), "dbus"], check=False, timeout=30,
                env={"DBUS_SYSTEM_BUS_ADDRESS": lab.dbus_address("lb1")})
    assert r.returncode == 1 and r.stderr.startswith("synlb dbus: keepalived is not on the bus"), r.stderr
    assert len(r.stderr.splitlines()) == 1
    pair.start()  # listeners started after keepalived: they read State at start
    with open(lab.keepalived_paths("lb1")["conf"]) as fh:
        conf = fh.read()
    assert "\n    enable_dbus" in conf and "keepalived-notify --config" not in conf
    assert "\n    notify_fifo" not in conf
    _cold_failover(pair, "links", "links")
    # VrrpReloaded: the listener re-reads State and re-applies (still inactive)
    n = len(pair.vrrp_log("lb2"))
    lab.run("lb2", ["kill", "-HUP", str(lab._kstate("lb2")["keepalived"].pid)])
    deadline = time.monotonic() + 10
    while len(pair.vrrp_log("lb2")) == n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pair.vrrp_log("lb2")[-1]["latest"] == "BACKUP"
    pair.wait_settled("lb2", False)
    # keepalived stopped: STOP over D-Bus
    fail_over(pair, "keepalived")
    assert pair.vrrp_log("lb1")[-1]["latest"] == "STOP"
    for r in lab.routers:
        assert sources(pair, r) == {"dbus"}
    pair.close()


def test_fifo_alone_drives_failover(lab):
    pair = Pair(lab, source="fifo", standby="cold")
    pair.prepare()
    pair.start()
    with open(lab.keepalived_paths("lb1")["conf"]) as fh:
        conf = fh.read()
    assert "\n    notify_fifo_script" in conf and "keepalived-notify --config" not in conf
    # keepalived stopped: it SIGTERMs the reader, then writes STOP to the FIFO
    _cold_failover(pair, "keepalived", "keepalived")
    assert [e["event"]["state"] for e in pair.vrrp_log("lb1") if e.get("stored")][-3:] == \
        ["STOP", "BACKUP", "MASTER"]
    fail_over(pair, "links")
    for r in lab.routers:
        assert sources(pair, r) == {"fifo"}
    pair.close()


# ---------------------------------------------------------------- churn and races

def fire_notifies(pair: Pair, r: str, states: list[str]) -> None:
    """keepalived-style: start the hooks in order, without waiting, all at once."""
    env = {**os.environ, **pair.env()}
    procs = [subprocess.Popen(netns_exec_argv(pair.lab.ns(r), [pair.hook, "--config", pair.config(r),
                                                               "GROUP", "G1", s, "0"]),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for s in states]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def notify_pids(lab: Lab, r: str) -> set[int]:
    """The notify hooks (keepalived-notify, synlb notify) running in router ``r``."""
    out = set()
    for pid in netns_pids(lab.ns(r)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        if "notify" in argv and any("synlb" in a or "keepalived-notify" in a for a in argv):
            out.add(pid)
    return out


def test_transitions_and_races_end_in_the_clean_state(lab):
    pair = Pair(lab)
    pair.prepare()
    pair.start()
    inactive = pair.baseline
    active = {r: snapshot(lab, r, pair.state_dir(r)) for r in lab.routers}
    assert all(active[r] != inactive[r] for r in lab.routers)

    # 20 transitions from keepalived itself: lb1's links flap, a change every
    # 0.5 s, each one once keepalived has started the notify hook for the
    # previous one (so each change is a transition of its own)
    n0 = len(pair.vrrp_log("lb1"))
    seen = notify_pids(lab, "lb1")
    racing = 0  # changes made while an earlier hook still ran
    t0 = time.monotonic()
    for i in range(20):
        time.sleep(max(0.0, t0 + 0.5 * i - time.monotonic()))
        racing += bool(notify_pids(lab, "lb1"))
        (lab.restore_links if i % 2 else lab.fail_links)("lb1")
        deadline = time.monotonic() + 10
        while True:
            pids = notify_pids(lab, "lb1")
            if pids - seen or len(pair.vrrp_log("lb1")) - n0 > i:
                seen |= pids
                break
            assert time.monotonic() < deadline, f"keepalived started no notify hook for link change {i}"
            time.sleep(0.01)
    elapsed = time.monotonic() - t0
    lab.wait_state("lb1", "MASTER", 30)
    lab.wait_state("lb2", "BACKUP", 10)
    for r in lab.routers:
        assert pair.wait_settled(r, True, 60) == active[r], r
    events = [e for e in pair.vrrp_log("lb1")[n0:] if not e.get("ignored")]
    states = [e["event"]["state"] for e in events]
    print(f"\nlinks flapped 10 times in {elapsed:.1f} s ({racing} changes while a hook still ran): "
          f"lb1 got {len(states)} notifications: {states}")
    assert states.count("FAULT") >= 10 and len(states) >= 21  # + the final MASTER

    # notify calls fired concurrently in shuffled order: the last one wins,
    # and the result is exactly what one clean transition to it gives
    rnd = random.Random(3)
    for last in ("FAULT", "MASTER", "STOP", "BACKUP"):
        states = [s for s in ("MASTER", "BACKUP", "FAULT", "STOP") for _ in range(3)]
        rnd.shuffle(states)
        states.append(last)
        fire_notifies(pair, "lb2", states)
        want_active = vrrp.desired_active(last, "hot")
        snap = pair.wait_settled("lb2", want_active, 60)
        assert snap == (active if want_active else inactive)["lb2"], (states, last)
        from synlb.vrrp import journal
        assert journal.read_state(pair.state_dir("lb2"))["event"].state == last
    pair.close()


def test_events_go_through_synlb_run_when_it_runs(lab):
    """With the plugin host (synlb run) on both routers, the hook records the
    event and the host, which owns the data plane, follows the record."""
    pair = Pair(lab)
    pair.prepare()
    hosts = [lab.popen(r, [synlb_exe(), "--config", pair.config(r), "run"], name="synlb-run")
             for r in lab.routers]
    deadline = time.monotonic() + 20
    while not all(os.path.exists(os.path.join(pair.state_dir(r), "control.sock")) for r in lab.routers):
        assert time.monotonic() < deadline and all(h.poll() is None for h in hosts)
        time.sleep(0.1)
    pair.start()
    res = run_failover(pair, "links", 5, patterns=("echo", "down"), back=False)
    report("links down, through synlb run", res)
    assert_all_kept(res)
    # hot standby through the host too: lb2's host had nothing to install when it became MASTER
    history = pair.host_status("lb2")["host"]["history"]
    became = [h for h in history if h["node"] == "MASTER"]
    assert became and became[0]["changes"] == 0, history
    for r, node in (("lb1", "FAULT"), ("lb2", "MASTER")):
        last = pair.vrrp_log(r)[-1]
        assert last["latest"] == node and last["host"] == {"ok": True, "node": node}, last
        assert "changes" not in last  # the host applied it, not the hook
    for h in hosts:
        lab.stop_process(h)
    pair.close()


def test_host_follows_dbus_itself(lab):
    """`synlb run` with the dbus plugin owns the D-Bus event source: no
    `synlb dbus` process, no notify hook; the host records and applies."""
    pair = Pair(lab, source="dbus", standby="cold", dbus_in_host=True)
    pair.prepare()
    pair.start()
    for r in lab.routers:
        st = lab.run(r, [synlb_exe(), "--config", pair.config(r), "status", "--json"]).stdout
        assert '"dbus"' in st and "following" in st
    _cold_failover(pair, "links", "links")
    for r in lab.routers:
        assert sources(pair, r) == {"dbus"}
        assert all(e.get("host", {}).get("ok") for e in pair.vrrp_log(r) if not e.get("ignored")), r
    pair.close()


@pytest.mark.lab(tools=("dbus-send",))
def test_dbus_signals_from_anyone_but_keepalived_are_ignored(lab):
    """Any local user can send signals on the system bus: VrrpStopped, a
    FAULT VrrpStatusChange or a NameOwnerChanged saying keepalived left,
    sent by another client (dbus-send), change nothing: lb1 stays MASTER
    with its data plane, and its listener records no event."""
    pair = Pair(lab, source="dbus", standby="cold")
    pair.prepare()
    pair.start()
    assert pair.wait_settled("lb1", True) and pair.wait_settled("lb2", False)
    before = len(pair.vrrp_log("lb1"))
    env = {"DBUS_SYSTEM_BUS_ADDRESS": lab.dbus_address("lb1")}
    path = vrrp_dbus.instance_path(f"{A.ROUTER_FRONT_IF}/51/IPv4")
    fakes = [
        [vrrp_dbus.VRRP_PATH, f"{vrrp_dbus.IFACE_VRRP}.VrrpStopped"],
        [path, f"{vrrp_dbus.IFACE_INSTANCE}.VrrpStatusChange", "uint32:3"],
        ["/org/freedesktop/DBus", "org.freedesktop.DBus.NameOwnerChanged",
         f"string:{vrrp_dbus.BUS_NAME}", "string::1.1", "string:"],
    ]
    for argv in fakes:
        lab.run("lb1", ["dbus-send", "--system", "--type=signal", *argv], env=env)
    time.sleep(1.0)  # what a listener that believed them would have needed many times over
    assert len(pair.vrrp_log("lb1")) == before, pair.vrrp_log("lb1")[before:]
    assert lab.vrrp_state("lb1") == "MASTER"
    assert pair.wait_settled("lb1", True)
    # the genuine article still counts: keepalived stopped -> STOP over D-Bus
    fail_over(pair, "keepalived")
    assert pair.vrrp_log("lb1")[-1]["latest"] == "STOP"
    pair.close()
