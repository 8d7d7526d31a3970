"""The spatial-side neighbours: Attend-and-Excite and layout guidance, each against its paper's equations."""

import math

import numpy as np
import pytest
import torch

from compinv_utils.attention import AttentionStore
from compinv_utils.guidance import GuidanceConfig, guided_generate, loss_and_grad
from compinv_utils.neighbours.attend_excite import (AttendExcite, AttendExciteConfig, attend_and_excite,
                                                    attend_excite_loss, token_max_attention)
from compinv_utils.neighbours.layout_guidance import (LayoutGuidance, LayoutGuidanceConfig, layout_energy,
                                                      layout_guidance)

UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
MID = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
PAIRS = [("cat", "kite"), ("dog", "umbrella"), ("chair", "book"), ("pot", "fish")]
PROMPTS = [f"a photo of a {a} and a {b}" for a, b in PAIRS]
WORDS = [list(p) for p in PAIRS]
SEEDS = [0, 1, 2, 3]


def _smoothed_max_np(a: np.ndarray, sigma: float = 0.5) -> float:
    """Max of a 2-D map after reflect padding and the 3x3 kernel exp(-((d)/(2σ))²), normalised (the code's)."""
    k1 = np.exp(-((np.array([-1.0, 0.0, 1.0]) / (2 * sigma)) ** 2))
    k = np.outer(k1, k1) / np.outer(k1, k1).sum()
    p = np.pad(a, 1, mode="reflect")
    h, w = a.shape
    return max(float((p[y:y + 3, x:x + 3] * k).sum()) for y in range(h) for x in range(w))


# -- Attend-and-Excite: the loss ------------------------------------------------------------------------------


def test_attend_excite_loss_is_the_most_neglected_tokens_one_minus_smoothed_max():
    """Two samples, two subject tokens (2 and 5). The start token (0) and the last token (76) carry big values that
    must not enter the softmax; the end token region (75) does enter it. Expected loss from the equation in numpy."""
    T, h = 77, 4
    maps = np.zeros((2, T, h, h))
    maps[0, 2, 1, 2], maps[0, 5, 2, 1] = 0.08, 0.03  # token 5 is the neglected one in sample 0
    maps[1, 2, 0, 0], maps[1, 5, 3, 3] = 0.01, 0.06  # token 2 in sample 1 (a corner: reflect padding matters)
    maps[:, 0] = 0.9  # start token: left out
    maps[:, 76, 1, 2] = 0.5  # last token: left out
    maps[:, 75, 2, 2] = 0.02  # an end/padding token inside the slice: competes
    def loss(lo, hi, smooth=True):  # the equation with the text tokens lo … hi − 1 in the softmax
        out = []
        for b in range(2):
            logits = 100 * maps[b, lo:hi]
            soft = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
            peak = (lambda a: _smoothed_max_np(a)) if smooth else (lambda a: float(a.max()))
            out.append(max(max(0.0, 1 - peak(soft[p - lo])) for p in (2, 5)))
        return out

    expected = loss(1, 76)  # the code's slice 1:-1
    got = attend_excite_loss(torch.tensor(maps, dtype=torch.float32), [[2], [5]])
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    # the readings this pins down differ: start token in, last token in, no smoothing
    for wrong in (loss(0, 76), loss(1, 77), loss(1, 76, smooth=False)):
        assert max(abs(a - b) for a, b in zip(wrong, expected)) > 0.01
    no_smooth = attend_excite_loss(torch.tensor(maps, dtype=torch.float32), [[2], [5]],
                                   AttendExciteConfig(smooth_attentions=False))
    assert no_smooth.tolist() == pytest.approx(loss(1, 76, smooth=False), abs=1e-5)
    per_token = token_max_attention(torch.tensor(maps, dtype=torch.float32), [2, 5])
    assert per_token.shape == (2, 2) and float(per_token[0, 1]) < float(per_token[0, 0])


# -- Attend-and-Excite: the update and its schedule ------------------------------------------------------------


def _fake_unet(store, layer, hw, make_probs):
    """A stand-in for the UNet: one call writes ``make_probs(z)`` ``(B, heads, HW, T)`` as the layer's attention."""

    def unet(x, t, cond):
        store.step += 1
        probs = make_probs(x)
        store.record(layer, hw, probs, torch.zeros(probs.shape[0], probs.shape[-1]))

    return unet


