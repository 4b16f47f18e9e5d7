"""The metrics plugin: the listen option, and the exposition built at scrape
time from status.collect and the host (the HTTP side runs in the lab test)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from synlb import config, status
from synlb.plugins import NodeState
from synlb.plugins import metrics as M
from synlb.schema import OptionError


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9712", ("127.0.0.1", 9712)),
    (" 0.0.0.0:80 ", ("0.0.0.0", 80)),
    ("[::1]:9712", ("::1", 9712)),
    ("[::]:1", ("::", 1)),
    ("[fd64:1::1]:65535", ("fd64:1::1", 65535)),
])
def test_listen_parses(text, want):
    assert M.parse_listen(text) == want


@pytest.mark.parametrize("text", ["9712", "::1:9712", "[::1]", "[127.0.0.1]:80", "localhost:80",
                                  "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4:x", "[::1]:", ""])
def test_listen_refuses(text):
    with pytest.raises(OptionError):
        M.parse_listen(text)


BASE = """
[synlb]
state_dir = {d}/state
plugins = lb, health, metrics
{metrics}
[service:web]
vips = 10.0.0.1/32, fd00::1/128
ingress = eth0
protocols = tcp
queue = 0-1
targets = a, b
[target:a]
address = 10.1.0.1, fd01::1
check = tcp
check_port = 80
[target:b]
address = 10.1.0.2, fd01::2
"""


def test_config_default_and_errors(tmp_path):
    p = tmp_path / "synlb.ini"
    p.write_text(BASE.format(d=tmp_path, metrics=""))
    cfg = config.load(str(p))
    assert config.load_section(cfg, "metrics", M.SCHEMA) == {"listen": "127.0.0.1:9712"}  # loopback by default
    p.write_text(BASE.format(d=tmp_path, metrics="[metrics]\nlisten = [::1]:9100\n"))
    assert config.load_section(config.load(str(p)), "metrics", M.SCHEMA) == {"listen": "[::1]:9100"}
    p.write_text(BASE.format(d=tmp_path, metrics="[metrics]\nlisten = everywhere\nport = 1\n"))
    with pytest.raises(config.ConfigError) as e:
        config.load(str(p))
    lines = e.value.lines()
    assert f"{p}:metrics:listen: 'everywhere' is not ADDRESS:PORT (IPv6: [ADDRESS]:PORT)" in lines
    assert any(ln.startswith(f"{p}:metrics:port: unknown key") for ln in lines)


class Stub:
    def __init__(self, name, st):
        self.name, self._st = name, st

    def status(self):
        return self._st


class HostView:
    """What the metrics plugin reads of synlb.host.Host (tests/test_fakes.py
    checks that a real Host has these attributes)."""
    ATTRIBUTES = ("cfg", "node", "transitions", "plugins")

    def __init__(self, cfg):
        self.cfg = cfg
        self.node = NodeState("MASTER", True, "vrrp")
        self.transitions = 7
        self.failing = None  # as Host: the failing reconcile, if any
        self.plugins = [Stub("lb", {"worker_restarts": {1: 2}}),
                        Stub("health", {"targets": {"a": {"state": "down"}, "b": {"state": "up"}}})]


def fake_collect(cfg):
    def q(n, pid):
        return {"queue": n, "bypass": False, "listening": True, "waiting": 0, "queue_dropped": 3 * n,
                "user_dropped": 5 * n, "worker": {"pid": pid, "cpu_s": 1.5, "rss_mb": 30.0, "packets": 100 + n}}
    import os
    return {"time": 0, "active": True, "applied": {}, "sysctl": {},
            "chains": [{"family": 4, "service": "web", "chain": "synlb-VIP-web", "kept_in_kernel_pkts": 1000,
                        "kept_in_kernel_bytes": 0, "queued_pkts": 40, "queued_bytes": 0, "saved_marks": 40},
                       {"family": 6, "service": "web", "chain": "synlb-VIP-web", "kept_in_kernel_pkts": 10,
                        "kept_in_kernel_bytes": 0, "queued_pkts": 2, "queued_bytes": 0, "saved_marks": 2}],
            "services": [{"name": "web", "mode": "route", "vips": [], "queues": [q(0, os.getpid()), q(1, 1 << 30)],
                          "targets": [{"name": "a", "healthy": True, "connections": 12},
                                      {"name": "b", "healthy": True, "connections": 30}]}]}


def test_exposition(tmp_path, fake):
    p = tmp_path / "synlb.ini"
    p.write_text(BASE.format(d=tmp_path, metrics=""))
    fake(status, "collect", fake_collect)
    plugin = M.create(HostView(config.load(str(p))))  # no server until start()
    text = generate_latest(plugin.registry).decode()
    lines = set(text.splitlines())
    for want in ('synlb_vrrp_state{state="MASTER"} 1.0', 'synlb_vrrp_state{state="BACKUP"} 0.0',
                 "synlb_active 1.0", "synlb_transitions_total 7.0", "synlb_scrape_ok 1.0",
                 "synlb_reconcile_failing 0.0",
                 'synlb_target_healthy{service="web",target="a"} 0.0',  # the health plugin's view wins
                 'synlb_target_healthy{service="web",target="b"} 1.0',
                 'synlb_target_connections{service="web",target="b"} 30.0',
                 'synlb_packets_queued_total{family="4",service="web"} 40.0',
                 'synlb_packets_kernel_total{family="4",service="web"} 1000.0',
                 'synlb_packets_queued_total{family="6",service="web"} 2.0',
                 'synlb_queue_dropped_total{queue="1"} 3.0', 'synlb_user_dropped_total{queue="1"} 5.0',
                 'synlb_worker_restarts_total{queue="0"} 0.0', 'synlb_worker_restarts_total{queue="1"} 2.0',
                 'synlb_worker_packets_total{queue="1"} 101.0', 'synlb_queue_listening{queue="0"} 1.0'):
        assert want in lines, want
    # exact figures from psutil for a live pid (this process), none for a dead one
    assert any(ln.startswith('synlb_worker_rss_bytes{queue="0"} ') for ln in lines)
    assert not any(ln.startswith('synlb_worker_rss_bytes{queue="1"} ') for ln in lines)
    assert "# TYPE synlb_worker_cpu_seconds_total counter" in lines


def test_a_failing_collect_still_answers(tmp_path, fake):
    p = tmp_path / "synlb.ini"
    p.write_text(BASE.format(d=tmp_path, metrics=""))

    def broken(cfg):
        raise RuntimeError("iptables gone")
    fake(status, "collect", broken)
    plugin = M.create(HostView(config.load(str(p))))
    lines = generate_latest(plugin.registry).decode().splitlines()
    assert "synlb_scrape_ok 0.0" in lines and 'synlb_vrrp_state{state="MASTER"} 1.0' in lines


def test_nftables_engine_counters(tmp_path, fake):
    p = tmp_path / "synlb.ini"
    p.write_text(BASE.format(d=tmp_path, metrics=""))

    def nft_collect(cfg):
        st = fake_collect(cfg)
        st["chains"] = [{"family": 4, "service": "web", "chain": "inet synlb svc4_web", "engine": "nftables",
                         "kept_in_kernel_pkts": 900, "kept_in_kernel_bytes": 0, "queued_pkts": 0,
                         "queued_bytes": 0, "hashed_pkts": 70, "pinned_pkts": 4, "no_target_pkts": 0,
                         "saved_marks": 74}]
        st["services"][0].update(engine="nftables", queues=[])
        st["services"][0]["targets"][0]["kernel_picks"] = 33
        return st
    fake(status, "collect", nft_collect)
    lines = set(generate_latest(M.create(HostView(config.load(str(p)))).registry).decode().splitlines())
    for want in ('synlb_packets_kernel_total{family="4",service="web"} 900.0',
                 'synlb_packets_hashed_kernel_total{family="4",service="web"} 70.0',
                 'synlb_packets_pinned_kernel_total{family="4",service="web"} 4.0',
                 'synlb_target_kernel_picks_total{service="web",target="a"} 33.0'):
        assert want in lines, want
    assert not any(ln.startswith('synlb_target_kernel_picks_total{service="web",target="b"}') for ln in lines)
