"""DreamBench's three measures (Ruiz et al., DreamBooth, CVPR 2023), the ones CoRe and ClassDiffusion report, for
the sd15 world: DINO (subject fidelity: the mean cosine between the DINO ViT-S/16 ``[CLS]`` embeddings of a
generated image and of each real photo), CLIP-I (the same with CLIP ViT-B/32 image embeddings) and CLIP-T (the
cosine between a generated image and its prompt, CLIP ViT-B/32). The models come from the Hugging Face hub
(:func:`load_models`), so these run only where the hub is reachable; the functions take any model of the same
classes, which is how the tests check them on small random ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .maths import unit_features

DINO_ID = "facebook/dino-vits16"  # DreamBench's DINO: ViT-S/16
CLIP_ID = "openai/clip-vit-base-patch32"  # DreamBench's CLIP: ViT-B/32


@dataclass
class DreamBenchModels:
    dino: object  # transformers.ViTModel
    dino_processor: object  # its image processor
    clip: object  # transformers.CLIPModel
    clip_processor: object  # transformers.CLIPProcessor (image processor and tokenizer)


def load_models(device: str | torch.device = "cpu") -> DreamBenchModels:
    """DINO ViT-S/16 and CLIP ViT-B/32 from the hub (needs network access the first time)."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    return DreamBenchModels(ViTModel.from_pretrained(DINO_ID, add_pooling_layer=False).to(device).eval(),
                            AutoImageProcessor.from_pretrained(DINO_ID),
                            CLIPModel.from_pretrained(CLIP_ID).to(device).eval(), CLIPProcessor.from_pretrained(CLIP_ID))


def _check(images: Sequence[Image.Image], photos: Sequence[Image.Image] | None = None) -> None:
    if not len(images):
        raise ValueError("no generated images given")
    if photos is not None and not len(photos):
        raise ValueError("no real photos given: DINO and CLIP-I compare each generated image with the concept's photos")


@torch.no_grad()
def dino_embeddings(models: DreamBenchModels, images: Sequence[Image.Image]) -> torch.Tensor:
    """Unit-length ``[CLS]`` embeddings ``(N, D)`` of the DINO ViT."""
    device = next(models.dino.parameters()).device
    px = models.dino_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    return unit_features(models.dino(pixel_values=px.to(device)).last_hidden_state[:, 0])


@torch.no_grad()
def clip_image_embeddings(models: DreamBenchModels, images: Sequence[Image.Image]) -> torch.Tensor:
    device = next(models.clip.parameters()).device
    px = models.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    out = models.clip.get_image_features(pixel_values=px.to(device))
    return unit_features(out)


@torch.no_grad()
def clip_text_embeddings(models: DreamBenchModels, texts: Sequence[str]) -> torch.Tensor:
    device = next(models.clip.parameters()).device
    ids = models.clip_processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    out = models.clip.get_text_features(input_ids=ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device))
    return unit_features(out)


def dino_score(models: DreamBenchModels, images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> torch.Tensor:
    """DINO per generated image ``(N,)``: its mean cosine to the photos."""
    _check(images, photos)
    return (dino_embeddings(models, images) @ dino_embeddings(models, photos).T).mean(1)


def clip_i_score(models: DreamBenchModels, images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> torch.Tensor:
    """CLIP-I per generated image ``(N,)``: its mean CLIP image cosine to the photos."""
    _check(images, photos)
    return (clip_image_embeddings(models, images) @ clip_image_embeddings(models, photos).T).mean(1)


def clip_t_score(models: DreamBenchModels, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
    """CLIP-T per generated image ``(N,)``: the cosine between the image and its prompt (DreamBench writes the
    prompt with the class noun where the personalised one has ``S*``)."""
    _check(images)
    if len(texts) != len(images):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts: give one prompt per image")
    return (clip_image_embeddings(models, images) * clip_text_embeddings(models, texts)).sum(-1)
