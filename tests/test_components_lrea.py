"""attention/low_rank (LREA) and search/item_group (SIM's hard search)."""

from __future__ import annotations

import pytest
import torch

from rex.components.attention.low_rank import LowRankTargetAttention
from rex.components.attention.search import ItemGroupSearch


def _inputs(batch: int = 3, length: int = 7, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :4] = False  # a short, left-padded history
    history = torch.randn(batch, length, dim) * mask[..., None]
    return torch.randn(batch, dim), history, mask


def test_shapes_gradients_and_a_loss_term() -> None:
    attention = LowRankTargetAttention(dim=8, max_len=10, rank=4)
    target, history, mask = _inputs()
    history.requires_grad_(True)
    pooled, extra = attention(target, history, mask)
    assert pooled.shape == (3, 8) and extra["attention_negativity"].shape == ()
    (pooled.sum() + extra["attention_negativity"]).backward()
    assert attention.compress.grad is not None and history.grad is not None
    assert bool((history.grad[1, :4] == 0).all())  # padding is never read


def test_the_served_path_gives_the_training_scores() -> None:
    attention = LowRankTargetAttention(dim=8, max_len=10, rank=4, key_dim=6)
    target, history, mask = _inputs()
    expected, _ = attention(target, history, mask)
    state = attention.user_state(history, mask)
    # Several candidates per user at once, the trained target among them.
    candidates = torch.stack([target, torch.randn(3, 8), target * 2], dim=1)
    served = attention.serve(state, candidates)
    torch.testing.assert_close(served[:, 0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(served[:, 2], attention(target * 2, history, mask)[0], atol=1e-5, rtol=0)


def test_padding_width_does_not_change_the_output() -> None:
    attention = LowRankTargetAttention(dim=8, max_len=10, rank=4)
    target, history, mask = _inputs()
    wider = torch.cat([torch.zeros(3, 2, 8), history], dim=1)
    wider_mask = torch.cat([torch.zeros(3, 2, dtype=torch.bool), mask], dim=1)
    torch.testing.assert_close(attention(target, wider, wider_mask)[0], attention(target, history, mask)[0])


def test_negative_item_weights_are_what_the_loss_term_counts() -> None:
    attention = LowRankTargetAttention(dim=8, max_len=10, rank=4)
    target, history, mask = _inputs()
    negativity = attention(target, history, mask)[1]["attention_negativity"].detach()
    assert float(negativity) == 0.0  # E >= 0
    with torch.no_grad():
        attention.compress.fill_(0.1)
        attention.compress[:, -1] = -0.5  # every row weighs the most recent item -0.5
    # Whatever the rank weights (they sum to 1), the most recent item gets -0.5 in every row.
    negativity = attention(target, history, mask)[1]["attention_negativity"].detach()
    assert float(negativity) == pytest.approx(0.5)


def test_group_search_keeps_only_the_targets_group() -> None:
    search = ItemGroupSearch(torch.tensor([0, 1, 1, 2, 2, 1]))
    history = torch.tensor([[0, 1, 3, 5], [4, 3, 2, 1]])
    kept = search(torch.tensor([2, 4]), history, history > 0)
    assert kept.tolist() == [[False, True, False, True], [True, True, False, False]]
