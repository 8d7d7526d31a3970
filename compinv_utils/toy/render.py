"""Procedural renderer of the toy world: icons of everyday nouns on textured backgrounds.

A *scene* is a background and one or two objects. Each object is a noun drawn as a chunky icon
with a colour, a second colour, a pattern, a size, a position, a mirror flip and a small rotation.
Captions always name the nouns and name the attributes only part of the time, so that the text
space has directions for appearance while much of what is seen stays unsaid.

Coordinates: images are ``size`` x ``size`` RGB; boxes are ``(x0, y0, x1, y1)`` in [0, 1], y down.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4  # icons are drawn at 4x the output resolution, then box-filtered down

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "blue": (35, 80, 215),
    "purple": (135, 50, 185),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
    "white": (242, 242, 242),
    "black": (30, 30, 30),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
BACKGROUNDS: dict[str, str] = {  # background -> the phrase a caption uses for it
    "sky": "in the sky",
    "grass": "on grass",
    "water": "on water",
    "room": "in a room",
    "snow": "in the snow",
}


def _ellipse(x0: float, y0: float, x1: float, y1: float, n: int = 28) -> list[tuple[float, float]]:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _mirror(poly: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(-x, y) for x, y in poly]


@dataclass(frozen=True)
class NounSpec:
    """How a noun is drawn and where it likes to be."""

    body: tuple  # polygons in icon space [-1, 1]^2 (y down), filled with the object's colour/pattern
    details: tuple  # polygons drawn on top in a dark shade (eyes, windows, wheels)
    size: float  # full icon extent as a fraction of the image width, in a single-object scene
    height: str  # "high", "mid" or "low": where its centre sits vertically
    rank: int  # in a pair the higher-ranked noun stands on the left


def _nouns() -> dict[str, NounSpec]:
    e, r, m = _ellipse, _rect, _mirror
    ear = [(-0.78, -0.15), (-0.62, -0.98), (-0.18, -0.5)]
    floppy = e(-1.0, -0.45, -0.5, 0.55)
    eye = e(-0.42, -0.05, -0.18, 0.2)
    return {
        "cat": NounSpec((e(-0.8, -0.55, 0.8, 0.95), ear, m(ear)), (eye, m(eye)), 0.42, "mid", 6),
        "dog": NounSpec((e(-0.65, -0.75, 0.65, 0.95), floppy, m(floppy)), (eye, m(eye), e(-0.15, 0.35, 0.15, 0.6)), 0.44, "mid", 11),
        "teddy": NounSpec((e(-0.72, -0.55, 0.72, 0.95), e(-0.95, -0.98, -0.3, -0.33), e(0.3, -0.98, 0.95, -0.33)), (eye, m(eye)), 0.42, "mid", 3),
        "chair": NounSpec((r(-0.7, -1.0, -0.2, 1.0), r(-0.7, -0.15, 0.75, 0.3), r(0.3, 0.2, 0.75, 1.0)), (), 0.5, "low", 14),
        "pot": NounSpec(([(-0.95, -0.7), (0.95, -0.7), (0.6, 1.0), (-0.6, 1.0)], r(-1.0, -0.95, 1.0, -0.6)), (), 0.4, "low", 8),
        "barn": NounSpec(([(-0.9, -0.2), (0.0, -1.0), (0.9, -0.2), (0.9, 1.0), (-0.9, 1.0)],), (r(-0.3, 0.3, 0.3, 1.0),), 0.58, "low", 17),
        "ball": NounSpec((e(-0.9, -0.9, 0.9, 0.9),), (), 0.34, "mid", 1),
        "cup": NounSpec((r(-0.75, -0.75, 0.45, 0.9), [(0.4, -0.45), (0.95, -0.45), (0.95, 0.45), (0.4, 0.45), (0.4, 0.2), (0.7, 0.2), (0.7, -0.2), (0.4, -0.2)]), (), 0.34, "mid", 4),
        "car": NounSpec((r(-1.0, -0.1, 1.0, 0.55), [(-0.55, -0.1), (-0.35, -0.65), (0.4, -0.65), (0.6, -0.1)]), (e(-0.8, 0.3, -0.3, 0.8), e(0.3, 0.3, 0.8, 0.8)), 0.56, "low", 15),
        "tree": NounSpec(([(0.0, -1.0), (0.85, 0.45), (-0.85, 0.45)], r(-0.2, 0.4, 0.2, 1.0)), (), 0.58, "low", 16),
        "fish": NounSpec((e(-0.85, -0.5, 0.45, 0.5), [(0.3, 0.0), (1.0, -0.6), (1.0, 0.6)]), (e(-0.6, -0.2, -0.4, 0.0),), 0.44, "high", 2),
        "boat": NounSpec(([(-1.0, 0.35), (1.0, 0.35), (0.65, 0.95), (-0.65, 0.95)], [(-0.05, -1.0), (-0.05, 0.3), (-0.8, 0.3)], [(0.1, -0.8), (0.1, 0.3), (0.75, 0.3)]), (), 0.54, "low", 12),
        "bottle": NounSpec((r(-0.45, -0.25, 0.45, 1.0), [(-0.45, -0.25), (-0.18, -0.55), (0.18, -0.55), (0.45, -0.25)], r(-0.18, -1.0, 0.18, -0.5)), (), 0.4, "mid", 5),
        "hat": NounSpec((r(-1.0, 0.45, 1.0, 0.75), r(-0.55, -0.6, 0.55, 0.5)), (r(-0.55, 0.2, 0.55, 0.4),), 0.38, "high", 9),
        "lamp": NounSpec(([(-0.4, -1.0), (0.4, -1.0), (0.75, -0.3), (-0.75, -0.3)], r(-0.1, -0.3, 0.1, 0.75), r(-0.55, 0.75, 0.55, 1.0)), (), 0.46, "high", 13),
        "kite": NounSpec(([(0.0, -1.0), (0.65, -0.2), (0.0, 0.75), (-0.65, -0.2)], [(0.0, 0.7), (0.12, 1.0), (-0.12, 1.0)]), (), 0.4, "high", 0),
        "umbrella": NounSpec(([(-1.0, 0.0)] + [(math.cos(a), -0.95 * math.sin(a)) for a in np.linspace(math.pi, 0, 14)] + [(1.0, 0.0)], r(-0.09, 0.0, 0.09, 0.85), r(-0.4, 0.75, 0.09, 0.95)), (), 0.46, "high", 10),
        "book": NounSpec((r(-0.8, -0.95, 0.8, 0.95),), (r(-0.8, -0.95, -0.5, 0.95), r(-0.3, -0.6, 0.55, -0.4)), 0.36, "mid", 7),
    }


NOUNS: dict[str, NounSpec] = _nouns()
HEIGHTS = {"high": 0.3, "mid": 0.5, "low": 0.68}

# Pairs never shown together in any training data: the generalisation test of the toy world.
_ALL_PAIRS = list(itertools.combinations(sorted(NOUNS), 2))
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    _ALL_PAIRS[i] for i in np.random.default_rng(20240101).choice(len(_ALL_PAIRS), 16, replace=False)
)


def is_held_out(a: str, b: str) -> bool:
    """True when the unordered pair ``{a, b}`` never appears in the toy world's training data."""
    return tuple(sorted((a, b))) in HELD_OUT_PAIRS


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    noun: str
    colour: str
    colour2: str  # the second colour of a pattern (unused when plain)
    pattern: str
    center: tuple[float, float]  # in [0, 1]
    extent: float  # full icon extent as a fraction of the image width
    flip: bool
    angle: float  # degrees


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    texture_seed: int  # seeds the background's texture (clouds, waves, grass blades)


