"""Textual inversion with the semantics of diffusers' ``examples/textual_inversion``.

A placeholder pseudo-word (``<mochi>``; multi-vector: ``<mochi> <mochi>_1 ...``, diffusers' naming)
is added to the tokenizer, its rows of the text encoder's token-embedding matrix start from the
superclass word, and only those rows are optimised to denoise the user photos under prompts such as
"a photo of a <mochi> cat". The loss is an argument: the reconstruction loss by default, or e.g.
``(1 - λ) L_rec + λ L_anc`` from :mod:`compinv_utils.anchors`, through the same loop.

Saved embeddings are ``{token: (n_vectors, D)}`` safetensors files that
``StableDiffusionPipeline.load_textual_inversion`` reads.

The same loop also trains model weights alongside the rows and adds a prior-preservation batch
(:func:`invert_with` with :class:`TrainExtras`): Custom Diffusion and DreamBooth in
:mod:`compinv_utils.methods`. Without extras it is textual inversion, unchanged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .maths import is_whole
from .progress import bar as progress_bar
from .tokens import padded_ids, placeholder_tokens

TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a {}",
    "a photo of the {}",
    "a drawing of a {}",
    "a photo of a small {}",
)

# loss_fn(rec_loss, new_embeddings (n_vectors, D) float32, step) -> total loss. A hook that also takes a keyword
# ``params`` (or ``**kwargs``) receives ``{"token": rows, **model weights being trained}`` (see :func:`bind_loss_fn`).
LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class InversionConfig:
    steps: int = 300  # optimisation steps (the toy world's setting; SD 1.5: 3,000)
    lr: float = 5e-3  # AdamW learning rate on the new embedding rows
    batch_size: int = 4  # photos per step (drawn with replacement)
    num_vectors: int = 1  # vectors of the pseudo-word
    weight_decay: float = 0.0  # AdamW weight decay on the new rows
    flip_p: float = 0.5  # probability of a horizontal flip of a photo
    with_superclass: bool = True  # prompts say "a photo of a S* cat" (the paper's form) or "a photo of a S*"
    templates: tuple[str, ...] = TEMPLATES
    checkpoint_every: int = 100  # steps between checkpoints (when a checkpoint folder is given)
    seed: int = 0


@dataclass
class InversionResult:
    token: str
    tokens: list[str]  # the token and its extra vectors' tokens
    superclass: str
    embeddings: torch.Tensor  # (num_vectors, D), float32 on the CPU
    losses: list[float]  # the loss at every step
    config: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)  # whatever loss_fn chose to record (e.g. active anchors)

    def save(self, path: str | Path) -> Path:
        """Write ``{token: (n, D)}`` safetensors in the format ``load_textual_inversion`` reads."""
        return save_embedding(path, self.token, self.embeddings)


@dataclass
class TrainExtras:
    """What a method trains besides the token rows (Custom Diffusion, DreamBooth), for :func:`invert_with`.

    ``params``: named model weights optimised alongside the rows (their own AdamW group with ``lr`` and
    ``weight_decay``); they are made trainable after the loop has frozen the pipeline. ``max_grad_norm``:
    clip the gradient norm of rows and weights together (None: no clipping). ``prior_pixels``: class
    images ``(N, 3, H, W)`` in [-1, 1] for the prior-preservation loss (DreamBooth's): each step adds
    ``prior_batch_size`` of them, captioned ``prior_prompt``, to the same UNet call, and the loss becomes
    ``loss_fn(rec, rows, step) + prior_weight · L_prior`` with ``L_prior`` their denoising MSE."""

    params: dict = field(default_factory=dict)
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    prior_pixels: torch.Tensor | None = None
    prior_prompt: str = ""
    prior_weight: float = 1.0
    prior_batch_size: int = 1


def bind_loss_fn(loss_fn, params: dict) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``loss_fn`` as ``(rec, rows, step) -> loss``: called with ``params=`` (name -> trained tensor, ``"token"``
    for the rows) as well when it accepts a ``params`` keyword or ``**kwargs``;
    :class:`~compinv_utils.anchors.AnchorLoss` and :class:`~compinv_utils.anchors.OfficialAnchorLoss` take the
    three positional arguments only and are called as they are."""
    try:
        sig = inspect.signature(loss_fn)
        wants = any(p.name == "params" or p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        wants = False
    if not wants:
        return loss_fn
    return lambda rec, rows, step: loss_fn(rec, rows, step, params=params)


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"initializer word {word!r} is not a single token (it splits into {pieces}); "
                         "choose a one-token superclass word")
    return ids[0]


def add_placeholder(pipe, token: str, init_word: str, num_vectors: int = 1) -> list[int]:
    """Add the placeholder token(s) and initialise their embedding rows from ``init_word``. Returns the ids."""
    if not (token.startswith("<") and token.endswith(">")):
        raise ValueError(f"placeholder {token!r} should look like <name>: added tokens also match inside words")
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    tok, te = pipe.tokenizer, pipe.text_encoder
    init_id = single_token_id(tok, init_word)
    tokens = placeholder_tokens(token, num_vectors)
    present = [t for t in tokens if t in tok.get_vocab()]
    if present:
        raise ValueError(f"placeholder token(s) {present} are already in the vocabulary; pick another name or call "
                         f"unload(pipe, {token!r}) first")
    added = tok.add_tokens(tokens)
    try:
        if added != num_vectors:
            raise ValueError(f"the tokenizer added {added} of {num_vectors} tokens for {token!r}")
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        ids = tok.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            w = te.get_input_embeddings().weight
            w[ids] = w[init_id].clone()
    except BaseException:
        unload(pipe, token)  # nothing half-added
        raise
    return ids


def unload(pipe, token: str) -> None:
    """Remove a placeholder (all its vectors) from the pipeline's tokenizer and text encoder."""
    extra = [t for t in pipe.tokenizer.get_vocab() if t == token or t.startswith(token + "_")]
    if extra:
        pipe.unload_textual_inversion(extra)


def save_embedding(path: str | Path, token: str, embeddings: torch.Tensor) -> Path:
    """Write ``{token: (n, D)}`` float32 safetensors atomically; NaN or infinite values are refused."""
    from safetensors.torch import save_file

    from .files import atomic_path, check_finite

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "learned_embeds.safetensors"
    check_finite(embeddings, f"the embedding of {token!r}")
    with atomic_path(path) as tmp:
        save_file({token: embeddings.detach().float().cpu().contiguous()}, str(tmp))
    return path


def read_embedding(path: str | Path, dim: int | None = None) -> dict[str, torch.Tensor]:
    """Read and check a saved embedding file: ``{token: (n, D)}`` float32, finite, ``D == dim`` when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .files import check_finite

    path = Path(path)
    if path.is_dir():
        path = path / "learned_embeds.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"embedding file {path} is truncated or not a safetensors file ({exc}); save it again") from exc
    if not state:
        raise ValueError(f"embedding file {path} holds no tensors")
    for name, t in state.items():
        if t.dim() not in (1, 2) or (dim is not None and t.shape[-1] != dim):
            raise ValueError(f"embedding {name!r} in {path} has shape {tuple(t.shape)} but this text encoder needs "
                             f"(n_vectors, {dim}); it was made for another model")
        check_finite(t, f"embedding {name!r} in {path}")
    return state


def load_embedding(pipe, path: str | Path, token: str | None = None) -> None:
    """Load a saved embedding into the pipeline, replacing a token of the same name. The file is checked
    (shape, NaN/inf) before the old token is removed, so a bad file changes nothing."""
    path = Path(path)
    if path.is_dir():
        path = path / "learned_embeds.safetensors"
    state = read_embedding(path, pipe.text_encoder.get_input_embeddings().weight.shape[1])
    name = token or next(iter(state))
    unload(pipe, name)
    pipe.load_textual_inversion(str(path), token=name)


def prepare_photos(photos: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Photos -> ``(N, 3, size, size)`` in [-1, 1]; grayscale/RGBA are converted, sizes unified."""
    if isinstance(photos, (Image.Image, str, Path)):
        raise TypeError("photos must be a list of PIL images; wrap a single photo in a list")
    if len(photos) == 0:
        raise ValueError("no photos given: textual inversion needs at least one image of the concept")
    out = []
    for i, im in enumerate(photos):
        if not isinstance(im, Image.Image):
            raise TypeError(f"photo {i} is a {type(im).__name__}, not a PIL image")
        im = im.convert("RGB")
        if im.size != (size, size):
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def check_config(config: InversionConfig) -> None:
    """Raise ``ValueError`` (saying what to change) for settings :func:`invert` cannot run with."""
    def whole(name: str, lo: int) -> None:
        v = getattr(config, name)
        if not is_whole(v, lo):
            raise ValueError(f"InversionConfig.{name} must be an integer >= {lo}, got {v!r}")

    for name in ("steps", "batch_size", "num_vectors", "checkpoint_every"):
        whole(name, 1)
    if not (isinstance(config.lr, numbers.Real) and math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"InversionConfig.lr must be a finite number > 0, got {config.lr!r} (the default is 5e-3)")
    if not (isinstance(config.weight_decay, numbers.Real) and math.isfinite(config.weight_decay)
            and config.weight_decay >= 0):
        raise ValueError(f"InversionConfig.weight_decay must be a finite number >= 0, got {config.weight_decay!r}")
    if not (isinstance(config.flip_p, numbers.Real) and 0.0 <= config.flip_p <= 1.0):
        raise ValueError(f"InversionConfig.flip_p is a probability and must be in [0, 1], got {config.flip_p!r}")
    if isinstance(config.templates, str) or len(config.templates) == 0:
        raise ValueError("InversionConfig.templates must be a non-empty tuple of prompts such as 'a photo of a {}'")
    for t in config.templates:
        if not isinstance(t, str) or t.count("{}") != 1 or not t.replace("{}", "").strip():
            raise ValueError(f"template {t!r} must be text with exactly one '{{}}' where the pseudo-word goes, "
                             "e.g. 'a photo of a {}'")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"template {t!r} has braces other than one '{{}}' ({exc}); write '{{{{' for a "
                             "literal brace") from exc


