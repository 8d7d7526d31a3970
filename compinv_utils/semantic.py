"""Chapter 03's study of semantic inversion: where each variant's inversions live, the λ sweep over concepts
and inversion seeds, and the balance rule's pick with its stability.

Variants (folders under ``<data>/<world>/inversions/``):

- ``plain`` — textual inversion (λ = 0);
- ``semantic`` — Eq. 5 + Eq. 9 with the concept's semantic anchors (:class:`~compinv_utils.anchors.AnchorLoss`,
  ``choice="semantic"``), one folder per λ;
- ``recode`` — the same loss with δ re-coded from the current embedding every 25 steps (``choice="recode"``);
- ``official`` — the official code's loss (:class:`~compinv_utils.anchors.OfficialAnchorLoss`) at its λ, 0.95.

Every inversion is ``<variant>[/lambda<λ>]/seed<s>/<concept>/learned_embeds.safetensors``; a semantic one keeps its
per-step anchors beside it (``anchors_log.json``).

    python -m compinv_utils.semantic            # fills the λ sweep's cache (all λ, all seeds): resumable
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .anchors import AnchorLoss, OfficialAnchorLoss, choose_lambda
from .evaluation import inversion_file, sweep_point
from .files import write_text
from .inversion import InversionConfig, invert, unload
from .pairs import partner_nouns
from .progress import bar

VARIANTS = ("plain", "semantic", "recode", "official")
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)  # the sweep; λ = 0 is plain TI
OFFICIAL_LAMBDA = 0.95  # the official script's weight of its anchor loss (and the paper's λ for TI on SD 1.5)
SWEEP_FILE = "lambda_sweep.json"


def _is_plain(variant: str, lam: float) -> bool:
    """Plain TI: the plain variant, or an anchored one at λ = 0."""
    return variant == "plain" or (variant in ("semantic", "recode") and lam == 0)


def variant_root(world, variant: str, lam: float = 0.0) -> Path:
    """The folder of one variant's inversions (λ = 0 is ``plain`` whatever the variant)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    inv = world.data_dir / "inversions"
    if _is_plain(variant, lam):
        return inv / "plain"
    if variant == "official":
        return inv / "official"
    return inv / variant / f"lambda{lam:g}"


def make_loss(world, concept, variant: str, lam: float, c: int | None = None):
    """The ``loss_fn`` of one variant for ``concept`` (None for plain TI)."""
    c = world.settings.anchors_c if c is None else c
    if _is_plain(variant, lam):
        return None
    if variant == "official":
        return OfficialAnchorLoss(world.pipe, concept.token, concept.superclass, lam)
    return AnchorLoss(world.pipe, world.nouns, lam, c, choice=variant)


def invert_cached(world, concept, variant: str = "semantic", lam: float = 0.0, seed: int = 0, c: int | None = None,
                  folder: str | Path | None = None, recompute: bool = False) -> Path:
    """``concept``'s inversion of one variant, λ and seed: the cached file, or inverted now and saved (with the
    per-step anchors of a semantic one). Returns the file's path; the pipeline is left without the token."""
    path = inversion_file(folder or variant_root(world, variant, lam), concept.name, seed)
    if path.exists() and not recompute:
        return path
    unload(world.pipe, concept.token)
    config = InversionConfig(steps=world.settings.inversion_steps, seed=seed)
    res = invert(world.pipe, concept.photos, concept.token, concept.superclass, config,
                 loss_fn=make_loss(world, concept, variant, lam, c), progress=False)
    res.save(path)
    if res.log and "anchors" in res.log[0]:
        write_text(path.parent / "anchors_log.json", json.dumps(res.log))
    unload(world.pipe, concept.token)
    return path


def final_anchors(path: str | Path) -> dict[str, float]:
    """The anchors and weights δ at the last step of a semantic inversion (from its ``anchors_log.json``)."""
    return json.loads((Path(path).parent / "anchors_log.json").read_text())[-1]["anchors"]