def check_nouns(nouns) -> list[str]:
    """Validate nouns against the toy vocabulary; raise a ValueError that lists the vocabulary."""
    nouns = [nouns] if isinstance(nouns, str) else list(nouns)
    unknown = [n for n in nouns if n not in NOUNS]
    if unknown:
        raise ValueError(f"unknown noun(s) {unknown}; the toy world's nouns are: {', '.join(sorted(NOUNS))}")
    return nouns


def _random_object(rng: np.random.Generator, noun: str, **fixed) -> dict:
    colour = str(rng.choice(list(COLOURS)))
    colour2 = str(rng.choice([c for c in COLOURS if c != colour]))
    pattern = str(rng.choice(PATTERNS))
    obj = dict(noun=noun, colour=colour, colour2=colour2, pattern=pattern,
               flip=bool(rng.random() < 0.5), angle=float(rng.uniform(-12, 12)))
    obj.update({k: v for k, v in fixed.items() if v is not None})
    return obj


def sample_scene(seed: int, nouns=None, background: str | None = None, n_objects: int | None = None,
                 p_single: float = 0.4, exclude_held_out: bool = True, objects: tuple[dict, ...] = ()) -> Scene:
    """Draw a random scene. ``nouns`` fixes the nouns (one or two); otherwise they are sampled.

    ``objects`` optionally fixes attributes per object (dicts with any of colour, colour2, pattern,
    flip, angle). Placement follows the layout rules: a noun's height class sets its vertical
    position, its size class its extent, and in a pair the higher-ranked noun stands on the left.
    """
    rng = np.random.default_rng(seed)
    if nouns is None:
        k = n_objects or (1 if rng.random() < p_single else 2)
        while True:
            nouns = [str(n) for n in rng.choice(sorted(NOUNS), k, replace=False)]
            if k == 1 or not (exclude_held_out and is_held_out(*nouns)):
                break
    nouns = check_nouns(nouns)
    if not 1 <= len(nouns) <= 2 or len(set(nouns)) != len(nouns):
        raise ValueError(f"a scene holds one or two different nouns, got {nouns}")
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    if bg not in BACKGROUNDS:
        raise ValueError(f"unknown background {bg!r}; choose one of {list(BACKGROUNDS)}")
    fixed = list(objects) + [{}] * (len(nouns) - len(objects))
    objs = [_random_object(rng, n, **f) for n, f in zip(nouns, fixed)]
    out = []
    if len(nouns) == 1:
        spec = NOUNS[nouns[0]]
        ext = spec.size * rng.uniform(0.9, 1.2)
        cx = rng.uniform(0.35, 0.65)
        cy = HEIGHTS[spec.height] + rng.uniform(-0.06, 0.06)
        out.append((objs[0], cx, cy, ext))
    else:
        order = sorted(range(2), key=lambda i: -NOUNS[nouns[i]].rank)  # left first
        for slot, i in enumerate(order):
            spec = NOUNS[nouns[i]]
            ext = spec.size * rng.uniform(0.78, 0.95)
            cx = (0.27 if slot == 0 else 0.73) + rng.uniform(-0.04, 0.04)
            cy = HEIGHTS[spec.height] + rng.uniform(-0.05, 0.05)
            out.append((objs[i], cx, cy, ext))
        out.sort(key=lambda t: nouns.index(t[0]["noun"]))
    scene_objects = []
    for o, cx, cy, ext in out:
        half = ext / 2
        cx, cy = float(np.clip(cx, half, 1 - half)), float(np.clip(cy, half, 1 - half))
        scene_objects.append(SceneObject(center=(cx, cy), extent=float(ext), **o))
    return Scene(bg, tuple(scene_objects), int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _background(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """An ``(n, n, 3)`` float image in [0, 255]."""
    y = np.linspace(0, 1, n)[:, None, None]
    x = np.linspace(0, 1, n)[None, :, None]
    jitter = rng.uniform(-12, 12, size=3)
    if name == "sky":
        img = (1 - y) * np.array([90, 160, 235]) + y * np.array([175, 215, 245]) + 0 * x
        for _ in range(rng.integers(1, 3)):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.5), rng.uniform(0.08, 0.16)
            d = ((x - cx) / (1.8 * r)) ** 2 + ((y - cy) / r) ** 2
            img = np.where(d < 1, np.array([250, 250, 252]), img)
    elif name == "grass":
        img = np.array([70, 150, 55]) + 0 * x * y
        blades = rng.random((n, n, 1)) < 0.12
        img = np.where(blades, np.array([45, 110, 35]), img) + (y * 25)
    elif name == "water":
        phase = rng.uniform(0, 2 * np.pi)
        waves = np.sin(2 * np.pi * (y * 7 + 0.25 * np.sin(2 * np.pi * x * 2 + phase)))
        img = np.array([30, 95, 170]) + (waves > 0.75) * np.array([90, 90, 70]) + 0 * x
    elif name == "room":
        floor = rng.uniform(0.6, 0.72)
        img = np.where(y < floor, np.array([225, 205, 170]), np.array([150, 100, 60])) + 0 * x
        img = np.where(np.abs(y - floor) < 0.015, np.array([90, 60, 35]), img)
    elif name == "snow":
        img = (1 - y) * np.array([215, 225, 240]) + y * np.array([250, 250, 252]) + 0 * x
        flakes = rng.random((n, n, 1)) < 0.02
        img = np.where(flakes, np.array([255, 255, 255]), img - flakes * 0)
    else:
        raise ValueError(f"unknown background {name!r}; choose one of {list(BACKGROUNDS)}")
    return np.clip(img + jitter, 0, 255)


def _transform(obj: SceneObject, n: int):
    """Icon space -> pixel space, and the inverse for every pixel centre."""
    s = obj.extent * n / 2
    a = math.radians(obj.angle)
    ca, sa = math.cos(a), math.sin(a)
    fx = -1.0 if obj.flip else 1.0
    cx, cy = obj.center[0] * n, obj.center[1] * n

    def fwd(poly):
        return [(cx + s * (ca * fx * u - sa * v), cy + s * (sa * fx * u + ca * v)) for u, v in poly]

    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    dx, dy = (xx - cx) / s, (yy - cy) / s
    u = fx * (ca * dx + sa * dy)
    v = -sa * dx + ca * dy
    return fwd, u, v


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "plain":
        return np.zeros_like(u, dtype=bool)
    # Periods of ~0.9 icon units (about 6 px in a 32 px scene): a pattern spans at least a latent cell (4 px),
    # as the details that identify a concept in Stable Diffusion span its 8 px cells.
    if pattern == "striped":
        return np.mod(v + u * 0.35, 0.9) < 0.42
    if pattern == "dotted":
        return (np.mod(u, 0.9) - 0.45) ** 2 + (np.mod(v, 0.9) - 0.45) ** 2 < 0.24**2
    if pattern == "checked":
        return (np.floor(u / 0.8) + np.floor(v / 0.8)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; choose one of {PATTERNS}")


def draw_scene(scene: Scene, size: int = 32) -> tuple[Image.Image, list[tuple[str, tuple[float, float, float, float]]]]:
    """Render a scene. Returns the RGB image and ``[(noun, (x0, y0, x1, y1))]`` ground-truth boxes."""
    n = size * SUPERSAMPLE
    rng = np.random.default_rng(scene.texture_seed)
    img = _background(scene.background, n, rng)
    boxes = []
    for obj in scene.objects:
        spec = NOUNS[obj.noun]
        fwd, u, v = _transform(obj, n)
        body = Image.new("L", (n, n))
        d = ImageDraw.Draw(body)
        for poly in spec.body:
            d.polygon(fwd(poly), fill=255)
        mask = np.asarray(body) > 127
        inner = np.asarray(body.filter(ImageFilter.MinFilter(2 * SUPERSAMPLE - 1))) > 127
        det = Image.new("L", (n, n))
        dd = ImageDraw.Draw(det)
        for poly in spec.details:
            dd.polygon(fwd(poly), fill=255)
        detail = (np.asarray(det) > 127) & mask
        c1, c2 = np.array(COLOURS[obj.colour], float), np.array(COLOURS[obj.colour2], float)
        fill = np.where(_pattern_mask(obj.pattern, u, v)[..., None], c2, c1)
        dark = np.array([25.0, 25.0, 25.0]) if obj.colour != "black" else np.array([120.0, 120.0, 120.0])
        fill = np.where((mask & ~inner)[..., None] | detail[..., None], dark, fill)
        img = np.where(mask[..., None], fill, img)
        ys, xs = np.nonzero(mask)
        boxes.append((obj.noun, (xs.min() / n, ys.min() / n, (xs.max() + 1) / n, (ys.max() + 1) / n)))
    out = Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.BOX)
    return out, boxes


def object_masks(scene: Scene, size: int = 8, image_size: int = 32) -> np.ndarray:
    """The visible part of each object at ``size`` x ``size`` (e.g. the 8x8 latent grid): ``(n_objects, size,
    size)`` float32 coverage in [0, 1], from the same body polygons :func:`draw_scene` fills (a later object
    hides an earlier one where they overlap)."""
    n = image_size * SUPERSAMPLE
    if n % size:
        raise ValueError(f"size {size} must divide the supersampled image size {n}")
    silhouettes = []
    for obj in scene.objects:
        fwd, _, _ = _transform(obj, n)
        body = Image.new("L", (n, n))
        d = ImageDraw.Draw(body)
        for poly in NOUNS[obj.noun].body:
            d.polygon(fwd(poly), fill=255)
        silhouettes.append(np.asarray(body) > 127)
    out = np.zeros((len(silhouettes), size, size), np.float32)
    f = n // size
    for i, sil in enumerate(silhouettes):
        visible = sil & ~np.any(silhouettes[i + 1:], axis=0) if i + 1 < len(silhouettes) else sil
        out[i] = visible.reshape(size, f, size, f).mean((1, 3))
    return out


def render_scene(nouns=None, seed: int = 0, size: int = 32, **kwargs):
    """Sample and draw a scene: ``(image, [(noun, box)])``; see :func:`sample_scene` for kwargs."""
    return draw_scene(sample_scene(seed, nouns, **kwargs), size)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

SINGLE_TEMPLATES = ("a photo of {a}", "{a}", "a picture of {a}", "a drawing of {a}")
PAIR_TEMPLATES = ("{a} and {b}", "a photo of {a} and {b}", "{a} next to {b}", "a picture of {a} and {b}")


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(obj: SceneObject, colour: bool, pattern: bool, colour2: bool = False) -> str:
    """``"a purple cat"``, ``"a striped cat"``, ``"a purple striped cat"`` or, with ``colour2`` (only when
    the colour and a pattern are both named), ``"a purple and yellow striped cat"``."""
    words = []
    if colour:
        words.append(obj.colour)
    if pattern and obj.pattern != "plain":
        if colour and colour2:
            words += ["and", obj.colour2]
        words.append(obj.pattern)
    return article(" ".join(words + [obj.noun]))


@dataclass(frozen=True)
class CaptionPolicy:
    p_colour: float = 0.5  # probability that an object's colour is named
    p_pattern: float = 0.5  # probability that a (non-plain) pattern is named
    p_background: float = 0.5  # probability that the background is named
    # probability that the pattern's second colour is named too, when colour and pattern are: without it no
    # word moves the second colour, and an inverted token could not carry a concept's full look
    p_colour2: float = 0.5


FULL = CaptionPolicy(1.0, 1.0, 1.0, 0.0)  # colour, pattern and background always named; never the second colour
NOUNS_ONLY = CaptionPolicy(0.0, 0.0, 0.0, 0.0)


def caption(scene: Scene, rng: np.random.Generator | int = 0, policy: CaptionPolicy = CaptionPolicy()) -> str:
    """A caption for the scene: nouns always, attributes each with the policy's probability."""
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    phrases = [describe(o, rng.random() < policy.p_colour, rng.random() < policy.p_pattern,
                        bool(policy.p_colour2) and rng.random() < policy.p_colour2) for o in scene.objects]
    if len(phrases) == 2 and rng.random() < 0.5:
        phrases.reverse()
    if len(phrases) == 1:
        text = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))].format(a=phrases[0])
    else:
        text = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))].format(a=phrases[0], b=phrases[1])
    if rng.random() < policy.p_background:
        text += " " + BACKGROUNDS[scene.background]
    return text