def _prepare_masks(masks: Sequence[np.ndarray], n: int, latent: int) -> torch.Tensor:
    """Per-photo ``(H, W)`` masks in [0, 1] -> ``(N, 1, latent, latent)``, checked."""
    if len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} photos: give one (H, W) mask per photo")
    out = []
    for i, m in enumerate(masks):
        a = np.asarray(m, np.float32)
        if a.ndim != 2:
            raise ValueError(f"mask {i} has shape {a.shape}; masks must be 2-D (H, W) arrays")
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"mask {i} has values outside [0, 1] (or NaN); masks are weights in [0, 1]")
        if a.sum() == 0:
            raise ValueError(f"mask {i} is all zero: that photo would teach nothing; mark its concept or drop it")
        out.append(torch.from_numpy(a))
    sizes = {tuple(a.shape) for a in out}
    if len(sizes) > 1:
        raise ValueError(f"masks have different sizes {sorted(sizes)}; give them all the same (H, W)")
    return F.interpolate(torch.stack(out)[:, None], size=(latent,) * 2, mode="area")


def _checkpoint_path(folder: Path, token: str) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in token)
    return folder / f"inversion_{safe}_{hashlib.sha256(token.encode()).hexdigest()[:8]}.pt"


def _digest(x: torch.Tensor | None) -> str | None:
    if x is None:
        return None
    a = x.detach().cpu().contiguous().numpy()
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def _setting(v, depth: int = 0, containers: bool = True):
    """A JSON-able stand-in for a value a loss is made from: plain values as they are, tensors and arrays by digest,
    objects and functions by their identity (:func:`loss_identity`), anything else by its type. ``containers=False``
    (a closure's or a module's variables): lists and dicts, which a function may use as mutable state (a counter, a
    switch), count by their type only."""
    plain = (bool, int, float, str, type(None))
    if isinstance(v, plain):
        return v
    if isinstance(v, tuple) and len(v) <= 1000:
        return [_setting(x, depth + 1) for x in v]
    if containers and isinstance(v, list) and len(v) <= 1000:
        return [_setting(x, depth + 1) for x in v]
    if containers and isinstance(v, dict) and len(v) <= 1000:
        return {str(k): _setting(x, depth + 1) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, torch.Tensor):
        return {"tensor": _digest(v.float())}
    if isinstance(v, np.ndarray):
        return {"array": _digest(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)))}
    if isinstance(v, numbers.Number):
        return float(v)
    if depth < 3 and callable(v) and not inspect.isclass(v) and not inspect.ismodule(v):
        return loss_identity(v, depth + 1)
    return {"type": f"{type(v).__module__}.{type(v).__qualname__}"}


