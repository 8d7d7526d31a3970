"""The toy world's training pipeline at tiny sizes: data arrays, grounding loss, a 2-step UNet run, resume."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from compinv_utils.attention import AttentionStore, attention_store
from compinv_utils.toy import render
from compinv_utils.worldbuilding import train
from compinv_utils.toy.models import LATENT_CHANNELS, make_clip, make_unet
from compinv_utils.worldbuilding.tokenizer import build_tokenizer

N = 32
CFG = replace(train.PROFILES["smoke"], n_scenes=N, unet_steps=2, unet_batch=4, unet_checkpoint_every=1,
              ground_weight=1.0, ground_pixel_weight=0.1, ground_resolutions=(8, 4))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(render.caption_words())


@pytest.fixture(scope="module")
def rendered():
    return train.render_dataset(N, workers=1, captions=CFG.captions_per_scene, seed=CFG.seed)


@pytest.fixture(scope="module")
def data(tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first = train.load_or_render(CFG, tokenizer, 1, cache)
    assert train.data_cache_path(cache, CFG).is_file()
    again = train.load_or_render(CFG, tokenizer, 1, cache)  # read from the cache, not rendered
    assert all(np.array_equal(first[k], again[k]) for k in train.DATA_KEYS)
    first["latents"] = torch.randn(N, LATENT_CHANNELS, 8, 8)
    return first


def test_data_arrays_have_their_shapes_and_dtypes(data):
    K = CFG.captions_per_scene
    expected = {"images": ((N, 32, 32, 3), np.uint8), "labels": ((N, 2), np.int64), "boxes": ((N, 2, 4), np.float32),
                "masks": ((N, 2, 8, 8), np.bool_), "ids": ((N, K, 77), np.int32),
                "noun_object": ((N, K, 77), np.int8)}
    for key, (shape, dtype) in expected.items():
        assert data[key].shape == shape and data[key].dtype == dtype, key


def test_noun_tokens_point_at_the_objects_their_caption_names(data, rendered, tokenizer):
    nouns = sorted(render.NOUNS)
    attributes = set(render.COLOURS) | set(render.PATTERNS)
    for i in range(N):
        for c in range(CFG.captions_per_scene):
            text = rendered["captions"][i, c]
            positions = np.nonzero(data["noun_object"][i, c] >= 0)[0]
            named = [o.noun for o in rendered["scenes"][i].objects]
            assert len(positions) == len(named)  # every object's noun, and nothing else
            for pos in positions:
                obj = data["noun_object"][i, c, pos]
                word = tokenizer.convert_ids_to_tokens(int(data["ids"][i, c, pos])).removesuffix("</w>")
                assert word == nouns[data["labels"][i, obj]] and word in text.split() and word not in attributes
                assert data["masks"][i, obj].any()


def test_tokenised_captions_decode_back_to_their_text(data, rendered, tokenizer):
    for i in range(N):
        for c in range(CFG.captions_per_scene):
            text = tokenizer.decode(data["ids"][i, c].tolist(), skip_special_tokens=True)
            assert text.strip() == rendered["captions"][i, c]


def test_the_concepts_of_interest_never_appear_in_the_training_data(rendered):
    words = {w for caps in rendered["captions"] for cap in caps for w in cap.split()}
    assert not any(spec.token in words or spec.name in words for spec in render.CONCEPTS)
    assert render.has_concept_look(render.sample_scene(729))  # a random scene that happens to look like a concept
    redrawn = train.training_scene(729)
    assert not render.has_concept_look(redrawn) and redrawn == train.training_scene(729)
    assert train.training_scene(0) == render.sample_scene(0)


def _maps(inside: bool):
    """Hand-made attention: every noun token's mass entirely inside (or outside) its object's mask."""
    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    masks[:, 0, 1:4, 1:4] = True
    masks[:, 1, 5:7, 5:7] = True
    nouns = -torch.ones(2, 77, dtype=torch.long)
    nouns[:, 3], nouns[:, 6] = 0, 1
    probs = torch.full((2, 64, 77), 1e-9)
    for t, o in ((3, 0), (6, 1)):
        m = masks[:, o].flatten(1).float()
        probs[:, :, t] = m if inside else 1 - m
    return {"down": probs}, {"down": (8, 8)}, masks, nouns


def test_grounding_loss_is_zero_inside_the_masks_and_one_outside():
    tok_in, pix_in = train.grounding_loss(*_maps(True))
    tok_out, pix_out = train.grounding_loss(*_maps(False))
    assert tok_in.item() == pytest.approx(0, abs=1e-6) and tok_out.item() == pytest.approx(1, abs=1e-6)
    assert pix_in.item() < 1e-3 < 1 < pix_out.item()


def test_grounding_loss_gradient_reaches_the_unet(data):
    torch.manual_seed(0)
    unet = make_unet()
    store = AttentionStore(keep_similarity=False, keep_grad=True, resolutions=(8, 4))
    nouns = torch.from_numpy(data["noun_object"][:2, 0]).long()
    with attention_store(unet, store):
        unet(torch.randn(2, LATENT_CHANNELS, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 128))
    tok, pix = train.grounding_loss(store.maps[0], store.shapes, torch.from_numpy(data["masks"][:2]), nouns, (8, 4))
    (tok + pix).backward()
    grads = [p.grad for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_q" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_two_grounded_unet_steps_are_finite_and_resume_continues_at_the_checkpoint(data, tokenizer, tmp_path):
    clip = make_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder = train.text_tower(clip)
    device = torch.device("cpu")
    log = {}
    straight = train.train_unet(data, tokenizer, text_encoder, CFG, device, log, tmp_path)
    assert log["unet_start_step"] == 0
    for key in ("unet_final_loss", "unet_final_ground_loss", "unet_final_ground_pixel_loss"):
        assert np.isfinite(log[key]), key
    assert log["unet_steps_per_s"] > 0 and log["unet_samples_per_s"] > 0
    assert (tmp_path / train.UNET_STATE).is_file() and (tmp_path / "unet_ema_partial").is_dir()
    state = torch.load(tmp_path / train.UNET_STATE, weights_only=True)
    assert state["step"] == 1
    log2 = {}
    resumed = train.train_unet(data, tokenizer, text_encoder, CFG, device, log2, tmp_path, resume=True)
    assert log2["unet_start_step"] == 1 and np.isfinite(log2["unet_final_loss"])
    for a, b in zip(straight.parameters(), resumed.parameters()):  # the resumed run repeats the uninterrupted one
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="another configuration"):
        train.train_unet(data, tokenizer, text_encoder, replace(CFG, unet_lr=1e-3), device, {}, tmp_path, resume=True)


def test_profiles_and_resume_needs_the_unet_stage_alone():
    assert {"cpu-full", "gpu", "smoke", "full"} <= set(train.PROFILES)
    cpu = train.PROFILES["cpu-full"]
    # seconds per step measured on a 2-core CPU: VAE 0.94 at batch 64, UNet with grounding 0.62 at batch 32
    minutes = (cpu.vae_steps * 0.94 * cpu.vae_batch / 64 + cpu.unet_steps * 0.62 * cpu.unet_batch / 32) / 60
    assert minutes < 100  # the two stages whose per-step cost is known leave room for the rest in 2 hours
    assert cpu.ground_weight > 0 and train.PROFILES["gpu"].ground_weight > 0  # the second edition grounds nouns
    assert train.PROFILES["smoke"].ground_weight == 0 and train.TrainConfig().ground_weight == 0  # else opt-in
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out", "/nonexistent"])


def test_vae_loss_weights_objects_and_charges_a_pattern_averaged_into_its_mean():
    x = torch.zeros(1, 3, 8, 8)
    x[..., ::2] = 1  # vertical stripes of 0 and 1
    flat = torch.full_like(x, 0.5)  # the stripes averaged into their mean colour
    plain, mse = train.vae_loss(flat, x)
    edged, _ = train.vae_loss(flat, x, edge_weight=1.0)
    assert mse.item() == pytest.approx(0.25) and edged.item() > plain.item() + 0.4
    objects = torch.zeros(1, 8, 8)
    objects[:, :, :4] = 1
    wrong_on_object = x.clone()
    wrong_on_object[..., :4] += 0.5
    wrong_on_background = x.clone()
    wrong_on_background[..., 4:] += 0.5
    on_obj, _ = train.vae_loss(wrong_on_object, x, objects, object_weight=4.0)
    on_bg, _ = train.vae_loss(wrong_on_background, x, objects, object_weight=4.0)
    assert on_obj.item() == pytest.approx((1 + 4.0) * on_bg.item(), rel=1e-5)
    assert train.vae_loss(wrong_on_object, x)[0].item() == pytest.approx(train.vae_loss(wrong_on_background, x)[0].item())


def test_noise_loss_weights_object_cells_and_is_plain_mse_without_a_weight():
    noise = torch.zeros(2, 16, 8, 8)
    objects = torch.zeros(2, 8, 8)
    objects[:, 2:5, 2:5] = 1
    off_on_object = noise.clone()
    off_on_object[:, :, 3, 3] = 1.0  # wrong in one object cell
    off_on_background = noise.clone()
    off_on_background[:, :, 7, 7] = 1.0  # wrong in one background cell
    plain = train.noise_loss(off_on_object, noise)
    assert plain.item() == pytest.approx(torch.nn.functional.mse_loss(off_on_object, noise).item())
    assert train.noise_loss(off_on_object, noise, objects, 0.0).item() == pytest.approx(plain.item())
    on_obj = train.noise_loss(off_on_object, noise, objects, 4.0)
    on_bg = train.noise_loss(off_on_background, noise, objects, 4.0)
    assert on_obj.item() == pytest.approx(5 * on_bg.item(), rel=1e-5)  # one object cell counts 1 + 4 times
    assert on_bg.item() < plain.item() < on_obj.item()
    with pytest.raises(ValueError, match="latent grid"):
        train.noise_loss(off_on_object, noise, objects[:, :4], 4.0)


def test_object_pixels_upsample_the_latent_masks():
    masks = np.zeros((1, 2, 8, 8), bool)
    masks[0, 0, 1, 2] = masks[0, 1, 5, 5] = True
    px = train.object_pixels(masks)
    assert px.shape == (1, 32, 32) and px.sum().item() == 2 * 16
    assert px[0, 4:8, 8:12].all() and px[0, 20:24, 20:24].all()


def test_stages_left_out_are_loaded_from_another_world(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    cfg = replace(train.PROFILES["smoke"], n_scenes=64)
    train.build_world(source, cfg, torch.device("cpu"), 1, cache_dir=None)
    log = train.build_world(out, cfg, torch.device("cpu"), 1, stages=("unet",), source=source)
    assert log["loaded_from"] == str(source) and log["stages"] == ["unet"]
    for part in ("clip", "detector", "pipeline/unet", "pipeline/vae", "training_log.json"):
        assert (out / part).exists(), part
    assert not (source / "pipeline" / "unet").samefile(out / "pipeline" / "unet")
    with pytest.raises(FileNotFoundError, match="is missing from"):
        train.build_world(tmp_path / "third", cfg, torch.device("cpu"), 1, stages=("unet",), source=out / "pipeline")


def test_caption_policy_reaches_the_captions_and_keys_its_own_cache(tmp_path, capsys):
    always = render.CaptionPolicy(p_colour=0.0, p_pattern=1.0, p_background=0.0, p_colour2=0.0)
    data = train.render_dataset(24, workers=1, captions=2, seed=0, policy=always)
    patterned = 0
    for scene, caps in zip(data["scenes"], data["captions"]):
        for cap in caps:
            words = set(cap.split())
            assert not words & set(render.COLOURS) and not words & set(render.BACKGROUNDS)  # never named
            for o in scene.objects:  # always named
                if o.pattern != "plain":
                    assert o.pattern in words
                    patterned += 1
    assert patterned > 0
    default = train.data_cache_path(tmp_path, CFG)
    assert default == train.data_cache_path(tmp_path, replace(CFG, caption_policy=render.CaptionPolicy()))
    assert default != train.data_cache_path(tmp_path, replace(CFG, caption_policy=always))
    for bad in ("0.5,2,0.5,0.5", "0.5,0.5", "a,b,c,d"):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path), "--profile", "smoke", "--caption-policy", bad])
        assert "--caption-policy takes four probabilities" in capsys.readouterr().err


def test_a_time_budget_stops_the_unet_stage_and_the_log_says_where(data, tokenizer, tmp_path, capsys):
    clip = make_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder = train.text_tower(clip)
    cfg = replace(CFG, unet_steps=10_000, unet_checkpoint_every=10_000, unet_time_budget_s=1.0)
    log = {}
    train.train_unet(data, tokenizer, text_encoder, cfg, torch.device("cpu"), log, tmp_path)
    stopped = log["unet_stopped_by_time_budget_at_step"]
    assert 1 <= stopped < 10_000 and log["unet_steps_done"] == stopped and np.isfinite(log["unet_final_loss"])
    log = {}
    train.train_unet(data, tokenizer, text_encoder, replace(CFG, unet_time_budget_s=600.0), torch.device("cpu"), log,
                     tmp_path / "b")
    assert "unet_stopped_by_time_budget_at_step" not in log and log["unet_steps_done"] == CFG.unet_steps
    for flag, bad in (("--unet-minutes", "0"), ("--ground-resolutions", "16")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path), "--profile", "smoke", flag, bad])
        assert flag in capsys.readouterr().err


def test_the_detector_data_set_holds_the_held_out_pairs_and_the_generator_data_never_does(tmp_path):
    def pairs(held_out):
        scenes = [train.training_scene(s, held_out) for s in range(1500)]
        return [tuple(o.noun for o in sc.objects) for sc in scenes if len(sc.objects) == 2]
    assert not any(render.is_held_out(*p) for p in pairs(False))
    assert sum(render.is_held_out(*p) for p in pairs(True)) > 20  # about 1 pair scene in 10
    assert train.TrainConfig().detector_sees_held_out and all(p.detector_sees_held_out for p in train.PROFILES.values())
    assert train.data_cache_path(tmp_path, CFG) != train.data_cache_path(tmp_path, CFG, held_out=True)


def test_unet_widths_shape_the_unet_and_bad_widths_are_refused(tmp_path, capsys):
    wide = make_unet(widths=(128, 128))
    assert tuple(wide.config.block_out_channels) == (128, 128)
    assert tuple(make_unet().config.block_out_channels) == train.TrainConfig().unet_widths == (64, 128)
    out = wide(torch.randn(1, LATENT_CHANNELS, 8, 8), torch.tensor([10]), torch.randn(1, 77, 128)).sample
    assert out.shape == (1, LATENT_CHANNELS, 8, 8)
    for bad in ((64,), (48, 128), (0, 64)):
        with pytest.raises(ValueError, match="multiples of 32"):
            make_unet(widths=bad)
    for bad in ("64", "64,100", "a,b"):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path), "--profile", "smoke", "--unet-widths", bad])
        assert "--unet-widths takes two positive multiples of 32" in capsys.readouterr().err
    gpu = train.PROFILES["gpu-short"]  # one device call of under 10 minutes: the UNet stage alone, big batches
    assert gpu.unet_batch >= 1024 and gpu.ground_weight > 0


def test_data_only_renders_the_cache_and_trains_nothing(tmp_path, capsys):
    train.main(["--out", str(tmp_path / "world"), "--profile", "smoke", "--data-only", "--workers", "1",
                "--cache-dir", str(tmp_path / "cache")])
    cached = train.data_cache_path(tmp_path / "cache", train.PROFILES["smoke"])
    assert cached.is_file() and str(cached) in capsys.readouterr().out
    assert not (tmp_path / "world").exists()
    with np.load(cached) as f:
        assert f["images"].shape[0] == train.PROFILES["smoke"].n_scenes
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--profile", "smoke", "--data-only", "--no-cache"])


def test_pattern_negatives_change_one_objects_pattern_in_words(tokenizer):
    full = train.render_dataset(40, workers=1, captions=1, policy=render.FULL)
    ids, noun_object = train.tokenise_captions(full["captions"], full["labels"], tokenizer)
    ids, noun_object = ids[:, 0], noun_object[:, 0]
    pattern_ids = {p: tokenizer.convert_tokens_to_ids(p + "</w>") for p in render.PATTERNS if p != "plain"}
    seen = set()
    for seed in range(3):
        negs = train.pattern_negatives(ids, noun_object, pattern_ids, tokenizer.pad_token_id,
                                       np.random.default_rng(seed))
        assert negs.shape == ids.shape
        for r, (neg, pos) in enumerate(zip(negs, ids)):
            words = tokenizer.decode(pos, skip_special_tokens=True).split()
            text = tokenizer.decode(neg, skip_special_tokens=True).split()
            assert [w for w in text if w not in pattern_ids] == [w for w in words if w not in pattern_ids]  # rest kept
            if len(text) == len(words):  # one pattern word swapped for another
                diff = [(a, b) for a, b in zip(words, text) if a != b]
                assert len(diff) == 1 and diff[0][0] in pattern_ids and diff[0][1] in pattern_ids
                seen.add("swapped")
            else:  # one pattern word left out, or one added before a plain object's noun
                assert abs(len(text) - len(words)) == 1
                seen.add("dropped" if len(text) < len(words) else "added")
                if len(text) > len(words):
                    i = next(i for i, (a, b) in enumerate(zip(words + [None], text)) if a != b)
                    assert text[i] in pattern_ids and text[i + 1] in render.NOUNS
    assert seen == {"swapped", "dropped", "added"}
    with pytest.raises(ValueError, match="names no noun"):
        train.pattern_negatives(ids[:1], np.full_like(noun_object[:1], -1), pattern_ids, 0, np.random.default_rng(0))


def test_clip_stage_with_pattern_negatives_starts_from_a_saved_clip(data, tokenizer, tmp_path, capsys):
    clip = make_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    clip.save_pretrained(tmp_path / "clip")
    data = dict(data, recon=data["images"])
    cfg = replace(CFG, clip_steps=2, clip_batch=8, clip_lr=1e-4, clip_pattern_negatives=True)
    with pytest.raises(ValueError, match="always name the pattern"):  # the generator's captions name it half the time
        train.train_clip(data, tokenizer, cfg, torch.device("cpu"), {})
    cfg = replace(cfg, clip_caption_policy=render.FULL)
    log = {}
    tuned = train.train_clip(data, tokenizer, cfg, torch.device("cpu"), log, init=tmp_path / "clip")
    assert np.isfinite(log["clip_final_loss"]) and log["clip_pattern_negatives_per_batch"] > 0
    moved = [not torch.equal(a, b) for a, b in zip(clip.parameters(), tuned.parameters())]
    assert any(moved)
    log = {}
    train.train_clip(data, tokenizer, replace(cfg, clip_pattern_negatives=False), torch.device("cpu"), log)
    assert "clip_pattern_negatives_per_batch" not in log and np.isfinite(log["clip_final_loss"])
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--profile", "smoke", "--stages", "unet", "--init-clip", str(tmp_path)])
    assert "--init-clip starts the CLIP stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--profile", "smoke", "--clip-lr", "0"])
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--profile", "smoke", "--clip-pattern-negatives"])
    assert "needs --clip-full-captions" in capsys.readouterr().err


def test_the_clip_stage_renders_its_own_captions_when_its_policy_differs(tmp_path):
    cfg = replace(train.PROFILES["smoke"], n_scenes=48, clip_steps=2, clip_batch=8, clip_caption_policy=render.FULL,
                  clip_pattern_negatives=True)
    source = tmp_path / "source"
    train.build_world(source, replace(cfg, clip_caption_policy=None, clip_pattern_negatives=False),
                      torch.device("cpu"), 1, cache_dir=tmp_path / "cache")
    log = train.build_world(tmp_path / "out", cfg, torch.device("cpu"), 1, stages=("clip",), source=source,
                            cache_dir=tmp_path / "cache", init_clip=source / "clip")
    assert train.data_cache_path(tmp_path / "cache", replace(cfg, caption_policy=render.FULL)).is_file()
    assert log["init_clip"] == str(source / "clip") and log["clip_pattern_negatives_per_batch"] == 8


def test_a_16x16_latent_grid_reaches_the_vae_unet_masks_and_grounding(tmp_path, capsys):
    from compinv_utils.toy.models import check_latent_size, make_vae, vae_latent_size

    vae = make_vae(latent_size=16)
    assert vae_latent_size(vae) == 16 and vae_latent_size(make_vae()) == 8
    assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode().shape == (1, LATENT_CHANNELS, 16, 16)
    for bad in (4, 12, 32):
        with pytest.raises(ValueError, match="latent grid is 8 or 16"):
            check_latent_size(bad)
    cfg = replace(train.PROFILES["smoke"], n_scenes=24, vae_steps=2, unet_steps=2, unet_batch=4, latent_size=16,
                  ground_weight=1.0, ground_pixel_weight=0.1, ground_resolutions=(16, 8))
    assert train.data_cache_path(tmp_path, cfg) != train.data_cache_path(tmp_path, replace(cfg, latent_size=8))
    source = tmp_path / "source"  # CLIP and detector of an 8x8 world, then a new 16x16 VAE and UNet on them
    train.build_world(source, replace(train.PROFILES["smoke"], n_scenes=24), torch.device("cpu"), 1, cache_dir=None)
    log = train.build_world(tmp_path / "w16", cfg, torch.device("cpu"), 1, stages=("vae", "unet"), source=source,
                            cache_dir=tmp_path / "cache")
    assert np.isfinite(log["unet_final_ground_loss"]) and log["unet_steps_done"] == 2
    with np.load(train.data_cache_path(tmp_path / "cache", cfg), allow_pickle=True) as f:
        assert f["masks"].shape == (24, 2, 16, 16)
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "w16" / "pipeline", safety_checker=None)
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    # a UNet stage on a VAE of the other grid, and grounding maps the grid does not have, are refused
    with pytest.raises(ValueError, match="pass --latent-size 8 --latent-channels 16"):
        train.build_world(tmp_path / "bad", cfg, torch.device("cpu"), 1, stages=("unet",), source=source)
    train.main(["--out", str(tmp_path / "x"), "--profile", "smoke", "--latent-size", "16", "--ground-resolutions",
                "16,8", "--data-only", "--workers", "1", "--cache-dir", str(tmp_path / "c2")])
    for args, flag in ((["--latent-size", "12"], "--latent-size"), (["--latent-channels", "0"], "--latent-channels"),
                       (["--latent-size", "16", "--ground-resolutions", "4"], "--ground-resolutions takes 16, 8")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path / "x"), "--profile", "smoke", *args])
        assert flag in capsys.readouterr().err
