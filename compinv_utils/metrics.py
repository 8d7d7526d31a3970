"""What the paper measures: detection of the nouns of a prompt (CoI likelihood), CLIP text and image
alignment, and cluster-bootstrap intervals.

**CoI likelihood**, as the official evaluation (``utils/clip_eval.py``) defines it: whether the
detector finds the prompt's *last* object — the partner in "a S* cat and a kite", the second concept's
class in "a S* cat and a S' teddy" (DETR at score 0.8 in the official code and in the sd15 world; the
toy detector at its own threshold). Beside it: *all named objects found* and, under its own name,
*class found* (the concept's own class noun detected), which the official code does not measure.

**Intervals** come from what was drawn independently: concepts (or pairs of concepts) and, within each,
inversion seeds — not the images generated from them. With a handful of concepts a percentile bootstrap
over them is too narrow (it covers the truth less often than it claims; ``tests/test_evaluation.py``), so
every claim uses :func:`cluster_t_interval`: a Student t-interval over the per-concept means, each the
mean of its inversion seeds' means. :func:`cluster_bootstrap` stays for comparison.
"""

from __future__ import annotations

import json
from itertools import combinations
from typing import Sequence

import numpy as np
from PIL import Image

from .progress import bar
from .world import best_box, crop


def article(noun: str) -> str:
    """"a cat", "an umbrella"."""
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def found(detections, noun: str) -> bool:
    """Whether ``noun`` is among one image's detections ``[(label, box, score)]``."""
    return any(label == noun for label, _, _ in detections)


def detection_rate(world, images: Sequence[Image.Image], noun: str, threshold: float = 0.5) -> np.ndarray:
    """Per image, 1.0 if the world's detector finds ``noun`` (score >= threshold), else 0.0."""
    return np.array([float(found(d, noun)) for d in world.detect(images, threshold)])