def test_attend_excite_update_is_alpha_times_the_gradient():
    """Subject token 2 holds a = c·mean(z) on every cell, the start token 1 − a, the rest 0. Then the re-weighed
    map is p = e^{100a} / (e^{100a} + 74) everywhere (smoothing keeps a constant map), L = 1 − p and
    ∇_z L = −100 p (1 − p) c / n. At step 5 of 25: α = 20 · sqrt(1 − 0.5 · 5/24)."""
    c = 0.02
    store = AttentionStore(keep_grad=True, keep_similarity=False, average_heads=False)

    def probs(z):
        a = c * z.mean()
        p = torch.zeros(1, 1, 16, 77)
        p[..., 2] = a
        p[..., 0] = 1 - a
        return p

    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    objective = AttendExcite(AttendExciteConfig())
    loss, grad = loss_and_grad(_fake_unet(store, UP, (4, 4), probs), store, z.clone().requires_grad_(True), 500, None,
                               [[2]], [(0, 0, 1, 1)], objective)
    a = c * float(z.mean())
    p = math.exp(100 * a) / (math.exp(100 * a) + 74)
    assert float(loss) == pytest.approx(1 - p, abs=1e-5)
    timesteps = list(range(961, 0, -40))  # 25 steps
    alpha = objective.step_size(5, timesteps, torch.ones(1000))
    assert alpha == pytest.approx(20 * math.sqrt(1 - 0.5 * 5 / 24))
    expected = z + alpha * 100 * p * (1 - p) * c / z.numel()
    assert torch.allclose(z - alpha * grad, expected, atol=1e-5)


def test_attend_excite_schedule_maps_the_official_50_steps():
    """First 25 of 50 steps → 13 of 25; refinement at 0, 10, 20 of 50 → 0, 5, 10 of 25 with 1 + 20 updates; a
    sample keeps refining while L > 1 − T."""
    ae = AttendExcite()
    assert ae.guided_steps(list(range(25))) == 13 and ae.guided_steps(list(range(50))) == 25
    assert [i for i in range(25) if ae.max_updates(i, 25) > 1] == [0, 5, 10]
    assert ae.max_updates(5, 25) == 21 and ae.max_updates(6, 25) == 1
    assert ae.keep_going(5, 25, torch.tensor([0.6, 0.4])).tolist() == [True, False]  # T = 0.5
    assert ae.keep_going(6, 25, torch.tensor([0.9])).tolist() == [False]
    assert ae.step_size(24, list(range(25)), torch.ones(1000)) == pytest.approx(20 * math.sqrt(0.5))


# -- Layout guidance: the energy, the update and its schedule ---------------------------------------------------


def test_layout_energy_is_the_official_per_head_energy_on_mid_and_up_layers():
    """Two samples, two words; the mid layer (2x2) and an up layer (4x4), two heads each; a down layer and an up
    layer at another height are ignored. Expected: mean over layers, heads and words of (1 − inside/total)²."""
    T = 77
    g = torch.Generator().manual_seed(1)
    store = AttentionStore(keep_grad=True, keep_similarity=False, average_heads=False)
    store.step = 0
    layers = {MID: (2, 2), UP: (4, 4), "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": (4, 4),
              "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": (2, 2)}
    probs = {name: torch.rand(2, 2, hw[0] * hw[1], T, generator=g) for name, hw in layers.items()}
    for name, hw in layers.items():
        store.record(name, hw, probs[name], torch.zeros(2, T))
    positions = [[[2], [5]], [[3], [6]]]
    boxes = [[(0, 0, 0.5, 0.5), (0.5, 0, 1, 1)], [(0, 0.5, 1, 1), (0.25, 0.25, 0.75, 0.75)]]

    def inside_cells(box, h):  # cells whose centre lies in the box
        x0, y0, x1, y1 = box
        return [(y, x) for y in range(h) for x in range(h) if x0 <= (x + .5) / h <= x1 and y0 <= (y + .5) / h <= y1]

    expected = []
    for b in range(2):
        per_layer = []
        for name in (MID, UP):
            h = layers[name][0]
            m = probs[name][b].numpy().reshape(2, h, h, T)  # (heads, h, w, T)
            terms = []
            for head in range(2):
                for (tok,), box in zip(positions[b], boxes[b]):
                    a = m[head, :, :, tok]
                    ins = sum(a[y, x] for y, x in inside_cells(box, h)) / a.sum()
                    terms.append((1 - ins) ** 2)
            per_layer.append(np.mean(terms))
        expected.append(np.mean(per_layer))
    got = layout_energy(store, positions, boxes, LayoutGuidanceConfig(resolution=4))
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    without_mid = layout_energy(store, positions, boxes, LayoutGuidanceConfig(resolution=4, mid_block=False))
    assert abs(float(without_mid[0]) - expected[0]) > 1e-4


