"""model/masked_sequential (BERT4Rec): cloze training over a bidirectional encoder."""

from __future__ import annotations

import pytest
import torch

from rex.components.encoders.transformer import TransformerEncoder
from rex.components.models.sequential import MaskedItemRecommender


def _model(mask_prob: float = 0.5, causal: bool = False) -> MaskedItemRecommender:
    torch.manual_seed(0)
    return MaskedItemRecommender(
        num_items=20,
        max_len=6,
        encoder=lambda dim: TransformerEncoder(
            dim=dim, num_layers=1, num_heads=2, dropout=0.0, causal=causal
        ),
        dim=8,
        dropout=0.0,
        mask_prob=mask_prob,
    )


def _training_batch() -> dict[str, torch.Tensor]:
    # Rows 3 4 5 6 7 8 9 (longer than max_len) and 11 12, left-padded, split as the task splits them.
    sequences = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 11, 12]])
    inputs = sequences[:, :-1]
    return {"items": inputs, "targets": torch.where(inputs > 0, sequences[:, 1:], 0)}


def test_masked_positions_are_real_items_and_their_labels_are_the_items_hidden() -> None:
    model = _model()
    torch.manual_seed(3)
    out = model(_training_batch())
    assert out["logits"].shape == (len(out["labels"]), 20)
    # Labels come from the last max_len items of each row, never padding or the dropped oldest.
    assert set(out["labels"].tolist()) <= {4, 5, 6, 7, 8, 9, 11, 12} and len(out["labels"]) >= 2
    out["logits"].logsumexp(dim=1).sum().backward()
    assert model.item_embedding.weight.grad is not None and model.head[0].weight.grad is not None


def test_every_row_supervises_at_least_its_most_recent_item() -> None:
    model = _model(mask_prob=1e-9)  # the draw masks nothing: each row's last item is masked
    out = model(_training_batch())
    assert out["labels"].tolist() == [9, 12]


def test_scores_rank_every_item_but_the_mask_and_see_later_items() -> None:
    model = _model().eval()
    history = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 0, 7]])
    scores = model({"history": history})["scores"]
    assert scores.shape == (2, 20)
    # Padding width does not change a row's scores.
    wider = torch.cat([torch.zeros(2, 3, dtype=torch.long), history], dim=1)[:, -6:]
    torch.testing.assert_close(model({"history": wider})["scores"], scores)
    # Bidirectional: an item's state depends on the items after it (a causal encoder's would not).
    hidden = model.encode(torch.tensor([[3, 4, 5]]))
    changed = model.encode(torch.tensor([[3, 4, 6]]))
    assert not torch.allclose(hidden[0, 0], changed[0, 0])


def test_a_causal_encoder_and_a_bad_mask_probability_are_refused() -> None:
    with pytest.raises(ValueError, match="causal: false"):
        _model(causal=True)
    with pytest.raises(ValueError, match="mask_prob"):
        _model(mask_prob=1.0)
