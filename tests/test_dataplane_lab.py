"""The data plane in the netns lab: real kernel, real worker, real TCP connections."""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from synlb import health_state, sched, statedir
from synlb import worker as worker_mod
from synlb_lab import addresses as A
from synlb_lab.scenario import kernel_snapshot, status, synlb, write_config
from synlb_lab.topology import Lab

pytestmark = pytest.mark.lab(tools=("ip", "iptables", "ip6tables", "conntrack"))

CONNS = 300


@pytest.fixture(scope="module")
def lab(open_module_lab):
    return open_module_lab(Lab, routers=1)


@pytest.fixture
def clean(lab):
    """Every test starts and ends with synlb down and the router as the lab built it."""
    before = kernel_snapshot(lab, "lb1")
    yield before
    for name in ("synlb.ini", "nat.ini"):
        import os
        path = f"{lab.role_dir('lb1')}/{name}"
        if os.path.exists(path):
            synlb(lab, "lb1", path, "down", check=False)
    assert kernel_snapshot(lab, "lb1") == before


def _vip_chain(st: dict, family: int) -> dict:
    return next(c for c in st["chains"] if c["family"] == family)


@pytest.mark.parametrize("mode", ["route", "nat"])
def test_connections_spread_and_only_syns_reach_user_space(lab, clean, mode):
    conf = write_config(lab, "lb1", mode=mode, name="synlb.ini" if mode == "route" else "nat.ini")
    synlb(lab, "lb1", conf, "up")
    for family in (4, 6):
        res = lab.open_connections(A.VIP[family], count=CONNS, concurrency=20)
        assert res["ok"] == CONNS, res["errors"]
        assert sorted(res["per_target"]) == ["t1", "t2", "t3"]
        for t, n in res["per_target"].items():
            assert 70 <= n <= 130, (family, mode, res["per_target"])
        st = status(lab, "lb1", conf)
        chain = _vip_chain(st, family)
        # one queued packet per connection (a retransmitted SYN may add one)
        assert CONNS <= chain["queued_pkts"] <= CONNS + 10, chain
        # a connection is SYN, ACK, request, FIN... : everything after the SYN stays in the kernel
        assert chain["kept_in_kernel_pkts"] >= 3 * CONNS, chain
        assert chain["saved_marks"] >= CONNS
        conns = {t["name"]: t["connections"] for t in st["services"][0]["targets"]}
        assert sum(conns.values()) >= CONNS  # conntrack entries carry the target marks
    synlb(lab, "lb1", conf, "down")


def test_up_twice_changes_nothing(lab, clean):
    conf = write_config(lab, "lb1")
    synlb(lab, "lb1", conf, "up")
    lab.open_connections(A.VIP[4], count=20)
    first = kernel_snapshot(lab, "lb1")
    counters = lab.run("lb1", ["iptables-save", "-c", "-t", "mangle"]).stdout
    out = synlb(lab, "lb1", conf, "up").stdout
    assert out.strip() == "up: nothing to change"
    assert kernel_snapshot(lab, "lb1") == first
    # the chains were not rewritten: their counters survive a second up
    after = lab.run("lb1", ["iptables-save", "-c", "-t", "mangle"]).stdout
    strip = lambda s: [ln for ln in s.splitlines() if ln.startswith("[")]  # noqa: E731
    assert strip(after) == strip(counters)
    synlb(lab, "lb1", conf, "down")


