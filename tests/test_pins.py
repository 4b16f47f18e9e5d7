"""Pins (pure): which running connections a table change would move, the
peer message, and the worker following pins for picked-up connections
only."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synlb import config as config_mod
from synlb import pins as P
from synlb import pins_state
from synlb.conntrack import Entry, parse
from synlb.packet import flow_key, is_flow_key, key_of, opens_connection
from synlb.worker import MarkTable, Worker

VIP4, VIP6 = "10.64.100.1", "fd64:100::1"
SYN, ACK, PSH = 0x02, 0x10, 0x08
KEY = b"k" * 32


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 64240, 0, 0)


def packet(client: str, server: str, proto: int, sport: int, dport: int, flags: int = SYN,
           v6_hop_by_hop: bool = False) -> bytes:
    l4 = tcp(sport, dport, flags) if proto == 6 else struct.pack("!HHHH", sport, dport, 8, 0)
    if ":" not in client:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                           socket.inet_aton(client), socket.inet_aton(server)) + l4
    ext = b""
    nh = proto
    if v6_hop_by_hop:
        ext, nh = bytes([proto, 0]) + bytes(6), 0
    return struct.pack("!IHBB16s16s", 0x60000000, len(ext) + len(l4), nh, 64,
                       socket.inet_pton(socket.AF_INET6, client),
                       socket.inet_pton(socket.AF_INET6, server)) + ext + l4


def write_config(tmp_path, targets=("t1", "t2"), extra_service: str = "") -> str:
    text = f"""[synlb]
state_dir = {tmp_path / 'state'}

[service:web]
vips = {VIP4}/32, {VIP6}/128
ingress = front
egress = back
protocols = tcp, udp
ports = 80
targets = {', '.join(targets)}
table_size = 1009
{extra_service}
"""
    for k in (1, 2, 3):
        text += f"\n[target:t{k}]\naddress = 10.64.2.1{k}, fd64:2::1{k}\n"
    path = tmp_path / "synlb.ini"
    path.write_text(text)
    (tmp_path / "state").mkdir(exist_ok=True)
    return str(path)


# ------------------------------------------------------------------ flow keys

v4_addr = st.ip_addresses(v=4).map(str)
v6_addr = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(v4_addr, v4_addr), st.tuples(v6_addr, v6_addr)),
       st.sampled_from([6, 17]), port, port, st.booleans())
def test_key_of_equals_the_packets_flow_key(addrs, proto, sport, dport, hop):
    client, server = addrs
    key = key_of(proto, client, server, sport, dport)
    assert key == flow_key(packet(client, server, proto, sport, dport, v6_hop_by_hop=hop))
    assert is_flow_key(key)


@pytest.mark.parametrize("flags,opens", [(SYN, True), (SYN | ACK, False), (ACK, False),
                                         (ACK | PSH, False), (SYN | 0x01, True)])
@pytest.mark.parametrize("client,server", [("10.64.1.10", VIP4), ("fd64:1::10", VIP6)])
def test_opens_connection_is_a_syn_without_ack(flags, opens, client, server):
    assert opens_connection(packet(client, server, 6, 4000, 80, flags)) is opens
    assert opens_connection(packet(client, server, 6, 4000, 80, flags, v6_hop_by_hop=True)) is opens


def test_opens_connection_never_for_udp_fragments_or_garbage():
    assert not opens_connection(packet("10.64.1.10", VIP4, 17, 4000, 80))
    syn = packet("10.64.1.10", VIP4, 6, 4000, 80, SYN)
    frag = syn[:6] + b"\x20\x00" + syn[8:]  # MF set
    assert not opens_connection(frag)
    for cut in range(len(syn)):
        opens_connection(syn[:cut])  # never raises
    assert not opens_connection(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_opens_connection_never_raises(data):
    assert opens_connection(data) in (True, False)


# ------------------------------------------------------------------ conntrack text

def test_conntrack_lines_parse():
    text = """tcp      6 431999 ESTABLISHED src=10.64.1.10 dst=10.64.100.1 sport=43210 dport=80 src=10.64.100.1 dst=10.64.1.10 sport=80 dport=43210 [ASSURED] mark=98631234 use=1
