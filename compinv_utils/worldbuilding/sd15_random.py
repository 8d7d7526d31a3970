"""The ``sd15-random`` world: Stable Diffusion 1.5's layer structure with random weights, built from configs.

What it is for: proving, offline and on a CPU, that the code path the chapters take in the ``sd15`` world runs —
a UNet with four levels and cross-attention at three of them, a 12-layer-style CLIP text encoder, an 8x VAE,
DDIM, your own photo folders as concepts of interest (``COMPINV_CONCEPTS``), images that are not the toy
world's 32 px, a vocabulary that is not the toy world's 18 nouns. Nothing here was trained: every finding a
chapter states in this world means nothing (run it with ``COMPINV_STUDENT=1`` so the findings only warn).

``width`` scales the channel counts: 1.0 is SD 1.5 itself (860 M UNet parameters); smaller widths keep the
block structure (four UNet levels, cross-attention at three of them, 8 heads, 77 tokens) for fast runs.
The text side uses the toy world's tokenizer (CLIP's byte alphabet plus merges for the toy captions' words),
so its nouns are single tokens. The measuring side (CLIP for alignments, the detector) is the toy world's,
read from its weights in ``data/toy``; images are resized to the 32 px those models expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ..concepts import concepts_from_folder
from ..detection import toy_detector
from ..paths import REPO_ROOT
from ..runtime import pick_device, quiet_loading
from ..toy import render
from ..toy.models import SCHEDULER_CONFIG
from .tokenizer import build_tokenizer

if TYPE_CHECKING:
    from ..world import World

NAME = "sd15-random"
# The vocabulary: toy nouns (single tokens of the tokenizer, labels of the toy detector). The partners are the
# last two; the others are the superclasses a photo folder may name (concepts.json, or the folder's name).
NOUNS = ("cat", "cup", "dog", "pot", "kite", "car")
PARTNERS = ("kite", "car")


def sd15_unet(width: float = 1.0, text_dim: int = 768, sample_size: int = 64) -> UNet2DConditionModel:
    """SD 1.5's UNet (``width`` scales the channels); ``sample_size`` is the latent side (64: 512 px images)."""
    ch = tuple(int(c * width) // 32 * 32 or 32 for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32,
    )


def sd15_text_encoder(vocab_size: int, width: float = 1.0, eos_id: int = 2) -> CLIPTextModel:
    """SD 1.5's CLIP text encoder (12 layers of 768 at ``width`` 1; 2 layers of at least 64 below it)."""
    hidden = max(64, int(768 * width) // 64 * 64)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=12 if width >= 1 else 2, num_attention_heads=12 if width >= 1 else 4,
                         max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=eos_id, bos_token_id=eos_id - 1,
                         pad_token_id=eos_id)
    return CLIPTextModel(cfg)


def sd15_vae(width: float = 1.0) -> AutoencoderKL:
    """SD 1.5's VAE (four levels: images 8x the latent side; ``width`` scales the channels)."""
    ch = tuple(int(c * width) // 32 * 32 or 32 for c in (128, 256, 512, 512))
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=ch, norm_num_groups=32, scaling_factor=0.18215)


