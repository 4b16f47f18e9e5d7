"""The netns lab itself, with no load balancer: routing, the test servers
and client driver, keepalived failover, teardown."""

import os
import shutil
import time

import pytest

from synlb_lab import Lab, LabError
from synlb_lab.keepalived import render_keepalived_conf
from synlb_lab.nginx import render_nginx_conf

# real namespaces and processes (tests/conftest.py skips them without root or these tools)
labtest = pytest.mark.lab(tools=("ip",))


# ---------------------------------------------------------------- pure

def test_keepalived_conf_render():
    conf = render_keepalived_conf(1, notify="/usr/bin/synlb notify", enable_dbus=True,
                                  notify_fifo="/run/x.fifo",
                                  notify_fifo_script="/usr/bin/synlb fifo")
    for want in ("vrrp_sync_group G1 {", "vrrp_instance FRONT {", "vrrp_instance BACK6 {",
                 "priority 150", "advert_int 0.2", "version 3", "enable_dbus",
                 "enable_script_security", "script_user root",
                 'notify "/usr/bin/synlb notify"', "notify_fifo /run/x.fifo",
                 'notify_fifo_script "/usr/bin/synlb fifo"',
                 "10.64.1.254/24 dev front", "10.64.2.254/24 dev back",
                 "fd64:1::254/64 dev front", "fd64:2::254/64 dev back",
                 "virtual_router_id 51", "virtual_router_id 52"):
        assert want in conf, want
    assert conf.count("{") == conf.count("}")
    conf2 = render_keepalived_conf(2, ipv6=False)
    assert "priority 100" in conf2 and "FRONT6" not in conf2 and "enable_dbus" not in conf2
    with pytest.raises(ValueError):
        render_keepalived_conf(1, notify_fifo_script="/x")


def test_nginx_conf_render(tmp_path):
    conf = render_nginx_conf("t2", str(tmp_path), 8081)
    assert "X-Target t2" in conf and "listen [::]:8081" in conf and "daemon off;" in conf
    assert str(tmp_path) in conf


# ---------------------------------------------------------------- lab

def keepalived_log_size(lab, router: str) -> int:
    return os.path.getsize(lab.keepalived_paths(router)["log"])


def keepalived_log(lab, router: str, since: int = 0) -> str:
    """What keepalived (started with --log-detail) logged in ``router`` from offset ``since`` on."""
    with open(lab.keepalived_paths(router)["log"], errors="replace") as fh:
        fh.seek(since)
        return fh.read()


@labtest
def test_single_router_routing_patterns_and_teardown(assert_torn_down):
    with Lab(routers=1, targets=3) as lab:
        assert set(lab.roles) == {"sw", "client", "lb1", "t1", "t2", "t3"}
        assert lab.ns("lb1") == f"{lab.prefix}-lb1"
        assert lab.sysctl_get("lb1", "net.ipv4.ip_forward") == "1"
        assert lab.sysctl_get("lb1", "net.ipv6.conf.all.forwarding") == "1"
        assert lab.owns("t2", "10.64.100.1") and lab.owns("t2", "fd64:100::1")
        # plain routing client -> router -> each target's back address
        for fam in (4, 6):
            for t in lab.targets:
                res = lab.open_connections(lab.addr(t, fam), count=6, concurrency=3)
                assert res["per_target"] == {t: 6}, res
                assert res["failed"] == 0
        # every session pattern, v4 and v6, all at once
        handles = {(p, fam): lab.start_sessions(lab.addr("t1", fam), p, count=2,
                                                duration=1.5, interval=0.05)
                   for p in ("echo", "push", "down", "up") for fam in (4, 6)}
        for key, h in handles.items():
            res = h.result()
            s = res["summary"]
            print(f"{key}: longest gap {s['max_gap']:.3f} s, data held up at most {s['max_delay']:.3f} s")
            assert s["survived"] == 2 and s["moved"] == 0, (key, s)
            assert s["per_target"] == {"t1": 2}
            # the gaps are measured within the run
            assert 0 < s["max_gap"] <= res["elapsed"], (key, s)
            # every pattern measures how long its data was under way, within the run too
            assert all(0 < r["max_delay"] <= res["elapsed"] for r in res["sessions"]), (key, res)
            if key[0] == "echo":  # a reply's delay is part of the gap before it
                assert all(r["max_delay"] <= r["max_gap"] for r in res["sessions"]), (key, res)
            assert all(r["exchanges"] > 3 for r in res["sessions"]), (key, res)
        # stoppable by SIGTERM, results printed
        h = lab.start_sessions(lab.addr("t3", 4), "push", count=3, duration=60)
        assert h.wait_ready(5)["connected"] == 3
        t0 = time.monotonic()
        res = h.stop()
        print(f"sessions stopped {time.monotonic() - t0:.3f} s after SIGTERM")
        assert res["stopped"] == "signal" and res["summary"]["survived"] == 3
        assert res["elapsed"] < res["duration"]  # the signal ended them, not their 60 s
        # nginx for benchmarks
        if shutil.which("curl"):
            lab.start_nginx(port=8081)
            out = lab.run("client", ["curl", "-si", "--max-time", "3",
                                     "http://[fd64:2::12]:8081/"]).stdout
            assert "X-Target: t2" in out
        pids = [t.proc.pid for t in lab.procs.items]
        assert pids
    assert_torn_down(lab, pids)


