"""The measures of the toy world's prerequisites (compinv_utils.worldbuilding.quality): word-specific attention,
a concept's look on the object, FID-style sample quality. Tiny sizes; the figures themselves are
measured by ``python -m compinv_utils.worldbuilding.quality``."""

import numpy as np
import pytest
import torch

from compinv_utils.inversion import save_embedding, single_token_id
from compinv_utils.layout import box_to_mask
from compinv_utils.worldbuilding import quality as E
from compinv_utils.toy import render


@pytest.fixture
def fast(toy_world):
    """The toy world with 4 denoising steps for the duration of a test."""
    steps = toy_world.num_inference_steps
    toy_world.num_inference_steps = 4
    try:
        yield toy_world
    finally:
        toy_world.num_inference_steps = steps


@pytest.fixture(scope="module")
def probe_and_accuracy(toy_world):
    return E.train_attribute_probe(toy_world, n_scenes=400, epochs=8)


# -- pure functions ---------------------------------------------------------------------------------


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert E.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.zeros(8)
    shift[0] = 0.5
    # same covariance: the distance is the squared mean shift
    assert E.frechet_distance(x, x + shift) == pytest.approx(0.25, rel=1e-4)
    assert E.frechet_distance(x, x + 2 * shift) > E.frechet_distance(x, x + shift) > 0
    assert E.frechet_distance(x, 3 * x) > 1.0  # a wider spread counts too
    y = np.random.default_rng(1).normal(size=(300, 8))
    assert 0 < E.frechet_distance(x, y) < E.frechet_distance(x, y + shift)


def test_frechet_distance_of_rank_deficient_sets_is_finite_and_not_negative():
    x = np.random.default_rng(0).normal(size=(5, 16))  # fewer samples than dimensions
    d = E.frechet_distance(x, x[::-1])
    assert np.isfinite(d) and d >= 0
    with pytest.raises(ValueError, match="same D"):
        E.frechet_distance(x, x[:, :4])


def test_box_share_iou_and_centred_cosine_on_hand_made_maps():
    left, right = box_to_mask((0, 0, 0.5, 1), 8), box_to_mask((0.5, 0, 1, 1), 8)
    assert E.box_share(left, left) == pytest.approx(1.0)
    assert E.box_share(left, right) == pytest.approx(0.0)
    assert E.box_share(torch.ones(8, 8), left) == pytest.approx(0.5)
    assert E.map_iou(left, left) == pytest.approx(1.0)
    assert E.map_iou(left, right) == pytest.approx(0.0)
    assert E.map_iou(torch.ones(8, 8), left) == pytest.approx(0.5)
    assert E.centred_cosine(left, left) == pytest.approx(1.0)
    assert E.centred_cosine(left, right) == pytest.approx(-1.0)
    noise = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert -1 <= E.centred_cosine(noise, left) <= 1


def test_training_pairs_are_deterministic_and_never_held_out(toy_world):
    pairs = E.training_pairs(toy_world, 24, seed=0)
    assert pairs == E.training_pairs(toy_world, 24, seed=0)
    assert len(pairs) == 24 == len({tuple(sorted(p)) for p in pairs})
    assert not any(render.is_held_out(a, b) for a, b in pairs)
    assert all(a != b and a in toy_world.nouns and b in toy_world.nouns for a, b in pairs)


# -- the measures on the toy world --------------------------------------------------------------------


def test_attention_localisation_reports_shares_iou_and_cosine(fast):
    res = E.eval_attention_localisation(fast, n_pairs=3, seed=0)
    assert res["pairs"] == 3 and 0 <= res["n"] <= 3
    if res["n"]:
        for key in ("own_share", "partner_share", "uniform_own_share", "iou"):
            assert 0 <= res[key] <= 1, key
        assert -1 <= res["cosine"] <= 1
        assert res["own_minus_partner"] == pytest.approx(res["own_share"] - res["partner_share"])
        assert set(res["by_position"]) == {"first_noun", "second_noun"}


