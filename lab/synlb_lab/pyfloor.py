"""The benchmark's Python floor: the least a netfilterqueue worker can do.

A Python process bound to a queue of its own through netfilterqueue, as
synlb's worker is, whose callback reads the packet and picks a mark from
the same mark table by the client's port (no flow key, no hash), then
sets it and accepts. Whatever CPU per connection it costs above the C
reference worker is the price of netfilterqueue and the interpreter, which
no Python worker can go below; synlb's worker minus this floor is what its
own code costs.
"""

from __future__ import annotations

import sys

from .cref import ReferenceWorker

FLOOR = r"""
import json, signal, struct, sys
from netfilterqueue import COPY_PACKET, NetfilterQueue
queue, copy_range, maxlen, marks_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(marks_path, "rb") as fh:
    data = fh.read()
marks = list(struct.unpack(f"<{len(data) // 4}I", data))
size = len(marks)
count = [0]
def on_packet(pkt):
    p = pkt.get_payload()
    pkt.set_mark(marks[(p[20] << 8 | p[21]) % size])  # the client's port (IPv4 without options)
    pkt.accept()
    count[0] += 1
def on_term(signum, frame):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, on_term)
nfq = NetfilterQueue()
nfq.bind(queue, on_packet, max_len=maxlen, mode=COPY_PACKET, range=copy_range)
print("bound", flush=True)
try:
    nfq.run(block=True)
finally:
    nfq.unbind()
    print(json.dumps({"packets": count[0]}), flush=True)
"""


class PyFloor(ReferenceWorker):
    """The floor worker running in a lab router, bound to ``queue``."""

    what = "Python floor worker"

    def __init__(self, lab, router: str, queue: int, marks_path: str, copy_range: int, maxlen: int):
        super().__init__(lab, router, [sys.executable, "-c", FLOOR, str(queue), str(copy_range), str(maxlen),
                                       marks_path], f"pyfloor-{queue}", queue)
