"""Small numerical guards shared by the measures: a ratio, a unit vector and a cosine that never divide by zero."""
from __future__ import annotations

import torch

TINY = 1e-12  # the smallest denominator any measure divides by


def ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part / whole`` with ``whole`` held at least :data:`TINY` (an empty map gives 0, not nan)."""
    return part / whole.clamp(min=TINY)


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along ``dim`` (a zero vector stays zero)."""
    return ratio(x, x.norm(dim=dim, keepdim=True))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine between the rows of ``a`` and the vector ``b`` (zero vectors give 0)."""
    return ratio(a @ b, a.norm(dim=-1) * b.norm())
