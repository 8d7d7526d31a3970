"""What every chapter's setup needs besides the world: claims that stop the chapter (or only warn, in
student mode), a load-or-compute cache for results, and legible figures.

A chapter states each finding as ``claim(condition, "what was found")``. In the committed chapters a finding
that stops holding stops the notebook (and fails nbval); a student who changes a setting runs with
``COMPINV_STUDENT=1`` and gets a warning instead, so the chapter carries on.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from .files import write_text


class FindingChanged(UserWarning):
    """A chapter's finding did not hold in this run (student mode)."""


class Claims:
    """``claims(condition, message)``: raise ``AssertionError`` (strict) or warn (student mode). Counts both
    (``held``, ``changed``); returns nothing, so a claim on a cell's last line prints nothing."""

    def __init__(self, student: bool | None = None):
        self.student = os.environ.get("COMPINV_STUDENT") == "1" if student is None else bool(student)
        self.held: list[str] = []
        self.changed: list[str] = []

    def __call__(self, condition: Any, message: str) -> None:
        ok = bool(condition)
        (self.held if ok else self.changed).append(message)
        if not ok:
            text = f"finding changed: {message}"
            if not self.student:
                raise AssertionError(text + " (set COMPINV_STUDENT=1 to see it as a warning and carry on)")
            warnings.warn(text, FindingChanged, stacklevel=2)

    def summary(self) -> str:
        """One line: how many findings held, and which did not."""
        line = f"{len(self.held)} finding(s) held"
        if self.changed:
            line += f"; {len(self.changed)} changed: " + "; ".join(self.changed)
        return line


def load_or_compute(path: str | Path, compute: Callable[[], Any], recompute: bool = False,
                    merge: Callable[[Any, Any], Any] | None = None) -> Any:
    """The JSON result cached at ``path``, or ``compute()`` written there (atomically) and returned.

    ``recompute=True`` computes anew; the old file is first copied beside it as ``*.old.json`` (a backup that is
    larger than the file is never overwritten: the copy then goes to ``*.old2.json`` …), so nothing is lost. A file
    that is not valid JSON raises an error naming it. ``merge(on_disk, computed)``: what to write when the file
    exists by the time the computation ends (another process may have written it meanwhile); the write holds a
    lock on the folder (:func:`compinv_utils.files.locked`), so two processes never overwrite each other.
    """
    from .files import backup, locked

    path = Path(path)

    def read() -> Any:
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"the cache {path} is not valid JSON ({exc}); delete it or run with "
                             "COMPINV_RECOMPUTE=1 to compute it again") from exc

    if path.exists() and not recompute:
        return read()
    with locked(path):
        saved = backup(path)  # before computing: an interrupted computation loses nothing either
    value = compute()
    with locked(path):
        if path.exists() and merge is not None:
            try:
                on_disk, readable = read(), True
            except ValueError:  # unreadable: it was kept as the backup
                readable = False
            if readable:  # an error of merge itself is not swallowed
                value = merge(on_disk, value)
        if path.exists() and saved is None:  # another process wrote it while this one computed
            backup(path)
        write_text(path, json.dumps(value, indent=1))
    return value


def setup_figures(dpi: int = 110) -> None:
    """Figures at ``dpi`` (>= 100) with a font size that keeps labels from overlapping."""
    import matplotlib as mpl

    if dpi < 100:
        raise ValueError(f"dpi must be at least 100 for legible figures, got {dpi}")
    mpl.rcParams.update({"figure.dpi": dpi, "savefig.dpi": dpi, "font.size": 9, "axes.titlesize": 9,
                         "figure.titlesize": 10})
