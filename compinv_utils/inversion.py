"""Textual inversion with the semantics of diffusers' ``examples/textual_inversion``.

A placeholder pseudo-word (``<mochi>``; multi-vector: ``<mochi> <mochi>_1 ...``, diffusers' naming)
is added to the tokenizer, its rows of the text encoder's token-embedding matrix start from the
superclass word, and only those rows are optimised to denoise the user photos under prompts such as
"a photo of a <mochi> cat". The loss is an argument: the reconstruction loss by default, or e.g.
``(1 - λ) L_rec + λ L_anc`` from :mod:`compinv_utils.anchors`, through the same loop.

Saved embeddings are ``{token: (n_vectors, D)}`` safetensors files that
``StableDiffusionPipeline.load_textual_inversion`` reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a {}",
    "a photo of the {}",
    "a drawing of a {}",
    "a photo of a small {}",
)

# loss_fn(rec_loss, new_embeddings (n_vectors, D), step) -> total loss
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


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """``<t>``, ``<t>_1``, … — the names diffusers' loader gives the vectors of a multi-vector embedding."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


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
    if added != num_vectors:
        raise ValueError(f"the tokenizer added {added} of {num_vectors} tokens for {token!r}")
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    ids = tok.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        w = te.get_input_embeddings().weight
        w[ids] = w[init_id].clone()
    return ids


def unload(pipe, token: str) -> None:
    """Remove a placeholder (all its vectors) from the pipeline's tokenizer and text encoder."""
    extra = [t for t in pipe.tokenizer.get_vocab() if t == token or t.startswith(token + "_")]
    if extra:
        pipe.unload_textual_inversion(extra)


def save_embedding(path: str | Path, token: str, embeddings: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "learned_embeds.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: embeddings.detach().float().cpu().contiguous()}, str(path))
    return path


def load_embedding(pipe, path: str | Path, token: str | None = None) -> None:
    """Load a saved embedding into the pipeline, replacing a token of the same name."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "learned_embeds.safetensors"
    state = load_file(str(path))
    name = token or next(iter(state))
    unload(pipe, name)
    pipe.load_textual_inversion(str(path), token=name)


def prepare_photos(photos: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Photos -> ``(N, 3, size, size)`` in [-1, 1]; grayscale/RGBA are converted, sizes unified."""
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


def _checkpoint_path(folder: Path, token: str) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in token)
    return folder / f"inversion_{safe}.pt"


