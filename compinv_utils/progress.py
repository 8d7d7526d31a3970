"""Progress bars: ``tqdm.auto`` (a widget in Jupyter, text elsewhere) that a headless run can switch off."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def bar(iterable=None, progress: bool = True, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, hidden when ``progress`` is False or ``TQDM_DISABLE=1`` (set by
    ``make tutorial`` so that executed chapters keep no frozen progress widgets)."""
    if not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
