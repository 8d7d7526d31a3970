"""The form of the course: every setup cell is the Colab bootstrap plus a few lines around `start_chapter()`,
chapter 00 is a lesson of bounded size, and `start_chapter` sets up what the chapters rely on."""
import json
import os
import re
import sys
from pathlib import Path

import pytest

from compinv_utils import Chapter, start_chapter
from compinv_utils.chapter import HUB_WORLDS
from compinv_utils.course import FindingChanged

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
BLOCK_END = re.compile(r"^\s+os\.chdir\(.*\)\s*(#.*)?$")  # the bootstrap block's last line (tests/test_colab_setup.py)
MAX_SETUP_LINES = 15  # lines of a setup cell after the bootstrap block, blank lines included
MAX_CHAPTER00_CODE = 12_000  # characters of code in chapter 00


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_is_the_bootstrap_and_a_few_lines(path):
    lines = code_cells(path)[0].splitlines()
    ends = [i for i, line in enumerate(lines) if BLOCK_END.match(line)]
    assert ends, f"{path.name}: the setup cell has no bootstrap block"
    after = lines[ends[0] + 1:]
    while after and not after[0].strip():
        after.pop(0)
    assert len(after) <= MAX_SETUP_LINES, (f"{path.name}: {len(after)} lines after the bootstrap block (at most "
                                           f"{MAX_SETUP_LINES}); move constants to the cell that first uses them")
    assert any("start_chapter(" in line for line in after), f"{path.name}: the setup cell does not call start_chapter()"


def test_chapter_00_is_a_lesson_of_bounded_size():
    path = ROOT / "notebooks" / "00_toy_world.ipynb"
    n = sum(len(c) for c in code_cells(path))
    assert n <= MAX_CHAPTER00_CODE, f"chapter 00 has {n} characters of code (at most {MAX_CHAPTER00_CODE})"
    text = path.read_text(encoding="utf-8")
    assert "first edition" not in text, "chapter 00 tells the world's build history (it belongs in the appendix)"


def test_start_chapter_loads_the_world_and_reads_the_switches(monkeypatch, capsys):
    monkeypatch.setenv("COMPINV_RECOMPUTE", "1")
    monkeypatch.setenv("COMPINV_STUDENT", "1")
    ch = start_chapter("toy")
    assert isinstance(ch, Chapter) and ch.world.name == "toy"
    assert ch.recompute and ch.student and ch.claim.student
    assert ch.data == ch.world.data_dir
    assert os.environ["HF_HUB_OFFLINE"] == "1", "the toy world never reaches the hub"
    out = capsys.readouterr().out
    assert "world: toy" in out and "student mode: True" in out
    with pytest.warns(FindingChanged, match="a changed finding"):  # student mode: a warning, not a stop
        ch.claim(False, "a changed finding")
    assert ch.claim.changed == ["a changed finding"]
    strict = start_chapter("toy", recompute=False, student=False)
    assert not strict.recompute and not strict.student
    with pytest.raises(AssertionError, match="finding changed"):
        strict.claim(False, "a changed finding")


def test_start_chapter_refuses_to_switch_the_hub_setting_in_a_running_kernel(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", sys.modules.get("huggingface_hub") or object())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "sd15" in HUB_WORLDS
    with pytest.raises(RuntimeError, match="restart the kernel"):
        start_chapter("sd15")


CHAPTERS = [p for p in NOTEBOOKS if re.match(r"0\d_", p.name)]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_links_its_solutions_and_checks_itself(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    md = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    exercises = [m for m in md if m.startswith("## Exercises")]
    assert exercises, f"{path.name}: no exercises"
    link = f"solutions/{path.name[:2]}_solutions.ipynb"
    assert f"]({link})" in exercises[0], f"{path.name}: the exercises do not link {link}"
    solutions = path.parent / link
    assert solutions.exists(), f"{path.name}: {link} is missing"
    back = "".join(json.loads(solutions.read_text(encoding="utf-8"))["cells"][0]["source"])
    assert f"](../{path.name})" in back, f"{link} does not link back to {path.name}"
    check = [m for m in md if m.startswith("## Check yourself")]
    assert check and check[0].count("<details>") >= 2, f"{path.name}: no self-check questions with answers"
    assert "## References" in check[0], f"{path.name}: no references"
