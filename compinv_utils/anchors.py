"""Semantic inversion: pull the pseudo-word toward a few sparse-coded anchor concepts.

``L_anc = 1/|{e_anc}| Σ_i δ_i ‖e − e_i‖²`` (Eq. 5) over the ``K = |{e_anc}|`` anchors ``e_i`` (input
embeddings of the world's nouns, or COCO's 80 in SD 1.5), with weights ``δ ≥ 0``, ``Σ δ_i = 1`` and at
most ``c`` of them non-zero, and ``L_final = (1 − λ) L_rec + λ L_anc`` (Eq. 9). The paper picks λ by a
sweep (Fig. 8: 0.95 for TI on SD 1.5); λ's meaning depends on the two losses' scales, so each world picks
its own the same way (chapter 03; the toy world's is ``world.settings`` ``lam``).

**Which sparse coder.** δ comes from coding ``e`` on the unit-normalised anchors. The default,
``"nnomp"``, takes the support from orthogonal matching pursuit (exactly ``≤ c`` atoms) and refits
the weights by non-negative least squares: a negative δ_i would make ``L_anc`` *push* ``e`` away
from anchor ``i`` (and unbounded below), so attraction needs non-negative weights. ``"omp"``
(plain OMP, signed coefficients; the weights are their absolute values) and ``"lasso"``
(non-negative LARS-lasso with at most ``c`` steps) are available for comparison.

**Which anchors.** ``choice="semantic"`` (the default) anchors the concept on its meaning, as the
paper's example does (a cat concept: "cat" and "pet", not "car"): the class word and its ``c − 1``
nearest anchor words (cosine of input embeddings), weighted by their similarity to the class word
(``δ_i ∝ max(cos(e_i, e_class), 0)``; the class has the largest weight). The anchors are fixed when the
inversion starts (``e`` equals the class word then), so the photos cannot pull them elsewhere.
``choice="recode"`` re-codes δ from the current ``e`` every ``refresh_every`` steps over all anchors:
as inversion moves ``e`` toward the photos, the code spreads to whatever the photos resemble, their
companions included (chapter 03 compares the two). Either way δ is part of the loss's state, saved in
inversion checkpoints, so a resumed inversion equals an uninterrupted one.

The official code's simplification — one anchor (the class noun) and an element-wise MSE between the
text encoder's *embedding-layer* outputs (token + position embeddings, 77 × D) of the training prompt
and of the same prompt with ``S*`` replaced by the class noun — is :class:`OfficialAnchorLoss`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from .maths import TINY
from .tokens import padded_ids

SPARSE_CODERS = ("nnomp", "omp", "lasso")
CHOICES = ("semantic", "recode")  # how the anchors are chosen (see the module docstring)


def check_lambda(lam: float) -> float:
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"λ (lam) must be in [0, 1], got {lam}")
    return float(lam)


def anchor_embeddings(pipe, words: Sequence[str]) -> torch.Tensor:
    """Input embeddings ``(K, D)`` of the anchor words. A word must be one token; a phrase ("teddy bear")
    must be one token per word and is the mean of them."""
    tok = pipe.tokenizer
    table = pipe.text_encoder.get_input_embeddings().weight
    rows = []
    for w in words:
        ids = []
        for part in w.split():
            pid = tok(part, add_special_tokens=False).input_ids
            if len(pid) != 1:
                raise ValueError(f"anchor word {part!r} (in {w!r}) is not a single token of the vocabulary "
                                 f"(it splits into {tok.convert_ids_to_tokens(pid)}); anchors must be vocabulary words")
            ids += pid
        if not ids:
            raise ValueError("an anchor word is empty")
        rows.append(table[ids].detach().float().mean(0))
    return torch.stack(rows).cpu()


def sparse_weights(e: torch.Tensor, anchors: torch.Tensor, c: int, coder: str = "nnomp") -> np.ndarray:
    """Sparse weights δ ``(K,)``: ``δ ≥ 0``, ``Σ δ = 1``, at most ``c`` non-zero, coding ``e`` ``(D,)`` on
    the unit-normalised rows of ``anchors`` ``(K, D)``."""
    from scipy.optimize import nnls
    from sklearn.linear_model import LassoLars, orthogonal_mp

    k = len(anchors)
    if not 1 <= c <= k:
        raise ValueError(f"c must be between 1 and the number of anchors ({k}), got {c}")
    if coder not in SPARSE_CODERS:
        raise ValueError(f"unknown sparse coder {coder!r}; choose one of {SPARSE_CODERS}")
    A = anchors.double().numpy()
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    x = e.double().numpy()
    if coder == "lasso":
        model = LassoLars(alpha=1e-6, positive=True, max_iter=c, fit_intercept=False).fit(A.T, x)
        w = np.clip(model.coef_, 0, None)
    else:
        with warnings.catch_warnings():  # e equal to an anchor (as at the start) ends OMP early: expected
            warnings.simplefilter("ignore", RuntimeWarning)
            coef = orthogonal_mp(A.T, x, n_nonzero_coefs=c)
        if coder == "omp":
            w = np.abs(coef)
        else:
            support = np.flatnonzero(coef)
            w = np.zeros(k)
            if len(support):
                w[support], _ = nnls(A[support].T, x)
    w[w < 1e-6 * max(w.max(), TINY)] = 0.0
    if w.sum() <= 0:  # e points away from every anchor: fall back to the single most similar one
        w = np.zeros(k)
        w[int(np.argmax(A @ x))] = 1.0
    return w / w.sum()


def anchor_loss(e: torch.Tensor, anchors: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Eq. 5, ``1/K Σ_i δ_i ‖e − e_i‖²`` for ``e`` ``(D,)`` or ``(n, D)`` (averaged over vectors) and
    ``K`` anchors ``(K, D)``."""
    e2 = e if e.dim() == 2 else e[None]
    d = ((e2[:, None, :] - anchors[None].to(e2)) ** 2).sum(-1)  # (n, K)
    return (d * delta.to(e2)).sum(-1).mean() / len(anchors)


