"""The inversion-method protocol: textual inversion, Custom Diffusion and DreamBooth on the toy world (a few
steps each), saved and loaded with diffusers' own loaders into fresh pipelines, attention recording and guidance
through Custom Diffusion's processors, and one step of each method on an SD 1.5-shaped model."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from compinv_utils import load_world
from compinv_utils.anchors import AnchorLoss
from compinv_utils.attention import AttentionStore, StoreProcessor, attention_store, cross_attention_layers
from compinv_utils.guidance import GuidanceConfig, guided_generate
from compinv_utils.inversion import InversionConfig, invert, unload
from compinv_utils.methods import (DREAMBOOTH_LAMBDA, METHODS, CustomDiffusionConfig, DreamBoothConfig, Fitted,
                                   Handle, InversionMethod, get_method)
from compinv_utils.methods.base import resolve_config
from compinv_utils.methods.custom_diffusion import WEIGHT_NAME, custom_diffusion_processors, custom_diffusion_types
from compinv_utils.world import World
from sd15_shapes import sd15_pipeline

STEPS = 4  # denoising steps of the images compared here
BOXES = [(0.0, 0.1, 0.5, 0.9), (0.5, 0.1, 1.0, 0.9)]


def _fresh_world():
    world = load_world("toy", device="cpu")
    world.num_inference_steps = STEPS  # also the class images' steps
    return world


def _concept(world, token, k=0):
    return dataclasses.replace(world.concepts_of_interest[k], token=token)


def _image(world, prompt, seed=5):
    return np.asarray(world.generate(prompt, seed=seed, num_inference_steps=STEPS)[0], dtype=int)


def _same_processors(unet, procs) -> bool:
    now = unet.attn_processors
    return set(now) == set(procs) and all(now[k] is v for k, v in procs.items())


class Spy:
    """A hook that records what it was shown and delegates to a (rec, e, step) loss."""

    def __init__(self, inner):
        self.inner, self.names, self.grads = inner, None, []

    def __call__(self, rec, e, step, params=None):
        self.names = sorted(params)
        self.grads.append(all(p.requires_grad for p in params.values()))
        return self.inner(rec, e, step)

    @property
    def last_log(self):
        return self.inner.last_log


# -- the registry ---------------------------------------------------------------------------------------------


def test_registry_and_errors(toy_world):
    assert set(METHODS) == {"ti", "custom_diffusion", "dreambooth"}
    for name, m in METHODS.items():
        assert isinstance(m, InversionMethod) and m.name == name and get_method(name) is m
    assert get_method("Custom-Diffusion") is METHODS["custom_diffusion"]
    assert get_method(METHODS["ti"]) is METHODS["ti"]
    with pytest.raises(ValueError, match="unknown inversion method 'lora'.*ti, custom_diffusion, dreambooth"):
        get_method("lora")
    with pytest.raises(TypeError, match="a name"):
        get_method(3)
    c = toy_world.concepts_of_interest[0]
    with pytest.raises(TypeError, match="takes a CustomDiffusionConfig, got InversionConfig"):
        get_method("custom_diffusion").fit(toy_world, c, InversionConfig(steps=1))
    with pytest.raises(TypeError, match="textual inversion takes an InversionConfig"):
        get_method("ti").fit(toy_world, c, DreamBoothConfig(steps=1))
    with pytest.raises(ValueError, match="class_images must be an integer >= 0"):
        get_method("dreambooth").fit(toy_world, c, DreamBoothConfig(steps=1, class_images=-1))
    with pytest.raises(ValueError, match="weights_lr"):
        get_method("custom_diffusion").fit(toy_world, c, CustomDiffusionConfig(steps=1, weights_lr=0.0))
    assert METHODS["ti"].anchor_lambda(toy_world) == toy_world.settings.lam
    assert METHODS["custom_diffusion"].anchor_lambda(toy_world) == toy_world.settings.lam
    assert METHODS["dreambooth"].anchor_lambda(toy_world) == toy_world.settings.lam  # one rule for every method
    assert DREAMBOOTH_LAMBDA == 0.6  # the paper's SD 1.5 weights, kept for reference
    assert not toy_world.pipe.tokenizer.get_vocab().keys() & {c.token}  # nothing was left behind


def test_textual_inversion_through_the_protocol_is_invert(toy_world, tmp_path):
    m, pipe = get_method("ti"), toy_world.pipe
    c = _concept(toy_world, "<pti>")
    cfg = InversionConfig(steps=3, batch_size=2)
    try:
        direct = invert(pipe, c.photos, c.token, c.superclass, cfg, progress=False)
        unload(pipe, c.token)
        fitted = m.fit(toy_world, c, cfg, progress=False)
        assert isinstance(fitted, Fitted) and torch.equal(fitted.embeddings, direct.embeddings)
        assert fitted.losses == direct.losses
        folder = m.save(fitted, tmp_path / "pti")
        direct.save(tmp_path / "direct.safetensors")
        assert (folder / "learned_embeds.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()
        image = _image(toy_world, f"a photo of a {c.token} {c.superclass}")
        m.unload(pipe, fitted.handle)
        assert c.token not in pipe.tokenizer.get_vocab()
        handle = m.load(pipe, folder)
        assert handle.token == c.token and np.array_equal(_image(toy_world, f"a photo of a {c.token} {c.superclass}"),
                                                          image)
        m.unload(pipe, handle)
        assert c.token not in pipe.tokenizer.get_vocab()
        seen = []  # a hook that takes params sees what textual inversion trains: the token's rows
        m.fit(toy_world, c, dataclasses.replace(cfg, steps=1),
              loss_fn=lambda rec, e, step, params: seen.append({k: v is e for k, v in params.items()}) or rec,
              progress=False)
        m.unload(pipe, Handle(c.token))
        assert seen == [{"token": True}]
        assert resolve_config(m, cfg, 1) == dataclasses.replace(cfg, seed=1)  # fit(seed=...) replaces config.seed
        assert resolve_config(m, None, None) == InversionConfig()
    finally:
        unload(pipe, c.token)


# -- Custom Diffusion -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh():
    """A freshly loaded toy world that saved concepts are loaded into (each test leaves it as it found it)."""
    world = _fresh_world()
    procs, unet = dict(world.pipe.unet.attn_processors), world.pipe.unet
    yield world
    assert world.pipe.unet is unet and _same_processors(unet, procs)

CD = CustomDiffusionConfig(steps=3, batch_size=2, class_images=2, weights_lr=1e-3)


@pytest.fixture(scope="module")
def cd(tmp_path_factory):
    """A fresh toy world with a Custom Diffusion concept fitted (3 steps) and saved."""
    world = _fresh_world()
    m, c = get_method("custom_diffusion"), _concept(world, "<cd>")
    plain = _image(world, "a cat and a kite")
    before = dict(world.pipe.unet.attn_processors)
    spy = Spy(AnchorLoss.for_world(world, lam=m.anchor_lambda(world)))
    fitted = m.fit(world, c, CD, loss_fn=spy, progress=False)
    folder = m.save(fitted, tmp_path_factory.mktemp("cd") / c.name)
    yield dict(world=world, m=m, c=c, fitted=fitted, folder=folder, plain=plain, before=before, spy=spy,
               prompt=f"a photo of a {c.token} {c.superclass}")
    m.unload(world.pipe, fitted.handle)


def test_custom_diffusion_trains_the_token_and_cross_attention_key_value(cd):
    world, fitted = cd["world"], cd["fitted"]
    unet = world.pipe.unet
    procs = unet.attn_processors
    assert _same_processors(unet, fitted.weights)
    layers = cross_attention_layers(unet)
    for name, proc in procs.items():
        assert isinstance(proc, custom_diffusion_types())
        assert proc.train_kv == (name in layers) and not proc.train_q_out
        assert not any(p.requires_grad for p in proc.parameters())
    attn = unet.get_submodule(layers[0][: -len(".processor")])
    assert not torch.equal(procs[layers[0]].to_k_custom_diffusion.weight, attn.to_k.weight)  # trained
    assert cd["c"].token in world.pipe.tokenizer.get_vocab()
    # the hook saw the token and every trained key/value projection, all trainable at the time
    spy = cd["spy"]
    assert spy.names == sorted(["token"] + [f"unet.{n}.to_{kv}_custom_diffusion.weight" for n in layers for kv in "kv"])
    assert all(spy.grads)
    assert [e["step"] for e in fitted.log] == [0, 1, 2]
    assert {"rec", "prior", "anchors", "anc"} <= set(fitted.log[0])
    lam = spy.inner.lam
    for e, loss in zip(fitted.log, fitted.losses):  # (1 − λ) L_rec + λ L_anc + 1 · L_prior
        assert loss == pytest.approx((1 - lam) * e["rec"] + lam * e["anc"] + e["prior"], rel=1e-5)


def test_custom_diffusion_loads_with_diffusers_into_a_fresh_pipeline(cd, fresh):
    folder = cd["folder"]
    assert {p.name for p in folder.iterdir()} == {WEIGHT_NAME, "learned_embeds.safetensors", "method.json"}
    fitted_image = _image(cd["world"], cd["prompt"])
    pipe = fresh.pipe
    before = dict(pipe.unet.attn_processors)
    try:
        # diffusers' own loaders (0.42 installs the processors only when given the pipeline: diffusers issue #9320)
        pipe.unet.load_attn_procs(str(folder), weight_name=WEIGHT_NAME, _pipeline=pipe)
        pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
        assert all(isinstance(p, custom_diffusion_types()) for p in pipe.unet.attn_processors.values())
        diff = np.abs(_image(fresh, cd["prompt"]) - fitted_image).max()
        assert diff <= 1  # the loader builds CustomDiffusionAttnProcessor, the fit used its 2_0 sibling
    finally:
        pipe.unet.set_attn_processor(before)
        unload(pipe, cd["c"].token)


def test_custom_diffusion_protocol_load_and_unload_restore_the_pipeline(cd, fresh):
    pipe, m = fresh.pipe, cd["m"]
    before = dict(pipe.unet.attn_processors)
    plain = _image(fresh, "a cat and a kite")
    handle = m.load(pipe, cd["folder"])
    assert handle.token == cd["c"].token
    assert np.abs(_image(fresh, cd["prompt"]) - _image(cd["world"], cd["prompt"])).max() <= 1
    m.unload(pipe, handle)
    assert _same_processors(pipe.unet, before) and cd["c"].token not in pipe.tokenizer.get_vocab()
    assert np.array_equal(_image(fresh, "a cat and a kite"), plain)
    with pytest.raises(ValueError, match="holds a 'custom_diffusion' concept"):
        get_method("dreambooth").load(pipe, cd["folder"])
    assert _same_processors(pipe.unet, before)


def test_evaluation_loads_and_unloads_through_the_method(cd, fresh, tmp_path):
    from compinv_utils import evaluation as V

    pipe, c = fresh.pipe, cd["c"]
    before = dict(pipe.unet.attn_processors)
    cd["m"].save(cd["fitted"], V.inversion_folder(tmp_path / "plain", c.name, 0))
    recs = V.evaluate_group(fresh, "noun", "TI", [c], ["kite"], 1, {"plain": tmp_path / "plain"},
                            block="custom_diffusion")
    assert len(recs) == 1 and recs[0]["inversion_method"] == "custom_diffusion"
    assert recs[0]["prompt"] == f"a {c.token} {c.superclass} and a kite"
    assert _same_processors(pipe.unet, before) and c.token not in pipe.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="same placeholder '<cd>'"):  # one concept twice is not a composition
        V.evaluate_group(fresh, "concept", "TI", [c, c], [], 1, {"plain": tmp_path / "plain"},
                         block="custom_diffusion")
    assert _same_processors(pipe.unet, before) and c.token not in pipe.tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="get_method\\('dreambooth'\\)"):
        V.evaluate_group(fresh, "noun", "TI", [c], ["kite"], 1, {"plain": tmp_path / "none"},
                         block="dreambooth")


def test_recording_attention_wraps_custom_diffusion_processors(cd):
    world = cd["world"]
    unet, pipe = world.pipe.unet, world.pipe
    procs = dict(unet.attn_processors)
    cond, _ = pipe.encode_prompt(cd["prompt"], "cpu", 1, True)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = unet(x, 500, cond).sample
        with attention_store(unet, AttentionStore(average_heads=False)) as store:
            inside = dict(unet.attn_processors)
            got = unet(x, 500, cond).sample
    assert torch.equal(ref, got)  # the layers' outputs are the Custom Diffusion processors' own
    assert _same_processors(unet, procs)  # the very same objects are back
    layers = cross_attention_layers(unet)
    assert all(isinstance(inside[n], StoreProcessor) and inside[n].inner is procs[n] for n in layers)
    assert all(inside[n] is procs[n] for n in procs if n not in layers)
    assert set(store.maps[0]) == set(layers)
    # the recorded probabilities use the processor's key projection: zero it and every token gets 1/77
    name = layers[0]
    saved = procs[name].to_k_custom_diffusion.weight.detach().clone()
    with torch.no_grad():
        procs[name].to_k_custom_diffusion.weight.zero_()
        try:
            with attention_store(unet, AttentionStore(average_heads=False)) as store:
                unet(x, 500, cond)
        finally:
            procs[name].to_k_custom_diffusion.weight.copy_(saved)
    assert torch.allclose(store.maps[0][name], torch.full_like(store.maps[0][name], 1 / 77))
    assert not torch.allclose(store.maps[0][layers[1]], torch.full_like(store.maps[0][layers[1]], 1 / 77))
    # with keep_grad the maps are differentiable through the wrapped processors
    z = x.clone().requires_grad_(True)
    with attention_store(unet, AttentionStore(keep_grad=True, keep_similarity=False)) as store:
        unet(z, 500, cond)
        (g,) = torch.autograd.grad(store.token_maps()[0, 5].sum(), z)
    assert g.abs().sum() > 0 and _same_processors(unet, procs)


def test_query_projection_of_custom_diffusion_is_used_when_trained(fresh):
    unet = fresh.pipe.unet
    before = dict(unet.attn_processors)
    procs = custom_diffusion_processors(unet, train_q_out=True)
    unet.set_attn_processor(dict(procs))
    try:
        name = cross_attention_layers(unet)[0]
        with torch.no_grad():
            procs[name].to_q_custom_diffusion.weight.zero_()
            cond, _ = fresh.pipe.encode_prompt("a cat", "cpu", 1, True)
            with attention_store(unet) as store:
                unet(torch.randn(1, unet.config.in_channels, 8, 8), 500, cond)
        assert torch.allclose(store.maps[0][name], torch.full_like(store.maps[0][name], 1 / 77))
        assert _same_processors(unet, procs)
    finally:
        unet.set_attn_processor(before)


def test_guidance_through_custom_diffusion_processors_moves_attention_into_the_boxes(cd):
    world = cd["world"]
    procs = dict(world.pipe.unet.attn_processors)
    kw = dict(seeds=[0, 1], num_inference_steps=8, record=True)
    prompts, words = ["a cat and a kite"] * 2, ["cat", "kite"]
    boxes = BOXES[::-1]  # against the world's layout (cat on the left), so the attention starts outside the boxes
    plain = guided_generate(world, prompts, words, boxes, config=GuidanceConfig(guided_steps=0), **kw)
    guided = guided_generate(world, prompts, words, boxes, config=GuidanceConfig(guided_steps=3, step_size=300), **kw)
    assert np.all(guided.inside[:3].mean(0) > plain.inside[:3].mean(0))  # every image, both words
    assert guided.losses[-1].mean() < guided.losses[0].mean()
    assert _same_processors(world.pipe.unet, procs)


def test_custom_diffusion_unload_restores_the_fitted_pipeline(cd):
    world, m = cd["world"], cd["m"]
    m.unload(world.pipe, cd["fitted"].handle)
    assert _same_processors(world.pipe.unet, cd["before"])
    assert cd["c"].token not in world.pipe.tokenizer.get_vocab()
    assert np.array_equal(_image(world, "a cat and a kite"), cd["plain"])


# -- DreamBooth -----------------------------------------------------------------------------------------------


@pytest.fixture()
def quick_toy(toy_world):
    """The session's toy world with 4-step sampling, put back as it was afterwards."""
    pipe, unet, procs = toy_world.pipe, toy_world.pipe.unet, dict(toy_world.pipe.unet.attn_processors)
    toy_world.num_inference_steps = STEPS
    try:
        yield toy_world
    finally:
        toy_world.num_inference_steps = 25
        pipe.unet = unet
        unet.set_attn_processor(procs)
        for t in ("<db>", "<fail>"):
            unload(pipe, t)


