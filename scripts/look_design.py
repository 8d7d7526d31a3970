"""Does plain textual inversion carry a concept's look under another design of the user photos? (toy world)

An experiment on the committed world, not part of the tutorial: ten concepts (the five of the world and five more),
photographed as subject data sets are (the object large and centred, 1.25 × its noun's size; three of five photos on a
shared background, the others on other backgrounds; a small companion in a corner of two photos), each inverted with
plain TI (300 steps, seed 0) and sampled 8 times ("a photo of a <token> <class>"); the detector crops the class, the
toy CLIP compares the crop with the photos' object crops, and the attribute probe of ``compinv_utils.worldbuilding.quality``
reads the main colour.

    python scripts/look_design.py subject            # the concepts' own looks (two colours and a pattern)
    python scripts/look_design.py subject_plain      # the same photos with one-colour looks
    python scripts/look_design.py norm               # one-colour looks: the learned row as it is, at guidance 2.5,
                                                     # and rescaled to the vocabulary's mean norm

Writes ``look_<variant>.json`` into the current folder and prints one line per concept and a summary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import torch

from compinv_utils.inversion import InversionConfig, invert, unload
from compinv_utils.measures import object_alignment
from compinv_utils.toy import render
from compinv_utils.worldbuilding.quality import _look, _object_crops, _shared_probe
from compinv_utils.world import load_world
from compinv_utils.detection import crop

# name, class, colour, second colour, pattern, shared background, companion
CONCEPTS = [("mochi", "cat", "purple", "yellow", "striped", "grass", "ball"),
            ("bruno", "teddy", "pink", "green", "checked", "room", "lamp"),
            ("terra", "pot", "orange", "blue", "dotted", "water", "boat"),
            ("sunny", "chair", "yellow", "purple", "checked", "snow", "tree"),
            ("indigo", "barn", "blue", "white", "dotted", "sky", "kite"),
            ("rex", "dog", "red", "white", "dotted", "grass", "ball"),
            ("pip", "cup", "green", "white", "striped", "room", "book"),
            ("skip", "boat", "red", "yellow", "striped", "water", "fish"),
            ("jade", "bottle", "green", "black", "checked", "room", "lamp"),
            ("zuzu", "fish", "orange", "black", "striped", "water", "boat")]


def subject_scenes(c, plain=False, scale=1.25, shared=3, with_companion=2, k_photos=5):
    """Five photos with the concept as the subject (see the module docstring)."""
    name, base, col, col2, pat, bg, comp = c
    look = dict(colour=col, colour2=col2, pattern="plain" if plain else pat)
    rng = np.random.default_rng(sum(map(ord, name)))
    others = [b for b in render.BACKGROUNDS if b != bg]
    out = []
    for k in range(k_photos):
        b = bg if k < shared else others[(k - shared) % len(others)]
        s = render.sample_scene(1000 + k + 17 * len(name), [base], b, objects=(look,))
        o = s.objects[0]
        o = replace(o, extent=min(0.82, render.NOUNS[base].size * scale * rng.uniform(0.95, 1.05)),
                    center=(0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)))
        objs = (o,)
        if 1 <= k <= with_companion:  # a small companion in a corner, behind the subject
            co = render.sample_scene(5000 + k + 17 * len(name), [comp], b).objects[0]
            co = replace(co, extent=render.NOUNS[comp].size * 0.6,
                         center=(0.85 if k % 2 else 0.15, 0.2 if render.NOUNS[comp].height == "high" else 0.82))
            objs = (co, o)
        out.append(render.Scene(b, objs, s.texture_seed))
    return out


def measure(world, probe, spec, base, images, photo_crops) -> dict:
    dets, crops = _object_crops(world, images, base)
    align = object_alignment(world, images, dets, base, photo_crops)
    return {"detected": len(crops) / len(images), "colour": _look(probe, crops, spec)["colour"],
            "alignment": float(np.nanmean(align)) if crops else float("nan")}


def main(variant: str) -> None:
    if variant not in ("subject", "subject_plain", "norm"):
        raise SystemExit(f"unknown variant {variant!r}: subject, subject_plain or norm")
    plain = variant != "subject"
    world = load_world("toy")
    pipe = world.pipe
    probe, _ = _shared_probe(world, 2400, 0)
    vnorm = pipe.text_encoder.get_input_embeddings().weight.norm(dim=1).mean().item()
    rows = {}
    for c in CONCEPTS:
        name, base = c[0], c[1]
        spec = render.ConceptSpec(name, base, c[2], c[3], "plain" if plain else c[4], c[5], c[6])
        drawn = [render.draw_scene(s) for s in subject_scenes(c, plain=plain)]
        photos = [im for im, _ in drawn]
        photo_crops = [crop(im, next(b for n, b in objs if n == base)) for im, objs in drawn]
        token = f"<{name}>"
        res = invert(pipe, photos, token, base, InversionConfig(steps=300), progress=False)
        e = res.embeddings[0]
        row = {"norm_ratio": e.norm().item() / vnorm}
        prompt = [f"a photo of a {token} {base}"] * 8
        try:
            if variant == "norm":
                table = pipe.text_encoder.get_input_embeddings().weight
                tid = pipe.tokenizer.convert_tokens_to_ids(token)
                for label, vec, scale in (("as_learned", e, 5.0), ("as_learned_cfg2.5", e, 2.5),
                                          ("vocabulary_norm", e * (vnorm / e.norm()), 5.0)):
                    with torch.no_grad():
                        table[tid] = vec.to(table)
                    row[label] = measure(world, probe, spec, base, world.generate(prompt, seed=0, guidance_scale=scale),
                                         photo_crops)
            else:
                row["token"] = measure(world, probe, spec, base, world.generate(prompt, seed=0), photo_crops)
        finally:
            unload(pipe, token)
        row["superclass"] = measure(world, probe, spec, base,
                                    world.generate([f"a photo of {render.article(base)}"] * 8, seed=0), photo_crops)
        row["colour_words"] = measure(world, probe, spec, base,
                                      world.generate([f"a photo of {render.article(c[2] + ' ' + base)}"] * 8, seed=0),
                                      photo_crops)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    json.dump(rows, open(f"look_{variant}.json", "w"), indent=1)
    for label in [k for k in next(iter(rows.values())) if isinstance(rows["mochi"][k], dict)]:
        colour = [r[label]["colour"] for r in rows.values()]
        diff = [r[label]["alignment"] - r["superclass"]["alignment"] for r in rows.values()]
        print(f"{label}: main colour on >= 0.6 of the objects for {sum(x >= 0.6 for x in colour if x == x)} of "
              f"{len(rows)}; alignment >= 0.15 above the superclass for {sum(d >= 0.15 for d in diff if d == d)}; "
              f"class detected in {np.mean([r[label]['detected'] for r in rows.values()]):.2f} of the samples")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "subject")
