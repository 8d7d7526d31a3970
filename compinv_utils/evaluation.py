"""Table 1 of the paper for any world: TI, +semantic, +spatial and +both, composed with vocabulary nouns
and with another inverted concept, each concept inverted with several seeds.

One record per generated image (JSON, resumable by group)::

    {"setting": "noun", "method": "+both", "concepts": ["mochi"], "inv_seed": 1, "partner": "kite",
     "seed": 2, "prompt": "a <mochi> cat and a kite", "objects": ["cat", "kite"], "found": [1.0, 0.0],
     "text_alignment": 0.31, "image_alignment": 0.42, "object_alignment": 0.55}

``setting="concept"`` composes two inverted concepts ("a <mochi> cat and a <bruno> teddy"; ``partner``
is None). The columns (:data:`METRICS`), each derived from a record by :func:`value`:

- ``text_alignment``: CLIP cosine between the image and the prompt with the placeholders removed
  ("a cat and a kite"); the official evaluation multiplies it by 2.5 (ViT-B/32), we report the cosine.
- ``coi``: CoI likelihood as the official evaluation defines it — the prompt's *last* object is
  detected (the partner noun; in the concept setting the second concept's class).
- ``all_found``: every named object is detected.
- ``class_found``: the concept's own class noun is detected (not a column of the paper's Table 1); in the
  concept setting the mean over both concepts' classes.
- ``first_found``: the first named object is detected — the (first) concept's class. In the concept setting
  it stands beside ``coi`` (the second concept's class): the paper reports CoI likelihood only for
  composition with pretrained words, and there a fix that pulls in the second class while losing the first
  swaps the concepts rather than composing them.
- ``image_alignment``: whole-image CLIP similarity to the user photos (the paper's), averaged over the
  concepts of the image.
- ``object_alignment``: the same on the detected object's crop against the photos' object crops,
  so that an absorbed background does not count (None where the class was not detected).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .files import write_text
from .guidance import GuidanceConfig, guided_generate
from .inversion import load_embedding, unload
from .layout import Box, load_layout_mlp, nearest_noun, predict_boxes
from .measures import all_found, coi_found, found, image_alignment, object_alignment, text_alignment
from .methods import get_method
from .progress import bar
from .prompts import article, pair_prompt
from .statistics import cluster_t_interval

# Table 1's methods, as the paper names its rows -> (which inversion, guided?). Records and caches name a record's
# method under "method" and the block it belongs to (the inversion method that made the concepts) under
# "inversion_method".
TABLE1_METHODS: dict[str, tuple[str, bool]] = {"TI": ("plain", False), "+semantic": ("semantic", False),
                                               "+spatial": ("plain", True), "+both": ("semantic", True)}
METRICS = ("text_alignment", "coi", "all_found", "class_found", "first_found", "image_alignment", "object_alignment")


@dataclass
class Layouts:
    """Boxes for two words from the layout MLP; a word outside the nouns uses its nearest noun."""

    mlp: torch.nn.Module
    features: dict  # noun -> feature vector the MLP was trained on
    nouns: Sequence[str] = field(default_factory=list)

    def boxes(self, pipe, first: str, second: str) -> tuple[Box, Box]:
        """Boxes for two words: nouns of ``features`` as they are; a loaded placeholder (an added token such as
        ``<mochi>``) by its nearest noun. Any other word is refused rather than mapped to a noun it is not."""
        nouns = list(self.nouns or self.features)
        added = set(pipe.tokenizer.get_added_vocab())
        for w in (first, second):
            if w not in self.features and w not in added:
                kind = ("a placeholder that is not loaded: load its embedding first" if w.startswith("<") else
                        "neither one of the layout MLP's nouns nor a loaded placeholder")
                raise ValueError(f"{w!r} is {kind} (the nouns: {', '.join(nouns[:12])}…)")
        a = first if first in self.features else nearest_noun(pipe, first, nouns)
        b = second if second in self.features else nearest_noun(pipe, second, nouns)
        return predict_boxes(self.mlp, self.features[a], self.features[b])


def load_layouts(world, path: str | Path | None = None) -> Layouts:
    """The layout MLP chapter 04 saved (``<data>/<world>/layout/layout_mlp.pt``) with the features of the world's
    nouns it was trained on (input embeddings or encoder outputs, as the file says)."""
    from .embeddings import encoder_outputs, input_embeddings

    path = Path(world.data_dir) / "layout" / "layout_mlp.pt" if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no layout MLP at {path}: run chapter 04 first")
    mlp, feature_name = load_layout_mlp(path)
    feats = input_embeddings if feature_name == "input embedding" else encoder_outputs
    features = dict(zip(world.nouns, feats(world.pipe, world.nouns)))
    dim = next(iter(features.values())).shape[0]
    if dim != mlp.dim:
        raise ValueError(f"the layout MLP in {path} takes features of dimension {mlp.dim}, but the {world.name} world's "
                         f"{feature_name}s have {dim}: it was trained in another world; run chapter 04 for this one")
    return Layouts(mlp, features)


def concept_pairs(world, concepts=None) -> list[tuple]:
    """Pairs of concepts of interest whose classes are not a pair held out from the world's training."""
    held = {tuple(sorted(p)) for p in world.held_out_pairs}
    concepts = list(world.concepts_of_interest if concepts is None else concepts)
    return [(a, b) for a, b in combinations(concepts, 2) if tuple(sorted((a.superclass, b.superclass))) not in held]


