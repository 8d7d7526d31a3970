"""Small numerical guards shared by the measures: a ratio, a unit vector and a cosine that never divide by zero,
a model's features as unit vectors, and the whole-number check of the settings."""
from __future__ import annotations

import numpy as np
import torch

TINY = 1e-12  # the smallest denominator any measure divides by


def is_whole(v, at_least: int = 0) -> bool:
    """Whether ``v`` is an integer (Python's or NumPy's, not a bool) of at least ``at_least``."""
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= at_least


def ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part / whole`` with ``whole`` held at least :data:`TINY` (an empty map gives 0, not nan)."""
    return part / whole.clamp(min=TINY)


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along ``dim`` (a zero vector stays zero)."""
    return ratio(x, x.norm(dim=dim, keepdim=True))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine between the rows of ``a`` and the vector ``b`` (zero vectors give 0)."""
    return ratio(a @ b, a.norm(dim=-1) * b.norm())


def unit_features(out) -> torch.Tensor:
    """A model's features (a tensor, or an output with ``pooler_output``) as unit vectors, float32 on the CPU."""
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return unit(feats.float().cpu())
