"""Chapter 08's comparison: the paper's two fixes and their neighbours on one protocol, cached under
``data/<world>/neighbours/``.

- *Semantic side* — a loss for :func:`~compinv_utils.inversion.invert`: the paper's anchors
  (:class:`~compinv_utils.anchors.AnchorLoss`, chapter 03), CoRe (:mod:`.core`) and ClassDiffusion's
  semantic-preservation loss (:mod:`.classdiffusion`). Each concept is inverted with each loss
  (:func:`invert_neighbour`) and measured as Table 1's ``+semantic`` row.
- *Spatial side* — a guidance for :func:`~compinv_utils.guidance.guided_generate` on plain TI's words: the
  paper's spatial inversion (Eq. 8 into the layout MLP's boxes, chapter 05), Attend-and-Excite
  (:mod:`.attend_excite`, no boxes) and layout guidance (:mod:`.layout_guidance`, into the same boxes),
  measured as Table 1's ``+spatial`` row.
- *Several objects* — :func:`multi_object`: "a S* cat, a kite and a car" with 2, 3 or 4 objects, success when
  the detector finds every one of them.

``python -m compinv_utils.neighbours.compare`` fills every cache (resumable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..anchors import AnchorLoss
from ..evaluation import inversion_file, load_layouts, table1
from ..files import write_text
from ..guidance import GuidanceConfig, guided_generate
from ..inversion import InversionConfig, invert, invert_or_load, load_embedding, unload
from ..measures import found
from ..pairs import partner_nouns
from ..progress import bar
from ..semantic import invert_cached, variant_root
from ..prompts import article, pair_prompt
from .attend_excite import AttendExcite
from .classdiffusion import SemanticPreservationLoss
from .core import CoReLoss
from .layout_guidance import LayoutGuidance

LOSSES = ("anchors", "core", "classdiffusion")  # the semantic side: the paper's anchors and two neighbours
GUIDANCES = ("spatial", "attend_excite", "layout_guidance")  # the spatial side: the paper's and two neighbours
BOXED = ("spatial", "layout_guidance")  # guidances that need a box per word (the layout MLP's: pairs only)
MULTI_PARTNERS = 3  # partner nouns added one by one: prompts of 2, 3 and 4 objects


def root(world) -> Path:
    return Path(world.data_dir) / "neighbours"


def make_loss(world, concept, name: str):
    """The semantic-side loss ``name`` for ``concept`` at its paper's settings (the anchors at the world's λ)."""
    if name == "anchors":
        return AnchorLoss.for_world(world, lam=world.settings.lam)
    if name == "core":
        return CoReLoss.for_world(world, concept)
    if name == "classdiffusion":
        return SemanticPreservationLoss.for_world(world, concept)
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


def make_guidance(name: str):
    """The spatial-side guidance ``name`` at its paper's settings."""
    if name == "spatial":
        return GuidanceConfig()
    if name == "attend_excite":
        return AttendExcite()
    if name == "layout_guidance":
        return LayoutGuidance()
    raise ValueError(f"unknown guidance {name!r}; choose from {GUIDANCES}")


def plain_root(world) -> Path:
    """Plain TI's inversions (chapter 01's)."""
    return variant_root(world, "plain")


def inversion_root(world, name: str) -> Path:
    """Where the inversions of loss ``name`` live (the anchors': chapter 03's, at the world's λ)."""
    if name == "anchors":
        return variant_root(world, "semantic", world.settings.lam)
    return root(world) / "inversions" / name


def invert_neighbour(world, concept, name: str, seed: int = 0, recompute: bool = False) -> Path:
    """``concept`` inverted with loss ``name`` (the world's inversion budget), loaded into the pipeline; cached.
    The anchors' inversions are chapter 03's (:func:`~compinv_utils.semantic.invert_cached`)."""
    if name == "anchors":
        path = invert_cached(world, concept, "semantic", world.settings.lam, seed, recompute=recompute)
        load_embedding(world.pipe, path)
        return path
    path = inversion_file(inversion_root(world, name), concept.name, seed)
    loss = make_loss(world, concept, name) if recompute or not path.exists() else None  # built only to invert
    config = InversionConfig(steps=world.settings.inversion_steps, seed=seed)
    return invert_or_load(world.pipe, concept, config, inversion_root(world, name) / f"seed{seed}",
                          recompute=recompute, loss_fn=loss, progress=False)


