"""The inversion-method protocol: fit a concept, save it, load it into a pipeline, unload it.

A method (:class:`InversionMethod`) learns a concept of interest from its photos and leaves the pipeline it
trained with the concept loaded; ``save`` writes it to a folder in the formats diffusers reads; ``load`` puts a
saved concept into any pipeline of the same model and returns a :class:`Handle`; ``unload(pipe, handle)``
restores that pipeline exactly (the placeholder removed, the original attention processors or UNet put back).
What ``fit`` returns (:class:`Fitted`) carries the handle that undoes the fit.

**The loss hook.** ``fit(..., loss_fn=...)`` takes the hook :func:`compinv_utils.inversion.invert` takes,
``loss_fn(rec, e, step) -> loss`` on the token's rows ``e`` ``(n_vectors, D)``, so
:class:`~compinv_utils.anchors.AnchorLoss` and :class:`~compinv_utils.anchors.OfficialAnchorLoss` work
unchanged: they return ``(1 − λ) L_rec + λ L_anc``. A hook that also declares a keyword ``params`` (or
``**kwargs``) is called with ``params={"token": e, **weights}``, every tensor the method trains by name
(Custom Diffusion: ``unet.<layer>.processor.to_k_custom_diffusion.weight`` …; DreamBooth: ``unet.<name>``
for every UNet parameter). The methods with prior preservation add ``prior_weight · L_prior`` *after* the
hook, so with ``AnchorLoss(..., lam=λ)`` the total is ``(1 − λ) L_rec + λ L_anc + prior_weight · L_prior``
— the official compositional scripts' ``recons_loss_weight · L_rec + anchor_loss_weight · L_anc +
prior_loss_weight · L_prior`` with ``recons_loss_weight = 1 − λ`` and ``anchor_loss_weight = λ``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from ..inversion import InversionConfig, InversionResult, load_embedding, prepare_photos, read_embedding, unload

EMBEDDING_FILE = "learned_embeds.safetensors"  # what pipe.load_textual_inversion reads
INFO_FILE = "method.json"  # which method wrote a folder, its token, superclass and settings


@dataclass(frozen=True)
class FineTuneConfig(InversionConfig):
    """Settings shared by the methods that train model weights besides the token (and use prior preservation).

    The inherited fields keep their meaning (``lr`` is the learning rate of the token's rows). The official
    scripts use one learning rate for the token and the weights; here the token keeps the textual-inversion
    rate of this repository and the weights get ``weights_lr`` (``lr=weights_lr`` gives the scripts' setting).
    """

    weights_lr: float = 1e-5  # AdamW learning rate of the model weights
    weights_weight_decay: float = 1e-2  # AdamW weight decay of the model weights (diffusers' examples: 1e-2)
    max_grad_norm: float | None = 1.0  # clip the gradient norm of token and weights together (examples: 1.0)
    prior_weight: float = 1.0  # weight of the prior-preservation loss (examples and official scripts: 1.0)
    class_images: int = 16  # regularisation images generated per fit (0: no prior preservation; scripts: 200)
    class_seed: int = 10_000  # seed of the first class image (image i: class_seed + i)
    prior_batch_size: int | None = None  # class images per step (None: batch_size, one per photo as the examples)


def check_finetune_config(config: FineTuneConfig) -> None:
    import math
    import numbers

    from ..inversion import check_config

    check_config(config)
    for name in ("weights_lr", "weights_weight_decay", "prior_weight"):
        v = getattr(config, name)
        lo_ok = v > 0 if name == "weights_lr" else v >= 0
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not lo_ok:
            raise ValueError(f"{type(config).__name__}.{name} must be a finite number "
                             f"{'> 0' if name == 'weights_lr' else '>= 0'}, got {v!r}")
    if config.max_grad_norm is not None and not (isinstance(config.max_grad_norm, numbers.Real)
                                                 and config.max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {config.max_grad_norm!r}")
    for name, lo in (("class_images", 0), ("class_seed", 0)):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= {lo}, got {v!r}")
    pb = config.prior_batch_size
    if pb is not None and (isinstance(pb, bool) or not isinstance(pb, int) or pb < 1):
        raise ValueError(f"prior_batch_size must be an integer >= 1 or None, got {pb!r}")


@dataclass
class Handle:
    """What :meth:`InversionMethod.unload` needs to restore a pipeline: the placeholder to remove and what the
    method replaced (the attention processors, or the UNet), as the objects that were there before."""

    token: str
    processors: dict | None = None  # layer name -> the original processor object
    unet: object | None = None  # the original UNet object
    tokens: list = field(default_factory=list)  # the placeholders of a composition (:meth:`InversionMethod.compose`)


@dataclass
class Fitted:
    """What :meth:`InversionMethod.fit` returns: the token's result (embedding, losses, log), the handle that
    undoes the fit (``method.unload(pipe, fitted.handle)``) and what else the method trained (``weights``)."""

    method: str
    inversion: InversionResult
    handle: Handle
    weights: object = None  # Custom Diffusion: {layer: processor}; DreamBooth: the fine-tuned UNet
    model: object = None  # the UNet the weights belong to (Custom Diffusion saves through it)

    @property
    def token(self) -> str:
        return self.inversion.token

    @property
    def embeddings(self) -> torch.Tensor:
        return self.inversion.embeddings

    @property
    def losses(self) -> list[float]:
        return self.inversion.losses

    @property
    def log(self) -> list[dict]:
        return self.inversion.log


@runtime_checkable
class InversionMethod(Protocol):
    """An inversion method. Adding one: a module with a class like this and a line in ``METHODS``."""

    name: str
    config_class: type

    def fit(self, world, concept, config=None, loss_fn=None, seed: int | None = None, progress: bool = True,
            masks=None) -> Fitted:
        """Learn ``concept`` (its photos, token and superclass) in ``world.pipe``, which keeps it afterwards."""

    def save(self, result: Fitted, folder: str | Path) -> Path:
        """Write ``result`` into ``folder`` (created); returns the folder."""

    def load(self, pipe, folder: str | Path) -> Handle:
        """Load a saved concept into ``pipe`` (replacing a token of the same name); returns the handle."""

    def compose(self, pipe, folders: Sequence[str | Path], nouns: Sequence[str] | None = None) -> Handle:
        """Load several saved concepts into ``pipe`` at once, for prompts that name them together (the
        method's own way of combining separately learned concepts; ``nouns``, the world's nouns, for a method
        whose combination needs ordinary captions); :meth:`unload` undoes it."""

    def unload(self, pipe, handle: Handle) -> None:
        """Restore ``pipe`` as it was before :meth:`load`, :meth:`compose` (or :meth:`fit`)."""

    def anchor_lambda(self, world) -> float:
        """λ of ``(1 − λ) L_rec + λ L_anc`` for semantic inversion with this method in ``world``."""


def resolve_config(method, config, seed: int | None):
    """``config`` (the method's default when None) checked to be of the method's kind, with ``seed`` applied."""
    cls = method.config_class
    config = cls() if config is None else config
    if not isinstance(config, cls):
        raise TypeError(f"the {method.name} method takes a {cls.__name__}, got {type(config).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer or None (None: config.seed), got {seed!r}")
        config = replace(config, seed=seed)
    return config


def check_free(pipe, token: str) -> None:
    if token in pipe.tokenizer.get_vocab():
        raise ValueError(f"placeholder token {token!r} is already in the vocabulary; unload it first "
                         f"(compinv_utils.inversion.unload(pipe, {token!r}) or method.unload(pipe, handle))")


def class_pixels(world, superclass: str, config: FineTuneConfig) -> torch.Tensor | None:
    """The regularisation images of prior preservation: ``config.class_images`` images of "a photo of a
    {superclass}" generated by the world's own model (seeds ``class_seed, class_seed + 1, …``), as
    ``(N, 3, H, W)`` in [-1, 1]; None when ``class_images`` or ``prior_weight`` is 0. They are made once per
    fit, before the model changes (DreamBooth's "prior" is the frozen model's)."""
    if config.class_images == 0 or config.prior_weight == 0:
        return None
    images = world.generate([class_prompt(superclass)] * config.class_images, seed=config.class_seed)
    size = world.pipe.unet.config.sample_size * world.pipe.vae_scale_factor
    return prepare_photos(images, size)


def class_prompt(superclass: str) -> str:
    return f"a photo of a {superclass}"


def write_info(folder: Path, method: str, result: Fitted) -> None:
    from ..files import write_text

    info = {"method": method, "token": result.inversion.token, "tokens": list(result.inversion.tokens),
            "superclass": result.inversion.superclass, "config": json.loads(json.dumps(result.inversion.config,
                                                                                         default=str))}
    write_text(folder / INFO_FILE, json.dumps(info, indent=1))


def check_info(folder: Path, method: str) -> None:
    """Refuse a folder another method wrote (a folder without ``method.json`` is accepted)."""
    path = folder / INFO_FILE
    if not path.exists():
        return
    try:
        written_by = json.loads(path.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a method description ({exc}); save the concept again") from exc
    if written_by != method:
        raise ValueError(f"{folder} holds a {written_by!r} concept, not a {method!r} one: load it with "
                         f"get_method({written_by!r})")


def embedding_token(pipe, folder: Path) -> str:
    """The token of the embedding file in ``folder`` (checked against the pipeline's text encoder)."""
    state = read_embedding(folder / EMBEDDING_FILE, pipe.text_encoder.get_input_embeddings().weight.shape[1])
    return next(iter(state))


def load_token(pipe, folder: Path) -> str:
    token = embedding_token(pipe, folder)
    load_embedding(pipe, folder / EMBEDDING_FILE, token)
    return token


def load_tokens(pipe, folders: Sequence[Path], handle: Handle, check=None) -> Handle:
    """The last part of every method's ``compose``: ``check()`` (when given), then each folder's token into
    ``handle.tokens``; on any failure the pipeline is put back as it was and the error re-raised."""
    try:
        if check is not None:
            check()
        for folder in folders:
            token = embedding_token(pipe, Path(folder))
            if token in handle.tokens:
                raise ValueError(f"two of the concepts to compose use the same placeholder {token!r}")
            load_embedding(pipe, Path(folder) / EMBEDDING_FILE, token)
            handle.tokens.append(token)
    except BaseException:
        restore(pipe, handle)
        raise
    return handle


def finish_load(pipe, folder: Path, handle: Handle, check=None) -> Handle:
    """The last part of every method's ``load``: ``check()`` (when given), then the token from ``folder``; on any
    failure the pipeline is put back as it was (:func:`restore`) and the error re-raised."""
    try:
        if check is not None:
            check()
        handle.token = load_token(pipe, folder)
    except BaseException:
        restore(pipe, handle)
        raise
    return handle


def restore(pipe, handle: Handle) -> None:
    """Put back what ``handle`` recorded and remove its placeholder (safe to call twice)."""
    if handle.unet is not None and pipe.unet is not handle.unet:
        pipe.unet = handle.unet
    if handle.processors is not None:
        current = pipe.unet.attn_processors
        if any(current.get(k) is not v for k, v in handle.processors.items()):
            pipe.unet.set_attn_processor(dict(handle.processors))
    if handle.token:
        unload(pipe, handle.token)
    for token in handle.tokens:
        unload(pipe, token)


__all__ = ["EMBEDDING_FILE", "FineTuneConfig", "Fitted", "Handle", "InversionMethod", "class_pixels", "class_prompt"]
