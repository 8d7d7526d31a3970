"""Table 1 of the paper for any world: TI, +semantic, +spatial and +both, composed with vocabulary nouns
and with another inverted concept, measured by text alignment, CoI likelihood and image alignment.

One record per generated image (JSON, resumable by group)::

    {"setting": "noun", "method": "+both", "concepts": ["mochi"], "partner": "kite", "seed": 2,
     "prompt": "a <mochi> cat and a kite", "text_alignment": 0.31, "coi": [1.0], "partner_found": 1.0,
     "image_alignment": 0.42}

``setting="concept"`` composes two inverted concepts ("a <mochi> cat and a <bruno> teddy"): ``coi``
holds one entry per concept and ``partner_found`` is None. Text alignment is measured against the
prompt with the placeholder tokens removed ("a cat and a kite"); image alignment against the user
photos of the concept(s) in the image (the mean over them when there are two).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import layout as L
from . import metrics as M
from .guidance import GuidanceConfig, guided_generate
from .inversion import load_embedding, unload

# method -> (which inversion, guided?)
METHODS: dict[str, tuple[str, bool]] = {"TI": ("plain", False), "+semantic": ("semantic", False),
                                        "+spatial": ("plain", True), "+both": ("semantic", True)}
METRICS = ("text_alignment", "coi", "partner_found", "image_alignment")


@dataclass
class Layouts:
    """Boxes for two words from the layout MLP; a word outside the nouns uses its nearest noun."""

    mlp: torch.nn.Module
    features: dict  # noun -> feature vector the MLP was trained on
    nouns: Sequence[str] = field(default_factory=list)

    def boxes(self, pipe, first: str, second: str) -> tuple[L.Box, L.Box]:
        nouns = list(self.nouns or self.features)
        a = first if first in self.features else L.nearest_noun(pipe, first, nouns)
        b = second if second in self.features else L.nearest_noun(pipe, second, nouns)
        return L.predict_boxes(self.mlp, self.features[a], self.features[b])


def concept_pairs(world, concepts=None) -> list[tuple]:
    """Pairs of concepts of interest whose classes are not a pair held out from the world's training."""
    held = {tuple(sorted(p)) for p in world.held_out_pairs}
    concepts = list(world.concepts_of_interest if concepts is None else concepts)
    return [(a, b) for a, b in combinations(concepts, 2) if tuple(sorted((a.superclass, b.superclass))) not in held]


def _group_key(setting: str, method: str, names: Sequence[str]) -> str:
    return f"{setting}|{method}|{'+'.join(names)}"


