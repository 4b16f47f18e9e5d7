"""Whether the router is ready to take the traffic over (ready.py), the
health plugin's settled view behind it, and the file the host keeps for
keepalived's track_file (no kernel, no root)."""

from __future__ import annotations

import os
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from synlb import config as config_mod
from synlb import host as host_mod
from synlb import ready
from synlb.plugins import NodeState, Plugin
from synlb.plugins import health as H

MASTER, BACKUP_HOT, INIT = NodeState("MASTER", True, "x"), NodeState("BACKUP", True, "x"), NodeState("INIT", False, "x")


def dp(error=None, installed=True, wanted=(0, 1), served=(0, 1)):
    return ready.DataPlane(error, installed, frozenset(wanted), frozenset(served))


# ---------------------------------------------------------------- the decision

def test_each_fact_that_is_not_as_wanted_is_a_reason():
    assert ready.decide(MASTER, "hot", [dp(), ready.Checks((), "host start")]) == ready.Readiness(True, ())
    assert ready.decide(MASTER, None, []).ready  # nothing to judge (no lb, no health): ready
    cases = {
        "the data plane's last reconcile failed: iptables-restore: lock held": [dp(error="iptables-restore: lock held")],
        "the data plane is not installed": [dp(installed=False, wanted=(), served=())],
        "no worker serves queue 1": [dp(served=(0,))],
        "no worker serves queues 0, 1": [dp(served=())],
        "health checks not settled since link back up: t1, t2": [ready.Checks(("t2", "t1"), "link back up")],
        "cannot tell: lb: boom": [ready.Unknown("lb: boom")],
    }
    for why, facts in cases.items():
        r = ready.decide(MASTER, "hot", facts)
        assert r == ready.Readiness(False, (why,)) and r.content() == ready.NOT_READY, why
    # a BACKUP without its hot standby (INIT: keepalived starting) would take
    # over with nothing installed; with cold standby nothing is installed until MASTER
    assert ready.decide(INIT, "hot", [dp(installed=False, wanted=(), served=())]).reasons == \
        ("the hot standby is not installed (VRRP INIT)",)
    assert ready.decide(INIT, "cold", [dp(installed=False, wanted=(), served=())]).ready
    assert ready.decide(INIT, None, [dp(installed=False, wanted=(), served=())]).ready
    many = ready.decide(MASTER, "hot", [ready.Checks(tuple(f"t{i}" for i in range(8)), "host start")])
    assert many.reasons == ("health checks not settled since host start: t0, t1, t2, t3, t4 and 3 more",)
    assert ready.STARTING.content() == ready.STOPPED.content() == b"1\n" and ready.decide(MASTER, None, []).content() == b"0\n"


queues = st.frozensets(st.integers(0, 5), max_size=4)
dataplanes = st.builds(ready.DataPlane, st.one_of(st.none(), st.text(min_size=1, max_size=5)), st.booleans(),
                       queues, queues)
checks = st.builds(ready.Checks, st.lists(st.sampled_from(["a", "b", "c"]), max_size=3).map(tuple),
                   st.sampled_from(["host start", "link x up"]))
nodes = st.builds(NodeState, st.sampled_from(["MASTER", "BACKUP", "FAULT", "INIT", "STANDALONE"]), st.booleans(),
                  st.just("x"))


@settings(max_examples=300, deadline=None)
@given(nodes, st.sampled_from([None, "hot", "cold"]), st.lists(st.one_of(dataplanes, checks), max_size=4),
       st.randoms())
def test_ready_exactly_when_every_fact_is_as_wanted(node, standby, facts, rnd):
    r = ready.decide(node, standby, facts)
    wanted = all(
        (f.error is None and (f.installed or not node.active) and (node.active or standby != "hot")
         and (not f.installed or f.wanted <= f.served)) if isinstance(f, ready.DataPlane) else not f.pending
        for f in facts)
    assert r.ready is wanted and r.ready is (r.reasons == ())
    assert r.content() == (b"0\n" if wanted else b"1\n")
    shuffled = list(facts)
    rnd.shuffle(shuffled)
    assert ready.decide(node, standby, shuffled).ready is r.ready  # the order the plugins come in does not matter


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.lists(st.booleans(), max_size=12), st.lists(st.booleans(), min_size=1,
                                                                                            max_size=30))
