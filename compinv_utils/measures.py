"""What the paper measures on an image: detection of the nouns of its prompt (CoI likelihood) and CLIP text and
image alignment.

**CoI likelihood**, as the official evaluation (``utils/clip_eval.py``) defines it: whether the
detector finds the prompt's *last* object — the partner in "a S* cat and a kite", the second concept's
class in "a S* cat and a S' teddy" (DETR at score 0.8 in the official code and in the sd15 world; the
toy detector at its own threshold). Beside it: *all named objects found* and, under its own name,
*class found* (the concept's own class noun detected), which the official code does not measure.

Intervals over these measures are in :mod:`compinv_utils.statistics`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .detection import best_box, crop


def found(detections, noun: str) -> bool:
    """Whether ``noun`` is among one image's detections ``[(label, box, score)]``."""
    return any(label == noun for label, _, _ in detections)


def detection_rate(world, images: Sequence[Image.Image], noun: str, threshold: float = 0.5) -> np.ndarray:
    """Per image, 1.0 if the world's detector finds ``noun`` (score >= threshold), else 0.0."""
    return np.array([float(found(d, noun)) for d in world.detect(images, threshold)])


def text_alignment(world, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
    """Per image, the CLIP cosine similarity to its text (the paper's evaluation multiplies this by 2.5)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    return (world.image_features(images) * world.text_features(texts)).sum(-1).numpy()


def image_alignment(world, images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> np.ndarray:
    """Per image, the mean CLIP image cosine similarity to the user photos (whole images, the paper's)."""
    if isinstance(photos, Image.Image) or isinstance(images, Image.Image):
        raise TypeError("images and photos must be lists of PIL images; wrap a single image in a list")
    if len(photos) == 0:
        raise ValueError("no photos to compare with: image alignment needs the concept's photos (concept.photos)")
    if len(images) == 0:
        raise ValueError("no images to score")
    return (world.image_features(images) @ world.image_features(photos).T).mean(1).numpy()


def object_alignment(world, images: Sequence[Image.Image], detections, noun: str,
                     photo_crops: Sequence[Image.Image]) -> np.ndarray:
    """Per image, the mean CLIP image cosine similarity between the detected ``noun``'s crop and the
    photos' object crops: image alignment on the object, not on the background it was photographed
    on. NaN where ``noun`` is not detected."""
    out = np.full(len(images), np.nan)
    idx = [k for k, d in enumerate(detections) if best_box(d, noun) is not None]
    if idx:
        crops = [crop(images[k], best_box(detections[k], noun)) for k in idx]
        out[idx] = (world.image_features(crops) @ world.image_features(list(photo_crops)).T).mean(1).numpy()
    return out


def coi_found(detections, objects: Sequence[str]) -> float:
    """CoI likelihood of one image, as the official evaluation defines it: is the prompt's last named
    object (``objects[-1]``) detected?"""
    return float(found(detections, objects[-1]))


def all_found(detections, objects: Sequence[str]) -> float:
    """Is every named object of the prompt detected?"""
    return float(all(found(detections, o) for o in objects))


