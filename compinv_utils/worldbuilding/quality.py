"""Measure the toy world against its quality bars and write the figures to a JSON file.

    python -m compinv_utils.worldbuilding.quality --out data/toy/quality.json

Held-out material only: rendered scenes with seeds from 10,000,000 on (training used 0..n-1) and
noun pairs that never appear together in training (``render.HELD_OUT_PAIRS``).

Besides the quality bars, parts measure the prerequisites the paper's argument needs:
word-specific cross-attention (``attention``), a concept's look on the object (``look``; ``look_words``:
whether the world draws that look when words name it, the ceiling of ``look``; ``attribute_words``: whether
the toy CLIP, the text encoder and the generator tell pattern words apart; ``clip_words``: its first two alone)
and an FID-style sample quality on toy CLIP features (``quality``). ``--skip`` leaves parts out and ``--only``
measures the parts it names; either merges what it measures into the existing file, e.g.:

    python -m compinv_utils.worldbuilding.quality --only detector generation
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..detection import best_box, crop
from ..files import write_text
from ..guidance import GuidanceConfig, guided_generate
from ..layout import box_iou, box_to_mask
from ..maths import ratio
from ..measures import found, image_alignment, object_alignment
from ..paths import shown_path
from ..prompts import pair_prompt
from ..tokens import padded_ids
from ..toy import render

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


def detector_on_pairs(world, per_pair: int = 8) -> dict:
    """The instrument check behind the held-out-pair bar: how often the detector finds both nouns in *renderings*
    of each held-out pair and of :func:`seen_pairs` (``per_pair`` scenes each), as drawn and through the VAE. If it
    misses renderings of a pair, a miss in that pair's generated images says nothing about the generator."""
    out = {}
    for name, pairs in (("held_out", list(render.HELD_OUT_PAIRS)), ("seen", seen_pairs())):
        images, wants = [], []
        for a, b in pairs:
            for k in range(per_pair):
                images.append(render.render_scene([a, b], seed=EVAL_SEED + 600_000 + k, exclude_held_out=False)[0])
                wants.append((a, b))
        row = {}
        for kind, ims in (("rendered", images), ("vae_roundtrip", vae_roundtrip(world, images))):
            both = [found(d, a) and found(d, b) for d, (a, b) in zip(world.detect(ims), wants)]
            row[kind] = float(np.mean(both))
            row[f"per_pair_{kind}"] = {f"{a} + {b}": float(np.mean(both[i * per_pair:(i + 1) * per_pair]))
                                       for i, (a, b) in enumerate(pairs)}
        out[name] = row | {"n": len(images)}
    return out


def eval_detector(world, n: int = 500, per_pair: int = 8) -> dict:
    """mAP on ``n`` rendered scenes and their VAE round trips, and (``per_pair`` > 0) :func:`detector_on_pairs`."""
    images, truths = [], []
    for i in range(n):
        img, boxes = render.render_scene(seed=EVAL_SEED + i, exclude_held_out=False)
        images.append(img)
        truths.append(boxes)
    dets = world.detect(images, threshold=0.05)
    # generated images are decoded by the VAE: the detector must read its round trips as well as renderings
    decoded = world.detect(vae_roundtrip(world, images), threshold=0.05)
    res = detection_map(dets, truths, world.nouns) | {
        "mAP_vae_roundtrip": detection_map(decoded, truths, world.nouns)["mAP"], "n_scenes": n}
    return res | ({"pairs_both_found": detector_on_pairs(world, per_pair)} if per_pair > 0 else {})


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


def _generate_and_detect(world, prompts: list[str], seed: int, desc: str, batch: int = 32) -> list:
    """Detections in the images of ``prompts`` (image ``i`` from seed ``seed + i``), generated in batches."""
    images = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc):
        images += world.generate(prompts[i:i + batch], seed=seed + i, batch_size=batch)
    return world.detect(images) if images else []


def seen_pairs(n: int = 16) -> list[tuple[str, str]]:
    """``n`` noun pairs that the training data does contain (a fixed draw): the reference for held-out pairs."""
    seen = [p for p in itertools.combinations(sorted(render.NOUNS), 2) if not render.is_held_out(*p)]
    return [seen[i] for i in np.random.default_rng(EVAL_SEED).choice(len(seen), n, replace=False)]


def eval_generation(world, per_noun: int = 8, per_pair: int = 4, seed: int = 0, n_seen_pairs: int = 16) -> dict:
    """Single nouns and held-out pairs ("a cat and a kite") detected in generated images; as a reference for the
    held-out pairs, ``n_seen_pairs`` pairs the training data contains, in the same prompt form (generated after
    the others, from their own seeds, so the first two numbers do not depend on them)."""
    prompts, wants = [], []
    for noun in world.nouns:
        prompts += [f"a photo of {render.article(noun)}"] * per_noun
        wants += [(noun,)] * per_noun
    for a, b in render.HELD_OUT_PAIRS:
        prompts += [pair_prompt(a, b)] * per_pair
        wants += [(a, b)] * per_pair
    dets = _generate_and_detect(world, prompts, seed, "generate")
    single = [all(found(d, n) for n in w) for d, w in zip(dets, wants) if len(w) == 1]
    pair = [all(found(d, n) for n in w) for d, w in zip(dets, wants) if len(w) == 2]
    per_noun_rate = {}
    for d, w in zip(dets, wants):
        if len(w) == 1:
            per_noun_rate.setdefault(w[0], []).append(found(d, w[0]))
    seen_wants = [p for p in seen_pairs(n_seen_pairs) for _ in range(per_pair)]
    seen_dets = _generate_and_detect(world, [pair_prompt(a, b) for a, b in seen_wants], seed + 100_000,
                                     "generate (seen pairs)")
    seen = [all(found(d, n) for n in w) for d, w in zip(seen_dets, seen_wants)]
    return {"single_noun_detected": float(np.mean(single)), "held_out_pair_both_detected": float(np.mean(pair)),
            "seen_pair_both_detected": float(np.mean(seen)) if seen else float("nan"), "n_seen_pair": len(seen),
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
    """Plain textual inversion (default settings, seed 0) of every concept of interest, saved under
    ``folder/seed0/<name>`` (default ``data/toy/inversions/plain``, where chapter 01 and :func:`eval_concept_look`
    find them); image alignment of ``n``
    samples of "a photo of a S* <superclass>" vs ``n`` samples of "a photo of a <superclass>" to the photos."""
    from ..inversion import InversionConfig, invert, unload
    from ..world import TOY_DIR

    cfg = InversionConfig()
    folder = folder or TOY_DIR / "inversions" / "plain"
    out = {}
    for coi in world.concepts_of_interest:
        unload(world.pipe, coi.token)
        t = time.perf_counter()
        invert(world.pipe, coi.photos, coi.token, coi.superclass, cfg, progress=False).save(
            os.path.join(folder, f"seed{cfg.seed}", coi.name))
        secs = time.perf_counter() - t
        with_tok = world.generate([f"a photo of a {coi.token} {coi.superclass}"] * n, seed=0)
        sup = world.generate([f"a photo of {render.article(coi.superclass)}"] * n, seed=0)
        out[coi.name] = {"with_token": float(image_alignment(world, with_tok, coi.photos).mean()),
                         "superclass": float(image_alignment(world, sup, coi.photos).mean()), "invert_s": round(secs, 1)}
        unload(world.pipe, coi.token)
    return {"per_concept": out, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "samples": n,
            "all_above_superclass": all(r["with_token"] > r["superclass"] for r in out.values())}


# ---------------------------------------------------------------------------------------------
# The prerequisites of the paper's argument, measured directly
# ---------------------------------------------------------------------------------------------

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


def _clipped(box) -> tuple[float, float, float, float]:
    """A detected box clipped to [0, 1] (the detector's boxes may overhang the image slightly)."""
    x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in box)
    return x0, y0, max(x1, x0 + 1e-3), max(y1, y0 + 1e-3)


