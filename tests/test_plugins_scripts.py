"""The scripts plugin: which executables run, in which order, with what, and
which are refused (keepalived's enable_script_security rule)."""

from __future__ import annotations

import json
import os
import time

import pytest
from synlb import config
from synlb.plugins import NodeState
from synlb import trust
from synlb.plugins import scripts as S

# the ownership checks and the runs need root: lab tests (tests/conftest.py)
root = pytest.mark.lab

BASE = """
[synlb]
state_dir = {d}/state
plugins = scripts
[scripts]
dir = {d}/scripts.d
timeout = {timeout}
[service:web]
vips = 10.0.0.1/32
ingress = eth0
protocols = tcp
ports = 80
targets = a, b
[target:a]
address = 10.1.0.1
[target:b]
address = 10.1.0.2, fd01::2
"""


def make_script(path, body: str, mode: int = 0o755) -> str:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def plugin(tmp_path, FakeHost):
    os.chmod(tmp_path, 0o755)
    started = []

    def make(timeout: float = 5.0) -> S.ScriptsPlugin:
        path = tmp_path / "synlb.ini"
        path.write_text(BASE.format(d=tmp_path, timeout=timeout))
        p = S.create(FakeHost(str(path)))
        p.start()
        started.append(p)
        return p
    yield make
    for p in started:
        p.stop()


def run(p: S.ScriptsPlugin, state: str, reason: str = "test", active: bool = True) -> list[str]:
    changes = p.reconcile(p.host.cfg, NodeState(state, active, reason))
    assert p.wait_idle(20)
    return changes


# ------------------------------------------------------------------ insecure()

@root
def test_root_owned_chain_is_accepted(tmp_path):
    os.chmod(tmp_path, 0o755)
    s = make_script(tmp_path / "d" / "ok", "true")
    assert S.insecure(s) is None


@pytest.mark.parametrize("mode, why", [(0o775, "writable by group"), (0o757, "writable by others"),
                                       (0o777, "writable by group and others")])
@root
def test_group_or_other_writable_script_is_refused(tmp_path, mode, why):
    s = make_script(tmp_path / "d" / "x", "true", mode)
    assert why in S.insecure(s)


@root
def test_script_not_owned_by_root_is_refused(tmp_path):
    s = make_script(tmp_path / "d" / "x", "true")
    os.chown(s, 1000, 1000)
    assert S.insecure(s) == f"{s} is owned by uid 1000, not root"


@root
def test_directory_chain_is_checked(tmp_path):
    d = tmp_path / "d"
    s = make_script(d / "sub" / "x", "true")
    os.chmod(d, 0o777)
    assert S.insecure(s) == f"{d} is writable by group and others (mode 0777)"
    os.chmod(d, 0o1777)  # sticky, like /tmp: others cannot replace root's entries
    assert S.insecure(s) is None
    os.chmod(d, 0o755)
    os.chown(d, 1000, 1000)
    assert S.insecure(s) == f"{d} is owned by uid 1000, not root"


@root
def test_symlink_is_judged_by_its_target(tmp_path):
    bad = make_script(tmp_path / "elsewhere" / "x", "true", 0o777)
    link = tmp_path / "d" / "link"
    os.makedirs(link.parent)
    os.symlink(bad, link)
    assert "writable" in S.insecure(str(link))


@root
def test_a_link_in_a_directory_a_user_can_write_is_refused(tmp_path):
    """The link's target is root's, but the user who owns the directory can
    switch the link between the check and the exec: the path as given is
    checked too, component by component (lstat)."""
    os.chmod(tmp_path, 0o755)
    good = make_script(tmp_path / "root" / "ok", "true")
    user_dir = tmp_path / "user"
    os.makedirs(user_dir)
    os.chown(user_dir, 1000, 1000)
    link = user_dir / "check"
    os.symlink(good, link)
    assert S.insecure(str(link)) == f"{user_dir} is owned by uid 1000, not root"
    # a link the user owns, in root's sticky directory (like /tmp): refused too
    sticky = tmp_path / "sticky"
    os.makedirs(sticky)
    os.chmod(sticky, 0o1777)
    mine = sticky / "check"
    os.symlink(good, mine)
    os.lchown(mine, 1000, 1000)
    assert S.insecure(str(mine)) == f"{mine} is owned by uid 1000, not root"


@root
def test_what_runs_is_exactly_what_was_checked(tmp_path):
    os.chmod(tmp_path, 0o755)
    a = make_script(tmp_path / "d" / "a", "true")
    link = tmp_path / "d" / "link"
    os.symlink(a, link)
    assert trust.trusted(str(link)) == (os.path.realpath(a), None)
    assert trust.trusted(str(tmp_path / "d" / ".." / "d" / "a"))[1].endswith("not a plain absolute path")


def test_missing_file():
    assert "No such file" in S.insecure("/nonexistent/synlb-script")


# ------------------------------------------------------------------ running

