"""Config: every shipped file parses; every broken one names FILE:SECTION:KEY."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from synlb import config
from synlb.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNLB = os.path.join(os.path.dirname(sys.executable), "synlb")

GOOD = """
[service:web]
vips = 10.0.0.1/32, fd00::1/128
ingress = eth0
protocols = tcp
targets = a, b
[target:a]
address = 10.1.0.1, fd01::1
[target:b]
address = 10.1.0.2, fd01::2
"""


def write(tmp_path, text, name="synlb.ini"):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def problems(path):
    with pytest.raises(ConfigError) as e:
        config.load(path)
    return e.value.lines()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "conf", "*.ini"))))
def test_every_shipped_config_passes_check(path):
    r = subprocess.run([SYNLB, "-c", path, "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}: OK")


def test_defaults_and_types(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    svc = cfg.service("web")
    assert svc.mode == "route" and svc.protocols == ("tcp",) and svc.ports == ()
    assert svc.table_size == 65537 and list(svc.queues) == [0] and not svc.queue_bypass
    assert svc.families() == (4, 6)
    a = cfg.targets["a"]
    assert a.mark == config.auto_mark("a") and a.table == a.mark
    assert config.AUTO_MARK_BASE <= a.mark < config.AUTO_MARK_BASE + config.AUTO_MARK_SPAN


def test_auto_mark_is_stable_when_targets_come_and_go(tmp_path):
    two = config.load(write(tmp_path, GOOD))
    three = config.load(write(tmp_path, GOOD.replace("targets = a, b", "targets = a, b, c")
                              + "[target:c]\naddress = 10.1.0.3, fd01::3\n", "x/synlb.ini"))
    assert two.targets["a"].mark == three.targets["a"].mark
    assert two.targets["b"].mark == three.targets["b"].mark


def test_dropins_override_single_keys_in_sorted_order(tmp_path):
    main = write(tmp_path, GOOD)
    write(tmp_path, "[service:web]\nports = 80\n", "synlb.d/20-ports.ini")
    write(tmp_path, "[service:web]\nports = 443\nqueue = 2-3\n", "synlb.d/10-first.ini")
    write(tmp_path, "[service:web]\nports = nope\n", "synlb.d/README")  # not *.ini: ignored
    cfg = config.load(main)
    assert cfg.service("web").ports == ((80, 80),)
    assert list(cfg.service("web").queues) == [2, 3]
    assert len(cfg.files) == 3


def test_dropin_error_names_the_dropin_file(tmp_path):
    main = write(tmp_path, GOOD)
    drop = write(tmp_path, "[service:web]\nmode = bridge\n", "synlb.d/50-mode.ini")
    assert problems(main) == [f"{drop}:service:web:mode: 'bridge' is not one of route, nat"]


BROKEN = {
    # name: (config text, expected lines with {f} for the file)
    "unknown_key": (GOOD + "[synlb]\nstatedir = /x\n",
                    ["{f}:synlb:statedir: unknown key (known: copy_range, hash_key, nice, pickup, plugins, "
                     "queue_maxlen, route_protocol, rule_priority, state_dir, worker_user)"]),
    "nice_out_of_range": (GOOD + "[synlb]\nnice = -21\n",
                          ["{f}:synlb:nice: -21 is out of range -20..19"]),
    "bad_address": (GOOD.replace("address = 10.1.0.2, fd01::2", "address = 10.1.0.300"),
                    ["{f}:target:b:address: '10.1.0.300' is not an IP address"]),
    "not_prime": (GOOD.replace("targets = a, b", "targets = a, b\ntable_size = 1000"),
                  ["{f}:service:web:table_size: 1000 is not prime (Maglev needs a prime table size, e.g. 65537)"]),
    "too_small": (GOOD.replace("targets = a, b", "targets = a, b\ntable_size = 101"),
                  ["{f}:service:web:table_size: 101 is below 100 x 2 targets; balance would be poor"]),
    "duplicate_mark": (GOOD.replace("address = 10.1.0.1, fd01::1", "address = 10.1.0.1, fd01::1\nmark = 7")
                       .replace("address = 10.1.0.2, fd01::2", "address = 10.1.0.2, fd01::2\nmark = 0x7"),
                       ["{f}:target:b:mark: mark 0x7 (set) is also target a's; set a distinct mark"]),
    "unknown_target": (GOOD.replace("targets = a, b", "targets = a, b, c"),
                       ["{f}:service:web:targets: unknown target 'c' (no [target:c])"]),
    "wrong_family": (GOOD.replace("address = 10.1.0.2, fd01::2", "address = 10.1.0.2"),
                     ["{f}:service:web:targets: target b has no IPv6 address but the service has IPv6 VIPs"]),
    "vip_not_prefix": (GOOD.replace("vips = 10.0.0.1/32, fd00::1/128", "vips = 10.0.0.1/24"),
                       ["{f}:service:web:vips: '10.0.0.1/24' is not an IP prefix (10.0.0.1/24 has host bits set)"]),
    "missing_required": (GOOD.replace("ingress = eth0\n", ""),
                         ["{f}:service:web:ingress: required key is missing"]),
    "bad_protocol": (GOOD.replace("protocols = tcp", "protocols = tcp, gre"),
                     ["{f}:service:web:protocols: 'gre' is not one of tcp, udp, sctp"]),
    "bad_ports": (GOOD.replace("protocols = tcp", "protocols = tcp\nports = 80, 90-85"),
                  ["{f}:service:web:ports: '90-85' is not a port range within 1..65535"]),
    "bad_bool": (GOOD + "[synlb]\npickup = maybe\n", ["{f}:synlb:pickup: 'maybe' is not a boolean (yes/no)"]),
    "unknown_section": (GOOD + "[servce:web]\n",
                        ["{f}:servce:web:-: unknown section (known: [synlb], [service:NAME], [target:NAME]{extra})"]),
    "no_service": ("[target:a]\naddress = 10.0.0.1\n", ["{f}:-:-: no [service:NAME] section"]),
    "queue_shared": (GOOD + "[service:api]\nvips = 10.0.0.2/32\ningress = eth0\nprotocols = udp\ntargets = a\n"
                     "table_size = 251\n",
                     ["{f}:service:web:queue: queue 0 is also service api's"]),
    "reserved_table": (GOOD.replace("address = 10.1.0.1, fd01::1", "address = 10.1.0.1, fd01::1\ntable = 254"),
                       ["{f}:target:a:table: 254 is a reserved routing table (default/main/local)"]),
    "not_ini": ("vips = 1\n", ["{f}:-:-: cannot parse: File contains no section headers. file: '{f}', line: 1 'vips = 1\\n'"]),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_config_names_file_section_key(tmp_path, name):
    text, expected = BROKEN[name]
    path = write(tmp_path, text)
    extra = ", [vrrp]"  # known to config.load() itself (config.SECTION_KINDS), whatever was imported
    assert problems(path) == [e.format(f=path, extra=extra) for e in expected]


def test_load_alone_accepts_a_full_file_in_a_fresh_interpreter(tmp_path):
    """Whether a file is valid never depends on what was imported before:
    config.load() alone, first thing in a new interpreter, accepts every
    section synlb knows ([vrrp] included) and every plugin's."""
    path = write(tmp_path, GOOD)
    write(tmp_path, "[synlb]\nplugins = lb, health, scripts, metrics, dbus\n"
                    "[target:a]\ncheck = tcp\ncheck_port = 80\n"
                    "[scripts]\ntimeout = 5\n[metrics]\nlisten = [::1]:9100\n"
                    "[vrrp]\nsync_group = G1\nstandby = cold\ndbus_instances = front/51/IPv4\n"
                    "ready_file = /run/synlb.ready\n",
          name="synlb.d/10-full.ini")
    code = ("import sys; from synlb import config; cfg = config.load(sys.argv[1]); "
            "print(repr(cfg.vrrp)); print(sorted(cfg.extra)); print(cfg.targets['a'].options['check']); "
            "print(sorted(m for m in sys.modules if m in ('synlb.cli', 'synlb.host', 'synlb.vrrp.delivery')))")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "VrrpConfig(kind='GROUP', name='G1', standby='cold', dbus_instances=('front/51/IPv4',), "
        "ready_file='/run/synlb.ready')",
        "['metrics', 'scripts']", "tcp", "[]"]
    # and the same file without [vrrp]: a standalone node
    os.unlink(tmp_path / "synlb.d" / "10-full.ini")
    assert config.load(path).vrrp is None


