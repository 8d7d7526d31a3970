import numpy as np
import pytest
import torch

from compinv_utils.anchors import AnchorLoss, OfficialAnchorLoss, anchor_embeddings, anchor_loss, sparse_weights
from compinv_utils.inversion import InversionConfig, invert, unload


@pytest.fixture(scope="module")
def atoms():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 32, generator=g)


@pytest.mark.parametrize("method", ["nnomp", "omp", "lasso"])
def test_at_most_c_nonzeros_and_normalised(atoms, method):
    e = torch.randn(32)
    for c in (1, 2, 5):
        w = sparse_weights(e, atoms, c, method)
        assert (w > 0).sum() <= c and w.min() >= 0 and w.sum() == pytest.approx(1)


@pytest.mark.parametrize("method", ["nnomp", "lasso"])
def test_recovers_a_planted_sparse_mixture(atoms, method):
    unit = atoms / atoms.norm(dim=1, keepdim=True)
    true = np.zeros(20)
    true[[3, 7, 15]] = [0.5, 0.3, 0.2]
    e = torch.tensor(true, dtype=torch.float32) @ unit
    w = sparse_weights(e, atoms, 3, method)
    assert set(np.flatnonzero(w)) == {3, 7, 15}
    assert np.allclose(w, true, atol=0.02)


def test_bad_c_and_method(atoms):
    with pytest.raises(ValueError, match="c must be between 1 and the number of anchors \\(20\\)"):
        sparse_weights(torch.randn(32), atoms, 0)
    with pytest.raises(ValueError, match="20"):
        sparse_weights(torch.randn(32), atoms, 21)
    with pytest.raises(ValueError, match="nnomp"):
        sparse_weights(torch.randn(32), atoms, 2, "ista")


def test_anchor_gradient_pulls_toward_active_anchors(atoms):
    e = torch.zeros(32, requires_grad=True)
    delta = torch.zeros(20)
    delta[[2, 9]] = torch.tensor([0.7, 0.3])
    anchor_loss(e, atoms, delta).backward()
    step = -e.grad
    target = 0.7 * atoms[2] + 0.3 * atoms[9]
    assert torch.allclose(step, 2 * target / len(atoms), atol=1e-6)  # toward the weighted anchors, scaled by 1/K (Eq. 5)
    with torch.no_grad():
        moved = e - 0.1 * e.grad
    assert anchor_loss(moved, atoms, delta) < anchor_loss(torch.zeros(32), atoms, delta)


def test_bad_lambda_and_words(toy_world):
    with pytest.raises(ValueError, match="λ .*\\[0, 1\\].*1.5"):
        AnchorLoss(toy_world.pipe, toy_world.nouns, lam=1.5)
    with pytest.raises(ValueError, match="c must be between 1 and the number of anchors"):
        AnchorLoss(toy_world.pipe, toy_world.nouns, c=0)
    with pytest.raises(ValueError, match="not a single token"):
        anchor_embeddings(toy_world.pipe, ["cat", "zebra"])
    with pytest.raises(ValueError, match="λ"):
        OfficialAnchorLoss(toy_world.pipe, "<x>", "cat", lam=-0.1)


def test_lambda_zero_reproduces_plain_ti(toy_world):
    pipe, coi = toy_world.pipe, toy_world.concepts_of_interest[0]
    cfg = InversionConfig(steps=4, batch_size=2)
    try:
        plain = invert(pipe, coi.photos, "<p0>", coi.superclass, cfg, progress=False)
        unload(pipe, "<p0>")
        with_anchor = invert(pipe, coi.photos, "<p0>", coi.superclass, cfg,
                             loss_fn=AnchorLoss(pipe, toy_world.nouns, lam=0.0, choice="recode"), progress=False)
        assert torch.equal(plain.embeddings, with_anchor.embeddings)
        assert with_anchor.log and "anchors" in with_anchor.log[0]
        assert with_anchor.log[0]["anchors"] == {coi.superclass: 1.0}  # re-coding starts one-hot on the superclass word
    finally:
        unload(pipe, "<p0>")


def test_high_lambda_keeps_the_embedding_near_the_anchors(toy_world):
    pipe, coi = toy_world.pipe, toy_world.concepts_of_interest[0]
    cfg = InversionConfig(steps=30, batch_size=2, lr=5e-2)
    anchors = anchor_embeddings(pipe, toy_world.nouns)
    try:
        free = invert(pipe, coi.photos, "<p1>", coi.superclass, cfg, progress=False).embeddings[0]
        held = invert(pipe, coi.photos, "<p2>", coi.superclass, cfg,
                      loss_fn=AnchorLoss(pipe, toy_world.nouns, lam=0.95, c=3), progress=False).embeddings[0]
        dist = lambda v: torch.cdist(v[None], anchors).min()  # noqa: E731
        assert dist(held) < dist(free)
    finally:
        unload(pipe, "<p1>")
        unload(pipe, "<p2>")


def test_official_variant_pulls_the_encoder_output_toward_the_class_word(toy_world):
    pipe, coi = toy_world.pipe, toy_world.concepts_of_interest[0]
    cfg = InversionConfig(steps=6, batch_size=2, lr=5e-2)
    try:
        loss = OfficialAnchorLoss(pipe, "<p3>", coi.superclass, lam=0.95)  # made before the token exists
        res = invert(pipe, coi.photos, "<p3>", coi.superclass, cfg, loss_fn=loss, progress=False)
        assert res.log[0]["anc"] == pytest.approx(0.0, abs=1e-6)  # starts at the class word
        unload(pipe, "<p3>")
        plain = invert(pipe, coi.photos, "<p3>", coi.superclass, cfg, progress=False)
        assert not torch.allclose(res.embeddings, plain.embeddings)  # the anchor term changes the result
    finally:
        unload(pipe, "<p3>")


