"""Bad input fails at the door with a message that says what to do, and a failure leaves nothing half-done:
no placeholder left in the tokenizer, no truncated or overwritten file."""
import datetime
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compinv_utils import files
from compinv_utils import inversion as I
from compinv_utils import layout as L
from compinv_utils.anchors import AnchorLoss
from compinv_utils.guidance import GuidanceConfig, guided_generate, localisation_loss
from compinv_utils.statistics import bootstrap_ci, bootstrap_diff_ci
from compinv_utils.detection import crop

TINY = I.InversionConfig(steps=1, batch_size=1)
TOKENS = ("<b1>", "<b2>", "<b3>", "<b4>", "<a-b>", "<a_b>")


@pytest.fixture()
def world(toy_world):
    yield toy_world
    for t in TOKENS:
        I.unload(toy_world.pipe, t)


@pytest.fixture()
def concept(toy_world):
    return toy_world.concepts_of_interest[0]


def dim(world) -> int:
    return world.pipe.text_encoder.get_input_embeddings().weight.shape[1]


def row(world, token: str) -> torch.Tensor:
    return world.pipe.text_encoder.get_input_embeddings().weight[world.pipe.tokenizer.convert_tokens_to_ids(token)].detach().clone()


# -- inversion settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(flip_p=1.5), "flip_p is a probability"),
    (dict(templates=()), "templates must be a non-empty tuple"),
    (dict(templates=("a photo of a",)), "exactly one '\\{\\}'"),
    (dict(templates=("a {} and a {}",)), "exactly one '\\{\\}'"),
    (dict(templates=("{}",)), "exactly one '\\{\\}'"),
])
def test_inversion_settings_are_checked_before_anything_happens(world, concept, bad, message):
    vocab = len(world.pipe.tokenizer)
    with pytest.raises(ValueError, match=message):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, I.InversionConfig(**bad), progress=False)
    assert len(world.pipe.tokenizer) == vocab


def test_masks_all_zero_negative_or_miscounted(world, concept):
    n = len(concept.photos)
    ok = [np.ones((8, 8))] * n
    with pytest.raises(ValueError, match="mask 1 is all zero"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, TINY, masks=[ok[0], np.zeros((8, 8))] + ok[2:],
                 progress=False)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, TINY, masks=[-np.ones((8, 8))] + ok[1:],
                 progress=False)
    with pytest.raises(ValueError, match=f"1 masks for {n} photos"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, TINY, masks=ok[:1], progress=False)
    assert "<b1>" not in world.pipe.tokenizer.get_vocab()


def test_loss_fn_must_be_callable(world, concept):
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, TINY, loss_fn="anchor", progress=False)


def test_a_failing_inversion_leaves_no_placeholder_and_no_hook(world, concept):
    def boom(rec, e, step):
        raise RuntimeError("loss failed")

    vocab, rows = len(world.pipe.tokenizer), world.pipe.text_encoder.get_input_embeddings().num_embeddings
    with pytest.raises(RuntimeError, match="loss failed"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, TINY, loss_fn=boom, progress=False)
    emb = world.pipe.text_encoder.get_input_embeddings()
    assert len(world.pipe.tokenizer) == vocab and emb.num_embeddings == rows and not emb._forward_hooks


# -- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture()
def checkpoint(world, concept, tmp_path) -> Path:
    cfg = I.InversionConfig(steps=1, batch_size=1, checkpoint_every=1)
    I.invert(world.pipe, concept.photos, "<b2>", concept.superclass, cfg, checkpoint_dir=tmp_path, progress=False)
    I.unload(world.pipe, "<b2>")
    (path,) = tmp_path.glob("inversion_*.pt")
    return path


