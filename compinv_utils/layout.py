"""Spatial inversion, part 1: where should two concepts go? A layout data set and a layout MLP.

Noun pairs are composed into prompts, images are generated, the world's detector finds each
noun's box, and :class:`LayoutMLP` learns ``l_i, l_j = MLP(e_i, e_j)`` from the two words'
embeddings. A token outside the noun vocabulary (an inverted ``S*``) uses its nearest noun.

Records (JSON lines, one per image where *both* nouns were found)::

    {"prompt": "a cat and a kite", "a": "cat", "b": "kite", "template": "{a} and {b}", "seed": 3,
     "box_a": [x0, y0, x1, y1], "box_b": [...], "score_a": 0.98, "score_b": 0.91}

Generation is resumable: a ``<file>.done`` file lists every job tried (found or not) and ``<file>.missed``
those whose nouns were not both found. The files are merged with what is on disk and rewritten atomically
after each batch, under a lock on the folder, so processes that share them lose nothing; a partial last
line (from older, appending versions) is dropped on resume. It shards over processes with
``accelerate`` (``torchrun --nproc_per_node N``): each process writes its own part, and the main
process merges them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .maths import cosine, is_whole
from .progress import bar

Box = tuple[float, float, float, float]
LAYOUT_TEMPLATES = ("{a} and {b}", "a photo of {a} and {b}", "{a} next to {b}")
OFFICIAL_BOXES: tuple[Box, Box] = ((0.1, 0.2, 0.5, 0.8), (0.6, 0.2, 0.95, 0.8))  # the official code's constants


def check_box(box: Sequence[float], name: str = "box") -> Box:
    """Validate ``(x0, y0, x1, y1)`` in [0, 1] with positive width and height."""
    if len(box) != 4:
        raise ValueError(f"{name} must have 4 numbers (x0, y0, x1, y1), got {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise ValueError(f"{name} {list(box)} lies outside [0, 1]; boxes are fractions of the image size")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name} {list(box)} is degenerate: need x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def box_to_mask(box: Sequence[float], height: int, width: int | None = None) -> torch.Tensor:
    """A ``(height, width)`` 0/1 mask of the pixels whose centres fall inside the box (at least one pixel)."""
    x0, y0, x1, y1 = check_box(box)
    width = width or height
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    m = ((ys[:, None] >= y0) & (ys[:, None] <= y1) & (xs[None] >= x0) & (xs[None] <= x1)).float()
    if m.sum() == 0:  # a box smaller than one cell: keep the cell holding its centre
        m[min(int((y0 + y1) / 2 * height), height - 1), min(int((x0 + x1) / 2 * width), width - 1)] = 1
    return m


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Data set generation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    a: str
    b: str
    template: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.a}|{self.b}|{self.template}|{self.seed}"

    def prompt(self) -> str:
        from .prompts import article

        return self.template.format(a=article(self.a), b=article(self.b))


def layout_jobs(nouns: Sequence[str], seeds: int, templates: Sequence[str] = LAYOUT_TEMPLATES,
                pairs: Sequence[tuple[str, str]] | None = None, seed0: int = 0) -> list[Job]:
    """Every (pair, order, template, seed): both word orders, so that a layout cannot hide in the order."""
    pairs = list(combinations(sorted(nouns), 2)) if pairs is None else list(pairs)
    jobs, k = [], seed0
    for a, b in pairs:
        for first, second in ((a, b), (b, a)):
            for t in templates:
                for _ in range(seeds):
                    jobs.append(Job(first, second, t, k))
                    k += 1
    return jobs


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """Records of a JSONL file and the number of corrupt or partial lines dropped."""
    good, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            check_box(rec["box_a"], "box_a")
            check_box(rec["box_b"], "box_b")
            _key(rec)
            good.append(rec)
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            bad += 1
    return good, bad


def _key(record: dict) -> str:
    """The job key of a record."""
    return Job(str(record["a"]), str(record["b"]), str(record["template"]), int(record["seed"])).key


def read_records(path: str | Path) -> list[dict]:
    """Read a JSONL file, dropping a partial last line and any corrupt line (with a warning)."""
    path = Path(path)
    if not path.exists():
        return []
    good, bad = _read_lines(path)
    if bad:
        import warnings

        warnings.warn(f"{path}: skipped {bad} corrupt or partial line(s); {len(good)} records kept")
    return good


def _write_records(path: Path, records: list[dict]) -> None:
    from .files import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _sorted(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["a"], r["b"], r["template"], r["seed"]))


def _sidecars(path: Path) -> tuple[Path, Path]:
    """``<file>.done`` (every job tried) and ``<file>.missed`` (the tried jobs whose nouns were not both found)."""
    return path.with_suffix(path.suffix + ".done"), path.with_suffix(path.suffix + ".missed")


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _state(path: Path) -> tuple[list[dict], int, list[str], set[str] | None]:
    """What is on disk: the records, how many lines were not records, the tried jobs (in order) and the missed ones
    (None for files written before misses were listed)."""
    done_path, missed_path = _sidecars(path)
    records, bad = _read_lines(path) if path.exists() else ([], 0)
    return records, bad, _lines(done_path), set(_lines(missed_path)) if missed_path.exists() else None


def _finished(path: Path, records: list[dict], done: list[str], missed: set[str] | None) -> tuple[set[str], str]:
    """The keys of the jobs that need no work, and a warning ("" when none) when jobs marked tried must be made
    again because their records are gone (a deleted, emptied or corrupt records file)."""
    done_path = _sidecars(path)[0]
    have = {_key(r) for r in records}
    if not done:
        return have, ""
    if not path.exists():
        return have, (f"{path} is missing but {done_path} lists {len(done)} tried jobs: generating them again")
    if missed is None:  # older files: no list of misses; an empty records file beside tried jobs is lost work
        if not records:
            return have, (f"{path} holds no records but {done_path} lists {len(done)} tried jobs (an emptied or "
                          "corrupt file?): generating them again")
        return have | set(done), ""
    lost = [k for k in done if k not in have and k not in missed]
    msg = (f"{len(lost)} job(s) that {done_path} lists as tried and found are missing from {path} (an emptied or "
           "corrupt file?): generating them again") if lost else ""
    return have | (set(done) & missed), msg


def _merge_write(path: Path, records: list[dict], done: list[str], missed: set[str]) -> list[dict]:
    """Under the folder's lock: merge ``records`` and the tried / missed job keys with what is on disk now (another
    process may have written meanwhile), write all three files atomically and return every record."""
    from .files import locked

    with locked(path):
        disk, _, disk_done, disk_missed = _state(path)
        out, seen = [], set()
        for r in disk + records:
            k = _key(r)
            if k not in seen:
                seen.add(k)
                out.append(r)
        tried = list(dict.fromkeys(disk_done + done))
        miss = (_misses(disk, disk_done, disk_missed) | set(missed)) - seen
        _write_records(path, out)  # records first: a job kept but not yet marked tried is skipped anyway
        _write_marks(path, tried, miss)
    return out


def _misses(records: list[dict], done: list[str], missed: set[str] | None) -> set[str]:
    """The missed jobs; for files written before misses were listed, the tried jobs without a record."""
    if missed is not None:
        return set(missed)
    have = {_key(r) for r in records}
    return {k for k in done if k not in have}


def _write_marks(path: Path, tried: list[str], missed: set[str]) -> None:
    from .files import write_text

    done_path, missed_path = _sidecars(path)
    write_text(missed_path, "".join(k + "\n" for k in tried if k in missed))
    write_text(done_path, "".join(k + "\n" for k in tried))


def generate_records(world, jobs: Sequence[Job], path: str | Path, batch_size: int = 32, threshold: float = 0.5,
                     progress: bool = True) -> list[dict]:
    """Generate and detect ``jobs`` (skipping those already tried), adding kept records to ``path``. Returns every
    record in the file.

    ``<path>.done`` lists every job tried and ``<path>.missed`` those whose nouns were not both found. After each
    batch the three files are merged with what is on disk and rewritten atomically while holding a lock on the
    folder (:func:`compinv_utils.files.locked`), so an interruption never truncates them and processes that share
    the file lose nothing (each skips the jobs the others finished). A job listed as tried whose record is gone
    (records file deleted, emptied or corrupt) is generated again, with a warning; a file none of whose lines is a
    record is refused rather than overwritten.
    """
    import warnings

    from .files import locked

    if isinstance(jobs, Job):
        raise TypeError("jobs must be a list of Job; wrap a single job in a list")
    jobs = list(jobs)
    if not all(isinstance(j, Job) for j in jobs):
        raise TypeError("jobs must be a list of Job (see layout_jobs)")
    if not is_whole(batch_size, 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a detection score and must be in [0, 1], got {threshold}")
    for j in jobs:
        world.check_nouns([j.a, j.b])
    path = Path(path)
    with locked(path):
        records, bad, done, missed = _state(path)
    if bad and not records and bad > 1:
        raise ValueError(f"{path} holds {bad} lines and none is a layout record; it is not a records file: "
                         "move it away or pass another path")
    if bad:
        warnings.warn(f"{path}: skipped {bad} corrupt or partial line(s); {len(records)} records kept")
    finished, lost = _finished(path, records, done, missed)
    if lost:
        warnings.warn(lost)
    todo = [j for j in jobs if j.key not in finished]
    if not todo:
        return records
    if bad or lost:  # drop the corrupt lines and forget the lost jobs' "tried" marks
        with locked(path):
            _write_records(path, records)
            _write_marks(path, [k for k in done if k in finished], _misses(records, done, missed))
    for i in bar(range(0, len(todo), batch_size), desc="layout data", progress=progress):
        chunk = todo[i:i + batch_size]
        with locked(path):  # another process sharing the file may have done some of them meanwhile
            now_records, _, now_done, now_missed = _state(path)
        chunk = [j for j in chunk if j.key not in _finished(path, now_records, now_done, now_missed)[0]]
        if not chunk:
            continue
        images = world.generate([j.prompt() for j in chunk], seeds=[j.seed for j in chunk], batch_size=batch_size)
        new, miss = [], set()
        for j, dets in zip(chunk, world.detect(images, threshold)):
            best = {}
            for label, box, score in dets:
                if label in (j.a, j.b) and score > best.get(label, (None, -1))[1]:
                    best[label] = (box, score)
            if j.a in best and j.b in best:
                new.append({"prompt": j.prompt(), "a": j.a, "b": j.b, "template": j.template, "seed": j.seed,
                            "box_a": [round(v, 5) for v in best[j.a][0]],
                            "box_b": [round(v, 5) for v in best[j.b][0]],
                            "score_a": round(best[j.a][1], 4), "score_b": round(best[j.b][1], 4)})
            else:
                miss.add(j.key)
        records = _merge_write(path, new, [j.key for j in chunk], miss)
    with locked(path):
        return _state(path)[0]


def generate_layout_dataset(world, jobs: Sequence[Job], path: str | Path, batch_size: int = 32,
                            progress: bool = True) -> list[dict]:
    """Generate the data set, sharded over the processes of an ``accelerate`` ``PartialState``
    (one process without a launcher). The main process merges the parts into ``path`` (sorted)."""
    from accelerate import PartialState

    from .files import locked

    state = PartialState(cpu=world.device.type == "cpu")
    path = Path(path)
    if state.num_processes == 1:
        generate_records(world, jobs, path, batch_size, progress=progress)
        with locked(path):
            records = _sorted(_state(path)[0])
            _write_records(path, records)
        return records
    part = path.with_name(f"{path.stem}.part{state.process_index}of{state.num_processes}{path.suffix}")
    with state.split_between_processes(list(jobs)) as mine:
        generate_records(world, mine, part, batch_size, progress=progress and state.is_main_process)
    state.wait_for_everyone()
    records = []
    if state.is_main_process:
        for r in range(state.num_processes):
            records += read_records(path.with_name(f"{path.stem}.part{r}of{state.num_processes}{path.suffix}"))
        with locked(path):
            records = _sorted({_key(r): r for r in read_records(path) + records}.values())
            _write_records(path, records)
    state.wait_for_everyone()
    return records if state.is_main_process else read_records(path)


def migrate_missed(path: str | Path) -> bool:
    """Give a records file written before misses were listed its ``<file>.missed``: the tried jobs (``.done``) that
    have no record. Idempotent; returns whether it wrote the file."""
    from .files import locked

    path = Path(path)
    done_path, missed_path = _sidecars(path)
    with locked(path):
        if missed_path.exists() or not done_path.exists() or not path.exists():
            return False
        records, bad, done, _ = _state(path)
        if bad or not records:
            raise ValueError(f"{path} has {bad} corrupt line(s) and {len(records)} records: its misses cannot be "
                             "told from lost records; regenerate it")
        _write_marks(path, done, _misses(records, done, None))
    return True


# ---------------------------------------------------------------------------------------------
# Splits, baselines, the MLP
# ---------------------------------------------------------------------------------------------


def split_by_pair(records: Sequence[dict], test_frac: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train/test split in which no unordered noun pair appears on both sides."""
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac is the share of noun pairs held out and must be in (0, 1), got {test_frac}")
    pairs = sorted({tuple(sorted((r["a"], r["b"]))) for r in records})
    if len(pairs) < 2:
        raise ValueError(f"{len(records)} records of {len(pairs)} noun pair(s): a split by pair needs records of at "
                         "least two pairs (generate the layout data set first: generate_layout_dataset)")
    rng = np.random.default_rng(seed)
    test_pairs = {pairs[i] for i in rng.choice(len(pairs), max(1, round(test_frac * len(pairs))), replace=False)}
    train = [r for r in records if tuple(sorted((r["a"], r["b"]))) not in test_pairs]
    test = [r for r in records if tuple(sorted((r["a"], r["b"]))) in test_pairs]
    return train, test


