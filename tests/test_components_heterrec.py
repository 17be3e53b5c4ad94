"""HeterRec (arXiv:2503.01469) and SASRec with attributes: attribute tokens, the hierarchical
causal mask, multi-step labels and loss, and the ``item_attributes`` context value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rex.components.embeddings.attributes import ItemAttributeEmbedding
from rex.components.encoders.transformer import TransformerEncoder
from rex.components.losses.classification import MultiStepCrossEntropy, SoftmaxCrossEntropy
from rex.components.models.heterrec import HeterRec
from rex.components.models.sequential import SequentialRecommender
from rex.config.errors import DataError
from rex.config.recipe import load_recipe
from rex.data.datamodule import RexDataModule
from tests.conftest import REPO
from tests.test_components import assert_all_grads, left_padded_mask

NUM_ITEMS, NUM_ATTRIBUTES = 12, 7
# Each item's attribute ids, right-padded with 0: row 0 is the padding item, item 5 has none.
ATTRIBUTES = torch.tensor(
    [[0, 0, 0], [1, 0, 0], [2, 3, 0], [4, 5, 6], [1, 2, 0], [0, 0, 0]]
    + [[3, 0, 0], [4, 1, 0], [5, 6, 1], [2, 0, 0], [6, 3, 0], [1, 4, 5]]
)


def _encoder(dim: int, causal: bool) -> TransformerEncoder:
    return TransformerEncoder(dim=dim, num_layers=1, num_heads=2, dropout=0.0, causal=causal)


def _heterrec(steps: int = 3, token_level: bool = True) -> HeterRec:
    torch.manual_seed(0)
    return HeterRec(
        num_items=NUM_ITEMS,
        max_len=8,
        item_attributes=ATTRIBUTES.clone(),
        num_attributes=NUM_ATTRIBUTES,
        token_encoder=(lambda dim: _encoder(dim, causal=False)) if token_level else None,
        item_encoder=lambda dim: _encoder(dim, causal=True),
        dim=8,
        dropout=0.0,
        steps=steps,
    )


def _training_batch() -> dict[str, torch.Tensor]:
    # Rows 3 4 5 6 7 8 and 9 10, left-padded, split into inputs and next items as the task does.
    sequences = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 9, 10]])
    inputs = sequences[:, :-1]
    return {"items": inputs, "targets": torch.where(inputs > 0, sequences[:, 1:], 0)}


# --------------------------------------------------------------------------- encoder/transformer's mask


def test_transformer_allowed_mask_is_combined_with_the_causal_and_padding_masks() -> None:
    torch.manual_seed(0)
    causal = _encoder(8, causal=True).eval()
    free = _encoder(8, causal=False).eval()
    free.load_state_dict(causal.state_dict())
    x, pad = torch.randn(2, 5, 8), left_padded_mask([5, 3], 5)
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    # A causal mask given as `allowed` is the causal encoder; given to it again, nothing changes.
    torch.testing.assert_close(free(x, pad, allowed=tril), causal(x, pad))
    torch.testing.assert_close(causal(x, pad, allowed=tril), causal(x, pad))
    # Per row (B, 1, L, L): in row 0 only key 4 itself sees key 4, so changing it moves nothing else.
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[0, 0, :, 4] = False
    allowed[0, 0, 4, 4] = True
    changed = x.clone()
    changed[0, 4] = torch.randn(8)
    before, after = free(x, pad, allowed=allowed), free(changed, pad, allowed=allowed)
    torch.testing.assert_close(before[0, :4], after[0, :4])
    assert not torch.allclose(before[0, 4], after[0, 4])
    assert torch.isfinite(before).all() and (before[pad] == 0).all()


# --------------------------------------------------------------------------- embedding/item_attributes


def test_item_attribute_embedding_shapes_mean_and_padding() -> None:
    torch.manual_seed(0)
    table = ItemAttributeEmbedding(ATTRIBUTES, NUM_ATTRIBUTES, dim=4)
    items = torch.tensor([[0, 1, 5], [2, 3, 4]])
    assert table(items).shape == (2, 3, 3, 4) and table.width == 3
    mean = table.mean(items)
    assert mean.shape == (2, 3, 4)
    assert (mean[0, 0] == 0).all() and (mean[0, 2] == 0).all()  # padding, and an item with none
    ids = ATTRIBUTES[3][ATTRIBUTES[3] > 0]
    torch.testing.assert_close(mean[1, 1], table.embedding.weight[ids].mean(dim=0))
    mean.sum().backward()
    assert table.embedding.weight.grad is not None and (table.embedding.weight.grad[0] == 0).all()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ItemAttributeEmbedding(ATTRIBUTES, 3, dim=4)


# --------------------------------------------------------------------------- model/heterrec


@pytest.mark.parametrize("token_level", [True, False], ids=["heterrec", "no_token_attention"])
def test_heterrec_shapes_and_gradients(token_level: bool) -> None:
    model = _heterrec(token_level=token_level)
    out = model(_training_batch())
    assert out["logits"].shape == (6, NUM_ITEMS) and out["labels"].shape == (6, 3)
    MultiStepCrossEntropy()(out, {}).backward()
    assert_all_grads(model)
    scores = model.eval()({"history": torch.tensor([[0, 0, 3, 4], [0, 0, 0, 9]])})["scores"]
    assert scores.shape == (2, NUM_ITEMS) and torch.isfinite(scores).all()


def test_hierarchical_mask_lets_a_token_see_its_own_and_earlier_items_only() -> None:
    k = 1 + ATTRIBUTES.shape[1]
    item_of = torch.arange(4).repeat_interleave(k)  # four items' tokens, flattened
    mask = HeterRec.hierarchical_mask(item_of)
    assert mask.shape == (4 * k, 4 * k)
    for query in range(4 * k):
        for key in range(4 * k):
            assert bool(mask[query, key]) == (key // k <= query // k)
    # Batched: (B, T) item indices of packed tokens → (B, T, T).
    packed = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])
    assert HeterRec.hierarchical_mask(packed)[1].tolist() == [
        [True, False, False, False],
        [True, True, True, True],
        [True, True, True, True],
        [True, True, True, True],
    ]


def test_a_token_never_sees_a_later_items_tokens() -> None:
    model = _heterrec().eval()
    items = torch.tensor([[0, 3, 4, 6, 7]])
    before = model.encode(items)
    # Item 7 (the last) gets other attributes; item 4 (in the middle) a new id embedding row.
    model.attribute_tokens.item_attributes[7] = torch.tensor([6, 5, 4])
    after = model.encode(items)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    assert not torch.allclose(after[:, 4], before[:, 4])
    with torch.no_grad():
        model.item_embedding.weight[4] += torch.randn(8)
    later = model.encode(items)
    torch.testing.assert_close(later[:, :2], after[:, :2])
    assert not torch.allclose(later[:, 2:], after[:, 2:])


def _dense_encode(model: HeterRec, items: torch.Tensor) -> torch.Tensor:
    """The definition, in eval mode: every item's K token slots embedded, (B, L, K, dim), one
    token-level pass over all L·K of them under the hierarchical mask, the mean over each item's
    present tokens, then the item encoder."""
    assert model.position_embedding is not None
    embedded = torch.cat([model.item_embedding(items)[:, :, None], model.attribute_tokens(items)], dim=2)
    positions = model.positions(model.position_embedding, items.shape[1], items.device)
    x = embedded * model.dim**0.5 + model.slot_embedding.weight + positions[:, None]
    present = torch.cat([items[:, :, None] > 0, model.attribute_tokens.ids(items) > 0], dim=2)
    x = x.masked_fill(~present[..., None], 0.0)
    b, length, k, dim = x.shape
    if model.token_encoder is not None:
        x = model.token_encoder(
            x.reshape(b, length * k, dim),
            ~present.reshape(b, length * k),
            allowed=model.hierarchical_mask(torch.arange(length).repeat_interleave(k)),
        ).reshape(b, length, k, dim)
    pooled = x.sum(dim=2) / present.sum(dim=2, keepdim=True).clamp(min=1)
    return model.encoder(pooled, items == 0)


@pytest.mark.parametrize("token_level", [True, False], ids=["heterrec", "no_token_attention"])
def test_packed_tokens_in_length_groups_give_the_dense_one_pass_states(token_level: bool) -> None:
    model = _heterrec(token_level=token_level).eval()
    items = torch.tensor(
        [
            [1, 2, 3, 4, 6, 7, 8, 9],
            [0, 0, 0, 3, 4, 5, 6, 7],
            [0, 0, 0, 0, 0, 2, 5, 6],
            [0] * 7 + [11],
            [0] * 8,
        ]
    )
    tokens = model.tokens(items)
    assert tokens.per_item.shape == (5, 8) and tokens.x.shape == (int(tokens.per_item.sum()), 8)
    torch.testing.assert_close(model.encode(items), _dense_encode(model, items))


def test_heterrec_scores_do_not_depend_on_padding_width() -> None:
    model = _heterrec().eval()
    history = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 0, 9]])
    scores = model({"history": history})["scores"]
    wider = torch.cat([torch.zeros(2, 3, dtype=torch.long), history], dim=1)
    torch.testing.assert_close(model({"history": wider})["scores"], scores)


def test_multi_step_labels_are_the_next_items_of_each_supervised_position() -> None:
    out = _heterrec(steps=3)(_training_batch())
    # Row 0: inputs 3..7, next items 4..8; row 1: input 9, next item 10. Rows in batch order.
    assert out["labels"].tolist() == [
        [4, 5, 6],
        [5, 6, 7],
        [6, 7, 8],
        [7, 8, 0],
        [8, 0, 0],
        [10, 0, 0],
    ]
    one = _heterrec(steps=1)(_training_batch())["labels"]
    assert one.tolist() == [[4], [5], [6], [7], [8], [10]]


def test_heterrec_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        HeterRec(NUM_ITEMS, 8, ATTRIBUTES, NUM_ATTRIBUTES, _encoder, _encoder, steps=0)
    with pytest.raises(ValueError, match="rows"):
        HeterRec(NUM_ITEMS + 1, 8, ATTRIBUTES, NUM_ATTRIBUTES, _encoder, _encoder)


# --------------------------------------------------------------------------- loss/multi_step_ce


def test_multi_step_ce_with_one_step_is_softmax_ce() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 11, requires_grad=True), torch.randint(1, 11, (7,))
    single = SoftmaxCrossEntropy()({"logits": logits, "labels": labels}, {})
    multi = MultiStepCrossEntropy(decay=0.3)({"logits": logits, "labels": labels[:, None]}, {})
    torch.testing.assert_close(multi, single, rtol=0, atol=1e-6)
    (g_single,) = torch.autograd.grad(single, logits)
    (g_multi,) = torch.autograd.grad(multi, logits)
    torch.testing.assert_close(g_multi, g_single, rtol=0, atol=1e-7)


def test_multi_step_ce_weighs_steps_by_decay_over_the_steps_present() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    labels = torch.tensor([[1, 2, 3], [4, 0, 0]])
    log_p = F.log_softmax(logits, dim=1)
    first = -(log_p[0, 1] + 0.5 * log_p[0, 2] + 0.25 * log_p[0, 3]) / 1.75
    second = -log_p[1, 4]  # its missing steps count for nothing
    loss = MultiStepCrossEntropy(decay=0.5)({"logits": logits, "labels": labels}, {})
    torch.testing.assert_close(loss, (first + second) / 2)
    with pytest.raises(ValueError, match="decay"):
        MultiStepCrossEntropy(decay=0.0)


# --------------------------------------------------------------------------- SASRec with attributes


def _sasrec(attributes: bool) -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(
        num_items=NUM_ITEMS,
        max_len=8,
        encoder=lambda dim: _encoder(dim, causal=True),
        dim=8,
        dropout=0.0,
        attributes=(lambda dim: ItemAttributeEmbedding(ATTRIBUTES.clone(), NUM_ATTRIBUTES, dim))
        if attributes
        else None,
    )


def test_default_sequential_model_is_unchanged_by_the_attributes_option() -> None:
    plain, with_attributes = _sasrec(False), _sasrec(True)
    assert plain.attributes is None and plain.fuse is None
    keys = set(plain.state_dict())
    assert {k.split(".")[0] for k in keys} == {"item_embedding", "position_embedding", "encoder"}
    # The extra modules are drawn after the rest: the shared parameters start the same.
    extra = set(with_attributes.state_dict()) - keys
    assert {k.split(".")[0] for k in extra} == {"attributes", "fuse"}
    for name, value in plain.state_dict().items():
        assert torch.equal(value, with_attributes.state_dict()[name]), name
    assert plain.item_table() is plain.item_embedding.weight


def test_sasrec_with_attributes_shapes_gradients_and_reads_the_attributes() -> None:
    model = _sasrec(True)
    out = model(_training_batch())
    assert out["logits"].shape == (6, NUM_ITEMS) and out["labels"].shape == (6,)
    SoftmaxCrossEntropy()(out, {}).backward()
    assert_all_grads(model)
    model.eval()
    history = torch.tensor([[0, 3, 4, 6]])
    state, table = model.encode(history)[:, -1], model.item_table()
    model.attributes.item_attributes[4] = torch.tensor([6, 5, 0])
    # Item 4's attributes move the state of a history that holds it, and item 4's row alone.
    assert not torch.allclose(model.encode(history)[:, -1], state)
    changed = model.item_table()
    others = torch.arange(NUM_ITEMS) != 4
    assert not torch.allclose(changed[4], table[4])
    torch.testing.assert_close(changed[others], table[others])


# --------------------------------------------------------------------------- the item_attributes context


def _datamodule(root: Path, *overrides: str) -> RexDataModule:
    loaded = load_recipe(REPO / "recipes" / "heterrec.yaml", list(overrides))
    return RexDataModule(loaded.recipe, root / loaded.recipe.data.name, seed=0)


def test_item_attributes_context_is_a_right_padded_id_table(data_home: Path) -> None:
    context = _datamodule(data_home).context()
    table, vocab = context["item_attributes"], context["num_attributes"]
    assert table.dtype == torch.int64 and table.shape == (12102, 6) and vocab == 638
    assert (table[0] == 0).all() and int(table.max()) == vocab - 1
    present = table > 0
    # Right-padded: once a row's ids stop, only padding follows.
    assert (present[:, 1:] <= present[:, :-1]).all() and present[1:, 0].all()
    assert table[1].tolist()[:4] == [173, 1, 162, 171]


def test_item_attributes_of_a_dataset_without_them_is_a_data_error(data_home: Path) -> None:
    context = _datamodule(data_home, "data.name=ml-100k").context()
    with pytest.raises(DataError, match=r"'ml-100k' has no items view with a list of attribute ids") as info:
        context["item_attributes"]
    assert info.value.key == "data.name" and "item_attributes" in str(info.value)
