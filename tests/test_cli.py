"""The command line: --version, --help, and which errors are the user's (one
message, exit 1) and which are bugs (a traceback). Nothing here changes the
kernel."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from synlb import cli, config, control, dataplane, errors, live, netfilter, sched, sysctl, workers
from synlb.vrrp import dbus as vrrp_dbus
from synlb.vrrp import events

SYNLB = os.path.join(os.path.dirname(sys.executable), "synlb")

CONF = """
[synlb]
state_dir = {tmp}/state
plugins = scripts
[scripts]
dir = {tmp}/scripts.d
[service:web]
vips = 192.0.2.1/32
ingress = lo
protocols = tcp
targets = a
[target:a]
address = 198.51.100.1
"""


def write_config(tmp_path) -> str:
    p = tmp_path / "synlb.ini"
    p.write_text(CONF.format(tmp=tmp_path))
    return str(p)


def run(*argv, timeout=30):
    return subprocess.run([SYNLB, *argv], capture_output=True, text=True, timeout=timeout, check=False)


def test_version_from_the_package_metadata():
    r = run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"synlb {importlib.metadata.version('synlb')}\n"
    import synlb
    assert synlb.__version__ == importlib.metadata.version("synlb")


def test_help_lists_no_hidden_command():
    r = run("--help")
    assert r.returncode == 0
    assert not re.search(r"^\s+worker\b|[{,]worker\b", r.stdout, re.M) and "SUPPRESS" not in r.stdout, r.stdout
    for command in ("check", "up", "down", "status", "run", "notify", "fifo", "dbus"):
        assert f"    {command} " in r.stdout, command
    assert run("worker", "--help").returncode == 0  # still there for workers.py


@pytest.mark.parametrize("cls", [config.ConfigError, config.PluginError, live.LiveError,
                                 netfilter.NetfilterError, workers.WorkerError, sysctl.SysctlError,
                                 control.HostRunning, events.VrrpArgError, events.VrrpError,
                                 vrrp_dbus.ListenerError])
def test_every_user_error_has_one_base(cls):
    assert issubclass(cls, errors.UserError)
    assert not issubclass(cls, RuntimeError)  # a RuntimeError is a bug, never printed as the user's


def test_up_without_conntrack_is_a_user_error(tmp_path, fake, capsys):
    path = write_config(tmp_path)
    fake(sysctl, "_path", lambda name: str(tmp_path / "no-proc-sys" / name))
    # the data plane as far as the pickup sysctls (nothing else is touched)
    fake(dataplane, "up", lambda config_path, cfg, reason="up": sysctl.activate(cfg.globals.state_dir))
    assert cli.main(["-c", path, "up"]) == 1
    err = capsys.readouterr().err
    assert err == "synlb up: conntrack sysctls missing: is nf_conntrack loaded? (modprobe nf_conntrack)\n"


def test_a_bug_keeps_its_traceback(tmp_path, fake):
    path = write_config(tmp_path)

    def bug(*a, **k):
        raise RuntimeError("a bug, not the user's")

    fake(dataplane, "up", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["-c", path, "up"])


@pytest.mark.lab  # synlb run checks the live system as root
def test_run_while_another_host_runs_is_a_user_error(tmp_path):
    """The second host stops before starting anything. (Its plugins are only
    `scripts`, with an empty directory: even a host that wrongly started would
    change nothing; live checks only read the interfaces.)"""
    path = write_config(tmp_path)
    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    first = control.ControlServer(control.socket_path(state_dir), lambda req: {"ok": True, "node": "STANDALONE"})
    first.start()
    try:
        r = run("-c", path, "run")
    finally:
        first.stop()
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr == (f"synlb run: {control.socket_path(state_dir)}: another synlb host is running "
                        "(one host per state_dir)\n"), r.stderr


@pytest.fixture
def no_priority(monkeypatch):
    """setpriority refused, as for a user without CAP_SYS_NICE."""
    def refuse(which, who, prio):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(sched.os, "setpriority", refuse)


def test_up_that_cannot_take_its_priority_changes_nothing(tmp_path, fake, capsys, no_priority):
    path = write_config(tmp_path)
    called = []
    fake(dataplane, "up", lambda config_path, cfg, reason="up": called.append(reason) or [])
    assert cli.main(["-c", path, "up"]) == 1
    assert capsys.readouterr().err == (f"synlb up: {path}:synlb:nice: cannot run at nice -10: EACCES "
                                       "(a negative value needs root or CAP_SYS_NICE)\n")
    assert called == []


def test_an_event_source_that_cannot_take_its_priority_still_delivers(tmp_path, fake, caplog, no_priority):
    from synlb.vrrp import notify
    path = write_config(tmp_path)
    delivered = []
    fake(notify, "main", lambda config_path, args: delivered.append(args) or 0)
    assert cli.main(["-c", path, "notify", "GROUP", "G1", "MASTER", "100"]) == 0
    assert delivered == [["GROUP", "G1", "MASTER", "100"]]
    assert f"{path}:synlb:nice: cannot run at nice -10: EACCES" in caplog.text


def test_the_control_plane_runs_at_its_nice(tmp_path, fake):
    path = write_config(tmp_path)
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(text.replace("plugins = scripts\n", "plugins = scripts\nnice = 3\n"))
    seen = []
    fake(dataplane, "up", lambda config_path, cfg, reason="up": seen.append(sched.nice_of(0)) or [])
    assert cli.main(["-c", path, "up"]) == 0
    assert seen == [3]
