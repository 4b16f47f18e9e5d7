"""Worker pid files: a stale one (dead pid, or a pid reused by another
program, even one whose command line looks like a worker's) is recognised."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from synlb import workers


def _pidfile(state_dir, queue, pid, service="web", **who):
    """What workers.start records for ``pid`` (its start time, executable, uid), or ``who``."""
    try:
        me = psutil.Process(pid)
        ident = {"started": me.create_time(), "exe": me.exe(), "uid": me.uids().real}
    except psutil.NoSuchProcess:
        ident = {"started": 0.0, "exe": "", "uid": 0}
    path = workers.pidfile(str(state_dir), queue)
    with open(path, "w") as fh:
        json.dump({"pid": pid, "service": service, "queue": queue, "digest": "d", **ident, **who}, fh)
    return path


def _past_exec(pid: int) -> None:
    """Until the process shows its command line (empty for a moment right
    after the exec, when only its identity can be checked)."""
    for _ in range(500):
        if psutil.Process(pid).cmdline():
            return
        time.sleep(0.01)
    raise AssertionError("the stand-in never showed its command line")


def test_dead_pid_is_stale(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    path = _pidfile(tmp_path, 0, p.pid)
    assert workers.running(str(tmp_path)) == []
    assert not os.path.exists(path)


def test_pid_of_another_program_is_stale(tmp_path):
    """A pid reused by something that is not this queue's worker is not trusted."""
    path = _pidfile(tmp_path, 3, os.getpid())
    assert workers.running(str(tmp_path)) == []
    assert not os.path.exists(path)


def test_live_worker_is_recognised(tmp_path):
    # a stand-in process whose command line is a worker's
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "worker",
                          "--service=web", "--queue=5"])
    try:
        _past_exec(p.pid)
        _pidfile(tmp_path, 5, p.pid)
        (w,) = workers.running(str(tmp_path))
        assert (w.pid, w.queue, w.service) == (p.pid, 5, "web")
        # the same process does not count as the worker of another queue
        _pidfile(tmp_path, 6, p.pid)
        assert [x.queue for x in workers.running(str(tmp_path))] == [5]
    finally:
        p.kill()
        p.wait()


def test_garbage_pid_file_is_removed(tmp_path):
    path = workers.pidfile(str(tmp_path), 1)
    with open(path, "w") as fh:
        fh.write("not json")
    assert workers.running(str(tmp_path)) == []
    assert not os.path.exists(path)


