"""Token embeddings, the core distribution of composable words, and how far a token sits from it.

The *core distribution* is the set of input embeddings of the world's nouns (the toy world's nouns;
COCO's 80 class nouns in SD 1.5). A noun of several tokens ("teddy bear") is the mean of its tokens.

Entropy (the paper does not define it; this repository uses): the Shannon entropy, in nats, of the
energy distribution of a vector over its coordinates, ``p_d = x_d**2 / ||x||**2``,
``H(x) = -sum_d p_d log p_d``. It is scale-free, at most ``log D`` (energy spread evenly over all
coordinates) and low when a few coordinates carry the vector. It is reported for the input
embedding and for the text encoder's output at the token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .maths import TINY, ratio
from .tokens import padded_ids, token_ids, token_indices


@torch.no_grad()
def input_embeddings(pipe, words: Sequence[str]) -> torch.Tensor:
    """Input (token) embeddings ``(N, D)`` float32: the mean over a word's tokens."""
    table = pipe.text_encoder.get_input_embeddings().weight
    return torch.stack([table[token_ids(pipe.tokenizer, w)].float().mean(0) for w in words]).cpu()


@torch.no_grad()
def encoder_outputs(pipe, words: Sequence[str], template: str = "a photo of a {}") -> torch.Tensor:
    """The text encoder's output (last hidden state) at each word's last token inside ``template``: ``(N, D)``."""
    out = []
    for w in words:
        prompt = template.format(w)
        pos = token_indices(pipe.tokenizer, prompt, w)[-1]
        ids = padded_ids(pipe.tokenizer, prompt, pipe.text_encoder.device)
        out.append(pipe.text_encoder(ids)[0][0, pos].float().cpu())
    return torch.stack(out)


def norms(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1)


def energy_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``p_d = x_d**2 / ||x||**2`` for each row of ``x`` ``(N, D)``; at most ``log D``."""
    p = x.float() ** 2
    p = ratio(p, p.sum(-1, keepdim=True))
    return -(p * torch.log(p.clamp(min=TINY))).sum(-1)


def knn_distance(x: torch.Tensor, ref: torch.Tensor, k: int = 3, exclude_self: bool = False) -> torch.Tensor:
    """Mean Euclidean distance from each row of ``x`` to its ``k`` nearest rows of ``ref``.

    ``exclude_self``: ``x`` is ``ref`` and a row must not count itself (leave-one-out)."""
    if k < 1 or k > len(ref) - int(exclude_self):
        raise ValueError(f"k must be in [1, {len(ref) - int(exclude_self)}], got {k}")
    d = torch.cdist(x.float(), ref.float())
    if exclude_self:
        d = d + torch.diag(torch.full((len(d),), float("inf")))
    return d.topk(k, largest=False).values.mean(-1)


def mahalanobis(x: torch.Tensor, ref: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
    """Mahalanobis distance of each row of ``x`` to ``ref``'s distribution (Ledoit–Wolf shrunk covariance).

    ``leave_one_out``: ``x`` is ``ref``; each row is scored against the others."""
    from sklearn.covariance import LedoitWolf

    xs, rs = x.double().numpy(), ref.double().numpy()
    if leave_one_out:
        out = []
        for i in range(len(rs)):
            lw = LedoitWolf().fit(np.delete(rs, i, 0))
            out.append(np.sqrt(lw.mahalanobis(xs[i:i + 1])[0]))
        return torch.tensor(out, dtype=torch.float32)
    lw = LedoitWolf().fit(rs)
    return torch.tensor(np.sqrt(lw.mahalanobis(xs)), dtype=torch.float32)


def ood_scores(x: torch.Tensor, ref: torch.Tensor, k: int = 3) -> dict[str, torch.Tensor]:
    """Out-of-distribution scores of ``x`` against the core distribution ``ref``: kNN distance,
    Mahalanobis distance, norm and energy entropy."""
    return {"knn": knn_distance(x, ref, k), "mahalanobis": mahalanobis(x, ref), "norm": norms(x),
            "entropy": energy_entropy(x)}


def vocabulary_scores(ref: torch.Tensor, k: int = 3) -> dict[str, torch.Tensor]:
    """The same scores for the core distribution itself, each word left out of its own reference."""
    return {"knn": knn_distance(ref, ref, k, exclude_self=True), "mahalanobis": mahalanobis(ref, ref, True),
            "norm": norms(ref), "entropy": energy_entropy(ref)}


def percentile_rank(value: float, reference: torch.Tensor) -> float:
    """Percentage of ``reference`` values strictly below ``value``."""
    return float((reference < value).float().mean() * 100)


def project_2d(ref: torch.Tensor, extra: torch.Tensor | None = None, method: str = "pca", seed: int = 0,
               n_neighbors: int = 5) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D coordinates for ``ref`` and ``extra`` rows. PCA is fitted on ``ref`` alone (the extra points
    are placed in the core distribution's own axes); UMAP is fitted on both together."""
    r = ref.float().numpy()
    e = None if extra is None else extra.float().numpy()
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(2, random_state=seed).fit(r)
        return pca.transform(r), (None if e is None else pca.transform(e))
    if method == "umap":
        import umap

        both = r if e is None else np.concatenate([r, e])
        emb = umap.UMAP(n_neighbors=min(n_neighbors, len(both) - 1), random_state=seed, n_jobs=1).fit_transform(both)
        return emb[:len(r)], (None if e is None else emb[len(r):])
    raise ValueError(f"unknown projection {method!r}; use 'pca' or 'umap'")
