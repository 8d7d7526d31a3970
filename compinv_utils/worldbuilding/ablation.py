"""The grounding ablation: one UNet stage trained twice, with and without the token grounding loss.

    python -m compinv_utils.worldbuilding.ablation --steps 1500 --out data/toy/ablation_grounding.json

Both runs start from scratch with the same profile, seed, data and step count, on the VAE, CLIP and detector
of ``--world`` (default: the committed toy world); the only difference is the grounding weights
(the profile's, or both 0). Each UNet is then measured as :mod:`compinv_utils.worldbuilding.quality` measures the
world: attention localisation on generated noun pairs (:func:`~.evaluate.eval_attention_localisation`) and
single nouns / held-out pairs detected (:func:`~.evaluate.eval_generation`). The trained UNets go to
``--work`` (not part of the repository); the JSON keeps the numbers, the command and the training logs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..files import write_text

VARIANTS = ("with_grounding", "without_grounding")


def run_ablation(world_dir: Path, work: Path, steps: int, profile: str = "cpu-full", workers: int = 2,
                 cache_dir: Path | None = None, device: str = "auto", n_pairs: int = 24, per_noun: int = 8,
                 per_pair: int = 4, measure_only: bool = False) -> dict:
    """Train the two UNets into ``work/with_grounding`` and ``work/without_grounding`` and measure them;
    returns the results (see the module docstring). ``measure_only``: measure UNets that an earlier run with
    the same arguments left in ``work`` instead of training them again."""
    from ..world import load_toy_world
    from .quality import eval_attention_localisation, eval_attention_on_renderings, eval_generation
    from .train import PROFILES, build_world

    if not (Path(world_dir) / "pipeline" / "vae").is_dir():
        raise FileNotFoundError(f"{world_dir} holds no toy world (no pipeline/vae); pass --world with a folder "
                                "that `python -m compinv_utils.worldbuilding.train` wrote")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    base = replace(PROFILES[profile], unet_steps=steps)
    if not (base.ground_weight or base.ground_pixel_weight):
        raise ValueError(f"profile {profile!r} has no grounding loss to ablate; use cpu-full or gpu")
    res = {"command": f"python -m compinv_utils.worldbuilding.ablation --steps {steps} --profile {profile} --world {world_dir} "
                      f"--pairs {n_pairs}" + (" --measure-only" if measure_only else ""),
           "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {dev}",
           "profile": profile, "steps": steps, "world": str(world_dir), "config": asdict(base), "variants": {}}
    for name in VARIANTS:
        cfg = base if name == "with_grounding" else replace(base, ground_weight=0.0, ground_pixel_weight=0.0)
        out = Path(work) / name
        t = time.perf_counter()
        if measure_only:
            if not (out / "pipeline" / "unet").is_dir():
                raise FileNotFoundError(f"no trained UNet in {out}: run the ablation without --measure-only first")
            runs = json.loads((out / "training_log.json").read_text())
            log, train_s = runs[-1], runs[-1].get("total_s", float("nan"))
            if log.get("config", {}).get("unet_steps") not in (None, steps):
                raise ValueError(f"{out} was trained for {log['config']['unet_steps']} steps, not {steps}")
        else:
            log = build_world(out, cfg, dev, workers, ["unet"], None, cache_dir, False, Path(world_dir))
            train_s = time.perf_counter() - t
        world = load_toy_world(out)
        t = time.perf_counter()
        row = {"ground_weight": cfg.ground_weight, "ground_pixel_weight": cfg.ground_pixel_weight,
               "train_s": round(train_s, 1), "attention": eval_attention_localisation(world, n_pairs=n_pairs),
               "attention_renderings": eval_attention_on_renderings(world, n_pairs=32),
               "generation": {k: v for k, v in eval_generation(world, per_noun, per_pair).items() if k != "per_noun"},
               "training_log": {k: v for k, v in log.items() if k.startswith("unet_")}}
        row["eval_s"] = round(time.perf_counter() - t, 1)
        res["variants"][name] = row
        print(name, json.dumps({k: row["attention"].get(k) for k in ("own_share", "partner_share", "iou")}))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="UNet steps of each run")
    p.add_argument("--profile", default="cpu-full", help="the training profile (cpu-full or gpu)")
    p.add_argument("--world", default=None, help="the world whose VAE, CLIP and detector both runs use (default: data/toy)")
    p.add_argument("--work", default="runs/ablation", help="where the two trained worlds are written")
    p.add_argument("--out", default="data/toy/ablation_grounding.json")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="the rendered data set's cache (see compinv_utils.worldbuilding.train)")
    p.add_argument("--device", default="auto")
    p.add_argument("--pairs", type=int, default=24, help="generated noun pairs on which attention is measured")
    p.add_argument("--measure-only", action="store_true", help="measure the UNets an earlier run left in --work")
    args = p.parse_args(argv)
    from ..world import TOY_DIR
    from .train import DEFAULT_CACHE

    res = run_ablation(Path(args.world) if args.world else TOY_DIR, Path(args.work), args.steps, args.profile,
                       args.workers, Path(args.cache_dir or DEFAULT_CACHE).expanduser(), args.device,
                       n_pairs=args.pairs, measure_only=args.measure_only)
    write_text(args.out, json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
