"""The health plugin: options, rise/fall, the down set it writes, and the
three check kinds (tcp, http, exec; network ones in a private namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from synlb import config, health_state
from synlb.plugins import NodeState
from synlb.plugins import health as H

SYNLB = os.path.join(os.path.dirname(sys.executable), "synlb")
# root: unshare --net, and exec checks refuse scripts not owned by root
ROOT_ONLY = pytest.mark.lab(tools=("unshare", "ip"))

BASE = """
[synlb]
state_dir = {d}/state
plugins = lb, health
[service:web]
vips = 10.0.0.1/32
ingress = eth0
protocols = tcp
targets = a, b, c
[service:api]
vips = 10.0.0.2/32
ingress = eth0
protocols = tcp
queue = 1
targets = b
[target:a]
address = 10.1.0.1, fd01::1
check = tcp
check_port = 80
check_interval = 0.05
check_timeout = 0.05
rise = 2
fall = 3
[target:b]
address = 10.1.0.2, fd01::2
check = http
check_port = 8080
check_interval = 50ms
rise = 1
fall = 1
[target:c]
address = 10.1.0.3
"""


def write(tmp_path, text, name="synlb.ini"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------ config

def test_options_parse_and_defaults(tmp_path):
    cfg = config.load(write(tmp_path, BASE.format(d=tmp_path)))
    a, b, c = (H.Check.of(cfg.targets[n]) for n in "abc")
    assert (a.kind, a.address, a.port, a.interval, a.timeout, a.rise, a.fall) == \
        ("tcp", "10.1.0.1", 80, 0.05, 0.05, 2, 3)
    assert a.other_address == "fd01::1"  # a dual-stack target is probed over both families
    assert a.describe() == "tcp 10.1.0.1:80, [fd01::1]:80"
    assert (b.kind, b.address, b.path, b.status, b.interval) == ("http", "10.1.0.2", "/", 200, 0.05)
    assert b.describe() == "http://10.1.0.2:8080/, http://[fd01::2]:8080/ = 200"
    v6 = H.Check("http", "fd01::2", 8080, "/healthz", 204, None, 1.0, 1.0, 1, 1)
    assert v6.describe() == "http://[fd01::2]:8080/healthz = 204"
    assert (c.kind, c.interval, c.timeout, c.rise, c.fall) == ("none", 2.0, 1.0, 2, 3)


ONE_TARGET = """[synlb]
plugins = lb, health
[service:web]
vips = 10.0.0.1/32
ingress = eth0
protocols = tcp
targets = t
[target:t]
address = 10.1.0.1
"""


@pytest.mark.parametrize("lines, want", [
    ("check = tcp", "target:t:check_port: a tcp check needs check_port"),
    ("check = http", "target:t:check_port: a http check needs check_port"),
    ("check = exec", "target:t:check_command: an exec check needs check_command (an absolute path)"),
    ("check = exec\ncheck_command = bin/true", "target:t:check_command: 'bin/true' is not an absolute path"),
    ("check = ping", "target:t:check: 'ping' is not one of none, tcp, http, exec"),
    ("check = tcp\ncheck_port = 0", "target:t:check_port: 0 is out of range 1..65535"),
    ("check_interval = 0.001", "target:t:check_interval: 0.001 is out of range 0.05..3600 s"),
    ("check_timeout = soon", "target:t:check_timeout: 'soon' is not a duration"),
    ("check_path = healthz", "target:t:check_path: 'healthz' is not an absolute URL path"),
    ("check_status = 42", "target:t:check_status: 42 is out of range 100..599"),
    ("rise = 0", "target:t:rise: 0 is out of range 1..1000"),
])
def test_problems_name_file_target_key(tmp_path, lines, want):
    path = write(tmp_path, ONE_TARGET + lines + "\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert any(ln.startswith(f"{path}:{want}") for ln in e.value.lines()), e.value.lines()


def test_synlb_check_reports_them(tmp_path):
    path = write(tmp_path, ONE_TARGET + "check = tcp\n")
    r = subprocess.run([SYNLB, "-c", path, "check"], capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert r.stderr == f"{path}:target:t:check_port: a tcp check needs check_port\n"
    path = write(tmp_path, ONE_TARGET + "check = tcp\ncheck_port = 80\n")
    r = subprocess.run([SYNLB, "-c", path, "check"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_keys_unknown_without_the_plugin(tmp_path):
    path = write(tmp_path, BASE.format(d=tmp_path).replace("plugins = lb, health", "plugins = lb"))
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert any(":target:a:check: unknown key" in ln for ln in e.value.lines())


# ------------------------------------------------------------------ rise / fall

def test_rise_and_fall_counting():
    c = H.Check("tcp", "10.1.0.1", 80, "/", 200, None, 1.0, 1.0, rise=2, fall=3)
    th = H.TargetHealth("a", c, time.time())
    flips = [th.record(ok, "x", time.time(), 0.0) for ok in (False, False, True, False, False, False)]
    assert flips == [False, False, False, False, False, True] and not th.up  # fall counts consecutive failures
    flips = [th.record(ok, "y", time.time(), 0.0) for ok in (True, False, True, True)]
    assert flips == [False, False, False, True] and th.up
    st = th.status()
    assert [e["state"] for e in st["history"]] == ["up", "down", "up"]
    assert st["recent"] == "--+---" + "+-++" and st["successes"] == 2 and st["checks"] == 10


# ------------------------------------------------------------------ the plugin

def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_flip_writes_down_set_and_asks_for_reconcile(tmp_path, fake, FakeHost):
    results = {"a": True, "b": True}
    calls: dict[str, int] = {}
    # per failed check: whether the plugin still counted the target up when it ran
    failed_while_up: dict[str, list[bool]] = {"a": [], "b": []}

    def fake_check(c, target):
        calls[target] = calls.get(target, 0) + 1
        ok = results[target]
        if not ok:
            failed_while_up[target].append(p.targets[target].up)
        return ok, "ok" if ok else "Connection refused"
    fake(H, "run_check", fake_check)
    host = FakeHost(write(tmp_path, BASE.format(d=tmp_path)))
    state_dir = host.cfg.globals.state_dir
    os.makedirs(state_dir)
    p = H.create(host)
    p.reconcile(host.cfg, NodeState("STANDALONE", True, "start"))
    p.start()
    try:
        wait_for(lambda: calls.get("a", 0) >= 3 and calls.get("b", 0) >= 3)
        assert "c" not in calls  # check = none: never checked, always up
        # no flip: no reconcile; each target's first check settled its view (the router may be ready)
        assert sorted(d["reason"] for k, d in host.submitted if k == "ready") == ["health: a checked", "health: b checked"]
        assert all(k == "ready" for k, _ in host.submitted)
        assert not os.path.exists(os.path.join(state_dir, "targets-down.json"))

        t0 = time.monotonic()
        results["a"] = False
        wait_for(lambda: "health: a down" in host.reasons())
        print(f"a down {time.monotonic() - t0:.3f} s after its checks began to fail (interval x fall = 0.15 s)")
        # out at its fall-th (3rd) failed check, not later: the 4th found it down
        wait_for(lambda: len(failed_while_up["a"]) >= 4)
        assert failed_while_up["a"][:4] == [True, True, True, False], failed_while_up["a"]
        assert health_state.down_targets(state_dir, "web") == {"a"}
        assert health_state.down_targets(state_dir, "api") == set()

        results["b"] = False  # fall = 1: out at the first failure, from both services
        wait_for(lambda: "health: b down" in host.reasons())
        wait_for(lambda: len(failed_while_up["b"]) >= 2)
        assert failed_while_up["b"][:2] == [True, False], failed_while_up["b"]
        assert health_state.down_targets(state_dir, "web") == {"a", "b"}
        assert health_state.down_targets(state_dir, "api") == {"b"}
        st = p.status()
        assert st["summary"] == "1/3 targets up (2 checked); DOWN: a, b"
        assert st["targets"]["a"]["history"][-1]["detail"] == "Connection refused"

        results["a"] = results["b"] = True
        wait_for(lambda: "health: a up" in host.reasons())
        wait_for(lambda: "health: b up" in host.reasons())
        assert not os.path.exists(os.path.join(state_dir, "targets-down.json"))  # all up: no file
        assert [e["state"] for e in p.status()["targets"]["a"]["history"]] == ["up", "down", "up"]
    finally:
        p.stop()


def test_inactive_node_keeps_checking_but_writes_nothing(tmp_path, fake, FakeHost):
    fake(H, "run_check", lambda c, target: (False, "refused"))
    host = FakeHost(write(tmp_path, BASE.format(d=tmp_path)))
    state_dir = host.cfg.globals.state_dir
    os.makedirs(state_dir)
    p = H.create(host)
    p.reconcile(host.cfg, NodeState("BACKUP", False, "start"))
    p.start()
    try:
        wait_for(lambda: "health: a down" in host.reasons())
        assert not os.path.exists(os.path.join(state_dir, "targets-down.json"))
        # becoming active (the data plane teardown had cleared the file): restored at once,
        # and the workers get it by one more reconcile
        host.submitted.clear()
        with open(os.path.join(state_dir, "applied.json"), "w") as fh:
            fh.write("{}")
        changes = p.reconcile(host.cfg, NodeState("MASTER", True, "vrrp"))
        assert health_state.down_targets(state_dir, "web") == {"a", "b"}
        assert changes == ["down set rewritten: api: b; web: a, b"]
        assert "health: down set restored" in host.reasons()
        host.submitted.clear()
        assert p.reconcile(host.cfg, NodeState("MASTER", True, "again")) == []  # idempotent
        assert "health: down set restored" not in host.reasons()
        # a data plane that failed to come up (its teardown cleared the file): rewritten,
        # but no new reconcile, which would only retry the failure in a loop
        os.unlink(os.path.join(state_dir, "applied.json"))
        health_state.clear(state_dir)
        assert p.reconcile(host.cfg, NodeState("MASTER", True, "failed up")) != []
        assert "health: down set restored" not in host.reasons()
    finally:
        p.stop()


def test_reload_adds_and_removes_targets(tmp_path, fake, FakeHost):
    fake(H, "run_check", lambda c, target: (True, "ok"))
    path = write(tmp_path, BASE.format(d=tmp_path))
    host = FakeHost(path)
    p = H.create(host)
    assert sorted(p.status()["targets"]) == ["a", "b", "c"]
    text = BASE.format(d=tmp_path).replace("targets = a, b, c", "targets = a, d") \
        + "[target:d]\naddress = 10.1.0.4\ncheck = tcp\ncheck_port = 22\n"
    cfg = config.load(write(tmp_path, text))
    host.cfg = cfg
    changes = p.reconcile(cfg, NodeState("STANDALONE", True, "reload"))
    assert "d: checking tcp 10.1.0.4:22 every 2 s" in changes
    assert sorted(p.status()["targets"]) == ["a", "b", "d"]  # b is still in service api
    assert p.status()["targets"]["d"]["state"] == "up"  # new targets start up


# ------------------------------------------------------------------ real checks

NETNS_SCRIPT = r"""
import http.server, json, socket, subprocess, sys, threading
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
from synlb.plugins import health as H