def test_layout_guidance_update_is_eta_sigma_squared_times_the_gradient():
    """Word token 2 puts s/2 on each left cell and (1 − s)/2 on each right cell, s = sigmoid(c·mean z); box = left
    half. E = (1 − s)², ∇_z E = −2 c s (1 − s)² / n, and z ← z − 30 (1 − ᾱ_t) ∇_z E."""
    c = 0.5
    store = AttentionStore(keep_grad=True, keep_similarity=False, average_heads=False)

    def probs(z):
        s = torch.sigmoid(c * z.mean())
        p = torch.zeros(1, 1, 4, 77)
        p[0, 0, [0, 2], 2] = s / 2  # cells (0, 0), (1, 0): left column
        p[0, 0, [1, 3], 2] = (1 - s) / 2
        return p

    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    objective = LayoutGuidance(LayoutGuidanceConfig(resolution=2))
    loss, grad = loss_and_grad(_fake_unet(store, UP, (2, 2), probs), store, z.clone().requires_grad_(True), 900, None,
                               [[2]], [(0, 0, 0.5, 1)], objective)
    s = 1 / (1 + math.exp(-c * float(z.mean())))
    assert float(loss) == pytest.approx((1 - s) ** 2, abs=1e-6)
    alphas = torch.linspace(0.99, 0.01, 1000)
    eta = objective.step_size(0, [900], alphas)
    assert eta == pytest.approx(30 * (1 - float(alphas[900])))
    expected = z + eta * 2 * c * s * (1 - s) ** 2 / z.numel()
    assert torch.allclose(z - eta * grad, expected, atol=1e-6)


def test_layout_guidance_schedule_is_the_official_one(toy_world):
    """The first 10 of 51 LMS steps (t = 999 … 819.18) → 4 of the toy world's 25 DDIM steps; 5 updates at most; a
    sample stops once its energy is ≤ 0.2."""
    from diffusers import LMSDiscreteScheduler

    lg = LayoutGuidance()
    lms = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    lms.set_timesteps(51)
    assert lg.guided_steps(lms.timesteps) == 10
    sched = toy_world.pipe.scheduler
    sched.set_timesteps(25)
    assert lg.guided_steps(sched.timesteps) == 4
    assert lg.max_updates(0, 25) == 5
    assert lg.keep_going(0, 25, torch.tensor([0.25, 0.2])).tolist() == [True, False]


# -- on the toy world -------------------------------------------------------------------------------------------


def test_attend_and_excite_raises_the_neglected_tokens_attention(toy_world):
    """Same seeds, with and without guidance: at the 13 guided steps the weaker subject word's smoothed max
    attention (the quantity A&E excites) is higher for every image."""
    plain = attend_and_excite(toy_world, PROMPTS, WORDS, seeds=SEEDS, record=True,
                              config=AttendExciteConfig(max_iter_to_alter=0, thresholds={}))
    out = attend_and_excite(toy_world, PROMPTS, WORDS, seeds=SEEDS, record=True)
    assert out.scores.shape == (25, 4, 2) and out.inside is None
    neglected_plain = plain.scores[:13].min(-1).mean(0)
    neglected = out.scores[:13].min(-1).mean(0)
    assert (neglected > neglected_plain).all(), (neglected, neglected_plain)
    assert float((neglected - neglected_plain).mean()) > 0.05
    first, last = out.losses[0], np.array([col[~np.isnan(col)][-1] for col in out.losses.T])
    assert (last < first).all()  # the loss falls over the guided updates


def test_attend_and_excite_refines_until_the_threshold_or_the_cap(toy_world):
    """A threshold no map reaches (T = 1) at step 0, a cap of 2 refinements, 3 guided steps (6 of 50 → i·2 < 6):
    3 updates at step 0, then 1 at each of steps 1 and 2."""
    cfg = AttendExciteConfig(max_iter_to_alter=6, thresholds={0: 1.0}, max_refinement_steps=2)
    out = attend_and_excite(toy_world, PROMPTS[:1], WORDS[:1], seeds=[0], config=cfg)
    assert out.losses.shape == (5, 1) and out.passes["guided_forward"] == 5


