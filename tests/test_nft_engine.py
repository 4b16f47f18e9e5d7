"""The nftables engine, pure parts: option, kernel hash, rendered table, slot diff."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synlb import config, jhash, nft_engine as E, pins, rules
from synlb.config import ConfigError
from synlb.maglev import Maglev
from synlb.packet import key_of

CONF = """
[synlb]
state_dir = /tmp/synlb-test-nft
[service:web]
vips = 10.0.0.1/32, fd00::1/128
ingress = front
protocols = {protocols}
ports = 80, 8000-8100
mode = {mode}
engine = nftables
targets = a, b
{extra}
[target:a]
address = 10.1.0.1, fd01::1
mark = 0x10
[target:b]
address = 10.1.0.2, fd01::2
mark = 0x11
[target:c]
address = 10.1.0.3, fd01::3
mark = 0x12
"""


def load(tmp_path, protocols="tcp, udp", mode="route", extra="", name="synlb.ini"):
    p = tmp_path / name
    p.write_text(CONF.format(protocols=protocols, mode=mode, extra=extra))
    return config.load(str(p))


def with_targets(cfg, names):
    svc = dataclasses.replace(cfg.service("web"), target_names=tuple(names))
    return dataclasses.replace(cfg, services=(svc,))


# ------------------------------------------------------------------ option

def test_engine_option(tmp_path):
    cfg = load(tmp_path)
    svc = cfg.service("web")
    assert svc.engine == "nftables"
    assert list(svc.queues) == []  # no worker for this service
    assert all(t.is_empty() for fam in (4, 6) for t in rules.render_family(cfg, fam).values())
    p = tmp_path / "bad.ini"
    p.write_text(CONF.format(protocols="tcp", mode="route", extra="").replace("engine = nftables",
                                                                              "engine = ebpf"))
    with pytest.raises(ConfigError) as e:
        config.load(str(p))
    assert any(line.startswith(f"{p}:service:web:engine: ") and "nfqueue" in line for line in e.value.lines())


def test_engine_default_and_checks(tmp_path):
    p = tmp_path / "d.ini"
    p.write_text(CONF.format(protocols="tcp", mode="route", extra="").replace("engine = nftables\n", ""))
    assert config.load(str(p)).service("web").engine == "nfqueue"
    with pytest.raises(ConfigError) as e:
        load(tmp_path, extra="shortcut = no")
    assert any(":service:web:shortcut: " in line for line in e.value.lines())
    # an nftables service has no queue: it never clashes with an nfqueue service's
    text = CONF.format(protocols="tcp", mode="route", extra="queue = 3") + """