@labtest
def test_teardown_on_exception(assert_torn_down):
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(routers=1, targets=1) as lab:
            pids = [t.proc.pid for t in lab.procs.items]
            raise RuntimeError("boom")
    assert_torn_down(lab, pids)


@pytest.mark.lab(tools=("ip", "keepalived", "dbus-daemon"))
def test_two_routers_keepalived_failover_keeps_routed_session(assert_torn_down):
    with Lab(routers=2, targets=3) as lab:
        lab.start_keepalived(enable_dbus=True)  # waits for lb1 MASTER, lb2 BACKUP
        assert lab.vrrp_state("lb1") == "MASTER" and lab.vrrp_state("lb2") == "BACKUP"
        assert lab.master() == "lb1"
        assert lab.owns("lb1", "10.64.1.254") and lab.owns("lb1", "fd64:2::254")
        res = lab.open_connections("10.64.2.13", count=4)
        assert res["per_target"] == {"t3": 4}
        if shutil.which("busctl"):  # keepalived on the lab's private system bus
            out = lab.run("lb2", ["busctl", "--system", "get-property", "org.keepalived.Vrrp1",
                                  "/org/keepalived/Vrrp1/Instance/back/52/IPv6",
                                  "org.keepalived.Vrrp1.Instance", "State"],
                          env={"DBUS_SYSTEM_BUS_ADDRESS": lab.dbus_address("lb2")}).stdout
            assert out.split()[:2] == ["(us)", "1"], out

        s4 = lab.start_sessions("10.64.2.11", "echo", count=5, duration=4.0)
        s6 = lab.start_sessions("fd64:2::12", "echo", count=5, duration=4.0)
        assert s4.wait_ready(5)["connected"] == 5
        assert s6.wait_ready(5)["connected"] == 5
        time.sleep(0.5)
        mark = keepalived_log_size(lab, "lb2")
        lab.fail_links("lb1")
        took = lab.wait_state("lb2", "MASTER", timeout=3.0)
        t_master = time.monotonic()
        print(f"links down: lb2 MASTER after {took:.3f} s")
        # lb2 took over when lb1's adverts stopped (its master-down timer)
        assert "Receive advertisement timeout" in keepalived_log(lab, "lb2", mark)
        assert lab.vrrp_state("lb1") == "FAULT"
        assert lab.owns("lb2", "10.64.2.254") and lab.owns("lb2", "fd64:1::254")
        for h, t in ((s4, "t1"), (s6, "t2")):
            res = h.result()
            s = res["summary"]
            print(f"sessions to {t}: longest gap {s['max_gap']:.3f} s")
            assert s["survived"] == 5 and s["moved"] == 0, s
            assert s["per_target"] == {t: 5}
            # and their data flowed on through lb2 after it took over
            assert all(r["last_ok_at"] > t_master for r in res["sessions"]), (t_master, res["sessions"])

        lab.restore_links("lb1")  # lb1 preempts back
        lab.wait_state("lb1", "MASTER", timeout=3.0)
        lab.wait_state("lb2", "BACKUP", timeout=3.0)
        res = lab.open_connections("fd64:2::11", count=4)
        assert res["per_target"] == {"t1": 4}

        mark = keepalived_log_size(lab, "lb2")
        lab.stop_keepalived("lb1")
        took = lab.wait_state("lb2", "MASTER", timeout=3.0)
        print(f"keepalived stopped: lb2 MASTER after {took:.3f} s")
        # at once: lb1 released its addresses with a priority-0 advert, lb2 did not wait for its timer
        assert "Backup received priority 0 advertisement" in keepalived_log(lab, "lb2", mark)
        with pytest.raises(LabError):
            lab.wait_state("lb1", "MASTER", timeout=0.2)
        pids = [t.proc.pid for t in lab.procs.items]
    assert_torn_down(lab, pids)


def test_keepalived_conf_wires_the_ready_file():
    """The lab's option wires [vrrp] ready_file as conf/keepalived.conf.example does."""
    conf = render_keepalived_conf(2, ready_file="/lab/lb2/synlb.ready")
    assert 'track_file synlb_ready {\n    file "/lab/lb2/synlb.ready"\n    init_file 1\n}\n' in conf
    assert "    track_file {\n        synlb_ready weight -60\n    }\n}" in conf
    assert conf.index("track_file synlb_ready") < conf.index("vrrp_sync_group G1")
    assert "track_file" not in render_keepalived_conf(2)