def inversion_file(root: str | Path, name: str, seed: int) -> Path:
    """Where an inversion of concept ``name`` with inversion seed ``seed`` lives under ``root``."""
    return Path(root) / f"seed{seed}" / name / "learned_embeds.safetensors"


def inversion_folder(root: str | Path, name: str, seed: int) -> Path:
    """The folder of that inversion: what :meth:`compinv_utils.methods.InversionMethod.save` writes and ``load``
    reads (for textual inversion, the folder of :func:`inversion_file`)."""
    return inversion_file(root, name, seed).parent


def _group_key(setting: str, method: str, names: Sequence[str], inv_seed: int) -> str:
    return f"{setting}|{method}|{'+'.join(names)}|seed{inv_seed}"


def evaluate_group(world, setting: str, method: str, concepts: Sequence, partners: Sequence[str], seeds: int,
                   inversions: dict, inv_seed: int = 0, layouts: Layouts | None = None,
                   guidance: GuidanceConfig = GuidanceConfig(), batch_size: int = 16,
                   images_out: list | None = None, block: str = "ti") -> list[dict]:
    """The records of one concept (``setting="noun"``, one prompt per partner and seed) or one pair of
    concepts (``setting="concept"``, one prompt per seed) under one method, with the concepts' inversions
    of seed ``inv_seed``. ``inversions`` maps "plain" and "semantic" to the folders that hold them
    (:func:`inversion_folder`). The images are appended to ``images_out`` when it is given.

    ``block``: the inversion method (:mod:`compinv_utils.methods`) that made the concepts: ``"ti"``
    (textual inversion, the default), ``"custom_diffusion"`` or ``"dreambooth"``; its ``load``/``unload`` put each
    concept into the world's pipeline and restore it. Records of a method other than TI say which in
    ``"inversion_method"``. Two concepts are put into one pipeline by the method's ``compose`` (textual
    inversion: both embeddings; Custom Diffusion: its closed-form merge of the two key/value fine-tunes;
    DreamBooth: the sum of the two UNets' weight changes — see each method)."""
    inv = get_method(block)
    if method not in TABLE1_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(TABLE1_METHODS)}")
    if setting not in ("noun", "concept"):
        raise ValueError(f"setting must be 'noun' or 'concept', got {setting!r}")
    which, spatial = TABLE1_METHODS[method]
    if spatial and layouts is None:
        raise ValueError(f"method {method!r} needs the layout MLP: pass layouts=Layouts(...)")
    if which not in inversions:
        raise ValueError(f"method {method!r} needs inversions[{which!r}], the folder of its inversions")
    pipe = world.pipe
    paths = [inversion_file(inversions[which], c.name, inv_seed) for c in concepts]
    for c, path in zip(concepts, paths):
        if not path.exists():
            raise FileNotFoundError(f"no {which} inversion of {c.name} with seed {inv_seed} at {path}: "
                                    + ("run chapter 01 (plain) or 03 (semantic) first" if inv.name == "ti" else
                                       f"fit and save it with get_method({inv.name!r})"))
    handles = []
    try:
        if len(paths) == 1:
            handles.append(inv.load(pipe, paths[0].parent))  # replaces any embedding of the same token
        else:
            handles.append(inv.compose(pipe, [p.parent for p in paths], nouns=world.nouns))
        if setting == "noun":
            (c,) = concepts
            world.check_nouns(partners)
            jobs = [(f"a {c.token} {c.superclass} and {article(x)}", x, s) for x in partners for s in range(seeds)]
            objects = [[c.superclass, x] for _, x, _ in jobs]
            words = [[c.token, x] for _, x, _ in jobs]
        else:
            c1, c2 = concepts
            jobs = [(f"a {c1.token} {c1.superclass} and a {c2.token} {c2.superclass}", None, s) for s in range(seeds)]
            objects = [[c1.superclass, c2.superclass]] * len(jobs)
            words = [[c1.token, c2.token]] * len(jobs)
        texts = [pair_prompt(*o) for o in objects]
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
        text = text_alignment(world, images, texts)
        img = np.mean([image_alignment(world, images, c.photos) for c in concepts], 0)
        obj = np.stack([object_alignment(world, images, dets, c.superclass, world.photo_crops(c)) for c in concepts])
        with warnings.catch_warnings():  # an image where no concept's class was found stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            obj = np.nanmean(obj, 0)
    finally:
        for h in reversed(handles):
            inv.unload(pipe, h)
        for c in concepts:
            unload(pipe, c.token)
    records = []
    for k, ((prompt, partner, seed), d) in enumerate(zip(jobs, dets)):
        records.append({"setting": setting, "method": method, "concepts": [c.name for c in concepts],
                        "inv_seed": inv_seed, "partner": partner, "seed": seed, "prompt": prompt,
                        "objects": objects[k], "found": [float(found(d, o)) for o in objects[k]],
                        "text_alignment": float(text[k]), "image_alignment": float(img[k]),
                        "object_alignment": None if np.isnan(obj[k]) else float(obj[k])})
        if inv.name != "ti":
            records[-1]["inversion_method"] = inv.name
    return records


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # the files that make an inversion (logs aside)
_HASHES: dict[tuple, str] = {}  # (file, size, mtime) -> sha256, so that a folder is read once per process


