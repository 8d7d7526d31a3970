"""Nouns in pairs: which partners a concept is composed with, how often the world draws both nouns of a pair (the
pair table, cached), and each noun's compositionality."""

from __future__ import annotations

import json
from itertools import combinations
from typing import Sequence

import numpy as np

from .maths import is_whole
from .measures import found
from .progress import bar
from .prompts import pair_prompt


def partner_nouns(world, concept, candidates: Sequence[str] | None = None, k: int | None = None) -> list[str]:
    """The first ``k`` (default: the world's ``settings.n_partners``) candidate partner nouns (default: the world's
    ``settings.partners``) for ``concept`` (a concept of interest, or a superclass word): never its superclass,
    never anything seen in its user photos (``concept.in_photos``; a partner the photos hold would be "found"
    because inversion absorbed it), never a pair held out from the world's training."""
    superclass = getattr(concept, "superclass", concept)
    seen = set(getattr(concept, "in_photos", ()))
    held = {tuple(sorted(p)) for p in world.held_out_pairs}
    candidates = world.settings.partners if candidates is None else candidates
    k = world.settings.n_partners if k is None else k
    return [x for x in candidates
            if x != superclass and x not in seen and tuple(sorted((x, superclass))) not in held][:k]


def pair_detection_table(world, pairs: Sequence[tuple[str, str]] | None = None, seeds: int = 2, seed: int = 0,
                         batch_size: int = 32, progress: bool = True) -> dict[tuple[str, str], dict[str, float]]:
    """For each noun pair, generate "a A and a B" ``seeds`` times and report how often A, B and both are
    detected. Defaults to every pair of the world's nouns."""
    pairs = list(combinations(world.nouns, 2)) if pairs is None else list(pairs)
    prompts = [pair_prompt(a, b) for a, b in pairs for _ in range(seeds)]
    images = []
    for i in bar(range(0, len(prompts), batch_size), desc="pairs", progress=progress):
        images += world.generate(prompts[i:i + batch_size], seed=seed + i, batch_size=batch_size)
    dets = world.detect(images)
    out = {}
    for k, (a, b) in enumerate(pairs):
        d = dets[k * seeds:(k + 1) * seeds]
        fa = np.array([found(x, a) for x in d])
        fb = np.array([found(x, b) for x in d])
        out[(a, b)] = {"a": float(fa.mean()), "b": float(fb.mean()), "both": float((fa & fb).mean())}
    return out


def _read_pair_tables(path) -> tuple[dict[int, dict[str, dict]], dict]:
    """A pair-table cache as ``{seeds: {"a|b": {...}}}`` (the main table first, then those of other seed counts),
    and the file's whole content."""
    try:
        data = json.loads(path.read_text())
        tables = {int(data["seeds"]): dict(data["pairs"])}
        for n, t in data.get("other_seeds", {}).items():
            tables.setdefault(int(n), {}).update(t["pairs"])
        return tables, data
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"the pair table {path} is not a pair-table cache ({type(exc).__name__}: {exc})") from exc


def _write_pair_tables(path, tables: dict[int, dict], main: int, world: dict | None = None) -> None:
    from .files import write_text

    data = {"seeds": main, "pairs": tables[main]}
    if world is not None:
        data["made_from"] = {"world": world}
    others = {str(n): {"pairs": t} for n, t in sorted(tables.items()) if n != main and t}
    if others:
        data["other_seeds"] = others
    write_text(path, json.dumps(data, indent=1))


