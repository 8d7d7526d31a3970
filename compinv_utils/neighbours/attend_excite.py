"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): excite the most neglected subject token, no boxes.

Read from the paper's Algorithm 1 and the official code (yuval-alaluf/Attend-and-Excite:
``pipeline_attend_and_excite.py``, ``config.py``, ``utils/gaussian_smoothing.py``, ``utils/ptp_utils.py``;
diffusers' ``StableDiffusionAttendAndExcitePipeline`` does the same). At reverse step ``i`` of ``N``:

1. One conditional UNet pass on ``z_t``. ``A`` ``(T, h, w)``: the cross-attention of every head of every layer
   whose maps are ``h`` high (SD: the 16x16 layers), averaged.
2. Drop the start token and re-weigh the text tokens: ``Â = softmax_k(100 · A[k])`` over the tokens
   ``k = 1 … T−2`` (the code's slice ``1:-1``: the start token and the last padding token are left out, the end
   token and the other padding tokens stay in, as for SD 1.x).
3. For each subject token ``s``: ``Â_s`` smoothed by a normalised 3x3 Gaussian (σ = 0.5) after reflect-padding,
   and ``L_s = 1 − max(Â_s)``. The kernel is the code's ``exp(−((d − μ)/(2σ))²)``, i.e. a Gaussian of standard
   deviation ``σ√2`` (its exponent divides by ``2σ`` before squaring).
4. ``L = max_s max(0, L_s)``: only the most neglected token is excited.
5. ``z_t ← z_t − α_i ∇_{z_t} L`` with ``α_i = 20 · sqrt(s_i)``, ``s = linspace(1.0, 0.5, N)`` — no noise-level
   factor, the latents of SD's DDIM-scale schedulers.
6. At the refinement steps ``{0: 0.05, 10: 0.5, 20: 0.8}``: while ``L > 1 − T_i`` (some subject token's max
   attention is below ``T_i``) repeat 1–5, at most 20 times.
7. Steps 1–6 at the first 25 of 50 steps; then classifier-free guidance denoises as usual.

Every subject token counts: a word of several tokens (a multi-vector ``S*``) puts each of its tokens in the max,
and :attr:`GuidedOutput.scores` records, per word, its weakest token's smoothed max attention.

**Deviations** (settings of :class:`AttendExciteConfig` where they are choices):

- *Map size.* The toy world's 8x8 layers play SD's 16x16 ones (the package's rule: the largest map height
  ≤ 16). The Gaussian stays 3x3 cells with σ = 0.5 cells: it smooths neighbouring cells, as in SD, which at 8x8
  is twice the share of the image side (3/8 instead of 3/16); set ``sigma``/``kernel_size`` to change it.
- *Step count.* The official steps are indices of a 50-step schedule (``reference_steps``). With ``N`` steps,
  step ``i`` is guided when ``i · 50 / N < 25`` (13 of the toy world's 25 DDIM steps) and the refinement step
  ``k`` becomes ``round(k · N / 50)`` (0, 5 and 10 of 25); two that land on one step keep the higher threshold.
  ``α_i`` decays over the ``N`` steps the world runs, as the code's ``linspace`` does.
- *Refinement.* As Algorithm 1: at a refinement step the update is applied and repeated while the loss before it
  was above ``1 − T_i``, at most ``1 + max_refinement_steps`` updates. The code's refinement loop also makes one
  more update after the threshold is met (it tests the previous iteration's loss) before the step's own update,
  so where the threshold is reached it makes one update more than this.
- The code's SD 2.1 option (``normalize_eot``: leave the end token out of the softmax) is not implemented.
- A batch of samples is guided together; each sample has its own loss, gradient and stopping, as one image at a
  time in the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..guidance import GuidanceConfig, GuidedOutput, Objective, _layer_maps, guided_generate
from ..maths import is_whole

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class AttendExciteConfig:
    max_iter_to_alter: int = 25  # guide the steps before this index of the reference schedule (official: 25 of 50)
    reference_steps: int = 50  # the step count the step indices here refer to (the official 50)
    thresholds: dict = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})  # step -> T: refine until max ≥ T
    max_refinement_steps: int = 20  # most extra updates at a refinement step (official: 20)
    scale_factor: float = 20.0  # α at the first step (official: 20)
    scale_range: tuple[float, float] = (1.0, 0.5)  # α_i = scale_factor · sqrt(s_i), s linear from first to last step
    smooth_attentions: bool = True  # Gaussian-smooth each subject token's map before taking its max
    sigma: float = 0.5  # the Gaussian's σ, in map cells (official: 0.5)
    kernel_size: int = 3  # the Gaussian kernel's side, in map cells, odd (official: 3)
    temperature: float = 100.0  # the maps are multiplied by this before the softmax over text tokens (official: 100)
    resolution: int | None = None  # map height that feeds A (None: the largest ≤ 16, SD's 16x16 / the toy's 8x8)