def inversion_hash(folder: str | Path) -> str | None:
    """A short sha256 over the weight files of an inversion folder (their relative names and contents; logs and
    notes are left out), or None when the folder holds none (e.g. fits that a clone does not have)."""
    import hashlib

    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        memo = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _HASHES:
            with open(f, "rb") as fh:  # in chunks: a DreamBooth fit is a whole UNet
                _HASHES[memo] = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + _HASHES[memo].encode())
    return h.hexdigest()[:16]


def _where(folder: str | Path) -> str:
    """A folder as a cache records it: resolved, relative to :func:`~compinv_utils.paths.data_root` when inside it
    (so that every clone records the same), else absolute."""
    from .paths import data_root

    folder = Path(folder).resolve()
    try:
        return folder.relative_to(data_root().resolve()).as_posix()
    except ValueError:
        return folder.as_posix()


def _group_made_from(setting: str, method: str, concepts: Sequence, inv_seed: int, partners: list[str] | None,
                     inversions: dict, hash_files: bool = True) -> dict:
    """What one group of :func:`table1` is made from: its partner nouns and its inversions' file hashes."""
    which = TABLE1_METHODS[method][0]
    files = {c.name: (inversion_hash(inversion_folder(inversions[which], c.name, inv_seed))
                      if hash_files and which in inversions else None) for c in concepts}
    return {"partners": list(partners) if setting == "noun" else None, "files": files}


