"""Configurations of the toy world's models (the same classes as Stable Diffusion 1.5) and its detector."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from transformers import CLIPConfig, CLIPModel

IMAGE_SIZE = 32  # pixels
LATENT_SIZE = 8  # the committed VAE downsamples by 4 (three blocks)
LATENT_SIZES = (8, 16)  # latent grids a toy VAE can have: 4x4-pixel cells (committed) or 2x2-pixel cells (two blocks)
LATENT_CHANNELS = 16  # SD 1.5 has 4 (SD 3 has 16); two colours, a pattern's phase and an outline per 4x4-pixel
# cell need more than 4 or 8 (see train.py)
TEXT_DIM = 128  # width of the text tower = the UNet's cross-attention dimension
MAX_TOKENS = 77  # as in SD 1.5

# The noise schedule of SD 1.5 (scaled-linear betas, 1000 steps, epsilon prediction).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def check_latent_size(size) -> int:
    """``size`` as an int if it is one of :data:`LATENT_SIZES`; ValueError if not."""
    if size not in LATENT_SIZES:
        raise ValueError(f"the toy latent grid is {' or '.join(map(str, LATENT_SIZES))} cells a side "
                         f"({IMAGE_SIZE}-pixel images), got {size!r}")
    return int(size)


def make_vae(latent_channels: int = LATENT_CHANNELS, latent_size: int = LATENT_SIZE) -> AutoencoderKL:
    """The toy VAE: SD 1.5's AutoencoderKL with three blocks (``latent_size`` 8: 4x4-pixel cells) or two
    (``latent_size`` 16: 2x2-pixel cells, a pattern spanning several cells)."""
    blocks = (32, 64, 64) if check_latent_size(latent_size) == 8 else (64, 64)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=1, norm_num_groups=32,
    )


def vae_latent_size(vae) -> int:
    """The side of ``vae``'s latent grid for a toy image (each block but the last halves it)."""
    return IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)


UNET_WIDTHS = (64, 128)  # channels at the two levels of the committed UNet (8x8 and 4x4)


def check_unet_widths(widths) -> tuple[int, int]:
    """``widths`` as a tuple of two ints, each a positive multiple of 32 (the group-norm groups); ValueError if not."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != 2 or any(w <= 0 or w % 32 for w in widths):
        raise ValueError(f"UNet widths must be two positive multiples of 32 (one per level), got {widths}")
    return widths


def make_unet(latent_channels: int = LATENT_CHANNELS, widths: tuple[int, ...] = UNET_WIDTHS,
              latent_size: int = LATENT_SIZE) -> UNet2DConditionModel:
    """The toy UNet: SD 1.5's block types at two levels (the latent grid and half of it: 8x8 and 4x4, or 16x16
    and 8x8), ``widths`` channels each (:func:`check_unet_widths`)."""
    widths = check_unet_widths(widths)
    return UNet2DConditionModel(
        sample_size=check_latent_size(latent_size), in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=widths, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32,
    )


def make_clip(vocab_size: int, bos_id: int, eos_id: int) -> CLIPModel:
    text = dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=bos_id, eos_token_id=eos_id,
                pad_token_id=eos_id, projection_dim=TEXT_DIM)
    vision = dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_channels=3, projection_dim=TEXT_DIM)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_DIM))


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def make_sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


class ToyDetector(nn.Module, PyTorchModelHubMixin):
    """A small single-shot detector for the toy world.

    A toy scene holds each noun at most once, so the detector predicts, for every noun, a presence
    score and one box. Input: ``(B, 3, H, W)`` images in [0, 1] (any H = W divisible by 8).
    Output: presence logits ``(B, K)`` and boxes ``(B, K, 4)`` as ``(x0, y0, x1, y1)`` in [0, 1].
    """

    def __init__(self, labels: list[str], width: int = 64, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.labels = list(labels)
        self.image_size = image_size
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.backbone = nn.Sequential(block(3, w, 1), block(w, w, 2), block(w, 2 * w, 1), block(2 * w, 2 * w, 2),
                                      block(2 * w, 4 * w, 1), block(4 * w, 4 * w, 2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (image_size // 8) ** 2, 512), nn.SiLU(),
                                  nn.Dropout(0.1), nn.Linear(512, 5 * len(self.labels)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.shape[-1] != self.image_size:
            pixels = nn.functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                               antialias=True, align_corners=False)
        out = self.head(self.backbone(pixels * 2 - 1)).view(len(pixels), len(self.labels), 5)
        c = torch.sigmoid(out[..., 1:3])
        half = torch.sigmoid(out[..., 3:5]) / 2
        return out[..., 0], torch.cat([c - half, c + half], -1).clamp(0, 1)