def test_dreambooth_fit_save_load_and_unload(quick_toy, fresh, tmp_path):
    from diffusers import UNet2DConditionModel

    world = quick_toy
    pipe, m, c = world.pipe, get_method("dreambooth"), _concept(world, "<db>", k=1)
    original = pipe.unet
    snapshot = {k: v.clone() for k, v in original.state_dict().items()}
    plain = _image(world, "a cat and a kite")
    loss = AnchorLoss.for_world(world, lam=m.anchor_lambda(world))
    spy = Spy(loss)
    fitted = m.fit(world, c, DreamBoothConfig(steps=3, batch_size=2, class_images=2, weights_lr=1e-3),
                   loss_fn=spy, progress=False)
    assert pipe.unet is fitted.weights and pipe.unet is not original
    assert spy.names == sorted(["token"] + [f"unet.{k}" for k, _ in original.named_parameters()])
    lam = m.anchor_lambda(world)
    for e, total in zip(fitted.log, fitted.losses):  # (1 − λ) L_rec + λ L_anc at the world's λ, + the prior
        assert total == pytest.approx((1 - lam) * e["rec"] + lam * e["anc"] + e["prior"], rel=1e-5)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, snapshot[k])]
    assert len(changed) > len(snapshot) // 2  # the whole UNet was fine-tuned
    prompt = f"a photo of a {c.token} {c.superclass}"
    fitted_image = _image(world, prompt)
    folder = m.save(fitted, tmp_path / c.name)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "learned_embeds.safetensors").is_file()
    # a fresh pipeline with diffusers' own loaders gives the same image
    fresh_unet = fresh.pipe.unet
    try:
        fresh.pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        fresh.pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
        assert np.array_equal(_image(fresh, prompt), fitted_image)
    finally:
        fresh.pipe.unet = fresh_unet
        unload(fresh.pipe, c.token)
    # unload puts the untouched original UNet back
    m.unload(pipe, fitted.handle)
    assert pipe.unet is original and c.token not in pipe.tokenizer.get_vocab()
    assert all(torch.equal(v, snapshot[k]) for k, v in pipe.unet.state_dict().items())
    assert np.array_equal(_image(world, "a cat and a kite"), plain)
    # and through the protocol: load, same image, unload
    handle = m.load(pipe, folder)
    assert pipe.unet is not original and np.array_equal(_image(world, prompt), fitted_image)
    m.unload(pipe, handle)
    assert pipe.unet is original and c.token not in pipe.tokenizer.get_vocab()