[service:other]
vips = 10.0.0.2/32
ingress = front
protocols = tcp
queue = 3
targets = a
"""
    p.write_text(text)
    cfg = config.load(str(p))
    assert list(cfg.service("other").queues) == [3] and list(cfg.service("web").queues) == []
    assert [s.name for s in E.services(cfg)] == ["web"]


# ------------------------------------------------------------------ kernel hash

def test_jhash_is_lookup3_hashlittle():
    # Bob Jenkins' published test values of hashlittle (lookup3.c driver5)
    assert jhash.jhash(b"", 0) == 0xDEADBEEF
    assert jhash.jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert jhash.jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash.jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_kernel_slot_equals_what_the_kernel_chose():
    # measured in a netns: slot table i -> mark i + 1, seed 0x1234abcd, M = 65537, UDP
    assert jhash.kernel_slot(key_of(17, "10.99.0.2", "10.99.100.1", 41224, 5002), 0x1234ABCD, 65537) == 43853
    assert jhash.kernel_slot(key_of(17, "10.99.0.2", "10.99.100.1", 34238, 5001), 0x1234ABCD, 65537) == 65454
    assert jhash.kernel_slot(key_of(17, "fd99::2", "fd99:100::1", 50634, 5003), 0x1234ABCD, 65537) == 28652


def test_kernel_key_layout():
    k = jhash.kernel_key(key_of(6, "192.0.2.1", "198.51.100.7", 0x1234, 80))
    assert k == bytes([6, 0, 0, 0, 192, 0, 2, 1, 0x12, 0x34, 0, 0, 198, 51, 100, 7, 0, 80, 0, 0])
    assert len(jhash.kernel_key(key_of(17, "fd00::1", "fd00::2", 1, 2))) == 44
    assert jhash.kernel_key(key_of(1, "192.0.2.1", "198.51.100.7")) is None  # no ports: never hashed
    assert jhash.kernel_key(b"\x04\x06short") is None


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 1_000_003))
def test_reciprocal_scale_in_range(h, m):
    assert 0 <= jhash.reciprocal_scale(h, m) < m


def test_seed_is_deterministic_and_per_service():
    assert jhash.service_seed("k", "web") == jhash.service_seed("k", "web")
    assert jhash.service_seed("k", "web") != jhash.service_seed("k", "api")
    assert jhash.service_seed("k", "web") != jhash.service_seed("other", "web")
    assert 0 <= jhash.service_seed("k", "web") < 2**32


def test_engines_hash_independently():
    """What a switch of engines moves: the fraction of flows whose target
    differs between the worker's hash and the kernel's, same table."""
    rng = random.Random(7)
    for n in (2, 3, 10):
        names = [f"t{i}" for i in range(n)]
        m = Maglev(names, 65537, b"synlb-maglev-v1")
        seed = jhash.service_seed("synlb-maglev-v1", "web")
        flows = [key_of(6, f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                        "10.64.100.1", rng.randrange(1024, 65536), 80) for _ in range(4000)]
        moved = sum(m.table[m.slot(k)] != m.table[jhash.kernel_slot(k, seed, 65537)] for k in flows) / len(flows)
        assert abs(moved - (1 - 1 / n)) < 0.04, (n, moved)


# ------------------------------------------------------------------ skeleton

def test_skeleton(tmp_path):
    cfg = load(tmp_path)
    seed = jhash.service_seed(cfg.globals.hash_key, "web")
    text = E.skeleton(cfg)
    assert text.startswith("table inet synlb {\n") and text.endswith("}\n")
    assert "\tmap slots_web { typeof numgen inc mod 2 : meta mark; size 65537; }" in text
    assert ('\t\tiifname "front" ip daddr 10.0.0.1/32 meta l4proto { tcp, udp } th dport { 80, 8000-8100 } '
            "jump svc4_web") in text
    assert ('\t\tiifname "front" ip6 daddr fd00::1/128 meta l4proto { tcp, udp } th dport { 80, 8000-8100 } '
            "jump svc6_web") in text
    chain = text.split("\tchain svc4_web {\n")[1].split("\t}\n")[0].splitlines()
    assert [ln.strip() for ln in chain] == [
        "ct mark != 0 meta mark set ct mark counter name kept4_web accept",
        "meta l4proto != tcp meta mark set meta l4proto . ip saddr . th sport . ip daddr . th dport "
        "map @pins4_web ct mark set meta mark counter name pinned4_web accept",
        "tcp flags & (syn | ack) != syn meta mark set meta l4proto . ip saddr . th sport . ip daddr . th dport "
        "map @pins4_web ct mark set meta mark counter name pinned4_web accept",
        # a pickup: the table of every configured target, whatever this router's health view
        f"tcp flags & (syn | ack) != syn meta mark set jhash meta l4proto . ip saddr . th sport . ip daddr . th dport "
        f"mod 65537 seed {seed:#010x} map @pickup_web ct mark set meta mark counter name pickup4_web "
        "counter name meta mark map @picks_web accept",
        f"meta mark set jhash meta l4proto . ip saddr . th sport . ip daddr . th dport mod 65537 seed {seed:#010x} "
        "map @slots_web ct mark set meta mark counter name hashed4_web counter name meta mark map @picks_web accept",
        "counter name notarget4_web drop",
    ]
    assert "map split_web" not in text and "map opened4_web" not in text  # no record with tracked SYNs
    assert "nat_prerouting" not in text and "raw_prerouting" not in text
    assert E.digest(text) == E.desired(cfg).digest
    assert f'comment "synlb {E.digest(text)}"' in E.with_comment(text, E.digest(text))


def test_skeleton_variants(tmp_path):
    tcp = E.skeleton(load(tmp_path, protocols="tcp"))
    assert "meta l4proto != tcp" not in tcp and "tcp flags & (syn | ack) != syn" in tcp
    udp = E.skeleton(load(tmp_path, protocols="udp"))
    assert "meta l4proto != tcp" in udp and "tcp flags" not in udp
    assert "map pickup_web" not in udp and "map opened4_web" not in udp  # UDP has no pickup to tell
    nat = E.skeleton(load(tmp_path, mode="nat"))
    assert "\tmap dnat4_web { type mark : ipv4_addr; }" in nat
    assert "type nat hook prerouting priority dstnat" in nat
    assert "dnat ip6 to meta mark map @dnat6_web" in nat
    raw = E.skeleton(load(tmp_path, protocols="tcp", extra="track_syn = no"))
    assert "type filter hook prerouting priority raw" in raw
    assert ('iifname "front" ip daddr 10.0.0.1/32 meta l4proto tcp th dport { 80, 8000-8100 } '
            "tcp flags & (syn | ack) == syn notrack") in raw
    # an untracked SYN leaves no conntrack entry: one sent off the configured table's pick is recorded,
    # for its first ACK (a pickup); the IPv6 record by two jhashes (nft 1.0.6 takes no longer key)
    seed = jhash.service_seed(load(tmp_path).globals.hash_key, "web")
    svc4 = raw.split("\tchain svc4_web {\n")[1].split("\t}\n")[0]
    assert ("tcp flags & (syn | ack) != syn meta mark set ip saddr . tcp sport . ip daddr . tcp dport "
            "map @opened4_web ct mark set meta mark counter name opened4_web accept") in svc4
    assert svc4.index("@opened4_web") < svc4.index("@pickup_web") < svc4.index("@slots_web")
    assert "counter name meta mark map @picks_web goto hashed4_web" in svc4
    svc6 = raw.split("\tchain svc6_web {\n")[1].split("\t}\n")[0]
    v6_key = " . ".join(f"jhash ip6 saddr . tcp sport . ip6 daddr . tcp dport mod 4294967295 seed {seed ^ k:#010x}"
                        for k in (0x5EED0001, 0x5EED0002))
    assert f"meta mark set {v6_key} map @opened6_web" in svc6 and "goto hashed6_web" in svc6
    hashed = raw.split("\tchain hashed4_web {\n")[1].split("\t}\n")[0].splitlines()
    assert [ln.strip() for ln in hashed] == [
        f"tcp flags & (syn | ack) == syn jhash meta l4proto . ip saddr . th sport . ip daddr . th dport "
        f"mod 65537 seed {seed:#010x} vmap @split_web", "accept"]
    record = raw.split("\tchain record_web {\n")[1].split("\t}\n")[0].splitlines()
    assert [ln.strip() for ln in record] == [
        "meta nfproto ipv4 update @opened4_web { ip saddr . tcp sport . ip daddr . tcp dport : meta mark }",
        f"meta nfproto ipv6 update @opened6_web {{ {v6_key} : meta mark }}", "accept"]
    accept = E.skeleton(load(tmp_path, extra="no_target_verdict = accept"))
    assert "counter name notarget4_web accept" in accept
    # the skeleton does not depend on health, targets or pins: those are elements
    cfg = load(tmp_path)
    assert E.desired(cfg, {"web": ["a"]}).digest == E.desired(with_targets(cfg, ["a", "b", "c"])).digest


def test_no_service_no_table(tmp_path):
    p = tmp_path / "q.ini"
    p.write_text(CONF.format(protocols="tcp", mode="route", extra="").replace("engine = nftables\n", ""))
    plan = E.desired(config.load(str(p)))
    assert plan.empty and plan.skeleton == "" and E.describe(plan) == ""


def test_an_nfqueue_service_with_the_kernels_hash_gets_its_slot_chain(tmp_path):
    """flow_hash = jhash: the table holds only the chain that hands the
    worker its slot (the nftables engine's jhash, as a slot mark), ahead of
    iptables' mangle PREROUTING; iptables never saves a slot mark."""
    p = tmp_path / "s.ini"
    p.write_text(CONF.format(protocols="tcp", mode="route", extra="flow_hash = jhash")
                 .replace("engine = nftables\n", ""))
    cfg = config.load(str(p))
    svc = cfg.service("web")
    assert svc.engine == "nfqueue" and svc.flow_hash == "jhash" and list(svc.queues) == [0]
    seed = jhash.service_seed(cfg.globals.hash_key, "web")
    plan = E.desired(cfg)
    assert not plan.empty and plan.services == {} and E.services(cfg) == []
    chain = plan.skeleton.split("\tchain slot_prerouting {\n")[1].split("\t}\n")[0].splitlines()
    m4 = 'iifname "front" ip daddr 10.0.0.1/32 meta l4proto tcp th dport { 80, 8000-8100 }'
    assert [ln.strip() for ln in chain] == [
        "type filter hook prerouting priority mangle - 1; policy accept;",
        f"{m4} ct mark != 0 meta mark set ct mark accept",
        f"{m4} meta mark set jhash meta l4proto . ip saddr . th sport . ip daddr . th dport "
        f"mod 65537 seed {seed:#010x} offset 0x7e000000",
        chain[3].strip(), chain[4].strip()]
    assert "ip6 daddr fd00::1/128" in chain[4] and "offset 0x7e000000" in chain[4]
    assert "map slots_web" not in plan.skeleton  # the worker holds the table
    # the base chain is there to carry the digest
    assert f'comment "synlb {plan.digest}"' in E.with_comment(plan.skeleton, plan.digest)
    vipout = [r for r in rules.render_family(cfg, 4)["mangle"].rules if r.startswith(f"-A {rules.VIPOUT}")]
    assert vipout == [f"-A {rules.VIPOUT} -m connmark --mark 0 -m mark ! --mark 0x7e000000/0xfff00000 "
                      "-j CONNMARK --save-mark"]
    # the nftables engine hashes so already: blake2b is the worker's
    with pytest.raises(ConfigError) as e:
        load(tmp_path, extra="flow_hash = blake2b")
    assert any(":service:web:flow_hash: blake2b is the nfqueue engine's" in line for line in e.value.lines())
    assert load(tmp_path).service("web").flow_hash == "jhash"
    p.write_text(CONF.format(protocols="tcp", mode="route", extra="").replace("engine = nftables\n", ""))
    assert config.load(str(p)).service("web").flow_hash == "blake2b"


def test_no_target_has_a_slot_mark(tmp_path):
    p = tmp_path / "m.ini"
    p.write_text(CONF.format(protocols="tcp", mode="route", extra="").replace("mark = 0x10", "mark = 0x7e000010"))
    with pytest.raises(ConfigError) as e:
        config.load(str(p))
    assert any(":target:a:mark: 0x7e000010 is in synlb's slot marks" in line for line in e.value.lines())


# ------------------------------------------------------------------ elements

def test_full_script(tmp_path):
    cfg = load(tmp_path, mode="nat")
    plan = E.desired(cfg)
    slots = {"web": plan.services["web"].slots()}
    text = E.full_script(plan, slots, replace=True)
    lines = text.splitlines()
    assert lines[:2] == ["table inet synlb { }", "delete table inet synlb"]
    assert "add counter inet synlb pick_web_10" in lines and "add counter inet synlb pick_web_11" in lines
    assert 'add element inet synlb picks_web { 0x10 : "pick_web_10", 0x11 : "pick_web_11" }' in lines
    assert "add element inet synlb dnat4_web { 0x10 : 10.1.0.1, 0x11 : 10.1.0.2 }" in lines
    assert "add element inet synlb dnat6_web { 0x10 : fd01::1, 0x11 : fd01::2 }" in lines
    elems = [e for ln in lines if ln.startswith("add element inet synlb slots_web ")
             for e in ln.split("{ ", 1)[1].rstrip(" }").split(", ")]
    assert len(elems) == 65537
    assert elems[0] == f"0 : {slots['web'][0]:#x}"
    assert {e.split(" : ")[1] for e in elems} == {"0x10", "0x11"}
    assert not E.full_script(plan, slots, replace=False).startswith("table inet synlb { }\ndelete")


def test_maglev_population_is_maglev_py(tmp_path):
    cfg = load(tmp_path)
    sp = E.desired(cfg, {"web": []}).services["web"]
    m = Maglev(["a", "b"], 65537, cfg.globals.hash_key.encode())
    assert sp.slots() == [(0x10, 0x11)[i] for i in m.table]
    assert pins.ServiceTable.build(cfg, cfg.service("web")).marks == sp.slots()


def _apply(old_slots, deletes, adds):
    out = dict(enumerate(old_slots))
    for i in deletes:
        del out[i]
    for i, m in adds:
        assert i not in out
        out[i] = m
    return [out[i] for i in sorted(out)]


@settings(max_examples=300, deadline=None)
@given(st.integers(3, 300).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 4), min_size=n, max_size=n), st.lists(st.integers(1, 4), min_size=n, max_size=n))))
def test_slot_diff_turns_old_into_new_touching_only_differing_slots(pair):
    old, new = pair
    deletes, adds = E.slot_diff(old, new)
    assert _apply(old, deletes, adds) == new
    assert set(deletes) == {i for i, (a, b) in enumerate(zip(old, new)) if a != b} == {i for i, _ in adds}
    assert E.slot_diff([], new) == ([], list(enumerate(new)))
    assert E.slot_diff(old, []) == (list(range(len(old))), [])
    assert E.slot_diff(old, old) == ([], [])


