import numpy as np

from compinv_utils.toy import render
from compinv_utils.worldbuilding.tokenizer import build_tokenizer
from compinv_utils.worldbuilding.train import CaptionTokenizer, captions_for


def test_every_caption_word_is_one_token():
    tok = build_tokenizer(render.caption_words())
    for w in render.caption_words():
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))
        assert tok.convert_ids_to_tokens(ids[1]) == w + "</w>"


def test_any_text_tokenizes_and_padding_is_sd_style():
    tok = build_tokenizer(render.caption_words())
    ids = tok("a zebra!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id


def test_save_and_load_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer(render.caption_words())
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    text = "a photo of a purple striped cat and an umbrella in the snow"
    assert again(text).input_ids == tok(text).input_ids


def test_fast_caption_ids_match_the_tokenizer():
    tok = build_tokenizer(render.caption_words())
    scenes = [render.sample_scene(i) for i in range(64)]
    rng = np.random.default_rng(0)
    caps = captions_for(scenes, np.arange(64), rng, dropout=0.2) + ["a zebra and a cat"]
    fast = CaptionTokenizer(tok)(caps, "cpu")
    ref = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert (fast == ref).all()