def semantic_table(world, name: str, inv_seeds: Sequence[int] = (0,), recompute: bool = False,
                   progress: bool = False, layouts=None) -> list[dict]:
    """Table 1's ``+semantic`` records with loss ``name``'s inversions (made where missing); ``layouts``: the
    loaded layout MLP (default: loaded here)."""
    for s in inv_seeds:
        for c in world.concepts_of_interest:
            invert_neighbour(world, c, name, s, recompute=recompute)
            unload(world.pipe, c.token)
    seeds = world.settings.gen_seeds
    return table1(world, lambda c: partner_nouns(world, c), {"semantic": inversion_root(world, name)},
                  layouts or load_layouts(world), inv_seeds=tuple(inv_seeds), seeds=seeds, pair_seeds=seeds, methods=("+semantic",),
                  cache=root(world) / f"table1_{name}.json", progress=progress)


def spatial_table(world, name: str, inv_seeds: Sequence[int] = (0,), progress: bool = False,
                  layouts=None) -> list[dict]:
    """Table 1's ``+spatial`` records with guidance ``name`` on plain TI's inversions (chapter 01's)."""
    seeds = world.settings.gen_seeds
    return table1(world, lambda c: partner_nouns(world, c), {"plain": plain_root(world)},
                  layouts or load_layouts(world), inv_seeds=tuple(inv_seeds), seeds=seeds, pair_seeds=seeds,
                  methods=("+spatial",), guidance=make_guidance(name), cache=root(world) / f"table1_{name}.json",
                  progress=progress)


ROWS = {"TI": ("TI", None), "+semantic (anchors)": ("+semantic", "anchors"), "CoRe": ("+semantic", "core"),
        "ClassDiffusion": ("+semantic", "classdiffusion"), "+spatial (Eq. 8)": ("+spatial", "spatial"),
        "Attend-and-Excite": ("+spatial", "attend_excite"), "layout guidance": ("+spatial", "layout_guidance")}


def row_images(world, label: str, concept, inv_seed: int = 0, seeds: int = 1,
               layouts=None) -> tuple[list, list[dict]]:
    """The images and records of one row of :data:`ROWS` for ``concept`` with its partner nouns (as
    :func:`~compinv_utils.evaluation.evaluate_group` makes them; nothing cached)."""
    from ..evaluation import evaluate_group

    if label not in ROWS:
        raise ValueError(f"unknown row {label!r}; choose from {list(ROWS)}")
    method, name = ROWS[label]
    inversions = {"plain": plain_root(world)} | ({"semantic": inversion_root(world, name)} if method == "+semantic" else {})
    if method == "+semantic":
        invert_neighbour(world, concept, name, inv_seed)
        unload(world.pipe, concept.token)
    guidance = make_guidance(name) if method == "+spatial" else GuidanceConfig()
    images: list = []
    records = evaluate_group(world, "noun", method, [concept], partner_nouns(world, concept), seeds, inversions, inv_seed,
                             layouts or load_layouts(world), guidance=guidance, images_out=images)
    return images, records


def dreambench_rows(world, models, labels: Sequence[str] = tuple(ROWS), inv_seed: int = 0, seeds: int = 1) -> dict:
    """DreamBench's DINO, CLIP-I and CLIP-T (:mod:`compinv_utils.dreambench`) of each row, per concept with its
    partners: ``{label: {"dino", "clip_i", "clip_t"}}``, each the mean over the concepts' means."""
    from ..dreambench import clip_i_score, clip_t_score, dino_score

    out, layouts = {}, load_layouts(world)
    for label in labels:
        per = []
        for c in world.concepts_of_interest:
            images, records = row_images(world, label, c, inv_seed, seeds, layouts)
            texts = [pair_prompt(*r["objects"]) for r in records]
            per.append([float(dino_score(models, images, c.photos).mean()),
                        float(clip_i_score(models, images, c.photos).mean()),
                        float(clip_t_score(models, images, texts).mean())])
        out[label] = dict(zip(("dino", "clip_i", "clip_t"), np.mean(per, 0).tolist()))
    return out


