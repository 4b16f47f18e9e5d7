"""Maglev table: balance, minimal disruption, determinism, known answers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synlb.maglev import Maglev, build_table, flow_hash, permutation_params

KEY = b"synlb-test-key"
# Primes used as table sizes; each test keeps N <= M / 100 as config enforces.
PRIMES = (1009, 5003, 65537)

target_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12)
keys = st.binary(min_size=0, max_size=80)  # > 64 exercises the cut to 64 bytes


def unique_sorted(names: list[str]) -> list[str]:
    return sorted(set(names))


def paper_build_table(names, size, key):
    """Figure 3 of the paper, transcribed literally (slow, for comparison)."""
    if not names:
        return []
    permutation = []
    for name in names:
        offset, skip = permutation_params(name, size, key)
        permutation.append([(offset + j * skip) % size for j in range(size)])
    next_ = [0] * len(names)
    entry = [-1] * size
    n = 0
    while True:
        for i in range(len(names)):
            c = permutation[i][next_[i]]
            while entry[c] >= 0:
                next_[i] += 1
                c = permutation[i][next_[i]]
            entry[c] = i
            next_[i] += 1
            n += 1
            if n == size:
                return entry


def table_digest(table: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, table)).encode()).hexdigest()


# -- known answers: a change of hash, person or population order breaks these


def test_known_answer_small_table():
    assert permutation_params("a", 13, b"synlb-known-answer") == (2, 5)
    assert permutation_params("b", 13, b"synlb-known-answer") == (6, 3)
    assert permutation_params("c", 13, b"synlb-known-answer") == (5, 1)
    # Worked by hand from the permutations above, round by round.
    assert build_table(["a", "b", "c"], 13, b"synlb-known-answer") == \
        [2, 1, 0, 0, 0, 2, 1, 0, 2, 1, 2, 1, 0]


def test_known_answer_hashes():
    assert permutation_params("a", 65537, b"synlb-known-answer") == (20990, 20469)
    flow = b"\x04\x06" + bytes(12)
    assert flow_hash(flow, b"synlb-known-answer") == 0xBB72B1D07770D599


# -- structure


def test_empty_names_give_empty_table():
    assert build_table([], 65537, KEY) == []
    m = Maglev([], 65537, KEY)
    assert m.table == []
    assert m.lookup(b"\x04\x06" + bytes(12)) is None


@pytest.mark.parametrize("size", [0, 1, 4, 65536, 1000])
def test_non_prime_size_is_refused(size):
    with pytest.raises(ValueError):
        build_table(["a"], size, KEY)


@settings(max_examples=60, deadline=None)
@given(st.lists(target_names, min_size=1, max_size=12), st.sampled_from((2, 3, 13, 101, 1009)), keys)
def test_matches_the_paper_loop_and_entries_are_valid(names, size, key):
    table = build_table(names, size, key)
    assert table == paper_build_table(names, size, key)
    assert len(table) == size
    assert all(0 <= e < len(names) for e in table)


@settings(max_examples=30, deadline=None)
@given(st.lists(target_names, min_size=1, max_size=50), st.binary(max_size=64), keys)
def test_lookup_is_table_at_flow_hash(names, flow, key):
    m = Maglev(names, 5003, key)
    assert m.lookup(flow) == m.table[flow_hash(flow, key) % 5003]


def test_long_key_is_cut_to_64_bytes():
    assert build_table(["a", "b"], 1009, b"k" * 64) == build_table(["a", "b"], 1009, b"k" * 64 + b"x")


# -- balance: every target within 1% of the ideal share when M >= 100 N


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_balance_within_one_percent(data):
    size = data.draw(st.sampled_from(PRIMES[:2]))
    names = unique_sorted(data.draw(st.lists(target_names, min_size=1, max_size=size // 100)))
    assert_balanced(build_table(names, size, data.draw(keys)), len(names), size)


@pytest.mark.parametrize("n", [1, 7, 100, 655])
def test_balance_within_one_percent_at_65537(n):
    names = [f"target{i:04d}" for i in range(n)]
    assert_balanced(build_table(names, 65537, KEY), n, 65537)


def assert_balanced(table, n, size):
    ideal = size / n
    counts = Counter(table)
    assert set(counts) == set(range(n)), "every target owns entries"
    for count in counts.values():
        assert ideal * 0.99 <= count <= ideal * 1.01


# -- disruption. Maglev promises exact balance, and little disruption on
# average only (paper, section 3.4; docs/DESIGN-NOTES.md#8): when a target
# leaves, all of its entries move, and a few of the others' move too. How
# many depends on how many targets share the table and on its size
# (measured on random names):
# - M = 65537 with 20..200 targets: every removal moved at most 0.8 % of the
#   others' entries (mean 0.35 % at 20, 0.57 % at 100; about 1.0 % at 400);
# - a few targets: the mean is lower (0.05 % at 3) but single removals spread
#   wide: 1.2 % (4 targets, the example below), 1.9 % (8), 2.7 % (3, one
#   hypothesis found against the 1 % bound this test used to apply to any N);
# - smaller tables move several percent (1009, 5003).
# So the per-removal bound is stated where it holds, and the few-target case
# by its mean and a documented outlier.

MANY_TARGETS = st.lists(target_names, min_size=20, max_size=100, unique=True)


@settings(max_examples=8, deadline=None)
@given(MANY_TARGETS, st.data())
def test_removing_a_target_moves_little_else(names, data):
    """M = 65537, 20..100 targets: removing one moves its own entries and at
    most 1 % of the others'."""
    names = sorted(names)
    removed = data.draw(st.sampled_from(names))
    assert moved_fraction(names, removed, 65537, KEY) <= 0.01