def _recorded_partners(records: list[dict]) -> list[str]:
    """The partner nouns of a noun group's records, in order."""
    return list(dict.fromkeys(r["partner"] for r in records))


def _group_changes(key: str, records: list[dict], stored: dict | None, now: dict) -> list[str]:
    """What differs between a cached group and what it would be made from now ([] when nothing does). Partners are
    also read from the records themselves; a file hash is compared only when both are known."""
    out = []
    if now["partners"] is not None:
        had = (stored or {}).get("partners") or _recorded_partners(records)
        if list(had) != list(now["partners"]):
            out.append(f"partners {had} -> {now['partners']}")
    for name, h in now["files"].items():
        old = ((stored or {}).get("files") or {}).get(name)
        if old is not None and h is not None and old != h:
            out.append(f"the inversion files of {name} ({old} -> {h})")
    return out


def _cache_changes(made_from: dict | None, world_id: dict, where: dict) -> list[str]:
    """What differs between the world and inversion folders a cache was made from and those asked for now."""
    if made_from is None:
        return []
    out = []
    if made_from.get("world") != world_id:
        out.append(f"the world ({made_from.get('world')} -> {world_id})")
    if made_from.get("inversions") != where:
        out.append(f"the inversion folders ({made_from.get('inversions')} -> {where})")
    return out


def _write_cache(cache: Path, settings: dict, made_from: dict, done: dict, dropped: set[str]) -> None:
    """Write a :func:`table1` cache under the folder's lock, keeping the groups another process added meanwhile
    (when it was made from the same settings, world and folders)."""
    from .files import locked

    with locked(cache):
        if cache.exists():
            try:
                stored = json.loads(cache.read_text())
            except json.JSONDecodeError:
                stored = {}
            theirs = stored.get("made_from") or {}
            if (stored.get("settings") == json.loads(json.dumps(settings)) and
                    not _cache_changes(theirs, made_from["world"], made_from["inversions"])):
                for key, recs in stored.get("groups", {}).items():
                    if key not in done and key not in dropped:
                        done[key] = recs
                        if key in theirs.get("groups", {}):
                            made_from["groups"].setdefault(key, theirs["groups"][key])
        write_text(cache, json.dumps({"settings": settings, "made_from": made_from, "groups": done}, indent=0))


def guidance_settings(guidance) -> dict:
    """What a cache records of the sampler's guidance: a :class:`GuidanceConfig`'s fields, or an objective's name
    and its config's fields (:class:`~compinv_utils.guidance.Objective`, e.g. Attend-and-Excite)."""
    if isinstance(guidance, GuidanceConfig):
        return asdict(guidance)
    config = getattr(guidance, "config", None)
    return {"objective": type(guidance).__name__, **(asdict(config) if config is not None else {})}


