"""Randomly initialised models with Stable Diffusion 1.5's layer structure, built from configs (no download).

The builders live in :mod:`compinv_utils.worldbuilding.sd15_random` (the ``sd15-random`` world); this module re-exports them
for the tests. ``width`` scales the channel counts: 1.0 is SD 1.5 itself (860 M UNet parameters); smaller widths
keep the block structure (four UNet levels, cross-attention at three of them, 8 heads, 77 tokens) for fast tests.
"""

from compinv_utils.worldbuilding.sd15_random import sd15_pipeline, sd15_text_encoder, sd15_unet, sd15_vae

__all__ = ["sd15_pipeline", "sd15_text_encoder", "sd15_unet", "sd15_vae"]
