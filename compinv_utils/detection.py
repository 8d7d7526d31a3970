"""Detections: ``(label, (x0, y0, x1, y1) in [0, 1], score)`` per object, the detectors that make them (the toy
world's and DETR) and the crops cut from them."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image


Detection = tuple[str, tuple[float, float, float, float], float]  # (label, (x0, y0, x1, y1) in [0, 1], score)


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


def toy_detector(det, device):
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


def detr_detector(model, processor, device, dtype):
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
