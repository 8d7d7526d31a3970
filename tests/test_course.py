"""What every chapter's setup relies on: claims and student mode, the load-or-compute cache, the world registry,
the data folder, the toy world's device policy, per-world budgets and the pair-table cache."""
import json
import warnings

import matplotlib as mpl
import pytest
import torch

from compinv_utils import Claims, load_or_compute, load_world, register_world, setup_figures
from compinv_utils.pairs import load_or_compute_pair_table, partner_nouns
from compinv_utils import world as W
from compinv_utils.paths import REPO_ROOT, data_root, shown_path
from compinv_utils.runtime import pick_device
from compinv_utils.course import FindingChanged


def test_claims_stop_the_chapter_unless_in_student_mode():
    strict = Claims(student=False)
    strict(1 + 1 == 2, "arithmetic holds")
    with pytest.raises(AssertionError, match="finding changed: the moon is cheese.*COMPINV_STUDENT=1"):
        strict(False, "the moon is cheese")
    student = Claims(student=True)
    with pytest.warns(FindingChanged, match="the moon is cheese"):
        student(False, "the moon is cheese")
    student(True, "water is wet")
    assert student.summary() == "1 finding(s) held; 1 changed: the moon is cheese"
    assert strict.held == ["arithmetic holds"] and student.changed == ["the moon is cheese"]


def test_student_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("COMPINV_STUDENT", "1")
    with pytest.warns(FindingChanged):
        Claims()(False, "x")
    monkeypatch.setenv("COMPINV_STUDENT", "0")
    with pytest.raises(AssertionError):
        Claims()(False, "x")


def test_load_or_compute_caches_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "result.json"
    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    assert load_or_compute(path, compute) == {"n": 1}
    assert load_or_compute(path, compute) == {"n": 1} and len(calls) == 1  # loaded, not recomputed
    assert load_or_compute(path, compute, recompute=True) == {"n": 2}
    assert json.loads(path.with_suffix(".old.json").read_text()) == {"n": 1}  # the previous result survives


def test_load_or_compute_names_a_corrupt_cache_and_keeps_it(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="result.json is not valid JSON.*COMPINV_RECOMPUTE=1"):
        load_or_compute(path, lambda: {"never": True})
    assert path.read_text() == "{not json"


def test_load_or_compute_loses_nothing_when_the_computation_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"kept": 1}))

    def broken():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        load_or_compute(path, broken, recompute=True)
    assert json.loads(path.with_suffix(".old.json").read_text()) == {"kept": 1}


def test_setup_figures_sets_a_legible_dpi():
    setup_figures()
    assert mpl.rcParams["figure.dpi"] >= 100 and mpl.rcParams["savefig.dpi"] >= 100
    with pytest.raises(ValueError, match="at least 100"):
        setup_figures(72)


def test_registry_knows_the_worlds_and_names_them_in_errors():
    assert {"toy", "sd15"} <= set(W.WORLD_LOADERS)
    with pytest.raises(ValueError, match="unknown world 'sdxl'.*toy, sd15"):
        load_world("sdxl")
    with pytest.raises(ValueError, match="cannot load the world loader 'no.such.module:f'"):
        load_world("no.such.module:f")


def test_a_registered_world_and_a_loader_spec_are_loaded(toy_world, monkeypatch):
    calls = []

    def loader(**kwargs):
        calls.append(kwargs)
        return toy_world

    monkeypatch.setattr(W, "WORLD_LOADERS", dict(W.WORLD_LOADERS))  # the registry is restored afterwards
    register_world("Mine", loader)
    assert load_world("mine", device="cpu") is toy_world and calls == [{"device": "cpu"}]
    monkeypatch.setattr(W, "_test_loader", loader, raising=False)
    assert load_world("compinv_utils.world:_test_loader") is toy_world


