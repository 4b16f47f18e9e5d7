"""Client driver, run in the client namespace by ``synlb-lab client ...``.
Prints one JSON document on stdout.

``conns``: N short connections (``NAME``), per-target counts and failures.

``udp``: N UDP flows (one socket, so one source port, each), ``rounds``
datagrams per flow, each answered by the target server: per-target counts
(by a flow's first answer), flows that got answers from two targets
(``moved``), datagrams lost.

``sessions``: N long sessions of one pattern, concurrently, for a fixed
duration. Per session: targets seen (in order), whether it survived, the
largest gap between successful exchanges, bytes moved. An "exchange" is:
echo - a reply to our line; push - a pushed line; down - a chunk; up - an
ack that shows progress. Gaps count from the moment the connection is
established and include the final stretch up to the end of the run.
A session survived if it never failed (error, EOF, bad reply) and its final
gap is at most ``stall`` seconds. Ends by itself after ``duration`` or on
SIGTERM/SIGINT (``"stopped": "signal"``); results are printed either way.

Besides the gap, each session reports ``max_delay``: the longest time data
was held up on its way, which is what a failover costs the session whatever
its own pauses (a gap also counts them: a push session's gap is at least
its interval). echo - reply received minus request sent; push, down - line
received minus the server's send time (the lab shares one clock); up - ack
received minus the write of the oldest bytes it newly covers (so it also
counts the server's ack period).
``last_ok_at``: when the session's last exchange happened, on the
monotonic clock, which the client shares with every process of the lab
(tests compare it with their own ``time.monotonic()`` to tell whether data
still flowed after an event).
A progress line ``{"event": "ready", ...}`` goes to stderr once every
session has had its first exchange (or failed).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

PATTERNS = ("echo", "push", "down", "up")
READ_LIMIT = 4 << 20


# ---------------------------------------------------------------- conns

async def _one_conn(host: str, port: int, timeout: float) -> tuple[str | None, str | None, int | None]:
    """(the target's name or None, the error or None, the client port)"""
    writer = None
    sport = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout)
        sport = writer.get_extra_info("sockname")[1]
        writer.write(b"NAME\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
        name = line.decode("ascii", "replace").strip()
        if not name:
            return None, "empty reply", sport
        return name, None, sport
    except asyncio.TimeoutError:
        return None, "timeout", sport
    except OSError as e:
        return None, type(e).__name__, sport
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass


async def run_conns(host: str, port: int, count: int, concurrency: int,
                    timeout: float, max_time: float) -> dict:
    sem = asyncio.Semaphore(max(1, concurrency))
    per_target: Counter = Counter()
    errors: Counter = Counter()
    order: list[str] = []
    ports: set[int] = set()
    t0 = time.monotonic()

    async def one() -> None:
        async with sem:
            name, err, sport = await _one_conn(host, port, timeout)
        if sport is not None:
            ports.add(sport)
        if name:
            per_target[name] += 1
            order.append(name)
        else:
            errors[err or "unknown"] += 1

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=max_time)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=2.0)
        errors["max_time"] += len(pending)
    ok = sum(per_target.values())
    return {
        "vip": host, "port": port, "count": count, "concurrency": concurrency,
        "ok": ok, "failed": count - ok,
        "per_target": dict(sorted(per_target.items())),
        "errors": dict(errors),
        "order": order,
        # fewer than count when the kernel gave a port twice (the first
        # connection's TIME_WAIT let it): one flow to conntrack
        "client_ports": len(ports),
        "elapsed": round(time.monotonic() - t0, 4),
    }


# ---------------------------------------------------------------- udp

