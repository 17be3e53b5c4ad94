"""Dual Enhanced Attention (Xu et al., 2025, arXiv:2503.11233): combo-ID and collapse-avoiding
attention across fields."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.config.registry import register

# Odd multipliers of the two hashes of a field pair's ids (the siamese codebooks' hashes).
_HASHES = ((1_000_003, 998_244_353, 7_919), (2_654_435_761, 40_503, 104_729))


@register("interaction/dual_attention")
class DualEnhancedAttention(nn.Module):
    """Self-attention across fields with a memory of each feature pair, as a logit.

    Input ``(B, F, d)`` field embeddings and ``ids`` ``(B, F)``, each field's id offset into
    one global id space (``model/ctr`` passes both). Output ``(B,)``.

    **Combo-ID attention.** Each field pair (i, j), i ≠ j, holding ids (x_i, x_j) is a feature
    combination of its own: its embedding ``c_ij`` is looked up in two codebooks of
    ``combo_buckets`` rows under two hashes of (x_i, x_j, pair), mixed by a learnt gate
    (siamese codebooks: two rows rarely collide for the same two pairs). The pair then adds
    ``w · c_ij`` to the attention logit of query i on key j and ``U c_ij`` to the value it
    receives, so what the pair carries is not squeezed into the inner product ``q_i · k_j``.

    **Collapse-avoiding attention.** After the softmax over keys, a pair whose weight is below
    ``threshold / F`` (a share of the uniform weight) is dropped and the row renormalised, so
    low-information pairs stop pulling every field's embedding towards one direction (the paper's
    dynamic thresholding, read as a threshold relative to the row's uniform weight).

    ``combo: false`` and ``threshold: 0`` are the two ablations; with both it is AutoInt's
    interacting layers with scaled dot products. ``layers`` such layers (heads × head_dim wide,
    linear residual, ReLU), then a linear head over the flattened fields.
    """

    reads_ids = True

    def __init__(
        self,
        num_fields: int,
        dim: int,
        layers: int = 2,
        heads: int = 2,
        head_dim: int = 16,
        combo: bool = True,
        combo_buckets: int = 2**16,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        at_least(1, num_fields=num_fields, dim=dim, layers=layers, heads=heads, head_dim=head_dim)
        at_least(2, combo_buckets=combo_buckets)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.heads, self.threshold, width = heads, threshold, heads * head_dim
        self.buckets = combo_buckets
        widths = [dim] + [width] * layers
        self.qkv = nn.ModuleList(nn.Linear(w, 3 * width, bias=False) for w in widths[:-1])
        self.residual = nn.ModuleList(nn.Linear(w, width, bias=False) for w in widths[:-1])
        self.head = nn.Linear(num_fields * width, 1)
        self.codebooks = nn.ModuleList(nn.Embedding(combo_buckets, width) for _ in _HASHES) if combo else None
        if self.codebooks is not None:
            for codebook in self.codebooks:
                nn.init.normal_(codebook.weight, std=0.01)
            self.gate = nn.Linear(2 * width, width)
            self.combo_logit = nn.Linear(width, heads, bias=False)
            self.combo_value = nn.Linear(width, width, bias=False)
        pairs = torch.arange(num_fields)
        self.register_buffer("pair_index", pairs[:, None] * num_fields + pairs[None, :], persistent=False)

    def combo_rows(self, ids: Tensor) -> list[Tensor]:
        """Each codebook's row (B, F, F) of every field pair's ids."""
        x_i, x_j = ids[:, :, None].long(), ids[:, None, :].long()
        return [(a * x_i + b * x_j + c * self.pair_index) % self.buckets for a, b, c in _HASHES]

    def combos(self, ids: Tensor) -> Tensor:
        """(B, F, F, width) gated combination embeddings; the diagonal (a field with itself) is zero."""
        assert self.codebooks is not None
        first, second = (
            codebook(rows) for codebook, rows in zip(self.codebooks, self.combo_rows(ids), strict=True)
        )
        gate = torch.sigmoid(self.gate(torch.cat([first, second], dim=-1)))
        mixed = gate * first + (1 - gate) * second
        off_diagonal = ~torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
        return mixed * off_diagonal[None, :, :, None]

    def attention(self, q: Tensor, k: Tensor, combos: Tensor | None) -> Tensor:
        """(B, H, F, F) weights of queries (B, H, F, h) on keys, after the collapse filter."""
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if combos is not None:
            logits = logits + self.combo_logit(combos).permute(0, 3, 1, 2)
        weights = logits.softmax(dim=-1)
        if self.threshold > 0:
            weights = weights * (weights >= self.threshold / q.shape[-2])
            weights = weights / weights.sum(dim=-1, keepdim=True)  # a row's maximum is always kept
        return weights

    def forward(self, emb: Tensor, ids: Tensor) -> Tensor:
        combos = self.combos(ids) if self.codebooks is not None else None
        h = emb
        for qkv, residual in zip(self.qkv, self.residual, strict=True):
            b, f, _ = h.shape
            q, k, v = qkv(h).view(b, f, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, F, h)
            weights = self.attention(q, k, combos)
            attended = (weights @ v).transpose(1, 2).reshape(b, f, -1)
            if combos is not None:
                # Each query field receives its pairs' combination values, weighted per head.
                pair_values = self.combo_value(combos).view(b, f, f, self.heads, -1)
                attended = attended + torch.einsum("bhij,bijhd->bihd", weights, pair_values).reshape(b, f, -1)
            h = torch.relu(attended + residual(h))
        return self.head(h.flatten(1)).squeeze(-1)
