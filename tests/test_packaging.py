"""The Debian packages (`make deb`: synlb, and python3-netfilterqueue for
Debian 12), built from this checkout, installed on this machine with
apt-get and run with Debian's own python3 and libraries: a failover in the
netns lab through the installed /usr/bin/synlb and keepalived hook, an
upgrade that keeps an edited conffile, a purge that leaves nothing behind.

apt-get and dpkg run inside a lab router's network namespace, so whatever
the maintainer scripts do to the kernel (postinst's check, prerm's `synlb
down`) happens there and is compared with that namespace as it was before;
the root namespace's network configuration is never touched. The packages
are built once per session (a module fixture); everything installed is
purged at the end, whatever failed.

The first tests need neither root nor a package: `synlb check` on an
unconfigured file, the host's systemd readiness, the man pages.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from synlb import config as config_mod
from synlb import errors
from synlb import host as host_mod
from synlb.plugins import Plugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNLB_VENV = os.path.join(os.path.dirname(sys.executable), "synlb")
DIST = os.path.join(ROOT, "dist")
BIN = "/usr/bin/synlb"
HOOK = "/usr/lib/synlb/keepalived-notify"
CONF = "/etc/synlb/synlb.ini"
PACKAGES = ("synlb", "python3-netfilterqueue")
UPGRADE_SUFFIX = "+upgrade1"  # the same code, rebuilt with a higher version

# root, the build dependencies (make deps), and the machine's dpkg database
lab = pytest.mark.lab(tools=("dpkg-buildpackage", "lintian", "apt-get"))


# ---------------------------------------------------------------- no kernel, no package

def synlb_check(path: str):
    return subprocess.run([SYNLB_VENV, "-c", path, "check"], capture_output=True, text=True, timeout=60)


def test_check_says_nothing_configured_with_its_own_exit_code(tmp_path):
    """A file without any service (the shipped one) is not an error: check
    says so, exit 3; a real problem still exits 1, a valid file 0 (and warns
    about the shipped hash_key without --live)."""
    empty = tmp_path / "synlb.ini"
    empty.write_text("[synlb]\n#hash_key = synlb-maglev-v1\n")
    r = synlb_check(str(empty))
    assert r.returncode == errors.EXIT_UNCONFIGURED == 3, r.stdout + r.stderr
    assert r.stdout == (f"{empty}: nothing configured: no [service:NAME] section, so synlb balances nothing "
                        "(exit 3); see synlb.ini(5)\n") and r.stderr == ""
    (tmp_path / "bad.ini").write_text("[synlb]\nrule_priority = 0\n")
    r = synlb_check(str(tmp_path / "bad.ini"))
    assert r.returncode == 1 and ":synlb:rule_priority:" in r.stderr, r.stdout + r.stderr
    good = tmp_path / "good.ini"
    good.write_text("[service:web]\nvips = 192.0.2.1/32\ningress = eth0\nprotocols = tcp\ntargets = a\n"
                    "[target:a]\naddress = 198.51.100.1\n")
    r = synlb_check(str(good))
    assert r.returncode == 0 and r.stdout.startswith(f"{good}: OK"), r.stderr
    assert r.stderr.startswith(f"warning: {good}:synlb:hash_key: the shipped key is public"), r.stderr


def test_sd_notify_sends_one_datagram_to_notify_socket(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert host_mod.sd_notify("READY=1") is False  # not under systemd: nothing to do
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert host_mod.sd_notify("READY=1") is True
        assert srv.recv(4096) == b"READY=1"
    # the abstract namespace ("@name"), as systemd may pass it
    name = f"synlb-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert host_mod.sd_notify("STOPPING=1") is True
        assert srv.recv(4096) == b"STOPPING=1"
    # nobody listening any more, or not a unix socket: reported, never raised
    assert host_mod.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert host_mod.sd_notify("READY=1") is False


class _Flaky(Plugin):
    """Fails its first reconcile, converges on the retry; records, at each
    reconcile, what the notify socket had received until then."""

    name = "flaky"

    def __init__(self, host, sock):
        super().__init__(host)
        self.sock = sock
        self.seen: list[tuple[str, list[bytes]]] = []
        self.done = threading.Event()

    def reconcile(self, cfg, node):
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(self.sock.recv(4096))
        self.seen.append((node.reason, got))
        if len(self.seen) == 1:
            raise OSError("iptables-restore: xtables lock held")
        if len(self.seen) == 3:
            self.done.set()
        return []


def test_host_is_ready_once_the_data_plane_is_reconciled(tmp_path, monkeypatch):
    """Type=notify: READY=1 after the first reconcile that converged (not
    after the failed one before it), once; STOPPING=1 when the host stops."""
    p = tmp_path / "synlb.ini"
    p.write_text(f"[synlb]\nstate_dir = {tmp_path / 'state'}\n[service:web]\nvips = 10.64.100.1/32\n"
                 "ingress = eth0\nprotocols = tcp\ntargets = a\n[target:a]\naddress = 10.1.0.1\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(tmp_path / "notify"))
        srv.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        h = host_mod.Host(str(p), config_mod.load(str(p)))
        flaky = _Flaky(h, srv)
        h.plugins = [flaky]

        def drive():
            deadline = time.monotonic() + 10
            while len(flaky.seen) < 2 and time.monotonic() < deadline:  # failed, then the retry
                time.sleep(0.02)
            h.submit("reconcile", reason="again")
            flaky.done.wait(10)
            h.submit("stop")
        t = threading.Thread(target=drive, daemon=True)
        t.start()
        assert h.run() == 0
        t.join(10)
        srv.settimeout(5)
        after = srv.recv(4096)
    assert [(reason.split(" ")[0], got) for reason, got in flaky.seen] == [
        ("start", []), ("retry", []), ("again", [b"READY=1"])]
    assert after == b"STOPPING=1" and h.ready


def _mkman(tmp_path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "plugin"), "SOURCE_DATE_EPOCH": "0"}
    subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "man", "mkman.py"), "--version", "9.9",
                    str(tmp_path)], check=True, env=env, timeout=60)
    return {name: (tmp_path / name).read_text() for name in ("synlb.8", "synlb.ini.5")}


@pytest.mark.lab(tools=("groff",))
def test_man_pages_come_from_the_parser_and_the_schemas(tmp_path):
    """Every command, option and INI key is in the pages (generated, so they
    cannot drift), groff renders them without a warning, and the example in
    synlb.ini(5) is a valid configuration."""
    from synlb import cli
    pages = _mkman(tmp_path)
    for name, text in pages.items():
        r = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8"], input=text, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "LC_ALL": "C.UTF-8"})
        assert r.returncode == 0 and not r.stderr, (name, r.stderr)
    plain = {k: v.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")
             for k, v in pages.items()}
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for ca in sub._choices_actions:
        assert f".SS synlb {ca.dest}" in plain["synlb.8"], ca.dest
        for a in sub.choices[ca.dest]._actions:
            for opt in a.option_strings if a.dest != "help" else ():
                assert opt in plain["synlb.8"], (ca.dest, opt)
    assert ".SS synlb worker" not in plain["synlb.8"]  # internal
    assert re.search(r"^\.TP\n3\n.*nothing is configured", plain["synlb.8"], re.M)
    for kind, (sch, _) in config_mod.SECTION_KINDS.items():
        for opt in sch:
            assert f"\n{opt.name} = " in plain["synlb.ini.5"], (kind, opt.name)
    for key in ("check_interval", "key_file", "listen", "timeout"):  # plugins' keys and sections
        assert f"\n{key} = " in plain["synlb.ini.5"], key
    sys.path.insert(0, os.path.join(ROOT, "packaging", "man"))
    try:
        import mkman
    finally:
        sys.path.pop(0)
    (tmp_path / "example.ini").write_text(mkman.INI_EXAMPLE)
    cfg = config_mod.load(str(tmp_path / "example.ini"))
    assert [s.name for s in cfg.services] == ["web"] and cfg.vrrp is not None


# ---------------------------------------------------------------- the packages (root)

def _out(msg: str, config) -> None:
    """Straight to the test log, captured or not (the build's and lintian's output)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print(msg, flush=True)


