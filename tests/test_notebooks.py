"""The committed chapters (and their solutions) are stripped of volatile metadata and executed top to bottom (nbval re-runs them)."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(ROOT.glob("[0-9]*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb"))  # chapters, appendix, solutions


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stripped_and_executed_in_order(path):
    nb = json.loads(path.read_text())
    assert set(nb["metadata"]) <= {"kernelspec"}, f"{path.name}: run `make strip` (volatile notebook metadata)"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for c in nb["cells"]:
        assert not c.get("metadata"), f"{path.name}: run `make strip` (cell metadata {c.get('metadata')})"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: re-execute it top to bottom in a fresh kernel"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with an error output"
