"""Worlds: a Stable Diffusion pipeline plus everything that measures it.

``load_world("toy")`` loads the embedded toy world from ``data/toy`` (offline, CPU, seconds);
``load_world("sd15")`` loads Stable Diffusion 1.5, a hub CLIP and DETR (GPU and hub access).
Both return a :class:`World`; helpers take a world and never ask which one it is.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Where cached results and the toy world's weights live: ``$COMPINV_DATA`` when set (a regular, non-editable
    install sets it to the clone's ``data/``), else the repository's ``data/``."""
    return Path(os.environ.get("COMPINV_DATA") or REPO_ROOT / "data")


def shown_path(path: str | Path) -> str:
    """``path`` for printing and for files that are committed: relative to the repository (or to the folder that
    holds ``data_root()``) when inside it, so outputs read the same in every clone; otherwise unchanged."""
    path = Path(path)
    for base in (REPO_ROOT, data_root().parent):
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


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

Detection = tuple[str, tuple[float, float, float, float], float]  # (label, (x0, y0, x1, y1) in [0, 1], score)


@dataclass
class ConceptOfInterest:
    """A user's concept: its name, placeholder token, superclass word and photos."""

    name: str
    token: str  # the placeholder pseudo-word, e.g. "<mochi>"
    superclass: str  # the word it is a kind of, e.g. "cat"
    photos: list[Image.Image]
    in_photos: tuple[str, ...] = ()  # other nouns the photos show (never used as partners)
    photo_crops: list[Image.Image] | None = None  # the object cut out of each photo (None: detect it)


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
    concepts: list[str]  # the noun vocabulary: the "core distribution" of composable words
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
        unknown = [n for n in nouns if n not in self.concepts]
        if unknown:
            raise ValueError(f"unknown noun(s) {unknown}; the {self.name} world's nouns are: {', '.join(self.concepts)}")
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
        ids = self.clip_tokenizer(list(texts), padding="max_length", truncation=True,
                                  max_length=self.clip_tokenizer.model_max_length, return_tensors="pt")
        out = self.clip_model.get_text_features(input_ids=ids.input_ids.to(self.device))
        return _normalised(out)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image features, ``(N, D)`` float32 on the CPU."""
        px = self.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        out = self.clip_model.get_image_features(pixel_values=px.to(self.device, self.clip_model.dtype))
        return _normalised(out)

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
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        kwargs.setdefault("num_inference_steps", self.num_inference_steps)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        steps, scale = kwargs["num_inference_steps"], kwargs["guidance_scale"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
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


def _normalised(out) -> torch.Tensor:
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    feats = feats.float().cpu()
    return feats / feats.norm(dim=-1, keepdim=True)


def crop(image: Image.Image, box: Sequence[float], pad: float = 0.1) -> Image.Image:
    """The part of ``image`` inside ``box`` ``(x0, y0, x1, y1)`` in [0, 1], grown by ``pad`` of its size
    on each side (clipped to the image)."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x0 > x1 or y0 > y1:
        raise ValueError(f"a box is (x0, y0, x1, y1) in [0, 1] with x0 <= x1 and y0 <= y1, got {tuple(box)}")
    w, h = x1 - x0, y1 - y0
    x0, x1 = max(0.0, x0 - pad * w), min(1.0, x1 + pad * w)
    y0, y1 = max(0.0, y0 - pad * h), min(1.0, y1 + pad * h)
    W, H = image.size
    return image.crop((int(x0 * W), int(y0 * H), max(int(x0 * W) + 1, round(x1 * W)), max(int(y0 * H) + 1, round(y1 * H))))


def best_box(detections, noun: str):
    """The highest-scoring box of ``noun`` among one image's detections, or None."""
    boxes = [(score, box) for label, box, score in detections if label == noun]
    return max(boxes)[1] if boxes else None


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> tuple[torch.device, torch.dtype]:
    """CUDA and fp16 when available, else CPU and fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit and 32-bit grey images ("I;16", "I", "F") are scaled to their range instead of
    clipped (PIL's ``convert`` would turn most of a 16-bit photo white)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            top = 65535.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        else:
            top = 255.0
        im = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_photos(folder: str | Path, size: int | None = None) -> list[Image.Image]:
    """Read every image in ``folder`` as RGB (grayscale, 16-bit and RGBA are converted), optionally resized
    to ``size`` x ``size`` (centre-cropped to a square first). Other files (not hidden, not ``.json``/``.txt``
    notes) are named in a warning, so that a photo in an unread format is not skipped without a word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    skipped = sorted(p.name for p in folder.iterdir() if p.is_file() and p not in files and not p.name.startswith(".")
                     and p.suffix.lower() not in (".json", ".txt", ".md"))
    if not files:
        raise ValueError(f"photo folder {folder} holds no images ({', '.join(PHOTO_SUFFIXES)})"
                         + (f"; it holds {skipped[:5]}" if skipped else ""))
    if skipped:
        import warnings

        warnings.warn(f"photo folder {folder}: skipped {len(skipped)} file(s) that are not images of a read format "
                      f"({', '.join(PHOTO_SUFFIXES)}): {skipped[:5]}; convert them to PNG to use them")
    photos = []
    for p in files:
        try:
            im = Image.open(p)
            im.load()
        except Exception as exc:  # noqa: BLE001 - any decoder error means an unreadable photo
            raise ValueError(f"cannot read photo {p} in folder {folder}: {exc}") from exc
        im = _to_rgb(im)
        if size is not None:
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        photos.append(im)
    return photos


