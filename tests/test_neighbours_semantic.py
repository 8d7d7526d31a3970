"""The semantic-side neighbours: CoRe's context regularisation and ClassDiffusion's semantic-preservation loss.

Each loss is pinned on a hand-made case (numbers worked out here from the equations, not by the module), its
gradient is shown to reach only the learned token's row, and a short inversion on the toy world shows it pulls
what it says it pulls, against plain textual inversion with the same seed.
"""

import math
from contextlib import contextmanager

import pytest
import torch

from compinv_utils.inversion import InversionConfig, add_placeholder, invert, loss_identity, unload
from compinv_utils.neighbours.classdiffusion import (SemanticPreservationLoss, feature_position,
                                                     semantic_preservation)
from compinv_utils.neighbours.core import CoReLoss, context_attention_loss, context_embedding_loss

TOKEN = "<nbsem>"


@contextmanager
def placeholder(pipe, init: str = "cat", rows: list[str] | None = None, num_vectors: int = 1):
    """The placeholder added (its rows set to the given words' rows), removed again afterwards."""
    ids = add_placeholder(pipe, TOKEN, init, num_vectors)
    try:
        table = pipe.text_encoder.get_input_embeddings().weight
        if rows:
            with torch.no_grad():
                for i, word in zip(ids, rows):
                    table[i] = table[pipe.tokenizer.convert_tokens_to_ids(word + "</w>")]
        yield ids
    finally:
        unload(pipe, TOKEN)


def encode(pipe, prompt: str):
    """Token ids (list) and the text encoder's last hidden state ``(77, D)`` of ``prompt``."""
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    with torch.no_grad():
        h = pipe.text_encoder(torch.tensor([ids]))[0][0].float()
    return ids, h


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@contextmanager
def table_grad(pipe):
    """The token-embedding table as the trainable leaf (everything else frozen, as the inversion leaves it)."""
    te, unet = pipe.text_encoder, pipe.unet
    te.requires_grad_(False)
    unet.requires_grad_(False)
    w = te.get_input_embeddings().weight
    w.requires_grad_(True)
    w.grad = None
    try:
        yield w
    finally:
        w.requires_grad_(False)
        w.grad = None


def nonzero_rows(grad: torch.Tensor) -> set[int]:
    return set(torch.nonzero(grad.abs().sum(-1) > 0).flatten().tolist())


# -- CoRe ---------------------------------------------------------------------------------------------------


def test_core_embedding_term_hand_case():
    h_obj = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h_ref = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # per token: cos 1 and 2/(2·√2); per channel: (1,0)·(3,1) = 3/√10 and (0,2)·(0,1) = 1
    assert context_embedding_loss(h_obj, h_ref, "token").item() == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2,
                                                                               abs=1e-6)
    assert context_embedding_loss(h_obj, h_ref, "channel").item() == pytest.approx(1 - (3 / math.sqrt(10) + 1) / 2,
                                                                                 abs=1e-6)


def test_core_attention_reduction_hand_case():
    # layer 1: sample 0 mean(0.2², 0) = 0.02, sample 1 mean(0, 0.2²) = 0.02, summed over samples 0.04; layer 2: 0
    a_obj = [torch.tensor([[0.5, 0.1], [0.2, 0.2]]), torch.full((2, 2), 0.1)]
    a_ref = [torch.tensor([[0.3, 0.1], [0.2, 0.0]]), torch.full((2, 2), 0.1)]
    assert context_attention_loss(a_obj, a_ref).item() == pytest.approx((0.04 + 0.0) / 2, abs=1e-7)