def test_foreign_rules_survive_up_and_down(lab, clean):
    foreign = [
        ["iptables", "-t", "mangle", "-N", "ROUTER-OWN"],
        ["iptables", "-t", "mangle", "-A", "ROUTER-OWN", "-j", "RETURN"],
        ["iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "front", "-j", "ROUTER-OWN"],
        ["ip6tables", "-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "-j", "ACCEPT"],
        ["ip", "rule", "add", "fwmark", "0x77", "lookup", "77", "priority", "3000"],
        ["ip", "route", "add", "unreachable", "default", "table", "77"],
    ]
    for argv in foreign:
        lab.run("lb1", argv)
    try:
        with_foreign = kernel_snapshot(lab, "lb1")
        conf = write_config(lab, "lb1")
        synlb(lab, "lb1", conf, "up")
        up = kernel_snapshot(lab, "lb1")
        assert "-A PREROUTING -i front -j ROUTER-OWN" in up["iptables"]
        assert "fwmark 0x77 lookup 77" in up["rules4"]
        assert lab.open_connections(A.VIP[4], count=30)["ok"] == 30
        synlb(lab, "lb1", conf, "down")
        assert kernel_snapshot(lab, "lb1") == with_foreign
    finally:
        for argv in [
            ["iptables", "-t", "mangle", "-D", "PREROUTING", "-i", "front", "-j", "ROUTER-OWN"],
            ["iptables", "-t", "mangle", "-F", "ROUTER-OWN"],
            ["iptables", "-t", "mangle", "-X", "ROUTER-OWN"],
            ["ip6tables", "-t", "mangle", "-D", "POSTROUTING", "-p", "udp", "-j", "ACCEPT"],
            ["ip", "rule", "del", "fwmark", "0x77", "lookup", "77", "priority", "3000"],
            ["ip", "route", "del", "unreachable", "default", "table", "77"],
            # the lab had no mangle tables before this test created them
            ["nft", "delete", "table", "ip", "mangle"],
            ["nft", "delete", "table", "ip6", "mangle"],
        ]:
            lab.run("lb1", argv, check=False)


def test_routes_restored_after_link_flap(lab, clean):
    """docs/DESIGN-NOTES.md#3 (routes are lost with their link): the kernel
    drops the per-target routes with the link; up restores them."""
    conf = write_config(lab, "lb1")
    synlb(lab, "lb1", conf, "up")
    routes = kernel_snapshot(lab, "lb1")["routes4"]
    lab.link_set("lb1", "back", False)
    lab.link_set("lb1", "back", True)
    lab.ip("lb1", "-6", "addr", "replace", f"{lab.addr('lb1', 6, 'back')}/64", "dev", "back", "nodad")
    assert "proto 229" not in kernel_snapshot(lab, "lb1")["routes4"]
    synlb(lab, "lb1", conf, "up")
    assert kernel_snapshot(lab, "lb1")["routes4"] == routes
    assert lab.open_connections(A.VIP[4], count=30)["ok"] == 30
    synlb(lab, "lb1", conf, "down")


def test_live_problems_reported_before_any_change(lab, clean):
    conf = write_config(lab, "lb1", text=None)
    text = open(conf).read().replace("ingress = front", "ingress = nosuch0")
    bad = write_config(lab, "lb1", text=text, name="bad.ini")
    r = synlb(lab, "lb1", bad, "up", check=False)
    assert r.returncode == 1
    assert f"{bad}:service:web:ingress: no interface 'nosuch0'" in r.stderr
    assert "Traceback" not in r.stderr
    r = synlb(lab, "lb1", bad, "check", "--live", check=False)
    assert r.returncode == 1 and "nosuch0" in r.stderr
    # a VIP that is a local address of the router breaks route mode
    # (docs/DESIGN-NOTES.md#2, no local VIP in route mode)
    lab.ip("lb1", "addr", "add", f"{A.VIP[4]}/32", "dev", "lo")
    try:
        r = synlb(lab, "lb1", conf, "up", check=False)
        assert r.returncode == 1
        assert f"{conf}:service:web:vips: {A.VIP[4]} is a local address" in r.stderr
    finally:
        lab.ip("lb1", "addr", "del", f"{A.VIP[4]}/32", "dev", "lo")


def test_failed_worker_leaves_nothing_behind(lab, clean):
    """A worker that cannot start (its queue is taken) rolls the whole up back."""
    conf = write_config(lab, "lb1")
    squatter = lab.popen("lb1", [lab_python(), "-c",
                                 "from netfilterqueue import NetfilterQueue;import time\n"
                                 "q=NetfilterQueue();q.bind(0,lambda p:p.accept());print('bound',flush=True)\n"
                                 "time.sleep(60)"], name="squatter", stdout=__import__("subprocess").PIPE)
    try:
        assert squatter.stdout.readline().startswith(b"bound")
        r = synlb(lab, "lb1", conf, "up", check=False)
        assert r.returncode == 1, r.stdout
        assert "worker for queue 0 exited" in r.stderr and "Traceback" not in r.stderr
    finally:
        lab.stop_process(squatter)
    # clean() asserts the router is exactly as before


def test_picked_up_connection_reaches_the_same_target(lab, clean):
    """docs/DESIGN-NOTES.md#1 (picked-up connections start without a SYN):
    after conntrack forgets a connection, its next packet is NEW
    but not a SYN; it must still be queued and sent to the same target."""
    conf = write_config(lab, "lb1")
    synlb(lab, "lb1", conf, "up")
    sessions = lab.start_sessions(A.VIP[4], pattern="echo", count=10, duration=4.0)
    sessions.wait_ready(10)
    lab.run("lb1", ["conntrack", "-F"], check=False)
    res = sessions.result(20)
    assert res["summary"]["survived"] == 10, res["summary"]
    assert res["summary"]["moved"] == 0
    synlb(lab, "lb1", conf, "down")


def lab_python() -> str:
    import sys
    return sys.executable


def _stats(state_dir: str) -> dict:
    with open(worker_mod.stats_file(state_dir, 0)) as fh:
        return json.load(fh)


def _until(what, timeout: float = 5.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


def test_worker_follows_signals_with_no_packet_coming(lab, clean):
    """The worker blocks in netfilterqueue's recv loop: a SIGHUP (new table)
    and the SIGTERM of `down` must still take effect while no packet comes,
    and its stats file stays current while packets flow."""
    conf = write_config(lab, "lb1")
    state_dir = os.path.join(lab.role_dir("lb1"), "synlb-state")
    synlb(lab, "lb1", conf, "up")
    pid = _stats(state_dir)["pid"]
    assert _stats(state_dir)["targets"] == ["t1", "t2", "t3"]

    # idle: the health file takes t1 out; the data plane writes the worker's
    # new table and SIGHUPs it (workers never read the INI or the health
    # file themselves), and the table follows with no traffic
    health_state.write_down(state_dir, {"web": ["t1"]})
    assert "reloaded worker queue 0" in synlb(lab, "lb1", conf, "up").stdout
    assert _stats(state_dir)["pid"] == pid
    assert _until(lambda: _stats(state_dir)["targets"] == ["t2", "t3"]), _stats(state_dir)
    res = lab.open_connections(A.VIP[4], count=60, concurrency=10)
    assert res["ok"] == 60 and set(res["per_target"]) == {"t2", "t3"}, res

    # busy: the counters are published while packets keep coming (stats are
    # written every second). The load goes on, in rounds of connections, until
    # three different counts were read while it ran (or a minute), however
    # fast this machine makes connections.
    seen: list[int] = []
    done = threading.Event()

    def load():
        while not done.is_set():
            lab.open_connections(A.VIP[4], count=500, concurrency=8)
    loader = threading.Thread(target=load)
    loader.start()
    try:
        while loader.is_alive() and len(set(seen)) < 3 and len(seen) < 600:
            seen.append(_stats(state_dir)["packets"])
            time.sleep(0.1)
        running = loader.is_alive()
    finally:
        done.set()
        loader.join(60)
    assert running and len(set(seen)) >= 3, seen  # several updates during the run, not only after it

    # idle again: `down` stops the worker by SIGTERM, and it unbinds by itself (not killed)
    synlb(lab, "lb1", conf, "down")
    assert not psutil.pid_exists(pid)
    with open(statedir.worker_log(state_dir, 0)) as fh:
        assert "queue 0 unbound" in fh.read()
    health_state.clear(state_dir)


def test_status_check_names_every_difference(lab, clean):
    """`synlb status --check` compares the live kernel with the desired state:
    exit 0 when they agree, else exit 1 and one line per difference."""
    conf = write_config(lab, "lb1")
    assert "the live state is the desired one" in synlb(lab, "lb1", conf, "status", "--check").stdout
    synlb(lab, "lb1", conf, "up")
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0
    lab.run("lb1", ["iptables", "-t", "mangle", "-D", "synlb-ESTABLISHED", "-j", "ACCEPT"])
    lab.run("lb1", ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=0"])
    r = synlb(lab, "lb1", conf, "status", "--check", check=False)
    assert r.returncode == 1, r.stdout
    assert r.stdout.splitlines() == [
        "iptables: missing -t mangle -A synlb-ESTABLISHED -j ACCEPT",
        "sysctl net.netfilter.nf_conntrack_tcp_be_liberal = 0, should be 1 (loose pickup)"], r.stdout
    assert r.stderr.strip() == "synlb status --check: 2 differences from the desired state"
    synlb(lab, "lb1", conf, "up")  # the reconcile repairs both
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0
    synlb(lab, "lb1", conf, "down")
    assert synlb(lab, "lb1", conf, "status", "--check").returncode == 0


# What a process running as the workers do can reach (run through the very
# launcher the workers are started with): its credentials, and every file
# access it tries, as JSON.
PROBE = r"""
import json, os, sys
state, secret, table, pidfile = sys.argv[1:5]
run = os.path.join(state, "workers", "run")
with open("/proc/self/status") as fh:
    creds = {k: v.strip() for k, v in (ln.split(":", 1) for ln in fh if ":" in ln)
             if k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")}
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return type(e).__name__
def read(p):
    with open(p, "rb") as fh:
        fh.read()
def write(p):
    with open(p, "ab"):
        pass
def replace_table():
    tmp = os.path.join(run, "forged.json")
    with open(tmp, "w") as fh:
        fh.write("{}")
    try:
        os.replace(tmp, table)
    finally:
        os.unlink(tmp)
out = {"creds": creds,
       "read secret": attempt(lambda: read(secret)),
       "read pid file": attempt(lambda: read(pidfile)),
       "list state dir": attempt(lambda: os.listdir(state)),
       "read table": attempt(lambda: read(table)),
       "write table": attempt(lambda: write(table)),
       "replace table": attempt(replace_table),
       "create in state dir": attempt(lambda: write(os.path.join(state, "planted"))),
       "create in workers": attempt(lambda: write(os.path.join(state, "workers", "planted"))),
       "hard link secret": attempt(lambda: os.link(secret, os.path.join(run, "linked"))),
       "read /etc/shadow": attempt(lambda: read("/etc/shadow")),
       "write in run": attempt(lambda: (write(os.path.join(run, "probe")), os.unlink(os.path.join(run, "probe"))))}
print(json.dumps(out))
"""


def _proc_status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.strip() for k, v in (ln.split(":", 1) for ln in fh if ":" in ln)}


def test_workers_run_as_their_user_with_cap_net_admin_only(lab, clean):
    """docs/HARDENING.md: with the default worker_user (_synlb), every worker
    runs as that user (real, effective, saved and fs uid and gid; no other
    group) with CAP_NET_ADMIN alone (effective, permitted, bounding, ambient)
    and no_new_privs, and still balances. Its user reads its table and the
    pins, writes only workers/run/: a root-only file in the state dir, the
    pid files, the table (to write or replace) and /etc/shadow are out of
    its reach; it rotates its log (root's file, through the fd it was
    given) into workers/run/. A symlink it plants where root reads its
    stats is not followed: `synlb status` counts 0 packets, not the
    planted file's."""
    import pwd
    import signal
    import subprocess
    import sys

    from synlb import config as config_mod
    from synlb import workers
    conf = write_config(lab, "lb1")
    state_dir = os.path.join(lab.role_dir("lb1"), "synlb-state")
    synlb(lab, "lb1", conf, "up")
    pw = pwd.getpwnam(config_mod.DEFAULT_WORKER_USER)
    running = workers.running(state_dir)
    assert [w.queue for w in running] == [0]
    (w,) = running
    assert w.uid == pw.pw_uid
    st = _proc_status(w.pid)
    assert st["Uid"].split() == [str(pw.pw_uid)] * 4 and st["Gid"].split() == [str(pw.pw_gid)] * 4, st
    assert st["Groups"] == ""
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert st[cap] == "0000000000001000", (cap, st[cap])  # CAP_NET_ADMIN (12) alone
    assert st["NoNewPrivs"] == "1"
    assert sched.nice_of(w.pid) == sched.WORKER_NICE  # `synlb up` ran at [synlb] nice, its worker does not
    assert psutil.Process(w.pid).cmdline()[1:3] == [os.path.join(os.path.dirname(sys.executable), "synlb"),
                                                    "worker"]
    res = lab.open_connections(A.VIP[4], count=60, concurrency=10)
    assert res["ok"] == 60 and set(res["per_target"]) == {"t1", "t2", "t3"}, res
    assert _until(lambda: _stats(state_dir)["packets"] >= 60), _stats(state_dir)
    assert status(lab, "lb1", conf)["services"][0]["queues"][0]["worker"]["packets"] >= 60

    # the state dir: root's, traversable by the workers' group only; their files
    def mode(p):
        s = os.lstat(p)
        return s.st_uid, s.st_gid, oct(s.st_mode & 0o7777)
    assert mode(state_dir) == (0, pw.pw_gid, "0o710")
    assert mode(statedir.workers_dir(state_dir)) == (0, pw.pw_gid, "0o750")
    assert mode(statedir.workers_run(state_dir)) == (pw.pw_uid, pw.pw_gid, "0o700")
    assert mode(statedir.worker_table(state_dir, 0)) == (0, pw.pw_gid, "0o640")
    assert mode(statedir.worker_log(state_dir, 0)) == (0, 0, "0o600")
    assert mode(statedir.worker_pid(state_dir, 0)) == (0, 0, "0o600")
    assert mode(statedir.worker_stats(state_dir, 0))[:2] == (pw.pw_uid, pw.pw_gid)

    secret = os.path.join(state_dir, "sync.key")  # as a [sync] key_file would be: root's, 0600
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps({"pid": w.pid, "packets": 424242}).encode())
    os.close(fd)
    try:
        ident = workers.identity(config_mod.load(conf))
        r = subprocess.run(workers.launcher(ident) + [sys.executable, "-I", "-c", PROBE, state_dir, secret,
                                                      statedir.worker_table(state_dir, 0),
                                                      statedir.worker_pid(state_dir, 0)],
                           capture_output=True, text=True, timeout=30, cwd="/")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        # the probe is what the worker is
        assert got.pop("creds") == {k: st[k] for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff",
                                                       "CapBnd", "CapAmb", "NoNewPrivs")}
        assert got == {"read secret": "PermissionError", "read pid file": "PermissionError",
                       "list state dir": "PermissionError", "read table": "ok",
                       "write table": "PermissionError", "replace table": "PermissionError",
                       "create in state dir": "PermissionError", "create in workers": "PermissionError",
                       "hard link secret": "PermissionError", "read /etc/shadow": "PermissionError",
                       "write in run": "ok"}, got

        # the worker's log rotation, with its user's rights: its stderr is the
        # fd root opened on the root-only log (queue 7: no worker of its own)
        with statedir.open_log(statedir.worker_log(state_dir, 7)) as log:
            log.write(b"x" * 1500)
            log.flush()
            rotate = ("import sys; from synlb import statedir, worker; "
                      "sys.exit(0 if worker.rotate_log(2, 1000, statedir.worker_log_old(sys.argv[1], 7)) else 3)")
            r = subprocess.run(workers.launcher(ident) + [sys.executable, "-I", "-c", rotate, state_dir],
                               stderr=log, timeout=30, cwd="/")
        assert r.returncode == 0
        with open(statedir.worker_log_old(state_dir, 7), "rb") as fh:
            assert fh.read() == b"x" * 1500
        assert os.path.getsize(statedir.worker_log(state_dir, 7)) == 0
        assert mode(statedir.worker_log_old(state_dir, 7))[:2] == (pw.pw_uid, pw.pw_gid)
        for p in (statedir.worker_log(state_dir, 7), statedir.worker_log_old(state_dir, 7)):
            os.unlink(p)

        # a compromised worker replaces its stats file with a symlink to the
        # secret (stopped meanwhile, so that it does not rewrite the file)
        os.kill(w.pid, signal.SIGSTOP)
        try:
            stats = statedir.worker_stats(state_dir, 0)
            plant = [sys.executable, "-I", "-c", "import os, sys; os.unlink(sys.argv[2]); "
                     "os.symlink(sys.argv[1], sys.argv[2])", secret, stats]
            subprocess.run(workers.launcher(ident) + plant, check=True, timeout=30, cwd="/")
            assert os.path.islink(stats)
            queue = status(lab, "lb1", conf)["services"][0]["queues"][0]
            assert queue["worker"]["pid"] == w.pid and queue["worker"]["packets"] == 0, queue
            assert workers.read_stats(state_dir, 0) == {}
            os.unlink(stats)
        finally:
            os.kill(w.pid, signal.SIGCONT)
        assert _until(lambda: os.path.isfile(stats) and _stats(state_dir)["pid"] == w.pid)
    finally:
        os.unlink(secret)
    synlb(lab, "lb1", conf, "down")
    assert not psutil.pid_exists(w.pid)
