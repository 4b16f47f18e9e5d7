"""The plugin host in the netns lab: `synlb run` with the lb, health, scripts and
metrics plugins, on one router and four targets (t4 joins by SIGHUP).

Each test starts its own host (own config and state dir) and stops it with
SIGTERM; the router must then look as the lab built it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from synlb import config as config_mod
from synlb import sched, statedir
from synlb_lab import addresses as A
from synlb_lab.scenario import kernel_snapshot, status, synlb, synlb_exe
from synlb_lab.topology import Lab

pytestmark = pytest.mark.lab(tools=("ip", "iptables", "curl"))

INTERVAL, TIMEOUT, RISE, FALL = 0.3, 0.2, 2, 2
VIP = A.VIP[4]
METRICS = "127.0.0.1:9712"


def config_text(lab, name: str, targets=("t1", "t2", "t3"), extra_target: str = "") -> str:
    d = lab.role_dir("lb1")
    text = f"""[synlb]
state_dir = {d}/state-{name}
plugins = lb, health, scripts, metrics

[scripts]
dir = {d}/scripts.d
timeout = 2

[metrics]
listen = {METRICS}

[service:web]
vips = {A.VIP[4]}/32, {A.VIP[6]}/128
ingress = {A.ROUTER_FRONT_IF}
egress = {A.ROUTER_BACK_IF}
protocols = tcp
ports = 80, 8080
targets = {', '.join(targets)}
"""
    for t in lab.targets:
        text += f"""
[target:{t}]
address = {lab.addr(t, 4)}, {lab.addr(t, 6)}
check = tcp
check_port = 80
check_interval = {INTERVAL}
check_timeout = {TIMEOUT}
rise = {RISE}
fall = {FALL}
{extra_target}"""
    return text


def write(path: str, text: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="module")
def lab(open_module_lab):
    lab = open_module_lab(Lab, routers=1, targets=4)
    # the scripts plugin's directory: root-owned, 0755 all the way up
    sd = os.path.join(lab.role_dir("lb1"), "scripts.d", "standalone")
    os.makedirs(sd, mode=0o755, exist_ok=True)
    record = os.path.join(lab.role_dir("lb1"), "scripts-ran.jsonl")
    script = os.path.join(sd, "10-record")
    write(script, f"#!{sys.executable}\nimport json, os\n"
                  f"with open({record!r}, 'a') as fh:\n"
                  f"    fh.write(json.dumps({{k: v for k, v in os.environ.items()}}) + '\\n')\n")
    os.chmod(script, 0o755)
    return lab


class Host:
    def __init__(self, lab, name: str, **kw):
        self.lab = lab
        self.conf = write(os.path.join(lab.role_dir("lb1"), f"{name}.ini"), config_text(lab, name, **kw))
        self.state_dir = os.path.join(lab.role_dir("lb1"), f"state-{name}")
        self.proc = lab.popen("lb1", [synlb_exe(), "-c", self.conf, "run"], name=f"host-{name}")
        self.wait(lambda: self.status()["host"] and self.queue()["listening"], "host up", 15)

    def status(self) -> dict:
        return status(self.lab, "lb1", self.conf)

    def queue(self) -> dict:
        return self.status()["services"][0]["queues"][0]

    def log(self) -> str:
        with open(self.lab.log_path(self.proc), errors="replace") as fh:
            return fh.read()

    def worker_log(self) -> str:
        try:
            with open(statedir.worker_log(self.state_dir, 0), errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def worker_pid(self) -> int:
        with open(os.path.join(self.state_dir, "worker-0.pid")) as fh:
            return json.load(fh)["pid"]

    def rebuilt_at(self, targets: str, after: float, timeout: float = 5.0) -> float:
        """When a worker logged a table rebuilt for exactly ``targets`` (e.g. "t2,t3")."""
        found: list[float] = []

        def look():
            for m in re.finditer(r"^(\S+ \S+),(\d{3}) \S+: queue \d+: table rebuilt for targets (\S+)$",
                                 self.worker_log(), re.MULTILINE):
                t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                if m.group(3) == targets and t >= after - 0.001:
                    found.append(t)
                    return True
            return False
        self.wait(look, f"worker table for {targets}", timeout)
        return found[0]

    def metrics(self) -> dict[str, float]:
        out = self.lab.run("lb1", ["curl", "-sS", "--max-time", "10", f"http://{METRICS}/metrics"]).stdout
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
                for ln in out.splitlines() if ln and not ln.startswith("#")}

    @staticmethod
    def wait(pred, what: str, timeout: float, step: float = 0.05):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(step)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(15)
        assert rc == 0, self.log()[-3000:]


@pytest.fixture
def host(lab, request):
    before = kernel_snapshot(lab, "lb1")
    hosts: list[Host] = []

    def start(**kw) -> Host:
        h = Host(lab, request.node.name.split("[")[0].removeprefix("test_"), **kw)
        hosts.append(h)
        return h
    yield start
    for h in hosts:
        h.stop()
        # a stopped host leaves nothing behind
        assert "Traceback" not in h.log(), h.log()[-3000:]
    for t in lab.targets:  # a test that stopped a server must not leak into the next
        lab.start_servers(targets=[t])
    assert kernel_snapshot(lab, "lb1") == before


def session_result(sessions) -> tuple[dict, list]:
    res = sessions.stop()
    return res["summary"], res["sessions"]


# A probe run in the client namespace: one new connection every STEP
# seconds, each in its own thread, until a number N arrives on stdin: then N
# more, and it prints their start/end times and how many SYNs the kernel had
# to send again ("retrans", tcp_info's total_retrans once connected: a SYN
# dropped while no worker listened is sent again about a second later).
PROBE = r"""
import json, socket, struct, sys, threading, time
vip, port, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = []
def one():
    t0 = time.time()
    try:
        with socket.create_connection((vip, port), timeout=4) as s:
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            retrans = struct.unpack_from("I", info, 100)[0]  # tcpi_total_retrans
            s.settimeout(4)
            s.sendall(b"NAME\n")
            name = s.makefile().readline().strip()
        out.append({"start": t0, "end": time.time(), "ok": bool(name), "target": name, "retrans": retrans})
    except OSError as e:
        out.append({"start": t0, "end": time.time(), "ok": False, "error": type(e).__name__})
