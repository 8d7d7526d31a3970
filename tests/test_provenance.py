"""Caches know what they were made from: a Table 1 cache is recomputed, with a message that says what differed, when
the world, the inversion folder (its whole path), a group's partners or its inversion files differ; the committed
caches carry their records and load without recomputation. Generation is faked, so this takes seconds."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from compinv_utils import evaluation as V, pairs
from compinv_utils.pairs import load_or_compute_pair_table, partner_nouns
from compinv_utils.inversion import save_embedding

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def calls(monkeypatch):
    """evaluate_group replaced by an instant fake that records which groups it computed."""
    made = []

    def fake(world, setting, method, concepts, partners, seeds, inversions, inv_seed=0, *a, **k):
        made.append(V._group_key(setting, method, [c.name for c in concepts], inv_seed))
        return [{"setting": setting, "method": method, "concepts": [c.name for c in concepts], "inv_seed": inv_seed,
                 "partner": x, "seed": s} for x in (partners or [None]) for s in range(seeds)]

    monkeypatch.setattr(V, "evaluate_group", fake)
    return made


@pytest.fixture()
def setup(toy_world, tmp_path):
    cs = toy_world.concepts_of_interest[:2]
    for c in cs:
        for s in (0, 1):
            save_embedding(V.inversion_file(tmp_path / "a" / "plain", c.name, s), c.token,
                           torch.full((1, 8), 0.01 * (s + 1) * (1 + ord(c.name[0]))))
    return cs, {"plain": tmp_path / "a" / "plain"}, tmp_path / "table1.json"


def run(world, cs, inversions, cache, partners=("kite",)):
    return V.table1(world, lambda c: list(partners), inversions, None, inv_seeds=(0, 1), seeds=1, pair_seeds=1,
                    methods=("TI",), concepts=cs, cache=cache, progress=False)


def test_an_unchanged_cache_is_reused_silently(toy_world, setup, calls, capsys):
    cs, inv, cache = setup
    first = run(toy_world, cs, inv, cache)
    n = len(calls)
    capsys.readouterr()
    assert run(toy_world, cs, inv, cache) == first and len(calls) == n
    assert capsys.readouterr().out == ""
    made_from = json.loads(cache.read_text())["made_from"]
    assert made_from["world"]["name"] == "toy" and made_from["groups"]["noun|TI|" + cs[0].name + "|seed0"]["partners"] == ["kite"]


def test_other_partners_recompute_the_noun_groups_with_a_message(toy_world, setup, calls, capsys):
    cs, inv, cache = setup
    run(toy_world, cs, inv, cache)
    calls.clear()
    capsys.readouterr()
    recs = run(toy_world, cs, inv, cache, partners=("car",))
    out = capsys.readouterr().out
    assert "recomputing 4 group(s) whose inputs changed" in out and "partners ['kite'] -> ['car']" in out
    assert sorted(calls) == sorted(k for k in V.cached_groups(cache) if k.startswith("noun"))
    assert {r["partner"] for r in recs if r["setting"] == "noun"} == {"car"}
    assert cache.with_suffix(".old.json").exists()


def test_another_inversion_folder_with_the_same_last_parts_is_recomputed(toy_world, setup, calls, capsys, tmp_path):
    cs, inv, cache = setup
    run(toy_world, cs, inv, cache)
    calls.clear()
    capsys.readouterr()
    with pytest.raises(ValueError, match="other settings"):  # the last two path parts differ: refused, as before
        run(toy_world, cs, {"plain": tmp_path / "b" / "plain"}, cache)
    deep = tmp_path / "c" / "a" / "plain"  # the same last two parts ("a/plain"), another folder
    shutil.copytree(inv["plain"], deep)
    run(toy_world, cs, {"plain": deep}, cache)
    out = capsys.readouterr().out
    assert "the inversion folders" in out and "recomputing all of it" in out
    assert len(calls) == len(V.table1_groups(toy_world, ("TI",), cs, (0, 1)))


def test_a_changed_inversion_file_recomputes_its_groups(toy_world, setup, calls, capsys):
    cs, inv, cache = setup
    run(toy_world, cs, inv, cache)
    calls.clear()
    capsys.readouterr()
    save_embedding(V.inversion_file(inv["plain"], cs[0].name, 1), cs[0].token, torch.full((1, 8), 0.5))
    run(toy_world, cs, inv, cache)
    out = capsys.readouterr().out
    assert f"the inversion files of {cs[0].name}" in out
    pair = "+".join(c.name for c in cs)
    assert sorted(calls) == sorted([f"noun|TI|{cs[0].name}|seed1", f"concept|TI|{pair}|seed1"])


def test_another_world_recomputes_everything(toy_world, setup, calls, capsys, monkeypatch):
    from compinv_utils import world as W

    cs, inv, cache = setup
    run(toy_world, cs, inv, cache)
    calls.clear()
    monkeypatch.setattr(W, "world_identity", lambda w: {"name": "toy", "fingerprint": "retrained"})
    run(toy_world, cs, inv, cache)
    assert "the world (" in capsys.readouterr().out and len(calls) == 6


def test_a_cache_from_before_provenance_is_checked_and_stamped(toy_world, setup, calls, capsys):
    cs, inv, cache = setup
    run(toy_world, cs, inv, cache)
    stored = json.loads(cache.read_text())
    del stored["made_from"]
    cache.write_text(json.dumps(stored))
    calls.clear()
    capsys.readouterr()
    run(toy_world, cs, inv, cache)
    assert calls == [] and "records no provenance" in capsys.readouterr().out
    assert "made_from" in json.loads(cache.read_text())
    cache.write_text(json.dumps(stored))
    run(toy_world, cs, inv, cache, partners=("car",))  # the records name other partners: recomputed
    assert len(calls) == 4


def test_the_committed_caches_load_without_recomputation(toy_world, calls, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import stamp_provenance as S

    caches = sorted((REPO / "data" / "toy" / "evaluation").glob("table1_*.json"))
    assert caches
    for cache in caches:
        d = json.loads(cache.read_text())
        assert d.get("made_from"), f"{cache.name} has no provenance: run scripts/stamp_provenance.py"
        st = d["settings"]
        methods = tuple(m for m in V.TABLE1_METHODS if any(k.split("|")[1] == m for k in d["groups"]))
        seeds = tuple(sorted({int(k.split("|")[3][4:]) for k in d["groups"]}))
        before = cache.read_bytes()
        V.table1(toy_world, lambda c: partner_nouns(toy_world, c), S.inversion_folders(toy_world, st), None,
                 inv_seeds=seeds, seeds=st["seeds"], pair_seeds=st["pair_seeds"], methods=methods, cache=cache,
                 progress=False, block=st.get("inversion_method", "ti"))
        assert cache.read_bytes() == before
    assert calls == [] and capsys.readouterr().out == ""


def test_a_pair_table_made_in_another_world_is_computed_again(tmp_path, capsys):
    from test_concurrency import NOUNS, FakeWorld

    path = tmp_path / "pair_table.json"
    load_or_compute_pair_table(FakeWorld(), path, NOUNS[:3], seeds=1)
    assert json.loads(path.read_text())["made_from"]["world"]["name"] == "fake"
    capsys.readouterr()
    load_or_compute_pair_table(FakeWorld(), path, NOUNS[:3], seeds=1)  # the same world: read
    assert capsys.readouterr().out == ""
    other = FakeWorld()
    with torch.no_grad():
        other.pipe.unet.weight += 1  # retrained
    load_or_compute_pair_table(other, path, NOUNS[:3], seeds=1)
    assert "was made in another world" in capsys.readouterr().out
    assert json.loads(path.with_suffix(".old.json").read_text())["made_from"]["world"]["name"] == "fake"


def test_the_committed_pair_table_loads_without_recomputation(toy_world, monkeypatch, capsys):
    monkeypatch.setattr(pairs, "pair_detection_table", lambda *a, **k: pytest.fail("recomputed the pair table"))
    path = REPO / "data" / "toy" / "pair_table.json"
    before = path.read_bytes()
    table = load_or_compute_pair_table(toy_world, path, toy_world.nouns[:toy_world.settings.pair_nouns],
                                         seeds=toy_world.settings.gen_seeds)
    assert len(table) == 153 and path.read_bytes() == before and capsys.readouterr().out == ""