def lambda_sweep(world, lams: Sequence[float] = LAMBDAS, seeds: Sequence[int] | None = None, variant: str = "semantic",
                 path: str | Path | None = None, recompute: bool = False, progress: bool = True) -> dict:
    """Every concept inverted at every λ with every inversion seed, each inversion measured by
    :func:`~compinv_utils.evaluation.sweep_point`. Cached in ``path`` (default ``inversions/lambda_sweep.json``)
    as ``{"variant", "lams", "seeds", "points": {concept: {seed: {λ: point}}}}``, written after each point, so an
    interrupted sweep resumes; a cache of another variant is refused rather than mixed in."""
    seeds = range(world.settings.inversion_seeds) if seeds is None else seeds
    path = Path(path or world.data_dir / "inversions" / SWEEP_FILE)
    sweep = json.loads(path.read_text()) if path.exists() and not recompute else {}
    if sweep and sweep.get("variant") != variant:
        raise ValueError(f"{path} holds a sweep of the {sweep.get('variant')!r} variant, not {variant!r}: pass another "
                         "path, or recompute=True to replace it")
    sweep = {"variant": variant, "lams": sorted(set(sweep.get("lams", [])) | {float(x) for x in lams}),
             "seeds": sorted(set(sweep.get("seeds", [])) | {int(s) for s in seeds}), "points": sweep.get("points", {})}
    todo = [(c, s, lam) for s in seeds for lam in lams for c in world.concepts_of_interest
            if f"{lam:g}" not in sweep["points"].get(c.name, {}).get(str(s), {})]
    for c, s, lam in bar(todo, desc="λ sweep", progress=progress):
        point = sweep_point(world, c, invert_cached(world, c, variant, lam, s), partner_nouns(world, c))
        sweep["points"].setdefault(c.name, {}).setdefault(str(s), {})[f"{lam:g}"] = point
        write_text(path, json.dumps(sweep, indent=1))
    return sweep


def sweep_values(sweep: dict, lam: float, key: str, seeds: Sequence[int] | None = None) -> tuple[np.ndarray, list, list]:
    """One measure at one λ: per (concept, seed) the value, its concept and its seed (for
    :func:`~compinv_utils.statistics.cluster_t_interval`)."""
    out = [(p[str(s)][f"{lam:g}"][key], name, s) for name, p in sweep["points"].items()
           for s in (sweep["seeds"] if seeds is None else seeds)]
    v, cl, sub = zip(*out)
    return np.array([np.nan if x is None else x for x in v], float), list(cl), list(sub)


def pick_lambda(sweep: dict, tolerance: float = 0.15, seeds: Sequence[int] | None = None) -> float:
    """The balance rule (:func:`~compinv_utils.anchors.choose_lambda`) on the sweep's mean whole-image alignment
    over its concepts and the given seeds (default: all)."""
    return choose_lambda({lam: float(np.mean(sweep_values(sweep, lam, "image_alignment", seeds)[0]))
                          for lam in sweep["lams"]}, tolerance)


def main(argv=None) -> None:
    from .world import load_world

    ap = argparse.ArgumentParser(description="Fill chapter 03's λ sweep cache (resumable).")
    ap.add_argument("--world", default="toy")
    ap.add_argument("--variant", default="semantic", choices=("semantic", "recode"))
    ap.add_argument("--seeds", type=int, default=None, help="inversion seeds 0 … n−1 (default: the world's)")
    args = ap.parse_args(argv)
    world = load_world(args.world)
    seeds = range(args.seeds if args.seeds is not None else world.settings.inversion_seeds)
    sweep = lambda_sweep(world, seeds=seeds, variant=args.variant)
    print(f"λ picked by the balance rule: {pick_lambda(sweep):g}; per seed: "
          f"{[pick_lambda(sweep, seeds=[s]) for s in sweep['seeds']]}")


if __name__ == "__main__":
    main()
