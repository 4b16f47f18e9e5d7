"""The host's control socket: a unix stream socket (mode 0600) in the state
dir; one JSON request line in, one JSON response line out."""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading

from .errors import UserError

log = logging.getLogger("synlb.control")

SOCKET_NAME = "control.sock"
TIMEOUT = 15.0


class HostRunning(UserError):
    """Another ``synlb run`` already listens on the state dir's control socket."""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class Bounded(socketserver.ThreadingMixIn):
    """A threading server that serves at most ``max_clients`` connections at
    once (more are closed at once) and gives each ``client_timeout`` seconds
    for every read and write: 200 idle clients must not cost 200 threads."""

    daemon_threads = True
    max_clients = 8
    client_timeout = 5.0

    def process_request(self, request, client_address):
        slots = self.__dict__.setdefault("_slots", threading.BoundedSemaphore(self.max_clients))
        if not slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            request.settimeout(self.client_timeout)
            super().process_request(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _UnixServer(Bounded, socketserver.UnixStreamServer):
    pass


class ControlServer:
    def __init__(self, path: str, handle):
        """``handle(request: dict) -> dict`` runs in the server's thread."""
        self.path = path

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    line = self.rfile.readline(1 << 20)
                except OSError:  # a client that sends nothing within the timeout
                    return
                try:
                    req = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: nested thousands deep
                    req = None
                if not isinstance(req, dict):
                    resp = {"ok": False, "error": "not a JSON object"}
                else:
                    try:
                        resp = handle(req)
                    except Exception as e:  # noqa: BLE001 - the client gets an answer, the log the bug
                        log.exception("control request %r failed", req.get("cmd"))
                        resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                try:
                    self.wfile.write(json.dumps(resp).encode() + b"\n")
                except OSError:
                    pass

        if os.path.exists(path):
            if _alive(path):
                raise HostRunning(f"{path}: another synlb host is running (one host per state_dir)")
            os.unlink(path)  # stale: left by a host that died
        old = os.umask(0o177)
        try:
            self.server = _UnixServer(path, Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _alive(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(path)
        return True
    except OSError:
        return False


def request(state_dir: str, req: dict, timeout: float = TIMEOUT) -> dict | None:
    """Send a request to the running host; None when no host listens."""
    path = socket_path(state_dir)
    if not os.path.exists(path):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (ConnectionRefusedError, FileNotFoundError):
        return None  # a socket file left by a host that is gone
    except OSError as e:
        return {"ok": False, "error": f"control socket {path}: {e.strerror or e}"}
    try:
        return json.loads(buf) if buf else {"ok": False, "error": "no answer from the host"}
    except ValueError:
        return {"ok": False, "error": "the host's answer is not JSON"}