def training_pairs(world, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` pairs of the world's nouns that training shows together (never a held-out pair), drawn
    without replacement (with replacement only when more are asked for than exist), each in a random
    order; deterministic in ``seed``."""
    held = {tuple(sorted(p)) for p in world.held_out_pairs}
    pairs = [p for p in itertools.combinations(world.nouns, 2) if tuple(sorted(p)) not in held]
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(pairs), n, replace=n > len(pairs)))
    return [pairs[i] if rng.random() < 0.5 else pairs[i][::-1] for i in idx]


def box_share(attn: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of a word's attention mass ``attn`` ``(h, w)`` inside a 0/1 box ``mask`` ``(h, w)``."""
    return float(ratio((attn * mask).sum(), attn.sum()))


def map_iou(attn: torch.Tensor, mask: torch.Tensor, threshold: float = 0.4) -> float:
    """DAAM-style IoU: the map ``(h, w)`` binarised at ``threshold`` x its maximum, against a 0/1 ``mask``."""
    binary = attn >= threshold * attn.max()
    m = mask > 0.5
    return float((binary & m).sum() / (binary | m).sum().clamp(min=1))


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two maps after subtracting each one's mean (Pearson correlation); in [-1, 1]."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(ratio(a @ b, a.norm() * b.norm()))


def eval_attention_localisation(world, n_pairs: int = 24, seed: int = 0, threshold: float = 0.4,
                                batch_size: int = 8) -> dict:
    """Word-specific cross-attention: do a noun's maps fall on its own object?

    Generates "a A and a B" for ``n_pairs`` pairs of nouns that training shows together (plain
    sampling; per word, its conditional cross-attention averaged over all denoising steps at the
    guidance resolution) and detects both nouns. On images where both are found, per noun: the share
    of its attention mass inside its own detected box and inside the partner's box, and the DAAM-style
    IoU of its map (binarised at ``threshold`` x max) with its own box; per image, the centred cosine
    between the two nouns' maps. ``uniform_own_share``: the own share that attention spread evenly would
    give (the box's area fraction), the chance level of ``own_share``.
    """
    pairs = training_pairs(world, n_pairs, seed)
    out = guided_generate(world, [pair_prompt(a, b) for a, b in pairs], [list(p) for p in pairs],
                          [FULL_BOX, FULL_BOX], seed=seed, config=GuidanceConfig(guided_steps=0),
                          batch_size=batch_size, record=True)
    h, w = out.maps.shape[-2:]
    own, partner, iou, uniform, cosine, position = [], [], [], [], [], []
    for k, ((a, b), d) in enumerate(zip(pairs, world.detect(out.images))):
        boxes = [best_box(d, a), best_box(d, b)]
        if None in boxes:
            continue
        masks = [box_to_mask(_clipped(bx), h, w) for bx in boxes]
        for i in range(2):
            m = out.maps[k, i].float()
            own.append(box_share(m, masks[i]))
            partner.append(box_share(m, masks[1 - i]))
            iou.append(map_iou(m, masks[i], threshold))
            uniform.append(float(masks[i].mean()))
            position.append(i)
        cosine.append(centred_cosine(out.maps[k, 0], out.maps[k, 1]))
    n = len(cosine)
    res = {"pairs": n_pairs, "n": n, "both_detected": n / n_pairs, "map_resolution": [int(h), int(w)],
           "iou_threshold": threshold, "steps": world.num_inference_steps}
    if n == 0:
        return res | {"note": "no image had both nouns detected; no attention measure"}
    own_a, partner_a, position = np.array(own), np.array(partner), np.array(position)
    res |= {"own_share": float(own_a.mean()), "partner_share": float(partner_a.mean()),
            "own_minus_partner": float((own_a - partner_a).mean()), "uniform_own_share": float(np.mean(uniform)),
            "iou": float(np.mean(iou)), "cosine": float(np.mean(cosine))}
    res["by_position"] = {name: {"own_share": float(own_a[position == i].mean()),
                                 "partner_share": float(partner_a[position == i].mean())}
                          for i, name in enumerate(("first_noun", "second_noun"))}
    return res


def eval_attention_on_renderings(world, n_pairs: int = 32, timesteps: Sequence[int] = (250, 500, 750), seed: int = 0,
                                 threshold: float = 0.4) -> dict:
    """Word-specific cross-attention measured without generating: does a noun attend to its own object in a
    *rendered* scene? For ``n_pairs`` noun pairs that training shows together, a rendered two-object scene
    is encoded, noised to each of ``timesteps`` and passed once through the UNet with "a A and a B"; per noun,
    its conditional cross-attention at the layers of the latent grid (8x8 in the committed world; averaged over heads, layers and timesteps) gives the
    share inside its own object's rendered mask and inside the partner's, and the DAAM-style IoU with its own
    mask. Unlike :func:`eval_attention_localisation` it needs no detected object, so it also measures a UNet
    that cannot yet draw the pair (the grounding ablation)."""
    from ..attention import AttentionStore, attention_store
    from ..tokens import word_positions

    pipe = world.pipe
    pairs = training_pairs(world, n_pairs, seed)
    scenes = [render.sample_scene(EVAL_SEED + seed * 1_000 + k, nouns=list(p)) for k, p in enumerate(pairs)]
    images = [render.draw_scene(sc)[0] for sc in scenes]
    size = int(pipe.unet.config.sample_size)  # the latent grid, the finest cross-attention maps
    masks = torch.tensor(np.stack([render.object_masks(sc, size) for sc in scenes]))  # (N, 2, S, S), scene order
    prompts = [pair_prompt(a, b) for a, b in pairs]
    dev, dtype = world.device, world.dtype
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(images).to(dev, dtype)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        cond, _ = pipe.encode_prompt(prompts, dev, 1, False)
        gen = torch.Generator("cpu").manual_seed(seed)
        store = AttentionStore(keep_similarity=False, resolutions=(size,))
        acc = None
        with attention_store(pipe.unet, store):
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=gen).to(dev, dtype)
                tt = torch.full((len(prompts),), int(t), device=dev, dtype=torch.long)
                pipe.unet(pipe.scheduler.add_noise(latents, noise, tt), tt, encoder_hidden_states=cond)
                step_maps = torch.stack([m.float() for m in store.maps[store.step].values()]).mean(0)  # (N, S*S, T)
                acc = step_maps if acc is None else acc + step_maps
    acc = (acc / len(timesteps)).cpu()
    own, partner, iou, uniform = [], [], [], []
    for k, ((a, b), sc) in enumerate(zip(pairs, scenes)):
        order = [o.noun for o in sc.objects]
        pos = word_positions(pipe.tokenizer, prompts[k], [a, b])
        for i, noun in enumerate((a, b)):
            m = acc[k, :, pos[i]].mean(-1).reshape(size, size)
            mine, other = masks[k, order.index(noun)].float(), masks[k, order.index((a, b)[1 - i])].float()
            own.append(box_share(m, mine))
            partner.append(box_share(m, other))
            iou.append(map_iou(m, (mine >= 0.5).float(), threshold))
            uniform.append(float(mine.mean()))
    own_a, partner_a = np.array(own), np.array(partner)
    return {"pairs": n_pairs, "timesteps": [int(t) for t in timesteps], "own_share": float(own_a.mean()),
            "partner_share": float(partner_a.mean()), "own_minus_partner": float((own_a - partner_a).mean()),
            "uniform_own_share": float(np.mean(uniform)), "iou": float(np.mean(iou)), "iou_threshold": threshold}


# -- attribute probe ------------------------------------------------------------------------------

PROBE_SIZE = 16  # object crops are resized to PROBE_SIZE x PROBE_SIZE pixels for the probe


class AttributeProbe(nn.Module):
    """A small CNN on an object crop ``(B, 3, PROBE_SIZE, PROBE_SIZE)`` in [-1, 1]: which palette colours
    are on the object (one logit per colour of ``render.COLOURS``: its colour and, when patterned, its
    second colour) and its pattern (one logit per ``render.PATTERNS``)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c, self.n_colours = channels, len(render.COLOURS)
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * c * (PROBE_SIZE // 4) ** 2, 128), nn.ReLU(),
            nn.Linear(128, self.n_colours + len(render.PATTERNS)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[:, :self.n_colours], out[:, self.n_colours:]

    @torch.no_grad()
    def read(self, crops: Sequence[Image.Image]) -> tuple[list[set[str]], list[str]]:
        """Per crop: the set of colours the probe sees on the object (logit > 0; at least the most likely
        one) and the most likely pattern."""
        if not crops:
            return [], []
        was = self.training
        self.eval()
        colours, patterns = self(crop_pixels(crops))
        self.train(was)
        names = list(render.COLOURS)
        sets = [{names[j] for j in np.nonzero(row > 0)[0]} or {names[int(row.argmax())]} for row in colours.numpy()]
        return sets, [render.PATTERNS[j] for j in patterns.argmax(1).tolist()]


def crop_pixels(crops: Sequence[Image.Image]) -> torch.Tensor:
    """Object crops as the probe's input ``(N, 3, PROBE_SIZE, PROBE_SIZE)`` in [-1, 1]."""
    arr = np.stack([np.asarray(c.convert("RGB").resize((PROBE_SIZE, PROBE_SIZE), Image.BILINEAR), np.float32)
                    for c in crops])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def vae_roundtrip(world, images: Sequence[Image.Image], batch_size: int = 100) -> list[Image.Image]:
    """``images`` encoded by the pipeline's VAE and decoded again (latent mean): what the decoder can show
    of them; generated images pass through the same decoder."""
    vae, out = world.pipe.vae, []
    for i in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), np.float32)).permute(2, 0, 1)
                         for im in images[i:i + batch_size]]) / 127.5 - 1
        z = vae.encode(x.to(world.device, vae.dtype)).latent_dist.mode()
        out += world.pipe.image_processor.postprocess(vae.decode(z).sample, output_type="pil")
    return out


def _probe_targets(objs: Sequence[render.SceneObject]) -> tuple[torch.Tensor, torch.Tensor]:
    names = list(render.COLOURS)
    colours = torch.zeros(len(objs), len(names))
    for k, o in enumerate(objs):
        colours[k, names.index(o.colour)] = 1
        if o.pattern != "plain":
            colours[k, names.index(o.colour2)] = 1
    return colours, torch.tensor([render.PATTERNS.index(o.pattern) for o in objs])


def _probe_accuracy(probe: AttributeProbe, crops, objs) -> dict:
    """Accuracy of the probe on ``crops`` of the rendered objects ``objs`` (see :func:`train_attribute_probe`)."""
    sets, patterns = probe.read(crops)
    truth = [{o.colour} | ({o.colour2} if o.pattern != "plain" else set()) for o in objs]
    second = [o.colour2 in s for s, o in zip(sets, objs) if o.pattern != "plain"]
    return {"colour": float(np.mean([o.colour in s for s, o in zip(sets, objs)])),
            "colour2": float(np.mean(second)) if second else float("nan"),
            "colour_set_exact": float(np.mean([s == t for s, t in zip(sets, truth)])),
            "pattern": float(np.mean([p == o.pattern for p, o in zip(patterns, objs)])),
            "colours_named_per_crop": float(np.mean([len(s) for s in sets]))}


def train_attribute_probe(world, n_scenes: int = 2400, epochs: int = 12, channels: int = 32, test_frac: float = 0.2,
                          seed: int = 0) -> tuple[AttributeProbe, dict]:
    """Train :class:`AttributeProbe` on rendered single-object scenes, where the renderer knows each object's
    colour, second colour and pattern. Each scene gives two training crops (ground-truth box): the
    rendering and its VAE round trip (:func:`vae_roundtrip`), so that the probe reads decoded images as
    generated ones are. Returns the probe and its accuracy on the held-out ``test_frac`` of the scenes,
    on renderings (``rendered``) and on their VAE round trips (``vae_roundtrip``, what a generated object
    can show at best): ``colour`` / ``colour2`` = the object's colour / second colour is among the colours
    the probe sees (second colour: patterned objects only), ``colour_set_exact`` = it sees exactly the
    object's colours, ``pattern`` = 4-way accuracy (chance 0.25)."""
    scenes = [render.sample_scene(EVAL_SEED + 400_000 + seed * n_scenes + i, n_objects=1) for i in range(n_scenes)]
    drawn = [render.draw_scene(s) for s in scenes]
    images = [im for im, _ in drawn]
    decoded = vae_roundtrip(world, images)
    boxes = [objs[0][1] for _, objs in drawn]
    objs = [s.objects[0] for s in scenes]
    crops = [crop(im, b) for im, b in zip(images, boxes)]
    crops_rt = [crop(im, b) for im, b in zip(decoded, boxes)]
    n_test = max(1, int(round(test_frac * n_scenes)))
    tr = slice(0, n_scenes - n_test)
    te = slice(n_scenes - n_test, n_scenes)
    x = torch.cat([crop_pixels(crops[tr]), crop_pixels(crops_rt[tr])])
    colours, patterns = _probe_targets(objs[tr])
    colours, patterns = torch.cat([colours, colours]), torch.cat([patterns, patterns])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttributeProbe(channels)
        opt = torch.optim.Adam(probe.parameters(), 3e-3)
        n, bs = len(x), 64
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((n + bs - 1) // bs))
        for _ in range(epochs):
            for idx in torch.randperm(n).split(bs):
                xb = x[idx].flip(-1) if torch.rand(()) < 0.5 else x[idx]
                c_logits, p_logits = probe(xb)
                loss = F.binary_cross_entropy_with_logits(c_logits, colours[idx]) * len(render.COLOURS) + \
                    F.cross_entropy(p_logits, patterns[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    probe.eval()
    acc = {"rendered": _probe_accuracy(probe, crops[te], objs[te]),
           "vae_roundtrip": _probe_accuracy(probe, crops_rt[te], objs[te]),
           "n_train_scenes": n_scenes - n_test, "n_test_scenes": n_test, "epochs": epochs, "crop_px": PROBE_SIZE}
    return probe, acc


def _look(probe: AttributeProbe, crops, spec: render.ConceptSpec) -> dict:
    """Fractions of ``crops`` in which the probe sees the concept's colour, second colour, pattern, colour and
    pattern together (``colour_pattern``: what the world's quality bar asks) and all three (``all``: stricter)."""
    if not crops:
        return {"colour": float("nan"), "colour2": float("nan"), "pattern": float("nan"),
                "colour_pattern": float("nan"), "all": float("nan"), "n": 0}
    sets, patterns = probe.read(crops)
    c = np.array([spec.colour in s for s in sets])
    c2 = np.array([spec.colour2 in s for s in sets])
    p = np.array([q == spec.pattern for q in patterns])
    return {"colour": float(c.mean()), "colour2": float(c2.mean()), "pattern": float(p.mean()),
            "colour_pattern": float((c & p).mean()), "all": float((c & c2 & p).mean()), "n": len(crops)}


def eval_concept_look(world, inversions_root: str | os.PathLike | None = None, samples: int = 8, seed: int = 0,
                      probe: AttributeProbe | None = None, probe_scenes: int = 2400) -> dict:
    """A concept's look on the object itself, not on the scene it was photographed in.

    For each concept of interest with a plain inversion in ``inversions_root/seed0/<name>/`` (default
    ``data/toy/inversions/plain``): ``samples`` images of "a photo of a <token> <class>" and, as the
    floor, of "a photo of a <class>" (same seeds); the class is detected and its box cropped.
    (i) ``alignment``: mean CLIP cosine between the generated object crops and the photos' object crops
    (:func:`metrics.object_alignment`), concept vs superclass. (ii) ``look``: the fraction of crops in which
    an attribute probe (:func:`train_attribute_probe`, trained on ``probe_scenes`` renderings unless a
    ``probe`` is given) sees the concept's colour, second colour and pattern, concept vs superclass; and,
    as references, the same on the photos' own object crops (``photos``: a check of the probe) and on the
    photos passed through the VAE (``photos_vae_roundtrip``: the most a generated object could show,
    with its alignment to the photo crops).
    """
    from ..inversion import load_embedding, unload
    from ..world import TOY_DIR

    root = Path(inversions_root) if inversions_root is not None else TOY_DIR / "inversions" / "plain"
    probe, probe_info = _probe_or_shared(world, probe, probe_scenes, seed)
    specs = {c.name: c for c in render.CONCEPTS}
    per, notes = {}, []
    for coi in world.concepts_of_interest:
        path = root / "seed0" / coi.name / "learned_embeds.safetensors"
        if not path.is_file():
            notes.append(f"{coi.name}: skipped, no inversion at {path}")
            continue
        load_embedding(world.pipe, path, coi.token)
        try:
            with_tok = world.generate([f"a photo of a {coi.token} {coi.superclass}"] * samples, seed=seed)
        finally:
            unload(world.pipe, coi.token)
        sup = world.generate([f"a photo of {render.article(coi.superclass)}"] * samples, seed=seed)
        photo_crops = world.photo_crops(coi)
        row = {}
        for name, images in (("with_token", with_tok), ("superclass", sup)):
            dets, crops = _object_crops(world, images, coi.superclass)
            align = object_alignment(world, images, dets, coi.superclass, photo_crops)
            row[name] = {"detected": len(crops) / samples,
                         "alignment": float(np.nanmean(align)) if crops else float("nan"),
                         "look": _look(probe, crops, specs[coi.name])}
        row["alignment_diff"] = row["with_token"]["alignment"] - row["superclass"]["alignment"]
        row["look_all_diff"] = row["with_token"]["look"]["all"] - row["superclass"]["look"]["all"]
        row["photos"] = {"look": _look(probe, photo_crops, specs[coi.name])}
        drawn = [render.draw_scene(sc) for sc in render.concept_scenes(specs[coi.name])]
        boxes = [next(b for noun, b in objs if noun == coi.superclass) for _, objs in drawn]
        decoded = [crop(im, b) for im, b in zip(vae_roundtrip(world, [im for im, _ in drawn]), boxes)]
        row["photos_vae_roundtrip"] = {
            "alignment": float((world.image_features(decoded) @ world.image_features(photo_crops).T).mean()),
            "look": _look(probe, decoded, specs[coi.name])}
        per[coi.name] = row

    def mean(get) -> float:
        return _mean_detected(map(get, per.values()))

    res = {"per_concept": per, "samples": samples, "steps": world.num_inference_steps, "inversions": shown_path(root),
           "probe": probe_info}
    if per:
        groups = ("with_token", "superclass", "photos", "photos_vae_roundtrip")
        summary = {f"alignment_{g}": mean(lambda r: r[g]["alignment"]) for g in groups if g != "photos"}
        summary["alignment_diff"] = mean(lambda r: r["alignment_diff"])
        summary["concepts_alignment_above_superclass"] = int(sum(r["alignment_diff"] > 0 for r in per.values()))
        summary |= {f"look_{a}_{g}": mean(lambda r: r[g]["look"][a])
                    for g in groups for a in ("colour", "colour2", "pattern", "colour_pattern", "all")}
        summary["concepts_look_above_superclass"] = int(sum(r["look_all_diff"] > 0 for r in per.values()))
        # the bars: object-crop alignment at least 0.15 above the superclass's, and colour + pattern on the object
        # in at least 60 % of the samples, each for at least 4 of 5 concepts
        summary["concepts_alignment_above_superclass_by_0.15"] = int(sum(r["alignment_diff"] >= 0.15
                                                                          for r in per.values()))
        summary["concepts_colour_pattern_at_least_0.6"] = int(sum(r["with_token"]["look"]["colour_pattern"] >= 0.6
                                                                  for r in per.values()))
        res["summary"] = summary | {"concepts": len(per)}
    if notes:
        res["notes"] = notes
    return res


def _object_crops(world, images, noun: str) -> tuple[list, list]:
    """The detections of ``images`` and the crops of ``noun``'s best box in each image where it was found."""
    dets = world.detect(images)
    boxes = [best_box(d, noun) for d in dets]
    return dets, [crop(im, b) for im, b in zip(images, boxes) if b is not None]


def _mean_detected(vals) -> float:
    """Mean over the concepts whose object was detected at least once (NaN entries skipped)."""
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipeline -> {(n_scenes, seed): probe}


def _shared_probe(world, n_scenes: int, seed: int) -> tuple[AttributeProbe, dict]:
    """:func:`train_attribute_probe`, trained once per pipeline, size and seed in a process (``look`` and
    ``look_words`` read the same probe); forgotten with the pipeline."""
    probes = _PROBES.setdefault(world.pipe, {})
    if (n_scenes, seed) not in probes:
        probes[(n_scenes, seed)] = train_attribute_probe(world, n_scenes=n_scenes, seed=seed)
    return probes[(n_scenes, seed)]


def _probe_or_shared(world, probe: AttributeProbe | None, n_scenes: int, seed: int) -> tuple[AttributeProbe, dict | str]:
    """The probe to read crops with and what to record of it: a given probe ("given"), or the shared one
    (:func:`_shared_probe`) and its accuracy."""
    return (probe, "given") if probe is not None else _shared_probe(world, n_scenes, seed)


def eval_look_from_words(world, samples: int = 8, seed: int = 0, probe: AttributeProbe | None = None,
                         probe_scenes: int = 2400) -> dict:
    """What the world draws when words name each concept's look — what the ``look`` bar presumes it can draw.

    For each concept, ``samples`` images of its look in the caption grammar the UNet was trained on ("a photo
    of a purple striped cat") and, as the floor, of the plain superclass (same seeds); the attribute probe of
    :func:`eval_concept_look` reads the detected object's crop. If the world cannot draw colour and pattern
    from words, no inversion can be expected to put them on the object: the bar then measures the world,
    not the inversion."""
    probe, probe_info = _probe_or_shared(world, probe, probe_scenes, seed)
    per = {}
    for spec in render.CONCEPTS:
        row = {}
        for name, phrase in (("words", f"{spec.colour} {spec.pattern} {spec.base}"), ("superclass", spec.base)):
            prompt = f"a photo of {render.article(phrase)}"
            _, crops = _object_crops(world, world.generate([prompt] * samples, seed=seed), spec.base)
            row[name] = {"prompt": prompt, "detected": len(crops) / samples, "look": _look(probe, crops, spec)}
        per[spec.name] = row
    summary = {f"look_{a}_{g}": _mean_detected(r[g]["look"][a] for r in per.values())
               for g in ("words", "superclass") for a in ("colour", "pattern", "colour_pattern")}
    summary["concepts_colour_pattern_at_least_0.6_words"] = int(sum(r["words"]["look"]["colour_pattern"] >= 0.6
                                                                    for r in per.values()))
    return {"per_concept": per, "samples": samples, "steps": world.num_inference_steps,
            "probe": probe_info, "summary": summary | {"concepts": len(per)}}


def other_pattern(pattern: str) -> str:
    """The next pattern of ``render.PATTERNS`` after ``pattern``, plain skipped (striped -> dotted -> checked ->
    striped): the wrong pattern word :func:`eval_pattern_kept` names."""
    cycle = [p for p in render.PATTERNS if p != "plain"]
    return cycle[(cycle.index(pattern) + 1) % len(cycle)]


def eval_pattern_kept(world, n: int = 24, strengths: Sequence[float] = (0.2, 0.4, 0.6), seed: int = 0,
                      probe: AttributeProbe | None = None, probe_scenes: int = 2400,
                      other_strengths: Sequence[float] = (0.6, 0.8)) -> dict:
    """Does the UNet keep a pattern it is handed? ``n`` rendered single objects with a pattern are encoded,
    noised to each of ``strengths`` (the img2img strength: the share of the schedule run again) and denoised
    with the world's sampler and a caption that names colour and pattern ("a photo of a purple striped cat");
    the attribute probe then reads the pattern on the object's true box. ``rendered`` and ``vae_roundtrip``
    are the same reading on the renderings and on their VAE round trips (what the decoder keeps). A world
    whose denoiser erases a pattern even from light noise cannot draw one from words, nor through an
    inverted token: this part separates the UNet from the VAE and the probe.

    ``other_strengths``: the same, with the caption naming another pattern (:func:`other_pattern`:
    "a photo of a purple dotted cat" for a striped one); ``read_as_named`` is the share of objects then read as
    the pattern the words name. A UNet that reads pattern words moves objects towards the named pattern as the
    strength grows; one that ignores them keeps the rendered pattern, or loses it, whatever the words say."""
    from diffusers import StableDiffusionImg2ImgPipeline

    strengths = [float(x) for x in strengths]
    other_strengths = [float(x) for x in other_strengths]
    if not strengths or not all(0 < x <= 1 for x in strengths + other_strengths):
        raise ValueError(f"strengths must be in (0, 1], got {strengths} and other_strengths {other_strengths}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    probe, probe_info = _probe_or_shared(world, probe, probe_scenes, seed)
    scenes, i = [], 0
    while len(scenes) < n:
        s = render.sample_scene(EVAL_SEED + 500_000 + i, n_objects=1)
        i += 1
        if s.objects[0].pattern != "plain":
            scenes.append(s)
    drawn = [render.draw_scene(s) for s in scenes]
    images = [im for im, _ in drawn]
    boxes = [objs[0][1] for _, objs in drawn]
    truth = np.array([s.objects[0].pattern for s in scenes])
    prompts = [f"a photo of {render.article(f'{o.colour} {o.pattern} {o.noun}')}" for o in (s.objects[0] for s in scenes)]
    named = np.array([other_pattern(p) for p in truth])
    other_prompts = [f"a photo of {render.article(f'{o.colour} {q} {o.noun}')}"
                     for o, q in zip((s.objects[0] for s in scenes), named)]

    def reading(ims, other: bool = False) -> dict:
        _, patterns = probe.read([crop(im, b) for im, b in zip(ims, boxes)])
        patterns = np.array(patterns)
        res = {"pattern_kept": float((patterns == truth).mean()),
               "read_as": {p: int((patterns == p).sum()) for p in render.PATTERNS}}
        return res | ({"read_as_named": float((patterns == named).mean())} if other else {})

    img2img = StableDiffusionImg2ImgPipeline(**world.pipe.components)
    img2img.set_progress_bar_config(disable=True)
    res = {"rendered": reading(images), "vae_roundtrip": reading(vae_roundtrip(world, images))}
    for x, other in [(x, False) for x in strengths] + [(x, True) for x in other_strengths]:
        gen = torch.Generator(world.device).manual_seed(seed)
        out = img2img(other_prompts if other else prompts, image=images, strength=x,
                      num_inference_steps=world.num_inference_steps, guidance_scale=world.guidance_scale,
                      generator=gen).images
        res[f"strength_{x:g}" + ("_other_named" if other else "")] = reading(out, other)
    return res | {"n": n, "strengths": strengths, "other_strengths": other_strengths, "steps": world.num_inference_steps,
                  "guidance_scale": world.guidance_scale, "probe": probe_info,
                  "prompts": "a photo of a {colour} {pattern} {noun}; truth: the renderer's pattern"}


# -- sample quality -------------------------------------------------------------------------------


PATTERN_NOUNS = ("cat", "teddy", "pot", "chair", "car", "ball")  # nouns the pattern-from-words check draws


def pattern_variants(obj: render.SceneObject, background: str | None = None) -> list[str]:
    """The training-grammar caption of a single object with its colour named, once per pattern of
    ``render.PATTERNS`` ("a photo of a purple cat", "... purple striped cat", ...), the background appended
    when given: captions that differ in the pattern word alone."""
    out = []
    for pattern in render.PATTERNS:
        text = "a photo of " + render.describe(replace(obj, pattern=pattern), True, True)
        out.append(text + (" " + render.BACKGROUNDS[background] if background else ""))
    return out


TEXT_POSITIONS = {"pattern": 6, "noun": 7, "eos": 8}  # in "a photo of a {colour} {pattern} {noun}" (BOS at 0)


def _pattern_prompt_states(world, colours: Sequence[str], nouns: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """The text encoder's output ``(prompts, tokens, dim)`` for "a photo of a {colour} {pattern} {noun}", prompts
    ordered pattern-major (``render.PATTERNS`` without "plain"), then colour, then noun; and the named patterns."""
    tok, te = world.pipe.tokenizer, world.pipe.text_encoder
    named = [p for p in render.PATTERNS if p != "plain"]
    prompts = [f"a photo of {render.article(f'{c} {p} {n}')}" for p in named for c in colours for n in nouns]
    ids = padded_ids(tok, prompts, te.device)
    at = TEXT_POSITIONS["pattern"]
    words = [tok.convert_ids_to_tokens(int(i)) for i in ids[:, at]]
    if any(w.replace("</w>", "") not in named for w in words):
        raise ValueError(f"position {at} of the pattern prompts holds {sorted(set(words))}, not a pattern word")
    with torch.no_grad():
        return te(ids)[0].float().cpu(), named


def pattern_token_states(world, colours: Sequence[str] = tuple(render.COLOURS)[:6],
                         nouns: Sequence[str] = PATTERN_NOUNS, position: str = "pattern") -> torch.Tensor:
    """The text encoder's output (what the UNet's cross-attention reads) for "a photo of a {colour} {pattern}
    {noun}", for every named pattern (``render.PATTERNS`` without "plain"), colour and noun, at the pattern word,
    the noun after it or the end token (``position``, :data:`TEXT_POSITIONS`; a toy caption's words are one token
    each): ``(patterns, colours * nouns, dim)``. The text tower is causal, so the noun and the end token see the
    pattern word and the pattern word sees nothing after it."""
    if position not in TEXT_POSITIONS:
        raise ValueError(f"position must be one of {sorted(TEXT_POSITIONS)}, got {position!r}")
    states, named = _pattern_prompt_states(world, colours, nouns)
    return states[:, TEXT_POSITIONS[position]].view(len(named), len(colours) * len(nouns), -1)


def eval_clip_words(world, n: int = 240) -> dict:
    """Can the toy CLIP and its text tower tell pattern words apart? ``clip``: on ``n`` rendered single objects
    the toy CLIP picks, among the caption's four pattern variants (:func:`pattern_variants`), the one that
    matches the image (chance 0.25; the text tower learnt patterns only as far as its contrastive task needed
    them), and for comparison among its colour variants. ``text_states``: the cosine and the centred cosine
    (each frame's mean over the named patterns removed) between the text-encoder states of captions that differ
    in the pattern word, at that word (``cosine``), at the noun after it (``noun_cosine``) and at the end token
    (``eos_cosine``; :func:`pattern_token_states`; near 1: the UNet is handed nearly the same conditioning)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    names = list(render.PATTERNS)
    clip_conf, colour_hits = np.zeros((len(names), len(names)), int), 0
    palette = list(render.COLOURS)
    for i in range(n):
        scene = render.sample_scene(EVAL_SEED + 600_000 + i, n_objects=1)
        obj = scene.objects[0]
        feats = world.image_features([render.draw_scene(scene)[0]])
        sim = (feats @ world.text_features(pattern_variants(obj, scene.background)).T)[0]
        clip_conf[names.index(obj.pattern), int(sim.argmax())] += 1
        # the same choice for the colour word (the pattern kept), for comparison
        by_colour = [pattern_variants(replace(obj, colour=c), scene.background)[names.index(obj.pattern)]
                     for c in palette]
        colour_hits += palette[int((feats @ world.text_features(by_colour).T)[0].argmax())] == obj.colour
    colours, nouns = tuple(render.COLOURS)[:6], PATTERN_NOUNS  # pattern_token_states' frames, encoded once
    all_states, named = _pattern_prompt_states(world, colours, nouns)
    text_states = {"patterns": named, "positions": dict(TEXT_POSITIONS), "frames": len(colours) * len(nouns)}
    for position, at in TEXT_POSITIONS.items():
        states = all_states[:, at].view(len(named), len(colours) * len(nouns), -1)
        unit = F.normalize(states - states.mean(0, keepdim=True), dim=-1)
        centred = torch.einsum("pcd,qcd->pqc", unit, unit).mean(-1).numpy()
        raw_unit = F.normalize(states, dim=-1)
        raw = torch.einsum("pcd,qcd->pqc", raw_unit, raw_unit).mean(-1).numpy()
        key = "" if position == "pattern" else f"{position}_"
        text_states[f"{key}cosine"] = np.round(raw.astype(float), 3).tolist()
        text_states[f"{key}centred_cosine"] = np.round(centred.astype(float), 3).tolist()
    return {"patterns": names,
            "clip": {"accuracy": float(np.trace(clip_conf) / n), "confusion": clip_conf.tolist(), "n": n,
                     "chance": 1 / len(names), "colour_accuracy": colour_hits / n, "colour_chance": 1 / len(palette)},
            "text_states": text_states}


def eval_attribute_words(world, n: int = 240, per_prompt: int = 4, seed: int = 0,
                         probe: AttributeProbe | None = None, probe_scenes: int = 2400) -> dict:
    """Can the world tell pattern words apart, at each of the three places a word must pass to reach the
    object? The toy CLIP and the text encoder (``clip``, ``text_states``: :func:`eval_clip_words` on ``n``
    renderings) and the generator: ``generated``, "a photo of a {colour} {pattern} {noun}" for every pattern,
    :data:`PATTERN_NOUNS` and ``per_prompt`` seeds, the detected object's pattern read by the attribute
    probe: the confusion of named (rows) against read (columns) patterns."""
    if n < 1 or per_prompt < 1:
        raise ValueError(f"n and per_prompt must be at least 1, got n={n}, per_prompt={per_prompt}")
    res = eval_clip_words(world, n)
    names = res["patterns"]
    probe, probe_info = _probe_or_shared(world, probe, probe_scenes, seed)
    gen_conf = np.zeros((len(names), len(names)), int)
    colours = list(render.COLOURS)[:len(PATTERN_NOUNS)]
    for pi, pattern in enumerate(tqdm(names, desc="patterns from words")):
        for noun, colour in zip(PATTERN_NOUNS, colours):
            words = f"{colour} {noun}" if pattern == "plain" else f"{colour} {pattern} {noun}"
            _, crops = _object_crops(world, world.generate([f"a photo of {render.article(words)}"] * per_prompt,
                                                           seed=seed), noun)
            for read in probe.read(crops)[1]:
                gen_conf[pi, names.index(read)] += 1
    total = max(int(gen_conf.sum()), 1)
    res["generated"] = {"accuracy": float(np.trace(gen_conf) / total), "confusion": gen_conf.tolist(),
                        "read_plain": float(gen_conf[:, 0].sum() / total), "n": int(gen_conf.sum()),
                        "per_prompt": per_prompt, "nouns": list(PATTERN_NOUNS), "steps": world.num_inference_steps,
                        "guidance_scale": world.guidance_scale}
    res["probe"] = probe_info
    return res


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n, D)`` and ``(m, D)``:
    ``|mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½)``, as FID computes it (the real part of
    ``scipy.linalg.sqrtm``; a tiny ridge is added when the product is near singular). Never negative."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (n >= 2, D) of the same D, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(sa)) * 1e-6
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    d = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(np.real(covmean))
    return float(max(d, 0.0))


def eval_sample_quality(world, n: int = 256, seed: int = 0, batch_size: int = 32) -> dict:
    """FID-style sample quality (toy CLIP features, not Inception): the Fréchet distance between the toy
    CLIP's (L2-normalised) image features of ``n`` images generated from the captions of ``n`` held-out
    rendered scenes and of a reference set of ``n`` other held-out renderings. Two references against the
    same set: ``rendered_vs_rendered`` (the captioned scenes rendered: the distance that sampling ``n``
    scenes alone gives, the floor) and ``vae_roundtrip_vs_rendered`` (those renderings through the VAE:
    what the decoder alone costs). Small ``n`` biases all three upward; compare them at equal ``n``."""
    scenes = [render.sample_scene(EVAL_SEED + 200_000 + i) for i in range(n)]
    captions = [render.caption(s, EVAL_SEED + 200_000 + i) for i, s in enumerate(scenes)]
    rendered = [render.draw_scene(s)[0] for s in scenes]
    reference = [render.render_scene(seed=EVAL_SEED + 300_000 + i)[0] for i in range(n)]
    generated = []
    for i in tqdm(range(0, n, batch_size), desc="generate"):
        generated += world.generate(captions[i:i + batch_size], seed=seed + i, batch_size=batch_size)
    f_ref = world.image_features(reference).numpy()

    def distance(images) -> float:
        return frechet_distance(world.image_features(images).numpy(), f_ref)

    return {"frechet_distance": distance(generated), "rendered_vs_rendered": distance(rendered),
            "vae_roundtrip_vs_rendered": distance(vae_roundtrip(world, rendered)),
            "n": n, "feature_dim": int(f_ref.shape[1]), "steps": world.num_inference_steps,
            "features": "FID-style (toy CLIP image features, L2-normalised; not Inception)",
            "prompts": "captions of held-out rendered scenes (render.caption); reference: other held-out renderings"}


# -- what the inversion objective rewards ------------------------------------------------------------

NOISE_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # timestep bands of the loss comparison


def denoising_losses(world, images: Sequence[Image.Image], prompts: dict[str, Sequence[str]],
                     masks: np.ndarray | None = None, repeats: int = 8, bands=NOISE_BANDS, seed: int = 0) -> dict:
    """The loss textual inversion minimises (the UNet's noise-prediction MSE on an image's latent) for each set
    of ``prompts`` (name -> one prompt per image), on the same noise and timesteps for every set (a paired
    comparison). Each image is drawn ``repeats`` times in each band of ``bands`` (timesteps uniform in
    ``[lo, hi)``). ``masks``: ``(N, h, w)`` latent-grid coverage of a region; the loss inside it and outside it
    is reported too. Returns ``{name: {"band": [lo, hi], "all", "inside", "outside"} per band}``."""
    from ..inversion import prepare_photos

    pipe = world.pipe
    n = len(images)
    if any(len(v) != n for v in prompts.values()):
        raise ValueError(f"every prompt set needs one prompt per image ({n}); got "
                         f"{ {k: len(v) for k, v in prompts.items()} }")
    vae, unet, sched = pipe.vae, pipe.unet, pipe.scheduler
    pixels = prepare_photos(list(images), unet.config.sample_size * pipe.vae_scale_factor)
    with torch.no_grad():
        z0 = vae.encode(pixels.to(world.device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
        z0 = z0.repeat(repeats, 1, 1, 1)
        m = None if masks is None else torch.as_tensor(np.asarray(masks), dtype=torch.float32,
                                                       device=world.device).repeat(repeats, 1, 1)[:, None]
        states = {}
        for name, ps in prompts.items():
            ids = padded_ids(pipe.tokenizer, ps, world.device)
            states[name] = pipe.text_encoder(ids)[0].repeat(repeats, 1, 1)
        gen = torch.Generator(world.device).manual_seed(seed)
        out = {name: [] for name in prompts}
        for lo, hi in bands:
            noise = torch.randn(z0.shape, generator=gen, device=world.device)
            t = torch.randint(lo, hi, (len(z0),), generator=gen, device=world.device)
            zt = sched.add_noise(z0, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
            for name, cond in states.items():
                err = ((unet(zt.to(unet.dtype), t, cond.to(unet.dtype)).sample.float() - target) ** 2).mean(1, keepdim=True)
                row = {"band": [lo, hi], "all": float(err.mean())}
                if m is not None:
                    row["inside"] = float((err * m).sum() / m.sum().clamp_min(1e-8))
                    row["outside"] = float((err * (1 - m)).sum() / (1 - m).sum().clamp_min(1e-8))
                out[name].append(row)
    return out


def fixed_caption(scene: render.Scene, colour: bool = False, pattern: bool = False, colour2: bool = False,
                  background: bool = False) -> str:
    """``scene``'s caption in one template ("a photo of a purple striped cat and a ball on grass"), naming the
    given attributes of every object: captions that differ in the attribute words alone."""
    phrases = [render.describe(o, colour, pattern, colour2) for o in scene.objects]
    text = "a photo of " + " and ".join(phrases)
    return text + (" " + render.BACKGROUNDS[scene.background] if background else "")


def _relative(losses: dict, base: str) -> dict:
    """Each prompt set's loss as a change relative to ``base``'s, per band and region (``-0.1`` = 10 % lower)."""
    rel = {}
    for name, rows in losses.items():
        rel[name] = [{k: (v / b[k] - 1 if k != "band" else v) for k, v in r.items()}
                     for r, b in zip(rows, losses[base])]
    return rel


def eval_inversion_objective(world, inversions_root: str | os.PathLike | None = None, repeats: int = 16,
                             generic_scenes: int = 48, seed: int = 0) -> dict:
    """Does the loss that textual inversion minimises reward a concept's look? TI can put on the object only
    what lowers the noise-prediction loss on the photos. For each concept with a plain inversion in
    ``inversions_root/seed0/<name>/`` (default ``data/toy/inversions/plain``), the loss on its photos (same noise
    and timesteps, ``repeats`` draws per photo and band of :data:`NOISE_BANDS`) with: the superclass prompt
    (the baseline), the learned token ("a photo of a <token> cat"), the concept's look in words ("a photo of a
    purple cat", "... purple striped cat", "... purple and yellow striped cat"), and the photo's own caption
    naming nouns and background but no look (``setting``); each as a change relative to the superclass's,
    on the whole latent, inside the concept's object and outside it.

    ``generic``: the same comparison on ``generic_scenes`` held-out training-like scenes, with captions naming
    nouns only (the baseline) and then colour, pattern, second colour and background: how much the UNet's
    prediction uses each attribute word where words are true of the image."""
    from ..inversion import load_embedding, unload
    from ..world import TOY_DIR

    root = Path(inversions_root) if inversions_root is not None else TOY_DIR / "inversions" / "plain"
    specs = {c.name: c for c in render.CONCEPTS}
    grid = world.pipe.unet.config.sample_size
    per, notes = {}, []
    for coi in world.concepts_of_interest:
        spec, path = specs[coi.name], root / "seed0" / coi.name / "learned_embeds.safetensors"
        if not path.is_file():
            notes.append(f"{coi.name}: skipped, no inversion at {path}")
            continue
        scenes = render.concept_scenes(spec)  # the scenes of coi.photos
        obj, n = scenes[0].objects[0], len(scenes)  # the concept's object, in the caption grammar
        named = {"superclass": (False, False, False), "colour": (True, False, False),
                 "colour_pattern": (True, True, False), "look": (True, True, True)}
        prompts = {k: ["a photo of " + render.describe(obj, *kw)] * n for k, kw in named.items()}
        prompts["with_token"] = [f"a photo of a {coi.token} {coi.superclass}"] * n
        prompts["setting"] = [fixed_caption(s, background=True) for s in scenes]
        masks = np.stack([render.object_masks(s, size=grid)[0] for s in scenes])
        load_embedding(world.pipe, path, coi.token)
        try:
            losses = denoising_losses(world, coi.photos, prompts, masks, repeats=repeats, seed=seed)
        finally:
            unload(world.pipe, coi.token)
        per[coi.name] = {"prompts": {k: v[0] for k, v in prompts.items()}, "loss": losses,
                         "relative": _relative(losses, "superclass")}

    scenes = [render.sample_scene(EVAL_SEED + 600_000 + i) for i in range(generic_scenes)]
    named = {"nouns": {}, "colour": dict(colour=True), "colour_pattern": dict(colour=True, pattern=True),
             "colour_pattern_colour2": dict(colour=True, pattern=True, colour2=True),
             "background": dict(background=True),
             "all": dict(colour=True, pattern=True, colour2=True, background=True)}
    caps = {k: [fixed_caption(s, **kw) for s in scenes] for k, kw in named.items()}
    glosses = denoising_losses(world, [render.draw_scene(s)[0] for s in scenes], caps, repeats=max(1, repeats // 4),
                               seed=seed)
    generic = {"n": generic_scenes, "example": {k: v[0] for k, v in caps.items()}, "loss": glosses,
               "relative": _relative(glosses, "nouns")}

    def high(rel_rows, region="all") -> float:  # mean relative change over the bands t >= 500
        return float(np.mean([r[region] for r in rel_rows if r["band"][0] >= 500]))

    res = {"per_concept": per, "generic": generic, "bands": [list(b) for b in NOISE_BANDS], "repeats": repeats,
           "inversions": shown_path(root),
           "loss": "noise-prediction MSE (the inversion's own loss), latent mean of the image, paired noise and t"}
    summary = {"generic_high_noise": {k: high(v) for k, v in generic["relative"].items() if k != "nouns"}}
    if per:
        for name in ("with_token", "colour", "colour_pattern", "look", "setting"):
            for region in ("all", "inside", "outside"):
                summary[f"{name}_high_noise_{region}"] = float(np.mean([high(r["relative"][name], region)
                                                                        for r in per.values()]))
        summary["concepts_look_words_lower_than_superclass"] = int(sum(high(r["relative"]["look"]) < 0
                                                                       for r in per.values()))
    res["summary"] = summary | {"concepts": len(per)}
    if notes:
        res["notes"] = notes
    return res


def main(argv=None):
    from ..world import load_world

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy/quality.json")
    parts = {"detector": eval_detector, "clip": eval_clip_retrieval, "generation": eval_generation, "speed": eval_speed,
             "inversion": eval_inversion, "attention": eval_attention_localisation,
             "attention_renderings": eval_attention_on_renderings, "look": eval_concept_look,
             "look_words": eval_look_from_words, "pattern_kept": eval_pattern_kept, "quality": eval_sample_quality,
             "attribute_words": eval_attribute_words, "clip_words": eval_clip_words,
             "inversion_objective": eval_inversion_objective}
    names = list(parts)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--skip", nargs="*", default=[], metavar="PART",
                       help=f"parts to skip (the others are measured and merged into --out): {' '.join(names)}")
    which.add_argument("--only", nargs="+", default=None, metavar="PART",
                       help="measure only these parts and merge them into --out")
    args = p.parse_args(argv)
    unknown = sorted((set(args.skip) | set(args.only or ())) - set(names))
    if unknown:
        p.error(f"unknown part(s) {unknown}; the parts are: {' '.join(names)}")
    if args.only:
        args.skip = [n for n in names if n not in args.only]
    world = load_world("toy")
    old = json.loads(open(args.out).read()) if args.skip and os.path.exists(args.out) else {}
    hardware = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {world.device}"
    # "hardware" at the top: the latest run's (a run with --skip keeps the other parts); each part records its own
    res = old | {"hardware": hardware, "command": "python -m compinv_utils.worldbuilding.quality"}
    for name, fn in parts.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        res[name] = fn(world)
        res[name]["eval_s"] = round(time.perf_counter() - t, 1)
        res[name]["hardware"] = hardware
        shown = {k: v for k, v in res[name].items() if k not in ("per_class", "per_noun", "per_concept")}
        print(name, json.dumps(shown))
    write_text(args.out, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