class _UdpFlow(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.replies.put_nowait(exc)


async def _udp_flow(host: str, port: int, index: int, rounds: int, interval: float,
                    timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    targets: list[str] = []
    lost = 0
    error = None
    try:
        transport, proto = await loop.create_datagram_endpoint(_UdpFlow, remote_addr=(host, port),
                                                               family=family)
    except OSError as e:
        return {"index": index, "targets": [], "lost": rounds, "error": type(e).__name__, "sport": None}
    try:
        sport = transport.get_extra_info("sockname")[1]
        for seq in range(rounds):
            msg = f"{index} {seq}"
            transport.sendto(msg.encode())
            deadline = time.monotonic() + timeout
            while True:
                try:
                    got = await asyncio.wait_for(proto.replies.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    lost += 1
                    break
                if isinstance(got, Exception):
                    error = type(got).__name__
                    continue
                parts = got.split()
                if len(parts) >= 3 and parts[1:3] == msg.encode().split():
                    name = parts[0].decode("ascii", "replace")
                    if not targets or targets[-1] != name:
                        targets.append(name)
                    break  # a late answer to an earlier round is skipped
            if interval:
                await asyncio.sleep(interval)
    finally:
        transport.close()
    return {"index": index, "targets": targets, "lost": lost, "error": error, "sport": sport}


async def run_udp(host: str, port: int, count: int, rounds: int, concurrency: int, interval: float,
                  timeout: float, max_time: float) -> dict:
    sem = asyncio.Semaphore(max(1, concurrency))
    t0 = time.monotonic()

    async def one(i: int) -> dict:
        async with sem:
            return await _udp_flow(host, port, i, rounds, interval, timeout)

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=max_time)
    for t in pending:
        t.cancel()
    flows = [t.result() for t in done]
    per_target: Counter = Counter(f["targets"][0] for f in flows if f["targets"])
    return {
        "vip": host, "port": port, "count": count, "rounds": rounds,
        "ok": sum(1 for f in flows if f["targets"] and not f["lost"]),
        "answered": sum(1 for f in flows if f["targets"]),
        "moved": sum(1 for f in flows if len(set(f["targets"])) > 1),
        "lost": sum(f["lost"] for f in flows) + rounds * len(pending),
        "per_target": dict(sorted(per_target.items())),
        "errors": dict(Counter(f["error"] for f in flows if f["error"])),
        "flows": sorted(flows, key=lambda f: f["index"]),
        "elapsed": round(time.monotonic() - t0, 4),
    }


# ---------------------------------------------------------------- sessions

@dataclass
class Session:
    index: int
    targets: list[str] = field(default_factory=list)
    connected: bool = False
    alive: bool = False
    error: str | None = None
    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    max_gap: float = 0.0
    last_gap: float = 0.0
    max_delay: float = 0.0
    survived: bool = False
    moved: bool = False
    connect_time: float | None = None
    # internal
    _last_ok: float = 0.0

    def ok(self, name: str, delay: float | None = None) -> None:
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self._last_ok)
        if delay is not None:
            self.max_delay = max(self.max_delay, delay)
        self._last_ok = now
        self.exchanges += 1
        if not self.targets or self.targets[-1] != name:
            self.targets.append(name)

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.alive = False

    def finish(self, end: float, stall: float) -> dict:
        if self.connected:
            self.last_gap = end - self._last_ok
            self.max_gap = max(self.max_gap, self.last_gap)
        self.survived = bool(self.connected and self.alive and self.error is None
                             and self.exchanges > 0 and self.last_gap <= stall)
        self.moved = len(set(self.targets)) > 1
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for k in ("max_gap", "last_gap", "max_delay", "connect_time"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        d["last_ok_at"] = round(self._last_ok, 6) if self.exchanges else None
        return d


def _name_of(line: bytes) -> str:
    return line.split(b" ", 1)[0].decode("ascii", "replace").strip()


def _age(line: bytes, field: int) -> float | None:
    """Seconds since the wall-clock stamp in ``field`` of a server line."""
    parts = line.split(b" ", field + 1)
    try:
        return max(0.0, time.time() - float(parts[field]))
    except (IndexError, ValueError):
        return None


async def _session(s: Session, host: str, port: int, pattern: str,
                   interval: float, chunk: int, connect_timeout: float,
                   first: asyncio.Event) -> None:
    writer = None
    t0 = time.monotonic()
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=READ_LIMIT), connect_timeout)
        except asyncio.TimeoutError:
            s.fail("connect timeout")
            return
        except OSError as e:
            s.fail(f"connect: {type(e).__name__}")
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connected, s.alive = True, True
        s.connect_time = time.monotonic() - t0
        s._last_ok = time.monotonic()

        def got(name: str, delay: float | None) -> None:
            s.ok(name, delay)
            first.set()

        if pattern == "echo":
            writer.write(b"ECHO\n")
            seq = 0
            while True:
                seq += 1
                msg = f"{seq} {time.time():.6f}\n".encode()
                sent = time.monotonic()
                writer.write(msg)
                s.bytes_sent += len(msg)
                await writer.drain()
                line = await reader.readline()
                if not line:
                    s.fail("eof")
                    return
                s.bytes_received += len(line)
                parts = line.split()
                if len(parts) < 2 or parts[1] != str(seq).encode():
                    s.fail(f"bad reply {line[:60]!r}")
                    return
                got(_name_of(line), time.monotonic() - sent)
                await asyncio.sleep(interval)
        elif pattern == "push":
            req = f"PUSH {interval}\n".encode()
            writer.write(req)
            s.bytes_sent += len(req)
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    s.fail("eof")
                    return
                s.bytes_received += len(line)
                got(_name_of(line), _age(line, 2))
        elif pattern == "down":
            req = f"DOWN {interval} {chunk}\n".encode()
            writer.write(req)
            s.bytes_sent += len(req)
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    s.fail("eof")
                    return
                s.bytes_received += len(line)
                if line.endswith(b"\n"):
                    got(_name_of(line), _age(line, 2))
        elif pattern == "up":
            writer.write(b"UP\n")
            s.bytes_sent += 3
            await writer.drain()
            written: deque[tuple[int, float]] = deque()  # (bytes uploaded so far, write time)
            uploaded = 0

            async def ack_reader() -> None:
                while True:
                    line = await reader.readline()
                    if not line:
                        s.fail("eof")
                        return
                    s.bytes_received += len(line)
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] == b"ACK":
                        total, oldest = int(parts[2]), None
                        while written and written[0][0] <= total:
                            oldest = oldest or written[0][1]
                            written.popleft()
                        got(_name_of(line), None if oldest is None else time.monotonic() - oldest)

            acks = asyncio.create_task(ack_reader())
            block = b"u" * chunk
            try:
                while not acks.done():
                    writer.write(block)
                    s.bytes_sent += len(block)
                    uploaded += len(block)
                    written.append((uploaded, time.monotonic()))
                    await writer.drain()
                    await asyncio.sleep(interval)
                await acks
            finally:
                acks.cancel()
        else:
            s.fail(f"unknown pattern {pattern}")
    except asyncio.CancelledError:
        raise
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        s.fail(f"{type(e).__name__}: {e}")
    finally:
        if writer is not None:
            writer.close()
        if not s.connected or s.error:
            first.set()