def test_checkpoint_from_other_photos_or_settings_is_refused(world, concept, checkpoint):
    cfg = I.InversionConfig(steps=1, batch_size=1, checkpoint_every=1)
    folder = checkpoint.parent
    with pytest.raises(ValueError, match=f"{checkpoint.name} was made from a different superclass.*delete it"):
        I.invert(world.pipe, concept.photos, "<b2>", "dog", cfg, checkpoint_dir=folder, progress=False)
    with pytest.raises(ValueError, match="made from a different photos"):
        I.invert(world.pipe, concept.photos[:2], "<b2>", concept.superclass, cfg, checkpoint_dir=folder, progress=False)
    with pytest.raises(ValueError, match="made from a different loss"):
        I.invert(world.pipe, concept.photos, "<b2>", concept.superclass, cfg, loss_fn=lambda r, e, s: r,
                 checkpoint_dir=folder, progress=False)
    with pytest.raises(ValueError, match="made from a different config"):
        I.invert(world.pipe, concept.photos, "<b2>", concept.superclass, I.InversionConfig(steps=1, batch_size=2,
                 checkpoint_every=1), checkpoint_dir=folder, progress=False)
    assert "<b2>" not in world.pipe.tokenizer.get_vocab()


def test_truncated_checkpoint_names_the_file(world, concept, checkpoint):
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{checkpoint.name} is truncated"):
        I.invert(world.pipe, concept.photos, "<b2>", concept.superclass,
                 I.InversionConfig(steps=1, batch_size=1, checkpoint_every=1), checkpoint_dir=checkpoint.parent,
                 progress=False)


def test_checkpoint_with_nan_is_refused(world, concept, checkpoint):
    blob = torch.load(checkpoint, weights_only=True)
    blob["embeddings"][0, 0] = float("nan")
    torch.save(blob, checkpoint)
    with pytest.raises(ValueError, match="NaN or infinite"):
        I.invert(world.pipe, concept.photos, "<b2>", concept.superclass,
                 I.InversionConfig(steps=1, batch_size=1, checkpoint_every=1), checkpoint_dir=checkpoint.parent,
                 progress=False)


def test_a_pickled_object_in_a_checkpoint_is_not_run(world, concept, checkpoint):
    torch.save({"made_from": datetime.datetime.now()}, checkpoint)  # any non-tensor global: refused by weights_only
    with pytest.raises(ValueError, match="not a plain tensor file"):
        I.invert(world.pipe, concept.photos, "<b2>", concept.superclass,
                 I.InversionConfig(steps=1, batch_size=1, checkpoint_every=1), checkpoint_dir=checkpoint.parent,
                 progress=False)


def test_checkpoint_names_do_not_collide():
    assert I._checkpoint_path(Path("x"), "<a-b>") != I._checkpoint_path(Path("x"), "<a_b>")


def test_a_failing_checkpoint_save_keeps_the_previous_one(world, concept, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: write half a file, then fail
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    cfg = I.InversionConfig(steps=2, batch_size=1, checkpoint_every=1)
    with pytest.raises(OSError, match="disk full"):
        I.invert(world.pipe, concept.photos, "<b3>", concept.superclass, cfg, checkpoint_dir=tmp_path, progress=False)
    (path,) = tmp_path.iterdir()  # no temporary file left behind
    assert files.torch_load(path)["step"] == 1


# -- embedding files ---------------------------------------------------------------------------------------------


@pytest.fixture()
def loaded(world, tmp_path) -> torch.Tensor:
    good = torch.randn(1, dim(world), generator=torch.Generator().manual_seed(0)) * 0.01
    I.load_embedding(world.pipe, I.save_embedding(tmp_path / "good.safetensors", "<b4>", good))
    return row(world, "<b4>")


@pytest.mark.parametrize("bad, message", [
    ("nan", "NaN or infinite"),
    ("dim", "has shape \\(1, 7\\) but this text encoder needs"),
    ("truncated", "truncated or not a safetensors file"),
])
def test_a_bad_embedding_file_changes_nothing(world, tmp_path, loaded, bad, message):
    from safetensors.torch import save_file

    path = tmp_path / f"{bad}.safetensors"
    if bad == "nan":
        save_file({"<b4>": torch.full((1, dim(world)), float("nan"))}, str(path))
    elif bad == "dim":
        save_file({"<b4>": torch.zeros(1, 7)}, str(path))
    else:
        save_file({"<b4>": torch.zeros(1, dim(world))}, str(path))
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=message):
        I.load_embedding(world.pipe, path)
    assert torch.equal(row(world, "<b4>"), loaded)  # the old token is still there, unchanged