def test_core_loss_pinned_on_the_toy_world(toy_world):
    pipe = toy_world.pipe
    # with S*'s row set to "dog", "a S* on grass" is "a dog on grass": the expected value needs no placeholder
    ids_dog, h_dog = encode(pipe, "a dog on grass")
    ids_cat, h_cat = encode(pipe, "a cat on grass")
    eot = ids_dog.index(pipe.tokenizer.eos_token_id)
    assert eot == 5 and ids_cat.index(pipe.tokenizer.eos_token_id) == 5
    ctx = [0, 1, 3, 4, 5]  # start, "a", "on", "grass", end; "dog"/"cat" (position 2) left out
    token_cos = [cos(h_dog[i], h_cat[i]) for i in ctx]
    assert min(token_cos) < 0.999  # the context does change with the word in front of it
    expected_token = 1 - sum(token_cos) / len(ctx)
    X, Y = h_dog[ctx], h_cat[ctx]
    expected_channel = 1 - sum(cos(X[:, d], Y[:, d]) for d in range(X.shape[1])) / X.shape[1]
    with placeholder(pipe, rows=["dog"]) as ids:
        rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach().float()
        rec = torch.tensor(0.25)
        for mode, expected in (("token", expected_token), ("channel", expected_channel)):
            loss = CoReLoss(pipe, TOKEN, "cat", prompts=["a {} on grass"], emb_weight=0.5, attn_weight=0.0,
                            cosine=mode, rescale=None)
            assert loss(rec, rows, step=3).item() == pytest.approx(0.25 + 0.5 * expected, rel=1e-4, abs=1e-6)
            assert loss.last_log["emb"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
            assert loss.last_log["prompt"] == "a {} on grass"


def test_core_pairs_the_context_around_words_of_several_tokens(toy_world):
    pipe = toy_world.pipe
    photos = toy_world.concepts_of_interest[0].photos
    with placeholder(pipe, "cat", rows=["red"]):
        loss = CoReLoss(pipe, TOKEN, "red cat", prompts=["a {} on grass"], attn_weight=0.0)
        _, _, ctx_obj, ctx_ref = loss.positions("a {} on grass", 1)
        # "a S* on grass" vs "a red cat on grass": the reference's context is shifted by one after the word
        assert ctx_obj == [0, 1, 3, 4, 5] and ctx_ref == [0, 1, 4, 5, 6]
    with placeholder(pipe, "cat", rows=["red", "cat"], num_vectors=2) as ids:
        rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach().float()
        loss = CoReLoss(pipe, TOKEN, "red cat", prompts=["a {} on grass", "a {} next to a kite"], emb_weight=1.0,
                        attn_weight=1.0, photos=photos, attn_batch=1, rescale=None)
        # S* = "red cat" word for word: every context token sees the same words, so both terms vanish
        terms = loss.terms(rows, step=0)
        assert terms["emb"].item() == pytest.approx(0.0, abs=1e-5)
        assert terms["attn"].item() == pytest.approx(0.0, abs=1e-9)
        with torch.no_grad():
            table = pipe.text_encoder.get_input_embeddings().weight
            table[ids] = table[ids].flip(0)  # "cat red": the context now differs
        terms = loss.terms(rows, step=0)
        assert terms["emb"].item() > 1e-3 and terms["attn"].item() > 0


def test_core_gradient_reaches_only_the_token_row(toy_world):
    pipe = toy_world.pipe
    c = toy_world.concepts_of_interest[0]
    with placeholder(pipe, rows=["dog"]) as ids, table_grad(pipe) as table:
        loss = CoReLoss(pipe, TOKEN, "cat", prompts=["a {} on grass"], emb_weight=1.0, attn_weight=1.0,
                        photos=c.photos, attn_batch=1, rescale=None)
        loss(torch.tensor(0.0), table[ids], step=0).backward()
        rows = nonzero_rows(table.grad)
        assert ids[0] in rows
        cat = pipe.tokenizer.convert_tokens_to_ids("cat</w>")
        assert cat not in rows  # the reference prompt's own word: its side carries no gradient
        obj_ids = set(pipe.tokenizer(f"a {TOKEN} on grass", padding="max_length",
                                     max_length=pipe.tokenizer.model_max_length).input_ids)
        assert rows <= obj_ids  # nothing outside the regularisation prompt's own tokens
        assert all(p.grad is None for p in pipe.unet.parameters())


def test_core_rescaling_holds_the_norm_of_its_start_step_and_resumes(toy_world):
    pipe = toy_world.pipe
    with placeholder(pipe):
        kw = dict(prompts=["a {} on grass"], emb_weight=0.0, attn_weight=0.0, rescale=(2, 4))
        loss = CoReLoss(pipe, TOKEN, "cat", **kw)
        rows = torch.nn.Parameter(torch.randn(1, pipe.text_encoder.config.hidden_size))
        before = rows.detach().clone()
        loss(torch.tensor(0.0), rows, step=1)
        assert torch.equal(rows.detach(), before) and loss.state_dict() == {"scale": None}
        loss(torch.tensor(0.0), rows, step=2)  # the start step records the norm, changes nothing
        start_norm = float(before.norm())
        assert torch.equal(rows.detach(), before) and loss.state_dict()["scale"] == pytest.approx(start_norm)
        with torch.no_grad():
            rows.mul_(3.0)
        loss(torch.tensor(0.0), rows, step=3)
        assert float(rows.detach().norm()) == pytest.approx(start_norm, rel=1e-5)
        assert torch.allclose(rows.detach(), before, atol=1e-6)  # the direction kept
        # a resumed loss (fresh object, state loaded) holds the same norm; after the stop step nothing changes
        resumed = CoReLoss(pipe, TOKEN, "cat", **kw)
        resumed.load_state_dict(loss.state_dict())
        with torch.no_grad():
            rows.mul_(2.0)
        resumed(torch.tensor(0.0), rows, step=4)
        assert float(rows.detach().norm()) == pytest.approx(start_norm, rel=1e-5)
        with torch.no_grad():
            rows.mul_(2.0)
        resumed(torch.tensor(0.0), rows, step=5)
        assert float(rows.detach().norm()) == pytest.approx(2 * start_norm, rel=1e-5)
        # norm_target="vocabulary": each row to the vocabulary's mean norm
        vocab = CoReLoss(pipe, TOKEN, "cat", norm_target="vocabulary", **kw)
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        target = float(table[:pipe.tokenizer.vocab_size].norm(dim=-1).mean())
        vocab(torch.tensor(0.0), rows, step=2)
        assert float(rows.detach().norm()) == pytest.approx(target, rel=1e-5)


def _context_distance(pipe, loss: CoReLoss) -> float:
    """Mean over the loss's prompts of 1 − mean cos of the context outputs, for the token now in the pipeline."""
    te = pipe.text_encoder
    vals = []
    with torch.no_grad():
        for p in loss.prompts:
            obj, ref, co, cr = loss.positions(p, 1)
            vals.append(context_embedding_loss(te(obj[None])[0][0][co], te(ref[None])[0][0][cr]).item())
    return sum(vals) / len(vals)


def test_core_inversion_keeps_the_context_closer_to_the_superclass_prompt_than_ti(toy_world):
    pipe = toy_world.pipe
    c = toy_world.concepts_of_interest[0]
    config = InversionConfig(steps=12, lr=2e-2, seed=0)
    probe = CoReLoss.for_world(toy_world, c, attn_batch=2, rescale=None)
    got = {}
    runs = {"ti": None,
            "emb": CoReLoss.for_world(toy_world, c, emb_weight=1.0, attn_weight=0.0, rescale=None),
            "attn": CoReLoss.for_world(toy_world, c, emb_weight=0.0, attn_weight=10.0, attn_batch=2, rescale=(3, 8))}
    for name, loss_fn in runs.items():
        unload(pipe, c.token)
        try:
            res = invert(pipe, c.photos, c.token, c.superclass, config, loss_fn=loss_fn, progress=False)
            with torch.no_grad():
                attn = sum(probe.terms(torch.zeros(1, 1), s)["attn"].item() for s in range(100, 104)) / 4
            got[name] = (_context_distance(pipe, probe), attn, res)
        finally:
            unload(pipe, c.token)
    ti_emb, ti_attn, _ = got["ti"]
    assert ti_emb > 0.05  # plain TI moves the context away from the superclass prompt's ...
    assert got["emb"][0] < 0.25 * ti_emb  # ... the embedding term keeps it close
    assert got["attn"][1] < 0.6 * ti_attn  # the attention term keeps the context's attention close
    log = got["attn"][2].log
    assert {"prompt", "rec", "attn", "norm"} <= set(log[-1]) and "emb" not in log[-1]
    held = [e["norm"] for e in log if 4 <= e["step"] <= 8]  # logged after the rescaling of the step
    assert max(held) - min(held) < 1e-5 and abs(log[-1]["norm"] - held[-1]) > 1e-5


def test_core_inversion_resumes_with_its_rescaling_state(toy_world, tmp_path):
    pipe = toy_world.pipe
    c = toy_world.concepts_of_interest[2]
    config = InversionConfig(steps=6, batch_size=2, lr=2e-2, checkpoint_every=3)

    class Stop(Exception):
        pass

    class Crashing(CoReLoss):  # the same loss; "crashes" at step 4 when told to (a private flag: not a setting)
        _crash_at = None

        def __call__(self, rec, rows, step):
            if step == self._crash_at:
                raise Stop
            return super().__call__(rec, rows, step)

    kw = dict(emb_weight=1.0, attn_weight=0.0, rescale=(2, 5))
    unload(pipe, c.token)
    full = invert(pipe, c.photos, c.token, c.superclass, config, loss_fn=Crashing.for_world(toy_world, c, **kw),
                  progress=False)
    unload(pipe, c.token)
    crashing = Crashing.for_world(toy_world, c, **kw)
    crashing._crash_at = 4
    with pytest.raises(Stop):
        invert(pipe, c.photos, c.token, c.superclass, config, loss_fn=crashing, checkpoint_dir=tmp_path, progress=False)
    try:
        # a fresh loss: the norm recorded at step 2 comes back from the checkpoint, not from step 3's rows
        resumed = invert(pipe, c.photos, c.token, c.superclass, config, loss_fn=Crashing.for_world(toy_world, c, **kw),
                         checkpoint_dir=tmp_path, progress=False)
    finally:
        unload(pipe, c.token)
    assert torch.allclose(resumed.embeddings, full.embeddings, atol=1e-6)
    assert [e["norm"] for e in resumed.log] == pytest.approx([e["norm"] for e in full.log], abs=1e-6)


def test_core_bad_input(toy_world):
    pipe = toy_world.pipe
    photos = toy_world.concepts_of_interest[0].photos
    ok = dict(attn_weight=0.0)
    with pytest.raises(ValueError, match="placeholder"):
        CoReLoss(pipe, "nbsem", "cat", **ok)
    with pytest.raises(ValueError, match="superclass"):
        CoReLoss(pipe, TOKEN, "", **ok)
    with pytest.raises(TypeError, match="list of templates"):
        CoReLoss(pipe, TOKEN, "cat", prompts="a {} on grass", **ok)
    with pytest.raises(ValueError, match="no regularisation prompts"):
        CoReLoss(pipe, TOKEN, "cat", prompts=[], **ok)
    with pytest.raises(ValueError, match="exactly one"):
        CoReLoss(pipe, TOKEN, "cat", prompts=["a photo on grass"], **ok)
    with pytest.raises(ValueError, match="emb_weight"):
        CoReLoss(pipe, TOKEN, "cat", emb_weight=-1.0, **ok)
    with pytest.raises(ValueError, match="attn_weight"):
        CoReLoss(pipe, TOKEN, "cat", attn_weight=float("nan"))
    with pytest.raises(ValueError, match="cosine"):
        CoReLoss(pipe, TOKEN, "cat", cosine="pixel", **ok)
    with pytest.raises(ValueError, match="photos"):
        CoReLoss(pipe, TOKEN, "cat", attn_weight=0.05)
    with pytest.raises(ValueError, match="rescale"):
        CoReLoss(pipe, TOKEN, "cat", rescale=(180, 120), **ok)
    with pytest.raises(ValueError, match="norm_target"):
        CoReLoss(pipe, TOKEN, "cat", norm_target="clip", **ok)
    with pytest.raises(ValueError, match="attn_batch"):
        CoReLoss(pipe, TOKEN, "cat", attn_batch=0, photos=photos)
    loss = CoReLoss(pipe, TOKEN, "cat", prompts=["a {} on grass"], **ok)
    with pytest.raises(ValueError, match="inside invert"):
        loss(torch.tensor(0.0), torch.zeros(1, pipe.text_encoder.config.hidden_size), step=0)
    with placeholder(pipe):
        long = CoReLoss(pipe, TOKEN, "cat", prompts=["a photo of a " * 20 + "{}"], **ok)
        with pytest.raises(ValueError, match="too long"):
            long(torch.tensor(0.0), torch.zeros(1, pipe.text_encoder.config.hidden_size), step=0)
        with pytest.raises(ValueError, match="rows"):
            loss(torch.tensor(0.0), torch.zeros(pipe.text_encoder.config.hidden_size), step=0)
    with pytest.raises(ValueError, match="rescaling norm"):
        loss.load_state_dict({"scale": -1.0})


# -- ClassDiffusion ------------------------------------------------------------------------------------------


def test_spl_hand_case():
    assert semantic_preservation(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(
        1 - 1 / math.sqrt(2), abs=1e-6)
    batch = semantic_preservation(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert batch.item() == pytest.approx((0.0 + 2.0) / 2, abs=1e-6)
    ids = [665, 353, 700, 570, 666, 666, 666]  # start, a, S* (an added id), cat, end, padding
    assert feature_position(ids, 666, "eot") == 4
    assert feature_position(ids, 666, "argmax") == 2


def test_spl_pinned_on_the_toy_world(toy_world):
    pipe = toy_world.pipe
    eos = pipe.tokenizer.eos_token_id
    # with S*'s row set to "dog": "a photo of a S* cat" is "a photo of a dog cat"
    ids_obj, h_obj = encode(pipe, "a photo of a dog cat")
    ids_ref, h_ref = encode(pipe, "a photo of a cat")
    assert ids_obj.index(eos) == 7 and ids_ref.index(eos) == 6
    expected_eot = 1 - cos(h_obj[7], h_ref[6])
    expected_argmax = 1 - cos(h_obj[5], h_ref[6])  # the official code on SD 1.5: S*'s own output vs the end token
    assert abs(expected_eot - expected_argmax) > 1e-3
    with placeholder(pipe, rows=["dog"]) as ids:
        rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach().float()
        for feature, expected in (("eot", expected_eot), ("argmax", expected_argmax)):
            loss = SemanticPreservationLoss(pipe, TOKEN, "cat", lam=2.0, feature=feature)
            assert loss.prompts(1) == (f"a photo of a {TOKEN} cat", "a photo of a cat")
            assert loss(torch.tensor(0.25), rows, step=0).item() == pytest.approx(0.25 + 2.0 * expected, rel=1e-4,
                                                                                 abs=1e-6)
            assert loss.last_log["sp"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_spl_gradient_reaches_only_the_token_row(toy_world):
    pipe = toy_world.pipe
    eos = pipe.tokenizer.eos_token_id
    with placeholder(pipe, rows=["dog"]) as ids, table_grad(pipe) as table:
        loss = SemanticPreservationLoss(pipe, TOKEN, "cat", lam=1.0)
        loss(torch.tensor(0.0), table[ids], step=0).backward()
        got = table.grad.clone()
        table.grad = None
        # the same gradient with the class prompt's feature a constant, worked out here
        kw = dict(padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True)
        ids_obj = pipe.tokenizer(f"a photo of a {TOKEN} cat", **kw).input_ids
        ids_ref = pipe.tokenizer("a photo of a cat", **kw).input_ids
        f_obj = pipe.text_encoder(torch.tensor([ids_obj]))[0][0, ids_obj.index(eos)]
        f_ref = pipe.text_encoder(torch.tensor([ids_ref]))[0][0, ids_ref.index(eos)].detach()
        (1 - f_obj @ f_ref / (f_obj.norm() * f_ref.norm())).backward()
        assert torch.allclose(got, table.grad, atol=1e-7)
        rows = nonzero_rows(got)
        assert ids[0] in rows and rows <= set(ids_obj)


def test_spl_inversion_keeps_the_phrase_close_to_the_class_and_fits_any_method(toy_world):
    from compinv_utils.methods import get_method

    pipe = toy_world.pipe
    c = toy_world.concepts_of_interest[1]
    config = InversionConfig(steps=12, lr=2e-2, seed=0)
    sp = {}
    for lam in (0.0, 1.0):
        unload(pipe, c.token)
        try:
            res = invert(pipe, c.photos, c.token, c.superclass, config, progress=False,
                         loss_fn=SemanticPreservationLoss.for_world(toy_world, c, lam=lam))
            sp[lam] = res.log[-1]["sp"]
        finally:
            unload(pipe, c.token)
    assert sp[0.0] > 0.05 and sp[1.0] < 0.25 * sp[0.0]
    # ClassDiffusion's own setting: the loss on top of Custom Diffusion
    method = get_method("custom_diffusion")
    fitted = method.fit(toy_world, c, method.config_class(steps=2, class_images=0), progress=False,
                        loss_fn=SemanticPreservationLoss.for_world(toy_world, c))
    try:
        assert len(fitted.log) == 2 and {"rec", "sp", "cos"} <= set(fitted.log[-1])
    finally:
        method.unload(pipe, fitted.handle)


def test_spl_bad_input(toy_world):
    pipe = toy_world.pipe
    with pytest.raises(ValueError, match="placeholder"):
        SemanticPreservationLoss(pipe, "dog*", "dog")
    with pytest.raises(ValueError, match="superclass"):
        SemanticPreservationLoss(pipe, TOKEN, "  ")
    with pytest.raises(ValueError, match="lam"):
        SemanticPreservationLoss(pipe, TOKEN, "cat", lam=-0.5)
    with pytest.raises(ValueError, match="exactly one"):
        SemanticPreservationLoss(pipe, TOKEN, "cat", template="a photo of a dog")
    with pytest.raises(ValueError, match="feature"):
        SemanticPreservationLoss(pipe, TOKEN, "cat", feature="mean")
    loss = SemanticPreservationLoss(pipe, TOKEN, "cat")
    with pytest.raises(ValueError, match="inside invert"):
        loss(torch.tensor(0.0), torch.zeros(1, pipe.text_encoder.config.hidden_size), step=0)
    with pytest.raises(ValueError, match="end-of-text"):
        feature_position([665, 1, 2], 666, "eot")


def test_checkpoints_tell_the_losses_settings_apart(toy_world):
    pipe = toy_world.pipe
    a = CoReLoss(pipe, TOKEN, "cat", attn_weight=0.0)
    assert loss_identity(a) == loss_identity(CoReLoss(pipe, TOKEN, "cat", attn_weight=0.0))
    assert loss_identity(a) != loss_identity(CoReLoss(pipe, TOKEN, "cat", attn_weight=0.0, emb_weight=1e-3))
    assert loss_identity(a) != loss_identity(CoReLoss(pipe, TOKEN, "cat", attn_weight=0.0, cosine="channel"))
    a._scale = 1.0  # the rescaling's state is not a setting: a resumed loss must match a fresh one
    assert loss_identity(a) == loss_identity(CoReLoss(pipe, TOKEN, "cat", attn_weight=0.0))
    s = SemanticPreservationLoss(pipe, TOKEN, "cat")
    assert loss_identity(s) == loss_identity(SemanticPreservationLoss(pipe, TOKEN, "cat"))
    assert loss_identity(s) != loss_identity(SemanticPreservationLoss(pipe, TOKEN, "cat", lam=0.5))
    assert loss_identity(s) != loss_identity(SemanticPreservationLoss(pipe, TOKEN, "cat", feature="argmax"))