def table1(world, partners_for, inversions: dict, layouts: Layouts, inv_seeds: Sequence[int] = (0, 1, 2),
           seeds: int = 2, pair_seeds: int = 2, methods: Sequence[str] = tuple(TABLE1_METHODS), concepts=None,
           cache: str | Path | None = None, guidance: GuidanceConfig = GuidanceConfig(),
           progress: bool = True, block: str = "ti") -> list[dict]:
    """Every record of Table 1: each concept (and pair of concepts) under each method, once per inversion
    seed. ``partners_for(concept)`` gives a concept's partner nouns. With ``cache`` (a JSON file),
    finished groups are read from it and each new group is written as soon as it is done, so an
    interrupted run resumes where it stopped; a cache made with other settings is refused.

    The cache records what it was made from (``"made_from"``): the world (:func:`~compinv_utils.world.world_identity`),
    the inversion folders (whole resolved paths, relative to the data folder when inside it) and, per group, its
    partner nouns and the hash of each inversion's weight files (:func:`inversion_hash`). A cache made in another
    world or from other folders is recomputed, and so is each group whose partners or inversion files changed,
    with a printed message that says what differed (the old file is kept as ``*.old.json``). A cache from before
    these records is checked against the partners its records name and stamped with the current files.

    ``block``: the block of Table 1 (``"ti"``, ``"custom_diffusion"``, ``"dreambooth"``; see
    :func:`evaluate_group`)."""
    from .files import backup
    from .paths import shown_path
    from .world import world_identity

    inv = get_method(block)
    concepts = list(world.concepts_of_interest if concepts is None else concepts)
    settings = {"seeds": seeds, "pair_seeds": pair_seeds, "guidance": guidance_settings(guidance),
                "inversions": {k: "/".join(Path(v).resolve().parts[-2:]) for k, v in sorted(inversions.items())}}
    if inv.name != "ti":  # TI's caches keep the settings they were made with
        settings["inversion_method"] = inv.name
    cache = Path(cache) if cache is not None else None
    where = {k: _where(v) for k, v in sorted(inversions.items())}
    made_from = {"world": world_identity(world), "inversions": where, "groups": {}}
    done: dict[str, list[dict]] = {}
    stored_from: dict | None = None
    dropped: set[str] = set()
    if cache is not None and cache.exists():
        done, made_with, stored_from = _read_cache(cache)
        if json.loads(json.dumps(settings)) != made_with:
            raise ValueError(f"{cache} was made with other settings ({made_with}), not {settings}; "
                             "delete it or pass another cache file")
        changes = _cache_changes(stored_from, made_from["world"], where)
        if changes:
            print(f"Table 1 cache {shown_path(cache)} was made from {'; '.join(changes)}: recomputing all of it "
                  f"(the old file is kept as {backup(cache).name})")
            dropped, done, stored_from = set(done), {}, None
        elif stored_from is not None:
            made_from["groups"] = dict(stored_from.get("groups", {}))
    groups = table1_groups(world, methods, concepts, inv_seeds)
    stale, stamped = [], False
    for setting, method, cs, s in groups:
        key = _group_key(setting, method, [c.name for c in cs], s)
        if key not in done:
            continue
        partners = partners_for(cs[0]) if setting == "noun" else None
        now = _group_made_from(setting, method, cs, s, partners, inversions)
        changes = _group_changes(key, done[key], made_from["groups"].get(key), now)
        if changes:
            stale.append(f"{key}: {'; '.join(changes)}")
            del done[key]
            dropped.add(key)
        elif made_from["groups"].get(key) is None:
            made_from["groups"][key] = now  # a cache from before provenance records: stamp what it was checked against
            stamped = True
    if stale:
        print(f"Table 1 cache {shown_path(cache)}: recomputing {len(stale)} group(s) whose inputs changed (the old "
              f"file is kept as {backup(cache).name}): " + " | ".join(stale[:3]) + (" …" if len(stale) > 3 else ""))
    if cache is not None and cache.exists() and stored_from is None and not dropped:
        print(f"Table 1 cache {shown_path(cache)} records no provenance (made by an older version): its groups were "
              "checked against their partners and are stamped with the current world and inversion files")
    if cache is not None and stamped and not stale:
        _write_cache(cache, settings, made_from, done, dropped)
    for setting, method, cs, s in bar(groups, desc="Table 1", progress=progress):
        key = _group_key(setting, method, [c.name for c in cs], s)
        if key in done:
            continue
        partners = partners_for(cs[0]) if setting == "noun" else []
        done[key] = evaluate_group(world, setting, method, cs, partners, seeds if setting == "noun" else pair_seeds,
                                   inversions, s, layouts, guidance, block=inv.name)
        made_from["groups"][key] = _group_made_from(setting, method, cs, s, partners, inversions)
        if cache is not None:
            _write_cache(cache, settings, made_from, done, dropped)
    return [r for st, m, cs, s in groups for r in done[_group_key(st, m, [c.name for c in cs], s)]]


