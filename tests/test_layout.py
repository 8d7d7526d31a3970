import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compinv_utils.layout import (Job, box_iou, box_to_mask, check_box, generate_records, layout_jobs,
                                  mean_box_baseline, mean_iou, nearest_noun, predict_boxes, read_records, split_by_pair,
                                  train_layout_mlp)

KEYS = {"prompt", "a", "b", "template", "seed", "box_a", "box_b", "score_a", "score_b"}


def test_box_checks_and_masks():
    assert check_box((0.1, 0.2, 0.5, 0.9)) == (0.1, 0.2, 0.5, 0.9)
    with pytest.raises(ValueError, match="outside"):
        check_box((-0.1, 0, 0.5, 0.5))
    with pytest.raises(ValueError, match="degenerate"):
        check_box((0.5, 0.1, 0.5, 0.9))
    m = box_to_mask((0, 0, 0.5, 0.5), 8)
    assert m.shape == (8, 8) and m.sum() == 16 and m[0, 0] == 1 and m[7, 7] == 0
    assert box_to_mask((0, 0, 0.5, 1), 16, 24).shape == (16, 24)
    assert box_to_mask((0.51, 0.51, 0.52, 0.52), 4).sum() == 1  # tiny boxes keep one cell
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)


def test_jobs_cover_both_orders_and_the_split_has_no_leak():
    jobs = layout_jobs(["cat", "dog", "kite"], seeds=2, templates=("{a} and {b}",))
    assert len(jobs) == 3 * 2 * 2 and len({j.seed for j in jobs}) == len(jobs)
    assert Job("cat", "kite", "{a} and {b}", 0).prompt() == "a cat and a kite"
    recs = [{"a": a, "b": b, "box_a": [0, 0, .5, .5], "box_b": [.5, .5, 1, 1], "template": "t", "seed": i}
            for i, (a, b) in enumerate([("cat", "dog"), ("dog", "cat"), ("cat", "kite"), ("kite", "dog"), ("dog", "kite")] * 3)]
    train, test = split_by_pair(recs, 0.34, seed=1)
    key = lambda r: tuple(sorted((r["a"], r["b"])))  # noqa: E731
    assert train and test and not ({key(r) for r in train} & {key(r) for r in test})
    base = mean_box_baseline(train)
    assert set(base) <= {"cat", "dog", "kite"}


def test_records_schema_resume_and_corrupt_lines(toy_world, tmp_path):
    jobs = layout_jobs(["cat", "kite"], seeds=2, templates=("{a} and {b}",))
    path = tmp_path / "layout.jsonl"
    recs = generate_records(toy_world, jobs[:2], path, batch_size=4, progress=False)
    assert all(set(r) == KEYS for r in recs)
    for r in recs:
        check_box(r["box_a"]), check_box(r["box_b"])
    with path.open("a") as f:  # an interrupted write: a partial last line
        f.write('{"prompt": "a cat and a ki')
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        again = generate_records(toy_world, jobs, path, batch_size=4, progress=False)
    assert again[: len(recs)] == recs  # nothing already computed was lost
    done = (tmp_path / "layout.jsonl.done").read_text().splitlines()
    assert sorted(done) == sorted(j.key for j in jobs)  # every job tried exactly once
    with pytest.raises(ValueError, match="unknown noun"):
        generate_records(toy_world, [Job("cat", "zebra", "{a} and {b}", 99)], tmp_path / "x.jsonl", progress=False)


def test_mlp_learns_a_planted_layout():
    g = torch.Generator().manual_seed(0)
    nouns = [f"n{i}" for i in range(8)]
    feats = {n: torch.randn(16, generator=g) for n in nouns}
    left, right = [0.05, 0.3, 0.45, 0.7], [0.55, 0.3, 0.95, 0.7]
    recs = [{"a": a, "b": b, "box_a": left if i > j else right, "box_b": right if i > j else left}
            for i, a in enumerate(nouns) for j, b in enumerate(nouns) if a != b]  # the higher index stands left
    model, losses = train_layout_mlp(recs, feats, steps=1500)
    pred = [predict_boxes(model, feats[r["a"]], feats[r["b"]]) for r in recs]
    assert losses[-1] < losses[0] / 3
    assert mean_iou(pred, recs) > 0.8


def test_nearest_noun(toy_world):
    assert nearest_noun(toy_world.pipe, "cat", toy_world.nouns) == "cat"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_sharded_generation_matches_one_process(tmp_path):
    script = Path(__file__).with_name("shard_layout.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = tmp_path / "single.jsonl"
    subprocess.run([sys.executable, str(script), str(single)], check=True, env=env, timeout=600)
    sharded = tmp_path / "sharded.jsonl"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), str(sharded)], check=True, env=env, timeout=600)
    a = [json.loads(x) for x in single.read_text().splitlines()]
    b = [json.loads(x) for x in sharded.read_text().splitlines()]
    assert [(r["a"], r["b"], r["seed"]) for r in a] == [(r["a"], r["b"], r["seed"]) for r in b]
    for x, y in zip(a, b):
        assert max(abs(u - v) for u, v in zip(x["box_a"] + x["box_b"], y["box_a"] + y["box_b"])) < 0.02
    assert len(list(tmp_path.glob("sharded.part*of2.jsonl"))) == 2


def test_save_and_load_layout_mlp(tmp_path):
    from compinv_utils.layout import load_layout_mlp, save_layout_mlp

    feats = {n: torch.randn(8) for n in ("cat", "dog", "kite")}
    recs = [{"a": "cat", "b": "dog", "box_a": [0, 0, .5, .5], "box_b": [.5, .5, 1, 1]}]
    model, _ = train_layout_mlp(recs, feats, steps=5)
    save_layout_mlp(model, tmp_path / "m.pt", "input embedding")
    again, name = load_layout_mlp(tmp_path / "m.pt")
    assert name == "input embedding" and again.nouns == model.nouns
    assert predict_boxes(again, feats["cat"], feats["dog"]) == predict_boxes(model, feats["cat"], feats["dog"])