def test_attention_on_renderings_needs_no_detection_and_is_deterministic(toy_world):
    res = E.eval_attention_on_renderings(toy_world, n_pairs=4, timesteps=(500,), seed=0)
    assert res["pairs"] == 4 and res["timesteps"] == [500]
    for key in ("own_share", "partner_share", "uniform_own_share", "iou"):
        assert 0 <= res[key] <= 1, key
    assert res["own_share"] + res["partner_share"] <= 1 + 1e-6  # the two objects' masks do not overlap
    assert 0 < res["uniform_own_share"] < 0.5  # an object covers part of the 8x8 grid
    assert res["own_minus_partner"] == pytest.approx(res["own_share"] - res["partner_share"])
    assert E.eval_attention_on_renderings(toy_world, n_pairs=4, timesteps=(500,), seed=0) == res


def test_attribute_probe_reads_colour_well_above_chance(probe_and_accuracy):
    _, acc = probe_and_accuracy
    assert acc["n_test_scenes"] == 80
    for split in ("rendered", "vae_roundtrip"):
        for key in ("colour", "colour2", "colour_set_exact", "pattern"):
            assert 0 <= acc[split][key] <= 1
    # chance: the colour is among ~1.5 of 10 colours the probe names, about 0.15
    assert acc["rendered"]["colour"] > 0.5


def test_concept_look_skips_missing_inversions_and_unloads_the_token(fast, probe_and_accuracy, tmp_path):
    coi = fast.concepts_of_interest[0]
    pipe = fast.pipe
    row = pipe.text_encoder.get_input_embeddings().weight[single_token_id(pipe.tokenizer, coi.superclass)]
    save_embedding(tmp_path / "seed0" / coi.name, coi.token, row.detach()[None])
    res = E.eval_concept_look(fast, tmp_path, samples=2, probe=probe_and_accuracy[0])
    assert list(res["per_concept"]) == [coi.name]
    assert len(res["notes"]) == len(fast.concepts_of_interest) - 1 and "skipped" in res["notes"][0]
    assert coi.token not in pipe.tokenizer.get_vocab()
    r = res["per_concept"][coi.name]
    for name in ("with_token", "superclass"):
        assert 0 <= r[name]["detected"] <= 1
        assert np.isnan(r[name]["alignment"]) or -1 <= r[name]["alignment"] <= 1
        look = r[name]["look"]
        assert look["n"] <= 2
        assert all(np.isnan(look[k]) or 0 <= look[k] <= 1 for k in ("colour", "colour2", "pattern", "all"))
    assert r["photos"]["look"]["n"] == r["photos_vae_roundtrip"]["look"]["n"] == len(coi.photos)
    assert -1 <= r["photos_vae_roundtrip"]["alignment"] <= 1
    assert res["summary"]["concepts"] == 1


def test_look_from_words_prompts_each_concepts_look_in_the_caption_grammar(fast, probe_and_accuracy):
    res = E.eval_look_from_words(fast, samples=2, probe=probe_and_accuracy[0])
    assert list(res["per_concept"]) == [c.name for c in render.CONCEPTS] and res["probe"] == "given"
    mochi = res["per_concept"]["mochi"]
    assert mochi["words"]["prompt"] == "a photo of a purple striped cat"
    assert mochi["superclass"]["prompt"] == "a photo of a cat"
    assert res["per_concept"]["terra"]["words"]["prompt"] == "a photo of an orange dotted pot"
    for row in res["per_concept"].values():
        for name in ("words", "superclass"):
            assert 0 <= row[name]["detected"] <= 1 and row[name]["look"]["n"] == round(2 * row[name]["detected"])
    cp = [r["words"]["look"]["colour_pattern"] for r in res["per_concept"].values()]
    assert res["summary"]["concepts_colour_pattern_at_least_0.6_words"] == sum(v >= 0.6 for v in cp)