def stamp_cache(world, cache: str | Path, partners_for, inversions: dict, concepts=None,
                hash_files: bool = True) -> list[str]:
    """Give a :func:`table1` cache made before provenance records its ``"made_from"`` without computing anything:
    the world, the inversion folders, and per group the partners (checked against those its records name) and the
    hashes of the inversion files as they are now (``hash_files=False``: recorded as unknown, e.g. for fits that
    are not part of the repository). Groups whose records name other partners are left unstamped, and
    :func:`table1` recomputes them. Idempotent: a cache that has provenance is left as it is. Returns the keys of
    the groups left unstamped."""
    from .world import world_identity

    cache = Path(cache)
    stored = json.loads(cache.read_text())
    if stored.get("made_from") is not None:
        return []
    done = stored["groups"]
    concepts = {c.name: c for c in (world.concepts_of_interest if concepts is None else concepts)}
    made_from = {"world": world_identity(world), "inversions": {k: _where(v) for k, v in sorted(inversions.items())},
                 "groups": {}}
    left = []
    for key, records in done.items():
        setting, method, names, seed = key.split("|")
        cs = [concepts[n] for n in names.split("+")]
        partners = partners_for(cs[0]) if setting == "noun" else None
        now = _group_made_from(setting, method, cs, int(seed[len("seed"):]), partners, inversions, hash_files)
        if _group_changes(key, records, None, now):
            left.append(key)
        else:
            made_from["groups"][key] = now
    write_text(cache, json.dumps({"settings": stored["settings"], "made_from": made_from, "groups": done}, indent=0))
    return left


def table1_groups(world, methods: Sequence[str] = tuple(TABLE1_METHODS), concepts=None,
                  inv_seeds: Sequence[int] = (0, 1, 2)) -> list[tuple]:
    """The groups of :func:`table1`, ``(setting, method, concepts, inv_seed)``: every concept with nouns, then
    every pair of concepts (:func:`concept_pairs`), under each method and inversion seed."""
    concepts = list(world.concepts_of_interest if concepts is None else concepts)
    groups = [("noun", m, (c,), s) for m in methods for c in concepts for s in inv_seeds]
    return groups + [("concept", m, pair, s) for m in methods for pair in concept_pairs(world, concepts) for s in inv_seeds]


def _read_cache(cache: Path) -> tuple[dict, dict, dict | None]:
    """A :func:`table1` cache's groups, the settings it was made with and what it records it was made from."""
    try:
        stored = json.loads(cache.read_text())
        return stored["groups"], stored["settings"], stored.get("made_from")
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{cache} is not a Table 1 cache ({e}); move it away to recompute") from e


def cached_groups(cache: str | Path) -> set[str]:
    """The keys of the groups a :func:`table1` cache holds (empty when there is no cache)."""
    cache = Path(cache)
    return set(_read_cache(cache)[0]) if cache.exists() else set()


def missing_groups(world, cache: str | Path, methods: Sequence[str] = tuple(TABLE1_METHODS), concepts=None,
                   inv_seeds: Sequence[int] = (0, 1, 2)) -> list[tuple]:
    """The groups of :func:`table1` that ``cache`` does not hold yet."""
    have = cached_groups(cache)
    return [g for g in table1_groups(world, methods, concepts, inv_seeds)
            if _group_key(g[0], g[1], [c.name for c in g[2]], g[3]) not in have]


def value(record: dict, metric: str) -> float:
    """One record's value of a column of :data:`METRICS` (NaN where it is undefined)."""
    if metric == "coi":
        return record["found"][-1]
    if metric == "all_found":
        return float(min(record["found"]))
    if metric == "class_found":
        return float(np.mean(record["found"][:len(record["concepts"])]))
    if metric == "first_found":  # the first named object: the (first) concept's class
        return float(record["found"][0])
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    v = record[metric]
    return float("nan") if v is None else float(v)


def _cluster(record: dict) -> str:
    return "+".join(record["concepts"])


def summarise(records: Sequence[dict]) -> dict[tuple[str, str], dict[str, tuple[float, float, float]]]:
    """Mean and 95 % t-interval of each metric per (setting, method) over concepts (pairs of concepts in the
    concept setting), each concept's value the mean of its inversion seeds' means
    (:func:`compinv_utils.statistics.cluster_t_interval`)."""
    out: dict = {}
    for r in records:
        out.setdefault((r["setting"], r["method"]), []).append(r)
    table = {}
    for key, rs in out.items():
        cl, sub = [_cluster(r) for r in rs], [r["inv_seed"] for r in rs]
        row = {"n": (len(rs),) * 3}
        for metric in METRICS:
            vals = [value(r, metric) for r in rs]
            row[metric] = (cluster_t_interval(vals, cl, sub) if not np.isnan(vals).all()
                           else (float("nan"),) * 3)
        table[key] = row
    return table