def test_health_flip_100_targets_changes_only_differing_slots(tmp_path):
    """One of 100 targets down at M = 65537: the transaction deletes and re-adds
    exactly the slots whose mark changes (about 1/100 of them), nothing else."""
    names = [f"t{i:03d}" for i in range(100)]
    text = "[synlb]\nstate_dir = /tmp/x\n[service:web]\nvips = 10.0.0.1/32\ningress = front\nprotocols = tcp\n" \
           f"engine = nftables\ntargets = {', '.join(names)}\n"
    text += "".join(f"[target:{n}]\naddress = 10.1.{i // 200}.{i % 200 + 1}\n" for i, n in enumerate(names))
    p = tmp_path / "big.ini"
    p.write_text(text)
    cfg = config.load(str(p))
    before = E.desired(cfg)
    after = E.desired(cfg, {"web": ["t042"]})
    old, new = before.services["web"].slots(), after.services["web"].slots()
    differing = {i for i in range(65537) if old[i] != new[i]}
    lost = old.count(cfg.targets["t042"].mark)
    # t042's slots, and the knock-on moves of Maglev's population (about half as many again)
    assert lost <= len(differing) <= lost * 2
    script = E.update_script(E.applied_of(before), {"web": old}, after, {"web": new})
    deleted = {int(e) for ln in script.splitlines() if ln.startswith("delete element inet synlb slots_web ")
               for e in ln.split("{ ", 1)[1].rstrip(" }").split(", ")}
    added = {int(e.split(" : ")[0]) for ln in script.splitlines()
             if ln.startswith("add element inet synlb slots_web ") for e in ln.split("{ ", 1)[1].rstrip(" }").split(", ")}
    assert deleted == added == differing
    assert all(ln.startswith(("delete element inet synlb slots_web ", "add element inet synlb slots_web "))
               for ln in script.splitlines())  # the pickup map is the configured table: a flip leaves it
    # and back: the same slots again
    back = E.update_script(E.applied_of(after), {"web": new}, before, {"web": old})
    assert back.count(" : ") == len(differing)


