"""Where things live: the repository, the data folder (``$COMPINV_DATA``) and paths as they are printed."""

from __future__ import annotations

import os
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Where cached results and the toy world's weights live: ``$COMPINV_DATA`` when set (a regular, non-editable
    install sets it to the clone's ``data/``), else the repository's ``data/``."""
    return Path(os.environ.get("COMPINV_DATA") or REPO_ROOT / "data")


def shown_path(path: str | Path) -> str:
    """``path`` for printing and for files that are committed: relative to the repository (or to the folder that
    holds ``data_root()``) when inside it, so outputs read the same in every clone; otherwise unchanged."""
    path = Path(path)
    for base in (REPO_ROOT, data_root().parent):
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)
