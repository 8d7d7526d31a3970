import numpy as np
import pytest
import torch

from compinv_utils import evaluation as V
from compinv_utils.measures import all_found, coi_found
from compinv_utils.pairs import partner_nouns
from compinv_utils.prompts import article
from compinv_utils.statistics import bootstrap_ci, cluster_bootstrap, cluster_bootstrap_diff, cluster_means, cluster_t_interval, cluster_t_interval_diff, excludes_zero
from compinv_utils.embeddings import input_embeddings
from compinv_utils.guidance import GuidanceConfig, guided_generate
from compinv_utils.inversion import save_embedding
from compinv_utils.layout import LayoutMLP

BOXES = [(0.0, 0.1, 0.5, 0.9), (0.5, 0.1, 1.0, 0.9)]


def test_batched_guidance_matches_one_image_at_a_time(toy_world):
    cfg = GuidanceConfig(guided_steps=2, inner_iters=2)
    prompts = ["a cat and a kite", "a barn and a boat"]
    words = [["cat", "kite"], ["barn", "boat"]]
    kw = dict(config=cfg, num_inference_steps=4)
    both = guided_generate(toy_world, prompts, words, [BOXES, BOXES[::-1]], seeds=[3, 4], batch_size=2, **kw)
    one = guided_generate(toy_world, prompts[1:], words[1:], [BOXES[::-1]], seeds=[4], **kw)
    assert both.losses.shape == (4, 2)
    np.testing.assert_allclose(both.losses[:, 1], one.losses[:, 0], rtol=1e-4, atol=1e-5)
    diff = np.abs(np.asarray(both.images[1], float) - np.asarray(one.images[0], float)).max()
    assert diff <= 2
    assert both.passes == {"cfg_forward": 4, "guided_forward": 4, "guided_backward": 4, "images": 2}


def test_guidance_moves_recorded_attention_into_the_boxes(toy_world):
    kw = dict(seeds=[0, 1, 2, 3], num_inference_steps=10, record=True)
    prompts, words = ["a cat and a kite"] * 4, ["cat", "kite"]
    # boxes against the world's layout (it draws the cat on the left): without guidance each word's attention
    # is almost all outside its box, so there is room to move it in
    boxes = BOXES[::-1]
    plain = guided_generate(toy_world, prompts, words, boxes, config=GuidanceConfig(guided_steps=0), **kw)
    guided = guided_generate(toy_world, prompts, words, boxes, config=GuidanceConfig(guided_steps=4, step_size=300), **kw)
    assert plain.maps.shape == (4, 2, 8, 8) and plain.inside.shape == (10, 4, 2)
    assert np.all((plain.inside >= 0) & (plain.inside <= 1))
    # every image, both words: more of the attention inside the box during the guided steps
    assert np.all(guided.inside[:4].mean(0) > plain.inside[:4].mean(0))
    assert guided.losses[-1].mean() < guided.losses[0].mean()


def test_guidance_settings_are_checked(toy_world):
    g = lambda cfg, **kw: guided_generate(toy_world, ["a cat and a kite"], ["cat", "kite"], BOXES,  # noqa: E731
                                          config=cfg, num_inference_steps=3, **kw)
    with pytest.raises(ValueError, match="no cross-attention layer has 5-high maps"):
        g(GuidanceConfig(guided_steps=1, resolution=5))
    with pytest.raises(ValueError, match="heads"):
        g(GuidanceConfig(guided_steps=1, heads=(2, 1)))
    with pytest.raises(ValueError, match="heads \\(0, 99\\)"):
        g(GuidanceConfig(guided_steps=1, heads=(0, 99)))
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        g(GuidanceConfig(), seeds=[0, 1])
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        guided_generate(toy_world, ["a cat"], ["cat"], [BOXES[0]], num_inference_steps=-1)
    out = g(GuidanceConfig(guided_steps=1, heads=(0, 1), layers=("up_blocks",)))
    assert out.losses.shape == (3, 1)


@pytest.fixture()
def inversions(toy_world, tmp_path):
    """Two fake 'inversions' per concept: the class noun's embedding (plain) and a scaled copy (semantic)."""
    for c in toy_world.concepts_of_interest[:2]:
        e = input_embeddings(toy_world.pipe, [c.superclass])[0]
        for s in (0, 1):
            save_embedding(V.inversion_file(tmp_path / "plain", c.name, s), c.token, e[None] * (1 + 0.1 * s))
            save_embedding(V.inversion_file(tmp_path / "semantic", c.name, s), c.token, 0.5 * e[None])
    return {"plain": tmp_path / "plain", "semantic": tmp_path / "semantic"}


