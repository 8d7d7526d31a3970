"""The ``sd15-random`` world (SD 1.5's layer structure, random weights, no download) and a chapter run on it with a
folder of "your own photos": the sd15 code path — other image sizes, other nouns, concepts from photo folders,
caches under ``COMPINV_DATA`` — proved on a CPU. Findings on random weights mean nothing (student mode)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from compinv_utils import load_world
from compinv_utils.inversion import InversionConfig, invert, unload
from compinv_utils.worldbuilding.sd15_random import NOUNS, load_sd15_random_world

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def make_photo_folder(root: Path) -> Path:
    """Two concepts of "own photos" (PNG and JPEG, odd sizes): ``mug2`` (superclass ``cup`` from concepts.json)
    and ``cat`` (the superclass from the folder's name)."""
    root.mkdir(parents=True, exist_ok=True)
    looks = {"mug2": ("rectangle", (190, 60, 40)), "cat": ("ellipse", (90, 90, 90))}
    for name, (shape, colour) in looks.items():
        (root / name).mkdir()
        for k in range(3):
            im = Image.new("RGB", (90 + 20 * k, 80), (210, 225 - 25 * k, 240))
            d = ImageDraw.Draw(im)
            getattr(d, shape)((18 + 6 * k, 14, 72 + 4 * k, 66), fill=colour, outline=(20, 20, 20))
            d.line((0, 70, im.width, 72 - 3 * k), fill=(60, 140, 60), width=3)
            im.save(root / name / f"photo{k}.{'jpg' if k % 2 else 'png'}")
    (root / "concepts.json").write_text(json.dumps({"mug2": "cup"}))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is as fast, and several threads on a shared 2-core machine are ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("own_photos"))


@pytest.fixture(scope="module")
def world(photos):
    return load_sd15_random_world(concepts_dir=photos)


def test_sd15_random_world_is_sd15_shaped_with_own_photos(world):
    w = world
    assert w.name == "sd15-random" and (w.image_size, w.latent_size) == (64, 8)
    assert (w.device.type, w.dtype) == ("cpu", torch.float32)
    assert len(w.pipe.unet.down_blocks) == 4 and len(w.pipe.unet.up_blocks) == 4  # SD 1.5's levels
    assert w.pipe.tokenizer.model_max_length == 77 and type(w.pipe.scheduler).__name__ == "DDIMScheduler"
    assert [(c.name, c.token, c.superclass) for c in w.concepts_of_interest] == [("cat", "<cat>", "cat"),
                                                                                  ("mug2", "<mug2>", "cup")]
    assert all(p.size == (64, 64) for c in w.concepts_of_interest for p in c.photos)
    s = w.settings
    assert (s.inversion_steps, s.inversion_seeds, s.gen_seeds, s.n_partners, s.max_concepts) == (2, 1, 1, 1, None)
    assert set(s.partners) <= set(w.nouns) and {"cat", "cup"} <= set(w.nouns) and "random" in s.minutes_per_chapter
    for noun in w.nouns:  # every noun is one token (a superclass must be, to start an inversion from it)
        assert len(w.pipe.tokenizer.encode(noun, add_special_tokens=False)) == 1
    assert load_sd15_random_world().concepts_of_interest == []  # no folder, no concepts of interest


def test_sd15_random_world_inverts_generates_and_measures(world):
    c = world.concept("mug2")
    unload(world.pipe, c.token)
    r = invert(world.pipe, c.photos, c.token, c.superclass, InversionConfig(steps=world.settings.inversion_steps),
               progress=False)
    assert len(r.losses) == 2 and np.isfinite(r.losses).all() and r.embeddings.shape == (1, 64)
    images = world.generate([f"a photo of a {c.token} {c.superclass}", "a cat and a kite"], seed=0)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = world.generate(["a cat and a kite"], seed=1)
    assert np.abs(np.asarray(images[1], float) - np.asarray(again[0], float)).max() <= 2  # image i: seed + i
    dets = world.detect(images + c.photos, threshold=0.0)  # the toy detector on 64 px images (resized to 32)
    assert len(dets) == 5 and all(0 <= x0 <= x1 <= 1 for d in dets for _, (x0, _, x1, _), _ in d)
    assert len(world.photo_crops(c)) == 3
    t = world.text_features(["a cat", f"a {c.token} cup"])
    i = world.image_features(images)
    assert t.shape[0] == 2 and i.shape == (2, t.shape[1])
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5) and torch.allclose(i.norm(dim=-1), torch.ones(2), atol=1e-5)
    unload(world.pipe, c.token)


