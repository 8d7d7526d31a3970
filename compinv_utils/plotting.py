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
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height) if suptitle else None)  # a suptitle gets 0.35 inch
    if suptitle:
        fig.suptitle(suptitle, fontsize=10, y=1 - 0.08 / height, va="top")
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
                       size: float = 1.3, suptitle: str | None = None, boxes: Sequence | None = None,
                       scale: str = "shared"):
    """Per-token attention maps over an image. ``maps``: array ``(rows, cols, h, w)`` (or ``(cols, h, w)``);
    ``image``: one image, or a list with one image per row. ``boxes``: per row, one ``(x0, y0, x1, y1)`` box (in
    [0, 1]) or None per column, drawn as the target of that column's word. ``scale="shared"``: one colour scale
    for every map, from 0 to the largest value, with a colour bar, so that maps can be compared; ``"each"``:
    every map scaled to its own maximum (shapes only)."""
    if scale not in ("shared", "each"):
        raise ValueError(f"scale must be 'shared' or 'each', got {scale!r}")
    maps = np.asarray(maps, dtype=float)
    if maps.ndim == 3:
        maps = maps[None]
    rows, cols = maps.shape[:2]
    images = list(image) if isinstance(image, (list, tuple)) else [image] * rows
    if len(images) != rows:
        raise ValueError(f"{len(images)} images for {rows} rows of maps")
    if boxes is not None and len(boxes) != rows:
        raise ValueError(f"{len(boxes)} rows of boxes for {rows} rows of maps")
    vmax = float(np.nanmax(maps)) if scale == "shared" and np.isfinite(maps).any() else None
    width = (cols + 1) * size + (0.8 if vmax is not None else 0.0)  # room on the right for the colour bar
    fig, axes = plt.subplots(rows, cols + 1, figsize=(width, rows * size * 1.15), squeeze=False, dpi=DPI)
    shown = None
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
            shown = ax.imshow(maps[r, c], cmap="inferno", alpha=0.7, extent=(0, w, h, 0), interpolation="bilinear",
                              vmin=0 if vmax is not None else None, vmax=vmax)
            box = boxes[r][c] if boxes is not None and c < len(boxes[r]) else None
            if box is not None:
                x0, y0, x1, y1 = box
                ax.add_patch(plt.Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                           edgecolor="#00e5ff", linewidth=1.2, linestyle="--"))
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    right = 1 - 0.8 / width if vmax is not None else 1
    fig.tight_layout(rect=(0, 0, right, 1 - 0.3 / (rows * size * 1.15 + 0.3) if suptitle else 1))
    if vmax is not None and shown is not None:
        top, bottom = axes[0, -1].get_position().y1, axes[-1, -1].get_position().y0
        cax = fig.add_axes((right + 0.1 / width, bottom, 0.12 / width, top - bottom))
        bar = fig.colorbar(shown, cax=cax)
        bar.set_label("attention", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def place_labels(ax, xy, labels: Sequence[str], fontsize: float = 7, color: str = "black", **kwargs) -> list:
    """Write ``labels`` beside the points ``xy`` ``(N, 2)`` (data coordinates), each at the first of eight
    offsets where it overlaps no label already placed (greedy; the first offset is kept when none is
    free). Returns the text objects."""
    fig = ax.figure
    fig.canvas.draw()  # the axis limits and the renderer, to measure the labels
    renderer = fig.canvas.get_renderer()
    offsets = [(4, 3), (4, -10), (-4, 3), (-4, -10), (0, 8), (0, -14), (10, -3), (-10, -3)]
    placed, texts = [], []
    for (x, y), label in zip(np.asarray(xy, dtype=float), labels):
        for dx, dy in offsets:
            t = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=color,
                            ha="left" if dx >= 0 else "right", **kwargs)
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            t.remove()
        else:
            t = ax.annotate(label, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=fontsize,
                            color=color, **kwargs)
            box = t.get_window_extent(renderer)
        placed.append(box)
        texts.append(t)
    return texts