def test_every_problem_reported_at_once(tmp_path):
    text = (GOOD.replace("protocols = tcp", "protocols = icmp")
            .replace("targets = a, b", "targets = a, zz\ntable_size = 100")
            + "[synlb]\nbogus = 1\n")
    lines = problems(write(tmp_path, text))
    keys = [ln.split(":", 3)[1:3] for ln in lines]
    assert ["synlb", "bogus"] in keys
    assert ["service", "web"] in [k[:2] for k in (ln.split(":")[1:3] for ln in lines)]
    assert any(":service:web:protocols:" in ln for ln in lines)
    assert any(":service:web:table_size:" in ln for ln in lines)
    assert any(":service:web:targets: unknown target 'zz'" in ln for ln in lines)


def test_check_cli_exits_nonzero_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("protocols = tcp", "protocols = icmp"))
    r = subprocess.run([SYNLB, "-c", path, "check"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"{path}:service:web:protocols: 'icmp' is not one of tcp, udp, sctp\n"
    r = subprocess.run([SYNLB, "-c", str(tmp_path / "missing.ini"), "check"], capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_config_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNLB_CONFIG", "/from/env.ini")
    assert config.config_path("/from/cli.ini") == "/from/cli.ini"
    assert config.config_path(None) == "/from/env.ini"
    monkeypatch.delenv("SYNLB_CONFIG")
    assert config.config_path(None) == "/etc/synlb/synlb.ini"
