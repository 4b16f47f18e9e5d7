"""A worker whose state dir is full (docs/RELIABILITY.md, full state dir):
it cannot publish its stats file, which is how its starter learns that it
holds the queue. It must leave the queue with one clear line and exit 1,
not die on an OSError traceback; and a stats file it cannot write at its
stop must not turn a clean stop into a traceback either. netfilterqueue is
replaced by a stand-in: no kernel, no root."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import types

import pytest

from synlb import config
from synlb.worker import Worker

INI = """[synlb]
state_dir = {state}
[service:web]
vips = 10.64.100.1/32
ingress = front
egress = back
protocols = tcp
ports = 80
targets = a, b
[target:a]
address = 10.64.2.11
[target:b]
address = 10.64.2.12
"""

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


@pytest.fixture
def fake_nfq(monkeypatch):
    """netfilterqueue stand-in: records calls; run() asks the worker to stop."""
    calls: list[str] = []
    r, w = os.pipe()

    class NetfilterQueue:
        worker = None

        def bind(self, *a, **kw):
            calls.append("bind")

        def get_fd(self):
            return r

        def run(self, block=True):
            calls.append("run")
            NetfilterQueue.worker.stop = True

        def unbind(self):
            calls.append("unbind")
    mod = types.SimpleNamespace(COPY_PACKET=2, NetfilterQueue=NetfilterQueue)
    monkeypatch.setitem(sys.modules, "netfilterqueue", mod)
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    yield NetfilterQueue, calls
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, h in saved.items():
        signal.signal(s, h)
    os.close(r)
    os.close(w)


def worker(tmp_path) -> Worker:
    p = tmp_path / "synlb.ini"
    p.write_text(INI.format(state=tmp_path / "state"))
    return Worker.from_config(config.load(str(p)), "web")


def enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_worker_that_cannot_publish_its_stats_leaves_the_queue(tmp_path, fake_nfq, monkeypatch, caplog):
    nfq, calls = fake_nfq
    w = worker(tmp_path)
    nfq.worker = w
    monkeypatch.setattr(w, "write_stats", enospc)
    with caplog.at_level(logging.ERROR, logger="synlb.worker"):
        assert w.run() == 1
    assert calls == ["bind", "unbind"]
    assert [r.getMessage() for r in caplog.records] == [
        f"queue 0: cannot write {w.stats_path()}: No space left on device; leaving the queue"]


def test_a_stats_file_that_cannot_be_written_at_the_stop_is_only_logged(tmp_path, fake_nfq, monkeypatch, caplog):
    nfq, calls = fake_nfq
    w = worker(tmp_path)
    nfq.worker = w
    real = w.write_stats
    n = {"calls": 0}

    def first_only():
        n["calls"] += 1
        if n["calls"] > 1:
            enospc()
        real()
    monkeypatch.setattr(w, "write_stats", first_only)
    with caplog.at_level(logging.WARNING, logger="synlb.worker"):
        assert w.run() == 0
    assert calls == ["bind", "run", "unbind"]
    assert any("stats not written" in r.getMessage() for r in caplog.records)
