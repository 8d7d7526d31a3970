"""Stamp a world's cached results with what they were made from, without computing anything (idempotent):

    python scripts/stamp_provenance.py            # the toy world
    python scripts/stamp_provenance.py --world sd15

- every ``evaluation/table1_*.json`` gets its ``"made_from"`` (:func:`compinv_utils.evaluation.stamp_cache`): the
  world's identity, the inversion folders its settings name, and per group the partners (checked against its
  records) and the hashes of the inversion files as committed now. Fits of other methods (``methods/``) are not
  part of the repository, so their hashes are recorded as unknown;
- the pair table (``pair_table.json``) records the world it was made in (:func:`compinv_utils.pairs.stamp_pair_table`);
- the layout records (``layout/layout.jsonl``) get their ``.missed`` list (:func:`compinv_utils.layout.migrate_missed`).

A file that already has its records is left as it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compinv_utils import evaluation as V
from compinv_utils import layout as L
from compinv_utils.pairs import partner_nouns, stamp_pair_table
from compinv_utils.world import load_world
from compinv_utils.paths import shown_path


def inversion_folders(world, settings: dict) -> dict[str, Path]:
    """The folders a Table 1 cache's settings name by their last two parts (``inversions/plain``,
    ``semantic/lambda0.25``, ``custom_diffusion/plain`` …), under the world's data folder."""
    data = Path(world.data_dir)
    out = {}
    for key, tail in settings["inversions"].items():
        bases = [data, data / "inversions", data / "methods"]
        found = [b / tail for b in bases if (b / tail).is_dir()]
        if not found:  # fits that are not part of the repository: where the method's block writes them
            found = [data / "methods" / tail] if "inversion_method" in settings else []
        if not found:
            raise FileNotFoundError(f"no folder {tail} under {shown_path(data)} for {key!r}")
        out[key] = found[0]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="toy")
    args = ap.parse_args(argv)
    world = load_world(args.world)
    for cache in sorted((Path(world.data_dir) / "evaluation").glob("table1_*.json")):
        if ".old" in cache.name:
            continue
        settings = json.loads(cache.read_text())["settings"]
        method = settings.get("inversion_method", "ti")
        folders = inversion_folders(world, settings)
        left = V.stamp_cache(world, cache, lambda c: partner_nouns(world, c), folders, hash_files=method == "ti")
        print(f"{shown_path(cache)}: {'; '.join(f'{k} -> {shown_path(v)}' for k, v in folders.items())}"
              + (f"; left unstamped (recomputed by table1): {left}" if left else ""))
    pairs = Path(world.data_dir) / "pair_table.json"
    if pairs.exists():
        wrote = stamp_pair_table(world, pairs)
        print(f"{shown_path(pairs)}: " + ("stamped with the world" if wrote else "records its world"))
    records = Path(world.data_dir) / "layout" / "layout.jsonl"
    if records.exists():
        wrote = L.migrate_missed(records)
        print(f"{shown_path(records)}: " + ("wrote its .missed list" if wrote else "has its .missed list"))


if __name__ == "__main__":
    main()
