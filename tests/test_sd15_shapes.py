"""Proof that no code assumes the toy world's sizes: SD 1.5-shaped models, random weights, no download."""

import pytest
import torch

from compinv_utils.world import World
from sd15_shapes import sd15_pipeline


def _world(pipe) -> World:
    return World("sd15-random", pipe, ["cat", "dog"], [], None, None, None, lambda ims, t: [[] for _ in ims],
                 torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_full_size_sd15_denoising_step_and_decode():
    pipe = sd15_pipeline(width=1.0)
    assert sum(p.numel() for p in pipe.unet.parameters()) > 800e6  # SD 1.5's UNet has 860 M parameters
    world = _world(pipe)
    assert (world.image_size, world.latent_size) == (512, 64)
    with torch.no_grad():
        ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        assert cond.shape == (1, 77, 768)
        latents = torch.randn(1, 4, 64, 64)
        eps = pipe.unet(latents, 981, cond).sample
        assert eps.shape == (1, 4, 64, 64) and torch.isfinite(eps).all()
        pipe.scheduler.set_timesteps(25)
        step = pipe.scheduler.step(eps, pipe.scheduler.timesteps[0], latents).prev_sample
        image = pipe.vae.decode(step / pipe.vae.config.scaling_factor).sample
    assert image.shape == (1, 3, 512, 512)


def test_narrow_sd15_structure_runs_the_pipeline():
    pipe = sd15_pipeline(width=0.1)
    world = _world(pipe)
    images = world.generate(["a cat and a dog"], seed=0, num_inference_steps=2, height=128, width=128)
    assert images[0].size == (128, 128)
    assert len(pipe.unet.down_blocks) == 4 and len(pipe.unet.up_blocks) == 4