def load_or_compute_pair_table(world, path, nouns: Sequence[str] | None = None, seeds: int = 2,
                               recompute: bool = False) -> dict[tuple[str, str], dict[str, float]]:
    """:func:`pair_detection_table` over every pair of ``nouns`` (default: the world's), cached at ``path`` as
    ``{"seeds": n, "pairs": {"a|b": {...}}}`` (tables made with other seed counts beside it, under
    ``"other_seeds"``). Only the pairs the cache lacks for these seeds are computed (all of them with
    ``recompute=True``), and they are merged into the file: a request for a subset of the nouns or for other seeds
    never drops what the cache holds. The write holds a lock on the folder and merges with what is on disk then,
    so processes that share the file lose nothing; the file before each write is kept as ``*.old.json`` (a larger
    backup is never overwritten, see :func:`compinv_utils.files.backup`). The file records the world it was made in
    (:func:`~compinv_utils.world.world_identity`); one made in another world is computed again, with a message.
    The main table (``"pairs"``) is the one
    of the latest request unless another seed count's table has more pairs. Chapter 01 makes it, chapter 06 and
    the README read it."""
    from pathlib import Path

    from .files import backup, locked
    from .paths import shown_path
    from .world import world_identity

    if not is_whole(seeds, 1):
        raise ValueError(f"seeds must be an integer >= 1 (images per pair), got {seeds!r}")
    seeds = int(seeds)
    path = Path(path)
    nouns = list(world.nouns if nouns is None else nouns)
    world.check_nouns(nouns)
    pairs = list(combinations(nouns, 2))
    if not pairs:
        raise ValueError(f"a pair table needs at least two nouns, got {nouns}")

    identity = world_identity(world)
    backed_up = False  # a stale or unreadable file is copied aside once, when it is found

    def read(announce: bool = True) -> dict[int, dict]:
        nonlocal backed_up
        if not path.exists():
            return {}
        try:
            tables, data = _read_pair_tables(path)
            made_in = (data.get("made_from") or {}).get("world")
        except ValueError as exc:
            if announce:
                print(f"{exc}; it is kept as {backup(path).name} and the table is computed again")
                backed_up = True
            return {}
        if made_in is not None and made_in != identity:
            if announce:
                print(f"pair table {shown_path(path)} was made in another world ({made_in}, not {identity}): "
                      f"computing it again (the old file is kept as {backup(path).name})")
                backed_up = True
            return {}
        return tables

    def lookup(table: dict, a: str, b: str):
        if f"{a}|{b}" in table:
            return table[f"{a}|{b}"]
        if f"{b}|{a}" in table:  # the same pair cached in the other order
            v = table[f"{b}|{a}"]
            return {"a": v["b"], "b": v["a"], "both": v["both"]}
        return None

    tables = read()
    have = tables.get(seeds, {})
    missing = pairs if recompute else [(a, b) for a, b in pairs if lookup(have, a, b) is None]
    if missing:
        if tables:
            why = "recompute=True" if recompute else f"{len(pairs) - len(missing)} of them cached"
            print(f"pair table {shown_path(path)}: computing {len(missing)} of the {len(pairs)} pairs asked for with "
                  f"seeds={seeds} ({why}) and merging them into the file")
        new = pair_detection_table(world, missing, seeds=seeds)
        with locked(path):
            tables = read(announce=False)  # what is on disk now: another process may have added pairs meanwhile
            main = next(iter(tables), seeds)  # the main table so far
            tables.setdefault(seeds, {}).update({f"{a}|{b}": v for (a, b), v in new.items()})
            if len(tables[seeds]) >= len(tables.get(main, {})):
                main = seeds
            if not backed_up:
                backup(path)
            _write_pair_tables(path, tables, main, identity)
        have = tables[seeds]
    return {(a, b): lookup(have, a, b) for a, b in pairs}


def stamp_pair_table(world, path) -> bool:
    """Record in a pair table made before provenance records the world it was made in (its content unchanged);
    idempotent, returns whether it wrote the file."""
    from pathlib import Path

    from .files import locked
    from .world import world_identity

    path = Path(path)
    with locked(path):
        tables, data = _read_pair_tables(path)
        if data.get("made_from"):
            return False
        _write_pair_tables(path, tables, int(data["seeds"]), world_identity(world))
    return True


def compositionality(table: dict[tuple[str, str], dict[str, float]], nouns: Sequence[str]) -> dict[str, float]:
    """A noun's compositionality: how often its partner is detected, averaged over the pairs it is in."""
    out = {}
    for n in nouns:
        rates = [v["b"] if a == n else v["a"] for (a, b), v in table.items() if n in (a, b)]
        out[n] = float(np.mean(rates)) if rates else float("nan")
    return out


def composition(world, subject: str, partners: Sequence[str], seeds: int = 4, seed: int = 0,
                subject_noun: str | None = None, batch_size: int = 32) -> dict:
    """Compose ``subject`` (e.g. "<mochi> cat" or "cat") with each partner noun: "a {subject} and a {X}".

    Returns the prompts, images, per-image partner detection and, when ``subject_noun`` is given,
    per-image detection of the subject's noun (the concept-of-interest likelihood)."""
    world.check_nouns(partners)
    prompts = [pair_prompt(subject, x) for x in partners for _ in range(seeds)]
    wanted = [x for x in partners for _ in range(seeds)]
    images = world.generate(prompts, seed=seed, batch_size=batch_size)
    dets = world.detect(images)
    out = {"prompts": prompts, "images": images, "partners": wanted,
           "partner_found": np.array([float(found(d, x)) for d, x in zip(dets, wanted)]), "detections": dets}
    if subject_noun is not None:
        out["subject_found"] = np.array([float(found(d, subject_noun)) for d in dets])
    return out
