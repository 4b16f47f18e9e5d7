"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
Software Network Load Balancer", NSDI 2016, section 3.4 and figure 3).

Every router of a cluster must build the same table from the same
configuration, in any process and on any machine, so nothing here depends on
Python's ``hash()`` (salted per process) or on dict ordering.  The whole
scheme, enough to reproduce a table in another language:

Permutation of a target ``name`` for a table of prime size ``M`` and a key
``K`` (bytes; only the first 64 bytes are used, BLAKE2b's key limit)::

    d      = BLAKE2b(data=UTF-8(name), key=K[:64], digest_size=16,
                     person=b"synlb-maglev")           # 16 bytes
    h1     = big-endian unsigned int of d[0:8]
    h2     = big-endian unsigned int of d[8:16]
    offset = h1 mod M
    skip   = (h2 mod (M - 1)) + 1                     # 1 .. M-1
    permutation[j] = (offset + j * skip) mod M        # j = 0 .. M-1

Because ``M`` is prime and ``1 <= skip < M``, each permutation visits every
slot exactly once.

Table population (paper, figure 3): targets take turns in the order given
(index 0, 1, ..., N-1, 0, 1, ...); on its turn a target walks its own
permutation from where it stopped last time, claims the first empty slot, and
resumes just after it next turn.  Population stops when all ``M`` slots are
full.  Slot values are indexes into the given ``names``.

Flow hash of a flow key (bytes, see ``packet.flow_key``)::

    h = big-endian unsigned int of
        BLAKE2b(data=flow_key, key=K[:64], digest_size=8, person=b"synlb-flow")

and the flow goes to ``names[table[h mod M]]``.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Sequence

MAX_KEY_BYTES = 64  # BLAKE2b rejects longer keys; longer keys are cut, not refused
PERMUTATION_PERSON = b"synlb-maglev"
FLOW_PERSON = b"synlb-flow"


def permutation_params(name: str, size: int, key: bytes) -> tuple[int, int]:
    """``(offset, skip)`` of ``name``'s permutation of a table of ``size``."""
    digest = blake2b(name.encode(), key=key[:MAX_KEY_BYTES], digest_size=16,
                     person=PERMUTATION_PERSON).digest()
    h1 = int.from_bytes(digest[:8], "big")
    h2 = int.from_bytes(digest[8:], "big")
    return h1 % size, h2 % (size - 1) + 1


def build_table(names: Sequence[str], size: int, key: bytes) -> list[int]:
    """The Maglev lookup table: ``size`` entries, each an index into ``names``.

    ``size`` must be prime: otherwise a skip sharing a factor with it walks
    only part of the table and population could loop forever.
    """
    if not names:
        return []
    _check_table_size(size)
    positions: list[int] = []  # where each target resumes its permutation
    skips: list[int] = []
    for name in names:
        offset, skip = permutation_params(name, size, key)
        positions.append(offset)
        skips.append(skip)
    return _populate(positions, skips, size)


def marks_per_slot(population: Sequence[tuple[str, int]], size: int, key: bytes) -> list[int]:
    """``build_table`` over the names of ``population`` ((name, mark), in the
    order every router uses), flattened to the mark of each slot; [] for none."""
    marks = [m for _, m in population]
    return [marks[i] for i in build_table([n for n, _ in population], size, key)]


def _populate(positions: list[int], skips: list[int], size: int) -> list[int]:
    # The paper's loop with next[i] replaced by the slot itself: stepping by
    # ``skip`` with a conditional subtraction is the cheapest way to walk
    # ``(offset + j * skip) mod size`` in pure Python. Most probes fall at
    # the end, when nearly every slot is taken (about size * ln(free) probes
    # for the last ``free`` slots), so the last few slots are handed out by
    # _endgame instead, with the same result.
    table = [-1] * size
    turns = list(range(len(skips)))
    empty = size
    endgame = max(1, size // (ENDGAME_FACTOR * len(skips)))
    while empty > endgame:
        for i in turns:
            slot = positions[i]
            skip = skips[i]
            while table[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = i
            slot += skip
            if slot >= size:
                slot -= size
            positions[i] = slot
            empty -= 1
            if not empty:
                return table
    return _endgame(table, positions, skips, size, empty)


# the endgame starts once at most size / (ENDGAME_FACTOR * targets) slots are
# free: it costs about targets * free * log(free), the probes it saves about
# size * ln(free) (measured best near 3)
ENDGAME_FACTOR = 3


def _endgame(table: list[int], positions: list[int], skips: list[int], size: int, empty: int) -> list[int]:
    """Finish the population at the start of a round, with ``empty`` slots left.

    Target ``i`` walks its permutation ``(offset + j * skip) % size`` in
    order of ``j`` and takes the first free slot. Every free slot is still
    ahead of each target's cursor (one behind it was seen taken, and slots
    never become free), so each target's next slot is the free slot with the
    smallest ``j`` not taken since: sort the free slots by ``j`` once per
    target, then play the same rounds, skipping what others took."""
    free = [s for s in range(size) if table[s] < 0]
    queues = []
    for i, skip in enumerate(skips):
        inverse = pow(skip, -1, size)
        here = positions[i]
        # steps from the cursor to each free slot along the permutation
        steps = [(s - here) * inverse % size for s in free]
        queues.append([s for _, s in sorted(zip(steps, free))])
    heads = [0] * len(skips)
    while True:
        for i, queue in enumerate(queues):
            k = heads[i]
            while table[queue[k]] >= 0:
                k += 1
            table[queue[k]] = i
            heads[i] = k + 1
            empty -= 1
            if not empty:
                return table


def _check_table_size(size: int) -> None:
    if not isinstance(size, int) or size < 2 or not is_prime(size):
        raise ValueError(f"Maglev table size must be a prime >= 2, not {size!r}")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:  # trial division: table sizes are small (~1e5..1e7)
        if n % f == 0:
            return False
        f += 2
    return True


def flow_hash(flow_key: bytes, key: bytes) -> int:
    """64-bit keyed hash of a flow key (see the module docstring)."""
    return int.from_bytes(
        blake2b(flow_key, key=key[:MAX_KEY_BYTES], digest_size=8,
                person=FLOW_PERSON).digest(), "big")


class Maglev:
    """A built table plus the flow hash: ``lookup(flow_key)`` -> target index.

    Build once per configuration, then call ``lookup`` per packet.
    """

    def __init__(self, names: Sequence[str], size: int, key: bytes):
        self.names = tuple(names)
        self.size = size
        self.key = key
        self.table = build_table(self.names, size, key)
        # A keyed BLAKE2b spends a whole compression on the key block; copying
        # a state that has already absorbed it is ~25% cheaper per lookup and
        # gives exactly flow_hash()'s value.
        self._keyed = blake2b(key=key[:MAX_KEY_BYTES], digest_size=8,
                              person=FLOW_PERSON)

    def slot(self, flow_key: bytes) -> int:
        """The flow's table slot: equal to ``flow_hash(flow_key, key) % size``."""
        h = self._keyed.copy()
        h.update(flow_key)
        return int.from_bytes(h.digest(), "big") % self.size

    def lookup(self, flow_key: bytes) -> int | None:
        """Index into ``names`` of the flow's target; None when there are no targets."""
        if not self.table:
            return None
        return self.table[self.slot(flow_key)]

    def __repr__(self) -> str:
        return f"Maglev({len(self.names)} targets, size={self.size})"