def _function_settings(fn, depth: int) -> dict:
    """What a plain function (or closure, or lambda) computes with: the values it closes over, the module-level
    names it reads (not modules, classes or functions of a library) and its defaults, and a hash of its code."""
    code = fn.__code__
    out = {"code": hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]}
    cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
    closure = {}
    for name, cell in cells.items():
        try:
            closure[name] = _setting(cell.cell_contents, depth, containers=False)
        except ValueError:  # an empty cell
            closure[name] = None
    if closure:
        out["closure"] = closure
    names = {}
    for name in code.co_names:
        if name in fn.__globals__:
            v = fn.__globals__[name]
            if not (inspect.ismodule(v) or inspect.isclass(v) or inspect.isbuiltin(v)):
                names[name] = _setting(v, depth, containers=False)
    if names:
        out["globals"] = names
    if fn.__defaults__:
        out["defaults"] = _setting(list(fn.__defaults__), depth)
    if fn.__kwdefaults__:
        out["kwdefaults"] = _setting(fn.__kwdefaults__, depth)
    return out


def loss_identity(loss_fn, depth: int = 0) -> dict:
    """What a checkpoint records of ``loss_fn``, so that a resume with another loss is refused: its type (or
    function) name and its settings — ``loss_fn.describe()`` when it has one; for a function (closure, lambda,
    ``functools.partial``) the values it closes over, the module-level values it reads, its defaults and a hash of
    its code (a closure over another λ differs); for an object its public attributes (numbers, text, lists;
    tensors by digest)."""
    import functools

    if loss_fn is None:
        return {"name": "reconstruction", "settings": {}}
    if isinstance(loss_fn, functools.partial):
        return {"name": "functools.partial", "settings": {"func": _setting(loss_fn.func, depth),
                                                          "args": _setting(list(loss_fn.args), depth),
                                                          "keywords": _setting(dict(loss_fn.keywords), depth)}}
    if inspect.ismethod(loss_fn):
        return {"name": f"{type(loss_fn.__self__).__qualname__}.{loss_fn.__name__}",
                "settings": {"self": loss_identity(loss_fn.__self__, depth + 1)["settings"],
                             "function": _function_settings(loss_fn.__func__, depth + 1)}}
    kind = loss_fn if inspect.isfunction(loss_fn) else type(loss_fn)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if callable(getattr(loss_fn, "describe", None)):
        settings = loss_fn.describe()
    elif inspect.isfunction(loss_fn):
        settings = _function_settings(loss_fn, depth)
    else:
        settings = {k: _setting(v, depth + 1) for k, v in sorted(getattr(loss_fn, "__dict__", {}).items())
                    if not k.startswith("_") and k not in ("last_log", "delta", "pipe", "ids_token")}
        if not settings:
            settings = {"repr": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(loss_fn))}
    return {"name": name, "settings": json.loads(json.dumps(settings, default=str))}


