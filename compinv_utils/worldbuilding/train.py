"""Rebuild every weight of the toy world from scratch.

    python -m compinv_utils.worldbuilding.train --out data/toy                   # the committed world
    python -m compinv_utils.worldbuilding.train --out /tmp/w --profile smoke     # a quick check of the code path
    python -m compinv_utils.worldbuilding.train --out /tmp/w --profile cpu-full  # the whole world on a 2-core CPU
    python -m compinv_utils.worldbuilding.train --out /tmp/w --profile cpu-full --stages vae,unet --from data/toy
    python -m compinv_utils.worldbuilding.train --out /tmp/w --profile gpu       # the whole world on one GPU
    python -m compinv_utils.worldbuilding.train --profile gpu-short --data-only  # render and cache a data set only

Stages: tokenizer, rendered data set, VAE, CLIP, detector, UNet (its EMA saved every ``unet_checkpoint_every``
steps) and the assembled ``StableDiffusionPipeline``; stages left out of ``--stages`` are loaded from ``--from``
(default ``--out``). Every random choice is seeded, so a rerun on the same device and library versions rebuilds
the same weights.

The data set is rendered once into arrays (images, boxes, per-object masks on the latent grid, captions already
tokenised with the object each noun token names) and cached in ``--cache-dir`` under a key of the configuration.
The UNet stage checkpoints its whole state, and ``--stages unet --resume`` continues after an interruption.
``ground_weight`` / ``ground_pixel_weight`` add a token-level grounding loss on the noun tokens' cross-attention
(TokenCompose, Wang et al., CVPR 2024). Scenes in which an object has the look of a concept of interest are
redrawn, so no concept is ever seen in training. The VAE's loss weights object pixels and adds an L1 term on image
gradients (:func:`vae_loss`) so that a two-colour pattern survives the latent grid.

Why each design choice was made, the profiles' sizes and the runs' times are on the site's page about the world
(``docs/world.md``); the runs themselves are logged in ``data/toy/training_log.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import atomic_path, torch_load, torch_save, write_text
from ..toy import render
from ..toy.models import (IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZES, UNET_WIDTHS, ToyDetector,
                     check_latent_size, check_unet_widths, make_clip, make_sample_scheduler, make_train_scheduler,
                     make_unet, make_vae, vae_latent_size)
from .tokenizer import build_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, as in SD's feature extractor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


CAPTIONS_PER_SCENE = 4  # captions drawn once per scene and stored tokenised (a step picks one of them)
MASK_SIZE = LATENT_SIZE  # object masks at the latent resolution (TrainConfig.latent_size)
DATA_VERSION = 2  # bump when the rendered arrays change, so that old caches are not reused


@dataclass(frozen=True)
class TrainConfig:
    n_scenes: int = 60_000  # rendered training scenes (seeds 0..n-1; held-out pairs never appear)
    vae_steps: int = 2_500  # AutoencoderKL steps
    vae_batch: int = 128
    clip_steps: int = 3_000  # contrastive CLIP steps
    clip_batch: int = 512
    clip_lr: float = 5e-4
    # the CLIP stage's own captions (None: the generator's). With render.FULL every caption names every pattern,
    # so a phrase without a pattern word means a plain object, which the generator's captions cannot teach
    clip_caption_policy: render.CaptionPolicy | None = None
    # add to every batch, per caption, the same caption with one object's pattern changed (swapped, left out or
    # added: a hard negative). Without them, telling the captions of a batch apart never needs the pattern
    # (docs/world.md has the measurement). Needs captions that always name the pattern (clip_caption_policy=render.FULL)
    clip_pattern_negatives: bool = False
    unet_steps: int = 9_000  # UNet denoising steps
    unet_batch: int = 256
    unet_lr: float = 4e-4
    unet_warmup: int = 500  # linear warm-up steps, then cosine decay to 0
    cfg_dropout: float = 0.1  # probability that a caption is replaced by "" (classifier-free guidance)
    ema_decay: float = 0.999
    unet_checkpoint_every: int = 1000  # steps between saves of the EMA weights (unet_ema_partial/)
    # wall-clock budget of the UNet stage in seconds (0: none). With a budget, the learning-rate schedule runs on
    # whichever is further along, steps or time, and the stage stops when time is up (the log says at which step)
    unet_time_budget_s: float = 0.0
    det_steps: int = 2_500  # detector steps
    det_batch: int = 256
    seed: int = 0
    captions_per_scene: int = CAPTIONS_PER_SCENE  # captions drawn (and tokenised) once per scene
    ground_weight: float = 0.0  # weight of the token grounding loss on noun tokens' cross-attention (0: off)
    ground_pixel_weight: float = 0.0  # weight of the pixel-level grounding term (BCE of a token's map vs its mask)
    # cross-attention map sizes the grounding loss reads: the latent grid and/or half of it (None: the latent grid;
    # see grounded_maps)
    ground_resolutions: tuple[int, ...] | None = None
    unet_object_weight: float = 0.0  # extra weight of object cells in the UNet's noise loss (0: plain MSE)
    latent_channels: int = LATENT_CHANNELS  # the VAE's latent channels (SD 1.5 has 4)
    # the latent grid (models.LATENT_SIZES): 8x8 cells of 4x4 pixels (committed) or 16x16 of 2x2, where a pattern
    # with a period of ~6 pixels spans three cells instead of one and a half; object masks are stored at this size
    latent_size: int = LATENT_SIZE
    unet_widths: tuple[int, ...] = UNET_WIDTHS  # the UNet's channels at its two levels (models.make_unet)
    vae_object_weight: float = 4.0  # extra weight of object pixels in the VAE's reconstruction loss (0: uniform)
    vae_edge_weight: float = 0.5  # weight of the L1 loss on image gradients (keeps stripes, dots and checks)
    # how often the training captions name each attribute (render.CaptionPolicy: colour, pattern, background,
    # second colour); every committed world was trained on the default
    caption_policy: render.CaptionPolicy = render.CaptionPolicy()
    # the detector is a measuring instrument, not part of the generator: its data set includes the held-out noun
    # pairs, so that it finds them as well as the others (docs/world.md)
    detector_sees_held_out: bool = True

    def grounded_maps(self) -> tuple[int, ...]:
        """The cross-attention map sizes the grounding loss reads: ``ground_resolutions``, else the latent grid."""
        return tuple(self.ground_resolutions or (self.latent_size,))


PROFILES = {
    "full": TrainConfig(),
    # Continue the UNet stage on a CPU from a checkpoint (--stages unet --init-unet DIR).
    "cpu-unet": TrainConfig(n_scenes=30_000, unet_steps=1_800, unet_batch=64, unet_lr=2e-4, unet_warmup=50,
                            ema_decay=0.998, unet_checkpoint_every=200),
    # A whole world on a 2-core CPU (sizes and times: docs/world.md).
    "cpu-full": TrainConfig(n_scenes=30_000, vae_steps=1_800, vae_batch=64, clip_steps=1_200, clip_batch=128,
                            unet_steps=6_500, unet_batch=32, unet_lr=2e-4, unet_warmup=300, ema_decay=0.999,
                            unet_checkpoint_every=500, det_steps=1_500, det_batch=64, ground_weight=0.1,
                            ground_pixel_weight=0.025),
    # A whole world on one GPU: more scenes and three times the UNet steps of "full".
    "gpu": TrainConfig(n_scenes=100_000, unet_steps=30_000, unet_warmup=1_000, ema_decay=0.9995,
                       unet_checkpoint_every=2_000, ground_weight=0.2, ground_pixel_weight=0.05),
    # The UNet alone (VAE, CLIP and detector loaded with --from) in one short GPU call, in batches of 1,024 under
    # --unet-minutes; the step count is the expected one, so the warm-up is in real steps and the cosine follows
    # time if the GPU is slower.
    "gpu-short": TrainConfig(n_scenes=100_000, unet_steps=5_000, unet_batch=1_024, unet_lr=4e-4, unet_warmup=250,
                             ema_decay=0.999, unet_checkpoint_every=1_000, ground_weight=0.1, ground_pixel_weight=0.025),
    "smoke": TrainConfig(n_scenes=512, vae_steps=4, vae_batch=16, clip_steps=4, clip_batch=16, unet_steps=4,
                         unet_batch=16, det_steps=4, det_batch=16),
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def training_scene(seed: int, held_out: bool = False) -> render.Scene:
    """Training scene ``seed``: ``render.sample_scene(seed)``, redrawn from a derived seed in the rare case
    (about 1 scene in 1,000) that an object has a concept of interest's look. With ``held_out`` the held-out
    noun pairs may appear too (the detector's data set: see :attr:`TrainConfig.detector_sees_held_out`)."""
    exclude = not held_out
    scene, attempt = render.sample_scene(seed, exclude_held_out=exclude), 0
    while render.has_concept_look(scene):
        attempt += 1
        scene = render.sample_scene(int(np.random.default_rng([seed, attempt]).integers(2**62)), exclude_held_out=exclude)
    return scene


def _render_one(seed: int, captions: int = 0, caption_seed: int = 0,
                policy: render.CaptionPolicy = render.CaptionPolicy(), held_out: bool = False,
                mask_size: int = MASK_SIZE):
    scene = training_scene(seed, held_out)
    img, boxes = render.draw_scene(scene)
    masks = render.object_masks(scene, mask_size)
    rng = np.random.default_rng([caption_seed, seed])
    return scene, np.asarray(img), boxes, masks, [render.caption(scene, rng, policy) for _ in range(captions)]


def render_dataset(n: int, workers: int, captions: int = CAPTIONS_PER_SCENE, seed: int = 0,
                   policy: render.CaptionPolicy = render.CaptionPolicy(), held_out: bool = False,
                   mask_size: int = MASK_SIZE) -> dict:
    """Render scenes 0..n-1: ``images`` (n, 32, 32, 3) uint8, ``labels`` (n, 2) noun index or -1,
    ``boxes`` (n, 2, 4) in [0, 1], ``masks`` (n, 2, S, S) bool with S = ``mask_size`` (each object's visible
    cells on the latent grid; the cell it covers most is always set), ``captions`` (n, K) with K = ``captions`` drawn by
    :func:`render.caption` (with ``policy``) from a generator seeded by ``(seed, scene)``, and the ``scenes``
    themselves. With ``held_out`` the scenes come from ``training_scene(seed, held_out=True)``."""
    nouns = sorted(render.NOUNS)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = -np.ones((n, 2), np.int64)
    boxes = np.zeros((n, 2, 4), np.float32)
    masks = np.zeros((n, 2, mask_size, mask_size), bool)
    caps = np.empty((n, captions), object)
    scenes = []
    job = partial(_render_one, captions=captions, caption_seed=seed, policy=policy, held_out=held_out,
                  mask_size=mask_size)
    with mp.get_context("fork").Pool(workers) as pool:
        it = pool.imap(job, range(n), chunksize=256)
        for i, (scene, img, bx, cover, cs) in enumerate(tqdm(it, total=n, desc="render scenes")):
            scenes.append(scene)
            images[i] = img
            caps[i] = cs
            for j, (noun, box) in enumerate(bx):
                labels[i, j] = nouns.index(noun)
                boxes[i, j] = box
                masks[i, j] = cover[j] >= 0.25
                masks[i, j].flat[cover[j].argmax()] = True
    return dict(images=images, labels=labels, boxes=boxes, masks=masks, captions=caps, scenes=scenes)


def tokenise_captions(captions: np.ndarray, labels: np.ndarray, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(n, K, 77)`` int32 of ``captions`` (n, K), and for every token the index (0 or 1) of the
    scene object it names — noun tokens only; -1 for every other token (attributes, articles, padding).

    A toy caption's words are one token each, so word ``j`` sits at position ``j + 1``."""
    tokenize = CaptionTokenizer(tokenizer)
    nouns = sorted(render.NOUNS)
    n, k = captions.shape
    ids = tokenize(list(captions.ravel()), "cpu").numpy().astype(np.int32).reshape(n, k, -1)
    obj = np.full(ids.shape, -1, np.int8)
    for i in range(n):
        names = {nouns[lab]: j for j, lab in enumerate(labels[i]) if lab >= 0}
        for c in range(k):
            for pos, word in enumerate(captions[i, c].split()[: ids.shape[-1] - 2]):
                if word in names:
                    obj[i, c, pos + 1] = names[word]
    return ids, obj


DATA_KEYS = ("images", "labels", "boxes", "masks", "ids", "noun_object")


def data_cache_path(cache_dir: Path, cfg: "TrainConfig", held_out: bool = False) -> Path:
    """The cache file of the rendered arrays for this configuration (scenes, captions per scene, seed and,
    when they are not the defaults, the caption policy, ``held_out`` and the latent grid of the masks)."""
    parts = [DATA_VERSION, cfg.n_scenes, cfg.captions_per_scene, cfg.seed]
    if cfg.caption_policy != render.CaptionPolicy():
        parts.append(asdict(cfg.caption_policy))
    if cfg.latent_size != LATENT_SIZE:
        parts.append({"mask_size": cfg.latent_size})
    if held_out:
        parts.append("held_out")
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()
    return Path(cache_dir) / f"toy_scenes_{cfg.n_scenes}_{key[:12]}.npz"


def load_or_render(cfg: "TrainConfig", tokenizer, workers: int, cache_dir: Path | None, held_out: bool = False) -> dict:
    """The training arrays (:data:`DATA_KEYS`) from the cache when present, else rendered and cached; with
    ``held_out`` the detector's data set, in which the held-out noun pairs appear too.

    ``ids``: ``(n, K, 77)`` int32 token ids; ``noun_object``: ``(n, K, 77)`` int8 (see :func:`tokenise_captions`).
    """
    path = data_cache_path(cache_dir, cfg, held_out) if cache_dir else None
    if path and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in DATA_KEYS}
    data = render_dataset(cfg.n_scenes, workers, cfg.captions_per_scene, cfg.seed, cfg.caption_policy, held_out,
                          cfg.latent_size)
    data["ids"], data["noun_object"] = tokenise_captions(data["captions"], data["labels"], tokenizer)
    data = {k: data[k] for k in DATA_KEYS}
    if path:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **data)
    return data