def test_saving_a_nan_embedding_keeps_the_old_file(tmp_path):
    path = I.save_embedding(tmp_path / "e.safetensors", "<b1>", torch.zeros(1, 4))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="NaN or infinite"):
        I.save_embedding(path, "<b1>", torch.full((1, 4), float("inf")))
    assert path.read_bytes() == before


# -- layout data and model ---------------------------------------------------------------------------------------


def fake_generation(monkeypatch, world, fail_after: int | None = None):
    """Instant stand-ins for the world's sampler and detector: both nouns are always found."""
    calls = []

    def generate(prompts, seeds=None, batch_size=16, **kw):
        calls.append(len(prompts))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("generation failed")
        return [None] * len(prompts)

    def detect(images, threshold=0.5):
        return [[(n, (0.1, 0.1, 0.5, 0.5), 0.9) for n in world.nouns] for _ in images]

    monkeypatch.setattr(world, "generate", generate)
    monkeypatch.setattr(world, "detect", detect)
    return calls


JOBS = L.layout_jobs(["cat", "kite"], seeds=2, templates=("{a} and {b}",))


def test_no_jobs_leaves_the_records_file_untouched(world, tmp_path, monkeypatch):
    fake_generation(monkeypatch, world)
    path = tmp_path / "l.jsonl"
    L.generate_records(world, JOBS, path, batch_size=2, progress=False)
    before = path.read_bytes()
    assert L.generate_records(world, [], path, progress=False) == L.read_records(path)
    assert path.read_bytes() == before and before


def test_records_deleted_but_done_file_left_are_generated_again(world, tmp_path, monkeypatch):
    calls = fake_generation(monkeypatch, world)
    path = tmp_path / "l.jsonl"
    first = L.generate_records(world, JOBS, path, batch_size=2, progress=False)
    path.unlink()
    with pytest.warns(UserWarning, match="generating them again"):
        again = L.generate_records(world, JOBS, path, batch_size=2, progress=False)
    assert again == first and L.read_records(path) == first and sum(calls) == 2 * len(JOBS)


def test_a_file_that_is_not_records_is_refused_not_overwritten(world, tmp_path, monkeypatch):
    fake_generation(monkeypatch, world)
    path = tmp_path / "notes.jsonl"
    path.write_text("my notes\nmore notes\n")
    with pytest.raises(ValueError, match="not a records file"):
        L.generate_records(world, JOBS, path, progress=False)
    assert path.read_text() == "my notes\nmore notes\n"


def test_a_failing_generation_keeps_the_records_already_made(world, tmp_path, monkeypatch):
    fake_generation(monkeypatch, world, fail_after=1)
    path = tmp_path / "l.jsonl"
    with pytest.raises(RuntimeError, match="generation failed"):
        L.generate_records(world, JOBS, path, batch_size=2, progress=False)
    kept = L.read_records(path)
    assert len(kept) == 2 and len((tmp_path / "l.jsonl.done").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.jsonl", "l.jsonl.done", "l.jsonl.missed"]  # no temporary files


def test_layout_batch_size_and_single_job(world, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        L.generate_records(world, JOBS, tmp_path / "l.jsonl", batch_size=0, progress=False)
    with pytest.raises(TypeError, match="wrap a single job in a list"):
        L.generate_records(world, JOBS[0], tmp_path / "l.jsonl", progress=False)


def test_layout_mlp_files_load_without_pickled_code(tmp_path):
    model, features = L.load_layout_mlp(Path(__file__).resolve().parents[1] / "data/toy/layout/layout_mlp.pt")
    assert features and model.nouns
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "dim": 4, "features": datetime.datetime.now(), "nouns": []}, evil)
    with pytest.raises(ValueError, match="evil.pt is truncated, corrupt or not a plain tensor file"):
        L.load_layout_mlp(evil)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.load_layout_mlp(tmp_path / "missing.pt")


