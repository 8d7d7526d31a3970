import math

import pytest
import torch

from compinv_utils import embeddings as E


def test_energy_entropy_bounds():
    d = 16
    assert torch.allclose(E.energy_entropy(torch.ones(1, d)), torch.tensor([math.log(d)]), atol=1e-5)
    assert E.energy_entropy(torch.eye(d)[:1]).item() == pytest.approx(0, abs=1e-5)
    x = torch.randn(5, d)
    assert torch.allclose(E.energy_entropy(x), E.energy_entropy(7 * x), atol=1e-5)  # scale-free


def test_knn_and_leave_one_out():
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    d = E.knn_distance(ref, ref, k=1, exclude_self=True)
    assert d[0] == pytest.approx(1.0) and d[3] == pytest.approx(math.hypot(4, 5))
    assert E.knn_distance(torch.zeros(1, 2), ref, k=1).item() == 0
    with pytest.raises(ValueError, match="k must be"):
        E.knn_distance(ref, ref, k=4, exclude_self=True)


def test_far_points_score_high_against_the_core():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 8, generator=g)
    far = ref.mean(0, keepdim=True) + 10
    voc = E.vocabulary_scores(ref)
    out = E.ood_scores(far, ref)
    for key in ("knn", "mahalanobis", "norm"):
        assert E.percentile_rank(out[key].item(), voc[key]) == 100.0


def test_projections_shapes():
    ref, extra = torch.randn(20, 8), torch.randn(3, 8)
    a, b = E.project_2d(ref, extra, "pca")
    assert a.shape == (20, 2) and b.shape == (3, 2)
    with pytest.raises(ValueError, match="pca"):
        E.project_2d(ref, extra, "tsne")


def test_word_embeddings_from_a_pipeline(toy_world):
    pipe = toy_world.pipe
    x = E.input_embeddings(pipe, ["cat", "teddy"])
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(x[0], table[pipe.tokenizer.convert_tokens_to_ids("cat</w>")].float())
    two = E.input_embeddings(pipe, ["cat dog"])[0]
    assert torch.allclose(two, (x[0] + E.input_embeddings(pipe, ["dog"])[0]) / 2)
    out = E.encoder_outputs(pipe, ["cat", "dog"])
    assert out.shape == (2, pipe.text_encoder.config.hidden_size)