def captions_for(scenes, idx: np.ndarray, rng: np.random.Generator, dropout: float = 0.0) -> list[str]:
    return ["" if dropout and rng.random() < dropout else render.caption(scenes[i], rng) for i in idx]


class CaptionTokenizer:
    """Fast ids for toy captions: every caption word is one token, so a lookup replaces BPE.

    Gives exactly ``tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids``
    (a test checks it); a word outside the toy vocabulary falls back to the tokenizer itself.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.length = tokenizer.model_max_length
        self.words = {w: tokenizer.convert_tokens_to_ids(w + "</w>") for w in render.caption_words()}

    def __call__(self, texts: list[str], device) -> torch.Tensor:
        tok = self.tokenizer
        out = np.full((len(texts), self.length), tok.pad_token_id, dtype=np.int64)
        for i, text in enumerate(texts):
            words = text.split()
            if all(w in self.words for w in words):
                ids = [tok.bos_token_id] + [self.words[w] for w in words][: self.length - 2] + [tok.eos_token_id]
            else:
                ids = tok(text, truncation=True, max_length=self.length).input_ids
            out[i, : len(ids)] = ids
        return torch.from_numpy(out).to(device)


def to_unit(images_u8: np.ndarray, device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images_u8).to(device).permute(0, 3, 1, 2).float() / 255


def clip_normalise(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimiser(params, lr: float, total: int, warmup: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    return opt, sched


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def _train_step(opt, sched, loss: torch.Tensor, bar, step: int, shown: torch.Tensor | None = None,
              name: str = "loss", digits: int = 3) -> None:
    """One optimiser step and one step of its learning-rate schedule; every 50 steps the bar shows ``shown``
    (default: the loss) as ``name``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if step % 50 == 0:
        bar.set_postfix({name: f"{(loss if shown is None else shown).item():.{digits}f}"})