def check_config(config: AttendExciteConfig) -> None:
    if not isinstance(config, AttendExciteConfig):
        raise TypeError(f"config must be an AttendExciteConfig, got {type(config).__name__}")
    for name in ("max_iter_to_alter", "reference_steps", "max_refinement_steps", "kernel_size"):
        v = getattr(config, name)
        if not is_whole(v, 0):
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if config.reference_steps < 1:
        raise ValueError(f"reference_steps must be >= 1 (the official schedule has 50), got {config.reference_steps}")
    if config.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (a kernel centred on a cell; official 3), got {config.kernel_size}")
    if not isinstance(config.thresholds, dict):
        raise TypeError(f"thresholds must be a dict step -> threshold, e.g. {{0: 0.05, 10: 0.5}}, got "
                        f"{config.thresholds!r}")
    for k, v in config.thresholds.items():
        if not is_whole(k, 0):
            raise ValueError(f"threshold steps must be integers >= 0, got {k!r}")
        if not 0 <= v <= 1:
            raise ValueError(f"the threshold at step {k} must be a max attention in [0, 1], got {v!r}")
        if k >= config.max_iter_to_alter:
            raise ValueError(f"the threshold at step {k} is never used: refinement happens only at guided steps, "
                             f"those before max_iter_to_alter = {config.max_iter_to_alter}")
    if not (math.isfinite(config.scale_factor) and config.scale_factor >= 0):
        raise ValueError(f"scale_factor must be a finite number >= 0 (official 20), got {config.scale_factor}")
    if len(config.scale_range) != 2 or not all(math.isfinite(v) and v >= 0 for v in config.scale_range):
        raise ValueError(f"scale_range must be two numbers >= 0 (official (1.0, 0.5)), got {config.scale_range!r}")
    if not (config.sigma > 0 and math.isfinite(config.sigma)):
        raise ValueError(f"sigma must be a finite number > 0 (official 0.5), got {config.sigma}")
    if not (config.temperature > 0 and math.isfinite(config.temperature)):
        raise ValueError(f"temperature must be a finite number > 0 (official 100), got {config.temperature}")
    res = config.resolution
    if res is not None and not is_whole(res, 1):
        raise ValueError(f"resolution must be a map height >= 1 (e.g. 16) or None, got {res!r}")


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The official smoothing kernel ``(size, size)``: ``exp(−((d − μ)/(2σ))²)`` per axis, product, summed to 1."""
    d = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-((d / (2 * sigma)) ** 2))
    k2 = k[:, None] * k[None, :]
    return k2 / k2.sum()


def token_max_attention(maps: torch.Tensor, tokens: Sequence[int], config: AttendExciteConfig = AttendExciteConfig()
                        ) -> torch.Tensor:
    """The smoothed max attention of each token: ``maps`` ``(B, T, h, w)`` (heads and layers averaged), ``tokens``
    positions in the prompt (start token at 0). Returns ``(B, len(tokens))``."""
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, T, h, w), got shape {tuple(maps.shape)}")
    T = maps.shape[1]
    bad = [p for p in tokens if not 1 <= p <= T - 2]
    if bad:
        raise ValueError(f"token positions {bad} are outside 1 … {T - 2}: the start token and the last token are not "
                         f"in the softmax, so they cannot be subject tokens")
    text = torch.softmax(maps[:, 1:-1] * config.temperature, dim=1)  # re-weigh the text tokens, start token left out
    a = text[:, [p - 1 for p in tokens]]  # (B, K, h, w)
    B, K, h, w = a.shape
    if config.smooth_attentions:
        r = config.kernel_size // 2
        if r >= min(h, w):
            raise ValueError(f"a {config.kernel_size}x{config.kernel_size} kernel cannot reflect-pad {h}x{w} maps; "
                             f"use a smaller kernel_size")
        kernel = gaussian_kernel(config.kernel_size, config.sigma).to(a)[None, None]
        a = F.conv2d(F.pad(a.reshape(B * K, 1, h, w), (r, r, r, r), mode="reflect"), kernel).reshape(B, K, h, w)
    return a.flatten(2).max(-1).values


def attend_excite_loss(maps: torch.Tensor, positions: Sequence[Sequence[int]],
                       config: AttendExciteConfig = AttendExciteConfig()) -> torch.Tensor:
    """``L = max_s max(0, 1 − max(Gaussian(Â_s)))`` over the subject tokens of ``positions`` (one token list per
    word) for maps ``(B, T, h, w)``. Returns ``(B,)``."""
    tokens = [p for pos in positions for p in pos]
    if not tokens:
        raise ValueError("no subject tokens: name at least one word of the prompt")
    return (1 - token_max_attention(maps, tokens, config)).clamp(min=0).max(1).values


def _to_reference(config: AttendExciteConfig, n_steps: int) -> dict[int, float]:
    """The refinement thresholds keyed by the world's step index (``round(k · N / reference_steps)``)."""
    out: dict[int, float] = {}
    for k, v in config.thresholds.items():
        i = int(math.floor(k * n_steps / config.reference_steps + 0.5))
        out[i] = max(v, out.get(i, 0.0))
    return out


