"""Worlds: a Stable Diffusion pipeline plus everything that measures it.

``load_world("toy")`` loads the embedded toy world from ``data/toy`` (offline, CPU, seconds);
``load_world("sd15")`` loads Stable Diffusion 1.5, a hub CLIP and DETR (GPU and hub access).
Both return a :class:`World`; helpers take a world and never ask which one it is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .concepts import ConceptOfInterest, concepts_from_folder
from .detection import Detection, best_box, crop, detr_detector, toy_detector
from .maths import is_whole, unit_features
from .paths import data_root
from .runtime import check_device, load_part, pick_device, quiet_loading
from .tokens import padded_ids

TOY_DIR = Path(os.environ.get("COMPINV_TOY_DIR") or data_root() / "toy")

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CLIP_ID = "openai/clip-vit-large-patch14"
SD15_DETR_ID, SD15_DETR_REVISION = "facebook/detr-resnet-101", "no_timm"

COCO_NOUNS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class WorldSettings:
    """What a world's chapters use by default: method settings and the budgets of a run."""

    lam: float = 0.95  # λ of semantic inversion (Eq. 9), chosen per world by the sweep of chapter 03
    anchors_c: int = 3  # at most c active anchors
    partners: tuple[str, ...] = ()  # candidate partner nouns for compositions, in order of preference
    n_partners: int = 4  # partner nouns per concept in compositions
    detect_threshold: float = 0.5  # detector score for "found" (the official evaluation: DETR at 0.8)
    inversion_steps: int = 300  # textual-inversion steps
    inversion_seeds: int = 3  # independent inversions per concept (intervals resample them)
    gen_seeds: int = 2  # generation seeds per inversion and prompt in the chapters
    pair_nouns: int | None = None  # the pair table (chapter 01) covers the first N nouns' pairs (None: all)
    max_concepts: int | None = None  # use only the first N concepts of interest (None: all)
    minutes_per_chapter: str = ""  # what a chapter costs on the world's reference hardware, with these budgets


# λ: what the balance rule picks from the sweep of chapter 03 (which checks that it still does)
TOY_SETTINGS = WorldSettings(lam=0.25, partners=("kite", "car", "umbrella", "book", "fish", "hat"),
                             minutes_per_chapter="1-3 minutes on a 2-core CPU with the cached results")
# A subset sized for one Colab T4 (estimated at about 15 minutes per chapter from typical T4 step costs, not
# measured here): 2 concepts, 1 inversion seed of 500 steps, 2 partners, the pair table over 8 nouns (28 pairs).
# The paper's budget is inversion_steps=3000 over all concepts (several GPU-hours per chapter).
SD15_SETTINGS = WorldSettings(lam=0.95, partners=("bird", "car", "umbrella", "bench", "bicycle", "dog"),
                              n_partners=2, detect_threshold=0.8, inversion_steps=500, inversion_seeds=1,
                              max_concepts=2, pair_nouns=8, minutes_per_chapter="about 15 minutes per chapter on one T4 "
                              "(estimated from the step costs; the paper's full budget takes hours)")