def test_a_failed_fit_leaves_the_pipeline_as_it_was(quick_toy):
    toy_world = quick_toy
    pipe = toy_world.pipe
    procs, unet = dict(pipe.unet.attn_processors), pipe.unet
    c = _concept(toy_world, "<fail>")

    def boom(rec, e, step):
        raise RuntimeError("boom")

    for name in ("custom_diffusion", "dreambooth"):
        cfg = get_method(name).config_class(steps=2, batch_size=1, class_images=0)
        with pytest.raises(RuntimeError, match="boom"):
            get_method(name).fit(toy_world, c, cfg, loss_fn=boom, progress=False)
        assert pipe.unet is unet and _same_processors(pipe.unet, procs)
        assert c.token not in pipe.tokenizer.get_vocab()


# -- SD 1.5-shaped models -------------------------------------------------------------------------------------


def test_each_method_trains_and_guides_an_sd15_shaped_model():
    pipe = sd15_pipeline(width=0.1)
    pipe.unet.register_to_config(sample_size=8)  # 64 px images
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    from compinv_utils.concepts import ConceptOfInterest

    concept = ConceptOfInterest("s", "<s15>", "cat", photos)
    world = World("sd15-random", pipe, ["cat", "dog"], [concept], None, None, None, lambda ims, t: [[] for _ in ims],
                  torch.device("cpu"), torch.float32, guidance_scale=5.0, num_inference_steps=2)
    unet, procs = pipe.unet, dict(pipe.unet.attn_processors)
    assert len(cross_attention_layers(unet)) == 16
    for name in METHODS:
        m = get_method(name)
        cfg = dict(steps=1, batch_size=1)
        if name != "ti":
            cfg |= dict(class_images=1)
        fitted = m.fit(world, concept, m.config_class(**cfg), progress=False)
        assert len(fitted.losses) == 1 and np.isfinite(fitted.losses).all()
        inside = dict(pipe.unet.attn_processors)
        out = guided_generate(world, ["a photo of a <s15> cat and a dog"], ["<s15>", "dog"], BOXES,
                              config=GuidanceConfig(guided_steps=1, inner_iters=1), num_inference_steps=2)
        assert out.images[0].size == (64, 64) and np.isfinite(out.losses).all()
        assert _same_processors(pipe.unet, inside)  # guidance put the method's processors back
        m.unload(pipe, fitted.handle)
        assert pipe.unet is unet and _same_processors(unet, procs)
        assert "<s15>" not in pipe.tokenizer.get_vocab()


