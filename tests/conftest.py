"""What the test files share: the ``lab`` marker's skips, the labs
themselves with their "nothing left behind" check, and fakes that follow
the real signatures.

The ``lab`` marker. A test that needs root (network namespaces, real
processes, root-owned files), tools beyond Python or the network (the .deb
build) is marked ``lab``, optionally with the programs it runs::

    pytestmark = pytest.mark.lab(tools=("keepalived", "conntrack"))

``make unit`` leaves lab tests out (``-m 'not lab'``); ``make test`` runs
them. Without root, or without one of its tools on PATH, a lab test is
skipped here, with the reason, before any fixture runs: test files hold no
root or tool checks of their own. A test that is *not* marked lab and still
ends up skipped fails instead, so that nothing is silently left out of
``make unit``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil

import pytest

from synlb import config as config_mod

LAB_FIXTURES = ("open_lab", "open_module_lab")


# ---------------------------------------------------------------- the lab marker

def lab_tools(item) -> list[str]:
    tools: list[str] = []
    for mark in item.iter_markers("lab"):
        for t in mark.kwargs.get("tools", ()):
            if t not in tools:
                tools.append(t)
    return tools


def why_not_here(item) -> str | None:
    """Why this machine cannot run a lab test, or None."""
    if os.geteuid() != 0:
        return "lab test: needs root"
    missing = [t for t in lab_tools(item) if shutil.which(t) is None]
    if missing:
        return f"lab test: needs {', '.join(missing)} (not on PATH)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("lab") is None:
            used = [f for f in LAB_FIXTURES if f in getattr(item, "fixturenames", ())]
            if used:
                raise pytest.UsageError(f"{item.nodeid} uses {', '.join(used)} but is not marked lab")
            continue
        why = why_not_here(item)
        if why:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("lab") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid} was skipped ({reason}) but is not marked lab: mark a test that "
                        "needs root or tools `lab` (tests/conftest.py), so that `make unit` leaves it "
                        "out instead of skipping it silently")


# ---------------------------------------------------------------- labs

def assert_torn_down(lab, pids=None) -> None:
    """The lab is closed and left nothing: no namespace with its prefix, none
    of its processes (``pids``: every process it started), no lab directory."""
    from synlb_lab.netns import list_netns

    assert not [ns for ns in list_netns() if lab.prefix and ns.startswith(lab.prefix + "-")]
    assert lab.leftovers() == {"namespaces": [], "processes": []}
    pids = [t.proc.pid for t in lab.procs.items] if pids is None else pids
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert alive == [], f"processes left: {alive}"
    assert lab.keep_files or not os.path.exists(lab.dir)


class Labs:
    """Opens labs (``Lab`` by default, or another class such as ``EcmpLab``)
    and, at the end, closes them and checks that each left nothing behind."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._opened: list = []

    def __call__(self, cls=None, **kw):
        if cls is None:
            from synlb_lab.topology import Lab as cls
        lab = self._stack.enter_context(cls(**kw))
        self._opened.append(lab)
        return lab

    def close(self) -> None:
        self._stack.close()
        for lab in self._opened:
            assert_torn_down(lab)


@pytest.fixture
def open_lab():
    """``open_lab(cls=Lab, **kw)``: a lab for this test, closed after it, and
    nothing of it left behind (asserted)."""
    labs = Labs()
    yield labs
    labs.close()


@pytest.fixture(scope="module")
def open_module_lab():
    """``open_lab`` for a lab shared by the tests of one module."""
    labs = Labs()
    yield labs
    labs.close()


@pytest.fixture(name="assert_torn_down")
def assert_torn_down_fixture():
    """:func:`assert_torn_down`, for a lab a test opened and closed itself."""
    return assert_torn_down


# ---------------------------------------------------------------- fakes

