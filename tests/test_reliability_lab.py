"""The fast part of `make reliability` (docs/RELIABILITY.md), in the netns
lab: two routers with keepalived and `synlb run`, sessions running, then a
worker SIGKILL, config reloads, malformed packets (scapy), broken INI files
(check, up and SIGHUP), a short SYN flood, and the packet fuzz with a small
count. Every row must come out as expected."""

from __future__ import annotations

import os

import pytest

from synlb_lab import reliability
from synlb_lab.netns import list_netns

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def results():
    data = reliability.run(fast=True, fuzz_cases=20_000, out=print)
    prefix = data["meta"]["prefix"]
    assert prefix and not [ns for ns in list_netns() if ns.startswith(prefix + "-")]  # the lab is gone
    assert not os.path.exists(os.path.join("/run/synlb-lab", prefix))
    return {r["name"]: r for r in data["rows"]}


@pytest.mark.parametrize("name", [n for n, _, fast in reliability.SCENARIOS if fast] + ["packet_fuzz"])
def test_scenario(results, name):
    r = results[name]
    print(f"\n{r['title']}: {r['done']}\n  sessions {r.get('sessions')}\n  new {r.get('new')}\n"
          f"  recovery {r.get('recovery')}\n  " + "\n  ".join(r["notes"]))
    assert r["ok"], r
