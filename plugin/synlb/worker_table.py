"""What one NFQUEUE worker serves: written by the data plane, read by the worker.

A worker never reads the INI files: a config edited but not reloaded, or
a reload the host refused, must never reach a worker, or it could pick a
target whose ip rule or DNAT the data plane never installed.  So the data
plane, under its lock and in the same pass that installs the rules and
routes, writes per queue the table the worker must serve
(``workers/worker-<queue>.table.json``: root's, mode 0640, group the
workers', as it holds hash_key) and signals the worker; the worker reads
only that file (and the pins file, see pins_state).

The table's ``targets`` are the active ones (configured, less those the
health checks took out) with their marks, sorted by name as every router
must hash over the same ordering: what a new connection follows.
``configured`` are every configured target with its mark, in the same
order: the table a connection picked up mid-stream follows when it has no
pin (pins.py), whatever this router's health view; ``target_marks`` are
their marks, the only ones a pin may name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from . import statedir
from .config import Config, Service
from .jhash import service_seed


class WorkerTableError(ValueError):
    """A table file that is missing or not what ``write`` writes."""


@dataclass(frozen=True)
class WorkerTable:
    service: str
    queue: int
    targets: tuple  # of (name, mark), the active targets, sorted by name
    target_marks: tuple  # every configured target's mark
    table_size: int
    hash_key: str
    no_target_verdict: str  # "drop" or "accept"
    copy_range: int
    queue_maxlen: int
    # "blake2b": the worker hashes the flow; "jhash": the kernel hands it the
    # slot as the packet's mark (nft_engine.py), ``seed`` the kernel's
    # (for a packet that came without one: see worker.py)
    flow_hash: str = "blake2b"
    seed: int = 0
    configured: tuple = ()  # of (name, mark), every configured target, sorted by name

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.targets]

    def to_json(self) -> dict:
        d = asdict(self)
        d["targets"] = [list(t) for t in self.targets]
        d["target_marks"] = list(self.target_marks)
        d["configured"] = [list(t) for t in self.configured]
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def build(cfg: Config, service: Service, queue: int, down: Iterable[str] = ()) -> WorkerTable:
    from .pins import active_targets
    active = active_targets(cfg, service, down)
    configured = active_targets(cfg, service)
    g = cfg.globals
    seed = service_seed(g.hash_key, service.name) if service.kernel_slots else 0
    return WorkerTable(service=service.name, queue=queue, targets=tuple((t.name, t.mark) for t in active),
                       target_marks=tuple(t.mark for t in cfg.targets_of(service)),
                       table_size=service.table_size, hash_key=g.hash_key,
                       no_target_verdict=service.no_target_verdict, copy_range=g.copy_range,
                       queue_maxlen=g.queue_maxlen, flow_hash=service.flow_hash, seed=seed,
                       configured=tuple((t.name, t.mark) for t in configured))


def from_json(d) -> WorkerTable:
    try:
        t = WorkerTable(service=d["service"], queue=d["queue"],
                        targets=tuple((n, m) for n, m in d["targets"]),
                        target_marks=tuple(d["target_marks"]), table_size=d["table_size"],
                        hash_key=d["hash_key"], no_target_verdict=d["no_target_verdict"],
                        copy_range=d["copy_range"], queue_maxlen=d["queue_maxlen"],
                        # tables written before flow_hash existed hashed with blake2b
                        flow_hash=d.get("flow_hash", "blake2b"), seed=d.get("seed", 0),
                        configured=tuple((n, m) for n, m in d["configured"]))
    except (KeyError, TypeError, ValueError) as e:
        raise WorkerTableError(f"not a worker table ({type(e).__name__}: {e})") from None
    ints = [t.queue, t.table_size, t.copy_range, t.queue_maxlen, t.seed, *t.target_marks,
            *(m for _, m in t.targets), *(m for _, m in t.configured)]
    if (not isinstance(t.service, str) or not isinstance(t.hash_key, str)
            or not all(isinstance(n, str) for n, _ in t.targets + t.configured)
            or set(t.targets) - set(t.configured) or {m for _, m in t.configured} != set(t.target_marks)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints)
            or t.no_target_verdict not in ("drop", "accept") or t.table_size < 2
            or t.flow_hash not in ("blake2b", "jhash")
            or not {m for _, m in t.targets} <= set(t.target_marks)):
        raise WorkerTableError("not a worker table (a field has the wrong type or value)")
    return t


def path(state_dir: str, queue: int) -> str:
    return statedir.worker_table(state_dir, queue)


def load(state_dir: str, queue: int) -> WorkerTable:
    p = path(state_dir, queue)
    try:
        data = statedir.read_json(p)
    except FileNotFoundError:
        raise WorkerTableError(f"{p}: no such file (the data plane writes it before starting a worker)") from None
    except ValueError as e:
        raise WorkerTableError(f"{p}: not JSON ({e})") from None
    try:
        return from_json(data)
    except WorkerTableError as e:
        raise WorkerTableError(f"{p}: {e}") from None


def write(state_dir: str, table: WorkerTable) -> None:
    """Replace the file atomically (a worker reads the old table or the new
    one): root's, readable by the workers' group only (it holds hash_key)."""
    statedir.write_json(path(state_dir, table.queue), table.to_json(), share=True)


def remove(state_dir: str, queue: int) -> None:
    statedir.remove(path(state_dir, queue))