def _make(config, *args: str) -> str:
    t0 = time.monotonic()
    r = subprocess.run(["make", "-C", ROOT, *args], capture_output=True, text=True, timeout=900)
    _out(f"\n$ make {' '.join(args)}   ({time.monotonic() - t0:.0f} s)\n{r.stdout}{r.stderr}", config)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def built(pytestconfig):
    """`make deb` (both packages into dist/), once; its output, lintian's
    included, goes to the test log."""
    for f in glob.glob(os.path.join(DIST, "*")):
        if re.search(r"/(synlb|python3?-netfilterqueue)[_-]", f):
            os.unlink(f)
    status = _git_status()
    out = _make(pytestconfig, "deb")
    debs = {name: glob.glob(os.path.join(DIST, f"{name}_*.deb")) for name in PACKAGES}
    assert all(len(v) == 1 for v in debs.values()), debs
    return {"out": out, "debs": {k: v[0] for k, v in debs.items()}, "git_status": status}


def _git_status() -> list[str]:
    """The checkout's changed, untracked and ignored files, dist/ aside."""
    out = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--ignored"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(ln for ln in out.splitlines() if not ln[3:].startswith(("dist/", ".venv/"))
                  and "__pycache__" not in ln and ".hypothesis" not in ln)


@pytest.fixture(scope="module")
def upgrade_deb(pytestconfig, tmp_path_factory, built):
    """synlb from the same sources, rebuilt with a higher Debian version."""
    version = _deb_field(built["debs"]["synlb"], "Version") + UPGRADE_SUFFIX
    d = tmp_path_factory.mktemp("upgrade")
    _make(pytestconfig, "deb-synlb", f"DIST={d}", f"SYNLB_DEB_VERSION={version}")
    (deb,) = glob.glob(os.path.join(d, "synlb_*.deb"))
    return deb, version