class AttendExcite(Objective):
    """Attend-and-Excite as an :class:`~compinv_utils.guidance.Objective` of :func:`guided_generate`."""

    def __init__(self, config: AttendExciteConfig = AttendExciteConfig()):
        check_config(config)
        self.config = config
        self.record_maps = GuidanceConfig(resolution=config.resolution)  # every head of every layer at the height

    def check(self, num_steps: int) -> None:
        check_config(self.config)

    def guided_steps(self, timesteps) -> int:
        n = len(timesteps)
        return sum(i * self.config.reference_steps / n < self.config.max_iter_to_alter for i in range(n))

    def max_updates(self, i: int, n_steps: int) -> int:
        return 1 + self.config.max_refinement_steps if i in _to_reference(self.config, n_steps) else 1

    def step_size(self, i: int, timesteps, alphas_cumprod: torch.Tensor) -> float:
        s = np.linspace(self.config.scale_range[0], self.config.scale_range[1], len(timesteps))
        return float(self.config.scale_factor * np.sqrt(s[i]))

    def keep_going(self, i: int, n_steps: int, loss: torch.Tensor) -> torch.Tensor:
        thresholds = _to_reference(self.config, n_steps)
        if i not in thresholds:
            return torch.zeros_like(loss, dtype=torch.bool)
        return loss > 1 - thresholds[i]

    def loss(self, store, positions, boxes, latent_hw) -> torch.Tensor:
        r = self.config.resolution or store.default_resolution()
        maps = torch.stack(_layer_maps(store, r, self.record_maps)).mean(0)  # (B, T, h, w)
        return torch.stack([attend_excite_loss(maps[b:b + 1], positions[b], self.config)[0]
                            for b in range(maps.shape[0])])

    def score(self, maps: torch.Tensor, positions) -> torch.Tensor:
        """Per word, its weakest token's smoothed max attention ``(B, words)``."""
        rows = []
        for b, pos in enumerate(positions):
            rows.append(torch.stack([token_max_attention(maps[b:b + 1], p, self.config)[0].min() for p in pos]))
        return torch.stack(rows)


def attend_and_excite(world, prompts: Sequence[str], words, seeds: Sequence[int] | None = None, seed: int = 0,
                      config: AttendExciteConfig = AttendExciteConfig(), batch_size: int = 8,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      height: int | None = None, width: int | None = None, record: bool = False,
                      progress: bool = False) -> GuidedOutput:
    """Images for ``prompts`` with Attend-and-Excite on each prompt's subject ``words`` (one list per prompt, or one
    shared list). Image ``i`` uses seed ``seeds[i]`` (default ``seed + i``) and the initial noise of
    :meth:`World.generate`, so a config that guides no step (``max_iter_to_alter=0, thresholds={}``) reproduces
    it. ``losses`` holds ``L`` before every update; with ``record=True``, ``maps`` as in :func:`guided_generate`
    and ``scores`` ``(steps, n_images, n_words)``: each word's smoothed max attention (its weakest token's) in the
    classifier-free pass of every step; ``inside`` is None (no boxes)."""
    objective = AttendExcite(config)  # checks the config first
    prompts_l = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(words, str):
        raise TypeError(f"words must be a list of words (e.g. ['cat', 'kite']) or one such list per prompt, "
                        f"got {words!r}")
    per_prompt = [list(words)] * len(prompts_l) if words and isinstance(words[0], str) else [list(w) for w in words]
    if any(not w for w in per_prompt) or not per_prompt:
        raise ValueError("every prompt needs at least one subject word to excite")
    boxes = [[FULL_BOX] * len(w) for w in per_prompt]  # no boxes: the sampler's box checks see the whole image
    out = guided_generate(world, prompts_l, per_prompt, boxes, seeds=seeds, seed=seed, config=objective,
                          batch_size=batch_size, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=height, width=width, record=record, progress=progress)
    out.inside = None
    return out
