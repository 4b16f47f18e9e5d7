"""A reconcile that fails is retried with backoff until it converges, with
no event needed to trigger it; status tells while it fails (the host's
loop with a plugin that fails twice; no kernel)."""

from __future__ import annotations

import threading

from synlb import config as config_mod
from synlb import host as host_mod
from synlb.plugins import Plugin


class Flaky(Plugin):
    name = "flaky"

    def __init__(self, host, failures: int):
        super().__init__(host)
        self.left = failures
        self.calls: list[str] = []
        self.done = threading.Event()

    def reconcile(self, cfg, node):
        self.calls.append(node.reason)
        if self.left:
            self.left -= 1
            raise OSError("iptables-restore: xtables lock held")
        self.done.set()
        return ["converged"]


def test_a_failed_reconcile_is_retried_until_it_converges(tmp_path):
    p = tmp_path / "synlb.ini"
    p.write_text(f"[synlb]\nstate_dir = {tmp_path / 'state'}\n[service:web]\nvips = 10.64.100.1/32\n"
                 "ingress = eth0\nprotocols = tcp\ntargets = a\n[target:a]\naddress = 10.1.0.1\n")
    h = host_mod.Host(str(p), config_mod.load(str(p)))
    flaky = Flaky(h, failures=2)
    h.plugins = [flaky]
    seen = []

    def watch():
        # while failing, status says so; once converged, stop the host
        while not flaky.done.wait(0.05):
            if h.failing:
                seen.append(h.handle_request({"cmd": "status"})["failing"])
        h.submit("stop")
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert h.run() == 0
    t.join(5)
    assert flaky.calls[0] == "start" and len(flaky.calls) == 3
    assert all(c.startswith("retry ") and "xtables lock held" in c for c in flaky.calls[1:])
    assert seen and seen[-1]["attempts"] == 2 and seen[-1]["errors"] == ["flaky: iptables-restore: xtables lock held"]
    assert h.failing is None