udp      17 29 src=fd64:1::10 dst=fd64:100::1 sport=5000 dport=80 [UNREPLIED] src=fd64:100::1 dst=fd64:1::10 sport=80 dport=5000 mark=7 use=1
icmp     1 29 src=10.64.1.10 dst=10.64.100.1 type=8 code=0 id=1 src=10.64.100.1 dst=10.64.1.10 type=0 code=0 id=1 mark=3 use=1
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.
"""
    assert parse(text) == [Entry(6, "10.64.1.10", "10.64.100.1", 43210, 80, 98631234),
                           Entry(17, "fd64:1::10", "fd64:100::1", 5000, 80, 7),
                           Entry(1, "10.64.1.10", "10.64.100.1", None, None, 3)]


# ------------------------------------------------------------------ misplaced

def flows(n: int, family: int = 4):
    client = ipaddress.ip_address("10.64.1.10" if family == 4 else "fd64:1::10")
    vip = VIP4 if family == 4 else VIP6
    return [(str(client + i // 1000), vip, 1024 + i) for i in range(n)]


def test_misplaced_is_exactly_what_a_target_join_moves(tmp_path):
    before = config_mod.load(write_config(tmp_path, ("t1", "t2")))
    after = config_mod.load(write_config(tmp_path, ("t1", "t2", "t3")))
    old = {s.name: P.ServiceTable.build(before, s) for s in before.services}["web"]
    new = {s.name: P.ServiceTable.build(after, s) for s in after.services}["web"]
    entries, moved = [], set()
    for fam in (4, 6):
        for client, vip, sport in flows(600, fam):
            key = key_of(6, client, vip, sport, 80)
            mark = old.pick(key)  # the connection started under the old table
            entries.append(Entry(6, client, vip, sport, 80, mark))
            if new.pick(key) != mark:
                moved.add((key, mark))
    got = P.misplaced(after, entries)
    assert set(got["web"].items()) == moved
    # about a third of the flows move to the new target; none of them is t3's
    assert 0.25 < len(moved) / len(entries) < 0.42
    assert after.targets["t3"].mark not in set(got["web"].values())
    # nothing moves while the table is the one the connections started with
    assert P.misplaced(before, entries) == {}


def test_misplaced_reads_reply_side_entries_and_ignores_others(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, ("t1", "t2", "t3")))
    t1 = cfg.targets["t1"].mark
    table = P.ServiceTable.build(cfg, cfg.service("web"))
    # flows the current table sends elsewhere than t1
    wrong = [(c, v, s) for c, v, s in flows(60) if table.pick(key_of(6, c, v, s, 80)) != t1][:5]
    entries = []
    for client, vip, sport in wrong:
        entries.append(Entry(6, vip, client, 80, sport, t1))  # created from the target's side
    entries += [Entry(6, "10.64.1.10", "10.64.200.9", 1000, 80, t1),  # not a VIP
                Entry(6, "10.64.1.10", VIP4, 1001, 443, t1),  # not the service's port
                Entry(6, "10.64.1.10", VIP4, 1002, 80, 0x77),  # not a mark of the service
                Entry(132, "10.64.1.10", VIP4, 1003, 80, t1),  # not a protocol of the service
                Entry(6, "10.64.1.10", VIP4, 1004, 80, 0)]
    got = P.misplaced(cfg, entries)
    assert got == {"web": {key_of(6, c, v, s, 80): t1 for c, v, s in wrong}}


def test_misplaced_is_against_the_configured_table_whatever_is_down(tmp_path):
    """A health view never makes a running connection misplaced; what a
    router opened while t3 was down, off the configured table's pick, is."""
    cfg = config_mod.load(write_config(tmp_path, ("t1", "t2", "t3")))
    svc = cfg.service("web")
    t3 = cfg.targets["t3"].mark
    configured = P.ServiceTable.build(cfg, svc)
    without_t3 = P.ServiceTable.build(cfg, svc, {"t3"})
    keys = [(c, v, s) for c, v, s in flows(300)]
    on_t3 = [Entry(6, c, v, s, 80, t3) for c, v, s in keys if configured.pick(key_of(6, c, v, s, 80)) == t3]
    assert on_t3 and P.misplaced(cfg, on_t3) == {}
    opened = [Entry(6, c, v, s, 80, without_t3.pick(key_of(6, c, v, s, 80))) for c, v, s in keys]
    got = P.misplaced(cfg, opened)["web"]
    # those the configured table gives t3, and the few Maglev moved between t1 and t2 as t3 left
    assert got == {k: e.mark for e in opened
                   if configured.pick(k := key_of(e.proto, e.src, e.dst, e.sport, e.dport)) != e.mark}
    assert 0.2 < len(got) / len(opened) < 0.45


