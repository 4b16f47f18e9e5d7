"""The sync plugin: its configuration (pure), and its exchange between two
routers' plugins inside a network namespace (real sockets, real conntrack):
pins travel both ways, and a wrong key, a replayed message or a stranger
is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from synlb import config as config_mod

BASE = """[synlb]
state_dir = {state}
plugins = lb, sync

[service:web]
vips = 10.64.100.1/32
ingress = front
egress = back
protocols = tcp
ports = 80
targets = t1
{service}
[target:t1]
address = 10.64.2.11
"""


def load(tmp_path, sync: str, service: str = ""):
    p = tmp_path / "synlb.ini"
    p.write_text(BASE.format(state=tmp_path / "state", service=service) + sync)
    return config_mod.load(str(p))


def problems(tmp_path, sync: str, service: str = "") -> list[str]:
    with pytest.raises(config_mod.ConfigError) as e:
        load(tmp_path, sync, service)
    return [line.split(":", 1)[1] for line in e.value.lines()]


def test_sync_section_parses(tmp_path):
    cfg = load(tmp_path, "[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.2 10.0.0.3\nkey_file = /etc/synlb/k\n")
    s = cfg.extra["sync"]
    assert str(s["listen"]) == "10.0.0.1" and [str(p) for p in s["peers"]] == ["10.0.0.2", "10.0.0.3"]
    assert (s["port"], s["refresh"], s["timeout"]) == (9714, 5.0, 1.0)


@pytest.mark.parametrize("sync,want", [
    ("[sync]\npeers = 10.0.0.2\nkey_file = /k\n", "sync:listen: required key is missing"),
    ("[sync]\nlisten = 10.0.0.1\nkey_file = /k\n", "sync:peers: required key is missing"),
    ("[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.2\n", "sync:key_file: required key is missing"),
    ("[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.1\nkey_file = /k\n",
     "sync:peers: 10.0.0.1 is this router's own listen address"),
    ("[sync]\nlisten = 10.0.0.1\npeers = fd00::2\nkey_file = /k\n", "sync:peers: every peer must be IPv4, like listen"),
    ("[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.2 10.0.0.2\nkey_file = /k\n", "sync:peers: a peer is listed twice"),
    ("[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.2\nkey_file = k\n", "sync:key_file: 'k' is not an absolute path"),
    ("[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.2\nkey_file = /k\nrefresh = 0\n",
     "sync:refresh: 0 is out of range 0.5..3600 s"),
    ("[sync]\nlisten = nowhere\npeers = 10.0.0.2\nkey_file = /k\n", "sync:listen: 'nowhere' is not an IP address"),
])
def test_sync_section_problems(tmp_path, sync, want):
    assert problems(tmp_path, sync) == [want]


def test_track_syn_needs_route_mode(tmp_path):
    sync = "[sync]\nlisten = 10.0.0.1\npeers = 10.0.0.2\nkey_file = /k\n"
    assert problems(tmp_path, sync, "mode = nat\ntrack_syn = no\n") == [
        "service:web:track_syn: no needs mode = route (DNAT needs the connection tracked from its SYN)"]
    cfg = load(tmp_path, sync, "track_syn = no\n")
    assert cfg.service("web").track_syn is False


# ------------------------------------------------------------------ the exchange, in a netns

DRIVER = textwrap.dedent(r"""
    import json, os, socket, subprocess, sys, time
    from synlb import config as config_mod, pins as P, statedir
    from synlb.plugins import sync as S
    from synlb.plugins import NodeState

    base, key_a, key_b = sys.argv[1], sys.argv[2], sys.argv[3]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for a in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):
        subprocess.run(["ip", "addr", "add", a + "/32", "dev", "lo"], check=True)

    class Host:
        def __init__(self, cfg):
            self.cfg, self.config_path = cfg, ""

    def conf(name, me, peer, key, vip):
        d = os.path.join(base, name)
        os.makedirs(os.path.join(d, "state"), exist_ok=True)
        path = os.path.join(d, "synlb.ini")
        with open(path, "w") as fh:
            fh.write(f'''[synlb]
    state_dir = {d}/state
    plugins = lb, sync
    [service:web]
    vips = {vip}/32
    ingress = lo
    protocols = tcp
    ports = 80
    targets = t1, t2, t3
    table_size = 1009
    [target:t1]
    address = 10.64.2.11
    [target:t2]
    address = 10.64.2.12
    [target:t3]
    address = 10.64.2.13
    [sync]
    listen = {me}
    peers = {peer}
    key_file = {key}
    refresh = 3600
    timeout = 1
    ''')
        return config_mod.load(path)

    # one conntrack table for both: b's service has another VIP, so that the
    # entries made below are a's connections only
    a_cfg = conf("a", "127.0.0.11", "127.0.0.12", key_a, "10.64.100.1")
    b_cfg = conf("b", "127.0.0.12", "127.0.0.11", key_b, "10.64.100.2")
    # connections on t1 that the table (t1, t2, t3) sends elsewhere: misplaced
    table = P.ServiceTable.build(a_cfg, a_cfg.service("web"))
    t1 = a_cfg.targets["t1"].mark
    moved = []
    for port in range(1024, 1400):
        if table.pick(P.key_of(6, "10.64.1.10", "10.64.100.1", port, 80)) != t1:
            moved.append(port)
        if len(moved) == 5:
            break
    for port in moved:
        subprocess.run(["conntrack", "-I", "-p", "tcp", "-s", "10.64.1.10", "-d", "10.64.100.1",
                        "--sport", str(port), "--dport", "80", "--state", "ESTABLISHED",
                        "-t", "600", "--mark", str(t1)], check=True, capture_output=True)
    a, b = S.create(Host(a_cfg)), S.create(Host(b_cfg))
    out = {}
    for p in (a, b):
        p.start()
        p.reconcile(p.host.cfg, NodeState("MASTER", True, "test"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sa, sb = a.status(), b.status()
        if sa["peers"]["127.0.0.12"]["exchanges"] and sb["held_pins"] == len(moved) or \
                sb["peers"]["127.0.0.11"]["error"]:
            break
        time.sleep(0.05)
    out["a"], out["b"] = a.status(), b.status()
    pins_file = statedir.pins(os.path.join(base, "b", "state"))
    out["b_file"] = json.load(open(pins_file)) if os.path.exists(pins_file) else None

    def reply(sock):
        sock.settimeout(2)
        try:
            return sock.recv(10).hex()
        except ConnectionResetError:  # closed with our bytes unread
            return ""
    if open(key_a).read() == open(key_b).read():
        # both push at once and a's reply to b's push overtakes a's own
        # push: b drops that one as older, and a must not call it a failure
        # from here on only the driver exchanges: the rounds that start and
        # reconcile asked for (at once, and AGAIN_AFTER later) are over
        deadline = time.monotonic() + 5
        while (a._due or b._due) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the last of them, on its way (a local exchange takes ms)
        out["a_crossed_before"] = a.status()["peers"]["127.0.0.12"]["crossed"]  # at start, both pushed
        older, seen = a._message_for("127.0.0.12")
        b.exchange_all()
        a._send("127.0.0.12", older, seen)
        out["a_crossed"] = a.status()["peers"]["127.0.0.12"]
        # dropped when nothing of b's came in meanwhile: that one is a failure
        older, _ = a._message_for("127.0.0.12")
        a.exchange_all()
        a._send("127.0.0.12", older, a.status()["peers"]["127.0.0.12"]["exchanges"])
        out["a_dropped"] = a.status()["peers"]["127.0.0.12"]
        a.exchange_all()
        # a replayed message: refused, the pins stay
        msg = P.encode({}, 1, open(key_a, "rb").read().strip())
        with socket.create_connection(("127.0.0.12", 9714), source_address=("127.0.0.11", 0)) as s:
            s.sendall(msg)
            out["replay_reply"] = reply(s)
        # a stranger: closed without a word
        with socket.create_connection(("127.0.0.12", 9714), source_address=("127.0.0.13", 0)) as s:
            s.sendall(msg)
            out["stranger_reply"] = reply(s)
        time.sleep(0.2)
        out["b_after"] = b.status()
        # b's apply of new pins is slow (a big nftables map, a reconcile
        # holding the data plane's lock): its server still answers a's next
        # push within the timeout (1 s)
        import synlb.workers as W
        told = W.reload_pins
        W.reload_pins = lambda state_dir: (time.sleep(1.5), told(state_dir))[1]
        subprocess.run(["conntrack", "-D", "-p", "tcp", "-s", "10.64.1.10", "-d", "10.64.100.1",
                        "--sport", str(moved[0]), "--dport", "80"], check=True, capture_output=True)
        a.exchange_all()
        a.exchange_all()
        out["a_while_b_applies"] = a.status()["peers"]["127.0.0.12"]
        deadline = time.monotonic() + 5
        while b.status()["held_pins"] != len(moved) - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        out["b_slow"] = b.status()
        W.reload_pins = told
        # b's disk is full once: the pins are written at the next exchange,
        # and its threads live on
        import errno
        import synlb.pins_state as PS
        write, failed = PS.write, []
        def full_once(state_dir, pins):
            if not failed:
                failed.append(1)
                raise OSError(errno.ENOSPC, "No space left on device")
            write(state_dir, pins)
        PS.write = full_once
        subprocess.run(["conntrack", "-D", "-p", "tcp", "-s", "10.64.1.10", "-d", "10.64.100.1",
                        "--sport", str(moved[1]), "--dport", "80"], check=True, capture_output=True)
        a.exchange_all()
        deadline = time.monotonic() + 5
        while not failed and time.monotonic() < deadline:
            time.sleep(0.05)
        out["b_full"] = b.status()
        a.exchange_all()
        while b.status()["held_pins"] != len(moved) - 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        out["b_after_full"] = b.status()
        out["a_after_full"] = a.status()["peers"]["127.0.0.12"]
        PS.write = write
        out["b_threads_alive"] = [t.is_alive() for t in b._threads]
    for p in (a, b):
        p.stop()
    out["moved"] = moved
    print(json.dumps(out))
""")


def run_driver(tmp_path, same_key: bool) -> dict:
    ns = f"synlb-sync-{uuid.uuid4().hex[:6]}"
    keys = []
    for name, text in (("a.key", "a" * 32), ("b.key", "a" * 32 if same_key else "b" * 32)):
        path = tmp_path / name
        path.write_text(text + "\n")
        path.chmod(0o600)
        keys.append(str(path))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER, str(tmp_path), *keys],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


@pytest.mark.lab(tools=("ip", "conntrack"))
def test_pins_travel_between_peers_and_strangers_are_refused(tmp_path):
    out = run_driver(tmp_path, same_key=True)
    a, b = out["a"], out["b"]
    assert a["own_pins"] == 5 and b["own_pins"] == 0
    assert b["peers"]["127.0.0.11"]["pins"] == 5 and b["held_pins"] == 5 and a["held_pins"] == 0
    assert b["peers"]["127.0.0.11"]["digest"] == a["own_digest"]
    assert a["peers"]["127.0.0.12"]["error"] is None and b["peers"]["127.0.0.11"]["error"] is None
    ports = sorted(int(k[-8:-4], 16) for k, _ in out["b_file"]["web"])
    assert ports == out["moved"]
    # crossed pushes are not a failure; a message dropped for no reason is
    crossed = out["a_crossed_before"] + 1
    assert (out["a_crossed"]["crossed"], out["a_crossed"]["error"]) == (crossed, None), out["a_crossed"]
    assert out["a_dropped"]["crossed"] == crossed and "closed" in out["a_dropped"]["error"], out["a_dropped"]
    # the replay got no reply and changed nothing; the stranger got nothing either
    assert out["replay_reply"] == "" and out["stranger_reply"] == ""
    assert out["b_after"]["peers"]["127.0.0.11"]["stale"] >= 1
    assert out["b_after"]["held_pins"] == 5
    # a slow apply on b kept neither its server nor a waiting
    assert out["a_while_b_applies"]["error"] is None, out["a_while_b_applies"]
    assert out["b_slow"]["held_pins"] == 4, out["b_slow"]
    # a full disk delays the pins to the next exchange, and stops nothing
    assert out["b_full"]["held_pins"] == 4 and out["b_after_full"]["held_pins"] == 3, out
    assert out["a_after_full"]["error"] is None, out["a_after_full"]
    assert out["b_threads_alive"] == [True, True, True]


@pytest.mark.lab(tools=("ip", "conntrack"))
def test_a_peer_with_another_key_is_refused(tmp_path):
    out = run_driver(tmp_path, same_key=False)
    assert out["b"]["held_pins"] == 0 and out["a"]["held_pins"] == 0
    for me, peer in (("a", "127.0.0.12"), ("b", "127.0.0.11")):
        assert "authentication" in out[me]["peers"][peer]["refused"], out[me]