# -- composing two concepts (Table 1's second setting) ---------------------------------------------------------


def test_merge_projection_meets_every_constraint_and_changes_the_least():
    from compinv_utils.methods.custom_diffusion import merge_projection

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 10, generator=g, dtype=torch.float64)
    c_reg = torch.randn(40, 10, generator=g, dtype=torch.float64)
    targets = [(w0 + 0.3 * torch.randn(6, 10, generator=g, dtype=torch.float64),
                torch.randn(3, 10, generator=g, dtype=torch.float64)) for _ in range(2)]
    w = merge_projection(w0, targets, c_reg, ridge=0.0)
    for wi, ci in targets:  # each fine-tune's output on its own captions
        assert torch.allclose(w @ ci.T, wi @ ci.T, atol=1e-8)
    # any other W that meets the constraints changes the regularisation captions' outputs more
    C = torch.cat([c for _, c in targets])
    V = torch.cat([wi @ ci.T for wi, ci in targets], dim=1)
    other = w0 + (V - w0 @ C.T) @ torch.linalg.pinv(C.T)
    assert torch.allclose(other @ C.T, V, atol=1e-8)
    cost = lambda m: ((m - w0) @ c_reg.T).square().sum()  # noqa: E731
    assert cost(w) < cost(other)
    assert torch.allclose(merge_projection(w0, [(w0, targets[0][1])], c_reg), w0)  # nothing to change
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_projection(w0, [], c_reg)
    with pytest.raises(ValueError, match="features"):
        merge_projection(w0, [(w0, torch.randn(2, 9, dtype=torch.float64))], c_reg)