def test_removing_one_of_a_few_targets_moves_little_on_average():
    """M = 65537, 2..8 targets: no per-removal bound (the outlier below moves
    1.2 %), but over every removal of t1..tN the mean stays under 0.5 %."""
    fractions = []
    for n in (2, 3, 4, 6, 8):
        names = [f"t{i}" for i in range(1, n + 1)]
        fractions += [moved_fraction(names, removed, 65537, KEY) for removed in names]
    assert sum(fractions) / len(fractions) <= 0.005, fractions
    # a few-target removal that moves more than 1 % of the others' entries
    assert 0.01 < moved_fraction(["__version__", "a2v", "qcsp7teqauu4", "z1"], "z1", 65537, KEY) < 0.013


def moved_fraction(names, removed, size, key):
    rest = [n for n in names if n != removed]
    before = [names[i] for i in build_table(names, size, key)]
    after = [rest[i] for i in build_table(rest, size, key)]
    others = [(b, a) for b, a in zip(before, after) if b != removed]
    assert all(a != removed for a in after)
    return sum(b != a for b, a in others) / len(others)


# -- determinism across processes (Python's hash() is salted per process)


CHILD = """
import hashlib, sys
from synlb.maglev import build_table, flow_hash
t = build_table([f"t{i}" for i in range(37)], 5003, b"cross-process")
print(hashlib.sha256(",".join(map(str, t)).encode()).hexdigest(), flow_hash(b"abc", b"cross-process"))
"""


def test_same_table_in_separate_processes():
    expected = f"{table_digest(build_table([f't{i}' for i in range(37)], 5003, b'cross-process'))} " \
               f"{flow_hash(b'abc', b'cross-process')}"
    outputs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                              text=True, timeout=60, check=True)
        outputs.add(done.stdout.strip())
    assert outputs == {expected}


@pytest.mark.parametrize("n", [1, 2, 7, 100, 700])
def test_endgame_gives_the_loops_table_at_full_size(n, monkeypatch):
    """The last slots handed out by _endgame land exactly where the probing
    loop would have put them, wherever the endgame starts."""
    import synlb.maglev as maglev
    names = [f"t{i:03d}" for i in range(n)]
    got = {}
    for factor in (1, 3, 50, 10**9):  # 10**9: the endgame covers only the very last slot
        monkeypatch.setattr(maglev, "ENDGAME_FACTOR", factor)
        got[factor] = table_digest(build_table(names, 65537, KEY))
    assert len(set(got.values())) == 1, got