# ------------------------------------------------------------------ messages

pins_strategy = st.dictionaries(
    st.sampled_from(["web", "dns", "x_1"]),
    st.dictionaries(st.one_of(
        st.tuples(v4_addr, v4_addr, port, port).map(lambda t: key_of(6, *t)),
        st.tuples(v6_addr, v6_addr, port, port).map(lambda t: key_of(17, *t))),
        st.integers(1, 0xFFFFFFFF), max_size=20), max_size=3)


@settings(max_examples=200, deadline=None)
@given(pins_strategy, st.integers(0, 2**63))
def test_messages_round_trip(pins, seq):
    msg = P.encode(pins, seq, KEY)
    got_seq, got = P.decode(msg, KEY)
    assert got_seq == seq
    assert {s: k for s, k in got.items() if k} == {s: k for s, k in pins.items() if k}


def test_messages_must_be_authentic_and_whole():
    pins = {"web": {key_of(6, "10.64.1.10", VIP4, 4000, 80): 0x5E10001}}
    msg = P.encode(pins, 7, KEY)
    with pytest.raises(P.PinsError, match="authentication"):
        P.decode(msg, b"another key of 32 bytes........")
    tampered = bytearray(msg)
    tampered[20] ^= 1
    with pytest.raises(P.PinsError):
        P.decode(bytes(tampered), KEY)
    with pytest.raises(P.PinsError, match="length"):
        P.decode(msg[:-1], KEY)
    with pytest.raises(P.PinsError, match="not a synlb"):
        P.decode(b"HTTP" + msg[4:], KEY)
    with pytest.raises(P.PinsError, match="over"):
        P.body_length(P.MAGIC + (P.MAX_BODY + 1).to_bytes(4, "big"))


@pytest.mark.parametrize("bad", [
    [], {"web": {}}, {"web": [["zz", 1]]}, {"web": [["0a0b", 1]]},
    {"web": [[key_of(6, "10.0.0.1", VIP4, 1, 80).hex(), True]]},
    {"web": [[key_of(6, "10.0.0.1", VIP4, 1, 80).hex(), 0]]},
    {"web": [[key_of(6, "10.0.0.1", VIP4, 1, 80).hex(), 2**32]]},
    {"web": [[key_of(6, "10.0.0.1", VIP4, 1, 80).hex()]]},
    {1: []},
])
def test_pin_documents_of_the_wrong_shape_are_refused(bad):
    with pytest.raises(P.PinsError):
        P.from_json(bad)


def test_pins_file_round_trip_and_bad_file(tmp_path):
    pins = {"web": {key_of(6, "10.64.1.10", VIP4, 4000, 80): 5}}
    pins_state.write(str(tmp_path), pins)
    assert pins_state.load(str(tmp_path)) == pins
    assert [p.name for p in (tmp_path / "workers").iterdir()] == ["pins.json"]  # no temp file left
    (tmp_path / "workers" / "pins.json").write_text('{"web": [["00", 1]]}')
    with pytest.raises(P.PinsError):
        pins_state.load(str(tmp_path))
    pins_state.clear(str(tmp_path))
    assert pins_state.load(str(tmp_path)) == {}