@root
def test_runs_in_sorted_order_and_skips_what_it_must(plugin, tmp_path):
    log = tmp_path / "ran"
    d = tmp_path / "scripts.d" / "master"
    for name in ("20-b", "10-a", "3-c"):
        make_script(d / name, f"echo {name} >> {log}")
    make_script(d / "15-group-writable", f"echo bad >> {log}", 0o775)
    make_script(d / "16-not-exec", f"echo bad >> {log}", 0o644)
    for ignored in ("17-backup~", ".hidden", "18-x.dpkg-old"):
        make_script(d / ignored, f"echo bad >> {log}")
    os.makedirs(d / "19-a-directory")
    p = plugin()
    changes = run(p, "MASTER", reason="vrrp MASTER")
    assert log.read_text().split() == ["10-a", "20-b", "3-c"]  # sorted as strings, like run-parts
    assert len(changes) == 1 and "(start) -> MASTER" in changes[0]
    st = p.status()
    assert st["summary"] == "last (start) -> MASTER: 3 ok, 0 failed, 1 refused"
    refused = [r for r in st["runs"] if r.get("refused")]
    assert [os.path.basename(r["script"]) for r in refused] == ["15-group-writable"]
    assert "writable by group" in refused[0]["refused"]
    assert [r["rc"] for r in st["runs"] if not r.get("refused")] == [0, 0, 0]


@root
def test_only_transitions_run_scripts_and_env_is_complete(plugin, tmp_path):
    out = tmp_path / "env"
    for state in ("master", "backup"):
        make_script(tmp_path / "scripts.d" / state / "10-env",
                    f"env > {out}.$SYNLB_STATE; echo hello; echo oops >&2; exit 3")
    p = plugin()
    run(p, "BACKUP", reason="start")
    run(p, "BACKUP", reason="reconcile")       # same state: nothing runs
    run(p, "MASTER", reason="vrrp event MASTER")
    assert len(p.status()["transitions"]) == 2
    env = dict(ln.split("=", 1) for ln in (tmp_path / "env.MASTER").read_text().splitlines() if "=" in ln)
    assert env["SYNLB_STATE"] == "MASTER" and env["SYNLB_PREVIOUS_STATE"] == "BACKUP"
    assert env["SYNLB_REASON"] == "vrrp event MASTER"
    assert env["SYNLB_CONFIG"] == str(tmp_path / "synlb.ini")
    assert env["PATH"].startswith("/usr/local/sbin")
    assert not any(k.startswith("PYTEST") for k in env)  # a clean environment, not the host's
    data = json.loads(env["SYNLB_JSON"])
    assert data["state"] == "MASTER" and data["previous_state"] == "BACKUP" and data["active"] is True
    assert data["services"] == [{"name": "web", "mode": "route", "vips": ["10.0.0.1/32"], "protocols": ["tcp"],
                                 "ports": ["80"], "queues": [0], "targets": ["a", "b"], "down": []}]
    assert [t["name"] for t in data["targets"]] == ["a", "b"]
    assert data["targets"][1]["addresses"] == ["10.1.0.2", "fd01::2"]
    env0 = (tmp_path / "env.BACKUP").read_text()
    assert "SYNLB_PREVIOUS_STATE=\n" in env0
    last = p.status()["runs"][-1]
    assert last["rc"] == 3 and "hello" in last["output"] and "oops" in last["output"]


@root
def test_timeout_kills_the_whole_process_group(plugin, tmp_path):
    pidfile = tmp_path / "child.pid"
    finished = tmp_path / "hang-finished"  # only if the script ran to its own end
    make_script(tmp_path / "scripts.d" / "fault" / "10-hang",
                f"sleep 60 & echo $! > {pidfile}; sleep 60; touch {finished}")
    make_script(tmp_path / "scripts.d" / "fault" / "20-next", f"touch {tmp_path}/next-ran")
    p = plugin(timeout=0.5)
    t0 = time.monotonic()
    run(p, "FAULT")
    print(f"the run with a hung script took {time.monotonic() - t0:.2f} s (timeout 0.5 s)")
    assert not finished.exists()  # the run did not wait for the script to end by itself
    r = p.status()["runs"]
    assert r[0]["rc"] is None and "timed out after 0.5 s" in r[0]["error"]
    assert (tmp_path / "next-ran").exists()  # the next script still runs
    child = int(pidfile.read_text())

    def alive() -> bool:
        try:
            with open(f"/proc/{child}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 3
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), "the script's background child survived the timeout"
    assert not finished.exists()  # killed, so it never got there


@root
def test_no_directory_for_a_state_is_fine(plugin):
    p = plugin()
    assert run(p, "STANDALONE") == []
    assert p.status()["summary"] == "last (start) -> STANDALONE: 0 ok, 0 failed, 0 refused"


def test_config_keys_are_validated(tmp_path):
    path = tmp_path / "synlb.ini"
    path.write_text(BASE.format(d=tmp_path, timeout="forever").replace("dir = ", "dir = relative/"))
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    lines = e.value.lines()
    assert any(ln.startswith(f"{path}:scripts:dir: ") for ln in lines), lines
    assert any(ln.startswith(f"{path}:scripts:timeout: ") for ln in lines), lines

