"""Randomly initialised models with Stable Diffusion 1.5's layer structure, built from configs (no download).

``width`` scales the channel counts: 1.0 is SD 1.5 itself (860 M UNet parameters); smaller widths keep
the block structure (four UNet levels, cross-attention at three of them, 8 heads, 77 tokens) for fast tests.
"""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from compinv_utils.toy import render
from compinv_utils.toy.models import SCHEDULER_CONFIG
from compinv_utils.toy.tokenizer import build_tokenizer


def sd15_unet(width: float = 1.0, text_dim: int = 768) -> UNet2DConditionModel:
    ch = tuple(int(c * width) // 32 * 32 or 32 for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32,
    )


def sd15_text_encoder(vocab_size: int, width: float = 1.0, eos_id: int = 2) -> CLIPTextModel:
    hidden = max(64, int(768 * width) // 64 * 64)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=12 if width >= 1 else 2, num_attention_heads=12 if width >= 1 else 4,
                         max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=eos_id, bos_token_id=eos_id - 1,
                         pad_token_id=eos_id)
    return CLIPTextModel(cfg)


def sd15_vae(width: float = 1.0) -> AutoencoderKL:
    ch = tuple(int(c * width) // 32 * 32 or 32 for c in (128, 256, 512, 512))
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=ch, norm_num_groups=32, scaling_factor=0.18215)


def sd15_pipeline(width: float = 1.0, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tok = build_tokenizer(render.caption_words())
    unet = sd15_unet(width)
    te = sd15_text_encoder(len(tok), width, tok.eos_token_id)
    if te.config.hidden_size != unet.config.cross_attention_dim:
        unet = sd15_unet(width, te.config.hidden_size)
    pipe = StableDiffusionPipeline(vae=sd15_vae(width), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
