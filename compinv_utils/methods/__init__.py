"""Inversion methods behind one protocol: textual inversion, Custom Diffusion and DreamBooth.

The paper's semantic and spatial inversion are post-training additions to any of them: semantic inversion is
the ``loss_fn`` of ``fit`` (an :class:`~compinv_utils.anchors.AnchorLoss` with the method's
``anchor_lambda(world)``), spatial inversion is :func:`~compinv_utils.guidance.guided_generate` on the pipeline
the method leaves (its attention recording wraps whatever processors the model has)::

    from compinv_utils.methods import get_method

    m = get_method("custom_diffusion")
    fitted = m.fit(world, concept, m.config_class(steps=300))  # world.pipe now holds the concept
    folder = m.save(fitted, "out/mochi")
    m.unload(world.pipe, fitted.handle)                       # the pipeline as it was
    handle = m.load(world.pipe, folder)                         # ... and back, from disk
    m.unload(world.pipe, handle)

Adding a method: a module with a class that has ``name``, ``config_class``, ``fit``, ``save``, ``load``,
``unload`` and ``anchor_lambda`` (see :class:`~compinv_utils.methods.base.InversionMethod`), and a line in
:data:`METHODS`.
"""

from __future__ import annotations

from .base import EMBEDDING_FILE, FineTuneConfig, Fitted, Handle, InversionMethod
from .custom_diffusion import CustomDiffusion, CustomDiffusionConfig
from .dreambooth import DREAMBOOTH_LAMBDA, OFFICIAL_SCRIPT_LAMBDA, DreamBooth, DreamBoothConfig
from .textual_inversion import TextualInversion

METHODS: dict[str, InversionMethod] = {
    "ti": TextualInversion(),
    "custom_diffusion": CustomDiffusion(),
    "dreambooth": DreamBooth(),
}


def get_method(name) -> InversionMethod:
    """The method registered as ``name`` (``"ti"``, ``"custom_diffusion"``, ``"dreambooth"``); a method object
    is returned as it is."""
    if not isinstance(name, str):
        if isinstance(name, InversionMethod):
            return name
        raise TypeError(f"a method is a name ({', '.join(METHODS)}) or a method object, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in METHODS:
        raise ValueError(f"unknown inversion method {name!r}; the methods are: {', '.join(METHODS)}")
    return METHODS[key]


__all__ = ["DREAMBOOTH_LAMBDA", "EMBEDDING_FILE", "METHODS", "OFFICIAL_SCRIPT_LAMBDA", "CustomDiffusion",
           "CustomDiffusionConfig", "DreamBooth", "DreamBoothConfig", "FineTuneConfig", "Fitted", "Handle",
           "InversionMethod", "TextualInversion", "get_method"]
