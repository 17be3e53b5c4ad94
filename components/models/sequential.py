"""Next-item models: item embedding → sequence encoder → scores against every item."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rex.components.embeddings.attributes import ItemAttributeEmbedding
from rex.components.encoders.dropout import Dropout
from rex.config.registry import Factory, register


@register("model/sequential")
class SequentialRecommender(nn.Module):
    """Next-item recommender (SASRec with a causal transformer encoder) with tied item embeddings.

    Training batch: ``items`` (B, L) input ids and ``targets`` (B, L) next ids, left-padded
    with 0. Returns ``logits`` (P, num_items) and ``labels`` (P,) for the P non-padded
    positions, so the loss is computed at every position of every sequence.
    Scoring batch: ``history`` (B, L). Returns ``scores`` (B, num_items) from the last position:
    ``user_vectors(batch) @ item_vectors().T``, so the model serves from a vector index of its
    item table (rex's retrieval protocol, ``rex.eval.evaluators.RetrievalModel``).
    The encoder is called as ``encoder(x, padding_mask, last_only=...)``; with ``last_only`` it
    may compute the last position alone, (B, 1, dim), as ``encoder/transformer`` does.

    ``attributes`` (``embedding/item_attributes``) makes it SASRec with attributes: each item's
    id embedding concatenated with its mean attribute embedding, projected back to ``dim``,
    both for the inputs and for the tied table that scores items. Off by default.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        encoder: Factory[nn.Module],
        dim: int = 64,
        dropout: float = 0.2,
        positional: bool = True,
        attributes: Factory[ItemAttributeEmbedding] | None = None,
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
        # Built last, so that without them the parameters are drawn as they always were.
        self.attributes = attributes(dim=dim) if attributes is not None else None
        self.fuse = nn.Linear(2 * dim, dim, bias=False) if attributes is not None else None

    def embed(self, items: Tensor) -> Tensor:
        """Item ids (*) → their input vectors (*, dim)."""
        if self.attributes is None or self.fuse is None:
            return self.item_embedding(items)
        return self.fuse(torch.cat([self.item_embedding(items), self.attributes.mean(items)], dim=-1))

    def item_table(self) -> Tensor:
        """(num_items, dim): the vectors hidden states are scored against, the inputs' own."""
        weight = self.item_embedding.weight
        if self.attributes is None:
            return weight
        return self.embed(torch.arange(len(weight), device=weight.device))

    def output_tables(self) -> list[Tensor]:
        """[(num_items, dim)]: the one table a scoring batch's ``scores`` are dot products with
        (for a ``decoding/...`` component)."""
        return [self.item_table()]

    def item_vectors(self) -> Tensor:
        """(num_items, dim): the vectors ``scores`` are dot products with (row 0 is padding)."""
        return self.item_table()

    def user_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, dim): the last hidden state of each ``history`` row, the query of its scores."""
        return self.encode(batch["history"], last_only=True)[:, -1]

    @staticmethod
    def positions(embedding: nn.Embedding, length: int, device: torch.device) -> Tensor:
        """(L, dim) position embeddings of a window of L items, counted back from the most recent (0)."""
        if length > embedding.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_len {embedding.num_embeddings}")
        return embedding(torch.arange(length - 1, -1, -1, device=device))

    def encode(self, items: Tensor, last_only: bool = False) -> Tensor:
        """(B, L) item ids, left-padded → (B, L, dim) hidden states ((B, 1, dim) if ``last_only``)."""
        x = self.embed(items) * math.sqrt(self.dim)
        if self.position_embedding is not None:
            x = x + self.positions(self.position_embedding, items.shape[1], items.device)
        padding = items == 0
        return self.encoder(self.dropout(x), padding, last_only=last_only)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "targets" in batch:
            hidden = self.encode(batch["items"])
            valid = batch["targets"] > 0
            queries = hidden[valid]
            return {"logits": queries @ self.item_table().T, "labels": batch["targets"][valid]}
        return {"scores": self.user_vectors(batch) @ self.item_vectors().T}


@register("model/masked_sequential")
class MaskedItemRecommender(SequentialRecommender):
    """BERT4Rec (Sun et al., CIKM 2019): a bidirectional encoder trained to restore masked items.

    Item id ``num_items`` is the mask token (its embedding row is never scored). Training batch:
    the next-item task's ``items`` and ``targets`` (B, L), whose union is each row's window of
    up to L + 1 items; the last ``max_len`` of them are kept, each real item is replaced by the
    mask with probability ``mask_prob`` (at least one per row, the most recent when the draw
    picks none), and the model returns ``logits`` (P, num_items) and ``labels`` (P,) at the P
    masked positions. Scoring batch: ``history`` (B, L) with the mask appended, scored at that
    position: ``scores`` (B, num_items). The encoder must not be causal, so that a masked item
    sees the items after it.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        encoder: Factory[nn.Module],
        dim: int = 64,
        dropout: float = 0.2,
        mask_prob: float = 0.2,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        super().__init__(num_items + 1, max_len, encoder, dim, dropout, positional=True)
        if getattr(self.encoder, "causal", False):
            raise ValueError("model/masked_sequential needs a bidirectional encoder: set causal: false")
        self.num_items = num_items
        self.mask_prob = mask_prob
        self.max_len = max_len
        # BERT4Rec's output head: a projection with GELU and LayerNorm, then tied embeddings + bias.
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.output_bias = nn.Parameter(torch.zeros(num_items))

    def _scores(self, query: Tensor) -> Tensor:
        """(P, num_items) scores of the output head's (P, dim) vectors."""
        return query @ self.item_embedding.weight[: self.num_items].T + self.output_bias

    def output_tables(self) -> list[Tensor]:
        """[(num_items, dim)]: the scored rows of the item table (the mask token's row is not)."""
        return [self.item_embedding.weight[: self.num_items]]

    def item_vectors(self) -> Tensor:
        """(num_items, dim + 1): the scored rows of the item table with each item's output bias
        appended, so that ``scores`` stay exact dot products (the bias meets ``user_vectors``' 1)."""
        return torch.cat([self.output_tables()[0], self.output_bias[:, None]], dim=1)

    def user_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, dim + 1): the output head at the mask appended to each ``history`` row, and a 1."""
        query = self._query(batch["history"])
        return torch.cat([query, query.new_ones(len(query), 1)], dim=1)

    def _query(self, history: Tensor) -> Tensor:
        """(B, dim): the output head at a mask appended to each (B, L) history row."""
        mask = history.new_full((history.shape[0], 1), self.num_items)
        hidden = self.encode(torch.cat([history, mask], dim=1)[:, -self.max_len :], last_only=True)
        return self.head(hidden[:, -1])

    def _mask_items(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """(B, W) left-padded ids → the ids with masks in, and the bool (B, W) masked positions."""
        real = sequences > 0
        masked = real & (torch.rand(sequences.shape, device=sequences.device) < self.mask_prob)
        # Every row supervises something: the most recent item when the draw masked none.
        none = ~masked.any(dim=1)
        masked[:, -1] |= none & real[:, -1]
        return sequences.masked_fill(masked, self.num_items), masked

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "targets" in batch:
            items, targets = batch["items"], batch["targets"]
            sequences = torch.cat([items, targets[:, -1:]], dim=1)[:, -self.max_len :]
            inputs, masked = self._mask_items(sequences)
            hidden = self.encode(inputs)
            return {"logits": self._scores(self.head(hidden[masked])), "labels": sequences[masked]}
        return {"scores": self._scores(self._query(batch["history"]))}
