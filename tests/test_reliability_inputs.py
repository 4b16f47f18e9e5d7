"""Bad input, pure part (docs/RELIABILITY.md): hypothesis-generated and
broken INI files never end in a traceback; the packet parser survives a
seeded mutation fuzz; the report renders; the lab's packet generators refuse
any destination outside the lab."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings

from synlb import cli, config
from synlb.errors import EXIT_UNCONFIGURED
from synlb_lab import addresses as A
from synlb_lab import badinput, flood, reliability
from synlb_lab.scenario import render_service_config


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[str, str]:
    d = str(tmp_path_factory.mktemp("rel"))
    targets = [(f"t{k}", A.target(k, 4), A.target(k, 6)) for k in (1, 2, 3)]
    text = render_service_config(d + "/state", targets, ports="80", extra_synlb="pickup = yes\nplugins = lb")
    text += "\n[vrrp]\nsync_group = G1\nstandby = hot\n"
    path = os.path.join(d, "synlb.ini")
    with open(path, "w") as fh:
        fh.write(text)
    config.load(path)  # the corpus starts from a valid file
    return d, text


def check_cli(path: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["-c", path, "check"])
    return rc, err.getvalue()


def test_every_broken_file_of_the_corpus_is_refused_with_its_place(good):
    d, text = good
    corpus = badinput.broken_ini(text)
    assert len(corpus) >= 40
    for i, (name, data) in enumerate(corpus.items()):
        path = os.path.join(d, f"c{i}.ini")
        with open(path, "wb") as fh:
            fh.write(data)
        if name in badinput.RESTART_ONLY:
            config.load(path)  # valid; only the running host refuses it
            continue
        with pytest.raises(config.ConfigError) as e:
            config.load(path)
        assert all(line.startswith(path + ":") for line in e.value.lines()), (name, e.value.lines())
        rc, err = check_cli(path)
        # a file that only lacks a service is valid and configures nothing: exit 3 (synlb(8))
        unconfigured = e.value.lines() == [f"{path}:-:-: no [service:NAME] section"]
        want = EXIT_UNCONFIGURED if unconfigured else 1
        assert rc == want and "Traceback" not in err and (unconfigured or err.startswith(path + ":")), (name, err)


def test_hypothesis_ini_files_never_end_in_a_traceback(good):
    d, text = good
    path = os.path.join(d, "hyp.ini")
    seen = {"loaded": 0, "refused": 0}

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(badinput.ini_strategy(text))
    def one(ini: str) -> None:
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(ini)
        try:
            config.load(path)
            seen["loaded"] += 1
        except config.ConfigError as e:
            seen["refused"] += 1
            assert e.lines()
        rc, err = check_cli(path)
        assert rc in (0, 1, EXIT_UNCONFIGURED) and "Traceback" not in err, err
    one()
    assert seen["refused"] > 100 and seen["loaded"] > 0, seen


def test_packet_parser_survives_the_mutation_fuzz():
    r = badinput.fuzz_packets(20_000, seed=3)
    assert r["failures"] == 0, r["examples"]
    assert r["cases"] == 20_000 and set(r["keys"]) >= {"fallback", "v4 ports", "v6 ports", "v4 addresses"}
    for p in badinput.seed_packets():
        assert badinput.check_packet(p) is None


def test_generators_refuse_destinations_outside_the_lab():
    for ok in ("10.64.100.1", "fd64:100::1", "10.64.2.11"):
        assert flood.lab_address(ok) == ok
    for bad in ("127.0.0.1", "8.8.8.8", "10.65.0.1", "2001:db8::1", "::1"):
        with pytest.raises(SystemExit):
            flood.lab_address(bad)


def test_the_report_renders_every_row():
    rows = [reliability.row("worker_kill", "Worker SIGKILL", "killed", {
        "load": "40 sessions", "sessions": {"total": 40, "kept": 40, "reset": 0, "moved": 0, "max_gap": 0.1},
        "new": {"total": 80, "failed": 0, "slow": 3}}, ok=True, recovery=0.3, figures={"restart_s": [0.3]},
        notes=["restarted after 0.30 s"]),
        reliability.packet_fuzz(None, cases=500)]
    md = reliability.render({"meta": {"date": "today", "kernel": "6", "cpus": 2, "python": "3.11",
                                      "keepalived": "Keepalived v2", "iptables": "iptables v1.8.9 (nf_tables)",
                                      "total_s": 1, "lab_setup_s": 1}, "fast": False, "rows": rows})
    assert "| Worker SIGKILL | killed | 40 sessions | 40/40 kept, 0 reset, 0 moved" in md
    assert "| 0 failed, 3 slow of 80 | 0.30 s (kill to the new worker holding its queue) | yes |" in md
    assert "Packet parser fuzzed" in md and "2/2 scenarios as expected" in md
