"""Spatial inversion, part 2: steer cross-attention into boxes during the first denoising steps.

During the first reverse steps — those whose timestep ``t`` is at least ``guide_until_t``, by default
the part of the trajectory the official code guides (its first 10 of 50 LMS steps, t = 999 → 815.5;
4 of the toy world's 25 DDIM steps) — the latent moves down the gradient of (Eq. 8)

    L_loc = 1/N Σ_i (1 − Σ(M_i ∘ A_i) / Σ A_i)

where ``A_i`` is the cross-attention map of word ``i`` and ``M_i`` its box mask. **Which maps feed
``A_i``** (settings of :class:`GuidanceConfig`): the conditional branch; by default every head of every
cross-attention layer whose maps have the chosen resolution (default: the largest map height ≤ 16,
SD 1.5's 16x16 layers, the toy world's 8x8 ones), averaged; ``heads`` picks a range of heads (the
official code keeps half of them) and ``layers`` a subset of layers by name. A word of several
tokens (a multi-vector ``S*``) averages its tokens' terms.

**Update rule.** ``z ← z − η · (1 − ᾱ_t) · ∇_z L_loc`` with ``η = step_size``, repeated
``inner_iters`` times per guided step (or until ``L_loc`` falls below ``stop_below``); classifier-free
guidance then denoises as usual. Why ``1 − ᾱ_t``: the official code runs an LMS scheduler, whose
latents live in the variance-exploding scale ``x = z / √ᾱ_t``, and updates ``x ← x − η σ_t² ∇_x L``
with ``σ_t² = (1 − ᾱ_t) / ᾱ_t``. Since ``∇_x L = √ᾱ_t ∇_z L``, that is exactly
``z ← z − η (1 − ᾱ_t) ∇_z L`` for the DDIM-scale latents ``z`` used here. (Scaling the gradient of
``z`` by ``σ_t²`` instead would overshoot by ``1/ᾱ_t``, about 200× at the first step, and wreck the image.)

``loss="official"`` is the official code's variant: the in-box ratio ``a`` per attention head, then
``(1 − a)²`` averaged over heads, tokens, words and layers (``compute_ca_loss`` in its
``utils/layout_control.py``).

**Other guidances.** :func:`guided_generate` also samples with any :class:`Objective`: a per-sample loss on
the cross-attention of one conditional UNet pass, plus its schedule (which steps, how many updates, the
factor on the gradient, when a sample stops). ``L_loc`` with a :class:`GuidanceConfig` is one such objective;
``compinv_utils.neighbours`` holds others (Attend-and-Excite, layout guidance).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .attention import AttentionStore, attention_store
from .layout import box_to_mask, check_box
from .maths import is_whole, ratio
from .progress import bar
from .tokens import word_positions


@dataclass(frozen=True)
class GuidanceConfig:
    guide_until_t: float = 815.5  # guide every reverse step with timestep t >= this (official: 10 of 50 LMS steps)
    guided_steps: int | None = None  # or guide exactly this many first steps (None: derived from guide_until_t)
    inner_iters: int = 3  # latent updates per guided step
    step_size: float = 30.0  # η in z ← z − η (1 − ᾱ_t) ∇L (the official code's loss scale is 30)
    stop_below: float = 0.0  # skip further updates of a step once L_loc is below this
    resolution: int | None = None  # map height that feeds A_i (None: the largest ≤ 16, SD's 16x16 / the toy's 8x8)
    loss: str = "eq8"  # "eq8" (the paper) or "official" ((1 − a)² per layer)
    heads: tuple[int, int] | None = None  # heads [start, stop) that feed A_i (None: all heads)
    layers: tuple[str, ...] | None = None  # only layers whose name contains one of these (None: all at `resolution`)


def check_config(cfg: GuidanceConfig, num_steps: int) -> None:
    if not isinstance(cfg, GuidanceConfig):
        raise TypeError(f"config must be a GuidanceConfig, got {type(cfg).__name__}")
    if cfg.guided_steps is not None and not 0 <= cfg.guided_steps <= num_steps:
        raise ValueError(f"guided_steps must be in [0, {num_steps}] (the number of denoising steps), got {cfg.guided_steps}")
    if not math.isfinite(cfg.guide_until_t):
        raise ValueError(f"guide_until_t must be a finite timestep (the default 815.5 guides t = 999 → 815.5), got {cfg.guide_until_t}")
    if cfg.inner_iters < 1:
        raise ValueError(f"inner_iters must be >= 1, got {cfg.inner_iters}")
    if not (cfg.step_size >= 0 and math.isfinite(cfg.step_size)):
        raise ValueError(f"step_size must be a finite number >= 0, got {cfg.step_size} (the default is 30)")
    if math.isnan(cfg.stop_below):
        raise ValueError("stop_below is NaN; use 0.0 to never stop early")
    res = cfg.resolution
    if res is not None and not is_whole(res, 1):
        raise ValueError(f"resolution must be a map height >= 1 (e.g. 16) or None, got {cfg.resolution!r}")
    if isinstance(cfg.layers, str):
        raise TypeError(f"layers must be a tuple of name parts, e.g. ({cfg.layers!r},), not a string")
    if cfg.loss not in ("eq8", "official"):
        raise ValueError(f"loss must be 'eq8' or 'official', got {cfg.loss!r}")
    if cfg.heads is not None and not (len(cfg.heads) == 2 and 0 <= cfg.heads[0] < cfg.heads[1]):
        raise ValueError(f"heads must be a range (start, stop) with 0 <= start < stop, got {cfg.heads}")


def guided_step_count(config: GuidanceConfig, timesteps) -> int:
    """How many first reverse steps are guided: ``config.guided_steps`` when set, else the number of
    ``timesteps`` at or above ``config.guide_until_t``."""
    if config.guided_steps is not None:
        return config.guided_steps
    return int(sum(float(t) >= config.guide_until_t for t in timesteps))


class Objective:
    """A guidance that :func:`guided_generate` samples with (subclass it). At each of the first
    :meth:`guided_steps` reverse steps ``i`` (timestep ``t``) the latents ``z`` ``(B, C, h, w)`` are updated up to
    :meth:`max_updates` times by ``z ← z − step_size · ∇_z Σ_b loss_b``, where :meth:`loss` is read from
    the cross-attention of one conditional UNet pass; after each update a sample keeps going only while
    :meth:`keep_going` holds for the loss it had before that update."""

    #: which maps ``record=True`` averages and measures boxes in (resolution, heads, layers)
    record_maps: GuidanceConfig = GuidanceConfig()

    def check(self, num_steps: int) -> None:
        """Raise a clear error where the settings do not fit ``num_steps`` denoising steps."""

    def guided_steps(self, timesteps) -> int:
        """How many first reverse steps are guided."""
        raise NotImplementedError

    def max_updates(self, i: int, n_steps: int) -> int:
        """The most latent updates at guided step ``i`` of ``n_steps``."""
        raise NotImplementedError

    def step_size(self, i: int, timesteps, alphas_cumprod: torch.Tensor) -> float:
        """The factor on ``∇_z L`` at step ``i`` (timestep ``timesteps[i]``; ``alphas_cumprod`` is the scheduler's ᾱ)."""
        raise NotImplementedError

    def keep_going(self, i: int, n_steps: int, loss: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which samples update again at step ``i`` of ``n_steps`` after an update from ``loss``
        ``(B,)`` (the loss before that update)."""
        raise NotImplementedError

    def loss(self, store: AttentionStore, positions, boxes, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Per-sample loss ``(B,)`` from the store's current (conditional, batch ``B``) call; ``positions[b]`` and
        ``boxes[b]`` are sample ``b``'s word token positions and boxes."""
        raise NotImplementedError

    def score(self, maps: torch.Tensor, positions) -> torch.Tensor | None:
        """What the guidance raises, per word: ``(B, words)`` from ``record_maps``' maps ``(B, T, h, w)`` of the
        conditional half, recorded at every step with ``record=True`` (None: nothing to record)."""
        return None


class _Localisation(Objective):
    """``L_loc`` (Eq. 8, or the official variant) on the schedule of a :class:`GuidanceConfig`."""

    def __init__(self, config: GuidanceConfig):
        self.config = self.record_maps = config

    def check(self, num_steps: int) -> None:
        check_config(self.config, num_steps)

    def guided_steps(self, timesteps) -> int:
        return guided_step_count(self.config, timesteps)

    def max_updates(self, i: int, n_steps: int) -> int:
        return self.config.inner_iters

    def step_size(self, i: int, timesteps, alphas_cumprod: torch.Tensor) -> float:
        # = η ᾱ_t σ_t²: the official LMS update in DDIM scale
        return self.config.step_size * float(1 - alphas_cumprod[timesteps[i]])

    def keep_going(self, i: int, n_steps: int, loss: torch.Tensor) -> torch.Tensor:
        return loss >= self.config.stop_below

    def loss(self, store, positions, boxes, latent_hw) -> torch.Tensor:
        r = self.config.resolution or store.default_resolution()
        masks = [_masks(bx, r, latent_hw, _device_of(store)) for bx in boxes]
        return _batch_loss(store, r, self.config, positions, masks)


def as_objective(config) -> Objective:
    """``config`` as an :class:`Objective` (a :class:`GuidanceConfig` becomes ``L_loc`` on its schedule)."""
    if isinstance(config, Objective):
        return config
    if isinstance(config, GuidanceConfig):
        return _Localisation(config)
    raise TypeError(f"config must be a GuidanceConfig or an Objective, got {type(config).__name__}")


def _device_of(store: AttentionStore) -> torch.device:
    """The device of the store's current maps (the CPU when it holds none)."""
    return next(iter(store.maps.get(store.step, {}).values()), torch.empty(0)).device


def localisation_loss(maps: torch.Tensor, positions: Sequence[Sequence[int]], masks: torch.Tensor,
                      official: bool = False) -> torch.Tensor:
    """``L_loc`` for attention ``maps`` ``(B, T, h, w)``, word token ``positions`` (one list per word) and
    ``masks`` ``(N, h, w)``, one per word. Returns ``(B,)``."""
    if len(positions) != len(masks):
        raise ValueError(f"{len(masks)} masks for {len(positions)} words: give one box per word")
    if masks.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the attention maps are {tuple(maps.shape[-2:])}")
    if not bool(((masks >= 0) & torch.isfinite(masks)).all()):
        raise ValueError("masks hold negative or NaN values; a mask is 1 inside the box and 0 outside")
    if bool((masks.flatten(1).sum(1) <= 0).any()):
        raise ValueError("a mask is all zero: every word needs a box that covers at least one cell")
    terms = []
    for pos, m in zip(positions, masks.to(maps)):
        a = maps[:, list(pos)]  # (B, k, h, w)
        inside = ratio((a * m).sum((-1, -2)), a.sum((-1, -2)))
        terms.append(((1 - inside) ** 2 if official else 1 - inside).mean(1))
    return torch.stack(terms, 1).mean(1)


def _layer_maps(store: AttentionStore, res: int, config: GuidanceConfig, keep_heads: bool = False) -> list[torch.Tensor]:
    """The current call's maps ``(B, T, h, w)`` of the layers that feed ``A_i``, heads selected and averaged
    (``keep_heads``: ``(B, heads, T, h, w)``, not averaged)."""
    out = []
    for layer, m in store.maps.get(store.step, {}).items():
        h, w = store.shapes[layer]
        if h != res or (config.layers is not None and not any(s in layer for s in config.layers)):
            continue
        if m.dim() == 4:  # (B, heads, HW, T)
            if config.heads is not None:
                if config.heads[1] > m.shape[1]:
                    raise ValueError(f"heads {config.heads} but layer {layer} has {m.shape[1]} heads")
                m = m[:, config.heads[0]:config.heads[1]]
            if keep_heads:
                out.append(m.transpose(2, 3).reshape(*m.shape[:2], m.shape[3], h, w))
                continue
            m = m.mean(1)
        elif keep_heads:
            m = m[:, None]
            out.append(m.transpose(2, 3).reshape(*m.shape[:2], m.shape[3], h, w))
            continue
        out.append(m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w))
    if not out:
        raise ValueError(f"no cross-attention layer has {res}-high maps{' and a name containing ' + str(config.layers) if config.layers else ''}; "
                         f"maps present: {store.resolutions_present()}")
    return out


def _batch_loss(store, res, config, positions, masks) -> torch.Tensor:
    """Per-sample ``L_loc`` ``(B,)``; ``positions[b]`` and ``masks[b]`` belong to sample ``b``."""
    official = config.loss == "official"
    layer_maps = _layer_maps(store, res, config, keep_heads=official)
    if not official:  # eq8: one map per token, averaged over layers and heads, then the ratio
        m = torch.stack(layer_maps).mean(0)
        return torch.stack([localisation_loss(m[b:b + 1], positions[b], masks[b])[0] for b in range(m.shape[0])])
    losses = []  # official: the ratio per layer and head, (1 - a)^2 averaged over heads, then layers
    for b in range(layer_maps[0].shape[0]):
        terms = [localisation_loss(m[b], positions[b], masks[b], official=True).mean() for m in layer_maps]
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses)


