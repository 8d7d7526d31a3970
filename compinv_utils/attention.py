"""Cross-attention capture through diffusers attention processors.

:func:`attention_store` wraps each of the UNet's cross-attention processors (``attn2``) in a
:class:`StoreProcessor` for the duration of a ``with`` block and puts the original processor objects
back on exit (the same objects, also after an exception). Self-attention keeps its processor. The
wrapper computes the attention probabilities explicitly, so they can be kept (and differentiated, for
guidance), and records into an explicit :class:`AttentionStore`, keyed by denoising step (one UNet
call = one step) and layer. Which computation gives the layer's output:

- diffusers' default processors (``AttnProcessor``, ``AttnProcessor2_0``): the wrapper computes the
  attention itself, the same way this module always has (the chapters' cached numbers depend on it);
- any other processor (e.g. Custom Diffusion's ``CustomDiffusionAttnProcessor(2_0)``): the layer's
  output is that processor's own output, and the recorded probabilities use its projections — its
  ``to_k_custom_diffusion`` when it trains key/value (``train_kv``) and its ``to_q_custom_diffusion``
  when it trains the query (``train_q_out``); the layer's ``to_q``/``to_k`` otherwise. A processor with
  other projections can say so with a method ``attention_projections(attn) -> (to_q, to_k)``.

What is recorded:

- ``maps[step][layer]``: attention probabilities, ``(B, HW, T)`` averaged over heads
  (``(B, heads, HW, T)`` with ``average_heads=False``);
- ``similarity[step][layer]``: the pre-softmax query–key similarity ``q·k / sqrt(d)`` per token,
  averaged over heads and queries, ``(B, T)``.

With classifier-free guidance the pipeline's batch is ``[unconditional; conditional]``; pass
``batch=cond_half(n_prompts)`` to the readers to keep the conditional half.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionStore:
    """Where :class:`StoreProcessor` writes. Reset it (``reset()``) between runs."""

    keep_maps: bool = True  # keep attention probabilities
    keep_similarity: bool = True  # keep mean pre-softmax q·k per token
    resolutions: tuple[int, ...] | None = None  # keep only layers whose map height is listed (None: all)
    average_heads: bool = True  # average the maps over heads (False keeps (B, heads, HW, T))
    keep_grad: bool = False  # keep the graph (for losses on the maps); otherwise tensors are detached
    steps: tuple[int, ...] | None = None  # keep only these steps (None: all)
    maps: dict = field(default_factory=dict)  # step -> layer -> tensor
    similarity: dict = field(default_factory=dict)  # step -> layer -> (B, T)
    shapes: dict = field(default_factory=dict)  # layer -> (h, w) of its maps
    step: int = -1  # the current UNet call, counted from 0 since the last reset
    sample_hw: tuple[int, int] = (0, 0)  # spatial size of the current UNet input (latent)
    enabled: bool = True  # False: the processors record nothing and use fused attention

    def reset(self) -> None:
        self.maps, self.similarity, self.shapes, self.step = {}, {}, {}, -1

    def latent_hw(self, n_queries: int) -> tuple[int, int]:
        """A layer's map size from its number of queries and the UNet input's aspect ratio."""
        H, W = self.sample_hw
        f = math.sqrt(H * W / n_queries)
        return round(H / f), round(W / f)

    def wants(self, h: int) -> bool:
        return (self.resolutions is None or h in self.resolutions) and (self.steps is None or self.step in self.steps)

    def record(self, layer: str, hw: tuple[int, int], probs: torch.Tensor, logits_mean: torch.Tensor) -> None:
        self.shapes[layer] = hw
        if not self.keep_grad:
            probs, logits_mean = probs.detach(), logits_mean.detach()
        if self.keep_maps:
            self.maps.setdefault(self.step, {})[layer] = probs.mean(1) if self.average_heads else probs
        if self.keep_similarity:
            self.similarity.setdefault(self.step, {})[layer] = logits_mean

    # -- readers ---------------------------------------------------------------------------------

    @property
    def recorded_steps(self) -> list[int]:
        return sorted(set(self.maps) | set(self.similarity))

    def resolutions_present(self) -> list[int]:
        return sorted({h for h, _ in self.shapes.values()})

    def default_resolution(self) -> int:
        """The largest map height not above 16 (SD 1.5's 16x16 maps; the toy world's 8x8)."""
        res = self.resolutions_present()
        if not res:
            raise RuntimeError("the attention store is empty: run the UNet inside `with attention_store(...)`")
        small = [r for r in res if r <= 16]
        return max(small) if small else min(res)

    def token_maps(self, steps=None, res: int | None = None, batch: slice | None = None) -> torch.Tensor:
        """Per-token maps ``(B, T, h, w)`` averaged over heads, layers at resolution ``res`` (default
        :meth:`default_resolution`; other layers are resized to it) and the given steps (default all)."""
        if not self.keep_maps:
            raise RuntimeError("this store was made with keep_maps=False")
        res = res or self.default_resolution()
        steps = self.recorded_steps if steps is None else ([steps] if isinstance(steps, int) else list(steps))
        acc, n = None, 0
        for s in steps:
            for layer, m in self.maps.get(s, {}).items():
                h, w = self.shapes[layer]
                if m.dim() == 4:
                    m = m.mean(1)
                m = m[batch] if batch is not None else m
                x = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)
                target = (res, round(res * self.sample_hw[1] / self.sample_hw[0]))
                if (h, w) != target:
                    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
                acc = x if acc is None else acc + x
                n += 1
        if acc is None:
            raise RuntimeError(f"no maps recorded for steps {steps}")
        return acc / n

    def token_similarity(self, batch: slice | None = None) -> torch.Tensor:
        """Mean pre-softmax similarity per step and token, averaged over layers: ``(steps, B, T)``."""
        out = []
        for s in self.recorded_steps:
            layers = list(self.similarity.get(s, {}).values())
            if layers:
                v = torch.stack(layers).mean(0)
                out.append(v[batch] if batch is not None else v)
        if not out:
            raise RuntimeError("no similarity recorded (keep_similarity=False, or nothing ran)")
        return torch.stack(out)


def cond_half(n_prompts: int) -> slice:
    """The conditional half of a classifier-free-guidance batch ``[uncond; cond]``."""
    return slice(n_prompts, 2 * n_prompts)


def _default_processor_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor, AttnProcessor2_0


def attention_projections(processor, attn) -> tuple:
    """The query and key projections ``processor`` applies in layer ``attn``: a processor's own
    ``attention_projections(attn)`` when it has one; Custom Diffusion's ``to_q_custom_diffusion`` (when
    ``train_q_out``) and ``to_k_custom_diffusion`` (when ``train_kv``); else the layer's ``to_q``/``to_k``."""
    own = getattr(processor, "attention_projections", None)
    if callable(own):
        return own(attn)
    to_q = processor.to_q_custom_diffusion if getattr(processor, "train_q_out", False) and hasattr(
        processor, "to_q_custom_diffusion") else attn.to_q
    to_k = processor.to_k_custom_diffusion if getattr(processor, "train_kv", False) and hasattr(
        processor, "to_k_custom_diffusion") else attn.to_k
    return to_q, to_k