def test_a_failing_layout_mlp_save_keeps_the_old_file(tmp_path, monkeypatch):
    feats = {n: torch.randn(8) for n in ("cat", "dog")}
    model, _ = L.train_layout_mlp([{"a": "cat", "b": "dog", "box_a": [0, 0, .5, .5], "box_b": [.5, .5, 1, 1]}],
                                  feats, steps=1)
    path = tmp_path / "m.pt"
    L.save_layout_mlp(model, path, "input embedding")
    before = path.read_bytes()

    def broken(obj, f, *a, **k):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        L.save_layout_mlp(model, path, "encoder output")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize("box, message", [
    ((0.1, 0.2, 0.5), "must have 4 numbers"),
    ((0.1, 0.2, 1.5, 0.9), "outside \\[0, 1\\]"),
    ((0.5, 0.2, 0.4, 0.9), "degenerate"),
    ((0.1, float("nan"), 0.5, 0.9), "outside \\[0, 1\\]"),
])
def test_bad_boxes(box, message):
    with pytest.raises(ValueError, match=message):
        L.box_to_mask(box, 8)


def test_a_truncated_detector_file_names_the_path(tmp_path):
    from compinv_utils.world import TOY_DIR, load_toy_world

    for part in ("pipeline", "clip"):
        (tmp_path / part).symlink_to(TOY_DIR / part)
    shutil.copytree(TOY_DIR / "detector", tmp_path / "detector")
    weights = tmp_path / "detector" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'detector'}.*truncated.*make toy-world"):
        load_toy_world(tmp_path, device="cpu")


# -- guidance ----------------------------------------------------------------------------------------------------


def test_localisation_loss_refuses_empty_or_negative_masks():
    maps = torch.rand(1, 5, 8, 8)
    with pytest.raises(ValueError, match="all zero"):
        localisation_loss(maps, [[1]], torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="negative"):
        localisation_loss(maps, [[1]], -torch.ones(1, 8, 8))


def guided(world, **kw):
    args = dict(prompts=["a cat and a kite"], words=["cat", "kite"], boxes=[(0, 0, 0.5, 1), (0.5, 0, 1, 1)],
                num_inference_steps=2, config=GuidanceConfig(guided_steps=1, inner_iters=1)) | kw
    return guided_generate(world, **args)


