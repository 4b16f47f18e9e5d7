"""nft_apply's decisions (install whole, update by difference, rebuild on doubt)
against a fake nft: no kernel."""

from __future__ import annotations

import pytest

from synlb import config, nft_apply as A, nft_engine as E

CONF = """
[synlb]
state_dir = {d}
[service:web]
vips = 10.0.0.1/32
ingress = front
protocols = tcp
engine = nftables
table_size = 1009
targets = a, b, c
[target:a]
address = 10.1.0.1
[target:b]
address = 10.1.0.2
[target:c]
address = 10.1.0.3
"""


class FakeNft:
    """Holds one table's digest, as `nft list chains inet` shows it."""

    def __init__(self):
        self.digest = None
        self.scripts: list[str] = []
        self.refuse = False

    def run(self, text: str, json_output: bool = False) -> str:
        if text.startswith("list chains"):
            if self.digest is None:
                return ""
            return (f'table inet synlb {{\n\tchain prerouting {{\n\t\tcomment "synlb {self.digest}"\n'
                    "\t\ttype filter hook prerouting priority mangle + 1; policy accept;\n\t}\n}\n")
        if text.startswith("list counters"):
            return '{"nftables": []}'
        if self.refuse and not text.startswith("table inet synlb { }"):
            raise A.NftError("nft: No such file or directory")
        self.scripts.append(text)
        if text.startswith("delete table"):
            self.digest = None
        for line in text.splitlines():
            if line.strip().startswith('comment "synlb '):
                self.digest = line.split()[-1].strip('"')
        return ""


@pytest.fixture
def nft(fake):
    nft = FakeNft()
    fake(A, "run", nft.run)
    fake(A, "available", lambda: "libnftables")
    return nft


def test_install_update_nothing_and_remove(tmp_path, nft):
    p = tmp_path / "synlb.ini"
    p.write_text(CONF.format(d=tmp_path))
    cfg = config.load(str(p))
    sd = str(tmp_path)
    changes = A.reconcile(E.desired(cfg), sd)
    assert "installed table inet synlb (1 services, 1009 slots)" in changes[0]
    assert nft.digest == E.desired(cfg).digest and len(nft.scripts) == 1
    assert A.reconcile(E.desired(cfg), sd) == [] and len(nft.scripts) == 1  # nothing: no transaction
    changes = A.reconcile(E.desired(cfg, {"web": ["b"]}), sd)
    assert "updated web: " in changes[0] and not nft.scripts[-1].startswith("table")
    deletes = [ln for ln in nft.scripts[-1].splitlines() if ln.startswith("delete element inet synlb slots_web")]
    assert deletes and all("delete table" not in s for s in nft.scripts)
    assert A.load_slots(sd, "web") == E.desired(cfg, {"web": ["b"]}).services["web"].slots()
    assert A.remove(sd) == ["nftables: deleted table inet synlb"] and nft.digest is None
    assert A.load_state(sd) == (None, False) and A.load_slots(sd, "web") is None


def test_doubt_means_the_whole_table(tmp_path, nft):
    p = tmp_path / "synlb.ini"
    p.write_text(CONF.format(d=tmp_path))
    cfg = config.load(str(p))
    sd = str(tmp_path)
    A.reconcile(E.desired(cfg), sd)
    # a record left pending (a transaction that may not have finished)
    applied, _ = A.load_state(sd)
    A._store_state(sd, applied, pending=True)
    assert "replaced table" in A.reconcile(E.desired(cfg, {"web": ["a"]}), sd)[0]
    assert nft.scripts[-1].startswith("table inet synlb { }\ndelete table inet synlb\n")
    # a live table of another skeleton (someone else's change, or an older synlb)
    nft.digest = "0123456789abcdef"
    assert "replaced table" in A.reconcile(E.desired(cfg), sd)[0]
    # the kernel refuses the update (the record lies): the whole table again, at once
    nft.refuse = True  # (the fake takes only whole-table transactions now)
    assert "replaced table" in A.reconcile(E.desired(cfg, {"web": ["c"]}), sd)[0]
    nft.refuse = False
    assert A.reconcile(E.desired(cfg, {"web": ["c"]}), sd) == []


def test_no_service_no_table_and_no_nft_needed(tmp_path, fake):
    fake(A, "available", lambda: None)
    assert A.reconcile(E.Plan("", E.digest(""), {}), str(tmp_path)) == []
    assert A.remove(str(tmp_path)) == []