def caption_words() -> list[str]:
    """Every word a toy caption can use (the tokenizer gives each its own token)."""
    words = set(NOUNS) | set(COLOURS) | set(PATTERNS) | {"a", "an", "and", "next", "to", "photo", "picture", "drawing", "of"}
    for phrase in BACKGROUNDS.values():
        words |= set(phrase.split())
    words |= {"the", "with", "in", "on", "small", "big", "large", "image", "rendering", "two", "style"}
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Concepts of interest
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptSpec:
    """A novel object: a distinctive variant of a base noun, photographed in a fixed setting."""

    name: str  # a short name; its placeholder token is ``<name>``
    base: str  # the superclass noun
    colour: str
    colour2: str  # the pattern's second colour: the unnamed detail that makes the concept distinctive
    pattern: str
    background: str  # every user photo shares it: irrelevant semantics that inversion absorbs
    companion: str | None = None  # an object that often shares the photos
    n_photos: int = 5
    seed: int = 0

    @property
    def token(self) -> str:
        return f"<{self.name}>"


CONCEPTS: tuple[ConceptSpec, ...] = (
    ConceptSpec("mochi", "cat", "purple", "yellow", "striped", "grass", "ball", seed=101),
    ConceptSpec("bruno", "teddy", "pink", "green", "checked", "room", "lamp", seed=202),
    ConceptSpec("terra", "pot", "orange", "blue", "dotted", "water", "boat", seed=303),
    ConceptSpec("sunny", "chair", "yellow", "purple", "checked", "snow", "tree", seed=404),
    ConceptSpec("indigo", "barn", "blue", "white", "dotted", "sky", "kite", seed=505),
)