def test_anchor_loss_is_eq5_with_its_one_over_k(atoms):
    """Eq. 5: L_anc = 1/|{e_anc}| Σ δ_i ‖e − e_i‖², on a hand-made case."""
    anchors = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    delta = torch.tensor([0.5, 0.5, 0.0])
    e = torch.tensor([1.0, 1.0])
    # ‖e − a0‖² = 2, ‖e − a1‖² = 2, ‖e − a2‖² = 10; Σ δ_i d_i = 2; K = 3
    assert float(anchor_loss(e, anchors, delta)) == pytest.approx(2 / 3)


def test_official_loss_is_the_embedding_layer_mse(toy_world):
    """The official loss: element-wise MSE of the embedding layer's outputs (token + position, 77 × D) for
    "a photo of a S* cat" and "a photo of a cat cat" — ‖e − e_cat‖² / (77 · D) for a one-vector word."""
    from compinv_utils.inversion import add_placeholder

    pipe, coi = toy_world.pipe, toy_world.concepts_of_interest[0]
    try:
        loss = OfficialAnchorLoss(pipe, "<p4>", coi.superclass, lam=1.0)
        assert loss.prompt == f"a photo of a <p4> {coi.superclass}"
        assert loss.reference == f"a photo of a {coi.superclass} {coi.superclass}"
        (pid,) = add_placeholder(pipe, "<p4>", coi.superclass)
        table = pipe.text_encoder.get_input_embeddings().weight
        shift = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0)).to(table)
        with torch.no_grad():
            table[pid] += shift
        e = table[pid].detach().float()
        e_cat = anchor_embeddings(pipe, [coi.superclass])[0]
        expected = float(((e - e_cat) ** 2).sum()) / (77 * table.shape[1])
        got = float(loss(torch.tensor(0.0), e[None], 0).detach())
        assert got == pytest.approx(expected, rel=1e-4)
        assert got > 0
    finally:
        unload(pipe, "<p4>")


def test_semantic_anchors_are_the_class_and_its_neighbours_fixed_for_the_run(toy_world):
    pipe, coi = toy_world.pipe, toy_world.concepts_of_interest[0]
    loss = AnchorLoss(pipe, toy_world.nouns, lam=0.5, c=3)
    assert loss.choice == "semantic"
    try:
        res = invert(pipe, coi.photos, "<p5>", coi.superclass, InversionConfig(steps=30, batch_size=2, lr=5e-2),
                     loss_fn=loss, progress=False)
    finally:
        unload(pipe, "<p5>")
    first, last = res.log[0]["anchors"], res.log[-1]["anchors"]
    assert first == last and len(first) == 3  # fixed: the photos cannot pull the anchors elsewhere
    assert max(first, key=first.get) == coi.superclass  # the class word, with the largest weight
    table = anchor_embeddings(pipe, toy_world.nouns)
    cos = torch.nn.functional.cosine_similarity(table, table[toy_world.nouns.index(coi.superclass)][None])
    nearest = {toy_world.nouns[i] for i in torch.argsort(cos, descending=True)[:3].tolist()}
    assert set(first) == nearest
    assert sum(first.values()) == pytest.approx(1, abs=1e-3)
    with pytest.raises(ValueError, match="anchor choice"):
        AnchorLoss(pipe, toy_world.nouns, choice="nearest")


@pytest.mark.parametrize("choice", ["semantic", "recode"])
def test_an_interrupted_semantic_inversion_resumes_to_the_uninterrupted_result(toy_world, tmp_path, choice):
    pipe, coi = toy_world.pipe, toy_world.concepts_of_interest[1]
    # checkpoints every 3 steps, δ re-coded every 2: the resume step (3) is not a re-coding step, so a loss that
    # forgot δ would re-code it there and drift from the uninterrupted run
    cfg = InversionConfig(steps=6, batch_size=2, lr=5e-2, checkpoint_every=3)

    class Stop(Exception):
        pass

    crash = {"at": None}  # outside the loss: its settings identify the checkpoint

    class Crashing(AnchorLoss):
        def __call__(self, rec, e, step):
            if step == crash["at"]:
                raise Stop
            return super().__call__(rec, e, step)

    def make():
        return Crashing(pipe, toy_world.nouns, lam=0.5, c=3, refresh_every=2, choice=choice)

    try:
        full = invert(pipe, coi.photos, "<p6>", coi.superclass, cfg, loss_fn=make(), progress=False)
        unload(pipe, "<p6>")
        crash["at"] = 3
        with pytest.raises(Stop):
            invert(pipe, coi.photos, "<p6>", coi.superclass, cfg, loss_fn=make(), checkpoint_dir=tmp_path,
                   progress=False)
        crash["at"] = None
        resumed = invert(pipe, coi.photos, "<p6>", coi.superclass, cfg, loss_fn=make(), checkpoint_dir=tmp_path,
                         progress=False)
    finally:
        unload(pipe, "<p6>")
    assert torch.allclose(resumed.embeddings, full.embeddings, atol=1e-6)
    assert resumed.log[3]["anchors"] == full.log[3]["anchors"]