def _made_from(token: str, superclass: str, pixels: torch.Tensor, mask_t: torch.Tensor | None, loss_fn,
               config: InversionConfig) -> dict:
    return {"token": token, "superclass": superclass, "photos": _digest(pixels), "masks": _digest(mask_t),
            "loss": loss_identity(loss_fn), "config": json.loads(json.dumps(asdict(config)))}


def _read_checkpoint(ckpt: Path, made_from: dict, num_vectors: int, dim: int) -> dict:
    """A checkpoint made from exactly ``made_from``, checked; ``ValueError`` naming the file otherwise."""
    from .files import check_finite, torch_load

    fix = "delete it to start afresh"
    blob = torch_load(ckpt, "inversion checkpoint", fix)
    if not isinstance(blob, dict) or "made_from" not in blob:
        raise ValueError(f"inversion checkpoint {ckpt} is from an older version or another program; {fix}")
    old = json.loads(blob["made_from"])
    if old != made_from:
        diff = sorted(k for k in set(old) | set(made_from) if old.get(k) != made_from.get(k))
        raise ValueError(f"inversion checkpoint {ckpt} was made from a different {', '.join(diff)}; resuming would "
                         f"mix two runs: {fix} (or pass another checkpoint_dir)")
    emb = blob["embeddings"]
    if tuple(emb.shape) != (num_vectors, dim):
        raise ValueError(f"inversion checkpoint {ckpt} holds embeddings of shape {tuple(emb.shape)}, expected "
                         f"{(num_vectors, dim)}; {fix}")
    check_finite(emb, f"inversion checkpoint {ckpt}")
    return blob


class _InjectRows:
    """A forward hook on the token-embedding layer: the outputs at ``ids`` become ``rows`` (cast to the
    table's dtype), so only ``rows`` (float32) are trained and the table itself never changes."""

    def __init__(self, ids: Sequence[int], rows: torch.Tensor):
        self.ids = torch.tensor(list(ids), device=rows.device)
        self.rows = rows

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0] if args else None
        if input_ids is None:
            return output
        match = input_ids[..., None] == self.ids.to(input_ids.device)  # (..., T, n)
        hit = match.any(-1)
        if not bool(hit.any()):
            return output
        pos = match.int().argmax(-1)
        return torch.where(hit[..., None], self.rows.to(output.device, output.dtype)[pos], output)