def _masks(boxes, res: int, latent_hw: tuple[int, int], device) -> torch.Tensor:
    h, w = latent_hw
    return torch.stack([box_to_mask(b, res, round(res * w / h)) for b in boxes]).to(device)


def loss_and_grad(unet, store: AttentionStore, z: torch.Tensor, t, cond: torch.Tensor, positions, boxes,
                  config: GuidanceConfig | Objective, scheduler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One conditional UNet pass on latents ``z`` ``(B, ...)`` (requires grad) inside an active
    ``attention_store`` (made with ``keep_grad=True``). ``positions``/``boxes`` are one word list per
    sample, or a single one shared by all samples. Returns the per-sample loss ``(B,)`` (detached; ``L_loc``
    for a :class:`GuidanceConfig`, else the :class:`Objective`'s) and ``∇_z Σ_b loss`` (samples are independent
    in the UNet, so each gets its own gradient)."""
    objective = as_objective(config)
    B = z.shape[0]
    if positions and isinstance(positions[0][0], int):  # one word list shared by the batch
        positions, boxes = [positions] * B, [boxes] * B
    store.enabled = True
    try:
        with torch.enable_grad():
            x = scheduler.scale_model_input(z, t) if scheduler is not None else z
            unet(x, t, cond)
            loss = objective.loss(store, positions, boxes, tuple(z.shape[-2:]))
            (grad,) = torch.autograd.grad(loss.sum(), z)
    finally:
        store.maps.clear()
        store.enabled = False
    return loss.detach(), grad


@torch.no_grad()
def _decode(pipe, latents):
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")


@dataclass
class GuidedOutput:
    """What :func:`guided_generate` returns.

    ``losses``: ``(updates, n_images)`` ``L_loc`` (or the :class:`Objective`'s loss) at every guided update
    (NaN where a sample had stopped). With ``record=True``: ``maps`` ``(n_images, n_words, h, w)``, each word's
    attention averaged over the denoising steps (conditional branch, the layers that feed ``A_i``), and
    ``inside`` ``(steps, n_images, n_words)``, the fraction of each word's attention mass inside its box at
    every denoising step; ``scores`` ``(steps, n_images, n_words)``, what an :class:`Objective` raises per word
    at every step (:meth:`Objective.score`; None when it records nothing, as for ``L_loc``).
    """

    images: list
    losses: np.ndarray
    maps: torch.Tensor | None = None
    inside: np.ndarray | None = None
    passes: dict = field(default_factory=dict)
    scores: np.ndarray | None = None


def _depth(x) -> int:
    """Nesting depth of a number (0), a box (1) or a list of boxes (2), read from first elements."""
    d = 0
    while isinstance(x, (list, tuple, np.ndarray, torch.Tensor)) and len(x):
        x, d = x[0], d + 1
    return d


def _per_prompt(words, boxes, n: int) -> tuple[list, list]:
    """``words``/``boxes`` as one list per prompt (a single shared list is repeated ``n`` times)."""
    if words and isinstance(words[0], str):
        words = [list(words)] * n
    if len(boxes) and _depth(boxes[0]) == 1:  # one box list shared by all prompts
        boxes = [list(boxes)] * n
    return [list(w) for w in words], [list(b) for b in boxes]


def guided_generate(world, prompts: Sequence[str], words, boxes, seeds: Sequence[int] | None = None, seed: int = 0,
                    config: GuidanceConfig | Objective = GuidanceConfig(), batch_size: int = 8,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    height: int | None = None, width: int | None = None, record: bool = False,
                    progress: bool = False) -> GuidedOutput:
    """Images for ``prompts`` with the attention of each prompt's ``words`` steered into its ``boxes``.

    ``words``/``boxes``: one list per prompt, or a single list shared by all prompts. Image ``i`` uses
    seed ``seeds[i]`` (default ``seed + i``) and the same initial noise as :meth:`World.generate`, so
    ``guided_steps=0`` reproduces the pipeline. ``record=True`` also records where each word attends
    during denoising (for guided and, with ``guided_steps=0``, plain sampling). The UNet's attention
    processors are restored afterwards, also after an exception. ``config`` may also be another
    :class:`Objective` (e.g. Attend-and-Excite), sampled on its own schedule.
    """
    prompts, boxes, positions, seeds, steps, cfg_scale, objective = _check_inputs(
        world, prompts, words, boxes, seeds, seed, config, batch_size, num_inference_steps, guidance_scale, height,
        width, record)
    pipe, device, n = world.pipe, world.device, len(prompts)
    unet, sched, f = pipe.unet, pipe.scheduler, pipe.vae_scale_factor
    h, w = (height or unet.config.sample_size * f) // f, (width or unet.config.sample_size * f) // f
    dev = "cpu" if device.type == "mps" else device
    images, all_losses, recordings = [], [], []
    passes = {"cfg_forward": 0, "guided_forward": 0, "guided_backward": 0, "images": n}
    store = AttentionStore(keep_grad=True, keep_similarity=False, average_heads=False)
    with attention_store(unet, store):
        for lo in bar(range(0, n, batch_size), desc="guided", progress=progress):
            sl = slice(lo, min(lo + batch_size, n))
            B = sl.stop - sl.start
            # the prompts' embeddings and each image's initial noise, drawn as World.generate draws it
            cond, uncond = pipe.encode_prompt(prompts[sl], device, 1, True)
            latents = torch.cat([torch.randn((1, unet.config.in_channels, h, w), device=device, dtype=cond.dtype,
                                             generator=torch.Generator(dev).manual_seed(s)) for s in seeds[sl]])
            sched.set_timesteps(steps, device=device)
            latents = latents * sched.init_noise_sigma
            alphas = sched.alphas_cumprod.to(device)
            losses, n_guided = [], objective.guided_steps(sched.timesteps)
            recording = _Recording(objective, positions[sl], boxes[sl], (h, w), device) if record else None
            for i, t in enumerate(sched.timesteps):
                # a guided step: update the latents down the objective's gradient until every sample stops
                if i < n_guided:
                    size = objective.step_size(i, sched.timesteps, alphas)
                    active = torch.ones(B, dtype=torch.bool, device=device)
                    for _ in range(objective.max_updates(i, len(sched.timesteps))):
                        latents, loss = _guided_update(unet, store, latents, t, cond, positions[sl], boxes[sl],
                                                       objective, sched, size, active)
                        passes["guided_forward"] += 1
                        passes["guided_backward"] += 1
                        losses.append(torch.where(active, loss, torch.nan).cpu().numpy())
                        _check_update(latents, sched, i, t, loss, size, config)
                        active &= objective.keep_going(i, len(sched.timesteps), loss)
                        if not active.any():
                            break
                # denoise with classifier-free guidance (recording where the words attend)
                store.enabled = record
                with torch.no_grad():
                    x = sched.scale_model_input(torch.cat([latents] * 2), t)
                    eps = unet(x, t, torch.cat([uncond, cond])).sample
                    passes["cfg_forward"] += 1
                    if record:
                        recording.add(store)
                    store.enabled = False
                    e_u, e_c = eps.chunk(2)
                    latents = sched.step(e_u + cfg_scale * (e_c - e_u), t, latents).prev_sample
            _check_final(latents, cfg_scale, config)
            images += _decode(pipe, latents)
            all_losses.append(np.array(losses).reshape(len(losses), B))
            recordings.append(recording)
    out = GuidedOutput(images, np.concatenate(all_losses, 1), passes=passes)
    return _Recording.join(out, recordings) if record else out


def _check_inputs(world, prompts: str | Sequence[str], words, boxes, seeds: Sequence[int] | None, seed: int,
                  config: GuidanceConfig | Objective, batch_size: int, steps: int | None, cfg_scale: float | None,
                  height: int | None, width: int | None,
                  record: bool) -> tuple[list[str], list, list, list[int], int, float, Objective]:
    """:func:`guided_generate`'s inputs checked (a clear error for each mistake) and normalised: the prompts,
    each prompt's checked boxes and its words' token positions, the seeds, the step count, the guidance scale
    (None: the world's) and ``config`` as an :class:`Objective`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts given: pass a non-empty list of prompts")
    if isinstance(words, str) or (len(words) and isinstance(words[0], (list, tuple)) and
                                  any(isinstance(w, str) for w in words)):
        raise TypeError(f"words must be a list of words (e.g. ['cat', 'dog']) or one such list per prompt, "
                        f"got {words!r}")
    if len(boxes) and _depth(boxes[0]) == 0:
        raise TypeError(f"boxes must be a list of (x0, y0, x1, y1) boxes, one per word, got {list(boxes)!r}")
    if not is_whole(batch_size, 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    words, boxes = _per_prompt(words, boxes, n)
    if len(words) != n or len(boxes) != n:
        raise ValueError(f"{n} prompts but {len(words)} word lists and {len(boxes)} box lists: give one per prompt "
                         "(or one shared)")
    seeds = list(range(seed, seed + n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    steps = world.num_inference_steps if steps is None else steps
    cfg_scale = world.guidance_scale if cfg_scale is None else cfg_scale
    if not is_whole(steps, 1):
        raise ValueError(f"num_inference_steps must be >= 1 (an integer), got {steps!r} (None: the world's "
                         f"{world.num_inference_steps})")
    objective = as_objective(config)
    objective.check(steps)
    if not (cfg_scale >= 1 and math.isfinite(cfg_scale)):
        raise ValueError(f"guidance_scale must be >= 1 and finite (1 turns classifier-free guidance off), "
                         f"got {cfg_scale}")
    f = world.pipe.vae_scale_factor
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v < f or v % f):
            raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downsampling), got {v}")
    for p, ws, bs in zip(prompts, words, boxes):
        if len(ws) != len(bs):
            raise ValueError(f"{len(bs)} boxes for {len(ws)} words in {p!r}: give one box per word")
    boxes = [[check_box(b, f"box of {w!r}") for w, b in zip(ws, bs)] for ws, bs in zip(words, boxes)]
    positions = [word_positions(world.pipe.tokenizer, p, ws) for p, ws in zip(prompts, words)]
    if record and len({len(ws) for ws in words}) > 1:
        raise ValueError("record=True needs the same number of words in every prompt")
    return prompts, boxes, positions, seeds, steps, cfg_scale, objective


def _guided_update(unet, store: AttentionStore, latents: torch.Tensor, t, cond: torch.Tensor, positions, boxes,
                   objective: Objective, sched, size: float,
                   active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One latent update of the samples still ``active``: ``z ← z − size · ∇_z Σ_b loss_b`` with the objective's
    loss (Eq. 8's ``L_loc`` for a :class:`GuidanceConfig`). Returns the new latents and the loss before it."""
    z = latents.detach().requires_grad_(True)
    loss, grad = loss_and_grad(unet, store, z, t, cond, positions, boxes, objective, sched)
    step = (size * grad) * active.view(-1, 1, 1, 1).to(grad.dtype)
    return (z - step).detach(), loss


def _check_update(latents: torch.Tensor, sched, i: int, t, loss: torch.Tensor, size: float, config) -> None:
    """Refuse latents that a guided update at step ``i`` blew up (they would decode to black)."""
    top = float(latents.detach().abs().max())
    if not math.isfinite(top) or top > 1e3 * float(sched.init_noise_sigma):
        hint = (f"lower GuidanceConfig.step_size (now {config.step_size:g}; the default is 30)"
                if isinstance(config, GuidanceConfig) else
                f"lower the {type(config).__name__}'s step size (the factor on the gradient is now {size:g})")
        raise FloatingPointError(  # latents start near N(0, σ²): these would decode to black
            f"guidance diverged at step {i} (t = {int(t)}): the latents reach {top:.3g} "
            f"({'localisation ' if isinstance(config, GuidanceConfig) else ''}loss "
            f"{loss.float().cpu().tolist()}), which would decode to a black image; {hint}")


def _check_final(latents: torch.Tensor, cfg_scale: float, config) -> None:
    """Refuse final latents with NaN or infinite values."""
    if not bool(torch.isfinite(latents).all()):
        raise FloatingPointError("sampling diverged: the final latents hold NaN or infinite values, which would "
                                 "decode to a black image (in float16, try float32; lower the guidance scale "
                                 f"{cfg_scale:g} or " + (f"GuidanceConfig.step_size {config.step_size:g})"
                                                          if isinstance(config, GuidanceConfig) else
                                                          f"the {type(config).__name__}'s step size)"))


class _Recording:
    """What ``record=True`` keeps of one batch at every denoising step, from the conditional half of the
    classifier-free-guidance call (the objective's ``record_maps``): each word's map, summed; the share of it
    inside the word's box; and what the objective raises (:meth:`Objective.score`)."""

    def __init__(self, objective: Objective, positions, boxes, latent_hw: tuple[int, int], device):
        self.objective, self.positions, self.boxes = objective, positions, boxes
        self.latent_hw, self.device = latent_hw, device
        self.maps, self.masks, self.inside, self.scores = None, None, [], []

    def add(self, store: AttentionStore) -> None:
        """Read one step's maps from ``store`` (then cleared)."""
        view, B = self.objective.record_maps, len(self.positions)
        r = view.resolution or store.default_resolution()
        full = torch.stack(_layer_maps(store, r, view)).mean(0)[B:]  # conditional half
        m = torch.stack([torch.stack([full[b, pos].mean(0) for pos in self.positions[b]])
                         for b in range(B)])  # (B, words, h, w)
        score = self.objective.score(full, self.positions)
        if score is not None:
            self.scores.append(score.float().cpu().numpy())
        if self.masks is None:  # the boxes do not change over the steps
            self.masks = torch.stack([_masks(bx, r, self.latent_hw, self.device) for bx in self.boxes])
        self.inside.append(ratio((m * self.masks).sum((-1, -2)), m.sum((-1, -2))).cpu().numpy())
        self.maps = m if self.maps is None else self.maps + m
        store.maps.clear()

    @staticmethod
    def join(out: GuidedOutput, recordings: list[_Recording]) -> GuidedOutput:
        """``out`` with the batches' recordings: maps averaged over the steps, shares and scores per step."""
        out.maps = torch.cat([(r.maps / len(r.inside)).float().cpu() for r in recordings])
        out.inside = np.concatenate([np.stack(r.inside) for r in recordings], 1)
        scores = [np.stack(r.scores) for r in recordings if r.scores]
        if scores:
            out.scores = np.concatenate(scores, 1)
        return out


def guided_sample(world, prompt: str, words: Sequence[str], boxes: Sequence[Sequence[float]], seed: int = 0,
                  config: GuidanceConfig = GuidanceConfig(), num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, return_losses: bool = False, height: int | None = None,
                  width: int | None = None):
    """One image for ``prompt`` (see :func:`guided_generate`). ``height``/``width`` default to the world's
    image size. Returns the PIL image (and, with ``return_losses``, ``L_loc`` at every guided update)."""
    if len(words) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes for {len(words)} words: give one box per word")
    out = guided_generate(world, [prompt], [list(words)], [list(boxes)], seeds=[seed], config=config,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          height=height, width=width)
    losses = [float(x) for x in out.losses[:, 0] if not np.isnan(x)]
    return (out.images[0], losses) if return_losses else out.images[0]


def _timed(fn, device, reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls, after one warm-up call."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost(world, prompts: Sequence[str], words, boxes, seeds: Sequence[int] | None = None,
                 config: GuidanceConfig = GuidanceConfig(), reps: int = 5, runs: int = 3, **kwargs) -> dict:
    """Wall time of plain vs guided sampling of the same batch, and the *pass-count floor*.

    Plain sampling makes one classifier-free-guidance UNet call per step (batch 2B); guided sampling adds
    one conditional forward pass that keeps the graph (batch B) and one backward pass per update. Each
    kind of pass is timed on its own (``reps`` times, after a warm-up); the floor is the time the passes
    alone would take, as a multiple of plain sampling's. Plain and guided sampling are each run ``runs``
    times, alternating, and the median of each is used, so that one slow run on a shared CPU does not
    decide the ratio. ``vs_floor`` = measured ratio / floor ratio.
    """
    if runs < 1 or reps < 1:
        raise ValueError(f"runs and reps must be at least 1 (got runs={runs}, reps={reps})")
    prompts = list(prompts)
    B = len(prompts)
    if "batch_size" in kwargs:
        raise ValueError("measure_cost runs the prompts as one batch; leave batch_size out")
    kwargs["batch_size"] = B
    words, boxes = _per_prompt(words, boxes, B)
    dev = world.device
    guided_generate(world, prompts[:1], words[:1], boxes[:1], config=GuidanceConfig(guided_steps=1, inner_iters=1),
                    num_inference_steps=2, height=kwargs.get("height"), width=kwargs.get("width"))  # warm-up
    runs_s = {"plain": [], "guided": []}
    for _ in range(runs):
        for name, cfg in (("plain", GuidanceConfig(guided_steps=0)), ("guided", config)):
            _sync(dev)
            t = time.perf_counter()
            out = guided_generate(world, prompts, words, boxes, seeds=seeds, config=cfg, **kwargs)
            _sync(dev)
            runs_s[name].append(time.perf_counter() - t)
    timings = {name: statistics.median(v) for name, v in runs_s.items()}
    passes = out.passes
    pipe, unet = world.pipe, world.pipe.unet
    cond, uncond = pipe.encode_prompt(prompts, dev, 1, True)
    f = pipe.vae_scale_factor
    h = kwargs.get("height") or unet.config.sample_size * f
    w = kwargs.get("width") or unet.config.sample_size * f
    z = torch.randn(B, unet.config.in_channels, h // f, w // f, device=dev, dtype=cond.dtype)
    pipe.scheduler.set_timesteps(kwargs.get("num_inference_steps") or world.num_inference_steps, device=dev)
    t0 = pipe.scheduler.timesteps[0]
    z2, context = torch.cat([z] * 2), torch.cat([uncond, cond])
    with torch.no_grad():
        t_cfg = _timed(lambda: unet(z2, t0, context), dev, reps)
    positions = [word_positions(pipe.tokenizer, p, x) for p, x in zip(prompts, words)]
    with attention_store(unet, AttentionStore(keep_grad=True, keep_similarity=False, average_heads=False)) as store:
        t_fb = _timed(lambda: loss_and_grad(unet, store, z.clone().requires_grad_(True), t0, cond, positions, boxes,
                                            config), dev, reps)
    n_cfg, n_fb = passes["cfg_forward"], passes["guided_forward"]
    floor = (n_cfg * t_cfg + n_fb * t_fb) / (n_cfg * t_cfg)
    measured = timings["guided"] / timings["plain"]
    return {"images": B, "plain_s": timings["plain"], "guided_s": timings["guided"], "cfg_forward_s": t_cfg,
            "guided_forward_backward_s": t_fb, "cfg_forwards": n_cfg, "guided_forward_backwards": n_fb,
            "measured_ratio": measured, "floor_ratio": floor, "vs_floor": measured / floor,
            "runs": runs, "plain_runs_s": runs_s["plain"], "guided_runs_s": runs_s["guided"]}
