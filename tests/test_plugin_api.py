"""What the plugin API gives plugins besides the Plugin class (pure, no root)."""

from __future__ import annotations

import select
import threading

from synlb.plugins import Wakeup


def test_wakeup_wakes_its_thread_once_per_drain():
    w = Wakeup()
    try:
        assert select.select([w], [], [], 0)[0] == []
        for _ in range(100_000):  # far past a pipe's buffer: poke never blocks
            w.poke()
        assert select.select([w], [], [], 0)[0] == [w]
        w.drain()
        assert select.select([w], [], [], 0)[0] == []
        woke = []
        t = threading.Thread(target=lambda: woke.append(select.select([w], [], [], 10)[0]))
        t.start()
        w.poke()
        t.join(10)
        assert woke == [[w]]
    finally:
        w.close()
