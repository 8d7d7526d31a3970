"""Spatial inversion, part 2: steer cross-attention into boxes during the first denoising steps.

For the first ``guided_steps`` reverse steps the latent moves down the gradient of (Eq. 8)

    L_loc = 1/N Σ_i (1 − Σ(M_i ∘ A_i) / Σ A_i)

where ``A_i`` is the cross-attention map of word ``i`` (conditional branch; averaged over heads and
over the cross-attention layers whose maps have the chosen resolution) and ``M_i`` its box mask.
A word of several tokens (a multi-vector ``S*``) averages its tokens' terms.

**Update rule.** ``z ← z − η · σ_t² · ∇_z L_loc`` with ``σ_t² = (1 − ᾱ_t) / ᾱ_t`` (the noise level
of the latent at step ``t``; the official code scales its gradient by the same quantity of its LMS
scheduler) and ``η = step_size``, repeated ``inner_iters`` times per guided step (or until
``L_loc`` falls below ``stop_below``). Classifier-free guidance then denoises as usual.

``loss="official"`` is the official code's variant: ``(1 − a)²`` per layer, averaged over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import AttentionStore, attention_store, token_indices
from .layout import box_to_mask, check_box


@dataclass(frozen=True)
class GuidanceConfig:
    guided_steps: int = 10  # the first reverse steps that are guided (the paper: 10)
    inner_iters: int = 3  # latent updates per guided step
    step_size: float = 30.0  # η in z ← z − η σ_t² ∇L (the official code's loss scale is 30)
    stop_below: float = 0.0  # skip further updates of a step once L_loc is below this
    resolution: int | None = None  # map height that feeds A_i (None: the largest ≤ 16, SD's 16x16 / the toy's 8x8)
    loss: str = "eq8"  # "eq8" (the paper) or "official" ((1 − a)² per layer)


def check_config(cfg: GuidanceConfig, num_steps: int) -> None:
    if not 0 <= cfg.guided_steps <= num_steps:
        raise ValueError(f"guided_steps must be in [0, {num_steps}] (the number of denoising steps), got {cfg.guided_steps}")
    if cfg.inner_iters < 1:
        raise ValueError(f"inner_iters must be >= 1, got {cfg.inner_iters}")
    if not cfg.step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {cfg.step_size}")
    if cfg.loss not in ("eq8", "official"):
        raise ValueError(f"loss must be 'eq8' or 'official', got {cfg.loss!r}")


def localisation_loss(maps: torch.Tensor, positions: Sequence[Sequence[int]], masks: torch.Tensor,
                      official: bool = False) -> torch.Tensor:
    """``L_loc`` for attention ``maps`` ``(B, T, h, w)``, word token ``positions`` (one list per word) and
    ``masks`` ``(N, h, w)``, one per word. Returns ``(B,)``."""
    if len(positions) != len(masks):
        raise ValueError(f"{len(masks)} masks for {len(positions)} words: give one box per word")
    if masks.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the attention maps are {tuple(maps.shape[-2:])}")
    terms = []
    for pos, m in zip(positions, masks.to(maps)):
        a = maps[:, list(pos)]  # (B, k, h, w)
        inside = (a * m).sum((-1, -2)) / a.sum((-1, -2)).clamp(min=1e-12)
        terms.append(((1 - inside) ** 2 if official else 1 - inside).mean(1))
    return torch.stack(terms, 1).mean(1)


def _official_loss(store: AttentionStore, res: int, positions, masks, batch) -> torch.Tensor:
    losses = []
    for layer, m in store.maps[store.step].items():
        h, w = store.shapes[layer]
        if h > res:
            continue
        x = m[batch].transpose(1, 2).reshape(-1, m.shape[-1], h, w)
        mk = torch.stack([_resize_mask(mm, h, w) for mm in masks])
        losses.append(localisation_loss(x, positions, mk, official=True))
    return torch.stack(losses).mean(0)


def _resize_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(mask[None, None], size=(h, w), mode="nearest")[0, 0]


def word_positions(tokenizer, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """Token positions of each word in the prompt (clear error when a word is absent)."""
    return [token_indices(tokenizer, prompt, w) for w in words]


def loss_and_grad(unet, store: AttentionStore, z: torch.Tensor, t, cond: torch.Tensor, positions, boxes,
                  config: GuidanceConfig, scheduler=None) -> tuple[float, torch.Tensor]:
    """One conditional UNet pass on latents ``z`` (requires grad) inside an active ``attention_store``;
    returns ``L_loc`` and its gradient with respect to ``z``."""
    store.enabled = True
    with torch.enable_grad():
        x = scheduler.scale_model_input(z, t) if scheduler is not None else z
        unet(x, t, cond)
        r = config.resolution or store.default_resolution()
        masks = torch.stack([box_to_mask(b, r, round(r * z.shape[-1] / z.shape[-2])) for b in boxes]).to(z.device)
        if config.loss == "eq8":
            loss = localisation_loss(store.token_maps(steps=store.step, res=r), positions, masks)[0]
        else:
            loss = _official_loss(store, r, positions, masks, slice(0, 1))[0]
        (grad,) = torch.autograd.grad(loss, z)
    store.maps.clear()
    store.enabled = False
    return loss.item(), grad


@torch.no_grad()
def _decode(pipe, latents):
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")


def guided_sample(world, prompt: str, words: Sequence[str], boxes: Sequence[Sequence[float]], seed: int = 0,
                  config: GuidanceConfig = GuidanceConfig(), num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, return_losses: bool = False, height: int | None = None,
                  width: int | None = None):
    """One image for ``prompt`` with the attention of each of ``words`` steered into its box.

    ``height``/``width`` default to the world's image size. Returns the PIL image (and, with ``return_losses``, ``L_loc`` at every guided update). The UNet's
    attention processors are restored afterwards, also after an exception.
    """
    pipe = world.pipe
    steps = num_inference_steps or world.num_inference_steps
    cfg_scale = world.guidance_scale if guidance_scale is None else guidance_scale
    check_config(config, steps)
    if cfg_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 turns classifier-free guidance off), got {cfg_scale}")
    if len(words) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes for {len(words)} words: give one box per word")
    boxes = [check_box(b, f"box of {w!r}") for w, b in zip(words, boxes)]
    positions = word_positions(pipe.tokenizer, prompt, words)
    device, unet, sched = world.device, pipe.unet, pipe.scheduler
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    f = pipe.vae_scale_factor
    h, w = (height or unet.config.sample_size * f) // f, (width or unet.config.sample_size * f) // f
    gen = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(seed)
    latents = torch.randn((1, unet.config.in_channels, h, w), generator=gen, device=device, dtype=cond.dtype)
    sched.set_timesteps(steps, device=device)
    latents = latents * sched.init_noise_sigma
    alphas = sched.alphas_cumprod.to(device)
    losses: list[float] = []
    store = AttentionStore(keep_grad=True, keep_similarity=False)
    with attention_store(unet, store):
        for i, t in enumerate(sched.timesteps):
            if i < config.guided_steps:
                sigma2 = float((1 - alphas[t]) / alphas[t])
                for _ in range(config.inner_iters):
                    z = latents.detach().requires_grad_(True)
                    loss, grad = loss_and_grad(unet, store, z, t, cond, positions, boxes, config, sched)
                    losses.append(loss)
                    latents = (z - config.step_size * sigma2 * grad).detach()
                    if loss < config.stop_below:
                        break
            store.enabled = False
            with torch.no_grad():
                x = sched.scale_model_input(torch.cat([latents] * 2), t)
                eps = unet(x, t, torch.cat([uncond, cond])).sample
                e_u, e_c = eps.chunk(2)
                latents = sched.step(e_u + cfg_scale * (e_c - e_u), t, latents).prev_sample
    image = _decode(pipe, latents)[0]
    return (image, losses) if return_losses else image
