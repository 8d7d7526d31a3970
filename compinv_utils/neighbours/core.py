"""CoRe: context regularisation of a learned word (Wu et al., "CoRe: Context-Regularized Text Embedding Learning
for Text-to-Image Personalization", AAAI 2025; official code github.com/pangy9/CoRe).

Where the paper's anchors (:mod:`compinv_utils.anchors`) act on the pseudo-word ``S*`` itself, CoRe acts on the
words *around* it. Each step draws one regularisation prompt ``p`` ("a {} on grass") and forms the object
prompt ``p(S*)`` and the reference prompt ``p(c)`` with the superclass ``c``. The *context tokens* ``C`` are all
tokens from the start token to the end token (both included) except ``S*`` (resp. ``c``); token ``i`` of
``p(S*)`` is paired with the token at the same place relative to the word in ``p(c)``.

- **Context embedding term** (``cosine="token"``, the default): with ``h`` the text encoder's output (its last
  hidden state, what the UNet reads) ``L_emb = 1 − 1/|C| Σ_{i∈C} cos(h_i(p(S*)), h_i(p(c)))``.
- **Context attention term**: with ``ā_i^l`` token ``i``'s cross-attention probability averaged over heads and
  pixels in cross-attention layer ``l`` (``L`` layers), for noisy latents ``z_t^b`` of the concept's photos
  (``b = 1..B``), ``L_attn = 1/L Σ_l Σ_b 1/|C| Σ_{i∈C} (ā_i^l(p(S*), z_t^b) − ā_i^l(p(c), z_t^b))²`` — the
  official code's reduction (mean over tokens, *sum* over the batch, mean over layers).
- **Total**, as the official script balances it: ``L = L_rec + λ_emb L_emb + λ_attn L_attn`` with the official
  ``λ_emb = 1.5e-4`` (``--embedding_cosine_weight``) and ``λ_attn = 0.05`` (``--attention_mean_weight``) of
  ``bash_script/train.sh`` (SD 2.1-base, 300 steps, lr 5e-3, batch 6). The reference side carries no gradient;
  only ``S*``'s rows move (and, with a method that trains UNet weights, the attention term reaches those too).
- **Embedding rescaling**: from step ``rescale[0]`` (official 120) to ``rescale[1]`` (official 180) the
  learned rows are rescaled after each update to the norm they had at ``rescale[0]`` (``norm_target="start"``,
  the official code: one joint norm over all vectors, ``‖E‖_F``), which stops the norm's growth in the middle of
  the 300 steps. ``norm_target="vocabulary"`` instead rescales each row to the mean norm of the vocabulary's
  rows (the reading "toward the vocabulary's norm"; the official code does not do this).

Regularisation prompts: the official lists (``regularization_prompt_flie/{Animate,Inanimate,universal}.txt``,
49 to 102 prompts each) use words the toy world's tokenizer does not know; the default here,
:data:`SCENE_PROMPTS`, names the five settings both worlds can draw, and :meth:`CoReLoss.for_world` adds
compositions with the world's partner nouns ("a {} and a kite", "a {} next to a kite"). Pass ``prompts=`` for
the official lists on SD.

Deviations from the official code (what this module does differently, and why):

- *Cosine axis.* The official ``get_context_embedding_loss`` calls ``F.cosine_similarity(..., dim=1)`` on
  ``(1, |C|, D)`` tensors, i.e. a cosine per *feature channel* across the context tokens, averaged over the
  ``D`` channels. The paper describes a similarity of the context tokens' output vectors; ``cosine="token"``
  (default) is that per-token cosine, ``cosine="channel"`` reproduces the official code. The paper's method
  section was not readable here (only its abstract, overview and figure captions): the per-token reading is
  this module's, checked against the code's channel version in the tests.
- *Latents of the attention term.* The official code reuses the reconstruction batch's noisy latents and
  timesteps; the ``loss_fn(rec, rows, step)`` protocol does not pass them, so this loss draws its own: the
  latent means of ``attn_batch`` (official batch: 6) photos of the concept, Gaussian noise and a timestep in
  ``[0, T)`` each, from a generator seeded by ``(seed, step)`` (a resumed inversion draws the same ones).
- *Regularisation prompt.* One per step, as the official code, but chosen by a generator seeded by
  ``(seed, step)`` (resumable) instead of Python's global ``random``.
- *Multi-token words.* The official slices the reference prompt with the object prompt's end-token position,
  which misaligns the context when ``S*`` and ``c`` have different token counts; here each prompt's own
  positions are used (identical to the official code when both are one token).
- *When the rescaling lands.* The official code rescales right after the optimiser step; a ``loss_fn`` runs
  after the next step's reconstruction forward pass, so the rescaling of step ``s`` is applied (in place, to
  the trained rows) when the loss of step ``s`` is computed: that step's reconstruction gradient is taken at
  the rows before rescaling (they differ from the rescaled rows by one update's change of norm).
- *Stage 2.* CoRe's second stage (fine-tuning the UNet with the learned word fixed, lr 2e-6, 1,000 steps) is
  not part of this loss; DreamBooth in :mod:`compinv_utils.methods` plays that role.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import AttentionStore, attention_store
from ..inversion import prepare_photos
from ..maths import TINY, is_whole
from ..tokens import padded_ids, require_placeholder

SCENE_PROMPTS = ("a {} on grass", "a {} in the snow", "a {} on water", "a {} in the sky", "a {} in a room")
COSINES = ("token", "channel")
NORM_TARGETS = ("start", "vocabulary")
OFFICIAL_EMB_WEIGHT = 1.5e-4  # --embedding_cosine_weight of the official bash_script/train.sh
OFFICIAL_ATTN_WEIGHT = 0.05  # --attention_mean_weight of the same script
OFFICIAL_RESCALE = (120, 180)  # --rescale_start_step, --rescale_stop_step (of 300 steps)


def context_embedding_loss(h_obj: torch.Tensor, h_ref: torch.Tensor, cosine: str = "token") -> torch.Tensor:
    """``1 − mean cos`` between the context tokens' outputs ``h_obj`` and ``h_ref``, both ``(|C|, D)`` (row ``i`` of
    one paired with row ``i`` of the other). ``cosine="token"``: one cosine per token (rows), averaged over the
    ``|C|`` tokens; ``"channel"``: one cosine per feature (columns, across the tokens), averaged over the ``D``
    features, as the official code computes it."""
    if cosine not in COSINES:
        raise ValueError(f"unknown cosine {cosine!r}; choose one of {COSINES}")
    if h_obj.shape != h_ref.shape or h_obj.dim() != 2:
        raise ValueError(f"context outputs must both be (|C|, D), got {tuple(h_obj.shape)} and {tuple(h_ref.shape)}")
    dim = 1 if cosine == "token" else 0
    return 1 - F.cosine_similarity(h_obj.float(), h_ref.float(), dim=dim).mean()


def context_attention_loss(a_obj: Sequence[torch.Tensor], a_ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """The official reduction of the attention term: ``a_obj[l]`` and ``a_ref[l]`` are the mean attention of the
    context tokens in layer ``l``, ``(B, |C|)``; the mean squared difference over tokens, summed over the ``B``
    samples and averaged over the layers."""
    if len(a_obj) == 0 or len(a_obj) != len(a_ref):
        raise ValueError(f"need the same non-zero number of layers on both sides, got {len(a_obj)} and {len(a_ref)}")
    per_layer = []
    for x, y in zip(a_obj, a_ref):
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f"attention means must both be (B, |C|), got {tuple(x.shape)} and {tuple(y.shape)}")
        per_layer.append(((x.float() - y.float()) ** 2).mean(1).sum())
    return torch.stack(per_layer).mean()


def _weight(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_template(t, what: str) -> str:
    if not isinstance(t, str) or t.count("{}") != 1 or not t.replace("{}", "").strip():
        raise ValueError(f"{what} {t!r} must be text with exactly one '{{}}' where the word goes, "
                         "e.g. 'a {} on grass'")
    return t


class CoReLoss:
    """``loss_fn`` for :func:`~compinv_utils.inversion.invert` (and ``fit`` of :mod:`compinv_utils.methods`):
    ``L_rec + λ_emb L_emb + λ_attn L_attn`` with CoRe's embedding rescaling (see the module docstring).

    ``photos`` (PIL images of the concept) are needed for the attention term (``attn_weight > 0``);
    :meth:`for_world` passes the concept's. ``rescale=None`` switches the rescaling off. ``last_log`` holds the
    step's prompt, ``rec``, ``emb``, ``attn`` (unweighted) and the rows' norm."""

    def __init__(self, pipe, token: str, superclass: str, prompts: Sequence[str] = SCENE_PROMPTS,
                 emb_weight: float = OFFICIAL_EMB_WEIGHT, attn_weight: float = OFFICIAL_ATTN_WEIGHT,
                 cosine: str = "token", photos: Sequence | None = None, attn_batch: int = 6,
                 rescale: tuple[int, int] | None = OFFICIAL_RESCALE, norm_target: str = "start", seed: int = 0):
        if not isinstance(token, str) or not (token.startswith("<") and token.endswith(">")):
            raise ValueError(f"token {token!r} should be the placeholder, like '<mochi>'")
        if not isinstance(superclass, str) or not superclass.strip() or "{" in superclass or token in superclass:
            raise ValueError("superclass must be a word such as 'cat' (not containing the placeholder), "
                             f"got {superclass!r}")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of templates such as ['a {} on grass'], not one string")
        self.prompts = [_check_template(p, "regularisation prompt") for p in prompts]
        if not self.prompts:
            raise ValueError("no regularisation prompts given: pass templates such as 'a {} on grass'")
        if cosine not in COSINES:
            raise ValueError(f"unknown cosine {cosine!r}; choose one of {COSINES}")
        if norm_target not in NORM_TARGETS:
            raise ValueError(f"unknown norm_target {norm_target!r}; choose one of {NORM_TARGETS}")
        for name, v in (("attn_batch", attn_batch), ("seed", seed)):
            if not is_whole(v, 1 if name == "attn_batch" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'attn_batch' else 0}, got {v!r}")
        if rescale is not None:
            ok = (isinstance(rescale, (tuple, list)) and len(rescale) == 2
                  and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in rescale))
            if not ok or not 0 <= rescale[0] <= rescale[1]:
                raise ValueError("rescale must be None or (start, stop) steps with 0 <= start <= stop, "
                                 f"got {rescale!r}")
            rescale = (int(rescale[0]), int(rescale[1]))
        self.pipe = pipe
        self.token, self.superclass = token, superclass.strip()
        self.emb_weight = _weight("emb_weight", emb_weight)
        self.attn_weight = _weight("attn_weight", attn_weight)
        self.cosine, self.attn_batch, self.rescale, self.norm_target, self.seed = (cosine, int(attn_batch), rescale,
                                                                                  norm_target, int(seed))
        ids = pipe.tokenizer(self.superclass, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"superclass {superclass!r} tokenizes to nothing")
        self.latents = None  # (N, C, h, w) latent means of the photos, for the attention term
        if self.attn_weight > 0:
            if photos is None:
                raise ValueError("the attention term (attn_weight > 0) needs the concept's photos: pass photos=... or "
                                 "use CoReLoss.for_world(world, concept); attn_weight=0 keeps the embedding term only")
            vae = pipe.vae
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            with torch.no_grad():
                pixels = prepare_photos(photos, size).to(vae.device, vae.dtype)
                self.latents = vae.encode(pixels).latent_dist.mean.float().cpu() * vae.config.scaling_factor
        self._scale: float | None = None  # the norm the rescaling holds (state, saved in checkpoints)
        self._ids: dict = {}
        self._references: dict = {}  # prompt -> the text encoder's output for the class prompt (frozen: once)
        self._vocabulary_norm: float | None = None
        self.last_log: dict = {}

    @classmethod
    def for_world(cls, world, concept, **kwargs) -> "CoReLoss":
        """For ``concept`` of ``world``: its token, superclass and photos, and regularisation prompts
        :data:`SCENE_PROMPTS` plus "a {} and a P" and "a {} next to a P" for the world's partner nouns P."""
        if "prompts" not in kwargs:
            partners = [p for p in world.settings.partners if p != concept.superclass]
            art = lambda w: ("an " if w[0] in "aeiou" else "a ") + w  # noqa: E731
            kwargs["prompts"] = list(SCENE_PROMPTS) + [t.format("{}", art(p)) for p in partners
                                                       for t in ("a {} and {}", "a {} next to {}")]
        kwargs.setdefault("photos", concept.photos)
        return cls(world.pipe, concept.token, concept.superclass, **kwargs)

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the norm the rescaling holds (None before its start step)."""
        return {"scale": self._scale}

    def load_state_dict(self, state: dict) -> None:
        scale = state.get("scale")
        if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"a CoRe state holds the rescaling norm, a number > 0 or None; got {scale!r}")
        self._scale = None if scale is None else float(scale)

    # -- pieces ------------------------------------------------------------------------------------

    def prompt_for(self, step: int) -> str:
        """The regularisation prompt of ``step`` (a function of ``seed`` and ``step`` only)."""
        return self.prompts[int(np.random.default_rng([self.seed, int(step)]).integers(len(self.prompts)))]

    def positions(self, prompt: str, n_vectors: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """Token ids ``(77,)`` of ``prompt`` with ``S*`` (``n_vectors`` tokens) and with the superclass, and the
        paired context positions in each (start token .. end token, the word left out)."""
        key = (prompt, n_vectors)
        if key in self._ids:
            return self._ids[key]
        tok = self.pipe.tokenizer
        words = require_placeholder(tok, self.token, n_vectors)
        obj = padded_ids(tok, prompt.format(" ".join(words)))[0].tolist()
        ref = padded_ids(tok, prompt.format(self.superclass))[0].tolist()
        word_ids = tok.convert_tokens_to_ids(words)
        cls_ids = tok(self.superclass, add_special_tokens=False).input_ids
        eos = tok.eos_token_id
        start = next((i for i, t in enumerate(obj) if t == word_ids[0]), None)
        if start is None or obj[start:start + n_vectors] != word_ids or eos not in obj[start + n_vectors:] \
                or eos not in ref[start + len(cls_ids):]:
            raise ValueError(f"prompt {prompt!r} is too long: the placeholder or the end token falls past the "
                             f"{tok.model_max_length} tokens the text encoder reads")
        e_obj = obj.index(eos, start + n_vectors)
        e_ref = ref.index(eos, start + len(cls_ids))
        after_obj, after_ref = obj[start + n_vectors:e_obj + 1], ref[start + len(cls_ids):e_ref + 1]
        if obj[:start] != ref[:start] or ref[start:start + len(cls_ids)] != cls_ids or after_obj != after_ref:
            raise ValueError(f"prompt {prompt!r} tokenizes differently around the placeholder and around "
                             f"{self.superclass!r}; the context tokens cannot be paired")
        ctx_obj = list(range(start)) + list(range(start + n_vectors, e_obj + 1))
        ctx_ref = list(range(start)) + list(range(start + len(cls_ids), e_ref + 1))
        out = (torch.tensor(obj), torch.tensor(ref), ctx_obj, ctx_ref)
        self._ids[key] = out
        return out

    def noisy_latents(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``attn_batch`` noisy latents of the photos and their timesteps for ``step`` (a function of ``seed`` and
        ``step`` only): ``(B, C, h, w)`` and ``(B,)``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        sched = self.pipe.scheduler
        idx = torch.randint(0, len(self.latents), (self.attn_batch,), generator=g)
        z0 = self.latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (self.attn_batch,), generator=g)
        return sched.add_noise(z0, noise, t), t

    def attention_means(self, ids: torch.Tensor, ctx: list[int], zt: torch.Tensor, t: torch.Tensor) -> list:
        """Per cross-attention layer, the context tokens' attention averaged over heads and pixels ``(B, |C|)``
        when the UNet denoises ``zt`` at ``t`` under the prompt ``ids``."""
        te, unet = self.pipe.text_encoder, self.pipe.unet
        dev = unet.device
        cond = te(ids[None].to(te.device))[0].to(dev, unet.dtype).expand(len(zt), -1, -1)
        store = AttentionStore(keep_similarity=False, keep_grad=torch.is_grad_enabled())
        with attention_store(unet, store):
            unet(zt.to(dev, unet.dtype), t.to(dev), cond)
        maps = store.maps[0]
        index = torch.tensor(ctx, device=dev)
        return [maps[layer].float().mean(1).index_select(1, index) for layer in sorted(maps)]

    def _rescale(self, rows: torch.Tensor, step: int) -> None:
        start, stop = self.rescale
        if not start <= step <= stop:
            return
        with torch.no_grad():
            if self.norm_target == "vocabulary":
                if self._vocabulary_norm is None:  # the vocabulary's rows never change during an inversion
                    table = self.pipe.text_encoder.get_input_embeddings().weight
                    base = table[:self.pipe.tokenizer.vocab_size].detach().float()
                    self._vocabulary_norm = float(base.norm(dim=-1).mean())
                target = self._vocabulary_norm
                rows.mul_((target / rows.norm(dim=-1, keepdim=True).clamp_min(TINY)).to(rows.dtype))
                return
            if step == start or self._scale is None:  # a resume without state records the norm where it starts
                self._scale = float(rows.detach().float().norm())
                return
            rows.mul_(self._scale / float(rows.detach().float().norm().clamp_min(TINY)))

    # -- the loss ----------------------------------------------------------------------------------

    def terms(self, rows: torch.Tensor, step: int) -> dict:
        """The unweighted terms ``{"emb", "attn"}`` (tensors) at ``step`` for the current rows ``(n, D)`` (which the
        inversion's hook puts into the text encoder)."""
        prompt = self.prompt_for(step)
        obj, ref, ctx_obj, ctx_ref = self.positions(prompt, rows.shape[0])
        te = self.pipe.text_encoder
        out = {"prompt": prompt}
        if self.emb_weight > 0:
            h_obj = te(obj[None].to(te.device))[0][0]
            if prompt not in self._references:  # the class prompt holds no placeholder: its output never changes
                with torch.no_grad():
                    self._references[prompt] = te(ref[None].to(te.device))[0][0]
            h_ref = self._references[prompt]
            out["emb"] = context_embedding_loss(h_obj[ctx_obj], h_ref[ctx_ref], self.cosine)
        if self.attn_weight > 0:
            zt, t = self.noisy_latents(step)
            with torch.no_grad():
                a_ref = self.attention_means(ref, ctx_ref, zt, t)
            a_obj = self.attention_means(obj, ctx_obj, zt, t)
            out["attn"] = context_attention_loss(a_obj, a_ref)
        return out

    def __call__(self, rec: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        if rows.dim() != 2:
            raise ValueError(f"rows must be the token's (n_vectors, D) embedding rows, got shape {tuple(rows.shape)}")
        if self.rescale is not None:
            self._rescale(rows, step)
        terms = self.terms(rows, step)
        total = rec
        log = {"prompt": terms["prompt"], "rec": float(rec.item()), "norm": float(rows.detach().float().norm())}
        for name, w in (("emb", self.emb_weight), ("attn", self.attn_weight)):
            if name in terms:
                total = total + w * terms[name].to(rec)
                log[name] = float(terms[name].item())
        self.last_log = log
        return total