def test_a_health_flip_replaces_the_split_slots_of_an_untracked_syn_service(tmp_path):
    """track_syn = no: the split map holds exactly the slots whose SYN goes
    off the configured table's pick; a flip replaces it whole, the pickup
    map is left; a target added changes the pickup map by difference."""
    cfg = load(tmp_path, protocols="tcp", extra="track_syn = no")
    names = [t.name for t in cfg.targets_of(cfg.service("web"))]
    before, after = E.desired(cfg), E.desired(cfg, {"web": [names[0]]})
    old, new = before.services["web"].slots(), after.services["web"].slots()
    pickup = after.services["web"].pickup_slots()
    assert pickup == old and E.split_slots(old, pickup) == []
    script = E.update_script(E.applied_of(before), {"web": old}, after, {"web": new})
    split = {int(e.split(" : ")[0]) for ln in script.splitlines()
             if ln.startswith("add element inet synlb split_web ") for e in ln.split("{ ", 1)[1].rstrip(" }").split(", ")}
    assert split == {i for i in range(len(new)) if new[i] != pickup[i]} and split
    assert "flush map inet synlb split_web" in script and "pickup_web" not in script
    back = E.update_script(E.applied_of(after), {"web": new}, before, {"web": old})
    assert "flush map inet synlb split_web" in back and "add element inet synlb split_web" not in back
    full = E.full_script(after, {"web": new}, False)
    assert full.count(" : goto record_web") == len(split)
    grown = E.desired(with_targets(cfg, names + ["c"]))
    add = E.update_script(E.applied_of(before), {"web": old}, grown, {"web": grown.services["web"].slots()})
    moved = sum(a != b for a, b in zip(old, grown.services["web"].pickup_slots()))
    assert 0 < moved < len(old) and sum(ln.startswith("add element inet synlb pickup_web ")
                                        for ln in add.splitlines()) >= 1