def invert(pipe, photos: Sequence[Image.Image], token: str, superclass: str, config: InversionConfig = InversionConfig(),
           loss_fn: LossFn | None = None, masks: Sequence[np.ndarray] | None = None,
           checkpoint_dir: str | Path | None = None, progress: bool = True) -> InversionResult:
    """Learn the embedding of ``token`` from ``photos``; the pipeline keeps the token afterwards.

    The trained rows are a separate float32 parameter ``(num_vectors, D)`` with a float32 AdamW, injected
    into the text encoder's token embeddings by a forward hook (so fp16/bf16 pipelines train too); they are
    written into the table (cast to its dtype) at the end. On an error the hook is removed and a
    placeholder this call added is removed again.

    ``masks``: optional per-photo ``(H, W)`` arrays in [0, 1] weighting the reconstruction loss
    (e.g. the concept's region). ``checkpoint_dir``: save every ``config.checkpoint_every`` steps and
    resume from the last checkpoint when one exists for this token; a checkpoint made from other photos,
    superclass, loss, masks or settings is refused.
    """
    return invert_with(pipe, photos, token, superclass, config, loss_fn, masks, checkpoint_dir, progress)


def invert_with(pipe, photos: Sequence[Image.Image], token: str, superclass: str, config: InversionConfig,
                loss_fn: LossFn | None = None, masks: Sequence[np.ndarray] | None = None,
                checkpoint_dir: str | Path | None = None, progress: bool = True,
                extras: TrainExtras | None = None) -> InversionResult:
    """:func:`invert`, optionally training model weights and adding a prior-preservation batch (``extras``;
    used by :mod:`compinv_utils.methods`). With ``extras=None`` this is exactly :func:`invert`. Checkpoints
    hold the token rows only, so ``checkpoint_dir`` needs ``extras=None``."""
    if extras is not None and checkpoint_dir:
        raise ValueError("checkpoints hold the token rows only: checkpoint_dir cannot be used when model weights are "
                         "trained too")
    check_config(config)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(rec, embeddings, step), got {type(loss_fn).__name__}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = prepare_photos(photos, size)
    mask_t = None if masks is None else _prepare_masks(masks, len(pixels), pipe.unet.config.sample_size)
    ckpt = _checkpoint_path(Path(checkpoint_dir), token) if checkpoint_dir else None
    tokens = placeholder_tokens(token, config.num_vectors)
    emb = pipe.text_encoder.get_input_embeddings()
    made_from = _made_from(token, superclass, pixels, mask_t, loss_fn, config)
    resume = (_read_checkpoint(ckpt, made_from, config.num_vectors, emb.weight.shape[1])
              if ckpt and ckpt.exists() else None)
    added = False
    if tokens[0] not in pipe.tokenizer.get_vocab():
        ids = add_placeholder(pipe, token, superclass, config.num_vectors)
        added = True
    elif resume is not None:
        ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    else:
        raise ValueError(f"placeholder token {token!r} is already in the vocabulary; call unload(pipe, {token!r}) "
                         "or choose another name")
    handle = None
    try:
        emb = pipe.text_encoder.get_input_embeddings()  # resize_token_embeddings made a new one
        rows = torch.nn.Parameter(emb.weight[ids].detach().float().clone())
        handle = emb.register_forward_hook(_InjectRows(ids, rows))
        run = _Run(pixels, mask_t, token, tokens, superclass, config, loss_fn, progress, ckpt, made_from, resume)
        result = _train(pipe, rows, run, extras)
        _check_norm(pipe, ids, rows, config.lr)
        with torch.no_grad():
            emb.weight[ids] = rows.detach().to(emb.weight.dtype)
        result.embeddings = emb.weight[ids].detach().float().cpu().clone()
    except BaseException:
        if added:
            if handle is not None:
                handle.remove()
                handle = None
            unload(pipe, token)
        raise
    finally:
        if handle is not None:
            handle.remove()
    return result


@dataclass(frozen=True)
class _Run:
    """What :func:`_train` learns from, fixed for the run: the photos ``(N, 3, H, W)`` and their latent-size masks
    ``(N, 1, h, w)`` (or None), the token and its vectors' tokens, the loss hook, and the checkpoint file with the
    record of what it is made from and the checkpoint to resume from (None: start afresh)."""

    pixels: torch.Tensor
    masks: torch.Tensor | None
    token: str
    tokens: list[str]
    superclass: str
    config: InversionConfig
    loss_fn: LossFn | None
    progress: bool
    checkpoint: Path | None
    made_from: dict
    resume: dict | None

    @property
    def word(self) -> str:
        """The pseudo-word the templates are filled with: its vectors' tokens (and the superclass)."""
        return " ".join(self.tokens) + (f" {self.superclass}" if self.config.with_superclass else "")


