"""Next-item models: item embedding → sequence encoder → scores against every item."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rex.components.encoders.dropout import Dropout
from rex.config.registry import Factory, register


@register("model/sequential")
class SequentialRecommender(nn.Module):
    """Next-item recommender (SASRec with a causal transformer encoder) with tied item embeddings.

    Training batch: ``items`` (B, L) input ids and ``targets`` (B, L) next ids, left-padded
    with 0. Returns ``logits`` (P, num_items) and ``labels`` (P,) for the P non-padded
    positions, so the loss is computed at every position of every sequence.
    Scoring batch: ``history`` (B, L). Returns ``scores`` (B, num_items) from the last position.
    The encoder is called as ``encoder(x, padding_mask, last_only=...)``; with ``last_only`` it
    may compute the last position alone, (B, 1, dim), as ``encoder/transformer`` does.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        encoder: Factory[nn.Module],
        dim: int = 64,
        dropout: float = 0.2,
        positional: bool = True,
    ) -> None:
        super().__init__()
        self.outputs = frozenset({"logits", "labels", "scores"})
        self.dim = dim
        self.item_embedding = nn.Embedding(num_items, dim, padding_idx=0)
        # Positions count back from the most recent item, so left padding to the batch
        # maximum (rather than a global maximum) gives every item the same position.
        self.position_embedding = nn.Embedding(max_len, dim) if positional else None
        self.dropout = Dropout(dropout)
        self.encoder = encoder(dim=dim)
        nn.init.normal_(self.item_embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def encode(self, items: Tensor, last_only: bool = False) -> Tensor:
        """(B, L) item ids, left-padded → (B, L, dim) hidden states ((B, 1, dim) if ``last_only``)."""
        x = self.item_embedding(items) * math.sqrt(self.dim)
        if self.position_embedding is not None:
            length = items.shape[1]
            max_len = self.position_embedding.num_embeddings
            if length > max_len:
                raise ValueError(f"sequence length {length} exceeds max_len {max_len}")
            positions = torch.arange(length - 1, -1, -1, device=items.device)
            x = x + self.position_embedding(positions)
        padding = items == 0
        return self.encoder(self.dropout(x), padding, last_only=last_only)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "targets" in batch:
            hidden = self.encode(batch["items"])
            valid = batch["targets"] > 0
            queries = hidden[valid]
            return {"logits": queries @ self.item_embedding.weight.T, "labels": batch["targets"][valid]}
        hidden = self.encode(batch["history"], last_only=True)
        return {"scores": hidden[:, -1] @ self.item_embedding.weight.T}