def test_pattern_kept_reads_patterned_objects_before_and_after_denoising(fast, probe_and_accuracy):
    res = E.eval_pattern_kept(fast, n=3, strengths=(0.5, 1.0), probe=probe_and_accuracy[0], other_strengths=(1.0,))
    assert res["n"] == 3 and res["strengths"] == [0.5, 1.0] and res["probe"] == "given"
    for key in ("rendered", "vae_roundtrip", "strength_0.5", "strength_1", "strength_1_other_named"):
        row = res[key]
        assert sum(row["read_as"].values()) == 3 and set(row["read_as"]) == set(render.PATTERNS)
        assert row["pattern_kept"] in (0, 1 / 3, 2 / 3, 1)
    other = res["strength_1_other_named"]  # kept and read as the named pattern cannot both hold for one object
    assert other["read_as_named"] in (0, 1 / 3, 2 / 3, 1) and other["read_as_named"] + other["pattern_kept"] <= 1
    assert "read_as_named" not in res["strength_1"]
    assert [E.other_pattern(p) for p in ("striped", "dotted", "checked")] == ["dotted", "checked", "striped"]
    with pytest.raises(ValueError, match="strengths"):
        E.eval_pattern_kept(fast, n=3, strengths=(0.0,), probe=probe_and_accuracy[0])
    with pytest.raises(ValueError, match="strengths"):
        E.eval_pattern_kept(fast, n=3, other_strengths=(1.5,), probe=probe_and_accuracy[0])
    with pytest.raises(ValueError, match="n must be"):
        E.eval_pattern_kept(fast, n=0, probe=probe_and_accuracy[0])


def test_seen_pairs_are_trained_pairs_and_generation_counts_them(fast):
    pairs = E.seen_pairs(16)
    assert len(set(pairs)) == 16 and pairs == E.seen_pairs(16)
    assert not any(render.is_held_out(a, b) for a, b in pairs)
    res = E.eval_generation(fast, per_noun=1, per_pair=1, n_seen_pairs=3)
    assert res["n_seen_pair"] == 3 and res["n_pair"] == len(render.HELD_OUT_PAIRS) and res["n_single"] == len(fast.nouns)
    assert res["seen_pair_both_detected"] in (0, 1 / 3, 2 / 3, 1)


def test_look_counts_colour_and_pattern_together_and_all_three_together():
    spec = render.CONCEPTS[0]  # purple, yellow, striped

    class Reads:  # what a probe would say of four crops
        def read(self, crops):
            return ([{spec.colour, spec.colour2}, {spec.colour}, {spec.colour2}, {spec.colour, spec.colour2}],
                    [spec.pattern, spec.pattern, spec.pattern, "plain"])

    look = E._look(Reads(), [None] * 4, spec)
    assert look == {"colour": 0.75, "colour2": 0.75, "pattern": 0.75, "colour_pattern": 0.5, "all": 0.25, "n": 4}


def test_detector_is_measured_on_renderings_and_on_their_vae_round_trips(fast):
    res = E.eval_detector(fast, n=8)
    assert res["n_scenes"] == 8
    assert 0 <= res["mAP"] <= 1 and 0 <= res["mAP_vae_roundtrip"] <= 1


def test_detector_on_pair_renderings_counts_both_nouns_per_pair(toy_world):
    res = E.detector_on_pairs(toy_world, per_pair=2)
    assert set(res) == {"held_out", "seen"}
    for name, pairs in (("held_out", render.HELD_OUT_PAIRS), ("seen", E.seen_pairs())):
        row = res[name]
        assert row["n"] == 2 * len(pairs)
        for kind in ("rendered", "vae_roundtrip"):
            per = row[f"per_pair_{kind}"]
            assert list(per) == [f"{a} + {b}" for a, b in pairs] and set(per.values()) <= {0.0, 0.5, 1.0}
            assert row[kind] == pytest.approx(np.mean(list(per.values())))