def _train(pipe, rows: torch.nn.Parameter, run: _Run, extras: TrainExtras | None = None) -> InversionResult:
    """The optimisation loop of :func:`invert` (the hook that injects ``rows`` is in place), step by step as in
    diffusers' textual-inversion example. ``extras``: model weights trained alongside and a prior-preservation
    batch (:class:`TrainExtras`); None is textual inversion."""
    config, device = run.config, pipe.unet.device
    te, unet, vae, sched = pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler
    for m in (te, unet, vae):
        m.requires_grad_(False)
    opt, weights = _optimizer(rows, config, extras)
    trained = {"token": rows, **(extras.params if extras is not None else {})}
    hook = None if run.loss_fn is None else bind_loss_fn(run.loss_fn, trained)
    _check_templates(pipe.tokenizer, config.templates, run.word, run.tokens)
    photos = _EncodedPhotos(vae, run.pixels, device)
    with_prior = extras is not None and extras.prior_pixels is not None
    prior = _PriorBatch(pipe, extras, config.flip_p, device) if with_prior else None
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device).manual_seed(config.seed)
    losses, log, start = _resume(run, rows, opt, rng, gen)

    bar = progress_bar(range(start, config.steps), desc=f"invert {run.token}", progress=run.progress, initial=start,
                       total=config.steps)
    for step in bar:
        # sample photos (each mirrored with probability flip_p) and a prompt for each
        idx = rng.integers(0, len(photos), config.batch_size)
        flip = rng.random(config.batch_size) < config.flip_p
        templates = rng.integers(0, len(config.templates), config.batch_size)
        prompts = [config.templates[k].format(run.word) for k in templates]
        # tokenize the prompts
        ids = padded_ids(pipe.tokenizer, prompts, device)
        # sample the photos' latents
        z0 = photos.sample(idx, flip, gen)
        # add noise at random timesteps with the scheduler (the forward diffusion)
        noised = _add_noise(sched, z0, gen)
        # encode the prompts and predict the noise; prior preservation's class batch joins both calls
        prior_loss = None
        if prior is None:
            pred = _predict(te, unet, ids, noised.zt, noised.t)
        else:
            pred, prior_loss = prior.predict(te, unet, ids, noised, rng, gen)
        # the loss: the denoising error (in the masks), through loss_fn, plus prior_weight · L_prior
        rec = _reconstruction(pred, _target(sched, noised), run.masks, idx, flip)
        loss = rec if hook is None else hook(rec, rows, step)
        if prior is not None:
            loss = loss + prior.weight * prior_loss
        # step: a finite loss and gradients, the norm clipped where the method asks, then AdamW
        _check_loss(loss, step, run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _check_gradients(rows, weights, step, te.dtype)
        if weights and extras.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([rows, *weights], extras.max_grad_norm)
        opt.step()
        # log
        losses.append(float(loss.item()))
        entry = _log_entry(step, rec, prior_loss, run.loss_fn, extras)
        if entry is not None:
            log.append(entry)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        # checkpoint
        if run.checkpoint and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            _save_checkpoint(run, step + 1, rows, opt, rng, gen, losses, log)
    te.eval()
    return InversionResult(run.token, run.tokens, run.superclass, rows.detach().float().cpu().clone(), losses,
                           asdict(config), log)


class _EncodedPhotos:
    """Photos ``(N, 3, H, W)`` as the VAE's latent distributions (mean, std, and the mean of the mirrored photo),
    from which each step draws its latents as diffusers' examples do (``latent_dist.sample() * scaling_factor``)."""

    def __init__(self, vae, pixels: torch.Tensor, device):
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            self.mean, self.std = dist.mean.float(), dist.std.float()
            self.mean_flipped = vae.encode(pixels.flip(-1).to(device, vae.dtype)).latent_dist.mean.float()
        self.scale, self.device = vae.config.scaling_factor, device

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, idx: np.ndarray, flip: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """Scaled latents of photos ``idx``, mirrored where ``flip`` (one ``randn`` of ``gen``)."""
        idx_t = torch.from_numpy(idx).to(self.device)
        flip_t = torch.from_numpy(flip).to(self.device)[:, None, None, None]
        mean = torch.where(flip_t, self.mean_flipped[idx_t], self.mean[idx_t])
        std = torch.where(flip_t, self.std[idx_t].flip(-1), self.std[idx_t])
        return (mean + std * torch.randn(mean.shape, generator=gen, device=self.device)) * self.scale


class _Noised(NamedTuple):
    """Latents ``z0`` noised to timesteps ``t``: ``zt = √ᾱ_t z0 + √(1 − ᾱ_t) noise``."""

    z0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    zt: torch.Tensor


def _add_noise(sched, z0: torch.Tensor, gen: torch.Generator) -> _Noised:
    """``z0`` noised by the scheduler's ``add_noise`` at random timesteps (noise, then timesteps, from ``gen``)."""
    noise = torch.randn(z0.shape, generator=gen, device=z0.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen, device=z0.device)
    return _Noised(z0, noise, t, sched.add_noise(z0, noise, t))


def _target(sched, x: _Noised) -> torch.Tensor:
    """What the UNet learns to predict for ``x``: the noise, or v for a v-prediction model."""
    return x.noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x.z0, x.noise, x.t)