def test_a_target_view_settles_within_max_rise_fall_fresh_checks(rise, fall, before, after):
    """Whatever happened before the epoch (not fresh), any max(rise, fall)
    results after it settle the view, and no stale result ever does."""
    c = H.Check("tcp", "10.1.0.1", 80, "/", 200, None, 1.0, 1.0, rise, fall)
    th = H.TargetHealth("a", c, time.time())
    for ok in before:
        th.record(ok, "stale", time.time(), 0.0, fresh=False)
    assert not th.settled
    for i, ok in enumerate(after, 1):
        up_before = th.up
        th.record(ok, "fresh", time.time(), 0.0)
        if ok == th.up and ok == up_before:  # agreed without flipping: settled at once
            assert th.settled
        if i >= max(rise, fall):
            assert th.settled
    assert H.TargetHealth("n", H.Check("none", None, None, "/", 200, None, 1.0, 1.0, 1, 1), time.time()).settled


# ---------------------------------------------------------------- the health plugin

HEALTH_CONF = """
[synlb]
state_dir = {d}/state
plugins = lb, health
[service:web]
vips = 10.0.0.1/32
ingress = eth0
protocols = tcp
targets = a, b
[target:a]
address = 10.1.0.1
check = tcp
check_port = 80
rise = 1
fall = 1
[target:b]
address = 10.1.0.2
"""


def test_a_link_up_unsettles_every_checked_target_until_a_check_started_after_it(tmp_path, FakeHost, fake):
    path = tmp_path / "synlb.ini"
    path.write_text(HEALTH_CONF.format(d=tmp_path))
    fake(H, "run_check", lambda c, target: (True, "connected"))
    host = FakeHost(str(path))
    p = H.HealthPlugin(host)
    try:
        a = p.targets["a"]
        assert p.ready_facts(host.cfg, MASTER) == [ready.Checks(("a",), "host start")]  # b: check = none
        p._check(a)
        assert p.ready_facts(host.cfg, MASTER) == [ready.Checks((), "host start")]
        assert host.reasons("ready") == ["health: a checked"]
        p.link_up("front", time.monotonic())
        assert p.ready_facts(host.cfg, MASTER) == [ready.Checks(("a",), "link front up")] and a.next_due == 0.0
        # a check that started before the link came up saw it down: it does not count
        p.link_up("back", time.monotonic() + 3600)
        p._check(a)
        assert p.ready_facts(host.cfg, MASTER) == [ready.Checks(("a",), "link back up")]
        assert a.checks == 2 and host.reasons("ready") == ["health: a checked"]
        p.link_up("front", time.monotonic())  # older than the epoch: changes nothing
        assert p.epoch_reason == "link back up"
    finally:
        p.stop()


# ---------------------------------------------------------------- the host's file