# ------------------------------------------------------------------ the worker

class Pkt:
    def __init__(self, payload: bytes):
        self.payload, self.mark, self.verdict = payload, 0, None

    def get_payload(self) -> bytes:
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


def test_worker_follows_pins_only_for_picked_up_connections(tmp_path):
    path = write_config(tmp_path, ("t1", "t2", "t3"))
    cfg = config_mod.load(path)
    state = cfg.globals.state_dir
    table = P.ServiceTable.build(cfg, cfg.service("web"))
    t1 = cfg.targets["t1"].mark
    pinned = [(c, v, s) for c, v, s in flows(100) if table.pick(key_of(6, c, v, s, 80)) != t1][:10]
    pins = {"web": {key_of(6, c, v, s, 80): t1 for c, v, s in pinned}}
    pins["web"][key_of(6, "10.64.1.99", VIP4, 999, 80)] = 0x12345  # not a target: left out
    pins_state.write(state, pins)
    w = Worker.from_config(cfg, "web")
    assert len(w.pins) == 10
    for c, v, s in pinned:
        syn, ack = Pkt(packet(c, v, 6, s, 80, SYN)), Pkt(packet(c, v, 6, s, 80, ACK))
        w.on_packet(syn)
        w.on_packet(ack)
        assert syn.mark == table.pick(key_of(6, c, v, s, 80))  # a new connection: the table
        assert ack.mark == t1  # a picked-up one: its pin
        assert syn.verdict == ack.verdict == "accept"
    assert w.pinned == 10 and w.packets == 20
    # unpinned flows follow the table whatever their flags
    for c, v, s in flows(50)[60:]:
        if key_of(6, c, v, s, 80) in w.pins:
            continue
        p = Pkt(packet(c, v, 6, s, 80, ACK))
        w.on_packet(p)
        assert p.mark == table.pick(key_of(6, c, v, s, 80))
    # SIGUSR1's work: the file is read again
    pins_state.clear(state)
    w.load_pins()
    assert w.pins == {}


def test_a_table_rebuild_never_holds_a_packet(tmp_path, fake):
    """SIGHUP's rebuild runs aside: packets keep the running table until the
    new one is built, then the next packet swaps it in."""
    import threading

    from synlb import worker as worker_mod
    from synlb import worker_table

    path = write_config(tmp_path, ("t1", "t2"))
    cfg = config_mod.load(path)
    w = Worker.from_config(cfg, "web")
    old = P.ServiceTable.build(cfg, cfg.service("web"))
    new_cfg = config_mod.load(write_config(tmp_path, ("t1", "t2", "t3")))
    new = P.ServiceTable.build(new_cfg, new_cfg.service("web"))
    worker_table.write(cfg.globals.state_dir, worker_table.build(new_cfg, new_cfg.service("web"), 0))
    release, building = threading.Event(), threading.Event()
    real = worker_mod.MarkTable

    class SlowTable(real):
        def __init__(self, table):
            building.set()
            assert release.wait(10)
            super().__init__(table)
    fake(worker_mod, "MarkTable", SlowTable)
    woken = threading.Event()
    w.notify_built = woken.set

    moved = [(c, v, s) for c, v, s in flows(300)
             if old.pick(key_of(6, c, v, s, 80)) != new.pick(key_of(6, c, v, s, 80))]
    c, v, s = moved[0]
    w.reload = w.attention = True
    p = Pkt(packet(c, v, 6, s, 80, SYN))
    w.on_packet(p)  # starts the build and is not held by it
    assert building.wait(10) and p.mark == old.pick(key_of(6, c, v, s, 80))
    release.set()
    assert woken.wait(10)  # the builder wakes the loop (SIGUSR2 in a real worker)
    w.attention = True
    p = Pkt(packet(c, v, 6, s, 80, SYN))
    w.on_packet(p)
    assert p.mark == new.pick(key_of(6, c, v, s, 80)) and w.table.names == ["t1", "t2", "t3"]