@pytest.mark.parametrize("bad, error, message", [
    (dict(config=GuidanceConfig(guided_steps=1, step_size=float("inf"))), ValueError, "step_size must be a finite number"),
    (dict(config=GuidanceConfig(guided_steps=1, step_size=float("nan"))), ValueError, "step_size must be a finite number"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (dict(prompts=[]), ValueError, "no prompts given"),
    (dict(words="cat"), TypeError, "words must be a list"),
    (dict(boxes=(0, 0, 0.5, 1)), TypeError, "boxes must be a list of \\(x0, y0, x1, y1\\) boxes"),
    (dict(boxes=[(0, 0, 0.5), (0.5, 0, 1, 1)]), ValueError, "must have 4 numbers"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be >= 1 and finite"),
    (dict(config=GuidanceConfig(guided_steps=1, layers="down")), TypeError, "layers must be a tuple"),
    (dict(height=30), ValueError, "height must be a positive multiple of 4"),
    (dict(prompts=["a " * 80 + "cat and a kite"]), ValueError, "past the 76 tokens"),
])
def test_guided_generation_input(world, bad, error, message):
    before = {k: type(v) for k, v in world.pipe.unet.attn_processors.items()}
    with pytest.raises(error, match=message):
        guided(world, **bad)
    assert {k: type(v) for k, v in world.pipe.unet.attn_processors.items()} == before


# -- world, anchors, metrics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, kw, message", [
    ("a cat", dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    ([], {}, "no prompts given"),
    ("a cat", dict(batch_size=0), "batch_size must be an integer >= 1"),
    ("a cat", dict(guidance_scale=math.inf), "guidance_scale must be a finite number"),
    ("a cat", dict(guidance_scale=-5), "guidance_scale must be a finite number >= 1"),
])
def test_world_generate_input(world, prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        world.generate(prompts, **kw)


@pytest.mark.parametrize("kw, error, message", [
    (dict(words="cat"), TypeError, "words must be a list of anchor words"),
    (dict(words=[]), ValueError, "no anchor words"),
    (dict(coder="kmeans"), ValueError, "unknown sparse coder"),
    (dict(lam=float("nan")), ValueError, "must be in \\[0, 1\\]"),
])
def test_anchor_loss_input(world, kw, error, message):
    args = dict(words=["cat", "dog", "kite"], c=2) | kw
    with pytest.raises(error, match=message):
        AnchorLoss(world.pipe, **args)


def test_bootstrap_refuses_nan_and_bad_levels():
    with pytest.raises(ValueError, match="NaN or infinite"):
        bootstrap_ci([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="level must be in \\(0, 1\\)"):
        bootstrap_diff_ci([0.1, 0.2], [0.3, 0.4], level=95)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1"):
        bootstrap_ci([0.1, 0.2], n_boot=0)


def test_a_word_past_the_token_limit(world):
    from compinv_utils.tokens import token_indices

    with pytest.raises(ValueError, match="past the 76 tokens the text encoder reads; shorten the prompt"):
        token_indices(world.pipe.tokenizer, "a " * 80 + "cat", "cat")


def test_records_file_json_is_checked(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"a": "cat", "b": "dog", "box_a": [0, 0, 2, 1], "box_b": [0, 0, 1, 1]}) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        assert L.read_records(path) == []


@pytest.mark.parametrize("threshold", [1.5, -1, float("nan"), "0.5"])
def test_detect_refuses_a_threshold_that_is_not_a_score(world, threshold):
    with pytest.raises(ValueError, match="threshold is a detection score between 0 and 1"):
        world.detect(world.concepts_of_interest[0].photos[:1], threshold)


def test_crop_refuses_an_inverted_box(world):
    photo = world.concepts_of_interest[0].photos[0]
    with pytest.raises(ValueError, match="x0 <= x1 and y0 <= y1"):
        crop(photo, (0.8, 0.1, 0.2, 0.9))
    assert crop(photo, (0.2, 0.1, 0.8, 0.9)).size[0] > 1


@pytest.mark.parametrize("names, message", [(["dog!", "dog?"], "both become the token <dog>"),
                                            (["\u2728\u2728"], "no letter or digit")])
def test_concept_folders_that_give_no_token_or_the_same_one(tmp_path, names, message):
    from PIL import Image

    from compinv_utils.concepts import concepts_from_folder

    for n in names:
        (tmp_path / n).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / n / "a.png")
    with pytest.raises(ValueError, match=message):
        concepts_from_folder(tmp_path, size=8)


# -- issue 34: the last silent answers and unclear errors ------------------------------------------------------


def test_a_resume_with_a_loss_over_another_lambda_is_refused(world, concept, tmp_path):
    cfg = I.InversionConfig(steps=2, batch_size=1, checkpoint_every=1)

    def anchored(lam):
        def loss(rec, e, step):  # the same name and code each time; only the λ it closes over differs
            if step == 1 and lam == 0.5:
                raise KeyboardInterrupt  # the first run stops after its first checkpoint
            return (1 - lam) * rec + lam * e.pow(2).mean()
        return loss

    with pytest.raises(KeyboardInterrupt):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, cfg, loss_fn=anchored(0.5),
                 checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="made from a different loss; resuming would mix two runs"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, cfg, loss_fn=anchored(0.9),
                 checkpoint_dir=tmp_path, progress=False)
    a, b = I.loss_identity(anchored(0.5)), I.loss_identity(anchored(0.9))
    assert a["name"] == b["name"] and a != b and I.loss_identity(anchored(0.5)) == a


LAM = 0.5


def _global_lambda_loss(rec, e, step):
    return (1 - LAM) * rec + LAM * e.pow(2).mean()


def test_a_loss_that_reads_a_module_level_lambda_is_identified_by_it(monkeypatch):
    before = I.loss_identity(_global_lambda_loss)
    monkeypatch.setitem(globals(), "LAM", 0.9)
    assert I.loss_identity(_global_lambda_loss) != before


def test_an_emptied_records_file_beside_its_done_file_is_regenerated(world, tmp_path, monkeypatch):
    calls = fake_generation(monkeypatch, world)
    path = tmp_path / "l.jsonl"
    first = L.generate_records(world, JOBS, path, batch_size=2, progress=False)
    path.write_text("")
    with pytest.warns(UserWarning, match="missing from .*generating them again"):
        assert L.generate_records(world, JOBS, path, batch_size=2, progress=False) == first
    assert sum(calls) == 2 * len(JOBS)


def test_a_corrupt_records_file_of_an_older_version_is_regenerated(world, tmp_path, monkeypatch):
    fake_generation(monkeypatch, world)
    path = tmp_path / "l.jsonl"
    first = L.generate_records(world, JOBS, path, batch_size=2, progress=False)
    (tmp_path / "l.jsonl.missed").unlink()  # as written before misses were listed
    path.write_text('{"a": "cat", "b"\n')
    with pytest.warns(UserWarning, match="holds no records but .*generating them again"):
        assert L.generate_records(world, JOBS, path, batch_size=2, progress=False) == first


def test_an_absurd_guidance_step_stops_instead_of_a_black_image(world):
    with pytest.raises(FloatingPointError, match="guidance diverged.*lower GuidanceConfig.step_size"):
        guided(world, config=GuidanceConfig(guided_steps=1, inner_iters=1, step_size=1e30))


def test_a_repeated_word_guides_each_occurrence(world):
    from compinv_utils.tokens import word_positions

    tok = world.pipe.tokenizer
    first, second = word_positions(tok, "a cat and a cat", ["cat", "cat"])
    assert first != second and second[0] > first[0]
    with pytest.raises(ValueError, match="named 2 times in words but occurs 1 time"):
        word_positions(tok, "a cat and a kite", ["cat", "cat"])


def test_sixteen_bit_photos_keep_their_grey_and_tiffs_are_read(tmp_path):
    from PIL import Image

    from compinv_utils.concepts import load_photos

    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "b.tif")
    photos = load_photos(tmp_path)
    assert len(photos) == 2
    assert abs(int(np.asarray(photos[0])[0, 0, 0]) - 128) <= 1  # not saturated to 255
    assert tuple(np.asarray(photos[1])[0, 0]) == (10, 200, 30)


def test_a_photo_in_an_unread_format_is_named(tmp_path):
    from PIL import Image

    from compinv_utils.concepts import load_photos

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.heic").write_bytes(b"not read")
    with pytest.warns(UserWarning, match="skipped 1 file.*b.heic"):
        assert len(load_photos(tmp_path)) == 1