def vae_loss(rec: torch.Tensor, x: torch.Tensor, objects: torch.Tensor | None = None, object_weight: float = 0.0,
             edge_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's reconstruction loss on images in [-1, 1]: squared plus half absolute error, object pixels
    (``objects``: ``(B, H, W)`` in [0, 1]) weighted ``1 + object_weight``, plus ``edge_weight`` times the L1
    error of horizontal and vertical image differences. Returns ``(loss, plain MSE)``.

    Stable Diffusion's VAE keeps texture with perceptual and adversarial losses; the toy world's stand-ins
    are the weight on objects (they fill a fifth of the pixels but carry every attribute a caption names)
    and the edge term (a two-colour pattern averaged into its mean colour costs little squared error but a
    lot of gradient error)."""
    err = rec - x
    sq = err ** 2
    per_pixel = (sq + 0.5 * err.abs()).mean(1)  # (B, H, W)
    if objects is not None and object_weight:
        w = 1 + object_weight * objects
        loss = (w * per_pixel).sum() / w.sum()
    else:
        loss = per_pixel.mean()
    if edge_weight:
        dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        loss = loss + edge_weight * ((dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean())
    return loss, sq.mean()


def object_pixels(masks: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``(B, 2, S, S)`` object masks -> ``(B, size, size)`` float: 1 where any object covers the cell."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).any(1).float()
    return F.interpolate(m[:, None], size=(size, size), mode="nearest")[:, 0]


def train_vae(data, cfg: TrainConfig, device, log):
    torch.manual_seed(cfg.seed + 1)
    gen = np.random.default_rng(cfg.seed + 1)
    vae = make_vae(cfg.latent_channels, cfg.latent_size).to(device).train()
    opt, sched = _optimiser(vae.parameters(), 1e-3, cfg.vae_steps, min(200, cfg.vae_steps // 10 + 1))
    bar = tqdm(range(cfg.vae_steps), desc="VAE")
    for step in bar:
        idx = gen.integers(0, len(data["images"]), cfg.vae_batch)
        x = to_unit(data["images"][idx], device) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss, mse = vae_loss(rec, x, object_pixels(data["masks"][idx]).to(device), cfg.vae_object_weight,
                                 cfg.vae_edge_weight)
        loss = rec_loss + 1e-6 * post.kl().mean()
        _train_step(opt, sched, loss, bar, step, shown=mse, name="mse", digits=4)
    log["vae_final_mse"] = mse.item()
    vae.eval()
    lats = encode_dataset(vae, data, device, recon=False)
    scale = 1.0 / lats.std().item()
    vae.register_to_config(scaling_factor=scale)
    log["vae_scaling_factor"] = scale
    return vae


def encode_dataset(vae, data, device, recon: bool = True) -> torch.Tensor:
    """Posterior-mean latents of every image (scaled by the VAE's scaling factor into ``data["latents"]``)
    and, with ``recon``, their decoded reconstructions (``data["recon"]``). Returns the unscaled latents."""
    lats, recs = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(data["images"]), 1024), desc="encode data set"):
            x = to_unit(data["images"][i:i + 1024], device).to(vae.dtype) * 2 - 1
            z = vae.encode(x).latent_dist.mode()
            lats.append(z.float().cpu())
            if recon:
                recs.append(((vae.decode(z).sample.float().clamp(-1, 1) + 1) * 127.5).round().byte()
                            .permute(0, 2, 3, 1).cpu())
    lats = torch.cat(lats)
    data["latents"] = lats * vae.config.scaling_factor
    if recon:
        data["recon"] = torch.cat(recs).numpy()
    return lats


def _pick_images(data, idx, gen, device) -> torch.Tensor:
    """Rendered images, or with probability 1/2 their VAE reconstructions (as generated images look)."""
    raw = data["images"][idx]
    rec = data["recon"][idx]
    use_rec = gen.random(len(idx)) < 0.5
    return to_unit(np.where(use_rec[:, None, None, None], rec, raw), device)


def pattern_negatives(ids: np.ndarray, noun_object: np.ndarray, pattern_ids: dict[str, int], pad_id: int,
                      gen: np.random.Generator) -> np.ndarray:
    """Hard negatives for CLIP, one per caption ``ids`` ``(B, T)`` whose captions name every pattern
    (``render.FULL``): one noun of the caption (``noun_object`` >= 0; see :func:`tokenise_captions`) is drawn,
    and its object's pattern changed in words. A pattern word before it is swapped for another one or, one time in
    three, left out (the object made plain); a noun without one gets one (a plain object made patterned). Tokens
    move along by one place where a word is left out or added. ``pattern_ids``: word -> token id, "plain"
    excluded. Returns ``(B, T)``."""
    id_list = np.array([pattern_ids[w] for w in sorted(pattern_ids)])
    negs = ids.copy()
    for r in range(len(ids)):
        nouns = np.nonzero(noun_object[r] >= 0)[0]
        if not len(nouns):
            raise ValueError(f"caption {r} names no noun: pattern negatives need noun positions")
        pos = int(nouns[gen.integers(len(nouns))])
        row = ids[r]
        if pos > 0 and row[pos - 1] in id_list:  # a patterned object: another pattern, or none
            if gen.random() < 1 / 3:
                negs[r] = np.concatenate([row[:pos - 1], row[pos:], [pad_id]])
            else:
                others = id_list[id_list != row[pos - 1]]
                negs[r, pos - 1] = others[gen.integers(len(others))]
        else:  # a plain object: give it a pattern
            negs[r] = np.concatenate([row[:pos], [id_list[gen.integers(len(id_list))]], row[pos:-1]])
    return negs


def train_clip(data, tokenizer, cfg: TrainConfig, device, log, init: Path | None = None):
    """Train the toy CLIP contrastively on the rendered images (half of them as VAE reconstructions) and their
    pre-tokenised captions, from scratch or from the saved CLIPModel ``init``; with ``clip_pattern_negatives``
    each batch adds :func:`pattern_negatives` as texts that match no image. ``data`` holds captions drawn with
    ``clip_caption_policy`` when it is set (see :func:`build_world`)."""
    from transformers import CLIPModel

    policy = cfg.clip_caption_policy or cfg.caption_policy
    if cfg.clip_pattern_negatives and policy.p_pattern < 1:
        raise ValueError("pattern negatives need CLIP captions that always name the pattern (a phrase without one "
                         "must mean a plain object): set clip_caption_policy=render.FULL (--clip-full-captions)")
    torch.manual_seed(cfg.seed + 2)
    gen = np.random.default_rng(cfg.seed + 2)
    clip = (CLIPModel.from_pretrained(init, dtype=torch.float32) if init
            else make_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)).to(device).train()
    opt, sched = _optimiser(clip.parameters(), cfg.clip_lr, cfg.clip_steps, min(300, cfg.clip_steps // 10 + 1))
    pattern_ids = {p: tokenizer.convert_tokens_to_ids(p + "</w>") for p in render.PATTERNS if p != "plain"}
    n_negatives = 0
    bar = tqdm(range(cfg.clip_steps), desc="CLIP")
    for step in bar:
        idx = gen.choice(len(data["images"]), cfg.clip_batch, replace=False)
        px = clip_normalise(_pick_images(data, idx, gen, device))
        k = gen.integers(0, data["ids"].shape[1], len(idx))
        ids_np = data["ids"][idx, k]
        if cfg.clip_pattern_negatives:
            negs = pattern_negatives(ids_np, data["noun_object"][idx, k], pattern_ids, tokenizer.pad_token_id, gen)
            n_negatives += len(negs)
            ids_np = np.concatenate([ids_np, negs])
        ids = torch.from_numpy(ids_np).long().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = clip(input_ids=ids, pixel_values=px)
            target = torch.arange(len(idx), device=device)
            # images against every text (the negatives match none); texts against images, positives only
            loss = (F.cross_entropy(out.logits_per_image.float(), target)
                    + F.cross_entropy(out.logits_per_text[:len(idx)].float(), target)) / 2
        _train_step(opt, sched, loss, bar, step)
    log["clip_final_loss"] = loss.item()
    if cfg.clip_pattern_negatives:
        log["clip_pattern_negatives_per_batch"] = round(n_negatives / max(cfg.clip_steps, 1), 1)
    return clip.eval()


def text_tower(clip):
    """The CLIP text tower as a standalone ``CLIPTextModel`` (the pipeline's frozen text encoder)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    state = {k[len("text_model."):]: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    missing, unexpected = te.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        te_keys = set(te.state_dict())
        state = {("text_model." + k if "text_model." + k in te_keys else k): v for k, v in state.items()}
        te.load_state_dict(state, strict=True)
    return te.to(next(clip.parameters()).device).eval().requires_grad_(False)


def grounding_loss(maps: dict, shapes: dict, masks: torch.Tensor, noun_object: torch.Tensor,
                   resolutions: tuple[int, ...] = (MASK_SIZE,)) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCompose's grounding terms (Wang et al., CVPR 2024) on noun tokens' cross-attention.

    ``maps``: layer -> ``(B, HW, T)`` attention probabilities (averaged over heads); ``shapes``: layer ->
    ``(h, w)``; ``masks``: ``(B, 2, S, S)`` object masks on the latent grid; ``noun_object``: ``(B, T)`` the object each noun
    token names, -1 for every other token (attribute words never count). Layers whose map height is not in
    ``resolutions`` are skipped; on a coarser map a mask is the fraction of each cell it covers.

    Returns ``(token, pixel)``: the token loss ``1 - (attention inside the mask) / (all attention)`` and the
    BCE between the token's map divided by its maximum and the mask, each averaged over noun tokens and layers.
    """
    valid = noun_object >= 0
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    obj = noun_object[b_idx, t_idx]
    token_terms, pixel_terms = [], []
    for layer, probs in maps.items():
        h, w = shapes[layer]
        if h not in resolutions:
            continue
        m = masks.float()
        if (h, w) != tuple(m.shape[-2:]):
            m = F.adaptive_avg_pool2d(m, (h, w))
        m = m[b_idx, obj].flatten(1)  # (N, HW)
        att = probs[b_idx, :, t_idx].float()  # (N, HW)
        token_terms.append(1 - (att * m).sum(1) / att.sum(1).clamp_min(1e-8))
        norm = att / att.amax(1, keepdim=True).clamp_min(1e-8)
        pixel_terms.append(F.binary_cross_entropy(norm.clamp(1e-6, 1 - 1e-6), m, reduction="none").mean(1))
    if not token_terms:
        raise ValueError(f"no cross-attention maps at resolutions {resolutions}; recorded: "
                         f"{sorted({hw for hw in shapes.values()})}")
    if len(b_idx) == 0:  # no noun token in the batch (e.g. every caption dropped): a zero that keeps the graph
        zero = sum(p.sum() for p in maps.values()) * 0.0
        return zero, zero
    return torch.cat(token_terms).mean(), torch.cat(pixel_terms).mean()


UNET_STATE = "unet_train_state.pt"  # the UNet stage's resumable state (weights, EMA, optimiser, generator, step)


def _resume_key(cfg: TrainConfig) -> str:
    return json.dumps({k: v for k, v in asdict(cfg).items() if k != "unet_checkpoint_every"}, sort_keys=True)


def noise_loss(pred: torch.Tensor, noise: torch.Tensor, objects: torch.Tensor | None = None,
               object_weight: float = 0.0) -> torch.Tensor:
    """The UNet's noise-prediction loss: the squared error per latent cell, averaged over channels, with the
    cells an object covers (``objects``: ``(B, h, w)`` in [0, 1] on the latent grid) weighted
    ``1 + object_weight``; plain MSE when the weight is 0. Objects fill about a fifth of the cells but carry
    every attribute a caption names, the same reason :func:`vae_loss` weights them."""
    per_cell = ((pred.float() - noise) ** 2).mean(1)  # (B, h, w)
    if objects is None or not object_weight:
        return per_cell.mean()
    if objects.shape != per_cell.shape:
        raise ValueError(f"object masks {tuple(objects.shape)} do not match the latent grid {tuple(per_cell.shape)}")
    w = 1 + object_weight * objects.float()
    return (w * per_cell).sum() / w.sum()


def train_unet(data, tokenizer, text_encoder, cfg: TrainConfig, device, log, ckpt_dir: Path, init: Path | None = None,
               resume: bool = False):
    """Train the UNet on ``data["latents"]`` with the pre-tokenised captions (``data["ids"]``); every random draw
    comes from one seeded torch generator on ``device``. Every ``unet_checkpoint_every`` steps the EMA goes to
    ``ckpt_dir/unet_ema_partial`` and the full state to ``ckpt_dir/unet_train_state.pt``; with ``resume`` the
    stage continues from that state. With ``ground_weight`` or ``ground_pixel_weight`` > 0 the loss adds
    :func:`grounding_loss` on the cross-attention of this very forward pass. Returns the EMA UNet."""
    from diffusers import UNet2DConditionModel

    from ..attention import AttentionStore, attention_store

    torch.manual_seed(cfg.seed + 3)
    gen = torch.Generator(device).manual_seed(cfg.seed + 3)
    unet = (UNet2DConditionModel.from_pretrained(init, dtype=torch.float32) if init
            else make_unet(cfg.latent_channels, cfg.unet_widths, cfg.latent_size)).to(device).train()
    if unet.config.sample_size != cfg.latent_size or data["latents"].shape[-1] != cfg.latent_size:
        raise ValueError(f"the UNet ({unet.config.sample_size}x{unet.config.sample_size}) and the latents "
                         f"({data['latents'].shape[-1]}x{data['latents'].shape[-1]}) must both be on the configured "
                         f"{cfg.latent_size}x{cfg.latent_size} grid: pass the --latent-size of the VAE and of --init-unet")
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = make_train_scheduler()
    n_t = noise_sched.config.num_train_timesteps
    alphas = noise_sched.alphas_cumprod.to(device)
    warmup = min(cfg.unet_warmup, cfg.unet_steps // 10 + 1)
    opt, sched = _optimiser(unet.parameters(), cfg.unet_lr, cfg.unet_steps, warmup)
    budget = float(cfg.unet_time_budget_s)
    state_path = Path(ckpt_dir) / UNET_STATE
    start = 0
    if resume and state_path.is_file():
        st = torch_load(state_path, "UNet training state", "delete it to start the UNet stage afresh")
        if st["config"] != _resume_key(cfg):
            raise ValueError(f"{state_path} was written with another configuration; delete it or use the same profile")
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        start = int(st["step"])
    log["unet_start_step"] = start

    lats = data["latents"].to(device)
    ids_all = torch.from_numpy(np.ascontiguousarray(data["ids"])).to(device)  # (n, K, 77) int32
    nouns_all = torch.from_numpy(np.ascontiguousarray(data["noun_object"])).to(device)  # (n, K, 77) int8
    masks = torch.from_numpy(np.ascontiguousarray(data["masks"])).to(device)  # (n, 2, S, S) bool
    empty = CaptionTokenizer(tokenizer)([""], device)[0]  # (77,) the ids of the empty caption
    n, k_caps = ids_all.shape[:2]
    B = cfg.unet_batch
    grounding = cfg.ground_weight > 0 or cfg.ground_pixel_weight > 0
    store = AttentionStore(keep_similarity=False, keep_grad=True, resolutions=cfg.grounded_maps())
    with attention_store(unet, store) if grounding else contextlib.nullcontext():
        bar = tqdm(range(start, cfg.unet_steps), desc="UNet", initial=start, total=cfg.unet_steps)
        t_start = time.perf_counter()
        last = cfg.unet_steps
        for step in bar:
            idx = torch.randint(0, n, (B,), device=device, generator=gen)
            k = torch.randint(0, k_caps, (B,), device=device, generator=gen)
            drop = torch.rand(B, device=device, generator=gen) < cfg.cfg_dropout
            ids = torch.where(drop[:, None], empty, ids_all[idx, k].long())
            z0 = lats[idx]
            noise = torch.randn(z0.shape, device=device, generator=gen)
            t = torch.randint(0, n_t, (B,), device=device, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            with torch.no_grad():
                cond = text_encoder(ids)[0]
            store.reset()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = unet(zt, t, cond).sample
            mse = F.mse_loss(pred.float(), noise)
            loss = noise_loss(pred, noise, masks[idx].amax(1), cfg.unet_object_weight) if cfg.unet_object_weight else mse
            if grounding:
                nouns = torch.where(drop[:, None], -1, nouns_all[idx, k].long())
                tok, pix = grounding_loss(store.maps[0], store.shapes, masks[idx], nouns, cfg.grounded_maps())
                loss = loss + cfg.ground_weight * tok + cfg.ground_pixel_weight * pix
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            if budget:
                late = int(cfg.unet_steps * (time.perf_counter() - t_start) / budget)  # where time says we are
                if late >= cfg.unet_steps:
                    log["unet_stopped_by_time_budget_at_step"] = step + 1
                    last = step + 1
                    break
                if late > step + 1:
                    for g in opt.param_groups:
                        g["lr"] = cfg.unet_lr * _schedule(late, cfg.unet_steps, warmup)
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - decay)
            if step % 50 == 0:
                post = dict(loss=f"{mse.item():.4f}")
                if grounding:
                    post |= dict(ground=f"{tok.item():.3f}")
                bar.set_postfix(post)
            if (step + 1) % cfg.unet_checkpoint_every == 0 and step + 1 < cfg.unet_steps:
                _save_partial(ema, Path(ckpt_dir) / "unet_ema_partial", step + 1)
                torch_save({"step": step + 1, "config": _resume_key(cfg), "unet": unet.state_dict(),
                            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "generator": gen.get_state()}, state_path)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_start
    done = last - start
    log["unet_steps_done"] = last
    if done:
        log["unet_final_loss"] = mse.item()
        if grounding:
            log["unet_final_ground_loss"] = tok.item()
            log["unet_final_ground_pixel_loss"] = pix.item()
        log["unet_steps_per_s"] = round(done / elapsed, 3)
        log["unet_samples_per_s"] = round(done * B / elapsed, 1)
    return ema


def _save_partial(model, folder: Path, step: int) -> None:
    """Save ``model`` and its step into ``folder`` through a complete temporary copy beside it."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "step.txt").write_text(str(step))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def train_detector(data, cfg: TrainConfig, device, log):
    torch.manual_seed(cfg.seed + 4)
    gen = np.random.default_rng(cfg.seed + 4)
    nouns = sorted(render.NOUNS)
    det = ToyDetector(nouns, width=32).to(device).train()
    opt, sched = _optimiser(det.parameters(), 1e-3, cfg.det_steps, min(200, cfg.det_steps // 10 + 1))
    labels = torch.from_numpy(data["labels"]).to(device)
    boxes = torch.from_numpy(data["boxes"]).to(device)
    bar = tqdm(range(cfg.det_steps), desc="detector")
    for step in bar:
        idx = gen.integers(0, len(labels), cfg.det_batch)
        x = _pick_images(data, idx, gen, device)
        x = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
        ti = torch.from_numpy(idx).to(device)
        lab, bx = labels[ti], boxes[ti]
        present = torch.zeros(len(idx), len(nouns), device=device)
        target = torch.zeros(len(idx), len(nouns), 4, device=device)
        for j in range(2):
            ok = lab[:, j] >= 0
            rows = torch.nonzero(ok).squeeze(1)
            present[rows, lab[rows, j]] = 1
            target[rows, lab[rows, j]] = bx[rows, j]
        logits, pred = det(x)
        box_loss = ((pred - target).abs().sum(-1) * present).sum() / present.sum().clamp(min=1)
        loss = F.binary_cross_entropy_with_logits(logits, present) + 5 * box_loss
        _train_step(opt, sched, loss, bar, step)
    log["detector_final_loss"] = loss.item()
    return det.eval()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _half_copy(model):
    return copy.deepcopy(model).to("cpu", torch.float16)


STAGES = ("vae", "clip", "detector", "unet")
DEFAULT_CACHE = Path("~/.cache/compinv_utils/toy")  # rendered, tokenised data sets, one file per configuration


def build_world(out: Path, cfg: TrainConfig, device: torch.device, workers: int, stages=STAGES,
                init_unet: Path | None = None, cache_dir: Path | None = None, resume: bool = False,
                source: Path | None = None, init_clip: Path | None = None) -> dict:
    """Run the given stages, load the others from ``source`` (default ``out``; the CLIP and detector folders
    are copied from there into ``out``), and write the world to ``out``; returns the log."""
    import shutil

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log: dict = {"config": asdict(cfg), "device": str(device), "device_name": device_name, "torch": torch.__version__,
                 "stages": list(stages), "init_unet": str(init_unet) if init_unet else None, "stages_s": {}}
    if init_clip:
        log["init_clip"] = str(init_clip)
    t0 = time.time()

    def stage(name):
        log["stages_s"][name] = round(time.time() - t0 - sum(log["stages_s"].values()), 1)

    src = Path(source) if source else out
    elsewhere = src.resolve() != out.resolve()
    log["loaded_from"] = str(src) if elsewhere else None

    def missing(name):
        return FileNotFoundError(f"stage output {name} is missing from {src}: run that stage too")

    def load_part(cls, *names):
        for name in names:
            if (src / name).exists():
                return cls.from_pretrained(src / name, dtype=torch.float32).to(device).eval()
        raise missing(names[0])

    def carry(name):
        """A saved stage's folder that the assembled world keeps (CLIP, detector): copied from ``src``."""
        if elsewhere:
            if not (src / name).is_dir():
                raise missing(name)
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)

    tokenizer = build_tokenizer(render.caption_words())
    stage("tokenizer")
    # the detector trains on the generator's data set only when it must not see the held-out pairs
    detector_on_data = "detector" in stages and not cfg.detector_sees_held_out
    need_data = bool({"vae", "clip", "unet"} & set(stages)) or detector_on_data
    data = load_or_render(cfg, tokenizer, workers, cache_dir) if need_data else None
    stage("render")
    if "vae" in stages:
        vae = train_vae(data, cfg, device, log)
        _half_copy(vae).save_pretrained(out / "vae_stage")
    else:
        vae = load_part(AutoencoderKL, "vae_stage", "pipeline/vae")
        size, channels = vae_latent_size(vae), vae.config.latent_channels
        if (size, channels) != (cfg.latent_size, cfg.latent_channels):
            raise ValueError(f"the VAE loaded from {src} has a {size}x{size} latent grid of {channels} channels, the "
                             f"configuration {cfg.latent_size}x{cfg.latent_size} of {cfg.latent_channels}: pass "
                             f"--latent-size {size} --latent-channels {channels}, or train the VAE too (--stages vae,...)")
    clip_own_data = "clip" in stages and cfg.clip_caption_policy not in (None, cfg.caption_policy)
    if data is not None:
        encode_dataset(vae, data, device, recon=("clip" in stages and not clip_own_data) or detector_on_data)
    stage("vae")
    if "clip" in stages:
        clip_data = data
        if clip_own_data:  # the same scenes, captions drawn with the CLIP's own policy
            clip_data = load_or_render(replace(cfg, caption_policy=cfg.clip_caption_policy), tokenizer, workers, cache_dir)
            encode_dataset(vae, clip_data, device, recon=True)
        clip = train_clip(clip_data, tokenizer, cfg, device, log, init_clip)
        del clip_data
        clip_dir = out / "clip"
        _half_copy(clip).save_pretrained(clip_dir)
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(clip_dir)
        tokenizer.save_pretrained(clip_dir)
    else:
        clip = load_part(CLIPModel, "clip")
        carry("clip")
    stage("clip")
    if "detector" in stages:
        det_data = data
        if not detector_on_data:  # its own data set, with the held-out pairs; the UNet below keeps ``data``
            det_data = load_or_render(cfg, tokenizer, workers, cache_dir, held_out=True)
            encode_dataset(vae, det_data, device, recon=True)
        det = train_detector(det_data, cfg, device, log)
        del det_data
        det.to("cpu").save_pretrained(out / "detector")
    else:
        carry("detector")
    stage("detector")
    text_encoder = text_tower(clip)
    if "unet" in stages:
        unet = train_unet(data, tokenizer, text_encoder, cfg, device, log, out, init_unet, resume)
    else:
        unet = load_part(UNet2DConditionModel, "pipeline/unet")
    stage("unet")
    pipe = StableDiffusionPipeline(vae=_half_copy(vae), text_encoder=_half_copy(text_encoder), tokenizer=tokenizer,
                                   unet=_half_copy(unet), scheduler=make_sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    # The weights are stored in float16 (small), but transformers loads a model in its config's dtype while
    # diffusers loads float32: say float32 so that a plain from_pretrained gives one dtype throughout.
    te_config = out / "pipeline" / "text_encoder" / "config.json"
    write_text(te_config, json.dumps(json.loads(te_config.read_text()) | {"dtype": "float32"}, indent=2) + "\n")
    for leftover in ("unet_ema_partial", "vae_stage"):
        if (out / leftover).exists():
            shutil.rmtree(out / leftover)
    (out / UNET_STATE).unlink(missing_ok=True)
    log["total_s"] = round(time.time() - t0, 1)
    log_path = out / "training_log.json"
    runs = json.loads(log_path.read_text()) if log_path.exists() else []
    write_text(log_path, json.dumps(runs + [log], indent=2))
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy", help="folder to write the world to")
    p.add_argument("--profile", default="full", choices=sorted(PROFILES),
                   help="sizes: full, cpu-full (2-core CPU), gpu, cpu-unet, or smoke for a quick check")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes that render the data set")
    p.add_argument("--unet-steps", type=int, default=None, help="override the profile's UNet steps")
    p.add_argument("--unet-widths", default=None, metavar="64,128",
                   help="the UNet's channels at its two levels, multiples of 32 (default 64,128)")
    p.add_argument("--latent-size", type=int, default=None, choices=LATENT_SIZES,
                   help="the latent grid: 8 (the committed VAE, 4x4-pixel cells) or 16 (2x2-pixel cells); the VAE, "
                        "the UNet and the object masks follow it, and a loaded VAE must have it")
    p.add_argument("--latent-channels", type=int, default=None,
                   help=f"the VAE's latent channels (default {LATENT_CHANNELS}; SD 1.5 has 4); a loaded VAE must have them")
    p.add_argument("--data-only", action="store_true",
                   help="render and cache the data set of this configuration (in --cache-dir), then stop")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to train; the others are loaded from --out")
    p.add_argument("--from", dest="source", default=None,
                   help="load the stages not trained from this world folder (default: --out); its CLIP and "
                        "detector are copied into --out")
    p.add_argument("--init-unet", default=None, help="start the UNet stage from this saved UNet instead of scratch")
    p.add_argument("--init-clip", default=None, help="start the CLIP stage from this saved CLIPModel (e.g. data/toy/clip)")
    p.add_argument("--clip-steps", type=int, default=None, help="override the profile's CLIP steps")
    p.add_argument("--clip-batch", type=int, default=None, help="override the profile's CLIP batch size")
    p.add_argument("--clip-lr", type=float, default=None, help="override the CLIP stage's learning rate (5e-4)")
    p.add_argument("--clip-full-captions", action="store_true",
                   help="the CLIP stage's captions name every attribute (render.FULL) instead of the generator's")
    p.add_argument("--clip-pattern-negatives", action="store_true",
                   help="train the CLIP with captions whose pattern word is changed as hard negatives (see "
                        "pattern_negatives; needs --clip-full-captions)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the UNet stage from --out/{UNET_STATE} (its last checkpoint); use with --stages unet")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the rendered, tokenised data set is cached")
    p.add_argument("--no-cache", action="store_true", help="render the data set without reading or writing the cache")
    p.add_argument("--ground-weight", type=float, default=None, help="override the token grounding loss weight")
    p.add_argument("--ground-pixel-weight", type=float, default=None, help="override the pixel grounding loss weight")
    p.add_argument("--unet-object-weight", type=float, default=None,
                   help="extra weight of object cells in the UNet's noise loss (see noise_loss)")
    p.add_argument("--vae-steps", type=int, default=None, help="override the profile's VAE steps")
    p.add_argument("--vae-batch", type=int, default=None, help="override the profile's VAE batch size")
    p.add_argument("--det-steps", type=int, default=None, help="override the profile's detector steps")
    p.add_argument("--det-batch", type=int, default=None, help="override the profile's detector batch size")
    p.add_argument("--unet-minutes", type=float, default=None,
                   help="wall-clock budget of the UNet stage: its schedule follows time or steps, whichever is "
                        "further along, and it stops when time is up (the log records the step)")
    p.add_argument("--ground-resolutions", default=None, metavar="8,4",
                   help="cross-attention map sizes the grounding loss reads: the latent grid, half of it or both "
                        "(8, 4 or 8,4 on the 8x8 grid; default: the latent grid)")
    p.add_argument("--caption-policy", default=None, metavar="C,P,B,C2",
                   help="how often training captions name the colour, a pattern, the background and the second "
                        "colour: four probabilities (default 0.5,0.5,0.5,0.5, render.CaptionPolicy)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = PROFILES[args.profile]
    if args.unet_steps is not None:
        cfg = replace(cfg, unet_steps=args.unet_steps)
    if args.unet_widths is not None:
        try:
            cfg = replace(cfg, unet_widths=check_unet_widths(args.unet_widths.split(",")))
        except ValueError:
            p.error(f"--unet-widths takes two positive multiples of 32 separated by a comma (channels at the UNet's "
                    f"two levels), e.g. 128,128; got {args.unet_widths!r}")
    if args.latent_channels is not None:
        if args.latent_channels < 1:
            p.error(f"--latent-channels must be at least 1, got {args.latent_channels}")
        cfg = replace(cfg, latent_channels=args.latent_channels)
    if args.latent_size is not None:
        cfg = replace(cfg, latent_size=check_latent_size(args.latent_size))
    if args.ground_weight is not None:
        cfg = replace(cfg, ground_weight=args.ground_weight)
    if args.ground_pixel_weight is not None:
        cfg = replace(cfg, ground_pixel_weight=args.ground_pixel_weight)
    if args.unet_object_weight is not None:
        cfg = replace(cfg, unet_object_weight=args.unet_object_weight)
    if args.clip_lr is not None:
        if not args.clip_lr > 0:
            p.error(f"--clip-lr must be positive, got {args.clip_lr}")
        cfg = replace(cfg, clip_lr=args.clip_lr)
    if args.clip_full_captions:
        cfg = replace(cfg, clip_caption_policy=render.FULL)
    if args.clip_pattern_negatives:
        if not args.clip_full_captions:
            p.error("--clip-pattern-negatives needs --clip-full-captions (a caption without a pattern word must mean "
                    "a plain object)")
        cfg = replace(cfg, clip_pattern_negatives=True)
    for name in ("det_steps", "det_batch", "clip_steps", "clip_batch", "vae_steps", "vae_batch"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
            cfg = replace(cfg, **{name: value})
    if args.unet_minutes is not None:
        if args.unet_minutes <= 0:
            p.error(f"--unet-minutes must be positive, got {args.unet_minutes}")
        cfg = replace(cfg, unet_time_budget_s=60 * args.unet_minutes)
    if args.ground_resolutions is not None:
        sizes = (cfg.latent_size, cfg.latent_size // 2)
        words = {x.strip() for x in args.ground_resolutions.split(",")}
        if not words or not words <= {str(x) for x in sizes}:
            p.error(f"--ground-resolutions takes {sizes[0]}, {sizes[1]} or {sizes[0]},{sizes[1]} (the toy UNet's "
                    f"cross-attention map sizes on the {sizes[0]}x{sizes[0]} latent grid), got {args.ground_resolutions!r}")
        cfg = replace(cfg, ground_resolutions=tuple(sorted((int(x) for x in words), reverse=True)))
    if args.caption_policy is not None:
        try:
            probs = [float(x) for x in args.caption_policy.split(",")]
        except ValueError:
            probs = []
        if len(probs) != 4 or not all(0 <= x <= 1 for x in probs):
            p.error(f"--caption-policy takes four probabilities in [0, 1] separated by commas "
                    f"(colour,pattern,background,colour2), e.g. 0.5,0.9,0.5,0.5; got {args.caption_policy!r}")
        cfg = replace(cfg, caption_policy=render.CaptionPolicy(*probs))
    stages = [x for x in args.stages.split(",") if x]
    unknown = [x for x in stages if x not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    if args.init_clip and "clip" not in stages:
        p.error("--init-clip starts the CLIP stage: add clip to --stages")
    if args.resume and "vae" in stages:
        p.error("--resume continues the UNet stage on the latents of the VAE already trained: use --stages unet")
    if args.data_only:
        if args.no_cache:
            p.error("--data-only writes the data set to the cache: leave out --no-cache")
        cache = Path(args.cache_dir).expanduser()
        load_or_render(cfg, build_tokenizer(render.caption_words()), args.workers, cache)
        print(f"data set cached: {data_cache_path(cache, cfg)}")
        return
    log = build_world(Path(args.out), cfg, device, args.workers, stages, Path(args.init_unet) if args.init_unet else None,
                      None if args.no_cache else Path(args.cache_dir).expanduser(), args.resume,
                      Path(args.source) if args.source else None, Path(args.init_clip) if args.init_clip else None)
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
