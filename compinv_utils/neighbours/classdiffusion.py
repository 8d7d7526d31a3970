"""ClassDiffusion's semantic-preservation loss (Huang et al., "ClassDiffusion: More Aligned Personalization Tuning
with Explicit Class Guidance", ICLR 2025; official code github.com/Rbrq03/ClassDiffusion).

ClassDiffusion observes that fine-tuning drifts the personalised phrase "`S*` dog" away from "dog" in the text
encoder's feature space, and keeps it close: with ``f(p)`` the text feature of prompt ``p``,

    ``L_sp = 1 − cos(f("a photo of a S* c"), f("a photo of a c"))``,   ``L = L_rec + λ L_sp``,

for the superclass ``c``. The feature is CLIP's sentence feature: the text encoder's final-layer-normed output
at the end-of-text (EOT) token — the paper's figure 5: "using EOS tokens as text features following CLIP"; the
official ``utils/semantic_preservation_loss.py`` reads the text model's ``pooler_output``, before the text
projection. One fixed prompt pair, built as in the official ``train_class_diffusion.py`` (``"a photo of a " +
modifier + " " + class`` and ``"a photo of a " + class``); ``λ = 1`` (``--spl_weight``, default and
``scripts/train_single.sh``). The class side is computed without gradient; only ``S*``'s rows get the loss's
gradient (the text encoder is frozen, so with Custom Diffusion or DreamBooth the UNet weights get none of it).

In the paper the loss sits on Custom Diffusion; here it is a ``loss_fn`` that :func:`~compinv_utils.inversion.invert`
and every method of :mod:`compinv_utils.methods` take (``get_method(name).fit(world, concept, config,
loss_fn=SemanticPreservationLoss.for_world(world, concept))``).

Deviations from the official code:

- *Which token is "pooled" on SD 1.5.* The official code pools as transformers' CLIP does for a config with
  ``eos_token_id == 2`` (SD 1.5's text encoder config): at ``argmax(input_ids)``. An added placeholder has the
  largest id of the prompt, so for "a photo of a S* dog" the official feature is the output at ``S*``'s
  position, not at EOT (for "a photo of a dog" it is the EOT). ``feature="eot"`` (default) is the paper's
  statement; ``feature="argmax"`` reproduces what the official code computes on SD 1.5.
- *Position embedding of S\*.* The official forward overwrites the embedding layer's output at ``S*``'s position
  with the raw token embedding, dropping that position's position embedding; not reproduced (the inversion's
  hook replaces the token embedding only, so ``S*`` keeps its position embedding, as at generation time).
- *Prior preservation.* The official script applies the loss only without prior preservation (an ``elif``);
  here a method with prior preservation adds ``prior_weight · L_prior`` after this loss, so the two combine.
- *Several concepts.* The official averages ``L_sp`` over the modifier tokens of a multi-concept run; one loss
  here serves one token (a multi-vector token is written ``S* S*_1 … c`` in the prompt).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ..tokens import padded_ids, placeholder_tokens, require_placeholder

FEATURES = ("eot", "argmax")
OFFICIAL_TEMPLATE = "a photo of a {}"  # the official script's prompt pair: "a photo of a S* c" and "a photo of a c"
OFFICIAL_LAMBDA = 1.0  # --spl_weight (default and scripts/train_single.sh)


def semantic_preservation(f_obj: torch.Tensor, f_ref: torch.Tensor) -> torch.Tensor:
    """``1 − cos(f_obj, f_ref)`` for two features ``(D,)`` (or batches ``(B, D)``, averaged)."""
    if f_obj.shape != f_ref.shape or f_obj.dim() not in (1, 2):
        raise ValueError(f"features must both be (D,) or (B, D), got {tuple(f_obj.shape)} and {tuple(f_ref.shape)}")
    return (1 - F.cosine_similarity(f_obj.float(), f_ref.float(), dim=-1)).mean()


def feature_position(input_ids: list[int], eos_token_id: int, feature: str = "eot") -> int:
    """Where the text feature is read: the first end-of-text token (``"eot"``) or the largest id (``"argmax"``, the
    official code's pooling on SD 1.5)."""
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; choose one of {FEATURES}")
    if feature == "argmax":
        return max(range(len(input_ids)), key=lambda i: (input_ids[i], -i))
    if eos_token_id not in input_ids:
        raise ValueError("the prompt has no end-of-text token within the text encoder's length: shorten it")
    return input_ids.index(eos_token_id)


class SemanticPreservationLoss:
    """``loss_fn`` for :func:`~compinv_utils.inversion.invert` and the methods: ``L_rec + λ L_sp`` (module docstring).

    ``template`` holds the subject once (``"{}"``: ``"S* c"`` on one side, ``"c"`` on the other). ``last_log`` holds
    ``rec``, ``sp`` (unweighted) and ``cos``."""

    def __init__(self, pipe, token: str, superclass: str, lam: float = OFFICIAL_LAMBDA,
                 template: str = OFFICIAL_TEMPLATE, feature: str = "eot"):
        if not isinstance(token, str) or not (token.startswith("<") and token.endswith(">")):
            raise ValueError(f"token {token!r} should be the placeholder, like '<mochi>'")
        if not isinstance(superclass, str) or not superclass.strip() or "{" in superclass or token in superclass:
            raise ValueError("superclass must be a word such as 'dog' (not containing the placeholder), "
                             f"got {superclass!r}")
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"λ (lam) must be a finite number >= 0 (the official weight is 1), got {lam!r}")
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template {template!r} must be text with exactly one '{{}}' where the subject goes, "
                             "e.g. 'a photo of a {}'")
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; choose one of {FEATURES}")
        if not pipe.tokenizer(superclass.strip(), add_special_tokens=False).input_ids:
            raise ValueError(f"superclass {superclass!r} tokenizes to nothing")
        self.pipe = pipe
        self.token, self.superclass = token, superclass.strip()
        self.lam, self.template, self.feature = float(lam), template, feature
        self.reference = template.format(self.superclass)
        self._ids: dict = {}
        self._reference_feature: torch.Tensor | None = None  # f of the class prompt (no placeholder: computed once)
        self.last_log: dict = {}

    @classmethod
    def for_world(cls, world, concept, **kwargs) -> "SemanticPreservationLoss":
        """For ``concept`` of ``world`` (its token and superclass), with the official prompt and λ unless given."""
        return cls(world.pipe, concept.token, concept.superclass, **kwargs)

    def prompts(self, n_vectors: int) -> tuple[str, str]:
        """The personalised prompt ("a photo of a S* c") and the class prompt ("a photo of a c")."""
        subject = " ".join(placeholder_tokens(self.token, n_vectors)) + " " + self.superclass
        return self.template.format(subject), self.reference

    def _positions(self, n_vectors: int):
        if n_vectors in self._ids:
            return self._ids[n_vectors]
        tok = self.pipe.tokenizer
        require_placeholder(tok, self.token, n_vectors)
        out = []
        for p in self.prompts(n_vectors):
            ids = padded_ids(tok, p)[0].tolist()
            out.append((torch.tensor(ids), feature_position(ids, tok.eos_token_id, self.feature)))
        self._ids[n_vectors] = out
        return out

    def features(self, n_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``f`` of the personalised prompt (with gradient to the rows the inversion injects) and of the class
        prompt (without), each ``(D,)``."""
        (ids_obj, i_obj), (ids_ref, i_ref) = self._positions(n_vectors)
        te = self.pipe.text_encoder
        f_obj = te(ids_obj[None].to(te.device))[0][0, i_obj]
        if self._reference_feature is None:
            with torch.no_grad():
                self._reference_feature = te(ids_ref[None].to(te.device))[0][0, i_ref]
        return f_obj, self._reference_feature

    def __call__(self, rec: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        if rows.dim() != 2:
            raise ValueError(f"rows must be the token's (n_vectors, D) embedding rows, got shape {tuple(rows.shape)}")
        f_obj, f_ref = self.features(rows.shape[0])
        sp = semantic_preservation(f_obj, f_ref)
        self.last_log = {"rec": float(rec.item()), "sp": float(sp.item()), "cos": float(1 - sp.item())}
        return rec + self.lam * sp.to(rec)