def test_sample_quality_reports_a_frechet_distance(fast):
    res = E.eval_sample_quality(fast, n=16, batch_size=16)
    assert res["n"] == 16 and res["feature_dim"] == 128
    for key in ("frechet_distance", "rendered_vs_rendered", "vae_roundtrip_vs_rendered"):
        assert np.isfinite(res[key]) and res[key] >= 0
    assert "not Inception" in res["features"]


def test_evaluate_names_its_parts_when_asked_for_an_unknown_one(tmp_path, capsys):
    for args in (["--skip", "detectors"], ["--only", "look", "fid"], ["--only", "look", "--skip", "quality"]):
        with pytest.raises(SystemExit):
            E.main(["--out", str(tmp_path / "q.json"), *args])
        err = capsys.readouterr().err
        assert "unknown part" in err or "not allowed with" in err
    assert not (tmp_path / "q.json").exists()


def test_pattern_variants_differ_in_the_pattern_word_alone():
    obj = render.sample_scene(3, n_objects=1).objects[0]
    caps = E.pattern_variants(obj, "snow")
    assert len(caps) == len(render.PATTERNS) and len(set(caps)) == len(caps)
    plain = caps[render.PATTERNS.index("plain")].split()
    assert not set(plain) & set(render.PATTERNS) and obj.colour in plain and obj.noun in plain
    for pattern, cap in zip(render.PATTERNS[1:], caps[1:]):
        words = cap.split()
        assert pattern in words and [w for w in words if w != pattern] == plain
    assert caps[0].endswith(render.BACKGROUNDS["snow"]) and not E.pattern_variants(obj)[0].endswith(
        render.BACKGROUNDS["snow"])


def test_pattern_token_states_are_read_at_the_pattern_word(toy_world):
    states = E.pattern_token_states(toy_world, colours=("red", "blue"), nouns=("cat", "car", "pot"))
    assert states.shape == (len(render.PATTERNS) - 1, 6, toy_world.pipe.text_encoder.config.hidden_size)
    assert torch.isfinite(states).all()
    assert not torch.allclose(states[0], states[1])  # two pattern words, two states
    nouns = E.pattern_token_states(toy_world, colours=("red",), nouns=("cat",), position="noun")
    assert nouns.shape == (len(render.PATTERNS) - 1, 1, states.shape[-1]) and not torch.allclose(nouns[0], states[0, :1])
    with pytest.raises(ValueError, match="position must be"):
        E.pattern_token_states(toy_world, position="colour")


def test_attribute_words_counts_every_rendering_and_every_detected_object(fast, probe_and_accuracy):
    res = E.eval_attribute_words(fast, n=6, per_prompt=1, probe=probe_and_accuracy[0])
    assert res["patterns"] == list(render.PATTERNS) and res["probe"] == "given"
    assert np.asarray(res["clip"]["confusion"]).sum() == 6 and 0 <= res["clip"]["colour_accuracy"] <= 1
    conf = np.asarray(res["generated"]["confusion"])
    assert conf.shape == (4, 4) and conf.sum() == res["generated"]["n"] <= 4 * len(E.PATTERN_NOUNS)
    assert res["generated"]["accuracy"] == pytest.approx(np.trace(conf) / max(conf.sum(), 1))
    cos = np.asarray(res["text_states"]["centred_cosine"])
    assert cos.shape == (3, 3) and np.allclose(np.diag(cos), 1, atol=1e-3) and np.allclose(cos, cos.T)
    for key in ("cosine", "noun_cosine", "eos_cosine", "noun_centred_cosine"):
        raw = np.asarray(res["text_states"][key])
        assert raw.shape == (3, 3) and np.allclose(np.diag(raw), 1, atol=1e-3) and (raw <= 1 + 1e-3).all(), key
    with pytest.raises(ValueError, match="at least 1"):
        E.eval_attribute_words(fast, n=0, probe=probe_and_accuracy[0])