def _deb_field(deb: str, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True,
                          check=True).stdout.strip()


def _installed(pkg: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}|${Version}", pkg],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    status, _, version = r.stdout.partition("|")
    return version if status.strip() not in ("un", "pn", "") else None


def _all_installed() -> set[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\n"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("ii")}


class Apt:
    """apt-get and dpkg in the network namespace of ``lab``'s router lb1."""

    ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def __init__(self, lab):
        self.lab = lab

    def __call__(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        r = self.lab.run("lb1", ["env", *[f"{k}={v}" for k, v in self.ENV.items()], *argv],
                         check=False, timeout=600)
        if check:
            assert r.returncode == 0, f"{argv}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r

    def get(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self(*(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", "-o", "DPkg::Lock::Timeout=300"]
                      + list(args)), check=check)


@pytest.fixture(scope="module")
def pkglab():
    """A one-router lab whose lb1 is where the maintainer scripts run."""
    from synlb_lab.topology import Lab
    with Lab(routers=1, targets=1, servers=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def installed(pytestconfig, built, pkglab):
    """`apt-get install ./dist/*.deb` (in lb1's network namespace); on the
    way out, whatever happened, both packages are purged again."""
    from synlb_lab.scenario import kernel_snapshot
    for pkg in PACKAGES:
        if _installed(pkg):
            pytest.fail(f"{pkg} is installed on this machine already: these tests install and purge "
                        "it; remove it first")
    # the installed synlb must run on Debian's python3 and libraries alone
    saved = {k: os.environ.pop(k) for k in ("PYTHONPATH", "PYTHONHOME") if k in os.environ}
    apt = Apt(pkglab)
    state = {"apt": apt, "kernel_before": kernel_snapshot(pkglab, "lb1"), "packages_before": _all_installed()}
    try:
        r = apt.get("install", "--no-install-recommends", *[built["debs"][p] for p in PACKAGES])
        _out(f"\n$ apt-get install {' '.join(built['debs'][p] for p in PACKAGES)}\n{r.stdout}{r.stderr}",
             pytestconfig)
        state["install"] = r.stdout + r.stderr
        state["deb"] = built["debs"]["synlb"]
        state["new_packages"] = _all_installed() - state["packages_before"]
        state["files"] = {p: subprocess.run(["dpkg", "-L", p], capture_output=True, text=True,
                                            check=True).stdout.split("\n") for p in PACKAGES}
        yield state
    finally:
        if any(_installed(p) for p in PACKAGES):
            apt.get("purge", *PACKAGES, check=False)
        os.environ.update(saved)


@lab
def test_both_packages_build_lintian_clean(built):
    """dpkg-buildpackage from a copy of the tree (the checkout stays clean);
    lintian: no error, no warning (the build fails otherwise; overridden
    tags are shown with their reasons)."""
    out = built["out"]
    sections = re.findall(r"^lintian (\S+\.changes).*\n((?:  .*\n)*)", out, re.M)
    assert [name.split("_")[0] for name, _ in sections] == ["synlb", "python-netfilterqueue"], out
    for name, tags in sections:
        assert not re.search(r"^  [EW]: ", tags, re.M), (name, tags)
    assert _git_status() == built["git_status"]  # nothing but dist/ changed in the checkout


@lab
def test_package_contents_and_relations(built):
    synlb_deb, nfq_deb = built["debs"]["synlb"], built["debs"]["python3-netfilterqueue"]
    listing = subprocess.run(["dpkg-deb", "-c", synlb_deb], capture_output=True, text=True, check=True).stdout
    files = {}
    for line in listing.splitlines():
        mode, owner, _, _, _, path = line.split(None, 5)
        files[path.split(" -> ")[0].lstrip(".").rstrip("/") or "/"] = (mode, owner)
    for path in (BIN, HOOK, CONF, "/etc/synlb/synlb.d", "/lib/systemd/system/synlb.service",
                 "/usr/share/doc/synlb/examples/keepalived.conf.example", "/usr/share/man/man8/synlb.8.gz",
                 "/usr/share/man/man5/synlb.ini.5.gz", "/usr/lib/python3/dist-packages/synlb/cli.py"):
        assert path in files, path
    # no lab: neither the package nor the entry point
    assert not [p for p in files if re.search(r"synlb[/_-]lab|/lab/", p)], sorted(files)
    ctl = subprocess.run(["dpkg-deb", "-I", synlb_deb, "conffiles"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert ctl == [CONF]
    # the hook: root-owned, nothing on its path writable by others (enable_script_security)
    assert files[HOOK] == ("-rwxr-xr-x", "root/root")
    assert all(files[d] == ("drwxr-xr-x", "root/root") for d in ("/usr", "/usr/lib", "/usr/lib/synlb"))
    depends = _deb_field(synlb_deb, "Depends")
    for dep in ("python3-netfilterqueue", "python3-pyroute2", "python3-dbus", "python3-gi", "python3-psutil",
                "python3-prometheus-client", "iptables", "nftables", "iproute2", "conntrack"):
        assert re.search(rf"(^|, ){re.escape(dep)}( \(|,|$)", depends), (dep, depends)
    assert re.search(r"(^|, )keepalived(,|$)", _deb_field(synlb_deb, "Recommends"))
    assert _deb_field(synlb_deb, "Architecture") == "all"
    # the binding is built for this python3 only: it never installs beside another one
    nfq = _deb_field(nfq_deb, "Depends")
    assert "python3 (<< 3.12)" in nfq and "python3 (>= 3.11~)" in nfq and "libnetfilter-queue1" in nfq, nfq


@lab
def test_installed_synlb_is_inert_and_documented(installed, pytestconfig, tmp_path):
    """After `apt-get install`: the shipped configuration balances nothing
    and check says so (postinst reported it and did not fail); synlb runs
    on Debian's python3 and libraries; the unit is enabled and verifies;
    `man synlb` renders."""
    assert installed["new_packages"] == set(PACKAGES), installed["new_packages"]
    assert "synlb: not configured yet: it balances nothing" in installed["install"], installed["install"]
    r = subprocess.run([BIN, "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "nothing configured" in r.stdout, r.stdout + r.stderr
    with open(CONF) as fh:
        shipped = fh.read()
    assert not [ln for ln in shipped.splitlines() if ln.strip() and not ln.startswith("#") and ln != "[synlb]"]
    # below its header, the shipped file is conf/synlb.ini (every key
    # documented) with each setting commented out
    with open(os.path.join(ROOT, "conf", "synlb.ini")) as fh:
        example = fh.read().splitlines()
    want = [ln if not ln.strip() or ln[0] in "#;" or ln == "[synlb]" else "#" + ln for ln in example[1:]]
    assert shipped.splitlines()[-len(want):] == want
    assert "configures nothing" in shipped.split("\n\n")[0]
    version = _installed("synlb")
    r = subprocess.run([BIN, "--version"], capture_output=True, text=True, check=True)
    assert r.stdout == f"synlb {version.split('-')[0]}\n"
    code = "import synlb, netfilterqueue, pyroute2, psutil; print(synlb.__file__, netfilterqueue.__file__)"
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["/usr/lib/python3/dist-packages/synlb/__init__.py",
                                "/usr/lib/python3/dist-packages/netfilterqueue/__init__.py"], r.stdout
    with open(BIN) as fh:
        assert fh.readline() == "#!/usr/bin/python3\n"
    # enabled by deb-systemd-helper (no systemd running here, so not started)
    assert os.path.islink("/etc/systemd/system/multi-user.target.wants/synlb.service")
    # (its Documentation= pages are checked below: `man` needs a "man" user
    # to cache what it formats, which this machine lacks)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", "/lib/systemd/system/synlb.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "synlb.service" not in r.stderr, r.stdout + r.stderr
    with open("/lib/systemd/system/synlb.service") as fh:
        unit = fh.read()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # ExecCondition: skip the start while nothing is configured (exit 1..254
    # skips); a valid or a broken file passes (a broken one then fails `run`)
    (cond,) = re.findall(r"^ExecCondition=/bin/sh -c '(.*)'$", unit, re.M)
    cond = cond.replace("$$", "$")
    assert subprocess.run(["/bin/sh", "-c", cond], capture_output=True).returncode == 1
    for i, text in enumerate((_configured(None), "[synlb]\nrule_priority = 0\n")):
        other = tmp_path / f"{i}.ini"
        other.write_text(text)
        r = subprocess.run(["/bin/sh", "-c", cond.replace(CONF, str(other))], capture_output=True)
        assert r.returncode == 0, text
    # dh_installsystemd: enable, start on install, restart after upgrade, stop on remove
    scripts = {n: subprocess.run(["dpkg-deb", "-I", installed["deb"], n], capture_output=True, text=True,
                                 check=True).stdout for n in ("postinst", "prerm")}
    assert "deb-systemd-helper enable 'synlb.service'" in scripts["postinst"]
    assert "_dh_action=restart" in scripts["postinst"] and "_dh_action=start" in scripts["postinst"]
    assert re.search(r'"\$1" = remove \] .*\n\s*deb-systemd-invoke stop .synlb.service.', scripts["prerm"])
    # (at a width man-db does not cache: no cat page left in /var/cache/man)
    for page, want in (("synlb", "synlb check [--live]"), ("synlb.ini", "hash_key = value")):
        r = subprocess.run(["man", "-P", "cat", page], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8"})
        assert r.returncode == 0 and want in r.stdout and not r.stderr, (page, r.stderr)
        _out(f"man {page}: renders, {len(r.stdout.splitlines())} lines", pytestconfig)


@lab
def test_failover_through_the_installed_synlb_and_hook(installed, pytestconfig):
    """Two routers with keepalived running the shipped example with the
    installed hook /usr/lib/synlb/keepalived-notify (enable_script_security)
    and /usr/bin/synlb: sessions through a failover and a failback, every
    one kept; the workers are Debian's python3 with the packaged
    NetfilterQueue; after `synlb down` each router is as before."""
    from synlb_lab.demo_failover import Pair, run_failover
    from synlb_lab.netns import netns_pids
    from synlb_lab.topology import Lab
    with open("/usr/share/doc/synlb/examples/keepalived.conf.example") as a, \
            open(os.path.join(ROOT, "conf", "keepalived.conf.example")) as b:
        assert a.read() == b.read()  # what the lab renders is what the package ships
    with Lab(routers=2, targets=3, server_ports=(80,)) as lab:
        pair = Pair(lab, synlb=BIN, hook=HOOK)
        pair.prepare()
        assert pair.hook == HOOK and pair.env() == {"SYNLB_BIN": BIN}
        pair.start()
        workers = []
        for pid in netns_pids(lab.ns("lb1")):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
                if b"worker" in argv:
                    with open(f"/proc/{pid}/maps") as fh:
                        maps = fh.read()
                    workers.append((argv[:2], os.path.realpath(f"/proc/{pid}/exe"), maps))
        assert workers, "no worker on lb1"
        for argv, exe, maps in workers:
            assert argv == [b"/usr/bin/python3", BIN.encode()] and exe.startswith("/usr/bin/python3"), argv
            assert "/usr/lib/python3/dist-packages/netfilterqueue/_impl.cpython" in maps
        res = run_failover(pair, "links", count=5)
        _out(f"\nfailover with the installed package: {res['kept']}/{res['sessions']} sessions kept, "
             f"{res['moved']} moved, longest gap {res['max_gap']:.3f} s; steps {res['steps']}", pytestconfig)
        assert res["kept"] == res["sessions"] == 5 * 4 * 2 and res["moved"] == 0, res["per"]
        # every transition came through the installed hook
        assert {e["event"]["source"] for r in lab.routers for e in pair.vrrp_log(r)
                if not e.get("ignored")} == {"notify"}
        pair.close()
        from synlb_lab.demo_failover import snapshot
        for r in lab.routers:
            assert snapshot(lab, r, pair.state_dir(r)) == pair.baseline[r], r


@lab
def test_installed_host_is_ready_once_the_data_plane_is_up(installed, pkglab, tmp_path):
    """What synlb.service (Type=notify) sees, without systemd: the installed
    `synlb run` sends READY=1 on $NOTIFY_SOCKET only once its data plane is
    in the kernel (chains, the worker bound to its queue); SIGHUP reloads;
    SIGTERM sends STOPPING=1 and removes everything."""
    conf = os.path.join(pkglab.role_dir("lb1"), "host.ini")
    with open(conf, "w") as fh:
        fh.write(_configured(pkglab).replace("[synlb]\n", f"[synlb]\nstate_dir = {pkglab.role_dir('lb1')}/st\n"))
    sock_path = os.path.join(pkglab.role_dir("lb1"), "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(sock_path)
        srv.settimeout(30)
        proc = pkglab.popen("lb1", [BIN, "--config", conf, "run"], env={"NOTIFY_SOCKET": sock_path},
                            name="host")
        try:
            assert srv.recv(4096) == b"READY=1"
            assert "synlb-VIP-web" in pkglab.run("lb1", ["iptables-save"]).stdout
            queue = pkglab.run("lb1", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.split()
            assert queue[0] == "0" and queue[1] != "0", queue  # queue 0, and a worker's port id on it
            proc.send_signal(signal.SIGHUP)  # systemctl reload synlb
            time.sleep(1)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)  # systemctl stop synlb
            assert srv.recv(4096) == b"STOPPING=1"
            assert proc.wait(30) == 0
        finally:
            pkglab.stop_process(proc)
    assert "synlb" not in pkglab.run("lb1", ["iptables-save"]).stdout
    with open(pkglab.log_path(proc) or os.devnull) as fh:
        log = fh.read()
    assert "configuration reloaded" in log, log


def _configured(lab) -> str:
    """A real configuration for lb1 of ``lab`` (one target) in the default
    state dir, with the shipped (public) hash_key: what an admin writes into
    the conffile."""
    from synlb_lab import addresses as A
    return (f"# edited by test_packaging\n[synlb]\n[service:web]\nvips = {A.VIP[4]}/32\n"
            f"ingress = {A.ROUTER_FRONT_IF}\negress = {A.ROUTER_BACK_IF}\nprotocols = tcp\nports = 80\n"
            f"targets = t1\n[target:t1]\naddress = {A.target(1, 4)}\n")


@lab
def test_upgrade_keeps_an_edited_conffile_and_the_data_plane(installed, upgrade_deb, pkglab, pytestconfig):
    """The admin configured the router (the conffile edited) and synlb is up;
    installing the same code rebuilt with a higher version keeps the edited
    file without asking and leaves the data plane running; its postinst
    check passes and warns about the public hash_key."""
    deb, version = upgrade_deb
    text = _configured(pkglab)
    with open(CONF, "w") as fh:
        fh.write(text)
    pkglab.run("lb1", [BIN, "up"])
    before = pkglab.run("lb1", ["iptables-save"]).stdout
    assert "synlb-VIP-web" in before
    r = installed["apt"].get("install", "--no-install-recommends", deb)
    out = r.stdout + r.stderr
    _out(f"\n$ apt-get install {deb}\n{out}", pytestconfig)
    assert _installed("synlb") == version
    with open(CONF) as fh:
        assert fh.read() == text
    assert "Configuration file" not in out and not glob.glob(CONF + ".dpkg-*"), out
    assert f"synlb: {CONF}: OK (1 service" in out, out
    assert "synlb: warning: " in out and "hash_key: the shipped key is public" in out, out
    # prerm upgrade tears nothing down
    assert "synlb-VIP-web" in pkglab.run("lb1", ["iptables-save"]).stdout


@lab
def test_purge_leaves_no_file_and_no_kernel_state(installed, pkglab):
    """`apt-get purge`: prerm's `synlb down` removes what synlb installed in
    lb1 (chains, routes, workers, sysctls: lb1 is exactly as before the
    install), and no file of either package is left on disk: not the ones
    `dpkg -L` listed, not /etc/synlb, the state dir, the unit's symlinks or
    byte code."""
    from synlb_lab.scenario import kernel_snapshot
    r = installed["apt"].get("purge", *PACKAGES)
    out = r.stdout + r.stderr
    assert not [p for p in PACKAGES if _installed(p)]
    assert not re.search(r"warning: while removing .* not empty", out), out
    assert kernel_snapshot(pkglab, "lb1") == installed["kernel_before"]
    assert not [pid for pid in _pids(pkglab) if b"synlb" in _cmdline(pid)]
    left = []
    for pkg, paths in installed["files"].items():
        for p in paths:
            if p in ("", "/.") or not os.path.lexists(p):
                continue
            # directories other packages own too (/usr/bin, /etc, ...) stay
            if os.path.isdir(p) and not re.search(r"synlb|netfilterqueue", p, re.I):
                continue
            left.append(p)
    left += [p for p in ("/etc/synlb", "/run/synlb", "/usr/lib/synlb", "/usr/share/doc/synlb",
                         "/etc/systemd/system/multi-user.target.wants/synlb.service")
             if os.path.lexists(p)]
    left += glob.glob("/var/lib/systemd/deb-systemd-helper-*/**/synlb*", recursive=True)
    left += glob.glob("/var/cache/man/**/synlb*", recursive=True)
    left += glob.glob("/usr/lib/python3/dist-packages/*synlb*") + glob.glob(
        "/usr/lib/python3/dist-packages/*etfilter*ueue*")
    assert not left, left
    assert not installed["new_packages"] & _all_installed()  # nothing the install brought is left


def _pids(lab) -> list[int]:
    from synlb_lab.netns import netns_pids
    return netns_pids(lab.ns("lb1"))


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""
