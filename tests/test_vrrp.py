"""VRRP events, pure parts: notify args, notify_fifo lines, D-Bus codes, the
[vrrp] section, the ordering of recorded events, the hook, the FIFO reader
(with the apply replaced), CLI errors. Nothing here touches the kernel."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from synlb import config
from synlb.cli import main as cli_main
from synlb_lab import demo_failover
from synlb.vrrp import delivery, journal
from synlb.vrrp import events as vrrp
from synlb.vrrp import fifo as vrrp_fifo
from synlb.vrrp.dbus import _children, instance_path
from synlb.vrrp.events import VrrpArgError, VrrpEvent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(ROOT, "hooks", "keepalived-notify")

BASE = """
[synlb]
state_dir = {state}
[service:web]
vips = 10.0.0.1/32
ingress = eth0
protocols = tcp
targets = a
[target:a]
address = 10.1.0.1
"""


def write_config(tmp_path, vrrp_section="[vrrp]\nsync_group = G1\n", name="synlb.ini"):
    p = tmp_path / name
    p.write_text(BASE.format(state=tmp_path / "state") + vrrp_section)
    return str(p)


# ---------------------------------------------------------------- parsing

def test_notify_args_generic_and_short_forms():
    assert vrrp.parse_notify_args(["GROUP", "G1", "MASTER", "0"]) == VrrpEvent("notify", "GROUP", "G1", "MASTER", 0)
    assert vrrp.parse_notify_args(["INSTANCE", "FRONT", "BACKUP", "150"]) == \
        VrrpEvent("notify", "INSTANCE", "FRONT", "BACKUP", 150)
    assert vrrp.parse_notify_args(["group", "G1", "fault"]) == VrrpEvent("notify", "GROUP", "G1", "FAULT")
    short = vrrp.parse_notify_args(["STOP"])
    assert short.kind is None and short.state == "STOP"
    assert short.about("GROUP", "G1") == VrrpEvent("notify", "GROUP", "G1", "STOP")
    assert vrrp.parse_notify_args(["DELETED"]).state == "DELETED"


@pytest.mark.parametrize("argv, why", [
    ([], "got 0 arguments"),
    (["GROUP", "G1"], "got 2 arguments"),
    (["GROUP", "G1", "MASTER", "0", "x"], "got 5 arguments"),
    (["GROUP", "G1", "{UNKNOWN}", "0"], "is not a VRRP state"),
    (["SYNC", "G1", "MASTER", "0"], "is not GROUP or INSTANCE"),
    (["GROUP", "G1", "MASTER", "high"], "is not an integer"),
    (["GROUP", "G1", "MASTER", "300"], "out of range"),
    (["PRIMARY"], "is not a VRRP state"),
])
def test_notify_args_errors(argv, why):
    with pytest.raises(VrrpArgError, match=why):
        vrrp.parse_notify_args(argv)


def test_fifo_lines():
    assert vrrp.parse_fifo_line('GROUP "G1" MASTER 0\n') == VrrpEvent("fifo", "GROUP", "G1", "MASTER", 0)
    assert vrrp.parse_fifo_line(b'INSTANCE "FRONT6" BACKUP 100\n') == \
        VrrpEvent("fifo", "INSTANCE", "FRONT6", "BACKUP", 100)
    assert vrrp.parse_fifo_line('INSTANCE "with space" STOP 150') == \
        VrrpEvent("fifo", "INSTANCE", "with space", "STOP", 150)
    assert vrrp.parse_fifo_line('GROUP "G1" DELETED 0').state == "DELETED"
    # not state changes: events, the checker's lines, garbage
    for line in ('INSTANCE "FRONT" MASTER_RX_LOWER_PRI 150', 'INSTANCE "FRONT" MASTER_PRIORITY 120',
                 'VS [10.0.0.1]:tcp:80 UP', 'RS [10.1.0.1]:tcp:80 [10.0.0.1]:tcp:80 DOWN',
                 "", "GROUP G1 MASTER 0", 'GROUP "G1" MASTER', b"\xff\xfe", 'GROUP "G1" {UNKNOWN} 0'):
        assert vrrp.parse_fifo_line(line) is None, line


def test_dbus_codes_and_group_state():
    assert [vrrp.state_from_dbus(c) for c in (0, 1, 2, 3, 97, 98)] == \
        ["INIT", "BACKUP", "MASTER", "FAULT", "DELETED", "STOP"]
    assert vrrp.state_from_dbus(42) is None
    g = vrrp.group_state
    assert g(["MASTER"] * 4) == "MASTER"
    assert g(["MASTER", "MASTER", "BACKUP", "MASTER"]) == "BACKUP"  # transition in progress
    assert g(["BACKUP", "FAULT"]) == "FAULT"
    assert g(["MASTER", "STOP"]) == "STOP"
    assert g(["BACKUP", "INIT"]) == "INIT"
    assert g([]) == "STOP"  # keepalived gone


@pytest.mark.parametrize("state, hot, cold", [
    ("MASTER", True, True), ("BACKUP", True, False), ("FAULT", False, False),
    ("STOP", False, False), ("DELETED", False, False), ("INIT", False, False)])
def test_desired_active(state, hot, cold):
    assert vrrp.desired_active(state, "hot") is hot
    assert vrrp.desired_active(state, "cold") is cold


def test_dbus_paths():
    assert instance_path("eth0/51/IPv4") == "/org/keepalived/Vrrp1/Instance/eth0/51/IPv4"
    assert instance_path("eth0.100/7/IPv6") == "/org/keepalived/Vrrp1/Instance/eth0_100/7/IPv6"
    xml = '<node><node name="front"/><node name="back"/><interface name="x"/></node>'
    assert _children(xml) == ["front", "back"] and _children("not xml") == []


# ---------------------------------------------------------------- config

def test_vrrp_section_loads(tmp_path):
    cfg = config.load(write_config(tmp_path, "[vrrp]\ninstance = FRONT\nstandby = cold\n"
                                             "dbus_instances = front/51/IPv4, front/51/IPv6\n"))
    vc = vrrp.vrrp_config(config.load_section(cfg, "vrrp", vrrp.VRRP_SCHEMA))
    assert vc == vrrp.VrrpConfig("INSTANCE", "FRONT", "cold", ("front/51/IPv4", "front/51/IPv6"))
    assert vc.matches(VrrpEvent("fifo", "INSTANCE", "FRONT", "MASTER"))
    assert not vc.matches(VrrpEvent("fifo", "GROUP", "FRONT", "MASTER"))
    ld = delivery.load(write_config(tmp_path, name="g.ini"))
    assert ld.vcfg == vrrp.VrrpConfig("GROUP", "G1", "hot", ())


@pytest.mark.parametrize("section, want", [
    ("[vrrp]\nsync_group = G1\ninstance = FRONT\n", "vrrp:instance: set sync_group or instance, not both"),
    ("[vrrp]\nstandby = hot\n", "vrrp:-: name what drives this node"),
    ("[vrrp]\nsync_group = G1\nstandby = warm\n", "vrrp:standby: 'warm' is not one of hot, cold"),
    ("[vrrp]\nsync_group = G1\ndbus_instances = front/51\n", "vrrp:dbus_instances: 'front/51' is not"),
    ("[vrrp]\nsync_group = G 1\n", "vrrp:sync_group:"),
    ("[vrrp]\nsync_group = G1\ngroup = G1\n", "vrrp:group: unknown key"),
    ("[vrrp]\nsync_group = G1\nready_file = run/synlb.ready\n", "vrrp:ready_file: 'run/synlb.ready' is not an absolute"),
    ("[vrrp]\nsync_group = G1\nready_file = /run/my ready\n", "vrrp:ready_file: '/run/my ready': keepalived's"),
    ("[vrrp]\nsync_group = G1\nready_file = /run/\n", "vrrp:ready_file: '/run/' names a directory"),
])
def test_vrrp_section_problems_name_file_section_key(tmp_path, capsys, section, want):
    path = write_config(tmp_path, section)
    assert cli_main(["-c", path, "check"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:{want}" in err and "Traceback" not in err


def test_ready_file_loads_and_is_never_in_the_state_dir(tmp_path, capsys):
    cfg = config.load(write_config(tmp_path, "[vrrp]\nsync_group = G1\nready_file = /run/synlb.ready\n"))
    assert cfg.vrrp.ready_file == "/run/synlb.ready"
    assert config.load(write_config(tmp_path, name="none.ini")).vrrp.ready_file is None
    # keepalived drops a track file whose directory is missing when it starts,
    # and synlb makes its state dir later
    for inside in (tmp_path / "state" / "ready", tmp_path / "state" / "sub" / "r"):
        path = write_config(tmp_path, f"[vrrp]\nsync_group = G1\nready_file = {inside}\n", name="in.ini")
        assert cli_main(["-c", path, "check"]) == 1
        err = capsys.readouterr().err
        assert f"{path}:vrrp:ready_file: {inside} is inside state_dir" in err and "Traceback" not in err


def test_check_passes_with_vrrp_section(tmp_path, capsys):
    path = write_config(tmp_path)
    assert cli_main(["-c", path, "check"]) == 0
    assert "OK" in capsys.readouterr().out


def test_broken_config_still_allows_teardown(tmp_path):
    path = write_config(tmp_path)
    with open(path, "a") as fh:
        fh.write("\n[target:b]\naddress = not-an-address\n")
    ld = delivery.load(path)  # [synlb] and [vrrp] are fine: teardown possible
    assert ld.cfg is None and ld.error is not None and ld.vcfg.name == "G1"
    path2 = write_config(tmp_path, "[vrrp]\nstandby = cold\n", name="bad.ini")
    with pytest.raises(config.ConfigError):
        delivery.load(path2)


# ---------------------------------------------------------------- ordering

def test_record_keeps_the_newest(tmp_path):
    sd = str(tmp_path)
    vc = vrrp.VrrpConfig("GROUP", "G1", "hot")
    ev = lambda s: VrrpEvent("notify", "GROUP", "G1", s, 0)
    assert journal.record(sd, vc, ev("BACKUP"), (100, 7)) == (ev("BACKUP"), True)
    assert journal.record(sd, vc, ev("MASTER"), (200, 3)) == (ev("MASTER"), True)
    # a late, stale call (forked before MASTER's) cannot undo it
    assert journal.record(sd, vc, ev("FAULT"), (150, 9)) == (ev("MASTER"), False)
    # same clock tick: the later fork (higher pid) wins
    assert journal.record(sd, vc, ev("STOP"), (200, 2)) == (ev("MASTER"), False)
    assert journal.record(sd, vc, ev("STOP"), (200, 4)) == (ev("STOP"), True)
    assert journal.read_state(sd)["event"] == ev("STOP")
    # a state file from another boot, or about another group, never blocks
    st = journal.read_state(sd)
    journal._write_state(sd, ev("MASTER"), (10**18, 0))
    state_file = tmp_path / journal.STATE_FILE
    raw = json.loads(state_file.read_text())
    raw["boot_id"] = "another-boot"
    state_file.write_text(json.dumps(raw))
    assert journal.record(sd, vc, ev("BACKUP"), (5, 0)) == (ev("BACKUP"), True)
    other = vrrp.VrrpConfig("GROUP", "G2", "hot")
    g2 = VrrpEvent("notify", "GROUP", "G2", "FAULT", 0)
    assert journal.record(sd, other, g2, (1, 0)) == (g2, True)
    assert st is not None


def test_stamps_follow_fork_order():
    procs = [subprocess.Popen(["sleep", "2"]) for _ in range(6)]
    try:
        stamps = [journal.process_stamp(p.pid) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    t = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    assert abs(stamps[-1][0] - t) < 5 * 10**9  # boot clock, tick resolution
    a, b = journal.now_stamp(), journal.now_stamp()
    assert b > a


def test_notify_stamp_from_hook_env(monkeypatch):
    hz = os.sysconf("SC_CLK_TCK")
    monkeypatch.setenv("SYNLB_NOTIFY_STAMP", "12345 678")
    assert journal.notify_stamp() == (12345 * (10**9 // hz), 678)
    monkeypatch.setenv("SYNLB_NOTIFY_STAMP", "garbage")
    assert journal.notify_stamp()[1] == os.getpid()


# ---------------------------------------------------------------- the hook

def test_hook_passes_arguments_and_its_fork_time(tmp_path):
    fake = tmp_path / "fake-synlb"
    fake.write_text('#!/bin/sh\necho "args=$* stamp=$SYNLB_NOTIFY_STAMP sid=$(ps -o sid= -p $$)"\n')
    fake.chmod(0o755)
    p = subprocess.Popen([HOOK, "--config", "/x/synlb.ini", "GROUP", "G1", "MASTER", "0"],
                         env={**os.environ, "SYNLB_BIN": str(fake)}, stdout=subprocess.PIPE, text=True)
    ticks = journal.process_stamp(p.pid)  # the hook's own fork time
    out = p.communicate(timeout=10)[0].strip()
    assert p.returncode == 0
    args, stamp, sid = out.split(" stamp=")[0], out.split(" stamp=")[1].split(" sid=")[0], out.split("sid=")[1]
    assert args == "args=notify --config /x/synlb.ini GROUP G1 MASTER 0"
    hz = os.sysconf("SC_CLK_TCK")
    start, pid = (int(x) for x in stamp.split())
    assert (start * (10**9 // hz), pid) == ticks and pid == p.pid
    assert int(sid) != os.getsid(0)  # synlb runs in a session of its own


def test_hook_file_modes():
    """What enable_script_security needs: root-owned, not group/world writable."""
    st = os.stat(HOOK)
    assert st.st_mode & 0o111 and not st.st_mode & 0o022
    with open(HOOK) as fh:
        assert fh.readline().startswith("#!/bin/sh")


# ---------------------------------------------------------------- keepalived.conf

def test_example_keepalived_conf_renders_for_the_lab():
    kw = {"config": "/lab/lb2/synlb.ini", "hook": "/lab/hooks/keepalived-notify",
          "fifo": "/lab/lb2/keepalived.fifo", "synlb": "/venv/bin/synlb", "ready_file": "/lab/lb2/synlb.ready"}
    conf = demo_failover.keepalived_conf(2, **kw)
    for want in ("router_id lb2", "priority 100", "vrrp_sync_group G1", "enable_script_security",
                 'notify "/lab/hooks/keepalived-notify --config /lab/lb2/synlb.ini"',
                 "10.64.1.254/24 dev front", "fd64:2::254/64 dev back", "interface back",
                 "advert_int 0.03", "preempt_delay 5", "#enable_dbus", "#notify_fifo /lab/lb2/keepalived.fifo",
                 'file "/lab/lb2/synlb.ready"', "synlb_ready weight -60"):
        assert want in conf, want
    settings = "\n".join(ln for ln in conf.splitlines() if not ln.lstrip().startswith("#"))
    for gone in ("eth0", "eth1", "192.0.2.", "198.51.100.", "203.0.113.", "2001:db8", "/etc/synlb", "/usr/",
                 "/run/"):
        assert gone not in settings, gone
    assert conf.count("{") == conf.count("}")
    # the ready file's weight: above the gap between the routers' priorities
    # (150 and 100), below the lower one (both not ready: the better one still wins)
    weight = int(re.search(r"synlb_ready weight -(\d+)", conf).group(1))
    assert 150 - 100 < weight < 100
    dbus_only = demo_failover.keepalived_conf(1, notify=False, dbus=True, **kw)
    assert "\n    enable_dbus" in dbus_only and "\n    notify \"" not in dbus_only
    assert "priority 150" in dbus_only and "#notify_fifo" in dbus_only
    fifo_only = demo_failover.keepalived_conf(1, notify=False, use_fifo=True, **kw)
    assert "\n    notify_fifo /lab/lb2/keepalived.fifo" in fifo_only
    assert '\n    notify_fifo_script "/venv/bin/synlb --config /lab/lb2/synlb.ini fifo"' in fifo_only
    with pytest.raises(Exception, match="not found"):
        demo_failover.keepalived_conf(1, example="global_defs {}\n", **kw)


# ---------------------------------------------------------------- the FIFO reader

@pytest.fixture
def fifo_env(tmp_path, fake):
    """A FIFO and a config; the apply is replaced by a recorder."""
    path = write_config(tmp_path)
    fifo = str(tmp_path / "notify.fifo")
    os.mkfifo(fifo)
    applied: list = []

    def handle(config_path, event, stamp):
        applied.append((event, stamp))
        return delivery.Result(event, stored=True, latest=event, active=False)

    fake(delivery, "deliver", handle)
    fake(delivery, "run_detached", lambda fn: fn())
    return path, fifo, applied


def _writer(fifo, chunks, before_close=None):
    """A thread writing ``chunks`` ((delay, data), ...) to the FIFO; its
    ``closed`` event is set once it closed the FIFO (the reader's EOF)."""
    closed = threading.Event()

    def run():
        try:
            with open(fifo, "w") as fh:
                for delay, data in chunks:
                    time.sleep(delay)
                    fh.write(data)
                    fh.flush()
                if before_close:
                    before_close()
        finally:
            closed.set()
    t = threading.Thread(target=run, daemon=True)
    t.closed = closed
    t.start()
    return t


def test_fifo_in_order_bursts_coalesced_until_eof(fifo_env, capsys):
    path, fifo, applied = fifo_env
    burst = ('INSTANCE "FRONT" BACKUP 150\nGROUP "G1" BACKUP 0\nVS [10.0.0.1]:tcp:80 UP\n'
             'GROUP "G1" MASTER 0\nINSTANCE "BACK" MASTER 150\n')
    t = _writer(fifo, [(0.05, burst), (0.3, 'GROUP "G1" FAULT 0\n'), (0.3, 'GROUP "G1" BACK')
                       , (0.01, 'UP 0\n')])
    assert vrrp_fifo.follow(path, fifo) == 0  # returns at EOF
    t.join(5)
    states = [ev.state for ev, _ in applied]
    assert states == ["MASTER", "FAULT", "BACKUP"]  # last of the burst, then each in order
    assert [s for _, s in applied] == sorted(s for _, s in applied)
    log = journal.read_log(str(os.path.dirname(path) + "/state"))
    assert [e["event"]["state"] for e in log if e.get("superseded")] == ["BACKUP"]
    assert sum(1 for e in log if e.get("ignored")) == 2  # the two INSTANCE lines


def test_fifo_reads_stop_after_sigterm(fifo_env):
    """keepalived sends SIGTERM first and writes STOP after it."""
    path, fifo, applied = fifo_env
    hold = threading.Event()
    writer = _writer(fifo, [(0.05, 'GROUP "G1" MASTER 0\n'), (0.3, "")], before_close=hold.wait)
    safety = threading.Timer(20, hold.set)  # a reader that waited for EOF gets it in the end
    safety.start()

    def stop_line():
        with open(fifo, "w") as fh:
            fh.write('GROUP "G1" STOP 0\n')

    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    threading.Timer(0.6, stop_line).start()
    t0 = time.monotonic()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert vrrp_fifo.follow(path, fifo) == 0
        # it ended with the writer still holding the FIFO open: the grace, not an EOF, ended it
        no_eof = not writer.closed.is_set()
    finally:
        hold.set()
        safety.cancel()
    print(f"follow returned {time.monotonic() - t0:.2f} s after it started (SIGTERM at 0.5 s, grace "
          f"{vrrp_fifo.GRACE} s)")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored
    assert [ev.state for ev, _ in applied] == ["MASTER", "STOP"]  # the STOP written after SIGTERM
    assert no_eof


# ---------------------------------------------------------------- CLI errors

def _run_cli(argv, env=None):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "synlb"), *argv], check=False,
                          capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})


