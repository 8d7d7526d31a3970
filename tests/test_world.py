import time

import numpy as np
import pytest
import torch
from PIL import Image

from compinv_utils import load_photos, load_world
from compinv_utils.toy import render
from compinv_utils.world import load_sd15_world
from compinv_utils.concepts import concepts_from_folder


def test_toy_world_contents(toy_world):
    w = toy_world
    assert w.name == "toy" and w.nouns == sorted(render.NOUNS)
    assert (w.image_size, w.latent_size) == (32, 8)
    assert len(w.concepts_of_interest) == len(render.CONCEPTS)
    for c in w.concepts_of_interest:
        assert c.token.startswith("<") and c.superclass in w.nouns and len(c.photos) >= 4
    assert len(w.pipe.tokenizer) == w.pipe.text_encoder.get_input_embeddings().num_embeddings


def test_load_is_fast():
    load_world("toy", device="cpu")  # imports and caches warm
    t = time.perf_counter()
    load_world("toy", device="cpu")
    assert time.perf_counter() - t < 5.0


def test_short_pipeline_run_is_deterministic(toy_world):
    a = toy_world.generate(["a cat", "a dog and a kite"], seed=3, num_inference_steps=5)
    b = toy_world.generate(["a dog and a kite"], seed=4, num_inference_steps=5)
    assert a[0].size == (32, 32)
    # image i uses seed + i whatever the batch (batched kernels may differ in the last bits)
    assert np.abs(np.asarray(a[1], float) - np.asarray(b[0], float)).max() <= 2


def test_detector_finds_rendered_objects(toy_world):
    images, truths = [], []
    for s in range(40):
        im, boxes = render.render_scene(seed=20_000_000 + s)
        images.append(im)
        truths.append({n for n, _ in boxes})
    dets = toy_world.detect(images)
    found = [{lab for lab, _, _ in d} for d in dets]
    assert np.mean([f == t for f, t in zip(found, truths)]) > 0.85
    for d in dets:
        for lab, (x0, y0, x1, y1), score in d:
            assert lab in toy_world.nouns and 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 and 0.5 <= score <= 1


def test_clip_features_rank_the_right_caption(toy_world):
    scenes = [render.sample_scene(30_000_000 + i, n_objects=1) for i in range(8)]
    caps = [render.caption(s, 0, render.FULL) for s in scenes]
    sim = toy_world.image_features([render.draw_scene(s)[0] for s in scenes]) @ toy_world.text_features(caps).T
    assert sim.shape == (8, 8)
    assert (sim.argmax(1) == np.arange(8)).float().mean() >= 0.75


def test_bad_world_names_and_nouns(toy_world):
    with pytest.raises(ValueError, match="toy, sd15"):
        load_world("sdxl")
    with pytest.raises(ValueError, match="cat"):
        toy_world.check_nouns(["zebra"])
    with pytest.raises(KeyError, match="mochi"):
        toy_world.concept("nobody")


def test_sd15_without_hub_access_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="load_world\\('toy'\\)"):
        load_sd15_world(device="cpu")


def test_photo_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_photos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_photos(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read photo"):
        load_photos(tmp_path / "bad")
    dog = tmp_path / "concepts" / "dog6"
    dog.mkdir(parents=True)
    Image.new("L", (80, 60)).save(dog / "a.png")
    Image.new("RGBA", (60, 60)).save(dog / "b.png")
    (coi,) = concepts_from_folder(tmp_path / "concepts", size=64)
    assert (coi.name, coi.token, coi.superclass) == ("dog6", "<dog6>", "dog")
    assert all(p.size == (64, 64) and p.mode == "RGB" for p in coi.photos)


def test_the_pipeline_folder_loads_with_a_plain_from_pretrained(toy_world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_world.extras["root"] / "pipeline")  # no dtype given
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
