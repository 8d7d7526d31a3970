"""DreamBench's DINO, CLIP-I and CLIP-T, checked on small random models of the classes the sd15 world loads."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizerFast,
                          CLIPVisionConfig, ViTConfig, ViTImageProcessor, ViTModel)

from compinv_utils.dreambench import DreamBenchModels, clip_i_score, clip_t_score, dino_score


@pytest.fixture(scope="module")
def models(toy_world):
    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                              image_size=32, patch_size=8), add_pooling_layer=False).eval()
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                              image_size=32, patch_size=8)
    tok = toy_world.clip_tokenizer  # a CLIP tokenizer stored with the toy world (offline)
    text = CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                          vocab_size=len(tok), max_position_embeddings=77)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    size = {"height": 32, "width": 32}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=size), tokenizer=tok)
    return DreamBenchModels(dino, ViTImageProcessor(size=size), clip, processor)


def images(*colours):
    return [Image.new("RGB", (32, 32), c) for c in colours]


def test_scores_compare_each_image_with_every_photo(models):
    gen, photos = images("red", "blue"), images("red", "green", "yellow")
    for score in (dino_score, clip_i_score):
        s = score(models, gen, photos)
        assert s.shape == (2,) and bool(((s >= -1 - 1e-5) & (s <= 1 + 1e-5)).all())
        same = score(models, photos[:1], photos[:1])
        assert torch.allclose(same, torch.ones(1), atol=1e-5), f"{score.__name__}: an image is its own best match"
        by_hand = torch.stack([score(models, gen, [p]) for p in photos]).mean(0)
        assert torch.allclose(s, by_hand, atol=1e-5), f"{score.__name__} is the mean over the photos"


def test_clip_t_pairs_each_image_with_its_own_prompt(models):
    gen = images("red", "blue")
    s = clip_t_score(models, gen, ["a photo of a cat", "a photo of a dog"])
    swapped = clip_t_score(models, gen[::-1], ["a photo of a dog", "a photo of a cat"])
    assert s.shape == (2,) and torch.allclose(s, swapped.flip(0), atol=1e-5)


def test_bad_input_says_what_to_give(models):
    with pytest.raises(ValueError, match="no real photos"):
        dino_score(models, images("red"), [])
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_t_score(models, images("red", "blue"), ["a cat"])
    with pytest.raises(ValueError, match="no generated images"):
        clip_i_score(models, [], images("red"))


def test_a_rows_dreambench_scores_come_from_its_images(toy_world, models, monkeypatch):
    from compinv_utils.neighbours import compare as N

    one = toy_world.concepts_of_interest[:1]
    monkeypatch.setattr(toy_world, "concepts_of_interest", one)
    scores = N.dreambench_rows(toy_world, models, ["TI"], seeds=1)["TI"]
    images, records = N.row_images(toy_world, "TI", one[0], seeds=1)
    assert len(images) == len(records) == len(N.partner_nouns(toy_world, one[0]))
    assert np.isclose(scores["dino"], float(dino_score(models, images, one[0].photos).mean()), atol=1e-5)
    with pytest.raises(ValueError, match="unknown row"):
        N.row_images(toy_world, "DreamBooth", one[0])
