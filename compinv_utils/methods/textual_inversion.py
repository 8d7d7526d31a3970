"""Textual inversion (Gal et al., ICLR 2023) through the method protocol: :func:`compinv_utils.inversion.invert`.

Only the placeholder's embedding rows are learned; the model is untouched. A saved concept is the folder's
``learned_embeds.safetensors`` (``{token: (n_vectors, D)}``, what ``pipe.load_textual_inversion`` reads), the
file :meth:`~compinv_utils.inversion.InversionResult.save` and :func:`~compinv_utils.inversion.invert_or_load`
write; folders of chapters 01–05 (``data/<world>/inversions/<kind>/seed<s>/<name>/``) load as they are.
"""

from __future__ import annotations

from pathlib import Path

from ..inversion import InversionConfig, invert
from .base import EMBEDDING_FILE, FineTuneConfig, Fitted, Handle, load_token, load_tokens, resolve_config, restore


class TextualInversion:
    name = "ti"
    config_class = InversionConfig

    def fit(self, world, concept, config: InversionConfig | None = None, loss_fn=None, seed: int | None = None,
            progress: bool = True, masks=None, checkpoint_dir=None) -> Fitted:
        """:func:`~compinv_utils.inversion.invert` on the concept's photos, token and superclass (its results
        are exactly ``invert``'s); ``seed`` replaces ``config.seed`` when given."""
        config = resolve_config(self, config, seed)
        if isinstance(config, FineTuneConfig):
            raise TypeError(f"textual inversion takes an InversionConfig, got a {type(config).__name__} (the "
                            "settings of a method that trains model weights)")
        res = invert(world.pipe, concept.photos, concept.token, concept.superclass, config, loss_fn=loss_fn,
                     masks=masks, checkpoint_dir=checkpoint_dir, progress=progress)
        return Fitted(self.name, res, Handle(res.token))

    def save(self, result: Fitted, folder: str | Path) -> Path:
        folder = Path(folder)
        result.inversion.save(folder / EMBEDDING_FILE)
        return folder

    def load(self, pipe, folder: str | Path) -> Handle:
        folder = Path(folder)
        if folder.suffix == ".safetensors":  # the embedding file itself
            folder = folder.parent
        return Handle(load_token(pipe, folder))

    def compose(self, pipe, folders, nouns=None) -> Handle:
        """Every folder's embedding into the one text encoder (textual inversion composes by construction)."""
        return load_tokens(pipe, [Path(f) for f in folders], Handle(""))

    def unload(self, pipe, handle: Handle) -> None:
        restore(pipe, handle)

    def anchor_lambda(self, world) -> float:
        """The world's λ (chosen by chapter 03's sweep; the paper's 0.95 for SD 1.5)."""
        return world.settings.lam