def test_load_world_finds_sd15_random_by_name_and_leaves_the_random_state_alone(photos, monkeypatch):
    monkeypatch.setenv("COMPINV_CONCEPTS", str(photos))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    w = load_world("sd15-random")
    assert torch.equal(torch.rand(3), expected)
    assert w.name == "sd15-random" and [c.name for c in w.concepts_of_interest] == ["cat", "mug2"]
    a, b = load_sd15_random_world(seed=1), load_sd15_random_world(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.pipe.unet.parameters(), b.pipe.unet.parameters()))


def test_sd15_random_world_refuses_a_superclass_it_cannot_say(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    (folder / "concepts.json").write_text(json.dumps({"mug2": "mug"}))
    with pytest.raises(ValueError, match="'mug'.*concepts.json"):
        load_sd15_random_world(concepts_dir=folder)
    assert "mug" not in NOUNS


# -- a chapter on the sd15-random world --------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def run_chapter(name: str, tmp_path: Path, monkeypatch) -> tuple[object, Path, float]:
    """Execute ``notebooks/<name>`` in the sd15-random world with the photo folder of :func:`make_photo_folder`
    and every cache under ``tmp_path/data``; the executed copy goes to ``tmp_path``, never to notebooks/.
    Returns the executed notebook, the data folder and the seconds it took."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    data = tmp_path / "data"
    env = {"COMPINV_WORLD": "compinv_utils.worldbuilding.sd15_random:load_sd15_random_world", "COMPINV_CONCEPTS": str(make_photo_folder(tmp_path / "photos")),
           "COMPINV_DATA": str(data), "COMPINV_STUDENT": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # tiny models: one thread in the kernel (see one_thread)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("COMPINV_RECOMPUTE", "COMPINV_DEVICE", "COMPINV_BOOTSTRAP", "COMPINV_TOY_DIR"):
        monkeypatch.delenv(k, raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        raise AssertionError(f"{name} failed in the sd15-random world:\n{exc}") from None
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed copy, for a look after a failure
    return nb, data, time.perf_counter() - t0


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain", ""))
    return "\n".join(t if isinstance(t, str) else "".join(t) for t in out)


@pytest.mark.slow
def test_chapter_01_runs_on_the_sd15_random_world_with_own_photos(tmp_path, monkeypatch):
    repo_data = REPO / "data"
    before = _snapshot(repo_data)
    nb, data, seconds = run_chapter("01_ood_embedding_analysis.ipynb", tmp_path, monkeypatch)
    print(f"chapter 01 on sd15-random: {seconds:.0f} s")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    world_dir = data / "sd15-random"
    for c in ("cat", "mug2"):  # the inversions of both photo folders, cached in this world's folder
        assert (world_dir / "inversions" / "plain" / "seed0" / c / "learned_embeds.safetensors").is_file()
    assert (world_dir / "pair_table.json").is_file() and (world_dir / "inversions" / "plain" / "composition.json").is_file()
    assert not [p for p in data.iterdir() if p.name != "sd15-random"], "a cache written outside data/sd15-random"
    text = _text(nb)
    assert "sd15-random" in text  # the chapter says which world it ran in
    after = _snapshot(repo_data)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the chapter changed the repository's data/: {changed[:10]}"
    assert not (repo_data / "sd15-random").exists()
