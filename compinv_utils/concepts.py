"""Concepts of interest: a user's concept (name, placeholder token, superclass, photos) and reading them from a
folder with one subfolder of photos per concept."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class ConceptOfInterest:
    """A user's concept: its name, placeholder token, superclass word and photos."""

    name: str
    token: str  # the placeholder pseudo-word, e.g. "<mochi>"
    superclass: str  # the word it is a kind of, e.g. "cat"
    photos: list[Image.Image]
    in_photos: tuple[str, ...] = ()  # other nouns the photos show (never used as partners)
    photo_crops: list[Image.Image] | None = None  # the object cut out of each photo (None: detect it)


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


def concepts_from_folder(folder: str | Path, size: int = 512) -> list[ConceptOfInterest]:
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