@pytest.mark.parametrize("text", ['["t1"]', '{"web": "t1"}', '{"web": [1]}', "{", '{"web": null}'])
def test_a_down_set_of_the_wrong_shape_takes_no_target_out(tmp_path, text):
    from synlb import health_state
    (tmp_path / "targets-down.json").write_text(text)
    assert health_state.down_targets(str(tmp_path), "web") == set()
    (tmp_path / "targets-down.json").write_text('{"web": ["t1"]}')
    assert health_state.down_targets(str(tmp_path), "web") == {"t1"}


def test_a_worker_log_past_its_size_is_kept_once_and_emptied(tmp_path):
    from synlb.worker import rotate_log
    path = tmp_path / "worker-0.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"x" * 500)
        assert not rotate_log(fd, 1000, str(tmp_path / "worker-0.log.1"))
        os.write(fd, b"y" * 600)
        assert rotate_log(fd, 1000, str(tmp_path / "worker-0.log.1"))
        assert (tmp_path / "worker-0.log.1").read_bytes() == b"x" * 500 + b"y" * 600
        os.write(fd, b"after\n")  # appending goes on at the new end
        assert path.read_bytes() == b"after\n"
    finally:
        os.close(fd)


class SlotPkt(Pkt):
    """A queued packet as the kernel hands it over with flow_hash = jhash:
    its mark is the slot (SLOT_MARKS.start + slot), or the connection's."""

    def __init__(self, payload: bytes, mark: int):
        super().__init__(payload)
        self.mark = mark

    def get_mark(self) -> int:
        return self.mark


def test_a_slot_worker_serves_the_kernels_slots(tmp_path):
    """flow_hash = jhash: the worker looks up the slot the kernel computed
    (the nftables engine's jhash), follows pins for picked-up connections,
    keeps a connection's own mark, and hashes as the kernel does a packet
    that came with neither."""
    from synlb.jhash import kernel_slot, service_seed
    path = write_config(tmp_path, ("t1", "t2", "t3"), extra_service="flow_hash = jhash")
    cfg = config_mod.load(path)
    svc = cfg.service("web")
    assert svc.flow_hash == "jhash" and svc.kernel_slots
    table = P.ServiceTable.build(cfg, svc)
    seed = service_seed(cfg.globals.hash_key, "web")
    assert table.seed == seed  # pins judge the service by the kernel's hash too
    w = Worker.from_config(cfg, "web")
    assert w.spec.flow_hash == "jhash" and w.spec.seed == seed
    base = config_mod.SLOT_MARKS.start
    for c, v, s in flows(40) + flows(20, family=6):
        key = key_of(6, c, v, s, 80)
        slot = kernel_slot(key, seed, svc.table_size)
        p = SlotPkt(packet(c, v, 6, s, 80, SYN), base + slot)
        w.on_slot_packet(p)
        assert p.verdict == "accept" and p.mark == table.marks[slot] == table.pick(key)
        # the same flow without the kernel's slot (its rule missing): hashed here alike
        q = SlotPkt(packet(c, v, 6, s, 80, SYN), 0)
        w.on_slot_packet(q)
        assert q.mark == p.mark
    assert w.unslotted == 60
    t2 = cfg.targets["t2"].mark
    kept = SlotPkt(packet("10.64.1.10", VIP4, 6, 5000, 80, ACK), t2)
    w.on_slot_packet(kept)
    assert kept.verdict == "accept" and kept.mark == t2 and w.kept == 1
    # a pin wins over the kernel's slot for a picked-up connection, not for a SYN
    c, v, s = next((c, v, s) for c, v, s in flows(100) if table.pick(key_of(6, c, v, s, 80)) != t2)
    pins_state.write(cfg.globals.state_dir, {"web": {key_of(6, c, v, s, 80): t2}})
    w.load_pins()
    slot = kernel_slot(key_of(6, c, v, s, 80), seed, svc.table_size)
    ack, syn = SlotPkt(packet(c, v, 6, s, 80, ACK), base + slot), SlotPkt(packet(c, v, 6, s, 80, SYN), base + slot)
    w.on_slot_packet(ack)
    w.on_slot_packet(syn)
    assert ack.mark == t2 and syn.mark == table.marks[slot] != t2 and w.pinned == 1
    assert w.packets == 120 + 1 + 2