def sd15_pipeline(width: float = 1.0, seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with SD 1.5's structure and random weights (seeded with ``seed``; this seeds
    torch's global generator), the toy tokenizer and DDIM. Images are ``sample_size * 8`` px."""
    torch.manual_seed(seed)
    tok = build_tokenizer(render.caption_words())
    unet = sd15_unet(width, sample_size=sample_size)
    te = sd15_text_encoder(len(tok), width, tok.eos_token_id)
    if te.config.hidden_size != unet.config.cross_attention_dim:
        unet = sd15_unet(width, te.config.hidden_size, sample_size=sample_size)
    pipe = StableDiffusionPipeline(vae=sd15_vae(width), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _toy_parts_dir() -> Path:
    """The toy world's weights (for its CLIP and detector): ``world.TOY_DIR`` (``$COMPINV_TOY_DIR``, else
    ``data/toy`` under ``$COMPINV_DATA``), else the repository's ``data/toy`` — so ``COMPINV_DATA`` may point
    at an empty folder for this world's caches."""
    from ..world import TOY_DIR

    for root in dict.fromkeys((Path(TOY_DIR), REPO_ROOT / "data" / "toy")):
        if (root / "clip" / "config.json").exists() and (root / "detector" / "config.json").exists():
            return root
    raise FileNotFoundError(f"the {NAME} world measures with the toy world's CLIP and detector, which are missing from "
                            f"{TOY_DIR} (and {REPO_ROOT / 'data' / 'toy'}); set COMPINV_TOY_DIR to a folder "
                            "holding clip/ and detector/ (the repository's data/toy), or rebuild them with "
                            "`make toy-world`")


def _resized_detector(detect, size: int):
    """The toy detector on images resized to the ``size`` px it was trained at (boxes are relative: unchanged)."""
    def run(images: list[Image.Image], threshold: float):
        small = [im.convert("RGB") if im.size == (size, size) else im.convert("RGB").resize((size, size), Image.BICUBIC)
                 for im in images]
        return detect(small, threshold)

    return run


def settings():
    """A chapter's budgets in this world: tiny (2 inversion steps, one seed of everything, one partner), so that a
    chapter runs in about a minute on a 2-core CPU."""
    from ..world import WorldSettings

    return WorldSettings(lam=0.95, partners=PARTNERS, n_partners=1, detect_threshold=0.5, inversion_steps=2,
                         inversion_seeds=1, gen_seeds=1, pair_nouns=None, max_concepts=None,
                         minutes_per_chapter="about a minute on a 2-core CPU (random weights: a check of the code "
                                             "path, not of any finding)")


def load_sd15_random_world(concepts_dir: str | Path | None = None, device: str | torch.device | None = None,
                           width: float = 0.125, latent_size: int = 8, seed: int = 0) -> "World":
    """The ``sd15-random`` world: an SD 1.5-shaped pipeline with random weights (``width`` of SD 1.5's channels,
    latents of ``latent_size``: ``latent_size * 8`` px images, 64 px by default), the toy world's CLIP and detector
    for measuring, the nouns :data:`NOUNS`, and your photo folders in ``concepts_dir`` as the concepts of interest
    (none without it). CPU and fp32 unless ``device`` (or ``$COMPINV_DEVICE``) asks. No download.

    It proves the sd15 code path offline; a finding measured on random weights means nothing.
    """
    from ..world import World, toy_measures

    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(f"latent_size must be an integer >= 1 (images are 8x it), got {latent_size!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0 (1.0 is SD 1.5's channel counts), got {width!r}")
    dev, dtype = pick_device(device, "cpu")
    root = _toy_parts_dir()
    # building and loading the models leaves the caller's random state alone; quiet_loading also silences
    # diffusers' note on casting a model built in fp32 with .to()
    with torch.random.fork_rng(devices=[]), quiet_loading():
        pipe = sd15_pipeline(width, seed, sample_size=latent_size)
        pipe = pipe.to(dev) if dtype == torch.float32 else pipe.to(dev, dtype)
        clip, clip_tokenizer, clip_processor, det = toy_measures(root, dev, dtype)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    coi = concepts_from_folder(concepts_dir, size=size) if concepts_dir else []
    nouns = list(NOUNS)
    for c in coi:
        if c.superclass not in render.NOUNS:
            raise ValueError(f"concept {c.name!r} in {concepts_dir} has the superclass {c.superclass!r}, a word the "
                             f"{NAME} world's tokenizer and detector do not know; name one of "
                             f"{', '.join(sorted(render.NOUNS))} in {Path(concepts_dir) / 'concepts.json'} "
                             f'(e.g. {{"{c.name}": "cup"}}) or in the folder\'s name')
        if c.superclass not in nouns:  # a superclass is always one of the world's nouns
            nouns.append(c.superclass)
    return World(NAME, pipe, nouns, coi, clip, clip_tokenizer, clip_processor,
                   _resized_detector(toy_detector(det, dev), det.image_size), dev, dtype,
                   guidance_scale=7.5, num_inference_steps=4,
                   extras={"root": root, "detector_model": det, "width": width, "seed": seed}, settings=settings())


def _register() -> None:
    from ..world import register_world

    register_world(NAME, load_sd15_random_world)


_register()  # after `import compinv_utils.worldbuilding.sd15_random`, load_world("sd15-random") finds it