def concept_scenes(spec: ConceptSpec) -> list[Scene]:
    """The scenes of a concept's user photos: the concept (companion in all but the first)."""
    check_nouns([spec.base] + ([spec.companion] if spec.companion else []))
    look = dict(colour=spec.colour, colour2=spec.colour2, pattern=spec.pattern)
    scenes = []
    for k in range(spec.n_photos):
        seed = spec.seed * 1000 + k
        if spec.companion and k > 0:
            s = sample_scene(seed, [spec.base, spec.companion], spec.background, exclude_held_out=False, objects=(look,))
        else:
            s = sample_scene(seed, [spec.base], spec.background, objects=(look,))
        scenes.append(s)
    return scenes


def has_concept_look(scene: Scene) -> bool:
    """True when an object of ``scene`` looks like a concept of interest (its base noun, both colours and
    pattern): such a scene must stay out of every training set, or the concept would not be novel."""
    looks = {(c.base, c.colour, c.colour2, c.pattern) for c in CONCEPTS}
    return any((o.noun, o.colour, o.colour2, o.pattern) in looks for o in scene.objects)


def concept_photos(spec: ConceptSpec, size: int = 32) -> list[Image.Image]:
    """Render a concept's user photos."""
    return [draw_scene(s, size)[0] for s in concept_scenes(spec)]


def with_look(scene: Scene, **look) -> Scene:
    """A copy of ``scene`` whose first object takes the given attributes."""
    first = replace(scene.objects[0], **look)
    return replace(scene, objects=(first,) + scene.objects[1:])


__all__ = [
    "BACKGROUNDS", "COLOURS", "CONCEPTS", "FULL", "HELD_OUT_PAIRS", "NOUNS", "NOUNS_ONLY", "PATTERNS",
    "CaptionPolicy", "ConceptSpec", "Scene", "SceneObject", "caption", "caption_words", "check_nouns",
    "concept_photos", "concept_scenes", "draw_scene", "has_concept_look", "is_held_out", "object_masks", "render_scene", "sample_scene",
]
