"""The host's control socket: a unix stream socket (mode 0600) in the state
dir; one JSON request line in, one JSON response line out."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading

from .errors import UserError

SOCKET_NAME = "control.sock"
TIMEOUT = 15.0


class HostRunning(UserError):
    """Another ``synlb run`` already listens on the state dir's control socket."""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class ControlServer:
    def __init__(self, path: str, handle):
        """``handle(request: dict) -> dict`` runs in the server's thread."""
        self.path = path

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline(1 << 20)
                try:
                    req = json.loads(line)
                    resp = handle(req) if isinstance(req, dict) else {"ok": False, "error": "not an object"}
                except ValueError:
                    resp = {"ok": False, "error": "not JSON"}
                self.wfile.write(json.dumps(resp).encode() + b"\n")

        if os.path.exists(path):
            if _alive(path):
                raise HostRunning(f"{path}: another synlb host is running (one host per state_dir)")
            os.unlink(path)  # stale: left by a host that died
        old = os.umask(0o177)
        try:
            self.server = socketserver.ThreadingUnixStreamServer(path, Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.server.daemon_threads = True
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