def text_alignment(world, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
    """Per image, the CLIP cosine similarity to its text (the paper's evaluation multiplies this by 2.5)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    return (world.image_features(images) * world.text_features(texts)).sum(-1).numpy()


def image_alignment(world, images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> np.ndarray:
    """Per image, the mean CLIP image cosine similarity to the user photos (whole images, the paper's)."""
    if isinstance(photos, Image.Image) or isinstance(images, Image.Image):
        raise TypeError("images and photos must be lists of PIL images; wrap a single image in a list")
    if len(photos) == 0:
        raise ValueError("no photos to compare with: image alignment needs the concept's photos (concept.photos)")
    if len(images) == 0:
        raise ValueError("no images to score")
    return (world.image_features(images) @ world.image_features(photos).T).mean(1).numpy()


def object_alignment(world, images: Sequence[Image.Image], detections, noun: str,
                     photo_crops: Sequence[Image.Image]) -> np.ndarray:
    """Per image, the mean CLIP image cosine similarity between the detected ``noun``'s crop and the
    photos' object crops: image alignment on the object, not on the background it was photographed
    on. NaN where ``noun`` is not detected."""
    out = np.full(len(images), np.nan)
    idx = [k for k, d in enumerate(detections) if best_box(d, noun) is not None]
    if idx:
        crops = [crop(images[k], best_box(detections[k], noun)) for k in idx]
        out[idx] = (world.image_features(crops) @ world.image_features(list(photo_crops)).T).mean(1).numpy()
    return out


def coi_found(detections, objects: Sequence[str]) -> float:
    """CoI likelihood of one image, as the official evaluation defines it: is the prompt's last named
    object (``objects[-1]``) detected?"""
    return float(found(detections, objects[-1]))


def all_found(detections, objects: Sequence[str]) -> float:
    """Is every named object of the prompt detected?"""
    return float(all(found(detections, o) for o in objects))


def _cells(values, clusters, subclusters) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Per cluster, the sums and counts of its subclusters' values (NaN values dropped), and the mean."""
    x = np.asarray(values, dtype=float).ravel()
    cl = np.asarray(clusters, dtype=object).ravel()
    sub = np.zeros(len(x), dtype=object) if subclusters is None else np.asarray(subclusters, dtype=object).ravel()
    if not len(x) == len(cl) == len(sub):
        raise ValueError(f"{len(x)} values but {len(cl)} cluster and {len(sub)} subcluster labels")
    keep = ~np.isnan(x)
    x, cl, sub = x[keep], cl[keep], sub[keep]
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    cells: dict = {}
    for v, c, s in zip(x, cl, sub):
        cell = cells.setdefault(c, {}).setdefault(s, [0.0, 0])
        cell[0] += v
        cell[1] += 1
    sums = [np.array([cell[0] for cell in cells[c].values()]) for c in cells]
    counts = [np.array([cell[1] for cell in cells[c].values()]) for c in cells]
    return sums, counts, float(x.mean())


def _replicates(sums, counts, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    stats = np.empty(n_boot)
    for b in range(n_boot):
        total = n = 0.0
        for k in rng.integers(0, len(sums), len(sums)):
            pick = rng.integers(0, len(sums[k]), len(sums[k]))
            total += sums[k][pick].sum()
            n += counts[k][pick].sum()
        stats[b] = total / n
    return stats


def cluster_means(values, clusters, subclusters=None) -> np.ndarray:
    """Per cluster (a concept, or a pair of concepts), the mean over its subclusters (inversion seeds) of
    each subcluster's mean value; NaN values are dropped first. Returns ``(K,)`` in order of appearance."""
    sums, counts, _ = _cells(values, clusters, subclusters)
    return np.array([np.mean(s / c) for s, c in zip(sums, counts)])


def _t_bounds(mean: float, se: float, df: float, level: float) -> tuple[float, float, float]:
    from scipy.stats import t

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    if df < 1 or not np.isfinite(se):
        return float(mean), float("nan"), float("nan")
    h = float(t.ppf(0.5 + level / 2, df)) * se
    return float(mean), float(mean - h), float(mean + h)


def cluster_t_interval(values, clusters, subclusters=None, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval ``(mean, low, high)`` over clusters: the mean of :func:`cluster_means` and
    ``mean ± t_{K−1} · s / √K`` over its ``K`` cluster means. The seeds' spread reaches the interval through
    each cluster's mean. Made for few clusters (a handful of concepts), where a percentile bootstrap over them
    is too narrow. With one cluster the bounds are NaN (nothing to estimate a spread from): no claim can rest
    on one concept. Paired differences (method minus baseline, per image) go in as ``values``."""
    m = cluster_means(values, clusters, subclusters)
    k = len(m)
    se = float(m.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
    return _t_bounds(float(m.mean()), se, k - 1, level)


def cluster_t_interval_diff(a, a_clusters, b, b_clusters, a_sub=None, b_sub=None,
                            level: float = 0.95) -> tuple[float, float, float]:
    """``mean(a) − mean(b)`` over the cluster means of two independent samples (e.g. the inverted words,
    clusters = concepts, subclusters = seeds, against the vocabulary's nouns, one cluster each), with a Welch
    t-interval (Welch–Satterthwaite degrees of freedom)."""
    ma, mb = cluster_means(a, a_clusters, a_sub), cluster_means(b, b_clusters, b_sub)
    if len(ma) < 2 or len(mb) < 2:
        return float(ma.mean() - mb.mean()), float("nan"), float("nan")
    va, vb = ma.var(ddof=1) / len(ma), mb.var(ddof=1) / len(mb)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va ** 2 / (len(ma) - 1) + vb ** 2 / (len(mb) - 1)) if va + vb > 0 else len(ma) + len(mb) - 2
    return _t_bounds(float(ma.mean() - mb.mean()), se, float(df), level)


def excludes_zero(interval: tuple[float, float, float]) -> bool:
    """Whether an interval ``(mean, low, high)`` lies wholly on one side of zero (NaN bounds: never)."""
    _, lo, hi = interval
    return bool(lo > 0 or hi < 0)


def cluster_bootstrap(values, clusters, subclusters=None, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile interval ``(mean, low, high)`` from a two-level cluster bootstrap.

    ``values`` ``(n,)`` are per-image numbers (NaN ones are dropped); ``clusters`` ``(n,)`` the
    independently drawn unit each belongs to (a concept, or a pair of concepts); ``subclusters`` ``(n,)``
    the unit drawn within it (an inversion seed). Each replicate draws clusters with replacement, then
    within each drawn cluster its subclusters with replacement, and averages all images of the drawn
    cells. With one cell per cluster it is the ordinary bootstrap over clusters; paired differences
    (one value per image, method minus baseline) go in as values."""
    sums, counts, mean = _cells(values, clusters, subclusters)
    stats = _replicates(sums, counts, n_boot, np.random.default_rng(seed))
    a = (1 - level) / 2
    return mean, float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def cluster_bootstrap_diff(a, a_clusters, b, b_clusters, a_sub=None, b_sub=None, n_boot: int = 2000,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``mean(a) − mean(b)`` of two independent samples, each resampled by its own clusters (and
    subclusters), with a percentile interval: e.g. the inverted words (clusters: concepts, subclusters:
    inversion seeds) against the vocabulary's nouns (each noun its own cluster)."""
    sa, ca, ma = _cells(a, a_clusters, a_sub)
    sb, cb, mb = _cells(b, b_clusters, b_sub)
    rng = np.random.default_rng(seed)
    d = _replicates(sa, ca, n_boot, rng) - _replicates(sb, cb, n_boot, rng)
    q = (1 - level) / 2
    return ma - mb, float(np.quantile(d, q)), float(np.quantile(d, 1 - q))


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval ``(mean, low, high)`` of a 1-D sample."""
    x = np.asarray(values, dtype=float).ravel()
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    _check_bootstrap(n_boot, level, x)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_diff_ci(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Difference of means ``mean(a) − mean(b)`` of two independent samples, with a percentile-bootstrap interval."""
    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(x) == 0 or len(y) == 0:
        raise ValueError("both samples need values")
    _check_bootstrap(n_boot, level, x, y)
    rng = np.random.default_rng(seed)
    d = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1) - y[rng.integers(0, len(y), (n_boot, len(y)))].mean(1)
    q = (1 - level) / 2
    return float(x.mean() - y.mean()), float(np.quantile(d, q)), float(np.quantile(d, 1 - q))


def partners(world, concept, candidates: Sequence[str] | None = None, k: int | None = None) -> list[str]:
    """The first ``k`` (default: the world's ``settings.n_partners``) candidate partner nouns (default: the world's ``settings.partners``) for ``concept``
    (a concept of interest, or a superclass word): never its superclass, never anything seen in its user
    photos (``concept.in_photos``; a partner the photos hold would be "found" because inversion absorbed
    it), never a pair held out from the world's training."""
    superclass = getattr(concept, "superclass", concept)
    seen = set(getattr(concept, "in_photos", ()))
    held = {tuple(sorted(p)) for p in world.held_out_pairs}
    candidates = world.settings.partners if candidates is None else candidates
    k = world.settings.n_partners if k is None else k
    return [x for x in candidates
            if x != superclass and x not in seen and tuple(sorted((x, superclass))) not in held][:k]


def pair_prompt(a: str, b: str) -> str:
    return f"{article(a)} and {article(b)}"


def pair_detection_table(world, pairs: Sequence[tuple[str, str]] | None = None, seeds: int = 2, seed: int = 0,
                         batch_size: int = 32, progress: bool = True) -> dict[tuple[str, str], dict[str, float]]:
    """For each noun pair, generate "a A and a B" ``seeds`` times and report how often A, B and both are
    detected. Defaults to every pair of the world's nouns."""
    pairs = list(combinations(world.concepts, 2)) if pairs is None else list(pairs)
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


def _read_pair_tables(path) -> dict[int, dict[str, dict]]:
    """A pair-table cache as ``{seeds: {"a|b": {...}}}``, the main table first, then those of other seed counts."""
    try:
        data = json.loads(path.read_text())
        tables = {int(data["seeds"]): dict(data["pairs"])}
        for n, t in data.get("other_seeds", {}).items():
            tables.setdefault(int(n), {}).update(t["pairs"])
        return tables
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"the pair table {path} is not a pair-table cache ({type(exc).__name__}: {exc})") from exc


def _write_pair_tables(path, tables: dict[int, dict], main: int, world: dict | None = None) -> None:
    import json

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
    from .world import shown_path, world_identity

    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1 (images per pair), got {seeds!r}")
    seeds = int(seeds)
    path = Path(path)
    nouns = list(world.concepts if nouns is None else nouns)
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
            tables = _read_pair_tables(path)
            made_in = (json.loads(path.read_text()).get("made_from") or {}).get("world")
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
        data = json.loads(path.read_text())
        if data.get("made_from"):
            return False
        tables = _read_pair_tables(path)
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
    prompts = [f"{article(subject)} and {article(x)}" for x in partners for _ in range(seeds)]
    wanted = [x for x in partners for _ in range(seeds)]
    images = world.generate(prompts, seed=seed, batch_size=batch_size)
    dets = world.detect(images)
    out = {"prompts": prompts, "images": images, "partners": wanted,
           "partner_found": np.array([float(found(d, x)) for d, x in zip(dets, wanted)]), "detections": dets}
    if subject_noun is not None:
        out["subject_found"] = np.array([float(found(d, subject_noun)) for d in dets])
    return out


def _check_bootstrap(n_boot: int, level: float, *samples: np.ndarray) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    for x in samples:
        if not np.isfinite(x).all():
            raise ValueError(f"{int((~np.isfinite(x)).sum())} value(s) are NaN or infinite; drop or fix them first")