def test_a_worker_refuses_a_table_of_the_other_flow_hash(tmp_path):
    path = write_config(tmp_path, ("t1", "t2"))
    cfg = config_mod.load(path)
    w = Worker.from_config(cfg, "web")
    cfg2 = config_mod.load(write_config(tmp_path, ("t1", "t2"), extra_service="flow_hash = jhash"))
    from synlb import worker_table
    worker_table.write(cfg.globals.state_dir, worker_table.build(cfg2, cfg2.service("web"), 0))
    w.reload = True
    w.attention = True
    w.attend()
    w._builder.join(10)
    assert w.built is None and w.spec.flow_hash == "blake2b"  # kept the running table


@pytest.mark.parametrize("flow_hash", ["blake2b", "jhash"])
def test_a_pickup_follows_the_configured_table_whatever_is_down(tmp_path, flow_hash):
    """With t3 down here: a new connection follows the table without t3,
    a picked-up one the configured table (where it lives, whatever this
    router's health view), unless this worker opened it: then where it
    sent its SYN (the first ACK of an untracked SYN is a pickup too)."""
    from synlb import worker_table
    from synlb.jhash import kernel_slot
    path = write_config(tmp_path, ("t1", "t2", "t3"), extra_service=f"flow_hash = {flow_hash}")
    cfg = config_mod.load(path)
    svc = cfg.service("web")
    state = cfg.globals.state_dir
    configured = P.ServiceTable.build(cfg, svc)
    active = P.ServiceTable.build(cfg, svc, {"t3"})
    w = Worker.from_config(cfg, "web")
    assert not w.table.split  # nothing down: the normal path

    def serve(down):  # what SIGHUP does, without the builder thread
        worker_table.write(state, worker_table.build(cfg, svc, 0, down=down))
        spec = worker_table.load(state, 0)
        w.built = (spec, MarkTable(spec))
        w.swap_built()
    serve({"t3"})
    assert w.table.split and w.table.names == ["t1", "t2"]
    base = config_mod.SLOT_MARKS.start

    def send(c, v, s, flags, proto=6):
        key = key_of(proto, c, v, s, 80)
        if flow_hash == "jhash":
            p = SlotPkt(packet(c, v, proto, s, 80, flags), base + kernel_slot(key, active.seed, svc.table_size))
            w.on_slot_packet(p)
        else:
            p = Pkt(packet(c, v, proto, s, 80, flags))
            w.on_packet(p)
        assert p.verdict == "accept"
        return p.mark

    keys = flows(200)
    differ = [f for f in keys if configured.pick(key_of(6, *f, 80)) != active.pick(key_of(6, *f, 80))]
    assert len(differ) > 30
    for c, v, s in keys[:100]:  # running connections picked up: the configured table
        assert send(c, v, s, ACK) == configured.pick(key_of(6, c, v, s, 80))
    assert w.picked_up == 100 and not w.opened
    for c, v, s in keys[100:]:  # new ones: the active table, and their first ACK where the SYN went
        mark = send(c, v, s, SYN)
        assert mark == active.pick(key_of(6, c, v, s, 80))
        assert send(c, v, s, ACK) == mark
    assert set(w.opened) == {key_of(6, *f, 80) for f in differ if f in keys[100:]}
    for c, v, s in keys[:20]:  # UDP has no opening packet: the active table
        assert send(c, v, s, 0, proto=17) == active.pick(key_of(17, c, v, s, 80))
    # t3 back: a connection opened just before still has its first ACK follow its SYN, for a while
    opened = dict(w.opened)
    serve(set())
    assert w.table.split and not w.table.differ
    key, mark = next(iter(opened.items()))
    c, v, s = next(f for f in keys[100:] if key_of(6, *f, 80) == key)
    assert send(c, v, s, ACK) == mark != configured.pick(key)
    w.attend()
    assert w.table.split  # not yet forgotten
    w.forget_opened_at = 0.0
    w.attend()
    assert not w.table.split and not w.opened  # the normal state's hot path again
    assert send(c, v, s, ACK) == configured.pick(key)
    serve({"t3"})
    # every target down: a new connection gets the no-target verdict, a pickup still its target
    serve({"t1", "t2", "t3"})
    c, v, s = keys[0]
    if flow_hash == "jhash":
        p = SlotPkt(packet(c, v, 6, s, 80, SYN), 0)
        w.on_slot_packet(p)
    else:
        p = Pkt(packet(c, v, 6, s, 80, SYN))
        w.on_packet(p)
    assert p.verdict == "drop"
    assert send(c, v, s, ACK) == configured.pick(key_of(6, c, v, s, 80))


