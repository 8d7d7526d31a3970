"""Every number a chapter's summary or exercises quote comes from the run: it appears in the chapter's own stored
outputs (printed by a cell, read from its caches). A summary that still quotes an earlier run fails here."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0[1-9]_*.ipynb"))
DECIMAL = re.compile(r"(?<![\w.])(?<!SD )[+\-−]?\d+\.\d+")  # "SD 1.5" names a model, not a result


def printed(nb: dict) -> set[str]:
    """The decimal numbers in a notebook's stored outputs (text streams and plain-text results), unsigned."""
    texts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")))
            texts.append("".join(out.get("data", {}).get("text/plain", "")))
    return {m.lstrip("+-−") for m in DECIMAL.findall("\n".join(texts))}


def quoted(nb: dict) -> list[str]:
    """The decimal numbers in the markdown from the chapter's summary on (equations and inline code, where settings
    such as ``tolerance=0.05`` are written, left out)."""
    cells = nb["cells"]
    start = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                  and "".join(c["source"]).lstrip().startswith("## Summary")), None)
    if start is None:
        return []
    text = "\n".join("".join(c["source"]) for c in cells[start:] if c["cell_type"] == "markdown")
    return DECIMAL.findall(re.sub(r"`[^`]*`", "", re.sub(r"\$[^$]*\$", "", text)))


def test_the_check_finds_a_number_the_run_did_not_print():
    nb = {"cells": [{"cell_type": "code", "source": [], "outputs": [{"text": "gain +0.31 [0.06, 0.56]"}]},
                    {"cell_type": "markdown", "source": ["## Summary\n", "a gain of 0.31 (0.06 to 0.56), not 0.39; `lr=0.5`"]}]}
    assert [q for q in quoted(nb) if q.lstrip("+-−") not in printed(nb)] == ["0.39"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_summary_numbers_come_from_the_run(path):
    nb = json.loads(path.read_text())
    missing = [q for q in quoted(nb) if q.lstrip("+-−") not in printed(nb)]
    assert not missing, (f"{path.name}: the summary or exercises quote {missing}, which no output of the chapter "
                         "prints; print them in a cell or correct the prose")
