import numpy as np
import pytest
import torch
from PIL import Image

from compinv_utils.inversion import InversionConfig, invert, load_embedding, placeholder_tokens, unload

FAST = InversionConfig(steps=4, batch_size=2)


@pytest.fixture()
def world(toy_world):
    yield toy_world
    for t in ("<t1>", "<t2>", "<t3>", "<t4>", "<t5>", "<t6>"):
        unload(toy_world.pipe, t)


def test_only_the_new_rows_change(world):
    pipe, c = world.pipe, world.concepts_of_interest[0]
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    res = invert(pipe, c.photos, "<t1>", c.superclass, FAST, progress=False)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(before)], before)
    init = before[pipe.tokenizer.convert_tokens_to_ids(c.superclass + "</w>")]
    assert not torch.equal(res.embeddings[0], init)  # the new row moved away from its initialisation
    assert len(res.losses) == FAST.steps


def test_multi_vector_tokens_train_every_vector(world):
    c = world.concepts_of_interest[1]
    cfg = InversionConfig(steps=3, batch_size=2, num_vectors=3)
    res = invert(world.pipe, c.photos, "<t2>", c.superclass, cfg, progress=False)
    assert res.tokens == placeholder_tokens("<t2>", 3) == ["<t2>", "<t2>_1", "<t2>_2"]
    init = world.pipe.text_encoder.get_input_embeddings().weight[
        world.pipe.tokenizer.convert_tokens_to_ids(c.superclass + "</w>")].detach()
    assert res.embeddings.shape[0] == 3
    assert all(not torch.equal(v, init) for v in res.embeddings)


def test_saved_embedding_reloads_and_reproduces_the_image(world, tmp_path):
    c = world.concepts_of_interest[0]
    res = invert(world.pipe, c.photos, "<t3>", c.superclass, FAST, progress=False)
    prompt = f"a photo of a <t3> {c.superclass}"
    first = world.generate(prompt, seed=5, num_inference_steps=4)[0]
    path = res.save(tmp_path / "t3")
    unload(world.pipe, "<t3>")
    assert "<t3>" not in world.pipe.tokenizer.get_vocab()
    load_embedding(world.pipe, path)  # through StableDiffusionPipeline.load_textual_inversion
    again = world.generate(prompt, seed=5, num_inference_steps=4)[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_resume_from_checkpoint_matches_an_uninterrupted_run(world, tmp_path):
    c = world.concepts_of_interest[2]
    cfg = InversionConfig(steps=6, batch_size=2, checkpoint_every=3)
    full = invert(world.pipe, c.photos, "<t4>", c.superclass, cfg, progress=False)
    unload(world.pipe, "<t4>")
    # run the first half, "crash", and resume from the checkpoint with a fresh token
    half = InversionConfig(steps=6, batch_size=2, checkpoint_every=3)

    class Stop(Exception):
        pass

    crash = {"at": 3}

    def rec_only(rec, emb, step):  # the same loss as the full run; "crashes" at step 3 the first time
        if step == crash["at"]:
            raise Stop
        return rec

    with pytest.raises(Stop):
        invert(world.pipe, c.photos, "<t4>", c.superclass, half, loss_fn=rec_only, checkpoint_dir=tmp_path,
               progress=False)
    assert "<t4>" not in world.pipe.tokenizer.get_vocab()  # a failed run leaves no placeholder behind
    crash["at"] = None
    resumed = invert(world.pipe, c.photos, "<t4>", c.superclass, half, loss_fn=rec_only, checkpoint_dir=tmp_path,
                     progress=False)
    assert torch.allclose(resumed.embeddings, full.embeddings, atol=1e-6)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)


def test_bad_input(world):
    c = world.concepts_of_interest[0]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        invert(world.pipe, c.photos, "cat</w>", "cat", FAST, progress=False)
    with pytest.raises(ValueError, match="<name>"):
        invert(world.pipe, c.photos, "mochi", "cat", FAST, progress=False)
    with pytest.raises(ValueError, match="not a single token"):
        invert(world.pipe, c.photos, "<t5>", "teddybear", FAST, progress=False)
    with pytest.raises(ValueError, match="no photos"):
        invert(world.pipe, [], "<t5>", "cat", FAST, progress=False)
    with pytest.raises(FloatingPointError, match="learning rate"):
        invert(world.pipe, c.photos, "<t5>", "cat", FAST, loss_fn=lambda r, e, s: r * float("nan"), progress=False)


def test_mixed_photo_sizes_and_modes_are_handled(world):
    c = world.concepts_of_interest[0]
    photos = [c.photos[0].convert("L"), c.photos[1].convert("RGBA"), c.photos[2].resize((50, 40))]
    assert all(isinstance(p, Image.Image) for p in photos)
    res = invert(world.pipe, photos, "<t6>", c.superclass, FAST, progress=False)
    assert torch.isfinite(res.embeddings).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inversion_in_half_precision_trains_float32_rows(toy_world, dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_world.extras["root"] / "pipeline", dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    c = toy_world.concepts_of_interest[0]
    table = pipe.text_encoder.get_input_embeddings().weight
    init = table[pipe.tokenizer.convert_tokens_to_ids(c.superclass + "</w>")].detach().float().clone()
    seen = []
    res = invert(pipe, c.photos, "<h1>", c.superclass, InversionConfig(steps=3, batch_size=2),
                 loss_fn=lambda rec, e, step: seen.append(e.dtype) or rec, progress=False)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.dtype == dtype and seen == [torch.float32] * 3
    assert torch.isfinite(res.embeddings).all() and not torch.equal(res.embeddings[0], init)
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids("<h1>")].float(), res.embeddings[0])
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks  # the hook is gone