def test_concepts_folder_from_the_environment_reaches_the_loader(monkeypatch, tmp_path):
    seen = {}

    def loader(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setitem(W.WORLD_LOADERS, "probe", loader)
    monkeypatch.setenv("COMPINV_CONCEPTS", str(tmp_path))
    with pytest.raises(RuntimeError, match="stop here"):
        load_world("probe")
    assert seen == {"concepts_dir": str(tmp_path)}
    monkeypatch.delenv("COMPINV_CONCEPTS")
    seen.clear()
    with pytest.raises(RuntimeError):
        load_world("probe")
    assert seen == {}  # no concepts folder: the loader's own default


def test_data_root_follows_the_environment(monkeypatch, tmp_path, toy_world):
    monkeypatch.delenv("COMPINV_DATA", raising=False)
    assert data_root() == REPO_ROOT / "data"
    assert toy_world.data_dir == REPO_ROOT / "data" / "toy"
    monkeypatch.setenv("COMPINV_DATA", str(tmp_path))
    assert data_root() == tmp_path and toy_world.data_dir == tmp_path / "toy"


def test_shown_path_is_relative_inside_the_clone_and_unchanged_outside(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPINV_DATA", raising=False)
    assert shown_path(REPO_ROOT / "data" / "toy") == "data/toy"
    assert shown_path(tmp_path / "x") == str(tmp_path / "x")
    clone = tmp_path / "clone"  # a regular install: the package elsewhere, the data in the clone
    monkeypatch.setenv("COMPINV_DATA", str(clone / "data"))
    assert shown_path(clone / "data" / "toy" / "layout") == "data/toy/layout"


def test_toy_world_stays_on_the_cpu_in_fp32_unless_asked(monkeypatch):
    monkeypatch.delenv("COMPINV_DEVICE", raising=False)
    dev, dtype = pick_device(None, "cpu")
    assert (dev.type, dtype) == ("cpu", torch.float32)
    monkeypatch.setenv("COMPINV_DEVICE", "cuda")
    dev, dtype = pick_device(None, "cpu")
    assert (dev.type, dtype) == ("cuda", torch.float16)
    dev, dtype = pick_device("cpu", "cpu")  # an explicit argument wins over the environment
    assert (dev.type, dtype) == ("cpu", torch.float32)


def test_own_photos_replace_the_toy_concepts(tmp_path):
    from PIL import Image

    folder = tmp_path / "mine" / "mug2"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (64, 48), (40 * k, 90, 200)).save(folder / f"{k}.png")
    (tmp_path / "mine" / "concepts.json").write_text(json.dumps({"mug2": "cup"}))
    w = load_world("toy", concepts_dir=tmp_path / "mine")
    [c] = w.concepts_of_interest
    assert (c.name, c.token, c.superclass, len(c.photos)) == ("mug2", "<mug2>", "cup", 3)
    assert c.photos[0].size == (w.image_size, w.image_size)


def test_budgets_live_on_the_world(toy_world):
    s = toy_world.settings
    assert (s.n_partners, s.gen_seeds, s.inversion_seeds, s.pair_nouns) == (4, 2, 3, None)
    c = toy_world.concepts_of_interest[0]
    assert partner_nouns(toy_world, c) == partner_nouns(toy_world, c, k=4)
    assert len(partner_nouns(toy_world, c, k=2)) == 2
    sd = W.SD15_SETTINGS
    assert sd.max_concepts == 2 and sd.pair_nouns == 8 and sd.inversion_steps < 3000


def test_max_concepts_trims_the_concepts_of_interest(toy_world, monkeypatch):
    from dataclasses import replace

    def loader(**kwargs):
        return W.World(**{**toy_world.__dict__, "concepts_of_interest": list(toy_world.concepts_of_interest),
                          "settings": replace(toy_world.settings, max_concepts=2)})

    monkeypatch.setitem(W.WORLD_LOADERS, "two", loader)
    assert [c.name for c in load_world("two").concepts_of_interest] == [c.name for c in toy_world.concepts_of_interest[:2]]


def test_pair_table_cache_is_reused_and_refreshed_when_stale(toy_world, tmp_path):
    path = tmp_path / "pair_table.json"
    nouns = ["cat", "kite", "boat"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = load_or_compute_pair_table(toy_world, path, nouns, seeds=1)
    assert set(table) == {("cat", "kite"), ("cat", "boat"), ("kite", "boat")}
    assert set(table[("cat", "kite")]) == {"a", "b", "both"}
    stamp = path.stat().st_mtime_ns
    again = load_or_compute_pair_table(toy_world, path, nouns[:2], seeds=1)  # a subset: read from the cache
    assert again == {("cat", "kite"): table[("cat", "kite")]} and path.stat().st_mtime_ns == stamp
    load_or_compute_pair_table(toy_world, path, nouns, seeds=2)  # other seeds: recomputed, the old file kept
    assert json.loads(path.read_text())["seeds"] == 2
    assert json.loads(path.with_suffix(".old.json").read_text())["seeds"] == 1


def test_progress_bars_hide_in_headless_runs(monkeypatch):
    from compinv_utils.progress import bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not bar(range(3), progress=True).disable
    assert bar(range(3), progress=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar(range(3), progress=True).disable