def _predict(te, unet, ids: torch.Tensor, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction (float32) for ``zt`` at ``t``, conditioned on the prompts ``ids``."""
    cond = te(ids)[0]
    return unet(zt.to(unet.dtype), t, cond.to(unet.dtype)).sample.float()


def _reconstruction(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None, idx: np.ndarray,
                    flip: np.ndarray) -> torch.Tensor:
    """The denoising MSE; with ``masks``, weighted by photo ``idx``'s mask (mirrored where ``flip``)."""
    err = (pred - target) ** 2
    if masks is None:
        return err.mean()
    m = masks[idx].to(err.device)
    m = torch.where(torch.from_numpy(flip).to(err.device)[:, None, None, None], m.flip(-1), m)
    return (err * m).sum() / (m.sum() * err.shape[1]).clamp(min=1e-6)


class _PriorBatch:
    """Prior preservation, as in diffusers' DreamBooth example: each step ``prior_batch_size`` class images,
    captioned ``prior_prompt``, join the photos' text-encoder and UNet call; ``L_prior`` is their denoising MSE."""

    def __init__(self, pipe, extras: TrainExtras, flip_p: float, device):
        self.images = _EncodedPhotos(pipe.vae, extras.prior_pixels, device)
        self.ids = padded_ids(pipe.tokenizer, [extras.prior_prompt] * extras.prior_batch_size, device)
        self.size, self.weight, self.flip_p = extras.prior_batch_size, extras.prior_weight, flip_p
        self.sched = pipe.scheduler

    def draw(self, rng: np.random.Generator, gen: torch.Generator) -> _Noised:
        """One step's class batch: images and flips from ``rng``, then latents, noise and timesteps from ``gen``."""
        idx = rng.integers(0, len(self.images), self.size)
        flip = rng.random(self.size) < self.flip_p
        return _add_noise(self.sched, self.images.sample(idx, flip, gen), gen)

    def loss(self, pred: torch.Tensor, x: _Noised) -> torch.Tensor:
        """``L_prior``: the class batch's denoising MSE."""
        return F.mse_loss(pred, _target(self.sched, x))

    def predict(self, te, unet, ids: torch.Tensor, x: _Noised, rng: np.random.Generator,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The photos' prediction from one call joined with a fresh class batch, and that batch's ``L_prior``."""
        c = self.draw(rng, gen)
        both = _predict(te, unet, torch.cat([ids, self.ids]), torch.cat([x.zt, c.zt]), torch.cat([x.t, c.t]))
        return both[:len(x.zt)], self.loss(both[len(x.zt):], c)


def _optimizer(rows: torch.nn.Parameter, config: InversionConfig,
               extras: TrainExtras | None) -> tuple[torch.optim.AdamW, list[torch.Tensor]]:
    """AdamW on the rows and, in a group of their own, the method's model weights (made trainable here)."""
    if extras is None:
        return torch.optim.AdamW([rows], lr=config.lr, weight_decay=config.weight_decay), []
    weights = list(extras.params.values())
    for w in weights:
        w.requires_grad_(True)
    groups = [{"params": [rows], "lr": config.lr, "weight_decay": config.weight_decay}]
    if weights:
        groups.append({"params": weights, "lr": extras.lr, "weight_decay": extras.weight_decay})
    return torch.optim.AdamW(groups), weights


def _check_loss(loss: torch.Tensor, step: int, run: _Run) -> None:
    """Refuse a NaN or infinite loss (a learning rate too high) before it reaches the weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the inversion loss became {loss.item()} at step {step}; lower the learning rate "
                                 f"(now {run.config.lr})" +
                                 (f"; the last good embedding is in {run.checkpoint}" if run.checkpoint else ""))


def _check_gradients(rows: torch.Tensor, weights: list[torch.Tensor], step: int, dtype: torch.dtype) -> None:
    """Refuse overflowed gradients of the rows or of the trained model weights."""
    if rows.grad is not None and not torch.isfinite(rows.grad).all():
        raise FloatingPointError(f"the gradient of the embedding overflowed at step {step} (the model runs in "
                                 f"{dtype}); lower the learning rate or invert in float32")
    if not all(bool(torch.isfinite(w.grad).all()) for w in weights if w.grad is not None):
        raise FloatingPointError(f"the gradient of the trained model weights overflowed at step {step}; "
                                 "lower the learning rate or train in float32")


def _log_entry(step: int, rec: torch.Tensor, prior_loss: torch.Tensor | None, loss_fn,
               extras: TrainExtras | None) -> dict | None:
    """What the log keeps of a step: with ``extras``, the reconstruction and prior losses and the loss hook's
    ``last_log``; else the hook's ``last_log`` when it has one (None: nothing)."""
    if extras is not None:
        entry = {"step": step, "rec": float(rec.item())}
        if prior_loss is not None:
            entry["prior"] = float(prior_loss.item())
        return entry | dict(getattr(loss_fn, "last_log", None) or {})
    if loss_fn is not None and hasattr(loss_fn, "last_log"):
        return dict(step=step, **loss_fn.last_log)
    return None


def _resume(run: _Run, rows: torch.nn.Parameter, opt, rng: np.random.Generator,
            gen: torch.Generator) -> tuple[list[float], list[dict], int]:
    """Restore the rows, optimizer, random generators and loss state of ``run.resume`` (if any); returns the losses
    and log so far and the first step to run."""
    blob = run.resume
    if blob is None:
        return [], [], 0
    with torch.no_grad():
        rows.copy_(blob["embeddings"].to(rows))
    opt.load_state_dict(blob["optimizer"])
    rng.bit_generator.state = json.loads(blob["rng"])
    gen.set_state(blob["gen"])
    if blob.get("loss_state") is not None and hasattr(run.loss_fn, "load_state_dict"):
        run.loss_fn.load_state_dict(blob["loss_state"])
    return list(blob["losses"]), json.loads(blob["log"]), int(blob["step"])


def _save_checkpoint(run: _Run, done: int, rows: torch.Tensor, opt, rng: np.random.Generator,
                     gen: torch.Generator, losses: list[float], log: list[dict]) -> None:
    """Write what :func:`_resume` needs to go on after ``done`` steps."""
    from .files import torch_save

    loss_fn = run.loss_fn
    torch_save(dict(made_from=json.dumps(run.made_from), embeddings=rows.detach().cpu().clone(),
                    optimizer=opt.state_dict(), step=done, rng=json.dumps(rng.bit_generator.state),
                    gen=gen.get_state(), losses=list(losses), log=json.dumps(log, default=_plain),
                    loss_state=loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None), run.checkpoint)


def _check_templates(tokenizer, templates, word: str, tokens: list[str]) -> None:
    """Every template keeps the placeholder within the tokens the text encoder reads (a longer prompt is cut at
    ``model_max_length``, and a placeholder past the cut would learn nothing)."""
    limit = tokenizer.model_max_length - 1  # the last position holds the end token
    last = tokenizer.convert_tokens_to_ids(tokens[-1])
    for t in templates:
        ids = tokenizer(t.format(word)).input_ids
        pos = [i for i, x in enumerate(ids) if x == last]
        if not pos or pos[-1] >= limit:
            raise ValueError(f"template {t!r} puts the placeholder at token {pos[-1] if pos else '?'} of {len(ids)}, past "
                             f"the {limit} tokens the text encoder reads: shorten the template")


def _check_norm(pipe, ids: list[int], rows: torch.Tensor, lr: float) -> None:
    """Refuse an embedding that ran away: a norm over 100 times the largest of the vocabulary's rows (a learned
    row is usually a few times a word's) comes from a learning rate far too high, and would be saved as garbage."""
    w = pipe.text_encoder.get_input_embeddings().weight.detach()
    keep = torch.ones(len(w), dtype=torch.bool, device=w.device)
    keep[torch.tensor(ids, device=w.device)] = False
    top = float(w[keep].float().norm(dim=-1).max())
    got = float(rows.detach().float().norm(dim=-1).max())
    if not math.isfinite(got) or got > 100 * top:
        raise FloatingPointError(f"the learned embedding diverged: its norm is {got:.3g}, {got / top:.3g} times the "
                                 f"largest word's ({top:.3g}); lower the learning rate (now {lr:g}; the default is 5e-3)")


def _plain(x):
    """JSON fallback for values a loss logs (numpy/torch scalars)."""
    return x.item() if hasattr(x, "item") else str(x)


def invert_or_load(pipe, concept, config: InversionConfig, folder: str | Path, recompute: bool = False,
                   **kwargs) -> Path:
    """Load ``concept``'s embedding from ``folder/<name>/learned_embeds.safetensors`` into the pipeline,
    or invert it (``kwargs`` go to :func:`invert`) and save it there. Returns the file's path."""
    path = Path(folder) / concept.name / "learned_embeds.safetensors"
    if path.exists() and not recompute:
        load_embedding(pipe, path)
    else:
        unload(pipe, concept.token)
        invert(pipe, concept.photos, concept.token, concept.superclass, config, **kwargs).save(path)
    return path
