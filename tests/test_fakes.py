"""The test suite's own rules: fakes follow the real signatures, and root or
tool checks live in tests/conftest.py only (pure, no root)."""

from __future__ import annotations

import ast
import pathlib

import pytest

from conftest import accepts_like
from synlb import config as config_mod
from synlb.host import Host

TESTS = pathlib.Path(__file__).parent


def test_fake_host_submit_has_host_submits_signature(FakeHost):
    assert accepts_like(FakeHost.submit, Host.submit) == []
    assert accepts_like(Host.submit, FakeHost.submit) == []  # and no more


def test_fake_host_takes_every_call_plugins_make(tmp_path, FakeHost):
    path = tmp_path / "synlb.ini"
    path.write_text("[service:web]\nvips = 192.0.2.1/32\ningress = lo\nprotocols = tcp\ntargets = a\n"
                    "[target:a]\naddress = 198.51.100.1\n")
    host = FakeHost(str(path))
    host.submit("reconcile", reason="health: a down")
    host.submit("vrrp", {"state": "MASTER"}, wait=True, timeout=1.0)
    host.submit("reload", wait=True)
    assert host.submitted == [("reconcile", {"reason": "health: a down"}), ("vrrp", {"state": "MASTER"}),
                              ("reload", {})]
    assert host.reasons() == ["health: a down"]


def test_a_real_host_has_what_the_metrics_view_fakes(tmp_path):
    from test_plugins_metrics import HostView

    path = tmp_path / "synlb.ini"
    path.write_text(f"[synlb]\nstate_dir = {tmp_path}/state\nplugins = scripts\n[scripts]\ndir = {tmp_path}/s\n"
                    "[service:web]\nvips = 192.0.2.1/32\ningress = lo\nprotocols = tcp\ntargets = a\n"
                    "[target:a]\naddress = 198.51.100.1\n")
    host = Host(str(path), config_mod.load(str(path)))  # builds its plugins, starts nothing
    assert [a for a in HostView.ATTRIBUTES if not hasattr(host, a)] == []


def real(a, b=1, *, c=None):
    pass


@pytest.mark.parametrize("fake, problems", [
    (lambda a, b=1, *, c=None: None, []),
    (lambda *args, **kwargs: None, []),
    (lambda a, b=1, c=None: None, []),
    (lambda x, b=1, *, c=None: None, ["a: the fake calls argument 0 'x'"]),
    (lambda a, b, *, c=None: None, ["b: optional in the real, required by the fake"]),
    (lambda a, b=1: None, ["c: the fake takes no c="]),
    (lambda a, *, c=None: None, ["b: the fake takes no argument 1 by position"]),
    (lambda a, b=1, *, c=None, d: None, ["d: required by the fake, unknown to the real"]),
])
def test_accepts_like(fake, problems):
    assert accepts_like(fake, real) == problems


def _calls(tree: ast.AST, names: set[str]) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            out.append(f"{node.attr} (line {node.lineno})")
    return out


def test_root_and_tool_skips_live_in_conftest():
    """No test file asks for root or skips by itself: it marks its tests `lab`
    (with their tools), and tests/conftest.py skips them with the reason."""
    found = {}
    for path in sorted(TESTS.glob("test_*.py")):
        got = _calls(ast.parse(path.read_text()), {"geteuid", "skipif", "skip", "importorskip"})
        if got:
            found[path.name] = got
    assert found == {}