more = []
threading.Thread(target=lambda: more.append(int(sys.stdin.readline() or 0)), daemon=True).start()
threads = []
t_start = time.monotonic()
stop_at = None
while (stop_at is None or len(threads) < stop_at) and len(threads) < 5000:
    if stop_at is None and more:
        stop_at = len(threads) + more[0]
        continue
    time.sleep(max(0.0, t_start + len(threads) * step - time.monotonic()))
    th = threading.Thread(target=one, daemon=True)
    th.start()
    threads.append(th)
for th in threads:
    th.join(6)
print(json.dumps(sorted(out, key=lambda r: r["start"])))
"""


def test_worker_killed_during_traffic(lab, host):
    h = host()
    # the control plane at [synlb] nice (default -10), every thread of it; the
    # packet path at 0, the worker it restarts below too (sched.py)
    host_threads = {t.id for t in psutil.Process(h.proc.pid).threads()}
    assert {sched.nice_of(t) for t in host_threads} == {config_mod.DEFAULT_NICE}
    assert sched.nice_of(h.worker_pid()) == sched.WORKER_NICE
    sessions = lab.start_sessions(VIP, "echo", count=20, duration=15, interval=0.05)
    assert sessions.wait_ready()["connected"] == 20
    probe = lab.popen("client", [sys.executable, "-c", PROBE, VIP, "80", "0.05"], name="probe",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    time.sleep(0.7)
    pid = h.worker_pid()
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return h.worker_pid() != pid and h.queue()["listening"]
        except (OSError, ValueError, KeyError):  # the pid file is being replaced
            return False
    h.wait(restarted, "worker restarted", 15)
    assert sched.nice_of(h.worker_pid()) == sched.WORKER_NICE
    t_listening = time.time()
    # 30 more connections, all started once the new worker listens
    attempts = json.loads(probe.communicate(input=b"30\n", timeout=60)[0])
    time.sleep(0.5)
    summary, _ = session_result(sessions)

    # established sessions never needed the worker: all kept their target
    assert summary["survived"] == 20 and summary["moved"] == 0, summary
    # every new connection succeeded (a SYN dropped while no worker listened is retransmitted)
    assert all(a["ok"] for a in attempts), [a for a in attempts if not a["ok"]]
    # once the new worker listened, every new connection got through at once: no SYN sent twice
    after = [a for a in attempts if a["start"] >= t_kill]
    slow = [a for a in after if a["retrans"]]
    once_listening = [a for a in attempts if a["start"] >= t_listening]
    assert len(once_listening) >= 30 and not [a for a in once_listening if a["retrans"]], once_listening
    recovered = max((a["start"] for a in slow), default=t_kill) - t_kill
    print(f"\nworker kill: the new worker listened {t_listening - t_kill:.3f} s after the kill; the last "
          f"connection that needed a retransmitted SYN started {recovered:.3f} s after it; {len(slow)} of "
          f"{len(after)} did (longest connect {max(a['end'] - a['start'] for a in after):.3f} s)")
    assert slow  # the kill was felt: SYNs that came while no worker listened were dropped and sent again
    assert all(a["start"] < t_listening for a in slow)
    assert len(after) - len(slow) >= 30

    st = h.status()
    assert st["host"]["plugins"]["lb"]["worker_restarts"] == {"0": 1}
    assert h.worker_pid() != pid and st["services"][0]["queues"][0]["listening"]
    assert "worker restarts 1" in synlb(lab, "lb1", h.conf, "status").stdout
    assert h.metrics()['synlb_worker_restarts_total{queue="0"}'] == 1.0
    assert re.search(r"restart worker queue 0: node STANDALONE \(active\): lb: started worker queue 0", h.log())


def test_failed_target_leaves_and_returns(lab, host):
    h = host()
    sessions = lab.start_sessions(VIP, "echo", count=30, duration=30, interval=0.05)
    ready = sessions.wait_ready()
    assert ready["connected"] == 30 and set(ready["targets"]) == {"t1", "t2", "t3"}, ready

    t_stop = time.time()
    lab.stop_process(lab.servers["t1"])
    t_out = h.rebuilt_at("t2,t3", t_stop)
    eject = t_out - t_stop
    res = lab.open_connections(VIP, count=60, concurrency=10)
    assert res["ok"] == 60 and set(res["per_target"]) == {"t2", "t3"}, res
    st = h.status()
    t1 = st["host"]["plugins"]["health"]["targets"]["t1"]
    assert t1["state"] == "down" and [e["state"] for e in t1["history"]] == ["up", "down"], t1
    # in order: the server stopped, t1 failed FALL checks in a row and went down, and
    # the worker's table followed that flip (its log's times have ms resolution)
    down_at = t1["history"][-1]["time"]
    assert t_stop <= down_at <= t_out + 0.001, (t_stop, down_at, t_out)
    assert t1["recent"].endswith("-" * FALL), t1
    assert [t["healthy"] for t in st["services"][0]["targets"]] == [False, True, True]
    assert h.metrics()['synlb_target_healthy{service="web",target="t1"}'] == 0.0

    t_restart = time.time()
    lab.start_servers(targets=["t1"])
    t_start = time.time()
    t_back = h.rebuilt_at("t1,t2,t3", t_start)
    back = t_back - t_start
    # in order again: the server came back, t1 passed RISE checks and went up, the table followed
    t1 = h.status()["host"]["plugins"]["health"]["targets"]["t1"]
    assert [e["state"] for e in t1["history"]] == ["up", "down", "up"], t1
    up_at = t1["history"][-1]["time"]
    assert t_restart <= up_at <= t_back + 0.001, (t_restart, up_at, t_back)
    res = lab.open_connections(VIP, count=60, concurrency=10)
    assert res["ok"] == 60 and set(res["per_target"]) == {"t1", "t2", "t3"}, res
    summary, per_session = session_result(sessions)

    others = [s for s in per_session if s["targets"][0] != "t1"]
    assert others and all(s["survived"] and not s["moved"] for s in others), summary
    assert not any(s["moved"] for s in per_session), summary
    print(f"\nt1 out {eject:.3f} s after its server stopped (interval x fall = {INTERVAL * FALL:.1f} s), "
          f"back {back:.3f} s after it listened again (interval x rise = {INTERVAL * RISE:.1f} s); "
          f"{len(others)} sessions on t2/t3 all kept")

    text = synlb(lab, "lb1", h.conf, "status").stdout
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("check tcp 10.64.2.11:80"))
    assert " down (Connection refused)" in line and line.rstrip().endswith("up"), line
    log = h.log()
    # both of t1's addresses are probed; the IPv4 one failed first
    assert re.search(rf"health: target t1 DOWN after {FALL} failed checks "
                     r"\(tcp 10\.64\.2\.11:80, \[fd64:[0-9a-f:]+\]:80: Connection refused\)", log), log
    assert re.search(r"health: t1 down: node STANDALONE \(active\): lb: reloaded worker queue 0", log)
    assert re.search(rf"health: target t1 UP after {RISE} good checks", log)
    # each flip asked for the reconcile that rebuilt the worker's table
    assert log.index("health: target t1 DOWN") < log.index("health: t1 down: node STANDALONE")
    assert log.index("health: target t1 UP") < log.index("health: t1 up: node STANDALONE")


def test_sighup_broken_config_then_new_target(lab, host):
    h = host()
    sessions = lab.start_sessions(VIP, "echo", count=20, duration=30, interval=0.05)
    assert sessions.wait_ready()["connected"] == 20
    with open(h.conf) as fh:
        good = fh.read()
    before = (kernel_snapshot(lab, "lb1"), h.worker_pid(), h.status()["host"]["transitions"])

    # broken: nothing changes, the host says why
    write(h.conf, good.replace("targets = t1, t2, t3", "targets = t1, t2, t3, t4")
          .replace("check_port = 80", "check_port = 80000", 1))
    h.proc.send_signal(signal.SIGHUP)
    h.wait(lambda: "reload refused" in h.log(), "reload refused", 10)
    assert re.search(r"reload refused, keeping the running config: \S+:target:t1:check_port: "
                     r"80000 is out of range", h.log())
    time.sleep(0.5)
    write(h.conf, good)  # `synlb status` reads the config too; the host only on SIGHUP
    assert (kernel_snapshot(lab, "lb1"), h.worker_pid(), h.status()["host"]["transitions"]) == before
    res = lab.open_connections(VIP, count=60, concurrency=10)
    assert res["ok"] == 60 and set(res["per_target"]) == {"t1", "t2", "t3"}, res

    # a new target: it gets new connections, no running session moves
    write(h.conf, good.replace("targets = t1, t2, t3", "targets = t1, t2, t3, t4"))
    t_hup = time.time()
    h.proc.send_signal(signal.SIGHUP)
    added = h.rebuilt_at("t1,t2,t3,t4", t_hup) - t_hup
    res = lab.open_connections(VIP, count=120, concurrency=10)
    assert res["ok"] == 120 and set(res["per_target"]) == {"t1", "t2", "t3", "t4"}, res
    assert res["per_target"]["t4"] >= 10, res
    summary, _ = session_result(sessions)
    assert summary["survived"] == 20 and summary["moved"] == 0, summary
    assert h.worker_pid() == before[1]  # reloaded in place, not restarted
    st = h.status()
    assert "t4" in st["host"]["plugins"]["health"]["targets"]
    print(f"\nSIGHUP with t4: worker table had t4 {added:.3f} s after the signal; new connections "
          f"{res['per_target']}")


def test_metrics_follow_traffic_and_scripts_ran(lab, host):
    record = os.path.join(lab.role_dir("lb1"), "scripts-ran.jsonl")
    if os.path.exists(record):
        os.unlink(record)
    h = host()
    m0 = h.metrics()
    assert m0['synlb_vrrp_state{state="STANDALONE"}'] == 1.0 and m0['synlb_vrrp_state{state="MASTER"}'] == 0.0
    assert m0["synlb_active"] == 1.0
    for t in ("t1", "t2", "t3"):
        assert m0[f'synlb_target_healthy{{service="web",target="{t}"}}'] == 1.0
    assert m0['synlb_worker_rss_bytes{queue="0"}'] > 1e6
    for fam in (4, 6):
        res = lab.open_connections(A.VIP[fam], count=50, concurrency=10)
        assert res["ok"] == 50
    # the worker writes its own packet count once a second
    m1 = h.wait(lambda: (m := h.metrics())['synlb_worker_packets_total{queue="0"}'] >= 100 and m,
                "worker packet count", 5, step=0.3)

    def delta(name):
        return m1[name] - m0.get(name, 0.0)

    for fam in ("4", "6"):
        q = f'synlb_packets_queued_total{{family="{fam}",service="web"}}'
        k = f'synlb_packets_kernel_total{{family="{fam}",service="web"}}'
        assert 50 <= delta(q) <= 60, (q, delta(q))
        assert delta(k) >= 3 * 50, (k, delta(k))
    # a gauge: entries of earlier tests expire meanwhile, ours stay (TIME_WAIT) for 2 minutes
    conns = {t: m1[f'synlb_target_connections{{service="web",target="{t}"}}'] for t in ("t1", "t2", "t3")}
    assert sum(conns.values()) >= 100 and min(conns.values()) > 0, conns
    assert 100 <= delta('synlb_worker_packets_total{queue="0"}') <= 120
    assert delta('synlb_worker_cpu_seconds_total{queue="0"}') > 0
    assert m1['synlb_queue_dropped_total{queue="0"}'] == 0 and m1['synlb_user_dropped_total{queue="0"}'] == 0
    # loopback only: not reachable from the client side
    r = lab.run("client", ["curl", "-sS", "--max-time", "2", f"http://{lab.addr('lb1')}:9712/metrics"], check=False)
    assert r.returncode != 0

    # the scripts plugin ran standalone/10-record once, at start, with the documented environment
    h.wait(lambda: os.path.exists(record), "transition script", 5)
    with open(record) as fh:
        runs = [json.loads(ln) for ln in fh]
    assert len(runs) == 1
    env = runs[0]
    assert env["SYNLB_STATE"] == "STANDALONE" and env["SYNLB_PREVIOUS_STATE"] == "" and env["SYNLB_REASON"] == "start"
    assert env["SYNLB_CONFIG"] == h.conf
    data = json.loads(env["SYNLB_JSON"])
    assert data["state"] == "STANDALONE" and data["services"][0]["targets"] == ["t1", "t2", "t3"]
    sc = h.status()["host"]["plugins"]["scripts"]
    assert sc["runs"][-1]["rc"] == 0 and sc["runs"][-1]["script"].endswith("standalone/10-record"), sc


def routed_marks(lab) -> set[int]:
    """The fwmarks lb1 has an ip rule for and whose table has a route."""
    out = set()
    rules = lab.run("lb1", ["ip", "-4", "rule", "show"]).stdout
    for m in re.finditer(r"fwmark (0x[0-9a-f]+) lookup (\d+)", rules):
        routes = lab.run("lb1", ["ip", "-4", "route", "show", "table", m.group(2)]).stdout
        if "default via" in routes:
            out.add(int(m.group(1), 16))
    return out


def test_workers_never_serve_an_unapplied_target(lab, host):
    """The INI gains t4 on disk but is not reloaded; t1 fails its check; the
    worker is killed and restarted: at every step the worker serves only
    targets the data plane installed routes for (never t4), and t4 gets
    no connection."""
    h = host(targets=("t1", "t2", "t3"))
    marks = {t["name"]: t["mark"] for t in h.status()["services"][0]["targets"]}

    def serving() -> set[int]:
        with open(statedir.worker_table(h.state_dir, 0)) as fh:
            return {m for _, m in json.load(fh)["targets"]}

    write(h.conf, config_text(lab, "workers_never_serve_an_unapplied_target", targets=("t1", "t2", "t3", "t4")))
    lab.stop_process(lab.servers["t1"])  # t1 out: the reconcile runs on the applied config
    h.rebuilt_at("t2,t3", time.time() - 5)
    assert serving() == {marks["t2"], marks["t3"]} and serving() <= routed_marks(lab)
    pid = h.worker_pid()
    os.kill(pid, signal.SIGKILL)
    h.wait(lambda: h.worker_pid() != pid and h.queue()["listening"], "worker restarted", 15)
    stats_path = statedir.worker_stats(h.state_dir, 0)

    def stats() -> dict:
        with open(stats_path) as fh:
            return json.load(fh)
    h.wait(lambda: stats().get("pid") == h.worker_pid(), "the new worker's stats", 5)
    stats = stats()
    assert stats["targets"] == ["t2", "t3"], stats
    assert serving() <= routed_marks(lab) and len(routed_marks(lab)) == 3  # t1..t3: no route for t4
    res = lab.open_connections(VIP, count=60, concurrency=10)
    assert res["ok"] == 60 and set(res["per_target"]) == {"t2", "t3"}, res
    assert "t4" not in h.log()


def test_the_host_repairs_what_another_program_changed(lab, host):
    """What a VyOS commit does to a router (turns loose pickup off, deletes
    ip rules by fwmark, recreates its own nft tables) while `synlb run`
    runs: synlb's own state comes back, the other program's is untouched,
    and `status --check` agrees at the end."""
    h = host(targets=("t1", "t2", "t3"))
    assert synlb(lab, "lb1", h.conf, "status", "--check").returncode == 0
    rules = lab.run("lb1", ["ip", "-4", "rule", "show"]).stdout
    prio_mark = re.search(r"^(\d+):\s+from all fwmark (0x[0-9a-f]+) lookup (\d+) proto 229", rules, re.M)
    sessions = lab.start_sessions(VIP, "echo", count=10, duration=30, interval=0.05)
    assert sessions.wait_ready()["connected"] == 10
    took = {}
    for what, argv, back in [
        ("loose pickup turned off", ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
         lambda: lab.sysctl_get("lb1", "net.netfilter.nf_conntrack_tcp_loose") == "1"),
        ("an ip rule of synlb's deleted", ["ip", "rule", "del", "priority", prio_mark.group(1), "fwmark",
                                           prio_mark.group(2), "lookup", prio_mark.group(3)],
         lambda: prio_mark.group(2) in lab.run("lb1", ["ip", "-4", "rule", "show"]).stdout),
        ("the shortcut rule deleted", ["iptables", "-t", "mangle", "-D", "synlb-ESTABLISHED", "-j", "ACCEPT"],
         lambda: "-A synlb-ESTABLISHED -j ACCEPT" in lab.run("lb1", ["iptables-save", "-t", "mangle"]).stdout),
    ]:
        t0 = time.monotonic()
        lab.run("lb1", argv)
        h.wait(back, f"repaired: {what}", 10)
        took[what] = round(time.monotonic() - t0, 2)
    # a router's own nft tables come and go on every commit: none of synlb's business
    nft = "table ip vyos_filter {\n chain VYOS_FORWARD_filter {\n  type filter hook forward priority 0; policy accept;\n }\n}\n"
    for _ in range(3):
        lab.run("lb1", ["nft", "-f", "-"], input=nft)
        lab.run("lb1", ["nft", "delete", "table", "ip", "vyos_filter"])
    lab.run("lb1", ["nft", "-f", "-"], input=nft)
    time.sleep(2.5)  # two drift rounds
    assert "vyos_filter" in lab.run("lb1", ["nft", "list", "tables"]).stdout
    st = h.status()["host"]["plugins"]["lb"]
    print(f"\nrepaired after {took} (drift checked every second); {st['drift_repairs']} repairs")
    assert st["drift_repairs"] >= 3
    assert synlb(lab, "lb1", h.conf, "status", "--check").returncode == 0
    summary, per = session_result(sessions)
    assert summary["survived"] == 10 and summary["moved"] == 0, summary
    lab.run("lb1", ["nft", "delete", "table", "ip", "vyos_filter"])
