"""conntrack.mark_filter: the kernel-side conntrack filter for synlb's marks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from synlb.config import AUTO_MARK_BASE, AUTO_MARK_SPAN, auto_mark
from synlb.conntrack import mark_filter


def _parse(flt: str) -> tuple[int, int]:
    value, mask = flt.split("/")
    return int(value, 16), int(mask, 16)


def test_auto_marks_share_their_base():
    marks = [auto_mark(f"t{i}") for i in range(50)]
    assert mark_filter(marks) is not None
    value, mask = _parse(mark_filter(marks))
    # every auto mark lies in [AUTO_MARK_BASE, +AUTO_MARK_SPAN): the filter is at least that narrow
    assert mask & AUTO_MARK_BASE == value and mask >= (0xFFFFFFFF & ~(AUTO_MARK_SPAN - 1))


def test_no_marks_or_no_common_bit_means_no_filter():
    assert mark_filter([]) is None
    assert mark_filter([0x1, 0x80000000]) is None


@given(st.lists(st.integers(1, 0xFFFFFFFF), min_size=1, max_size=40))
def test_filter_covers_every_mark_with_the_longest_common_prefix(marks):
    flt = mark_filter(marks)
    if flt is None:
        assert len({m >> 31 for m in marks}) == 2  # they differ in the top bit already
        return
    value, mask = _parse(flt)
    assert all(m & mask == value for m in marks)
    # one more bit of mask would exclude one of them
    longer = (mask >> 1) | 0x80000000
    assert longer == mask or any(m & longer != marks[0] & longer for m in marks)
