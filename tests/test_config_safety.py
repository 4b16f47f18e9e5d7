"""Values `synlb check` refuses although they parse, because synlb runs as
root on a router: each with one FILE:SECTION:KEY line (pure, no kernel)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from synlb import config as config_mod

BASE = """[synlb]
state_dir = {state}
{synlb}
[service:web]
vips = {vips}
ingress = eth0
protocols = tcp
ports = 80
targets = a
{service}
[target:a]
address = {address}
"""


def write(tmp_path, *, synlb="", vips="10.64.100.1/32", service="", address="10.1.0.1"):
    p = tmp_path / "synlb.ini"
    p.write_text(BASE.format(state=tmp_path / "state", synlb=synlb, vips=vips, service=service, address=address))
    return str(p)


def problems(path) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(path)
    return [line.split(":", 1)[1] for line in e.value.lines()]


@pytest.mark.parametrize("kw,want", [
    ({"service": "queue = 0-65535"}, "service:web:queue: 65536 queues (one worker each); at most 64"),
    ({"vips": "0.0.0.0/0"}, "service:web:vips: 0.0.0.0/0 would capture /0 of the router's traffic; "
                            "a VIP prefix is /16 or longer"),
    ({"vips": "::/0"}, "service:web:vips: ::/0 would capture /0 of the router's traffic; a VIP prefix is /48 or longer"),
    ({"vips": "127.0.0.1/32"}, "service:web:vips: 127.0.0.1/32 is loopback, not a service address"),
    ({"vips": "224.0.0.1/32"}, "service:web:vips: 224.0.0.1/32 is multicast, not a service address"),
    ({"vips": "fe80::1%eth0/128"}, "service:web:vips: 'fe80::1%eth0/128': a VIP has no zone (%...)"),
    ({"address": "0.0.0.0"}, "target:a:address: 0.0.0.0 is the unspecified address, not a real server's address"),
    ({"address": "127.0.0.1"}, "target:a:address: 127.0.0.1 is loopback, not a real server's address"),
    ({"address": "255.255.255.255"},
     "target:a:address: 255.255.255.255 is the broadcast address, not a real server's address"),
    ({"address": "fe80::1%eth0"}, "target:a:address: 'fe80::1%eth0': a target address has no zone (%...)"),
    ({"address": "10.64.100.1"}, "service:web:targets: target a's address 10.64.100.1 is one of the service's VIPs"),
    ({"synlb": "route_protocol = 186"},
     "synlb:route_protocol: 186 is bgp's routing protocol; synlb would delete its rules and routes (the default is 229)"),
    ({"synlb": "route_protocol = 18"},
     "synlb:route_protocol: 18 is keepalived's routing protocol; synlb would delete its rules and routes "
     "(the default is 229)"),
    ({"synlb": "hash_key = " + "k" * 65},
     "synlb:hash_key: 65 bytes; the hash uses at most 64 (a longer key would be cut, so two keys that differ "
     "after that would hash alike)"),
])
def test_dangerous_values_are_refused(tmp_path, kw, want):
    assert problems(write(tmp_path, **kw)) == [want]


def test_marks_stay_out_of_vyos_policy_routes(tmp_path):
    path = write(tmp_path)
    with open(path, "a") as fh:
        fh.write("mark = 0x7ffffffe\n")
    assert problems(path) == ["target:a:mark: 0x7ffffffe is one of VyOS's policy-route marks "
                              "(0x7fffff37..0x7ffffffe), whose ip rules VyOS deletes"]
    assert config_mod.auto_mark("a") not in config_mod.VYOS_MARKS



def test_a_fifo_among_the_drop_ins_is_refused_not_read(tmp_path):
    path = write(tmp_path)
    os.makedirs(tmp_path / "synlb.d")
    os.mkfifo(tmp_path / "synlb.d" / "50-pipe.ini")  # opening it would block every reader
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(path)
    assert e.value.lines() == [f"{tmp_path}/synlb.d/50-pipe.ini:-:-: not a regular file"]


@pytest.mark.lab  # root: chown
def test_a_plugin_a_user_could_write_is_not_imported(tmp_path):
    pkg = tmp_path / "mine"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text("")
    (pkg / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef create(host): pass\n")
    os.chmod(tmp_path, 0o755)
    os.chown(pkg / "evil.py", 1000, 1000)
    path = write(tmp_path, synlb="plugins = lb, mine.evil")
    code = ("import sys; from synlb import config\n"
            "try:\n    config.load(sys.argv[1])\nexcept config.ConfigError as e:\n    print('\\n'.join(e.lines()))")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True)
    assert not marker.exists(), "the plugin was imported"
    assert f"synlb:plugins: plugin 'mine.evil' not imported: {pkg}/evil.py is owned by uid 1000, not root" in r.stdout
    os.chown(pkg / "evil.py", 0, 0)  # root's own plugin: imported
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True)
    assert marker.exists() and r.stdout == ""


def test_check_live_warns_about_the_shipped_hash_key(tmp_path):
    from synlb import live
    cfg = config_mod.load(write(tmp_path))
    assert live.warnings(cfg) == [f"{tmp_path}/synlb.ini:synlb:hash_key: the shipped key is public: anyone can "
                                  "predict which target a flow goes to and pile connections onto one; set a "
                                  "secret, the same on every router (e.g. openssl rand -hex 32)"]
    assert live.warnings(config_mod.load(write(tmp_path, synlb="hash_key = s3cret-of-this-cluster"))) == []


@pytest.mark.parametrize("value", ["/héalth", "/a\x7fb", "/ok?x=é"])
def test_an_http_check_path_that_cannot_be_sent_is_refused(tmp_path, value):
    path = write(tmp_path, synlb="plugins = lb, health")
    with open(path, "a") as fh:
        fh.write(f"check = http\ncheck_port = 80\ncheck_path = {value}\n")
    assert problems(path) == [f"target:a:check_path: {value!r} is not an absolute URL path of printable "
                              "ASCII (percent-encode the rest)"]


# ------------------------------------------------------------------ worker_user

SYNLB = os.path.join(os.path.dirname(sys.executable), "synlb")


def test_an_unknown_worker_user_is_refused_by_check_naming_the_key(tmp_path):
    """The workers never fall back to root (or anyone) when their user is
    missing: `synlb check`, and every command that loads the configuration
    before it changes anything (config.load), name FILE:SECTION:KEY."""
    path = write(tmp_path, synlb="worker_user = no-such-user")
    why = ("no user 'no-such-user' on this system: the NFQUEUE workers run as it (create it, or name "
           "another; worker_user = root runs them as root)")
    assert problems(path) == [f"synlb:worker_user: {why}"]
    r = subprocess.run([SYNLB, "--config", path, "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{path}:synlb:worker_user: {why}" in r.stdout + r.stderr

def test_a_missing_default_worker_user_is_told_how_to_make_it(monkeypatch):
    assert config_mod.worker_user_problem("_synlb") is None  # (make deps made it)
    monkeypatch.setattr(config_mod, "DEFAULT_WORKER_USER", "_nope")
    assert "(`make deps` or the Debian package creates it: useradd --system --no-create-home " \
           "--home-dir /nonexistent --shell /usr/sbin/nologin --user-group _nope;" \
           in config_mod.worker_user_problem("_nope")


@pytest.mark.parametrize("value", ["1abc", "a b", "-x", "../x", "x" * 33, ""])
def test_a_worker_user_that_is_no_user_name_is_refused(tmp_path, value):
    (line,) = problems(write(tmp_path, synlb=f"worker_user = {value}"))
    assert line.startswith("synlb:worker_user: ") and "is not a user name" in line, line


def test_the_worker_user_is_only_needed_where_workers_run(tmp_path):
    """No service (the shipped file, also where the package is built) or
    services of the nftables engine only: no worker, no user needed."""
    path = tmp_path / "synlb.ini"
    path.write_text("[synlb]\nworker_user = no-such-user\n")
    r = subprocess.run([SYNLB, "--config", str(path), "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "nothing configured" in r.stdout, r.stdout + r.stderr
    cfg = config_mod.load(write(tmp_path, synlb="worker_user = no-such-user", service="engine = nftables"))
    assert cfg.globals.worker_user == "no-such-user"


def test_teardown_does_not_need_the_worker_user(tmp_path):
    """`synlb down` (load_globals) and a VRRP event's teardown (load_teardown)
    work with a worker_user that is gone: nothing is started by them."""
    path = write(tmp_path, synlb="worker_user = no-such-user")
    assert config_mod.load_globals(path).worker_user == "no-such-user"
    assert config_mod.load_teardown(path)[0].worker_user == "no-such-user"


def test_check_warns_about_workers_running_as_root(tmp_path):
    from synlb import live
    key = "hash_key = s3cret-of-this-cluster"
    assert config_mod.load(write(tmp_path, synlb=key)).globals.worker_user == "_synlb"
    assert live.warnings(config_mod.load(write(tmp_path, synlb=key))) == []
    path = write(tmp_path, synlb=f"{key}\nworker_user = root")
    assert live.warnings(config_mod.load(path)) == [
        f"{path}:synlb:worker_user: root: the NFQUEUE workers, which parse every queued packet, run as root "
        "with every capability; the default _synlb runs them with CAP_NET_ADMIN only (docs/HARDENING.md)"]
    r = subprocess.run([SYNLB, "--config", path, "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"warning: {path}:synlb:worker_user: root: " in r.stderr, r.stderr
    # no worker, no warning: a service of the nftables engine only
    path = write(tmp_path, synlb=f"{key}\nworker_user = root", service="engine = nftables")
    assert live.warnings(config_mod.load(path)) == []