def evaluate_group(world, setting: str, method: str, concepts: Sequence, partners: Sequence[str], seeds: int,
                   inversions: str | Path, layouts: Layouts | None = None, guidance: GuidanceConfig = GuidanceConfig(),
                   batch_size: int = 16, images_out: list | None = None) -> list[dict]:
    """The records of one concept (``setting="noun"``, one prompt per partner and seed) or one pair of
    concepts (``setting="concept"``, one prompt per seed) under one method. The images are appended to
    ``images_out`` when it is given."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if setting not in ("noun", "concept"):
        raise ValueError(f"setting must be 'noun' or 'concept', got {setting!r}")
    which, spatial = METHODS[method]
    if spatial and layouts is None:
        raise ValueError(f"method {method!r} needs the layout MLP: pass layouts=Layouts(...)")
    pipe = world.pipe
    for c in concepts:
        path = Path(inversions) / which / c.name / "learned_embeds.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no {which} inversion of {c.name} at {path}: run chapter 01 (plain) or 03 (semantic) first")
        load_embedding(pipe, path)  # replaces any embedding of the same token
    try:
        if setting == "noun":
            (c,) = concepts
            world.check_nouns(partners)
            jobs = [(f"a {c.token} {c.superclass} and {M.article(x)}", x, s) for x in partners for s in range(seeds)]
            texts = [M.pair_prompt(c.superclass, x) for _, x, _ in jobs]
            words = [[c.token, x] for _, x, _ in jobs]
        else:
            c1, c2 = concepts
            jobs = [(f"a {c1.token} {c1.superclass} and a {c2.token} {c2.superclass}", None, s) for s in range(seeds)]
            texts = [M.pair_prompt(c1.superclass, c2.superclass)] * len(jobs)
            words = [[c1.token, c2.token]] * len(jobs)
        prompts, seed_list = [j[0] for j in jobs], [j[2] for j in jobs]
        if spatial:
            planned = {tuple(w): list(layouts.boxes(pipe, *w)) for w in words}  # one nearest-noun search per pair
            boxes = [planned[tuple(w)] for w in words]
            images = guided_generate(world, prompts, words, boxes, seeds=seed_list, config=guidance,
                                     batch_size=batch_size).images
        else:
            images = world.generate(prompts, seeds=seed_list, batch_size=batch_size)
        if images_out is not None:
            images_out.extend(images)
        dets = world.detect(images)
        text = M.text_alignment(world, images, texts)
        img = np.mean([M.image_alignment(world, images, c.photos) for c in concepts], 0)
    finally:
        for c in concepts:
            unload(pipe, c.token)
    records = []
    for k, ((prompt, partner, seed), d) in enumerate(zip(jobs, dets)):
        records.append({"setting": setting, "method": method, "concepts": [c.name for c in concepts],
                        "partner": partner, "seed": seed, "prompt": prompt, "text_alignment": float(text[k]),
                        "coi": [float(M.found(d, c.superclass)) for c in concepts],
                        "partner_found": None if partner is None else float(M.found(d, partner)),
                        "image_alignment": float(img[k])})
    return records


def table1(world, partners_for, inversions: str | Path, layouts: Layouts, seeds: int = 4, pair_seeds: int = 4,
           methods: Sequence[str] = tuple(METHODS), concepts=None, cache: str | Path | None = None,
           guidance: GuidanceConfig = GuidanceConfig(), progress: bool = True) -> list[dict]:
    """Every record of Table 1. ``partners_for(concept)`` gives a concept's partner nouns. With ``cache``
    (a JSON file), finished groups are read from it and each new group is written as soon as it is done,
    so an interrupted run resumes where it stopped."""
    concepts = list(world.concepts_of_interest if concepts is None else concepts)
    cache = Path(cache) if cache is not None else None
    done: dict[str, list[dict]] = {}
    if cache is not None and cache.exists():
        try:
            done = json.loads(cache.read_text())["groups"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{cache} is not a Table 1 cache ({e}); move it away to recompute") from e
    groups = [("noun", m, (c,)) for m in methods for c in concepts]
    groups += [("concept", m, pair) for m in methods for pair in concept_pairs(world, concepts)]
    for setting, method, cs in tqdm(groups, desc="Table 1", disable=not progress):
        key = _group_key(setting, method, [c.name for c in cs])
        if key in done:
            continue
        partners = partners_for(cs[0]) if setting == "noun" else []
        done[key] = evaluate_group(world, setting, method, cs, partners, seeds if setting == "noun" else pair_seeds,
                                   inversions, layouts, guidance)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"groups": done}, indent=0))
            tmp.replace(cache)
    return [r for s, m, cs in groups for r in done[_group_key(s, m, [c.name for c in cs])]]


def summarise(records: Sequence[dict], seed: int = 0) -> dict[tuple[str, str], dict[str, tuple[float, float, float]]]:
    """Mean and 95 % bootstrap interval of each metric, per (setting, method). ``coi`` is averaged over
    the concepts of an image first; ``both_coi`` (concept setting) is whether every concept was found."""
    out: dict = {}
    for r in records:
        out.setdefault((r["setting"], r["method"]), []).append(r)
    table = {}
    for key, rs in out.items():
        row = {"n": (len(rs),) * 3}
        row["text_alignment"] = M.bootstrap_ci([r["text_alignment"] for r in rs], seed=seed)
        row["image_alignment"] = M.bootstrap_ci([r["image_alignment"] for r in rs], seed=seed)
        row["coi"] = M.bootstrap_ci([_scalar(r["coi"]) for r in rs], seed=seed)
        if key[0] == "noun":
            row["partner_found"] = M.bootstrap_ci([r["partner_found"] for r in rs], seed=seed)
        else:
            row["both_coi"] = M.bootstrap_ci([float(min(r["coi"])) for r in rs], seed=seed)
        table[key] = row
    return table


def _scalar(v) -> float:
    """A record's metric as one number (``coi`` lists are averaged over the concepts)."""
    return float(np.mean(v)) if isinstance(v, list) else float(v)


def column(records: Sequence[dict], setting: str, method: str, metric: str) -> np.ndarray:
    """Per-image values of one metric for one (setting, method), in record order."""
    vals = [r[metric] for r in records if r["setting"] == setting and r["method"] == method]
    if not vals:
        raise ValueError(f"no records for setting={setting!r}, method={method!r}")
    return np.array([_scalar(v) for v in vals], dtype=float)


def paired_difference(records: Sequence[dict], setting: str, method: str, metric: str, base: str = "TI") -> np.ndarray:
    """Per-image ``metric`` of ``method`` minus that of ``base`` on the same prompt and seed."""
    def values(m):
        out = {}
        for r in records:
            if r["setting"] == setting and r["method"] == m:
                out[(tuple(r["concepts"]), r["partner"], r["seed"])] = _scalar(r[metric])
        return out

    a, b = values(method), values(base)
    if not a or set(a) != set(b):
        raise ValueError(f"{method!r} and {base!r} do not cover the same prompts and seeds in setting {setting!r}")
    keys = sorted(a)
    return np.array([a[k] - b[k] for k in keys])