def table_records(world, inv_seed: int = 0) -> list[dict]:
    """Table 1's records of every row of :data:`ROWS` for inversion seed ``inv_seed``, each labelled with its row's
    name in ``"method"``: TI, the anchors and spatial inversion from chapter 06's caches, the neighbours from
    theirs (:func:`semantic_table`, :func:`spatial_table`; made where missing). Same prompts and seeds in every row."""
    seeds, data = world.settings.gen_seeds, Path(world.data_dir)
    kw = dict(inv_seeds=tuple(range(world.settings.inversion_seeds)), seeds=seeds, pair_seeds=seeds, progress=False)
    layouts, partners = load_layouts(world), (lambda c: partner_nouns(world, c))
    base = table1(world, partners, {"plain": plain_root(world)}, layouts, methods=("TI", "+spatial"),
                  cache=data / "evaluation" / "table1_plain.json", **kw)
    base += table1(world, partners, {"semantic": inversion_root(world, "anchors")}, layouts, methods=("+semantic", "+both"),
                   cache=data / "evaluation" / f"table1_lambda{world.settings.lam:g}.json", **kw)
    out = []
    for label, (method, name) in ROWS.items():
        if name in (None, "anchors", "spatial"):  # the paper's rows: chapter 06's records
            recs = base
        else:
            recs = (semantic_table(world, name, (inv_seed,), layouts=layouts) if method == "+semantic" else
                    spatial_table(world, name, (inv_seed,), layouts=layouts))
        out += [r | {"method": label} for r in recs if r["method"] == method and r["inv_seed"] == inv_seed]
    return out


def _multi_prompt(concept, partners: Sequence[str]) -> str:
    objects = [f"a {concept.token} {concept.superclass}"] + [article(x) for x in partners]
    return objects[0] + " and " + objects[1] if len(objects) == 2 else ", ".join(objects[:-1]) + " and " + objects[-1]


def multi_object(world, method: str, inv_seed: int = 0, counts: Sequence[int] = (2, 3, 4), seeds: int = 2,
                 cache: Path | None = None) -> list[dict]:
    """Per concept, object count and seed: "a S* cat, a kite and a car" (the first partners), with ``method``:
    ``"TI"`` (plain TI, plain sampling), a loss of :data:`LOSSES` (its inversions, plain sampling) or a guidance
    of :data:`GUIDANCES` other than the paper's (plain TI's words; Attend-and-Excite on every object word, layout
    guidance only for two objects, where the layout MLP gives boxes). Records say which objects were found."""
    cache = Path(cache) if cache is not None else root(world) / f"multi_{method}.json"
    if cache.exists():
        return json.loads(cache.read_text())["records"]
    boxed = method in BOXED
    layouts = load_layouts(world) if boxed else None
    records = []
    for c in world.concepts_of_interest:
        if method in LOSSES:
            invert_neighbour(world, c, method, inv_seed)
        else:
            load_embedding(world.pipe, inversion_file(plain_root(world), c.name, inv_seed))
        partners = partner_nouns(world, c)[:MULTI_PARTNERS]
        for k in counts:
            if boxed and k != 2:
                continue
            objs = partners[:k - 1]
            prompt = _multi_prompt(c, objs)
            words = [c.token] + list(objs)
            if method in ("TI",) + LOSSES:
                images = world.generate([prompt] * seeds, seeds=list(range(seeds)))
            else:
                boxes = list(layouts.boxes(world.pipe, *words)) if layouts is not None else [(0, 0, 1, 1)] * len(words)
                images = guided_generate(world, [prompt] * seeds, words, boxes, seeds=list(range(seeds)),
                                         config=make_guidance(method)).images
            for s, d in enumerate(world.detect(images)):
                objects = [c.superclass] + list(objs)
                records.append({"method": method, "concept": c.name, "objects": objects, "n_objects": k, "seed": s,
                                "prompt": prompt, "found": [float(found(d, o)) for o in objects]})
        unload(world.pipe, c.token)
    write_text(cache, json.dumps({"method": method, "inv_seed": inv_seed, "seeds": seeds, "records": records}, indent=1))
    return records


