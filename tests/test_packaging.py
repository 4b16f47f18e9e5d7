"""The .deb: builds, has what a router needs, and its synlb runs on Debian's
own Python libraries (pyroute2, psutil, dbus, prometheus-client).

Building it runs pip (a venv, NetfilterQueue's wheel), so these are lab
tests: `make test` runs them, `make unit` (offline and fast) does not."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from synlb.lab import addresses as A
from synlb.lab.scenario import service_config
from synlb.lab.topology import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.lab(tools=("dpkg", "dpkg-deb", "gcc"))


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    r = subprocess.run([os.path.join(ROOT, "packaging", "build-deb")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    deb = r.stdout.strip().splitlines()[-1]
    dest = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "-x", deb, str(dest)], check=True)
    info = subprocess.run(["dpkg-deb", "-f", deb, "Depends", "Architecture"], capture_output=True,
                          text=True, check=True).stdout
    return dest, info


def test_package_layout(unpacked):
    dest, info = unpacked
    assert "python3-pyroute2" in info and "libnetfilter-queue1" in info
    for path in ("usr/bin/synlb", "usr/lib/synlb/keepalived-notify", "etc/synlb/synlb.ini",
                 "etc/synlb/scripts.d/master", "usr/share/doc/synlb/examples/keepalived.conf.example"):
        assert (dest / path).exists(), path
    assert not (dest / "usr/lib/synlb/python/synlb/lab").exists()
    # keepalived's enable_script_security: nothing on the hook's path writable by others
    hook = dest / "usr/lib/synlb/keepalived-notify"
    mode = hook.stat().st_mode
    assert mode & stat.S_IXUSR and not mode & (stat.S_IWGRP | stat.S_IWOTH)


def test_packaged_synlb_checks_the_shipped_config(unpacked):
    dest, _ = unpacked
    synlb = [str(dest / "usr/bin/synlb")]
    r = subprocess.run(synlb + ["-c", str(dest / "etc/synlb/synlb.ini"), "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(synlb + ["-c", str(dest / "etc/synlb/synlb.ini"), "up", "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "NFQUEUE --queue-num 0" in r.stdout


@pytest.mark.lab(tools=("ip", "iptables"))
def test_packaged_synlb_balances_in_the_lab(unpacked, open_lab):
    """Debian's pyroute2 and psutil, the packaged NetfilterQueue, real traffic."""
    dest, _ = unpacked
    synlb = str(dest / "usr/bin/synlb")
    lab = open_lab(Lab, routers=1)
    conf = os.path.join(lab.role_dir("lb1"), "deb.ini")
    with open(conf, "w") as fh:
        fh.write(service_config(lab, "lb1"))
    lab.run("lb1", [synlb, "-c", conf, "up"])
    try:
        res = lab.open_connections(A.VIP[4], count=60, concurrency=10)
        assert res["ok"] == 60 and len(res["per_target"]) == 3
    finally:
        lab.run("lb1", [synlb, "-c", conf, "down"])


@pytest.mark.lab(tools=("systemd-analyze",))
def test_systemd_unit_verifies(unpacked, tmp_path):
    """The shipped unit parses, and its commands exist in the package
    (systemd-analyze verify, with the packaged paths put in)."""
    dest, _ = unpacked
    text = (dest / "lib/systemd/system/synlb.service").read_text()
    assert "ExecStart=/usr/bin/synlb --config /etc/synlb/synlb.ini run" in text
    unit = tmp_path / "synlb.service"
    unit.write_text(text.replace("/usr/bin/synlb", str(dest / "usr/bin/synlb")))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