def _layouts(toy_world):
    torch.manual_seed(0)
    dim = toy_world.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    feats = {n: torch.randn(dim) for n in toy_world.nouns}
    return V.Layouts(LayoutMLP(dim), feats)


def test_table1_records_resume_and_summary(toy_world, inversions, monkeypatch):
    cs = toy_world.concepts_of_interest[:2]
    partners_for = lambda c: partner_nouns(toy_world, c, ["kite", "car"], k=1)  # noqa: E731
    cache = inversions["plain"].parent / "table1.json"
    kw = dict(seeds=1, pair_seeds=1, inv_seeds=(0, 1), concepts=cs, cache=cache,
              guidance=GuidanceConfig(guided_steps=2, inner_iters=1), progress=False)
    toy_world.num_inference_steps = 4
    try:
        recs = V.table1(toy_world, partners_for, inversions, _layouts(toy_world), **kw)
        assert len(recs) == 4 * 2 * (2 + len(V.concept_pairs(toy_world, cs)))
        r = recs[0]
        assert set(r) == {"setting", "method", "concepts", "inv_seed", "partner", "seed", "prompt", "objects", "found",
                          "text_alignment", "image_alignment", "object_alignment"}
        assert r["prompt"] == f"a {cs[0].token} {cs[0].superclass} and {article(r['partner'])}"
        assert r["objects"] == [cs[0].superclass, r["partner"]]
        assert all(-1 <= x["text_alignment"] <= 1 and set(x["found"]) <= {0.0, 1.0} for x in recs)
        assert {x["inv_seed"] for x in recs} == {0, 1}
        assert {x["method"] for x in recs} == set(V.TABLE1_METHODS)
        # TI and +spatial differ (guidance changed the images); no placeholder is left loaded
        ti = V.column(recs, "noun", "TI", "text_alignment")
        sp = V.column(recs, "noun", "+spatial", "text_alignment")
        assert not np.allclose(ti, sp)
        assert cs[0].token not in toy_world.pipe.tokenizer.get_vocab()
        # resume: everything comes from the cache now
        monkeypatch.setattr(V, "evaluate_group", lambda *a, **k: pytest.fail("recomputed a cached group"))
        assert V.table1(toy_world, partners_for, inversions, _layouts(toy_world), **kw) == recs
        d, clusters, subs = V.paired_difference(recs, "noun", "+spatial", "text_alignment")
        np.testing.assert_allclose(np.sort(d), np.sort(sp - ti), atol=1e-6)
        assert set(clusters) == {c.name for c in cs} and set(subs) == {0, 1}
        with pytest.raises(ValueError, match="do not cover the same prompts"):
            V.paired_difference(recs[:-1], "concept", "+both", "coi")
        table = V.summarise(recs)
        assert table[("noun", "TI")]["n"][0] == 4 and set(V.METRICS) <= set(table[("noun", "TI")])
        # a cache made with other settings is refused, and left as it was
        before = cache.read_text()
        with pytest.raises(ValueError, match="other settings"):
            V.table1(toy_world, partners_for, inversions, _layouts(toy_world), **(kw | {"seeds": 2}))
        assert cache.read_text() == before
    finally:
        toy_world.num_inference_steps = 25


def test_evaluation_bad_input(toy_world, inversions, tmp_path):
    c = toy_world.concepts_of_interest[0]
    with pytest.raises(ValueError, match="unknown method"):
        V.evaluate_group(toy_world, "noun", "DreamBooth", [c], ["kite"], 1, inversions)
    with pytest.raises(ValueError, match="needs the layout MLP"):
        V.evaluate_group(toy_world, "noun", "+both", [c], ["kite"], 1, inversions)
    with pytest.raises(FileNotFoundError, match="run chapter 01"):
        V.evaluate_group(toy_world, "noun", "TI", [toy_world.concepts_of_interest[4]], ["kite"], 1, inversions)
    with pytest.raises(FileNotFoundError, match="with seed 7"):
        V.evaluate_group(toy_world, "noun", "TI", [c], ["kite"], 1, inversions, inv_seed=7)
    with pytest.raises(ValueError, match="unknown noun"):
        V.evaluate_group(toy_world, "noun", "TI", [c], ["zebra"], 1, inversions)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="move it away"):
        V.table1(toy_world, lambda c: ["kite"], inversions, None, cache=bad, progress=False)
    assert bad.read_text() == "{not json"