tcp = socket.socket(); tcp.bind(("127.0.0.1", 7001)); tcp.listen(8)
tcp6 = socket.socket(socket.AF_INET6); tcp6.bind(("::1", 7001)); tcp6.listen(8)
only4 = socket.socket(); only4.bind(("127.0.0.1", 7004)); only4.listen(8)
mute = socket.socket(socket.AF_INET6); mute.bind(("::1", 7003)); mute.listen(8)  # accepts, never answers

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
class V6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
srv = V6(("::1", 7002), Handler)
threading.Thread(target=srv.serve_forever, daemon=True).start()

def chk(kind, addr, port=None, path="/", status=200, command=None, timeout=0.5, other=None):
    return H.run_check(H.Check(kind, addr, port, path, status, command, 1.0, timeout, 1, 1, other), "t")

script = sys.argv[1]
print(json.dumps({
    "tcp_ok": chk("tcp", "127.0.0.1", 7001),
    "tcp_refused": chk("tcp", "127.0.0.1", 7009),
    "tcp_unreachable": chk("tcp", "10.99.0.1", 80),
    "tcp_both_ok": chk("tcp", "127.0.0.1", 7001, other="::1"),
    "tcp_v6_down": chk("tcp", "127.0.0.1", 7004, other="::1"),  # 7004: IPv4 only
    "tcp_v4_down": chk("tcp", "127.0.0.1", 7002, other="::1"),  # 7002: the IPv6 HTTP server only
    "http_ok": chk("http", "::1", 7002, "/ok"),
    "http_503": chk("http", "::1", 7002, "/bad"),
    "http_503_wanted": chk("http", "::1", 7002, "/bad", 503),
    "http_mute": chk("http", "::1", 7003, timeout=0.3),
    "exec_ok": chk("exec", "127.0.0.1", 7001, command=(script, "0")),
    "exec_fail": chk("exec", "127.0.0.1", 7001, command=(script, "3")),
    "exec_hang": chk("exec", "127.0.0.1", None, command=(script, "hang"), timeout=0.3),
}))
"""


@ROOT_ONLY
def test_tcp_http_exec_checks_in_a_private_namespace(tmp_path):
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "check.sh"
    script.write_text('#!/bin/sh\n[ "$1" = hang ] && exec sleep 30\n'
                      'echo "target $SYNLB_TARGET at $SYNLB_TARGET_ADDRESS:$SYNLB_CHECK_PORT"; exit "$1"\n')
    os.chmod(script, 0o755)
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", NETNS_SCRIPT, str(script)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    res = {k: tuple(v) for k, v in json.loads(r.stdout).items()}
    assert res["tcp_ok"] == (True, "connected")
    assert res["tcp_refused"] == (False, "Connection refused")
    assert res["tcp_unreachable"] == (False, "Network is unreachable")
    # dual-stack: both families probed, the failing one named
    assert res["tcp_both_ok"] == (True, "connected")
    assert res["tcp_v6_down"] == (False, "[::1]:7004: Connection refused")
    assert res["tcp_v4_down"] == (False, "Connection refused")
    assert res["http_ok"] == (True, "HTTP 200")
    assert res["http_503"] == (False, "HTTP 503, want 200")
    assert res["http_503_wanted"] == (True, "HTTP 503")
    assert res["http_mute"] == (False, "timeout after 0.3 s")
    assert res["exec_ok"] == (True, "exit 0: target t at 127.0.0.1:7001")
    assert res["exec_fail"] == (False, "exit 3: target t at 127.0.0.1:7001")
    assert res["exec_hang"][0] is False and res["exec_hang"][1].startswith("timeout after 0.3 s (killed)")


@ROOT_ONLY
def test_exec_check_refuses_an_insecure_command(tmp_path):
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o775)
    c = H.Check("exec", "10.1.0.1", None, "/", 200, (str(script),), 1.0, 1.0, 1, 1)
    ok, why = H.run_check(c, "t")
    assert not ok and why.startswith("refused: ") and "writable by group" in why
