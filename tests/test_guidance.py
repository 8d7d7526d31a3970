import numpy as np
import pytest
import torch

from compinv_utils.attention import AttentionStore, attention_store
from compinv_utils.guidance import GuidanceConfig, guided_sample, localisation_loss, loss_and_grad
from compinv_utils.layout import box_to_mask
from compinv_utils.world import World
from sd15_shapes import sd15_pipeline


def test_loss_is_zero_inside_and_one_outside():
    masks = torch.stack([box_to_mask((0, 0, 0.5, 0.5), 8), box_to_mask((0.5, 0.5, 1, 1), 8)])
    maps = torch.zeros(1, 5, 8, 8)
    maps[0, 1] = masks[0]
    maps[0, 3] = masks[1]
    assert localisation_loss(maps, [[1], [3]], masks).item() == pytest.approx(0.0)
    swapped = localisation_loss(maps, [[3], [1]], masks).item()
    assert swapped == pytest.approx(1.0)
    assert localisation_loss(maps, [[3], [1]], masks, official=True).item() == pytest.approx(1.0)
    half = torch.ones(1, 5, 8, 8)
    assert localisation_loss(half, [[1]], masks[:1]).item() == pytest.approx(0.75)


def test_loss_input_checks():
    maps = torch.rand(1, 5, 8, 8)
    with pytest.raises(ValueError, match="one box per word"):
        localisation_loss(maps, [[1], [2]], torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="masks are \\(4, 4\\)"):
        localisation_loss(maps, [[1]], torch.ones(1, 4, 4))


@pytest.fixture(scope="module")
def sd_world():
    pipe = sd15_pipeline(width=0.1)
    return World("sd15-random", pipe, ["cat", "dog"], [], None, None, None, lambda ims, t: [[] for _ in ims],
                 torch.device("cpu"), torch.float32, guidance_scale=5.0, num_inference_steps=4)


def test_a_guided_update_lowers_the_loss_on_an_sd15_shaped_model(sd_world):
    pipe = sd_world.pipe
    prompt = "a cat and a dog"
    cond, _ = pipe.encode_prompt(prompt, "cpu", 1, True)
    positions, boxes = [[2], [5]], [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    cfg = GuidanceConfig(resolution=4)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with attention_store(pipe.unet, AttentionStore(keep_grad=True, keep_similarity=False)) as store:
        before, grad = loss_and_grad(pipe.unet, store, z.clone().requires_grad_(True), 900, cond, positions, boxes, cfg)
        after, _ = loss_and_grad(pipe.unet, store, (z - 50.0 * grad).requires_grad_(True), 900, cond, positions, boxes, cfg)
    assert grad.abs().sum() > 0
    assert after.item() < before.item()


def test_unguided_sampling_matches_the_pipeline_and_processors_are_restored(sd_world):
    before = {k: type(v) for k, v in sd_world.pipe.unet.attn_processors.items()}
    plain = sd_world.generate(["a cat and a dog"], seed=3, height=128, width=128)[0]
    img = guided_sample(sd_world, "a cat and a dog", ["cat", "dog"], [(0, 0, 0.5, 1), (0.5, 0, 1, 1)], seed=3,
                        config=GuidanceConfig(guided_steps=0), height=128, width=128)
    assert np.abs(np.asarray(plain, float) - np.asarray(img, float)).max() <= 1
    guided, losses = guided_sample(sd_world, "a cat and a dog", ["cat", "dog"], [(0, 0, 0.5, 1), (0.5, 0, 1, 1)],
                                   seed=3, config=GuidanceConfig(guided_steps=2, inner_iters=2), return_losses=True,
                                   height=128, width=96)
    assert len(losses) == 4 and guided.size == (96, 128)
    assert {k: type(v) for k, v in sd_world.pipe.unet.attn_processors.items()} == before


def test_processors_restored_after_an_exception(sd_world, monkeypatch):
    before = {k: type(v) for k, v in sd_world.pipe.unet.attn_processors.items()}

    def boom(*a, **k):
        raise RuntimeError("scheduler failed")

    monkeypatch.setattr(sd_world.pipe.scheduler, "step", boom)
    with pytest.raises(RuntimeError, match="scheduler failed"):
        guided_sample(sd_world, "a cat and a dog", ["cat"], [(0, 0, 0.5, 1)], config=GuidanceConfig(guided_steps=1),
                      height=64, width=64)
    assert {k: type(v) for k, v in sd_world.pipe.unet.attn_processors.items()} == before


def test_bad_input(sd_world):
    g = lambda **kw: guided_sample(sd_world, **({"prompt": "a cat and a dog", "words": ["cat"],  # noqa: E731
                                                  "boxes": [(0, 0, 0.5, 1)], "height": 64, "width": 64,
                                                  "num_inference_steps": 12} | kw))
    with pytest.raises(ValueError, match="'kite' does not occur"):
        g(words=["kite"])
    with pytest.raises(ValueError, match="2 boxes for 1 words"):
        g(boxes=[(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        g(boxes=[(0, 0, 1.5, 1)])
    with pytest.raises(ValueError, match="degenerate"):
        g(boxes=[(0.5, 0, 0.5, 1)])
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        g(guidance_scale=0.5)
    with pytest.raises(ValueError, match="guided_steps must be in \\[0, 12\\]"):
        g(config=GuidanceConfig(guided_steps=20))
    with pytest.raises(ValueError, match="inner_iters"):
        g(config=GuidanceConfig(inner_iters=0))


def test_guided_steps_follow_the_noise_level(toy_world):
    """By default guidance covers what the official code guides (its first 10 of 50 LMS steps,
    t = 999 → 815.5): 4 of the toy world's 25 DDIM steps (t = 961, 921, 881, 841)."""
    from compinv_utils.guidance import guided_step_count

    sched = toy_world.pipe.scheduler
    sched.set_timesteps(25)
    assert guided_step_count(GuidanceConfig(), sched.timesteps) == 4
    sched.set_timesteps(50)
    assert guided_step_count(GuidanceConfig(), sched.timesteps) == 9  # 981 … 821
    assert guided_step_count(GuidanceConfig(guided_steps=10), sched.timesteps) == 10
    from diffusers import LMSDiscreteScheduler

    lms = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    lms.set_timesteps(50)
    assert guided_step_count(GuidanceConfig(), lms.timesteps) == 10  # the official setting


def test_official_loss_takes_the_ratio_per_head():
    """Two heads: one all inside the box, one half inside. Per head (official): mean((1-1)², (1-0.5)²) =
    0.125; heads averaged first (Eq. 8 style): (1 - 0.75)² = 0.0625."""
    from types import SimpleNamespace

    from compinv_utils.guidance import _batch_loss

    hw, T = 4, 3
    head_in = torch.zeros(hw, T); head_in[0, 1] = 1.0  # token 1 attends only to pixel 0 (inside)
    head_half = torch.zeros(hw, T); head_half[0, 1] = 0.5; head_half[3, 1] = 0.5  # half at pixel 3 (outside)
    maps = torch.stack([head_in, head_half])[None]  # (B=1, heads=2, HW=4, T)
    store = SimpleNamespace(step=0, maps={0: {"up.attn2": maps}}, shapes={"up.attn2": (2, 2)},
                            resolutions_present=lambda: [2])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # pixel 0 only
    official = _batch_loss(store, 2, GuidanceConfig(loss="official"), [[[1]]], [mask])
    eq8 = _batch_loss(store, 2, GuidanceConfig(), [[[1]]], [mask])
    assert float(official[0]) == pytest.approx(0.125)
    assert float(eq8[0]) == pytest.approx(0.25)
