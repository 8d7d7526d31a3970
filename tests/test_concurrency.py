"""Two writers at once lose nothing: layout records, the pair table and load_or_compute caches, each written by two
processes that really run at the same time (a fake world stands in for generation and detection, so this takes
seconds)."""
import json
import multiprocessing as mp
import time

import pytest
import torch

from compinv_utils import layout as L
from compinv_utils.pairs import load_or_compute_pair_table
from compinv_utils.course import load_or_compute

NOUNS = ["ball", "cat", "dog", "kite", "boat"]


class FakePipe:
    """Just enough of a pipeline for world_identity."""

    def __init__(self):
        self.unet = torch.nn.Linear(2, 2)
        self.text_encoder = torch.nn.Embedding(4, 2)
        self.text_encoder.get_input_embeddings = lambda: self.text_encoder


class FakeWorld:
    """Generates nothing (slowly, so that two processes overlap) and always detects every noun."""

    name = "fake"
    concepts = NOUNS

    def __init__(self):
        torch.manual_seed(0)
        self.pipe = FakePipe()

    def check_nouns(self, nouns):
        return list(nouns)

    def generate(self, prompts, seed=0, seeds=None, batch_size=16, **kw):
        time.sleep(0.05)
        return [p for p in prompts]

    def detect(self, images, threshold=None):
        return [[(n, (0.1, 0.1, 0.5, 0.5), 0.9) for n in NOUNS if n in im] for im in images]


@pytest.fixture()
def slow_writes(monkeypatch):
    """Every cache write waits a moment first, so that two writers' read-merge-write cycles would overlap without
    the lock."""
    from compinv_utils import course, files

    def slow(write):
        def wrapper(*args, **kwargs):
            time.sleep(0.2)
            return write(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(files, "write_text", slow(files.write_text))
    monkeypatch.setattr(course, "write_text", slow(course.write_text))


def _run_all(target, args_list):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _records_writer(path, jobs):
    L.generate_records(FakeWorld(), jobs, path, batch_size=2, progress=False)


JOBS = L.layout_jobs(NOUNS, seeds=1, templates=("{a} and {b}",))  # 10 pairs x 2 orders = 20 jobs


def test_two_processes_writing_one_records_file_lose_nothing(tmp_path):
    path = tmp_path / "layout.jsonl"
    _run_all(_records_writer, [(path, JOBS[:12]), (path, JOBS[8:])])  # overlapping halves
    records = L.read_records(path)
    assert sorted(L._key(r) for r in records) == sorted(j.key for j in JOBS)  # all 20, each once
    assert sorted((tmp_path / "layout.jsonl.done").read_text().split("\n")[:-1]) == sorted(j.key for j in JOBS)


def test_two_processes_on_the_same_jobs_keep_each_record_once(tmp_path):
    path = tmp_path / "layout.jsonl"
    _run_all(_records_writer, [(path, JOBS), (path, JOBS)])
    assert sorted(L._key(r) for r in L.read_records(path)) == sorted(j.key for j in JOBS)


def _pair_writer(path, nouns, seeds):
    load_or_compute_pair_table(FakeWorld(), path, nouns, seeds=seeds)


def test_two_processes_asking_for_other_pairs_and_seeds_lose_nothing(tmp_path, slow_writes):
    path = tmp_path / "pair_table.json"
    load_or_compute_pair_table(FakeWorld(), path, NOUNS, seeds=2)  # the full table: 10 pairs
    full = json.loads(path.read_text())
    _run_all(_pair_writer, [(path, ["ball", "cat", "kite"], 1), (path, ["dog", "boat"], 3)])
    data = json.loads(path.read_text())
    assert data["seeds"] == 2 and data["pairs"] == full["pairs"]  # the larger table stays, whole
    assert set(data["other_seeds"]["1"]["pairs"]) == {"ball|cat", "ball|kite", "cat|kite"}
    assert set(data["other_seeds"]["3"]["pairs"]) == {"dog|boat"}
    # a subset with the main seeds is read, not recomputed; nothing is written
    stamp = path.stat().st_mtime_ns
    assert set(load_or_compute_pair_table(FakeWorld(), path, ["cat", "dog"], seeds=2)) == {("cat", "dog")}
    assert path.stat().st_mtime_ns == stamp


def test_a_backup_is_never_overwritten_by_a_smaller_file(tmp_path):
    from compinv_utils.files import backup

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"big": list(range(100))}))
    assert backup(path).name == "t.old.json"
    path.write_text(json.dumps({"small": 1}))
    assert backup(path).name == "t.old2.json"  # the larger backup survives
    assert json.loads((tmp_path / "t.old.json").read_text()) == {"big": list(range(100))}
    path.write_text(json.dumps({"bigger": list(range(200))}))
    assert backup(path).name == "t.old.json"  # a larger file may replace it


def test_repeated_pair_table_requests_keep_the_largest_backup(tmp_path):
    path = tmp_path / "pair_table.json"
    load_or_compute_pair_table(FakeWorld(), path, NOUNS, seeds=2)
    load_or_compute_pair_table(FakeWorld(), path, ["cat", "dog"], seeds=1)
    load_or_compute_pair_table(FakeWorld(), path, ["cat", "kite"], seeds=1)
    assert len(json.loads(path.read_text())["pairs"]) == 10
    backups = [json.loads(p.read_text()) for p in tmp_path.glob("pair_table.old*.json")]
    assert max(len(b["pairs"]) for b in backups) == 10


def _cache_writer(path, n):
    load_or_compute(path, lambda: (time.sleep(0.2), {str(n): n})[1], recompute=True,
                    merge=lambda disk, new: disk | new)


def test_load_or_compute_with_merge_keeps_both_writers_results(tmp_path, slow_writes):
    path = tmp_path / "cache.json"
    _run_all(_cache_writer, [(path, 1), (path, 2)])
    assert json.loads(path.read_text()) == {"1": 1, "2": 2}


@pytest.mark.parametrize("content", ["", "{\"a\": \"cat\", \"b\n"])
def test_an_emptied_or_corrupt_records_file_beside_its_tried_list_is_regenerated(tmp_path, content):
    path = tmp_path / "layout.jsonl"
    L.generate_records(FakeWorld(), JOBS[:3], path, progress=False)
    path.write_text(content)  # emptied or corrupt; the .done list remains
    with pytest.warns(UserWarning, match="generating them again"):
        assert len(L.generate_records(FakeWorld(), JOBS[:3], path, progress=False)) == 3