def _memory_mb(field: str) -> float | None:
    """This process's ``VmRSS`` or ``VmHWM`` (peak) from ``/proc/self/status`` in MB (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's record of this process's peak memory (Linux: ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_cost(world, name: str, steps: int = 10, images: int = 4) -> dict:
    """What one method costs on this machine, measured in this process: seconds per inversion step (a loss) or per
    image (a guidance), and the memory it adds at its peak over what the loaded world already holds (MB; Linux
    only, else None). ``python -m compinv_utils.neighbours.compare --cost NAME`` measures one in a fresh process."""
    c = world.concepts_of_interest[0]
    peak_ok = _reset_peak()
    before = _memory_mb("VmRSS")
    t0 = time.perf_counter()
    if name in LOSSES or name == "TI":
        loss = None if name == "TI" else make_loss(world, c, name)
        unload(world.pipe, c.token)
        invert(world.pipe, c.photos, c.token, c.superclass, InversionConfig(steps=steps), loss_fn=loss, progress=False)
        unload(world.pipe, c.token)
        per, unit = (time.perf_counter() - t0) / steps, "s per inversion step"
    else:
        load_embedding(world.pipe, inversion_file(plain_root(world), c.name, 0))
        partner = partner_nouns(world, c)[0]
        words = [c.token, partner]
        boxes = list(load_layouts(world).boxes(world.pipe, *words))
        prompt = f"a {c.token} {c.superclass} and {article(partner)}"
        t0 = time.perf_counter()
        if name == "plain":
            world.generate([prompt] * images, seed=0)
        else:
            guided_generate(world, [prompt] * images, words, boxes, seed=0, config=make_guidance(name))
        unload(world.pipe, c.token)
        per, unit = (time.perf_counter() - t0) / images, "s per image"
    peak = _memory_mb("VmHWM") if peak_ok else None
    extra = round(peak - before, 1) if peak is not None and before is not None else None
    return {"method": name, "seconds": round(per, 3), "unit": unit, "extra_peak_mb": extra}


def costs(world, names: Sequence[str], cache: Path | None = None) -> dict:
    """:func:`measure_cost` of each method, each in a fresh process (so that peak memory is its own); cached."""
    cache = Path(cache) if cache is not None else root(world) / "costs.json"
    out = json.loads(cache.read_text()) if cache.exists() else {}
    for name in names:
        if name in out:
            continue
        run = subprocess.run([sys.executable, "-m", "compinv_utils.neighbours.compare", "--world", world.name,
                              "--cost", name], capture_output=True, text=True, check=True)
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
        write_text(cache, json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    from ..world import load_world

    ap = argparse.ArgumentParser(description="Fill chapter 08's caches (resumable), or measure one method's cost.")
    ap.add_argument("--world", default="toy")
    ap.add_argument("--cost", default=None, help="print one method's cost as JSON and stop")
    ap.add_argument("--only", default=None, help="comma-separated: semantic, spatial, multi")
    args = ap.parse_args(argv)
    world = load_world(args.world)
    if args.cost:
        print(json.dumps(measure_cost(world, args.cost)))
        return
    parts = set((args.only or "semantic,spatial,multi").split(","))
    if "semantic" in parts:
        for name in bar(LOSSES[1:], desc="semantic neighbours"):
            semantic_table(world, name)
    if "spatial" in parts:
        for name in bar(GUIDANCES[1:], desc="spatial neighbours"):
            spatial_table(world, name)
    if "multi" in parts:
        for method in bar(("TI",) + LOSSES + GUIDANCES, desc="several objects"):
            multi_object(world, method)


if __name__ == "__main__":
    main()