def _two_saved(world, method, cfg, tmp_path):
    m = get_method(method)
    folders, fits = [], []
    for k, token in enumerate(("<ca>", "<cb>")):
        c = _concept(world, token, k)
        fitted = m.fit(world, c, cfg, seed=k, progress=False)
        folders.append(m.save(fitted, tmp_path / method / c.name))
        fits.append(fitted)
        m.unload(world.pipe, fitted.handle)
    return m, folders, fits


def test_custom_diffusion_composes_two_concepts_by_its_merge(fresh, tmp_path):
    from compinv_utils.inversion import TEMPLATES
    from compinv_utils.methods.custom_diffusion import text_features

    pipe = fresh.pipe
    before = dict(pipe.unet.attn_processors)
    m, folders, fits = _two_saved(fresh, "custom_diffusion", CD, tmp_path)
    assert _same_processors(pipe.unet, before)
    with pytest.raises(ValueError, match="nouns=world.nouns"):
        m.compose(pipe, folders)
    assert _same_processors(pipe.unet, before) and "<ca>" not in pipe.tokenizer.get_vocab()
    handle = m.compose(pipe, folders, nouns=fresh.nouns)
    try:
        assert handle.tokens == ["<ca>", "<cb>"] and all(t in pipe.tokenizer.get_vocab() for t in handle.tokens)
        procs = pipe.unet.attn_processors
        layer = cross_attention_layers(pipe.unet)[0]
        assert isinstance(procs[layer], custom_diffusion_types())
        merged = procs[layer].to_k_custom_diffusion.weight.detach().double()
        for fitted, token, k in zip(fits, handle.tokens, (0, 1)):
            sup = fresh.concepts_of_interest[k].superclass
            feats = text_features(pipe, [t.format(f"{token} {sup}") for t in TEMPLATES], token).double()
            own = fitted.weights[layer].to_k_custom_diffusion.weight.detach().double()
            assert torch.allclose(merged @ feats.T, own @ feats.T, atol=1e-4)  # each concept's keys kept
        image = _image(fresh, f"a {handle.tokens[0]} cat and a {handle.tokens[1]} teddy")
        assert image.shape == (32, 32, 3)
    finally:
        m.unload(pipe, handle)
    assert _same_processors(pipe.unet, before) and not {"<ca>", "<cb>"} & set(pipe.tokenizer.get_vocab())