def accepts_like(fake, real) -> list[str]:
    """What ``fake`` (a function, method or class) would refuse of the calls
    ``real`` accepts: every argument ``real`` takes, by position or by name,
    with the same optionality. [] when none."""
    f = inspect.signature(fake).parameters
    r = inspect.signature(real).parameters
    P = inspect.Parameter
    f_list = list(f.values())
    var_pos = any(p.kind is P.VAR_POSITIONAL for p in f_list)
    var_kw = any(p.kind is P.VAR_KEYWORD for p in f_list)
    problems = []
    for i, (name, p) in enumerate(r.items()):
        if p.kind is P.VAR_POSITIONAL:
            if not var_pos:
                problems.append(f"*{name}: the fake takes no *args")
            continue
        if p.kind is P.VAR_KEYWORD:
            if not var_kw:
                problems.append(f"**{name}: the fake takes no **kwargs")
            continue
        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            q = f_list[i] if i < len(f_list) else None
            positional = q is not None and q.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
            if p.kind is P.POSITIONAL_OR_KEYWORD and positional and q.name != name and not var_kw:
                problems.append(f"{name}: the fake calls argument {i} {q.name!r}")
                continue
            if not positional and not var_pos:
                problems.append(f"{name}: the fake takes no argument {i} by position")
                continue
            if p.kind is P.POSITIONAL_OR_KEYWORD and not positional and name not in f and not var_kw:
                problems.append(f"{name}: the fake takes no {name}=")
                continue
            q = q if positional else f.get(name)
        else:  # keyword-only
            q = f.get(name)
            if q is None or q.kind not in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD):
                if not var_kw:
                    problems.append(f"{name}: the fake takes no {name}=")
                continue
        if q is not None and p.default is not P.empty and q.default is P.empty \
                and q.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            problems.append(f"{name}: optional in the real, required by the fake")
    n_pos = sum(1 for p in r.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD))
    required = {q.name for i, q in enumerate(f_list) if q.default is P.empty
                and q.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
                and (i >= n_pos or q.kind is P.KEYWORD_ONLY)}  # the first n_pos are checked above
    for n in sorted(required - set(r)):
        problems.append(f"{n}: required by the fake, unknown to the real")
    return problems


@pytest.fixture
def fake(monkeypatch):
    """``fake(owner, "name", replacement)``: monkeypatch ``owner.name`` with a
    replacement that accepts every call the real one accepts (checked)."""
    originals: dict = {}  # a second fake of the same name is checked against the real one

    def install(owner, name, replacement):
        real = originals.setdefault((id(owner), name), getattr(owner, name))
        problems = accepts_like(replacement, real)
        assert not problems, f"fake {owner.__name__}.{name}: {problems}"
        monkeypatch.setattr(owner, name, replacement)
        return replacement
    return install


class FakeHost:
    """What a plugin sees of :class:`synlb.host.Host`: ``config_path``,
    ``cfg`` and ``submit()``, with Host.submit's signature
    (tests/test_fakes.py checks it). ``submitted``: (kind, data) per call,
    ``reason`` included in data; ``event`` is set on every submit."""

    def __init__(self, config_path: str):
        import threading

        self.config_path = config_path
        self.cfg = config_mod.load(config_path)
        self.submitted: list[tuple[str, dict]] = []
        self.event = threading.Event()

    def submit(self, kind: str, data: dict | None = None, *, reason: str | None = None,
               wait: bool = False, timeout: float = 30.0) -> bool | None:
        data = dict(data or {})
        if reason is not None:
            data["reason"] = reason
        self.submitted.append((kind, data))
        self.event.set()
        return True if wait else None

    def reasons(self, kind: str = "reconcile") -> list[str | None]:
        """The ``reason`` of every submitted event of ``kind``, in order."""
        return [d.get("reason") for k, d in self.submitted if k == kind]


@pytest.fixture(name="FakeHost")
def fake_host_class():
    """:class:`FakeHost`, the stand-in for synlb.host.Host that plugins get."""
    return FakeHost


@pytest.fixture(autouse=True)
def same_priority():
    """A test that runs a control-plane command in this process (cli.main)
    sets this thread's nice ([synlb] nice): put it back for the next test."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    yield
    if os.getpriority(os.PRIO_PROCESS, 0) != before:
        os.setpriority(os.PRIO_PROCESS, 0, before)
