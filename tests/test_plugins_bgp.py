"""The bgp plugin: its [bgp] options (synlb check), the pure parts (what to
announce, reading bgpd's running config, the vtysh commands), and the
plugin against a stand-in vtysh that keeps bgpd's `network` lines in a file."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from synlb import config, dataplane
from synlb.plugins import NodeState
from synlb.plugins import bgp as bgp_mod

SYNLB = os.path.join(os.path.dirname(sys.executable), "synlb")

BASE = """[synlb]
state_dir = {state}
plugins = lb, health, bgp
{vrrp}
[service:web]
vips = 10.0.0.1/32, fd00::1/128
ingress = eth0
protocols = tcp
targets = a, b

[service:api]
vips = 10.0.0.2/32
ingress = eth0
protocols = tcp
queue = 1
targets = b

[target:a]
address = 10.1.0.1, fd01::1

[target:b]
address = 10.1.0.2, fd01::2
"""


def write(tmp_path, bgp: str, vrrp: str = "") -> str:
    path = tmp_path / "synlb.ini"
    path.write_text(BASE.format(state=tmp_path / "state", vrrp=vrrp) + bgp)
    return str(path)


def check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYNLB, "-c", path, "check"], capture_output=True, text=True, check=False)


# ---------------------------------------------------------------- options

def test_check_validates_the_bgp_section(tmp_path):
    path = write(tmp_path, "[bgp]\nasn = 65100\nvty_socket = /run/frr\ndrain = 250ms\n")
    r = check(path)
    assert r.returncode == 0, r.stderr
    opts = config.load(path).extra["bgp"]
    assert opts == {"asn": 65100, "vtysh": "/usr/bin/vtysh", "vty_socket": "/run/frr", "drain": 0.25,
                    "refresh": 5.0, "timeout": 2.0}

    r = check(write(tmp_path, "[bgp]\nvtysh = vtysh\ndrain = 31\nrefresh = 0\nasn = 0\ncolour = red\n"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    for key, why in (("asn", "out of range 1..4294967295"), ("vtysh", "not an absolute path"),
                     ("drain", "out of range 0..30 s"), ("refresh", "out of range"), ("colour", "unknown key")):
        assert any(f":bgp:{key}: " in ln and why in ln for ln in lines), (key, lines)

    r = check(write(tmp_path, "[bgp]\ndrain = 1\n"))
    assert r.returncode == 1 and ":bgp:asn: required key is missing" in r.stderr

    # the section belongs to the plugin: without it listed, it is unknown
    path = tmp_path / "other.ini"
    path.write_text(BASE.format(state=tmp_path / "state", vrrp="").replace("lb, health, bgp", "lb")
                    + "[bgp]\nasn = 1\n")
    r = check(str(path))
    assert r.returncode == 1 and ":bgp:-: unknown section" in r.stderr


# ---------------------------------------------------------------- pure parts

RUNNING = """Building configuration...

Current configuration:
!
frr version 8.4.4
router bgp 65100
 bgp router-id 10.64.1.1
 no bgp network import-check
 neighbor 10.64.1.250 remote-as 65000
 !
 address-family ipv4 unicast
  network 10.0.0.1/32
  network 192.0.2.0/24 route-map ADMIN
  neighbor 10.64.1.250 activate
 exit-address-family
 !
 address-family ipv6 unicast
  network fd00::1/128
 exit-address-family
exit
!
router bgp 65100 vrf blue
 address-family ipv4 unicast
  network 10.0.0.2/32
 exit-address-family