class Facts(Plugin):
    """A plugin whose facts the test sets; it records what the file said when the host started it."""
    name = "facts"

    def __init__(self, host, path):
        super().__init__(host)
        self.path = path
        self.facts = [dp()]
        self.at_start = None
        self.reconciled = threading.Event()

    def start(self):
        with open(self.path, "rb") as fh:
            self.at_start = fh.read()

    def reconcile(self, cfg, node):
        self.reconciled.set()
        return []

    def ready_facts(self, cfg, node):
        return self.facts


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_host_keeps_the_file_not_ready_from_start_to_after_stop(tmp_path):
    ready_file = tmp_path / "synlb.ready"
    ready_file.write_text("0\n")  # a host that crashed while ready
    p = tmp_path / "synlb.ini"
    p.write_text(f"[synlb]\nstate_dir = {tmp_path / 'state'}\nplugins = lb\n[service:web]\nvips = 10.64.100.1/32\n"
                 "ingress = eth0\nprotocols = tcp\ntargets = a\n[target:a]\naddress = 10.1.0.1\n"
                 f"[vrrp]\nsync_group = G1\nstandby = cold\nready_file = {ready_file}\n")
    h = host_mod.Host(str(p), config_mod.load(str(p)))
    plugin = Facts(h, ready_file)
    h.plugins = [plugin]
    seen: dict = {}

    def drive():  # the host runs on the main thread (signals): this one acts and looks
        try:
            plugin.reconciled.wait(10)
            wait_for(lambda: ready_file.read_bytes() == b"0\n")
            seen["first"] = h.handle_request({"cmd": "status"})["ready"]
            plugin.facts = [dp(served=(0,))]  # a worker died: the plugin says so
            h.submit("ready", reason="worker queue 1 exited")
            wait_for(lambda: ready_file.read_bytes() == b"1\n")
            seen["dead"] = h.handle_request({"cmd": "status"})["ready"]["reasons"]
            plugin.facts = [dp()]
            h.submit("link", {"name": "front", "at": time.monotonic(), "reconcile": False}, reason="link front up")
            wait_for(lambda: ready_file.read_bytes() == b"0\n")
            seen["back"] = True
        finally:
            h.submit("stop")
    t = threading.Thread(target=drive, daemon=True)
    t.start()
    assert h.run() == 0
    t.join(10)
    assert plugin.at_start == b"1\n"  # written before any plugin started
    assert seen["first"] == {"ready": True, "reasons": [], "since": seen["first"]["since"], "file": str(ready_file)}
    assert seen["dead"] == ["no worker serves queue 1"] and seen["back"]
    assert ready_file.read_bytes() == b"1\n" and h.readiness == ready.STOPPED
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synlb.ready")]  # no temp file left


def test_a_ready_file_that_cannot_be_written_stops_the_start(tmp_path, caplog):
    p = tmp_path / "synlb.ini"
    missing = tmp_path / "no-such-dir" / "synlb.ready"
    p.write_text(f"[synlb]\nstate_dir = {tmp_path / 'state'}\n[service:web]\nvips = 10.64.100.1/32\n"
                 "ingress = eth0\nprotocols = tcp\ntargets = a\n[target:a]\naddress = 10.1.0.1\n"
                 f"[vrrp]\nsync_group = G1\nready_file = {missing}\n")
    h = host_mod.Host(str(p), config_mod.load(str(p)))
    h.plugins = []
    assert h.run() == 1
    assert f"cannot write [vrrp] ready_file {missing}: No such file or directory" in caplog.text


def test_status_shows_ready_and_why_not(tmp_path):
    from synlb import status
    host = {"ok": True, "node": "BACKUP", "transitions": 3, "plugins": {},
            "ready": {"ready": False, "reasons": ["health checks not settled since link front up: t1",
                                                  "no worker serves queue 0"], "since": 0.0, "file": "/x"}}
    st = {"active": True, "vrrp": None, "host": host, "sysctl": {}, "chains": [], "services": [],
          "ready_file": {"path": "/x", "says": "1", "ready": False}}
    text = status.render_text(st)
    assert "  ready: NO: health checks not settled since link front up: t1; no worker serves queue 0" in text
    assert "ready file: /x says 1 (NOT READY)" in text
    host["ready"] = {"ready": True, "reasons": [], "since": 0.0, "file": None}
    st["ready_file"] = None
    text = status.render_text(st)
    assert "  ready: yes" in text and "ready file" not in text
    # what keepalived reads, also while the host is not running
    cfg_path = tmp_path / "synlb.ini"
    cfg_path.write_text(f"[synlb]\nstate_dir = {tmp_path / 's'}\n[service:web]\nvips = 10.64.100.1/32\n"
                        "ingress = eth0\nprotocols = tcp\ntargets = a\n[target:a]\naddress = 10.1.0.1\n"
                        f"[vrrp]\nsync_group = G1\nready_file = {tmp_path / 'r'}\n")
    cfg = config_mod.load(str(cfg_path))
    assert status._ready_file(cfg)["says"].startswith("unreadable (")
    (tmp_path / "r").write_text("0\n")
    assert status._ready_file(cfg) == {"path": str(tmp_path / "r"), "says": "0", "ready": True}
