"""The benchmark's reference C NFQUEUE worker (``bench/cref/synlb-cref.c``).

Built at bench time with gcc against libnetfilter-queue and libb2, then run
in a lab router on a queue of its own, on the same mark table as synlb's
worker (written from synlb's Maglev), with the same hash, key and copy
range. The bench points the service's NFQUEUE rule at its queue for its
arm, so both workers serve the same connections on the same links, round
after round.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
from hashlib import blake2b

import psutil

from .netns import LabError

SOURCE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "bench", "cref", "synlb-cref.c"))
LIBS = ("libnetfilter_queue", "libb2")
BIND_TIMEOUT = 10.0


class CRefError(LabError):
    pass


def source() -> str:
    if not os.path.exists(SOURCE):
        raise CRefError(f"{SOURCE}: the C reference worker's source is missing (a source checkout is needed)")
    return SOURCE


def build(out_dir: str) -> str:
    """Compile the reference worker into ``out_dir``; its path."""
    for tool in ("gcc", "pkg-config"):
        if shutil.which(tool) is None:
            raise CRefError(f"{tool} is needed to build the C reference worker (packaging/apt-deps.txt)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", *LIBS], capture_output=True, text=True, timeout=30, check=False)
    if flags.returncode != 0:
        raise CRefError(f"pkg-config {' '.join(LIBS)}: {flags.stderr.strip()} (apt: libnetfilter-queue-dev libb2-dev)")
    exe = os.path.join(out_dir, "synlb-cref")
    cp = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe, source(), *flags.stdout.split()],
                        capture_output=True, text=True, timeout=120, check=False)
    if cp.returncode != 0:
        raise CRefError(f"gcc {SOURCE}: {cp.stderr.strip()[-500:]}")
    return exe


def write_inputs(out_dir: str, hash_key: str, marks: list[int]) -> tuple[str, str]:
    """The key file and the marks file (one little-endian uint32 per slot)."""
    key_path = os.path.join(out_dir, "key")
    marks_path = os.path.join(out_dir, "marks.bin")
    with open(key_path, "wb") as fh:
        fh.write(hash_key.encode())
    with open(marks_path, "wb") as fh:
        fh.write(struct.pack(f"<{len(marks)}I", *marks))
    return key_path, marks_path


def hash_of(exe: str, key_path: str, flow_key: bytes) -> int:
    cp = subprocess.run([exe, "--hash", key_path, flow_key.hex()], capture_output=True, text=True, timeout=10, check=False)
    if cp.returncode != 0:
        raise CRefError(f"{exe} --hash: exit {cp.returncode}: {cp.stderr.strip()}")
    return int(cp.stdout)


def python_hash(hash_key: str, flow_key: bytes) -> int:
    """What synlb's worker computes for ``flow_key`` (worker.MarkTable)."""
    from synlb.maglev import FLOW_PERSON, MAX_KEY_BYTES
    h = blake2b(key=hash_key.encode()[:MAX_KEY_BYTES], digest_size=8, person=FLOW_PERSON)
    h.update(flow_key)
    return int.from_bytes(h.digest(), "big")


class ReferenceWorker:
    """A benchmark worker process in a lab router, bound to ``queue``: it
    prints "bound" once the queue is bound and, stopped, one JSON line of
    counters (the C reference here, the Python floor in pyfloor.py)."""

    what = "reference worker"

    def __init__(self, lab, router: str, argv: list[str], name: str, queue: int):
        self.lab = lab
        self.queue = queue
        self.proc = lab.popen(router, argv, name=name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], BIND_TIMEOUT)
        line = self.proc.stdout.readline().strip() if ready else "(nothing)"  # EOF: it failed
        if line != "bound":
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.lab.stop_process(self.proc)
            raise CRefError(f"{self.what} on queue {queue} did not bind: {line!r} {err.strip()[-300:]}")
        self.ps = psutil.Process(self.proc.pid)  # `ip netns exec` execs: this is the worker itself

    def stop(self) -> dict:
        """Stop it; its counters."""
        self.lab.stop_process(self.proc)
        try:
            out = self.proc.stdout.read()
        except (OSError, ValueError):
            out = ""
        for line in reversed(out.splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return {}


class CRef(ReferenceWorker):
    """The C reference worker (bench/cref/synlb-cref.c)."""

    what = "C reference worker"

    def __init__(self, lab, router: str, exe: str, queue: int, key_path: str, marks_path: str,
                 copy_range: int, maxlen: int, slot_base: int | None = None):
        """``slot_base``: the worker of flow_hash = jhash, reading the slot
        from the packet's mark (``slot_base`` + slot) instead of hashing."""
        slots = ["--slot-base", hex(slot_base)] if slot_base is not None else []
        super().__init__(lab, router, [exe, "--queue", str(queue), "--marks", marks_path, "--key", key_path,
                                       "--copy-range", str(copy_range), "--maxlen", str(maxlen), *slots],
                         f"cref-{queue}", queue)


def marks_of(table) -> list[int]:
    """The slot -> mark list synlb's worker serves for a worker_table.WorkerTable."""
    from synlb.worker import MarkTable
    return list(MarkTable(table).marks)


def tempdir() -> str:
    return tempfile.mkdtemp(prefix="synlb-bench-cref-")