def _attention_inputs(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """What diffusers' attention processors do before the projections (spatial norm, flattening a 4-D input,
    the context and its norm, the mask, group norm). Returns the queries' input ``(B, HW, C)``, the context,
    the prepared mask and the 4-D input's shape (None for a 3-D input)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = tuple(hidden_states.shape)
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if attn.norm_cross and encoder_hidden_states is not None:
        context = attn.norm_encoder_hidden_states(context)
    mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, context, mask, shape


class StoreProcessor:
    """Wraps a cross-attention processor (``inner``): computes the probabilities explicitly and records them.

    ``inner=None`` or one of diffusers' default processors: the attention is computed here (as this module
    always has). Any other processor: the output is ``inner``'s own and the recorded probabilities use its
    projections (:func:`attention_projections`)."""

    def __init__(self, store: AttentionStore, layer: str, inner=None):
        self.store = store
        self.layer = layer
        self.inner = inner
        self.default = inner is None or type(inner) in _default_processor_types()
        self._inner_keys = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not self.default:
            return self._wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        hidden_states, context, attention_mask, shape = _attention_inputs(attn, hidden_states, encoder_hidden_states,
                                                                          attention_mask, temb)
        batch, n_queries, _ = hidden_states.shape
        four_d = shape is not None
        if four_d:
            b, c, h, w = shape

        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, HW, d)
        k = attn.head_to_batch_dim(attn.to_k(context))  # (B*heads, T, d)
        v = attn.head_to_batch_dim(attn.to_v(context))
        record = self.store.enabled
        if record:
            logits = torch.bmm(q, k.transpose(1, 2)) * attn.scale  # (B*heads, HW, T)
            if attention_mask is not None:
                logits = logits + attention_mask
            probs = logits.softmax(-1).to(v.dtype)
            out = torch.bmm(probs, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))

        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
            hw = (h, w)
        else:
            hw = self.store.latent_hw(n_queries)
        if record and self.store.wants(hw[0]):
            heads = attn.heads
            self.store.record(self.layer, hw, probs.view(batch, heads, n_queries, -1),
                              logits.view(batch, heads, n_queries, -1).float().mean((1, 2)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _call_inner(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        """The wrapped processor's own output; keyword arguments it does not take are left out (as diffusers'
        ``Attention.forward`` does for a processor's signature)."""
        import inspect

        if self._inner_keys is None:
            params = inspect.signature(self.inner.__call__).parameters.values()
            self._inner_keys = (None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
                                else {p.name for p in params})
        extra = dict(kwargs)
        if temb is not None:
            extra["temb"] = temb
        if self._inner_keys is not None:
            extra = {k: v for k, v in extra.items() if k in self._inner_keys}
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **extra)

    def _wrapped(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs):
        out = self._call_inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if not self.store.enabled:
            return out
        x, context, mask, shape = _attention_inputs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, n_queries, _ = x.shape
        hw = tuple(shape[2:]) if shape is not None else self.store.latent_hw(n_queries)
        if not self.store.wants(hw[0]):
            return out
        to_q, to_k = attention_projections(self.inner, attn)
        dtype = attn.to_q.weight.dtype
        q = attn.head_to_batch_dim(to_q(x.to(to_q.weight.dtype)).to(dtype))  # (B*heads, HW, d)
        k = attn.head_to_batch_dim(to_k(context.to(to_k.weight.dtype)).to(dtype))  # (B*heads, T, d)
        logits = torch.bmm(q, k.transpose(1, 2)) * attn.scale
        if mask is not None:
            logits = logits + mask
        probs = logits.softmax(-1)
        heads = attn.heads
        self.store.record(self.layer, hw, probs.view(batch, heads, n_queries, -1),
                          logits.view(batch, heads, n_queries, -1).float().mean((1, 2)))
        return out