def invert(pipe, photos: Sequence[Image.Image], token: str, superclass: str, config: InversionConfig = InversionConfig(),
           loss_fn: LossFn | None = None, masks: Sequence[np.ndarray] | None = None,
           checkpoint_dir: str | Path | None = None, progress: bool = True) -> InversionResult:
    """Learn the embedding of ``token`` from ``photos``; the pipeline keeps the token afterwards.

    ``masks``: optional per-photo ``(H, W)`` arrays in [0, 1] weighting the reconstruction loss
    (e.g. the concept's region). ``checkpoint_dir``: save every ``config.checkpoint_every`` steps and
    resume from the last checkpoint when one exists for this token.
    """
    device = pipe.unet.device
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = prepare_photos(photos, size)
    if masks is not None:
        if len(masks) != len(pixels):
            raise ValueError(f"{len(masks)} masks for {len(pixels)} photos")
        mask_t = torch.stack([torch.as_tensor(np.asarray(m, np.float32)) for m in masks])[:, None]
        mask_t = F.interpolate(mask_t, size=(pipe.unet.config.sample_size,) * 2, mode="area")
    ckpt = _checkpoint_path(Path(checkpoint_dir), token) if checkpoint_dir else None
    tokens = placeholder_tokens(token, config.num_vectors)
    resume = torch.load(ckpt, weights_only=False) if ckpt and ckpt.exists() else None
    if resume and resume["config"] != asdict(config):
        raise ValueError(f"checkpoint {ckpt} was made with other settings; delete it to start afresh")
    if tokens[0] not in pipe.tokenizer.get_vocab():
        ids = add_placeholder(pipe, token, superclass, config.num_vectors)
    elif resume is not None:
        ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    else:
        raise ValueError(f"placeholder token {token!r} is already in the vocabulary; call unload(pipe, {token!r}) "
                         "or choose another name")
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    for m in (te, unet, vae):
        m.requires_grad_(False)
    emb = te.get_input_embeddings()
    emb.weight.requires_grad_(True)
    frozen = emb.weight.detach().clone()
    keep = torch.ones(len(frozen), dtype=torch.bool, device=frozen.device)
    keep[ids] = False
    opt = torch.optim.AdamW([emb.weight], lr=config.lr, weight_decay=config.weight_decay)

    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        lat_mean, lat_std = dist.mean.float(), dist.std.float()
        lat_mean_f = vae.encode(pixels.flip(-1).to(device, vae.dtype)).latent_dist.mean.float()
    sf = vae.config.scaling_factor
    sched = pipe.scheduler
    alphas = sched.alphas_cumprod.to(device)
    n_train = sched.config.num_train_timesteps
    word = " ".join(tokens) + (f" {superclass}" if config.with_superclass else "")

    rng = np.random.default_rng(config.seed)
    gen = torch.Generator(device).manual_seed(config.seed)
    losses: list[float] = []
    log: list[dict] = []
    start = 0
    if resume is not None:
        with torch.no_grad():
            emb.weight[ids] = resume["embeddings"].to(emb.weight)
        opt.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["rng"]
        gen.set_state(resume["gen"])
        losses, log, start = resume["losses"], resume["log"], resume["step"]

    bar = tqdm(range(start, config.steps), desc=f"invert {token}", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        idx = rng.integers(0, len(pixels), config.batch_size)
        flip = rng.random(config.batch_size) < config.flip_p
        prompts = [config.templates[k].format(word) for k in rng.integers(0, len(config.templates), config.batch_size)]
        ids_t = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        idx_t = torch.from_numpy(idx).to(device)
        flip_t = torch.from_numpy(flip).to(device)[:, None, None, None]
        mean = torch.where(flip_t, lat_mean_f[idx_t], lat_mean[idx_t])
        std = torch.where(flip_t, lat_std[idx_t].flip(-1), lat_std[idx_t])
        z0 = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * sf
        noise = torch.randn(z0.shape, generator=gen, device=device)
        t = torch.randint(0, n_train, (len(z0),), generator=gen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = te(ids_t)[0]
        pred = unet(zt.to(unet.dtype), t, cond.to(unet.dtype)).sample.float()
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
        err = (pred - target) ** 2
        if masks is not None:
            m = mask_t[idx].to(device)
            m = torch.where(flip_t, m.flip(-1), m)
            rec = (err * m).sum() / (m.sum() * err.shape[1]).clamp(min=1e-6)
        else:
            rec = err.mean()
        loss = rec if loss_fn is None else loss_fn(rec, emb.weight[ids], step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the inversion loss became {loss.item()} at step {step}; lower the learning rate "
                                     f"(now {config.lr})" + (f"; the last good embedding is in {ckpt}" if ckpt else ""))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            emb.weight[keep] = frozen[keep]
        losses.append(float(loss.item()))
        if loss_fn is not None and hasattr(loss_fn, "last_log"):
            log.append(dict(step=step, **loss_fn.last_log))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if ckpt and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(embeddings=emb.weight[ids].detach().cpu(), optimizer=opt.state_dict(), step=step + 1,
                            rng=rng.bit_generator.state, gen=gen.get_state(), losses=losses, log=log,
                            config=asdict(config)), ckpt)
    te.eval()
    emb.weight.requires_grad_(False)
    return InversionResult(token, tokens, superclass, emb.weight[ids].detach().float().cpu().clone(), losses,
                           asdict(config), log)



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