def test_dreambooth_composes_two_concepts_by_adding_their_weight_changes(fresh, tmp_path):
    pipe = fresh.pipe
    unet = pipe.unet
    m, folders, fits = _two_saved(fresh, "dreambooth", DreamBoothConfig(steps=2, batch_size=2, class_images=2,
                                                                      weights_lr=1e-3), tmp_path)
    assert pipe.unet is unet
    handle = m.compose(pipe, folders)
    try:
        assert pipe.unet is not unet and handle.tokens == ["<ca>", "<cb>"]
        base = dict(unet.named_parameters())
        tuned = [dict(f.weights.named_parameters()) for f in fits]
        for name, p in pipe.unet.named_parameters():
            want = base[name] + (tuned[0][name] - base[name]) + (tuned[1][name] - base[name])
            assert torch.allclose(p, want, atol=1e-6), name
    finally:
        m.unload(pipe, handle)
    assert pipe.unet is unet and not {"<ca>", "<cb>"} & set(pipe.tokenizer.get_vocab())


def test_textual_inversion_composes_by_loading_both_embeddings(fresh, tmp_path):
    pipe = fresh.pipe
    m, folders, _ = _two_saved(fresh, "ti", InversionConfig(steps=2, batch_size=2), tmp_path)
    handle = m.compose(pipe, folders)
    assert handle.tokens == ["<ca>", "<cb>"] and all(t in pipe.tokenizer.get_vocab() for t in handle.tokens)
    m.unload(pipe, handle)
    assert not {"<ca>", "<cb>"} & set(pipe.tokenizer.get_vocab())
    with pytest.raises(ValueError, match="same placeholder"):
        m.compose(pipe, [folders[0], folders[0]])
    assert "<ca>" not in pipe.tokenizer.get_vocab()