# ---------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------


def _toy_detector(det, device):
    def detect(images: list[Image.Image], threshold: float) -> list[list[Detection]]:
        if not images:
            return []
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                         for im in images]).to(device)
        with torch.no_grad():
            logits, boxes = det(x)
        scores = torch.sigmoid(logits).cpu().numpy()
        boxes = boxes.cpu().numpy()
        out = []
        for s, b in zip(scores, boxes):
            keep = np.nonzero(s >= threshold)[0]
            out.append([(det.labels[k], tuple(float(v) for v in b[k]), float(s[k])) for k in keep[np.argsort(-s[keep])]])
        return out

    return detect


@contextmanager
def quiet_loading():
    """Load models without progress bars or library chatter (they would stay frozen in a saved notebook's output);
    the libraries' settings are restored afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(m, m.is_progress_bar_enabled(), m.get_verbosity()) for m in (dlog, tlog)]
    for m, _, _ in saved:
        m.disable_progress_bar()
        m.set_verbosity_error()
    try:
        with redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights from local directory"
            yield
    finally:
        for m, bar, level in saved:
            (m.enable_progress_bar if bar else m.disable_progress_bar)()
            m.set_verbosity(level)


def _load_part(cls, folder: Path, **kwargs):
    """``cls.from_pretrained(folder)`` with an error that names the folder when its files are unreadable."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - each library raises its own error type for a bad file
        raise RuntimeError(f"cannot load the toy world's weights in {folder}: a file there is missing, truncated or "
                           f"corrupt ({type(exc).__name__}: {str(exc)[:200]}). Re-download the repository's data/toy "
                           "(git checkout -- data/toy) or rebuild it with `make toy-world`") from exc


def toy_measures(root: Path, device: torch.device, dtype: torch.dtype):
    """The toy world's measuring models from ``root``: its CLIP (model, tokenizer, image processor) and its
    detector, loaded quietly onto ``device``."""
    with quiet_loading():  # also the import: without torchvision, transformers warns that it falls back to PIL
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from .toy.models import ToyDetector

        clip = _load_part(CLIPModel, root / "clip", dtype=dtype).to(device).eval()
        det = _load_part(ToyDetector, root / "detector").to(device).eval()
        return clip, CLIPTokenizer.from_pretrained(root / "clip"), CLIPImageProcessor.from_pretrained(root / "clip"), det


def _device(device, default: str | None) -> tuple[torch.device, torch.dtype]:
    """The device asked for (argument, else ``$COMPINV_DEVICE``, else ``default``, else CUDA when available), and
    its dtype (fp16 on CUDA, fp32 elsewhere)."""
    where = "the device argument" if device else "COMPINV_DEVICE"
    device = device or os.environ.get("COMPINV_DEVICE") or default
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{where} is {device!r}, which is not a device name: use 'cpu', 'cuda', 'cuda:0' or 'mps' "
                         "(or unset COMPINV_DEVICE for the default)") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{where} asks for {device!r}; the worlds run on 'cpu', 'cuda' or 'mps'")
    return dev, torch.float16 if dev.type == "cuda" else torch.float32


