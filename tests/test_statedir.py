"""The state directory (statedir.py): a directory only root can change, or
refused with one line before any command does anything; atomic writes that
never follow a planted symlink; and what is read back from it (saved
sysctls, applied.json's route protocol) never taken on trust. Nothing here
touches the kernel: every step that would is replaced or pointed at a
temporary directory."""

from __future__ import annotations

import json
import logging
import os
import stat

import psutil
import pytest

from synlb import (cli, dataplane, errors, health_state, host, netfilter, pins_state, statedir, status,
                   sysctl, worker, worker_table, workers)

from synlb.vrrp import dbus as vrrp_dbus
from synlb.vrrp import delivery, journal
from synlb.vrrp.events import VrrpEvent

root_only = pytest.mark.lab  # ownership is only checked as root

OTHER_UID = 65534  # nobody

CONF = """
[synlb]
state_dir = {state}
[service:web]
vips = 192.0.2.1/32
ingress = lo
protocols = tcp
targets = a
[target:a]
address = 198.51.100.1
[vrrp]
sync_group = G1
"""


def write_config(tmp_path, state) -> str:
    p = tmp_path / "synlb.ini"
    p.write_text(CONF.format(state=state))
    return str(p)


# ------------------------------------------------------------------ atomic writes

def test_write_json_is_atomic_unique_temp_fsync_nothing_left(tmp_path, monkeypatch):
    target = tmp_path / "applied.json"
    target.write_text('{"n": 0}')
    seen = []  # (what happened, details) in order
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        # at the rename the new content is all in the temp file, beside the
        # target, and readers still see the old file
        n = sum(1 for s in seen if s[0] == "replace")
        assert os.path.dirname(src) == str(tmp_path) and dst == str(target)
        assert json.loads(open(src).read()) == {"n": n + 1}
        assert stat.S_IMODE(os.lstat(src).st_mode) == 0o600
        assert json.loads(target.read_text()) == {"n": n}
        seen.append(("replace", os.path.basename(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    statedir.write_json(str(target), {"n": 1})
    statedir.write_json(str(target), {"n": 2})
    assert [s for s in seen if s[0] == "fsync"] == [("fsync", "file"), ("fsync", "dir")] * 2
    assert [s[0] for s in seen] == ["fsync", "replace", "fsync"] * 2  # the file synced before the rename
    first, second = seen[1][1], seen[4][1]
    assert first != second  # a unique temp name each time, never a fixed one
    assert first.startswith(".applied.json.") and first.endswith(".tmp")
    assert json.loads(target.read_text()) == {"n": 2}
    assert os.listdir(tmp_path) == ["applied.json"]  # no temp file left


def test_write_json_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    target.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        statedir.write_json(str(target), {"not json": object()})
    assert json.loads(target.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def _victim(tmp_path):
    v = tmp_path / "victim"
    v.write_text("root's file\n")
    return v


def _writers(d: str):
    """Every writer of a JSON file in the state dir: (file it writes, relative
    to the state dir, write). The workers' directories are made first
    (statedir.ensure_workers), for this process's own user."""
    from synlb.config import load
    cfg_path = os.path.join(os.path.dirname(d), "w.ini")
    with open(cfg_path, "w") as fh:
        fh.write(CONF.format(state=d))
    cfg = load(cfg_path)
    table = worker_table.build(cfg, cfg.service("web"), 0)
    statedir.ensure_workers(d)

    def stats():
        w = worker.Worker.__new__(worker.Worker)
        w.state_dir, w.queue, w.service_name = d, 0, "web"
        w.picks, w.no_target, w.pinned, w.pins, w.started = {}, 0, 0, {}, 0.0
        w.kept, w.unslotted, w.spec, w.picked_up, w.opened = 0, 0, table, 0, {}
        w.table = worker.MarkTable(table)
        w.write_stats()

    def sysctl_saved():
        real = sysctl._path
        sysctl._path = lambda name: os.path.join(os.path.dirname(d), "proc-sys", name)
        try:
            for name in sysctl.PICKUP:
                os.makedirs(os.path.dirname(sysctl._path(name)), exist_ok=True)
                with open(sysctl._path(name), "w") as fh:
                    fh.write("1\n")
            sysctl.activate(d)
        finally:
            sysctl._path = real

    return [
        ("applied.json", lambda: dataplane._write_applied(d, {"digest": "x", "route_protocol": 229})),
        ("netfilter.json", lambda: netfilter._store_state(d, {"4": ["a", "b"]})),
        ("sysctl-saved.json", sysctl_saved),
        ("targets-down.json", lambda: health_state.write_down(d, {"web": ["a"]})),
        ("workers/pins.json", lambda: pins_state.write(d, {"web": {bytes(13): 1}})),
        ("worker-0.pid", lambda: workers._write(workers.WorkerInfo(1234, "web", 0, "d", d))),
        ("workers/worker-0.table.json", lambda: worker_table.write(d, table)),
        ("workers/run/worker-0.stats.json", stats),
        ("vrrp-state.json", lambda: journal._write_state(d, VrrpEvent("notify", "GROUP", "G1", "MASTER"), (1, 2))),
    ]


def test_a_planted_symlink_at_an_old_fixed_temp_name_is_not_followed(tmp_path):
    """Every state file used to be written through ``FILE.tmp`` (the journal's
    through ``FILE.<pid>.tmp``), opened with open("w"), which follows a
    symlink there: a link to any file had that file overwritten."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    writers = _writers(str(d))
    for name, _ in writers:
        for tmp in (f"{name}.tmp", f"{name}.{os.getpid()}.tmp"):
            os.symlink(victim, d / tmp)
    for name, write in writers:
        write()
        assert victim.read_text() == "root's file\n", name
        assert (d / name).is_file() and not (d / name).is_symlink(), name
        json.loads((d / name).read_text())
    # no temp file of ours left: only the files and the planted links
    planted = {p for n, _ in writers for p in (f"{n}.tmp", f"{n}.{os.getpid()}.tmp")}
    found = {os.path.relpath(os.path.join(top, f), d) for top, _, files in os.walk(d) for f in files}
    assert found == {n for n, _ in writers} | planted


def test_a_symlink_at_the_file_itself_is_replaced_not_followed(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    for name, write in _writers(str(d)):
        os.symlink(victim, d / name)
        write()
        assert victim.read_text() == "root's file\n", name
        assert not (d / name).is_symlink(), name


def test_the_nftables_engines_records_are_written_through_statedir(tmp_path):
    """nft.json, nft-slots-SVC.bin and nft-pins-SVC.json were written through
    FILE.tmp with open("w"/"wb") like the others: a planted link is not followed."""
    from synlb import nft_apply
    from synlb import nft_engine as E
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    names = ["nft.json", "nft-slots-web.bin", "nft-pins-web.json"]
    for name in names:
        os.symlink(victim, d / f"{name}.tmp")
    applied = E.Applied("dg", {"web": [["a", 1]]}, {"web": {1: ("192.0.2.1", None)}}, {"web": "pd"})
    sp = E.ServicePlan("web", 7, 1, "route", (4,), (("a", 1),), {1: ("192.0.2.1", None)},
                       {4: {(1, 2, 3, 4, 5): 1}})
    nft_apply._store_state(str(d), applied, pending=False)
    nft_apply._store_slots(str(d), "web", [1, 1, 1, 0, 1, 1, 1])
    nft_apply._store_pins(str(d), sp)
    assert victim.read_text() == "root's file\n"
    assert nft_apply.load_state(str(d)) == (applied, False)
    assert nft_apply.load_slots(str(d), "web") == [1, 1, 1, 0, 1, 1, 1]
    assert nft_apply.load_pins(str(d), "web", E.pins_digest(sp)) == {4: {(1, 2, 3, 4, 5): 1}}
    assert sorted(os.listdir(d)) == sorted(names + [f"{n}.tmp" for n in names])
    nft_apply.clear_state(str(d))
    assert sorted(os.listdir(d)) == sorted(f"{n}.tmp" for n in names)  # only the planted links


def test_the_worker_log_is_rotated_without_following_a_symlink(tmp_path):
    """worker-N.log.1 used to be opened with open("wb"), through a link there
    (now in workers/run/, where a worker that is not root could plant one)."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    statedir.ensure_workers(str(d))
    victim = _victim(tmp_path)
    old = statedir.worker_log_old(str(d), 0)
    os.symlink(victim, old)
    with statedir.open_log(statedir.worker_log(str(d), 0)) as log:  # as workers.start opens it
        os.write(log.fileno(), b"z" * 2000)
        assert worker.rotate_log(log.fileno(), 1000, old)
    assert victim.read_text() == "root's file\n"
    assert not os.path.islink(old) and open(old, "rb").read() == b"z" * 2000
    assert sorted(os.listdir(d / "workers" / "run")) == ["worker-0.log.1"]
    assert os.path.getsize(statedir.worker_log(str(d), 0)) == 0


def test_reads_never_follow_a_symlink(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"digest": "x", "route_protocol": 186}))
    os.symlink(outside, d / "applied.json")
    assert dataplane.applied(str(d)) is None
    with pytest.raises(ValueError, match="symlink"):
        statedir.read_json(str(d / "applied.json"))
    os.symlink(outside, d / "vrrp.log")
    journal.log(str(d), {"event": "x"})  # best effort: not written through the link
    assert json.loads(outside.read_text())["route_protocol"] == 186


def test_lock_file_is_not_opened_through_a_symlink(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    os.symlink(victim, d / "lock")
    with pytest.raises(statedir.StateDirError, match="lock"):
        with dataplane.locked(str(d)):
            raise AssertionError("locked through a symlink")
    assert victim.read_text() == "root's file\n"  # open("w") used to truncate it


def test_paths_are_named_in_one_place(tmp_path):
    d = str(tmp_path)
    assert workers.pidfile(d, 3) == f"{d}/worker-3.pid" == statedir.worker_pid(d, 3)
    assert worker.stats_file(d, 3) == f"{d}/workers/run/worker-3.stats.json"
    assert worker_table.path(d, 3) == f"{d}/workers/worker-3.table.json"
    assert statedir.worker_log(d, 3) == f"{d}/workers/worker-3.log"
    assert statedir.worker_log_old(d, 3) == f"{d}/workers/run/worker-3.log.1"
    assert pins_state.path(d) == f"{d}/workers/pins.json"
    statedir.ensure_workers(d)
    for q in (0, 12, 3):
        for suffix in (".pid", ".log", ".table.json"):
            open(statedir.worker_file(d, q, suffix), "w").close()
    open(os.path.join(d, "worker-x.pid"), "w").close()
    assert statedir.worker_queues(d, ".pid") == [0, 12, 3]  # file name order, as listed before
    assert statedir.worker_queues(d, ".table.json") == [0, 12, 3]
    assert statedir.worker_queues(d + "/missing", ".pid") == []


# ------------------------------------------------------------------ the directory itself

def test_a_missing_state_dir_is_created_0700_parents_too(tmp_path):
    old = os.umask(0o022)
    try:
        d = tmp_path / "a" / "b" / "state"
        statedir.ensure(str(d))
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", d):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, p
        assert st.st_uid == os.getuid()
    statedir.ensure(str(d))  # a second time: fine
    statedir.ensure(str(tmp_path / "other"), create=False)  # status: a missing one is not made
    assert not os.path.exists(tmp_path / "other")


def _refused(d, match):
    with pytest.raises(statedir.StateDirError) as e:
        statedir.ensure(str(d))
    (line,) = e.value.lines()
    assert str(d) in line and match in line, line
    return line


def test_refused_world_writable_symlink_or_not_a_directory(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    _refused(d, "writable by group or others (mode 0777)")
    os.chmod(d, 0o770)
    _refused(d, "writable by group or others (mode 0770)")
    os.chmod(d, 0o755)
    statedir.ensure(str(d))  # readable by others is fine
    link = tmp_path / "link"
    link.symlink_to(d)
    _refused(link, "is a symlink")
    _refused(str(link) + "/", "is a symlink")
    f = tmp_path / "file"
    f.write_text("")
    _refused(f, "is not a directory")
    with pytest.raises(statedir.StateDirError, match="not an absolute path"):
        statedir.ensure("run/synlb")


def test_parents_must_be_roots_too(tmp_path):
    p = tmp_path / "p"
    p.mkdir(mode=0o755)
    d = p / "state"
    d.mkdir(mode=0o700)
    os.chmod(p, 0o777)  # anyone could rename state away and put their own there
    _refused(d, f"its parent {p} is writable by group or others")
    _refused(p / "missing", f"its parent {p} is writable")  # and nothing is created there
    assert not os.path.exists(p / "missing")
    os.chmod(p, 0o1777)  # sticky, like /tmp: others cannot rename root's entries
    statedir.ensure(str(d))
    os.chmod(p, 0o755)
    statedir.ensure(str(d))


@root_only
def test_refused_not_owned_by_root(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    _refused(d, f"is owned by uid {OTHER_UID}, not root")
    os.chown(d, 0, 0)
    statedir.ensure(str(d))
    p = tmp_path / "p"
    p.mkdir(mode=0o755)
    (p / "state").mkdir(mode=0o700)
    os.chown(p, OTHER_UID, OTHER_UID)
    _refused(p / "state", f"its parent {p} is owned by uid {OTHER_UID}")


def test_state_dir_error_is_a_user_error():
    assert issubclass(statedir.StateDirError, errors.UserError)


# ------------------------------------------------------------------ every command checks it first

def _bad_dirs(tmp_path, owners: bool = False):
    """(how, state dir) for each kind of state dir that must be refused
    (``owners``: a directory of another user too, which needs root)."""
    out = []
    ww = tmp_path / "world-writable"
    ww.mkdir()
    os.chmod(ww, 0o777)
    out.append(("world-writable", ww))
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "symlinked"
    link.symlink_to(real)
    out.append(("symlink", link))
    if owners:
        other = tmp_path / "not-roots"
        other.mkdir(mode=0o700)
        os.chown(other, OTHER_UID, OTHER_UID)
        out.append(("not root's", other))
    return out


def _forbid(monkeypatch, obj, name):
    def forbidden(*a, **k):
        raise AssertionError(f"{name} reached with a state dir that must be refused")
    monkeypatch.setattr(obj, name, forbidden)


@root_only
@pytest.mark.parametrize("argv", [["up"], ["status"], ["status", "--check"], ["down"], ["run"], ["notify", "GROUP", "G1", "MASTER", "0"],
                                  ["fifo", "/nonexistent.fifo"], ["dbus"], ["worker"]])
def test_every_command_refuses_a_bad_state_dir_with_one_line(tmp_path, monkeypatch, capsys, argv):
    for obj, name in ((dataplane, "up"), (dataplane, "down"), (dataplane, "up_locked"),
                      (dataplane, "down_locked"), (dataplane, "drift"), (status, "collect"), (host, "main"),
                      (delivery, "run_detached"), (vrrp_dbus, "connect"), (worker, "main")):
        _forbid(monkeypatch, obj, name)
    for how, d in _bad_dirs(tmp_path, owners=True):
        path = write_config(tmp_path, d)
        args = (["worker", f"--state-dir={d}", "--service=web", "--queue=0"] if argv == ["worker"]
                else ["-c", path, *argv])
        assert cli.main(args) == errors.EXIT_USER, (how, argv)
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (how, err)
        assert lines[0].startswith(f"synlb {argv[0]}: state_dir {d} ") and "refused" in lines[0], (how, err)
        assert out == ""


def test_the_vrrp_sources_refuse_it_when_loading_the_config(tmp_path):
    (how, d), *_ = _bad_dirs(tmp_path)
    path = write_config(tmp_path, d)
    with pytest.raises(statedir.StateDirError):
        delivery.load(path)
    with pytest.raises(statedir.StateDirError):
        delivery.deliver(path, VrrpEvent("notify", "GROUP", "G1", "MASTER", 0), (1, 1))
    assert os.listdir(d) == []  # nothing recorded, nothing logged


@pytest.mark.lab(tools=("unshare",))
def test_synlb_up_and_status_refuse_a_world_writable_state_dir(tmp_path):
    """The installed command: one line on stderr, exit 1, nothing done."""
    import subprocess
    import sys
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, 0o777)
    path = write_config(tmp_path, d)
    exe = os.path.join(os.path.dirname(sys.executable), "synlb")
    for command in ("up", "status"):
        # the config's ingress is lo and nothing is reached past the check; a
        # private network namespace all the same, should it ever be
        r = subprocess.run(["unshare", "--net", exe, "-c", path, command], capture_output=True, text=True,
                           timeout=30, check=False)
        assert r.returncode == 1, (command, r.stdout, r.stderr)
        assert r.stderr == (f"synlb {command}: state_dir {d} is writable by group or others (mode 0777): "
                            "refused (a state directory and its parents must be root's, writable by root "
                            "only; see [synlb] state_dir)\n"), r.stderr
        assert os.listdir(d) == []


# ------------------------------------------------------------------ what is read back

@pytest.fixture
def proc_sys(tmp_path, monkeypatch):
    """A stand-in /proc/sys (tmp/deep/er/proc/sys) holding the pickup
    sysctls, ip_forward, and a "hostname" two levels above it: where
    ``../../kernel/hostname`` would lead."""
    root = tmp_path / "deep" / "er" / "proc" / "sys"
    files = {}
    for name, value in [*((n, "0") for n in sysctl.PICKUP), ("net/ipv4/ip_forward", "0"),
                        ("kernel/hostname", "router")]:
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(value + "\n")
        files[name] = f
    escaped = tmp_path / "deep" / "er" / "kernel" / "hostname"
    escaped.parent.mkdir(parents=True)
    escaped.write_text("router\n")
    files["escaped"] = escaped
    monkeypatch.setattr(sysctl, "_path", lambda name: os.path.join(str(root), name))
    return files


def test_sysctl_restore_writes_only_the_two_pickup_sysctls(tmp_path, proc_sys, caplog):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    assert sysctl.activate(str(d)) == [f"sysctl {n.replace('/', '.')}=1" for n in sysctl.PICKUP]
    saved = json.loads((d / "sysctl-saved.json").read_text())
    assert saved == {n: "0" for n in sysctl.PICKUP}
    saved.update({"../../kernel/hostname": "pwned", "../../../../kernel/hostname": "pwned",
                  "net.ipv4.ip_forward": "1", "net/ipv4/ip_forward": "1", "kernel/hostname": "pwned",
                  "/etc/passwd": "x"})
    (d / "sysctl-saved.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.ERROR, logger="synlb.sysctl"):
        changes = sysctl.restore(str(d))
    assert changes == [f"sysctl {n.replace('/', '.')}=0" for n in sysctl.PICKUP]
    for name in sysctl.PICKUP:
        assert proc_sys[name].read_text().strip() == "0"
    assert proc_sys["net/ipv4/ip_forward"].read_text() == "0\n"
    assert proc_sys["kernel/hostname"].read_text() == "router\n"
    assert proc_sys["escaped"].read_text() == "router\n"
    refused = [r.getMessage() for r in caplog.records]
    for key in ("../../kernel/hostname", "net.ipv4.ip_forward", "net/ipv4/ip_forward", "/etc/passwd"):
        assert any(repr(key) in m and "not written" in m for m in refused), (key, refused)
    assert not (d / "sysctl-saved.json").exists()


@pytest.mark.parametrize("value", ["1\n0", "-1", "1; reboot", 1, None, ["1"], "", "1234"])
def test_sysctl_restore_writes_no_value_synlb_did_not_save(tmp_path, proc_sys, value, caplog):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    name = next(iter(sysctl.PICKUP))
    proc_sys[name].write_text("1\n")
    (d / "sysctl-saved.json").write_text(json.dumps({name: value}))
    with caplog.at_level(logging.ERROR, logger="synlb.sysctl"):
        assert sysctl.restore(str(d)) == []
    assert proc_sys[name].read_text() == "1\n"
    assert any("not written" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("saved", ["not json", "[1, 2]", '"x"'])
def test_sysctl_restore_of_a_broken_file_writes_nothing(tmp_path, proc_sys, saved, caplog):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "sysctl-saved.json").write_text(saved)
    with caplog.at_level(logging.ERROR, logger="synlb.sysctl"):
        assert sysctl.restore(str(d)) == []
    assert caplog.records and not (d / "sysctl-saved.json").exists()


def test_sysctl_write_refuses_any_other_name(proc_sys):
    with pytest.raises(ValueError):
        sysctl.write("net/ipv4/ip_forward", "1")
    assert proc_sys["net/ipv4/ip_forward"].read_text() == "0\n"


@pytest.fixture
def teardown_spy(monkeypatch):
    """``down`` with every kernel step replaced: which route protocol it
    would delete the routes of."""
    protocols = []

    class Routing:
        def __init__(self, proto):
            protocols.append(proto)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def reconcile(self, rules, routes):
            assert rules == set() and routes == set()
            return []

    monkeypatch.setattr(dataplane.routing, "Routing", Routing)
    monkeypatch.setattr(dataplane.netfilter, "remove_all", lambda state_dir: [])
    monkeypatch.setattr(dataplane.nft_apply, "remove", lambda state_dir: [])
    monkeypatch.setattr(dataplane.workers, "stop_all", lambda state_dir: [])
    monkeypatch.setattr(dataplane.sysctl, "restore", lambda state_dir: [])
    return protocols


@pytest.mark.parametrize("bad, why", [(186, "bgp"), (16, "dhcp"), (18, "keepalived"), (2, "within 5..255"),
                                      (0, "within"), (256, "within"), (-1, "within"), ("229", "within"),
                                      (True, "within"), (229.5, "within"), (None, "within"), ([229], "within")])
def test_a_bad_route_protocol_in_applied_json_is_refused(tmp_path, teardown_spy, caplog, bad, why):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "applied.json").write_text(json.dumps({"digest": "x", "route_protocol": bad}))
    with caplog.at_level(logging.ERROR, logger="synlb.dataplane"):
        dataplane.down(str(d), 229)
    assert teardown_spy == [229]  # the config's, never what the file says
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"route_protocol {bad!r} refused" in msg and why in msg and str(d / "applied.json") in msg, msg
    assert not (d / "applied.json").exists()


def test_a_good_route_protocol_in_applied_json_is_used(tmp_path, teardown_spy, caplog):
    """What up applied is what down removes, even after the config changed."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "applied.json").write_text(json.dumps({"digest": "x", "route_protocol": 230}))
    with caplog.at_level(logging.ERROR, logger="synlb.dataplane"):
        dataplane.down(str(d), 229)
    assert teardown_spy == [230] and not caplog.records
    dataplane.down(str(d), 229)  # nothing applied: the config's
    assert teardown_spy == [230, 229]


@pytest.mark.parametrize("content", ["[1]", '"x"', "not json"])
def test_applied_json_of_another_shape_counts_as_nothing_applied(tmp_path, teardown_spy, content):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "applied.json").write_text(content)
    assert dataplane.applied(str(d)) is None
    dataplane.down(str(d), 229)
    assert teardown_spy == [229]


def test_netfilter_state_of_another_shape_is_dropped(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "netfilter.json").write_text(json.dumps({"4": ["a", "b"], "6": ["a"], "tables_before_4": ["mangle", 3],
                                                  "tables_before_6": ["mangle"], "rules_4": ["-t mangle :x"],
                                                  "rules_6": "-t mangle :x", "other": 1}))
    assert netfilter._load_state(str(d)) == {"4": ["a", "b"], "tables_before_6": ["mangle"],
                                             "rules_4": ["-t mangle :x"]}
    (d / "netfilter.json").write_text("[]")
    assert netfilter._load_state(str(d)) == {}


@pytest.mark.parametrize("bad", [{"pid": 0}, {"pid": -1}, {"pid": 1}, {"queue": 1}, {"service": 5},
                                 {"digest": ["d"]}, None])
def test_a_pid_file_of_another_shape_names_no_worker(tmp_path, bad):
    """0 and -1 would signal a process group or every process; a pid file
    whose queue is not its name's is not that queue's worker."""
    me = psutil.Process()
    good = {"pid": me.pid, "service": "web", "queue": 0, "digest": "d", "started": me.create_time(),
            "exe": me.exe(), "uid": me.uids().real}
    (tmp_path / "worker-0.pid").write_text(json.dumps({**good, **bad} if bad is not None else [good]))
    assert workers.read(str(tmp_path), 0) is None
    assert workers.running(str(tmp_path)) == []
    assert not (tmp_path / "worker-0.pid").exists()
    (tmp_path / "worker-0.pid").write_text(json.dumps(good))
    assert workers.read(str(tmp_path), 0) == workers.WorkerInfo(**{**good, "state_dir": str(tmp_path)})


@pytest.mark.parametrize("stamp", [["a", "b"], [1], [1, 2, 3], [1.5, 2], "12", [True, 1]])
def test_a_vrrp_record_with_no_stamp_counts_as_none(tmp_path, stamp):
    """A record whose stamp cannot be compared with a new event's would make
    every later event fail; it counts as no record at all."""
    from synlb.vrrp import events
    vcfg = events.vrrp_config({"sync_group": "G1", "instance": None, "standby": "hot", "dbus_instances": ()})
    (tmp_path / "vrrp-state.json").write_text(json.dumps({
        "event": {"source": "notify", "kind": "GROUP", "name": "G1", "state": "MASTER", "priority": 0},
        "stamp": stamp, "boot_id": journal.boot_id(), "recorded": 0}))
    assert journal.read_state(str(tmp_path)) is None
    ev = VrrpEvent("notify", "GROUP", "G1", "BACKUP", 0)
    assert journal.record(str(tmp_path), vcfg, ev, (5, 1)) == (ev, True)