def test_a_method_block_fits_records_costs_and_resumes(toy_world, tmp_path, monkeypatch):
    import json

    from compinv_utils import method_blocks as B

    monkeypatch.setattr(toy_world, "concepts_of_interest", toy_world.concepts_of_interest[:2])
    cfg = CustomDiffusionConfig(steps=2, batch_size=2, class_images=2)
    stats_path = tmp_path / "fits.json"
    stats = B.fit_concepts(toy_world, "custom_diffusion", seeds=(0,), config=cfg, root=tmp_path / "cd",
                           stats_path=stats_path, progress=False)
    assert set(stats) == {f"{v}|seed0|{c.name}" for v in B.VARIANTS for c in toy_world.concepts_of_interest}
    layers = cross_attention_layers(toy_world.pipe.unet)
    for key, s in stats.items():
        folder = tmp_path / "cd" / key.split("|")[0] / "seed0" / key.split("|")[2]
        assert s["megabytes"] == pytest.approx(B.folder_megabytes(folder), abs=1e-3) and s["seconds"] > 0
        assert s["lambda"] == (toy_world.settings.lam if key.startswith("semantic") else 0.0)
        kv = sum(toy_world.pipe.unet.get_submodule(n[: -len(".processor")]).to_k.weight.numel() * 2 for n in layers)
        assert s["parameters"] == kv + toy_world.pipe.text_encoder.config.hidden_size
    assert json.loads(stats_path.read_text()) == stats
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cd").rglob("*.safetensors")}
    again = B.fit_concepts(toy_world, "custom_diffusion", seeds=(0,), config=cfg, root=tmp_path / "cd",
                           stats_path=stats_path, progress=False)
    assert again == stats and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing refitted
    # the fits know their world: another version of it is refused with what to do, and nothing is lost
    made_in = json.loads((tmp_path / "cd" / B.WORLD_FILE).read_text())
    assert made_in == {"world": toy_world.name, "world_fingerprint": B.world_fingerprint(toy_world)}
    (tmp_path / "cd" / B.WORLD_FILE).write_text(json.dumps(made_in | {"world_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="another version of the 'toy' world.*move that folder away"):
        B.fit_concepts(toy_world, "custom_diffusion", seeds=(0,), config=cfg, root=tmp_path / "cd",
                       stats_path=stats_path, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()) and json.loads(stats_path.read_text()) == stats


def test_the_world_fingerprint_follows_the_weights_not_the_loaded_concepts(cd, fresh):
    from compinv_utils import method_blocks as B

    before = B.world_fingerprint(fresh)
    m = get_method("custom_diffusion")
    handle = m.load(fresh.pipe, cd["folder"])  # a fitted concept: its processors and its token row
    try:
        assert cd["c"].token in fresh.pipe.tokenizer.get_vocab()
        assert B.world_fingerprint(fresh) == before  # are left out of the fingerprint
    finally:
        m.unload(fresh.pipe, handle)
    w = fresh.pipe.unet.conv_in.weight
    with torch.no_grad():
        w.view(-1)[0] += 1.0
    try:
        assert B.world_fingerprint(fresh) != before  # another UNet: another world
    finally:
        with torch.no_grad():
            w.view(-1)[0] -= 1.0
    assert B.world_fingerprint(fresh) == before


def test_a_complete_block_is_read_from_its_cache_without_the_fitted_models(fresh, tmp_path, monkeypatch):
    import shutil

    from compinv_utils import evaluation as V
    from compinv_utils import method_blocks as B

    layouts = V.load_layouts(fresh)  # the repository's layout MLP
    monkeypatch.setenv("COMPINV_DATA", str(tmp_path))
    monkeypatch.setattr(fresh, "concepts_of_interest", fresh.concepts_of_interest[:2])
    monkeypatch.setattr(B, "partner_nouns", lambda world, c: ["kite"])
    cfg = CustomDiffusionConfig(steps=1, batch_size=2, class_images=2)
    stats, records = B.run_block(fresh, "custom_diffusion", (0,), config=cfg, layouts=layouts, gen_seeds=1,
                                 pair_seeds=1, progress=False)
    root = B.method_root(fresh, "custom_diffusion")
    assert root == tmp_path / "toy" / "methods" / "custom_diffusion" and root.is_dir()
    assert {(r["setting"], r["method"]) for r in records} == {(s, m) for s in ("noun", "concept") for m in V.TABLE1_METHODS}
    assert all(r["inversion_method"] == "custom_diffusion" for r in records)
    shutil.rmtree(root)  # a clone holds the records, not the fitted models
    again = B.run_block(fresh, "custom_diffusion", (0,), config=cfg, layouts=layouts, gen_seeds=1, pair_seeds=1,
                        progress=False)
    assert again == (stats, records) and not root.exists()  # nothing was fitted or generated again