def cross_attention_layers(unet) -> list[str]:
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextmanager
def attention_store(unet, store: AttentionStore | None = None):
    """Record cross-attention of every UNet call inside the block into ``store`` (a new one if None).

    Each cross-attention processor is wrapped (:class:`StoreProcessor`), so a model's own processors (Custom
    Diffusion's, say) keep computing its output. The original processor objects are put back on exit, also
    after an exception. The store is reset on entry.
    """
    store = store if store is not None else AttentionStore()
    store.reset()
    saved = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("this UNet has no cross-attention (attn2) layers to record")

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        store.sample_hw = tuple(sample.shape[-2:])
        store.step += 1

    procs = {name: (StoreProcessor(store, name, proc) if name in layers else proc) for name, proc in saved.items()}
    unet.set_attn_processor(procs)
    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()
        unet.set_attn_processor(dict(saved))


def relative_similarity(sim: torch.Tensor, token: list[int], others: list[int]) -> torch.Tensor:
    """Fig. 3's statistic: a token's mean q·k similarity minus the mean over the prompt's other word tokens.

    ``sim``: ``(steps, B, T)`` from :meth:`AttentionStore.token_similarity`. Returns ``(steps, B)``.
    """
    rest = [i for i in others if i not in token]
    if not rest:
        raise ValueError("the prompt has no other word tokens to compare with")
    return sim[..., token].mean(-1) - sim[..., rest].mean(-1)
