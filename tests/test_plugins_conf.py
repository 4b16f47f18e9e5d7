"""The shipped conf/synlb.ini: its commented plugin examples are valid too."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from synlb import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNLB = os.path.join(os.path.dirname(sys.executable), "synlb")


MINE = {"synlb": {"plugins"}, "scripts": {"dir", "timeout"}, "metrics": {"listen"},
        "sync": {"listen", "peers", "key_file", "port", "refresh", "timeout"},
        "bgp": {"asn", "vtysh", "vty_socket", "drain", "refresh", "timeout"},
        "target": {"check", "check_port", "check_path", "check_status", "check_command", "check_interval",
                   "check_timeout", "rise", "fall"}}


def uncomment_plugin_examples(text: str) -> tuple[str, int]:
    """Uncomment the "#key = value" examples of the plugins' keys (and the
    "#[scripts]" / "#[metrics]" headers); others' examples stay as they are."""
    out, n, section = [], 0, ""
    for line in text.splitlines():
        m = re.fullmatch(r"#?\[(\w+)(?::\w+)?\]", line)
        if m:
            section = m.group(1)
            if line.startswith("#") and section in ("scripts", "metrics", "sync", "bgp"):
                line, n = line[1:], n + 1
        m = re.match(r"#(\w+) = ", line)
        if m and m.group(1) in MINE.get(section, ()):
            line, n = line[1:], n + 1
        out.append(line)
    return "\n".join(out) + "\n", n


def test_every_commented_example_is_valid(tmp_path):
    with open(os.path.join(ROOT, "conf", "synlb.ini")) as fh:
        text = fh.read()
    live, n = uncomment_plugin_examples(text)
    # plugins, target keys, [scripts], [metrics], [sync], [bgp]
    assert n == 1 + 9 + (1 + 2) + (1 + 1) + (1 + 6) + (1 + 6)
    path = tmp_path / "synlb.ini"
    path.write_text(live)
    # what the admin runs
    r = subprocess.run([SYNLB, "-c", str(path), "check"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    cfg = config.load(str(path))
    assert cfg.globals.plugins == ("lb", "health", "scripts", "metrics", "sync", "bgp")
    t1 = cfg.targets["t1"].options
    assert (t1["check"], t1["check_port"], t1["rise"], t1["fall"]) == ("tcp", 80, 2, 3)
    assert t1["check_command"] == ("/usr/local/lib/synlb/check-app", "--quick")
    # the examples show the defaults
    assert cfg.extra["scripts"] == {"dir": "/etc/synlb/scripts.d", "timeout": 10.0}
    assert cfg.extra["metrics"] == {"listen": "127.0.0.1:9712"}
    sync = cfg.extra["sync"]
    assert (sync["port"], sync["refresh"], sync["timeout"]) == (9714, 5.0, 1.0)
    assert [str(p) for p in sync["peers"]] == ["198.51.100.2"] and sync["key_file"] == "/etc/synlb/sync.key"
    assert cfg.extra["bgp"] == {"asn": 65100, "vtysh": "/usr/bin/vtysh", "vty_socket": "/var/run/frr",
                                "drain": 0.5, "refresh": 5.0, "timeout": 2.0}


def test_plugin_modules_stay_cheap_to_import(tmp_path):
    """Workers load the config, which imports every named plugin: a worker
    restart must not pay for pyroute2, prometheus_client or http.client."""
    path = tmp_path / "synlb.ini"
    path.write_text("[synlb]\nplugins = lb, health, scripts, metrics, sync, bgp\n[bgp]\nasn = 65100\n"
                    "[sync]\nlisten = 10.0.0.2\n"
                    "peers = 10.0.0.3\nkey_file = /k\n[service:web]\nvips = 10.0.0.1/32\n"
                    "ingress = eth0\nprotocols = tcp\ntargets = a\n[target:a]\naddress = 10.1.0.1\n")
    code = ("import sys; from synlb import config, worker; config.load(sys.argv[1]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pyroute2', 'prometheus_client', 'http', 'psutil', 'concurrent'}))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
