"""Figures: image grids, boxes, embedding maps. Every helper returns a matplotlib figure."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

DPI = 100  # legible and still small PNGs in committed notebooks


def image_grid(images: Sequence[Image.Image], ncols: int = 8, titles: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None, size: float = 1.3, suptitle: str | None = None,
               boxes: Sequence[Sequence] | None = None):
    """A grid of images. ``boxes[i]``: ``[(label, (x0, y0, x1, y1) in [0, 1], score or None)]`` drawn on image i."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * (1.25 if titles else 1.05)),
                             squeeze=False, dpi=DPI)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if k >= n:
            ax.axis("off")
            continue
        im = images[k]
        ax.imshow(np.asarray(im), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
        if boxes is not None:
            draw_boxes(ax, boxes[k], im.size)
    if row_labels is not None:
        for r, lab in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(lab, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(rect=(0, 0, 1, 0.93) if suptitle else None)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def draw_boxes(ax, boxes, size, colours=("#ff2d2d", "#00e5ff", "#ffe100", "#7cff00")) -> None:
    """Draw ``[(label, (x0, y0, x1, y1), score)]`` boxes (normalised) on an axis showing an image of ``size``."""
    w, h = size
    for k, item in enumerate(boxes):
        label, (x0, y0, x1, y1) = item[0], item[1]
        score = item[2] if len(item) > 2 else None
        c = colours[k % len(colours)]
        ax.add_patch(plt.Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                   edgecolor=c, linewidth=1.2))
        text = label if score is None else f"{label} {score:.2f}"
        inside = y0 < 0.12  # no room above the box: write the label just inside its top edge
        ax.text(x0 * w - 0.5, y0 * h + (0.2 if inside else -0.7), text, color="black", fontsize=5.5,
                va="top" if inside else "bottom", clip_on=True, bbox=dict(facecolor=c, alpha=0.85, pad=0.6, linewidth=0))


def bar_chart(values: dict[str, float], title: str = "", ylabel: str = "", threshold: float | None = None):
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(values)), 2.6), dpi=DPI)
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    if threshold is not None:
        ax.axhline(threshold, color="crimson", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    return fig


def attention_overlays(image: Image.Image | Sequence[Image.Image], maps, titles: Sequence[str], row_labels: Sequence[str] | None = None,
                       size: float = 1.3, suptitle: str | None = None):
    """Per-token attention maps over an image. ``maps``: array ``(rows, cols, h, w)`` (or ``(cols, h, w)``);
    ``image``: one image, or a list with one image per row."""
    maps = np.asarray(maps, dtype=float)
    if maps.ndim == 3:
        maps = maps[None]
    rows, cols = maps.shape[:2]
    images = list(image) if isinstance(image, (list, tuple)) else [image] * rows
    if len(images) != rows:
        raise ValueError(f"{len(images)} images for {rows} rows of maps")
    fig, axes = plt.subplots(rows, cols + 1, figsize=((cols + 1) * size, rows * size * 1.15), squeeze=False, dpi=DPI)
    for r in range(rows):
        image = images[r]
        w, h = image.size
        axes[r, 0].imshow(np.asarray(image), interpolation="nearest")
        axes[r, 0].set_title("image" if r == 0 else "", fontsize=7)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
        for c in range(cols):
            ax = axes[r, c + 1]
            ax.imshow(np.asarray(image.convert("L")), cmap="gray", alpha=0.5, extent=(0, w, h, 0))
            ax.imshow(maps[r, c], cmap="inferno", alpha=0.65, extent=(0, w, h, 0), interpolation="bilinear")
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (rows * size * 1.15 + 0.3)) if suptitle else None)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig
