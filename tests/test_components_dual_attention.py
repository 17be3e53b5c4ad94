"""interaction/dual_attention (Dual Enhanced Attention) and the information-abundance measure."""

from __future__ import annotations

import math

import pytest
import torch

from rex.components.interactions.dual_attention import DualEnhancedAttention
from rex.eval.metrics import information_abundance


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.tensor([[1, 11, 21, 31], [2, 12, 22, 31]])  # (B=2, F=4): global ids
    return torch.randn(2, 4, 8), ids


def test_shapes_and_gradients() -> None:
    layer = DualEnhancedAttention(num_fields=4, dim=8, layers=2, heads=2, head_dim=4, combo_buckets=97)
    emb, ids = _inputs()
    emb.requires_grad_(True)
    out = layer(emb, ids)
    assert out.shape == (2,)
    out.sum().backward()
    assert emb.grad is not None and layer.codebooks is not None
    assert layer.codebooks[0].weight.grad is not None and layer.codebooks[0].weight.grad.abs().sum() > 0


def test_a_pairs_combo_embedding_changes_only_the_rows_holding_that_pair() -> None:
    layer = DualEnhancedAttention(num_fields=4, dim=8, heads=2, head_dim=4, combo_buckets=4099, threshold=0.0)
    emb, ids = _inputs()
    before = layer(emb, ids).detach()
    rows = layer.combo_rows(ids)[0]  # codebook 0's row of each (sample, i, j)
    # Fields 0 and 1 differ between the samples, so their pair's row is sample 0's alone.
    row = int(rows[0, 0, 1])
    assert row not in rows[1].flatten().tolist()
    assert layer.codebooks is not None
    with torch.no_grad():
        layer.codebooks[0].weight[row] += 1.0
    after = layer(emb, ids).detach()
    assert not torch.isclose(after[0], before[0]) and torch.equal(after[1], before[1])
    # A row that no pair of the batch holds changes nothing.
    unused = next(
        r for r in range(4099) if r not in rows.flatten().tolist() and r not in layer.combo_rows(ids)[1]
    )
    with torch.no_grad():
        layer.codebooks[0].weight[unused] += 1.0
    assert torch.equal(layer(emb, ids).detach(), after)


def test_the_collapse_filter_drops_pairs_below_the_threshold_and_renormalises() -> None:
    filtered = DualEnhancedAttention(num_fields=4, dim=8, heads=2, head_dim=4, combo=False, threshold=0.8)
    q, k = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    plain = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
    weights = filtered.attention(q, k, None)
    assert bool(((plain < 0.8 / 4) == (weights == 0)).all())
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 4))
    kept = weights > 0
    torch.testing.assert_close(weights[kept], (plain * kept / (plain * kept).sum(-1, keepdim=True))[kept])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        DualEnhancedAttention(num_fields=4, dim=8, threshold=1.0)


def test_information_abundance_by_hand() -> None:
    assert information_abundance(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(4 / 3)
    rank_one = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0]))
    assert information_abundance(rank_one) == pytest.approx(1.0)
    assert information_abundance(torch.eye(5)) == pytest.approx(5.0)
    assert math.isnan(information_abundance(torch.zeros(3, 2)))