def test_update_script_targets_and_pins(tmp_path):
    cfg = load(tmp_path)
    two = E.desired(cfg)
    old = E.applied_of(two)
    slots2 = two.services["web"].slots()
    assert E.update_script(old, {}, E.desired(cfg), {}) == ""  # nothing changed: no transaction
    # a target added: its counter and picks element, then the slots that move to it
    three = E.desired(with_targets(cfg, ["a", "b", "c"]))
    slots3 = three.services["web"].slots()
    text = E.update_script(old, {"web": slots2}, three, {"web": slots3})
    lines = text.splitlines()
    assert lines[0] == "add counter inet synlb pick_web_12"
    assert lines[1] == 'add element inet synlb picks_web { 0x12 : "pick_web_12" }'
    assert E.changed_slots(slots2, slots3) == sum(a != b for a, b in zip(slots2, slots3))
    assert 0.3 < E.changed_slots(slots2, slots3) / 65537 < 0.37
    # removed again: picks element deleted before its counter
    text = E.update_script(E.applied_of(three), {"web": slots3}, two, {"web": slots2})
    lines = text.splitlines()
    assert lines.index("delete element inet synlb picks_web { 0x12 }") < \
        lines.index("delete counter inet synlb pick_web_12")
    # pins: replaced whole, in the service's maps by family
    keys = {key_of(6, "192.0.2.9", "10.0.0.1", 40000, 80): 0x11,
            key_of(17, "fd02::9", "fd00::1", 40001, 8000): 0x10,
            key_of(6, "192.0.2.9", "10.0.0.1", 40002, 80): 0x99}  # not a target of web: left out
    pinned = E.desired(cfg, pins={"web": keys})
    text = E.update_script(old, {}, pinned, {})
    assert text.splitlines() == [
        "flush map inet synlb pins4_web",
        "add element inet synlb pins4_web { 6 . 192.0.2.9 . 40000 . 10.0.0.1 . 80 : 0x11 }",
        "flush map inet synlb pins6_web",
        "add element inet synlb pins6_web { 17 . fd02::9 . 40001 . fd00::1 . 8000 : 0x10 }",
    ]
    assert E.pins_script(old, pinned) == text
    assert E.pins_script(E.applied_of(pinned), pinned) == ""
    with pytest.raises(ValueError):
        E.update_script(dataclasses.replace(old, digest="x"), {}, pinned, {})


