"""Table 1's other blocks: fit every concept with an inversion method (plain and semantic, several seeds),
record what each fit costs, and evaluate the block with :func:`compinv_utils.evaluation.table1`.

    python -m compinv_utils.method_blocks --method custom_diffusion    # fits, then the block's records
    python -m compinv_utils.method_blocks --method dreambooth --seeds 2

Fitted concepts go to ``<data>/<world>/methods/<method>/{plain,semantic}/seed<s>/<name>/`` in the method's
own format (a DreamBooth concept is a whole UNet, so these folders are not part of the repository); what each
fit cost goes to ``<data>/<world>/evaluation/fits_<method>.json`` and the block's records to
``table1_<method>.json`` beside it, both written after every fit or group, so an interrupted run resumes.
Semantic inversion is the method's fit with :class:`~compinv_utils.anchors.AnchorLoss` at the method's
``anchor_lambda(world)`` (Custom Diffusion as textual inversion; DreamBooth ``L_rec`` 0.4 / ``L_anc`` 0.6).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .anchors import AnchorLoss
from .evaluation import Layouts, inversion_folder, load_layouts, missing_groups, table1
from .files import write_text
from .methods import get_method
from .methods.base import INFO_FILE
from .pairs import partner_nouns
from .paths import shown_path
from .progress import bar
from .world import weights_hash

VARIANTS = ("plain", "semantic")


WORLD_FILE = "world.json"  # beside the fits: the fingerprint of the world they were fitted in


def world_fingerprint(world) -> str:
    """The hash that says which version of a world a fits folder belongs to (:func:`~compinv_utils.world.weights_hash`
    at full precision). Fits made in one version of a world are meaningless in another: a retrained UNet draws
    other images from the same fitted weights."""
    return weights_hash(world, half=False)


def check_fits_world(world, root: Path) -> None:
    """Raise a ``ValueError`` that says what to do when the fits under ``root`` were made in another version of
    ``world`` (nothing to check when there are no fits yet, or fits made before fingerprints were written)."""
    path = Path(root) / WORLD_FILE
    if not path.exists():
        return
    try:
        made_in = json.loads(path.read_text())["world_fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a fingerprint file ({exc}); delete it and fit again") from exc
    now = world_fingerprint(world)
    if made_in != now:
        raise ValueError(f"the fits in {shown_path(root)} were made in another version of the {world.name!r} world "
                         f"(fingerprint {made_in}, this world {now}): move that folder away (or delete it) and fit "
                         f"again, e.g. python -m compinv_utils.method_blocks --method {Path(root).name} --seeds 1")


def method_root(world, method) -> Path:
    """Where the fitted concepts of ``method`` live for ``world`` (``<data>/<world>/methods/<method>``)."""
    return Path(world.data_dir) / "methods" / get_method(method).name


def folder_megabytes(folder: Path) -> float:
    """Megabytes (10⁶ bytes) of every file under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def trained_parameters(fitted) -> int:
    """How many numbers a fit trained: the token's rows plus the method's weights."""
    n = int(fitted.embeddings.numel())
    w = fitted.weights
    if w is None:
        return n
    if isinstance(w, dict):  # Custom Diffusion: {layer: processor}
        return n + sum(p.numel() for proc in w.values() for name, p in proc.named_parameters()
                       if "custom_diffusion" in name)
    return n + sum(p.numel() for p in w.parameters())  # DreamBooth: the whole UNet


def fit_concepts(world, method, seeds=(0, 1), variants=VARIANTS, config=None, root: Path | None = None,
                 stats_path: Path | None = None, progress: bool = True) -> dict:
    """Fit every concept of interest with ``method`` for each variant and seed (a folder that holds a finished
    fit is kept); returns ``{"<variant>|seed<s>|<name>": {"seconds", "parameters", "megabytes", "final_loss"}}``
    — the costs of the fits, also written to ``stats_path`` after each one."""
    m = get_method(method)
    root = Path(root) if root is not None else method_root(world, m)
    config = config if config is not None else m.config_class(steps=world.settings.inversion_steps)
    check_fits_world(world, root)
    stats = json.loads(Path(stats_path).read_text()) if stats_path is not None and Path(stats_path).exists() else {}
    if not (root / WORLD_FILE).exists():
        write_text(root / WORLD_FILE, json.dumps({"world": world.name, "world_fingerprint": world_fingerprint(world)},
                                                 indent=1))
    jobs = [(v, s, c) for v in variants for s in seeds for c in world.concepts_of_interest]
    for variant, seed, c in bar(jobs, desc=f"{m.name} fits", progress=progress):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        key = f"{variant}|seed{seed}|{c.name}"
        folder = inversion_folder(root / variant, c.name, seed)
        if (folder / INFO_FILE).exists() and key in stats:
            continue
        loss = AnchorLoss.for_world(world, lam=m.anchor_lambda(world)) if variant == "semantic" else None
        t0 = time.perf_counter()
        fitted = m.fit(world, c, replace(config, seed=seed), loss_fn=loss, progress=False)
        seconds = time.perf_counter() - t0
        try:
            m.save(fitted, folder)
            stats[key] = {"seconds": round(seconds, 1), "parameters": trained_parameters(fitted),
                          "megabytes": round(folder_megabytes(folder), 3),
                          "final_loss": float(np.mean(fitted.losses[-20:])), "lambda": loss.lam if loss else 0.0}
        finally:
            m.unload(world.pipe, fitted.handle)
        if stats_path is not None:
            write_text(stats_path, json.dumps({k: stats[k] for k in sorted(stats)}, indent=1))
    return stats


def run_block(world, method, seeds=(0, 1), config=None, layouts: Layouts | None = None, gen_seeds: int = 2,
              pair_seeds: int = 2, progress: bool = True) -> tuple[dict, list[dict]]:
    """The fits and the Table 1 records of one block, cached under ``<data>/<world>/evaluation`` (the concepts are
    fitted only while the records are incomplete)."""
    m = get_method(method)
    out = Path(world.data_dir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    root = method_root(world, m)
    cache, stats_path = out / f"table1_{m.name}.json", out / f"fits_{m.name}.json"
    if missing_groups(world, cache, inv_seeds=tuple(seeds)) or not stats_path.exists():
        # the fits are needed only while a group is missing (a clone has the records, not the fitted models)
        stats = fit_concepts(world, m, seeds, config=config, root=root, stats_path=stats_path, progress=progress)
    else:
        stats = json.loads(stats_path.read_text())
    layouts = layouts if layouts is not None else load_layouts(world)
    records = table1(world, lambda c: partner_nouns(world, c), {v: root / v for v in VARIANTS}, layouts,
                     inv_seeds=tuple(seeds), seeds=gen_seeds, pair_seeds=pair_seeds, cache=cache,
                     progress=progress, block=m.name)
    return stats, records


def main(argv=None) -> None:
    from .world import load_world

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, help="custom_diffusion, dreambooth (or ti)")
    ap.add_argument("--world", default="toy")
    ap.add_argument("--seeds", type=int, default=2, help="inversion seeds per concept (0 … n−1)")
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default: the world's inversion steps)")
    args = ap.parse_args(argv)
    world = load_world(args.world)
    m = get_method(args.method)
    config = m.config_class(steps=args.steps or world.settings.inversion_steps)
    t0 = time.perf_counter()
    stats, records = run_block(world, m, tuple(range(args.seeds)), config=config)
    print(f"{m.name}: {len(stats)} fits, {len(records)} records in {time.perf_counter() - t0:.0f} s "
          f"({json.dumps(asdict(config), default=str)})")


if __name__ == "__main__":
    main()
