"""Layout guidance (Chen et al., "Training-Free Layout Control with Cross-Attention Guidance", WACV 2024):
backward guidance into given boxes.

Read from the paper and the official code (silent-chen/layout-guidance: ``inference.py``, ``utils.py``
``compute_ca_loss``, ``conf/base_config.yaml``, ``my_model/unet_2d_condition.py``). It is the family of the
paper's ``L_loc`` (Eq. 8) with user boxes in place of the learned layout. For word ``i`` with box ``B_i`` and a
cross-attention map ``A`` of one head of one layer (conditional branch), the energy is

    E(A, B_i, i) = (1 − Σ_{u∈B_i} A_{u,i} / Σ_u A_{u,i})²

averaged over the heads, the word's tokens, the words and the layers — exactly what
:func:`compinv_utils.guidance.localisation_loss` computes with ``official=True`` per layer (reused here). The
layers: the mid block's and those of the first up block with cross-attention (SD 1.5: the 8x8 mid layer and the
three 16x16 layers of ``up_blocks.1``), each with its box mask at its own map size.

**Update.** At each of the first 10 of 51 LMS steps (t = 999 … 819.18) the code updates its LMS latents
``x ← x − σ_t² ∇_x (η E)`` with loss scale ``η = 30``, up to 5 times, while the last energy is above 0.2;
then classifier-free guidance denoises. In the DDIM-scale latents ``z = √ᾱ_t x`` used here that is
``z ← z − η (1 − ᾱ_t) ∇_z E`` (see :mod:`compinv_utils.guidance`), the same rule as spatial inversion's, so
:func:`layout_guidance` runs on :func:`compinv_utils.guidance.guided_generate`'s sampler.

**Deviations** (settings of :class:`LayoutGuidanceConfig` where they are choices):

- *Layers in the toy world.* SD's first cross-attention up block is at 16x16; the toy world's 8x8 layers play
  SD's 16x16 ones (the package's rule: the largest map height ≤ 16), so the up-path layers are those at that
  height (the toy's ``up_blocks.1``, three 8x8 layers) plus the mid block's (one 4x4 layer). On SD 1.5 this is the
  official set.
- *Step count.* Guided steps are those with ``t ≥ 809.19`` (the official first 10 of 51 LMS steps end at
  t = 819.18, the 11th is at 799.20): 4 of the toy world's 25 DDIM steps (t = 961 … 841).
- *Stopping.* Each guided step starts afresh (at least one update) and a sample stops once the energy before an
  update is ≤ 0.2. The code carries its last energy over to the next step without recomputing it, so once a step
  ends below the threshold it guides no later step.
- *Masks.* A cell is inside a box when its centre is (:func:`compinv_utils.layout.box_to_mask`, at least one cell);
  the code floors the box's corners to cells (``int(x · W)``). They agree for boxes on the cell grid.
- One box per word (the code allows several, their union).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..guidance import (GuidanceConfig, GuidedOutput, Objective, guided_generate, guided_step_count,
                        localisation_loss)
from ..layout import box_to_mask
from ..maths import is_whole

# between the 10th (t = 819.18) and the 11th (799.20) of 51 LMS steps (linspace(0, 999, 51) reversed); a midpoint,
# so that float32 timesteps compare as intended
LMS_10_OF_51 = 999 - 9.5 * 999 / 50  # 809.19


@dataclass(frozen=True)
class LayoutGuidanceConfig:
    guide_until_t: float = LMS_10_OF_51  # guide every reverse step with t >= this (official: 10 of 51 LMS steps)
    guided_steps: int | None = None  # or guide exactly this many first steps (None: derived from guide_until_t)
    max_iter: int = 5  # most latent updates per guided step (official: 5)
    loss_scale: float = 30.0  # η in z ← z − η (1 − ᾱ_t) ∇E (official: 30)
    loss_threshold: float = 0.2  # a sample stops updating at a step once its energy is <= this (official: 0.2)
    resolution: int | None = None  # up-path layers with maps this high (None: the largest ≤ 16; SD's 16x16)
    mid_block: bool = True  # also the mid block's layers (official: mid + first cross-attention up block)


def check_config(config: LayoutGuidanceConfig, num_steps: int | None = None) -> None:
    if not isinstance(config, LayoutGuidanceConfig):
        raise TypeError(f"config must be a LayoutGuidanceConfig, got {type(config).__name__}")
    if config.guided_steps is not None and (isinstance(config.guided_steps, bool) or config.guided_steps < 0 or
                                            (num_steps is not None and config.guided_steps > num_steps)):
        raise ValueError(f"guided_steps must be in [0, {num_steps if num_steps is not None else 'steps'}] (the number "
                         f"of denoising steps), got {config.guided_steps!r}")
    if not math.isfinite(config.guide_until_t):
        raise ValueError(f"guide_until_t must be a finite timestep (the default guides t = 999 … 819.18), got "
                         f"{config.guide_until_t}")
    if isinstance(config.max_iter, bool) or not isinstance(config.max_iter, (int, np.integer)) or config.max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1 (official 5), got {config.max_iter!r}")
    if not (config.loss_scale >= 0 and math.isfinite(config.loss_scale)):
        raise ValueError(f"loss_scale must be a finite number >= 0 (official 30), got {config.loss_scale}")
    if math.isnan(config.loss_threshold):
        raise ValueError("loss_threshold is NaN; use a number (official 0.2; below 0 never stops early)")
    res = config.resolution
    if res is not None and not is_whole(res, 1):
        raise ValueError(f"resolution must be a map height >= 1 (e.g. 16) or None, got {res!r}")


def layout_energy(store, positions, boxes, config: LayoutGuidanceConfig = LayoutGuidanceConfig()) -> torch.Tensor:
    """The energy ``(B,)`` of the store's current call: per layer (the mid block's and the up-path layers at
    ``config.resolution``), :func:`localisation_loss` with ``official=True`` on its heads at its own map size,
    averaged over heads, then over layers. ``positions[b]``/``boxes[b]``: sample ``b``'s word token lists and
    boxes (one per word)."""
    res = config.resolution or store.default_resolution()
    current = store.maps.get(store.step, {})
    if not any(layer.startswith("up_blocks") and store.shapes[layer][0] == res for layer in current):
        raise ValueError(f"no up-path layer with {res}-high maps; maps present: {store.resolutions_present()}")
    per_layer = []
    for layer, m in current.items():
        h, w = store.shapes[layer]
        if not ((config.mid_block and layer.startswith("mid_block")) or (layer.startswith("up_blocks") and h == res)):
            continue
        m = m if m.dim() == 4 else m[:, None]  # (B, heads, HW, T)
        maps = m.transpose(2, 3).reshape(*m.shape[:2], m.shape[3], h, w)  # (B, heads, T, h, w)
        per_layer.append(torch.stack([
            localisation_loss(maps[b], positions[b], torch.stack([box_to_mask(bx, h, w) for bx in boxes[b]]),
                              official=True).mean()
            for b in range(maps.shape[0])]))
    return torch.stack(per_layer).mean(0)


class LayoutGuidance(Objective):
    """Layout guidance's backward guidance as an :class:`~compinv_utils.guidance.Objective`."""

    def __init__(self, config: LayoutGuidanceConfig = LayoutGuidanceConfig()):
        check_config(config)
        self.config = config
        self.record_maps = GuidanceConfig(resolution=config.resolution)  # `inside` as spatial inversion measures it

    def check(self, num_steps: int) -> None:
        check_config(self.config, num_steps)

    def guided_steps(self, timesteps) -> int:
        return guided_step_count(GuidanceConfig(guide_until_t=self.config.guide_until_t,
                                                guided_steps=self.config.guided_steps), timesteps)

    def max_updates(self, i: int, n_steps: int) -> int:
        return self.config.max_iter

    def step_size(self, i: int, timesteps, alphas_cumprod: torch.Tensor) -> float:
        return self.config.loss_scale * float(1 - alphas_cumprod[timesteps[i]])  # η σ_t² in DDIM scale

    def keep_going(self, i: int, n_steps: int, loss: torch.Tensor) -> torch.Tensor:
        return loss > self.config.loss_threshold

    def loss(self, store, positions, boxes, latent_hw) -> torch.Tensor:
        return layout_energy(store, positions, boxes, self.config)


def layout_guidance(world, prompts: Sequence[str], words, boxes, seeds: Sequence[int] | None = None, seed: int = 0,
                    config: LayoutGuidanceConfig = LayoutGuidanceConfig(), batch_size: int = 8,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    height: int | None = None, width: int | None = None, record: bool = False,
                    progress: bool = False) -> GuidedOutput:
    """Images for ``prompts`` with each prompt's ``words`` guided into its ``boxes`` (``(x0, y0, x1, y1)`` in
    [0, 1], one per word; one list per prompt or one shared). Image ``i`` uses seed ``seeds[i]`` (default
    ``seed + i``) and the initial noise of :meth:`World.generate`, so ``guided_steps=0`` reproduces it. Returns
    :class:`GuidedOutput` as :func:`guided_generate` does (``losses``: the energy before every update; with
    ``record=True``, ``inside``: each word's attention share inside its box at every step)."""
    return guided_generate(world, prompts, words, boxes, seeds=seeds, seed=seed, config=LayoutGuidance(config),
                           batch_size=batch_size, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, height=height, width=width, record=record,
                           progress=progress)
