import pytest
import torch

from compinv_utils.attention import (AttentionStore, attention_store, cond_half, cross_attention_layers,
                                     relative_similarity)
from compinv_utils.tokens import prompt_token_positions, token_indices
from sd15_shapes import sd15_pipeline


@pytest.fixture(scope="module")
def pipe():
    return sd15_pipeline(width=0.1)


def _cond(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_store_records_every_cross_attention_layer_with_sd15_shapes(pipe):
    cond = _cond(pipe, ["a cat and a dog", "a kite"])
    with attention_store(pipe.unet) as store, torch.no_grad():
        pipe.unet(torch.randn(2, 4, 16, 16), 500, cond)
        pipe.unet(torch.randn(2, 4, 16, 16), 400, cond)
    assert store.recorded_steps == [0, 1]
    assert set(store.maps[0]) == set(cross_attention_layers(pipe.unet))
    assert len(store.maps[0]) == 16  # SD 1.5 has 16 cross-attention layers
    assert store.resolutions_present() == [2, 4, 8, 16]  # SD's 8, 16, 32, 64 at 1/4 of the latent size
    m = store.maps[0]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    assert m.shape == (2, 16 * 16, 77)
    assert torch.allclose(m.sum(-1), torch.ones(2, 256), atol=1e-5)
    maps = store.token_maps()
    assert maps.shape == (2, 77, 16, 16)
    assert store.token_similarity().shape == (2, 2, 77)


def test_non_square_latents(pipe):
    cond = _cond(pipe, ["a cat"])
    with attention_store(pipe.unet, AttentionStore(resolutions=(8,))) as store, torch.no_grad():
        pipe.unet(torch.randn(1, 4, 16, 24), 500, cond)
    assert set(store.shapes.values()) >= {(8, 12)}
    assert store.token_maps(res=8).shape == (1, 77, 8, 12)
    assert all(store.shapes[layer] == (8, 12) for layer in store.maps[0])


def test_store_leaves_the_output_and_processors_unchanged(pipe):
    cond = _cond(pipe, ["a cat"])
    x = torch.randn(1, 4, 16, 16)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with torch.no_grad():
        ref = pipe.unet(x, 500, cond).sample
        with attention_store(pipe.unet):
            got = pipe.unet(x, 500, cond).sample
    assert torch.allclose(ref, got, atol=1e-4)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_processors_restored_after_an_exception(pipe):
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with attention_store(pipe.unet):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_keep_grad_lets_gradients_reach_the_latents(pipe):
    cond = _cond(pipe, ["a cat"])
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    with attention_store(pipe.unet, AttentionStore(keep_grad=True, resolutions=(4,))) as store:
        pipe.unet(x, 500, cond)
        loss = store.token_maps(res=4)[0, 2].sum()
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().sum() > 0


def test_pipeline_run_with_cfg_and_token_helpers(pipe):
    prompt = "a cat and a dog"
    with attention_store(pipe.unet, AttentionStore(resolutions=(4,))) as store:
        pipe(prompt, num_inference_steps=3, height=128, width=128, generator=torch.Generator().manual_seed(0))
    assert store.recorded_steps == [0, 1, 2]
    maps = store.token_maps(batch=cond_half(1))
    assert maps.shape == (1, 77, 4, 4)
    cat = token_indices(pipe.tokenizer, prompt, "cat")
    assert cat == [2]
    words = prompt_token_positions(pipe.tokenizer, prompt)
    assert words == [1, 2, 3, 4, 5]
    rel = relative_similarity(store.token_similarity(batch=cond_half(1)), cat, words)
    assert rel.shape == (3, 1)
    with pytest.raises(ValueError, match="does not occur"):
        token_indices(pipe.tokenizer, prompt, "kite")


def test_empty_store_says_what_to_do():
    with pytest.raises(RuntimeError, match="attention_store"):
        AttentionStore().token_maps()