def test_measure_cost_counts_the_passes(toy_world):
    from compinv_utils.guidance import measure_cost

    cfg = GuidanceConfig(guided_steps=2, inner_iters=2)
    cost = measure_cost(toy_world, ["a cat and a kite"] * 2, ["cat", "kite"], BOXES, config=cfg, reps=1, runs=3,
                        num_inference_steps=4)
    assert cost["cfg_forwards"] == 4 and cost["guided_forward_backwards"] == 4
    assert cost["floor_ratio"] > 1 and cost["plain_s"] > 0 and cost["guided_s"] > 0
    assert cost["vs_floor"] == pytest.approx(cost["measured_ratio"] / cost["floor_ratio"])
    # three timed runs of each; the ratio is of the medians
    assert len(cost["plain_runs_s"]) == 3 and len(cost["guided_runs_s"]) == 3
    assert cost["plain_s"] == sorted(cost["plain_runs_s"])[1]
    assert cost["measured_ratio"] == pytest.approx(sorted(cost["guided_runs_s"])[1] / sorted(cost["plain_runs_s"])[1])
    with pytest.raises(ValueError, match="runs and reps must be at least 1"):
        measure_cost(toy_world, ["a cat and a kite"], ["cat", "kite"], BOXES, runs=0)
    with pytest.raises(ValueError, match="leave batch_size out"):
        measure_cost(toy_world, ["a cat and a kite"], ["cat", "kite"], BOXES, batch_size=1)


def _record(found, concepts=("mochi",), **kw):
    r = {"setting": "noun" if len(concepts) == 1 else "concept", "method": "TI", "concepts": list(concepts),
         "inv_seed": 0, "partner": "kite", "seed": 0, "found": found, "text_alignment": 0.3,
         "image_alignment": 0.5, "object_alignment": None}
    return r | kw


def test_table1_columns_on_a_hand_made_case():
    """Two images of "a S* cat and a kite": the first shows the cat only, the second both. CoI likelihood
    (the official definition: the prompt's last object, the partner) is 0.5; all found 0.5; class found 1."""
    recs = [_record([1.0, 0.0], object_alignment=0.7), _record([1.0, 1.0], seed=1)]
    assert [V.value(r, "coi") for r in recs] == [0.0, 1.0]
    assert [V.value(r, "all_found") for r in recs] == [0.0, 1.0]
    assert [V.value(r, "class_found") for r in recs] == [1.0, 1.0]
    row = V.summarise(recs)[("noun", "TI")]
    assert row["coi"][0] == 0.5 and row["all_found"][0] == 0.5 and row["class_found"][0] == 1.0
    assert row["object_alignment"][0] == pytest.approx(0.7)  # the undetected image does not count
    # two concepts: "a S* cat and a S' teddy" — CoI is the second concept's class
    pair = _record([0.0, 1.0], concepts=("mochi", "bruno"), partner=None)
    assert V.value(pair, "coi") == 1.0 and V.value(pair, "all_found") == 0.0 and V.value(pair, "class_found") == 0.5


def test_coi_detects_the_prompts_last_object():
    dets = [("cat", (0, 0, 0.5, 1), 0.9)]
    assert coi_found(dets, ["cat", "kite"]) == 0.0
    assert coi_found(dets + [("kite", (0.5, 0, 1, 1), 0.85)], ["cat", "kite"]) == 1.0
    assert all_found(dets, ["cat", "kite"]) == 0.0


def test_cluster_bootstrap_resamples_concepts_and_seeds():
    rng = np.random.default_rng(0)
    # 4 concepts, each with its own level; 3 seeds each; 20 images per seed
    levels = [0.1, 0.9, 0.2, 0.8]
    vals, cl, sub = [], [], []
    for k, lv in enumerate(levels):
        for s in range(3):
            for _ in range(20):
                vals.append(float(rng.random() < lv)); cl.append(k); sub.append(s)
    mean, lo, hi = cluster_bootstrap(vals, cl, sub, n_boot=1000)
    naive = bootstrap_ci(vals, n_boot=1000)
    assert mean == pytest.approx(np.mean(vals))
    assert lo < mean < hi
    assert (hi - lo) > 2 * (naive[2] - naive[1])  # clustered data: far wider than the image-level interval
    # identical concepts: the interval collapses onto the shared value
    assert cluster_bootstrap([1.0] * 6, [0, 0, 1, 1, 2, 2], [0, 1] * 3)[1:] == (1.0, 1.0)
    # NaN values are dropped; all-NaN and mismatched labels are errors
    assert cluster_bootstrap([1.0, np.nan, 0.0], [0, 0, 1])[0] == 0.5
    with pytest.raises(ValueError, match="no values"):
        cluster_bootstrap([np.nan], [0])
    with pytest.raises(ValueError, match="cluster"):
        cluster_bootstrap([1.0, 2.0], [0])


