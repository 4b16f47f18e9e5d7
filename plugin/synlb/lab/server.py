"""Target test server (asyncio), run in a target namespace by
``synlb-lab server --name t1 --port 80 --port 8080``.

Listens on every address of both families (the service VIP on ``lo``
included). The first request line selects the behaviour; every reply line
starts with the target name, so a client sees at once if a session moved:

``NAME``               -> ``<name>\\n``, then close.
``ECHO``               -> each line L sent afterwards is answered ``<name> L``.
``PUSH <interval>``    -> server sends ``<name> <seq> <unix time>`` every
                          interval seconds (server speaks first after idle).
``DOWN [<interval> [<chunk>]]``
                       -> stream of chunks ``<name> <seq> <time> xxx...\\n``
                          of ``chunk`` bytes (default 16384), one per
                          interval (0 = as fast as the peer reads).
``UP``                 -> client streams bytes; every 0.05 s in which bytes
                          arrived the server sends ``<name> ACK <total> <time>``.
anything else          -> ``<name> ERR unknown request``, then close.

Prints ``ready <name> <ports>`` on stdout once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time

FIRST_LINE_TIMEOUT = 30.0
ACK_PERIOD = 0.05
DEFAULT_CHUNK = 16384
MAX_CHUNK = 1 << 20


class TargetServer:
    def __init__(self, name: str, ports: list[int], *, quiet: bool = True):
        self.name = name
        self.ports = ports
        self.quiet = quiet
        self.nconn = 0

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"{time.time():.3f} {self.name} {msg}", file=sys.stderr, flush=True)

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.nconn += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            line = await asyncio.wait_for(reader.readline(), FIRST_LINE_TIMEOUT)
            words = line.decode("ascii", "replace").split()
            cmd = words[0].upper() if words else ""
            args = words[1:]
            if cmd == "NAME":
                writer.write(f"{self.name}\n".encode())
                await writer.drain()
            elif cmd == "ECHO":
                await self.echo(reader, writer)
            elif cmd == "PUSH":
                await self.push(writer, _float(args, 0, 1.0))
            elif cmd == "DOWN":
                chunk = int(_float(args, 1, DEFAULT_CHUNK))
                await self.down(writer, _float(args, 0, 0.0),
                                max(64, min(chunk, MAX_CHUNK)))
            elif cmd == "UP":
                await self.up(reader, writer)
            else:
                writer.write(f"{self.name} ERR unknown request\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError, OSError) as e:
            self.log(f"connection ended: {e!r}")
        finally:
            try:
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            except (ConnectionError, OSError, asyncio.TimeoutError):
                pass

    async def echo(self, reader, writer) -> None:
        prefix = self.name.encode() + b" "
        while True:
            line = await reader.readline()
            if not line:
                return
            if not line.endswith(b"\n"):
                line += b"\n"
            writer.write(prefix + line)
            await writer.drain()

    async def push(self, writer, interval: float) -> None:
        interval = max(0.001, interval)
        seq = 0
        while True:
            seq += 1
            writer.write(f"{self.name} {seq} {time.time():.6f}\n".encode())
            await writer.drain()
            await asyncio.sleep(interval)

    async def down(self, writer, interval: float, chunk: int) -> None:
        seq = 0
        while True:
            seq += 1
            head = f"{self.name} {seq} {time.time():.6f} ".encode()
            pad = max(0, chunk - len(head) - 1)
            writer.write(head + b"x" * pad + b"\n")
            await writer.drain()
            if interval > 0:
                await asyncio.sleep(interval)

    async def up(self, reader, writer) -> None:
        total = 0
        acked = 0
        eof = asyncio.Event()

        async def ack() -> None:
            nonlocal acked
            while not eof.is_set():
                await asyncio.sleep(ACK_PERIOD)
                if total != acked:
                    acked = total
                    writer.write(f"{self.name} ACK {total} {time.time():.6f}\n".encode())
                    await writer.drain()

        task = asyncio.create_task(ack())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                total += len(data)
        finally:
            eof.set()
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, ConnectionError, OSError):
                pass

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        servers = []
        for port in self.ports:
            # host=None: one socket per family on the wildcard address
            # (IPV6_V6ONLY set on the v6 one), so the VIP on lo is served too
            servers.append(await asyncio.start_server(
                self.handle, host=None, port=port, backlog=4096,
                reuse_address=True, limit=MAX_CHUNK * 2))
        print(f"ready {self.name} {' '.join(map(str, self.ports))}", flush=True)
        await stop.wait()
        for s in servers:
            s.close()
        # do not wait for open connections: sessions stay open forever
        self.log(f"stopping after {self.nconn} connections")


def _float(args: list[str], i: int, default: float) -> float:
    try:
        return float(args[i])
    except (IndexError, ValueError):
        return default


def main(name: str, ports: list[int], quiet: bool = True) -> int:
    asyncio.run(TargetServer(name, ports, quiet=quiet).serve())
    return 0