def test_pin_key():
    assert E.pin_key(key_of(6, "192.0.2.9", "10.0.0.1", 40000, 80)) == (4, (6, "192.0.2.9", 40000, "10.0.0.1", 80))
    assert E.pin_key(key_of(17, "fd02::9", "fd00::1", 1, 2)) == (6, (17, "fd02::9", 1, "fd00::1", 2))
    assert E.pin_key(key_of(1, "192.0.2.9", "10.0.0.1")) is None
    assert E.service_pins({key_of(6, "fd02::9", "fd00::1", 1, 2): 0x10}, [0x10], families=(4,)) == {4: {}}


def test_misplaced_follows_the_engine_hash(tmp_path):
    """For the nftables engine the pins are the connections whose mark is not
    the kernel's pick (jhash), not the worker's."""
    cfg = load(tmp_path)
    table = pins.ServiceTable.build(cfg, cfg.service("web"))
    seed = jhash.service_seed(cfg.globals.hash_key, "web")
    rng = random.Random(3)
    entries = []
    for i in range(400):
        client, port = f"192.0.2.{rng.randrange(1, 255)}", rng.randrange(1024, 65536)
        key = key_of(6, client, "10.0.0.1", port, 80)
        kernel = table.marks[jhash.kernel_slot(key, seed, 65537)]
        worker = table.marks[table.maglev.slot(key)]
        entries.append((pins_entry(client, port, kernel), kernel == worker))
    got = pins.misplaced(cfg, [e for e, _ in entries])
    assert got == {}  # every connection where the kernel puts it: nothing to pin
    wrong = [pins_entry(e.src, e.sport, 0x10 if e.mark == 0x11 else 0x11) for e, _ in entries[:50]]
    assert pins.count(pins.misplaced(cfg, wrong)) == 50


