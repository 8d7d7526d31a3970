"""The grounding ablation at tiny sizes: two UNet runs that differ only in the grounding loss, both measured."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from compinv_utils.worldbuilding import ablation, train
from compinv_utils.world import TOY_DIR


@pytest.fixture
def tiny_profile(monkeypatch):
    cfg = replace(train.PROFILES["smoke"], n_scenes=32, unet_steps=2, unet_batch=4, unet_checkpoint_every=1,
                  ground_weight=1.0, ground_pixel_weight=0.1)
    monkeypatch.setitem(train.PROFILES, "tiny-grounded", cfg)
    return "tiny-grounded"


def test_the_two_runs_differ_only_by_the_grounding_loss_and_are_both_measured(tiny_profile, tmp_path):
    res = ablation.run_ablation(TOY_DIR, tmp_path / "work", steps=2, profile=tiny_profile, workers=1,
                                cache_dir=tmp_path / "cache", n_pairs=2, per_noun=1, per_pair=1)
    rows = res["variants"]
    assert list(rows) == list(ablation.VARIANTS)
    assert rows["with_grounding"]["ground_weight"] == 1.0
    assert rows["without_grounding"]["ground_weight"] == rows["without_grounding"]["ground_pixel_weight"] == 0.0
    assert rows["with_grounding"]["training_log"]["unet_final_ground_loss"] > 0
    for row in rows.values():
        assert row["attention"]["pairs"] == 2 and 0 <= row["attention"]["both_detected"] <= 1
        assert 0 <= row["generation"]["single_noun_detected"] <= 1
    weights = [load_file(tmp_path / "work" / v / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
               for v in ablation.VARIANTS]
    assert set(weights[0]) == set(weights[1])
    # same seed, data and steps: only the grounding term can make the weights differ
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for row in rows.values():
        assert row["attention_renderings"]["pairs"] == 32 and 0 <= row["attention_renderings"]["own_share"] <= 1
    # measuring the trained UNets again gives the same numbers, without training
    again = ablation.run_ablation(TOY_DIR, tmp_path / "work", steps=2, profile=tiny_profile, workers=1,
                                  cache_dir=tmp_path / "cache", n_pairs=2, per_noun=1, per_pair=1, measure_only=True)
    for name in ablation.VARIANTS:
        for key in ("attention", "attention_renderings", "generation"):
            assert again["variants"][name][key] == rows[name][key], (name, key)
    with pytest.raises(ValueError, match="steps"):
        ablation.run_ablation(TOY_DIR, tmp_path / "work", steps=3, profile=tiny_profile, measure_only=True)
    with pytest.raises(FileNotFoundError, match="--measure-only"):
        ablation.run_ablation(TOY_DIR, tmp_path / "elsewhere", steps=2, profile=tiny_profile, measure_only=True)


def test_a_profile_without_grounding_or_a_folder_without_a_world_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no grounding loss"):
        ablation.run_ablation(TOY_DIR, tmp_path, steps=1, profile="smoke")
    with pytest.raises(FileNotFoundError, match="--world"):
        ablation.run_ablation(tmp_path, tmp_path, steps=1)