def test_a_pid_reused_by_a_look_alike_is_stale(tmp_path):
    """Same pid and a worker's command line, but not the process that was
    started (another start time, executable or owner): never signalled."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "worker",
                          "--service=web", "--queue=7"])
    try:
        _past_exec(p.pid)
        started = psutil.Process(p.pid).create_time()
        for who in ({"started": started - 5}, {"exe": "/usr/sbin/other"}, {"uid": 4242}):
            _pidfile(tmp_path, 7, p.pid, **who)
            assert workers.running(str(tmp_path)) == [], who
            ident = {"started": started, "exe": psutil.Process(p.pid).exe(), "uid": os.getuid(), **who}
            info = workers.WorkerInfo(pid=p.pid, service="web", queue=7, digest="d",
                                      state_dir=str(tmp_path), **ident)
            workers.stop(info)
            assert p.poll() is None, who  # not signalled
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ what a worker wrote

def _stats_dir(tmp_path):
    from synlb import statedir
    d = str(tmp_path / "state")
    statedir.ensure_workers(d)
    return d, statedir.worker_stats(d, 0)


def test_stats_a_worker_planted_are_not_followed_nor_trusted(tmp_path):
    """workers/run/ is the workers' own (docs/HARDENING.md): a compromised
    worker may put anything at its stats file's name. Root reads it as
    untrusted input: a symlink (to a root-only file that looks like stats)
    or a hard link is not followed, a FIFO does not block, a file too large
    or too deeply nested is not parsed, fields of the wrong type are not
    used; each reads as no stats at all."""
    from synlb import statedir
    d, stats = _stats_dir(tmp_path)
    good = {"pid": 4321, "queue": 0, "packets": 7}
    secret = tmp_path / "secret.json"  # e.g. a key file: root's, 0600
    secret.write_text(json.dumps(good))
    secret.chmod(0o600)

    def planted(make) -> dict:
        statedir.remove(stats)
        make()
        return workers.read_stats(d, 0)
    assert planted(lambda: open(stats, "w").write(json.dumps(good))) == good  # what a worker writes
    assert planted(lambda: os.symlink(secret, stats)) == {}
    assert planted(lambda: os.link(secret, stats)) == {}
    assert planted(lambda: os.mkfifo(stats)) == {}
    assert planted(lambda: os.mkdir(stats)) == {}
    os.rmdir(stats)
    assert planted(lambda: open(stats, "w").write(" " * statedir.UNTRUSTED_MAX + json.dumps(good))) == {}
    assert planted(lambda: open(stats, "w").write("[" * 100000 + "]" * 100000)) == {}
    for bad in ({"pid": "4321", "packets": 7}, {"pid": 4321, "packets": True}, {"pid": 4321},
                {"pid": 4321, "packets": -1}, [good], "x"):
        assert planted(lambda: open(stats, "w").write(json.dumps(bad))) == {}, bad
    info = workers.WorkerInfo(pid=4321, service="web", queue=0, digest="d", state_dir=d)
    assert not workers._published(d, info)  # (a str "4321" never matches the pid)
    statedir.remove(stats)
    os.symlink(secret, stats)
    assert not workers._published(d, info)


def test_a_worker_log_is_read_by_its_tail_only(tmp_path):
    """Why a worker died is the end of its log (what it wrote there: bounded)."""
    from synlb import statedir
    d, _ = _stats_dir(tmp_path)
    info = workers.WorkerInfo(pid=4321, service="web", queue=0, digest="d", state_dir=d)
    assert workers._log_tail(info) == "(no log)"
    with statedir.open_log(statedir.worker_log(d, 0)) as log:
        log.write(b"x" * (3 * workers.LOG_TAIL_BYTES) + b"\nfirst\nsecond\nthird: the end\n")
    assert workers._log_tail(info) == "first | second | third: the end"
    assert statedir.read_untrusted(statedir.worker_log(d, 0), 10, tail=True) == b": the end\n"


def test_the_launcher_is_setpriv_with_net_admin_alone(tmp_path):
    """A worker user other than root: the real path of a trusted setpriv, the
    user's ids, no other group, CAP_NET_ADMIN alone, no_new_privs; root: none."""
    import shutil
    ident = workers.Identity("_synlb", 999, 995)
    argv = workers.launcher(ident)
    assert argv == [os.path.realpath(shutil.which("setpriv", path=workers.SETPRIV_PATH)), "--reuid=999",
                    "--regid=995", "--clear-groups", "--inh-caps=-all,+net_admin",
                    "--ambient-caps=-all,+net_admin", "--bounding-set=-all,+net_admin", "--no-new-privs", "--"]
    assert workers.launcher(workers.Identity("root", 0, 0)) == []


def test_a_worker_user_removed_since_the_check_is_a_user_error(tmp_path):
    from synlb import config
    p = tmp_path / "synlb.ini"
    p.write_text(f"[synlb]\nstate_dir = {tmp_path}/state\n[service:web]\nvips = 192.0.2.1/32\ningress = lo\n"
                 "protocols = tcp\ntargets = a\n[target:a]\naddress = 198.51.100.1\n")
    cfg = config.load(str(p))
    assert workers.identity(cfg).user == "_synlb"
    gone = dataclasses.replace(cfg, globals=dataclasses.replace(cfg.globals, worker_user="no-such-user"))
    with pytest.raises(workers.WorkerError) as e:
        workers.identity(gone)
    assert str(e.value) == (f"{p}:synlb:worker_user: no user 'no-such-user' on this system "
                            "(the NFQUEUE workers run as it)")