exit
!
end
"""


def nets(*texts):
    return {ipaddress.ip_network(t) for t in texts}


def test_parse_running_reads_the_default_vrf_router_only():
    assert bgp_mod.parse_running(RUNNING, 65100) == nets("10.0.0.1/32", "192.0.2.0/24", "fd00::1/128")
    assert bgp_mod.parse_running(RUNNING, 65001) is None
    assert bgp_mod.parse_running("router bgp 65100\nexit\n", 65100) == set()


def test_commands_touch_only_the_prefixes_given():
    cmds = bgp_mod.commands(65100, nets("10.0.0.1/32", "fd00::1/128"), nets("10.0.0.2/32"))
    assert cmds == ["configure terminal", "router bgp 65100",
                    "address-family ipv4 unicast", "network 10.0.0.1/32", "no network 10.0.0.2/32",
                    "exit-address-family",
                    "address-family ipv6 unicast", "network fd00::1/128", "exit-address-family", "end"]
    assert bgp_mod.commands(1, set(), set()) == ["configure terminal", "router bgp 1", "end"]


def test_wanted_follows_node_readiness_and_health(tmp_path):
    cfg = config.load(write(tmp_path, "[bgp]\nasn = 65100\n"))
    alone = NodeState("STANDALONE", True, "t")
    ready = {"web": None, "api": None}
    assert bgp_mod.wanted(cfg, alone, ready, {})[0] == nets("10.0.0.1/32", "fd00::1/128", "10.0.0.2/32")
    # api's only target down: its VIP goes, web (a still up) stays
    want, why = bgp_mod.wanted(cfg, alone, ready, {"api": {"b"}, "web": {"b"}})
    assert want == nets("10.0.0.1/32", "fd00::1/128") and why == {"api": "no healthy target"}
    want, why = bgp_mod.wanted(cfg, alone, {"web": "no worker on queue 0", "api": None}, {})
    assert want == nets("10.0.0.2/32") and why == {"web": "no worker on queue 0"}
    want, why = bgp_mod.wanted(cfg, NodeState("STANDALONE", False, "host stop"), ready, {})
    assert want == set() and set(why) == {"web", "api"}

    vcfg = config.load(write(tmp_path, "[bgp]\nasn = 65100\n", vrrp="[vrrp]\ninstance = VI_1\n"))
    assert bgp_mod.wanted(vcfg, NodeState("MASTER", True, "t"), ready, {})[0]
    want, why = bgp_mod.wanted(vcfg, NodeState("BACKUP", True, "t"), ready, {})
    assert want == set() and "only the master announces" in why["web"]


def test_peers_summary():
    data = {"ipv4Unicast": {"peers": {"10.64.1.250": {"state": "Established"}}},
            "ipv6Unicast": {"peers": {"fd64:1::250": {"state": "Active"}}}}
    assert bgp_mod.peers_summary(data) == {"ipv4Unicast": {"10.64.1.250": "Established"},
                                           "ipv6Unicast": {"fd64:1::250": "Active"}}


# ---------------------------------------------------------------- against a stand-in vtysh

FAKE_VTYSH = r'''#!/usr/bin/python3
"""vtysh stand-in: `router bgp ASN` and its `network` lines in $STATE (JSON)."""
import json, os, sys
state_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frr-state.json")
with open(state_path) as fh:
    st = json.load(fh)
args = sys.argv[1:]
if "--vty_socket" in args:
    i = args.index("--vty_socket")
    st.setdefault("sockets", []).append(args[i + 1])
    del args[i:i + 2]
cmds = [args[i + 1] for i in range(len(args)) if args[i] == "-c"]
st.setdefault("calls", []).append(cmds)
if st.get("down"):
    print("Exiting: failed to connect to any daemons.")
    sys.exit(1)
out, rc, af = [], 0, None
for c in cmds:
    if c == "show running-config bgpd":
        out.append("Building configuration...\n!")
        if st.get("asn"):
            out.append(f"router bgp {st['asn']}")
            for fam in ("ipv4", "ipv6"):
                out.append(f" address-family {fam} unicast")
                out += [f"  network {n}" for n in st["nets"] if (":" in n) == (fam == "ipv6")]
                out.append(" exit-address-family")
            out.append("exit")
        out.append("end")
    elif c == "show bgp summary json":
        out.append(json.dumps({"ipv4Unicast": {"peers": {"10.9.9.9": {"state": "Established"}}}}))
    elif c.startswith("router bgp "):
        if int(c.split()[2]) != st.get("asn"):
            out.append("BGP is already running")
            rc = 1
            break
    elif c.startswith("address-family "):
        af = c.split()[1]
    elif c.startswith("network "):
        n = c.split()[1]
        if n not in st["nets"]:
            st["nets"].append(n)
    elif c.startswith("no network "):
        n = c.split()[2]
        if n in st["nets"]:
            st["nets"].remove(n)
        else:
            out.append("% Can't find static route specified")
            rc = 1
with open(state_path + ".tmp", "w") as fh:
    json.dump(st, fh)
os.replace(state_path + ".tmp", state_path)
print("\n".join(out))
sys.exit(rc)
'''


class FakeHost:
    def __init__(self, path: str, node: NodeState):
        self.config_path = path
        self.cfg = config.load(path)
        self.node = node
        self.submitted: list = []

    def submit(self, kind, data=None, *, reason=None, wait=False, timeout=30.0):
        self.submitted.append((kind, reason))


@pytest.fixture
def frr_state(tmp_path):
    d = tmp_path / "frr"
    d.mkdir(mode=0o755)
    exe = d / "vtysh"
    exe.write_text(FAKE_VTYSH)
    exe.chmod(0o755)
    state = d / "frr-state.json"
    state.write_text(json.dumps({"asn": 65100, "nets": ["192.0.2.0/24"]}))

    def read() -> dict:
        return json.loads(state.read_text())

    def set_(**kw) -> None:
        st = read()
        st.update(kw)
        state.write_text(json.dumps(st))
    return str(exe), read, set_


def make_ready(cfg) -> None:
    os.makedirs(cfg.globals.state_dir, exist_ok=True)
    with open(os.path.join(cfg.globals.state_dir, dataplane.APPLIED), "w") as fh:
        json.dump({"digest": cfg.digest(), "route_protocol": 229, "reason": "test"}, fh)


def wait_for(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_plugin_announces_when_ready_and_withdraws_within_a_second(tmp_path, frr_state, monkeypatch):
    exe, read, set_ = frr_state
    path = write(tmp_path, textwrap.dedent(f"""\
        [bgp]
        asn = 65100
        vtysh = {exe}
        vty_socket = /run/lab-frr
        drain = 0.3
        refresh = 0.5
        """))
    from synlb import workers
    monkeypatch.setattr(workers, "bound_queues", lambda: {0: {}, 1: {}})
    host = FakeHost(path, NodeState("STANDALONE", True, "start"))
    plugin = bgp_mod.create(host)
    plugin.start()
    try:
        # no data plane yet: nothing announced, the admin's own line untouched
        assert read()["nets"] == ["192.0.2.0/24"]
        assert read()["sockets"][0] == "/run/lab-frr"
        assert "data plane not installed" in plugin.status()["summary"]

        make_ready(host.cfg)
        changes = plugin.reconcile(host.cfg, host.node)
        assert sorted(changes) == ["announced 10.0.0.1/32", "announced 10.0.0.2/32", "announced fd00::1/128"]
        assert sorted(read()["nets"]) == ["10.0.0.1/32", "10.0.0.2/32", "192.0.2.0/24", "fd00::1/128"]
        assert plugin.reconcile(host.cfg, host.node) == []  # idempotent
        st = plugin.status()
        assert st["announced"] == ["10.0.0.1/32", "10.0.0.2/32", "fd00::1/128"] and not st["withdrawn"]

        # b fails its checks: api has no healthy target: the watch withdraws its VIP
        from synlb import health_state
        t0 = time.monotonic()
        health_state.write_down(host.cfg.globals.state_dir, {"api": ["b"], "web": ["b"]})
        took = wait_for(lambda: "10.0.0.2/32" not in read()["nets"]) - t0
        assert took < 1.0, took
        assert sorted(read()["nets"]) == ["10.0.0.1/32", "192.0.2.0/24", "fd00::1/128"]
        wait_for(lambda: plugin.status()["withdrawn"] == {"api": "no healthy target"})
        health_state.clear(host.cfg.globals.state_dir)
        wait_for(lambda: "10.0.0.2/32" in read()["nets"])

        # bgpd restarted without our lines: told again within refresh
        set_(nets=["192.0.2.0/24"])
        wait_for(lambda: len(read()["nets"]) == 4, timeout=2.0)

        # FRR unreachable: shown, and recovered from
        set_(down=True)
        wait_for(lambda: (plugin.status()["error"] or "").startswith("vtysh exit 1"))
        assert "FRR FAILING" in plugin.status()["summary"]
        set_(down=False)
        wait_for(lambda: plugin.status()["error"] is None)

        # host stop: prepare (node inactive) withdraws everything, then drains
        stopping = NodeState("STANDALONE", False, "host stop")
        host.node = stopping
        t0 = time.monotonic()
        changes = plugin.prepare(host.cfg, stopping)
        took = time.monotonic() - t0
        assert read()["nets"] == ["192.0.2.0/24"]
        assert 0.25 <= took < 1.5, took  # the drain (0.3 s), counted from the withdrawal
        assert plugin.teardown() == []
        ev = plugin.status()["events"]
        assert [e["action"] for e in ev[-3:]] == ["withdraw"] * 3
    finally:
        plugin.stop()
    assert read()["nets"] == ["192.0.2.0/24"]


def test_plugin_never_creates_router_bgp(tmp_path, frr_state, monkeypatch):
    exe, read, set_ = frr_state
    set_(asn=None)
    path = write(tmp_path, f"[bgp]\nasn = 65100\nvtysh = {exe}\n")
    from synlb import workers
    monkeypatch.setattr(workers, "bound_queues", lambda: {0: {}, 1: {}})
    host = FakeHost(path, NodeState("STANDALONE", True, "start"))
    make_ready(host.cfg)
    plugin = bgp_mod.create(host)
    plugin.start()
    try:
        with pytest.raises(bgp_mod.VtyshError, match="no `router bgp 65100`"):
            plugin.reconcile(host.cfg, host.node)
        assert all(not any(c.startswith("router bgp") for c in call) for call in read()["calls"])
        assert read()["nets"] == ["192.0.2.0/24"]
    finally:
        plugin.stop()


def test_plugin_refuses_an_untrusted_vtysh(tmp_path, frr_state):
    exe, _, _ = frr_state
    os.chmod(exe, 0o777)
    host = FakeHost(write(tmp_path, f"[bgp]\nasn = 65100\nvtysh = {exe}\n"),
                    NodeState("STANDALONE", True, "start"))
    with pytest.raises(bgp_mod.PluginError, match="writable by"):
        bgp_mod.create(host).start()


def test_prepare_withdraws_a_removed_service_before_the_data_plane_goes(tmp_path, frr_state, monkeypatch):
    exe, read, _ = frr_state
    path = write(tmp_path, f"[bgp]\nasn = 65100\nvtysh = {exe}\ndrain = 0.2\n")
    from synlb import workers
    monkeypatch.setattr(workers, "bound_queues", lambda: {0: {}, 1: {}})
    host = FakeHost(path, NodeState("STANDALONE", True, "start"))
    make_ready(host.cfg)
    plugin = bgp_mod.create(host)
    plugin.start()
    try:
        plugin.reconcile(host.cfg, host.node)
        assert "10.0.0.2/32" in read()["nets"]
        text = open(path).read().replace("[service:api]\nvips = 10.0.0.2/32\ningress = eth0\nprotocols = tcp\n"
                                         "queue = 1\ntargets = b\n", "")
        with open(path, "w") as fh:
            fh.write(text)
        new = host.cfg = config.load(path)  # what the host does on SIGHUP, before the pass
        t0 = time.monotonic()
        changes = plugin.prepare(new, host.node)
        took = time.monotonic() - t0
        assert changes and "withdrawn 10.0.0.2/32" in changes[0]
        assert "10.0.0.2/32" not in read()["nets"] and "10.0.0.1/32" in read()["nets"]
        assert took >= 0.15  # drained: its chains go in the reconcile that follows
        # the data plane is not at the new config yet: web stays announced meanwhile
        time.sleep(0.5)
        assert "10.0.0.1/32" in read()["nets"] and "fd00::1/128" in read()["nets"]
    finally:
        plugin.stop()


def test_plugin_refuses_nat_without_vrrp(tmp_path, frr_state):
    exe, _, _ = frr_state
    path = write(tmp_path, f"[bgp]\nasn = 65100\nvtysh = {exe}\n")
    text = open(path).read().replace("targets = b\n", "mode = nat\ntargets = b\n", 1)
    with open(path, "w") as fh:
        fh.write(text)
    host = FakeHost(path, NodeState("STANDALONE", True, "start"))
    with pytest.raises(bgp_mod.PluginError, match="service api: mode = nat needs the replies"):
        bgp_mod.create(host).start()
