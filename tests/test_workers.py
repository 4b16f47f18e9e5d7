"""Worker pid files: a stale one (dead pid, or a pid reused by another
program, even one whose command line looks like a worker's) is recognised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

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
                                      pidfile=workers.pidfile(str(tmp_path), 7), **ident)
            workers.stop(info)
            assert p.poll() is None, who  # not signalled
    finally:
        p.kill()
        p.wait()