def test_cli_user_errors_are_one_line(tmp_path):
    path = write_config(tmp_path)
    cases = [
        (["notify", "-c", path, "GROUP", "G1", "PRIMARY", "0"], "synlb notify: 'PRIMARY' is not a VRRP state"),
        (["notify", "-c", path], "synlb notify: expected GROUP|INSTANCE NAME STATE PRIORITY"),
        (["fifo", "-c", path, str(tmp_path / "nope")], "synlb fifo:"),
        (["fifo", "-c", path, path], "is not a FIFO"),
        (["dbus", "-c", path], "synlb dbus: cannot connect to the system bus"),
        (["-c", write_config(tmp_path, "", name="novrrp.ini"), "notify", "MASTER"], ":vrrp:-: no [vrrp] section"),
    ]
    for argv, want in cases:
        r = _run_cli(argv, env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"})
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert want in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_notify_about_another_group_is_ignored(tmp_path):
    path = write_config(tmp_path)
    r = _run_cli(["notify", "--config", path, "INSTANCE", "FRONT", "MASTER", "150"])
    assert r.returncode == 0 and "ignored" in r.stdout, r.stderr
    assert not os.path.exists(tmp_path / "state" / journal.STATE_FILE)
    log = journal.read_log(str(tmp_path / "state"))
    assert log[-1]["ignored"] and log[-1]["event"]["name"] == "FRONT"


# ---------------------------------------------------------------- with a plugin host (synlb run)

def _cfg_ns(tmp_path, **vrrp_vals):
    from types import SimpleNamespace
    vals = {"sync_group": "G1", "instance": None, "standby": "hot", "dbus_instances": (), **vrrp_vals}
    return SimpleNamespace(vrrp=vrrp.vrrp_config(vals), globals=SimpleNamespace(state_dir=str(tmp_path)))


def test_host_node_follows_the_record_not_the_request_order(tmp_path):
    from synlb import host  # the host's node state: initial_node, vrrp_node
    from synlb.plugins import NodeState
    cfg = _cfg_ns(tmp_path)
    assert host.initial_node(cfg) == NodeState("INIT", False, "start")
    vc = cfg.vrrp
    journal.record(str(tmp_path), vc, VrrpEvent("notify", "GROUP", "G1", "MASTER", 0), (200, 1))
    # a late request about an older event still yields the recorded (newest) state
    stale = {"source": "notify", "kind": "GROUP", "name": "G1", "state": "FAULT", "priority": 0}
    assert host.vrrp_node(cfg, NodeState("INIT", False, ""), stale) == NodeState("MASTER", True, "")
    assert host.initial_node(cfg) == NodeState("MASTER", True, "start")
    journal.record(str(tmp_path), vc, VrrpEvent("fifo", "GROUP", "G1", "BACKUP", 0), (300, 0))
    assert host.vrrp_node(_cfg_ns(tmp_path, standby="cold"), None, {}) == NodeState("BACKUP", False, "")
    # about another group: nothing to follow
    assert host.vrrp_node(_cfg_ns(tmp_path, sync_group="G2"), None, {}) is None
    from types import SimpleNamespace
    assert host.vrrp_node(SimpleNamespace(vrrp=None), None, {}) is None  # standalone


def test_events_go_to_a_running_host(tmp_path, fake):
    """synlb run owns the data plane: the event is recorded and passed on."""
    from synlb import control, dataplane
    path = write_config(tmp_path)
    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    requests = []

    def answer(req):
        requests.append(req)
        return {"ok": True, "node": "MASTER"}

    def forbidden(*a, **k):
        raise AssertionError("the data plane is the host's")

    fake(dataplane, "up_locked", forbidden)
    fake(dataplane, "down_locked", forbidden)
    srv = control.ControlServer(control.socket_path(state_dir), answer)
    srv.start()
    try:
        res = delivery.deliver(path, VrrpEvent("notify", "GROUP", "G1", "MASTER", 0), (5, 1))
    finally:
        srv.stop()
    assert requests == [{"cmd": "vrrp", "event": {"source": "notify", "kind": "GROUP", "name": "G1",
                                                  "state": "MASTER", "priority": 0}}]
    assert res.host == {"ok": True, "node": "MASTER"} and "passed to synlb run" in res.summary()
    assert journal.read_state(state_dir)["event"].state == "MASTER"

    # a socket left by a host that died: reconcile here, to the latest record
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(control.socket_path(state_dir))  # exists, nobody listens
    downs = []
    fake(dataplane, "down_locked", lambda state_dir, route_protocol: downs.append(state_dir) or ["removed"])
    res = delivery.deliver(path, VrrpEvent("notify", "GROUP", "G1", "FAULT", 0), (6, 1))
    assert downs == [state_dir] and res.changes == ["removed"] and res.host is None