@dataclass
class World:
    """A Stable Diffusion pipeline and what measures it. Build with :func:`load_world`."""

    name: str
    pipe: object  # diffusers.StableDiffusionPipeline
    nouns: list[str]  # the noun vocabulary: the "core distribution" of composable words
    concepts_of_interest: list[ConceptOfInterest]
    clip_model: object  # transformers.CLIPModel for the alignment metrics
    clip_tokenizer: object
    clip_processor: object
    detector: Callable[[list[Image.Image], float], list[list[Detection]]]
    device: torch.device
    dtype: torch.dtype
    guidance_scale: float = 7.5  # classifier-free guidance used by default
    num_inference_steps: int = 25
    held_out_pairs: tuple = ()  # noun pairs the model never saw together in training (toy world)
    extras: dict = field(default_factory=dict)
    settings: WorldSettings = field(default_factory=WorldSettings)

    @property
    def data_dir(self) -> Path:
        """This world's cached results: ``data/<world name>`` under :func:`data_root`."""
        return data_root() / self.name

    @property
    def image_size(self) -> int:
        """Side of generated images in pixels (32 in the toy world, 512 in SD 1.5)."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def latent_size(self) -> int:
        return self.pipe.unet.config.sample_size

    def concept(self, name: str) -> ConceptOfInterest:
        for c in self.concepts_of_interest:
            if name in (c.name, c.token):
                return c
        raise KeyError(f"no concept of interest {name!r}; this world has {[c.name for c in self.concepts_of_interest]}")

    def check_nouns(self, nouns: Sequence[str]) -> list[str]:
        nouns = [nouns] if isinstance(nouns, str) else list(nouns)
        unknown = [n for n in nouns if n not in self.nouns]
        if unknown:
            raise ValueError(f"unknown noun(s) {unknown}; the {self.name} world's nouns are: {', '.join(self.nouns)}")
        return nouns

    # -- measuring -------------------------------------------------------------------------------

    def detect(self, images: Sequence[Image.Image], threshold: float | None = None) -> list[list[Detection]]:
        """Per image, the detections ``(label, (x0, y0, x1, y1), score)`` with score >= threshold
        (default: the world's ``settings.detect_threshold``; 0.8 for DETR as in the official evaluation)."""
        threshold = self.settings.detect_threshold if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a detection score between 0 and 1, got {threshold!r} (the world's default "
                             f"is {self.settings.detect_threshold})")
        return self.detector(list(images), float(threshold))

    def photo_crops(self, concept: ConceptOfInterest) -> list[Image.Image]:
        """The concept's object cut out of each of its photos: the crops the world knows, else the
        detected box of its superclass, else the whole photo."""
        if concept.photo_crops is not None:
            return concept.photo_crops
        out = []
        for photo, d in zip(concept.photos, self.detect(concept.photos)):
            box = best_box(d, concept.superclass)
            out.append(photo if box is None else crop(photo, box))
        return out

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text features, ``(N, D)`` float32 on the CPU."""
        out = self.clip_model.get_text_features(input_ids=padded_ids(self.clip_tokenizer, texts, self.device))
        return unit_features(out)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image features, ``(N, D)`` float32 on the CPU."""
        px = self.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        out = self.clip_model.get_image_features(pixel_values=px.to(self.device, self.clip_model.dtype))
        return unit_features(out)

    # -- generating ------------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], seed: int = 0, batch_size: int = 16,
                 seeds: Sequence[int] | None = None, **kwargs) -> list[Image.Image]:
        """Images for the prompts with the world's defaults (25 DDIM steps, its guidance scale).

        Image ``i`` uses seed ``seed + i``, or ``seeds[i]`` when given. Extra kwargs go to the pipeline call.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given: pass a prompt or a non-empty list of prompts")
        seeds = list(range(seed, seed + len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not is_whole(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        kwargs.setdefault("num_inference_steps", self.num_inference_steps)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        steps, scale = kwargs["num_inference_steps"], kwargs["guidance_scale"]
        if not is_whole(steps, 1):
            raise ValueError(f"num_inference_steps must be >= 1 (an integer), got {steps!r} (the world's default is "
                             f"{self.num_inference_steps})")
        if not math.isfinite(scale) or scale < 1:
            raise ValueError(f"guidance_scale must be a finite number >= 1 (1 turns classifier-free guidance off; the "
                             f"world's default is {self.guidance_scale}), got {scale}")
        dev = "cpu" if self.device.type == "mps" else self.device
        images = []
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator(dev).manual_seed(s) for s in seeds[i:i + batch_size]]
            images.extend(self.pipe(prompts[i:i + batch_size], generator=gens, **kwargs).images)
        return images


def weights_hash(world: World, half: bool = True) -> str:
    """A short hash of the world's UNet and text encoder: each weight's name, shape and first values (rounded to
    float16 with ``half``, so that the same world loaded in float32 or float16 hashes alike). Attention processors
    and the token rows added for loaded concepts are left out, so loading a concept does not change it."""
    import hashlib

    h = hashlib.sha256()
    emb = world.pipe.text_encoder.get_input_embeddings().weight
    for part in ("unet", "text_encoder"):
        for name, p in getattr(world.pipe, part).named_parameters():
            if "processor" in name:
                continue
            t = p.detach()[:1] if p is emb else p.detach()
            h.update(f"{part}.{name}{tuple(t.shape)}".encode())
            first = t.flatten()[:16].cpu()
            h.update((first.half() if half else first.float()).numpy().tobytes())
    return h.hexdigest()[:16]


def world_identity(world: World) -> dict:
    """What a cache records of the world it was made in: its name and :func:`weights_hash`."""
    return {"name": world.name, "fingerprint": weights_hash(world)}


# ---------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------


def toy_measures(root: Path, device: torch.device, dtype: torch.dtype):
    """The toy world's measuring models from ``root``: its CLIP (model, tokenizer, image processor) and its
    detector, loaded quietly onto ``device``."""
    with quiet_loading():  # also the import: without torchvision, transformers warns that it falls back to PIL
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from .toy.models import ToyDetector

        clip = load_part(CLIPModel, root / "clip", dtype=dtype).to(device).eval()
        det = load_part(ToyDetector, root / "detector").to(device).eval()
        return clip, CLIPTokenizer.from_pretrained(root / "clip"), CLIPImageProcessor.from_pretrained(root / "clip"), det


def load_toy_world(root: str | Path | None = None, device: str | torch.device | None = None,
                   concepts_dir: str | Path | None = None) -> World:
    """The toy world, on the CPU in fp32 unless ``device`` (or ``$COMPINV_DEVICE``) asks for another one: its
    chapters compare live results with cached CPU ones exactly. ``concepts_dir``: your own photo folders as
    the concepts of interest instead of the rendered ones (resized to 32 px)."""
    from .toy import render

    root = Path(root or os.environ.get("COMPINV_TOY_DIR") or data_root() / "toy")  # read now: COMPINV_DATA may be set late
    if not (root / "pipeline" / "model_index.json").exists():
        raise FileNotFoundError(f"the toy world's weights are missing from {root}; rebuild them with `make toy-world` "
                                "(python -m compinv_utils.toy.train --out data/toy)")
    dev, dtype = pick_device(device, "cpu")
    check_device(dev)
    with quiet_loading():  # the import too (see toy_measures)
        from diffusers import StableDiffusionPipeline

        pipe = load_part(StableDiffusionPipeline, root / "pipeline", dtype=dtype).to(dev)
    clip, clip_tokenizer, clip_processor, det = toy_measures(root, dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    if concepts_dir:
        coi = concepts_from_folder(concepts_dir, size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    else:
        coi = []
        for c in render.CONCEPTS:
            drawn = [render.draw_scene(s) for s in render.concept_scenes(c)]
            crops = [crop(im, next(box for noun, box in objs if noun == c.base)) for im, objs in drawn]
            seen = tuple(sorted({noun for _, objs in drawn for noun, _ in objs} - {c.base}))
            coi.append(ConceptOfInterest(c.name, c.token, c.base, [im for im, _ in drawn], seen, crops))
    return World("toy", pipe, sorted(render.NOUNS), coi, clip, clip_tokenizer, clip_processor, toy_detector(det, dev), dev, dtype,
                 guidance_scale=5.0, held_out_pairs=render.HELD_OUT_PAIRS, extras={"root": root, "detector_model": det},
                 settings=TOY_SETTINGS)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 1.5
# ---------------------------------------------------------------------------------------------


def check_superclasses(world: World) -> None:
    """Raise ``ValueError`` when a concept's superclass is not one of the world's nouns: the detector could never
    find it, so every "class found" would be 0."""
    bad = [c for c in world.concepts_of_interest if c.superclass not in world.nouns]
    if bad:
        raise ValueError(f"the superclass of concept(s) {[(c.name, c.superclass) for c in bad]} is not one of the "
                         f"{world.name} world's nouns, so its detector can never find it: name each in the concepts "
                         f"folder's concepts.json (e.g. {{\"{bad[0].name}\": \"{world.nouns[0]}\"}}) with one of: "
                         f"{', '.join(world.nouns)}")


def load_sd15_world(concepts_dir: str | Path | None = None, device: str | torch.device | None = None) -> World:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, DetrForObjectDetection

    dev, dtype = pick_device(device, None)
    check_device(dev)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(SD15_ID, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        clip = CLIPModel.from_pretrained(SD15_CLIP_ID, dtype=dtype)
        clip_proc = CLIPProcessor.from_pretrained(SD15_CLIP_ID)
        detr = DetrForObjectDetection.from_pretrained(SD15_DETR_ID, revision=SD15_DETR_REVISION, dtype=dtype)
        detr_proc = AutoImageProcessor.from_pretrained(SD15_DETR_ID, revision=SD15_DETR_REVISION)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"the sd15 world needs the Hugging Face hub ({SD15_ID}, {SD15_CLIP_ID}, {SD15_DETR_ID}) and could not "
            f"load it: {exc}. Without hub access use load_world('toy'), which runs offline."
        ) from exc
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    coi = concepts_from_folder(concepts_dir) if concepts_dir else []
    return World("sd15", pipe, list(COCO_NOUNS), coi, clip.to(dev).eval(), clip_proc.tokenizer,
                 clip_proc.image_processor, detr_detector(detr.to(dev).eval(), detr_proc, dev, dtype), dev, dtype,
                 guidance_scale=7.5, settings=SD15_SETTINGS)


WORLD_LOADERS: dict[str, Callable[..., World]] = {"toy": load_toy_world, "sd15": load_sd15_world}
WORLDS = ("toy", "sd15")  # the worlds with trained weights


def register_world(name: str, loader: Callable[..., World]) -> None:
    """Make ``load_world(name)`` call ``loader(**kwargs)``: a new world is a loader and a line here."""
    WORLD_LOADERS[name.lower()] = loader


def _loader(name: str) -> Callable[..., World]:
    if name in WORLD_LOADERS:
        return WORLD_LOADERS[name]
    if ":" in name:  # "package.module:function", e.g. a test world built from configs
        import importlib

        module, _, attr = name.partition(":")
        try:
            loader = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"cannot load the world loader {name!r}: {exc}") from exc
        if not callable(loader):
            raise ValueError(f"the world loader {name!r} is a {type(loader).__name__}, not a function")
        return loader
    raise ValueError(f"unknown world {name!r}; the worlds are: {', '.join(WORLD_LOADERS)} "
                     "(or a loader given as 'package.module:function')")


def load_world(name: str | None = None, **kwargs) -> World:
    """Load a world by name: ``"toy"`` (default; also from the ``COMPINV_WORLD`` environment variable),
    ``"sd15"``, a name added with :func:`register_world`, or ``"package.module:function"``. Keyword arguments
    go to the loader: ``concepts_dir`` (a folder of concept photo folders; default ``$COMPINV_CONCEPTS``) and
    ``device`` (default ``$COMPINV_DEVICE``; the toy world stays on the CPU in fp32 unless asked)."""
    name = name or os.environ.get("COMPINV_WORLD", "toy")
    name = name if ":" in name else name.lower()
    if kwargs.get("concepts_dir") is None and os.environ.get("COMPINV_CONCEPTS"):
        kwargs["concepts_dir"] = os.environ["COMPINV_CONCEPTS"]
    if kwargs.get("concepts_dir") is None:
        kwargs.pop("concepts_dir", None)
    loader = _loader(name)
    if ":" in name:  # a loader named by the user: say so when it cannot take the arguments
        import inspect

        try:
            inspect.signature(loader).bind(**kwargs)
        except TypeError as exc:
            raise TypeError(f"the world loader {name!r} cannot be called with {sorted(kwargs) or 'no arguments'} "
                            f"({exc}); a loader builds a compinv_utils.world.World (see register_world)") from exc
        except ValueError:  # a builtin without a signature: the type check below speaks for it
            pass
    world = loader(**kwargs)
    if not isinstance(world, World):
        raise TypeError(f"the world loader {name!r} returned a {type(world).__name__}, not a World: a loader is a "
                        "function that builds compinv_utils.world.World (see register_world); check COMPINV_WORLD")
    check_superclasses(world)
    if world.settings.max_concepts is not None:
        world.concepts_of_interest = world.concepts_of_interest[:world.settings.max_concepts]
    return world
