"""Measure the toy world against its quality bars and write the figures to a JSON file.

    python -m compinv_utils.toy.evaluate --out data/toy/quality.json

Held-out material only: rendered scenes with seeds from 10,000,000 on (training used 0..n-1) and
noun pairs that never appear together in training (``render.HELD_OUT_PAIRS``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import write_text
from ..layout import box_iou
from ..metrics import found, image_alignment
from . import render

EVAL_SEED = 10_000_000


def average_precision(scores: np.ndarray, hits: np.ndarray, n_positive: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+) of ranked detections."""
    if n_positive == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = hits[order].astype(float)
    recall = np.concatenate([[0], np.cumsum(tp) / n_positive])
    precision = np.concatenate([[1], np.cumsum(tp) / np.arange(1, len(tp) + 1)])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def detection_map(detections: list[list], truths: list[list], labels: list[str], iou: float = 0.5) -> dict:
    """mAP@iou. ``detections[i]``: ``[(label, box, score)]``; ``truths[i]``: ``[(label, box)]``.

    A detection is a hit when its image has an unmatched ground-truth box of that label with IoU >= iou.
    """
    per_class = {}
    for lab in labels:
        scores, hits, n_pos = [], [], 0
        for dets, gts in zip(detections, truths):
            gt = [b for l, b in gts if l == lab]
            n_pos += len(gt)
            used = [False] * len(gt)
            for l, box, s in sorted((d for d in dets if d[0] == lab), key=lambda d: -d[2]):
                best, j = 0.0, -1
                for k, g in enumerate(gt):
                    v = box_iou(box, g)
                    if v > best and not used[k]:
                        best, j = v, k
                ok = best >= iou
                if ok:
                    used[j] = True
                scores.append(s)
                hits.append(ok)
        per_class[lab] = average_precision(np.array(scores), np.array(hits, bool), n_pos)
    vals = [v for v in per_class.values() if not np.isnan(v)]
    return {"mAP": float(np.mean(vals)), "per_class": per_class}


def eval_detector(world, n: int = 500) -> dict:
    images, truths = [], []
    for i in range(n):
        img, boxes = render.render_scene(seed=EVAL_SEED + i, exclude_held_out=False)
        images.append(img)
        truths.append(boxes)
    dets = world.detect(images, threshold=0.05)
    return detection_map(dets, truths, world.concepts) | {"n_scenes": n}


def eval_clip_retrieval(world, n: int = 500, group: int = 100) -> dict:
    """Top-1 caption retrieval: in groups of ``group`` held-out scenes, the image's most similar caption
    (full captions: every attribute named) must be its own (an identical caption string counts)."""
    correct = 0
    for g in range(0, n, group):
        scenes = [render.sample_scene(EVAL_SEED + 50_000 + i, exclude_held_out=False) for i in range(g, g + group)]
        caps = [render.caption(s, i, render.FULL) for i, s in enumerate(scenes)]
        imgs = [render.draw_scene(s)[0] for s in scenes]
        sim = world.image_features(imgs) @ world.text_features(caps).T
        best = sim.argmax(1).tolist()
        correct += sum(caps[b] == caps[i] for i, b in enumerate(best))
    return {"top1": correct / n, "n_scenes": n, "group": group, "captions": "full (all attributes named)"}


def eval_generation(world, per_noun: int = 8, per_pair: int = 4, seed: int = 0) -> dict:
    prompts, wants = [], []
    for noun in world.concepts:
        prompts += [f"a photo of {render.article(noun)}"] * per_noun
        wants += [(noun,)] * per_noun
    for a, b in render.HELD_OUT_PAIRS:
        prompts += [f"{render.article(a)} and {render.article(b)}"] * per_pair
        wants += [(a, b)] * per_pair
    images = []
    for i in tqdm(range(0, len(prompts), 32), desc="generate"):
        images += world.generate(prompts[i:i + 32], seed=seed + i, batch_size=32)
    dets = world.detect(images)
    single = [all(found(d, n) for n in w) for d, w in zip(dets, wants) if len(w) == 1]
    pair = [all(found(d, n) for n in w) for d, w in zip(dets, wants) if len(w) == 2]
    per_noun_rate = {}
    for d, w in zip(dets, wants):
        if len(w) == 1:
            per_noun_rate.setdefault(w[0], []).append(found(d, w[0]))
    return {"single_noun_detected": float(np.mean(single)), "held_out_pair_both_detected": float(np.mean(pair)),
            "per_noun": {k: float(np.mean(v)) for k, v in per_noun_rate.items()},
            "n_single": len(single), "n_pair": len(pair), "guidance_scale": world.guidance_scale,
            "steps": world.num_inference_steps}


def eval_speed(world, repeats: int = 2) -> dict:
    from ..world import load_world

    t = time.perf_counter()
    load_world("toy", device=world.device)
    load_s = time.perf_counter() - t
    world.generate(["a cat"] * 16, seed=0)  # warm-up
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        world.generate(["a photo of a cat and a kite"] * 16, seed=r)
        times.append(time.perf_counter() - t)
    return {"load_world_s": load_s, "generate_16x25_s": min(times), "torch_threads": torch.get_num_threads()}


def eval_inversion(world, n: int = 8, folder: str | os.PathLike | None = None) -> dict:
    """Plain textual inversion (default settings) of every concept of interest, saved under ``folder``
    (default ``data/toy/inversions/plain``, where chapter 01 finds them); image alignment of ``n``
    samples of "a photo of a S* <superclass>" vs ``n`` samples of "a photo of a <superclass>" to the photos."""
    from ..inversion import InversionConfig, invert, unload
    from ..world import TOY_DIR

    cfg = InversionConfig()
    folder = folder or TOY_DIR / "inversions" / "plain"
    out = {}
    for coi in world.concepts_of_interest:
        unload(world.pipe, coi.token)
        t = time.perf_counter()
        invert(world.pipe, coi.photos, coi.token, coi.superclass, cfg, progress=False).save(os.path.join(folder, coi.name))
        secs = time.perf_counter() - t
        with_tok = world.generate([f"a photo of a {coi.token} {coi.superclass}"] * n, seed=0)
        sup = world.generate([f"a photo of {render.article(coi.superclass)}"] * n, seed=0)
        out[coi.name] = {"with_token": float(image_alignment(world, with_tok, coi.photos).mean()),
                         "superclass": float(image_alignment(world, sup, coi.photos).mean()), "invert_s": round(secs, 1)}
        unload(world.pipe, coi.token)
    return {"per_concept": out, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "samples": n,
            "all_above_superclass": all(r["with_token"] > r["superclass"] for r in out.values())}


def main(argv=None):
    from ..world import load_world

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy/quality.json")
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: detector clip generation speed inversion")
    args = p.parse_args(argv)
    world = load_world("toy")
    old = json.loads(open(args.out).read()) if args.skip and os.path.exists(args.out) else {}
    res = old | {"hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {world.device}",
           "command": "python -m compinv_utils.toy.evaluate"}
    parts = {"detector": eval_detector, "clip": eval_clip_retrieval, "generation": eval_generation, "speed": eval_speed,
             "inversion": eval_inversion}
    for name, fn in parts.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        res[name] = fn(world)
        res[name]["eval_s"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps({k: v for k, v in res[name].items() if k not in ("per_class", "per_noun")}))
    write_text(args.out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