async def run_sessions(host: str, port: int, pattern: str, count: int,
                       duration: float, interval: float, chunk: int,
                       stall: float, connect_timeout: float) -> dict:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped = {"by": "duration"}

    def on_signal() -> None:
        stopped["by"] = "signal"
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    sessions = [Session(i) for i in range(count)]
    firsts = [asyncio.Event() for _ in sessions]
    t_start = time.monotonic()
    tasks = [asyncio.create_task(_session(s, host, port, pattern, interval, chunk,
                                          connect_timeout, ev))
             for s, ev in zip(sessions, firsts)]

    async def ready_reporter() -> None:
        await asyncio.gather(*(ev.wait() for ev in firsts))
        info = {"event": "ready", "t": round(time.monotonic() - t_start, 4),
                "connected": sum(s.connected for s in sessions),
                "failed": sum(s.error is not None for s in sessions),
                "targets": dict(Counter(s.targets[0] for s in sessions if s.targets))}
        print(json.dumps(info), file=sys.stderr, flush=True)

    reporter = asyncio.create_task(ready_reporter())
    try:
        await asyncio.wait_for(stop.wait(), timeout=duration)
    except asyncio.TimeoutError:
        pass
    t_end = time.monotonic()
    for t in tasks + [reporter]:
        t.cancel()
    await asyncio.wait(tasks + [reporter], timeout=2.0)

    results = [s.finish(t_end, stall) for s in sessions]
    per_target: Counter = Counter()
    for r in results:
        if r["targets"]:
            per_target[r["targets"][0]] += 1
    errors = Counter(r["error"] for r in results if r["error"])
    return {
        "vip": host, "port": port, "pattern": pattern, "count": count,
        "duration": duration, "interval": interval, "stall": stall,
        "elapsed": round(t_end - t_start, 4), "stopped": stopped["by"],
        "summary": {
            "connected": sum(r["connected"] for r in results),
            "survived": sum(r["survived"] for r in results),
            "died": sum(not r["survived"] for r in results),
            "moved": sum(r["moved"] for r in results),
            "max_gap": max((r["max_gap"] for r in results), default=0.0),
            "max_delay": max((r["max_delay"] for r in results), default=0.0),
            "bytes_sent": sum(r["bytes_sent"] for r in results),
            "bytes_received": sum(r["bytes_received"] for r in results),
            "per_target": dict(sorted(per_target.items())),
            "errors": dict(errors),
        },
        "sessions": results,
    }


def main_conns(args) -> int:
    res = asyncio.run(run_conns(args.vip, args.port, args.count, args.concurrency,
                                args.timeout, args.max_time))
    print(json.dumps(res), flush=True)
    return 0


def main_udp(args) -> int:
    res = asyncio.run(run_udp(args.vip, args.port, args.count, args.rounds, args.concurrency,
                              args.interval, args.timeout, args.max_time))
    print(json.dumps(res), flush=True)
    return 0


def main_sessions(args) -> int:
    res = asyncio.run(run_sessions(args.vip, args.port, args.pattern, args.count,
                                   args.duration, args.interval, args.chunk,
                                   args.stall, args.connect_timeout))
    print(json.dumps(res), flush=True)
    return 0