def test_layout_guidance_raises_the_attention_inside_the_boxes(toy_world):
    """Same seeds, with and without guidance: each word's attention share inside its box (corners the toy world does
    not put its objects in), averaged over the steps, is higher with guidance; the energy falls at step 0."""
    boxes = [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]
    plain = layout_guidance(toy_world, PROMPTS, WORDS, boxes, seeds=SEEDS, record=True,
                            config=LayoutGuidanceConfig(guided_steps=0))
    out = layout_guidance(toy_world, PROMPTS, WORDS, boxes, seeds=SEEDS, record=True)
    assert float(out.inside.mean()) > float(plain.inside.mean()) + 0.02, (out.inside.mean(), plain.inside.mean())
    assert (out.losses[4] < out.losses[0]).all()  # 5 updates at step 0, energy ≥ 0.2 throughout


def test_zero_steps_reproduce_the_plain_sampler(toy_world):
    """Guiding no step is plain sampling: identical to the package's unguided sampler, and to ``world.generate``
    within one grey level (the attention store's processor computes attention in another kernel call)."""
    base = guided_generate(toy_world, PROMPTS[:2], WORDS[:2], [[(0, 0, 1, 1)] * 2] * 2, seeds=SEEDS[:2],
                           config=GuidanceConfig(guided_steps=0))
    pipe = toy_world.generate(PROMPTS[:2], seeds=SEEDS[:2])
    ae = attend_and_excite(toy_world, PROMPTS[:2], WORDS[:2], seeds=SEEDS[:2],
                           config=AttendExciteConfig(max_iter_to_alter=0, thresholds={}))
    lg = layout_guidance(toy_world, PROMPTS[:2], WORDS[:2], [(0, 0, 0.5, 1), (0.5, 0, 1, 1)], seeds=SEEDS[:2],
                         config=LayoutGuidanceConfig(guided_steps=0))
    for out in (ae, lg):
        assert out.passes["guided_forward"] == 0 and out.losses.shape == (0, 2)
        for a, b, p in zip(out.images, base.images, pipe):
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert np.abs(np.asarray(a, float) - np.asarray(p, float)).max() <= 1


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_input(toy_world):
    ae = lambda **kw: attend_and_excite(toy_world, **({"prompts": PROMPTS[:1], "words": WORDS[:1],  # noqa: E731
                                                        "seeds": [0], "num_inference_steps": 2} | kw))
    with pytest.raises(TypeError, match="AttendExciteConfig"):
        ae(config=GuidanceConfig())
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ae(config=AttendExciteConfig(kernel_size=2))
    with pytest.raises(ValueError, match="threshold at step 30 is never used"):
        ae(config=AttendExciteConfig(thresholds={30: 0.5}))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ae(config=AttendExciteConfig(thresholds={0: 1.5}))
    with pytest.raises(ValueError, match="'hat' does not occur"):
        ae(words=["hat"])
    with pytest.raises(ValueError, match="at least one subject word"):
        ae(words=[[]])
    with pytest.raises(TypeError, match="list of words"):
        ae(words="cat")
    with pytest.raises(ValueError, match="outside 1 … 75"):
        token_max_attention(torch.rand(1, 77, 4, 4), [0])

    lg = lambda **kw: layout_guidance(toy_world, **({"prompts": PROMPTS[:1], "words": WORDS[:1],  # noqa: E731
                                                      "boxes": [(0, 0, 0.5, 1), (0.5, 0, 1, 1)], "seeds": [0],
                                                      "num_inference_steps": 2} | kw))
    with pytest.raises(TypeError, match="LayoutGuidanceConfig"):
        lg(config=GuidanceConfig())
    with pytest.raises(ValueError, match="1 boxes for 2 words"):
        lg(boxes=[[(0, 0, 0.5, 1)]])
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        lg(boxes=[(0, 0, 1.5, 1), (0.5, 0, 1, 1)])
    with pytest.raises(ValueError, match="max_iter must be"):
        lg(config=LayoutGuidanceConfig(max_iter=0))
    with pytest.raises(ValueError, match="guided_steps must be in \\[0, 2\\]"):
        lg(config=LayoutGuidanceConfig(guided_steps=3))
    with pytest.raises(ValueError, match="no up-path layer with 16-high maps"):
        lg(config=LayoutGuidanceConfig(guided_steps=1, resolution=16))