def test_partners_skip_what_the_photos_show(toy_world):
    indigo = toy_world.concept("indigo")
    assert "kite" in indigo.in_photos
    assert "kite" not in partner_nouns(toy_world, indigo)
    assert partner_nouns(toy_world, "barn")[0] == "kite"  # a bare superclass has no photos


def test_cluster_bootstrap_difference_of_two_samples():
    a, b = [1.0, 1.0, 0.8, 0.9], [0.0, 0.1, 0.2]
    d, lo, hi = cluster_bootstrap_diff(a, [0, 0, 1, 1], b, [0, 1, 2], a_sub=[0, 1, 0, 1])
    assert d == pytest.approx(np.mean(a) - np.mean(b)) and 0 < lo <= d <= hi


def test_cluster_t_interval_known_answer():
    # five concepts whose means are 1..5 (two seeds each, balanced): mean 3, s = 1.5811, t_{4, 0.975} = 2.7764
    vals = [0.5, 1.5, 2.0, 2.0, 2.5, 3.5, 4.0, 4.0, 5.5, 4.5]
    cl = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    mean, lo, hi = cluster_t_interval(vals, cl, [0, 1] * 5)
    half = 2.7764451 * np.sqrt(2.5) / np.sqrt(5)
    assert mean == pytest.approx(3.0) and lo == pytest.approx(3 - half) and hi == pytest.approx(3 + half)
    assert list(cluster_means(vals, cl, [0, 1] * 5)) == pytest.approx([1, 2, 3, 4, 5])
    # seeds are averaged before concepts: an unbalanced seed does not outweigh the others
    assert cluster_means([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], [0, 0, 0, 1])[0] == pytest.approx(0.5)
    # one concept: no spread to estimate, so no interval (and no claim)
    assert np.isnan(cluster_t_interval([1.0, 2.0], [0, 0])[1])
    assert not excludes_zero(cluster_t_interval([1.0, 2.0], [0, 0]))
    assert excludes_zero((0.2, 0.1, 0.3)) and excludes_zero((-0.2, -0.3, -0.1))
    assert not excludes_zero((0.2, -0.1, 0.3))
    with pytest.raises(ValueError, match="level"):
        cluster_t_interval(vals, cl, level=95)


def test_cluster_t_interval_covers_at_its_level_with_five_concepts():
    # 5 concepts drawn from N(0.3, 0.2²), 3 seeds each (seed sd 0.1), 8 images each: the t-interval covers the
    # true mean about 95 % of the time; a percentile bootstrap over the same 5 concepts covers far less
    rng = np.random.default_rng(1)
    hits_t = hits_b = 0
    runs = 300
    for _ in range(runs):
        vals, cl, sub = [], [], []
        for k in range(5):
            mu = 0.3 + 0.2 * rng.standard_normal()
            for s in range(3):
                nu = mu + 0.1 * rng.standard_normal()
                for x in nu + 0.05 * rng.standard_normal(8):
                    vals.append(x); cl.append(k); sub.append(s)
        _, lo, hi = cluster_t_interval(vals, cl, sub)
        hits_t += lo <= 0.3 <= hi
        _, lo, hi = cluster_bootstrap(vals, cl, sub, n_boot=200, seed=int(rng.integers(1 << 30)))
        hits_b += lo <= 0.3 <= hi
    assert 0.91 <= hits_t / runs <= 0.99
    assert hits_b / runs < hits_t / runs - 0.05


def test_cluster_t_interval_difference_of_two_samples():
    a, b = [1.0, 1.0, 0.8, 0.9, 0.7, 0.9], [0.0, 0.1, 0.2]
    d, lo, hi = cluster_t_interval_diff(a, [0, 0, 1, 1, 2, 2], b, [0, 1, 2], a_sub=[0, 1] * 3)
    ma, mb = np.array([1.0, 0.85, 0.8]), np.array([0.0, 0.1, 0.2])
    assert d == pytest.approx(ma.mean() - mb.mean()) and 0 < lo < d < hi
    va, vb = ma.var(ddof=1) / 3, mb.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    from scipy.stats import t
    assert hi - d == pytest.approx(t.ppf(0.975, df) * np.sqrt(va + vb))