def test_clip_words_is_the_first_two_links_of_attribute_words(toy_world):
    res = E.eval_clip_words(toy_world, n=5)
    assert set(res) == {"patterns", "clip", "text_states"} and np.asarray(res["clip"]["confusion"]).sum() == 5
    assert res == E.eval_clip_words(toy_world, n=5)  # deterministic
    with pytest.raises(ValueError, match="at least 1"):
        E.eval_clip_words(toy_world, n=0)


def test_fixed_captions_differ_in_the_attribute_words_alone():
    scene = render.concept_scenes(render.CONCEPTS[0])[1]  # mochi and its ball on grass
    cat, ball = scene.objects
    assert E.fixed_caption(scene) == f"a photo of a cat and {render.article(ball.noun)}"
    assert E.fixed_caption(scene, colour=True, pattern=True, colour2=True, background=True) == (
        f"a photo of a purple and yellow striped cat and {render.describe(ball, True, True, True)} "
        f"{render.BACKGROUNDS['grass']}")
    assert E.fixed_caption(scene, pattern=True).startswith("a photo of a striped cat and ")


def test_denoising_losses_are_paired_and_split_by_the_mask(toy_world):
    scenes = [render.sample_scene(7 + i, n_objects=1) for i in range(2)]
    images = [render.draw_scene(s)[0] for s in scenes]
    grid = toy_world.pipe.unet.config.sample_size
    masks = np.stack([render.object_masks(s, size=grid)[0] for s in scenes])
    same = [E.fixed_caption(s) for s in scenes]
    bands = ((0, 500), (500, 1000))
    out = E.denoising_losses(toy_world, images, {"a": same, "b": list(same), "c": ["a photo of a tree"] * 2},
                             masks=masks, repeats=2, bands=bands)
    assert [r["band"] for r in out["a"]] == [[0, 500], [500, 1000]]
    for ra, rb, rc in zip(out["a"], out["b"], out["c"]):
        assert ra == rb  # the same prompts on the same noise and timesteps: the same loss
        assert ra["all"] != rc["all"]
        lo, hi = sorted((ra["inside"], ra["outside"]))
        assert lo <= ra["all"] <= hi  # the whole latent's loss is a mix of the two regions'
    rel = E._relative(out, "a")
    assert all(r["all"] == 0 for r in rel["b"]) and rel["c"][0]["band"] == [0, 500]
    with pytest.raises(ValueError, match="one prompt per image"):
        E.denoising_losses(toy_world, images, {"a": same[:1]})


def test_inversion_objective_compares_token_words_and_setting_and_unloads_the_token(toy_world, tmp_path):
    coi = toy_world.concepts_of_interest[0]
    pipe = toy_world.pipe
    row = pipe.text_encoder.get_input_embeddings().weight[single_token_id(pipe.tokenizer, coi.superclass)]
    save_embedding(tmp_path / "seed0" / coi.name, coi.token, row.detach()[None])
    res = E.eval_inversion_objective(toy_world, tmp_path, repeats=1, generic_scenes=2)
    assert list(res["per_concept"]) == [coi.name] and "skipped" in res["notes"][0]
    assert coi.token not in pipe.tokenizer.get_vocab()
    r = res["per_concept"][coi.name]
    assert r["prompts"]["look"] == "a photo of a purple and yellow striped cat"
    assert r["prompts"]["setting"].endswith(render.BACKGROUNDS["grass"])
    assert all(x["all"] == 0 for x in r["relative"]["superclass"])
    assert len(r["loss"]["with_token"]) == len(E.NOISE_BANDS)
    assert set(res["summary"]["generic_high_noise"]) == {"colour", "colour_pattern", "colour_pattern_colour2",
                                                         "background", "all"}
    assert res["summary"]["concepts"] == 1