def column(records: Sequence[dict], setting: str, method: str, metric: str) -> np.ndarray:
    """Per-image values of one metric for one (setting, method), in record order."""
    vals = [value(r, metric) for r in records if r["setting"] == setting and r["method"] == method]
    if not vals:
        raise ValueError(f"no records for setting={setting!r}, method={method!r}")
    return np.array(vals, dtype=float)


def paired_difference(records: Sequence[dict], setting: str, method: str, metric: str,
                      base: str = "TI") -> tuple[np.ndarray, list, list]:
    """Per-image ``metric`` of ``method`` minus that of ``base`` on the same prompt, inversion seed and
    seed, with each difference's cluster (concept or pair) and subcluster (inversion seed) for
    :func:`compinv_utils.statistics.cluster_t_interval`."""
    def values(m):
        out = {}
        for r in records:
            if r["setting"] == setting and r["method"] == m:
                out[(tuple(r["concepts"]), r["inv_seed"], r["partner"], r["seed"])] = value(r, metric)
        return out

    a, b = values(method), values(base)
    if not a or set(a) != set(b):
        raise ValueError(f"{method!r} and {base!r} do not cover the same prompts and seeds in setting {setting!r}")
    keys = sorted(a, key=str)
    return np.array([a[k] - b[k] for k in keys]), ["+".join(k[0]) for k in keys], [k[1] for k in keys]


def difference_ci(records: Sequence[dict], setting: str, method: str, metric: str,
                  base: str = "TI") -> tuple[float, float, float]:
    """Mean paired difference ``method − base`` and its 95 % t-interval over concepts
    (:func:`compinv_utils.statistics.cluster_t_interval`)."""
    return cluster_t_interval(*paired_difference(records, setting, method, metric, base))


def sweep_point(world, concept, path: str | Path, partners: Sequence[str], samples: int = 4, seed: int = 0) -> dict:
    """How one inversion of ``concept`` (the file at ``path``) behaves: its distance to the nouns (kNN,
    k = 3), its look in "a photo of a S* {class}" (whole-image and object-crop image alignment over
    ``samples`` images) and how it composes with each partner (one image each: CoI likelihood, all
    found, class found, text alignment). Used by the λ sweep of chapter 03."""
    from .embeddings import input_embeddings, knn_distance

    pipe = world.pipe
    load_embedding(pipe, path)
    try:
        e = input_embeddings(pipe, [concept.token])
        vocab = input_embeddings(pipe, world.nouns)
        alone = world.generate([f"a photo of a {concept.token} {concept.superclass}"] * samples, seed=seed)
        dets = world.detect(alone)
        prompts = [f"a {concept.token} {concept.superclass} and {article(x)}" for x in partners]
        comp = world.generate(prompts, seed=seed)
        cdets = world.detect(comp)
        objects = [[concept.superclass, x] for x in partners]
        text = text_alignment(world, comp, [pair_prompt(*o) for o in objects])
    finally:
        unload(pipe, concept.token)
    obj = object_alignment(world, alone, dets, concept.superclass, world.photo_crops(concept))
    return {"knn": float(knn_distance(e, vocab)[0]), "norm": float(e.norm()),
            "image_alignment": float(image_alignment(world, alone, concept.photos).mean()),
            "object_alignment": float(np.nanmean(obj)) if not np.isnan(obj).all() else None,
            "coi": float(np.mean([coi_found(d, o) for d, o in zip(cdets, objects)])),
            "all_found": float(np.mean([all_found(d, o) for d, o in zip(cdets, objects)])),
            "class_found": float(np.mean([found(d, concept.superclass) for d in cdets])),
            "text_alignment": float(np.mean(text))}