class AnchorLoss:
    """``loss_fn`` for :func:`compinv_utils.inversion.invert`: ``(1 − λ) L_rec + λ L_anc``.

    ``last_log`` holds the current anchors and weights (the inversion keeps one entry per step).
    """

    def __init__(self, pipe, words: Sequence[str], lam: float = 0.95, c: int = 3, coder: str = "nnomp",
                 refresh_every: int = 25, choice: str = "semantic"):
        """``lam`` defaults to the paper's 0.95 (SD 1.5); :meth:`for_world` takes the world's own λ.
        ``choice``: ``"semantic"`` (the class word and its nearest anchors, fixed) or ``"recode"`` (sparse-coded
        from the current embedding every ``refresh_every`` steps with the sparse ``coder``)."""
        words = words if isinstance(words, str) else list(words)
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise TypeError(f"words must be a list of anchor words, e.g. ['cat', 'dog'], got {words!r}")
        if len(words) == 0:
            raise ValueError("no anchor words given: pass a non-empty list, e.g. the world's nouns")
        if coder not in SPARSE_CODERS:
            raise ValueError(f"unknown sparse coder {coder!r}; choose one of {SPARSE_CODERS}")
        if choice not in CHOICES:
            raise ValueError(f"unknown anchor choice {choice!r}; choose one of {CHOICES}")
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (c, refresh_every)):
            raise TypeError(f"c and refresh_every must be integers, got c={c!r}, refresh_every={refresh_every!r}")
        self.lam = check_lambda(lam)
        self.words = list(words)
        self.anchors = anchor_embeddings(pipe, self.words)
        if not 1 <= c <= len(self.words):
            raise ValueError(f"c must be between 1 and the number of anchors ({len(self.words)}), got {c}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.c, self.coder, self.refresh_every, self.choice = c, coder, refresh_every, choice
        self.delta: torch.Tensor | None = None
        self.last_log: dict = {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed inversion continues with the same anchors."""
        return {"delta": None if self.delta is None else self.delta.clone()}

    def load_state_dict(self, state: dict) -> None:
        delta = state.get("delta")
        if delta is not None and tuple(delta.shape) != (len(self.words),):
            raise ValueError(f"anchor weights of shape {tuple(delta.shape)} do not fit {len(self.words)} anchors")
        self.delta = None if delta is None else delta.clone().float()

    def semantic(self, e: torch.Tensor) -> torch.Tensor:
        """δ for ``choice="semantic"``: ``e`` ``(n, D)`` is the class word at the start of an inversion; its
        nearest anchor (the class itself when it is an anchor word) and the ``c − 1`` anchors nearest to that
        one, weighted by ``max(cos, 0)`` to it and normalised to sum 1."""
        a = torch.nn.functional.normalize(self.anchors.double(), dim=1)
        x = torch.nn.functional.normalize(e.detach().double().cpu().mean(0), dim=0)
        cls = int(torch.argmax(a @ x))
        sim = (a @ a[cls]).clamp_min(0)
        keep = torch.argsort(sim, descending=True)[:self.c]
        delta = torch.zeros(len(a), dtype=torch.float64)
        delta[keep] = sim[keep]
        delta[cls] = 1.0  # the class word itself (cos 1), kept even when other anchors tie with it
        return (delta / delta.sum()).float()

    @classmethod
    def for_world(cls, world, **kwargs) -> "AnchorLoss":
        """Anchored on the world's nouns with the world's λ and c (``world.settings``) unless given."""
        kwargs.setdefault("lam", world.settings.lam)
        kwargs.setdefault("c", world.settings.anchors_c)
        return cls(world.pipe, world.nouns, **kwargs)

    def code(self, e: torch.Tensor) -> torch.Tensor:
        """δ for each vector of ``e`` ``(n, D)``, averaged over vectors (still ≤ c per vector)."""
        ws = [sparse_weights(v.detach().float().cpu(), self.anchors, self.c, self.coder) for v in e]
        return torch.tensor(np.mean(ws, 0), dtype=torch.float32)

    def __call__(self, rec: torch.Tensor, e: torch.Tensor, step: int) -> torch.Tensor:
        if self.choice == "semantic":
            if self.delta is None:
                self.delta = self.semantic(e)
        elif self.delta is None or step % self.refresh_every == 0:
            self.delta = self.code(e)
        anc = anchor_loss(e, self.anchors, self.delta)
        active = torch.nonzero(self.delta).flatten().tolist()
        self.last_log = {"anchors": {self.words[i]: round(float(self.delta[i]), 4) for i in active},
                         "rec": rec.item(), "anc": anc.item()}
        if self.lam == 0.0:
            return rec
        return (1 - self.lam) * rec + self.lam * anc


def embedding_layer(text_encoder) -> torch.nn.Module:
    """The text encoder's embedding layer (token + position embeddings; ``CLIPTextEmbeddings``)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings


def choose_lambda(sweep: dict[float, float], tolerance: float = 0.15) -> float:
    """The balance rule this repository uses to pick λ from a sweep (stated before any sweep was run):
    the **largest** λ whose image alignment to the user photos (whole images, the paper's measure, mean
    over concepts) stays within ``tolerance`` of plain TI's (λ = 0) — the strongest pull toward the
    anchors that still keeps the concept's look. ``sweep`` maps λ to that mean image alignment and
    must contain λ = 0."""
    if 0.0 not in sweep:
        raise ValueError("the sweep needs λ = 0 (plain TI) as its reference")
    floor = sweep[0.0] - tolerance
    return max(lam for lam, ia in sweep.items() if ia >= floor)


class OfficialAnchorLoss:
    """The official code's variant: one anchor word and ``mean((E(p) − E(p'))²)`` over all 77 × D
    elements, where ``E`` is the text encoder's embedding layer (token + position embeddings), ``p`` the
    prompt with the placeholder ("a photo of a S* cat") and ``p'`` the same prompt with the placeholder
    replaced by the anchor word ("a photo of a cat cat"), as in the official training script. Only the
    placeholder's position differs, so this is ``‖e − e_word‖² / (77 · D)`` for a one-vector word."""

    def __init__(self, pipe, token: str, word: str, lam: float = 0.95, template: str = "a photo of a {}",
                 superclass: str | None = None):
        self.lam = check_lambda(lam)
        anchor_embeddings(pipe, [word])  # validates the word
        tok = pipe.tokenizer
        subject = f"{token} {superclass or word}"
        self.pipe, self.token, self.prompt = pipe, token, template.format(subject)
        self.reference = template.format(subject.replace(token, word))
        self.ids_token = None  # tokenized at the first call: the placeholder is added by the inversion itself
        with torch.no_grad():
            ids_word = padded_ids(tok, self.reference, pipe.text_encoder.device)
            self.target = embedding_layer(pipe.text_encoder)(input_ids=ids_word).float()
        self.last_log: dict = {}

    def __call__(self, rec: torch.Tensor, e: torch.Tensor, step: int) -> torch.Tensor:
        if self.ids_token is None:
            if self.token not in self.pipe.tokenizer.get_vocab():
                raise ValueError(f"placeholder {self.token!r} is not in the tokenizer: use this loss inside invert()")
            self.ids_token = padded_ids(self.pipe.tokenizer, self.prompt, self.pipe.text_encoder.device)
            if self.ids_token.shape != self.target.shape[:2]:
                raise ValueError("the prompt and its reference tokenize to different lengths")
        out = embedding_layer(self.pipe.text_encoder)(input_ids=self.ids_token).float()
        anc = torch.nn.functional.mse_loss(out, self.target)
        self.last_log = {"rec": rec.item(), "anc": anc.item()}
        if self.lam == 0.0:
            return rec
        return (1 - self.lam) * rec + self.lam * anc