def test_forget_deletes_only_synlbs_entries_by_prefix_or_by_mark(fake):
    """conntrack.forget: one deletion per family by the marks' common prefix
    when only synlb's entries share it, else one per mark of synlb's found:
    another program's entry under the prefix is never deleted."""
    from synlb import conntrack as C
    calls = []
    listing = {"text": ""}

    def run(*popenargs, **kw):
        import subprocess
        argv = popenargs[0]
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, listing["text"] if "-L" in argv else "", "")
    fake(C.subprocess, "run", run)
    line = "tcp      6 431983 ESTABLISHED src=10.64.1.10 dst=10.64.100.1 sport={} dport=80 src=10.64.100.1 " \
           "dst=10.64.1.10 sport=80 dport={} [ASSURED] mark={} use=1\n"
    marks = {0x101, 0x102, 0x103}
    assert C.forget(marks) == 0 and all("-D" not in c for c in calls)
    listing["text"] = line.format(1000, 1000, 0x101) + line.format(1001, 1001, 0x103)
    calls.clear()
    assert C.forget(marks) == 4  # the same two entries listed for each family
    assert [c for c in calls if "-D" in c] == [["conntrack", "-D", "-f", f, "--mark", "0x100/0xfffffffc"]
                                               for f in ("ipv4", "ipv6")]
    listing["text"] += line.format(1002, 1002, 0x100)  # under the prefix, not synlb's
    calls.clear()
    C.forget(marks)
    assert [c for c in calls if "-D" in c] == [["conntrack", "-D", "-f", f, "--mark", str(m)]
                                               for f in ("ipv4", "ipv6") for m in (0x101, 0x103)]


def test_a_router_forgets_its_connections_only_from_master_straight_to_backup(tmp_path, fake):
    from synlb import conntrack as C
    from synlb import dataplane
    cfg = config_mod.load(write_config(tmp_path, ("t1", "t2", "t3")))
    forgot = []
    fake(C, "forget", lambda marks: forgot.append(set(marks)) or 7)
    assert dataplane.forget_connections(cfg, "BACKUP") == [] and not forgot  # never MASTER
    assert dataplane.forget_connections(cfg, "MASTER") == []
    assert dataplane.forget_connections(cfg, "MASTER") == []  # again: still carrying
    assert dataplane.forget_connections(cfg, "FAULT") == [] and not forgot  # links gone: kept
    assert dataplane.forget_connections(cfg, "BACKUP") == [] and not forgot  # from FAULT, not MASTER
    dataplane.forget_connections(cfg, "MASTER")
    out = dataplane.forget_connections(cfg, "BACKUP")
    assert forgot == [{t.mark for t in cfg.targets.values()}] and "forgot 7 connections" in out[0]
    assert dataplane.forget_connections(cfg, "BACKUP") == [] and len(forgot) == 1  # once per takeover
