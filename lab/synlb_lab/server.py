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

UDP on the same ports: every datagram D is answered ``<name> D`` from the
address it was sent to (the VIP on ``lo``), through IP_PKTINFO.

Prints ``ready <name> <ports>`` on stdout once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time

FIRST_LINE_TIMEOUT = 30.0
IP_PKTINFO = 8  # Linux <linux/in.h>; not in Python's socket module
UDP_MAX = 2048
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

    def open_udp(self, port: int) -> list[socket.socket]:
        """Wildcard UDP sockets of both families that learn each datagram's
        destination, so a reply leaves from the VIP it was sent to."""
        socks = []
        for fam, bind in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            s.bind((bind, port))
            s.setblocking(False)
            socks.append(s)
        return socks

    def on_datagram(self, s: socket.socket) -> None:
        for _ in range(64):  # what is queued now, boundedly
            try:
                data, anc, _, addr = s.recvmsg(UDP_MAX, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log(f"udp: {e!r}")
                return
            reply = [self.name.encode() + b" " + data.rstrip(b"\n") + b"\n"]
            cmsg = []
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                    cmsg = [(level, kind, bytes(4) + value[8:12] + bytes(4))]  # ifindex, spec_dst, addr
                elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(value) >= 20:
                    cmsg = [(level, kind, value[:16] + bytes(4))]  # source address, any interface
            try:
                s.sendmsg(reply, cmsg, 0, addr)
            except OSError as e:
                self.log(f"udp reply to {addr}: {e!r}")

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
        udp = [u for port in self.ports for u in self.open_udp(port)]
        for u in udp:
            loop.add_reader(u.fileno(), self.on_datagram, u)
        print(f"ready {self.name} {' '.join(map(str, self.ports))}", flush=True)
        await stop.wait()
        for s in servers:
            s.close()
        for u in udp:
            loop.remove_reader(u.fileno())
            u.close()
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