def check_device(dev: torch.device) -> None:
    """Raise ``RuntimeError`` (saying what to do) when ``dev`` does not exist on this machine, before any weights
    are loaded onto it."""
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else "no"
        raise RuntimeError(f"the device {str(dev)!r} was asked for (device argument or COMPINV_DEVICE), but this "
                           f"machine has {have} CUDA GPU(s): unset COMPINV_DEVICE or set it to 'cpu'")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError("the device 'mps' was asked for (device argument or COMPINV_DEVICE), but this machine has "
                           "no Apple GPU: unset COMPINV_DEVICE or set it to 'cpu'")


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
    dev, dtype = _device(device, "cpu")
    check_device(dev)
    with quiet_loading():  # the import too (see toy_measures)
        from diffusers import StableDiffusionPipeline

        pipe = _load_part(StableDiffusionPipeline, root / "pipeline", dtype=dtype).to(dev)
    clip, clip_tokenizer, clip_processor, det = toy_measures(root, dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    if concepts_dir:
        coi = sd15_concepts(concepts_dir, size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    else:
        coi = []
        for c in render.CONCEPTS:
            drawn = [render.draw_scene(s) for s in render.concept_scenes(c)]
            crops = [crop(im, next(box for noun, box in objs if noun == c.base)) for im, objs in drawn]
            seen = tuple(sorted({noun for _, objs in drawn for noun, _ in objs} - {c.base}))
            coi.append(ConceptOfInterest(c.name, c.token, c.base, [im for im, _ in drawn], seen, crops))
    return World("toy", pipe, sorted(render.NOUNS), coi, clip, clip_tokenizer, clip_processor, _toy_detector(det, dev), dev, dtype,
                 guidance_scale=5.0, held_out_pairs=render.HELD_OUT_PAIRS, extras={"root": root, "detector_model": det},
                 settings=TOY_SETTINGS)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 1.5
# ---------------------------------------------------------------------------------------------


def _detr_detector(model, processor, device, dtype):
    id2label = model.config.id2label

    def detect(images: list[Image.Image], threshold: float) -> list[list[Detection]]:
        out = []
        for im in images:
            inputs = processor(images=im.convert("RGB"), return_tensors="pt").to(device)
            with torch.no_grad():
                res = model(pixel_values=inputs.pixel_values.to(dtype))
            post = processor.post_process_object_detection(res, threshold=threshold, target_sizes=[(1, 1)])[0]
            out.append([(id2label[int(lab)], tuple(float(v) for v in box.clamp(0, 1)), float(s))
                        for s, lab, box in zip(post["scores"], post["labels"], post["boxes"])])
        return out

    return detect


def _read_concepts_json(path: Path) -> dict[str, str]:
    """``concepts.json``: ``{"folder name": "superclass"}``, checked (an error names the file and what to fix)."""
    if not path.exists():
        return {}
    example = 'e.g. {"dog6": "dog", "my_teapot": "cup"}'
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it maps each concept folder to its superclass, "
                         f"{example}") from exc
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} holds a {type(mapping).__name__}, not an object mapping each concept folder to its "
                         f"superclass, {example}")
    bad = {k: v for k, v in mapping.items() if not isinstance(v, str) or not v.strip()}
    if bad:
        raise ValueError(f"{path}: the superclass of {sorted(bad)} is {list(bad.values())}, not a word; give each "
                         f"folder a noun of the world, {example}")
    return {k: v.strip() for k, v in mapping.items()}


def check_superclasses(world: World) -> None:
    """Raise ``ValueError`` when a concept's superclass is not one of the world's nouns: the detector could never
    find it, so every "class found" would be 0."""
    bad = [c for c in world.concepts_of_interest if c.superclass not in world.concepts]
    if bad:
        raise ValueError(f"the superclass of concept(s) {[(c.name, c.superclass) for c in bad]} is not one of the "
                         f"{world.name} world's nouns, so its detector can never find it: name each in the concepts "
                         f"folder's concepts.json (e.g. {{\"{bad[0].name}\": \"{world.concepts[0]}\"}}) with one of: "
                         f"{', '.join(world.concepts)}")


def sd15_concepts(folder: str | Path, size: int = 512) -> list[ConceptOfInterest]:
    """Concepts of interest from a folder with one subfolder of photos per concept (e.g. the DreamBooth
    data set). The superclass is read from ``concepts.json`` ({name: superclass}) when present, else
    from the subfolder's name without trailing digits ("dog6" -> "dog")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"concepts folder {folder} does not exist")
    mapping = _read_concepts_json(folder / "concepts.json")
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subs:
        raise ValueError(f"concepts folder {folder} has no subfolders of photos")
    out, seen = [], {}
    for sub in subs:
        name = re.sub(r"[^a-z0-9_-]", "", sub.name.lower())
        if not name:
            raise ValueError(f"concept folder {sub} has no letter or digit in its name, so it gives no placeholder "
                             "token: rename it (e.g. 'my_dog')")
        if name in seen:
            raise ValueError(f"concept folders {seen[name]} and {sub} both become the token <{name}>: rename one")
        seen[name] = sub
        superclass = mapping.get(sub.name) or re.sub(r"[\d_]+$", "", sub.name).replace("_", " ")
        out.append(ConceptOfInterest(name, f"<{name}>", superclass, load_photos(sub, size)))
    return out


def load_sd15_world(concepts_dir: str | Path | None = None, device: str | torch.device | None = None) -> World:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, DetrForObjectDetection

    dev, dtype = _device(device, None)
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
    coi = sd15_concepts(concepts_dir) if concepts_dir else []
    return World("sd15", pipe, list(COCO_NOUNS), coi, clip.to(dev).eval(), clip_proc.tokenizer,
                 clip_proc.image_processor, _detr_detector(detr.to(dev).eval(), detr_proc, dev, dtype), dev, dtype,
                 guidance_scale=7.5, settings=SD15_SETTINGS)


def load_sd15_random_world(**kwargs) -> World:
    """A world with Stable Diffusion 1.5's layer structure and random weights, built from configs (no download):
    proves the sd15 code path on a CPU (see :mod:`compinv_utils.sd15_random`)."""
    from .sd15_random import load_sd15_random_world as load

    return load(**kwargs)


WORLD_LOADERS: dict[str, Callable[..., World]] = {"toy": load_toy_world, "sd15": load_sd15_world,
                                                   "sd15-random": load_sd15_random_world}
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