def test_compinv_data_set_after_import_moves_the_weights_too(tmp_path, monkeypatch):
    from compinv_utils.world import load_toy_world

    monkeypatch.delenv("COMPINV_TOY_DIR", raising=False)
    monkeypatch.setenv("COMPINV_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"weights are missing from {tmp_path / 'toy'}"):
        load_toy_world(device="cpu")


def test_layouts_refuse_an_unknown_word_or_an_unloaded_placeholder(world):
    from compinv_utils.evaluation import Layouts

    d = dim(world)
    layouts = Layouts(L.LayoutMLP(d), {n: torch.randn(d) for n in world.nouns})
    with pytest.raises(ValueError, match="'<b1>' is a placeholder that is not loaded"):
        layouts.boxes(world.pipe, "<b1>", "cat")
    with pytest.raises(ValueError, match="'spaceship' is neither one of the layout MLP's nouns"):
        layouts.boxes(world.pipe, "cat", "spaceship")
    with pytest.raises(ValueError, match="not a token of the pipeline"):
        L.nearest_noun(world.pipe, "<b1>", world.nouns)


def test_zero_features_and_miscounted_predictions_are_refused():
    model = L.LayoutMLP(4)
    with pytest.raises(ValueError, match="feat_j is zero"):
        L.predict_boxes(model, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="takes vectors \\(4,\\)"):
        L.predict_boxes(model, torch.ones(4), torch.ones(5))
    rec = {"a": "cat", "b": "dog", "box_a": [0, 0, .5, .5], "box_b": [.5, .5, 1, 1]}
    with pytest.raises(ValueError, match="of \\['dog'\\] are zero"):
        L.train_layout_mlp([rec], {"cat": torch.ones(4), "dog": torch.zeros(4)}, steps=1)
    with pytest.raises(ValueError, match="1 predictions for 2 records"):
        L.mean_iou([((0, 0, .5, .5), (.5, .5, 1, 1))], [rec, rec])


@pytest.mark.parametrize("call, message", [
    (lambda: L.split_by_pair([]), "0 records of 0 noun pair"),
    (lambda: L.train_layout_mlp([], {"cat": torch.ones(4)}, steps=1), "no training records"),
    (lambda: L.train_layout_mlp([{"a": "cat", "b": "dog", "box_a": [0, 0, 1, 1], "box_b": [0, 0, 1, 1]}],
                                {"cat": torch.ones(4)}, steps=1), "noun\\(s\\) \\['dog'\\] that have no feature"),
])
def test_empty_or_featureless_layout_data(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_layout_mlp_of_another_dimension_names_the_file(world, tmp_path):
    from compinv_utils.evaluation import load_layouts

    model, _ = L.train_layout_mlp([{"a": "cat", "b": "dog", "box_a": [0, 0, .5, .5], "box_b": [.5, .5, 1, 1]}],
                                  {"cat": torch.ones(8), "dog": -torch.ones(8)}, steps=1)
    path = tmp_path / "m.pt"
    L.save_layout_mlp(model, path, "input embedding")
    with pytest.raises(ValueError, match="m.pt takes features of dimension 8.*run chapter 04"):
        load_layouts(world, path)
    blob = torch.load(path, weights_only=True)
    blob["dim"] = 16
    torch.save(blob, path)
    with pytest.raises(ValueError, match="m.pt does not hold a layout MLP of dimension 16"):
        L.load_layout_mlp(path)


def test_image_alignment_without_photos(world):
    from compinv_utils.measures import image_alignment

    with pytest.raises(ValueError, match="no photos to compare with"):
        image_alignment(world, world.concepts_of_interest[0].photos[:1], [])


def test_a_runaway_learning_rate_is_not_saved(world, concept):
    with pytest.raises(FloatingPointError, match="diverged.*lower the learning rate"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, I.InversionConfig(steps=1, batch_size=1, lr=1e6),
                 progress=False)
    assert "<b1>" not in world.pipe.tokenizer.get_vocab()


def test_a_template_that_pushes_the_placeholder_past_the_token_limit(world, concept):
    cfg = I.InversionConfig(steps=1, batch_size=1, templates=("a photo of a {}", "a " * 80 + "{}"))
    with pytest.raises(ValueError, match="past the 76 tokens the text encoder reads: shorten the template"):
        I.invert(world.pipe, concept.photos, "<b1>", concept.superclass, cfg, progress=False)
    assert "<b1>" not in world.pipe.tokenizer.get_vocab()


@pytest.mark.parametrize("text, message", [
    ("{not json", "concepts.json is not valid JSON"),
    ('["dog"]', "concepts.json holds a list, not an object"),
    ('{"dog": 3}', "concepts.json: the superclass of \\['dog'\\] is \\[3\\], not a word"),
])
def test_a_bad_concepts_json_names_the_file(tmp_path, text, message):
    from PIL import Image

    from compinv_utils.concepts import concepts_from_folder

    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "a.png")
    (tmp_path / "concepts.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        concepts_from_folder(tmp_path, size=8)


def test_a_superclass_the_detector_cannot_find_is_refused(toy_world, monkeypatch):
    from dataclasses import replace

    from compinv_utils import world as W

    red = W.World(**{**toy_world.__dict__, "concepts_of_interest": [replace(toy_world.concepts_of_interest[0],
                                                                            superclass="red")]})
    monkeypatch.setitem(W.WORLD_LOADERS, "red", lambda **kw: red)
    with pytest.raises(ValueError, match="superclass of concept\\(s\\) \\[\\('mochi', 'red'\\)\\] is not one of the toy "
                                         "world's nouns.*concepts.json"):
        W.load_world("red")


def test_a_world_loader_that_builds_no_world(monkeypatch):
    from compinv_utils.world import load_world

    monkeypatch.delenv("COMPINV_CONCEPTS", raising=False)
    with pytest.raises(TypeError, match="'os:getcwd' returned a str, not a World"):
        load_world("os:getcwd")
    with pytest.raises(TypeError, match="'os:getcwd' cannot be called with \\['device'\\]"):
        load_world("os:getcwd", device="cpu")


@pytest.mark.parametrize("device, error, message", [
    ("gpu", ValueError, "COMPINV_DEVICE is 'gpu', which is not a device name"),
    pytest.param("cuda", RuntimeError, "'cuda' was asked for .* but this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("cuda:7", RuntimeError, "'cuda:7' was asked for .* unset COMPINV_DEVICE",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has 8 GPUs")),
])
def test_compinv_device_that_cannot_be_used(monkeypatch, device, error, message):
    from compinv_utils.world import load_toy_world

    monkeypatch.setenv("COMPINV_DEVICE", device)
    with pytest.raises(error, match=message):
        load_toy_world()


def _cd_folder(tmp_path, world, weights: bytes | dict) -> Path:
    folder = tmp_path / "cd"
    folder.mkdir(parents=True)
    path = folder / "pytorch_custom_diffusion_weights.safetensors"
    if isinstance(weights, bytes):
        path.write_bytes(weights)
    else:
        from safetensors.torch import save_file

        save_file(weights, str(path))
    I.save_embedding(folder / "learned_embeds.safetensors", "<b1>", torch.zeros(1, dim(world)))
    return folder


def test_custom_diffusion_weights_of_another_world_or_truncated(world, tmp_path):
    from compinv_utils.methods import get_method

    cd = get_method("custom_diffusion")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
    before = dict(world.pipe.unet.attn_processors)
    folder = _cd_folder(tmp_path / "a", world, {key: torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=f"{folder}.*has shape \\(3, 5\\) but this world's UNet needs"):
        cd.load(world.pipe, folder)
    folder = _cd_folder(tmp_path / "b", world, b"\x00" * 40)
    with pytest.raises(ValueError, match=f"{folder}.*truncated or not a safetensors file"):
        cd.load(world.pipe, folder)
    assert dict(world.pipe.unet.attn_processors) == before and "<b1>" not in world.pipe.tokenizer.get_vocab()


def test_a_dreambooth_folder_with_only_a_pickle(world, tmp_path):
    from compinv_utils.methods import get_method

    (tmp_path / "unet").mkdir()
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    unet = world.pipe.unet
    with pytest.raises(ValueError, match="holds no safetensors UNet.*does not load pickles"):
        get_method("dreambooth").load(world.pipe, tmp_path)
    assert world.pipe.unet is unet