def pins_entry(client, port, mark):
    from synlb.conntrack import Entry
    return Entry(6, client, "10.0.0.1", port, 80, mark)


def test_describe(tmp_path):
    text = E.describe(E.desired(load(tmp_path)))
    assert "table inet synlb {" in text
    assert "# slots_web: 65537 elements slot : mark (a " in text
    assert "# pins4_web: 0 pins" in text


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 30), st.integers(1, 3)), st.dictionaries(st.integers(0, 30), st.integers(1, 3)))
def test_pins_diff(old, new):
    deletes, adds = E.pins_diff(old, new)
    after = {k: m for k, m in old.items() if k not in deletes}
    assert not set(adds) & set(after)  # an element is never added over a live one
    after.update(adds)
    assert after == new
    assert set(deletes) <= set(old) and all(new.get(k) != old[k] for k in deletes)


def test_pins_by_difference_when_the_applied_ones_are_known(tmp_path):
    cfg = load(tmp_path)
    a = key_of(6, "192.0.2.9", "10.0.0.1", 40000, 80)
    b = key_of(6, "192.0.2.9", "10.0.0.1", 40001, 80)
    c = key_of(17, "192.0.2.9", "10.0.0.1", 40002, 80)
    before = E.desired(cfg, pins={"web": {a: 0x10, b: 0x10}})
    after = E.desired(cfg, pins={"web": {a: 0x10, b: 0x11, c: 0x11}})
    known = {"web": before.services["web"].pins}
    text = E.pins_script(E.applied_of(before), after, known)
    assert text.splitlines() == [
        "delete element inet synlb pins4_web { 6 . 192.0.2.9 . 40001 . 10.0.0.1 . 80 }",
        "add element inet synlb pins4_web { 6 . 192.0.2.9 . 40001 . 10.0.0.1 . 80 : 0x11, "
        "17 . 192.0.2.9 . 40002 . 10.0.0.1 . 80 : 0x11 }",
    ]
    assert E.update_script(E.applied_of(before), {}, after, {}, known) == text
    # the digest follows the pins, not the order they came in
    again = E.desired(cfg, pins={"web": {c: 0x11, b: 0x11, a: 0x10}})
    assert E.pins_digest(again.services["web"]) == E.pins_digest(after.services["web"])
    assert E.pins_digest(again.services["web"]) != E.pins_digest(before.services["web"])
