"""The host's control socket is bounded: idle clients cannot pile up
threads, and no request can leave a client without an answer (a unix
socket in a temporary directory; no network)."""

from __future__ import annotations

import json
import socket
import threading
import time

from synlb import control


def server(tmp_path, handle=lambda req: {"ok": True, "echo": req}):
    srv = control.ControlServer(str(tmp_path / "control.sock"), handle)
    srv.server.client_timeout = 0.5
    srv.start()
    return srv


def ask(path: str, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        return json.loads(s.makefile("rb").readline())


def test_idle_clients_cost_a_bounded_number_of_threads(tmp_path):
    srv = server(tmp_path)
    base = threading.active_count()
    idle = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(srv.path)
            idle.append(s)
        time.sleep(0.2)
        assert threading.active_count() <= base + control.Bounded.max_clients
        # once the idle ones time out, a real request is answered
        deadline = time.monotonic() + 10
        while threading.active_count() > base and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ask(srv.path, b'{"cmd": "status"}\n') == {"ok": True, "echo": {"cmd": "status"}}
    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_bad_requests_get_an_answer(tmp_path):
    def broken(req):
        raise KeyError("bug")
    srv = server(tmp_path, broken)
    try:
        assert ask(srv.path, b"[" * 100_000 + b"\n") == {"ok": False, "error": "not a JSON object"}
        assert ask(srv.path, b"not json\n") == {"ok": False, "error": "not a JSON object"}
        assert ask(srv.path, b"[1]\n") == {"ok": False, "error": "not a JSON object"}
        assert ask(srv.path, b'{"cmd": "status"}\n') == {"ok": False, "error": "KeyError: 'bug'"}
    finally:
        srv.stop()


def test_metrics_scrapes_within_a_second_share_one_reading(fake):
    from synlb.plugins import metrics
    calls = []
    fake(metrics.Collector, "_collect", lambda self: iter([calls.append(1) or "family"]))
    c = metrics.Collector(plugin=None)
    assert [c.collect() for _ in range(50)] == [["family"]] * 50
    assert len(calls) == 1
    c._at -= metrics.CACHE_SECONDS
    c.collect()
    assert len(calls) == 2