def mean_box_baseline(train: Sequence[dict]) -> dict[str, Box]:
    """Per noun, the mean of its boxes over the training records (either side of a pair)."""
    boxes: dict[str, list] = {}
    for r in train:
        boxes.setdefault(r["a"], []).append(r["box_a"])
        boxes.setdefault(r["b"], []).append(r["box_b"])
    return {n: tuple(np.mean(v, 0).tolist()) for n, v in boxes.items()}


class LayoutMLP(nn.Module):
    """``(e_i, e_j) -> (box_i, box_j)``: two token embeddings ``(B, D)`` each to two boxes ``(B, 2, 4)``
    as ``(x0, y0, x1, y1)`` in [0, 1]."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 8))

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([e_i, e_j], -1)).view(-1, 2, 4)
        centre = torch.sigmoid(out[..., :2])
        half = torch.sigmoid(out[..., 2:]) / 2
        return torch.cat([centre - half, centre + half], -1).clamp(0, 1)


def train_layout_mlp(train: Sequence[dict], features: dict[str, torch.Tensor], steps: int = 1500, lr: float = 3e-3,
                     batch_size: int = 128, seed: int = 0, progress: bool = False) -> tuple[LayoutMLP, list[float]]:
    """Fit a :class:`LayoutMLP` on records with per-noun feature vectors ``features[noun]`` ``(D,)``.
    Each record is also used with its two nouns swapped. Returns the model and the loss curve."""
    train = list(train)
    if not train:
        raise ValueError("no training records: pass layout records (read_records / split_by_pair), not an empty list")
    missing = sorted({n for r in train for n in (r["a"], r["b"])} - set(features))
    if missing:
        raise ValueError(f"the records name noun(s) {missing[:10]} that have no feature vector in features "
                         f"({len(features)} nouns): compute the features of every noun of the records")
    _check_features(features, "features")
    torch.manual_seed(seed)
    nouns = sorted(features)
    idx = {n: i for i, n in enumerate(nouns)}
    F = torch.stack([features[n].float() for n in nouns])
    F = F / F.norm(dim=-1, keepdim=True)
    a = torch.tensor([idx[r["a"]] for r in train] + [idx[r["b"]] for r in train])
    b = torch.tensor([idx[r["b"]] for r in train] + [idx[r["a"]] for r in train])
    y = torch.tensor([[r["box_a"], r["box_b"]] for r in train] + [[r["box_b"], r["box_a"]] for r in train], dtype=torch.float32)
    model = LayoutMLP(F.shape[1])
    model.register_buffer("features", F)
    model.nouns = nouns
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in bar(range(steps), desc="layout MLP", progress=progress):
        k = torch.randint(0, len(a), (batch_size,), generator=g)
        pred = model(F[a[k]], F[b[k]])
        loss = (pred - y[k]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


def _check_features(features: dict, what: str) -> None:
    """Every feature vector is 1-D, of one dimension, finite and non-zero (they are normalised to unit length)."""
    dims = {tuple(v.shape) for v in features.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"{what} must be vectors (D,) of one dimension, got shapes {sorted(dims)}")
    bad = [n for n, v in features.items() if not bool(torch.isfinite(v).all()) or float(v.float().norm()) == 0]
    if bad:
        raise ValueError(f"{what} of {bad[:10]} are zero, NaN or infinite: a layout needs a direction to normalise")


@torch.no_grad()
def predict_boxes(model: LayoutMLP, feat_i: torch.Tensor, feat_j: torch.Tensor) -> tuple[Box, Box]:
    """Boxes for two feature vectors ``(D,)`` (normalised as in training)."""
    for name, f in (("feat_i", feat_i), ("feat_j", feat_j)):
        if f.dim() != 1 or f.shape[0] != model.dim:
            raise ValueError(f"{name} has shape {tuple(f.shape)} but this layout MLP takes vectors ({model.dim},): "
                             "use the features it was trained on (load_layout_mlp says which)")
        if not bool(torch.isfinite(f).all()) or float(f.float().norm()) == 0:
            raise ValueError(f"{name} is zero, NaN or infinite: a layout needs a feature with a direction")
    fi, fj = (f.float() / f.float().norm() for f in (feat_i, feat_j))
    out = model(fi[None], fj[None])[0]
    return tuple(out[0].tolist()), tuple(out[1].tolist())


def mean_iou(pred: Sequence[tuple[Box, Box]], records: Sequence[dict]) -> float:
    """Mean IoU over both boxes of every record."""
    if len(pred) != len(records):
        raise ValueError(f"{len(pred)} predictions for {len(records)} records: predict one pair of boxes per record")
    if not records:
        raise ValueError("no records to score")
    ious = [box_iou(p[0], r["box_a"]) for p, r in zip(pred, records)]
    ious += [box_iou(p[1], r["box_b"]) for p, r in zip(pred, records)]
    return float(np.mean(ious))


def save_layout_mlp(model: LayoutMLP, path: str | Path, features: str) -> None:
    """Save the MLP with the name of the features it was trained on ("input embedding" / "encoder output")."""
    from .files import torch_save

    torch_save({"state_dict": model.state_dict(), "dim": model.dim, "features": features, "nouns": model.nouns}, path)


def load_layout_mlp(path: str | Path) -> tuple[LayoutMLP, str]:
    """Load a saved MLP (tensors and plain values only: ``weights_only=True``); returns it and the name of
    its features."""
    from .files import torch_load

    fix = "save it again with save_layout_mlp (chapter 04)"
    blob = torch_load(path, "layout MLP file", fix)
    if not isinstance(blob, dict) or not {"state_dict", "dim", "features", "nouns"} <= set(blob):
        raise ValueError(f"layout MLP file {path} lacks state_dict/dim/features/nouns; {fix}")
    model = LayoutMLP(blob["dim"])
    model.register_buffer("features", torch.zeros(len(blob["nouns"]), blob["dim"]))
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"layout MLP file {path} does not hold a layout MLP of dimension {blob['dim']} (its weights "
                         f"do not fit: {str(exc)[:200]}); {fix}") from exc
    model.nouns = blob["nouns"]
    return model.eval(), blob["features"]


def nearest_noun(pipe, word: str, nouns: Sequence[str]) -> str:
    """The noun whose input embedding is most cosine-similar to ``word``'s (e.g. an inverted ``S*``). The word must
    be one token of the pipeline's tokenizer (a loaded placeholder, or a word of its vocabulary): a placeholder that
    is not loaded would otherwise be read as the pieces it splits into."""
    from .embeddings import input_embeddings

    if not nouns:
        raise ValueError("no nouns to choose from")
    tok = pipe.tokenizer
    if word not in tok.get_vocab():
        pieces = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids)
        if len(pieces) != 1 or pieces[0] == tok.unk_token:
            raise ValueError(f"{word!r} is not a token of the pipeline (it splits into {pieces}): "
                             + ("load its embedding first (load_embedding, or the method's load)" if word.startswith("<")
                                else "use a one-token word or a loaded placeholder"))

    e = input_embeddings(pipe, [word])[0]
    V = input_embeddings(pipe, list(nouns))
    sims = cosine(V, e)
    return list(nouns)[int(sims.argmax())]


def main(argv=None):
    """Generate the layout data set: ``python -m compinv_utils.layout --out data/toy/layout/layout.jsonl``
    (shard with ``torchrun --nproc_per_node N -m compinv_utils.layout ...``)."""
    import argparse

    from .world import load_world

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--world", default=None, help="toy (default) or sd15")
    p.add_argument("--out", default="data/toy/layout/layout.jsonl")
    p.add_argument("--seeds", type=int, default=1, help="images per (pair, order, template)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    world = load_world(args.world)
    records = generate_layout_dataset(world, layout_jobs(world.nouns, args.seeds), args.out, args.batch_size)
    print(f"{len(records)} records in {args.out}")


if __name__ == "__main__":
    main()
